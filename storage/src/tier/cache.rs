//! A read-through cache of tier chunks, bounded in bytes.
//!
//! Cold reads are mostly sequential (`$all` catch-up, a stream from its start), so
//! first-in-first-out eviction keeps the chunks that are about to be read next. Chunks in
//! the tier never change, so a cached chunk is never stale.

use std::collections::{BTreeMap, VecDeque};
use std::sync::{Arc, Mutex};

use crate::chunk::EventChunk;

/// Most bytes of decoded chunks the cache holds (payload bytes; the bound a small node can
/// afford beside its hot tier).
pub const TIER_CACHE_BYTES: usize = 64 * 1024 * 1024;

#[derive(Default)]
struct Inner {
    /// By first position.
    chunks: BTreeMap<u64, Arc<EventChunk>>,
    order: VecDeque<u64>,
    bytes: usize,
}

pub struct ChunkCache {
    inner: Mutex<Inner>,
    capacity: usize,
}

fn weight(chunk: &EventChunk) -> usize {
    chunk.events.iter().map(|e| e.data.len() + e.metadata.len() + e.event_type.len() + 64).sum::<usize>() + chunk.stream.len()
}

impl ChunkCache {
    pub fn new(capacity: usize) -> Self {
        Self { inner: Mutex::new(Inner::default()), capacity }
    }

    /// The cached chunk holding `position`.
    pub fn containing(&self, position: u64) -> Option<Arc<EventChunk>> {
        let inner = self.inner.lock().expect("cache lock is never poisoned");
        let (_, chunk) = inner.chunks.range(..=position).next_back()?;
        chunk.contains_position(position).then(|| chunk.clone())
    }

    pub fn insert(&self, chunk: Arc<EventChunk>) {
        let size = weight(&chunk);
        if size > self.capacity {
            return;
        }
        let mut inner = self.inner.lock().expect("cache lock is never poisoned");
        if inner.chunks.contains_key(&chunk.first_position) {
            return;
        }
        while inner.bytes + size > self.capacity {
            let Some(oldest) = inner.order.pop_front() else { break };
            if let Some(evicted) = inner.chunks.remove(&oldest) {
                inner.bytes -= weight(&evicted);
            }
        }
        inner.order.push_back(chunk.first_position);
        inner.chunks.insert(chunk.first_position, chunk);
        inner.bytes += size;
    }

    pub fn bytes(&self) -> usize {
        self.inner.lock().expect("cache lock is never poisoned").bytes
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::command::NewEvent;

    fn chunk(first_position: u64, events: usize, data: usize) -> Arc<EventChunk> {
        Arc::new(EventChunk {
            stream: "s".into(),
            first_version: 0,
            first_position,
            created_unix_ms: 0,
            events: (0..events)
                .map(|i| NewEvent {
                    id: [i as u8; 16],
                    event_type: "t".into(),
                    content_type: String::new(),
                    data: vec![0; data],
                    metadata: vec![],
                })
                .collect(),
        })
    }

    #[test]
    fn finds_the_chunk_holding_a_position() {
        let cache = ChunkCache::new(1 << 20);
        cache.insert(chunk(10, 5, 10));
        assert_eq!(cache.containing(12).unwrap().first_position, 10);
        assert!(cache.containing(15).is_none());
        assert!(cache.containing(9).is_none());
    }

    #[test]
    fn stays_within_its_byte_bound() {
        let cache = ChunkCache::new(10_000);
        for i in 0..100 {
            cache.insert(chunk(i * 10, 10, 100));
            assert!(cache.bytes() <= 10_000);
        }
        assert!(cache.containing(990).is_some(), "the newest chunk is kept");
        assert!(cache.containing(0).is_none(), "the oldest chunk was evicted");
    }
}
