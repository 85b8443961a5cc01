//! The commands that travel through the Raft log and the outcomes of applying them.
//!
//! Commands are decided at apply time, not when they are proposed: that is what keeps
//! optimistic concurrency and idempotency correct across leader changes and retries
//! (SPEC §3, "The append path"). Everything a command needs that is not deterministic
//! (event ids the client left out, the creation timestamp) is filled in by the leader
//! before proposing.

use std::sync::Arc;

use serde::{Deserialize, Serialize};
use bytes::Bytes;

/// One Raft entry's worth of application commands.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Command {
    /// Appends batched by the leader's group commit: applied in order, each decided alone.
    /// Shared, so that an entry is cloned without its events (the raft log keeps recent
    /// entries in memory and hands out clones for replication and apply); encoded as the
    /// plain list.
    Appends(Arc<Vec<AppendCommand>>),
    /// One change to the replicated control state (snapshots, groups); its own entry.
    Control(crate::control::ControlCommand),
}

/// The expected version of an append (SPEC §3 item 3).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum ExpectedVersion {
    Any,
    NoStream,
    StreamExists,
    Exact(u64),
}

impl ExpectedVersion {
    /// Whether a stream whose last version is `head` (None = no stream) satisfies this.
    pub fn admits(self, head: Option<u64>) -> bool {
        match self {
            ExpectedVersion::Any => true,
            ExpectedVersion::NoStream => head.is_none(),
            ExpectedVersion::StreamExists => head.is_some(),
            ExpectedVersion::Exact(version) => head == Some(version),
        }
    }

    /// Where an idempotent replay of events first written at `first_version` must have put
    /// them for this expectation: an exact expectation pins the place, the others do not.
    pub fn admits_replay_at(self, first_version: u64) -> bool {
        match self {
            ExpectedVersion::Any | ExpectedVersion::StreamExists => true,
            ExpectedVersion::NoStream => first_version == 0,
            ExpectedVersion::Exact(version) => version.checked_add(1) == Some(first_version),
        }
    }
}

impl std::fmt::Display for ExpectedVersion {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ExpectedVersion::Any => f.write_str("any"),
            ExpectedVersion::NoStream => f.write_str("no_stream"),
            ExpectedVersion::StreamExists => f.write_str("stream_exists"),
            ExpectedVersion::Exact(version) => write!(f, "{version}"),
        }
    }
}

/// An event as proposed, already validated and with its id fixed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NewEvent {
    #[serde(with = "id_bytes")]
    pub id: [u8; 16],
    pub event_type: String,
    pub content_type: String,
    #[serde(with = "serde_bytes_compat")]
    pub data: Vec<u8>,
    #[serde(with = "serde_bytes_compat")]
    pub metadata: Vec<u8>,
}

impl NewEvent {
    /// What a scavenge leaves of this event: its id and a digest of its content (as
    /// `data`), with an empty event type marking it. Clients cannot write an empty type,
    /// so the marker is unambiguous. The digest keeps idempotency decisions the same on a
    /// node that has scavenged the event and on one that has not yet.
    pub fn scavenged(&self) -> NewEvent {
        if self.is_scavenged() {
            return self.clone();
        }
        NewEvent { id: self.id, event_type: String::new(), content_type: String::new(), data: self.content_digest().to_vec(), metadata: Vec::new() }
    }

    /// Whether this is what a scavenge left of an event.
    pub fn is_scavenged(&self) -> bool {
        self.event_type.is_empty()
    }

    /// SHA-256 over the length-prefixed type, content type, data and metadata.
    pub fn content_digest(&self) -> [u8; 32] {
        content_digest(&self.event_type, &self.content_type, &self.data, &self.metadata)
    }
}

fn content_digest(event_type: &str, content_type: &str, data: &[u8], metadata: &[u8]) -> [u8; 32] {
    use sha2::Digest;
    let mut hasher = sha2::Sha256::new();
    for part in [event_type.as_bytes(), content_type.as_bytes(), data, metadata] {
        hasher.update((part.len() as u64).to_le_bytes());
        hasher.update(part);
    }
    hasher.finalize().into()
}

/// One client append.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AppendCommand {
    pub stream: String,
    pub expected: ExpectedVersion,
    pub events: Vec<NewEvent>,
    /// Chosen by the leader when proposing, so every node stores the same value.
    pub created_unix_ms: i64,
}

