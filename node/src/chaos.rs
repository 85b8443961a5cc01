//! Fault injection for the cluster manager (`strata cluster chaos …`): kill, pause,
//! resume, start and partition one node of a `strata dev` cluster or of the compose
//! cluster, optionally for a while.
//!
//! - dev: `strata dev` records each node's pid and command line in its data dir
//!   (`node-<id>.pid`, `node-<id>.argv`); kill is SIGKILL, pause/resume SIGSTOP/SIGCONT,
//!   start re-runs the recorded command. A partition is an nftables table (root and `nft`
//!   needed) that drops, on the loopback output path, everything sent to the node's gRPC
//!   and gossip ports, its gossip replies, and everything from its own source address
//!   (`strata dev` gives each node one for its peer connections); healing deletes the table.
//! - compose: `docker kill|start|pause|unpause`, and a partition is `docker network
//!   disconnect` (and `connect` back with the service alias).

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use clap::{Args, ValueEnum};

#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum ChaosAction {
    /// SIGKILL (dev) or `docker kill` (compose); with --for, started again afterwards.
    Kill,
    /// SIGSTOP (dev) or `docker pause`; with --for, resumed afterwards.
    Pause,
    /// SIGCONT (dev) or `docker unpause`.
    Resume,
    /// Start a killed node again.
    Start,
    /// Cut the node off the network; with --for, healed afterwards.
    Partition,
    /// Undo a partition.
    Heal,
}

#[derive(Args, Debug)]
pub struct ChaosArgs {
    pub action: ChaosAction,
    /// Node id (compose: node 1 is container strata-0).
    pub node: u64,
    /// Undo the fault after this many seconds (kill → start, pause → resume, partition → reconnect).
    #[arg(long = "for")]
    pub for_secs: Option<u64>,
    /// Target the compose cluster instead of a `strata dev` cluster.
    #[arg(long)]
    pub compose: bool,
    /// The `strata dev` data directory.
    #[arg(long, default_value = "./strata-data")]
    pub dev_dir: PathBuf,
    /// The compose project name (`strata cluster compose` uses this one).
    #[arg(long, env = "COMPOSE_PROJECT_NAME", default_value = crate::compose::COMPOSE_PROJECT_DEFAULT)]
    pub project: String,
}

/// Starts `command` with stdout and stderr appended to `log`.
pub fn spawn_logged(command: &mut Command, log: &File) -> std::io::Result<Child> {
    command.stdin(Stdio::null()).stdout(log.try_clone()?).stderr(log.try_clone()?).spawn()
}

fn pid_path(dir: &Path, node: u64) -> PathBuf {
    dir.join(format!("node-{node}.pid"))
}

fn argv_path(dir: &Path, node: u64) -> PathBuf {
    dir.join(format!("node-{node}.argv"))
}

/// Records a dev node's pid and command line (NUL-separated argv).
pub fn record_dev_node(dir: &Path, node: u64, pid: u32, command: &Command) -> std::io::Result<()> {
    let mut argv = vec![command.get_program().to_string_lossy().to_string()];
    argv.extend(command.get_args().map(|a| a.to_string_lossy().to_string()));
    std::fs::write(argv_path(dir, node), argv.join("\0"))?;
    std::fs::write(pid_path(dir, node), pid.to_string())
}

/// The recorded pid of a dev node, if that process is still a `strata serve` of `dir`.
fn live_dev_pid(dir: &Path, node: u64) -> Option<i32> {
    let pid: i32 = std::fs::read_to_string(pid_path(dir, node)).ok()?.trim().parse().ok()?;
    // Guard against a recycled pid: the process must be our node.
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
    let cmdline = String::from_utf8_lossy(&cmdline);
    let own_data_dir = dir.join(format!("node-{node}"));
    (cmdline.contains("serve") && cmdline.contains(&*own_data_dir.to_string_lossy())).then_some(pid)
}

