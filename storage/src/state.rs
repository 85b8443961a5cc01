//! The applied state machine data: events, indexes, stream heads; and the deterministic
//! apply of append commands.
//!
//! Invariants kept here:
//! - positions are gapless: the events of `$all` are exactly positions `0..next_position`;
//! - a stream's versions are `0..=last_version`, contiguous, in position order;
//! - the writes of one Raft entry (its events, indexes, heads and the raft layer's
//!   applied-log metadata) go into one atomic sled batch, so a crash leaves either all of
//!   an entry applied or none of it, and `applied` always describes the data beside it;
//! - readers see only positions below `visible_next_position`, which moves after a whole
//!   entry is in, so an append is never seen half-written.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::ops::Bound;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::RwLock;

use serde::{Deserialize, Serialize};

use crate::chunk::EventChunk;
use crate::id_filter::IdFilter;
use crate::command::{AppendCommand, AppendFailure, AppendOutcome, AppendSuccess, Command, EntryOutcome, NewEvent, StoredEvent};
use crate::control::{self, AggregateSnapshot, ControlStore, GroupRecord};
use crate::snapshot::SnapshotItem;
use crate::keys;
use crate::record;
use crate::StorageError;

const META_APPLIED: &str = "applied";
const META_NEXT_POSITION: &str = "next_position";
/// Key in the database's default tree naming the tree that holds the live state; a
/// snapshot install fills a fresh tree and then flips this pointer (atomic swap).
const ACTIVE_STATE_TREE: &[u8] = b"active_state_tree";
const STATE_TREE_PREFIX: &str = "state-";

/// A stream's head as stored under `h` + name.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StreamHead {
    pub last_version: u64,
    pub event_count: u64,
    pub created_unix_ms: i64,
    pub updated_unix_ms: i64,
    pub first_position: u64,
    pub last_position: u64,
}

/// Decided, not yet written entries (see [`EventState::stage_entries`]).
pub struct StagedApply {
    tree: sled::Tree,
    batch: sled::Batch,
    next_position: u64,
}

/// What a `$all` page read should return.
pub struct ReadAllOptions<'a> {
    pub from_position: u64,
    pub backwards: bool,
    /// Events to return at most.
    pub limit: usize,
    /// Events to look at at most (a filter that matches rarely must not scan forever in
    /// one call); the caller continues from `next_position`.
    pub scan_limit: usize,
    pub filter: &'a dyn Fn(&StoredEvent) -> bool,
}

/// The applied state of one node.
pub struct EventState {
    db: sled::Db,
    tree: RwLock<sled::Tree>,
    visible_next_position: AtomicU64,
    /// Every id of the id index (and possibly ids of replaced states): skips the index
    /// lookup for ids that were certainly never written.
    ids: IdFilter,
}

impl EventState {
    pub fn open(db: &sled::Db) -> Result<Self, StorageError> {
        let name = match db.get(ACTIVE_STATE_TREE)? {
            Some(name) => String::from_utf8(name.to_vec())
                .map_err(|_| StorageError::Corrupt { what: "active state tree name", key: "active_state_tree".into() })?,
            None => {
                let name = format!("{STATE_TREE_PREFIX}0");
                db.insert(ACTIVE_STATE_TREE, name.as_bytes())?;
                name
            }
        };
        // Drop trees left behind by an install that crashed before flipping the pointer.
        for stale in db.tree_names() {
            let stale_name = String::from_utf8_lossy(&stale).to_string();
            if stale_name.starts_with(STATE_TREE_PREFIX) && stale_name != name {
                db.drop_tree(&stale)?;
            }
        }
        let tree = db.open_tree(&name)?;
        let next_position = read_u64_meta(&tree, META_NEXT_POSITION)?.unwrap_or(0);
        let ids = IdFilter::new();
        for key in tree.scan_prefix([keys::EVENT_ID]).keys() {
            let key = key?;
            let id: &[u8; 16] = key[1..]
                .try_into()
                .map_err(|_| StorageError::Corrupt { what: "event id index key", key: record::printable_key(&key) })?;
            ids.insert(id);
        }
        Ok(Self { db: db.clone(), tree: RwLock::new(tree), visible_next_position: AtomicU64::new(next_position), ids })
    }

    fn tree(&self) -> sled::Tree {
        self.tree.read().expect("state tree lock is never poisoned").clone()
    }

    /// Number of events in `$all` visible to readers (= the next position to assign).
    pub fn next_position(&self) -> u64 {
        self.visible_next_position.load(Ordering::Acquire)
    }

    /// The raft layer's applied-log metadata written with the last applied entry.
    pub fn applied_meta(&self) -> Result<Option<Vec<u8>>, StorageError> {
        let tree = self.tree();
        let key = keys::meta(META_APPLIED);
        match tree.get(&key)? {
            None => Ok(None),
            Some(value) => Ok(Some(record::open("applied metadata", &key, &value)?.to_vec())),
        }
    }

    /// Applies one Raft entry: its command (None for blank and membership entries) and the
    /// raft layer's new applied metadata, atomically. Returns one outcome per append.
    pub fn apply(&self, command: Option<&Command>, applied_meta: &[u8]) -> Result<Vec<AppendOutcome>, StorageError> {
        Ok(self.apply_entries(&[command], applied_meta)?.pop().expect("one entry in, one out").appends)
    }

    /// Applies one control command as its own entry (tests and tools).
    pub fn apply_control(&self, command: control::ControlCommand, applied_meta: &[u8]) -> Result<control::ControlOutcome, StorageError> {
        let command = Command::Control(command);
        let mut out = self.apply_entries(&[Some(&command)], applied_meta)?;
        Ok(out.pop().and_then(|entry| entry.control).expect("a control entry has a control outcome"))
    }

