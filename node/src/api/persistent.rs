//! `strata.v1.PersistentSubscriptions`: consumer groups (SPEC §3 item 7, §4).
//!
//! Definitions and checkpoints are control entries through Raft; deliveries are run by
//! the leader (`crate::groups`). Every call is routed to the leader; `ConnectConsumer` on
//! a follower is proxied to the leader both ways, so a consumer may connect anywhere.

use std::pin::Pin;
use std::sync::Arc;

use futures::{Stream, StreamExt};
use prost::Message;
use strata_proto::v1::connect_request::Kind as InKind;
use strata_proto::v1::persistent_subscriptions_client::PersistentSubscriptionsClient;
use strata_proto::v1::persistent_subscriptions_server::PersistentSubscriptions;
use strata_proto::v1::{
    ConnectRequest, ConnectResponse, CreateGroupRequest, DeleteGroupRequest, DeleteGroupResponse, GroupInfo, GroupInfoRequest,
    ListGroupsRequest, ListGroupsResponse, NackAction, ReplayParkedRequest, ReplayParkedResponse, UpdateGroupRequest,
};
use strata_storage::{ControlCommand, ControlSuccess, GroupRecord};
use tokio::sync::{mpsc, oneshot};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};

use super::NodeContext;
use crate::access::caller;
use crate::clock::now_unix_ms;
use crate::control::propose;
use crate::error::ApiError;
use crate::groups::runtime::Request as RuntimeRequest;
use crate::groups::settings::{effective, group_name, parked_stream, start_of};
use crate::limits::{GROUP_IN_FLIGHT_MAX, READ_PAGE_EVENTS_MAX};
use crate::routing::{forwarded_failure, is_forwarded, mark_forwarded, Route};

pub struct PersistentService {
    ctx: Arc<NodeContext>,
}

impl PersistentService {
    pub fn new(ctx: Arc<NodeContext>) -> Self {
        Self { ctx }
    }

    fn client(channel: tonic::transport::Channel) -> PersistentSubscriptionsClient<tonic::transport::Channel> {
        PersistentSubscriptionsClient::new(channel).max_decoding_message_size(crate::limits::GRPC_ENCODE_BYTES_MAX)
    }

    /// The group's record on the leader, after a read index.
    async fn record(&self, name: &str) -> Result<GroupRecord, ApiError> {
        self.ctx.router.linearize().await?;
        self.ctx.events.group(name)?.ok_or_else(|| ApiError::GroupNotFound { group: name.to_string() })
    }

    fn group_of(success: ControlSuccess) -> Result<GroupRecord, ApiError> {
        match success {
            ControlSuccess::Group(record) => Ok(record),
            other => Err(ApiError::Internal { reason: format!("group command answered {other:?}") }),
        }
    }

    /// Serves a consumer's connection on the leader.
    async fn connect_local(&self, start: strata_proto::v1::ConnectStart, mut inbound: Streaming<ConnectRequest>) -> Result<ConnectOut, ApiError> {
        let mailbox = self.ctx.groups.runtime(&self.ctx, &start.group).await?;
        // Room for every delivery a consumer may hold, plus the connection's markers.
        let (sender, receiver) = mpsc::channel(GROUP_IN_FLIGHT_MAX as usize + 2);
        let (reply, answer) = oneshot::channel();
        let stopped = || ApiError::Unavailable { reason: "the group stopped running here; connect again".into(), leader_id: None, leader_addr: None };
        mailbox.send(RuntimeRequest::Connect { name: start.consumer_name, sender, reply }).await.map_err(|_| stopped())?;
        let connected = answer.await.map_err(|_| stopped())??;
        let consumer: u64 = connected.consumer_id.parse().expect("consumer ids are numbers");
        tokio::spawn(async move {
            while let Ok(Some(message)) = inbound.message().await {
                let request = match message.kind {
                    Some(InKind::Ack(ack)) => RuntimeRequest::Ack { consumer, ids: ack.delivery_ids },
                    Some(InKind::Nack(nack)) => RuntimeRequest::Nack {
                        consumer,
                        ids: nack.delivery_ids,
                        action: NackAction::try_from(nack.action).unwrap_or(NackAction::Retry),
                        reason: nack.reason,
                        delay_ms: nack.retry_delay_ms,
                    },
                    Some(InKind::Start(_)) | None => continue,
                };
                if mailbox.send(request).await.is_err() {
                    return;
                }
            }
            let _ = mailbox.send(RuntimeRequest::Disconnect { consumer }).await;
        });
        Ok(Box::pin(ReceiverStream::new(receiver)))
    }
}

