//! The built-in filters: the faults the cluster tests inject.

use std::collections::HashSet;
use std::fmt;
use std::time::Duration;

use flotilla_proto::transport::{Heartbeat, RaftMessage};
use flotilla_proto::NodeId;
use rand::Rng;

use super::{Action, Filter, FilterKind, LinkRng, Packet, Payload};

fn check_probability(p: f64) {
    assert!(
        (0.0..=1.0).contains(&p),
        "probability must be within [0, 1], got {p}"
    );
}

/// Drops each packet with a fixed probability (random loss).
#[derive(Debug)]
pub struct DropFilter {
    probability: f64,
    rng: LinkRng,
}

impl DropFilter {
    /// Drops each packet with `probability`, drawing from an RNG seeded with `seed`.
    ///
    /// # Panics
    ///
    /// If `probability` is not within `[0, 1]`.
    pub fn new(probability: f64, seed: u64) -> Self {
        check_probability(probability);
        Self {
            probability,
            rng: LinkRng::new(seed),
        }
    }

    /// Drops every packet; combine with [`Filter::when`] to choose which.
    pub fn all() -> Self {
        Self::new(1.0, 0)
    }
}

impl Filter for DropFilter {
    fn kind(&self) -> FilterKind {
        FilterKind::Drop
    }

    fn apply(&self, p: &Packet) -> Action {
        let drop = match self.probability {
            x if x >= 1.0 => true,
            x if x <= 0.0 => false,
            x => self.rng.with(p.from, p.to, |r| r.gen_bool(x)),
        };
        if drop {
            Action::Drop
        } else {
            Action::Pass
        }
    }
}

/// Delays every packet by a fixed duration. Order on each node pair is kept: a packet sent
/// after a delayed one is never delivered before it, even once the filter is removed.
#[derive(Debug)]
pub struct DelayFilter {
    delay: Duration,
}

impl DelayFilter {
    /// Delays every packet by `delay`.
    pub fn new(delay: Duration) -> Self {
        Self { delay }
    }
}

impl Filter for DelayFilter {
    fn kind(&self) -> FilterKind {
        FilterKind::Delay
    }

    fn apply(&self, _: &Packet) -> Action {
        Action::Delay(self.delay)
    }
}

/// Delivers each packet twice with a fixed probability; the copy arrives right after the
/// original.
#[derive(Debug)]
pub struct DuplicateFilter {
    probability: f64,
    rng: LinkRng,
}

impl DuplicateFilter {
    /// Duplicates each packet with `probability`, drawing from an RNG seeded with `seed`.
    ///
    /// # Panics
    ///
    /// If `probability` is not within `[0, 1]`.
    pub fn new(probability: f64, seed: u64) -> Self {
        check_probability(probability);
        Self {
            probability,
            rng: LinkRng::new(seed),
        }
    }
}

impl Filter for DuplicateFilter {
    fn kind(&self) -> FilterKind {
        FilterKind::Duplicate
    }

    fn apply(&self, p: &Packet) -> Action {
        let dup = match self.probability {
            x if x >= 1.0 => true,
            x if x <= 0.0 => false,
            x => self.rng.with(p.from, p.to, |r| r.gen_bool(x)),
        };
        if dup {
            Action::Duplicate(1)
        } else {
            Action::Pass
        }
    }
}

/// Reorders packets: holds each one for a random time in `[0, window)`, and delivers them by
/// the end of their hold, so packets sent within about one window of each other are shuffled.
///
/// A time window (rather than "hold N packets, then shuffle") never strands a packet when
/// traffic stops, and composes with [`DelayFilter`] by adding up.
#[derive(Debug)]
pub struct ReorderFilter {
    window: Duration,
    rng: LinkRng,
}

impl ReorderFilter {
    /// Shuffles packets within `window`, drawing hold times from an RNG seeded with `seed`.
    pub fn new(window: Duration, seed: u64) -> Self {
        Self {
            window,
            rng: LinkRng::new(seed),
        }
    }
}

