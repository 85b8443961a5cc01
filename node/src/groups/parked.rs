//! Parked events: an event a group gave up on is appended to `$parked-{group}` as a copy
//! (same type, data and content type) whose metadata says where it came from and why, so
//! an operator can read it and `ReplayParked` can deliver the original again.
//!
//! The copy's id is derived from the group and the event's place (source cursor, or
//! parked version for a replayed one): parking the same event again, e.g. after a leader
//! change lost the first park's acknowledgement, is recognised by the id index and never
//! writes a second copy.

use base64::Engine as _;
use serde_json::json;
use strata_storage::{NewEvent, StoredEvent};

/// Where an event held by a group's runtime comes from: a replayed parked event (by its
/// version in `$parked-{group}`) or the group's source (by its cursor). Replays sort first.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Key {
    Replay(u64),
    Source(u64),
}

/// The id of the parked copy of the event at `key` in group `group_id`.
pub fn parked_id(group_id: u64, key: Key) -> [u8; 16] {
    let name = match key {
        Key::Source(cursor) => format!("strata/parked/{group_id}/source/{cursor}"),
        Key::Replay(version) => format!("strata/parked/{group_id}/replay/{version}"),
    };
    *uuid::Uuid::new_v5(&uuid::Uuid::NAMESPACE_OID, name.as_bytes()).as_bytes()
}

/// The parked copy of `event`.
pub fn parked_event(group: &str, group_id: u64, key: Key, event: &StoredEvent, retry_count: u32, reason: &str) -> NewEvent {
    let mut origin = json!({
        "group": group,
        "reason": reason,
        "retry_count": retry_count,
        "stream": event.stream,
        "version": event.version,
        "position": event.position,
        "event_id": uuid::Uuid::from_bytes(event.id).to_string(),
        "created_unix_ms": event.created_unix_ms,
    });
    match std::str::from_utf8(&event.metadata) {
        Ok(text) => origin["metadata"] = json!(text),
        Err(_) => origin["metadata_base64"] = json!(base64::engine::general_purpose::STANDARD.encode(&event.metadata)),
    }
    NewEvent {
        id: parked_id(group_id, key),
        event_type: event.event_type.clone(),
        content_type: event.content_type.clone(),
        data: event.data.to_vec(),
        metadata: json!({ "$parked": origin }).to_string().into_bytes(),
    }
}

/// The original event of a parked copy (None if the copy's metadata is not ours).
pub fn original_of(parked: StoredEvent) -> Option<StoredEvent> {
    let metadata: serde_json::Value = serde_json::from_slice(&parked.metadata).ok()?;
    let origin = metadata.get("$parked")?;
    let original_metadata = match (origin.get("metadata"), origin.get("metadata_base64")) {
        (Some(text), _) => text.as_str()?.as_bytes().to_vec(),
        (None, Some(encoded)) => base64::engine::general_purpose::STANDARD.decode(encoded.as_str()?).ok()?,
        (None, None) => Vec::new(),
    };
    Some(StoredEvent {
        id: *uuid::Uuid::parse_str(origin.get("event_id")?.as_str()?).ok()?.as_bytes(),
        stream: origin.get("stream")?.as_str()?.to_string(),
        version: origin.get("version")?.as_u64()?,
        position: origin.get("position")?.as_u64()?,
        event_type: parked.event_type,
        content_type: parked.content_type,
        data: parked.data,
        metadata: original_metadata.into(),
        created_unix_ms: origin.get("created_unix_ms")?.as_i64()?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(metadata: Vec<u8>) -> StoredEvent {
        StoredEvent {
            id: [3; 16],
            stream: "orders-1".into(),
            version: 4,
            position: 99,
            event_type: "OrderPlaced".into(),
            content_type: "application/json".into(),
            data: b"{\"total\":5}".to_vec().into(),
            metadata: metadata.into(),
            created_unix_ms: 1_700_000_000_000,
        }
    }

    #[test]
    fn a_parked_copy_gives_back_the_original() {
        for metadata in [b"{\"tenant\":\"a\"}".to_vec(), vec![0xff, 0x00, 0x80], vec![]] {
            let original = event(metadata);
            let copy = parked_event("billing", 7, Key::Source(99), &original, 3, "max retries");
            let stored = StoredEvent {
                id: copy.id,
                stream: "$parked-billing".into(),
                version: 0,
                position: 500,
                event_type: copy.event_type,
                content_type: copy.content_type,
                data: copy.data.into(),
                metadata: copy.metadata.into(),
                created_unix_ms: 1,
            };
            assert_eq!(original_of(stored), Some(original));
        }
    }

    #[test]
    fn parked_ids_depend_on_group_and_place_only() {
        assert_eq!(parked_id(1, Key::Source(5)), parked_id(1, Key::Source(5)));
        assert_ne!(parked_id(1, Key::Source(5)), parked_id(2, Key::Source(5)));
        assert_ne!(parked_id(1, Key::Source(5)), parked_id(1, Key::Replay(5)));
        assert!(Key::Replay(100) < Key::Source(0));
    }
}