    /// Applies consecutive Raft entries (their commands, None for blank and membership
    /// entries) and the raft layer's applied metadata after the last, in one atomic sled
    /// batch. Returns, per entry, what it decided.
    ///
    /// One batch for many entries because every sled batch costs two synchronous log
    /// write-backs (sled rolls its io buffer around it): under load, committed entries
    /// arrive together and share them.
    pub fn apply_entries(&self, commands: &[Option<&Command>], applied_meta: &[u8]) -> Result<Vec<EntryOutcome>, StorageError> {
        let (outcomes, staged) = self.stage_entries(commands, applied_meta)?;
        self.commit_staged(staged)?;
        Ok(outcomes)
    }

    /// The first half of [`EventState::apply_entries`]: decides every append and stages
    /// the writes, touching nothing. The outcomes are final (the entries are committed and
    /// the decision is deterministic), so the caller may answer proposers before
    /// [`EventState::commit_staged`] writes them; readers see nothing until then. Nothing
    /// else may be staged or applied in between.
    pub fn stage_entries(
        &self,
        commands: &[Option<&Command>],
        applied_meta: &[u8],
    ) -> Result<(Vec<EntryOutcome>, StagedApply), StorageError> {
        let tree = self.tree();
        let mut writer = BatchWriter::new(&tree, self.next_position(), &self.ids);
        let mut per_entry = Vec::with_capacity(commands.len());
        for command in commands {
            let mut outcome = EntryOutcome::default();
            match command {
                Some(Command::Appends(appends)) => {
                    outcome.appends.reserve(appends.len());
                    for append in appends {
                        outcome.appends.push(writer.apply_append(append)?);
                    }
                }
                Some(Command::Control(command)) => outcome.control = Some(control::apply_control(&mut writer, command)?),
                None => {}
            }
            per_entry.push(outcome);
        }
        let next_position = writer.next_position;
        let mut batch = writer.finish()?;
        let meta_key = keys::meta(META_APPLIED);
        batch.insert(meta_key.clone(), record::seal(&meta_key, applied_meta));
        Ok((per_entry, StagedApply { tree, batch, next_position }))
    }

    /// Writes staged entries in one atomic sled batch and makes them visible to readers.
    pub fn commit_staged(&self, staged: StagedApply) -> Result<(), StorageError> {
        staged.tree.apply_batch(staged.batch)?;
        let previous = self.visible_next_position.swap(staged.next_position, Ordering::AcqRel);
        assert!(previous <= staged.next_position, "positions never go back");
        Ok(())
    }

    /// The head of `stream`, if it exists.
    pub fn stream_head(&self, stream: &str) -> Result<Option<StreamHead>, StorageError> {
        read_head(&self.tree(), stream)
    }

    /// The event at `position`, if applied.
    pub fn event_at(&self, position: u64) -> Result<Option<StoredEvent>, StorageError> {
        if position >= self.next_position() {
            return Ok(None);
        }
        Ok(read_chunk_containing(&self.tree(), position)?.map(|chunk| chunk.event_at(position)))
    }

