//! Replicated state beside the events: aggregate snapshots and persistent subscription
//! groups (definitions and checkpoints). Changed only through [`ControlCommand`]s in the
//! Raft log, applied deterministically like appends and in the same atomic batch, so a
//! group's checkpoint and a saved snapshot survive restarts and failover exactly as events
//! do, and travel in Raft snapshots (see `snapshot`).
//!
//! Keys (in the applied-state tree, beside the event keys of `keys`):
//! - `n` stream 0x00 version(u64 BE) → [`AggregateSnapshot`]
//! - `g` group name                   → [`GroupRecord`]
//! - `k` counter name                 → u64 BE (the next group id)
//! - `t` "tier"                         → [`TierState`] (the tier watermark)
//! - `r` stream                         → [`StreamMeta`] (retention, deletion; `retention`)
//! - `u`, `a`, `x`                      → users, stream rules, the token key (`access`)

use serde::{Deserialize, Serialize};

use strata_security::StreamRule;

use crate::access::{SecretBytes, UserRecord, AUTH_KEY, RULE, RULES_MAX, USER, USERS_MAX};
use crate::command::ExpectedVersion;
use crate::access;
use crate::keys;
use crate::record;
use crate::retention::{stream_meta_key, StreamMeta, STREAM_META};
use crate::StorageError;

/// Aggregate snapshots kept per stream; saving one more drops the lowest version. Bounds
/// the replicated state a stream's snapshots may take (with the state size limit the API
/// enforces).
pub const SNAPSHOTS_PER_STREAM_MAX: usize = 16;
/// Persistent subscription groups in the cluster (and so on every node).
pub const GROUPS_MAX: usize = 256;

/// The state of an aggregate folded over its stream up to and including `version`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AggregateSnapshot {
    pub stream: String,
    pub version: u64,
    pub content_type: String,
    #[serde(with = "crate::command::serde_bytes_compat")]
    pub state: Vec<u8>,
    pub created_unix_ms: i64,
}

/// Where a new group starts reading (resolved at apply time, so every node agrees).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum GroupStart {
    Start,
    End,
    /// A stream version for a stream source, an `$all` position otherwise.
    At(u64),
}

/// A persistent subscription group as replicated.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GroupRecord {
    pub name: String,
    /// Unique per creation: a checkpoint from a deleted group's runtime never lands on a
    /// new group of the same name.
    pub group_id: u64,
    /// The source stream; None for `$all`.
    pub source_stream: Option<String>,
    /// The node's settings (filter, strategy, timeouts...), opaque to storage.
    #[serde(with = "crate::command::serde_bytes_compat")]
    pub settings: Vec<u8>,
    /// Every matching event below this cursor (stream version or `$all` position) was
    /// acked, skipped or parked: it is never delivered again.
    pub checkpoint: u64,
    /// Versions of `$parked-{name}` below this are to be (re)delivered by replay...
    pub parked_replay_target: u64,
    /// ...and versions below this have been replayed and settled.
    pub parked_replay_done: u64,
    pub created_unix_ms: i64,
}

/// How far settled history has been copied to the object-store tier.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct TierState {
    /// Every event below this position is durable in the tier: nodes may drop their
    /// local copies below it, and read them from the tier.
    pub watermark: u64,
    /// Segments and bytes uploaded so far (for status and metrics).
    pub segments: u64,
    pub bytes: u64,
    /// The leader's clock when the watermark last moved.
    pub updated_unix_ms: i64,
}

