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
    state.ctx.metrics.local_event_ids.set(state.ctx.events.local_id_count() as i64);
    state.ctx.metrics.state_bytes.set(i64::try_from(state.ctx.events.state_bytes()).unwrap_or(i64::MAX));
    state.ctx.metrics.render()
}

/// Exit status of `strata health`: 0 when the node answers 200 on `path`.
///
/// The image is `FROM scratch` (no shell, no curl), so compose and Kubernetes health checks
/// run the binary itself: a plain HTTP/1.0 GET over TCP, bounded by `timeout`.
pub async fn check_health(addr: &str, path: &str, timeout: std::time::Duration) -> Result<String, String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let exchange = async {
        let mut stream = tokio::net::TcpStream::connect(addr).await.map_err(|e| format!("cannot connect to {addr}: {e}"))?;
        stream
            .write_all(format!("GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n").as_bytes())
            .await
            .map_err(|e| format!("cannot send: {e}"))?;
        let mut response = Vec::new();
        // Health answers are one line; cap what we read.
        stream.take(HEALTH_RESPONSE_BYTES_MAX).read_to_end(&mut response).await.map_err(|e| format!("cannot read: {e}"))?;
        Ok::<_, String>(String::from_utf8_lossy(&response).to_string())
    };
    let response = tokio::time::timeout(timeout, exchange).await.map_err(|_| format!("no answer from {addr} within {timeout:?}"))??;
    let status_line = response.lines().next().unwrap_or_default();
    let body = response.split_once("\r\n\r\n").map(|(_, body)| body.trim().to_string()).unwrap_or_default();
    if status_line.split_whitespace().nth(1) == Some("200") {
        Ok(body)
    } else {
        Err(format!("{status_line}: {body}"))
    }
}

/// Most bytes `strata health` reads from an answer.
const HEALTH_RESPONSE_BYTES_MAX: u64 = 64 * 1024;
