//! Authenticated gossip datagrams: every datagram is sealed with HMAC-SHA256 under a key
//! derived from the cluster secret and the cluster id, and carries a per-sender counter
//! so that a replayed datagram is dropped.
//!
//! Why our own layer: chitchat checks the cluster id only on SYN (chitchat issue #79) and
//! authenticates nothing; anyone who can send a UDP datagram could rewrite what a node
//! believes about the cluster. Gossip is only a hint (Raft membership changes go through
//! Raft RPCs), but a forged hint could still make a node bootstrap or join wrongly.
//!
//! Wire format (all integers little-endian):
//! ```text
//! magic "STG1" (4) | cluster tag (8) | sender instance (8) | counter (8) | unix ms (8)
//! | chitchat payload | HMAC-SHA256 over everything before (32)
//! ```
//! - cluster tag: the first 8 bytes of SHA-256 of the cluster id, in the clear, so that a
//!   datagram of another cluster is told apart (and counted) from a forged one;
//! - sender instance: random per process start; counter: +1 per datagram. A receiver keeps,
//!   per instance, the highest counter seen and a bitmap of the [`REPLAY_WINDOW`] below it
//!   (as IPsec and WireGuard do): a counter seen before, or older than the window, is a replay;
//! - unix ms: a datagram whose clock is more than [`GOSSIP_CLOCK_SKEW_MAX_MS`] away from the
//!   receiver's is dropped, which bounds replays of an instance whose window was evicted
//!   (at most [`GOSSIP_REPLAY_SENDERS_MAX`] instances are remembered).

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

use hmac::{Hmac, Mac};
use sha2::{Digest, Sha256};

type HmacSha256 = Hmac<Sha256>;

const MAGIC: &[u8; 4] = b"STG1";
const TAG_BYTES: usize = 32;
/// Bytes before the chitchat payload.
pub const HEADER_BYTES: usize = 4 + 8 + 8 + 8 + 8;
/// Bytes a sealed datagram adds to the chitchat payload.
pub const SEAL_OVERHEAD_BYTES: usize = HEADER_BYTES + TAG_BYTES;
/// Largest UDP payload over IPv4.
pub const DATAGRAM_BYTES_MAX: usize = 65_507;
/// Senders (process instances) whose replay window is remembered; the least recently heard
/// is forgotten beyond this.
pub const GOSSIP_REPLAY_SENDERS_MAX: usize = 1_024;
/// Counters below a sender's highest that are still tracked individually.
pub const REPLAY_WINDOW: u64 = 64;
/// Largest accepted difference between a datagram's clock and the receiver's.
pub const GOSSIP_CLOCK_SKEW_MAX_MS: u64 = 5 * 60 * 1_000;

/// Why a received datagram was dropped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DropReason {
    /// Too short, or not our magic.
    Malformed,
    /// A well-formed datagram of another cluster id.
    WrongCluster,
    /// The MAC does not verify: forged, altered, or sealed with another secret.
    BadMac,
    /// A counter this receiver has already accepted (or one too old to tell).
    Replayed,
    /// Sent with a clock too far from ours.
    Stale,
}

impl DropReason {
    pub const ALL: [DropReason; 5] =
        [DropReason::Malformed, DropReason::WrongCluster, DropReason::BadMac, DropReason::Replayed, DropReason::Stale];

    /// The label used in metrics and logs.
    pub fn label(self) -> &'static str {
        match self {
            DropReason::Malformed => "malformed",
            DropReason::WrongCluster => "wrong_cluster",
            DropReason::BadMac => "bad_mac",
            DropReason::Replayed => "replayed",
            DropReason::Stale => "stale",
        }
    }
}

/// Counts of accepted, sent and dropped datagrams, shared with the node's `/metrics`.
#[derive(Debug, Default)]
pub struct GossipCounters {
    pub accepted: AtomicU64,
    pub sent: AtomicU64,
    /// Datagrams not sent because sealing would exceed [`DATAGRAM_BYTES_MAX`].
    pub oversize: AtomicU64,
    dropped: [AtomicU64; 5],
}

impl GossipCounters {
    pub fn record_drop(&self, reason: DropReason) {
        self.dropped[reason as usize].fetch_add(1, Ordering::Relaxed);
    }

    pub fn dropped(&self, reason: DropReason) -> u64 {
        self.dropped[reason as usize].load(Ordering::Relaxed)
    }
}

/// The keys of one cluster: seals outgoing datagrams.
pub struct Sealer {
    key: Vec<u8>,
    cluster_tag: [u8; 8],
    instance: u64,
    counter: u64,
}

