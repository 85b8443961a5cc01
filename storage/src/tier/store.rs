//! Which object store holds the tier, and the start-up check that it can hold one.

use std::path::PathBuf;
use std::sync::Arc;

use object_store::path::Path as StorePath;
use object_store::{ObjectStore, ObjectStoreExt, PutMode, PutOptions, PutPayload};

use super::TierError;

/// Where the tier lives, as the operator configured it.
#[derive(Debug, Clone, Default)]
pub struct TierStoreConfig {
    /// `file:///dir` or `s3://bucket/prefix`.
    pub url: String,
    /// The S3 endpoint (`http://127.0.0.1:9100`); None: AWS's, from the environment.
    pub s3_endpoint: Option<String>,
    /// A file of `KEY=value` lines (`AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`,
    /// `AWS_SESSION_TOKEN`, `AWS_REGION`); values in it win over the environment's.
    pub s3_credentials_file: Option<PathBuf>,
}

/// An opened object store and the path of the tier database in it.
#[derive(Clone)]
pub struct TierStore {
    pub object_store: Arc<dyn ObjectStore>,
    pub db_path: StorePath,
    /// For logs and status: the URL without credentials.
    pub description: String,
}

impl std::fmt::Debug for TierStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TierStore").field("description", &self.description).finish()
    }
}

/// Retries of one S3 request, and how long they may take in all: an unreachable store
/// must fail an upload or a cold read in seconds (the callers retry), not in minutes.
const S3_RETRIES_MAX: usize = 3;
const S3_RETRY_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// Name of the tier database under the store's prefix.
const DB_NAME: &str = "strata-tier";

impl TierStore {
    /// Opens the store named by `config` (no request is made yet).
    pub fn open(config: &TierStoreConfig) -> Result<Self, TierError> {
        let url = url::Url::parse(&config.url)
            .map_err(|e| TierError::Unusable(format!("object store url is invalid: {e} url=`{}`", config.url)))?;
        match url.scheme() {
            "file" => {
                let dir = url
                    .to_file_path()
                    .map_err(|_| TierError::Unusable(format!("file url needs an absolute path url=`{}`", config.url)))?;
                std::fs::create_dir_all(&dir)
                    .map_err(|e| TierError::Unusable(format!("cannot create the tier directory: {e} dir=`{}`", dir.display())))?;
                let store = object_store::local::LocalFileSystem::new_with_prefix(&dir)?;
                Ok(Self { object_store: Arc::new(store), db_path: StorePath::from(DB_NAME), description: config.url.clone() })
            }
            "s3" => {
                let bucket = url
                    .host_str()
                    .filter(|b| !b.is_empty())
                    .ok_or_else(|| TierError::Unusable(format!("s3 url needs a bucket url=`{}`", config.url)))?;
                let prefix = url.path().trim_matches('/');
                let retry = object_store::RetryConfig {
                    max_retries: S3_RETRIES_MAX,
                    retry_timeout: S3_RETRY_TIMEOUT,
                    ..Default::default()
                };
                let mut builder = object_store::aws::AmazonS3Builder::from_env().with_bucket_name(bucket).with_retry(retry);
                if let Some(endpoint) = &config.s3_endpoint {
                    builder = builder.with_endpoint(endpoint).with_allow_http(endpoint.starts_with("http://"));
                }
                let mut region_set = std::env::var("AWS_REGION").is_ok() || std::env::var("AWS_DEFAULT_REGION").is_ok();
                if let Some(file) = &config.s3_credentials_file {
                    for (key, value) in read_credentials_file(file)? {
                        builder = match key.as_str() {
                            "AWS_ACCESS_KEY_ID" => builder.with_access_key_id(value),
                            "AWS_SECRET_ACCESS_KEY" => builder.with_secret_access_key(value),
                            "AWS_SESSION_TOKEN" => builder.with_token(value),
                            "AWS_REGION" | "AWS_DEFAULT_REGION" => {
                                region_set = true;
                                builder.with_region(value)
                            }
                            _ => builder,
                        };
                    }
                }
                if !region_set {
                    builder = builder.with_region("us-east-1");
                }
                let store = builder.build()?;
                let db_path = if prefix.is_empty() { StorePath::from(DB_NAME) } else { StorePath::from(format!("{prefix}/{DB_NAME}")) };
                let endpoint = config.s3_endpoint.as_deref().unwrap_or("aws");
                Ok(Self { object_store: Arc::new(store), db_path, description: format!("{} via {endpoint}", config.url) })
            }
            other => Err(TierError::Unusable(format!(
                "object store scheme is not supported (use file:// or s3://) scheme=`{other}`"
            ))),
        }
    }

