//! Snapshots and log compaction.
//!
//! A group's log is compacted locally once it holds more than `log_compact_threshold`
//! applied entries, keeping `log_compact_trailing` of them for slightly lagging followers. A
//! follower that needs what was compacted gets a snapshot: the range's data as of the
//! leader's applied index plus its descriptor, built by the store and installed atomically
//! (data, descriptor, raft state in one synced batch).

use flotilla_proto::meta::{RangeState, SnapshotHeader};
use flotilla_proto::Message as _;
use flotilla_store::{SnapshotImport, WriteBatch};
use raft::prelude::Snapshot;

use super::Replica;
use crate::error::Error;
use crate::fsm::worker::Round;
use crate::node_group::Shared;

impl Replica {
    /// Installs a snapshot raft handed us in a Ready.
    pub(super) fn apply_snapshot(
        &mut self,
        snap: Snapshot,
        shared: &Shared,
        round: &mut Round,
    ) -> crate::Result<()> {
        let meta = snap.get_metadata().clone();
        let header = SnapshotHeader::decode(&snap.data[..])
            .map_err(|e| Error::Store(format!("undecodable snapshot of {}: {e}", self.range)))?;
        let mut desc = header
            .descriptor
            .ok_or_else(|| Error::Store(format!("snapshot of {} has no descriptor", self.range)))?;
        desc.state = RangeState::Normal as i32;
        // A snapshot must not overwrite keys of another range this node serves: that range's
        // newer shape wins and this replica waits (raft will retry the snapshot).
        let clash = shared
            .router
            .overlapping(&desc.start_key, &desc.end_key)
            .into_iter()
            .any(|d| d.range_id != desc.range_id);
        if clash {
            return Err(Error::Store(format!(
                "snapshot of {} overlaps another range on this node",
                self.range
            )));
        }
        let mut import =
            SnapshotImport::begin(shared.engine.batch(), &desc.start_key, &desc.end_key)?;
        for c in &header.inline_chunks {
            import.add_chunk(c)?;
        }
        let records: Vec<(u64, Vec<u8>)> = header
            .client_records
            .iter()
            .map(|r| (r.client_id, r.record.to_vec()))
            .collect();
        import.batch().replace_client_records(self.range, &records);
        self.raw
            .mut_store()
            .apply_snapshot_state(&meta, desc.clone(), import.batch());
        shared.engine.write(import.finish(), true)?;
        shared.router.upsert(desc);
        // Reads waiting below the snapshot point can now be served.
        self.complete_reads(shared, round);
        metrics::counter!("flotilla_runtime_snapshots_applied_total").increment(1);
        Ok(())
    }

    /// Compacts the log if it grew past the threshold.
    pub(super) fn maybe_compact(
        &mut self,
        shared: &Shared,
        batch: &mut WriteBatch,
    ) -> crate::Result<()> {
        let cfg = &shared.config;
        let store = self.raw.store();
        let applied = store.apply_state().applied_index;
        let truncated = store.apply_state().truncated_index;
        if applied.saturating_sub(truncated) <= cfg.log_compact_threshold {
            return Ok(());
        }
        let to = applied.saturating_sub(cfg.log_compact_trailing);
        if to > truncated {
            self.raw.mut_store().compact(to, batch)?;
            metrics::counter!("flotilla_runtime_log_compactions_total").increment(1);
        }
        Ok(())
    }

    /// Compacts the whole applied log now: any follower that still needs an entry of it will
    /// be sent a snapshot. The write goes out with the round's apply batch.
    pub(super) fn force_compact(&mut self, round: &mut Round) -> crate::Result<()> {
        let applied = self.raw.store().apply_state().applied_index;
        round.forced_compactions.push((self.range, applied));
        Ok(())
    }

    /// Runs a compaction requested by `force_compact`.
    pub(crate) fn compact_to(&mut self, index: u64, batch: &mut WriteBatch) -> crate::Result<()> {
        Ok(self.raw.mut_store().compact(index, batch)?)
    }
}
