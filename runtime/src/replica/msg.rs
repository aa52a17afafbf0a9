//! What a replica is asked to do: the messages its mailbox carries. They are the replica's
//! input vocabulary, so they live beside it; the thread model only queues them.

use flotilla_proto::meta::{RangeDescriptor, ReplicaDescriptor};
use raft::prelude::Message;

/// Work for a replica.
#[derive(Debug)]
pub(crate) enum PeerMsg {
    /// A raft message from another node, already decoded and checked for shape.
    Raft {
        msg: Box<Message>,
        /// Where the sender lives.
        from: ReplicaDescriptor,
        /// The sender's view of the range's epoch.
        from_conf_ver: u64,
    },
    /// A command to propose; its completion is registered under `token`.
    Propose { token: u64, data: Vec<u8> },
    /// A batch entry (several commands, see `command.AppBatch`) under its group token. A
    /// follower forwards it only if `forward` (and the config) allows; otherwise it answers
    /// `NotLeader`, for callers that route to leaders themselves.
    ProposeBatch {
        token: u64,
        data: Vec<u8>,
        forward: bool,
    },
    /// A read barrier; completes once the replica may serve a read at `token`'s time.
    Read { token: u64, lease: bool },
    /// A membership change; the descriptor of the result completes `token`.
    ConfChange {
        token: u64,
        changes: Vec<crate::api::MembershipChange>,
    },
    /// Ask raft to hand leadership to `to` (a replica id).
    TransferLeader { token: u64, to: u64 },
    /// Split the range at `split_key` into itself and a new range `new_range_id`.
    Split {
        token: u64,
        split_key: Vec<u8>,
        new_range_id: u64,
    },
    /// Merge this range (the source) into the adjacent `target`: proposes PrepareMerge.
    PrepareMerge { token: u64, target: RangeDescriptor },
    /// A merge source's leader asks the target replica beside it to propose this CommitMerge
    /// or AbandonMerge (forwarded to the target's leader whatever `forward_proposals` says).
    ProposeMerge { data: Vec<u8> },
    /// The target committed the merge: the prepare entry at `prepare_index` is committed, so
    /// this source replica may apply up to it.
    MergeCatchUp {
        prepare_index: u64,
        prepare_term: u64,
    },
    /// A merge source applied its prepare entry: a target waiting on it can go on.
    MergeResume,
    /// Start an election now (used by bootstrap and tests to avoid waiting for a timeout).
    Campaign,
    /// Start an election now, without a pre-vote round, if this replica still knows no
    /// leader: a queued `Wake::Campaign` (a bootstrapped group's chosen first leader, or a
    /// recovered replica that voted for itself in its last term). See
    /// `Replica::campaign_without_pre_vote` for why that is safe.
    CampaignUnled,
    /// Replica `replica` should lead this group: hand leadership to it when it is up (see
    /// `placement`).
    PreferLeader { replica: u64 },
    /// Compact the log up to the applied index now, so lagging followers get a snapshot.
    CompactLog { token: u64 },
    /// The transport could not deliver to `to` (a replica id).
    Unreachable { to: u64 },
    /// Outcome of sending a snapshot to `to`.
    SnapshotStatus { to: u64, ok: bool },
    /// The group's leader `from` goes to sleep at `term` with `commit` committed (a coalesced
    /// heartbeat with the hibernate flag; see `hibernate`).
    Sleep {
        from: ReplicaDescriptor,
        term: u64,
        commit: u64,
    },
    /// Node liveness declared this node down: a follower whose leader lives there forgets it
    /// (and the live voter chosen by `hibernate::campaigner` campaigns).
    NodeDown(flotilla_proto::NodeId),
    /// Wake up (a node came back, or the paced wake of a replica recovered asleep).
    Wake,
}

impl PeerMsg {
    /// The completion token of a client request, for messages that carry one.
    pub(crate) fn token(&self) -> Option<u64> {
        match self {
            PeerMsg::Propose { token, .. }
            | PeerMsg::ProposeBatch { token, .. }
            | PeerMsg::Read { token, .. }
            | PeerMsg::ConfChange { token, .. }
            | PeerMsg::TransferLeader { token, .. }
            | PeerMsg::Split { token, .. }
            | PeerMsg::PrepareMerge { token, .. }
            | PeerMsg::CompactLog { token } => Some(*token),
            _ => None,
        }
    }
}
