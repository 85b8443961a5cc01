//! openraft's log storage over [`strata_storage::RaftLogStore`].
//!
//! Durability: `append` hands openraft's callback to the store's flusher, which reports
//! "flushed" only after an fsync that covers the entries; `save_vote` fsyncs before it
//! returns. openraft counts an entry towards the commit quorum only once flushed.

use std::fmt::Debug;
use std::io;
use std::ops::{Bound, RangeBounds};

use openraft::storage::{IOFlushed, RaftLogStorage};
use openraft::{LogState, OptionalSend, RaftLogReader};
use openraft::entry::RaftEntry;
use strata_storage::RaftLogStore;

use crate::codec::{decode, encode};
use crate::{Entry, LogId, TypeConfig, Vote};

const META_VOTE: &str = "vote";
const META_COMMITTED: &str = "committed";

/// The Raft log of one node.
#[derive(Clone)]
pub struct LogStore {
    store: RaftLogStore,
}

impl LogStore {
    /// Wraps `store`. If opening it cut a corrupt log short, this node may lack entries it
    /// acknowledged, so two hints that would trust the old log are dropped first: the
    /// committed index (openraft would re-apply entries that are gone) and a committed
    /// vote (a node that led before the crash would resume leading with a short log). The
    /// vote keeps its term and candidate; only the "leader seen" flag goes.
    pub fn new(store: RaftLogStore) -> Self {
        let log_store = Self { store };
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
        let encoded: Vec<(u64, Vec<u8>)> = entries.into_iter().map(|e| (e.index(), encode(&e))).collect();
        self.store.append(encoded, Box::new(move |result| callback.io_completed(result)))?;
        Ok(())
    }

    async fn truncate_after(&mut self, last_log_id: Option<LogId>) -> Result<(), io::Error> {
        let from = last_log_id.map_or(0, |id| id.index() + 1);
        self.store.truncate_from(from)?;
        Ok(())
    }

    async fn purge(&mut self, log_id: LogId) -> Result<(), io::Error> {
        // The purged log id is written durably with the purge floor, before any entry goes.
        self.store.purge_upto(log_id.index(), &encode(&log_id))?;
        Ok(())
    }
}
