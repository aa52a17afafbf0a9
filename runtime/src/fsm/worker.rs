//! The raft worker pool: a few OS threads that handle ready replicas in rounds.
//!
//! One round: take up to `max_batch_replicas` cells off the ready queue; for each, step its
//! mailbox, tick, and collect its Ready into one WriteBatch (leader appends are sent right
//! away); write that batch with **one fsync**; then for each, send the messages that had to
//! wait for the fsync, advance raft, apply committed entries into one apply batch; write it;
//! complete the waiting requests; hand every destination node its messages as one batch.
//!
//! A replica whose raft-rs panics (raft-rs aborts on inconsistent input) is isolated: its
//! requests fail with `ReplicaFailed`, the other groups of the node keep running. A failed
//! write of the round's batch is fatal for the replicas in it (they are isolated), because
//! continuing would acknowledge writes that are not on disk.

use std::collections::HashMap;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::Arc;

use crossbeam_channel::Receiver;
use flotilla_proto::command::ClientRecord;
use flotilla_proto::transport::{Heartbeat, NodeBatch, RaftMessage};
use flotilla_proto::{NodeId, RangeId};
use parking_lot::MutexGuard;

use crate::error::Error;
use crate::fsm::mailbox::{PeerMsg, ReplicaCell};
use crate::node_group::Shared;
use crate::pending::Answer;
use crate::replica::Replica;

/// What one round collects across replicas.
#[derive(Default)]
pub(crate) struct Round {
    outbox: HashMap<NodeId, Outgoing>,
    completions: Vec<(u64, Answer)>,
    /// Data keys written by entries applied earlier in this round.
    pub(crate) overlay: HashMap<Vec<u8>, Option<Vec<u8>>>,
    /// Client records written earlier in this round.
    pub(crate) client_records: HashMap<(u64, u64), ClientRecord>,
    /// Compactions requested through the API: (range, up to index).
    pub(crate) forced_compactions: Vec<(RangeId, u64)>,
    /// Set by a replica that has more to do right away.
    pub(crate) reschedule: bool,
    /// Plain heartbeats for the ticker to send (see `push_heartbeat`).
    tick_heartbeats: Vec<(NodeId, Heartbeat)>,
}

#[derive(Default)]
struct Outgoing {
    batch: NodeBatch,
    /// (range, to replica, is snapshot) of each message, for delivery reports.
    meta: Vec<(RangeId, u64, bool)>,
}

impl Round {
    pub(crate) fn complete(&mut self, token: u64, answer: Answer) {
        self.completions.push((token, answer));
    }

    pub(crate) fn push_message(
        &mut self,
        node: NodeId,
        msg: RaftMessage,
        is_snapshot: bool,
        range: RangeId,
        to: u64,
    ) {
        let out = self.outbox.entry(node).or_default();
        out.batch.messages.push(msg);
        out.meta.push((range, to, is_snapshot));
    }

    /// Queues a coalesced heartbeat. Plain heartbeats (no read-index context) wait for the
    /// ticker, which sends everything queued for a node pair as one message per tick, so
    /// that heartbeat RPCs do not grow with the number of groups; heartbeats that carry a
    /// read index context go with the round, because a linearizable read waits for them.
    pub(crate) fn push_heartbeat(&mut self, node: NodeId, hb: Heartbeat) {
        if hb.context.is_empty() {
            self.tick_heartbeats.push((node, hb));
        } else {
            self.outbox
                .entry(node)
                .or_default()
                .batch
                .heartbeats
                .push(hb);
        }
    }

    /// Hands each destination its batch. Failed deliveries and snapshot outcomes are reported
    /// back to the sending replicas through their mailboxes. A transport that streams
    /// snapshots reports their outcome itself once the transfer ends (see `Inbound`); here only
    /// a snapshot it refused outright is reported, so every snapshot gets exactly one report.
    fn flush(&mut self, shared: &Shared) {
        if !self.tick_heartbeats.is_empty() {
            let mut pending = shared.tick_heartbeats.lock();
            for (node, hb) in self.tick_heartbeats.drain(..) {
                pending.entry(node).or_default().push(hb);
            }
        }
        let Some(transport) = shared.transport.get() else {
            self.outbox.clear();
            return;
        };
        let reports_snapshots = transport.reports_snapshots();
        for (node, out) in self.outbox.drain() {
            let mut batch = out.batch;
            batch.from_node = shared.node.0;
            batch.to_node = node.0;
            let ok = transport.send(node, batch).is_ok();
            for (range, to, is_snapshot) in out.meta {
                let report = if is_snapshot {
                    (!ok || !reports_snapshots).then_some(PeerMsg::SnapshotStatus { to, ok })
                } else if !ok {
                    Some(PeerMsg::Unreachable { to })
                } else {
                    None
                };
                if let (Some(msg), Some(cell)) = (report, shared.cell(range)) {
                    let _ = cell.send(msg, usize::MAX, &shared.ready_tx);
                }
            }
            if !ok {
                metrics::counter!("flotilla_runtime_undeliverable_batches_total").increment(1);
            }
        }
    }