/// A change to the replicated control state.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum ControlCommand {
    SaveSnapshot(AggregateSnapshot),
    /// One version, or every snapshot of the stream.
    DeleteSnapshots { stream: String, version: Option<u64> },
    CreateGroup {
        name: String,
        source_stream: Option<String>,
        #[serde(with = "crate::command::serde_bytes_compat")]
        settings: Vec<u8>,
        start: GroupStart,
        created_unix_ms: i64,
    },
    UpdateGroup {
        name: String,
        #[serde(with = "crate::command::serde_bytes_compat")]
        settings: Vec<u8>,
    },
    DeleteGroup { name: String },
    /// Moves a group's checkpoints forward (never back).
    CheckpointGroup { name: String, group_id: u64, checkpoint: u64, parked_replay_done: u64 },
    /// Asks for the parked events below `target` (a `$parked-{name}` version) to be replayed.
    ReplayParked { name: String, group_id: u64, target: u64 },
    /// Moves the tier watermark from `from` to `to` after the leader made `[from, to)`
    /// durable in the tier. Refused unless the watermark is still `from` (a concurrent or
    /// repeated upload commits once) and `to` is applied.
    AdvanceTier { from: u64, to: u64, segments: u64, bytes: u64, updated_unix_ms: i64 },
    /// Sets a stream's retention (None: no limit). The stream need not exist yet.
    SetStreamMetadata { stream: String, max_age_ms: Option<u64>, max_count: Option<u64> },
    /// Deletes a stream if `expected` holds: soft (readers see no events up to the head;
    /// appends continue its versions) or hard (a tombstone: never read or written again).
    DeleteStream { stream: String, expected: ExpectedVersion, hard: bool },
    /// Hides a stream's versions below `before` for good (the leader's scavenger proposes
    /// it for versions its retention or deletion already hides); every node then drops
    /// their payloads from its own copy, and the leader from the tier. Never moves back.
    Scavenge { stream: String, before: u64 },
    /// Sets the key tokens are signed with, unless one is set (the first leader's wins).
    SetTokenKey { key: SecretBytes },
    /// Adds a user, or (`replace`) replaces one: new password hash and roles.
    PutUser { user: UserRecord, replace: bool },
    /// The first admin: applied only while the cluster has no users.
    SeedAdmin { user: UserRecord },
    RemoveUser { name: String },
    /// Adds or replaces the rule for its pattern.
    SetStreamRule(StreamRule),
    RemoveStreamRule { pattern: String },
}

impl ControlCommand {
    /// A short name for logs (never the payloads).
    pub fn label(&self) -> &'static str {
        match self {
            ControlCommand::SaveSnapshot(_) => "save_snapshot",
            ControlCommand::DeleteSnapshots { .. } => "delete_snapshots",
            ControlCommand::CreateGroup { .. } => "create_group",
            ControlCommand::UpdateGroup { .. } => "update_group",
            ControlCommand::DeleteGroup { .. } => "delete_group",
            ControlCommand::CheckpointGroup { .. } => "checkpoint_group",
            ControlCommand::ReplayParked { .. } => "replay_parked",
            ControlCommand::AdvanceTier { .. } => "advance_tier",
            ControlCommand::SetStreamMetadata { .. } => "set_stream_metadata",
            ControlCommand::DeleteStream { .. } => "delete_stream",
            ControlCommand::Scavenge { .. } => "scavenge",
            ControlCommand::SetTokenKey { .. } => "set_token_key",
            ControlCommand::PutUser { .. } => "put_user",
            ControlCommand::SeedAdmin { .. } => "seed_admin",
            ControlCommand::RemoveUser { .. } => "remove_user",
            ControlCommand::SetStreamRule(_) => "set_stream_rule",
            ControlCommand::RemoveStreamRule { .. } => "remove_stream_rule",
        }
    }
}

/// What a control command did.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum ControlSuccess {
    Done,
    Group(GroupRecord),
    /// Snapshots deleted.
    Deleted(u64),
    Tier(TierState),
    Stream(StreamMeta),
}

