//! Range snapshots, the data side: `export_range` streams `[start, end)` in chunks (a
//! `RangeView`, one range at one point, the same way) and `SnapshotImport` replaces the
//! receiver's copy of the range atomically with the raft state
//! (`GroupStorage::apply_snapshot_state`), on real RocksDB engines. The raft side of snapshots
//! (`Storage::snapshot`, applying one to a log) is in `storage_contract.rs`.

use std::path::Path;
use std::sync::Arc;

use flotilla_proto::meta::{KvPair, RangeDescriptor, SnapshotChunk};
use flotilla_proto::RangeId;
use flotilla_store::snapshot::export_range;
use flotilla_store::{Engine, GroupStorage, RangeView, SnapshotImport, StoreConfig, StoreError};
use raft::prelude::{ConfState, SnapshotMetadata};
use raft::Storage;
use tempfile::TempDir;

fn open(dir: &Path) -> Arc<Engine> {
    let config = StoreConfig {
        block_cache_bytes: 1 << 20,
        write_buffer_bytes: 1 << 20,
        ..StoreConfig::default()
    };
    Engine::open(dir, config).expect("open engine")
}

/// Closes `engine` (it must be the last reference) and opens it again from disk.
fn reopen(engine: Arc<Engine>) -> Arc<Engine> {
    let path = engine.path().to_path_buf();
    let cfg = engine.config().clone();
    drop(Arc::try_unwrap(engine).expect("the engine is still referenced"));
    Engine::open(&path, cfg).expect("reopen engine")
}

fn voters(ids: &[u64]) -> ConfState {
    ConfState {
        voters: ids.to_vec(),
        ..Default::default()
    }
}

fn snapshot_meta(index: u64, term: u64, ids: &[u64]) -> SnapshotMetadata {
    SnapshotMetadata {
        index,
        term,
        conf_state: Some(voters(ids)),
    }
}

/// 3000 keys `m/00000`.. with values of 0..200 bytes, plus neighbours on both sides.
fn fill_source(engine: &Arc<Engine>) -> Vec<(Vec<u8>, Vec<u8>)> {
    let mut batch = engine.batch();
    let mut pairs = Vec::new();
    for i in 0..3000u32 {
        let k = format!("m/{i:05}").into_bytes();
        let v = vec![(i % 251) as u8; (i as usize * 37) % 200];
        batch.put_data(&k, &v);
        pairs.push((k, v));
    }
    for k in ["a", "l\u{7f}", "t", "t/0", "z"] {
        batch.put_data(k.as_bytes(), b"neighbour");
    }
    engine.write(batch, true).unwrap();
    pairs
}

fn export(engine: &Engine, start: &[u8], end: &[u8], chunk_bytes: usize) -> Vec<SnapshotChunk> {
    let mut chunks = Vec::new();
    export_range(engine, start, end, chunk_bytes, |c| {
        chunks.push(c);
        Ok(())
    })
    .unwrap();
    chunks
}

fn pairs_of(chunks: &[SnapshotChunk]) -> Vec<(Vec<u8>, Vec<u8>)> {
    chunks
        .iter()
        .flat_map(|c| c.pairs.iter())
        .map(|p| (p.key.to_vec(), p.value.to_vec()))
        .collect()
}

fn range_desc(id: u64, start: &[u8], end: &[u8]) -> RangeDescriptor {
    RangeDescriptor {
        range_id: id,
        start_key: start.to_vec().into(),
        end_key: end.to_vec().into(),
        ..Default::default()
    }
}

