//! HTTP: `/health/live`, `/health/ready`, `/metrics`.
//!
//! Ready means: a member of a cluster with a known leader, and this node has applied at
//! least what was committed when it started (it serves no reads from a stale restart).

use std::sync::Arc;

use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::get;
use axum::Router;
use openraft::async_runtime::WatchReceiver;

use crate::api::NodeContext;

#[derive(Clone)]
pub struct HttpState {
    pub ctx: Arc<NodeContext>,
    /// The committed index known at start-up (from the log store's saved `committed`).
    pub committed_at_start: u64,
}

pub fn router(state: HttpState) -> Router {
    Router::new()
        .route("/health/live", get(|| async { "ok\n" }))
        .route("/health/ready", get(ready))
        .route("/metrics", get(metrics))
        .with_state(state)
}

async fn ready(State(state): State<HttpState>) -> (StatusCode, String) {
    let metrics = state.ctx.router.raft.metrics().borrow_watched().clone();
    let applied = metrics.last_applied.as_ref().map_or(0, |id| id.index);
    let member = metrics.membership_config.membership().get_node(&metrics.id).is_some();
    match (member, metrics.current_leader) {
        (false, _) => (StatusCode::SERVICE_UNAVAILABLE, "not ready: not a member of a cluster\n".into()),
        (true, None) => (StatusCode::SERVICE_UNAVAILABLE, "not ready: no known leader\n".into()),
        (true, Some(_)) if applied < state.committed_at_start => (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("not ready: applied {applied} < committed at start {}\n", state.committed_at_start),
        ),
        (true, Some(leader)) => (StatusCode::OK, format!("ready: leader={leader} applied={applied}\n")),
    }
}

async fn metrics(State(state): State<HttpState>) -> String {
    state.ctx.metrics.events_head_position.set(state.ctx.events.next_position() as i64);
    state.ctx.metrics.render()
}
