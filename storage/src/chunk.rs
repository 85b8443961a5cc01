//! An event chunk: the events of one append, stored as one value.
//!
//! The events of one append are contiguous in `$all` and in their stream (SPEC §3.2), so
//! they are stored together under the position of the first: one sled insert and one
//! decode per append instead of per event. A reader that wants position `p` finds the
//! chunk with the greatest first position `<= p`.

use bytes::Bytes;
use serde::{Deserialize, Serialize};

use crate::command::{EventRef, NewEvent, StoredEvent};
use crate::StorageError;

/// Most events a chunk holds when one is built from a snapshot's event stream (an append
/// holds at most `EVENTS_PER_APPEND_MAX`, checked at the API).
pub const CHUNK_EVENTS_MAX: usize = 10_000;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EventChunk {
    pub stream: String,
    pub first_version: u64,
    pub first_position: u64,
    pub created_unix_ms: i64,
    pub events: Vec<NewEvent>,
}

/// An [`EventChunk`] to store, borrowing its stream and events from the append being
/// applied: it encodes exactly as the owned chunk does (bincode writes a `&str` as it
/// writes a `String`, and a slice as a `Vec`), so staging an append needs no copy of its
/// events (on every node, for every append).
#[derive(Debug, Clone, Copy, Serialize)]
pub struct EventChunkRef<'a> {
    pub stream: &'a str,
    pub first_version: u64,
    pub first_position: u64,
    pub created_unix_ms: i64,
    pub events: &'a [NewEvent],
}

impl EventChunkRef<'_> {
    pub fn len(&self) -> u64 {
        self.events.len() as u64
    }

    /// One past the last position.
    pub fn end_position(&self) -> u64 {
        self.first_position + self.len()
    }
}

/// A stored chunk read for its keys only (stream, versions, positions, event ids): the
/// payloads are borrowed from the record, not copied. Releases and the uploader's marks
/// look at every settled chunk once, and need nothing else of it; reads take the payloads
/// as slices of the record ([`ChunkView::stored_events`]).
///
/// Decoded by hand from the bincode encoding of [`EventChunk`] ([`ChunkView::decode`]).
#[derive(Debug)]
pub struct ChunkView<'a> {
    pub stream: &'a str,
    pub first_version: u64,
    pub first_position: u64,
    pub created_unix_ms: i64,
    pub events: Vec<EventView<'a>>,
}

/// One event of a [`ChunkView`]: its id, and the rest borrowed.
#[derive(Debug)]
pub struct EventView<'a> {
    pub id: [u8; 16],
    pub event_type: &'a str,
    pub content_type: &'a str,
    pub data: &'a [u8],
    pub metadata: &'a [u8],
}

/// Fewest bytes an event takes in a chunk's encoding (its id and four lengths): bounds the
/// events a chunk of a given size can claim to hold.
const ENCODED_EVENT_BYTES_MIN: usize = 16 + 4 * 8;

/// A reader of bincode's fixed-width encoding (what `bincode::serialize` writes): lengths and
/// integers as 8 bytes little-endian, strings and byte strings behind their length.
struct Fixint<'a> {
    rest: &'a [u8],
}

impl<'a> Fixint<'a> {
    fn take(&mut self, len: usize) -> Option<&'a [u8]> {
        let (head, rest) = self.rest.split_at_checked(len)?;
        self.rest = rest;
        Some(head)
    }

    fn u64(&mut self) -> Option<u64> {
        Some(u64::from_le_bytes(self.take(8)?.try_into().ok()?))
    }

    fn bytes(&mut self) -> Option<&'a [u8]> {
        let len = usize::try_from(self.u64()?).ok()?;
        self.take(len)
    }

    fn text(&mut self) -> Option<&'a str> {
        std::str::from_utf8(self.bytes()?).ok()
    }
}

impl<'a> ChunkView<'a> {
    /// The chunk encoded in `payload` (an opened record's payload), or None if it is not a
    /// chunk's encoding. What `bincode::deserialize` gives for [`EventChunk`], borrowed, but
    /// read by hand: serde's way of reading an id (sixteen one-byte elements) and the rest
    /// was the largest part of a `$all` read's server (a test compares the two).
    pub fn decode(payload: &'a [u8]) -> Option<Self> {
        let mut input = Fixint { rest: payload };
        let (stream, first_version, first_position) = (input.text()?, input.u64()?, input.u64()?);
        let created_unix_ms = input.u64()? as i64;
        let len = usize::try_from(input.u64()?).ok().filter(|len| *len <= input.rest.len() / ENCODED_EVENT_BYTES_MIN)?;
        let mut events = Vec::with_capacity(len);
        for _ in 0..len {
            events.push(EventView {
                id: input.take(16)?.try_into().ok()?,
                event_type: input.text()?,
                content_type: input.text()?,
                data: input.bytes()?,
                metadata: input.bytes()?,
            });
        }
        Some(Self { stream, first_version, first_position, created_unix_ms, events })
    }

