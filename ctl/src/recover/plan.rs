//! The recovery's decision, a pure function of what the surviving nodes reported: which
//! ranges lost a quorum to the lost nodes, which replica of each continues, which are retired,
//! and the mistakes that stop everything before anything changes (see the parent module).

use std::collections::{BTreeMap, BTreeSet};

use flotilla_proto::admin::{RecoveryReplica, RecoveryReportResponse};
use flotilla_proto::meta::{NodeRecord, NodeState};

use super::{epoch, range_name, SYSTEM};

/// Why no plan could be made (nothing was changed).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PlanError {
    /// `--lost` names node 0.
    #[error("--lost: node id 0 is never a node")]
    ZeroNode,
    /// An endpoint did not answer: it may hold the best copy of a range.
    #[error(
        "endpoint {endpoint} did not answer ({why}): every surviving node must report before \
         anything is decided; if that node is gone for good, drop it from --endpoints and add \
         its id to --lost"
    )]
    Unreachable {
        /// The endpoint.
        endpoint: String,
        /// Its error.
        why: String,
    },
    /// A node that answered is declared lost.
    #[error("node {node} (endpoint {endpoint}) answers, so it is not lost: correct --lost")]
    LostNodeAnswered {
        /// The node.
        node: u64,
        /// Its endpoint.
        endpoint: String,
    },
    /// A node that matters is neither reachable nor declared lost.
    #[error(
        "node {node} {why}, but it is neither among the reachable --endpoints nor in --lost: \
         give its endpoint, or add it to --lost if it is gone for good"
    )]
    Unaccounted {
        /// The node.
        node: u64,
        /// Why it matters.
        why: String,
    },
    /// A lost node that no report and no registry knows.
    #[error(
        "node {0} (in --lost) is in no range's membership and not in the registry: correct --lost"
    )]
    UnknownLostNode(u64),
}

/// One range to force.
#[derive(Debug, Clone, PartialEq)]
pub struct RangePlan {
    /// The range.
    pub range_id: u64,
    /// The node whose replica continues.
    pub survivor: u64,
    /// That replica's report.
    pub replica: RecoveryReplica,
    /// The nodes of the newest membership's voters (before).
    pub voters_before: Vec<u64>,
    /// The conf_ver above every reported replica's: the forced membership's.
    pub min_conf_ver: u64,
    /// The other reporting nodes' replicas, retired once the survivor is forced.
    pub retire: Vec<u64>,
}

/// What `recover` will do.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Plan {
    /// The lost nodes.
    pub lost: BTreeSet<u64>,
    /// Ranges to force: the system range first, then by id.
    pub ranges: Vec<RangePlan>,
    /// Ranges some node reported but whose newest membership keeps a quorum: left alone.
    pub left_alone: Vec<u64>,
    /// Key intervals `[start, end)` (empty end: the end of the key space) that no reachable
    /// node serves: their ranges had every replica on the lost nodes and are gone entirely.
    pub lost_entirely: Vec<(Vec<u8>, Vec<u8>)>,
    /// Whether some reachable node holds a replica of the system range (the registry can be
    /// read and changed through it).
    pub registry_reachable: bool,
}

