//! The server's settings: one typed struct from flags or `STRATA_*` environment variables,
//! validated once at start-up and logged once.

use std::net::SocketAddr;
use std::path::PathBuf;

use clap::Args;

use crate::limits::{
    CLUSTER_SECRET_BYTES_MIN, EVENT_BYTES_MAX_CEILING, EVENT_BYTES_MAX_DEFAULT, SNAPSHOT_STATE_BYTES_MAX_CEILING, SNAPSHOT_STATE_BYTES_MAX_DEFAULT,
};

/// `strata serve` settings.
#[derive(Args, Debug, Clone)]
pub struct NodeConfig {
    /// This node's id in the cluster (non-zero, unique). Omit it with
    /// `--node-id-from-hostname`.
    #[arg(long, env = "STRATA_NODE_ID", default_value_t = 0)]
    pub node_id: u64,
    /// Take the node id from the host name's ordinal suffix, as a StatefulSet or the
    /// compose file names hosts: `strata-0` is node 1, `strata-1` node 2, ...
    #[arg(long, env = "STRATA_NODE_ID_FROM_HOSTNAME", conflicts_with = "node_id")]
    pub node_id_from_hostname: bool,
    /// Where the Raft log, the applied state and snapshots live.
    #[arg(long, env = "STRATA_DATA_DIR")]
    pub data_dir: PathBuf,
    /// gRPC listen address: the public API and the Raft transport.
    #[arg(long, env = "STRATA_GRPC_ADDR", default_value = "127.0.0.1:7701")]
    pub grpc_addr: SocketAddr,
    /// HTTP listen address: /health/live, /health/ready, /metrics.
    #[arg(long, env = "STRATA_HTTP_ADDR", default_value = "127.0.0.1:7781")]
    pub http_addr: SocketAddr,
    /// Host other nodes use to reach this one (default: the gRPC listen host).
    #[arg(long, env = "STRATA_ADVERTISE_HOST")]
    pub advertise_host: Option<String>,
    /// Static membership: `id=host:port,...` (gRPC addresses, this node included). The
    /// lowest id initializes the cluster once every peer answers and none has one yet.
    #[arg(long, env = "STRATA_PEERS", value_delimiter = ',')]
    pub peers: Vec<String>,
    /// Name of the cluster (appears in Raft and logs). It is also the gossip cluster id:
    /// nodes gossip only with nodes of the same name and secret.
    #[arg(long, env = "STRATA_CLUSTER_NAME", default_value = "strata")]
    pub cluster_name: String,
    /// UDP address gossip binds (discovery, liveness, leader hints).
    #[arg(long, env = "STRATA_GOSSIP_ADDR", default_value = "127.0.0.1:7791")]
    pub gossip_addr: SocketAddr,
    /// Gossip discovery: `host:port` gossip addresses of nodes to contact first (DNS names
    /// are re-resolved, so Kubernetes and compose service names work).
    #[arg(long, env = "STRATA_SEEDS", value_delimiter = ',')]
    pub seeds: Vec<String>,
    /// Gossip discovery: once this many pristine nodes see each other and none reports an
    /// existing cluster, the lowest id initializes Raft with them. Without it a node only
    /// joins a cluster it finds.
    #[arg(long, env = "STRATA_INITIAL_CLUSTER_SIZE")]
    pub initial_cluster_size: Option<usize>,
    /// Secret that authenticates every gossip datagram (needed for gossip).
    #[arg(long, env = "STRATA_CLUSTER_SECRET", conflicts_with = "cluster_secret_file")]
    pub cluster_secret: Option<Secret>,
    /// File holding the gossip secret (surrounding whitespace ignored).
    #[arg(long, env = "STRATA_CLUSTER_SECRET_FILE")]
    pub cluster_secret_file: Option<PathBuf>,
    /// Caught-up learners are promoted to voters automatically up to this many voters;
    /// beyond it they stay learners and serve local reads.
    #[arg(long, env = "STRATA_MAX_VOTERS", default_value_t = 5)]
    pub max_voters: usize,
    /// Remove a member that gossip has seen dead for this many seconds (off by default:
    /// removal is explicit, `strata cluster remove`).
    #[arg(long, env = "STRATA_AUTO_REMOVE_AFTER")]
    pub auto_remove_after: Option<u64>,
    /// Largest event accepted (data + metadata + type), in bytes; at most 16 MiB.
    #[arg(long, env = "STRATA_MAX_EVENT_BYTES", default_value_t = EVENT_BYTES_MAX_DEFAULT)]
    pub max_event_bytes: usize,
    /// Largest aggregate snapshot state accepted, in bytes; at most 16 MiB.
    #[arg(long, env = "STRATA_MAX_SNAPSHOT_BYTES", default_value_t = SNAPSHOT_STATE_BYTES_MAX_DEFAULT)]
    pub max_snapshot_bytes: usize,
    /// Local address this node's connections to other nodes start from (default: chosen
    /// by the kernel). `strata dev` gives each node its own loopback address, so that
    /// `strata cluster chaos partition` can cut one node's traffic off.
    #[arg(long, env = "STRATA_SOURCE_IP")]
    pub source_ip: Option<std::net::IpAddr>,
    /// Log format: `text` or `json`.
    #[arg(long, env = "STRATA_LOG_FORMAT", default_value = "text")]
    pub log_format: String,
    /// Object store for settled history: `file:///dir` (a directory every node of the
    /// cluster sees, as `strata dev` and the compose file set up) or `s3://bucket/prefix`.
    /// Every node of a cluster must name the same store. Without it nothing is tiered and
    /// every event stays on the nodes' disks.
    #[arg(long, env = "STRATA_OBJECT_STORE")]
    pub object_store: Option<String>,
    /// S3 endpoint for an `s3://` store (MinIO, a local S3 server); default: AWS.
    #[arg(long, env = "STRATA_S3_ENDPOINT")]
    pub s3_endpoint: Option<String>,
    /// File of `KEY=value` lines (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_SESSION_TOKEN,
    /// AWS_REGION) for an `s3://` store; otherwise the standard AWS environment variables.
    #[arg(long, env = "STRATA_S3_CREDENTIALS_FILE")]
    pub s3_credentials_file: Option<PathBuf>,
    /// Hot window by count: an event is settled (tiered) once this many newer events follow it...
    #[arg(long, env = "STRATA_HOT_WINDOW_EVENTS", default_value_t = HOT_WINDOW_EVENTS_DEFAULT)]
    pub hot_window_events: u64,
    /// ...or once this many bytes of newer events follow it...
    #[arg(long, env = "STRATA_HOT_WINDOW_BYTES", default_value_t = HOT_WINDOW_BYTES_DEFAULT)]
    pub hot_window_bytes: u64,
    /// ...or once it is older than this (`90s`, `15m`, `24h`, `7d`, or seconds).
    #[arg(long, env = "STRATA_HOT_WINDOW_AGE", default_value = "24h", value_parser = parse_duration)]
    pub hot_window_age: std::time::Duration,
    /// Settled events not yet in the tier (the store is down or slow) that the hot tier
    /// keeps accepting appends for; beyond it appends get RESOURCE_EXHAUSTED
    /// (`TIER_BACKLOG_EVENTS_MAX`) until the uploads catch up. Nothing is ever dropped.
    #[arg(long, env = "STRATA_TIER_BACKLOG_EVENTS", default_value_t = TIER_BACKLOG_EVENTS_DEFAULT)]
    pub tier_backlog_events: u64,
    /// How often the background scavenge runs: the leader replicates which events
    /// retention and deletes hide for good, then every node drops their payloads from
    /// its own copy and the leader from the tier (`90s`, `15m`, `1h`, or seconds).
    #[arg(long, env = "STRATA_SCAVENGE_INTERVAL", default_value = "60s", value_parser = parse_duration)]
    pub scavenge_interval: std::time::Duration,
    /// This node's TLS settings (or `--insecure`).
    #[command(flatten)]
    pub tls: ServerTlsArgs,
    /// Open client and peer connections the gRPC port takes at once; past it new
    /// connections are closed at once.
    #[arg(long, env = "STRATA_MAX_CONNECTIONS", default_value_t = crate::limits::GRPC_CONNECTIONS_MAX_DEFAULT)]
    pub max_connections: usize,
    /// Appends a leader queues for its batcher; past it appends get RESOURCE_EXHAUSTED
    /// with a retry-after hint (`PROPOSAL_QUEUE_APPENDS_MAX`).
    #[arg(long, env = "STRATA_PROPOSAL_QUEUE_APPENDS", default_value_t = crate::limits::PROPOSAL_QUEUE_APPENDS_MAX)]
    pub proposal_queue_appends: usize,
    /// Client calls this node handles at once, over all connections; past it a call is
    /// refused with RESOURCE_EXHAUSTED before its body is decoded (Raft traffic is exempt).
    #[arg(long, env = "STRATA_MAX_CALLS_IN_FLIGHT", default_value_t = crate::limits::GRPC_CALLS_IN_FLIGHT_MAX_DEFAULT)]
    pub max_calls_in_flight: usize,
    /// Live subscriptions this node serves at once; past it RESOURCE_EXHAUSTED.
    #[arg(long, env = "STRATA_MAX_SUBSCRIPTIONS", default_value_t = crate::limits::SUBSCRIPTIONS_MAX_DEFAULT)]
    pub max_subscriptions: usize,
    /// How long a token from `strata login` is valid, in seconds (at most a week).
    #[arg(long, env = "STRATA_TOKEN_TTL_SECS", default_value_t = crate::limits::TOKEN_TTL_SECS_DEFAULT)]
    pub token_ttl_secs: u64,
    /// File holding the password of the first admin (user `admin`), created by the leader
    /// while the cluster has no users; later restarts with it change nothing. Without it
    /// (and without STRATA_ADMIN_PASSWORD) a TLS cluster starts with no users: only node
    /// certificates can act until an admin is added.
    #[arg(long, env = "STRATA_ADMIN_PASSWORD_FILE", conflicts_with = "admin_password")]
    pub admin_password_file: Option<PathBuf>,
    /// The first admin's password itself (an environment variable from a Secret; on the
    /// command line it would show in `ps`).
    #[arg(long, env = "STRATA_ADMIN_PASSWORD", hide = true)]
    pub admin_password: Option<Secret>,
}