/// Derives the MAC key: the secret alone would let two clusters sharing a secret accept
/// each other's datagrams.
fn derive_key(secret: &[u8], cluster_id: &str) -> Vec<u8> {
    let mut mac = HmacSha256::new_from_slice(secret).expect("HMAC takes keys of any length");
    mac.update(b"strata-gossip-v1\0");
    mac.update(cluster_id.as_bytes());
    mac.finalize().into_bytes().to_vec()
}

fn cluster_tag(cluster_id: &str) -> [u8; 8] {
    let digest = Sha256::digest(cluster_id.as_bytes());
    digest[..8].try_into().expect("sha-256 is 32 bytes")
}

fn unix_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}

impl Sealer {
    pub fn new(secret: &[u8], cluster_id: &str, instance: u64) -> Self {
        Self { key: derive_key(secret, cluster_id), cluster_tag: cluster_tag(cluster_id), instance, counter: 0 }
    }

    /// Seals `payload` into `out` (cleared first).
    pub fn seal(&mut self, payload: &[u8], out: &mut Vec<u8>) {
        self.seal_at(payload, unix_ms(), out);
    }

    fn seal_at(&mut self, payload: &[u8], now_ms: u64, out: &mut Vec<u8>) {
        self.counter += 1;
        out.clear();
        out.extend_from_slice(MAGIC);
        out.extend_from_slice(&self.cluster_tag);
        out.extend_from_slice(&self.instance.to_le_bytes());
        out.extend_from_slice(&self.counter.to_le_bytes());
        out.extend_from_slice(&now_ms.to_le_bytes());
        out.extend_from_slice(payload);
        let mut mac = HmacSha256::new_from_slice(&self.key).expect("HMAC takes keys of any length");
        mac.update(out);
        out.extend_from_slice(&mac.finalize().into_bytes());
    }
}

/// Replay state of one sender instance.
struct Window {
    highest: u64,
    /// Bit i set: counter `highest - i` was accepted (bit 0 is `highest`).
    seen: u64,
    last_heard: u64,
}

/// Verifies incoming datagrams and remembers what it accepted.
pub struct Opener {
    key: Vec<u8>,
    cluster_tag: [u8; 8],
    windows: HashMap<u64, Window>,
    /// Monotonic tick for least-recently-heard eviction.
    tick: u64,
}

impl Opener {
    pub fn new(secret: &[u8], cluster_id: &str) -> Self {
        Self { key: derive_key(secret, cluster_id), cluster_tag: cluster_tag(cluster_id), windows: HashMap::new(), tick: 0 }
    }

