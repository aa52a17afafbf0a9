//! One group's replica on this node: raft-rs's `RawNode` over the group's storage, plus the
//! little state the runtime keeps beside it. This module knows nothing of threads: its owner
//! (a worker, or a test on one thread) calls it in phases ([`Replica::on_msgs`],
//! [`Replica::on_ticks`], [`Replica::collect_ready`], [`Replica::after_persist`]) with an
//! [`Env`] to read and an [`Output`] to write (see `context`): messages, completions, the
//! round's batches, and lifecycle effects that the owner carries out. Nothing here imports
//! `fsm/` or `node_group`.
//!
//! Each feature has its own file: the inputs (`msg`), the seam (`context`), proposals
//! (`propose`), reads (`read`), membership (`conf_change`), applying entries (`apply`),
//! snapshots and log compaction (`snapshot`), range splits (`split`) and merges (`merge`),
//! the in-memory retry records (`retry`), leader placement (`placement`), messages to other
//! nodes (`send`), unsafe recovery of a range that lost its quorum (`recover`).

mod apply;
mod conf_change;
mod context;
mod hibernate;
mod merge;
mod msg;
mod placement;
mod propose;
mod read;
mod recover;
mod retry;
mod send;
mod snapshot;
mod split;
mod system;
#[cfg(test)]
mod tests;

use std::collections::VecDeque;

use flotilla_proto::command::{
    admin_command, raft_command, AdminCommand, RaftCommand, RequestHeader,
};
use flotilla_proto::meta::{RangeDescriptor, ReplicaDescriptor};
use flotilla_proto::{Message as _, NodeId, RangeId};
use flotilla_store::{GroupStorage, WriteBatch};
use raft::prelude::{Message, MessageType};
use raft::{RawNode, Ready, StateRole};

use crate::config::NodeGroupConfig;
use crate::error::Error;

pub(crate) use context::{Effect, Env, Existing, Host, Output};
pub(crate) use hibernate::campaigner;
pub(crate) use merge::check_mergeable;
pub(crate) use msg::PeerMsg;
pub(crate) use send::{heartbeat_input, heartbeat_message};

/// An encoded admin entry (split, merge) for the log.
fn admin_entry(header: RequestHeader, cmd: admin_command::Cmd) -> Vec<u8> {
    RaftCommand {
        header: Some(header),
        body: Some(raft_command::Body::Admin(AdminCommand { cmd: Some(cmd) })),
    }
    .encode_to_vec()
}

/// A proposal this replica appended as leader: if a different entry is applied at its index,
/// it was overwritten by a new leader and its proposer learns at once.
#[derive(Debug, Clone, Copy)]
struct LocalProposal {
    index: u64,
    term: u64,
    token: u64,
}

