//! Exports of one range's data at one point, for backups ([`NodeGroup::export_range`]).
//!
//! Phases: (1) the range must still have the version the caller routed with; (2) a
//! linearizable read barrier (ReadIndex) on this node's replica, so the applied index is at
//! least the commit index at the time of the request and the export holds every write
//! acknowledged before it; (3) a [`RangeView`] of the engine, taken on a blocking thread:
//! descriptor, apply state and data from one RocksDB snapshot, which agree at any point (they
//! are written in one batch), so no worker round has to pause; the view must still show the
//! version asked for (a split or merge that applied after the barrier is refused with
//! `EpochNotMatch`); (4) its data streamed in chunks through a small channel, the reader's
//! pace holding the exporting thread back. Nothing of this touches the replica: a backup
//! costs the range one ReadIndex round and a RocksDB snapshot.

use std::sync::Arc;

use flotilla_proto::meta::{RangeDescriptor, RangeState, SnapshotChunk};
use flotilla_proto::RangeId;
use flotilla_store::{RangeView, StoreError};
use tokio::sync::{mpsc, oneshot};

use crate::api::ReadConsistency;
use crate::error::{Error, Result};
use crate::node_group::NodeGroup;

/// Chunks an export reads ahead of its reader.
const CHUNKS_AHEAD: usize = 2;

/// One range's data at one point of this node, as [`NodeGroup::export_range`] took it: the
/// descriptor and applied index of that point, and its pairs in key order, chunk by chunk.
#[derive(Debug)]
pub struct RangeExport {
    descriptor: RangeDescriptor,
    applied_index: u64,
    applied_term: u64,
    chunks: mpsc::Receiver<Result<SnapshotChunk>>,
}

impl RangeExport {
    /// The range at the export's point.
    pub fn descriptor(&self) -> &RangeDescriptor {
        &self.descriptor
    }

    /// The index (and its term) the range had applied at the export's point: the data is
    /// the state machine exactly as of this entry.
    pub fn applied(&self) -> (u64, u64) {
        (self.applied_index, self.applied_term)
    }

    /// The next chunk of pairs, in key order; `None` once every pair was given.
    ///
    /// # Errors
    ///
    /// `Store` if reading the engine failed (the export ends there).
    pub async fn next_chunk(&mut self) -> Option<Result<SnapshotChunk>> {
        self.chunks.recv().await
    }
}

/// Why the exporting thread stopped before the end.
enum Stop {
    /// The reader dropped the export.
    Gone,
    Store(StoreError),
}

impl From<StoreError> for Stop {
    fn from(e: StoreError) -> Self {
        Stop::Store(e)
    }
}

impl NodeGroup {
    /// Exports the data of `range` at one point (see the module doc), in chunks of about
    /// `chunk_bytes`: linearizable, so it holds every write acknowledged before the call.
    /// `version` is the range's epoch version the caller knows it by: a range that split or
    /// merged since is refused (membership changes do not matter, they move no key).
    ///
    /// # Errors
    ///
    /// `RangeNotFound` (not here), `EpochNotMatch` (the range changed shape: route again),
    /// `Busy` (it is a merge's source), the read barrier's errors (`NotLeader`, ...), `Store`.
    pub async fn export_range(
        &self,
        range: RangeId,
        version: u64,
        chunk_bytes: usize,
    ) -> Result<RangeExport> {
        let s = self.shared.clone();
        if range.is_system() {
            return Err(Error::AdminRefused(
                "the system range holds no user keys and is not exported".into(),
            ));
        }
        let reshaped = move |d: &RangeDescriptor| Error::EpochNotMatch {
            current: s.router.overlapping(&d.start_key, &d.end_key),
        };
        let desc = self
            .shared
            .router
            .get(range)
            .ok_or(Error::RangeNotFound(range))?;
        if desc.epoch_or_default().version != version {
            return Err(reshaped(&desc));
        }
        self.read_barrier(range, ReadConsistency::Linearizable)
            .await?;

        let (start_tx, start_rx) = oneshot::channel();
        let (tx, rx) = mpsc::channel(CHUNKS_AHEAD);
        let engine = self.shared.engine.clone();
        tokio::task::spawn_blocking(move || {
            let view = match RangeView::take(&engine, range) {
                Ok(v) => v,
                Err(e) => {
                    let _ = start_tx.send(Err(Error::Store(Arc::new(e))));
                    return;
                }
            };
            let start = match view.descriptor() {
                Some(d) if d.state != RangeState::Normal as i32 => Err(Error::RangeNotFound(range)),
                Some(d) if d.epoch_or_default().version != version => Err(reshaped(d)),
                Some(d) if d.merge.is_some() => Err(Error::Busy("the range is a merge's source")),
                Some(d) => Ok((d.clone(), *view.apply_state())),
                None => Err(Error::RangeNotFound(range)),
            };
            let ok = start.is_ok();
            if start_tx.send(start).is_err() || !ok {
                return;
            }
            let sent = view.export(chunk_bytes, |c| {
                tx.blocking_send(Ok(c)).map_err(|_| Stop::Gone)
            });
            if let Err(Stop::Store(e)) = sent {
                let _ = tx.blocking_send(Err(Error::Store(Arc::new(e))));
            }
        });
        let (descriptor, apply) = start_rx.await.map_err(|_| Error::Stopped)??;
        Ok(RangeExport {
            descriptor,
            applied_index: apply.applied_index,
            applied_term: apply.applied_term,
            chunks: rx,
        })
    }
}
