//! flotilla-check: is a recorded history of a key-value store linearizable?
//!
//! The nemesis suite (real processes, real faults) and the deterministic simulator record what
//! their clients saw — every write and read, when it was invoked, when and how it completed —
//! and hand the history to [`check`]. Each key is an independent read/write register, so the
//! history is split per key (linearizability is compositional) and each key is searched on
//! its own.
//!
//! # The model
//!
//! An [`Op`] is a [`Kind::Write`] of a value or a [`Kind::Read`] that observed a value (or the
//! key's absence, which is also the initial state). Its [`Outcome`]:
//! - [`Outcome::Ok`]: it happened, at one instant between `invoke_ns` and `complete_ns`;
//! - [`Outcome::Fail`]: it definitely did not take effect (a failed write is left out of the
//!   search; a read of its value is a *bad read*; a failed read tells nothing);
//! - [`Outcome::Unknown`]: a write that may or may not have taken effect, at any instant after
//!   `invoke_ns` (its completion is +infinity, whatever `complete_ns` says). An unknown read
//!   tells nothing and is ignored.
//!
//! # The search
//!
//! Wing & Gong's search with Lowe's memoization (as in Knossos and Porcupine): walk the
//! invocation and completion events in time order, try to linearize each pending operation at
//! the current point, backtrack when a completion is reached whose operation was not
//! linearized. A configuration (the set of linearized operations, the register's value) seen
//! before is not explored twice. The set is kept as a 128-bit Zobrist hash (XOR of a random
//! word per operation), so a cached configuration costs 20 bytes whatever the history's size;
//! two different sets collide with probability about 2^-128 per pair, which would at worst
//! prune a branch. Unique values per key (the nemesis generates them) keep the search close to
//! linear; repeated values are handled, only slower.
//!
//! # Recording
//!
//! [`Recorder`] is the history clients share while they run: one clock, each operation with
//! the node it went through.
//!
//! # What a violation reports
//!
//! The smallest sub-history of the first failing key that still fails, found by shrinking
//! ([`Report::violation`]). Shrinking only removes reads, and writes whose value no remaining
//! read observes: removing either can never turn a linearizable history into a
//! non-linearizable one, so the witness fails only if the whole history does.

#![forbid(unsafe_code)]

mod record;
mod search;
mod shrink;

pub use record::Recorder;

use std::collections::{BTreeMap, HashMap, HashSet};

/// What an operation did to its key.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Kind {
    /// Set the key to this value.
    Write(Vec<u8>),
    /// Read the key: its value, or `None` if absent.
    Read(Option<Vec<u8>>),
}

/// How an operation ended, as far as its client knows.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Outcome {
    /// It took effect (a read: it observed `Kind::Read`'s value).
    Ok,
    /// It definitely did not take effect.
    Fail,
    /// It may or may not have taken effect, at any time after its invocation.
    Unknown,
}

/// One client operation on one key.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Op {
    /// The client that issued it (only reported, not used by the search).
    pub client: u64,
    /// The key: each key is an independent register, absent at first.
    pub key: Vec<u8>,
    /// Write or read, with the value.
    pub kind: Kind,
    /// How it ended.
    pub outcome: Outcome,
    /// When the client invoked it, in nanoseconds on one clock shared by all clients.
    pub invoke_ns: u64,
    /// When the client saw it complete; `None` (and any value for an unknown outcome) means
    /// +infinity.
    pub complete_ns: Option<u64>,
}

/// The verdict on a history.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Report {
    /// Every key's sub-history is linearizable (and no read is bad).
    pub linearizable: bool,
    /// Acknowledged writes that a final read shows never took effect: a successful read
    /// invoked after every write of the key finished observed a value (or absence) that
    /// definitely came before the write.
    pub lost_acked: usize,
    /// Successful reads of a value no write could have written: never written, or written
    /// only by writes that failed.
    pub bad_reads: usize,
    /// For a non-linearizable history: a smallest failing sub-history of the first failing
    /// key (in key order), sorted by invocation.
    pub violation: Option<Vec<Op>>,
}

/// A value of one key, interned; [`ABSENT`] is the key's absence.
pub(crate) type Value = u32;
pub(crate) const ABSENT: Value = u32::MAX;

/// An operation as the search sees it: times with +infinity as `u64::MAX`, the value interned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct KOp {
    pub(crate) call: u64,
    pub(crate) ret: u64,
    pub(crate) write: bool,
    pub(crate) value: Value,
    /// Index into the checked history, to report the original operation.
    pub(crate) index: usize,
}

