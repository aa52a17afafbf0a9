//! The backup: every range at one point, its data streamed from its leader into a file.
//!
//! Rounds: read the merged range table; take every range whose keys the files taken so far
//! do not cover yet (a few at a time, `--parallel`); each is asked of its leader with the
//! version the table gives (admin `BackupRange`: the node refuses a range that changed shape
//! since, then takes a linearizable point of it and streams it). A range taken replaces any
//! taken before that it overlaps (their files are deleted): that happens only when ranges
//! merged while the backup ran, and the uncovered rest is taken in the next round. A split
//! needs nothing: the parent's file, taken at one point, still holds the keys of both
//! halves. Rounds end once the files tile the key space exactly once; then the manifest is
//! written, last, so that a directory without it holds no complete backup.
//!
//! What a backup holds: for each range, every write acknowledged before that range was
//! taken (and nothing not applied at that point), so every write acknowledged before the
//! backup started. The ranges are taken at different points: the backup is consistent per
//! range, not one snapshot of the whole cluster (what a merge-free cross-range snapshot
//! would need is a cluster-wide timestamp, which Flotilla does not have).
//!
//! The retry de-duplication records of each range (client id → last request) are not
//! backed up: a restore starts a new cluster, which no client of the old one retries a
//! request against, and its own writes carry request ids of its own.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use anyhow::{bail, Context as _, Result};
use flotilla_proto::admin::backup_range_frame::Frame;
use flotilla_proto::admin::{BackupRangeFrame, BackupRangeRequest};
use futures_util::stream::{FuturesUnordered, StreamExt as _};
use tonic::Streaming;

use super::format::{self, BackupError, DataWriter, Manifest, RangeEntry, Source};
use super::{on_leader, rate, unix_ms, Progress};
use crate::cluster::{describe, Cluster, Range};
use crate::output::show_size;

/// Rounds of the table before the backup gives up (ranges that keep changing shape, a
/// range without a reachable replica).
const MAX_ROUNDS: usize = 60;
/// Pause before a round that follows failures.
const ROUND_WAIT: Duration = Duration::from_millis(250);
/// Largest message the client decodes: a chunk (at most 2 MiB) plus one pair.
const MAX_FRAME_BYTES: usize = 16 << 20;

/// `flotilla-ctl backup`'s settings.
#[derive(Debug, Clone)]
pub struct Options {
    /// Ranges exported at the same time.
    pub parallel: usize,
    /// Bytes per chunk asked of the node.
    pub chunk_bytes: u64,
}

/// Why one range's export did not give a file: retried in the next round, or not at all.
enum Failed {
    Retry(String),
    Fatal(anyhow::Error),
}

/// Backs up the cluster into `dir` (new or empty): see the module doc.
///
/// # Errors
///
/// [`BackupError`] for the directory and its files; the cluster's errors; a backup that did
/// not cover the key space within [`MAX_ROUNDS`] rounds. Its data files are then removed.
pub async fn take(
    cluster: &Cluster,
    endpoints: &[String],
    dir: &Path,
    opts: &Options,
) -> Result<Manifest> {
    format::prepare_dir(dir)?;
    let started_unix_ms = unix_ms();
    let mut done: BTreeMap<Vec<u8>, RangeEntry> = BTreeMap::new();
    let result = rounds(cluster, dir, opts, &mut done).await;
    if let Err(e) = result {
        for entry in done.values() {
            let _ = std::fs::remove_file(dir.join(&entry.file));
        }
        return Err(e);
    }
    let ranges: Vec<RangeEntry> = done.into_values().collect();
    let manifest = Manifest {
        format: format::FORMAT.into(),
        version: format::FORMAT_VERSION,
        started_unix_ms,
        finished_unix_ms: unix_ms(),
        source: Source {
            endpoints: endpoints.to_vec(),
            node_ids: cluster.admins().into_iter().map(|(id, _)| id).collect(),
        },
        keys: ranges.iter().map(|r| r.keys).sum(),
        bytes: ranges.iter().map(|r| r.bytes).sum(),
        ranges,
    };
    format::write_manifest(dir, &manifest)?;
    Ok(manifest)
}