impl Filter for ReorderFilter {
    fn kind(&self) -> FilterKind {
        FilterKind::Reorder
    }

    fn apply(&self, p: &Packet) -> Action {
        let window = self.window.as_nanos().min(u64::MAX as u128) as u64;
        let hold = if window == 0 {
            0
        } else {
            self.rng.with(p.from, p.to, |r| r.gen_range(0..window))
        };
        Action::Reorder(Duration::from_nanos(hold))
    }
}

/// Cuts the links between two sets of nodes (in both directions, or one with
/// [`PartitionFilter::one_way`]). Nodes in neither set are not affected.
#[derive(Debug)]
pub struct PartitionFilter {
    a: HashSet<NodeId>,
    b: HashSet<NodeId>,
    both_ways: bool,
}

impl PartitionFilter {
    /// No packet crosses between `a` and `b`, in either direction.
    ///
    /// # Panics
    ///
    /// If a node is in both sets.
    pub fn new(a: impl IntoIterator<Item = NodeId>, b: impl IntoIterator<Item = NodeId>) -> Self {
        Self::build(a, b, true)
    }

    /// No packet goes from a node in `from` to a node in `to`; the other direction works.
    /// Raft is most fragile under such asymmetric partitions (a leader that can send but
    /// not hear).
    ///
    /// # Panics
    ///
    /// If a node is in both sets.
    pub fn one_way(
        from: impl IntoIterator<Item = NodeId>,
        to: impl IntoIterator<Item = NodeId>,
    ) -> Self {
        Self::build(from, to, false)
    }

    fn build(
        a: impl IntoIterator<Item = NodeId>,
        b: impl IntoIterator<Item = NodeId>,
        both_ways: bool,
    ) -> Self {
        let a: HashSet<_> = a.into_iter().collect();
        let b: HashSet<_> = b.into_iter().collect();
        assert!(
            a.is_disjoint(&b),
            "a node cannot be on both sides of a partition"
        );
        Self { a, b, both_ways }
    }

    fn cuts(&self, from: NodeId, to: NodeId) -> bool {
        (self.a.contains(&from) && self.b.contains(&to))
            || (self.both_ways && self.b.contains(&from) && self.a.contains(&to))
    }
}

impl Filter for PartitionFilter {
    fn kind(&self) -> FilterKind {
        FilterKind::Partition
    }

    fn apply(&self, p: &Packet) -> Action {
        if self.cuts(p.from, p.to) {
            Action::Drop
        } else {
            Action::Pass
        }
    }

    fn blocks(&self, from: NodeId, to: NodeId) -> bool {
        self.cuts(from, to)
    }
}

/// Cuts one node off from every other node, in both directions.
#[derive(Debug)]
pub struct IsolateFilter {
    node: NodeId,
}

impl IsolateFilter {
    /// `node` can neither send to nor receive from any other node.
    pub fn new(node: NodeId) -> Self {
        Self { node }
    }

    fn cuts(&self, from: NodeId, to: NodeId) -> bool {
        // A node still reaches itself: isolation is about the network, not the process.
        (from == self.node) != (to == self.node)
    }
}

impl Filter for IsolateFilter {
    fn kind(&self) -> FilterKind {
        FilterKind::Isolate
    }

    fn apply(&self, p: &Packet) -> Action {
        if self.cuts(p.from, p.to) {
            Action::Drop
        } else {
            Action::Pass
        }
    }

    fn blocks(&self, from: NodeId, to: NodeId) -> bool {
        self.cuts(from, to)
    }
}

type PacketPredicate = Box<dyn Fn(&Packet) -> bool + Send + Sync>;

/// Drops the packets a closure selects: all messages of one group, only snapshot messages
/// (decode `RaftMessage::message` in the closure), heartbeats to one node, and so on.
pub struct PredicateFilter {
    matches: PacketPredicate,
}

