//! Where the applied state lives: its own sled database in `data_dir/state-<generation>`,
//! with the generation's event chunks in `chunks/` beside it (`chunk_log`).
//!
//! Why a database of its own, and generations of it: with tiering, the state is a queue
//! (events come in at one end and are released at the other), and sled 0.34 does not give
//! that churn's space back: its file only shrinks when its last segment is free, and
//! under load its cleaner falls behind, so the file grew at the write rate to ~1 GiB per
//! 2 M events while the live state was ~45 MB. A fresh generation, filled with the live
//! state and switched in by one durable pointer, and the removal of the old directory,
//! is what returns the space. Snapshot installs use the same switch.
//!
//! A data dir written before generations existed keeps its state in a tree of the main
//! database (`active_state_tree`); it is read there until the first compaction or
//! install moves it into a generation of its own.

use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use std::sync::Arc;

use crate::chunk_log::{ChunkLog, ChunkPointer, ReadAhead};
use crate::{record, DurableFlush, StorageError};

/// Key in the main database naming the directory (under the data dir) of the live state.
pub(crate) const ACTIVE_STATE_DIR: &[u8] = b"active_state_dir";
/// Key in the main database naming the tree that held the live state before generations.
pub(crate) const ACTIVE_STATE_TREE: &[u8] = b"active_state_tree";
pub(crate) const STATE_TREE_PREFIX: &str = "state-";
const STATE_DIR_PREFIX: &str = "state-";
/// The tree of a generation's database that holds the state.
const STATE_TREE: &[u8] = b"state";
/// The generation's chunk log, inside its directory (removed with it).
const CHUNKS_DIR: &str = "chunks";

/// Page cache of one generation's database (the main database holds only small things).
pub const STATE_SLED_CACHE_BYTES: u64 = 192 * 1024 * 1024;
/// The state's database file may grow to this before a compaction is considered...
pub const STATE_COMPACT_MIN_BYTES: u64 = 256 * 1024 * 1024;
/// ...and to this many times the live state measured at the last compaction.
pub const STATE_COMPACT_GROWTH: u64 = 4;
/// ...and once this many times as many events were released (are dead in the file) as
/// are held: a compaction copies the held events, about as costly as applying them, so
/// copying stays near an eighth of applying. (A compaction per 256 MiB cost appends
/// during uploads more than deleting each released record had.)
pub const STATE_COMPACT_DEAD_PER_LIVE: u64 = 8;
/// Compactions copy the live state with applies held off, so only a state this small (in
/// events held locally) is compacted: with tiering it is the hot window.
pub const STATE_COMPACT_EVENTS_MAX: u64 = 1_000_000;
/// A replaced generation's directory is removed this long after the switch: a reader that
/// took the old tree just before may still read pages of it that sled keeps as files.
pub const RETIRED_STATE_GRACE: Duration = Duration::from_secs(10);

/// One generation of the state: the tree and, unless it is a legacy tree of the main
/// database, the database and directory that hold it.
pub(crate) struct StateHome {
    pub tree: sled::Tree,
    own: Option<OwnDb>,
    /// The generation's event chunks (None: a state kept in the main database by an
    /// earlier version, whose chunks stay in sled until its first compaction).
    chunks: Option<Arc<ChunkLog>>,
}

/// The chunks of one write go to the chunk log from this many bytes on; fewer stay in
/// sled. The chunk log's fdatasync per write is what keeps sled's pointers from reaching
/// the disk before the bytes they name; with few chunks per write (few writers) that extra
/// flush, queued beside the Raft log's own, was the larger cost: one writer's appends fell
/// from 767 to 561 events/s with every write logged. Under load, writes carry hundreds of
/// chunks and sled's rewrites of them are the larger cost (see `chunk_log`).
pub const CHUNK_LOG_MIN_BATCH_BYTES: usize = 64 * 1024;

/// One chunk to store: its key and its sealed record.
pub(crate) type ChunkWrite = ([u8; 9], Vec<u8>);

