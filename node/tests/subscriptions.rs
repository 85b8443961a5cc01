//! Catch-up and live subscriptions (issue 6, part 1) on a real three-node cluster: the
//! history → live switch while appends run (no gap, no duplicate), every filter on history
//! and live alike, stream subscriptions from a version, and checkpoints while a filter
//! matches nothing.

mod common;

use std::time::Duration;

use common::{append_request, append_retrying, TestCluster};
use strata_proto::v1::subscribe_response::Kind;
use strata_proto::v1::subscriptions_client::SubscriptionsClient;
use strata_proto::v1::{ExpectedVersionKind, ProposedEvent, RecordedEvent, SubscribeFrom, SubscribeRequest, SubscribeResponse, SubscriptionFilter};

fn event(n: u64, event_type: &str, data: &str, metadata: &str) -> ProposedEvent {
    ProposedEvent {
        id: format!("00000000-0000-4000-8000-{n:012x}"),
        r#type: event_type.into(),
        data: data.as_bytes().to_vec().into(),
        metadata: metadata.as_bytes().to_vec().into(),
        content_type: "application/json".into(),
    }
}

async fn append(cluster: &TestCluster, stream: &str, events: Vec<ProposedEvent>) {
    append_retrying(cluster, append_request(stream, ExpectedVersionKind::Any, 0, events), Duration::from_secs(20)).await.expect("append");
}

/// A subscription read one event or marker at a time (events arrive batched).
struct Sub {
    stream: tonic::Streaming<SubscribeResponse>,
    pending: std::collections::VecDeque<RecordedEvent>,
}

enum M {
    Event(RecordedEvent),
    CaughtUp(strata_proto::v1::CaughtUp),
    Checkpoint(strata_proto::v1::Checkpoint),
    FellBehind(strata_proto::v1::FellBehind),
}

impl Sub {
    /// The next event or marker, within `within`; `None` if nothing came.
    async fn next_within(&mut self, within: Duration) -> Option<M> {
        loop {
            if let Some(event) = self.pending.pop_front() {
                return Some(M::Event(event));
            }
            let message = tokio::time::timeout(within, self.stream.message()).await.ok()?;
            match message.expect("the subscription stays open").expect("not ended").kind.expect("a kind") {
                Kind::Events(batch) => self.pending.extend(batch.events),
                Kind::CaughtUp(m) => return Some(M::CaughtUp(m)),
                Kind::Checkpoint(m) => return Some(M::Checkpoint(m)),
                Kind::FellBehind(m) => return Some(M::FellBehind(m)),
            }
        }
    }
}

async fn subscribe(cluster: &TestCluster, node: u64, request: SubscribeRequest) -> Sub {
    let stream = SubscriptionsClient::new(cluster.channel(node).await).subscribe(request).await.expect("subscribe").into_inner();
    Sub { stream, pending: Default::default() }
}

