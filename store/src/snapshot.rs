//! Range snapshots: export a consistent view of `[start, end)` in chunks, and import chunks
//! into a write batch that also carries the new descriptor and apply state.
//!
//! Export reads from a RocksDB snapshot, so writes that land while the export runs are not
//! seen; the caller picks the moment (in the runtime: between two applies of the group, so the
//! data matches the applied index recorded in the snapshot's metadata). A [`RangeView`]
//! needs no such moment: it reads the range's descriptor and apply state from the same
//! RocksDB snapshot as its data, and those three are only ever written together (one batch
//! per apply, split, merge or snapshot install), so they agree at whatever point it is taken
//! (a backup takes it after a read barrier, from any thread).

use flotilla_proto::meta::{ApplyState, KvPair, RangeDescriptor, SnapshotChunk};
use flotilla_proto::{Message as _, RangeId};
use rocksdb::{Direction, IteratorMode, ReadOptions};

use crate::engine::{Cf, Engine, WriteBatch};
use crate::error::{Result, StoreError};
use crate::keys::{self, StateKind};

/// Default upper bound on one chunk's payload: big enough to amortize per-message cost,
/// small enough to stream with back-pressure and stay under gRPC frame limits.
pub const DEFAULT_CHUNK_BYTES: usize = 2 << 20;

/// Streams the user data in `[start, end)` (empty `end`: unbounded) to `sink` in chunks of at
/// most `chunk_bytes` of keys and values (a single larger pair gets a chunk of its own). The
/// sink may block (back-pressure) or fail (the export stops with its error).
pub fn export_range(
    engine: &Engine,
    start: &[u8],
    end: &[u8],
    chunk_bytes: usize,
    sink: impl FnMut(SnapshotChunk) -> Result<()>,
) -> Result<()> {
    let snap = engine.db().snapshot();
    export_from(engine, &snap, start, end, chunk_bytes, sink)
}

type DbSnapshot<'a> = rocksdb::SnapshotWithThreadMode<'a, rocksdb::DB>;

/// The chunking of [`export_range`] and [`RangeView::export`], over a snapshot the caller took.
fn export_from<E: From<StoreError>>(
    engine: &Engine,
    snap: &DbSnapshot<'_>,
    start: &[u8],
    end: &[u8],
    chunk_bytes: usize,
    mut sink: impl FnMut(SnapshotChunk) -> std::result::Result<(), E>,
) -> std::result::Result<(), E> {
    let mut opts = ReadOptions::default();
    if !end.is_empty() {
        opts.set_iterate_upper_bound(end.to_vec());
    }
    let iter = snap.iterator_cf_opt(
        engine.cf(Cf::Data),
        opts,
        IteratorMode::From(start, Direction::Forward),
    );
    let mut chunk = SnapshotChunk::default();
    let mut size = 0usize;
    for item in iter {
        let (k, v) = item.map_err(StoreError::from)?;
        let pair_size = k.len() + v.len();
        if !chunk.pairs.is_empty() && size + pair_size > chunk_bytes {
            sink(std::mem::take(&mut chunk))?;
            size = 0;
        }
        size += pair_size;
        chunk.pairs.push(KvPair {
            key: k.to_vec().into(),
            value: v.to_vec().into(),
        });
    }
    if !chunk.pairs.is_empty() {
        sink(chunk)?;
    }
    Ok(())
}

/// One range of this node's engine at one point: its descriptor, apply state and data read
/// from one RocksDB snapshot, so the data is the range's state machine exactly as of
/// `apply_state.applied_index` (see the module doc). Taking it costs a RocksDB snapshot; it
/// holds that snapshot (and so the files it reads) until dropped.
pub struct RangeView<'a> {
    engine: &'a Engine,
    snap: DbSnapshot<'a>,
    descriptor: Option<RangeDescriptor>,
    apply_state: ApplyState,
}

impl std::fmt::Debug for RangeView<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RangeView")
            .field("descriptor", &self.descriptor)
            .field("apply_state", &self.apply_state)
            .finish_non_exhaustive()
    }
}

