//! `strata bench`: the peers' append/read workload, driven against a Strata cluster.
//!
//! This is the same workload as `../shared/bench/peers/loadgen` (see its README), so the
//! numbers land in the same table as etcd, NATS and PostgreSQL. For every (batch B,
//! writers N) pair:
//!
//! 1. A fresh stream namespace: streams `bench-<run_id>-w<i>-s<k>`, `run_id` from the clock,
//!    so a pair never sees events from an earlier one and the read-back can filter on the
//!    prefix `bench-<run_id>-`.
//! 2. N writer tasks, each with its own gRPC channel (one HTTP/2 connection, like the
//!    loadgen's one connection per writer), each owning `streams-per-writer` streams appended
//!    round-robin with B events of exactly `payload-bytes` bytes and the exact expected
//!    version (NO_STREAM for the first append, then EXACT head). Closed loop: the next
//!    append is sent when the previous one is acknowledged. Latency per append goes into an
//!    HdrHistogram (µs). Stops at `duration-secs` or when `max-events` were acknowledged.
//! 3. OCC probe: a deliberately stale append must fail with FAILED_PRECONDITION.
//! 4. Read-back: one `$all` read (ReadAll, prefix filter, linearizable, from position 0),
//!    timed, and its count checked against the acknowledged count.
//!
//! One JSON line per pair goes to stdout (and `--out`), with the loadgen's keys; a human
//! line per pair goes to stderr and a compact table to stdout at the end.

use std::io::Write as _;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context as _, Result, anyhow, bail};
use hdrhistogram::Histogram;
use serde_json::{Value, json};
use strata_proto::v1::streams_client::StreamsClient;
use strata_proto::v1::{
    AppendRequest, Consistency, Direction, ExpectedVersionKind, ProposedEvent, ReadAllRequest,
    ReadFilter,
};
use strata_security::AuthChannel;
use tonic::transport::Endpoint;

/// Largest gRPC message the client accepts: a ReadAll chunk carries many events, and the
/// server may size its chunks well above tonic's 4 MiB default.
const MAX_DECODING_MESSAGE_BYTES: usize = 64 * 1024 * 1024;
/// A writer stops after this many errors: a broken cluster should end the pair quickly
/// rather than spin through the whole duration (the loadgen's rule).
const MAX_ERRORS_PER_WRITER: u64 = 20;
/// Upper bound on writer tasks (one TCP connection each); far above the 1..64 the
/// comparison uses, low enough that a typo cannot exhaust file descriptors.
const MAX_WRITERS: usize = 4096;
/// Upper bound on the whole read-back, so a server that never ends its stream cannot hang
/// the bench. 3M events (the default cap) read at 10k events/s still fit.
const READ_BACK_TIMEOUT: Duration = Duration::from_secs(600);
/// Connecting a channel should take milliseconds on loopback; a dead endpoint must fail
/// the pair instead of blocking it.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// /proc/<pid>/stat counts CPU in USER_HZ ticks, which is 100 on every mainstream Linux
/// architecture (the loadgen assumes the same, so the peers' numbers compare).
const TICKS_PER_SEC: f64 = 100.0;
/// Latency histogram range in µs: 1 µs .. 120 s at 3 significant digits (as the loadgen).
const HIST_MAX_US: u64 = 120_000_000;

