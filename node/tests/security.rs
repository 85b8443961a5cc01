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
use strata_proto::v1::auth_client::AuthClient;
use strata_proto::v1::streams_client::StreamsClient;
use strata_proto::v1::{AddLearnerRequest, AddUserRequest, LoginRequest, NodeRequest, ReadStreamRequest, RemoveUserRequest, StatusRequest, StreamRule};
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

/// The cluster's CA in `<dir>/certs/ca` and its node certificate `<dir>/certs/node.pem`.
fn cluster_ca(cluster: &TestCluster) -> (PathBuf, PathBuf) {
    strata_security::install_crypto_provider();
    let certs = cluster.dir.path().join("certs");
    let ca = certs.join("ca");
    create_ca(&ca, "test cluster CA").expect("CA");
    node_cert(&ca, &certs, "node", &[NODE_NAME_DEFAULT]);
    (certs, ca)
}

/// Starts three nodes with the node certificate and `extra` arguments; the harness then
/// talks to them with the node certificate too (as the cluster's own: admin).
fn start_tls(cluster: &mut TestCluster, certs: &Path, ca: &Path, extra: &[String]) {
    let mut args = tls_args(certs, "node", ca);
    args.extend_from_slice(extra);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    cluster.size = 3;
    for id in 1..=3 {
        cluster.spawn_with(id, &args);
    }
    cluster.client_tls = Some(node_client(certs, ca));
}

/// A client that presents the cluster's node certificate (`<certs>/node.pem`): what an
/// operator holding one, and the test harness, use. The node takes it as admin.
fn node_client(certs: &Path, ca: &Path) -> ClientTls {
    let files = strata_security::TlsFiles { cert: certs.join("node.pem"), key: certs.join("node.key"), ca: ca.join("ca.pem") };
    ClientTls::for_node(strata_security::NodeTls::load(files, NODE_NAME_DEFAULT).unwrap()).unwrap()
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
    start_tls(&mut cluster, &certs, &ca, &[]);
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
    // A client that trusts the CA gets through TLS, and then needs credentials (S3).
    let trusting = ClientTls::for_client(&ca.join("ca.pem"), NODE_NAME_DEFAULT).unwrap();
    let outcome = status_code(&addr, Some(&trusting)).await;
    assert!(outcome.as_ref().is_err_and(|e| e.starts_with("Unauthenticated")), "{outcome:?}");
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
    node_cert(&ca, &certs, "impostor", &["impostor"]);
    let mut bad = tls_args(&certs, "impostor", &ca);
    bad.extend(["--tls-node-name".to_string(), "impostor".to_string()]);
    let bad: Vec<&str> = bad.iter().map(String::as_str).collect();
    start_tls(&mut cluster, &certs, &ca, &[]);
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
    // Node 3 is asked with its own certificate: it verifies its server name, and node 3
    // takes it as one of its nodes (admin), so no token is needed.
    let impostor_files = strata_security::TlsFiles { cert: certs.join("impostor.pem"), key: certs.join("impostor.key"), ca: ca.join("ca.pem") };
    let impostor_view = ClientTls::for_node(strata_security::NodeTls::load(impostor_files, "impostor").unwrap()).unwrap().with_server_name("impostor");
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
    let no_cert = ClientTls::for_client(&ca.join("ca.pem"), NODE_NAME_DEFAULT).unwrap();
    for (who, tls) in [("impostor", as_impostor), ("no certificate", no_cert)] {
        let endpoint = tonic::transport::Endpoint::from_shared(format!("http://{}", cluster.addr(leader))).unwrap();
        let channel = strata_security::connect(endpoint, Some(&tls)).await.expect("TLS connects");
        let refused = RaftTransportClient::new(channel).vote(RaftMessage { payload: vec![1, 2, 3].into() }).await.unwrap_err();
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
        Ok(channel) => RaftTransportClient::new(channel).vote(RaftMessage { payload: vec![1].into() }).await.map(|_| ()).map_err(|s| format!("{s:?}")),
    };
    assert!(outcome.is_err(), "a certificate from another CA does not get in");
}

/// A TLS channel to `addr` that trusts the cluster CA and carries `token` on every call.
async fn as_user(addr: &str, ca: &Path, token: Option<&str>) -> strata_security::AuthChannel {
    let tls = ClientTls::for_client(&ca.join("ca.pem"), NODE_NAME_DEFAULT).unwrap();
    let endpoint = tonic::transport::Endpoint::from_shared(format!("http://{addr}")).unwrap().connect_timeout(Duration::from_secs(2));
    let channel = strata_security::connect(endpoint, Some(&tls)).await.expect("TLS connects");
    strata_security::BearerToken::new(token).unwrap().on(channel)
}

