//! `strata.v1.ReadResponse`, written by hand so that a server can send events it encoded
//! straight from their stored form.
//!
//! A read serves up to a million events a second. Building a [`RecordedEvent`] per event
//! costs an allocation for each of its strings (and the id's text), and prost then walks
//! every event twice more (its length, then its bytes); [`EncodedEvents::push`] writes an
//! event's wire form in one pass from borrowed fields. On the wire nothing changes: the
//! pushed events are field 1 entries like the others, and a receiver decodes every event of
//! a message into [`ReadResponse::events`].

use prost::bytes::{Buf, BufMut};
use prost::encoding::{self, DecodeContext, WireType};
use prost::{DecodeError, Message};

use crate::v1::RecordedEvent;

/// Tag of `ReadResponse.events` (see streams.proto).
const EVENTS_TAG: u32 = 1;
/// Tag of `ReadResponse.commit_token`.
const COMMIT_TOKEN_TAG: u32 = 2;

/// One chunk of a read; a read is a stream of these (streams.proto).
#[derive(Clone, PartialEq, Default, Debug)]
pub struct ReadResponse {
    /// The events of this message, in read order: a decoded message holds all of them here.
    pub events: Vec<RecordedEvent>,
    /// The node's applied state the read was served from.
    pub commit_token: String,
    /// Events already in wire form, sent after `events` (a server's way to send them).
    pub encoded: EncodedEvents,
}

impl ReadResponse {
    /// Decodes one `events` entry: through [`decode_canonical_event`] when it has the shape
    /// a Strata server writes, else through prost (which defines the result).
    fn merge_event(&mut self, wire_type: WireType, buf: &mut impl Buf, ctx: DecodeContext) -> Result<(), DecodeError> {
        // A slice of the received buffer for a receiver that holds one (tonic's): no copy.
        let mut bytes = prost::bytes::Bytes::new();
        encoding::bytes::merge(wire_type, &mut bytes, buf, ctx)?;
        if self.events.capacity() == 0 {
            // The events of one message are alike in size: room for as many as the rest of
            // it would hold of this one's (at most a few times the message's own size),
            // instead of growing (and copying) the vector a dozen times over a page.
            self.events.reserve(1 + buf.remaining() / (bytes.len() + 2).max(EVENT_BYTES_FLOOR));
        }
        // (A RecordedEvent nests no message: prost's own depth limit has nothing to count.)
        let event = match decode_canonical_event(&bytes) {
            Some(event) => event,
            None => RecordedEvent::decode(bytes)?,
        };
        self.events.push(event);
        Ok(())
    }
}

/// Fewest bytes a `RecordedEvent` is reckoned to take when sizing a message's vector (its id
/// alone takes 38): bounds that vector to a few times the message's own size.
const EVENT_BYTES_FLOOR: usize = 40;

/// A `RecordedEvent` whose fields come once each, in tag order, with their proper wire types
/// (what prost and [`EncodedEvents`] write), decoded straight from its bytes: the payloads as
/// slices of `bytes`. None for anything else (prost then decodes it, and reports what is
/// wrong), so the result is always what prost would decode.
///
/// A client reads a million events a second: prost's generic decoding (a varint call per
/// key, its loop over any `Buf`) was the largest part of a read-back's client.
pub fn decode_canonical_event(bytes: &prost::bytes::Bytes) -> Option<RecordedEvent> {
    let input: &[u8] = bytes;
    let mut at = 0usize;
    let mut event = RecordedEvent::default();
    let mut last_tag = 0u64;
    while at < input.len() {
        let key = read_varint(input, &mut at)?;
        let (tag, wire_type) = (key >> 3, key & 7);
        if tag <= last_tag {
            return None; // out of order or repeated: prost's merge rules apply
        }
        last_tag = tag;
        if wire_type == WireType::Varint as u64 {
            let value = read_varint(input, &mut at)?;
            match tag {
                3 => event.version = value,
                4 => event.position = value,
                9 => event.created_unix_ms = value as i64,
                _ => return None,
            }
            continue;
        }
        if wire_type != WireType::LengthDelimited as u64 {
            return None;
        }
        let len = usize::try_from(read_varint(input, &mut at)?).ok()?;
        let end = at.checked_add(len).filter(|end| *end <= input.len())?;
        let part = &input[at..end];
        let text = || std::str::from_utf8(part).ok().map(str::to_owned);
        match tag {
            1 => event.id = text()?,
            2 => event.stream = text()?,
            5 => event.r#type = text()?,
            6 => event.data = bytes.slice(at..end),
            7 => event.metadata = bytes.slice(at..end),
            8 => event.content_type = text()?,
            _ => return None,
        }
        at = end;
    }
    Some(event)
}

