//! The client commands of the `strata` binary (SPEC §5): append, read, read-all, streams,
//! stream-info (the cluster manager's commands are in [`crate::manager`]). Every command takes `--endpoints` (any node: the
//! server forwards to the leader) and `--json`.
//!
//! Exit status: 0 success, 1 usage or connection error, 3 wrong expected version,
//! 4 not found.

use std::io::Read as _;
use std::time::Duration;

use base64::Engine as _;
use clap::Args;
use serde_json::json;
use strata_proto::v1::streams_client::StreamsClient;
use strata_proto::v1::{
    AppendRequest, Consistency, Direction, ExpectedVersionKind, ListStreamsRequest, ProposedEvent, ReadAllRequest, ReadFilter,
    ReadStreamRequest, RecordedEvent, StreamInfoRequest, DeleteStreamRequest, SetStreamMetadataRequest,
};
use strata_security::AuthChannel;
use tonic::transport::Endpoint;

use crate::error::detail_of;
use crate::limits::GRPC_DECODE_BYTES_MAX;

/// How long the client waits to connect to one endpoint before trying the next.
const CONNECT_TIMEOUT_MS: u64 = 2_000;
/// Largest response message the client accepts (a read page).
const CLIENT_DECODE_BYTES_MAX: usize = 64 * 1024 * 1024;

/// Options every client command takes.
#[derive(Args, Debug, Clone)]
pub struct ClientOptions {
    /// Nodes to talk to, tried in order until one answers.
    #[arg(long, env = "STRATA_ENDPOINTS", value_delimiter = ',', default_value = "127.0.0.1:7701", global = true)]
    pub endpoints: Vec<String>,
    /// Print machine-readable JSON (one object, or one line per event).
    #[arg(long, global = true)]
    pub json: bool,
    #[command(flatten)]
    pub tls: ClientTlsOptions,
    #[command(flatten)]
    pub auth: ClientAuthOptions,
}

/// Who the client says it is: a token from `strata login`.
#[derive(Args, Debug, Clone)]
pub struct ClientAuthOptions {
    /// A bearer token (from `strata login --print`). Without it, the token file's.
    #[arg(long, env = "STRATA_TOKEN", hide_env_values = true, global = true)]
    pub token: Option<crate::config::Secret>,
    /// Where `strata login` saves the token and other commands read it
    /// (default: ~/.strata/token).
    #[arg(long, env = "STRATA_TOKEN_FILE", global = true)]
    pub token_file: Option<std::path::PathBuf>,
}

impl ClientAuthOptions {
    /// The token file: `--token-file`, else ~/.strata/token.
    pub fn token_path(&self) -> std::path::PathBuf {
        self.token_file.clone().unwrap_or_else(|| {
            std::path::PathBuf::from(std::env::var_os("HOME").unwrap_or_else(|| ".".into())).join(".strata").join("token")
        })
    }

    /// The token to send: `--token`, else the token file's when it exists, else none.
    pub fn token(&self) -> Result<Option<String>, CliError> {
        if let Some(token) = &self.token {
            return Ok(Some(token.0.trim().to_string()));
        }
        let path = self.token_path();
        match std::fs::read_to_string(&path) {
            Ok(token) if !token.trim().is_empty() => Ok(Some(token.trim().to_string())),
            Ok(_) => Ok(None),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound && self.token_file.is_none() => Ok(None),
            Err(e) => Err(CliError::Usage(format!("cannot read the token file {}: {e}", path.display()))),
        }
    }

    /// What every call carries.
    pub fn bearer(&self) -> Result<strata_security::BearerToken, CliError> {
        strata_security::BearerToken::new(self.token()?.as_deref()).map_err(|_| CliError::Usage("the token is not a valid header value".into()))
    }
}

