//! Prometheus metrics of one node, served at `/metrics`.

use prometheus::{
    Encoder, Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry, TextEncoder,
};

/// Every metric the node exports.
pub struct Metrics {
    registry: Registry,
    pub appends_total: IntCounterVec,
    pub events_appended_total: IntCounter,
    pub appended_bytes_total: IntCounter,
    pub append_latency_seconds: Histogram,
    pub batch_appends: Histogram,
    pub reads_total: IntCounterVec,
    pub events_read_total: IntCounter,
    pub subscriptions_active: IntGauge,
    pub subscription_events_total: IntCounter,
    pub raft_term: IntGauge,
    pub raft_last_log_index: IntGauge,
    pub raft_commit_index: IntGauge,
    pub raft_applied_index: IntGauge,
    pub raft_is_leader: IntGauge,
    pub raft_leader_changes_total: IntCounter,
    pub events_head_position: IntGauge,
    pub local_event_ids: IntGauge,
    pub state_bytes: IntGauge,
    pub gossip_datagrams_total: IntCounterVec,
    pub grpc_connections_total: IntCounterVec,
    pub grpc_connections_open: IntGauge,
    pub auth_refusals_total: IntCounterVec,
    /// The gRPC listener's counters (atomics it owns), brought in on render.
    pub connections: std::sync::Arc<strata_security::ConnectionCounters>,
    pub group_checkpoint: IntGaugeVec,
    pub group_lag: IntGaugeVec,
    pub group_in_flight: IntGaugeVec,
    pub group_parked: IntGaugeVec,
    pub group_consumers: IntGaugeVec,
    pub group_events_total: IntCounterVec,
    pub tier_uploaded_bytes_total: IntCounter,
    pub tier_uploaded_segments_total: IntCounter,
    pub tier_uploaded_events_total: IntCounter,
    pub tier_upload_failures_total: IntCounter,
    pub tier_released_events_total: IntCounter,
    pub state_compactions_total: IntCounter,
    pub tier_watermark: IntGauge,
    pub tier_local_floor: IntGauge,
    pub tier_upload_lag_events: IntGauge,
    pub tier_upload_seconds: Histogram,
    pub scavenged_events_total: IntCounterVec,
    pub scavenges_total: IntCounter,
    gossip: std::sync::OnceLock<std::sync::Arc<strata_gossip::GossipCounters>>,
}

