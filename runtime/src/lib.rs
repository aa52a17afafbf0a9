//! flotilla-runtime: the NodeGroup, which hosts thousands of raft-rs group replicas in one
//! process on a shared store, a small worker pool and one ticker.
//!
//! Layout:
//! - [`NodeGroup`] (`node_group`): the public API and the shared state.
//! - `fsm/`: the thread model — mailboxes and scheduling, the worker round (group commit),
//!   the ticker. Nothing else knows about threads.
//! - `replica/`: one group's replica on raft-rs, one file per feature (propose, read,
//!   membership, apply, snapshot and compaction). Knows nothing about threads.
//! - [`RangeRouter`] (`router`): key → range.
//! - [`StateMachine`] (`state_machine`): what entries are applied to; [`KvStateMachine`] is
//!   the default.
//! - [`NodeGroupConfig`] (`config`), [`Error`] (`error`).

mod config;
mod error;
mod fsm;
mod logger;
mod node_group;
mod pending;
mod replica;
mod router;
mod state_machine;

pub use config::{ConfigError, NodeGroupConfig, SplitConfig};
pub use error::{Error, Result};
pub use node_group::{MembershipChange, NodeGroup, NodeStatus, ProposeOptions, ReadConsistency};
pub use raft::StateRole;
pub use replica::ReplicaStatus;
pub use router::RangeRouter;
pub use state_machine::{ApplyContext, KvStateMachine, StateMachine};