    /// [`ChunkView::decode`] of the payload of the chunk record under `key`; undecodable
    /// is corrupt.
    pub fn read(key: &[u8], payload: &'a [u8]) -> Result<Self, StorageError> {
        Self::decode(payload).ok_or_else(|| StorageError::Corrupt { what: "event chunk", key: crate::record::printable_key(key) })
    }

    /// [`ChunkView::read`] of a sealed record, its checksum verified first.
    pub fn open(key: &[u8], record: &'a [u8]) -> Result<Self, StorageError> {
        Self::read(key, crate::record::open("event chunk", key, record)?)
    }
}

impl ChunkView<'_> {
    pub fn len(&self) -> u64 {
        self.events.len() as u64
    }

    /// One past the last position.
    pub fn end_position(&self) -> u64 {
        self.first_position + self.len()
    }

    /// Its events as readers see them, their payloads slices of `encoding` (the bytes this
    /// view was decoded from): no allocation or copy per payload.
    pub fn stored_events(&self, encoding: &Bytes) -> Vec<StoredEvent> {
        (0..self.events.len()).filter_map(|index| self.event_ref(index)).map(|event| event.to_stored(Some(encoding))).collect()
    }

    /// Its event at `index`, borrowed (None past its end).
    pub fn event_ref(&self, index: usize) -> Option<EventRef<'_>> {
        let event = self.events.get(index)?;
        Some(EventRef {
            id: event.id,
            stream: self.stream,
            version: self.first_version + index as u64,
            position: self.first_position + index as u64,
            event_type: event.event_type,
            content_type: event.content_type,
            data: event.data,
            metadata: event.metadata,
            created_unix_ms: self.created_unix_ms,
        })
    }

    /// Each event's id and `$all` position.
    pub fn ids_with_positions(&self) -> impl Iterator<Item = ([u8; 16], u64)> + '_ {
        self.events.iter().enumerate().map(|(offset, event)| (event.id, self.first_position + offset as u64))
    }
}

/// The fields of a stored chunk that come before its events, and how many events follow:
/// enough to skip a chunk of a stream a read does not want without decoding its payloads.
/// Decoded from a prefix of the [`EventChunk`] encoding (bincode writes a `Vec`'s length as
/// a `u64` before its elements, and ignores what follows a decoded value).
#[derive(Debug, Deserialize)]
pub struct ChunkHeader<'a> {
    pub stream: &'a str,
    // Read to step over them (bincode is not self-describing): the layout of EventChunk.
    #[allow(dead_code)]
    pub first_version: u64,
    pub first_position: u64,
    #[allow(dead_code)]
    pub created_unix_ms: i64,
    /// The length of `events`.
    pub len: u64,
}

/// A chunk on its way to the tier: its keys, and its bincode encoding as stored locally
/// (the uploader passes whole stored chunks through without decoding their payloads).
#[derive(Debug, Clone)]
pub struct EncodedChunk {
    pub stream: String,
    pub first_version: u64,
    pub first_position: u64,
    pub ids: Vec<[u8; 16]>,
    pub encoded: Vec<u8>,
}

impl EncodedChunk {
    /// Encodes `chunk`.
    pub fn of(chunk: &EventChunk) -> Result<Self, StorageError> {
        Ok(Self {
            stream: chunk.stream.clone(),
            first_version: chunk.first_version,
            first_position: chunk.first_position,
            ids: chunk.events.iter().map(|e| e.id).collect(),
            encoded: bincode::serialize(chunk).map_err(|_| StorageError::Encode { what: "event chunk" })?,
        })
    }

    /// Takes a stored chunk's `encoded` bytes as they are, with the keys of its `view`.
    pub fn from_stored(view: &ChunkView<'_>, encoded: &[u8]) -> Self {
        Self {
            stream: view.stream.to_owned(),
            first_version: view.first_version,
            first_position: view.first_position,
            ids: view.events.iter().map(|e| e.id).collect(),
            encoded: encoded.to_vec(),
        }
    }

    pub fn len(&self) -> u64 {
        self.ids.len() as u64
    }

    /// One past the last position.
    pub fn end_position(&self) -> u64 {
        self.first_position + self.len()
    }
}