    /// Up to `limit` events of `stream` starting at `from_version` (inclusive), forwards
    /// or backwards. Stops at the visible end of `$all`.
    pub fn read_stream(
        &self,
        stream: &str,
        from_version: u64,
        backwards: bool,
        limit: usize,
    ) -> Result<Vec<StoredEvent>, StorageError> {
        let tree = self.tree();
        let visible = self.next_position();
        let prefix = keys::stream_index_prefix(stream);
        let mut end = prefix.clone();
        *end.last_mut().expect("prefix ends with the separator") = 1;
        // The stream index has one entry per chunk, under the chunk's first version: start
        // from the chunk that holds `from_version`.
        let from = keys::stream_index(stream, from_version);
        let range: Box<dyn Iterator<Item = sled::Result<(sled::IVec, sled::IVec)>>> = if backwards {
            Box::new(tree.range(prefix.clone()..=from).rev())
        } else {
            let start = match tree.range(prefix.clone()..=from.clone()).next_back() {
                Some(item) => item?.0.to_vec(),
                None => from,
            };
            Box::new(tree.range(start..end))
        };
        let mut out = Vec::with_capacity(limit.min(1024));
        'chunks: for item in range {
            let (key, value) = item?;
            let position = decode_position("stream index entry", &key, &value)?;
            if position >= visible {
                // Applied after this read started: not part of it (versions follow positions).
                if backwards {
                    continue;
                }
                break;
            }
            let chunk = read_chunk(&tree, position)?.ok_or_else(|| StorageError::Corrupt {
                what: "stream index points at a missing chunk",
                key: record::printable_key(&key),
            })?;
            assert_eq!(chunk.stream, stream, "stream index entry must point into its stream");
            let mut events = chunk.into_events();
            if backwards {
                events.reverse();
            }
            for event in events {
                let version = event.version;
                if (backwards && version > from_version) || (!backwards && version < from_version) {
                    continue;
                }
                if out.len() >= limit {
                    break 'chunks;
                }
                out.push(event);
            }
        }
        Ok(out)
    }

    /// A page of `$all`: returns the matching events and the position to continue from
    /// (None when the visible end, or position 0 backwards, was reached).
    pub fn read_all(&self, options: &ReadAllOptions<'_>) -> Result<(Vec<StoredEvent>, Option<u64>), StorageError> {
        let tree = self.tree();
        let visible = self.next_position();
        if !options.backwards && options.from_position >= visible {
            return Ok((Vec::new(), None));
        }
        let from = if options.backwards {
            if visible == 0 {
                return Ok((Vec::new(), None));
            }
            options.from_position.min(visible - 1)
        } else {
            options.from_position
        };
        // Start at the chunk holding `from`.
        let start = match tree.range(keys::event(0)..=keys::event(from)).next_back() {
            Some(item) => decode_chunk_key(&item?.0)?,
            None => 0,
        };
        let range: Box<dyn Iterator<Item = sled::Result<(sled::IVec, sled::IVec)>>> = if options.backwards {
            Box::new(tree.range(keys::event(0)..=keys::event(start)).rev())
        } else {
            Box::new(tree.range(keys::event(start)..keys::event(visible)))
        };
        let mut out = Vec::with_capacity(options.limit.min(1024));
        let mut scanned = 0usize;
        let mut last_seen: Option<u64> = None;
        'chunks: for item in range {
            let (key, value) = item?;
            let chunk: EventChunk = record::open_value("event chunk", &key, &value)?;
            let mut events = chunk.into_events();
            if options.backwards {
                events.reverse();
            }
            for event in events {
                let position = event.position;
                if (options.backwards && position > from) || (!options.backwards && position < from) {
                    continue;
                }
                if position >= visible {
                    break 'chunks;
                }
                if out.len() >= options.limit || scanned >= options.scan_limit {
                    break 'chunks;
                }
                if let Some(last) = last_seen {
                    let expected = if options.backwards { last - 1 } else { last + 1 };
                    assert_eq!(position, expected, "positions are gapless");
                }
                last_seen = Some(position);
                scanned += 1;
                if (options.filter)(&event) {
                    out.push(event);
                }
            }
        }
        let next = match last_seen {
            None => None,
            Some(last) if options.backwards => last.checked_sub(1),
            Some(last) => Some(last + 1).filter(|next| *next < visible),
        };
        Ok((out, next))
    }

    /// A persistent subscription group, if it exists.
    pub fn group(&self, name: &str) -> Result<Option<GroupRecord>, StorageError> {
        control::read_group(&self.tree(), name)
    }

    /// Every persistent subscription group, by name.
    pub fn groups(&self) -> Result<Vec<GroupRecord>, StorageError> {
        control::list_groups(&self.tree())
    }

    /// A stream's aggregate snapshots, lowest version first.
    pub fn snapshots(&self, stream: &str) -> Result<Vec<AggregateSnapshot>, StorageError> {
        control::list_snapshots(&self.tree(), stream)
    }

    /// The stream's snapshot with the highest version ≤ `max_version` (None: any).
    pub fn latest_snapshot(&self, stream: &str, max_version: Option<u64>) -> Result<Option<AggregateSnapshot>, StorageError> {
        control::latest_snapshot(&self.tree(), stream, max_version)
    }

    /// Every control record (key, sealed value), for a Raft snapshot.
    pub(crate) fn control_records(&self) -> impl Iterator<Item = Result<(Vec<u8>, Vec<u8>), StorageError>> {
        let tree = self.tree();
        control::CONTROL_PREFIXES.into_iter().flat_map(move |prefix| {
            tree.scan_prefix([prefix]).map(|item| item.map(|(k, v)| (k.to_vec(), v.to_vec())).map_err(StorageError::from))
        })
    }

    /// Stream names starting with `prefix`, after `after` (exclusive), at most `limit`.
    pub fn list_streams(&self, prefix: &str, after: &str, limit: usize) -> Result<Vec<(String, StreamHead)>, StorageError> {
        let tree = self.tree();
        let start = if after.is_empty() || after < prefix {
            Bound::Included(keys::head(prefix))
        } else {
            Bound::Excluded(keys::head(after))
        };
        let mut out = Vec::new();
        for item in tree.range::<Vec<u8>, _>((start, Bound::Unbounded)) {
            if out.len() >= limit {
                break;
            }
            let (key, value) = item?;
            if key.first() != Some(&keys::HEAD) {
                break;
            }
            let name = std::str::from_utf8(&key[1..])
                .map_err(|_| StorageError::Corrupt { what: "stream name", key: record::printable_key(&key) })?;
            if !name.starts_with(prefix) {
                break;
            }
            out.push((name.to_string(), record::open_value("stream head", &key, &value)?));
        }
        Ok(out)
    }

    /// Replaces the whole state with `events` (positions `0..`, in order), building the
    /// indexes and heads, then `applied_meta`; atomically from a reader's view: the new
    /// state is built in a fresh tree and swapped in by one durable pointer write.
    pub fn replace_all(
        &self,
        items: impl Iterator<Item = Result<SnapshotItem, StorageError>>,
        applied_meta: &[u8],
    ) -> Result<u64, StorageError> {
        let current = self.db.get(ACTIVE_STATE_TREE)?.map(|n| n.to_vec()).unwrap_or_default();
        let generation: u64 = String::from_utf8_lossy(&current)
            .strip_prefix(STATE_TREE_PREFIX)
            .and_then(|g| g.parse().ok())
            .unwrap_or(0);
        let name = format!("{STATE_TREE_PREFIX}{}", generation + 1);
        self.db.drop_tree(name.as_bytes())?;
        let fresh = self.db.open_tree(&name)?;
        // The filter keeps the replaced state's ids: stale bits cost a lookup, never an answer.
        let mut writer = BatchWriter::new(&fresh, 0, &self.ids);
        let mut chunk: Option<EventChunk> = None;
        for item in items {
            let event = match item? {
                SnapshotItem::Event(event) => event,
                SnapshotItem::Control { key, value } => {
                    if !control::is_control_key(&key) {
                        return Err(StorageError::Corrupt { what: "snapshot control record key", key: record::printable_key(&key) });
                    }
                    record::open("snapshot control record", &key, &value)?;
                    writer.batch.insert(key, value);
                    continue;
                }
            };
            match chunk.as_mut() {
                Some(open) if open.continues_with(&event) => open.push(event),
                _ => {
                    if let Some(full) = chunk.replace(EventChunk::of(event)) {
                        writer.write_chunk(full)?;
                    }
                }
            }
            if writer.pending_events() >= REPLACE_BATCH_EVENTS_MAX {
                let batch = writer.take_batch();
                fresh.apply_batch(batch)?;
            }
        }
        if let Some(last) = chunk {
            writer.write_chunk(last)?;
        }
        let next_position = writer.next_position;
        let mut batch = writer.finish()?;
        let meta_key = keys::meta(META_APPLIED);
        batch.insert(meta_key.clone(), record::seal(&meta_key, applied_meta));
        fresh.apply_batch(batch)?;
        // sled recovers a prefix of its writes, so the fresh tree is in before the pointer
        // that names it; the caller's next durable flush (the raft layer records the
        // installed snapshot with an fdatasync) makes both durable.
        self.db.flush()?;
        self.db.insert(ACTIVE_STATE_TREE, name.as_bytes())?;
        self.db.flush()?;
        let old = std::mem::replace(&mut *self.tree.write().expect("state tree lock is never poisoned"), fresh);
        self.visible_next_position.store(next_position, Ordering::Release);
        self.db.drop_tree(old.name())?;
        Ok(next_position)
    }

    /// Every event below `cutoff`, in position order (for snapshot export).
    pub fn events_below(&self, cutoff: u64) -> impl Iterator<Item = Result<StoredEvent, StorageError>> {
        let tree = self.tree();
        tree.range(keys::event(0)..keys::event(cutoff))
            .map(|item| {
                let (key, value) = item?;
                record::open_value::<EventChunk>("event chunk", &key, &value)
            })
            .flat_map(move |chunk| -> Box<dyn Iterator<Item = Result<StoredEvent, StorageError>>> {
                match chunk {
                    Err(e) => Box::new(std::iter::once(Err(e))),
                    Ok(chunk) => Box::new(
                        (chunk.first_position..chunk.end_position().min(cutoff)).map(move |p| Ok(chunk.event_at(p))),
                    ),
                }
            })
    }
}

