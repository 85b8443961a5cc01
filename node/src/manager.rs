//! The cluster manager (`strata cluster …`, SPEC §5): status (optionally watched),
//! members, and the membership changes, all against any node (the server forwards
//! membership calls to the leader); fault injection ([`crate::chaos`]); and the compose
//! cluster's life cycle (`compose up|down|logs|scale`). `--json` prints one object per answer.

use std::time::Duration;

use clap::Subcommand;
use serde_json::json;
use strata_proto::v1::cluster_client::ClusterClient;
use strata_proto::v1::{
    AddLearnerRequest, MembersRequest, MembershipResponse, NodeRequest, StatusRequest, StatusResponse, TierRequest, TierStatus,
    TriggerSnapshotRequest,
};

use crate::cli::{connect, CliError, ClientOptions};

/// Time between refreshes of `cluster status --watch`.
const WATCH_INTERVAL_MS: u64 = 1_000;
/// The compose project `strata cluster compose` and `chaos --compose` use by default.
pub const COMPOSE_PROJECT_DEFAULT: &str = "strata";
/// Nodes in the compose file itself; `compose scale` adds or removes nodes beyond them.
const COMPOSE_BASE_NODES: u16 = 3;
/// Most nodes `compose scale` runs.
const COMPOSE_NODES_MAX: u16 = 9;
/// How long `compose up` and `compose scale` wait for the containers to be healthy.
const COMPOSE_READY_TIMEOUT_SECS: u64 = 120;

#[derive(Subcommand, Debug)]
pub enum ClusterCommand {
    /// Every node (from Raft and gossip): address, role, term, applied index, lag, liveness, and who leads.
    Status {
        /// Refresh every second until interrupted.
        #[arg(long)]
        watch: bool,
    },
    /// The current membership (voters and learners), as the leader sees it.
    Members,
    /// Add a node as a learner (it is promoted automatically once caught up, up to --max-voters).
    AddLearner {
        node_id: u64,
        /// The node's gRPC address, host:port.
        grpc_addr: String,
    },
    /// Make a learner a voter.
    Promote { node_id: u64 },
    /// Remove a voter or learner from the membership.
    Remove { node_id: u64 },
    /// Hand leadership to a voter.
    TransferLeader { node_id: u64 },
    /// If the node at --endpoints leads, hand leadership to its most caught-up voter (a
    /// Kubernetes preStop hook); otherwise do nothing.
    StepDown,
    /// Build a Raft snapshot on the node now and purge the log below it.
    Snapshot,
    /// Tier history to the object store now, whatever the hot window: everything below
    /// --to (default: the whole log), then print the tier's state.
    Tier {
        /// Position below which every event is tiered (default: the head).
        #[arg(long)]
        to: Option<u64>,
        /// How long to wait for the watermark, in milliseconds.
        #[arg(long, default_value_t = 60_000)]
        timeout_ms: u64,
    },
    /// Inject a fault into one node of the dev or compose cluster.
    Chaos(crate::chaos::ChaosArgs),
    /// Drive the compose cluster of dev-env/docker-compose.yml.
    Compose(ComposeArgs),
}

#[derive(clap::Args, Debug)]
pub struct ComposeArgs {
    #[command(subcommand)]
    pub command: ComposeCommand,
    /// The compose file.
    #[arg(long, default_value = "dev-env/docker-compose.yml", global = true)]
    pub file: std::path::PathBuf,
    /// The compose project name.
    #[arg(long, env = "COMPOSE_PROJECT_NAME", default_value = COMPOSE_PROJECT_DEFAULT, global = true)]
    pub project: String,
}

#[derive(Subcommand, Debug)]
pub enum ComposeCommand {
    /// Start the cluster (the image must exist: scripts/build-image) and wait until healthy.
    Up,
    /// Stop and remove the containers and network (and the data volumes with --volumes).
    Down {
        #[arg(long)]
        volumes: bool,
    },
    /// Show the nodes' logs.
    Logs {
        #[arg(long)]
        follow: bool,
        /// Lines per node.
        #[arg(long, default_value_t = 100)]
        tail: u32,
    },
    /// Run this many nodes (3..=9): added nodes join and are promoted; removed ones leave
    /// the membership before their containers go.
    Scale { nodes: u16 },
}