/// Makes the plan from every reachable node's report (`reports`: node id → its answer to the
/// second round, which lists its replicas of every candidate range) and `registry` (the
/// union of the nodes' stale registry views).
///
/// # Errors
///
/// [`PlanError`]: a node that matters is unaccounted for, a lost node is unknown.
pub fn plan(
    lost: &BTreeSet<u64>,
    reports: &BTreeMap<u64, RecoveryReportResponse>,
    registry: &[NodeRecord],
) -> Result<Plan, PlanError> {
    let answering: BTreeSet<u64> = reports.keys().copied().collect();
    let mut by_range: BTreeMap<u64, Vec<(u64, &RecoveryReplica)>> = BTreeMap::new();
    for (&node, report) in reports {
        for r in &report.replicas {
            by_range.entry(r.range_id).or_default().push((node, r));
        }
    }
    // Every node of the registry matters (it may hold ranges nobody reported).
    for n in registry {
        let id = n.node_id;
        if n.state != NodeState::Removed as i32 && !lost.contains(&id) && !answering.contains(&id) {
            return Err(PlanError::Unaccounted {
                node: id,
                why: "is in the node registry".into(),
            });
        }
    }
    let mut out = Plan {
        lost: lost.clone(),
        registry_reachable: !registry.is_empty(),
        ..Plan::default()
    };
    let mut known: BTreeSet<u64> = registry.iter().map(|n| n.node_id).collect();
    for (&range_id, replicas) in &by_range {
        for (_, r) in replicas {
            if let Some(d) = &r.descriptor {
                known.extend(d.replicas.iter().map(|p| p.node_id));
            }
        }
        // The newest membership any node applied.
        let Some((_, newest)) = replicas
            .iter()
            .filter(|(_, r)| r.descriptor.is_some() && !r.voters.is_empty())
            .max_by_key(|(node, r)| (epoch(r), std::cmp::Reverse(*node)))
        else {
            // Only uninitialized replicas: nothing to judge by, nothing to recover from.
            continue;
        };
        let desc = newest.descriptor.as_ref().expect("filtered");
        let node_of = |id: &u64| {
            desc.replicas
                .iter()
                .find(|p| p.replica_id == *id)
                .map_or(0, |p| p.node_id)
        };
        let quorum_lost = [&newest.voters, &newest.voters_outgoing]
            .into_iter()
            .filter(|half| !half.is_empty())
            .any(|half| {
                let alive = half
                    .iter()
                    .filter(|id| !lost.contains(&node_of(id)))
                    .count();
                alive < half.len() / 2 + 1
            });
        if !quorum_lost {
            out.left_alone.push(range_id);
            continue;
        }
        for p in &desc.replicas {
            if !lost.contains(&p.node_id) && !answering.contains(&p.node_id) {
                return Err(PlanError::Unaccounted {
                    node: p.node_id,
                    why: format!("holds a replica of {}", range_name(range_id)),
                });
            }
        }
        // Of the replicas holding data (the newest one does), the one with the highest last
        // log (term, index).
        let survivor = replicas
            .iter()
            .filter(|(_, r)| {
                r.descriptor.is_some() && !(r.voters.is_empty() && r.learners.is_empty())
            })
            .max_by_key(|(node, r)| {
                (
                    (r.last_term, r.last_index),
                    r.commit,
                    r.applied,
                    newest.voters.contains(&r.replica_id),
                    std::cmp::Reverse(*node),
                )
            });
        let &(survivor, replica) = survivor.expect("the newest replica holds data");
        let min_conf_ver = replicas.iter().map(|(_, r)| epoch(r).1).max().unwrap_or(0) + 1;
        out.ranges.push(RangePlan {
            range_id,
            survivor,
            replica: replica.clone(),
            voters_before: newest.voters.iter().map(node_of).collect(),
            min_conf_ver,
            retire: replicas
                .iter()
                .map(|(n, _)| *n)
                .filter(|&n| n != survivor)
                .collect(),
        });
    }
    if !registry.is_empty() {
        if let Some(&n) = lost.iter().find(|n| !known.contains(n)) {
            return Err(PlanError::UnknownLostNode(n));
        }
    }
    // The system range first: it holds the registry, where the lost nodes are marked removed
    // before anything else is forced.
    out.ranges
        .sort_by_key(|r| (r.range_id != SYSTEM, r.range_id));
    Ok(out)
}

