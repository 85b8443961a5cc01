//! TLS for clients and mTLS between nodes, over rustls (aws-lc-rs).
//!
//! Every node holds a certificate that chains to the cluster CA and carries the reserved
//! node name ([`NODE_NAME_DEFAULT`], KurrentDB's `CertificateReservedNodeCommonName`) as a
//! DNS subject name. Nodes present it when they connect to each other; a node checks it
//! before it takes a Raft RPC ([`PeerInfo::node`]). Clients verify the server against the
//! CA under the same reserved name, so one node certificate serves every address the node
//! is reached at. Clients need no certificate of their own.
//!
//! The files are read again when they change ([`NodeTls::reload_if_changed`]): new
//! connections use the new certificate, open ones keep theirs.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, SystemTime};

use rustls::crypto::CryptoProvider;
use rustls::server::WebPkiClientVerifier;
use rustls::{ClientConfig, RootCertStore, ServerConfig};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName};

/// The DNS name every node certificate carries and the only one a peer is accepted
/// under for Raft: a certificate from the cluster CA without it is a client's.
pub const NODE_NAME_DEFAULT: &str = "strata-node";
/// How often a node looks at its certificate files for a change.
pub const CERT_RELOAD_CHECK: Duration = Duration::from_secs(5);
/// HTTP/2 is the only protocol the gRPC port speaks.
const ALPN_H2: &[u8] = b"h2";

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("cannot read {what} from {path}: {reason}")]
    Read { what: &'static str, path: PathBuf, reason: String },
    #[error("{path} holds no {what}")]
    Empty { what: &'static str, path: PathBuf },
    #[error("invalid TLS set-up: {0}")]
    Config(String),
    #[error("this node's certificate {path} does not carry the node name {name:?} (create it with `strata cert node`)")]
    NotANodeCertificate { path: PathBuf, name: String },
    #[error("cannot create a certificate: {0}")]
    Generate(String),
}

/// The three files of a node's TLS set-up (PEM).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsFiles {
    /// The node's certificate chain (leaf first).
    pub cert: PathBuf,
    /// The node's private key.
    pub key: PathBuf,
    /// The cluster CA: peers' and clients' certificates must chain to it.
    pub ca: PathBuf,
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::aws_lc_rs::default_provider())
}

/// Makes aws-lc-rs the process's rustls provider (object_store's S3 client and ours
/// share it). Harmless when called twice.
pub fn install_crypto_provider() {
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
}

fn read_certs(what: &'static str, path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let read = |reason: String| TlsError::Read { what, path: path.to_owned(), reason };
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(|e| read(e.to_string()))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| read(e.to_string()))?;
    if certs.is_empty() {
        return Err(TlsError::Empty { what, path: path.to_owned() });
    }
    Ok(certs)
}

fn read_key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    PrivateKeyDer::from_pem_file(path).map_err(|e| TlsError::Read { what: "a private key", path: path.to_owned(), reason: e.to_string() })
}

/// The cluster CA as a root store.
pub fn read_roots(path: &Path) -> Result<Arc<RootCertStore>, TlsError> {
    let mut roots = RootCertStore::empty();
    for cert in read_certs("CA certificates", path)? {
        roots.add(cert).map_err(|e| TlsError::Config(format!("CA certificate in {}: {e}", path.display())))?;
    }
    Ok(Arc::new(roots))
}

/// Whether `cert` is valid for the DNS name `name` (its subject alternative names).
pub fn carries_name(cert: &CertificateDer<'_>, name: &str) -> bool {
    let Ok(cert) = webpki::EndEntityCert::try_from(cert) else { return false };
    let Ok(name) = ServerName::try_from(name) else { return false };
    cert.verify_is_valid_for_subject_name(&name).is_ok()
}

fn server_name(name: &str) -> Result<ServerName<'static>, TlsError> {
    ServerName::try_from(name.to_owned()).map_err(|_| TlsError::Config(format!("{name:?} is not a valid server name")))
}

/// The rustls configurations built from one reading of the files.
struct Loaded {
    server: Arc<ServerConfig>,
    client: Arc<ClientConfig>,
}

/// What the files looked like when they were read: a change to any of them reloads.
type Stamps = Vec<Option<(SystemTime, u64)>>;

/// A node's TLS: server side (clients optional, nodes identified) and client side
/// (presenting the node certificate to peers), reloaded when the files change.
pub struct NodeTls {
    files: TlsFiles,
    node_name: String,
    loaded: RwLock<Arc<Loaded>>,
    stamps: Mutex<Stamps>,
}

impl std::fmt::Debug for NodeTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Paths only: the key's bytes never reach a log.
        f.debug_struct("NodeTls").field("files", &self.files).field("node_name", &self.node_name).finish()
    }
}

impl NodeTls {
    /// Reads the files; fails if the node's own certificate does not carry `node_name`.
    pub fn load(files: TlsFiles, node_name: &str) -> Result<Arc<Self>, TlsError> {
        let stamps = stamps(&files);
        let loaded = build(&files, node_name)?;
        Ok(Arc::new(Self { files, node_name: node_name.to_owned(), loaded: RwLock::new(Arc::new(loaded)), stamps: Mutex::new(stamps) }))
    }

    pub fn node_name(&self) -> &str {
        &self.node_name
    }

    pub fn files(&self) -> &TlsFiles {
        &self.files
    }

