//! Request validation (SPEC §3 item 9, §8): bad input gets a typed error naming the field
//! and the limit, and nothing is proposed.

use strata_proto::v1::{AppendRequest, ExpectedVersionKind};
use strata_storage::{AppendCommand, ExpectedVersion, NewEvent};

use crate::error::ApiError;
use crate::limits::*;

const DEFAULT_CONTENT_TYPE: &str = "application/octet-stream";

fn invalid(field: impl Into<String>, reason: impl Into<String>) -> ApiError {
    ApiError::InvalidArgument { field: field.into(), reason: reason.into() }
}

/// A request field over a named limit.
pub(crate) fn over(field: impl Into<String>, limit_name: &'static str, limit_value: usize, actual: usize) -> ApiError {
    ApiError::OverLimit { field: field.into(), limit_name, limit_value: limit_value as u64, actual: actual as u64 }
}

/// A stream name a client may write or read: 1–256 bytes, no control characters, not
/// reserved (`$`-prefixed names belong to the system).
pub fn user_stream_name(field: &str, name: &str) -> Result<(), ApiError> {
    stream_name_shape(field, name)?;
    if name.starts_with('$') {
        return Err(invalid(field, format!("stream names starting with `$` are reserved for the system, got `{name}`")));
    }
    Ok(())
}

/// A stream name's shape (reads may name system streams).
pub fn stream_name_shape(field: &str, name: &str) -> Result<(), ApiError> {
    if name.is_empty() {
        return Err(invalid(field, "stream name must not be empty"));
    }
    if name.len() > STREAM_NAME_BYTES_MAX {
        return Err(over(field, "STREAM_NAME_BYTES_MAX", STREAM_NAME_BYTES_MAX, name.len()));
    }
    if name.chars().any(char::is_control) {
        return Err(invalid(field, "stream name must not contain control characters"));
    }
    Ok(())
}

/// The expected version of an append request.
pub fn expected_version(request: &AppendRequest) -> Result<ExpectedVersion, ApiError> {
    expected_of(request.expected_kind, request.expected_version)
}

/// An expected version from its wire kind and version.
pub fn expected_of(kind: i32, version: u64) -> Result<ExpectedVersion, ApiError> {
    match ExpectedVersionKind::try_from(kind) {
        Ok(ExpectedVersionKind::Any) => Ok(ExpectedVersion::Any),
        Ok(ExpectedVersionKind::NoStream) => Ok(ExpectedVersion::NoStream),
        Ok(ExpectedVersionKind::StreamExists) => Ok(ExpectedVersion::StreamExists),
        Ok(ExpectedVersionKind::Exact) => Ok(ExpectedVersion::Exact(version)),
        Ok(ExpectedVersionKind::Unspecified) => Err(invalid(
            "expected_kind",
            "expected version must be set: any, no_stream, stream_exists or exact",
        )),
        Err(_) => Err(invalid("expected_kind", format!("unknown expected version kind {kind}"))),
    }
}

/// Parses a client event id; empty means "generate one".
/// `field` names the field in an error (built only then: this runs for every event).
fn event_id(field: impl Fn() -> String, id: &str) -> Result<[u8; 16], ApiError> {
    if id.is_empty() {
        // uuid's fast-rng: a thread-local generator seeded from the OS, not a getrandom
        // call per event.
        return Ok(*uuid::Uuid::new_v4().as_bytes());
    }
    let parsed = uuid::Uuid::parse_str(id).map_err(|_| invalid(field(), format!("event id is not a uuid: `{id}`")))?;
    if parsed.is_nil() {
        return Err(invalid(field(), "event id must not be the nil uuid"));
    }
    Ok(*parsed.as_bytes())
}

