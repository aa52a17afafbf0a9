//! The raft worker pool: a few OS threads that handle ready replicas in rounds.
//!
//! One round: take up to `max_batch_replicas` cells off the ready queue; for each, step its
//! mailbox, tick, and collect its Ready into one WriteBatch (leader appends are sent right
//! away); write that batch with **one fsync**; then for each, send the messages that had to
//! wait for the fsync, advance raft, apply committed entries into one apply batch; write it
//! (synced when a split or merge applied); carry out the lifecycle effects that had to wait
//! for it; complete the waiting requests; hand every destination node its messages as one
//! batch.
//!
//! The worker is the only place that turns a replica's effects ([`Effect`]) into actions,
//! through `fsm::life`; the replica itself only reads its [`Env`](crate::replica::Env).
//!
//! A replica whose raft-rs panics (raft-rs aborts on inconsistent input) or whose store fails
//! is isolated: its requests fail with `ReplicaFailed`, the other groups of the node keep
//! running. A failed write of the round's batch is fatal for the replicas in it (they are
//! isolated), because continuing would acknowledge writes that are not on disk.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::Arc;

use crossbeam_channel::Receiver;
use flotilla_proto::RangeId;
use flotilla_store::WriteBatch;

use crate::error::Error;
use crate::fsm::life::{self, Guard};
use crate::fsm::mailbox::ReplicaCell;
use crate::fsm::shared::Shared;
use crate::replica::{Effect, Output, PeerMsg};

/// Body of one worker thread; returns when `stop` is disconnected (shutdown).
pub(crate) fn run(shared: Arc<Shared>, ready: Receiver<Arc<ReplicaCell>>, stop: Receiver<()>) {
    let mut out = Output::default();
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
        run_round(&shared, &cells, &mut out);
        metrics::counter!("flotilla_runtime_worker_rounds_total").increment(1);
        metrics::histogram!("flotilla_runtime_round_replicas").record(cells.len() as f64);
    }
}

/// An effect that waits until the round's apply batch is written, with the index of the cell
/// whose replica produced it.
type Deferred = (usize, Effect);