/// A node's TLS: its certificate and key, and the cluster CA. Plaintext needs
/// `--insecure`, said out loud.
#[derive(Args, Debug, Clone, Default)]
pub struct ServerTlsArgs {
    /// This node's certificate chain (PEM). It must carry the node name
    /// (`--tls-node-name`) and chain to `--tls-ca`: `strata cert node` creates one.
    #[arg(long, env = "STRATA_TLS_CERT", requires_all = ["tls_key", "tls_ca"])]
    pub tls_cert: Option<PathBuf>,
    /// This node's private key (PEM).
    #[arg(long, env = "STRATA_TLS_KEY", requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
    /// The cluster CA (PEM): peers must present a certificate from it.
    #[arg(long, env = "STRATA_TLS_CA", requires = "tls_cert")]
    pub tls_ca: Option<PathBuf>,
    /// The name every node certificate carries; a peer without it cannot replicate or vote.
    #[arg(long, env = "STRATA_TLS_NODE_NAME", default_value = strata_security::NODE_NAME_DEFAULT)]
    pub tls_node_name: String,
    /// Serve plaintext gRPC without TLS: for development only (`strata dev` uses it).
    #[arg(long, env = "STRATA_INSECURE", conflicts_with = "tls_cert")]
    pub insecure: bool,
}