impl PredicateFilter {
    /// Drops every packet for which `matches` returns true.
    pub fn new(matches: impl Fn(&Packet) -> bool + Send + Sync + 'static) -> Self {
        Self {
            matches: Box::new(matches),
        }
    }

    /// Drops the raft messages for which `matches(from, to, message)` returns true;
    /// heartbeats pass.
    pub fn messages(
        matches: impl Fn(NodeId, NodeId, &RaftMessage) -> bool + Send + Sync + 'static,
    ) -> Self {
        Self::new(move |p| match &p.payload {
            Payload::Message(m) => matches(p.from, p.to, m),
            Payload::Heartbeat(_) => false,
        })
    }

    /// Drops the heartbeats for which `matches(from, to, heartbeat)` returns true; raft
    /// messages pass.
    pub fn heartbeats(
        matches: impl Fn(NodeId, NodeId, &Heartbeat) -> bool + Send + Sync + 'static,
    ) -> Self {
        Self::new(move |p| match &p.payload {
            Payload::Heartbeat(h) => matches(p.from, p.to, h),
            Payload::Message(_) => false,
        })
    }
}

impl Filter for PredicateFilter {
    fn kind(&self) -> FilterKind {
        FilterKind::Predicate
    }

    fn apply(&self, p: &Packet) -> Action {
        if (self.matches)(p) {
            Action::Drop
        } else {
            Action::Pass
        }
    }
}