#[test]
fn snapshot_export_import_roundtrip_across_chunks() {
    const CHUNK: usize = 8 << 10;
    let (src_dir, dst_dir) = (TempDir::new().unwrap(), TempDir::new().unwrap());
    let src = open(src_dir.path());
    let want = fill_source(&src);
    let chunks = export(&src, b"m", b"t", CHUNK);
    assert!(
        chunks.len() >= 10,
        "expected many chunks, got {}",
        chunks.len()
    );
    for c in &chunks {
        let bytes: usize = c.pairs.iter().map(|p| p.key.len() + p.value.len()).sum();
        assert!(
            bytes <= CHUNK || c.pairs.len() == 1,
            "chunk of {bytes} bytes"
        );
        assert!(!c.pairs.is_empty());
    }
    let exported = pairs_of(&chunks);
    assert_eq!(exported, want, "exactly the range, in key order");

    // The receiver has stale keys inside the range and neighbours outside it.
    let dst = open(dst_dir.path());
    let mut batch = dst.batch();
    for k in ["m", "m/99999", "p", "s\u{7f}"] {
        batch.put_data(k.as_bytes(), b"stale");
    }
    for k in ["a", "l\u{7f}", "t", "t/0"] {
        batch.put_data(k.as_bytes(), b"theirs");
    }
    dst.write(batch, true).unwrap();

    let descriptor = range_desc(11, b"m", b"t");
    let mut s = GroupStorage::new_uninitialized(dst.clone(), RangeId(11));
    let mut import = SnapshotImport::begin(dst.batch(), b"m", b"t").unwrap();
    for c in &chunks {
        import.add_chunk(c).unwrap();
    }
    let bytes: u64 = want.iter().map(|(k, v)| (k.len() + v.len()) as u64).sum();
    assert_eq!(import.stats(), (want.len() as u64, bytes));
    s.apply_snapshot_state(
        &snapshot_meta(20, 3, &[1, 2]),
        descriptor.clone(),
        import.batch(),
    );
    // Nothing is visible before the batch is written.
    assert_eq!(dst.get(b"p").unwrap(), Some(b"stale".to_vec()));
    dst.write(import.finish(), true).unwrap();
    drop(s);

    let check = |dst: &Arc<Engine>| {
        assert_eq!(dst.scan(b"m", b"t", usize::MAX).unwrap(), want);
        for k in ["a", "l\u{7f}", "t", "t/0"] {
            assert_eq!(
                dst.get(k.as_bytes()).unwrap(),
                Some(b"theirs".to_vec()),
                "{k}"
            );
        }
        assert_eq!(dst.descriptors().unwrap(), vec![descriptor.clone()]);
    };
    check(&dst);
    let dst = reopen(dst);
    check(&dst);
    let rec = dst.recover().unwrap();
    assert_eq!(rec.len(), 1);
    let s = GroupStorage::recover(dst.clone(), rec.into_iter().next().unwrap()).unwrap();
    assert_eq!(s.apply_state().applied_index, 20);
    assert_eq!(
        (s.first_index(), s.last_index(), s.term(20)),
        (Ok(21), Ok(20), Ok(3))
    );
    assert_eq!(s.initial_state().unwrap().conf_state, voters(&[1, 2]));

    // The receiver can now serve the same range onwards, byte for byte.
    assert_eq!(pairs_of(&export(&dst, b"m", b"t", CHUNK)), want);
}

#[test]
fn snapshot_import_of_unbounded_range_clears_to_the_end() {
    let (src_dir, dst_dir) = (TempDir::new().unwrap(), TempDir::new().unwrap());
    let src = open(src_dir.path());
    fill_source(&src);
    let chunks = export(&src, b"n", b"", 4 << 10);
    let want = src.scan(b"n", b"", usize::MAX).unwrap();
    assert_eq!(pairs_of(&chunks), want);
    assert!(
        want.iter().any(|(k, _)| k == b"z"),
        "unbounded end includes the last key"
    );

    let dst = open(dst_dir.path());
    let mut batch = dst.batch();
    for k in ["n", "zz", "\u{7f}\u{7f}"] {
        batch.put_data(k.as_bytes(), b"stale");
    }
    batch.put_data(b"m/5", b"theirs");
    dst.write(batch, true).unwrap();

    let mut import = SnapshotImport::begin(dst.batch(), b"n", b"").unwrap();
    for c in &chunks {
        import.add_chunk(c).unwrap();
    }
    dst.write(import.finish(), true).unwrap();
    assert_eq!(dst.scan(b"n", b"", usize::MAX).unwrap(), want);
    assert_eq!(dst.get(b"m/5").unwrap(), Some(b"theirs".to_vec()));
}

