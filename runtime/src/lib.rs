//! flotilla-runtime: the NodeGroup, which hosts thousands of raft-rs group replicas in one
//! process on a shared store, a small worker pool and one ticker.
//!
//! Layout, from the bottom up (a module imports only from the layers below it):
//! 1. Leaves: the config ([`NodeGroupConfig`]), [`Error`] (`error`), the API types (`api`), the
//!    [`RangeRouter`] (`router`), the [`StateMachine`] (`state_machine`), `pending`
//!    (completions), `logger`, `system` (the system range's records, seed and id lease).
//! 2. `replica/`: one group's replica on raft-rs, one file per feature (propose, read,
//!    membership, apply, snapshot and compaction, split, merge). Knows nothing of threads or
//!    of the NodeGroup: it is driven through a narrow context and returns effects.
//! 3. `fsm/`: the shell — the shared registry, the replica lifecycle (`life`), mailboxes and
//!    scheduling, the worker round (group commit), the ticker, the split checker.
//! 4. [`NodeGroup`] (`node_group`): the public API; `read` (reads through the state machine),
//!    `export` (a range's data at one point, for backups),
//!    `registry` (the node registry and id counters in the system range), `recover` (unsafe
//!    recovery of ranges that lost their quorum for good),
//!    `inbound` (what the transport delivers), `status` (status queries).
//!
//! ARCHITECTURE.md at the repository root states the rule and the reasons.

mod api;
mod batch;
mod config;
mod error;
mod export;
mod fsm;
mod inbound;
mod logger;
mod node_group;
mod pending;
mod read;
mod recover;
mod registry;
mod replica;
mod router;
#[cfg(test)]
mod sim;
mod state_machine;
mod status;
mod system;

pub use api::{
    ForcedRange, MembershipChange, NodeLiveness, NodeStatus, ProposeOptions, ReadConsistency,
    RecoveryReplica,
};
pub use batch::{KvProposal, Proposed};
pub use config::{default_thread_share, ConfigError, NodeGroupConfig, SplitConfig};
pub use error::{Error, RecoveryRefusal, Result};
pub use export::RangeExport;
pub use node_group::NodeGroup;
pub use raft::StateRole;
pub use read::ScanPage;
pub use replica::{ReplicaProgress, ReplicaStatus};
pub use router::RangeRouter;
pub use state_machine::{ApplyContext, ApplyError, KvStateMachine, ReadContext, StateMachine};
pub use system::{system_descriptor, SystemSeed, ID_LEASE_BLOCK};
