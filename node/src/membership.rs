//! Membership changes on the leader: add a learner, promote, remove, transfer leadership;
//! the automatic promotion of caught-up learners and the optional removal of dead members.
//!
//! Every change is a Raft membership change (joint consensus inside openraft); gossip only
//! tells the leader *when* to consider one. Callers route these to the leader first.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use openraft::async_runtime::WatchReceiver;
use openraft::impls::BasicNode;
use openraft::ChangeMembers;
use strata_gossip::Gossip;
use strata_proto::v1::{Member, MembershipResponse};
use strata_raft::{NodeId, Raft, RaftMetrics};

use crate::error::ApiError;
use crate::limits::{MEMBERSHIP_CHANGE_TIMEOUT_MS, PROMOTE_LAG_ENTRIES_MAX, TRANSFER_LEADER_TIMEOUT_MS};

/// How often the leader looks for learners to promote and dead members to remove.
const MEMBERSHIP_CHECK_INTERVAL_MS: u64 = 1_000;

fn unavailable(reason: String) -> ApiError {
    ApiError::Unavailable { reason, leader_id: None, leader_addr: None }
}

/// Maps a failed openraft membership call. Openraft refuses a change while another is in
/// progress and forwards to the leader when this node is not it; both are definite.
fn change_failed<E: std::fmt::Display>(node_id: NodeId, error: E) -> ApiError {
    let reason = error.to_string();
    if reason.contains("forward") || reason.contains("leader") {
        unavailable(format!("membership change not accepted by this node: {reason}"))
    } else {
        ApiError::MembershipRefused { node_id, reason }
    }
}

async fn with_timeout<T>(future: impl std::future::Future<Output = Result<T, ApiError>>) -> Result<T, ApiError> {
    tokio::time::timeout(Duration::from_millis(MEMBERSHIP_CHANGE_TIMEOUT_MS), future)
        .await
        .unwrap_or_else(|_| Err(ApiError::Indeterminate {
            reason: format!("membership change not committed within MEMBERSHIP_CHANGE_TIMEOUT_MS={MEMBERSHIP_CHANGE_TIMEOUT_MS}"),
            deadline: true,
        }))
}

/// The membership this node knows, with the leader it knows.
pub fn members(metrics: &RaftMetrics) -> MembershipResponse {
    let stored = &metrics.membership_config;
    let membership = stored.membership();
    let voters: BTreeSet<NodeId> = membership.voter_ids().collect();
    MembershipResponse {
        leader_id: metrics.current_leader.unwrap_or(0),
        members: membership
            .nodes()
            .map(|(id, node)| Member {
                id: *id,
                grpc_addr: node.addr.clone(),
                membership: if voters.contains(id) { "voter" } else { "learner" }.into(),
            })
            .collect(),
        membership_log_index: stored.log_id().as_ref().map_or(0, |id| id.index),
    }
}

/// Adds `node_id` at `addr` as a learner; a node already in the membership at the same
/// address is left as it is (a joining node retries this call).
pub async fn add_learner(raft: &Raft, node_id: NodeId, addr: String) -> Result<MembershipResponse, ApiError> {
    if node_id == 0 || addr.is_empty() {
        return Err(ApiError::InvalidArgument { field: "node_id, grpc_addr".into(), reason: "a non-zero id and an address are required".into() });
    }
    let metrics = raft.metrics().borrow_watched().clone();
    if let Some(existing) = metrics.membership_config.membership().get_node(&node_id) {
        if existing.addr == addr {
            return Ok(members(&metrics));
        }
        return Err(ApiError::MembershipRefused {
            node_id,
            reason: format!("already a member at `{}`; remove it first to move it to `{addr}`", existing.addr),
        });
    }
    with_timeout(async {
        raft.add_learner(node_id, BasicNode { addr: addr.clone() }, false).await.map_err(|e| change_failed(node_id, e))
    })
    .await?;
    tracing::info!(node_id, addr, "added a learner");
    Ok(members(&raft.metrics().borrow_watched().clone()))
}

/// This node's metrics and the current voters, once `node_id` is known to be a member.
fn member_view(raft: &Raft, node_id: NodeId) -> Result<(RaftMetrics, BTreeSet<NodeId>), ApiError> {
    let metrics = raft.metrics().borrow_watched().clone();
    let membership = metrics.membership_config.membership();
    if membership.get_node(&node_id).is_none() {
        return Err(ApiError::NodeNotFound { node_id });
    }
    let voters = membership.voter_ids().collect();
    Ok((metrics, voters))
}

/// Makes the learner `node_id` a voter.
pub async fn promote(raft: &Raft, node_id: NodeId) -> Result<MembershipResponse, ApiError> {
    let (metrics, voters) = member_view(raft, node_id)?;
    if voters.contains(&node_id) {
        return Ok(members(&metrics));
    }
    with_timeout(async {
        raft.change_membership(ChangeMembers::AddVoterIds(BTreeSet::from([node_id])), false)
            .await
            .map_err(|e| change_failed(node_id, e))
    })
    .await?;
    tracing::info!(node_id, "promoted a learner to voter");
    Ok(members(&raft.metrics().borrow_watched().clone()))
}

/// Removes `node_id` (voter or learner) from the membership.
pub async fn remove(raft: &Raft, node_id: NodeId) -> Result<MembershipResponse, ApiError> {
    let (_, voters) = member_view(raft, node_id)?;
    let change = if voters.contains(&node_id) {
        if voters.len() == 1 {
            return Err(ApiError::MembershipRefused { node_id, reason: "the last voter cannot be removed".into() });
        }
        ChangeMembers::RemoveVoters(BTreeSet::from([node_id]))
    } else {
        ChangeMembers::RemoveNodes(BTreeSet::from([node_id]))
    };
    // retain = false: a removed voter does not stay on as a learner.
    with_timeout(async { raft.change_membership(change, false).await.map_err(|e| change_failed(node_id, e)) }).await?;
    tracing::info!(node_id, "removed a member");
    Ok(members(&raft.metrics().borrow_watched().clone()))
}

