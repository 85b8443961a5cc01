//! `strata-security`: who may connect to a node, and how.
//!
//! - [`tls`]: rustls configurations for nodes (mTLS between them) and clients, read
//!   from PEM files and reloaded when they change; the reserved node name.
//! - [`transport`]: the gRPC port's incoming connections (TLS or plain, capped) and the
//!   client-side TLS connector for tonic channels.
//! - [`certs`]: a development CA and node certificates (`strata cert`).
//! - [`auth`]: password hashes, signed expiring tokens, roles and per-stream rules.

pub mod auth;
pub mod certs;
pub mod tls;
pub mod transport;

pub use auth::{Principal, Role, StreamAccess, StreamRule, ClusterAccess};
pub use tls::{ClientTls, NODE_NAME_DEFAULT, NodeTls, TlsError, TlsFiles, install_crypto_provider};
pub use transport::{AuthChannel, BearerToken, ConnectionCounters, ConnectionLimits, PeerInfo, connect, incoming, tls_channel};
