//! One persistent subscription group's deliveries, run by the leader.
//!
//! The runtime reads the group's source from the local applied state, from the group's
//! replicated checkpoint on, and holds what it read in `pending` until each event is
//! settled: acked, skipped by a nack, or parked (its copy appended to `$parked-{group}`
//! and committed). The checkpoint it writes through Raft is the lowest cursor still
//! pending (or the read cursor when nothing is), so every event below the replicated
//! checkpoint is settled: a new leader resumes there and redelivers only what was not yet
//! checkpointed, at most `GROUP_BUFFER_EVENTS_MAX` events plus those settled since the
//! last checkpoint (`checkpoint_after_count` / `_ms`).
//!
//! Memory is bounded: the runtime reads only while it holds fewer than
//! `GROUP_BUFFER_EVENTS_MAX` events and `GROUP_BUFFER_BYTES_MAX` bytes; a consumer's
//! channel holds at most its `max_in_flight` deliveries; the mailbox is bounded.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;
use std::time::{Duration, Instant};

use strata_proto::v1::connect_response::Kind as OutKind;
use strata_proto::v1::{ConnectResponse, Connected, ConsumerInfo, ConsumerStrategy, Delivery, NackAction};
use strata_storage::{AppendCommand, ControlCommand, ExpectedVersion, GroupRecord, StoredEvent};
use tokio::sync::{mpsc, oneshot};
use tonic::Status;

use super::parked::{original_of, parked_event, Key};
use super::settings::{parked_stream, Settings};
use crate::api::streams::recorded_event;
use crate::api::NodeContext;
use crate::clock::now_unix_ms;
use crate::error::ApiError;
use crate::limits::*;

/// What a consumer's connection receives.
pub type ConsumerSender = mpsc::Sender<Result<ConnectResponse, Status>>;

/// Requests to a runtime.
pub enum Request {
    Connect { name: String, sender: ConsumerSender, reply: oneshot::Sender<Result<Connected, ApiError>> },
    Ack { consumer: u64, ids: Vec<u64> },
    Nack { consumer: u64, ids: Vec<u64>, action: NackAction, reason: String, delay_ms: u64 },
    Disconnect { consumer: u64 },
    Info { reply: oneshot::Sender<RuntimeInfo> },
}

/// What only the running group knows, for `Info`.
pub struct RuntimeInfo {
    pub in_flight: u64,
    pub consumers: Vec<ConsumerInfo>,
}

/// Completions of work the runtime started.
enum Done {
    Parked { key: Key },
    Checkpointed { result: Result<GroupRecord, ApiError>, written: (u64, u64) },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// Waiting to be delivered (in `ready`), or for its retry delay (in `timers`).
    Ready,
    Delayed { until: Instant },
    InFlight { consumer: u64, delivery_id: u64, deadline: Instant },
    Parking,
}

struct Pending {
    event: StoredEvent,
    retry_count: u32,
    state: State,
    bytes: usize,
}

struct Consumer {
    name: String,
    sender: ConsumerSender,
    in_flight: usize,
    delivered: u64,
    acked: u64,
    nacked: u64,
}

pub struct Runtime {
    ctx: Arc<NodeContext>,
    record: GroupRecord,
    settings: Arc<Settings>,
    /// The next source cursor to read (stream version or `$all` position).
    read_cursor: u64,
    /// The next `$parked-{group}` version to read for a replay.
    parked_cursor: u64,
    pending: BTreeMap<Key, Pending>,
    pending_bytes: usize,
    /// Keys waiting to be delivered now, in order.
    ready: BTreeSet<Key>,
    /// Retry delays and delivery deadlines, by when they fall due.
    timers: BTreeSet<(Instant, Key)>,
    /// Pending keys per stream, for pinned groups' per-stream order.
    by_stream: HashMap<String, BTreeSet<Key>>,
    deliveries: HashMap<u64, Key>,
    consumers: BTreeMap<u64, Consumer>,
    next_consumer_id: u64,
    next_delivery_id: u64,
    last_round_robin: u64,
    /// The (checkpoint, parked replay done) last written, whether a write is under way,
    /// events settled since, and when the last write was.
    written: (u64, u64),
    checkpoint_writing: bool,
    settled_since: u64,
    last_checkpoint: Instant,
    done_sender: mpsc::Sender<Done>,
}