/// Why a control command changed nothing. Definite, like append failures.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
pub enum ControlFailure {
    #[error("snapshot is ahead of its stream: stream=`{stream}` version=`{version}` head=`{}`", head.map_or("no_stream".to_string(), |h| h.to_string()))]
    SnapshotAheadOfStream { stream: String, version: u64, head: Option<u64> },
    #[error("snapshot not found: stream=`{stream}`")]
    SnapshotNotFound { stream: String },
    #[error("group already exists: group=`{name}`")]
    GroupExists { name: String },
    #[error("group not found: group=`{name}`")]
    GroupNotFound { name: String },
    #[error("too many groups: GROUPS_MAX={GROUPS_MAX}")]
    GroupsFull,
    #[error("tier watermark moved: expected=`{expected}` actual=`{actual}`")]
    TierWatermarkMoved { expected: u64, actual: u64 },
    #[error("tier watermark beyond the applied events: to=`{to}` next_position=`{next_position}`")]
    TierBeyondApplied { to: u64, next_position: u64 },
    #[error("stream is deleted: stream=`{stream}`")]
    StreamDeleted { stream: String },
    #[error("stream not found: stream=`{stream}`")]
    StreamNotFound { stream: String },
    #[error("wrong expected version: stream=`{stream}` expected=`{expected}` actual=`{}`", actual.map_or("no_stream".to_string(), |v| v.to_string()))]
    WrongExpectedVersion { stream: String, expected: ExpectedVersion, actual: Option<u64> },
    #[error("user already exists: user=`{name}`")]
    UserExists { name: String },
    #[error("user not found: user=`{name}`")]
    UserNotFound { name: String },
    #[error("too many users: USERS_MAX={USERS_MAX}")]
    UsersFull,
    #[error("stream rule not found: pattern=`{pattern}`")]
    RuleNotFound { pattern: String },
    #[error("too many stream rules: RULES_MAX={RULES_MAX}")]
    RulesFull,
}

pub type ControlOutcome = Result<ControlSuccess, ControlFailure>;

pub const SNAPSHOT: u8 = b'n';
pub const GROUP: u8 = b'g';
pub const COUNTER: u8 = b'k';
pub const TIER: u8 = b't';
/// Key prefixes of the control state: what a Raft snapshot carries beside the events
/// (and the stream heads, which outlive their tiered events).
pub const CONTROL_PREFIXES: [u8; 8] = [SNAPSHOT, GROUP, COUNTER, TIER, STREAM_META, USER, RULE, AUTH_KEY];

/// A stream's metadata record in `store`.
pub(crate) fn stream_meta(store: &dyn ControlStore, stream: &str) -> Result<Option<StreamMeta>, StorageError> {
    let key = stream_meta_key(stream);
    match store.get(&key)? {
        None => Ok(None),
        Some(value) => Ok(Some(record::open_value("stream metadata", &key, &value)?)),
    }
}

pub(crate) fn read_stream_meta(tree: &sled::Tree, stream: &str) -> Result<Option<StreamMeta>, StorageError> {
    record::read_value("stream metadata", tree, &stream_meta_key(stream))
}

fn put_stream_meta(store: &mut dyn ControlStore, stream: &str, meta: &StreamMeta) -> Result<(), StorageError> {
    let key = stream_meta_key(stream);
    store.put(key.clone(), record::seal_value("stream metadata", &key, meta)?);
    Ok(())
}

pub fn tier_key() -> Vec<u8> {
    vec![TIER, b't', b'i', b'e', b'r']
}

/// The tier state in `store` (all zero before the first upload).
pub(crate) fn tier_state(store: &dyn ControlStore) -> Result<TierState, StorageError> {
    let key = tier_key();
    match store.get(&key)? {
        None => Ok(TierState::default()),
        Some(value) => record::open_value("tier state", &key, &value),
    }
}

pub(crate) fn read_tier_state(tree: &sled::Tree) -> Result<TierState, StorageError> {
    Ok(record::read_value("tier state", tree, &tier_key())?.unwrap_or_default())
}

/// The counter that numbers groups.
pub fn next_group_id_key() -> Vec<u8> {
    let mut key = vec![COUNTER];
    key.extend_from_slice(b"next_group_id");
    key
}

