//! A real cluster of `strata serve` processes, for the integration tests and the chaos
//! runner.
//!
//! Each test passes its own `subnet` so nodes listen on 127.0.<subnet>.<id> and dial out
//! from that same address (`--source-ip`): tests run in parallel without port clashes, and
//! a partition can name node-to-node traffic by address pair. Nodes log to files in the
//! cluster's temp dir; a failing test prints where and keeps it.
//!
//! The `strata` binary is `$STRATA_BIN`, else the one built beside the running executable
//! (`target/<profile>/strata` for a test in `target/<profile>/deps/`).

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use strata_proto::v1::cluster_client::ClusterClient;
use strata_proto::v1::streams_client::StreamsClient;
use strata_proto::v1::{
    AppendRequest, AppendResponse, Consistency, ExpectedVersionKind, ProposedEvent, ReadAllRequest, RecordedEvent,
    StatusRequest, StatusResponse,
};
use tonic::transport::Channel;

pub const GRPC_PORT: u16 = 17701;
pub const HTTP_PORT: u16 = 17781;
pub const GOSSIP_PORT: u16 = 17791;
pub const TEST_CLUSTER_SECRET: &str = "integration-test-secret";

/// How the nodes find each other.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Formation {
    /// `--peers` with every node's address.
    Static,
    /// Gossip: nodes seed from nodes 1 and 2; the first `initial_size` found the cluster.
    Gossip { initial_size: u64 },
}

/// The `strata` binary the harness starts.
pub fn strata_binary() -> PathBuf {
    if let Some(path) = std::env::var_os("STRATA_BIN") {
        return PathBuf::from(path);
    }
    let exe = std::env::current_exe().expect("current executable");
    let mut dir = exe.parent().expect("executable's directory").to_path_buf();
    if dir.file_name().is_some_and(|name| name == "deps") {
        dir.pop();
    }
    let binary = dir.join("strata");
    assert!(binary.exists(), "no strata binary at {} (build it, or set STRATA_BIN)", binary.display());
    binary
}

/// How one node is started, kept so that a restart starts it the same way.
#[derive(Clone, Debug, Default)]
pub struct NodeLaunch {
    /// Extra `strata serve` arguments.
    pub args: Vec<String>,
    /// Extra environment (e.g. `LD_PRELOAD` and `FAKETIME` for a skewed clock).
    pub env: Vec<(String, String)>,
}

pub struct TestCluster {
    pub subnet: u8,
    /// Highest node id started so far (ids are 1..=size).
    pub size: u64,
    pub formation: Formation,
    pub dir: tempfile::TempDir,
    /// Keep the temp dir (logs, data, history) even when the run passes.
    pub keep: bool,
    children: Vec<Option<Child>>,
    launches: Vec<NodeLaunch>,
    /// How the test talks to the nodes when they serve TLS (None: plaintext).
    pub client_tls: Option<strata_security::ClientTls>,
}

impl TestCluster {
    /// Starts `size` nodes with static `--peers` and waits for a leader.
    pub async fn start(subnet: u8, size: u64) -> Self {
        let mut cluster = Self::new(subnet, Formation::Static);
        // The static peer list names every node from the start.
        cluster.size = size;
        for id in 1..=size {
            cluster.spawn(id);
        }
        cluster.wait_leader(Duration::from_secs(30)).await;
        cluster
    }

    /// Starts `size` nodes with static `--peers`, each with `extra` serve arguments, and
    /// waits for a leader.
    pub async fn start_with(subnet: u8, size: u64, extra: &[&str]) -> Self {
        let mut cluster = Self::new(subnet, Formation::Static);
        cluster.size = size;
        for id in 1..=size {
            cluster.spawn_with(id, extra);
        }
        cluster.wait_leader(Duration::from_secs(30)).await;
        cluster
    }

    /// Starts nodes 1..=3 forming through gossip (each with `extra` serve arguments) and
    /// waits until they are one cluster of three voters; returns it and its leader.
    pub async fn start_gossip(subnet: u8, extra: &[&str]) -> (Self, u64) {
        let mut cluster = Self::new(subnet, Formation::Gossip { initial_size: 3 });
        for id in 1..=3 {
            cluster.spawn_with(id, extra);
        }
        let leader = cluster.wait_leader(Duration::from_secs(30)).await;
        wait_voters(&cluster, &[1, 2, 3], Duration::from_secs(30)).await;
        (cluster, leader)
    }

    /// A cluster with no node started yet.
    pub fn new(subnet: u8, formation: Formation) -> Self {
        Self { subnet, size: 0, formation, dir: tempfile::tempdir().expect("temp dir"), keep: false, children: Vec::new(), launches: Vec::new(), client_tls: None }
    }

