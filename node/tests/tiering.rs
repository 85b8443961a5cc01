//! The object-store tier (issue 7) on a real three-node cluster: settled history moves to
//! the tier (a file store shared by the nodes, and a real S3-protocol server), every node
//! drops its local copy, and every way of reading — `$all` and stream reads both ways,
//! catch-up subscriptions, idempotent retries — gives the same answer as before; a node
//! restarted, and one wiped and rebuilt from a Raft snapshot (only the hot part), too.

mod common;

use std::time::{Duration, Instant};

use common::{append_request, append_retrying, event, metric_value, metrics_of, TestCluster};
use strata_chaos::store_link::{StoreLink, TestS3};
use strata_proto::v1::cluster_client::ClusterClient;
use strata_proto::v1::subscribe_response::Kind;
use strata_proto::v1::subscriptions_client::SubscriptionsClient;
use strata_proto::v1::{
    Consistency, Direction, ExpectedVersionKind, ReadAllRequest, ReadStreamRequest, RecordedEvent, StatusRequest,
    StreamInfoRequest, SubscribeFrom, SubscribeRequest, TierRequest, TierStatus, TriggerSnapshotRequest,
};
use tonic::Code;

const STREAMS: usize = 8;
const APPENDS: usize = 120;
const HOT_WINDOW_EVENTS: u64 = 40;

fn id(n: usize) -> String {
    format!("00000000-0000-4000-8000-{n:012x}")
}

/// Appends `APPENDS` appends of 1..=5 events over `STREAMS` streams, each at its exact
/// expected version; returns the number of events.
async fn fill(cluster: &TestCluster) -> usize {
    let mut versions = [None::<u64>; STREAMS];
    let mut n = 0;
    for a in 0..APPENDS {
        let stream = a % STREAMS;
        let count = a % 5 + 1;
        let events = (0..count).map(|k| event(&id(n + k), &format!("T{}", (n + k) % 3), &format!("{{\"n\":{}}}", n + k))).collect();
        let request = match versions[stream] {
            None => append_request(&format!("account-{stream}"), ExpectedVersionKind::NoStream, 0, events),
            Some(v) => append_request(&format!("account-{stream}"), ExpectedVersionKind::Exact, v, events),
        };
        let reply = append_retrying(cluster, request, Duration::from_secs(20)).await.expect("append");
        versions[stream] = Some(reply.last_version);
        n += count;
    }
    n
}

async fn tier_of(cluster: &TestCluster, node: u64) -> Option<TierStatus> {
    let mut client = ClusterClient::new(cluster.channel(node).await);
    client.status(StatusRequest { local_only: true }).await.ok()?.into_inner().tier
}

