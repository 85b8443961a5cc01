//! openraft's log storage over [`strata_storage::RaftLogStore`].
//!
//! Durability: `append` hands openraft's callback to the store's flusher, which reports
//! "flushed" only after an fsync that covers the entries; `save_vote` fsyncs before it
//! returns. openraft counts an entry towards the commit quorum only once flushed.

use std::collections::VecDeque;
use std::fmt::Debug;
use std::io;
use std::ops::{Bound, RangeBounds};
use std::sync::{Arc, Mutex};

use openraft::storage::{IOFlushed, RaftLogStorage};
use openraft::{LogState, OptionalSend, RaftLogReader};
use openraft::entry::RaftEntry;
use strata_storage::{RaftLogStore, ScratchBuffer};

use crate::codec::{decode, encode, encode_into};
use crate::{Entry, LogId, TypeConfig, Vote};

const META_VOTE: &str = "vote";
const META_COMMITTED: &str = "committed";

/// Most recent entries the log keeps decoded in memory (see [`RecentEntries`]).
pub const LOG_CACHE_ENTRIES_MAX: usize = 4096;
/// Most encoded bytes of entries the log keeps decoded in memory.
pub const LOG_CACHE_BYTES_MAX: usize = 64 * 1024 * 1024;

/// The Raft log of one node.
#[derive(Clone)]
pub struct LogStore {
    store: RaftLogStore,
    /// Shared by the log and its readers (clones of it).
    recent: Arc<Mutex<RecentEntries>>,
    /// The encoding buffer, kept between appends.
    scratch: ScratchBuffer,
}

/// The newest entries of the log, decoded: a leader reads every entry back once per
/// follower to replicate it and once to apply it, and every node once to apply it; each
/// read from the write-ahead log decoded the entry again (its events' payloads copied),
/// about a tenth of a leader's CPU under load. Entries are cheap to clone (the appends
/// of one are shared). Always a contiguous suffix of the log, so a range that starts in
/// it is all in it; bounded by `LOG_CACHE_ENTRIES_MAX` and `LOG_CACHE_BYTES_MAX`, older
/// entries (a lagging follower) are read from the log as before.
#[derive(Default)]
struct RecentEntries {
    entries: VecDeque<(Entry, usize)>,
    bytes: usize,
}

impl RecentEntries {
    fn push(&mut self, entry: Entry, bytes: usize) {
        if self.entries.back().is_some_and(|(last, _)| last.index() + 1 != entry.index()) {
            // Not a continuation (cannot happen after truncation and purge, which keep
            // the suffix): start over rather than hold a gap.
            self.entries.clear();
            self.bytes = 0;
        }
        self.entries.push_back((entry, bytes));
        self.bytes += bytes;
        while self.entries.len() > LOG_CACHE_ENTRIES_MAX || (self.bytes > LOG_CACHE_BYTES_MAX && self.entries.len() > 1) {
            let (_, gone) = self.entries.pop_front().expect("not empty");
            self.bytes -= gone;
        }
    }

    /// Drops the entries at and after `from`.
    fn truncate_from(&mut self, from: u64) {
        while self.entries.back().is_some_and(|(last, _)| last.index() >= from) {
            let (_, gone) = self.entries.pop_back().expect("not empty");
            self.bytes -= gone;
        }
    }

    /// Drops the entries up to and including `upto`.
    fn purge_upto(&mut self, upto: u64) {
        while self.entries.front().is_some_and(|(first, _)| first.index() <= upto) {
            let (_, gone) = self.entries.pop_front().expect("not empty");
            self.bytes -= gone;
        }
    }

    /// The entries of `[start, end)` if `start` is held (then all of them up to the end
    /// of the log are); None: read the log.
    fn range(&self, start: u64, end: u64) -> Option<Vec<Entry>> {
        let first = self.entries.front()?.0.index();
        let last = self.entries.back()?.0.index();
        if start < first || start > last {
            return None;
        }
        let skip = (start - first) as usize;
        Some(self.entries.iter().skip(skip).take_while(|(entry, _)| entry.index() < end).map(|(entry, _)| entry.clone()).collect())
    }
}