impl<'a> RangeView<'a> {
    /// Takes the view of range `group` now.
    ///
    /// # Errors
    ///
    /// RocksDB's, or `Corruption` if the descriptor or the apply state does not decode.
    pub fn take(engine: &'a Engine, group: RangeId) -> Result<RangeView<'a>> {
        let snap = engine.db().snapshot();
        let key = keys::descriptor_key(group);
        let descriptor = match snap.get_cf(engine.cf(Cf::Meta), key)? {
            None => None,
            Some(v) => Some(
                RangeDescriptor::decode(&v[..])
                    .map_err(|e| StoreError::corrupt("range descriptor", &key, e))?,
            ),
        };
        let key = keys::state_key(group, StateKind::Apply);
        let apply_state = match snap.get_cf(engine.cf(Cf::Raft), key)? {
            None => ApplyState::default(),
            Some(v) => ApplyState::decode(&v[..])
                .map_err(|e| StoreError::corrupt("apply state", &key, e))?,
        };
        Ok(RangeView {
            engine,
            snap,
            descriptor,
            apply_state,
        })
    }

    /// The range's descriptor at this point; `None` if this node has none (never had the
    /// range, or it was destroyed).
    pub fn descriptor(&self) -> Option<&RangeDescriptor> {
        self.descriptor.as_ref()
    }

    /// How far the range had applied its log at this point.
    pub fn apply_state(&self) -> &ApplyState {
        &self.apply_state
    }

    /// Streams the range's data at this point to `sink`, as [`export_range`] does (its
    /// chunking, its back-pressure); nothing if the view has no descriptor. The sink's own
    /// error type lets a caller stop the export for reasons of its own (its receiver went
    /// away).
    ///
    /// # Errors
    ///
    /// RocksDB's (as `E`), or the sink's.
    pub fn export<E: From<StoreError>>(
        &self,
        chunk_bytes: usize,
        sink: impl FnMut(SnapshotChunk) -> std::result::Result<(), E>,
    ) -> std::result::Result<(), E> {
        let Some(d) = &self.descriptor else {
            return Ok(());
        };
        export_from(
            self.engine,
            &self.snap,
            &d.start_key,
            &d.end_key,
            chunk_bytes,
            sink,
        )
    }
}

/// Builds the write batch that replaces a range's data with a snapshot's.
///
/// `begin` clears `[start, end)`; `add_chunk` adds pairs; the caller then adds the raft state
/// (`GroupStorage::apply_snapshot_state`) to [`SnapshotImport::batch`] and writes the batch
/// with sync: nothing of the snapshot is visible until all of it is.
#[derive(Debug)]
pub struct SnapshotImport {
    batch: WriteBatch,
    start: Vec<u8>,
    end: Vec<u8>,
    pairs: u64,
    bytes: u64,
}

impl SnapshotImport {
    /// Starts an import of `[start, end)`: the batch first deletes whatever the range holds.
    pub fn begin(mut batch: WriteBatch, start: &[u8], end: &[u8]) -> Result<SnapshotImport> {
        batch.clear_data_range(start, end)?;
        Ok(SnapshotImport {
            batch,
            start: start.to_vec(),
            end: end.to_vec(),
            pairs: 0,
            bytes: 0,
        })
    }

    /// An import that writes no user data (the system range's snapshot, whose records the
    /// caller put in `batch`): chunks are refused.
    pub fn without_data(batch: WriteBatch) -> SnapshotImport {
        SnapshotImport {
            batch,
            // An empty interval: [0x01, 0x00) holds no key.
            start: vec![1],
            end: vec![0],
            pairs: 0,
            bytes: 0,
        }
    }

    /// Adds one chunk. Pairs outside the range are refused: a snapshot must not write into a
    /// neighbour's keys.
    pub fn add_chunk(&mut self, chunk: &SnapshotChunk) -> Result<()> {
        for p in &chunk.pairs {
            let k = &p.key[..];
            if k < self.start.as_slice() || (!self.end.is_empty() && k >= self.end.as_slice()) {
                return Err(crate::StoreError::corrupt(
                    "snapshot chunk",
                    k,
                    "key outside the snapshot's range",
                ));
            }
            self.batch.put_data(k, &p.value);
            self.pairs += 1;
            self.bytes += (p.key.len() + p.value.len()) as u64;
        }
        Ok(())
    }

    /// The batch, to add the raft state to.
    pub fn batch(&mut self) -> &mut WriteBatch {
        &mut self.batch
    }

    /// Pairs and bytes added so far.
    pub fn stats(&self) -> (u64, u64) {
        (self.pairs, self.bytes)
    }

    /// Ends the import, returning the batch to write (with sync).
    pub fn finish(self) -> WriteBatch {
        self.batch
    }
}
