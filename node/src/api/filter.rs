//! The one event filter of the read and subscription calls: `ReadAll`'s `ReadFilter` and
//! `Subscribe`'s `SubscriptionFilter` compile to the same [`EventFilter`]; every part that
//! is set must match.

use std::collections::HashSet;
use std::sync::Arc;

use strata_proto::v1::{ReadFilter, SubscriptionFilter};
use strata_storage::{AllFilter, EventRef, StoredEvent};

use crate::api::validate;
use crate::error::ApiError;
use crate::limits::{
    FILTER_EVENT_TYPES_MAX, FILTER_PATTERN_BYTES_MAX, FILTER_STREAMS_MAX, STREAM_REGEX_BYTES_MAX, STREAM_REGEX_COMPILED_BYTES_MAX,
};

/// A compiled filter: every set part must match; an empty one matches everything.
#[derive(Default)]
pub struct EventFilter {
    streams: HashSet<String>,
    stream_prefix: String,
    stream_regex: Option<regex::Regex>,
    event_types: HashSet<String>,
    metadata_pattern: Option<serde_json::Value>,
    data_pattern: Option<serde_json::Value>,
}

impl EventFilter {
    /// `ReadAll`'s filter: stream prefix, event types, stream regex.
    pub fn from_read(filter: Option<ReadFilter>) -> Result<Self, ApiError> {
        let filter = filter.unwrap_or_default();
        Ok(Self {
            stream_prefix: filter.stream_prefix,
            stream_regex: stream_regex(&filter.stream_regex)?,
            event_types: event_types(filter.event_types)?,
            ..Default::default()
        })
    }

    /// `Subscribe`'s filter: stream names, prefix, event types, metadata and data patterns.
    pub fn from_subscription(filter: Option<SubscriptionFilter>) -> Result<Self, ApiError> {
        let filter = filter.unwrap_or_default();
        if filter.streams.len() > FILTER_STREAMS_MAX {
            return Err(validate::over("filter.streams", "FILTER_STREAMS_MAX", FILTER_STREAMS_MAX, filter.streams.len()));
        }
        Ok(Self {
            streams: filter.streams.into_iter().collect(),
            stream_prefix: filter.stream_prefix,
            event_types: event_types(filter.event_types)?,
            metadata_pattern: pattern("filter.metadata_pattern", &filter.metadata_pattern)?,
            data_pattern: pattern("filter.data_pattern", &filter.data_pattern)?,
            ..Default::default()
        })
    }

    pub fn matches(&self, event: &StoredEvent) -> bool {
        self.stream_matches(&event.stream) && self.event_matches(&event.as_event_ref())
    }

    /// The parts that look at the stream name only.
    pub fn stream_matches(&self, stream: &str) -> bool {
        (self.streams.is_empty() || self.streams.contains(stream))
            && stream.starts_with(&self.stream_prefix)
            && self.stream_regex.as_ref().is_none_or(|r| r.is_match(stream))
    }

    /// The parts that look at the event itself (its type, metadata and data).
    pub fn event_matches(&self, event: &EventRef<'_>) -> bool {
        (self.event_types.is_empty() || self.event_types.contains(event.event_type))
            && self.metadata_pattern.as_ref().is_none_or(|p| json_bytes_contain(event.metadata, p))
            && self.data_pattern.as_ref().is_none_or(|p| json_bytes_contain(event.data, p))
    }

