//! Who is calling, and what they may do.
//!
//! One tower layer ([`AdmissionLayer`]) stands in front of every gRPC service: it turns a
//! client call away past `--max-calls-in-flight`, authenticates it (a bearer token, a node
//! certificate, or nothing under `--insecure`), checks cluster and user-management calls by
//! method, puts the [`Caller`] in the request's extensions, and bounds the handler's time. The services then check stream access with [`Access::stream`] before they
//! route or read: a call a follower forwards has been checked there, and the leader takes
//! it as the node's (its certificate carries the node name).
//!
//! Users, rules and the token key live in the replicated control state
//! (`strata_storage::access`), so every node answers the same and a removed user's tokens
//! stop working everywhere once the removal is applied.

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use strata_security::auth::{self, AuthError, TokenKey, TOKEN_KEY_BYTES};
use strata_security::{ClusterAccess, PeerInfo, Principal, Role, StreamAccess};
use strata_storage::access::{SecretBytes, UserRecord};
use strata_storage::{ControlCommand, EventState};
use tokio::sync::Semaphore;

use crate::clock::now_unix_ms;
use crate::control::propose;
use crate::error::ApiError;
use crate::limits::{GRPC_HANDLER_TIMEOUT_SECS, LOGINS_CONCURRENT_MAX, LOGIN_QUEUE_WAIT_MS, TOKEN_TTL_SECS_MAX};
use crate::routing::Router;

/// The user name of calls made with a node certificate (forwarded calls, operators
/// holding one): admin, and not a name a user can take (`$` is not allowed in names).
pub const NODE_PRINCIPAL: &str = "$node";
/// The user name of calls without credentials under `--insecure`.
pub const ANONYMOUS_PRINCIPAL: &str = "$anonymous";
/// The name of the first admin, seeded from `--admin-password-file`.
pub const FIRST_ADMIN: &str = "admin";
/// How often the leader checks that the token key and the first admin exist.
const ACCESS_KEEPER_POLL_MS: u64 = 1_000;

/// How a caller was recognised.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Via {
    Token,
    NodeCertificate,
    InsecureAnonymous,
}

impl Via {
    pub fn name(self) -> &'static str {
        match self {
            Via::Token => "token",
            Via::NodeCertificate => "node_certificate",
            Via::InsecureAnonymous => "insecure_anonymous",
        }
    }
}

/// An authenticated caller, in every request's extensions.
#[derive(Debug, Clone)]
pub struct Caller {
    pub principal: Principal,
    pub via: Via,
}

/// The caller the admission layer put in `request` (an internal error if it did not: every
/// service sits behind the layer).
pub fn caller<T>(request: &tonic::Request<T>) -> Result<Caller, ApiError> {
    request
        .extensions()
        .get::<Caller>()
        .cloned()
        .ok_or_else(|| ApiError::Internal { reason: "request reached a service without passing the admission layer".into() })
}

/// The node's authentication and authorization.
pub struct Access {
    events: Arc<EventState>,
    /// Calls need credentials (TLS on). Under `--insecure` a call without any is admin.
    required: bool,
    token_ttl_secs: u64,
    /// Password checks in flight: each argon2 check takes ~19 MiB and tens of ms of CPU,
    /// so a login flood is turned away instead of exhausting memory.
    password_checks: Semaphore,
    /// The token key once this node has applied it: it is set once for the cluster's life
    /// (the first proposal wins at apply), so every call after need not read and decode it.
    token_key: std::sync::OnceLock<TokenKey>,
}

impl Access {
    pub fn new(events: Arc<EventState>, required: bool, token_ttl_secs: u64) -> Self {
        Self { events, required, token_ttl_secs: token_ttl_secs.min(TOKEN_TTL_SECS_MAX), password_checks: Semaphore::new(LOGINS_CONCURRENT_MAX), token_key: std::sync::OnceLock::new() }
    }

    pub fn required(&self) -> bool {
        self.required
    }

    fn token_key(&self) -> Result<Option<&TokenKey>, ApiError> {
        if let Some(key) = self.token_key.get() {
            return Ok(Some(key));
        }
        let Some(SecretBytes(bytes)) = self.events.token_key()? else { return Ok(None) };
        let bytes: [u8; TOKEN_KEY_BYTES] =
            bytes.try_into().map_err(|_| ApiError::Internal { reason: "the replicated token key has the wrong length".into() })?;
        Ok(Some(self.token_key.get_or_init(|| TokenKey::from_bytes(bytes))))
    }