impl LogStore {
    /// Wraps `store`. If opening it cut a corrupt log short, this node may lack entries it
    /// acknowledged, so two hints that would trust the old log are dropped first: the
    /// committed index (openraft would re-apply entries that are gone) and a committed
    /// vote (a node that led before the crash would resume leading with a short log). The
    /// vote keeps its term and candidate; only the "leader seen" flag goes.
    pub fn new(store: RaftLogStore) -> Self {
        let log_store = Self { store, recent: Arc::default(), scratch: ScratchBuffer::default() };
        if let Some(salvage) = log_store.store.salvaged() {
            tracing::error!(kept_last = ?salvage.kept_last, "raft log was cut short by corruption: forgetting the committed index and un-committing the vote");
            if let Err(e) = log_store.forget_trust_in_the_old_log() {
                // Left as it was, openraft refuses to start on the missing entries: safe.
                tracing::error!(error = %e, "could not reset the committed index and vote after a corrupt raft log");
            }
        }
        log_store
    }

    fn forget_trust_in_the_old_log(&self) -> Result<(), io::Error> {
        self.store.remove_meta(META_COMMITTED)?;
        if let Some(mut vote) = self.read_meta::<Vote>(META_VOTE)? {
            vote.committed = false;
            self.store.put_meta(META_VOTE, &encode(&vote), true)?;
        }
        Ok(())
    }

    /// Whether opening found a corrupt record and cut the log short: the node must re-sync
    /// from a leader before it votes or leads (see [`crate::ResyncGate`]).
    pub fn was_salvaged(&self) -> bool {
        self.store.salvaged().is_some()
    }

    /// Whether this node has never been part of a cluster (no vote, no log).
    pub fn is_pristine(&self) -> Result<bool, io::Error> {
        Ok(self.store.is_pristine()?)
    }

    fn read_meta<T: serde::de::DeserializeOwned>(&self, name: &str) -> Result<Option<T>, io::Error> {
        match self.store.get_meta(name)? {
            None => Ok(None),
            Some(bytes) => Ok(Some(decode(name, &bytes)?)),
        }
    }
}

impl RaftLogReader<TypeConfig> for LogStore {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + OptionalSend>(
        &mut self,
        range: RB,
    ) -> Result<Vec<Entry>, io::Error> {
        let start = match range.start_bound() {
            Bound::Included(i) => *i,
            Bound::Excluded(i) => i + 1,
            Bound::Unbounded => 0,
        };
        let end = match range.end_bound() {
            Bound::Included(i) => i.saturating_add(1),
            Bound::Excluded(i) => *i,
            Bound::Unbounded => u64::MAX,
        };
        if let Some(entries) = self.recent.lock().expect("recent entries lock is never poisoned").range(start, end) {
            return Ok(entries);
        }
        let mut entries = Vec::new();
        for (index, bytes) in self.store.read_range(start, end)? {
            let entry: Entry = decode("raft log entry", &bytes)?;
            assert_eq!(entry.index(), index, "entry stored under its own index");
            entries.push(entry);
        }
        Ok(entries)
    }

    async fn read_vote(&mut self) -> Result<Option<Vote>, io::Error> {
        self.read_meta(META_VOTE)
    }
}

impl RaftLogStorage<TypeConfig> for LogStore {
    type LogReader = Self;

    async fn get_log_state(&mut self) -> Result<LogState<TypeConfig>, io::Error> {
        let last_purged_log_id: Option<LogId> =
            self.store.purged_note().map(|bytes| decode("purged log id", &bytes)).transpose()?;
        let last_log_id = match self.store.last()? {
            Some((_, bytes)) => Some(decode::<Entry>("raft log entry", &bytes)?.log_id()),
            None => last_purged_log_id,
        };
        Ok(LogState { last_purged_log_id, last_log_id })
    }

    async fn get_log_reader(&mut self) -> Self::LogReader {
        self.clone()
    }

    async fn save_vote(&mut self, vote: &Vote) -> Result<(), io::Error> {
        let store = self.store.clone();
        let bytes = encode(vote);
        tokio::task::spawn_blocking(move || store.put_meta(META_VOTE, &bytes, true))
            .await
            .map_err(io::Error::other)??;
        Ok(())
    }

