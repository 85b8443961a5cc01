//! Strata's local store: bytes on disk (a write-ahead log for the Raft log, sled for the rest).
//!
//! Two parts live in the node's data dir:
//! - [`RaftLogStore`]: the Raft log, in an append-only segmented write-ahead log (`wal`),
//!   and the small Raft metadata (vote, committed, purged, current snapshot) in sled, all
//!   as opaque checksummed bytes. It knows nothing of openraft; `strata-raft` adapts it.
//!   Its flusher's fdatasync is the durability point of every append.
//! - [`EventState`]: the applied state, in a sled database of its own under
//!   `data_dir/state-<generation>` (events in one chunk per append, written once to the
//!   generation's append-only `chunk_log` and pointed at from sled under the chunk's first
//!   position; the stream index `(stream, first version) → position`; stream
//!   heads; the event-id index of the local history is in memory, rebuilt from the chunks
//!   at open (`local_ids`); compacted into a fresh generation when releases have grown
//!   it, see `state_home`) and the
//!   deterministic apply of append commands, which decides optimistic concurrency and
//!   idempotency. Every node applies the same commands in the same order and gets the
//!   same state. Beside the events, the control state (`control`): aggregate snapshots and
//!   persistent subscription groups, changed by control commands in the same log.
//!
//! Every stored value is a [`record`]: a CRC32C over key and payload, verified on every
//! read; a mismatch is [`StorageError::Corrupt`], never a silently wrong answer.

pub mod access;
mod chunk;
mod chunk_log;
mod command;
mod control;
mod error;
mod filter_store;
mod id_filter;
mod keys;
mod local_ids;
mod log_store;
mod reads;
mod record;
pub mod retention;
mod snapshot;
mod state;
mod state_home;
pub mod tier;
mod wal;

pub use command::{
    AppendCommand, AppendFailure, AppendOutcome, AppendSuccess, Command, EntryOutcome, EventRef, ExpectedVersion, NewEvent,
    PageSink, StoredEvent,
};
pub use control::{
    AggregateSnapshot, ControlCommand, ControlFailure, ControlOutcome, ControlSuccess, GroupRecord, GroupStart, TierState, GROUPS_MAX,
    SNAPSHOTS_PER_STREAM_MAX,
};
pub use error::StorageError;
pub use log_store::{LogFlushWaiter, RaftLogStore, LOG_FLUSH_QUEUE_MAX};
pub use retention::StreamMeta;
pub use reads::{AllFilter, EventReader, ReadError, SharedFilter, SharedStreamFilter};
pub use snapshot::{verify_snapshot, SnapshotInProgress, SnapshotItem, SnapshotSummary, SNAPSHOT_FORMAT_VERSION};
pub use state_home::{RETIRED_STATE_GRACE, STATE_COMPACT_DEAD_PER_LIVE, STATE_COMPACT_EVENTS_MAX, STATE_COMPACT_GROWTH, STATE_COMPACT_MIN_BYTES, STATE_SLED_CACHE_BYTES};
pub use state::{CompactStep, COMPACT_STEP_RECORDS, ChunkMark, ColdEvents, EventState, ReadAllOptions, StagedApply, StreamHead};
pub use id_filter::ID_FILTER_BYTES;
pub use wal::{Salvage, LOSE_UNSYNCED_TAIL_FAILPOINT, WAL_RECORD_BYTES_MAX, ScratchBuffer, WAL_SCRATCH_BYTES_MAX, WAL_SEGMENT_BYTES_MAX};

use std::path::Path;

/// Memory the main sled database may use for its page cache (the applied state's own
/// database has `STATE_SLED_CACHE_BYTES`). Sized for a small node: the hot tier is small.
pub const SLED_CACHE_BYTES: u64 = 64 * 1024 * 1024;

/// The durability point of every sled write we acknowledge.
///
/// sled 0.34's `flush` writes its buffers with `sync_file_range`, which neither flushes
/// the device's write cache nor the file's metadata: not an fsync. So after sled's flush
/// we `fdatasync` its data file ourselves; only then is the write durable.
#[derive(Clone)]
pub struct DurableFlush {
    db: sled::Db,
    data_file: std::sync::Arc<std::fs::File>,
}

impl DurableFlush {
    /// `sled_dir`: the directory the database was opened in.
    pub fn new(db: &sled::Db, sled_dir: &Path) -> Result<Self, StorageError> {
        let data_file = std::fs::File::open(sled_dir.join("db"))?;
        Ok(Self { db: db.clone(), data_file: std::sync::Arc::new(data_file) })
    }

    /// sled's flush, then fdatasync of its data file.
    pub fn flush(&self) -> Result<(), StorageError> {
        self.db.flush()?;
        self.data_file.sync_data()?;
        Ok(())
    }
}

/// Reopens a database a test has just dropped ([`open_database`] waits out the lock
/// sled's background threads may still hold for a moment).
#[cfg(test)]
pub(crate) fn reopen_database(data_dir: &Path) -> sled::Db {
    open_database(data_dir).unwrap_or_else(|e| panic!("reopening the database failed: {e}"))
}

/// Opens (or creates) the node's main sled database under `data_dir/sled` (the Raft
/// metadata and the pointer to the applied state's own database).
pub fn open_database(data_dir: &Path) -> Result<sled::Db, StorageError> {
    std::fs::create_dir_all(data_dir)?;
    open_sled(&data_dir.join("sled"), SLED_CACHE_BYTES)
}

/// How long opening a sled database waits for its file lock: a handle dropped a moment
/// ago (a replaced state generation, a restarted component) may still hold it while
/// sled's background threads finish.
const SLED_LOCK_WAIT: std::time::Duration = std::time::Duration::from_secs(10);

pub(crate) fn open_sled(dir: &Path, cache_bytes: u64) -> Result<sled::Db, StorageError> {
    let deadline = std::time::Instant::now() + SLED_LOCK_WAIT;
    loop {
        let opened = sled::Config::new().path(dir).cache_capacity(cache_bytes).mode(sled::Mode::HighThroughput).open();
        match opened {
            Err(sled::Error::Io(e)) if e.kind() == std::io::ErrorKind::WouldBlock && std::time::Instant::now() < deadline => {
                std::thread::sleep(std::time::Duration::from_millis(20));
            }
            other => return Ok(other?),
        }
    }
}