    /// The filter of a `$all` read: the stream parts asked once per stored chunk, the rest
    /// per event.
    pub fn for_read_all(self: Arc<Self>) -> AllFilter {
        let by_stream = self.clone();
        AllFilter {
            stream: Arc::new(move |stream: &str| by_stream.stream_matches(stream)),
            event: Arc::new(move |event: &EventRef<'_>| self.event_matches(event)),
        }
    }
}

fn event_types(types: Vec<String>) -> Result<HashSet<String>, ApiError> {
    if types.len() > FILTER_EVENT_TYPES_MAX {
        return Err(validate::over("filter.event_types", "FILTER_EVENT_TYPES_MAX", FILTER_EVENT_TYPES_MAX, types.len()));
    }
    Ok(types.into_iter().collect())
}

fn stream_regex(text: &str) -> Result<Option<regex::Regex>, ApiError> {
    if text.is_empty() {
        return Ok(None);
    }
    if text.len() > STREAM_REGEX_BYTES_MAX {
        return Err(validate::over("filter.stream_regex", "STREAM_REGEX_BYTES_MAX", STREAM_REGEX_BYTES_MAX, text.len()));
    }
    regex::RegexBuilder::new(text)
        .size_limit(STREAM_REGEX_COMPILED_BYTES_MAX)
        .build()
        .map(Some)
        .map_err(|e| ApiError::InvalidArgument { field: "filter.stream_regex".into(), reason: e.to_string() })
}

/// A JSON-object pattern, or `None` when empty.
fn pattern(field: &str, text: &str) -> Result<Option<serde_json::Value>, ApiError> {
    if text.is_empty() {
        return Ok(None);
    }
    if text.len() > FILTER_PATTERN_BYTES_MAX {
        return Err(validate::over(field, "FILTER_PATTERN_BYTES_MAX", FILTER_PATTERN_BYTES_MAX, text.len()));
    }
    match serde_json::from_str::<serde_json::Value>(text) {
        Ok(value @ serde_json::Value::Object(_)) => Ok(Some(value)),
        Ok(_) => Err(ApiError::InvalidArgument { field: field.into(), reason: "a pattern must be a JSON object".into() }),
        Err(e) => Err(ApiError::InvalidArgument { field: field.into(), reason: format!("not JSON: {e}") }),
    }
}

fn json_bytes_contain(bytes: &[u8], pattern: &serde_json::Value) -> bool {
    serde_json::from_slice::<serde_json::Value>(bytes).is_ok_and(|value| json_contains(&value, pattern))
}

/// Whether `value` contains `pattern`: an object contains every key of the pattern with
/// a value that contains the pattern's value; anything else must be equal.
pub fn json_contains(value: &serde_json::Value, pattern: &serde_json::Value) -> bool {
    match (value, pattern) {
        (serde_json::Value::Object(value), serde_json::Value::Object(pattern)) => {
            pattern.iter().all(|(key, wanted)| value.get(key).is_some_and(|found| json_contains(found, wanted)))
        }
        _ => value == pattern,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn patterns_match_subsets_recursively() {
        let value = json!({"a": 1, "b": {"c": "x", "d": [1, 2]}, "e": null});
        assert!(json_contains(&value, &json!({})));
        assert!(json_contains(&value, &json!({"a": 1})));
        assert!(json_contains(&value, &json!({"b": {"c": "x"}})));
        assert!(json_contains(&value, &json!({"b": {"d": [1, 2]}, "e": null})));
        assert!(!json_contains(&value, &json!({"a": 2})));
        assert!(!json_contains(&value, &json!({"b": {"c": "y"}})));
        assert!(!json_contains(&value, &json!({"z": 1})));
        assert!(!json_contains(&value, &json!({"b": {"d": [1]}})), "arrays match whole");
    }

    #[test]
    fn bad_filters_are_refused_naming_the_field() {
        let bad = |filter: SubscriptionFilter| EventFilter::from_subscription(Some(filter)).err().map(|e| e.to_string()).unwrap_or_default();
        assert!(bad(SubscriptionFilter { data_pattern: "[1]".into(), ..Default::default() }).contains("filter.data_pattern"));
        assert!(bad(SubscriptionFilter { metadata_pattern: "{nope".into(), ..Default::default() }).contains("filter.metadata_pattern"));
        let many = SubscriptionFilter { event_types: vec!["t".into(); FILTER_EVENT_TYPES_MAX + 1], ..Default::default() };
        assert!(bad(many).contains("FILTER_EVENT_TYPES_MAX"));
    }

    #[test]
    fn filters_combine_every_part() {
        let event = |stream: &str, event_type: &str, data: &str| StoredEvent {
            id: [0; 16],
            stream: stream.into(),
            version: 0,
            position: 0,
            event_type: event_type.into(),
            content_type: "application/json".into(),
            data: data.as_bytes().to_vec().into(),
            metadata: br#"{"tenant":"t1"}"#.to_vec().into(),
            created_unix_ms: 0,
        };
        let filter = EventFilter::from_subscription(Some(SubscriptionFilter {
            stream_prefix: "order-".into(),
            event_types: vec!["Placed".into()],
            metadata_pattern: r#"{"tenant":"t1"}"#.into(),
            data_pattern: r#"{"total":{"currency":"EUR"}}"#.into(),
            ..Default::default()
        }))
        .unwrap();
        assert!(filter.matches(&event("order-1", "Placed", r#"{"total":{"amount":3,"currency":"EUR"}}"#)));
        assert!(!filter.matches(&event("user-1", "Placed", r#"{"total":{"currency":"EUR"}}"#)));
        assert!(!filter.matches(&event("order-1", "Shipped", r#"{"total":{"currency":"EUR"}}"#)));
        assert!(!filter.matches(&event("order-1", "Placed", r#"{"total":{"currency":"USD"}}"#)));
        assert!(!filter.matches(&event("order-1", "Placed", "not json")));
        let named = EventFilter::from_subscription(Some(SubscriptionFilter { streams: vec!["a".into(), "b".into()], ..Default::default() })).unwrap();
        assert!(named.matches(&event("b", "X", "{}")) && !named.matches(&event("c", "X", "{}")));
    }
}