/// Whether `caller` may read a group's source (None: `$all`).
fn allow_group_source(ctx: &NodeContext, caller: &crate::access::Caller, source_stream: Option<&str>) -> Result<(), ApiError> {
    ctx.access.stream(caller, strata_security::StreamAccess::Read, source_stream.unwrap_or(super::ALL_STREAMS))
}

type ConnectOut = Pin<Box<dyn Stream<Item = Result<ConnectResponse, Status>> + Send>>;

#[tonic::async_trait]
impl PersistentSubscriptions for PersistentService {
    async fn create(&self, request: Request<CreateGroupRequest>) -> Result<Response<GroupInfo>, Status> {
        let forwarded = is_forwarded(&request);
        let caller = caller(&request)?;
        let request = request.into_inner();
        group_name(&request.group)?;
        let (settings, source_stream) = effective(request.settings.clone().unwrap_or_default())?;
        // Creating a group is operating (the admission layer) on a source the caller may read.
        allow_group_source(&self.ctx, &caller, source_stream.as_deref())?;
        let ctx = &self.ctx;
        let remote = request.clone();
        ctx.router
            .on_leader(
                forwarded,
                || async {
                    let command = ControlCommand::CreateGroup {
                        name: request.group.clone(),
                        source_stream,
                        start: start_of(&settings),
                        settings: settings.encode_to_vec(),
                        created_unix_ms: now_unix_ms(),
                    };
                    let record = Self::group_of(propose(&ctx.router, command).await?.success)?;
                    ctx.groups.info(&ctx.events, &record).await
                },
                |channel| async move { Self::client(channel).create(mark_forwarded(remote)).await.map_err(forwarded_failure) },
            )
            .await
    }

    async fn update(&self, request: Request<UpdateGroupRequest>) -> Result<Response<GroupInfo>, Status> {
        let forwarded = is_forwarded(&request);
        let request = request.into_inner();
        group_name(&request.group)?;
        let (mut settings, _) = effective(request.settings.clone().unwrap_or_default())?;
        let remote = request.clone();
        self.ctx
            .router
            .on_leader(
                forwarded,
                || async {
                    let current = self.record(&request.group).await?;
                    let stored = strata_proto::v1::GroupSettings::decode(current.settings.as_slice())
                        .map_err(|e| ApiError::Internal { reason: format!("stored group settings do not decode: {e}") })?;
                    if settings.source != stored.source {
                        return Err(ApiError::InvalidArgument {
                            field: "settings.source".into(),
                            reason: format!("a group's source cannot change (it is `{}`)", stored.source),
                        });
                    }
                    // Where the group started is history: keep it as created.
                    settings.from = stored.from;
                    settings.from_revision = stored.from_revision;
                    let command = ControlCommand::UpdateGroup { name: request.group.clone(), settings: settings.encode_to_vec() };
                    let record = Self::group_of(propose(&self.ctx.router, command).await?.success)?;
                    self.ctx.groups.info(&self.ctx.events, &record).await
                },
                |channel| async move { Self::client(channel).update(mark_forwarded(remote)).await.map_err(forwarded_failure) },
            )
            .await
    }

    async fn delete(&self, request: Request<DeleteGroupRequest>) -> Result<Response<DeleteGroupResponse>, Status> {
        let forwarded = is_forwarded(&request);
        let request = request.into_inner();
        group_name(&request.group)?;
        let remote = request.clone();
        self.ctx
            .router
            .on_leader(
                forwarded,
                || async {
                    propose(&self.ctx.router, ControlCommand::DeleteGroup { name: request.group.clone() }).await?;
                    Ok(DeleteGroupResponse {})
                },
                |channel| async move { Self::client(channel).delete(mark_forwarded(remote)).await.map_err(forwarded_failure) },
            )
            .await
    }

    async fn list(&self, request: Request<ListGroupsRequest>) -> Result<Response<ListGroupsResponse>, Status> {
        let forwarded = is_forwarded(&request);
        let ctx = &self.ctx;
        ctx.router
            .on_leader(
                forwarded,
                || async {
                    ctx.router.linearize().await?;
                    let mut groups = Vec::new();
                    for record in ctx.events.groups()? {
                        groups.push(ctx.groups.info(&ctx.events, &record).await?);
                    }
                    Ok(ListGroupsResponse { groups })
                },
                |channel| async move { Self::client(channel).list(mark_forwarded(ListGroupsRequest {})).await },
            )
            .await
    }

