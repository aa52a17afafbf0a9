//! The key schema of the one engine: the only place that knows how keys are laid out.
//!
//! All integers are big-endian so that byte order equals numeric order; that is what lets
//! one group's log be a contiguous key interval (range deletes for compaction, one seek for the
//! last index) and what keeps the groups from interleaving.
//!
//! Column family `raft`:
//! - `0x01 | group | index` → an `eraftpb::Entry`. Prefix first so that all log entries sort
//!   apart from the (much smaller) state records; group before index so that one group's log is
//!   one interval, ordered by index.
//! - `0x02 | group | kind` → per-group state (`kind`: hard state, conf state, apply state). One
//!   interval per group, so that recovery reads them with one scan.
//! - `0x03 | group | client` → the last applied request of a client (retry de-duplication).
//!
//! Column family `meta`:
//! - `0x01 | range` → the `RangeDescriptor` of a range hosted here.
//! - `0x02` → the `StoreIdent` (which node this engine belongs to).
//! - `0x03` → the start counter.
//! - `0x10 | name` → a record of the system range (the id counters, the node registry): the
//!   system range's replicated data. It lives here, in `meta`, and not in `data`, so that no
//!   user key can ever collide with it (user keys are stored as they are and may be any
//!   bytes); the prefix keeps it apart from this node's own records above, and it is one
//!   interval, so that a snapshot of the system range is one scan and its install one range
//!   delete.
//!
//! Column family `data`: user keys as they are. Ranges partition the key space, so one range's
//! data is the key interval `[start, end)`: splits move no data and a snapshot is one scan.

use flotilla_proto::RangeId;

/// Column family names; the order is the order in which they are opened.
pub const CF_RAFT: &str = "raft";
/// User data, shared by all ranges.
pub const CF_DATA: &str = "data";
/// Range descriptors and node identity.
pub const CF_META: &str = "meta";

const LOG_PREFIX: u8 = 0x01;
const STATE_PREFIX: u8 = 0x02;
const CLIENT_PREFIX: u8 = 0x03;

const DESCRIPTOR_PREFIX: u8 = 0x01;
/// Key of the store identity record in `meta`.
pub const STORE_IDENT_KEY: &[u8] = &[0x02];
/// Key of the start counter in `meta` (how many times the engine was opened by a node: see
/// `Engine::next_start`).
pub const START_COUNT_KEY: &[u8] = &[0x03];

const SYSTEM_PREFIX: u8 = 0x10;

/// `0x10 | name` in `meta`: a record of the system range.
pub fn system_key(name: &[u8]) -> Vec<u8> {
    let mut k = Vec::with_capacity(1 + name.len());
    k.push(SYSTEM_PREFIX);
    k.extend_from_slice(name);
    k
}

/// The name of a system record key; `None` if it is not one.
pub fn parse_system_key(key: &[u8]) -> Option<&[u8]> {
    match key.split_first() {
        Some((&SYSTEM_PREFIX, name)) => Some(name),
        _ => None,
    }
}

/// `[start, end)` bounds of all system record keys.
pub fn system_bounds() -> ([u8; 1], [u8; 1]) {
    ([SYSTEM_PREFIX], [SYSTEM_PREFIX + 1])
}

/// Which per-group state record a state key names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum StateKind {
    /// raft `HardState` (term, vote, commit): written with the log, synced.
    Hard = 0x01,
    /// raft `ConfState` as of the applied index: written with the apply.
    Conf = 0x02,
    /// `ApplyState` (applied and truncated index/term): written with the apply.
    Apply = 0x03,
}

/// `0x01 | group | index`.
pub fn log_key(group: RangeId, index: u64) -> [u8; 17] {
    let mut k = [0u8; 17];
    k[0] = LOG_PREFIX;
    k[1..9].copy_from_slice(&group.0.to_be_bytes());
    k[9..17].copy_from_slice(&index.to_be_bytes());
    k
}

