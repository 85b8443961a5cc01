//! The leader's writer of settled segments.

use std::time::Duration;

use slatedb::config::Settings;
use slatedb::{Db, WriteBatch};

use super::layout;
use super::store::TierStore;
use super::TierError;
use crate::chunk::{EncodedChunk, EventChunk};
use crate::record;

/// Longest a segment write may take to become durable before the upload counts as failed
/// (the store is down or slow): the leader then reopens and retries, and the hot tier
/// keeps the events meanwhile.
pub const TIER_WRITE_TIMEOUT: Duration = Duration::from_secs(30);
/// Object-store retries inside SlateDB before an operation fails; without a bound SlateDB
/// retries forever, and an unreachable store would hang the upload instead of failing it.
const STORE_RETRIES_MAX: u32 = 5;

/// Bytes the writer may hold in memtables not yet flushed to the object store before
/// SlateDB holds up its writes (its default, 1 GiB, is more than a small node has).
const WRITER_UNFLUSHED_BYTES_MAX: usize = 256 * 1024 * 1024;
/// Compactions the leader's writer runs at once: each one is CPU the appends compete
/// with, and one keeps up with what a node appends.
const COMPACTIONS_MAX: usize = 1;
/// Scope of the writer's entries in its SlateDB cache (the cache is its own).
const WRITER_CACHE_ID: u64 = 1;

/// The writer's claim on the database, stored under `w`: the Raft term it leads in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
struct WriterClaim {
    term: u64,
    node_id: u64,
}

/// What one segment write put into the tier.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SegmentStats {
    pub chunks: u64,
    pub events: u64,
    pub bytes: u64,
}

/// The only writer of the tier database: the leader of one Raft term.
///
/// Opening claims SlateDB's writer epoch, which fences every earlier writer (their
/// writes fail when they wait for durability). The claim is also recorded with the Raft
/// term: a writer whose term is older than the recorded one refuses to go on, so a
/// deposed leader that reopens late cannot take the database back from a newer one.
pub struct TierWriter {
    db: Db,
    uploaded_through: u64,
}

impl TierWriter {
    /// Opens (creating if needed) the tier database for the leader of `term`.
    pub async fn open(store: &TierStore, term: u64, node_id: u64) -> Result<Self, TierError> {
        let settings = Settings {
            // No WAL: every upload is one write batch that `durable` flushes straight into an
            // L0 table. A WAL would write each uploaded byte twice (WAL table, then L0) for
            // nothing: an upload is only acknowledged (the watermark committed through Raft)
            // once it is durable, and a lost memtable is uploaded again from the hot tier.
            // Fencing still holds: the L0 flush commits SlateDB's manifest, which a newer
            // writer epoch refuses.
            wal_enabled: false,
            // Flushes happen when an upload asks for durability, not on a timer.
            flush_interval: None,
            object_store_max_retries: Some(STORE_RETRIES_MAX),
            max_unflushed_bytes: WRITER_UNFLUSHED_BYTES_MAX,
            compactor_options: Some(slatedb::config::CompactorOptions {
                max_concurrent_compactions: COMPACTIONS_MAX,
                ..Default::default()
            }),
            ..Settings::default()
        };
        let builder = Db::builder(store.db_path.clone(), store.object_store.clone())
            .with_settings(settings)
            .with_db_cache(super::store::slatedb_cache(super::store::WRITER_BLOCK_CACHE_BYTES), WRITER_CACHE_ID);
        let db = tokio::time::timeout(TIER_WRITE_TIMEOUT, builder.build())
        .await
        .map_err(|_| TierError::Store("opening the tier database timed out".into()))??;
        let writer = Self { db, uploaded_through: 0 };
        let claimed = tokio::time::timeout(TIER_WRITE_TIMEOUT, writer.claim(term, node_id))
            .await
            .unwrap_or_else(|_| Err(TierError::Store("claiming the tier database timed out".into())));
        match writer.result(claimed).await {
            Ok(uploaded) => Ok(Self { uploaded_through: uploaded, ..writer }),
            Err(e) => Err(e),
        }
    }

