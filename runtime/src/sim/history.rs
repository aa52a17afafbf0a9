//! The history a simulation records and the judge of it: per key, a register that clients
//! write unique values to and read. A history is refused when a read returns a value never
//! written (or whose write failed), a value from the future, a value older than one whose
//! write was acknowledged before the read began (a stale read; for the reads after healing,
//! a lost acknowledged write), or when two reads in real-time order see two writes in the
//! opposite order. With unique values these are the ways a register history stops being
//! linearizable that a run of this simulator can produce; a complete search (Wing–Gong) is the
//! job of the nemesis suite's checker.

use std::cell::Cell;
use std::collections::HashMap;

use super::Bug;

/// What an operation did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Kind {
    Write(Vec<u8>),
    /// What the read returned (`None`: absent, or not known yet).
    Read(Option<Vec<u8>>),
}

/// How an operation ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Outcome {
    /// Acknowledged (a write took effect; a read returned its value).
    Ok,
    /// Definitely had no effect.
    Fail,
    /// A write that may or may not have taken effect.
    Unknown,
}

/// One client operation, with its invoke and completion steps.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Op {
    pub(crate) client: u64,
    pub(crate) key: Vec<u8>,
    pub(crate) kind: Kind,
    pub(crate) outcome: Outcome,
    pub(crate) invoke: u64,
    /// `None` for an operation that never finished.
    pub(crate) complete: Option<u64>,
    /// The node it went through.
    pub(crate) node: u64,
}

/// The judgement of a history.
#[derive(Debug, Default)]
pub(crate) struct Verdict {
    pub(crate) linearizable: bool,
    pub(crate) bad_reads: usize,
    pub(crate) lost_acked: usize,
    /// The operations that show the first violation found.
    pub(crate) witness: Vec<Op>,
}

/// Judges `history` (see the module doc).
pub(crate) fn check(history: &[Op]) -> Verdict {
    let mut verdict = Verdict {
        linearizable: true,
        ..Default::default()
    };
    let mut by_key: HashMap<&[u8], Vec<&Op>> = HashMap::new();
    for op in history {
        by_key.entry(&op.key[..]).or_default().push(op);
    }
    let mut keys: Vec<_> = by_key.into_iter().collect();
    keys.sort_by(|a, b| a.0.cmp(b.0));
    for (_, ops) in keys {
        let writes: HashMap<&[u8], &Op> = ops
            .iter()
            .filter_map(|o| match &o.kind {
                Kind::Write(v) => Some((&v[..], *o)),
                Kind::Read(_) => None,
            })
            .collect();
        let acked: Vec<&Op> = ops
            .iter()
            .copied()
            .filter(|o| matches!(o.kind, Kind::Write(_)) && o.outcome == Outcome::Ok)
            .collect();
        let reads: Vec<(&Op, Option<&Op>)> = ops
            .iter()
            .copied()
            .filter(|o| o.outcome == Outcome::Ok)
            .filter_map(|o| match &o.kind {
                Kind::Read(v) => Some((o, v.as_ref().and_then(|v| writes.get(&v[..]).copied()))),
                Kind::Write(_) => None,
            })
            .collect();
        let violation = |v: &mut Verdict, ops: Vec<&Op>| {
            if v.linearizable {
                v.witness = ops.into_iter().cloned().collect();
            }
            v.linearizable = false;
        };
        // `a` finished before `b` began. A write of unknown outcome never finished: it may
        // take effect at any time after its invoke (a dropped proposal can still commit).
        let before = |a: &Op, b: &Op| {
            a.outcome != Outcome::Unknown && a.complete.is_some_and(|c| c < b.invoke)
        };
        for &(read, source) in &reads {
            let Kind::Read(value) = &read.kind else {
                unreachable!()
            };
            if value.is_some() && source.is_none_or(|w| w.outcome == Outcome::Fail) {
                verdict.bad_reads += 1;
                violation(&mut verdict, vec![read]);
                continue;
            }
            if let Some(w) = source {
                if before(read, w) {
                    violation(&mut verdict, vec![read, w]);
                    continue;
                }
            }
            // A write acknowledged before the read began, and after the read's source.
            let newer = acked.iter().find(|u| {
                source.is_none_or(|w| w.kind != u.kind && before(w, u)) && before(u, read)
            });
            if let Some(u) = newer {
                // After healing, with nothing else running, a stale final read is a lost write.
                if reads_are_final(read, ops.as_slice()) {
                    verdict.lost_acked += 1;
                }
                let mut w = vec![read, *u];
                w.extend(source);
                violation(&mut verdict, w);
            }
        }
        // Two reads in real-time order must not see two writes in the opposite order.
        for &(r1, s1) in &reads {
            for &(r2, s2) in &reads {
                if !before(r1, r2) {
                    continue;
                }
                let inverted = match (s1, s2) {
                    (Some(_), None) => true,
                    (Some(w1), Some(w2)) => before(w2, w1),
                    _ => false,
                };
                if inverted {
                    let mut w = vec![r1, r2];
                    w.extend(s1);
                    w.extend(s2);
                    violation(&mut verdict, w);
                }
            }
        }
    }
    verdict
}

/// Whether `read` began after every other operation of its key finished.
fn reads_are_final(read: &Op, ops: &[&Op]) -> bool {
    ops.iter()
        .filter(|o| !std::ptr::eq(**o, read))
        .all(|o| matches!(o.kind, Kind::Read(_)) || o.complete.is_some_and(|c| c < read.invoke))
}

thread_local! {
    static INJECTED: Cell<Option<Bug>> = const { Cell::new(None) };
}

/// Runs `f` with `bug` injected on this thread (the simulator runs every node on it).
pub(crate) fn with_bug<T>(bug: Option<Bug>, f: impl FnOnce() -> T) -> T {
    INJECTED.with(|b| b.set(bug));
    let out = f();
    INJECTED.with(|b| b.set(None));
    out
}

/// Whether `bug` is injected on this thread (read where the defect would be: `replica::read`,
/// `fsm::worker`).
pub(crate) fn injected(bug: Bug) -> bool {
    INJECTED.with(|b| b.get() == Some(bug))
}