    /// Who makes a call with these headers over this connection.
    pub fn authenticate(&self, headers: &::http::HeaderMap, peer: Option<&PeerInfo>) -> Result<Caller, ApiError> {
        if let Some(value) = headers.get(::http::header::AUTHORIZATION) {
            let value = value.to_str().map_err(|_| AuthError::Malformed)?;
            let token = auth::bearer_token(value)?;
            let key = self.token_key()?.ok_or_else(|| ApiError::Unauthenticated {
                reason: "this node has no token key yet (the cluster has not elected its first leader)".into(),
            })?;
            let claimed = key.verify(token, now_unix_secs())?;
            // The record decides, not the token: a removed user or a changed role counts
            // from the moment it is applied, not when the token expires.
            let user = self.events.user(&claimed.user)?.ok_or_else(|| ApiError::Unauthenticated {
                reason: format!("user {:?} no longer exists", claimed.user),
            })?;
            return Ok(Caller { principal: Principal { user: user.name, roles: user.roles }, via: Via::Token });
        }
        if peer.is_some_and(|peer| peer.node) {
            return Ok(Caller { principal: Principal { user: NODE_PRINCIPAL.into(), roles: vec![Role::Admin] }, via: Via::NodeCertificate });
        }
        if !self.required {
            return Ok(Caller { principal: Principal { user: ANONYMOUS_PRINCIPAL.into(), roles: vec![Role::Admin] }, via: Via::InsecureAnonymous });
        }
        Err(AuthError::Missing.into())
    }

    /// Whether `caller` may `access` `stream` (`$all` for reads of every stream).
    pub fn stream(&self, caller: &Caller, access: StreamAccess, stream: &str) -> Result<(), ApiError> {
        if caller.principal.has(Role::Admin) {
            return Ok(());
        }
        let rules = self.events.stream_rules()?;
        auth::authorize_stream(&caller.principal, access, stream, &rules)?;
        Ok(())
    }

    /// Runs `work` (a password hash or check) on a blocking thread, if one of the
    /// `LOGINS_CONCURRENT_MAX` slots frees up within `LOGIN_QUEUE_WAIT_MS`.
    pub async fn password_work<T: Send + 'static>(&self, work: impl FnOnce() -> T + Send + 'static) -> Result<T, ApiError> {
        let permit = tokio::time::timeout(Duration::from_millis(LOGIN_QUEUE_WAIT_MS), self.password_checks.acquire())
            .await
            .map_err(|_| ApiError::Overloaded {
                limit_name: "LOGINS_CONCURRENT_MAX",
                limit_value: LOGINS_CONCURRENT_MAX as u64,
                retry_after_ms: LOGIN_QUEUE_WAIT_MS,
            })?
            .map_err(|_| ApiError::Internal { reason: "password check slots closed".into() })?;
        let result = tokio::task::spawn_blocking(work).await.map_err(|e| ApiError::Internal { reason: format!("password work failed: {e}") });
        drop(permit);
        result
    }

    /// A token for `user` if `password` is theirs. The same answer for an unknown user and
    /// a wrong password, and the same work (a hash is checked either way).
    pub async fn login(&self, user: &str, password: &str) -> Result<(String, u64, Vec<Role>), ApiError> {
        auth::check_user_name(user).map_err(|_| AuthError::BadCredentials)?;
        let key = self.token_key()?.ok_or_else(|| ApiError::Unavailable {
            reason: "the cluster has no token key yet (no leader elected so far)".into(),
            leader_id: None,
            leader_addr: None,
        })?;
        let record = self.events.user(user)?;
        let stored = record.as_ref().map(|r| r.password_hash.clone());
        let password = password.to_string();
        // The dummy hash is made on first use: on the blocking thread too, not the runtime's.
        let matches = self
            .password_work(move || auth::verify_password(&password, stored.as_deref().unwrap_or(DUMMY_HASH.as_str())))
            .await?;
        let Some(record) = record.filter(|_| matches) else {
            return Err(AuthError::BadCredentials.into());
        };
        let principal = Principal { user: record.name, roles: record.roles };
        let now = now_unix_secs();
        let token = key.issue(&principal, now, self.token_ttl_secs);
        Ok((token, now + self.token_ttl_secs, principal.roles))
    }
}

