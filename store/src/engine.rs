//! The one RocksDB engine a node's groups share, and the write batch that lets a worker commit
//! the log writes of many groups with one fsync (group commit).

use std::path::{Path, PathBuf};
use std::sync::Arc;

use flotilla_proto::meta::{ApplyState, RangeDescriptor, StoreIdent};
use flotilla_proto::{Message as _, NodeId, RangeId};
use prost_raft::Message as _;
use raft::prelude::{ConfState, Entry, HardState};
use rocksdb::{
    ColumnFamily, ColumnFamilyDescriptor, Direction, IteratorMode, Options, ReadOptions,
};

use crate::error::{Result, StoreError};
use crate::keys::{self, StateKind, CF_DATA, CF_META, CF_RAFT};

/// Engine settings. Every field has a default that suits a node hosting many groups.
#[derive(Debug, Clone)]
pub struct StoreConfig {
    /// Entries of the log tail each group keeps in memory so that raft's reads of recent
    /// entries do not hit RocksDB. Default 32. Zero disables the cache.
    pub log_cache_entries: usize,
    /// RocksDB block cache shared by all column families, in bytes. Default 64 MiB.
    pub block_cache_bytes: usize,
    /// Memtable size of each column family, in bytes. Default 8 MiB: every write inserts
    /// into a memtable skip list (a log entry, a retry record, the data), and a smaller one
    /// stays in the CPU caches; on the 2-core comparison with etcd 8 MiB cost ~5% less CPU
    /// per write than 32 MiB, flushes included (docs/BENCHMARKS.md, issue 11).
    pub write_buffer_bytes: usize,
    /// RocksDB background flush/compaction threads. Default 2.
    pub background_jobs: i32,
    /// fsync every [`Engine::write`] that asks for it. Default true. Turning it off loses the
    /// durability guarantee (an acknowledged write may be lost on power failure); it exists
    /// for benchmarks that want to isolate CPU cost, never for production.
    pub sync: bool,
    /// Keep writes that did not ask for a sync in the process's memory (RocksDB's manual WAL
    /// flush) until the next synced write, instead of handing each to the OS at once.
    /// Default false. Such writes are then lost if the process dies, which the log's design
    /// allows (only the apply batch is written unsynced, and it is re-derived from the synced
    /// log): the deterministic simulator turns this on so that a crash loses exactly what was
    /// not synced (see [`Engine::stop_background_work`]). With `sync` off, a write that asks
    /// for a sync is still handed to the OS (no fsync), so only a process crash is modelled.
    pub buffer_unsynced_writes: bool,
}

impl Default for StoreConfig {
    fn default() -> Self {
        StoreConfig {
            log_cache_entries: 32,
            block_cache_bytes: 64 << 20,
            write_buffer_bytes: 8 << 20,
            background_jobs: 2,
            sync: true,
            buffer_unsynced_writes: false,
        }
    }
}

impl StoreConfig {
    /// Checks every field; returns the first mistake.
    pub fn validate(&self) -> Result<()> {
        match self.mistakes().into_iter().next() {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }

    /// Every mistake, in field order (what a config file's reader reports, one line each).
    pub fn mistakes(&self) -> Vec<StoreError> {
        let mut out = Vec::new();
        if self.block_cache_bytes < 1 << 20 {
            out.push(StoreError::InvalidConfig(
                "block_cache_bytes must be at least 1 MiB",
            ));
        }
        if self.write_buffer_bytes < 1 << 20 {
            out.push(StoreError::InvalidConfig(
                "write_buffer_bytes must be at least 1 MiB",
            ));
        }
        if self.background_jobs < 1 {
            out.push(StoreError::InvalidConfig(
                "background_jobs must be at least 1",
            ));
        }
        if self.log_cache_entries > 1 << 20 {
            out.push(StoreError::InvalidConfig(
                "log_cache_entries must be at most 1048576",
            ));
        }
        out
    }
}

/// The node's RocksDB: raft logs and state of every group, range data, range descriptors.
pub struct Engine {
    db: rocksdb::DB,
    path: PathBuf,
    config: StoreConfig,
}

impl std::fmt::Debug for Engine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Engine").field("path", &self.path).finish()
    }
}

/// What [`Engine::data_size`] measured of a key interval.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DataSize {
    /// Keys (a lower bound unless `exact`).
    pub keys: u64,
    /// Bytes of keys plus values (an estimate unless `exact`).
    pub bytes: u64,
    /// Whether the interval was walked whole.
    pub exact: bool,
}

