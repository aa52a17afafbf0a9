//! One home for a replica's life on this node: every way a replica comes to exist here and
//! every way it leaves, one function per transition (TiKV raftstore-v2's `operation/life.rs`
//! is the model). Nothing else registers, unregisters or tombstones a replica.
//!
//! Creation: [`bootstrap`] (a new range's initial membership), [`recover`] (a restart),
//! [`create_split`] (the right half of an applied split), [`create_by_message`] (a member of
//! a group this node does not host yet, uninitialized until a snapshot arrives).
//!
//! Departure: [`isolate`] (a fault in this replica), [`destroy_removed`] (a membership change
//! removed it), [`hand_over`] (a merge source reached its prepare entry), [`merged_away`] (the
//! target absorbed that source), [`retire`] (a snapshot of a range that absorbed it in a merge
//! this node missed), [`seal_uninitialized`] (an uninitialized replica replaced by a
//! bootstrap or a split), and [`retire_stale`] (another replica was forced to continue its
//! range without this one: unsafe recovery).
//!
//! Replacement in place: [`force_alone`] (unsafe recovery: the replica continues as the only
//! voter of a new membership; see `replica::recover`).
//!
//! Invariants kept here:
//! - A tombstone is written with the removal, in the same batch as the removal's other
//!   writes; the tombstone's conf_ver keeps messages of that membership era from recreating
//!   the replica.
//! - An uninitialized replica replaced by a bootstrap or a split is sealed first (it never
//!   runs again, so it cannot vote again or write its placeholder over the new state), and the
//!   new replica keeps its term and vote, so this node never votes twice in a term.
//! - Taking a replica out always does the same four things: fail its cell (no new work), answer
//!   what was queued for it, unregister it, drop it from the router.
//! - Creation by message does no I/O: its placeholder joins the replica's first round's batch.

use std::collections::BTreeSet;
use std::sync::Arc;

use flotilla_proto::meta::{RangeDescriptor, RangeEpoch, RangeState, ReplicaRole};
use flotilla_proto::{NodeId, RangeId};
use flotilla_store::{GroupStorage, WriteBatch, SPLIT_INIT_INDEX, SPLIT_INIT_TERM};
use parking_lot::MutexGuard;
use raft::prelude::{ConfState, HardState};

use crate::api::ForcedRange;
use crate::error::{Error, RecoveryRefusal, Result};
use crate::fsm::liveness::Wake;
use crate::fsm::mailbox::ReplicaCell;
use crate::fsm::shared::Shared;
use crate::replica::{Existing, Host, Output, PeerMsg, Replica};

/// A worker's hold on a replica during its round.
pub(crate) type Guard<'a> = MutexGuard<'a, Option<Replica>>;

// ---- creation ----

