//! Persistent subscription groups (issue 6) on a real three-node cluster: acks and the
//! replicated checkpoint with consumers on different nodes, max_in_flight, every nack
//! action, message timeouts and parking, replay of parked events, pinned per-stream order
//! under retries, and a leader kill during consumption (nothing acked below the checkpoint
//! is redelivered, nothing is lost).

mod common;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::time::{Duration, Instant};

use common::{append_request, append_retrying, metrics_of, TestCluster};
use strata_proto::v1::connect_request::Kind as InKind;
use strata_proto::v1::connect_response::Kind as OutKind;
use strata_proto::v1::persistent_subscriptions_client::PersistentSubscriptionsClient;
use strata_proto::v1::{
    Ack, ConnectRequest, ConnectStart, ConsumerStrategy, CreateGroupRequest, Delivery, ExpectedVersionKind, GroupInfo,
    GroupInfoRequest, GroupSettings, Nack, NackAction, ProposedEvent, ReplayParkedRequest, SubscriptionFilter,
};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::Channel;

fn event(n: u64, event_type: &str) -> ProposedEvent {
    ProposedEvent {
        id: format!("00000000-0000-4000-8000-{n:012x}"),
        r#type: event_type.into(),
        data: format!("{{\"n\":{n}}}").into_bytes().into(),
        metadata: b"{}".to_vec().into(),
        content_type: "application/json".into(),
    }
}

async fn append(cluster: &TestCluster, stream: &str, events: Vec<ProposedEvent>) {
    append_retrying(cluster, append_request(stream, ExpectedVersionKind::Any, 0, events), Duration::from_secs(30)).await.expect("append");
}

async fn groups(cluster: &TestCluster, node: u64) -> PersistentSubscriptionsClient<Channel> {
    PersistentSubscriptionsClient::new(cluster.channel(node).await)
}

/// Creates a group, retrying while a just-started cluster has no settled leader (UNAVAILABLE
/// is definite: nothing was proposed).
async fn create(cluster: &TestCluster, node: u64, group: &str, settings: GroupSettings) -> GroupInfo {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let request = CreateGroupRequest { group: group.into(), settings: Some(settings.clone()) };
        match groups(cluster, node).await.create(request).await {
            Ok(info) => return info.into_inner(),
            Err(status) if status.code() == tonic::Code::Unavailable && Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            Err(status) => panic!("create group: {status:?}"),
        }
    }
}

async fn info(cluster: &TestCluster, node: u64, group: &str) -> GroupInfo {
    groups(cluster, node).await.info(GroupInfoRequest { group: group.into() }).await.expect("group info").into_inner()
}

/// One consumer connection.
struct Consumer {
    requests: mpsc::Sender<ConnectRequest>,
    responses: tonic::Streaming<strata_proto::v1::ConnectResponse>,
}

impl Consumer {
    async fn connect(cluster: &TestCluster, node: u64, group: &str, name: &str) -> Result<Self, tonic::Status> {
        let (requests, outbound) = mpsc::channel(1024);
        let start = ConnectStart { group: group.into(), consumer_name: name.into() };
        requests.send(ConnectRequest { kind: Some(InKind::Start(start)) }).await.unwrap();
        let mut responses = groups(cluster, node).await.connect_consumer(ReceiverStream::new(outbound)).await?.into_inner();
        match responses.message().await?.and_then(|m| m.kind) {
            Some(OutKind::Connected(_)) => Ok(Self { requests, responses }),
            other => panic!("expected Connected, got {other:?}"),
        }
    }

    /// The next delivery within `within`; None when nothing came; Err when the connection ended.
    async fn next(&mut self, within: Duration) -> Result<Option<Delivery>, tonic::Status> {
        match tokio::time::timeout(within, self.responses.message()).await {
            Err(_) => Ok(None),
            Ok(Ok(Some(message))) => match message.kind {
                Some(OutKind::Delivery(delivery)) => Ok(Some(delivery)),
                other => panic!("unexpected {other:?}"),
            },
            Ok(Ok(None)) => Err(tonic::Status::cancelled("ended")),
            Ok(Err(status)) => Err(status),
        }
    }

