//! Split latency as a function of the range's size: 3 NodeGroups in one process (in-memory
//! network, stores on disk with fsync), one range filled through raft with `FLOTILLA_SPLIT_VALUE`
//! byte values (default 1 KiB) by many concurrent proposers, then split several times.
//!
//! One measurement: from the admin call `split(range, Some(key))` on the range's leader until
//! both halves serve, i.e. both have a leader and each has acknowledged a write (a put through
//! its leader). Seven splits per size; their keys cut 3%, 6%, ... off the top of the filled key
//! space, so each split's parent still holds at least 80% of the data. A split copies no data,
//! so the latency must not grow with the range's size. Then the seven slices are merged back
//! one by one (`merge_ms`: from the admin call `merge(slice, parent)` on the slice's leader
//! until the merged range acknowledged a write in the slice's former keys); a merge copies no
//! data either.
//!
//! The new group's first election races the followers' apply of the split: when its pre-vote
//! reaches a follower that has not applied the split yet, the follower drops it (the range
//! overlaps its parent) and the group waits for an election timeout (10-20 ticks). Samples
//! above half the minimum election timeout are counted as `slow_samples`.
//!
//! Run: `cargo bench --bench split` (sizes 1 MiB, 10 MiB, 100 MiB; `FLOTILLA_SPLIT_SIZES_MB`
//! overrides, e.g. `1,100`). Prints one line per size:
//! `RESULT {"range_bytes":N,"split_ms":X,...}` with the median over the splits of that size.
//! Under `cargo test --benches` (no `--bench` argument) a tiny version runs.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use flotilla::testing::Cluster;
use flotilla::{NodeGroupConfig, RangeId, SplitConfig};

fn config(node: u64) -> NodeGroupConfig {
    NodeGroupConfig {
        // Only the splits we ask for: no size-triggered splits while filling.
        split: SplitConfig {
            max_range_bytes: 0,
            ..Default::default()
        },
        ..NodeGroupConfig::new(node)
    }
}

fn data_key(i: u64) -> Vec<u8> {
    format!("d{i:09}").into_bytes()
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    if v.is_empty() {
        0.0
    } else {
        v[v.len() / 2]
    }
}

/// Polls `cond` every millisecond until it holds; panics after `timeout`.
async fn wait(what: &str, timeout: Duration, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
}

