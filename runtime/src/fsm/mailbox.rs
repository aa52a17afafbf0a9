//! A replica's cell: its mailbox, the replica, and the scheduling flag.
//!
//! Scheduling protocol (TiKV's batch-system idea): whoever adds work to a cell sets
//! `notified`; only the one who flips it from false to true pushes the cell onto the ready
//! queue. The worker that pops it owns it until it clears `notified` at the end of its round
//! and re-checks for work that arrived meanwhile. So a cell is in the queue at most once, one
//! worker at a time handles a replica, and an idle replica costs no thread, task or channel.

use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::Arc;

use crossbeam_channel::Sender;
use flotilla_proto::meta::{RangeDescriptor, ReplicaDescriptor};
use flotilla_proto::RangeId;
use parking_lot::Mutex;
use raft::prelude::Message;

use crate::replica::Replica;

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
    /// A read barrier; completes once the replica may serve a read at `token`'s time.
    Read { token: u64, lease: bool },
    /// A membership change; the descriptor of the result completes `token`.
    ConfChange {
        token: u64,
        changes: Vec<crate::MembershipChange>,
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
    /// (forwarded to the target's leader whatever `forward_proposals` says).
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
    /// Compact the log up to the applied index now, so lagging followers get a snapshot.
    CompactLog { token: u64 },
    /// The transport could not deliver to `to` (a replica id).
    Unreachable { to: u64 },
    /// Outcome of sending a snapshot to `to`.
    SnapshotStatus { to: u64, ok: bool },
}

impl PeerMsg {
    /// The completion token of a client request, for messages that carry one.
    pub(crate) fn token(&self) -> Option<u64> {
        match self {
            PeerMsg::Propose { token, .. }
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

    /// Adds one tick and schedules the cell.
    pub(crate) fn tick(self: &Arc<Self>, ready: &Sender<Arc<ReplicaCell>>) {
        if self.failed.load(Ordering::Relaxed) {
            return;
        }
        // Saturate: a replica that falls far behind on ticks does not need all of them.
        let _ = self
            .ticks
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |t| {
                Some(t.saturating_add(1).min(64))
            });
        self.schedule(ready);
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
}
