//! Gossip discovery on a node: publish this node's advert, form a cluster from seeds, or
//! join the cluster that gossip shows.
//!
//! Formation (`--seeds … --initial-cluster-size N`), every round:
//! - this node already has Raft state: nothing to form (it rejoins with what it has);
//! - a live peer reports an existing cluster: ask it (it forwards to the leader) to add this
//!   node as a learner, then wait to be replicated to; the leader promotes it once caught up;
//! - at least N pristine nodes are alive and no node gossip knows of (alive or dead)
//!   reports a cluster: the N lowest ids are the
//!   founding voters. The lowest of them initializes Raft, after the same set was seen for
//!   [`FORMATION_STABLE_ROUNDS`] rounds and every founder answered a Raft probe saying it is
//!   still pristine (gossip is a hint; the probe goes to the node itself).
//!
//! A founder that restarts mid-bootstrap comes back either pristine (nothing was
//! initialized yet: the rounds go on) or with the initializer's membership on disk (it
//! rejoins); the initializer restarting comes back with the cluster it made.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use openraft::async_runtime::WatchReceiver;
use openraft::impls::BasicNode;
use strata_gossip::{Gossip, NodeAdvert, PeerView};
use strata_proto::v1::cluster_client::ClusterClient;
use strata_proto::v1::raft::raft_transport_client::RaftTransportClient;
use strata_proto::v1::raft::ProbeRequest;
use strata_proto::v1::AddLearnerRequest;
use strata_raft::{LogStore, PeerChannels, Raft, RaftMetrics};

use crate::api::cluster::role_name;

/// Time between formation rounds, and between advert refreshes.
const DISCOVERY_ROUND_MS: u64 = 500;
/// Rounds the same founding set must be seen before the lowest id initializes.
pub const FORMATION_STABLE_ROUNDS: u32 = 3;
/// Timeout of one probe or join call.
const DISCOVERY_CALL_TIMEOUT_MS: u64 = 2_000;

/// Whether this node belongs to a Raft cluster (has a membership).
fn in_cluster(metrics: &RaftMetrics) -> bool {
    metrics.membership_config.membership().nodes().next().is_some()
}

/// What this node says about itself now.
pub fn advert_of(metrics: &RaftMetrics, grpc_addr: &str, http_addr: &str) -> NodeAdvert {
    let in_cluster = in_cluster(metrics);
    NodeAdvert {
        grpc_addr: grpc_addr.to_string(),
        http_addr: http_addr.to_string(),
        role: if in_cluster { role_name(metrics.state).to_string() } else { "pending".to_string() },
        term: metrics.current_term,
        leader_id: metrics.current_leader,
        applied_index: metrics.last_applied.as_ref().map_or(0, |id| id.index),
        last_log_index: metrics.last_log_index.unwrap_or(0),
        in_cluster,
    }
}

/// Keeps this node's advert current: on every Raft metrics change, at most once a round.
pub async fn publish_adverts(gossip: Arc<Gossip>, raft: Raft, grpc_addr: String, http_addr: String) {
    let mut watch = raft.metrics();
    loop {
        let advert = advert_of(&watch.borrow_watched().clone(), &grpc_addr, &http_addr);
        gossip.publish(&advert).await;
        tokio::time::sleep(Duration::from_millis(DISCOVERY_ROUND_MS)).await;
        if watch.changed().await.is_err() {
            return;
        }
    }
}

/// What one formation round decided.
#[derive(Debug, PartialEq, Eq)]
enum Step {
    /// Keep watching.
    Wait(String),
    /// Ask this peer to add us as a learner.
    Join(PeerView),
    /// This node initializes Raft with these founders.
    Initialize(BTreeMap<u64, String>),
}

