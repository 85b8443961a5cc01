//! Stream retention and deletion (SPEC §7 "Retention"): per-stream `max_age` and
//! `max_count`, soft deletes (a truncation point) and hard deletes (a tombstone), as
//! replicated control state under `r` + stream name.
//!
//! What a reader may see is decided here, once, for every read path: an event is visible
//! iff its stream is not tombstoned, its version is at or above the truncation point and
//! within the newest `max_count`, and it is younger than `max_age` at the time asked.
//! The state machine asks the same question at an entry's own timestamp when an id of an
//! invisible event comes back, so whether a node has already scavenged that event or not
//! never changes an idempotency decision.

use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::RwLock;

use serde::{Deserialize, Serialize};

/// Key prefix of stream metadata records.
pub const STREAM_META: u8 = b'r';

pub fn stream_meta_key(stream: &str) -> Vec<u8> {
    let mut key = Vec::with_capacity(stream.len() + 1);
    key.push(STREAM_META);
    key.extend_from_slice(stream.as_bytes());
    key
}

/// The stream name of a metadata key.
pub fn stream_of_meta_key(key: &[u8]) -> Option<&str> {
    (key.first() == Some(&STREAM_META)).then(|| std::str::from_utf8(&key[1..]).ok()).flatten()
}

/// Whether an event appended at `created_unix_ms` is older than `max_age_ms` at `now_ms`.
pub fn aged_out(created_unix_ms: i64, max_age_ms: u64, now_ms: i64) -> bool {
    created_unix_ms.saturating_add(max_age_ms.min(i64::MAX as u64) as i64) <= now_ms
}

/// A stream's retention settings and deletion state.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct StreamMeta {
    /// Events older than this (by their append time) are no longer read.
    pub max_age_ms: Option<u64>,
    /// Only the newest this many events are read.
    pub max_count: Option<u64>,
    /// Versions below this were deleted (a soft delete truncates up to the head).
    pub truncate_before: u64,
    /// Hard-deleted: never read or written again.
    pub tombstone: bool,
    /// Versions below this were scavenged: replicated (`ControlCommand::Scavenge`), so
    /// every node hides them from the same log index on, before or after it has rewritten
    /// its own copy, and relaxing the retention later never shows them again.
    pub scavenged_before: u64,
}

impl StreamMeta {
    /// The lowest version readers may see by count and truncation, given the stream's
    /// last version (age is checked per event).
    pub fn first_visible_version(&self, last_version: Option<u64>) -> u64 {
        let by_count = match (self.max_count, last_version) {
            (Some(count), Some(last)) => (last + 1).saturating_sub(count),
            _ => 0,
        };
        self.truncate_before.max(by_count).max(self.scavenged_before)
    }

    /// The version below which a scavenge may remove events now, given the stream's
    /// last version and the version below which every event has aged out (ignored
    /// without `max_age`). Events of a tombstoned stream all go.
    pub fn scavenge_target(&self, last_version: Option<u64>, aged_out_before: u64) -> u64 {
        let end = last_version.map_or(0, |last| last + 1);
        if self.tombstone {
            return end;
        }
        let by_age = if self.max_age_ms.is_some() { aged_out_before } else { 0 };
        self.first_visible_version(last_version).max(by_age).min(end)
    }

    /// Whether the event at `version`, appended at `created_unix_ms`, is visible at `now_ms`.
    pub fn visible(&self, version: u64, created_unix_ms: i64, last_version: Option<u64>, now_ms: i64) -> bool {
        if self.tombstone || version < self.first_visible_version(last_version) {
            return false;
        }
        self.max_age_ms.is_none_or(|age| !aged_out(created_unix_ms, age, now_ms))
    }

    /// Soft-deleted, and nothing appended since: readers see no stream.
    pub fn deleted_and_empty(&self, last_version: Option<u64>) -> bool {
        !self.tombstone && self.truncate_before > 0 && last_version.is_none_or(|last| last < self.truncate_before)
    }
}

