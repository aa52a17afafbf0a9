//! Reads. The replica only decides *when* a read may be served; the data is then read from
//! the engine by the caller.
//!
//! - ReadIndex (linearizable, the default): raft confirms leadership with a quorum (a
//!   follower asks the leader) and returns the commit index; the read completes once this
//!   replica has applied up to it. Works on leaders and followers.
//! - Lease: the leader serves without a round trip while its lease holds, and through
//!   ReadIndex otherwise (see "Lease" below). Only as safe as the clocks' drift bound, so it
//!   is opt-in per read.
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
//!
//! # Lease
//!
//! A follower that acknowledged a heartbeat refuses votes for an election timeout of its own
//! ticks after it (raft-rs check-quorum: "lease is not expired"), so no other leader can be
//! elected within about that long after the leader *sent* a round that a quorum
//! acknowledged. The lease is kept here in wall-clock time (the monotonic clock), from the
//! send time of a ReadIndex attempt this replica made as leader and raft confirmed; a lease
//! read without a valid lease goes through ReadIndex, which renews the lease.
//!
//! raft-rs's own `in_lease()` only says "leader with check-quorum", which is not enough: a
//! leader steps down at its quorum check, once per election timeout of its ticks, and the
//! check passes on any acknowledgement since the previous one, so it may believe it leads
//! for up to two election timeouts after the last acknowledgement while the others elect a
//! new leader after one; and a leader that was paused (a stopped process, a VM or GC stall)
//! ran no ticks at all, so on resume it believes it leads until a tick or the new leader's
//! messages say otherwise. The lease is also dropped when the leader starts a leadership
//! transfer: the transferee's election ignores leases.

use std::time::{Duration, Instant};

use flotilla_store::GroupStorage;
use raft::{RawNode, ReadState};

use super::{Env, Output, Replica};
use crate::config::NodeGroupConfig;
use crate::error::Error;

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
    /// What a confirmation of the latest attempt proves about the lease, if it was made as
    /// leader: `(term, lease end, lease epoch)`.
    renews: Option<(u64, Instant, u64)>,
}

impl PendingRead {
    fn new(token: u64) -> PendingRead {
        PendingRead {
            token,
            index: None,
            waited: 0,
            attempt: 0,
            renews: None,
        }
    }
}

/// What a replica keeps for reads: those in flight and the leader lease.
#[derive(Debug)]
pub(crate) struct Reads {
    pending: Vec<PendingRead>,
    /// Random per replica instance (see the module doc).
    incarnation: u64,
    /// `(term, until)`: while leader in `term`, reads may be served without a round trip
    /// until then.
    lease: Option<(u64, Instant)>,
    /// Bumped by a leadership transfer: confirmations of attempts made before it no longer
    /// renew the lease.
    lease_epoch: u64,
}

impl Reads {
    pub(crate) fn new() -> Reads {
        Reads {
            pending: Vec::new(),
            incarnation: rand::random(),
            lease: None,
            lease_epoch: 0,
        }
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.pending.is_empty()
    }