/// The next event or marker, within 10 s.
async fn next(sub: &mut Sub) -> M {
    sub.next_within(Duration::from_secs(10)).await.expect("a message within 10 s")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn catch_up_switches_to_live_without_a_gap_or_a_duplicate_while_appends_run() {
    let cluster = TestCluster::start(37, 3).await;
    const TOTAL: u64 = 1_500;
    for batch in 0..50 {
        append(&cluster, &format!("s-{}", batch % 4), (0..5).map(|i| event(batch * 5 + i, "E", "{}", "")).collect()).await;
    }
    // Writers keep going while the subscriber (on node 2) catches up and goes live.
    let mut subscription = subscribe(&cluster, 2, SubscribeRequest { stream: "$all".into(), ..Default::default() }).await;
    let appender = async {
        for batch in 50..(TOTAL / 5) {
            append(&cluster, &format!("s-{}", batch % 4), (0..5).map(|i| event(batch * 5 + i, "E", "{}", "")).collect()).await;
        }
    };
    let reader = async {
        let (mut positions, mut caught_up, mut checkpoints) = (Vec::new(), 0, 0);
        while (positions.len() as u64) < TOTAL {
            match next(&mut subscription).await {
                M::Event(e) => positions.push(e.position),
                M::CaughtUp(_) => caught_up += 1,
                M::Checkpoint(c) => {
                    assert!(c.position.is_some_and(|p| p + 1 >= positions.len() as u64), "a checkpoint never runs ahead of the deliveries");
                    checkpoints += 1;
                }
                M::FellBehind(_) => {}
            }
        }
        (positions, caught_up, checkpoints)
    };
    let ((), (positions, caught_up, _)) = tokio::join!(appender, reader);
    assert_eq!(positions, (0..TOTAL).collect::<Vec<_>>(), "every position once, in order");
    assert!(caught_up >= 1, "CaughtUp was sent");
    // Quiet now: the subscription says it is caught up at the head, then checkpoints stay.
    let mut saw_marker_at_head = false;
    for _ in 0..3 {
        match next(&mut subscription).await {
            M::CaughtUp(m) => saw_marker_at_head |= m.position == Some(TOTAL - 1),
            M::Checkpoint(m) => saw_marker_at_head |= m.position == Some(TOTAL - 1),
            M::Event(e) => panic!("no event beyond the {TOTAL} appended: {e:?}"),
            M::FellBehind(_) => {}
        }
        if saw_marker_at_head {
            break;
        }
    }
    assert!(saw_marker_at_head, "a marker at the head position {}", TOTAL - 1);
}

/// Collects the events of a subscription until `count` have come (markers skipped).
async fn events(stream: &mut Sub, count: usize) -> Vec<RecordedEvent> {
    let mut out = Vec::new();
    while out.len() < count {
        if let M::Event(e) = next(stream).await {
            out.push(e);
        }
    }
    out
}

/// Nothing more arrives but markers for `quiet`.
async fn no_more_events(stream: &mut Sub, quiet: Duration) {
    let until = tokio::time::Instant::now() + quiet;
    while let Some(message) = stream.next_within(until.saturating_duration_since(tokio::time::Instant::now())).await {
        if let M::Event(e) = message {
            panic!("an event the filter excludes was delivered: {e:?}");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn every_filter_applies_to_history_and_live_alike() {
    let cluster = TestCluster::start(38, 3).await;
    let mut n = 0u64;
    let mut next_event = |event_type: &str, data: &str, metadata: &str| {
        n += 1;
        event(n, event_type, data, metadata)
    };
    // History: one event that matches everything below, and one that misses each part.
    let matching = r#"{"total":{"amount":5,"currency":"EUR"}}"#;
    append(&cluster, "order-1", vec![next_event("Placed", matching, r#"{"tenant":"t1","by":"x"}"#)]).await;
    append(&cluster, "user-1", vec![next_event("Placed", matching, r#"{"tenant":"t1"}"#)]).await; // stream
    append(&cluster, "order-2", vec![next_event("Shipped", matching, r#"{"tenant":"t1"}"#)]).await; // type
    append(&cluster, "order-3", vec![next_event("Placed", matching, r#"{"tenant":"t2"}"#)]).await; // metadata
    append(&cluster, "order-4", vec![next_event("Placed", r#"{"total":{"currency":"USD"}}"#, r#"{"tenant":"t1"}"#)]).await; // data
    let filter = SubscriptionFilter {
        stream_prefix: "order-".into(),
        event_types: vec!["Placed".into()],
        metadata_pattern: r#"{"tenant":"t1"}"#.into(),
        data_pattern: r#"{"total":{"currency":"EUR"}}"#.into(),
        ..Default::default()
    };
    let request = SubscribeRequest { stream: "$all".into(), filter: Some(filter), ..Default::default() };
    let mut subscription = subscribe(&cluster, 3, request).await;
    let history = events(&mut subscription, 1).await;
    assert_eq!(history[0].stream, "order-1");
    // Live: the same five shapes again.
    append(&cluster, "order-5", vec![next_event("Placed", matching, r#"{"tenant":"t1"}"#)]).await;
    append(&cluster, "user-2", vec![next_event("Placed", matching, r#"{"tenant":"t1"}"#)]).await;
    append(&cluster, "order-6", vec![next_event("Shipped", matching, r#"{"tenant":"t1"}"#)]).await;
    append(&cluster, "order-7", vec![next_event("Placed", matching, r#"{"tenant":"t2"}"#)]).await;
    append(&cluster, "order-8", vec![next_event("Placed", r#"{"total":{"currency":"USD"}}"#, r#"{"tenant":"t1"}"#)]).await;
    append(&cluster, "order-9", vec![next_event("Placed", matching, r#"{"tenant":"t1"}"#)]).await;
    let live = events(&mut subscription, 2).await;
    assert_eq!(live.iter().map(|e| e.stream.as_str()).collect::<Vec<_>>(), vec!["order-5", "order-9"]);
    no_more_events(&mut subscription, Duration::from_millis(1_500)).await;

    // By stream name, on history and live.
    let request = SubscribeRequest {
        stream: "$all".into(),
        filter: Some(SubscriptionFilter { streams: vec!["user-1".into(), "user-2".into()], ..Default::default() }),
        ..Default::default()
    };
    let mut by_name = subscribe(&cluster, 1, request).await;
    let got = events(&mut by_name, 2).await;
    assert_eq!(got.iter().map(|e| e.stream.as_str()).collect::<Vec<_>>(), vec!["user-1", "user-2"]);
    append(&cluster, "user-1", vec![next_event("Renamed", "{}", "")]).await;
    assert_eq!(events(&mut by_name, 1).await[0].r#type, "Renamed");

    // Bad filters are refused with the field named.
    let bad = SubscribeRequest { stream: "$all".into(), filter: Some(SubscriptionFilter { data_pattern: "[".into(), ..Default::default() }), ..Default::default() };
    let mut client = SubscriptionsClient::new(cluster.channel(1).await);
    let status = client.subscribe(bad).await.expect_err("refused");
    assert_eq!(status.code(), tonic::Code::InvalidArgument);
    assert!(status.message().contains("filter.data_pattern"), "{}", status.message());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn stream_subscriptions_start_at_a_version_and_checkpoints_flow_while_nothing_matches() {
    let cluster = TestCluster::start(39, 3).await;
    append(&cluster, "acct", (1..=5).map(|n| event(n, "Deposited", "{}", "")).collect()).await;
    append(&cluster, "other", (6..=8).map(|n| event(n, "Noise", "{}", "")).collect()).await;
    let request = SubscribeRequest { stream: "acct".into(), from: SubscribeFrom::Revision as i32, from_revision: 3, ..Default::default() };
    let mut subscription = subscribe(&cluster, 2, request).await;
    let got = events(&mut subscription, 2).await;
    assert_eq!(got.iter().map(|e| e.version).collect::<Vec<_>>(), vec![3, 4]);
    append(&cluster, "other", vec![event(9, "Noise", "{}", "")]).await;
    append(&cluster, "acct", vec![event(10, "Withdrawn", "{}", "")]).await;
    let got = events(&mut subscription, 1).await;
    assert_eq!((got[0].version, got[0].r#type.as_str()), (5, "Withdrawn"));

    // From the end: only what comes after. The end is node 3's own: a follower learns a
    // commit a moment after the leader has answered the append, so wait until it has
    // applied everything, or the end could still be before version 5.
    cluster.wait_converged(Duration::from_secs(10)).await;
    let request = SubscribeRequest { stream: "acct".into(), from: SubscribeFrom::End as i32, ..Default::default() };
    let mut from_end = subscribe(&cluster, 3, request).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    append(&cluster, "acct", vec![event(11, "Deposited", "{}", "")]).await;
    assert_eq!(events(&mut from_end, 1).await[0].version, 6);

    // A filter that matches nothing still moves the checkpoint as $all grows.
    let request = SubscribeRequest {
        stream: "$all".into(),
        filter: Some(SubscriptionFilter { event_types: vec!["NeverWritten".into()], ..Default::default() }),
        ..Default::default()
    };
    cluster.wait_converged(Duration::from_secs(10)).await; // node 1's head is position 10
    let mut quiet = subscribe(&cluster, 1, request).await;
    // Caught up first (at position 10), so what follows can only reach the head as checkpoints:
    // appends racing the subscription's first look would be covered by its CaughtUp instead.
    loop {
        match next(&mut quiet).await {
            M::CaughtUp(c) => {
                assert_eq!(c.position, Some(10));
                break;
            }
            M::Event(e) => panic!("nothing matches, yet {e:?} came"),
            _ => {}
        }
    }
    for n in 12..=14 {
        append(&cluster, "other", vec![event(n, "Noise", "{}", "")]).await;
    }
    let head = 13; // 14 events: positions 0..=13
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        match next(&mut quiet).await {
            M::Checkpoint(c) if c.position == Some(head) => break,
            M::Event(e) => panic!("nothing matches, yet {e:?} came"),
            _ => {}
        }
        assert!(tokio::time::Instant::now() < deadline, "a checkpoint at the head came");
    }
}

/// Resident memory of a process, in KiB.
fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status.lines().find(|l| l.starts_with("VmRSS:")).and_then(|l| l.split_whitespace().nth(1)).and_then(|v| v.parse().ok()).unwrap_or(0)
}

/// A consumer that stops reading for 30 s while 100,000 events are written, then resumes:
/// it receives every event once, in order (after a FellBehind), the writers never waited
/// on it, and the serving node's memory stays bounded.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_stalled_consumer_gets_everything_after_it_resumes_and_costs_bounded_memory() {
    const TOTAL: u64 = 100_000;
    const PER_APPEND: u64 = 500;
    let cluster = TestCluster::start(40, 3).await;
    let serving = 3;
    let mut subscription = subscribe(&cluster, serving, SubscribeRequest { stream: "$all".into(), ..Default::default() }).await;
    // Taken up to the head (nothing yet), then the consumer stalls.
    assert!(matches!(next(&mut subscription).await, M::CaughtUp(_)));
    let rss_before = rss_kib(cluster.pid(serving).expect("serving node runs"));
    let stall_started = std::time::Instant::now();
    for batch in 0..TOTAL / PER_APPEND {
        let events = (0..PER_APPEND).map(|i| event(1_000_000 + batch * PER_APPEND + i, "Bulk", r#"{"n":1}"#, "")).collect();
        append(&cluster, &format!("bulk-{}", batch % 8), events).await;
    }
    let written_in = stall_started.elapsed();
    let rss_stalled = rss_kib(cluster.pid(serving).expect("serving node runs"));
    tokio::time::sleep(Duration::from_secs(30).saturating_sub(stall_started.elapsed())).await;
    eprintln!("100k events written in {written_in:?} while the consumer stalled; serving node RSS {rss_before} → {rss_stalled} KiB");
    // Resume: every event, in order, once.
    let mut expected = 0u64;
    let mut fell_behind = false;
    while expected < TOTAL {
        match next(&mut subscription).await {
            M::Event(e) => {
                assert_eq!(e.position, expected, "in order, no gap, no duplicate");
                expected += 1;
            }
            M::FellBehind(m) => {
                assert!(m.head_position > m.position, "behind means the head is ahead");
                fell_behind = true;
            }
            _ => {}
        }
    }
    assert!(fell_behind, "the subscription said it fell behind");
    // The stalled subscription held at most its channel and the HTTP/2 windows; the rest
    // of the growth is the applied state's own cache. Generous, but bounded.
    let growth_mib = rss_stalled.saturating_sub(rss_before) / 1024;
    assert!(growth_mib < 512, "serving node grew {growth_mib} MiB while a consumer stalled");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn follow_leader_subscriptions_are_served_by_the_leader() {
    let cluster = TestCluster::start(48, 3).await;
    let leader = cluster.wait_leader(Duration::from_secs(20)).await;
    let follower = cluster.running().into_iter().find(|id| *id != leader).unwrap();
    append(&cluster, "led", (0..3).map(|n| event(n, "E", "{}", "")).collect()).await;
    let request = SubscribeRequest { stream: "led".into(), follow_leader: true, ..Default::default() };
    let mut subscription = subscribe(&cluster, follower, request).await;
    let got = events(&mut subscription, 3).await;
    assert_eq!(got.iter().map(|e| e.version).collect::<Vec<_>>(), vec![0, 1, 2]);
    let gauge = |node| {
        let addr = cluster.http_addr(node);
        async move {
            let body = strata_node::http::check_health(&addr, "/metrics", Duration::from_secs(3)).await.expect("metrics");
            body.lines().find(|l| l.starts_with("strata_subscriptions_active")).and_then(|l| l.rsplit(' ').next()?.parse::<u64>().ok()).unwrap_or(0)
        }
    };
    assert_eq!(gauge(leader).await, 1, "the leader serves the subscription");
    assert_eq!(gauge(follower).await, 0, "the follower only forwards it");
    append(&cluster, "led", vec![event(3, "E", "{}", "")]).await;
    assert_eq!(events(&mut subscription, 1).await[0].version, 3, "live events come through the forwarded stream");
}
