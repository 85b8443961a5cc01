//! Checksummed records: `[crc32c(key ‖ payload) as u32 LE][payload]`.
//!
//! The checksum covers the key too, so a value that ends up under the wrong key (a bug,
//! a misdirected write) is caught as well as flipped bits.

use crate::StorageError;

pub const CHECKSUM_BYTES: usize = 4;

/// Frames `payload` stored under `key` with its checksum.
pub fn seal(key: &[u8], payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(CHECKSUM_BYTES + payload.len());
    out.extend_from_slice(&checksum(key, payload).to_le_bytes());
    out.extend_from_slice(payload);
    out
}

/// Verifies a record read from `key` and returns its payload.
pub fn open<'a>(what: &'static str, key: &[u8], record: &'a [u8]) -> Result<&'a [u8], StorageError> {
    let corrupt = || StorageError::Corrupt { what, key: printable_key(key) };
    if record.len() < CHECKSUM_BYTES {
        return Err(corrupt());
    }
    let (stored, payload) = record.split_at(CHECKSUM_BYTES);
    let stored = u32::from_le_bytes(stored.try_into().map_err(|_| corrupt())?);
    if stored != checksum(key, payload) {
        return Err(corrupt());
    }
    Ok(payload)
}

fn checksum(key: &[u8], payload: &[u8]) -> u32 {
    crc32c::crc32c_append(crc32c::crc32c(key), payload)
}

/// A key for error messages: UTF-8 where it is, hex otherwise.
pub fn printable_key(key: &[u8]) -> String {
    key.iter()
        .map(|b| if b.is_ascii_graphic() { (*b as char).to_string() } else { format!("\\x{b:02x}") })
        .collect()
}

/// Bincode-encodes a value as a sealed record.
pub fn seal_value<T: serde::Serialize>(what: &'static str, key: &[u8], value: &T) -> Result<Vec<u8>, StorageError> {
    let payload = bincode::serialize(value).map_err(|_| StorageError::Encode { what })?;
    Ok(seal(key, &payload))
}

/// Opens a sealed record and bincode-decodes it.
pub fn open_value<T: serde::de::DeserializeOwned>(
    what: &'static str,
    key: &[u8],
    record: &[u8],
) -> Result<T, StorageError> {
    let payload = open(what, key, record)?;
    bincode::deserialize(payload).map_err(|_| StorageError::Corrupt { what, key: printable_key(key) })
}

/// The record at `key` in `tree`, opened and decoded; None when there is none.
pub fn read_value<T: serde::de::DeserializeOwned>(what: &'static str, tree: &sled::Tree, key: &[u8]) -> Result<Option<T>, StorageError> {
    tree.get(key)?.map(|value| open_value(what, key, &value)).transpose()
}

/// Every record under `prefix` in `tree`, in key order, opened and decoded.
pub fn scan_values<T: serde::de::DeserializeOwned>(what: &'static str, tree: &sled::Tree, prefix: &[u8]) -> Result<Vec<T>, StorageError> {
    tree.scan_prefix(prefix).map(|item| {
        let (key, value) = item?;
        open_value(what, &key, &value)
    }).collect()
}

/// Bincode-decodes a view that borrows from `payload`, an opened record's payload.
pub fn decode_view<'a, T: serde::Deserialize<'a>>(what: &'static str, key: &[u8], payload: &'a [u8]) -> Result<T, StorageError> {
    bincode::deserialize(payload).map_err(|_| StorageError::Corrupt { what, key: printable_key(key) })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sealed_record_round_trips() {
        let record = seal(b"k", b"payload");
        assert_eq!(open("test", b"k", &record).unwrap(), b"payload");
    }

    #[test]
    fn flipped_bit_is_detected() {
        let mut record = seal(b"k", b"payload");
        let last = record.len() - 1;
        record[last] ^= 0x01;
        assert!(matches!(open("test", b"k", &record), Err(StorageError::Corrupt { .. })));
    }

    #[test]
    fn record_under_wrong_key_is_detected() {
        let record = seal(b"k1", b"payload");
        assert!(open("test", b"k2", &record).is_err());
    }

    #[test]
    fn truncated_record_is_detected() {
        assert!(open("test", b"k", &[1, 2]).is_err());
        let record = seal(b"k", b"payload");
        assert!(open("test", b"k", &record[..record.len() - 2]).is_err());
    }
}
