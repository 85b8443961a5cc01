//! Faults against a [`TestCluster`] of local processes, each one logged with its start
//! and end as a [`FaultRecord`].
//!
//! - crashes: `kill -9` and restart with the same data dir;
//! - pauses: SIGSTOP / SIGCONT;
//! - partitions: an nftables table of the run's own (`strata_chaos_<subnet>`) dropping
//!   packets by (source, destination) address pair. Every node listens on and dials from
//!   127.0.<subnet>.<id>, so node-to-node traffic is cut while clients (from 127.0.0.1)
//!   still reach every node, which is what makes an isolated leader dangerous;
//! - clock skew: a restart under libfaketime (`LD_PRELOAD`), faking wall and monotonic
//!   clocks, offset or running fast or slow;
//! - a corrupted record: a byte flipped inside a Raft log record of a stopped follower;
//! - corrupt tier reads: every SST the nodes read from the S3 server arrives with a byte
//!   flipped (the store link corrupts it in flight), so no read may serve it;
//! - a crash of every node at once (with the server's unsynced-tail failpoint, it loses
//!   every write it had not fsynced, as a power cut would).
//!
//! A primitive this machine does not allow (no `nft`, no libfaketime) makes its faults
//! print a visible "skipped" line and [`Nemesis::skipped`] name them.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use crate::cluster::TestCluster;
use crate::history::FaultRecord;
use crate::workload::Rng;

/// Where Debian's libfaketime lives (package `libfaketime`); the MT build is the one for
/// multi-threaded programs.
pub const LIBFAKETIME: &str = "/usr/lib/x86_64-linux-gnu/faketime/libfaketimeMT.so.1";

/// How long to wait for a leader before a fault that targets one picks a node anyway.
const LEADER_WAIT: Duration = Duration::from_secs(10);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FaultKind {
    KillLeader,
    KillFollower,
    PauseLeader,
    PauseFollower,
    /// The leader cut off from both followers, both ways.
    IsolateLeader,
    /// A follower cut off (a minority of one against a majority of two).
    IsolateFollower,
    /// The leader's packets to the followers dropped; theirs still reach it.
    OneWayFromLeader,
    /// The followers' packets to the leader dropped; the leader's still reach them.
    OneWayToLeader,
    /// A node restarted with a skewed clock (offset, fast or slow).
    ClockSkew,
    /// Each node in turn: SIGTERM (a graceful hand-over), restart, wait until it serves.
    RollingRestart,
    /// `kill -9` of every node at once, then all restarted.
    CrashAll,
    /// A follower stopped, one byte of a Raft log record in its data dir flipped, restarted.
    CorruptFollower,
    /// The object store unreachable from every node (the S3 link cut), then back.
    StoreOutage,
    /// Every SST read from the object store arrives corrupt (one byte flipped), then whole again.
    CorruptTierReads,
}

impl FaultKind {
    pub fn name(self) -> &'static str {
        match self {
            FaultKind::KillLeader => "kill_leader",
            FaultKind::KillFollower => "kill_follower",
            FaultKind::PauseLeader => "pause_leader",
            FaultKind::PauseFollower => "pause_follower",
            FaultKind::IsolateLeader => "partition_isolate_leader",
            FaultKind::IsolateFollower => "partition_isolate_follower",
            FaultKind::OneWayFromLeader => "partition_one_way_from_leader",
            FaultKind::OneWayToLeader => "partition_one_way_to_leader",
            FaultKind::ClockSkew => "clock_skew",
            FaultKind::RollingRestart => "rolling_restart",
            FaultKind::CrashAll => "crash_all",
            FaultKind::CorruptFollower => "corrupt_follower_record",
            FaultKind::StoreOutage => "store_outage",
            FaultKind::CorruptTierReads => "corrupt_tier_reads",
        }
    }

    fn needs_nft(self) -> bool {
        matches!(self, FaultKind::IsolateLeader | FaultKind::IsolateFollower | FaultKind::OneWayFromLeader | FaultKind::OneWayToLeader)
    }
}

