//! The gate a node holds closed while it re-syncs after its Raft log was cut short by a
//! corrupt record.
//!
//! Why: such a node may lack entries it acknowledged, and those acknowledgements may
//! have made them committed. If it voted now, Raft's "is the candidate's log at least as
//! up to date as mine" check would compare against its short log, and it could elect a
//! candidate that lacks a committed entry: an acknowledged write lost. So while the gate
//! is closed the node answers no vote, pre-vote or leadership transfer, and does not
//! stand for election; it opens once the node has applied everything the current leader
//! had committed (a read index taken from the leader), which covers every entry committed
//! before the crash.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use openraft::storage::{RaftLogStorage, RaftSnapshotBuilder, RaftStateMachine};

use crate::{LogStore, StateMachine};

/// Before openraft starts: if the applied state is ahead of the log's end, snapshots it.
/// openraft then purges the log up to the applied index, which it may only do up to a
/// snapshot (without one it refuses to start). Two ways to get there: a log cut short by
/// a corrupt record, and a crash that lost a follower's un-fsynced log tail after it had
/// applied those entries (committed on other nodes; its applied state flushed).
pub async fn snapshot_applied_state_ahead_of_log(log_store: &mut LogStore, state_machine: &mut StateMachine) -> Result<(), std::io::Error> {
    let last_log = log_store.get_log_state().await?.last_log_id.map(|id| id.index);
    let (applied, _) = state_machine.applied_state().await?;
    let applied = applied.map(|id| id.index);
    if applied > last_log {
        let snapshot = state_machine.get_snapshot_builder().await.build_snapshot().await?;
        tracing::warn!(?last_log, ?applied, index = ?snapshot.meta.last_log_id, "applied state ahead of the raft log: snapshot taken before starting");
    }
    Ok(())
}

#[derive(Clone, Debug, Default)]
pub struct ResyncGate {
    resyncing: Arc<AtomicBool>,
}

impl ResyncGate {
    /// A gate closed (`resyncing = true`) or open.
    pub fn new(resyncing: bool) -> Self {
        Self { resyncing: Arc::new(AtomicBool::new(resyncing)) }
    }

    pub fn is_resyncing(&self) -> bool {
        self.resyncing.load(Ordering::Acquire)
    }

    /// The node has caught up: it votes and may lead again.
    pub fn open(&self) {
        self.resyncing.store(false, Ordering::Release);
    }
}
