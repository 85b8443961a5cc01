//! Reads of the whole history, hot and tiered, without the caller knowing which is which.
//!
//! The node holds positions from its floor up ([`EventState`]); below the floor, events
//! are in the object-store tier ([`TierReader`]), which holds everything below the tier
//! watermark (≥ floor). A read takes the floor from the local part it reads (under the
//! release lock), fetches what lies below it from the tier, and joins the two: tiered
//! history is immutable, so the joint answer is the one a node holding everything would
//! give. Hot reads never wait for the tier: they take no cold-read permit.
//!
//! Retention and deletion apply here too, for every reader alike: events a stream's
//! metadata hides (deleted, beyond `max_count`, older than `max_age`; see `retention`)
//! are not returned, whether or not the scavenge has removed them yet.

use std::sync::Arc;

use crate::command::{EventRef, PageSink, StoredEvent};
use crate::retention::StreamMeta;
use crate::state::{EventState, ReadAllOptions};
use crate::tier::{TierError, TierReader};
use crate::StorageError;

/// A stream page that would span the tier floor with a hole: the tier's part does not meet
/// the local part at version `needed` (it gave `got`). The tier reader is behind the history
/// the store has released to it, which a retry outgrows (UNAVAILABLE, retryable).
fn behind_the_floor(stream: &str, got: String, needed: u64) -> ReadError {
    ReadError::Tier(TierError::Store(format!(
        "the object-store tier's copy of {stream} gave {got} where version {needed} joins the locally held part: \
         the tier reader is behind the released history; retry"
    )))
}

fn now_ms() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as i64)
}

/// Streams whose metadata one `$all` page remembers (most pages touch few streams with
/// retention; beyond this many the cache starts over).
const PAGE_META_CACHE_STREAMS_MAX: usize = 1024;

/// What one `$all` page knows of the metadata of the streams it met: one metadata and
/// head read per stream with metadata and page, not one per event.
#[derive(Default)]
struct PageMetaCache {
    /// Per stream: its metadata and last version, or None if it has no metadata.
    streams: std::sync::Mutex<std::collections::HashMap<String, Option<MetaAndHead>>>,
}

type MetaAndHead = (StreamMeta, Option<u64>);

impl PageMetaCache {
    /// Whether `event` is visible by its stream's metadata at `now` (a metadata read that
    /// fails shows the event: a read error must not make history vanish).
    fn visible(&self, state: &EventState, event: &EventRef<'_>, now: i64) -> bool {
        if event.is_scavenged() {
            return false;
        }
        if !state.may_have_meta(event.stream) {
            return true;
        }
        let mut streams = self.streams.lock().expect("never poisoned");
        if !streams.contains_key(event.stream) {
            if streams.len() >= PAGE_META_CACHE_STREAMS_MAX {
                streams.clear();
            }
            let known = match state.stream_meta(event.stream) {
                Ok(Some(meta)) => Some((meta, state.stream_head(event.stream).ok().flatten().map(|h| h.last_version))),
                Ok(None) | Err(_) => None,
            };
            streams.insert(event.stream.to_owned(), known);
        }
        match &streams[event.stream] {
            None => true,
            Some((meta, last)) => meta.visible(event.version, event.created_unix_ms, *last, now),
        }
    }
}

/// Fewest events fetched from the tier per batch of a `$all` page.
const COLD_BATCH_EVENTS_MIN: usize = 1024;

