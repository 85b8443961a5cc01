//! Named scenarios: a three-node cluster formed through gossip, the seeded workload for
//! the run's duration, and a seeded schedule of faults drawn from the scenario's set.
//! After the workload ends every fault is healed, the cluster drains, and every node's
//! full `$all` goes to the checker.
//!
//! A run writes `history.jsonl` (every operation), `faults.jsonl` (the fault timeline) and
//! `report.txt` beside the node logs and data dirs; all of it is kept when the run finds
//! an anomaly (or when asked to keep it).

use std::collections::BTreeMap;
use std::io::Write;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::checker::{check, Report};
use crate::cluster::{NodeLaunch, TestCluster};
use crate::figures::Figures;
use crate::history::{write_jsonl, FaultRecord, FinalEvent, Op};
use crate::nemesis::{FaultKind, Nemesis};
use crate::workload::{client, create_group, group_consumer, subscriber, Addrs, Recorder, Rng, Targets};

/// The server's failpoint that makes a `kill -9` lose every Raft log write that was not
/// fsynced, as a power cut loses the page cache.
pub use strata_storage::LOSE_UNSYNCED_TAIL_FAILPOINT;

/// Quiet time at the start of a run and before its end: no fault is injected then.
const EDGE_QUIET: Duration = Duration::from_secs(3);

pub struct Scenario {
    pub name: &'static str,
    pub about: &'static str,
    pub faults: &'static [FaultKind],
    /// Extra environment for every node.
    pub node_env: &'static [(&'static str, &'static str)],
    /// Nodes tier settled history (a small hot window) to an object store: an S3 server
    /// behind a cuttable link when `STRATA_TEST_S3_ENDPOINT` names one, else a file store.
    pub tiered: bool,
}

use FaultKind::*;

pub const SCENARIOS: &[Scenario] = &[
    Scenario { name: "kill", about: "kill -9 of the leader or a follower, restarted with its data", faults: &[KillLeader, KillFollower], node_env: &[], tiered: false },
    Scenario { name: "pause", about: "SIGSTOP of the leader or a follower beyond the election timeout", faults: &[PauseLeader, PauseFollower], node_env: &[], tiered: false },
    Scenario {
        name: "partition",
        about: "isolated leader, isolated follower (minority), one-way cuts from and to the leader",
        faults: &[IsolateLeader, IsolateFollower, OneWayFromLeader, OneWayToLeader],
        node_env: &[],
        tiered: false,
    },
    Scenario { name: "clock-skew", about: "nodes restarted under libfaketime (fast, slow, +/-90 s) while leaders fail", faults: &[ClockSkew, KillLeader, PauseLeader], node_env: &[], tiered: false },
    Scenario { name: "rolling-restart", about: "every node restarted in turn with SIGTERM", faults: &[RollingRestart], node_env: &[], tiered: false },
    Scenario {
        name: "crash-all",
        about: "kill -9 of every node at once, losing every Raft log write that was not fsynced (a power cut)",
        faults: &[CrashAll, KillLeader],
        node_env: &[(LOSE_UNSYNCED_TAIL_FAILPOINT, "1")],
        tiered: false,
    },
    Scenario { name: "corrupt-record", about: "a byte flipped in a stopped follower's Raft log, then leaders fail", faults: &[CorruptFollower, KillLeader], node_env: &[], tiered: false },
    Scenario {
        name: "tier",
        about: "history tiered to an object store (hot window of 30 events) while leaders die, are paused or isolated (zombie writers), the store goes away and its objects are read corrupt",
        faults: &[KillLeader, PauseLeader, IsolateLeader, KillFollower, StoreOutage, CorruptTierReads],
        node_env: &[],
        tiered: true,
    },
    Scenario {
        name: "tier-corrupt",
        about: "history tiered to an S3 server whose SST objects are read corrupt (a byte flipped in flight) while leaders die",
        faults: &[CorruptTierReads, KillLeader],
        node_env: &[],
        tiered: true,
    },
    Scenario {
        name: "mixed",
        about: "all of the above but crash-all, drawn at random (the soak)",
        faults: &[KillLeader, KillFollower, PauseLeader, PauseFollower, IsolateLeader, IsolateFollower, OneWayFromLeader, OneWayToLeader, ClockSkew, RollingRestart, CorruptFollower],
        node_env: &[],
        tiered: false,
    },
];

pub fn find(name: &str) -> Option<&'static Scenario> {
    SCENARIOS.iter().find(|s| s.name == name)
}

pub struct RunConfig {
    pub seed: u64,
    pub duration: Duration,
    /// Nodes listen on 127.0.<subnet>.1..=3; distinct per concurrent run.
    pub subnet: u8,
    pub clients: u32,
    pub subscribers: u32,
    /// Consumers of the run's persistent group (0: no group).
    pub group_consumers: u32,
    /// Keep the run's dir even when it passes.
    pub keep: bool,
}

