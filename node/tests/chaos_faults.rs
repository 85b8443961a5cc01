//! The chaos suite's bounded set (issue 5), run by the README's test command: each named
//! scenario of `tests/chaos` for a short seeded run against a real three-node cluster,
//! checked by its history checker. Any anomaly fails the test and keeps the run's dir
//! (history, fault timeline, node logs, data dirs). `STRATA_CHAOS_SEED` picks the seed;
//! `tests/chaos/run` replays one scenario, longer.

use std::time::Duration;

use strata_chaos::scenario::{self, RunConfig};

/// Seconds of workload and faults per scenario.
const BOUNDED_SECS: u64 = 24;

async fn run(name: &str, subnet: u8) {
    let seed: u64 = std::env::var("STRATA_CHAOS_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or(20_261_124);
    let chosen = scenario::find(name).expect("scenario");
    let config = RunConfig { seed, duration: Duration::from_secs(BOUNDED_SECS), subnet, clients: 4, subscribers: 2, keep: false };
    let outcome = scenario::run(chosen, &config).await;
    eprintln!("{}", outcome.summary(name, seed));
    for line in &outcome.skipped {
        eprintln!("chaos {name}: {line}");
    }
    assert_eq!(outcome.report.anomalies(), 0, "anomalies found; run kept in {}\n{}", outcome.dir.display(), outcome.report);
    assert!(outcome.report.acknowledged_events > 50, "the workload made progress: {}", outcome.report);
    assert!(outcome.faults_injected > 0 || !outcome.skipped.is_empty(), "faults were injected");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn kill_9_of_leader_and_followers_loses_nothing() {
    run("kill", 27).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn pauses_beyond_the_election_timeout_lose_nothing() {
    run("pause", 28).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn partitions_isolated_leader_minority_and_one_way_lose_nothing() {
    run("partition", 29).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn clock_skew_under_libfaketime_loses_nothing() {
    run("clock-skew", 30).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn rolling_restarts_lose_nothing() {
    run("rolling-restart", 31).await;
}