/// Waits until every running node holds nothing below `floor` locally.
async fn wait_released(cluster: &TestCluster, floor: u64, timeout: Duration) {
    let deadline = Instant::now() + timeout;
    loop {
        let mut floors = Vec::new();
        for node in cluster.running() {
            floors.push(tier_of(cluster, node).await.map_or(0, |t| t.local_floor));
        }
        if floors.iter().all(|f| *f >= floor) {
            return;
        }
        assert!(Instant::now() < deadline, "local history not released below {floor}: floors {floors:?}; logs in {}", cluster.dir.path().display());
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

async fn read_all(cluster: &TestCluster, node: u64, backwards: bool) -> Vec<RecordedEvent> {
    let request = ReadAllRequest {
        consistency: Consistency::Local as i32,
        direction: if backwards { Direction::Backward } else { Direction::Forward } as i32,
        from_end: backwards,
        ..Default::default()
    };
    let mut stream = cluster.streams(node).await.read_all(request).await.expect("read $all").into_inner();
    let mut events = Vec::new();
    while let Some(page) = stream.message().await.expect("a page") {
        events.extend(page.events);
    }
    events
}

async fn read_stream(cluster: &TestCluster, node: u64, stream: &str, from: u64, backwards: bool, max: u64) -> Vec<RecordedEvent> {
    let request = ReadStreamRequest {
        stream: stream.into(),
        from_version: from,
        direction: if backwards { Direction::Backward } else { Direction::Forward } as i32,
        max_count: max,
        consistency: Consistency::Local as i32,
        ..Default::default()
    };
    let mut pages = cluster.streams(node).await.read_stream(request).await.expect("read stream").into_inner();
    let mut events = Vec::new();
    while let Some(page) = pages.message().await.expect("a page") {
        events.extend(page.events);
    }
    events
}

/// A catch-up subscription to `$all` from the start, until it has caught up.
async fn subscribe_all(cluster: &TestCluster, node: u64) -> Vec<RecordedEvent> {
    let request = SubscribeRequest { stream: "$all".into(), from: SubscribeFrom::Start as i32, ..Default::default() };
    let mut messages = SubscriptionsClient::new(cluster.channel(node).await).subscribe(request).await.expect("subscribe").into_inner();
    let mut events = Vec::new();
    loop {
        let message = tokio::time::timeout(Duration::from_secs(20), messages.message()).await.expect("subscription stalled");
        match message.expect("open").expect("not ended").kind.expect("a kind") {
            Kind::Events(batch) => events.extend(batch.events),
            Kind::CaughtUp(_) => return events,
            _ => {}
        }
    }
}

/// Every read agrees with `all` (the full history as the leader served it before any
/// tiering), on `node`.
async fn assert_reads_whole(cluster: &TestCluster, node: u64, all: &[RecordedEvent]) {
    let forward = read_all(cluster, node, false).await;
    assert_eq!(forward.len(), all.len(), "node {node}: $all forward");
    assert_eq!(forward, all, "node {node}: $all forward");
    let mut backward = read_all(cluster, node, true).await;
    backward.reverse();
    assert_eq!(backward, all, "node {node}: $all backward");
    for stream in 0..STREAMS {
        let name = format!("account-{stream}");
        let expected: Vec<RecordedEvent> = all.iter().filter(|e| e.stream == name).cloned().collect();
        assert_eq!(read_stream(cluster, node, &name, 0, false, 0).await, expected, "node {node}: {name} forward");
        let mut back = read_stream(cluster, node, &name, expected.len() as u64 - 1, true, 0).await;
        back.reverse();
        assert_eq!(back, expected, "node {node}: {name} backward");
        assert_eq!(read_stream(cluster, node, &name, 2, false, 3).await, expected[2..5].to_vec(), "node {node}: {name} page");
    }
    assert_eq!(subscribe_all(cluster, node).await, all, "node {node}: catch-up subscription");
}

/// Re-sending the first append (same ids, same expected version) is an idempotent replay
/// even though its events left every node's disk; an id reused elsewhere is a conflict.
async fn assert_idempotency_across_the_tier(cluster: &TestCluster) {
    let first = (0..1).map(|k| event(&id(k), &format!("T{}", k % 3), &format!("{{\"n\":{k}}}"))).collect();
    let replay = append_retrying(cluster, append_request("account-0", ExpectedVersionKind::NoStream, 0, first), Duration::from_secs(20))
        .await
        .expect("a replay of a tiered append");
    assert!(replay.idempotent_replay, "{replay:?}");
    assert_eq!((replay.first_position, replay.last_version), (0, 0));
    let moved = vec![event(&id(0), "T0", "{\"n\":0}")];
    let conflict = append_retrying(cluster, append_request("elsewhere", ExpectedVersionKind::Any, 0, moved), Duration::from_secs(20))
        .await
        .unwrap_err();
    assert_eq!(conflict.code(), Code::AlreadyExists, "{conflict:?}");
}

async fn tiering_scenario(cluster: &mut TestCluster) {
    let total = fill(cluster).await as u64;
    let leader = cluster.wait_leader(Duration::from_secs(20)).await;
    cluster.wait_converged(Duration::from_secs(30)).await;
    // The whole history as served before anything could be tiered would be ideal, but the
    // uploader starts at once: what matters is that every read gives the same answer on
    // every node and that it is the complete, gapless history.
    let all = read_all(cluster, leader, false).await;
    assert_eq!(all.len() as u64, total);
    assert!(all.iter().enumerate().all(|(i, e)| e.position == i as u64), "gapless positions");

    // The hot window keeps the newest events; the rest is settled, tiered and released.
    wait_released(cluster, total - HOT_WINDOW_EVENTS - 10, Duration::from_secs(60)).await;
    let tier = tier_of(cluster, leader).await.unwrap();
    assert!(tier.enabled && tier.watermark >= total - HOT_WINDOW_EVENTS - 5 && tier.segments > 0, "{tier:?}");
    let info = cluster.streams(leader).await.stream_info(StreamInfoRequest { stream: "account-0".into(), ..Default::default() }).await.unwrap();
    assert!(info.into_inner().tiered);
    for node in cluster.running() {
        assert_reads_whole(cluster, node, &all).await;
    }
    assert_idempotency_across_the_tier(cluster).await;

    // Forcing the rest: the watermark reaches the head.
    let mut admin = ClusterClient::new(cluster.channel(leader).await);
    let forced = admin.tier(TierRequest { up_to_position: u64::MAX, timeout_ms: 30_000 }).await.unwrap().into_inner().tier.unwrap();
    assert_eq!(forced.watermark, total);
    let metrics = metrics_of(cluster, leader).await;
    assert!(metric_value(&metrics, "strata_tier_uploaded_segments_total", "") > 0, "segments counted");
    assert!(metric_value(&metrics, "strata_tier_uploaded_bytes_total", "") > 0, "bytes counted");

    // A node killed and restarted still reads everything and still knows the tiered ids
    // (its id filter was not stored: it re-reads the released ids from the tier).
    let follower = cluster.running().into_iter().find(|n| *n != leader).unwrap();
    cluster.kill(follower);
    cluster.spawn(follower);
    cluster.wait_converged(Duration::from_secs(30)).await;
    assert_reads_whole(cluster, follower, &all).await;

    // A wiped node rebuilds from a Raft snapshot that holds only the hot part.
    let leader = cluster.wait_leader(Duration::from_secs(20)).await;
    ClusterClient::new(cluster.channel(leader).await).trigger_snapshot(TriggerSnapshotRequest {}).await.unwrap();
    let wiped = cluster.running().into_iter().find(|n| *n != leader).unwrap();
    cluster.kill(wiped);
    cluster.wipe(wiped);
    cluster.spawn(wiped);
    cluster.wait_converged(Duration::from_secs(60)).await;
    let rebuilt = tier_of(cluster, wiped).await.unwrap();
    assert!(rebuilt.local_floor >= total - HOT_WINDOW_EVENTS - 10, "the wiped node fetched only the hot part: {rebuilt:?}");
    assert_reads_whole(cluster, wiped, &all).await;
    assert_idempotency_across_the_tier(cluster).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn settled_history_moves_to_a_file_store_and_reads_stay_whole() {
    let dir = tempfile::tempdir().unwrap();
    let store = format!("file://{}", dir.path().join("tier").display());
    let window = HOT_WINDOW_EVENTS.to_string();
    let mut cluster = TestCluster::start_with(49, 3, &["--object-store", &store, "--hot-window-events", &window]).await;
    tiering_scenario(&mut cluster).await;
    let leader = cluster.wait_leader(Duration::from_secs(20)).await;
    let all = read_all(&cluster, leader, false).await;
    for node in cluster.running() {
        cluster.terminate(node);
    }
    corrupt_objects_are_detected_never_served(&dir.path().join("tier"), &store, &all).await;
}

/// Every object of the tier with one byte flipped: a reader with nothing cached fails
/// (every SlateDB block and every record carries a checksum) or, where it did not touch
/// the damage, answers exactly; never a different event. Restored, it reads whole again.
async fn corrupt_objects_are_detected_never_served(root: &std::path::Path, url: &str, all: &[RecordedEvent]) {
    fn objects(dir: &std::path::Path, out: &mut Vec<std::path::PathBuf>) {
        for entry in std::fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                objects(&path, out);
            } else if path.extension().is_some_and(|e| e == "sst") && path.metadata().unwrap().len() > 0 {
                out.push(path);
            }
        }
    }
    let mut ssts = Vec::new();
    objects(root, &mut ssts);
    assert!(!ssts.is_empty(), "the tier holds SSTs under {}", root.display());
    let store = || strata_storage::tier::TierStore::open(&strata_storage::tier::TierStoreConfig { url: url.to_string(), ..Default::default() }).unwrap();
    let tiered = strata_storage::tier::TierReader::new(store()).uploaded_through().await.unwrap();
    assert!(tiered > 0 && tiered <= all.len() as u64);
    let originals: Vec<Vec<u8>> = ssts.iter().map(|p| std::fs::read(p).unwrap()).collect();
    for (path, bytes) in ssts.iter().zip(&originals) {
        let mut damaged = bytes.clone();
        let at = damaged.len() / 3;
        damaged[at] ^= 0x5a;
        std::fs::write(path, damaged).unwrap();
    }
    let same = |events: &[strata_storage::StoredEvent]| {
        events.iter().all(|e| {
            let expected = &all[e.position as usize];
            e.stream == expected.stream && e.version == expected.version && e.data == expected.data && uuid::Uuid::from_bytes(e.id).to_string() == expected.id
        })
    };
    match strata_storage::tier::TierReader::new(store()).read_all(0, false, tiered as usize, tiered).await {
        Err(e) => eprintln!("corrupt tier read failed as it must: {e}"),
        Ok(events) => assert!(same(&events) && events.len() as u64 == tiered, "a corrupt tier must never serve other events"),
    }
    for (path, bytes) in ssts.iter().zip(&originals) {
        std::fs::write(path, bytes).unwrap();
    }
    let restored = strata_storage::tier::TierReader::new(store()).read_all(0, false, tiered as usize, tiered).await.unwrap();
    assert_eq!(restored.len() as u64, tiered);
    assert!(same(&restored), "restored objects read whole");
}

/// The S3 server scripts/test starts; these tests fail without it.
fn s3_server() -> TestS3 {
    TestS3::from_env().expect(
        "STRATA_TEST_S3_ENDPOINT is not set: run the tests through scripts/test, which starts a local S3 server (scripts/s3-server)",
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn settled_history_moves_to_a_real_s3_server_and_reads_stay_whole() {
    let s3 = s3_server();
    let dir = tempfile::tempdir().unwrap();
    let mut args = s3.serve_args("tiering", &s3.endpoint, dir.path());
    args.extend(["--hot-window-events".to_string(), HOT_WINDOW_EVENTS.to_string()]);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let mut cluster = TestCluster::start_with(50, 3, &args).await;
    tiering_scenario(&mut cluster).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_unreachable_store_backs_appends_off_and_loses_nothing() {
    let s3 = s3_server();
    let link = StoreLink::start(&s3.endpoint).await;
    let dir = tempfile::tempdir().unwrap();
    let mut args = s3.serve_args("outage", &link.endpoint(), dir.path());
    args.extend(["--hot-window-events", "20", "--tier-backlog-events", "60"].map(String::from));
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let cluster = TestCluster::start_with(51, 3, &args).await;
    let leader = cluster.wait_leader(Duration::from_secs(20)).await;
    let mut acked = Vec::new();
    let mut n = 0usize;
    let append_one = async |n: usize| {
        let request = append_request("outage", ExpectedVersionKind::Any, 0, vec![event(&id(n), "T", "{}")]);
        append_retrying(&cluster, request, Duration::from_secs(20)).await
    };
    while n < 60 {
        append_one(n).await.expect("append while the store is up");
        acked.push(n);
        n += 1;
    }
    wait_released(&cluster, 30, Duration::from_secs(60)).await;

    // The store goes away: appends go on into the hot tier up to the backlog bound, then
    // are refused with a clear, typed error; nothing acknowledged is lost.
    link.cut();
    let mut refused = None;
    for _ in 0..400 {
        match append_one(n).await {
            Ok(_) => acked.push(n),
            Err(status) => {
                refused = Some(status);
                break;
            }
        }
        n += 1;
    }
    let refused = refused.expect("appends beyond the tiering backlog are refused");
    assert_eq!(refused.code(), Code::ResourceExhausted, "{refused:?}");
    let detail = strata_proto::detail_of(&refused).unwrap();
    assert_eq!(detail.limit_name, "TIER_BACKLOG_EVENTS_MAX");
    assert!(acked.len() > 60, "the hot tier took appends while the store was down");
    // The failed upload shows in the status once the store's retries give up.
    let deadline = Instant::now() + Duration::from_secs(90);
    loop {
        let tier = tier_of(&cluster, leader).await.unwrap();
        if !tier.last_error.is_empty() {
            break;
        }
        assert!(Instant::now() < deadline, "the upload failure never showed in the status: {tier:?}");
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    // Hot history still reads. Tiered history is served from what the node's tier reader
    // holds in memory, or fails clearly (UNAVAILABLE); it is never wrong.
    let hot = read_stream(&cluster, leader, "outage", acked.len() as u64 - 5, false, 0).await;
    assert_eq!(hot.len(), 5);
    let mut request = tonic::Request::new(ReadAllRequest { consistency: Consistency::Local as i32, max_count: 5, ..Default::default() });
    request.set_timeout(Duration::from_secs(60));
    match cluster.streams(leader).await.read_all(request).await {
        Err(status) => assert_eq!(status.code(), Code::Unavailable, "{status:?}"),
        Ok(reply) => {
            let mut pages = reply.into_inner();
            let mut served = Vec::new();
            loop {
                match pages.message().await {
                    Err(status) => {
                        assert_eq!(status.code(), Code::Unavailable, "{status:?}");
                        break;
                    }
                    Ok(Some(page)) => served.extend(page.events),
                    Ok(None) => break,
                }
            }
            let expected: Vec<String> = acked.iter().take(served.len()).map(|n| id(*n)).collect();
            assert_eq!(served.iter().map(|e| e.id.clone()).collect::<Vec<_>>(), expected, "a cold read served wrong events");
        }
    }

    // The store comes back: the backlog drains, appends are taken again, and every
    // acknowledged event is there exactly once, in order, on every node.
    link.heal();
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        match append_one(n).await {
            Ok(_) => {
                acked.push(n);
                break;
            }
            Err(status) if status.code() == Code::ResourceExhausted && Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
            Err(status) => panic!("appends did not resume after the store came back: {status:?}"),
        }
    }
    cluster.wait_converged(Duration::from_secs(30)).await;
    wait_released(&cluster, acked.len() as u64 - 40, Duration::from_secs(120)).await;
    for node in cluster.running() {
        let all = read_all(&cluster, node, false).await;
        let ids: Vec<String> = all.iter().map(|e| e.id.clone()).collect();
        let expected: Vec<String> = acked.iter().map(|n| id(*n)).collect();
        assert_eq!(ids, expected, "node {node}: every acknowledged event, once, in order");
    }
}