impl ServerTlsArgs {
    /// The node's TLS set-up, or None under `--insecure`; an error if neither is given.
    pub fn load(&self) -> Result<Option<std::sync::Arc<strata_security::NodeTls>>, ConfigError> {
        let invalid = |reason: String| ConfigError::Invalid { flag: "--tls-cert", reason };
        match (&self.tls_cert, &self.tls_key, &self.tls_ca) {
            (Some(cert), Some(key), Some(ca)) => {
                let files = strata_security::TlsFiles { cert: cert.clone(), key: key.clone(), ca: ca.clone() };
                strata_security::NodeTls::load(files, &self.tls_node_name).map(Some).map_err(|e| invalid(e.to_string()))
            }
            _ if self.insecure => Ok(None),
            _ => Err(invalid(
                "TLS is required: give --tls-cert, --tls-key and --tls-ca (`strata cert` creates a CA and node certificates), \
                 or --insecure to serve plaintext for development"
                    .into(),
            )),
        }
    }
}

/// Default bound of the tiering backlog: about 1 GiB of 256-byte events beyond the window.
pub const TIER_BACKLOG_EVENTS_DEFAULT: u64 = 4_000_000;

/// Default hot window: a million events, 1 GiB, a day; whichever is reached first.
pub const HOT_WINDOW_EVENTS_DEFAULT: u64 = 1_000_000;
pub const HOT_WINDOW_BYTES_DEFAULT: u64 = 1024 * 1024 * 1024;

