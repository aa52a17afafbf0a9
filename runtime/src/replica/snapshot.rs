//! Snapshots and log compaction.
//!
//! A group's log is compacted locally once it holds more than `log_compact_threshold`
//! applied entries, keeping `log_compact_trailing` of them for slightly lagging followers. A
//! follower that needs what was compacted gets a snapshot: the range's data as of the
//! leader's applied index plus its descriptor, built by the store and installed atomically
//! (data, descriptor, raft state in one synced batch). A snapshot whose keys overlap another
//! range here is refused before raft sees it, unless that range was absorbed by the
//! snapshot's range in a merge this node missed: that replica is retired first.

use flotilla_proto::meta::{RangeState, SnapshotHeader};
use flotilla_proto::Message as _;
use flotilla_store::{SnapshotImport, WriteBatch};
use raft::prelude::Snapshot;

use super::Replica;
use crate::error::Error;
use crate::fsm::worker::Round;
use crate::node_group::Shared;

impl Replica {
    /// Decides, before raft sees it, whether a snapshot may be installed here: its keys must
    /// not overlap another range this node serves, unless every such range is one the
    /// snapshot's range absorbed by a merge this node has not finished (inside its span, with
    /// an older version: epochs only grow along a range's history, so an older range inside
    /// a newer one's span no longer owns its keys). Those replicas are retired here so that
    /// the snapshot can take their keys. A refused snapshot is dropped; the leader retries.
    pub(super) fn accept_snapshot(
        &mut self,
        msg: &raft::prelude::Message,
        shared: &Shared,
        round: &mut Round,
    ) -> bool {
        let Ok(header) = SnapshotHeader::decode(&msg.get_snapshot().data[..]) else {
            return false;
        };
        let Some(desc) = header.descriptor else {
            return false;
        };
        let others: Vec<_> = shared
            .router
            .overlapping(&desc.start_key, &desc.end_key)
            .into_iter()
            .filter(|d| d.range_id != self.range.0)
            .collect();
        let version = desc.epoch_or_default().version;
        let absorbed = |d: &flotilla_proto::meta::RangeDescriptor| {
            let inside = d.start_key >= desc.start_key
                && (desc.end_key.is_empty()
                    || (!d.end_key.is_empty() && d.end_key <= desc.end_key));
            inside && d.epoch_or_default().version < version
        };
        if !others.iter().all(absorbed) {
            return false;
        }
        others.iter().all(|d| retire(d, shared, round))
    }

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

/// Takes the replica of a range that another range absorbed out of service: tombstone and
/// raft state written (synced) at once; its keys stay for the absorbing range's snapshot,
/// which replaces them. False if the replica is busy in another round (try again later).
fn retire(
    desc: &flotilla_proto::meta::RangeDescriptor,
    shared: &Shared,
    round: &mut Round,
) -> bool {
    let id = desc.id();
    let Some(cell) = shared.cell(id) else {
        shared.router.remove(id);
        return true;
    };
    let Some(mut guard) = cell.replica.try_lock() else {
        return false;
    };
    let mut batch = shared.engine.batch();
    let mut tomb = desc.clone();
    tomb.state = RangeState::Tombstone as i32;
    batch.destroy_group_state(id);
    batch.put_descriptor(&tomb);
    if let Err(e) = shared.engine.write(batch, true) {
        tracing::error!(range = %id, "cannot retire an absorbed replica: {e}");
        return false;
    }
    if let Some(mut r) = guard.take() {
        r.abort_pending(round, Error::RangeNotFound(id));
    }
    drop(guard);
    for token in cell
        .fail()
        .iter()
        .filter_map(crate::fsm::mailbox::PeerMsg::token)
    {
        round.complete(token, Err(Error::RangeNotFound(id)));
    }
    shared.handovers.remove(&id.0);
    shared.unregister(id);
    shared.router.remove(id);
    shared
        .tombstones
        .insert(id.0, tomb.epoch_or_default().conf_ver);
    metrics::counter!("flotilla_runtime_replicas_retired_total").increment(1);
    tracing::info!(range = %id, "replica retired: a snapshot of the range that absorbed it arrived");
    true
}
