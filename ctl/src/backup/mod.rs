//! `flotilla-ctl backup DIR` and `flotilla-ctl restore DIR`: a consistent backup of a
//! cluster's data to a directory, and a new cluster started from one.
//!
//! - `format.rs`: the directory's format (manifest + one data file per range) and every check
//!   of it (typed errors: [`format::BackupError`]).
//! - `take.rs`: the backup: every range of the range table at one point, asked of its leader
//!   (admin `BackupRange`), with ranges that split or merge meanwhile taken again until the
//!   files tile the key space exactly once.
//! - `restore.rs`: verify the backup, refuse a target that holds data (unless `--force`), cut
//!   the target's ranges at the backup's boundaries, load the pairs with batched multi-puts.
//!
//! This file holds the subcommands' flags, what they print, and what both halves share:
//! a call sent to a range's leader that waits out a moment without one.

mod format;
mod restore;
mod take;

use std::io::{IsTerminal as _, Write as _};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::Result;
use flotilla_proto::admin::admin_client::AdminClient;
use flotilla_proto::LEADER_NODE_METADATA;
use serde_json::json;
use tonic::transport::Channel;

use crate::cluster::{Cluster, Dial};
use crate::output::{show_size, Output};

/// `flotilla-ctl backup`.
#[derive(Debug, clap::Args)]
pub struct BackupArgs {
    /// The directory to write (created if missing; refused if it holds anything).
    pub dir: PathBuf,
    /// Ranges exported at the same time.
    #[arg(long, default_value_t = 4, value_parser = clap::value_parser!(u32).range(1..=64))]
    pub parallel: u32,
    /// About this many bytes of pairs per chunk of the stream and of the data files
    /// (the node caps it at 2 MiB).
    #[arg(long, default_value_t = 1 << 20)]
    pub chunk_bytes: u64,
}

/// `flotilla-ctl restore`.
#[derive(Debug, clap::Args)]
pub struct RestoreArgs {
    /// The backup directory.
    pub dir: PathBuf,
    /// Only verify the backup (manifest, checksums, tiling); touch no cluster.
    #[arg(long)]
    pub check: bool,
    /// Write into a cluster that already holds keys (they stay unless the backup has them).
    #[arg(long)]
    pub force: bool,
    /// Multi-puts in flight at the same time.
    #[arg(long, default_value_t = 32, value_parser = clap::value_parser!(u32).range(1..=1024))]
    pub parallel: u32,
    /// Most pairs in one multi-put.
    #[arg(long, default_value_t = 512, value_parser = clap::value_parser!(u32).range(1..=10_000))]
    pub batch_keys: u32,
    /// Most bytes of keys and values in one multi-put (a node refuses proposals over
    /// `max_proposal_bytes`, 512 KiB by default).
    #[arg(long, default_value_t = 128 << 10, value_parser = clap::value_parser!(u64).range(1..=(1 << 20)))]
    pub batch_bytes: u64,
}

/// Runs `flotilla-ctl backup`.
pub async fn backup(dial: &Dial, cluster: &Cluster, args: BackupArgs, out: Output) -> Result<()> {
    let opts = take::Options {
        parallel: args.parallel as usize,
        chunk_bytes: args.chunk_bytes,
    };
    let started = Instant::now();
    let m = take::take(cluster, &dial.endpoints, &args.dir, &opts).await?;
    let summary = Summary {
        ranges: m.ranges.len(),
        keys: m.keys,
        bytes: m.bytes,
        secs: started.elapsed().as_secs_f64(),
    };
    summary.print("backup", &args.dir, json!({}), out);
    Ok(())
}

/// Runs `flotilla-ctl restore`.
pub async fn restore(dial: &Dial, args: RestoreArgs, out: Output) -> Result<()> {
    let started = Instant::now();
    let manifest = format::verify(&args.dir)?;
    let verify_secs = started.elapsed().as_secs_f64();
    if args.check {
        match out {
            Output::Json => println!(
                "{}",
                json!({ "event": "check", "dir": args.dir, "ok": true,
                        "ranges": manifest.ranges.len(), "keys": manifest.keys,
                        "bytes": manifest.bytes })
            ),
            Output::Table => println!(
                "{}: a complete backup of {} ranges, {} keys, {}",
                args.dir.display(),
                manifest.ranges.len(),
                manifest.keys,
                show_size(manifest.bytes)
            ),
        }
        return Ok(());
    }
    let cluster = Cluster::connect(dial).await?;
    let opts = restore::Options {
        force: args.force,
        parallel: args.parallel as usize,
        batch_keys: args.batch_keys as usize,
        batch_bytes: args.batch_bytes as usize,
    };
    let phases = restore::restore(dial, &cluster, &args.dir, &manifest, &opts).await?;
    let summary = Summary {
        ranges: manifest.ranges.len(),
        keys: manifest.keys,
        bytes: manifest.bytes,
        secs: started.elapsed().as_secs_f64(),
    };
    let phases = json!({ "verify_secs": verify_secs, "shape_secs": phases.shape_secs,
                         "load_secs": phases.load_secs });
    summary.print("restore", &args.dir, phases, out);
    Ok(())
}