pub struct Outcome {
    /// Tiered runs against an S3 server: how many SST reads the store link corrupted.
    pub corrupted_store_reads: u64,
    /// Tiered runs: the lowest local floor of the nodes at the end (all below it was read
    /// back from the tier by the checker).
    pub tier_floor: Option<u64>,
    pub report: Report,
    pub figures: Figures,
    pub faults_injected: usize,
    pub skipped: Vec<String>,
    pub dir: PathBuf,
}

impl Outcome {
    pub fn summary(&self, scenario: &str, seed: u64) -> String {
        let recovery = match self.figures.recovery_summary() {
            Some((p50, p99, max, _)) => format!("recovery p50 {p50} ms, p99 {p99} ms, max {max} ms"),
            None => "no leader-loss fault".into(),
        };
        let corrupted = match self.corrupted_store_reads {
            0 => String::new(),
            n => format!(", {n} SST reads corrupted"),
        };
        format!(
            "scenario {scenario} seed {seed}: {} operations, {} acknowledged events, {} faults, {} anomalies, {recovery}{corrupted}",
            self.report.operations,
            self.report.acknowledged_events,
            self.faults_injected,
            self.report.anomalies()
        )
    }
}

/// How long one fault of `kind` is held.
fn hold(kind: FaultKind, rng: &mut Rng) -> Duration {
    match kind {
        KillLeader | KillFollower => rng.millis(1_000, 4_000),
        // Beyond the election timeout (at most 1.5 s), so a paused leader is deposed.
        PauseLeader | PauseFollower => rng.millis(2_000, 5_000),
        IsolateLeader | IsolateFollower | OneWayFromLeader | OneWayToLeader => rng.millis(2_000, 6_000),
        ClockSkew => rng.millis(2_000, 4_000),
        CrashAll => rng.millis(500, 2_000),
        CorruptFollower => rng.millis(500, 1_000),
        StoreOutage => rng.millis(2_000, 6_000),
        CorruptTierReads => rng.millis(2_000, 5_000),
        RollingRestart => Duration::ZERO,
    }
}

/// Hot window of a tiered run: small, so that most of the run's history is tiered and
/// released while the faults happen.
const TIERED_HOT_WINDOW_EVENTS: &str = "30";

/// The `strata serve` arguments of a tiered run, and the link to cut for store outages:
/// an S3 server behind a [`StoreLink`] when `STRATA_TEST_S3_ENDPOINT` names one (scripts/test
/// starts one), else a file store in the run's dir (no outage fault then).
async fn tier_setup(cluster: &TestCluster) -> (Vec<String>, Option<Arc<crate::store_link::StoreLink>>) {
    let window = ["--hot-window-events".to_string(), TIERED_HOT_WINDOW_EVENTS.to_string()];
    match crate::store_link::TestS3::from_env() {
        Some(s3) => {
            let link = Arc::new(crate::store_link::StoreLink::start(&s3.endpoint).await);
            let mut args = s3.serve_args(&format!("chaos-{}", cluster.subnet), &link.endpoint(), cluster.dir.path());
            args.extend(window);
            eprintln!("chaos: tiering to an S3 server at {} through a cuttable link at {}", s3.endpoint, link.endpoint());
            (args, Some(link))
        }
        None => {
            let mut args = vec!["--object-store".to_string(), format!("file://{}", cluster.dir.path().join("tier").display())];
            args.extend(window);
            eprintln!("chaos: tiering to a file store (no STRATA_TEST_S3_ENDPOINT)");
            (args, None)
        }
    }
}