/// The rounds, until `done` tiles the key space.
async fn rounds(
    cluster: &Cluster,
    dir: &Path,
    opts: &Options,
    done: &mut BTreeMap<Vec<u8>, RangeEntry>,
) -> Result<()> {
    let mut progress = Progress::new();
    let mut problem = String::new();
    for round in 0..MAX_ROUNDS {
        if round > 0 {
            tokio::time::sleep(ROUND_WAIT).await;
        }
        let table = cluster.ranges(false).await?;
        let total = table.len();
        let todo: Vec<Range> = table
            .into_iter()
            .filter(|r| !covered(done, &r.info.start_key, &r.info.end_key))
            .collect();
        if todo.is_empty() {
            if tiles(done) {
                progress.finish();
                return Ok(());
            }
            // Every range listed is covered, yet keys are not: the table has a hole (a
            // node that has not applied a split yet answered for that part).
            problem = "the range table does not cover the key space".into();
            continue;
        }
        let mut todo = todo.into_iter();
        let mut running = FuturesUnordered::new();
        loop {
            while running.len() < opts.parallel {
                let Some(r) = todo.next() else { break };
                running.push(export(cluster, dir, r, opts.chunk_bytes));
            }
            let Some(result) = running.next().await else {
                break;
            };
            match result {
                Ok(entry) => insert(dir, done, entry),
                Err(Failed::Retry(why)) => problem = why,
                Err(Failed::Fatal(e)) => return Err(e),
            }
            let (keys, bytes) = done
                .values()
                .fold((0, 0), |(k, b), e| (k + e.keys, b + e.bytes));
            progress.tick(|secs| {
                format!(
                    "backup: {} of {total} ranges, {keys} keys, {} ({:.0} keys/s)",
                    done.len(),
                    show_size(bytes),
                    rate(keys as f64, secs)
                )
            });
        }
        if tiles(done) {
            progress.finish();
            return Ok(());
        }
    }
    progress.finish();
    bail!("the backup did not cover the key space after {MAX_ROUNDS} rounds of the range table: {problem}")
}

/// Whether the entries of `done` (disjoint, by start key) cover `[start, end)`.
fn covered(done: &BTreeMap<Vec<u8>, RangeEntry>, start: &[u8], end: &[u8]) -> bool {
    let mut at = start.to_vec();
    loop {
        let Some((_, e)) = done.range(..=at.clone()).next_back() else {
            return false;
        };
        if !e.end_key.is_empty() && e.end_key <= at {
            return false;
        }
        if e.end_key.is_empty() || (!end.is_empty() && e.end_key[..] >= *end) {
            return true;
        }
        at = e.end_key.clone();
    }
}

/// Whether the entries of `done` tile the key space.
fn tiles(done: &BTreeMap<Vec<u8>, RangeEntry>) -> bool {
    format::check_tiling(
        done.values()
            .map(|e| (e.range_id, &e.start_key[..], &e.end_key[..])),
    )
    .is_ok()
}

/// Adds a range taken to `done`, replacing (and deleting the files of) those it overlaps.
fn insert(dir: &Path, done: &mut BTreeMap<Vec<u8>, RangeEntry>, entry: RangeEntry) {
    let overlaps = |e: &RangeEntry| {
        (entry.end_key.is_empty() || e.start_key < entry.end_key)
            && (e.end_key.is_empty() || entry.start_key < e.end_key)
    };
    let gone: Vec<Vec<u8>> = done
        .iter()
        .filter(|(_, e)| overlaps(e))
        .map(|(k, _)| k.clone())
        .collect();
    for k in gone {
        if let Some(old) = done.remove(&k) {
            if old.file != entry.file {
                let _ = std::fs::remove_file(dir.join(&old.file));
            }
        }
    }
    done.insert(entry.start_key.clone(), entry);
}

/// Takes range `r` into a file: asks its leader, receives the stream.
async fn export(
    cluster: &Cluster,
    dir: &Path,
    r: Range,
    chunk_bytes: u64,
) -> Result<RangeEntry, Failed> {
    let id = r.info.range_id;
    let version = r.info.epoch.map_or(0, |e| e.version);
    let req = BackupRangeRequest {
        range_id: id,
        version,
        chunk_bytes,
    };
    let frames = on_leader(cluster, r.leader, cluster.timeout(), |admin| {
        let mut admin = admin.max_decoding_message_size(MAX_FRAME_BYTES);
        async move { admin.backup_range(req).await }
    })
    .await
    .map_err(|s| match s.code() {
        tonic::Code::InvalidArgument | tonic::Code::Unimplemented => {
            Failed::Fatal(anyhow::anyhow!("range {id}: {}", describe(&s)))
        }
        _ => Failed::Retry(format!("range {id}: {}", describe(&s))),
    })?;
    receive(cluster, dir, id, version, frames).await
}

