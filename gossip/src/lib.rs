//! Who is out there: node discovery and liveness over chitchat UDP gossip, every datagram
//! authenticated with the cluster secret ([`auth`], [`transport`]).
//!
//! Each node publishes a [`NodeAdvert`] (addresses, Raft role, term, leader hint, applied
//! index, whether it belongs to a Raft cluster) and reads everyone else's as [`PeerView`]s.
//! Gossip is only a hint: formation and membership decisions made from it go through Raft
//! RPCs, which check for themselves.

pub mod auth;
pub mod transport;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use chitchat::{spawn_chitchat, ChitchatConfig, ChitchatHandle, ChitchatId, FailureDetectorConfig, NodeState};

pub use auth::{DropReason, GossipCounters};
use transport::AuthenticatedUdpTransport;

/// Time between gossip rounds.
pub const GOSSIP_INTERVAL_MS: u64 = 500;
/// How long a dead node's state is kept (and shown as dead) before chitchat forgets it.
pub const DEAD_NODE_GRACE_SECS: u64 = 3_600;
/// Failure detector threshold (phi accrual; chitchat's default).
const PHI_THRESHOLD: f64 = 8.0;
/// Heartbeat intervals remembered by the failure detector, per node.
const FAILURE_SAMPLES_MAX: usize = 1_000;
/// Longest heartbeat interval the failure detector learns from.
const HEARTBEAT_INTERVAL_MAX_SECS: u64 = 10;

const KEY_GRPC_ADDR: &str = "grpc_addr";
const KEY_HTTP_ADDR: &str = "http_addr";
const KEY_ROLE: &str = "role";
const KEY_TERM: &str = "term";
const KEY_LEADER_ID: &str = "leader_id";
const KEY_APPLIED_INDEX: &str = "applied_index";
const KEY_LAST_LOG_INDEX: &str = "last_log_index";
const KEY_IN_CLUSTER: &str = "in_cluster";

/// Settings of one node's gossip.
#[derive(Clone)]
pub struct GossipConfig {
    pub node_id: u64,
    /// Nodes gossip only with nodes of the same cluster id (and secret).
    pub cluster_id: String,
    pub secret: Vec<u8>,
    /// UDP address to bind.
    pub listen_addr: SocketAddr,
    /// UDP address the other nodes reach this one at.
    pub advertise_addr: SocketAddr,
    /// `host:port` of nodes to contact first (DNS names are re-resolved by chitchat).
    pub seeds: Vec<String>,
}

impl std::fmt::Debug for GossipConfig {
    // The secret never reaches a log.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GossipConfig")
            .field("node_id", &self.node_id)
            .field("cluster_id", &self.cluster_id)
            .field("secret", &"<redacted>")
            .field("listen_addr", &self.listen_addr)
            .field("advertise_addr", &self.advertise_addr)
            .field("seeds", &self.seeds)
            .finish()
    }
}

/// What a node says about itself.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct NodeAdvert {
    pub grpc_addr: String,
    pub http_addr: String,
    /// `leader`, `follower`, `candidate`, `learner`, or `pending` (not in a cluster yet).
    pub role: String,
    pub term: u64,
    pub leader_id: Option<u64>,
    pub applied_index: u64,
    pub last_log_index: u64,
    /// Whether the node belongs to an initialized Raft cluster (has a membership).
    pub in_cluster: bool,
}

impl NodeAdvert {
    fn to_key_values(&self) -> Vec<(&'static str, String)> {
        vec![
            (KEY_GRPC_ADDR, self.grpc_addr.clone()),
            (KEY_HTTP_ADDR, self.http_addr.clone()),
            (KEY_ROLE, self.role.clone()),
            (KEY_TERM, self.term.to_string()),
            (KEY_LEADER_ID, self.leader_id.map_or_else(String::new, |id| id.to_string())),
            (KEY_APPLIED_INDEX, self.applied_index.to_string()),
            (KEY_LAST_LOG_INDEX, self.last_log_index.to_string()),
            (KEY_IN_CLUSTER, self.in_cluster.to_string()),
        ]
    }

    /// Reads an advert back; `None` until the node has published its addresses.
    fn from_state(state: &NodeState) -> Option<Self> {
        let number = |key: &str| state.get(key).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
        Some(Self {
            grpc_addr: state.get(KEY_GRPC_ADDR).filter(|a| !a.is_empty())?.to_string(),
            http_addr: state.get(KEY_HTTP_ADDR).unwrap_or_default().to_string(),
            role: state.get(KEY_ROLE).unwrap_or_default().to_string(),
            term: number(KEY_TERM),
            leader_id: state.get(KEY_LEADER_ID).and_then(|v| v.parse().ok()),
            applied_index: number(KEY_APPLIED_INDEX),
            last_log_index: number(KEY_LAST_LOG_INDEX),
            in_cluster: state.get(KEY_IN_CLUSTER) == Some("true"),
        })
    }
}

