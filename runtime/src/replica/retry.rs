//! The retry records a replica keeps in memory, so that the de-duplication check of an
//! applied request (`apply.rs`) does not read the engine.
//!
//! Every request with a request id reads its client's record before it applies; on a busy
//! range that was one RocksDB `Get` per write on every replica (a memtable seek that showed in
//! the write path's profile). The records a replica writes as it applies are the ones its
//! next requests ask for (a client sends one request at a time), so they are kept here as
//! well as written. Only what this replica wrote or absorbed is cached, so a cached record is
//! always the one on disk (or in the round's batch); a miss reads the engine as before. Every
//! other change of the group's records (a snapshot installed) clears the cache.
//!
//! Bounded: past [`MAX_CACHED`] clients the cache starts again empty, and a sleeping replica
//! gives it back (8 bytes while empty, so 100,000 idle replicas hold nothing here).

use std::collections::HashMap;

use flotilla_proto::command::ClientRecord;

/// Most clients whose records one replica keeps; past it the cache is emptied (clients
/// beyond it cost an engine read each, as before the cache).
pub(super) const MAX_CACHED: usize = 1024;

/// The last applied request of each recent client of this replica's group.
// Boxed on purpose: an empty cache is then 8 bytes inline, not a `HashMap`'s 48, in every
// replica (most of them idle); the extra allocation is made once per busy period.
#[allow(clippy::box_collection)]
#[derive(Debug, Default)]
pub(super) struct RetryRecords(Option<Box<HashMap<u64, ClientRecord>>>);

impl RetryRecords {
    /// The cached record of `client`, if any (`None` says nothing: read the engine).
    pub(super) fn get(&self, client: u64) -> Option<&ClientRecord> {
        self.0.as_ref()?.get(&client)
    }

    /// Records what was just written (to the round's batch) for `client`.
    pub(super) fn insert(&mut self, client: u64, record: ClientRecord) {
        let map = self.0.get_or_insert_with(Default::default);
        if map.len() >= MAX_CACHED && !map.contains_key(&client) {
            map.clear();
        }
        map.insert(client, record);
    }

    /// Forgets everything: the group's records were replaced, or memory is given back.
    pub(super) fn clear(&mut self) {
        self.0 = None;
    }

    /// Clients cached (tests).
    #[cfg(test)]
    pub(super) fn len(&self) -> usize {
        self.0.as_ref().map_or(0, |m| m.len())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(seq: u64) -> ClientRecord {
        ClientRecord {
            seq,
            ..ClientRecord::default()
        }
    }

    #[test]
    fn a_record_is_replaced_by_its_clients_next_one() {
        let mut r = RetryRecords::default();
        assert!(r.get(7).is_none());
        r.insert(7, record(1));
        r.insert(7, record(2));
        assert_eq!(r.get(7).map(|r| r.seq), Some(2));
        assert_eq!(r.len(), 1);
    }

    #[test]
    fn the_cache_starts_again_when_full_and_keeps_the_newest() {
        let mut r = RetryRecords::default();
        for c in 0..MAX_CACHED as u64 {
            r.insert(c, record(1));
        }
        assert_eq!(r.len(), MAX_CACHED);
        // A known client does not empty it.
        r.insert(0, record(2));
        assert_eq!(r.len(), MAX_CACHED);
        r.insert(u64::MAX, record(1));
        assert_eq!(r.len(), 1);
        assert_eq!(r.get(u64::MAX).map(|r| r.seq), Some(1));
        assert!(r.get(0).is_none());
        r.clear();
        assert!(r.get(u64::MAX).is_none());
        assert_eq!(std::mem::size_of::<RetryRecords>(), 8);
    }
}