impl fmt::Debug for PredicateFilter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PredicateFilter").finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn msg(from: u64, to: u64, range: u64) -> Packet {
        Packet {
            from: NodeId(from),
            to: NodeId(to),
            payload: Payload::Message(RaftMessage {
                range_id: range,
                ..Default::default()
            }),
        }
    }

    fn hb(from: u64, to: u64, range: u64) -> Packet {
        Packet {
            from: NodeId(from),
            to: NodeId(to),
            payload: Payload::Heartbeat(Heartbeat {
                range_id: range,
                ..Default::default()
            }),
        }
    }

    fn decisions(f: &dyn Filter, n: usize) -> Vec<Action> {
        (0..n).map(|_| f.apply(&msg(1, 2, 7))).collect()
    }

    #[test]
    fn probabilistic_filters_are_deterministic_per_seed() {
        let a = decisions(&DropFilter::new(0.5, 42), 200);
        let b = decisions(&DropFilter::new(0.5, 42), 200);
        let c = decisions(&DropFilter::new(0.5, 43), 200);
        assert_eq!(a, b);
        assert_ne!(a, c);
        let drops = a.iter().filter(|x| **x == Action::Drop).count();
        assert!((60..140).contains(&drops), "{drops} drops of 200 at p=0.5");
    }

    #[test]
    fn links_draw_from_separate_streams() {
        // Traffic on one link must not change the decisions on another.
        let f = DropFilter::new(0.5, 7);
        let alone: Vec<_> = (0..50).map(|_| f.apply(&msg(1, 3, 1))).collect();
        let f = DropFilter::new(0.5, 7);
        let interleaved: Vec<_> = (0..50)
            .map(|_| {
                f.apply(&msg(1, 2, 1));
                f.apply(&msg(1, 3, 1))
            })
            .collect();
        assert_eq!(alone, interleaved);
    }

    #[test]
    fn extreme_probabilities() {
        assert!(decisions(&DropFilter::new(0.0, 1), 50)
            .iter()
            .all(|a| *a == Action::Pass));
        assert!(decisions(&DropFilter::all(), 50)
            .iter()
            .all(|a| *a == Action::Drop));
        assert!(decisions(&DuplicateFilter::new(1.0, 1), 50)
            .iter()
            .all(|a| *a == Action::Duplicate(1)));
    }

    #[test]
    #[should_panic(expected = "probability")]
    fn probability_out_of_range_panics() {
        let _ = DropFilter::new(1.5, 0);
    }

    #[test]
    fn reorder_holds_within_window() {
        let w = Duration::from_millis(10);
        let f = ReorderFilter::new(w, 3);
        for _ in 0..100 {
            match f.apply(&msg(1, 2, 1)) {
                Action::Reorder(d) => assert!(d < w),
                other => panic!("unexpected {other:?}"),
            }
        }
        assert_eq!(
            ReorderFilter::new(Duration::ZERO, 0).apply(&msg(1, 2, 1)),
            Action::Reorder(Duration::ZERO)
        );
    }

    #[test]
    fn partition_cuts_both_ways_and_spares_others() {
        let f = PartitionFilter::new([NodeId(1)], [NodeId(2), NodeId(3)]);
        assert_eq!(f.apply(&msg(1, 2, 1)), Action::Drop);
        assert_eq!(f.apply(&msg(3, 1, 1)), Action::Drop);
        assert_eq!(f.apply(&msg(2, 3, 1)), Action::Pass);
        assert_eq!(f.apply(&msg(4, 1, 1)), Action::Pass);
        assert!(f.blocks(NodeId(2), NodeId(1)));
        assert!(!f.blocks(NodeId(2), NodeId(3)));

        let one = PartitionFilter::one_way([NodeId(1)], [NodeId(2)]);
        assert_eq!(one.apply(&msg(1, 2, 1)), Action::Drop);
        assert_eq!(one.apply(&msg(2, 1, 1)), Action::Pass);
        assert!(one.blocks(NodeId(1), NodeId(2)));
        assert!(!one.blocks(NodeId(2), NodeId(1)));
    }

    #[test]
    #[should_panic(expected = "both sides")]
    fn overlapping_partition_panics() {
        let _ = PartitionFilter::new([NodeId(1), NodeId(2)], [NodeId(2)]);
    }

    #[test]
    fn isolate_cuts_every_link_of_one_node() {
        let f = IsolateFilter::new(NodeId(2));
        assert_eq!(f.apply(&msg(2, 1, 1)), Action::Drop);
        assert_eq!(f.apply(&hb(3, 2, 1)), Action::Drop);
        assert_eq!(f.apply(&msg(1, 3, 1)), Action::Pass);
        assert_eq!(f.apply(&msg(2, 2, 1)), Action::Pass);
        assert!(f.blocks(NodeId(1), NodeId(2)));
        assert!(!f.blocks(NodeId(1), NodeId(3)));
    }

    #[test]
    fn predicate_filters_select_by_kind() {
        let by_group = PredicateFilter::messages(|_, _, m| m.range_id == 5);
        assert_eq!(by_group.apply(&msg(1, 2, 5)), Action::Drop);
        assert_eq!(by_group.apply(&msg(1, 2, 6)), Action::Pass);
        assert_eq!(by_group.apply(&hb(1, 2, 5)), Action::Pass);

        let hbs = PredicateFilter::heartbeats(|_, to, _| to == NodeId(3));
        assert_eq!(hbs.apply(&hb(1, 3, 5)), Action::Drop);
        assert_eq!(hbs.apply(&hb(1, 2, 5)), Action::Pass);
        assert_eq!(hbs.apply(&msg(1, 3, 5)), Action::Pass);
    }

    #[test]
    fn scoped_filter_only_touches_selected_packets() {
        let f = DelayFilter::new(Duration::from_millis(5)).when(|p| p.to == NodeId(3));
        assert_eq!(f.kind(), FilterKind::Delay);
        assert_eq!(
            f.apply(&msg(1, 3, 1)),
            Action::Delay(Duration::from_millis(5))
        );
        assert_eq!(f.apply(&msg(1, 2, 1)), Action::Pass);
        let p = PartitionFilter::new([NodeId(1)], [NodeId(2)]).when(|_| true);
        assert!(!p.blocks(NodeId(1), NodeId(2)));
    }
}
