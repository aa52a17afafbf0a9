//! The `raft::Storage` contract of `GroupStorage` on a real RocksDB.
//!
//! The first half mirrors the cases of raft-rs's own `MemStorage` tests (term, entries with a
//! size limit, first/last index, compact, snapshot, append over a conflicting tail, apply
//! snapshot), each run with the log on disk, split between disk and the tail cache, and all in
//! the cache, and again after a restart. The second half covers what a shared, disk-backed log
//! adds: restart, neighbouring groups, errors instead of panics, and a model-based test.
//! Range snapshot export/import (the data side of a snapshot) is in `snapshot_transfer.rs`.
//!
//! A note on indices: `MemStorage`'s tests put entries `3..=5` in a log whose first index is 3.
//! A `GroupStorage` log starts after its truncation point, so the same log here is "initialized
//! at 2/2, then entries 3..=5 appended", and `compact(i)` removes up to and including `i`
//! (raft-rs's `MemStorage::compact(i)` keeps `i`).

use std::path::Path;
use std::sync::Arc;

use flotilla_proto::meta::{RangeDescriptor, SnapshotHeader};
use flotilla_proto::{Message as _, RangeId};
use flotilla_store::{Engine, GroupStorage, StoreConfig, StoreError};
use proptest::prelude::*;
use prost_raft::Message as _;
use raft::prelude::{ConfState, Entry, HardState, SnapshotMetadata};
use raft::{Error as RaftError, GetEntriesContext, Storage, StorageError};
use tempfile::TempDir;

/// Tail cache sizes the log tests run with: everything on disk, a log split between disk and
/// cache, everything in the cache.
const CACHE_SIZES: [usize; 3] = [0, 2, 32];

const COMPACTED: raft::Result<Vec<Entry>> = Err(RaftError::Store(StorageError::Compacted));
const UNAVAILABLE: raft::Result<Vec<Entry>> = Err(RaftError::Store(StorageError::Unavailable));

// ---------------------------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------------------------

fn config(log_cache_entries: usize) -> StoreConfig {
    StoreConfig {
        log_cache_entries,
        // Small buffers: these tests open many engines.
        block_cache_bytes: 1 << 20,
        write_buffer_bytes: 1 << 20,
        ..StoreConfig::default()
    }
}

fn open(dir: &Path, log_cache_entries: usize) -> Arc<Engine> {
    Engine::open(dir, config(log_cache_entries)).expect("open engine")
}

/// Closes `engine` (it must be the last reference, or RocksDB would stay open) and opens it
/// again from disk.
fn reopen(engine: Arc<Engine>) -> Arc<Engine> {
    let path = engine.path().to_path_buf();
    let cfg = engine.config().clone();
    let engine = Arc::try_unwrap(engine).expect("a GroupStorage or batch still holds the engine");
    drop(engine);
    Engine::open(&path, cfg).expect("reopen engine")
}

/// What a restarted node does for one group: `Engine::recover`, then `GroupStorage::recover`.
fn recover_group(engine: &Arc<Engine>, id: u64) -> GroupStorage {
    let rec = engine
        .recover()
        .expect("recover")
        .into_iter()
        .find(|g| g.group == RangeId(id))
        .unwrap_or_else(|| panic!("group {id} not recovered"));
    GroupStorage::recover(engine.clone(), rec).expect("recover group")
}

fn desc(id: u64) -> RangeDescriptor {
    RangeDescriptor {
        range_id: id,
        start_key: format!("r{id:04}/").into_bytes().into(),
        end_key: format!("r{id:04}0").into_bytes().into(),
        ..Default::default()
    }
}

fn voters(ids: &[u64]) -> ConfState {
    ConfState {
        voters: ids.to_vec(),
        ..Default::default()
    }
}

fn ent(index: u64, term: u64) -> Entry {
    Entry {
        index,
        term,
        ..Default::default()
    }
}

fn ent_data(index: u64, term: u64, data: &[u8]) -> Entry {
    Entry {
        data: data.to_vec(),
        ..ent(index, term)
    }
}

fn size(e: &Entry) -> u64 {
    e.encoded_len() as u64
}

fn ctx() -> GetEntriesContext {
    GetEntriesContext::empty(false)
}

/// Group `id` truncated at `index`/`term` (voters 1, 2, 3) with `ents` appended; synced.
fn new_group(engine: &Arc<Engine>, id: u64, index: u64, term: u64, ents: &[Entry]) -> GroupStorage {
    let mut batch = engine.batch();
    let mut s = GroupStorage::initialize(
        engine.clone(),
        desc(id),
        voters(&[1, 2, 3]),
        index,
        term,
        &mut batch,
    );
    s.append(ents, &mut batch).expect("append");
    engine.write(batch, true).expect("write");
    s
}

