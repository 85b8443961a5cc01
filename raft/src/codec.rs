//! bincode for openraft messages and stored Raft values. Both ends of the transport run the
//! same binary, so the Rust types are the contract.

use std::io;

pub fn encode<T: serde::Serialize>(value: &T) -> Vec<u8> {
    bincode::serialize(value).expect("openraft messages always serialize")
}

/// Appends the encoding of `value` to `out` (a buffer kept between calls).
pub fn encode_into<T: serde::Serialize>(value: &T, out: &mut Vec<u8>) {
    bincode::serialize_into(out, value).expect("openraft messages always serialize")
}

pub fn decode<T: serde::de::DeserializeOwned>(what: &str, bytes: &[u8]) -> Result<T, io::Error> {
    bincode::deserialize(bytes)
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, format!("undecodable {what}: {e}")))
}