    /// Ids of the nodes running now.
    pub fn running(&self) -> Vec<u64> {
        self.children.iter().enumerate().filter(|(_, child)| child.is_some()).map(|(i, _)| i as u64 + 1).collect()
    }

    pub fn gossip_addr(&self, id: u64) -> String {
        format!("127.0.{}.{}:{}", self.subnet, id, GOSSIP_PORT)
    }

    pub fn http_addr(&self, id: u64) -> String {
        format!("127.0.{}.{}:{}", self.subnet, id, HTTP_PORT)
    }

    pub fn addr(&self, id: u64) -> String {
        format!("127.0.{}.{}:{}", self.subnet, id, GRPC_PORT)
    }

    /// The address node `id` listens on and dials from.
    pub fn ip(&self, id: u64) -> String {
        format!("127.0.{}.{}", self.subnet, id)
    }

    /// The pid of a running node.
    pub fn pid(&self, id: u64) -> Option<u32> {
        self.children.get((id - 1) as usize)?.as_ref().map(Child::id)
    }

    pub fn data_dir(&self, id: u64) -> PathBuf {
        self.dir.path().join(format!("node-{id}"))
    }

    pub fn log_path(&self, id: u64) -> PathBuf {
        self.dir.path().join(format!("node-{id}.log"))
    }

    /// Starts node `id` (again, with its data dir and its last launch, if it ran before).
    pub fn spawn(&mut self, id: u64) {
        let launch = self.launches.get((id - 1) as usize).cloned().unwrap_or_default();
        self.spawn_launch(id, launch);
    }

    /// How node `id` was last started.
    pub fn launch(&self, id: u64) -> NodeLaunch {
        self.launches.get((id - 1) as usize).cloned().unwrap_or_default()
    }

    /// Starts node `id` with extra `strata serve` arguments.
    pub fn spawn_with(&mut self, id: u64, extra: &[&str]) {
        self.spawn_launch(id, NodeLaunch { args: extra.iter().map(|a| a.to_string()).collect(), env: Vec::new() });
    }

    /// Starts node `id` as `launch` says; later restarts reuse it.
    pub fn spawn_launch(&mut self, id: u64, launch: NodeLaunch) {
        while self.children.len() < id as usize {
            self.children.push(None);
            self.launches.push(NodeLaunch::default());
        }
        self.launches[(id - 1) as usize] = launch.clone();
        let extra: Vec<&str> = launch.args.iter().map(String::as_str).collect();
        self.size = self.size.max(id);
        let log = std::fs::OpenOptions::new().create(true).append(true).open(self.log_path(id)).expect("log file");
        let mut command = Command::new(strata_binary());
        command
            .arg("serve")
            .args(["--node-id", &id.to_string()])
            .arg("--data-dir")
            .arg(self.data_dir(id))
            .args(["--grpc-addr", &self.addr(id)])
            .args(["--http-addr", &self.http_addr(id)])
            .args(["--gossip-addr", &self.gossip_addr(id)])
            .args(["--source-ip", &self.ip(id)]);
        // Plaintext unless the test gives the node its certificates.
        if !extra.contains(&"--tls-cert") {
            command.arg("--insecure");
        }
        match self.formation {
            Formation::Static => {
                let peers: Vec<String> = (1..=self.size).map(|i| format!("{i}={}", self.addr(i))).collect();
                command.args(["--peers", &peers.join(",")]);
            }
            Formation::Gossip { initial_size } => {
                command
                    .args(["--seeds", &format!("{},{}", self.gossip_addr(1), self.gossip_addr(2))])
                    .args(["--initial-cluster-size", &initial_size.to_string()]);
                if !extra.contains(&"--cluster-secret") {
                    command.args(["--cluster-secret", TEST_CLUSTER_SECRET]);
                }
            }
        }
        let child = command
            .args(&extra)
            .envs(launch.env.iter().map(|(k, v)| (k, v)))
            .env("STRATA_LOG", "info,openraft=warn")
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log file"))
            .stderr(log)
            .spawn()
            .expect("spawn strata serve");
        self.children[(id - 1) as usize] = Some(child);
    }