    async fn claim(&self, term: u64, node_id: u64) -> Result<u64, TierError> {
        if let Some(value) = self.db.get(layout::WRITER).await? {
            let claim: WriterClaim = record::open_value("tier writer claim", layout::WRITER, &value)?;
            if claim.term > term {
                return Err(TierError::Fenced(format!(
                    "the tier was claimed by a newer leader claimed_term={} own_term={term}",
                    claim.term
                )));
            }
        }
        let claim = record::seal_value("tier writer claim", layout::WRITER, &WriterClaim { term, node_id })?;
        let handle = self.db.put(layout::WRITER, claim).await?;
        self.durable(handle).await?;
        let uploaded = match self.db.get(layout::UPLOADED).await? {
            None => 0,
            Some(value) => {
                let payload = record::open("tier uploaded mark", layout::UPLOADED, &value)?;
                layout::decode_u64(payload).ok_or_else(|| {
                    TierError::Corrupt(crate::StorageError::Corrupt { what: "tier uploaded mark", key: "u".into() })
                })?
            }
        };
        Ok(uploaded)
    }

    /// Closes the database on failure, so a failed writer never lingers.
    async fn result<T>(&self, result: Result<T, TierError>) -> Result<T, TierError> {
        if result.is_err() {
            let _ = tokio::time::timeout(TIER_WRITE_TIMEOUT, self.db.close()).await;
        }
        result
    }

    async fn durable(&self, handle: slatedb::WriteHandle) -> Result<(), TierError> {
        // `put` returns before the write is in the object store, and a fenced writer's put
        // still returns Ok: only the flush of the memtable (which commits the manifest under
        // this writer's epoch) and waiting for durability tell.
        tokio::time::timeout(TIER_WRITE_TIMEOUT, async {
            self.db.flush().await?;
            handle.await_durable().await
        })
            .await
            .map_err(|_| TierError::Store("a tier write did not become durable in time".into()))??;
        Ok(())
    }

    /// Everything below this position is durable in the tier (as far as this writer knows).
    pub fn uploaded_through(&self) -> u64 {
        self.uploaded_through
    }

    /// Writes `chunks` (consecutive, the first starting at `uploaded_through` or below it)
    /// with their index entries and the new uploaded-through mark, and returns once they
    /// are durable in the object store.
    pub async fn write_segment(&mut self, chunks: &[EventChunk]) -> Result<SegmentStats, TierError> {
        let encoded = chunks.iter().map(EncodedChunk::of).collect::<Result<Vec<_>, _>>()?;
        self.write_encoded(&encoded).await
    }

    /// [`TierWriter::write_segment`] of chunks already encoded.
    async fn write_encoded(&mut self, chunks: &[EncodedChunk]) -> Result<SegmentStats, TierError> {
        let mut batch = WriteBatch::new();
        let mut stats = SegmentStats::default();
        let mut end = self.uploaded_through;
        for chunk in chunks {
            assert!(!chunk.ids.is_empty(), "a chunk holds events");
            let last_position = chunk.end_position() - 1;
            let last_version = chunk.first_version + chunk.len() - 1;
            let key = layout::chunk(last_position);
            let value = record::seal(&key, &chunk.encoded);
            stats.bytes += value.len() as u64;
            batch.put(key, value);
            let key = layout::stream(&chunk.stream, last_version);
            let value = record::seal(&key, &layout::encode_span(chunk.first_position, last_position));
            batch.put(key, value);
            for (offset, id) in chunk.ids.iter().enumerate() {
                let key = layout::event_id(id);
                let position = chunk.first_position + offset as u64;
                batch.put(key, record::seal(&key, &position.to_be_bytes()));
            }
            stats.chunks += 1;
            stats.events += chunk.len();
            end = end.max(chunk.end_position());
        }
        batch.put(layout::UPLOADED, record::seal(layout::UPLOADED, &end.to_be_bytes()));
        let handle = self.db.write(batch).await?;
        self.durable(handle).await?;
        self.uploaded_through = end;
        Ok(stats)
    }

