//! `GroupStorage`: one group's view of the shared engine, implementing `raft::Storage`.
//!
//! The struct is owned by the group's `RawNode` and mutated only through
//! `RawNode::mut_store()` by the one worker that holds the replica, so it needs no lock. It
//! keeps the raft state and a short cache of the log tail in memory: raft re-reads recent
//! entries (to send appends, to apply) and those reads should not hit RocksDB. Writes never
//! go to disk from here directly: they are added to a caller's [`WriteBatch`], which the
//! worker commits for all groups of a round at once.

use std::collections::VecDeque;
use std::sync::Arc;

use flotilla_proto::meta::{ApplyState, ClientRecordEntry, RangeDescriptor, SnapshotHeader};
use flotilla_proto::{Message as _, RangeId};
use prost_raft::Message as _;
use raft::prelude::{ConfState, Entry, HardState, Snapshot, SnapshotMetadata};
use raft::{GetEntriesContext, RaftState, StorageError};

use crate::engine::{Cf, Engine, RecoveredGroup, WriteBatch};
use crate::error::{Result, StoreError};
use crate::keys::{self, StateKind};
use crate::snapshot;

/// One group's raft log and state, backed by the shared engine.
pub struct GroupStorage {
    engine: Arc<Engine>,
    group: RangeId,
    hard_state: HardState,
    conf_state: ConfState,
    apply_state: ApplyState,
    /// Shared with the node's range router (one copy per replica, not two).
    descriptor: Option<Arc<RangeDescriptor>>,
    last_index: u64,
    last_term: u64,
    /// Contiguous entries ending at `last_index`.
    cache: VecDeque<Entry>,
    /// Estimated encoded bytes of the log `(truncated_index, last_index]`: exact for entries
    /// appended since the node started or the log was replaced by a snapshot, shrunk in
    /// proportion when entries go without being read (compaction, an overwritten tail); 0
    /// after a restart until entries are appended.
    log_bytes: u64,
}

impl std::fmt::Debug for GroupStorage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GroupStorage")
            .field("group", &self.group)
            .field("hard_state", &self.hard_state)
            .field("apply_state", &self.apply_state)
            .field("last_index", &self.last_index)
            .field("cached", &self.cache.len())
            .finish()
    }
}

/// Index and term at which a group created by a split starts (as TiKV does): non-zero so
/// that the group counts as initialized and raft never asks for a snapshot below it.
pub const SPLIT_INIT_INDEX: u64 = 5;
/// See [`SPLIT_INIT_INDEX`].
pub const SPLIT_INIT_TERM: u64 = 5;

impl GroupStorage {
    /// A group with no state at all: raft treats it as uninitialized (index 0, empty
    /// membership) and its leader will send it a snapshot. Nothing is written until raft
    /// produces a Ready.
    pub fn new_uninitialized(engine: Arc<Engine>, group: RangeId) -> GroupStorage {
        GroupStorage {
            engine,
            group,
            hard_state: HardState::default(),
            conf_state: ConfState::default(),
            apply_state: ApplyState::default(),
            descriptor: None,
            last_index: 0,
            last_term: 0,
            cache: VecDeque::new(),
            log_bytes: 0,
        }
    }

    /// Writes the initial state of a new initialized group (bootstrap of a range, or the
    /// right side of a split) into `batch` and returns its storage: log empty and truncated
    /// at `index`/`term`, membership `conf_state`, applied at `index`.
    pub fn initialize(
        engine: Arc<Engine>,
        descriptor: RangeDescriptor,
        conf_state: ConfState,
        index: u64,
        term: u64,
        batch: &mut WriteBatch,
    ) -> GroupStorage {
        let group = descriptor.id();
        let mut s = GroupStorage::new_uninitialized(engine, group);
        s.hard_state.term = term;
        s.hard_state.commit = index;
        s.set_conf_state(conf_state, batch);
        s.apply_state = ApplyState {
            applied_index: index,
            applied_term: term,
            truncated_index: index,
            truncated_term: term,
        };
        s.last_index = index;
        s.last_term = term;
        batch.put_descriptor(&descriptor);
        s.descriptor = Some(Arc::new(descriptor));
        s.write_hard_state(batch);
        s.write_apply(batch);
        s
    }

