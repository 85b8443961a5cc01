//! `strata.v1.Cluster`: this node's Raft state and every member's (Raft and gossip),
//! membership changes (served by the leader), and snapshots on demand.

use std::sync::Arc;
use std::time::Duration;

use openraft::ServerState;
use openraft::async_runtime::WatchReceiver;
use strata_proto::v1::cluster_client::ClusterClient;
use strata_proto::v1::cluster_server::Cluster;
use strata_proto::v1::{
    AddLearnerRequest, MemberStatus, MembersRequest, MembershipResponse, NodeRequest, StatusRequest, StatusResponse,
    TierRequest, TierResponse, TriggerSnapshotRequest, TriggerSnapshotResponse,
};
use tonic::transport::Channel;
use tonic::{Request, Response, Status};

use super::NodeContext;
use crate::error::ApiError;
use crate::limits::MEMBER_PROBE_TIMEOUT_MS;
use crate::membership;
use crate::routing::{is_forwarded, mark_forwarded};

/// How long Tier waits for the watermark by default.
const TIER_WAIT_TIMEOUT_MS: u64 = 60_000;
/// How long TriggerSnapshot waits for the snapshot to be built.
const SNAPSHOT_WAIT_TIMEOUT_MS: u64 = 60_000;

pub struct ClusterService {
    ctx: Arc<NodeContext>,
}

impl ClusterService {
    pub fn new(ctx: Arc<NodeContext>) -> Self {
        Self { ctx }
    }

