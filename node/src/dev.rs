//! `strata dev`: a local cluster of N `strata serve` processes on 127.0.0.1 in one command.
//! Starts them, waits for a leader, prints each node's endpoints and commands to try, and
//! stops them all cleanly on Ctrl-C or SIGTERM (SIGTERM to each node, then SIGKILL after a
//! grace period).

use std::path::PathBuf;
use std::process::{Child, Command};
use std::time::{Duration, Instant};

use clap::Args;
use strata_proto::v1::cluster_client::ClusterClient;
use strata_proto::v1::StatusRequest;

/// How long `strata dev` waits for a leader before reporting failure.
const LEADER_WAIT_SECS: u64 = 60;
/// How long a node gets to stop after SIGTERM before it is killed.
const STOP_GRACE_SECS: u64 = 10;
/// Node i's connections to other nodes start from 127.0.0.(base + i).
const DEV_SOURCE_IP_BASE: u16 = 10;
/// Most nodes `strata dev` starts: it is a laptop cluster.
const DEV_NODES_MAX: u16 = 9;
/// The first admin's password in a dev cluster: the only default password, and only
/// under `--insecure` on loopback (a `serve` without `--admin-password-file` has none).
pub const DEV_ADMIN_PASSWORD: &str = "changeit";

#[derive(Args, Debug)]
pub struct DevArgs {
    /// Number of nodes.
    #[arg(long, default_value_t = 3)]
    pub nodes: u16,
    /// Directory for every node's data and log.
    #[arg(long, default_value = "./strata-data")]
    pub data_dir: PathBuf,
    /// Node i listens on gRPC base+i, HTTP base+80+i and gossip (UDP) base+90+i.
    #[arg(long, default_value_t = 7700)]
    pub base_port: u16,
    /// Object store for tiered history, shared by every node (default: a `tier` directory
    /// in --data-dir, as `file:///…`).
    #[arg(long)]
    pub object_store: Option<String>,
    /// Passed to every node: the hot window by count (see `strata serve --help`).
    #[arg(long)]
    pub hot_window_events: Option<u64>,
}

/// The dev cluster's gossip secret: random, made once per data dir and kept there (0600),
/// so a restarted dev cluster keeps talking to itself.
fn dev_secret(data_dir: &std::path::Path) -> anyhow::Result<PathBuf> {
    use std::hash::{BuildHasher, RandomState};
    use std::io::Write as _;
    use std::os::unix::fs::OpenOptionsExt as _;
    let path = data_dir.join("cluster-secret");
    if !path.exists() {
        let secret: String = (0..4).map(|i| format!("{:016x}", RandomState::new().hash_one(i))).collect();
        let mut file = std::fs::OpenOptions::new().write(true).create_new(true).mode(0o600).open(&path)?;
        file.write_all(secret.as_bytes())?;
    }
    Ok(path)
}

struct DevNode {
    id: u16,
    grpc: String,
    http: String,
    log: PathBuf,
    child: Child,
}

