//! The server's settings: one typed struct from flags or `STRATA_*` environment variables,
//! validated once at start-up and logged once.

use std::net::SocketAddr;
use std::path::PathBuf;

use clap::Args;

use crate::limits::{EVENT_BYTES_MAX_CEILING, EVENT_BYTES_MAX_DEFAULT};

/// `strata serve` settings.
#[derive(Args, Debug, Clone)]
pub struct NodeConfig {
    /// This node's id in the cluster (non-zero, unique).
    #[arg(long, env = "STRATA_NODE_ID")]
    pub node_id: u64,
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
    /// Name of the cluster (appears in Raft and logs).
    #[arg(long, env = "STRATA_CLUSTER_NAME", default_value = "strata")]
    pub cluster_name: String,
    /// Largest event accepted (data + metadata + type), in bytes; at most 16 MiB.
    #[arg(long, env = "STRATA_MAX_EVENT_BYTES", default_value_t = EVENT_BYTES_MAX_DEFAULT)]
    pub max_event_bytes: usize,
    /// Log format: `text` or `json`.
    #[arg(long, env = "STRATA_LOG_FORMAT", default_value = "text")]
    pub log_format: String,
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

impl NodeConfig {
    /// The address other nodes and clients use to reach this node's gRPC server.
    pub fn advertised_grpc_addr(&self) -> String {
        match &self.advertise_host {
            Some(host) => format!("{host}:{}", self.grpc_addr.port()),
            None => self.grpc_addr.to_string(),
        }
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
            return Err(ConfigError::Invalid { flag: "--node-id", reason: "must be non-zero".into() });
        }
        if self.max_event_bytes == 0 || self.max_event_bytes > EVENT_BYTES_MAX_CEILING {
            return Err(ConfigError::Invalid {
                flag: "--max-event-bytes",
                reason: format!("must be 1..={EVENT_BYTES_MAX_CEILING}, got {}", self.max_event_bytes),
            });
        }
        if !matches!(self.log_format.as_str(), "text" | "json") {
            return Err(ConfigError::Invalid { flag: "--log-format", reason: "must be text or json".into() });
        }
        let peers = self.parsed_peers()?;
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
}
