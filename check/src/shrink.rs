//! Shrinking a non-linearizable key history to a small witness.
//!
//! Only *sound* removals are made: a read, or a write whose value no remaining read observes.
//! If the whole history were linearizable, so would be any sub-history reached that way (a
//! read never constrains the others; an unobserved write can be cut out of a linearization
//! without changing what any remaining read saw), so the witness fails only if the history
//! does. The search narrows the time window first (binary search on a suffix, then a prefix),
//! then removes chunks of halving size (delta debugging), then single operations, within a
//! budget of search steps so that a huge history cannot stall the report (the budget is
//! counted in steps, not time, so that the same history always gives the same witness). A
//! removal whose search runs out of steps is not made.

use std::collections::HashSet;

use crate::search::linearizable_within;
use crate::{KOp, Value};

/// Search steps allowed while shrinking one key (about a second or two).
const BUDGET: u64 = 30_000_000;
/// Search steps allowed for one candidate sub-history.
const PROBE: u64 = 3_000_000;

/// A sub-history of the failing `ops` that still fails; minimal (no single sound removal
/// keeps it failing) unless the budget ran out.
pub(crate) fn shrink(ops: &[KOp]) -> Vec<KOp> {
    let budget = std::cell::Cell::new(BUDGET);
    let fails = |ops: &[KOp]| {
        let mut steps = PROBE.min(budget.get());
        let before = steps;
        let verdict = linearizable_within(ops, &mut steps);
        budget.set(budget.get() - (before - steps));
        verdict == Some(false)
    };
    let mut cur: Vec<KOp> = ops.to_vec();
    cur.sort_by_key(|o| (o.call, o.ret));

    // Cut the suffix: keep the operations invoked first (plus the writes they observe).
    let (mut lo, mut hi) = (1, cur.len());
    while lo < hi {
        let mid = (lo + hi) / 2;
        let keep = sound_subset(&cur, |i| i < mid);
        if fails(&keep) {
            hi = mid;
        } else {
            lo = mid + 1;
        }
    }
    cur = sound_subset(&cur, |i| i < hi);

    // Cut the prefix: drop the operations that completed first.
    cur.sort_by_key(|o| (o.ret, o.call));
    let (mut lo, mut hi) = (0, cur.len());
    while lo < hi {
        let mid = (lo + hi).div_ceil(2);
        let keep = sound_subset(&cur, |i| i >= mid);
        if fails(&keep) {
            lo = mid;
        } else {
            hi = mid - 1;
        }
    }
    cur = sound_subset(&cur, |i| i >= lo);
    cur.sort_by_key(|o| (o.call, o.ret));

    // Remove chunks, halving their size down to single operations.
    let mut size = cur.len() / 2;
    while size >= 1 && budget.get() > 0 {
        let mut start = 0;
        while start < cur.len() && budget.get() > 0 {
            let end = (start + size).min(cur.len());
            if let Some(keep) = sound_removal(&cur, start..end) {
                if fails(&keep) {
                    cur = keep;
                    continue;
                }
            }
            start = end;
        }
        size /= 2;
    }
    cur
}

/// The operations `keep` selects by position, plus every write whose value a kept read
/// observes (so that the subset is a sound removal).
fn sound_subset(ops: &[KOp], keep: impl Fn(usize) -> bool) -> Vec<KOp> {
    let observed = observed(
        ops.iter()
            .enumerate()
            .filter(|(i, _)| keep(*i))
            .map(|(_, o)| o),
    );
    ops.iter()
        .enumerate()
        .filter(|(i, o)| keep(*i) || (o.write && observed.contains(&o.value)))
        .map(|p| *p.1)
        .collect()
}

/// `ops` without the ones at `range`, if that removal is sound.
fn sound_removal(ops: &[KOp], range: std::ops::Range<usize>) -> Option<Vec<KOp>> {
    let rest = ops
        .iter()
        .enumerate()
        .filter(|(i, _)| !range.contains(i))
        .map(|(_, o)| o);
    let observed = observed(rest.clone());
    if ops[range.clone()]
        .iter()
        .any(|o| o.write && observed.contains(&o.value))
    {
        return None;
    }
    Some(rest.copied().collect())
}

/// The values the reads among `ops` observed.
fn observed<'a>(ops: impl Iterator<Item = &'a KOp>) -> HashSet<Value> {
    ops.filter(|o| !o.write).map(|o| o.value).collect()
}