/// How clients reach a node with TLS on.
#[derive(Args, Debug, Clone)]
pub struct ClientTlsOptions {
    /// The cluster CA (PEM): connect with TLS and verify the node against it. Without
    /// it, plaintext (a node started with `--insecure`).
    #[arg(long = "ca", env = "STRATA_TLS_CA", global = true)]
    pub ca: Option<std::path::PathBuf>,
    /// The name the node's certificate must carry (every node certificate carries the
    /// reserved node name).
    #[arg(long = "tls-name", env = "STRATA_TLS_SERVER_NAME", default_value = strata_security::NODE_NAME_DEFAULT, global = true)]
    pub server_name: String,
    /// A client certificate to present (with `--key`): a node certificate makes the
    /// caller the cluster's own (admin, no token needed), as in a pod's preStop hook.
    /// The same variables as `strata serve`'s, so the CLI inside a node's container
    /// presents the node's certificate.
    #[arg(long = "cert", env = "STRATA_TLS_CERT", global = true, requires = "key")]
    pub cert: Option<std::path::PathBuf>,
    #[arg(long = "key", env = "STRATA_TLS_KEY", global = true)]
    pub key: Option<std::path::PathBuf>,
}

impl ClientTlsOptions {
    /// The TLS set-up these options name, or None for plaintext.
    pub fn client_tls(&self) -> Result<Option<strata_security::ClientTls>, CliError> {
        let Some(ca) = &self.ca else { return Ok(None) };
        let tls = match (&self.cert, &self.key) {
            (Some(cert), Some(key)) => {
                let files = strata_security::TlsFiles { cert: cert.clone(), key: key.clone(), ca: ca.clone() };
                strata_security::NodeTls::load(files, &self.server_name)
                    .and_then(strata_security::ClientTls::for_node)
                    .map(|tls| tls.with_server_name(&self.server_name))
            }
            _ => strata_security::ClientTls::for_client(ca, &self.server_name),
        };
        tls.map(Some).map_err(|e| CliError::Usage(e.to_string()))
    }
}

/// `host:port` as a URL (already-URL endpoints stay as they are).
pub fn endpoint_url(endpoint: &str) -> String {
    if endpoint.contains("://") { endpoint.to_string() } else { format!("http://{endpoint}") }
}

/// A failed client command, with its exit status.
#[derive(Debug, thiserror::Error)]
pub enum CliError {
    #[error("{0}")]
    Usage(String),
    #[error("cannot reach any endpoint: {0}")]
    Connection(String),
    #[error("wrong expected version: stream `{stream}` expected {expected}, actual {actual}")]
    WrongExpectedVersion { stream: String, expected: String, actual: String },
    #[error("{0}")]
    NotFound(String),
    #[error("server error ({code:?}): {message}")]
    Server { code: tonic::Code, message: String },
}

impl CliError {
    pub fn exit_code(&self) -> i32 {
        match self {
            CliError::WrongExpectedVersion { .. } => 3,
            CliError::NotFound(_) => 4,
            _ => 1,
        }
    }

    /// The `--json` form of the error, where SPEC §5 fixes one.
    pub fn to_json(&self) -> Option<serde_json::Value> {
        match self {
            CliError::WrongExpectedVersion { stream, expected, actual } => Some(json!({
                "error": "wrong_expected_version", "stream": stream, "expected": expected,
                "actual_version": actual.parse::<u64>().map_or_else(|_| json!(actual), |v| json!(v)),
            })),
            CliError::NotFound(message) => Some(json!({"error": "not_found", "message": message})),
            _ => None,
        }
    }
}