    /// SIGTERM a node and wait (at most 20 s) for it to exit.
    pub fn terminate(&mut self, id: u64) {
        if let Some(mut child) = self.children[(id - 1) as usize].take() {
            // SAFETY: signalling a child process we spawned and have not reaped.
            unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
            let deadline = Instant::now() + Duration::from_secs(20);
            while Instant::now() < deadline {
                if child.try_wait().expect("wait").is_some() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            child.kill().expect("kill -9 after the grace period");
            child.wait().expect("reap");
        }
    }

    /// SIGSTOP (`pause = true`) or SIGCONT a running node.
    pub fn signal_pause(&self, id: u64, pause: bool) {
        if let Some(child) = self.children[(id - 1) as usize].as_ref() {
            // SAFETY: signalling a child process we spawned and have not reaped.
            unsafe { libc::kill(child.id() as i32, if pause { libc::SIGSTOP } else { libc::SIGCONT }) };
        }
    }

    /// `kill -9` a node.
    pub fn kill(&mut self, id: u64) {
        if let Some(mut child) = self.children[(id - 1) as usize].take() {
            child.kill().expect("kill -9");
            child.wait().expect("reap");
        }
    }

    pub fn wipe(&self, id: u64) {
        let _ = std::fs::remove_dir_all(self.data_dir(id));
    }

    pub async fn channel(&self, id: u64) -> Channel {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let endpoint = tonic::transport::Endpoint::from_shared(format!("http://{}", self.addr(id))).expect("endpoint");
            match strata_security::connect(endpoint.connect_timeout(Duration::from_millis(300)), self.client_tls.as_ref()).await {
                Ok(channel) => return channel,
                Err(e) if Instant::now() > deadline => panic!("node {id} unreachable: {e}; log {}", self.log_path(id).display()),
                Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
            }
        }
    }

    pub async fn streams(&self, id: u64) -> StreamsClient<Channel> {
        StreamsClient::new(self.channel(id).await).max_decoding_message_size(64 * 1024 * 1024)
    }

    pub async fn status(&self, id: u64) -> Option<StatusResponse> {
        status_via(&self.addr(id), self.client_tls.as_ref()).await
    }

    /// Waits until a live node reports itself leader; returns its id.
    pub async fn wait_leader(&self, timeout: Duration) -> u64 {
        match self.leader_within(timeout).await {
            Some(id) => id,
            None => panic!("no leader within {timeout:?}; logs in {}", self.dir.path().display()),
        }
    }

    /// The live node that reports itself leader, if one does within `timeout`.
    pub async fn leader_within(&self, timeout: Duration) -> Option<u64> {
        leader_among_via(&self.running_addrs(), timeout, self.client_tls.as_ref()).await
    }

    /// (id, gRPC address) of every running node.
    fn running_addrs(&self) -> Vec<(u64, String)> {
        self.running().into_iter().map(|id| (id, self.addr(id))).collect()
    }

    /// Waits until every live node has applied as much as the most advanced one (call it
    /// once writes have stopped). Not "as much as the leader": a restarted old leader
    /// reports itself leader of its old term for a moment, from its persisted vote, and
    /// its stale applied index must not be taken as the target.
    pub async fn wait_converged(&self, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        self.wait_leader(timeout).await;
        if let Err(applied) = converged_within_via(&self.running_addrs(), deadline.saturating_duration_since(Instant::now()), self.client_tls.as_ref()).await {
            panic!("nodes did not converge ({applied:?}); logs in {}", self.dir.path().display());
        }
    }

    /// Every event of `$all` as node `id` has applied it (local consistency).
    pub async fn read_all_local(&self, id: u64) -> Vec<RecordedEvent> {
        read_all_local_at(self.streams(id).await).await
    }
}

/// The id of the node among `nodes` (id, gRPC address) that reports itself leader, if one
/// does within `timeout`.
pub async fn leader_among(nodes: &[(u64, String)], timeout: Duration) -> Option<u64> {
    leader_among_via(nodes, timeout, None).await
}