/// One replica of one group.
pub(crate) struct Replica {
    raw: RawNode<GroupStorage>,
    id: u64,
    range: RangeId,
    node: NodeId,
    proposals: VecDeque<LocalProposal>,
    reads: read::Reads,
    /// Where replicas not in our descriptor live (an uninitialized replica learns its leader's
    /// node from the leader's messages).
    peers: Vec<ReplicaDescriptor>,
    /// The Ready taken in this round, between `collect_ready` and `after_persist`. Boxed: a
    /// Ready is 320 bytes inline, held only within a round, and every sleeping replica would
    /// carry that space for nothing.
    ready: Option<Box<Ready>>,
    /// Set when an applied membership change removed this replica.
    removed: bool,
    /// Campaigns left to retry (every two ticks, while no leader is known) for a group this
    /// node's split just created: followers that have not applied the split yet drop the new
    /// group's (pre)votes (their parent still covers its keys), so one campaign often goes
    /// unanswered; a few quick retries spare the new half a full election timeout.
    campaign_retries: u8,
    /// Writes and their bytes applied while leader since the range was last measured for a
    /// split.
    written_since_split_check: (u64, u64),
    /// Committed entries not applied yet because a CommitMerge waits for its source (see
    /// `merge`). Empty otherwise.
    stalled: Vec<raft::prelude::Entry>,
    /// Ticks before a merge source's leader proposes its CommitMerge or rollback again.
    merge_retry: u8,
    /// Ticks this replica has seen while its range is frozen by a prepared merge: past
    /// `merge_freeze_limit` its leader abandons the merge.
    merge_frozen_ticks: u32,
    /// Set on a merge source once the target beside it applies the CommitMerge.
    merge_requested: bool,
    /// Proposals this follower forwarded to its leader: if it stops following that leader or
    /// installs a snapshot before they apply, they are answered `ProposalDropped` at once
    /// rather than at `proposal_timeout` (see `propose.rs`). Empty for almost every replica.
    forwarded: Vec<propose::Forwarded>,
    /// As leader, which peers were up in the last check-quorum window (for log compaction).
    peers_up: snapshot::PeersUp,
    /// The replica that should lead this group, until it has (see `placement`).
    placement: Option<placement::Placement>,
    /// As leader, every commit is sent to the followers at once until the commit index
    /// reaches this: a follower waits on it (see `propose.rs`). 0 when none does.
    urgent_commit: u64,
    /// The placeholder descriptor of a replica created by a message, until its first round
    /// writes it with the round's batch (who we are must be on disk before raft votes).
    placeholder: Option<Box<RangeDescriptor>>,
    /// Asleep: out of the ticker's awake set, ignoring ticks (see `hibernate`).
    asleep: bool,
    /// A leader's consecutive quiet ticks (see `hibernate`).
    quiet_ticks: usize,
    /// A follower that stopped hearing its leader asks it to wake with this round's messages.
    poke_pending: bool,
    /// As leader, the followers sent an append since the last heartbeat broadcast, with the
    /// highest commit those appends carried: their next plain heartbeat is skipped unless it
    /// tells a newer commit (see `send` and `skip_heartbeats_after_append`).
    appended_to: Vec<(u64, u64)>,
    /// As leader, the followers sent entries lately, with one bit per heartbeat interval (bit
    /// 0 this one): their empty appends while those may be in flight are not sent (see
    /// `send`).
    entries_to: Vec<(u64, u8)>,
    /// The last applied request of recent clients, as written (see `retry`).
    retry_records: retry::RetryRecords,
}

impl std::fmt::Debug for Replica {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Replica")
            .field("range", &self.range)
            .field("id", &self.id)
            .field("role", &self.raw.raft.state)
            .field("term", &self.raw.raft.term)
            .finish()
    }
}

/// A point-in-time view of a replica, for status APIs.
#[derive(Debug, Clone)]
pub struct ReplicaStatus {
    /// The range.
    pub range: RangeId,
    /// This replica's id.
    pub replica_id: u64,
    /// Leader, follower, candidate or pre-candidate.
    pub role: StateRole,
    /// Current raft term.
    pub term: u64,
    /// Highest index known committed.
    pub commit: u64,
    /// Highest index applied to the state machine.
    pub applied: u64,
    /// Last index in the log.
    pub last_index: u64,
    /// The leader's replica id, 0 if unknown.
    pub leader: u64,
    /// The node of the leader, if known.
    pub leader_node: Option<NodeId>,
    /// The range descriptor, once initialized.
    pub descriptor: Option<RangeDescriptor>,
    /// Whether the replica hibernates.
    pub asleep: bool,
    /// On a leader: each replica's id, the highest log index known to be replicated to it,
    /// and whether raft heard from it recently (in this or the last check-quorum window).
    /// Empty on a follower.
    pub progress: Vec<ReplicaProgress>,
}

/// What a leader knows of one replica of its group (see [`ReplicaStatus::progress`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReplicaProgress {
    /// The replica.
    pub replica_id: u64,
    /// Highest log index known to be on it.
    pub matched: u64,
    /// Whether raft heard from it recently.
    pub recent_active: bool,
}

impl Replica {
    pub(crate) fn new(
        raw: RawNode<GroupStorage>,
        id: u64,
        range: RangeId,
        node: NodeId,
    ) -> Replica {
        Replica {
            raw,
            id,
            range,
            node,
            proposals: VecDeque::new(),
            reads: read::Reads::new(),
            peers: Vec::new(),
            ready: None,
            removed: false,
            written_since_split_check: (0, 0),
            campaign_retries: 0,
            stalled: Vec::new(),
            merge_retry: 0,
            merge_frozen_ticks: 0,
            merge_requested: false,
            forwarded: Vec::new(),
            peers_up: Default::default(),
            placement: None,
            urgent_commit: 0,
            placeholder: None,
            asleep: false,
            quiet_ticks: 0,
            poke_pending: false,
            appended_to: Vec::new(),
            entries_to: Vec::new(),
            retry_records: retry::RetryRecords::default(),
        }
    }