/// What readers and writers of one generation hold: its tree and its chunk log.
#[derive(Clone)]
pub(crate) struct StateView {
    pub tree: sled::Tree,
    pub chunks: Option<Arc<ChunkLog>>,
}

/// A chunk's sealed record, as sled held it (inline), as read from the chunk log, or in an
/// in-order reader's window on the chunk log.
pub(crate) enum ChunkBytes<'w> {
    Inline(sled::IVec),
    Logged(Vec<u8>),
    InWindow(&'w [u8]),
}

impl ChunkBytes<'_> {
    /// The bytes as an owned buffer (a copy unless read from the chunk log on their own).
    pub fn into_vec(self) -> Vec<u8> {
        match self {
            ChunkBytes::Inline(bytes) => bytes.to_vec(),
            ChunkBytes::Logged(bytes) => bytes,
            ChunkBytes::InWindow(bytes) => bytes.to_vec(),
        }
    }
}

impl ChunkBytes<'_> {
    /// The bytes as a shared buffer that events' payloads can be sliced from: sled's
    /// buffer and a chunk read on its own are taken as they are; a window's bytes are
    /// copied (once for the whole chunk).
    pub fn into_bytes(self) -> bytes::Bytes {
        match self {
            ChunkBytes::Inline(bytes) => bytes::Bytes::from_owner(bytes),
            ChunkBytes::Logged(bytes) => bytes.into(),
            ChunkBytes::InWindow(bytes) => bytes::Bytes::copy_from_slice(bytes),
        }
    }
}

impl std::ops::Deref for ChunkBytes<'_> {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        match self {
            ChunkBytes::Inline(bytes) => bytes,
            ChunkBytes::Logged(bytes) => bytes,
            ChunkBytes::InWindow(bytes) => bytes,
        }
    }
}

impl StateView {
    /// The sealed chunk record that the sled record `value` under `key` stands for: the
    /// record itself, or the one its pointer names in the chunk log. Callers open (verify)
    /// what this returns, so an inline chunk is not verified here too: only a record that
    /// looks like a pointer is, before it is followed. A damaged pointer that no longer
    /// looks like one fails the caller's check as an inline chunk would.
    pub fn chunk_bytes(&self, key: &[u8], value: sled::IVec) -> Result<ChunkBytes<'static>, StorageError> {
        match self.pointer(key, &value)? {
            None => Ok(ChunkBytes::Inline(value)),
            Some((chunks, pointer)) => Ok(ChunkBytes::Logged(chunks.read(key, pointer)?)),
        }
    }

    /// [`StateView::chunk_bytes`] for a reader going through the chunks in position order:
    /// logged chunks are read through `window` (see [`ChunkLog::read_ahead`]).
    pub fn chunk_bytes_in_order<'w>(&self, key: &[u8], value: sled::IVec, window: &'w mut ReadAhead) -> Result<ChunkBytes<'w>, StorageError> {
        match self.pointer(key, &value)? {
            None => Ok(ChunkBytes::Inline(value)),
            Some((chunks, pointer)) => Ok(ChunkBytes::InWindow(chunks.read_ahead(key, pointer, window)?)),
        }
    }

    /// The chunk log and the place in it that `value` points at, if it is a pointer.
    fn pointer(&self, key: &[u8], value: &sled::IVec) -> Result<Option<(&ChunkLog, ChunkPointer)>, StorageError> {
        if !value.get(record::CHECKSUM_BYTES..).is_some_and(ChunkPointer::looks_like) {
            return Ok(None);
        }
        match ChunkPointer::decode(record::open("event chunk", key, value)?) {
            None => Ok(None),
            Some(pointer) => {
                let chunks = self.chunks.as_ref().ok_or_else(|| StorageError::Corrupt {
                    what: "event chunk pointer in a state without a chunk log",
                    key: record::printable_key(key),
                })?;
                Ok(Some((chunks, pointer)))
            }
        }
    }

    /// Writes `chunks` (to the chunk log, durably, with pointers in `batch`; inline in
    /// `batch` when they are few, see [`CHUNK_LOG_MIN_BATCH_BYTES`], or without a log),
    /// then applies `batch`.
    pub fn store(&self, mut batch: sled::Batch, chunks: Vec<ChunkWrite>) -> Result<(), StorageError> {
        let bytes: usize = chunks.iter().map(|(_, sealed)| sealed.len()).sum();
        match self.chunks.as_ref().filter(|_| bytes >= CHUNK_LOG_MIN_BATCH_BYTES) {
            Some(log) => {
                let records: Vec<&[u8]> = chunks.iter().map(|(_, sealed)| sealed.as_slice()).collect();
                for ((key, _), pointer) in chunks.iter().zip(log.append(&records)?) {
                    batch.insert(key, record::seal(key, &pointer.encode()));
                }
            }
            None => {
                for (key, sealed) in chunks {
                    batch.insert(&key, sealed);
                }
            }
        }
        self.tree.apply_batch(batch)?;
        Ok(())
    }
}