/// The key intervals the range table (`ranges`, sorted by start key: every reachable node's
/// ranges, newest descriptors) leaves uncovered.
pub fn gaps(ranges: &[flotilla_proto::admin::RangeInfo]) -> Vec<(Vec<u8>, Vec<u8>)> {
    let mut out = Vec::new();
    // Covered so far: [start of the key space, covered); `None`: to the end.
    let mut covered: Option<Vec<u8>> = Some(Vec::new());
    for r in ranges {
        let Some(to) = &covered else {
            break;
        };
        if r.start_key.as_ref() > to.as_slice() {
            out.push((to.clone(), r.start_key.to_vec()));
        }
        if r.end_key.is_empty() {
            covered = None;
        } else if r.end_key.as_ref() > to.as_slice() {
            covered = Some(r.end_key.to_vec());
        }
    }
    if let Some(to) = covered {
        out.push((to, Vec::new()));
    }
    out
}

#[cfg(test)]
mod tests {
    use flotilla_proto::meta::{RangeDescriptor, RangeEpoch, ReplicaDescriptor, ReplicaRole};

    use super::*;

    /// A report of replica `replica` (on `node`) of range `range` whose descriptor has
    /// voters `(replica id, node)` at conf_ver `conf_ver`, its log ending at `last`.
    fn replica(
        range: u64,
        replica: u64,
        voters: &[(u64, u64)],
        conf_ver: u64,
        last: (u64, u64),
    ) -> RecoveryReplica {
        RecoveryReplica {
            range_id: range,
            replica_id: replica,
            descriptor: Some(RangeDescriptor {
                range_id: range,
                epoch: Some(RangeEpoch {
                    conf_ver,
                    version: 1,
                }),
                replicas: voters
                    .iter()
                    .map(|&(id, node)| ReplicaDescriptor {
                        replica_id: id,
                        node_id: node,
                        role: ReplicaRole::Voter as i32,
                    })
                    .collect(),
                ..Default::default()
            }),
            voters: voters.iter().map(|v| v.0).collect(),
            last_term: last.0,
            last_index: last.1,
            commit: last.1 - 1,
            applied: last.1 - 1,
            ..Default::default()
        }
    }

    fn reports(list: &[(u64, Vec<RecoveryReplica>)]) -> BTreeMap<u64, RecoveryReportResponse> {
        list.iter()
            .map(|(n, r)| {
                (
                    *n,
                    RecoveryReportResponse {
                        node_id: *n,
                        replicas: r.clone(),
                        registry: Vec::new(),
                    },
                )
            })
            .collect()
    }

    fn lost(ids: &[u64]) -> BTreeSet<u64> {
        ids.iter().copied().collect()
    }

    const THREE: [(u64, u64); 3] = [(1, 1), (2, 2), (3, 3)];
    const FIVE: [(u64, u64); 5] = [(1, 1), (2, 2), (3, 3), (4, 4), (5, 5)];

    #[test]
    fn the_survivor_with_the_highest_last_term_and_index_continues_and_the_others_are_retired() {
        let r = reports(&[
            (1, vec![replica(7, 1, &FIVE, 3, (5, 40))]),
            (2, vec![replica(7, 2, &FIVE, 3, (6, 12))]),
        ]);
        let p = plan(&lost(&[3, 4, 5]), &r, &[]).unwrap();
        assert_eq!(p.ranges.len(), 1);
        assert_eq!(
            p.ranges[0].survivor, 2,
            "term 6 beats a longer log of term 5"
        );
        assert_eq!(p.ranges[0].retire, vec![1]);
        assert_eq!(p.ranges[0].min_conf_ver, 4);
        assert_eq!(p.ranges[0].voters_before, vec![1, 2, 3, 4, 5]);
    }

    #[test]
    fn a_range_whose_newest_membership_keeps_a_quorum_is_left_alone() {
        // Node 1's replica missed a change that moved the range to nodes 1, 4, 5.
        let r = reports(&[
            (1, vec![replica(7, 1, &THREE, 2, (4, 30))]),
            (
                4,
                vec![replica(7, 4, &[(1, 1), (4, 4), (5, 5)], 5, (5, 50))],
            ),
            (5, vec![]),
        ]);
        let p = plan(&lost(&[2, 3]), &r, &[]).unwrap();
        assert!(p.ranges.is_empty());
        assert_eq!(p.left_alone, vec![7]);
    }

