//! openraft's state machine over [`strata_storage::EventState`].
//!
//! Entries are applied in atomic storage batches (consecutive committed entries share one)
//! together with the applied log id and membership, so what `applied_state` reports
//! always matches the data. Snapshots are files of the events below the applied position
//! (see `strata_storage::snapshot`); building one fixes its cutoff on the state-machine
//! task (no apply runs concurrently) and writes the file without blocking later applies.
//! Recording a snapshot is a durable flush of the applied state: the Raft log may be
//! purged up to it without another flush.

use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use futures::{Stream, TryStreamExt};
use openraft::entry::RaftEntry;
use openraft::storage::{EntryResponder, RaftStateMachine};
use openraft::{EntryPayload, OptionalSend, RaftSnapshotBuilder};
use strata_storage::tier::{TierError, TierReader};
use strata_storage::{ColdEvents, Command, CompactStep, EventState, RaftLogStore};
use tokio::sync::{watch, Mutex};

use crate::codec::{decode, encode};
use crate::{CommandResponse, LogId, Snapshot, SnapshotMeta, StoredMembership, TypeConfig};

const META_CURRENT_SNAPSHOT: &str = "current_snapshot";
/// Snapshots being built are named so; one left by a crash is removed at start-up.
const BUILDING_PREFIX: &str = "building-";

/// Most entries applied in one storage batch.
pub const APPLY_GROUP_ENTRIES_MAX: usize = 256;
/// Most encoded payload bytes (roughly) applied in one storage batch.
pub const APPLY_GROUP_BYTES_MAX: usize = 16 * 1024 * 1024;

/// Longest wait between retries of a tier lookup an apply needs (the store is down).
const COLD_LOOKUP_BACKOFF_MAX: std::time::Duration = std::time::Duration::from_secs(5);

/// The payload size of an entry, for bounding apply groups.
fn entry_bytes(entry: &crate::Entry) -> usize {
    match &entry.payload {
        EntryPayload::Normal(strata_storage::Command::Appends(appends)) => {
            appends.iter().map(|a| a.payload_bytes() + 64 * a.events.len()).sum()
        }
        EntryPayload::Normal(strata_storage::Command::Control(strata_storage::ControlCommand::SaveSnapshot(snapshot))) => {
            snapshot.state.len() + 64
        }
        _ => 64,
    }
}

/// A snapshot's data: a file in the node's snapshot directory.
#[derive(Debug, Clone)]
pub struct SnapshotFile {
    pub path: PathBuf,
}

/// The last applied log index, for readers that wait for a commit token or a read index.
pub type AppliedWatch = watch::Receiver<u64>;

#[derive(serde::Serialize, serde::Deserialize)]
struct AppliedMeta {
    last_applied: Option<LogId>,
    last_membership: StoredMembership,
}

#[derive(serde::Serialize, serde::Deserialize)]
struct CurrentSnapshot {
    meta: SnapshotMeta,
    file_name: String,
}

/// The state machine of one node; cheap to clone (all handles).
#[derive(Clone)]
pub struct StateMachine {
    state: Arc<EventState>,
    raft_meta: RaftLogStore,
    snapshot_dir: PathBuf,
    applied: watch::Sender<u64>,
    /// The object-store tier, where history below the local floor is read from.
    tier: Option<Arc<TierReader>>,
    /// Held by each apply and by each release of tiered history: an apply looks up in
    /// the tier exactly the ids it no longer holds locally, so nothing may be released
    /// between that lookup and its decision.
    apply_gate: Arc<Mutex<()>>,
}