/// Creates this node's replicas of new ranges with the initial memberships in `descs`, with
/// one synced write (as etcd's initial cluster, every listed replica is created the same way
/// on its node). Idempotent for an existing identical range. An uninitialized replica that a
/// peer's message created first is replaced, keeping its term and vote.
///
/// `first_leader` names, per range, the replica that should lead it first (if any): every
/// replica prefers it (`replica::placement`). With hibernation the replicas start asleep, so
/// that creating many groups does not make them all tick: the chosen leader's replica is
/// queued to campaign, the others wait for its vote request, and wake by themselves (paced,
/// after the liveness window) only if no leader showed up (see `fsm::liveness`). Ranges without
/// a chosen leader queue every replica to wake at once (paced), and elect on their timeouts.
pub(crate) fn bootstrap(
    shared: &Shared,
    descs: Vec<RangeDescriptor>,
    first_leader: &dyn Fn(&RangeDescriptor) -> Option<u64>,
    seed: Option<&crate::system::SystemSeed>,
) -> Result<()> {
    if seed.is_some() != descs.iter().any(|d| d.id().is_system()) {
        return Err(Error::AdminRefused(
            "the system range is bootstrapped with its seed, and only with it".into(),
        ));
    }
    let _creating = shared.create_lock.lock();
    // Check everything before changing anything.
    let mut planned: Vec<(RangeDescriptor, u64, Option<Arc<ReplicaCell>>)> = Vec::new();
    for desc in descs {
        let me = desc
            .replica_on(shared.node)
            .ok_or_else(|| {
                Error::AdminRefused(format!("{} has no replica on {}", desc.id(), shared.node))
            })?
            .replica_id;
        if desc.range_id == 0 || me == 0 {
            return Err(Error::AdminRefused(
                "range and replica ids must be non-zero".into(),
            ));
        }
        let mut replaces = None;
        if let Some(existing) = shared.cell(desc.id()) {
            match existing.replica.lock().as_ref() {
                Some(r) if r.is_initialized() => {
                    let same = r.descriptor().is_some_and(|d| {
                        d.start_key == desc.start_key && d.end_key == desc.end_key
                    });
                    if same {
                        continue;
                    }
                    return Err(Error::AdminRefused(format!("{} already exists", desc.id())));
                }
                Some(_) => replaces = Some(existing.clone()),
                None => {}
            }
        }
        let clash = !desc.id().is_system()
            && !shared
                .router
                .overlapping(&desc.start_key, &desc.end_key)
                .is_empty();
        if clash {
            return Err(Error::AdminRefused(format!(
                "{} overlaps a range already hosted on {}",
                desc.id(),
                shared.node
            )));
        }
        planned.push((desc, me, replaces));
    }
    // The new ranges must not overlap each other nor repeat an id: sorted by start key, any
    // overlap shows between neighbours (linear after the sort: a layout has 100,000 ranges).
    let mut order: Vec<&RangeDescriptor> = planned.iter().map(|(d, _, _)| d).collect();
    order.sort_by(|a, b| a.start_key.cmp(&b.start_key));
    let mut ids = std::collections::HashSet::with_capacity(order.len());
    for (i, d) in order.iter().enumerate() {
        let overlaps_next = order
            .get(i + 1)
            .is_some_and(|next| crate::router::overlaps(d, next));
        if overlaps_next || !ids.insert(d.range_id) {
            return Err(Error::AdminRefused(format!(
                "{} overlaps another range of the same bootstrap, or repeats its id",
                d.id()
            )));
        }
    }
    let mut batch = shared.engine.batch();
    let mut created = Vec::with_capacity(planned.len());
    for (mut desc, me, replaces) in planned {
        desc.state = RangeState::Normal as i32;
        if desc.epoch.is_none() {
            desc.epoch = Some(RangeEpoch {
                conf_ver: 1,
                version: 1,
            });
        }
        // The replica a message created may have been initialized by a snapshot since it was
        // checked: then it holds the group's own state, newer than a bootstrap, and stays.
        let carried = match replaces.map(|_| seal(shared, desc.id(), true)) {
            Some(Existing::Initialized) => continue,
            Some(Existing::Uninitialized(hs)) => Some(hs),
            _ => None,
        };
        let mut storage = GroupStorage::initialize(
            shared.engine.clone(),
            desc.clone(),
            conf_state_of(&desc),
            SPLIT_INIT_INDEX,
            SPLIT_INIT_TERM,
            &mut batch,
        );
        if let Some(hs) = &carried {
            storage.adopt_vote(hs, &mut batch);
        }
        // The system range starts with its records, in the same synced write as its state:
        // never a system range without counters. (Not when it existed already: its
        // counters have moved on.)
        if let (true, Some(seed)) = (desc.id().is_system(), seed) {
            for (name, value) in seed.records() {
                batch.put_system_record(&name, &value);
            }
        }
        created.push((desc, me, storage));
    }
    shared.engine.write(batch, true)?;
    let mut wakes = Vec::new();
    for (desc, me, storage) in created {
        let range = desc.id();
        let first = first_leader(&desc);
        let mut replica = Replica::open(storage, me, shared.node, &shared.config, &shared.logger)?;
        if let Some(leader) = first {
            replica.prefer_leader(leader);
        }
        let leader_node = first.and_then(|l| desc.replicas.iter().find(|r| r.replica_id == l));
        let leader_node = leader_node.map(|r| NodeId(r.node_id));
        if shared.config.hibernate {
            replica.start_asleep();
        }
        let routed = replica.shared_descriptor();
        register(shared, ReplicaCell::new(range, replica));
        shared.router.upsert(routed.unwrap_or_else(|| desc.into()));
        wakes.push((range, first == Some(me), leader_node));
    }
    // After every replica is registered, so that a wake never misses its cell.
    let live = &shared.liveness;
    for (range, campaign, leader_node) in wakes {
        match (shared.config.hibernate, campaign, leader_node) {
            (false, true, _) => {
                let _ = shared.post(range, PeerMsg::Campaign);
            }
            (false, false, _) => {}
            (true, true, _) => live.defer_wake(range, Wake::Campaign, 0),
            (true, false, Some(node)) => {
                live.defer_wake(range, Wake::Unled(node), shared.config.down_ticks())
            }
            (true, false, None) => live.queue_wake(range, Wake::Up),
        }
    }
    Ok(())
}

