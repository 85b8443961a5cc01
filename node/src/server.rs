//! `strata serve`: opens storage, starts Raft and gossip, serves gRPC and HTTP, forms the
//! cluster (from `--peers`, or through gossip from `--seeds`), and shuts down cleanly on
//! SIGTERM or Ctrl-C (a leader hands leadership over first).

use std::sync::Arc;

use openraft::storage::RaftLogStorage;
use openraft::async_runtime::WatchReceiver;
use strata_proto::v1::auth_server::AuthServer;
use strata_proto::v1::cluster_server::ClusterServer;
use strata_proto::v1::raft::raft_transport_server::RaftTransportServer;
use strata_proto::v1::persistent_subscriptions_server::PersistentSubscriptionsServer;
use strata_proto::v1::snapshots_server::SnapshotsServer;
use strata_proto::v1::streams_server::StreamsServer;
use strata_proto::v1::subscriptions_server::SubscriptionsServer;
use strata_raft::{raft_config, LogStore, Network, PeerChannels, Raft, RaftTransportService, ResyncGate, StateMachine, RAFT_RPC_MESSAGE_BYTES_MAX};
use strata_gossip::{Gossip, GossipConfig};
use strata_storage::{open_database, EventState, RaftLogStore};
use tokio::sync::watch;

use crate::access::{run_access_keeper, Access, AdmissionLayer};
use crate::api::auth::AuthService;
use crate::api::cluster::{role_name, ClusterService};
use crate::api::persistent::PersistentService;
use crate::api::snapshots::SnapshotsService;
use crate::api::streams::StreamsService;
use crate::api::subscriptions::SubscriptionsService;
use crate::api::NodeContext;
use crate::batcher::Batcher;
use crate::bootstrap::bootstrap_static;
use crate::config::NodeConfig;
use crate::discovery::{advert_of, form_or_join, publish_adverts};
use crate::membership::{run_membership_keeper, transfer_leader, transfer_target};
use crate::http::{self, HttpState};
use crate::limits::*;
use crate::metrics::Metrics;
use crate::routing::Router;

/// Opens the object-store tier, if one is configured, and checks it can hold one. A node
/// whose local history already starts above 0 cannot serve without it.
async fn open_tier(config: &NodeConfig, events: &EventState) -> anyhow::Result<Option<Arc<crate::tier::TierRuntime>>> {
    let Some(url) = &config.object_store else {
        if events.floor() > 0 {
            anyhow::bail!(
                "this node's history below position {} is in the object-store tier: start it with the cluster's --object-store",
                events.floor()
            );
        }
        return Ok(None);
    };
    let store_config = strata_storage::tier::TierStoreConfig {
        url: url.clone(),
        s3_endpoint: config.s3_endpoint.clone(),
        s3_credentials_file: config.s3_credentials_file.clone(),
    };
    let window = crate::tier::HotWindow { events: config.hot_window_events, bytes: config.hot_window_bytes, age: config.hot_window_age };
    let tier = crate::tier::TierRuntime::open(&store_config, window, config.tier_backlog_events, config.scavenge_interval).await?;
    let state = events.tier_state()?;
    tracing::info!(
        store = %tier.store.description,
        watermark = state.watermark,
        local_floor = events.floor(),
        hot_window_events = window.events,
        hot_window_bytes = window.bytes,
        hot_window_age = ?window.age,
        "object-store tier ready (conditional writes supported)"
    );
    Ok(Some(tier))
}

/// The Raft transport's check of who calls it: node certificates only under TLS; anyone
/// who reaches the port under `--insecure`.
fn raft_peer_check(tls: bool) -> impl tonic::service::Interceptor + Clone {
    move |request: tonic::Request<()>| if tls { strata_raft::node_peers_only(request) } else { Ok(request) }
}

