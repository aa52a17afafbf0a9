//! Fault injection for [`MemNetwork`](crate::MemNetwork): filters decide, per raft message or
//! heartbeat, whether it is delivered, dropped, delayed, duplicated, reordered or held for the
//! test to deliver later (in an order of its choosing).
//!
//! Filters are installed and removed at runtime and compose: every installed filter sees
//! every packet in installation order, and copies made by a duplicate filter go through the
//! filters after it. Probabilistic filters draw from one seeded RNG per node pair, so a
//! test that sends the same messages on a link sees the same decisions on every run.

mod builtin;
mod hold;

use std::collections::HashMap;
use std::fmt;
use std::time::Duration;

use flotilla_proto::transport::{Heartbeat, RaftMessage};
use flotilla_proto::{NodeId, RangeId};
use parking_lot::Mutex;
use prost::Message;
use rand::rngs::StdRng;
use rand::SeedableRng;

pub use builtin::{
    DelayFilter, DropFilter, DuplicateFilter, IsolateFilter, PartitionFilter, PredicateFilter,
    ReorderFilter,
};
pub use hold::HoldFilter;

/// One unit the network delivers: a raft message or a coalesced heartbeat, on its way from
/// one node to another. A batch is split into packets before filtering and regrouped after.
#[derive(Debug, Clone, PartialEq)]
pub struct Packet {
    /// The sending node.
    pub from: NodeId,
    /// The destination node.
    pub to: NodeId,
    /// What is carried.
    pub payload: Payload,
}

/// What a [`Packet`] carries.
#[derive(Debug, Clone, PartialEq)]
pub enum Payload {
    /// One raft message for one group.
    Message(RaftMessage),
    /// One coalesced heartbeat (or heartbeat response).
    Heartbeat(Heartbeat),
}

impl Payload {
    /// The group the payload belongs to.
    pub fn range_id(&self) -> RangeId {
        match self {
            Self::Message(m) => RangeId(m.range_id),
            Self::Heartbeat(h) => RangeId(h.range_id),
        }
    }

    /// Encoded size in bytes, as counted against the queue budget.
    pub fn encoded_len(&self) -> usize {
        match self {
            Self::Message(m) => m.encoded_len(),
            Self::Heartbeat(h) => h.encoded_len(),
        }
    }
}

/// What a filter does to one packet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// Leave it alone.
    Pass,
    /// Do not deliver it.
    Drop,
    /// Deliver it no earlier than this long from now, keeping order on its node pair: packets
    /// sent after it on the same pair wait behind it.
    Delay(Duration),
    /// Deliver it this long from now, free to overtake, and be overtaken by, other packets.
    Reorder(Duration),
    /// Deliver it and this many extra copies right after it.
    Duplicate(u32),
    /// Not now: the filter kept a copy, which the test hands back to the network with
    /// [`MemNetwork::deliver`](crate::MemNetwork::deliver) (see [`HoldFilter`]). Counted in
    /// [`NetStats::held`](crate::NetStats::held), not as a drop.
    Hold,
}

/// The kind of a filter, under which [`NetStats`](crate::NetStats) counts what it dropped.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum FilterKind {
    /// [`DropFilter`]: random loss.
    Drop,
    /// [`DelayFilter`].
    Delay,
    /// [`DuplicateFilter`].
    Duplicate,
    /// [`ReorderFilter`].
    Reorder,
    /// [`PartitionFilter`].
    Partition,
    /// [`IsolateFilter`].
    Isolate,
    /// [`PredicateFilter`].
    Predicate,
    /// [`HoldFilter`] (it never drops: what it holds is counted apart).
    Hold,
    /// A filter written outside this crate.
    Custom,
}

impl FilterKind {
    /// Every kind, in declaration order.
    pub const ALL: [FilterKind; 9] = [
        Self::Drop,
        Self::Delay,
        Self::Duplicate,
        Self::Reorder,
        Self::Partition,
        Self::Isolate,
        Self::Predicate,
        Self::Hold,
        Self::Custom,
    ];

