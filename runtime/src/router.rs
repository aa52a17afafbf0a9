//! The range router: an ordered map from start key to range descriptor, so that finding the
//! range of a key is one `range(..=key).next_back()` lookup.
//!
//! The map only holds ranges that have a replica on this node and whose descriptor is known
//! (initialized replicas). It is read on every request and written only when a range is
//! created, changes shape (split, merge) or is removed, so it is an `RwLock` over a `BTreeSet`.
//!
//! Memory: with 100,000 ranges per node the router is part of the cost of an idle group. It
//! holds each descriptor as an `Arc` shared with the replica's storage (one copy per replica,
//! not two), and keys its set by the descriptor's own start key (no copy of the key either).

use std::borrow::Borrow;
use std::collections::{BTreeSet, HashMap};
use std::ops::Bound;
use std::sync::Arc;

use flotilla_proto::meta::RangeDescriptor;
use flotilla_proto::RangeId;
use parking_lot::RwLock;

use crate::error::{Error, Result};

/// Ordered map of the ranges hosted on this node.
#[derive(Debug, Default)]
pub struct RangeRouter {
    inner: RwLock<Inner>,
}

/// A descriptor ordered (and looked up, through `Borrow<[u8]>`) by its start key.
#[derive(Debug, Clone)]
struct ByStart(Arc<RangeDescriptor>);

impl Borrow<[u8]> for ByStart {
    fn borrow(&self) -> &[u8] {
        &self.0.start_key
    }
}

impl PartialEq for ByStart {
    fn eq(&self, other: &Self) -> bool {
        self.0.start_key == other.0.start_key
    }
}

impl Eq for ByStart {}

impl PartialOrd for ByStart {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for ByStart {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        self.0.start_key[..].cmp(&other.0.start_key[..])
    }
}

#[derive(Debug, Default)]
struct Inner {
    by_start: BTreeSet<ByStart>,
    /// range id → descriptor, so that replacing a range that changed shape is O(log n).
    by_id: HashMap<u64, Arc<RangeDescriptor>>,
}

impl Inner {
    /// The ranges overlapping `[start, end)` (empty end: unbounded), in key order.
    fn overlapping(&self, start: &[u8], end: &[u8]) -> Vec<Arc<RangeDescriptor>> {
        let mut out = Vec::new();
        if let Some(ByStart(d)) = self
            .by_start
            .range::<[u8], _>((Bound::Unbounded, Bound::Excluded(start)))
            .next_back()
        {
            if d.end_key.is_empty() || &d.end_key[..] > start {
                out.push(d.clone());
            }
        }
        for ByStart(d) in self
            .by_start
            .range::<[u8], _>((Bound::Included(start), Bound::Unbounded))
        {
            if !end.is_empty() && &d.start_key[..] >= end {
                break;
            }
            out.push(d.clone());
        }
        out
    }

    fn owner(&self, key: &[u8]) -> Option<&RangeDescriptor> {
        match self
            .by_start
            .range::<[u8], _>((Bound::Unbounded, Bound::Included(key)))
            .next_back()
        {
            Some(ByStart(d)) if d.contains(key) => Some(d),
            _ => None,
        }
    }

    fn remove(&mut self, id: u64) -> Option<Arc<RangeDescriptor>> {
        let d = self.by_id.remove(&id)?;
        self.by_start.remove(&d.start_key[..]);
        Some(d)
    }
}

impl RangeRouter {
    /// An empty router.
    pub fn new() -> Self {
        Self::default()
    }

    /// The descriptor of the range holding `key`.
    pub fn lookup(&self, key: &[u8]) -> Result<RangeDescriptor> {
        self.with_range(key, RangeDescriptor::clone)
    }

    /// Calls `f` on the descriptor of the range holding `key`, without copying it.
    pub fn with_range<R>(&self, key: &[u8], f: impl FnOnce(&RangeDescriptor) -> R) -> Result<R> {
        match self.inner.read().owner(key) {
            Some(d) => Ok(f(d)),
            None => Err(Error::KeyNotInRange { key: key.to_vec() }),
        }
    }

