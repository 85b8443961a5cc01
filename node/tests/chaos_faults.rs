//! A bounded chaos scenario (issue 5, first part): a seeded workload of OCC appends (every
//! expected-version mode, client-chosen ids, indeterminate outcomes retried with the same
//! ids) and reads at every consistency level, while the leader and a follower are killed
//! with -9 and restarted and the leader is paused beyond the election timeout. After
//! healing, every node's `$all` goes to the checker of `tests/chaos`; any anomaly fails.
//! The history is written as JSONL beside the node logs (kept when the test fails).

mod common;

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::TestCluster;
use strata_chaos::checker::check;
use strata_chaos::history::{write_op, AppendOutcome, Consistency, Expected, FinalEvent, Op, OpKind, ReadOutcome};
use strata_node::error::detail_of;
use strata_proto::v1::streams_client::StreamsClient;
use strata_proto::v1::{AppendRequest, ExpectedVersionKind, ProposedEvent, ReadStreamRequest};

const CLIENTS: u32 = 4;
const STREAMS: u64 = 6;
const WORKLOAD_SECS: u64 = 24;
/// Attempts of one append whose outcome stays unknown.
const RETRIES_MAX: u32 = 20;

/// xorshift64: a seeded, dependency-free random source.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

struct Recorder {
    started: Instant,
    next_op: u64,
    ops: Vec<Op>,
}

impl Recorder {
    fn now(&self) -> u64 {
        self.started.elapsed().as_millis() as u64
    }
}