/// Which column family an operation addresses.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Cf {
    Raft,
    Data,
    Meta,
}

/// Everything recovered about one group when the engine is opened.
#[derive(Debug, Clone)]
pub struct RecoveredGroup {
    /// The group (= range) id.
    pub group: RangeId,
    /// raft's term, vote and commit.
    pub hard_state: HardState,
    /// Membership as of the applied index.
    pub conf_state: ConfState,
    /// Applied and truncated index/term.
    pub apply_state: ApplyState,
    /// The range descriptor, if one was written (a replica created by a message has none
    /// until its first snapshot).
    pub descriptor: Option<RangeDescriptor>,
    /// The last index in the log (or the truncated index if the log is empty).
    pub last_index: u64,
}

impl Engine {
    /// Opens (creating if missing) the engine at `path`.
    pub fn open(path: impl AsRef<Path>, config: StoreConfig) -> Result<Arc<Engine>> {
        config.validate()?;
        let path = path.as_ref().to_path_buf();
        let cache = rocksdb::Cache::new_lru_cache(config.block_cache_bytes);
        let mut block = rocksdb::BlockBasedOptions::default();
        block.set_block_cache(&cache);
        block.set_bloom_filter(10.0, false);

        let cf_opts = |name: &str| {
            let mut o = Options::default();
            o.set_block_based_table_factory(&block);
            o.set_write_buffer_size(config.write_buffer_bytes);
            if name == CF_RAFT {
                // Log entries are short-lived (compacted soon after apply): fewer, larger
                // memtables let most of them die before they are ever flushed.
                o.set_max_write_buffer_number(4);
            }
            ColumnFamilyDescriptor::new(name, o)
        };
        let mut db_opts = Options::default();
        db_opts.create_if_missing(true);
        db_opts.create_missing_column_families(true);
        db_opts.set_max_background_jobs(config.background_jobs);
        db_opts.set_atomic_flush(true);
        db_opts.set_manual_wal_flush(config.buffer_unsynced_writes);
        let cfs = [CF_RAFT, CF_DATA, CF_META].map(cf_opts);
        let db = rocksdb::DB::open_cf_descriptors(&db_opts, &path, cfs)?;
        Ok(Arc::new(Engine { db, path, config }))
    }

    /// The directory the engine lives in.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Stops RocksDB's flushes and compactions, waiting for running ones, so that the files
    /// stay as they are while a test copies them: the copy is what a crash of the process
    /// would leave on disk (without [`StoreConfig::buffer_unsynced_writes`]' buffer). Nothing
    /// may be written to the engine afterwards; drop it.
    pub fn stop_background_work(&self) {
        self.db.cancel_all_background_work(true);
    }

    /// Writes out and fsyncs everything written so far, unsynced writes included (the apply
    /// batches): what a node does as it stops, so that a restart replays nothing it already
    /// applied. Not needed for safety (the synced raft log holds every acknowledged write).
    pub fn sync_wal(&self) -> Result<()> {
        self.db.flush_wal(true)?;
        Ok(())
    }

    /// RocksDB's latest sequence number: it moves with every write, so an unchanged answer
    /// means nothing was written meanwhile.
    pub fn write_sequence(&self) -> u64 {
        self.db.latest_sequence_number()
    }

    /// Writes every column family's memtables out to table files, all three as one atomic
    /// flush, so that the write-ahead log they cover becomes obsolete and the next open
    /// replays none of it (a node that fell idle does this: at 100,000 groups per node the
    /// replay of the bootstrap's writes took 0.75–1.2 s of every start). With `wait` false the
    /// flush is only scheduled on RocksDB's background threads.
    pub fn flush_memtables(&self, wait: bool) -> Result<()> {
        let mut opts = rocksdb::FlushOptions::default();
        opts.set_wait(wait);
        let cfs = [Cf::Raft, Cf::Data, Cf::Meta].map(|cf| self.cf(cf));
        self.db.flush_cfs_opt(&cfs, &opts)?;
        Ok(())
    }

