//! Integration tests: three real `strata serve` processes on loopback (SPEC §3, issue 3 §8).

mod common;

use std::collections::{BTreeMap, HashMap};
use std::time::{Duration, Instant};

use common::{append_request, append_retrying, event, TestCluster};
use strata_node::error::detail_of;
use strata_proto::v1::cluster_client::ClusterClient;
use strata_proto::v1::{
    Consistency, ExpectedVersionKind, ReadStreamRequest, RecordedEvent, TriggerSnapshotRequest,
};

/// Positions are 0..n without gaps and each stream's versions are 0..k in position order.
fn assert_gapless_and_contiguous(events: &[RecordedEvent]) {
    let mut next_version: HashMap<&str, u64> = HashMap::new();
    for (index, e) in events.iter().enumerate() {
        assert_eq!(e.position, index as u64, "positions are gapless");
        let expected = next_version.entry(e.stream.as_str()).or_insert(0);
        assert_eq!(e.version, *expected, "versions of {} are contiguous", e.stream);
        *expected += 1;
    }
}

fn ids(events: &[RecordedEvent]) -> Vec<(String, u64, u64)> {
    events.iter().map(|e| (e.id.clone(), e.version, e.position)).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn thousand_appends_across_twenty_streams_are_identical_on_every_node() {
    // Goal: every node ends with the same gapless $all. Method: 1,000 concurrent appends
    // spread over 20 streams through all three nodes, then a local read of each node.
    let cluster = TestCluster::start(11, 3).await;
    let mut writers = Vec::new();
    for writer in 0..10u64 {
        let mut client = cluster.streams(writer % 3 + 1).await;
        writers.push(tokio::spawn(async move {
            for i in 0..100u64 {
                let stream = format!("stream-{}", (writer * 100 + i) % 20);
                let request = append_request(&stream, ExpectedVersionKind::Any, 0, vec![event("", "Counted", &format!("{{\"i\":{i}}}"))]);
                client.append(request).await.expect("append");
            }
        }));
    }
    for writer in writers {
        writer.await.expect("writer");
    }
    cluster.wait_converged(Duration::from_secs(20)).await;
    let reference = cluster.read_all_local(1).await;
    assert_eq!(reference.len(), 1000);
    assert_gapless_and_contiguous(&reference);
    for id in 2..=3 {
        assert_eq!(ids(&cluster.read_all_local(id).await), ids(&reference), "node {id} $all differs");
    }
    // Every node's in-memory id index holds the 1,000 ids (nothing is tiered here).
    for id in 1..=3 {
        let metrics = common::metrics_of(&cluster, id).await;
        let gauge = metrics.lines().find(|line| line.starts_with("strata_local_event_ids{")).expect("the local_event_ids gauge");
        assert!(gauge.ends_with(" 1000"), "node {id}: {gauge}");
        let state = metrics.lines().find(|line| line.starts_with("strata_state_bytes{")).expect("the state_bytes gauge");
        let bytes: u64 = state.rsplit(' ').next().and_then(|v| v.parse().ok()).unwrap_or(0);
        assert!(bytes > 0, "node {id}: the state has bytes on disk: {state}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn exactly_one_of_eight_concurrent_exact_appends_succeeds() {
    // Goal: SPEC §3.3 — of N appends with the same exact expected version, one wins.
    // Method: 8 concurrent appends at version 0 through different nodes.
    let cluster = TestCluster::start(12, 3).await;
    let mut client = cluster.streams(1).await;
    client.append(append_request("race", ExpectedVersionKind::NoStream, 0, vec![event("", "Created", "{}")])).await.expect("create");
    let mut racers = Vec::new();
    for racer in 0..8u64 {
        let mut client = cluster.streams(racer % 3 + 1).await;
        racers.push(tokio::spawn(async move {
            client.append(append_request("race", ExpectedVersionKind::Exact, 0, vec![event("", "Raced", "{}")])).await
        }));
    }
    let mut wins = 0;
    for racer in racers {
        match racer.await.expect("racer") {
            Ok(_) => wins += 1,
            Err(status) => {
                assert_eq!(status.code(), tonic::Code::FailedPrecondition, "{status:?}");
                let detail = detail_of(&status).expect("typed detail");
                assert_eq!(detail.kind, "wrong_expected_version");
                assert_eq!(detail.actual_version, Some(1), "the winner moved the head to 1");
            }
        }
    }
    assert_eq!(wins, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn retried_append_returns_the_original_result_also_after_the_leader_restarts() {
    // Goal: SPEC §3.4 — idempotency by event id is durable replicated state. Method: append,
    // retry, kill -9 the leader, retry on the new leader, restart the old one, retry again.
    let mut cluster = TestCluster::start(13, 3).await;
    let ids = [uuid::Uuid::new_v4().to_string(), uuid::Uuid::new_v4().to_string()];
    let request = append_request(
        "idem",
        ExpectedVersionKind::NoStream,
        0,
        vec![event(&ids[0], "A", "{\"n\":1}"), event(&ids[1], "B", "{\"n\":2}")],
    );
    let first = append_retrying(&cluster, request.clone(), Duration::from_secs(10)).await.expect("first append");
    assert!(!first.idempotent_replay);
    let again = append_retrying(&cluster, request.clone(), Duration::from_secs(10)).await.expect("retry");
    assert!(again.idempotent_replay);
    assert_eq!((again.first_position, again.last_version), (first.first_position, first.last_version));

    let leader = cluster.wait_leader(Duration::from_secs(10)).await;
    cluster.kill(leader);
    let after_failover = append_retrying(&cluster, request.clone(), Duration::from_secs(30)).await.expect("retry after failover");
    assert!(after_failover.idempotent_replay);
    assert_eq!(after_failover.first_position, first.first_position);
    cluster.spawn(leader);
    cluster.wait_converged(Duration::from_secs(30)).await;
    let after_restart = append_retrying(&cluster, request.clone(), Duration::from_secs(30)).await.expect("retry after restart");
    assert!(after_restart.idempotent_replay);
    assert_eq!(after_restart.last_position, first.last_position);
    // Same ids with different content are a conflict, and nothing was written twice.
    let mut changed = request.clone();
    changed.events[0].data = b"{\"n\":99}".to_vec().into();
    let conflict = append_retrying(&cluster, changed, Duration::from_secs(10)).await.expect_err("conflict");
    assert_eq!(conflict.code(), tonic::Code::AlreadyExists);
    assert_eq!(cluster.read_all_local(leader).await.len(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn killing_the_leader_during_writes_loses_no_acknowledged_event() {
    // Goal: SPEC §3.1/3.2 under a leader crash. Method: 4 writers append with exact expected
    // versions and client ids (retrying unknown outcomes with the same ids) while the leader
    // is killed with SIGKILL; every acknowledged event must be in $all where it was acked.
    let mut cluster = TestCluster::start(14, 3).await;
    let stop_at = Instant::now() + Duration::from_secs(6);
    let mut writers = Vec::new();
    let shared = std::sync::Arc::new(cluster_addrs(&cluster));
    for writer in 0..4u64 {
        let shared = shared.clone();
        writers.push(tokio::spawn(async move {
            let stream = format!("writer-{writer}");
            let mut acked: Vec<(String, u64, u64)> = Vec::new();
            let mut version: Option<u64> = None;
            while Instant::now() < stop_at {
                let id = uuid::Uuid::new_v4().to_string();
                let (kind, expected) = match version {
                    None => (ExpectedVersionKind::NoStream, 0),
                    Some(v) => (ExpectedVersionKind::Exact, v),
                };
                let request = append_request(&stream, kind, expected, vec![event(&id, "Tick", "{}")]);
                match shared.append(request).await {
                    Ok(response) => {
                        acked.push((id, response.first_version, response.first_position));
                        version = Some(response.last_version);
                    }
                    Err(status) => panic!("definite failure during failover: {status:?}"),
                }
            }
            acked
        }));
    }
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let leader = cluster.wait_leader(Duration::from_secs(5)).await;
    let killed_at = Instant::now();
    cluster.kill(leader);
    let new_leader = cluster.wait_leader(Duration::from_secs(15)).await;
    let recovery = killed_at.elapsed();
    assert_ne!(new_leader, leader);
    assert!(recovery < Duration::from_secs(10), "new leader after {recovery:?}");
    eprintln!("leader {leader} killed; node {new_leader} leads after {recovery:?}");
    let mut acked = Vec::new();
    for writer in writers {
        acked.extend(writer.await.expect("writer"));
    }
    cluster.spawn(leader);
    cluster.wait_converged(Duration::from_secs(30)).await;
    let all = cluster.read_all_local(new_leader).await;
    assert_gapless_and_contiguous(&all);
    let by_id: BTreeMap<&str, &RecordedEvent> = all.iter().map(|e| (e.id.as_str(), e)).collect();
    assert_eq!(by_id.len(), all.len(), "no event is duplicated");
    for (id, version, position) in &acked {
        let stored = by_id.get(id.as_str()).unwrap_or_else(|| panic!("acknowledged event {id} lost"));
        assert_eq!((stored.version, stored.position), (*version, *position), "acknowledged event {id} moved");
    }
    assert!(acked.len() > 20, "writers made progress: {}", acked.len());
    assert_eq!(ids(&cluster.read_all_local(leader).await), ids(&all), "restarted old leader agrees");
}

/// Addresses of a cluster, usable from writer tasks (which cannot borrow the cluster while
/// the test kills and restarts its nodes).
struct ClusterAddrs {
    addrs: Vec<String>,
}

fn cluster_addrs(cluster: &TestCluster) -> ClusterAddrs {
    ClusterAddrs { addrs: (1..=cluster.size).map(|id| cluster.addr(id)).collect() }
}

impl ClusterAddrs {
    /// Appends, retrying unavailable or unknown outcomes with the same request for 30 s.
    async fn append(&self, request: strata_proto::v1::AppendRequest) -> Result<strata_proto::v1::AppendResponse, tonic::Status> {
        let until = Instant::now() + Duration::from_secs(30);
        let mut node = 0usize;
        loop {
            let endpoint = tonic::transport::Endpoint::from_shared(format!("http://{}", self.addrs[node])).expect("endpoint");
            let result = match endpoint.connect_timeout(Duration::from_millis(300)).connect().await {
                Ok(channel) => {
                    let mut call = tonic::Request::new(request.clone());
                    call.set_timeout(Duration::from_secs(5));
                    strata_proto::v1::streams_client::StreamsClient::new(channel).append(call).await.map(|r| r.into_inner())
                }
                Err(e) => Err(tonic::Status::unavailable(e.to_string())),
            };
            match result {
                Ok(response) => return Ok(response),
                Err(status)
                    if matches!(status.code(), tonic::Code::Unavailable | tonic::Code::DeadlineExceeded | tonic::Code::Unknown | tonic::Code::Cancelled)
                        && Instant::now() < until =>
                {
                    node = (node + 1) % self.addrs.len();
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                Err(status) => return Err(status),
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn killed_follower_catches_up_after_restart() {
    // Goal: a follower killed with SIGKILL rejoins with its data dir and catches up.
    let mut cluster = TestCluster::start(15, 3).await;
    let leader = cluster.wait_leader(Duration::from_secs(10)).await;
    let follower = (1..=3).find(|id| *id != leader).expect("a follower");
    cluster.kill(follower);
    let mut client = cluster.streams(leader).await;
    for i in 0..200 {
        client.append(append_request(&format!("s{}", i % 7), ExpectedVersionKind::Any, 0, vec![event("", "E", "{}")])).await.expect("append");
    }
    cluster.spawn(follower);
    cluster.wait_converged(Duration::from_secs(30)).await;
    let reference = cluster.read_all_local(leader).await;
    assert_eq!(reference.len(), 200);
    assert_eq!(ids(&cluster.read_all_local(follower).await), ids(&reference));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn wiped_node_rejoins_through_a_snapshot() {
    // Goal: a node that lost its disk rejoins and is sent a snapshot. Method: write, take a
    // snapshot on the leader (which purges the log below it), wipe a follower, restart it.
    let mut cluster = TestCluster::start(16, 3).await;
    let leader = cluster.wait_leader(Duration::from_secs(10)).await;
    let mut client = cluster.streams(leader).await;
    for i in 0..300 {
        client.append(append_request(&format!("w{}", i % 5), ExpectedVersionKind::Any, 0, vec![event("", "E", "{\"x\":1}")])).await.expect("append");
    }
    cluster.wait_converged(Duration::from_secs(20)).await;
    let snapshot = ClusterClient::new(cluster.channel(leader).await)
        .trigger_snapshot(TriggerSnapshotRequest {})
        .await
        .expect("trigger snapshot")
        .into_inner();
    assert!(snapshot.snapshot_index > 0);
    let victim = (1..=3).find(|id| *id != leader).expect("a follower");
    cluster.kill(victim);
    cluster.wipe(victim);
    for i in 0..20 {
        client.append(append_request("after-wipe", ExpectedVersionKind::Any, 0, vec![event("", "E", &format!("{{\"i\":{i}}}"))])).await.expect("append");
    }
    cluster.spawn(victim);
    cluster.wait_converged(Duration::from_secs(60)).await;
    let reference = cluster.read_all_local(leader).await;
    assert_eq!(reference.len(), 320);
    assert_eq!(ids(&cluster.read_all_local(victim).await), ids(&reference));
    let log = std::fs::read_to_string(cluster.log_path(victim)).expect("victim log");
    assert!(log.contains("raft snapshot installed"), "the wiped node was caught up by a snapshot");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn bad_input_gets_the_documented_error_and_changes_nothing() {
    // Goal: SPEC §3.9 — every bad input is a definite, typed error naming the field or
    // limit, and nothing is written. Method: send each bad append to a follower and leader.
    let cluster = TestCluster::start(17, 3).await;
    let mut client = cluster.streams(2).await;
    let nil = uuid::Uuid::nil().to_string();
    let any = ExpectedVersionKind::Any;
    let oversized = String::from_utf8(vec![b'x'; 1024 * 1024 + 1]).expect("ascii");
    let too_many = (0..10_001).map(|_| event("", "E", "{}")).collect();
    let mut unknown_kind = append_request("ok", any, 0, vec![event("", "E", "{}")]);
    unknown_kind.expected_kind = 99;
    let cases = vec![
        ("empty stream", append_request("", any, 0, vec![event("", "E", "{}")]), "stream", ""),
        ("reserved stream", append_request("$all", any, 0, vec![event("", "E", "{}")]), "stream", ""),
        ("nil uuid", append_request("ok", any, 0, vec![event(&nil, "E", "{}")]), "events[0].id", ""),
        ("oversized event", append_request("ok", any, 0, vec![event("", "E", &oversized)]), "events[0].data", "EVENT_BYTES_MAX"),
        ("too many events", append_request("ok", any, 0, too_many), "events", "EVENTS_PER_APPEND_MAX"),
        ("unknown expected version", unknown_kind, "expected_kind", ""),
    ];
    for (name, request, field, limit) in cases {
        let status = client.append(request).await.expect_err(name);
        assert_eq!(status.code(), tonic::Code::InvalidArgument, "{name}: {status:?}");
        let detail = detail_of(&status).unwrap_or_else(|| panic!("{name}: typed detail"));
        assert_eq!(detail.field, field, "{name}");
        assert_eq!(detail.limit_name, limit, "{name}");
    }
    assert!(cluster.read_all_local(1).await.is_empty(), "nothing was written");
    let status = cluster.status(1).await.expect("status");
    assert_eq!(status.head_position, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn follower_reads_are_linearizable_and_honour_session_tokens() {
    // Goal: SPEC §3.5 — a linearizable read on a follower sees every acknowledged append,
    // and a session read waits for its token. Method: append on the leader, read at once
    // from each follower.
    let cluster = TestCluster::start(18, 3).await;
    let leader = cluster.wait_leader(Duration::from_secs(10)).await;
    let mut writer = cluster.streams(leader).await;
    for i in 0..20u64 {
        let appended = writer
            .append(append_request("fresh", ExpectedVersionKind::Any, 0, vec![event("", "E", &format!("{{\"i\":{i}}}"))]))
            .await
            .expect("append")
            .into_inner();
        for follower in (1..=3).filter(|id| *id != leader) {
            let mut reader = cluster.streams(follower).await;
            for (consistency, token) in [(Consistency::Linearizable, String::new()), (Consistency::Session, appended.commit_token.clone())] {
                let request = ReadStreamRequest {
                    stream: "fresh".into(),
                    from_end: true,
                    direction: strata_proto::v1::Direction::Backward as i32,
                    max_count: 1,
                    consistency: consistency as i32,
                    session_token: token,
                    ..Default::default()
                };
                let mut stream = reader.read_stream(request).await.expect("read").into_inner();
                let page = stream.message().await.expect("page").expect("one event");
                assert_eq!(page.events[0].version, appended.last_version, "{consistency:?} read on node {follower} is stale");
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_follower_forwards_to_the_new_leader_when_the_old_one_dies() {
    // Goal: "calls to a follower are forwarded to the leader" holds across a leader crash.
    // Method: warm up forwarding through a follower, kill -9 the leader, then send one
    // append to that follower with no client-side retry: it must succeed once a new leader
    // is elected, and be stored exactly once.
    let mut cluster = TestCluster::start(19, 3).await;
    let leader = cluster.wait_leader(Duration::from_secs(10)).await;
    let follower = leader % 3 + 1;
    let warm_up = append_request("fwd", ExpectedVersionKind::Any, 0, vec![event(&uuid::Uuid::new_v4().to_string(), "A", "{}")]);
    cluster.streams(follower).await.append(warm_up).await.expect("forwarded append while the leader lives");

    cluster.kill(leader);
    let id = uuid::Uuid::new_v4().to_string();
    let request = append_request("fwd", ExpectedVersionKind::Any, 0, vec![event(&id, "B", "{}")]);
    let mut call = tonic::Request::new(request);
    call.set_timeout(Duration::from_secs(20));
    let response = cluster.streams(follower).await.append(call).await.expect("one call, forwarded to the new leader");
    assert_eq!(response.into_inner().first_version, 1);
    cluster.wait_converged(Duration::from_secs(30)).await;
    let events = cluster.read_all_local(follower).await;
    assert_eq!(events.iter().filter(|e| e.id == id).count(), 1, "stored exactly once");
}
