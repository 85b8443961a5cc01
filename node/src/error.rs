//! The API's typed errors and the one mapping to gRPC status codes (SPEC §4).
//!
//! Every error carries an `ErrorDetail` (prost-encoded in the status details) so clients
//! can tell a definite failure from an indeterminate one and read the actual version,
//! the limit or the leader without parsing messages.

use prost::Message;
use strata_proto::v1::ErrorDetail;
use tonic::{Code, Status};

/// Errors of the public API.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ApiError {
    #[error("wrong expected version: stream=`{stream}` expected=`{expected}` actual=`{}`", actual.map_or("no_stream".to_string(), |v| v.to_string()))]
    WrongExpectedVersion { stream: String, expected: String, actual: Option<u64> },
    #[error("idempotency conflict: {reason} stream=`{stream}` event_id=`{event_id}`")]
    IdempotencyConflict { stream: String, event_id: String, reason: String },
    #[error("invalid argument: {reason} field=`{field}`")]
    InvalidArgument { field: String, reason: String },
    /// A request field over a limit: definite, the request is malformed for this server.
    #[error("over limit: {field} is {actual}, limit {limit_name}={limit_value}")]
    OverLimit { field: String, limit_name: &'static str, limit_value: u64, actual: u64 },
    /// The server will not take the request now (a queue is full): retry later.
    #[error("overloaded: {limit_name}={limit_value} reached, retry after {retry_after_ms} ms")]
    Overloaded { limit_name: &'static str, limit_value: u64, retry_after_ms: u64 },
    #[error("stream not found: stream=`{stream}`")]
    StreamNotFound { stream: String },
    /// The stream was hard-deleted (a tombstone): never read or written again.
    #[error("stream is deleted: stream=`{stream}`")]
    StreamDeleted { stream: String },
    /// Nothing was proposed: safe to retry (at the leader, when known).
    #[error("unavailable: {reason}")]
    Unavailable { reason: String, leader_id: Option<u64>, leader_addr: Option<String> },
    /// The append may or may not have been committed: retry with the same event ids.
    #[error("outcome unknown: {reason}")]
    Indeterminate { reason: String, deadline: bool },
    /// A membership change that the current membership does not allow (e.g. promoting a
    /// node that is not a learner, removing the last voter).
    #[error("membership change refused: {reason} node_id=`{node_id}`")]
    MembershipRefused { node_id: u64, reason: String },
    /// The node id is not a member.
    #[error("node not found: node_id=`{node_id}`")]
    NodeNotFound { node_id: u64 },
    /// Saving a snapshot at a version its stream does not have (yet).
    #[error("snapshot is ahead of its stream: stream=`{stream}` version=`{version}` head=`{}`", head.map_or("no_stream".to_string(), |v| v.to_string()))]
    SnapshotAheadOfStream { stream: String, version: u64, head: Option<u64> },
    #[error("snapshot not found: stream=`{stream}`")]
    SnapshotNotFound { stream: String },
    #[error("group not found: group=`{group}`")]
    GroupNotFound { group: String },
    #[error("group already exists: group=`{group}`")]
    GroupExists { group: String },
    /// A count limit is reached (groups, consumers of a group): definite, retry after
    /// something was removed.
    #[error("limit reached: {what}, limit {limit_name}={limit_value}")]
    LimitReached { what: String, limit_name: &'static str, limit_value: u64 },
    /// A tier watermark move whose starting point is gone: another upload committed first.
    #[error("tier watermark moved: expected=`{expected}` actual=`{actual}`")]
    TierWatermarkMoved { expected: u64, actual: u64 },
    /// The call needs something this cluster was not started with (an object store).
    #[error("not configured: {what}")]
    NotConfigured { what: String },
    /// No valid credentials (SPEC §4): missing, malformed, forged or expired token, wrong
    /// password, a removed user.
    #[error("unauthenticated: {reason}")]
    Unauthenticated { reason: String },
    /// The caller is known but may not do this.
    #[error("permission denied: {reason}")]
    PermissionDenied { reason: String },
    /// A user or a stream rule that does not exist.
    #[error("not found: {what}")]
    AccessRecordNotFound { what: String },
    #[error("already exists: {what}")]
    AccessRecordExists { what: String },
    #[error("internal error: {reason}")]
    Internal { reason: String },
}

impl ApiError {
    /// The gRPC code of SPEC §4's table. Kept exhaustive: a new variant must pick one.
    pub fn code(&self) -> Code {
        match self {
            ApiError::WrongExpectedVersion { .. } => Code::FailedPrecondition,
            ApiError::IdempotencyConflict { .. } => Code::AlreadyExists,
            ApiError::InvalidArgument { .. } | ApiError::OverLimit { .. } => Code::InvalidArgument,
            ApiError::Overloaded { .. } => Code::ResourceExhausted,
            ApiError::StreamNotFound { .. } => Code::NotFound,
            ApiError::StreamDeleted { .. } => Code::FailedPrecondition,
            ApiError::Unavailable { .. } => Code::Unavailable,
            ApiError::Indeterminate { deadline: true, .. } => Code::DeadlineExceeded,
            ApiError::Indeterminate { deadline: false, .. } => Code::Unavailable,
            ApiError::MembershipRefused { .. } => Code::FailedPrecondition,
            ApiError::NodeNotFound { .. } => Code::NotFound,
            ApiError::SnapshotAheadOfStream { .. } => Code::FailedPrecondition,
            ApiError::SnapshotNotFound { .. } | ApiError::GroupNotFound { .. } => Code::NotFound,
            ApiError::GroupExists { .. } => Code::AlreadyExists,
            ApiError::LimitReached { .. } => Code::ResourceExhausted,
            ApiError::TierWatermarkMoved { .. } | ApiError::NotConfigured { .. } => Code::FailedPrecondition,
            ApiError::Unauthenticated { .. } => Code::Unauthenticated,
            ApiError::PermissionDenied { .. } => Code::PermissionDenied,
            ApiError::AccessRecordNotFound { .. } => Code::NotFound,
            ApiError::AccessRecordExists { .. } => Code::AlreadyExists,
            ApiError::Internal { .. } => Code::Internal,
        }
    }

    /// The stable machine-readable kind carried in `ErrorDetail.kind`.
    pub fn kind(&self) -> &'static str {
        match self {
            ApiError::WrongExpectedVersion { .. } => "wrong_expected_version",
            ApiError::IdempotencyConflict { .. } => "idempotency_conflict",
            ApiError::InvalidArgument { .. } => "invalid_argument",
            ApiError::OverLimit { .. } => "limit_exceeded",
            ApiError::Overloaded { .. } => "overloaded",
            ApiError::StreamNotFound { .. } => "not_found",
            ApiError::StreamDeleted { .. } => "stream_deleted",
            ApiError::Unavailable { .. } => "unavailable",
            ApiError::Indeterminate { .. } => "indeterminate",
            ApiError::MembershipRefused { .. } => "membership_refused",
            ApiError::NodeNotFound { .. } => "node_not_found",
            ApiError::SnapshotAheadOfStream { .. } => "snapshot_ahead_of_stream",
            ApiError::SnapshotNotFound { .. } => "snapshot_not_found",
            ApiError::GroupNotFound { .. } => "group_not_found",
            ApiError::GroupExists { .. } => "group_exists",
            ApiError::LimitReached { .. } => "limit_reached",
            ApiError::TierWatermarkMoved { .. } => "tier_watermark_moved",
            ApiError::NotConfigured { .. } => "not_configured",
            ApiError::Unauthenticated { .. } => "unauthenticated",
            ApiError::PermissionDenied { .. } => "permission_denied",
            ApiError::AccessRecordNotFound { .. } => "not_found",
            ApiError::AccessRecordExists { .. } => "already_exists",
            ApiError::Internal { .. } => "internal",
        }
    }

    fn detail(&self) -> ErrorDetail {
        let mut detail = ErrorDetail { kind: self.kind().to_string(), ..Default::default() };
        match self {
            ApiError::WrongExpectedVersion { stream, expected, actual } => {
                detail.stream = stream.clone();
                detail.expected = expected.clone();
                detail.actual_version = *actual;
            }
            ApiError::IdempotencyConflict { stream, .. } | ApiError::StreamNotFound { stream } | ApiError::StreamDeleted { stream } => {
                detail.stream = stream.clone();
            }
            ApiError::InvalidArgument { field, .. } => detail.field = field.clone(),
            ApiError::OverLimit { field, limit_name, limit_value, .. } => {
                detail.field = field.clone();
                detail.limit_name = limit_name.to_string();
                detail.limit_value = *limit_value;
            }
            ApiError::Overloaded { limit_name, limit_value, retry_after_ms } => {
                detail.limit_name = limit_name.to_string();
                detail.limit_value = *limit_value;
                detail.retry_after_ms = *retry_after_ms;
            }
            ApiError::Unavailable { leader_id, leader_addr, .. } => {
                detail.leader_id = leader_id.unwrap_or(0);
                detail.leader_addr = leader_addr.clone().unwrap_or_default();
            }
            ApiError::Indeterminate { .. } => detail.indeterminate = true,
            ApiError::SnapshotAheadOfStream { stream, head, .. } => {
                detail.stream = stream.clone();
                detail.actual_version = *head;
            }
            ApiError::SnapshotNotFound { stream } => detail.stream = stream.clone(),
            ApiError::GroupNotFound { group } | ApiError::GroupExists { group } => detail.group = group.clone(),
            ApiError::LimitReached { limit_name, limit_value, .. } => {
                detail.limit_name = limit_name.to_string();
                detail.limit_value = *limit_value;
            }
            ApiError::TierWatermarkMoved { actual, .. } => detail.actual_version = Some(*actual),
            ApiError::MembershipRefused { .. }
            | ApiError::NodeNotFound { .. }
            | ApiError::NotConfigured { .. }
            | ApiError::Unauthenticated { .. }
            | ApiError::PermissionDenied { .. }
            | ApiError::AccessRecordNotFound { .. }
            | ApiError::AccessRecordExists { .. }
            | ApiError::Internal { .. } => {}
        }
        detail
    }

    pub fn into_status(self) -> Status {
        let detail = self.detail().encode_to_vec();
        Status::with_details(self.code(), self.to_string(), detail.into())
    }
}

impl From<ApiError> for Status {
    fn from(e: ApiError) -> Self {
        e.into_status()
    }
}

impl From<strata_storage::StorageError> for ApiError {
    fn from(e: strata_storage::StorageError) -> Self {
        tracing::error!(error = %e, "storage error while serving a request");
        ApiError::Internal { reason: e.to_string() }
    }
}

impl From<strata_security::auth::AuthError> for ApiError {
    fn from(e: strata_security::auth::AuthError) -> Self {
        match e {
            strata_security::auth::AuthError::Invalid { what, reason } => ApiError::InvalidArgument { field: what.into(), reason },
            e => ApiError::Unauthenticated { reason: e.to_string() },
        }
    }
}

impl From<strata_security::auth::Denied> for ApiError {
    fn from(e: strata_security::auth::Denied) -> Self {
        ApiError::PermissionDenied { reason: e.to_string() }
    }
}

impl From<strata_storage::AppendFailure> for ApiError {
    fn from(failure: strata_storage::AppendFailure) -> Self {
        match failure {
            strata_storage::AppendFailure::WrongExpectedVersion { stream, expected, actual } => {
                ApiError::WrongExpectedVersion { stream, expected: expected.to_string(), actual }
            }
            strata_storage::AppendFailure::IdempotencyConflict { stream, event_id, reason } => {
                ApiError::IdempotencyConflict { stream, event_id, reason }
            }
            strata_storage::AppendFailure::StreamDeleted { stream } => ApiError::StreamDeleted { stream },
        }
    }
}

impl From<strata_storage::ControlFailure> for ApiError {
    fn from(failure: strata_storage::ControlFailure) -> Self {
        use strata_storage::ControlFailure;
        match failure {
            ControlFailure::SnapshotAheadOfStream { stream, version, head } => ApiError::SnapshotAheadOfStream { stream, version, head },
            ControlFailure::SnapshotNotFound { stream } => ApiError::SnapshotNotFound { stream },
            ControlFailure::GroupExists { name } => ApiError::GroupExists { group: name },
            ControlFailure::GroupNotFound { name } => ApiError::GroupNotFound { group: name },
            ControlFailure::GroupsFull => ApiError::LimitReached {
                what: "groups in the cluster".into(),
                limit_name: "GROUPS_MAX",
                limit_value: strata_storage::GROUPS_MAX as u64,
            },
            ControlFailure::TierWatermarkMoved { expected, actual } => ApiError::TierWatermarkMoved { expected, actual },
            failure @ ControlFailure::TierBeyondApplied { .. } => ApiError::Internal { reason: failure.to_string() },
            ControlFailure::StreamDeleted { stream } => ApiError::StreamDeleted { stream },
            ControlFailure::StreamNotFound { stream } => ApiError::StreamNotFound { stream },
            ControlFailure::WrongExpectedVersion { stream, expected, actual } => {
                ApiError::WrongExpectedVersion { stream, expected: expected.to_string(), actual }
            }
            ControlFailure::UserExists { name } => ApiError::AccessRecordExists { what: format!("user `{name}`") },
            ControlFailure::UserNotFound { name } => ApiError::AccessRecordNotFound { what: format!("user `{name}`") },
            ControlFailure::RuleNotFound { pattern } => ApiError::AccessRecordNotFound { what: format!("stream rule `{pattern}`") },
            ControlFailure::UsersFull => ApiError::LimitReached {
                what: "users in the cluster".into(),
                limit_name: "USERS_MAX",
                limit_value: strata_storage::access::USERS_MAX as u64,
            },
            ControlFailure::RulesFull => ApiError::LimitReached {
                what: "stream rules in the cluster".into(),
                limit_name: "RULES_MAX",
                limit_value: strata_storage::access::RULES_MAX as u64,
            },
        }
    }
}

impl From<strata_storage::ReadError> for ApiError {
    fn from(e: strata_storage::ReadError) -> Self {
        match e {
            strata_storage::ReadError::Storage(e) => e.into(),
            strata_storage::ReadError::Tier(e) => e.into(),
        }
    }
}

impl From<strata_storage::tier::TierError> for ApiError {
    fn from(e: strata_storage::tier::TierError) -> Self {
        use strata_storage::tier::TierError;
        match e {
            // A read of tiered history that the object store could not serve now: nothing
            // changed, retry later.
            TierError::Store(_) | TierError::Fenced(_) => {
                ApiError::Unavailable { reason: format!("object-store tier: {e}"), leader_id: None, leader_addr: None }
            }
            TierError::Unusable(_) | TierError::Corrupt(_) => ApiError::Internal { reason: format!("object-store tier: {e}") },
        }
    }
}

pub use strata_proto::detail_of;

#[cfg(test)]
mod tests {
    use super::*;

    fn all_errors() -> Vec<ApiError> {
        vec![
            ApiError::WrongExpectedVersion { stream: "s".into(), expected: "3".into(), actual: Some(5) },
            ApiError::IdempotencyConflict { stream: "s".into(), event_id: "e".into(), reason: "r".into() },
            ApiError::InvalidArgument { field: "stream".into(), reason: "empty".into() },
            ApiError::OverLimit { field: "events".into(), limit_name: "EVENTS_PER_APPEND_MAX", limit_value: 1, actual: 2 },
            ApiError::Overloaded { limit_name: "PROPOSAL_QUEUE_APPENDS_MAX", limit_value: 1, retry_after_ms: 50 },
            ApiError::StreamNotFound { stream: "s".into() },
            ApiError::StreamDeleted { stream: "s".into() },
            ApiError::Unavailable { reason: "no leader".into(), leader_id: Some(2), leader_addr: Some("a:1".into()) },
            ApiError::Indeterminate { reason: "timeout".into(), deadline: true },
            ApiError::Indeterminate { reason: "lost".into(), deadline: false },
            ApiError::MembershipRefused { node_id: 4, reason: "not a learner".into() },
            ApiError::NodeNotFound { node_id: 9 },
            ApiError::SnapshotAheadOfStream { stream: "s".into(), version: 4, head: Some(2) },
            ApiError::SnapshotNotFound { stream: "s".into() },
            ApiError::GroupNotFound { group: "g".into() },
            ApiError::GroupExists { group: "g".into() },
            ApiError::TierWatermarkMoved { expected: 1, actual: 2 },
            ApiError::NotConfigured { what: "object store".into() },
            ApiError::LimitReached { what: "consumers".into(), limit_name: "GROUP_CONSUMERS_MAX", limit_value: 1 },
            ApiError::Internal { reason: "bug".into() },
        ]
    }

    #[test]
    fn every_error_maps_to_the_spec_code_and_round_trips_its_detail() {
        let expected = [
            Code::FailedPrecondition,
            Code::AlreadyExists,
            Code::InvalidArgument,
            Code::InvalidArgument,
            Code::ResourceExhausted,
            Code::NotFound,
            Code::FailedPrecondition,
            Code::Unavailable,
            Code::DeadlineExceeded,
            Code::Unavailable,
            Code::FailedPrecondition,
            Code::NotFound,
            Code::FailedPrecondition,
            Code::NotFound,
            Code::NotFound,
            Code::AlreadyExists,
            Code::FailedPrecondition,
            Code::FailedPrecondition,
            Code::ResourceExhausted,
            Code::Internal,
        ];
        assert_eq!(all_errors().len(), expected.len(), "one expected code per error");
        for (error, code) in all_errors().into_iter().zip(expected) {
            let kind = error.kind();
            let status = error.clone().into_status();
            assert_eq!(status.code(), code, "{error:?}");
            let detail = detail_of(&status).expect("detail present");
            assert_eq!(detail.kind, kind);
            assert_eq!(detail.indeterminate, matches!(error, ApiError::Indeterminate { .. }));
        }
    }

    #[test]
    fn wrong_expected_version_carries_the_actual_version() {
        let status = ApiError::WrongExpectedVersion { stream: "s".into(), expected: "any".into(), actual: None }.into_status();
        let detail = detail_of(&status).unwrap();
        assert_eq!(detail.actual_version, None);
        assert!(status.message().contains("actual=`no_stream`"));
    }
}