    /// Entries in the memtables of every column family (the mutable and the immutable ones):
    /// what a restart would replay from the write-ahead log.
    pub fn memtable_entries(&self) -> u64 {
        [Cf::Raft, Cf::Data, Cf::Meta]
            .iter()
            .map(|&cf| {
                let cf = self.cf(cf);
                [
                    "rocksdb.num-entries-active-mem-table",
                    "rocksdb.num-entries-imm-mem-tables",
                ]
                .iter()
                .filter_map(|p| self.db.property_int_value_cf(cf, *p).ok().flatten())
                .sum::<u64>()
            })
            .sum()
    }

    /// The size of the user data of `[start, end)` (an empty `end` is the end of the key
    /// space): keys and bytes of keys plus values, counted exactly by walking the interval
    /// (no copy) while it holds at most `max_keys` keys. Past that the walk stops and the
    /// answer is approximate: `keys` is then a lower bound and `bytes` RocksDB's estimate of
    /// the interval's share of the data files (compressed size; memtables not included).
    pub fn data_size(&self, start: &[u8], end: &[u8], max_keys: u64) -> Result<DataSize> {
        let mut opts = ReadOptions::default();
        if !end.is_empty() {
            opts.set_iterate_upper_bound(end.to_vec());
        }
        let mut it = self.db.raw_iterator_cf_opt(self.cf(Cf::Data), opts);
        it.seek(start);
        let (mut keys, mut bytes) = (0u64, 0u64);
        while it.valid() {
            if keys == max_keys {
                let upper = if end.is_empty() {
                    vec![0xff; 64]
                } else {
                    end.to_vec()
                };
                let range = rocksdb::Range::new(start, &upper);
                let estimate = self
                    .db
                    .get_approximate_sizes_cf(self.cf(Cf::Data), &[range])
                    .first()
                    .copied()
                    .unwrap_or(0);
                return Ok(DataSize {
                    keys,
                    bytes: estimate.max(bytes),
                    exact: false,
                });
            }
            keys += 1;
            bytes += (it.key().map_or(0, <[u8]>::len) + it.value().map_or(0, <[u8]>::len)) as u64;
            it.next();
        }
        it.status()?;
        Ok(DataSize {
            keys,
            bytes,
            exact: true,
        })
    }

    /// The configuration it was opened with.
    pub fn config(&self) -> &StoreConfig {
        &self.config
    }

    pub(crate) fn cf(&self, cf: Cf) -> &ColumnFamily {
        let name = match cf {
            Cf::Raft => CF_RAFT,
            Cf::Data => CF_DATA,
            Cf::Meta => CF_META,
        };
        // Opening created all three; a missing handle would be a bug in `open`.
        self.db
            .cf_handle(name)
            .expect("column family opened in Engine::open")
    }

    pub(crate) fn db(&self) -> &rocksdb::DB {
        &self.db
    }

    /// A new, empty write batch on this engine.
    pub fn batch(self: &Arc<Self>) -> WriteBatch {
        WriteBatch {
            engine: self.clone(),
            wb: rocksdb::WriteBatch::default(),
        }
    }

    /// Writes `batch` atomically; with `sync` it is on disk (fsync of the WAL) when this
    /// returns. One call for the writes of many groups is the group commit.
    pub fn write(&self, batch: WriteBatch, sync: bool) -> Result<()> {
        if batch.wb.is_empty() {
            return Ok(());
        }
        let mut opts = rocksdb::WriteOptions::default();
        opts.set_sync(sync && self.config.sync);
        self.db.write_opt(batch.wb, &opts)?;
        if sync && !self.config.sync && self.config.buffer_unsynced_writes {
            // No fsync, but the write (and every buffered one before it) leaves the process:
            // a crash of the process, not of the machine, keeps it.
            self.db.flush_wal(false)?;
        }
        Ok(())
    }

    /// Which node this engine belongs to, if it was ever bound to one.
    pub fn store_ident(&self) -> Result<Option<StoreIdent>> {
        match self.db.get_cf(self.cf(Cf::Meta), keys::STORE_IDENT_KEY)? {
            None => Ok(None),
            Some(v) => StoreIdent::decode(&v[..])
                .map(Some)
                .map_err(|e| StoreError::corrupt("store ident", keys::STORE_IDENT_KEY, e)),
        }
    }