    /// Rebuilds a group's storage from what [`Engine::recover`] found.
    pub fn recover(engine: Arc<Engine>, rec: RecoveredGroup) -> Result<GroupStorage> {
        let mut s = GroupStorage::new_uninitialized(engine, rec.group);
        s.hard_state = rec.hard_state;
        s.conf_state = rec.conf_state;
        s.apply_state = rec.apply_state;
        s.descriptor = rec.descriptor.map(Arc::new);
        s.last_index = rec.last_index;
        s.last_term = if s.last_index == s.apply_state.truncated_index {
            s.apply_state.truncated_term
        } else {
            s.read_term_from_disk(s.last_index)?
        };
        // The commit index is written only with a new term or vote (see `set_commit`), so it
        // may lag the applied index; applied entries were committed.
        if s.hard_state.commit < s.apply_state.applied_index {
            s.hard_state.commit = s.apply_state.applied_index;
        }
        // A log can never end below what was committed: that would mean a synced write was
        // lost, and serving from it could lose acknowledged writes.
        if s.hard_state.commit > s.last_index {
            return Err(StoreError::Corruption {
                what: "raft state",
                key: keys::state_key(rec.group, StateKind::Hard).to_vec(),
                reason: format!(
                    "commit {} is beyond the last log index {}",
                    s.hard_state.commit, s.last_index
                ),
            });
        }
        Ok(s)
    }

    /// The group this storage belongs to.
    pub fn group(&self) -> RangeId {
        self.group
    }

    /// The engine.
    pub fn engine(&self) -> &Arc<Engine> {
        &self.engine
    }

    /// raft's term, vote and commit as last written.
    pub fn hard_state(&self) -> &HardState {
        &self.hard_state
    }

    /// Membership as of the applied index.
    pub fn conf_state(&self) -> &ConfState {
        &self.conf_state
    }

    /// Applied and truncated index/term.
    pub fn apply_state(&self) -> &ApplyState {
        &self.apply_state
    }

    /// The range this group replicates, once known.
    pub fn descriptor(&self) -> Option<&RangeDescriptor> {
        self.descriptor.as_deref()
    }

    /// The descriptor itself, for holders that keep it beside this storage (the range
    /// router): sharing it keeps one copy per replica.
    pub fn shared_descriptor(&self) -> Option<Arc<RangeDescriptor>> {
        self.descriptor.clone()
    }

    /// True once the group has a membership (created by bootstrap, split or a snapshot).
    pub fn is_initialized(&self) -> bool {
        !self.conf_state.voters.is_empty() || !self.conf_state.learners.is_empty()
    }

    /// Index of the last log entry (or of the snapshot if the log is empty).
    pub fn last_index_value(&self) -> u64 {
        self.last_index
    }

    /// Index of the first entry still in the log.
    pub fn first_index_value(&self) -> u64 {
        self.apply_state.truncated_index + 1
    }

    /// Estimated bytes of the entries in the log (see [`GroupStorage::append`]): exact for
    /// what was appended since the node started, 0 for entries it found on disk.
    pub fn log_bytes_hint(&self) -> u64 {
        self.log_bytes
    }

    /// Log entries `[low, high)`, from the cache or the disk (all of them: no size limit).
    ///
    /// # Errors
    ///
    /// `Compacted` below the first index, `Unavailable` past the last, a store failure.
    pub fn log_entries(&self, low: u64, high: u64) -> Result<Vec<Entry>> {
        self.entries_inner(low, high, None)
    }

    /// Entries currently held in the tail cache.
    pub fn cached_entries(&self) -> usize {
        self.cache.len()
    }

