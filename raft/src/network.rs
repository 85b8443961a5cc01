//! openraft's network: Raft RPCs to peers over the internal `RaftTransport` gRPC service.
//!
//! Messages are bincode inside protobuf bytes. Snapshots stream from their file in
//! [`SNAPSHOT_CHUNK_BYTES`] chunks, so memory stays bounded whatever the snapshot size.

use std::collections::HashMap;
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use openraft::errors::{NetworkError, RPCError, ReplicationClosed, StreamingError, Unreachable};
use futures::{Stream, StreamExt};
use openraft::base::{BoxFuture, BoxStream};
use openraft::network::{stream_append_sequential, RPCOption, RaftNetworkFactory, RaftNetworkV2};
use openraft::raft::StreamAppendResult;
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, SnapshotResponse, TransferLeaderRequest, TransferLeaderResponse,
    VoteRequest, VoteResponse,
};
use openraft::impls::BasicNode;
use openraft::OptionalSend;
use openraft::type_config::TypeConfigExt;
use strata_proto::v1::raft::raft_transport_client::RaftTransportClient;
use strata_proto::v1::raft::{RaftMessage, SnapshotChunk};
use tokio::io::AsyncReadExt;
use tonic::transport::{Channel, Endpoint};

use crate::codec::{decode, encode};
use crate::config::{RAFT_RPC_MESSAGE_BYTES_MAX, SNAPSHOT_CHUNK_BYTES};
use crate::{NodeId, Snapshot, SnapshotFile, TypeConfig, Vote};

/// How long a connection attempt to a peer may take before it counts as unreachable.
pub const PEER_CONNECT_TIMEOUT_MS: u64 = 500;
/// Snapshot chunks queued towards the transport: one being sent, one being read.
const SNAPSHOT_CHUNKS_IN_FLIGHT_MAX: usize = 2;
/// AppendEntries requests sent on a replication stream and not yet answered; the next one
/// waits. openraft's follower side buffers as many (its `PIPELINE_BUFFER_SIZE`).
pub const REPLICATION_PIPELINE_MAX: usize = 64;

/// Lazily connected gRPC channels by peer address, shared by Raft and request forwarding.
#[derive(Clone, Default)]
pub struct PeerChannels {
    channels: Arc<Mutex<HashMap<String, Channel>>>,
    /// Local address every peer connection is made from (None: the kernel picks).
    source_ip: Option<std::net::IpAddr>,
    /// mTLS towards peers (None: plaintext, `--insecure`).
    tls: Option<strata_security::ClientTls>,
}

impl PeerChannels {
    /// Channels whose connections all start from `source_ip`, so that this node's outgoing
    /// traffic can be told apart (and cut off, by `strata cluster chaos partition`).
    pub fn with_source_ip(source_ip: Option<std::net::IpAddr>) -> Self {
        Self { channels: Arc::default(), source_ip, tls: None }
    }

    /// These channels, speaking TLS with `tls` (the node's certificate, peers verified
    /// under the node name).
    pub fn with_tls(self, tls: Option<strata_security::ClientTls>) -> Self {
        Self { tls, ..self }
    }

    /// The channel to `addr` (host:port), created on first use; reconnects by itself.
    pub fn get(&self, addr: &str) -> Result<Channel, tonic::transport::Error> {
        let mut channels = self.channels.lock().expect("peer channel map is never poisoned");
        if let Some(channel) = channels.get(addr) {
            return Ok(channel.clone());
        }
        let endpoint = Endpoint::from_shared(format!("http://{addr}"))?
            .connect_timeout(Duration::from_millis(PEER_CONNECT_TIMEOUT_MS))
            .tcp_nodelay(true)
            .initial_stream_window_size(Some(crate::HTTP2_STREAM_WINDOW_BYTES))
            .initial_connection_window_size(Some(crate::HTTP2_CONNECTION_WINDOW_BYTES))
            .http2_keep_alive_interval(Duration::from_secs(5))
            .keep_alive_timeout(Duration::from_secs(5))
            .local_address(self.source_ip);
        let channel = match &self.tls {
            Some(tls) => strata_security::tls_channel(endpoint, tls.clone(), self.source_ip),
            None => endpoint.connect_lazy(),
        };
        channels.insert(addr.to_string(), channel.clone());
        Ok(channel)
    }
}

/// Creates one [`Connection`] per peer for openraft.
#[derive(Clone)]
pub struct Network {
    channels: PeerChannels,
}

impl Network {
    pub fn new(channels: PeerChannels) -> Self {
        Self { channels }
    }
}

impl RaftNetworkFactory<TypeConfig> for Network {
    type Network = Connection;

    async fn new_client(&mut self, target: NodeId, node: &BasicNode) -> Self::Network {
        Connection { target, addr: node.addr.clone(), channels: self.channels.clone(), sequential: false }
    }
}

/// Raft RPCs towards one peer.
pub struct Connection {
    target: NodeId,
    addr: String,
    channels: PeerChannels,
    /// The peer does not serve `StreamAppend` (an older version, mid-upgrade): replicate
    /// to it one unary AppendEntries at a time, as before.
    sequential: bool,
}

