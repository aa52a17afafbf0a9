//! Placement under load (issue 14's measurement): three gRPC nodes in this process with many
//! small ranges and continuous writers; then
//! - **add two nodes** (empty, joining through the node registry as `--join` does): the time until
//!   replica counts and leader counts are each within ±10% of the mean (at least ±1), the
//!   moves and transfers it took, and the writers' p99 latency before and during;
//! - **decommission node 3** (marked draining in the node registry, as `flotilla-ctl node
//!   decommission` does): the time until it holds no replica (the system range's included)
//!   and no leadership; then it is marked removed and stopped;
//! - **kill one node** (shut down, never back): the time until every range is back at three
//!   voters, none on the dead node (`down_time` set to 5 s here);
//! - then the writers stop and every acknowledged write is read back: `lost` must be 0.
//!
//! Throughout, every 100 ms, the range table the live nodes hold together must tile the key
//! space (`table_error`): `RESULT {"event":"range_table","checks":N,"violations":0}`.
//!
//! Run: `cargo bench --bench placement` (1,000 ranges; `FLOTILLA_PLACEMENT_RANGES` overrides).
//! Prints `RESULT {"event":"add_nodes",...}`, `RESULT {"event":"decommission",...}`,
//! `RESULT {"event":"node_down",...}` and `RESULT {"event":"verify",...}` lines.
//!
//! `cargo bench --bench placement -- merge` measures automatic merges instead: five nodes, the
//! ranges' replicas laid out round the ring (range i on nodes i, i+1, i+2 modulo 5, so that
//! every two neighbours differ by a node), writers as above (their data, under a MiB, fits in
//! one range), `merge_below_bytes` 4 MiB and `merge_delay` 15 s. It prints
//! `RESULT {"event":"merge","ranges_before":N,"ranges_after":1,"merge_secs":X,"merges":N,
//! "moves":N,"p99_ms_before":X,"p99_ms_during":X}` (`merge_secs`: from the first merge until
//! one range is left, on three nodes) and the `verify` line.
//! Under `cargo test --benches` (no `--bench` argument) a tiny version runs.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use flotilla::layout::{first_campaigner, range_layout, range_start_key};
use flotilla::proto::meta::{NodeState, RangeDescriptor, ReplicaRole};
use flotilla::schedule::ScheduleConfig;
use flotilla::testing::measure::percentile;
use flotilla::testing::{
    bootstrap_ranges_and_system, bootstrap_spread_layout, local_server_config, node_ids,
    start_servers, test_config,
};
use flotilla::{
    NodeGroup, NodeGroupConfig, NodeId, ReadConsistency, ReplicaId, Server, ServerConfig, StateRole,
};

const WRITERS: usize = 8;
const DOWN_TIME: Duration = Duration::from_secs(5);
const PHASE_LIMIT: Duration = Duration::from_secs(180);

fn node_config(id: u64) -> NodeGroupConfig {
    NodeGroupConfig {
        tick_interval: Duration::from_millis(20),
        ..test_config(id)
    }
}

fn server_config(id: u64, dir: &std::path::Path) -> ServerConfig {
    let mut c = local_server_config(node_config(id), dir);
    c.schedule = ScheduleConfig {
        interval: Duration::from_millis(500),
        stable_time: Duration::from_secs(2),
        down_time: DOWN_TIME,
        // Twice the node defaults' limits and more: small ranges, whose snapshots are a
        // few KB (BENCHMARKS.md has runs with 8 and 4, and the writers' p99 in both).
        max_moves_per_node: 16,
        max_snapshots_per_node: 8,
        max_transfers_per_pass: 16,
        ..ScheduleConfig::default()
    };
    c
}

type Nodes = Arc<Mutex<Vec<Option<Arc<Server>>>>>;

/// Per key: the last acknowledged value, and values written after it with an unknown outcome.
type Acked = HashMap<Vec<u8>, (Vec<u8>, Vec<Vec<u8>>)>;