impl From<tonic::Status> for CliError {
    fn from(status: tonic::Status) -> Self {
        let detail = detail_of(&status);
        match (status.code(), detail) {
            (tonic::Code::FailedPrecondition, Some(d)) if d.kind == "wrong_expected_version" => CliError::WrongExpectedVersion {
                stream: d.stream,
                expected: d.expected,
                actual: d.actual_version.map_or_else(|| "no_stream".to_string(), |v| v.to_string()),
            },
            (tonic::Code::NotFound, _) => CliError::NotFound(status.message().to_string()),
            (tonic::Code::Unauthenticated, _) => CliError::Server {
                code: tonic::Code::Unauthenticated,
                message: format!("{} (log in with `strata login --user <name>`, or pass --token)", status.message()),
            },
            (tonic::Code::Unavailable, None) if status.message().contains("connect") => {
                CliError::Connection(status.message().to_string())
            }
            // What a plaintext client gets from a node that serves TLS.
            (tonic::Code::Unknown, None) if status.message().contains("transport error") => CliError::Connection(format!(
                "{} (if the cluster serves TLS, pass --ca <cluster CA> or set STRATA_TLS_CA)",
                status.message()
            )),
            (code, _) => CliError::Server { code, message: status.message().to_string() },
        }
    }
}

/// Connects to the first of `options.endpoints` that answers.
pub async fn connect(options: &ClientOptions) -> Result<AuthChannel, CliError> {
    let tls = options.tls.client_tls()?;
    let bearer = options.auth.bearer()?;
    let mut failures = Vec::new();
    for endpoint in &options.endpoints {
        let target = Endpoint::from_shared(endpoint_url(endpoint))
            .map_err(|e| CliError::Usage(format!("bad endpoint `{endpoint}`: {e}")))?
            .connect_timeout(Duration::from_millis(CONNECT_TIMEOUT_MS))
            .tcp_nodelay(true);
        let attempt = strata_security::connect(target, tls.as_ref()).await;
        match attempt {
            Ok(channel) => return Ok(bearer.on(channel)),
            Err(e) => failures.push(format!("{endpoint}: {e}")),
        }
    }
    Err(CliError::Connection(failures.join("; ")))
}

pub fn streams_client(channel: AuthChannel) -> StreamsClient<AuthChannel> {
    StreamsClient::new(channel)
        .max_decoding_message_size(CLIENT_DECODE_BYTES_MAX)
        .max_encoding_message_size(GRPC_DECODE_BYTES_MAX)
}

/// `--expected-version`: any | no-stream | exists | <n>.
pub fn parse_expected_version(value: &str) -> Result<(ExpectedVersionKind, u64), String> {
    match value {
        "any" => Ok((ExpectedVersionKind::Any, 0)),
        "no-stream" | "no_stream" => Ok((ExpectedVersionKind::NoStream, 0)),
        "exists" | "stream-exists" | "stream_exists" => Ok((ExpectedVersionKind::StreamExists, 0)),
        n => n
            .parse::<u64>()
            .map(|v| (ExpectedVersionKind::Exact, v))
            .map_err(|_| format!("expected any, no-stream, exists or a version number, got `{value}`")),
    }
}

/// `--consistency`: linearizable | local | session.
pub fn parse_consistency(value: &str) -> Result<Consistency, String> {
    match value {
        "linearizable" => Ok(Consistency::Linearizable),
        "local" => Ok(Consistency::Local),
        "session" => Ok(Consistency::Session),
        _ => Err(format!("expected linearizable, local or session, got `{value}`")),
    }
}

#[derive(Args, Debug)]
pub struct AppendArgs {
    pub stream: String,
    /// any | no-stream | exists | <version>
    #[arg(long, default_value = "any", value_parser = parse_expected_version)]
    pub expected_version: (ExpectedVersionKind, u64),
    /// Event type (required unless --events-file).
    #[arg(long = "type")]
    pub event_type: Option<String>,
    /// Event data: JSON text, @file, or - for standard input.
    #[arg(long)]
    pub data: Option<String>,
    /// Event metadata (JSON text).
    #[arg(long)]
    pub metadata: Option<String>,
    /// Event id (UUID); generated by the server when omitted.
    #[arg(long)]
    pub id: Option<String>,
    /// Content type; default application/json when the data is JSON.
    #[arg(long)]
    pub content_type: Option<String>,
    /// Several events, one JSON object per line: {"type", "data", "metadata"?, "id"?}.
    #[arg(long, conflicts_with_all = ["event_type", "data", "id"])]
    pub events_file: Option<String>,
}

