//! The Raft log and Raft metadata, as opaque checksummed bytes in two sled trees.
//!
//! Durability: [`RaftLogStore::append`] inserts entries and returns; the entries are
//! durable only once a flush that started after the insert has finished. The flusher
//! thread runs one `sled::Db::flush` (write + fsync) for every waiter queued while the
//! previous flush ran, so consecutive appends share one fsync (group commit at the disk),
//! and a waiter is told "flushed" only after an fsync that covers its entries.

use std::sync::mpsc;
use std::thread;

use crate::record;
use crate::{DurableFlush, StorageError};

/// Log appends waiting for the flusher. openraft issues log writes one at a time and the
/// flusher drains the whole queue per fsync, so this only needs to absorb a burst of
/// appends during one slow fsync; when full, `append` blocks (back-pressure), it never drops.
pub const LOG_FLUSH_QUEUE_MAX: usize = 4096;

const LOG_TREE: &str = "raft_log";
const META_TREE: &str = "raft_meta";

/// Called once the entries of one append are on disk (or the flush failed).
pub type LogFlushWaiter = Box<dyn FnOnce(Result<(), std::io::Error>) + Send>;

/// The Raft log store: entries by index, and named metadata values.
#[derive(Clone)]
pub struct RaftLogStore {
    inner: std::sync::Arc<Inner>,
}

struct Inner {
    durable: DurableFlush,
    log: sled::Tree,
    meta: sled::Tree,
    flush_queue: Option<mpsc::SyncSender<LogFlushWaiter>>,
    flusher: Option<thread::JoinHandle<()>>,
}

impl Drop for Inner {
    /// Closes the queue and waits for the flusher, so the database is released when the
    /// last handle goes (a reopen in the same process must not find it locked).
    fn drop(&mut self) {
        self.flush_queue.take();
        if let Some(flusher) = self.flusher.take() {
            let _ = flusher.join();
        }
    }
}


impl RaftLogStore {
    pub fn open(db: &sled::Db, data_dir: &std::path::Path) -> Result<Self, StorageError> {
        let log = db.open_tree(LOG_TREE)?;
        let meta = db.open_tree(META_TREE)?;
        let (flush_queue, waiting) = mpsc::sync_channel::<LogFlushWaiter>(LOG_FLUSH_QUEUE_MAX);
        let durable = DurableFlush::new(db, data_dir)?;
        let flusher_durable = durable.clone();
        let flusher = thread::Builder::new()
            .name("strata-log-flush".into())
            .spawn(move || run_flusher(flusher_durable, waiting))?;
        let inner = Inner { durable, log, meta, flush_queue: Some(flush_queue), flusher: Some(flusher) };
        Ok(Self { inner: std::sync::Arc::new(inner) })
    }

    /// Inserts entries `(index, bytes)`; they must follow the current last index.
    /// `on_flushed` runs once an fsync covering them has completed.
    pub fn append(&self, entries: Vec<(u64, Vec<u8>)>, on_flushed: LogFlushWaiter) -> Result<(), StorageError> {
        let mut batch = sled::Batch::default();
        let mut previous: Option<u64> = None;
        for (index, bytes) in entries {
            if let Some(previous) = previous {
                assert_eq!(previous + 1, index, "log entries must be contiguous");
            }
            previous = Some(index);
            let key = index.to_be_bytes();
            batch.insert(&key, record::seal(&key, &bytes));
        }
        self.inner.log.apply_batch(batch)?;
        self.inner.flush_queue
            .as_ref()
            .expect("flush queue lives as long as the store")
            .send(on_flushed)
            .map_err(|_| StorageError::Io(std::io::Error::other("log flusher thread is gone")))?;
        Ok(())
    }

