//! The public request and status types of the NodeGroup API. They sit below everything else
//! in the runtime (the replica reads `MembershipChange`), so they have their own module rather
//! than living beside the NodeGroup.

use flotilla_proto::meta::{RangeDescriptor, RangeEpoch};
use flotilla_proto::{NodeId, RangeId, ReplicaId};

/// A change to a range's membership.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MembershipChange {
    /// Add a voting replica on a node (gets a fresh replica id).
    AddVoter(NodeId),
    /// Add a non-voting replica on a node (gets a fresh replica id); promote it once it has
    /// caught up.
    AddLearner(NodeId),
    /// Make a learner a voter.
    Promote(ReplicaId),
    /// Make a voter a learner.
    Demote(ReplicaId),
    /// Remove a replica; its id is never used again.
    Remove(ReplicaId),
}

/// How fresh a read must be.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ReadConsistency {
    /// Linearizable through ReadIndex (leader or follower). The default.
    #[default]
    Linearizable,
    /// Served by the leader under its lease, without a round trip: linearizable as long as
    /// clock drift stays below the election timeout. A leader whose lease ran out (it is
    /// renewed by ReadIndex confirmations, on the monotonic clock) serves it as a
    /// linearizable read; a follower answers `NotLeader`.
    Lease,
    /// Whatever this replica has applied; may be stale.
    Stale,
}

/// Options of a proposal.
#[derive(Debug, Clone, Copy, Default)]
pub struct ProposeOptions {
    /// Retry de-duplication: the same `(client_id, seq)` is applied at most once. A client
    /// sends requests to one range one at a time, with increasing `seq`.
    pub request_id: Option<(u64, u64)>,
    /// The epoch the caller routed with; a stale one gets `EpochNotMatch`.
    pub epoch: Option<RangeEpoch>,
}

/// Counters of a NodeGroup.
#[derive(Debug, Clone, Default)]
pub struct NodeStatus {
    /// This node.
    pub node: NodeId,
    /// Replicas of ranges hosted (initialized or not). The system range's replica is not
    /// counted here (it holds no part of the key space, and placement counts ranges): see
    /// `system`.
    pub replicas: usize,
    /// Ranges in the router (initialized replicas).
    pub ranges: usize,
    /// Replicas of ranges that are currently leader (the system range's apart).
    pub leaders: usize,
    /// This node's replica of the system range: `None` if it holds none, else whether it
    /// leads the system range.
    pub system: Option<bool>,
    /// Requests waiting for an outcome.
    pub pending_requests: usize,
    /// Replicas awake (ticked); the others hibernate.
    pub awake: usize,
    /// Times a replica of this node became leader since the node started (elections won).
    pub elections_won: u64,
    /// Sleeping groups queued to be woken (paced; see `max_wakes_per_tick`).
    pub queued_wakes: usize,
    /// Batches of coalesced heartbeats the ticker sent since the node started (one per node
    /// pair per tick at most; none while every group sleeps).
    pub heartbeat_batches: u64,
    /// Client writes (commands) proposed through this node since it started.
    pub writes: u64,
    /// Client reads (keys) served through this node since it started.
    pub reads: u64,
}

/// What this node's failure detector believes of another node (see `node_down_ticks`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NodeLiveness {
    /// The node.
    pub node: NodeId,
    /// False once it was silent for `node_down_ticks` ticks; true again on any news.
    pub up: bool,
    /// Ticks of this node's clock since it was last heard from (0 when heard this tick).
    pub silent_ticks: usize,
    /// Removed from the node registry (`NodeGroup::declare_removed`): down for good.
    pub removed: bool,
}

/// One replica of this node as an unsafe recovery needs to see it (see
/// `NodeGroup::recovery_report`): its membership, its raft state and its log.
#[derive(Debug, Clone, PartialEq)]
pub struct RecoveryReplica {
    /// The range.
    pub range: RangeId,
    /// This replica's id.
    pub replica_id: u64,
    /// Its descriptor; `None` for a replica created by a message that never got its data.
    pub descriptor: Option<RangeDescriptor>,
    /// raft's voters as of the applied index (replica ids).
    pub voters: Vec<u64>,
    /// The outgoing voters of a joint configuration (empty otherwise).
    pub voters_outgoing: Vec<u64>,
    /// raft's learners.
    pub learners: Vec<u64>,
    /// Hard state: term, vote and commit index.
    pub term: u64,
    /// See `term`.
    pub vote: u64,
    /// See `term`.
    pub commit: u64,
    /// Highest index applied.
    pub applied: u64,
    /// Last index and its term in the log written to disk.
    pub last_index: u64,
    /// See `last_index`.
    pub last_term: u64,
    /// Whether it leads its group now.
    pub leader: bool,
    /// Indexes of the membership-change entries after the applied index (forcing the replica
    /// alone turns them into no-ops).
    pub conf_change_indexes: Vec<u64>,
    /// Whether the lost nodes hold a majority of the voters (of either half of a joint
    /// configuration), as this replica's membership says.
    pub quorum_lost: bool,
}

/// What `NodeGroup::force_alone` did to this node's replica of a range.
#[derive(Debug, Clone, PartialEq)]
pub struct ForcedRange {
    /// The range.
    pub range: RangeId,
    /// The replica that continues alone.
    pub replica_id: u64,
    /// Its commit index when forced: the entries after it, up to `last_index`, were not known
    /// committed; the new membership commits them.
    pub commit: u64,
    /// Its applied index when forced.
    pub applied: u64,
    /// Its last log index and term when forced.
    pub last_index: u64,
    /// See `last_index`.
    pub last_term: u64,
    /// Membership-change entries after the applied index, turned into no-ops.
    pub neutralized: Vec<u64>,
    /// The new descriptor: this replica the only voter, conf_ver moved on.
    pub descriptor: RangeDescriptor,
}