    /// Runs a membership call on the leader: here when this node leads, else forwarded once.
    async fn on_leader<T, Local, Remote>(
        &self,
        forwarded: bool,
        local: impl FnOnce(strata_raft::Raft) -> Local,
        remote: impl FnOnce(ClusterClient<Channel>) -> Remote,
    ) -> Result<Response<T>, Status>
    where
        Local: std::future::Future<Output = Result<T, ApiError>>,
        Remote: std::future::Future<Output = Result<Response<T>, Status>>,
    {
        let raft = self.ctx.router.raft.clone();
        self.ctx.router.on_leader(forwarded, || local(raft), |channel| remote(ClusterClient::new(channel))).await
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
            tier: Some(crate::tier::tier_status(&self.ctx.events, self.ctx.tier.as_deref())),
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
        let metrics = self.ctx.router.raft.metrics().borrow_watched().clone();
        let membership = metrics.membership_config.membership().clone();
        let voters: std::collections::BTreeSet<u64> = membership.voter_ids().collect();
        let gossip: std::collections::BTreeMap<u64, strata_gossip::PeerView> = match &self.ctx.gossip {
            Some(gossip) => gossip.peers().await.into_iter().map(|p| (p.node_id, p)).collect(),
            None => Default::default(),
        };
        let probes = membership.nodes().map(|(id, node)| {
            let (id, addr) = (*id, node.addr.clone());
            let is_voter = voters.contains(&id);
            let own = (id == status.node_id).then(|| status.clone());
            let channels = self.ctx.router.channels.clone();
            async move {
                let member = MemberStatus {
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
                (member, reply)
            }
        });
        let probed = futures::future::join_all(probes).await;
        // The leader's last log index: from the leader's own answer, else the highest seen.
        let leader_last = probed
            .iter()
            .filter_map(|(_, reply)| reply.as_ref())
            .find(|reply| reply.role == "leader")
            .or_else(|| probed.iter().filter_map(|(_, reply)| reply.as_ref()).max_by_key(|reply| reply.last_log_index))
            .map_or(0, |reply| reply.last_log_index);
        for (mut member, reply) in probed {
            if let Some(reply) = reply {
                member.alive = true;
                member.role = reply.role;
                member.applied_index = reply.applied_index;
                member.term = reply.term;
                member.http_addr = reply.http_addr;
                member.matched_index = reply.last_log_index;
                member.lag = leader_last.saturating_sub(reply.applied_index);
            }
            if let Some(matched) = metrics.replication.as_ref().and_then(|r| r.get(&member.id).cloned().flatten()) {
                member.matched_index = matched.index;
            }
            member.gossip = match gossip.get(&member.id) {
                Some(peer) if peer.alive => "alive",
                Some(_) => "dead",
                None if self.ctx.gossip.is_some() => "unseen",
                None => "unknown",
            }
            .into();
            status.members.push(member);
        }
        // Nodes gossip knows that are not members (yet): joining, or removed.
        for peer in gossip.values().filter(|p| membership.get_node(&p.node_id).is_none()) {
            status.members.push(MemberStatus {
                id: peer.node_id,
                grpc_addr: peer.advert.grpc_addr.clone(),
                http_addr: peer.advert.http_addr.clone(),
                role: peer.advert.role.clone(),
                applied_index: peer.advert.applied_index,
                term: peer.advert.term,
                alive: peer.alive,
                membership: "none".into(),
                gossip: if peer.alive { "alive" } else { "dead" }.into(),
                lag: leader_last.saturating_sub(peer.advert.applied_index),
                ..Default::default()
            });
        }
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

    async fn tier(&self, request: Request<TierRequest>) -> Result<Response<TierResponse>, Status> {
        let forwarded = is_forwarded(&request);
        let body = request.into_inner();
        let ctx = self.ctx.clone();
        self.on_leader(
            forwarded,
            |_| async move {
                let Some(tier) = ctx.tier.clone() else {
                    return Err(ApiError::NotConfigured { what: "no object store (--object-store) on the leader".into() });
                };
                let target = body.up_to_position.min(ctx.events.next_position());
                tier.force_to(target);
                let timeout = Duration::from_millis(if body.timeout_ms == 0 { TIER_WAIT_TIMEOUT_MS } else { body.timeout_ms });
                let started = std::time::Instant::now();
                loop {
                    let status = crate::tier::tier_status(&ctx.events, Some(&tier));
                    if status.watermark >= target {
                        return Ok(TierResponse { tier: Some(status) });
                    }
                    if started.elapsed() >= timeout {
                        return Err(ApiError::Unavailable {
                            reason: format!(
                                "tier watermark {} did not reach {target} in {timeout:?}{}",
                                status.watermark,
                                if status.last_error.is_empty() { String::new() } else { format!(" (last upload error: {})", status.last_error) }
                            ),
                            leader_id: None,
                            leader_addr: None,
                        });
                    }
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            },
            |mut client| async move { client.tier(mark_forwarded(body)).await },
        )
        .await
    }

    async fn add_learner(&self, request: Request<AddLearnerRequest>) -> Result<Response<MembershipResponse>, Status> {
        let forwarded = is_forwarded(&request);
        let body = request.into_inner();
        let remote_body = body.clone();
        self.on_leader(
            forwarded,
            |raft| async move { membership::add_learner(&raft, body.node_id, body.grpc_addr).await },
            |mut client| async move { client.add_learner(mark_forwarded(remote_body)).await },
        )
        .await
    }

    async fn promote(&self, request: Request<NodeRequest>) -> Result<Response<MembershipResponse>, Status> {
        let forwarded = is_forwarded(&request);
        let body = request.into_inner();
        self.on_leader(
            forwarded,
            |raft| async move { membership::promote(&raft, body.node_id).await },
            |mut client| async move { client.promote(mark_forwarded(body)).await },
        )
        .await
    }

    async fn remove(&self, request: Request<NodeRequest>) -> Result<Response<MembershipResponse>, Status> {
        let forwarded = is_forwarded(&request);
        let body = request.into_inner();
        self.on_leader(
            forwarded,
            |raft| async move { membership::remove(&raft, body.node_id).await },
            |mut client| async move { client.remove(mark_forwarded(body)).await },
        )
        .await
    }

    async fn transfer_leader(&self, request: Request<NodeRequest>) -> Result<Response<MembershipResponse>, Status> {
        let forwarded = is_forwarded(&request);
        let body = request.into_inner();
        self.on_leader(
            forwarded,
            |raft| async move { membership::transfer_leader(&raft, body.node_id).await },
            |mut client| async move { client.transfer_leader(mark_forwarded(body)).await },
        )
        .await
    }

    async fn members(&self, request: Request<MembersRequest>) -> Result<Response<MembershipResponse>, Status> {
        let forwarded = is_forwarded(&request);
        self.on_leader(
            forwarded,
            |raft| async move { Ok(membership::members(&raft.metrics().borrow_watched().clone())) },
            |mut client| async move { client.members(mark_forwarded(MembersRequest {})).await },
        )
        .await
    }
}
