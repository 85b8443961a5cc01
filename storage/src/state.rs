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
//!   entry is in, so an append is never seen half-written;
//! - with tiering, the node holds positions `floor..` (whole chunks); everything below
//!   `floor` is in the tier (`floor` ≤ the replicated tier watermark). The floor moves only
//!   in [`EventState::release_below`], under the release lock that local reads hold, so a
//!   read sees the local part whole or not at all; stream heads and the control state
//!   stay local whatever their events' tier;
//! - records below the floor (chunks, and index entries pointing there) are dead: every
//!   lookup treats them as absent, and the next compaction leaves them behind
//!   ([`EventState::compact_step`]). Releasing deletes nothing itself: deleting each
//!   record cost a node about as much as writing it, and sled gives the space of deleted
//!   records back only through a compaction anyway.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::ops::Bound;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{RwLock, RwLockReadGuard};

use serde::{Deserialize, Serialize};

use crate::chunk::{ChunkHeader, ChunkView, EncodedChunk, EventChunk, EventChunkRef};
use crate::filter_store;
use crate::id_filter::IdFilter;
use crate::local_ids::LocalIds;
use crate::command::{AppendCommand, AppendFailure, AppendOutcome, AppendSuccess, Command, EntryOutcome, EventRef, NewEvent, PageSink, StoredEvent};
use crate::control::{self, AggregateSnapshot, ControlStore, GroupRecord, TierState};
use crate::snapshot::SnapshotItem;
use crate::keys;
use crate::record;
use crate::retention::{self, MetaStreams, StreamMeta};
use crate::chunk_log::ReadAhead;
use crate::state_home::{ChunkBytes, ChunkWrite, Retired, StateHome, StateView};
use crate::{DurableFlush, StorageError, RETIRED_STATE_GRACE, STATE_COMPACT_DEAD_PER_LIVE, STATE_COMPACT_EVENTS_MAX, STATE_COMPACT_GROWTH, STATE_COMPACT_MIN_BYTES};

const META_APPLIED: &str = "applied";
const META_NEXT_POSITION: &str = "next_position";
const META_FLOOR: &str = "floor";
/// The id filter as stored: `[covers_below u64 BE][encoded filter]`, holding every id of
/// the events below `covers_below` (see `id_filter`).
const META_ID_FILTER: &str = "id_filter";
/// Released events after which the id filter is stored again. Between two stores, the
/// ids released since the last one are re-read from the tier at start-up
/// ([`EventState::id_filter_gap`]), so this bounds that work, while the filter (up to
/// `ID_FILTER_BYTES`) is not rewritten on every release.
pub const ID_FILTER_STORE_EVENTS: u64 = 1_000_000;

/// Events of tiered history that an apply batch's idempotency checks need, fetched from
/// the tier before the batch is staged (by id).
pub type ColdEvents = HashMap<[u8; 16], StoredEvent>;

/// Records a compaction step copies (one sled batch): bounds how long applies and local
/// reads wait on a step.
pub const COMPACT_STEP_RECORDS: usize = 2_000;
/// Records a compaction step reads at most, most of them dead ids it skips (reading is
/// cheap beside writing). Fewer, longer steps keep a compaction short, and with it the
/// time every apply is written twice (into the fresh generation too): 2,000 records read
/// per step made a compaction of 20 MB take 4 to 6 s under load.
pub const COMPACT_STEP_SCANNED_MAX: usize = 20_000;

/// Where a compaction is (see [`EventState::compact_step`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CompactStep {
    /// None due (none under way).
    Idle,
    /// Under way: call again.
    Copying,
    /// The fresh generation is live.
    Switched,
}

/// A compaction under way: the fresh generation, the next key to copy into it (None:
/// all copied), and what to report.
struct Compaction {
    fresh: StateHome,
    next_key: Option<Vec<u8>>,
    copied_bytes: u64,
    file_bytes: u64,
    started: std::time::Instant,
}

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

/// A chunk's extent, encoded size and creation time (see [`EventState::chunk_marks`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChunkMark {
    pub first_position: u64,
    pub end_position: u64,
    pub bytes: u64,
    pub created_unix_ms: i64,
}

/// Decided, not yet written entries (see [`EventState::stage_entries`]).
pub struct StagedApply {
    view: StateView,
    batch: sled::Batch,
    /// The staged chunks (written to the chunk log, their pointers to `batch`).
    chunks: Vec<ChunkWrite>,
    next_position: u64,
    /// The ids the staged chunks write, for the local id index once they are in.
    new_ids: HashMap<[u8; 16], u64>,
}

/// What a `$all` page read should return.
pub struct ReadAllOptions<'a> {
    pub from_position: u64,
    pub backwards: bool,
    /// Events to return at most (counting those a sink held before the read).
    pub limit: usize,
    /// Events to look at at most (a filter that matches rarely must not scan forever in
    /// one call); the caller continues from `next_position`.
    pub scan_limit: usize,
    /// Checked once per chunk (a chunk's events share one stream): the chunks of streams it
    /// rejects are stepped over without decoding their events.
    pub stream_filter: &'a dyn Fn(&str) -> bool,
    /// Checked for each event of the streams `stream_filter` accepts.
    pub filter: &'a dyn Fn(&EventRef<'_>) -> bool,
}

/// The applied state of one node.
pub struct EventState {
    /// The main database (the Raft metadata, the pointer to the live state).
    db: sled::Db,
    main_durable: DurableFlush,
    data_dir: PathBuf,
    /// The live state's generation (see `state_home`): swapped whole by snapshot installs
    /// and compactions.
    home: RwLock<StateHome>,
    /// Replaced generations waiting for removal.
    retired: Retired,
    /// Bytes of the live state copied by the last compaction (0: none yet).
    compacted_bytes: AtomicU64,
    /// Events released (left dead in the file) since the last compaction started; at
    /// open, all below the floor, since this file may still hold them.
    released_since_compaction: AtomicU64,
    /// The compaction under way, if any (see [`EventState::compact_step`]).
    compacting: std::sync::Mutex<Option<Compaction>>,
    visible_next_position: AtomicU64,
    /// Every id released to the tier (and possibly ids of replaced states and of local
    /// history): skips the tier lookup for ids that were certainly never released. Ids
    /// enter it when their events are released, not when written: the local index answers
    /// for local history, and a filter insert on every apply cost as much as a lookup.
    ids: IdFilter,
    /// The exact id index of the local history (see `local_ids`).
    local_ids: LocalIds,
    /// The first position held locally; positions below it are in the tier.
    floor: AtomicU64,
    /// Local reads hold it shared; releasing history below the floor holds it exclusively.
    release_lock: RwLock<()>,
    /// Raft snapshots being written: history is not released under them.
    snapshots_building: AtomicUsize,
    /// The in-memory filter holds every id below this position for sure: the stored
    /// filter's coverage after a restart that left a gap, u64::MAX once complete (ids at
    /// and above the floor are always in: the local index is loaded at open).
    filter_covers_below: AtomicU64,
    /// The coverage of the stored filter (kept here so that deciding whether to store it
    /// again does not read the stored filter back).
    filter_stored_covers: AtomicU64,
    /// Streams with retention or deletion metadata (see `retention`).
    meta_streams: MetaStreams,
}

impl EventState {
    /// Opens the applied state of the node whose main database is `db`, in `data_dir`.
    pub fn open(db: &sled::Db, data_dir: &Path) -> Result<Self, StorageError> {
        let home = StateHome::open_live(db, data_dir)?;
        let tree = home.tree.clone();
        let meta_streams = MetaStreams::default();
        for key in tree.scan_prefix([retention::STREAM_META]).keys() {
            let key = key?;
            if let Some(stream) = retention::stream_of_meta_key(&key) {
                meta_streams.insert(stream);
            }
        }
        let next_position = read_u64_meta(&tree, META_NEXT_POSITION)?.unwrap_or(0);
        let floor = read_u64_meta(&tree, META_FLOOR)?.unwrap_or(0);
        let ids = IdFilter::new();
        let mut covers_below = floor;
        let mut stored_covers = 0;
        if floor > 0 {
            covers_below = match load_stored_filter(data_dir, db, &tree)? {
                None => 0,
                Some((covers, encoded)) => {
                    ids.merge_encoded(&encoded).ok_or_else(|| StorageError::Corrupt { what: "stored id filter", key: META_ID_FILTER.into() })?;
                    stored_covers = covers;
                    stored_covers.min(floor)
                }
            };
        }
        let local_ids = LocalIds::default();
        let started = std::time::Instant::now();
        let view = home.view();
        for item in chunk_records(&view, floor, next_position)? {
            let (key, value) = item?;
            let chunk = ChunkView::open(&key, &value)?;
            if chunk.first_position < floor {
                continue;
            }
            local_ids.insert_all(chunk.ids_with_positions());
        }
        tracing::info!(local_ids = local_ids.len(), took_ms = started.elapsed().as_millis() as u64, "local event id index loaded from the chunks");
        Ok(Self {
            db: db.clone(),
            main_durable: DurableFlush::new(db, &data_dir.join("sled"))?,
            data_dir: data_dir.to_path_buf(),
            home: RwLock::new(home),
            retired: Retired::default(),
            compacted_bytes: AtomicU64::new(0),
            released_since_compaction: AtomicU64::new(floor),
            compacting: std::sync::Mutex::new(None),
            visible_next_position: AtomicU64::new(next_position),
            ids,
            local_ids,
            floor: AtomicU64::new(floor),
            release_lock: RwLock::new(()),
            snapshots_building: AtomicUsize::new(0),
            filter_covers_below: AtomicU64::new(if covers_below >= floor { u64::MAX } else { covers_below }),
            filter_stored_covers: AtomicU64::new(stored_covers),
            meta_streams,
        })
    }

    /// Positions `[from, floor)` whose ids the filter may lack after a restart (released
    /// since the filter was last stored): the caller reads them from the tier and hands
    /// their ids to [`EventState::fill_id_filter`] before anything is applied.
    pub fn id_filter_gap(&self) -> Option<std::ops::Range<u64>> {
        let (covers, floor) = (self.filter_covers_below.load(Ordering::Acquire), self.floor());
        (covers < floor).then_some(covers..floor)
    }

    /// Adds ids read from the tier for the gap, then records the gap as filled up to `to`.
    pub fn fill_id_filter(&self, ids: impl IntoIterator<Item = [u8; 16]>, to: u64) {
        for id in ids {
            self.ids.insert(&id);
        }
        let covers = if to >= self.floor() { u64::MAX } else { to };
        self.filter_covers_below.fetch_max(covers, Ordering::AcqRel);
    }

    /// Stores the id filter if `ID_FILTER_STORE_EVENTS` events were released since it was
    /// last stored (or `force`); returns whether it did.
    pub fn store_id_filter_if_due(&self, force: bool) -> Result<bool, StorageError> {
        let stored_covers = self.filter_stored_covers.load(Ordering::Acquire);
        let floor = self.floor();
        if floor == 0 || self.id_filter_gap().is_some() || (!force && floor < stored_covers + ID_FILTER_STORE_EVENTS) {
            return Ok(false);
        }
        // Everything released is in the filter (ids enter it as they are released).
        let covers = floor;
        filter_store::store(&self.data_dir, &self.db, covers, &self.ids.encode())?;
        // A filter stored by an earlier version, among the state's metadata, is superseded.
        {
            let _exclusive = self.release_lock.write().expect("release lock is never poisoned");
            let mut batch = sled::Batch::default();
            batch.remove(keys::meta(META_ID_FILTER));
            self.write_live(&self.view(), batch, Vec::new())?;
        }
        self.filter_stored_covers.store(covers, Ordering::Release);
        Ok(true)
    }

    /// The first position held locally (0 until tiered history was released).
    pub fn floor(&self) -> u64 {
        self.floor.load(Ordering::Acquire)
    }

    /// Holds off releases while local reads run: the floor it returns stays put until the
    /// guard is dropped.
    fn local_reads(&self) -> (RwLockReadGuard<'_, ()>, u64) {
        let guard = self.release_lock.read().expect("release lock is never poisoned");
        (guard, self.floor())
    }

    /// Whether `stream` may have retention or deletion metadata (false: certainly none).
    pub fn may_have_meta(&self, stream: &str) -> bool {
        self.meta_streams.may_have(stream)
    }