/// Events per sled batch when rebuilding state from a snapshot: bounds the memory of one
/// batch (about 1 KiB an event with its indexes) while keeping batches large.
const REPLACE_BATCH_EVENTS_MAX: usize = 10_000;

/// Collects the writes of one Raft entry (or one chunk of a snapshot install), with an
/// overlay so later appends in the same entry see the effects of earlier ones.
struct BatchWriter<'t> {
    tree: &'t sled::Tree,
    ids: &'t IdFilter,
    batch: sled::Batch,
    next_position: u64,
    events_in_batch: usize,
    heads: HashMap<String, Option<StreamHead>>,
    dirty_heads: HashSet<String>,
    new_ids: HashMap<[u8; 16], u64>,
    /// Chunks staged in this batch, by first position.
    new_chunks: BTreeMap<u64, EventChunk>,
    /// Control records staged in this batch (None: removed).
    control: BTreeMap<Vec<u8>, Option<Vec<u8>>>,
    /// The next group id, once read or changed in this batch.
    next_group_id: Option<u64>,
}

impl<'t> BatchWriter<'t> {
    fn new(tree: &'t sled::Tree, next_position: u64, ids: &'t IdFilter) -> Self {
        Self {
            tree,
            ids,
            batch: sled::Batch::default(),
            next_position,
            events_in_batch: 0,
            heads: HashMap::new(),
            dirty_heads: HashSet::new(),
            new_ids: HashMap::new(),
            new_chunks: BTreeMap::new(),
            control: BTreeMap::new(),
            next_group_id: None,
        }
    }

    fn pending_events(&self) -> usize {
        self.events_in_batch
    }

    fn head(&mut self, stream: &str) -> Result<Option<StreamHead>, StorageError> {
        if let Some(head) = self.heads.get(stream) {
            return Ok(head.clone());
        }
        let head = read_head(self.tree, stream)?;
        self.heads.insert(stream.to_string(), head.clone());
        Ok(head)
    }

    fn position_of_id(&self, id: &[u8; 16]) -> Result<Option<u64>, StorageError> {
        if let Some(position) = self.new_ids.get(id) {
            return Ok(Some(*position));
        }
        if !self.ids.may_contain(id) {
            return Ok(None);
        }
        let key = keys::event_id(id);
        match self.tree.get(key)? {
            None => Ok(None),
            Some(value) => Ok(Some(decode_position("event id index entry", &key, &value)?)),
        }
    }

    fn event(&self, position: u64) -> Result<StoredEvent, StorageError> {
        if let Some((_, chunk)) = self.new_chunks.range(..=position).next_back()
            && chunk.contains_position(position)
        {
            return Ok(chunk.event_at(position));
        }
        match read_chunk_containing(self.tree, position)? {
            Some(chunk) => Ok(chunk.event_at(position)),
            None => Err(StorageError::Corrupt { what: "event id index points at a missing event", key: position.to_string() }),
        }
    }