    fn finish(&mut self, shared: &Shared) {
        self.overlay.clear();
        self.client_records.clear();
        for (token, answer) in self.completions.drain(..) {
            shared.pending.complete(token, answer);
        }
    }
}

/// Body of one worker thread; returns when `stop` is disconnected (shutdown).
pub(crate) fn run(shared: Arc<Shared>, ready: Receiver<Arc<ReplicaCell>>, stop: Receiver<()>) {
    let mut round = Round::default();
    let max = shared.config.max_batch_replicas;
    loop {
        let first = crossbeam_channel::select! {
            recv(ready) -> c => match c { Ok(c) => c, Err(_) => return },
            recv(stop) -> _ => return,
        };
        if shared.is_stopped() {
            return;
        }
        let mut cells = vec![first];
        while cells.len() < max {
            match ready.try_recv() {
                Ok(c) => cells.push(c),
                Err(_) => break,
            }
        }
        run_round(&shared, &cells, &mut round);
        metrics::counter!("flotilla_runtime_worker_rounds_total").increment(1);
        metrics::histogram!("flotilla_runtime_round_replicas").record(cells.len() as f64);
    }
}

type Guard<'a> = MutexGuard<'a, Option<Replica>>;

fn run_round(shared: &Shared, cells: &[Arc<ReplicaCell>], round: &mut Round) {
    let mut batch = shared.engine.batch();
    let mut held: Vec<(usize, Guard<'_>)> = Vec::with_capacity(cells.len());
    let mut again = vec![false; cells.len()];

    // Phase 1: messages, ticks, Ready → one batch.
    for (i, cell) in cells.iter().enumerate() {
        let (msgs, ticks) = cell.take_work();
        let mut guard = cell.replica.lock();
        let Some(replica) = guard.as_mut() else {
            fail_msgs(msgs, round, Error::RangeNotFound(cell.range));
            continue;
        };
        let result = catch_unwind(AssertUnwindSafe(|| {
            replica.on_msgs(msgs, shared, round);
            replica.on_ticks(ticks, shared, round);
            replica.collect_ready(shared, round, &mut batch)
        }));
        match result {
            Ok(Ok(())) => held.push((i, guard)),
            Ok(Err(e)) => isolate(shared, cell, &mut guard, round, &e.to_string()),
            Err(panic) => isolate(shared, cell, &mut guard, round, &panic_message(&panic)),
        }
    }
    // Leader appends (and everything else that may precede the fsync) go out now.
    round.flush(shared);

    if let Err(e) = shared.engine.write(batch, true) {
        tracing::error!(
            "raft log write failed, isolating {} replicas: {e}",
            held.len()
        );
        for (i, mut guard) in held.drain(..) {
            isolate(shared, &cells[i], &mut guard, round, &e.to_string());
        }
    }

    // Phase 2: after the fsync.
    let mut apply_batch = shared.engine.batch();
    for (i, guard) in held.iter_mut() {
        let cell = &cells[*i];
        let Some(replica) = guard.as_mut() else {
            continue;
        };
        round.reschedule = false;
        let result = catch_unwind(AssertUnwindSafe(|| {
            replica.after_persist(shared, round, &mut apply_batch)
        }));
        match result {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                isolate(shared, cell, guard, round, &e.to_string());
                continue;
            }
            Err(panic) => {
                isolate(shared, cell, guard, round, &panic_message(&panic));
                continue;
            }
        }
        again[*i] = round.reschedule;
        if guard.as_ref().is_some_and(|r| r.is_removed()) {
            destroy(shared, cell, guard, round, &mut apply_batch);
        }
    }
    for (range, index) in std::mem::take(&mut round.forced_compactions) {
        if let Some((_, guard)) = held.iter_mut().find(|(i, _)| cells[*i].range == range) {
            if let Some(r) = guard.as_mut() {
                if let Err(e) = r.compact_to(index, &mut apply_batch) {
                    tracing::warn!(%range, "forced compaction failed: {e}");
                }
            }
        }
    }
    // The applied data need not be synced: it is re-derived from the (synced) log after a
    // crash, and it is atomic with the applied index, so replay is exact.
    if let Err(e) = shared.engine.write(apply_batch, false) {
        tracing::error!("apply write failed, isolating {} replicas: {e}", held.len());
        for (i, guard) in held.iter_mut() {
            isolate(shared, &cells[*i], guard, round, &e.to_string());
        }
    }
    // Merge sources that reached their prepare entry leave service now that what they applied
    // is written; their target absorbs them in its next round.
    for (i, guard) in held.iter_mut() {
        let Some(prepare) = guard.as_ref().and_then(|r| r.hand_over_index()) else {
            continue;
        };
        let Some(mut r) = guard.take() else { continue };
        r.abort_pending(round, Error::Busy("range is being merged; retry shortly"));
        let range = cells[*i].range;
        shared.handovers.insert(range.0, prepare);
        if let Some(target) = r.merge_target() {
            let _ = shared.post(target, PeerMsg::MergeResume);
        }
        tracing::debug!(%range, prepare, "merge source handed over to its target");
    }
    round.finish(shared);
    round.flush(shared);
    drop(held);
    for (i, cell) in cells.iter().enumerate() {
        cell.release(&shared.ready_tx);
        if again[i] {
            cell.schedule(&shared.ready_tx);
        }
    }
}

