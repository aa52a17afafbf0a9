//! Hibernation (quiescence): a group with nothing to do sleeps on every replica, so that it
//! costs no tick, no heartbeat and no CPU.
//!
//! # Going to sleep
//!
//! Only a leader decides. After `hibernate_ticks` consecutive quiet ticks ([`Replica::quiescent`]:
//! no proposal, read, forwarded proposal, campaign retry, merge or membership change or
//! leadership transfer in flight, everything committed in its term and applied, every follower
//! on a live node matched up to the last index, and the live matched voters a quorum), it sends
//! each follower a *sleep notice*, a coalesced heartbeat with the `hibernate` flag carrying its
//! term and commit index (one batch per node pair per tick, like the other coalesced
//! heartbeats), after the last heartbeat raft produced, and sleeps; only followers matched up
//! to its last index get one. A follower sleeps on the notice only if the notice comes from
//! its leader in its term and it already knows that commit index and holds nothing past it
//! (TiKV #19219: a follower that has not learned the leader's commit must not sleep, or it
//! would never learn it). Otherwise it steps the notice as a heartbeat that commits nothing
//! (the notice's commit index is the leader's, not `min(matched, commit)` as in a real
//! heartbeat: a log that differs from the leader's must never be committed by it) and asks
//! the leader to wake (a *poke*, below), whose heartbeats teach the commit; the leader tries
//! again once its followers are quiet. Followers on nodes that are down do not hold the group
//! awake (CockroachDB quiesces with non-live replicas likewise) and get no notice: when their
//! node comes back, the leader's node wakes the groups it leads.
//!
//! A sleeping replica is out of the ticker's awake set (the worker moves it after the round),
//! so it is not even visited per tick. Its raft clocks stand still, which only lengthens the
//! time a follower refuses votes after hearing its leader, in wall-clock terms: leader leases
//! (`read.rs`, on the monotonic clock) stay safe.
//!
//! # Waking
//!
//! Any input wakes a sleeping replica: a request, an admin command, a raft message (vote,
//! append, snapshot, heartbeat), a report from the transport, a liveness event. Exceptions,
//! because they carry no news: heartbeat responses of its own term reaching a sleeping leader
//! (the answers to its last heartbeats, which may arrive after it slept) and sleep notices.
//! A leader that wakes restarts its quorum check (its followers' activity flags predate the
//! sleep) and heartbeats at once, which wakes its followers. A follower woken by anything but
//! its leader pokes the leader (a coalesced heartbeat response with the `hibernate` flag),
//! which wakes it, so that the follower does not time out and campaign against a live leader;
//! a follower that hears nothing for two heartbeat intervals while awake pokes it too (a lost
//! sleep notice).
//!
//! # Liveness
//!
//! With its heartbeats gone, a sleeping group learns of its leader's death from node liveness
//! (`fsm::liveness`, on the transport's pings): when a node is declared down, the groups it led
//! (or, for a follower recovered asleep that knows no leader, the replica it voted for lived
//! there) are woken with [`PeerMsg::NodeDown`](super::PeerMsg): their followers forget that leader
//! (so that they grant votes at once) and the first live voter by replica id campaigns, so a
//! group holds about one election. A follower woken for another reason while its leader's node
//! is down does the same. Declaring a node down takes at least `election_tick` ticks of
//! silence, longer than any lease it could hold (see `NodeGroupConfig::node_down_ticks`).

use flotilla_proto::meta::{RangeDescriptor, ReplicaDescriptor, ReplicaRole};
use flotilla_proto::transport::Heartbeat;
use flotilla_proto::NodeId;
use raft::prelude::{Message, MessageType};
use raft::{ProgressState, StateRole};

use super::{heartbeat_message, Env, Output, PeerMsg, Replica};

impl Replica {
    /// Whether this replica sleeps (is out of the ticker's awake set).
    pub(crate) fn is_asleep(&self) -> bool {
        self.asleep
    }

    /// A replica recovered from disk starts asleep; the node wakes it through its paced wake
    /// queue (a restart must not make every group campaign at once).
    pub(crate) fn start_asleep(&mut self) {
        self.asleep = true;
    }