/// An argon2id hash of a random password nobody has, checked for unknown users so a
/// login does not tell which user names exist by how fast it fails.
static DUMMY_HASH: std::sync::LazyLock<String> = std::sync::LazyLock::new(|| {
    let password: String = (0..32).map(|_| char::from(b'a' + rand::random::<u8>() % 26)).collect();
    auth::hash_password(&password).expect("a 32-letter password hashes")
});

fn now_unix_secs() -> u64 {
    (now_unix_ms().max(0) as u64) / 1000
}

/// What a gRPC method needs before its service sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum MethodNeeds {
    /// Health checks, the Raft transport (it checks node certificates itself) and Login.
    Nothing,
    /// An authenticated caller allowed this kind of cluster call; stream access is
    /// checked by the service.
    Cluster(ClusterAccess),
}

/// The table of what each method needs: anything not named is `View` (any
/// authenticated caller; the service checks the streams it touches).
fn method_needs(path: &str) -> MethodNeeds {
    let (service, method) = path.trim_start_matches('/').split_once('/').unwrap_or((path, ""));
    match (service, method) {
        ("grpc.health.v1.Health", _) | ("strata.v1.raft.RaftTransport", _) | ("strata.v1.Auth", "Login") => MethodNeeds::Nothing,
        ("strata.v1.Auth", "WhoAmI") => MethodNeeds::Cluster(ClusterAccess::View),
        ("strata.v1.Auth", _) => MethodNeeds::Cluster(ClusterAccess::Administer),
        ("strata.v1.Cluster", "Status" | "Members") => MethodNeeds::Cluster(ClusterAccess::View),
        ("strata.v1.Cluster", "TriggerSnapshot" | "Tier" | "TransferLeader") => MethodNeeds::Cluster(ClusterAccess::Operate),
        // AddLearner, Promote, Remove, and any method added later until it is placed.
        ("strata.v1.Cluster", _) => MethodNeeds::Cluster(ClusterAccess::Administer),
        ("strata.v1.PersistentSubscriptions", "Create" | "Update" | "Delete" | "ReplayParked") => {
            MethodNeeds::Cluster(ClusterAccess::Operate)
        }
        _ => MethodNeeds::Cluster(ClusterAccess::View),
    }
}

impl Access {
    /// The caller of a call to `path`, checked against what the method needs (None: the
    /// method needs nothing).
    fn admit(&self, path: &str, headers: &::http::HeaderMap, peer: Option<&PeerInfo>) -> Result<Option<Caller>, ApiError> {
        match method_needs(path) {
            MethodNeeds::Nothing => Ok(None),
            MethodNeeds::Cluster(access) => {
                let caller = self.authenticate(headers, peer)?;
                auth::authorize_cluster(&caller.principal, access, path.trim_start_matches('/'))?;
                Ok(Some(caller))
            }
        }
    }
}

/// The tower layer in front of every gRPC service: runs [`Access::admit`], and bounds how
/// long a handler may take.
#[derive(Clone)]
pub struct AdmissionLayer {
    access: Arc<Access>,
    metrics: Arc<crate::metrics::Metrics>,
    /// One permit per client call being handled (`--max-calls-in-flight`).
    calls: Arc<Semaphore>,
    max_calls: usize,
}

impl AdmissionLayer {
    pub fn new(access: Arc<Access>, metrics: Arc<crate::metrics::Metrics>, max_calls_in_flight: usize) -> Self {
        Self { access, metrics, calls: Arc::new(Semaphore::new(max_calls_in_flight)), max_calls: max_calls_in_flight }
    }
}

impl<S> tower::Layer<S> for AdmissionLayer {
    type Service = AdmissionService<S>;

    fn layer(&self, inner: S) -> AdmissionService<S> {
        AdmissionService { inner, layer: self.clone() }
    }
}

#[derive(Clone)]
pub struct AdmissionService<S> {
    inner: S,
    layer: AdmissionLayer,
}

type BoxFuture<T, E> = Pin<Box<dyn std::future::Future<Output = Result<T, E>> + Send>>;