    /// Decides one append against the state so far and stages its writes.
    fn apply_append(&mut self, append: &AppendCommand) -> Result<AppendOutcome, StorageError> {
        let conflict = |event: &NewEvent, reason: &str| {
            Ok(Err(AppendFailure::IdempotencyConflict {
                stream: append.stream.clone(),
                event_id: uuid::Uuid::from_bytes(event.id).to_string(),
                reason: reason.to_string(),
            }))
        };
        let Some(first) = append.events.first() else {
            return Ok(Err(AppendFailure::IdempotencyConflict {
                stream: append.stream.clone(),
                event_id: String::new(),
                reason: "an append must carry events".into(),
            }));
        };
        let mut seen = HashSet::with_capacity(append.events.len());
        let mut known = Vec::with_capacity(append.events.len());
        for event in &append.events {
            if !seen.insert(event.id) {
                return conflict(event, "event id repeated within one append");
            }
            known.push(self.position_of_id(&event.id)?);
        }
        let known_count = known.iter().filter(|p| p.is_some()).count();
        if known_count == 0 {
            return self.write_append(append);
        }
        if known_count < known.len() {
            return conflict(first, "some event ids were written before and some were not");
        }
        // Every id was written before: a replay only if it is the same append, in place.
        let mut stored = Vec::with_capacity(known.len());
        for (event, position) in append.events.iter().zip(known) {
            let existing = self.event(position.expect("all ids are known"))?;
            if existing.stream != append.stream {
                return conflict(event, "event id was written to another stream");
            }
            if !existing.same_content_as(event) {
                return conflict(event, "event id was written with different content");
            }
            if let Some(previous) = stored.last() {
                let previous: &StoredEvent = previous;
                if existing.version != previous.version + 1 {
                    return conflict(event, "event ids were written in another order or split");
                }
            }
            stored.push(existing);
        }
        let first_stored = stored.first().expect("append has events");
        let last_stored = stored.last().expect("append has events");
        if !append.expected.admits_replay_at(first_stored.version) {
            return conflict(first, "event ids were written at another version than expected");
        }
        Ok(Ok(AppendSuccess {
            first_version: first_stored.version,
            last_version: last_stored.version,
            first_position: first_stored.position,
            last_position: last_stored.position,
            idempotent_replay: true,
        }))
    }

    fn write_append(&mut self, append: &AppendCommand) -> Result<AppendOutcome, StorageError> {
        let head = self.head(&append.stream)?;
        let head_version = head.as_ref().map(|h| h.last_version);
        if !append.expected.admits(head_version) {
            return Ok(Err(AppendFailure::WrongExpectedVersion {
                stream: append.stream.clone(),
                expected: append.expected,
                actual: head_version,
            }));
        }
        let first_version = head_version.map_or(0, |v| v + 1);
        let first_position = self.next_position;
        let count = append.events.len() as u64;
        self.write_chunk(EventChunk {
            stream: append.stream.clone(),
            first_version,
            first_position,
            created_unix_ms: append.created_unix_ms,
            events: append.events.clone(),
        })?;
        Ok(Ok(AppendSuccess {
            first_version,
            last_version: first_version + count - 1,
            first_position,
            last_position: first_position + count - 1,
            idempotent_replay: false,
        }))
    }

    /// Stages one chunk at the next position with its index entries and head update.
    fn write_chunk(&mut self, chunk: EventChunk) -> Result<(), StorageError> {
        assert_eq!(chunk.first_position, self.next_position, "positions are assigned in order");
        assert!(!chunk.events.is_empty(), "a chunk holds events");
        let count = chunk.len();
        let last_version = chunk.first_version + count - 1;
        let last_position = chunk.end_position() - 1;
        let new_head = match self.head(&chunk.stream)? {
            None => {
                assert_eq!(chunk.first_version, 0, "a new stream starts at version 0");
                StreamHead {
                    last_version,
                    event_count: count,
                    created_unix_ms: chunk.created_unix_ms,
                    updated_unix_ms: chunk.created_unix_ms,
                    first_position: chunk.first_position,
                    last_position,
                }
            }
            Some(head) => {
                assert_eq!(chunk.first_version, head.last_version + 1, "stream versions are contiguous");
                StreamHead {
                    last_version,
                    event_count: head.event_count + count,
                    updated_unix_ms: chunk.created_unix_ms,
                    last_position,
                    ..head
                }
            }
        };
        let chunk_key = keys::event(chunk.first_position);
        self.batch.insert(&chunk_key, record::seal_value("event chunk", &chunk_key, &chunk)?);
        let index_key = keys::stream_index(&chunk.stream, chunk.first_version);
        self.batch.insert(index_key.clone(), record::seal(&index_key, &chunk.first_position.to_be_bytes()));
        for (offset, event) in chunk.events.iter().enumerate() {
            let position = chunk.first_position + offset as u64;
            let id_key = keys::event_id(&event.id);
            self.batch.insert(&id_key, record::seal(&id_key, &position.to_be_bytes()));
            self.new_ids.insert(event.id, position);
            self.ids.insert(&event.id);
        }
        self.heads.insert(chunk.stream.clone(), Some(new_head));
        self.dirty_heads.insert(chunk.stream.clone());
        self.next_position += count;
        self.events_in_batch += count as usize;
        self.new_chunks.insert(chunk.first_position, chunk);
        Ok(())
    }

    /// Hands out the staged writes so far (heads and overlays stay for later chunks).
    fn take_batch(&mut self) -> sled::Batch {
        self.events_in_batch = 0;
        self.new_chunks.clear();
        std::mem::take(&mut self.batch)
    }