impl EventChunk {
    /// The chunk as a borrowed [`EventChunkRef`] (same encoding).
    pub fn as_chunk_ref(&self) -> EventChunkRef<'_> {
        EventChunkRef {
            stream: &self.stream,
            first_version: self.first_version,
            first_position: self.first_position,
            created_unix_ms: self.created_unix_ms,
            events: &self.events,
        }
    }

    pub fn len(&self) -> u64 {
        self.events.len() as u64
    }

    /// One past the last position.
    pub fn end_position(&self) -> u64 {
        self.first_position + self.len()
    }

    pub fn contains_position(&self, position: u64) -> bool {
        (self.first_position..self.end_position()).contains(&position)
    }

    /// Replaces the events below `before` (a stream version) by what a scavenge leaves of
    /// them ([`NewEvent::scavenged`]); returns how many were not placeholders yet.
    pub fn scavenge_below(&mut self, before: u64) -> u64 {
        let keep_from = before.saturating_sub(self.first_version).min(self.len()) as usize;
        let mut rewritten = 0;
        for event in &mut self.events[..keep_from] {
            if !event.is_scavenged() {
                *event = event.scavenged();
                rewritten += 1;
            }
        }
        rewritten
    }

    /// The event at `offset` within the chunk, as readers see it.
    pub fn event(&self, offset: usize) -> StoredEvent {
        let event = &self.events[offset];
        StoredEvent {
            id: event.id,
            stream: self.stream.clone(),
            version: self.first_version + offset as u64,
            position: self.first_position + offset as u64,
            event_type: event.event_type.clone(),
            content_type: event.content_type.clone(),
            data: event.data.clone().into(),
            metadata: event.metadata.clone().into(),
            created_unix_ms: self.created_unix_ms,
        }
    }

    /// All its events, in position order, moved out (no copies of the payloads).
    pub fn into_events(self) -> Vec<StoredEvent> {
        let EventChunk { stream, first_version, first_position, created_unix_ms, events } = self;
        events
            .into_iter()
            .enumerate()
            .map(|(offset, event)| StoredEvent {
                id: event.id,
                stream: stream.clone(),
                version: first_version + offset as u64,
                position: first_position + offset as u64,
                event_type: event.event_type,
                content_type: event.content_type,
                data: event.data.into(),
                metadata: event.metadata.into(),
                created_unix_ms,
            })
            .collect()
    }

    /// The event at `position`, which the chunk must contain.
    pub fn event_at(&self, position: u64) -> StoredEvent {
        assert!(self.contains_position(position), "position {position} is not in this chunk");
        self.event((position - self.first_position) as usize)
    }

    /// Whether `event` can extend this chunk (same stream and time, next version).
    pub fn continues_with(&self, event: &StoredEvent) -> bool {
        self.stream == event.stream
            && self.created_unix_ms == event.created_unix_ms
            && event.version == self.first_version + self.len()
            && event.position == self.end_position()
            && self.events.len() < CHUNK_EVENTS_MAX
    }

    /// Adds `event`, which must continue the chunk.
    pub fn push(&mut self, event: StoredEvent) {
        assert!(self.continues_with(&event), "event does not continue the chunk");
        self.events.push(Self::of(event).events.pop().expect("one event"));
    }

    /// The part of the chunk within positions `[from, to)` (which must overlap it).
    pub fn cut(mut self, from: u64, to: u64) -> Self {
        let start = from.saturating_sub(self.first_position) as usize;
        let end = (to.min(self.end_position()) - self.first_position) as usize;
        assert!(start < end, "a cut keeps at least one event");
        self.events.truncate(end);
        self.events.drain(..start);
        self.first_position += start as u64;
        self.first_version += start as u64;
        self
    }

    /// A chunk of the single event `event`.
    pub fn of(event: StoredEvent) -> Self {
        Self {
            stream: event.stream,
            first_version: event.version,
            first_position: event.position,
            created_unix_ms: event.created_unix_ms,
            events: vec![NewEvent {
                id: event.id,
                event_type: event.event_type,
                content_type: event.content_type,
                data: event.data.into(),
                metadata: event.metadata.into(),
            }],
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_view_reads_the_keys_of_a_stored_chunk_and_borrows_the_rest() {
        let chunk = EventChunk {
            stream: "orders-7".into(),
            first_version: 41,
            first_position: 1_000,
            created_unix_ms: 1_700_000_000_000,
            events: (0..3u8)
                .map(|n| NewEvent {
                    id: [n + 1; 16],
                    event_type: format!("Type{n}"),
                    content_type: "application/json".into(),
                    data: vec![n; 300],
                    metadata: vec![7; n as usize],
                })
                .collect(),
        };
        let encoded = bincode::serialize(&chunk).unwrap();
        let view = ChunkView::decode(&encoded).unwrap();
        assert_eq!((view.stream, view.first_version, view.first_position, view.created_unix_ms), ("orders-7", 41, 1_000, chunk.created_unix_ms));
        assert_eq!(view.end_position(), chunk.end_position());
        for (seen, stored) in view.events.iter().zip(&chunk.events) {
            assert_eq!((seen.id, seen.event_type, seen.content_type), (stored.id, stored.event_type.as_str(), stored.content_type.as_str()));
            assert_eq!((seen.data, seen.metadata), (&stored.data[..], &stored.metadata[..]));
        }
        // Borrowed: the payload slices point into the encoded record.
        let range = encoded.as_ptr_range();
        assert!(range.contains(&view.events[2].data.as_ptr()));
        // Passed through as stored, it is what encoding the chunk gives.
        let passed = EncodedChunk::from_stored(&view, &encoded);
        let fresh = EncodedChunk::of(&chunk).unwrap();
        assert_eq!(fresh.end_position(), chunk.end_position());
        assert_eq!((passed.stream, passed.ids, passed.encoded), (fresh.stream, fresh.ids, fresh.encoded));
        // Read as events, it gives what the owned chunk gives, payloads sliced from the record.
        let shared = Bytes::from(encoded.clone());
        let view = ChunkView::decode(&shared).unwrap();
        let events = view.stored_events(&shared);
        assert_eq!(events, chunk.clone().into_events());
        assert!(shared.as_ptr_range().contains(&events[1].data.as_ptr()), "a slice of the record, not a copy");
        // Staged from borrowed parts, it is stored byte for byte as the owned chunk.
        assert_eq!(bincode::serialize(&chunk.as_chunk_ref()).unwrap(), encoded);
        assert_eq!(chunk.as_chunk_ref().end_position(), chunk.end_position());
    }

    /// The chunk `ChunkView::decode` read, as the owned chunk bincode would decode.
    fn owned(view: &ChunkView<'_>) -> EventChunk {
        EventChunk {
            stream: view.stream.into(),
            first_version: view.first_version,
            first_position: view.first_position,
            created_unix_ms: view.created_unix_ms,
            events: view
                .events
                .iter()
                .map(|e| NewEvent { id: e.id, event_type: e.event_type.into(), content_type: e.content_type.into(), data: e.data.into(), metadata: e.metadata.into() })
                .collect(),
        }
    }

    #[test]
    fn the_hand_decoder_reads_what_bincode_reads_and_refuses_what_it_refuses() {
        let chunks = [0usize, 1, 7].map(|n| EventChunk {
            stream: format!("strëam-{n}"),
            first_version: n as u64 * 3,
            first_position: u64::MAX - 10,
            created_unix_ms: -(n as i64),
            events: (0..n)
                .map(|i| NewEvent {
                    id: [i as u8 ^ 0x5a; 16],
                    event_type: if i == 2 { String::new() } else { format!("T{i}") },
                    content_type: "application/json".into(),
                    data: vec![i as u8; i * 100],
                    metadata: vec![9; i % 2],
                })
                .collect(),
        });
        for chunk in &chunks {
            let encoded = bincode::serialize(chunk).unwrap();
            assert_eq!(&owned(&ChunkView::decode(&encoded).unwrap()), chunk);
            // Trailing bytes are ignored, as by bincode::deserialize.
            let mut longer = encoded.clone();
            longer.extend_from_slice(b"tail");
            assert_eq!(&owned(&ChunkView::decode(&longer).unwrap()), chunk);
            // Every cut short encoding is refused, as bincode refuses it.
            for cut in 0..encoded.len() {
                let short = &encoded[..cut];
                assert!(bincode::deserialize::<EventChunk>(short).is_err());
                assert!(ChunkView::decode(short).is_none(), "cut at {cut}");
            }
        }
        // Bad UTF-8 in a string, and a count of events the bytes cannot hold.
        let mut encoded = bincode::serialize(&chunks[1]).unwrap();
        encoded[8] = 0xff; // the stream name's first byte
        assert!(bincode::deserialize::<EventChunk>(&encoded).is_err() && ChunkView::decode(&encoded).is_none());
        let mut encoded = bincode::serialize(&chunks[0]).unwrap();
        let count_at = encoded.len() - 8;
        encoded[count_at..].copy_from_slice(&u64::MAX.to_le_bytes());
        assert!(ChunkView::decode(&encoded).is_none());
        assert!(matches!(ChunkView::read(b"k", &encoded), Err(StorageError::Corrupt { .. })));
    }

    #[test]
    fn header_is_a_prefix_of_the_chunk_encoding() {
        let chunk = EventChunk {
            stream: "orders-7".into(),
            first_version: 3,
            first_position: 41,
            created_unix_ms: -5,
            events: (0..3u8)
                .map(|n| NewEvent { id: [n; 16], event_type: "t".into(), content_type: String::new(), data: vec![n; 9], metadata: vec![] })
                .collect(),
        };
        let encoded = bincode::serialize(&chunk).unwrap();
        let header: ChunkHeader<'_> = bincode::deserialize(&encoded).unwrap();
        assert_eq!((header.stream, header.first_version, header.first_position, header.created_unix_ms, header.len), ("orders-7", 3, 41, -5, 3));
    }
}
