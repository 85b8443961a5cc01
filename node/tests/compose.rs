//! The compose tier (issue 4 §8, issue 8 §1): the real image, three real containers from
//! dev-env/docker-compose.yml, with TLS on. `strata cluster compose up` starts it (its
//! one-shot `certs` service makes the CA, the node certificate and the secrets), copies
//! the CA and the admin password out and logs in: `strata whoami` through its env file
//! says admin, and a plaintext client gets nowhere. Then 1,000 events through one node,
//! `docker kill` of the leader, 1,000 more through another, the killed node back, and
//! every node ends with the same 2,000 events in the same order. Only this test's compose
//! project is torn down.
//!
//! Skipped, with a visible line, where docker or docker-compose is missing.

use std::path::PathBuf;
use std::process::Command;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use strata_chaos::cluster::{read_all_local_at, status_at, status_via, strata_binary};
use strata_chaos::compose::{compose_available, ComposeProject};
use strata_node::chaos::{compose_container, container_health};
use strata_proto::v1::streams_client::StreamsClient;
use strata_proto::v1::{AppendRequest, ExpectedVersionKind, ProposedEvent, RecordedEvent, StatusResponse};
use strata_security::ClientTls;
use tonic::transport::Channel;

const GRPC_PORT_BASE: u16 = 27711;
const HTTP_PORT_BASE: u16 = 27781;

/// The harness's TLS (the node certificate from the project's `certs` volume), set once
/// the project is up.
static TLS: OnceLock<ClientTls> = OnceLock::new();

fn tls() -> &'static ClientTls {
    TLS.get().expect("the project's TLS is loaded")
}

fn workspace_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).parent().expect("workspace root").to_path_buf()
}

fn docker(args: &[&str]) {
    let output = Command::new("docker").args(args).output().expect("run docker");
    assert!(output.status.success(), "docker {args:?}: {}", String::from_utf8_lossy(&output.stderr));
}

fn healthy(project: &ComposeProject) -> bool {
    (0..3).all(|node| container_health(&compose_container(&project.name, node)) == "healthy")
}

/// The host address of the node with this compose ordinal (strata-0 is node 1).
fn addr(node: u16) -> String {
    format!("127.0.0.1:{}", GRPC_PORT_BASE + node)
}

async fn channel(node: u16) -> Option<Channel> {
    let endpoint = tonic::transport::Endpoint::from_shared(format!("http://{}", addr(node))).ok()?;
    strata_security::connect(endpoint.connect_timeout(Duration::from_millis(500)).timeout(Duration::from_secs(10)), Some(tls())).await.ok()
}

async fn status(node: u16) -> Option<StatusResponse> {
    status_via(&addr(node), Some(tls())).await
}

/// `strata <args>` as a user on the host who ran `strata cluster compose up` with `home`
/// as their home, with `env` (the variables of the env file it wrote) set.
fn strata_cli(home: &std::path::Path, env: &[(String, String)], project: &ComposeProject, args: &[&str]) -> String {
    let output = Command::new(strata_binary())
        .args(args)
        .env("HOME", home)
        .envs(env.iter().cloned())
        .envs(project.port_env())
        .current_dir(workspace_root())
        .output()
        .expect("run strata");
    assert!(output.status.success(), "strata {args:?}: {}{}", String::from_utf8_lossy(&output.stdout), String::from_utf8_lossy(&output.stderr));
    String::from_utf8_lossy(&output.stdout).to_string()
}

/// Appends `count` single-event appends through `node`, retrying an unavailable or unknown
/// outcome with the same event ids; returns the ids in acknowledgement order.
async fn append_through(node: u16, first: usize, count: usize) -> Vec<String> {
    let mut ids = Vec::with_capacity(count);
    for n in first..first + count {
        let id = uuid::Uuid::new_v4().to_string();
        let request = AppendRequest {
            stream: format!("compose-{}", n % 10),
            expected_kind: ExpectedVersionKind::Any as i32,
            expected_version: 0,
            events: vec![ProposedEvent {
                id: id.clone(),
                r#type: "Tick".into(),
                data: format!("{{\"n\":{n}}}").into_bytes().into(),
                metadata: Default::default(),
                content_type: "application/json".into(),
            }],
        };
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let outcome = match channel(node).await {
                Some(channel) => StreamsClient::new(channel).append(request.clone()).await.map(|_| ()),
                None => Err(tonic::Status::unavailable("node unreachable")),
            };
            match outcome {
                Ok(()) => break,
                Err(status) if matches!(status.code(), tonic::Code::Unavailable | tonic::Code::DeadlineExceeded | tonic::Code::Unknown) => {
                    assert!(Instant::now() < deadline, "append {n} through node {node} kept failing: {status:?}");
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
                Err(status) => panic!("append {n} through node {node} failed: {status:?}"),
            }
        }
        ids.push(id);
    }
    ids
}

async fn read_all_local(node: u16) -> Vec<RecordedEvent> {
    read_all_local_at(StreamsClient::new(channel(node).await.expect("node reachable")).max_decoding_message_size(64 * 1024 * 1024)).await
}

