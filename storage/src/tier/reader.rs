//! Every node's reader of the tier database.

use std::collections::HashMap;
use std::ops::Bound;
use std::sync::Arc;
use std::time::Duration;

use slatedb::config::{DbReaderOptions, ScanOptions};
use slatedb::{DbReader, DbReaderMode, IterationOrder};
use tokio::sync::{Mutex, Semaphore};

use super::cache::{ChunkCache, TIER_CACHE_BYTES};
use super::layout;
use super::store::TierStore;
use super::TierError;
use crate::chunk::EventChunk;
use crate::command::StoredEvent;
use crate::record;

/// Cold reads in flight at once on one node. Cold reads wait for the object store; they
/// get their own permits so they never hold up hot reads or appends, which do not take one.
pub const COLD_READS_MAX: usize = 16;
/// Longest one cold read may take before it fails as unavailable.
pub const COLD_READ_TIMEOUT: Duration = Duration::from_secs(20);
/// How often the reader looks for new data in the tier.
const READER_POLL: Duration = Duration::from_millis(250);
/// Chunks fetched by one scan for a point read (an id lookup, a stream's chunk): the
/// rest of a page comes from the cache.
const READ_AHEAD_CHUNKS: usize = 256;
/// Chunks fetched by one scan when `$all` is read forwards: opening a SlateDB iterator
/// costs a fetch from every sorted run it covers, so a sequential reader opens few
/// (about 24 MiB of 10-event chunks, inside `TIER_CACHE_BYTES`).
const SEQUENTIAL_READ_AHEAD_CHUNKS: usize = 8_192;
/// Object-store retries inside SlateDB before a read fails.
const STORE_RETRIES_MAX: u32 = 3;
/// Scope of the reader's entries in its SlateDB cache (the cache is its own).
const READER_CACHE_ID: u64 = 2;

/// A read-only view of the tier database, opened once the leader has created it.
pub struct TierReader {
    store: TierStore,
    reader: Mutex<Option<Arc<DbReader>>>,
    cache: ChunkCache,
    permits: Semaphore,
}

impl TierReader {
    pub fn new(store: TierStore) -> Self {
        Self { store, reader: Mutex::new(None), cache: ChunkCache::new(TIER_CACHE_BYTES), permits: Semaphore::new(COLD_READS_MAX) }
    }

    pub fn store(&self) -> &TierStore {
        &self.store
    }

    /// Bytes held by the read-through cache (at most [`TIER_CACHE_BYTES`]).
    pub fn cache_bytes(&self) -> usize {
        self.cache.bytes()
    }

    /// The SlateDB reader, or None while no leader has created the database yet.
    async fn reader(&self) -> Result<Option<Arc<DbReader>>, TierError> {
        let mut slot = self.reader.lock().await;
        if let Some(reader) = slot.as_ref() {
            return Ok(Some(reader.clone()));
        }
        // No manifest yet: no leader has created the database, so the tier is empty.
        let manifests = object_store::path::Path::from(format!("{}/manifest", self.store.db_path));
        let mut listing = self.store.object_store.list(Some(&manifests));
        if futures::StreamExt::next(&mut listing).await.transpose()?.is_none() {
            return Ok(None);
        }
        drop(listing);
        let options = DbReaderOptions {
            manifest_poll_interval: READER_POLL,
            object_store_max_retries: Some(STORE_RETRIES_MAX),
            ..DbReaderOptions::default()
        };
        // Following the latest manifest writes nothing to the store (no checkpoints from
        // every node); compacted files stay for SlateDB's GC minimum age (minutes), far
        // longer than the reader's poll, so a read never misses a file it was told of.
        let opened = DbReader::builder(self.store.db_path.clone(), self.store.object_store.clone())
            .with_options(options)
            .with_reader_mode(DbReaderMode::FollowLatest)
            .with_db_cache(super::store::slatedb_cache(super::store::READER_BLOCK_CACHE_BYTES), READER_CACHE_ID)
            .build()
            .await;
        match opened {
            Ok(reader) => {
                let reader = Arc::new(reader);
                *slot = Some(reader.clone());
                Ok(Some(reader))
            }
            Err(e) => Err(e.into()),
        }
    }

    /// Runs one cold read under a permit and the cold-read timeout.
    async fn bounded<T>(&self, read: impl Future<Output = Result<T, TierError>>) -> Result<T, TierError> {
        let _permit = self.permits.acquire().await.expect("the permit semaphore is never closed");
        tokio::time::timeout(COLD_READ_TIMEOUT, read)
            .await
            .map_err(|_| TierError::Store(format!("a cold read timed out after {COLD_READ_TIMEOUT:?}")))?
    }