    /// Whether this replica's log holds entries it does not know to be committed: only its
    /// leader can tell it their commit, and may never if the group sleeps.
    pub(crate) fn holds_uncommitted(&self) -> bool {
        let log = &self.raw.raft.raft_log;
        log.last_index() > log.committed
    }

    /// Gives back what a sleeping replica does not need: the log tail cache (the entries stay
    /// on disk), raft-rs's in-flight windows and message buffers, and the capacity of empty
    /// queues. Nothing here changes raft's state, only memory held for the next burst.
    fn release_memory(&mut self) {
        let applied = self.raw.raft.raft_log.applied;
        self.raw.mut_store().evict_cache_to(applied);
        self.retry_records.clear();
        let raft = &mut self.raw.raft;
        if raft.msgs.is_empty() {
            raft.msgs = Vec::new();
        }
        if raft.raft_log.unstable.entries.is_empty() {
            raft.raft_log.unstable.entries = Vec::new();
        }
        for (_, pr) in raft.mut_prs().iter_mut() {
            pr.ins.maybe_free_buffer();
        }
        if self.proposals.is_empty() {
            self.proposals = Default::default();
        }
        if self.stalled.is_empty() {
            self.stalled = Vec::new();
        }
        self.forwarded.shrink_to_fit();
        self.peers.shrink_to_fit();
        self.appended_to = Vec::new();
        self.entries_to = Vec::new();
    }

    /// What an input does to a sleeping replica: whether it wakes it (the input is handled
    /// either way, after this).
    pub(super) fn wake_for(&mut self, msg: &PeerMsg, env: &Env<'_>, out: &mut Output) {
        if !self.asleep {
            return;
        }
        let from = match msg {
            PeerMsg::Sleep { .. } => return,
            // The transport could not deliver to a replica (its node is down, typically). A
            // leader only marks that follower's progress: waking it would undo every sleep of
            // a leader whose last heartbeats went to a dead node, over and over. A follower
            // that cannot reach its leader wakes, to elect another if the leader stays silent.
            PeerMsg::Unreachable { .. } if self.raw.raft.state == StateRole::Leader => return,
            PeerMsg::Raft { msg, .. } => {
                let raft = &self.raw.raft;
                // The answers to a leader's last heartbeats before it slept.
                if raft.state == StateRole::Leader
                    && msg.get_msg_type() == MessageType::MsgHeartbeatResponse
                    && msg.term == raft.term
                    && msg.context.is_empty()
                {
                    return;
                }
                Some(msg.from)
            }
            _ => None,
        };
        self.wake(from, env, out);
    }

    /// Wakes this replica; `from` is the replica whose message woke it, if a message did. A
    /// follower whose leader's node is down forgets that leader, and campaigns if it is the
    /// group's [`campaigner`] and no message (a peer's campaign) woke it.
    pub(super) fn wake(&mut self, from: Option<u64>, env: &Env<'_>, out: &mut Output) {
        if !self.asleep {
            return;
        }
        self.asleep = false;
        self.quiet_ticks = 0;
        metrics::counter!("flotilla_runtime_wakes_total").increment(1);
        match self.raw.raft.state {
            StateRole::Leader => {
                // Restart the quorum check from now: the followers' activity flags are from
                // before the sleep.
                let id = self.id;
                let raft = &mut self.raw.raft;
                raft.election_elapsed = 0;
                for (pid, pr) in raft.mut_prs().iter_mut() {
                    if *pid != id {
                        pr.recent_active = false;
                    }
                }
                self.raw.ping();
            }
            _ => {
                let leader = self.raw.raft.leader_id;
                if leader == 0 {
                    // No leader known (a replica recovered asleep knows none): woken by a
                    // request, ask the replica it voted for in this term, the likeliest leader,
                    // to wake; that leader's heartbeats then name it. Otherwise the request
                    // would wait for an election timeout, and a pre-vote the leader ignores.
                    let vote = self.raw.raft.vote;
                    if from.is_none() && vote != 0 && vote != self.id {
                        self.poke(vote, out);
                    }
                    return;
                }
                if from == Some(leader) {
                    return;
                }
                let Some(node) = self.node_of(leader) else {
                    return;
                };
                if env.host.node_live(node) == Some(false) {
                    self.forget_leader(node, from.is_none(), env);
                } else {
                    self.poke_leader(out);
                }
            }
        }
    }

