//! The Raft log as an append-only, segmented write-ahead log.
//!
//! Why not sled: sled keeps values inside copy-on-write tree nodes, so every insert of a
//! large Raft entry (a group-commit batch is often 100 KiB+) copies its leaf, and sled's
//! own flush is `sync_file_range`, not an fsync. Measured on the bench (64 writers × 10
//! events) the leader spent most of its CPU in sled's allocator and page cache. A WAL
//! writes each entry once, sequentially, and makes a whole batch durable with one
//! `fdatasync`.
//!
//! Layout: `<dir>/<first index, 20 digits>.wal` segment files, each a run of records
//! `[payload len u32 LE][crc32c(index ‖ payload) u32 LE][index u64 LE][payload]`, and
//! `<dir>/purged` holding the purge floor and the caller's note on it (the Raft layer
//! keeps the purged log id there; entries at or below the floor are gone even if a
//! segment still holds them). Indexes are contiguous above the floor.
//!
//! Durability: [`Wal::append`] writes to the page cache and returns; the entries are
//! durable once a [`Wal::sync`] that *started after* the write has returned. A segment is
//! fdatasync'ed before the next one is started, so a sync of the newest segment covers
//! every write before it. Truncation and purge are made durable before they return.
//!
//! Recovery: a record that fails its checksum or is cut short at the very end of the
//! newest segment is a write that never completed (never acknowledged): it is cut off.
//! Anywhere else it is corruption and opening fails: the node must re-sync, not guess.

use std::collections::{BTreeMap, VecDeque};
use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};

use crate::StorageError;

/// A segment is closed (fsynced) and a new one started once it reaches this size.
pub const WAL_SEGMENT_BYTES_MAX: u64 = 64 * 1024 * 1024;
/// Largest record payload accepted. An append request is at most 32 MiB, so a larger
/// length field can only be corruption.
pub const WAL_RECORD_BYTES_MAX: usize = 64 * 1024 * 1024;

/// Failpoint for the chaos suite: when this variable is set (to anything) at open, every
/// `sync` also records how far the log was fsynced, and opening cuts the log back to that
/// mark, so a `kill -9` loses every write that was not fsynced, as a power cut loses the
/// page cache. It proves the fsync discipline: a node that acknowledged before fsync
/// would lose acknowledged entries under it.
pub const LOSE_UNSYNCED_TAIL_FAILPOINT: &str = "STRATA_FAILPOINT_LOSE_UNSYNCED_WAL_TAIL";
const SYNCED_MARK_FILE: &str = "synced-mark";

/// A log append's buffers are kept for the next append up to this capacity: a fresh
/// buffer per group-commit batch (often megabytes) is fresh memory, and page faults on it
/// were a visible share of a node's CPU. A larger one is freed after its use.
pub const WAL_SCRATCH_BYTES_MAX: usize = 16 * 1024 * 1024;

/// A byte buffer kept from one log append to the next (see `WAL_SCRATCH_BYTES_MAX`): the
/// WAL's write buffer, and the Raft log's encoding buffer.
#[derive(Clone, Default)]
pub struct ScratchBuffer {
    kept: Vec<u8>,
}

impl ScratchBuffer {
    /// The kept buffer, empty (a new one if none is kept).
    pub fn take(&mut self) -> Vec<u8> {
        let mut buffer = std::mem::take(&mut self.kept);
        buffer.clear();
        buffer
    }

    /// Keeps `buffer` for the next `take`, unless it grew past `WAL_SCRATCH_BYTES_MAX`.
    pub fn keep(&mut self, buffer: Vec<u8>) {
        if buffer.capacity() <= WAL_SCRATCH_BYTES_MAX {
            self.kept = buffer;
        }
    }
}

const HEADER_BYTES: usize = 16;
const SEGMENT_SUFFIX: &str = ".wal";
const PURGED_FILE: &str = "purged";

/// Where one record lives.
#[derive(Clone, Copy, Debug)]
struct Location {
    segment: u64,
    offset: u64,
    len: u32,
}

struct Segment {
    file: Arc<File>,
    len: u64,
}

struct State {
    /// Segments by the first index they were created for.
    segments: BTreeMap<u64, Segment>,
    /// Index of `locations[0]`.
    first: u64,
    locations: VecDeque<Location>,
    /// Entries at or below this index are purged.
    purged: Option<u64>,
    /// The caller's note written with the floor.
    purged_note: Option<Vec<u8>>,
    /// The write buffer, kept between appends.
    scratch: ScratchBuffer,
}

impl State {
    fn last(&self) -> Option<u64> {
        (!self.locations.is_empty()).then(|| self.first + self.locations.len() as u64 - 1)
    }

