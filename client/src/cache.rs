//! The client's view of the key space: range descriptors by start key, each with the node the
//! client believes leads it. Filled on demand (a `Locate` on a miss, or every range at once
//! from the admin `Ranges` RPC) and corrected by the answers of nodes: `NOT_LEADER` moves the
//! leader, `EPOCH_NOT_MATCH` replaces the descriptors it names.
//!
//! A descriptor never replaces a newer one: among overlapping ranges the higher epoch version
//! wins (splits and merges bump it), and for the same range at the same version the higher
//! membership version; so a lagging node's answer cannot undo what a leader said.

use std::collections::BTreeMap;
use std::ops::Bound;
use std::sync::Arc;

use flotilla_proto::meta::RangeDescriptor;
use parking_lot::RwLock;

/// A cached range: its descriptor and the node believed to lead it.
#[derive(Debug, Clone, PartialEq)]
pub struct CachedRange {
    /// The range as a node last described it.
    pub desc: RangeDescriptor,
    /// The node believed to host the leader; `None` if unknown.
    pub leader: Option<u64>,
}

#[derive(Debug, Default)]
pub(crate) struct RangeCache {
    /// Shared entries, so that a lookup (every request) clones a pointer, not a descriptor.
    by_start: RwLock<BTreeMap<Vec<u8>, Arc<CachedRange>>>,
}

fn overlaps(a: &RangeDescriptor, start: &[u8], end: &[u8]) -> bool {
    let a_before_end = end.is_empty() || a.start_key[..] < *end;
    let a_after_start = a.end_key.is_empty() || a.end_key[..] > *start;
    a_before_end && a_after_start
}

/// Whether `old` is newer than `new` (so `new` must not replace it).
fn newer(old: &RangeDescriptor, new: &RangeDescriptor) -> bool {
    let (o, n) = (old.epoch_or_default(), new.epoch_or_default());
    o.version > n.version
        || (old.range_id == new.range_id && o.version == n.version && o.conf_ver > n.conf_ver)
}

impl RangeCache {
    /// The cached range that contains `key`.
    pub(crate) fn lookup(&self, key: &[u8]) -> Option<Arc<CachedRange>> {
        let map = self.by_start.read();
        map.range::<[u8], _>((Bound::Unbounded, Bound::Included(key)))
            .next_back()
            .map(|(_, r)| r)
            .filter(|r| r.desc.contains(key))
            .cloned()
    }

    /// Inserts `desc` (with `leader`, if known), dropping the cached ranges it overlaps;
    /// ignored if one of them is newer. A range kept under the same id and epoch keeps its
    /// known leader when `leader` is `None`. Returns whether it was inserted.
    pub(crate) fn insert(&self, desc: RangeDescriptor, leader: Option<u64>) -> bool {
        let mut map = self.by_start.write();
        // Overlapping entries: the one starting before `desc` (if it reaches into it), and
        // those starting inside it.
        let mut hit: Vec<Vec<u8>> = Vec::new();
        if let Some((k, r)) = map
            .range::<[u8], _>((Bound::Unbounded, Bound::Excluded(&desc.start_key[..])))
            .next_back()
        {
            if overlaps(&r.desc, &desc.start_key, &desc.end_key) {
                hit.push(k.clone());
            }
        }
        for (k, r) in map.range::<[u8], _>((Bound::Included(&desc.start_key[..]), Bound::Unbounded))
        {
            if !overlaps(&r.desc, &desc.start_key, &desc.end_key) {
                break;
            }
            hit.push(k.clone());
        }
        if hit.iter().any(|k| newer(&map[k].desc, &desc)) {
            return false;
        }
        let mut leader = leader;
        for k in hit {
            if let Some(old) = map.remove(&k) {
                if leader.is_none()
                    && old.desc.range_id == desc.range_id
                    && old.desc.epoch == desc.epoch
                {
                    leader = old.leader;
                }
            }
        }
        map.insert(
            desc.start_key.to_vec(),
            Arc::new(CachedRange { desc, leader }),
        );
        true
    }

    /// Records `leader` as the leader of `range` (`None`: unknown).
    pub(crate) fn set_leader(&self, range: u64, leader: Option<u64>) {
        let mut map = self.by_start.write();
        if let Some(r) = map.values_mut().find(|r| r.desc.range_id == range) {
            if r.leader != leader {
                Arc::make_mut(r).leader = leader;
            }
        }
    }

    /// Forgets `range`: the next request for its keys looks them up again.
    pub(crate) fn invalidate(&self, range: u64) {
        let mut map = self.by_start.write();
        map.retain(|_, r| r.desc.range_id != range);
    }

    /// Forgets every leader on `node` (it went down).
    pub(crate) fn forget_leader_on(&self, node: u64) {
        let mut map = self.by_start.write();
        for r in map.values_mut() {
            if r.leader == Some(node) {
                Arc::make_mut(r).leader = None;
            }
        }
    }

    /// Every cached range, in key order.
    pub(crate) fn all(&self) -> Vec<CachedRange> {
        self.by_start
            .read()
            .values()
            .map(|r| CachedRange::clone(r))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use flotilla_proto::meta::{RangeDescriptor, RangeEpoch};

    use super::RangeCache;

    fn desc(id: u64, start: &str, end: &str, version: u64) -> RangeDescriptor {
        RangeDescriptor {
            range_id: id,
            start_key: start.as_bytes().to_vec().into(),
            end_key: end.as_bytes().to_vec().into(),
            epoch: Some(RangeEpoch {
                conf_ver: 1,
                version,
            }),
            ..Default::default()
        }
    }

    #[test]
    fn a_split_replaces_its_parent_and_an_older_descriptor_is_ignored() {
        let c = RangeCache::default();
        assert!(c.insert(desc(1, "", "m", 1), Some(1)));
        assert!(c.insert(desc(2, "m", "", 1), Some(2)));
        assert_eq!(c.lookup(b"a").unwrap().leader, Some(1));
        // Range 1 split at "f" (version 2 for both halves).
        assert!(c.insert(desc(3, "f", "m", 2), None));
        assert_eq!(c.lookup(b"g").unwrap().desc.range_id, 3);
        assert!(
            c.lookup(b"a").is_none(),
            "the parent is gone until looked up again"
        );
        // A lagging node's view of the parent does not come back.
        assert!(!c.insert(desc(1, "", "m", 1), Some(1)));
        assert!(c.insert(desc(1, "", "f", 2), None));
        assert_eq!(c.lookup(b"a").unwrap().desc.range_id, 1);
        // A merge of 1 and 3 (version 3) replaces both.
        assert!(c.insert(desc(1, "", "m", 3), Some(2)));
        assert_eq!(c.lookup(b"g").unwrap().desc.range_id, 1);
        assert_eq!(c.all().len(), 2);
        c.forget_leader_on(2);
        assert_eq!(c.lookup(b"z").unwrap().leader, None);
        c.set_leader(2, Some(3));
        assert_eq!(c.lookup(b"z").unwrap().leader, Some(3));
        c.invalidate(2);
        assert!(c.lookup(b"z").is_none());
    }
}
