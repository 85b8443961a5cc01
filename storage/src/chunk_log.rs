//! The event chunks of one state generation, in append-only segment files beside its sled
//! database (`state-<generation>/chunks/<segment>.chunks`); sled keeps a small pointer per
//! chunk ([`ChunkPointer`], sealed under the chunk's key).
//!
//! Why not in sled: sled writes a value several times over (its log, each consolidation of
//! the leaf that holds it, segment cleaning). Measured on the 64 × 10 bench, a follower wrote
//! about 4 bytes to its sled files per byte of event, and copying those writes into the page
//! cache was a fifth of its CPU. Chunks are written once here, and never changed: a
//! scavenge writes a rewritten chunk anew and moves the pointer; space comes back when a
//! compaction copies the live chunks into the next generation and the old one is removed
//! whole.
//!
//! Durability: [`ChunkLog::append`] fdatasyncs what it wrote before it returns, and callers
//! write the pointers to sled only after it returned. sled may make a batch durable at any
//! time after it was applied (each of its buffer writes goes to the disk at once, and its
//! flusher fsyncs), so its pointers never name bytes a crash could lose. Cheaper orderings
//! were weighed and left: `sync_file_range` (what sled does per write) does not make a
//! growing file's size durable, and sled's own durable points cannot be hooked. The
//! fdatasync costs about a tenth of the 64 × 10 bench's throughput (57k against 63k
//! events/s without it, measured side by side). Bytes written but never pointed at (a crash
//! between the two) are dead space, never read: a reopened log starts a new segment rather
//! than trust its last segment's end.
//!
//! Each stored chunk is the sealed record `seal(chunk key, bincode(chunk))` that sled held
//! before: readers verify its checksum, and that it belongs to the key it was read for.

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};

use crate::record;
use crate::StorageError;

/// A segment takes appends until it holds this many bytes (one append may overrun it).
pub const CHUNK_SEGMENT_BYTES: u64 = 64 * 1024 * 1024;
/// Segment files kept open for reads at most; past it the handles are dropped and reopened
/// on demand (a long local history has many segments, a process few descriptors).
pub const CHUNK_READ_HANDLES_MAX: usize = 64;
/// The write buffer of one append is kept for the next unless it grew past this.
pub const CHUNK_WRITE_BUFFER_KEPT_MAX: usize = 16 * 1024 * 1024;
/// Bytes one read of a reader in position order takes at once ([`ReadAhead`]): the chunks
/// of consecutive positions lie one after another in the log, so a `$all` page takes tens
/// of chunks per read instead of one read (and one buffer) per chunk.
pub const CHUNK_READ_AHEAD_BYTES: usize = 256 * 1024;

const SEGMENT_SUFFIX: &str = ".chunks";
/// A pointer's payload starts with these 8 bytes; a chunk's encoding never does (it starts
/// with its stream name's length, a u64 far below this).
const POINTER_MARK: [u8; 8] = [0xff; 8];
const POINTER_BYTES: usize = 8 + 8 + 8 + 4;

/// One in-order reader's bytes of the chunk log (see [`ChunkLog::read_ahead`]): a copy of
/// `bytes.len()` bytes of `segment` from `offset`. Empty at first.
#[derive(Default)]
pub struct ReadAhead {
    segment: u64,
    offset: u64,
    bytes: Vec<u8>,
}

/// Where one chunk's sealed record lives in the log.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChunkPointer {
    pub segment: u64,
    pub offset: u64,
    pub len: u32,
}

impl ChunkPointer {
    /// The pointer as a record payload (sealed by the caller under the chunk's key).
    pub fn encode(&self) -> [u8; POINTER_BYTES] {
        let mut out = [0u8; POINTER_BYTES];
        out[..8].copy_from_slice(&POINTER_MARK);
        out[8..16].copy_from_slice(&self.segment.to_be_bytes());
        out[16..24].copy_from_slice(&self.offset.to_be_bytes());
        out[24..].copy_from_slice(&self.len.to_be_bytes());
        out
    }

    /// Whether a record payload has a pointer's shape (cheap: no checksum involved).
    pub fn looks_like(payload: &[u8]) -> bool {
        payload.len() == POINTER_BYTES && payload[..8] == POINTER_MARK
    }

