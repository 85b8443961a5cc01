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

use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant};

use strata_proto::v1::subscribe_response::Kind;
use strata_proto::v1::subscriptions_server::Subscriptions;
use strata_proto::v1::{CaughtUp, Checkpoint, FellBehind, SubscribeFrom, SubscribeRequest, SubscribeResponse, SubscribedEvents};
use strata_storage::{EventState, StoredEvent};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tokio_stream::Stream;
use tonic::{Request, Response, Status};

use crate::api::filter::EventFilter;
use crate::api::streams::recorded_event;
use crate::api::validate;
use crate::api::NodeContext;
use crate::error::ApiError;
use crate::limits::{SUBSCRIPTION_RETRY_AFTER_MS, 
    READ_PAGE_EVENTS_MAX, READ_SCAN_EVENTS_MAX, SUBSCRIPTION_BUFFER_MESSAGES, SUBSCRIPTION_CHECKPOINT_INTERVAL_MS, SUBSCRIPTION_FELL_BEHIND_EVENTS, SUBSCRIPTION_MESSAGE_BYTES_MAX,
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

type SubscribeOut = Pin<Box<dyn Stream<Item = Result<SubscribeResponse, Status>> + Send>>;

#[tonic::async_trait]
impl Subscriptions for SubscriptionsService {
    type SubscribeStream = SubscribeOut;

    async fn subscribe(&self, request: Request<SubscribeRequest>) -> Result<Response<Self::SubscribeStream>, Status> {
        let forwarded = crate::routing::is_forwarded(&request);
        let source = match request.get_ref().stream.as_str() {
            "" => super::ALL_STREAMS,
            stream => stream,
        };
        self.ctx.allow(&request, strata_security::StreamAccess::Read, source)?;
        let request = request.into_inner();
        if request.follow_leader
            && let crate::routing::Route::Leader { channel, .. } = self.ctx.router.route_write(forwarded).await?
        {
            let leader = strata_proto::v1::subscriptions_client::SubscriptionsClient::new(channel)
                .max_decoding_message_size(crate::limits::GRPC_ENCODE_BYTES_MAX)
                .subscribe(crate::routing::mark_forwarded(request))
                .await?;
            return Ok(Response::new(Box::pin(leader.into_inner())));
        }
        let target = if request.stream == ALL || request.stream.is_empty() {
            Target::All
        } else {
            validate::stream_name_shape("stream", &request.stream)?;
            Target::Stream(request.stream.clone())
        };
        let filter = EventFilter::from_subscription(request.filter)?;
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
        let slot = self.ctx.subscription_slots.clone().try_acquire_owned().map_err(|_| ApiError::Overloaded {
            limit_name: "SUBSCRIPTIONS_MAX",
            limit_value: self.ctx.max_subscriptions as u64,
            retry_after_ms: SUBSCRIPTION_RETRY_AFTER_MS,
        })?;
        self.ctx.metrics.subscriptions_active.inc();
        let (sender, receiver) = mpsc::channel(SUBSCRIPTION_BUFFER_MESSAGES);
        let subscription = Subscription {
            events,
            reader: self.ctx.reader.clone(),
            applied: self.ctx.router.applied.clone(),
            filter: Arc::new(filter),
            target,
            next,
            sender,
            metrics: self.ctx.metrics.clone(),
        };
        let metrics = self.ctx.metrics.clone();
        tokio::spawn(async move {
            subscription.run().await;
            metrics.subscriptions_active.dec();
            drop(slot);
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
    /// Reads of all history, hot and tiered.
    reader: strata_storage::EventReader,
    applied: strata_raft::AppliedWatch,
    filter: Arc<EventFilter>,
    target: Target,
    /// The next `$all` position, or stream version, to look at.
    next: u64,
    sender: mpsc::Sender<Result<SubscribeResponse, Status>>,
    metrics: Arc<crate::metrics::Metrics>,
}

/// Why a subscription loop stopped.
enum Ended {
    ClientGone,
    Failed(ApiError),
}

impl Subscription {
    async fn send(&self, kind: Kind) -> Result<(), Ended> {
        self.sender.send(Ok(SubscribeResponse { kind: Some(kind) })).await.map_err(|_| Ended::ClientGone)
    }

    /// Serves until the client leaves; a failure is logged and sent to the client.
    async fn run(mut self) {
        match self.serve().await {
            Ok(()) | Err(Ended::ClientGone) => tracing::debug!("subscription ended"),
            Err(Ended::Failed(e)) => {
                tracing::warn!(error = %e, "subscription failed");
                let _ = self.sender.send(Err(e.into_status())).await;
            }
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
        let next = self.next;
        let filter = self.filter.clone();
        let (page, continue_at) = match &self.target {
            Target::All => {
                let matches = filter.for_read_all();
                let (page, continue_at) = self
                    .reader
                    .read_all(next, false, READ_PAGE_EVENTS_MAX, READ_SCAN_EVENTS_MAX, matches)
                    .await
                    .map_err(|e| Ended::Failed(e.into()))?;
                // The read scanned at least up to `head` (it may see more).
                let last = page.last().map(|e| e.position + 1).unwrap_or(0);
                (page, continue_at.unwrap_or(head.max(last)))
            }
            Target::Stream(stream) => {
                let page = self
                    .reader
                    .read_stream(stream, next, false, READ_PAGE_EVENTS_MAX)
                    .await
                    .map_err(|e| Ended::Failed(e.into()))?;
                let continue_at = page.last().map_or(head, |e| e.version + 1);
                let page: Vec<StoredEvent> = page.into_iter().filter(|e| filter.matches(e)).collect();
                (page, continue_at)
            }
        };
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
