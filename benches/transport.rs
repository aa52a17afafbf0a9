//! The gRPC transport under a multi-raft load (issue 4), 3 NodeGroups in one process talking
//! over real gRPC streams on 127.0.0.1, each with its own RocksDB on disk:
//!
//! 1. **Heartbeat coalescing.** N groups (1,000 and 10,000 in the same run, a fresh cluster
//!    each) all awake and idle: leaders heartbeat every `heartbeat_tick` (2) ticks, followers
//!    answer. With `coalesce_heartbeats` (the default) every heartbeat and response travels as
//!    a compact entry of the node pair's `NodeBatch`, so the number of frames (the "RPCs": one
//!    frame is one `NodeBatch` message on the pair's long-lived stream) should not grow with
//!    N; only the frames get fuller. `heartbeat_rpcs_per_pair_per_sec` counts the frames
//!    that carried heartbeats (`GrpcStats::heartbeat_frames`); `frames_per_pair_per_sec`
//!    counts every frame. Measured from [`GrpcStats`] deltas over a window once
//!    every group has a leader and every replica has caught up with its leader's commit.
//!    `GrpcStats` counts per sending node, not per destination, so per pair means
//!    `frames_sent` summed over the nodes / 6 ordered pairs / seconds (the load is symmetric:
//!    leaders are spread round-robin; `per_node_pair_min`/`_max` show how even it is, as
//!    each node's frames / its 2 peers). When idle every frame carries heartbeats
//!    (`frame_messages` shows how many other raft messages there were).
//! 2. **Proposal throughput, gRPC vs in-memory network**: the same workload as the
//!    `throughput` bench (64 groups, 256 proposers writing 16-byte values through each
//!    range's leader) on both transports in the same run.
//!
//! Run: `cargo bench --bench transport`. Environment: `FLOTILLA_BENCH_SECS` (measured seconds
//! per configuration, default 10), `FLOTILLA_BENCH_TICK_MS` (tick interval of the heartbeat
//! part, default 100), `FLOTILLA_BENCH_GROUPS` (comma-separated group counts of the heartbeat
//! part, default `1000,10000`), `FLOTILLA_BENCH_MAX_BATCH` (`max_batch_replicas` of the heartbeat
//! part, default 256: the runtime coalesces heartbeats per worker round, so this bounds how many
//! replicas' heartbeats one round can put into one batch). Prints, at the end:
//!
//! ```text
//! RESULT {"groups":N,"heartbeat_rpcs_per_pair_per_sec":X,"messages_per_batch":X,...}
//! RESULT {"network":"grpc","proposals_per_sec":X,"p50_ms":X,"p99_ms":X,...}
//! RESULT {"network":"memory","proposals_per_sec":X,"p50_ms":X,"p99_ms":X,...}
//! RESULT {"grpc_to_memory_throughput_ratio":X}
//! ```

use flotilla::testing::measure::{cpu_seconds, percentile};
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use flotilla::layout::range_layout;
use flotilla::testing::{key_in_range, node_ids, start_local_servers, Cluster};
use flotilla::transport::GrpcStats;
use flotilla::{NodeGroup, NodeGroupConfig, RangeId, Server, StateRole};

const NODES: usize = 3;
/// Ordered node pairs: each node streams to each of the other two.
const PAIRS: usize = NODES * (NODES - 1);

/// The nodes of a cluster, whichever transport they use (node ids 1..=3).
trait Nodes: Send + Sync + 'static {
    fn node(&self, id: u64) -> &NodeGroup;
}

impl Nodes for Cluster {
    fn node(&self, id: u64) -> &NodeGroup {
        Cluster::node(self, id)
    }
}

/// NodeGroups on gRPC, with the directory holding their engines.
struct Grpc {
    nodes: Vec<Server>,
    _dir: tempfile::TempDir,
}

impl Nodes for Grpc {
    fn node(&self, id: u64) -> &NodeGroup {
        self.nodes[id as usize - 1].node()
    }
}

impl Grpc {
    fn start(config: impl Fn(u64) -> NodeGroupConfig) -> Grpc {
        let dir = tempfile::tempdir().expect("temp dir");
        let nodes =
            start_local_servers(NODES, config, dir.path(), tokio::runtime::Handle::current())
                .expect("start gRPC nodes");
        Grpc { nodes, _dir: dir }
    }

    fn stats(&self) -> Vec<GrpcStats> {
        self.nodes.iter().map(|n| n.transport().stats()).collect()
    }

    fn shutdown(&self) {
        for n in &self.nodes {
            n.shutdown();
        }
    }
}