    /// A short lowercase name, used as a metric label.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Drop => "drop",
            Self::Delay => "delay",
            Self::Duplicate => "duplicate",
            Self::Reorder => "reorder",
            Self::Partition => "partition",
            Self::Isolate => "isolate",
            Self::Predicate => "predicate",
            Self::Hold => "hold",
            Self::Custom => "custom",
        }
    }

    /// Position in [`FilterKind::ALL`], for per-kind counter arrays.
    pub(crate) fn index(self) -> usize {
        self as usize
    }
}

impl fmt::Display for FilterKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Names an installed filter, to remove it later.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct FilterId(pub(crate) u64);

/// A fault-injection rule, applied by the network to every packet it is about to deliver.
///
/// Filters run on the destination's delivery thread, never on the sender's, so they may take
/// locks the runtime's workers hold. They must not block for long: the destination receives
/// nothing while a filter runs.
pub trait Filter: Send + Sync + 'static {
    /// The kind under which drops are counted.
    fn kind(&self) -> FilterKind;

    /// Decides what happens to `packet`.
    fn apply(&self, packet: &Packet) -> Action;

    /// Whether this filter cuts every packet from `from` to `to`, so that the link should be
    /// reported unreachable ([`Transport::is_reachable`](crate::Transport::is_reachable)),
    /// as a real transport would once its connection fails. Only partitions and isolation
    /// say yes; random loss does not make a link unreachable.
    fn blocks(&self, from: NodeId, to: NodeId) -> bool {
        let _ = (from, to);
        false
    }

    /// Restricts this filter to the packets for which `when` returns true; other packets
    /// pass untouched. For example `DelayFilter::new(d).when(|p| p.to == NodeId(3))`.
    fn when<P>(self, when: P) -> Scoped<Self>
    where
        Self: Sized,
        P: Fn(&Packet) -> bool + Send + Sync + 'static,
    {
        Scoped {
            inner: self,
            when: Box::new(when),
        }
    }
}

/// A filter restricted to some packets; see [`Filter::when`].
pub struct Scoped<F> {
    inner: F,
    when: Box<dyn Fn(&Packet) -> bool + Send + Sync>,
}

impl<F: Filter> Filter for Scoped<F> {
    fn kind(&self) -> FilterKind {
        self.inner.kind()
    }

    fn apply(&self, packet: &Packet) -> Action {
        if (self.when)(packet) {
            self.inner.apply(packet)
        } else {
            Action::Pass
        }
    }

    // `blocks` stays false: a scope over packets says nothing about whole links.
}

impl<F: fmt::Debug> fmt::Debug for Scoped<F> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Scoped")
            .field("inner", &self.inner)
            .finish_non_exhaustive()
    }
}

/// One seeded RNG per node pair, created on first use.
///
/// Filters run on several delivery threads at once; with one shared RNG the draws a link
/// gets would depend on thread scheduling. Per pair, they depend only on that pair's traffic.
pub(crate) struct LinkRng {
    seed: u64,
    rngs: Mutex<HashMap<(NodeId, NodeId), StdRng>>,
}

impl LinkRng {
    pub(crate) fn new(seed: u64) -> Self {
        Self {
            seed,
            rngs: Mutex::new(HashMap::new()),
        }
    }

    pub(crate) fn with<R>(&self, from: NodeId, to: NodeId, f: impl FnOnce(&mut StdRng) -> R) -> R {
        let mut rngs = self.rngs.lock();
        let rng = rngs.entry((from, to)).or_insert_with(|| {
            // Mix the pair into the seed so that links do not share a stream.
            let link = from.0.wrapping_mul(0x9E37_79B9_7F4A_7C15)
                ^ to.0.rotate_left(32).wrapping_mul(0xC2B2_AE3D_27D4_EB4F);
            StdRng::seed_from_u64(self.seed ^ link)
        });
        f(rng)
    }
}

impl fmt::Debug for LinkRng {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LinkRng").field("seed", &self.seed).finish()
    }
}