/// Names of the streams that have a metadata record (or had one): lets the hot paths
/// skip the lookup for the many streams that never had any. A superset is harmless.
#[derive(Default)]
pub struct MetaStreams {
    names: RwLock<HashSet<String>>,
    /// `names` is not empty: most stores have no stream metadata at all, and reads ask
    /// per event, so the common answer takes one atomic load instead of the lock.
    any: AtomicBool,
}

impl MetaStreams {
    pub fn may_have(&self, stream: &str) -> bool {
        self.any.load(Ordering::Acquire) && self.names.read().expect("never poisoned").contains(stream)
    }

    /// The names, in no order.
    pub fn names(&self) -> Vec<String> {
        self.names.read().expect("never poisoned").iter().cloned().collect()
    }

    pub fn insert(&self, stream: &str) {
        let mut names = self.names.write().expect("never poisoned");
        if !names.contains(stream) {
            names.insert(stream.to_string());
        }
        self.any.store(true, Ordering::Release);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn meta_streams_know_only_what_was_inserted() {
        let streams = MetaStreams::default();
        assert!(!streams.may_have("a"), "empty: nothing has metadata");
        streams.insert("a");
        assert!(streams.may_have("a") && !streams.may_have("b"));
        assert_eq!(streams.names(), vec!["a".to_string()]);
    }

    #[test]
    fn visibility_by_count_truncation_age_and_tombstone() {
        let meta = StreamMeta { max_count: Some(3), ..Default::default() };
        assert_eq!(meta.first_visible_version(Some(9)), 7);
        assert!(!meta.visible(6, 0, Some(9), 0) && meta.visible(7, 0, Some(9), 0));
        let truncated = StreamMeta { truncate_before: 8, max_count: Some(5), ..Default::default() };
        assert_eq!(truncated.first_visible_version(Some(9)), 8);
        let aged = StreamMeta { max_age_ms: Some(1_000), ..Default::default() };
        assert!(aged.visible(0, 5_000, Some(0), 5_999));
        assert!(!aged.visible(0, 5_000, Some(0), 6_000));
        let gone = StreamMeta { tombstone: true, ..Default::default() };
        assert!(!gone.visible(5, 0, Some(9), 0));
        let soft = StreamMeta { truncate_before: 10, ..Default::default() };
        assert!(soft.deleted_and_empty(Some(9)) && !soft.deleted_and_empty(Some(10)));
    }

    #[test]
    fn scavenge_targets_cover_what_no_reader_may_see() {
        let counted = StreamMeta { max_count: Some(3), ..Default::default() };
        assert_eq!(counted.scavenge_target(Some(9), 9), 7, "age ignored without max_age");
        assert_eq!(counted.scavenge_target(None, 0), 0);
        let aged = StreamMeta { max_age_ms: Some(10), max_count: Some(5), ..Default::default() };
        assert_eq!(aged.scavenge_target(Some(9), 8), 8, "age cuts deeper than count");
        assert_eq!(aged.scavenge_target(Some(9), 3), 5, "count cuts deeper than age");
        assert_eq!(aged.scavenge_target(Some(9), 10), 10, "everything aged out");
        let gone = StreamMeta { tombstone: true, truncate_before: 4, ..Default::default() };
        assert_eq!(gone.scavenge_target(Some(9), 0), 10);
        let soft = StreamMeta { truncate_before: 4, ..Default::default() };
        assert_eq!(soft.scavenge_target(Some(9), 0), 4);
        let scavenged = StreamMeta { scavenged_before: 6, max_count: Some(100), ..Default::default() };
        assert!(!scavenged.visible(5, 0, Some(9), 0) && scavenged.visible(6, 0, Some(9), 0), "relaxed retention never shows scavenged events");
    }

    #[test]
    fn meta_keys_round_trip() {
        assert_eq!(stream_of_meta_key(&stream_meta_key("orders-1")), Some("orders-1"));
        assert_eq!(stream_of_meta_key(b"xorders"), None);
    }
}
