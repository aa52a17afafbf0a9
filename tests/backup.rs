//! Backup under writes, restored into a fresh cluster, compared: three `flotilla-node`
//! processes take writes from four writers (each key written by one writer, in order, every
//! attempt and acknowledgement recorded) while `flotilla-ctl backup` runs and ranges are split
//! and merged beside it; then `flotilla-ctl restore` starts a fresh three-node cluster from
//! the backup. Compared: every key acknowledged before the backup started is restored with
//! that value or a later one written to it; nothing restored was not written; the restored
//! range boundaries are the backup's (the target's own layout had one the backup lacks, so
//! the restore merged it away, and split at the others); a full scan of the restored cluster
//! equals the union of the backup's files (read here with the documented format, not with
//! flotilla-ctl's code). Also: a backup into a non-empty directory and a restore into a
//! cluster that holds data are refused.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use flotilla::proto::meta::SnapshotChunk;
use flotilla::proto::Message as _;
use flotilla_benchkit::nodes::{Layout, NodeProcs};
use flotilla_client::{Client, ClientConfig};
use serde_json::Value;

const T: Duration = Duration::from_secs(30);
/// The source's layout: boundaries k00000002, k00000003, k00000004.
const RANGES: usize = 4;
const WRITERS: usize = 4;
/// Keys per writer: each is written again and again as the writer wraps around.
const KEYS_PER_WRITER: u64 = 600;

fn node_binary() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_flotilla-node"))
}

fn ctl(endpoints: &str, args: &[&str]) -> Output {
    let ctl = flotilla_benchkit::nodes::ctl_beside(node_binary()).unwrap();
    Command::new(ctl)
        .args(["--endpoints", endpoints, "--timeout", "5s"])
        .args(args)
        .output()
        .unwrap()
}