/// The log of `MemStorage`'s tests: entries 3, 4, 5 (term = index) after a truncation at 2/2.
fn log_3_to_5(engine: &Arc<Engine>) -> GroupStorage {
    new_group(engine, 1, 2, 2, &[ent(3, 3), ent(4, 4), ent(5, 5)])
}

/// The whole log, `[first_index, last_index]`.
fn all_entries(s: &GroupStorage) -> Vec<Entry> {
    let (first, last) = (s.first_index().unwrap(), s.last_index().unwrap());
    s.entries(first, last + 1, None, ctx()).expect("entries")
}

/// Builds group 1 with `setup` for every cache size, runs `check` on it, restarts the engine
/// and runs `check` on the recovered group: every contract must hold both for the storage that
/// wrote the log and for the one a restart rebuilds (empty cache, state from disk).
fn live_and_reopened(
    setup: impl Fn(&Arc<Engine>) -> GroupStorage,
    check: impl Fn(&str, &GroupStorage),
) {
    for cache in CACHE_SIZES {
        let dir = TempDir::new().unwrap();
        let engine = open(dir.path(), cache);
        let s = setup(&engine);
        check(&format!("cache={cache} live"), &s);
        drop(s);
        let engine = reopen(engine);
        let s = recover_group(&engine, 1);
        check(&format!("cache={cache} reopened"), &s);
    }
}

// ---------------------------------------------------------------------------------------------
// The cases of raft-rs's MemStorage tests
// ---------------------------------------------------------------------------------------------

#[test]
fn term() {
    live_and_reopened(log_3_to_5, |at, s| {
        assert_eq!(
            s.term(1),
            Err(RaftError::Store(StorageError::Compacted)),
            "{at}"
        );
        assert_eq!(
            s.term(2),
            Ok(2),
            "{at}: the truncation point keeps its term"
        );
        for i in 3..=5 {
            assert_eq!(s.term(i), Ok(i), "{at}");
        }
        assert_eq!(
            s.term(6),
            Err(RaftError::Store(StorageError::Unavailable)),
            "{at}"
        );
    });
}

#[test]
fn entries_with_max_size() {
    let ents = [ent(3, 3), ent(4, 4), ent(5, 5), ent(6, 6)];
    let (s1, s2, s3) = (size(&ents[1]), size(&ents[2]), size(&ents[3]));
    let cases: Vec<(u64, u64, u64, raft::Result<Vec<Entry>>)> = vec![
        (2, 6, u64::MAX, COMPACTED),
        (3, 4, u64::MAX, Ok(vec![ent(3, 3)])),
        (4, 5, u64::MAX, Ok(vec![ent(4, 4)])),
        (4, 6, u64::MAX, Ok(vec![ent(4, 4), ent(5, 5)])),
        (4, 7, u64::MAX, Ok(vec![ent(4, 4), ent(5, 5), ent(6, 6)])),
        // Even with max size zero the first entry is returned.
        (4, 7, 0, Ok(vec![ent(4, 4)])),
        (4, 7, s1 + s2, Ok(vec![ent(4, 4), ent(5, 5)])),
        (4, 7, s1 + s2 + s3 / 2, Ok(vec![ent(4, 4), ent(5, 5)])),
        (4, 7, s1 + s2 + s3 - 1, Ok(vec![ent(4, 4), ent(5, 5)])),
        (
            4,
            7,
            s1 + s2 + s3,
            Ok(vec![ent(4, 4), ent(5, 5), ent(6, 6)]),
        ),
        // Beyond the last index: an error, not a panic (MemStorage panics here).
        (4, 8, u64::MAX, UNAVAILABLE),
        (7, 8, u64::MAX, UNAVAILABLE),
        (7, 7, u64::MAX, Ok(vec![])),
    ];
    live_and_reopened(
        |e| new_group(e, 1, 2, 2, &ents),
        |at, s| {
            for (i, (lo, hi, max, want)) in cases.iter().enumerate() {
                let got = s.entries(*lo, *hi, *max, ctx());
                assert_eq!(&got, want, "{at} #{i}: entries({lo}, {hi}, {max})");
            }
            // No limit at all.
            assert_eq!(s.entries(3, 7, None, ctx()), Ok(ents.to_vec()), "{at}");
        },
    );
}

#[test]
fn last_index() {
    for cache in CACHE_SIZES {
        let dir = TempDir::new().unwrap();
        let engine = open(dir.path(), cache);
        let mut s = log_3_to_5(&engine);
        assert_eq!(s.last_index(), Ok(5));
        let mut batch = engine.batch();
        s.append(&[ent(6, 5)], &mut batch).unwrap();
        // The in-memory view moves with the append; the batch makes it durable.
        assert_eq!(s.last_index(), Ok(6));
        engine.write(batch, true).unwrap();
        drop(s);
        let engine = reopen(engine);
        let s = recover_group(&engine, 1);
        assert_eq!(s.last_index(), Ok(6), "cache={cache}");
        assert_eq!(s.term(6), Ok(5), "cache={cache}");
    }
}

