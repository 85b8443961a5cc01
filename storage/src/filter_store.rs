//! Where the stored id filter lives: one checksummed file, `data_dir/id-filter`.
//!
//! The encoded filter is up to `ID_FILTER_BYTES` (32 MiB) and is rewritten whole every
//! `ID_FILTER_STORE_EVENTS` released events. In sled (first among the state's metadata,
//! then in a tree of its own in 16 KiB pieces) each store left 33 MB more in sled's file,
//! which sled does not give back (see `state_home`): a file replaced whole does.
//!
//! A store writes `id-filter.tmp`, fsyncs it and renames it over `id-filter` (then fsyncs
//! the directory), so a reader sees a whole filter or the one before it. The file is
//! `[magic 8][covers u64 BE][crc32c(covers ‖ filter) u32 BE][filter]`.

use std::io::Write;
use std::path::{Path, PathBuf};

use crate::{record, StorageError};

/// The sled tree an earlier version stored the filter in (read if no file exists yet).
pub const ID_FILTER_TREE: &str = "id_filter";
const FILE_NAME: &str = "id-filter";
const MAGIC: &[u8; 8] = b"STRIDF01";
const HEADER_BYTES: usize = 8 + 8 + 4;
const LEGACY_HEADER_KEY: &[u8] = b"h";
const LEGACY_PIECE_PREFIX: u8 = b'p';

fn path(data_dir: &Path) -> PathBuf {
    data_dir.join(FILE_NAME)
}

fn checksum(covers: u64, encoded: &[u8]) -> u32 {
    crc32c::crc32c_append(crc32c::crc32c(&covers.to_be_bytes()), encoded)
}

/// Stores `encoded` (an `IdFilter::encode`) as covering every id below `covers`,
/// durably, replacing the filter stored before (and a filter an earlier version kept in
/// sled).
pub fn store(data_dir: &Path, db: &sled::Db, covers: u64, encoded: &[u8]) -> Result<(), StorageError> {
    let temp = data_dir.join(format!("{FILE_NAME}.tmp"));
    let mut file = std::fs::File::create(&temp)?;
    file.write_all(MAGIC)?;
    file.write_all(&covers.to_be_bytes())?;
    file.write_all(&checksum(covers, encoded).to_be_bytes())?;
    file.write_all(encoded)?;
    file.sync_all()?;
    drop(file);
    std::fs::rename(&temp, path(data_dir))?;
    std::fs::File::open(data_dir)?.sync_all()?;
    if db.tree_names().iter().any(|name| &**name == ID_FILTER_TREE.as_bytes()) {
        db.drop_tree(ID_FILTER_TREE)?;
    }
    Ok(())
}

/// The stored filter: what it covers and its encoding; None if none was stored.
pub fn load(data_dir: &Path, db: &sled::Db) -> Result<Option<(u64, Vec<u8>)>, StorageError> {
    let bytes = match std::fs::read(path(data_dir)) {
        Ok(bytes) => bytes,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return load_legacy(db),
        Err(e) => return Err(e.into()),
    };
    let corrupt = || StorageError::Corrupt { what: "stored id filter", key: FILE_NAME.into() };
    if bytes.len() < HEADER_BYTES || &bytes[..8] != MAGIC {
        return Err(corrupt());
    }
    let covers = u64::from_be_bytes(bytes[8..16].try_into().expect("8 bytes"));
    let crc = u32::from_be_bytes(bytes[16..20].try_into().expect("4 bytes"));
    let encoded = &bytes[HEADER_BYTES..];
    if checksum(covers, encoded) != crc {
        return Err(corrupt());
    }
    Ok(Some((covers, encoded.to_vec())))
}

/// The filter as an earlier version stored it: a header and 16 KiB pieces in a sled tree.
fn load_legacy(db: &sled::Db) -> Result<Option<(u64, Vec<u8>)>, StorageError> {
    if !db.tree_names().iter().any(|name| &**name == ID_FILTER_TREE.as_bytes()) {
        return Ok(None);
    }
    let tree = db.open_tree(ID_FILTER_TREE)?;
    let corrupt = |key: &[u8]| StorageError::Corrupt { what: "stored id filter", key: record::printable_key(key) };
    let Some(value) = tree.get(LEGACY_HEADER_KEY)? else { return Ok(None) };
    let header = record::open("stored id filter header", LEGACY_HEADER_KEY, &value)?;
    let (covers, count) = header.split_at_checked(8).ok_or_else(|| corrupt(LEGACY_HEADER_KEY))?;
    let covers = u64::from_be_bytes(covers.try_into().map_err(|_| corrupt(LEGACY_HEADER_KEY))?);
    let count = u32::from_be_bytes(count.try_into().map_err(|_| corrupt(LEGACY_HEADER_KEY))?);
    let mut encoded = Vec::new();
    for index in 0..count {
        let mut key = [LEGACY_PIECE_PREFIX; 5];
        key[1..].copy_from_slice(&index.to_be_bytes());
        let value = tree.get(key)?.ok_or_else(|| corrupt(&key))?;
        encoded.extend_from_slice(record::open("stored id filter piece", &key, &value)?);
    }
    Ok(Some((covers, encoded)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_stored_filter_reads_back_whole_and_replaces_the_one_before() {
        let dir = tempfile::tempdir().unwrap();
        let db = crate::open_database(dir.path()).unwrap();
        assert!(load(dir.path(), &db).unwrap().is_none());
        let long: Vec<u8> = (0..50_000).map(|i| i as u8).collect();
        store(dir.path(), &db, 7, &long).unwrap();
        assert_eq!(load(dir.path(), &db).unwrap(), Some((7, long)));
        let short = vec![9u8; 1_000];
        store(dir.path(), &db, 11, &short).unwrap();
        assert_eq!(load(dir.path(), &db).unwrap(), Some((11, short)));
        assert!(!dir.path().join("id-filter.tmp").exists());
    }

    #[test]
    fn a_corrupt_filter_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let db = crate::open_database(dir.path()).unwrap();
        store(dir.path(), &db, 1, &[1u8; 100]).unwrap();
        let file = dir.path().join(FILE_NAME);
        let mut bytes = std::fs::read(&file).unwrap();
        *bytes.last_mut().unwrap() ^= 1;
        std::fs::write(&file, bytes).unwrap();
        assert!(matches!(load(dir.path(), &db), Err(StorageError::Corrupt { .. })));
    }

    #[test]
    fn a_filter_an_earlier_version_kept_in_sled_is_read_then_superseded() {
        let dir = tempfile::tempdir().unwrap();
        let db = crate::open_database(dir.path()).unwrap();
        let tree = db.open_tree(ID_FILTER_TREE).unwrap();
        let mut header = 5u64.to_be_bytes().to_vec();
        header.extend_from_slice(&1u32.to_be_bytes());
        tree.insert(LEGACY_HEADER_KEY, record::seal(LEGACY_HEADER_KEY, &header)).unwrap();
        let key = [LEGACY_PIECE_PREFIX, 0, 0, 0, 0];
        tree.insert(key, record::seal(&key, &[3u8; 10])).unwrap();
        assert_eq!(load(dir.path(), &db).unwrap(), Some((5, vec![3u8; 10])));
        store(dir.path(), &db, 8, &[4u8; 10]).unwrap();
        assert_eq!(load(dir.path(), &db).unwrap(), Some((8, vec![4u8; 10])));
        assert!(!db.tree_names().iter().any(|name| &**name == ID_FILTER_TREE.as_bytes()), "the sled copy is dropped");
    }
}
