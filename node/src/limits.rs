//! Every limit of the server (SPEC §8), named, with why it has its value. Requests over a
//! limit are answered with INVALID_ARGUMENT (a malformed request) or RESOURCE_EXHAUSTED
//! (a well-formed request the server will not take now), naming the limit.

/// Default largest event (data + metadata + type); configurable up to the hard maximum.
pub const EVENT_BYTES_MAX_DEFAULT: usize = 1024 * 1024;
/// Hard ceiling for `--max-event-bytes`: bounds one Raft entry and one snapshot frame.
pub const EVENT_BYTES_MAX_CEILING: usize = 16 * 1024 * 1024;
/// Events in one append: bounds one Raft entry's apply work.
pub const EVENTS_PER_APPEND_MAX: usize = 10_000;
/// Whole append request, encoded.
pub const APPEND_REQUEST_BYTES_MAX: usize = 32 * 1024 * 1024;
/// Event metadata.
pub const METADATA_BYTES_MAX: usize = 64 * 1024;
/// Stream name in bytes of UTF-8 (SPEC §2).
pub const STREAM_NAME_BYTES_MAX: usize = 256;
/// Event type in bytes of UTF-8 (SPEC §2).
pub const EVENT_TYPE_BYTES_MAX: usize = 256;
/// Content type string.
pub const CONTENT_TYPE_BYTES_MAX: usize = 256;
/// A `$all` stream-name regular expression, as text and compiled.
pub const STREAM_REGEX_BYTES_MAX: usize = 1024;
pub const STREAM_REGEX_COMPILED_BYTES_MAX: usize = 1024 * 1024;
/// Event types in one read filter.
pub const FILTER_EVENT_TYPES_MAX: usize = 256;

/// gRPC decode limit for client requests: one maximal append plus framing.
pub const GRPC_DECODE_BYTES_MAX: usize = APPEND_REQUEST_BYTES_MAX + 1024 * 1024;
/// gRPC encode limit for responses: one read page at most (see READ_PAGE_BYTES_MAX).
pub const GRPC_ENCODE_BYTES_MAX: usize = 64 * 1024 * 1024;
/// HTTP/2 streams per client connection: bounds per-connection concurrency.
pub const GRPC_CONCURRENT_STREAMS_MAX: u32 = 1024;
/// Default cap on open gRPC connections (clients and peers): each holds buffers and a
/// descriptor, so a flood of sockets must meet a wall before memory or `ulimit -n` does.
pub const GRPC_CONNECTIONS_MAX_DEFAULT: usize = 4096;
/// HTTP/2 pings on an idle client connection, and how long the answer may take before the
/// connection is closed: a client that vanished (no FIN) stops holding a connection slot
/// and its subscriptions within half a minute.
pub const GRPC_KEEPALIVE_INTERVAL_SECS: u64 = 10;
pub const GRPC_KEEPALIVE_TIMEOUT_SECS: u64 = 20;
/// Streams a client may reset before the server has accepted them, per connection: bounds
/// the HTTP/2 "rapid reset" attack (CVE-2023-44487), which opens and cancels streams to
/// make the server start work it never finishes.
pub const GRPC_PENDING_RESETS_MAX: usize = 50;
/// Client calls a node handles at once (`--max-calls-in-flight`), over all connections:
/// each holds its decoded request, HTTP/2 stream state and a task (~8 KiB measured under
/// a flood, plus its payload). Above the proposal queue plus the appends in flight, so
/// that the queue's own RESOURCE_EXHAUSTED is what a write burst meets first.
pub const GRPC_CALLS_IN_FLIGHT_MAX_DEFAULT: usize = 32_768;
const _: () = assert!(GRPC_CALLS_IN_FLIGHT_MAX_DEFAULT >= PROPOSAL_QUEUE_APPENDS_MAX + PROPOSALS_IN_FLIGHT_MAX * BATCH_APPENDS_MAX);
/// How long any gRPC handler but the Raft transport's may take before the call is
/// answered DEADLINE_EXCEEDED (indeterminate): above every wait inside (appends 10 s,
/// membership changes 30 s, a forced tier upload's own timeout), a backstop against a
/// call holding its resources for ever. Clients set shorter deadlines with grpc-timeout.
pub const GRPC_HANDLER_TIMEOUT_SECS: u64 = 600;
/// Request headers per call (the bearer token included).
pub const GRPC_HEADER_LIST_BYTES_MAX: u32 = 64 * 1024;

