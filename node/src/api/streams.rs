//! `strata.v1.Streams`: append, read, inspect.

use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::Stream;
use prost::Message;
use strata_proto::v1::streams_client::StreamsClient;
use strata_proto::read_response::{EncodedEvents, RecordedEventRef};
use strata_proto::v1::streams_server::Streams;
use strata_proto::v1::{
    AppendRequest, AppendResponse, DeleteStreamRequest, DeleteStreamResponse, Direction, ListStreamsRequest, ListStreamsResponse,
    ReadAllRequest, ReadResponse, ReadStreamRequest, RecordedEvent, SetStreamMetadataRequest, SetStreamMetadataResponse,
    StreamInfoRequest, StreamInfoResponse, StreamSummary,
};
use strata_storage::{ControlCommand, ControlSuccess, EventRef, PageSink, StoredEvent, StreamHead, StreamMeta};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};

use super::{validate, ALL_STREAMS};
use strata_security::StreamAccess;
use super::NodeContext;
use crate::clock::now_unix_ms;
use crate::error::{detail_of, ApiError};
use crate::api::filter::EventFilter;
use crate::limits::*;
use crate::routing::{commit_token, forwarded_failure, is_forwarded, mark_forwarded, Route};

pub struct StreamsService {
    ctx: Arc<NodeContext>,
}

/// A stream as readers see it: its head and retention metadata, or the error a read of it
/// answers (not found, also when soft-deleted with nothing since; deleted when tombstoned).
fn readable_stream(ctx: &NodeContext, stream: &str) -> Result<(StreamHead, Option<StreamMeta>), ApiError> {
    let meta = ctx.events.stream_meta(stream)?;
    if meta.as_ref().is_some_and(|m| m.tombstone) {
        return Err(ApiError::StreamDeleted { stream: stream.to_string() });
    }
    let head = ctx.events.stream_head(stream)?.ok_or_else(|| ApiError::StreamNotFound { stream: stream.to_string() })?;
    if meta.as_ref().is_some_and(|m| m.deleted_and_empty(Some(head.last_version))) {
        return Err(ApiError::StreamNotFound { stream: stream.to_string() });
    }
    Ok((head, meta))
}

impl StreamsService {
    pub fn new(ctx: Arc<NodeContext>) -> Self {
        Self { ctx }
    }

    async fn append_local(&self, request: AppendRequest, request_bytes: usize) -> Result<AppendResponse, ApiError> {
        let stream = request.stream.clone();
        let command = validate::append_command(request, request_bytes, self.ctx.max_event_bytes, now_unix_ms())?;
        if let Some(tier) = &self.ctx.tier {
            tier.check_backlog(self.ctx.events.next_position())?;
        }
        let payload_bytes: usize = command.events.iter().map(|e| e.data.len() + e.metadata.len()).sum();
        let event_count = command.events.len() as u64;
        let applied = self.ctx.batcher.append(command).await?;
        let success = applied.outcome.map_err(ApiError::from)?;
        if !success.idempotent_replay {
            self.ctx.metrics.events_appended_total.inc_by(event_count);
            self.ctx.metrics.appended_bytes_total.inc_by(payload_bytes as u64);
        }
        Ok(AppendResponse {
            stream,
            first_version: success.first_version,
            last_version: success.last_version,
            first_position: success.first_position,
            last_position: success.last_position,
            commit_token: commit_token(applied.log_index),
            idempotent_replay: success.idempotent_replay,
        })
    }
}

fn outcome_label(result: &Result<AppendResponse, ApiError>) -> &'static str {
    match result {
        Ok(response) if response.idempotent_replay => "replay",
        Ok(_) => "ok",
        Err(e) => e.kind(),
    }
}

pub fn recorded_event(event: StoredEvent) -> RecordedEvent {
    RecordedEvent {
        // Encoded into a stack buffer: `to_string` goes through the formatter, a visible
        // cost at a million events a second.
        id: uuid::Uuid::from_bytes(event.id).hyphenated().encode_lower(&mut uuid::Uuid::encode_buffer()).to_owned(),
        stream: event.stream,
        version: event.version,
        position: event.position,
        r#type: event.event_type,
        data: event.data.into(),
        metadata: event.metadata.into(),
        content_type: event.content_type,
        created_unix_ms: event.created_unix_ms,
    }
}