impl Runtime {
    /// Starts the runtime of `record` (read on this node, the leader, after a read index).
    pub fn start(ctx: Arc<NodeContext>, record: GroupRecord) -> Result<mpsc::Sender<Request>, ApiError> {
        let settings = Arc::new(Settings::decode(&record.settings)?);
        let (mailbox, requests) = mpsc::channel(GROUP_MAILBOX_MESSAGES);
        // Parks and checkpoint writes in flight are bounded by the events held.
        let (done_sender, done) = mpsc::channel(GROUP_BUFFER_EVENTS_MAX + 1);
        let runtime = Runtime {
            read_cursor: record.checkpoint,
            parked_cursor: record.parked_replay_done,
            written: (record.checkpoint, record.parked_replay_done),
            ctx,
            record,
            settings,
            pending: BTreeMap::new(),
            pending_bytes: 0,
            ready: BTreeSet::new(),
            timers: BTreeSet::new(),
            by_stream: HashMap::new(),
            deliveries: HashMap::new(),
            consumers: BTreeMap::new(),
            next_consumer_id: 1,
            next_delivery_id: 1,
            last_round_robin: 0,
            checkpoint_writing: false,
            settled_since: 0,
            last_checkpoint: Instant::now(),
            done_sender,
        };
        tokio::spawn(runtime.run(requests, done));
        Ok(mailbox)
    }

    async fn run(mut self, mut requests: mpsc::Receiver<Request>, mut done: mpsc::Receiver<Done>) {
        let group = self.record.name.clone();
        tracing::info!(group, checkpoint = self.record.checkpoint, "persistent group started on the leader");
        let mut applied = self.ctx.router.applied.clone();
        let mut tick = tokio::time::interval(Duration::from_millis(GROUP_TICK_MS));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut refresh = true;
        let mut last_confirmed = Instant::now();
        let stopped = loop {
            if refresh {
                refresh = false;
                if let Err(reason) = self.refresh() {
                    break reason;
                }
            }
            if let Err(e) = self.fill().await {
                break e;
            }
            self.dispatch();
            self.checkpoint_if_due();
            tokio::select! {
                request = requests.recv() => match request {
                    Some(request) => self.handle(request),
                    None => break ApiError::Unavailable { reason: "group runtime closed".into(), leader_id: None, leader_addr: None },
                },
                Some(done) = done.recv() => self.complete(done),
                changed = applied.changed() => {
                    if changed.is_err() {
                        break ApiError::Unavailable { reason: "node is shutting down".into(), leader_id: None, leader_addr: None };
                    }
                    refresh = true;
                }
                _ = tick.tick() => {
                    if !self.still_leads(&mut last_confirmed).await {
                        break ApiError::Unavailable {
                            reason: "leadership moved: connect again (any node forwards to the new leader)".into(),
                            leader_id: None,
                            leader_addr: None,
                        };
                    }
                    self.fire_timers();
                    self.export_metrics();
                    refresh = true;
                }
            }
        };
        tracing::info!(group, reason = %stopped, "persistent group stopped on this node");
        for (_, consumer) in std::mem::take(&mut self.consumers) {
            let _ = consumer.sender.try_send(Err(stopped.clone().into_status()));
        }
        self.ctx.metrics.forget_group(&group);
    }

    /// Whether this node still leads: its Raft metrics say so, and every
    /// `GROUP_LEADERSHIP_CHECK_MS` a quorum confirms it (a read index). A leader cut off
    /// from its followers may believe it leads for a while; without the confirmation it
    /// would keep delivering events another leader's consumers have since settled.
    async fn still_leads(&self, last_confirmed: &mut Instant) -> bool {
        if !self.ctx.router.believes_it_leads() {
            return false;
        }
        if last_confirmed.elapsed() < Duration::from_millis(GROUP_LEADERSHIP_CHECK_MS) {
            return true;
        }
        match tokio::time::timeout(Duration::from_millis(GROUP_LEADERSHIP_CHECK_MS), self.ctx.router.linearize()).await {
            Ok(Ok(_)) => {
                *last_confirmed = Instant::now();
                true
            }
            _ => false,
        }
    }