/// Recreates every replica stored in the engine (a restart).
pub(crate) fn recover(shared: &Shared) -> Result<()> {
    let started = std::time::Instant::now();
    // Before any request can register: tokens must not repeat an earlier life's.
    shared.pending.start_life(shared.engine.next_start()?);
    for d in shared.engine.descriptors()? {
        if d.state == RangeState::Tombstone as i32 {
            shared
                .tombstones
                .insert(d.range_id, d.epoch_or_default().conf_ver);
        }
    }
    let groups = shared.engine.recover()?;
    let read = started.elapsed();
    let count = groups.len();
    for rec in groups {
        let range = rec.group;
        let Some(desc) = rec.descriptor.clone() else {
            tracing::warn!(%range, "raft state without a descriptor; skipping");
            continue;
        };
        if desc.state == RangeState::Tombstone as i32 {
            continue;
        }
        let Some(me) = desc.replica_on(shared.node).map(|r| r.replica_id) else {
            tracing::warn!(%range, "descriptor has no replica on this node; skipping");
            continue;
        };
        let initialized = desc.state == RangeState::Normal as i32;
        let storage = GroupStorage::recover(shared.engine.clone(), rec)?;
        let mut replica = Replica::open(storage, me, shared.node, &shared.config, &shared.logger)?;
        // Recovered replicas start asleep, so that a restart of a node with many groups does
        // not make them all tick and campaign at once. Only a replica that voted for itself in
        // its last term can have been the leader the others still wait for (they may not have
        // noticed the restart): it is woken, paced by the awake-set bound, and campaigns at
        // once (its leadership, if it had one, ended with the restart, and waiting out an
        // election timeout awake is what made the pace slow: 1,600 groups a second at 100,000
        // groups per node), without pre-vote (`Replica::campaign_without_pre_vote`: the
        // followers of a leader the others elected meanwhile ignore its vote by raft's lease
        // check, and the pre-vote's round trip was a third of each election's messages); the
        // followers that took it for their leader forget it when it campaigns
        // (`replica::on_raft_message`). The
        // rest sleep until their leader writes to them (a leader with an unmatched follower
        // stays awake), its node wakes the groups it leads on seeing this node back up, a
        // request arrives, or liveness declares their leader's node down: the replica they
        // voted for is presumed their leader, in the leader index, until they learn better.
        // A replica holding entries it does not know committed is woken too: its leader may
        // have put the group to sleep while this node was down and restarting faster than
        // liveness noticed, its sleep notice (the commit) lost, and nothing would wake it.
        let mut presumed = None;
        if shared.config.hibernate {
            replica.start_asleep();
            let vote = replica.hard_state().vote;
            if vote == me {
                shared.liveness.defer_wake(range, Wake::Campaign, 0);
            } else if replica.holds_uncommitted() {
                shared.liveness.defer_wake(range, Wake::Up, 0);
            }
            if vote != me {
                presumed = desc
                    .replicas
                    .iter()
                    .find(|r| r.replica_id == vote && r.node_id != shared.node.0)
                    .map(|r| r.node_id);
            }
        }
        let routed = replica.shared_descriptor();
        let cell = ReplicaCell::new(range, replica);
        if let Some(node) = presumed {
            cell.leader_node
                .store(node, std::sync::atomic::Ordering::Release);
            shared.liveness.move_leader(range, 0, node, shared.node);
        }
        register(shared, cell);
        if initialized {
            shared.router.upsert(routed.unwrap_or_else(|| desc.into()));
        }
    }
    tracing::info!(
        node = %shared.node,
        replicas = count,
        read = ?read,
        took = ?started.elapsed(),
        "recovered replicas from the store"
    );
    Ok(())
}