type ReadStreamOut = Pin<Box<dyn Stream<Item = Result<ReadResponse, Status>> + Send>>;

/// The wire form of an event as a read meets it (borrowed all through).
fn wire_event<'a>(event: &EventRef<'a>) -> RecordedEventRef<'a> {
    RecordedEventRef {
        id: event.id,
        stream: event.stream,
        version: event.version,
        position: event.position,
        event_type: event.event_type,
        data: event.data,
        metadata: event.metadata,
        content_type: event.content_type,
        created_unix_ms: event.created_unix_ms,
    }
}

/// Bytes an event is guessed to take on the wire, to size a page's buffer: the bench's
/// 256-byte events take about 330; a page of larger ones grows its buffer.
const WIRE_EVENT_BYTES_GUESS: usize = 384;

/// Room for the encoding of `events` events, up to one message's worth.
fn encoded_room(events: usize) -> EncodedEvents {
    EncodedEvents::with_capacity(events.saturating_mul(WIRE_EVENT_BYTES_GUESS).min(READ_MESSAGE_BYTES + WIRE_EVENT_BYTES_GUESS))
}

/// A read page encoded for the wire, in messages of about READ_MESSAGE_BYTES: a `$all`
/// page as the store reads it (the store never builds an owned event for it), a stream
/// page from its events. Full at READ_PAGE_BYTES_MAX (a `$all` page then ends early).
struct WirePage {
    messages: Vec<EncodedEvents>,
    /// Events the page may still take (its limit less those taken).
    room: usize,
    events: usize,
    bytes: usize,
}

impl WirePage {
    fn new(limit: usize) -> Self {
        Self { messages: Vec::new(), room: limit, events: 0, bytes: 0 }
    }
}

impl PageSink for WirePage {
    fn push(&mut self, event: &EventRef<'_>, _stored: Option<&prost::bytes::Bytes>) {
        let message = match self.messages.last_mut() {
            Some(message) if message.byte_len() < READ_MESSAGE_BYTES => message,
            _ => {
                self.messages.push(encoded_room(self.room));
                self.messages.last_mut().expect("just pushed")
            }
        };
        let before = message.byte_len();
        message.push(&wire_event(event));
        self.bytes += message.byte_len() - before;
        self.events += 1;
        self.room = self.room.saturating_sub(1);
    }

    fn len(&self) -> usize {
        self.events
    }

    fn is_full(&self) -> bool {
        self.bytes >= READ_PAGE_BYTES_MAX
    }
}

/// Sends `events` as response messages of about `READ_MESSAGE_BYTES` each (a [`WirePage`]
/// of them). Returns false when the client went away.
async fn send_events(
    sender: &mpsc::Sender<Result<ReadResponse, Status>>,
    events: Vec<StoredEvent>,
    token: &str,
) -> bool {
    let mut page = WirePage::new(events.len());
    for event in &events {
        page.push(&event.as_event_ref(), None);
        // A message goes out as soon as the next one starts: the page's events (up to
        // 16 MiB each) are not all held twice, stored and encoded.
        if page.messages.len() > 1 && !send_message(sender, page.messages.remove(0), token).await {
            return false;
        }
    }
    send_page(sender, page, token).await
}

/// Sends the messages of `page`. Returns false when the client went away.
async fn send_page(sender: &mpsc::Sender<Result<ReadResponse, Status>>, page: WirePage, token: &str) -> bool {
    for encoded in page.messages {
        if !send_message(sender, encoded, token).await {
            return false;
        }
    }
    true
}

async fn send_message(sender: &mpsc::Sender<Result<ReadResponse, Status>>, encoded: EncodedEvents, token: &str) -> bool {
    let message = ReadResponse { encoded, commit_token: token.to_string(), ..Default::default() };
    sender.send(Ok(message)).await.is_ok()
}

fn limit_of(max_count: u64) -> u64 {
    if max_count == 0 { u64::MAX } else { max_count }
}