/// A varint of at most 10 bytes that fits a u64, else None.
fn read_varint(input: &[u8], at: &mut usize) -> Option<u64> {
    let mut value = 0u64;
    for shift in (0..64).step_by(7) {
        let byte = *input.get(*at)?;
        *at += 1;
        if shift == 63 && byte > 1 {
            return None;
        }
        value |= u64::from(byte & 0x7f) << shift;
        if byte < 0x80 {
            return Some(value);
        }
    }
    None
}

impl Message for ReadResponse {
    fn encode_raw(&self, buf: &mut impl BufMut) {
        encoding::message::encode_repeated(EVENTS_TAG, &self.events, buf);
        buf.put_slice(&self.encoded.bytes);
        if !self.commit_token.is_empty() {
            encoding::string::encode(COMMIT_TOKEN_TAG, &self.commit_token, buf);
        }
    }

    fn merge_field(&mut self, tag: u32, wire_type: WireType, buf: &mut impl Buf, ctx: DecodeContext) -> Result<(), DecodeError> {
        match tag {
            EVENTS_TAG => self.merge_event(wire_type, buf, ctx).map_err(|mut e| {
                e.push("ReadResponse", "events");
                e
            }),
            COMMIT_TOKEN_TAG => encoding::string::merge(wire_type, &mut self.commit_token, buf, ctx).map_err(|mut e| {
                e.push("ReadResponse", "commit_token");
                e
            }),
            _ => encoding::skip_field(wire_type, tag, buf, ctx),
        }
    }

    fn encoded_len(&self) -> usize {
        let token = if self.commit_token.is_empty() { 0 } else { encoding::string::encoded_len(COMMIT_TOKEN_TAG, &self.commit_token) };
        encoding::message::encoded_len_repeated(EVENTS_TAG, &self.events) + self.encoded.bytes.len() + token
    }

    fn clear(&mut self) {
        self.events.clear();
        self.commit_token.clear();
        self.encoded = EncodedEvents::default();
    }
}

/// An event's fields, borrowed from wherever it is stored: what [`EncodedEvents::push`]
/// writes as a [`RecordedEvent`] (the id as its 16 bytes; it goes out as UUID text).
#[derive(Debug, Clone, Copy)]
pub struct RecordedEventRef<'a> {
    pub id: [u8; 16],
    pub stream: &'a str,
    pub version: u64,
    pub position: u64,
    pub event_type: &'a str,
    pub data: &'a [u8],
    pub metadata: &'a [u8],
    pub content_type: &'a str,
    pub created_unix_ms: i64,
}

/// Bytes of a UUID's hyphenated text (8-4-4-4-12 hex digits).
const UUID_TEXT_BYTES: usize = 36;

impl RecordedEventRef<'_> {
    /// The length of its `RecordedEvent` encoding (without the enclosing field's key and
    /// length), field for field as prost computes it: proto3 omits empty and zero fields.
    fn encoded_len(&self) -> usize {
        let text = |tag: u32, len: usize| if len == 0 { 0 } else { encoding::key_len(tag) + encoding::encoded_len_varint(len as u64) + len };
        let number = |tag: u32, value: u64| if value == 0 { 0 } else { encoding::key_len(tag) + encoding::encoded_len_varint(value) };
        text(1, UUID_TEXT_BYTES)
            + text(2, self.stream.len())
            + number(3, self.version)
            + number(4, self.position)
            + text(5, self.event_type.len())
            + text(6, self.data.len())
            + text(7, self.metadata.len())
            + text(8, self.content_type.len())
            + number(9, self.created_unix_ms as u64)
    }

    /// Writes its `RecordedEvent` fields in tag order, as prost does.
    fn encode_fields(&self, buf: &mut Vec<u8>) {
        let text = |buf: &mut Vec<u8>, tag: u32, bytes: &[u8]| {
            if !bytes.is_empty() {
                put_varint(buf, u64::from(tag << 3 | WireType::LengthDelimited as u32));
                put_varint(buf, bytes.len() as u64);
                buf.extend_from_slice(bytes);
            }
        };
        let number = |buf: &mut Vec<u8>, tag: u32, value: u64| {
            if value != 0 {
                put_varint(buf, u64::from(tag << 3 | WireType::Varint as u32));
                put_varint(buf, value);
            }
        };
        text(buf, 1, &uuid_text(&self.id));
        text(buf, 2, self.stream.as_bytes());
        number(buf, 3, self.version);
        number(buf, 4, self.position);
        text(buf, 5, self.event_type.as_bytes());
        text(buf, 6, self.data);
        text(buf, 7, self.metadata);
        text(buf, 8, self.content_type.as_bytes());
        number(buf, 9, self.created_unix_ms as u64);
    }
}