    /// Everything below this position is readable here (0 before the first upload).
    pub async fn uploaded_through(&self) -> Result<u64, TierError> {
        self.bounded(async {
            let Some(reader) = self.reader().await? else { return Ok(0) };
            match reader.get(layout::UPLOADED).await? {
                None => Ok(0),
                Some(value) => {
                    let payload = record::open("tier uploaded mark", layout::UPLOADED, &value)?;
                    Ok(layout::decode_u64(payload).ok_or_else(|| corrupt("tier uploaded mark", layout::UPLOADED))?)
                }
            }
        })
        .await
    }

    /// Chunks in key order (or reversed) over `range`, at most `max`; each is verified
    /// and cached.
    async fn scan_chunks(
        &self,
        reader: &DbReader,
        range: (Bound<Vec<u8>>, Bound<Vec<u8>>),
        descending: bool,
        max: usize,
    ) -> Result<Vec<Arc<EventChunk>>, TierError> {
        let options = ScanOptions {
            order: if descending { IterationOrder::Descending } else { IterationOrder::Ascending },
            // Sequential scans fetch big parts of each SST, several at once; point reads
            // fetch what one page needs.
            read_ahead_bytes: if max >= SEQUENTIAL_READ_AHEAD_CHUNKS { 8 * 1024 * 1024 } else { 1024 * 1024 },
            max_fetch_tasks: if max >= SEQUENTIAL_READ_AHEAD_CHUNKS { 8 } else { 2 },
            ..ScanOptions::default()
        };
        let mut iter = reader.scan_with_options(range, &options).await?;
        let mut out = Vec::new();
        while out.len() < max {
            let Some(kv) = iter.next().await? else { break };
            let last = layout::decode_chunk_key(&kv.key).ok_or_else(|| corrupt("tier chunk key", &kv.key))?;
            let chunk: EventChunk = record::open_value("tier event chunk", &kv.key, &kv.value)?;
            if chunk.events.is_empty() || chunk.end_position() - 1 != last {
                return Err(corrupt("tier chunk under the wrong key", &kv.key));
            }
            let chunk = Arc::new(chunk);
            self.cache.insert(chunk.clone());
            out.push(chunk);
        }
        Ok(out)
    }

    /// The chunk holding `position`, reading ahead up to `READ_AHEAD_CHUNKS` following
    /// ones into the cache.
    async fn chunk_containing(&self, reader: &DbReader, position: u64) -> Result<Option<Arc<EventChunk>>, TierError> {
        self.chunk_containing_ahead(reader, position, READ_AHEAD_CHUNKS).await
    }

    async fn chunk_containing_ahead(&self, reader: &DbReader, position: u64, ahead: usize) -> Result<Option<Arc<EventChunk>>, TierError> {
        if let Some(chunk) = self.cache.containing(position) {
            return Ok(Some(chunk));
        }
        let range = (Bound::Included(layout::chunk(position).to_vec()), Bound::Included(layout::chunk(u64::MAX).to_vec()));
        let chunks = self.scan_chunks(reader, range, false, ahead).await?;
        Ok(chunks.into_iter().next().filter(|chunk| chunk.contains_position(position)))
    }

    /// Up to `max` consecutive events of `$all` from `from` (inclusive), forwards (only
    /// positions below `below`) or backwards.
    pub async fn read_all(&self, from: u64, backwards: bool, max: usize, below: u64) -> Result<Vec<StoredEvent>, TierError> {
        self.bounded(async {
            let mut out = Vec::new();
            if from >= below {
                return Ok(out);
            }
            let Some(reader) = self.reader().await? else { return Err(missing(from)) };
            let mut position = from;
            let ahead = if backwards { READ_AHEAD_CHUNKS } else { SEQUENTIAL_READ_AHEAD_CHUNKS };
            while out.len() < max {
                let chunk = self.chunk_containing_ahead(&reader, position, ahead).await?.ok_or_else(|| missing(position))?;
                if backwards {
                    for p in (chunk.first_position..=position).rev() {
                        if out.len() >= max {
                            break;
                        }
                        out.push(chunk.event_at(p));
                    }
                    if chunk.first_position == 0 {
                        break;
                    }
                    position = chunk.first_position - 1;
                } else {
                    for p in position..chunk.end_position().min(below) {
                        if out.len() >= max {
                            break;
                        }
                        out.push(chunk.event_at(p));
                    }
                    position = chunk.end_position();
                    if position >= below {
                        break;
                    }
                }
            }
            Ok(out)
        })
        .await
    }