/// The formation decision of one round, from what gossip shows (pure, for tests).
fn decide(node_id: u64, peers: &[PeerView], initial_cluster_size: Option<usize>) -> Step {
    let alive: Vec<&PeerView> = peers.iter().filter(|p| p.alive).collect();
    // Prefer the peer that leads, then any member that names a leader, then any member.
    let members: Vec<&&PeerView> = alive.iter().filter(|p| p.advert.in_cluster && p.node_id != node_id).collect();
    if let Some(best) = members
        .iter()
        .find(|p| p.advert.leader_id == Some(p.node_id))
        .or_else(|| members.iter().find(|p| p.advert.leader_id.is_some()))
        .or_else(|| members.first())
    {
        return Step::Join((**best).clone());
    }
    // A cluster whose members all look dead right now still exists: founding another one
    // beside it would split the nodes into two clusters. Wait for one of them instead.
    if let Some(member) = peers.iter().find(|p| p.advert.in_cluster && p.node_id != node_id) {
        return Step::Wait(format!("a cluster exists (node {} is a member) but no member is alive", member.node_id));
    }
    let Some(size) = initial_cluster_size else {
        return Step::Wait("no cluster found yet, and no --initial-cluster-size to found one".into());
    };
    let pristine: Vec<&&PeerView> = alive.iter().filter(|p| !p.advert.in_cluster).collect();
    if pristine.len() < size {
        return Step::Wait(format!("{} of {size} founding nodes visible", pristine.len()));
    }
    let founders: BTreeMap<u64, String> = pristine.iter().take(size).map(|p| (p.node_id, p.advert.grpc_addr.clone())).collect();
    if !founders.contains_key(&node_id) {
        return Step::Wait("not among the lowest ids; waiting to be replicated to or to join".into());
    }
    if founders.keys().next() != Some(&node_id) {
        return Step::Wait(format!("node {} initializes", founders.keys().next().expect("non-empty")));
    }
    Step::Initialize(founders)
}

/// Runs formation until this node belongs to a cluster (or has Raft state).
pub async fn form_or_join(
    node_id: u64,
    own_grpc_addr: String,
    initial_cluster_size: Option<usize>,
    gossip: Arc<Gossip>,
    raft: Raft,
    log_store: LogStore,
    channels: PeerChannels,
) {
    let mut stable: Option<(BTreeMap<u64, String>, u32)> = None;
    let mut last_reason = String::new();
    loop {
        let pristine = log_store.is_pristine().unwrap_or(false);
        if in_cluster(&raft.metrics().borrow_watched()) || !pristine {
            tracing::info!(node_id, "member of a cluster; formation done");
            return;
        }
        let peers = gossip.peers().await;
        match decide(node_id, &peers, initial_cluster_size) {
            Step::Wait(reason) => {
                stable = None;
                if reason != last_reason {
                    tracing::info!(node_id, reason, "forming");
                    last_reason = reason;
                }
            }
            Step::Join(peer) => {
                stable = None;
                match ask_to_join(node_id, &own_grpc_addr, &peer, &channels).await {
                    Ok(()) => {
                        tracing::info!(node_id, via = peer.node_id, "added as a learner; waiting for the leader's replication");
                        wait_until_member(&raft).await;
                    }
                    Err(e) => tracing::info!(node_id, via = peer.node_id, error = %e, "join request failed; retrying"),
                }
            }
            Step::Initialize(founders) => {
                let rounds = match &stable {
                    Some((seen, rounds)) if *seen == founders => rounds + 1,
                    _ => 1,
                };
                stable = Some((founders.clone(), rounds));
                if rounds >= FORMATION_STABLE_ROUNDS {
                    if all_still_pristine(node_id, &founders, &channels).await {
                        let members: BTreeMap<u64, BasicNode> =
                            founders.iter().map(|(id, addr)| (*id, BasicNode { addr: addr.clone() })).collect();
                        match raft.initialize(members).await {
                            Ok(()) => tracing::info!(node_id, founders = ?founders.keys().collect::<Vec<_>>(), "initialized the cluster from gossip"),
                            Err(e) => tracing::warn!(node_id, error = %e, "initialize refused"),
                        }
                    } else {
                        stable = None;
                    }
                }
            }
        }
        tokio::time::sleep(Duration::from_millis(DISCOVERY_ROUND_MS)).await;
    }
}