fn signal(pid: i32, signal: i32) -> anyhow::Result<()> {
    // SAFETY: kill(2) with a pid we verified belongs to a dev node.
    let rc = unsafe { libc::kill(pid, signal) };
    anyhow::ensure!(rc == 0, "signal {signal} to pid {pid} failed: {}", std::io::Error::last_os_error());
    Ok(())
}

/// Stops dev nodes that are still running from their pid files (SIGTERM, then SIGKILL).
pub fn stop_recorded_dev_nodes(dir: &Path, nodes: u64, grace: Duration) {
    let pids: Vec<i32> = (1..=nodes).filter_map(|node| live_dev_pid(dir, node)).collect();
    for pid in &pids {
        let _ = signal(*pid, libc::SIGTERM);
    }
    let deadline = Instant::now() + grace;
    for pid in pids {
        while Path::new(&format!("/proc/{pid}")).exists() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = signal(pid, libc::SIGKILL);
    }
}

fn dev_start(dir: &Path, node: u64) -> anyhow::Result<()> {
    anyhow::ensure!(live_dev_pid(dir, node).is_none(), "node {node} is running");
    let argv = std::fs::read_to_string(argv_path(dir, node))
        .map_err(|e| anyhow::anyhow!("no recorded command for node {node} in {}: {e} (was it started by `strata dev`?)", dir.display()))?;
    let mut parts = argv.split('\0');
    let mut command = Command::new(parts.next().unwrap_or_default());
    command.args(parts);
    let log = std::fs::OpenOptions::new().create(true).append(true).open(dir.join(format!("node-{node}.log")))?;
    let child = spawn_logged(&mut command, &log)?;
    record_dev_node(dir, node, child.id(), &command)?;
    Ok(())
}

fn dev_fault(dir: &Path, action: ChaosAction, node: u64) -> anyhow::Result<()> {
    let pid = || live_dev_pid(dir, node).ok_or_else(|| anyhow::anyhow!("node {node} of the dev cluster in {} is not running", dir.display()));
    match action {
        ChaosAction::Kill => signal(pid()?, libc::SIGKILL),
        ChaosAction::Pause => signal(pid()?, libc::SIGSTOP),
        ChaosAction::Resume => signal(pid()?, libc::SIGCONT),
        ChaosAction::Start => dev_start(dir, node),
        ChaosAction::Partition => dev_partition(dir, node),
        ChaosAction::Heal => dev_heal_partition(node),
    }
}

/// The value of `--flag` in a dev node's recorded command line.
fn recorded_arg(dir: &Path, node: u64, flag: &str) -> anyhow::Result<String> {
    let argv = std::fs::read_to_string(argv_path(dir, node))
        .map_err(|e| anyhow::anyhow!("no recorded command for node {node} in {}: {e}", dir.display()))?;
    let parts: Vec<&str> = argv.split('\0').collect();
    parts
        .windows(2)
        .find(|pair| pair[0] == flag)
        .map(|pair| pair[1].to_string())
        .ok_or_else(|| anyhow::anyhow!("node {node} was not started with {flag} (restart the dev cluster with this version)"))
}

fn nft_table(node: u64) -> String {
    format!("strata_chaos_node_{node}")
}

fn nft(args: &[&str]) -> anyhow::Result<()> {
    let output = Command::new("nft").args(args).output().map_err(|e| anyhow::anyhow!("cannot run nft (install nftables): {e}"))?;
    anyhow::ensure!(output.status.success(), "nft {}: {}", args.join(" "), String::from_utf8_lossy(&output.stderr).trim());
    Ok(())
}

fn dev_partition(dir: &Path, node: u64) -> anyhow::Result<()> {
    let port = |flag: &str| -> anyhow::Result<String> {
        let addr = recorded_arg(dir, node, flag)?;
        Ok(addr.rsplit_once(':').map(|(_, port)| port.to_string()).unwrap_or(addr))
    };
    let (grpc, gossip) = (port("--grpc-addr")?, port("--gossip-addr")?);
    let source = recorded_arg(dir, node, "--source-ip")?;
    let table = nft_table(node);
    nft(&["add", "table", "inet", &table])?;
    nft(&["add", "chain", "inet", &table, "out", "{ type filter hook output priority 0; policy accept; }"])?;
    for rule in [format!("ip saddr {source} drop"), format!("tcp dport {grpc} drop"), format!("udp dport {gossip} drop"), format!("udp sport {gossip} drop")] {
        let mut args = vec!["add", "rule", "inet", &table, "out"];
        args.extend(rule.split(' '));
        nft(&args)?;
    }
    Ok(())
}