/// A read failed in the local store or in the tier.
#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    #[error(transparent)]
    Storage(#[from] StorageError),
    #[error(transparent)]
    Tier(#[from] TierError),
}

/// An event predicate that can travel to a blocking read.
pub type SharedFilter = Arc<dyn Fn(&EventRef<'_>) -> bool + Send + Sync>;

/// A stream-name predicate that can travel to a blocking read.
pub type SharedStreamFilter = Arc<dyn Fn(&str) -> bool + Send + Sync>;

/// Which events a `$all` page returns: those of the streams `stream` accepts that `event`
/// accepts. The stream part is asked once per stored chunk, not per event, and the chunks
/// it rejects are not decoded: a prefix read skips other streams' history cheaply.
#[derive(Clone)]
pub struct AllFilter {
    pub stream: SharedStreamFilter,
    pub event: SharedFilter,
}

impl AllFilter {
    /// Every event `event` accepts, whatever its stream.
    pub fn events(event: SharedFilter) -> Self {
        Self { stream: Arc::new(|_| true), event }
    }

    pub fn matches(&self, event: &EventRef<'_>) -> bool {
        (self.stream)(event.stream) && (self.event)(event)
    }
}

/// Reads across the hot and the tiered part of history; cheap to clone.
#[derive(Clone)]
pub struct EventReader {
    state: Arc<EventState>,
    tier: Option<Arc<TierReader>>,
}

impl EventReader {
    pub fn new(state: Arc<EventState>, tier: Option<Arc<TierReader>>) -> Self {
        Self { state, tier }
    }

    pub fn state(&self) -> &Arc<EventState> {
        &self.state
    }

    fn tier_or_error(&self) -> Result<&Arc<TierReader>, ReadError> {
        self.tier.as_ref().ok_or_else(|| {
            ReadError::Tier(TierError::Unusable(
                "history below this node's floor is tiered, but no object store is configured".into(),
            ))
        })
    }

    async fn blocking<T: Send + 'static>(
        &self,
        read: impl FnOnce(&EventState) -> Result<T, StorageError> + Send + 'static,
    ) -> Result<T, ReadError> {
        let state = self.state.clone();
        tokio::task::spawn_blocking(move || read(&state))
            .await
            .map_err(|e| ReadError::Storage(StorageError::Io(std::io::Error::other(e))))?
            .map_err(ReadError::from)
    }

    /// Up to `limit` visible events of `stream` from `from_version` (inclusive), forwards
    /// or backwards, wherever they are stored.
    pub async fn read_stream(
        &self,
        stream: &str,
        from_version: u64,
        backwards: bool,
        limit: usize,
    ) -> Result<Vec<StoredEvent>, ReadError> {
        let name = stream.to_string();
        let (meta, head) = self.blocking(move |state| Ok((state.stream_meta(&name)?, state.stream_head(&name)?))).await?;
        let Some(meta) = meta else { return self.read_stream_stored(stream, from_version, backwards, limit).await };
        let last = head.map(|h| h.last_version);
        let first_visible = meta.first_visible_version(last);
        if meta.tombstone || last.is_none_or(|last| last < first_visible) {
            return Ok(Vec::new());
        }
        let now = now_ms();
        let mut from = if backwards { from_version } else { from_version.max(first_visible) };
        let mut out = Vec::new();
        // Aged-out events are filtered per event: read on until the page has some, or the
        // stream's end (or its first visible version, backwards) is reached.
        loop {
            if backwards && from < first_visible {
                return Ok(out);
            }
            let page = self.read_stream_stored(stream, from, backwards, limit - out.len()).await?;
            let Some(edge) = page.last().map(|e| e.version) else { return Ok(out) };
            let full = page.len() == limit - out.len();
            out.extend(page.into_iter().filter(|e| !e.is_scavenged() && meta.visible(e.version, e.created_unix_ms, last, now)));
            if out.len() >= limit || !full {
                return Ok(out);
            }
            from = match (backwards, edge) {
                (true, 0) => return Ok(out),
                (true, v) => v - 1,
                (false, v) => v + 1,
            };
        }
    }

    /// The version below which every stored event of `stream` from `from_version` on is
    /// older than `max_age_ms` at `now_ms`, looking at most at `max_events` events (it
    /// stops at the first younger one; events are appended in time order per stream).
    /// Cold events come from the tier.
    pub async fn aged_out_before(&self, stream: &str, from_version: u64, max_age_ms: u64, now_ms: i64, max_events: usize) -> Result<u64, ReadError> {
        let mut from = from_version;
        let mut looked = 0usize;
        while looked < max_events {
            let page = self.read_stream_stored(stream, from, false, (max_events - looked).min(1024)).await?;
            let Some(last) = page.last().map(|e| e.version) else { return Ok(from) };
            looked += page.len();
            if let Some(young) = page.iter().find(|e| !crate::retention::aged_out(e.created_unix_ms, max_age_ms, now_ms)) {
                return Ok(young.version);
            }
            from = last + 1;
        }
        Ok(from)
    }

    async fn read_stream_stored(
        &self,
        stream: &str,
        from_version: u64,
        backwards: bool,
        limit: usize,
    ) -> Result<Vec<StoredEvent>, ReadError> {
        let name = stream.to_string();
        let (local, floor, head) = self
            .blocking(move |state| {
                let (local, floor) = state.read_stream_local(&name, from_version, backwards, limit)?;
                Ok((local, floor, state.stream_head(&name)?))
            })
            .await?;
        let Some(head) = head else { return Ok(local) };
        // The stream has events below the floor only if it started below it.
        if head.first_position >= floor || from_version > head.last_version && !backwards {
            return Ok(local);
        }
        if backwards {
            if local.len() >= limit {
                return Ok(local);
            }
            let below = match local.last() {
                Some(last) if last.version == 0 => return Ok(local),
                Some(last) => last.version - 1,
                None => from_version.min(head.last_version),
            };
            let mut out = local;
            let cold = self.tier_or_error()?.read_stream(stream, below, true, limit - out.len(), floor).await?;
            // The mirror image of the forward check below: event `below` lies under the floor,
            // so the tier holds it; a tier part that starts lower (or is empty) comes from a tier
            // reader behind the released history and would leave a hole. Retryable.
            let started = cold.first().map(|event| event.version);
            if started != Some(below) {
                return Err(behind_the_floor(stream, started.map_or_else(|| "nothing".to_string(), |v| format!("version {v}")), below));
            }
            out.extend(cold);
            return Ok(out);
        }
        if local.first().is_some_and(|first| first.version <= from_version) {
            return Ok(local);
        }
        let mut out = self.tier_or_error()?.read_stream(stream, from_version, false, limit, floor).await?;
        // A short tier part must end where the local part begins: a tier reader behind the
        // released history returns a prefix, and the local events after it would leave a
        // hole in the page (the chaos `tier-corrupt` scenario saw exactly that). Retryable.
        if let Some(first_local) = local.first()
            && out.len() < limit
        {
            let reached = out.last().map_or(from_version, |event| event.version + 1);
            if reached < first_local.version {
                return Err(behind_the_floor(stream, format!("up to version {reached} (exclusive)"), first_local.version));
            }
        }
        let room = limit.saturating_sub(out.len());
        out.extend(local.into_iter().take(room));
        Ok(out)
    }

    /// A page of `$all` (see [`ReadAllOptions`]; the filter as an [`AllFilter`]): the
    /// matching events and where to continue (None at the visible end, or below 0).
    pub async fn read_all(
        &self,
        from_position: u64,
        backwards: bool,
        limit: usize,
        scan_limit: usize,
        filter: AllFilter,
    ) -> Result<(Vec<StoredEvent>, Option<u64>), ReadError> {
        self.read_all_into(from_position, backwards, limit, scan_limit, filter, Vec::new()).await
    }

    /// [`EventReader::read_all`] into `sink` (empty at first), which is handed back with
    /// where to continue. The page ends early when the sink [is full](PageSink::is_full).
    pub async fn read_all_into<S: PageSink + Send + 'static>(
        &self,
        from_position: u64,
        backwards: bool,
        limit: usize,
        scan_limit: usize,
        filter: AllFilter,
        sink: S,
    ) -> Result<(S, Option<u64>), ReadError> {
        // Events hidden by their stream's retention or deletion are not part of any page.
        let state = self.state.clone();
        let now = now_ms();
        let user = filter.event;
        let metas = PageMetaCache::default();
        let filter = AllFilter {
            stream: filter.stream,
            event: Arc::new(move |event: &EventRef<'_>| metas.visible(&state, event, now) && user(event)),
        };
        let visible = self.state.next_position();
        let mut sink = sink;
        let mut from = if backwards {
            if visible == 0 {
                return Ok((sink, None));
            }
            from_position.min(visible - 1)
        } else {
            if from_position >= visible {
                return Ok((sink, None));
            }
            from_position
        };
        let mut scanned = 0usize;
        loop {
            let floor = self.state.floor();
            if from >= floor {
                let (scan_left, shared) = (scan_limit.saturating_sub(scanned).max(1), filter.clone());
                let (returned, next, floor_at_read) = self
                    .blocking(move |state| {
                        let options = ReadAllOptions {
                            from_position: from,
                            backwards,
                            limit,
                            scan_limit: scan_left,
                            stream_filter: &*shared.stream,
                            filter: &*shared.event,
                        };
                        let (next, floor_at_read) = state.read_all_local_into(&options, &mut sink)?;
                        Ok((sink, next, floor_at_read))
                    })
                    .await?;
                sink = returned;
                if floor_at_read > from {
                    continue; // released meanwhile (nothing was read): the gap is in the tier now
                }
                // Backwards, a local read that reached the floor continues below it.
                match next {
                    Some(next) if backwards && next < floor_at_read && sink.len() < limit && !sink.is_full() => {
                        scanned += (from - next) as usize; // positions the local part covered
                        if scanned >= scan_limit {
                            return Ok((sink, Some(next)));
                        }
                        from = next;
                        continue;
                    }
                    _ => return Ok((sink, next)),
                }
            }
            // Below the floor: from the tier, in bounded batches of about what the page still
            // needs (a filter that matches rarely takes more batches, up to the scan budget).
            let budget = (scan_limit.saturating_sub(scanned)).max(1).min((limit - sink.len()).max(COLD_BATCH_EVENTS_MIN));
            let tier = self.tier_or_error()?;
            let cold = tier.read_all(from, backwards, budget, floor).await?;
            let Some(last) = cold.last().map(|e| e.position) else {
                return Err(ReadError::Tier(TierError::Store(format!(
                    "the tier returned nothing below its watermark position={from}"
                ))));
            };
            for event in cold {
                scanned += 1;
                let position = event.position;
                if filter.matches(&event.as_event_ref()) {
                    sink.push_stored(event);
                }
                if sink.len() >= limit || sink.is_full() {
                    let next = if backwards { position.checked_sub(1) } else { Some(position + 1).filter(|n| *n < visible) };
                    return Ok((sink, next));
                }
            }
            let next = if backwards { last.checked_sub(1) } else { Some(last + 1).filter(|n| *n < visible) };
            match next {
                None => return Ok((sink, None)),
                Some(next) if scanned >= scan_limit => return Ok((sink, Some(next))),
                Some(next) => from = next,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::command::{AppendCommand, Command, ExpectedVersion, NewEvent};
    use crate::control::ControlCommand;
    use crate::tier::{TierStore, TierStoreConfig, TierWriter};

    fn append(stream: &str, first_id: u64, count: u64) -> AppendCommand {
        AppendCommand {
            stream: stream.into(),
            expected: ExpectedVersion::Any,
            events: (first_id..first_id + count)
                .map(|n| {
                    let mut id = [0u8; 16];
                    id[..8].copy_from_slice(&(n + 1).to_be_bytes());
                    NewEvent { id, event_type: format!("t{}", n % 3), content_type: String::new(), data: vec![n as u8], metadata: vec![] }
                })
                .collect(),
            created_unix_ms: 7,
        }
    }

    /// 60 events in chunks of 1-3 over streams s0..s2 (s0 holds one event in each of the
    /// positions 0, 6, 12, ...), with every event as stored, in position order.
    fn filled(dir: &std::path::Path) -> (Arc<EventState>, Vec<StoredEvent>) {
        let db = crate::open_database(&dir.join("node")).unwrap();
        let state = Arc::new(EventState::open(&db, &dir.join("node")).unwrap());
        let mut n = 0;
        let mut i = 0;
        while n < 60 {
            let count = (i % 3 + 1).min(60 - n);
            state.apply(Some(&Command::appends(vec![append(&format!("s{}", i % 3), n, count)])), b"m").unwrap();
            n += count;
            i += 1;
        }
        let everything = state.read_stream("s0", 0, false, 1000).unwrap().len();
        assert!(everything > 0);
        let (all, _) = state.read_all(&ReadAllOptions { from_position: 0, backwards: false, limit: 1000, scan_limit: 1000, stream_filter: &|_| true, filter: &|_| true }).unwrap();
        (state, all)
    }

    /// A tier in `dir/name` holding [0, watermark) of `state`, and a reader that sees all of it.
    async fn uploaded(state: &Arc<EventState>, dir: &std::path::Path, name: &str, watermark: u64) -> Arc<TierReader> {
        let store = TierStore::open(&TierStoreConfig { url: format!("file://{}", dir.join(name).display()), ..Default::default() }).unwrap();
        let mut writer = TierWriter::open(&store, 1, 1).await.unwrap();
        let mut at = 0;
        while at < watermark {
            let (_, end) = writer.upload(state, at, watermark, 200).await.unwrap();
            at = end;
        }
        assert_eq!(at, watermark, "segments end exactly at the watermark");
        let tier = Arc::new(TierReader::new(store));
        while tier.uploaded_through().await.unwrap() < watermark {
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
        tier
    }

    /// [0, watermark) uploaded and released.
    async fn tiered(dir: &std::path::Path, watermark: u64) -> (EventReader, Vec<StoredEvent>) {
        let (state, all) = filled(dir);
        let tier = uploaded(&state, dir, "tier", watermark).await;
        release(&state, watermark);
        (EventReader::new(state, Some(tier)), all)
    }

    fn release(state: &EventState, watermark: u64) {
        let advance = ControlCommand::AdvanceTier { from: 0, to: watermark, segments: 1, bytes: 1, updated_unix_ms: 1 };
        state.apply_control(advance, b"m").unwrap().unwrap();
        state.release_below(watermark).unwrap();
        assert!(state.floor() > 0 && state.floor() <= watermark);
    }

    #[tokio::test]
    async fn reads_across_the_floor_equal_reads_of_a_node_holding_everything() {
        let dir = tempfile::tempdir().unwrap();
        let (reader, all) = tiered(dir.path(), 31).await;
        let everything = AllFilter::events(Arc::new(|_| true));
        for from in [0, 5, 29, 31, 40] {
            let (page, _) = reader.read_all(from, false, 1000, 1000, everything.clone()).await.unwrap();
            assert_eq!(page, all[from as usize..].to_vec(), "forward from {from}");
            let (page, next) = reader.read_all(from, true, 1000, 1000, everything.clone()).await.unwrap();
            let mut expected = all[..=from as usize].to_vec();
            expected.reverse();
            assert_eq!((page, next), (expected, None), "backward from {from}");
        }
        // Pages join without gaps or repeats, filtered.
        let odd = AllFilter::events(Arc::new(|e: &EventRef<'_>| e.event_type == "t1"));
        let (mut got, mut next) = (Vec::new(), Some(0));
        while let Some(from) = next {
            let (page, n) = reader.read_all(from, false, 4, 7, odd.clone()).await.unwrap();
            got.extend(page);
            next = n;
        }
        assert_eq!(got, all.iter().filter(|e| e.event_type == "t1").cloned().collect::<Vec<_>>());
        // A stream filter skips other streams' chunks, on both sides of the floor, forward
        // and backward, and pages still join without gaps or repeats.
        let s1_t1 = AllFilter { stream: Arc::new(|s: &str| s == "s1"), event: Arc::new(|e: &EventRef<'_>| e.event_type != "t1") };
        let expected: Vec<StoredEvent> = all.iter().filter(|e| e.stream == "s1" && e.event_type != "t1").cloned().collect();
        for backwards in [false, true] {
            let (mut got, mut next) = (Vec::new(), Some(if backwards { all.len() as u64 - 1 } else { 0 }));
            while let Some(from) = next {
                let (page, n) = reader.read_all(from, backwards, 3, 5, s1_t1.clone()).await.unwrap();
                got.extend(page);
                next = n;
            }
            if backwards {
                got.reverse();
            }
            assert_eq!(got, expected, "stream-filtered, backwards: {backwards}");
        }
        for stream in ["s0", "s1", "s2"] {
            let expected: Vec<StoredEvent> = all.iter().filter(|e| e.stream == stream).cloned().collect();
            for from in [0, 3, expected.len() as u64 - 1] {
                let page = reader.read_stream(stream, from, false, 1000).await.unwrap();
                assert_eq!(page, expected[from as usize..].to_vec(), "{stream} forward from {from}");
                let page = reader.read_stream(stream, from, true, 1000).await.unwrap();
                let mut back = expected[..=from as usize].to_vec();
                back.reverse();
                assert_eq!(page, back, "{stream} backward from {from}");
            }
            let limited = reader.read_stream(stream, 1, false, 3).await.unwrap();
            assert_eq!(limited, expected[1..4].to_vec());
        }
    }

    #[tokio::test]
    async fn without_a_tier_cold_reads_fail_clearly() {
        let dir = tempfile::tempdir().unwrap();
        let (reader, _) = tiered(dir.path(), 20).await;
        let blind = EventReader::new(reader.state().clone(), None);
        let err = blind.read_all(0, false, 10, 10, AllFilter::events(Arc::new(|_| true))).await.unwrap_err();
        assert!(err.to_string().contains("no object store is configured"), "{err}");
    }

    /// A tier reader that has not caught up with the history released to the tier must not
    /// make a stream page that spans the floor skip the part it lacks: the read fails,
    /// retryably, forward and backward (the chaos `tier-corrupt` scenario found the forward
    /// case serving holes).
    #[tokio::test]
    async fn a_tier_reader_behind_the_floor_fails_spanning_stream_reads_retryably() {
        let dir = tempfile::tempdir().unwrap();
        let (state, all) = filled(dir.path());
        // The same history, but only [0, 12) of it: s0's versions 0 and 1.
        let behind = uploaded(&state, dir.path(), "tier-behind", 12).await;
        drop(uploaded(&state, dir.path(), "tier", 31).await);
        release(&state, 31);
        let reader = EventReader::new(state, Some(behind));
        let s0: Vec<StoredEvent> = all.iter().filter(|e| e.stream == "s0").cloned().collect();
        let retryable = |err: ReadError| assert!(matches!(err, ReadError::Tier(TierError::Store(ref m)) if m.contains("behind")), "{err}");
        retryable(reader.read_stream("s0", 0, false, 1000).await.unwrap_err());
        retryable(reader.read_stream("s0", s0.len() as u64 - 1, true, 1000).await.unwrap_err());
        // What the lagging tier does hold is still served, and the local part needs no tier.
        assert_eq!(reader.read_stream("s0", 0, false, 2).await.unwrap(), s0[..2].to_vec());
        let local_from = s0.iter().find(|e| e.position >= 31).unwrap().version;
        assert_eq!(reader.read_stream("s0", local_from, false, 1000).await.unwrap(), s0[local_from as usize..].to_vec());
    }
}