/// Runs a node until SIGTERM or Ctrl-C.
pub async fn serve(mut config: NodeConfig) -> anyhow::Result<()> {
    config.resolve_node_id()?;
    config.validate()?;
    let peers = config.parsed_peers()?;
    tracing::info!(?config, "effective configuration");
    let node_id = config.node_id;
    let tls = config.tls.load()?;
    match &tls {
        Some(tls) => tracing::info!(node_id, cert = %tls.files().cert.display(), ca = %tls.files().ca.display(), node_name = tls.node_name(), "TLS on: clients verified against the cluster CA, peers must present a node certificate"),
        None => tracing::warn!(node_id, "INSECURE: serving plaintext gRPC without TLS (--insecure); anyone who reaches the port can read and write; for development only"),
    }

    let db = open_database(&config.data_dir)?;
    let raft_store = RaftLogStore::open(&db, &config.data_dir)?;
    let events = Arc::new(EventState::open(&db, &config.data_dir)?);
    let mut log_store = LogStore::new(raft_store.clone());
    let committed_at_start = log_store.read_committed().await?.map_or(0, |id| id.index);
    let tier = open_tier(&config, &events).await?;
    if let Some(tier) = &tier {
        crate::tier::fill_id_filter_gap(&events, &tier.reader).await?;
    }
    let mut state_machine = StateMachine::new(events.clone(), raft_store.clone(), &config.data_dir.join("snapshots"))?
        .with_tier(tier.as_ref().map(|t| t.reader.clone()));
    strata_raft::snapshot_applied_state_ahead_of_log(&mut log_store, &mut state_machine).await?;
    let applied = state_machine.applied_watch();
    if let Some(tls) = &tls {
        tls.spawn_reloader();
    }
    let peer_tls = tls.clone().map(strata_security::ClientTls::for_node).transpose()?;
    let channels = PeerChannels::with_source_ip(config.source_ip).with_tls(peer_tls);
    // Raft (its core, replication, heartbeats, applies) shares the one runtime with the
    // client-facing services. A runtime of its own (tried) kept heartbeats apart from a
    // flood of client calls, but every hand-off between the two runtimes woke a thread of
    // the other: at one writer that was a third of all context switches per append and
    // ~12 % of the round trip. On one runtime a task woken by another usually runs next on
    // the same worker. The overload tests (20,000 calls at once) pass on it.
    let raft = Raft::new(
        node_id,
        raft_config(&config.cluster_name),
        Network::new(channels.clone()),
        log_store.clone(),
        state_machine.clone(),
    )
    .await?;
    // A log cut short by corruption: no voting or leading until re-synced (see ResyncGate).
    let resync = ResyncGate::new(log_store.was_salvaged());
    if resync.is_resyncing() {
        raft.runtime_config().elect(false);
        tracing::warn!(node_id, "raft log was cut short by a corrupt record: not voting or leading until re-synced from the leader");
    }

    let metrics = Arc::new(Metrics::new(node_id));
    let grpc_advertised = config.advertised_grpc_addr();
    let http_advertised = config.advertised_http_addr();
    let gossip = match config.gossip_secret()? {
        Some(secret) => {
            let advertise_addr = config.advertised_gossip_addr().await?;
            let gossip_config = GossipConfig {
                node_id,
                cluster_id: config.cluster_name.clone(),
                secret,
                listen_addr: config.gossip_addr,
                advertise_addr,
                seeds: config.seeds.clone(),
            };
            let initial = advert_of(&raft.metrics().borrow_watched().clone(), &grpc_advertised, &http_advertised);
            let gossip = Gossip::start(gossip_config, &initial).await?;
            metrics.watch_gossip(gossip.counters().clone());
            tracing::info!(node_id, gossip = %config.gossip_addr, advertise = %advertise_addr, seeds = ?config.seeds, "gossip listening (authenticated)");
            Some(Arc::new(gossip))
        }
        None => None,
    };
    let batcher = Batcher::start(raft.clone(), metrics.clone(), config.proposal_queue_appends);
    let access = Arc::new(Access::new(events.clone(), tls.is_some(), config.token_ttl_secs));
    let first_admin_password = config.first_admin_password()?;
    match (&tls, &first_admin_password) {
        (Some(_), Some(_)) => tracing::info!(node_id, "authentication on: every call needs a token (strata login); the first admin comes from the admin password"),
        (Some(_), None) => tracing::info!(node_id, "authentication on: every call needs a token (strata login) or a node certificate"),
        (None, _) => tracing::warn!(node_id, "INSECURE: calls without a token act as admin (--insecure); tokens, when sent, are still checked"),
    }
    let ctx = Arc::new(NodeContext {
        router: Router { node_id, raft: raft.clone(), applied, channels: channels.clone() },
        events: events.clone(),
        reader: strata_storage::EventReader::new(events.clone(), tier.as_ref().map(|t| t.reader.clone())),
        tier: tier.clone(),
        batcher,
        metrics: metrics.clone(),
        max_event_bytes: config.max_event_bytes,
        max_snapshot_bytes: config.max_snapshot_bytes,
        grpc_addr: grpc_advertised.clone(),
        http_addr: http_advertised.clone(),
        gossip: gossip.clone(),
        groups: Default::default(),
        access: access.clone(),
        subscription_slots: Arc::new(tokio::sync::Semaphore::new(config.max_subscriptions)),
        max_subscriptions: config.max_subscriptions,
    });

    let (shutdown_sender, shutdown) = watch::channel(false);
    let grpc_listener = tokio::net::TcpListener::bind(config.grpc_addr).await?;
    let http_listener = tokio::net::TcpListener::bind(config.http_addr).await?;
    tracing::info!(
        node_id,
        grpc = %config.grpc_addr,
        http = %config.http_addr,
        data_dir = %config.data_dir.display(),
        "strata node listening"
    );

    let (health_reporter, health_service) = tonic_health::server::health_reporter();
    health_reporter.set_serving::<StreamsServer<StreamsService>>().await;
    let grpc = tonic::transport::Server::builder()
        .tcp_nodelay(true)
        .initial_stream_window_size(Some(strata_raft::HTTP2_STREAM_WINDOW_BYTES))
        .initial_connection_window_size(Some(strata_raft::HTTP2_CONNECTION_WINDOW_BYTES))
        .max_concurrent_streams(Some(GRPC_CONCURRENT_STREAMS_MAX))
        .http2_keepalive_interval(Some(std::time::Duration::from_secs(GRPC_KEEPALIVE_INTERVAL_SECS)))
        .http2_keepalive_timeout(Some(std::time::Duration::from_secs(GRPC_KEEPALIVE_TIMEOUT_SECS)))
        .http2_max_pending_accept_reset_streams(Some(GRPC_PENDING_RESETS_MAX))
        .http2_max_header_list_size(GRPC_HEADER_LIST_BYTES_MAX)
        // One check of who calls, in front of every service (see `access`).
        .layer(AdmissionLayer::new(access.clone(), metrics.clone(), config.max_calls_in_flight))
        .add_service(health_service)
        .add_service(AuthServer::new(AuthService::new(ctx.clone())))
        .add_service(
            StreamsServer::new(StreamsService::new(ctx.clone()))
                .max_decoding_message_size(GRPC_DECODE_BYTES_MAX)
                .max_encoding_message_size(GRPC_ENCODE_BYTES_MAX),
        )
        .add_service(
            SubscriptionsServer::new(SubscriptionsService::new(ctx.clone())).max_encoding_message_size(GRPC_ENCODE_BYTES_MAX),
        )
        .add_service(
            SnapshotsServer::new(SnapshotsService::new(ctx.clone()))
                .max_decoding_message_size(GRPC_DECODE_BYTES_MAX)
                .max_encoding_message_size(GRPC_ENCODE_BYTES_MAX),
        )
        .add_service(
            PersistentSubscriptionsServer::new(PersistentService::new(ctx.clone())).max_encoding_message_size(GRPC_ENCODE_BYTES_MAX),
        )
        .add_service(ClusterServer::new(ClusterService::new(ctx.clone())))
        .add_service(tonic::service::interceptor::InterceptedService::new(
            RaftTransportServer::new(RaftTransportService::new(node_id, raft.clone(), log_store.clone(), state_machine.clone(), resync.clone(), shutdown.clone()))
                .max_decoding_message_size(RAFT_RPC_MESSAGE_BYTES_MAX)
                .max_encoding_message_size(RAFT_RPC_MESSAGE_BYTES_MAX),
            raft_peer_check(tls.is_some()),
        ))
        // Our own incoming stream: TLS (when on), the connection cap, and TCP_NODELAY on
        // every accepted socket (without it Nagle holds small responses until the peer's
        // delayed ACK: 40 ms stalls, measured on 1% of appends).
        .serve_with_incoming_shutdown(
            strata_security::incoming(
                grpc_listener,
                tls.clone(),
                strata_security::ConnectionLimits { max: config.max_connections },
                metrics.connections.clone(),
            ),
            strata_raft::stopped(shutdown.clone()),
        );
    let grpc_task = tokio::spawn(grpc);
    let http_app = http::router(HttpState { ctx: ctx.clone(), committed_at_start });
    let http_task = tokio::spawn(axum::serve(http_listener, http_app).with_graceful_shutdown(strata_raft::stopped(shutdown.clone())).into_future());

    if let Some(tier) = &tier {
        crate::tier::spawn_uploader(ctx.router.clone(), events.clone(), tier.clone(), metrics.clone(), shutdown.clone())?;
        tokio::spawn(crate::tier::run_releaser(state_machine.clone(), events.clone(), tier.clone(), metrics.clone(), shutdown.clone()));
        tokio::spawn(crate::tier::run_snapshot_trigger(raft.clone(), events.clone(), shutdown.clone()));
    }
    tokio::spawn(crate::scavenge::run_scavenger(ctx.router.clone(), ctx.reader.clone(), metrics.clone(), config.scavenge_interval, shutdown.clone()));
    tokio::spawn(watch_raft(raft.clone(), metrics));
    tokio::spawn(run_access_keeper(ctx.router.clone(), events.clone(), access, first_admin_password));
    if resync.is_resyncing() {
        let ctx = ctx.clone();
        tokio::spawn(async move { ctx.router.resync_from_leader(&resync).await });
    }
    if let Some(gossip) = &gossip {
        tokio::spawn(publish_adverts(gossip.clone(), raft.clone(), grpc_advertised.clone(), http_advertised));
    }
    if !peers.is_empty() {
        tokio::spawn(bootstrap_static(node_id, peers, raft.clone(), log_store, channels));
    } else if let Some(gossip) = gossip.as_ref().filter(|_| !config.seeds.is_empty() || config.initial_cluster_size.is_some()) {
        tokio::spawn(form_or_join(
            node_id,
            grpc_advertised,
            config.initial_cluster_size,
            gossip.clone(),
            raft.clone(),
            log_store,
            channels,
        ));
    }
    tokio::spawn(run_membership_keeper(
        raft.clone(),
        gossip.clone(),
        config.max_voters,
        config.auto_remove_after.map(std::time::Duration::from_secs),
    ));

    shutdown_signal().await;
    tracing::info!(node_id, "shutting down");
    hand_over_leadership(&raft).await;
    let _ = shutdown_sender.send(true);
    if let Err(e) = raft.shutdown().await {
        tracing::warn!(error = %e, "raft shutdown reported an error");
    }
    let _ = grpc_task.await;
    let _ = http_task.await;
    if let Some(gossip) = gossip.and_then(|g| Arc::try_unwrap(g).ok()) {
        gossip.shutdown().await;
    }
    db.flush_async().await?;
    tracing::info!(node_id, "stopped");
    Ok(())
}

