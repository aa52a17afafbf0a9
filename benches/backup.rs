//! Backup and restore throughput: three `flotilla-node` processes (8 ranges) loaded with
//! 100,000 keys (100-byte values), `flotilla-ctl backup` of them into a directory, then
//! `flotilla-ctl restore` of it into a fresh three-node cluster (one range at the start, so
//! the restore splits it at the backup's 7 boundaries), and a count of the restored keys.
//!
//! Run: `cargo build --release --workspace --bins && cargo bench --bench backup` (the
//! flotilla-ctl binary is another package's: build it first). `FLOTILLA_BACKUP_KEYS`
//! overrides the key count. Prints `RESULT {"event":"backup",...}` and
//! `RESULT {"event":"restore",...}` lines (flotilla-ctl's own JSON summary: keys, bytes,
//! seconds, keys/s, MB/s). Under `cargo test --benches` (no `--bench` argument) a tiny
//! version runs.

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{ensure, Context as _};
use flotilla_benchkit::nodes::{ctl_beside, Layout, NodeProcs};
use flotilla_client::{Bytes, Client, ClientConfig};
use futures_util::stream::{FuturesUnordered, StreamExt as _};
use serde_json::Value;

const RANGES: usize = 8;
const VALUE_BYTES: usize = 100;
const LIMIT: Duration = Duration::from_secs(60);

fn node_binary() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_flotilla-node"))
}

/// Runs flotilla-ctl; its stdout, or its stderr as the error.
fn ctl(endpoints: &str, args: &[&str]) -> anyhow::Result<String> {
    let out = Command::new(ctl_beside(node_binary())?)
        .args(["--endpoints", endpoints, "--timeout", "10s"])
        .args(args)
        .output()?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    ensure!(out.status.success(), "flotilla-ctl {args:?}: {stderr}");
    // Its progress lines.
    eprint!("{stderr}");
    Ok(String::from_utf8(out.stdout)?)
}

/// Three nodes with `ranges` ranges, each led, and the system range too (its registry
/// answers): the restore's first split leases range ids from it, and its first election
/// belongs to the cluster's start, not to the restore.
fn start(ranges: usize) -> anyhow::Result<(NodeProcs, String)> {
    let layout = Layout::local(3, ranges)?.with_args(&["--no-schedule"]);
    let procs = NodeProcs::start(node_binary(), layout)?;
    let endpoints = procs.endpoints();
    let started = Instant::now();
    loop {
        if let Ok(out) = ctl(&endpoints, &["ranges", "--no-sizes", "-o", "json"]) {
            let table: Value = serde_json::from_str(&out)?;
            let list = table.as_array().context("a table")?;
            let led = list.len() == ranges && list.iter().all(|r| r["leader_node_id"].is_u64());
            if led && ctl(&endpoints, &["registry"]).is_ok() {
                return Ok((procs, endpoints));
            }
        }
        ensure!(started.elapsed() < LIMIT, "the cluster did not elect");
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> anyhow::Result<()> {
    let full = std::env::args().any(|a| a == "--bench");
    let keys: u64 = std::env::var("FLOTILLA_BACKUP_KEYS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(if full { 100_000 } else { 1_000 });
    let (_source, src) = start(RANGES)?;
    let client = Client::connect(ClientConfig::new(src.split(','))).await?;
    let load = Instant::now();
    let mut running = FuturesUnordered::new();
    for first in (0..keys).step_by(500) {
        let batch: Vec<(Bytes, Bytes)> = (first..(first + 500).min(keys))
            .map(|i| {
                // Spread over the layout's ranges: k00000001/.. to k00000008/...
                let key = format!("k{:08}/{i:08}", i % RANGES as u64 + 1);
                (Bytes::from(key), Bytes::from(vec![b'v'; VALUE_BYTES]))
            })
            .collect();
        if running.len() >= 16 {
            running.next().await.transpose()?;
        }
        let client = client.clone();
        running.push(async move { client.multi_put(batch).await });
    }
    while let Some(r) = running.next().await {
        r?;
    }
    println!(
        "loaded {keys} keys into {RANGES} ranges in {:.1}s",
        load.elapsed().as_secs_f64()
    );

    let tmp = tempfile::tempdir()?;
    let dir = tmp.path().join("backup");
    let dir_arg = dir.to_str().context("a UTF-8 path")?;
    let backup: Value = serde_json::from_str(&ctl(&src, &["backup", dir_arg, "-o", "json"])?)?;
    ensure!(backup["keys"].as_u64() == Some(keys), "backup: {backup}");
    println!("RESULT {backup}");

    let (_target, dst) = start(1)?;
    let restore: Value = serde_json::from_str(&ctl(&dst, &["restore", dir_arg, "-o", "json"])?)?;
    ensure!(restore["keys"].as_u64() == Some(keys), "restore: {restore}");
    println!("RESULT {restore}");

    // Every key is there, in as many ranges as the source had.
    let target = Client::connect(ClientConfig::new(dst.split(','))).await?;
    let (mut count, mut continuation) = (0u64, None);
    loop {
        let page = target
            .scan(Bytes::new(), Bytes::new(), 10_000, continuation)
            .await?;
        count += page.pairs.len() as u64;
        continuation = page.continuation;
        if continuation.is_none() {
            break;
        }
    }
    let table: Value = serde_json::from_str(&ctl(&dst, &["ranges", "--no-sizes", "-o", "json"])?)?;
    let ranges = table.as_array().map_or(0, Vec::len);
    println!("restored cluster: {count} keys in {ranges} ranges");
    ensure!(
        count == keys && ranges == RANGES,
        "restored {count} keys in {ranges} ranges"
    );
    Ok(())
}