impl StateMachine {
    /// Applies consecutive entries in one storage batch, then answers their proposers.
    async fn apply_group(&self, group: Vec<EntryResponder<TypeConfig>>, applied: &mut AppliedMeta) -> Result<(), io::Error> {
        let _gate = self.apply_gate.lock().await;
        let mut commands = Vec::with_capacity(group.len());
        for (entry, _) in &group {
            applied.last_applied = Some(entry.log_id());
            commands.push(match &entry.payload {
                EntryPayload::Normal(command) => Some(command),
                EntryPayload::Membership(membership) => {
                    applied.last_membership = StoredMembership::new(Some(entry.log_id()), membership.clone());
                    None
                }
                EntryPayload::Blank => None,
            });
        }
        let cold = self.resolve_cold(&commands).await?;
        let (outcomes, staged) = self.state.stage_entries(&commands, &encode(&*applied), &cold)?;
        // The entries are committed and their outcomes final, so proposers are answered
        // before the sled write (two synchronous write-backs) instead of after it. Reads
        // still see the entries only once they are written: the applied watch, which
        // session and linearizable reads wait on, moves after `commit_staged`.
        for ((_, responder), outcome) in group.into_iter().zip(outcomes) {
            if let Some(responder) = responder {
                responder.send(CommandResponse { outcomes: outcome.appends, control: outcome.control });
            }
        }
        // Off the async runtime: the write may wait on the disk (the chunk log's fdatasync,
        // sled's write-back), and on a small machine the runtime's few workers also carry
        // the heartbeats. Inline, a flood under CI load cost the leader its term.
        let state = self.state.clone();
        tokio::task::spawn_blocking(move || state.commit_staged(staged)).await.map_err(io::Error::other)??;
        let last_index = applied.last_applied.as_ref().map_or(0, |id| id.index());
        self.applied.send_replace(last_index);
        Ok(())
    }

    /// The tiered events the idempotency checks of `commands` need. The answer must be
    /// the tier's, whatever it costs: deciding without it could differ from a node that
    /// still holds those events locally. So an unreachable store stalls this node's
    /// applies (retrying, logged) rather than let it decide differently.
    async fn resolve_cold(&self, commands: &[Option<&Command>]) -> Result<ColdEvents, io::Error> {
        let ids = self.state.ids_to_resolve(commands)?;
        if ids.is_empty() {
            return Ok(ColdEvents::new());
        }
        let Some(tier) = &self.tier else {
            return Err(io::Error::other("history below this node's floor is tiered, but no object store is configured"));
        };
        let mut backoff = std::time::Duration::from_millis(50);
        loop {
            match tier.lookup_ids(&ids).await {
                Ok(found) => return Ok(found),
                Err(TierError::Corrupt(e)) => return Err(e.into()),
                Err(e) => {
                    tracing::warn!(error = %e, ids = ids.len(), "idempotency check needs the tier, which failed; retrying");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(COLD_LOOKUP_BACKOFF_MAX);
                }
            }
        }
    }

    /// Sets the object-store tier this node reads history below its floor from.
    pub fn with_tier(mut self, tier: Option<Arc<TierReader>>) -> Self {
        self.tier = tier;
        self
    }

    /// Releases the local copy of history below `watermark` (durable in the tier and
    /// visible to this node's tier reader): `EventState::release_below` moves the floor,
    /// in a turn of the apply gate, so that no apply decides on ids between the floor's
    /// two positions. The released records stay in the file until the next compaction.
    pub async fn release_tiered(&self, watermark: u64) -> Result<u64, io::Error> {
        self.in_gate_turn(move |state| state.release_below(watermark)).await
    }

    /// Compacts the applied state's database when it is due, one step
    /// (`EventState::compact_step`) per turn of the apply gate, so that applies never
    /// queue behind more than one step. Whether a fresh generation was switched in.
    pub async fn compact_state(&self) -> Result<bool, io::Error> {
        loop {
            match self.in_gate_turn(|state| state.compact_step()).await? {
                CompactStep::Idle => return Ok(false),
                CompactStep::Switched => return Ok(true),
                CompactStep::Copying => {}
            }
        }
    }