impl<S, B> tower::Service<::http::Request<B>> for AdmissionService<S>
where
    S: tower::Service<::http::Request<B>, Response = ::http::Response<tonic::body::Body>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    B: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = BoxFuture<S::Response, S::Error>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut request: ::http::Request<B>) -> Self::Future {
        // Node-to-node Raft traffic is never shed, nor cut off below (a snapshot install
        // streams for as long as it takes); client calls are.
        let client_call = !request.uri().path().starts_with("/strata.v1.raft.");
        // Each call being handled holds memory (its decoded request, HTTP/2 stream state,
        // a task): past `--max-calls-in-flight` a call is refused before it is decoded,
        // so a flood over many connections cannot grow the node without bound.
        let permit = match client_call.then(|| self.layer.calls.clone().try_acquire_owned()) {
            Some(Err(_)) => {
                self.layer.metrics.auth_refusals_total.with_label_values(&["overloaded"]).inc();
                let refused = ApiError::Overloaded {
                    limit_name: "GRPC_CALLS_IN_FLIGHT_MAX",
                    limit_value: self.layer.max_calls as u64,
                    retry_after_ms: crate::limits::OVERLOAD_RETRY_AFTER_MS,
                };
                let response = refused.into_status().into_http();
                return Box::pin(async move { Ok(response) });
            }
            Some(Ok(permit)) => Some(permit),
            None => None,
        };
        let admitted = self.layer.access.admit(request.uri().path(), request.headers(), request.extensions().get::<PeerInfo>());
        match admitted {
            Ok(Some(caller)) => {
                request.extensions_mut().insert(caller);
            }
            Ok(None) => {}
            Err(refused) => {
                let kind = refused.kind();
                self.layer.metrics.auth_refusals_total.with_label_values(&[kind]).inc();
                let from = request.extensions().get::<PeerInfo>().and_then(|p| p.remote_addr).map(|a| a.to_string()).unwrap_or_default();
                tracing::debug!(path = request.uri().path(), from, error = %refused, "call refused by the admission layer");
                let response = refused.into_status().into_http();
                return Box::pin(async move { Ok(response) });
            }
        }
        // The clone that was made ready is the one to call (tower's readiness contract).
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        // Every handler but the Raft transport's (a snapshot install streams for as long
        // as it takes) answers within GRPC_HANDLER_TIMEOUT_SECS: the backstop for a call
        // that would otherwise hold its slot for ever. Streaming responses are not cut:
        // their handler returns as soon as the stream is set up. The answer is
        // indeterminate (an append may have been committed).
        Box::pin(async move {
            let _permit = permit;
            if !client_call {
                return inner.call(request).await;
            }
            match tokio::time::timeout(Duration::from_secs(GRPC_HANDLER_TIMEOUT_SECS), inner.call(request)).await {
                Ok(response) => response,
                Err(_) => Ok(ApiError::Indeterminate {
                    reason: format!("not answered within GRPC_HANDLER_TIMEOUT_SECS={GRPC_HANDLER_TIMEOUT_SECS}"),
                    deadline: true,
                }
                .into_status()
                .into_http()),
            }
        })
    }
}

