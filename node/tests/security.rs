//! Security of real `strata serve` processes on loopback (issue 8, reliability notes §5.2):
//! TLS for clients (S1) and mTLS between nodes by the reserved node name (S2).

mod common;

use std::path::{Path, PathBuf};
use std::time::Duration;

use common::{append_request, event, status_via, Formation, TestCluster};
use strata_proto::v1::ExpectedVersionKind;
use strata_proto::v1::cluster_client::ClusterClient;
use strata_proto::v1::raft::raft_transport_client::RaftTransportClient;
use strata_proto::v1::raft::RaftMessage;
use strata_proto::v1::StatusRequest;
use strata_security::certs::{create_ca, create_leaf, LeafSpec};
use strata_security::{ClientTls, NODE_NAME_DEFAULT};

/// `--tls-*` arguments of a node whose certificate `<dir>/<stem>.pem` is signed by the CA in `ca`.
fn tls_args(dir: &Path, stem: &str, ca: &Path) -> Vec<String> {
    vec![
        "--tls-cert".into(),
        dir.join(format!("{stem}.pem")).display().to_string(),
        "--tls-key".into(),
        dir.join(format!("{stem}.key")).display().to_string(),
        "--tls-ca".into(),
        ca.join("ca.pem").display().to_string(),
    ]
}

fn node_cert(ca: &Path, dir: &Path, stem: &str, names: &[&str]) {
    let mut spec = LeafSpec::node(stem, NODE_NAME_DEFAULT, &[], &[], 30);
    spec.dns_names = names.iter().map(|n| n.to_string()).collect();
    create_leaf(ca, dir, &spec).expect("node certificate");
}

fn cluster_ca(cluster: &TestCluster) -> (PathBuf, PathBuf) {
    strata_security::install_crypto_provider();
    let certs = cluster.dir.path().join("certs");
    let ca = certs.join("ca");
    create_ca(&ca, "test cluster CA").expect("CA");
    (certs, ca)
}