    /// Checks that the store refuses a second create of one key (`If-None-Match: *`):
    /// SlateDB's manifest and writer fencing depend on it. Writes and removes a probe.
    pub async fn check_conditional_writes(&self) -> Result<(), TierError> {
        let probe = StorePath::from(format!("{}/probe-{}", self.db_path, uuid::Uuid::new_v4()));
        let create = || PutOptions { mode: PutMode::Create, ..Default::default() };
        self.object_store
            .put_opts(&probe, PutPayload::from_static(b"first"), create())
            .await
            .map_err(|e| TierError::Unusable(format!("cannot write to the object store: {e} store=`{}`", self.description)))?;
        let second = self.object_store.put_opts(&probe, PutPayload::from_static(b"second"), create()).await;
        let _ = self.object_store.delete(&probe).await;
        match second {
            Err(object_store::Error::AlreadyExists { .. }) => Ok(()),
            Err(object_store::Error::NotImplemented { .. }) | Err(object_store::Error::NotSupported { .. }) => {
                Err(TierError::Unusable(format!(
                    "the object store does not support conditional writes (If-None-Match), which tiering needs store=`{}`",
                    self.description
                )))
            }
            Err(e) => Err(TierError::Unusable(format!("conditional write check failed: {e} store=`{}`", self.description))),
            Ok(_) => Err(TierError::Unusable(format!(
                "the object store overwrote an object on a conditional create (If-None-Match ignored); tiering needs conditional writes store=`{}`",
                self.description
            ))),
        }
    }
}

fn read_credentials_file(path: &std::path::Path) -> Result<Vec<(String, String)>, TierError> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| TierError::Unusable(format!("cannot read the credentials file: {e} path=`{}`", path.display())))?;
    Ok(text
        .lines()
        .map(str::trim)
        .filter(|line| !line.is_empty() && !line.starts_with('#'))
        .filter_map(|line| line.split_once('='))
        .map(|(k, v)| (k.trim().to_string(), v.trim().trim_matches('"').to_string()))
        .collect())
}

/// SlateDB's block cache of the leader's writer. It only reads back its claim, its marks
/// and what the compactor merges; SlateDB's default (512 MiB) filled with every block it
/// wrote and grew the leader by that much.
pub const WRITER_BLOCK_CACHE_BYTES: u64 = 16 * 1024 * 1024;
/// SlateDB's block cache of every node's reader, below the tier's own chunk cache
/// (`TIER_CACHE_BYTES`) that serves repeated reads.
pub const READER_BLOCK_CACHE_BYTES: u64 = 64 * 1024 * 1024;
/// SlateDB's cache of SST indexes and filters, per database handle: enough for the
/// filters and indexes of tens of millions of tiered events.
pub const META_CACHE_BYTES: u64 = 32 * 1024 * 1024;

/// A SlateDB cache (blocks, and SST indexes and filters apart) bounded by `block_bytes`
/// and [`META_CACHE_BYTES`].
pub fn slatedb_cache(block_bytes: u64) -> Arc<dyn slatedb::db_cache::DbCache> {
    use slatedb::db_cache::moka::{MokaCache, MokaCacheOptions};
    use slatedb::db_cache::{DbCache, SplitCache};
    let cache = |max_capacity| Some(Arc::new(MokaCache::new_with_opts(MokaCacheOptions { max_capacity, time_to_live: None, time_to_idle: None })) as Arc<dyn DbCache>);
    Arc::new(SplitCache::new().with_block_cache(cache(block_bytes)).with_meta_cache(cache(META_CACHE_BYTES)).build())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unknown_scheme_is_refused_with_a_clear_message() {
        let err = TierStore::open(&TierStoreConfig { url: "gcs://b".into(), ..Default::default() }).unwrap_err();
        assert!(err.to_string().contains("scheme=`gcs`"), "{err}");
    }

    #[tokio::test]
    async fn file_store_supports_conditional_writes() {
        let dir = tempfile::tempdir().unwrap();
        let url = format!("file://{}", dir.path().display());
        let store = TierStore::open(&TierStoreConfig { url, ..Default::default() }).unwrap();
        store.check_conditional_writes().await.unwrap();
    }

    #[test]
    fn credentials_file_lines_are_parsed() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("creds");
        std::fs::write(&path, "# comment\nAWS_ACCESS_KEY_ID=abc\nAWS_SECRET_ACCESS_KEY = \"s3cr3t\"\n").unwrap();
        let pairs = read_credentials_file(&path).unwrap();
        assert_eq!(pairs, vec![("AWS_ACCESS_KEY_ID".into(), "abc".into()), ("AWS_SECRET_ACCESS_KEY".into(), "s3cr3t".into())]);
    }
}