    /// Inserts or replaces `desc` (by range id), removing every range it overlaps (a newer
    /// descriptor, from a split, merge or snapshot, supersedes the old shape); returns the
    /// ranges it displaced. Pass the replica storage's `Arc` to share one copy. The system
    /// range ([`RangeId::SYSTEM`]) holds no user key and is never inserted: no key ever
    /// routes to it.
    pub fn upsert(&self, desc: impl Into<Arc<RangeDescriptor>>) -> Vec<RangeDescriptor> {
        let desc = desc.into();
        if desc.id().is_system() {
            return Vec::new();
        }
        let mut inner = self.inner.write();
        inner.remove(desc.range_id);
        let mut displaced = Vec::new();
        for d in inner.overlapping(&desc.start_key, &desc.end_key) {
            inner.remove(d.range_id);
            displaced.push(Arc::unwrap_or_clone(d));
        }
        inner.by_id.insert(desc.range_id, desc.clone());
        inner.by_start.insert(ByStart(desc));
        displaced
    }

    /// Removes range `id`, if present.
    pub fn remove(&self, id: RangeId) -> Option<RangeDescriptor> {
        let d = self.inner.write().remove(id.0)?;
        Some(Arc::unwrap_or_clone(d))
    }

    /// The descriptor of range `id`, if present.
    pub fn get(&self, id: RangeId) -> Option<RangeDescriptor> {
        let inner = self.inner.read();
        inner.by_id.get(&id.0).map(|d| RangeDescriptor::clone(d))
    }

    /// The ranges overlapping `[start, end)` (empty end: unbounded), in key order.
    pub fn overlapping(&self, start: &[u8], end: &[u8]) -> Vec<RangeDescriptor> {
        let inner = self.inner.read();
        inner
            .overlapping(start, end)
            .into_iter()
            .map(Arc::unwrap_or_clone)
            .collect()
    }

    /// The ranges hosted here right before and right after `desc` in key order, each only
    /// if adjacent to it (its end is `desc`'s start, its start is `desc`'s end).
    pub fn neighbours(
        &self,
        desc: &RangeDescriptor,
    ) -> (Option<RangeDescriptor>, Option<RangeDescriptor>) {
        let inner = self.inner.read();
        let left = inner
            .by_start
            .range::<[u8], _>((Bound::Unbounded, Bound::Excluded(&desc.start_key[..])))
            .next_back()
            .filter(|ByStart(d)| !desc.start_key.is_empty() && d.end_key == desc.start_key)
            .map(|ByStart(d)| RangeDescriptor::clone(d));
        let right = if desc.end_key.is_empty() {
            None
        } else {
            inner
                .by_start
                .get(&desc.end_key[..])
                .map(|ByStart(d)| RangeDescriptor::clone(d))
        };
        (left, right)
    }

    /// All ranges, in key order.
    pub fn all(&self) -> Vec<RangeDescriptor> {
        let inner = self.inner.read();
        inner
            .by_start
            .iter()
            .map(|ByStart(d)| RangeDescriptor::clone(d))
            .collect()
    }

    /// Number of ranges.
    pub fn len(&self) -> usize {
        self.inner.read().by_start.len()
    }

    /// True if no range is hosted.
    pub fn is_empty(&self) -> bool {
        self.inner.read().by_start.is_empty()
    }
}