/// What a backup or restore moved, and in how long.
#[derive(Debug, Clone, Copy)]
struct Summary {
    ranges: usize,
    keys: u64,
    bytes: u64,
    secs: f64,
}

impl Summary {
    /// Prints the summary line (JSON: one object, `extra`'s fields added).
    fn print(&self, event: &str, dir: &std::path::Path, extra: serde_json::Value, out: Output) {
        let Summary {
            ranges,
            keys,
            bytes,
            secs,
        } = *self;
        let (keys_per_sec, mb_per_sec) = (rate(keys as f64, secs), rate(bytes as f64, secs) / 1e6);
        match out {
            Output::Json => {
                let mut v = json!({ "event": event, "dir": dir, "ranges": ranges, "keys": keys,
                                    "bytes": bytes, "secs": secs, "keys_per_sec": keys_per_sec,
                                    "mb_per_sec": mb_per_sec });
                if let (Some(v), serde_json::Value::Object(extra)) = (v.as_object_mut(), extra) {
                    v.extend(extra);
                }
                println!("{v}");
            }
            Output::Table => println!(
                "{event} of {ranges} ranges, {keys} keys, {} ({}): {secs:.2} s, \
                 {keys_per_sec:.0} keys/s, {mb_per_sec:.1} MB/s",
                show_size(bytes),
                dir.display()
            ),
        }
    }
}

/// Runs `call` on the node `hint` (else, or if it is not among the endpoints, on any
/// reachable node), following the leader a node names (`UNAVAILABLE` with
/// `flotilla-leader-node`) and waiting out, until `patience` has passed, what a moment
/// later may cure: no leader yet (a range just split), back-pressure, a call without an
/// answer. Any other status is the answer.
///
/// # Errors
///
/// The last status (`DEADLINE_EXCEEDED` for a call that did not answer in time).
async fn on_leader<T, F, Fut>(
    cluster: &Cluster,
    mut hint: Option<u64>,
    patience: Duration,
    mut call: F,
) -> Result<T, tonic::Status>
where
    F: FnMut(AdminClient<Channel>) -> Fut,
    Fut: std::future::Future<Output = Result<tonic::Response<T>, tonic::Status>>,
{
    let deadline = Instant::now() + patience;
    let mut wait = Duration::from_millis(10);
    loop {
        let client = match cluster.admin(hint) {
            Ok((_, c)) => c,
            Err(_) => cluster.admin(None).expect("any node").1,
        };
        let status = match tokio::time::timeout(cluster.timeout(), call(client)).await {
            Ok(Ok(r)) => return Ok(r.into_inner()),
            Ok(Err(s)) => s,
            Err(_) => tonic::Status::deadline_exceeded(format!(
                "no answer within {:?}",
                cluster.timeout()
            )),
        };
        let named = status
            .metadata()
            .get(LEADER_NODE_METADATA)
            .and_then(|v| v.to_str().ok()?.parse::<u64>().ok());
        let transient = matches!(
            status.code(),
            tonic::Code::Unavailable | tonic::Code::DeadlineExceeded
        );
        if !transient || Instant::now() >= deadline {
            return Err(status);
        }
        match named {
            Some(leader) if hint != Some(leader) => hint = Some(leader),
            _ => {
                // No leader named (or the one named again): ask anyone after a pause.
                hint = None;
                tokio::time::sleep(wait).await;
                wait = (wait * 2).min(Duration::from_millis(200));
            }
        }
    }
}

/// A progress line on stderr, at most once a second: rewritten in place on a terminal, one
/// line each time otherwise.
#[derive(Debug)]
struct Progress {
    started: Instant,
    last: Option<Instant>,
    tty: bool,
}

impl Progress {
    fn new() -> Progress {
        Progress {
            started: Instant::now(),
            last: None,
            tty: std::io::stderr().is_terminal(),
        }
    }

    /// Prints `line()` (given the seconds since the start) if a second passed since the last.
    fn tick(&mut self, line: impl FnOnce(f64) -> String) {
        let now = Instant::now();
        if self.last.is_some_and(|l| now - l < Duration::from_secs(1)) {
            return;
        }
        self.last = Some(now);
        let line = line((now - self.started).as_secs_f64());
        let mut err = std::io::stderr().lock();
        let _ = if self.tty {
            write!(err, "\r\x1b[2K{line}")
        } else {
            writeln!(err, "{line}")
        };
    }

    /// Ends the line on a terminal.
    fn finish(&mut self) {
        if self.tty && self.last.is_some() {
            eprintln!();
        }
    }
}

/// Milliseconds since the Unix epoch, now.
fn unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// A rate as people read it.
fn rate(count: f64, secs: f64) -> f64 {
    if secs > 0.0 {
        count / secs
    } else {
        0.0
    }
}
