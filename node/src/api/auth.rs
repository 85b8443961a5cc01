//! `strata.v1.Auth`: logins, users and per-stream rules.
//!
//! Login is answered by any node from its applied state after a read index (a user added a
//! moment ago on the leader can log in at once). User and rule changes are control
//! commands through Raft, routed to the leader; the admission layer let only admins this far.
//! A new password is hashed on the node that proposes it, in a bounded slot: the Raft log
//! and every node's state hold the argon2id hash only.

use std::sync::Arc;

use strata_proto::v1::auth_client::AuthClient;
use strata_proto::v1::auth_server::Auth;
use strata_proto::v1::{
    AddUserRequest, AddUserResponse, ListStreamRulesRequest, ListStreamRulesResponse, ListUsersRequest, ListUsersResponse,
    LoginRequest, LoginResponse, RemoveStreamRuleRequest, RemoveStreamRuleResponse, RemoveUserRequest, RemoveUserResponse,
    SetStreamRuleResponse, StreamRule as StreamRuleMessage, UserInfo, WhoAmIRequest, WhoAmIResponse,
};
use strata_security::auth::{self, AuthError, Role};
use strata_security::StreamRule;
use strata_storage::access::UserRecord;
use strata_storage::ControlCommand;
use tonic::{Request, Response, Status};

use super::NodeContext;
use crate::access::caller;
use crate::clock::now_unix_ms;
use crate::control::propose;
use crate::error::ApiError;
use crate::limits::STREAM_NAME_BYTES_MAX;
use crate::routing::{forwarded_failure, is_forwarded, mark_forwarded};

/// Entries (users and roles) one stream rule may list.
pub const RULE_ENTRIES_MAX: usize = 256;

pub struct AuthService {
    ctx: Arc<NodeContext>,
}

impl AuthService {
    pub fn new(ctx: Arc<NodeContext>) -> Self {
        Self { ctx }
    }
}

fn roles_of(names: &[String]) -> Result<Vec<Role>, ApiError> {
    if names.is_empty() {
        return Err(ApiError::InvalidArgument { field: "roles".into(), reason: "give at least one of admin, ops, writer, reader".into() });
    }
    let mut roles = names.iter().map(|name| name.parse::<Role>()).collect::<Result<Vec<_>, AuthError>>()?;
    roles.sort();
    roles.dedup();
    Ok(roles)
}

fn role_names(roles: &[Role]) -> Vec<String> {
    roles.iter().map(|role| role.name().to_string()).collect()
}

/// A rule as asked for, validated: a stream name or a prefix ending in `*` (the only
/// `*`), entries that are user names or `role:<role>`.
fn rule_of(message: StreamRuleMessage) -> Result<StreamRule, ApiError> {
    let invalid = |field: &str, reason: String| ApiError::InvalidArgument { field: field.into(), reason };
    let pattern = message.pattern;
    let stem = pattern.strip_suffix('*').unwrap_or(&pattern);
    if pattern.is_empty() || pattern.len() > STREAM_NAME_BYTES_MAX || stem.contains('*') || stem.chars().any(char::is_control) {
        return Err(invalid("pattern", format!("a stream name or a prefix ending in `*`, up to STREAM_NAME_BYTES_MAX={STREAM_NAME_BYTES_MAX} bytes")));
    }
    for (field, entries) in [("read", &message.read), ("write", &message.write)] {
        if entries.len() > RULE_ENTRIES_MAX {
            return Err(invalid(field, format!("more than RULE_ENTRIES_MAX={RULE_ENTRIES_MAX} entries")));
        }
        for entry in entries {
            match entry.strip_prefix("role:") {
                Some(role) => {
                    role.parse::<Role>()?;
                }
                None => auth::check_user_name(entry)?,
            }
        }
    }
    Ok(StreamRule { pattern, read: message.read, write: message.write })
}

#[tonic::async_trait]
impl Auth for AuthService {
    async fn login(&self, request: Request<LoginRequest>) -> Result<Response<LoginResponse>, Status> {
        let request = request.into_inner();
        self.ctx.router.linearize().await?;
        let (token, expires_unix_secs, roles) = self.ctx.access.login(&request.user, &request.password).await?;
        tracing::info!(user = %request.user, expires_unix_secs, "token issued");
        Ok(Response::new(LoginResponse { token, expires_unix_secs, roles: role_names(&roles) }))
    }

    async fn who_am_i(&self, request: Request<WhoAmIRequest>) -> Result<Response<WhoAmIResponse>, Status> {
        let caller = caller(&request)?;
        Ok(Response::new(WhoAmIResponse { user: caller.principal.user, roles: role_names(&caller.principal.roles), via: caller.via.name().into() }))
    }

