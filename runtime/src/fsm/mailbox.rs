//! A replica's cell: its mailbox, the replica, and the scheduling flag.
//!
//! Scheduling protocol (TiKV's batch-system idea): whoever adds work to a cell sets
//! `notified`; only the one who flips it from false to true pushes the cell onto the ready
//! queue. The worker that pops it owns it until it clears `notified` at the end of its round
//! and re-checks for work that arrived meanwhile. So a cell is in the queue at most once, one
//! worker at a time handles a replica, and an idle replica costs no thread, task or channel.

use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::Arc;

use crate::replica::{PeerMsg, Replica};
use crossbeam_channel::Sender;
use flotilla_proto::RangeId;
use parking_lot::Mutex;

/// One replica and the state that schedules it.
pub(crate) struct ReplicaCell {
    pub(crate) range: RangeId,
    notified: AtomicBool,
    /// Ticks not yet given to raft. A counter, not mailbox messages, so that the ticker
    /// allocates nothing.
    ticks: AtomicU32,
    mailbox: Mutex<Vec<PeerMsg>>,
    /// `None` once the replica was destroyed (removed from the group) or isolated after a
    /// fault.
    pub(crate) replica: Mutex<Option<Replica>>,
    failed: AtomicBool,
    /// Whether the replica slept at the end of its last round (then it is out of the awake
    /// set). Written only by the worker that owns the cell (and by registration).
    asleep: AtomicBool,
    /// The node of the replica's leader as of its last round (0: none), as entered in the
    /// leader index.
    pub(crate) leader_node: AtomicU64,
    /// Whether the replica is counted in `Shared::settled` (awake, and its part in an
    /// election is over). Written only by the worker that owns the cell and by `take_out`.
    pub(crate) settled: AtomicBool,
}

impl std::fmt::Debug for ReplicaCell {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ReplicaCell")
            .field("range", &self.range)
            .field("notified", &self.notified.load(Ordering::Relaxed))
            .finish()
    }
}

/// Why a message could not be queued.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum SendError {
    /// The mailbox is at capacity.
    Full,
    /// The replica failed or was destroyed.
    Closed,
}

impl ReplicaCell {
    pub(crate) fn new(range: RangeId, replica: Replica) -> Arc<ReplicaCell> {
        Arc::new(ReplicaCell {
            range,
            notified: AtomicBool::new(false),
            ticks: AtomicU32::new(0),
            mailbox: Mutex::new(Vec::new()),
            replica: Mutex::new(Some(replica)),
            failed: AtomicBool::new(false),
            asleep: AtomicBool::new(false),
            leader_node: AtomicU64::new(0),
            settled: AtomicBool::new(false),
        })
    }

    /// Queues `msg` and schedules the cell. `capacity` bounds the mailbox.
    pub(crate) fn send(
        self: &Arc<Self>,
        msg: PeerMsg,
        capacity: usize,
        ready: &Sender<Arc<ReplicaCell>>,
    ) -> Result<(), SendError> {
        if self.failed.load(Ordering::Acquire) {
            return Err(SendError::Closed);
        }
        {
            let mut mb = self.mailbox.lock();
            if mb.len() >= capacity {
                return Err(SendError::Full);
            }
            mb.push(msg);
        }
        self.schedule(ready);
        Ok(())
    }

    /// Adds one tick and schedules the cell once `every` ticks have gathered (a round then
    /// steps them all; work that schedules the cell meanwhile takes them along).
    pub(crate) fn tick(self: &Arc<Self>, ready: &Sender<Arc<ReplicaCell>>, every: u32) {
        if self.failed.load(Ordering::Relaxed) {
            return;
        }
        // Saturate: a replica that falls far behind on ticks does not need all of them.
        let before = self
            .ticks
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |t| {
                Some(t.saturating_add(1).min(64))
            })
            .unwrap_or(0);
        if before.saturating_add(1) >= every {
            self.schedule(ready);
        }
    }

    /// Puts the cell on the ready queue unless it is already there or being handled.
    pub(crate) fn schedule(self: &Arc<Self>, ready: &Sender<Arc<ReplicaCell>>) {
        if !self.notified.swap(true, Ordering::AcqRel) {
            // The receiver only goes away at shutdown, when dropping work is intended.
            let _ = ready.send(self.clone());
        }
    }

    /// Takes everything queued (called by the worker that owns the cell).
    pub(crate) fn take_work(&self) -> (Vec<PeerMsg>, u32) {
        let msgs = std::mem::take(&mut *self.mailbox.lock());
        (msgs, self.ticks.swap(0, Ordering::AcqRel))
    }

    /// Ends the worker's ownership; reschedules if work arrived after `take_work`.
    pub(crate) fn release(self: &Arc<Self>, ready: &Sender<Arc<ReplicaCell>>) {
        self.notified.store(false, Ordering::Release);
        let has_work = !self.mailbox.lock().is_empty() || self.ticks.load(Ordering::Acquire) > 0;
        if has_work && !self.failed.load(Ordering::Acquire) {
            self.schedule(ready);
        }
    }

    /// Marks the replica as failed: no new work is accepted and what is queued is dropped.
    pub(crate) fn fail(&self) -> Vec<PeerMsg> {
        self.failed.store(true, Ordering::Release);
        std::mem::take(&mut *self.mailbox.lock())
    }

    pub(crate) fn is_failed(&self) -> bool {
        self.failed.load(Ordering::Acquire)
    }

    pub(crate) fn is_asleep(&self) -> bool {
        self.asleep.load(Ordering::Acquire)
    }

    /// Records whether the replica sleeps; true if that changed.
    pub(crate) fn set_asleep(&self, asleep: bool) -> bool {
        self.asleep.swap(asleep, Ordering::AcqRel) != asleep
    }
}