fn fail_msgs(msgs: Vec<PeerMsg>, round: &mut Round, err: Error) {
    for token in msgs.iter().filter_map(PeerMsg::token) {
        round.complete(token, Err(err.clone()));
    }
}

/// Takes a faulty replica out of service without touching the others.
fn isolate(
    shared: &Shared,
    cell: &ReplicaCell,
    guard: &mut Guard<'_>,
    round: &mut Round,
    why: &str,
) {
    tracing::error!(range = %cell.range, "replica failed and is isolated: {why}");
    metrics::counter!("flotilla_runtime_replica_failures_total").increment(1);
    if let Some(mut r) = guard.take() {
        r.abort_pending(round, Error::ReplicaFailed(cell.range));
    }
    let queued = cell.fail();
    fail_msgs(queued, round, Error::ReplicaFailed(cell.range));
    shared.router.remove(cell.range);
    shared.unregister(cell.range);
}

/// Removes a replica that an applied membership change took out of its group: tombstone
/// descriptor, raft state and the range's data deleted, in the round's apply batch.
fn destroy(
    shared: &Shared,
    cell: &ReplicaCell,
    guard: &mut Guard<'_>,
    round: &mut Round,
    batch: &mut flotilla_store::WriteBatch,
) {
    let Some(mut r) = guard.take() else {
        return;
    };
    // Proposals it appended may still commit under the next leader: outcome unknown.
    r.abort_pending(round, Error::ProposalDropped);
    if let Some(mut desc) = r.descriptor().cloned() {
        batch.destroy_group_state(cell.range);
        if let Err(e) = batch.clear_data_range(&desc.start_key, &desc.end_key) {
            tracing::warn!(range = %cell.range, "could not clear data of removed replica: {e}");
        }
        desc.state = flotilla_proto::meta::RangeState::Tombstone as i32;
        batch.put_descriptor(&desc);
        shared
            .tombstones
            .insert(cell.range.0, desc.epoch_or_default().conf_ver);
    }
    let queued = cell.fail();
    fail_msgs(queued, round, Error::RangeNotFound(cell.range));
    shared.router.remove(cell.range);
    shared.unregister(cell.range);
    tracing::info!(range = %cell.range, "replica removed from its group and destroyed");
}

fn panic_message(p: &Box<dyn std::any::Any + Send>) -> String {
    if let Some(s) = p.downcast_ref::<&str>() {
        format!("panic: {s}")
    } else if let Some(s) = p.downcast_ref::<String>() {
        format!("panic: {s}")
    } else {
        "panic".to_string()
    }
}
