//! The system range's records and what a node keeps of them: the one place that knows the
//! names under which the system range stores its counters and its node registry (the bytes
//! live in the store's `meta` family, see `flotilla_store::keys::system_key`), the seed a
//! fresh cluster starts from, and this node's lease of range ids.
//!
//! The system range is a group like the others (raft-rs, the shared engine, the same worker,
//! ticker and hibernation) with a reserved id, [`RangeId::SYSTEM`], and no user keys: the
//! router never holds it, splits and merges refuse it, and its commands
//! (`command.SystemCommand`) are applied by the runtime (`replica/system.rs`), never by the
//! application's state machine.

use flotilla_proto::meta::{NodeRecord, RangeDescriptor, RangeEpoch, ReplicaDescriptor};
use flotilla_proto::meta::{NodeState, ReplicaRole};
use flotilla_proto::{Message as _, NodeId, RangeId};
use parking_lot::Mutex;

/// The next range id the counter hands out (a big-endian `u64`).
pub(crate) const RANGE_COUNTER: &[u8] = b"counter/range";
/// The next node id the counter hands out (a big-endian `u64`).
pub(crate) const NODE_COUNTER: &[u8] = b"counter/node";
const NODE_PREFIX: &[u8] = b"node/";

/// Ids a node leases from a counter at a time: a split takes one from the lease, so only one
/// split in this many waits for a proposal to the system range.
pub const ID_LEASE_BLOCK: u64 = 32;

/// The most ids one allocation may take (a bound on what one command can burn).
pub(crate) const MAX_IDS_PER_ALLOCATION: u64 = 1 << 16;

/// The record name of node `id` in the registry: ordered by id (big-endian).
pub(crate) fn node_key(id: u64) -> Vec<u8> {
    let mut k = NODE_PREFIX.to_vec();
    k.extend_from_slice(&id.to_be_bytes());
    k
}

/// Whether a record name is a node record.
pub(crate) fn is_node_key(name: &[u8]) -> bool {
    name.len() == NODE_PREFIX.len() + 8 && name.starts_with(NODE_PREFIX)
}

/// What the system range holds when a cluster is created: the counters start past the ids the
/// initial layout and the bootstrap nodes use, and each bootstrap node is registered `up`.
/// Every bootstrap node must compute the same seed (as it computes the same layout).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SystemSeed {
    /// The first range id the counter hands out (past every id of the initial layout).
    pub next_range_id: u64,
    /// The first node id the counter hands out (past every bootstrap node).
    pub next_node_id: u64,
    /// The bootstrap nodes, with the addresses known at bootstrap (a node updates its own
    /// record when it starts).
    pub nodes: Vec<NodeRecord>,
}

impl SystemSeed {
    /// The seed of a cluster whose initial layout is `layout` on the nodes `members`, with the
    /// raft address of each member as `raft_addr` says (empty if unknown).
    pub fn new(
        layout: &[RangeDescriptor],
        members: &[NodeId],
        raft_addr: impl Fn(NodeId) -> String,
    ) -> SystemSeed {
        let max_range = layout
            .iter()
            .map(|d| d.range_id)
            .filter(|id| !RangeId(*id).is_system())
            .max()
            .unwrap_or(0);
        SystemSeed {
            next_range_id: max_range + 1,
            next_node_id: members.iter().map(|n| n.0).max().unwrap_or(0) + 1,
            nodes: members
                .iter()
                .map(|n| NodeRecord {
                    node_id: n.0,
                    raft_addr: raft_addr(*n),
                    client_addr: String::new(),
                    state: NodeState::Up as i32,
                })
                .collect(),
        }
    }

    /// The records to write with the system range's initial state.
    pub(crate) fn records(&self) -> Vec<(Vec<u8>, Vec<u8>)> {
        let mut out = vec![
            (
                RANGE_COUNTER.to_vec(),
                self.next_range_id.to_be_bytes().to_vec(),
            ),
            (
                NODE_COUNTER.to_vec(),
                self.next_node_id.to_be_bytes().to_vec(),
            ),
        ];
        for n in &self.nodes {
            out.push((node_key(n.node_id), n.encode_to_vec()));
        }
        out
    }
}

/// The descriptor of the system range replicated on `members` (replica id = node id, as the
/// initial layout's). Its key bounds are empty and mean nothing: it holds no user key.
pub fn system_descriptor(members: &[NodeId]) -> RangeDescriptor {
    RangeDescriptor {
        range_id: RangeId::SYSTEM.0,
        start_key: Default::default(),
        end_key: Default::default(),
        epoch: Some(RangeEpoch {
            conf_ver: 1,
            version: 1,
        }),
        replicas: members
            .iter()
            .map(|n| ReplicaDescriptor {
                replica_id: n.0,
                node_id: n.0,
                role: ReplicaRole::Voter as i32,
            })
            .collect(),
        state: 0,
        next_replica_id: members.iter().map(|n| n.0).max().unwrap_or(0) + 1,
        merge: None,
    }
}

/// Decodes a counter record.
pub(crate) fn decode_counter(v: &[u8]) -> Option<u64> {
    Some(u64::from_be_bytes(v.try_into().ok()?))
}

/// The range ids this node leased from the system range and has not used yet. A leased id is
/// used at most once; ids left when the node stops are simply never used (the counter moved
/// past them), so an id is never handed out twice, restarts included.
#[derive(Debug, Default)]
pub(crate) struct IdLease {
    /// Unused blocks as `[next, end)`.
    blocks: Mutex<Vec<(u64, u64)>>,
}

impl IdLease {
    /// Takes one id, if any is left.
    pub(crate) fn take(&self) -> Option<u64> {
        let mut blocks = self.blocks.lock();
        let (next, end) = blocks.first_mut()?;
        let id = *next;
        *next += 1;
        if *next >= *end {
            blocks.remove(0);
        }
        Some(id)
    }

    /// Adds a block leased from the counter.
    pub(crate) fn add(&self, start: u64, count: u64) {
        if count > 0 {
            self.blocks.lock().push((start, start + count));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_lease_hands_out_each_id_of_its_blocks_once_in_order() {
        let lease = IdLease::default();
        assert_eq!(lease.take(), None);
        lease.add(10, 2);
        lease.add(40, 1);
        lease.add(50, 0);
        let taken: Vec<_> = std::iter::from_fn(|| lease.take()).collect();
        assert_eq!(taken, vec![10, 11, 40]);
    }

    #[test]
    fn the_seed_starts_the_counters_past_the_layout_and_the_members() {
        let members = [NodeId(1), NodeId(2), NodeId(3)];
        let layout: Vec<RangeDescriptor> = (1..=8)
            .map(|i| RangeDescriptor {
                range_id: i,
                ..Default::default()
            })
            .chain([system_descriptor(&members)])
            .collect();
        let seed = SystemSeed::new(&layout, &members, |n| format!("127.0.0.{}:1", n.0));
        assert_eq!(seed.next_range_id, 9);
        assert_eq!(seed.next_node_id, 4);
        let records = seed.records();
        assert_eq!(records.len(), 5);
        assert!(records.iter().filter(|(k, _)| is_node_key(k)).count() == 3);
    }
}
