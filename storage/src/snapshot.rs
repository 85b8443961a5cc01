//! Snapshot files: the control state and the applied events below a cutoff position,
//! streamed to and from disk.
//!
//! Layout: `MAGIC`, format version (u32 LE), cutoff (u64 LE), floor (u64 LE); one frame
//! per control record (aggregate snapshots, groups, the tier state, stream heads: `[len u32
//! LE][crc32c u32 LE][key len u32 LE][key][sealed value]`), the control end frame
//! `[CONTROL_END u32 LE][record count u64 LE]`; the id filter frame `[len u32 LE][crc32c
//! u32 LE][encoded filter]`; one frame per event from the floor below the cutoff `[len u32
//! LE][crc32c u32 LE][bincode StoredEvent]`, then the end frame `[END_MARKER u32 LE][event
//! count u64 LE]`. Events below the floor are in the object-store tier, so a node that
//! installs the snapshot fetches only the hot part. The stream and id indexes are rebuilt
//! from the events on install; the heads come as records, since a stream's events may all
//! be tiered.
//!
//! Events are immutable below the applied position, so they can be written while the node
//! keeps applying: the cutoff fixes what the snapshot contains. The control state changes
//! in place, so it is written first, by [`EventState::begin_snapshot`] while nothing is
//! applied (on the state machine's task), and the events follow later.

use std::fs::File;
use std::io::{BufReader, BufWriter, Read, Write};
use std::path::Path;

use crate::command::StoredEvent;
use crate::state::EventState;
use crate::StorageError;

const MAGIC: &[u8; 8] = b"STRATASN";
pub const SNAPSHOT_FORMAT_VERSION: u32 = 3;
const END_MARKER: u32 = u32::MAX;
const CONTROL_END: u32 = u32::MAX - 1;
/// A snapshot being written is pushed to the disk every this many bytes, and the write
/// waits for it, so that no more than this (plus the write buffer) is ever dirty in the page
/// cache. Why: a snapshot holds the whole local state (240 MB at 600k events), and every
/// node writes one at about the same log index. Left to the kernel, those pages piled up and
/// the Raft log's next fdatasync waited behind them (ext4 commits its journal with the
/// ordered data of every file): appends stalled for 200-270 ms (the p99.9 of the bench's
/// 64-writer cells, where the snapshots fell).
pub const SNAPSHOT_WRITEBACK_BYTES: u64 = 8 * 1024 * 1024;

/// Largest event frame accepted when reading a snapshot: an event is at most 16 MiB of
/// data plus 64 KiB of metadata (SPEC §8), plus its names.
const FRAME_BYTES_MAX: u32 = 17 * 1024 * 1024;
/// Largest id filter frame: the encoded filter is at most 1.5 times its memory.
const FILTER_FRAME_BYTES_MAX: u32 = (crate::ID_FILTER_BYTES as u32 / 2) * 3 + 64;

/// What a snapshot file holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SnapshotSummary {
    pub cutoff_position: u64,
    /// The first position in the snapshot; those below are in the tier.
    pub floor_position: u64,
    pub events: u64,
    pub bytes: u64,
}

/// One record of a snapshot, in file order: the control records, then the events.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SnapshotItem {
    Control { key: Vec<u8>, value: Vec<u8> },
    /// The encoded id filter (see `id_filter`), after the control records.
    IdFilter(Vec<u8>),
    Event(StoredEvent),
}

/// A snapshot whose header and control state are written; its id filter (captured with
/// the control state) and its events follow.
#[derive(Clone)]
pub struct SnapshotInProgress {
    path: std::path::PathBuf,
    cutoff: u64,
    floor: u64,
    bytes: u64,
    /// The id filter as it was at the cutoff. Copied on the state machine's task (a
    /// memory copy), encoded and written off it: encoding 32 MiB there held applies up.
    filter: std::sync::Arc<crate::id_filter::IdFilter>,
}

impl std::fmt::Debug for SnapshotInProgress {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SnapshotInProgress").field("path", &self.path).field("cutoff", &self.cutoff).field("floor", &self.floor).finish()
    }
}

impl SnapshotInProgress {
    /// Where the snapshot is being written.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl EventState {
    /// Writes every control record and every event below `cutoff` to `path` (fsynced).
    /// Nothing may be applied while it runs (see [`EventState::begin_snapshot`]).
    pub fn export_snapshot(&self, path: &Path, cutoff: u64) -> Result<SnapshotSummary, StorageError> {
        let begun = self.begin_snapshot(path, cutoff)?;
        self.finish_snapshot(begun)
    }

