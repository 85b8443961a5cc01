//! Agreement: openraft wired onto Strata's storage and a tonic transport.
//!
//! - [`TypeConfig`]: the one openraft type declaration (aliases below hide the generics);
//! - [`LogStore`] / [`StateMachine`]: openraft's storage traits over `strata-storage`;
//! - [`Network`]: openraft's network over the internal `RaftTransport` gRPC service, which
//!   [`RaftTransportService`] serves;
//! - [`raft_config`]: timing and snapshot settings, as named constants.

mod codec;
mod config;
mod log_store;
mod network;
mod resync;
mod state_machine;
mod transport_service;

pub use config::{HTTP2_CONNECTION_WINDOW_BYTES, HTTP2_STREAM_WINDOW_BYTES, 
    raft_config, ELECTION_TIMEOUT_MS_MAX, ELECTION_TIMEOUT_MS_MIN, HEARTBEAT_INTERVAL_MS, RAFT_RPC_MESSAGE_BYTES_MAX,
    SNAPSHOT_LOGS_SINCE_LAST, SNAPSHOT_CHUNK_BYTES,
};
pub use log_store::LogStore;
pub use network::{Network, PeerChannels};
pub use resync::{snapshot_applied_state_ahead_of_log, ResyncGate};
pub use state_machine::{AppliedWatch, SnapshotFile, StateMachine};
pub use transport_service::{RaftTransportService, node_peers_only, stopped};

use strata_storage::{AppendOutcome, Command, ControlOutcome};

openraft::declare_raft_types!(
    /// Strata's openraft types: commands are append batches, nodes are gRPC addresses.
    pub TypeConfig:
        D = Command,
        R = CommandResponse,
        NodeId = NodeId,
        Node = openraft::impls::BasicNode,
);

pub type NodeId = u64;
pub type Raft = openraft::Raft<TypeConfig, StateMachine>;
pub type LogId = openraft::alias::LogIdOf<TypeConfig>;
pub type Vote = openraft::alias::VoteOf<TypeConfig>;
pub type Entry = openraft::alias::EntryOf<TypeConfig>;
pub type Membership = openraft::Membership<NodeId, openraft::impls::BasicNode>;
pub type StoredMembership = openraft::alias::StoredMembershipOf<TypeConfig>;
pub type SnapshotMeta = openraft::alias::SnapshotMetaOf<TypeConfig>;
pub type Snapshot = openraft::Snapshot<
    <openraft::alias::LeaderIdOf<TypeConfig> as openraft::vote::RaftLeaderId>::Committed,
    NodeId,
    openraft::impls::BasicNode,
    SnapshotFile,
>;
pub type RaftMetrics = openraft::RaftMetrics<TypeConfig>;
/// Why a client write failed.
pub type ClientWriteFailure = openraft::error::RaftError<TypeConfig, openraft::error::ClientWriteError<TypeConfig>>;

/// Where to go instead when `failure` says the write was refused before it was proposed
/// (this node does not lead): nothing of it reached the log, so the caller may answer that
/// it was not written. None for every other failure, among them an entry that reached the
/// log and was discarded there (`LogEntryDiscarded`: another node may have committed it,
/// so its outcome is unknown), which openraft's own `forward_to_leader()` does not tell
/// apart from a refusal.
pub fn refused_before_proposal(failure: &ClientWriteFailure) -> Option<&openraft::error::ForwardToLeader<TypeConfig>> {
    match failure {
        openraft::error::RaftError::APIError(openraft::error::ClientWriteError::ForwardToLeader(forward)) => Some(forward),
        _ => None,
    }
}

/// The result of applying one entry: one outcome per append, in the entry's order, or the
/// outcome of its control command.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct CommandResponse {
    pub outcomes: Vec<AppendOutcome>,
    pub control: Option<ControlOutcome>,
}

#[cfg(test)]
mod tests {
    use super::*;
    use openraft::error::{ClientWriteError, ForwardToLeader, RaftError};

    #[test]
    fn only_a_refusal_counts_as_not_proposed() {
        let refused: ClientWriteFailure = RaftError::APIError(ClientWriteError::ForwardToLeader(ForwardToLeader::empty()));
        assert!(refused_before_proposal(&refused).is_some());
        // Discarded from the log after it was proposed: the outcome is unknown.
        let discarded: ClientWriteFailure = RaftError::APIError(ClientWriteError::LogEntryDiscarded(ForwardToLeader::empty()));
        assert!(discarded.forward_to_leader().is_some(), "openraft's accessor lumps the two together");
        assert!(refused_before_proposal(&discarded).is_none());
    }
}