    fn location(&self, index: u64) -> Option<Location> {
        index.checked_sub(self.first).and_then(|i| self.locations.get(i as usize)).copied()
    }
}

/// What [`Wal::open_salvaging`] cut off.
#[derive(Debug, Clone)]
pub struct Salvage {
    /// The segment holding the first corrupt record, and its offset there.
    pub segment: PathBuf,
    pub offset: u64,
    /// The last index kept.
    pub kept_last: Option<u64>,
    /// Where the affected segments were copied before the cut.
    pub quarantine: PathBuf,
}

fn unix_millis() -> u128 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis()).unwrap_or(0)
}

/// A segmented, checksummed, append-only log of `(index, bytes)` records.
pub struct Wal {
    dir: PathBuf,
    state: Mutex<State>,
    /// [`LOSE_UNSYNCED_TAIL_FAILPOINT`] is on.
    synced_mark: bool,
}

impl Wal {
    /// Opens (or creates) the log in `dir`, verifying every record; a corrupt one fails it.
    #[cfg(test)]
    pub fn open(dir: &Path) -> Result<Self, StorageError> {
        Self::open_inner(dir, false, false).map(|(wal, _)| wal)
    }

    /// Opens the log in `dir`; if a record in the middle is corrupt, keeps every record
    /// before it and cuts it and everything after it off, after copying the affected
    /// segments to `dir/quarantine-<unix ms>/`. The caller must then treat this node's log
    /// as behind what it once acknowledged: it must re-sync from the leader before it votes.
    pub fn open_salvaging(dir: &Path) -> Result<(Self, Option<Salvage>), StorageError> {
        Self::open_inner(dir, true, std::env::var_os(LOSE_UNSYNCED_TAIL_FAILPOINT).is_some())
    }

    fn open_inner(dir: &Path, salvage: bool, synced_mark: bool) -> Result<(Self, Option<Salvage>), StorageError> {
        std::fs::create_dir_all(dir)?;
        let (purged, purged_note) = match read_purged(dir)? {
            Some((floor, note)) => (Some(floor), Some(note)),
            None => (None, None),
        };
        let mut names: Vec<(u64, PathBuf)> = Vec::new();
        for entry in std::fs::read_dir(dir)? {
            let path = entry?.path();
            let Some(name) = path.file_name().and_then(|n| n.to_str()) else { continue };
            if let Some(first) = name.strip_suffix(SEGMENT_SUFFIX).and_then(|n| n.parse::<u64>().ok()) {
                names.push((first, path));
            }
        }
        names.sort();
        if synced_mark {
            names = drop_unsynced_tail(dir, names)?;
        }
        let mut state = State { segments: BTreeMap::new(), first: 0, locations: VecDeque::new(), purged, purged_note, scratch: ScratchBuffer::default() };
        let count = names.len();
        let mut salvaged = None;
        for (position, (first, path)) in names.iter().enumerate() {
            let newest = position + 1 == count;
            let file = OpenOptions::new().read(true).write(true).open(path)?;
            match scan_segment(&file, path, *first, newest, &mut state)? {
                Ok(len) => {
                    state.segments.insert(*first, Segment { file: Arc::new(file), len });
                }
                Err(offset) if salvage => {
                    let quarantine = dir.join(format!("quarantine-{}", unix_millis()));
                    std::fs::create_dir_all(&quarantine)?;
                    for (_, affected) in &names[position..] {
                        std::fs::copy(affected, quarantine.join(affected.file_name().expect("segment file name")))?;
                    }
                    for (_, later) in &names[position + 1..] {
                        std::fs::remove_file(later)?;
                    }
                    if offset == 0 {
                        // Nothing of this segment is kept: drop it, so its name never
                        // disagrees with the index of its first record.
                        drop(file);
                        std::fs::remove_file(path)?;
                    } else {
                        file.set_len(offset)?;
                        preallocate(&file);
                        file.sync_all()?;
                        state.segments.insert(*first, Segment { file: Arc::new(file), len: offset });
                    }
                    sync_dir(dir)?;
                    tracing::error!(segment = %path.display(), offset, kept_last = ?state.last(), quarantine = %quarantine.display(),
                        "corrupt raft log record: cut the log off before it; the node re-syncs from the leader before it votes");
                    salvaged = Some(Salvage { segment: path.clone(), offset, kept_last: state.last(), quarantine });
                    break;
                }
                Err(offset) => return Err(StorageError::Corrupt { what: "raft log segment", key: format!("{}@{offset}", path.display()) }),
            }
        }
        Ok((Self { dir: dir.to_path_buf(), state: Mutex::new(state), synced_mark }, salvaged))
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().expect("wal lock is never poisoned")
    }