async fn login(addr: &str, ca: &Path, user: &str, password: &str) -> Result<String, tonic::Status> {
    let request = LoginRequest { user: user.into(), password: password.into() };
    AuthClient::new(as_user(addr, ca, None).await).login(request).await.map(|r| r.into_inner().token)
}

fn code<T: std::fmt::Debug>(outcome: Result<T, tonic::Status>) -> tonic::Code {
    match outcome {
        Ok(_) => tonic::Code::Ok,
        Err(status) => status.code(),
    }
}

async fn append_as(channel: strata_security::AuthChannel, stream: &str) -> Result<strata_proto::v1::AppendResponse, tonic::Status> {
    let request = append_request(stream, ExpectedVersionKind::Any, 0, vec![event("", "E", "{}")]);
    StreamsClient::new(channel).append(request).await.map(|r| r.into_inner())
}

async fn read_as(channel: strata_security::AuthChannel, stream: &str) -> Result<usize, tonic::Status> {
    let request = ReadStreamRequest { stream: stream.into(), max_count: 100, ..Default::default() };
    let mut events = StreamsClient::new(channel).read_stream(request).await?.into_inner();
    let mut count = 0;
    while let Some(page) = events.message().await? {
        count += page.events.len();
    }
    Ok(count)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn callers_need_a_valid_token_and_may_do_only_what_their_roles_and_rules_allow() {
    // Goal: S3 and S4 (and S12 for the password and tokens). Method: three TLS nodes whose
    // first admin comes from --admin-password-file, tokens valid for 6 s (so the test
    // logs in again at each step). Each bad
    // credential (none, another key's signature, expired, wrong password, a removed
    // user) gets UNAUTHENTICATED; readers writing, writers reading $all or a rule-guarded
    // prefix, non-admins calling membership, user and group-admin RPCs get
    // PERMISSION_DENIED; admins and allowed callers succeed. The CLI logs in and adds a
    // user. No node log holds the password or a token.
    let mut cluster = TestCluster::new(62, Formation::Static);
    let (certs, ca) = cluster_ca(&cluster);
    let admin_password = "correct horse battery staple";
    let password_file = cluster.dir.path().join("admin-password");
    std::fs::write(&password_file, format!("{admin_password}\n")).unwrap();
    // Long enough for every step that uses one token on a loaded machine (six seconds was
    // not, under CI's parallel tests); the expiry check below waits it out once.
    const TOKEN_TTL_SECS: u64 = 30;
    let extra = ["--admin-password-file".into(), password_file.display().to_string(), "--token-ttl-secs".into(), TOKEN_TTL_SECS.to_string()];
    start_tls(&mut cluster, &certs, &ca, &extra);
    let leader = cluster.wait_leader(Duration::from_secs(30)).await;
    let follower = if leader == 1 { 2 } else { 1 };
    let (leader_addr, follower_addr) = (cluster.addr(leader), cluster.addr(follower));

    // Missing credentials.
    assert_eq!(code(append_as(as_user(&leader_addr, &ca, None).await, "orders-1").await), tonic::Code::Unauthenticated);
    assert_eq!(code(read_as(as_user(&follower_addr, &ca, None).await, "orders-1").await), tonic::Code::Unauthenticated);
    // The first admin appears once the leader has seeded it; a wrong password fails.
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    let admin = loop {
        match login(&follower_addr, &ca, "admin", admin_password).await {
            Ok(token) => break token,
            Err(status) if std::time::Instant::now() < deadline => {
                tracing::info!(?status, "admin not there yet");
                tokio::time::sleep(Duration::from_millis(300)).await;
            }
            Err(status) => panic!("the first admin never appeared: {status:?}"),
        }
    };
    assert_eq!(code(login(&leader_addr, &ca, "admin", "wrong").await), tonic::Code::Unauthenticated);
    assert_eq!(code(login(&leader_addr, &ca, "nobody", "wrong").await), tonic::Code::Unauthenticated);
    // A token signed with another key, and a garbage one.
    let principal = strata_security::Principal { user: "admin".into(), roles: vec![strata_security::Role::Admin] };
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs();
    let forged = strata_security::auth::TokenKey::generate().issue(&principal, now, 3600);
    let refused = append_as(as_user(&leader_addr, &ca, Some(&forged)).await, "orders-1").await.unwrap_err();
    assert_eq!(refused.code(), tonic::Code::Unauthenticated);
    assert!(refused.message().contains("signature"), "{refused:?}");
    assert_eq!(code(append_as(as_user(&leader_addr, &ca, Some("strata1.e30.AAAA")).await, "orders-1").await), tonic::Code::Unauthenticated);
    // The admin's real token works, through a follower too.
    append_as(as_user(&follower_addr, &ca, Some(&admin)).await, "orders-1").await.expect("admin appends");

    // Users through the CLI: log in (the token file), add a writer; then a reader and an
    // operator through the API.
    let token_file = cluster.dir.path().join("cli-token");
    let cli = |args: &[&str], stdin: Option<&str>| {
        use std::io::Write as _;
        let mut child = std::process::Command::new(common::strata_binary())
            .args(args)
            .args(["--endpoints", &follower_addr, "--ca"])
            .arg(ca.join("ca.pem"))
            .arg("--token-file")
            .arg(&token_file)
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        child.stdin.take().unwrap().write_all(stdin.unwrap_or("").as_bytes()).unwrap();
        let output = child.wait_with_output().unwrap();
        assert!(output.status.success(), "strata {args:?}: {}", String::from_utf8_lossy(&output.stderr));
        String::from_utf8_lossy(&output.stdout).to_string()
    };
    let said = cli(&["login", "--user", "admin", "--password-file", "-"], Some(admin_password));
    assert!(said.contains("logged in as admin"), "{said}");
    cli(&["user", "add", "walt", "--role", "writer", "--password-file", "-"], Some("walt-password"));
    assert!(cli(&["whoami"], None).starts_with("admin (admin) via token"));
    let mut users = AuthClient::new(as_user(&leader_addr, &ca, Some(&login(&leader_addr, &ca, "admin", admin_password).await.unwrap())).await);
    for (user, role) in [("rita", "reader"), ("olga", "ops")] {
        let request = AddUserRequest { user: user.into(), password: format!("{user}-password"), roles: vec![role.into()], replace: false };
        users.add_user(request).await.expect("admin adds users");
    }
    let listed = cli(&["user", "list", "--json"], None);
    for user in ["admin", "walt", "rita", "olga"] {
        assert!(listed.contains(&format!("\"user\":\"{user}\"")), "{listed}");
    }
    assert!(!listed.contains("argon2"), "hashes are not listed");

    let token = |user: &'static str| {
        let (addr, ca) = (follower_addr.clone(), ca.clone());
        async move { login(&addr, &ca, user, &format!("{user}-password")).await.expect("login") }
    };
    let (walt, rita, olga) = (token("walt").await, token("rita").await, token("olga").await);
    let on = |token: &str| {
        let (token, addr, ca) = (token.to_string(), follower_addr.clone(), ca.clone());
        async move { as_user(&addr, &ca, Some(&token)).await }
    };
    // Readers read, and may not write; writers write; $all and $-streams are admin-only.
    assert_eq!(code(append_as(on(&rita).await, "orders-1").await), tonic::Code::PermissionDenied, "a reader writing");
    assert_eq!(read_as(on(&rita).await, "orders-1").await.expect("a reader reads"), 1);
    append_as(on(&walt).await, "orders-1").await.expect("a writer appends");
    assert_eq!(code(append_as(on(&walt).await, "$secrets").await), tonic::Code::PermissionDenied);
    let read_all = |token: String| {
        let channel = on(&token);
        async move {
            let request = strata_proto::v1::ReadAllRequest { max_count: 10, ..Default::default() };
            let mut stream = StreamsClient::new(channel.await).read_all(request).await?.into_inner();
            stream.message().await.map(|_| ())
        }
    };
    assert_eq!(code(read_all(walt.clone()).await), tonic::Code::PermissionDenied, "$all is admin-only by default");
    let subscribe = strata_proto::v1::SubscribeRequest { stream: "$all".into(), ..Default::default() };
    let subscribed = strata_proto::v1::subscriptions_client::SubscriptionsClient::new(on(&rita).await).subscribe(subscribe).await;
    assert_eq!(code(subscribed), tonic::Code::PermissionDenied, "subscriptions are checked like reads");
    // Cluster and admin RPCs: view for all, operate for ops, administer for admin only.
    let mut cluster_as_rita = ClusterClient::new(on(&rita).await);
    cluster_as_rita.status(StatusRequest { local_only: true }).await.expect("anyone may look");
    assert_eq!(code(cluster_as_rita.remove(NodeRequest { node_id: 3 }).await), tonic::Code::PermissionDenied, "a reader removing a node");
    let add = AddLearnerRequest { node_id: 9, grpc_addr: "127.0.62.9:7000".into() };
    assert_eq!(code(cluster_as_rita.add_learner(add.clone()).await), tonic::Code::PermissionDenied);
    let mut cluster_as_olga = ClusterClient::new(on(&olga).await);
    assert_eq!(code(cluster_as_olga.add_learner(add).await), tonic::Code::PermissionDenied, "ops may not change membership");
    assert_eq!(code(cluster_as_olga.promote(NodeRequest { node_id: 3 }).await), tonic::Code::PermissionDenied);
    let add_user = AddUserRequest { user: "mallory".into(), password: "x".into(), roles: vec!["admin".into()], replace: false };
    assert_eq!(code(AuthClient::new(on(&walt).await).add_user(add_user).await), tonic::Code::PermissionDenied, "only admins add users");
    let group = strata_proto::v1::CreateGroupRequest {
        group: "g1".into(),
        settings: Some(strata_proto::v1::GroupSettings { source: "orders-1".into(), ..Default::default() }),
    };
    let groups = |token: String| {
        let channel = on(&token);
        async move { strata_proto::v1::persistent_subscriptions_client::PersistentSubscriptionsClient::new(channel.await) }
    };
    assert_eq!(code(groups(walt.clone()).await.create(group.clone()).await), tonic::Code::PermissionDenied, "groups are operated by ops");
    groups(olga.clone()).await.create(group).await.expect("ops create a group on a stream they may read");

    // A rule: only walt reads payroll-*, only admins write it.
    let (walt, rita) = (token("walt").await, token("rita").await);
    let admin = login(&follower_addr, &ca, "admin", admin_password).await.unwrap();
    let mut users = AuthClient::new(on(&admin).await);
    let rule = StreamRule { pattern: "payroll-*".into(), read: vec!["walt".into()], write: vec!["role:admin".into()] };
    users.set_stream_rule(rule).await.expect("admin sets a rule");
    tokio::time::sleep(Duration::from_millis(500)).await; // applied on the follower
    assert_eq!(code(append_as(on(&walt).await, "payroll-1").await), tonic::Code::PermissionDenied, "the rule takes write away");
    append_as(on(&admin).await, "payroll-1").await.expect("admin writes payroll");
    assert_eq!(code(read_as(on(&rita).await, "payroll-1").await), tonic::Code::PermissionDenied, "the rule takes read away");
    assert_eq!(read_as(on(&walt).await, "payroll-1").await.expect("the rule grants walt"), 1);

    // A removed user's token stops working at once; a token past its expiry too.
    let (walt, rita) = (token("walt").await, token("rita").await);
    // Rita's token was issued before this instant, so it has expired TTL + 1 s after it.
    let rita_issued = tokio::time::Instant::now();
    let mut users = AuthClient::new(on(&login(&follower_addr, &ca, "admin", admin_password).await.unwrap()).await);
    users.remove_user(RemoveUserRequest { user: "walt".into() }).await.expect("admin removes walt");
    tokio::time::sleep(Duration::from_millis(500)).await;
    let refused = append_as(on(&walt).await, "orders-1").await.unwrap_err();
    assert_eq!(refused.code(), tonic::Code::Unauthenticated);
    assert!(refused.message().contains("no longer exists"), "{refused:?}");
    tokio::time::sleep_until(rita_issued + Duration::from_secs(TOKEN_TTL_SECS + 1)).await;
    let refused = read_as(on(&rita).await, "orders-1").await.unwrap_err();
    assert_eq!(refused.code(), tonic::Code::Unauthenticated);
    assert!(refused.message().contains("expired"), "{refused:?}");

    // S12: no secret in any node's log.
    for id in 1..=3 {
        let log = std::fs::read_to_string(cluster.log_path(id)).unwrap();
        for secret in [admin_password, "walt-password", rita.as_str(), admin.as_str()] {
            assert!(!log.contains(secret), "node {id}'s log holds a secret");
        }
        assert!(!log.contains("$argon2id$"), "node {id}'s log holds a password hash");
    }
}
