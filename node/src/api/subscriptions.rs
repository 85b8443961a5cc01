//! `Subscriptions.Subscribe`: catch-up and live subscriptions to a stream or `$all`.
//!
//! One loop serves history and live alike: it reads the node's applied state from the
//! next position (or version) onwards, page by page, and when it reaches the head it waits
//! for the applied index to move. Live events are therefore read from storage too, so
//! the switch from history to live cannot leave a gap or repeat an event, and a slow
//! consumer costs bounded memory: the loop waits on a channel of
//! [`SUBSCRIPTION_BUFFER_MESSAGES`] messages of at most [`SUBSCRIPTION_MESSAGE_BYTES_MAX`]
//! event bytes, and appends never wait for it.
//!
//! Markers: `CaughtUp` each time the loop reaches the head after reading history;
//! `Checkpoint` every [`SUBSCRIPTION_CHECKPOINT_INTERVAL_MS`] when it has moved (also
//! while the filter matches nothing); `FellBehind` when, once live, the head runs more
//! than [`SUBSCRIPTION_FELL_BEHIND_EVENTS`] ahead of what the consumer has taken.

use std::collections::HashSet;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant};

use strata_proto::v1::subscribe_response::Kind;
use strata_proto::v1::subscriptions_server::Subscriptions;
use strata_proto::v1::{CaughtUp, Checkpoint, FellBehind, SubscribeFrom, SubscribeRequest, SubscribeResponse, SubscribedEvents, SubscriptionFilter};
use strata_storage::{EventState, ReadAllOptions, StoredEvent};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tokio_stream::Stream;
use tonic::{Request, Response, Status};

use crate::api::streams::recorded_event;
use crate::api::validate;
use crate::api::NodeContext;
use crate::error::ApiError;
use crate::limits::{
    FILTER_EVENT_TYPES_MAX, FILTER_PATTERN_BYTES_MAX, FILTER_STREAMS_MAX, READ_PAGE_EVENTS_MAX, READ_SCAN_EVENTS_MAX,
    SUBSCRIPTION_BUFFER_MESSAGES, SUBSCRIPTION_CHECKPOINT_INTERVAL_MS, SUBSCRIPTION_FELL_BEHIND_EVENTS, SUBSCRIPTION_MESSAGE_BYTES_MAX,
};

/// The name that subscribes to every stream.
pub const ALL: &str = "$all";

pub struct SubscriptionsService {
    ctx: Arc<NodeContext>,
}

impl SubscriptionsService {
    pub fn new(ctx: Arc<NodeContext>) -> Self {
        Self { ctx }
    }
}

/// A compiled filter: every set part must match.
pub struct EventFilter {
    streams: HashSet<String>,
    stream_prefix: String,
    event_types: HashSet<String>,
    metadata_pattern: Option<serde_json::Value>,
    data_pattern: Option<serde_json::Value>,
}

impl EventFilter {
    pub fn new(filter: Option<SubscriptionFilter>) -> Result<Self, ApiError> {
        let filter = filter.unwrap_or_default();
        if filter.streams.len() > FILTER_STREAMS_MAX {
            return Err(validate::over("filter.streams", "FILTER_STREAMS_MAX", FILTER_STREAMS_MAX, filter.streams.len()));
        }
        if filter.event_types.len() > FILTER_EVENT_TYPES_MAX {
            return Err(validate::over("filter.event_types", "FILTER_EVENT_TYPES_MAX", FILTER_EVENT_TYPES_MAX, filter.event_types.len()));
        }
        Ok(Self {
            streams: filter.streams.into_iter().collect(),
            stream_prefix: filter.stream_prefix,
            event_types: filter.event_types.into_iter().collect(),
            metadata_pattern: pattern("filter.metadata_pattern", &filter.metadata_pattern)?,
            data_pattern: pattern("filter.data_pattern", &filter.data_pattern)?,
        })
    }

    pub fn matches(&self, event: &StoredEvent) -> bool {
        (self.streams.is_empty() || self.streams.contains(&event.stream))
            && event.stream.starts_with(&self.stream_prefix)
            && (self.event_types.is_empty() || self.event_types.contains(&event.event_type))
            && self.metadata_pattern.as_ref().is_none_or(|p| json_bytes_contain(&event.metadata, p))
            && self.data_pattern.as_ref().is_none_or(|p| json_bytes_contain(&event.data, p))
    }
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

type SubscribeOut = Pin<Box<dyn Stream<Item = Result<SubscribeResponse, Status>> + Send>>;

#[tonic::async_trait]
impl Subscriptions for SubscriptionsService {
    type SubscribeStream = SubscribeOut;

