//! Tiering on this node (SPEC §7): the leader's uploader of settled segments, every
//! node's release of local history below the tier watermark, and what status reports.
//!
//! The uploader keeps, for the hot part of history, one mark per chunk (extent, bytes,
//! age) so that deciding what left the hot window never rereads payloads. A segment is
//! written to the tier and awaited until durable in the object store; only then is
//! `AdvanceTier{from, to}` proposed, which applies only if the watermark is still `from`.
//! So a leader change mid-upload repeats at most one segment's writes and never loses one,
//! and a crash between upload and commit re-uploads the same bytes.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use openraft::async_runtime::WatchReceiver;
use strata_raft::StateMachine;
use strata_storage::tier::{TierReader, TierStore, TierWriter};
use strata_storage::{ChunkMark, ControlCommand, ControlSuccess, EventState};
use tokio::sync::watch;

use crate::clock::now_unix_ms;
use crate::control::propose;
use crate::error::ApiError;
use crate::metrics::Metrics;
use crate::routing::Router;

/// How often the leader looks for settled history to upload.
pub const TIER_TICK: Duration = Duration::from_millis(200);
/// How often every node checks whether it may drop local history below the watermark.
pub const RELEASE_TICK: Duration = Duration::from_millis(500);
/// Most events in one segment (one tier write, one watermark commit).
pub const SEGMENT_EVENTS_MAX: u64 = 64 * 1024;
/// Most encoded bytes in one segment.
pub const SEGMENT_BYTES_MAX: usize = 16 * 1024 * 1024;
/// Chunk marks the uploader holds (one per append in the hot window). Beyond it the
/// oldest chunks count as settled whatever the window says: bounds the leader's memory
/// when the window holds very many small appends.
pub const TIER_MARKS_MAX: usize = 1_000_000;
/// Chunk marks read per tick (the rest next tick): bounds one tick's work.
const MARKS_PER_TICK_MAX: usize = 100_000;
/// What an append refused for the tiering backlog is told to wait.
const BACKLOG_RETRY_AFTER_MS: u64 = 1_000;
/// Settled events the uploader lets gather before it uploads them (unless asked to tier
/// now, or they have waited `UPLOAD_BATCH_WAIT`): every upload is one L0 table in the tier
/// and one flush, so fewer, larger uploads cost the leader's appends less CPU and the
/// tier's compactor fewer merges.
const UPLOAD_BATCH_EVENTS: u64 = 32 * 1024;
/// Longest settled events wait for a batch to gather.
const UPLOAD_BATCH_WAIT: Duration = Duration::from_secs(2);
/// Pause after a failed upload before the writer is reopened.
const UPLOAD_RETRY_PAUSE: Duration = Duration::from_secs(1);

/// When an event leaves the hot window: once this many newer events, or bytes of newer
/// events, follow it, or once it is this old; whichever comes first.
#[derive(Debug, Clone, Copy)]
pub struct HotWindow {
    pub events: u64,
    pub bytes: u64,
    pub age: Duration,
}

/// The tier of this node: the store, its reader, and the uploader's shared state.
pub struct TierRuntime {
    pub store: TierStore,
    pub reader: Arc<TierReader>,
    pub window: HotWindow,
    /// How often the leader scavenges the tier (`--scavenge-interval`).
    pub scavenge_interval: Duration,
    /// Tier at least up to here now (Cluster.Tier), whatever the window.
    forced_to: AtomicU64,
    /// Settled events above the watermark (the leader's last look), and its bound.
    backlog_events: AtomicU64,
    backlog_limit: u64,
    /// The replicated watermark as last seen here (kept fresh by the release loop).
    watermark_seen: AtomicU64,
    last_error: Mutex<String>,
}

impl TierRuntime {
    /// Opens the store and checks it can hold the tier (conditional writes).
    pub async fn open(
        config: &strata_storage::tier::TierStoreConfig,
        window: HotWindow,
        backlog_limit: u64,
        scavenge_interval: Duration,
    ) -> anyhow::Result<Arc<Self>> {
        let store = TierStore::open(config)?;
        store.check_conditional_writes().await?;
        Ok(Arc::new(Self {
            reader: Arc::new(TierReader::new(store.clone())),
            store,
            window,
            scavenge_interval,
            forced_to: AtomicU64::new(0),
            backlog_events: AtomicU64::new(0),
            backlog_limit,
            watermark_seen: AtomicU64::new(0),
            last_error: Mutex::new(String::new()),
        }))
    }