    /// Opens a replica over `storage` with raft configured from `config` (raft-rs logs through
    /// `logger`, the node's, shared: see `crate::logger`).
    pub(crate) fn open(
        storage: GroupStorage,
        id: u64,
        node: NodeId,
        config: &NodeGroupConfig,
        logger: &slog::Logger,
    ) -> crate::error::Result<Replica> {
        let applied = storage.apply_state().applied_index;
        let range = storage.group();
        let cfg = config.raft_config(id, applied);
        let raw = crate::logger::in_group(range, || RawNode::new(&cfg, storage, logger)).map_err(
            |source| Error::RaftInit {
                range,
                source: std::sync::Arc::new(source),
            },
        )?;
        Ok(Replica::new(raw, id, range, node))
    }

    /// A replica created by a message for a group this node does not host yet: uninitialized
    /// (raft will send it a snapshot), with a placeholder descriptor naming its replica id that
    /// its first round writes (see `placeholder`).
    pub(crate) fn open_uninitialized(
        engine: std::sync::Arc<flotilla_store::Engine>,
        range: RangeId,
        id: u64,
        node: NodeId,
        config: &NodeGroupConfig,
        logger: &slog::Logger,
    ) -> crate::error::Result<Replica> {
        let storage = GroupStorage::new_uninitialized(engine, range);
        let mut replica = Replica::open(storage, id, node, config, logger)?;
        replica.placeholder = Some(Box::new(RangeDescriptor {
            range_id: range.0,
            state: flotilla_proto::meta::RangeState::Uninitialized as i32,
            replicas: vec![ReplicaDescriptor {
                replica_id: id,
                node_id: node.0,
                role: flotilla_proto::meta::ReplicaRole::Voter as i32,
            }],
            ..Default::default()
        }));
        Ok(replica)
    }

    /// Starts the new group of a split with a few quick campaigns (see `campaign_retries`).
    pub(crate) fn campaign_soon(&mut self) {
        self.campaign_retries = 4;
    }

    /// Whether a replica just opened has something to do before any input: committed
    /// entries not applied yet (raft-rs hands them out in its first Ready).
    pub(crate) fn has_work_at_start(&self) -> bool {
        self.raw.has_ready()
    }

    /// Whether this replica's part in an election is over: a leader whose term's first entry
    /// is committed, or a follower that knows its leader. Awake, it only waits to fall asleep
    /// (see `fsm::liveness`, which does not count it as an election in flight).
    pub(crate) fn election_over(&self) -> bool {
        let raft = &self.raw.raft;
        match raft.state {
            StateRole::Leader => raft.commit_to_current_term(),
            StateRole::Follower => raft.leader_id != 0,
            _ => false,
        }
    }

    pub(crate) fn is_leader(&self) -> bool {
        self.raw.raft.state == StateRole::Leader
    }

    pub(crate) fn descriptor(&self) -> Option<&RangeDescriptor> {
        self.raw.store().descriptor()
    }

    /// The storage's descriptor, shared (for the router: one copy per replica).
    pub(crate) fn shared_descriptor(&self) -> Option<std::sync::Arc<RangeDescriptor>> {
        self.raw.store().shared_descriptor()
    }

    pub(crate) fn is_initialized(&self) -> bool {
        self.raw.store().is_initialized()
    }

    pub(crate) fn hard_state(&self) -> raft::prelude::HardState {
        self.raw.store().hard_state().clone()
    }

    pub(crate) fn status(&self) -> ReplicaStatus {
        let leader = self.raw.raft.leader_id;
        ReplicaStatus {
            range: self.range,
            replica_id: self.id,
            role: self.raw.raft.state,
            term: self.raw.raft.term,
            commit: self.raw.raft.raft_log.committed,
            applied: self.raw.raft.raft_log.applied,
            last_index: self.raw.raft.raft_log.last_index(),
            leader,
            leader_node: self.node_of(leader),
            descriptor: self.descriptor().cloned(),
            asleep: self.asleep,
            progress: if self.is_leader() {
                let mut p: Vec<ReplicaProgress> = self
                    .raw
                    .raft
                    .prs()
                    .iter()
                    .map(|(id, pr)| ReplicaProgress {
                        replica_id: *id,
                        matched: pr.matched,
                        recent_active: pr.recent_active || *id == self.id,
                    })
                    .collect();
                p.sort_by_key(|p| p.replica_id);
                p
            } else {
                Vec::new()
            },
        }
    }

