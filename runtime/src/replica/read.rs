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

use raft::ReadState;

use super::{Env, Output, Replica};
use crate::error::Error;

/// A read waiting for its read index, then for the apply to reach it.
#[derive(Debug)]
pub(crate) struct PendingRead {
    pub(crate) token: u64,
    /// Set once raft returned the read index.
    index: Option<u64>,
    /// Ticks since the read index was (re)requested.
    waited: u32,
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
        if lease {
            if self.is_leader()
                && self.raw.raft.in_lease()
                && self.raw.raft.commit_to_current_term()
            {
                let index = self.raw.raft.raft_log.committed;
                self.reads.push(PendingRead {
                    token,
                    index: Some(index),
                    waited: 0,
                });
                self.complete_reads(env, out);
            } else {
                out.complete(
                    token,
                    Err(Error::NotLeader {
                        range: self.range,
                        leader_hint: self.leader_hint(),
                    }),
                );
            }
            return;
        }
        #[cfg(test)]
        if crate::sim::local_reads_injected() {
            // The defect the simulator must catch: serve from local state, no read index.
            out.complete(token, Ok(Vec::new()));
            return;
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
        self.raw.read_index(token.to_be_bytes().to_vec());
        self.reads.push(PendingRead {
            token,
            index: None,
            waited: 0,
        });
    }

    /// Asks again for read indexes that have not arrived within two heartbeat intervals:
    /// raft-rs does not resend a lost `MsgReadIndex` (or its answer), and a leader that has
    /// not committed in its term yet drops the request.
    pub(super) fn retry_reads(&mut self, ticks: u32, env: &Env<'_>) {
        let patience = (2 * env.config.heartbeat_tick) as u32;
        let mut again = Vec::new();
        for r in self.reads.iter_mut().filter(|r| r.index.is_none()) {
            r.waited += ticks;
            if r.waited >= patience {
                r.waited = 0;
                again.push(r.token);
            }
        }
        for token in again {
            self.raw.read_index(token.to_be_bytes().to_vec());
        }
    }

    pub(super) fn on_read_states(&mut self, states: Vec<ReadState>) {
        for rs in states {
            let Ok(bytes) = <[u8; 8]>::try_from(rs.request_ctx.as_slice()) else {
                continue;
            };
            let token = u64::from_be_bytes(bytes);
            if let Some(r) = self.reads.iter_mut().find(|r| r.token == token) {
                r.index = Some(rs.index);
            }
        }
    }

    /// Completes reads whose index has been applied.
    pub(super) fn complete_reads(&mut self, env: &Env<'_>, out: &mut Output) {
        if self.reads.is_empty() {
            return;
        }
        let applied = self.raw.raft.raft_log.applied;
        self.reads.retain(|r| match r.index {
            Some(i) if i <= applied => {
                out.complete(r.token, Ok(Vec::new()));
                false
            }
            // A read whose caller gave up (timed out) is forgotten.
            _ => env.pending.contains(r.token),
        });
        if self.reads.is_empty() {
            self.reads = Vec::new();
        }
    }
}
