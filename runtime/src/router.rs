//! The range router: an ordered map from start key to range descriptor, so that finding the
//! range of a key is one `range(..=key).next_back()` lookup.
//!
//! The map only holds ranges that have a replica on this node and whose descriptor is known
//! (initialized replicas). It is read on every request and written only when a range is
//! created, changes shape (split, merge) or is removed, so it is an `RwLock` over a `BTreeMap`.

use std::collections::{BTreeMap, HashMap};
use std::ops::Bound;

use flotilla_proto::meta::RangeDescriptor;
use flotilla_proto::RangeId;
use parking_lot::RwLock;

use crate::error::{Error, Result};

/// Ordered map of the ranges hosted on this node.
#[derive(Debug, Default)]
pub struct RangeRouter {
    inner: RwLock<Inner>,
}

#[derive(Debug, Default)]
struct Inner {
    by_start: BTreeMap<Vec<u8>, RangeDescriptor>,
    /// range id → start key, so that replacing a range that changed shape is O(log n).
    start_of: HashMap<u64, Vec<u8>>,
}

impl Inner {
    /// Start keys of the ranges overlapping `[start, end)`, in key order: the range holding
    /// `start` (if any), then every range starting inside the interval.
    fn overlapping_keys(&self, start: &[u8], end: &[u8]) -> Vec<Vec<u8>> {
        let mut out = Vec::new();
        if let Some((k, d)) = self
            .by_start
            .range::<[u8], _>((Bound::Unbounded, Bound::Excluded(start)))
            .next_back()
        {
            if d.end_key.is_empty() || &d.end_key[..] > start {
                out.push(k.clone());
            }
        }
        for (k, _) in self
            .by_start
            .range::<[u8], _>((Bound::Included(start), Bound::Unbounded))
        {
            if !end.is_empty() && k.as_slice() >= end {
                break;
            }
            out.push(k.clone());
        }
        out
    }
}

impl RangeRouter {
    /// An empty router.
    pub fn new() -> Self {
        Self::default()
    }

    /// The range that contains `key`.
    pub fn lookup(&self, key: &[u8]) -> Result<RangeDescriptor> {
        let inner = self.inner.read();
        match inner
            .by_start
            .range::<[u8], _>((Bound::Unbounded, Bound::Included(key)))
            .next_back()
        {
            Some((_, d)) if d.contains(key) => Ok(d.clone()),
            _ => Err(Error::KeyNotInRange { key: key.to_vec() }),
        }
    }

    /// Calls `f` with the range that contains `key`, under the read lock and without cloning
    /// it (the per-request routing of batches).
    pub fn with_range<R>(&self, key: &[u8], f: impl FnOnce(&RangeDescriptor) -> R) -> Result<R> {
        let inner = self.inner.read();
        match inner
            .by_start
            .range::<[u8], _>((Bound::Unbounded, Bound::Included(key)))
            .next_back()
        {
            Some((_, d)) if d.contains(key) => Ok(f(d)),
            _ => Err(Error::KeyNotInRange { key: key.to_vec() }),
        }
    }

    /// Inserts or replaces `desc`. Any other range it overlaps is removed first: a newer
    /// descriptor (from a split, merge or snapshot) supersedes the old shape. Returns the
    /// ranges that were displaced. The system range ([`RangeId::SYSTEM`]) holds no user key
    /// and is never inserted: no key ever routes to it.
    pub fn upsert(&self, desc: RangeDescriptor) -> Vec<RangeDescriptor> {
        if desc.id().is_system() {
            return Vec::new();
        }
        let mut inner = self.inner.write();
        if let Some(old) = inner.start_of.remove(&desc.range_id) {
            inner.by_start.remove(&old);
        }
        let mut displaced = Vec::new();
        for k in inner.overlapping_keys(&desc.start_key, &desc.end_key) {
            if let Some(d) = inner.by_start.remove(&k) {
                inner.start_of.remove(&d.range_id);
                displaced.push(d);
            }
        }
        inner
            .start_of
            .insert(desc.range_id, desc.start_key.to_vec());
        inner.by_start.insert(desc.start_key.to_vec(), desc);
        displaced
    }

    /// Removes range `id`, if present.
    pub fn remove(&self, id: RangeId) -> Option<RangeDescriptor> {
        let mut inner = self.inner.write();
        let key = inner.start_of.remove(&id.0)?;
        inner.by_start.remove(&key)
    }

    /// The descriptor of range `id`, if present.
    pub fn get(&self, id: RangeId) -> Option<RangeDescriptor> {
        let inner = self.inner.read();
        let key = inner.start_of.get(&id.0)?;
        inner.by_start.get(key).cloned()
    }

    /// The ranges overlapping `[start, end)` (empty end: unbounded), in key order.
    pub fn overlapping(&self, start: &[u8], end: &[u8]) -> Vec<RangeDescriptor> {
        let inner = self.inner.read();
        inner
            .overlapping_keys(start, end)
            .into_iter()
            .filter_map(|k| inner.by_start.get(&k).cloned())
            .collect()
    }

    /// All ranges, in key order.
    pub fn all(&self) -> Vec<RangeDescriptor> {
        self.inner.read().by_start.values().cloned().collect()
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