    /// Writes the header and the control state. Must run while no entry is being applied,
    /// so that the control state is the one at `cutoff`.
    ///
    /// Until [`EventState::finish_snapshot`] (which must follow) history
    /// is not released, so the events from the floor stay there to be written.
    pub fn begin_snapshot(&self, path: &Path, cutoff: u64) -> Result<SnapshotInProgress, StorageError> {
        assert!(cutoff <= self.next_position(), "cannot snapshot events that are not applied");
        let floor = self.snapshot_started();
        let begun = self.write_snapshot_head(path, cutoff, floor);
        if begun.is_err() {
            self.snapshot_done();
        }
        begun
    }

    fn write_snapshot_head(&self, path: &Path, cutoff: u64, floor: u64) -> Result<SnapshotInProgress, StorageError> {
        let file = File::create(path)?;
        let mut out = BufWriter::with_capacity(1 << 20, file);
        out.write_all(MAGIC)?;
        out.write_all(&SNAPSHOT_FORMAT_VERSION.to_le_bytes())?;
        out.write_all(&cutoff.to_le_bytes())?;
        out.write_all(&floor.to_le_bytes())?;
        let mut bytes = 28u64;
        let mut records = 0u64;
        for record in self.control_records() {
            let (key, value) = record?;
            let mut payload = Vec::with_capacity(4 + key.len() + value.len());
            payload.extend_from_slice(&(key.len() as u32).to_le_bytes());
            payload.extend_from_slice(&key);
            payload.extend_from_slice(&value);
            out.write_all(&(payload.len() as u32).to_le_bytes())?;
            out.write_all(&crc32c::crc32c(&payload).to_le_bytes())?;
            out.write_all(&payload)?;
            records += 1;
            bytes += 8 + payload.len() as u64;
        }
        out.write_all(&CONTROL_END.to_le_bytes())?;
        out.write_all(&records.to_le_bytes())?;
        out.flush()?;
        // Captured with the control state, so it covers every id applied up to the cutoff.
        let filter = std::sync::Arc::new(self.id_filter_copy());
        Ok(SnapshotInProgress { path: path.to_path_buf(), cutoff, floor, bytes: bytes + 12, filter })
    }

    /// Appends the events below the cutoff and the end frame, and fsyncs the file.
    pub fn finish_snapshot(&self, begun: SnapshotInProgress) -> Result<SnapshotSummary, StorageError> {
        let result = self.write_snapshot_events(begun, SNAPSHOT_WRITEBACK_BYTES);
        self.snapshot_done();
        result
    }

    fn write_snapshot_events(&self, begun: SnapshotInProgress, writeback_bytes: u64) -> Result<SnapshotSummary, StorageError> {
        let SnapshotInProgress { path, cutoff, floor, mut bytes, filter } = begun;
        let file = std::fs::OpenOptions::new().append(true).open(&path)?;
        let mut out = BufWriter::with_capacity(1 << 20, PacedWriteback::new(file, writeback_bytes)?);
        let filter = filter.encode();
        out.write_all(&(filter.len() as u32).to_le_bytes())?;
        out.write_all(&crc32c::crc32c(&filter).to_le_bytes())?;
        out.write_all(&filter)?;
        bytes += 8 + filter.len() as u64;
        let mut events = 0u64;
        for event in self.events_below(floor, cutoff) {
            let event = event?;
            assert_eq!(event.position, floor + events, "snapshot positions are gapless");
            let payload = bincode::serialize(&event).map_err(|_| StorageError::Encode { what: "snapshot event" })?;
            out.write_all(&(payload.len() as u32).to_le_bytes())?;
            out.write_all(&crc32c::crc32c(&payload).to_le_bytes())?;
            out.write_all(&payload)?;
            events += 1;
            bytes += 8 + payload.len() as u64;
        }
        assert_eq!(floor + events, cutoff.max(floor), "a snapshot holds every event from its floor below its cutoff");
        out.write_all(&END_MARKER.to_le_bytes())?;
        out.write_all(&events.to_le_bytes())?;
        let file = out.into_inner().map_err(|e| e.into_error())?.file;
        file.sync_all()?;
        Ok(SnapshotSummary { cutoff_position: cutoff, floor_position: floor, events, bytes: bytes + 12 })
    }

