//! Static bootstrap from `--peers`: exactly one node initializes the cluster, once.
//!
//! A node that has any Raft state (vote or log) never initializes: it rejoins with what it
//! has. A pristine node initializes only if it has the lowest id of the peer list and every
//! other peer answers a probe saying it is pristine too; if any peer already belongs to a
//! cluster (e.g. this node's data dir was wiped), it waits to be contacted by the leader.

use std::collections::BTreeMap;
use std::time::Duration;

use openraft::impls::BasicNode;
use strata_proto::v1::raft::raft_transport_client::RaftTransportClient;
use strata_proto::v1::raft::ProbeRequest;
use strata_raft::{LogStore, PeerChannels, Raft};

use crate::config::Peer;

/// Pause between bootstrap probe rounds.
const PROBE_ROUND_INTERVAL_MS: u64 = 500;
/// Timeout of one probe.
const PROBE_TIMEOUT_MS: u64 = 1_000;
/// Probe rounds before giving up (about 10 minutes): a cluster whose peers never come up
/// is an operator problem, reported in the log every round.
const PROBE_ROUNDS_MAX: u32 = 1_200;

/// Runs the bootstrap decision; returns when this node initialized the cluster, decided
/// not to, or gave up.
pub async fn bootstrap_static(node_id: u64, peers: Vec<Peer>, raft: Raft, log_store: LogStore, channels: PeerChannels) {
    let pristine = match log_store.is_pristine() {
        Ok(pristine) => pristine,
        Err(e) => {
            tracing::error!(error = %e, "cannot read raft state; not bootstrapping");
            return;
        }
    };
    if !pristine {
        tracing::info!(node_id, "raft state found on disk; rejoining the existing cluster");
        return;
    }
    let lowest = peers.iter().map(|p| p.id).min();
    if lowest != Some(node_id) {
        tracing::info!(node_id, initializer = ?lowest, "pristine node; waiting for the initializer or the leader");
        return;
    }
    for round in 0..PROBE_ROUNDS_MAX {
        match probe_peers(node_id, &peers, &channels).await {
            ProbeResult::AllPristine => {
                let members: BTreeMap<u64, BasicNode> =
                    peers.iter().map(|p| (p.id, BasicNode { addr: p.grpc_addr.clone() })).collect();
                match raft.initialize(members).await {
                    Ok(()) => tracing::info!(node_id, voters = peers.len(), "initialized the cluster"),
                    Err(e) => tracing::warn!(node_id, error = %e, "initialize refused"),
                }
                return;
            }
            ProbeResult::ClusterExists(peer) => {
                tracing::info!(node_id, peer, "a peer already belongs to a cluster; waiting to be contacted by its leader");
                return;
            }
            ProbeResult::Unreachable(missing) => {
                if round % 10 == 0 {
                    tracing::info!(node_id, ?missing, "waiting for every peer to answer before initializing");
                }
            }
        }
        tokio::time::sleep(Duration::from_millis(PROBE_ROUND_INTERVAL_MS)).await;
    }
    tracing::error!(node_id, "gave up bootstrapping: peers never all answered");
}

enum ProbeResult {
    AllPristine,
    ClusterExists(u64),
    Unreachable(Vec<u64>),
}

async fn probe_peers(node_id: u64, peers: &[Peer], channels: &PeerChannels) -> ProbeResult {
    let mut missing = Vec::new();
    for peer in peers.iter().filter(|p| p.id != node_id) {
        let Ok(channel) = channels.get(&peer.grpc_addr) else {
            missing.push(peer.id);
            continue;
        };
        let mut request = tonic::Request::new(ProbeRequest {});
        request.set_timeout(Duration::from_millis(PROBE_TIMEOUT_MS));
        match RaftTransportClient::new(channel).probe(request).await {
            Ok(reply) if reply.get_ref().initialized => return ProbeResult::ClusterExists(peer.id),
            Ok(reply) if reply.get_ref().node_id != peer.id => {
                tracing::warn!(expected = peer.id, answered = reply.get_ref().node_id, addr = %peer.grpc_addr, "peer answered with another node id");
                missing.push(peer.id);
            }
            Ok(_) => {}
            Err(_) => missing.push(peer.id),
        }
    }
    if missing.is_empty() { ProbeResult::AllPristine } else { ProbeResult::Unreachable(missing) }
}