    /// Entries with index in `[start, end)`, in order. Verifies each checksum.
    pub fn read_range(&self, start: u64, end: u64) -> Result<Vec<(u64, Vec<u8>)>, StorageError> {
        let mut out = Vec::new();
        if start >= end {
            return Ok(out);
        }
        for item in self.inner.log.range(start.to_be_bytes()..end.to_be_bytes()) {
            let (key, value) = item?;
            let index = decode_index(&key)?;
            out.push((index, record::open("raft log entry", &key, &value)?.to_vec()));
        }
        Ok(out)
    }

    /// The last entry, if any.
    pub fn last(&self) -> Result<Option<(u64, Vec<u8>)>, StorageError> {
        match self.inner.log.last()? {
            None => Ok(None),
            Some((key, value)) => {
                let index = decode_index(&key)?;
                Ok(Some((index, record::open("raft log entry", &key, &value)?.to_vec())))
            }
        }
    }

    /// Removes every entry with index `>= from`. Not flushed: a truncation that is lost in
    /// a crash leaves entries that openraft truncates again (they are uncommitted).
    pub fn truncate_from(&self, from: u64) -> Result<(), StorageError> {
        let mut batch = sled::Batch::default();
        for item in self.inner.log.range(from.to_be_bytes()..) {
            let (key, _) = item?;
            batch.remove(key);
        }
        self.inner.log.apply_batch(batch)?;
        Ok(())
    }

    /// Removes every entry with index `<= upto`. The caller records the purged log id first.
    pub fn purge_upto(&self, upto: u64) -> Result<(), StorageError> {
        let mut batch = sled::Batch::default();
        for item in self.inner.log.range(..=upto.to_be_bytes()) {
            let (key, _) = item?;
            batch.remove(key);
        }
        self.inner.log.apply_batch(batch)?;
        Ok(())
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

    /// Whether this store has ever held Raft state (a vote or a log entry).
    pub fn is_pristine(&self) -> Result<bool, StorageError> {
        Ok(self.inner.log.is_empty() && self.inner.meta.is_empty())
    }
}

fn decode_index(key: &[u8]) -> Result<u64, StorageError> {
    let bytes: [u8; 8] = key
        .try_into()
        .map_err(|_| StorageError::Corrupt { what: "raft log key", key: record::printable_key(key) })?;
    Ok(u64::from_be_bytes(bytes))
}

/// One fsync per drained batch of waiters; exits when every sender is gone.
fn run_flusher(durable: DurableFlush, waiting: mpsc::Receiver<LogFlushWaiter>) {
    while let Ok(first) = waiting.recv() {
        let mut waiters = vec![first];
        while waiters.len() < LOG_FLUSH_QUEUE_MAX {
            match waiting.try_recv() {
                Ok(next) => waiters.push(next),
                Err(_) => break,
            }
        }
        let result = durable.flush();
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
        store.append(entries, Box::new(move |r| tx.send(r.is_ok()).unwrap())).unwrap();
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
        store.purge_upto(4).unwrap();
        assert_eq!(store.read_range(0, 100).unwrap().first().unwrap().0, 5);
        assert!(!store.is_pristine().unwrap());
    }

    #[test]
    fn corrupt_log_entry_is_an_error_not_an_answer() {
        let (_dir, store) = store();
        append_and_wait(&store, vec![(1, b"entry".to_vec())]);
        store.inner.log.insert(1u64.to_be_bytes(), b"\0\0\0\0entry".to_vec()).unwrap();
        assert!(matches!(store.read_range(1, 2), Err(StorageError::Corrupt { .. })));
    }

    #[test]
    fn metadata_survives_reopen() {
        let dir = tempfile::tempdir().unwrap();
        {
            let db = crate::open_database(dir.path()).unwrap();
            let store = RaftLogStore::open(&db, dir.path()).unwrap();
            store.put_meta("vote", b"v1", true).unwrap();
        }
        let db = crate::open_database(dir.path()).unwrap();
        let store = RaftLogStore::open(&db, dir.path()).unwrap();
        assert_eq!(store.get_meta("vote").unwrap().unwrap(), b"v1");
    }
}
