//! The Wing–Gong search with Lowe's memoization over one key's operations (a register).
//!
//! Events (invocations and completions) sit in a doubly linked list in time order. Linearizing
//! an operation *lifts* its two events out of the list; backtracking puts them back, in the
//! reverse order, so the list is restored exactly (dancing links). At equal times an
//! invocation sorts before a completion: touching intervals count as concurrent, the
//! permissive reading of a clock that cannot order them.

use std::collections::HashSet;

use crate::{KOp, Value, ABSENT};

const NIL: usize = usize::MAX;

/// Is there a linearization of `ops`, starting from an absent key, in which every operation
/// with a finite completion took effect (operations completing at +infinity may or may not)?
pub(crate) fn linearizable(ops: &[KOp]) -> bool {
    let mut steps = u64::MAX;
    linearizable_within(ops, &mut steps).expect("an unbounded search always answers")
}

/// [`linearizable`] within `steps` steps (each step tries or undoes one operation; the
/// steps left are written back), or `None` if they ran out.
pub(crate) fn linearizable_within(ops: &[KOp], steps: &mut u64) -> Option<bool> {
    if ops.is_empty() {
        return Some(true);
    }
    let n = ops.len();
    // Node 0 is the list's head; node 1 + 2i is op i's invocation, 2 + 2i its completion.
    let mut order: Vec<usize> = (1..=2 * n).collect();
    let time = |node: usize| {
        let op = &ops[(node - 1) / 2];
        if node % 2 == 1 {
            (op.call, 0)
        } else {
            (op.ret, 1)
        }
    };
    order.sort_by_key(|&node| (time(node), node));
    let mut next = vec![NIL; 2 * n + 1];
    let mut prev = vec![NIL; 2 * n + 1];
    let mut last = 0;
    for &node in &order {
        next[last] = node;
        prev[node] = last;
        last = node;
    }
    let zobrist = zobrist_words(n);

    let lift = |next: &mut [usize], prev: &mut [usize], node: usize| {
        next[prev[node]] = next[node];
        if next[node] != NIL {
            prev[next[node]] = prev[node];
        }
    };
    let unlift = |next: &mut [usize], prev: &mut [usize], node: usize| {
        next[prev[node]] = node;
        if next[node] != NIL {
            prev[next[node]] = node;
        }
    };

    let mut state: Value = ABSENT;
    let mut linearized: u128 = 0;
    let mut seen: HashSet<(u128, Value)> = HashSet::new();
    // (invocation node, state before it) for each linearized operation, in order.
    let mut stack: Vec<(usize, Value)> = Vec::new();
    let mut entry = next[0];
    loop {
        if *steps == 0 {
            return None;
        }
        *steps -= 1;
        if entry == NIL {
            return Some(true);
        }
        let i = (entry - 1) / 2;
        let op = &ops[i];
        if entry % 2 == 1 {
            let after = if op.write {
                Some(op.value)
            } else {
                (op.value == state).then_some(state)
            };
            if let Some(after) = after {
                let set = linearized ^ zobrist[i];
                if seen.insert((set, after)) {
                    stack.push((entry, state));
                    state = after;
                    linearized = set;
                    lift(&mut next, &mut prev, entry);
                    lift(&mut next, &mut prev, entry + 1);
                    entry = next[0];
                    continue;
                }
            }
            entry = next[entry];
        } else {
            // The completion of an operation not yet linearized. At +infinity every later
            // event is an infinite completion too: all finite operations are linearized, and
            // the rest may simply not have taken effect.
            if op.ret == u64::MAX {
                return Some(true);
            }
            let Some((call, before)) = stack.pop() else {
                return Some(false);
            };
            let j = (call - 1) / 2;
            unlift(&mut next, &mut prev, call + 1);
            unlift(&mut next, &mut prev, call);
            state = before;
            linearized ^= zobrist[j];
            entry = next[call];
        }
    }
}

/// One pseudo-random 128-bit word per operation (splitmix64, fixed seed: the check is
/// deterministic).
fn zobrist_words(n: usize) -> Vec<u128> {
    let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
    let mut word = || {
        x = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = x;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    };
    (0..n)
        .map(|_| ((word() as u128) << 64) | word() as u128)
        .collect()
}