#[tonic::async_trait]
impl Streams for StreamsService {
    async fn append(&self, request: Request<AppendRequest>) -> Result<Response<AppendResponse>, Status> {
        self.ctx.allow(&request, StreamAccess::Write, &request.get_ref().stream)?;
        let started = Instant::now();
        let forwarded = is_forwarded(&request);
        let request = request.into_inner();
        let request_bytes = request.encoded_len();
        let mut attempt = 1;
        loop {
            let route = match self.ctx.router.route_write(forwarded).await {
                Ok(route) => route,
                Err(unavailable) => {
                    // Bad input is reported as such even while there is no leader.
                    validate::append_command(request, request_bytes, self.ctx.max_event_bytes, 0)?;
                    return Err(unavailable.into());
                }
            };
            match route {
                Route::Leader { id, channel } => {
                    let forwarded_call = StreamsClient::new(channel)
                        .max_decoding_message_size(GRPC_ENCODE_BYTES_MAX)
                        .max_encoding_message_size(GRPC_DECODE_BYTES_MAX)
                        .append(mark_forwarded(request.clone()))
                        .await;
                    match forwarded_call {
                        Ok(response) => return Ok(response),
                        // No typed answer (the leader we knew is unreachable or went away
                        // mid-call), or UNAVAILABLE (it stopped leading, or lost track of
                        // its proposal). Sending the append again is safe: appends are
                        // idempotent by event id, so one that did land is answered as a
                        // replay of the original. Wait for a newer leader first.
                        Err(status)
                            if (detail_of(&status).is_none() || status.code() == tonic::Code::Unavailable)
                                && attempt < FORWARD_ATTEMPTS_MAX =>
                        {
                            tracing::debug!(leader = id, attempt, error = %status.message(), "forwarding failed; retrying");
                            attempt += 1;
                            self.ctx.router.wait_for_other_leader(id).await;
                        }
                        Err(status) => return Err(forwarded_failure(status)),
                    }
                }
                Route::Local => {
                    let result = self.append_local(request.clone(), request_bytes).await;
                    if let Err(ApiError::Unavailable { reason, .. }) = &result {
                        // Nothing was proposed. Either leadership moved between routing and
                        // proposing (route again once another leader is known), or this node
                        // still leads and openraft refused while it settles into its new term:
                        // then retry soon, not after a leader change that will not come.
                        // Also for a forwarded request: the follower that sent it would
                        // otherwise wait for a leader change that will not come.
                        if started.elapsed() < Duration::from_millis(LEADER_CHANGE_WAIT_MS) {
                            if self.ctx.router.believes_it_leads() {
                                tracing::debug!(attempt, reason, "proposal refused while leading; proposing again");
                                attempt += 1;
                                tokio::time::sleep(Duration::from_millis(LOCAL_RETRY_PAUSE_MS)).await;
                                continue;
                            }
                            if !forwarded {
                                attempt += 1;
                                self.ctx.router.wait_for_other_leader(self.ctx.router.node_id).await;
                                continue;
                            }
                        }
                    }
                    self.ctx.metrics.appends_total.with_label_values(&[outcome_label(&result)]).inc();
                    self.ctx.metrics.append_latency_seconds.observe(started.elapsed().as_secs_f64());
                    return Ok(Response::new(result?));
                }
            }
        }
    }

    type ReadStreamStream = ReadStreamOut;

    async fn read_stream(&self, request: Request<ReadStreamRequest>) -> Result<Response<Self::ReadStreamStream>, Status> {
        self.ctx.allow(&request, StreamAccess::Read, &request.get_ref().stream)?;
        let request = request.into_inner();
        validate::stream_name_shape("stream", &request.stream)?;
        self.ctx.metrics.reads_total.with_label_values(&["stream"]).inc();
        let token = self.ctx.router.prepare_read(request.consistency, &request.session_token).await?;
        let events = self.ctx.reader.clone();
        let (head, _) = readable_stream(&self.ctx, &request.stream)?;
        let backwards = request.direction == Direction::Backward as i32;
        let mut from = if request.from_end { head.last_version } else { request.from_version };
        let mut remaining = limit_of(request.max_count);
        let (sender, receiver) = mpsc::channel(READ_STREAM_BUFFER_MESSAGES);
        let metrics = self.ctx.metrics.clone();
        tokio::spawn(async move {
            while remaining > 0 {
                let page_limit = remaining.min(READ_PAGE_EVENTS_MAX as u64) as usize;
                let page = events.read_stream(&request.stream, from, backwards, page_limit).await;
                let page = match page.map_err(ApiError::from) {
                    Ok(page) => page,
                    Err(e) => {
                        let _ = sender.send(Err(e.into())).await;
                        return;
                    }
                };
                let Some(last) = page.last() else { return };
                let last_version = last.version;
                remaining -= page.len() as u64;
                metrics.events_read_total.inc_by(page.len() as u64);
                if !send_events(&sender, page, &token).await {
                    return;
                }
                from = match (backwards, last_version) {
                    (true, 0) => return,
                    (true, v) => v - 1,
                    (false, v) => v + 1,
                };
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(receiver))))
    }

