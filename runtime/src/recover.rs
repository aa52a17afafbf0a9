//! Unsafe recovery through the NodeGroup (the operator's `flotilla-ctl recover`, over the
//! admin API): report this node's replicas of ranges that lost a quorum to nodes gone for
//! good, force one of them to continue as the only voter of a new membership, retire the
//! replicas the forced membership left behind, and treat a node removed from the registry as
//! down for good. The checks and the rewrite are `replica::recover`; the swap of the replica
//! in its cell is `fsm::life::force_alone`.
//!
//! Forcing a replica alone gives up raft's guarantee for that range: writes that the lost
//! majority acknowledged beyond this replica's log are gone. The operator's tool decides
//! which replica continues (of every survivor, the one with the highest last log term and
//! index) and says so before acting.

use std::collections::BTreeSet;

use flotilla_proto::{NodeId, RangeId};

use crate::api::{ForcedRange, RecoveryReplica};
use crate::error::{Error, RecoveryRefusal, Result};
use crate::fsm::life;
use crate::node_group::NodeGroup;

impl NodeGroup {
    /// This node's replicas as an unsafe recovery after losing the `lost` nodes sees them:
    /// with `ranges` `None`, those whose membership (as this replica knows it) lost a majority
    /// of its voters to them; else this node's replicas of exactly those ranges, whatever
    /// their state. In range id order. Walks and locks replicas: call it off the async
    /// threads.
    ///
    /// # Errors
    ///
    /// `RecoveryRefused` (`LostIncludesSelf`); a store failure reading a replica's log.
    pub fn recovery_report(
        &self,
        lost: &BTreeSet<NodeId>,
        ranges: Option<&[RangeId]>,
    ) -> Result<Vec<RecoveryReplica>> {
        self.check_lost(RangeId(0), lost)?;
        let cells = match ranges {
            None => self.shared.cells(),
            Some(ids) => ids.iter().filter_map(|&r| self.shared.cell(r)).collect(),
        };
        let mut out = Vec::new();
        for cell in cells {
            let guard = cell.replica.lock();
            let Some(r) = guard.as_ref() else {
                continue;
            };
            let view = r.recovery_view(lost)?;
            if ranges.is_some() || view.quorum_lost {
                out.push(view);
            }
        }
        out.sort_by_key(|v| v.range.0);
        Ok(out)
    }

    /// Forces this node's replica of `range` to continue as the only voter of a new
    /// membership, because the `lost` nodes (gone for good) hold a majority of its voters; it
    /// then elects itself at the next term and commits its whole log. `expect_conf_ver` is
    /// the conf_ver the caller's plan saw (refused if it moved); the new membership's conf_ver
    /// is at least `min_conf_ver` (give one above every replica's of the range). Blocks on the
    /// replica's round: call it off the async threads.
    ///
    /// Writes the lost majority acknowledged beyond this replica's log are gone: this is the
    /// last resort when a quorum will never come back, not a way to speed up a failover.
    ///
    /// # Errors
    ///
    /// `RecoveryRefused` (this node is among the lost, the range keeps a quorum, the replica
    /// holds no data, a merge froze it, its membership changed: nothing changed),
    /// `RangeNotFound`, `ReplicaFailed`, or a store failure (the replica is then isolated).
    pub fn force_alone(
        &self,
        range: RangeId,
        lost: &BTreeSet<NodeId>,
        expect_conf_ver: Option<u64>,
        min_conf_ver: u64,
    ) -> Result<ForcedRange> {
        self.check_lost(range, lost)?;
        life::force_alone(&self.shared, range, lost, expect_conf_ver, min_conf_ver)
    }

    /// Destroys this node's replica of `range`, left behind by a membership forced elsewhere
    /// (conf_ver `newer_conf_ver`): raft state and data deleted, a tombstone written, so that
    /// the new membership can place a fresh replica here. Blocks on the replica's round.
    ///
    /// # Errors
    ///
    /// `RecoveryRefused` (`NotStale`: the replica is not older than `newer_conf_ver`),
    /// `RangeNotFound`, a store failure.
    pub fn retire_replica(&self, range: RangeId, newer_conf_ver: u64) -> Result<()> {
        life::retire_stale(&self.shared, range, newer_conf_ver)
    }

    /// Treats `node` as gone for good (it was removed from the node registry): down at once
    /// and for good, whatever the transport hears, so that the groups it led elect elsewhere
    /// now and placement counts it dead (`NodeLiveness::removed`). Idempotent; returns
    /// whether it was news.
    pub fn declare_removed(&self, node: NodeId) -> bool {
        node != self.shared.node && self.shared.liveness.remove(node)
    }

    fn check_lost(&self, range: RangeId, lost: &BTreeSet<NodeId>) -> Result<()> {
        if lost.contains(&self.shared.node) {
            return Err(Error::RecoveryRefused {
                range,
                why: RecoveryRefusal::LostIncludesSelf(self.shared.node),
            });
        }
        Ok(())
    }
}