pub async fn cluster(options: &ClientOptions, command: ClusterCommand) -> Result<(), CliError> {
    let command = match command {
        ClusterCommand::Chaos(args) => return crate::chaos::run(args, options.json).await.map_err(|e| CliError::Usage(format!("{e:#}"))),
        ClusterCommand::Compose(args) => return compose(args, options).await.map_err(|e| CliError::Usage(format!("{e:#}"))),
        other => other,
    };
    let mut client = ClusterClient::new(connect(options).await?);
    let membership = match command {
        ClusterCommand::Status { watch } => {
            loop {
                let status = client.status(StatusRequest { local_only: false }).await?.into_inner();
                if options.json {
                    println!("{}", status_json(&status));
                } else {
                    if watch {
                        // Clear the screen and home the cursor, like `watch`.
                        print!("\x1b[2J\x1b[H");
                    }
                    print_status(&status);
                }
                if !watch {
                    return Ok(());
                }
                tokio::time::sleep(Duration::from_millis(WATCH_INTERVAL_MS)).await;
            }
        }
        ClusterCommand::Snapshot => {
            let reply = client.trigger_snapshot(TriggerSnapshotRequest {}).await?.into_inner();
            if options.json {
                println!("{}", json!({"snapshot_index": reply.snapshot_index}));
            } else {
                println!("snapshot built at log index {}", reply.snapshot_index);
            }
            return Ok(());
        }
        ClusterCommand::Tier { to, timeout_ms } => {
            let request = TierRequest { up_to_position: to.unwrap_or(u64::MAX), timeout_ms };
            let tier = client.tier(request).await?.into_inner().tier.unwrap_or_default();
            if options.json {
                println!("{}", tier_json(&tier));
            } else {
                print_tier(&tier);
            }
            return Ok(());
        }
        ClusterCommand::StepDown => {
            let local = client.status(StatusRequest { local_only: true }).await?.into_inner();
            if local.role != "leader" {
                if options.json {
                    println!("{}", json!({"node_id": local.node_id, "stepped_down": false, "role": local.role}));
                } else {
                    println!("node {} is {}, not the leader: nothing to hand over", local.node_id, local.role);
                }
                return Ok(());
            }
            client.transfer_leader(NodeRequest { node_id: 0 }).await?.into_inner()
        }
        ClusterCommand::Members => client.members(MembersRequest {}).await?.into_inner(),
        ClusterCommand::AddLearner { node_id, grpc_addr } => client.add_learner(AddLearnerRequest { node_id, grpc_addr }).await?.into_inner(),
        ClusterCommand::Promote { node_id } => client.promote(NodeRequest { node_id }).await?.into_inner(),
        ClusterCommand::Remove { node_id } => client.remove(NodeRequest { node_id }).await?.into_inner(),
        ClusterCommand::TransferLeader { node_id } => client.transfer_leader(NodeRequest { node_id }).await?.into_inner(),
        ClusterCommand::Chaos(_) | ClusterCommand::Compose(_) => unreachable!("handled above"),
    };
    print_membership(options.json, &membership);
    Ok(())
}

fn status_json(status: &StatusResponse) -> serde_json::Value {
    let members: Vec<_> = status
        .members
        .iter()
        .map(|m| {
            json!({
                "id": m.id, "grpc_addr": m.grpc_addr, "http_addr": m.http_addr, "role": m.role,
                "membership": m.membership, "term": m.term, "applied_index": m.applied_index,
                "matched_index": m.matched_index, "lag": m.lag, "alive": m.alive, "gossip": m.gossip,
            })
        })
        .collect();
    json!({
        "node_id": status.node_id, "role": status.role, "term": status.term, "leader_id": status.leader_id,
        "leader_addr": status.leader_addr, "last_log_index": status.last_log_index,
        "committed_index": status.committed_index, "applied_index": status.applied_index,
        "snapshot_index": status.snapshot_index, "purged_index": status.purged_index,
        "head_position": status.head_position, "grpc_addr": status.grpc_addr, "http_addr": status.http_addr,
        "version": status.version, "members": members,
        "tier": tier_json(&status.tier.clone().unwrap_or_default()),
    })
}

fn tier_json(tier: &TierStatus) -> serde_json::Value {
    json!({
        "enabled": tier.enabled, "object_store": tier.object_store, "watermark": tier.watermark,
        "local_floor": tier.local_floor, "upload_lag_events": tier.upload_lag_events, "segments": tier.segments,
        "bytes": tier.bytes, "last_error": tier.last_error,
    })
}