    /// Asks the uploader to tier everything below `position`.
    pub fn force_to(&self, position: u64) {
        self.forced_to.fetch_max(position, Ordering::AcqRel);
    }

    /// Refuses an append while the settled events waiting for the tier exceed the
    /// backlog bound (back-pressure instead of an unbounded hot tier). `head` is the next
    /// position: while an upload hangs on an unreachable store, the uploader cannot
    /// refresh its count, so events beyond the window by count alone count too.
    pub fn check_backlog(&self, head: u64) -> Result<(), ApiError> {
        let by_count = head.saturating_sub(self.watermark_seen.load(Ordering::Acquire).saturating_add(self.window.events));
        if self.backlog_events.load(Ordering::Acquire).max(by_count) > self.backlog_limit {
            return Err(ApiError::Overloaded {
                limit_name: "TIER_BACKLOG_EVENTS_MAX",
                limit_value: self.backlog_limit,
                retry_after_ms: BACKLOG_RETRY_AFTER_MS,
            });
        }
        Ok(())
    }

    pub fn last_error(&self) -> String {
        self.last_error.lock().expect("never poisoned").clone()
    }

    fn set_error(&self, error: String) {
        *self.last_error.lock().expect("never poisoned") = error;
    }
}

/// The status message of the tier as this node sees it.
pub fn tier_status(events: &EventState, runtime: Option<&TierRuntime>) -> strata_proto::v1::TierStatus {
    let state = events.tier_state().unwrap_or_default();
    strata_proto::v1::TierStatus {
        enabled: runtime.is_some(),
        object_store: runtime.map(|r| r.store.description.clone()).unwrap_or_default(),
        watermark: state.watermark,
        local_floor: events.floor(),
        upload_lag_events: events.next_position().saturating_sub(state.watermark),
        segments: state.segments,
        bytes: state.bytes,
        last_error: runtime.map(|r| r.last_error()).unwrap_or_default(),
    }
}

/// The hot part of history as the uploader tracks it.
struct Marks {
    marks: VecDeque<ChunkMark>,
    /// Marks cover `[start, end)`.
    end: u64,
    bytes: u64,
}

impl Marks {
    fn new() -> Self {
        Self { marks: VecDeque::new(), end: 0, bytes: 0 }
    }

    /// Drops marks below `watermark` (cutting one that straddles it).
    fn advance_to(&mut self, watermark: u64) {
        if self.end < watermark {
            self.marks.clear();
            self.bytes = 0;
            self.end = watermark;
            return;
        }
        while let Some(front) = self.marks.front_mut() {
            if front.end_position <= watermark {
                self.bytes -= front.bytes;
                self.marks.pop_front();
            } else {
                front.first_position = front.first_position.max(watermark);
                break;
            }
        }
    }

    fn extend(&mut self, new: Vec<ChunkMark>) {
        for mark in new {
            self.end = mark.end_position;
            self.bytes += mark.bytes;
            self.marks.push_back(mark);
        }
    }

    /// The end of the settled prefix: chunks beyond the window by count, bytes or age.
    fn settled_end(&self, watermark: u64, head: u64, window: HotWindow, now_ms: i64) -> u64 {
        let age_cutoff = now_ms.saturating_sub(window.age.as_millis().min(i64::MAX as u128) as i64);
        let overflow = self.marks.len().saturating_sub(TIER_MARKS_MAX);
        let mut end = watermark;
        let mut bytes_after = self.bytes;
        for (index, mark) in self.marks.iter().enumerate() {
            bytes_after -= mark.bytes;
            let settled = index < overflow
                || head - mark.end_position >= window.events
                || bytes_after >= window.bytes
                || mark.created_unix_ms < age_cutoff;
            if !settled {
                break;
            }
            end = mark.end_position;
        }
        end
    }
}

/// Niceness of the uploader's threads (0 is the appends'). Uploads, and the SlateDB
/// flushes and compactions they start, are background work: when the CPU is short they
/// give way to appends, and catch up when it is not (settled events wait in the hot tier,
/// bounded by the backlog limit, which pushes back on appends only if uploads fall that
/// far behind). RocksDB lowers its compaction threads the same way.
const UPLOAD_THREAD_NICE: i32 = 5;
/// Worker threads of the uploader's runtime (SlateDB's background tasks run there too).
const UPLOAD_RUNTIME_THREADS: usize = 1;