struct OwnDb {
    db: sled::Db,
    durable: DurableFlush,
    dir: PathBuf,
}

impl StateHome {
    /// The live state named by the main database's pointers (a fresh data dir gets
    /// generation 0); removes generations and legacy trees that are not live (left by a
    /// switch that crashed before or after its pointer write).
    pub fn open_live(main: &sled::Db, data_dir: &Path) -> Result<Self, StorageError> {
        let home = match main.get(ACTIVE_STATE_DIR)? {
            Some(name) => Self::open_generation(data_dir, &pointer_name(&name, ACTIVE_STATE_DIR)?)?,
            None => match main.get(ACTIVE_STATE_TREE)? {
                Some(name) => Self { tree: main.open_tree(&name)?, own: None, chunks: None },
                None => {
                    let home = Self::open_generation(data_dir, &format!("{STATE_DIR_PREFIX}0"))?;
                    main.insert(ACTIVE_STATE_DIR, home.name().as_bytes())?;
                    home
                }
            },
        };
        for stale in main.tree_names() {
            let stale_name = String::from_utf8_lossy(&stale).to_string();
            if stale_name.starts_with(STATE_TREE_PREFIX) && (home.own.is_some() || stale_name.as_bytes() != &*home.tree.name()) {
                main.drop_tree(&stale)?;
            }
        }
        for dir in generation_dirs(data_dir)? {
            if home.own.as_ref().map(|own| &own.dir) != Some(&dir) {
                std::fs::remove_dir_all(&dir)?;
            }
        }
        Ok(home)
    }

    /// A new, empty generation after the highest one on disk (not yet live).
    pub fn create_next(data_dir: &Path) -> Result<Self, StorageError> {
        let next = generation_dirs(data_dir)?
            .iter()
            .filter_map(|dir| dir.file_name()?.to_str()?.strip_prefix(STATE_DIR_PREFIX)?.parse::<u64>().ok())
            .max()
            .map_or(0, |g| g + 1);
        Self::open_generation(data_dir, &format!("{STATE_DIR_PREFIX}{next}"))
    }

    fn open_generation(data_dir: &Path, name: &str) -> Result<Self, StorageError> {
        let dir = data_dir.join(name);
        let db = crate::open_sled(&dir, STATE_SLED_CACHE_BYTES)?;
        let durable = DurableFlush::new(&db, &dir)?;
        let chunks = Arc::new(ChunkLog::open(&dir.join(CHUNKS_DIR))?);
        Ok(Self { tree: db.open_tree(STATE_TREE)?, own: Some(OwnDb { db, durable, dir }), chunks: Some(chunks) })
    }

    /// The generation's tree and chunk log.
    pub fn view(&self) -> StateView {
        StateView { tree: self.tree.clone(), chunks: self.chunks.clone() }
    }