    #[test]
    fn a_node_of_a_recovered_range_must_be_reachable_or_lost() {
        let r = reports(&[(1, vec![replica(7, 1, &FIVE, 3, (5, 40))])]);
        let e = plan(&lost(&[3, 4, 5]), &r, &[]).unwrap_err();
        assert_eq!(
            e,
            PlanError::Unaccounted {
                node: 2,
                why: "holds a replica of r7".into()
            }
        );
    }

    #[test]
    fn every_registry_node_must_be_reachable_or_lost_and_every_lost_node_known() {
        let rec = |id, state: NodeState| NodeRecord {
            node_id: id,
            state: state as i32,
            ..Default::default()
        };
        let r = reports(&[(1, vec![replica(SYSTEM, 1, &THREE, 1, (3, 20))])]);
        let registry = [
            rec(1, NodeState::Up),
            rec(2, NodeState::Up),
            rec(3, NodeState::Up),
            rec(4, NodeState::Up),
            rec(5, NodeState::Removed),
        ];
        let e = plan(&lost(&[2, 3]), &r, &registry).unwrap_err();
        assert!(matches!(e, PlanError::Unaccounted { node: 4, .. }), "{e}");
        let p = plan(&lost(&[2, 3, 4]), &r, &registry).unwrap();
        assert_eq!(p.ranges[0].range_id, SYSTEM);
        assert!(p.registry_reachable);
        let e = plan(&lost(&[2, 3, 4, 9]), &r, &registry).unwrap_err();
        assert_eq!(e, PlanError::UnknownLostNode(9));
    }

    #[test]
    fn the_system_range_goes_first_and_a_joint_membership_loses_its_quorum_with_either_half() {
        let mut uninitialized = replica(9, 1, &THREE, 1, (0, 1));
        uninitialized.voters.clear();
        uninitialized.descriptor = None;
        let r = reports(&[(
            1,
            vec![
                replica(2, 1, &THREE, 1, (2, 10)),
                uninitialized,
                replica(SYSTEM, 1, &THREE, 1, (3, 20)),
            ],
        )]);
        let p = plan(&lost(&[2, 3]), &r, &[]).unwrap();
        let order: Vec<u64> = p.ranges.iter().map(|r| r.range_id).collect();
        assert_eq!(order, vec![SYSTEM, 2]);
        // r9's only report is uninitialized: nothing to judge or recover it from.
        assert!(!p.left_alone.contains(&9));
        // A joint configuration loses its quorum when either half does.
        let mut joint = replica(4, 1, &[(1, 1), (4, 4), (5, 5)], 2, (2, 10));
        joint.voters = vec![1, 4, 5];
        joint.voters_outgoing = vec![1, 2, 3];
        let d = joint.descriptor.as_mut().unwrap();
        d.replicas
            .extend([(2, 2), (3, 3)].map(|(id, node)| ReplicaDescriptor {
                replica_id: id,
                node_id: node,
                role: ReplicaRole::Voter as i32,
            }));
        let r = reports(&[(1, vec![joint]), (4, vec![]), (5, vec![])]);
        let p = plan(&lost(&[2, 3]), &r, &[]).unwrap();
        assert_eq!(p.ranges.len(), 1, "{p:?}");
    }

    #[test]
    fn key_intervals_no_range_covers_are_found() {
        use flotilla_proto::admin::RangeInfo;
        let r = |s: &str, e: &str| RangeInfo {
            start_key: s.as_bytes().to_vec().into(),
            end_key: e.as_bytes().to_vec().into(),
            ..Default::default()
        };
        assert!(gaps(&[r("", "m"), r("m", "")]).is_empty());
        let g = gaps(&[r("c", "m"), r("m", "t")]);
        assert_eq!(
            g,
            vec![(Vec::new(), b"c".to_vec()), (b"t".to_vec(), Vec::new())]
        );
        assert_eq!(gaps(&[]), vec![(Vec::new(), Vec::new())]);
    }
}