    /// Asks the leader to wake: a coalesced heartbeat response with the hibernate flag.
    fn poke_leader(&mut self, out: &mut Output) {
        self.poke(self.raw.raft.leader_id, out);
    }

    /// Asks replica `to` (the leader, or who is presumed to be) to wake.
    fn poke(&mut self, to: u64, out: &mut Output) {
        let raft = &self.raw.raft;
        let Some(node) = self.node_of(to) else {
            return;
        };
        out.push_heartbeat(
            node,
            Heartbeat {
                range_id: self.range.0,
                from_replica: self.id,
                to_replica: to,
                term: raft.term,
                commit: raft.raft_log.committed,
                response: true,
                context: Default::default(),
                hibernate: true,
            },
        );
    }

    /// A leader's sleep notice (see the module doc).
    pub(super) fn on_sleep(
        &mut self,
        from: ReplicaDescriptor,
        term: u64,
        commit: u64,
        env: &Env<'_>,
        out: &mut Output,
    ) {
        let raft = &self.raw.raft;
        let ok = env.config.hibernate
            && raft.state == StateRole::Follower
            && raft.term == term
            && raft.leader_id == from.replica_id
            && raft.raft_log.committed == commit
            && raft.raft_log.last_index() == commit
            && self.reads.is_empty()
            && self.forwarded.is_empty()
            && self.stalled.is_empty()
            && self.merge_state().is_none();
        if ok {
            if !self.asleep {
                metrics::counter!("flotilla_runtime_sleeps_total").increment(1);
            }
            self.asleep = true;
            self.quiet_ticks = 0;
            // What the heartbeat the notice stands for would do: the leader was just heard.
            self.raw.raft.election_elapsed = 0;
            self.release_memory();
            return;
        }
        // Behind (or not following this leader): take it as a plain heartbeat, but one that
        // commits nothing (a notice's commit is the leader's, not the `min(matched, commit)`
        // a real heartbeat carries, so it may lie past what this log shares with the leader),
        // and ask the leader to wake: its heartbeats then teach the commit.
        self.wake(Some(from.replica_id), env, out);
        let hb = Heartbeat {
            range_id: self.range.0,
            from_replica: from.replica_id,
            to_replica: self.id,
            term,
            commit: 0,
            ..Default::default()
        };
        let msg: Message = heartbeat_message(&hb);
        self.learn_peer(&from);
        self.on_raft_message(msg, 0, env, out);
        if self.raw.raft.leader_id == from.replica_id && self.raw.raft.term == term {
            self.poke_leader(out);
        }
    }

    /// The node hosting the leader of this group (or, for a follower that knows none, the
    /// replica it voted for) was declared down: forget that leader, so that this replica
    /// grants votes at once, and campaign if this replica is the group's [`campaigner`].
    pub(super) fn on_node_down(&mut self, node: NodeId, env: &Env<'_>, out: &mut Output) {
        let knew_leader = self.raw.raft.leader_id != 0;
        self.wake(None, env, out);
        let raft = &self.raw.raft;
        if raft.state != StateRole::Follower {
            return;
        }
        // A follower that knew no leader (recovered asleep) was woken as one led from the node
        // of the replica it voted for (the leader index presumes so, `fsm::life::recover`).
        let leader = if knew_leader {
            raft.leader_id
        } else {
            raft.vote
        };
        if leader == 0 || leader == self.id || self.node_of(leader) != Some(node) {
            return;
        }
        self.forget_leader(node, true, env);
    }

    fn forget_leader(&mut self, node: NodeId, campaign: bool, env: &Env<'_>) {
        self.raw.raft.leader_id = 0;
        metrics::counter!("flotilla_runtime_leaders_forgotten_total").increment(1);
        if !campaign {
            return;
        }
        let Some(desc) = self.descriptor() else {
            return;
        };
        if campaigner(desc, node, env.node, |n| env.host.node_live(n)) == Some(self.id) {
            self.campaign_without_pre_vote();
        }
    }