/// Appends waiting for the batcher. Beyond it: RESOURCE_EXHAUSTED with a retry-after; a
/// bounded queue keeps latency bounded instead of letting it grow without limit.
pub const PROPOSAL_QUEUE_APPENDS_MAX: usize = 16_384;
/// Payload bytes of the appends waiting for the batcher: with the count above, what a
/// burst of large appends can hold in memory before it is turned away.
pub const PROPOSAL_QUEUE_BYTES_MAX: usize = 256 * 1024 * 1024;
/// Live subscriptions a node serves at once (`--max-subscriptions`): each holds a task
/// and a bounded buffer, and HTTP/2 lets a client open a thousand per connection.
pub const SUBSCRIPTIONS_MAX_DEFAULT: usize = 10_000;
/// The retry-after hint of a subscription turned away: subscribers reconnect slowly.
pub const SUBSCRIPTION_RETRY_AFTER_MS: u64 = 1_000;
/// Appends in one Raft entry, and the bytes of their events: bounds one entry.
pub const BATCH_APPENDS_MAX: usize = 4096;
pub const BATCH_BYTES_MAX: usize = 8 * 1024 * 1024;
/// Raft entries proposed and not yet applied. While all are in flight the batcher keeps
/// collecting, which is what makes batches large under load (group commit).
pub const PROPOSALS_IN_FLIGHT_MAX: usize = 4;
/// How long the leader waits for an append's entry to apply before answering
/// DEADLINE_EXCEEDED (indeterminate).
pub const APPEND_APPLY_TIMEOUT_MS: u64 = 10_000;
/// Suggested back-off when the proposal queue is full.
pub const OVERLOAD_RETRY_AFTER_MS: u64 = 50;

/// Events per read response message, and their bytes.
pub const READ_PAGE_EVENTS_MAX: usize = 2048;
pub const READ_PAGE_BYTES_MAX: usize = 4 * 1024 * 1024;
/// A read's events go out in messages of about this many bytes (a page may take several):
/// buffers of this size are reused by the allocator, where a page-sized message (megabytes)
/// was fresh memory at each step (encoding it, copying it into the stream, receiving it),
/// its pages faulted in on every copy.
pub const READ_MESSAGE_BYTES: usize = 128 * 1024;
/// Events a filtered `$all` page may scan before it yields (continues with the next page).
pub const READ_SCAN_EVENTS_MAX: usize = 16_384;
/// Read response messages buffered per call: the producer waits for a slow consumer.
pub const READ_STREAM_BUFFER_MESSAGES: usize = 4;
/// Stream names per ListStreams page by default, and at most.
pub const LIST_STREAMS_PAGE_DEFAULT: usize = 100;
pub const LIST_STREAMS_PAGE_MAX: usize = 10_000;

/// How long a read waits for this node to apply a session token or a read index.
pub const READ_WAIT_TIMEOUT_MS: u64 = 5_000;
/// How long a request waits for a leader to be elected before UNAVAILABLE.
pub const LEADER_WAIT_TIMEOUT_MS: u64 = 5_000;
/// Attempts a follower makes to forward one append when the leader does not answer
/// (each after waiting for a new leader, see `LEADER_CHANGE_WAIT_MS`).
pub const FORWARD_ATTEMPTS_MAX: u32 = 3;
/// How long a follower waits for a new leader after forwarding failed: two of the longest
/// election timeouts.
pub const LEADER_CHANGE_WAIT_MS: u64 = 2 * strata_raft::ELECTION_TIMEOUT_MS_MAX;
/// Timeout of one cluster status probe of a member.
pub const MEMBER_PROBE_TIMEOUT_MS: u64 = 500;

const _: () = assert!(EVENT_BYTES_MAX_DEFAULT <= EVENT_BYTES_MAX_CEILING);
const _: () = assert!(EVENT_BYTES_MAX_CEILING <= APPEND_REQUEST_BYTES_MAX);
const _: () = assert!(APPEND_REQUEST_BYTES_MAX < GRPC_DECODE_BYTES_MAX);
const _: () = assert!(BATCH_BYTES_MAX <= strata_raft::RAFT_RPC_MESSAGE_BYTES_MAX);
const _: () = assert!(READ_PAGE_BYTES_MAX + EVENT_BYTES_MAX_CEILING < GRPC_ENCODE_BYTES_MAX);
const _: () = assert!(READ_MESSAGE_BYTES <= READ_PAGE_BYTES_MAX);
const _: () = assert!(BATCH_APPENDS_MAX <= PROPOSAL_QUEUE_APPENDS_MAX);
const _: () = assert!(APPEND_REQUEST_BYTES_MAX <= PROPOSAL_QUEUE_BYTES_MAX && PROPOSAL_QUEUE_BYTES_MAX <= u32::MAX as usize);

/// Shortest gossip secret accepted (a short one is guessable offline from one datagram).
pub const CLUSTER_SECRET_BYTES_MIN: usize = 16;
/// How long a membership change may take on the leader before the call fails.
pub const MEMBERSHIP_CHANGE_TIMEOUT_MS: u64 = 30_000;
/// A learner is promoted once the leader knows it holds the log up to this many entries
/// behind the leader's last entry.
pub const PROMOTE_LAG_ENTRIES_MAX: u64 = 100;
/// How long a leadership transfer may take before the call (or the SIGTERM hand-over)
/// gives up.
pub const TRANSFER_LEADER_TIMEOUT_MS: u64 = 5_000;
/// Pause before a leader proposes again after openraft refused a proposal while this node
/// still leads (a new leader settling into its term); retried until `LEADER_CHANGE_WAIT_MS`.
pub const LOCAL_RETRY_PAUSE_MS: u64 = 50;