/// One node as gossip sees it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PeerView {
    pub node_id: u64,
    pub gossip_addr: SocketAddr,
    /// Alive according to the failure detector (this node is always alive).
    pub alive: bool,
    pub advert: NodeAdvert,
}

/// A running gossip member.
pub struct Gossip {
    handle: ChitchatHandle,
    counters: Arc<GossipCounters>,
    node_id: u64,
}

impl Gossip {
    /// Binds the UDP socket and starts gossiping `advert`.
    pub async fn start(config: GossipConfig, advert: &NodeAdvert) -> anyhow::Result<Self> {
        anyhow::ensure!(!config.secret.is_empty(), "gossip needs a non-empty cluster secret");
        // A restarted node must look newer than its previous incarnation: start time in ms.
        let generation = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64);
        let chitchat_id = ChitchatId::new(config.node_id.to_string(), generation, config.advertise_addr);
        let chitchat_config = ChitchatConfig {
            chitchat_id,
            cluster_id: config.cluster_id.clone(),
            gossip_interval: Duration::from_millis(GOSSIP_INTERVAL_MS),
            listen_addr: config.listen_addr,
            seed_nodes: config.seeds.clone(),
            failure_detector_config: FailureDetectorConfig::new(
                PHI_THRESHOLD,
                FAILURE_SAMPLES_MAX,
                Duration::from_secs(HEARTBEAT_INTERVAL_MAX_SECS),
                Duration::from_millis(GOSSIP_INTERVAL_MS),
                Duration::from_secs(DEAD_NODE_GRACE_SECS),
            ),
            marked_for_deletion_grace_period: Duration::from_secs(DEAD_NODE_GRACE_SECS),
            catchup_callback: None,
            extra_liveness_predicate: None,
            protocol_version: chitchat::ProtocolVersion::V1,
        };
        let counters = Arc::new(GossipCounters::default());
        // The replay scope: unique per process start (generation alone could repeat if the
        // clock steps back, so mix in randomness).
        let instance = generation ^ rand_u64();
        let transport = AuthenticatedUdpTransport::new(&config.secret, &config.cluster_id, instance, counters.clone());
        let initial = advert.to_key_values().into_iter().map(|(k, v)| (k.to_string(), v)).collect();
        let handle = spawn_chitchat(chitchat_config, initial, &transport).await?;
        Ok(Self { handle, counters, node_id: config.node_id })
    }

    /// Replaces what this node says about itself (only changed keys are gossiped).
    pub async fn publish(&self, advert: &NodeAdvert) {
        let values = advert.to_key_values();
        self.handle
            .with_chitchat(|chitchat| {
                let state = chitchat.self_node_state();
                for (key, value) in &values {
                    if state.get(key) != Some(value.as_str()) {
                        state.set(*key, value);
                    }
                }
            })
            .await;
    }

    /// Every node gossip knows of (this one included), one entry per node id (its newest
    /// incarnation), by node id.
    pub async fn peers(&self) -> Vec<PeerView> {
        let chitchat = self.handle.chitchat();
        let chitchat = chitchat.lock().await;
        let live: std::collections::HashSet<&ChitchatId> = chitchat.live_nodes().collect();
        let mut newest: BTreeMap<u64, (&ChitchatId, PeerView)> = BTreeMap::new();
        for (id, state) in chitchat.node_states() {
            let Ok(node_id) = id.node_id.parse::<u64>() else { continue };
            let Some(advert) = NodeAdvert::from_state(state) else { continue };
            let view = PeerView { node_id, gossip_addr: id.gossip_advertise_addr, alive: live.contains(id), advert };
            match newest.get(&node_id) {
                Some((seen, _)) if seen.generation_id >= id.generation_id => {}
                _ => {
                    newest.insert(node_id, (id, view));
                }
            }
        }
        newest.into_values().map(|(_, view)| view).collect()
    }

    /// This node's id.
    pub fn node_id(&self) -> u64 {
        self.node_id
    }

    /// Datagram counters (accepted, sent, dropped by reason).
    pub fn counters(&self) -> &Arc<GossipCounters> {
        &self.counters
    }

    /// Stops gossiping.
    pub async fn shutdown(self) {
        if let Err(e) = self.handle.shutdown().await {
            tracing::warn!(error = %e, "gossip shutdown reported an error");
        }
    }
}

