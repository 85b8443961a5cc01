//! A group's settings: defaults for what the client left unset, bounds, and the compiled
//! filter. The effective settings are stored (proto-encoded) in the group's replicated
//! record, so every leader runs the group the same way.

use prost::Message;
use strata_proto::v1::{ConsumerStrategy, GroupSettings, SubscribeFrom};
use strata_storage::GroupStart;

use crate::api::filter::EventFilter;
use crate::api::validate;
use crate::error::ApiError;
use crate::limits::*;

pub const ALL: &str = "$all";
pub const DEFAULT_MESSAGE_TIMEOUT_MS: u64 = 30_000;
pub const DEFAULT_MAX_RETRY_COUNT: u32 = 10;
pub const DEFAULT_MAX_IN_FLIGHT: u32 = 100;
pub const DEFAULT_MAX_CONSUMERS: u32 = 16;
pub const DEFAULT_CHECKPOINT_AFTER_COUNT: u32 = 100;
pub const DEFAULT_CHECKPOINT_AFTER_MS: u64 = 1_000;
pub const DEFAULT_RETRY_BACKOFF_MS: u64 = 0;
pub const DEFAULT_RETRY_BACKOFF_MAX_MS: u64 = 30_000;

fn invalid(field: &str, reason: impl Into<String>) -> ApiError {
    ApiError::InvalidArgument { field: field.into(), reason: reason.into() }
}

/// A group name: 1–`GROUP_NAME_BYTES_MAX` bytes, no control characters, no `$`.
pub fn group_name(name: &str) -> Result<(), ApiError> {
    if name.is_empty() {
        return Err(invalid("group", "group name must not be empty"));
    }
    if name.len() > GROUP_NAME_BYTES_MAX {
        return Err(validate::over("group", "GROUP_NAME_BYTES_MAX", GROUP_NAME_BYTES_MAX, name.len()));
    }
    if name.chars().any(|c| c.is_control() || c == '$') {
        return Err(invalid("group", "group name must not contain control characters or `$`"));
    }
    Ok(())
}

/// The stream a group parks its events in.
pub fn parked_stream(group: &str) -> String {
    format!("$parked-{group}")
}

fn bounded<T: PartialOrd + Copy + Into<u64>>(field: &str, value: Option<T>, default: T, min: T, max: T, limit_name: &'static str) -> Result<T, ApiError> {
    let value = value.unwrap_or(default);
    if value < min {
        return Err(invalid(field, format!("must be at least {}", min.into())));
    }
    if value > max {
        return Err(validate::over(field, limit_name, max.into() as usize, value.into() as usize));
    }
    Ok(value)
}

/// Fills in defaults and checks every setting; the source stream (None: `$all`).
pub fn effective(mut settings: GroupSettings) -> Result<(GroupSettings, Option<String>), ApiError> {
    let source = match settings.source.as_str() {
        "" | ALL => {
            settings.source = ALL.into();
            None
        }
        stream => {
            validate::stream_name_shape("settings.source", stream)?;
            Some(stream.to_string())
        }
    };
    EventFilter::from_subscription(settings.filter.clone())?;
    SubscribeFrom::try_from(settings.from).map_err(|_| invalid("settings.from", format!("unknown start {}", settings.from)))?;
    ConsumerStrategy::try_from(settings.strategy).map_err(|_| invalid("settings.strategy", format!("unknown strategy {}", settings.strategy)))?;
    settings.message_timeout_ms = Some(bounded("settings.message_timeout_ms", settings.message_timeout_ms, DEFAULT_MESSAGE_TIMEOUT_MS, 1, GROUP_TIMEOUT_MS_MAX, "GROUP_TIMEOUT_MS_MAX")?);
    settings.max_retry_count = Some(bounded("settings.max_retry_count", settings.max_retry_count, DEFAULT_MAX_RETRY_COUNT, 0, GROUP_RETRY_COUNT_MAX, "GROUP_RETRY_COUNT_MAX")?);
    settings.max_in_flight = Some(bounded("settings.max_in_flight", settings.max_in_flight, DEFAULT_MAX_IN_FLIGHT, 1, GROUP_IN_FLIGHT_MAX, "GROUP_IN_FLIGHT_MAX")?);
    settings.max_consumers = Some(bounded("settings.max_consumers", settings.max_consumers, DEFAULT_MAX_CONSUMERS, 1, GROUP_CONSUMERS_MAX, "GROUP_CONSUMERS_MAX")?);
    settings.checkpoint_after_count =
        Some(bounded("settings.checkpoint_after_count", settings.checkpoint_after_count, DEFAULT_CHECKPOINT_AFTER_COUNT, 1, GROUP_BUFFER_EVENTS_MAX as u32, "GROUP_BUFFER_EVENTS_MAX")?);
    settings.checkpoint_after_ms = Some(bounded("settings.checkpoint_after_ms", settings.checkpoint_after_ms, DEFAULT_CHECKPOINT_AFTER_MS, 1, GROUP_TIMEOUT_MS_MAX, "GROUP_TIMEOUT_MS_MAX")?);
    settings.retry_backoff_ms = Some(bounded("settings.retry_backoff_ms", settings.retry_backoff_ms, DEFAULT_RETRY_BACKOFF_MS, 0, GROUP_TIMEOUT_MS_MAX, "GROUP_TIMEOUT_MS_MAX")?);
    settings.retry_backoff_max_ms =
        Some(bounded("settings.retry_backoff_max_ms", settings.retry_backoff_max_ms, DEFAULT_RETRY_BACKOFF_MAX_MS, 0, GROUP_TIMEOUT_MS_MAX, "GROUP_TIMEOUT_MS_MAX")?);
    Ok((settings, source))
}

