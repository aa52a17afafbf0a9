//! Proposal throughput through 3 NodeGroups in one process (in-memory network, stores on
//! disk with fsync) as the same load (4,096 proposers, each with one proposal in flight) is
//! spread over more active groups: 1 (256 proposers), 64, 1,024 and 4,096, with 4,096 groups
//! hosted throughout.
//!
//! Run: `cargo bench --bench throughput` (env `FLOTILLA_BENCH_SECS` sets the measured
//! seconds per configuration, default 10; `FLOTILLA_BENCH_ACTIVE`, a comma-separated list,
//! runs only those configurations, e.g. `64,4096` when profiling; `FLOTILLA_BENCH_ALL_HEARTBEATS`
//! set sends every heartbeat, also those a leader skips after an append). Prints one line per
//! configuration: `RESULT {"active_groups":N,"proposals_per_sec":X,"p50_ms":X,"p99_ms":X,
//! "cpu_us_per_proposal":X,"messages_per_proposal":X,"batches_per_proposal":X,
//! "heartbeats_per_sec":X,..}` (CPU of the whole process, three nodes and load generator, per
//! acknowledged proposal: less sensitive than the rate to other load on the machine; raft
//! messages and node-to-node batches the in-memory network delivered per acknowledged
//! proposal; coalesced heartbeats per second, which every hosted group costs), then
//! the ratios of 1,024 and 4,096 active groups to 64 in the same run.

use flotilla::testing::measure::{cpu_seconds, percentile};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use flotilla::testing::{key_in_range, Cluster};
use flotilla::{NodeGroupConfig, RangeId};

const GROUPS: usize = 4096;
/// Proposers (each with one proposal in flight) of every configuration from 16 groups up.
const PROPOSERS: usize = 4096;

fn config(node: u64) -> NodeGroupConfig {
    NodeGroupConfig {
        tick_interval: Duration::from_millis(100),
        // For an A/B of the heartbeats a busy leader skips.
        skip_heartbeats_after_append: std::env::var("FLOTILLA_BENCH_ALL_HEARTBEATS").is_err(),
        ..NodeGroupConfig::new(node)
    }
}

/// One configuration's figures.
struct Run {
    proposals_per_sec: f64,
    p50_ms: f64,
    p99_ms: f64,
    /// Process CPU time (the three nodes and the load generator) per acknowledged proposal.
    cpu_us_per_proposal: f64,
    /// Raft messages (coalesced heartbeats not counted) the network delivered per acknowledged
    /// proposal.
    messages_per_proposal: f64,
    /// Coalesced heartbeats (and their responses) delivered per second: a cost of every
    /// hosted group, active or not.
    heartbeats_per_sec: f64,
    /// Node-to-node batches the network delivered per acknowledged proposal.
    batches_per_proposal: f64,
}

async fn run(c: Arc<Cluster>, active: usize, proposers: usize, secs: u64) -> Run {
    let stop = Arc::new(AtomicBool::new(false));
    let mut tasks = Vec::new();
    let started = Instant::now();
    let cpu = cpu_seconds();
    let net = c.net.stats();
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
    let cpu = cpu_seconds() - cpu;
    let net_after = c.net.stats();
    let n = lat.len().max(1) as f64;
    let messages = net_after.delivered_messages - net.delivered_messages;
    let heartbeats = net_after.delivered_heartbeats - net.delivered_heartbeats;
    let batches = net_after.delivered_batches - net.delivered_batches;
    lat.sort_by(|a, b| a.partial_cmp(b).unwrap());
    Run {
        proposals_per_sec: lat.len() as f64 / elapsed,
        p50_ms: percentile(&lat, 0.5),
        p99_ms: percentile(&lat, 0.99),
        cpu_us_per_proposal: cpu * 1e6 / n,
        messages_per_proposal: messages as f64 / n,
        heartbeats_per_sec: heartbeats as f64 / elapsed,
        batches_per_proposal: batches as f64 / n,
    }
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
        let configs: Vec<usize> = match std::env::var("FLOTILLA_BENCH_ACTIVE") {
            Ok(list) => list
                .split(',')
                .map(|n| n.trim().parse().expect("FLOTILLA_BENCH_ACTIVE: numbers"))
                .filter(|&n| n <= groups)
                .collect(),
            Err(_) if quick => vec![1, 64],
            Err(_) => vec![1, 64, 1024, GROUPS],
        };
        let mut results = Vec::new();
        for &active in &configs {
            // The same load spread over more groups: PROPOSERS in every configuration (one
            // per group at 4,096, 64 per group at 64), so that what each group costs shows;
            // one group gets 256 (its mailbox holds 1,024 messages).
            let proposers = PROPOSERS.min(active * 256);
            eprintln!("measuring active_groups={active} for {secs} s");
            let r = run(c.clone(), active, proposers, secs).await;
            eprintln!(
                "active_groups={active} proposers={proposers}: {:.0} proposals/s, p50 {:.2} ms, p99 {:.2} ms, per proposal {:.1} µs CPU, {:.2} messages, {:.2} batches; {:.0} heartbeats/s",
                r.proposals_per_sec, r.p50_ms, r.p99_ms, r.cpu_us_per_proposal, r.messages_per_proposal, r.batches_per_proposal, r.heartbeats_per_sec
            );
            results.push((active, proposers, r));
        }
        for (active, proposers, r) in &results {
            println!(
                "RESULT {{\"active_groups\":{active},\"proposals_per_sec\":{:.1},\"p50_ms\":{:.3},\"p99_ms\":{:.3},\"cpu_us_per_proposal\":{:.1},\"messages_per_proposal\":{:.2},\"batches_per_proposal\":{:.3},\"heartbeats_per_sec\":{:.0},\"proposers\":{proposers},\"seconds\":{secs}}}",
                r.proposals_per_sec, r.p50_ms, r.p99_ms, r.cpu_us_per_proposal, r.messages_per_proposal, r.batches_per_proposal, r.heartbeats_per_sec
            );
        }
        let find = |n: usize| {
            results
                .iter()
                .find(|r| r.0 == n)
                .map(|r| r.2.proposals_per_sec)
        };
        for n in [1024, GROUPS] {
            if let (Some(a), Some(b)) = (find(64), find(n)) {
                println!("RESULT {{\"ratio_{n}_to_64_active\":{:.3}}}", b / a);
            }
        }
        drop(c);
    });
}