    /// First and last index held, if any.
    pub fn bounds(&self) -> Option<(u64, u64)> {
        let state = self.lock();
        state.last().map(|last| (state.first, last))
    }

    /// The purge floor.
    #[cfg(test)]
    fn purged(&self) -> Option<u64> {
        self.lock().purged
    }

    /// The note written with the latest purge floor.
    pub fn purged_note(&self) -> Option<Vec<u8>> {
        self.lock().purged_note.clone()
    }

    /// Writes records; each index must follow the last one (any index if the log is
    /// empty, above the purge floor). Not durable until a later [`Wal::sync`] returns.
    pub fn append<B: AsRef<[u8]>>(&self, entries: &[(u64, B)]) -> Result<(), StorageError> {
        if entries.is_empty() {
            return Ok(());
        }
        let mut state = self.lock();
        let start = match state.last() {
            Some(last) => last + 1,
            None => entries[0].0,
        };
        if state.purged.is_some_and(|floor| start <= floor) {
            return Err(io::Error::other(format!("append at index {start} is at or below the purge floor")).into());
        }
        let mut buffer = state.scratch.take();
        buffer.reserve(entries.iter().map(|(_, b)| HEADER_BYTES + b.as_ref().len()).sum());
        for ((index, bytes), expected) in entries.iter().zip(start..) {
            let bytes = bytes.as_ref();
            if *index != expected {
                return Err(io::Error::other(format!("wal append out of order: index {index}, expected {expected}")).into());
            }
            if bytes.len() > WAL_RECORD_BYTES_MAX {
                return Err(io::Error::other(format!("wal record of {} bytes exceeds WAL_RECORD_BYTES_MAX={WAL_RECORD_BYTES_MAX}", bytes.len())).into());
            }
            encode_record(*index, bytes, &mut buffer);
        }
        let newest = self.writable_segment(&mut state, entries[0].0, buffer.len() as u64)?;
        let segment = state.segments.get_mut(&newest).expect("writable segment exists");
        let start = segment.len;
        segment.file.write_all_at(&buffer, start)?;
        segment.len += buffer.len() as u64;
        state.scratch.keep(buffer);
        if state.locations.is_empty() {
            state.first = entries[0].0;
        }
        let mut offset = start;
        for (_, bytes) in entries {
            let len = bytes.as_ref().len();
            state.locations.push_back(Location { segment: newest, offset, len: len as u32 });
            offset += (HEADER_BYTES + len) as u64;
        }
        Ok(())
    }

    /// The segment to write `bytes` to: the newest, unless it is full or the log is
    /// empty; then a new one (the old one is fsynced first, see the module docs).
    fn writable_segment(&self, state: &mut State, first_index: u64, bytes: u64) -> Result<u64, StorageError> {
        if let Some((&newest, segment)) = state.segments.iter().next_back() {
            let full = segment.len > 0 && segment.len + bytes > WAL_SEGMENT_BYTES_MAX;
            if !full && !state.locations.is_empty() {
                return Ok(newest);
            }
            segment.file.sync_data()?;
        }
        let path = segment_path(&self.dir, first_index);
        let file = OpenOptions::new().read(true).write(true).create(true).truncate(true).open(&path)?;
        preallocate(&file);
        file.sync_all()?;
        sync_dir(&self.dir)?;
        state.segments.insert(first_index, Segment { file: Arc::new(file), len: 0 });
        Ok(first_index)
    }

    /// Makes every write that returned before this call durable (one fdatasync).
    pub fn sync(&self) -> Result<(), StorageError> {
        let newest = self.lock().segments.iter().next_back().map(|(first, s)| (*first, s.len, s.file.clone()));
        if let Some((first, len, file)) = newest {
            file.sync_data()?;
            if self.synced_mark {
                write_synced_mark(&self.dir, first, len)?;
            }
        }
        Ok(())
    }

