//! The runtime's one error type. Variants split into "retry or redirect" (the caller acts on
//! them: another node, a fresh range table, later) and "this node cannot serve" (stop, fix).

use flotilla_proto::meta::RangeDescriptor;
use flotilla_proto::{NodeId, RangeId};

use crate::config::ConfigError;

/// What went wrong, and so what the caller should do next.
#[derive(Debug, Clone, thiserror::Error)]
pub enum Error {
    /// No range on this node contains the key: refresh the range table and route again.
    #[error("key {key:02x?} is not in any range hosted on this node")]
    KeyNotInRange {
        /// The key.
        key: Vec<u8>,
    },
    /// The range is not hosted on this node (never was, or was removed / merged away).
    #[error("range {0} is not hosted on this node")]
    RangeNotFound(RangeId),
    /// This replica is not the leader and does not forward: retry on `leader_hint` if given.
    #[error(
        "replica of range {range} on this node is not the leader (leader hint: {leader_hint:?})"
    )]
    NotLeader {
        /// The range.
        range: RangeId,
        /// The node believed to host the leader, if known.
        leader_hint: Option<NodeId>,
    },
    /// The request was routed with a stale view of the range: update the cache with
    /// `current` and route again.
    #[error("range epoch changed; current ranges: {}", .current.len())]
    EpochNotMatch {
        /// The current descriptors of the range(s) that now cover the request's keys.
        current: Vec<RangeDescriptor>,
    },
    /// The proposal's outcome is unknown (leader changed, timed out, group removed before it
    /// applied): retry with the same request id; de-duplication makes that safe.
    #[error("proposal dropped (outcome unknown): retry with the same request id")]
    ProposalDropped,
    /// Back-pressure (full mailbox, too many uncommitted bytes): retry after a short wait.
    #[error("busy: {0}")]
    Busy(&'static str),
    /// The proposal is larger than `max_proposal_bytes`: split it.
    #[error("proposal of {size} bytes exceeds the limit of {limit} bytes")]
    ProposalTooLarge {
        /// The proposal size.
        size: u64,
        /// The limit.
        limit: u64,
    },
    /// The command was malformed or refused by the state machine; retrying will not help.
    #[error("invalid command: {0}")]
    InvalidCommand(String),
    /// A membership change or admin request was refused; the message says why.
    #[error("admin request refused: {0}")]
    AdminRefused(String),
    /// The configuration is invalid.
    #[error("invalid config: {0}")]
    Config(#[from] ConfigError),
    /// The store failed; the node should stop serving.
    #[error("store: {0}")]
    Store(String),
    /// The group's replica hit an internal fault (raft-rs panicked on it) and was isolated;
    /// other groups keep running. Restart the node to recover it from its log.
    #[error("replica of range {0} failed and was isolated; restart the node")]
    ReplicaFailed(RangeId),
    /// The NodeGroup is shutting down.
    #[error("node group stopped")]
    Stopped,
}

impl From<flotilla_store::StoreError> for Error {
    fn from(e: flotilla_store::StoreError) -> Self {
        Error::Store(e.to_string())
    }
}

/// Result alias of the runtime.
pub type Result<T, E = Error> = std::result::Result<T, E>;