/// Decodes a log key into `(group, index)`; `None` if it is not a log key.
pub fn parse_log_key(key: &[u8]) -> Option<(RangeId, u64)> {
    if key.len() != 17 || key[0] != LOG_PREFIX {
        return None;
    }
    let group = u64::from_be_bytes(key[1..9].try_into().ok()?);
    let index = u64::from_be_bytes(key[9..17].try_into().ok()?);
    Some((RangeId(group), index))
}

/// `[start, end)` of every log key of `group`. The end is the first key after the group's
/// log, also for `u64::MAX` (where "the next group" does not exist).
pub fn log_bounds(group: RangeId) -> (Vec<u8>, Vec<u8>) {
    let lo = log_key(group, 0).to_vec();
    let hi = match group.0.checked_add(1) {
        Some(next) => log_key(RangeId(next), 0).to_vec(),
        None => vec![LOG_PREFIX + 1],
    };
    (lo, hi)
}

/// `0x02 | group | kind`.
pub fn state_key(group: RangeId, kind: StateKind) -> [u8; 10] {
    let mut k = [0u8; 10];
    k[0] = STATE_PREFIX;
    k[1..9].copy_from_slice(&group.0.to_be_bytes());
    k[9] = kind as u8;
    k
}

/// Decodes a state key into `(group, kind)`.
pub fn parse_state_key(key: &[u8]) -> Option<(RangeId, StateKind)> {
    if key.len() != 10 || key[0] != STATE_PREFIX {
        return None;
    }
    let group = RangeId(u64::from_be_bytes(key[1..9].try_into().ok()?));
    let kind = match key[9] {
        0x01 => StateKind::Hard,
        0x02 => StateKind::Conf,
        0x03 => StateKind::Apply,
        _ => return None,
    };
    Some((group, kind))
}

/// The first key after every state record: the upper bound of a state scan.
pub fn state_end_key() -> [u8; 1] {
    [STATE_PREFIX + 1]
}

/// The first state key: the lower bound of a state scan.
pub fn state_start_key() -> [u8; 1] {
    [STATE_PREFIX]
}

/// `0x03 | group | client`.
pub fn client_key(group: RangeId, client: u64) -> [u8; 17] {
    let mut k = [0u8; 17];
    k[0] = CLIENT_PREFIX;
    k[1..9].copy_from_slice(&group.0.to_be_bytes());
    k[9..17].copy_from_slice(&client.to_be_bytes());
    k
}

/// `[start, end)` of every client record of `group` (also for `u64::MAX`).
pub fn client_bounds(group: RangeId) -> (Vec<u8>, Vec<u8>) {
    let lo = client_key(group, 0).to_vec();
    let hi = match group.0.checked_add(1) {
        Some(next) => client_key(RangeId(next), 0).to_vec(),
        None => vec![CLIENT_PREFIX + 1],
    };
    (lo, hi)
}

/// `0x01 | range` in `meta`.
pub fn descriptor_key(range: RangeId) -> [u8; 9] {
    let mut k = [0u8; 9];
    k[0] = DESCRIPTOR_PREFIX;
    k[1..9].copy_from_slice(&range.0.to_be_bytes());
    k
}

/// Decodes a descriptor key.
pub fn parse_descriptor_key(key: &[u8]) -> Option<RangeId> {
    if key.len() != 9 || key[0] != DESCRIPTOR_PREFIX {
        return None;
    }
    Some(RangeId(u64::from_be_bytes(key[1..9].try_into().ok()?)))
}

