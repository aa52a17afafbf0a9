//! Reads. The replica only decides *when* a read may be served; the data is then read from
//! the engine by the caller.
//!
//! - ReadIndex (linearizable, the default): raft confirms leadership with a quorum (a
//!   follower asks the leader) and returns the commit index; the read completes once this
//!   replica has applied up to it. Works on leaders and followers.
//! - Lease: the leader serves without a round trip while its lease holds (check-quorum keeps
//!   a deposed leader from believing it leads for longer than an election timeout). Only as
//!   safe as the clocks' drift bound, so it is opt-in per read.
//! - Stale reads never get here: the caller reads the engine directly.
//!
//! # One context per attempt
//!
//! raft-rs's `ReadOnly` matches heartbeat acknowledgements to a read by its context alone,
//! not by the heartbeat round that carried it; the leader repeats the context of its newest
//! pending read on every heartbeat; and a quorum for one context releases every read queued
//! before it as well. So a context used twice is unsafe: once its first use was answered, a
//! retry with the same context is queued again, behind reads that arrived meanwhile, and late
//! acknowledgements of the first use (even ones that waited in a paused leader's socket
//! while another leader was elected and took writes) release the retry and those reads,
//! at a commit index older than the writes. Hence every attempt (a retry included) has its
//! own context, `(replica, incarnation, token, attempt)`: the replica id tells replicas of
//! the group apart (tokens are per node), the incarnation (random per replica instance)
//! tells this life from one before a restart (tokens start over), the attempt tells a retry
//! from the attempts before it. An answer to any attempt of a read completes it: each attempt
//! was made after the read arrived.

use flotilla_store::GroupStorage;
use raft::{RawNode, ReadState};

use super::Replica;
use crate::error::Error;
use crate::fsm::worker::Round;
use crate::node_group::Shared;

/// A read waiting for its read index, then for the apply to reach it.
#[derive(Debug)]
pub(crate) struct PendingRead {
    pub(crate) token: u64,
    /// Set once raft returned the read index.
    index: Option<u64>,
    /// Ticks since the read index was (re)requested.
    waited: u32,
    /// The number of the latest attempt (0: none was needed).
    attempt: u32,
}

impl PendingRead {
    fn new(token: u64) -> PendingRead {
        PendingRead {
            token,
            index: None,
            waited: 0,
            attempt: 0,
        }
    }
}

/// What a replica keeps for reads.
#[derive(Debug)]
pub(crate) struct Reads {
    pending: Vec<PendingRead>,
    /// Random per replica instance (see the module doc).
    incarnation: u64,
}

impl Reads {
    pub(crate) fn new() -> Reads {
        Reads {
            pending: Vec::new(),
            incarnation: rand::random(),
        }
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.pending.is_empty()
    }

    /// Takes every read in flight, to fail them.
    pub(crate) fn drain_tokens(&mut self) -> impl Iterator<Item = u64> + '_ {
        self.pending.drain(..).map(|r| r.token)
    }
}

/// Bytes of a read context: replica id, incarnation, token, attempt; big endian.
const CONTEXT_LEN: usize = 8 + 8 + 8 + 4;

fn context(replica: u64, incarnation: u64, token: u64, attempt: u32) -> Vec<u8> {
    let mut ctx = Vec::with_capacity(CONTEXT_LEN);
    ctx.extend_from_slice(&replica.to_be_bytes());
    ctx.extend_from_slice(&incarnation.to_be_bytes());
    ctx.extend_from_slice(&token.to_be_bytes());
    ctx.extend_from_slice(&attempt.to_be_bytes());
    ctx
}

/// `(replica, incarnation, token, attempt)` of a context made by [`context`].
fn parse_context(ctx: &[u8]) -> Option<(u64, u64, u64, u32)> {
    if ctx.len() != CONTEXT_LEN {
        return None;
    }
    let word = |i: usize| u64::from_be_bytes(ctx[i..i + 8].try_into().expect("8 bytes"));
    let attempt = u32::from_be_bytes(ctx[24..28].try_into().expect("4 bytes"));
    Some((word(0), word(8), word(16), attempt))
}