    /// Records with index in `[start, end)`, in order, each checksum verified.
    pub fn read_range(&self, start: u64, end: u64) -> Result<Vec<(u64, Vec<u8>)>, StorageError> {
        // Collect the locations under the lock, read without it: a read never blocks an append.
        let runs: Vec<(u64, Arc<File>, u64, Vec<Location>)> = {
            let state = self.lock();
            let Some(last) = state.last() else { return Ok(Vec::new()) };
            let start = start.max(state.first);
            let end = end.min(last + 1);
            let mut runs: Vec<(u64, Arc<File>, u64, Vec<Location>)> = Vec::new();
            for index in start..end {
                let location = state.location(index).expect("index within bounds");
                match runs.last_mut() {
                    Some((_, _, _, run)) if run.last().is_some_and(|l| l.segment == location.segment) => run.push(location),
                    _ => {
                        let file = state.segments[&location.segment].file.clone();
                        runs.push((index, file, location.offset, vec![location]));
                    }
                }
            }
            runs
        };
        let mut out = Vec::new();
        for (first_index, file, offset, run) in runs {
            // One read per run of records in the same segment.
            let tail = run.last().expect("runs are never empty");
            let span = (tail.offset + HEADER_BYTES as u64 + tail.len as u64 - offset) as usize;
            let mut bytes = vec![0u8; span];
            file.read_exact_at(&mut bytes, offset)?;
            for (i, location) in run.iter().enumerate() {
                let index = first_index + i as u64;
                let at = (location.offset - offset) as usize;
                let record = &bytes[at..at + HEADER_BYTES + location.len as usize];
                match decode_record(record) {
                    Some((found, payload)) if found == index => out.push((index, payload.to_vec())),
                    _ => return Err(StorageError::Corrupt { what: "raft log entry", key: index.to_string() }),
                }
            }
        }
        Ok(out)
    }

    /// The last record, if any.
    pub fn last(&self) -> Result<Option<(u64, Vec<u8>)>, StorageError> {
        let Some((_, last)) = self.bounds() else { return Ok(None) };
        Ok(self.read_range(last, last + 1)?.pop())
    }

    /// Removes every record with index `>= from`, durably.
    pub fn truncate_from(&self, from: u64) -> Result<(), StorageError> {
        let mut state = self.lock();
        let Some(last) = state.last() else { return Ok(()) };
        if from > last {
            return Ok(());
        }
        let keep = from.saturating_sub(state.first) as usize;
        // Where the log now ends: the segment and offset of the first removed record.
        let cut = state.location(from.max(state.first)).expect("index within bounds");
        state.locations.truncate(keep);
        let doomed: Vec<u64> = state.segments.range(cut.segment + 1..).map(|(first, _)| *first).collect();
        for first in doomed {
            state.segments.remove(&first);
            std::fs::remove_file(segment_path(&self.dir, first))?;
        }
        let segment = state.segments.get_mut(&cut.segment).expect("segment of a held record");
        segment.file.set_len(cut.offset)?;
        preallocate(&segment.file);
        segment.file.sync_all()?;
        segment.len = cut.offset;
        sync_dir(&self.dir)?;
        if self.synced_mark {
            write_synced_mark(&self.dir, cut.segment, cut.offset)?;
        }
        Ok(())
    }

    /// Drops every record with index `<= upto`, durably: the floor (with `note`) is
    /// written first, then whole segments below it are deleted.
    pub fn purge_upto(&self, upto: u64, note: &[u8]) -> Result<(), StorageError> {
        let mut state = self.lock();
        if state.purged.is_some_and(|floor| floor >= upto) {
            return Ok(());
        }
        write_purged(&self.dir, upto, note)?;
        state.purged = Some(upto);
        state.purged_note = Some(note.to_vec());
        while state.last().is_some() && state.first <= upto {
            state.locations.pop_front();
            state.first += 1;
        }
        if state.locations.is_empty() {
            state.first = upto + 1;
        }
        // A segment can go once the next one starts at or below upto + 1 (all of it is
        // purged); the newest stays, it is where appends go.
        let firsts: Vec<u64> = state.segments.keys().copied().collect();
        for pair in firsts.windows(2) {
            if pair[1] <= upto + 1 {
                state.segments.remove(&pair[0]);
                std::fs::remove_file(segment_path(&self.dir, pair[0]))?;
            }
        }
        sync_dir(&self.dir)?;
        Ok(())
    }

    /// Whether the log has never held a record.
    pub fn is_pristine(&self) -> bool {
        let state = self.lock();
        state.locations.is_empty() && state.purged.is_none()
    }
}

fn segment_path(dir: &Path, first: u64) -> PathBuf {
    dir.join(format!("{first:020}{SEGMENT_SUFFIX}"))
}

fn encode_record(index: u64, payload: &[u8], out: &mut Vec<u8>) {
    out.extend_from_slice(&(payload.len() as u32).to_le_bytes());
    out.extend_from_slice(&checksum(index, payload).to_le_bytes());
    out.extend_from_slice(&index.to_le_bytes());
    out.extend_from_slice(payload);
}