impl Metrics {
    pub fn new(node_id: u64) -> Self {
        let registry = Registry::new_custom(Some("strata".into()), Some([("node_id".to_string(), node_id.to_string())].into()))
            .expect("valid registry prefix and labels");
        let appends_total = IntCounterVec::new(
            Opts::new("appends_total", "appends answered, by outcome"),
            &["outcome"],
        )
        .expect("valid metric");
        let events_appended_total = IntCounter::new("events_appended_total", "events written by appends (not replays)").expect("valid metric");
        let appended_bytes_total = IntCounter::new("appended_bytes_total", "data and metadata bytes of appended events").expect("valid metric");
        let append_latency_seconds = Histogram::with_opts(
            HistogramOpts::new("append_latency_seconds", "time from receiving an append to answering it on the leader")
                .buckets(prometheus::exponential_buckets(0.000_25, 2.0, 16).expect("valid buckets")),
        )
        .expect("valid metric");
        let batch_appends = Histogram::with_opts(
            HistogramOpts::new("batch_appends", "appends per raft entry (group commit size)")
                .buckets(prometheus::exponential_buckets(1.0, 2.0, 13).expect("valid buckets")),
        )
        .expect("valid metric");
        let reads_total = IntCounterVec::new(Opts::new("reads_total", "read calls, by kind"), &["kind"]).expect("valid metric");
        let events_read_total = IntCounter::new("events_read_total", "events returned by reads").expect("valid metric");
        let subscriptions_active = IntGauge::new("subscriptions_active", "catch-up and live subscriptions open on this node").expect("valid metric");
        let subscription_events_total = IntCounter::new("subscription_events_total", "events sent to subscriptions").expect("valid metric");
        let raft_term = IntGauge::new("raft_term", "current raft term").expect("valid metric");
        let raft_last_log_index = IntGauge::new("raft_last_log_index", "last raft log index on this node").expect("valid metric");
        let raft_commit_index = IntGauge::new("raft_commit_index", "committed raft log index known to this node").expect("valid metric");
        let raft_applied_index = IntGauge::new("raft_applied_index", "raft log index applied to the state machine").expect("valid metric");
        let raft_is_leader = IntGauge::new("raft_is_leader", "1 when this node is the leader").expect("valid metric");
        let raft_leader_changes_total = IntCounter::new("raft_leader_changes_total", "times the known leader changed").expect("valid metric");
        let events_head_position = IntGauge::new("events_head_position", "events in $all on this node").expect("valid metric");
        let local_event_ids = IntGauge::new("local_event_ids", "event ids in the in-memory index of the history held locally (bounded by the hot window)").expect("valid metric");
        let state_bytes = IntGauge::new("state_bytes", "bytes of the applied state's live generation on disk: its sled database file and its chunk log").expect("valid metric");
        let gossip_datagrams_total = IntCounterVec::new(
            Opts::new("gossip_datagrams_total", "gossip datagrams: sent, accepted, oversize, or dropped by reason (dropped_*)"),
            &["outcome"],
        )
        .expect("valid metric");
        let grpc_connections_total = IntCounterVec::new(
            Opts::new("grpc_connections_total", "gRPC connections: accepted, refused_over_cap (the connection cap), tls_failed (handshake)"),
            &["outcome"],
        )
        .expect("valid metric");
        let auth_refusals_total = IntCounterVec::new(
            Opts::new("auth_refusals_total", "client calls refused in front of the services: unauthenticated, permission_denied, overloaded (--max-calls-in-flight)"),
            &["kind"],
        )
        .expect("valid metric");
        let grpc_connections_open = IntGauge::new("grpc_connections_open", "gRPC connections open now").expect("valid metric");
        let group_gauge = |name: &str, help: &str| IntGaugeVec::new(Opts::new(name, help), &["group"]).expect("valid metric");
        let group_checkpoint = group_gauge("group_checkpoint", "persistent group: replicated checkpoint (cursor below which all is settled), on the leader");
        let group_lag = group_gauge("group_lag", "persistent group: source head minus checkpoint, on the leader");
        let group_in_flight = group_gauge("group_in_flight", "persistent group: deliveries not yet acked or nacked, on the leader");
        let group_parked = group_gauge("group_parked", "persistent group: events parked and not asked to be replayed, on the leader");
        let group_consumers = group_gauge("group_consumers", "persistent group: connected consumers, on the leader");
        let group_events_total = IntCounterVec::new(
            Opts::new("group_events_total", "persistent group events by outcome: delivered, acked, retried, timed_out, skipped, parked"),
            &["group", "outcome"],
        )
        .expect("valid metric");
        let tier_uploaded_bytes_total = IntCounter::new("tier_uploaded_bytes_total", "bytes of event chunks uploaded to the object-store tier (leader)").expect("valid metric");
        let tier_uploaded_segments_total = IntCounter::new("tier_uploaded_segments_total", "segments uploaded to the tier and committed (leader)").expect("valid metric");
        let tier_uploaded_events_total = IntCounter::new("tier_uploaded_events_total", "events uploaded to the tier (leader)").expect("valid metric");
        let tier_upload_failures_total = IntCounter::new("tier_upload_failures_total", "failed tier uploads: store down, slow or fenced (leader)").expect("valid metric");
        let tier_released_events_total = IntCounter::new("tier_released_events_total", "events whose local copy this node dropped after tiering").expect("valid metric");
        let state_compactions_total =
            IntCounter::new("state_compactions_total", "compactions of the applied state's database into a fresh generation").expect("valid metric");
        let tier_watermark = IntGauge::new("tier_watermark", "every event below this position is durable in the tier").expect("valid metric");
        let tier_local_floor = IntGauge::new("tier_local_floor", "first position this node still holds on its own disk").expect("valid metric");
        let tier_upload_lag_events = IntGauge::new("tier_upload_lag_events", "events above the tier watermark (leader)").expect("valid metric");
        let tier_upload_seconds = Histogram::with_opts(
            HistogramOpts::new("tier_upload_seconds", "time to make one segment durable in the tier and commit the watermark")
                .buckets(prometheus::exponential_buckets(0.005, 2.0, 14).expect("valid buckets")),
        )
        .expect("valid metric");
        let scavenged_events_total = IntCounterVec::new(
            Opts::new("scavenged_events_total", "events whose payload a scavenge dropped, from this node's own copy (local) or from the tier (tier, leader)"),
            &["store"],
        )
        .expect("valid metric");
        let scavenges_total = IntCounter::new("scavenges_total", "scavenge points the leader replicated (one per stream and pass)").expect("valid metric");
        let metrics = Self {
            registry,
            appends_total,
            events_appended_total,
            appended_bytes_total,
            append_latency_seconds,
            batch_appends,
            reads_total,
            events_read_total,
            subscriptions_active,
            subscription_events_total,
            raft_term,
            raft_last_log_index,
            raft_commit_index,
            raft_applied_index,
            raft_is_leader,
            raft_leader_changes_total,
            events_head_position,
            local_event_ids,
            state_bytes,
            gossip_datagrams_total,
            grpc_connections_total,
            grpc_connections_open,
            auth_refusals_total,
            connections: Default::default(),
            group_checkpoint,
            group_lag,
            group_in_flight,
            group_parked,
            group_consumers,
            group_events_total,
            tier_uploaded_bytes_total,
            tier_uploaded_segments_total,
            tier_uploaded_events_total,
            tier_upload_failures_total,
            tier_released_events_total,
            state_compactions_total,
            tier_watermark,
            tier_local_floor,
            tier_upload_lag_events,
            tier_upload_seconds,
            scavenged_events_total,
            scavenges_total,
            gossip: std::sync::OnceLock::new(),
        };
        let collectors: Vec<Box<dyn prometheus::core::Collector>> = vec![
            Box::new(metrics.appends_total.clone()),
            Box::new(metrics.events_appended_total.clone()),
            Box::new(metrics.appended_bytes_total.clone()),
            Box::new(metrics.append_latency_seconds.clone()),
            Box::new(metrics.batch_appends.clone()),
            Box::new(metrics.reads_total.clone()),
            Box::new(metrics.events_read_total.clone()),
            Box::new(metrics.subscriptions_active.clone()),
            Box::new(metrics.subscription_events_total.clone()),
            Box::new(metrics.raft_term.clone()),
            Box::new(metrics.raft_last_log_index.clone()),
            Box::new(metrics.raft_commit_index.clone()),
            Box::new(metrics.raft_applied_index.clone()),
            Box::new(metrics.raft_is_leader.clone()),
            Box::new(metrics.raft_leader_changes_total.clone()),
            Box::new(metrics.events_head_position.clone()),
            Box::new(metrics.local_event_ids.clone()),
            Box::new(metrics.state_bytes.clone()),
            Box::new(metrics.gossip_datagrams_total.clone()),
            Box::new(metrics.grpc_connections_total.clone()),
            Box::new(metrics.grpc_connections_open.clone()),
            Box::new(metrics.auth_refusals_total.clone()),
            Box::new(metrics.group_checkpoint.clone()),
            Box::new(metrics.group_lag.clone()),
            Box::new(metrics.group_in_flight.clone()),
            Box::new(metrics.group_parked.clone()),
            Box::new(metrics.group_consumers.clone()),
            Box::new(metrics.group_events_total.clone()),
            Box::new(metrics.tier_uploaded_bytes_total.clone()),
            Box::new(metrics.tier_uploaded_segments_total.clone()),
            Box::new(metrics.tier_uploaded_events_total.clone()),
            Box::new(metrics.tier_upload_failures_total.clone()),
            Box::new(metrics.tier_released_events_total.clone()),
            Box::new(metrics.state_compactions_total.clone()),
            Box::new(metrics.tier_watermark.clone()),
            Box::new(metrics.tier_local_floor.clone()),
            Box::new(metrics.tier_upload_lag_events.clone()),
            Box::new(metrics.tier_upload_seconds.clone()),
            Box::new(metrics.scavenged_events_total.clone()),
            Box::new(metrics.scavenges_total.clone()),
        ];
        for collector in collectors {
            metrics.registry.register(collector).expect("metric names are unique");
        }
        metrics
    }