    /// A stream's retention and deletion metadata, if it has any.
    pub fn stream_meta(&self, stream: &str) -> Result<Option<StreamMeta>, StorageError> {
        if !self.meta_streams.may_have(stream) {
            return Ok(None);
        }
        control::read_stream_meta(&self.tree(), stream)
    }

    /// The streams that have (or had) retention or deletion metadata: the only ones a
    /// scavenge can touch.
    pub fn streams_with_meta(&self) -> Vec<String> {
        self.meta_streams.names()
    }

    /// The replicated tier state.
    pub fn tier_state(&self) -> Result<TierState, StorageError> {
        control::read_tier_state(&self.tree())
    }

    /// The ids of `commands`' events whose idempotency check needs the tier: they may
    /// have been written (the filter says maybe), and not at a position held locally.
    pub fn ids_to_resolve(&self, commands: &[Option<&Command>]) -> Result<Vec<[u8; 16]>, StorageError> {
        if self.floor() == 0 {
            return Ok(Vec::new());
        }
        // Until a restart's gap is filled the filter may lack released ids: ask the tier.
        let complete = self.id_filter_gap().is_none();
        let floor = self.floor();
        let mut out = Vec::new();
        for command in commands {
            let Some(Command::Appends(appends)) = command else { continue };
            for event in appends.iter().flat_map(|a| a.events.iter()) {
                if (!complete || self.ids.may_contain(&event.id)) && self.local_ids.position(&event.id, floor).is_none() {
                    out.push(event.id);
                }
            }
        }
        Ok(out)
    }

    /// Bytes of the live state generation on disk: its sled database file and its chunk
    /// log (a gauge for operators: compactions bring it back down).
    pub fn state_bytes(&self) -> u64 {
        self.home.read().expect("state home lock is never poisoned").file_bytes(&self.data_dir)
    }

    /// Ids in the local id index (a gauge for operators: it is held in memory).
    pub fn local_id_count(&self) -> usize {
        self.local_ids.len()
    }

    /// Releases the local copy of the whole chunks below `watermark` (which must be durable
    /// in the tier and visible to this node's tier reader) by moving the floor past them;
    /// returns the events released (0: nothing below the watermark, or a snapshot is being
    /// built). Their records stay in the file, dead, until the next compaction; the
    /// in-memory id filter keeps their ids, stored now and then
    /// ([`EventState::store_id_filter_if_due`]) and the rest re-read from the tier after a
    /// restart. Never runs while a Raft snapshot is built, nor concurrently with an apply
    /// (the caller serialises it with applies).
    pub fn release_below(&self, watermark: u64) -> Result<u64, StorageError> {
        if self.snapshots_building.load(Ordering::Acquire) > 0 {
            return Ok(0);
        }
        let floor = self.floor();
        if watermark <= floor {
            return Ok(0);
        }
        // The watermark may cut a chunk: the floor stops at the start of that chunk, or at
        // its end if it ends exactly at the watermark.
        let view = self.view();
        let tree = &view.tree;
        let Some(item) = tree.range(keys::event(floor)..=keys::event(watermark)).next_back() else { return Ok(0) };
        let (key, value) = item?;
        let value = view.chunk_bytes(&key, value)?;
        let chunk = ChunkView::open(&key, &value)?;
        let new_floor = if chunk.end_position() <= watermark { chunk.end_position() } else { chunk.first_position };
        if new_floor <= floor {
            return Ok(0);
        }
        let key = keys::meta(META_FLOOR);
        let mut batch = sled::Batch::default();
        batch.insert(key.clone(), record::seal(&key, &new_floor.to_be_bytes()));
        // The released chunks' ids move from the local index to the filter; read before
        // the floor moves, while they are still local history. A release waits for no
        // apply (the caller serialises them), so nothing is staged meanwhile.
        let mut released_ids = Vec::with_capacity((new_floor - floor) as usize);
        for item in chunk_records(&view, floor, new_floor)? {
            let (key, value) = item?;
            let chunk = ChunkView::open(&key, &value)?;
            released_ids.extend(chunk.ids_with_positions());
        }
        for (id, _) in &released_ids {
            self.ids.insert(id);
        }
        let _exclusive = self.release_lock.write().expect("release lock is never poisoned");
        self.write_live(&view, batch, Vec::new())?;
        self.floor.store(new_floor, Ordering::Release);
        self.local_ids.remove(released_ids);
        self.released_since_compaction.fetch_add(new_floor - floor, Ordering::AcqRel);
        Ok(new_floor - floor)
    }

    /// Rewrites this node's copy of `stream`'s events from `from_version` up to its
    /// replicated `scavenged_before` as scavenged placeholders (payloads dropped, see
    /// [`NewEvent::scavenged`]), at most about `max_events` of them; returns the events
    /// rewritten and the version reached (continue from there). Events below the floor
    /// are the tier's to scavenge. Safe beside applies: a placeholder decides every
    /// idempotency check as the event did, and chunks are otherwise immutable.
    pub fn scavenge_local(&self, stream: &str, from_version: u64, max_events: usize) -> Result<(u64, u64), StorageError> {
        let Some(meta) = self.stream_meta(stream)? else { return Ok((0, from_version)) };
        let before = meta.scavenged_before;
        if from_version >= before {
            return Ok((0, from_version.max(before)));
        }
        let view = self.view();
        let tree = &view.tree;
        let start = stream_chunk_start(tree, stream, from_version)?;
        let mut rewritten = 0u64;
        let mut reached = from_version;
        let mut rewrites: Vec<ChunkWrite> = Vec::new();
        for item in tree.range(start..keys::stream_index(stream, before)) {
            let (key, value) = item?;
            let position = decode_position("stream index entry", &key, &value)?;
            if position < self.floor() {
                continue; // the tier's to scavenge
            }
            let Some(mut chunk) = read_chunk(&view, position)? else {
                // Dropped by a compaction since the index was read.
                continue;
            };
            let changed = chunk.scavenge_below(before);
            reached = (chunk.first_version + chunk.len()).min(before);
            if changed > 0 {
                let chunk_key = keys::event(chunk.first_position);
                rewrites.push((chunk_key, record::seal_value("event chunk", &chunk_key, &chunk)?));
                rewritten += changed;
            }
            if rewritten as usize >= max_events {
                break;
            }
        }
        if rewritten > 0 {
            // Under the release lock, and only above the floor: a chunk released meanwhile
            // must not come back.
            let _exclusive = self.release_lock.write().expect("release lock is never poisoned");
            // The live tree: a compaction may have switched generations since the read.
            let view = self.view();
            let floor = self.floor();
            let mut kept = Vec::with_capacity(rewrites.len());
            for (key, value) in rewrites {
                if decode_chunk_key(&key)? >= floor && view.tree.contains_key(key)? {
                    kept.push((key, value));
                }
            }
            self.write_live(&view, sled::Batch::default(), kept)?;
        }
        if rewritten as usize >= max_events {
            return Ok((rewritten, reached));
        }
        Ok((rewritten, before))
    }

    fn tree(&self) -> sled::Tree {
        self.home.read().expect("state home lock is never poisoned").tree.clone()
    }

    /// The live generation's tree and chunk log.
    fn view(&self) -> StateView {
        self.home.read().expect("state home lock is never poisoned").view()
    }

    /// Makes every applied write durable: the raft layer calls it before it records a
    /// snapshot, after which the log below the snapshot may go.
    pub fn sync(&self) -> Result<(), StorageError> {
        self.home.read().expect("state home lock is never poisoned").sync(&self.db)
    }

    /// One step of compacting the state's database (sled does not give a queue's churn
    /// back, see `state_home`), leaving released records behind. Idle, a compaction starts
    /// once the file has grown past `STATE_COMPACT_MIN_BYTES` and `STATE_COMPACT_GROWTH`
    /// times the live state, with `STATE_COMPACT_DEAD_PER_LIVE` times as many events
    /// released since the last one as are held: a fresh generation is created, and from
    /// then on every write to the live state is mirrored into it
    /// ([`EventState::write_live`]). Each further step copies the next
    /// `COMPACT_STEP_RECORDS` live records (reading at most `COMPACT_STEP_SCANNED_MAX`);
    /// once all are in, the fresh generation is synced (without holding anything), and
    /// the last step switches it in and retires the old
    /// one. The caller serialises steps with applies and releases (one per turn of the
    /// apply gate), so no apply waits on more than one step. Idle steps also remove
    /// replaced generations past their grace.
    pub fn compact_step(&self) -> Result<CompactStep, StorageError> {
        self.compact_step_over(STATE_COMPACT_MIN_BYTES, RETIRED_STATE_GRACE)
    }

    pub(crate) fn compact_step_over(&self, min_bytes: u64, grace: std::time::Duration) -> Result<CompactStep, StorageError> {
        {
            let mut compacting = self.compacting.lock().expect("compaction lock is never poisoned");
            if compacting.is_none() {
                // Starting needs no release lock: writers mirror under the compaction lock.
                return self.start_compaction_if_due(&mut compacting, min_bytes, grace);
            }
        }
        // Copying and switching hold off scavenges (which write outside the apply gate)
        // and local reads. Lock order everywhere: the release lock, then the compaction.
        let exclusive = self.release_lock.write().expect("release lock is never poisoned");
        let mut compacting = self.compacting.lock().expect("compaction lock is never poisoned");
        let Some(compaction) = compacting.as_mut() else {
            // Abandoned meanwhile by a snapshot install.
            return Ok(CompactStep::Idle);
        };
        if let Some(from) = compaction.next_key.take() {
            let mut batch = sled::Batch::default();
            // The live chunks go into the fresh generation's chunk log: the old one goes
            // with its generation.
            let mut chunks: Vec<ChunkWrite> = Vec::new();
            // Stable during the step: releases take the release lock held here.
            let floor = self.floor();
            let mut copied = 0;
            let view = self.view();
            for (scanned, item) in view.tree.range(from..).enumerate() {
                let (key, value) = item?;
                if copied == COMPACT_STEP_RECORDS || scanned == COMPACT_STEP_SCANNED_MAX {
                    compaction.next_key = Some(key.to_vec());
                    break;
                }
                if is_released_record(&key, &value, floor)? {
                    if key.first() == Some(&keys::EVENT) {
                        // Released chunks, the bulk of the dead records, are skipped whole.
                        compaction.next_key = Some(keys::event(floor).to_vec());
                        break;
                    }
                    continue;
                }
                copied += 1;
                if key.first() == Some(&keys::EVENT) {
                    let sealed = view.chunk_bytes(&key, value)?;
                    compaction.copied_bytes += (key.len() + sealed.len()) as u64;
                    chunks.push((chunk_key_array(&key)?, sealed.into_vec()));
                    continue;
                }
                compaction.copied_bytes += (key.len() + value.len()) as u64;
                batch.insert(key, value);
            }
            compaction.fresh.view().store(batch, chunks)?;
            if compaction.next_key.is_none() {
                // All copied: write it out now, while applies go on (mirrored), so that
                // the switch has little left to sync.
                let durable = compaction.fresh.durable();
                drop(compacting);
                drop(exclusive);
                if let Some(durable) = durable {
                    durable.flush()?;
                }
            }
            return Ok(CompactStep::Copying);
        }
        let compaction = compacting.take().expect("a compaction is under way");
        compaction.fresh.make_live(&self.main_durable, &self.db)?;
        let old = std::mem::replace(&mut *self.home.write().expect("state home lock is never poisoned"), compaction.fresh);
        if let Some(dir) = old.retire(&self.db)? {
            self.retired.add(dir);
        }
        self.compacted_bytes.store(compaction.copied_bytes, Ordering::Release);
        tracing::info!(
            file_bytes = compaction.file_bytes,
            live_bytes = compaction.copied_bytes,
            took_ms = compaction.started.elapsed().as_millis() as u64,
            "state compacted into a fresh generation"
        );
        Ok(CompactStep::Switched)
    }