/// `[start, end)` bounds of all descriptor keys.
pub fn descriptor_bounds() -> ([u8; 1], [u8; 1]) {
    ([DESCRIPTOR_PREFIX], [DESCRIPTOR_PREFIX + 1])
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        /// Log keys order by (group, index): one group's log is contiguous and index-ordered.
        #[test]
        fn log_keys_order_by_group_then_index(g1: u64, i1: u64, g2: u64, i2: u64) {
            let (a, b) = (log_key(RangeId(g1), i1), log_key(RangeId(g2), i2));
            prop_assert_eq!(a.cmp(&b), (g1, i1).cmp(&(g2, i2)));
            prop_assert_eq!(parse_log_key(&a), Some((RangeId(g1), i1)));
        }

        /// Every log key of a group lies in [log_key(g, 0), log_key(g + 1, 0)): the interval
        /// compaction and "delete the whole log" use, which must not touch a neighbour.
        #[test]
        fn group_log_is_one_interval(g in 0u64..u64::MAX, i: u64, other: u64) {
            let k = log_key(RangeId(g), i);
            prop_assert!(k >= log_key(RangeId(g), 0) && k < log_key(RangeId(g + 1), 0));
            let o = log_key(RangeId(other), i);
            let inside = o >= log_key(RangeId(g), 0) && o < log_key(RangeId(g + 1), 0);
            prop_assert_eq!(inside, other == g);
        }

        /// State keys sort apart from log keys and client keys, and by group.
        #[test]
        fn state_keys_are_a_separate_interval(g: u64, i: u64, g2: u64) {
            let s = state_key(RangeId(g), StateKind::Apply);
            prop_assert!(s.as_slice() >= state_start_key().as_slice());
            prop_assert!(s.as_slice() < state_end_key().as_slice());
            prop_assert!(log_key(RangeId(g2), i).as_slice() < state_start_key().as_slice());
            prop_assert!(client_key(RangeId(g2), i).as_slice() >= state_end_key().as_slice());
            prop_assert_eq!(parse_state_key(&s), Some((RangeId(g), StateKind::Apply)));
            let t = state_key(RangeId(g2), StateKind::Hard);
            if g < g2 { prop_assert!(s < t); }
        }

        #[test]
        fn descriptor_keys_roundtrip_and_order(a: u64, b: u64) {
            let (ka, kb) = (descriptor_key(RangeId(a)), descriptor_key(RangeId(b)));
            prop_assert_eq!(ka.cmp(&kb), a.cmp(&b));
            prop_assert_eq!(parse_descriptor_key(&ka), Some(RangeId(a)));
            let (lo, hi) = descriptor_bounds();
            prop_assert!(ka.as_slice() >= lo.as_slice() && ka.as_slice() < hi.as_slice());
            prop_assert!(STORE_IDENT_KEY >= hi.as_slice());
            prop_assert!(START_COUNT_KEY >= hi.as_slice());
        }

        /// System records form one interval of `meta` apart from descriptors and this node's
        /// own records, whatever their names.
        #[test]
        fn system_keys_are_a_separate_interval(name: Vec<u8>, r: u64) {
            let k = system_key(&name);
            let (lo, hi) = system_bounds();
            prop_assert!(k.as_slice() >= lo.as_slice() && k.as_slice() < hi.as_slice());
            prop_assert_eq!(parse_system_key(&k), Some(name.as_slice()));
            prop_assert!(descriptor_key(RangeId(r)).as_slice() < lo.as_slice());
            prop_assert!(STORE_IDENT_KEY < lo.as_slice() && START_COUNT_KEY < lo.as_slice());
        }
    }

    #[test]
    fn bounds_hold_for_the_largest_group_id() {
        let max = RangeId(u64::MAX);
        let (lo, hi) = log_bounds(max);
        let k = log_key(max, u64::MAX);
        assert!(lo.as_slice() <= k.as_slice() && k.as_slice() < hi.as_slice());
        assert!(hi.as_slice() <= state_start_key().as_slice());
        let (lo, hi) = client_bounds(max);
        let k = client_key(max, u64::MAX);
        assert!(lo.as_slice() <= k.as_slice() && k.as_slice() < hi.as_slice());
    }

    #[test]
    fn parsers_reject_foreign_keys() {
        assert_eq!(parse_log_key(&state_key(RangeId(1), StateKind::Hard)), None);
        assert_eq!(parse_state_key(&log_key(RangeId(1), 1)), None);
        assert_eq!(parse_descriptor_key(b"xyz"), None);
        let mut bad = state_key(RangeId(1), StateKind::Hard);
        bad[9] = 0x77;
        assert_eq!(parse_state_key(&bad), None);
    }
}