#[test]
fn snapshot_chunk_with_key_outside_range_is_refused() {
    let dir = TempDir::new().unwrap();
    let engine = open(dir.path());
    let mut batch = engine.batch();
    batch.put_data(b"c/old", b"kept");
    batch.put_data(b"a", b"neighbour");
    engine.write(batch, true).unwrap();

    let chunk = |keys: &[&str]| SnapshotChunk {
        pairs: keys
            .iter()
            .map(|k| KvPair {
                key: k.as_bytes().to_vec().into(),
                value: b"v".to_vec().into(),
            })
            .collect(),
    };
    // Below the start, at the (exclusive) end, far past it, in the middle of a chunk.
    let refused: [&[&str]; 5] = [&["b"], &["e"], &["z"], &["c", "d", "e/1"], &["bz", "c"]];
    for keys in refused {
        let mut import = SnapshotImport::begin(engine.batch(), b"c", b"e").unwrap();
        let res = import.add_chunk(&chunk(keys));
        assert!(
            matches!(res, Err(StoreError::Corruption { .. })),
            "{keys:?}: {res:?}"
        );
        // The receiver drops the import: nothing changed, not even the range clear.
        drop(import);
        assert_eq!(engine.get(b"c/old").unwrap(), Some(b"kept".to_vec()));
    }
    // The bounds themselves: the start is inside, the end is not.
    let mut import = SnapshotImport::begin(engine.batch(), b"c", b"e").unwrap();
    import.add_chunk(&chunk(&["c", "d\u{7f}\u{7f}"])).unwrap();
    engine.write(import.finish(), true).unwrap();
    assert_eq!(engine.get(b"c").unwrap(), Some(b"v".to_vec()));
    assert_eq!(engine.get(b"c/old").unwrap(), None, "cleared by the import");
    assert_eq!(engine.get(b"a").unwrap(), Some(b"neighbour".to_vec()));
}

#[test]
fn export_sink_error_stops_the_export() {
    let dir = TempDir::new().unwrap();
    let engine = open(dir.path());
    fill_source(&engine);
    let mut calls = 0;
    let res = export_range(&engine, b"m", b"t", 1 << 10, |_| {
        calls += 1;
        if calls == 3 {
            Err(StoreError::InvalidConfig("receiver went away"))
        } else {
            Ok(())
        }
    });
    assert!(matches!(res, Err(StoreError::InvalidConfig(_))));
    assert_eq!(calls, 3, "no chunk after the sink failed");
}

/// A view is one point: the descriptor, apply state and data it was taken with, whatever is
/// written after it (here a later apply that moves the range's end and its data).
#[test]
fn a_range_view_keeps_its_point_while_the_range_moves_on() {
    let dir = TempDir::new().unwrap();
    let engine = open(dir.path());
    let want = fill_source(&engine);
    let mut batch = engine.batch();
    let mut s = GroupStorage::initialize(
        engine.clone(),
        range_desc(7, b"m", b"t"),
        voters(&[1]),
        5,
        5,
        &mut batch,
    );
    engine.write(batch, true).unwrap();

    let view = RangeView::take(&engine, RangeId(7)).unwrap();
    // After the view: one more entry applied, which writes a key and narrows the range.
    let mut batch = engine.batch();
    batch.put_data(b"m/new", b"later");
    s.set_descriptor(range_desc(7, b"m", b"n"), &mut batch);
    s.set_applied(6, 5, &mut batch);
    engine.write(batch, true).unwrap();

    assert_eq!(view.apply_state().applied_index, 5);
    assert_eq!(&view.descriptor().unwrap().end_key[..], b"t");
    let mut chunks = Vec::new();
    view.export(1 << 10, |c| {
        chunks.push(c);
        Ok::<(), StoreError>(())
    })
    .unwrap();
    assert_eq!(pairs_of(&chunks), want, "the data as of applied index 5");

    let now = RangeView::take(&engine, RangeId(7)).unwrap();
    assert_eq!(now.apply_state().applied_index, 6);
    assert_eq!(&now.descriptor().unwrap().end_key[..], b"n");
    let mut keys = 0;
    now.export(1 << 10, |c| {
        keys += c.pairs.len();
        Ok::<(), StoreError>(())
    })
    .unwrap();
    assert_eq!(keys, want.len() + 1);
    // A range this engine never had: no descriptor, nothing to export.
    let none = RangeView::take(&engine, RangeId(8)).unwrap();
    assert!(none.descriptor().is_none());
    none.export(1 << 10, |_| -> Result<(), StoreError> {
        panic!("no chunk")
    })
    .unwrap();
}