    /// Binds the engine to `node` on first use; refuses a data directory of another node.
    pub fn bind_node(&self, node: NodeId, cluster_id: u64) -> Result<()> {
        if let Some(ident) = self.store_ident()? {
            if ident.node_id != node.0 {
                return Err(StoreError::WrongNode {
                    expected: node.0,
                    found: ident.node_id,
                });
            }
            return Ok(());
        }
        let ident = StoreIdent {
            node_id: node.0,
            cluster_id,
        };
        let mut opts = rocksdb::WriteOptions::default();
        opts.set_sync(self.config.sync);
        let mut wb = rocksdb::WriteBatch::default();
        wb.put_cf(
            self.cf(Cf::Meta),
            keys::STORE_IDENT_KEY,
            ident.encode_to_vec(),
        );
        self.db.write_opt(wb, &opts)?;
        Ok(())
    }

    /// Counts this start of the node on the engine and returns it (1 for the first): a synced
    /// counter, so that what a node hands out per life (request tokens that travel inside
    /// raft entries) never repeats what an earlier life handed out, even for entries that
    /// life proposed and that apply only after the restart.
    pub fn next_start(&self) -> Result<u64> {
        let cf = self.cf(Cf::Meta);
        let previous = match self.db.get_cf(cf, keys::START_COUNT_KEY)? {
            None => 0,
            Some(v) => u64::from_be_bytes(v.as_slice().try_into().map_err(|_| {
                StoreError::corrupt("start count", keys::START_COUNT_KEY, "not 8 bytes")
            })?),
        };
        let start = previous + 1;
        let mut opts = rocksdb::WriteOptions::default();
        opts.set_sync(self.config.sync);
        let mut wb = rocksdb::WriteBatch::default();
        wb.put_cf(cf, keys::START_COUNT_KEY, start.to_be_bytes());
        self.db.write_opt(wb, &opts)?;
        if !self.config.sync && self.config.buffer_unsynced_writes {
            self.db.flush_wal(false)?;
        }
        Ok(start)
    }

    /// Reads the descriptor of `range`.
    pub fn descriptor(&self, range: RangeId) -> Result<Option<RangeDescriptor>> {
        let key = keys::descriptor_key(range);
        match self.db.get_cf(self.cf(Cf::Meta), key)? {
            None => Ok(None),
            Some(v) => RangeDescriptor::decode(&v[..])
                .map(Some)
                .map_err(|e| StoreError::corrupt("range descriptor", &key, e)),
        }
    }

    /// Every range descriptor stored on this node, in range id order.
    pub fn descriptors(&self) -> Result<Vec<RangeDescriptor>> {
        let (lo, hi) = keys::descriptor_bounds();
        let mut opts = ReadOptions::default();
        opts.set_iterate_upper_bound(hi.to_vec());
        let iter = self.db.iterator_cf_opt(
            self.cf(Cf::Meta),
            opts,
            IteratorMode::From(&lo, Direction::Forward),
        );
        let mut out = Vec::new();
        for item in iter {
            let (k, v) = item?;
            let d = RangeDescriptor::decode(&v[..])
                .map_err(|e| StoreError::corrupt("range descriptor", &k, e))?;
            out.push(d);
        }
        Ok(out)
    }

    /// Reads one record of the system range (see `keys::system_key`).
    pub fn system_record(&self, name: &[u8]) -> Result<Option<Vec<u8>>> {
        Ok(self.db.get_cf(self.cf(Cf::Meta), keys::system_key(name))?)
    }

    /// Every record of the system range stored here, as `(name, value)` in name order.
    pub fn system_records(&self) -> Result<Vec<(Vec<u8>, Vec<u8>)>> {
        let (lo, hi) = keys::system_bounds();
        let mut opts = ReadOptions::default();
        opts.set_iterate_upper_bound(hi.to_vec());
        let iter = self.db.iterator_cf_opt(
            self.cf(Cf::Meta),
            opts,
            IteratorMode::From(&lo, Direction::Forward),
        );
        let mut out = Vec::new();
        for item in iter {
            let (k, v) = item?;
            if let Some(name) = keys::parse_system_key(&k) {
                out.push((name.to_vec(), v.to_vec()));
            }
        }
        Ok(out)
    }

    /// Reads one user key.
    pub fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>> {
        Ok(self.db.get_cf(self.cf(Cf::Data), key)?)
    }