/// Starts the uploader on a runtime of its own whose threads run at `UPLOAD_THREAD_NICE`.
pub fn spawn_uploader(
    router: Router,
    events: Arc<EventState>,
    runtime: Arc<TierRuntime>,
    metrics: Arc<Metrics>,
    shutdown: watch::Receiver<bool>,
) -> std::io::Result<()> {
    let tokio_runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(UPLOAD_RUNTIME_THREADS)
        .thread_name("strata-tier")
        .on_thread_start(lower_this_threads_priority)
        .enable_all()
        .build()?;
    std::thread::Builder::new().name("strata-tier-main".into()).spawn(move || {
        lower_this_threads_priority();
        tokio_runtime.block_on(run_uploader(router, events, runtime, metrics, shutdown));
        // Background tasks (SlateDB's) are not waited for: the writer was closed above.
        tokio_runtime.shutdown_background();
    })?;
    Ok(())
}

fn lower_this_threads_priority() {
    // SAFETY: setpriority on this thread's own id; no memory is passed.
    let result = unsafe { libc::setpriority(libc::PRIO_PROCESS, libc::gettid() as libc::id_t, UPLOAD_THREAD_NICE) };
    if result != 0 {
        tracing::debug!(error = %std::io::Error::last_os_error(), "could not lower the uploader's priority");
    }
}

/// The leader's uploader: runs on every node, works while the node leads.
pub async fn run_uploader(
    router: Router,
    events: Arc<EventState>,
    runtime: Arc<TierRuntime>,
    metrics: Arc<Metrics>,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut writer: Option<(TierWriter, u64)> = None;
    let mut marks = Marks::new();
    let mut batch = Batch::default();
    let mut last_scavenge = std::time::Instant::now();
    loop {
        tokio::select! {
            _ = tokio::time::sleep(TIER_TICK) => {}
            _ = shutdown.changed() => break,
        }
        let raft_metrics = router.raft.metrics().borrow_watched().clone();
        if raft_metrics.current_leader != Some(router.node_id) {
            runtime.backlog_events.store(0, Ordering::Release);
            if let Some((old, _)) = writer.take() {
                old.close().await;
            }
            marks = Marks::new();
            batch = Batch::default();
            continue;
        }
        let term = raft_metrics.current_term;
        let mut outcome = upload_settled(&router, &events, &runtime, &metrics, &mut writer, &mut marks, &mut batch, term).await;
        if outcome.is_ok() && last_scavenge.elapsed() >= runtime.scavenge_interval {
            last_scavenge = std::time::Instant::now();
            outcome = scavenge_tier(&router, &events, &runtime, &metrics, &mut writer, term).await;
        }
        if let Err(e) = outcome {
            metrics.tier_upload_failures_total.inc();
            tracing::warn!(error = %e, "tier upload failed; the events stay hot and are retried");
            runtime.set_error(e.to_string());
            if let Some((old, _)) = writer.take() {
                old.close().await;
            }
            tokio::time::sleep(UPLOAD_RETRY_PAUSE).await;
        }
    }
    if let Some((old, _)) = writer.take() {
        old.close().await;
    }
}

