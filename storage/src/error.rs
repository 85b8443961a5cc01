use std::io;

/// Errors of the local store. Messages are lowercase; details come last as key=`value`.
#[derive(Debug, thiserror::Error)]
pub enum StorageError {
    #[error("sled operation failed")]
    Sled(#[from] sled::Error),
    #[error("i/o failed")]
    Io(#[from] io::Error),
    /// A stored record failed its checksum or could not be decoded: the disk or a bug
    /// changed bytes under us. The data is not served.
    #[error("corrupt record: {what} key=`{key}`")]
    Corrupt { what: &'static str, key: String },
    #[error("encoding failed: {what}")]
    Encode { what: &'static str },
    #[error("snapshot file is invalid: {reason} path=`{path}`")]
    BadSnapshot { reason: String, path: String },
}

impl From<StorageError> for io::Error {
    fn from(e: StorageError) -> Self {
        match e {
            StorageError::Io(inner) => inner,
            StorageError::Corrupt { .. } | StorageError::BadSnapshot { .. } => {
                io::Error::new(io::ErrorKind::InvalidData, e)
            }
            other => io::Error::other(other),
        }
    }
}