pub struct Nemesis {
    started: Instant,
    table: String,
    nft_ready: Option<bool>,
    faketime: bool,
    pub log: Vec<FaultRecord>,
    pub skipped: Vec<String>,
    /// The cuttable link to the S3 server, when the run tiers to one.
    pub store_link: Option<std::sync::Arc<crate::store_link::StoreLink>>,
}

impl Nemesis {
    /// `started`: the run's time origin (the recorder's), so faults and ops share a clock.
    pub fn new(cluster: &TestCluster, started: Instant) -> Self {
        Nemesis {
            started,
            table: format!("strata_chaos_{}", cluster.subnet),
            nft_ready: None,
            faketime: Path::new(LIBFAKETIME).exists(),
            log: Vec::new(),
            skipped: Vec::new(),
            store_link: None,
        }
    }

    fn now_ms(&self) -> u64 {
        self.started.elapsed().as_millis() as u64
    }

    /// Whether this fault can run here; if not, says "skipped" once, visibly.
    pub fn available(&mut self, kind: FaultKind) -> bool {
        let missing = if kind.needs_nft() && !self.nft_ready() {
            Some("nftables is not usable here (needs root and `nft`)")
        } else if kind == FaultKind::ClockSkew && !self.faketime {
            Some("libfaketime is not installed (apt-get install faketime)")
        } else if matches!(kind, FaultKind::StoreOutage | FaultKind::CorruptTierReads) && self.store_link.is_none() {
            Some("the run tiers to a file store (set STRATA_TEST_S3_ENDPOINT for an S3 server behind a link to cut or corrupt)")
        } else {
            None
        };
        match missing {
            Some(why) => {
                let line = format!("{}: skipped: {why}", kind.name());
                if !self.skipped.contains(&line) {
                    eprintln!("chaos: {line}");
                    self.skipped.push(line);
                }
                false
            }
            None => true,
        }
    }

    fn nft_ready(&mut self) -> bool {
        if self.nft_ready.is_none() {
            let _ = nft(&["delete", "table", "inet", &self.table]);
            let ready = nft(&["add", "table", "inet", &self.table]).is_ok()
                && nft(&["add", "chain", "inet", &self.table, "out", "{ type filter hook output priority 0; policy accept; }"]).is_ok();
            self.nft_ready = Some(ready);
        }
        self.nft_ready == Some(true)
    }

    /// Drops every packet from node `from` to node `to`.
    fn cut(&self, cluster: &TestCluster, from: u64, to: u64) {
        let rule = format!("ip saddr {} ip daddr {} drop", cluster.ip(from), cluster.ip(to));
        let mut args = vec!["add", "rule", "inet", &self.table, "out"];
        args.extend(rule.split(' '));
        nft(&args).unwrap_or_else(|e| panic!("partition rule {rule}: {e}"));
    }

    /// Cuts node `node` off from every other node: its packets to them (`outbound`), theirs
    /// to it (`inbound`), or both. Check [`Nemesis::available`] first.
    pub fn partition(&mut self, cluster: &TestCluster, node: u64, outbound: bool, inbound: bool) {
        for other in (1..=cluster.size).filter(|id| *id != node) {
            if outbound {
                self.cut(cluster, node, other);
            }
            if inbound {
                self.cut(cluster, other, node);
            }
        }
    }

    /// Removes every partition rule.
    pub fn heal_partitions(&mut self) {
        nft(&["flush", "chain", "inet", &self.table, "out"]).expect("heal the partitions");
    }

    /// Heals every partition, resumes every paused node and starts every stopped one.
    pub fn heal_all(&mut self, cluster: &mut TestCluster) {
        if self.nft_ready == Some(true) {
            let _ = nft(&["flush", "chain", "inet", &self.table, "out"]);
        }
        for id in 1..=cluster.size {
            if cluster.pid(id).is_some() {
                cluster.signal_pause(id, false);
            } else {
                cluster.spawn(id);
            }
        }
    }