async fn upload_settled(
    router: &Router,
    events: &Arc<EventState>,
    runtime: &TierRuntime,
    metrics: &Metrics,
    writer: &mut Option<(TierWriter, u64)>,
    marks: &mut Marks,
    batch: &mut Batch,
    term: u64,
) -> anyhow::Result<()> {
    let mut watermark = events.tier_state()?.watermark;
    runtime.watermark_seen.store(watermark, Ordering::Release);
    let head = events.next_position();
    metrics.tier_upload_lag_events.set(head.saturating_sub(watermark) as i64);
    marks.advance_to(watermark);
    if marks.end < head {
        let (source, from) = (events.clone(), marks.end);
        let new = tokio::task::spawn_blocking(move || source.chunk_marks(from, head, MARKS_PER_TICK_MAX)).await??;
        marks.extend(new);
    }
    let forced = runtime.forced_to.load(Ordering::Acquire).min(head);
    let settled = marks.settled_end(watermark, head, runtime.window, now_unix_ms());
    runtime.backlog_events.store(settled.saturating_sub(watermark), Ordering::Release);
    let target = settled.max(forced);
    if target <= watermark || !batch.ready(target - watermark, forced > watermark) {
        return Ok(());
    }
    *batch = Batch::default();
    let tier_writer = ensure_writer(router, runtime, writer, term).await?;
    while watermark < target {
        let started = std::time::Instant::now();
        let segment_end = target.min(watermark + SEGMENT_EVENTS_MAX);
        let (stats, end) = tier_writer.upload(events, watermark, segment_end, SEGMENT_BYTES_MAX).await?;
        if end <= watermark {
            break;
        }
        let advance = ControlCommand::AdvanceTier { from: watermark, to: end, segments: 1, bytes: stats.bytes, updated_unix_ms: now_unix_ms() };
        match propose(router, advance).await {
            Ok(applied) => {
                let ControlSuccess::Tier(state) = applied.success else {
                    anyhow::bail!("advance_tier applied with an unexpected outcome");
                };
                metrics.tier_upload_seconds.observe(started.elapsed().as_secs_f64());
                metrics.tier_uploaded_segments_total.inc();
                metrics.tier_uploaded_bytes_total.inc_by(stats.bytes);
                metrics.tier_uploaded_events_total.inc_by(stats.events);
                tracing::debug!(from = watermark, to = state.watermark, events = stats.events, bytes = stats.bytes, "segment tiered");
                watermark = state.watermark;
                runtime.set_error(String::new());
            }
            Err(ApiError::TierWatermarkMoved { actual, .. }) => {
                // Another upload committed first (a previous term's): go on from there.
                tracing::info!(actual, "tier watermark moved under this upload; continuing from it");
                watermark = actual;
            }
            Err(e) => return Err(e.into()),
        }
        marks.advance_to(watermark);
        metrics.tier_watermark.set(watermark as i64);
        runtime.backlog_events.store(settled.saturating_sub(watermark), Ordering::Release);
    }
    Ok(())
}

/// When settled events are worth an upload: enough of them, or waiting long enough.
#[derive(Default)]
struct Batch {
    /// When the uploader first saw settled events it did not upload yet.
    waiting_since: Option<std::time::Instant>,
}

impl Batch {
    fn ready(&mut self, settled_events: u64, forced: bool) -> bool {
        let since = *self.waiting_since.get_or_insert_with(std::time::Instant::now);
        forced || settled_events >= UPLOAD_BATCH_EVENTS || since.elapsed() >= UPLOAD_BATCH_WAIT
    }
}

/// The tier writer of this leader's `term`, opened (and the tier claimed) if needed.
async fn ensure_writer<'w>(
    router: &Router,
    runtime: &TierRuntime,
    writer: &'w mut Option<(TierWriter, u64)>,
    term: u64,
) -> anyhow::Result<&'w mut TierWriter> {
    if writer.as_ref().is_none_or(|(_, claimed)| *claimed != term) {
        if let Some((old, _)) = writer.take() {
            old.close().await;
        }
        // Only a leader confirmed by a quorum claims the tier: a deposed leader that has
        // not noticed yet cannot take the database from the new one.
        router.linearize().await?;
        *writer = Some((TierWriter::open(&runtime.store, term, router.node_id).await?, term));
        tracing::info!(term, store = %runtime.store.description, "tier writer opened");
    }
    Ok(&mut writer.as_mut().expect("opened above").0)
}

/// Step 3 of the scavenge (`crate::scavenge`), on the leader: rewrites the tiered
/// events below each stream's replicated scavenge point as placeholders. (Uploads put
/// what was already scavenged up as placeholders, so the tier's own mark only moves up.)
async fn scavenge_tier(
    router: &Router,
    events: &EventState,
    runtime: &TierRuntime,
    metrics: &Metrics,
    writer: &mut Option<(TierWriter, u64)>,
    term: u64,
) -> anyhow::Result<()> {
    for stream in events.streams_with_meta().into_iter().take(crate::scavenge::SCAVENGE_STREAMS_PER_PASS_MAX) {
        let Some(meta) = events.stream_meta(&stream)? else { continue };
        if meta.scavenged_before == 0 {
            continue;
        }
        let tier_writer = ensure_writer(router, runtime, writer, term).await?;
        let mut from = tier_writer.scavenged_through(&stream).await?;
        while from < meta.scavenged_before {
            let (rewritten, reached) = tier_writer.scavenge_stream(&stream, from, meta.scavenged_before, crate::scavenge::SCAVENGE_EVENTS_PER_STEP).await?;
            metrics.scavenged_events_total.with_label_values(&["tier"]).inc_by(rewritten);
            if rewritten > 0 {
                tracing::info!(stream, events = rewritten, through = reached, "scavenge: dropped payloads from the tier");
            }
            if reached <= from {
                break;
            }
            from = reached;
        }
    }
    Ok(())
}