    /// The node hosting replica `id`, from the descriptor or from what messages told us.
    pub(crate) fn node_of(&self, id: u64) -> Option<NodeId> {
        if id == 0 {
            return None;
        }
        if let Some(r) = self
            .descriptor()
            .and_then(|d| d.replicas.iter().find(|r| r.replica_id == id))
        {
            return Some(NodeId(r.node_id));
        }
        self.peers
            .iter()
            .find(|r| r.replica_id == id)
            .map(|r| NodeId(r.node_id))
    }

    /// The leader's node, for `NotLeader` hints.
    pub(crate) fn leader_hint(&self) -> Option<NodeId> {
        self.node_of(self.raw.raft.leader_id)
    }

    /// Handles everything that was in the mailbox.
    pub(crate) fn on_msgs(&mut self, msgs: Vec<PeerMsg>, env: &Env<'_>, out: &mut Output) {
        self.settle_urgent_commit();
        for m in msgs {
            self.wake_for(&m, env, out);
            match m {
                PeerMsg::Raft {
                    msg,
                    from,
                    from_conf_ver,
                } => {
                    self.learn_peer(&from);
                    self.on_raft_message(*msg, from_conf_ver, env, out)
                }
                PeerMsg::Propose { token, data } => self.propose(token, data, env, out),
                PeerMsg::ProposeBatch {
                    token,
                    data,
                    forward,
                } => self.propose_batch(token, data, forward, env, out),
                PeerMsg::Read { token, lease } => self.read(token, lease, env, out),
                PeerMsg::ConfChange { token, changes } => {
                    self.propose_conf_change(token, changes, env, out)
                }
                PeerMsg::TransferLeader { token, to } => {
                    // An explicit transfer overrides the layout's preference: the new leader
                    // must not hand leadership back to the layout's choice.
                    self.placement = None;
                    if self.is_leader() {
                        // The transferee's election ignores leases.
                        self.reads.suspect_lease();
                        self.raw.transfer_leader(to);
                        out.complete(token, Ok(Vec::new()));
                    } else {
                        out.complete(
                            token,
                            Err(Error::NotLeader {
                                range: self.range,
                                leader_hint: self.leader_hint(),
                            }),
                        );
                    }
                }
                PeerMsg::Split {
                    token,
                    split_key,
                    new_range_id,
                } => self.propose_split(token, split_key, new_range_id, env, out),
                PeerMsg::PrepareMerge { token, target } => {
                    self.propose_prepare_merge(token, target, env, out)
                }
                PeerMsg::ProposeMerge { data } => {
                    self.append(0, data, env, out, true);
                    self.urge_commit();
                }
                PeerMsg::MergeCatchUp {
                    prepare_index,
                    prepare_term,
                } => self.merge_catch_up(prepare_index, prepare_term),
                // Only schedules a round, in which a waiting CommitMerge is tried again.
                PeerMsg::MergeResume => {}
                PeerMsg::Campaign => {
                    if let Err(e) = self.raw.campaign() {
                        tracing::debug!(range = %self.range, "campaign refused: {e}");
                    }
                }
                PeerMsg::CampaignUnled => {
                    let raft = &self.raw.raft;
                    if raft.state == StateRole::Follower && raft.leader_id == 0 {
                        self.campaign_without_pre_vote();
                    }
                }
                PeerMsg::PreferLeader { replica } => self.prefer_leader(replica),
                PeerMsg::CompactLog { token } => {
                    let r = self.force_compact(out);
                    out.complete(token, r.map(|_| Vec::new()));
                }
                PeerMsg::Unreachable { to } => self.raw.report_unreachable(to),
                PeerMsg::Sleep { from, term, commit } => {
                    self.on_sleep(from, term, commit, env, out)
                }
                PeerMsg::NodeDown(node) => self.on_node_down(node, env, out),
                // Only wakes (above).
                PeerMsg::Wake => {}
                PeerMsg::SnapshotStatus { to, ok } => {
                    let status = if ok {
                        raft::SnapshotStatus::Finish
                    } else {
                        raft::SnapshotStatus::Failure
                    };
                    self.raw.report_snapshot(to, status);
                }
            }
        }
    }