impl AppendCommand {
    /// Bytes of the events' type, data and metadata: what sizes group-commit batches and
    /// apply groups.
    pub fn payload_bytes(&self) -> usize {
        self.events.iter().map(|e| e.data.len() + e.metadata.len() + e.event_type.len()).sum()
    }
}

/// What an append wrote (or, for an idempotent replay, had written before).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AppendSuccess {
    pub first_version: u64,
    pub last_version: u64,
    pub first_position: u64,
    pub last_position: u64,
    pub idempotent_replay: bool,
}

/// Why an append wrote nothing. Definite failures: retrying unchanged gives the same answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
pub enum AppendFailure {
    #[error("wrong expected version: stream=`{stream}` expected=`{expected}` actual=`{}`", display_head(*.actual))]
    WrongExpectedVersion { stream: String, expected: ExpectedVersion, actual: Option<u64> },
    #[error("idempotency conflict: {reason} stream=`{stream}` event_id=`{event_id}`")]
    IdempotencyConflict { stream: String, event_id: String, reason: String },
    /// The stream was hard-deleted: it can never be written again.
    #[error("stream is deleted: stream=`{stream}`")]
    StreamDeleted { stream: String },
}

fn display_head(head: Option<u64>) -> String {
    head.map_or_else(|| "no_stream".to_string(), |v| v.to_string())
}

pub type AppendOutcome = Result<AppendSuccess, AppendFailure>;

/// What applying one Raft entry decided: one outcome per append of an `Appends` entry, or
/// the outcome of a `Control` entry.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct EntryOutcome {
    pub appends: Vec<AppendOutcome>,
    pub control: Option<crate::control::ControlOutcome>,
}

/// An applied event as stored under its position.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoredEvent {
    #[serde(with = "id_bytes")]
    pub id: [u8; 16],
    pub stream: String,
    pub version: u64,
    pub position: u64,
    pub event_type: String,
    pub content_type: String,
    /// Payloads as `Bytes`: a read takes them as slices of the stored chunk it decoded,
    /// with no allocation or copy per event (reads serve 10^6 events/s).
    #[serde(with = "serde_bytes_compat")]
    pub data: Bytes,
    #[serde(with = "serde_bytes_compat")]
    pub metadata: Bytes,
    pub created_unix_ms: i64,
}

impl StoredEvent {
    /// Whether this is what a scavenge left of an event (never served to readers).
    pub fn is_scavenged(&self) -> bool {
        self.as_event_ref().is_scavenged()
    }

    /// Whether this stored event is the same event as `proposed` (for idempotent replays).
    /// A scavenged event compares by its content digest.
    pub fn same_content_as(&self, proposed: &NewEvent) -> bool {
        if self.is_scavenged() {
            return self.id == proposed.id && self.data[..] == proposed.content_digest()[..];
        }
        self.id == proposed.id
            && self.event_type == proposed.event_type
            && self.content_type == proposed.content_type
            && self.data == proposed.data
            && self.metadata == proposed.metadata
    }
}

/// A stored event as a read meets it: borrowed from the stored chunk it was decoded from
/// (or from a [`StoredEvent`]). A read that encodes events for the wire never owns them:
/// no allocation per event for its stream, type and content type.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EventRef<'a> {
    pub id: [u8; 16],
    pub stream: &'a str,
    pub version: u64,
    pub position: u64,
    pub event_type: &'a str,
    pub content_type: &'a str,
    pub data: &'a [u8],
    pub metadata: &'a [u8],
    pub created_unix_ms: i64,
}

impl EventRef<'_> {
    /// Whether this is what a scavenge left of an event (never served to readers).
    pub fn is_scavenged(&self) -> bool {
        self.event_type.is_empty()
    }

    /// The event, owned. `stored` is the buffer it was borrowed from, if the reader has it
    /// as shared bytes: the payloads are then slices of it, not copies.
    pub fn to_stored(&self, stored: Option<&Bytes>) -> StoredEvent {
        let payload = |part: &[u8]| match stored {
            Some(stored) => stored.slice_ref(part),
            None => Bytes::copy_from_slice(part),
        };
        StoredEvent {
            id: self.id,
            stream: self.stream.to_owned(),
            version: self.version,
            position: self.position,
            event_type: self.event_type.to_owned(),
            content_type: self.content_type.to_owned(),
            data: payload(self.data),
            metadata: payload(self.metadata),
            created_unix_ms: self.created_unix_ms,
        }
    }
}