    /// Starts a compaction if one is due (see [`EventState::compact_step`]); removes replaced
    /// generations past their grace unless a snapshot being built may still read them.
    fn start_compaction_if_due(&self, compacting: &mut Option<Compaction>, min_bytes: u64, grace: std::time::Duration) -> Result<CompactStep, StorageError> {
        let snapshot_building = self.snapshots_building.load(Ordering::Acquire) > 0;
        if !snapshot_building {
            self.retired.remove_due(grace);
        }
        let file_bytes = self.home.read().expect("state home lock is never poisoned").file_bytes(&self.data_dir);
        let live_bytes = self.compacted_bytes.load(Ordering::Acquire);
        let local_events = self.next_position().saturating_sub(self.floor());
        // Only once the dead events outnumber the live ones `STATE_COMPACT_DEAD_PER_LIVE`
        // times: before that the file's growth is mostly sled's own, which a copy does not
        // shrink for long, while the copy competes with applies.
        let released = self.released_since_compaction.load(Ordering::Acquire);
        if snapshot_building
            || local_events > STATE_COMPACT_EVENTS_MAX
            || released < local_events.max(1).saturating_mul(STATE_COMPACT_DEAD_PER_LIVE)
            || file_bytes < min_bytes.max(live_bytes.saturating_mul(STATE_COMPACT_GROWTH))
        {
            return Ok(CompactStep::Idle);
        }
        self.released_since_compaction.fetch_sub(released, Ordering::AcqRel);
        let fresh = StateHome::create_next(&self.data_dir)?;
        tracing::info!(file_bytes, live_bytes, local_events, fresh = %fresh.name(), "compacting the state into a fresh generation");
        *compacting = Some(Compaction { fresh, next_key: Some(Vec::new()), copied_bytes: 0, file_bytes, started: std::time::Instant::now() });
        Ok(CompactStep::Copying)
    }

    /// Writes `batch` to the live tree and, while a compaction is under way, to its fresh
    /// generation too. Every write to the live state goes through here.
    /// `chunks` go to each generation's chunk log (see [`StateView::store`]).
    fn write_live(&self, view: &StateView, batch: sled::Batch, chunks: Vec<ChunkWrite>) -> Result<(), StorageError> {
        let compacting = self.compacting.lock().expect("compaction lock is never poisoned");
        match compacting.as_ref() {
            Some(compaction) => {
                view.store(batch.clone(), chunks.clone())?;
                compaction.fresh.view().store(batch, chunks)?;
            }
            None => view.store(batch, chunks)?,
        }
        Ok(())
    }

    /// Gives up a compaction under way (a snapshot install replaces the whole state).
    fn abandon_compaction(&self) {
        let abandoned = self.compacting.lock().expect("compaction lock is never poisoned").take();
        if let Some(Ok(Some(dir))) = abandoned.map(|compaction| compaction.fresh.retire(&self.db)) {
            self.retired.add(dir);
        }
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
        Ok(self.apply_entries(&[command], applied_meta, &ColdEvents::new())?.pop().expect("one entry in, one out").appends)
    }

    /// Applies one control command as its own entry (tests and tools).
    pub fn apply_control(&self, command: control::ControlCommand, applied_meta: &[u8]) -> Result<control::ControlOutcome, StorageError> {
        let command = Command::Control(command);
        let mut out = self.apply_entries(&[Some(&command)], applied_meta, &ColdEvents::new())?;
        Ok(out.pop().and_then(|entry| entry.control).expect("a control entry has a control outcome"))
    }

    /// Applies consecutive Raft entries (their commands, None for blank and membership
    /// entries) and the raft layer's applied metadata after the last, in one atomic sled
    /// batch. Returns, per entry, what it decided.
    ///
    /// One batch for many entries because every sled batch costs two synchronous log
    /// write-backs (sled rolls its io buffer around it): under load, committed entries
    /// arrive together and share them.
    pub fn apply_entries(
        &self,
        commands: &[Option<&Command>],
        applied_meta: &[u8],
        cold: &ColdEvents,
    ) -> Result<Vec<EntryOutcome>, StorageError> {
        let (outcomes, staged) = self.stage_entries(commands, applied_meta, cold)?;
        self.commit_staged(staged)?;
        Ok(outcomes)
    }

    /// The first half of [`EventState::apply_entries`]: decides every append and stages
    /// the writes, touching nothing. The outcomes are final (the entries are committed and
    /// the decision is deterministic), so the caller may answer proposers before
    /// [`EventState::commit_staged`] writes them; readers see nothing until then. Nothing
    /// else may be staged or applied in between.
    ///
    /// `cold` holds the tiered events of the ids [`EventState::ids_to_resolve`] named (those
    /// found in the tier): with them, every node decides idempotency on the same history,
    /// whichever part of it it still holds locally.
    pub fn stage_entries(
        &self,
        commands: &[Option<&Command>],
        applied_meta: &[u8],
        cold: &ColdEvents,
    ) -> Result<(Vec<EntryOutcome>, StagedApply), StorageError> {
        let view = self.view();
        let mut writer = BatchWriter::new(&view, self.floor(), self.next_position(), &self.ids, &self.local_ids, &self.meta_streams);
        writer.cold = Some(cold);
        let mut per_entry = Vec::with_capacity(commands.len());
        for command in commands {
            let mut outcome = EntryOutcome::default();
            match command {
                Some(Command::Appends(appends)) => {
                    outcome.appends.reserve(appends.len());
                    for append in appends.iter() {
                        outcome.appends.push(writer.apply_append(append)?);
                    }
                }
                Some(Command::Control(command)) => outcome.control = Some(control::apply_control(&mut writer, command)?),
                None => {}
            }
            per_entry.push(outcome);
        }
        let next_position = writer.next_position;
        let (mut batch, chunks, new_ids) = writer.finish()?;
        let meta_key = keys::meta(META_APPLIED);
        batch.insert(meta_key.clone(), record::seal(&meta_key, applied_meta));
        Ok((per_entry, StagedApply { view, batch, chunks, next_position, new_ids }))
    }

    /// Writes staged entries in one atomic sled batch and makes them visible to readers.
    pub fn commit_staged(&self, staged: StagedApply) -> Result<(), StorageError> {
        self.write_live(&staged.view, staged.batch, staged.chunks)?;
        self.local_ids.insert_all(staged.new_ids);
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
        let (_guard, floor) = self.local_reads();
        if position >= self.next_position() || position < floor {
            return Ok(None);
        }
        Ok(read_chunk_containing(&self.view(), position)?.map(|chunk| chunk.event_at(position)))
    }

    /// Up to `limit` events of `stream` starting at `from_version` (inclusive), forwards
    /// or backwards. Stops at the visible end of `$all`. Only the locally held part (see
    /// [`EventState::read_stream_local`]).
    pub fn read_stream(
        &self,
        stream: &str,
        from_version: u64,
        backwards: bool,
        limit: usize,
    ) -> Result<Vec<StoredEvent>, StorageError> {
        Ok(self.read_stream_local(stream, from_version, backwards, limit)?.0)
    }

    /// [`EventState::read_stream`], and the floor it read at: the stream's events below
    /// the floor, if any, are in the tier, not in the answer.
    pub fn read_stream_local(
        &self,
        stream: &str,
        from_version: u64,
        backwards: bool,
        limit: usize,
    ) -> Result<(Vec<StoredEvent>, u64), StorageError> {
        let (_guard, floor) = self.local_reads();
        let view = self.view();
        let tree = &view.tree;
        let visible = self.next_position();
        let prefix = keys::stream_index_prefix(stream);
        let mut end = prefix.clone();
        *end.last_mut().expect("prefix ends with the separator") = 1;
        // The stream index has one entry per chunk, under the chunk's first version: start
        // from the chunk that holds `from_version`.
        let range: Box<dyn Iterator<Item = sled::Result<(sled::IVec, sled::IVec)>>> = if backwards {
            Box::new(tree.range(prefix.clone()..=keys::stream_index(stream, from_version)).rev())
        } else {
            Box::new(tree.range(stream_chunk_start(tree, stream, from_version)?..end))
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
            if position < floor {
                // Released to the tier (versions follow positions: so are all before it).
                if backwards {
                    break;
                }
                continue;
            }
            let mut events = read_chunk_events(&view, position)?.ok_or_else(|| StorageError::Corrupt {
                what: "stream index points at a missing chunk",
                key: record::printable_key(&key),
            })?;
            assert!(events.iter().all(|event| event.stream == stream), "stream index entry must point into its stream");
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
        Ok((out, floor))
    }

    /// A page of `$all`: returns the matching events and the position to continue from
    /// (None when the visible end, or position 0 backwards, was reached). Only the locally
    /// held part: a forward read from below the floor starts at the floor, a backward read
    /// stops there (its continuation is then below the floor).
    pub fn read_all(&self, options: &ReadAllOptions<'_>) -> Result<(Vec<StoredEvent>, Option<u64>), StorageError> {
        let (_guard, floor) = self.local_reads();
        let mut events = Vec::new();
        let next = self.read_all_unlocked(options, floor, &mut events)?;
        Ok((events, next))
    }

    /// [`EventState::read_all`] into `sink` (which may hold events already: `limit` counts
    /// them too), if `from_position` is at or above the floor: returns where to continue and
    /// the floor it read at. A read from below the floor reads nothing (that part is in the
    /// tier) and returns the floor, above `from_position`.
    pub fn read_all_local_into(&self, options: &ReadAllOptions<'_>, sink: &mut dyn PageSink) -> Result<(Option<u64>, u64), StorageError> {
        let (_guard, floor) = self.local_reads();
        if options.from_position < floor {
            return Ok((Some(options.from_position), floor));
        }
        let next = self.read_all_unlocked(options, floor, sink)?;
        Ok((next, floor))
    }

    fn read_all_unlocked(&self, options: &ReadAllOptions<'_>, floor: u64, sink: &mut dyn PageSink) -> Result<Option<u64>, StorageError> {
        let view = self.view();
        let tree = &view.tree;
        let visible = self.next_position();
        if options.backwards && options.from_position < floor {
            return Ok(Some(options.from_position));
        }
        let options = &ReadAllOptions { from_position: options.from_position.max(floor), ..*options };
        if !options.backwards && options.from_position >= visible {
            return Ok(None);
        }
        let from = if options.backwards {
            if visible == 0 {
                return Ok(None);
            }
            options.from_position.min(visible - 1)
        } else {
            options.from_position
        };
        let start = chunk_start(tree, from)?;
        let range: Box<dyn Iterator<Item = sled::Result<(sled::IVec, sled::IVec)>>> = if options.backwards {
            Box::new(tree.range(keys::event(0)..=keys::event(start)).rev())
        } else {
            Box::new(tree.range(keys::event(start)..keys::event(visible)))
        };
        let keeps_payloads = sink.keeps_payloads();
        let mut scanned = 0usize;
        let mut last_seen: Option<u64> = None;
        let mut window = ReadAhead::default();
        'chunks: for item in range {
            let (key, value) = item?;
            if decode_chunk_key(&key)? < floor {
                // Released to the tier: a backward read stops at the floor.
                break;
            }
            let value = if options.backwards { view.chunk_bytes(&key, value)? } else { view.chunk_bytes_in_order(&key, value, &mut window)? };
            let (wanted, first_position, len) = {
                let header: ChunkHeader<'_> = record::decode_view("event chunk", &key, record::open("event chunk", &key, &value)?)?;
                ((options.stream_filter)(header.stream), header.first_position, header.len)
            };
            // The events of a wanted stream, borrowed from the record (checksummed above), or
            // from shared bytes of it for a sink that keeps slices; none of another stream,
            // whose positions are still stepped through (they count as scanned).
            let mut value = Some(value);
            let shared = (wanted && keeps_payloads).then(|| value.take().expect("not taken yet").into_bytes());
            let payload = match (&shared, &value) {
                (Some(shared), _) => Some(&shared[record::CHECKSUM_BYTES..]),
                (None, Some(value)) if wanted => Some(&value[record::CHECKSUM_BYTES..]),
                _ => None,
            };
            let events = payload.map(|payload| ChunkView::read(&key, payload)).transpose()?;
            let offsets: Box<dyn Iterator<Item = u64>> =
                if options.backwards { Box::new((0..len).rev()) } else { Box::new(0..len) };
            for offset in offsets {
                let position = first_position + offset;
                if (options.backwards && position > from) || (!options.backwards && position < from) {
                    continue;
                }
                if position >= visible {
                    break 'chunks;
                }
                if sink.len() >= options.limit || sink.is_full() || scanned >= options.scan_limit {
                    break 'chunks;
                }
                if let Some(last) = last_seen {
                    let expected = if options.backwards { last - 1 } else { last + 1 };
                    assert_eq!(position, expected, "positions are gapless");
                }
                last_seen = Some(position);
                scanned += 1;
                let Some(events) = &events else { continue };
                let event = events.event_ref(offset as usize).ok_or_else(|| StorageError::Corrupt {
                    what: "event chunk shorter than its header says",
                    key: record::printable_key(&key),
                })?;
                if (options.filter)(&event) {
                    sink.push(&event, shared.as_ref());
                }
            }
        }
        let next = match last_seen {
            None => None,
            Some(last) if options.backwards => last.checked_sub(1),
            Some(last) => Some(last + 1).filter(|next| *next < visible),
        };
        Ok(next)
    }

