//! A TCP forwarder between the nodes and the S3 server that a test can cut: while cut,
//! new connections are refused and open ones dropped — an unreachable object store. The
//! tiering tests and the chaos suite's `store_outage` fault use it.
//!
//! It can also corrupt what the nodes read: while `corrupt_reads` is on, the body of every
//! response to a `GET` of an SST object (SlateDB's sorted tables, where the tiered events
//! live) arrives with its first byte flipped, as a bad disk or a bad cache in the store
//! would deliver it. The chaos suite's `corrupt_tier_reads` fault uses it: a node must
//! detect that by checksum and never serve what it read.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::task::JoinHandle;

/// Bytes one forwarding read moves at most.
const FORWARD_BUFFER_BYTES: usize = 64 * 1024;

pub struct StoreLink {
    pub addr: SocketAddr,
    open: Arc<AtomicBool>,
    corruption: Arc<Corruption>,
    connections: Arc<Mutex<Vec<JoinHandle<()>>>>,
    accept: JoinHandle<()>,
}

/// The link's corruption switch and how many responses it corrupted.
#[derive(Default)]
struct Corruption {
    on: AtomicBool,
    corrupted: AtomicU64,
}

impl StoreLink {
    /// Forwards 127.0.0.1:<some port> to `target` (`http://host:port` or `host:port`).
    pub async fn start(target: &str) -> Self {
        let target = target.trim_start_matches("http://").to_string();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind the store link");
        let addr = listener.local_addr().expect("local addr");
        let open = Arc::new(AtomicBool::new(true));
        let corruption = Arc::new(Corruption::default());
        let connections: Arc<Mutex<Vec<JoinHandle<()>>>> = Default::default();
        let (gate, tasks, corrupting) = (open.clone(), connections.clone(), corruption.clone());
        let accept = tokio::spawn(async move {
            loop {
                let Ok((inbound, _)) = listener.accept().await else { continue };
                if !gate.load(Ordering::Acquire) {
                    drop(inbound);
                    continue;
                }
                let (target, corruption) = (target.clone(), corrupting.clone());
                let task = tokio::spawn(async move {
                    if let Ok(outbound) = TcpStream::connect(&target).await {
                        forward(inbound, outbound, corruption).await;
                    }
                });
                let mut tasks = tasks.lock().expect("never poisoned");
                tasks.retain(|t| !t.is_finished());
                tasks.push(task);
            }
        });
        Self { addr, open, corruption, connections, accept }
    }