/// Runs `scenario` as `config` says.
pub async fn run(scenario: &Scenario, config: &RunConfig) -> Outcome {
    eprintln!("chaos: scenario {} ({}), seed {}, {} s; replay with: tests/chaos/run --scenario {} --seed {} --duration {}",
        scenario.name, scenario.about, config.seed, config.duration.as_secs(), scenario.name, config.seed, config.duration.as_secs());
    let mut cluster = TestCluster::new(config.subnet, crate::cluster::Formation::Gossip { initial_size: 3 });
    let env: Vec<(String, String)> = scenario.node_env.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
    let (tier_args, store_link) = if scenario.tiered { tier_setup(&cluster).await } else { (Vec::new(), None) };
    for id in 1..=3 {
        cluster.spawn_launch(id, NodeLaunch { args: tier_args.clone(), env: env.clone() });
    }
    cluster.wait_leader(Duration::from_secs(30)).await;
    crate::cluster::wait_voters(&cluster, &[1, 2, 3], Duration::from_secs(30)).await;
    eprintln!("chaos: cluster up in {}", cluster.dir.path().display());

    let addrs = Targets::new((1..=3).map(|id| cluster.addr(id)).collect(), cluster.client_tls.clone());
    let (recorder, started, until, tasks) = start_workload(addrs.clone(), config).await;

    let mut nemesis = Nemesis::new(&cluster, started);
    nemesis.store_link = store_link;
    let mut rng = Rng::new(config.seed, 7_777);
    let kinds: Vec<FaultKind> = scenario.faults.iter().copied().filter(|k| nemesis.available(*k)).collect();
    tokio::time::sleep(EDGE_QUIET).await;
    while !kinds.is_empty() && Instant::now() + EDGE_QUIET < until {
        let kind = kinds[rng.below(kinds.len() as u64) as usize];
        let held = hold(kind, &mut rng);
        nemesis.inject(&mut cluster, kind, held, &mut rng).await;
        tokio::time::sleep(rng.millis(1_500, 3_500)).await;
    }
    nemesis.heal_all(&mut cluster);
    for task in tasks {
        task.await.expect("workload task");
    }

    // The history is on disk before draining, so a run that cannot drain keeps it.
    let mut ops = recorder.lock().unwrap().take_ops();
    let dir = cluster.dir.path().to_path_buf();
    write_lines(&dir.join("history.jsonl"), &ops);
    write_lines(&dir.join("faults.jsonl"), &nemesis.log);

    // Drain: every node up and caught up, the group settled, then every node's full $all.
    cluster.wait_converged(Duration::from_secs(90)).await;
    drain_group(addrs, &recorder, config, &mut ops, &dir).await;
    let mut finals = BTreeMap::new();
    for id in 1..=3 {
        finals.insert(id, cluster.read_all_local(id).await.into_iter().map(FinalEvent::from).collect::<Vec<_>>());
    }
    // A tiered run: how much history every node had released to the tier by the end.
    let mut tier_floor = None;
    if scenario.tiered {
        let mut floors = Vec::new();
        for id in 1..=3 {
            floors.push(cluster.status(id).await.and_then(|s| s.tier).map_or(0, |t| t.local_floor));
        }
        eprintln!("chaos: local floors at the end (history below them read from the tier): {floors:?}");
        tier_floor = floors.into_iter().min();
    }
    nemesis.teardown();
    let mut outcome = finish(scenario.name, config.seed, &ops, &finals, &nemesis.log, nemesis.skipped.clone(), dir);
    outcome.tier_floor = tier_floor;
    outcome.corrupted_store_reads = nemesis.store_link.as_ref().map_or(0, |link| link.corrupted_reads());
    if outcome.report.anomalies() > 0 || config.keep {
        cluster.keep = true;
    }
    outcome
}

/// Starts the run's clients, subscribers and group consumers against `addrs` (creating
/// the group first); returns the recorder, the run's time origin, when the workload
/// stops, and the tasks to await.
pub async fn start_workload(addrs: Addrs, config: &RunConfig) -> (Arc<Mutex<Recorder>>, Instant, Instant, Vec<tokio::task::JoinHandle<()>>) {
    if config.group_consumers > 0 {
        create_group(&addrs).await.expect("create the chaos group");
    }
    let recorder = Recorder::new();
    let started = recorder.lock().unwrap().started();
    let until = started + config.duration;
    let mut tasks = Vec::new();
    for c in 0..config.clients {
        tasks.push(tokio::spawn(client(addrs.clone(), recorder.clone(), c, config.seed, until)));
    }
    for s in 0..config.subscribers {
        tasks.push(tokio::spawn(subscriber(addrs.clone(), recorder.clone(), s, config.seed, until)));
    }
    for g in 0..config.group_consumers {
        tasks.push(tokio::spawn(group_consumer(addrs.clone(), recorder.clone(), g, config.seed, until, false)));
    }
    (recorder, started, until, tasks)
}

/// After healing and convergence: one consumer acks whatever the group has left until it
/// is settled; its epochs are added to `ops` (and the history file rewritten), so the
/// checker can demand that every event was acked.
pub async fn drain_group(addrs: Addrs, recorder: &Arc<Mutex<Recorder>>, config: &RunConfig, ops: &mut Vec<Op>, dir: &std::path::Path) {
    if config.group_consumers == 0 {
        return;
    }
    group_consumer(addrs, recorder.clone(), config.group_consumers, config.seed, Instant::now(), true).await;
    ops.extend(recorder.lock().unwrap().take_ops());
    write_lines(&dir.join("history.jsonl"), ops);
}

/// Checks a drained run, computes its figures, and writes `report.txt` into `dir`.
pub fn finish(name: &str, seed: u64, ops: &[Op], finals: &BTreeMap<u64, Vec<FinalEvent>>, faults: &[FaultRecord], skipped: Vec<String>, dir: PathBuf) -> Outcome {
    let report = check(ops, finals);
    let figures = Figures::of(ops, faults);
    let outcome = Outcome { report, figures, faults_injected: faults.len(), skipped, dir, tier_floor: None, corrupted_store_reads: 0 };
    let text = format!("{}\n{}{}", outcome.summary(name, seed), outcome.report, outcome.figures);
    std::fs::write(outcome.dir.join("report.txt"), &text).expect("write the report");
    eprintln!("{text}");
    outcome
}

pub fn write_lines<T: serde::Serialize>(path: &std::path::Path, records: &[T]) {
    let mut out = std::io::BufWriter::new(std::fs::File::create(path).expect("create a run file"));
    for record in records {
        write_jsonl(&mut out, record).expect("write a run file");
    }
    out.flush().expect("flush a run file");
}