/// A varint, as prost's `encode_varint` writes it, inlined: an event's keys and lengths are
/// a dozen one-byte varints, and a call per varint was a visible part of a read's server.
#[inline(always)]
fn put_varint(buf: &mut Vec<u8>, mut value: u64) {
    while value >= 0x80 {
        buf.push(value as u8 | 0x80);
        value >>= 7;
    }
    buf.push(value as u8);
}

/// The hyphenated lower-case text of a UUID, as `uuid`'s `hyphenated()` writes it.
fn uuid_text(id: &[u8; 16]) -> [u8; UUID_TEXT_BYTES] {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let mut text = [b'-'; UUID_TEXT_BYTES];
    let mut at = 0;
    for (index, byte) in id.iter().enumerate() {
        if matches!(index, 4 | 6 | 8 | 10) {
            at += 1; // past a hyphen
        }
        text[at] = HEX[(byte >> 4) as usize];
        text[at + 1] = HEX[(byte & 0xf) as usize];
        at += 2;
    }
    text
}

/// Events in their wire form as `ReadResponse.events` entries, and how many.
#[derive(Clone, PartialEq, Default, Debug)]
pub struct EncodedEvents {
    bytes: Vec<u8>,
    count: usize,
}

impl EncodedEvents {
    /// Room for about `bytes` of encoded events.
    pub fn with_capacity(bytes: usize) -> Self {
        Self { bytes: Vec::with_capacity(bytes), count: 0 }
    }

    /// Appends `event` as one more `events` entry.
    pub fn push(&mut self, event: &RecordedEventRef<'_>) {
        let len = event.encoded_len();
        self.bytes.reserve(encoding::key_len(EVENTS_TAG) + encoding::encoded_len_varint(len as u64) + len);
        put_varint(&mut self.bytes, u64::from(EVENTS_TAG << 3 | WireType::LengthDelimited as u32));
        put_varint(&mut self.bytes, len as u64);
        let start = self.bytes.len();
        event.encode_fields(&mut self.bytes);
        debug_assert_eq!(self.bytes.len() - start, len, "encoded_len agrees with encode_fields");
        self.count += 1;
    }

    /// Events pushed.
    pub fn len(&self) -> usize {
        self.count
    }

    pub fn is_empty(&self) -> bool {
        self.count == 0
    }

