//! Completions of requests in flight: a token per request, a oneshot per token.
//!
//! The registry is per NodeGroup, not per replica, so an idle replica carries nothing for it.
//! Tokens travel inside raft entries (`RequestHeader::proposal_token`), so whichever replica
//! of this node applies the entry can complete it, including proposals forwarded to a leader
//! elsewhere. Requests whose outcome never arrives (lost with a deposed leader) are failed by
//! the ticker once their deadline passes.
//!
//! A batch of requests proposed as one entry has a *group* token besides its members' tokens:
//! the propose path tracks (and may fail) the entry by the group token, which fails every
//! member that is still waiting; the apply path completes each member with its own answer.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use dashmap::DashMap;
use tokio::sync::oneshot;

use crate::error::{Error, Result};

/// What a completed request yields: the state machine's answer (or an encoded descriptor
/// for admin requests; empty for read barriers).
pub(crate) type Answer = Result<Vec<u8>>;

#[derive(Debug)]
struct Entry {
    waiter: Waiter,
    deadline: Instant,
}

#[derive(Debug)]
enum Waiter {
    /// A caller waits on the receiver.
    One(oneshot::Sender<Answer>),
    /// The group token of a batch: an error fails these member tokens; a success completes
    /// nothing (each member is answered on its own).
    Group(Vec<u64>),
}

/// Requests waiting for their outcome.
#[derive(Debug, Default)]
pub(crate) struct Pending {
    next: AtomicU64,
    waiting: DashMap<u64, Entry>,
}

/// Bits of a token left to the counter within one life of the node; the bits above hold the
/// life (the engine's start count).
const TOKEN_COUNTER_BITS: u32 = 40;

impl Pending {
    /// Makes every token from now on unique across the node's lives: tokens are
    /// `life << 40 | n`. Without it a restarted node would hand out tokens 1, 2, ... again,
    /// and an entry its earlier life proposed with token 1, applied after the restart, would
    /// complete an unrelated new request with its answer (an acknowledgement of a write that
    /// never happened: the simulator's seed 3142).
    pub(crate) fn start_life(&self, life: u64) {
        self.next
            .store(life << TOKEN_COUNTER_BITS, Ordering::Relaxed);
    }

    /// Registers a request; the receiver resolves with its outcome.
    pub(crate) fn register(&self, timeout: Duration) -> (u64, oneshot::Receiver<Answer>) {
        let token = self.next.fetch_add(1, Ordering::Relaxed) + 1;
        let (tx, rx) = oneshot::channel();
        self.waiting.insert(
            token,
            Entry {
                waiter: Waiter::One(tx),
                deadline: Instant::now() + timeout,
            },
        );
        (token, rx)
    }

    /// Registers the group token of a batch whose members are `members` (registered already).
    pub(crate) fn register_group(&self, members: Vec<u64>, timeout: Duration) -> u64 {
        let token = self.next.fetch_add(1, Ordering::Relaxed) + 1;
        self.waiting.insert(
            token,
            Entry {
                waiter: Waiter::Group(members),
                deadline: Instant::now() + timeout,
            },
        );
        token
    }

    /// Delivers the outcome of `token`, if anyone still waits for it. Later completions of the
    /// same token are ignored, so several paths may race to complete it.
    pub(crate) fn complete(&self, token: u64, answer: Answer) {
        if let Some((_, e)) = self.waiting.remove(&token) {
            match e.waiter {
                Waiter::One(tx) => {
                    let _ = tx.send(answer);
                }
                Waiter::Group(members) => {
                    if let Err(err) = answer {
                        for m in members {
                            self.complete(m, Err(err.clone()));
                        }
                    }
                }
            }
        }
    }

    /// Whether `token` is still waiting.
    pub(crate) fn contains(&self, token: u64) -> bool {
        self.waiting.contains_key(&token)
    }

    /// Fails every request past its deadline with `ProposalDropped`.
    pub(crate) fn expire(&self, now: Instant) -> usize {
        let expired: Vec<u64> = self
            .waiting
            .iter()
            .filter(|e| e.deadline <= now)
            .map(|e| *e.key())
            .collect();
        for t in &expired {
            self.complete(*t, Err(Error::ProposalDropped));
        }
        expired.len()
    }

    /// Fails everything (shutdown).
    pub(crate) fn fail_all(&self, err: Error) {
        let all: Vec<u64> = self.waiting.iter().map(|e| *e.key()).collect();
        for t in all {
            self.complete(t, Err(err.clone()));
        }
    }

    pub(crate) fn len(&self) -> usize {
        self.waiting.len()
    }
}