fn config(node: u64, tick: Duration) -> NodeGroupConfig {
    NodeGroupConfig {
        tick_interval: tick,
        ..NodeGroupConfig::new(node)
    }
}

/// The heartbeat part's config: `config` with an optional `max_batch_replicas` override.
fn hb_config(node: u64, tick: Duration, max_batch: Option<usize>) -> NodeGroupConfig {
    let c = config(node, tick);
    NodeGroupConfig {
        max_batch_replicas: max_batch.unwrap_or(c.max_batch_replicas),
        ..c
    }
}

fn env_u64(name: &str) -> Option<u64> {
    std::env::var(name).ok().and_then(|s| s.parse().ok())
}

/// The node whose replica of `range` is leader (the highest term, if several claim it).
fn leader_of<N: Nodes + ?Sized>(c: &N, range: RangeId) -> Option<u64> {
    (1..=NODES as u64)
        .filter_map(|id| {
            let st = c.node(id).status(range).ok()?;
            (st.role == StateRole::Leader).then_some((st.term, id))
        })
        .max()
        .map(|(_, id)| id)
}

/// Whether `range` has a leader and every replica has applied everything the leader
/// committed (so no appends are left to send: the group is idle).
fn settled<N: Nodes + ?Sized>(c: &N, range: RangeId) -> bool {
    let Some(leader) = leader_of(c, range) else {
        return false;
    };
    let Ok(l) = c.node(leader).status(range) else {
        return false;
    };
    (1..=NODES as u64).all(|id| {
        c.node(id)
            .status(range)
            .is_ok_and(|s| s.term == l.term && s.commit == l.commit && s.applied == s.commit)
    })
}

/// Bootstraps `groups` ranges replicated on all three nodes and campaigns each on a node
/// chosen round-robin.
fn bootstrap<N: Nodes + ?Sized>(c: &N, groups: usize) -> Vec<RangeId> {
    let layout = range_layout(groups, &node_ids(NODES));
    for id in 1..=NODES as u64 {
        for chunk in layout.chunks(1000) {
            c.node(id)
                .bootstrap_ranges(chunk.to_vec())
                .expect("bootstrap");
        }
    }
    for d in &layout {
        let campaigner = (d.range_id % NODES as u64) + 1;
        let _ = c.node(campaigner).campaign(d.id());
    }
    layout.iter().map(|d| d.id()).collect()
}

