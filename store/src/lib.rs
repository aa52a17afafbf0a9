//! flotilla-store: the one RocksDB engine every group of a node shares.
//!
//! - [`Engine`] opens RocksDB with three column families (`raft`, `data`, `meta`; see
//!   [`keys`] for the layout and why), writes [`WriteBatch`]es that may hold the writes of
//!   many groups and syncs each once (group commit), and recovers every group on open.
//! - [`GroupStorage`] is one group's `raft::Storage`: raft state in memory, a short cache of the
//!   log tail, reads from RocksDB for the rest.
//! - [`snapshot`] exports a range's data in chunks and imports it atomically with the
//!   descriptor and apply state; a [`RangeView`] is one range at one point (descriptor,
//!   apply state and data from one RocksDB snapshot), what a backup exports.
//!
//! This crate knows nothing of threads, tokio or the network: the runtime decides when to
//! write and when to sync.

mod engine;
mod error;
pub mod keys;
pub mod snapshot;
mod storage;

pub use engine::{DataSize, Engine, RecoveredGroup, StoreConfig, WriteBatch};
pub use error::{Result, StoreError};
pub use snapshot::{RangeView, SnapshotImport};
pub use storage::{GroupStorage, SPLIT_INIT_INDEX, SPLIT_INIT_TERM};
