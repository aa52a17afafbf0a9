//! Status queries of a NodeGroup: one replica's raft state, the node's counters and range
//! table. Kept apart from the request API because they walk replicas (not for hot paths) and
//! refresh gauges as a side effect.

use flotilla_proto::meta::RangeDescriptor;
use flotilla_proto::RangeId;

use crate::api::{NodeLiveness, NodeStatus};
use crate::error::{Error, Result};
use crate::node_group::NodeGroup;
use crate::replica::ReplicaStatus;

impl NodeGroup {
    /// Status of this node's replica of `range`.
    pub fn status(&self, range: RangeId) -> Result<ReplicaStatus> {
        let cell = self.shared.cell(range).ok_or(Error::RangeNotFound(range))?;
        let guard = cell.replica.lock();
        guard
            .as_ref()
            .map(|r| r.status())
            .ok_or(Error::ReplicaFailed(range))
    }

    /// The statuses of the replicas here that lead their group and whose descriptor `pick`
    /// accepts (offered in range id order). Walks the leader index, not every replica, and
    /// builds a status only for the picked ones: a placement pass over 100,000 replicas a
    /// node must not cost a status each.
    pub fn leading(&self, mut pick: impl FnMut(&RangeDescriptor) -> bool) -> Vec<ReplicaStatus> {
        let mut picked = Vec::new();
        for range in self.shared.liveness.led_by(self.shared.node) {
            let range = RangeId(range);
            if range.is_system() {
                continue; // not placed by ranges' rules (and outside the router)
            }
            let Some(cell) = self.shared.cell(range) else {
                continue;
            };
            let guard = cell.replica.lock();
            if let Some(r) = guard.as_ref().filter(|r| r.is_leader()) {
                if r.descriptor().is_some_and(&mut pick) {
                    picked.push(r.status());
                }
            }
        }
        picked
    }

    /// The statuses of this node's replicas of `ranges` that lead their group (the others,
    /// and ranges not hosted here, are left out).
    pub fn leading_among(&self, ranges: &[RangeId]) -> Vec<ReplicaStatus> {
        ranges
            .iter()
            .filter_map(|&range| {
                let cell = self.shared.cell(range)?;
                let guard = cell.replica.lock();
                guard.as_ref().filter(|r| r.is_leader()).map(|r| r.status())
            })
            .collect()
    }

    /// Counters of the whole NodeGroup.
    pub fn node_status(&self) -> NodeStatus {
        // Leaders from the leader index's count of the groups led here, not a walk of every
        // replica: the scheduler asks every second, with 100,000 replicas a node.
        let system = self
            .shared
            .cell(RangeId::SYSTEM)
            .map(|c| c.replica.lock().as_ref().is_some_and(|r| r.is_leader()));
        let leaders = self
            .shared
            .liveness
            .led_count(self.shared.node)
            .saturating_sub(usize::from(system == Some(true)));
        let st = NodeStatus {
            node: self.shared.node,
            replicas: self.shared.replica_count() - usize::from(system.is_some()),
            system,
            ranges: self.shared.router.len(),
            leaders,
            pending_requests: self.shared.pending.len(),
            awake: self.shared.awake.len(),
            elections_won: self
                .shared
                .elections_won
                .load(std::sync::atomic::Ordering::Relaxed),
            queued_wakes: self.shared.liveness.queued_wakes(),
            heartbeat_batches: self
                .shared
                .heartbeat_batches
                .load(std::sync::atomic::Ordering::Relaxed),
            writes: self
                .shared
                .writes
                .load(std::sync::atomic::Ordering::Relaxed),
            reads: self.shared.reads.load(std::sync::atomic::Ordering::Relaxed),
        };
        metrics::gauge!("flotilla_runtime_replicas").set(st.replicas as f64);
        metrics::gauge!("flotilla_runtime_leaders").set(st.leaders as f64);
        st
    }

    /// What the failure detector believes of every node it tracks (the nodes that host a
    /// replica of a range hosted here, or that were heard from), in node order.
    pub fn node_liveness(&self) -> Vec<NodeLiveness> {
        self.shared.liveness.snapshot()
    }

    /// Has the failure detector watch `node` from now on (up until proven otherwise), even
    /// if no range here has a replica on it yet: a node that hosts nothing is still a
    /// candidate to receive replicas, and placement must know whether it is up.
    pub fn watch_node(&self, node: flotilla_proto::NodeId) {
        if node != self.shared.node {
            self.shared.liveness.watch(node);
        }
    }

    /// The ranges this node serves, in key order.
    pub fn ranges(&self) -> Vec<RangeDescriptor> {
        self.shared.router.all()
    }

    /// The range that owns `key`, as this node knows it.
    pub fn range_of(&self, key: &[u8]) -> Result<RangeDescriptor> {
        self.shared.router.lookup(key)
    }

    /// The ranges hosted here adjacent to `range` on its left and on its right (`None` where
    /// the neighbour has no replica here, or `range` is not hosted here).
    pub fn neighbours(&self, range: RangeId) -> (Option<RangeDescriptor>, Option<RangeDescriptor>) {
        match self.shared.router.get(range) {
            Some(d) => self.shared.router.neighbours(&d),
            None => (None, None),
        }
    }

    /// The ids of every replica hosted here (initialized or not).
    pub fn replica_ranges(&self) -> Vec<RangeId> {
        self.shared.cells().iter().map(|c| c.range).collect()
    }

    /// Whether this node's replica of `range` was isolated after a fault.
    pub fn is_failed(&self, range: RangeId) -> bool {
        self.shared.cell(range).is_some_and(|c| c.is_failed())
    }
}
