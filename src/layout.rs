//! The initial range layout of a new cluster: `count` ranges that together cover the key
//! space, each replicated on the same members. A node process bootstraps it on a fresh store
//! (see [`crate::server`]); every member must compute the same descriptors, so everything
//! here is a pure function of `count` and the member list.

use flotilla_proto::meta::{RangeDescriptor, RangeEpoch, ReplicaDescriptor, ReplicaRole};
use flotilla_proto::{NodeId, RangeId};

/// The most ranges a layout can have: start keys carry the range number as 8 decimal digits,
/// and a ninth digit would sort range 100,000,000 before range 99,999,999.
pub const MAX_RANGES: usize = 99_999_999;

/// Descriptors of `count` ranges (ids 1..=count) that together cover the key space, each
/// replicated on `members` in the order given, with replica id = node id. Range `i` starts at
/// [`range_start_key`]`(i)`, except range 1, which starts at the beginning of the key space;
/// the last range ends at its end.
///
/// # Panics
///
/// If `count` exceeds [`MAX_RANGES`] (the start keys would no longer sort in range order).
pub fn range_layout(count: usize, members: &[NodeId]) -> Vec<RangeDescriptor> {
    assert!(
        count <= MAX_RANGES,
        "a layout has at most {MAX_RANGES} ranges"
    );
    let replicas: Vec<ReplicaDescriptor> = members
        .iter()
        .map(|n| ReplicaDescriptor {
            replica_id: n.0,
            node_id: n.0,
            role: ReplicaRole::Voter as i32,
        })
        .collect();
    // Replica ids are never reused: the next one is past every id handed out here.
    let next_replica_id = members.iter().map(|n| n.0).max().unwrap_or(0) + 1;
    let last = count as u64;
    (1..=last)
        .map(|i| RangeDescriptor {
            range_id: i,
            start_key: if i == 1 {
                Default::default()
            } else {
                range_start_key(i).into()
            },
            end_key: if i == last {
                Default::default()
            } else {
                range_start_key(i + 1).into()
            },
            epoch: Some(RangeEpoch {
                conf_ver: 1,
                version: 1,
            }),
            replicas: replicas.clone(),
            state: 0,
            next_replica_id,
            merge: None,
        })
        .collect()
}

/// The start key of range `i` of a [`range_layout`]: `"k"` followed by `i` as 8 decimal
/// digits, so that the start keys sort in range order.
pub fn range_start_key(i: u64) -> Vec<u8> {
    format!("k{i:08}").into_bytes()
}

/// The member that starts the first election of `range`: `members[range % len]`, so that the
/// first leaders are spread evenly over the members. Every member's replica is told so at
/// bootstrap, and a leader elected elsewhere hands leadership to it once it is up
/// (`NodeGroup::bootstrap_layout`). `None` if there are no members.
pub fn first_campaigner(range: RangeId, members: &[NodeId]) -> Option<NodeId> {
    if members.is_empty() {
        return None;
    }
    Some(members[(range.0 % members.len() as u64) as usize])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_layout_covers_the_key_space_without_gaps_or_overlaps() {
        let members = [NodeId(1), NodeId(2), NodeId(3)];
        let layout = range_layout(12, &members);
        assert_eq!(layout.len(), 12);
        assert!(layout[0].start_key.is_empty());
        assert!(layout[11].end_key.is_empty());
        for pair in layout.windows(2) {
            assert_eq!(pair[0].end_key, pair[1].start_key);
            assert!(pair[0].start_key < pair[1].start_key || pair[0].start_key.is_empty());
        }
        for (i, d) in layout.iter().enumerate() {
            assert_eq!(d.id(), RangeId(i as u64 + 1));
            assert_eq!(d.replicas.len(), 3);
            assert!(members.iter().all(|n| d.replica_on(*n).is_some()));
            assert_eq!(d.next_replica_id, 4);
        }
    }

    #[test]
    fn first_elections_are_spread_over_the_members() {
        let members = [NodeId(1), NodeId(2), NodeId(3)];
        let mut counts = [0; 3];
        for r in 1..=300 {
            let n = first_campaigner(RangeId(r), &members).unwrap();
            counts[n.0 as usize - 1] += 1;
        }
        assert_eq!(counts, [100, 100, 100]);
        assert_eq!(first_campaigner(RangeId(1), &[]), None);
    }
}