    /// Drops a group's gauges when this node stops running it (its counters stay).
    pub fn forget_group(&self, group: &str) {
        for gauge in [&self.group_checkpoint, &self.group_lag, &self.group_in_flight, &self.group_parked, &self.group_consumers] {
            let _ = gauge.remove_label_values(&[group]);
        }
    }

    /// Exports this gossip's datagram counters from now on.
    pub fn watch_gossip(&self, counters: std::sync::Arc<strata_gossip::GossipCounters>) {
        let _ = self.gossip.set(counters);
    }

    /// Brings the gossip counters (atomics owned by the gossip transport) into the registry.
    fn sync_gossip(&self) {
        use std::sync::atomic::Ordering;
        let Some(counters) = self.gossip.get() else { return };
        let mut values = vec![
            ("sent".to_string(), counters.sent.load(Ordering::Relaxed)),
            ("accepted".to_string(), counters.accepted.load(Ordering::Relaxed)),
            ("oversize".to_string(), counters.oversize.load(Ordering::Relaxed)),
        ];
        for reason in strata_gossip::DropReason::ALL {
            values.push((format!("dropped_{}", reason.label()), counters.dropped(reason)));
        }
        for (outcome, value) in values {
            catch_up(&self.gossip_datagrams_total, &outcome, value);
        }
    }

