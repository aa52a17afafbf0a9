//! Group density: memory and tick CPU per idle replica with 10,000 and 50,000 groups on one
//! NodeGroup.
//!
//! Each group here has a single voter (this node): that isolates what the runtime and raft-rs
//! cost per replica without two more in-process NodeGroups doubling the process's RSS. A
//! three-voter replica adds raft-rs's per-peer progress (2 × (max_inflight_msgs × 8 + ~100)
//! bytes on the leader).
//!
//! Run: `cargo bench --bench density`. Prints one line per size:
//! `RESULT {"groups_per_node":N,"rss_bytes_per_replica":X,"tick_round_cpu_ms":X}`.

use std::time::{Duration, Instant};

use flotilla::layout::range_layout;
use flotilla::testing::measure::{cpu_seconds, rss_bytes};
use flotilla::testing::{node_ids, wait_until, Cluster};
use flotilla::{NodeGroupConfig, RangeId, StateRole};

async fn measure(groups: u64, tick: Duration) -> (f64, f64, f64, f64) {
    // One node, on the in-memory network (it sends nothing: every group is its own quorum).
    let c = Cluster::with_config(
        1,
        move |n| NodeGroupConfig {
            tick_interval: tick,
            ..NodeGroupConfig::new(n)
        },
        Default::default(),
    );
    let ng = c.node(1);
    // Let RocksDB and the threads settle before the baseline.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let base = rss_bytes();
    let t = Instant::now();
    // Single-voter groups on node 1.
    let all = range_layout(groups as usize, &node_ids(1));
    for chunk in all.chunks(1000) {
        ng.bootstrap_ranges(chunk.to_vec()).unwrap();
    }
    let create_secs = t.elapsed().as_secs_f64();
    for i in 1..=groups {
        ng.campaign(RangeId(i)).unwrap();
    }
    let ok = wait_until(Duration::from_secs(600), || {
        ng.node_status().leaders as u64 == groups
    })
    .await;
    assert!(ok, "not all groups elected themselves");
    // Idle: every group has applied its election no-op; let caches and queues drain.
    tokio::time::sleep(tick * 5).await;
    let rss = rss_bytes().saturating_sub(base);
    // CPU of the tick rounds: the process is otherwise idle.
    let rounds = 50u32;
    let c0 = cpu_seconds();
    tokio::time::sleep(tick * rounds).await;
    let tick_cpu_ms = (cpu_seconds() - c0) * 1e3 / rounds as f64;
    let st = ng.status(RangeId(1)).unwrap();
    assert_eq!(st.role, StateRole::Leader);
    ng.shutdown();
    (
        rss as f64 / groups as f64,
        tick_cpu_ms,
        create_secs,
        rss as f64,
    )
}

fn main() {
    let quick = !std::env::args().any(|a| a == "--bench");
    let sizes: &[u64] = if quick { &[1_000] } else { &[10_000, 50_000] };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let tick = Duration::from_millis(100);
    let mut lines = Vec::new();
    for &n in sizes {
        let (per, cpu, create, rss) = rt.block_on(measure(n, tick));
        eprintln!(
            "{n} groups: {per:.0} B RSS/replica ({:.1} MiB total), tick round {cpu:.2} ms CPU, created in {create:.2}s",
            rss / (1 << 20) as f64
        );
        lines.push(format!(
            "RESULT {{\"groups_per_node\":{n},\"rss_bytes_per_replica\":{per:.0},\"tick_round_cpu_ms\":{cpu:.3},\"create_secs\":{create:.3},\"tick_interval_ms\":{}}}",
            tick.as_millis()
        ));
    }
    for l in lines {
        println!("{l}");
    }
}