fn live(nodes: &Nodes) -> Vec<Arc<Server>> {
    nodes.lock().unwrap().iter().flatten().cloned().collect()
}

fn leader_of(nodes: &[Arc<Server>], d: &RangeDescriptor) -> Option<Arc<Server>> {
    nodes
        .iter()
        .find(|n| {
            n.node()
                .status(d.id())
                .is_ok_and(|s| s.role == StateRole::Leader)
        })
        .cloned()
}

/// Per node (index = id - 1): replicas and leaders, from the leaders' descriptors.
fn counts(nodes: &[Arc<Server>], size: usize) -> (Vec<usize>, Vec<usize>, bool) {
    let (mut replicas, mut leaders) = (vec![0; size], vec![0; size]);
    let mut all_led = true;
    for d in all_ranges(nodes) {
        let Some(l) = leader_of(nodes, &d) else {
            all_led = false;
            continue;
        };
        leaders[l.node_id().0 as usize - 1] += 1;
        if let Ok(Some(desc)) = l.node().status(d.id()).map(|s| s.descriptor) {
            for r in &desc.replicas {
                replicas[r.node_id as usize - 1] += 1;
            }
        }
    }
    (replicas, leaders, all_led)
}

/// Every range some live node hosts (a node no longer hosts the ranges moved off it).
fn all_ranges(nodes: &[Arc<Server>]) -> Vec<RangeDescriptor> {
    let mut all = std::collections::BTreeMap::new();
    for n in nodes {
        for d in n.node().ranges() {
            all.entry(d.range_id).or_insert(d);
        }
    }
    all.into_values().collect()
}

fn within(counts: &[usize]) -> bool {
    let mean = counts.iter().sum::<usize>() as f64 / counts.len() as f64;
    counts
        .iter()
        .all(|&c| (c as f64 - mean).abs() <= (mean * 0.1).max(1.0))
}

fn scheduler_actions(nodes: &[Arc<Server>], action: &str) -> usize {
    nodes
        .iter()
        .map(|n| {
            n.placement()
                .events()
                .iter()
                .filter(|e| e.action == action && e.outcome.is_ok())
                .count()
        })
        .sum()
}

/// Latencies (ms) of acknowledged writes, by phase.
#[derive(Default)]
struct Latencies {
    phase: usize,
    samples: Vec<Vec<f64>>,
}

impl Latencies {
    /// The p99 of the first two phases (before, during).
    fn p99s(&self) -> (f64, f64) {
        let p99 = |i: usize| {
            let mut s = self.samples[i].clone();
            s.sort_by(f64::total_cmp);
            percentile(&s, 0.99)
        };
        (p99(0), p99(1))
    }
}

/// The load a run puts on the nodes: writers and the range table's checker.
struct Load {
    stop: Arc<AtomicBool>,
    lat: Arc<Mutex<Latencies>>,
    writers: Vec<tokio::task::JoinHandle<Acked>>,
    checker: tokio::task::JoinHandle<(u64, u64)>,
}