/// `90s`, `15m`, `24h`, `7d`, `250ms` or plain seconds.
pub fn parse_duration(text: &str) -> Result<std::time::Duration, String> {
    let text = text.trim();
    let split = text.find(|c: char| !c.is_ascii_digit()).unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let number: u64 = number.parse().map_err(|_| format!("not a duration: `{text}` (use e.g. 90s, 15m, 24h, 7d)"))?;
    let seconds = |s: u64| Ok(std::time::Duration::from_secs(number.saturating_mul(s)));
    match unit {
        "" | "s" => seconds(1),
        "ms" => Ok(std::time::Duration::from_millis(number)),
        "m" => seconds(60),
        "h" => seconds(3600),
        "d" => seconds(86_400),
        _ => Err(format!("unknown duration unit `{unit}` in `{text}` (use ms, s, m, h or d)")),
    }
}

/// How long start-up keeps trying to resolve `--advertise-host`.
const ADVERTISE_RESOLVE_TIMEOUT_SECS: u64 = 60;

/// `name-<ordinal>` → ordinal + 1 (node ids are non-zero; pod ordinals start at 0).
pub fn node_id_from_hostname(hostname: &str) -> Option<u64> {
    let short = hostname.split('.').next()?;
    let (_, ordinal) = short.rsplit_once('-')?;
    ordinal.parse::<u64>().ok()?.checked_add(1)
}

/// This machine's host name (from the kernel, as a container or pod sets it).
fn hostname() -> std::io::Result<String> {
    Ok(std::fs::read_to_string("/proc/sys/kernel/hostname")?.trim().to_string())
}

/// A secret setting: never printed, also not by `Debug` (the configuration is logged).
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(pub String);

impl std::str::FromStr for Secret {
    type Err = std::convert::Infallible;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Ok(Secret(s.to_string()))
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("<redacted>")
    }
}

/// A peer of the static membership.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Peer {
    pub id: u64,
    pub grpc_addr: String,
}

/// Invalid settings, found at start-up.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("invalid setting: {reason} flag=`{flag}`")]
    Invalid { flag: &'static str, reason: String },
}


/// A secret given as a value (an environment variable) or in a file (a mounted Secret),
/// surrounding whitespace ignored; `file_flag` names the file's flag in errors.
fn secret_value(value: Option<&Secret>, file: Option<&std::path::Path>, file_flag: &'static str) -> Result<Option<String>, ConfigError> {
    match (value, file) {
        (Some(secret), _) => Ok(Some(secret.0.trim().to_string())),
        (None, Some(path)) => std::fs::read_to_string(path)
            .map(|text| Some(text.trim().to_string()))
            .map_err(|e| ConfigError::Invalid { flag: file_flag, reason: format!("cannot read {}: {e}", path.display()) }),
        (None, None) => Ok(None),
    }
}

impl NodeConfig {
    /// The address other nodes and clients use to reach this node's gRPC server.
    pub fn advertised_grpc_addr(&self) -> String {
        self.advertised(self.grpc_addr)
    }

    /// `addr` as others reach it: the advertised host with `addr`'s port, if one is set.
    fn advertised(&self, addr: SocketAddr) -> String {
        match &self.advertise_host {
            Some(host) => format!("{host}:{}", addr.port()),
            None => addr.to_string(),
        }
    }

    /// Fills `node_id` from the host name when `--node-id-from-hostname` is set.
    pub fn resolve_node_id(&mut self) -> Result<(), ConfigError> {
        if !self.node_id_from_hostname {
            return Ok(());
        }
        let hostname = hostname().map_err(|e| ConfigError::Invalid { flag: "--node-id-from-hostname", reason: format!("no host name: {e}") })?;
        self.node_id = node_id_from_hostname(&hostname).ok_or_else(|| ConfigError::Invalid {
            flag: "--node-id-from-hostname",
            reason: format!("host name `{hostname}` does not end in -<ordinal>"),
        })?;
        Ok(())
    }

    /// The HTTP address operators and other nodes reach this node's HTTP server at.
    pub fn advertised_http_addr(&self) -> String {
        self.advertised(self.http_addr)
    }