    /// User keys in `[start, end)` (empty `end`: unbounded), at most `limit` of them.
    pub fn scan(&self, start: &[u8], end: &[u8], limit: usize) -> Result<Vec<(Vec<u8>, Vec<u8>)>> {
        let mut opts = ReadOptions::default();
        if !end.is_empty() {
            opts.set_iterate_upper_bound(end.to_vec());
        }
        let iter = self.db.iterator_cf_opt(
            self.cf(Cf::Data),
            opts,
            IteratorMode::From(start, Direction::Forward),
        );
        let mut out = Vec::new();
        for item in iter.take(limit) {
            let (k, v) = item?;
            out.push((k.to_vec(), v.to_vec()));
        }
        Ok(out)
    }

    /// Reads a per-group client record (retry de-duplication).
    pub fn client_record(&self, group: RangeId, client: u64) -> Result<Option<Vec<u8>>> {
        Ok(self
            .db
            .get_cf(self.cf(Cf::Raft), keys::client_key(group, client))?)
    }

    /// Every client record of `group`, as `(client_id, encoded record)`.
    pub fn client_records(&self, group: RangeId) -> Result<Vec<(u64, Vec<u8>)>> {
        let (lo, hi) = keys::client_bounds(group);
        let mut opts = ReadOptions::default();
        opts.set_iterate_upper_bound(hi);
        let iter = self.db.iterator_cf_opt(
            self.cf(Cf::Raft),
            opts,
            IteratorMode::From(&lo, Direction::Forward),
        );
        let mut out = Vec::new();
        for item in iter {
            let (k, v) = item?;
            let client = k
                .get(9..17)
                .and_then(|b| <[u8; 8]>::try_from(b).ok())
                .map(u64::from_be_bytes)
                .ok_or_else(|| StoreError::corrupt("client record key", &k, "bad length"))?;
            out.push((client, v.to_vec()));
        }
        Ok(out)
    }

    /// Lists every group with raft state in this engine and what it needs to restart.
    pub fn recover(&self) -> Result<Vec<RecoveredGroup>> {
        let mut groups: Vec<RecoveredGroup> = Vec::new();
        let mut opts = ReadOptions::default();
        opts.set_iterate_upper_bound(keys::state_end_key().to_vec());
        let iter = self.db.iterator_cf_opt(
            self.cf(Cf::Raft),
            opts,
            IteratorMode::From(&keys::state_start_key(), Direction::Forward),
        );
        for item in iter {
            let (k, v) = item?;
            let Some((group, kind)) = keys::parse_state_key(&k) else {
                return Err(StoreError::corrupt("state key", &k, "unknown layout"));
            };
            if groups.last().map(|g| g.group) != Some(group) {
                groups.push(RecoveredGroup {
                    group,
                    hard_state: HardState::default(),
                    conf_state: ConfState::default(),
                    apply_state: ApplyState::default(),
                    descriptor: None,
                    last_index: 0,
                });
            }
            let g = groups.last_mut().expect("pushed above");
            match kind {
                StateKind::Hard => {
                    g.hard_state = HardState::decode(&v[..])
                        .map_err(|e| StoreError::corrupt("hard state", &k, e))?
                }
                StateKind::Conf => {
                    g.conf_state = ConfState::decode(&v[..])
                        .map_err(|e| StoreError::corrupt("conf state", &k, e))?
                }
                StateKind::Apply => {
                    g.apply_state = ApplyState::decode(&v[..])
                        .map_err(|e| StoreError::corrupt("apply state", &k, e))?
                }
            }
        }
        // One scan of the descriptors rather than a point read per group: this runs at
        // start-up for every group of the node.
        let mut descriptors: std::collections::HashMap<u64, RangeDescriptor> = self
            .descriptors()?
            .into_iter()
            .map(|d| (d.range_id, d))
            .collect();
        // One iterator for every group's last log index, not one per group: creating a
        // RocksDB iterator costs more than its seek (100,000 of each at a restart).
        let mut it = self.db.raw_iterator_cf(self.cf(Cf::Raft));
        for g in &mut groups {
            g.descriptor = descriptors.remove(&g.group.0);
            it.seek_for_prev(keys::log_key(g.group, u64::MAX));
            let last = if it.valid() {
                it.key()
                    .and_then(keys::parse_log_key)
                    .filter(|&(group, _)| group == g.group)
                    .map(|(_, index)| index)
            } else {
                it.status()?;
                None
            };
            g.last_index = last
                .unwrap_or(g.apply_state.truncated_index)
                .max(g.apply_state.truncated_index);
        }
        Ok(groups)
    }

