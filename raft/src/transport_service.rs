//! The server side of the Raft transport: decodes peer RPCs and hands them to openraft,
//! answers read-index requests (leader reads for followers) and bootstrap probes.

use std::io::Write;

use openraft::raft::ReadPolicy;
use strata_proto::v1::raft::raft_transport_server::RaftTransport;
use strata_proto::v1::raft::{ProbeRequest, ProbeResponse, RaftMessage, ReadIndexRequest, ReadIndexResponse, SnapshotChunk};
use tokio_stream::StreamExt;
use tonic::{Request, Response, Status, Streaming};

use crate::codec::{decode, encode};
use crate::{LogStore, NodeId, Raft, ResyncGate, Snapshot, SnapshotFile, SnapshotMeta, StateMachine, Vote};

/// Serves `RaftTransport` for one node.
pub struct RaftTransportService {
    node_id: NodeId,
    raft: Raft,
    log_store: LogStore,
    state_machine: StateMachine,
    resync: ResyncGate,
    /// Turns true when the node starts to stop: replication streams end then, since a
    /// graceful stop of the gRPC server waits for every open call to finish, and the
    /// leader's stream never does by itself.
    stopping: tokio::sync::watch::Receiver<bool>,
}

impl RaftTransportService {
    pub fn new(
        node_id: NodeId,
        raft: Raft,
        log_store: LogStore,
        state_machine: StateMachine,
        resync: ResyncGate,
        stopping: tokio::sync::watch::Receiver<bool>,
    ) -> Self {
        Self { node_id, raft, log_store, state_machine, resync, stopping }
    }

    /// Refuses a vote, pre-vote or leadership hand-over while this node re-syncs.
    fn refuse_while_resyncing(&self, what: &str) -> Result<(), Status> {
        if self.resync.is_resyncing() {
            return Err(Status::unavailable(format!(
                "node {} is re-syncing after a corrupt raft log: it takes no part in {what} until it has caught up",
                self.node_id
            )));
        }
        Ok(())
    }
}

/// Interceptor of the Raft transport when TLS is on: only a peer that presented a node
/// certificate (cluster CA, node name) may replicate, vote or send a snapshot. A client
/// certificate, or none, gets PERMISSION_DENIED.
pub fn node_peers_only(request: Request<()>) -> Result<Request<()>, Status> {
    match request.extensions().get::<strata_security::PeerInfo>() {
        Some(peer) if peer.node => Ok(request),
        peer => {
            let from = peer.and_then(|p| p.remote_addr).map_or_else(|| "unknown".to_string(), |a| a.to_string());
            tracing::warn!(from, "raft rpc refused: the peer presented no node certificate");
            Err(Status::permission_denied("raft rpcs are for cluster nodes: present a node certificate from the cluster CA"))
        }
    }
}

/// Resolves when `stopping` turns true (the node starts to stop), or its sender is gone.
/// The node's servers stop gracefully on it too.
pub async fn stopped(mut stopping: tokio::sync::watch::Receiver<bool>) {
    let _ = stopping.wait_for(|stop| *stop).await;
}

fn bad_request(e: std::io::Error) -> Status {
    Status::invalid_argument(e.to_string())
}

fn raft_failure(e: impl std::fmt::Display) -> Status {
    Status::internal(format!("raft rejected the rpc: {e}"))
}

fn reply<T: serde::Serialize>(value: &T) -> Result<Response<RaftMessage>, Status> {
    Ok(Response::new(RaftMessage { payload: encode(value).into() }))
}

/// The responses of a `StreamAppend` call.
type StreamAppendResponses = std::pin::Pin<Box<dyn futures::Stream<Item = Result<RaftMessage, Status>> + Send + 'static>>;

#[tonic::async_trait]
impl RaftTransport for RaftTransportService {
    type StreamAppendStream = StreamAppendResponses;

    /// Hands the leader's stream of AppendEntries to openraft, which answers each once its
    /// entries are flushed, in order. A request that cannot be read ends the input there;
    /// its error is the stream's last item, after the answers to the requests before it.
    async fn stream_append(&self, request: Request<Streaming<RaftMessage>>) -> Result<Response<Self::StreamAppendStream>, Status> {
        let unreadable: std::sync::Arc<std::sync::Mutex<Option<Status>>> = Default::default();
        let failure = unreadable.clone();
        let input = request.into_inner().map_while(move |message| {
            let decoded = message.and_then(|message| {
                decode::<openraft::raft::AppendEntriesRequest<crate::TypeConfig>>("append entries request", &message.payload)
                    .map_err(bad_request)
            });
            match decoded {
                Ok(rpc) => Some(rpc),
                Err(status) => {
                    *failure.lock().expect("failure slot is never poisoned") = Some(status);
                    None
                }
            }
        });
        // openraft reads the requests on a task of its own, which holds the call open (and
        // with it the gRPC server's graceful stop) until they end: they end when the node stops.
        let input = futures::StreamExt::take_until(input, stopped(self.stopping.clone()));
        let answers = self.raft.stream_append(input).map(|result| match result {
            Ok(answer) => reply(&answer).map(Response::into_inner),
            Err(fatal) => Err(Status::unavailable(format!("raft stopped: {fatal}"))),
        });
        let last = futures::stream::once(async move { unreadable.lock().expect("failure slot is never poisoned").take() })
            .filter_map(|status| status.map(Err));
        Ok(Response::new(Box::pin(futures::StreamExt::take_until(answers.chain(last), stopped(self.stopping.clone())))))
    }