    /// The pointer a record payload holds, or None when the payload is a chunk itself
    /// (kept in sled by an earlier version, or in a state without a chunk log).
    pub fn decode(payload: &[u8]) -> Option<Self> {
        if !Self::looks_like(payload) {
            return None;
        }
        Some(Self {
            segment: u64::from_be_bytes(payload[8..16].try_into().expect("8 bytes")),
            offset: u64::from_be_bytes(payload[16..24].try_into().expect("8 bytes")),
            len: u32::from_be_bytes(payload[24..].try_into().expect("4 bytes")),
        })
    }
}

struct Writer {
    /// The segment appends go to (created on the first append after open or a roll).
    segment: u64,
    file: Option<File>,
    offset: u64,
    buffer: Vec<u8>,
}

/// One generation's chunk segments.
pub struct ChunkLog {
    dir: PathBuf,
    segment_bytes: u64,
    writer: Mutex<Writer>,
    readers: RwLock<HashMap<u64, Arc<File>>>,
    /// Bytes in all segments (dead ones included): the generation's size on disk.
    bytes: AtomicU64,
}

impl ChunkLog {
    /// Opens (creating it if need be) the log in `dir`; appends go to a new segment.
    pub fn open(dir: &Path) -> Result<Self, StorageError> {
        Self::open_with(dir, CHUNK_SEGMENT_BYTES)
    }

    pub(crate) fn open_with(dir: &Path, segment_bytes: u64) -> Result<Self, StorageError> {
        if !dir.is_dir() {
            std::fs::create_dir_all(dir)?;
            // The directory's name is durable before any segment in it is written.
            if let Some(parent) = dir.parent() {
                File::open(parent)?.sync_all()?;
            }
        }
        let mut last = None;
        let mut bytes = 0;
        for entry in std::fs::read_dir(dir)? {
            let entry = entry?;
            let name = entry.file_name().to_string_lossy().to_string();
            if let Some(segment) = name.strip_suffix(SEGMENT_SUFFIX).and_then(|id| id.parse::<u64>().ok()) {
                last = last.max(Some(segment));
                bytes += entry.metadata()?.len();
            }
        }
        let writer = Writer { segment: last.map_or(0, |s| s + 1), file: None, offset: 0, buffer: Vec::new() };
        Ok(Self { dir: dir.to_path_buf(), segment_bytes, writer: Mutex::new(writer), readers: RwLock::default(), bytes: AtomicU64::new(bytes) })
    }

    fn segment_path(&self, segment: u64) -> PathBuf {
        self.dir.join(format!("{segment:020}{SEGMENT_SUFFIX}"))
    }

    /// Bytes in the log's segments.
    pub fn bytes(&self) -> u64 {
        self.bytes.load(Ordering::Acquire)
    }

    /// Writes `records` (sealed chunk records) and makes them durable; returns where each
    /// went, in order. One write and one fdatasync for all of them.
    pub fn append<R: AsRef<[u8]>>(&self, records: &[R]) -> Result<Vec<ChunkPointer>, StorageError> {
        if records.is_empty() {
            return Ok(Vec::new());
        }
        let mut writer = self.writer.lock().expect("chunk log writer lock is never poisoned");
        if writer.file.is_some() && writer.offset >= self.segment_bytes {
            // The full segment's bytes were synced by the appends that wrote them.
            writer.file = None;
            writer.segment += 1;
            writer.offset = 0;
        }
        if writer.file.is_none() {
            let file = OpenOptions::new().write(true).create_new(true).open(self.segment_path(writer.segment))?;
            // The new name must survive a crash as well as the bytes written under it.
            File::open(&self.dir)?.sync_all()?;
            writer.file = Some(file);
            writer.offset = 0;
        }
        let mut buffer = std::mem::take(&mut writer.buffer);
        buffer.clear();
        let mut pointers = Vec::with_capacity(records.len());
        for record in records {
            let record = record.as_ref();
            let len = u32::try_from(record.len()).map_err(|_| StorageError::Encode { what: "event chunk larger than 4 GiB" })?;
            pointers.push(ChunkPointer { segment: writer.segment, offset: writer.offset + buffer.len() as u64, len });
            buffer.extend_from_slice(record);
        }
        let file = writer.file.as_ref().expect("a segment is open");
        // At the tracked offset, not the file's cursor; and after a failed write or flush the
        // segment is left behind (what reached it is unknown, and after a failed fdatasync
        // the kernel may have dropped the dirty pages), so the next append starts a new one.
        if let Err(e) = file.write_all_at(&buffer, writer.offset).and_then(|()| file.sync_data()) {
            writer.file = None;
            writer.segment += 1;
            writer.offset = 0;
            return Err(e.into());
        }
        writer.offset += buffer.len() as u64;
        self.bytes.fetch_add(buffer.len() as u64, Ordering::AcqRel);
        if buffer.capacity() <= CHUNK_WRITE_BUFFER_KEPT_MAX {
            writer.buffer = buffer;
        }
        Ok(pointers)
    }