impl StoredEvent {
    pub fn as_event_ref(&self) -> EventRef<'_> {
        EventRef {
            id: self.id,
            stream: &self.stream,
            version: self.version,
            position: self.position,
            event_type: &self.event_type,
            content_type: &self.content_type,
            data: &self.data,
            metadata: &self.metadata,
            created_unix_ms: self.created_unix_ms,
        }
    }
}

/// Where the events of a `$all` page go, one by one in read order, borrowed from storage:
/// into owned [`StoredEvent`]s (`Vec<StoredEvent>`), or straight into a wire encoding (the
/// node's reads, which so never build an owned event).
pub trait PageSink {
    /// Takes `event`. `stored` is the chunk it was borrowed from as shared bytes, when the
    /// sink [keeps payloads](PageSink::keeps_payloads) and the event came from a chunk.
    fn push(&mut self, event: &EventRef<'_>, stored: Option<&Bytes>);

    /// Takes an event that is owned already (read from the tier).
    fn push_stored(&mut self, event: StoredEvent) {
        self.push(&event.as_event_ref(), None);
    }

    /// Events taken.
    fn len(&self) -> usize;

    fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Whether the sink takes no more events (its bytes reached a bound, say): the page
    /// ends there, and the read continues from the next position.
    fn is_full(&self) -> bool {
        false
    }

    /// Whether [`PageSink::push`] wants the stored chunk as shared bytes (to keep slices of
    /// it), which costs a copy of a chunk read through a read-ahead window.
    fn keeps_payloads(&self) -> bool {
        false
    }
}

impl PageSink for Vec<StoredEvent> {
    fn push(&mut self, event: &EventRef<'_>, stored: Option<&Bytes>) {
        Vec::push(self, event.to_stored(stored));
    }

    fn push_stored(&mut self, event: StoredEvent) {
        Vec::push(self, event);
    }

    fn len(&self) -> usize {
        Vec::len(self)
    }

    fn keeps_payloads(&self) -> bool {
        true
    }
}

/// An event id in one piece: what bincode writes for a `[u8; 16]` (its sixteen bytes, no
/// length), written and read as one little-endian `u128` instead of sixteen `u8`s. The
/// encoding is byte for byte the same under `bincode::serialize`'s fixed-width little-endian
/// integers, the only format these types are stored or sent in; a follower spent about 4 %
/// of its CPU reading ids a byte at a time.
pub(crate) mod id_bytes {
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(id: &[u8; 16], serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_u128(u128::from_le_bytes(*id))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(deserializer: D) -> Result<[u8; 16], D::Error> {
        Ok(u128::deserialize(deserializer)?.to_le_bytes())
    }
}

/// Byte vectors as one length-prefixed blob (bincode writes `Vec<u8>` element by element
/// otherwise, which is several times slower to encode and decode).
pub(crate) mod serde_bytes_compat {
    use serde::{Deserializer, Serializer};

    pub fn serialize<S: Serializer>(bytes: &impl AsRef<[u8]>, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_bytes(bytes.as_ref())
    }

    /// Into a `Vec<u8>` or a `Bytes` (which takes the vector without a copy).
    pub fn deserialize<'de, D: Deserializer<'de>, T: From<Vec<u8>>>(deserializer: D) -> Result<T, D::Error> {
        Ok(T::from(deserialize_vec(deserializer)?))
    }