    async fn subscribe(&self, request: Request<SubscribeRequest>) -> Result<Response<Self::SubscribeStream>, Status> {
        let request = request.into_inner();
        let target = if request.stream == ALL || request.stream.is_empty() {
            Target::All
        } else {
            validate::stream_name_shape("stream", &request.stream)?;
            Target::Stream(request.stream.clone())
        };
        let filter = EventFilter::new(request.filter)?;
        let from = SubscribeFrom::try_from(request.from)
            .map_err(|_| ApiError::InvalidArgument { field: "from".into(), reason: format!("unknown start {}", request.from) })?;
        let events = self.ctx.events.clone();
        let next = match (&target, from) {
            (_, SubscribeFrom::Start) => 0,
            (_, SubscribeFrom::Revision) => request.from_revision,
            (Target::All, SubscribeFrom::End) => events.next_position(),
            (Target::Stream(stream), SubscribeFrom::End) => {
                events.stream_head(stream).map_err(ApiError::from)?.map_or(0, |head| head.last_version + 1)
            }
        };
        self.ctx.metrics.subscriptions_active.inc();
        let (sender, receiver) = mpsc::channel(SUBSCRIPTION_BUFFER_MESSAGES);
        let subscription = Subscription {
            events,
            applied: self.ctx.router.applied.clone(),
            filter: Arc::new(filter),
            target,
            next,
            sender,
            metrics: self.ctx.metrics.clone(),
        };
        let metrics = self.ctx.metrics.clone();
        tokio::spawn(async move {
            if let Err(e) = subscription.run().await {
                tracing::debug!(error = %e, "subscription ended");
            }
            metrics.subscriptions_active.dec();
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(receiver))))
    }
}

enum Target {
    All,
    Stream(String),
}

struct Subscription {
    events: Arc<EventState>,
    applied: strata_raft::AppliedWatch,
    filter: Arc<EventFilter>,
    target: Target,
    /// The next `$all` position, or stream version, to look at.
    next: u64,
    sender: mpsc::Sender<Result<SubscribeResponse, Status>>,
    metrics: Arc<crate::metrics::Metrics>,
}

/// Why a subscription loop stopped.
#[derive(Debug, thiserror::Error)]
enum Ended {
    #[error("the client went away")]
    ClientGone,
    #[error("{0}")]
    Failed(ApiError),
}

impl Subscription {
    async fn send(&self, kind: Kind) -> Result<(), Ended> {
        self.sender.send(Ok(SubscribeResponse { kind: Some(kind) })).await.map_err(|_| Ended::ClientGone)
    }

    async fn run(mut self) -> Result<(), Ended> {
        match self.serve().await {
            Err(Ended::Failed(e)) => {
                let status = e.into_status();
                let _ = self.sender.send(Err(status.clone())).await;
                Err(Ended::Failed(ApiError::Internal { reason: status.message().to_string() }))
            }
            other => other,
        }
    }

    async fn serve(&mut self) -> Result<(), Ended> {
        let interval = Duration::from_millis(SUBSCRIPTION_CHECKPOINT_INTERVAL_MS);
        let mut live = false;
        let mut last_checkpoint: (Instant, Option<u64>) = (Instant::now(), None);
        loop {
            // Everything in $all below this was visible when the head was looked at.
            let visible = self.events.next_position();
            let (head, covered) = self.head(visible)?;
            if self.next < head {
                if live && head - self.next > SUBSCRIPTION_FELL_BEHIND_EVENTS {
                    live = false;
                    let position = covered.unwrap_or(0);
                    self.send(Kind::FellBehind(FellBehind { position, head_position: visible.saturating_sub(1) })).await?;
                }
                let covered = self.deliver_page(head).await?;
                self.checkpoint_if_due(&mut last_checkpoint, covered, interval).await?;
                continue;
            }
            // At the head: everything matching below `visible` has been delivered.
            let covered = visible.checked_sub(1);
            if !live {
                live = true;
                self.send(Kind::CaughtUp(CaughtUp { position: covered })).await?;
                last_checkpoint = (Instant::now(), covered);
            }
            self.checkpoint_if_due(&mut last_checkpoint, covered, interval).await?;
            // Wait for something new, a checkpoint's time, or the client leaving.
            tokio::select! {
                changed = self.applied.changed() => if changed.is_err() { return Ok(()) },
                _ = tokio::time::sleep(interval) => {}
                _ = self.sender.closed() => return Err(Ended::ClientGone),
            }
        }
    }

