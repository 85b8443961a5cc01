//! chitchat's [`Transport`] over UDP with every datagram sealed (see [`crate::auth`]).
//!
//! chitchat keeps its message encoding private (`ChitchatEnvelope::serialize` is
//! `pub(crate)`), and its own `UdpSocket` is the only public encoder and decoder. So each
//! authenticated socket owns, besides the public socket, a private pair on 127.0.0.1:
//! - `codec`: chitchat's `UdpSocket`, which encodes what chitchat sends and decodes what
//!   we accept;
//! - `relay`: a plain socket that takes the codec's encoded bytes (to seal and send them
//!   out) and hands opened payloads to the codec.
//!
//! Only datagrams that come from the expected end of the pair are used, so another local
//! process writing to those loopback ports cannot bypass authentication. Gossip is a few
//! datagrams per second per node: the two extra loopback hops cost nothing measurable.

use std::net::{Ipv4Addr, SocketAddr};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use async_trait::async_trait;
use chitchat::transport::{RecvOutcome, SendOutcome, Socket, Transport, UdpSocket as ChitchatUdpSocket};
use chitchat::ChitchatEnvelope;

use crate::auth::{GossipCounters, Opener, Sealer, DATAGRAM_BYTES_MAX};

/// How long the codec may take to decode a payload handed to it over loopback; a payload
/// it rejects (it logs and skips it) is given up after this.
const CODEC_DECODE_TIMEOUT_MS: u64 = 200;

/// Builds authenticated sockets for one cluster.
pub struct AuthenticatedUdpTransport {
    secret: Arc<[u8]>,
    cluster_id: String,
    instance: u64,
    counters: Arc<GossipCounters>,
}

impl AuthenticatedUdpTransport {
    /// `instance` must differ between process starts (it scopes the replay counters).
    pub fn new(secret: &[u8], cluster_id: &str, instance: u64, counters: Arc<GossipCounters>) -> Self {
        Self { secret: secret.into(), cluster_id: cluster_id.to_string(), instance, counters }
    }
}

#[async_trait]
impl Transport for AuthenticatedUdpTransport {
    async fn open(&self, listen_addr: SocketAddr) -> anyhow::Result<Box<dyn Socket>> {
        let public = tokio::net::UdpSocket::bind(listen_addr)
            .await
            .with_context(|| format!("failed to bind the gossip socket {listen_addr}/UDP"))?;
        let loopback: SocketAddr = (Ipv4Addr::LOCALHOST, 0).into();
        let codec = ChitchatUdpSocket::open(loopback).await?;
        let relay = tokio::net::UdpSocket::bind(loopback).await.context("failed to bind the gossip relay socket")?;
        Ok(Box::new(AuthenticatedSocket {
            codec_addr: codec.local_addr()?,
            relay_addr: relay.local_addr()?,
            public,
            codec,
            relay,
            sealer: Sealer::new(&self.secret, &self.cluster_id, self.instance),
            opener: Opener::new(&self.secret, &self.cluster_id),
            pending: None,
            buffer: vec![0u8; DATAGRAM_BYTES_MAX],
            sealed: Vec::with_capacity(DATAGRAM_BYTES_MAX),
            counters: self.counters.clone(),
        }))
    }
}

struct AuthenticatedSocket {
    public: tokio::net::UdpSocket,
    codec: ChitchatUdpSocket,
    codec_addr: SocketAddr,
    relay: tokio::net::UdpSocket,
    relay_addr: SocketAddr,
    sealer: Sealer,
    opener: Opener,
    /// Sender of the payload handed to the codec and not yet decoded (one at a time). Kept
    /// across calls because chitchat cancels `recv` at every gossip tick.
    pending: Option<SocketAddr>,
    buffer: Vec<u8>,
    sealed: Vec<u8>,
    counters: Arc<GossipCounters>,
}

#[async_trait]
impl Socket for AuthenticatedSocket {
    fn local_addr(&self) -> anyhow::Result<SocketAddr> {
        self.public.local_addr().context("failed to get the gossip socket address")
    }

    async fn send(&mut self, to: SocketAddr, envelope: ChitchatEnvelope) -> anyhow::Result<SendOutcome> {
        self.codec.send(self.relay_addr, envelope).await?;
        let len = loop {
            let (len, from) = self.relay.recv_from(&mut self.buffer).await.context("gossip relay receive failed")?;
            if from == self.codec_addr {
                break len;
            }
        };
        self.sealer.seal(&self.buffer[..len], &mut self.sealed);
        if self.sealed.len() > DATAGRAM_BYTES_MAX {
            self.counters.oversize.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(bytes = self.sealed.len(), to = %to, "gossip datagram too large once sealed; not sent");
            return Ok(SendOutcome { num_bytes_sent: 0 });
        }
        let sent = self.public.send_to(&self.sealed, to).await.context("failed to send a gossip datagram")?;
        self.counters.sent.fetch_add(1, Ordering::Relaxed);
        Ok(SendOutcome { num_bytes_sent: sent })
    }

    /// Cancellable: chitchat drops this future at every gossip tick; `pending` survives.
    async fn recv(&mut self) -> anyhow::Result<RecvOutcome> {
        loop {
            if let Some(from_addr) = self.pending {
                match tokio::time::timeout(Duration::from_millis(CODEC_DECODE_TIMEOUT_MS), self.codec.recv()).await {
                    Ok(outcome) => {
                        let outcome = outcome?;
                        if outcome.from_addr != self.relay_addr {
                            // Not ours: someone else wrote to the codec's loopback port.
                            self.counters.record_drop(crate::auth::DropReason::Malformed);
                            continue;
                        }
                        self.pending = None;
                        self.counters.accepted.fetch_add(1, Ordering::Relaxed);
                        return Ok(RecvOutcome { from_addr, ..outcome });
                    }
                    Err(_) => {
                        // Authentic but not a chitchat message (the codec logged and skipped it).
                        self.pending = None;
                        self.counters.record_drop(crate::auth::DropReason::Malformed);
                        continue;
                    }
                }
            }
            let (len, from) = match self.public.recv_from(&mut self.buffer).await {
                Ok(received) => received,
                Err(e) if is_transient(&e) => continue,
                Err(e) => return Err(e).context("fatal gossip receive error"),
            };
            match self.opener.open(&self.buffer[..len]) {
                Ok(payload) => {
                    self.relay.send_to(payload, self.codec_addr).await.context("gossip relay send failed")?;
                    self.pending = Some(from);
                }
                Err(reason) => {
                    self.counters.record_drop(reason);
                    tracing::debug!(from = %from, reason = reason.label(), bytes = len, "dropped a gossip datagram");
                }
            }
        }
    }
}

fn is_transient(error: &std::io::Error) -> bool {
    matches!(
        error.kind(),
        std::io::ErrorKind::ConnectionReset | std::io::ErrorKind::ConnectionRefused | std::io::ErrorKind::OutOfMemory
    )
}
