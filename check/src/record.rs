//! The recorder that clients of a checked run share: one clock for every invocation and
//! completion (the checker compares times across clients), and the history, each operation
//! with the node it went through (to say where a violation was served). The nemesis suite's
//! clients and the in-memory cluster tests record into it; [`crate::check`] judges what it
//! holds.

use std::sync::Mutex;
use std::time::Instant;

use crate::{Op, Report};

/// Every operation of a run, with times on one clock. Shared between client tasks or threads
/// (behind an `Arc`); recording takes a short lock.
#[derive(Debug)]
pub struct Recorder {
    start: Instant,
    /// Each operation, with the node it went through.
    ops: Mutex<Vec<(Op, u64)>>,
}

impl Recorder {
    /// A recorder whose clock starts now.
    pub fn new() -> Recorder {
        Recorder {
            start: Instant::now(),
            ops: Mutex::new(Vec::new()),
        }
    }

    /// Nanoseconds since the start: take it just before invoking an operation and just after
    /// its answer, for [`Op::invoke_ns`] and [`Op::complete_ns`].
    pub fn now(&self) -> u64 {
        self.start.elapsed().as_nanos() as u64
    }

    /// Records `op`, which went through node `via` (for a retried operation: its last
    /// attempt's node).
    pub fn record(&self, op: Op, via: u64) {
        self.lock().push((op, via));
    }

    /// The history so far.
    pub fn ops(&self) -> Vec<Op> {
        self.lock().iter().map(|(op, _)| op.clone()).collect()
    }

    /// The history so far, each operation with its node.
    pub fn ops_via(&self) -> Vec<(Op, u64)> {
        self.lock().clone()
    }

    /// The node `op` went through.
    pub fn via(&self, op: &Op) -> Option<u64> {
        self.lock().iter().find(|(o, _)| o == op).map(|(_, n)| *n)
    }

    /// Checks the history so far (see [`crate::check`]).
    pub fn check(&self) -> Report {
        crate::check(&self.ops())
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<(Op, u64)>> {
        // A client that panicked while holding the lock left the history whole (a push is
        // the only thing done under it): keep recording.
        self.ops.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl Default for Recorder {
    fn default() -> Self {
        Recorder::new()
    }
}