/// Creates the right half of a split whose apply batch (with `storage`'s initial state) is on
/// disk, publishes both halves, and on the parent's leader starts the new group's election.
pub(crate) fn create_split(
    shared: &Shared,
    left: Arc<RangeDescriptor>,
    storage: GroupStorage,
    replica_id: u64,
    campaign: bool,
) -> Result<()> {
    let right = storage
        .shared_descriptor()
        .ok_or(Error::RangeNotFound(storage.group()))?;
    let mut replica = Replica::open(
        storage,
        replica_id,
        shared.node,
        &shared.config,
        &shared.logger,
    )?;
    if campaign {
        replica.campaign_soon();
    }
    // A sealed uninitialized replica of the range is replaced here.
    register(shared, ReplicaCell::new(right.id(), replica));
    shared.router.upsert(left);
    shared.router.upsert(right.clone());
    if campaign {
        let _ = shared.post(right.id(), PeerMsg::Campaign);
    }
    Ok(())
}

/// Creates an uninitialized replica `replica_id` of `range` for a message from one of its
/// members (the caller checked that). No I/O: the placeholder descriptor that makes it survive
/// a restart is written with its first round's batch, before raft can vote.
pub(crate) fn create_by_message(
    shared: &Shared,
    range: RangeId,
    replica_id: u64,
) -> Option<Arc<ReplicaCell>> {
    let _creating = shared.create_lock.lock();
    if let Some(cell) = shared.cell(range) {
        return Some(cell);
    }
    let replica = match Replica::open_uninitialized(
        shared.engine.clone(),
        range,
        replica_id,
        shared.node,
        &shared.config,
        &shared.logger,
    ) {
        Ok(r) => r,
        Err(e) => {
            tracing::error!(%range, "cannot create replica: {e}");
            return None;
        }
    };
    let cell = ReplicaCell::new(range, replica);
    register(shared, cell.clone());
    metrics::counter!("flotilla_runtime_replicas_created_total", "by" => "message").increment(1);
    Some(cell)
}

// ---- departure ----

/// Takes an uninitialized replica of `range` out of service for a bootstrap or split that
/// replaces it, returning its hard state; leaves an initialized one alone. Never blocks on a
/// replica held by a round: that one is `Busy` and the caller tries again later.
pub(crate) fn seal_uninitialized(shared: &Shared, range: RangeId) -> Existing {
    seal(shared, range, false)
}