#[test]
fn first_index() {
    for cache in CACHE_SIZES {
        let dir = TempDir::new().unwrap();
        let engine = open(dir.path(), cache);
        let mut s = log_3_to_5(&engine);
        assert_eq!(s.first_index(), Ok(3));
        let mut batch = engine.batch();
        s.set_applied(5, 5, &mut batch);
        s.compact(3, &mut batch).unwrap();
        assert_eq!(s.first_index(), Ok(4));
        engine.write(batch, true).unwrap();
        drop(s);
        let engine = reopen(engine);
        let s = recover_group(&engine, 1);
        assert_eq!(s.first_index(), Ok(4), "cache={cache}");
        assert_eq!(
            s.term(3),
            Ok(3),
            "cache={cache}: the new truncation point keeps its term"
        );
    }
}

#[test]
fn compact() {
    // (compact index, first index, term of the first entry, entries left); MemStorage's cases
    // shifted by one for the inclusive compaction, plus compacting the whole log.
    let cases = [
        (1, 3, 3, 3),
        (2, 3, 3, 3),
        (3, 4, 4, 2),
        (4, 5, 5, 1),
        (5, 6, 0, 0),
    ];
    for (compact_to, want_first, want_term, want_len) in cases {
        live_and_reopened(
            |e| {
                let mut s = log_3_to_5(e);
                let mut batch = e.batch();
                s.set_applied(5, 5, &mut batch);
                s.compact(compact_to, &mut batch).unwrap();
                e.write(batch, true).unwrap();
                s
            },
            |at, s| {
                let at = format!("{at} compact({compact_to})");
                let first = s.first_index().unwrap();
                assert_eq!(first, want_first, "{at}");
                let term = s
                    .entries(first, first + 1, 1, ctx())
                    .map_or(0, |v| v.first().map_or(0, |e| e.term));
                assert_eq!(term, want_term, "{at}");
                let last = s.last_index().unwrap();
                assert_eq!(last, 5, "{at}: compaction never moves the last index");
                let len = s.entries(first, last + 1, 100, ctx()).unwrap().len();
                assert_eq!(len, want_len, "{at}");
                assert_eq!(
                    s.entries(first - 1, last + 1, None, ctx()),
                    COMPACTED,
                    "{at}"
                );
                assert_eq!(s.term(first - 1), Ok(first - 1), "{at}");
            },
        );
    }
}

#[test]
fn compact_beyond_applied_is_refused() {
    let dir = TempDir::new().unwrap();
    let engine = open(dir.path(), 2);
    let mut s = log_3_to_5(&engine);
    let mut batch = engine.batch();
    s.set_applied(4, 4, &mut batch);
    assert!(matches!(
        s.compact(5, &mut batch),
        Err(StoreError::Unavailable { .. })
    ));
    assert_eq!(
        s.first_index(),
        Ok(3),
        "a refused compaction changes nothing"
    );
    assert_eq!(all_entries(&s), vec![ent(3, 3), ent(4, 4), ent(5, 5)]);
    // Compacting at or below the truncation point is a no-op, not an error.
    s.compact(1, &mut batch).unwrap();
    s.compact(2, &mut batch).unwrap();
    assert_eq!(s.first_index(), Ok(3));
}

#[test]
fn the_log_size_hint_follows_appends_compactions_and_snapshots() {
    let dir = TempDir::new().unwrap();
    let engine = open(dir.path(), 2);
    // Eight entries of the same encoded size.
    let ents: Vec<Entry> = (3..=10).map(|i| ent_data(i, 3, &[7; 100])).collect();
    let one = size(&ents[0]);
    assert!(ents.iter().all(|e| size(e) == one));
    let mut s = new_group(&engine, 1, 2, 2, &ents);
    assert_eq!(s.log_bytes_hint(), 8 * one);
    // One entry at 9 replaces the conflicting tail 9..=10.
    let mut batch = engine.batch();
    s.append(&[ent_data(9, 4, &[7; 100])], &mut batch).unwrap();
    assert_eq!(s.log_bytes_hint(), 7 * one);
    // A compaction takes its share: 3..=5 of the 7 entries.
    s.set_applied(9, 4, &mut batch);
    s.compact(5, &mut batch).unwrap();
    assert_eq!(s.log_bytes_hint(), 4 * one);
    // A snapshot replaces the log.
    s.apply_snapshot_state(&snapshot_meta(20, 5, &[1, 2, 3]), desc(1), &mut batch);
    assert_eq!(s.log_bytes_hint(), 0);
}