    /// The server configuration for a new connection.
    pub fn server_config(&self) -> Arc<ServerConfig> {
        self.loaded.read().expect("TLS config lock is never poisoned").server.clone()
    }

    /// The client configuration for a new connection to a peer.
    pub fn client_config(&self) -> Arc<ClientConfig> {
        self.loaded.read().expect("TLS config lock is never poisoned").client.clone()
    }

    /// Reads the files again if any changed since the last reading. A set of files that
    /// does not load (half-written, wrong key) leaves the running configuration as it
    /// is: Ok(false) means nothing changed, Ok(true) that new connections use the new files.
    pub fn reload_if_changed(&self) -> Result<bool, TlsError> {
        let now = stamps(&self.files);
        let mut seen = self.stamps.lock().expect("TLS stamp lock is never poisoned");
        if *seen == now {
            return Ok(false);
        }
        let loaded = build(&self.files, &self.node_name)?;
        *self.loaded.write().expect("TLS config lock is never poisoned") = Arc::new(loaded);
        *seen = now;
        Ok(true)
    }

    /// Checks the files every [`CERT_RELOAD_CHECK`] for as long as the process runs.
    pub fn spawn_reloader(self: &Arc<Self>) {
        let tls = Arc::downgrade(self);
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(CERT_RELOAD_CHECK);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                let Some(tls) = tls.upgrade() else { return };
                match tls.reload_if_changed() {
                    Ok(true) => tracing::info!(cert = %tls.files.cert.display(), "TLS certificate reloaded"),
                    Ok(false) => {}
                    Err(e) => tracing::warn!(error = %e, "TLS files changed but do not load; keeping the current certificate"),
                }
            }
        });
    }
}

fn stamps(files: &TlsFiles) -> Stamps {
    [&files.cert, &files.key, &files.ca]
        .iter()
        .map(|path| std::fs::metadata(path).ok().and_then(|m| Some((m.modified().ok()?, m.len()))))
        .collect()
}

fn build(files: &TlsFiles, node_name: &str) -> Result<Loaded, TlsError> {
    let certs = read_certs("certificates", &files.cert)?;
    if !carries_name(&certs[0], node_name) {
        return Err(TlsError::NotANodeCertificate { path: files.cert.clone(), name: node_name.to_owned() });
    }
    let key = read_key(&files.key)?;
    let roots = read_roots(&files.ca)?;
    let config_error = |e: rustls::Error| TlsError::Config(e.to_string());
    // Clients may connect without a certificate (they authenticate with credentials);
    // one that presents a certificate must chain to the cluster CA.
    let verifier = WebPkiClientVerifier::builder_with_provider(roots.clone(), provider())
        .allow_unauthenticated()
        .build()
        .map_err(|e| TlsError::Config(e.to_string()))?;
    let mut server = ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(config_error)?
        .with_client_cert_verifier(verifier)
        .with_single_cert(certs.clone(), key.clone_key())
        .map_err(|e| TlsError::Config(format!("certificate {} and key {} do not match: {e}", files.cert.display(), files.key.display())))?;
    server.alpn_protocols = vec![ALPN_H2.to_vec()];
    let mut client = ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(config_error)?
        .with_root_certificates(roots)
        .with_client_auth_cert(certs, key)
        .map_err(config_error)?;
    client.alpn_protocols = vec![ALPN_H2.to_vec()];
    Ok(Loaded { server: Arc::new(server), client: Arc::new(client) })
}

/// How a client (a node towards its peers, or the CLI) sets up TLS to a node.
#[derive(Clone)]
pub struct ClientTls {
    source: ClientSource,
    server_name: ServerName<'static>,
}

#[derive(Clone)]
enum ClientSource {
    /// A node: presents its node certificate, follows reloads.
    Node(Arc<NodeTls>),
    /// A client: verifies the server only.
    Fixed(Arc<ClientConfig>),
}

impl std::fmt::Debug for ClientTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClientTls").field("server_name", &self.server_name).finish_non_exhaustive()
    }
}

impl ClientTls {
    /// A node connecting to its peers: they must present a node certificate.
    pub fn for_node(tls: Arc<NodeTls>) -> Result<Self, TlsError> {
        let server_name = server_name(tls.node_name())?;
        Ok(Self { source: ClientSource::Node(tls), server_name })
    }

    /// A client that trusts the CA in `ca` and expects servers named `server_name`
    /// (a node's reserved name by default: any node of the cluster).
    pub fn for_client(ca: &Path, server_name_to_verify: &str) -> Result<Self, TlsError> {
        let roots = read_roots(ca)?;
        let mut config = ClientConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .map_err(|e| TlsError::Config(e.to_string()))?
            .with_root_certificates(roots)
            .with_no_client_auth();
        config.alpn_protocols = vec![ALPN_H2.to_vec()];
        Ok(Self { source: ClientSource::Fixed(Arc::new(config)), server_name: server_name(server_name_to_verify)? })
    }

    /// The same set-up expecting servers named `name`.
    pub fn with_server_name(self, name: &str) -> Self {
        Self { server_name: server_name(name).expect("a valid server name"), ..self }
    }

    pub fn config(&self) -> Arc<ClientConfig> {
        match &self.source {
            ClientSource::Node(tls) => tls.client_config(),
            ClientSource::Fixed(config) => config.clone(),
        }
    }

    pub fn server_name(&self) -> ServerName<'static> {
        self.server_name.clone()
    }
}