    /// Reloads the replicated record: settings changes, replay requests, deletion, and a
    /// checkpoint moved past this runtime's by another leader meanwhile (then the events
    /// held here may be settled already: stop, and let the next connection start afresh).
    fn refresh(&mut self) -> Result<(), ApiError> {
        let name = self.record.name.clone();
        let record = self.ctx.events.group(&name)?.filter(|r| r.group_id == self.record.group_id);
        let Some(record) = record else {
            return Err(ApiError::GroupNotFound { group: name });
        };
        let (checkpoint, replay_done) = self.checkpoints();
        if record.checkpoint > checkpoint || record.parked_replay_done > replay_done {
            return Err(ApiError::Unavailable {
                reason: "the group's checkpoint moved on under another leader: connect again".into(),
                leader_id: None,
                leader_addr: None,
            });
        }
        if record.settings != self.record.settings {
            self.settings = Arc::new(Settings::decode(&record.settings)?);
        }
        self.record = record;
        Ok(())
    }

    fn room(&self) -> usize {
        if self.pending_bytes >= GROUP_BUFFER_BYTES_MAX {
            return 0;
        }
        GROUP_BUFFER_EVENTS_MAX.saturating_sub(self.pending.len()).min(GROUP_READ_PAGE_EVENTS)
    }

