//! The seeded workload: concurrent clients doing OCC appends (every expected-version mode,
//! client-chosen event ids, an indeterminate outcome retried with the same ids, through
//! another node) and stream reads at every consistency level, plus catch-up subscribers
//! to `$all` that resubscribe after their last stored checkpoint. Every operation is
//! recorded in a shared [`Recorder`].
//!
//! Persistent-group consumers (pinned, over `$all`) ack most deliveries and nack some for
//! a retry, reconnecting through random nodes; a final consumer drains the group after
//! healing, so the checker can hold the group to at-least-once delivery.
//!
//! The subscribers use `Subscriptions.Subscribe` and store the server's checkpoints, so
//! the checker holds the server to what a subscription promises (ordered, gapless,
//! duplicate-free, honest checkpoints) across node failures.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use strata_proto::detail_of;
use strata_proto::v1::streams_client::StreamsClient;
use strata_proto::v1::subscribe_response::Kind;
use strata_proto::v1::subscriptions_client::SubscriptionsClient;
use strata_proto::v1::connect_request::Kind as InKind;
use strata_proto::v1::connect_response::Kind as OutKind;
use strata_proto::v1::persistent_subscriptions_client::PersistentSubscriptionsClient;
use strata_proto::v1::{
    Ack, AppendRequest, AppendResponse, ConnectRequest, ConnectStart, ConsumerStrategy, CreateGroupRequest, ExpectedVersionKind,
    GroupInfoRequest, GroupSettings, Nack, NackAction, ProposedEvent, ReadStreamRequest, SubscribeFrom, SubscribeRequest,
};
use tonic::transport::Channel;

use crate::history::{AppendOutcome, Consistency, Delivered, Expected, GroupAnswer, GroupDelivery, Op, OpKind, ReadOutcome};

/// Streams the clients write to: few, so that OCC conflicts are common.
pub const STREAMS: u64 = 6;
/// Attempts of one append whose outcome stays unknown before the client gives up on it
/// (the events stay "indeterminate": present at most once).
pub const RETRIES_MAX: u32 = 40;
/// Deadline of one append or read call.
pub const CALL_TIMEOUT: Duration = Duration::from_secs(5);

/// xorshift64: a seeded, dependency-free random source; a seed replays a run's choices.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64, stream: u64) -> Self {
        Rng((seed ^ (stream + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15)) | 1)
    }
    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
    /// A duration uniformly in `[min, max]` milliseconds.
    pub fn millis(&mut self, min: u64, max: u64) -> Duration {
        Duration::from_millis(min + self.below(max - min + 1))
    }
}

/// Every operation of a run, with times relative to its start.
pub struct Recorder {
    started: Instant,
    next_op: u64,
    ops: Vec<Op>,
}

impl Recorder {
    pub fn new() -> Arc<Mutex<Self>> {
        Arc::new(Mutex::new(Recorder { started: Instant::now(), next_op: 0, ops: Vec::new() }))
    }

    /// Milliseconds since the run started.
    pub fn now(&self) -> u64 {
        self.started.elapsed().as_millis() as u64
    }

    pub fn started(&self) -> Instant {
        self.started
    }

    fn record(&mut self, client: u32, node: u64, invoke_ms: u64, kind: OpKind) {
        let id = self.next_op;
        self.next_op += 1;
        let complete_ms = self.now();
        self.ops.push(Op { id, client, node, invoke_ms, complete_ms, kind });
    }

    pub fn take_ops(&mut self) -> Vec<Op> {
        std::mem::take(&mut self.ops)
    }
}

/// Where the clients connect: node `i + 1` is `addrs[i]`, fixed for the run (nodes keep
/// their addresses across restarts), and how: plaintext, or TLS when the cluster serves it.
pub struct Targets {
    addrs: Vec<String>,
    tls: Option<strata_security::ClientTls>,
}

pub type Addrs = Arc<Targets>;

impl Targets {
    pub fn new(addrs: Vec<String>, tls: Option<strata_security::ClientTls>) -> Addrs {
        Arc::new(Self { addrs, tls })
    }

