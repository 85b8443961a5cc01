//! Connections of the gRPC port, both ways: the server's incoming stream (TLS or plain,
//! at most [`ConnectionLimits::max`] at once) and the client's TLS connector for tonic.

use std::io;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc};
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::{Channel, Endpoint};

use crate::tls::{ClientTls, NodeTls, carries_name};

/// Longest a TLS handshake may take before the connection is dropped: a client that
/// opens a socket and says nothing holds a connection slot only this long.
pub const TLS_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Accepted connections waiting for the gRPC server to take them.
const ACCEPTED_QUEUE_MAX: usize = 64;
/// Pause after `accept` fails (out of file descriptors): retrying at once would spin.
const ACCEPT_ERROR_PAUSE: Duration = Duration::from_millis(100);

/// Caps on the connections of one listener.
#[derive(Debug, Clone, Copy)]
pub struct ConnectionLimits {
    /// Open connections (TLS handshakes included). Past it, new connections are closed
    /// at once: a flood of sockets cannot take the node's memory or descriptors.
    pub max: usize,
}

/// What the listener turned away, for metrics.
#[derive(Debug, Default)]
pub struct ConnectionCounters {
    pub accepted: AtomicU64,
    pub refused_over_cap: AtomicU64,
    pub tls_failures: AtomicU64,
    pub open: AtomicU64,
}

/// Who is at the other end of a server connection; tonic puts it in every request's
/// extensions.
#[derive(Debug, Clone, Default)]
pub struct PeerInfo {
    pub remote_addr: Option<SocketAddr>,
    /// The connection is TLS.
    pub tls: bool,
    /// The peer presented a certificate from the cluster CA that carries the node name.
    pub node: bool,
}

enum Stream {
    Plain(TcpStream),
    Tls(Box<tokio_rustls::server::TlsStream<TcpStream>>),
}

/// A place under the connection cap, counted open from accept (handshake included)
/// until dropped, whichever way the connection ends.
struct Slot {
    _permit: OwnedSemaphorePermit,
    counters: Arc<ConnectionCounters>,
}

impl Slot {
    fn new(permit: OwnedSemaphorePermit, counters: Arc<ConnectionCounters>) -> Self {
        counters.accepted.fetch_add(1, Ordering::Relaxed);
        counters.open.fetch_add(1, Ordering::Relaxed);
        Self { _permit: permit, counters }
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.counters.open.fetch_sub(1, Ordering::Relaxed);
    }
}

/// One accepted connection. Holding it holds a slot of the connection cap.
pub struct ServerConn {
    stream: Stream,
    info: PeerInfo,
    _slot: Slot,
}

impl tonic::transport::server::Connected for ServerConn {
    type ConnectInfo = PeerInfo;

    fn connect_info(&self) -> PeerInfo {
        self.info.clone()
    }
}