/// Asks raft for a read index with a fresh context (see the module doc).
fn request_read_index(
    raw: &mut RawNode<GroupStorage>,
    replica: u64,
    reads: &Reads,
    r: &mut PendingRead,
) {
    r.attempt += 1;
    r.waited = 0;
    raw.read_index(context(replica, reads.incarnation, r.token, r.attempt));
}

impl Replica {
    pub(super) fn read(&mut self, token: u64, lease: bool, shared: &Shared, round: &mut Round) {
        // Once the target may have taken the keys over, this replica's view is not the latest.
        if self.merge_state().is_some() {
            round.complete(
                token,
                Err(Error::Busy("range is being merged; retry shortly")),
            );
            return;
        }
        if lease {
            if self.is_leader()
                && self.raw.raft.in_lease()
                && self.raw.raft.commit_to_current_term()
            {
                let mut r = PendingRead::new(token);
                r.index = Some(self.raw.raft.raft_log.committed);
                self.reads.pending.push(r);
                self.complete_reads(shared, round);
            } else {
                round.complete(
                    token,
                    Err(Error::NotLeader {
                        range: self.range,
                        leader_hint: self.leader_hint(),
                    }),
                );
            }
            return;
        }
        if self.raw.raft.leader_id == 0 {
            round.complete(
                token,
                Err(Error::NotLeader {
                    range: self.range,
                    leader_hint: None,
                }),
            );
            return;
        }
        let mut r = PendingRead::new(token);
        request_read_index(&mut self.raw, self.id, &self.reads, &mut r);
        self.reads.pending.push(r);
    }

    /// Asks again, each time with a new context, for read indexes that have not arrived
    /// within two heartbeat intervals: raft-rs does not resend a lost `MsgReadIndex` (or its
    /// answer), and a leader that has not committed in its term yet drops the request.
    pub(super) fn retry_reads(&mut self, ticks: u32, shared: &Shared) {
        let patience = (2 * shared.config.heartbeat_tick) as u32;
        let reads = &mut self.reads;
        let mut pending = std::mem::take(&mut reads.pending);
        for r in pending.iter_mut().filter(|r| r.index.is_none()) {
            r.waited += ticks;
            if r.waited >= patience {
                request_read_index(&mut self.raw, self.id, reads, r);
            }
        }
        reads.pending = pending;
    }

    pub(super) fn on_read_states(&mut self, states: Vec<ReadState>) {
        let reads = &mut self.reads;
        for rs in states {
            let Some((replica, incarnation, token, _)) = parse_context(&rs.request_ctx) else {
                continue;
            };
            // An answer to an earlier life of this replica (its tokens started over since).
            if replica != self.id || incarnation != reads.incarnation {
                continue;
            }
            let Some(r) = reads.pending.iter_mut().find(|r| r.token == token) else {
                continue;
            };
            if r.index.is_none() {
                r.index = Some(rs.index);
            }
        }
    }

    /// Completes reads whose index has been applied.
    pub(super) fn complete_reads(&mut self, shared: &Shared, round: &mut Round) {
        let pending = &mut self.reads.pending;
        if pending.is_empty() {
            return;
        }
        let applied = self.raw.raft.raft_log.applied;
        pending.retain(|r| match r.index {
            Some(i) if i <= applied => {
                round.complete(r.token, Ok(Vec::new()));
                false
            }
            // A read whose caller gave up (timed out) is forgotten.
            _ => shared.pending.contains(r.token),
        });
        if pending.is_empty() {
            *pending = Vec::new();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_context_round_trips_and_differs_per_attempt() {
        let a = context(3, 0xdead_beef, 42, 1);
        assert_eq!(parse_context(&a), Some((3, 0xdead_beef, 42, 1)));
        assert_ne!(a, context(3, 0xdead_beef, 42, 2));
        assert_eq!(parse_context(&a[..CONTEXT_LEN - 1]), None);
        // The context of the previous format (a bare token) is not taken for ours.
        assert_eq!(parse_context(&42u64.to_be_bytes()), None);
    }
}