    /// A persistent subscription group, if it exists.
    pub fn group(&self, name: &str) -> Result<Option<GroupRecord>, StorageError> {
        control::read_group(&self.tree(), name)
    }

    /// Every persistent subscription group, by name.
    pub fn groups(&self) -> Result<Vec<GroupRecord>, StorageError> {
        control::list_groups(&self.tree())
    }

    /// A user, if it exists.
    pub fn user(&self, name: &str) -> Result<Option<crate::access::UserRecord>, StorageError> {
        crate::access::read_user(&self.tree(), name)
    }

    /// Every user, by name.
    pub fn users(&self) -> Result<Vec<crate::access::UserRecord>, StorageError> {
        crate::access::list_users(&self.tree())
    }

    /// Every per-stream rule, by pattern.
    pub fn stream_rules(&self) -> Result<Vec<strata_security::StreamRule>, StorageError> {
        crate::access::list_rules(&self.tree())
    }

    /// The key tokens are signed with, once the first leader has set it.
    pub fn token_key(&self) -> Result<Option<crate::access::SecretBytes>, StorageError> {
        crate::access::read_token_key(&self.tree())
    }

    /// A stream's aggregate snapshots, lowest version first.
    pub fn snapshots(&self, stream: &str) -> Result<Vec<AggregateSnapshot>, StorageError> {
        control::list_snapshots(&self.tree(), stream)
    }

    /// The stream's snapshot with the highest version ≤ `max_version` (None: any).
    pub fn latest_snapshot(&self, stream: &str, max_version: Option<u64>) -> Result<Option<AggregateSnapshot>, StorageError> {
        control::latest_snapshot(&self.tree(), stream, max_version)
    }

