//! The restore: a new cluster started from a backup.
//!
//! Phases: (1) verify the backup whole (manifest, checksums, tiling: `format::verify`,
//! done by the caller before anything touches a cluster); (2) refuse a target that holds a
//! key, unless `--force`; (3) cut the target's ranges at the backup's boundaries: merge away
//! each boundary the backup does not have (right to left, each range into its left
//! neighbour), then split at each one it lacks, bisecting (the middle boundary of a range
//! first, then each half's, several ranges at a time); (4) load each range's pairs through
//! the KV API with the client library: multi-puts of up to `--batch-keys` pairs and
//! `--batch-bytes` bytes, `--parallel` of them in flight, each with its own request id and
//! retried with it (so a retry is applied at most once, and loading the same backup again
//! writes the same values); (5) check the target's boundaries against the backup's.
//!
//! Why through the KV API and not by ingesting files on the nodes: the writes are replicated
//! and acknowledged like any other (fsynced on a quorum, retry records, splits and leader
//! changes during the load handled by the client's retry loop), the target needs no new
//! code path that writes data outside the log, and with batching the load runs at the
//! cluster's write throughput (docs/BENCHMARKS.md). An ingest path would be faster for very
//! large backups; it would also have to make every replica's copy identical without the log.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _, Result};
use flotilla_client::{Bytes, Client, ClientConfig};
use flotilla_proto::admin::{split_request, MergeRequest, RangeInfo, SplitRequest};
use futures_util::stream::{FuturesUnordered, StreamExt as _};

use super::format::{check_tiling, DataReader, Manifest, ReadError};
use super::{on_leader, rate, Progress};
use crate::cluster::{describe, Cluster, Dial, Range};
use crate::output::{show_bytes, show_size};

/// How long one split or merge may wait for its range to have a leader.
const PATIENCE: Duration = Duration::from_secs(30);
/// Rounds of shaping (read the table, merge, split) before giving up.
const SHAPE_ROUNDS: usize = 10;
/// A multi-put's deadline, retries included.
const WRITE_TIMEOUT: Duration = Duration::from_secs(60);
/// Most bytes of multi-puts in one frame of the client's stream to a node (which decodes
/// frames of up to 4 MiB): the client's `max_batch` is this over `--batch-bytes`.
const FRAME_BYTES: usize = 2 << 20;

/// `flotilla-ctl restore`'s settings.
#[derive(Debug, Clone)]
pub struct Options {
    /// Write into a target that holds keys.
    pub force: bool,
    /// Multi-puts in flight.
    pub parallel: usize,
    /// Most pairs per multi-put.
    pub batch_keys: usize,
    /// Most bytes of keys and values per multi-put.
    pub batch_bytes: usize,
}

/// Why a restore refused to start or could not finish.
#[derive(Debug, thiserror::Error)]
pub enum RestoreError {
    /// The target holds keys and `--force` was not given.
    #[error(
        "the target cluster already holds data (key {key:?}): restore into a fresh cluster, or \
         pass --force to write the backup over it"
    )]
    TargetNotEmpty {
        /// The first key found.
        key: String,
    },
    /// The target's ranges could not be cut at the backup's boundaries.
    #[error("cannot give the target the backup's range boundaries: {0}")]
    Shape(String),
}