#[test]
fn create_snapshot() {
    // MemStorage snapshots at its commit index; GroupStorage at its applied index (the data it
    // reads is the applied state). Cases: (applied, request index, Some(snapshot index)).
    let cases = [(4, 0, Some(4)), (5, 5, Some(5)), (4, 5, None), (5, 6, None)];
    let data = [("r0001/a", "1"), ("r0001/b", "2")];
    for (applied, request, want) in cases {
        live_and_reopened(
            |e| {
                let mut s = log_3_to_5(e);
                let mut batch = e.batch();
                s.set_applied(applied, applied, &mut batch);
                for (k, v) in data {
                    batch.put_data(k.as_bytes(), v.as_bytes());
                }
                // A neighbour's key: must not be in the snapshot.
                batch.put_data(b"r0002/a", b"x");
                e.write(batch, true).unwrap();
                s
            },
            |at, s| {
                let at = format!("{at} applied={applied} request={request}");
                let got = s.snapshot(request, 2);
                let Some(want_index) = want else {
                    assert_eq!(
                        got.map(|_| ()),
                        Err(RaftError::Store(
                            StorageError::SnapshotTemporarilyUnavailable
                        )),
                        "{at}"
                    );
                    return;
                };
                let snap = got.unwrap_or_else(|e| panic!("{at}: {e}"));
                let meta = snap.metadata.clone().unwrap();
                assert_eq!((meta.index, meta.term), (want_index, want_index), "{at}");
                assert_eq!(meta.conf_state, Some(voters(&[1, 2, 3])), "{at}");
                let header = SnapshotHeader::decode(&snap.data[..]).unwrap();
                assert_eq!(header.descriptor, Some(desc(1)), "{at}");
                let pairs: Vec<(String, String)> = header
                    .inline_chunks
                    .iter()
                    .flat_map(|c| c.pairs.iter())
                    .map(|p| {
                        let s = |b: &[u8]| String::from_utf8(b.to_vec()).unwrap();
                        (s(&p.key), s(&p.value))
                    })
                    .collect();
                let want_pairs: Vec<(String, String)> = data
                    .iter()
                    .map(|(k, v)| (k.to_string(), v.to_string()))
                    .collect();
                assert_eq!(pairs, want_pairs, "{at}");
            },
        );
    }
}

#[test]
fn append() {
    let base = [ent(3, 3), ent(4, 4), ent(5, 5)];
    // (entries to append, Some(resulting log) or None if the append must be refused).
    let cases: Vec<(Vec<Entry>, Option<Vec<Entry>>)> = vec![
        (base.to_vec(), Some(base.to_vec())),
        (
            vec![ent(3, 3), ent(4, 6), ent(5, 6)],
            Some(vec![ent(3, 3), ent(4, 6), ent(5, 6)]),
        ),
        (
            vec![ent(3, 3), ent(4, 4), ent(5, 5), ent(6, 5)],
            Some(vec![ent(3, 3), ent(4, 4), ent(5, 5), ent(6, 5)]),
        ),
        // Overwriting the compacted prefix is refused.
        (vec![ent(2, 3), ent(3, 3), ent(4, 5)], None),
        // A conflicting entry truncates the tail: 5 must be gone, also after a restart.
        (vec![ent(4, 5)], Some(vec![ent(3, 3), ent(4, 5)])),
        // Direct append.
        (
            vec![ent(6, 6)],
            Some(vec![ent(3, 3), ent(4, 4), ent(5, 5), ent(6, 6)]),
        ),
        // A gap is refused (MemStorage panics).
        (vec![ent(7, 6)], None),
        // Entries that are not consecutive are refused.
        (vec![ent(6, 6), ent(8, 6)], None),
    ];
    for (i, (ents, want)) in cases.iter().enumerate() {
        live_and_reopened(
            |e| {
                let mut s = log_3_to_5(e);
                let mut batch = e.batch();
                let res = s.append(ents, &mut batch);
                match want {
                    Some(_) => {
                        res.unwrap();
                        e.write(batch, true).unwrap();
                    }
                    None => {
                        assert!(
                            matches!(res, Err(StoreError::NonContiguousAppend { .. })),
                            "#{i}: {res:?}"
                        );
                        // The caller drops a batch whose append failed.
                    }
                }
                s
            },
            |at, s| {
                let want = want.clone().unwrap_or_else(|| base.to_vec());
                assert_eq!(all_entries(s), want, "{at} #{i}");
                let last = want.last().unwrap();
                assert_eq!(s.last_index(), Ok(last.index), "{at} #{i}");
                assert_eq!(s.term(last.index), Ok(last.term), "{at} #{i}");
                assert_eq!(
                    s.entries(3, last.index + 2, None, ctx()),
                    UNAVAILABLE,
                    "{at} #{i}: a truncated tail must not come back"
                );
            },
        );
    }
}