    /// Whether the engine holds the raft state of any group: what [`Engine::recover`] would
    /// return something for, found with one seek instead of reading every group (a node
    /// deciding at start whether it is new must not read 100,000 groups twice).
    pub fn holds_groups(&self) -> Result<bool> {
        let mut opts = ReadOptions::default();
        opts.set_iterate_upper_bound(keys::state_end_key().to_vec());
        let mut iter = self.db.iterator_cf_opt(
            self.cf(Cf::Raft),
            opts,
            IteratorMode::From(&keys::state_start_key(), Direction::Forward),
        );
        Ok(iter.next().transpose()?.is_some())
    }

    /// Reads log entries `[low, high)` of `group` from disk, stopping after `max_bytes`
    /// (at least one entry is returned if any exists). Returns whether the size limit stopped
    /// the read (as opposed to the log running out).
    pub(crate) fn read_entries(
        &self,
        group: RangeId,
        low: u64,
        high: u64,
        max_bytes: u64,
        out: &mut Vec<Entry>,
    ) -> Result<bool> {
        let mut opts = ReadOptions::default();
        opts.set_iterate_upper_bound(keys::log_key(group, high).to_vec());
        let start = keys::log_key(group, low);
        let iter = self.db.iterator_cf_opt(
            self.cf(Cf::Raft),
            opts,
            IteratorMode::From(&start, Direction::Forward),
        );
        let mut size = 0u64;
        for (expect, item) in (low..).zip(iter) {
            let (k, v) = item?;
            let e = Entry::decode(&v[..]).map_err(|e| StoreError::corrupt("log entry", &k, e))?;
            if e.index != expect {
                return Err(StoreError::corrupt(
                    "log entry",
                    &k,
                    format!("expected index {expect}, found {}", e.index),
                ));
            }
            size += v.len() as u64;
            if !out.is_empty() && size > max_bytes {
                return Ok(true);
            }
            out.push(e);
            if size >= max_bytes {
                return Ok(true);
            }
        }
        Ok(false)
    }
}

/// Writes for any number of groups (log entries, raft state, apply state, user data,
/// descriptors) that become durable together with one [`Engine::write`].
pub struct WriteBatch {
    engine: Arc<Engine>,
    wb: rocksdb::WriteBatch,
}

impl std::fmt::Debug for WriteBatch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WriteBatch")
            .field("ops", &self.wb.len())
            .field("bytes", &self.wb.size_in_bytes())
            .finish()
    }
}

impl WriteBatch {
    /// Number of operations in the batch.
    pub fn len(&self) -> usize {
        self.wb.len()
    }

    /// True if nothing was added.
    pub fn is_empty(&self) -> bool {
        self.wb.is_empty()
    }

    /// Encoded size of the batch in bytes.
    pub fn size_in_bytes(&self) -> usize {
        self.wb.size_in_bytes()
    }

    pub(crate) fn put(&mut self, cf: Cf, key: &[u8], value: &[u8]) {
        self.wb.put_cf(self.engine.cf(cf), key, value);
    }

    pub(crate) fn delete(&mut self, cf: Cf, key: &[u8]) {
        self.wb.delete_cf(self.engine.cf(cf), key);
    }

    pub(crate) fn delete_range(&mut self, cf: Cf, from: &[u8], to: &[u8]) {
        self.wb.delete_range_cf(self.engine.cf(cf), from, to);
    }

    /// Puts a user key (the state machine's write).
    pub fn put_data(&mut self, key: &[u8], value: &[u8]) {
        self.put(Cf::Data, key, value);
    }

    /// Deletes a user key.
    pub fn delete_data(&mut self, key: &[u8]) {
        self.delete(Cf::Data, key);
    }

    /// Writes a record of the system range (its apply, its bootstrap).
    pub fn put_system_record(&mut self, name: &[u8], value: &[u8]) {
        self.put(Cf::Meta, &keys::system_key(name), value);
    }

    /// Deletes every record of the system range (before a snapshot of it is installed).
    pub fn clear_system_records(&mut self) {
        let (lo, hi) = keys::system_bounds();
        self.delete_range(Cf::Meta, &lo, &hi);
    }

    /// Stores a range descriptor (replacing the previous one of that range).
    pub fn put_descriptor(&mut self, desc: &RangeDescriptor) {
        self.put(
            Cf::Meta,
            &keys::descriptor_key(desc.id()),
            &desc.encode_to_vec(),
        );
    }

