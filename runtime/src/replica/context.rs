//! The replica's seam with the node that hosts it.
//!
//! A replica is driven in phases by whoever owns it (a worker thread in production, a test
//! or a simulator on one thread). Each phase receives an [`Env`], what the replica may *read*
//! (config, store, router view, the host's answers to a few questions), and an [`Output`], what
//! it *produces* (raft messages per destination node, completions of requests, writes that the
//! round's batches carry, and [`Effect`]s: changes to the node's set of replicas and to its
//! router that only the owner may carry out). The replica never reaches into the worker or
//! the NodeGroup: `replica/` imports nothing from `fsm/` or `node_group`.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use flotilla_proto::command::ClientRecord;
use flotilla_proto::meta::RangeDescriptor;
use flotilla_proto::transport::{Heartbeat, NodeBatch, RaftMessage};
use flotilla_proto::{NodeId, RangeId};
use flotilla_store::{Engine, GroupStorage};
use raft::prelude::HardState;

use super::PeerMsg;
use crate::config::NodeGroupConfig;
use crate::pending::{Answer, Pending};
use crate::router::RangeRouter;
use crate::state_machine::StateMachine;

/// What a replica may read while it runs a phase.
pub(crate) struct Env<'a> {
    pub(crate) config: &'a NodeGroupConfig,
    pub(crate) node: NodeId,
    pub(crate) engine: &'a Arc<Engine>,
    /// The node's router: read here, written only through [`Effect::Route`] and the
    /// lifecycle effects.
    pub(crate) router: &'a RangeRouter,
    pub(crate) state_machine: &'a dyn StateMachine,
    /// Whether a request is still awaited (a caller that timed out is not).
    pub(crate) pending: &'a Pending,
    pub(crate) host: &'a dyn Host,
}

/// The questions a replica asks about the other replicas of its node.
pub(crate) trait Host {
    /// Whether this node hosts a replica (of any state) of `range`.
    fn hosts(&self, range: RangeId) -> bool;
    /// The prepare index at which the merge source `range` handed itself over to its target,
    /// if it did.
    fn handed_over(&self, range: RangeId) -> Option<u64>;
    /// For a split about to create `range` here: an uninitialized replica of it (created by a
    /// message) is taken out of service at once, so that it never votes again nor writes its
    /// placeholder over the split's state, and its hard state is returned so that the new
    /// replica keeps its term and vote. An initialized one is left alone. Never blocks.
    fn seal_uninitialized(&self, range: RangeId) -> Existing;
    /// Whether node liveness believes `node` is up: `None` when the transport does not track
    /// liveness (then groups never sleep). This node is always up.
    fn node_live(&self, node: NodeId) -> Option<bool>;
}

/// What [`Host::seal_uninitialized`] found.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Existing {
    Absent,
    /// Initialized already (by a snapshot of the new group): newer than the split; kept.
    Initialized,
    /// Uninitialized, now sealed; carries its term and vote.
    Uninitialized(HardState),
    /// Held by a round right now (possibly this very round): ask again in a later round.
    Busy,
}

/// A change to the node's set of replicas or its router, produced by a replica and carried out
/// by its owner (`fsm::life`), which alone may register, unregister and tombstone replicas.
#[derive(Debug)]
pub(crate) enum Effect {
    /// Queue a message for this node's replica of `range` (merge steps, a first campaign).
    Post(RangeId, PeerMsg),
    /// Publish a descriptor in the router (a shape or membership change); the storage's own
    /// copy, shared.
    Route(std::sync::Arc<RangeDescriptor>),
    /// A range this node leads passed the split-check threshold: the split checker measures
    /// it.
    SplitCandidate(RangeId),
    /// A snapshot arrived for a range that absorbed `.0` in a merge this node missed: retire
    /// that replica so that the snapshot, retried by raft, can take its keys.
    Retire(RangeDescriptor),
    /// An applied membership change removed this replica from its group: destroy it
    /// (tombstone, state and data deleted in the round's apply batch).
    Removed,
    /// A split applied: once the apply batch is on disk (it is synced), create the new range's
    /// replica from `storage` and publish both halves.
    CreateSplit {
        left: std::sync::Arc<RangeDescriptor>,
        storage: Box<GroupStorage>,
        replica_id: u64,
        /// The parent's leader starts the new group's election at once.
        campaign: bool,
    },
    /// This merge source applied up to its prepare entry: once the apply batch is written,
    /// take it out of service and let `target` absorb it.
    HandOver { prepare: u64, target: RangeId },
    /// This target absorbed `source` (the tombstone is in the synced apply batch): once it is
    /// on disk, unregister the source and publish `merged`.
    MergedAway {
        source: RangeId,
        tombstone: RangeDescriptor,
        merged: std::sync::Arc<RangeDescriptor>,
    },
}

/// What replicas produce during one round, shared by every replica of the round.
#[derive(Default)]
pub(crate) struct Output {
    /// Messages per destination node (ordered, so that a round sends in the same order every
    /// time: a simulation replays exactly).
    pub(crate) outbox: BTreeMap<NodeId, Outgoing>,
    /// Plain heartbeats for the ticker to send (see `push_heartbeat`).
    pub(crate) tick_heartbeats: Vec<(NodeId, Heartbeat)>,
    /// Answers to requests, delivered once the round's writes are done.
    pub(crate) completions: Vec<(u64, Answer)>,
    /// Data keys written by entries applied earlier in this round (the apply batch is not
    /// readable before it is written).
    pub(crate) overlay: HashMap<Vec<u8>, Option<Vec<u8>>>,
    /// System range records written earlier in this round (by name), for the same reason.
    pub(crate) system_overlay: HashMap<Vec<u8>, Vec<u8>>,
    /// Client records written earlier in this round, by (range, client).
    pub(crate) client_records: HashMap<(u64, u64), ClientRecord>,
    /// Compactions requested through the API: (range, up to index).
    pub(crate) forced_compactions: Vec<(RangeId, u64)>,
    /// Set by a replica that has more to do right away.
    pub(crate) reschedule: bool,
    /// Set when something applied in this round must be on disk before its effects happen
    /// (a split or a merge): the apply batch is then written synced.
    pub(crate) sync_apply: bool,
    /// Lifecycle and router effects of the replica that ran last; its owner drains them after
    /// each phase.
    pub(crate) effects: Vec<Effect>,
    /// Replicas of the round that became leader.
    pub(crate) elections_won: u64,
}

/// The messages of one round for one destination node.
#[derive(Default)]
pub(crate) struct Outgoing {
    pub(crate) batch: NodeBatch,
    /// (range, to replica, is snapshot) of each message, for delivery reports.
    pub(crate) meta: Vec<(RangeId, u64, bool)>,
}

impl Output {
    pub(crate) fn complete(&mut self, token: u64, answer: Answer) {
        self.completions.push((token, answer));
    }

    pub(crate) fn effect(&mut self, effect: Effect) {
        self.effects.push(effect);
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
}