    /// The gossip address other nodes reach this one at: the advertised host (resolved)
    /// and the gossip port.
    pub async fn advertised_gossip_addr(&self) -> Result<SocketAddr, ConfigError> {
        let Some(host) = &self.advertise_host else { return Ok(self.gossip_addr) };
        let target = format!("{host}:{}", self.gossip_addr.port());
        // A pod's own DNS record can appear a little after the pod starts: retry a while.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(ADVERTISE_RESOLVE_TIMEOUT_SECS);
        loop {
            match tokio::net::lookup_host(&target).await.map(|mut addrs| addrs.next()) {
                Ok(Some(addr)) => return Ok(addr),
                outcome if std::time::Instant::now() >= deadline => {
                    let reason = match outcome {
                        Err(e) => format!("cannot resolve `{target}` within {ADVERTISE_RESOLVE_TIMEOUT_SECS} s: {e}"),
                        Ok(_) => format!("`{target}` resolves to nothing"),
                    };
                    return Err(ConfigError::Invalid { flag: "--advertise-host", reason });
                }
                _ => tokio::time::sleep(std::time::Duration::from_millis(500)).await,
            }
        }
    }

    /// The first admin's password from `--admin-password-file` or STRATA_ADMIN_PASSWORD.
    pub fn first_admin_password(&self) -> Result<Option<String>, ConfigError> {
        let Some(password) = secret_value(self.admin_password.as_ref(), self.admin_password_file.as_deref(), "--admin-password-file")? else {
            return Ok(None);
        };
        if password.is_empty() {
            return Err(ConfigError::Invalid { flag: "--admin-password-file", reason: "the password is empty".into() });
        }
        Ok(Some(password))
    }

    /// The gossip secret from `--cluster-secret` or `--cluster-secret-file`, if any.
    pub fn gossip_secret(&self) -> Result<Option<Vec<u8>>, ConfigError> {
        let Some(secret) = secret_value(self.cluster_secret.as_ref(), self.cluster_secret_file.as_deref(), "--cluster-secret-file")? else {
            return Ok(None);
        };
        if secret.len() < CLUSTER_SECRET_BYTES_MIN {
            return Err(ConfigError::Invalid {
                flag: "--cluster-secret",
                reason: format!("must be at least CLUSTER_SECRET_BYTES_MIN={CLUSTER_SECRET_BYTES_MIN} bytes"),
            });
        }
        Ok(Some(secret.into_bytes()))
    }