    /// Stores the last applied request of `client` in `group` (retry de-duplication).
    pub fn put_client_record(&mut self, group: RangeId, client: u64, record: &[u8]) {
        self.put(Cf::Raft, &keys::client_key(group, client), record);
    }

    /// Replaces every client record of `group` with `records` (snapshot install, split).
    pub fn replace_client_records(&mut self, group: RangeId, records: &[(u64, Vec<u8>)]) {
        let (lo, hi) = keys::client_bounds(group);
        self.delete_range(Cf::Raft, &lo, &hi);
        for (client, record) in records {
            self.put_client_record(group, *client, record);
        }
    }

    /// Removes everything raft knows about `group` on this node: log, state, client records.
    /// The descriptor is kept (the caller rewrites it as a tombstone) and user data is not
    /// touched (it belongs to whichever range now owns those keys).
    pub fn destroy_group_state(&mut self, group: RangeId) {
        // `log_bounds`, not `group + 1`: the system range's id is `u64::MAX`, and a wrapped
        // end before the start fails the whole batch (with every write of its round).
        let (lo, hi) = keys::log_bounds(group);
        self.delete_range(Cf::Raft, &lo, &hi);
        for kind in [StateKind::Hard, StateKind::Conf, StateKind::Apply] {
            self.delete(Cf::Raft, &keys::state_key(group, kind));
        }
        let (lo, hi) = keys::client_bounds(group);
        self.delete_range(Cf::Raft, &lo, &hi);
    }

    /// Deletes all user data in `[start, end)` (empty `end`: unbounded).
    pub fn clear_data_range(&mut self, start: &[u8], end: &[u8]) -> Result<()> {
        let end_bound = if end.is_empty() {
            // delete_range needs a finite end: use one past the last key, if any is in range.
            let engine = self.engine.clone();
            let mut it = engine.db().raw_iterator_cf(engine.cf(Cf::Data));
            it.seek_to_last();
            it.status()?;
            match it.key() {
                Some(k) if k >= start => {
                    let mut e = k.to_vec();
                    e.push(0);
                    Some(e)
                }
                _ => None,
            }
        } else {
            Some(end.to_vec())
        };
        if let Some(e) = end_bound {
            if start < e.as_slice() {
                self.delete_range(Cf::Data, start, &e);
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What a crash leaves of an engine: its files as they are on disk now.
    fn crash_copy(engine: &Engine, to: &Path) {
        engine.stop_background_work();
        std::fs::create_dir_all(to).unwrap();
        for f in std::fs::read_dir(engine.path()).unwrap() {
            let f = f.unwrap();
            if f.file_name() != "LOCK" {
                std::fs::copy(f.path(), to.join(f.file_name())).unwrap();
            }
        }
    }

    /// The simulator's crash model rests on this: with `buffer_unsynced_writes`, a crash loses
    /// the writes after the last synced one, and only those (a synced write carries every
    /// write before it, as a log does).
    #[test]
    fn a_crash_loses_exactly_the_writes_after_the_last_sync() {
        // With fsync, and without (the simulator's setting: a process crash only).
        for sync in [true, false] {
            crash_after_writes(StoreConfig {
                block_cache_bytes: 1 << 20,
                write_buffer_bytes: 1 << 20,
                buffer_unsynced_writes: true,
                sync,
                ..StoreConfig::default()
            });
        }
    }

    fn crash_after_writes(config: StoreConfig) {
        let dir = tempfile::tempdir().unwrap();
        let engine = Engine::open(dir.path().join("live"), config.clone()).unwrap();
        let put = |key: &str, sync: bool| {
            let mut b = engine.batch();
            b.put_data(key.as_bytes(), b"v");
            engine.write(b, sync).unwrap();
        };
        put("a-unsynced", false);
        put("b-synced", true);
        put("c-unsynced", false);
        // Readers of the live engine see everything.
        assert!(engine.get(b"c-unsynced").unwrap().is_some());
        crash_copy(&engine, &dir.path().join("crashed"));
        drop(engine);
        let after = Engine::open(dir.path().join("crashed"), config).unwrap();
        assert!(after.get(b"a-unsynced").unwrap().is_some());
        assert!(after.get(b"b-synced").unwrap().is_some());
        assert!(after.get(b"c-unsynced").unwrap().is_none());
    }
}