/// Polls until every range is `settled`, re-checking only those that were not yet.
async fn wait_settled<N: Nodes + ?Sized>(c: &N, ranges: &[RangeId], timeout: Duration) {
    let deadline = Instant::now() + timeout;
    let mut left: Vec<RangeId> = ranges.to_vec();
    loop {
        left.retain(|r| !settled(c, *r));
        if left.is_empty() {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{} of {} groups not settled (leader elected, followers caught up) within {timeout:?}",
            left.len(),
            ranges.len()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Highest term of each range over its replicas.
fn terms<N: Nodes + ?Sized>(c: &N, ranges: &[RangeId]) -> HashMap<RangeId, u64> {
    ranges
        .iter()
        .map(|r| {
            let t = (1..=NODES as u64)
                .filter_map(|id| c.node(id).status(*r).ok().map(|s| s.term))
                .max()
                .unwrap_or(0);
            (*r, t)
        })
        .collect()
}

/// What part 1 measured for one group count.
struct Heartbeats {
    groups: usize,
    per_pair_per_sec: f64,
    per_node_pair_min: f64,
    per_node_pair_max: f64,
    /// Every data frame, heartbeats or not (elections and catch-up add frames of their own).
    frames_per_pair_per_sec: f64,
    messages_per_batch: f64,
    frames_per_sec: f64,
    heartbeats_per_sec: f64,
    messages_per_sec: f64,
    pings: u64,
    bytes_per_frame: f64,
    cpu_cores: f64,
    elections: u64,
    setup_secs: f64,
    secs: f64,
}

async fn heartbeats(
    groups: usize,
    tick: Duration,
    window: Duration,
    settle: Duration,
    max_batch: Option<usize>,
) -> Heartbeats {
    let t0 = Instant::now();
    let c = Grpc::start(move |id| hb_config(id, tick, max_batch));
    let ranges = bootstrap(&c, groups);
    wait_settled(&c, &ranges, Duration::from_secs(900)).await;
    let setup_secs = t0.elapsed().as_secs_f64();
    // A few heartbeat intervals more, so that whatever the elections left queued is gone.
    tokio::time::sleep(settle).await;

    let terms0 = terms(&c, &ranges);
    let (s0, cpu0, started) = (c.stats(), cpu_seconds(), Instant::now());
    tokio::time::sleep(window).await;
    let (s1, cpu1, secs) = (c.stats(), cpu_seconds(), started.elapsed().as_secs_f64());
    let terms1 = terms(&c, &ranges);
    c.shutdown();

    let delta = |f: fn(&GrpcStats) -> u64| -> Vec<u64> {
        s0.iter().zip(&s1).map(|(a, b)| f(b) - f(a)).collect()
    };
    let frames = delta(|s| s.frames_sent);
    let hb_frames: u64 = delta(|s| s.heartbeat_frames).iter().sum();
    let messages: u64 = delta(|s| s.frame_messages).iter().sum();
    let hbs: u64 = delta(|s| s.frame_heartbeats).iter().sum();
    let bytes: u64 = delta(|s| s.frame_bytes).iter().sum();
    let pings: u64 = delta(|s| s.pings_sent).iter().sum();
    let total: u64 = frames.iter().sum();
    let per_peer = |f: u64| f as f64 / (NODES - 1) as f64 / secs;
    let elections = ranges
        .iter()
        .map(|r| terms1[r].saturating_sub(terms0[r]))
        .sum();
    let per_frame = |x: u64| {
        if total == 0 {
            0.0
        } else {
            x as f64 / total as f64
        }
    };
    Heartbeats {
        groups,
        per_pair_per_sec: hb_frames as f64 / PAIRS as f64 / secs,
        frames_per_pair_per_sec: total as f64 / PAIRS as f64 / secs,
        per_node_pair_min: frames.iter().map(|f| per_peer(*f)).fold(f64::MAX, f64::min),
        per_node_pair_max: frames.iter().map(|f| per_peer(*f)).fold(0.0, f64::max),
        messages_per_batch: per_frame(messages + hbs),
        frames_per_sec: total as f64 / secs,
        heartbeats_per_sec: hbs as f64 / secs,
        messages_per_sec: messages as f64 / secs,
        pings,
        bytes_per_frame: per_frame(bytes),
        cpu_cores: (cpu1 - cpu0) / secs,
        elections,
        setup_secs,
        secs,
    }
}

/// `proposers` tasks writing 16-byte values to the first `groups` ranges through their
/// leaders for `secs`; returns (proposals/s, p50 ms, p99 ms).
async fn run<N: Nodes>(c: Arc<N>, groups: usize, proposers: usize, secs: u64) -> (f64, f64, f64) {
    let stop = Arc::new(AtomicBool::new(false));
    let mut tasks = Vec::new();
    let started = Instant::now();
    for p in 0..proposers {
        let (c, stop) = (c.clone(), stop.clone());
        tasks.push(tokio::spawn(async move {
            let mut lat = Vec::new();
            let mut n = 0u64;
            let range = (p % groups) as u64 + 1;
            let value = [7u8; 16];
            let mut leader = leader_of(&*c, RangeId(range)).unwrap_or(1);
            while !stop.load(Ordering::Relaxed) {
                let key = key_in_range(range, &format!("{p}-{n}"));
                let t = Instant::now();
                match c.node(leader).put(&key, &value).await {
                    Ok(()) => lat.push(t.elapsed().as_secs_f64() * 1e3),
                    Err(_) => {
                        leader = leader_of(&*c, RangeId(range)).unwrap_or(1);
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
    let secs = env_u64("FLOTILLA_BENCH_SECS").unwrap_or(if quick { 1 } else { 10 });
    let tick = Duration::from_millis(env_u64("FLOTILLA_BENCH_TICK_MS").unwrap_or(100));
    let max_batch = env_u64("FLOTILLA_BENCH_MAX_BATCH").map(|n| n as usize);
    let max_batch_shown = max_batch.unwrap_or(NodeGroupConfig::default().max_batch_replicas);
    let hb_groups: Vec<usize> = std::env::var("FLOTILLA_BENCH_GROUPS")
        .ok()
        .map(|s| s.split(',').filter_map(|g| g.trim().parse().ok()).collect())
        .unwrap_or_else(|| {
            if quick {
                vec![10, 40]
            } else {
                vec![1_000, 10_000]
            }
        });
    let (tput_groups, proposers) = if quick { (4, 16) } else { (64, 256) };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let mut results = Vec::new();
    rt.block_on(async {
        // Part 1: heartbeat frames as the number of idle groups grows.
        let settle = if quick { tick * 4 } else { tick * 30 };
        for &groups in &hb_groups {
            let h = heartbeats(groups, tick, Duration::from_secs(secs), settle, max_batch).await;
            eprintln!(
                "groups={groups}: {:.1} heartbeat frames/s per node pair (per node {:.1}..{:.1}), \
                 {:.1} messages+heartbeats per frame, {:.0} heartbeats/s, {:.0} other messages/s, \
                 {:.2} cores, {} elections in the window, setup {:.1}s",
                h.per_pair_per_sec,
                h.per_node_pair_min,
                h.per_node_pair_max,
                h.messages_per_batch,
                h.heartbeats_per_sec,
                h.messages_per_sec,
                h.cpu_cores,
                h.elections,
                h.setup_secs
            );
            results.push(format!(
                "RESULT {{\"groups\":{},\"heartbeat_rpcs_per_pair_per_sec\":{:.2},\"messages_per_batch\":{:.2},\
                 \"per_node_pair_min\":{:.2},\"per_node_pair_max\":{:.2},\"frames_per_pair_per_sec\":{:.2},\"frames_per_sec\":{:.1},\
                 \"heartbeats_per_sec\":{:.0},\"other_messages_per_sec\":{:.1},\"pings\":{},\
                 \"bytes_per_frame\":{:.0},\"cpu_cores\":{:.2},\"elections_in_window\":{},\
                 \"tick_interval_ms\":{},\"max_batch_replicas\":{},\"seconds\":{:.1}}}",
                h.groups,
                h.per_pair_per_sec,
                h.messages_per_batch,
                h.per_node_pair_min,
                h.per_node_pair_max,
                h.frames_per_pair_per_sec,
                h.frames_per_sec,
                h.heartbeats_per_sec,
                h.messages_per_sec,
                h.pings,
                h.bytes_per_frame,
                h.cpu_cores,
                h.elections,
                tick.as_millis(),
                max_batch_shown,
                h.secs
            ));
        }

        // Part 2: the same proposal workload over gRPC and over the in-memory network.
        let tput_tick = Duration::from_millis(100);
        let mut tput = Vec::new();
        {
            let c = Arc::new(Grpc::start(move |id| config(id, tput_tick)));
            let ranges = bootstrap(&*c, tput_groups);
            wait_settled(&*c, &ranges, Duration::from_secs(120)).await;
            let s0 = c.stats();
            let (ops, p50, p99) = run(c.clone(), tput_groups, proposers, secs).await;
            let s1 = c.stats();
            c.shutdown();
            let sum = |s: &[GrpcStats], f: fn(&GrpcStats) -> u64| s.iter().map(f).sum::<u64>();
            let frames = sum(&s1, |s| s.frames_sent) - sum(&s0, |s| s.frames_sent);
            let items = sum(&s1, |s| s.frame_messages + s.frame_heartbeats)
                - sum(&s0, |s| s.frame_messages + s.frame_heartbeats);
            let mpf = if frames == 0 { 0.0 } else { items as f64 / frames as f64 };
            eprintln!(
                "grpc: {ops:.0} proposals/s, p50 {p50:.2} ms, p99 {p99:.2} ms, {mpf:.1} messages per frame"
            );
            tput.push(("grpc", ops, p50, p99, format!(",\"messages_per_frame\":{mpf:.2}")));
        }
        {
            let c = Arc::new(Cluster::with_config(
                NODES,
                move |id| config(id, tput_tick),
                Default::default(),
            ));
            let ranges = bootstrap(&*c, tput_groups);
            wait_settled(&*c, &ranges, Duration::from_secs(120)).await;
            let (ops, p50, p99) = run(c.clone(), tput_groups, proposers, secs).await;
            for id in 1..=NODES as u64 {
                c.node(id).shutdown();
            }
            eprintln!("memory: {ops:.0} proposals/s, p50 {p50:.2} ms, p99 {p99:.2} ms");
            tput.push(("memory", ops, p50, p99, String::new()));
        }
        for (net, ops, p50, p99, extra) in &tput {
            results.push(format!(
                "RESULT {{\"network\":\"{net}\",\"proposals_per_sec\":{ops:.1},\"p50_ms\":{p50:.3},\
                 \"p99_ms\":{p99:.3},\"groups\":{tput_groups},\"proposers\":{proposers},\
                 \"seconds\":{secs}{extra}}}"
            ));
        }
        if let [(_, grpc, ..), (_, mem, ..)] = tput.as_slice() {
            results.push(format!(
                "RESULT {{\"grpc_to_memory_throughput_ratio\":{:.3}}}",
                grpc / mem
            ));
        }
    });
    for r in &results {
        println!("{r}");
    }
}