    /// The sealed chunk record `pointer` names; `key` (the chunk's key) names it in errors.
    pub fn read(&self, key: &[u8], pointer: ChunkPointer) -> Result<Vec<u8>, StorageError> {
        let missing = || missing_bytes(key);
        let file = self.pointed_segment(key, pointer)?;
        let mut out = vec![0u8; pointer.len as usize];
        file.read_exact_at(&mut out, pointer.offset).map_err(|e| match e.kind() {
            std::io::ErrorKind::UnexpectedEof => missing(),
            _ => StorageError::Io(e),
        })?;
        Ok(out)
    }

    /// [`ChunkLog::read`] for a reader going through the log in position order: the chunk
    /// is served from `window` when the window holds all of it, else the window is refilled
    /// from the chunk's start with up to [`CHUNK_READ_AHEAD_BYTES`]. Only chunks whose
    /// pointers the reader found are taken from the window, and a pointed-at chunk's bytes
    /// never change, so bytes read ahead past the end of what was written are never used.
    pub fn read_ahead<'w>(&self, key: &[u8], pointer: ChunkPointer, window: &'w mut ReadAhead) -> Result<&'w [u8], StorageError> {
        let len = pointer.len as usize;
        let held = window.segment == pointer.segment
            && pointer.offset >= window.offset
            && pointer.offset - window.offset + len as u64 <= window.bytes.len() as u64;
        if !held {
            let file = self.pointed_segment(key, pointer)?;
            window.segment = pointer.segment;
            window.offset = pointer.offset;
            window.bytes.resize(len.max(CHUNK_READ_AHEAD_BYTES), 0);
            let mut filled = 0;
            while filled < window.bytes.len() {
                match file.read_at(&mut window.bytes[filled..], pointer.offset + filled as u64) {
                    Ok(0) => break,
                    Ok(n) => filled += n,
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                    Err(e) => {
                        window.bytes.clear();
                        return Err(StorageError::Io(e));
                    }
                }
            }
            window.bytes.truncate(filled);
            if filled < len {
                return Err(missing_bytes(key));
            }
        }
        let start = (pointer.offset - window.offset) as usize;
        Ok(&window.bytes[start..start + len])
    }

    /// The segment `pointer` names, open for reads; a missing segment is a corrupt pointer.
    fn pointed_segment(&self, key: &[u8], pointer: ChunkPointer) -> Result<Arc<File>, StorageError> {
        self.reader(pointer.segment).map_err(|e| match e {
            StorageError::Io(ref io) if io.kind() == std::io::ErrorKind::NotFound => missing_bytes(key),
            other => other,
        })
    }

    fn reader(&self, segment: u64) -> Result<Arc<File>, StorageError> {
        if let Some(file) = self.readers.read().expect("chunk log readers lock is never poisoned").get(&segment) {
            return Ok(file.clone());
        }
        let file = Arc::new(File::open(self.segment_path(segment))?);
        let mut readers = self.readers.write().expect("chunk log readers lock is never poisoned");
        if readers.len() >= CHUNK_READ_HANDLES_MAX {
            readers.clear();
        }
        readers.insert(segment, file.clone());
        Ok(file)
    }
}