    /// Campaigns at once, without a pre-vote round. Used where no live leader can be
    /// disturbed and the pre-vote would only cost a round trip per group (a third of an
    /// election's messages, at 33,000 groups a failover or a restart): the campaigner of a
    /// group whose leader's node was declared down (silent for longer than any lease it could
    /// hold), a recovered replica that voted for itself in its last term (its leadership, if
    /// it had one, ended with the process; the followers that took it for their leader forget
    /// it when it campaigns, `on_raft_message`), and a bootstrapped group's chosen first
    /// leader (no leader exists yet). The vote itself is as safe either way: a follower that
    /// still heard a leader recently ignores it (raft's lease check), so no lease is cut
    /// short. What is given up: a replica whose campaign the others ignore (they follow a
    /// live leader) has raised its term, which that leader sees at its next message and
    /// answers with a new election, as raft without pre-vote would.
    pub(super) fn campaign_without_pre_vote(&mut self) {
        let raft = &mut self.raw.raft;
        let pre_vote = std::mem::replace(&mut raft.pre_vote, false);
        let campaigned = self.raw.campaign();
        self.raw.raft.pre_vote = pre_vote;
        if let Err(e) = campaigned {
            tracing::debug!(range = %self.range, "campaign refused: {e}");
        }
    }

    /// Called after the ticks of a round: a quiet leader counts towards sleeping; a follower
    /// that stopped hearing its leader asks it to wake.
    pub(super) fn hibernate_tick(&mut self, ticks: u32, elapsed_before: usize, env: &Env<'_>) {
        if !env.config.hibernate || ticks == 0 {
            return;
        }
        match self.raw.raft.state {
            StateRole::Leader => {
                if self.quiescent(env) {
                    self.quiet_ticks = self.quiet_ticks.saturating_add(ticks as usize);
                } else {
                    self.quiet_ticks = 0;
                }
            }
            StateRole::Follower => {
                // A lost sleep notice, or a leader that slept while this follower woke.
                let silence = 2 * env.config.heartbeat_tick + 1;
                let now = self.raw.raft.election_elapsed;
                if self.raw.raft.leader_id != 0 && elapsed_before < silence && now >= silence {
                    self.poke_pending = true;
                }
            }
            _ => {}
        }
    }

    /// Sends what the ticks decided, after raft's own messages of the round (a sleep notice
    /// must follow the last heartbeat, or that heartbeat would wake the follower again).
    pub(super) fn hibernate_send(&mut self, env: &Env<'_>, out: &mut Output) {
        if std::mem::take(&mut self.poke_pending) && !self.asleep {
            self.poke_leader(out);
        }
        if self.asleep
            || self.quiet_ticks < env.config.hibernate_ticks
            || self.raw.raft.state != StateRole::Leader
        {
            return;
        }
        // Re-check: the round's messages may have changed something since the tick.
        if !self.quiescent(env) {
            self.quiet_ticks = 0;
            return;
        }
        let raft = &self.raw.raft;
        let last = raft.raft_log.last_index();
        for (&id, pr) in raft.prs().iter() {
            // Only followers known to hold the whole log get a notice: a notice's commit must
            // never reach a replica whose log may differ (one on a node that was down).
            if id == self.id || pr.matched != last {
                continue;
            }
            let Some(node) = self.node_of(id) else {
                continue;
            };
            out.push_heartbeat(
                node,
                Heartbeat {
                    range_id: self.range.0,
                    from_replica: self.id,
                    to_replica: id,
                    term: raft.term,
                    commit: raft.raft_log.committed,
                    response: false,
                    context: Default::default(),
                    hibernate: true,
                },
            );
        }
        self.asleep = true;
        self.quiet_ticks = 0;
        self.release_memory();
        metrics::counter!("flotilla_runtime_sleeps_total").increment(1);
    }

