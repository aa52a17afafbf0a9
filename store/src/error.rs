//! The store's one error type. Every RocksDB failure and every record that fails to decode
//! comes back as a value: the store never panics on what it reads from disk.

use flotilla_proto::RangeId;

/// What went wrong in the store, and so what the caller should do.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// RocksDB failed (I/O error, disk full, lock held by another process). The engine may be
    /// unusable: stop the node and check the disk / data directory.
    #[error("rocksdb: {0}")]
    Io(#[from] rocksdb::Error),
    /// A record did not decode: the data directory is damaged or from an incompatible version.
    /// Do not serve from it; restore the node from its peers.
    #[error("corrupt {what} at key {key:02x?}: {reason}")]
    Corruption {
        /// Which record.
        what: &'static str,
        /// Its key.
        key: Vec<u8>,
        /// The decoder's complaint.
        reason: String,
    },
    /// The requested log index was compacted away: send a snapshot instead.
    #[error("log of group {group} is compacted below index {first_index}")]
    Compacted {
        /// The group.
        group: RangeId,
        /// The first index still in the log.
        first_index: u64,
    },
    /// The requested log index is past the end of the log.
    #[error("log of group {group} ends at {last_index}, index {index} is unavailable")]
    Unavailable {
        /// The group.
        group: RangeId,
        /// The index asked for.
        index: u64,
        /// The last index in the log.
        last_index: u64,
    },
    /// An append did not connect to the log (a gap, or below the compacted prefix): a bug in
    /// the caller, refused instead of writing a log with a hole.
    #[error("append to group {group} at index {first} does not connect to the log ({detail})")]
    NonContiguousAppend {
        /// The group.
        group: RangeId,
        /// The index of the first entry of the append.
        first: u64,
        /// What it should have connected to.
        detail: String,
    },
    /// The engine's data directory belongs to another node.
    #[error("data directory belongs to node {found}, not {expected}")]
    WrongNode {
        /// The node id the caller opened it as.
        expected: u64,
        /// The node id written in the engine.
        found: u64,
    },
    /// A store configuration value is out of range; the message names the field.
    #[error("invalid store config: {0}")]
    InvalidConfig(&'static str),
}

impl StoreError {
    pub(crate) fn corrupt(what: &'static str, key: &[u8], err: impl std::fmt::Display) -> Self {
        StoreError::Corruption {
            what,
            key: key.to_vec(),
            reason: err.to_string(),
        }
    }
}

/// Result alias of the store.
pub type Result<T, E = StoreError> = std::result::Result<T, E>;

impl From<StoreError> for raft::Error {
    fn from(e: StoreError) -> Self {
        use raft::StorageError;
        match e {
            StoreError::Compacted { .. } => raft::Error::Store(StorageError::Compacted),
            StoreError::Unavailable { .. } => raft::Error::Store(StorageError::Unavailable),
            other => raft::Error::Store(StorageError::Other(Box::new(other))),
        }
    }
}
