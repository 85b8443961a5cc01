//! TLS end to end over loopback: who gets in, who is taken for a node, reloads, caps.

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use strata_security::certs::{LeafSpec, create_ca, create_leaf};
use strata_security::{
    ClientTls, ConnectionCounters, ConnectionLimits, NODE_NAME_DEFAULT, NodeTls, PeerInfo, TlsError, TlsFiles, incoming, tls_channel,
};
use tokio::io::AsyncWriteExt;
use tokio_stream::StreamExt;

fn node_files(dir: &Path, ca: &Path, stem: &str) -> TlsFiles {
    create_leaf(ca, dir, &LeafSpec::node(stem, NODE_NAME_DEFAULT, &[], &[], 30)).unwrap();
    TlsFiles { cert: dir.join(format!("{stem}.pem")), key: dir.join(format!("{stem}.key")), ca: ca.join("ca.pem") }
}

struct Listener {
    addr: std::net::SocketAddr,
    conns: tokio_stream::wrappers::ReceiverStream<Result<strata_security::transport::ServerConn, std::io::Error>>,
    counters: Arc<ConnectionCounters>,
}

async fn listen(tls: Option<Arc<NodeTls>>, max: usize) -> Listener {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let counters = Arc::new(ConnectionCounters::default());
    let conns = incoming(listener, tls, ConnectionLimits { max }, counters.clone());
    Listener { addr, conns, counters }
}

async fn connect(addr: std::net::SocketAddr, tls: &ClientTls) -> std::io::Result<tokio_rustls::client::TlsStream<tokio::net::TcpStream>> {
    let tcp = tokio::net::TcpStream::connect(addr).await?;
    let mut stream = tokio_rustls::TlsConnector::from(tls.config()).connect(tls.server_name(), tcp).await?;
    // TLS 1.3 clients learn of a refused client certificate only on their first read or write.
    stream.write_all(b"PRI").await?;
    stream.flush().await?;
    Ok(stream)
}

/// A temp dir holding a CA in `<dir>/ca`.
fn test_ca() -> (tempfile::TempDir, std::path::PathBuf) {
    strata_security::install_crypto_provider();
    let dir = tempfile::tempdir().unwrap();
    let ca = dir.path().join("ca");
    create_ca(&ca, "test CA").unwrap();
    (dir, ca)
}

async fn next_conn(listener: &mut Listener) -> Option<strata_security::transport::ServerConn> {
    match tokio::time::timeout(Duration::from_millis(1500), listener.conns.next()).await {
        Ok(Some(Ok(conn))) => Some(conn),
        _ => None,
    }
}

async fn next_info(listener: &mut Listener) -> Option<PeerInfo> {
    use tonic::transport::server::Connected;
    next_conn(listener).await.map(|conn| conn.connect_info())
}

#[tokio::test]
async fn nodes_are_told_from_clients_and_strangers_are_refused() {
    let (dir, ca) = test_ca();
    let other_ca = dir.path().join("other-ca");
    create_ca(&other_ca, "another CA").unwrap();
    let server = NodeTls::load(node_files(dir.path(), &ca, "node-1"), NODE_NAME_DEFAULT).unwrap();
    let mut listener = listen(Some(server), 16).await;

    // A node of the cluster is taken for one.
    let peer = NodeTls::load(node_files(dir.path(), &ca, "node-2"), NODE_NAME_DEFAULT).unwrap();
    let _peer = connect(listener.addr, &ClientTls::for_node(peer).unwrap()).await.unwrap();
    let info = next_info(&mut listener).await.expect("a node gets in");
    assert!(info.tls && info.node);

    // A client trusting the CA gets in, as a client.
    let client = ClientTls::for_client(&ca.join("ca.pem"), NODE_NAME_DEFAULT).unwrap();
    let _client = connect(listener.addr, &client).await.unwrap();
    let info = next_info(&mut listener).await.expect("a client gets in");
    assert!(info.tls && !info.node);

    // A certificate of the cluster CA without the node name: a client, never a node.
    let spec = LeafSpec { dns_names: vec!["someone-else".into()], ..LeafSpec::node("impostor", "impostor", &[], &[], 30) };
    create_leaf(&ca, dir.path(), &spec).unwrap();
    let impostor_files = TlsFiles { cert: dir.path().join("impostor.pem"), key: dir.path().join("impostor.key"), ca: ca.join("ca.pem") };
    let refused = NodeTls::load(impostor_files.clone(), NODE_NAME_DEFAULT).unwrap_err();
    assert!(matches!(refused, TlsError::NotANodeCertificate { .. }), "{refused}");
    let impostor = NodeTls::load(impostor_files, "someone-else").unwrap();
    let _impostor = connect(listener.addr, &ClientTls::for_node(impostor).unwrap().with_server_name(NODE_NAME_DEFAULT)).await.unwrap();
    let info = next_info(&mut listener).await.expect("a CA-signed client certificate gets in");
    assert!(info.tls && !info.node, "a certificate without the node name is not a node's");

    // A node certificate from another CA: the server refuses it.
    let stranger = NodeTls::load(
        TlsFiles { ca: ca.join("ca.pem"), ..node_files(dir.path(), &other_ca, "stranger") },
        NODE_NAME_DEFAULT,
    )
    .unwrap();
    let result = connect(listener.addr, &ClientTls::for_node(stranger).unwrap()).await;
    if let Ok(mut stream) = result {
        // The refusal may only show on the next read.
        use tokio::io::AsyncReadExt;
        let mut buf = [0u8; 1];
        assert!(!matches!(stream.read(&mut buf).await, Ok(n) if n > 0));
    }
    assert!(next_info(&mut listener).await.is_none(), "a certificate from another CA is refused");

    // A client trusting another CA refuses the server.
    let wrong_trust = ClientTls::for_client(&other_ca.join("ca.pem"), NODE_NAME_DEFAULT).unwrap();
    assert!(connect(listener.addr, &wrong_trust).await.is_err());
    assert!(next_info(&mut listener).await.is_none());

    // Plaintext to a TLS port: refused.
    let mut plain = tokio::net::TcpStream::connect(listener.addr).await.unwrap();
    plain.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n").await.unwrap();
    assert!(next_info(&mut listener).await.is_none(), "plaintext is refused");
    assert!(listener.counters.tls_failures.load(Ordering::Relaxed) >= 2);
}

