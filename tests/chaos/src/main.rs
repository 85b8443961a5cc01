//! `strata-chaos`: runs one chaos scenario (usually through `tests/chaos/run`).
//!
//! Exits 0 when the checker finds no anomaly, 1 when it finds one (the run's dir, with its
//! history, fault timeline, node logs and data dirs, is kept and named), 2 on bad usage.

use std::time::Duration;

use clap::Parser;
use strata_chaos::scenario::{self, Outcome, RunConfig, SCENARIOS};

#[derive(Parser)]
#[command(about = "Run a chaos scenario against a local three-node Strata cluster and check its history")]
struct Args {
    /// The scenario (see --list).
    #[arg(long, default_value = "mixed")]
    scenario: String,
    /// Seeds the workload and the fault schedule: the same seed replays the same choices.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Seconds of workload and faults.
    #[arg(long, default_value_t = 60)]
    duration: u64,
    /// Writing clients.
    #[arg(long, default_value_t = 4)]
    clients: u32,
    /// Catch-up subscribers to $all.
    #[arg(long, default_value_t = 2)]
    subscribers: u32,
    /// Consumers of the run's persistent group (pinned, over $all).
    #[arg(long, default_value_t = 2)]
    group_consumers: u32,
    /// Nodes listen on 127.0.<subnet>.1..=3.
    #[arg(long, default_value_t = 60)]
    subnet: u8,
    /// Keep the run's dir even when it passes.
    #[arg(long)]
    keep: bool,
    /// List the scenarios and exit.
    #[arg(long)]
    list: bool,
}

#[tokio::main(flavor = "multi_thread", worker_threads = 4)]
async fn main() {
    let args = Args::parse();
    if args.list {
        for s in SCENARIOS {
            println!("{:16} {}", s.name, s.about);
        }
        println!("{:16} the compose cluster (run from the workspace root, image built): docker kill, pause, network disconnect", "compose");
        return;
    }
    let config = RunConfig {
        seed: args.seed,
        duration: Duration::from_secs(args.duration),
        subnet: args.subnet,
        clients: args.clients,
        subscribers: args.subscribers,
        group_consumers: args.group_consumers,
        keep: args.keep,
    };
    if args.scenario == "compose" {
        let workspace = std::env::current_dir().expect("current dir");
        match strata_chaos::compose::run(&workspace, &config).await {
            Some(outcome) => report(&outcome, "compose", args.seed, args.keep),
            None => println!("scenario compose: skipped (no docker)"),
        }
        return;
    }
    let Some(chosen) = scenario::find(&args.scenario) else {
        eprintln!("unknown scenario {:?}; --list shows them", args.scenario);
        std::process::exit(2);
    };
    let outcome = scenario::run(chosen, &config).await;
    report(&outcome, chosen.name, args.seed, args.keep);
}

fn report(outcome: &Outcome, name: &str, seed: u64, keep: bool) {
    println!("{}", outcome.summary(name, seed));
    if outcome.report.anomalies() > 0 {
        println!("ANOMALIES FOUND; history, fault timeline, node logs and data dirs kept in {}", outcome.dir.display());
        std::process::exit(1);
    }
    if keep {
        println!("run kept in {}", outcome.dir.display());
    }
}
