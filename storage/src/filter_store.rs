//! Where the stored id filter lives in sled: a tree of its own, in pieces.
//!
//! The encoded filter is up to `ID_FILTER_BYTES` (32 MiB). Kept as one value among the
//! state's metadata, it shared a sled leaf with the applied position, which every apply
//! updates, and sled rewrote the whole 32 MiB page each time it consolidated or moved
//! that leaf: a 2 M-event run left fourteen 33 MB blobs on disk and stalled appends. In
//! its own tree nothing else touches its pages, and in pieces no page is larger than a
//! leaf of pieces.
//!
//! One sled batch writes the pieces and a header (`covers` and the piece count), so a
//! reader sees a whole filter or the one before it. Every piece carries its checksum.

use crate::{record, StorageError};

/// The sled tree of the stored filter.
pub const ID_FILTER_TREE: &str = "id_filter";
/// Bytes per stored piece.
const PIECE_BYTES: usize = 16 * 1024;
const HEADER_KEY: &[u8] = b"h";
const PIECE_PREFIX: u8 = b'p';

fn piece_key(index: u32) -> [u8; 5] {
    let mut key = [PIECE_PREFIX; 5];
    key[1..].copy_from_slice(&index.to_be_bytes());
    key
}

/// Stores `encoded` (an `IdFilter::encode`) as covering every id below `covers`,
/// replacing the filter stored before.
pub fn store(db: &sled::Db, covers: u64, encoded: &[u8]) -> Result<(), StorageError> {
    let tree = db.open_tree(ID_FILTER_TREE)?;
    let mut batch = sled::Batch::default();
    let mut count = 0u32;
    for piece in encoded.chunks(PIECE_BYTES) {
        let key = piece_key(count);
        batch.insert(&key[..], record::seal(&key, piece));
        count += 1;
    }
    // Pieces of a longer filter stored before.
    for key in tree.range(piece_key(count)..=piece_key(u32::MAX)).keys() {
        batch.remove(key?);
    }
    let mut header = covers.to_be_bytes().to_vec();
    header.extend_from_slice(&count.to_be_bytes());
    batch.insert(HEADER_KEY, record::seal(HEADER_KEY, &header));
    tree.apply_batch(batch)?;
    Ok(())
}

/// The stored filter: what it covers and its encoding; None if none was stored.
pub fn load(db: &sled::Db) -> Result<Option<(u64, Vec<u8>)>, StorageError> {
    let tree = db.open_tree(ID_FILTER_TREE)?;
    let corrupt = |key: &[u8]| StorageError::Corrupt { what: "stored id filter", key: record::printable_key(key) };
    let Some(value) = tree.get(HEADER_KEY)? else { return Ok(None) };
    let header = record::open("stored id filter header", HEADER_KEY, &value)?;
    let (covers, count) = header.split_at_checked(8).ok_or_else(|| corrupt(HEADER_KEY))?;
    let covers = u64::from_be_bytes(covers.try_into().map_err(|_| corrupt(HEADER_KEY))?);
    let count = u32::from_be_bytes(count.try_into().map_err(|_| corrupt(HEADER_KEY))?);
    let mut encoded = Vec::with_capacity(count as usize * PIECE_BYTES);
    for index in 0..count {
        let key = piece_key(index);
        let value = tree.get(key)?.ok_or_else(|| corrupt(&key))?;
        encoded.extend_from_slice(record::open("stored id filter piece", &key, &value)?);
    }
    Ok(Some((covers, encoded)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_stored_filter_reads_back_whole_and_replaces_a_longer_one() {
        let dir = tempfile::tempdir().unwrap();
        let db = crate::open_database(dir.path()).unwrap();
        assert!(load(&db).unwrap().is_none());
        let long: Vec<u8> = (0..PIECE_BYTES * 3 + 5).map(|i| i as u8).collect();
        store(&db, 7, &long).unwrap();
        assert_eq!(load(&db).unwrap(), Some((7, long)));
        let short = vec![9u8; PIECE_BYTES + 1];
        store(&db, 11, &short).unwrap();
        assert_eq!(load(&db).unwrap(), Some((11, short)));
        assert_eq!(db.open_tree(ID_FILTER_TREE).unwrap().len(), 3, "the header and two pieces: the old pieces are gone");
    }

    #[test]
    fn a_corrupt_piece_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let db = crate::open_database(dir.path()).unwrap();
        store(&db, 1, &[1u8; 100]).unwrap();
        let tree = db.open_tree(ID_FILTER_TREE).unwrap();
        let key = piece_key(0);
        let mut value = tree.get(key).unwrap().unwrap().to_vec();
        *value.last_mut().unwrap() ^= 1;
        tree.insert(key, value).unwrap();
        assert!(matches!(load(&db), Err(StorageError::Corrupt { .. })));
    }
}