    /// The endpoint the nodes are given.
    pub fn endpoint(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn cut(&self) {
        self.open.store(false, Ordering::Release);
        for task in self.connections.lock().expect("never poisoned").drain(..) {
            task.abort();
        }
    }

    pub fn heal(&self) {
        self.open.store(true, Ordering::Release);
    }

    /// Turns the corruption of SST reads on or off.
    pub fn corrupt_reads(&self, on: bool) {
        self.corruption.on.store(on, Ordering::Release);
    }

    /// How many SST read responses the link has corrupted so far.
    pub fn corrupted_reads(&self) -> u64 {
        self.corruption.corrupted.load(Ordering::Acquire)
    }
}

/// Moves bytes both ways between a node and the server. HTTP/1.1 clients send a request
/// only once the previous response has arrived, so a request seen going up marks the next
/// response coming down: when it is a `GET` of an SST and corruption is on, the first byte
/// after that response's header block is flipped.
async fn forward(inbound: TcpStream, outbound: TcpStream, corruption: Arc<Corruption>) {
    let (mut from_node, mut to_node) = inbound.into_split();
    let (mut from_server, mut to_server) = outbound.into_split();
    let sst_get_pending = Arc::new(AtomicBool::new(false));
    let pending = sst_get_pending.clone();
    let corrupting = corruption.clone();
    let up = async move {
        let mut buffer = vec![0u8; FORWARD_BUFFER_BYTES];
        loop {
            let read = match from_node.read(&mut buffer).await {
                Ok(0) | Err(_) => break,
                Ok(read) => read,
            };
            if corrupting.on.load(Ordering::Acquire) && is_sst_get(&buffer[..read]) {
                pending.store(true, Ordering::Release);
            }
            if to_server.write_all(&buffer[..read]).await.is_err() {
                break;
            }
        }
        let _ = to_server.shutdown().await;
    };
    let down = async move {
        let mut buffer = vec![0u8; FORWARD_BUFFER_BYTES];
        let mut seek = Seek::Off;
        loop {
            let read = match from_server.read(&mut buffer).await {
                Ok(0) | Err(_) => break,
                Ok(read) => read,
            };
            if sst_get_pending.swap(false, Ordering::AcqRel) {
                seek = Seek::Headers(Vec::new());
            }
            let flip_at;
            (seek, flip_at) = match std::mem::replace(&mut seek, Seek::Off) {
                Seek::Off => (Seek::Off, None),
                Seek::BodyNext => (Seek::Off, Some(0)),
                Seek::Headers(mut tail) => match body_start(&tail, &buffer[..read]) {
                    Some(at) if at < read => (Seek::Off, Some(at)),
                    Some(_) => (Seek::BodyNext, None),
                    None => {
                        tail.extend_from_slice(&buffer[..read]);
                        tail.drain(..tail.len().saturating_sub(3));
                        (Seek::Headers(tail), None)
                    }
                },
            };
            if let Some(at) = flip_at {
                buffer[at] ^= 0x5a;
                corruption.corrupted.fetch_add(1, Ordering::AcqRel);
            }
            if to_node.write_all(&buffer[..read]).await.is_err() {
                break;
            }
        }
        let _ = to_node.shutdown().await;
    };
    tokio::join!(up, down);
}

/// Where the response to corrupt stands, in what comes down from the server.
enum Seek {
    /// No response to corrupt.
    Off,
    /// In its header block; the last bytes of it read so far (at most 3).
    Headers(Vec<u8>),
    /// The header block ended with the last chunk: the body begins with the next one.
    BodyNext,
}

/// Whether `request` starts an HTTP `GET` of an SST object.
fn is_sst_get(request: &[u8]) -> bool {
    let line = request.split(|b| *b == b'\n').next().unwrap_or_default();
    line.starts_with(b"GET ") && line.windows(4).any(|w| w == b".sst")
}

/// Where in `chunk` the body begins (`chunk.len()`: with the next chunk), given the last
/// bytes of the header block read before it (`tail`, at most 3); None while the header
/// block has not ended.
fn body_start(tail: &[u8], chunk: &[u8]) -> Option<usize> {
    let mut joined = tail.to_vec();
    joined.extend_from_slice(chunk);
    let end = joined.windows(4).position(|w| w == b"\r\n\r\n")? + 4;
    end.checked_sub(tail.len())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_gets_of_sst_objects_are_marked() {
        assert!(is_sst_get(b"GET /bucket/db/compacted/01J.sst HTTP/1.1\r\nrange: bytes=0-9\r\n"));
        assert!(!is_sst_get(b"PUT /bucket/db/compacted/01J.sst HTTP/1.1\r\n"));
        assert!(!is_sst_get(b"GET /bucket/db/manifest/00000000000000000001.manifest HTTP/1.1\r\n"));
        assert!(!is_sst_get(b"GET /bucket/db/x HTTP/1.1\r\n\r\nbody mentions .sst"));
    }

    #[test]
    fn the_body_start_is_found_across_chunks() {
        assert_eq!(body_start(b"", b"HTTP/1.1 200 OK\r\nA: b\r\n\r\nxyz"), Some(25));
        assert_eq!(body_start(b"", b"HTTP/1.1 200 OK\r\n"), None);
        assert_eq!(body_start(b"\r\n\r", b"\nxyz"), Some(1), "the terminator straddles two chunks");
        assert_eq!(body_start(b"", b"HTTP/1.1 200 OK\r\n\r\n"), Some(19), "the body begins with the next chunk");
    }

    #[tokio::test]
    async fn corrupting_flips_the_first_body_byte_of_sst_reads_only() {
        let server = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let server_addr = server.local_addr().unwrap();
        tokio::spawn(async move {
            let (mut socket, _) = server.accept().await.unwrap();
            let mut buffer = vec![0u8; 1024];
            // Two requests on one connection, each answered with the same body.
            for _ in 0..2 {
                let _ = socket.read(&mut buffer).await.unwrap();
                socket.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 4\r\n\r\nabcd").await.unwrap();
            }
        });
        let link = StoreLink::start(&server_addr.to_string()).await;
        link.corrupt_reads(true);
        let mut client = TcpStream::connect(link.addr).await.unwrap();
        let mut exchange = async |request: &[u8]| {
            client.write_all(request).await.unwrap();
            let mut response = vec![0u8; 64];
            let mut got = 0;
            while !response[..got].ends_with(b"bcd") {
                got += client.read(&mut response[got..]).await.unwrap();
            }
            response[got - 4]
        };
        assert_eq!(exchange(b"GET /b/x.sst HTTP/1.1\r\n\r\n").await, b'a' ^ 0x5a, "an SST read arrives corrupt");
        assert_eq!(exchange(b"GET /b/manifest HTTP/1.1\r\n\r\n").await, b'a', "other reads arrive whole");
        assert_eq!(link.corrupted_reads(), 1);
    }
}

impl Drop for StoreLink {
    fn drop(&mut self) {
        self.accept.abort();
        self.cut();
    }
}

/// The local S3 server of the tests: `scripts/test` starts one (`scripts/s3-server`) and
/// names it in `STRATA_TEST_S3_ENDPOINT`.
pub struct TestS3 {
    pub endpoint: String,
    pub bucket: String,
}

impl TestS3 {
    pub fn from_env() -> Option<Self> {
        let endpoint = std::env::var("STRATA_TEST_S3_ENDPOINT").ok()?;
        let bucket = std::env::var("STRATA_TEST_S3_BUCKET").unwrap_or_else(|_| "strata-test".into());
        Some(Self { endpoint, bucket })
    }

    /// `strata serve` arguments for a store under a prefix no earlier run used (the server
    /// keeps objects while it is up), reached at `via` (the server, or a [`StoreLink`] to
    /// it), with a credentials file written into `dir`.
    pub fn serve_args(&self, name: &str, via: &str, dir: &std::path::Path) -> Vec<String> {
        let credentials = dir.join("s3-credentials");
        // The server accepts any key; the file is how a deployment would hand them over.
        std::fs::write(&credentials, "AWS_ACCESS_KEY_ID=test\nAWS_SECRET_ACCESS_KEY=testtesttest\nAWS_REGION=us-east-1\n")
            .expect("write the credentials file");
        let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos());
        vec![
            "--object-store".into(),
            format!("s3://{}/{name}-{nanos}", self.bucket),
            "--s3-endpoint".into(),
            via.to_string(),
            "--s3-credentials-file".into(),
            credentials.display().to_string(),
        ]
    }
}