    type ReadAllStream = ReadStreamOut;

    async fn read_all(&self, request: Request<ReadAllRequest>) -> Result<Response<Self::ReadAllStream>, Status> {
        self.ctx.allow(&request, StreamAccess::Read, ALL_STREAMS)?;
        let request = request.into_inner();
        let filter = Arc::new(EventFilter::from_read(request.filter)?);
        self.ctx.metrics.reads_total.with_label_values(&["all"]).inc();
        let token = self.ctx.router.prepare_read(request.consistency, &request.session_token).await?;
        let events = self.ctx.reader.clone();
        let backwards = request.direction == Direction::Backward as i32;
        let head_position = self.ctx.events.next_position();
        let mut from = match (request.from_end, backwards) {
            (false, _) => request.from_position,
            (true, true) => head_position.saturating_sub(1),
            (true, false) => head_position,
        };
        let matches = filter.for_read_all();
        let mut remaining = limit_of(request.max_count);
        let (sender, receiver) = mpsc::channel(READ_STREAM_BUFFER_MESSAGES);
        let metrics = self.ctx.metrics.clone();
        tokio::spawn(async move {
            while remaining > 0 {
                let page_limit = remaining.min(READ_PAGE_EVENTS_MAX as u64) as usize;
                let page = events.read_all_into(from, backwards, page_limit, READ_SCAN_EVENTS_MAX, matches.clone(), WirePage::new(page_limit)).await;
                let (page, next) = match page.map_err(ApiError::from) {
                    Ok(result) => result,
                    Err(e) => {
                        let _ = sender.send(Err(e.into())).await;
                        return;
                    }
                };
                remaining -= page.events as u64;
                metrics.events_read_total.inc_by(page.events as u64);
                if !send_page(&sender, page, &token).await {
                    return;
                }
                match next {
                    Some(next) => from = next,
                    None => return,
                }
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(receiver))))
    }

    async fn delete_stream(&self, request: Request<DeleteStreamRequest>) -> Result<Response<DeleteStreamResponse>, Status> {
        self.ctx.allow(&request, StreamAccess::Write, &request.get_ref().stream)?;
        let forwarded = is_forwarded(&request);
        let request = request.into_inner();
        validate::stream_name_shape("stream", &request.stream)?;
        let expected = match request.expected_kind {
            0 => strata_storage::ExpectedVersion::Any,
            kind => validate::expected_of(kind, request.expected_version)?,
        };
        let router = &self.ctx.router;
        let (stream, hard) = (request.stream.clone(), request.hard);
        router
            .on_leader(
                forwarded,
                || async {
                    let command = ControlCommand::DeleteStream { stream: stream.clone(), expected, hard };
                    let applied = crate::control::propose(router, command).await?;
                    let ControlSuccess::Stream(meta) = applied.success else {
                        return Err(ApiError::Internal { reason: "delete_stream applied with an unexpected outcome".into() });
                    };
                    Ok(DeleteStreamResponse {
                        stream: stream.clone(),
                        truncate_before: meta.truncate_before,
                        hard: meta.tombstone,
                        commit_token: commit_token(applied.log_index),
                    })
                },
                |channel| async move { StreamsClient::new(channel).delete_stream(mark_forwarded(request)).await.map_err(forwarded_failure) },
            )
            .await
    }