#[derive(Args, Debug)]
pub struct ReadArgs {
    pub stream: String,
    /// First version to read (default: the start, or the end with --backwards).
    #[arg(long)]
    pub from: Option<u64>,
    #[arg(long)]
    pub backwards: bool,
    #[arg(long)]
    pub limit: Option<u64>,
    #[arg(long, default_value = "linearizable", value_parser = parse_consistency)]
    pub consistency: Consistency,
    /// Commit token for --consistency session.
    #[arg(long, default_value = "")]
    pub session_token: String,
}

#[derive(Args, Debug)]
pub struct SubscribeArgs {
    /// A stream, or `$all`.
    pub stream: String,
    /// `start`, `end`, or a version (stream) / position ($all) to start at, inclusive.
    #[arg(long, default_value = "start")]
    pub from: String,
    #[command(flatten)]
    pub filter: FilterArgs,
    /// Also print the CaughtUp, Checkpoint and FellBehind markers (to stderr).
    #[arg(long)]
    pub markers: bool,
    /// Be served by the leader rather than by the node you connect to.
    #[arg(long)]
    pub follow_leader: bool,
}

/// The event filter of subscriptions and persistent groups.
#[derive(Args, Debug, Clone)]
pub struct FilterArgs {
    /// Only these streams (repeatable; for `$all`).
    #[arg(long = "stream")]
    pub streams: Vec<String>,
    #[arg(long, default_value = "")]
    pub stream_prefix: String,
    /// Only these event types (repeatable).
    #[arg(long = "type")]
    pub event_types: Vec<String>,
    /// Only events whose metadata contains this JSON object.
    #[arg(long, default_value = "")]
    pub metadata_pattern: String,
    /// Only events whose data contains this JSON object.
    #[arg(long, default_value = "")]
    pub data_pattern: String,
}

impl FilterArgs {
    pub fn to_proto(&self) -> strata_proto::v1::SubscriptionFilter {
        strata_proto::v1::SubscriptionFilter {
            streams: self.streams.clone(),
            stream_prefix: self.stream_prefix.clone(),
            event_types: self.event_types.clone(),
            metadata_pattern: self.metadata_pattern.clone(),
            data_pattern: self.data_pattern.clone(),
        }
    }
}

/// `--from`: start | end | <n>.
pub fn parse_from(value: &str) -> Result<(strata_proto::v1::SubscribeFrom, u64), CliError> {
    use strata_proto::v1::SubscribeFrom;
    match value {
        "start" => Ok((SubscribeFrom::Start, 0)),
        "end" => Ok((SubscribeFrom::End, 0)),
        n => Ok((SubscribeFrom::Revision, n.parse().map_err(|_| CliError::Usage(format!("--from takes start, end or a number, not `{n}`")))?)),
    }
}

#[derive(Args, Debug)]
pub struct ReadAllArgs {
    /// First position to read (default: the start, or the end with --backwards).
    #[arg(long)]
    pub from: Option<u64>,
    #[arg(long)]
    pub backwards: bool,
    #[arg(long)]
    pub limit: Option<u64>,
    /// Only these event types (repeatable).
    #[arg(long = "type")]
    pub event_types: Vec<String>,
    #[arg(long, default_value = "")]
    pub stream_prefix: String,
    #[arg(long, default_value = "")]
    pub stream_regex: String,
    #[arg(long, default_value = "linearizable", value_parser = parse_consistency)]
    pub consistency: Consistency,
    #[arg(long, default_value = "")]
    pub session_token: String,
}

#[derive(Args, Debug)]
pub struct StreamsArgs {
    #[arg(long, default_value = "")]
    pub prefix: String,
    /// Streams to list at most.
    #[arg(long, default_value_t = 1000)]
    pub limit: u32,
}

#[derive(Args, Debug)]
pub struct StreamInfoArgs {
    pub stream: String,
}

