//! The chaos scenario against the docker-compose cluster (`dev-env/docker-compose.yml`,
//! the real image in real containers): the same seeded workload and checker, with the
//! faults injected through the product's own `strata cluster chaos --compose` (which runs
//! `docker kill` / `start`, `docker pause` / `unpause`, `docker network disconnect` /
//! `connect`). The project is torn down at the end; its logs are kept beside the history
//! when the run finds an anomaly.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use strata_proto::v1::streams_client::StreamsClient;

use crate::cluster::{converged_within_via, leader_among_via, read_all_local_at, strata_binary};
use crate::history::{FaultRecord, FinalEvent};
use crate::scenario::{drain_group, finish, start_workload, write_lines, Outcome, RunConfig};
use crate::workload::{Rng, Targets};

/// Host ports the chaos scenario's project publishes: node `n` (1-based) gets `base + n - 1`.
pub const COMPOSE_GRPC_PORT_BASE: u16 = 29711;
pub const COMPOSE_HTTP_PORT_BASE: u16 = 29781;

/// A compose project of three nodes publishing its ports from the given bases; `down -v`
/// on drop (its logs are kept when asked to, or when a test panics).
pub struct ComposeProject {
    pub name: String,
    file: PathBuf,
    grpc_port_base: u16,
    http_port_base: u16,
    pub dir: tempfile::TempDir,
    pub keep: bool,
}

/// Whether docker and docker-compose work here (the scenario says "skipped" otherwise).
pub fn compose_available() -> bool {
    let works = |program: &str, args: &[&str]| Command::new(program).args(args).output().is_ok_and(|o| o.status.success());
    works("docker", &["info"]) && works("docker-compose", &["version"])
}

impl ComposeProject {
    pub fn new(workspace: &Path, name: &str, grpc_port_base: u16, http_port_base: u16) -> Self {
        Self {
            name: name.into(),
            file: workspace.join("dev-env/docker-compose.yml"),
            grpc_port_base,
            http_port_base,
            dir: tempfile::tempdir().expect("temp dir"),
            keep: false,
        }
    }

    /// The variables that move the compose file's published ports to this project's bases.
    pub fn port_env(&self) -> Vec<(String, String)> {
        (0..3u16)
            .flat_map(|ordinal| {
                [
                    (format!("STRATA_{ordinal}_GRPC_PORT"), (self.grpc_port_base + ordinal).to_string()),
                    (format!("STRATA_{ordinal}_HTTP_PORT"), (self.http_port_base + ordinal).to_string()),
                ]
            })
            .collect()
    }

    /// The compose file this project runs.
    pub fn file(&self) -> &Path {
        &self.file
    }

    /// `docker-compose -f dev-env/docker-compose.yml -p <name> <args>` with the port bases.
    pub fn compose(&self, args: &[&str]) -> std::process::Output {
        let mut command = Command::new("docker-compose");
        command.arg("-f").arg(&self.file).args(["-p", &self.name]).args(args).envs(self.port_env());
        command.output().expect("run docker-compose")
    }

    /// The harness's TLS for this TLS-on cluster: the CA and the node certificate copied
    /// out of the one-shot `certs` service's container (docker-compose 1.29 names it
    /// `<project>_certs_1`) into the run's dir. The harness is the cluster's own operator,
    /// admin through the node certificate, as a pod's preStop hook is.
    pub fn node_tls(&self) -> strata_security::ClientTls {
        let certs = self.dir.path().join("certs");
        std::fs::create_dir_all(&certs).expect("certs dir");
        let copied = Command::new("docker")
            .args(["cp", &format!("{}_certs_1:/certs/.", self.name)])
            .arg(&certs)
            .output()
            .expect("run docker cp");
        assert!(copied.status.success(), "docker cp of the certs volume: {}", String::from_utf8_lossy(&copied.stderr));
        let files = strata_security::TlsFiles { cert: certs.join("node.pem"), key: certs.join("node.key"), ca: certs.join("ca.pem") };
        strata_security::NodeTls::load(files, strata_security::NODE_NAME_DEFAULT)
            .and_then(strata_security::ClientTls::for_node)
            .expect("the compose cluster's node certificate loads")
    }

    /// The host address of node `node` (1-based: node 1 is container strata-0).
    pub fn addr(&self, node: u64) -> String {
        format!("127.0.0.1:{}", self.grpc_port_base + node as u16 - 1)
    }

    /// (id, host address) of the three nodes.
    pub fn nodes(&self) -> Vec<(u64, String)> {
        (1..=3).map(|node| (node, self.addr(node))).collect()
    }

    /// `strata cluster chaos <action> <node> --compose --project <name>`.
    fn chaos(&self, action: &str, node: u64) -> Result<(), String> {
        let output = Command::new(strata_binary())
            .args(["cluster", "chaos", action, &node.to_string(), "--compose", "--project", &self.name])
            .output()
            .map_err(|e| e.to_string())?;
        if output.status.success() { Ok(()) } else { Err(String::from_utf8_lossy(&output.stderr).trim().to_string()) }
    }
}