pub async fn run(args: DevArgs) -> anyhow::Result<()> {
    anyhow::ensure!((1..=DEV_NODES_MAX).contains(&args.nodes), "--nodes must be 1..={DEV_NODES_MAX}");
    let exe = std::env::current_exe()?;
    std::fs::create_dir_all(&args.data_dir)?;
    let data_dir = std::fs::canonicalize(&args.data_dir)?;
    let grpc_of = |i: u16| format!("127.0.0.1:{}", args.base_port + i);
    let gossip_of = |i: u16| format!("127.0.0.1:{}", args.base_port + 90 + i);
    // The nodes find each other through gossip, like a real deployment: every node seeds
    // from node 1, and they form once all of them see each other.
    let seeds = gossip_of(1);
    let secret_file = dev_secret(&data_dir)?;
    let object_store = args.object_store.clone().unwrap_or_else(|| format!("file://{}", data_dir.join("tier").display()));
    let mut nodes = Vec::new();
    for i in 1..=args.nodes {
        let log = data_dir.join(format!("node-{i}.log"));
        let log_file = std::fs::OpenOptions::new().create(true).append(true).open(&log)?;
        let http = format!("127.0.0.1:{}", args.base_port + 80 + i);
        let mut command = Command::new(&exe);
        command
            .arg("serve")
            .args(["--node-id", &i.to_string()])
            .arg("--data-dir")
            .arg(data_dir.join(format!("node-{i}")))
            .args(["--grpc-addr", &grpc_of(i), "--http-addr", &http, "--gossip-addr", &gossip_of(i)])
            .args(["--seeds", &seeds, "--initial-cluster-size", &args.nodes.to_string()])
            // Its own source address for peer traffic: what a chaos partition cuts.
            .args(["--source-ip", &format!("127.0.0.{}", DEV_SOURCE_IP_BASE + i)])
            .arg("--cluster-secret-file")
            .arg(&secret_file)
            .args(["--object-store", &object_store])
            // A laptop cluster on loopback, no certificates to make first; said out loud below.
            .arg("--insecure")
            // The one default password there is: dev mode only, printed below.
            .env("STRATA_ADMIN_PASSWORD", DEV_ADMIN_PASSWORD);
        if let Some(events) = args.hot_window_events {
            command.args(["--hot-window-events", &events.to_string()]);
        }
        let child = crate::chaos::spawn_logged(&mut command, &log_file)?;
        // What `strata cluster chaos` needs to find, signal and restart this node.
        crate::chaos::record_dev_node(&data_dir, i as u64, child.id(), &command)?;
        nodes.push(DevNode { id: i, grpc: grpc_of(i), http, log, child });
    }
    println!("strata dev: {} nodes on 127.0.0.1, data in {}, tier {object_store}", args.nodes, data_dir.display());
    println!("WARNING: strata dev runs the nodes with --insecure: plaintext gRPC, no TLS, and calls without a token act as admin (user `admin`, password `{DEV_ADMIN_PASSWORD}`, for trying `strata login`). For development on this machine only; `strata cert` makes certificates for a real cluster.");
    for node in &nodes {
        println!("  node {}  grpc {}  http http://{}/metrics  log {}", node.id, node.grpc, node.http, node.log.display());
    }
    let leader = tokio::select! {
        leader = wait_for_leader(&nodes) => leader,
        _ = stop_requested() => None,
    };
    match leader {
        Some((leader, term)) => {
            let client = exe.display();
            let endpoints: Vec<&str> = nodes.iter().map(|n| n.grpc.as_str()).collect();
            println!("leader: node {leader} (term {term})");
            println!("try:");
            println!("  {client} append orders-1 --type OrderPlaced --data '{{\"amount\":42}}'");
            println!("  {client} read orders-1");
            println!("  {client} cluster status --endpoints {}", endpoints.join(","));
            println!("  {client} cluster tier     (tier history to the object store now)");
            println!("Ctrl-C stops the cluster.");
            stop_requested().await;
        }
        None => eprintln!("no leader within {LEADER_WAIT_SECS} s (or interrupted); see the node logs"),
    }
    println!("stopping {} nodes", nodes.len());
    stop_all(&mut nodes);
    // Nodes `strata cluster chaos` restarted are not our children: stop them by pid file.
    crate::chaos::stop_recorded_dev_nodes(&data_dir, nodes.len() as u64, Duration::from_secs(STOP_GRACE_SECS));
    Ok(())
}

/// Ctrl-C or SIGTERM: either stops the whole dev cluster cleanly.
async fn stop_requested() {
    match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(mut terminate) => {
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = terminate.recv() => {}
            }
        }
        Err(_) => {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}

async fn wait_for_leader(nodes: &[DevNode]) -> Option<(u64, u64)> {
    let deadline = Instant::now() + Duration::from_secs(LEADER_WAIT_SECS);
    while Instant::now() < deadline {
        for node in nodes {
            let Ok(channel) = tonic::transport::Endpoint::from_shared(format!("http://{}", node.grpc)) else { continue };
            let Ok(channel) = channel.connect_timeout(Duration::from_millis(500)).connect().await else { continue };
            if let Ok(status) = ClusterClient::new(channel).status(StatusRequest { local_only: true }).await {
                let status = status.into_inner();
                if status.leader_id != 0 {
                    return Some((status.leader_id, status.term));
                }
            }
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    None
}

fn stop_all(nodes: &mut [DevNode]) {
    for node in nodes.iter() {
        // SAFETY: signalling a child process we spawned and have not reaped.
        unsafe { libc::kill(node.child.id() as libc::pid_t, libc::SIGTERM) };
    }
    let deadline = Instant::now() + Duration::from_secs(STOP_GRACE_SECS);
    for node in nodes.iter_mut() {
        loop {
            match node.child.try_wait() {
                Ok(Some(_)) | Err(_) => break,
                Ok(None) if Instant::now() >= deadline => {
                    let _ = node.child.kill();
                    let _ = node.child.wait();
                    break;
                }
                Ok(None) => std::thread::sleep(Duration::from_millis(50)),
            }
        }
    }
}
