//! Retention and deletion (issue 7 item 6) on a real three-node cluster that tiers its
//! history: max_count and max_age hide events from every read at once (stream reads both
//! ways, `$all`, subscriptions; on every node), soft deletes truncate a stream that later
//! appends continue, hard deletes leave a tombstone that refuses writes and reads; the
//! background scavenge then drops what they hide from every node's disk and from the tier.

mod common;

use std::time::Duration;

use common::{append_request, append_retrying, event, metric_value, metrics_of, TestCluster};
use strata_proto::v1::subscribe_response::Kind;
use strata_proto::v1::subscriptions_client::SubscriptionsClient;
use strata_proto::v1::{
    Consistency, DeleteStreamRequest, Direction, ExpectedVersionKind, ListStreamsRequest, ReadAllRequest, ReadStreamRequest, RecordedEvent,
    SetStreamMetadataRequest, StreamInfoRequest, SubscribeFrom, SubscribeRequest,
};
use tonic::Code;

fn id(n: usize) -> String {
    format!("00000000-0000-4000-8000-{n:012x}")
}

async fn append_n(cluster: &TestCluster, stream: &str, first: usize, count: usize) -> Result<(), tonic::Status> {
    let events = (first..first + count).map(|n| event(&id(n), "Happened", &format!("{{\"n\":{n}}}"))).collect();
    append_retrying(cluster, append_request(stream, ExpectedVersionKind::Any, 0, events), Duration::from_secs(20)).await.map(|_| ())
}

async fn read_stream(cluster: &TestCluster, node: u64, stream: &str, backwards: bool) -> Result<Vec<u64>, tonic::Status> {
    let request = ReadStreamRequest {
        stream: stream.into(),
        from_end: backwards,
        direction: if backwards { Direction::Backward } else { Direction::Forward } as i32,
        consistency: Consistency::Local as i32,
        ..Default::default()
    };
    let mut pages = cluster.streams(node).await.read_stream(request).await?.into_inner();
    let mut versions = Vec::new();
    while let Some(page) = pages.message().await? {
        versions.extend(page.events.iter().map(|e| e.version));
    }
    Ok(versions)
}

async fn all_of(cluster: &TestCluster, node: u64, stream: &str) -> Vec<RecordedEvent> {
    let request = ReadAllRequest { consistency: Consistency::Local as i32, ..Default::default() };
    let mut pages = cluster.streams(node).await.read_all(request).await.unwrap().into_inner();
    let mut events = Vec::new();
    while let Some(page) = pages.message().await.unwrap() {
        events.extend(page.events.into_iter().filter(|e| e.stream == stream));
    }
    events
}