    /// Up to `max` events of `stream` from `from_version` (inclusive), forwards or
    /// backwards, only those at positions below `below`.
    pub async fn read_stream(
        &self,
        stream: &str,
        from_version: u64,
        backwards: bool,
        max: usize,
        below: u64,
    ) -> Result<Vec<StoredEvent>, TierError> {
        self.bounded(async {
            let mut out: Vec<StoredEvent> = Vec::new();
            let Some(reader) = self.reader().await? else { return Ok(out) };
            let prefix = layout::stream_prefix(stream);
            let mut end = prefix.clone();
            *end.last_mut().expect("prefix ends with the separator") = 1;
            let from_key = layout::stream(stream, from_version);
            // The entry of the chunk holding `from_version` is the first at or after it.
            let first = (Bound::Included(from_key.clone()), Bound::Excluded(end.clone()));
            let mut spans = self.stream_spans(&reader, first, false, if backwards { 1 } else { usize::MAX }).await?;
            if backwards {
                let before = (Bound::Included(prefix), Bound::Excluded(from_key));
                spans.extend(self.stream_spans(&reader, before, true, usize::MAX).await?);
            }
            'spans: for (first, last) in spans {
                if first >= below {
                    if backwards {
                        continue;
                    }
                    break;
                }
                let chunk = match self.cache.containing(first) {
                    Some(chunk) => chunk,
                    None => self.chunk_containing(&reader, first).await?.ok_or_else(|| missing(first))?,
                };
                if chunk.stream != stream || chunk.first_position > first || chunk.end_position() <= last {
                    return Err(corrupt("tier stream entry points at another chunk", stream.as_bytes()));
                }
                let mut events: Vec<StoredEvent> =
                    (first..=last).filter(|p| *p < below).map(|p| chunk.event_at(p)).collect();
                if backwards {
                    events.reverse();
                }
                for event in events {
                    let wanted = if backwards { event.version <= from_version } else { event.version >= from_version };
                    // Entries never overlap, but a repeat must not be served twice.
                    let repeated = out.last().is_some_and(|last| {
                        if backwards { event.version >= last.version } else { event.version <= last.version }
                    });
                    if !wanted || repeated {
                        continue;
                    }
                    if out.len() >= max {
                        break 'spans;
                    }
                    out.push(event);
                }
            }
            Ok(out)
        })
        .await
    }

    async fn stream_spans(
        &self,
        reader: &DbReader,
        range: (Bound<Vec<u8>>, Bound<Vec<u8>>),
        descending: bool,
        max: usize,
    ) -> Result<Vec<(u64, u64)>, TierError> {
        let options = ScanOptions {
            order: if descending { IterationOrder::Descending } else { IterationOrder::Ascending },
            ..ScanOptions::default()
        };
        let mut iter = reader.scan_with_options(range, &options).await?;
        let mut out = Vec::new();
        while out.len() < max {
            let Some(kv) = iter.next().await? else { break };
            let payload = record::open("tier stream entry", &kv.key, &kv.value)?;
            out.push(layout::decode_span(payload).ok_or_else(|| corrupt("tier stream entry", &kv.key))?);
            // A forward page of a stream needs few spans at a time; the caller stops early.
            if out.len() >= READ_AHEAD_CHUNKS && !descending && max == usize::MAX {
                break;
            }
        }
        Ok(out)
    }

    /// The stored events of the ids that are in the tier (ids absent from it are absent
    /// from the answer).
    pub async fn lookup_ids(&self, ids: &[[u8; 16]]) -> Result<HashMap<[u8; 16], StoredEvent>, TierError> {
        self.bounded(async {
            let mut found = HashMap::new();
            let Some(reader) = self.reader().await? else { return Ok(found) };
            for id in ids {
                let key = layout::event_id(id);
                let Some(value) = reader.get(key).await? else { continue };
                let payload = record::open("tier event id entry", &key, &value)?;
                let position = layout::decode_u64(payload).ok_or_else(|| corrupt("tier event id entry", &key))?;
                let chunk = self.chunk_containing(&reader, position).await?.ok_or_else(|| missing(position))?;
                let event = chunk.event_at(position);
                if event.id != *id {
                    return Err(corrupt("tier event id entry points at another event", &key));
                }
                found.insert(*id, event);
            }
            Ok(found)
        })
        .await
    }
}

fn corrupt(what: &'static str, key: &[u8]) -> TierError {
    TierError::Corrupt(crate::StorageError::Corrupt { what, key: record::printable_key(key) })
}

fn missing(position: u64) -> TierError {
    TierError::Store(format!("the tier has no event at a position below its watermark position={position}"))
}