#[derive(clap::Args, Debug)]
pub struct DeleteArgs {
    pub stream: String,
    /// A tombstone: the stream can never be written again (default: a soft delete; later
    /// appends continue its versions).
    #[arg(long)]
    pub hard: bool,
    /// Expected version: any (default), no-stream, exists, or a version number.
    #[arg(long, default_value = "any")]
    pub expected: String,
}

#[derive(clap::Args, Debug)]
pub struct RetentionArgs {
    pub stream: String,
    /// Read only events younger than this (`90s`, `15m`, `24h`, `7d`); omit for no limit.
    #[arg(long, value_parser = crate::config::parse_duration)]
    pub max_age: Option<std::time::Duration>,
    /// Read only the newest this many events; omit for no limit.
    #[arg(long)]
    pub max_count: Option<u64>,
}

pub(crate) fn read_data_argument(value: &str) -> Result<Vec<u8>, CliError> {
    if value == "-" {
        let mut data = Vec::new();
        std::io::stdin().read_to_end(&mut data).map_err(|e| CliError::Usage(format!("cannot read stdin: {e}")))?;
        return Ok(data);
    }
    if let Some(path) = value.strip_prefix('@') {
        return std::fs::read(path).map_err(|e| CliError::Usage(format!("cannot read `{path}`: {e}")));
    }
    Ok(value.as_bytes().to_vec())
}

pub(crate) fn content_type_for(data: &[u8], explicit: &Option<String>) -> String {
    match explicit {
        Some(content_type) => content_type.clone(),
        None if data.is_empty() || serde_json::from_slice::<serde_json::Value>(data).is_ok() => "application/json".into(),
        None => "application/octet-stream".into(),
    }
}

fn events_from_file(path: &str) -> Result<Vec<ProposedEvent>, CliError> {
    let text = std::fs::read_to_string(path).map_err(|e| CliError::Usage(format!("cannot read `{path}`: {e}")))?;
    let mut events = Vec::new();
    for (number, line) in text.lines().enumerate().filter(|(_, l)| !l.trim().is_empty()) {
        let value: serde_json::Value = serde_json::from_str(line)
            .map_err(|e| CliError::Usage(format!("{path}:{}: not JSON: {e}", number + 1)))?;
        let event_type = value["type"]
            .as_str()
            .ok_or_else(|| CliError::Usage(format!("{path}:{}: missing \"type\"", number + 1)))?;
        let data = match &value["data"] {
            serde_json::Value::Null => Vec::new(),
            serde_json::Value::String(s) => s.as_bytes().to_vec(),
            other => other.to_string().into_bytes(),
        };
        let metadata = match &value["metadata"] {
            serde_json::Value::Null => Vec::new(),
            other => other.to_string().into_bytes(),
        };
        events.push(ProposedEvent {
            id: value["id"].as_str().unwrap_or_default().to_string(),
            r#type: event_type.to_string(),
            content_type: content_type_for(&data, &None),
            data: data.into(),
            metadata: metadata.into(),
        });
    }
    Ok(events)
}

pub async fn append(options: &ClientOptions, args: AppendArgs) -> Result<(), CliError> {
    let events = match &args.events_file {
        Some(path) => events_from_file(path)?,
        None => {
            let event_type = args.event_type.clone().ok_or_else(|| CliError::Usage("--type is required".into()))?;
            let data = match &args.data {
                Some(value) => read_data_argument(value)?,
                None => Vec::new(),
            };
            vec![ProposedEvent {
                id: args.id.clone().unwrap_or_default(),
                r#type: event_type,
                content_type: content_type_for(&data, &args.content_type),
                data: data.into(),
                metadata: args.metadata.clone().unwrap_or_default().into_bytes().into(),
            }]
        }
    };
    let (kind, version) = args.expected_version;
    let request = AppendRequest { stream: args.stream.clone(), expected_kind: kind as i32, expected_version: version, events };
    let response = streams_client(connect(options).await?).append(request).await?.into_inner();
    if options.json {
        println!(
            "{}",
            json!({
                "stream": response.stream, "first_version": response.first_version, "last_version": response.last_version,
                "first_position": response.first_position, "last_position": response.last_position,
                "commit_token": response.commit_token, "idempotent_replay": response.idempotent_replay,
            })
        );
    } else {
        println!(
            "appended to {} versions {}..{} positions {}..{}{} (commit token {})",
            response.stream,
            response.first_version,
            response.last_version,
            response.first_position,
            response.last_position,
            if response.idempotent_replay { " [idempotent replay: already written]" } else { "" },
            response.commit_token
        );
    }
    Ok(())
}