#[tokio::test]
async fn an_expired_server_certificate_is_refused_by_clients() {
    let (dir, ca) = test_ca();
    let spec = LeafSpec { valid_from_secs: -7200, valid_until_secs: -3600, ..LeafSpec::node("old", NODE_NAME_DEFAULT, &[], &[], 1) };
    create_leaf(&ca, dir.path(), &spec).unwrap();
    let files = TlsFiles { cert: dir.path().join("old.pem"), key: dir.path().join("old.key"), ca: ca.join("ca.pem") };
    let mut listener = listen(Some(NodeTls::load(files, NODE_NAME_DEFAULT).unwrap()), 4).await;
    let client = ClientTls::for_client(&ca.join("ca.pem"), NODE_NAME_DEFAULT).unwrap();
    let error = connect(listener.addr, &client).await.unwrap_err();
    assert!(error.to_string().to_lowercase().contains("expired"), "{error}");
    assert!(next_info(&mut listener).await.is_none());
}

#[tokio::test]
async fn a_replaced_certificate_is_used_for_new_connections_and_a_broken_one_is_not() {
    let (dir, ca) = test_ca();
    let files = node_files(dir.path(), &ca, "node");
    let tls = NodeTls::load(files.clone(), NODE_NAME_DEFAULT).unwrap();
    assert!(!tls.reload_if_changed().unwrap(), "nothing changed");
    let before = tls.server_config();

    // Rotation: a new certificate and key in place of the old.
    std::thread::sleep(Duration::from_millis(20));
    node_files(dir.path(), &ca, "node");
    assert!(tls.reload_if_changed().unwrap());
    assert!(!Arc::ptr_eq(&before, &tls.server_config()));

    // A half-written certificate does not replace the working one.
    let working = tls.server_config();
    std::fs::write(&files.cert, b"-----BEGIN CERTIFICATE-----\nnot base64").unwrap();
    assert!(tls.reload_if_changed().is_err());
    assert!(Arc::ptr_eq(&working, &tls.server_config()));
}

#[tokio::test]
async fn connections_past_the_cap_are_closed_at_once() {
    let mut listener = listen(None, 2).await;
    let _a = tokio::net::TcpStream::connect(listener.addr).await.unwrap();
    let _b = tokio::net::TcpStream::connect(listener.addr).await.unwrap();
    let first = next_conn(&mut listener).await.expect("first");
    let second = next_conn(&mut listener).await.expect("second");
    let mut c = tokio::net::TcpStream::connect(listener.addr).await.unwrap();
    use tokio::io::AsyncReadExt;
    let mut buf = [0u8; 1];
    let read = tokio::time::timeout(Duration::from_secs(5), c.read(&mut buf)).await.expect("closed, not left hanging");
    assert!(matches!(read, Ok(0) | Err(_)), "the third connection is closed");
    assert_eq!(listener.counters.refused_over_cap.load(Ordering::Relaxed), 1);
    assert_eq!(listener.counters.open.load(Ordering::Relaxed), 2);
    drop(second);
    assert_eq!(listener.counters.open.load(Ordering::Relaxed), 1, "a closed connection gives its slot back");
    let _d = tokio::net::TcpStream::connect(listener.addr).await.unwrap();
    assert!(next_conn(&mut listener).await.is_some(), "the freed slot takes a new connection");
    drop(first);
}

#[tokio::test]
async fn grpc_runs_over_the_tls_channel() {
    let (dir, ca) = test_ca();
    let server_tls = NodeTls::load(node_files(dir.path(), &ca, "server"), NODE_NAME_DEFAULT).unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (_reporter, health) = tonic_health::server::health_reporter();
    let conns = incoming(listener, Some(server_tls), ConnectionLimits { max: 8 }, Arc::default());
    tokio::spawn(tonic::transport::Server::builder().add_service(health).serve_with_incoming(conns));

    let endpoint = tonic::transport::Endpoint::from_shared(format!("http://{addr}")).unwrap().connect_timeout(Duration::from_secs(2));
    let client = ClientTls::for_client(&ca.join("ca.pem"), NODE_NAME_DEFAULT).unwrap();
    let mut health = tonic_health::pb::health_client::HealthClient::new(tls_channel(endpoint.clone(), client, None));
    let reply = health.check(tonic_health::pb::HealthCheckRequest { service: String::new() }).await.unwrap();
    assert_eq!(reply.into_inner().status, tonic_health::pb::health_check_response::ServingStatus::Serving as i32);

    // The same port in plaintext: no answer.
    let mut plain = tonic_health::pb::health_client::HealthClient::new(endpoint.connect_lazy());
    let refused = tokio::time::timeout(Duration::from_secs(5), plain.check(tonic_health::pb::HealthCheckRequest { service: String::new() }))
        .await
        .expect("refused, not hung");
    assert!(refused.is_err());
}