    /// Every control record and stream head (key, sealed value), for a Raft snapshot:
    /// heads travel as records because a stream's events may all be in the tier.
    pub(crate) fn control_records(&self) -> impl Iterator<Item = Result<(Vec<u8>, Vec<u8>), StorageError>> {
        let tree = self.tree();
        control::CONTROL_PREFIXES.into_iter().chain([keys::HEAD]).flat_map(move |prefix| {
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
        floor: u64,
        items: impl Iterator<Item = Result<SnapshotItem, StorageError>>,
        applied_meta: &[u8],
    ) -> Result<u64, StorageError> {
        self.abandon_compaction();
        let fresh_home = StateHome::create_next(&self.data_dir)?;
        let fresh = fresh_home.view();
        // The filter keeps the replaced state's ids: stale bits cost a lookup, never an answer.
        let mut writer = BatchWriter::new(&fresh, floor, floor, &self.ids, &self.local_ids, &self.meta_streams);
        // Stream heads come as records (their events may be in the tier).
        writer.heads_given = true;
        let mut chunk: Option<EventChunk> = None;
        for item in items {
            let event = match item? {
                SnapshotItem::Event(event) => event,
                SnapshotItem::IdFilter(bytes) => {
                    self.ids.merge_encoded(&bytes).ok_or_else(|| StorageError::Corrupt {
                        what: "snapshot id filter",
                        key: META_ID_FILTER.into(),
                    })?;
                    // It holds every id below the floor. Stored before the new state is
                    // switched in: should the install stop short, the old state keeps a
                    // filter that holds at least its own ids (extra bits only cost lookups).
                    filter_store::store(&self.data_dir, &self.db, floor, &bytes)?;
                    continue;
                }
                SnapshotItem::Control { key, value } => {
                    if !control::is_control_key(&key) && key.first() != Some(&keys::HEAD) {
                        return Err(StorageError::Corrupt { what: "snapshot control record key", key: record::printable_key(&key) });
                    }
                    record::open("snapshot control record", &key, &value)?;
                    if let Some(stream) = retention::stream_of_meta_key(&key) {
                        self.meta_streams.insert(stream);
                    }
                    writer.batch.insert(key, value);
                    continue;
                }
            };
            match chunk.as_mut() {
                Some(open) if open.continues_with(&event) => open.push(event),
                _ => {
                    if let Some(full) = chunk.replace(EventChunk::of(event)) {
                        writer.write_chunk(full.as_chunk_ref())?;
                    }
                }
            }
            if writer.pending_events() >= REPLACE_BATCH_EVENTS_MAX {
                let (batch, chunks) = writer.take_batch();
                fresh.store(batch, chunks)?;
            }
        }
        if let Some(last) = chunk {
            writer.write_chunk(last.as_chunk_ref())?;
        }
        let next_position = writer.next_position;
        let (mut batch, chunks, new_ids) = writer.finish()?;
        let meta_key = keys::meta(META_APPLIED);
        batch.insert(meta_key.clone(), record::seal(&meta_key, applied_meta));
        let floor_key = keys::meta(META_FLOOR);
        batch.insert(floor_key.clone(), record::seal(&floor_key, &floor.to_be_bytes()));
        fresh.store(batch, chunks)?;
        // The fresh generation is durable before the pointer that names it.
        fresh_home.make_live(&self.main_durable, &self.db)?;
        let _exclusive = self.release_lock.write().expect("release lock is never poisoned");
        let old = std::mem::replace(&mut *self.home.write().expect("state home lock is never poisoned"), fresh_home);
        self.visible_next_position.store(next_position, Ordering::Release);
        self.floor.store(floor, Ordering::Release);
        self.local_ids.replace(new_ids);
        // The snapshot's filter holds every id below its floor; the rest is local.
        self.filter_covers_below.store(u64::MAX, Ordering::Release);
        self.filter_stored_covers.store(floor, Ordering::Release);
        if let Some(dir) = old.retire(&self.db)? {
            self.retired.add(dir);
        }
        Ok(next_position)
    }

    /// What the tier uploader needs to know of the chunks from `from` below `to` (at most
    /// `max` of them): their extent, size and age, without their payloads.
    pub fn chunk_marks(&self, from: u64, to: u64, max: usize) -> Result<Vec<ChunkMark>, StorageError> {
        let (_guard, floor) = self.local_reads();
        let from = from.max(floor);
        let mut out = Vec::new();
        let view = self.view();
        for item in chunk_records(&view, from, to)? {
            if out.len() >= max {
                break;
            }
            let (key, value) = item?;
            // Only the keys: the payloads are not copied.
            let chunk = ChunkView::open(&key, &value)?;
            if chunk.end_position() <= from {
                continue;
            }
            out.push(ChunkMark {
                first_position: chunk.first_position.max(from),
                end_position: chunk.end_position(),
                bytes: value.len() as u64,
                created_unix_ms: chunk.created_unix_ms,
            });
        }
        Ok(out)
    }

    /// The locally held chunks covering `[from, to)` exactly (the first and last cut to
    /// fit), stopping early after `max_bytes` of encoded chunks; for the tier uploader.
    pub(crate) fn chunks_in(&self, from: u64, to: u64, max_bytes: usize) -> Result<Vec<EncodedChunk>, StorageError> {
        let (_guard, floor) = self.local_reads();
        if from < floor {
            return Err(StorageError::Corrupt { what: "upload below the local floor", key: from.to_string() });
        }
        let mut out = Vec::new();
        let mut total = 0usize;
        let view = self.view();
        for item in chunk_records(&view, from, to)? {
            let (key, value) = item?;
            let payload = record::open("event chunk", &key, &value)?;
            let view = ChunkView::read(&key, payload)?;
            if view.end_position() <= from {
                continue;
            }
            if !out.is_empty() && total + value.len() > max_bytes {
                break;
            }
            total += value.len();
            // What was scavenged (replicated) goes up as placeholders even where this
            // node has not rewritten its own copy yet: the tier's scavenge pass starts
            // from its mark and would not come back for it.
            let scavenged_before = self.stream_meta(view.stream)?.map_or(0, |meta| meta.scavenged_before);
            if view.first_position >= from && view.end_position() <= to && scavenged_before <= view.first_version {
                // The common case: the stored chunk goes up as it is, payloads not decoded.
                out.push(EncodedChunk::from_stored(&view, payload));
                continue;
            }
            let chunk: EventChunk = record::decode_view("event chunk", &key, payload)?;
            let mut chunk = chunk.cut(from, to);
            chunk.scavenge_below(scavenged_before);
            out.push(EncodedChunk::of(&chunk)?);
        }
        Ok(out)
    }

    /// Marks a Raft snapshot as being written from `floor`: history is not released until
    /// [`EventState::snapshot_done`].
    pub(crate) fn snapshot_started(&self) -> u64 {
        let _guard = self.release_lock.read().expect("release lock is never poisoned");
        self.snapshots_building.fetch_add(1, Ordering::AcqRel);
        self.floor()
    }

    pub(crate) fn snapshot_done(&self) {
        self.snapshots_building.fetch_sub(1, Ordering::AcqRel);
    }

    /// A copy of the id filter (for a Raft snapshot, encoded later).
    pub(crate) fn id_filter_copy(&self) -> IdFilter {
        self.ids.copy()
    }

    /// Every locally held event from `floor` below `cutoff`, in position order (for
    /// snapshot export; the caller keeps releases off, see `snapshot_started`). Payloads
    /// are slices of their chunk's record, as in reads ([`verified_chunk_events`]).
    pub fn events_below(&self, floor: u64, cutoff: u64) -> impl Iterator<Item = Result<StoredEvent, StorageError>> {
        let view = self.view();
        let mut window = ReadAhead::default();
        view.tree
            .range(keys::event(floor)..keys::event(cutoff))
            .map(move |item| {
                let (key, value) = item?;
                let value = view.chunk_bytes_in_order(&key, value, &mut window)?;
                record::open("event chunk", &key, &value)?;
                verified_chunk_events(&key, value)
            })
            .flat_map(move |events| -> Box<dyn Iterator<Item = Result<StoredEvent, StorageError>>> {
                match events {
                    Err(e) => Box::new(std::iter::once(Err(e))),
                    Ok(events) => Box::new(events.into_iter().take_while(move |event| event.position < cutoff).map(Ok)),
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
    view: &'t StateView,
    /// Records below it are released (dead): never read as local.
    floor: u64,
    ids: &'t IdFilter,
    local_ids: &'t LocalIds,
    meta_streams: &'t MetaStreams,
    batch: sled::Batch,
    /// The staged chunks' sealed records (they go to the chunk log, see `StateView::store`).
    chunk_writes: Vec<ChunkWrite>,
    next_position: u64,
    events_in_batch: usize,
    heads: HashMap<String, Option<StreamHead>>,
    dirty_heads: HashSet<String>,
    new_ids: HashMap<[u8; 16], u64>,
    /// Chunks staged in this batch, by first position: their event count and their
    /// index in `chunk_writes`.
    new_chunks: BTreeMap<u64, (u64, usize)>,
    /// Control records staged in this batch (None: removed).
    control: BTreeMap<Vec<u8>, Option<Vec<u8>>>,
    /// The next group id, once read or changed in this batch.
    next_group_id: Option<u64>,
    /// Tiered events of ids this batch asks about (see [`EventState::stage_entries`]).
    cold: Option<&'t ColdEvents>,
    /// Writing a snapshot's events whose stream heads came as records: heads stay as given.
    heads_given: bool,
}

impl<'t> BatchWriter<'t> {
    fn new(view: &'t StateView, floor: u64, next_position: u64, ids: &'t IdFilter, local_ids: &'t LocalIds, meta_streams: &'t MetaStreams) -> Self {
        Self {
            view,
            floor,
            ids,
            local_ids,
            meta_streams,
            batch: sled::Batch::default(),
            chunk_writes: Vec::new(),
            next_position,
            events_in_batch: 0,
            heads: HashMap::new(),
            dirty_heads: HashSet::new(),
            new_ids: HashMap::new(),
            new_chunks: BTreeMap::new(),
            control: BTreeMap::new(),
            next_group_id: None,
            cold: None,
            heads_given: false,
        }
    }

    fn pending_events(&self) -> usize {
        self.events_in_batch
    }

    fn head(&mut self, stream: &str) -> Result<Option<StreamHead>, StorageError> {
        if let Some(head) = self.heads.get(stream) {
            return Ok(head.clone());
        }
        let head = read_head(&self.view.tree, stream)?;
        self.heads.insert(stream.to_string(), head.clone());
        Ok(head)
    }

    /// The stream's metadata as of this batch (staged changes included).
    fn stream_meta(&self, stream: &str) -> Result<Option<StreamMeta>, StorageError> {
        let key = retention::stream_meta_key(stream);
        if !self.control.contains_key(&key) && !self.meta_streams.may_have(stream) {
            return Ok(None);
        }
        control::stream_meta(self, stream)
    }

    /// Whether `event` is still visible to readers at `now_ms` (an entry's own time): an id
    /// of an event no longer visible is free again, whether or not this node has already
    /// scavenged the event (so every node decides alike).
    fn still_visible(&mut self, event: &StoredEvent, now_ms: i64) -> Result<bool, StorageError> {
        let Some(meta) = self.stream_meta(&event.stream)? else { return Ok(true) };
        let last = self.head(&event.stream)?.map(|h| h.last_version);
        Ok(meta.visible(event.version, event.created_unix_ms, last, now_ms))
    }

    fn position_of_id(&self, id: &[u8; 16]) -> Result<Option<u64>, StorageError> {
        if let Some(position) = self.new_ids.get(id) {
            return Ok(Some(*position));
        }
        if let Some(position) = self.local_ids.position(id, self.floor) {
            return Ok(Some(position));
        }
        // Not held locally: only released history can have it.
        if self.floor == 0 || !self.ids.may_contain(id) {
            return Ok(None);
        }
        Ok(self.cold.and_then(|cold| cold.get(id)).map(|event| event.position))
    }

    fn event(&self, position: u64) -> Result<StoredEvent, StorageError> {
        if let Some((&first, &(count, index))) = self.new_chunks.range(..=position).next_back()
            && position < first + count
        {
            let (key, sealed) = &self.chunk_writes[index];
            let chunk: EventChunk = record::open_value("event chunk", key, sealed)?;
            return Ok(chunk.event_at(position));
        }
        if let Some(event) = self.cold.and_then(|cold| cold.values().find(|event| event.position == position)) {
            return Ok(event.clone());
        }
        match read_chunk_containing(self.view, position)? {
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
            let mut position = self.position_of_id(&event.id)?;
            if let Some(at) = position {
                let existing = self.event(at)?;
                if !self.still_visible(&existing, append.created_unix_ms)? {
                    position = None;
                }
            }
            known.push(position);
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
        let meta = self.stream_meta(&append.stream)?;
        if meta.as_ref().is_some_and(|m| m.tombstone) {
            return Ok(Err(AppendFailure::StreamDeleted { stream: append.stream.clone() }));
        }
        // A soft-deleted stream with nothing appended since is no stream to a writer;
        // its versions still continue after the deleted ones.
        let visible_head = if meta.is_some_and(|m| m.deleted_and_empty(head_version)) { None } else { head_version };
        if !append.expected.admits(visible_head) {
            return Ok(Err(AppendFailure::WrongExpectedVersion {
                stream: append.stream.clone(),
                expected: append.expected,
                actual: visible_head,
            }));
        }
        let first_version = head_version.map_or(0, |v| v + 1);
        let first_position = self.next_position;
        let count = append.events.len() as u64;
        self.write_chunk(EventChunkRef {
            stream: &append.stream,
            first_version,
            first_position,
            created_unix_ms: append.created_unix_ms,
            events: &append.events,
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
    fn write_chunk(&mut self, chunk: EventChunkRef<'_>) -> Result<(), StorageError> {
        assert_eq!(chunk.first_position, self.next_position, "positions are assigned in order");
        assert!(!chunk.events.is_empty(), "a chunk holds events");
        let count = chunk.len();
        let last_version = chunk.first_version + count - 1;
        let last_position = chunk.end_position() - 1;
        let new_head = if self.heads_given {
            None
        } else {
            Some(match self.head(chunk.stream)? {
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
            })
        };
        let chunk_key = keys::event(chunk.first_position);
        self.chunk_writes.push((chunk_key, record::seal_value("event chunk", &chunk_key, &chunk)?));
        // The overlay names the staged record; `event` decodes it in the rare case that a
        // later append of the same entry repeats one of these event ids.
        self.new_chunks.insert(chunk.first_position, (count, self.chunk_writes.len() - 1));
        let index_key = keys::stream_index(chunk.stream, chunk.first_version);
        self.batch.insert(index_key.clone(), record::seal(&index_key, &chunk.first_position.to_be_bytes()));
        // The ids go to the local index when the batch is in (no record of their own: see
        // `local_ids`); to the filter only when released.
        for (offset, event) in chunk.events.iter().enumerate() {
            self.new_ids.insert(event.id, chunk.first_position + offset as u64);
        }
        if let Some(new_head) = new_head {
            self.heads.insert(chunk.stream.to_string(), Some(new_head));
            self.dirty_heads.insert(chunk.stream.to_string());
        }
        self.next_position += count;
        self.events_in_batch += count as usize;
        Ok(())
    }

    /// Hands out the staged writes so far (heads and overlays stay for later chunks).
    fn take_batch(&mut self) -> (sled::Batch, Vec<ChunkWrite>) {
        self.events_in_batch = 0;
        self.new_chunks.clear();
        (std::mem::take(&mut self.batch), std::mem::take(&mut self.chunk_writes))
    }

    /// The final batch: staged writes plus the changed heads and the next position.
    #[allow(clippy::type_complexity)]
    fn finish(mut self) -> Result<(sled::Batch, Vec<ChunkWrite>, HashMap<[u8; 16], u64>), StorageError> {
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
        Ok((self.batch, self.chunk_writes, self.new_ids))
    }
}

impl ControlStore for BatchWriter<'_> {
    fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>, StorageError> {
        if let Some(staged) = self.control.get(key) {
            return Ok(staged.clone());
        }
        Ok(self.view.tree.get(key)?.map(|v| v.to_vec()))
    }

    fn scan(&self, prefix: &[u8]) -> Result<Vec<(Vec<u8>, Vec<u8>)>, StorageError> {
        let mut found: BTreeMap<Vec<u8>, Vec<u8>> = BTreeMap::new();
        for item in self.view.tree.scan_prefix(prefix) {
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
        if let Some(stream) = retention::stream_of_meta_key(&key) {
            self.meta_streams.insert(stream);
        }
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
                match self.view.tree.get(&key)? {
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

/// The first position of the chunk holding `position` (the greatest chunk key at or below
/// it), or `position` itself when no chunk starts at or below it.
fn chunk_start(tree: &sled::Tree, position: u64) -> Result<u64, StorageError> {
    match tree.range(keys::event(0)..=keys::event(position)).next_back() {
        Some(item) => decode_chunk_key(&item?.0),
        None => Ok(position),
    }
}

/// The stored chunks (key, sealed record) from the one holding `from` below `to`, in
/// position order (the first may end before `from` when no chunk holds it: callers skip it).
fn chunk_records(view: &StateView, from: u64, to: u64) -> Result<impl Iterator<Item = Result<(sled::IVec, ChunkBytes<'static>), StorageError>> + '_, StorageError> {
    let records = view.tree.range(keys::event(chunk_start(&view.tree, from)?)..keys::event(to));
    Ok(records.map(move |item| {
        let (key, value) = item?;
        let value = view.chunk_bytes(&key, value)?;
        Ok((key, value))
    }))
}

/// The events of the chunk record `value` under `key`, as readers see them, their
/// payloads slices of the record (see [`ChunkView::stored_events`]). The caller has
/// verified the record (`record::open`): checksumming it again would cost a second pass.
fn verified_chunk_events(key: &[u8], value: ChunkBytes<'_>) -> Result<Vec<StoredEvent>, StorageError> {
    let payload = value.into_bytes().slice(record::CHECKSUM_BYTES..);
    let view = ChunkView::read(key, &payload)?;
    Ok(view.stored_events(&payload))
}

/// The events of the chunk stored under `position` (see [`verified_chunk_events`]).
fn read_chunk_events(view: &StateView, position: u64) -> Result<Option<Vec<StoredEvent>>, StorageError> {
    let key = keys::event(position);
    let Some(value) = view.tree.get(key)? else { return Ok(None) };
    let value = view.chunk_bytes(&key, value)?;
    record::open("event chunk", &key, &value)?;
    let events = verified_chunk_events(&key, value)?;
    assert_eq!(events.first().map(|event| event.position), Some(position), "chunk stored under its first position");
    Ok(Some(events))
}

/// The chunk whose first position is `position`.
fn read_chunk(view: &StateView, position: u64) -> Result<Option<EventChunk>, StorageError> {
    let key = keys::event(position);
    match view.tree.get(key)? {
        None => Ok(None),
        Some(value) => {
            let value = view.chunk_bytes(&key, value)?;
            let chunk: EventChunk = record::open_value("event chunk", &key, &value)?;
            assert_eq!(chunk.first_position, position, "chunk stored under its first position");
            Ok(Some(chunk))
        }
    }
}

/// The stream index key of the chunk of `stream` that holds `version` (the index has one
/// entry per chunk, under its first version), or the key of `version` itself if no
/// chunk of the stream starts at or before it.
fn stream_chunk_start(tree: &sled::Tree, stream: &str, version: u64) -> Result<Vec<u8>, StorageError> {
    let from = keys::stream_index(stream, version);
    match tree.range(keys::stream_index_prefix(stream)..=from.clone()).next_back() {
        Some(item) => Ok(item?.0.to_vec()),
        None => Ok(from),
    }
}

/// The chunk holding `position`, if that position was applied.
fn read_chunk_containing(view: &StateView, position: u64) -> Result<Option<EventChunk>, StorageError> {
    let Some(item) = view.tree.range(keys::event(0)..=keys::event(position)).next_back() else { return Ok(None) };
    let (key, value) = item?;
    let value = view.chunk_bytes(&key, value)?;
    let chunk: EventChunk = record::open_value("event chunk", &key, &value)?;
    assert_eq!(chunk.first_position, decode_chunk_key(&key)?, "chunk stored under its first position");
    Ok(chunk.contains_position(position).then_some(chunk))
}

/// Whether a state record belongs to history released below `floor`: a chunk there, or an
/// index entry pointing there (a compaction leaves these behind); or an id index record of
/// an earlier version, dead wherever it points.
fn is_released_record(key: &[u8], value: &[u8], floor: u64) -> Result<bool, StorageError> {
    Ok(match key.first() {
        Some(&keys::EVENT) => decode_chunk_key(key)? < floor,
        Some(&keys::STREAM_INDEX) => decode_position("stream index entry", key, value)? < floor,
        // The id index records of earlier versions: the index is in memory now (`local_ids`).
        Some(&keys::EVENT_ID) => true,
        _ => false,
    })
}

/// A chunk key as the fixed-size array chunk writes carry.
fn chunk_key_array(key: &[u8]) -> Result<[u8; 9], StorageError> {
    key.try_into().map_err(|_| StorageError::Corrupt { what: "event chunk key", key: record::printable_key(key) })
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

/// The stored id filter (`covers`, encoding): in its file ([`filter_store`]), or, left
/// by an earlier version, as one value among the state's metadata.
fn load_stored_filter(data_dir: &Path, db: &sled::Db, tree: &sled::Tree) -> Result<Option<(u64, Vec<u8>)>, StorageError> {
    if let Some(stored) = filter_store::load(data_dir, db)? {
        return Ok(Some(stored));
    }
    let key = keys::meta(META_ID_FILTER);
    let Some(value) = tree.get(&key)? else { return Ok(None) };
    let corrupt = || StorageError::Corrupt { what: "stored id filter", key: record::printable_key(&key) };
    let payload = record::open("stored id filter", &key, &value)?;
    let (covers, encoded) = payload.split_at_checked(8).ok_or_else(corrupt)?;
    Ok(Some((u64::from_be_bytes(covers.try_into().map_err(|_| corrupt())?), encoded.to_vec())))
}

fn read_u64_meta(tree: &sled::Tree, name: &str) -> Result<Option<u64>, StorageError> {
    let key = keys::meta(name);
    match tree.get(&key)? {
        None => Ok(None),
        Some(value) => Ok(Some(decode_position("state metadata", &key, &value)?)),
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::command::ExpectedVersion;
    use std::time::Duration;

    /// A fresh applied state in a temporary directory (shared by the storage tests).
    pub(crate) fn state() -> (tempfile::TempDir, EventState) {
        let dir = tempfile::tempdir().unwrap();
        let db = crate::open_database(dir.path()).unwrap();
        let state = EventState::open(&db, dir.path()).unwrap();
        (dir, state)
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
        state.apply(Some(&Command::appends(appends)), b"meta").unwrap()
    }

    /// Counts every event as released, so that only the file's size decides whether a
    /// compaction is due.
    fn as_if_all_released(state: &EventState) {
        state.released_since_compaction.store(u64::MAX / 2, Ordering::Release);
    }

    /// Runs compaction steps until idle or switched; whether it switched.
    fn compact(state: &EventState, min_bytes: u64, grace: Duration) -> bool {
        loop {
            match state.compact_step_over(min_bytes, grace).unwrap() {
                CompactStep::Idle => return false,
                CompactStep::Switched => return true,
                CompactStep::Copying => {}
            }
        }
    }

    /// What a reader sees of `state`: `$all`, stream "a" and the next position.
    fn observed(state: &EventState) -> (Vec<StoredEvent>, Vec<StoredEvent>, u64) {
        let all = state.read_all(&ReadAllOptions { from_position: 0, backwards: false, limit: 1000, scan_limit: 1000, stream_filter: &|_| true, filter: &|_| true }).unwrap().0;
        (all, state.read_stream("a", 0, false, 100).unwrap(), state.next_position())
    }

    #[test]
    fn compaction_moves_the_live_state_into_a_fresh_generation_and_survives_a_restart() {
        let (dir, state) = state();
        apply(&state, vec![append("a", ExpectedVersion::NoStream, &[1, 2]), append("b", ExpectedVersion::Any, &[3])]);
        apply(&state, vec![append("a", ExpectedVersion::Exact(1), &[4])]);
        let before = observed(&state);
        assert!(dir.path().join("state-0").is_dir(), "a fresh data dir starts with generation 0");
        assert!(!compact(&state, 0, Duration::ZERO), "not due while nothing was released");
        as_if_all_released(&state);
        assert!(!compact(&state, u64::MAX, Duration::ZERO), "not due below the threshold");
        assert!(compact(&state, 0, Duration::from_secs(3600)));
        assert_eq!(observed(&state), before);
        assert!(dir.path().join("state-1").is_dir());
        assert!(dir.path().join("state-0").is_dir(), "the replaced generation waits out its grace");
        // Applies go on in the new generation, and retries are still recognised.
        let retried = apply(&state, vec![append("a", ExpectedVersion::Any, &[1, 2])]);
        assert_eq!(retried[0].as_ref().unwrap().first_position, 0, "the retry returns the original positions");
        apply(&state, vec![append("a", ExpectedVersion::Exact(2), &[5])]);
        let after = observed(&state);
        assert_eq!(after.2, 5);
        as_if_all_released(&state);
        assert!(!compact(&state, 0, Duration::ZERO), "not due until the file outgrows the live state");
        state.compacted_bytes.store(0, Ordering::Release);
        assert!(compact(&state, 0, Duration::ZERO));
        assert!(!dir.path().join("state-0").exists(), "removed once past its grace");
        state.sync().unwrap();
        drop(state);
        let reopened = EventState::open(&crate::reopen_database(dir.path()), dir.path()).unwrap();
        assert_eq!(observed(&reopened), after);
        assert!(dir.path().join("state-2").is_dir());
        assert!(!dir.path().join("state-1").exists(), "opening removes generations that are not live");
    }

    #[test]
    fn large_writes_go_to_the_chunk_log_small_ones_stay_in_sled_and_damage_is_reported() {
        let (dir, state) = state();
        apply(&state, vec![large("a", ExpectedVersion::NoStream, &[1, 2])]);
        apply(&state, vec![append("a", ExpectedVersion::Exact(1), &[3])]);
        let before = observed(&state);
        let stored = |position: u64| {
            let (key, value) = state.tree().range(keys::event(position)..=keys::event(position)).next().unwrap().unwrap();
            crate::chunk_log::ChunkPointer::decode(record::open("event chunk", &key, &value).unwrap())
        };
        let pointer = stored(0).expect("sled holds a pointer to the large write's chunk");
        assert_eq!(stored(2), None, "the small write's chunk is in sled itself");
        state.sync().unwrap();
        drop(state);
        let reopened = EventState::open(&crate::reopen_database(dir.path()), dir.path()).unwrap();
        assert_eq!(observed(&reopened), before);
        let retried = apply(&reopened, vec![append("a", ExpectedVersion::Any, &[1])]);
        assert!(retried[0].as_ref().is_err(), "the id is found in the logged chunk (and its content differs)");

        // One flipped bit in the logged chunk's bytes: reads of it fail as corrupt, as does
        // the next open (it reads every local chunk); nothing is served wrong.
        let segment = dir.path().join("state-0").join("chunks").join(format!("{:020}.chunks", pointer.segment));
        let mut bytes = std::fs::read(&segment).unwrap();
        bytes[(pointer.offset + pointer.len as u64 - 1) as usize] ^= 1;
        std::fs::write(&segment, bytes).unwrap();
        assert!(matches!(reopened.event_at(0), Err(StorageError::Corrupt { .. })));
        assert_eq!(reopened.event_at(2).unwrap().unwrap().version, 2, "the chunk in sled is intact");
        reopened.sync().unwrap();
        drop(reopened);
        assert!(matches!(EventState::open(&crate::reopen_database(dir.path()), dir.path()), Err(StorageError::Corrupt { .. })));
    }

    #[test]
    fn a_damaged_chunk_pointer_is_corrupt_whether_or_not_it_still_looks_like_a_pointer() {
        for byte in [4, 30] {
            // Byte 4 is in the pointer's mark (it then reads as an inline chunk); 30 is in
            // its offset.
            let (_dir, state) = state();
            apply(&state, vec![large("a", ExpectedVersion::NoStream, &[1])]);
            let key = keys::event(0);
            let mut value = state.tree().get(key).unwrap().unwrap().to_vec();
            value[byte] ^= 1;
            state.tree().insert(key, value).unwrap();
            assert!(matches!(state.event_at(0), Err(StorageError::Corrupt { .. })), "byte {byte}");
        }
    }

    #[test]
    fn writes_made_while_a_compaction_copies_are_in_the_fresh_generation() {
        let (dir, state) = state();
        apply(&state, vec![append("a", ExpectedVersion::NoStream, &[1, 2])]);
        as_if_all_released(&state);
        assert_eq!(state.compact_step_over(0, Duration::ZERO).unwrap(), CompactStep::Copying, "started, nothing copied yet");
        apply(&state, vec![append("a", ExpectedVersion::Exact(1), &[3])]);
        assert_eq!(state.compact_step_over(0, Duration::ZERO).unwrap(), CompactStep::Copying, "all copied");
        apply(&state, vec![append("b", ExpectedVersion::NoStream, &[4])]);
        assert_eq!(state.compact_step_over(0, Duration::ZERO).unwrap(), CompactStep::Switched);
        let seen = observed(&state);
        assert_eq!(seen.2, 4);
        assert_eq!(seen.0.iter().map(|e| e.id[0]).collect::<Vec<_>>(), vec![1, 2, 3, 4]);
        assert_eq!(state.stream_head("b").unwrap().unwrap().last_version, 0);
        let retried = apply(&state, vec![append("a", ExpectedVersion::Any, &[3])]);
        assert_eq!(retried[0].as_ref().unwrap().first_position, 2, "the id written during the copy is known");
        state.sync().unwrap();
        drop(state);
        let reopened = EventState::open(&crate::reopen_database(dir.path()), dir.path()).unwrap();
        assert_eq!(observed(&reopened), seen);
    }

    #[test]
    fn a_state_kept_in_the_main_database_by_an_earlier_version_moves_out_at_its_first_compaction() {
        let dir = tempfile::tempdir().unwrap();
        let db = crate::open_database(dir.path()).unwrap();
        db.insert(crate::state_home::ACTIVE_STATE_TREE, &b"state-0"[..]).unwrap();
        let state = EventState::open(&db, dir.path()).unwrap();
        assert!(!dir.path().join("state-0").exists(), "the legacy tree is used where it is");
        apply(&state, vec![append("a", ExpectedVersion::NoStream, &[1, 2])]);
        let before = observed(&state);
        as_if_all_released(&state);
        assert!(compact(&state, 0, Duration::ZERO));
        assert_eq!(observed(&state), before);
        assert!(dir.path().join("state-0").is_dir());
        assert!(!db.tree_names().iter().any(|n| &**n == b"state-0"), "the legacy tree is dropped");
        assert!(db.get(crate::state_home::ACTIVE_STATE_TREE).unwrap().is_none());
        state.sync().unwrap();
        drop(state);
        drop(db);
        let reopened = EventState::open(&crate::reopen_database(dir.path()), dir.path()).unwrap();
        assert_eq!(observed(&reopened), before);
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
        // Several chunks staged before the retry: the overlay finds the one that holds it.
        let out = apply(
            &state,
            vec![
                append("d", ExpectedVersion::Any, &[20, 21]),
                append("e", ExpectedVersion::Any, &[22]),
                append("d", ExpectedVersion::Any, &[20, 21]),
                append("f", ExpectedVersion::Any, &[22]),
            ],
        );
        let (written, replayed) = (out[0].clone().unwrap(), out[2].clone().unwrap());
        assert!(replayed.idempotent_replay);
        assert_eq!((replayed.first_position, replayed.last_position), (written.first_position, written.last_position));
        assert!(matches!(out[3], Err(AppendFailure::IdempotencyConflict { .. })), "id 22 went to stream e: {:?}", out[3]);
    }

    #[test]
    fn idempotency_survives_a_restart_from_the_chunks_alone() {
        let (dir, state) = state();
        let first = apply(&state, vec![append("a", ExpectedVersion::NoStream, &[1, 2]), append("b", ExpectedVersion::Any, &[3])]);
        drop(state);
        let reopened = EventState::open(&crate::reopen_database(dir.path()), dir.path()).unwrap();
        assert_eq!(reopened.local_id_count(), 3);
        let replay = apply(&reopened, vec![append("a", ExpectedVersion::NoStream, &[1, 2])]);
        let (first, replay) = (first[0].clone().unwrap(), replay[0].clone().unwrap());
        assert!(replay.idempotent_replay);
        assert_eq!(replay.first_position, first.first_position);
        let moved = apply(&reopened, vec![append("c", ExpectedVersion::Any, &[3])]);
        assert!(matches!(moved[0], Err(AppendFailure::IdempotencyConflict { .. })), "id 3 is known after the restart: {moved:?}");
        assert_eq!(reopened.next_position(), 3, "nothing written");
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
        let only_even = |e: &EventRef<'_>| e.stream == "even";
        let (page, next) = state
            .read_all(&ReadAllOptions { from_position: 0, backwards: false, limit: 3, scan_limit: 100, stream_filter: &|_| true, filter: &only_even })
            .unwrap();
        assert_eq!(page.iter().map(|e| e.position).collect::<Vec<_>>(), vec![0, 2, 4]);
        assert_eq!(next, Some(5));
        let all = |_: &EventRef<'_>| true;
        let (page, next) = state
            .read_all(&ReadAllOptions { from_position: 9, backwards: true, limit: 100, scan_limit: 100, stream_filter: &|_| true, filter: &all })
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
        let all = |_: &EventRef<'_>| true;
        let positions = |(events, next): (Vec<StoredEvent>, Option<u64>)| (events.into_iter().map(|e| e.position).collect::<Vec<_>>(), next);
        let read = |from, backwards, limit| {
            state.read_all(&ReadAllOptions { from_position: from, backwards, limit, scan_limit: 100, stream_filter: &|_| true, filter: &all }).unwrap()
        };
        assert_eq!(positions(read(5, false, 2)), (vec![5, 6], None));
        assert_eq!(positions(read(1, false, 2)), (vec![1, 2], Some(3)));
        assert_eq!(positions(read(5, true, 3)), (vec![5, 4, 3], Some(2)));
        assert_eq!(state.event_at(6).unwrap().unwrap().version, 5);
        assert!(state.event_at(7).unwrap().is_none());
        let below: Vec<u64> = state.events_below(0, 5).map(|e| e.unwrap().position).collect();
        assert_eq!(below, vec![0, 1, 2, 3, 4]);
        // Replaying the second append of the first entry finds its ids inside a chunk.
        let replay = apply(&state, vec![append("a", ExpectedVersion::Exact(2), &[5, 6, 7])]);
        assert_eq!(replay[0].as_ref().unwrap().first_position, 4);
        assert!(replay[0].as_ref().unwrap().idempotent_replay);
    }

    #[test]
    fn entries_applied_together_see_each_other_and_answer_separately() {
        let (_dir, state) = state();
        let one = Command::appends(vec![append("a", ExpectedVersion::NoStream, &[1])]);
        let two = Command::appends(vec![append("a", ExpectedVersion::Exact(0), &[2]), append("a", ExpectedVersion::NoStream, &[3])]);
        let out = state.apply_entries(&[Some(&one), None, Some(&two)], b"last", &Default::default()).unwrap();
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
        let one = Command::appends(vec![append("a", ExpectedVersion::NoStream, &[1, 2])]);
        let (outcomes, staged) = state.stage_entries(&[Some(&one)], b"staged", &Default::default()).unwrap();
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
            let db = crate::reopen_database(dir.path());
            let target = EventState::open(&db, dir.path()).unwrap();
            apply(&target, vec![append("stale", ExpectedVersion::Any, &[42])]);
            let heads = source.control_records().map(|r| r.map(|(key, value)| SnapshotItem::Control { key, value }));
            let events = source.events_below(0, 3).map(|e| e.map(SnapshotItem::Event));
            target.replace_all(0, heads.chain(events), b"snap").unwrap();
            assert!(target.stream_head("stale").unwrap().is_none());
        }
        let db = crate::reopen_database(dir.path());
        let target = EventState::open(&db, dir.path()).unwrap();
        assert_eq!(target.next_position(), 3);
        assert_eq!(target.stream_head("a").unwrap().unwrap().last_version, 1);
        assert_eq!(target.applied_meta().unwrap().unwrap(), b"snap");
        let replay = apply(&target, vec![append("a", ExpectedVersion::NoStream, &[1, 2])]);
        assert!(replay[0].as_ref().unwrap().idempotent_replay);
    }

    /// An append whose events are large enough for its write to go to the chunk log.
    fn large(stream: &str, expected: ExpectedVersion, ids: &[u8]) -> AppendCommand {
        let mut command = append(stream, expected, ids);
        for event in &mut command.events {
            event.data = vec![event.id[0]; crate::state_home::CHUNK_LOG_MIN_BATCH_BYTES];
        }
        command
    }

    /// Bytes in the chunk log of generation `generation` under `dir`.
    fn logged_bytes(dir: &Path, generation: &str) -> u64 {
        std::fs::read_dir(dir.join(generation).join("chunks")).unwrap().map(|entry| entry.unwrap().metadata().unwrap().len()).sum()
    }

    #[test]
    fn logged_chunks_are_copied_by_compactions_and_written_by_snapshot_installs() {
        let (dir, state) = state();
        apply(&state, vec![large("a", ExpectedVersion::NoStream, &[1, 2]), large("b", ExpectedVersion::Any, &[3])]);
        apply(&state, vec![large("a", ExpectedVersion::Exact(1), &[4])]);
        let before = observed(&state);
        let events_bytes = 4 * crate::state_home::CHUNK_LOG_MIN_BATCH_BYTES as u64;
        assert!(logged_bytes(dir.path(), "state-0") >= events_bytes);
        assert!(state.state_bytes() >= events_bytes, "the state's size counts its chunk log");

        as_if_all_released(&state);
        assert!(compact(&state, 0, Duration::ZERO));
        assert!(!compact(&state, u64::MAX, Duration::ZERO), "an idle step removes what is past its grace");
        assert!(!dir.path().join("state-0").exists(), "the replaced generation went, its chunk log with it");
        assert!(logged_bytes(dir.path(), "state-1") >= events_bytes, "the live chunks were copied into the fresh log");
        assert_eq!(observed(&state), before);
        state.sync().unwrap();
        drop(state);
        let reopened = EventState::open(&crate::reopen_database(dir.path()), dir.path()).unwrap();
        assert_eq!(observed(&reopened), before);

        // A snapshot install writes the chunks into the fresh generation's log.
        let (target_dir, target) = self::state();
        let heads = reopened.control_records().map(|r| r.map(|(key, value)| SnapshotItem::Control { key, value }));
        let events = reopened.events_below(0, 4).map(|e| e.map(SnapshotItem::Event));
        target.replace_all(0, heads.chain(events), b"snap").unwrap();
        assert_eq!(observed(&target), before);
        assert!(logged_bytes(target_dir.path(), "state-1") >= events_bytes);
        let replay = apply(&target, vec![large("a", ExpectedVersion::Any, &[4])]);
        assert!(replay[0].as_ref().unwrap().idempotent_replay, "ids are found in the installed chunks");
    }

    /// Appends and a tier watermark at `watermark`, as the leader would commit them.
    fn tiered_state(watermark: u64) -> (tempfile::TempDir, EventState) {
        let (dir, state) = state();
        apply(&state, vec![append("a", ExpectedVersion::Any, &[1, 2]), append("b", ExpectedVersion::Any, &[3])]);
        apply(&state, vec![append("a", ExpectedVersion::Any, &[4]), append("c", ExpectedVersion::Any, &[5, 6])]);
        let advance = control::ControlCommand::AdvanceTier { from: 0, to: watermark, segments: 1, bytes: 10, updated_unix_ms: 1 };
        state.apply_control(advance, b"meta").unwrap().unwrap();
        (dir, state)
    }

    #[test]
    fn release_drops_whole_chunks_below_the_watermark_and_keeps_heads() {
        let (dir, state) = tiered_state(3);
        assert_eq!(state.tier_state().unwrap().watermark, 3);
        assert_eq!(state.release_below(3).unwrap(), 3, "chunks [0,2) and [2,3) are below 3");
        assert_eq!(state.floor(), 3);
        assert!(state.event_at(1).unwrap().is_none(), "released history is not local any more");
        assert_eq!(state.event_at(3).unwrap().unwrap().stream, "a");
        let (a, floor) = state.read_stream_local("a", 0, false, 10).unwrap();
        assert_eq!((a.iter().map(|e| e.version).collect::<Vec<_>>(), floor), (vec![2], 3));
        assert_eq!(state.stream_head("b").unwrap().unwrap().last_version, 0, "heads outlive their events");
        let options = ReadAllOptions { from_position: 0, backwards: false, limit: 10, scan_limit: 10, stream_filter: &|_| true, filter: &|_| true };
        let (events, _) = state.read_all(&options).unwrap();
        assert_eq!(events.first().unwrap().position, 3, "a local read from below the floor starts at the floor");
        let mut sink = Vec::new();
        assert_eq!(state.read_all_local_into(&options, &mut sink).unwrap(), (Some(0), 3), "the tier's part is not read locally");
        assert!(sink.is_empty());
        // A released id still needs a tier lookup; a fresh one does not.
        let released = Command::appends(vec![append("a", ExpectedVersion::Any, &[1])]);
        let fresh = Command::appends(vec![append("a", ExpectedVersion::Any, &[99])]);
        assert_eq!(state.ids_to_resolve(&[Some(&released)]).unwrap(), vec![[1u8; 16]]);
        assert!(state.ids_to_resolve(&[Some(&fresh)]).unwrap().is_empty());
        assert!(state.id_filter_gap().is_none());
        assert!(!state.store_id_filter_if_due(false).unwrap(), "not due after 3 released events");
        drop(state);
        // Restarted before the filter was stored: the released range is a gap, and until it
        // is filled every id not held locally goes to the tier.
        let db = crate::reopen_database(dir.path());
        let reopened = EventState::open(&db, dir.path()).unwrap();
        assert_eq!((reopened.floor(), reopened.id_filter_gap()), (3, Some(0..3)));
        assert_eq!(reopened.ids_to_resolve(&[Some(&fresh)]).unwrap(), vec![[99u8; 16]]);
        reopened.fill_id_filter([[1u8; 16], [2u8; 16], [3u8; 16]], 3);
        assert!(reopened.id_filter_gap().is_none());
        assert_eq!(reopened.ids_to_resolve(&[Some(&released)]).unwrap(), vec![[1u8; 16]]);
        assert!(reopened.ids_to_resolve(&[Some(&fresh)]).unwrap().is_empty());
        // Stored, the filter makes the next restart gap-free.
        assert!(reopened.store_id_filter_if_due(true).unwrap());
        drop(reopened);
        drop(db);
        let again = EventState::open(&crate::reopen_database(dir.path()), dir.path()).unwrap();
        assert!(again.id_filter_gap().is_none());
        assert_eq!(again.ids_to_resolve(&[Some(&released)]).unwrap(), vec![[1u8; 16]]);
        assert!(again.ids_to_resolve(&[Some(&fresh)]).unwrap().is_empty());
    }

    #[test]
    fn idempotency_of_released_events_is_decided_from_the_tier() {
        let (_dir, state) = tiered_state(3);
        let original = state.event_at(0).unwrap().unwrap();
        let second = state.event_at(1).unwrap().unwrap();
        state.release_below(3).unwrap();
        let retry = Command::appends(vec![append("a", ExpectedVersion::NoStream, &[1, 2])]);
        let cold: ColdEvents = [(original.id, original.clone()), (second.id, second.clone())].into_iter().collect();
        let out = state.apply_entries(&[Some(&retry)], b"m", &cold).unwrap();
        let success = out[0].appends[0].as_ref().unwrap();
        assert!(success.idempotent_replay);
        assert_eq!((success.first_position, success.last_version), (0, 1));
        let moved = Command::appends(vec![append("z", ExpectedVersion::Any, &[1])]);
        let out = state.apply_entries(&[Some(&moved)], b"m", &cold).unwrap();
        assert!(matches!(out[0].appends[0], Err(AppendFailure::IdempotencyConflict { .. })));
        assert_eq!(state.next_position(), 6, "nothing was written");
    }

    #[test]
    fn the_watermark_moves_only_from_where_it_is_and_not_past_the_applied_end() {
        let (_dir, state) = tiered_state(3);
        let stale = control::ControlCommand::AdvanceTier { from: 0, to: 5, segments: 1, bytes: 1, updated_unix_ms: 2 };
        assert!(matches!(state.apply_control(stale, b"m").unwrap(), Err(control::ControlFailure::TierWatermarkMoved { actual: 3, .. })));
        let beyond = control::ControlCommand::AdvanceTier { from: 3, to: 7, segments: 1, bytes: 1, updated_unix_ms: 2 };
        assert!(matches!(state.apply_control(beyond, b"m").unwrap(), Err(control::ControlFailure::TierBeyondApplied { .. })));
        let next = control::ControlCommand::AdvanceTier { from: 3, to: 6, segments: 2, bytes: 5, updated_unix_ms: 2 };
        let control::ControlSuccess::Tier(tier) = state.apply_control(next, b"m").unwrap().unwrap() else { panic!() };
        assert_eq!((tier.watermark, tier.segments, tier.bytes), (6, 3, 15));
    }

    #[test]
    fn a_snapshot_of_a_released_state_carries_only_the_hot_part() {
        let (dir, state) = tiered_state(3);
        state.release_below(3).unwrap();
        let file = dir.path().join("snap");
        let summary = state.export_snapshot(&file, 6).unwrap();
        assert_eq!((summary.floor_position, summary.events), (3, 3));
        let (_target_dir, target) = self::state();
        target.install_snapshot(&file, b"installed").unwrap();
        assert_eq!((target.floor(), target.next_position()), (3, 6));
        assert_eq!(target.tier_state().unwrap().watermark, 3);
        assert_eq!(target.stream_head("b").unwrap().unwrap().last_version, 0);
        assert_eq!(target.stream_head("a").unwrap().unwrap().event_count, 3);
        let retry = Command::appends(vec![append("b", ExpectedVersion::Any, &[3])]);
        assert_eq!(target.ids_to_resolve(&[Some(&retry)]).unwrap(), vec![[3u8; 16]], "the filter came along");
        let out = apply(&target, vec![append("c", ExpectedVersion::Exact(1), &[7])]);
        assert_eq!(out[0].as_ref().unwrap().first_position, 6);
    }


    #[test]
    fn released_records_stay_dead_until_a_compaction_leaves_them_behind() {
        let (dir, state) = tiered_state(4);
        let count = |state: &EventState, prefix: u8| state.tree().scan_prefix([prefix]).count();
        // An id index record as an earlier version wrote them (the index is in memory now).
        let legacy = keys::event_id(&[9; 16]);
        state.tree().insert(legacy, record::seal(&legacy, &5u64.to_be_bytes())).unwrap();
        let before = (count(&state, keys::EVENT), count(&state, keys::STREAM_INDEX), count(&state, keys::EVENT_ID));
        assert_eq!(before, (4, 4, 1), "chunks [0,2) [2,3) [3,4) [4,6); one index entry per chunk; ids only in the chunks");
        assert_eq!(state.local_id_count(), 6);
        assert_eq!(state.release_below(4).unwrap(), 4);
        assert_eq!(state.release_below(4).unwrap(), 0, "nothing more below the watermark");
        let event_count = count(&state, keys::EVENT);
        assert_eq!(event_count, 4, "releasing writes only the floor");
        assert_eq!(state.local_id_count(), 2, "the released ids left the local index");
        // Dead records read as absent everywhere: reads, backward reads, id lookups.
        assert!(state.event_at(3).unwrap().is_none());
        let (a, _) = state.read_stream_local("a", 0, false, 10).unwrap();
        assert!(a.is_empty(), "stream a's events are all below the floor");
        let (back, _) = state.read_stream_local("c", u64::MAX, true, 10).unwrap();
        assert_eq!(back.iter().map(|e| e.version).collect::<Vec<_>>(), vec![1, 0]);
        let options = ReadAllOptions { from_position: 5, backwards: true, limit: 10, scan_limit: 10, stream_filter: &|_| true, filter: &|_| true };
        let mut events = Vec::new();
        let (next, floor) = state.read_all_local_into(&options, &mut events).unwrap();
        assert_eq!((events.iter().map(|e| e.position).collect::<Vec<_>>(), next, floor), (vec![5, 4], Some(3), 4));
        let retry = Command::appends(vec![append("a", ExpectedVersion::Any, &[4])]);
        assert_eq!(state.ids_to_resolve(&[Some(&retry)]).unwrap(), vec![[4u8; 16]], "a released id is the tier's to answer");
        // A compaction is due only once the dead outnumber the live enough.
        assert_eq!(state.released_since_compaction.load(Ordering::Acquire), 4);
        assert!(!compact(&state, 0, Duration::ZERO), "4 dead events do not make a compaction worth it beside 2 live ones");
        state.released_since_compaction.store(2 * STATE_COMPACT_DEAD_PER_LIVE, Ordering::Release);
        let seen = observed(&state);
        assert!(compact(&state, 0, Duration::ZERO));
        assert_eq!(observed(&state), seen);
        assert_eq!((count(&state, keys::EVENT), count(&state, keys::STREAM_INDEX), count(&state, keys::EVENT_ID)), (1, 1, 0), "only [4,6) is left");
        assert_eq!(state.ids_to_resolve(&[Some(&retry)]).unwrap(), vec![[4u8; 16]]);
        drop(state);
        let reopened = EventState::open(&crate::reopen_database(dir.path()), dir.path()).unwrap();
        assert_eq!((reopened.floor(), reopened.released_since_compaction.load(Ordering::Acquire)), (4, 4), "after a restart, all below the floor may be dead");
        assert_eq!(reopened.local_id_count(), 2, "the local index is rebuilt from the chunks above the floor");
    }

    #[test]
    fn deleting_a_stream_soft_then_hard() {
        use control::{ControlCommand, ControlFailure, ControlSuccess};
        let (_dir, state) = state();
        apply(&state, vec![append("a", ExpectedVersion::Any, &[1, 2])]);
        let delete = |expected, hard| ControlCommand::DeleteStream { stream: "a".into(), expected, hard };
        let wrong = state.apply_control(delete(ExpectedVersion::Exact(0), false), b"m").unwrap();
        assert!(matches!(wrong, Err(ControlFailure::WrongExpectedVersion { actual: Some(1), .. })));
        let Ok(ControlSuccess::Stream(meta)) = state.apply_control(delete(ExpectedVersion::Exact(1), false), b"m").unwrap() else { panic!() };
        assert_eq!((meta.truncate_before, meta.tombstone), (2, false));
        assert!(matches!(state.apply_control(delete(ExpectedVersion::Any, false), b"m").unwrap(), Err(ControlFailure::StreamNotFound { .. })));
        // Soft-deleted: "no stream" to writers, and the versions continue.
        let out = apply(&state, vec![append("a", ExpectedVersion::NoStream, &[3])]);
        assert_eq!(out[0].as_ref().unwrap().first_version, 2);
        // The ids of deleted events are free again: re-sending them writes anew.
        let out = apply(&state, vec![append("a", ExpectedVersion::Any, &[1])]);
        let again = out[0].as_ref().unwrap();
        assert!(!again.idempotent_replay);
        assert_eq!(again.first_version, 3);
        // Hard: a tombstone; nothing more is written, metadata included.
        state.apply_control(delete(ExpectedVersion::Any, true), b"m").unwrap().unwrap();
        let out = apply(&state, vec![append("a", ExpectedVersion::Any, &[9])]);
        assert!(matches!(&out[0], Err(AppendFailure::StreamDeleted { .. })));
        let set = ControlCommand::SetStreamMetadata { stream: "a".into(), max_age_ms: None, max_count: Some(1) };
        assert!(matches!(state.apply_control(set, b"m").unwrap(), Err(ControlFailure::StreamDeleted { .. })));
        assert!(state.stream_meta("a").unwrap().unwrap().tombstone);
        assert!(state.stream_meta("b").unwrap().is_none());
    }

    #[test]
    fn ids_beyond_max_count_are_free_again_and_metadata_survives_reopen() {
        use control::ControlCommand;
        let (dir, state) = state();
        let set = ControlCommand::SetStreamMetadata { stream: "a".into(), max_age_ms: None, max_count: Some(2) };
        state.apply_control(set, b"m").unwrap().unwrap();
        apply(&state, vec![append("a", ExpectedVersion::Any, &[1]), append("a", ExpectedVersion::Any, &[2]), append("a", ExpectedVersion::Any, &[3])]);
        // Version 0 (id 1) is beyond the newest two: its id is free; id 3 is a replay.
        let out = apply(&state, vec![append("a", ExpectedVersion::Any, &[3])]);
        assert!(out[0].as_ref().unwrap().idempotent_replay);
        let out = apply(&state, vec![append("a", ExpectedVersion::Any, &[1])]);
        assert!(!out[0].as_ref().unwrap().idempotent_replay);
        drop(state);
        let reopened = EventState::open(&crate::reopen_database(dir.path()), dir.path()).unwrap();
        assert_eq!(reopened.stream_meta("a").unwrap().unwrap().max_count, Some(2));
    }


    #[test]
    fn a_scavenge_hides_for_good_and_drops_payloads_only_below_its_version() {
        use control::{ControlCommand, ControlFailure};
        let (_dir, state) = state();
        let scavenge = |before| ControlCommand::Scavenge { stream: "a".into(), before };
        assert!(matches!(state.apply_control(scavenge(1), b"m").unwrap(), Err(ControlFailure::StreamNotFound { .. })), "only streams with metadata");
        let set = |count| ControlCommand::SetStreamMetadata { stream: "a".into(), max_age_ms: None, max_count: Some(count) };
        state.apply_control(set(2), b"m").unwrap().unwrap();
        apply(&state, vec![append("a", ExpectedVersion::Any, &[1, 2]), append("a", ExpectedVersion::Any, &[3]), append("b", ExpectedVersion::Any, &[9])]);
        apply(&state, vec![append("a", ExpectedVersion::Any, &[4, 5])]);
        // Nothing rewritten before the replicated scavenge.
        assert_eq!(state.scavenge_local("a", 0, 100).unwrap(), (0, 0));
        state.apply_control(scavenge(99), b"m").unwrap().unwrap();
        assert_eq!(state.stream_meta("a").unwrap().unwrap().scavenged_before, 5, "never beyond the head");
        state.apply_control(scavenge(3), b"m").unwrap().unwrap();
        assert_eq!(state.stream_meta("a").unwrap().unwrap().scavenged_before, 5, "never moves back");
        assert_eq!(state.scavenge_local("a", 0, 2).unwrap(), (2, 2), "bounded: continues from version 2");
        assert_eq!(state.scavenge_local("a", 2, 100).unwrap(), (3, 5));
        assert_eq!(state.scavenge_local("a", 5, 100).unwrap(), (0, 5));
        let local = state.read_stream("a", 0, false, 10).unwrap();
        assert_eq!(local.len(), 5);
        assert!(local.iter().all(|e| e.is_scavenged() && e.data.len() == 32), "payloads dropped, ids kept");
        assert!(state.read_stream("b", 0, false, 10).unwrap().iter().all(|e| !e.is_scavenged()), "other streams untouched");
        // Relaxed retention shows nothing scavenged again; the versions go on.
        state.apply_control(set(100), b"m").unwrap().unwrap();
        let meta = state.stream_meta("a").unwrap().unwrap();
        assert!(!meta.visible(4, 5, Some(4), 5));
        let out = apply(&state, vec![append("a", ExpectedVersion::Exact(4), &[6])]);
        assert_eq!(out[0].as_ref().unwrap().first_version, 5);
    }

    #[test]
    fn idempotency_decides_the_same_on_a_scavenged_copy() {
        use control::ControlCommand;
        let decide = |rewrite: bool| {
            let (_dir, state) = state();
            state.apply_control(ControlCommand::SetStreamMetadata { stream: "a".into(), max_age_ms: None, max_count: Some(1) }, b"m").unwrap().unwrap();
            apply(&state, vec![append("a", ExpectedVersion::Any, &[1]), append("a", ExpectedVersion::Any, &[2])]);
            // A Raft snapshot taken before the scavenge entry, then a rewrite: the
            // placeholder is all that is left while the metadata still shows version 0.
            state.apply_control(ControlCommand::SetStreamMetadata { stream: "a".into(), max_age_ms: None, max_count: None }, b"m").unwrap().unwrap();
            if rewrite {
                let view = state.view();
                let tree = &view.tree;
                let (key, value) = tree.range(keys::event(0)..=keys::event(0)).next().unwrap().unwrap();
                let value = view.chunk_bytes(&key, value).unwrap();
                let mut chunk: EventChunk = record::open_value("event chunk", &key, &value).unwrap();
                chunk.events[0] = chunk.events[0].scavenged();
                tree.insert(&key, record::seal_value("event chunk", &key, &chunk).unwrap()).unwrap();
            }
            let same = apply(&state, vec![append("a", ExpectedVersion::Any, &[1])]);
            let mut changed = append("a", ExpectedVersion::Any, &[1]);
            changed.events[0].data = b"other".to_vec();
            let other = apply(&state, vec![changed]);
            (same, other)
        };
        assert_eq!(decide(true), decide(false));
        assert!(decide(true).0[0].as_ref().unwrap().idempotent_replay);
    }
}