/// One event as JSON (SPEC §5 shape): data embedded as JSON when it is JSON, else base64.
pub fn event_json(event: &RecordedEvent) -> serde_json::Value {
    let as_json = |bytes: &[u8]| -> serde_json::Value {
        if bytes.is_empty() {
            return serde_json::Value::Null;
        }
        serde_json::from_slice(bytes).unwrap_or_else(|_| json!(base64::engine::general_purpose::STANDARD.encode(bytes)))
    };
    let data = if event.content_type.contains("json") {
        as_json(&event.data)
    } else {
        json!(base64::engine::general_purpose::STANDARD.encode(&event.data))
    };
    json!({
        "stream": event.stream, "version": event.version, "position": event.position, "id": event.id,
        "type": event.r#type, "data": data, "metadata": as_json(&event.metadata),
        "created": format_unix_ms(event.created_unix_ms),
    })
}

pub(crate) fn print_event(event: &RecordedEvent, as_json: bool) {
    if as_json {
        println!("{}", event_json(event));
        return;
    }
    let data = String::from_utf8(event.data.to_vec())
        .unwrap_or_else(|_| format!("<{} bytes, base64 {}>", event.data.len(), base64::engine::general_purpose::STANDARD.encode(&event.data)));
    println!(
        "{}@{}  #{}  {}  {}  {}  {}",
        event.stream,
        event.version,
        event.position,
        format_unix_ms(event.created_unix_ms),
        event.r#type,
        event.id,
        data
    );
}

pub async fn read(options: &ClientOptions, args: ReadArgs) -> Result<(), CliError> {
    let request = ReadStreamRequest {
        stream: args.stream,
        from_version: args.from.unwrap_or(0),
        from_end: args.backwards && args.from.is_none(),
        direction: if args.backwards { Direction::Backward } else { Direction::Forward } as i32,
        max_count: args.limit.unwrap_or(0),
        consistency: args.consistency as i32,
        session_token: args.session_token,
    };
    let stream = streams_client(connect(options).await?).read_stream(request).await?.into_inner();
    print_events(stream, options.json).await
}

pub async fn read_all(options: &ClientOptions, args: ReadAllArgs) -> Result<(), CliError> {
    let request = ReadAllRequest {
        from_position: args.from.unwrap_or(0),
        from_end: args.backwards && args.from.is_none(),
        direction: if args.backwards { Direction::Backward } else { Direction::Forward } as i32,
        max_count: args.limit.unwrap_or(0),
        filter: Some(ReadFilter { stream_prefix: args.stream_prefix, event_types: args.event_types, stream_regex: args.stream_regex }),
        consistency: args.consistency as i32,
        session_token: args.session_token,
    };
    let stream = streams_client(connect(options).await?).read_all(request).await?.into_inner();
    print_events(stream, options.json).await
}