    /// Takes every read in flight, to fail them.
    pub(crate) fn drain_tokens(&mut self) -> impl Iterator<Item = u64> + '_ {
        self.pending.drain(..).map(|r| r.token)
    }

    /// Forgets the lease: the leader is handing leadership over, and the transferee
    /// campaigns without waiting for any lease to run out.
    pub(crate) fn suspect_lease(&mut self) {
        self.lease = None;
        self.lease_epoch += 1;
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

/// How long after a leader sent a round that a quorum acknowledged it may serve reads
/// without asking again. An acknowledging follower refuses votes until `election_tick` of its
/// ticks passed since it heard us, which was after we sent; its first tick may come right
/// after that, and a worker that fell behind applies a tick that was queued before the
/// heartbeat after it: hence two ticks less.
fn lease_duration(config: &NodeGroupConfig) -> Duration {
    let ticks = config.election_tick.saturating_sub(2);
    config.tick_interval * u32::try_from(ticks).unwrap_or(u32::MAX)
}

/// Asks raft for a read index with a fresh context (see the module doc).
fn request_read_index(
    raw: &mut RawNode<GroupStorage>,
    replica: u64,
    reads: &Reads,
    r: &mut PendingRead,
    config: &NodeGroupConfig,
) {
    r.attempt += 1;
    r.waited = 0;
    let leader = raw.raft.state == raft::StateRole::Leader;
    r.renews = leader.then(|| {
        let until = Instant::now() + lease_duration(config);
        (raw.raft.term, until, reads.lease_epoch)
    });
    raw.read_index(context(replica, reads.incarnation, r.token, r.attempt));
}

impl Replica {
    pub(super) fn read(&mut self, token: u64, lease: bool, env: &Env<'_>, out: &mut Output) {
        // Once the target may have taken the keys over, this replica's view is not the latest.
        if self.merge_state().is_some() {
            out.complete(
                token,
                Err(Error::Busy("range is being merged; retry shortly")),
            );
            return;
        }
        if lease && !env.config.lease_reads {
            out.complete(
                token,
                Err(Error::InvalidCommand(
                    "lease reads are off on this node (lease_reads = false); read linearizably"
                        .into(),
                )),
            );
            return;
        }
        #[cfg(test)]
        if crate::sim::injected(crate::sim::Bug::LocalReads) {
            // The defect the simulator must catch: serve from local state, no read index.
            out.complete(token, Ok(Vec::new()));
            return;
        }
        if lease {
            if self.lease_holds() {
                let mut r = PendingRead::new(token);
                r.index = Some(self.raw.raft.raft_log.committed);
                self.reads.pending.push(r);
                self.complete_reads(env, out);
                return;
            }
            if !self.is_leader() {
                out.complete(
                    token,
                    Err(Error::NotLeader {
                        range: self.range,
                        leader_hint: self.leader_hint(),
                    }),
                );
                return;
            }
            // A leader whose lease lapsed confirms its leadership with a quorum instead,
            // which renews the lease.
        }
        if self.raw.raft.leader_id == 0 {
            out.complete(
                token,
                Err(Error::NotLeader {
                    range: self.range,
                    leader_hint: None,
                }),
            );
            return;
        }
        let mut r = PendingRead::new(token);
        request_read_index(&mut self.raw, self.id, &self.reads, &mut r, env.config);
        self.reads.pending.push(r);
    }

    /// Whether this replica may serve a read now without asking a quorum.
    fn lease_holds(&self) -> bool {
        let raft = &self.raw.raft;
        let Some((term, until)) = self.reads.lease else {
            return false;
        };
        // `in_lease` checks check-quorum: without it followers do not refuse votes.
        raft.in_lease()
            && raft.commit_to_current_term()
            && raft.lead_transferee.is_none()
            && term == raft.term
            && Instant::now() < until
    }

    /// Asks again, each time with a new context, for read indexes that have not arrived
    /// within two heartbeat intervals: raft-rs does not resend a lost `MsgReadIndex` (or its
    /// answer), and a leader that has not committed in its term yet drops the request.
    pub(super) fn retry_reads(&mut self, ticks: u32, env: &Env<'_>) {
        let patience = (2 * env.config.heartbeat_tick) as u32;
        let reads = &mut self.reads;
        let mut pending = std::mem::take(&mut reads.pending);
        for r in pending.iter_mut().filter(|r| r.index.is_none()) {
            r.waited += ticks;
            if r.waited >= patience {
                request_read_index(&mut self.raw, self.id, reads, r, env.config);
            }
        }
        reads.pending = pending;
    }

    pub(super) fn on_read_states(&mut self, states: Vec<ReadState>) {
        let raft = &self.raw.raft;
        let reads = &mut self.reads;
        for rs in states {
            let Some((replica, incarnation, token, attempt)) = parse_context(&rs.request_ctx)
            else {
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
            // Only the latest attempt's send time is kept; an earlier attempt's answer
            // completes the read but does not renew the lease.
            if attempt != r.attempt {
                continue;
            }
            if let Some((term, until, epoch)) = r.renews {
                let leads = raft.state == raft::StateRole::Leader && raft.term == term;
                if leads && epoch == reads.lease_epoch {
                    let later = reads.lease.is_none_or(|(t, u)| t != term || u < until);
                    if later {
                        reads.lease = Some((term, until));
                    }
                }
            }
        }
    }

    /// Completes reads whose index has been applied.
    pub(super) fn complete_reads(&mut self, env: &Env<'_>, out: &mut Output) {
        let pending = &mut self.reads.pending;
        if pending.is_empty() {
            return;
        }
        let applied = self.raw.raft.raft_log.applied;
        pending.retain(|r| match r.index {
            Some(i) if i <= applied => {
                out.complete(r.token, Ok(Vec::new()));
                false
            }
            // A read whose caller gave up (timed out) is forgotten.
            _ => env.pending.contains(r.token),
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

    #[test]
    fn the_lease_is_two_ticks_shorter_than_the_election_timeout() {
        let config = NodeGroupConfig {
            tick_interval: Duration::from_millis(100),
            election_tick: 10,
            ..NodeGroupConfig::new(1)
        };
        assert_eq!(lease_duration(&config), Duration::from_millis(800));
        let tiny = NodeGroupConfig {
            election_tick: 2,
            heartbeat_tick: 1,
            ..config
        };
        assert_eq!(lease_duration(&tiny), Duration::ZERO);
    }
}