    fn deserialize_vec<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Vec<u8>, D::Error> {
        struct Visitor;
        impl<'de> serde::de::Visitor<'de> for Visitor {
            type Value = Vec<u8>;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("bytes")
            }
            fn visit_bytes<E: serde::de::Error>(self, v: &[u8]) -> Result<Vec<u8>, E> {
                Ok(v.to_vec())
            }
            fn visit_byte_buf<E: serde::de::Error>(self, v: Vec<u8>) -> Result<Vec<u8>, E> {
                Ok(v)
            }
            fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<Vec<u8>, A::Error> {
                let mut out = Vec::with_capacity(seq.size_hint().unwrap_or(0));
                while let Some(b) = seq.next_element()? {
                    out.push(b);
                }
                Ok(out)
            }
        }
        deserializer.deserialize_byte_buf(Visitor)
    }
}

impl Command {
    pub fn appends(appends: Vec<AppendCommand>) -> Self {
        Command::Appends(Arc::new(appends))
    }
}

impl std::fmt::Display for Command {
    /// A short summary for openraft's logs (never the event payloads).
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Command::Appends(appends) => {
                let events: usize = appends.iter().map(|a| a.events.len()).sum();
                write!(f, "appends(count={}, events={events})", appends.len())
            }
            Command::Control(control) => write!(f, "control({})", control.label()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn expected_version_admits_heads() {
        assert!(ExpectedVersion::Any.admits(None));
        assert!(ExpectedVersion::Any.admits(Some(3)));
        assert!(ExpectedVersion::NoStream.admits(None));
        assert!(!ExpectedVersion::NoStream.admits(Some(0)));
        assert!(ExpectedVersion::StreamExists.admits(Some(0)));
        assert!(!ExpectedVersion::StreamExists.admits(None));
        assert!(ExpectedVersion::Exact(4).admits(Some(4)));
        assert!(!ExpectedVersion::Exact(4).admits(Some(5)));
        assert!(!ExpectedVersion::Exact(0).admits(None));
    }

    #[test]
    fn replay_placement_follows_the_expectation() {
        assert!(ExpectedVersion::NoStream.admits_replay_at(0));
        assert!(!ExpectedVersion::NoStream.admits_replay_at(1));
        assert!(ExpectedVersion::Exact(4).admits_replay_at(5));
        assert!(!ExpectedVersion::Exact(4).admits_replay_at(4));
        assert!(!ExpectedVersion::Exact(u64::MAX).admits_replay_at(0));
        assert!(ExpectedVersion::Any.admits_replay_at(17));
    }

    #[test]
    fn a_scavenged_event_keeps_its_id_and_compares_by_digest() {
        let event = NewEvent { id: [3; 16], event_type: "Placed".into(), content_type: "application/json".into(), data: vec![9; 4096], metadata: b"m".to_vec() };
        let left = event.scavenged();
        assert!(left.is_scavenged() && !event.is_scavenged());
        assert_eq!((left.id, left.data.len(), left.metadata.len()), ([3; 16], 32, 0), "the payload is gone");
        assert_eq!(left.scavenged(), left, "scavenging twice changes nothing");
        let stored = |e: &NewEvent| StoredEvent {
            id: e.id, stream: "s".into(), version: 0, position: 0, event_type: e.event_type.clone(),
            content_type: e.content_type.clone(), data: e.data.clone().into(), metadata: e.metadata.clone().into(), created_unix_ms: 0,
        };
        assert!(stored(&left).is_scavenged());
        assert!(stored(&left).same_content_as(&event), "the same content still replays");
        let other = NewEvent { data: vec![8; 4096], ..event.clone() };
        assert!(!stored(&left).same_content_as(&other), "different content still conflicts");
        assert_eq!(stored(&event).same_content_as(&other), stored(&left).same_content_as(&other));
    }

    #[test]
    fn stored_event_round_trips_through_bincode() {
        let event = StoredEvent {
            id: [7; 16],
            stream: "orders-1".into(),
            version: 3,
            position: 99,
            event_type: "OrderPlaced".into(),
            content_type: "application/json".into(),
            data: b"{\"a\":1}".to_vec().into(),
            metadata: Bytes::new(),
            created_unix_ms: 1_700_000_000_000,
        };
        let bytes = bincode::serialize(&event).unwrap();
        assert_eq!(bincode::deserialize::<StoredEvent>(&bytes).unwrap(), event);
    }

    #[test]
    fn an_id_encodes_exactly_as_a_byte_array_does() {
        // What earlier versions wrote (the derived `[u8; 16]` encoding): stored chunks, Raft
        // logs and snapshots must read the same, and a mixed-version cluster must agree.
        #[derive(Serialize, Deserialize, PartialEq, Debug)]
        struct ArrayId {
            id: [u8; 16],
            rest: u64,
        }
        #[derive(Serialize, Deserialize, PartialEq, Debug)]
        struct OnePiece {
            #[serde(with = "id_bytes")]
            id: [u8; 16],
            rest: u64,
        }
        let id: [u8; 16] = std::array::from_fn(|i| (i as u8).wrapping_mul(37).wrapping_add(1));
        let as_array = bincode::serialize(&ArrayId { id, rest: 9 }).unwrap();
        assert_eq!(bincode::serialize(&OnePiece { id, rest: 9 }).unwrap(), as_array);
        assert_eq!(bincode::deserialize::<OnePiece>(&as_array).unwrap(), OnePiece { id, rest: 9 });
        // Too short is an error, not a guess.
        assert!(bincode::deserialize::<OnePiece>(&as_array[..10]).is_err());
    }
}