    async fn append_entries(&self, request: Request<RaftMessage>) -> Result<Response<RaftMessage>, Status> {
        let rpc = decode("append entries request", &request.into_inner().payload).map_err(bad_request)?;
        let response = self.raft.append_entries(rpc).await.map_err(raft_failure)?;
        reply(&response)
    }

    async fn vote(&self, request: Request<RaftMessage>) -> Result<Response<RaftMessage>, Status> {
        self.refuse_while_resyncing("elections")?;
        let rpc = decode("vote request", &request.into_inner().payload).map_err(bad_request)?;
        let response = self.raft.vote(rpc).await.map_err(raft_failure)?;
        reply(&response)
    }

    async fn pre_vote(&self, request: Request<RaftMessage>) -> Result<Response<RaftMessage>, Status> {
        self.refuse_while_resyncing("elections")?;
        let rpc = decode("pre-vote request", &request.into_inner().payload).map_err(bad_request)?;
        let response = self.raft.pre_vote(rpc).await.map_err(raft_failure)?;
        reply(&response)
    }

    async fn transfer_leader(&self, request: Request<RaftMessage>) -> Result<Response<RaftMessage>, Status> {
        self.refuse_while_resyncing("leadership transfers")?;
        let rpc = decode("transfer leader request", &request.into_inner().payload).map_err(bad_request)?;
        let response = self.raft.handle_transfer_leader(rpc).await.map_err(raft_failure)?;
        reply(&response)
    }

    async fn install_snapshot(&self, request: Request<Streaming<SnapshotChunk>>) -> Result<Response<RaftMessage>, Status> {
        let mut chunks = request.into_inner();
        let first = chunks.next().await.ok_or_else(|| Status::invalid_argument("empty snapshot stream"))??;
        let (vote, meta): (Vote, SnapshotMeta) = decode("snapshot meta", &first.meta).map_err(bad_request)?;
        let path = self.state_machine.incoming_snapshot_path();
        let mut file = std::io::BufWriter::new(std::fs::File::create(&path).map_err(|e| Status::internal(e.to_string()))?);
        let mut received = 0u64;
        while let Some(chunk) = chunks.next().await {
            let chunk = chunk?;
            received += chunk.data.len() as u64;
            file.write_all(&chunk.data).map_err(|e| Status::internal(e.to_string()))?;
        }
        let file = file.into_inner().map_err(|e| Status::internal(e.to_string()))?;
        file.sync_all().map_err(|e| Status::internal(e.to_string()))?;
        // A transfer cut short leaves a file that fails verification on install; check it
        // here too so a broken transfer is refused before openraft commits to it.
        let checked_path = path.clone();
        let verified = tokio::task::spawn_blocking(move || strata_storage::verify_snapshot(&checked_path))
            .await
            .map_err(|e| Status::internal(e.to_string()))?;
        if let Err(e) = verified {
            let _ = std::fs::remove_file(&path);
            return Err(Status::data_loss(format!("snapshot transfer is damaged: {e} bytes=`{received}`")));
        }
        let snapshot = Snapshot { meta, snapshot: SnapshotFile { path } };
        let response = self.raft.install_full_snapshot(vote, snapshot).await.map_err(raft_failure)?;
        reply(&response)
    }

    async fn read_index(&self, _request: Request<ReadIndexRequest>) -> Result<Response<ReadIndexResponse>, Status> {
        let linearizer = self
            .raft
            .get_read_linearizer(ReadPolicy::ReadIndex)
            .await
            .map_err(|e| Status::unavailable(format!("not the leader: {e}")))?;
        Ok(Response::new(ReadIndexResponse { read_index: linearizer.read_log_id().index() }))
    }

    async fn probe(&self, _request: Request<ProbeRequest>) -> Result<Response<ProbeResponse>, Status> {
        let initialized = !self.log_store.is_pristine().map_err(|e| Status::internal(e.to_string()))?;
        Ok(Response::new(ProbeResponse { node_id: self.node_id, initialized }))
    }
}