    async fn set_stream_metadata(&self, request: Request<SetStreamMetadataRequest>) -> Result<Response<SetStreamMetadataResponse>, Status> {
        self.ctx.allow(&request, StreamAccess::Write, &request.get_ref().stream)?;
        let forwarded = is_forwarded(&request);
        let request = request.into_inner();
        validate::stream_name_shape("stream", &request.stream)?;
        if request.max_count == Some(0) {
            return Err(ApiError::InvalidArgument { field: "max_count".into(), reason: "must be at least 1 (unset for no limit)".into() }.into());
        }
        let router = &self.ctx.router;
        let (stream, max_age_ms, max_count) = (request.stream.clone(), request.max_age_ms, request.max_count);
        router
            .on_leader(
                forwarded,
                || async {
                    let command = ControlCommand::SetStreamMetadata { stream: stream.clone(), max_age_ms, max_count };
                    let applied = crate::control::propose(router, command).await?;
                    Ok(SetStreamMetadataResponse { stream: stream.clone(), commit_token: commit_token(applied.log_index) })
                },
                |channel| async move { StreamsClient::new(channel).set_stream_metadata(mark_forwarded(request)).await.map_err(forwarded_failure) },
            )
            .await
    }

    async fn stream_info(&self, request: Request<StreamInfoRequest>) -> Result<Response<StreamInfoResponse>, Status> {
        self.ctx.allow(&request, StreamAccess::Read, &request.get_ref().stream)?;
        let request = request.into_inner();
        validate::stream_name_shape("stream", &request.stream)?;
        let token = self.ctx.router.prepare_read(request.consistency, &request.session_token).await?;
        let meta = self.ctx.events.stream_meta(&request.stream).map_err(ApiError::from)?.unwrap_or_default();
        if meta.tombstone {
            return Err(ApiError::StreamDeleted { stream: request.stream }.into());
        }
        let head = self
            .ctx
            .events
            .stream_head(&request.stream)
            .map_err(ApiError::from)?
            .ok_or_else(|| ApiError::StreamNotFound { stream: request.stream.clone() })?;
        Ok(Response::new(StreamInfoResponse {
            stream: request.stream,
            head_version: head.last_version,
            event_count: head.event_count,
            created_unix_ms: head.created_unix_ms,
            updated_unix_ms: head.updated_unix_ms,
            first_position: head.first_position,
            last_position: head.last_position,
            tiered: head.first_position < self.ctx.events.tier_state().map_err(ApiError::from)?.watermark,
            commit_token: token,
            max_age_ms: meta.max_age_ms,
            max_count: meta.max_count,
            first_visible_version: meta.first_visible_version(Some(head.last_version)),
            deleted: meta.deleted_and_empty(Some(head.last_version)),
        }))
    }

    async fn list_streams(&self, request: Request<ListStreamsRequest>) -> Result<Response<ListStreamsResponse>, Status> {
        self.ctx.allow(&request, StreamAccess::Read, ALL_STREAMS)?;
        let request = request.into_inner();
        let limit = match request.limit as usize {
            0 => LIST_STREAMS_PAGE_DEFAULT,
            n if n > LIST_STREAMS_PAGE_MAX => {
                return Err(validate::over("limit", "LIST_STREAMS_PAGE_MAX", LIST_STREAMS_PAGE_MAX, n).into())
            }
            n => n,
        };
        self.ctx.router.prepare_read(request.consistency, &request.session_token).await?;
        let page = self.ctx.events.list_streams(&request.prefix, &request.page_token, limit).map_err(ApiError::from)?;
        let next_page_token = if page.len() == limit { page.last().map(|(name, _)| name.clone()).unwrap_or_default() } else { String::new() };
        // Deleted streams (a tombstone, or soft-deleted with nothing since) are not listed;
        // the page token still follows the names scanned.
        let mut listed = Vec::with_capacity(page.len());
        for (stream, head) in page {
            let hidden = self
                .ctx
                .events
                .stream_meta(&stream)
                .map_err(ApiError::from)?
                .is_some_and(|meta| meta.tombstone || meta.deleted_and_empty(Some(head.last_version)));
            if !hidden {
                listed.push((stream, head));
            }
        }
        let streams = listed
            .into_iter()
            .map(|(stream, head)| StreamSummary {
                stream,
                head_version: head.last_version,
                event_count: head.event_count,
                updated_unix_ms: head.updated_unix_ms,
            })
            .collect();
        Ok(Response::new(ListStreamsResponse { streams, next_page_token }))
    }
}
