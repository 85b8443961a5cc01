//! Aggregate snapshots (issue 6) on a real three-node cluster: save at and beyond the
//! committed version, load latest and latest ≤ a version from any node, list, delete, the
//! per-stream bound, and that snapshots survive a leader kill and a node rebuilt from a
//! Raft snapshot.

mod common;

use std::time::Duration;

use common::{append_request, append_retrying, event, TestCluster};
use strata_proto::v1::snapshots_client::SnapshotsClient;
use strata_proto::v1::{
    DeleteSnapshotRequest, ExpectedVersionKind, ListSnapshotsRequest, LoadSnapshotRequest, SaveSnapshotRequest,
};
use tonic::Code;

async fn snapshots(cluster: &TestCluster, node: u64) -> SnapshotsClient<tonic::transport::Channel> {
    SnapshotsClient::new(cluster.channel(node).await)
}

fn save(stream: &str, version: u64, state: &str) -> SaveSnapshotRequest {
    SaveSnapshotRequest { stream: stream.into(), version, state: state.as_bytes().to_vec(), content_type: "application/json".into() }
}

async fn load(cluster: &TestCluster, node: u64, stream: &str, max_version: Option<u64>) -> Result<(u64, String), tonic::Status> {
    let loaded = snapshots(cluster, node).await.load(LoadSnapshotRequest { stream: stream.into(), max_version }).await?.into_inner();
    let snapshot = loaded.snapshot.expect("a snapshot");
    Ok((snapshot.version, String::from_utf8(snapshot.state).unwrap()))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn snapshots_are_saved_at_committed_versions_loaded_listed_and_deleted_from_any_node() {
    let cluster = TestCluster::start(41, 3).await;
    let events = (0..10).map(|i| event(&format!("00000000-0000-4000-8000-{i:012x}"), "Deposited", &format!("{{\"amount\":{i}}}"))).collect();
    append_retrying(&cluster, append_request("account-1", ExpectedVersionKind::NoStream, 0, events), Duration::from_secs(20)).await.unwrap();
    let leader = cluster.wait_leader(Duration::from_secs(20)).await;
    let follower = cluster.running().into_iter().find(|id| *id != leader).unwrap();

    // At the head and below it: saved (through a follower, forwarded to the leader).
    snapshots(&cluster, follower).await.save(save("account-1", 9, "{\"balance\":45}")).await.unwrap();
    snapshots(&cluster, leader).await.save(save("account-1", 3, "{\"balance\":6}")).await.unwrap();
    // Beyond the committed head, or on a stream that does not exist: refused, nothing stored.
    let ahead = snapshots(&cluster, follower).await.save(save("account-1", 10, "{}")).await.unwrap_err();
    assert_eq!(ahead.code(), Code::FailedPrecondition, "{ahead:?}");
    let detail = strata_proto::detail_of(&ahead).unwrap();
    assert_eq!((detail.kind.as_str(), detail.actual_version), ("snapshot_ahead_of_stream", Some(9)));
    let missing = snapshots(&cluster, leader).await.save(save("account-2", 0, "{}")).await.unwrap_err();
    assert_eq!(missing.code(), Code::FailedPrecondition);

    for node in cluster.running() {
        assert_eq!(load(&cluster, node, "account-1", None).await.unwrap(), (9, "{\"balance\":45}".into()));
        assert_eq!(load(&cluster, node, "account-1", Some(8)).await.unwrap().0, 3);
        assert_eq!(load(&cluster, node, "account-1", Some(2)).await.unwrap_err().code(), Code::NotFound);
        assert_eq!(load(&cluster, node, "account-2", None).await.unwrap_err().code(), Code::NotFound);
    }
    let listed = snapshots(&cluster, follower).await.list(ListSnapshotsRequest { stream: "account-1".into() }).await.unwrap().into_inner();
    assert_eq!(listed.snapshots.iter().map(|s| s.version).collect::<Vec<_>>(), vec![3, 9]);
    assert!(listed.snapshots.iter().all(|s| s.state.is_empty() && s.state_bytes > 0));

    // Bad input names the field.
    let too_big = SaveSnapshotRequest { state: vec![b'x'; 2 * 1024 * 1024], ..save("account-1", 1, "") };
    let refused = snapshots(&cluster, follower).await.save(too_big).await.unwrap_err();
    assert_eq!(refused.code(), Code::InvalidArgument);
    assert_eq!(strata_proto::detail_of(&refused).unwrap().field, "state");

    // Delete one version, then the rest.
    let deleted = snapshots(&cluster, follower).await.delete(DeleteSnapshotRequest { stream: "account-1".into(), version: Some(9) }).await.unwrap();
    assert_eq!(deleted.into_inner().deleted, 1);
    assert_eq!(load(&cluster, leader, "account-1", None).await.unwrap().0, 3);
    let again = snapshots(&cluster, leader).await.delete(DeleteSnapshotRequest { stream: "account-1".into(), version: Some(9) }).await.unwrap_err();
    assert_eq!(again.code(), Code::NotFound);
    snapshots(&cluster, leader).await.delete(DeleteSnapshotRequest { stream: "account-1".into(), version: None }).await.unwrap();
    assert_eq!(load(&cluster, follower, "account-1", None).await.unwrap_err().code(), Code::NotFound);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn snapshots_survive_a_leader_kill_and_travel_in_raft_snapshots() {
    let mut cluster = TestCluster::start(42, 3).await;
    let events = (0..5).map(|i| event(&format!("00000000-0000-4000-8000-{i:012x}"), "Deposited", "{}")).collect();
    append_retrying(&cluster, append_request("account-1", ExpectedVersionKind::NoStream, 0, events), Duration::from_secs(20)).await.unwrap();
    let leader = cluster.wait_leader(Duration::from_secs(20)).await;
    snapshots(&cluster, leader).await.save(save("account-1", 4, "{\"v\":4}")).await.unwrap();
    // A wiped follower is rebuilt from a Raft snapshot, which must carry the aggregate
    // snapshot (the log below the Raft snapshot is purged).
    let follower = cluster.running().into_iter().find(|id| *id != leader).unwrap();
    cluster.kill(follower);
    let mut admin = strata_proto::v1::cluster_client::ClusterClient::new(cluster.channel(leader).await);
    admin.trigger_snapshot(strata_proto::v1::TriggerSnapshotRequest::default()).await.unwrap();
    cluster.wipe(follower);
    cluster.spawn(follower);
    cluster.wait_converged(Duration::from_secs(30)).await;
    let log = std::fs::read_to_string(cluster.log_path(follower)).unwrap();
    assert!(log.contains("raft snapshot installed"), "the wiped node was rebuilt from a raft snapshot");
    // Kill the leader: the survivors still have the snapshot.
    cluster.kill(leader);
    let new_leader = cluster.wait_leader(Duration::from_secs(20)).await;
    assert_ne!(new_leader, leader);
    let (version, state) = load(&cluster, follower, "account-1", None).await.unwrap();
    assert_eq!((version, state.as_str()), (4, "{\"v\":4}"));
}