async fn wait_for<T>(what: &str, timeout: Duration, mut check: impl AsyncFnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(value) = check().await {
            return value;
        }
        assert!(Instant::now() < deadline, "{what} within {timeout:?}");
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// TLS to an object store such as AWS S3 verifies against the system roots, which a
/// FROM-scratch image has only if the build put them there.
fn image_holds_the_ca_bundle() {
    let created = Command::new("docker").args(["create", "strata:latest"]).output().expect("docker create");
    assert!(created.status.success(), "docker create: {}", String::from_utf8_lossy(&created.stderr));
    let container = String::from_utf8_lossy(&created.stdout).trim().to_string();
    let copied = Command::new("docker").args(["cp", &format!("{container}:/etc/ssl/certs/ca-certificates.crt"), "-"]).output().expect("docker cp");
    docker(&["rm", "-v", &container]); // -v: and the anonymous /data volume the image declares
    assert!(copied.status.success(), "the image holds /etc/ssl/certs/ca-certificates.crt: {}", String::from_utf8_lossy(&copied.stderr));
    let certificates = String::from_utf8_lossy(&copied.stdout).matches("BEGIN CERTIFICATE").count();
    assert!(certificates > 10, "the image's CA bundle holds the system roots ({certificates} certificates)");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn compose_cluster_keeps_every_event_through_a_killed_leader() {
    if !compose_available() {
        eprintln!("SKIPPED compose tier: docker or docker-compose is not available on this machine");
        return;
    }
    let build = Command::new(workspace_root().join("scripts/build-image")).output().expect("run scripts/build-image");
    assert!(build.status.success(), "scripts/build-image failed: {}", String::from_utf8_lossy(&build.stderr));
    eprintln!("{}", String::from_utf8_lossy(&build.stdout).trim());
    image_holds_the_ca_bundle();

    let project = ComposeProject::new(&workspace_root(), &format!("stratatest{}", std::process::id()), GRPC_PORT_BASE, HTTP_PORT_BASE);
    let home = project.dir.path().join("home");
    let project_arg = ["--project", project.name.as_str(), "--file", "dev-env/docker-compose.yml"];
    let started = Instant::now();
    let up = strata_cli(&home, &[], &project, &[&["cluster", "compose", "up"][..], &project_arg].concat());
    eprintln!("compose: `strata cluster compose up` to a ready cluster, logged in, in {:.1} s:\n{}", started.elapsed().as_secs_f64(), up.trim());
    assert!(healthy(&project), "compose up returns once every container is healthy");

    // The user's path: the env file points the CLI at the cluster, with TLS and a token.
    let env_file = home.join(".strata/compose").join(&project.name).join("env");
    let env: Vec<(String, String)> = std::fs::read_to_string(&env_file)
        .expect("compose up writes an env file")
        .lines()
        .filter_map(|line| line.strip_prefix("export ")?.split_once('=').map(|(k, v)| (k.to_string(), v.to_string())))
        .collect();
    assert!(env.iter().any(|(k, _)| k == "STRATA_TLS_CA"), "{env:?}");
    let whoami = strata_cli(&home, &env, &project, &["whoami"]);
    assert!(whoami.starts_with("admin (admin) via token"), "whoami: {whoami}");
    // And a second `up` keeps the certificates and the password: the token still works.
    strata_cli(&home, &[], &project, &[&["cluster", "compose", "up"][..], &project_arg].concat());
    assert!(strata_cli(&home, &env, &project, &["whoami"]).starts_with("admin"), "the same CA and admin after a second up");

    TLS.set(project.node_tls()).expect("set once");
    assert!(status_at(&addr(0)).await.is_none(), "a plaintext client gets no answer from a TLS node");
    assert!(status(0).await.is_some(), "a client presenting the node certificate does");
    // S12: the secrets are file-mounted and never logged, by any container of the project.
    let certs = project.dir.path().join("certs");
    let logs = project.compose(&["logs", "--no-color"]);
    let logs = String::from_utf8_lossy(&logs.stdout);
    assert!(logs.contains("TLS on"), "the nodes' logs are read");
    for secret in ["admin.password", "cluster.secret", "node.key"] {
        let text = std::fs::read_to_string(certs.join(secret)).expect("a secret copied from the volume");
        let material = text.lines().find(|line| !line.starts_with("-----") && line.len() > 16).expect("secret material");
        assert!(!logs.contains(material), "{secret} appears in the compose logs");
    }

    let mut acknowledged = append_through(0, 0, 1_000).await;
    let leader = wait_for("a leader", Duration::from_secs(30), async || status(0).await.filter(|s| s.leader_id != 0).map(|s| s.leader_id)).await;
    let leader_node = (leader - 1) as u16;
    docker(&["kill", &compose_container(&project.name, u64::from(leader_node))]);
    let other = (0..3u16).find(|node| *node != leader_node).expect("another node");
    acknowledged.extend(append_through(other, 1_000, 1_000).await);
    docker(&["start", &compose_container(&project.name, u64::from(leader_node))]);

    // Every node, the restarted one included, ends with the same 2,000 events in order.
    let reference = wait_for("every node converged on 2,000 events", Duration::from_secs(90), async || {
        let mut all = Vec::new();
        for node in 0..3u16 {
            let head = status(node).await?.head_position;
            if head < 2_000 {
                return None;
            }
            all.push(read_all_local(node).await);
        }
        (all[0] == all[1] && all[1] == all[2]).then(|| all.swap_remove(0))
    })
    .await;
    assert_eq!(reference.len(), 2_000);
    let ids: Vec<&str> = reference.iter().map(|e| e.id.as_str()).collect();
    let expected: Vec<&str> = acknowledged.iter().map(String::as_str).collect();
    assert_eq!(ids, expected, "every acknowledged event, once, in acknowledgement order");
}