fn snapshot_meta(index: u64, term: u64, ids: &[u64]) -> SnapshotMetadata {
    SnapshotMetadata {
        index,
        term,
        conf_state: Some(voters(ids)),
    }
}

#[test]
fn apply_snapshot() {
    // (existing log, snapshot index): onto an empty group, past an existing log, and inside an
    // existing log (the whole log goes: raft-rs replaces the log with the snapshot point).
    let cases: [(bool, u64); 3] = [(false, 4), (true, 10), (true, 4)];
    for (with_log, index) in cases {
        live_and_reopened(
            |e| {
                let mut s = if with_log {
                    new_group(e, 1, 2, 2, &[ent(3, 3), ent(4, 4), ent(5, 5), ent(6, 6)])
                } else {
                    GroupStorage::new_uninitialized(e.clone(), RangeId(1))
                };
                let mut batch = e.batch();
                s.apply_snapshot_state(&snapshot_meta(index, 7, &[1, 2, 3]), desc(1), &mut batch);
                e.write(batch, true).unwrap();
                s
            },
            |at, s| {
                let at = format!("{at} with_log={with_log} index={index}");
                assert_eq!(s.first_index(), Ok(index + 1), "{at}");
                assert_eq!(s.last_index(), Ok(index), "{at}");
                assert_eq!(s.term(index), Ok(7), "{at}");
                assert_eq!(
                    s.term(index - 1),
                    Err(RaftError::Store(StorageError::Compacted))
                );
                assert_eq!(
                    s.entries(index + 1, index + 1, None, ctx()),
                    Ok(vec![]),
                    "{at}"
                );
                assert_eq!(s.entries(index, index + 1, None, ctx()), COMPACTED, "{at}");
                assert_eq!(
                    s.entries(index + 1, index + 2, None, ctx()),
                    UNAVAILABLE,
                    "{at}"
                );
                let rs = s.initial_state().unwrap();
                assert_eq!(rs.conf_state, voters(&[1, 2, 3]), "{at}");
                assert_eq!(rs.hard_state.commit, index, "{at}");
                assert_eq!(rs.hard_state.term, 7, "{at}");
                assert!(s.is_initialized(), "{at}");
                assert_eq!(s.descriptor(), Some(&desc(1)), "{at}");
                let a = s.apply_state();
                assert_eq!((a.applied_index, a.truncated_index), (index, index), "{at}");
            },
        );
    }
}

// ---------------------------------------------------------------------------------------------
// Disk-backed log: cache vs disk, restart, neighbours, errors
// ---------------------------------------------------------------------------------------------

/// `entries(lo, hi, max)` of `model` (the whole log `[first, ..]`) as raft-rs defines it.
fn model_entries(model: &[Entry], lo: u64, hi: u64, max: Option<u64>) -> Vec<Entry> {
    let first = model.first().map_or(lo, |e| e.index);
    let mut v = model[(lo - first) as usize..(hi - first) as usize].to_vec();
    raft::util::limit_size(&mut v, max);
    v
}

fn payload(index: u64, term: u64) -> Vec<u8> {
    // Varying lengths so that size limits fall at different places.
    let len = (index * 7 + term) % 40;
    (0..len)
        .map(|i| (index as u8).wrapping_add(i as u8))
        .collect()
}

/// `(lo, hi)` pairs of the log (every pair if `exhaustive`, else short and long windows from
/// each `lo`) with several size limits, against the model.
fn check_against_model(at: &str, s: &GroupStorage, model: &[Entry], exhaustive: bool) {
    let first = model.first().unwrap().index;
    let last = model.last().unwrap().index;
    assert_eq!(s.first_index(), Ok(first), "{at}");
    assert_eq!(s.last_index(), Ok(last), "{at}");
    for e in model {
        assert_eq!(s.term(e.index), Ok(e.term), "{at}: term({})", e.index);
    }
    let sizes: Vec<u64> = model.iter().map(size).collect();
    let limits = [
        Some(0),
        Some(sizes[0]),
        Some(sizes.iter().take(3).sum::<u64>()),
        Some(100),
        None,
    ];
    for lo in first..=last {
        let his: Vec<u64> = if exhaustive {
            (lo..=last + 1).collect()
        } else {
            vec![lo, lo + 1, (lo + 3).min(last + 1), last + 1]
        };
        for hi in his {
            for max in limits {
                let want = model_entries(model, lo, hi, max);
                let got = s.entries(lo, hi, max, ctx());
                assert_eq!(got, Ok(want), "{at}: entries({lo}, {hi}, {max:?})");
            }
        }
    }
}