type RpcError = RPCError<TypeConfig>;

impl Connection {
    fn client(&self) -> Result<RaftTransportClient<Channel>, RpcError> {
        let channel = self.channels.get(&self.addr).map_err(|e| RPCError::Unreachable(Unreachable::new(&e)))?;
        Ok(RaftTransportClient::new(channel)
            .max_decoding_message_size(RAFT_RPC_MESSAGE_BYTES_MAX)
            .max_encoding_message_size(RAFT_RPC_MESSAGE_BYTES_MAX))
    }

    fn request(&self, payload: Vec<u8>, option: &RPCOption) -> tonic::Request<RaftMessage> {
        let mut request = tonic::Request::new(RaftMessage { payload: payload.into() });
        request.set_timeout(option.hard_ttl());
        request
    }
}

/// A transport failure: unreachable when no connection could be made (openraft backs off),
/// a network error otherwise (it retries at once).
fn status_error(target: NodeId, status: tonic::Status) -> RpcError {
    tracing::debug!(target_node = target, error = %status, "raft rpc failed");
    match status.code() {
        tonic::Code::Unavailable => RPCError::Unreachable(Unreachable::new(&status)),
        _ => RPCError::Network(NetworkError::new(&status)),
    }
}

/// A replication stream that broke the protocol or its deadline: a network error, which
/// openraft answers with a new stream.
fn stream_fault(kind: std::io::ErrorKind, message: impl Into<String>) -> RpcError {
    RPCError::Network(NetworkError::new(&std::io::Error::new(kind, message.into())))
}

fn decode_reply<T: serde::de::DeserializeOwned>(what: &str, reply: tonic::Response<RaftMessage>) -> Result<T, RpcError> {
    decode(what, &reply.into_inner().payload).map_err(|e| RPCError::Network(NetworkError::new(&e)))
}

impl RaftNetworkV2<TypeConfig> for Connection {
    type SnapshotData = SnapshotFile;