/// Where a new group starts.
pub fn start_of(settings: &GroupSettings) -> GroupStart {
    match SubscribeFrom::try_from(settings.from) {
        Ok(SubscribeFrom::End) => GroupStart::End,
        Ok(SubscribeFrom::Revision) => GroupStart::At(settings.from_revision),
        _ => GroupStart::Start,
    }
}

/// A group's settings as the runtime uses them.
pub struct Settings {
    pub proto: GroupSettings,
    pub filter: EventFilter,
    pub strategy: ConsumerStrategy,
    pub message_timeout_ms: u64,
    pub max_retry_count: u32,
    pub max_in_flight: usize,
    pub max_consumers: usize,
    pub checkpoint_after_count: u64,
    pub checkpoint_after_ms: u64,
    pub retry_backoff_ms: u64,
    pub retry_backoff_max_ms: u64,
}

impl Settings {
    /// Decodes stored settings (already effective: defaults filled in at create/update).
    pub fn decode(bytes: &[u8]) -> Result<Self, ApiError> {
        let proto = GroupSettings::decode(bytes).map_err(|e| ApiError::Internal { reason: format!("stored group settings do not decode: {e}") })?;
        let (proto, _) = effective(proto)?;
        Ok(Self {
            filter: EventFilter::from_subscription(proto.filter.clone())?,
            strategy: ConsumerStrategy::try_from(proto.strategy).unwrap_or(ConsumerStrategy::RoundRobin),
            message_timeout_ms: proto.message_timeout_ms.unwrap_or(DEFAULT_MESSAGE_TIMEOUT_MS),
            max_retry_count: proto.max_retry_count.unwrap_or(DEFAULT_MAX_RETRY_COUNT),
            max_in_flight: proto.max_in_flight.unwrap_or(DEFAULT_MAX_IN_FLIGHT) as usize,
            max_consumers: proto.max_consumers.unwrap_or(DEFAULT_MAX_CONSUMERS) as usize,
            checkpoint_after_count: u64::from(proto.checkpoint_after_count.unwrap_or(DEFAULT_CHECKPOINT_AFTER_COUNT)),
            checkpoint_after_ms: proto.checkpoint_after_ms.unwrap_or(DEFAULT_CHECKPOINT_AFTER_MS),
            retry_backoff_ms: proto.retry_backoff_ms.unwrap_or(DEFAULT_RETRY_BACKOFF_MS),
            retry_backoff_max_ms: proto.retry_backoff_max_ms.unwrap_or(DEFAULT_RETRY_BACKOFF_MAX_MS),
            proto,
        })
    }

    /// The delay before retry number `retries` (1 = the first retry) of a nacked event.
    pub fn backoff_ms(&self, retries: u32) -> u64 {
        if self.retry_backoff_ms == 0 {
            return 0;
        }
        let factor = 1u64.checked_shl(retries.saturating_sub(1).min(32)).unwrap_or(u64::MAX);
        self.retry_backoff_ms.saturating_mul(factor).min(self.retry_backoff_max_ms)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_filled_in_and_bounds_enforced() {
        let (settings, source) = effective(GroupSettings::default()).unwrap();
        assert_eq!(source, None);
        assert_eq!(settings.source, ALL);
        assert_eq!(settings.max_retry_count, Some(DEFAULT_MAX_RETRY_COUNT));
        assert_eq!(settings.max_in_flight, Some(DEFAULT_MAX_IN_FLIGHT));
        let zero_retries = GroupSettings { max_retry_count: Some(0), source: "orders".into(), ..Default::default() };
        let (settings, source) = effective(zero_retries).unwrap();
        assert_eq!((settings.max_retry_count, source.as_deref()), (Some(0), Some("orders")));
        let too_many = GroupSettings { max_in_flight: Some(GROUP_IN_FLIGHT_MAX + 1), ..Default::default() };
        assert!(matches!(effective(too_many), Err(ApiError::OverLimit { limit_name: "GROUP_IN_FLIGHT_MAX", .. })));
        let none = GroupSettings { max_consumers: Some(0), ..Default::default() };
        assert!(matches!(effective(none), Err(ApiError::InvalidArgument { .. })));
        assert!(group_name("").is_err() && group_name("a$b").is_err() && group_name(&"g".repeat(200)).is_err());
        assert!(group_name("billing-workers").is_ok());
    }

    #[test]
    fn backoff_doubles_up_to_its_maximum() {
        let (proto, _) = effective(GroupSettings { retry_backoff_ms: Some(100), retry_backoff_max_ms: Some(1_000), ..Default::default() }).unwrap();
        let settings = Settings::decode(&proto.encode_to_vec()).unwrap();
        assert_eq!([1, 2, 3, 4, 5, 60].map(|r| settings.backoff_ms(r)), [100, 200, 400, 800, 1_000, 1_000]);
        let (proto, _) = effective(GroupSettings::default()).unwrap();
        assert_eq!(Settings::decode(&proto.encode_to_vec()).unwrap().backoff_ms(3), 0);
    }
}