/// `strata subscribe`: prints every matching event as it comes, history then live, until
/// interrupted.
pub async fn subscribe(options: &ClientOptions, args: SubscribeArgs) -> Result<(), CliError> {
    use strata_proto::v1::subscribe_response::Kind;
    use strata_proto::v1::SubscribeRequest;
    let (from, from_revision) = parse_from(&args.from)?;
    let request = SubscribeRequest {
        stream: args.stream,
        from: from as i32,
        from_revision,
        filter: Some(args.filter.to_proto()),
        follow_leader: args.follow_leader,
    };
    let channel = connect(options).await?;
    let mut client = strata_proto::v1::subscriptions_client::SubscriptionsClient::new(channel).max_decoding_message_size(CLIENT_DECODE_BYTES_MAX);
    let mut stream = client.subscribe(request).await?.into_inner();
    while let Some(message) = stream.message().await? {
        match message.kind {
            Some(Kind::Events(batch)) => batch.events.iter().for_each(|event| print_event(event, options.json)),
            Some(Kind::CaughtUp(m)) if args.markers => eprintln!("caught up at {:?}", m.position),
            Some(Kind::Checkpoint(m)) if args.markers => eprintln!("checkpoint {:?}", m.position),
            Some(Kind::FellBehind(m)) if args.markers => eprintln!("fell behind at {} (head {})", m.position, m.head_position),
            _ => {}
        }
    }
    Ok(())
}

/// Prints every event of a read as it arrives (the server streams pages).
async fn print_events(mut stream: tonic::Streaming<strata_proto::v1::ReadResponse>, as_json: bool) -> Result<(), CliError> {
    while let Some(message) = stream.message().await? {
        for event in &message.events {
            print_event(event, as_json);
        }
    }
    Ok(())
}

pub async fn streams(options: &ClientOptions, args: StreamsArgs) -> Result<(), CliError> {
    let mut client = streams_client(connect(options).await?);
    let mut page_token = String::new();
    let mut listed = 0u32;
    while listed < args.limit {
        let request = ListStreamsRequest {
            prefix: args.prefix.clone(),
            page_token: page_token.clone(),
            limit: (args.limit - listed).min(1000),
            consistency: Consistency::Linearizable as i32,
            session_token: String::new(),
        };
        let page = client.list_streams(request).await?.into_inner();
        for stream in &page.streams {
            if options.json {
                println!("{}", json!({"stream": stream.stream, "head_version": stream.head_version, "event_count": stream.event_count, "updated": format_unix_ms(stream.updated_unix_ms)}));
            } else {
                println!("{}  head={}  events={}", stream.stream, stream.head_version, stream.event_count);
            }
        }
        listed += page.streams.len() as u32;
        if page.next_page_token.is_empty() {
            break;
        }
        page_token = page.next_page_token;
    }
    Ok(())
}

pub async fn stream_info(options: &ClientOptions, args: StreamInfoArgs) -> Result<(), CliError> {
    let request = StreamInfoRequest { stream: args.stream, consistency: Consistency::Linearizable as i32, session_token: String::new() };
    let info = streams_client(connect(options).await?).stream_info(request).await?.into_inner();
    if options.json {
        println!(
            "{}",
            json!({
                "stream": info.stream, "head_version": info.head_version, "event_count": info.event_count,
                "created": format_unix_ms(info.created_unix_ms), "updated": format_unix_ms(info.updated_unix_ms),
                "first_position": info.first_position, "last_position": info.last_position, "tiered": info.tiered,
                "max_age_ms": info.max_age_ms, "max_count": info.max_count,
                "first_visible_version": info.first_visible_version, "deleted": info.deleted,
            })
        );
    } else {
        println!("stream:       {}", info.stream);
        println!("head version: {}", info.head_version);
        println!("events:       {}", info.event_count);
        println!("created:      {}", format_unix_ms(info.created_unix_ms));
        println!("updated:      {}", format_unix_ms(info.updated_unix_ms));
        println!("positions:    {}..{}", info.first_position, info.last_position);
        println!("tier:         {}", if info.tiered { "tiered" } else { "hot" });
        if info.max_age_ms.is_some() || info.max_count.is_some() || info.first_visible_version > 0 || info.deleted {
            let age = info.max_age_ms.map_or("none".to_string(), |ms| format!("{} s", ms / 1000));
            let count = info.max_count.map_or("none".to_string(), |c| c.to_string());
            println!("retention:    max age {age}, max count {count}; readable from version {}", info.first_visible_version);
        }
        if info.deleted {
            println!("deleted:      yes (soft; an append re-creates it)");
        }
    }
    Ok(())
}