/// 64 random bits without another dependency: std's randomly seeded SipHash keys.
fn rand_u64() -> u64 {
    use std::hash::{BuildHasher, RandomState};
    RandomState::new().hash_one(std::process::id())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(node_id: u64, port: u16, secret: &[u8], seeds: Vec<String>) -> GossipConfig {
        let addr: SocketAddr = ([127, 0, 0, 1], port).into();
        GossipConfig {
            node_id,
            cluster_id: "test-cluster".into(),
            secret: secret.to_vec(),
            listen_addr: addr,
            advertise_addr: addr,
            seeds,
        }
    }

    fn advert(node_id: u64) -> NodeAdvert {
        NodeAdvert { grpc_addr: format!("127.0.0.1:{}", 7000 + node_id), role: "pending".into(), ..Default::default() }
    }

    async fn wait_until<F: Fn(&[PeerView]) -> bool>(gossip: &Gossip, predicate: F) -> Vec<PeerView> {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
        loop {
            let peers = gossip.peers().await;
            if predicate(&peers) || tokio::time::Instant::now() > deadline {
                return peers;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    #[tokio::test]
    async fn nodes_with_the_secret_discover_each_other_and_see_updates() {
        let seed = "127.0.0.1:27901".to_string();
        let a = Gossip::start(config(1, 27901, b"s3cret", vec![]), &advert(1)).await.unwrap();
        let b = Gossip::start(config(2, 27902, b"s3cret", vec![seed.clone()]), &advert(2)).await.unwrap();
        let c = Gossip::start(config(3, 27903, b"s3cret", vec![seed]), &advert(3)).await.unwrap();
        let peers = wait_until(&c, |p| p.len() == 3 && p.iter().all(|v| v.alive)).await;
        assert_eq!(peers.iter().map(|p| p.node_id).collect::<Vec<_>>(), vec![1, 2, 3]);

        let mut leading = advert(1);
        leading.role = "leader".into();
        leading.leader_id = Some(1);
        leading.in_cluster = true;
        a.publish(&leading).await;
        let peers = wait_until(&b, |p| p.iter().any(|v| v.node_id == 1 && v.advert.in_cluster)).await;
        assert_eq!(peers[0].advert, leading);
        assert!(a.counters().accepted.load(std::sync::atomic::Ordering::Relaxed) > 0);
        for gossip in [a, b, c] {
            gossip.shutdown().await;
        }
    }

    #[tokio::test]
    async fn a_node_with_another_secret_is_never_seen() {
        let a = Gossip::start(config(1, 27911, b"right", vec![]), &advert(1)).await.unwrap();
        let intruder = Gossip::start(config(9, 27912, b"wrong", vec!["127.0.0.1:27911".into()]), &advert(9)).await.unwrap();
        tokio::time::sleep(Duration::from_secs(3)).await;
        assert_eq!(a.peers().await.iter().map(|p| p.node_id).collect::<Vec<_>>(), vec![1]);
        assert_eq!(intruder.peers().await.iter().map(|p| p.node_id).collect::<Vec<_>>(), vec![9]);
        assert!(a.counters().dropped(DropReason::BadMac) > 0, "the intruder's datagrams are counted");
        a.shutdown().await;
        intruder.shutdown().await;
    }

    #[tokio::test]
    async fn raw_forged_and_replayed_datagrams_change_nothing() {
        let a = Gossip::start(config(1, 27921, b"right", vec![]), &advert(1)).await.unwrap();
        // A second member whose traffic we capture through a UDP tap in between.
        let tap = tokio::net::UdpSocket::bind("127.0.0.1:27923").await.unwrap();
        let b = Gossip::start(config(2, 27922, b"right", vec!["127.0.0.1:27923".into()]), &advert(2)).await.unwrap();
        let mut buffer = vec![0u8; 65_536];
        let (len, _) = tokio::time::timeout(Duration::from_secs(5), tap.recv_from(&mut buffer)).await.unwrap().unwrap();
        let captured = buffer[..len].to_vec();
        let attacker = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let target = "127.0.0.1:27921";
        // Forward the authentic datagram once (accepted), then replay it, then send junk,
        // a truncated copy, and an unauthenticated raw chitchat-like payload.
        attacker.send_to(&captured, target).await.unwrap();
        tokio::time::sleep(Duration::from_millis(300)).await;
        attacker.send_to(&captured, target).await.unwrap();
        attacker.send_to(b"junk", target).await.unwrap();
        attacker.send_to(&captured[..captured.len() - 5], target).await.unwrap();
        let mut forged = captured.clone();
        forged[auth::HEADER_BYTES + 3] ^= 0xff;
        attacker.send_to(&forged, target).await.unwrap();
        tokio::time::sleep(Duration::from_millis(500)).await;
        let counters = a.counters();
        assert_eq!(counters.dropped(DropReason::Replayed), 1);
        assert_eq!(counters.dropped(DropReason::Malformed), 1);
        assert_eq!(counters.dropped(DropReason::BadMac), 2);
        // The one authentic SYN named b, so a went on to gossip with b itself; what a
        // knows of b is exactly what b published, none of the forged bytes.
        let peers = wait_until(&a, |p| p.len() == 2).await;
        assert_eq!(peers.iter().map(|p| p.node_id).collect::<Vec<_>>(), vec![1, 2]);
        assert_eq!(peers[1].advert, advert(2));
        a.shutdown().await;
        b.shutdown().await;
    }
}