    /// Bytes they take on the wire.
    pub fn byte_len(&self) -> usize {
        self.bytes.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(id: [u8; 16], stream: &'static str, version: u64, position: u64, created_unix_ms: i64) -> RecordedEventRef<'static> {
        RecordedEventRef {
            id,
            stream,
            version,
            position,
            event_type: "OrderPlaced",
            data: b"{\"total\":300}",
            metadata: b"",
            content_type: "application/json",
            created_unix_ms,
        }
    }

    fn as_prost(event: &RecordedEventRef<'_>) -> RecordedEvent {
        RecordedEvent {
            id: String::from_utf8(uuid_text(&event.id).to_vec()).unwrap(),
            stream: event.stream.into(),
            version: event.version,
            position: event.position,
            r#type: event.event_type.into(),
            data: event.data.to_vec().into(),
            metadata: event.metadata.to_vec().into(),
            content_type: event.content_type.into(),
            created_unix_ms: event.created_unix_ms,
        }
    }

    #[test]
    fn uuid_text_is_the_hyphenated_lower_case_form() {
        let id: [u8; 16] = std::array::from_fn(|i| (i as u8) * 17);
        assert_eq!(&uuid_text(&id), b"00112233-4455-6677-8899-aabbccddeeff");
    }

    #[test]
    fn pushed_events_encode_exactly_as_prost_encodes_them() {
        let events = [
            sample([7; 16], "orders-1", 0, 0, 0),
            sample([0xab; 16], "orders-2", 5, 1 << 40, 1_700_000_000_000),
            // Zero fields are omitted, large and negative ones take their long varints.
            RecordedEventRef { event_type: "", content_type: "", data: &[], metadata: &[0; 300], ..sample([1; 16], "s", u64::MAX, 127, -1) },
        ];
        let mut encoded = EncodedEvents::default();
        events.iter().for_each(|event| encoded.push(event));
        let by_hand = ReadResponse { commit_token: "c-17".into(), encoded, ..Default::default() };
        let by_prost = ReadResponse { events: events.iter().map(as_prost).collect(), commit_token: "c-17".into(), ..Default::default() };

        assert_eq!(by_hand.encoded_len(), by_prost.encoded_len());
        assert_eq!(by_hand.encode_to_vec(), by_prost.encode_to_vec());
        assert_eq!(by_hand.encoded.len(), 3);
        // A receiver decodes them all into `events`.
        let decoded = ReadResponse::decode(by_hand.encode_to_vec().as_slice()).unwrap();
        assert_eq!(decoded, by_prost);
    }

    #[test]
    fn decoded_and_encoded_events_travel_together_in_order() {
        let first = sample([2; 16], "a", 1, 10, 5);
        let second = sample([3; 16], "b", 2, 11, 5);
        let mut encoded = EncodedEvents::default();
        encoded.push(&second);
        let message = ReadResponse { events: vec![as_prost(&first)], commit_token: String::new(), encoded };
        let decoded = ReadResponse::decode(message.encode_to_vec().as_slice()).unwrap();
        assert_eq!(decoded.events, vec![as_prost(&first), as_prost(&second)]);
        assert!(decoded.encoded.is_empty());
    }

    /// What prost alone decodes from `bytes` as a RecordedEvent.
    fn by_prost(bytes: &[u8]) -> Result<RecordedEvent, DecodeError> {
        RecordedEvent::decode(bytes)
    }

    #[test]
    fn canonical_events_decode_as_prost_decodes_them() {
        let events = [
            sample([7; 16], "orders-1", 0, 0, 0),
            sample([0xab; 16], "orders-2", 5, 1 << 40, 1_700_000_000_000),
            RecordedEventRef { event_type: "", content_type: "", data: &[], metadata: &[0; 300], ..sample([1; 16], "s", u64::MAX, 127, -1) },
        ];
        for event in &events {
            let bytes: prost::bytes::Bytes = as_prost(event).encode_to_vec().into();
            assert_eq!(decode_canonical_event(&bytes), Some(by_prost(&bytes).unwrap()));
        }
    }

    #[test]
    fn anything_but_the_canonical_shape_is_left_to_prost() {
        let event = as_prost(&sample([9; 16], "s-1", 3, 4, 5));
        let mut repeated = event.encode_to_vec();
        encoding::string::encode(2, &"other".to_string(), &mut repeated); // a field again: prost's last one wins
        let mut unknown = event.encode_to_vec();
        encoding::uint64::encode(42, &1, &mut unknown);
        let mut wrong_type = Vec::new();
        encoding::uint64::encode(2, &7, &mut wrong_type); // stream as a varint: an error
        let mut bad_utf8 = Vec::new();
        encoding::bytes::encode(5, &vec![0xff, 0xfe], &mut bad_utf8);
        let truncated = event.encode_to_vec()[..20].to_vec();
        let overlong = vec![0x18, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x7f];
        for bytes in [repeated, unknown, wrong_type, bad_utf8, truncated, overlong] {
            let bytes: prost::bytes::Bytes = bytes.into();
            assert_eq!(decode_canonical_event(&bytes), None, "{bytes:?}");
            // Through the message, prost's answer stands (a value or an error).
            let mut message = Vec::new();
            encoding::bytes::encode(1, &bytes.to_vec(), &mut message);
            let decoded = ReadResponse::decode(message.as_slice()).map(|m| m.events);
            assert_eq!(decoded.map_err(|_| ()), by_prost(&bytes).map(|e| vec![e]).map_err(|_| ()));
        }
    }

    #[test]
    fn a_message_of_many_events_decodes_whole_and_in_order() {
        let ids: Vec<[u8; 16]> = (0..500u16).map(|n| { let mut id = [0u8; 16]; id[..2].copy_from_slice(&n.to_be_bytes()); id }).collect();
        let mut encoded = EncodedEvents::default();
        ids.iter().enumerate().for_each(|(n, id)| encoded.push(&sample(*id, "s", n as u64, 1000 + n as u64, 1)));
        let message = ReadResponse { encoded, commit_token: "7".into(), ..Default::default() }.encode_to_vec();
        let decoded = ReadResponse::decode(message.as_slice()).unwrap();
        assert_eq!(decoded.events.len(), 500);
        assert!(decoded.events.iter().enumerate().all(|(n, e)| e.version == n as u64 && e.position == 1000 + n as u64));
        assert_eq!(decoded.commit_token, "7");
    }

    #[test]
    fn unknown_fields_are_skipped() {
        let mut bytes = ReadResponse { commit_token: "t".into(), ..Default::default() }.encode_to_vec();
        encoding::uint64::encode(99, &5, &mut bytes);
        let decoded = ReadResponse::decode(bytes.as_slice()).unwrap();
        assert_eq!(decoded.commit_token, "t");
    }
}