    /// Appends `entries` (which may overwrite a conflicting tail) to the log in `batch`.
    pub fn append(&mut self, entries: &[Entry], batch: &mut WriteBatch) -> Result<()> {
        let Some(first) = entries.first() else {
            return Ok(());
        };
        let first_index = first.index;
        if first_index <= self.apply_state.truncated_index || first_index > self.last_index + 1 {
            return Err(StoreError::NonContiguousAppend {
                group: self.group,
                first: first_index,
                detail: format!(
                    "log holds ({}, {}]",
                    self.apply_state.truncated_index, self.last_index
                ),
            });
        }
        // Check every index before writing any: a refused append must leave nothing in the
        // caller's batch, which also carries other groups' writes.
        if let Some((i, e)) = entries
            .iter()
            .enumerate()
            .find(|(i, e)| e.index != first_index + *i as u64)
        {
            return Err(StoreError::NonContiguousAppend {
                group: self.group,
                first: first_index,
                detail: format!("entry {i} has index {}", e.index),
            });
        }
        let last = entries.last().expect("non-empty");
        // Entries from `first_index` on are replaced: their share of the estimate goes.
        let replaced = (self.last_index + 1).saturating_sub(first_index);
        self.log_bytes -= self.bytes_share(replaced);
        for e in entries {
            let encoded = e.encode_to_vec();
            self.log_bytes += encoded.len() as u64;
            batch.put(Cf::Raft, &keys::log_key(self.group, e.index), &encoded);
        }
        if self.last_index > last.index {
            // The new entries replace a conflicting tail: the old entries past the new end
            // must go too, or a restart would resurrect them.
            batch.delete_range(
                Cf::Raft,
                &keys::log_key(self.group, last.index + 1),
                &keys::log_key(self.group, self.last_index + 1),
            );
        }
        // Keep the cache contiguous and ending at the new last index.
        while self.cache.back().is_some_and(|e| e.index >= first_index) {
            self.cache.pop_back();
        }
        if self
            .cache
            .back()
            .is_some_and(|e| e.index + 1 != first_index)
        {
            self.cache.clear();
        }
        let limit = self.engine.config().log_cache_entries;
        let skip = entries.len().saturating_sub(limit);
        self.cache.extend(entries[skip..].iter().cloned());
        while self.cache.len() > limit {
            self.cache.pop_front();
        }
        self.last_index = last.index;
        self.last_term = last.term;
        Ok(())
    }

    /// Records a new hard state in `batch`. A change of the commit index alone is kept in
    /// memory only (see [`GroupStorage::set_commit`]).
    pub fn set_hard_state(&mut self, hs: HardState, batch: &mut WriteBatch) {
        let durable = hs.term != self.hard_state.term || hs.vote != self.hard_state.vote;
        self.hard_state = hs;
        if durable {
            self.write_hard_state(batch);
        }
    }

    /// Keeps the term and vote of an earlier incarnation of this replica (an uninitialized
    /// one that a peer's message created and that may have voted) when it is newer than this
    /// storage's, so that the node never votes twice in one term.
    pub fn adopt_vote(&mut self, earlier: &HardState, batch: &mut WriteBatch) {
        if earlier.term > self.hard_state.term {
            let mut hs = self.hard_state.clone();
            hs.term = earlier.term;
            hs.vote = earlier.vote;
            self.set_hard_state(hs, batch);
        }
    }

    /// Moves commit forward (raft reports commit separately from the hard state when only the
    /// commit index changed). In memory only: the commit index is written with the term and
    /// vote when they change, never on its own, which would cost every group a write per
    /// round. A restart raises it to the applied index (see [`GroupStorage::recover`]) and
    /// raft learns the rest from the leader; the commit index need not be durable for
    /// safety, only the log, term and vote.
    pub fn set_commit(&mut self, commit: u64) {
        if commit > self.hard_state.commit {
            self.hard_state.commit = commit;
        }
    }

    /// Records that everything up to `index` (of `term`) has been applied. Call it in the same
    /// batch as the applied data.
    pub fn set_applied(&mut self, index: u64, term: u64, batch: &mut WriteBatch) {
        self.apply_state.applied_index = index;
        self.apply_state.applied_term = term;
        self.write_apply(batch);
    }

    /// Records the membership that an applied conf change produced (same batch as the apply).
    pub fn set_conf_state(&mut self, cs: ConfState, batch: &mut WriteBatch) {
        self.conf_state = cs;
        batch.put(
            Cf::Raft,
            &keys::state_key(self.group, StateKind::Conf),
            &self.conf_state.encode_to_vec(),
        );
    }

    /// Records a new descriptor (membership change, split); returns it shared, for the
    /// router.
    pub fn set_descriptor(
        &mut self,
        desc: RangeDescriptor,
        batch: &mut WriteBatch,
    ) -> Arc<RangeDescriptor> {
        batch.put_descriptor(&desc);
        let desc = Arc::new(desc);
        self.descriptor = Some(desc.clone());
        desc
    }

    /// Removes log entries up to and including `compact_index`, which must be applied.
    pub fn compact(&mut self, compact_index: u64, batch: &mut WriteBatch) -> Result<()> {
        if compact_index <= self.apply_state.truncated_index {
            return Ok(());
        }
        if compact_index > self.apply_state.applied_index {
            return Err(StoreError::Unavailable {
                group: self.group,
                index: compact_index,
                last_index: self.apply_state.applied_index,
            });
        }
        let term = self.term_of(compact_index)?;
        self.log_bytes -= self.bytes_share(compact_index - self.apply_state.truncated_index);
        batch.delete_range(
            Cf::Raft,
            &keys::log_key(self.group, self.apply_state.truncated_index + 1),
            &keys::log_key(self.group, compact_index + 1),
        );
        self.apply_state.truncated_index = compact_index;
        self.apply_state.truncated_term = term;
        self.write_apply(batch);
        while self.cache.front().is_some_and(|e| e.index <= compact_index) {
            self.cache.pop_front();
        }
        Ok(())
    }