    /// Replaces the state with the snapshot at `path`, then records `applied_meta`.
    pub fn install_snapshot(&self, path: &Path, applied_meta: &[u8]) -> Result<SnapshotSummary, StorageError> {
        let summary = verify_snapshot(path)?;
        let mut reader = SnapshotReader::open(path)?;
        let items = std::iter::from_fn(move || reader.next_item().transpose());
        let next = self.replace_all(summary.floor_position, items, applied_meta)?;
        assert_eq!(next, summary.cutoff_position.max(summary.floor_position), "installed state ends at the snapshot cutoff");
        Ok(summary)
    }
}

/// A file appended to with its dirty pages written out every `every` bytes (see
/// [`SNAPSHOT_WRITEBACK_BYTES`]). The write-out is not a durability point: the finished
/// file is fsynced as a whole.
struct PacedWriteback {
    file: File,
    every: u64,
    /// The file offset up to which pages were written out, and how far it was written.
    written_out: u64,
    end: u64,
}

impl PacedWriteback {
    fn new(file: File, every: u64) -> std::io::Result<Self> {
        let end = file.metadata()?.len();
        Ok(Self { file, every, written_out: end, end })
    }

    /// Writes out (and waits for) the pages from the last write-out to the end. Best
    /// effort: a filesystem that refuses `sync_file_range` gets the file written unpaced
    /// (the whole-file fsync at the end is what makes it durable either way).
    fn write_out(&mut self) {
        use std::os::fd::AsRawFd;
        let flags = libc::SYNC_FILE_RANGE_WAIT_BEFORE | libc::SYNC_FILE_RANGE_WRITE | libc::SYNC_FILE_RANGE_WAIT_AFTER;
        let (from, len) = (self.written_out as libc::off64_t, (self.end - self.written_out) as libc::off64_t);
        // SAFETY: sync_file_range on a file descriptor we own; no memory is passed.
        if unsafe { libc::sync_file_range(self.file.as_raw_fd(), from, len, flags) } != 0 {
            tracing::debug!(error = %std::io::Error::last_os_error(), "snapshot write-back not paced: sync_file_range refused");
            self.every = u64::MAX;
        }
        self.written_out = self.end;
    }
}

impl Write for PacedWriteback {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let n = self.file.write(buf)?;
        self.end += n as u64;
        if self.end - self.written_out >= self.every {
            self.write_out();
        }
        Ok(n)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.file.flush()
    }
}

/// Reads the whole file once to check every frame and the end marker before anything is
/// replaced: a damaged snapshot is refused, the old state stays.
pub fn verify_snapshot(path: &Path) -> Result<SnapshotSummary, StorageError> {
    let mut reader = SnapshotReader::open(path)?;
    let mut events = 0u64;
    while let Some(item) = reader.next_item()? {
        let SnapshotItem::Event(event) = item else { continue };
        if event.position != reader.floor + events {
            return Err(reader.bad("positions are not gapless"));
        }
        events += 1;
    }
    if reader.floor + events != reader.cutoff.max(reader.floor) {
        return Err(reader.bad("event count does not match the cutoff"));
    }
    if !reader.filter_seen {
        return Err(reader.bad("the id filter frame is missing"));
    }
    Ok(SnapshotSummary {
        cutoff_position: reader.cutoff,
        floor_position: reader.floor,
        events,
        bytes: std::fs::metadata(path)?.len(),
    })
}

struct SnapshotReader {
    input: BufReader<File>,
    cutoff: u64,
    floor: u64,
    filter_seen: bool,
    seen: u64,
    /// Control records read; None once the control end frame was read.
    control_seen: Option<u64>,
    finished: bool,
    path: String,
}

impl SnapshotReader {
    fn open(path: &Path) -> Result<Self, StorageError> {
        let mut input = BufReader::with_capacity(1 << 20, File::open(path)?);
        let mut reader = Self { input: BufReader::new(File::open(path)?), cutoff: 0, floor: 0, filter_seen: false, seen: 0, control_seen: Some(0), finished: false, path: path.display().to_string() };
        let mut magic = [0u8; 8];
        input.read_exact(&mut magic)?;
        if &magic != MAGIC {
            return Err(reader.bad("not a strata snapshot"));
        }
        let version = read_u32(&mut input)?;
        if version != SNAPSHOT_FORMAT_VERSION {
            return Err(reader.bad(&format!("unsupported format version {version}")));
        }
        reader.cutoff = read_u64(&mut input)?;
        reader.floor = read_u64(&mut input)?;
        reader.input = input;
        Ok(reader)
    }