    /// The chitchat payload of an authentic, fresh datagram.
    pub fn open<'a>(&mut self, datagram: &'a [u8]) -> Result<&'a [u8], DropReason> {
        self.open_at(datagram, unix_ms())
    }

    fn open_at<'a>(&mut self, datagram: &'a [u8], now_ms: u64) -> Result<&'a [u8], DropReason> {
        if datagram.len() < SEAL_OVERHEAD_BYTES || &datagram[..4] != MAGIC {
            return Err(DropReason::Malformed);
        }
        if datagram[4..12] != self.cluster_tag {
            return Err(DropReason::WrongCluster);
        }
        let (signed, tag) = datagram.split_at(datagram.len() - TAG_BYTES);
        let mut mac = HmacSha256::new_from_slice(&self.key).expect("HMAC takes keys of any length");
        mac.update(signed);
        // verify_slice compares in constant time.
        mac.verify_slice(tag).map_err(|_| DropReason::BadMac)?;
        let field = |at: usize| u64::from_le_bytes(signed[at..at + 8].try_into().expect("8 bytes"));
        let (instance, counter, sent_ms) = (field(12), field(20), field(28));
        if sent_ms.abs_diff(now_ms) > GOSSIP_CLOCK_SKEW_MAX_MS {
            return Err(DropReason::Stale);
        }
        self.accept_counter(instance, counter)?;
        Ok(&signed[HEADER_BYTES..])
    }

    /// Records `counter` of `instance`, or says it is a replay.
    fn accept_counter(&mut self, instance: u64, counter: u64) -> Result<(), DropReason> {
        self.tick += 1;
        let tick = self.tick;
        if !self.windows.contains_key(&instance) && self.windows.len() >= GOSSIP_REPLAY_SENDERS_MAX {
            let oldest = self.windows.iter().min_by_key(|(_, w)| w.last_heard).map(|(id, _)| *id);
            if let Some(oldest) = oldest {
                self.windows.remove(&oldest);
            }
        }
        let window = self.windows.entry(instance).or_insert(Window { highest: 0, seen: 0, last_heard: tick });
        if counter > window.highest {
            let shift = counter - window.highest;
            window.seen = if shift >= REPLAY_WINDOW { 0 } else { window.seen << shift };
            window.seen |= 1;
            window.highest = counter;
        } else {
            let age = window.highest - counter;
            if age >= REPLAY_WINDOW || window.seen & (1 << age) != 0 {
                return Err(DropReason::Replayed);
            }
            window.seen |= 1 << age;
        }
        window.last_heard = tick;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const NOW: u64 = 1_800_000_000_000;

    fn sealed(sealer: &mut Sealer, payload: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        sealer.seal_at(payload, NOW, &mut out);
        out
    }

    #[test]
    fn authentic_datagrams_open_once() {
        let mut sealer = Sealer::new(b"secret", "c1", 7);
        let mut opener = Opener::new(b"secret", "c1");
        let first = sealed(&mut sealer, b"hello");
        let second = sealed(&mut sealer, b"world");
        assert_eq!(first.len(), 5 + SEAL_OVERHEAD_BYTES);
        // Out of order is fine (UDP reorders); a second delivery of either is not.
        assert_eq!(opener.open_at(&second, NOW), Ok(&b"world"[..]));
        assert_eq!(opener.open_at(&first, NOW), Ok(&b"hello"[..]));
        assert_eq!(opener.open_at(&first, NOW), Err(DropReason::Replayed));
        assert_eq!(opener.open_at(&second, NOW), Err(DropReason::Replayed));
    }

    #[test]
    fn forged_truncated_and_foreign_datagrams_are_dropped() {
        let mut sealer = Sealer::new(b"secret", "c1", 7);
        let mut opener = Opener::new(b"secret", "c1");
        let good = sealed(&mut sealer, b"payload");

        let mut flipped = good.clone();
        flipped[HEADER_BYTES] ^= 1;
        assert_eq!(opener.open_at(&flipped, NOW), Err(DropReason::BadMac));
        let mut counter_bumped = good.clone();
        counter_bumped[20] ^= 1;
        assert_eq!(opener.open_at(&counter_bumped, NOW), Err(DropReason::BadMac));

        assert_eq!(opener.open_at(&good[..good.len() - 1], NOW), Err(DropReason::BadMac));
        assert_eq!(opener.open_at(&good[..SEAL_OVERHEAD_BYTES - 1], NOW), Err(DropReason::Malformed));
        assert_eq!(opener.open_at(b"junk", NOW), Err(DropReason::Malformed));

        let other_secret = sealed(&mut Sealer::new(b"guess", "c1", 9), b"payload");
        assert_eq!(opener.open_at(&other_secret, NOW), Err(DropReason::BadMac));
        let other_cluster = sealed(&mut Sealer::new(b"secret", "c2", 9), b"payload");
        assert_eq!(opener.open_at(&other_cluster, NOW), Err(DropReason::WrongCluster));

        // None of the drops consumed the good datagram's counter.
        assert_eq!(opener.open_at(&good, NOW), Ok(&b"payload"[..]));
    }

    #[test]
    fn stale_clocks_and_old_counters_are_dropped() {
        let mut sealer = Sealer::new(b"s", "c", 1);
        let mut opener = Opener::new(b"s", "c");
        let mut old = Vec::new();
        sealer.seal_at(b"x", NOW - GOSSIP_CLOCK_SKEW_MAX_MS - 1, &mut old);
        assert_eq!(opener.open_at(&old, NOW), Err(DropReason::Stale));

        let early = sealed(&mut sealer, b"early");
        for _ in 0..REPLAY_WINDOW {
            let datagram = sealed(&mut sealer, b"later");
            assert!(opener.open_at(&datagram, NOW).is_ok());
        }
        // Never seen, but too far below the highest counter to tell: treated as a replay.
        assert_eq!(opener.open_at(&early, NOW), Err(DropReason::Replayed));
    }

    #[test]
    fn replay_state_is_bounded() {
        let mut opener = Opener::new(b"s", "c");
        for instance in 0..(GOSSIP_REPLAY_SENDERS_MAX as u64 + 10) {
            let datagram = sealed(&mut Sealer::new(b"s", "c", instance), b"x");
            assert!(opener.open_at(&datagram, NOW).is_ok());
        }
        assert_eq!(opener.windows.len(), GOSSIP_REPLAY_SENDERS_MAX);
    }
}