/// Whether two half-open ranges (empty end = unbounded) share a key. The system range shares
/// no key with any range.
pub(crate) fn overlaps(a: &RangeDescriptor, b: &RangeDescriptor) -> bool {
    if a.id().is_system() || b.id().is_system() {
        return false;
    }
    let a_before_b_ends = b.end_key.is_empty() || a.start_key < b.end_key;
    let b_before_a_ends = a.end_key.is_empty() || b.start_key < a.end_key;
    a_before_b_ends && b_before_a_ends
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn desc(id: u64, start: &[u8], end: &[u8]) -> RangeDescriptor {
        RangeDescriptor {
            range_id: id,
            start_key: start.to_vec().into(),
            end_key: end.to_vec().into(),
            ..Default::default()
        }
    }

    #[test]
    fn the_system_range_is_never_routed_to() {
        let r = RangeRouter::new();
        r.upsert(desc(1, b"", b""));
        let displaced = r.upsert(desc(RangeId::SYSTEM.0, b"", b""));
        assert!(displaced.is_empty());
        assert_eq!(r.lookup(b"any").unwrap().id(), RangeId(1));
        assert!(r.get(RangeId::SYSTEM).is_none());
        assert!(!overlaps(
            &desc(RangeId::SYSTEM.0, b"", b""),
            &desc(1, b"", b"")
        ));
    }

    #[test]
    fn lookup_finds_the_owner_and_reports_gaps() {
        let r = RangeRouter::new();
        r.upsert(desc(1, b"", b"m"));
        r.upsert(desc(2, b"p", b""));
        assert_eq!(r.lookup(b"").unwrap().id(), RangeId(1));
        assert_eq!(r.lookup(b"l\xff").unwrap().id(), RangeId(1));
        assert!(matches!(r.lookup(b"m"), Err(Error::KeyNotInRange { .. })));
        assert!(matches!(r.lookup(b"o"), Err(Error::KeyNotInRange { .. })));
        assert_eq!(r.lookup(b"p").unwrap().id(), RangeId(2));
        assert_eq!(r.lookup(b"\xff\xff").unwrap().id(), RangeId(2));
    }

    #[test]
    fn neighbours_are_the_adjacent_ranges_hosted_here() {
        let r = RangeRouter::new();
        r.upsert(desc(1, b"", b"c"));
        r.upsert(desc(2, b"c", b"f"));
        r.upsert(desc(3, b"g", b""));
        let ids = |(l, r): (Option<RangeDescriptor>, Option<RangeDescriptor>)| {
            (l.map(|d| d.range_id), r.map(|d| d.range_id))
        };
        assert_eq!(ids(r.neighbours(&desc(1, b"", b"c"))), (None, Some(2)));
        // [f, g) is not hosted here: range 2 has no right neighbour, range 3 no left one.
        assert_eq!(ids(r.neighbours(&desc(2, b"c", b"f"))), (Some(1), None));
        assert_eq!(ids(r.neighbours(&desc(3, b"g", b""))), (None, None));
    }

    #[test]
    fn upsert_replaces_overlapping_and_moved_ranges() {
        let r = RangeRouter::new();
        r.upsert(desc(1, b"", b""));
        // A split: range 1 shrinks, range 2 takes the right half.
        r.upsert(desc(1, b"", b"k"));
        r.upsert(desc(2, b"k", b""));
        assert_eq!(r.len(), 2);
        // A merge back: range 1 grows and displaces range 2.
        let displaced = r.upsert(desc(1, b"", b""));
        assert_eq!(displaced.len(), 1);
        assert_eq!(displaced[0].range_id, 2);
        assert_eq!(r.len(), 1);
    }

    #[test]
    fn overlapping_finds_exactly_the_intersecting_ranges() {
        let r = RangeRouter::new();
        r.upsert(desc(1, b"", b"c"));
        r.upsert(desc(2, b"c", b"f"));
        r.upsert(desc(3, b"f", b""));
        let ids = |v: Vec<RangeDescriptor>| v.iter().map(|d| d.range_id).collect::<Vec<_>>();
        assert_eq!(ids(r.overlapping(b"a", b"b")), vec![1]);
        assert_eq!(ids(r.overlapping(b"b", b"d")), vec![1, 2]);
        assert_eq!(ids(r.overlapping(b"c", b"f")), vec![2]);
        assert_eq!(ids(r.overlapping(b"e", b"")), vec![2, 3]);
        assert_eq!(ids(r.overlapping(b"", b"")), vec![1, 2, 3]);
        assert_eq!(r.get(RangeId(2)).unwrap().start_key, &b"c"[..]);
    }

    proptest! {
        /// After any sequence of splits and merges applied through `upsert`, the ranges never
        /// overlap and together cover the whole key space.
        #[test]
        fn splits_and_merges_keep_a_partition(ops in proptest::collection::vec((any::<bool>(), any::<u8>(), any::<u8>()), 1..60)) {
            let r = RangeRouter::new();
            r.upsert(desc(1, b"", b""));
            let mut next_id = 2;
            for (split, pick, key) in ops {
                let all = r.all();
                let target = all[pick as usize % all.len()].clone();
                if split {
                    let k = vec![key];
                    if !target.contains(&k) || k.as_slice() == &target.start_key[..] {
                        continue;
                    }
                    r.upsert(desc(target.range_id, &target.start_key, &k));
                    r.upsert(desc(next_id, &k, &target.end_key));
                    next_id += 1;
                } else {
                    // Merge target with its right neighbour, if any.
                    let Some(right) = all.iter().find(|d| d.start_key == target.end_key && !target.end_key.is_empty()) else { continue };
                    r.upsert(desc(target.range_id, &target.start_key, &right.end_key));
                }
                let all = r.all();
                prop_assert!(all[0].start_key.is_empty());
                prop_assert!(all.last().unwrap().end_key.is_empty());
                for w in all.windows(2) {
                    prop_assert_eq!(&w[0].end_key, &w[1].start_key);
                }
                for k in 0u8..=255 {
                    prop_assert!(r.lookup(&[k]).is_ok());
                }
            }
        }
    }
}