    /// Brings the gRPC listener's counters into the registry.
    fn sync_connections(&self) {
        use std::sync::atomic::Ordering;
        let c = &self.connections;
        for (outcome, value) in [
            ("accepted", c.accepted.load(Ordering::Relaxed)),
            ("refused_over_cap", c.refused_over_cap.load(Ordering::Relaxed)),
            ("tls_failed", c.tls_failures.load(Ordering::Relaxed)),
        ] {
            catch_up(&self.grpc_connections_total, outcome, value);
        }
        self.grpc_connections_open.set(c.open.load(Ordering::Relaxed) as i64);
    }

    /// The Prometheus text exposition of every metric.
    pub fn render(&self) -> String {
        self.sync_gossip();
        self.sync_connections();
        let mut out = Vec::new();
        TextEncoder::new().encode(&self.registry.gather(), &mut out).expect("text encoding never fails");
        String::from_utf8(out).expect("prometheus text is utf-8")
    }

    /// Updates the Raft gauges from openraft's metrics.
    pub fn observe_raft(&self, raft: &strata_raft::RaftMetrics, previous_leader: &mut Option<u64>) {
        self.raft_term.set(raft.current_term as i64);
        self.raft_last_log_index.set(raft.last_log_index.unwrap_or(0) as i64);
        self.raft_commit_index.set(raft.local_committed.as_ref().map_or(0, |id| id.index) as i64);
        self.raft_applied_index.set(raft.last_applied.as_ref().map_or(0, |id| id.index) as i64);
        self.raft_is_leader.set(i64::from(raft.current_leader == Some(raft.id)));
        if raft.current_leader.is_some() && raft.current_leader != *previous_leader {
            self.raft_leader_changes_total.inc();
            *previous_leader = raft.current_leader;
        }
    }
}

/// Moves a counter up to `value`, a total kept by atomics outside the registry.
fn catch_up(counters: &IntCounterVec, label: &str, value: u64) {
    let counter = counters.with_label_values(&[label]);
    counter.inc_by(value.saturating_sub(counter.get()));
}