/// Restores the verified backup `manifest` of `dir` into the cluster: see the module doc.
///
/// # Errors
///
/// [`RestoreError`], the backup's errors while reading it, the cluster's.
pub async fn restore(
    dial: &Dial,
    cluster: &Cluster,
    dir: &Path,
    manifest: &Manifest,
    opts: &Options,
) -> Result<Phases> {
    let client = Client::connect(ClientConfig {
        timeout: WRITE_TIMEOUT,
        tls: dial.tls.clone(),
        max_batch: (FRAME_BYTES / opts.batch_bytes.max(1)).max(1),
        ..ClientConfig::new(dial.endpoints.iter().cloned())
    })
    .await
    .context("connecting the client library")?;
    if !opts.force {
        if let Some(key) = first_key(&client).await? {
            return Err(RestoreError::TargetNotEmpty {
                key: show_bytes(&key),
            }
            .into());
        }
    }
    let wanted: BTreeSet<Vec<u8>> = manifest
        .ranges
        .iter()
        .map(|r| r.start_key.clone())
        .filter(|k| !k.is_empty())
        .collect();
    let started = Instant::now();
    shape(cluster, &wanted, opts.parallel.min(16)).await?;
    let shaped = Instant::now();
    client
        .load_ranges()
        .await
        .context("reading the range table")?;
    load(&client, dir, manifest, opts).await?;
    let phases = Phases {
        shape_secs: (shaped - started).as_secs_f64(),
        load_secs: shaped.elapsed().as_secs_f64(),
    };
    let now = starts(&settled_table(cluster).await?);
    if now != wanted {
        let extra = now.difference(&wanted).count();
        let missing = wanted.difference(&now).count();
        eprintln!(
            "warning: the target's ranges changed while loading ({extra} boundaries more, \
             {missing} fewer than the backup's: its split checker or scheduler at work)"
        );
    }
    Ok(phases)
}

/// How long the restore's phases on the cluster took.
#[derive(Debug, Clone, Copy)]
pub struct Phases {
    /// Cutting the target's ranges at the backup's boundaries.
    pub shape_secs: f64,
    /// Loading the pairs.
    pub load_secs: f64,
}

/// The first key of the target, if it holds any.
async fn first_key(client: &Client) -> Result<Option<Bytes>> {
    let mut continuation = None;
    loop {
        let page = client
            .scan(Bytes::new(), Bytes::new(), 1, continuation)
            .await
            .context("reading the target's first key")?;
        if let Some((k, _)) = page.pairs.into_iter().next() {
            return Ok(Some(k));
        }
        match page.continuation {
            None => return Ok(None),
            c => continuation = c,
        }
    }
}

/// The start keys of a table's ranges, but the first.
fn starts(table: &[Range]) -> BTreeSet<Vec<u8>> {
    table
        .iter()
        .map(|r| r.info.start_key.to_vec())
        .filter(|k| !k.is_empty())
        .collect()
}