/// The error for a pointer under `key` that names bytes the log does not hold.
fn missing_bytes(key: &[u8]) -> StorageError {
    StorageError::Corrupt { what: "event chunk pointer names bytes the chunk log lacks", key: record::printable_key(key) }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pointers_round_trip_and_chunks_are_never_taken_for_pointers() {
        let pointer = ChunkPointer { segment: 3, offset: 1 << 40, len: 77 };
        assert_eq!(ChunkPointer::decode(&pointer.encode()), Some(pointer));
        // A chunk's encoding starts with its stream name's length.
        let chunk_like = bincode::serialize(&("stream-1", 5u64, 6u64, 7i64, 8u32, 9u32)).unwrap();
        assert_eq!(ChunkPointer::decode(&chunk_like), None);
        let mut same_length = vec![0u8; POINTER_BYTES];
        same_length[0] = 12;
        assert_eq!(ChunkPointer::decode(&same_length), None);
    }

    #[test]
    fn appended_records_read_back_across_segments_and_reopens() {
        let dir = tempfile::tempdir().unwrap();
        let log = ChunkLog::open_with(dir.path(), 100).unwrap();
        let first = log.append(&[vec![1u8; 60], vec![2u8; 30]]).unwrap();
        assert_eq!(first[0], ChunkPointer { segment: 0, offset: 0, len: 60 });
        assert_eq!(first[1], ChunkPointer { segment: 0, offset: 60, len: 30 });
        // 90 bytes: one more append fits in segment 0, overrunning it; the next rolls.
        let second = log.append(&[vec![3u8; 50]]).unwrap();
        assert_eq!(second[0].segment, 0);
        let third = log.append(&[vec![4u8; 10]]).unwrap();
        assert_eq!(third[0], ChunkPointer { segment: 1, offset: 0, len: 10 });
        assert_eq!(log.bytes(), 150);
        drop(log);

        let log = ChunkLog::open_with(dir.path(), 100).unwrap();
        assert_eq!(log.bytes(), 150);
        assert_eq!(log.read(b"k", first[1]).unwrap(), vec![2u8; 30]);
        assert_eq!(log.read(b"k", second[0]).unwrap(), vec![3u8; 50]);
        assert_eq!(log.read(b"k", third[0]).unwrap(), vec![4u8; 10]);
        // A reopened log never appends to a segment it did not create.
        let fourth = log.append(&[vec![5u8; 5]]).unwrap();
        assert_eq!(fourth[0], ChunkPointer { segment: 2, offset: 0, len: 5 });
        assert_eq!(log.read(b"k", fourth[0]).unwrap(), vec![5u8; 5]);
    }

    #[test]
    fn a_pointer_past_the_written_bytes_or_to_a_missing_segment_is_corrupt() {
        let dir = tempfile::tempdir().unwrap();
        let log = ChunkLog::open(dir.path()).unwrap();
        let written = log.append(&[vec![9u8; 8]]).unwrap()[0];
        let past = ChunkPointer { len: 9, ..written };
        assert!(matches!(log.read(b"k", past), Err(StorageError::Corrupt { .. })));
        let elsewhere = ChunkPointer { segment: 7, ..written };
        assert!(matches!(log.read(b"k", elsewhere), Err(StorageError::Corrupt { .. })));
        let mut window = ReadAhead::default();
        assert!(matches!(log.read_ahead(b"k", past, &mut window), Err(StorageError::Corrupt { .. })));
        assert!(matches!(log.read_ahead(b"k", elsewhere, &mut window), Err(StorageError::Corrupt { .. })));
        assert_eq!(log.read_ahead(b"k", written, &mut window).unwrap(), &[9u8; 8][..]);
    }

    #[test]
    fn an_in_order_reader_takes_consecutive_chunks_from_one_read_and_refills_elsewhere() {
        let dir = tempfile::tempdir().unwrap();
        let log = ChunkLog::open_with(dir.path(), 100).unwrap();
        let first = log.append(&[vec![1u8; 40], vec![2u8; 40]]).unwrap();
        let second = log.append(&[vec![3u8; 30]]).unwrap();
        let other_segment = log.append(&[vec![4u8; 20]]).unwrap();
        assert_eq!(other_segment[0].segment, 1);
        let mut window = ReadAhead::default();
        assert_eq!(log.read_ahead(b"k", first[0], &mut window).unwrap(), &[1u8; 40][..]);
        // The whole segment (110 bytes, short of the read-ahead size) came with the first read.
        assert_eq!(window.bytes.len(), 110);
        assert_eq!(log.read_ahead(b"k", first[1], &mut window).unwrap(), &[2u8; 40][..]);
        assert_eq!(log.read_ahead(b"k", second[0], &mut window).unwrap(), &[3u8; 30][..]);
        assert_eq!((window.segment, window.offset), (0, 0));
        assert_eq!(log.read_ahead(b"k", other_segment[0], &mut window).unwrap(), &[4u8; 20][..]);
        assert_eq!((window.segment, window.offset), (1, 0));
        // Back to an earlier chunk: the window moves there.
        assert_eq!(log.read_ahead(b"k", first[1], &mut window).unwrap(), &[2u8; 40][..]);
        assert_eq!((window.segment, window.offset, window.bytes.len()), (0, 40, 70));
    }
}