    /// The final batch: staged writes plus the changed heads and the next position.
    fn finish(mut self) -> Result<sled::Batch, StorageError> {
        for stream in &self.dirty_heads {
            let head = self.heads[stream].as_ref().expect("dirty heads exist");
            let key = keys::head(stream);
            self.batch.insert(key.clone(), record::seal_value("stream head", &key, head)?);
        }
        let key = keys::meta(META_NEXT_POSITION);
        self.batch.insert(key.clone(), record::seal(&key, &self.next_position.to_be_bytes()));
        if let Some(next) = self.next_group_id {
            let key = control::next_group_id_key();
            self.batch.insert(key.clone(), record::seal(&key, &next.to_be_bytes()));
        }
        Ok(self.batch)
    }
}

impl ControlStore for BatchWriter<'_> {
    fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>, StorageError> {
        if let Some(staged) = self.control.get(key) {
            return Ok(staged.clone());
        }
        Ok(self.tree.get(key)?.map(|v| v.to_vec()))
    }

    fn scan(&self, prefix: &[u8]) -> Result<Vec<(Vec<u8>, Vec<u8>)>, StorageError> {
        let mut found: BTreeMap<Vec<u8>, Vec<u8>> = BTreeMap::new();
        for item in self.tree.scan_prefix(prefix) {
            let (key, value) = item?;
            found.insert(key.to_vec(), value.to_vec());
        }
        for (key, staged) in self.control.range(prefix.to_vec()..).take_while(|(key, _)| key.starts_with(prefix)) {
            match staged {
                Some(value) => found.insert(key.clone(), value.clone()),
                None => found.remove(key),
            };
        }
        Ok(found.into_iter().collect())
    }

    fn put(&mut self, key: Vec<u8>, value: Vec<u8>) {
        self.batch.insert(key.clone(), value.clone());
        self.control.insert(key, Some(value));
    }

    fn remove(&mut self, key: Vec<u8>) {
        self.batch.remove(key.clone());
        self.control.insert(key, None);
    }

    fn stream_head(&mut self, stream: &str) -> Result<Option<u64>, StorageError> {
        Ok(self.head(stream)?.map(|head| head.last_version))
    }

    fn next_position(&self) -> u64 {
        self.next_position
    }

    fn next_group_id(&mut self) -> Result<u64, StorageError> {
        let id = match self.next_group_id {
            Some(id) => id,
            None => {
                let key = control::next_group_id_key();
                match self.tree.get(&key)? {
                    Some(value) => decode_position("next group id", &key, &value)?,
                    None => 1,
                }
            }
        };
        self.next_group_id = Some(id + 1);
        Ok(id)
    }
}

fn read_head(tree: &sled::Tree, stream: &str) -> Result<Option<StreamHead>, StorageError> {
    let key = keys::head(stream);
    match tree.get(&key)? {
        None => Ok(None),
        Some(value) => Ok(Some(record::open_value("stream head", &key, &value)?)),
    }
}

/// The chunk whose first position is `position`.
fn read_chunk(tree: &sled::Tree, position: u64) -> Result<Option<EventChunk>, StorageError> {
    let key = keys::event(position);
    match tree.get(key)? {
        None => Ok(None),
        Some(value) => {
            let chunk: EventChunk = record::open_value("event chunk", &key, &value)?;
            assert_eq!(chunk.first_position, position, "chunk stored under its first position");
            Ok(Some(chunk))
        }
    }
}

/// The chunk holding `position`, if that position was applied.
fn read_chunk_containing(tree: &sled::Tree, position: u64) -> Result<Option<EventChunk>, StorageError> {
    let Some(item) = tree.range(keys::event(0)..=keys::event(position)).next_back() else { return Ok(None) };
    let (key, value) = item?;
    let chunk: EventChunk = record::open_value("event chunk", &key, &value)?;
    assert_eq!(chunk.first_position, decode_chunk_key(&key)?, "chunk stored under its first position");
    Ok(chunk.contains_position(position).then_some(chunk))
}

fn decode_chunk_key(key: &[u8]) -> Result<u64, StorageError> {
    let corrupt = || StorageError::Corrupt { what: "event chunk key", key: record::printable_key(key) };
    let bytes: [u8; 8] = key.get(1..).ok_or_else(corrupt)?.try_into().map_err(|_| corrupt())?;
    Ok(u64::from_be_bytes(bytes))
}

fn decode_position(what: &'static str, key: &[u8], value: &[u8]) -> Result<u64, StorageError> {
    let payload = record::open(what, key, value)?;
    let bytes: [u8; 8] =
        payload.try_into().map_err(|_| StorageError::Corrupt { what, key: record::printable_key(key) })?;
    Ok(u64::from_be_bytes(bytes))
}