/// Keeps the access state complete while this node leads: proposes a token key when the
/// cluster has none, and the first admin from `--admin-password-file` while it has no
/// users. Both are "only if absent" at apply time, so leaders racing each other, or a
/// restart with the flag still set, change nothing.
pub async fn run_access_keeper(router: Router, events: Arc<EventState>, access: Arc<Access>, first_admin_password: Option<String>) {
    let mut first_admin_hash: Option<String> = None;
    loop {
        tokio::time::sleep(Duration::from_millis(ACCESS_KEEPER_POLL_MS)).await;
        if !router.believes_it_leads() {
            continue;
        }
        match events.token_key() {
            Ok(None) => match propose(&router, ControlCommand::SetTokenKey { key: SecretBytes(rand::random::<[u8; TOKEN_KEY_BYTES]>().to_vec()) }).await {
                Ok(_) => tracing::info!(node_id = router.node_id, "token signing key created (replicated to every node)"),
                Err(e) => tracing::warn!(error = %e, "could not propose the token signing key; retrying"),
            },
            Ok(Some(_)) => {}
            Err(e) => tracing::warn!(error = %e, "cannot read the token key"),
        }
        let Some(password) = &first_admin_password else { continue };
        match events.users() {
            Ok(users) if users.is_empty() => {
                if first_admin_hash.is_none() {
                    let password = password.clone();
                    match access.password_work(move || auth::hash_password(&password)).await {
                        Ok(Ok(hash)) => first_admin_hash = Some(hash),
                        Ok(Err(e)) => {
                            tracing::error!(error = %e, "the first admin's password is not usable; no admin created");
                            return;
                        }
                        Err(e) => {
                            tracing::warn!(error = %e, "could not hash the first admin's password; retrying");
                            continue;
                        }
                    }
                }
                let user = UserRecord {
                    name: FIRST_ADMIN.into(),
                    password_hash: first_admin_hash.clone().expect("hashed above"),
                    roles: vec![Role::Admin],
                    created_unix_ms: now_unix_ms(),
                };
                match propose(&router, ControlCommand::SeedAdmin { user }).await {
                    Ok(_) => tracing::info!(node_id = router.node_id, user = FIRST_ADMIN, "first admin created from --admin-password-file"),
                    Err(e) => tracing::warn!(error = %e, "could not propose the first admin; retrying"),
                }
            }
            Ok(_) => {}
            Err(e) => tracing::warn!(error = %e, "cannot read the users"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn methods_are_placed_by_what_they_need() {
        assert_eq!(method_needs("/grpc.health.v1.Health/Check"), MethodNeeds::Nothing);
        assert_eq!(method_needs("/strata.v1.raft.RaftTransport/Vote"), MethodNeeds::Nothing);
        assert_eq!(method_needs("/strata.v1.Auth/Login"), MethodNeeds::Nothing);
        assert_eq!(method_needs("/strata.v1.Auth/AddUser"), MethodNeeds::Cluster(ClusterAccess::Administer));
        assert_eq!(method_needs("/strata.v1.Cluster/Status"), MethodNeeds::Cluster(ClusterAccess::View));
        assert_eq!(method_needs("/strata.v1.Cluster/AddLearner"), MethodNeeds::Cluster(ClusterAccess::Administer));
        assert_eq!(method_needs("/strata.v1.Cluster/SomethingNew"), MethodNeeds::Cluster(ClusterAccess::Administer));
        assert_eq!(method_needs("/strata.v1.Cluster/TransferLeader"), MethodNeeds::Cluster(ClusterAccess::Operate));
        assert_eq!(method_needs("/strata.v1.Streams/Append"), MethodNeeds::Cluster(ClusterAccess::View));
        assert_eq!(method_needs("/strata.v1.PersistentSubscriptions/Create"), MethodNeeds::Cluster(ClusterAccess::Operate));
    }

    fn layered(required: bool) -> (tempfile::TempDir, impl tower::Service<::http::Request<()>, Response = ::http::Response<tonic::body::Body>, Error = std::convert::Infallible>) {
        use tower::Layer as _;
        let dir = tempfile::tempdir().unwrap();
        let db = strata_storage::open_database(dir.path()).unwrap();
        let events = Arc::new(EventState::open(&db, dir.path()).unwrap());
        let access = Arc::new(Access::new(events, required, 60));
        let never_answers = tower::service_fn(|_request: ::http::Request<()>| std::future::pending());
        (dir, AdmissionLayer::new(access, Arc::new(crate::metrics::Metrics::new(1)), 8).layer(never_answers))
    }

    fn grpc_status(response: &::http::Response<tonic::body::Body>) -> Option<&str> {
        response.headers().get("grpc-status").and_then(|v| v.to_str().ok())
    }

    #[tokio::test(start_paused = true)]
    async fn a_call_without_credentials_is_refused_and_a_handler_that_hangs_is_cut_off() {
        use tower::ServiceExt as _;
        let request = |path: &str| ::http::Request::builder().uri(path).body(()).unwrap();
        let (_dir, service) = layered(true);
        let refused = service.oneshot(request("/strata.v1.Streams/Append")).await.unwrap();
        assert_eq!(grpc_status(&refused), Some("16"), "UNAUTHENTICATED");
        // Under --insecure the call gets through, and the handler's time is bounded.
        let (_dir, service) = layered(false);
        let cut = service.oneshot(request("/strata.v1.Streams/Append")).await.unwrap();
        assert_eq!(grpc_status(&cut), Some("4"), "DEADLINE_EXCEEDED after GRPC_HANDLER_TIMEOUT_SECS");
    }

    #[test]
    fn the_dummy_hash_is_a_real_hash_so_unknown_users_cost_a_real_check() {
        assert!(DUMMY_HASH.starts_with("$argon2id$"));
        assert!(!auth::verify_password("anything", &DUMMY_HASH));
    }
}