/// Validates an append request against the limits and turns it into a command.
/// `request_bytes` is the encoded size; `event_bytes_max` the configured event limit.
pub fn append_command(
    request: AppendRequest,
    request_bytes: usize,
    event_bytes_max: usize,
    created_unix_ms: i64,
) -> Result<AppendCommand, ApiError> {
    user_stream_name("stream", &request.stream)?;
    let expected = expected_version(&request)?;
    if request_bytes > APPEND_REQUEST_BYTES_MAX {
        return Err(over("request", "APPEND_REQUEST_BYTES_MAX", APPEND_REQUEST_BYTES_MAX, request_bytes));
    }
    if request.events.is_empty() {
        return Err(invalid("events", "an append must carry at least one event"));
    }
    if request.events.len() > EVENTS_PER_APPEND_MAX {
        return Err(over("events", "EVENTS_PER_APPEND_MAX", EVENTS_PER_APPEND_MAX, request.events.len()));
    }
    let mut events = Vec::with_capacity(request.events.len());
    let mut ids = std::collections::HashSet::with_capacity(request.events.len());
    for (index, event) in request.events.into_iter().enumerate() {
        let field = |name: &str| format!("events[{index}].{name}");
        if event.r#type.is_empty() {
            return Err(invalid(field("type"), "event type must not be empty"));
        }
        if event.r#type.len() > EVENT_TYPE_BYTES_MAX {
            return Err(over(field("type"), "EVENT_TYPE_BYTES_MAX", EVENT_TYPE_BYTES_MAX, event.r#type.len()));
        }
        if event.r#type.chars().any(char::is_control) {
            return Err(invalid(field("type"), "event type must not contain control characters"));
        }
        if event.content_type.len() > CONTENT_TYPE_BYTES_MAX {
            return Err(over(field("content_type"), "CONTENT_TYPE_BYTES_MAX", CONTENT_TYPE_BYTES_MAX, event.content_type.len()));
        }
        if event.metadata.len() > METADATA_BYTES_MAX {
            return Err(over(field("metadata"), "METADATA_BYTES_MAX", METADATA_BYTES_MAX, event.metadata.len()));
        }
        let size = event.data.len() + event.metadata.len() + event.r#type.len();
        if size > event_bytes_max {
            return Err(over(field("data"), "EVENT_BYTES_MAX", event_bytes_max, size));
        }
        let id = event_id(|| field("id"), &event.id)?;
        if !ids.insert(id) {
            return Err(invalid(field("id"), format!("event id repeated within one append: `{}`", event.id)));
        }
        let content_type = if event.content_type.is_empty() { DEFAULT_CONTENT_TYPE.to_string() } else { event.content_type };
        events.push(NewEvent { id, event_type: event.r#type, content_type, data: event.data.to_vec(), metadata: event.metadata.to_vec() });
    }
    Ok(AppendCommand { stream: request.stream, expected, events, created_unix_ms })
}

#[cfg(test)]
mod tests {
    use super::*;
    use strata_proto::v1::ProposedEvent;

    fn request(stream: &str, events: Vec<ProposedEvent>) -> AppendRequest {
        AppendRequest { stream: stream.into(), expected_kind: ExpectedVersionKind::Any as i32, expected_version: 0, events }
    }

    fn event(id: &str, data_bytes: usize) -> ProposedEvent {
        ProposedEvent { id: id.into(), r#type: "T".into(), data: vec![b'x'; data_bytes].into(), metadata: Default::default(), content_type: String::new() }
    }

    fn field_of(e: ApiError) -> String {
        match e {
            ApiError::InvalidArgument { field, .. } | ApiError::OverLimit { field, .. } => field,
            other => panic!("unexpected {other:?}"),
        }
    }

    #[test]
    fn bad_stream_names_are_rejected() {
        for name in ["", "$all", "a\u{7}b"] {
            let e = append_command(request(name, vec![event("", 1)]), 10, EVENT_BYTES_MAX_DEFAULT, 0).unwrap_err();
            assert_eq!(field_of(e), "stream");
        }
        let long = "x".repeat(STREAM_NAME_BYTES_MAX + 1);
        let e = append_command(request(&long, vec![event("", 1)]), 10, EVENT_BYTES_MAX_DEFAULT, 0).unwrap_err();
        assert!(matches!(e, ApiError::OverLimit { limit_name: "STREAM_NAME_BYTES_MAX", .. }));
    }

    #[test]
    fn bad_events_are_rejected_naming_the_field() {
        let nil = uuid::Uuid::nil().to_string();
        assert_eq!(field_of(append_command(request("s", vec![event(&nil, 1)]), 10, 100, 0).unwrap_err()), "events[0].id");
        assert_eq!(field_of(append_command(request("s", vec![event("nope", 1)]), 10, 100, 0).unwrap_err()), "events[0].id");
        let e = append_command(request("s", vec![event("", 1), event("", 200)]), 10, 100, 0).unwrap_err();
        assert!(matches!(e, ApiError::OverLimit { limit_name: "EVENT_BYTES_MAX", .. }));
        let many = (0..EVENTS_PER_APPEND_MAX + 1).map(|_| event("", 0)).collect();
        let e = append_command(request("s", many), 10, 100, 0).unwrap_err();
        assert!(matches!(e, ApiError::OverLimit { limit_name: "EVENTS_PER_APPEND_MAX", .. }));
        assert_eq!(field_of(append_command(request("s", vec![]), 10, 100, 0).unwrap_err()), "events");
        let id = uuid::Uuid::new_v4().to_string();
        assert_eq!(field_of(append_command(request("s", vec![event(&id, 1), event(&id, 1)]), 10, 100, 0).unwrap_err()), "events[1].id");
    }

    #[test]
    fn unknown_or_unset_expected_version_is_rejected() {
        let mut r = request("s", vec![event("", 1)]);
        r.expected_kind = 99;
        assert_eq!(field_of(append_command(r.clone(), 10, 100, 0).unwrap_err()), "expected_kind");
        r.expected_kind = 0;
        assert_eq!(field_of(append_command(r, 10, 100, 0).unwrap_err()), "expected_kind");
    }

    #[test]
    fn valid_append_gets_ids_and_default_content_type() {
        let command = append_command(request("orders", vec![event("", 3)]), 10, 100, 7).unwrap();
        assert_eq!(command.events[0].content_type, DEFAULT_CONTENT_TYPE);
        assert_ne!(command.events[0].id, [0; 16]);
        assert_eq!(command.created_unix_ms, 7);
    }
}