fn print_tier(tier: &TierStatus) {
    if !tier.enabled {
        println!("tier: off (no --object-store); watermark {}", tier.watermark);
        return;
    }
    println!(
        "tier: {}; watermark {} ({} segments, {} bytes); upload lag {} events; this node holds from position {}{}",
        tier.object_store,
        tier.watermark,
        tier.segments,
        tier.bytes,
        tier.upload_lag_events,
        tier.local_floor,
        if tier.last_error.is_empty() { String::new() } else { format!("; last upload error: {}", tier.last_error) }
    );
}

fn print_status(status: &StatusResponse) {
    let leader = if status.leader_id == 0 { "none".to_string() } else { format!("{} ({})", status.leader_id, status.leader_addr) };
    println!(
        "node {} at {} is {}, term {}; leader {}; log last={} committed={} applied={} snapshot={}; $all has {} events",
        status.node_id, status.grpc_addr, status.role, status.term, leader, status.last_log_index, status.committed_index,
        status.applied_index, status.snapshot_index, status.head_position
    );
    print_tier(&status.tier.clone().unwrap_or_default());
    println!(
        "{:<4} {:<22} {:<10} {:<8} {:>6} {:>10} {:>8}  {:<6} {:<6}",
        "ID", "ADDRESS", "ROLE", "MEMBER", "TERM", "APPLIED", "LAG", "RAFT", "GOSSIP"
    );
    for m in &status.members {
        let lag = if m.alive { m.lag.to_string() } else { "-".into() };
        println!(
            "{:<4} {:<22} {:<10} {:<8} {:>6} {:>10} {:>8}  {:<6} {:<6}{}",
            m.id,
            m.grpc_addr,
            m.role,
            m.membership,
            m.term,
            m.applied_index,
            lag,
            if m.alive { "up" } else { "DOWN" },
            m.gossip,
            if m.id == status.leader_id { "  <- leader" } else { "" }
        );
    }
}

fn print_membership(json_output: bool, membership: &MembershipResponse) {
    if json_output {
        let members: Vec<_> =
            membership.members.iter().map(|m| json!({"id": m.id, "grpc_addr": m.grpc_addr, "membership": m.membership})).collect();
        println!(
            "{}",
            json!({"leader_id": membership.leader_id, "membership_log_index": membership.membership_log_index, "members": members})
        );
        return;
    }
    println!("leader {}; membership at log index {}", membership.leader_id, membership.membership_log_index);
    println!("{:<4} {:<22} {:<8}", "ID", "ADDRESS", "MEMBER");
    for m in &membership.members {
        println!(
            "{:<4} {:<22} {:<8}{}",
            m.id,
            m.grpc_addr,
            m.membership,
            if m.id == membership.leader_id { "  <- leader" } else { "" }
        );
    }
}

/// The override file `compose scale` writes beside the compose file for nodes beyond the
/// base three.
fn scale_file(file: &std::path::Path) -> std::path::PathBuf {
    file.with_file_name("docker-compose.scale.yml")
}

fn docker_compose(args: &ComposeArgs, extra: &[&str]) -> anyhow::Result<()> {
    let mut command = std::process::Command::new("docker-compose");
    command.arg("-f").arg(&args.file);
    let scale = scale_file(&args.file);
    if scale.exists() {
        command.arg("-f").arg(&scale);
    }
    let status = command.args(["-p", &args.project]).args(extra).status().map_err(|e| anyhow::anyhow!("cannot run docker-compose: {e}"))?;
    anyhow::ensure!(status.success(), "docker-compose {} failed", extra.join(" "));
    Ok(())
}