async fn wait_until_member(raft: &Raft) {
    let _ = raft
        .wait(Some(Duration::from_secs(30)))
        .metrics(in_cluster, "replicated to by the leader")
        .await;
}

async fn ask_to_join(node_id: u64, own_grpc_addr: &str, peer: &PeerView, channels: &PeerChannels) -> anyhow::Result<()> {
    let channel = channels.get(&peer.advert.grpc_addr)?;
    let mut request = tonic::Request::new(AddLearnerRequest { node_id, grpc_addr: own_grpc_addr.to_string() });
    request.set_timeout(Duration::from_millis(crate::limits::MEMBERSHIP_CHANGE_TIMEOUT_MS));
    ClusterClient::new(channel).add_learner(request).await?;
    Ok(())
}

/// Asks each founder over Raft's transport whether it is still pristine and who it is.
async fn all_still_pristine(node_id: u64, founders: &BTreeMap<u64, String>, channels: &PeerChannels) -> bool {
    for (id, addr) in founders.iter().filter(|(id, _)| **id != node_id) {
        let Ok(channel) = channels.get(addr) else { return false };
        let mut request = tonic::Request::new(ProbeRequest {});
        request.set_timeout(Duration::from_millis(DISCOVERY_CALL_TIMEOUT_MS));
        match RaftTransportClient::new(channel).probe(request).await {
            Ok(reply) if reply.get_ref().node_id == *id && !reply.get_ref().initialized => {}
            Ok(reply) => {
                tracing::info!(founder = id, answered = reply.get_ref().node_id, initialized = reply.get_ref().initialized, "founder is not pristine; not initializing");
                return false;
            }
            Err(e) => {
                tracing::info!(founder = id, error = %e.message(), "founder did not answer the probe");
                return false;
            }
        }
    }
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    fn peer(node_id: u64, alive: bool, in_cluster: bool, leader_id: Option<u64>) -> PeerView {
        PeerView {
            node_id,
            gossip_addr: ([127, 0, 0, 1], 7790 + node_id as u16).into(),
            alive,
            advert: NodeAdvert {
                grpc_addr: format!("127.0.0.1:{}", 7700 + node_id),
                in_cluster,
                leader_id,
                ..Default::default()
            },
        }
    }

    #[test]
    fn the_lowest_of_the_first_n_initializes() {
        let peers = vec![peer(1, true, false, None), peer(2, true, false, None), peer(3, true, false, None)];
        match decide(1, &peers, Some(3)) {
            Step::Initialize(founders) => assert_eq!(founders.keys().copied().collect::<Vec<_>>(), vec![1, 2, 3]),
            other => panic!("expected initialize, got {other:?}"),
        }
        assert!(matches!(decide(2, &peers, Some(3)), Step::Wait(_)));
        assert!(matches!(decide(1, &peers, Some(4)), Step::Wait(_)));
        assert!(matches!(decide(1, &peers, None), Step::Wait(_)));
        // A dead node does not count.
        let with_dead = vec![peer(1, true, false, None), peer(2, false, false, None), peer(3, true, false, None)];
        assert!(matches!(decide(1, &with_dead, Some(3)), Step::Wait(_)));
    }

    #[test]
    fn an_existing_cluster_is_joined_never_refounded() {
        let peers = vec![peer(1, true, false, None), peer(2, true, true, Some(3)), peer(3, true, true, Some(3)), peer(4, true, false, None)];
        assert_eq!(decide(1, &peers, Some(3)), Step::Join(peer(3, true, true, Some(3))));
        // A dead member is not asked, and its cluster is not refounded either.
        let dead_member = vec![peer(1, true, false, None), peer(2, false, true, Some(2)), peer(4, true, false, None), peer(5, true, false, None)];
        assert!(matches!(decide(1, &dead_member, Some(3)), Step::Wait(_)));
    }

    #[test]
    fn extra_nodes_beyond_n_wait_to_join() {
        let peers: Vec<PeerView> = (1..=4).map(|id| peer(id, true, false, None)).collect();
        assert!(matches!(decide(4, &peers, Some(3)), Step::Wait(_)));
    }
}
