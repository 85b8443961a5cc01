//! A Bloom filter over every event id in the applied state.
//!
//! Idempotency asks, for every event of every append, "was this id written before?";
//! almost always the answer is no, and asking sled costs a tree walk per event (measured:
//! the largest single cost of an apply after the inserts). The filter answers "certainly
//! not" without touching sled; "maybe" falls through to the id index. It has no false
//! negatives, so correctness never depends on it: a fuller filter only means more lookups.
//!
//! It lives in memory only: rebuilt from the id index when the state is opened or
//! replaced by a snapshot.

use std::sync::Mutex;

/// Memory of the filter. 32 MiB holds about 27 M ids at a 1% false-positive rate; past
/// that the rate rises gradually and lookups fall through to sled more often.
pub const ID_FILTER_BYTES: usize = 32 * 1024 * 1024;
const HASHES: u64 = 7;

pub struct IdFilter {
    /// Only the state machine's apply uses it, one lookup at a time: the lock is never
    /// contended. (`vec![0; n]` gets zeroed pages lazily: an unused filter costs no memory.)
    words: Mutex<Vec<u64>>,
    len: usize,
}

impl IdFilter {
    pub fn new() -> Self {
        Self::with_bytes(ID_FILTER_BYTES)
    }

    pub fn with_bytes(bytes: usize) -> Self {
        let len = (bytes / 8).max(1);
        Self { words: Mutex::new(vec![0; len]), len }
    }

    fn bits(&self, id: &[u8; 16]) -> impl Iterator<Item = (usize, u64)> + '_ {
        let (a, b) = id.split_at(8);
        // Ids may be sequential or chosen by clients: mix before use.
        let h1 = mix(u64::from_le_bytes(a.try_into().expect("8 bytes")) ^ 0x9e37_79b9_7f4a_7c15);
        let h2 = mix(u64::from_le_bytes(b.try_into().expect("8 bytes")) ^ h1) | 1;
        let total_bits = self.len as u64 * 64;
        (0..HASHES).map(move |i| {
            let bit = h1.wrapping_add(i.wrapping_mul(h2)) % total_bits;
            ((bit / 64) as usize, 1u64 << (bit % 64))
        })
    }

    pub fn insert(&self, id: &[u8; 16]) {
        let mut words = self.words.lock().expect("id filter lock is never poisoned");
        for (word, mask) in self.bits(id) {
            words[word] |= mask;
        }
    }

    /// False only if `id` was never inserted.
    pub fn may_contain(&self, id: &[u8; 16]) -> bool {
        let words = self.words.lock().expect("id filter lock is never poisoned");
        self.bits(id).all(|(word, mask)| words[word] & mask != 0)
    }
}

impl Default for IdFilter {
    fn default() -> Self {
        Self::new()
    }
}

/// splitmix64's finalizer.
fn mix(mut x: u64) -> u64 {
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn no_false_negatives_and_few_false_positives() {
        let filter = IdFilter::with_bytes(64 * 1024);
        let id = |n: u64| {
            let mut id = [0u8; 16];
            id[..8].copy_from_slice(&n.to_le_bytes());
            id
        };
        for n in 0..20_000 {
            filter.insert(&id(n));
        }
        assert!((0..20_000).all(|n| filter.may_contain(&id(n))));
        let false_positives = (1_000_000..1_100_000).filter(|n| filter.may_contain(&id(*n))).count();
        assert!(false_positives < 2_000, "{false_positives} false positives in 100k");
    }
}
