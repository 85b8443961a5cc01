//! `strata group create|update|delete|info|list|connect|replay-parked`: persistent
//! subscription groups from the command line.

use clap::{Args, Subcommand};
use serde_json::json;
use strata_proto::v1::connect_request::Kind as InKind;
use strata_proto::v1::connect_response::Kind as OutKind;
use strata_proto::v1::persistent_subscriptions_client::PersistentSubscriptionsClient;
use strata_proto::v1::{
    Ack, ConnectRequest, ConnectStart, ConsumerStrategy, CreateGroupRequest, DeleteGroupRequest, GroupInfo, GroupInfoRequest,
    GroupSettings, ListGroupsRequest, Nack, NackAction, ReplayParkedRequest, UpdateGroupRequest,
};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;

use crate::cli::{connect, event_json, parse_from, print_event, ClientOptions, CliError, FilterArgs};

#[derive(Subcommand, Debug)]
pub enum GroupCommand {
    /// Create a group over a stream or `$all`.
    Create {
        group: String,
        /// A stream, or `$all`.
        #[arg(long)]
        source: String,
        /// start, end, or a version (stream) / position ($all).
        #[arg(long, default_value = "start")]
        from: String,
        #[command(flatten)]
        settings: SettingsArgs,
    },
    /// Change a group's settings (the ones given; the rest stay).
    Update {
        group: String,
        #[command(flatten)]
        settings: SettingsArgs,
    },
    Delete { group: String },
    /// Settings, checkpoint, lag, in-flight, parked and consumers.
    Info { group: String },
    List,
    /// Consume: print deliveries and ack (or nack) each.
    Connect {
        group: String,
        /// Ack every delivery (the default unless --nack is given).
        #[arg(long)]
        ack_all: bool,
        /// Nack every delivery with this action instead: retry, park or skip.
        #[arg(long)]
        nack: Option<String>,
        /// Stop after this many deliveries.
        #[arg(long)]
        limit: Option<u64>,
        /// Consumer name shown in `group info`.
        #[arg(long, default_value = "")]
        name: String,
    },
    /// Deliver parked events again.
    ReplayParked {
        group: String,
        /// Only those parked at `$all` positions up to this.
        #[arg(long)]
        stop_at: Option<u64>,
    },
}

#[derive(Args, Debug, Clone)]
pub struct SettingsArgs {
    /// round-robin, dispatch-to-single or pinned.
    #[arg(long)]
    strategy: Option<String>,
    /// Retries before an event is parked.
    #[arg(long)]
    max_retry: Option<u32>,
    /// Seconds a delivery may go unacked before it is retried.
    #[arg(long)]
    message_timeout: Option<f64>,
    /// Unacked deliveries per consumer.
    #[arg(long)]
    max_in_flight: Option<u32>,
    #[arg(long)]
    max_consumers: Option<u32>,
    /// Write the checkpoint after this many settled events...
    #[arg(long)]
    checkpoint_after: Option<u32>,
    /// ...or after this many milliseconds.
    #[arg(long)]
    checkpoint_after_ms: Option<u64>,
    /// First retry delay of a nacked event (doubling per retry, up to --retry-backoff-max-ms).
    #[arg(long)]
    retry_backoff_ms: Option<u64>,
    #[arg(long)]
    retry_backoff_max_ms: Option<u64>,
    #[command(flatten)]
    filter: FilterArgs,
}

fn parse_strategy(value: &str) -> Result<ConsumerStrategy, CliError> {
    match value {
        "round-robin" | "round_robin" => Ok(ConsumerStrategy::RoundRobin),
        "dispatch-to-single" | "dispatch_to_single" => Ok(ConsumerStrategy::DispatchToSingle),
        "pinned" => Ok(ConsumerStrategy::Pinned),
        other => Err(CliError::Usage(format!("--strategy takes round-robin, dispatch-to-single or pinned, not `{other}`"))),
    }
}

impl SettingsArgs {
    /// `base` with the given flags applied.
    fn apply(&self, mut base: GroupSettings) -> Result<GroupSettings, CliError> {
        if let Some(strategy) = &self.strategy {
            base.strategy = parse_strategy(strategy)? as i32;
        }
        base.max_retry_count = self.max_retry.or(base.max_retry_count);
        base.message_timeout_ms = self.message_timeout.map(|s| (s * 1000.0) as u64).or(base.message_timeout_ms);
        base.max_in_flight = self.max_in_flight.or(base.max_in_flight);
        base.max_consumers = self.max_consumers.or(base.max_consumers);
        base.checkpoint_after_count = self.checkpoint_after.or(base.checkpoint_after_count);
        base.checkpoint_after_ms = self.checkpoint_after_ms.or(base.checkpoint_after_ms);
        base.retry_backoff_ms = self.retry_backoff_ms.or(base.retry_backoff_ms);
        base.retry_backoff_max_ms = self.retry_backoff_max_ms.or(base.retry_backoff_max_ms);
        let filter = self.filter.to_proto();
        if filter != Default::default() {
            base.filter = Some(filter);
        }
        Ok(base)
    }
}

fn strategy_name(strategy: i32) -> &'static str {
    match ConsumerStrategy::try_from(strategy) {
        Ok(ConsumerStrategy::DispatchToSingle) => "dispatch-to-single",
        Ok(ConsumerStrategy::Pinned) => "pinned",
        _ => "round-robin",
    }
}

