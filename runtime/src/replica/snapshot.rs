//! Snapshots and log compaction.
//!
//! A group's log is compacted locally once it holds more than `log_compact_threshold`
//! applied entries, keeping `log_compact_trailing` of them. A leader keeps more: every entry
//! a follower that is up still needs (from the lowest index such a follower has: TiKV's raft
//! log GC is the model), within `log_retain_max_entries` and `log_retain_max_bytes`, past
//! which a snapshot is cheaper than the log. So a follower a few milliseconds behind under load
//! catches up from the log; one that is down holds nothing back.
//!
//! "Up" is the node's, as node liveness sees it (`Host::node_live`), not raft's activity
//! marks: a group that slept sends no heartbeats, so raft's marks of its followers go stale
//! while their nodes are perfectly up (and a woken leader's first check-quorum clears them),
//! whereas a node that liveness declared down (silent for `node_down_ticks`) is down for
//! every group at once, asleep or not. Only without liveness (a transport that does not track
//! it) do raft's marks decide: recently active, now or in the last check-quorum window.
//!
//! A follower that needs what was compacted gets a snapshot: the range's data as of the
//! leader's applied index plus its descriptor, built by the store and installed atomically
//! (data, descriptor, raft state in one synced batch). A snapshot whose keys overlap another
//! range here is refused before raft sees it. If every such range was absorbed by the
//! snapshot's range in a merge this node missed, those replicas are retired (an effect the
//! owner carries out) and the snapshot, which raft sends again, is installed next time.

use flotilla_proto::meta::{RangeState, SnapshotHeader};
use flotilla_proto::Message as _;
use flotilla_store::{SnapshotImport, WriteBatch};
use raft::prelude::Snapshot;
use raft::ProgressState;

use super::{Effect, Env, Output, Replica};
use crate::config::NodeGroupConfig;
use crate::error::Error;