    /// Whether this leader's group may sleep now (see the module doc).
    pub(super) fn quiescent(&self, env: &Env<'_>) -> bool {
        if !self.proposals.is_empty()
            || !self.reads.is_empty()
            || !self.forwarded.is_empty()
            || !self.stalled.is_empty()
            || self.campaign_retries > 0
            || self.placeholder.is_some()
            || self.merge_state().is_some()
            || self.merge_requested
        {
            return false;
        }
        let raft = &self.raw.raft;
        let last = raft.raft_log.last_index();
        if raft.state != StateRole::Leader
            || raft.lead_transferee.is_some()
            || raft.has_pending_conf()
            || raft.pending_read_count() > 0
            || !raft.commit_to_current_term()
            || raft.raft_log.committed != last
            || raft.raft_log.applied != last
        {
            return false;
        }
        let conf = self.raw.store().conf_state();
        if !conf.voters_outgoing.is_empty() || !conf.learners_next.is_empty() {
            return false;
        }
        let mut quorum = 0usize;
        for (&id, pr) in raft.prs().iter() {
            let voter = conf.voters.contains(&id);
            if id == self.id {
                quorum += voter as usize;
                continue;
            }
            let Some(node) = self.node_of(id) else {
                return false;
            };
            match env.host.node_live(node) {
                // A transport without liveness: groups cannot sleep safely.
                None => return false,
                Some(false) => continue,
                Some(true) => {
                    if pr.matched != last || pr.state != ProgressState::Replicate {
                        return false;
                    }
                    quorum += voter as usize;
                }
            }
        }
        quorum * 2 > conf.voters.len()
    }
}

/// The replica of the group described by `desc` that campaigns when the leader's node `down`
/// is declared down, as seen from node `me` (`live` answers node liveness): one of the voters
/// on the other nodes that are live, chosen by range id among them in replica id order, so
/// that the groups a dead node led are elected from (and then led by) the survivors evenly,
/// each survivor working through its share of the elections at once. Every survivor computes
/// the same choice from the same liveness view; where views differ, the woken replicas that
/// were not chosen still elect on their timeouts.
pub(crate) fn campaigner(
    desc: &RangeDescriptor,
    down: NodeId,
    me: NodeId,
    live: impl Fn(NodeId) -> Option<bool>,
) -> Option<u64> {
    let mut voters: Vec<u64> = desc
        .replicas
        .iter()
        .filter(|r| r.role != ReplicaRole::Learner as i32)
        .filter(|r| {
            let n = NodeId(r.node_id);
            n != down && (n == me || live(n) != Some(false))
        })
        .map(|r| r.replica_id)
        .collect();
    if voters.is_empty() {
        return None;
    }
    voters.sort_unstable();
    Some(voters[(desc.range_id % voters.len() as u64) as usize])
}

#[cfg(test)]
mod tests {
    use super::*;

    fn desc(range: u64, learner_on: Option<u64>) -> RangeDescriptor {
        RangeDescriptor {
            range_id: range,
            replicas: (1..=4)
                .map(|n| ReplicaDescriptor {
                    replica_id: 10 * n,
                    node_id: n,
                    role: if learner_on == Some(n) {
                        ReplicaRole::Learner as i32
                    } else {
                        ReplicaRole::Voter as i32
                    },
                })
                .collect(),
            ..Default::default()
        }
    }

    #[test]
    fn the_campaigner_is_a_live_voter_off_the_down_node_and_the_choice_spreads_over_them() {
        let all_live = |_: NodeId| Some(true);
        let mut chosen = std::collections::BTreeMap::new();
        for range in 1..=300 {
            let d = desc(range, Some(4));
            let c = campaigner(&d, NodeId(1), NodeId(2), all_live).unwrap();
            // Never the down node's replica, never the learner.
            assert!(c == 20 || c == 30, "range {range}: {c}");
            // Every node computes the same choice.
            assert_eq!(campaigner(&d, NodeId(1), NodeId(3), all_live), Some(c));
            *chosen.entry(c).or_insert(0) += 1;
        }
        assert_eq!(chosen.values().copied().collect::<Vec<_>>(), [150, 150]);
        // A node that is not live is passed over (but this node always counts itself).
        let three_dead = |n: NodeId| Some(n != NodeId(3));
        for range in 1..=20 {
            let d = desc(range, Some(4));
            assert_eq!(campaigner(&d, NodeId(1), NodeId(2), three_dead), Some(20));
            assert!(campaigner(&d, NodeId(1), NodeId(3), three_dead).is_some());
        }
        // No live voter left: nobody.
        let d = desc(7, Some(4));
        assert_eq!(campaigner(&d, NodeId(1), NodeId(1), |_| Some(false)), None);
    }
}