/// On shutdown a leader hands over to its most caught-up voter first, so that a rolling
/// restart costs one quick transfer instead of an election timeout per node.
async fn hand_over_leadership(raft: &Raft) {
    let metrics = raft.metrics().borrow_watched().clone();
    if metrics.current_leader != Some(metrics.id) {
        return;
    }
    let Some(target) = transfer_target(&metrics) else { return };
    match transfer_leader(raft, target).await {
        Ok(_) => tracing::info!(node_id = metrics.id, to = target, "handed leadership over before stopping"),
        Err(e) => tracing::warn!(node_id = metrics.id, to = target, error = %e, "leadership hand-over failed; stopping anyway"),
    }
}

async fn shutdown_signal() {
    let mut terminate = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).expect("can install a SIGTERM handler");
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = terminate.recv() => {}
    }
}

/// Logs leadership changes (the start-up line operators look for) and feeds the metrics.
async fn watch_raft(raft: Raft, metrics: Arc<Metrics>) {
    let mut watch = raft.metrics();
    let mut previous_leader = None;
    let mut logged_leader = None;
    loop {
        {
            let current = watch.borrow_and_update().clone();
            metrics.observe_raft(&current, &mut previous_leader);
            if current.current_leader != logged_leader {
                logged_leader = current.current_leader;
                match current.current_leader {
                    Some(leader) => tracing::info!(
                        node_id = current.id,
                        leader_id = leader,
                        term = current.current_term,
                        role = role_name(current.state),
                        "leader elected"
                    ),
                    None => tracing::info!(node_id = current.id, term = current.current_term, "no leader known"),
                }
            }
        }
        if watch.changed().await.is_err() {
            return;
        }
    }
}
