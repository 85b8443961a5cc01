//! The event-id index of the history this node holds locally (positions `floor..`): an
//! exact map in memory, derived from the stored chunks.
//!
//! Why not a sled index: one index record per event, under a random key (event ids are
//! client-chosen UUIDs), cost each append one tree descent, a leaf copy and, as the tree
//! grew, leaf splits per event — a third of a node's CPU under load, on every node. The
//! chunks already carry every id and are written atomically with everything else an
//! entry changes, so the index is rebuilt from them when the state is opened
//! ([`crate::EventState::open`]) and can never disagree with them after a crash.
//!
//! Sized by the local history, about 35 bytes per event (1.5 M ids: a 2^21-bucket table,
//! 52 MB; rebuilt at open in 0.75 s). With a tier, everything below the hot window is
//! released (`--hot-window-events`, default 1,000,000 events) and a release drops the
//! released chunks' ids ([`LocalIds::remove`]); ids of released events are answered by the
//! id filter and the tier. A node without an object store keeps all history locally, and
//! this index with it.

use std::collections::HashMap;
use std::sync::RwLock;

/// Event id → `$all` position, for the events held locally. Written only by the apply path
/// (which the raft layer runs one batch at a time) and by releases (serialised with it).
#[derive(Debug, Default)]
pub struct LocalIds {
    // std's hasher is keyed per process: ids are chosen by clients, who must not be able
    // to pick colliding ones.
    map: RwLock<HashMap<[u8; 16], u64>>,
}

impl LocalIds {
    /// The position of the event with `id` if it is held locally: not below `floor` (the
    /// floor moves before a release's ids leave, so one may still be here).
    pub fn position(&self, id: &[u8; 16], floor: u64) -> Option<u64> {
        self.map.read().expect("local id index lock is never poisoned").get(id).copied().filter(|position| *position >= floor)
    }

    pub fn insert_all(&self, ids: impl IntoIterator<Item = ([u8; 16], u64)>) {
        let mut map = self.map.write().expect("local id index lock is never poisoned");
        map.extend(ids);
    }

    /// Drops `ids` (of released chunks); an id written again later at another position
    /// (its event was no longer visible) is kept.
    pub fn remove(&self, ids: impl IntoIterator<Item = ([u8; 16], u64)>) {
        let mut map = self.map.write().expect("local id index lock is never poisoned");
        for (id, position) in ids {
            if map.get(&id) == Some(&position) {
                map.remove(&id);
            }
        }
        // Give memory back once the map is mostly empty (a release of most of it).
        if map.capacity() > 1024 && map.len() < map.capacity() / 4 {
            let keep = map.len() * 2;
            map.shrink_to(keep);
        }
    }

    /// Replaces the whole index (a snapshot install replaced the state).
    pub fn replace(&self, ids: HashMap<[u8; 16], u64>) {
        *self.map.write().expect("local id index lock is never poisoned") = ids;
    }

    pub fn len(&self) -> usize {
        self.map.read().expect("local id index lock is never poisoned").len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn removing_a_released_id_keeps_a_later_use_of_it() {
        let ids = LocalIds::default();
        ids.insert_all([([1; 16], 10), ([2; 16], 11)]);
        // Id 1 was written again at 20 (its first event no longer visible).
        ids.insert_all([([1; 16], 20)]);
        ids.remove([([1; 16], 10), ([2; 16], 11)]);
        assert_eq!(ids.position(&[1; 16], 0), Some(20));
        assert_eq!(ids.position(&[1; 16], 21), None, "below the floor");
        assert_eq!(ids.position(&[2; 16], 0), None);
        assert_eq!(ids.len(), 1);
    }
}