pub async fn delete(options: &ClientOptions, args: DeleteArgs) -> Result<(), CliError> {
    let (kind, version) = parse_expected_version(&args.expected).map_err(CliError::Usage)?;
    let request = DeleteStreamRequest { stream: args.stream, expected_kind: kind as i32, expected_version: version, hard: args.hard };
    let reply = streams_client(connect(options).await?).delete_stream(request).await?.into_inner();
    if options.json {
        println!(
            "{}",
            json!({"stream": reply.stream, "truncate_before": reply.truncate_before, "hard": reply.hard, "commit_token": reply.commit_token})
        );
    } else {
        let how = if reply.hard { "hard-deleted (tombstone)" } else { "deleted" };
        println!("{} {how}: versions below {} are no longer read", reply.stream, reply.truncate_before);
    }
    Ok(())
}

pub async fn retention(options: &ClientOptions, args: RetentionArgs) -> Result<(), CliError> {
    let request = SetStreamMetadataRequest {
        stream: args.stream,
        max_age_ms: args.max_age.map(|d| d.as_millis() as u64),
        max_count: args.max_count,
    };
    let reply = streams_client(connect(options).await?).set_stream_metadata(request).await?.into_inner();
    if options.json {
        println!("{}", json!({"stream": reply.stream, "commit_token": reply.commit_token}));
    } else {
        println!("retention of {} set", reply.stream);
    }
    Ok(())
}

/// RFC 3339 UTC with milliseconds, from Unix milliseconds (no time-zone database needed).
pub fn format_unix_ms(unix_ms: i64) -> String {
    let seconds = unix_ms.div_euclid(1000);
    let millis = unix_ms.rem_euclid(1000);
    let days = seconds.div_euclid(86_400);
    let second_of_day = seconds.rem_euclid(86_400);
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let day_of_era = z.rem_euclid(146_097);
    let year_of_era = (day_of_era - day_of_era / 1460 + day_of_era / 36_524 - day_of_era / 146_096) / 365;
    let day_of_year = day_of_era - (365 * year_of_era + year_of_era / 4 - year_of_era / 100);
    let month_index = (5 * day_of_year + 2) / 153;
    let day = day_of_year - (153 * month_index + 2) / 5 + 1;
    let month = if month_index < 10 { month_index + 3 } else { month_index - 9 };
    let year = year_of_era + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{millis:03}Z",
        second_of_day / 3600,
        (second_of_day % 3600) / 60,
        second_of_day % 60
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timestamps_format_as_rfc3339() {
        assert_eq!(format_unix_ms(0), "1970-01-01T00:00:00.000Z");
        assert_eq!(format_unix_ms(1_700_000_000_123), "2023-11-14T22:13:20.123Z");
        assert_eq!(format_unix_ms(951_782_400_000), "2000-02-29T00:00:00.000Z");
    }

    #[test]
    fn expected_versions_parse() {
        assert_eq!(parse_expected_version("any").unwrap().0, ExpectedVersionKind::Any);
        assert_eq!(parse_expected_version("no-stream").unwrap().0, ExpectedVersionKind::NoStream);
        assert_eq!(parse_expected_version("exists").unwrap().0, ExpectedVersionKind::StreamExists);
        assert_eq!(parse_expected_version("7").unwrap(), (ExpectedVersionKind::Exact, 7));
        assert!(parse_expected_version("latest").is_err());
    }

    #[test]
    fn wrong_expected_version_status_maps_to_exit_3() {
        let status = crate::error::ApiError::WrongExpectedVersion { stream: "s".into(), expected: "0".into(), actual: Some(4) }.into_status();
        let error = CliError::from(status);
        assert_eq!(error.exit_code(), 3);
        assert_eq!(error.to_json().unwrap()["actual_version"], 4);
        let missing = CliError::from(crate::error::ApiError::StreamNotFound { stream: "s".into() }.into_status());
        assert_eq!(missing.exit_code(), 4);
    }
}
