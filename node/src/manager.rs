//! The cluster manager (`strata cluster …`, SPEC §5): status (optionally watched),
//! members, and the membership changes, all against any node (the server forwards
//! membership calls to the leader); fault injection ([`crate::chaos`]); and the compose
//! cluster's life cycle ([`crate::compose`]). `--json` prints one object per answer.

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
    Compose(crate::compose::ComposeArgs),
}

pub async fn cluster(options: &ClientOptions, command: ClusterCommand) -> Result<(), CliError> {
    let command = match command {
        ClusterCommand::Chaos(args) => return crate::chaos::run(args, options.json).await.map_err(|e| CliError::Usage(format!("{e:#}"))),
        ClusterCommand::Compose(args) => return crate::compose::compose(args, options).await.map_err(|e| CliError::Usage(format!("{e:#}"))),
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