/// [`leader_among`], over TLS when `tls` is set.
pub async fn leader_among_via(nodes: &[(u64, String)], timeout: Duration, tls: Option<&strata_security::ClientTls>) -> Option<u64> {
    let deadline = Instant::now() + timeout;
    loop {
        for (id, addr) in nodes {
            if status_via(addr, tls).await.is_some_and(|status| status.role == "leader") {
                return Some(*id);
            }
        }
        if Instant::now() >= deadline {
            return None;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Waits until every node of `nodes` answers and has applied as much as the most advanced
/// one; on timeout, the applied indexes last seen.
pub async fn converged_within(nodes: &[(u64, String)], timeout: Duration) -> Result<(), Vec<Option<u64>>> {
    converged_within_via(nodes, timeout, None).await
}

/// [`converged_within`], over TLS when `tls` is set.
pub async fn converged_within_via(
    nodes: &[(u64, String)],
    timeout: Duration,
    tls: Option<&strata_security::ClientTls>,
) -> Result<(), Vec<Option<u64>>> {
    let deadline = Instant::now() + timeout;
    loop {
        let mut applied = Vec::new();
        for (_, addr) in nodes {
            applied.push(status_via(addr, tls).await.map(|s| s.applied_index));
        }
        let target = applied.iter().flatten().max().copied().unwrap_or(0);
        if applied.iter().all(|a| *a == Some(target)) {
            return Ok(());
        }
        if Instant::now() >= deadline {
            return Err(applied);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The node at `addr`'s own status (`None` when it does not answer within a second).
pub async fn status_at(addr: &str) -> Option<StatusResponse> {
    status_via(addr, None).await
}

/// [`status_at`], over TLS when `tls` is set.
pub async fn status_via(addr: &str, tls: Option<&strata_security::ClientTls>) -> Option<StatusResponse> {
    let endpoint = tonic::transport::Endpoint::from_shared(format!("http://{addr}")).ok()?;
    let channel = strata_security::connect(endpoint.connect_timeout(Duration::from_millis(300)), tls).await.ok()?;
    let mut request = tonic::Request::new(StatusRequest { local_only: true });
    request.set_timeout(Duration::from_millis(500));
    ClusterClient::new(channel).status(request).await.ok().map(|r| r.into_inner())
}

/// Every event of `$all` as that node has applied it (local consistency).
pub async fn read_all_local_at(mut client: StreamsClient<Channel>) -> Vec<RecordedEvent> {
    let request = ReadAllRequest { consistency: Consistency::Local as i32, ..Default::default() };
    let mut stream = client.read_all(request).await.expect("read $all").into_inner();
    let mut events = Vec::new();
    while let Some(message) = stream.message().await.expect("read $all page") {
        events.extend(message.events);
    }
    events
}

impl Drop for TestCluster {
    fn drop(&mut self) {
        for child in self.children.iter_mut().flatten() {
            let _ = child.kill();
            let _ = child.wait();
        }
        if std::thread::panicking() || self.keep {
            let kept = self.dir.path().to_path_buf();
            eprintln!("node logs and data kept in {}", kept.display());
            std::mem::forget(std::mem::replace(&mut self.dir, tempfile::tempdir().expect("temp dir")));
        }
    }
}

pub fn event(id: &str, event_type: &str, data: &str) -> ProposedEvent {
    ProposedEvent {
        id: id.to_string(),
        r#type: event_type.to_string(),
        data: data.as_bytes().to_vec().into(),
        metadata: Default::default(),
        content_type: "application/json".into(),
    }
}

pub fn append_request(stream: &str, kind: ExpectedVersionKind, version: u64, events: Vec<ProposedEvent>) -> AppendRequest {
    AppendRequest { stream: stream.into(), expected_kind: kind as i32, expected_version: version, events }
}

/// Appends, retrying with the same request (same event ids) while the outcome is
/// unavailable or unknown, as a client of SPEC §4 must. Definite failures are returned.
pub async fn append_retrying(cluster: &TestCluster, request: AppendRequest, deadline: Duration) -> Result<AppendResponse, tonic::Status> {
    let until = Instant::now() + deadline;
    let mut node = 1u64;
    loop {
        let mut client = match tokio::time::timeout(Duration::from_secs(2), cluster.streams(node)).await {
            Ok(client) => client,
            Err(_) => {
                node = node % cluster.size + 1;
                continue;
            }
        };
        let mut call = tonic::Request::new(request.clone());
        call.set_timeout(Duration::from_secs(5));
        match client.append(call).await {
            Ok(response) => return Ok(response.into_inner()),
            Err(status)
                if matches!(status.code(), tonic::Code::Unavailable | tonic::Code::DeadlineExceeded | tonic::Code::Unknown | tonic::Code::Cancelled)
                    && Instant::now() < until =>
            {
                node = node % cluster.size + 1;
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(status) => return Err(status),
        }
    }
}

/// The membership as the leader reports it: (voters, learners).
pub async fn members(cluster: &TestCluster, via: u64) -> Option<(Vec<u64>, Vec<u64>)> {
    let mut request = tonic::Request::new(strata_proto::v1::MembersRequest {});
    request.set_timeout(Duration::from_secs(3));
    let reply = ClusterClient::new(cluster.channel(via).await).members(request).await.ok()?.into_inner();
    let pick = |kind: &str| reply.members.iter().filter(|m| m.membership == kind).map(|m| m.id).collect();
    Some((pick("voter"), pick("learner")))
}

/// Waits until the leader reports exactly these voters and no learner.
pub async fn wait_voters(cluster: &TestCluster, voters: &[u64], timeout: Duration) {
    let deadline = Instant::now() + timeout;
    loop {
        let via = cluster.running()[0];
        let seen = members(cluster, via).await;
        if seen.as_ref().is_some_and(|(v, l)| v == voters && l.is_empty()) {
            return;
        }
        assert!(Instant::now() < deadline, "voters {voters:?} not reached, last seen {seen:?}; logs in {}", cluster.dir.path().display());
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// The value of one Prometheus sample whose line starts with `prefix` (0 when absent).
pub fn metric_value(body: &str, name: &str, label: &str) -> u64 {
    body.lines()
        .filter(|line| line.starts_with(name) && line.contains(label))
        .filter_map(|line| line.rsplit(' ').next()?.parse::<f64>().ok())
        .map(|v| v as u64)
        .sum()
}