pub fn snapshot_prefix(stream: &str) -> Vec<u8> {
    let mut key = Vec::with_capacity(stream.len() + 10);
    key.push(SNAPSHOT);
    key.extend_from_slice(stream.as_bytes());
    key.push(0);
    key
}

pub fn snapshot_key(stream: &str, version: u64) -> Vec<u8> {
    let mut key = snapshot_prefix(stream);
    key.extend_from_slice(&version.to_be_bytes());
    key
}

pub fn group_key(name: &str) -> Vec<u8> {
    let mut key = Vec::with_capacity(name.len() + 1);
    key.push(GROUP);
    key.extend_from_slice(name.as_bytes());
    key
}

/// Read and write access to the control keys during one apply batch (the batch's own
/// staged writes are visible to later commands of the same batch).
pub(crate) trait ControlStore {
    fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>, StorageError>;
    /// Keys and values with `prefix`, in key order, staged writes included.
    fn scan(&self, prefix: &[u8]) -> Result<Vec<(Vec<u8>, Vec<u8>)>, StorageError>;
    fn put(&mut self, key: Vec<u8>, value: Vec<u8>);
    fn remove(&mut self, key: Vec<u8>);
    /// The stream's last version, None when it has no events.
    fn stream_head(&mut self, stream: &str) -> Result<Option<u64>, StorageError>;
    /// The next `$all` position.
    fn next_position(&self) -> u64;
    /// A counter for group ids, kept in the state's metadata.
    fn next_group_id(&mut self) -> Result<u64, StorageError>;
}