/// [`seal_uninitialized`]; with `block` it waits for a round that holds the replica (only for
/// callers that hold no replica themselves: a worker would deadlock on its own round's).
fn seal(shared: &Shared, range: RangeId, block: bool) -> Existing {
    let Some(cell) = shared.cell(range) else {
        return Existing::Absent;
    };
    let guard = if block {
        Some(cell.replica.lock())
    } else {
        cell.replica.try_lock()
    };
    let Some(mut guard) = guard else {
        return Existing::Busy;
    };
    let hard_state: HardState = match guard.as_ref() {
        None => return Existing::Absent,
        Some(r) if r.is_initialized() => return Existing::Initialized,
        Some(r) => r.hard_state(),
    };
    let mut out = Output::default();
    if let Some(mut r) = guard.take() {
        r.abort_pending(&mut out, Error::RangeNotFound(range));
    }
    drop(guard);
    // The failed cell stays registered until its replacement is, so that a message meanwhile
    // finds it (and is dropped) instead of creating yet another replica.
    answer_queued(&cell, &mut out, Error::RangeNotFound(range));
    for (token, answer) in out.completions {
        shared.pending.complete(token, answer);
    }
    Existing::Uninitialized(hard_state)
}

/// Takes a faulty replica out of service without touching the others.
pub(crate) fn isolate(
    shared: &Shared,
    cell: &ReplicaCell,
    guard: &mut Guard<'_>,
    out: &mut Output,
    why: &str,
) {
    tracing::error!(range = %cell.range, "replica failed and is isolated: {why}");
    metrics::counter!("flotilla_runtime_replica_failures_total").increment(1);
    if let Some(mut r) = guard.take() {
        r.abort_pending(out, Error::ReplicaFailed(cell.range));
    }
    take_out(shared, cell, out, Error::ReplicaFailed(cell.range));
}

/// Removes a replica that an applied membership change took out of its group: tombstone,
/// raft state and the range's data deleted, in the round's apply batch.
pub(crate) fn destroy_removed(
    shared: &Shared,
    cell: &ReplicaCell,
    guard: &mut Guard<'_>,
    out: &mut Output,
    batch: &mut WriteBatch,
) {
    let Some(mut r) = guard.take() else {
        return;
    };
    // Proposals it appended may still commit under the next leader: outcome unknown.
    r.abort_pending(out, Error::ProposalDropped);
    if let Some(desc) = r.descriptor().cloned() {
        batch.destroy_group_state(cell.range);
        if let Err(e) = batch.clear_data_range(&desc.start_key, &desc.end_key) {
            tracing::warn!(range = %cell.range, "could not clear data of removed replica: {e}");
        }
        tombstone(shared, desc, batch);
    }
    take_out(shared, cell, out, Error::RangeNotFound(cell.range));
    tracing::info!(range = %cell.range, "replica removed from its group and destroyed");
}

/// A merge source that applied up to its prepare entry leaves service (its apply batch is
/// written); the target beside it absorbs it in its next round.
pub(crate) fn hand_over(
    shared: &Shared,
    cell: &ReplicaCell,
    guard: &mut Guard<'_>,
    out: &mut Output,
    prepare: u64,
    target: RangeId,
) {
    let Some(mut r) = guard.take() else {
        return;
    };
    r.abort_pending(out, Error::Busy("range is being merged; retry shortly"));
    shared.handovers.insert(cell.range.0, prepare);
    let _ = shared.post(target, PeerMsg::MergeResume);
    tracing::debug!(range = %cell.range, prepare, "merge source handed over to its target");
}

/// The target absorbed `source` (its tombstone is on disk with the merge): the source leaves
/// the registry and the merged range is published.
pub(crate) fn merged_away(
    shared: &Shared,
    source: RangeId,
    tombstone: &RangeDescriptor,
    merged: Arc<RangeDescriptor>,
    out: &mut Output,
) {
    shared.handovers.remove(&source.0);
    shared
        .tombstones
        .insert(source.0, tombstone.epoch_or_default().conf_ver);
    // Published first, so that the source's keys are never without a range.
    shared.router.upsert(merged);
    if let Some(cell) = shared.cell(source) {
        take_out(shared, &cell, out, Error::RangeNotFound(source));
    }
    metrics::counter!("flotilla_runtime_merges_total").increment(1);
}