    /// Reads replayed parked events, then the source, while there is room.
    async fn fill(&mut self) -> Result<(), ApiError> {
        if self.consumers.is_empty() {
            return Ok(());
        }
        while self.parked_cursor < self.record.parked_replay_target && self.room() > 0 {
            let (stream, from) = (parked_stream(&self.record.name), self.parked_cursor);
            let limit = self.room().min((self.record.parked_replay_target - from) as usize);
            let page = self.ctx.reader.read_stream(&stream, from, false, limit).await?;
            let Some(last) = page.last().map(|e| e.version) else {
                // Fewer parked events than asked for: nothing more to replay.
                self.parked_cursor = self.record.parked_replay_target;
                break;
            };
            for parked in page {
                let version = parked.version;
                if let Some(original) = original_of(parked) {
                    self.hold(Key::Replay(version), original);
                }
            }
            self.parked_cursor = last + 1;
        }
        let room = self.room();
        if room == 0 {
            return Ok(());
        }
        let reader = &self.ctx.reader;
        let from = self.read_cursor;
        let settings = self.settings.clone();
        let (page, next): (Vec<StoredEvent>, u64) = match &self.record.source_stream {
            None => {
                let visible = self.ctx.events.next_position();
                // System streams (`$parked-…` among them) are not part of a group's `$all`:
                // a group must not receive its own parked copies.
                let by_stream = settings.clone();
                let matches = strata_storage::AllFilter {
                    stream: Arc::new(move |stream: &str| !stream.starts_with('$') && by_stream.filter.stream_matches(stream)),
                    event: Arc::new(move |event: &strata_storage::EventRef<'_>| settings.filter.event_matches(event)),
                };
                let (page, next) = reader.read_all(from, false, room, READ_SCAN_EVENTS_MAX, matches).await?;
                let last = page.last().map_or(from, |e| e.position + 1);
                (page, next.unwrap_or(visible.max(last)).max(from))
            }
            Some(stream) => {
                let page = reader.read_stream(stream, from, false, room).await?;
                let next = page.last().map_or(from, |e| e.version + 1);
                (page.into_iter().filter(|e| settings.filter.matches(e)).collect(), next)
            }
        };
        let by_version = self.record.source_stream.is_some();
        for event in page {
            let cursor = if by_version { event.version } else { event.position };
            if cursor >= self.read_cursor {
                self.hold(Key::Source(cursor), event);
            }
        }
        self.read_cursor = self.read_cursor.max(next);
        Ok(())
    }

    fn hold(&mut self, key: Key, event: StoredEvent) {
        let bytes = event.data.len() + event.metadata.len() + event.stream.len() + 128;
        self.by_stream.entry(event.stream.clone()).or_default().insert(key);
        self.pending.insert(key, Pending { event, retry_count: 0, state: State::Ready, bytes });
        self.pending_bytes += bytes;
        self.ready.insert(key);
    }

    /// Removes a settled event.
    fn settle(&mut self, key: Key) {
        let Some(entry) = self.pending.remove(&key) else { return };
        self.pending_bytes -= entry.bytes;
        self.ready.remove(&key);
        if let Some(keys) = self.by_stream.get_mut(&entry.event.stream) {
            keys.remove(&key);
            if keys.is_empty() {
                self.by_stream.remove(&entry.event.stream);
            }
        }
        self.settled_since += 1;
    }

    /// The consumer to give the event at `key` of `stream`, if one has room.
    fn pick_consumer(&mut self, stream: &str) -> Option<u64> {
        let max_in_flight = self.settings.max_in_flight;
        let has_room = |c: &Consumer| c.in_flight < max_in_flight;
        match self.settings.strategy {
            ConsumerStrategy::DispatchToSingle => self.consumers.iter().find(|(_, c)| has_room(c)).map(|(id, _)| *id),
            ConsumerStrategy::RoundRobin => {
                let after = self.consumers.range(self.last_round_robin + 1..).find(|(_, c)| has_room(c));
                let chosen = after.or_else(|| self.consumers.iter().find(|(_, c)| has_room(c))).map(|(id, _)| *id)?;
                self.last_round_robin = chosen;
                Some(chosen)
            }
            ConsumerStrategy::Pinned => {
                use std::hash::{Hash, Hasher};
                let mut hasher = std::collections::hash_map::DefaultHasher::new();
                stream.hash(&mut hasher);
                let index = (hasher.finish() as usize) % self.consumers.len().max(1);
                let (id, consumer) = self.consumers.iter().nth(index)?;
                has_room(consumer).then_some(*id)
            }
        }
    }

    /// Delivers ready events to consumers with room.
    fn dispatch(&mut self) {
        if self.consumers.is_empty() || self.ready.is_empty() {
            return;
        }
        let pinned = self.settings.strategy == ConsumerStrategy::Pinned;
        // Walks `ready` from its start; dispatched keys leave it, skipped ones stay behind
        // the cursor. Runs on every request, so it copies nothing up front.
        let mut cursor: Option<Key> = None;
        for _ in 0..GROUP_DISPATCH_SCAN_MAX {
            let next = match cursor {
                None => self.ready.first(),
                Some(after) => self.ready.range((std::ops::Bound::Excluded(after), std::ops::Bound::Unbounded)).next(),
            };
            let Some(&key) = next else { return };
            cursor = Some(key);
            let stream = self.pending[&key].event.stream.clone();
            // Pinned: one event of a stream at a time, the stream's earliest first.
            if pinned && self.by_stream.get(&stream).and_then(|keys| keys.first()) != Some(&key) {
                continue;
            }
            let Some(consumer_id) = self.pick_consumer(&stream) else {
                if pinned {
                    continue;
                }
                return;
            };
            let delivery_id = self.next_delivery_id;
            let entry = self.pending.get_mut(&key).expect("ready keys are pending");
            let delivery = Delivery {
                delivery_id,
                retry_count: entry.retry_count,
                event: Some(recorded_event(entry.event.clone())),
                replayed: matches!(key, Key::Replay(_)),
            };
            let consumer = self.consumers.get_mut(&consumer_id).expect("picked consumers exist");
            match consumer.sender.try_send(Ok(ConnectResponse { kind: Some(OutKind::Delivery(delivery)) })) {
                Ok(()) => {}
                Err(mpsc::error::TrySendError::Full(_)) => continue,
                Err(mpsc::error::TrySendError::Closed(_)) => {
                    self.disconnect(consumer_id);
                    return;
                }
            }
            consumer.in_flight += 1;
            consumer.delivered += 1;
            self.next_delivery_id += 1;
            let deadline = Instant::now() + Duration::from_millis(self.settings.message_timeout_ms);
            entry.state = State::InFlight { consumer: consumer_id, delivery_id, deadline };
            self.ready.remove(&key);
            self.timers.insert((deadline, key));
            self.deliveries.insert(delivery_id, key);
            self.ctx.metrics.group_events_total.with_label_values(&[&self.record.name, "delivered"]).inc();
        }
    }

    fn handle(&mut self, request: Request) {
        match request {
            Request::Connect { name, sender, reply } => {
                if self.consumers.len() >= self.settings.max_consumers {
                    let _ = reply.send(Err(ApiError::LimitReached {
                        what: format!("consumers of group `{}`", self.record.name),
                        limit_name: "max_consumers",
                        limit_value: self.settings.max_consumers as u64,
                    }));
                    return;
                }
                let id = self.next_consumer_id;
                self.next_consumer_id += 1;
                let name = if name.is_empty() { format!("consumer-{id}") } else { name };
                let connected = Connected {
                    group: self.record.name.clone(),
                    consumer_id: id.to_string(),
                    max_in_flight: self.settings.max_in_flight as u32,
                };
                if sender.try_send(Ok(ConnectResponse { kind: Some(OutKind::Connected(connected.clone())) })).is_err() {
                    return;
                }
                tracing::info!(group = self.record.name, consumer = name, "consumer connected");
                self.consumers.insert(id, Consumer { name, sender, in_flight: 0, delivered: 0, acked: 0, nacked: 0 });
                let _ = reply.send(Ok(connected));
            }
            Request::Ack { consumer, ids } => {
                for id in ids {
                    if let Some(key) = self.take_delivery(consumer, id) {
                        if let Some(c) = self.consumers.get_mut(&consumer) {
                            c.acked += 1;
                        }
                        self.settle(key);
                        self.ctx.metrics.group_events_total.with_label_values(&[&self.record.name, "acked"]).inc();
                    }
                }
            }
            Request::Nack { consumer, ids, action, reason, delay_ms } => {
                for id in ids {
                    let Some(key) = self.take_delivery(consumer, id) else { continue };
                    if let Some(c) = self.consumers.get_mut(&consumer) {
                        c.nacked += 1;
                    }
                    match action {
                        NackAction::Retry => self.retry(key, delay_ms, &format!("nacked: {reason}")),
                        NackAction::Park => self.park(key, &format!("parked by consumer: {reason}")),
                        NackAction::Skip => {
                            self.settle(key);
                            self.ctx.metrics.group_events_total.with_label_values(&[&self.record.name, "skipped"]).inc();
                        }
                        NackAction::Stop => self.make_ready(key, None),
                    }
                }
                if action == NackAction::Stop {
                    if let Some(c) = self.consumers.get(&consumer) {
                        let _ = c.sender.try_send(Err(Status::cancelled(format!("stopped by the consumer's nack: {reason}"))));
                    }
                    self.disconnect(consumer);
                }
            }
            Request::Disconnect { consumer } => self.disconnect(consumer),
            Request::Info { reply } => {
                let consumers = self
                    .consumers
                    .iter()
                    .map(|(id, c)| ConsumerInfo {
                        consumer_id: id.to_string(),
                        name: c.name.clone(),
                        in_flight: c.in_flight as u64,
                        delivered: c.delivered,
                        acked: c.acked,
                        nacked: c.nacked,
                    })
                    .collect();
                let _ = reply.send(RuntimeInfo { in_flight: self.deliveries.len() as u64, consumers });
            }
        }
    }

    /// The pending key of an in-flight delivery of `consumer`, taken out of flight.
    fn take_delivery(&mut self, consumer: u64, delivery_id: u64) -> Option<Key> {
        let key = *self.deliveries.get(&delivery_id)?;
        let entry = self.pending.get_mut(&key)?;
        let State::InFlight { consumer: holder, delivery_id: current, deadline } = entry.state else { return None };
        if holder != consumer || current != delivery_id {
            return None;
        }
        self.deliveries.remove(&delivery_id);
        self.timers.remove(&(deadline, key));
        entry.state = State::Ready;
        if let Some(c) = self.consumers.get_mut(&consumer) {
            c.in_flight -= 1;
        }
        Some(key)
    }

    /// Back to ready, now or after `delay`.
    fn make_ready(&mut self, key: Key, delay: Option<Duration>) {
        let Some(entry) = self.pending.get_mut(&key) else { return };
        match delay.filter(|d| !d.is_zero()) {
            None => {
                entry.state = State::Ready;
                self.ready.insert(key);
            }
            Some(delay) => {
                let until = Instant::now() + delay;
                entry.state = State::Delayed { until };
                self.timers.insert((until, key));
            }
        }
    }

    /// Counts a failed delivery: retried (after a delay), or parked past max_retry_count.
    fn retry(&mut self, key: Key, delay_ms: u64, reason: &str) {
        let Some(entry) = self.pending.get_mut(&key) else { return };
        entry.retry_count += 1;
        if entry.retry_count > self.settings.max_retry_count {
            let retries = entry.retry_count - 1;
            self.park(key, &format!("max_retry_count={} exceeded after {retries} retries; last: {reason}", self.settings.max_retry_count));
            return;
        }
        let delay = if delay_ms > 0 { delay_ms } else { self.settings.backoff_ms(entry.retry_count) };
        self.ctx.metrics.group_events_total.with_label_values(&[&self.record.name, "retried"]).inc();
        self.make_ready(key, Some(Duration::from_millis(delay)));
    }

    /// Appends the event's copy to `$parked-{group}`; settled once that is committed.
    fn park(&mut self, key: Key, reason: &str) {
        let Some(entry) = self.pending.get_mut(&key) else { return };
        entry.state = State::Parking;
        self.ready.remove(&key);
        let copy = parked_event(&self.record.name, self.record.group_id, key, &entry.event, entry.retry_count, reason);
        let command = AppendCommand {
            stream: parked_stream(&self.record.name),
            expected: ExpectedVersion::Any,
            events: vec![copy],
            created_unix_ms: now_unix_ms(),
        };
        let (batcher, done, group) = (self.ctx.batcher.clone(), self.done_sender.clone(), self.record.name.clone());
        tokio::spawn(async move {
            loop {
                let outcome = batcher.append(command.clone()).await;
                match outcome.map(|applied| applied.outcome) {
                    // Written now, or by an earlier attempt (the id is the event's place).
                    Ok(Ok(_)) | Ok(Err(strata_storage::AppendFailure::IdempotencyConflict { .. })) => break,
                    Ok(Err(e)) => tracing::warn!(group, error = %e, "parking an event failed; retrying"),
                    Err(e) => tracing::warn!(group, error = %e, "parking an event failed; retrying"),
                }
                if done.is_closed() {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(GROUP_PARK_RETRY_MS)).await;
            }
            let _ = done.send(Done::Parked { key }).await;
        });
    }

    fn disconnect(&mut self, consumer: u64) {
        let Some(gone) = self.consumers.remove(&consumer) else { return };
        tracing::info!(group = self.record.name, consumer = gone.name, in_flight = gone.in_flight, "consumer disconnected");
        // Its unacked deliveries count as failed deliveries: retried, or parked once
        // they keep failing (an event that crashes every consumer is a poison message).
        let held: Vec<(u64, Key)> = self.deliveries.iter().map(|(id, key)| (*id, *key)).collect();
        for (delivery_id, key) in held {
            if let Some(State::InFlight { consumer: holder, deadline, .. }) = self.pending.get(&key).map(|e| e.state)
                && holder == consumer
            {
                self.deliveries.remove(&delivery_id);
                self.timers.remove(&(deadline, key));
                self.retry(key, 0, "consumer disconnected");
            }
        }
    }

    /// Due retry delays become ready; expired deliveries are retried.
    fn fire_timers(&mut self) {
        let now = Instant::now();
        while let Some(&(at, key)) = self.timers.first() {
            if at > now {
                break;
            }
            self.timers.pop_first();
            let Some(state) = self.pending.get(&key).map(|e| e.state) else { continue };
            match state {
                State::Delayed { until } if until == at => self.make_ready(key, None),
                State::InFlight { consumer, delivery_id, deadline } if deadline == at => {
                    self.deliveries.remove(&delivery_id);
                    if let Some(c) = self.consumers.get_mut(&consumer) {
                        c.in_flight -= 1;
                    }
                    self.ctx.metrics.group_events_total.with_label_values(&[&self.record.name, "timed_out"]).inc();
                    self.retry(key, 0, "message_timeout_ms elapsed");
                }
                _ => {}
            }
        }
    }

    fn complete(&mut self, done: Done) {
        match done {
            Done::Parked { key } => {
                self.settle(key);
                self.ctx.metrics.group_events_total.with_label_values(&[&self.record.name, "parked"]).inc();
            }
            Done::Checkpointed { result, written } => {
                self.checkpoint_writing = false;
                match result {
                    Ok(_) => self.written = written,
                    Err(e) => tracing::warn!(group = self.record.name, error = %e, "writing the group checkpoint failed"),
                }
            }
        }
    }

    /// The lowest source cursor and parked version not yet settled.
    fn checkpoints(&self) -> (u64, u64) {
        // Replay keys sort before source keys.
        let source = self.pending.range(Key::Source(0)..).next().map(|(k, _)| match k {
            Key::Source(cursor) => *cursor,
            Key::Replay(_) => unreachable!("replay keys sort first"),
        });
        let replay = self.pending.keys().next().and_then(|k| if let Key::Replay(v) = k { Some(*v) } else { None });
        (source.unwrap_or(self.read_cursor), replay.unwrap_or(self.parked_cursor))
    }

    /// Writes the checkpoint through Raft after `checkpoint_after_count` settled events or
    /// `checkpoint_after_ms`, whichever first, when it moved.
    fn checkpoint_if_due(&mut self) {
        if self.checkpoint_writing {
            return;
        }
        let now = self.checkpoints();
        if now == self.written {
            return;
        }
        let due = self.settled_since >= self.settings.checkpoint_after_count
            || self.last_checkpoint.elapsed() >= Duration::from_millis(self.settings.checkpoint_after_ms);
        if !due {
            return;
        }
        self.checkpoint_writing = true;
        self.settled_since = 0;
        self.last_checkpoint = Instant::now();
        let command = ControlCommand::CheckpointGroup {
            name: self.record.name.clone(),
            group_id: self.record.group_id,
            checkpoint: now.0,
            parked_replay_done: now.1,
        };
        let (router, done) = (self.ctx.router.clone(), self.done_sender.clone());
        tokio::spawn(async move {
            let result = crate::control::propose(&router, command).await.and_then(|applied| match applied.success {
                strata_storage::ControlSuccess::Group(record) => Ok(record),
                other => Err(ApiError::Internal { reason: format!("checkpoint answered {other:?}") }),
            });
            let _ = done.send(Done::Checkpointed { result, written: now }).await;
        });
    }

    fn export_metrics(&self) {
        let metrics = &self.ctx.metrics;
        let name = self.record.name.as_str();
        metrics.group_in_flight.with_label_values(&[name]).set(self.deliveries.len() as i64);
        metrics.group_consumers.with_label_values(&[name]).set(self.consumers.len() as i64);
        metrics.group_checkpoint.with_label_values(&[name]).set(self.record.checkpoint as i64);
        let head = super::source_head(&self.ctx.events, &self.record).unwrap_or(0);
        metrics.group_lag.with_label_values(&[name]).set(head.saturating_sub(self.record.checkpoint) as i64);
        let parked = super::parked_waiting(&self.ctx.events, &self.record).unwrap_or(0);
        metrics.group_parked.with_label_values(&[name]).set(parked as i64);
    }
}
