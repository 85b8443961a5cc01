//! The cold tier: settled history in a SlateDB database on an object store (SPEC §7).
//!
//! The leader's [`TierWriter`] copies settled event chunks, with their indexes, into the
//! database and waits until they are durable in the object store; only then is the tier
//! watermark committed through Raft (`ControlCommand::AdvanceTier`). Every node reads the
//! database through a [`TierReader`] (a read-only SlateDB reader, its own bounded
//! concurrency and a read-through chunk cache), so history below the watermark may leave
//! the node's disk.
//!
//! Everything written here is committed history: the same bytes at the same positions on
//! every node, whoever uploads them. So a deposed leader's late write, or a segment
//! uploaded twice across a leader change, can repeat data but never contradict it; the
//! watermark, which decides what nodes may drop, moves only through Raft.

mod cache;
mod layout;
mod reader;
mod store;
mod writer;
#[cfg(test)]
mod tests;

pub use cache::TIER_CACHE_BYTES;
pub use reader::{TierReader, COLD_READS_MAX, COLD_READ_TIMEOUT};
pub use store::{TierStore, TierStoreConfig};
pub use writer::{SegmentStats, TierWriter, TIER_WRITE_TIMEOUT};

/// Errors of the cold tier. Messages are lowercase; details come last as key=`value`.
#[derive(Debug, thiserror::Error)]
pub enum TierError {
    /// The object store or SlateDB failed (unreachable, refused, timed out).
    #[error("object store failed: {0}")]
    Store(String),
    /// Another writer claimed the tier database (a newer leader); this writer must stop.
    #[error("tier writer fenced: {0}")]
    Fenced(String),
    /// The object store does not support what the tier needs.
    #[error("object store unusable: {0}")]
    Unusable(String),
    /// A record in the tier failed its checksum or did not decode; it is not served.
    #[error(transparent)]
    Corrupt(#[from] crate::StorageError),
}

impl From<slatedb::Error> for TierError {
    fn from(e: slatedb::Error) -> Self {
        match e.kind() {
            slatedb::ErrorKind::Closed(slatedb::CloseReason::Fenced) => TierError::Fenced(e.to_string()),
            _ => TierError::Store(e.to_string()),
        }
    }
}

impl From<object_store::Error> for TierError {
    fn from(e: object_store::Error) -> Self {
        TierError::Store(e.to_string())
    }
}