/// Streams one subscription filter may name.
pub const FILTER_STREAMS_MAX: usize = 256;
/// Bytes of a subscription's JSON metadata or data pattern.
pub const FILTER_PATTERN_BYTES_MAX: usize = 64 * 1024;
/// Messages (a batch of events, or a marker) buffered per subscription: a consumer that
/// stops reading holds the subscription's loop here, never the writers. With
/// `SUBSCRIPTION_MESSAGE_BYTES_MAX` this bounds a subscription's buffered events.
pub const SUBSCRIPTION_BUFFER_MESSAGES: usize = 8;
/// Event bytes per subscription message (events are batched up to this during catch-up).
pub const SUBSCRIPTION_MESSAGE_BYTES_MAX: usize = 1024 * 1024;
/// How often a subscription sends a Checkpoint when its position has moved.
pub const SUBSCRIPTION_CHECKPOINT_INTERVAL_MS: u64 = 1_000;
/// A live subscription this far behind the head says FellBehind and catches up again.
pub const SUBSCRIPTION_FELL_BEHIND_EVENTS: u64 = 10_000;

/// Default largest aggregate snapshot state; configurable up to the ceiling
/// (`--max-snapshot-bytes`). A snapshot is one Raft entry and is kept in the replicated
/// state, at most `SNAPSHOTS_PER_STREAM_MAX` per stream.
pub const SNAPSHOT_STATE_BYTES_MAX_DEFAULT: usize = 1024 * 1024;
pub const SNAPSHOT_STATE_BYTES_MAX_CEILING: usize = 16 * 1024 * 1024;
const _: () = assert!(SNAPSHOT_STATE_BYTES_MAX_CEILING <= strata_raft::RAFT_RPC_MESSAGE_BYTES_MAX / 2);

/// Bytes of a persistent subscription group's name (its parked stream `$parked-{name}`
/// must be a valid stream name).
pub const GROUP_NAME_BYTES_MAX: usize = 128;
/// Consumers connected to one group at once (`max_consumers` may be set up to this).
pub const GROUP_CONSUMERS_MAX: u32 = 64;
/// Unacked deliveries per consumer (`max_in_flight` may be set up to this).
pub const GROUP_IN_FLIGHT_MAX: u32 = 10_000;
/// Events a group's runtime holds (in flight, waiting for a retry or being parked), and
/// their bytes: it reads more from storage only below both, so a group whose consumers
/// stall costs bounded memory on the leader and never slows appends.
pub const GROUP_BUFFER_EVENTS_MAX: usize = 20_000;
pub const GROUP_BUFFER_BYTES_MAX: usize = 64 * 1024 * 1024;
/// Requests (connects, acks, nacks, info) queued for one group's runtime; a consumer that
/// sends faster waits (its stream is not read meanwhile).
pub const GROUP_MAILBOX_MESSAGES: usize = 1024;
/// How often a group's runtime looks for expired deliveries, due retries, a due
/// checkpoint and lost leadership.
pub const GROUP_TICK_MS: u64 = 100;
/// How often a group's runtime has a quorum confirm that this node still leads.
pub const GROUP_LEADERSHIP_CHECK_MS: u64 = 500;
/// Events one storage read of a group's runtime takes at most.
pub const GROUP_READ_PAGE_EVENTS: usize = 1024;
/// Ready events one dispatch round looks at at most (pinned groups skip events whose
/// stream has an earlier event in flight).
pub const GROUP_DISPATCH_SCAN_MAX: usize = 4096;
/// Upper bounds of group settings: a message timeout, a retry delay, a retry count.
pub const GROUP_TIMEOUT_MS_MAX: u64 = 24 * 3600 * 1000;
pub const GROUP_RETRY_COUNT_MAX: u32 = 10_000;
/// How long the leader waits before appending a parked event again after a failure.
pub const GROUP_PARK_RETRY_MS: u64 = 1_000;

/// Password checks and hashes (logins, `user add`) running at once on a node: argon2id
/// takes ~19 MiB and tens of ms of CPU each, so a login flood meets this wall first.
pub const LOGINS_CONCURRENT_MAX: usize = 4;
/// How long a login waits for a free check slot before RESOURCE_EXHAUSTED.
pub const LOGIN_QUEUE_WAIT_MS: u64 = 2_000;
/// How long a token from `strata login` is valid by default (`--token-ttl-secs`), and at most.
pub const TOKEN_TTL_SECS_DEFAULT: u64 = 3_600;
pub const TOKEN_TTL_SECS_MAX: u64 = 7 * 24 * 3_600;