async fn subscribed_versions(cluster: &TestCluster, node: u64, stream: &str) -> Vec<u64> {
    let request = SubscribeRequest { stream: "$all".into(), from: SubscribeFrom::Start as i32, ..Default::default() };
    let mut messages = SubscriptionsClient::new(cluster.channel(node).await).subscribe(request).await.unwrap().into_inner();
    let mut versions = Vec::new();
    loop {
        let message = tokio::time::timeout(Duration::from_secs(20), messages.message()).await.expect("stalled").unwrap().unwrap();
        match message.kind.unwrap() {
            Kind::Events(batch) => versions.extend(batch.events.iter().filter(|e| e.stream == stream).map(|e| e.version)),
            Kind::CaughtUp(_) => return versions,
            _ => {}
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn retention_and_deletes_hide_events_from_every_read_on_every_node() {
    let dir = tempfile::tempdir().unwrap();
    let store = format!("file://{}", dir.path().join("tier").display());
    let cluster = TestCluster::start_with(53, 3, &["--object-store", &store, "--hot-window-events", "20"]).await;
    for batch in 0..10 {
        append_n(&cluster, "account", batch * 5, 5).await.unwrap();
    }
    append_n(&cluster, "other", 1000, 10).await.unwrap();
    let leader = cluster.wait_leader(Duration::from_secs(20)).await;
    let mut streams = cluster.streams(leader).await;

    // max_count: only the newest 10 of 50 are read, wherever they are stored.
    let set = SetStreamMetadataRequest { stream: "account".into(), max_age_ms: None, max_count: Some(10) };
    streams.set_stream_metadata(set).await.unwrap();
    cluster.wait_converged(Duration::from_secs(20)).await;
    for node in cluster.running() {
        assert_eq!(read_stream(&cluster, node, "account", false).await.unwrap(), (40..50).collect::<Vec<_>>(), "node {node}");
        assert_eq!(read_stream(&cluster, node, "account", true).await.unwrap(), (40..50).rev().collect::<Vec<_>>(), "node {node}");
        let versions: Vec<u64> = all_of(&cluster, node, "account").await.iter().map(|e| e.version).collect();
        assert_eq!(versions, (40..50).collect::<Vec<_>>(), "node {node}: $all");
        assert_eq!(all_of(&cluster, node, "other").await.len(), 10, "node {node}: other streams untouched");
        assert_eq!(subscribed_versions(&cluster, node, "account").await, (40..50).collect::<Vec<_>>(), "node {node}: subscription");
    }
    let info = streams.stream_info(StreamInfoRequest { stream: "account".into(), ..Default::default() }).await.unwrap().into_inner();
    assert_eq!((info.max_count, info.first_visible_version, info.event_count), (Some(10), 40, 50));
    let zero = SetStreamMetadataRequest { stream: "account".into(), max_age_ms: None, max_count: Some(0) };
    assert_eq!(streams.set_stream_metadata(zero).await.unwrap_err().code(), Code::InvalidArgument);

    // An id of an event beyond the count is free again: re-sending it writes it anew.
    let resent = vec![event(&id(0), "Happened", "{\"n\":0}")];
    let reply = append_retrying(&cluster, append_request("account", ExpectedVersionKind::Any, 0, resent), Duration::from_secs(20)).await.unwrap();
    assert!(!reply.idempotent_replay);
    assert_eq!(reply.first_version, 50);

    // Soft delete: no stream to readers, then an append continues its versions.
    let wrong = DeleteStreamRequest { stream: "account".into(), expected_kind: ExpectedVersionKind::Exact as i32, expected_version: 3, hard: false };
    assert_eq!(streams.delete_stream(wrong).await.unwrap_err().code(), Code::FailedPrecondition);
    let soft = DeleteStreamRequest { stream: "account".into(), expected_kind: ExpectedVersionKind::Exact as i32, expected_version: 50, hard: false };
    assert_eq!(streams.delete_stream(soft).await.unwrap().into_inner().truncate_before, 51);
    cluster.wait_converged(Duration::from_secs(20)).await;
    for node in cluster.running() {
        assert_eq!(read_stream(&cluster, node, "account", false).await.unwrap_err().code(), Code::NotFound, "node {node}");
        assert!(all_of(&cluster, node, "account").await.is_empty(), "node {node}");
    }
    let again = vec![event(&id(500), "Reopened", "{}")];
    let reply = append_retrying(&cluster, append_request("account", ExpectedVersionKind::NoStream, 0, again), Duration::from_secs(20)).await.unwrap();
    assert_eq!(reply.first_version, 51);
    assert_eq!(read_stream(&cluster, leader, "account", false).await.unwrap(), vec![51]);

    // Hard delete: a tombstone refuses appends, reads and metadata.
    let hard = DeleteStreamRequest { stream: "account".into(), hard: true, ..Default::default() };
    assert!(streams.delete_stream(hard).await.unwrap().into_inner().hard);
    let refused = append_n(&cluster, "account", 600, 1).await.unwrap_err();
    assert_eq!(refused.code(), Code::FailedPrecondition);
    assert_eq!(strata_proto::detail_of(&refused).unwrap().kind, "stream_deleted");
    assert_eq!(read_stream(&cluster, leader, "account", false).await.unwrap_err().code(), Code::FailedPrecondition);
    let info = streams.stream_info(StreamInfoRequest { stream: "account".into(), ..Default::default() }).await.unwrap_err();
    assert_eq!(info.code(), Code::FailedPrecondition);
    let listed = streams.list_streams(ListStreamsRequest::default()).await.unwrap().into_inner();
    let names: Vec<String> = listed.streams.into_iter().map(|s| s.stream).collect();
    assert_eq!(names, vec!["other".to_string()], "deleted streams are not listed");

    // max_age: events older than it are no longer read.
    let aged = SetStreamMetadataRequest { stream: "aged".into(), max_age_ms: Some(1_500), max_count: None };
    streams.set_stream_metadata(aged).await.unwrap();
    append_n(&cluster, "aged", 2000, 3).await.unwrap();
    assert_eq!(read_stream(&cluster, leader, "aged", false).await.unwrap(), vec![0, 1, 2]);
    tokio::time::sleep(Duration::from_millis(2_000)).await;
    append_n(&cluster, "aged", 2003, 1).await.unwrap();
    cluster.wait_converged(Duration::from_secs(20)).await;
    for node in cluster.running() {
        assert_eq!(read_stream(&cluster, node, "aged", false).await.unwrap(), vec![3], "node {node}");
        assert_eq!(read_stream(&cluster, node, "aged", true).await.unwrap(), vec![3], "node {node}");
    }
}

/// The events of `stream` a node holds on its own disk (run after it stopped).
fn local_copy(data_dir: &std::path::Path, stream: &str) -> Vec<strata_storage::StoredEvent> {
    let db = strata_storage::open_database(data_dir).unwrap();
    let state = strata_storage::EventState::open(&db, data_dir).unwrap();
    state.read_stream(stream, 0, false, 10_000).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_scavenge_drops_hidden_payloads_from_every_node_and_the_tier() {
    let dir = tempfile::tempdir().unwrap();
    let tier_url = format!("file://{}", dir.path().join("tier").display());
    let mut cluster =
        TestCluster::start_with(54, 3, &["--object-store", &tier_url, "--hot-window-events", "80", "--scavenge-interval", "1s"]).await;
    // 60 events of `account`, with a payload worth dropping, and 40 of `other` after them:
    // about the first 20 are tiered, the rest stay hot.
    let payload = |n: usize| format!("{{\"n\":{n},\"pad\":\"{}\"}}", "x".repeat(2_000));
    for batch in 0..12 {
        let events = (batch * 5..batch * 5 + 5).map(|n| event(&id(n), "Happened", &payload(n))).collect();
        append_retrying(&cluster, append_request("account", ExpectedVersionKind::Any, 0, events), Duration::from_secs(20)).await.unwrap();
    }
    append_n(&cluster, "other", 1000, 40).await.unwrap();
    let leader = cluster.wait_leader(Duration::from_secs(20)).await;
    let mut streams = cluster.streams(leader).await;
    let set = SetStreamMetadataRequest { stream: "account".into(), max_age_ms: None, max_count: Some(10) };
    streams.set_stream_metadata(set).await.unwrap();

    // The scavenge point is replicated, every node's copy and the tier are rewritten.
    let store = strata_storage::tier::TierStore::open(&strata_storage::tier::TierStoreConfig { url: tier_url.clone(), ..Default::default() }).unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    loop {
        let mut done = true;
        for node in cluster.running() {
            done &= metric_value(&metrics_of(&cluster, node).await, "strata_scavenged_events_total", "store=\"local\"") > 0;
        }
        // A fresh reader each time: a reader's cache keeps the chunks it has read.
        let tiered = strata_storage::tier::TierReader::new(store.clone()).read_stream("account", 0, false, 1_000, u64::MAX).await.unwrap();
        done &= !tiered.is_empty() && tiered.iter().all(|e| e.is_scavenged() == (e.version < 50));
        if done {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "the scavenge never reached every node and the tier: tiered {:?}",
            tiered.iter().map(|e| (e.version, e.is_scavenged())).collect::<Vec<_>>());
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    assert!(metric_value(&metrics_of(&cluster, leader).await, "strata_scavenges_total", "") >= 1);

    // What was scavenged stays hidden when the retention is relaxed; the rest reads whole.
    let relax = SetStreamMetadataRequest { stream: "account".into(), max_age_ms: None, max_count: None };
    streams.set_stream_metadata(relax).await.unwrap();
    cluster.wait_converged(Duration::from_secs(20)).await;
    for node in cluster.running() {
        assert_eq!(read_stream(&cluster, node, "account", false).await.unwrap(), (50..60).collect::<Vec<_>>(), "node {node}");
        let kept = all_of(&cluster, node, "account").await;
        assert_eq!(kept.iter().map(|e| e.version).collect::<Vec<_>>(), (50..60).collect::<Vec<_>>(), "node {node}: $all");
        assert!(kept.iter().all(|e| e.data.len() > 2_000), "node {node}: visible events keep their payloads");
        assert_eq!(all_of(&cluster, node, "other").await.len(), 40, "node {node}: other streams untouched");
    }
    // Re-sending a scavenged event's id writes it anew.
    let resent = vec![event(&id(0), "Happened", &payload(0))];
    let reply = append_retrying(&cluster, append_request("account", ExpectedVersionKind::Any, 0, resent), Duration::from_secs(20)).await.unwrap();
    assert!(!reply.idempotent_replay);
    assert_eq!(reply.first_version, 60);

    // On every node's disk: the same, for what it still holds itself.
    cluster.wait_converged(Duration::from_secs(20)).await;
    let nodes = cluster.running();
    for node in &nodes {
        cluster.terminate(*node);
    }
    for node in nodes {
        let local = local_copy(&cluster.data_dir(node), "account");
        assert!(local.iter().any(|e| e.version < 50) && local.iter().any(|e| e.version >= 50), "node {node} holds the hot part");
        for event in &local {
            assert_eq!(event.is_scavenged(), event.version < 50, "node {node}: version {} scavenged iff hidden", event.version);
            if event.is_scavenged() {
                assert_eq!((event.data.len(), event.metadata.len()), (32, 0), "node {node}: only the digest is left");
            }
        }
    }
}