/// Applies one control command against `store`.
pub(crate) fn apply_control(store: &mut dyn ControlStore, command: &ControlCommand) -> Result<ControlOutcome, StorageError> {
    match command {
        ControlCommand::SaveSnapshot(snapshot) => {
            let head = store.stream_head(&snapshot.stream)?;
            if head.is_none_or(|head| snapshot.version > head) {
                return Ok(Err(ControlFailure::SnapshotAheadOfStream {
                    stream: snapshot.stream.clone(),
                    version: snapshot.version,
                    head,
                }));
            }
            let key = snapshot_key(&snapshot.stream, snapshot.version);
            store.put(key.clone(), record::seal_value("aggregate snapshot", &key, snapshot)?);
            let existing = store.scan(&snapshot_prefix(&snapshot.stream))?;
            let excess = existing.len().saturating_sub(SNAPSHOTS_PER_STREAM_MAX);
            for (old, _) in existing.into_iter().take(excess) {
                store.remove(old);
            }
            Ok(Ok(ControlSuccess::Done))
        }
        ControlCommand::DeleteSnapshots { stream, version } => {
            let doomed: Vec<Vec<u8>> = match version {
                Some(version) => {
                    let key = snapshot_key(stream, *version);
                    store.get(&key)?.map(|_| key).into_iter().collect()
                }
                None => store.scan(&snapshot_prefix(stream))?.into_iter().map(|(key, _)| key).collect(),
            };
            if doomed.is_empty() {
                return Ok(Err(ControlFailure::SnapshotNotFound { stream: stream.clone() }));
            }
            let count = doomed.len() as u64;
            for key in doomed {
                store.remove(key);
            }
            Ok(Ok(ControlSuccess::Deleted(count)))
        }
        ControlCommand::CreateGroup { name, source_stream, settings, start, created_unix_ms } => {
            let key = group_key(name);
            if store.get(&key)?.is_some() {
                return Ok(Err(ControlFailure::GroupExists { name: name.clone() }));
            }
            if store.scan(&[GROUP])?.len() >= GROUPS_MAX {
                return Ok(Err(ControlFailure::GroupsFull));
            }
            let checkpoint = match (start, source_stream) {
                (GroupStart::Start, _) => 0,
                (GroupStart::At(at), _) => *at,
                (GroupStart::End, None) => store.next_position(),
                (GroupStart::End, Some(stream)) => store.stream_head(stream)?.map_or(0, |head| head + 1),
            };
            let group = GroupRecord {
                name: name.clone(),
                group_id: store.next_group_id()?,
                source_stream: source_stream.clone(),
                settings: settings.clone(),
                checkpoint,
                parked_replay_target: 0,
                parked_replay_done: 0,
                created_unix_ms: *created_unix_ms,
            };
            store.put(key.clone(), record::seal_value("group", &key, &group)?);
            Ok(Ok(ControlSuccess::Group(group)))
        }
        ControlCommand::UpdateGroup { name, settings } => update_group(store, name, None, |group| {
            group.settings = settings.clone();
        }),
        ControlCommand::DeleteGroup { name } => {
            let key = group_key(name);
            if store.get(&key)?.is_none() {
                return Ok(Err(ControlFailure::GroupNotFound { name: name.clone() }));
            }
            store.remove(key);
            Ok(Ok(ControlSuccess::Done))
        }
        ControlCommand::CheckpointGroup { name, group_id, checkpoint, parked_replay_done } => {
            update_group(store, name, Some(*group_id), |group| {
                group.checkpoint = group.checkpoint.max(*checkpoint);
                group.parked_replay_done = group.parked_replay_done.max(*parked_replay_done);
            })
        }
        ControlCommand::ReplayParked { name, group_id, target } => update_group(store, name, Some(*group_id), |group| {
            group.parked_replay_target = group.parked_replay_target.max(*target);
        }),
        ControlCommand::AdvanceTier { from, to, segments, bytes, updated_unix_ms } => {
            let current = tier_state(store)?;
            if current.watermark != *from {
                return Ok(Err(ControlFailure::TierWatermarkMoved { expected: *from, actual: current.watermark }));
            }
            if *to > store.next_position() || to < from {
                return Ok(Err(ControlFailure::TierBeyondApplied { to: *to, next_position: store.next_position() }));
            }
            let next = TierState {
                watermark: *to,
                segments: current.segments + segments,
                bytes: current.bytes + bytes,
                updated_unix_ms: *updated_unix_ms,
            };
            let key = tier_key();
            store.put(key.clone(), record::seal_value("tier state", &key, &next)?);
            Ok(Ok(ControlSuccess::Tier(next)))
        }
        ControlCommand::SetStreamMetadata { stream, max_age_ms, max_count } => {
            let mut meta = stream_meta(store, stream)?.unwrap_or_default();
            if meta.tombstone {
                return Ok(Err(ControlFailure::StreamDeleted { stream: stream.clone() }));
            }
            meta.max_age_ms = *max_age_ms;
            meta.max_count = *max_count;
            put_stream_meta(store, stream, &meta)?;
            Ok(Ok(ControlSuccess::Stream(meta)))
        }
        ControlCommand::DeleteStream { stream, expected, hard } => {
            let mut meta = stream_meta(store, stream)?.unwrap_or_default();
            if meta.tombstone {
                return Ok(Err(ControlFailure::StreamDeleted { stream: stream.clone() }));
            }
            let head = store.stream_head(stream)?;
            // A soft-deleted stream with nothing appended since looks like no stream.
            let visible_head = if meta.deleted_and_empty(head) { None } else { head };
            if visible_head.is_none() && !hard {
                return Ok(Err(ControlFailure::StreamNotFound { stream: stream.clone() }));
            }
            if !expected.admits(visible_head) {
                return Ok(Err(ControlFailure::WrongExpectedVersion { stream: stream.clone(), expected: *expected, actual: visible_head }));
            }
            meta.truncate_before = head.map_or(0, |last| last + 1);
            meta.tombstone = *hard;
            put_stream_meta(store, stream, &meta)?;
            Ok(Ok(ControlSuccess::Stream(meta)))
        }
        ControlCommand::Scavenge { stream, before } => {
            let Some(mut meta) = stream_meta(store, stream)? else {
                return Ok(Err(ControlFailure::StreamNotFound { stream: stream.clone() }));
            };
            let end = store.stream_head(stream)?.map_or(0, |last| last + 1);
            meta.scavenged_before = meta.scavenged_before.max((*before).min(end));
            put_stream_meta(store, stream, &meta)?;
            Ok(Ok(ControlSuccess::Stream(meta)))
        }
        ControlCommand::SetTokenKey { key } => access::set_token_key(store, key),
        ControlCommand::PutUser { user, replace } => access::put_user(store, user, *replace),
        ControlCommand::SeedAdmin { user } => access::seed_admin(store, user),
        ControlCommand::RemoveUser { name } => access::remove_user(store, name),
        ControlCommand::SetStreamRule(rule) => access::set_rule(store, rule),
        ControlCommand::RemoveStreamRule { pattern } => access::remove_rule(store, pattern),
    }
}