/// Runs flotilla-ctl until it succeeds (the cluster may still be electing); its stdout.
fn ctl_ok(endpoints: &str, args: &[&str]) -> String {
    let deadline = Instant::now() + T;
    loop {
        let out = ctl(endpoints, args);
        if out.status.success() {
            return String::from_utf8(out.stdout).unwrap();
        }
        assert!(
            Instant::now() < deadline,
            "flotilla-ctl {args:?} kept failing: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Three nodes, every range led.
fn start_cluster(ranges: usize) -> (NodeProcs, String) {
    let layout = Layout::local(3, ranges)
        .unwrap()
        .with_args(&["--tick-ms", "20", "--no-schedule"]);
    let procs = NodeProcs::start(node_binary(), layout).unwrap();
    let endpoints = procs.endpoints();
    let deadline = Instant::now() + T;
    loop {
        let table: Value =
            serde_json::from_str(&ctl_ok(&endpoints, &["ranges", "--no-sizes", "-o", "json"]))
                .unwrap();
        let list = table.as_array().unwrap();
        if list.len() == ranges && list.iter().all(|r| r["leader_node_id"].is_u64()) {
            return (procs, endpoints);
        }
        assert!(Instant::now() < deadline, "never all led: {table:#}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// The start keys of the cluster's ranges (but the first), as flotilla-ctl shows them.
fn boundaries(endpoints: &str) -> Vec<String> {
    let table: Value =
        serde_json::from_str(&ctl_ok(endpoints, &["ranges", "--no-sizes", "-o", "json"])).unwrap();
    let mut starts: Vec<String> = table
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["start"].as_str().unwrap().to_string())
        .filter(|s| !s.is_empty())
        .collect();
    starts.sort();
    starts
}

/// One write of a key: its value, and when it was acknowledged (never, if it failed: its
/// outcome is unknown).
#[derive(Debug, Clone)]
struct Attempt {
    value: Vec<u8>,
    acked: Option<Instant>,
}

type History = Arc<Mutex<HashMap<Vec<u8>, Vec<Attempt>>>>;

/// Writes until `stop`: writer `w` writes its keys round and round, each write awaited.
async fn writer(client: Client, w: usize, history: History, stop: Arc<AtomicBool>) {
    let mut i = 0u64;
    while !stop.load(Ordering::Relaxed) {
        let j = i % KEYS_PER_WRITER;
        // Spread over the layout's ranges: k00000001/.. to k00000004/...
        let key = format!("k{:08}/w{w}/{j:05}", j % RANGES as u64 + 1).into_bytes();
        let value = format!("w{w}-i{i}-{}", "x".repeat(100)).into_bytes();
        let at = {
            let mut h = history.lock().unwrap();
            let list = h.entry(key.clone()).or_default();
            list.push(Attempt {
                value: value.clone(),
                acked: None,
            });
            list.len() - 1
        };
        if client.put(key.clone(), value).await.is_ok() {
            history.lock().unwrap().get_mut(&key).unwrap()[at].acked = Some(Instant::now());
        }
        i += 1;
    }
}

/// Every pair of a backup directory, read with the documented format: the manifest's ranges,
/// each file a sequence of length-delimited `SnapshotChunk`s.
fn backup_pairs(dir: &Path) -> (Value, BTreeMap<Vec<u8>, Vec<u8>>) {
    let manifest: Value =
        serde_json::from_slice(&std::fs::read(dir.join("manifest.json")).unwrap()).unwrap();
    let mut pairs = BTreeMap::new();
    for r in manifest["ranges"].as_array().unwrap() {
        let bytes = std::fs::read(dir.join(r["file"].as_str().unwrap())).unwrap();
        let mut buf = &bytes[..];
        let mut keys = 0;
        while !buf.is_empty() {
            let chunk = SnapshotChunk::decode_length_delimited(&mut buf).unwrap();
            for p in chunk.pairs {
                keys += 1;
                assert!(
                    pairs.insert(p.key.to_vec(), p.value.to_vec()).is_none(),
                    "a key in two files"
                );
            }
        }
        assert_eq!(r["keys"].as_u64(), Some(keys), "{r:#}");
    }
    (manifest, pairs)
}

/// Splits and merges range r4 (at fresh keys inside it) until `stop`; returns when each
/// change was made.
fn churn(endpoints: &str, stop: &AtomicBool) -> Vec<Instant> {
    let mut made = Vec::new();
    let mut n = 0;
    while !stop.load(Ordering::Relaxed) {
        n += 1;
        let at = format!("k00000004/w{}/{:05}", n % WRITERS, n * 37 % 600);
        let out = ctl(
            endpoints,
            &["split", "--range-key", &at, "--at", &at, "-o", "json"],
        );
        if !out.status.success() {
            std::thread::sleep(Duration::from_millis(20));
            continue;
        }
        made.push(Instant::now());
        let halves: Value = serde_json::from_slice(&out.stdout).unwrap();
        let (left, right) = (
            halves[0]["range_id"].to_string(),
            halves[1]["range_id"].to_string(),
        );
        // Merge it back (retried: the new range may not have a leader yet).
        let deadline = Instant::now() + T;
        while !ctl(endpoints, &["merge", "--source", &right, "--target", &left])
            .status
            .success()
        {
            assert!(
                Instant::now() < deadline,
                "the split of {at} never merged back"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        made.push(Instant::now());
    }
    made
}

#[test]
fn a_backup_under_writes_and_splits_restores_into_a_fresh_cluster() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let (_source, src) = start_cluster(RANGES);
    // The source loses the boundary k00000003 (r3 merged into r2): the target, bootstrapped
    // with the same four ranges, must merge it away on restore.
    ctl_ok(&src, &["merge", "--source", "3", "--target", "2"]);

    let history: History = Arc::default();
    let stop_writers = Arc::new(AtomicBool::new(false));
    let client = rt
        .block_on(Client::connect(ClientConfig::new(src.split(','))))
        .unwrap();
    let writers: Vec<_> = (0..WRITERS)
        .map(|w| {
            rt.spawn(writer(
                client.clone(),
                w,
                history.clone(),
                stop_writers.clone(),
            ))
        })
        .collect();
    // Every key is acknowledged once before the backup starts.
    let deadline = Instant::now() + T;
    let acked = |h: &HashMap<Vec<u8>, Vec<Attempt>>| {
        h.values()
            .filter(|a| a.iter().any(|a| a.acked.is_some()))
            .count()
    };
    while acked(&history.lock().unwrap()) < WRITERS * KEYS_PER_WRITER as usize {
        assert!(Instant::now() < deadline, "the writers did not get going");
        std::thread::sleep(Duration::from_millis(50));
    }

    // The backup, with a split and a merge during it: tried again (into a new directory)
    // if every change fell outside it (a backup of this size takes a fraction of a second).
    let tmp = tempfile::tempdir().unwrap();
    let mut attempt = 0;
    let (dir, backup_started) = loop {
        attempt += 1;
        let dir = tmp.path().join(format!("backup-{attempt}"));
        let stop_churn = AtomicBool::new(false);
        let (started, ended, changes, out) = std::thread::scope(|s| {
            let churn = s.spawn(|| churn(&src, &stop_churn));
            std::thread::sleep(Duration::from_millis(100));
            let started = Instant::now();
            let out = ctl(
                &src,
                &[
                    "backup",
                    dir.to_str().unwrap(),
                    "--parallel",
                    "1",
                    "--chunk-bytes",
                    "4096",
                    "-o",
                    "json",
                ],
            );
            let ended = Instant::now();
            stop_churn.store(true, Ordering::Relaxed);
            (started, ended, churn.join().unwrap(), out)
        });
        assert!(
            out.status.success(),
            "backup failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let during = changes
            .iter()
            .filter(|t| **t > started && **t < ended)
            .count();
        eprintln!("backup {attempt}: {during} splits or merges during it");
        if during > 0 || attempt == 5 {
            assert!(during > 0, "no split or merge landed during 5 backups");
            break (dir, started);
        }
    };
    stop_writers.store(true, Ordering::Relaxed);
    for w in writers {
        rt.block_on(w).unwrap();
    }
    let (manifest, backed_up) = backup_pairs(&dir);
    let ranges = manifest["ranges"].as_array().unwrap();
    assert!(ranges.len() >= RANGES - 1, "{manifest:#}");
    assert!(ranges
        .iter()
        .all(|r| r["applied_index"].as_u64() > Some(0) && r["node_id"].as_u64() > Some(0)));

    // A second backup into the same directory is refused, and nothing in it changes.
    let again = ctl(&src, &["backup", dir.to_str().unwrap()]);
    assert!(!again.status.success());
    assert!(
        String::from_utf8_lossy(&again.stderr).contains("is not empty"),
        "{}",
        String::from_utf8_lossy(&again.stderr)
    );

    // Restore into a fresh cluster with the source's original layout.
    let (_target, dst) = start_cluster(RANGES);
    assert!(boundaries(&dst).contains(&"k00000003".to_string()));
    let out = ctl(&dst, &["restore", dir.to_str().unwrap(), "-o", "json"]);
    assert!(
        out.status.success(),
        "restore failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let summary: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(summary["keys"].as_u64(), Some(backed_up.len() as u64));
    eprintln!(
        "restored {} keys in {} ranges: {summary}",
        backed_up.len(),
        ranges.len()
    );

    // The restored boundaries are the backup's.
    let mut backup_starts: Vec<String> = ranges
        .iter()
        .map(|r| r["start_key"].as_str().unwrap())
        .filter(|s| !s.is_empty())
        .map(|hex| {
            let bytes: Vec<u8> = (0..hex.len())
                .step_by(2)
                .map(|i| u8::from_str_radix(&hex[i..i + 2], 16).unwrap())
                .collect();
            String::from_utf8(bytes).unwrap()
        })
        .collect();
    backup_starts.sort();
    assert_eq!(boundaries(&dst), backup_starts);
    assert!(!backup_starts.contains(&"k00000003".to_string()));

    // A full scan of the restored cluster is the union of the backup's files.
    let target = rt
        .block_on(Client::connect(ClientConfig::new(dst.split(','))))
        .unwrap();
    let mut restored = BTreeMap::new();
    let mut continuation = None;
    loop {
        let page = rt
            .block_on(target.scan("", "", 1000, continuation))
            .unwrap();
        restored.extend(
            page.pairs
                .into_iter()
                .map(|(k, v)| (k.to_vec(), v.to_vec())),
        );
        continuation = page.continuation;
        if continuation.is_none() {
            break;
        }
    }
    assert_eq!(restored.len(), backed_up.len());
    assert!(
        restored == backed_up,
        "the restored pairs differ from the backup's"
    );

    // Every key acknowledged before the backup started is there, with that value or a later
    // one; nothing is there that was not written.
    let history = history.lock().unwrap();
    let mut checked = 0;
    for (key, attempts) in history.iter() {
        let last_acked = attempts
            .iter()
            .rposition(|a| a.acked.is_some_and(|t| t < backup_started));
        let Some(first_allowed) = last_acked else {
            continue;
        };
        checked += 1;
        let value = restored.get(key).unwrap_or_else(|| {
            panic!(
                "{} was acknowledged before the backup and is missing",
                String::from_utf8_lossy(key)
            )
        });
        assert!(
            attempts[first_allowed..].iter().any(|a| &a.value == value),
            "{}: restored an older value than acknowledged before the backup",
            String::from_utf8_lossy(key)
        );
    }
    assert_eq!(checked, WRITERS * KEYS_PER_WRITER as usize);
    for (key, value) in &restored {
        let written = history
            .get(key)
            .is_some_and(|a| a.iter().any(|a| &a.value == value));
        assert!(
            written,
            "{} was never written",
            String::from_utf8_lossy(key)
        );
    }

    // The target holds data now: a second restore is refused without --force.
    let again = ctl(&dst, &["restore", dir.to_str().unwrap()]);
    assert!(!again.status.success());
    assert!(
        String::from_utf8_lossy(&again.stderr).contains("already holds data"),
        "{}",
        String::from_utf8_lossy(&again.stderr)
    );
}

/// `restore --check` verifies a backup without a cluster, and names what is wrong with a
/// damaged one.
#[test]
fn restore_check_refuses_a_damaged_backup() {
    let (_source, src) = start_cluster(2);
    ctl_ok(&src, &["kv", "put", "a", "1"]);
    ctl_ok(&src, &["kv", "put", "k00000002/b", "2"]);
    let tmp = tempfile::tempdir().unwrap();
    let dir: PathBuf = tmp.path().join("b");
    ctl_ok(&src, &["backup", dir.to_str().unwrap()]);
    // No cluster at this endpoint: --check does not need one.
    let check = |dir: &Path| {
        ctl(
            "127.0.0.1:1",
            &["restore", "--check", dir.to_str().unwrap()],
        )
    };
    let out = check(&dir);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("2 ranges, 2 keys"));
    let (manifest, _) = backup_pairs(&dir);
    let file = dir.join(manifest["ranges"][0]["file"].as_str().unwrap());
    let mut bytes = std::fs::read(&file).unwrap();
    let last = bytes.len() - 1;
    bytes[last] ^= 1;
    std::fs::write(&file, &bytes).unwrap();
    let out = check(&dir);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("checksum") && err.contains("damaged"), "{err}");
}