    fn bad(&self, reason: &str) -> StorageError {
        StorageError::BadSnapshot { reason: reason.to_string(), path: self.path.clone() }
    }

    fn next_item(&mut self) -> Result<Option<SnapshotItem>, StorageError> {
        if let Some(control_seen) = self.control_seen {
            let len = read_u32(&mut self.input)?;
            if len == CONTROL_END {
                if read_u64(&mut self.input)? != control_seen {
                    return Err(self.bad("control end frame count does not match the frames"));
                }
                self.control_seen = None;
                let len = read_u32(&mut self.input)?;
                let filter = self.frame_up_to(len, FILTER_FRAME_BYTES_MAX)?;
                self.filter_seen = true;
                return Ok(Some(SnapshotItem::IdFilter(filter)));
            } else {
                let payload = self.frame(len)?;
                let key_len = payload.get(..4).map(|b| u32::from_le_bytes(b.try_into().expect("4 bytes")) as usize);
                let Some(key_len) = key_len.filter(|k| 4 + k <= payload.len()) else {
                    return Err(self.bad("control frame does not decode"));
                };
                self.control_seen = Some(control_seen + 1);
                let key = payload[4..4 + key_len].to_vec();
                let value = payload[4 + key_len..].to_vec();
                return Ok(Some(SnapshotItem::Control { key, value }));
            }
        }
        Ok(self.next_event()?.map(SnapshotItem::Event))
    }

    /// One checksummed frame's payload of `len` bytes.
    fn frame(&mut self, len: u32) -> Result<Vec<u8>, StorageError> {
        self.frame_up_to(len, FRAME_BYTES_MAX)
    }

    fn frame_up_to(&mut self, len: u32, max: u32) -> Result<Vec<u8>, StorageError> {
        if len > max {
            return Err(self.bad("frame larger than any record"));
        }
        let crc = read_u32(&mut self.input)?;
        let mut payload = vec![0u8; len as usize];
        self.input.read_exact(&mut payload)?;
        if crc32c::crc32c(&payload) != crc {
            return Err(self.bad("frame checksum mismatch"));
        }
        Ok(payload)
    }

    fn next_event(&mut self) -> Result<Option<StoredEvent>, StorageError> {
        if self.finished {
            return Ok(None);
        }
        let len = read_u32(&mut self.input)?;
        if len == END_MARKER {
            let count = read_u64(&mut self.input)?;
            if count != self.seen {
                return Err(self.bad("end frame count does not match the frames"));
            }
            self.finished = true;
            return Ok(None);
        }
        let payload = self.frame(len)?;
        let event: StoredEvent = bincode::deserialize(&payload).map_err(|_| self.bad("frame does not decode"))?;
        self.seen += 1;
        Ok(Some(event))
    }
}

fn read_u32(input: &mut impl Read) -> Result<u32, StorageError> {
    let mut bytes = [0u8; 4];
    input.read_exact(&mut bytes)?;
    Ok(u32::from_le_bytes(bytes))
}

