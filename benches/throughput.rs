//! Proposal throughput through 3 NodeGroups in one process (in-memory network, stores on
//! disk with fsync) as the number of active groups grows: 1, 64 and 1,024.
//!
//! Run: `cargo bench --bench throughput` (env `FLOTILLA_BENCH_SECS` sets the measured
//! seconds per configuration, default 10). Prints one line per configuration:
//! `RESULT {"active_groups":N,"proposals_per_sec":X,"p50_ms":X,"p99_ms":X}`.

use flotilla::testing::measure::percentile;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use flotilla::testing::{key_in_range, Cluster};
use flotilla::{NodeGroupConfig, RangeId};

const GROUPS: usize = 1024;

fn config(node: u64) -> NodeGroupConfig {
    NodeGroupConfig {
        tick_interval: Duration::from_millis(100),
        ..NodeGroupConfig::new(node)
    }
}

async fn run(c: Arc<Cluster>, active: usize, proposers: usize, secs: u64) -> (f64, f64, f64) {
    let stop = Arc::new(AtomicBool::new(false));
    let mut tasks = Vec::new();
    let started = Instant::now();
    for p in 0..proposers {
        let (c, stop) = (c.clone(), stop.clone());
        tasks.push(tokio::spawn(async move {
            let mut lat = Vec::new();
            let mut n = 0u64;
            let range = (p % active) as u64 + 1;
            let value = [7u8; 16];
            let mut leader = c.leader_of(RangeId(range)).unwrap_or(1);
            while !stop.load(Ordering::Relaxed) {
                let key = key_in_range(range, &format!("{p}-{n}"));
                let t = Instant::now();
                match c.node(leader).put(&key, &value).await {
                    Ok(()) => lat.push(t.elapsed().as_secs_f64() * 1e3),
                    Err(_) => {
                        leader = c.leader_of(RangeId(range)).unwrap_or(1);
                        tokio::time::sleep(Duration::from_millis(5)).await;
                    }
                }
                n += 1;
            }
            lat
        }));
    }
    tokio::time::sleep(Duration::from_secs(secs)).await;
    stop.store(true, Ordering::Relaxed);
    let mut lat = Vec::new();
    for t in tasks {
        lat.extend(t.await.unwrap());
    }
    let elapsed = started.elapsed().as_secs_f64();
    lat.sort_by(|a, b| a.partial_cmp(b).unwrap());
    (
        lat.len() as f64 / elapsed,
        percentile(&lat, 0.5),
        percentile(&lat, 0.99),
    )
}

fn main() {
    // `cargo bench` passes `--bench`; `cargo test --benches` passes nothing useful: run a
    // tiny version then so that the bench is exercised by tests.
    let quick = !std::env::args().any(|a| a == "--bench");
    let secs: u64 = std::env::var("FLOTILLA_BENCH_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(if quick { 1 } else { 10 });
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let groups = if quick { 64 } else { GROUPS };
        let c = Arc::new(Cluster::with_config(3, config, Default::default()));
        let layout = c.bootstrap(groups);
        let ids: Vec<RangeId> = layout.iter().map(|d| d.id()).collect();
        c.wait_leaders(&ids, Duration::from_secs(120)).await;
        let configs: &[usize] = if quick { &[1, 64] } else { &[1, 64, 1024] };
        let mut results = Vec::new();
        for &active in configs {
            // Enough proposers to saturate: several per active group, at least 256 in all.
            let proposers = (active * 2).clamp(256, 2048);
            let (tput, p50, p99) = run(c.clone(), active, proposers, secs).await;
            eprintln!(
                "active_groups={active} proposers={proposers}: {tput:.0} proposals/s, p50 {p50:.2} ms, p99 {p99:.2} ms"
            );
            results.push((active, tput, p50, p99, proposers));
        }
        for (active, tput, p50, p99, proposers) in &results {
            println!(
                "RESULT {{\"active_groups\":{active},\"proposals_per_sec\":{tput:.1},\"p50_ms\":{p50:.3},\"p99_ms\":{p99:.3},\"proposers\":{proposers},\"seconds\":{secs}}}"
            );
        }
        let find = |n: usize| results.iter().find(|r| r.0 == n).map(|r| r.1);
        if let (Some(a), Some(b)) = (find(64), find(1024)) {
            println!(
                "RESULT {{\"ratio_1024_to_64_active\":{:.3}}}",
                b / a
            );
        }
        drop(c);
    });
}