#[test]
fn entries_served_from_tail_cache_and_disk() {
    let dir = TempDir::new().unwrap();
    let engine = open(dir.path(), 2);
    let mut s = new_group(&engine, 1, 5, 5, &[]);
    let mut model: Vec<Entry> = Vec::new();
    // 35 entries in appends of different lengths, in separate synced batches.
    let mut next = 6;
    for len in [1, 4, 2, 10, 3, 15] {
        let ents: Vec<Entry> = (next..next + len)
            .map(|i| ent_data(i, 6, &payload(i, 6)))
            .collect();
        let mut batch = engine.batch();
        s.append(&ents, &mut batch).unwrap();
        engine.write(batch, true).unwrap();
        model.extend(ents);
        next += len;
        assert_eq!(s.cached_entries(), 2.min(model.len()));
    }
    assert_eq!(s.last_index(), Ok(40));
    check_against_model("live", &s, &model, true);

    // A conflicting append inside the disk part (below the cache) replaces the tail.
    let ents: Vec<Entry> = (30..33).map(|i| ent_data(i, 7, &payload(i, 7))).collect();
    let mut batch = engine.batch();
    s.append(&ents, &mut batch).unwrap();
    engine.write(batch, true).unwrap();
    model.truncate((30 - 6) as usize);
    model.extend(ents);
    assert_eq!(s.cached_entries(), 2);
    check_against_model("after conflicting append", &s, &model, true);

    // Compaction of part of the disk log.
    let mut batch = engine.batch();
    s.set_applied(20, 6, &mut batch);
    s.compact(12, &mut batch).unwrap();
    engine.write(batch, true).unwrap();
    model.retain(|e| e.index > 12);
    check_against_model("after compaction", &s, &model, true);

    drop(s);
    let engine = reopen(engine);
    let mut s = recover_group(&engine, 1);
    assert_eq!(s.cached_entries(), 0);
    check_against_model("reopened", &s, &model, true);
    // Appending after a restart: cache again holds the new tail, the rest comes from disk.
    let ents: Vec<Entry> = (33..36).map(|i| ent_data(i, 7, &payload(i, 7))).collect();
    let mut batch = engine.batch();
    s.append(&ents, &mut batch).unwrap();
    engine.write(batch, true).unwrap();
    model.extend(ents);
    assert_eq!(s.cached_entries(), 2);
    check_against_model("appended after reopen", &s, &model, true);
}

#[test]
fn initialized_group_survives_reopen() {
    let dir = TempDir::new().unwrap();
    let engine = open(dir.path(), 4);
    let mut s = new_group(&engine, 1, 5, 5, &[ent(6, 5), ent(7, 6), ent(8, 6)]);
    let hs = HardState {
        term: 6,
        vote: 2,
        commit: 7,
    };
    let mut batch = engine.batch();
    s.set_hard_state(hs.clone(), &mut batch);
    s.set_applied(7, 6, &mut batch);
    batch.put_client_record(RangeId(1), 42, b"req-9");
    engine.write(batch, true).unwrap();
    let before = (
        s.initial_state().unwrap(),
        *s.apply_state(),
        all_entries(&s),
    );
    drop(s);

    let engine = reopen(engine);
    assert_eq!(engine.descriptors().unwrap(), vec![desc(1)]);
    assert_eq!(engine.descriptor(RangeId(1)).unwrap(), Some(desc(1)));
    assert_eq!(
        engine.client_record(RangeId(1), 42).unwrap(),
        Some(b"req-9".to_vec())
    );
    let recovered = engine.recover().unwrap();
    assert_eq!(recovered.len(), 1);
    assert_eq!(recovered[0].last_index, 8);
    assert_eq!(recovered[0].hard_state, hs);
    let s = recover_group(&engine, 1);
    let after = (
        s.initial_state().unwrap(),
        *s.apply_state(),
        all_entries(&s),
    );
    assert_eq!(after.0.hard_state, before.0.hard_state);
    assert_eq!(
        after.0.conf_state, before.0.conf_state,
        "the membership written by initialize must survive a restart"
    );
    assert_eq!(after.1, before.1);
    assert_eq!(after.2, before.2);
    assert!(s.is_initialized());
    assert_eq!(s.descriptor(), Some(&desc(1)));
}

#[test]
fn bootstrapped_group_without_log_survives_reopen() {
    let dir = TempDir::new().unwrap();
    let engine = open(dir.path(), 4);
    let s = new_group(&engine, 3, 5, 5, &[]);
    drop(s);
    let engine = reopen(engine);
    let s = recover_group(&engine, 3);
    assert_eq!((s.first_index(), s.last_index()), (Ok(6), Ok(5)));
    assert_eq!(s.term(5), Ok(5));
    assert_eq!(s.initial_state().unwrap().hard_state.commit, 5);
    assert_eq!(s.initial_state().unwrap().conf_state, voters(&[1, 2, 3]));
}

