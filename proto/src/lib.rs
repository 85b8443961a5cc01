//! The wire contract of Strata: `strata.v1` (public) and `strata.v1.raft` (node to node).
//!
//! Generated at build time from `proto/strata/v1/*.proto`; no logic lives here.

/// The public API: streams, cluster administration, typed error details.
pub mod v1 {
    tonic::include_proto!("strata.v1");

    /// Node-to-node Raft transport.
    pub mod raft {
        tonic::include_proto!("strata.v1.raft");
    }
}