    async fn info(&self, request: Request<GroupInfoRequest>) -> Result<Response<GroupInfo>, Status> {
        let forwarded = is_forwarded(&request);
        let request = request.into_inner();
        group_name(&request.group)?;
        let remote = request.clone();
        self.ctx
            .router
            .on_leader(
                forwarded,
                || async {
                    let record = self.record(&request.group).await?;
                    self.ctx.groups.info(&self.ctx.events, &record).await
                },
                |channel| async move { Self::client(channel).info(mark_forwarded(remote)).await },
            )
            .await
    }

    type ConnectConsumerStream = ConnectOut;

    async fn connect_consumer(&self, request: Request<Streaming<ConnectRequest>>) -> Result<Response<Self::ConnectConsumerStream>, Status> {
        let forwarded = is_forwarded(&request);
        let caller = caller(&request)?;
        let mut inbound = request.into_inner();
        let first = inbound.message().await?.ok_or_else(|| Status::cancelled("the consumer left before ConnectStart"))?;
        let Some(InKind::Start(start)) = first.kind.clone() else {
            return Err(ApiError::InvalidArgument { field: "start".into(), reason: "the first request must be ConnectStart".into() }.into());
        };
        group_name(&start.group)?;
        // Consuming a group is reading its source: checked here, before a follower
        // forwards (the leader takes a forwarded call as the node's).
        if !caller.principal.has(strata_security::Role::Admin) {
            if self.ctx.events.group(&start.group).map_err(ApiError::from)?.is_none() {
                self.ctx.router.linearize().await?;
            }
            let record = self.ctx.events.group(&start.group).map_err(ApiError::from)?.ok_or_else(|| ApiError::GroupNotFound { group: start.group.clone() })?;
            allow_group_source(&self.ctx, &caller, record.source_stream.as_deref())?;
        }
        match self.ctx.router.route_write(forwarded).await? {
            Route::Local => Ok(Response::new(self.connect_local(start, inbound).await?)),
            Route::Leader { channel, .. } => {
                // Proxy: the consumer's requests to the leader, the leader's responses back.
                let outbound = futures::stream::once(async move { first })
                    .chain(inbound.take_while(|message| std::future::ready(message.is_ok())).filter_map(|m| std::future::ready(m.ok())));
                let responses = Self::client(channel).connect_consumer(mark_forwarded(outbound)).await?.into_inner();
                Ok(Response::new(Box::pin(responses)))
            }
        }
    }

    async fn replay_parked(&self, request: Request<ReplayParkedRequest>) -> Result<Response<ReplayParkedResponse>, Status> {
        let forwarded = is_forwarded(&request);
        let request = request.into_inner();
        group_name(&request.group)?;
        let remote = request.clone();
        self.ctx
            .router
            .on_leader(
                forwarded,
                || async {
                    let record = self.record(&request.group).await?;
                    let parked = parked_stream(&record.name);
                    let head = self.ctx.events.stream_head(&parked)?.map_or(0, |h| h.last_version + 1);
                    let target = match request.stop_at {
                        None => head,
                        Some(stop_at) => self.parked_versions_up_to(&parked, record.parked_replay_target, head, stop_at).await?,
                    };
                    if target <= record.parked_replay_target {
                        return Ok(ReplayParkedResponse { replaying: 0 });
                    }
                    let command = ControlCommand::ReplayParked { name: record.name.clone(), group_id: record.group_id, target };
                    let updated = Self::group_of(propose(&self.ctx.router, command).await?.success)?;
                    Ok(ReplayParkedResponse { replaying: updated.parked_replay_target - record.parked_replay_target })
                },
                |channel| async move { Self::client(channel).replay_parked(mark_forwarded(remote)).await.map_err(forwarded_failure) },
            )
            .await
    }
}

impl PersistentService {
    /// The end (exclusive) of the parked versions from `from` whose `$all` position is at
    /// most `stop_at`.
    async fn parked_versions_up_to(&self, parked: &str, from: u64, head: u64, stop_at: u64) -> Result<u64, ApiError> {
        let mut end = from;
        while end < head {
            let page = self.ctx.reader.read_stream(parked, end, false, READ_PAGE_EVENTS_MAX).await?;
            let Some(last) = page.last().map(|e| e.version) else { break };
            for event in &page {
                if event.position > stop_at {
                    return Ok(end);
                }
                end = event.version + 1;
            }
            if last + 1 >= head {
                break;
            }
        }
        Ok(end)
    }
}