fn update_group(
    store: &mut dyn ControlStore,
    name: &str,
    group_id: Option<u64>,
    change: impl FnOnce(&mut GroupRecord),
) -> Result<ControlOutcome, StorageError> {
    let key = group_key(name);
    let Some(value) = store.get(&key)? else {
        return Ok(Err(ControlFailure::GroupNotFound { name: name.to_string() }));
    };
    let mut group: GroupRecord = record::open_value("group", &key, &value)?;
    if group_id.is_some_and(|id| id != group.group_id) {
        return Ok(Err(ControlFailure::GroupNotFound { name: name.to_string() }));
    }
    change(&mut group);
    store.put(key.clone(), record::seal_value("group", &key, &group)?);
    Ok(Ok(ControlSuccess::Group(group)))
}

/// Reads of the control state from a tree.
pub(crate) fn read_group(tree: &sled::Tree, name: &str) -> Result<Option<GroupRecord>, StorageError> {
    record::read_value("group", tree, &group_key(name))
}

pub(crate) fn list_groups(tree: &sled::Tree) -> Result<Vec<GroupRecord>, StorageError> {
    record::scan_values("group", tree, &[GROUP])
}

/// A stream's snapshots, lowest version first.
pub(crate) fn list_snapshots(tree: &sled::Tree, stream: &str) -> Result<Vec<AggregateSnapshot>, StorageError> {
    record::scan_values("aggregate snapshot", tree, &snapshot_prefix(stream))
}

/// The snapshot with the highest version ≤ `max_version` (any version when None).
pub(crate) fn latest_snapshot(tree: &sled::Tree, stream: &str, max_version: Option<u64>) -> Result<Option<AggregateSnapshot>, StorageError> {
    let prefix = snapshot_prefix(stream);
    let end = snapshot_key(stream, max_version.unwrap_or(u64::MAX));
    match tree.range(prefix..=end).next_back() {
        None => Ok(None),
        Some(item) => {
            let (key, value) = item?;
            Ok(Some(record::open_value("aggregate snapshot", &key, &value)?))
        }
    }
}

/// Whether `key` belongs to the control state.
pub(crate) fn is_control_key(key: &[u8]) -> bool {
    key.first().is_some_and(|prefix| CONTROL_PREFIXES.contains(prefix))
}

const _: () = assert!(keys::EVENT != SNAPSHOT && keys::STREAM_INDEX != SNAPSHOT && keys::HEAD != SNAPSHOT);
const _: () = assert!(keys::EVENT != GROUP && keys::STREAM_INDEX != GROUP && keys::HEAD != GROUP && keys::META != GROUP);
const _: () = assert!(keys::EVENT_ID != GROUP && keys::EVENT_ID != SNAPSHOT && keys::META != SNAPSHOT);
const _: () = {
    let mut i = 0;
    while i < CONTROL_PREFIXES.len() {
        let p = CONTROL_PREFIXES[i];
        assert!(p != keys::EVENT && p != keys::STREAM_INDEX && p != keys::EVENT_ID && p != keys::HEAD && p != keys::META);
        let mut j = i + 1;
        while j < CONTROL_PREFIXES.len() {
            assert!(p != CONTROL_PREFIXES[j]);
            j += 1;
        }
        i += 1;
    }
};
const _: () = assert!(keys::EVENT != COUNTER && keys::STREAM_INDEX != COUNTER && keys::HEAD != COUNTER && keys::META != COUNTER && keys::EVENT_ID != COUNTER);