    /// Parses `--peers`.
    pub fn parsed_peers(&self) -> Result<Vec<Peer>, ConfigError> {
        let mut peers = Vec::with_capacity(self.peers.len());
        for item in self.peers.iter().filter(|p| !p.trim().is_empty()) {
            let (id, addr) = item.trim().split_once('=').ok_or_else(|| ConfigError::Invalid {
                flag: "--peers",
                reason: format!("expected id=host:port, got `{item}`"),
            })?;
            let id: u64 = id.parse().map_err(|_| ConfigError::Invalid {
                flag: "--peers",
                reason: format!("node id is not a number: `{id}`"),
            })?;
            if id == 0 || addr.is_empty() {
                return Err(ConfigError::Invalid { flag: "--peers", reason: format!("bad peer `{item}`") });
            }
            if peers.iter().any(|p: &Peer| p.id == id) {
                return Err(ConfigError::Invalid { flag: "--peers", reason: format!("node id {id} listed twice") });
            }
            peers.push(Peer { id, grpc_addr: addr.to_string() });
        }
        peers.sort_by_key(|p| p.id);
        Ok(peers)
    }

    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.node_id == 0 {
            return Err(ConfigError::Invalid { flag: "--node-id", reason: "must be non-zero (or use --node-id-from-hostname)".into() });
        }
        if self.max_event_bytes == 0 || self.max_event_bytes > EVENT_BYTES_MAX_CEILING {
            return Err(ConfigError::Invalid {
                flag: "--max-event-bytes",
                reason: format!("must be 1..={EVENT_BYTES_MAX_CEILING}, got {}", self.max_event_bytes),
            });
        }
        if self.max_snapshot_bytes == 0 || self.max_snapshot_bytes > SNAPSHOT_STATE_BYTES_MAX_CEILING {
            return Err(ConfigError::Invalid {
                flag: "--max-snapshot-bytes",
                reason: format!("must be 1..={SNAPSHOT_STATE_BYTES_MAX_CEILING}, got {}", self.max_snapshot_bytes),
            });
        }
        if self.object_store.is_none() && (self.s3_endpoint.is_some() || self.s3_credentials_file.is_some()) {
            return Err(ConfigError::Invalid { flag: "--s3-endpoint", reason: "needs --object-store s3://bucket/prefix".into() });
        }
        if !matches!(self.log_format.as_str(), "text" | "json") {
            return Err(ConfigError::Invalid { flag: "--log-format", reason: "must be text or json".into() });
        }
        if !self.seeds.is_empty() && self.cluster_secret.is_none() && self.cluster_secret_file.is_none() {
            return Err(ConfigError::Invalid {
                flag: "--seeds",
                reason: "gossip needs --cluster-secret, --cluster-secret-file or STRATA_CLUSTER_SECRET".into(),
            });
        }
        if self.grpc_addr.ip().is_unspecified() && self.advertise_host.is_none() {
            return Err(ConfigError::Invalid {
                flag: "--advertise-host",
                reason: format!("the gRPC address {} is a wildcard: other nodes need a host to reach this one", self.grpc_addr),
            });
        }
        if self.initial_cluster_size == Some(0) {
            return Err(ConfigError::Invalid { flag: "--initial-cluster-size", reason: "must be at least 1".into() });
        }
        if self.max_voters == 0 {
            return Err(ConfigError::Invalid { flag: "--max-voters", reason: "must be at least 1".into() });
        }
        let peers = self.parsed_peers()?;
        if !peers.is_empty() && (!self.seeds.is_empty() || self.initial_cluster_size.is_some()) {
            return Err(ConfigError::Invalid {
                flag: "--peers",
                reason: "static --peers and gossip formation (--seeds, --initial-cluster-size) exclude each other".into(),
            });
        }
        if !peers.is_empty() && !peers.iter().any(|p| p.id == self.node_id) {
            return Err(ConfigError::Invalid {
                flag: "--peers",
                reason: format!("must include this node (id {})", self.node_id),
            });
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Wrapper {
        #[command(flatten)]
        config: NodeConfig,
    }

    fn parse(args: &[&str]) -> NodeConfig {
        let mut all = vec!["strata", "--node-id", "1", "--data-dir", "/tmp/x"];
        all.extend_from_slice(args);
        Wrapper::parse_from(all).config
    }

    #[test]
    fn peers_parse_and_validate() {
        let config = parse(&["--peers", "2=127.0.0.1:2,1=127.0.0.1:1"]);
        assert_eq!(config.parsed_peers().unwrap()[0], Peer { id: 1, grpc_addr: "127.0.0.1:1".into() });
        assert!(config.validate().is_ok());
        assert!(parse(&["--peers", "2=127.0.0.1:2"]).validate().is_err());
        assert!(parse(&["--peers", "x=1"]).validate().is_err());
        assert!(parse(&["--max-event-bytes", "999999999"]).validate().is_err());
    }

    #[test]
    fn node_ids_come_from_hostname_ordinals() {
        assert_eq!(node_id_from_hostname("strata-0"), Some(1));
        assert_eq!(node_id_from_hostname("strata-2.strata-headless.default.svc.cluster.local"), Some(3));
        assert_eq!(node_id_from_hostname("my-db-node-11"), Some(12));
        assert_eq!(node_id_from_hostname("strata"), None);
        assert_eq!(node_id_from_hostname("strata-x"), None);
    }

    #[test]
    fn gossip_settings_validate_and_the_secret_stays_secret() {
        assert!(parse(&["--seeds", "127.0.0.1:7792"]).validate().is_err(), "seeds need a secret");
        let config = parse(&["--seeds", "127.0.0.1:7792", "--cluster-secret", "correct horse battery", "--initial-cluster-size", "3"]);
        assert!(config.validate().is_ok());
        assert_eq!(config.gossip_secret().unwrap().unwrap(), b"correct horse battery");
        assert!(!format!("{config:?}").contains("horse"));
        assert!(parse(&["--cluster-secret", "short"]).gossip_secret().is_err());
        assert!(parse(&["--peers", "1=127.0.0.1:1", "--initial-cluster-size", "3"]).validate().is_err());
    }
}