#[test]
fn groups_do_not_interfere() {
    let dir = TempDir::new().unwrap();
    let engine = open(dir.path(), 2);
    // Adjacent ids, same indices: their keys are neighbours in the raft column family.
    let log = |term: u64| -> Vec<Entry> {
        (6..=15)
            .map(|i| ent_data(i, term, &payload(i, term)))
            .collect()
    };
    let mut batch = engine.batch();
    let mut groups: Vec<GroupStorage> = (6..=9)
        .map(|id| {
            let mut s = GroupStorage::initialize(
                engine.clone(),
                desc(id),
                voters(&[1, 2, 3]),
                5,
                5,
                &mut batch,
            );
            s.append(&log(id), &mut batch).unwrap();
            s
        })
        .collect();
    engine.write(batch, true).unwrap();

    let mut batch = engine.batch();
    // Group 6: a snapshot replaces its whole log.
    groups[0].apply_snapshot_state(&snapshot_meta(30, 9, &[1, 2, 3]), desc(6), &mut batch);
    // Group 7: compacted to its last index.
    groups[1].set_applied(15, 7, &mut batch);
    groups[1].compact(15, &mut batch).unwrap();
    // Group 9: a conflicting append truncates its tail.
    groups[3].append(&[ent(8, 10)], &mut batch).unwrap();
    engine.write(batch, true).unwrap();

    let check = |at: &str, groups: &[GroupStorage]| {
        assert_eq!(
            (groups[0].first_index(), groups[0].last_index()),
            (Ok(31), Ok(30)),
            "{at}"
        );
        assert_eq!(
            (groups[1].first_index(), groups[1].last_index()),
            (Ok(16), Ok(15)),
            "{at}"
        );
        assert_eq!(all_entries(&groups[2]), log(8), "{at}: group 8 untouched");
        let mut want9 = log(9)[..2].to_vec();
        want9.push(ent(8, 10));
        assert_eq!(all_entries(&groups[3]), want9, "{at}");
    };
    check("live", &groups);
    drop(groups);

    let engine = reopen(engine);
    let ids: Vec<RangeId> = engine.recover().unwrap().iter().map(|g| g.group).collect();
    assert_eq!(ids, [6, 7, 8, 9].map(RangeId));
    let groups: Vec<GroupStorage> = (6..=9).map(|id| recover_group(&engine, id)).collect();
    check("reopened", &groups);
    drop(groups);

    // Destroying group 8 leaves its neighbours.
    let mut batch = engine.batch();
    batch.destroy_group_state(RangeId(8));
    engine.write(batch, true).unwrap();
    let engine = reopen(engine);
    let ids: Vec<RangeId> = engine.recover().unwrap().iter().map(|g| g.group).collect();
    assert_eq!(ids, [6, 7, 9].map(RangeId));
    let mut want9 = log(9)[..2].to_vec();
    want9.push(ent(8, 10));
    assert_eq!(all_entries(&recover_group(&engine, 9)), want9);
    assert_eq!(recover_group(&engine, 7).last_index(), Ok(15));

    // What recover finds, the one-seek check sees; with every group's state gone, neither.
    assert!(engine.holds_groups().unwrap());
    let mut batch = engine.batch();
    for id in [6, 7, 9] {
        batch.destroy_group_state(RangeId(id));
    }
    engine.write(batch, true).unwrap();
    let engine = reopen(engine);
    assert!(engine.recover().unwrap().is_empty());
    assert!(!engine.holds_groups().unwrap());
}

#[test]
fn the_system_ranges_state_is_destroyed_like_any_groups() {
    // Its id is u64::MAX: the end of its log's key range must not wrap around to group 0
    // (RocksDB refuses a delete range that ends before it starts, and with it the whole
    // batch: every write of that round).
    let dir = TempDir::new().unwrap();
    let engine = open(dir.path(), 2);
    let system = new_group(&engine, u64::MAX, 5, 5, &[ent(6, 5), ent(7, 5)]);
    let other = new_group(&engine, 9, 5, 5, &[ent(6, 5)]);
    drop((system, other));
    let mut batch = engine.batch();
    batch.destroy_group_state(RangeId(u64::MAX));
    engine.write(batch, true).unwrap();
    let engine = reopen(engine);
    let ids: Vec<RangeId> = engine.recover().unwrap().iter().map(|g| g.group).collect();
    assert_eq!(ids, [RangeId(9)]);
    assert_eq!(recover_group(&engine, 9).last_index(), Ok(6));
}