    async fn save_committed(&mut self, committed: Option<LogId>) -> Result<(), io::Error> {
        // Not fsynced: committed is a hint that lets a restarted node re-apply sooner.
        self.store.put_meta(META_COMMITTED, &encode(&committed), false)?;
        Ok(())
    }

    async fn read_committed(&mut self) -> Result<Option<LogId>, io::Error> {
        Ok(self.read_meta::<Option<LogId>>(META_COMMITTED)?.flatten())
    }

    async fn append<I>(&mut self, entries: I, callback: IOFlushed<TypeConfig>) -> Result<(), io::Error>
    where
        I: IntoIterator<Item = Entry> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        let mut scratch = self.scratch.take();
        let mut spans = Vec::new();
        let mut decoded = Vec::new();
        for entry in entries {
            let start = scratch.len();
            encode_into(&entry, &mut scratch);
            spans.push((entry.index(), start..scratch.len()));
            decoded.push((entry, scratch.len() - start));
        }
        let records: Vec<(u64, &[u8])> = spans.into_iter().map(|(index, span)| (index, &scratch[span])).collect();
        let written = self.store.append(&records, Box::new(move |result| callback.io_completed(result)));
        drop(records);
        self.scratch.keep(scratch);
        written?;
        let mut recent = self.recent.lock().expect("recent entries lock is never poisoned");
        for (entry, bytes) in decoded {
            recent.push(entry, bytes);
        }
        Ok(())
    }

    async fn truncate_after(&mut self, last_log_id: Option<LogId>) -> Result<(), io::Error> {
        let from = last_log_id.map_or(0, |id| id.index() + 1);
        self.recent.lock().expect("recent entries lock is never poisoned").truncate_from(from);
        self.store.truncate_from(from)?;
        Ok(())
    }

    async fn purge(&mut self, log_id: LogId) -> Result<(), io::Error> {
        // The purged log id is written durably with the purge floor, before any entry goes.
        self.recent.lock().expect("recent entries lock is never poisoned").purge_upto(log_id.index());
        self.store.purge_upto(log_id.index(), &encode(&log_id))?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(index: u64) -> Entry {
        openraft::testing::blank_ent::<TypeConfig>(1, 1, index)
    }

    fn indexes(entries: Option<Vec<Entry>>) -> Option<Vec<u64>> {
        entries.map(|entries| entries.iter().map(|e| e.index()).collect())
    }

    #[test]
    fn recent_entries_answer_only_ranges_that_start_in_them() {
        let mut recent = RecentEntries::default();
        for index in 5..10 {
            recent.push(entry(index), 10);
        }
        assert_eq!(indexes(recent.range(6, 8)), Some(vec![6, 7]));
        assert_eq!(indexes(recent.range(8, u64::MAX)), Some(vec![8, 9]));
        assert_eq!(indexes(recent.range(4, 8)), None, "4 is older: the log answers");
        assert_eq!(indexes(recent.range(10, 12)), None, "past the end: the log answers");
        recent.truncate_from(8);
        assert_eq!(indexes(recent.range(6, 20)), Some(vec![6, 7]));
        recent.push(entry(8), 10);
        recent.purge_upto(6);
        assert_eq!(indexes(recent.range(7, 20)), Some(vec![7, 8]));
        assert_eq!(recent.bytes, 20);
        // A gap (never made by openraft) starts the suffix over.
        recent.push(entry(20), 10);
        assert_eq!(indexes(recent.range(20, 21)), Some(vec![20]));
        assert_eq!(indexes(recent.range(8, 21)), None);
    }

    #[test]
    fn recent_entries_are_bounded_by_count_and_bytes() {
        let mut recent = RecentEntries::default();
        for index in 0..(LOG_CACHE_ENTRIES_MAX as u64 + 10) {
            recent.push(entry(index), 1);
        }
        assert_eq!(recent.entries.len(), LOG_CACHE_ENTRIES_MAX);
        assert_eq!(recent.entries.front().map(|(e, _)| e.index()), Some(10));
        recent.push(entry(LOG_CACHE_ENTRIES_MAX as u64 + 10), LOG_CACHE_BYTES_MAX);
        assert_eq!(recent.entries.len(), 1, "one entry over the byte bound is kept alone");
    }
}
