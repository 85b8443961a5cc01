//! Key layout of the applied-state tree. One tree, prefixed keys, so that the writes of
//! one Raft entry go into one atomic sled batch.
//!
//! - `e` first position(u64 BE)           → EventChunk (the events of one append)
//! - `s` stream 0x00 first version(u64 BE) → first position of the chunk
//! - `i` event id (16 bytes)              → position: written by earlier versions only, now
//!   dead (the id index is in memory, see `local_ids`); a compaction leaves them behind
//! - `h` stream                           → StreamHead
//! - `m` name                             → metadata (applied log id, next position)
//!
//! Stream names contain no control characters (validated at the API), so 0x00 cleanly
//! ends a name and `s` keys of one stream sort by version.

pub const EVENT: u8 = b'e';
pub const STREAM_INDEX: u8 = b's';
pub const EVENT_ID: u8 = b'i';
pub const HEAD: u8 = b'h';
pub const META: u8 = b'm';

pub fn event(position: u64) -> [u8; 9] {
    let mut key = [0u8; 9];
    key[0] = EVENT;
    key[1..].copy_from_slice(&position.to_be_bytes());
    key
}

pub fn stream_index(stream: &str, version: u64) -> Vec<u8> {
    let mut key = stream_index_prefix(stream);
    key.extend_from_slice(&version.to_be_bytes());
    key
}

pub fn stream_index_prefix(stream: &str) -> Vec<u8> {
    let mut key = Vec::with_capacity(stream.len() + 10);
    key.push(STREAM_INDEX);
    key.extend_from_slice(stream.as_bytes());
    key.push(0);
    key
}

/// An id index key: the tier's layout (`tier::layout`), and the local records of earlier
/// versions.
pub fn event_id(id: &[u8; 16]) -> [u8; 17] {
    let mut key = [0u8; 17];
    key[0] = EVENT_ID;
    key[1..].copy_from_slice(id);
    key
}

pub fn head(stream: &str) -> Vec<u8> {
    let mut key = Vec::with_capacity(stream.len() + 1);
    key.push(HEAD);
    key.extend_from_slice(stream.as_bytes());
    key
}

pub fn meta(name: &str) -> Vec<u8> {
    let mut key = Vec::with_capacity(name.len() + 1);
    key.push(META);
    key.extend_from_slice(name.as_bytes());
    key
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stream_index_keys_sort_by_version_within_a_stream() {
        assert!(stream_index("a", 1) < stream_index("a", 2));
        assert!(stream_index("a", u64::MAX) < stream_index("a-b", 0));
    }

    #[test]
    fn event_keys_sort_by_position() {
        assert!(event(1) < event(256));
    }
}