    /// Replication over one `StreamAppend` call: requests go out as openraft produces them,
    /// up to [`REPLICATION_PIPELINE_MAX`] unanswered, so the follower's next entries travel
    /// while it flushes the last ones, and a request costs a message on an open stream
    /// instead of a call (headers, a new HTTP/2 stream and a task on each side). Each
    /// answer must come within `option.hard_ttl()` of its request, as a unary call's
    /// deadline; otherwise the stream fails and openraft starts another.
    fn stream_append<'s, S>(
        &'s mut self,
        input: S,
        option: RPCOption,
    ) -> BoxFuture<'s, Result<BoxStream<'s, Result<StreamAppendResult<TypeConfig>, RpcError>>, RpcError>>
    where
        S: Stream<Item = AppendEntriesRequest<TypeConfig>> + OptionalSend + Unpin + 'static,
    {
        if self.sequential {
            return stream_append_sequential(self, input, option);
        }
        Box::pin(async move {
            let mut client = self.client()?;
            let ttl = option.hard_ttl();
            // One send time per request in flight, in order (the answers come in the same
            // order), then None when openraft's requests end: the answers end after theirs.
            let (sent, sent_times) = tokio::sync::mpsc::channel::<Option<tokio::time::Instant>>(REPLICATION_PIPELINE_MAX);
            let requests = input.map(Some).chain(futures::stream::once(async { None })).filter_map(move |rpc| {
                let sent = sent.clone();
                async move {
                    // Waits while REPLICATION_PIPELINE_MAX requests are unanswered. If the
                    // answer side is gone, so is the call, and this stream with it.
                    let _ = sent.send(rpc.as_ref().map(|_| tokio::time::Instant::now())).await;
                    rpc.map(|rpc| RaftMessage { payload: encode(&rpc).into() })
                }
            });
            let answers = match client.stream_append(requests).await {
                Ok(answers) => answers.into_inner(),
                Err(status) if status.code() == tonic::Code::Unimplemented => {
                    tracing::info!(target_node = self.target, "peer has no streaming replication; replicating one call at a time");
                    self.sequential = true;
                    return Err(status_error(self.target, status));
                }
                Err(status) => return Err(status_error(self.target, status)),
            };
            let target = self.target;
            // Ends after the first failure (openraft ends the session on it), or when the
            // requests have ended and every one of them is answered.
            let answers = futures::stream::unfold(Some((answers, sent_times)), move |state| async move {
                let (mut answers, mut sent_times) = state?;
                let failed = |e: RpcError| Some((Err(e), None));
                // Until the next request goes out, watch the answers too: a follower that
                // stops ends its side of the call, and the call must then end here as well
                // (a graceful stop of its server waits for that). Send times first: each is
                // queued before its request goes out, so an answer that finds none queued
                // was never asked for; polled in random order, one that raced its send time
                // would look so.
                let sent_at = tokio::select! {
                    biased;
                    sent_at = sent_times.recv() => sent_at.flatten()?,
                    unasked = answers.message() => return match unasked {
                        Ok(None) => None,
                        Ok(Some(_)) => failed(stream_fault(std::io::ErrorKind::InvalidData, "the follower answered an append that was not sent")),
                        Err(status) => failed(status_error(target, status)),
                    },
                };
                match tokio::time::timeout_at(sent_at + ttl, answers.message()).await {
                    Err(_) => failed(stream_fault(std::io::ErrorKind::TimedOut, format!("no answer to an append within {ttl:?}"))),
                    Ok(Err(status)) => failed(status_error(target, status)),
                    Ok(Ok(None)) => failed(stream_fault(
                        std::io::ErrorKind::UnexpectedEof,
                        "the follower ended the replication stream with requests unanswered",
                    )),
                    Ok(Ok(Some(message))) => match decode::<StreamAppendResult<TypeConfig>>("stream append result", &message.payload) {
                        Ok(result) => Some((Ok(result), Some((answers, sent_times)))),
                        Err(e) => failed(RPCError::Network(NetworkError::new(&e))),
                    },
                }
            });
            Ok(Box::pin(answers) as BoxStream<'s, _>)
        })
    }

    async fn append_entries(
        &mut self,
        rpc: AppendEntriesRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<AppendEntriesResponse<TypeConfig>, RpcError> {
        let request = self.request(encode(&rpc), &option);
        let reply = self.client()?.append_entries(request).await.map_err(|s| status_error(self.target, s))?;
        decode_reply("append entries response", reply)
    }

    async fn vote(&mut self, rpc: VoteRequest<TypeConfig>, option: RPCOption) -> Result<VoteResponse<TypeConfig>, RpcError> {
        let request = self.request(encode(&rpc), &option);
        let reply = self.client()?.vote(request).await.map_err(|s| status_error(self.target, s))?;
        decode_reply("vote response", reply)
    }

    async fn pre_vote(&mut self, rpc: VoteRequest<TypeConfig>, option: RPCOption) -> Result<VoteResponse<TypeConfig>, RpcError> {
        let request = self.request(encode(&rpc), &option);
        let reply = self.client()?.pre_vote(request).await.map_err(|s| status_error(self.target, s))?;
        decode_reply("pre-vote response", reply)
    }

    async fn transfer_leader(
        &mut self,
        req: TransferLeaderRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<TransferLeaderResponse<TypeConfig>, RpcError> {
        let request = self.request(encode(&req), &option);
        let reply = self.client()?.transfer_leader(request).await.map_err(|s| status_error(self.target, s))?;
        decode_reply("transfer leader response", reply)
    }

    async fn full_snapshot(
        &mut self,
        vote: Vote,
        snapshot: Snapshot,
        cancel: impl Future<Output = ReplicationClosed> + OptionalSend + 'static,
        _option: RPCOption,
    ) -> Result<SnapshotResponse<TypeConfig>, StreamingError<TypeConfig>> {
        let mut client = self.client().map_err(|e| match e {
            RPCError::Unreachable(u) => StreamingError::Unreachable(u),
            other => StreamingError::Network(NetworkError::new(&other)),
        })?;
        let mut file = tokio::fs::File::open(&snapshot.snapshot.path).await.map_err(|e| {
            StreamingError::StorageError(openraft::StorageError::read_snapshot(None, TypeConfig::err_from_error(&e)))
        })?;
        let (chunks, outgoing) = tokio::sync::mpsc::channel::<SnapshotChunk>(SNAPSHOT_CHUNKS_IN_FLIGHT_MAX);
        let meta = encode(&(vote, snapshot.meta.clone()));
        let reader = tokio::spawn(async move {
            if chunks.send(SnapshotChunk { meta, data: Vec::new() }).await.is_err() {
                return Ok(());
            }
            loop {
                let mut data = vec![0u8; SNAPSHOT_CHUNK_BYTES];
                let mut filled = 0;
                while filled < data.len() {
                    let read = file.read(&mut data[filled..]).await?;
                    if read == 0 {
                        break;
                    }
                    filled += read;
                }
                if filled == 0 {
                    return Ok::<(), std::io::Error>(());
                }
                data.truncate(filled);
                if chunks.send(SnapshotChunk { meta: Vec::new(), data }).await.is_err() {
                    return Ok(());
                }
            }
        });
        let stream = tokio_stream::wrappers::ReceiverStream::new(outgoing);
        let call = client.install_snapshot(stream);
        let reply = tokio::select! {
            reply = call => reply,
            closed = cancel => {
                reader.abort();
                return Err(StreamingError::Closed(closed));
            }
        };
        let reply = reply.map_err(|s| StreamingError::Network(NetworkError::new(&s)))?;
        match reader.await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                return Err(StreamingError::StorageError(openraft::StorageError::read_snapshot(
                    None,
                    TypeConfig::err_from_error(&e),
                )))
            }
            Err(e) => return Err(StreamingError::Network(NetworkError::new(&e))),
        }
        decode("snapshot response", &reply.into_inner().payload).map_err(|e| StreamingError::Network(NetworkError::new(&e)))
    }
}