fn dev_heal_partition(node: u64) -> anyhow::Result<()> {
    nft(&["delete", "table", "inet", &nft_table(node)])
}

fn docker(args: &[&str]) -> anyhow::Result<()> {
    let output = Command::new("docker").args(args).output().map_err(|e| anyhow::anyhow!("cannot run docker: {e}"))?;
    anyhow::ensure!(output.status.success(), "docker {}: {}", args.join(" "), String::from_utf8_lossy(&output.stderr).trim());
    Ok(())
}

/// The compose service of the node with this ordinal (`strata-0` is node 1).
pub fn compose_service(ordinal: u64) -> String {
    format!("strata-{ordinal}")
}

/// The container docker-compose 1.29 names for that node's service in `project`.
pub fn compose_container(project: &str, ordinal: u64) -> String {
    service_container(project, &compose_service(ordinal))
}

/// The container docker-compose 1.29 names for (the first replica of) `service` in `project`.
pub fn service_container(project: &str, service: &str) -> String {
    format!("{project}_{service}_1")
}

/// The container's health check status (`healthy`, `starting`, ...; empty if unknown).
pub fn container_health(container: &str) -> String {
    Command::new("docker")
        .args(["inspect", "--format", "{{.State.Health.Status}}", container])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default()
}

fn compose_fault(project: &str, action: ChaosAction, node: u64) -> anyhow::Result<()> {
    anyhow::ensure!(node >= 1, "node ids start at 1");
    let service = compose_service(node - 1);
    let container = compose_container(project, node - 1);
    let network = format!("{project}_default");
    match action {
        ChaosAction::Kill => docker(&["kill", &container]),
        ChaosAction::Start => docker(&["start", &container]),
        ChaosAction::Pause => docker(&["pause", &container]),
        ChaosAction::Resume => docker(&["unpause", &container]),
        ChaosAction::Partition => docker(&["network", "disconnect", &network, &container]),
        ChaosAction::Heal => docker(&["network", "connect", "--alias", &service, &network, &container]),
    }
}

/// The action that undoes `action` after `--for`.
fn undo(action: ChaosAction) -> Option<ChaosAction> {
    match action {
        ChaosAction::Kill => Some(ChaosAction::Start),
        ChaosAction::Pause => Some(ChaosAction::Resume),
        ChaosAction::Partition => Some(ChaosAction::Heal),
        ChaosAction::Resume | ChaosAction::Start | ChaosAction::Heal => None,
    }
}

pub async fn run(args: ChaosArgs, json: bool) -> anyhow::Result<()> {
    let apply = |action: ChaosAction| -> anyhow::Result<()> {
        if args.compose { compose_fault(&args.project, action, args.node) } else { dev_fault(&args.dev_dir, action, args.node) }
    };
    apply(args.action)?;
    let target = if args.compose { format!("compose project {}", args.project) } else { format!("dev cluster {}", args.dev_dir.display()) };
    let report = |event: &str, action: ChaosAction| {
        if json {
            println!("{}", serde_json::json!({"event": event, "action": format!("{action:?}").to_lowercase(), "node": args.node, "target": target}));
        } else {
            println!("chaos: {event} node {} with {action:?} ({target})", args.node);
        }
    };
    report("applied", args.action);
    if let (Some(secs), Some(heal)) = (args.for_secs, undo(args.action)) {
        tokio::time::sleep(Duration::from_secs(secs)).await;
        apply(heal)?;
        report("healed", heal);
    }
    Ok(())
}