#[cfg(test)]
mod tests {
    use super::*;
    use crate::command::{AppendCommand, Command, ExpectedVersion, NewEvent};
    use crate::EventState;

    fn state_with_stream(events: u8) -> (tempfile::TempDir, EventState) {
        let dir = tempfile::tempdir().unwrap();
        let db = crate::open_database(dir.path()).unwrap();
        let state = EventState::open(&db, dir.path()).unwrap();
        let events = (0..events)
            .map(|i| NewEvent { id: [i + 1; 16], event_type: "T".into(), content_type: String::new(), data: vec![i], metadata: vec![] })
            .collect();
        let append = AppendCommand { stream: "order-1".into(), expected: ExpectedVersion::Any, events, created_unix_ms: 1 };
        state.apply(Some(&Command::appends(vec![append])), b"m").unwrap();
        (dir, state)
    }

    fn save(state: &EventState, stream: &str, version: u64) -> ControlOutcome {
        let snapshot = AggregateSnapshot { stream: stream.into(), version, content_type: "application/json".into(), state: version.to_string().into_bytes(), created_unix_ms: 9 };
        state.apply_control(ControlCommand::SaveSnapshot(snapshot), b"m").unwrap()
    }

    #[test]
    fn snapshots_are_never_ahead_of_their_stream() {
        let (_dir, state) = state_with_stream(3);
        assert!(save(&state, "order-1", 2).is_ok());
        assert_eq!(save(&state, "order-1", 3), Err(ControlFailure::SnapshotAheadOfStream { stream: "order-1".into(), version: 3, head: Some(2) }));
        assert_eq!(save(&state, "order-2", 0), Err(ControlFailure::SnapshotAheadOfStream { stream: "order-2".into(), version: 0, head: None }));
        assert_eq!(state.snapshots("order-1").unwrap().len(), 1);
    }

    #[test]
    fn latest_at_or_below_a_version_and_delete() {
        let (_dir, state) = state_with_stream(10);
        for version in [1, 4, 7] {
            save(&state, "order-1", version).unwrap();
        }
        assert_eq!(state.latest_snapshot("order-1", None).unwrap().unwrap().version, 7);
        assert_eq!(state.latest_snapshot("order-1", Some(6)).unwrap().unwrap().version, 4);
        assert!(state.latest_snapshot("order-1", Some(0)).unwrap().is_none());
        assert!(state.latest_snapshot("order-10", None).unwrap().is_none());
        let delete = |version| state.apply_control(ControlCommand::DeleteSnapshots { stream: "order-1".into(), version }, b"m").unwrap();
        assert_eq!(delete(Some(4)), Ok(ControlSuccess::Deleted(1)));
        assert!(matches!(delete(Some(4)), Err(ControlFailure::SnapshotNotFound { .. })));
        assert_eq!(delete(None), Ok(ControlSuccess::Deleted(2)));
        assert!(state.snapshots("order-1").unwrap().is_empty());
    }

    #[test]
    fn a_stream_keeps_its_newest_snapshots() {
        let (_dir, state) = state_with_stream(40);
        for version in 0..(SNAPSHOTS_PER_STREAM_MAX as u64 + 3) {
            save(&state, "order-1", version).unwrap();
        }
        let versions: Vec<u64> = state.snapshots("order-1").unwrap().into_iter().map(|s| s.version).collect();
        assert_eq!(versions, (3..SNAPSHOTS_PER_STREAM_MAX as u64 + 3).collect::<Vec<_>>());
    }

