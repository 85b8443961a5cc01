//! The background scavenge (SPEC §7 "Retention"): what retention and deletes hide is
//! dropped from disk, in both tiers.
//!
//! Three steps, so that no node ever decides differently from another:
//! 1. the leader works out, per stream with metadata, the version below which no reader
//!    may see anything any more (count, truncation, tombstone, age) and replicates it
//!    (`ControlCommand::Scavenge`): from that log index on every node hides those events
//!    for good, whether or not it has rewritten its copy yet;
//! 2. every node rewrites its own copy of them as placeholders (id and content digest,
//!    see `NewEvent::scavenged`), so an idempotency check decides the same before and after;
//! 3. the leader does the same in the tier (`crate::tier`, with its tier writer).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use openraft::async_runtime::WatchReceiver;
use strata_storage::{ControlCommand, EventReader, EventState};
use tokio::sync::watch;

use crate::clock::now_unix_ms;
use crate::control::propose;
use crate::metrics::Metrics;
use crate::routing::Router;

/// Events a node rewrites per step of its own scavenge (one short write lock each).
pub const SCAVENGE_EVENTS_PER_STEP: usize = 4_096;
/// Events the leader reads per stream and pass to find where `max_age` stops hiding.
pub const SCAVENGE_AGE_SCAN_EVENTS_MAX: usize = 100_000;
/// Streams with metadata looked at per pass.
pub const SCAVENGE_STREAMS_PER_PASS_MAX: usize = 100_000;

/// Runs on every node: step 1 while it leads, step 2 always.
pub async fn run_scavenger(router: Router, reader: EventReader, metrics: Arc<Metrics>, interval: Duration, mut shutdown: watch::Receiver<bool>) {
    // This node's own progress per stream (from 0 again after a restart: rewriting a
    // placeholder again is skipped, so that costs a scan, not writes).
    let mut local: HashMap<String, u64> = HashMap::new();
    loop {
        tokio::select! {
            _ = tokio::time::sleep(interval) => {}
            _ = shutdown.changed() => return,
        }
        let leads = router.raft.metrics().borrow_watched().current_leader == Some(router.node_id);
        if leads && let Err(e) = replicate_scavenge_points(&router, &reader, &metrics).await {
            tracing::warn!(error = %e, "scavenge: deciding what to drop failed; retried next pass");
        }
        let events = reader.state().clone();
        let mut progress = std::mem::take(&mut local);
        let pass = tokio::task::spawn_blocking(move || {
            let outcome = scavenge_local_copy(&events, &mut progress);
            (outcome, progress)
        });
        match pass.await {
            Ok((Ok(rewritten), kept)) => {
                local = kept;
                if rewritten > 0 {
                    metrics.scavenged_events_total.with_label_values(&["local"]).inc_by(rewritten);
                    tracing::info!(events = rewritten, "scavenge: dropped payloads from this node's copy");
                }
            }
            Ok((Err(e), _)) => tracing::warn!(error = %e, "scavenge of this node's copy failed; retried next pass"),
            Err(e) => tracing::warn!(error = %e, "scavenge task failed; retried next pass"),
        }
    }
}

/// Step 1 (leader): proposes a scavenge point for each stream whose hidden part grew.
async fn replicate_scavenge_points(router: &Router, reader: &EventReader, metrics: &Metrics) -> anyhow::Result<()> {
    let events = reader.state().clone();
    for stream in events.streams_with_meta().into_iter().take(SCAVENGE_STREAMS_PER_PASS_MAX) {
        let Some(meta) = events.stream_meta(&stream)? else { continue };
        let last = events.stream_head(&stream)?.map(|h| h.last_version);
        let aged_out_before = match meta.max_age_ms {
            Some(age) if !meta.tombstone => {
                reader.aged_out_before(&stream, meta.scavenged_before, age, now_unix_ms(), SCAVENGE_AGE_SCAN_EVENTS_MAX).await?
            }
            _ => 0,
        };
        let target = meta.scavenge_target(last, aged_out_before);
        if target <= meta.scavenged_before {
            continue;
        }
        propose(router, ControlCommand::Scavenge { stream: stream.clone(), before: target }).await?;
        metrics.scavenges_total.inc();
        tracing::info!(stream, before = target, "scavenge: versions below this are dropped from now on");
    }
    Ok(())
}

/// Step 2 (every node): rewrites this node's copy up to each stream's scavenge point.
fn scavenge_local_copy(events: &EventState, progress: &mut HashMap<String, u64>) -> Result<u64, strata_storage::StorageError> {
    let mut rewritten = 0u64;
    for stream in events.streams_with_meta().into_iter().take(SCAVENGE_STREAMS_PER_PASS_MAX) {
        let Some(meta) = events.stream_meta(&stream)? else { continue };
        let mut from = progress.get(&stream).copied().unwrap_or(0);
        while from < meta.scavenged_before {
            let (count, reached) = events.scavenge_local(&stream, from, SCAVENGE_EVENTS_PER_STEP)?;
            rewritten += count;
            if reached <= from {
                break;
            }
            from = reached;
        }
        progress.insert(stream, from);
    }
    Ok(rewritten)
}