    /// Removes the run's nftables table.
    pub fn teardown(&mut self) {
        if self.nft_ready == Some(true) {
            let _ = nft(&["delete", "table", "inet", &self.table]);
            self.nft_ready = None;
        }
    }

    async fn leader(&self, cluster: &TestCluster) -> u64 {
        cluster.leader_within(LEADER_WAIT).await.unwrap_or_else(|| cluster.running().first().copied().unwrap_or(1))
    }

    /// Injects one fault of `kind`, holds it for `hold` (where that applies), ends it, and
    /// logs it.
    pub async fn inject(&mut self, cluster: &mut TestCluster, kind: FaultKind, hold: Duration, rng: &mut Rng) {
        let leader = self.leader(cluster).await;
        let followers: Vec<u64> = (1..=cluster.size).filter(|id| *id != leader).collect();
        let follower = followers[rng.below(followers.len() as u64) as usize];
        let start_ms = self.now_ms();
        let (detail, leader_loss) = match kind {
            FaultKind::KillLeader | FaultKind::KillFollower => {
                let node = if kind == FaultKind::KillLeader { leader } else { follower };
                cluster.kill(node);
                tokio::time::sleep(hold).await;
                cluster.spawn(node);
                (format!("kill -9 node {node}, restarted after {} ms", hold.as_millis()), kind == FaultKind::KillLeader)
            }
            FaultKind::PauseLeader | FaultKind::PauseFollower => {
                let node = if kind == FaultKind::PauseLeader { leader } else { follower };
                cluster.signal_pause(node, true);
                tokio::time::sleep(hold).await;
                cluster.signal_pause(node, false);
                (format!("SIGSTOP node {node} for {} ms", hold.as_millis()), kind == FaultKind::PauseLeader)
            }
            FaultKind::IsolateLeader | FaultKind::IsolateFollower | FaultKind::OneWayFromLeader | FaultKind::OneWayToLeader => {
                let (node, outbound, inbound) = match kind {
                    FaultKind::IsolateLeader => (leader, true, true),
                    FaultKind::IsolateFollower => (follower, true, true),
                    FaultKind::OneWayFromLeader => (leader, true, false),
                    _ => (leader, false, true),
                };
                self.partition(cluster, node, outbound, inbound);
                tokio::time::sleep(hold).await;
                self.heal_partitions();
                let how = match (outbound, inbound) {
                    (true, true) => "isolated",
                    (true, false) => "cannot send to the others",
                    _ => "cannot hear from the others",
                };
                (format!("node {node} {how} for {} ms", hold.as_millis()), kind != FaultKind::IsolateFollower)
            }
            FaultKind::ClockSkew => {
                let node = if rng.below(2) == 0 { leader } else { follower };
                let skews = ["+0 x2", "+0 x0.5", "+90s", "-90s"];
                let skew = skews[rng.below(skews.len() as u64) as usize];
                let mut launch = cluster.launch(node);
                launch.env.retain(|(key, _)| key != "LD_PRELOAD" && key != "FAKETIME");
                launch.env.push(("LD_PRELOAD".into(), LIBFAKETIME.into()));
                launch.env.push(("FAKETIME".into(), skew.into()));
                cluster.kill(node);
                cluster.spawn_launch(node, launch);
                tokio::time::sleep(hold).await;
                (format!("node {node} restarted with FAKETIME=\"{skew}\" (kept for the rest of the run)"), node == leader)
            }
            FaultKind::RollingRestart => {
                let mut order: Vec<u64> = followers.clone();
                order.push(leader);
                for node in &order {
                    cluster.terminate(*node);
                    cluster.spawn(*node);
                    let deadline = Instant::now() + Duration::from_secs(20);
                    while cluster.status(*node).await.is_none_or(|s| s.leader_id == 0) && Instant::now() < deadline {
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                }
                (format!("SIGTERM and restart of nodes {order:?}, one at a time"), true)
            }
            FaultKind::CrashAll => {
                for node in 1..=cluster.size {
                    cluster.kill(node);
                }
                tokio::time::sleep(hold).await;
                for node in 1..=cluster.size {
                    cluster.spawn(node);
                }
                (format!("kill -9 of every node at once, restarted after {} ms", hold.as_millis()), true)
            }
            FaultKind::StoreOutage => {
                let link = self.store_link.clone().expect("checked by available()");
                link.cut();
                tokio::time::sleep(hold).await;
                link.heal();
                (format!("object store unreachable for {} ms", hold.as_millis()), false)
            }
            FaultKind::CorruptTierReads => {
                let link = self.store_link.clone().expect("checked by available()");
                let before = link.corrupted_reads();
                link.corrupt_reads(true);
                tokio::time::sleep(hold).await;
                link.corrupt_reads(false);
                let corrupted = link.corrupted_reads() - before;
                (format!("{corrupted} SST reads from the object store corrupted in {} ms", hold.as_millis()), false)
            }
            FaultKind::CorruptFollower => {
                cluster.kill(follower);
                let flipped = corrupt_raft_log(&cluster.data_dir(follower), rng);
                tokio::time::sleep(hold).await;
                cluster.spawn(follower);
                (format!("node {follower} killed, {flipped}, restarted"), false)
            }
        };
        let record = FaultRecord { kind: kind.name().into(), detail, leader_loss, start_ms, end_ms: self.now_ms() };
        eprintln!("chaos fault: {} [{} .. {} ms] {}", record.kind, record.start_ms, record.end_ms, record.detail);
        self.log.push(record);
    }
}

impl Drop for Nemesis {
    fn drop(&mut self) {
        self.teardown();
    }
}

fn nft(args: &[&str]) -> Result<(), String> {
    let output = Command::new("nft").args(args).output().map_err(|e| format!("cannot run nft: {e}"))?;
    if output.status.success() {
        Ok(())
    } else {
        Err(String::from_utf8_lossy(&output.stderr).trim().to_string())
    }
}

/// The Raft log's segment files of a node, oldest first.
fn raft_log_segments(data_dir: &Path) -> Vec<PathBuf> {
    let mut segments: Vec<PathBuf> = std::fs::read_dir(data_dir.join("raft-log"))
        .map(|entries| entries.flatten().map(|e| e.path()).filter(|p| p.extension().is_some_and(|x| x == "wal")).collect())
        .unwrap_or_default();
    segments.sort();
    segments
}

/// Flips one byte inside the payload of a record in the middle of a node's newest Raft
/// log segment (not its last record, which recovery may take for a torn write). Returns
/// what it did.
pub fn corrupt_raft_log(data_dir: &Path, rng: &mut Rng) -> String {
    use std::os::unix::fs::FileExt;
    let Some(segment) = raft_log_segments(data_dir).pop() else { return "no raft log segment to corrupt".into() };
    let file = std::fs::OpenOptions::new().read(true).write(true).open(&segment).expect("open segment");
    let mut bytes = Vec::new();
    std::io::Read::read_to_end(&mut &file, &mut bytes).expect("read segment");
    // Walk the records: [len u32][crc u32][index u64][payload].
    let mut records = Vec::new();
    let mut offset = 0usize;
    while offset + 16 <= bytes.len() {
        let len = u32::from_le_bytes(bytes[offset..offset + 4].try_into().unwrap()) as usize;
        if len == 0 || offset + 16 + len > bytes.len() {
            break;
        }
        records.push((offset, len));
        offset += 16 + len;
    }
    if records.len() < 3 {
        return format!("too few records in {} to corrupt one in the middle", segment.display());
    }
    let (at, len) = records[1 + rng.below(records.len() as u64 - 2) as usize];
    let byte = at + 16 + rng.below(len as u64) as usize;
    file.write_all_at(&[bytes[byte] ^ 0x20], byte as u64).expect("flip a byte");
    file.sync_all().expect("sync the corruption");
    format!("byte {byte} of {} flipped (record {} of {})", segment.display(), records.iter().position(|r| r.0 == at).unwrap(), records.len())
}