    /// Steps a message from the network after checking that raft can take it: raft-rs
    /// panics or misbehaves on some inconsistent input, so the checks come first.
    fn on_raft_message(
        &mut self,
        msg: Message,
        from_conf_ver: u64,
        env: &Env<'_>,
        out: &mut Output,
    ) {
        if msg.to != self.id {
            metrics::counter!("flotilla_runtime_dropped_messages_total", "reason" => "wrong_replica")
                .increment(1);
            return;
        }
        if raft::raw_node::is_local_msg(msg.get_msg_type()) {
            metrics::counter!("flotilla_runtime_dropped_messages_total", "reason" => "local_type")
                .increment(1);
            return;
        }
        // A sender that is not a member while the sender's view of membership is not newer
        // than ours was removed (or never added): its messages must not reach raft.
        if let Some(d) = self.descriptor() {
            let member = d.replicas.iter().any(|r| r.replica_id == msg.from);
            if !member && from_conf_ver <= d.epoch_or_default().conf_ver {
                metrics::counter!("flotilla_runtime_dropped_messages_total", "reason" => "not_member")
                    .increment(1);
                return;
            }
        }
        if msg.get_msg_type() == MessageType::MsgSnapshot && !self.accept_snapshot(&msg, env, out) {
            metrics::counter!("flotilla_runtime_dropped_messages_total", "reason" => "snapshot_overlap")
                .increment(1);
            return;
        }
        let msg_type = msg.get_msg_type();
        // A campaign by the replica this follower takes for its leader: that leader restarted
        // or stepped down (a leader never campaigns), so there is no lease to protect. Without
        // this, raft's lease check would ignore the campaign for an election timeout, which
        // after a restart is time with no leader (and a sleeping follower's clock stands still).
        let raft = &mut self.raw.raft;
        if matches!(
            msg_type,
            MessageType::MsgRequestPreVote | MessageType::MsgRequestVote
        ) && raft.state == StateRole::Follower
            && msg.from == raft.leader_id
            && msg.term > raft.term
        {
            raft.leader_id = 0;
        }
        if let Err(e) = self.raw.step(msg) {
            metrics::counter!("flotilla_runtime_dropped_messages_total", "reason" => "step_error")
                .increment(1);
            tracing::debug!(range = %self.range, "step refused: {e}");
        } else if self.is_leader()
            && matches!(
                msg_type,
                MessageType::MsgPropose | MessageType::MsgReadIndex
            )
        {
            // A follower forwarded a proposal or a read and waits for the commit.
            self.urge_commit();
        }
    }

    /// Records where a sender lives, when our descriptor does not say.
    pub(crate) fn learn_peer(&mut self, from: &ReplicaDescriptor) {
        if self.node_of(from.replica_id).is_none() {
            self.peers.push(*from);
        }
    }

    pub(crate) fn on_ticks(&mut self, ticks: u32, env: &Env<'_>, out: &mut Output) {
        // A sleeping replica's clocks stand still (a tick may race with its sleep).
        if self.asleep {
            return;
        }
        let elapsed_before = self.raw.raft.election_elapsed;
        for _ in 0..ticks {
            self.note_peers_up();
            self.raw.tick();
        }
        self.hibernate_tick(ticks, elapsed_before, env);
        if ticks > 0 && self.merge_state().is_some() {
            self.merge_frozen_ticks = self.merge_frozen_ticks.saturating_add(ticks);
            self.merge_tick(env, out);
        }
        if ticks > 0 && !self.reads.is_empty() {
            self.retry_reads(ticks, env);
        }
        if ticks > 0 && self.placement.is_some() {
            self.place_leader();
        }
        if self.campaign_retries > 0 && ticks > 0 {
            if self.raw.raft.leader_id != 0 {
                self.campaign_retries = 0;
            } else if self.raw.raft.election_elapsed >= 2 {
                self.campaign_retries -= 1;
                let _ = self.raw.campaign();
            }
        }
    }