impl Drop for ComposeProject {
    fn drop(&mut self) {
        if self.keep || std::thread::panicking() {
            let logs = self.compose(&["logs", "--no-color"]);
            let _ = std::fs::write(self.dir.path().join("compose.log"), &logs.stdout);
            let kept = self.dir.path().to_path_buf();
            eprintln!("compose run kept in {} (compose.log, history.jsonl, faults.jsonl)", kept.display());
            std::mem::forget(std::mem::replace(&mut self.dir, tempfile::tempdir().expect("temp dir")));
        }
        let _ = self.compose(&["down", "-v", "--timeout", "5"]);
    }
}

async fn read_all_local(addr: &str, tls: &strata_security::ClientTls) -> Vec<FinalEvent> {
    let endpoint = tonic::transport::Endpoint::from_shared(format!("http://{addr}")).expect("endpoint");
    let channel = strata_security::connect(endpoint.connect_timeout(Duration::from_secs(2)), Some(tls)).await.expect("node reachable after healing");
    let events = read_all_local_at(StreamsClient::new(channel).max_decoding_message_size(64 * 1024 * 1024)).await;
    events.into_iter().map(FinalEvent::from).collect()
}

/// Runs the compose scenario; `None` (after a visible "skipped" line) where docker or
/// docker-compose is missing. The image must be built (`scripts/build-image`).
pub async fn run(workspace: &Path, config: &RunConfig) -> Option<Outcome> {
    if !compose_available() {
        eprintln!("chaos compose: skipped: docker or docker-compose is not available");
        return None;
    }
    let mut project = ComposeProject::new(workspace, &format!("strata-chaos-{}", config.subnet), COMPOSE_GRPC_PORT_BASE, COMPOSE_HTTP_PORT_BASE);
    let _ = project.compose(&["down", "-v", "--timeout", "1"]);
    let up = project.compose(&["up", "-d"]);
    assert!(up.status.success(), "docker-compose up: {}", String::from_utf8_lossy(&up.stderr));
    let tls = project.node_tls();
    leader_among_via(&project.nodes(), Duration::from_secs(60), Some(&tls)).await.expect("the compose cluster elects a leader");
    eprintln!("chaos: compose project {} up (TLS on)", project.name);

    let addrs = Targets::new(project.nodes().into_iter().map(|(_, addr)| addr).collect(), Some(tls.clone()));
    let (recorder, started, until, tasks) = start_workload(addrs.clone(), config).await;
    let mut rng = Rng::new(config.seed, 8_888);
    let mut faults: Vec<FaultRecord> = Vec::new();
    tokio::time::sleep(Duration::from_secs(3)).await;
    while Instant::now() + Duration::from_secs(3) < until {
        let leader = leader_among_via(&project.nodes(), Duration::from_secs(10), Some(&tls)).await.unwrap_or(1);
        let follower = (1..=3).filter(|n| *n != leader).nth(rng.below(2) as usize).expect("two followers");
        let (action, undo, hold) = match rng.below(3) {
            0 => ("kill", "start", rng.millis(1_000, 4_000)),
            1 => ("pause", "resume", rng.millis(2_000, 5_000)),
            _ => ("partition", "heal", rng.millis(2_000, 5_000)),
        };
        let node = if rng.below(3) == 0 { follower } else { leader };
        if let Err(e) = project.chaos(action, node) {
            panic!("strata cluster chaos {action} {node} --compose: {e}");
        }
        // The fault is in place once docker has returned (that takes a few hundred ms).
        let start_ms = started.elapsed().as_millis() as u64;
        tokio::time::sleep(hold).await;
        project.chaos(undo, node).unwrap_or_else(|e| panic!("strata cluster chaos {undo} {node} --compose: {e}"));
        let record = FaultRecord {
            kind: format!("compose_{action}_{}", if node == leader { "leader" } else { "follower" }),
            detail: format!("strata cluster chaos {action} {node} --compose, undone after {} ms", hold.as_millis()),
            leader_loss: node == leader,
            start_ms,
            end_ms: started.elapsed().as_millis() as u64,
        };
        eprintln!("chaos fault: {} [{} .. {} ms] {}", record.kind, record.start_ms, record.end_ms, record.detail);
        faults.push(record);
        tokio::time::sleep(rng.millis(1_500, 3_500)).await;
    }
    for task in tasks {
        task.await.expect("workload task");
    }
    let mut ops = recorder.lock().unwrap().take_ops();
    let dir = project.dir.path().to_path_buf();
    write_lines(&dir.join("history.jsonl"), &ops);
    write_lines(&dir.join("faults.jsonl"), &faults);

    // Drain: every node answers and has applied as much as the most advanced one.
    if let Err(applied) = converged_within_via(&project.nodes(), Duration::from_secs(90), Some(&tls)).await {
        panic!("the compose nodes did not converge: {applied:?}");
    }
    drain_group(addrs, &recorder, config, &mut ops, &dir).await;
    let mut finals = BTreeMap::new();
    for (node, addr) in project.nodes() {
        finals.insert(node, read_all_local(&addr, &tls).await);
    }
    let outcome = finish("compose", config.seed, &ops, &finals, &faults, Vec::new(), dir);
    project.keep = outcome.report.anomalies() > 0 || config.keep;
    Some(outcome)
}
