//! Key layout of the tier database. Values are sealed records (CRC32C over key and
//! payload, `crate::record`), checked on every read.
//!
//! - `c` last position (u64 BE)                → EventChunk (events of one append, or the
//!   part of one at or above the watermark it was uploaded from)
//! - `s` stream 0x00 last version (u64 BE)     → first and last position of that chunk
//! - `i` event id (16 bytes)                   → position
//! - `u`                                       → uploaded-through position (all events
//!   below it are in the tier)
//! - `w`                                       → the writer's claim (Raft term, node id)
//! - `x` stream                                → scavenged-through version (u64 BE): the
//!   stream's tiered events below it hold placeholders only
//!
//! Chunks are keyed by their *last* position (and stream entries by last version) so that
//! the first key at or after `p` is the chunk holding `p`: SlateDB scans forwards cheaply.

pub const CHUNK: u8 = b'c';
pub const UPLOADED: &[u8] = b"u";
pub const WRITER: &[u8] = b"w";

pub fn chunk(last_position: u64) -> [u8; 9] {
    let mut key = [0u8; 9];
    key[0] = CHUNK;
    key[1..].copy_from_slice(&last_position.to_be_bytes());
    key
}

pub const SCAVENGED: u8 = b'x';

pub fn scavenged(stream: &str) -> Vec<u8> {
    let mut key = Vec::with_capacity(stream.len() + 1);
    key.push(SCAVENGED);
    key.extend_from_slice(stream.as_bytes());
    key
}

pub fn decode_chunk_key(key: &[u8]) -> Option<u64> {
    (key.len() == 9 && key[0] == CHUNK).then(|| u64::from_be_bytes(key[1..].try_into().expect("8 bytes")))
}

// Stream and event-id keys have the local store's layout (`crate::keys`); in the tier a
// stream entry is keyed by its chunk's *last* version instead of its first.
pub use crate::keys::{event_id, stream_index as stream, stream_index_prefix as stream_prefix};

/// A stream entry's value: the chunk's first and last position.
pub fn encode_span(first: u64, last: u64) -> [u8; 16] {
    let mut out = [0u8; 16];
    out[..8].copy_from_slice(&first.to_be_bytes());
    out[8..].copy_from_slice(&last.to_be_bytes());
    out
}

pub fn decode_span(payload: &[u8]) -> Option<(u64, u64)> {
    (payload.len() == 16).then(|| {
        (u64::from_be_bytes(payload[..8].try_into().expect("8")), u64::from_be_bytes(payload[8..].try_into().expect("8")))
    })
}

pub fn decode_u64(payload: &[u8]) -> Option<u64> {
    payload.try_into().ok().map(u64::from_be_bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunk_keys_sort_by_position_and_round_trip() {
        assert!(chunk(255) < chunk(256));
        assert_eq!(decode_chunk_key(&chunk(77)), Some(77));
        assert_eq!(decode_chunk_key(b"x"), None);
    }

    #[test]
    fn stream_keys_of_one_stream_sort_by_version() {
        assert!(stream("a", 1) < stream("a", 2));
        assert!(stream("a", u64::MAX) < stream("a-b", 0));
    }
}
