//! The runtime's one error type. Variants split into "retry or redirect" (the caller acts on
//! them: another node, a fresh range table, later) and "this node cannot serve" (stop, fix).
//! Errors that come from below (the store, raft-rs, the OS) keep their source: `Error` is
//! `Clone` (one failure may answer many waiting requests), so sources are held in an `Arc`.

use std::sync::Arc;

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
    #[error("store failed")]
    Store(#[source] Arc<flotilla_store::StoreError>),
    /// A snapshot received for a range could not be installed (undecodable, no descriptor, or
    /// its keys overlap another range here): the replica is isolated; restart the node.
    #[error("snapshot of range {range} cannot be installed: {reason}")]
    BadSnapshot {
        /// The range.
        range: RangeId,
        /// Why.
        reason: String,
    },
    /// raft-rs refused to start a replica from its stored state (damaged raft state): the
    /// replica is not served; restore it from its peers.
    #[error("cannot start the replica of range {range}")]
    RaftInit {
        /// The range.
        range: RangeId,
        /// What raft-rs said.
        #[source]
        source: Arc<raft::Error>,
    },
    /// The operating system refused to start one of the NodeGroup's threads.
    #[error("cannot spawn thread {thread}")]
    Spawn {
        /// The thread's name.
        thread: &'static str,
        /// The OS error.
        #[source]
        source: Arc<std::io::Error>,
    },
    /// A replica's answer to an admin request did not decode: a bug, since both ends are this
    /// process. Report it.
    #[error("internal: undecodable answer to {what}: {reason}")]
    BadAnswer {
        /// Which request.
        what: &'static str,
        /// The decoder's complaint.
        reason: String,
    },
    /// The group's replica hit an internal fault (raft-rs panicked on it) and was isolated;
    /// other groups keep running. Restart the node to recover it from its log.
    #[error("replica of range {0} failed and was isolated; restart the node")]
    ReplicaFailed(RangeId),
    /// The system range cannot answer from here (no replica of it on this node, its group
    /// has no leader, or it was not bootstrapped): ids cannot be leased, so a split fails
    /// rather than use an id that might repeat. Retry once the system range has a leader.
    #[error("system range unavailable: {0}")]
    SystemUnavailable(String),
    /// An unsafe recovery step was refused for this node's replica of `range` (see
    /// [`RecoveryRefusal`]): nothing was changed; the refusal says what to do instead.
    #[error("recovery of range {range} refused: {why}")]
    RecoveryRefused {
        /// The range.
        range: RangeId,
        /// Why.
        why: RecoveryRefusal,
    },
    /// The NodeGroup is shutting down.
    #[error("node group stopped")]
    Stopped,
}

/// Why this node refused an unsafe recovery step (`NodeGroup::force_alone`,
/// `NodeGroup::retire_replica`). Every refusal leaves the replica as it was.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RecoveryRefusal {
    /// The nodes declared lost include this node: ask a surviving node, or correct the list.
    #[error("the lost nodes include this node ({0})")]
    LostIncludesSelf(NodeId),
    /// The range still has a quorum without the lost nodes: it needs no recovery (its leader
    /// and the scheduler replace the lost replicas the safe way).
    #[error("its voters keep a quorum without the lost nodes ({alive} of {voters} alive)")]
    QuorumAlive {
        /// Voters on nodes not declared lost (of the half of a joint configuration that
        /// still has the fewest).
        alive: usize,
        /// Voters in that half.
        voters: usize,
    },
    /// The replica never got its data (created by a message, waiting for a snapshot): it
    /// cannot continue the range; force another replica.
    #[error("the replica here holds no data (never initialized)")]
    Uninitialized,
    /// The range is frozen by a merge in progress: forcing one half of a merge alone is not
    /// supported.
    #[error("the range is frozen by a merge in progress")]
    Merging,
    /// The replica's membership changed since the report the plan was made from: report and
    /// plan again.
    #[error(
        "its membership changed since the plan was made (conf_ver {found}, expected {expected})"
    )]
    Changed {
        /// The conf_ver the plan saw.
        expected: u64,
        /// The conf_ver now.
        found: u64,
    },
    /// Retiring: the replica is not older than the membership it should make way for.
    #[error("the replica here is not older than conf_ver {newer} (it has conf_ver {conf_ver})")]
    NotStale {
        /// The replica's conf_ver.
        conf_ver: u64,
        /// The conf_ver it was to make way for.
        newer: u64,
    },
}

impl Error {
    /// The message with its sources, for a log line or a status that must say why the store
    /// or the OS failed.
    pub fn with_sources(&self) -> String {
        let mut s = self.to_string();
        let mut source = std::error::Error::source(self);
        while let Some(cause) = source {
            s.push_str(": ");
            s.push_str(&cause.to_string());
            source = cause.source();
        }
        s
    }
}

impl From<flotilla_store::StoreError> for Error {
    fn from(e: flotilla_store::StoreError) -> Self {
        Error::Store(Arc::new(e))
    }
}

/// Result alias of the runtime.
pub type Result<T, E = Error> = std::result::Result<T, E>;

#[cfg(test)]
mod tests {
    use std::error::Error as _;

    use super::Error;

    #[test]
    fn a_store_error_keeps_its_source() {
        let e = Error::from(flotilla_store::StoreError::WrongNode {
            expected: 1,
            found: 2,
        });
        let source = e.source().expect("the store error is the source");
        assert!(source.to_string().contains("node 2"), "{source}");
    }
}
