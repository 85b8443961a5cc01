//! The Raft log (in a [`Wal`]) and the small Raft metadata (in a sled tree), as opaque
//! checksummed bytes.
//!
//! Durability: [`RaftLogStore::append`] writes entries and returns; they are durable once
//! a flush that started after the write has finished. The flusher thread runs one
//! fdatasync of the log for every waiter queued while the previous one ran, so
//! consecutive appends share one fsync (group commit at the disk), and a waiter is told
//! "flushed" only after an fsync that covers its entries.

use std::path::Path;
use std::sync::{mpsc, Arc};
use std::thread;

use crate::record;
use crate::wal::{Salvage, Wal};
use crate::{DurableFlush, StorageError};

/// Log appends waiting for the flusher. openraft issues log writes one at a time and the
/// flusher drains the whole queue per fsync, so this only needs to absorb a burst of
/// appends during one slow fsync; when full, `append` blocks (back-pressure), it never drops.
pub const LOG_FLUSH_QUEUE_MAX: usize = 4096;

const META_TREE: &str = "raft_meta";
const WAL_DIR: &str = "raft-log";

/// Called once the entries of one append are on disk (or the flush failed).
pub type LogFlushWaiter = Box<dyn FnOnce(Result<(), std::io::Error>) + Send>;

/// The Raft log store: entries by index, and named metadata values.
#[derive(Clone)]
pub struct RaftLogStore {
    inner: Arc<Inner>,
}

struct Inner {
    /// Flushes sled: the metadata, and the applied state sharing its database.
    durable: DurableFlush,
    wal: Arc<Wal>,
    /// Set when opening cut a corrupt log short (see [`RaftLogStore::salvaged`]).
    salvage: Option<Salvage>,
    meta: sled::Tree,
    flush_queue: Option<mpsc::SyncSender<LogFlushWaiter>>,
    flusher: Option<thread::JoinHandle<()>>,
}

impl Drop for Inner {
    /// Closes the queue and waits for the flusher, so every waiter is answered and the
    /// files are released when the last handle goes.
    fn drop(&mut self) {
        self.flush_queue.take();
        if let Some(flusher) = self.flusher.take() {
            let _ = flusher.join();
        }
    }
}

impl RaftLogStore {
    /// Opens the log under `data_dir/raft-log` and the metadata in `db`. A record that
    /// fails its checksum in the middle of the log does not stop the node: the log is cut
    /// off before it (see [`Wal::open_salvaging`]) and [`RaftLogStore::salvaged`] says so.
    pub fn open(db: &sled::Db, data_dir: &Path) -> Result<Self, StorageError> {
        let (wal, salvage) = Wal::open_salvaging(&data_dir.join(WAL_DIR))?;
        let wal = Arc::new(wal);
        let meta = db.open_tree(META_TREE)?;
        let (flush_queue, waiting) = mpsc::sync_channel::<LogFlushWaiter>(LOG_FLUSH_QUEUE_MAX);
        let durable = DurableFlush::new(db, &data_dir.join("sled"))?;
        let flusher_wal = wal.clone();
        let flusher = thread::Builder::new()
            .name("strata-log-flush".into())
            .spawn(move || run_flusher(flusher_wal, waiting))?;
        let inner = Inner { durable, wal, salvage, meta, flush_queue: Some(flush_queue), flusher: Some(flusher) };
        Ok(Self { inner: Arc::new(inner) })
    }

    /// Writes entries `(index, bytes)`; they must follow the current last index.
    /// `on_flushed` runs once an fsync covering them has completed.
    pub fn append<B: AsRef<[u8]>>(&self, entries: &[(u64, B)], on_flushed: LogFlushWaiter) -> Result<(), StorageError> {
        self.inner.wal.append(entries)?;
        self.inner.flush_queue
            .as_ref()
            .expect("flush queue lives as long as the store")
            .send(on_flushed)
            .map_err(|_| StorageError::Io(std::io::Error::other("log flusher thread is gone")))?;
        Ok(())
    }

    /// Entries with index in `[start, end)`, in order. Verifies each checksum.
    pub fn read_range(&self, start: u64, end: u64) -> Result<Vec<(u64, Vec<u8>)>, StorageError> {
        self.inner.wal.read_range(start, end)
    }

    /// The last entry, if any.
    pub fn last(&self) -> Result<Option<(u64, Vec<u8>)>, StorageError> {
        self.inner.wal.last()
    }

    /// Removes every entry with index `>= from`, durably.
    pub fn truncate_from(&self, from: u64) -> Result<(), StorageError> {
        self.inner.wal.truncate_from(from)
    }

    /// Removes every entry with index `<= upto`.
    ///
    /// The applied state is not flushed on the commit path: after a crash, openraft
    /// re-applies the log above the durable applied index, so entries may only go once
    /// the applied state is durable past them. That holds without a flush here: openraft
    /// purges only up to its current snapshot, and recording a snapshot (built or
    /// installed) is a durable sled flush that covers the applied state at least up to
    /// the snapshot's index. (A flush here would stall every log write behind it.)
    /// `note` is kept durably with the purge point (the Raft layer's purged log id) and
    /// read back with [`RaftLogStore::purged_note`]: one small fsynced file, no sled flush.
    pub fn purge_upto(&self, upto: u64, note: &[u8]) -> Result<(), StorageError> {
        self.inner.wal.purge_upto(upto, note)
    }