    async fn delivery(&mut self) -> Delivery {
        self.next(Duration::from_secs(15)).await.expect("connection open").expect("a delivery within 15 s")
    }

    async fn ack(&self, ids: Vec<u64>) {
        self.requests.send(ConnectRequest { kind: Some(InKind::Ack(Ack { delivery_ids: ids })) }).await.unwrap();
    }

    async fn nack(&self, id: u64, action: NackAction, delay_ms: u64) {
        let nack = Nack { delivery_ids: vec![id], action: action as i32, reason: format!("test {action:?}"), retry_delay_ms: delay_ms };
        self.requests.send(ConnectRequest { kind: Some(InKind::Nack(nack)) }).await.unwrap();
    }
}

fn n_of(delivery: &Delivery) -> u64 {
    let event = delivery.event.as_ref().unwrap();
    let data: serde_json::Value = serde_json::from_slice(&event.data).unwrap();
    data["n"].as_u64().unwrap()
}

async fn wait_for<T>(what: &str, timeout: Duration, mut probe: impl AsyncFnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(value) = probe().await {
            return value;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn consumers_on_different_nodes_share_a_group_and_the_checkpoint_follows_the_acks() {
    let cluster = TestCluster::start(43, 3).await;
    let leader = cluster.wait_leader(Duration::from_secs(20)).await;
    let followers: Vec<u64> = cluster.running().into_iter().filter(|id| *id != leader).collect();
    let settings = GroupSettings {
        source: "$all".into(),
        filter: Some(SubscriptionFilter { event_types: vec!["Wanted".into()], ..Default::default() }),
        max_in_flight: Some(5),
        checkpoint_after_ms: Some(200),
        ..Default::default()
    };
    let created = create(&cluster, followers[0], "workers", settings).await;
    assert_eq!(created.settings.as_ref().unwrap().max_retry_count, Some(10), "defaults are filled in");
    for batch in 0..20 {
        let events = (0..10).map(|i| event(batch * 10 + i, if i % 2 == 0 { "Wanted" } else { "Other" })).collect();
        append(&cluster, &format!("s-{}", batch % 3), events).await;
    }
    let mut one = Consumer::connect(&cluster, followers[0], "workers", "one").await.unwrap();
    let mut two = Consumer::connect(&cluster, followers[1], "workers", "two").await.unwrap();

    // max_in_flight: each consumer gets 5 deliveries and no more until it acks.
    let mut held = Vec::new();
    for _ in 0..5 {
        held.push(one.delivery().await);
    }
    let mut seen: BTreeMap<u64, u32> = BTreeMap::new();
    let mut per_consumer = [0usize; 2];
    // Consumer one holds its five while two takes everything else.
    loop {
        match two.next(Duration::from_secs(3)).await.unwrap() {
            Some(delivery) => {
                *seen.entry(n_of(&delivery)).or_default() += 1;
                per_consumer[1] += 1;
                two.ack(vec![delivery.delivery_id]).await;
            }
            None => break,
        }
    }
    assert!(one.next(Duration::from_millis(300)).await.unwrap().is_none(), "no sixth delivery to a full consumer");
    for delivery in &held {
        *seen.entry(n_of(delivery)).or_default() += 1;
        per_consumer[0] += 1;
    }
    one.ack(held.iter().map(|d| d.delivery_id).collect()).await;
    let wanted: BTreeSet<u64> = (0..200).filter(|n| n % 2 == 0).collect();
    assert_eq!(seen.keys().copied().collect::<BTreeSet<_>>(), wanted, "every matching event, and only those");
    assert!(seen.values().all(|count| *count == 1), "acked promptly: delivered once each");
    assert!(per_consumer[0] > 0 && per_consumer[1] > 0);

    // The replicated checkpoint reaches the head; Info (from any node) shows the consumers.
    let settled = wait_for("checkpoint at the head", Duration::from_secs(10), async || {
        let info = info(&cluster, followers[1], "workers").await;
        (info.checkpoint == 200 && info.in_flight == 0).then_some(info)
    })
    .await;
    assert_eq!((settled.head, settled.lag, settled.consumers.len()), (200, 0, 2));
    assert!(settled.running);
    let metrics = metrics_of(&cluster, leader).await;
    assert!(metrics.contains("strata_group_checkpoint{group=\"workers\""), "{metrics}");
    assert!(metrics.contains("strata_group_events_total{group=\"workers\",") && metrics.contains("outcome=\"acked\""));

    // A parked event's copy lands in `$parked-workers`, a system stream: an `$all` group
    // does not receive it (no feedback loop).
    append(&cluster, "s-9", vec![event(1_000, "Wanted")]).await;
    let last = match two.next(Duration::from_secs(3)).await.unwrap() {
        Some(delivery) => delivery,
        None => one.delivery().await,
    };
    assert_eq!(n_of(&last), 1_000);
    two.nack(last.delivery_id, NackAction::Park, 0).await;
    one.nack(last.delivery_id, NackAction::Park, 0).await;
    assert!(two.next(Duration::from_millis(1_500)).await.unwrap().is_none(), "the parked copy is not delivered");
    assert!(one.next(Duration::from_millis(200)).await.unwrap().is_none(), "the parked copy is not delivered");
    wait_for("the park", Duration::from_secs(10), async || (info(&cluster, leader, "workers").await.parked == 1).then_some(())).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn every_nack_action_and_parking_with_replay() {
    let cluster = TestCluster::start(44, 3).await;
    let node = cluster.running()[1];
    let settings = GroupSettings { source: "orders".into(), max_retry_count: Some(2), checkpoint_after_ms: Some(100), ..Default::default() };
    create(&cluster, node, "billing", settings).await;
    append(&cluster, "orders", (0..6).map(|n| event(n, "OrderPlaced")).collect()).await;
    append(&cluster, "other", vec![event(100, "OrderPlaced")]).await;

    let mut consumer = Consumer::connect(&cluster, node, "billing", "c").await.unwrap();
    let mut deliveries: HashMap<u64, Delivery> = HashMap::new();
    for _ in 0..6 {
        let d = consumer.delivery().await;
        deliveries.insert(n_of(&d), d);
    }
    assert_eq!(deliveries.keys().copied().collect::<BTreeSet<_>>(), (0..6).collect(), "only the source stream's events");
    // 0: retry once (with a delay), then ack. 1: park. 2: skip. 3: retry past max -> parked.
    // 4: ack. 5: stop (disconnects; redelivered to the next connection).
    let at = Instant::now();
    consumer.nack(deliveries[&0].delivery_id, NackAction::Retry, 300).await;
    consumer.nack(deliveries[&1].delivery_id, NackAction::Park, 0).await;
    consumer.nack(deliveries[&2].delivery_id, NackAction::Skip, 0).await;
    consumer.nack(deliveries[&3].delivery_id, NackAction::Retry, 0).await;
    consumer.ack(vec![deliveries[&4].delivery_id]).await;
    let mut retried_three = 0;
    let mut zero_again = None;
    while zero_again.is_none() || retried_three < 2 {
        let d = consumer.delivery().await;
        match n_of(&d) {
            0 => {
                assert!(at.elapsed() >= Duration::from_millis(250), "the retry waited for its delay");
                assert_eq!(d.retry_count, 1);
                consumer.ack(vec![d.delivery_id]).await;
                zero_again = Some(d);
            }
            3 => {
                retried_three += 1;
                assert_eq!(d.retry_count, retried_three);
                consumer.nack(d.delivery_id, NackAction::Retry, 0).await;
            }
            other => panic!("unexpected redelivery of {other}"),
        }
    }
    consumer.nack(deliveries[&5].delivery_id, NackAction::Stop, 0).await;
    let ended = loop {
        match consumer.next(Duration::from_secs(10)).await {
            Ok(Some(d)) => panic!("delivery after stop: {}", n_of(&d)),
            Ok(None) => panic!("stop did not end the connection"),
            Err(status) => break status,
        }
    };
    assert_eq!(ended.code(), tonic::Code::Cancelled, "{ended:?}");
    let mut consumer = Consumer::connect(&cluster, node, "billing", "c2").await.unwrap();
    let five = consumer.delivery().await;
    assert_eq!((n_of(&five), five.retry_count), (5, 0), "a stopped event comes back without counting as a failure");
    consumer.ack(vec![five.delivery_id]).await;
    assert!(consumer.next(Duration::from_millis(500)).await.unwrap().is_none());

    // Parked: 1 (by the consumer) and 3 (past max_retry_count), with their reasons.
    let parked = wait_for("two parked events", Duration::from_secs(10), async || {
        let info = info(&cluster, node, "billing").await;
        (info.parked == 2 && info.checkpoint == 6).then_some(info)
    })
    .await;
    assert_eq!(parked.in_flight, 0);
    let mut streams = cluster.streams(node).await;
    let read = strata_proto::v1::ReadStreamRequest { stream: "$parked-billing".into(), max_count: 10, ..Default::default() };
    let mut copies = Vec::new();
    let mut reader = streams.read_stream(read).await.unwrap().into_inner();
    while let Some(page) = reader.message().await.unwrap() {
        copies.extend(page.events);
    }
    let reasons: Vec<String> = copies
        .iter()
        .map(|e| serde_json::from_slice::<serde_json::Value>(&e.metadata).unwrap()["$parked"]["reason"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(reasons.len(), 2, "{reasons:?}");
    assert!(reasons[0].contains("parked by consumer"), "{reasons:?}");
    assert!(reasons[1].contains("max_retry_count=2"), "{reasons:?}");

    // Replay: the originals come back (marked replayed); acking them settles the replay.
    let replay = groups(&cluster, node).await.replay_parked(ReplayParkedRequest { group: "billing".into(), stop_at: None }).await.unwrap();
    assert_eq!(replay.into_inner().replaying, 2);
    let mut replayed = BTreeSet::new();
    for _ in 0..2 {
        let d = consumer.delivery().await;
        assert!(d.replayed);
        let event = d.event.as_ref().unwrap();
        assert_eq!((event.stream.as_str(), &event.metadata[..]), ("orders", b"{}".as_slice()), "the original event");
        replayed.insert(n_of(&d));
        consumer.ack(vec![d.delivery_id]).await;
    }
    assert_eq!(replayed, BTreeSet::from([1, 3]));
    wait_for("replay settled", Duration::from_secs(10), async || {
        let info = info(&cluster, node, "billing").await;
        (info.parked == 0 && info.replaying == 0).then_some(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn unacked_deliveries_time_out_are_retried_and_then_parked() {
    let cluster = TestCluster::start(45, 3).await;
    let node = cluster.running()[0];
    let settings = GroupSettings { source: "jobs".into(), message_timeout_ms: Some(500), max_retry_count: Some(1), ..Default::default() };
    create(&cluster, node, "slow", settings).await;
    append(&cluster, "jobs", vec![event(1, "Job")]).await;
    let mut consumer = Consumer::connect(&cluster, node, "slow", "sleepy").await.unwrap();
    let first = consumer.delivery().await;
    let at = Instant::now();
    let again = consumer.delivery().await;
    assert!(at.elapsed() >= Duration::from_millis(400), "redelivered after the message timeout");
    assert_eq!((n_of(&again), again.retry_count), (1, 1));
    assert_ne!(first.delivery_id, again.delivery_id);
    // An ack of the expired delivery does nothing.
    consumer.ack(vec![first.delivery_id]).await;
    let parked = wait_for("parked after the second timeout", Duration::from_secs(10), async || {
        let info = info(&cluster, node, "slow").await;
        (info.parked == 1 && info.checkpoint == 1).then_some(info)
    })
    .await;
    assert_eq!(parked.in_flight, 0);
    assert!(consumer.next(Duration::from_millis(700)).await.unwrap().is_none(), "a parked event is not delivered again");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn pinned_keeps_each_streams_order_under_retries() {
    let cluster = TestCluster::start(46, 3).await;
    let node = cluster.running()[2];
    let settings = GroupSettings {
        source: "$all".into(),
        strategy: ConsumerStrategy::Pinned as i32,
        max_in_flight: Some(20),
        max_retry_count: Some(100),
        ..Default::default()
    };
    create(&cluster, node, "pinned", settings).await;
    let mut consumers = vec![
        Consumer::connect(&cluster, node, "pinned", "a").await.unwrap(),
        Consumer::connect(&cluster, cluster.running()[0], "pinned", "b").await.unwrap(),
    ];
    for n in 0..60 {
        append(&cluster, &format!("account-{}", n % 4), vec![event(n, "Moved")]).await;
    }
    let mut acked: HashMap<String, Vec<u64>> = HashMap::new();
    let mut owner: HashMap<String, usize> = HashMap::new();
    let mut failures = 0;
    let mut total = 0;
    while total < 60 {
        let mut progressed = false;
        for (index, consumer) in consumers.iter_mut().enumerate() {
            let Some(d) = consumer.next(Duration::from_millis(200)).await.unwrap() else { continue };
            progressed = true;
            let event = d.event.clone().unwrap();
            assert_eq!(*owner.entry(event.stream.clone()).or_insert(index), index, "a stream stays with one consumer");
            let versions = acked.entry(event.stream.clone()).or_default();
            assert_eq!(event.version, versions.len() as u64, "stream {} delivered out of order", event.stream);
            // Fail every third event's first delivery: its stream waits for the retry.
            if event.version % 3 == 0 && d.retry_count == 0 {
                failures += 1;
                consumer.nack(d.delivery_id, NackAction::Retry, 0).await;
            } else {
                versions.push(event.version);
                total += 1;
                consumer.ack(vec![d.delivery_id]).await;
            }
        }
        assert!(progressed || total == 60, "pinned deliveries stalled at {total}");
    }
    assert!(failures >= 15);
    assert!(acked.values().all(|v| v.len() == 15));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_leader_kill_during_consumption_loses_nothing_and_redelivers_nothing_below_the_checkpoint() {
    let mut cluster = TestCluster::start(47, 3).await;
    let leader = cluster.wait_leader(Duration::from_secs(20)).await;
    let follower = cluster.running().into_iter().find(|id| *id != leader).unwrap();
    let settings = GroupSettings { source: "$all".into(), checkpoint_after_count: Some(20), checkpoint_after_ms: Some(200), ..Default::default() };
    create(&cluster, follower, "survivors", settings).await;
    for batch in 0..50 {
        append(&cluster, &format!("t-{}", batch % 5), (0..10).map(|i| event(batch * 10 + i, "Tick")).collect()).await;
    }
    let mut delivered: BTreeMap<u64, u32> = BTreeMap::new();
    let mut consumer = Consumer::connect(&cluster, follower, "survivors", "first").await.unwrap();
    for _ in 0..250 {
        let d = consumer.delivery().await;
        *delivered.entry(d.event.as_ref().unwrap().position).or_default() += 1;
        consumer.ack(vec![d.delivery_id]).await;
    }
    let checkpoint = wait_for("a checkpoint", Duration::from_secs(10), async || {
        let info = info(&cluster, follower, "survivors").await;
        (info.checkpoint >= 200).then_some(info.checkpoint)
    })
    .await;
    cluster.kill(leader);
    // The connection ends (the proxy's leader is gone); connect again, through any node.
    let survivors: Vec<u64> = cluster.running();
    let mut consumer = wait_for("a new connection", Duration::from_secs(30), async || {
        for node in &survivors {
            if let Ok(c) = Consumer::connect(&cluster, *node, "survivors", "second").await {
                return Some(c);
            }
        }
        None
    })
    .await;
    let mut redelivered_below_checkpoint = Vec::new();
    let mut redeliveries = 0;
    loop {
        let Some(d) = consumer.next(Duration::from_secs(5)).await.expect("connection stays open") else { break };
        let position = d.event.as_ref().unwrap().position;
        let count = delivered.entry(position).or_default();
        *count += 1;
        if *count > 1 {
            redeliveries += 1;
            if position < checkpoint {
                redelivered_below_checkpoint.push(position);
            }
        }
        consumer.ack(vec![d.delivery_id]).await;
    }
    assert!(redelivered_below_checkpoint.is_empty(), "acked below checkpoint {checkpoint} and redelivered: {redelivered_below_checkpoint:?}");
    assert_eq!(delivered.keys().copied().collect::<Vec<_>>(), (0..500).collect::<Vec<_>>(), "every event delivered");
    assert!(redeliveries <= 250 - (checkpoint as usize).min(250) + 20, "redeliveries {redeliveries} beyond the checkpoint window");
}