fn read_u64(input: &mut impl Read) -> Result<u64, StorageError> {
    let mut bytes = [0u8; 8];
    input.read_exact(&mut bytes)?;
    Ok(u64::from_le_bytes(bytes))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::command::{AppendCommand, Command, ExpectedVersion, NewEvent};

    fn filled_state(dir: &Path, events: u8) -> EventState {
        let db = crate::open_database(dir).unwrap();
        let state = EventState::open(&db, dir).unwrap();
        let appends = (0..events)
            .map(|i| AppendCommand {
                stream: format!("s-{}", i % 3),
                expected: ExpectedVersion::Any,
                events: vec![NewEvent { id: [i + 1; 16], event_type: "T".into(), content_type: String::new(), data: vec![i], metadata: vec![] }],
                created_unix_ms: 1,
            })
            .collect();
        state.apply(Some(&Command::appends(appends)), b"m").unwrap();
        state
    }

    #[test]
    fn export_then_install_reproduces_the_state() {
        let source_dir = tempfile::tempdir().unwrap();
        let source = filled_state(source_dir.path(), 20);
        let file = source_dir.path().join("snap");
        let summary = source.export_snapshot(&file, 15).unwrap();
        assert_eq!(summary.events, 15);
        let target_dir = tempfile::tempdir().unwrap();
        let target = filled_state(target_dir.path(), 2);
        target.install_snapshot(&file, b"after").unwrap();
        assert_eq!(target.next_position(), 15);
        assert_eq!(target.read_stream("s-0", 0, false, 100).unwrap().len(), 5);
    }

    #[test]
    fn a_snapshot_written_out_in_small_steps_is_the_same_file() {
        let dir = tempfile::tempdir().unwrap();
        let source = filled_state(dir.path(), 30);
        let whole = dir.path().join("whole");
        source.export_snapshot(&whole, 30).unwrap();
        let paced = dir.path().join("paced");
        let begun = source.begin_snapshot(&paced, 30).unwrap();
        // Paced every 64 bytes (the write buffer hands this small file over in one write).
        let summary = source.write_snapshot_events(begun, 64);
        source.snapshot_done();
        assert_eq!(summary.unwrap().events, 30);
        assert_eq!(std::fs::read(&paced).unwrap(), std::fs::read(&whole).unwrap());
        assert_eq!(verify_snapshot(&paced).unwrap().events, 30);
    }

    #[test]
    fn paced_writeback_never_lets_more_than_its_step_pile_up() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("paced");
        std::fs::write(&path, b"head").unwrap();
        let file = std::fs::OpenOptions::new().append(true).open(&path).unwrap();
        let mut paced = PacedWriteback::new(file, 64).unwrap();
        assert_eq!((paced.written_out, paced.end), (4, 4), "starts at the end of what is there");
        let mut expected = b"head".to_vec();
        for i in 0..40u8 {
            paced.write_all(&[i; 10]).unwrap();
            expected.extend_from_slice(&[i; 10]);
            assert!(paced.end - paced.written_out < 64, "written out every 64 bytes");
        }
        assert_eq!(paced.end, expected.len() as u64);
        drop(paced);
        assert_eq!(std::fs::read(&path).unwrap(), expected);
    }

    #[test]
    fn control_state_travels_in_the_snapshot() {
        use crate::control::{AggregateSnapshot, ControlCommand, GroupStart};
        let source_dir = tempfile::tempdir().unwrap();
        let source = filled_state(source_dir.path(), 6);
        let snapshot = AggregateSnapshot { stream: "s-0".into(), version: 1, content_type: "application/json".into(), state: b"{}".to_vec(), created_unix_ms: 3 };
        source.apply_control(ControlCommand::SaveSnapshot(snapshot.clone()), b"m").unwrap().unwrap();
        let create = ControlCommand::CreateGroup { name: "g".into(), source_stream: None, settings: vec![1, 2], start: GroupStart::End, created_unix_ms: 4 };
        source.apply_control(create, b"m").unwrap().unwrap();
        let file = source_dir.path().join("snap");
        let begun = source.begin_snapshot(&file, 6).unwrap();
        // Changed after the control state was captured: not in the snapshot.
        source.apply_control(ControlCommand::DeleteGroup { name: "g".into() }, b"m").unwrap().unwrap();
        source.finish_snapshot(begun).unwrap();
        let target_dir = tempfile::tempdir().unwrap();
        let target = filled_state(target_dir.path(), 1);
        target.install_snapshot(&file, b"after").unwrap();
        assert_eq!(target.snapshots("s-0").unwrap(), vec![snapshot]);
        let group = target.group("g").unwrap().unwrap();
        assert_eq!((group.checkpoint, group.settings), (6, vec![1, 2]));
        // The group id counter came along: a new group gets a fresh id.
        let again = ControlCommand::CreateGroup { name: "h".into(), source_stream: None, settings: vec![], start: GroupStart::Start, created_unix_ms: 5 };
        let crate::control::ControlSuccess::Group(h) = target.apply_control(again, b"m").unwrap().unwrap() else { panic!() };
        assert!(h.group_id > group.group_id);
    }

    #[test]
    fn damaged_snapshot_is_refused_and_state_kept() {
        let source_dir = tempfile::tempdir().unwrap();
        let source = filled_state(source_dir.path(), 5);
        let file = source_dir.path().join("snap");
        source.export_snapshot(&file, 5).unwrap();
        let mut bytes = std::fs::read(&file).unwrap();
        let middle = bytes.len() / 2;
        bytes[middle] ^= 0xff;
        std::fs::write(&file, &bytes).unwrap();
        let target_dir = tempfile::tempdir().unwrap();
        let target = filled_state(target_dir.path(), 2);
        assert!(target.install_snapshot(&file, b"x").is_err());
        assert_eq!(target.next_position(), 2);
    }
}