async fn status_code(endpoint: &str, tls: Option<&ClientTls>) -> Result<u64, String> {
    let endpoint = tonic::transport::Endpoint::from_shared(format!("http://{endpoint}")).unwrap().connect_timeout(Duration::from_secs(2));
    let channel = strata_security::connect(endpoint, tls).await.map_err(|e| format!("connect: {e}"))?;
    let mut request = tonic::Request::new(StatusRequest { local_only: true });
    request.set_timeout(Duration::from_secs(3));
    ClusterClient::new(channel).status(request).await.map(|r| r.into_inner().node_id).map_err(|s| format!("{:?}: {}", s.code(), s.message()))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_tls_cluster_serves_clients_that_trust_its_ca_and_no_one_else() {
    // Goal: S1. Method: three nodes with certificates from one CA; a client trusting the
    // CA appends through a follower (forwarded to the leader over mTLS) and reads back;
    // plaintext, a client trusting another CA, and a server without TLS or --insecure fail.
    let mut cluster = TestCluster::new(60, Formation::Static);
    let (certs, ca) = cluster_ca(&cluster);
    node_cert(&ca, &certs, "node", &[NODE_NAME_DEFAULT]);
    let args = tls_args(&certs, "node", &ca);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    cluster.size = 3;
    for id in 1..=3 {
        cluster.spawn_with(id, &args);
    }
    cluster.client_tls = Some(ClientTls::for_client(&ca.join("ca.pem"), NODE_NAME_DEFAULT).unwrap());
    let leader = cluster.wait_leader(Duration::from_secs(30)).await;
    let follower = if leader == 1 { 2 } else { 1 };
    let request = append_request("tls-orders", ExpectedVersionKind::NoStream, 0, vec![event("", "Placed", "{\"n\":1}")]);
    cluster.streams(follower).await.append(request).await.expect("append over TLS, forwarded over mTLS");
    cluster.wait_converged(Duration::from_secs(20)).await;
    for id in 1..=3 {
        assert_eq!(cluster.read_all_local(id).await.len(), 1, "node {id} replicated over mTLS");
    }

    let addr = cluster.addr(leader);
    assert!(status_code(&addr, None).await.is_err(), "plaintext is refused");
    let other_ca = certs.join("other-ca");
    create_ca(&other_ca, "another CA").unwrap();
    let stranger = ClientTls::for_client(&other_ca.join("ca.pem"), NODE_NAME_DEFAULT).unwrap();
    assert!(status_code(&addr, Some(&stranger)).await.is_err(), "a client that does not trust the cluster CA gets nowhere");
    assert_eq!(status_code(&addr, cluster.client_tls.as_ref()).await, Ok(leader));
    let log = std::fs::read_to_string(cluster.log_path(leader)).unwrap();
    assert!(log.contains("TLS on"), "the start-up line says TLS is on");

    // Neither TLS nor --insecure: the node refuses to start, and says why.
    let output = std::process::Command::new(common::strata_binary())
        .args(["serve", "--node-id", "9", "--data-dir"])
        .arg(cluster.dir.path().join("no-tls"))
        .args(["--grpc-addr", "127.0.60.9:0", "--http-addr", "127.0.60.9:0"])
        .env_remove("STRATA_INSECURE")
        .output()
        .unwrap();
    assert!(!output.status.success());
    assert!(String::from_utf8_lossy(&output.stderr).contains("TLS is required"), "{}", String::from_utf8_lossy(&output.stderr));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_node_without_the_node_name_or_from_another_ca_cannot_replicate_or_vote() {
    // Goal: S2. Method: three nodes form a cluster; node 3 is then wiped and restarted
    // with a certificate from the same CA that lacks the node name (and --tls-node-name
    // impostor, so that it starts at all). Nodes 1 and 2 go on committing; node 3 never
    // gets an entry back, and Raft RPCs with its certificate, with none, or with a node
    // certificate of another CA are refused.
    let mut cluster = TestCluster::new(61, Formation::Static);
    let (certs, ca) = cluster_ca(&cluster);
    node_cert(&ca, &certs, "node", &[NODE_NAME_DEFAULT]);
    node_cert(&ca, &certs, "impostor", &["impostor"]);
    let good = tls_args(&certs, "node", &ca);
    let good: Vec<&str> = good.iter().map(String::as_str).collect();
    let mut bad = tls_args(&certs, "impostor", &ca);
    bad.extend(["--tls-node-name".to_string(), "impostor".to_string()]);
    let bad: Vec<&str> = bad.iter().map(String::as_str).collect();
    cluster.size = 3;
    for id in 1..=3 {
        cluster.spawn_with(id, &good);
    }
    cluster.client_tls = Some(ClientTls::for_client(&ca.join("ca.pem"), NODE_NAME_DEFAULT).unwrap());
    cluster.wait_leader(Duration::from_secs(30)).await;
    cluster.terminate(3);
    cluster.wipe(3);
    cluster.spawn_with(3, &bad);
    let leader = cluster.wait_leader(Duration::from_secs(30)).await;
    assert!(leader == 1 || leader == 2, "the impostor cannot lead");
    for n in 0..5 {
        let request = append_request("s2", ExpectedVersionKind::Any, 0, vec![event("", "E", &format!("{{\"n\":{n}}}"))]);
        cluster.streams(leader).await.append(request).await.expect("nodes 1 and 2 commit");
    }
    tokio::time::sleep(Duration::from_secs(3)).await;
    let impostor_view = ClientTls::for_client(&ca.join("ca.pem"), "impostor").unwrap();
    let status = status_via(&cluster.addr(3), Some(&impostor_view)).await.expect("node 3 answers clients");
    assert_eq!(status.applied_index, 0, "node 3 got no entry");
    assert_ne!(status.role, "leader");
    let leader_status = cluster.status(leader).await.unwrap();
    assert!(leader_status.applied_index >= 5);
    // Raft RPCs straight to the leader: the impostor's certificate and no certificate get
    // PERMISSION_DENIED; a node certificate of another CA does not get through TLS.
    let impostor_files = strata_security::TlsFiles {
        cert: certs.join("impostor.pem"),
        key: certs.join("impostor.key"),
        ca: ca.join("ca.pem"),
    };
    let impostor = strata_security::NodeTls::load(impostor_files, "impostor").unwrap();
    let as_impostor = ClientTls::for_node(impostor).unwrap().with_server_name(NODE_NAME_DEFAULT);
    let no_cert = cluster.client_tls.clone().unwrap();
    for (who, tls) in [("impostor", as_impostor), ("no certificate", no_cert)] {
        let endpoint = tonic::transport::Endpoint::from_shared(format!("http://{}", cluster.addr(leader))).unwrap();
        let channel = strata_security::connect(endpoint, Some(&tls)).await.expect("TLS connects");
        let refused = RaftTransportClient::new(channel).vote(RaftMessage { payload: vec![1, 2, 3] }).await.unwrap_err();
        assert_eq!(refused.code(), tonic::Code::PermissionDenied, "{who}: {refused:?}");
    }
    let other_ca = certs.join("other-ca");
    create_ca(&other_ca, "another CA").unwrap();
    node_cert(&other_ca, &certs, "foreign", &[NODE_NAME_DEFAULT]);
    let foreign_files = strata_security::TlsFiles { cert: certs.join("foreign.pem"), key: certs.join("foreign.key"), ca: ca.join("ca.pem") };
    let foreign = ClientTls::for_node(strata_security::NodeTls::load(foreign_files, NODE_NAME_DEFAULT).unwrap()).unwrap();
    let endpoint = tonic::transport::Endpoint::from_shared(format!("http://{}", cluster.addr(leader))).unwrap();
    let outcome = match strata_security::connect(endpoint, Some(&foreign)).await {
        Err(e) => Err(e.to_string()),
        Ok(channel) => RaftTransportClient::new(channel).vote(RaftMessage { payload: vec![1] }).await.map(|_| ()).map_err(|s| format!("{s:?}")),
    };
    assert!(outcome.is_err(), "a certificate from another CA does not get in");
}