    async fn add_user(&self, request: Request<AddUserRequest>) -> Result<Response<AddUserResponse>, Status> {
        let forwarded = is_forwarded(&request);
        let request = request.into_inner();
        auth::check_user_name(&request.user).map_err(ApiError::from)?;
        let roles = roles_of(&request.roles)?;
        if request.password.is_empty() || request.password.len() > auth::PASSWORD_BYTES_MAX {
            return Err(ApiError::InvalidArgument { field: "password".into(), reason: format!("1 to {} bytes", auth::PASSWORD_BYTES_MAX) }.into());
        }
        let ctx = &self.ctx;
        let remote = request.clone();
        ctx.router
            .on_leader(
                forwarded,
                || async {
                    let password = request.password.clone();
                    let password_hash = ctx.access.password_work(move || auth::hash_password(&password)).await??;
                    let user = UserRecord { name: request.user.clone(), password_hash, roles, created_unix_ms: now_unix_ms() };
                    propose(&ctx.router, ControlCommand::PutUser { user, replace: request.replace }).await?;
                    tracing::info!(user = %request.user, replace = request.replace, "user saved");
                    Ok(AddUserResponse {})
                },
                |channel| async move { AuthClient::new(channel).add_user(mark_forwarded(remote)).await.map_err(forwarded_failure) },
            )
            .await
    }

    async fn remove_user(&self, request: Request<RemoveUserRequest>) -> Result<Response<RemoveUserResponse>, Status> {
        let forwarded = is_forwarded(&request);
        let request = request.into_inner();
        let router = &self.ctx.router;
        let remote = request.clone();
        router
            .on_leader(
                forwarded,
                || async {
                    propose(router, ControlCommand::RemoveUser { name: request.user.clone() }).await?;
                    tracing::info!(user = %request.user, "user removed");
                    Ok(RemoveUserResponse {})
                },
                |channel| async move { AuthClient::new(channel).remove_user(mark_forwarded(remote)).await.map_err(forwarded_failure) },
            )
            .await
    }

    async fn list_users(&self, _request: Request<ListUsersRequest>) -> Result<Response<ListUsersResponse>, Status> {
        self.ctx.router.linearize().await?;
        let users = self
            .ctx
            .events
            .users()
            .map_err(ApiError::from)?
            .into_iter()
            .map(|user| UserInfo { user: user.name, roles: role_names(&user.roles), created_unix_ms: user.created_unix_ms })
            .collect();
        Ok(Response::new(ListUsersResponse { users }))
    }

    async fn set_stream_rule(&self, request: Request<StreamRuleMessage>) -> Result<Response<SetStreamRuleResponse>, Status> {
        let forwarded = is_forwarded(&request);
        let request = request.into_inner();
        let rule = rule_of(request.clone())?;
        let router = &self.ctx.router;
        router
            .on_leader(
                forwarded,
                || async {
                    tracing::info!(pattern = %rule.pattern, "stream rule set");
                    propose(router, ControlCommand::SetStreamRule(rule)).await?;
                    Ok(SetStreamRuleResponse {})
                },
                |channel| async move { AuthClient::new(channel).set_stream_rule(mark_forwarded(request)).await.map_err(forwarded_failure) },
            )
            .await
    }

    async fn remove_stream_rule(&self, request: Request<RemoveStreamRuleRequest>) -> Result<Response<RemoveStreamRuleResponse>, Status> {
        let forwarded = is_forwarded(&request);
        let request = request.into_inner();
        let router = &self.ctx.router;
        let remote = request.clone();
        router
            .on_leader(
                forwarded,
                || async {
                    propose(router, ControlCommand::RemoveStreamRule { pattern: request.pattern.clone() }).await?;
                    Ok(RemoveStreamRuleResponse {})
                },
                |channel| async move { AuthClient::new(channel).remove_stream_rule(mark_forwarded(remote)).await.map_err(forwarded_failure) },
            )
            .await
    }

    async fn list_stream_rules(&self, _request: Request<ListStreamRulesRequest>) -> Result<Response<ListStreamRulesResponse>, Status> {
        self.ctx.router.linearize().await?;
        let rules = self
            .ctx
            .events
            .stream_rules()
            .map_err(ApiError::from)?
            .into_iter()
            .map(|rule| StreamRuleMessage { pattern: rule.pattern, read: rule.read, write: rule.write })
            .collect();
        Ok(Response::new(ListStreamRulesResponse { rules }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rule(pattern: &str, read: &[&str]) -> StreamRuleMessage {
        StreamRuleMessage { pattern: pattern.into(), read: read.iter().map(|s| s.to_string()).collect(), write: vec![] }
    }

    #[test]
    fn rules_are_a_name_or_one_trailing_star_with_known_roles() {
        assert!(rule_of(rule("orders-*", &["role:reader", "ann"])).is_ok());
        assert!(rule_of(rule("$all", &["role:reader"])).is_ok());
        assert!(rule_of(rule("", &[])).is_err());
        assert!(rule_of(rule("a*b*", &[])).is_err());
        assert!(rule_of(rule("orders", &["role:owner"])).is_err());
        assert!(rule_of(rule("orders", &["bad name"])).is_err());
        assert!(roles_of(&[]).is_err());
        assert_eq!(roles_of(&["writer".into(), "reader".into(), "writer".into()]).unwrap(), vec![Role::Writer, Role::Reader]);
    }
}