fn request(stream: &str, expected: Expected, ids: &[String]) -> AppendRequest {
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
            .map(|id| ProposedEvent { id: id.clone(), r#type: "Chaos".into(), data: b"{}".to_vec(), metadata: Vec::new(), content_type: "application/json".into() })
            .collect(),
    }
}

fn classify(result: Result<tonic::Response<strata_proto::v1::AppendResponse>, tonic::Status>) -> AppendOutcome {
    match result {
        Ok(response) => {
            let r = response.into_inner();
            AppendOutcome::Ok {
                first_version: r.first_version,
                first_position: r.first_position,
                commit_token: r.commit_token.parse().unwrap_or(0),
                replay: r.idempotent_replay,
            }
        }
        Err(status) => match detail_of(&status) {
            Some(detail) if detail.kind == "wrong_expected_version" => AppendOutcome::WrongVersion { actual: detail.actual_version },
            Some(detail) if !detail.indeterminate && status.code() != tonic::Code::Internal => {
                AppendOutcome::Refused { reason: format!("{}: {}", detail.kind, status.message()) }
            }
            _ => AppendOutcome::Indeterminate { reason: format!("{:?}: {}", status.code(), status.message()) },
        },
    }
}

async fn client(addrs: Arc<Vec<String>>, recorder: Arc<Mutex<Recorder>>, client_id: u32, seed: u64, until: Instant) {
    let mut rng = Rng(seed ^ (u64::from(client_id) + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1);
    let mut known_version: BTreeMap<String, u64> = BTreeMap::new();
    let mut session_token = 0u64;
    let mut event_counter = 0u64;
    while Instant::now() < until {
        let node = rng.below(addrs.len() as u64);
        let endpoint = format!("http://{}", addrs[node as usize]);
        let stream = format!("chaos-{}", rng.below(STREAMS));
        let channel = match tonic::transport::Endpoint::from_shared(endpoint).unwrap().connect_timeout(Duration::from_millis(300)).connect().await {
            Ok(channel) => channel,
            Err(_) => {
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let mut streams = StreamsClient::new(channel);
        if rng.below(4) == 0 {
            let (consistency, proto_level, token) = match rng.below(3) {
                0 => (Consistency::Linearizable, strata_proto::v1::Consistency::Linearizable, String::new()),
                1 => (Consistency::Local, strata_proto::v1::Consistency::Local, String::new()),
                _ => (Consistency::Session(session_token), strata_proto::v1::Consistency::Session, session_token.to_string()),
            };
            let invoke_ms = recorder.lock().unwrap().now();
            let mut call = tonic::Request::new(ReadStreamRequest {
                stream: stream.clone(),
                consistency: proto_level as i32,
                session_token: token,
                max_count: 100_000,
                ..Default::default()
            });
            call.set_timeout(Duration::from_secs(3));
            let outcome = match streams.read_stream(call).await {
                Ok(response) => {
                    let mut pages = response.into_inner();
                    let mut event_ids = Vec::new();
                    let mut failed = None;
                    loop {
                        match pages.message().await {
                            Ok(Some(page)) => event_ids.extend(page.events.into_iter().map(|e| e.id)),
                            Ok(None) => break,
                            Err(status) => {
                                failed = Some(status.message().to_string());
                                break;
                            }
                        }
                    }
                    match failed {
                        Some(reason) => ReadOutcome::Failed { reason },
                        None => ReadOutcome::Ok { event_ids },
                    }
                }
                Err(status) if status.code() == tonic::Code::NotFound => ReadOutcome::NotFound,
                Err(status) => ReadOutcome::Failed { reason: status.message().to_string() },
            };
            let mut rec = recorder.lock().unwrap();
            let (id, complete_ms) = (rec.next_op, rec.now());
            rec.next_op += 1;
            rec.ops.push(Op { id, client: client_id, node: node + 1, invoke_ms, complete_ms, kind: OpKind::ReadStream { stream, consistency, outcome } });
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
        let append = request(&stream, expected, &ids);
        // The same request (same ids) until the outcome is known: each attempt recorded.
        for attempt in 0..RETRIES_MAX {
            let invoke_ms = recorder.lock().unwrap().now();
            let mut call = tonic::Request::new(append.clone());
            call.set_timeout(Duration::from_secs(5));
            let outcome = classify(streams.append(call).await);
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
            {
                let mut rec = recorder.lock().unwrap();
                let (id, complete_ms) = (rec.next_op, rec.now());
                rec.next_op += 1;
                rec.ops.push(Op {
                    id,
                    client: client_id,
                    node: node + 1,
                    invoke_ms,
                    complete_ms,
                    kind: OpKind::Append { stream: stream.clone(), expected, event_ids: ids.clone(), outcome },
                });
            }
            if definite {
                break;
            }
            assert!(attempt + 1 < RETRIES_MAX, "append on {stream} stayed indeterminate for {RETRIES_MAX} attempts");
            tokio::time::sleep(Duration::from_millis(100)).await;
            // Reconnect through another node for the retry.
            let other = format!("http://{}", addrs[rng.below(addrs.len() as u64) as usize]);
            if let Ok(channel) = tonic::transport::Endpoint::from_shared(other).unwrap().connect_timeout(Duration::from_millis(300)).connect().await {
                streams = StreamsClient::new(channel);
            }
        }
    }
}

/// `kill -9` node `id`, and start it again with its data dir after `down`.
async fn kill_for(cluster: &mut TestCluster, id: u64, down: Duration) {
    cluster.kill(id);
    tokio::time::sleep(down).await;
    cluster.spawn(id);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn kill_and_pause_faults_lose_duplicate_and_reorder_nothing() {
    let seed: u64 = std::env::var("STRATA_CHAOS_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or(20_261_124);
    eprintln!("chaos seed: STRATA_CHAOS_SEED={seed}");
    let (mut cluster, _) = TestCluster::start_gossip(27, &[]).await;

    // Nodes keep their addresses across restarts: one fixed list for every client.
    let addrs: Arc<Vec<String>> = Arc::new((1..=3).map(|id| cluster.addr(id)).collect());
    let recorder = Arc::new(Mutex::new(Recorder { started: Instant::now(), next_op: 0, ops: Vec::new() }));
    let until = Instant::now() + Duration::from_secs(WORKLOAD_SECS);
    let clients: Vec<_> = (0..CLIENTS).map(|c| tokio::spawn(client(addrs.clone(), recorder.clone(), c, seed, until))).collect();

    // The fault schedule, each logged with start and end.
    let mut faults = Vec::new();
    let mut log_fault = |what: String, started: Instant| {
        eprintln!("fault: {what} ({} ms)", started.elapsed().as_millis());
        faults.push(what);
    };
    tokio::time::sleep(Duration::from_secs(3)).await;
    let leader = cluster.wait_leader(Duration::from_secs(10)).await;
    let t = Instant::now();
    kill_for(&mut cluster, leader, Duration::from_secs(3)).await;
    log_fault(format!("kill -9 leader {leader}, restart after 3 s"), t);

    tokio::time::sleep(Duration::from_secs(3)).await;
    let leader = cluster.wait_leader(Duration::from_secs(10)).await;
    let follower = (1..=3).find(|id| *id != leader).unwrap();
    let t = Instant::now();
    kill_for(&mut cluster, follower, Duration::from_secs(3)).await;
    log_fault(format!("kill -9 follower {follower}, restart after 3 s"), t);

    tokio::time::sleep(Duration::from_secs(3)).await;
    let leader = cluster.wait_leader(Duration::from_secs(10)).await;
    let t = Instant::now();
    cluster.signal_pause(leader, true);
    tokio::time::sleep(Duration::from_secs(4)).await;
    cluster.signal_pause(leader, false);
    log_fault(format!("SIGSTOP leader {leader} for 4 s (beyond the election timeout)"), t);

    for client in clients {
        client.await.expect("client task");
    }
    // Heal and drain: every node up, converged, then each node's full $all.
    cluster.wait_converged(Duration::from_secs(60)).await;
    let mut finals = BTreeMap::new();
    for id in 1..=3 {
        let events: Vec<FinalEvent> = cluster
            .read_all_local(id)
            .await
            .into_iter()
            .map(|e| FinalEvent { id: e.id, stream: e.stream, version: e.version, position: e.position })
            .collect();
        finals.insert(id, events);
    }
    let ops = std::mem::take(&mut recorder.lock().unwrap().ops);
    let history_path = cluster.dir.path().join("history.jsonl");
    let mut history = std::io::BufWriter::new(std::fs::File::create(&history_path).expect("history file"));
    for op in &ops {
        write_op(&mut history, op).expect("write history");
    }
    drop(history);
    let report = check(&ops, &finals);
    let appends = ops.iter().filter(|op| matches!(op.kind, OpKind::Append { .. })).count();
    let indeterminate = ops.iter().filter(|op| matches!(op.kind, OpKind::Append { outcome: AppendOutcome::Indeterminate { .. }, .. })).count();
    eprintln!("chaos kill+pause, seed {seed}: {} ops ({appends} append attempts, {indeterminate} indeterminate), {} faults", ops.len(), faults.len());
    eprintln!("{report}");
    assert_eq!(report.anomalies(), 0, "anomalies found; history in {}", history_path.display());
    assert!(report.acknowledged_events > 50, "the workload made progress: {report}");
}