/// Every node: drops local history below the watermark once its tier reader sees it, and
/// compacts the local state's database when the churn has grown it.
pub async fn run_releaser(
    machine: StateMachine,
    events: Arc<EventState>,
    runtime: Arc<TierRuntime>,
    metrics: Arc<Metrics>,
    mut shutdown: watch::Receiver<bool>,
) {
    loop {
        tokio::select! {
            _ = tokio::time::sleep(RELEASE_TICK) => {}
            _ = shutdown.changed() => {
                // A clean stop stores the id filter: the next start has no gap to re-read.
                if let Err(e) = events.store_id_filter_if_due(true) {
                    tracing::warn!(error = %e, "storing the id filter at shutdown failed");
                }
                break;
            }
        }
        // Releases churn the state's database, which sled does not give back: a
        // compaction into a fresh generation does (see `strata_storage::state_home`).
        match machine.compact_state().await {
            Ok(true) => metrics.state_compactions_total.inc(),
            Ok(false) => {}
            Err(e) => tracing::error!(error = %e, "compacting the applied state failed"),
        }
        let watermark = match events.tier_state() {
            Ok(state) => state.watermark,
            Err(e) => {
                tracing::error!(error = %e, "reading the tier state failed");
                continue;
            }
        };
        metrics.tier_watermark.set(watermark as i64);
        metrics.tier_local_floor.set(events.floor() as i64);
        runtime.watermark_seen.store(watermark, Ordering::Release);
        if watermark <= events.floor() {
            continue;
        }
        // Only what this node can already read back from the tier leaves its disk.
        match runtime.reader.uploaded_through().await {
            Ok(visible) if visible >= watermark => {}
            Ok(_) => continue,
            Err(e) => {
                tracing::debug!(error = %e, "tier not readable yet; keeping local history");
                continue;
            }
        }
        match machine.release_tiered(watermark).await {
            Ok(0) => {}
            Ok(released) => {
                let state = events.clone();
                match tokio::task::spawn_blocking(move || state.store_id_filter_if_due(false)).await {
                    Ok(Ok(true)) => tracing::debug!("id filter stored"),
                    Ok(Ok(false)) => {}
                    Ok(Err(e)) => tracing::warn!(error = %e, "storing the id filter failed"),
                    Err(e) => tracing::warn!(error = %e, "storing the id filter failed"),
                }
                metrics.tier_released_events_total.inc_by(released);
                metrics.tier_local_floor.set(events.floor() as i64);
                tracing::debug!(released, floor = events.floor(), watermark, "local history released to the tier");
            }
            Err(e) => tracing::error!(error = %e, "releasing local history failed"),
        }
    }
}

/// Events applied after which a tiering node builds a Raft snapshot (and purges its log
/// below it) whatever openraft's entry count says: an entry carries a whole batch of
/// appends, so the entry policy alone kept millions of events in the Raft log, which is
/// then the bulk of a node's disk. With tiering the snapshot holds only the hot part.
pub const SNAPSHOT_AFTER_EVENTS: u64 = 500_000;
/// How often the snapshot trigger looks.
const SNAPSHOT_CHECK: Duration = Duration::from_secs(5);

/// Every tiering node: builds a Raft snapshot once `SNAPSHOT_AFTER_EVENTS` were applied
/// since the last one this task asked for.
pub async fn run_snapshot_trigger(raft: strata_raft::Raft, events: Arc<EventState>, mut shutdown: watch::Receiver<bool>) {
    let mut last = events.next_position();
    loop {
        tokio::select! {
            _ = tokio::time::sleep(SNAPSHOT_CHECK) => {}
            _ = shutdown.changed() => break,
        }
        let head = events.next_position();
        if head.saturating_sub(last) < SNAPSHOT_AFTER_EVENTS {
            continue;
        }
        match raft.trigger().snapshot().await {
            Ok(()) => {
                tracing::debug!(head, since = head - last, "raft snapshot triggered by applied events");
                last = head;
            }
            Err(e) => tracing::warn!(error = %e, "triggering a raft snapshot failed"),
        }
    }
}