    /// The note of the latest purge.
    pub fn purged_note(&self) -> Option<Vec<u8>> {
        self.inner.wal.purged_note()
    }

    /// Reads a named metadata value.
    pub fn get_meta(&self, name: &str) -> Result<Option<Vec<u8>>, StorageError> {
        match self.inner.meta.get(name.as_bytes())? {
            None => Ok(None),
            Some(value) => Ok(Some(record::open("raft metadata", name.as_bytes(), &value)?.to_vec())),
        }
    }

    /// Writes a named metadata value; with `durable`, fsyncs before returning.
    pub fn put_meta(&self, name: &str, value: &[u8], durable: bool) -> Result<(), StorageError> {
        self.inner.meta.insert(name.as_bytes(), record::seal(name.as_bytes(), value))?;
        if durable {
            self.inner.durable.flush()?;
        }
        Ok(())
    }

    /// Removes a named metadata value, durably.
    pub fn remove_meta(&self, name: &str) -> Result<(), StorageError> {
        self.inner.meta.remove(name.as_bytes())?;
        self.inner.durable.flush()
    }

    /// What opening cut off, if the log held a corrupt record: this node's log may now end
    /// before entries it acknowledged, so it must not vote or lead until it has re-synced.
    pub fn salvaged(&self) -> Option<&Salvage> {
        self.inner.salvage.as_ref()
    }

    /// Whether this store has ever held Raft state (a vote or a log entry).
    pub fn is_pristine(&self) -> Result<bool, StorageError> {
        Ok(self.inner.wal.is_pristine() && self.inner.meta.is_empty())
    }
}

/// One fsync per drained batch of waiters; exits when every sender is gone.
fn run_flusher(wal: Arc<Wal>, waiting: mpsc::Receiver<LogFlushWaiter>) {
    while let Ok(first) = waiting.recv() {
        let mut waiters = vec![first];
        while waiters.len() < LOG_FLUSH_QUEUE_MAX {
            match waiting.try_recv() {
                Ok(next) => waiters.push(next),
                Err(_) => break,
            }
        }
        let result = wal.sync();
        for waiter in waiters {
            waiter(result.as_ref().map(|_| ()).map_err(|e| std::io::Error::other(e.to_string())));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::mpsc::channel;

    fn store() -> (tempfile::TempDir, RaftLogStore) {
        let dir = tempfile::tempdir().unwrap();
        let db = crate::open_database(dir.path()).unwrap();
        let store = RaftLogStore::open(&db, dir.path()).unwrap();
        (dir, store)
    }

    fn append_and_wait(store: &RaftLogStore, entries: Vec<(u64, Vec<u8>)>) {
        let (tx, rx) = channel();
        store.append(&entries, Box::new(move |r| tx.send(r.is_ok()).unwrap())).unwrap();
        assert!(rx.recv().unwrap(), "flush must succeed");
    }

    #[test]
    fn append_read_truncate_purge() {
        let (_dir, store) = store();
        assert!(store.is_pristine().unwrap());
        append_and_wait(&store, (1..=10).map(|i| (i, vec![i as u8])).collect());
        assert_eq!(store.read_range(3, 6).unwrap().len(), 3);
        assert_eq!(store.last().unwrap().unwrap().0, 10);
        store.truncate_from(8).unwrap();
        assert_eq!(store.last().unwrap().unwrap().0, 7);
        store.purge_upto(4, b"4").unwrap();
        assert_eq!(store.read_range(0, 100).unwrap().first().unwrap().0, 5);
        assert!(!store.is_pristine().unwrap());
    }

    #[test]
    fn corrupt_log_entry_is_an_error_not_an_answer() {
        let (dir, store) = store();
        append_and_wait(&store, vec![(1, b"entry".to_vec())]);
        let segment = dir.path().join(WAL_DIR).join(format!("{:020}.wal", 1));
        let mut bytes = std::fs::read(&segment).unwrap();
        bytes[16] ^= 0x01; // the first payload byte, after the 16-byte record header
        std::fs::write(&segment, &bytes).unwrap();
        assert!(matches!(store.read_range(1, 2), Err(StorageError::Corrupt { .. })));
    }

    #[test]
    fn metadata_survives_reopen() {
        let dir = tempfile::tempdir().unwrap();
        {
            let db = crate::reopen_database(dir.path());
            let store = RaftLogStore::open(&db, dir.path()).unwrap();
            store.put_meta("vote", b"v1", true).unwrap();
        }
        let db = crate::reopen_database(dir.path());
        let store = RaftLogStore::open(&db, dir.path()).unwrap();
        assert_eq!(store.get_meta("vote").unwrap().unwrap(), b"v1");
    }
}