impl AsyncRead for ServerConn {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        match &mut self.get_mut().stream {
            Stream::Plain(s) => Pin::new(s).poll_read(cx, buf),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for ServerConn {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        match &mut self.get_mut().stream {
            Stream::Plain(s) => Pin::new(s).poll_write(cx, buf),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_write_vectored(self: Pin<&mut Self>, cx: &mut Context<'_>, bufs: &[io::IoSlice<'_>]) -> Poll<io::Result<usize>> {
        match &mut self.get_mut().stream {
            Stream::Plain(s) => Pin::new(s).poll_write_vectored(cx, bufs),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match &self.stream {
            Stream::Plain(s) => s.is_write_vectored(),
            Stream::Tls(s) => s.is_write_vectored(),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match &mut self.get_mut().stream {
            Stream::Plain(s) => Pin::new(s).poll_flush(cx),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match &mut self.get_mut().stream {
            Stream::Plain(s) => Pin::new(s).poll_shutdown(cx),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }
}

/// The connections of `listener` for `tonic::transport::Server::serve_with_incoming*`:
/// TLS-terminated when `tls` is set, at most `limits.max` open at once.
pub fn incoming(
    listener: TcpListener,
    tls: Option<Arc<NodeTls>>,
    limits: ConnectionLimits,
    counters: Arc<ConnectionCounters>,
) -> ReceiverStream<Result<ServerConn, io::Error>> {
    let (sender, receiver) = mpsc::channel(ACCEPTED_QUEUE_MAX);
    let slots = Arc::new(Semaphore::new(limits.max));
    tokio::spawn(async move {
        loop {
            let (tcp, remote) = tokio::select! {
                accepted = listener.accept() => match accepted {
                    Ok(accepted) => accepted,
                    Err(e) => {
                        tracing::warn!(error = %e, "accepting a connection failed");
                        tokio::time::sleep(ACCEPT_ERROR_PAUSE).await;
                        continue;
                    }
                },
                _ = sender.closed() => return,
            };
            let Ok(permit) = slots.clone().try_acquire_owned() else {
                // Closing at once tells the client now, instead of after a timeout.
                if counters.refused_over_cap.fetch_add(1, Ordering::Relaxed).is_multiple_of(1000) {
                    tracing::warn!(%remote, max = limits.max, "connection refused: the node is at its connection cap");
                }
                drop(tcp);
                continue;
            };
            let slot = Slot::new(permit, counters.clone());
            let _ = tcp.set_nodelay(true);
            let info = PeerInfo { remote_addr: Some(remote), tls: tls.is_some(), node: false };
            match &tls {
                None => {
                    let conn = ServerConn { stream: Stream::Plain(tcp), info, _slot: slot };
                    if sender.send(Ok(conn)).await.is_err() {
                        return;
                    }
                }
                Some(tls) => {
                    // Handshakes run beside the accept loop: a slow client does not hold up others.
                    let (tls, sender, counters) = (tls.clone(), sender.clone(), counters.clone());
                    tokio::spawn(async move {
                        let acceptor = tokio_rustls::TlsAcceptor::from(tls.server_config());
                        let handshake = tokio::time::timeout(TLS_HANDSHAKE_TIMEOUT, acceptor.accept(tcp))
                            .await
                            .unwrap_or_else(|_| Err(io::Error::new(io::ErrorKind::TimedOut, "timed out")));
                        let stream = match handshake {
                            Ok(stream) => stream,
                            Err(e) => {
                                // Dropping the slot closes the socket and frees its place.
                                counters.tls_failures.fetch_add(1, Ordering::Relaxed);
                                tracing::debug!(%remote, error = %e, "TLS handshake failed");
                                return;
                            }
                        };
                        let node = stream
                            .get_ref()
                            .1
                            .peer_certificates()
                            .and_then(|chain| chain.first())
                            .is_some_and(|leaf| carries_name(leaf, tls.node_name()));
                        let info = PeerInfo { node, ..info };
                        let conn = ServerConn { stream: Stream::Tls(Box::new(stream)), info, _slot: slot };
                        let _ = sender.send(Ok(conn)).await;
                    });
                }
            }
        }
    });
    ReceiverStream::new(receiver)
}

/// A lazily connecting channel to `endpoint` that speaks TLS with `tls`, its
/// connections made from `source_ip` when set. The endpoint's HTTP/2 settings and
/// connect timeout apply as usual.
pub fn tls_channel(endpoint: Endpoint, tls: ClientTls, source_ip: Option<IpAddr>) -> Channel {
    let connector = tower::service_fn(move |uri: http::Uri| {
        let tls = tls.clone();
        async move { connect_tls(uri, tls, source_ip).await.map(TokioIo::new) }
    });
    endpoint.connect_with_connector_lazy(connector)
}

/// A channel to `endpoint`, over TLS when `tls` is set, connected before it is returned
/// (so that "cannot reach" shows here, not on first use).
pub async fn connect(endpoint: Endpoint, tls: Option<&ClientTls>) -> Result<Channel, tonic::transport::Error> {
    match tls {
        None => endpoint.connect().await,
        Some(tls) => {
            let channel = tls_channel(endpoint, tls.clone(), None);
            let mut ready = tower::ServiceExt::ready_oneshot(channel.clone());
            std::future::poll_fn(|cx| std::future::Future::poll(Pin::new(&mut ready), cx)).await?;
            Ok(channel)
        }
    }
}

async fn connect_tls(uri: http::Uri, tls: ClientTls, source_ip: Option<IpAddr>) -> io::Result<tokio_rustls::client::TlsStream<TcpStream>> {
    let host = uri.host().ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, format!("no host in {uri}")))?;
    let port = uri.port_u16().unwrap_or(443);
    let host = host.trim_start_matches('[').trim_end_matches(']');
    let address = tokio::net::lookup_host((host, port))
        .await?
        .next()
        .ok_or_else(|| io::Error::new(io::ErrorKind::NotFound, format!("{host} has no address")))?;
    let socket = if address.is_ipv4() { tokio::net::TcpSocket::new_v4()? } else { tokio::net::TcpSocket::new_v6()? };
    if let Some(ip) = source_ip {
        socket.bind(SocketAddr::new(ip, 0))?;
    }
    let tcp = socket.connect(address).await?;
    tcp.set_nodelay(true)?;
    tokio_rustls::TlsConnector::from(tls.config()).connect(tls.server_name(), tcp).await
}

/// Adds `authorization: Bearer <token>` to every call of a client; without a token, calls
/// go without (a node under `--insecure` takes them). The token never shows in `Debug`.
#[derive(Clone, Default)]
pub struct BearerToken(Option<tonic::metadata::MetadataValue<tonic::metadata::Ascii>>);

/// A client channel that carries the caller's token.
pub type AuthChannel = tonic::service::interceptor::InterceptedService<Channel, BearerToken>;

impl BearerToken {
    pub fn new(token: Option<&str>) -> Result<Self, tonic::metadata::errors::InvalidMetadataValue> {
        let value = token.map(|token| format!("Bearer {}", token.trim()).parse()).transpose()?;
        Ok(Self(value.map(|mut v: tonic::metadata::MetadataValue<tonic::metadata::Ascii>| {
            v.set_sensitive(true);
            v
        })))
    }

    /// `channel` with this token on every call.
    pub fn on(self, channel: Channel) -> AuthChannel {
        tonic::service::interceptor::InterceptedService::new(channel, self)
    }
}

impl std::fmt::Debug for BearerToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(if self.0.is_some() { "BearerToken(<redacted>)" } else { "BearerToken(none)" })
    }
}

impl tonic::service::Interceptor for BearerToken {
    fn call(&mut self, mut request: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
        if let Some(value) = &self.0 {
            request.metadata_mut().insert("authorization", value.clone());
        }
        Ok(request)
    }
}