/// `(index, payload)` of a whole record, or `None` if it is malformed or fails its checksum.
fn decode_record(record: &[u8]) -> Option<(u64, &[u8])> {
    let header = record.get(..HEADER_BYTES)?;
    let len = u32::from_le_bytes(header[0..4].try_into().ok()?) as usize;
    let stored = u32::from_le_bytes(header[4..8].try_into().ok()?);
    let index = u64::from_le_bytes(header[8..16].try_into().ok()?);
    let payload = record.get(HEADER_BYTES..HEADER_BYTES + len)?;
    (record.len() == HEADER_BYTES + len && checksum(index, payload) == stored).then_some((index, payload))
}

fn checksum(index: u64, payload: &[u8]) -> u32 {
    crc32c::crc32c_append(crc32c::crc32c(&index.to_le_bytes()), payload)
}

/// Under [`LOSE_UNSYNCED_TAIL_FAILPOINT`]: writes that the fsync mark says are synced:
/// (segment, length). Written after the fsync and before anyone is told "flushed".
fn write_synced_mark(dir: &Path, segment: u64, len: u64) -> Result<(), StorageError> {
    let mut mark = [0u8; 16];
    mark[..8].copy_from_slice(&segment.to_le_bytes());
    mark[8..].copy_from_slice(&len.to_le_bytes());
    let file = OpenOptions::new().write(true).create(true).truncate(false).open(dir.join(SYNCED_MARK_FILE))?;
    // One 16-byte write: a process kill cannot tear it.
    file.write_all_at(&mark, 0)?;
    Ok(())
}

/// Under [`LOSE_UNSYNCED_TAIL_FAILPOINT`]: cuts every segment back to the last fsync mark,
/// dropping what a power cut would have dropped; returns the segments left.
fn drop_unsynced_tail(dir: &Path, names: Vec<(u64, PathBuf)>) -> Result<Vec<(u64, PathBuf)>, StorageError> {
    let mark = std::fs::read(dir.join(SYNCED_MARK_FILE)).ok().filter(|m| m.len() == 16).map(|m| {
        (u64::from_le_bytes(m[..8].try_into().expect("8 bytes")), u64::from_le_bytes(m[8..].try_into().expect("8 bytes")))
    });
    let mut kept = Vec::new();
    for (first, path) in names {
        match mark {
            Some((segment, _)) if first < segment => kept.push((first, path)),
            Some((segment, len)) if first == segment => {
                let file = OpenOptions::new().write(true).open(&path)?;
                let cut = len.min(file.metadata()?.len());
                file.set_len(cut)?;
                tracing::warn!(segment = %path.display(), synced_len = cut, "failpoint {LOSE_UNSYNCED_TAIL_FAILPOINT}: dropped the unsynced tail");
                kept.push((first, path));
            }
            _ => {
                tracing::warn!(segment = %path.display(), "failpoint {LOSE_UNSYNCED_TAIL_FAILPOINT}: dropped a segment never fsynced");
                std::fs::remove_file(&path)?;
            }
        }
    }
    Ok(kept)
}

/// Reads every record of one segment into `state` and returns the segment's valid length,
/// or `Err(offset)` of the first record that is corrupt (the records before it are in
/// `state`).
fn scan_segment(file: &File, path: &Path, first: u64, newest: bool, state: &mut State) -> Result<Result<u64, u64>, StorageError> {
    let file_len = file.metadata()?.len();
    let corrupt = |offset: u64| -> Result<Result<u64, u64>, StorageError> { Ok(Err(offset)) };
    // Segments are read whole; they are bounded by WAL_SEGMENT_BYTES_MAX plus one record.
    let mut bytes = vec![0u8; file_len as usize];
    file.read_exact_at(&mut bytes, 0)?;
    let mut offset = 0usize;
    while offset < bytes.len() {
        let rest = &bytes[offset..];
        let complete = rest.len() >= HEADER_BYTES && {
            let len = u32::from_le_bytes(rest[0..4].try_into().expect("4 bytes")) as usize;
            len <= WAL_RECORD_BYTES_MAX && rest.len() >= HEADER_BYTES + len
        };
        let record = complete.then(|| {
            let len = u32::from_le_bytes(rest[0..4].try_into().expect("4 bytes")) as usize;
            &rest[..HEADER_BYTES + len]
        });
        let Some((index, payload)) = record.and_then(decode_record) else {
            if rest.iter().all(|b| *b == 0) {
                // The preallocated, never written rest of the segment.
                break;
            }
            if newest && is_torn_tail(rest) {
                tracing::warn!(path = %path.display(), offset, "cutting off an incomplete record at the end of the raft log");
                break;
            }
            return corrupt(offset as u64);
        };
        if offset == 0 && index != first {
            // A segment is named after the index of its first record.
            return corrupt(offset as u64);
        }
        // A purged record is skipped, and the next kept one may start anywhere above the
        // floor; kept records are contiguous.
        let kept = state.purged.is_none_or(|floor| index > floor);
        if kept {
            match state.last() {
                Some(last) if index != last + 1 => return corrupt(offset as u64),
                Some(_) => {}
                None => state.first = index,
            }
            state.locations.push_back(Location { segment: first, offset: offset as u64, len: payload.len() as u32 });
        }
        offset += HEADER_BYTES + payload.len();
    }
    if newest && (offset as u64) < file_len {
        // Clear whatever follows the last whole record (a torn write, or writes that
        // reached the disk out of order before a crash) so it can never be read as log.
        file.set_len(offset as u64)?;
        preallocate(file);
        file.sync_all()?;
    }
    Ok(Ok(offset as u64))
}

