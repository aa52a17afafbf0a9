//! Proposals: a command enters the group's log here.
//!
//! The leader appends it and remembers `(index, term, token)`; a follower forwards it to the
//! leader through raft (`MsgPropose`) when forwarding is on, or answers `NotLeader`. Either
//! way the proposer's future completes when this node applies the entry (the token is inside
//! it) or when the proposal is known lost. A follower remembers which leader (and term) it
//! forwarded to: if it stops following that leader, or installs a snapshot (which may hold
//! the entry, never applied here one by one) before the entry applies, the proposal is
//! answered `ProposalDropped` (outcome unknown) right away instead of at `proposal_timeout`.
//!
//! A commit reaches the followers with the leader's next append or heartbeat, not in an empty
//! append of its own (raft-rs's `skip_bcast_commit`): under load the next append carries it
//! anyway, and one more append and response per follower per commit was a third of a busy
//! group's messages. A follower that waits on a commit gets it at once ([`Replica::urge_commit`]):
//! one that forwarded a proposal or a read, and every follower after an admin entry (a split's
//! new group, a merge) or a new leader's first entry. Membership changes are broadcast by raft.

use raft::StateRole;

use super::{Env, LocalProposal, Output, Replica};
use crate::error::Error;

/// A proposal this follower forwarded, and the leader it followed then.
#[derive(Debug, Clone, Copy)]
pub(super) struct Forwarded {
    token: u64,
    leader: u64,
    term: u64,
}

impl Replica {
    /// Proposes a client or admin command; a merge source refuses them all.
    pub(super) fn propose(&mut self, token: u64, data: Vec<u8>, env: &Env<'_>, out: &mut Output) {
        if self.merge_state().is_some() {
            out.complete(
                token,
                Err(Error::Busy("range is being merged; retry shortly")),
            );
            return;
        }
        // The system range is proposed to from every node that holds a replica of it (id
        // leases, the registry): a follower always forwards.
        let force_forward = self.range.is_system();
        self.append(token, data, env, out, force_forward);
    }

    /// Proposes a batch entry (see `PeerMsg::ProposeBatch`): as [`Replica::propose`], except
    /// that a follower answers `NotLeader` at once unless `forward`.
    pub(super) fn propose_batch(
        &mut self,
        token: u64,
        data: Vec<u8>,
        forward: bool,
        env: &Env<'_>,
        out: &mut Output,
    ) {
        if !forward && self.raw.raft.state != StateRole::Leader {
            out.complete(
                token,
                Err(Error::NotLeader {
                    range: self.range,
                    leader_hint: self.leader_hint(),
                }),
            );
            return;
        }
        self.propose(token, data, env, out);
    }

    /// Appends `data` to the log as leader, or forwards it to the leader (if allowed by the
    /// config or `force_forward`).
    pub(super) fn append(
        &mut self,
        token: u64,
        data: Vec<u8>,
        env: &Env<'_>,
        out: &mut Output,
        force_forward: bool,
    ) {
        let leader = self.raw.raft.state == StateRole::Leader;
        let forward = env.config.forward_proposals || force_forward;
        if !leader && (!forward || self.raw.raft.leader_id == 0) {
            out.complete(
                token,
                Err(Error::NotLeader {
                    range: self.range,
                    leader_hint: self.leader_hint(),
                }),
            );
            return;
        }
        match self.raw.propose(Vec::new(), data) {
            Ok(()) if leader => {
                let index = self.raw.raft.raft_log.last_index();
                self.proposals.push_back(LocalProposal {
                    index,
                    term: self.raw.raft.term,
                    token,
                });
            }
            // Forwarded: the token inside the entry completes it when it applies here; should
            // the leader change first, `settle_forwarded` answers it.
            Ok(()) => {
                if token != 0 {
                    self.forwarded.push(Forwarded {
                        token,
                        leader: self.raw.raft.leader_id,
                        term: self.raw.raft.term,
                    });
                }
            }
            Err(raft::Error::ProposalDropped) if leader => {
                // A leader drops proposals when its uncommitted log is over budget or while it
                // transfers leadership: both pass, so the caller should back off and retry.
                out.complete(
                    token,
                    Err(Error::Busy("uncommitted log full or leader transferring")),
                );
            }
            Err(e) => {
                tracing::debug!(range = %self.range, "proposal refused: {e}");
                out.complete(token, Err(Error::ProposalDropped));
            }
        }
    }

    /// Forwarded proposals whose leader is no longer the leader (or no longer in the same
    /// term) are answered `ProposalDropped` (outcome unknown: the old leader may have
    /// appended them, and the new one may still commit them; a retry with the same request id
    /// is safe). Those that completed meanwhile are forgotten.
    pub(super) fn settle_forwarded(&mut self, env: &Env<'_>, out: &mut Output) {
        let (leader, term) = (self.raw.raft.leader_id, self.raw.raft.term);
        self.forwarded.retain(|f| {
            if !env.pending.contains(f.token) {
                return false;
            }
            if f.leader != leader || f.term != term {
                out.complete(f.token, Err(Error::ProposalDropped));
                return false;
            }
            true
        });
        if self.forwarded.is_empty() {
            self.forwarded = Vec::new();
        }
    }

    /// Sends every commit up to the current last index to the followers at once (see the
    /// module doc).
    pub(super) fn urge_commit(&mut self) {
        self.urgent_commit = self.raw.raft.raft_log.last_index();
        self.raw.skip_bcast_commit(false);
    }

    /// Before a round steps its messages: once the urgent commit is reached, commits wait for
    /// the next append or heartbeat again.
    pub(super) fn settle_urgent_commit(&mut self) {
        if self.urgent_commit != 0 && self.raw.raft.raft_log.committed >= self.urgent_commit {
            self.urgent_commit = 0;
            self.raw.skip_bcast_commit(true);
        }
    }

    /// Answers every forwarded proposal `ProposalDropped` (outcome unknown): this replica
    /// installs a snapshot, which may hold their entries without applying them here one by
    /// one, or it is going away.
    pub(super) fn drop_forwarded(&mut self, out: &mut Output) {
        for f in std::mem::take(&mut self.forwarded) {
            out.complete(f.token, Err(Error::ProposalDropped));
        }
    }

    /// Settles local proposals at or below `index` once the entry at `index` (of `term`) has
    /// been applied: an older proposal at the same index with another term was overwritten.
    pub(super) fn settle_proposals(&mut self, index: u64, term: u64, out: &mut Output) {
        while let Some(p) = self.proposals.front().copied() {
            if p.index > index {
                break;
            }
            self.proposals.pop_front();
            if p.index < index || p.term != term {
                out.complete(p.token, Err(Error::ProposalDropped));
            }
            // Otherwise the apply path completed it through the token in the entry.
        }
        if self.proposals.is_empty() && self.proposals.capacity() > 16 {
            self.proposals.shrink_to_fit();
        }
    }
}