async fn wait_healthy(project: &str, nodes: u16) -> anyhow::Result<Duration> {
    let started = std::time::Instant::now();
    let deadline = started + Duration::from_secs(COMPOSE_READY_TIMEOUT_SECS);
    loop {
        if (0..nodes).all(|node| crate::chaos::container_health(&crate::chaos::compose_container(project, u64::from(node))) == "healthy") {
            return Ok(started.elapsed());
        }
        anyhow::ensure!(std::time::Instant::now() < deadline, "containers not healthy within {COMPOSE_READY_TIMEOUT_SECS} s");
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// The nodes now in the compose project: the base three plus those of the scale file.
fn compose_nodes(args: &ComposeArgs) -> u16 {
    let extra = std::fs::read_to_string(scale_file(&args.file)).map_or(0, |text| text.matches("hostname: strata-").count() as u16);
    COMPOSE_BASE_NODES + extra
}

fn write_scale_file(args: &ComposeArgs, nodes: u16) -> anyhow::Result<()> {
    let path = scale_file(&args.file);
    if nodes <= COMPOSE_BASE_NODES {
        let _ = std::fs::remove_file(&path);
        return Ok(());
    }
    let mut text = String::from("# Written by `strata cluster compose scale`: the nodes beyond the base three.\nversion: \"3.7\"\nservices:\n");
    for node in COMPOSE_BASE_NODES..nodes {
        text.push_str(&format!(
            "  strata-{node}:\n    image: strata:${{STRATA_VERSION:-0.1.0}}\n    command: [\"serve\", \"--node-id-from-hostname\"]\n    hostname: strata-{node}\n    environment:\n      STRATA_SEEDS: strata-0:7791,strata-1:7791,strata-2:7791\n      STRATA_CLUSTER_NAME: strata-compose\n      STRATA_CLUSTER_SECRET: ${{STRATA_CLUSTER_SECRET:-compose-dev-secret-change-me}}\n      STRATA_ADVERTISE_HOST: strata-{node}\n      STRATA_OBJECT_STORE: ${{STRATA_OBJECT_STORE:-file:///tier}}\n      STRATA_INSECURE: \"true\"\n    healthcheck:\n      test: [\"CMD\", \"/usr/local/bin/strata\", \"health\"]\n      interval: 2s\n      timeout: 3s\n      retries: 60\n    volumes:\n      - strata-{node}-data:/data\n      - strata-tier:/tier\n"
        ));
    }
    text.push_str("volumes:\n");
    for node in COMPOSE_BASE_NODES..nodes {
        text.push_str(&format!("  strata-{node}-data:\n"));
    }
    std::fs::write(&path, text)?;
    Ok(())
}

async fn compose(args: ComposeArgs, options: &ClientOptions) -> anyhow::Result<()> {
    let json = options.json;
    match &args.command {
        ComposeCommand::Up => {
            docker_compose(&args, &["up", "-d"])?;
            let nodes = compose_nodes(&args);
            let took = wait_healthy(&args.project, nodes).await?;
            if json {
                println!("{}", json!({"project": args.project, "nodes": nodes, "ready_secs": took.as_secs_f64()}));
            } else {
                println!("compose cluster {} ready: {nodes} nodes healthy in {:.1} s; try: strata cluster status --endpoints 127.0.0.1:7711", args.project, took.as_secs_f64());
            }
        }
        ComposeCommand::Down { volumes } => {
            docker_compose(&args, if *volumes { &["down", "--volumes"] } else { &["down"] })?;
            if json {
                println!("{}", json!({"project": args.project, "down": true, "volumes_removed": volumes}));
            }
        }
        ComposeCommand::Logs { follow, tail } => {
            let tail = format!("--tail={tail}");
            let mut extra = vec!["logs", "--no-color", tail.as_str()];
            if *follow {
                extra.push("--follow");
            }
            docker_compose(&args, &extra)?;
        }
        ComposeCommand::Scale { nodes } => {
            let nodes = *nodes;
            anyhow::ensure!((COMPOSE_BASE_NODES..=COMPOSE_NODES_MAX).contains(&nodes), "nodes must be {COMPOSE_BASE_NODES}..={COMPOSE_NODES_MAX}");
            let current = compose_nodes(&args);
            if nodes < current {
                // Leave the membership first, then stop: a voter must not just vanish.
                let mut client = ClusterClient::new(connect(&ClientOptions { endpoints: vec!["127.0.0.1:7711".to_string()], ..options.clone() }).await.map_err(|e| anyhow::anyhow!("{e}"))?);
                for node in (nodes..current).rev() {
                    match client.remove(NodeRequest { node_id: u64::from(node) + 1 }).await {
                        Ok(_) => println!("node {} removed from the membership", node + 1),
                        Err(status) if status.code() == tonic::Code::NotFound => {}
                        Err(status) => anyhow::bail!("removing node {}: {}", node + 1, status.message()),
                    }
                    docker_compose(&args, &["rm", "--stop", "--force", &crate::chaos::compose_service(u64::from(node))])?;
                }
            }
            write_scale_file(&args, nodes)?;
            docker_compose(&args, &["up", "-d", "--remove-orphans"])?;
            let took = wait_healthy(&args.project, nodes).await?;
            if json {
                println!("{}", json!({"project": args.project, "nodes": nodes, "ready_secs": took.as_secs_f64()}));
            } else {
                println!("compose cluster {} runs {nodes} nodes ({:.1} s to healthy)", args.project, took.as_secs_f64());
            }
        }
    }
    Ok(())
}