/// Writes the frames of one range's answer into its file.
async fn receive(
    cluster: &Cluster,
    dir: &Path,
    id: u64,
    version: u64,
    mut frames: Streaming<BackupRangeFrame>,
) -> Result<RangeEntry, Failed> {
    let retry = |why: String| Failed::Retry(format!("range {id}: {why}"));
    let wait = cluster.timeout();
    let start = match next(&mut frames, wait).await.map_err(retry)? {
        Frame::Start(s) => s,
        _ => {
            return Err(retry(
                "the stream did not begin with its start frame".into(),
            ))
        }
    };
    let desc = start.descriptor.unwrap_or_default();
    let epoch = desc.epoch.unwrap_or_default();
    if desc.range_id != id || epoch.version != version {
        return Err(retry(format!(
            "the node sent r{} version {} for version {version}",
            desc.range_id, epoch.version
        )));
    }
    let file = RangeEntry::file_name(id, version, start.applied_index);
    let fatal = |e: BackupError| Failed::Fatal(e.into());
    let mut writer =
        DataWriter::create(dir, &file, &desc.start_key, &desc.end_key).map_err(fatal)?;
    // An early return drops the writer, which removes its temporary file.
    let end = loop {
        match next(&mut frames, wait).await.map_err(retry)? {
            Frame::Chunk(c) => writer.write_chunk(&c).map_err(fatal)?,
            Frame::End(end) => break end,
            Frame::Start(_) => return Err(retry("a second start frame".into())),
        }
    };
    if (end.keys, end.bytes) != writer.counts() {
        let (keys, bytes) = writer.counts();
        return Err(retry(format!(
            "the end frame counts {} keys, {} bytes; the chunks held {keys}, {bytes}",
            end.keys, end.bytes
        )));
    }
    let written = writer
        .finish()
        .with_context(|| format!("range {id}"))
        .map_err(Failed::Fatal)?;
    Ok(RangeEntry {
        range_id: id,
        start_key: desc.start_key.to_vec(),
        end_key: desc.end_key.to_vec(),
        conf_ver: epoch.conf_ver,
        version: epoch.version,
        applied_index: start.applied_index,
        applied_term: start.applied_term,
        node_id: start.node_id,
        taken_unix_ms: unix_ms(),
        file,
        keys: written.keys,
        bytes: written.bytes,
        file_bytes: written.file_bytes,
        crc32: written.crc32,
    })
}

/// The stream's next frame, within `wait`.
async fn next(frames: &mut Streaming<BackupRangeFrame>, wait: Duration) -> Result<Frame, String> {
    match tokio::time::timeout(wait, frames.message()).await {
        Err(_) => Err(format!("no frame within {wait:?}")),
        Ok(Err(s)) => Err(describe(&s)),
        Ok(Ok(None)) => Err("the stream ended before its end frame".into()),
        Ok(Ok(Some(f))) => f.frame.ok_or_else(|| "an empty frame".to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(id: u64, start: &str, end: &str) -> RangeEntry {
        RangeEntry {
            range_id: id,
            start_key: start.into(),
            end_key: end.into(),
            conf_ver: 1,
            version: 1,
            applied_index: 1,
            applied_term: 1,
            node_id: 1,
            taken_unix_ms: 0,
            file: format!("f{id}"),
            keys: 0,
            bytes: 0,
            file_bytes: 0,
            crc32: 0,
        }
    }

    #[test]
    fn ranges_taken_are_kept_disjoint_and_the_cover_is_judged_on_their_union() {
        let tmp = tempfile::tempdir().unwrap();
        let mut done = BTreeMap::new();
        insert(tmp.path(), &mut done, entry(1, "", "g"));
        insert(tmp.path(), &mut done, entry(2, "g", "p"));
        assert!(covered(&done, b"", b"p"));
        assert!(covered(&done, b"c", b"h"), "covered by two files");
        assert!(!covered(&done, b"h", b""));
        assert!(!covered(&done, b"p", b"z"));
        assert!(!tiles(&done));
        // A range that merged [g, p) with [p, ...) replaces the file of [g, p).
        insert(tmp.path(), &mut done, entry(2, "g", ""));
        assert_eq!(done.len(), 2);
        assert!(tiles(&done));
        assert!(covered(&done, b"x", b""));
        // A merge of everything replaces both.
        insert(tmp.path(), &mut done, entry(1, "", ""));
        assert_eq!(done.len(), 1);
        assert!(tiles(&done));
    }
}