/// The range table once it tiles the key space (a node may not have applied a split or
/// merge yet).
async fn settled_table(cluster: &Cluster) -> Result<Vec<Range>> {
    let mut last = String::new();
    for _ in 0..50 {
        let table = cluster.ranges(false).await?;
        let tiling = table
            .iter()
            .map(|r| (r.info.range_id, &r.info.start_key[..], &r.info.end_key[..]));
        match check_tiling(tiling) {
            Ok(()) => return Ok(table),
            Err(e) => last = e.to_string(),
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    bail!("the target's range table does not settle: {last}")
}

/// Cuts the target's ranges at exactly the boundaries `wanted`.
async fn shape(cluster: &Cluster, wanted: &BTreeSet<Vec<u8>>, parallel: usize) -> Result<()> {
    let mut progress = Progress::new();
    let mut last = String::new();
    for _ in 0..SHAPE_ROUNDS {
        let table = settled_table(cluster).await?;
        let now = starts(&table);
        // Boundaries the backup does not have: merge each range into its left neighbour,
        // right to left, so that every target still exists when its turn comes.
        let extra: Vec<&Range> = table
            .iter()
            .filter(|r| !r.info.start_key.is_empty() && !wanted.contains(&r.info.start_key[..]))
            .collect();
        if !extra.is_empty() {
            for r in extra.into_iter().rev() {
                let left = table
                    .iter()
                    .find(|l| l.info.end_key == r.info.start_key)
                    .expect("a settled table has a left neighbour");
                if let Err(e) = merge(cluster, r, left).await {
                    last = e;
                    break;
                }
            }
            continue;
        }
        let missing: Vec<&Vec<u8>> = wanted.difference(&now).collect();
        let total = missing.len();
        if missing.is_empty() {
            progress.finish();
            return Ok(());
        }
        // Each range with the boundaries that fall inside it.
        let mut cuts: BTreeMap<u64, (Option<u64>, Vec<Vec<u8>>)> = BTreeMap::new();
        for key in missing {
            let r = table
                .iter()
                .find(|r| contains(&r.info, key))
                .expect("a settled table holds every key");
            let entry = cuts
                .entry(r.info.range_id)
                .or_insert_with(|| (r.leader, Vec::new()));
            entry.1.push(key.clone());
        }
        match split_all(cluster, cuts, parallel, total, &mut progress).await {
            Ok(()) => {}
            Err(e) => last = e,
        }
    }
    progress.finish();
    Err(RestoreError::Shape(last).into())
}

fn contains(info: &RangeInfo, key: &[u8]) -> bool {
    info.start_key[..] <= *key && (info.end_key.is_empty() || *key < info.end_key[..])
}

/// Merges range `r` into its left neighbour `left`.
async fn merge(cluster: &Cluster, r: &Range, left: &Range) -> Result<(), String> {
    let req = MergeRequest {
        source_range_id: r.info.range_id,
        target_range_id: left.info.range_id,
    };
    on_leader(cluster, r.leader, PATIENCE, |mut admin| async move {
        admin.merge(req).await
    })
    .await
    .map(|_| ())
    .map_err(|s| {
        format!(
            "merging r{} into r{} to remove the boundary {:?}: {} (a merge needs both ranges on \
             the same nodes; a cluster bootstrapped with one range needs no merge)",
            r.info.range_id,
            left.info.range_id,
            show_bytes(&r.info.start_key),
            describe(&s)
        )
    })
}

/// Splits each range of `cuts` at its keys: the middle one first, then each half at the
/// middle of its own, `parallel` splits at a time.
async fn split_all(
    cluster: &Cluster,
    cuts: BTreeMap<u64, (Option<u64>, Vec<Vec<u8>>)>,
    parallel: usize,
    total: usize,
    progress: &mut Progress,
) -> Result<(), String> {
    let mut todo: Vec<(u64, Option<u64>, Vec<Vec<u8>>)> = cuts
        .into_iter()
        .map(|(id, (leader, keys))| (id, leader, keys))
        .collect();
    let mut running = FuturesUnordered::new();
    let mut done = 0usize;
    loop {
        while running.len() < parallel {
            let Some((id, leader, mut keys)) = todo.pop() else {
                break;
            };
            let right = keys.split_off(keys.len() / 2);
            running.push(split_one(cluster, id, leader, keys, right));
        }
        let Some(result) = running.next().await else {
            return Ok(());
        };
        let (halves, rest) = result?;
        done += 1;
        for ((info, leader), keys) in halves.into_iter().zip(rest) {
            if !keys.is_empty() {
                todo.push((info.range_id, leader, keys));
            }
        }
        progress.tick(|secs| {
            format!(
                "restore: {done} of about {total} splits ({:.0}/s)",
                rate(done as f64, secs)
            )
        });
    }
}

/// A split's halves with their leader hints, and the keys left to cut in each.
type Halves = (Vec<(RangeInfo, Option<u64>)>, [Vec<Vec<u8>>; 2]);

/// Splits range `id` at the first of `right`; the keys of `left` fall in the left half and
/// the rest of `right` in the right half.
async fn split_one(
    cluster: &Cluster,
    id: u64,
    leader: Option<u64>,
    left: Vec<Vec<u8>>,
    mut right: Vec<Vec<u8>>,
) -> Result<Halves, String> {
    let at = right.remove(0);
    let req = SplitRequest {
        range: Some(split_request::Range::RangeId(id)),
        split_key: at.clone().into(),
    };
    let answer = on_leader(cluster, leader, PATIENCE, |mut admin| {
        let req = req.clone();
        async move { admin.split(req).await }
    })
    .await
    .map_err(|s| format!("splitting r{id} at {:?}: {}", show_bytes(&at), describe(&s)))?;
    let hint = |i: &RangeInfo| {
        (i.leader_node_id != 0)
            .then_some(i.leader_node_id)
            .or(leader)
    };
    let halves = [answer.left, answer.right]
        .into_iter()
        .flatten()
        .map(|i| {
            let h = hint(&i);
            (i, h)
        })
        .collect::<Vec<_>>();
    if halves.len() != 2 {
        return Err(format!("splitting r{id}: the answer lacks a half"));
    }
    Ok((halves, [left, right]))
}

/// Loads every range's pairs with batched multi-puts.
async fn load(client: &Client, dir: &Path, manifest: &Manifest, opts: &Options) -> Result<()> {
    let mut progress = Progress::new();
    let mut running = FuturesUnordered::new();
    let (mut keys, mut bytes) = (0u64, 0u64);
    // Batches cut from the chunk just read, waiting for room among those in flight.
    let mut ready: Vec<(Vec<(Bytes, Bytes)>, usize)> = Vec::new();
    for entry in &manifest.ranges {
        let mut reader = DataReader::open(dir, entry)?;
        let (mut batch, mut size) = (Vec::new(), 0usize);
        loop {
            let chunk = match reader.next_chunk() {
                Ok(c) => c,
                Err(ReadError::Io(e)) => return Err(e.into()),
                Err(ReadError::Corrupt(why)) => bail!("{}: {why}", reader.file.display()),
            };
            let last = chunk.is_none();
            for p in chunk.into_iter().flat_map(|c| c.pairs) {
                size += p.key.len() + p.value.len();
                batch.push((p.key, p.value));
                if batch.len() >= opts.batch_keys || size >= opts.batch_bytes {
                    ready.push((std::mem::take(&mut batch), std::mem::take(&mut size)));
                }
            }
            if last && !batch.is_empty() {
                ready.push((std::mem::take(&mut batch), size));
            }
            for (batch, size) in ready.drain(..) {
                while running.len() >= opts.parallel {
                    let (k, b) = next_done(&mut running).await?;
                    (keys, bytes) = (keys + k, bytes + b);
                    progress.tick(|secs| loaded(manifest, keys, bytes, secs));
                }
                running.push(put(client, batch, size));
            }
            if last {
                break;
            }
        }
    }
    while !running.is_empty() {
        let (k, b) = next_done(&mut running).await?;
        (keys, bytes) = (keys + k, bytes + b);
        progress.tick(|secs| loaded(manifest, keys, bytes, secs));
    }
    progress.finish();
    Ok(())
}

/// The load's progress line.
fn loaded(manifest: &Manifest, keys: u64, bytes: u64, secs: f64) -> String {
    format!(
        "restore: {keys} of {} keys ({:.0}%), {} of {}, {:.0} keys/s, {:.1} MB/s",
        manifest.keys,
        100.0 * keys as f64 / manifest.keys.max(1) as f64,
        show_size(bytes),
        show_size(manifest.bytes),
        rate(keys as f64, secs),
        rate(bytes as f64, secs) / 1e6
    )
}

/// One multi-put; resolves with its pairs and bytes.
async fn put(client: &Client, batch: Vec<(Bytes, Bytes)>, size: usize) -> Result<(u64, u64)> {
    let n = batch.len() as u64;
    client
        .multi_put(batch)
        .await
        .with_context(|| format!("writing {n} pairs"))?;
    Ok((n, size as u64))
}

async fn next_done<F>(running: &mut FuturesUnordered<F>) -> Result<(u64, u64)>
where
    F: std::future::Future<Output = Result<(u64, u64)>>,
{
    running.next().await.unwrap_or(Ok((0, 0)))
}