/// Takes the replica of a range that another range absorbed out of service: tombstone and
/// raft state written (synced) at once; its keys stay for the absorbing range's snapshot,
/// which replaces them. False if the replica is busy in another round (raft sends the
/// snapshot again, and this is tried again then).
pub(crate) fn retire(shared: &Shared, desc: &RangeDescriptor, out: &mut Output) -> bool {
    let id = desc.id();
    let Some(cell) = shared.cell(id) else {
        shared.router.remove(id);
        return true;
    };
    let Some(mut guard) = cell.replica.try_lock() else {
        return false;
    };
    let mut batch = shared.engine.batch();
    batch.destroy_group_state(id);
    tombstone(shared, desc.clone(), &mut batch);
    if let Err(e) = shared.engine.write(batch, true) {
        tracing::error!(range = %id, "cannot retire an absorbed replica: {e}");
        shared.tombstones.remove(&id.0);
        return false;
    }
    if let Some(mut r) = guard.take() {
        r.abort_pending(out, Error::RangeNotFound(id));
    }
    drop(guard);
    shared.handovers.remove(&id.0);
    take_out(shared, &cell, out, Error::RangeNotFound(id));
    metrics::counter!("flotilla_runtime_replicas_retired_total").increment(1);
    tracing::info!(range = %id, "replica retired: a snapshot of the range that absorbed it arrived");
    true
}

// ---- unsafe recovery ----

/// Forces this node's replica of `range` to continue as the only voter of a new membership
/// because the `lost` nodes, gone for good, hold a majority of its voters (see
/// `replica::recover` for the checks and the rewrite). The replica is taken out of its cell,
/// its storage rewritten with one synced write, and a new replica opened over that storage is
/// put back into the same cell: registration, mailbox and router entry stay, so no request or
/// message finds the range missing meanwhile. The new replica is awake (never left asleep)
/// and told to campaign; what the old one waited on is answered `ProposalDropped` (its
/// proposals may still commit: the new membership commits the whole log).
///
/// Blocks while a round holds the replica: call it off the workers.
///
/// # Errors
///
/// `RangeNotFound`, `ReplicaFailed` (isolated before), `RecoveryRefused` (nothing changed),
/// or a store failure: then the replica is isolated (its disk state is the old one if the
/// write failed; a restart serves it again).
pub(crate) fn force_alone(
    shared: &Shared,
    range: RangeId,
    lost: &BTreeSet<NodeId>,
    expect_conf_ver: Option<u64>,
    min_conf_ver: u64,
) -> Result<ForcedRange> {
    let cell = shared.cell(range).ok_or(Error::RangeNotFound(range))?;
    let mut guard = cell.replica.lock();
    let alone = guard
        .as_ref()
        .ok_or(Error::ReplicaFailed(range))?
        .plan_alone(lost, expect_conf_ver, min_conf_ver)?;
    let me = alone.forced.replica_id;
    let mut out = Output::default();
    let mut old = guard.take().expect("checked above");
    old.abort_pending(&mut out, Error::ProposalDropped);
    let mut storage = old.into_storage();
    let mut batch = shared.engine.batch();
    let reopened = alone
        .write(&mut storage, &mut batch)
        .and_then(|desc| Ok((desc, shared.engine.write(batch, true)?)))
        .and_then(|(desc, ())| {
            Replica::open(storage, me, shared.node, &shared.config, &shared.logger)
                .map(|r| (desc, r))
        });
    let (desc, replica) = match reopened {
        Ok(done) => done,
        Err(e) => {
            tracing::error!(%range, "forcing the replica alone failed; it is isolated: {}", e.with_sources());
            metrics::counter!("flotilla_runtime_replica_failures_total").increment(1);
            take_out(shared, &cell, &mut out, Error::ReplicaFailed(range));
            drop(guard);
            complete(shared, out);
            return Err(e);
        }
    };
    let replica = guard.insert(replica);
    shared.router.upsert(desc);
    // Awake (the old one may have slept), and out of the leader index under a lost node.
    settle(shared, &cell, replica);
    drop(guard);
    complete(shared, out);
    let _ = shared.post(range, PeerMsg::Campaign);
    let f = &alone.forced;
    tracing::warn!(
        %range, replica = me, commit = f.commit, last_index = f.last_index,
        neutralized = ?f.neutralized, lost = ?lost,
        "unsafe recovery: replica forced to continue as the only voter; writes the lost nodes \
         acknowledged beyond its log are gone"
    );
    metrics::counter!("flotilla_runtime_forced_recoveries_total").increment(1);
    Ok(alone.forced)
}