/// Writes keys `0..n` with `value_size`-byte values through the range's leader, with
/// `proposers` concurrent proposers; every put is acknowledged (retried until it is).
async fn fill(c: &Arc<Cluster>, range: RangeId, n: u64, value_size: usize, proposers: usize) {
    let next = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::new();
    for p in 0..proposers {
        let (c, next) = (c.clone(), next.clone());
        tasks.push(tokio::spawn(async move {
            let mut value = vec![0u8; value_size];
            let mut leader = c.leader_of(range).unwrap_or(1);
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= n {
                    return;
                }
                value[..8].copy_from_slice(&(i ^ p as u64).to_le_bytes());
                let k = data_key(i);
                let mut tries = 0;
                while let Err(e) = c.node(leader).put(&k, &value).await {
                    tries += 1;
                    assert!(tries < 1000, "put keeps failing: {e}");
                    tokio::time::sleep(Duration::from_millis(5)).await;
                    leader = c.leader_of(range).unwrap_or(1);
                }
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
}

/// Waits until every node's replica of `range` applied everything its leader committed.
async fn settle(c: &Cluster, range: RangeId) {
    wait("followers to catch up", Duration::from_secs(300), || {
        let Some(l) = c.leader_of(range) else {
            return false;
        };
        let commit = c.node(l).status(range).unwrap().commit;
        (1..=3).all(|n| c.node(n).status(range).is_ok_and(|s| s.applied >= commit))
    })
    .await;
}

/// Puts through the leader of the range holding `key` until one is acknowledged.
async fn serve_write(c: &Cluster, key: &[u8]) {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let range = c.node(1).range_of(key).unwrap().id();
        if let Some(l) = c.leader_of(range) {
            if c.node(l).put(key, b"after-split").await.is_ok() {
                return;
            }
        }
        assert!(
            Instant::now() < deadline,
            "no write acknowledged after split"
        );
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
}

struct Sample {
    parent_bytes: u64,
    call_ms: f64,
    leader_ms: f64,
    total_ms: f64,
}

/// Splits the range holding `split_key` there and times it until both halves serve.
async fn measure_split(c: &Cluster, split_key: &[u8], parent_bytes: u64) -> Sample {
    let parent = c.node(1).range_of(split_key).unwrap();
    let l = c.leader_of(parent.id()).expect("parent has a leader");
    let t0 = Instant::now();
    let (left, right) = c
        .node(l)
        .split(parent.id(), Some(split_key.to_vec()))
        .await
        .expect("split");
    let call_ms = t0.elapsed().as_secs_f64() * 1e3;
    wait(
        "both halves to have a leader",
        Duration::from_secs(60),
        || c.leader_of(left.id()).is_some() && c.leader_of(right.id()).is_some(),
    )
    .await;
    let leader_ms = t0.elapsed().as_secs_f64() * 1e3;
    let mut lk = left.start_key.to_vec();
    lk.extend_from_slice(b"~left");
    let mut rk = split_key.to_vec();
    rk.extend_from_slice(b"~right");
    tokio::join!(serve_write(c, &lk), serve_write(c, &rk));
    let total_ms = t0.elapsed().as_secs_f64() * 1e3;
    // Every node applies the split before the next measurement starts.
    wait(
        "every node to apply the split",
        Duration::from_secs(60),
        || (1..=3).all(|n| c.node(n).range_of(split_key).unwrap().range_id == right.range_id),
    )
    .await;
    Sample {
        parent_bytes,
        call_ms,
        leader_ms,
        total_ms,
    }
}

/// Merges the range holding `source_key` back into its left neighbour (the big parent) and
/// times it until the merged range acknowledged a write in the source's former keys.
async fn measure_merge(c: &Cluster, source_key: &[u8]) -> f64 {
    let source = c.node(1).range_of(source_key).unwrap();
    let target = c
        .node(1)
        .ranges()
        .into_iter()
        .find(|d| d.end_key == source.start_key)
        .expect("left neighbour");
    let t0 = Instant::now();
    let deadline = t0 + Duration::from_secs(60);
    loop {
        let l = c.leader_of(source.id()).unwrap_or(1);
        match c.node(l).merge(source.id(), target.id()).await {
            Ok(_) => break,
            Err(e) => {
                assert!(Instant::now() < deadline, "merge keeps failing: {e}");
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
        }
    }
    let mut k = source_key.to_vec();
    k.extend_from_slice(b"~merged");
    serve_write(c, &k).await;
    let ms = t0.elapsed().as_secs_f64() * 1e3;
    wait(
        "every node to apply the merge",
        Duration::from_secs(60),
        || (1..=3).all(|n| c.node(n).range_of(source_key).unwrap().range_id == target.range_id),
    )
    .await;
    ms
}

fn main() {
    let quick = !std::env::args().any(|a| a == "--bench");
    let value_size: usize = std::env::var("FLOTILLA_SPLIT_VALUE")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(1024);
    let sizes: Vec<u64> = match std::env::var("FLOTILLA_SPLIT_SIZES_MB") {
        Ok(s) => s
            .split(',')
            .filter_map(|x| x.trim().parse::<u64>().ok())
            .map(|mb| mb << 20)
            .collect(),
        Err(_) if quick => vec![64 << 10, 1 << 20],
        Err(_) => vec![1 << 20, 10 << 20, 100 << 20],
    };
    let splits: u64 = if quick { 2 } else { 7 };
    let proposers = if quick { 32 } else { 128 };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let mut lines = Vec::new();
        for &bytes in &sizes {
            // A fresh cluster per size, so that one size's data does not slow another's.
            let c = Arc::new(Cluster::with_config(3, config, Default::default()));
            let range = c.bootstrap(1)[0].id();
            c.wait_leaders(&[range], Duration::from_secs(60)).await;
            let key_len = data_key(0).len();
            let n = bytes.div_ceil((key_len + value_size) as u64);
            let t = Instant::now();
            fill(&c, range, n, value_size, proposers).await;
            let fill_secs = t.elapsed().as_secs_f64();
            settle(&c, range).await;
            let pair = (key_len + value_size) as u64;
            eprintln!(
                "range_bytes={}: {n} puts of {value_size} B in {fill_secs:.1} s ({:.1} MB/s)",
                n * pair,
                (n * pair) as f64 / fill_secs / 1e6
            );
            let mut samples = Vec::new();
            for s in 1..=splits {
                // Cut 3% more off the top each time: the parent holds (1 - 0.03 (s-1)) of n.
                let at = n - n * 3 * s / 100;
                let parent_keys = n - n * 3 * (s - 1) / 100;
                let sample = measure_split(&c, &data_key(at), parent_keys * pair).await;
                eprintln!(
                    "  split {s}: parent {} B, call {:.2} ms, leaders {:.2} ms, both serving {:.2} ms",
                    sample.parent_bytes, sample.call_ms, sample.leader_ms, sample.total_ms
                );
                samples.push(sample);
            }
            // Undo the splits, smallest slice first: each merge folds a slice back into the
            // parent, which holds most of the data.
            let mut merges = Vec::new();
            for s in (1..=splits).rev() {
                let at = n - n * 3 * s / 100;
                let ms = measure_merge(&c, &data_key(at)).await;
                eprintln!("  merge back {s}: {ms:.2} ms");
                merges.push(ms);
            }
            let merge_all: Vec<String> = merges.iter().map(|x| format!("{x:.2}")).collect();
            let m_merge = median(&mut merges);
            let mut total: Vec<f64> = samples.iter().map(|s| s.total_ms).collect();
            let mut call: Vec<f64> = samples.iter().map(|s| s.call_ms).collect();
            let mut leader: Vec<f64> = samples.iter().map(|s| s.leader_ms).collect();
            let all: Vec<String> = total.iter().map(|x| format!("{x:.2}")).collect();
            let min_parent = samples.iter().map(|s| s.parent_bytes).min().unwrap_or(0);
            let cfg = config(1);
            let slow_ms = (cfg.tick_interval * cfg.election_tick as u32).as_secs_f64() * 1e3 / 2.0;
            let mut fast: Vec<f64> = total.iter().copied().filter(|&x| x < slow_ms).collect();
            let slow = total.len() - fast.len();
            let m_fast = median(&mut fast);
            let (m_total, m_call, m_leader) =
                (median(&mut total), median(&mut call), median(&mut leader));
            lines.push(format!(
                "RESULT {{\"range_bytes\":{},\"split_ms\":{m_total:.2},\"split_call_ms\":{m_call:.2},\"both_leaders_ms\":{m_leader:.2},\"fast_median_ms\":{m_fast:.2},\"slow_samples\":{slow},\"samples_ms\":[{}],\"merge_ms\":{m_merge:.2},\"merge_samples_ms\":[{}],\"min_parent_bytes\":{min_parent},\"value_bytes\":{value_size},\"fill_secs\":{fill_secs:.1}}}",
                n * pair,
                all.join(","),
                merge_all.join(",")
            ));
            drop(c);
        }
        for l in &lines {
            println!("{l}");
        }
    });
}