/// Re-reads from the tier the ids of history released since the id filter was last
/// stored (a restart after a crash), before this node applies anything: its idempotency
/// answers must match those of nodes that never restarted. Retries while the store is down.
pub async fn fill_id_filter_gap(events: &EventState, reader: &TierReader) -> anyhow::Result<()> {
    let Some(gap) = events.id_filter_gap() else { return Ok(()) };
    tracing::info!(from = gap.start, to = gap.end, "re-reading released event ids from the tier");
    let mut position = gap.start;
    let mut backoff = Duration::from_millis(100);
    while position < gap.end {
        match reader.read_all(position, false, FILTER_FILL_PAGE_EVENTS, gap.end).await {
            Ok(page) => {
                let Some(last) = page.last().map(|e| e.position) else {
                    anyhow::bail!("the tier has no events at {position} below the floor {}", gap.end);
                };
                events.fill_id_filter(page.iter().map(|e| e.id), last + 1);
                position = last + 1;
                backoff = Duration::from_millis(100);
            }
            Err(strata_storage::tier::TierError::Corrupt(e)) => return Err(e.into()),
            Err(e) => {
                tracing::warn!(error = %e, position, "re-reading ids from the tier failed; retrying");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(5));
            }
        }
    }
    tracing::info!(to = gap.end, "id filter complete");
    Ok(())
}

/// Events per tier read while re-reading released ids at start-up.
const FILTER_FILL_PAGE_EVENTS: usize = 10_000;

#[cfg(test)]
mod tests {
    use super::*;

    fn mark(first: u64, end: u64, bytes: u64, created: i64) -> ChunkMark {
        ChunkMark { first_position: first, end_position: end, bytes, created_unix_ms: created }
    }

    fn window(events: u64, bytes: u64, age_secs: u64) -> HotWindow {
        HotWindow { events, bytes, age: Duration::from_secs(age_secs) }
    }

    #[test]
    fn a_chunk_is_settled_once_beyond_the_window_by_count_bytes_or_age() {
        let mut marks = Marks::new();
        marks.extend(vec![mark(0, 10, 100, 1_000), mark(10, 20, 100, 2_000), mark(20, 30, 100, 3_000)]);
        let now = 4_000;
        assert_eq!(marks.settled_end(0, 30, window(10, u64::MAX, 3600), now), 20, "10 newer events follow the second");
        assert_eq!(marks.settled_end(0, 30, window(1000, 200, 3600), now), 10, "200 newer bytes follow only the first");
        assert_eq!(marks.settled_end(0, 30, window(1000, u64::MAX, 2), now), 10, "only the first is older than 2 s");
        assert_eq!(marks.settled_end(0, 30, window(0, u64::MAX, 3600), now), 30, "an empty window settles everything");
        assert_eq!(marks.settled_end(0, 30, window(1000, u64::MAX, 3600), now), 0);
    }

    #[test]
    fn an_upload_waits_for_a_batch_unless_forced_or_waited_long_enough() {
        let mut batch = Batch::default();
        assert!(!batch.ready(10, false), "a few settled events wait for more");
        assert!(batch.ready(10, true), "tiering on request goes at once");
        assert!(batch.ready(UPLOAD_BATCH_EVENTS, false), "a full batch goes");
        let mut waited = Batch { waiting_since: Some(std::time::Instant::now() - UPLOAD_BATCH_WAIT) };
        assert!(waited.ready(1, false), "events that waited long enough go");
    }

    #[test]
    fn marks_follow_the_watermark() {
        let mut marks = Marks::new();
        marks.extend(vec![mark(0, 10, 100, 1), mark(10, 20, 50, 1)]);
        marks.advance_to(15);
        assert_eq!((marks.marks.len(), marks.bytes, marks.marks[0].first_position), (1, 50, 15));
        marks.advance_to(40);
        assert_eq!((marks.marks.len(), marks.bytes, marks.end), (0, 0, 40));
    }
}