/// Checks `history` (any order, any number of keys). See the crate documentation.
pub fn check(history: &[Op]) -> Report {
    let mut by_key: BTreeMap<&[u8], Vec<usize>> = BTreeMap::new();
    for (i, op) in history.iter().enumerate() {
        by_key.entry(&op.key).or_default().push(i);
    }
    let mut report = Report {
        linearizable: true,
        lost_acked: 0,
        bad_reads: 0,
        violation: None,
    };
    for indices in by_key.values() {
        let key = KeyHistory::new(history, indices);
        report.bad_reads += key.bad_reads;
        report.lost_acked += key.lost_acked();
        if !search::linearizable(&key.ops) {
            report.linearizable = false;
            if report.violation.is_none() {
                let witness = shrink::shrink(&key.ops);
                let mut ops: Vec<Op> = witness.iter().map(|o| history[o.index].clone()).collect();
                ops.sort_by_key(|o| (o.invoke_ns, o.complete_ns.unwrap_or(u64::MAX)));
                report.violation = Some(ops);
            }
        }
    }
    report
}

/// One key's operations, ready for the search.
struct KeyHistory {
    ops: Vec<KOp>,
    bad_reads: usize,
}

impl KeyHistory {
    fn new(history: &[Op], indices: &[usize]) -> KeyHistory {
        let mut interned: HashMap<&[u8], Value> = HashMap::new();
        fn intern<'a>(interned: &mut HashMap<&'a [u8], Value>, v: &'a [u8]) -> Value {
            let next = interned.len() as Value;
            *interned.entry(v).or_insert(next)
        }
        // Values some write may have written: a read of anything else is bad.
        let mut writable: HashSet<&[u8]> = HashSet::new();
        for &i in indices {
            if let (Kind::Write(v), Outcome::Ok | Outcome::Unknown) =
                (&history[i].kind, history[i].outcome)
            {
                writable.insert(v);
            }
        }
        let mut ops = Vec::with_capacity(indices.len());
        let mut bad_reads = 0;
        for &i in indices {
            let op = &history[i];
            let ret = match op.outcome {
                Outcome::Ok => op.complete_ns.unwrap_or(u64::MAX),
                Outcome::Unknown => u64::MAX,
                Outcome::Fail => continue,
            };
            let (write, value) = match (&op.kind, op.outcome) {
                (Kind::Write(v), _) => (true, intern(&mut interned, v)),
                (Kind::Read(_), Outcome::Unknown) => continue,
                (Kind::Read(None), _) => (false, ABSENT),
                (Kind::Read(Some(v)), _) => {
                    if !writable.contains(&v[..]) {
                        bad_reads += 1;
                    }
                    (false, intern(&mut interned, v))
                }
            };
            ops.push(KOp {
                call: op.invoke_ns,
                // A completion before the invocation is a recording error; treat the
                // operation as instantaneous rather than letting it confuse the event order.
                ret: ret.max(op.invoke_ns),
                write,
                value,
                index: i,
            });
        }
        // A write that may not have taken effect and whose value no read observed changes
        // nothing the search must explain: drop it (exactly, not as a heuristic). Left in,
        // every such write could be linearized at any later point, multiplying the
        // configurations by two per write.
        let observed: HashSet<Value> = ops.iter().filter(|o| !o.write).map(|o| o.value).collect();
        ops.retain(|o| !o.write || o.ret != u64::MAX || observed.contains(&o.value));
        KeyHistory { ops, bad_reads }
    }

    /// Acknowledged writes that a final read shows lost (see [`Report::lost_acked`]).
    fn lost_acked(&self) -> usize {
        let writes = || self.ops.iter().filter(|o| o.write);
        // A final read starts after every write with a completion has completed.
        let quiet = writes()
            .filter(|o| o.ret != u64::MAX)
            .map(|o| o.ret)
            .max()
            .unwrap_or(0);
        let finals: HashSet<Value> = self
            .ops
            .iter()
            .filter(|o| !o.write && o.ret != u64::MAX && o.call > quiet)
            .map(|o| o.value)
            .collect();
        // The latest time a value can have been written: +infinity if an unknown write of it
        // exists (it may land at any time).
        let mut latest: HashMap<Value, u64> = HashMap::new();
        for w in writes() {
            let l = latest.entry(w.value).or_insert(0);
            *l = (*l).max(w.ret);
        }
        writes()
            .filter(|w| w.ret != u64::MAX)
            .filter(|w| {
                finals.iter().any(|&seen| {
                    seen != w.value
                        && (seen == ABSENT
                            || latest
                                .get(&seen)
                                .is_some_and(|&l| l != u64::MAX && l < w.call))
                })
            })
            .count()
    }
}

#[cfg(test)]
mod tests;