/// Hands leadership to the voter `node_id` (0: the most caught-up other voter) and waits
/// until this node sees it lead.
pub async fn transfer_leader(raft: &Raft, node_id: NodeId) -> Result<MembershipResponse, ApiError> {
    let metrics = raft.metrics().borrow_watched().clone();
    let node_id = match node_id {
        0 => transfer_target(&metrics).ok_or_else(|| ApiError::MembershipRefused {
            node_id: 0,
            reason: "no other voter to hand leadership to".into(),
        })?,
        id => id,
    };
    if metrics.current_leader == Some(node_id) {
        return Ok(members(&metrics));
    }
    if !metrics.membership_config.membership().voter_ids().any(|id| id == node_id) {
        return Err(ApiError::MembershipRefused { node_id, reason: "leadership can only go to a voter".into() });
    }
    raft.trigger().transfer_leader(node_id).await.map_err(|e| unavailable(e.to_string()))?;
    let led = raft
        .wait(Some(Duration::from_millis(TRANSFER_LEADER_TIMEOUT_MS)))
        .metrics(|m| m.current_leader == Some(node_id), "leadership transferred")
        .await
        .map_err(|e| unavailable(format!("node {node_id} did not take over within TRANSFER_LEADER_TIMEOUT_MS={TRANSFER_LEADER_TIMEOUT_MS}: {e}")))?;
    tracing::info!(to = node_id, "leadership transferred");
    Ok(members(&led))
}

/// The voter best placed to take over from this leader: the one whose log is furthest.
pub fn transfer_target(metrics: &RaftMetrics) -> Option<NodeId> {
    let replication = metrics.replication.as_ref()?;
    metrics
        .membership_config
        .membership()
        .voter_ids()
        .filter(|id| *id != metrics.id)
        .max_by_key(|id| replication.get(id).cloned().flatten().map_or(0, |log_id| log_id.index))
}

/// Learners the leader may promote now: caught up within `PROMOTE_LAG_ENTRIES_MAX`, in id
/// order, while the voters stay at most `max_voters`.
fn promotable(metrics: &RaftMetrics, max_voters: usize) -> Vec<NodeId> {
    let Some(replication) = metrics.replication.as_ref() else { return Vec::new() };
    let membership = metrics.membership_config.membership();
    let last = metrics.last_log_index.unwrap_or(0);
    let voter_ids: BTreeSet<NodeId> = membership.voter_ids().collect();
    membership
        .nodes()
        .map(|(id, _)| *id)
        .filter(|id| !voter_ids.contains(id))
        .filter(|id| {
            let matched = replication.get(id).cloned().flatten().map_or(0, |log_id| log_id.index);
            matched > 0 && matched + PROMOTE_LAG_ENTRIES_MAX >= last
        })
        .take(max_voters.saturating_sub(voter_ids.len()))
        .collect()
}

/// Runs on every node; acts only while this node leads: promotes caught-up learners (up to
/// `max_voters`) and, with `auto_remove_after`, removes members gossip has seen dead that long.
pub async fn run_membership_keeper(raft: Raft, gossip: Option<Arc<Gossip>>, max_voters: usize, auto_remove_after: Option<Duration>) {
    let mut dead_since: BTreeMap<NodeId, Instant> = BTreeMap::new();
    let mut ticker = tokio::time::interval(Duration::from_millis(MEMBERSHIP_CHECK_INTERVAL_MS));
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticker.tick().await;
        let metrics = raft.metrics().borrow_watched().clone();
        if metrics.current_leader != Some(metrics.id) {
            dead_since.clear();
            continue;
        }
        if metrics.membership_config.log_id() != metrics.committed_membership_config.log_id() {
            continue; // a change is still in flight
        }
        if let Some(node_id) = promotable(&metrics, max_voters).into_iter().next() {
            if let Err(e) = promote(&raft, node_id).await {
                tracing::warn!(node_id, error = %e, "automatic promotion failed; will retry");
            }
            continue;
        }
        let (Some(gossip), Some(after)) = (&gossip, auto_remove_after) else { continue };
        let alive: BTreeMap<NodeId, bool> = gossip.peers().await.into_iter().map(|p| (p.node_id, p.alive)).collect();
        let now = Instant::now();
        let member_ids: Vec<NodeId> = metrics.membership_config.membership().nodes().map(|(id, _)| *id).collect();
        dead_since.retain(|id, _| member_ids.contains(id));
        for id in member_ids.into_iter().filter(|id| *id != metrics.id) {
            // Unknown to gossip counts as dead too: a member that never gossiped is gone.
            if alive.get(&id).copied().unwrap_or(false) {
                dead_since.remove(&id);
            } else {
                dead_since.entry(id).or_insert(now);
            }
        }
        let expired = dead_since.iter().find(|(_, since)| now.duration_since(**since) >= after).map(|(id, _)| *id);
        if let Some(node_id) = expired {
            tracing::warn!(node_id, after_secs = after.as_secs(), "member dead beyond --auto-remove-after; removing it");
            match remove(&raft, node_id).await {
                Ok(_) => {
                    dead_since.remove(&node_id);
                }
                Err(e) => tracing::warn!(node_id, error = %e, "automatic removal failed; will retry"),
            }
        }
    }
}