    pub fn len(&self) -> usize {
        self.addrs.len()
    }

    pub fn is_empty(&self) -> bool {
        self.addrs.is_empty()
    }

    /// A channel to node `index + 1`, or `None` when it does not accept one within 300 ms.
    async fn channel(&self, index: u64) -> Option<Channel> {
        let endpoint = tonic::transport::Endpoint::from_shared(format!("http://{}", self.addrs[index as usize])).ok()?;
        strata_security::connect(endpoint.connect_timeout(Duration::from_millis(300)), self.tls.as_ref()).await.ok()
    }

    async fn connect(&self, index: u64) -> Option<StreamsClient<Channel>> {
        Some(StreamsClient::new(self.channel(index).await?).max_decoding_message_size(64 * 1024 * 1024))
    }
}

pub fn append_request(stream: &str, expected: Expected, ids: &[String]) -> AppendRequest {
    let (kind, version) = match expected {
        Expected::Any => (ExpectedVersionKind::Any, 0),
        Expected::NoStream => (ExpectedVersionKind::NoStream, 0),
        Expected::StreamExists => (ExpectedVersionKind::StreamExists, 0),
        Expected::Exact(v) => (ExpectedVersionKind::Exact, v),
    };
    AppendRequest {
        stream: stream.into(),
        expected_kind: kind as i32,
        expected_version: version,
        events: ids
            .iter()
            .map(|id| ProposedEvent { id: id.clone(), r#type: "Chaos".into(), data: b"{}".to_vec().into(), metadata: Default::default(), content_type: "application/json".into() })
            .collect(),
    }
}

/// What an append's answer tells the client, by the typed error of SPEC §4: definitely
/// written, definitely not, or unknown (to be retried with the same ids).
pub fn classify(result: Result<AppendResponse, tonic::Status>) -> AppendOutcome {
    match result {
        Ok(r) => AppendOutcome::Ok {
            first_version: r.first_version,
            first_position: r.first_position,
            commit_token: r.commit_token.parse().unwrap_or(0),
            replay: r.idempotent_replay,
        },
        Err(status) => match detail_of(&status) {
            Some(detail) if detail.kind == "wrong_expected_version" => AppendOutcome::WrongVersion { actual: detail.actual_version },
            Some(detail) if !detail.indeterminate && status.code() != tonic::Code::Internal => {
                AppendOutcome::Refused { reason: format!("{}: {}", detail.kind, status.message()) }
            }
            _ => AppendOutcome::Indeterminate { reason: format!("{:?}: {}", status.code(), status.message()) },
        },
    }
}

/// One writing and reading client until `until`.
pub async fn client(addrs: Addrs, recorder: Arc<Mutex<Recorder>>, client_id: u32, seed: u64, until: Instant) {
    let mut rng = Rng::new(seed, u64::from(client_id));
    let mut known_version: BTreeMap<String, u64> = BTreeMap::new();
    let mut session_token = 0u64;
    let mut event_counter = 0u64;
    while Instant::now() < until {
        let node = rng.below(addrs.len() as u64);
        let stream = format!("chaos-{}", rng.below(STREAMS));
        let Some(mut streams) = addrs.connect(node).await else {
            tokio::time::sleep(Duration::from_millis(50)).await;
            continue;
        };
        if rng.below(4) == 0 {
            let (consistency, level, token) = match rng.below(3) {
                0 => (Consistency::Linearizable, strata_proto::v1::Consistency::Linearizable, String::new()),
                1 => (Consistency::Local, strata_proto::v1::Consistency::Local, String::new()),
                _ => (Consistency::Session(session_token), strata_proto::v1::Consistency::Session, session_token.to_string()),
            };
            let invoke_ms = recorder.lock().unwrap().now();
            let request = ReadStreamRequest { stream: stream.clone(), consistency: level as i32, session_token: token, ..Default::default() };
            let outcome = read_stream(&mut streams, request).await;
            recorder.lock().unwrap().record(client_id, node + 1, invoke_ms, OpKind::ReadStream { stream, consistency, outcome });
            continue;
        }
        let expected = match rng.below(4) {
            0 => Expected::Any,
            1 => Expected::NoStream,
            2 => Expected::StreamExists,
            _ => Expected::Exact(known_version.get(&stream).copied().unwrap_or(0)),
        };
        let ids: Vec<String> = (0..=rng.below(3))
            .map(|_| {
                event_counter += 1;
                format!("00000000-0000-4000-8{client_id:03x}-{event_counter:012x}")
            })
            .collect();
        let request = append_request(&stream, expected, &ids);
        let mut node = node;
        // The same request (same ids) until the outcome is known; every attempt recorded.
        for _ in 0..RETRIES_MAX {
            let invoke_ms = recorder.lock().unwrap().now();
            let mut call = tonic::Request::new(request.clone());
            call.set_timeout(CALL_TIMEOUT);
            let outcome = classify(streams.append(call).await.map(tonic::Response::into_inner));
            let definite = !matches!(outcome, AppendOutcome::Indeterminate { .. });
            match &outcome {
                AppendOutcome::Ok { first_version, commit_token, .. } => {
                    known_version.insert(stream.clone(), first_version + ids.len() as u64 - 1);
                    session_token = session_token.max(*commit_token);
                }
                AppendOutcome::WrongVersion { actual: Some(actual) } => {
                    known_version.insert(stream.clone(), *actual);
                }
                _ => {}
            }
            let kind = OpKind::Append { stream: stream.clone(), expected, event_ids: ids.clone(), outcome };
            recorder.lock().unwrap().record(client_id, node + 1, invoke_ms, kind);
            if definite {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
            // Retry through another node: the one asked may be the one that is down.
            loop {
                node = rng.below(addrs.len() as u64);
                if let Some(client) = addrs.connect(node).await {
                    streams = client;
                    break;
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

async fn read_stream(streams: &mut StreamsClient<Channel>, request: ReadStreamRequest) -> ReadOutcome {
    let mut call = tonic::Request::new(request);
    call.set_timeout(CALL_TIMEOUT);
    let mut pages = match streams.read_stream(call).await {
        Ok(response) => response.into_inner(),
        Err(status) if status.code() == tonic::Code::NotFound => return ReadOutcome::NotFound,
        Err(status) => return ReadOutcome::Failed { reason: status.message().to_string() },
    };
    let mut event_ids = Vec::new();
    loop {
        match pages.message().await {
            Ok(Some(page)) => event_ids.extend(page.events.into_iter().map(|e| e.id)),
            Ok(None) => return ReadOutcome::Ok { event_ids },
            Err(status) => return ReadOutcome::Failed { reason: status.message().to_string() },
        }
    }
}

/// One catch-up subscriber to `$all` until `until`: each epoch subscribes through a random
/// node (`Subscriptions.Subscribe`) after the stored checkpoint, takes history and then
/// live events for a few seconds, and ends (or is dropped by a failure) storing the last
/// `Checkpoint` or `CaughtUp` position the server sent, as a consumer that trusts the
/// server's checkpoints does. The checker holds those markers to their promise: never past
/// what was delivered.
pub async fn subscriber(addrs: Addrs, recorder: Arc<Mutex<Recorder>>, subscription: u32, seed: u64, until: Instant) {
    let mut rng = Rng::new(seed, 1000 + u64::from(subscription));
    let mut checkpoint: Option<u64> = None;
    let mut epoch = 0u32;
    while Instant::now() < until {
        let node = rng.below(addrs.len() as u64);
        let Some(channel) = addrs.channel(node).await else {
            tokio::time::sleep(Duration::from_millis(100)).await;
            continue;
        };
        let mut client = SubscriptionsClient::new(channel).max_decoding_message_size(64 * 1024 * 1024);
        let invoke_ms = recorder.lock().unwrap().now();
        let after = checkpoint;
        let request = SubscribeRequest {
            stream: "$all".into(),
            from: if after.is_some() { SubscribeFrom::Revision } else { SubscribeFrom::Start } as i32,
            from_revision: after.map_or(0, |p| p + 1),
            filter: None,
            // Half the epochs are served by the leader through whichever node was called.
            follow_leader: rng.below(2) == 0,
        };
        let epoch_ends = (Instant::now() + rng.millis(1_000, 5_000)).min(until);
        let mut delivered: Vec<Delivered> = Vec::new();
        let mut marker = after;
        let ended = match client.subscribe(request).await {
            Err(status) => format!("dropped: {:?}", status.code()),
            Ok(response) => {
                let mut messages = response.into_inner();
                loop {
                    let message = match tokio::time::timeout_at(epoch_ends.into(), messages.message()).await {
                        Err(_) => break "stopped".to_string(),
                        Ok(Err(status)) => break format!("dropped: {:?}", status.code()),
                        Ok(Ok(None)) => break "dropped: ended by the server".to_string(),
                        Ok(Ok(Some(message))) => message,
                    };
                    match message.kind {
                        Some(Kind::Events(batch)) => delivered.extend(batch.events.into_iter().map(|e| Delivered { id: e.id, position: e.position })),
                        Some(Kind::Checkpoint(m)) => marker = m.position.or(marker),
                        Some(Kind::CaughtUp(m)) => marker = m.position.or(marker),
                        Some(Kind::FellBehind(_)) | None => {}
                    }
                }
            }
        };
        checkpoint = marker;
        let dropped = ended != "stopped";
        let kind = OpKind::SubscriptionEpoch { subscription, epoch, after, delivered, checkpoint, ended };
        recorder.lock().unwrap().record(10_000 + subscription, node + 1, invoke_ms, kind);
        epoch += 1;
        if dropped {
            // A node that is down refuses at once: do not spin on it.
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
}

/// The run's persistent group: pinned over `$all` (so per-stream order is checkable),
/// checkpointing often, retrying forever (nothing is parked in a chaos run).
pub const GROUP: &str = "chaos-group";

fn group_client(channel: Channel) -> PersistentSubscriptionsClient<Channel> {
    PersistentSubscriptionsClient::new(channel).max_decoding_message_size(64 * 1024 * 1024)
}

/// Creates the run's group through any node (retrying until the cluster answers).
pub async fn create_group(addrs: &Addrs) -> Result<(), String> {
    let settings = GroupSettings {
        source: "$all".into(),
        strategy: ConsumerStrategy::Pinned as i32,
        checkpoint_after_count: Some(10),
        checkpoint_after_ms: Some(200),
        message_timeout_ms: Some(3_000),
        max_retry_count: Some(10_000),
        max_in_flight: Some(20),
        ..Default::default()
    };
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut last = String::new();
    while Instant::now() < deadline {
        for node in 0..addrs.len() as u64 {
            let Some(channel) = addrs.channel(node).await else { continue };
            match group_client(channel).create(CreateGroupRequest { group: GROUP.into(), settings: Some(settings.clone()) }).await {
                Ok(_) => return Ok(()),
                Err(status) if status.code() == tonic::Code::AlreadyExists => return Ok(()),
                Err(status) => last = status.message().to_string(),
            }
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    Err(format!("could not create the chaos group: {last}"))
}

/// The group's replicated checkpoint and whether it is settled (checkpoint at the head,
/// nothing in flight), through `node`.
async fn group_state(addrs: &Targets, node: u64) -> Option<(u64, bool)> {
    let channel = addrs.channel(node).await?;
    let mut request = tonic::Request::new(GroupInfoRequest { group: GROUP.into() });
    request.set_timeout(CALL_TIMEOUT);
    let info = group_client(channel).info(request).await.ok()?.into_inner();
    Some((info.checkpoint, info.checkpoint == info.head && info.in_flight == 0 && info.replaying == 0))
}

/// How long the draining consumer may take to settle the group after healing.
pub const GROUP_DRAIN_TIMEOUT: Duration = Duration::from_secs(90);

/// One consumer of the run's group until `until`: each epoch observes the checkpoint,
/// connects through a random node, acks most deliveries and nacks some for a retry, and
/// ends after a few seconds or when a fault drops it. With `drain`, it acks everything and
/// runs until the group is settled (or `GROUP_DRAIN_TIMEOUT`).
pub async fn group_consumer(addrs: Addrs, recorder: Arc<Mutex<Recorder>>, consumer: u32, seed: u64, until: Instant, drain: bool) {
    let mut rng = Rng::new(seed, 2000 + u64::from(consumer));
    let mut epoch = 0u32;
    let drain_deadline = Instant::now() + GROUP_DRAIN_TIMEOUT;
    loop {
        if (!drain && Instant::now() >= until) || (drain && Instant::now() >= drain_deadline) {
            return;
        }
        let node = rng.below(addrs.len() as u64);
        let checkpoint_before = group_state(&addrs, node).await.map(|(checkpoint, _)| checkpoint);
        let invoke_ms = recorder.lock().unwrap().now();
        let epoch_ends = if drain { drain_deadline } else { (Instant::now() + rng.millis(1_000, 5_000)).min(until) };
        let mut deliveries = Vec::new();
        let ended = match addrs.channel(node).await {
            None => "dropped: no connection".to_string(),
            Some(channel) => {
                let (requests, outbound) = tokio::sync::mpsc::channel(256);
                let start = ConnectStart { group: GROUP.into(), consumer_name: format!("chaos-{consumer}") };
                let _ = requests.send(ConnectRequest { kind: Some(InKind::Start(start)) }).await;
                match group_client(channel).connect_consumer(tokio_stream::wrappers::ReceiverStream::new(outbound)).await {
                    Err(status) => format!("dropped: {:?}", status.code()),
                    Ok(response) => {
                        let mut messages = response.into_inner();
                        loop {
                            let wait = if drain { Duration::from_secs(2) } else { Duration::from_secs(3_600) };
                            let next = tokio::time::timeout_at(epoch_ends.min(Instant::now() + wait).into(), messages.message()).await;
                            let message = match next {
                                Err(_) if !drain || Instant::now() >= epoch_ends => break "stopped".to_string(),
                                Err(_) => match group_state(&addrs, node).await {
                                    Some((_, true)) => break "drained".to_string(),
                                    _ => continue,
                                },
                                Ok(Err(status)) => break format!("dropped: {:?}", status.code()),
                                Ok(Ok(None)) => break "dropped: ended by the server".to_string(),
                                Ok(Ok(Some(message))) => message,
                            };
                            let Some(OutKind::Delivery(delivery)) = message.kind else { continue };
                            let event = delivery.event.unwrap_or_default();
                            let answer = if !drain && rng.below(10) == 0 { GroupAnswer::Retry } else { GroupAnswer::Ack };
                            let reply = match answer {
                                GroupAnswer::Ack => InKind::Ack(Ack { delivery_ids: vec![delivery.delivery_id] }),
                                GroupAnswer::Retry => InKind::Nack(Nack {
                                    delivery_ids: vec![delivery.delivery_id],
                                    action: NackAction::Retry as i32,
                                    reason: "chaos".into(),
                                    retry_delay_ms: 0,
                                }),
                            };
                            deliveries.push(GroupDelivery {
                                id: event.id,
                                stream: event.stream,
                                version: event.version,
                                position: event.position,
                                retry_count: delivery.retry_count,
                                answer,
                            });
                            if requests.send(ConnectRequest { kind: Some(reply) }).await.is_err() {
                                break "dropped: request stream closed".to_string();
                            }
                        }
                    }
                }
            }
        };
        let settled = ended == "drained";
        let dropped = ended.starts_with("dropped");
        let kind = OpKind::GroupEpoch { consumer, epoch, checkpoint_before, deliveries, ended, drain };
        recorder.lock().unwrap().record(20_000 + consumer, node + 1, invoke_ms, kind);
        epoch += 1;
        if settled {
            return;
        }
        if dropped {
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
}
