//! Persistent subscription groups (SPEC §3 item 7): settings, the leader's per-group
//! runtimes (`runtime`), and parked events (`parked`).
//!
//! A group's definition and checkpoints are replicated control state (`strata-storage`'s
//! `GroupRecord`); its deliveries run only on the leader, in one [`runtime::Runtime`] per
//! group, started by the first consumer that connects and stopped when this node stops
//! leading or the group is deleted.

pub mod parked;
pub mod runtime;
pub mod settings;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use prost::Message;
use strata_proto::v1::{GroupInfo, GroupSettings};
use strata_storage::{EventState, GroupRecord, StorageError};
use tokio::sync::{mpsc, oneshot};

use crate::api::NodeContext;
use crate::error::ApiError;
use runtime::{Request, Runtime, RuntimeInfo};

/// How long `Info` waits for a running group's figures.
const INFO_WAIT_MS: u64 = 1_000;

/// The runtimes of the groups this node (as leader) runs.
#[derive(Default)]
pub struct Groups {
    runtimes: Mutex<HashMap<String, (u64, mpsc::Sender<Request>)>>,
}

impl Groups {
    /// The mailbox of a runtime of `name` that is still running (of group `group_id`, when given).
    fn live(runtimes: &HashMap<String, (u64, mpsc::Sender<Request>)>, name: &str, group_id: Option<u64>) -> Option<mpsc::Sender<Request>> {
        let (id, mailbox) = runtimes.get(name)?;
        (!mailbox.is_closed() && group_id.is_none_or(|g| g == *id)).then(|| mailbox.clone())
    }

    fn running_now(&self, name: &str, group_id: Option<u64>) -> Option<mpsc::Sender<Request>> {
        Self::live(&self.runtimes.lock().expect("group registry lock is never poisoned"), name, group_id)
    }

    /// The runtime of group `name`, started if it is not running. Called on the leader,
    /// after a read index: this node is confirmed to lead, and a new runtime starts from
    /// the latest replicated checkpoint.
    pub async fn runtime(&self, ctx: &Arc<NodeContext>, name: &str) -> Result<mpsc::Sender<Request>, ApiError> {
        ctx.router.linearize().await?;
        if let Some(mailbox) = self.running_now(name, None) {
            return Ok(mailbox);
        }
        let record = ctx.events.group(name)?.ok_or_else(|| ApiError::GroupNotFound { group: name.to_string() })?;
        let mut runtimes = self.runtimes.lock().expect("group registry lock is never poisoned");
        if let Some(mailbox) = Self::live(&runtimes, name, Some(record.group_id)) {
            return Ok(mailbox);
        }
        let mailbox = Runtime::start(ctx.clone(), record.clone())?;
        runtimes.insert(name.to_string(), (record.group_id, mailbox.clone()));
        Ok(mailbox)
    }

    /// The running group's live figures, if it runs here.
    async fn runtime_info(&self, record: &GroupRecord) -> Option<RuntimeInfo> {
        let mailbox = self.running_now(&record.name, Some(record.group_id))?;
        let (reply, answer) = oneshot::channel();
        mailbox.send(Request::Info { reply }).await.ok()?;
        tokio::time::timeout(Duration::from_millis(INFO_WAIT_MS), answer).await.ok()?.ok()
    }

    /// `Info` of a group: its replicated record, plus the runtime's figures when running.
    pub async fn info(&self, events: &EventState, record: &GroupRecord) -> Result<GroupInfo, ApiError> {
        let settings = GroupSettings::decode(record.settings.as_slice())
            .map_err(|e| ApiError::Internal { reason: format!("stored group settings do not decode: {e}") })?;
        let head = source_head(events, record)?;
        let runtime = self.runtime_info(record).await;
        Ok(GroupInfo {
            group: record.name.clone(),
            settings: Some(settings),
            checkpoint: record.checkpoint,
            head,
            lag: head.saturating_sub(record.checkpoint),
            in_flight: runtime.as_ref().map_or(0, |r| r.in_flight),
            parked: parked_waiting(events, record)?,
            replaying: record.parked_replay_target.saturating_sub(record.parked_replay_done),
            running: runtime.is_some(),
            consumers: runtime.map(|r| r.consumers).unwrap_or_default(),
            created_unix_ms: record.created_unix_ms,
        })
    }
}

/// The end of a group's source: the stream's head version + 1, or `$all`'s next position.
pub fn source_head(events: &EventState, record: &GroupRecord) -> Result<u64, StorageError> {
    match &record.source_stream {
        None => Ok(events.next_position()),
        Some(stream) => Ok(events.stream_head(stream)?.map_or(0, |head| head.last_version + 1)),
    }
}

/// Events of `$parked-{group}` that were not asked to be replayed.
pub fn parked_waiting(events: &EventState, record: &GroupRecord) -> Result<u64, StorageError> {
    let parked = events.stream_head(&settings::parked_stream(&record.name))?.map_or(0, |head| head.last_version + 1);
    Ok(parked.saturating_sub(record.parked_replay_target))
}
