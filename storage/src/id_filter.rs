//! A Bloom filter over every event id in the applied state.
//!
//! Idempotency asks, for every event of every append, "was this id written before?";
//! almost always the answer is no, and asking sled costs a tree walk per event (measured:
//! the largest single cost of an apply after the inserts). The filter answers "certainly
//! not" without touching sled; "maybe" falls through to the id index. It has no false
//! negatives, so correctness never depends on it: a fuller filter only means more lookups.
//!
//! It lives in memory, rebuilt from the id index when the state is opened. Ids whose
//! index entries left the node with tiered history stay in it: before the node drops
//! them, the filter is stored in the applied state ([`IdFilter::encode`]), Raft
//! snapshots carry it, and opening the state merges it back. Without that, a restarted
//! node would answer "certainly not written" for a tiered id that a node which never
//! restarted would look up: two answers to one idempotency check.

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

    /// A copy of the filter as it is now: a memory copy, much cheaper than encoding, for
    /// a caller that must capture the filter at one instant and encode it later.
    pub fn copy(&self) -> IdFilter {
        let words = self.words.lock().expect("id filter lock is never poisoned").clone();
        IdFilter { words: Mutex::new(words), len: self.len }
    }
}

impl IdFilter {
    /// The filter's bits, run-length coded: `[zero words u32 LE][literal words u32 LE]
    /// [literal words, u64 LE each]...`. A sparse filter encodes small.
    pub fn encode(&self) -> Vec<u8> {
        let words = self.words.lock().expect("id filter lock is never poisoned");
        let mut out = Vec::with_capacity(16);
        out.extend_from_slice(&(words.len() as u64).to_le_bytes());
        let mut i = 0;
        while i < words.len() {
            let zeros_start = i;
            while i < words.len() && words[i] == 0 {
                i += 1;
            }
            let literal_start = i;
            // A literal run ends at two zero words in a row (one zero is cheaper inline).
            while i < words.len() && !(words[i] == 0 && words.get(i + 1).is_none_or(|w| *w == 0)) {
                i += 1;
            }
            out.extend_from_slice(&((literal_start - zeros_start) as u32).to_le_bytes());
            out.extend_from_slice(&((i - literal_start) as u32).to_le_bytes());
            for word in &words[literal_start..i] {
                out.extend_from_slice(&word.to_le_bytes());
            }
        }
        out
    }

    /// Adds the bits of an [`IdFilter::encode`]d filter of the same size. None if the
    /// bytes do not decode to one.
    pub fn merge_encoded(&self, bytes: &[u8]) -> Option<()> {
        let take = |at: &mut usize, n: usize| -> Option<&[u8]> {
            let out = bytes.get(*at..*at + n)?;
            *at += n;
            Some(out)
        };
        let mut at = 0;
        let len = u64::from_le_bytes(take(&mut at, 8)?.try_into().ok()?) as usize;
        if len != self.len {
            return None;
        }
        let mut decoded = vec![0u64; 0];
        decoded.reserve(len);
        while at < bytes.len() {
            let zeros = u32::from_le_bytes(take(&mut at, 4)?.try_into().ok()?) as usize;
            let literals = u32::from_le_bytes(take(&mut at, 4)?.try_into().ok()?) as usize;
            if decoded.len() + zeros + literals > len {
                return None;
            }
            decoded.resize(decoded.len() + zeros, 0);
            for _ in 0..literals {
                decoded.push(u64::from_le_bytes(take(&mut at, 8)?.try_into().ok()?));
            }
        }
        let mut words = self.words.lock().expect("id filter lock is never poisoned");
        for (word, bits) in words.iter_mut().zip(decoded) {
            *word |= bits;
        }
        Some(())
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

    #[test]
    fn encoded_filter_merges_back_to_the_same_answers() {
        let filter = IdFilter::with_bytes(64 * 1024);
        let empty = filter.encode();
        assert!(empty.len() < 64, "an empty filter encodes small: {}", empty.len());
        for n in 0..500u64 {
            let mut id = [0u8; 16];
            id[..8].copy_from_slice(&n.to_le_bytes());
            filter.insert(&id);
        }
        let copy = IdFilter::with_bytes(64 * 1024);
        copy.merge_encoded(&filter.encode()).unwrap();
        assert_eq!(copy.encode(), filter.encode());
        assert!(IdFilter::with_bytes(128).merge_encoded(&filter.encode()).is_none(), "size mismatch is refused");
        assert!(copy.merge_encoded(&filter.encode()[..20]).is_none(), "truncation is refused");
    }
}