fn info_json(info: &GroupInfo) -> serde_json::Value {
    let s = info.settings.clone().unwrap_or_default();
    json!({
        "group": info.group, "source": s.source, "strategy": strategy_name(s.strategy),
        "checkpoint": info.checkpoint, "head": info.head, "lag": info.lag, "in_flight": info.in_flight,
        "parked": info.parked, "replaying": info.replaying, "running": info.running,
        "settings": {
            "message_timeout_ms": s.message_timeout_ms, "max_retry_count": s.max_retry_count, "max_in_flight": s.max_in_flight,
            "max_consumers": s.max_consumers, "checkpoint_after_count": s.checkpoint_after_count,
            "checkpoint_after_ms": s.checkpoint_after_ms, "retry_backoff_ms": s.retry_backoff_ms, "retry_backoff_max_ms": s.retry_backoff_max_ms,
        },
        "consumers": info.consumers.iter().map(|c| json!({
            "consumer_id": c.consumer_id, "name": c.name, "in_flight": c.in_flight, "delivered": c.delivered, "acked": c.acked, "nacked": c.nacked,
        })).collect::<Vec<_>>(),
    })
}

fn print_info(info: &GroupInfo, as_json: bool) {
    if as_json {
        println!("{}", info_json(info));
        return;
    }
    let s = info.settings.clone().unwrap_or_default();
    println!(
        "{}  source={} strategy={} checkpoint={} head={} lag={} in_flight={} parked={} replaying={} running={}",
        info.group, s.source, strategy_name(s.strategy), info.checkpoint, info.head, info.lag, info.in_flight, info.parked, info.replaying, info.running
    );
    for c in &info.consumers {
        println!("  consumer {} ({}): in_flight={} delivered={} acked={} nacked={}", c.consumer_id, c.name, c.in_flight, c.delivered, c.acked, c.nacked);
    }
}

pub async fn group(options: &ClientOptions, command: GroupCommand) -> Result<(), CliError> {
    let mut client = PersistentSubscriptionsClient::new(connect(options).await?).max_decoding_message_size(64 * 1024 * 1024);
    match command {
        GroupCommand::Create { group, source, from, settings } => {
            let (from, from_revision) = parse_from(&from)?;
            let base = GroupSettings { source, from: from as i32, from_revision, ..Default::default() };
            let settings = settings.apply(base)?;
            let info = client.create(CreateGroupRequest { group, settings: Some(settings) }).await?.into_inner();
            print_info(&info, options.json);
        }
        GroupCommand::Update { group, settings } => {
            let current = client.info(GroupInfoRequest { group: group.clone() }).await?.into_inner();
            let settings = settings.apply(current.settings.unwrap_or_default())?;
            let info = client.update(UpdateGroupRequest { group, settings: Some(settings) }).await?.into_inner();
            print_info(&info, options.json);
        }
        GroupCommand::Delete { group } => {
            client.delete(DeleteGroupRequest { group: group.clone() }).await?;
            if options.json {
                println!("{}", json!({"deleted": group}));
            } else {
                println!("deleted group {group}");
            }
        }
        GroupCommand::Info { group } => print_info(&client.info(GroupInfoRequest { group }).await?.into_inner(), options.json),
        GroupCommand::List => {
            let groups = client.list(ListGroupsRequest {}).await?.into_inner().groups;
            if options.json {
                println!("{}", json!(groups.iter().map(info_json).collect::<Vec<_>>()));
            } else {
                groups.iter().for_each(|info| print_info(info, false));
            }
        }
        GroupCommand::Connect { group, ack_all: _, nack, limit, name } => {
            let nack = match nack.as_deref() {
                None => None,
                Some("retry") => Some(NackAction::Retry),
                Some("park") => Some(NackAction::Park),
                Some("skip") => Some(NackAction::Skip),
                Some(other) => return Err(CliError::Usage(format!("--nack takes retry, park or skip, not `{other}`"))),
            };
            let (requests, outbound) = mpsc::channel(64);
            let start = ConnectRequest { kind: Some(InKind::Start(ConnectStart { group, consumer_name: name })) };
            requests.send(start).await.expect("the channel is open");
            let mut responses = client.connect_consumer(ReceiverStream::new(outbound)).await?.into_inner();
            let mut received = 0u64;
            while let Some(message) = responses.message().await? {
                match message.kind {
                    Some(OutKind::Connected(c)) => eprintln!("connected to group {} as consumer {} (max in flight {})", c.group, c.consumer_id, c.max_in_flight),
                    Some(OutKind::Delivery(delivery)) => {
                        let event = delivery.event.unwrap_or_default();
                        if options.json {
                            let mut line = event_json(&event);
                            line["delivery_id"] = json!(delivery.delivery_id);
                            line["retry_count"] = json!(delivery.retry_count);
                            line["replayed"] = json!(delivery.replayed);
                            println!("{line}");
                        } else {
                            print_event(&event, false);
                        }
                        let ids = vec![delivery.delivery_id];
                        let answer = match nack {
                            None => InKind::Ack(Ack { delivery_ids: ids }),
                            Some(action) => InKind::Nack(Nack { delivery_ids: ids, action: action as i32, reason: "strata group connect --nack".into(), retry_delay_ms: 0 }),
                        };
                        if requests.send(ConnectRequest { kind: Some(answer) }).await.is_err() {
                            break;
                        }
                        received += 1;
                        if limit.is_some_and(|limit| received >= limit) {
                            // Let the last answer reach the server before closing.
                            tokio::time::sleep(std::time::Duration::from_millis(200)).await;
                            break;
                        }
                    }
                    None => {}
                }
            }
        }
        GroupCommand::ReplayParked { group, stop_at } => {
            let replaying = client.replay_parked(ReplayParkedRequest { group, stop_at }).await?.into_inner().replaying;
            if options.json {
                println!("{}", json!({"replaying": replaying}));
            } else {
                println!("replaying {replaying} parked event(s)");
            }
        }
    }
    Ok(())
}
