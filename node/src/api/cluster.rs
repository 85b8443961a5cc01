//! `strata.v1.Cluster`: this node's Raft state and every member's, and snapshots on demand.

use std::sync::Arc;
use std::time::Duration;

use openraft::ServerState;
use openraft::async_runtime::WatchReceiver;
use strata_proto::v1::cluster_client::ClusterClient;
use strata_proto::v1::cluster_server::Cluster;
use strata_proto::v1::{MemberStatus, StatusRequest, StatusResponse, TriggerSnapshotRequest, TriggerSnapshotResponse};
use tonic::{Request, Response, Status};

use super::NodeContext;
use crate::error::ApiError;
use crate::limits::MEMBER_PROBE_TIMEOUT_MS;

/// How long TriggerSnapshot waits for the snapshot to be built.
const SNAPSHOT_WAIT_TIMEOUT_MS: u64 = 60_000;

pub struct ClusterService {
    ctx: Arc<NodeContext>,
}

impl ClusterService {
    pub fn new(ctx: Arc<NodeContext>) -> Self {
        Self { ctx }
    }

    fn local_status(&self) -> StatusResponse {
        let metrics = self.ctx.router.raft.metrics().borrow_watched().clone();
        StatusResponse {
            node_id: metrics.id,
            role: role_name(metrics.state).to_string(),
            term: metrics.current_term,
            leader_id: metrics.current_leader.unwrap_or(0),
            leader_addr: metrics
                .current_leader
                .and_then(|id| metrics.membership_config.membership().get_node(&id).map(|n| n.addr.clone()))
                .unwrap_or_default(),
            last_log_index: metrics.last_log_index.unwrap_or(0),
            committed_index: metrics.local_committed.as_ref().map_or(0, |id| id.index),
            applied_index: metrics.last_applied.as_ref().map_or(0, |id| id.index),
            snapshot_index: metrics.snapshot.as_ref().map_or(0, |id| id.index),
            purged_index: metrics.purged.as_ref().map_or(0, |id| id.index),
            head_position: self.ctx.events.next_position(),
            members: Vec::new(),
            grpc_addr: self.ctx.grpc_addr.clone(),
            http_addr: self.ctx.http_addr.clone(),
            version: env!("CARGO_PKG_VERSION").to_string(),
        }
    }
}

pub fn role_name(state: ServerState) -> &'static str {
    match state {
        ServerState::Leader => "leader",
        ServerState::Follower => "follower",
        ServerState::Candidate => "candidate",
        ServerState::Learner => "learner",
        ServerState::Shutdown => "shutdown",
    }
}

#[tonic::async_trait]
impl Cluster for ClusterService {
    async fn status(&self, request: Request<StatusRequest>) -> Result<Response<StatusResponse>, Status> {
        let mut status = self.local_status();
        if request.into_inner().local_only {
            return Ok(Response::new(status));
        }
        let membership = self.ctx.router.raft.metrics().borrow_watched().membership_config.membership().clone();
        let voters: std::collections::BTreeSet<u64> = membership.voter_ids().collect();
        let probes = membership.nodes().map(|(id, node)| {
            let (id, addr) = (*id, node.addr.clone());
            let is_voter = voters.contains(&id);
            let own = (id == status.node_id).then(|| status.clone());
            let channels = self.ctx.router.channels.clone();
            async move {
                let mut member = MemberStatus {
                    id,
                    grpc_addr: addr.clone(),
                    role: "unknown".into(),
                    membership: if is_voter { "voter" } else { "learner" }.into(),
                    ..Default::default()
                };
                let reply = match own {
                    Some(own) => Some(own),
                    None => match channels.get(&addr) {
                        Ok(channel) => {
                            let mut probe = Request::new(StatusRequest { local_only: true });
                            probe.set_timeout(Duration::from_millis(MEMBER_PROBE_TIMEOUT_MS));
                            ClusterClient::new(channel).status(probe).await.ok().map(|r| r.into_inner())
                        }
                        Err(_) => None,
                    },
                };
                if let Some(reply) = reply {
                    member.alive = true;
                    member.role = reply.role;
                    member.applied_index = reply.applied_index;
                    member.term = reply.term;
                }
                member
            }
        });
        status.members = futures::future::join_all(probes).await;
        Ok(Response::new(status))
    }

    async fn trigger_snapshot(&self, _request: Request<TriggerSnapshotRequest>) -> Result<Response<TriggerSnapshotResponse>, Status> {
        let raft = &self.ctx.router.raft;
        let applied = raft.metrics().borrow_watched().last_applied.as_ref().map_or(0, |id| id.index);
        let unavailable = |reason: String| ApiError::Unavailable { reason, leader_id: None, leader_addr: None };
        raft.trigger().snapshot().await.map_err(|e| unavailable(e.to_string()))?;
        let built = raft
            .wait(Some(Duration::from_millis(SNAPSHOT_WAIT_TIMEOUT_MS)))
            .metrics(|m| m.snapshot.as_ref().is_some_and(|s| s.index >= applied), "snapshot built")
            .await
            .map_err(|e| unavailable(format!("snapshot not built: {e}")))?;
        let snapshot_index = built.snapshot.as_ref().map_or(0, |id| id.index);
        // Purge the log below the snapshot now, so that a lagging or new node must be sent
        // the snapshot: the operator's way to bound the log and to exercise that path.
        raft.trigger().purge_log(snapshot_index).await.map_err(|e| unavailable(e.to_string()))?;
        tracing::info!(snapshot_index, "snapshot triggered by operator; log purged below it");
        Ok(Response::new(TriggerSnapshotResponse { snapshot_index }))
    }
}