/// Reserves the segment's blocks up front, so an fdatasync after an append does not also
/// have to commit a new file size and block allocation to the filesystem journal. Best
/// effort: a filesystem without fallocate just grows the file as it is written.
fn preallocate(file: &File) {
    use std::os::unix::io::AsRawFd;
    // SAFETY: fallocate on an open file descriptor we own; no memory is passed.
    let result = unsafe { libc::fallocate(file.as_raw_fd(), 0, 0, WAL_SEGMENT_BYTES_MAX as libc::off_t) };
    if result != 0 {
        tracing::debug!(error = %io::Error::last_os_error(), "could not preallocate a raft log segment");
    }
}

/// Whether a bad record at the end of the newest segment is a write cut short by a crash:
/// its length runs past the end of the file, or only zeros (never written) follow it.
fn is_torn_tail(rest: &[u8]) -> bool {
    if rest.len() < HEADER_BYTES {
        return true;
    }
    let len = u32::from_le_bytes(rest[0..4].try_into().expect("4 bytes")) as usize;
    // A record that fits but fails its checksum is torn only if it is the last thing in
    // the file: a completed write followed by more records cannot be half-written.
    // A header of zeros was never written (no whole record has one: its checksum would
    // not match); pages written after it may have reached the disk first, but nothing
    // from it on was ever fsynced, so nothing from it on was acknowledged.
    let never_written = rest[..HEADER_BYTES].iter().all(|b| *b == 0);
    never_written || len > WAL_RECORD_BYTES_MAX || rest.len() <= HEADER_BYTES + len || rest[HEADER_BYTES + len..].iter().all(|b| *b == 0)
}

fn read_purged(dir: &Path) -> Result<Option<(u64, Vec<u8>)>, StorageError> {
    let path = dir.join(PURGED_FILE);
    let bytes = match std::fs::read(&path) {
        Ok(bytes) => bytes,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e.into()),
    };
    let corrupt = || StorageError::Corrupt { what: "raft log purge floor", key: path.display().to_string() };
    let payload = crate::record::open("raft log purge floor", PURGED_FILE.as_bytes(), &bytes).map_err(|_| corrupt())?;
    let (floor, note) = payload.split_at_checked(8).ok_or_else(corrupt)?;
    Ok(Some((u64::from_le_bytes(floor.try_into().map_err(|_| corrupt())?), note.to_vec())))
}

/// Writes the floor to a temporary file, fsyncs it and renames it over the old one.
fn write_purged(dir: &Path, upto: u64, note: &[u8]) -> Result<(), StorageError> {
    let temporary = dir.join(format!("{PURGED_FILE}.tmp"));
    let mut payload = upto.to_le_bytes().to_vec();
    payload.extend_from_slice(note);
    let sealed = crate::record::seal(PURGED_FILE.as_bytes(), &payload);
    let file = OpenOptions::new().write(true).create(true).truncate(true).open(&temporary)?;
    file.write_all_at(&sealed, 0)?;
    file.sync_all()?;
    std::fs::rename(&temporary, dir.join(PURGED_FILE))?;
    sync_dir(dir)?;
    Ok(())
}

