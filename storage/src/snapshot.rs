//! Snapshot files: the applied events below a cutoff position, streamed to and from disk.
//!
//! Layout: `MAGIC`, format version (u32 LE), cutoff (u64 LE), then one frame per event
//! `[len u32 LE][crc32c u32 LE][bincode StoredEvent]`, then the end frame
//! `[END_MARKER u32 LE][event count u64 LE]`. Indexes and heads are not stored: they are
//! rebuilt from the events on install, so a snapshot cannot disagree with itself.
//!
//! Events are immutable below the applied position, so a snapshot can be written while
//! the node keeps applying: the cutoff fixes what it contains.

use std::fs::File;
use std::io::{BufReader, BufWriter, Read, Write};
use std::path::Path;

use crate::command::StoredEvent;
use crate::state::EventState;
use crate::StorageError;

const MAGIC: &[u8; 8] = b"STRATASN";
pub const SNAPSHOT_FORMAT_VERSION: u32 = 1;
const END_MARKER: u32 = u32::MAX;
/// Largest event frame accepted when reading a snapshot: an event is at most 16 MiB of
/// data plus 64 KiB of metadata (SPEC §8), plus its names.
const FRAME_BYTES_MAX: u32 = 17 * 1024 * 1024;

/// What a snapshot file holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SnapshotSummary {
    pub cutoff_position: u64,
    pub events: u64,
    pub bytes: u64,
}

impl EventState {
    /// Writes every event below `cutoff` to `path` (fsynced) and returns what it holds.
    pub fn export_snapshot(&self, path: &Path, cutoff: u64) -> Result<SnapshotSummary, StorageError> {
        assert!(cutoff <= self.next_position(), "cannot snapshot events that are not applied");
        let file = File::create(path)?;
        let mut out = BufWriter::with_capacity(1 << 20, file);
        out.write_all(MAGIC)?;
        out.write_all(&SNAPSHOT_FORMAT_VERSION.to_le_bytes())?;
        out.write_all(&cutoff.to_le_bytes())?;
        let mut events = 0u64;
        let mut bytes = 20u64;
        for event in self.events_below(cutoff) {
            let event = event?;
            assert_eq!(event.position, events, "snapshot positions are gapless");
            let payload = bincode::serialize(&event).map_err(|_| StorageError::Encode { what: "snapshot event" })?;
            out.write_all(&(payload.len() as u32).to_le_bytes())?;
            out.write_all(&crc32c::crc32c(&payload).to_le_bytes())?;
            out.write_all(&payload)?;
            events += 1;
            bytes += 8 + payload.len() as u64;
        }
        assert_eq!(events, cutoff, "a snapshot holds every event below its cutoff");
        out.write_all(&END_MARKER.to_le_bytes())?;
        out.write_all(&events.to_le_bytes())?;
        let file = out.into_inner().map_err(|e| e.into_error())?;
        file.sync_all()?;
        Ok(SnapshotSummary { cutoff_position: cutoff, events, bytes: bytes + 12 })
    }

    /// Replaces the state with the snapshot at `path`, then records `applied_meta`.
    pub fn install_snapshot(&self, path: &Path, applied_meta: &[u8]) -> Result<SnapshotSummary, StorageError> {
        let summary = verify_snapshot(path)?;
        let mut reader = SnapshotReader::open(path)?;
        let events = std::iter::from_fn(move || reader.next_event().transpose());
        let next = self.replace_all(events, applied_meta)?;
        assert_eq!(next, summary.cutoff_position, "installed state ends at the snapshot cutoff");
        Ok(summary)
    }
}

/// Reads the whole file once to check every frame and the end marker before anything is
/// replaced: a damaged snapshot is refused, the old state stays.
pub fn verify_snapshot(path: &Path) -> Result<SnapshotSummary, StorageError> {
    let mut reader = SnapshotReader::open(path)?;
    let mut events = 0u64;
    while let Some(event) = reader.next_event()? {
        if event.position != events {
            return Err(reader.bad("positions are not gapless"));
        }
        events += 1;
    }
    if events != reader.cutoff {
        return Err(reader.bad("event count does not match the cutoff"));
    }
    Ok(SnapshotSummary { cutoff_position: reader.cutoff, events, bytes: std::fs::metadata(path)?.len() })
}

struct SnapshotReader {
    input: BufReader<File>,
    cutoff: u64,
    seen: u64,
    finished: bool,
    path: String,
}

impl SnapshotReader {
    fn open(path: &Path) -> Result<Self, StorageError> {
        let mut input = BufReader::with_capacity(1 << 20, File::open(path)?);
        let mut reader = Self { input: BufReader::new(File::open(path)?), cutoff: 0, seen: 0, finished: false, path: path.display().to_string() };
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
        reader.input = input;
        Ok(reader)
    }

    fn bad(&self, reason: &str) -> StorageError {
        StorageError::BadSnapshot { reason: reason.to_string(), path: self.path.clone() }
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
        if len > FRAME_BYTES_MAX {
            return Err(self.bad("frame larger than any event"));
        }
        let crc = read_u32(&mut self.input)?;
        let mut payload = vec![0u8; len as usize];
        self.input.read_exact(&mut payload)?;
        if crc32c::crc32c(&payload) != crc {
            return Err(self.bad("frame checksum mismatch"));
        }
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
        let state = EventState::open(&db).unwrap();
        let appends = (0..events)
            .map(|i| AppendCommand {
                stream: format!("s-{}", i % 3),
                expected: ExpectedVersion::Any,
                events: vec![NewEvent { id: [i + 1; 16], event_type: "T".into(), content_type: String::new(), data: vec![i], metadata: vec![] }],
                created_unix_ms: 1,
            })
            .collect();
        state.apply(Some(&Command::Appends(appends)), b"m").unwrap();
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
