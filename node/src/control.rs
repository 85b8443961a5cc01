//! Proposing control commands (snapshots, groups) on the leader: one Raft entry each,
//! answered from its apply result like an append.

use std::time::Duration;

use strata_storage::{Command, ControlCommand, ControlSuccess};

use crate::error::ApiError;
use crate::limits::{APPEND_APPLY_TIMEOUT_MS, LEADER_CHANGE_WAIT_MS, LOCAL_RETRY_PAUSE_MS};
use crate::routing::Router;

/// A control command's result and the log index of its entry (a commit token).
pub struct ControlApplied {
    pub success: ControlSuccess,
    pub log_index: u64,
}

/// Proposes `command` through Raft on this node (the leader) and waits for its outcome.
/// When openraft refuses while this node still leads (a new leader settling into its
/// term), it proposes again after `LOCAL_RETRY_PAUSE_MS`, for up to
/// `LEADER_CHANGE_WAIT_MS`, as appends do; refused because another node leads now, it
/// answers UNAVAILABLE (definite: nothing was proposed).
pub async fn propose(router: &Router, command: ControlCommand) -> Result<ControlApplied, ApiError> {
    let started = std::time::Instant::now();
    loop {
        match propose_once(&router.raft, command.clone()).await {
            Err(ApiError::Unavailable { .. })
                if started.elapsed() < Duration::from_millis(LEADER_CHANGE_WAIT_MS) && router.believes_it_leads() =>
            {
                tokio::time::sleep(Duration::from_millis(LOCAL_RETRY_PAUSE_MS)).await;
            }
            result => return result,
        }
    }
}

async fn propose_once(raft: &strata_raft::Raft, command: ControlCommand) -> Result<ControlApplied, ApiError> {
    let label = command.label();
    let write = raft.client_write(Command::Control(command));
    let response = match tokio::time::timeout(Duration::from_millis(APPEND_APPLY_TIMEOUT_MS), write).await {
        Err(_) => {
            return Err(ApiError::Indeterminate {
                reason: format!("{label} not applied within APPEND_APPLY_TIMEOUT_MS={APPEND_APPLY_TIMEOUT_MS}"),
                deadline: true,
            })
        }
        Ok(Err(e)) if strata_raft::refused_before_proposal(&e).is_some() => {
            let forward = strata_raft::refused_before_proposal(&e).expect("checked above");
            return Err(ApiError::Unavailable {
                reason: format!("this node stopped leading before {label} was proposed"),
                leader_id: forward.leader_id,
                leader_addr: forward.leader_node.as_ref().map(|n| n.addr.clone()),
            });
        }
        Ok(Err(e)) => return Err(ApiError::Indeterminate { reason: format!("raft write of {label} failed: {e}"), deadline: false }),
        Ok(Ok(response)) => response,
    };
    let outcome = response.data.control.ok_or_else(|| ApiError::Internal { reason: format!("{label} applied without an outcome") })?;
    Ok(ControlApplied { success: outcome.map_err(ApiError::from)?, log_index: response.log_id.index })
}