/// Destroys this node's replica of `range` because another replica was forced to continue
/// the range without it (unsafe recovery): its membership, older than `newer_conf_ver`, is
/// gone. Raft state and (for an initialized replica) the range's data are deleted and a
/// tombstone at `newer_conf_ver` written, synced: no message of the old membership recreates
/// it, while a replica the new membership adds here later (a higher conf_ver) is created as
/// usual. An isolated replica can be retired too.
///
/// Blocks while a round holds the replica: call it off the workers.
///
/// # Errors
///
/// `RangeNotFound`, `RecoveryRefused` (`NotStale`: nothing changed), a store failure.
pub(crate) fn retire_stale(shared: &Shared, range: RangeId, newer_conf_ver: u64) -> Result<()> {
    let cell = shared.cell(range).ok_or(Error::RangeNotFound(range))?;
    let mut guard = cell.replica.lock();
    let desc = match guard.as_ref() {
        Some(r) => r.descriptor().cloned(),
        None => shared.engine.descriptor(range)?,
    };
    let conf_ver = desc.as_ref().map_or(0, |d| d.epoch_or_default().conf_ver);
    if conf_ver >= newer_conf_ver {
        return Err(Error::RecoveryRefused {
            range,
            why: RecoveryRefusal::NotStale {
                conf_ver,
                newer: newer_conf_ver,
            },
        });
    }
    let mut desc = desc.unwrap_or_else(|| RangeDescriptor {
        range_id: range.0,
        ..Default::default()
    });
    let mut batch = shared.engine.batch();
    batch.destroy_group_state(range);
    // Only an initialized replica has data, and the system range's records are not user keys
    // (a later replica of it here installs a snapshot over them).
    if desc.state == RangeState::Normal as i32 && !range.is_system() {
        batch.clear_data_range(&desc.start_key, &desc.end_key)?;
    }
    desc.epoch = Some(RangeEpoch {
        conf_ver: newer_conf_ver,
        ..desc.epoch_or_default()
    });
    desc.state = RangeState::Tombstone as i32;
    batch.put_descriptor(&desc);
    shared.engine.write(batch, true)?;
    shared.tombstones.insert(range.0, newer_conf_ver);
    let mut out = Output::default();
    if let Some(mut r) = guard.take() {
        r.abort_pending(&mut out, Error::RangeNotFound(range));
    }
    drop(guard);
    shared.handovers.remove(&range.0);
    take_out(shared, &cell, &mut out, Error::RangeNotFound(range));
    complete(shared, out);
    tracing::warn!(%range, conf_ver, newer_conf_ver, "unsafe recovery: stale replica retired");
    Ok(())
}

/// Answers the requests an `Output` filled outside a round.
fn complete(shared: &Shared, out: Output) {
    for (token, answer) in out.completions {
        shared.pending.complete(token, answer);
    }
}

/// The replicas' questions about their neighbours, answered from the registry.
impl Host for Shared {
    fn hosts(&self, range: RangeId) -> bool {
        self.replicas.contains_key(&range.0)
    }

    fn handed_over(&self, range: RangeId) -> Option<u64> {
        self.handovers.get(&range.0).map(|p| *p)
    }

    fn seal_uninitialized(&self, range: RangeId) -> Existing {
        seal_uninitialized(self, range)
    }

    fn node_live(&self, node: NodeId) -> Option<bool> {
        Shared::node_live(self, node)
    }
}