pub(crate) fn run_round(shared: &Shared, cells: &[Arc<ReplicaCell>], out: &mut Output) {
    let env = shared.env();
    let mut batch = shared.engine.batch();
    let mut held: Vec<(usize, Guard<'_>)> = Vec::with_capacity(cells.len());
    let mut again = vec![false; cells.len()];
    let mut deferred: Vec<Deferred> = Vec::new();

    // Phase 1: messages, ticks, Ready → one batch.
    for (i, cell) in cells.iter().enumerate() {
        let (msgs, ticks) = cell.take_work();
        let mut guard = cell.replica.lock();
        let Some(replica) = guard.as_mut() else {
            fail_msgs(msgs, out, Error::RangeNotFound(cell.range));
            continue;
        };
        let result = catch_unwind(AssertUnwindSafe(|| {
            crate::logger::in_group(cell.range, || {
                replica.on_msgs(msgs, &env, out);
                replica.on_ticks(ticks, &env, out);
                replica.collect_ready(&env, out, &mut batch)
            })
        }));
        let failed = outcome(result);
        carry_out(shared, i, cell, &mut guard, out, None, &mut deferred);
        match failed {
            None => held.push((i, guard)),
            Some(why) => life::isolate(shared, cell, &mut guard, out, &why),
        }
    }
    // Leader appends (and everything else that may precede the fsync) go out now.
    flush(shared, out);

    // The simulator's injected defect: acknowledge before the fsync.
    #[cfg(test)]
    let sync = !crate::sim::injected(crate::sim::Bug::AckBeforeSync);
    #[cfg(not(test))]
    let sync = true;
    if let Err(e) = shared.engine.write(batch, sync) {
        tracing::error!(
            "raft log write failed, isolating {} replicas: {e}",
            held.len()
        );
        for (i, mut guard) in held.drain(..) {
            life::isolate(shared, &cells[i], &mut guard, out, &e.to_string());
        }
    }

    // Phase 2: after the fsync.
    let mut apply_batch = shared.engine.batch();
    out.sync_apply = false;
    for (i, guard) in held.iter_mut() {
        let cell = &cells[*i];
        let Some(replica) = guard.as_mut() else {
            continue;
        };
        out.reschedule = false;
        let result = catch_unwind(AssertUnwindSafe(|| {
            crate::logger::in_group(cell.range, || {
                replica.after_persist(&env, out, &mut apply_batch)
            })
        }));
        let failed = outcome(result);
        again[*i] = out.reschedule;
        carry_out(
            shared,
            *i,
            cell,
            guard,
            out,
            Some(&mut apply_batch),
            &mut deferred,
        );
        if let Some(why) = failed {
            life::isolate(shared, cell, guard, out, &why);
        }
        if let Some(replica) = guard.as_ref() {
            life::settle(shared, cell, replica);
        }
    }
    for (range, index) in std::mem::take(&mut out.forced_compactions) {
        if let Some((_, guard)) = held.iter_mut().find(|(i, _)| cells[*i].range == range) {
            if let Some(r) = guard.as_mut() {
                if let Err(e) = r.compact_to(index, &mut apply_batch) {
                    tracing::warn!(%range, "forced compaction failed: {e}");
                }
            }
        }
    }
    // The applied data need not be synced: it is re-derived from the (synced) log after a
    // crash, and it is atomic with the applied index, so replay is exact. A split or merge is
    // the exception: what it creates or destroys must not exist before it is on disk.
    if let Err(e) = shared.engine.write(apply_batch, out.sync_apply) {
        tracing::error!("apply write failed, isolating {} replicas: {e}", held.len());
        for (i, guard) in held.iter_mut() {
            life::isolate(shared, &cells[*i], guard, out, &e.to_string());
        }
        deferred.clear();
    }
    // Effects that needed the apply batch on disk: new ranges of splits, merge hand-overs and
    // absorbed sources.
    for (i, effect) in deferred {
        let cell = &cells[i];
        match held.iter_mut().find(|(j, _)| *j == i) {
            Some((_, guard)) => carry_out_deferred(shared, cell, guard, out, effect),
            None => tracing::warn!(range = %cell.range, "effect of an isolated replica dropped"),
        }
    }
    finish(shared, out);
    flush(shared, out);
    drop(held);
    for (i, cell) in cells.iter().enumerate() {
        cell.release(&shared.ready_tx);
        if again[i] {
            cell.schedule(&shared.ready_tx);
        }
    }
}

/// What a phase's `catch_unwind` came to: `None` if it went well, else why the replica must be
/// isolated.
fn outcome(r: std::thread::Result<crate::error::Result<()>>) -> Option<String> {
    match r {
        Ok(Ok(())) => None,
        Ok(Err(e)) => Some(e.with_sources()),
        Err(panic) => Some(panic_message(&panic)),
    }
}

/// Carries out the effects the replica of `cell` produced in its last phase: those that may
/// happen now, now; the others after the apply batch is written.
fn carry_out(
    shared: &Shared,
    i: usize,
    cell: &ReplicaCell,
    guard: &mut Guard<'_>,
    out: &mut Output,
    mut apply_batch: Option<&mut WriteBatch>,
    deferred: &mut Vec<Deferred>,
) {
    for effect in std::mem::take(&mut out.effects) {
        match effect {
            Effect::Post(range, msg) => post(shared, range, msg),
            Effect::Route(desc) => {
                shared.router.upsert(desc);
            }
            Effect::SplitCandidate(range) => {
                shared.split_candidates.lock().insert(range.0);
            }
            Effect::Retire(desc) => {
                life::retire(shared, &desc, out);
            }
            Effect::Removed => match apply_batch.as_deref_mut() {
                Some(batch) => life::destroy_removed(shared, cell, guard, out, batch),
                None => tracing::error!(range = %cell.range, "removal outside the apply phase"),
            },
            later @ (Effect::CreateSplit { .. }
            | Effect::HandOver { .. }
            | Effect::MergedAway { .. }) => deferred.push((i, later)),
        }
    }
}

fn carry_out_deferred(
    shared: &Shared,
    cell: &ReplicaCell,
    guard: &mut Guard<'_>,
    out: &mut Output,
    effect: Effect,
) {
    match effect {
        Effect::CreateSplit {
            left,
            storage,
            replica_id,
            campaign,
        } => {
            if let Err(e) = life::create_split(shared, left, *storage, replica_id, campaign) {
                tracing::error!(parent = %cell.range, "cannot start the new range of a split: {}", e.with_sources());
            }
        }
        Effect::HandOver { prepare, target } => {
            life::hand_over(shared, cell, guard, out, prepare, target)
        }
        Effect::MergedAway {
            source,
            tombstone,
            merged,
        } => life::merged_away(shared, source, &tombstone, merged, out),
        other => tracing::error!(range = %cell.range, "effect {other:?} cannot wait"),
    }
}

/// Queues a message for a replica beside the one that asked for it.
fn post(shared: &Shared, range: RangeId, msg: PeerMsg) {
    if let Some(cell) = shared.cell(range) {
        // Merge steps are retried on ticks; they must not be lost to a full mailbox.
        let _ = cell.send(msg, usize::MAX, &shared.ready_tx);
    }
}

/// Hands each destination its batch. Failed deliveries and snapshot outcomes are reported
/// back to the sending replicas through their mailboxes. A transport that streams snapshots
/// reports their outcome itself once the transfer ends (see `Inbound`); here only a snapshot
/// it refused outright is reported, so every snapshot gets exactly one report.
fn flush(shared: &Shared, out: &mut Output) {
    if !out.tick_heartbeats.is_empty() {
        let mut pending = shared.tick_heartbeats.lock();
        for (node, hb) in out.tick_heartbeats.drain(..) {
            pending.entry(node).or_default().push(hb);
        }
    }
    let Some(transport) = shared.transport.get() else {
        out.outbox.clear();
        return;
    };
    let reports_snapshots = transport.reports_snapshots();
    for (node, outgoing) in std::mem::take(&mut out.outbox) {
        let mut batch = outgoing.batch;
        batch.from_node = shared.node.0;
        batch.to_node = node.0;
        let ok = transport.send(node, batch).is_ok();
        for (range, to, is_snapshot) in outgoing.meta {
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

fn finish(shared: &Shared, out: &mut Output) {
    if out.elections_won > 0 {
        let won = std::mem::take(&mut out.elections_won);
        shared
            .elections_won
            .fetch_add(won, std::sync::atomic::Ordering::Relaxed);
        metrics::counter!("flotilla_runtime_elections_won_total").increment(won);
    }
    out.overlay.clear();
    out.system_overlay.clear();
    out.client_records.clear();
    for (token, answer) in out.completions.drain(..) {
        shared.pending.complete(token, answer);
    }
}

fn fail_msgs(msgs: Vec<PeerMsg>, out: &mut Output, err: Error) {
    for token in msgs.iter().filter_map(PeerMsg::token) {
        out.complete(token, Err(err.clone()));
    }
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
