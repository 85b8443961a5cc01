//! The `strata` server and its tools.
//!
//! - [`server`]: wiring of storage, Raft, the gRPC services and HTTP; start-up and shutdown.
//! - [`api`]: the public gRPC services (`Streams`, `Cluster`).
//! - [`batcher`]: group commit: concurrent appends share one Raft entry.
//! - [`discovery`]: gossip on a node: its advert, cluster formation from seeds, joining.
//! - [`membership`]: membership changes on the leader, auto-promotion, auto-removal.
//! - [`routing`]: leader forwarding and read consistency (linearizable, local, session).
//! - [`error`]: the one place typed errors become gRPC status codes (SPEC §4).
//! - [`limits`]: every limit as a named constant (SPEC §8).
//! - [`cli`], [`manager`], [`dev`], [`bench`]: the client commands, the cluster manager, the
//!   local dev cluster, the benchmark.

pub mod access;
pub mod api;
pub mod batcher;
pub mod bench;
pub mod bootstrap;
pub mod chaos;
pub mod cli;
pub mod cli_cert;
pub mod cli_group;
pub mod cli_snapshot;
pub mod cli_user;
pub mod clock;
pub mod compose;
pub mod config;
pub mod control;
pub mod dev;
pub mod discovery;
pub mod error;
pub mod groups;
pub mod http;
pub mod limits;
pub mod manager;
pub mod membership;
pub mod metrics;
pub mod routing;
pub mod scavenge;
pub mod server;
pub mod tier;