fn sync_dir(dir: &Path) -> Result<(), StorageError> {
    File::open(dir)?.sync_all()?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_scratch_buffer_is_kept_empty_up_to_its_bound() {
        let mut scratch = ScratchBuffer::default();
        let mut small = scratch.take();
        small.extend_from_slice(b"written");
        let capacity = small.capacity();
        scratch.keep(small);
        let again = scratch.take();
        assert!(again.is_empty() && again.capacity() == capacity, "kept, and handed out empty");
        scratch.keep(Vec::with_capacity(WAL_SCRATCH_BYTES_MAX + 1));
        assert_eq!(scratch.take().capacity(), 0, "a buffer past the bound is freed");
    }

    fn entries(range: std::ops::RangeInclusive<u64>) -> Vec<(u64, Vec<u8>)> {
        range.map(|i| (i, format!("entry-{i}").into_bytes())).collect()
    }

    fn indexes(wal: &Wal, start: u64, end: u64) -> Vec<u64> {
        wal.read_range(start, end).unwrap().into_iter().map(|(i, _)| i).collect()
    }

    #[test]
    fn append_read_truncate_purge_and_reopen() {
        let dir = tempfile::tempdir().unwrap();
        {
            let wal = Wal::open(dir.path()).unwrap();
            assert!(wal.is_pristine());
            wal.append(&entries(1..=10)).unwrap();
            wal.sync().unwrap();
            assert_eq!(indexes(&wal, 3, 6), vec![3, 4, 5]);
            assert_eq!(wal.read_range(7, 8).unwrap()[0].1, b"entry-7");
            wal.truncate_from(8).unwrap();
            assert_eq!(wal.last().unwrap().unwrap().0, 7);
            wal.append(&entries(8..=12)).unwrap();
            wal.purge_upto(4, b"note").unwrap();
            wal.sync().unwrap();
            assert_eq!(wal.bounds(), Some((5, 12)));
        }
        let wal = Wal::open(dir.path()).unwrap();
        assert_eq!(wal.bounds(), Some((5, 12)));
        assert_eq!(indexes(&wal, 0, 100), (5..=12).collect::<Vec<_>>());
        assert!(!wal.is_pristine());
        assert!(wal.append(&entries(14..=14)).is_err(), "a gap is refused");
    }

    #[test]
    fn purging_everything_lets_the_log_restart_higher() {
        let dir = tempfile::tempdir().unwrap();
        {
            let wal = Wal::open(dir.path()).unwrap();
            wal.append(&entries(1..=5)).unwrap();
            wal.purge_upto(20, b"note").unwrap();
            assert_eq!(wal.bounds(), None);
            assert!(wal.append(&entries(20..=20)).is_err(), "at the floor is refused");
            wal.append(&entries(21..=22)).unwrap();
            wal.sync().unwrap();
        }
        let wal = Wal::open(dir.path()).unwrap();
        assert_eq!(wal.bounds(), Some((21, 22)));
        assert_eq!(wal.purged(), Some(20));
        assert_eq!(wal.purged_note().unwrap(), b"note");
    }

    #[test]
    fn segments_roll_over_and_old_ones_are_deleted_by_purge() {
        let dir = tempfile::tempdir().unwrap();
        let big = vec![7u8; (WAL_SEGMENT_BYTES_MAX / 3) as usize];
        {
            let wal = Wal::open(dir.path()).unwrap();
            for i in 1..=7 {
                wal.append(&[(i, big.clone())]).unwrap();
            }
            wal.sync().unwrap();
            let segments = || std::fs::read_dir(dir.path()).unwrap().filter(|e| e.as_ref().unwrap().path().extension().is_some_and(|x| x == "wal")).count();
            assert!(segments() >= 3, "rolled over");
            wal.purge_upto(6, b"note").unwrap();
            assert_eq!(segments(), 1, "only the newest segment is left");
            assert_eq!(indexes(&wal, 0, 100), vec![7]);
        }
        let wal = Wal::open(dir.path()).unwrap();
        assert_eq!(wal.bounds(), Some((7, 7)));
    }

    #[test]
    fn a_torn_tail_is_cut_off() {
        let dir = tempfile::tempdir().unwrap();
        {
            let wal = Wal::open(dir.path()).unwrap();
            wal.append(&entries(1..=3)).unwrap();
            wal.sync().unwrap();
        }
        let path = segment_path(dir.path(), 1);
        let end = 3 * (HEADER_BYTES + b"entry-1".len()) as u64;
        // The tail of the last record never made it to disk (the segment is preallocated:
        // zeros follow).
        OpenOptions::new().write(true).open(&path).unwrap().write_all_at(&[0, 0, 0], end - 3).unwrap();
        let wal = Wal::open(dir.path()).unwrap();
        assert_eq!(wal.bounds(), Some((1, 2)));
        wal.append(&entries(3..=3)).unwrap();
        assert_eq!(indexes(&wal, 0, 10), vec![1, 2, 3]);
    }

    #[test]
    fn records_written_back_out_of_order_before_a_crash_are_dropped() {
        let dir = tempfile::tempdir().unwrap();
        {
            let wal = Wal::open(dir.path()).unwrap();
            wal.append(&entries(1..=3)).unwrap();
            wal.sync().unwrap();
        }
        // Record 2 never reached the disk but record 3 did: neither was fsynced.
        let record = (HEADER_BYTES + b"entry-1".len()) as u64;
        let path = segment_path(dir.path(), 1);
        OpenOptions::new().write(true).open(&path).unwrap().write_all_at(&vec![0; record as usize], record).unwrap();
        {
            let wal = Wal::open(dir.path()).unwrap();
            assert_eq!(wal.bounds(), Some((1, 1)));
            wal.append(&entries(2..=2)).unwrap();
            wal.sync().unwrap();
        }
        // The stale record 3 was cleared, so it cannot reappear after the new record 2.
        let wal = Wal::open(dir.path()).unwrap();
        assert_eq!(wal.bounds(), Some((1, 2)));
    }

    #[test]
    fn corruption_before_the_tail_refuses_to_open() {
        let dir = tempfile::tempdir().unwrap();
        {
            let wal = Wal::open(dir.path()).unwrap();
            wal.append(&entries(1..=3)).unwrap();
            wal.sync().unwrap();
        }
        let path = segment_path(dir.path(), 1);
        let mut bytes = std::fs::read(&path).unwrap();
        bytes[HEADER_BYTES + 2] ^= 0x01; // a payload bit of entry 1
        std::fs::write(&path, &bytes).unwrap();
        assert!(matches!(Wal::open(dir.path()), Err(StorageError::Corrupt { .. })));
    }

    #[test]
    fn the_unsynced_tail_failpoint_loses_exactly_what_was_not_fsynced() {
        let dir = tempfile::tempdir().unwrap();
        {
            let (wal, _) = Wal::open_inner(dir.path(), true, true).unwrap();
            wal.append(&entries(1..=3)).unwrap();
            wal.sync().unwrap();
            wal.append(&entries(4..=5)).unwrap(); // in the page cache only
        }
        let (wal, _) = Wal::open_inner(dir.path(), true, true).unwrap();
        assert_eq!(indexes(&wal, 0, 10), vec![1, 2, 3], "the fsynced records survive, the rest is gone");
        wal.append(&entries(4..=4)).unwrap();
        wal.sync().unwrap();
        drop(wal);
        let (wal, _) = Wal::open_inner(dir.path(), true, true).unwrap();
        assert_eq!(indexes(&wal, 0, 10), vec![1, 2, 3, 4]);
    }

    #[test]
    fn salvaging_keeps_the_records_before_a_corrupt_one_and_quarantines_the_segment() {
        let dir = tempfile::tempdir().unwrap();
        {
            let wal = Wal::open(dir.path()).unwrap();
            wal.append(&entries(1..=5)).unwrap();
            wal.sync().unwrap();
        }
        let path = segment_path(dir.path(), 1);
        let record = HEADER_BYTES + b"entry-1".len();
        let mut bytes = std::fs::read(&path).unwrap();
        bytes[2 * record + HEADER_BYTES + 1] ^= 0x20; // a payload bit of entry 3
        std::fs::write(&path, &bytes).unwrap();
        assert!(matches!(Wal::open(dir.path()), Err(StorageError::Corrupt { .. })), "plain open still refuses");
        let (wal, salvage) = Wal::open_salvaging(dir.path()).unwrap();
        let salvage = salvage.expect("salvaged");
        assert_eq!((salvage.offset, salvage.kept_last), (2 * record as u64, Some(2)));
        assert_eq!(std::fs::read(salvage.quarantine.join(path.file_name().unwrap())).unwrap(), bytes, "the damaged segment is kept aside");
        assert_eq!(wal.bounds(), Some((1, 2)));
        // The log goes on from the cut, and reopens cleanly.
        wal.append(&entries(3..=4)).unwrap();
        wal.sync().unwrap();
        drop(wal);
        let (wal, salvage) = Wal::open_salvaging(dir.path()).unwrap();
        assert!(salvage.is_none());
        assert_eq!(indexes(&wal, 0, 10), vec![1, 2, 3, 4]);
    }

    #[test]
    fn a_flipped_bit_is_an_error_on_read() {
        let dir = tempfile::tempdir().unwrap();
        let wal = Wal::open(dir.path()).unwrap();
        wal.append(&entries(1..=2)).unwrap();
        let path = segment_path(dir.path(), 1);
        let file = OpenOptions::new().write(true).open(&path).unwrap();
        file.write_all_at(b"X", HEADER_BYTES as u64 + 1).unwrap();
        assert!(matches!(wal.read_range(1, 2), Err(StorageError::Corrupt { .. })));
        assert_eq!(indexes(&wal, 2, 3), vec![2]);
    }
}