    /// Uploads the locally held events `[from, to)` of `state` (`from` is where the tier
    /// watermark is), at most about `max_bytes` of them: returns what was written and the
    /// end of it, durable in the tier once this returns.
    pub async fn upload(
        &mut self,
        state: &std::sync::Arc<crate::EventState>,
        from: u64,
        to: u64,
        max_bytes: usize,
    ) -> Result<(SegmentStats, u64), TierError> {
        let source = state.clone();
        let chunks = tokio::task::spawn_blocking(move || source.chunks_in(from, to, max_bytes))
            .await
            .map_err(|e| TierError::Store(format!("reading a segment failed: {e}")))??;
        let Some(end) = chunks.last().map(|c| c.end_position()) else { return Ok((SegmentStats::default(), from)) };
        let stats = self.write_encoded(&chunks).await?;
        Ok((stats, end))
    }

    /// How far `stream`'s tiered events were scavenged (0 if never).
    pub async fn scavenged_through(&self, stream: &str) -> Result<u64, TierError> {
        let key = layout::scavenged(stream);
        match self.db.get(&key).await? {
            None => Ok(0),
            Some(value) => {
                let payload = record::open("tier scavenge mark", &key, &value)?;
                layout::decode_u64(payload).ok_or_else(|| TierError::Corrupt(crate::StorageError::Corrupt { what: "tier scavenge mark", key: stream.into() }))
            }
        }
    }

    /// Rewrites `stream`'s tiered events from `from_version` below `before` as scavenged
    /// placeholders, at most about `max_events` of them, with the new scavenge mark; returns
    /// the events rewritten and the version reached, durable once this returns. Only the
    /// chunks below the uploaded-through mark are the tier's: the rest are still local.
    pub async fn scavenge_stream(&mut self, stream: &str, from_version: u64, before: u64, max_events: usize) -> Result<(u64, u64), TierError> {
        if from_version >= before {
            return Ok((0, from_version));
        }
        let range = (std::ops::Bound::Included(layout::stream(stream, from_version)), std::ops::Bound::Excluded(layout::stream(stream, u64::MAX)));
        let mut iter = self.db.scan_with_options(range, &slatedb::config::ScanOptions::default()).await?;
        let mut spans = Vec::new();
        while let Some(kv) = iter.next().await? {
            let payload = record::open("tier stream entry", &kv.key, &kv.value)?;
            let span = layout::decode_span(payload).ok_or_else(|| TierError::Corrupt(crate::StorageError::Corrupt { what: "tier stream entry", key: stream.into() }))?;
            spans.push(span);
            if spans.len() >= max_events.max(1) {
                break;
            }
        }
        drop(iter);
        let mut batch = WriteBatch::new();
        let mut rewritten = 0u64;
        let mut reached = before;
        for (_, last_position) in spans {
            let key = layout::chunk(last_position);
            let Some(value) = self.db.get(key).await? else {
                return Err(TierError::Corrupt(crate::StorageError::Corrupt { what: "tier stream entry points at a missing chunk", key: last_position.to_string() }));
            };
            let mut chunk: EventChunk = record::open_value("tier event chunk", &key, &value)?;
            if chunk.first_version >= before {
                break;
            }
            rewritten += chunk.scavenge_below(before);
            batch.put(key, record::seal_value("tier event chunk", &key, &chunk)?);
            if rewritten as usize >= max_events {
                reached = (chunk.first_version + chunk.len()).min(before);
                break;
            }
        }
        let mark_key = layout::scavenged(stream);
        batch.put(&mark_key, record::seal(&mark_key, &reached.to_be_bytes()));
        let handle = self.db.write(batch).await?;
        self.durable(handle).await?;
        Ok((rewritten, reached))
    }

    #[cfg(test)]
    pub(crate) fn db_for_tests(&self) -> &Db {
        &self.db
    }

    /// Closes the database (flushing what is buffered), giving up after the write timeout
    /// when the store is unreachable: nothing unflushed here is needed (the watermark only
    /// covers what was durable).
    pub async fn close(self) {
        match tokio::time::timeout(TIER_WRITE_TIMEOUT, self.db.close()).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => tracing::debug!(error = %e, "closing the tier writer failed"),
            Err(_) => tracing::warn!("closing the tier writer timed out; dropped"),
        }
    }
}