/// Waits until each of the `ranges` ranges has a leader among the `size` nodes, then starts
/// the writers (latencies kept in `phases` phases) and the range table's checker.
async fn load(nodes: &Nodes, size: usize, ranges: usize, phases: usize) -> anyhow::Result<Load> {
    let started = Instant::now();
    while !counts(&live(nodes), size).2 {
        anyhow::ensure!(started.elapsed() < PHASE_LIMIT, "no leader for every range");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    println!(
        "{ranges} ranges on {size} nodes, every one led after {:.1}s",
        started.elapsed().as_secs_f64()
    );
    let stop = Arc::new(AtomicBool::new(false));
    let lat = Arc::new(Mutex::new(Latencies {
        phase: 0,
        samples: vec![Vec::new(); phases],
    }));
    Ok(Load {
        writers: spawn_writers(nodes, ranges, &lat, &stop),
        checker: spawn_table_checker(nodes, &stop),
        stop,
        lat,
    })
}

/// `WRITERS` writers, each on its own keys spread over the `ranges` ranges of the layout,
/// until `stop`; each returns its history (latencies go to `lat`'s current phase).
fn spawn_writers(
    nodes: &Nodes,
    ranges: usize,
    lat: &Arc<Mutex<Latencies>>,
    stop: &Arc<AtomicBool>,
) -> Vec<tokio::task::JoinHandle<Acked>> {
    let mut writers = Vec::new();
    for w in 0..WRITERS {
        let (nodes, stop, lat) = (nodes.clone(), stop.clone(), lat.clone());
        writers.push(tokio::spawn(async move {
            let mut acked = Acked::new();
            let mut seq = 0u64;
            while !stop.load(Ordering::Relaxed) {
                let range = (seq as usize * WRITERS + w) % ranges + 1;
                let mut key = range_start_key(range as u64);
                key.extend_from_slice(format!("/w{w}-{}", seq % 4).as_bytes());
                let value = format!("w{w}:{seq}").into_bytes();
                seq += 1;
                let t = Instant::now();
                let mut ok = false;
                let mut attempt = seq as usize;
                while t.elapsed() < Duration::from_secs(10) && !stop.load(Ordering::Relaxed) {
                    // The key's range as any live node hosting it knows it (with five nodes
                    // and three replicas, node 1 may host none of it), then its leader; else
                    // each node in turn (it forwards to the leader, or says where it is).
                    let all = live(&nodes);
                    attempt += 1;
                    let target = all
                        .iter()
                        .find_map(|n| n.node().range_of(&key).ok())
                        .and_then(|d| leader_of(&all, &d))
                        .unwrap_or_else(|| all[attempt % all.len()].clone());
                    if target.node().put(&key, &value).await.is_ok() {
                        ok = true;
                        break;
                    }
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
                let entry = acked.entry(key).or_default();
                if ok {
                    let mut l = lat.lock().unwrap();
                    let p = l.phase;
                    l.samples[p].push(t.elapsed().as_secs_f64() * 1000.0);
                    *entry = (value, Vec::new());
                } else {
                    entry.1.push(value);
                }
            }
            acked
        }));
    }
    writers
}

/// The range table the live nodes hold together must tile the key space: for each range id
/// the newest descriptor any node holds (highest version, then conf_ver), a merge source
/// dropped once a range covering it exists (its target took it over), sorted by start key:
/// the first starts at the beginning, each ends where the next starts, the last at the end.
fn table_error(nodes: &[Arc<Server>]) -> Option<String> {
    let mut newest = std::collections::BTreeMap::<u64, RangeDescriptor>::new();
    let epoch = |d: &RangeDescriptor| d.epoch.as_ref().map(|e| (e.version, e.conf_ver));
    for n in nodes {
        for d in n.node().ranges() {
            match newest.get(&d.range_id) {
                Some(old) if epoch(old) >= epoch(&d) => {}
                _ => {
                    newest.insert(d.range_id, d);
                }
            }
        }
    }
    let covers = |a: &RangeDescriptor, b: &RangeDescriptor| {
        a.range_id != b.range_id
            && a.start_key <= b.start_key
            && (a.end_key.is_empty() || (!b.end_key.is_empty() && a.end_key >= b.end_key))
    };
    let all: Vec<&RangeDescriptor> = newest.values().collect();
    let mut table: Vec<&RangeDescriptor> = all
        .iter()
        .copied()
        .filter(|d| d.merge.is_none() || !all.iter().any(|o| covers(o, d)))
        .collect();
    table.sort_by(|a, b| a.start_key.cmp(&b.start_key));
    let show = |d: &RangeDescriptor| {
        format!(
            "{} [{}, {})",
            d.id(),
            String::from_utf8_lossy(&d.start_key),
            String::from_utf8_lossy(&d.end_key)
        )
    };
    let first = table.first()?;
    if !first.start_key.is_empty() {
        return Some(format!("nothing before {}", show(first)));
    }
    for w in table.windows(2) {
        if w[0].end_key.is_empty() || w[0].end_key != w[1].start_key {
            return Some(format!("{} then {}", show(w[0]), show(w[1])));
        }
    }
    let last = table.last()?;
    (!last.end_key.is_empty()).then(|| format!("nothing after {}", show(last)))
}

/// Checks `table_error` every 100 ms until `stop`: (checks, violations), the first few
/// violations printed.
fn spawn_table_checker(
    nodes: &Nodes,
    stop: &Arc<AtomicBool>,
) -> tokio::task::JoinHandle<(u64, u64)> {
    let (nodes, stop) = (nodes.clone(), stop.clone());
    tokio::spawn(async move {
        let (mut checks, mut violations) = (0u64, 0u64);
        while !stop.load(Ordering::Relaxed) {
            let all = live(&nodes);
            let found = tokio::task::spawn_blocking(move || table_error(&all))
                .await
                .unwrap_or(None);
            checks += 1;
            if let Some(e) = found {
                violations += 1;
                if violations <= 5 {
                    eprintln!("RANGE TABLE: {e}");
                }
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        (checks, violations)
    })
}

/// The end of a run: stops the writers and the checker, prints the range table's and the
/// verification's RESULT lines, stops the nodes, and fails on a broken table or a lost write.
async fn finish(
    nodes: &Nodes,
    stop: Arc<AtomicBool>,
    checker: tokio::task::JoinHandle<(u64, u64)>,
    writers: Vec<tokio::task::JoinHandle<Acked>>,
) -> anyhow::Result<()> {
    stop.store(true, Ordering::Relaxed);
    let (checks, broken) = checker.await?;
    println!("RESULT {{\"event\":\"range_table\",\"checks\":{checks},\"violations\":{broken}}}");
    let (acked, lost) = verify(nodes, writers).await?;
    println!("RESULT {{\"event\":\"verify\",\"keys\":{acked},\"lost\":{lost}}}");
    for n in &live(nodes) {
        n.shutdown();
    }
    anyhow::ensure!(lost == 0, "{lost} acknowledged writes lost");
    anyhow::ensure!(broken == 0, "the range table broke {broken} times");
    Ok(())
}

/// Waits for the writers (stopped) and reads back every acknowledged write through whichever
/// live node hosts its range now: (acknowledged, lost).
async fn verify(
    nodes: &Nodes,
    writers: Vec<tokio::task::JoinHandle<Acked>>,
) -> anyhow::Result<(u64, u64)> {
    let mut histories = Vec::new();
    for w in writers {
        histories.push(w.await?);
    }
    let all = live(nodes);
    let (mut acked, mut lost) = (0u64, 0u64);
    for h in &histories {
        for (k, (v, unknown)) in h {
            if v.is_empty() {
                continue;
            }
            acked += 1;
            let mut got = None;
            for attempt in 0..200usize {
                // Through whichever node hosts the key's range now (a range may have moved
                // off any one node).
                let n = &all[attempt % all.len()];
                if let Ok(g) = n.node().get(k, ReadConsistency::Linearizable).await {
                    got = Some(g);
                    break;
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            let ok = matches!(&got, Some(Some(g)) if g == v || unknown.contains(g));
            if !ok {
                lost += 1;
                eprintln!(
                    "LOST {}: expected {:?}, got {got:?}",
                    String::from_utf8_lossy(k),
                    String::from_utf8_lossy(v)
                );
            }
        }
    }
    Ok((acked, lost))
}

/// The `merge` run (see the module doc).
async fn merge_run(full: bool, ranges: usize) -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let delay = Duration::from_secs(if full { 15 } else { 2 });
    let configs = (1..=5)
        .map(|id| {
            let mut c = server_config(id, dir.path());
            c.schedule.merge_below_bytes = 4 << 20;
            c.schedule.merge_delay = delay;
            c
        })
        .collect();
    let servers = start_servers(configs, tokio::runtime::Handle::current())?;
    let members = node_ids(3);
    let mut layout = range_layout(ranges, &members);
    for d in &mut layout {
        for (k, r) in d.replicas.iter_mut().enumerate() {
            let n = (d.range_id - 1 + k as u64) % 5 + 1;
            (r.replica_id, r.node_id) = (n, n);
        }
        d.next_replica_id = 6;
    }
    let groups: Vec<&NodeGroup> = servers.iter().map(|n| &**n.node()).collect();
    let first = |d: &RangeDescriptor| d.replicas.first().map(|r| ReplicaId(r.replica_id));
    bootstrap_spread_layout(&groups, &layout, &members, first)?;
    let nodes: Nodes = Arc::new(Mutex::new(
        servers.into_iter().map(|s| Some(Arc::new(s))).collect(),
    ));
    let started = Instant::now();
    let Load {
        stop,
        lat,
        writers,
        checker,
    } = load(&nodes, 5, ranges, 2).await?;
    // Until the first merge (after merge_delay): the latencies before.
    let merges = |all: &[Arc<Server>]| scheduler_actions(all, "merge");
    while merges(&live(&nodes)) == 0 {
        anyhow::ensure!(started.elapsed() < PHASE_LIMIT, "no merge");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    lat.lock().unwrap().phase = 1;
    let first_merge = Instant::now();
    // The writers' data (under a MiB in all) fits in one range: until every range merged.
    let show = |all: &[Arc<Server>]| {
        all_ranges(all)
            .iter()
            .map(|d| {
                let on: Vec<u64> = d.replicas.iter().map(|r| r.node_id).collect();
                let led = leader_of(all, d).map(|l| l.node_id().0);
                format!("{} on {on:?} led on {led:?}", d.id())
            })
            .collect::<Vec<_>>()
    };
    loop {
        let all = live(&nodes);
        let left = all_ranges(&all);
        if left.len() == 1 && left[0].replicas.len() == 3 {
            break;
        }
        anyhow::ensure!(
            first_merge.elapsed() < 3 * PHASE_LIMIT,
            "still {} ranges after {:?}: {:#?}",
            left.len(),
            3 * PHASE_LIMIT,
            show(&all)
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let merge_secs = first_merge.elapsed().as_secs_f64();
    let count = 1;
    let all = live(&nodes);
    let (done, moves) = (merges(&all), scheduler_actions(&all, "promote"));
    let (p99_before, p99_during) = lat.lock().unwrap().p99s();
    let failed = all
        .iter()
        .flat_map(|n| n.placement().events())
        .filter(|e| e.action == "merge" && e.outcome.is_err())
        .count();
    println!(
        "merged down to {count} ranges in {merge_secs:.1}s ({failed} merges failed and retried)"
    );
    println!(
        "RESULT {{\"event\":\"merge\",\"ranges_before\":{ranges},\"ranges_after\":{count},\"merge_secs\":{merge_secs:.1},\"merges\":{done},\"moves\":{moves},\"p99_ms_before\":{p99_before:.1},\"p99_ms_during\":{p99_during:.1}}}"
    );
    finish(&nodes, stop, checker, writers).await
}

#[tokio::main(flavor = "multi_thread", worker_threads = 4)]
async fn main() -> anyhow::Result<()> {
    let full = std::env::args().any(|a| a == "--bench");
    let ranges: usize = std::env::var("FLOTILLA_PLACEMENT_RANGES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(if full { 1000 } else { 12 });
    if std::env::args().any(|a| a == "merge") {
        return merge_run(full, ranges).await;
    }
    let dir = tempfile::tempdir()?;
    let first: Vec<Server> = start_servers(
        (1..=3).map(|id| server_config(id, dir.path())).collect(),
        tokio::runtime::Handle::current(),
    )?;
    let members = node_ids(3);
    let layout = range_layout(ranges, &members);
    // With the system range (the node registry): decommissioning goes through it.
    for n in &first {
        bootstrap_ranges_and_system(n.node(), layout.clone())?;
    }
    for d in &layout {
        if let Some(c) = first_campaigner(d.id(), &members) {
            first[c.0 as usize - 1].node().campaign(d.id())?;
        }
    }
    let nodes: Nodes = Arc::new(Mutex::new(
        first.into_iter().map(|s| Some(Arc::new(s))).collect(),
    ));
    let Load {
        stop,
        lat,
        writers,
        checker,
    } = load(&nodes, 3, ranges, 3).await?;
    tokio::time::sleep(Duration::from_secs(if full { 10 } else { 2 })).await;

    // Add nodes 4 and 5: empty, each joining through node 1 (`--join`: the registry gives it
    // its id and the others' addresses, and the others learn its address from the registry).
    lat.lock().unwrap().phase = 1;
    let added_at = Instant::now();
    let join_at = live(&nodes)[0].client_addr().to_string();
    for expected in 4..=5 {
        let mut config = server_config(0, dir.path());
        config.data_dir = dir.path().join(format!("joined-{expected}"));
        config.join = Some(join_at.clone());
        // A joining node records its raft address before binding: a fixed free port.
        config.raft_addr = flotilla_benchkit::free_addr("127.0.0.1")?;
        flotilla::server::join(&mut config).await?;
        anyhow::ensure!(
            config.node.node_id == expected,
            "joined as {}, not {expected}",
            config.node.node_id
        );
        let s = Server::bind(config, tokio::runtime::Handle::current())?.start()?;
        nodes.lock().unwrap().push(Some(Arc::new(s)));
    }
    let balanced_secs = loop {
        let (r, l, all_led) = counts(&live(&nodes), 5);
        if all_led && within(&r) && within(&l) {
            break added_at.elapsed().as_secs_f64();
        }
        anyhow::ensure!(
            added_at.elapsed() < PHASE_LIMIT,
            "not balanced after {PHASE_LIMIT:?}: replicas {r:?}, leaders {l:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let all = live(&nodes);
    let (r, l, _) = counts(&all, 5);
    let moves = scheduler_actions(&all, "promote");
    let transfers = scheduler_actions(&all, "transfer-leader");
    let (p99_before, p99_during) = {
        let mut l = lat.lock().unwrap();
        l.phase = 2;
        l.p99s()
    };
    println!("balanced after {balanced_secs:.1}s: replicas {r:?}, leaders {l:?}");
    println!(
        "RESULT {{\"event\":\"add_nodes\",\"ranges\":{ranges},\"balanced_secs\":{balanced_secs:.1},\"moves\":{moves},\"transfers\":{transfers},\"p99_ms_before\":{p99_before:.1},\"p99_ms_during\":{p99_during:.1}}}"
    );

    // Decommission node 3 (index 2): draining in the registry (through any node's replica of
    // the system range), then until it holds nothing; then removed and stopped.
    let moves_before = scheduler_actions(&live(&nodes), "promote");
    let drain_at = Instant::now();
    loop {
        let any = live(&nodes)[0].clone();
        match any
            .node()
            .set_node_state(NodeId(3), NodeState::Draining)
            .await
        {
            Ok(_) => break,
            Err(e) => anyhow::ensure!(
                drain_at.elapsed() < PHASE_LIMIT,
                "node 3 not marked draining: {e}"
            ),
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let drained_secs = loop {
        let three = nodes.lock().unwrap()[2].clone().expect("node 3 runs");
        let st = three.node().node_status();
        if st.replicas == 0 && st.leaders == 0 && st.system.is_none() {
            break drain_at.elapsed().as_secs_f64();
        }
        anyhow::ensure!(
            drain_at.elapsed() < PHASE_LIMIT,
            "node 3 not drained after {PHASE_LIMIT:?}: {} replicas, {} leaders, system {:?}",
            st.replicas,
            st.leaders,
            st.system
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    live(&nodes)[0]
        .node()
        .set_node_state(NodeId(3), NodeState::Removed)
        .await?;
    let drain_moves = scheduler_actions(&live(&nodes), "promote").saturating_sub(moves_before);
    let drained = nodes.lock().unwrap()[2].take().expect("node 3 runs");
    println!(
        "RESULT {{\"event\":\"decommission\",\"ranges\":{ranges},\"drained_secs\":{drained_secs:.1},\"moves\":{drain_moves}}}"
    );
    drained.shutdown();

    // Kill node 5 (index 4): never back.
    let killed = nodes.lock().unwrap()[4].take().expect("node 5 runs");
    let killed_at = Instant::now();
    killed.shutdown();
    let repair_secs = loop {
        let all = live(&nodes);
        let repaired = all_ranges(&all).iter().all(|d| {
            leader_of(&all, d)
                .and_then(|l| l.node().status(d.id()).ok()?.descriptor)
                .is_some_and(|d| {
                    let voters: Vec<u64> = d
                        .replicas
                        .iter()
                        .filter(|r| r.role == ReplicaRole::Voter as i32)
                        .map(|r| r.node_id)
                        .collect();
                    voters.len() == 3 && !voters.contains(&5) && d.replicas.len() == 3
                })
        });
        if repaired {
            break killed_at.elapsed().as_secs_f64();
        }
        if killed_at.elapsed() >= PHASE_LIMIT {
            let left: Vec<String> = all_ranges(&all)
                .iter()
                .filter_map(|d| {
                    let l = leader_of(&all, d);
                    let desc = l
                        .as_ref()
                        .and_then(|l| l.node().status(d.id()).ok()?.descriptor);
                    let ok = desc.as_ref().is_some_and(|d| {
                        d.replicas.len() == 3 && d.replicas.iter().all(|r| r.node_id != 5)
                    });
                    (!ok).then(|| {
                        // Each live replica's view: node, role, term, leader, asleep, voters.
                        let views: Vec<String> = all
                            .iter()
                            .filter_map(|n| {
                                let st = n.node().status(d.id()).ok()?;
                                Some(format!(
                                    "n{} {:?} t{} leader {:?} asleep {} on {:?}",
                                    n.node_id(),
                                    st.role,
                                    st.term,
                                    st.leader_node,
                                    st.asleep,
                                    st.descriptor.map(|d| d
                                        .replicas
                                        .iter()
                                        .map(|r| r.node_id)
                                        .collect::<Vec<_>>())
                                ))
                            })
                            .collect();
                        let events: Vec<String> = all
                            .iter()
                            .chain([&drained, &killed])
                            .flat_map(|n| {
                                let id = n.node_id();
                                n.placement()
                                    .events()
                                    .into_iter()
                                    .filter(|e| e.range == d.id())
                                    .map(move |e| {
                                        format!("n{id} {} {} {:?}", e.action, e.detail, e.outcome)
                                    })
                            })
                            .collect();
                        format!(
                            "{} led by {:?}: {views:?} events {events:#?}",
                            d.id(),
                            l.map(|l| l.node_id())
                        )
                    })
                })
                .take(5)
                .collect();
            anyhow::bail!("not repaired after {PHASE_LIMIT:?}: {left:#?}");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    println!(
        "RESULT {{\"event\":\"node_down\",\"ranges\":{ranges},\"down_time_secs\":{},\"repaired_secs\":{repair_secs:.1},\"after_down_time_secs\":{:.1}}}",
        DOWN_TIME.as_secs(),
        repair_secs - DOWN_TIME.as_secs_f64()
    );

    finish(&nodes, stop, checker, writers).await
}