    /// The end of what there is to read (`$all` position or stream version, exclusive),
    /// and the last `$all` position delivered or skipped so far.
    fn head(&self, visible: u64) -> Result<(u64, Option<u64>), Ended> {
        match &self.target {
            Target::All => Ok((visible, self.next.checked_sub(1))),
            Target::Stream(stream) => {
                let head = self.events.stream_head(stream).map_err(|e| Ended::Failed(e.into()))?;
                Ok((head.map_or(0, |h| h.last_version + 1), None))
            }
        }
    }

    /// Reads and sends one page from `next`; returns the last `$all` position it covered.
    async fn deliver_page(&mut self, head: u64) -> Result<Option<u64>, Ended> {
        let events = self.events.clone();
        let next = self.next;
        let target = match &self.target {
            Target::All => None,
            Target::Stream(stream) => Some(stream.clone()),
        };
        let filter = self.filter.clone();
        let (page, continue_at) = tokio::task::spawn_blocking(move || {
            let result = match &target {
                None => events
                    .read_all(&ReadAllOptions {
                        from_position: next,
                        backwards: false,
                        limit: READ_PAGE_EVENTS_MAX,
                        scan_limit: READ_SCAN_EVENTS_MAX,
                        filter: &|event: &StoredEvent| filter.matches(event),
                    })
                    .map(|(page, continue_at)| {
                        // The read scanned at least up to `head` (it may see more).
                        let last = page.last().map(|e| e.position + 1).unwrap_or(0);
                        (page, continue_at.unwrap_or(head.max(last)))
                    }),
                Some(stream) => events.read_stream(stream, next, false, READ_PAGE_EVENTS_MAX).map(|page| {
                    let continue_at = page.last().map_or(head, |e| e.version + 1);
                    let page: Vec<StoredEvent> = page.into_iter().filter(|e| filter.matches(e)).collect();
                    (page, continue_at)
                }),
            };
            result
        })
        .await
        .map_err(|e| Ended::Failed(ApiError::Internal { reason: format!("subscription read failed: {e}") }))?
        .map_err(|e| Ended::Failed(e.into()))?;
        let mut covered = None;
        let mut batch = Vec::new();
        let mut bytes = 0usize;
        for event in page {
            let at = match self.target {
                Target::All => event.position,
                Target::Stream(_) => event.version,
            };
            // A read that saw past `head` may repeat nothing already sent.
            if at < self.next {
                continue;
            }
            covered = Some(event.position);
            bytes += event.data.len() + event.metadata.len() + event.stream.len() + 64;
            batch.push(recorded_event(event));
            if bytes >= SUBSCRIPTION_MESSAGE_BYTES_MAX {
                self.send_events(std::mem::take(&mut batch)).await?;
                bytes = 0;
            }
        }
        self.send_events(batch).await?;
        self.next = self.next.max(continue_at);
        Ok(match self.target {
            Target::All => self.next.checked_sub(1),
            Target::Stream(_) => covered,
        })
    }

    async fn send_events(&self, events: Vec<strata_proto::v1::RecordedEvent>) -> Result<(), Ended> {
        if events.is_empty() {
            return Ok(());
        }
        let count = events.len() as u64;
        self.send(Kind::Events(SubscribedEvents { events })).await?;
        self.metrics.subscription_events_total.inc_by(count);
        Ok(())
    }

    async fn checkpoint_if_due(&self, last: &mut (Instant, Option<u64>), covered: Option<u64>, interval: Duration) -> Result<(), Ended> {
        if covered.is_some() && covered != last.1 && last.0.elapsed() >= interval {
            self.send(Kind::Checkpoint(Checkpoint { position: covered })).await?;
            *last = (Instant::now(), covered);
        }
        Ok(())
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
        let bad = |filter: SubscriptionFilter| EventFilter::new(Some(filter)).err().map(|e| e.to_string()).unwrap_or_default();
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
            data: data.as_bytes().to_vec(),
            metadata: br#"{"tenant":"t1"}"#.to_vec(),
            created_unix_ms: 0,
        };
        let filter = EventFilter::new(Some(SubscriptionFilter {
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
        let named = EventFilter::new(Some(SubscriptionFilter { streams: vec!["a".into(), "b".into()], ..Default::default() })).unwrap();
        assert!(named.matches(&event("b", "X", "{}")) && !named.matches(&event("c", "X", "{}")));
    }
}