/// Without node liveness: the peers a leader counts as up besides those raft marks recently
/// active now: raft clears its marks at every check-quorum (each election timeout), so a peer
/// that is up may read as inactive until its next message; the marks of the window that ended
/// last are kept here.
#[derive(Debug, Default)]
pub(super) struct PeersUp {
    /// The term the marks were taken in: in another term (the first window of a leadership)
    /// every peer counts as up.
    term: u64,
    ids: Vec<u64>,
}

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
        // The system range shares no key with any range: nothing to clash with.
        if desc.id().is_system() {
            return desc.id() == self.range;
        }
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
        // (The system range holds no key: nothing to clash with.)
        let clash = !desc.id().is_system()
            && env
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
        if desc.id().is_system() != self.range.is_system() {
            return Err(Error::BadSnapshot {
                range: self.range,
                reason: format!("it is a snapshot of {}", desc.id()),
            });
        }
        let mut import = if desc.id().is_system() {
            // Its data is the system records, not user keys: replace them all.
            let mut batch = env.engine.batch();
            batch.clear_system_records();
            for p in header.inline_chunks.iter().flat_map(|c| &c.pairs) {
                batch.put_system_record(&p.key, &p.value);
            }
            SnapshotImport::without_data(batch)
        } else {
            let mut import =
                SnapshotImport::begin(env.engine.batch(), &desc.start_key, &desc.end_key)?;
            for c in &header.inline_chunks {
                import.add_chunk(c)?;
            }
            import
        };
        let records: Vec<(u64, Vec<u8>)> = header
            .client_records
            .iter()
            .map(|r| (r.client_id, r.record.to_vec()))
            .collect();
        import.batch().replace_client_records(self.range, &records);
        self.retry_records.clear();
        let shared = self
            .raw
            .mut_store()
            .apply_snapshot_state(&meta, desc, import.batch());
        env.engine.write(import.finish(), true)?;
        out.effect(Effect::Route(shared));
        // Entries of forwarded proposals may be inside the snapshot, never applied here.
        self.drop_forwarded(out);
        // Reads waiting below the snapshot point can now be served.
        self.complete_reads(env, out);
        metrics::counter!("flotilla_runtime_snapshots_applied_total").increment(1);
        Ok(())
    }

    /// Compacts the log if it grew past the threshold, keeping what followers that are up
    /// still need (see the module doc).
    pub(super) fn maybe_compact(
        &mut self,
        env: &Env<'_>,
        batch: &mut WriteBatch,
    ) -> crate::error::Result<()> {
        let cfg = &env.config;
        let state = self.raw.store().apply_state();
        let (applied, truncated) = (state.applied_index, state.truncated_index);
        if applied.saturating_sub(truncated) <= cfg.log_compact_threshold {
            return Ok(());
        }
        let mut to = applied.saturating_sub(cfg.log_compact_trailing);
        if self.is_leader() {
            to = to.min(self.needed_by_peers(truncated, env));
        }
        to = to.max(self.retention_floor(cfg)).min(applied);
        let least = cfg
            .log_compact_threshold
            .saturating_sub(cfg.log_compact_trailing)
            .max(1);
        if to >= truncated + least {
            self.raw.mut_store().compact(to, batch)?;
            metrics::counter!("flotilla_runtime_log_compactions_total").increment(1);
        }
        Ok(())
    }

    /// As leader: the highest index the log may be compacted to without taking an entry a
    /// peer that is up still needs. A peer behind the log's start (`truncated`) needs a
    /// snapshot anyway; one being sent a snapshot needs the entries after it; one whose
    /// progress is not known yet (a new leader's first round trip) holds everything.
    fn needed_by_peers(&self, truncated: u64, env: &Env<'_>) -> u64 {
        let raft = &self.raw.raft;
        let mut to = u64::MAX;
        for (&id, pr) in raft.prs().iter() {
            if id == self.id || !self.peer_up(id, pr.recent_active, env) {
                continue;
            }
            let has = match pr.state {
                ProgressState::Snapshot => pr.pending_snapshot,
                _ if pr.matched == 0 => truncated,
                _ => pr.matched,
            };
            if has >= truncated {
                to = to.min(has);
            }
        }
        to
    }

    /// Whether a peer counts as up, so that its needs hold the log back: its node is up as
    /// node liveness sees it (see the module doc). Without liveness (or for a peer whose node
    /// is not known): raft marks it recently active, or it was marked in the last complete
    /// check-quorum window of this leadership, or none has completed yet.
    fn peer_up(&self, id: u64, recent_active: bool, env: &Env<'_>) -> bool {
        if let Some(live) = self.node_of(id).and_then(|n| env.host.node_live(n)) {
            return live;
        }
        recent_active || self.peers_up.term != self.raw.raft.term || self.peers_up.ids.contains(&id)
    }

    /// Called before each tick: keeps raft's activity marks when the tick is about to clear
    /// them (a leader's check-quorum), for [`Replica::peer_up`] without node liveness.
    pub(super) fn note_peers_up(&mut self) {
        let raft = &self.raw.raft;
        if raft.state != raft::StateRole::Leader
            || !raft.check_quorum
            || raft.election_elapsed + 1 < raft.election_timeout()
        {
            return;
        }
        self.peers_up.term = raft.term;
        self.peers_up.ids.clear();
        let active = raft.prs().iter().filter(|(_, pr)| pr.recent_active);
        self.peers_up.ids.extend(active.map(|(&id, _)| id));
    }

    /// The lowest index the log must be compacted to whatever followers need: the log then
    /// keeps at most `log_retain_max_entries` applied entries and about `log_retain_max_bytes`.
    fn retention_floor(&self, cfg: &NodeGroupConfig) -> u64 {
        let store = self.raw.store();
        let applied = store.apply_state().applied_index;
        let by_count = applied.saturating_sub(cfg.log_retain_max_entries);
        let (bytes, last) = (store.log_bytes_hint(), store.last_index_value());
        if bytes <= cfg.log_retain_max_bytes {
            return by_count;
        }
        let held = last - store.apply_state().truncated_index;
        let keep = (held as u128 * cfg.log_retain_max_bytes as u128 / bytes as u128) as u64;
        by_count.max(last - keep)
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