fn read_u64_meta(tree: &sled::Tree, name: &str) -> Result<Option<u64>, StorageError> {
    let key = keys::meta(name);
    match tree.get(&key)? {
        None => Ok(None),
        Some(value) => Ok(Some(decode_position("state metadata", &key, &value)?)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::command::ExpectedVersion;

    fn state() -> (tempfile::TempDir, EventState) {
        let dir = tempfile::tempdir().unwrap();
        let db = crate::open_database(dir.path()).unwrap();
        (dir, EventState::open(&db).unwrap())
    }

    fn event(id: u8) -> NewEvent {
        NewEvent {
            id: [id; 16],
            event_type: "Happened".into(),
            content_type: "application/json".into(),
            data: format!("{{\"n\":{id}}}").into_bytes(),
            metadata: vec![],
        }
    }

    fn append(stream: &str, expected: ExpectedVersion, ids: &[u8]) -> AppendCommand {
        AppendCommand { stream: stream.into(), expected, events: ids.iter().map(|i| event(*i)).collect(), created_unix_ms: 5 }
    }

    fn apply(state: &EventState, appends: Vec<AppendCommand>) -> Vec<AppendOutcome> {
        state.apply(Some(&Command::Appends(appends)), b"meta").unwrap()
    }

    #[test]
    fn appends_get_gapless_positions_and_contiguous_versions() {
        let (_dir, state) = state();
        let out = apply(&state, vec![append("a", ExpectedVersion::NoStream, &[1, 2]), append("b", ExpectedVersion::Any, &[3])]);
        assert_eq!(out[0].as_ref().unwrap().first_position, 0);
        assert_eq!(out[0].as_ref().unwrap().last_version, 1);
        assert_eq!(out[1].as_ref().unwrap().first_position, 2);
        let out = apply(&state, vec![append("a", ExpectedVersion::Exact(1), &[4])]);
        assert_eq!(out[0].as_ref().unwrap().first_version, 2);
        assert_eq!(out[0].as_ref().unwrap().first_position, 3);
        assert_eq!(state.next_position(), 4);
        let events = state.read_stream("a", 0, false, 100).unwrap();
        assert_eq!(events.iter().map(|e| e.version).collect::<Vec<_>>(), vec![0, 1, 2]);
        let backwards = state.read_stream("a", 2, true, 2).unwrap();
        assert_eq!(backwards.iter().map(|e| e.version).collect::<Vec<_>>(), vec![2, 1]);
        assert_eq!(state.applied_meta().unwrap().unwrap(), b"meta");
    }

    #[test]
    fn expected_version_mismatch_writes_nothing() {
        let (_dir, state) = state();
        apply(&state, vec![append("a", ExpectedVersion::NoStream, &[1])]);
        let out = apply(&state, vec![
            append("a", ExpectedVersion::NoStream, &[2]),
            append("a", ExpectedVersion::Exact(5), &[3]),
            append("b", ExpectedVersion::StreamExists, &[4]),
        ]);
        assert!(matches!(&out[0], Err(AppendFailure::WrongExpectedVersion { actual: Some(0), .. })));
        assert!(matches!(&out[1], Err(AppendFailure::WrongExpectedVersion { actual: Some(0), .. })));
        assert!(matches!(&out[2], Err(AppendFailure::WrongExpectedVersion { actual: None, .. })));
        assert_eq!(state.next_position(), 1);
        assert!(state.stream_head("b").unwrap().is_none());
    }

    #[test]
    fn exactly_one_of_concurrent_exact_appends_wins_within_one_entry() {
        let (_dir, state) = state();
        apply(&state, vec![append("a", ExpectedVersion::NoStream, &[1])]);
        let out = apply(&state, (10..18).map(|i| append("a", ExpectedVersion::Exact(0), &[i])).collect());
        assert_eq!(out.iter().filter(|o| o.is_ok()).count(), 1);
    }

    #[test]
    fn retried_append_is_an_idempotent_replay() {
        let (_dir, state) = state();
        let first = apply(&state, vec![append("a", ExpectedVersion::NoStream, &[1, 2])]);
        apply(&state, vec![append("a", ExpectedVersion::Any, &[3])]);
        let replay = apply(&state, vec![append("a", ExpectedVersion::NoStream, &[1, 2])]);
        let (first, replay) = (first[0].clone().unwrap(), replay[0].clone().unwrap());
        assert!(replay.idempotent_replay);
        assert_eq!((replay.first_position, replay.last_version), (first.first_position, first.last_version));
        assert_eq!(state.next_position(), 3);
        // Same ids, retried within the same entry as the original.
        let out = apply(&state, vec![append("c", ExpectedVersion::Any, &[9]), append("c", ExpectedVersion::Any, &[9])]);
        assert!(out[1].as_ref().unwrap().idempotent_replay);
    }

    #[test]
    fn reused_ids_elsewhere_or_changed_are_conflicts() {
        let (_dir, state) = state();
        apply(&state, vec![append("a", ExpectedVersion::NoStream, &[1, 2])]);
        let mut changed = append("a", ExpectedVersion::NoStream, &[1]);
        changed.events[0].data = b"other".to_vec();
        let out = apply(&state, vec![
            append("b", ExpectedVersion::Any, &[1]),
            changed,
            append("a", ExpectedVersion::Exact(3), &[1, 2]),
            append("a", ExpectedVersion::Any, &[2, 1]),
            append("a", ExpectedVersion::Any, &[1, 7]),
            append("a", ExpectedVersion::Any, &[8, 8]),
        ]);
        for outcome in &out {
            assert!(matches!(outcome, Err(AppendFailure::IdempotencyConflict { .. })), "{outcome:?}");
        }
        assert_eq!(state.next_position(), 2);
    }

    #[test]
    fn read_all_pages_filter_and_go_backwards() {
        let (_dir, state) = state();
        for i in 0..10u8 {
            let stream = if i % 2 == 0 { "even" } else { "odd" };
            apply(&state, vec![append(stream, ExpectedVersion::Any, &[i + 1])]);
        }
        let only_even = |e: &StoredEvent| e.stream == "even";
        let (page, next) = state
            .read_all(&ReadAllOptions { from_position: 0, backwards: false, limit: 3, scan_limit: 100, filter: &only_even })
            .unwrap();
        assert_eq!(page.iter().map(|e| e.position).collect::<Vec<_>>(), vec![0, 2, 4]);
        assert_eq!(next, Some(5));
        let all = |_: &StoredEvent| true;
        let (page, next) = state
            .read_all(&ReadAllOptions { from_position: 9, backwards: true, limit: 100, scan_limit: 100, filter: &all })
            .unwrap();
        assert_eq!(page.len(), 10);
        assert_eq!(page[0].position, 9);
        assert_eq!(next, None);
        let names: Vec<String> = state.list_streams("", "", 10).unwrap().into_iter().map(|(n, _)| n).collect();
        assert_eq!(names, vec!["even", "odd"]);
        assert_eq!(state.list_streams("", "even", 10).unwrap().len(), 1);
    }

    #[test]
    fn reads_start_and_stop_inside_multi_event_chunks() {
        let (_dir, state) = state();
        apply(&state, vec![append("a", ExpectedVersion::Any, &[1, 2, 3]), append("b", ExpectedVersion::Any, &[4])]);
        apply(&state, vec![append("a", ExpectedVersion::Any, &[5, 6, 7])]);
        let versions = |events: Vec<StoredEvent>| events.into_iter().map(|e| e.version).collect::<Vec<_>>();
        assert_eq!(versions(state.read_stream("a", 4, false, 10).unwrap()), vec![4, 5]);
        assert_eq!(versions(state.read_stream("a", 1, false, 2).unwrap()), vec![1, 2]);
        assert_eq!(versions(state.read_stream("a", 4, true, 3).unwrap()), vec![4, 3, 2]);
        assert_eq!(versions(state.read_stream("a", 9, true, 10).unwrap()), vec![5, 4, 3, 2, 1, 0]);
        let all = |_: &StoredEvent| true;
        let positions = |(events, next): (Vec<StoredEvent>, Option<u64>)| (events.into_iter().map(|e| e.position).collect::<Vec<_>>(), next);
        let read = |from, backwards, limit| {
            state.read_all(&ReadAllOptions { from_position: from, backwards, limit, scan_limit: 100, filter: &all }).unwrap()
        };
        assert_eq!(positions(read(5, false, 2)), (vec![5, 6], None));
        assert_eq!(positions(read(1, false, 2)), (vec![1, 2], Some(3)));
        assert_eq!(positions(read(5, true, 3)), (vec![5, 4, 3], Some(2)));
        assert_eq!(state.event_at(6).unwrap().unwrap().version, 5);
        assert!(state.event_at(7).unwrap().is_none());
        let below: Vec<u64> = state.events_below(5).map(|e| e.unwrap().position).collect();
        assert_eq!(below, vec![0, 1, 2, 3, 4]);
        // Replaying the second append of the first entry finds its ids inside a chunk.
        let replay = apply(&state, vec![append("a", ExpectedVersion::Exact(2), &[5, 6, 7])]);
        assert_eq!(replay[0].as_ref().unwrap().first_position, 4);
        assert!(replay[0].as_ref().unwrap().idempotent_replay);
    }

    #[test]
    fn entries_applied_together_see_each_other_and_answer_separately() {
        let (_dir, state) = state();
        let one = Command::Appends(vec![append("a", ExpectedVersion::NoStream, &[1])]);
        let two = Command::Appends(vec![append("a", ExpectedVersion::Exact(0), &[2]), append("a", ExpectedVersion::NoStream, &[3])]);
        let out = state.apply_entries(&[Some(&one), None, Some(&two)], b"last").unwrap();
        assert_eq!(out.len(), 3);
        assert_eq!(out[0].appends[0].as_ref().unwrap().first_position, 0);
        assert!(out[1].appends.is_empty());
        assert_eq!(out[2].appends[0].as_ref().unwrap().first_version, 1);
        assert!(matches!(&out[2].appends[1], Err(AppendFailure::WrongExpectedVersion { actual: Some(1), .. })));
        assert_eq!(state.next_position(), 2);
        assert_eq!(state.applied_meta().unwrap().unwrap(), b"last");
    }

    #[test]
    fn staged_entries_are_invisible_until_committed() {
        let (_dir, state) = state();
        let one = Command::Appends(vec![append("a", ExpectedVersion::NoStream, &[1, 2])]);
        let (outcomes, staged) = state.stage_entries(&[Some(&one)], b"staged").unwrap();
        assert_eq!(outcomes[0].appends[0].as_ref().unwrap().last_position, 1, "decided before the write");
        assert_eq!(state.next_position(), 0);
        assert!(state.stream_head("a").unwrap().is_none());
        assert!(state.applied_meta().unwrap().is_none());
        state.commit_staged(staged).unwrap();
        assert_eq!(state.next_position(), 2);
        assert_eq!(state.stream_head("a").unwrap().unwrap().last_version, 1);
        assert_eq!(state.applied_meta().unwrap().unwrap(), b"staged");
    }

    #[test]
    fn replace_all_rebuilds_indexes_and_survives_reopen() {
        let (_dir, source) = state();
        apply(&source, vec![append("a", ExpectedVersion::Any, &[1, 2]), append("b", ExpectedVersion::Any, &[3])]);
        let dir = tempfile::tempdir().unwrap();
        {
            let db = crate::open_database(dir.path()).unwrap();
            let target = EventState::open(&db).unwrap();
            apply(&target, vec![append("stale", ExpectedVersion::Any, &[42])]);
            target.replace_all(source.events_below(3).map(|e| e.map(SnapshotItem::Event)), b"snap").unwrap();
            assert!(target.stream_head("stale").unwrap().is_none());
        }
        let db = crate::open_database(dir.path()).unwrap();
        let target = EventState::open(&db).unwrap();
        assert_eq!(target.next_position(), 3);
        assert_eq!(target.stream_head("a").unwrap().unwrap().last_version, 1);
        assert_eq!(target.applied_meta().unwrap().unwrap(), b"snap");
        let replay = apply(&target, vec![append("a", ExpectedVersion::NoStream, &[1, 2])]);
        assert!(replay[0].as_ref().unwrap().idempotent_replay);
    }
}