    /// Drops cached entries up to `index` (they stay on disk), so that a group's memory can
    /// shrink to its fixed part: the runtime calls it when a group goes to sleep.
    pub fn evict_cache_to(&mut self, index: u64) {
        while self.cache.front().is_some_and(|e| e.index <= index) {
            self.cache.pop_front();
        }
        if self.cache.is_empty() {
            self.cache = VecDeque::new();
        }
    }

    /// Installs a received snapshot's raft state into `batch`: the log is replaced by the
    /// snapshot point, membership and descriptor come from it. The caller writes the range's
    /// data into the same batch (see [`crate::SnapshotImport`]) so that data, descriptor and
    /// apply state change together.
    pub fn apply_snapshot_state(
        &mut self,
        meta: &SnapshotMetadata,
        descriptor: RangeDescriptor,
        batch: &mut WriteBatch,
    ) -> Arc<RangeDescriptor> {
        let (lo, hi) = keys::log_bounds(self.group);
        batch.delete_range(Cf::Raft, &lo, &hi);
        self.cache = VecDeque::new();
        self.log_bytes = 0;
        self.last_index = meta.index;
        self.last_term = meta.term;
        self.apply_state = ApplyState {
            applied_index: meta.index,
            applied_term: meta.term,
            truncated_index: meta.index,
            truncated_term: meta.term,
        };
        if self.hard_state.commit < meta.index {
            self.hard_state.commit = meta.index;
        }
        if self.hard_state.term < meta.term {
            self.hard_state.term = meta.term;
        }
        self.write_hard_state(batch);
        self.write_apply(batch);
        let cs = meta.conf_state.clone().unwrap_or_default();
        self.set_conf_state(cs, batch);
        self.set_descriptor(descriptor, batch)
    }

    /// Builds a raft snapshot of the range as of the applied index, with the data inline.
    ///
    /// The caller must not have applied entries that are not yet written to the engine: the
    /// data read here is the engine's current content of the range.
    pub fn build_snapshot(&self, chunk_bytes: usize) -> Result<Snapshot> {
        let Some(desc) = self.descriptor.clone() else {
            return Err(StoreError::Unavailable {
                group: self.group,
                index: self.apply_state.applied_index,
                last_index: self.last_index,
            });
        };
        let mut chunks = Vec::new();
        if desc.id().is_system() {
            // The system range's data is its records in `meta`, not user keys: a few
            // counters and node records, so one chunk.
            let pairs = self.engine.system_records()?.into_iter();
            chunks.push(flotilla_proto::meta::SnapshotChunk {
                pairs: pairs
                    .map(|(key, value)| flotilla_proto::meta::KvPair {
                        key: key.into(),
                        value: value.into(),
                    })
                    .collect(),
            });
        } else {
            snapshot::export_range(
                &self.engine,
                &desc.start_key,
                &desc.end_key,
                chunk_bytes,
                |c| {
                    chunks.push(c);
                    Ok(())
                },
            )?;
        }
        let client_records = self
            .engine
            .client_records(self.group)?
            .into_iter()
            .map(|(client_id, record)| ClientRecordEntry {
                client_id,
                record: record.into(),
            })
            .collect();
        let header = SnapshotHeader {
            descriptor: Some(RangeDescriptor::clone(&desc)),
            inline_chunks: chunks,
            client_records,
        };
        let snap = Snapshot {
            data: header.encode_to_vec(),
            metadata: Some(SnapshotMetadata {
                index: self.apply_state.applied_index,
                term: self.apply_state.applied_term,
                conf_state: Some(self.conf_state.clone()),
            }),
        };
        Ok(snap)
    }

    /// The estimated bytes of `count` of the log's entries: their share of `log_bytes`.
    fn bytes_share(&self, count: u64) -> u64 {
        let held = self.last_index - self.apply_state.truncated_index;
        if count >= held {
            return self.log_bytes;
        }
        (self.log_bytes as u128 * count as u128 / held as u128) as u64
    }

    fn write_hard_state(&self, batch: &mut WriteBatch) {
        batch.put(
            Cf::Raft,
            &keys::state_key(self.group, StateKind::Hard),
            &self.hard_state.encode_to_vec(),
        );
    }

