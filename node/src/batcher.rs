//! Group commit: concurrent appends share one Raft entry and so one fsync per node.
//!
//! Appends queue in a bounded channel. The batcher takes a proposal slot (at most
//! `PROPOSALS_IN_FLIGHT_MAX` entries in flight), then drains everything queued — up to
//! `BATCH_APPENDS_MAX` appends or `BATCH_BYTES_MAX` bytes — into one entry. While the slots
//! are all busy the queue fills, so batches grow exactly when load does; an idle system
//! proposes each append at once. Throughput comes from batching, never from skipping fsync:
//! an append is answered only from its entry's apply result, after commit.

use std::sync::Arc;
use std::time::Duration;

use strata_raft::Raft;
use strata_storage::{AppendCommand, AppendOutcome, Command};
use tokio::sync::{mpsc, oneshot, OwnedSemaphorePermit, Semaphore};

use crate::error::ApiError;
use crate::limits::*;
use crate::metrics::Metrics;

/// An applied append: its outcome and the log index of its entry (the commit token).
pub struct Applied {
    pub outcome: AppendOutcome,
    pub log_index: u64,
}

struct Pending {
    command: AppendCommand,
    bytes: usize,
    reply: oneshot::Sender<Result<Applied, ApiError>>,
    /// This append's share of `PROPOSAL_QUEUE_BYTES_MAX`, given back when the batcher
    /// takes it into an entry.
    _queued_bytes: OwnedSemaphorePermit,
}

/// The handle API services use to propose appends.
#[derive(Clone)]
pub struct Batcher {
    queue: mpsc::Sender<Pending>,
    queue_appends: usize,
    queue_bytes: Arc<Semaphore>,
}

impl Batcher {
    /// Starts the batcher with room for `queue_appends` waiting appends
    /// (`--proposal-queue-appends`, `PROPOSAL_QUEUE_APPENDS_MAX` by default).
    pub fn start(raft: Raft, metrics: Arc<Metrics>, queue_appends: usize) -> Self {
        let queue_appends = queue_appends.max(BATCH_APPENDS_MAX);
        let (queue, pending) = mpsc::channel(queue_appends);
        tokio::spawn(run(raft, pending, metrics));
        Self { queue, queue_appends, queue_bytes: Arc::new(Semaphore::new(PROPOSAL_QUEUE_BYTES_MAX)) }
    }

    /// Proposes one append and waits for its apply result. Errors before the append was
    /// queued are definite; after it, the outcome is unknown unless the entry applied.
    pub async fn append(&self, command: AppendCommand) -> Result<Applied, ApiError> {
        let bytes = command.payload_bytes();
        let (reply, answer) = oneshot::channel();
        let permits = u32::try_from(bytes.max(1)).unwrap_or(u32::MAX);
        let queued_bytes = self.queue_bytes.clone().try_acquire_many_owned(permits).map_err(|_| ApiError::Overloaded {
            limit_name: "PROPOSAL_QUEUE_BYTES_MAX",
            limit_value: PROPOSAL_QUEUE_BYTES_MAX as u64,
            retry_after_ms: OVERLOAD_RETRY_AFTER_MS,
        })?;
        self.queue.try_send(Pending { command, bytes, reply, _queued_bytes: queued_bytes }).map_err(|e| match e {
            mpsc::error::TrySendError::Full(_) => ApiError::Overloaded {
                limit_name: "PROPOSAL_QUEUE_APPENDS_MAX",
                limit_value: self.queue_appends as u64,
                retry_after_ms: OVERLOAD_RETRY_AFTER_MS,
            },
            mpsc::error::TrySendError::Closed(_) => {
                ApiError::Unavailable { reason: "node is shutting down".into(), leader_id: None, leader_addr: None }
            }
        })?;
        match tokio::time::timeout(Duration::from_millis(APPEND_APPLY_TIMEOUT_MS), answer).await {
            Ok(Ok(result)) => result,
            Ok(Err(_)) => Err(ApiError::Indeterminate { reason: "the proposal was dropped".into(), deadline: false }),
            Err(_) => Err(ApiError::Indeterminate {
                reason: format!("not applied within APPEND_APPLY_TIMEOUT_MS={APPEND_APPLY_TIMEOUT_MS}"),
                deadline: true,
            }),
        }
    }
}

async fn run(raft: Raft, mut pending: mpsc::Receiver<Pending>, metrics: Arc<Metrics>) {
    let slots = Arc::new(Semaphore::new(PROPOSALS_IN_FLIGHT_MAX));
    let mut carried: Option<Pending> = None;
    loop {
        let first = match carried.take() {
            Some(first) => first,
            None => match pending.recv().await {
                Some(first) => first,
                None => return,
            },
        };
        let slot = slots.clone().acquire_owned().await.expect("semaphore is never closed");
        let mut bytes = first.bytes;
        let mut batch = vec![first];
        while batch.len() < BATCH_APPENDS_MAX {
            match pending.try_recv() {
                Ok(next) if bytes + next.bytes > BATCH_BYTES_MAX => {
                    carried = Some(next);
                    break;
                }
                Ok(next) => {
                    bytes += next.bytes;
                    batch.push(next);
                }
                Err(_) => break,
            }
        }
        metrics.batch_appends.observe(batch.len() as f64);
        let raft = raft.clone();
        tokio::spawn(async move {
            propose(&raft, batch).await;
            drop(slot);
        });
    }
}

async fn propose(raft: &Raft, batch: Vec<Pending>) {
    let (commands, replies): (Vec<AppendCommand>, Vec<_>) = batch.into_iter().map(|p| (p.command, p.reply)).unzip();
    let count = commands.len();
    match raft.client_write(Command::appends(commands)).await {
        Ok(response) => {
            let outcomes = response.data.outcomes;
            assert_eq!(outcomes.len(), count, "one outcome per append of the entry");
            let log_index = response.log_id.index;
            for (reply, outcome) in replies.into_iter().zip(outcomes) {
                let _ = reply.send(Ok(Applied { outcome, log_index }));
            }
        }
        Err(e) if strata_raft::refused_before_proposal(&e).is_some() => {
            // Refused before anything was proposed (this node no longer leads): definite.
            let forward = strata_raft::refused_before_proposal(&e).expect("checked above");
            let (leader_id, leader_addr) = (forward.leader_id, forward.leader_node.as_ref().map(|n| n.addr.clone()));
            for reply in replies {
                let _ = reply.send(Err(ApiError::Unavailable {
                    reason: "this node stopped leading before the append was proposed".into(),
                    leader_id,
                    leader_addr: leader_addr.clone(),
                }));
            }
        }
        Err(e) => {
            // The entry may have reached the log before leadership was lost: only the
            // client's retry with the same event ids can settle it.
            tracing::warn!(error = %e, appends = count, "raft write failed");
            for reply in replies {
                let _ = reply.send(Err(ApiError::Indeterminate { reason: format!("raft write failed: {e}"), deadline: false }));
            }
        }
    }
}
