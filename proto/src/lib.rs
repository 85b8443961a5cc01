//! The wire contract of Strata: `strata.v1` (public) and `strata.v1.raft` (node to node).
//!
//! Generated at build time from `proto/strata/v1/*.proto`. Two pieces of logic live here:
//! [`detail_of`], the client-side decoding of the typed error every status carries, so the
//! CLI, the tests and the chaos suite read errors one way; [`codec`], the gRPC codec
//! every generated client and server uses; and [`read_response`], the read message a
//! server fills with events it encodes itself.

pub mod codec;
pub mod read_response;

/// The public API: streams, cluster administration, typed error details.
pub mod v1 {
    tonic::include_proto!("strata.v1");
    pub use crate::read_response::ReadResponse;

    /// Node-to-node Raft transport.
    pub mod raft {
        tonic::include_proto!("strata.v1.raft");
    }
}

/// The typed [`v1::ErrorDetail`] a Strata server puts in a status's details, if any.
pub fn detail_of(status: &tonic::Status) -> Option<v1::ErrorDetail> {
    use prost::Message;
    if status.details().is_empty() {
        return None;
    }
    v1::ErrorDetail::decode(status.details()).ok()
}
