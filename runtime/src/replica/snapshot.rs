//! Snapshots and log compaction.
//!
//! A group's log is compacted locally once it holds more than `log_compact_threshold`
//! applied entries, keeping `log_compact_trailing` of them for slightly lagging followers. A
//! follower that needs what was compacted gets a snapshot: the range's data as of the
//! leader's applied index plus its descriptor, built by the store and installed atomically
//! (data, descriptor, raft state in one synced batch). A snapshot whose keys overlap another
//! range here is refused before raft sees it. If every such range was absorbed by the
//! snapshot's range in a merge this node missed, those replicas are retired (an effect the
//! owner carries out) and the snapshot, which raft sends again, is installed next time.

use flotilla_proto::meta::{RangeState, SnapshotHeader};
use flotilla_proto::Message as _;
use flotilla_store::{SnapshotImport, WriteBatch};
use raft::prelude::Snapshot;

use super::{Effect, Env, Output, Replica};
use crate::error::Error;

impl Replica {
    /// Decides, before raft sees it, whether a snapshot may be installed here: its keys must
    /// not overlap another range this node serves, unless every such range is one the
    /// snapshot's range absorbed by a merge this node has not finished (inside its span, with
    /// an older version: epochs only grow along a range's history, so an older range inside
    /// a newer one's span no longer owns its keys). Those replicas are retired (an effect) and
    /// this copy of the snapshot is refused; the leader sends it again, and by then their keys
    /// are free. A refused snapshot is dropped; the leader retries.
    pub(super) fn accept_snapshot(
        &mut self,
        msg: &raft::prelude::Message,
        env: &Env<'_>,
        out: &mut Output,
    ) -> bool {
        let Ok(header) = SnapshotHeader::decode(&msg.get_snapshot().data[..]) else {
            return false;
        };
        let Some(desc) = header.descriptor else {
            return false;
        };
        let others: Vec<_> = env
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
        for d in others.iter() {
            out.effect(Effect::Retire(d.clone()));
        }
        others.is_empty()
    }

    /// Installs a snapshot raft handed us in a Ready.
    pub(super) fn apply_snapshot(
        &mut self,
        snap: Snapshot,
        env: &Env<'_>,
        out: &mut Output,
    ) -> crate::error::Result<()> {
        let meta = snap.get_metadata().clone();
        let header = SnapshotHeader::decode(&snap.data[..]).map_err(|e| Error::BadSnapshot {
            range: self.range,
            reason: format!("undecodable header: {e}"),
        })?;
        let mut desc = header.descriptor.ok_or_else(|| Error::BadSnapshot {
            range: self.range,
            reason: "no descriptor".into(),
        })?;
        desc.state = RangeState::Normal as i32;
        // A snapshot must not overwrite keys of another range this node serves. `accept_snapshot`
        // refused such snapshots before raft saw them; one that still clashes here (a range
        // appeared in between) cannot be un-stepped, so the replica is isolated.
        let clash = env
            .router
            .overlapping(&desc.start_key, &desc.end_key)
            .into_iter()
            .any(|d| d.range_id != desc.range_id);
        if clash {
            return Err(Error::BadSnapshot {
                range: self.range,
                reason: "its keys overlap another range on this node".into(),
            });
        }
        let mut import = SnapshotImport::begin(env.engine.batch(), &desc.start_key, &desc.end_key)?;
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
        env.engine.write(import.finish(), true)?;
        out.effect(Effect::Route(desc));
        // Reads waiting below the snapshot point can now be served.
        self.complete_reads(env, out);
        metrics::counter!("flotilla_runtime_snapshots_applied_total").increment(1);
        Ok(())
    }

    /// Compacts the log if it grew past the threshold.
    pub(super) fn maybe_compact(
        &mut self,
        env: &Env<'_>,
        batch: &mut WriteBatch,
    ) -> crate::error::Result<()> {
        let cfg = &env.config;
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
    pub(super) fn force_compact(&mut self, out: &mut Output) -> crate::error::Result<()> {
        let applied = self.raw.store().apply_state().applied_index;
        out.forced_compactions.push((self.range, applied));
        Ok(())
    }

    /// Runs a compaction requested by `force_compact`.
    pub(crate) fn compact_to(
        &mut self,
        index: u64,
        batch: &mut WriteBatch,
    ) -> crate::error::Result<()> {
        Ok(self.raw.mut_store().compact(index, batch)?)
    }
}