    /// Runs `work` on the applied state in one turn of the apply gate (no apply, release,
    /// compaction step or snapshot install runs beside it), off the async runtime.
    async fn in_gate_turn<T: Send + 'static>(
        &self,
        work: impl FnOnce(&EventState) -> Result<T, strata_storage::StorageError> + Send + 'static,
    ) -> Result<T, io::Error> {
        let _gate = self.apply_gate.lock().await;
        let state = self.state.clone();
        Ok(tokio::task::spawn_blocking(move || work(&state)).await.map_err(io::Error::other)??)
    }

    pub fn new(state: Arc<EventState>, raft_meta: RaftLogStore, snapshot_dir: &Path) -> Result<Self, io::Error> {
        std::fs::create_dir_all(snapshot_dir)?;
        for entry in std::fs::read_dir(snapshot_dir)? {
            let entry = entry?;
            if entry.file_name().to_string_lossy().starts_with(BUILDING_PREFIX) {
                std::fs::remove_file(entry.path())?;
            }
        }
        let machine = Self {
            state,
            raft_meta,
            snapshot_dir: snapshot_dir.to_path_buf(),
            applied: watch::Sender::new(0),
            tier: None,
            apply_gate: Arc::new(Mutex::new(())),
        };
        let applied_index = machine.read_applied()?.last_applied.map_or(0, |id| id.index());
        machine.applied.send_replace(applied_index);
        Ok(machine)
    }

    /// The applied state shared with readers.
    pub fn events(&self) -> &Arc<EventState> {
        &self.state
    }

    /// Watches the last applied log index.
    pub fn applied_watch(&self) -> AppliedWatch {
        self.applied.subscribe()
    }

    fn read_applied(&self) -> Result<AppliedMeta, io::Error> {
        match self.state.applied_meta()? {
            None => Ok(AppliedMeta { last_applied: None, last_membership: StoredMembership::default() }),
            Some(bytes) => decode("applied metadata", &bytes),
        }
    }

    fn current_snapshot(&self) -> Result<Option<CurrentSnapshot>, io::Error> {
        match self.raft_meta.get_meta(META_CURRENT_SNAPSHOT)? {
            None => Ok(None),
            Some(bytes) => Ok(Some(decode("current snapshot", &bytes)?)),
        }
    }

    /// Records `file_name` as the current snapshot and deletes the older snapshot files.
    fn set_current_snapshot(&self, meta: &SnapshotMeta, file_name: &str) -> Result<(), io::Error> {
        let record = CurrentSnapshot { meta: meta.clone(), file_name: file_name.to_string() };
        // The applied state lives in a database of its own: durable before the record
        // that lets the log below the snapshot go.
        self.state.sync()?;
        self.raft_meta.put_meta(META_CURRENT_SNAPSHOT, &encode(&record), true)?;
        for entry in std::fs::read_dir(&self.snapshot_dir)? {
            let entry = entry?;
            let name = entry.file_name().to_string_lossy().to_string();
            if name != file_name && name.starts_with("snapshot-") {
                let _ = std::fs::remove_file(entry.path());
            }
        }
        Ok(())
    }

    /// A fresh path for an incoming snapshot transfer.
    pub fn incoming_snapshot_path(&self) -> PathBuf {
        let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos());
        self.snapshot_dir.join(format!("incoming-{nanos}.bin"))
    }
}

fn snapshot_file_name(last_applied: &Option<LogId>) -> String {
    match last_applied {
        Some(id) => format!("snapshot-{:020}.bin", id.index()),
        None => "snapshot-empty.bin".to_string(),
    }
}

/// Writes the snapshot fixed by [`StateMachine::try_create_snapshot_builder`]: its header
/// and control state are already in the file, the events follow.
pub struct SnapshotBuilder {
    machine: StateMachine,
    meta: SnapshotMeta,
    begun: Result<strata_storage::SnapshotInProgress, String>,
}

impl RaftSnapshotBuilder<TypeConfig> for SnapshotBuilder {
    type SnapshotData = SnapshotFile;

    async fn build_snapshot(&mut self) -> Result<Snapshot, io::Error> {
        let file_name = snapshot_file_name(&self.meta.last_log_id);
        let path = self.machine.snapshot_dir.join(&file_name);
        let machine = self.machine.clone();
        let begun = self.begun.clone().map_err(io::Error::other)?;
        let building = begun.path().to_path_buf();
        let summary = tokio::task::spawn_blocking(move || machine.state.finish_snapshot(begun))
            .await
            .map_err(io::Error::other)??;
        // Built under its own name, so a current snapshot of the same index that is being
        // sent to a follower is never truncated under it.
        std::fs::rename(&building, &path)?;
        self.machine.set_current_snapshot(&self.meta, &file_name)?;
        tracing::info!(
            log_index = self.meta.last_log_id.as_ref().map_or(0, |id| id.index()),
            events = summary.events,
            bytes = summary.bytes,
            "raft snapshot built"
        );
        Ok(Snapshot { meta: self.meta.clone(), snapshot: SnapshotFile { path } })
    }
}