    /// The generation's directory name, or the legacy tree's name.
    pub fn name(&self) -> String {
        match &self.own {
            Some(own) => own.dir.file_name().map(|n| n.to_string_lossy().to_string()).unwrap_or_default(),
            None => String::from_utf8_lossy(&self.tree.name()).to_string(),
        }
    }

    /// Bytes of the database file this state lives in (the main one for a legacy tree) and
    /// of its chunk log.
    pub fn file_bytes(&self, data_dir: &Path) -> u64 {
        let file = match &self.own {
            Some(own) => own.dir.join("db"),
            None => data_dir.join("sled").join("db"),
        };
        std::fs::metadata(file).map_or(0, |m| m.len()) + self.chunks.as_ref().map_or(0, |chunks| chunks.bytes())
    }

    /// Makes every write to this generation durable (sled's flush, then fdatasync). A
    /// legacy tree is made durable by the main database's flush.
    pub fn sync(&self, main: &sled::Db) -> Result<(), StorageError> {
        match &self.own {
            Some(own) => own.durable.flush(),
            None => {
                main.flush()?;
                Ok(())
            }
        }
    }

    /// The durable flush of a generation of its own.
    pub fn durable(&self) -> Option<DurableFlush> {
        self.own.as_ref().map(|own| own.durable.clone())
    }

    /// Makes this (filled) generation the live one: durably written first, then the
    /// pointer, durably.
    pub fn make_live(&self, main: &DurableFlush, main_db: &sled::Db) -> Result<(), StorageError> {
        let own = self.own.as_ref().expect("only a generation of its own is switched in");
        own.durable.flush()?;
        main_db.insert(ACTIVE_STATE_DIR, self.name().as_bytes())?;
        main.flush()
    }

    /// What to remove once this generation is replaced.
    pub fn retire(self, main_db: &sled::Db) -> Result<Option<PathBuf>, StorageError> {
        match self.own {
            Some(own) => {
                drop(own.db);
                Ok(Some(own.dir))
            }
            None => {
                // The pointer to it is superseded by `active_state_dir`; its pages go back
                // to the main database for reuse.
                main_db.drop_tree(self.tree.name())?;
                main_db.remove(ACTIVE_STATE_TREE)?;
                Ok(None)
            }
        }
    }
}

/// Directories of replaced generations, removed after [`RETIRED_STATE_GRACE`].
#[derive(Default)]
pub(crate) struct Retired(Mutex<Vec<(PathBuf, Instant)>>);

impl Retired {
    pub fn add(&self, dir: PathBuf) {
        self.0.lock().expect("retired list lock is never poisoned").push((dir, Instant::now()));
    }

    /// Removes the directories retired at least `grace` ago.
    pub fn remove_due(&self, grace: Duration) {
        let mut dirs = self.0.lock().expect("retired list lock is never poisoned");
        dirs.retain(|(dir, since)| {
            if since.elapsed() < grace {
                return true;
            }
            if let Err(e) = std::fs::remove_dir_all(dir) {
                tracing::warn!(error = %e, dir = %dir.display(), "removing a replaced state generation failed");
            }
            false
        });
    }
}

fn pointer_name(bytes: &[u8], key: &[u8]) -> Result<String, StorageError> {
    String::from_utf8(bytes.to_vec()).map_err(|_| StorageError::Corrupt { what: "active state pointer", key: String::from_utf8_lossy(key).into() })
}

fn generation_dirs(data_dir: &Path) -> Result<Vec<PathBuf>, StorageError> {
    let mut dirs = Vec::new();
    for entry in std::fs::read_dir(data_dir)? {
        let entry = entry?;
        let name = entry.file_name().to_string_lossy().to_string();
        let is_generation = name.strip_prefix(STATE_DIR_PREFIX).is_some_and(|g| g.parse::<u64>().is_ok());
        if is_generation && entry.file_type()?.is_dir() {
            dirs.push(entry.path());
        }
    }
    Ok(dirs)
}
