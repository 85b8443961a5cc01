//! `strata.v1.Snapshots`: aggregate snapshots as replicated state, routed to the leader.
//!
//! Saves and deletes are control commands through Raft, decided at apply time (a snapshot
//! ahead of its stream fails there, so it cannot slip past a check made earlier). Loads
//! and lists are answered by the leader after it confirms its leadership, so a load sees
//! every save acknowledged before it.

use std::sync::Arc;

use strata_proto::v1::snapshots_client::SnapshotsClient;
use strata_proto::v1::snapshots_server::Snapshots;
use strata_proto::v1::{
    DeleteSnapshotRequest, DeleteSnapshotResponse, ListSnapshotsRequest, ListSnapshotsResponse, LoadSnapshotRequest,
    LoadSnapshotResponse, SaveSnapshotRequest, SaveSnapshotResponse, StoredSnapshot,
};
use strata_storage::{AggregateSnapshot, ControlCommand, ControlSuccess};
use tonic::{Request, Response, Status};

use super::validate;
use strata_security::StreamAccess;
use super::NodeContext;
use crate::clock::now_unix_ms;
use crate::control::propose;
use crate::error::ApiError;
use crate::limits::CONTENT_TYPE_BYTES_MAX;
use crate::routing::{commit_token, forwarded_failure, is_forwarded, mark_forwarded};

pub struct SnapshotsService {
    ctx: Arc<NodeContext>,
}

impl SnapshotsService {
    pub fn new(ctx: Arc<NodeContext>) -> Self {
        Self { ctx }
    }
}

fn stored(snapshot: AggregateSnapshot, with_state: bool) -> StoredSnapshot {
    StoredSnapshot {
        stream: snapshot.stream,
        version: snapshot.version,
        state_bytes: snapshot.state.len() as u64,
        state: if with_state { snapshot.state } else { Vec::new() },
        content_type: snapshot.content_type,
        created_unix_ms: snapshot.created_unix_ms,
    }
}

/// The snapshot to save, validated.
fn snapshot_of(request: SaveSnapshotRequest, max_state_bytes: usize) -> Result<AggregateSnapshot, ApiError> {
    validate::stream_name_shape("stream", &request.stream)?;
    if request.state.len() > max_state_bytes {
        return Err(validate::over("state", "--max-snapshot-bytes", max_state_bytes, request.state.len()));
    }
    if request.content_type.len() > CONTENT_TYPE_BYTES_MAX {
        return Err(validate::over("content_type", "CONTENT_TYPE_BYTES_MAX", CONTENT_TYPE_BYTES_MAX, request.content_type.len()));
    }
    let content_type = if request.content_type.is_empty() { "application/octet-stream".to_string() } else { request.content_type };
    Ok(AggregateSnapshot { stream: request.stream, version: request.version, content_type, state: request.state, created_unix_ms: now_unix_ms() })
}

#[tonic::async_trait]
impl Snapshots for SnapshotsService {
    async fn save(&self, request: Request<SaveSnapshotRequest>) -> Result<Response<SaveSnapshotResponse>, Status> {
        self.ctx.allow(&request, StreamAccess::Write, &request.get_ref().stream)?;
        let forwarded = is_forwarded(&request);
        let request = request.into_inner();
        // Bad input is answered here, before routing, also while there is no leader.
        let snapshot = snapshot_of(request.clone(), self.ctx.max_snapshot_bytes)?;
        let router = &self.ctx.router;
        router
            .on_leader(
                forwarded,
                || async {
                    let (stream, version) = (snapshot.stream.clone(), snapshot.version);
                    let applied = propose(router, ControlCommand::SaveSnapshot(snapshot)).await?;
                    Ok(SaveSnapshotResponse { stream, version, commit_token: commit_token(applied.log_index) })
                },
                |channel| async move { SnapshotsClient::new(channel).save(mark_forwarded(request)).await.map_err(forwarded_failure) },
            )
            .await
    }

    async fn load(&self, request: Request<LoadSnapshotRequest>) -> Result<Response<LoadSnapshotResponse>, Status> {
        self.ctx.allow(&request, StreamAccess::Read, &request.get_ref().stream)?;
        let forwarded = is_forwarded(&request);
        let request = request.into_inner();
        validate::stream_name_shape("stream", &request.stream)?;
        let ctx = &self.ctx;
        let remote_request = request.clone();
        ctx.router
            .on_leader(
                forwarded,
                || async {
                    ctx.router.linearize().await?;
                    let snapshot = ctx
                        .events
                        .latest_snapshot(&request.stream, request.max_version)?
                        .ok_or_else(|| ApiError::SnapshotNotFound { stream: request.stream.clone() })?;
                    Ok(LoadSnapshotResponse { snapshot: Some(stored(snapshot, true)) })
                },
                |channel| async move { SnapshotsClient::new(channel).load(mark_forwarded(remote_request)).await },
            )
            .await
    }

    async fn list(&self, request: Request<ListSnapshotsRequest>) -> Result<Response<ListSnapshotsResponse>, Status> {
        self.ctx.allow(&request, StreamAccess::Read, &request.get_ref().stream)?;
        let forwarded = is_forwarded(&request);
        let request = request.into_inner();
        validate::stream_name_shape("stream", &request.stream)?;
        let ctx = &self.ctx;
        let remote_request = request.clone();
        ctx.router
            .on_leader(
                forwarded,
                || async {
                    ctx.router.linearize().await?;
                    let snapshots = ctx.events.snapshots(&request.stream)?.into_iter().map(|s| stored(s, false)).collect();
                    Ok(ListSnapshotsResponse { snapshots })
                },
                |channel| async move { SnapshotsClient::new(channel).list(mark_forwarded(remote_request)).await },
            )
            .await
    }

    async fn delete(&self, request: Request<DeleteSnapshotRequest>) -> Result<Response<DeleteSnapshotResponse>, Status> {
        self.ctx.allow(&request, StreamAccess::Write, &request.get_ref().stream)?;
        let forwarded = is_forwarded(&request);
        let request = request.into_inner();
        validate::stream_name_shape("stream", &request.stream)?;
        let router = &self.ctx.router;
        let remote_request = request.clone();
        router
            .on_leader(
                forwarded,
                || async {
                    let command = ControlCommand::DeleteSnapshots { stream: request.stream.clone(), version: request.version };
                    let deleted = match propose(router, command).await?.success {
                        ControlSuccess::Deleted(count) => count,
                        other => return Err(ApiError::Internal { reason: format!("delete answered {other:?}") }),
                    };
                    Ok(DeleteSnapshotResponse { deleted })
                },
                |channel| async move { SnapshotsClient::new(channel).delete(mark_forwarded(remote_request)).await.map_err(forwarded_failure) },
            )
            .await
    }
}