impl RaftStateMachine<TypeConfig> for StateMachine {
    type SnapshotData = SnapshotFile;
    type SnapshotBuilder = SnapshotBuilder;

    async fn applied_state(&mut self) -> Result<(Option<LogId>, StoredMembership), io::Error> {
        let applied = self.read_applied()?;
        Ok((applied.last_applied, applied.last_membership))
    }

    async fn apply<Strm>(&mut self, mut entries: Strm) -> Result<(), io::Error>
    where
        Strm: Stream<Item = Result<EntryResponder<TypeConfig>, io::Error>> + Unpin + OptionalSend,
    {
        let mut applied = self.read_applied()?;
        let mut group: Vec<EntryResponder<TypeConfig>> = Vec::new();
        let mut group_bytes = 0usize;
        loop {
            let next = entries.try_next().await?;
            let done = next.is_none();
            if let Some((entry, responder)) = next {
                group_bytes += entry_bytes(&entry);
                group.push((entry, responder));
            }
            // Committed entries arrive together under load; they share one storage batch
            // (bounded, so catching up on a long log does not hold it all in memory).
            let full = group.len() >= APPLY_GROUP_ENTRIES_MAX || group_bytes >= APPLY_GROUP_BYTES_MAX;
            if (done || full) && !group.is_empty() {
                self.apply_group(std::mem::take(&mut group), &mut applied).await?;
                group_bytes = 0;
            }
            if done {
                return Ok(());
            }
        }
    }

    async fn try_create_snapshot_builder(&mut self, _force: bool) -> Option<Self::SnapshotBuilder> {
        Some(self.get_snapshot_builder().await)
    }

    async fn get_snapshot_builder(&mut self) -> Self::SnapshotBuilder {
        // Runs on the state-machine task: no entry is being applied, so the applied log id,
        // the cutoff position and the control state written here describe the same state.
        // Writing the control state blocks applies for as long as that takes (groups and
        // aggregate snapshots are bounded); the events, the bulk, are written later.
        let applied = self.read_applied().expect("applied metadata is readable");
        let meta = SnapshotMeta { last_log_id: applied.last_applied, last_membership: applied.last_membership };
        let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos());
        let path = self.snapshot_dir.join(format!("{BUILDING_PREFIX}{nanos}.bin"));
        let begun = self.state.begin_snapshot(&path, self.state.next_position()).map_err(|e| e.to_string());
        SnapshotBuilder { machine: self.clone(), meta, begun }
    }

    async fn install_snapshot(&mut self, meta: &SnapshotMeta, snapshot: SnapshotFile) -> Result<(), io::Error> {
        let file_name = snapshot_file_name(&meta.last_log_id);
        let path = self.snapshot_dir.join(&file_name);
        let incoming = snapshot.path.parent() == Some(self.snapshot_dir.as_path())
            && snapshot.path.file_name().is_some_and(|n| n.to_string_lossy().starts_with("incoming-"));
        if incoming {
            std::fs::rename(&snapshot.path, &path)?;
        } else if snapshot.path != path {
            std::fs::copy(&snapshot.path, &path)?;
        }
        let applied = AppliedMeta { last_applied: meta.last_log_id, last_membership: meta.last_membership.clone() };
        let install_path = path.clone();
        let applied_bytes = encode(&applied);
        // In a turn of the apply gate: a release or compaction step must not write to the
        // state this replaces, nor move its floor, while it is swapped.
        let summary = self.in_gate_turn(move |state| state.install_snapshot(&install_path, &applied_bytes)).await?;
        self.set_current_snapshot(meta, &file_name)?;
        self.applied.send_replace(meta.last_log_id.as_ref().map_or(0, |id| id.index()));
        tracing::info!(
            log_index = meta.last_log_id.as_ref().map_or(0, |id| id.index()),
            events = summary.events,
            "raft snapshot installed"
        );
        Ok(())
    }

    async fn get_current_snapshot(&mut self) -> Result<Option<Snapshot>, io::Error> {
        let Some(current) = self.current_snapshot()? else {
            return Ok(None);
        };
        let path = self.snapshot_dir.join(&current.file_name);
        if !path.exists() {
            return Ok(None);
        }
        Ok(Some(Snapshot { meta: current.meta, snapshot: SnapshotFile { path } }))
    }
}