    /// Phase 1 of a round: takes raft's Ready, sends what may go before the fsync, applies
    /// an incoming snapshot, and adds entries and hard state to the round's batch.
    pub(crate) fn collect_ready(
        &mut self,
        env: &Env<'_>,
        out: &mut Output,
        batch: &mut WriteBatch,
    ) -> crate::error::Result<()> {
        if let Some(p) = self.placeholder.take() {
            batch.put_descriptor(&p);
        }
        if !self.raw.has_ready() {
            self.hibernate_send(env, out);
            return Ok(());
        }
        let mut rd = self.raw.ready();
        if let Some(ss) = rd.ss() {
            // Seen here, not only on ticks: a group asleep right after its first election
            // ticks no more, and a preference left set would later undo another leadership
            // (an operator's transfer).
            self.note_leader(ss.leader_id);
        }
        if rd.ss().is_some_and(|ss| ss.raft_state == StateRole::Leader) {
            out.elections_won += 1;
            // A new leader's first entry: followers' reads wait for a commit in its term.
            self.urge_commit();
        }
        // Leader appends may go out before the local fsync (raft thesis 10.2.1).
        if !rd.messages().is_empty() {
            self.send_raft(rd.take_messages(), env, out);
        }
        self.hibernate_send(env, out);
        if !rd.snapshot().is_empty() {
            self.apply_snapshot(rd.snapshot().clone(), env, out)?;
        }
        self.raw.mut_store().append(rd.entries(), batch)?;
        if let Some(hs) = rd.hs() {
            self.raw.mut_store().set_hard_state(hs.clone(), batch);
        }
        if !rd.read_states().is_empty() {
            let states = rd.take_read_states();
            self.on_read_states(states);
        }
        self.ready = Some(Box::new(rd));
        Ok(())
    }

    /// Phase 2, after the round's batch is synced: sends messages that needed the fsync,
    /// advances raft, applies committed entries into `apply_batch`.
    pub(crate) fn after_persist(
        &mut self,
        env: &Env<'_>,
        out: &mut Output,
        apply_batch: &mut WriteBatch,
    ) -> crate::error::Result<()> {
        // Entries a CommitMerge held back go first.
        let mut entries = std::mem::take(&mut self.stalled);
        if let Some(mut rd) = self.ready.take() {
            let persisted = rd.take_persisted_messages();
            if !persisted.is_empty() {
                self.send_raft(persisted, env, out);
            }
            entries.extend(rd.take_committed_entries());
            // advance_append, not advance: raft must learn what was applied only after it was
            // applied (its automatic leave of a joint configuration keys off that).
            let mut light = self.raw.advance_append(*rd);
            if let Some(commit) = light.commit_index() {
                self.raw.mut_store().set_commit(commit);
            }
            let msgs = light.take_messages();
            if !msgs.is_empty() {
                self.send_raft(msgs, env, out);
            }
            entries.extend(light.take_committed_entries());
        } else if entries.is_empty() {
            // An append response may have been all that happened: it can complete a merge's
            // precondition.
            if self.merge_state().is_some() {
                self.merge_check(env, out);
            }
            if !self.forwarded.is_empty() {
                self.settle_forwarded(env, out);
            }
            self.maybe_hand_over(out);
            return Ok(());
        }
        let applied_any = !entries.is_empty();
        if applied_any {
            self.apply_entries(entries, env, out, apply_batch)?;
        }
        if self.stalled.is_empty() {
            self.raw.advance_apply();
        } else {
            let applied = self.raw.store().apply_state().applied_index;
            self.raw.advance_apply_to(applied);
        }
        if applied_any {
            self.maybe_compact(env, apply_batch)?;
        }
        self.complete_reads(env, out);
        if self.merge_state().is_some() {
            self.merge_check(env, out);
        }
        if !self.forwarded.is_empty() {
            self.settle_forwarded(env, out);
        }
        self.maybe_hand_over(out);
        // Follow-up work (e.g. a commit learned from the apply): run another round.
        if self.raw.has_ready() {
            out.reschedule = true;
        }
        Ok(())
    }

    /// The checks every admin proposal (split, merge) starts with: this replica leads, its
    /// range is initialized, and no membership change is in flight. `what` names the request
    /// in the refusal.
    pub(super) fn admin_descriptor(&self, what: &str) -> Result<RangeDescriptor, Error> {
        if !self.is_leader() {
            return Err(Error::NotLeader {
                range: self.range,
                leader_hint: self.leader_hint(),
            });
        }
        let desc = self
            .descriptor()
            .cloned()
            .ok_or(Error::RangeNotFound(self.range))?;
        if self.raw.raft.has_pending_conf()
            || !self.raw.store().conf_state().voters_outgoing.is_empty()
        {
            return Err(Error::AdminRefused(format!(
                "a membership change is in progress; {what} after it"
            )));
        }
        Ok(desc)
    }

    /// Fails everything this replica was waiting on (it is being destroyed or isolated).
    pub(crate) fn abort_pending(&mut self, out: &mut Output, err: Error) {
        for p in self.proposals.drain(..) {
            out.complete(p.token, Err(err.clone()));
        }
        self.drop_forwarded(out);
        for token in self.reads.drain_tokens() {
            out.complete(token, Err(err.clone()));
        }
    }
}