    fn write_apply(&self, batch: &mut WriteBatch) {
        batch.put(
            Cf::Raft,
            &keys::state_key(self.group, StateKind::Apply),
            &self.apply_state.encode_to_vec(),
        );
    }

    fn read_term_from_disk(&self, index: u64) -> Result<u64> {
        let key = keys::log_key(self.group, index);
        match self.engine.db().get_cf(self.engine.cf(Cf::Raft), key)? {
            Some(v) => Entry::decode(&v[..])
                .map(|e| e.term)
                .map_err(|e| StoreError::corrupt("log entry", &key, e)),
            None => Err(StoreError::corrupt(
                "log entry",
                &key,
                "missing inside the log",
            )),
        }
    }

    /// The term of entry `index`, from the cache or the disk.
    pub fn term_of(&self, index: u64) -> Result<u64> {
        if index == self.apply_state.truncated_index {
            return Ok(self.apply_state.truncated_term);
        }
        if index < self.apply_state.truncated_index {
            return Err(StoreError::Compacted {
                group: self.group,
                first_index: self.first_index_value(),
            });
        }
        if index > self.last_index {
            return Err(StoreError::Unavailable {
                group: self.group,
                index,
                last_index: self.last_index,
            });
        }
        if index == self.last_index {
            return Ok(self.last_term);
        }
        if let Some(front) = self.cache.front() {
            if index >= front.index {
                return Ok(self.cache[(index - front.index) as usize].term);
            }
        }
        self.read_term_from_disk(index)
    }

    fn entries_inner(&self, low: u64, high: u64, max_size: Option<u64>) -> Result<Vec<Entry>> {
        if low <= self.apply_state.truncated_index {
            return Err(StoreError::Compacted {
                group: self.group,
                first_index: self.first_index_value(),
            });
        }
        if high > self.last_index + 1 {
            return Err(StoreError::Unavailable {
                group: self.group,
                index: high - 1,
                last_index: self.last_index,
            });
        }
        let max = max_size.unwrap_or(u64::MAX);
        let mut out = Vec::new();
        if low >= high {
            return Ok(out);
        }
        let cache_start = self.cache.front().map_or(u64::MAX, |e| e.index);
        if low < cache_start {
            let disk_high = high.min(cache_start);
            let limited = self
                .engine
                .read_entries(self.group, low, disk_high, max, &mut out)?;
            if (out.len() as u64) < disk_high - low {
                if !limited {
                    // The log ran out inside an interval it claims to hold.
                    return Err(StoreError::corrupt(
                        "log entry",
                        &keys::log_key(self.group, low + out.len() as u64),
                        "missing inside the log",
                    ));
                }
                return Ok(out);
            }
        }
        let mut size: u64 = out.iter().map(|e| e.encoded_len() as u64).sum();
        let from = low.max(cache_start);
        if from < high {
            let offset = (from - cache_start) as usize;
            for e in self.cache.range(offset..offset + (high - from) as usize) {
                size += e.encoded_len() as u64;
                if !out.is_empty() && size > max {
                    break;
                }
                out.push(e.clone());
            }
        }
        Ok(out)
    }
}

impl raft::Storage for GroupStorage {
    fn initial_state(&self) -> raft::Result<RaftState> {
        Ok(RaftState::new(
            self.hard_state.clone(),
            self.conf_state.clone(),
        ))
    }

    fn entries(
        &self,
        low: u64,
        high: u64,
        max_size: impl Into<Option<u64>>,
        _context: GetEntriesContext,
    ) -> raft::Result<Vec<Entry>> {
        Ok(self.entries_inner(low, high, max_size.into())?)
    }

    fn term(&self, idx: u64) -> raft::Result<u64> {
        Ok(self.term_of(idx)?)
    }

    fn first_index(&self) -> raft::Result<u64> {
        Ok(self.first_index_value())
    }

    fn last_index(&self) -> raft::Result<u64> {
        Ok(self.last_index)
    }

    fn snapshot(&self, request_index: u64, _to: u64) -> raft::Result<Snapshot> {
        if self.apply_state.applied_index < request_index {
            // The follower asked for a snapshot newer than what we have applied: raft asks
            // again later, by which time the apply will have caught up.
            return Err(raft::Error::Store(
                StorageError::SnapshotTemporarilyUnavailable,
            ));
        }
        Ok(self.build_snapshot(snapshot::DEFAULT_CHUNK_BYTES)?)
    }
}
