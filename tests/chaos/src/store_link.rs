//! A TCP forwarder between the nodes and the S3 server that a test can cut: while cut,
//! new connections are refused and open ones dropped — an unreachable object store. The
//! tiering tests and the chaos suite's `store_outage` fault use it.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use tokio::task::JoinHandle;

pub struct StoreLink {
    pub addr: SocketAddr,
    open: Arc<AtomicBool>,
    connections: Arc<Mutex<Vec<JoinHandle<()>>>>,
    accept: JoinHandle<()>,
}

impl StoreLink {
    /// Forwards 127.0.0.1:<some port> to `target` (`http://host:port` or `host:port`).
    pub async fn start(target: &str) -> Self {
        let target = target.trim_start_matches("http://").to_string();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind the store link");
        let addr = listener.local_addr().expect("local addr");
        let open = Arc::new(AtomicBool::new(true));
        let connections: Arc<Mutex<Vec<JoinHandle<()>>>> = Default::default();
        let (gate, tasks) = (open.clone(), connections.clone());
        let accept = tokio::spawn(async move {
            loop {
                let Ok((mut inbound, _)) = listener.accept().await else { continue };
                if !gate.load(Ordering::Acquire) {
                    drop(inbound);
                    continue;
                }
                let target = target.clone();
                let task = tokio::spawn(async move {
                    if let Ok(mut outbound) = tokio::net::TcpStream::connect(&target).await {
                        let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                    }
                });
                let mut tasks = tasks.lock().expect("never poisoned");
                tasks.retain(|t| !t.is_finished());
                tasks.push(task);
            }
        });
        Self { addr, open, connections, accept }
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