/// Flags of `strata bench`.
#[derive(clap::Args, Debug, Clone)]
pub struct BenchArgs {
    /// gRPC endpoints, comma-separated host:port; writer i connects to endpoint i mod count
    /// (any node accepts appends: followers forward to the leader).
    #[arg(long, default_value = "127.0.0.1:7701")]
    pub endpoints: String,
    /// Comma-separated writer-task counts.
    #[arg(long, default_value = "1,16,64")]
    pub writers: String,
    /// Comma-separated events-per-append values.
    #[arg(long, default_value = "1,10")]
    pub batches: String,
    /// Seconds of writing per (writers, batch) pair.
    #[arg(long, default_value_t = 10.0)]
    pub duration_secs: f64,
    /// Bytes per event payload (exact).
    #[arg(long, default_value_t = 256)]
    pub payload_bytes: usize,
    /// Streams owned by each writer, appended to round-robin.
    #[arg(long, default_value_t = 4)]
    pub streams_per_writer: usize,
    /// Hard cap on acknowledged events per pair (bounds the run on a very fast cluster).
    #[arg(long, default_value_t = 3_000_000)]
    pub max_events: u64,
    /// Per-append timeout in seconds (a timeout counts as an error).
    #[arg(long, default_value_t = 30.0)]
    pub append_timeout_secs: f64,
    /// Append the JSON result lines to this file as well as printing them.
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Label written into the results (the side-by-side table's "system" column).
    #[arg(long, default_value = "strata")]
    pub label: String,
    /// Comma-separated server PIDs: their CPU time during the write window is reported.
    #[arg(long, default_value = "")]
    pub pids: String,
    /// Instead of the grid: read all of `$all` from position 0 through the first endpoint
    /// and print one JSON line with events/s (`scripts/bench-tier` times tiered reads so).
    #[arg(long)]
    pub read_all_only: bool,
    /// Skip the persistent-group throughput runs after each pair.
    #[arg(long)]
    pub skip_groups: bool,
    /// Skip the read-back and catch-up after each pair (the pair then reports its reads as
    /// skipped and counts as not verified): for long fill runs.
    #[arg(long)]
    pub skip_reads: bool,
}

/// Runs the grid and prints the results; fails if any pair failed its read-back count,
/// its OCC probe, or could not run at all.
pub async fn run(args: BenchArgs, tls: Option<strata_security::ClientTls>, token: strata_security::BearerToken) -> Result<()> {
    let _ = CLIENT_TOKEN.set(token);
    // Every channel of the run uses the same TLS set-up (or none): set once, here.
    let _ = CLIENT_TLS.set(tls);
    if args.read_all_only {
        let first = args.endpoints.split(',').next().unwrap_or_default().trim();
        let endpoint = crate::cli::endpoint_url(first);
        let mut client = connect(&endpoint).await?;
        let started = Instant::now();
        let stats = read_back(&mut client, "", 0).await?;
        let seconds = started.elapsed().as_secs_f64();
        let row = json!({
            "read_all_events": stats.events, "read_all_bytes": stats.bytes, "seconds": seconds,
            "events_per_s": stats.events as f64 / seconds.max(1e-9), "endpoint": endpoint,
        });
        println!("{row}");
        return Ok(());
    }
    let plan = Plan::from_args(&args)?;
    let mut out = match &args.out {
        Some(p) => Some(
            std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(p)
                .with_context(|| format!("opening --out {}", p.display()))?,
        ),
        None => None,
    };
    eprintln!(
        "[strata] endpoints {}; writers {:?}; batches {:?}; {} s per pair; {} B payload",
        plan.endpoints.join(","),
        plan.writers,
        plan.batches,
        args.duration_secs,
        args.payload_bytes
    );

    let mut rows: Vec<Value> = Vec::with_capacity(plan.batches.len() * plan.writers.len());
    let mut failures = 0usize;
    for &batch in &plan.batches {
        for &writers in &plan.writers {
            eprintln!("[strata] writers={writers} batch={batch} ...");
            let row = match run_pair(&args, &plan, writers, batch).await {
                Ok(v) => {
                    eprintln!(
                        "[strata] writers={writers} batch={batch}: {:.0} ev/s, p50 {:.2} ms, p99 {:.2} ms, read {:.0} ev/s, occ {}, read ok {}, errors {}",
                        v["events_per_s"].as_f64().unwrap_or(0.0),
                        v["lat_p50_ms"].as_f64().unwrap_or(0.0),
                        v["lat_p99_ms"].as_f64().unwrap_or(0.0),
                        v["read_events_per_s"].as_f64().unwrap_or(0.0),
                        v["occ_probe"],
                        v["read_matches_written"],
                        v["errors"]
                    );
                    if !pair_passed(&v) {
                        failures += 1;
                    }
                    v
                }
                Err(e) => {
                    failures += 1;
                    eprintln!("[strata] writers={writers} batch={batch} FAILED: {e:#}");
                    json!({"target": "strata", "label": args.label, "writers": writers,
                           "batch": batch, "failed": format!("{e:#}")})
                }
            };
            let line = serde_json::to_string(&row)?;
            println!("{line}");
            if let Some(f) = out.as_mut() {
                writeln!(f, "{line}").context("writing --out")?;
            }
            rows.push(row);
        }
    }
    print!("{}", render_table(&rows));
    if failures > 0 {
        bail!(
            "{failures} of {} pair(s) failed (read-back count, OCC probe or run error)",
            rows.len()
        );
    }
    Ok(())
}

/// The validated, parsed form of the flags.
struct Plan {
    endpoints: Vec<String>,
    writers: Vec<usize>,
    batches: Vec<usize>,
    pids: Vec<u32>,
    duration: Duration,
    append_timeout: Duration,
}

impl Plan {
    fn from_args(a: &BenchArgs) -> Result<Self> {
        let endpoints: Vec<String> = a
            .endpoints
            .split(',')
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .map(crate::cli::endpoint_url)
            .collect();
        if endpoints.is_empty() {
            bail!("--endpoints is empty");
        }
        let writers: Vec<usize> = parse_list(&a.writers).context("--writers")?;
        let batches: Vec<usize> = parse_list(&a.batches).context("--batches")?;
        let pids: Vec<u32> = parse_list(&a.pids).context("--pids")?;
        if writers.is_empty() || writers.iter().any(|&w| w == 0 || w > MAX_WRITERS) {
            bail!("--writers needs values in 1..={MAX_WRITERS}");
        }
        if batches.is_empty() || batches.contains(&0) {
            bail!("--batches needs values >= 1");
        }
        if a.streams_per_writer == 0 {
            bail!("--streams-per-writer must be >= 1");
        }
        // Duration::from_secs_f64 panics on negative, NaN or huge values: check first.
        let secs = |v: f64, flag: &str| -> Result<Duration> {
            if v.is_finite() && v > 0.0 && v < 1e9 {
                Ok(Duration::from_secs_f64(v))
            } else {
                Err(anyhow!(
                    "{flag} must be a positive number of seconds, got {v}"
                ))
            }
        };
        Ok(Self {
            endpoints,
            writers,
            batches,
            pids,
            duration: secs(a.duration_secs, "--duration-secs")?,
            append_timeout: secs(a.append_timeout_secs, "--append-timeout-secs")?,
        })
    }
}

fn parse_list<T: std::str::FromStr>(s: &str) -> Result<Vec<T>> {
    s.split(',')
        .map(str::trim)
        .filter(|x| !x.is_empty())
        .map(|x| x.parse::<T>().map_err(|_| anyhow!("bad list item {x:?}")))
        .collect()
}

/// A pair passes when the stale append was rejected and the read-back saw exactly the
/// acknowledged events.
fn pair_passed(v: &Value) -> bool {
    v["occ_probe"].as_str() == Some("rejected") && v["read_matches_written"].as_bool() == Some(true)
}

/// The loadgen's `payload_for`, byte for byte: JSON-looking, not trivially compressible,
/// exactly `size` bytes, so every system stores the same bytes.
fn payload_for(writer: usize, size: usize) -> Vec<u8> {
    let head = format!("{{\"type\":\"BenchEvent\",\"writer\":{writer},\"pad\":\"");
    let mut v = head.into_bytes();
    v.reserve(size.saturating_sub(v.len()));
    let mut x: u64 = 0x9E37_79B9_7F4A_7C15 ^ writer as u64;
    while v.len() + 2 < size {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        v.push(b"abcdefghijklmnopqrstuvwxyz0123456789"[(x % 36) as usize]);
    }
    v.extend_from_slice(b"\"}");
    v.truncate(size);
    v
}

/// The expected version of the next append to a stream holding `events_so_far` events:
/// versions start at 0, so the head is `events_so_far - 1`; an empty stream does not exist.
fn expected_for(events_so_far: u64) -> (ExpectedVersionKind, u64) {
    match events_so_far {
        0 => (ExpectedVersionKind::NoStream, 0),
        n => (ExpectedVersionKind::Exact, n - 1),
    }
}

/// A provably stale expectation for a stream holding `events` events, or None when the
/// stream is empty (nothing can be stale yet). EXACT 0 is stale once the head is past 0;
/// with a single event the head *is* 0, so NO_STREAM is the stale claim instead.
fn stale_expectation(events: u64) -> Option<(ExpectedVersionKind, u64)> {
    match events {
        0 => None,
        1 => Some((ExpectedVersionKind::NoStream, 0)),
        _ => Some((ExpectedVersionKind::Exact, 0)),
    }
}

/// utime + stime (ticks) from the text of /proc/<pid>/stat. The command name (field 2) is
/// in parentheses and may itself hold spaces or ')', so fields are counted after the
/// last ')': there, index 0 is field 3 (state), so utime (14) and stime (15) are 11 and 12.
fn parse_stat_ticks(stat: &str) -> Option<u64> {
    let rest = &stat[stat.rfind(')')? + 1..];
    let mut f = rest.split_whitespace().skip(11);
    let utime: u64 = f.next()?.parse().ok()?;
    let stime: u64 = f.next()?.parse().ok()?;
    Some(utime + stime)
}

/// Total CPU ticks of the given server processes, or None if there are none or one of
/// them cannot be read (exited: a delta across a restart would be meaningless).
fn server_ticks(pids: &[u32]) -> Option<u64> {
    if pids.is_empty() {
        return None;
    }
    pids.iter().try_fold(0u64, |acc, pid| {
        let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
        Some(acc + parse_stat_ticks(&s)?)
    })
}

/// The run's TLS set-up (`--ca`), None for plaintext.
static CLIENT_TLS: std::sync::OnceLock<Option<strata_security::ClientTls>> = std::sync::OnceLock::new();
/// The run's token (`--token` or the token file), sent on every call.
static CLIENT_TOKEN: std::sync::OnceLock<strata_security::BearerToken> = std::sync::OnceLock::new();

async fn connect(endpoint: &str) -> Result<StreamsClient<AuthChannel>> {
    Ok(StreamsClient::new(channel(endpoint).await?).max_decoding_message_size(MAX_DECODING_MESSAGE_BYTES))
}

/// A channel to one of the plan's endpoints, with the server's HTTP/2 windows.
async fn channel(endpoint: &str) -> Result<AuthChannel> {
    let target = Endpoint::from_shared(endpoint.to_string())
        .with_context(|| format!("bad endpoint {endpoint}"))?
        .tcp_nodelay(true)
        .initial_stream_window_size(Some(strata_raft::HTTP2_STREAM_WINDOW_BYTES))
        .initial_connection_window_size(Some(strata_raft::HTTP2_CONNECTION_WINDOW_BYTES))
        .connect_timeout(CONNECT_TIMEOUT);
    let channel = strata_security::connect(target, CLIENT_TLS.get().and_then(Option::as_ref))
        .await
        .with_context(|| format!("connecting to {endpoint}"))?;
    Ok(CLIENT_TOKEN.get().cloned().unwrap_or_default().on(channel))
}

fn new_histogram() -> Histogram<u64> {
    Histogram::<u64>::new_with_bounds(1, HIST_MAX_US, 3)
        .expect("constant histogram bounds are valid")
}

fn status_text(s: &tonic::Status) -> String {
    format!("{:?}: {}", s.code(), s.message())
}

/// One stream a writer owns and how many events it has acknowledged on it.
struct Slot {
    name: String,
    events: u64,
}

/// What one writer task needs; everything is owned so the task can be spawned.
struct WriterJob {
    client: StreamsClient<AuthChannel>,
    streams: Vec<Slot>,
    batch: Vec<ProposedEvent>,
    deadline: Instant,
    max_events: u64,
    total: Arc<AtomicU64>,
    append_timeout: Duration,
}

struct WriterResult {
    hist: Histogram<u64>,
    appends: u64,
    events: u64,
    conflicts: u64,
    errors: u64,
    first_error: Option<String>,
    streams: Vec<Slot>,
    /// The lowest `$all` position this writer's appends were given.
    first_position: Option<u64>,
}

/// The closed loop of one writer. Bounded by the deadline, the shared event cap, the
/// per-append timeout and the error budget.
async fn writer_task(job: WriterJob) -> WriterResult {
    let WriterJob {
        mut client,
        mut streams,
        batch,
        deadline,
        max_events,
        total,
        append_timeout,
    } = job;
    let b = batch.len() as u64;
    let mut r = WriterResult {
        hist: new_histogram(),
        appends: 0,
        events: 0,
        conflicts: 0,
        errors: 0,
        first_error: None,
        streams: Vec::new(),
        first_position: None,
    };
    let mut i = 0usize;
    while Instant::now() < deadline && total.load(Ordering::Relaxed) < max_events {
        let slot = i % streams.len();
        i = i.wrapping_add(1);
        let (kind, version) = expected_for(streams[slot].events);
        let req = AppendRequest {
            stream: streams[slot].name.clone(),
            expected_kind: kind as i32,
            expected_version: version,
            events: batch.clone(),
        };
        let t = Instant::now();
        let res = tokio::time::timeout(append_timeout, client.append(req)).await;
        let us = u64::try_from(t.elapsed().as_micros()).unwrap_or(u64::MAX);
        match res {
            Ok(Ok(resp)) => {
                r.hist.saturating_record(us.max(1));
                let resp = resp.into_inner();
                r.first_position = Some(r.first_position.map_or(resp.first_position, |p| p.min(resp.first_position)));
                let s = &mut streams[slot];
                let want_last = s.events + b - 1;
                if resp.last_version != want_last {
                    // Acknowledged, but not where the expected version said it would land:
                    // a server bug worth surfacing. Follow the server so the next append
                    // carries the real head.
                    r.errors += 1;
                    r.first_error.get_or_insert_with(|| {
                        format!(
                            "append to {} acknowledged at last_version {}, expected {want_last}",
                            s.name, resp.last_version
                        )
                    });
                    s.events = resp.last_version + 1;
                } else {
                    s.events += b;
                }
                r.appends += 1;
                r.events += b;
                total.fetch_add(b, Ordering::Relaxed);
            }
            Ok(Err(status)) if status.code() == tonic::Code::FailedPrecondition => {
                // Each writer owns its streams, so a conflict means an append was lost or
                // applied twice: count it and stop this writer (the loadgen's rule).
                r.conflicts += 1;
                r.first_error.get_or_insert_with(|| {
                    format!(
                        "unexpected conflict on {}: {}",
                        streams[slot].name,
                        status_text(&status)
                    )
                });
                break;
            }
            Ok(Err(status)) => {
                r.errors += 1;
                r.first_error.get_or_insert_with(|| status_text(&status));
            }
            Err(_) => {
                r.errors += 1;
                r.first_error.get_or_insert_with(|| {
                    format!(
                        "append timed out after {:.1} s",
                        append_timeout.as_secs_f64()
                    )
                });
            }
        }
        if r.errors > MAX_ERRORS_PER_WRITER {
            break;
        }
    }
    r.streams = streams;
    r
}

/// Sends a stale append to the first stream that has events; it must be refused.
async fn occ_probe(
    client: &mut StreamsClient<AuthChannel>,
    results: &[WriterResult],
    payload: Vec<u8>,
    timeout: Duration,
) -> String {
    let Some((slot, (kind, version))) = results
        .iter()
        .flat_map(|r| r.streams.iter())
        .find_map(|s| stale_expectation(s.events).map(|e| (s, e)))
    else {
        return "skipped (no events written)".to_string();
    };
    let req = AppendRequest {
        stream: slot.name.clone(),
        expected_kind: kind as i32,
        expected_version: version,
        events: vec![bench_event(payload.into())],
    };
    match tokio::time::timeout(timeout, client.append(req)).await {
        Ok(Err(s)) if s.code() == tonic::Code::FailedPrecondition => "rejected".to_string(),
        Ok(Ok(_)) => "ACCEPTED-STALE-APPEND".to_string(),
        Ok(Err(s)) => format!("error: {}", status_text(&s)),
        Err(_) => "error: probe timed out".to_string(),
    }
}

struct ReadStats {
    events: u64,
    bytes: u64,
}

/// Reads every event of the pair's namespace from `$all`, starting at the pair's first
/// position, and counts events and payload bytes. Bounded by READ_BACK_TIMEOUT as a whole.
async fn read_back(client: &mut StreamsClient<AuthChannel>, prefix: &str, from_position: u64) -> Result<ReadStats> {
    let req = ReadAllRequest {
        from_position,
        from_end: false,
        direction: Direction::Forward as i32,
        max_count: 0,
        filter: Some(ReadFilter {
            stream_prefix: prefix.to_string(),
            event_types: Vec::new(),
            stream_regex: String::new(),
        }),
        consistency: Consistency::Linearizable as i32,
        session_token: String::new(),
    };
    let read = async {
        let mut stream = client
            .read_all(req)
            .await
            .map_err(|s| anyhow!("ReadAll: {}", status_text(&s)))?
            .into_inner();
        let mut st = ReadStats {
            events: 0,
            bytes: 0,
        };
        while let Some(chunk) = stream
            .message()
            .await
            .map_err(|s| anyhow!("ReadAll stream: {}", status_text(&s)))?
        {
            st.events += chunk.events.len() as u64;
            st.bytes += chunk
                .events
                .iter()
                .map(|e| e.data.len() as u64)
                .sum::<u64>();
        }
        Ok::<_, anyhow::Error>(st)
    };
    tokio::time::timeout(READ_BACK_TIMEOUT, read)
        .await
        .map_err(|_| {
            anyhow!(
                "read-back timed out after {} s",
                READ_BACK_TIMEOUT.as_secs()
            )
        })?
}

/// A catch-up subscription to the pair's namespace of `$all` from its first position,
/// timed until the server says it has caught up: how fast a new consumer replays history.
async fn catch_up(endpoint: &str, prefix: &str, from_position: u64) -> Result<ReadStats> {
    use strata_proto::v1::subscribe_response::Kind;
    use strata_proto::v1::{SubscribeFrom, SubscribeRequest, SubscriptionFilter};
    let mut client = strata_proto::v1::subscriptions_client::SubscriptionsClient::new(channel(endpoint).await?)
        .max_decoding_message_size(MAX_DECODING_MESSAGE_BYTES);
    let request = SubscribeRequest {
        stream: "$all".into(),
        from: SubscribeFrom::Revision as i32,
        from_revision: from_position,
        filter: Some(SubscriptionFilter { stream_prefix: prefix.to_string(), ..Default::default() }),
        follow_leader: false,
    };
    let replay = async {
        let mut stream = client.subscribe(request).await.map_err(|s| anyhow!("Subscribe: {}", status_text(&s)))?.into_inner();
        let mut st = ReadStats { events: 0, bytes: 0 };
        while let Some(message) = stream.message().await.map_err(|s| anyhow!("Subscribe stream: {}", status_text(&s)))? {
            match message.kind {
                Some(Kind::Events(batch)) => {
                    st.events += batch.events.len() as u64;
                    st.bytes += batch.events.iter().map(|e| e.data.len() as u64).sum::<u64>();
                }
                Some(Kind::CaughtUp(_)) => return Ok(st),
                _ => {}
            }
        }
        Err(anyhow!("the subscription ended before it caught up"))
    };
    tokio::time::timeout(READ_BACK_TIMEOUT, replay)
        .await
        .map_err(|_| anyhow!("catch-up timed out after {} s", READ_BACK_TIMEOUT.as_secs()))?
}

/// Events a persistent-group measurement consumes at most (the first of the pair's).
const GROUP_BENCH_EVENTS_MAX: u64 = 100_000;
/// Deliveries each bench consumer may hold unacked.
const GROUP_BENCH_IN_FLIGHT: u32 = 1_000;

/// Persistent group throughput with acks: a group over the pair's namespace of `$all`
/// from its first position, `consumers` consumers (spread over the endpoints) acking every
/// delivery; events/s until `target` deliveries were acked. The group is deleted after.
async fn group_throughput(endpoints: &[String], prefix: &str, from_position: u64, consumers: usize, target: u64) -> Result<f64> {
    use std::sync::atomic::{AtomicU64, Ordering};
    use strata_proto::v1::connect_request::Kind as InKind;
    use strata_proto::v1::connect_response::Kind as OutKind;
    use strata_proto::v1::persistent_subscriptions_client::PersistentSubscriptionsClient;
    use strata_proto::v1::{Ack, ConnectRequest, ConnectStart, CreateGroupRequest, DeleteGroupRequest, GroupSettings, SubscribeFrom, SubscriptionFilter};
    let group = format!("{prefix}{consumers}c");
    let mut admin = PersistentSubscriptionsClient::new(channel(&endpoints[0]).await?);
    let settings = GroupSettings {
        source: "$all".into(),
        filter: Some(SubscriptionFilter { stream_prefix: prefix.to_string(), ..Default::default() }),
        from: SubscribeFrom::Revision as i32,
        from_revision: from_position,
        max_in_flight: Some(GROUP_BENCH_IN_FLIGHT),
        message_timeout_ms: Some(READ_BACK_TIMEOUT.as_millis() as u64),
        ..Default::default()
    };
    admin.create(CreateGroupRequest { group: group.clone(), settings: Some(settings) }).await.map_err(|s| anyhow!("group create: {}", status_text(&s)))?;
    let acked = std::sync::Arc::new(AtomicU64::new(0));
    let (done, mut finished) = tokio::sync::watch::channel(false);
    let started = Instant::now();
    let mut tasks = Vec::new();
    for i in 0..consumers {
        let (endpoint, group, acked, done, mut finished) = (endpoints[i % endpoints.len()].clone(), group.clone(), acked.clone(), done.clone(), finished.clone());
        tasks.push(tokio::spawn(async move {
            let mut client = PersistentSubscriptionsClient::new(channel(&endpoint).await?).max_decoding_message_size(MAX_DECODING_MESSAGE_BYTES);
            let (requests, outbound) = tokio::sync::mpsc::channel(1024);
            requests.send(ConnectRequest { kind: Some(InKind::Start(ConnectStart { group, consumer_name: format!("bench-{i}") })) }).await?;
            let mut stream = client
                .connect_consumer(tokio_stream::wrappers::ReceiverStream::new(outbound))
                .await
                .map_err(|s| anyhow!("group connect: {}", status_text(&s)))?
                .into_inner();
            loop {
                let message = tokio::select! {
                    message = stream.message() => message.map_err(|s| anyhow!("group stream: {}", status_text(&s)))?,
                    _ = finished.wait_for(|f| *f) => return Ok::<(), anyhow::Error>(()),
                };
                let Some(message) = message else { return Err(anyhow!("the group connection ended")) };
                if let Some(OutKind::Delivery(delivery)) = message.kind {
                    requests.send(ConnectRequest { kind: Some(InKind::Ack(Ack { delivery_ids: vec![delivery.delivery_id] })) }).await?;
                    if acked.fetch_add(1, Ordering::Relaxed) + 1 >= target {
                        let _ = done.send(true);
                    }
                }
            }
        }));
    }
    // Only whether it finished: the `Ref` that `wait_for` returns holds the channel's read
    // lock, and `done.send` below would wait for it forever.
    let outcome = tokio::time::timeout(READ_BACK_TIMEOUT, finished.wait_for(|f| *f)).await.map(|r| r.is_ok());
    let secs = started.elapsed().as_secs_f64();
    let _ = done.send(true);
    for task in tasks {
        if let Ok(Err(e)) = task.await {
            eprintln!("[strata] group consumer: {e:#}");
        }
    }
    let _ = admin.delete(DeleteGroupRequest { group }).await;
    outcome.map_err(|_| anyhow!("group consumption timed out after {} s at {} of {target}", READ_BACK_TIMEOUT.as_secs(), acked.load(Ordering::Relaxed)))?;
    Ok(acked.load(Ordering::Relaxed) as f64 / secs)
}

fn bench_event(data: prost::bytes::Bytes) -> ProposedEvent {
    ProposedEvent {
        // Empty: the server generates the id (no client-side idempotency in the bench).
        id: String::new(),
        r#type: "BenchEvent".into(),
        data,
        metadata: Default::default(),
        content_type: "application/json".into(),
    }
}

async fn run_pair(a: &BenchArgs, plan: &Plan, writers: usize, batch: usize) -> Result<Value> {
    let run_id = format!(
        "r{}w{}b{}",
        SystemTime::now().duration_since(UNIX_EPOCH)?.as_millis(),
        writers,
        batch
    );
    let prefix = format!("bench-{run_id}-");

    // Connections are opened before the clock starts, as the loadgen does.
    let mut clients = Vec::with_capacity(writers);
    for i in 0..writers {
        clients.push(connect(&plan.endpoints[i % plan.endpoints.len()]).await?);
    }
    let mut control = connect(&plan.endpoints[0]).await?;

    let total = Arc::new(AtomicU64::new(0));
    let cpu0 = server_ticks(&plan.pids);
    let t0 = Instant::now();
    let deadline = t0 + plan.duration;
    let mut handles = Vec::with_capacity(writers);
    for (i, client) in clients.into_iter().enumerate() {
        // Shared by every event of the writer: a copy of the request is a reference count.
        let payload = prost::bytes::Bytes::from(payload_for(i, a.payload_bytes));
        let job = WriterJob {
            client,
            streams: (0..a.streams_per_writer)
                .map(|k| Slot {
                    name: format!("{prefix}w{i}-s{k}"),
                    events: 0,
                })
                .collect(),
            batch: (0..batch).map(|_| bench_event(payload.clone())).collect(),
            deadline,
            max_events: a.max_events,
            total: total.clone(),
            append_timeout: plan.append_timeout,
        };
        handles.push(tokio::spawn(writer_task(job)));
    }
    let mut results = Vec::with_capacity(writers);
    for h in handles {
        results.push(h.await.context("writer task panicked")?);
    }
    let elapsed = t0.elapsed().as_secs_f64();
    let cpu1 = server_ticks(&plan.pids);

    let mut hist = new_histogram();
    let (mut appends, mut events, mut conflicts, mut errors) = (0u64, 0u64, 0u64, 0u64);
    let mut first_error: Option<String> = None;
    for r in &results {
        hist.add(&r.hist).context("merging histograms")?;
        appends += r.appends;
        events += r.events;
        conflicts += r.conflicts;
        errors += r.errors;
        if first_error.is_none() {
            first_error.clone_from(&r.first_error);
        }
    }

    let occ = occ_probe(
        &mut control,
        &results,
        payload_for(0, a.payload_bytes),
        plan.append_timeout,
    )
    .await;

    // This pair's events all sit at or after its first acknowledged position: the read-back
    // starts there instead of scanning the earlier pairs' events too.
    let from_position = results.iter().filter_map(|r| r.first_position).min().unwrap_or(0);
    drop(results);

    let rt = Instant::now();
    let read = if a.skip_reads { Err(anyhow!("skipped (--skip-reads)")) } else { read_back(&mut control, &prefix, from_position).await };
    let read_secs = rt.elapsed().as_secs_f64();
    let (read_events, read_bytes, read_error) = match read {
        Ok(s) => (s.events, s.bytes, None),
        Err(e) => (0, 0, Some(format!("{e:#}"))),
    };

    let ct = Instant::now();
    let caught_up = if a.skip_reads { Err(anyhow!("skipped (--skip-reads)")) } else { catch_up(&plan.endpoints[0], &prefix, from_position).await };
    let catchup_secs = ct.elapsed().as_secs_f64();
    let (catchup_events, catchup_error) = match caught_up {
        Ok(s) => (s.events, None),
        Err(e) => (0, Some(format!("{e:#}"))),
    };

    let group_target = events.min(GROUP_BENCH_EVENTS_MAX);
    let mut group_rates = Vec::new();
    for consumers in if a.skip_groups { vec![] } else { vec![1usize, 4] } {
        match group_throughput(&plan.endpoints, &prefix, from_position, consumers, group_target).await {
            Ok(rate) => group_rates.push(json!(rate)),
            Err(e) => {
                eprintln!("[strata] persistent group with {consumers} consumer(s): {e:#}");
                group_rates.push(Value::Null);
            }
        }
    }

    let server_cpu_s = match (cpu0, cpu1) {
        (Some(c0), Some(c1)) => Some(c1.saturating_sub(c0) as f64 / TICKS_PER_SEC),
        _ => {
            if !plan.pids.is_empty() {
                eprintln!(
                    "[strata] warning: could not read /proc/<pid>/stat of --pids {:?}",
                    plan.pids
                );
            }
            None
        }
    };
    let ms = |us: u64| us as f64 / 1000.0;
    let per_s = |n: u64, secs: f64| if secs > 0.0 { n as f64 / secs } else { 0.0 };
    Ok(json!({
        "target": "strata",
        "label": a.label,
        "writers": writers,
        "batch": batch,
        "payload_bytes": a.payload_bytes,
        "streams_per_writer": a.streams_per_writer,
        "duration_s": elapsed,
        "appends": appends,
        "events": events,
        "events_per_s": per_s(events, elapsed),
        "appends_per_s": per_s(appends, elapsed),
        "lat_p50_ms": ms(hist.value_at_quantile(0.50)),
        "lat_p99_ms": ms(hist.value_at_quantile(0.99)),
        "lat_p999_ms": ms(hist.value_at_quantile(0.999)),
        "lat_max_ms": ms(hist.max()),
        "lat_mean_ms": hist.mean() / 1000.0,
        "conflicts": conflicts,
        "errors": errors,
        "first_error": first_error,
        "occ_probe": occ,
        "read_events": read_events,
        "read_bytes": read_bytes,
        "read_secs": read_secs,
        "read_events_per_s": per_s(read_events, read_secs),
        "read_matches_written": read_error.is_none() && read_events == events,
        "read_error": read_error,
        "catchup_events": catchup_events,
        "catchup_events_per_s": per_s(catchup_events, catchup_secs),
        "catchup_matches_written": catchup_error.is_none() && catchup_events == events,
        "catchup_error": catchup_error,
        "group_events": group_target,
        "group_1c_events_per_s": group_rates.first().cloned().unwrap_or(Value::Null),
        "group_4c_events_per_s": group_rates.get(1).cloned().unwrap_or(Value::Null),
        "server_cpu_s": server_cpu_s,
        "server_cpu_us_per_event": server_cpu_s
            .map(|s| if events > 0 { s * 1e6 / events as f64 } else { 0.0 }),
    }))
}

/// The end-of-run summary, one row per pair (failed pairs say so).
fn render_table(rows: &[Value]) -> String {
    let header = [
        "writers",
        "events/append",
        "events/s",
        "p50 ms",
        "p99 ms",
        "p99.9 ms",
        "read events/s",
        "catch-up events/s",
        "group 1c ev/s",
        "group 4c ev/s",
        "OCC",
        "read ok",
    ];
    let f0 = |v: &Value| v.as_f64().map_or("-".to_string(), |x| format!("{x:.0}"));
    let f2 = |v: &Value| v.as_f64().map_or("-".to_string(), |x| format!("{x:.2}"));
    let mut cells: Vec<Vec<String>> = vec![header.iter().map(|s| s.to_string()).collect()];
    for r in rows {
        let mut row = vec![r["writers"].to_string(), r["batch"].to_string()];
        if let Some(err) = r["failed"].as_str() {
            // Keep the table narrow: the full error is in the JSON line and on stderr.
            let short: String = err.chars().take(60).collect();
            row.push(format!("FAILED: {short}"));
            row.resize(header.len(), String::new());
        } else {
            row.extend([
                f0(&r["events_per_s"]),
                f2(&r["lat_p50_ms"]),
                f2(&r["lat_p99_ms"]),
                f2(&r["lat_p999_ms"]),
                f0(&r["read_events_per_s"]),
                f0(&r["catchup_events_per_s"]),
                f0(&r["group_1c_events_per_s"]),
                f0(&r["group_4c_events_per_s"]),
                r["occ_probe"].as_str().unwrap_or("-").to_string(),
                if r["read_matches_written"].as_bool() == Some(true) {
                    "yes"
                } else {
                    "NO"
                }
                .to_string(),
            ]);
        }
        cells.push(row);
    }
    let widths: Vec<usize> = (0..header.len())
        .map(|c| {
            cells
                .iter()
                .map(|r| r[c].chars().count())
                .max()
                .unwrap_or(0)
        })
        .collect();
    let line = |r: &[String]| {
        let parts: Vec<String> = r
            .iter()
            .zip(&widths)
            .map(|(s, w)| format!("{s:>w$}"))
            .collect();
        format!("| {} |\n", parts.join(" | "))
    };
    let mut s = line(&cells[0]);
    let sep: Vec<String> = widths.iter().map(|w| "-".repeat(*w)).collect();
    s.push_str(&format!("|-{}-|\n", sep.join("-|-")));
    for r in &cells[1..] {
        s.push_str(&line(r));
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn payload_is_exactly_the_requested_size() {
        for size in [0, 1, 2, 10, 40, 256, 1000, 4096] {
            for writer in [0, 7, 63] {
                assert_eq!(
                    payload_for(writer, size).len(),
                    size,
                    "size {size} writer {writer}"
                );
            }
        }
        let p = payload_for(3, 256);
        assert!(p.starts_with(b"{\"type\":\"BenchEvent\",\"writer\":3,\"pad\":\""));
        assert!(p.ends_with(b"\"}"));
        assert!(
            serde_json::from_slice::<Value>(&p).is_ok(),
            "a 256-byte payload is JSON"
        );
        assert_ne!(payload_for(1, 256), payload_for(2, 256));
    }

    #[test]
    fn expected_version_progression() {
        // Batch of 10: NO_STREAM, then EXACT 9, 19, ...
        let mut events = 0u64;
        let mut seen = Vec::new();
        for _ in 0..3 {
            seen.push(expected_for(events));
            events += 10;
        }
        assert_eq!(
            seen,
            vec![
                (ExpectedVersionKind::NoStream, 0),
                (ExpectedVersionKind::Exact, 9),
                (ExpectedVersionKind::Exact, 19),
            ]
        );
        assert_eq!(
            expected_for(1),
            (ExpectedVersionKind::Exact, 0)
        );
    }

    #[test]
    fn stale_expectation_is_really_stale() {
        assert_eq!(stale_expectation(0), None);
        assert_eq!(
            stale_expectation(1),
            Some((ExpectedVersionKind::NoStream, 0))
        );
        for n in [2, 10, 1000] {
            let stale = stale_expectation(n);
            assert_eq!(stale, Some((ExpectedVersionKind::Exact, 0)));
            assert_ne!(stale, Some(expected_for(n)), "never the true expectation");
        }
    }

    #[test]
    fn cpu_ticks_from_proc_stat() {
        let line = "4242 (strata serve) S 1 4242 4242 0 -1 4194560 1234 0 0 0 \
                    150 37 5 6 20 0 9 0 1000 123456 789 18446744073709551615";
        assert_eq!(parse_stat_ticks(line), Some(187));
        // A ')' inside the command name must not shift the fields.
        let tricky = "7 (a) b) R 1 7 7 0 -1 0 0 0 0 0 3 4 0 0 20 0 1 0 1 1 1";
        assert_eq!(parse_stat_ticks(tricky), Some(7));
        assert_eq!(parse_stat_ticks("garbage"), None);
        assert_eq!(parse_stat_ticks("1 (x) S 1 2"), None);
        // Our own process is readable and has a tick count.
        assert!(server_ticks(&[std::process::id()]).is_some());
        assert_eq!(server_ticks(&[]), None);
    }

    #[test]
    fn lists_and_table() {
        assert_eq!(
            parse_list::<usize>("1, 16,,64").expect("valid"),
            vec![1, 16, 64]
        );
        assert!(parse_list::<usize>("1,x").is_err());
        let ok = json!({"writers": 16, "batch": 10, "events_per_s": 1234.5, "lat_p50_ms": 1.0,
            "lat_p99_ms": 2.0, "lat_p999_ms": 3.0, "read_events_per_s": 99.0,
            "occ_probe": "rejected", "read_matches_written": true});
        let failed = json!({"writers": 1, "batch": 1, "failed": "connecting"});
        assert!(pair_passed(&ok));
        assert!(!pair_passed(&failed));
        let t = render_table(&[ok, failed]);
        assert_eq!(t.lines().count(), 4);
        assert!(t.contains("rejected") && t.contains("FAILED: connecting"));
    }
}