/// After a round of `cell`: moves it in or out of the awake set as its replica woke or slept,
/// and keeps the leader index up to date.
pub(crate) fn settle(shared: &Shared, cell: &Arc<ReplicaCell>, replica: &Replica) {
    let asleep = replica.is_asleep();
    count_settled(shared, cell, !asleep && replica.election_over());
    if cell.set_asleep(asleep) {
        if asleep {
            shared.awake.remove(&cell.range.0);
        } else {
            shared.awake.insert(cell.range.0, cell.clone());
            // Taken out meanwhile (retired by another round): do not keep it ticking.
            if cell.is_failed() {
                shared.awake.remove(&cell.range.0);
            }
        }
    }
    let leader = match replica.leader_hint() {
        Some(node) => node.0,
        // A replica asleep that knows no leader (recovered asleep, see `recover`) stays under
        // the node it is presumed to be led from: liveness wakes a sleeping replica through
        // this index only. Every recovered replica runs a round at start that teaches it
        // nothing; dropping the presumption then left it asleep for good when that node
        // died, and a group whose survivors had all restarted so never elected again.
        None if asleep => cell.leader_node.load(std::sync::atomic::Ordering::Acquire),
        None => 0,
    };
    let old = cell
        .leader_node
        .swap(leader, std::sync::atomic::Ordering::AcqRel);
    if old != leader {
        shared
            .liveness
            .move_leader(cell.range, old, leader, shared.node);
    }
}

// ---- the steps every transition shares ----

/// Keeps `Shared::settled` equal to the cells whose `settled` flag is set.
fn count_settled(shared: &Shared, cell: &ReplicaCell, settled: bool) {
    use std::sync::atomic::Ordering;
    if cell.settled.swap(settled, Ordering::AcqRel) != settled {
        if settled {
            shared.settled.fetch_add(1, Ordering::AcqRel);
        } else {
            shared.settled.fetch_sub(1, Ordering::AcqRel);
        }
    }
}

fn register(shared: &Shared, cell: Arc<ReplicaCell>) {
    let asleep = cell.replica.lock().as_ref().is_some_and(Replica::is_asleep);
    if asleep {
        cell.set_asleep(true);
    } else {
        shared.awake.insert(cell.range.0, cell.clone());
    }
    shared.replicas.insert(cell.range.0, cell);
}

/// Fails the cell, answers what was queued for it with `err`, unregisters it and drops it
/// from the router.
fn take_out(shared: &Shared, cell: &ReplicaCell, out: &mut Output, err: Error) {
    answer_queued(cell, out, err);
    shared.router.remove(cell.range);
    shared.replicas.remove(&cell.range.0);
    shared.awake.remove(&cell.range.0);
    count_settled(shared, cell, false);
    let leader = cell
        .leader_node
        .swap(0, std::sync::atomic::Ordering::AcqRel);
    shared
        .liveness
        .move_leader(cell.range, leader, 0, shared.node);
}

/// Fails the cell and answers the requests queued in its mailbox.
pub(crate) fn answer_queued(cell: &ReplicaCell, out: &mut Output, err: Error) {
    for token in cell.fail().iter().filter_map(PeerMsg::token) {
        out.complete(token, Err(err.clone()));
    }
}

/// Writes `desc` as a tombstone into `batch` and remembers its conf_ver.
fn tombstone(shared: &Shared, mut desc: RangeDescriptor, batch: &mut WriteBatch) {
    desc.state = RangeState::Tombstone as i32;
    batch.put_descriptor(&desc);
    shared
        .tombstones
        .insert(desc.range_id, desc.epoch_or_default().conf_ver);
}

/// raft's conf state for a descriptor's replicas.
fn conf_state_of(desc: &RangeDescriptor) -> ConfState {
    let mut cs = ConfState::default();
    for r in &desc.replicas {
        if r.role == ReplicaRole::Learner as i32 {
            cs.learners.push(r.replica_id);
        } else {
            cs.voters.push(r.replica_id);
        }
    }
    cs
}