#[test]
fn reads_past_the_log_are_errors_not_panics() {
    let dir = TempDir::new().unwrap();
    let engine = open(dir.path(), 2);
    let s = log_3_to_5(&engine);
    for (lo, hi) in [(3, 7), (5, 7), (6, 7), (100, 200), (3, u64::MAX)] {
        assert_eq!(
            s.entries(lo, hi, None, ctx()),
            UNAVAILABLE,
            "entries({lo}, {hi})"
        );
    }
    for idx in [6, 100, u64::MAX] {
        assert_eq!(
            s.term(idx),
            Err(RaftError::Store(StorageError::Unavailable))
        );
    }
    assert_eq!(s.entries(0, 4, None, ctx()), COMPACTED);
    assert_eq!(s.term(0), Err(RaftError::Store(StorageError::Compacted)));

    // An uninitialized group (created by a message) has an empty log at 0.
    let u = GroupStorage::new_uninitialized(engine.clone(), RangeId(2));
    assert_eq!((u.first_index(), u.last_index()), (Ok(1), Ok(0)));
    assert_eq!(u.term(0), Ok(0));
    assert_eq!(u.entries(1, 2, None, ctx()), UNAVAILABLE);
    assert_eq!(u.term(1), Err(RaftError::Store(StorageError::Unavailable)));
    assert!(!u.initial_state().unwrap().initialized());
    // It has applied nothing: raft must ask again later, not get an empty snapshot.
    assert_eq!(
        u.snapshot(1, 2).map(|_| ()),
        Err(RaftError::Store(
            StorageError::SnapshotTemporarilyUnavailable
        ))
    );
}

/// One step of the model-based test.
#[derive(Debug, Clone)]
enum Op {
    /// Append `len` entries starting `back` entries before the end (0: right after it).
    Append { back: u64, len: u64 },
    /// Apply everything, then compact `eighths`/8 of the log.
    Compact { eighths: u64 },
    /// Drop the cache up to the last index (an idle group).
    Evict,
    /// Restart the engine.
    Reopen,
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        6 => (0u64..4, 1u64..6).prop_map(|(back, len)| Op::Append { back, len }),
        2 => (0u64..8).prop_map(|eighths| Op::Compact { eighths }),
        1 => Just(Op::Evict),
        1 => Just(Op::Reopen),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 24, ..ProptestConfig::default() })]

    /// Random appends (some overwriting the tail), compactions, cache evictions and restarts:
    /// the storage always serves exactly the model log.
    #[test]
    fn storage_matches_a_model_log(cache in 0usize..4, ops in prop::collection::vec(op(), 1..16)) {
        let dir = TempDir::new().unwrap();
        let mut engine = open(dir.path(), cache);
        let mut s = new_group(&engine, 1, 5, 5, &[ent_data(6, 5, b"first")]);
        // The model: the log, plus the truncation point's entry so that terms work.
        let mut model = vec![ent(5, 5), ent_data(6, 5, b"first")];
        let (mut term, mut applied) = (5, 5);
        for (step, op) in ops.into_iter().enumerate() {
            let last = model.last().unwrap().index;
            let truncated = model[0].index;
            match op {
                Op::Append { back, len } => {
                    // raft never overwrites applied (committed) entries.
                    let from = (last + 1).saturating_sub(back).max(applied + 1);
                    term += u64::from(from <= last);
                    let ents: Vec<Entry> =
                        (from..from + len).map(|i| ent_data(i, term, &payload(i, term))).collect();
                    let mut batch = engine.batch();
                    s.append(&ents, &mut batch).unwrap();
                    engine.write(batch, true).unwrap();
                    model.truncate((from - truncated) as usize);
                    model.extend(ents);
                }
                Op::Compact { eighths } => {
                    let to = truncated + (last - truncated) * eighths / 8;
                    let mut batch = engine.batch();
                    applied = last;
                    s.set_applied(last, model.last().unwrap().term, &mut batch);
                    s.compact(to, &mut batch).unwrap();
                    engine.write(batch, true).unwrap();
                    model.drain(..(to - truncated) as usize);
                }
                Op::Evict => s.evict_cache_to(last),
                Op::Reopen => {
                    drop(s);
                    engine = reopen(engine);
                    s = recover_group(&engine, 1);
                }
            }
            prop_assert!(s.cached_entries() <= cache);
            let at = format!("step {step}");
            prop_assert_eq!(s.term(model[0].index), Ok(model[0].term), "{}", at);
            if model.len() > 1 {
                check_against_model(&at, &s, &model[1..], false);
            } else {
                prop_assert_eq!(s.last_index(), Ok(model[0].index));
            }
        }
    }
}