    #[test]
    fn groups_start_where_asked_and_checkpoints_only_move_forward() {
        let (_dir, state) = state_with_stream(5);
        let create = |name: &str, source: Option<&str>, start| ControlCommand::CreateGroup {
            name: name.into(),
            source_stream: source.map(String::from),
            settings: vec![],
            start,
            created_unix_ms: 1,
        };
        let group = |outcome: ControlOutcome| match outcome.unwrap() {
            ControlSuccess::Group(group) => group,
            other => panic!("{other:?}"),
        };
        assert_eq!(group(state.apply_control(create("all-end", None, GroupStart::End), b"m").unwrap()).checkpoint, 5);
        assert_eq!(group(state.apply_control(create("s-end", Some("order-1"), GroupStart::End), b"m").unwrap()).checkpoint, 5);
        assert_eq!(group(state.apply_control(create("new-end", Some("none"), GroupStart::End), b"m").unwrap()).checkpoint, 0);
        let g = group(state.apply_control(create("g", None, GroupStart::At(2)), b"m").unwrap());
        assert_eq!(g.checkpoint, 2);
        assert_eq!(state.apply_control(create("g", None, GroupStart::Start), b"m").unwrap(), Err(ControlFailure::GroupExists { name: "g".into() }));
        let checkpoint = |id, at| ControlCommand::CheckpointGroup { name: "g".into(), group_id: id, checkpoint: at, parked_replay_done: 0 };
        assert_eq!(group(state.apply_control(checkpoint(g.group_id, 4), b"m").unwrap()).checkpoint, 4);
        assert_eq!(group(state.apply_control(checkpoint(g.group_id, 3), b"m").unwrap()).checkpoint, 4);
        // A runtime of an older group of the same name cannot move the new one.
        assert!(state.apply_control(checkpoint(g.group_id + 100, 9), b"m").unwrap().is_err());
        state.apply_control(ControlCommand::DeleteGroup { name: "g".into() }, b"m").unwrap().unwrap();
        let recreated = group(state.apply_control(create("g", None, GroupStart::Start), b"m").unwrap());
        assert_ne!(recreated.group_id, g.group_id);
        assert!(state.apply_control(checkpoint(g.group_id, 9), b"m").unwrap().is_err());
        assert_eq!(state.groups().unwrap().len(), 4);
    }

    #[test]
    fn control_commands_in_one_batch_see_each_other() {
        let (_dir, state) = state_with_stream(1);
        let create = Command::Control(ControlCommand::CreateGroup { name: "g".into(), source_stream: None, settings: vec![], start: GroupStart::Start, created_unix_ms: 1 });
        let update = Command::Control(ControlCommand::UpdateGroup { name: "g".into(), settings: vec![7] });
        let delete = Command::Control(ControlCommand::DeleteGroup { name: "h".into() });
        let out = state.apply_entries(&[Some(&create), Some(&update), Some(&delete)], b"m", &Default::default()).unwrap();
        assert!(matches!(out[1].control, Some(Ok(ControlSuccess::Group(ref g))) if g.settings == vec![7]));
        assert!(matches!(out[2].control, Some(Err(ControlFailure::GroupNotFound { .. }))));
        assert_eq!(state.group("g").unwrap().unwrap().settings, vec![7]);
    }

    #[test]
    fn the_number_of_groups_is_bounded() {
        let (_dir, state) = state_with_stream(1);
        for i in 0..GROUPS_MAX {
            let create = ControlCommand::CreateGroup { name: format!("g{i}"), source_stream: None, settings: vec![], start: GroupStart::Start, created_unix_ms: 1 };
            state.apply_control(create, b"m").unwrap().unwrap();
        }
        let one_more = ControlCommand::CreateGroup { name: "x".into(), source_stream: None, settings: vec![], start: GroupStart::Start, created_unix_ms: 1 };
        assert_eq!(state.apply_control(one_more, b"m").unwrap(), Err(ControlFailure::GroupsFull));
    }
}
