//! Where the bytes of an idle group go: a counting allocator measures the live heap a NodeGroup
//! holds per sleeping replica, and, apart, what its parts cost: raft-rs's bare `RawNode` (one
//! voter and three), a range descriptor, and the RocksDB engine (RSS that is not heap of ours).
//!
//! Run: `cargo bench --bench memory` (N = 20,000 single-voter and 3,000 three-voter groups on
//! the in-memory network); prints `RESULT {json}` lines with bytes per replica.

#![allow(unsafe_code)] // the counting allocator only

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::Duration;

use flotilla::layout::range_layout;
use flotilla::testing::measure::rss_bytes;
use flotilla::testing::{node_ids, wait_until, Cluster};
use flotilla::{NodeGroupConfig, NodeId, RangeId};

/// The system allocator, counting live bytes.
struct Counting;

static LIVE: AtomicI64 = AtomicI64::new(0);

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        LIVE.fetch_add(layout.size() as i64, Ordering::Relaxed);
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        LIVE.fetch_sub(layout.size() as i64, Ordering::Relaxed);
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        LIVE.fetch_add(new_size as i64 - layout.size() as i64, Ordering::Relaxed);
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

fn live() -> i64 {
    LIVE.load(Ordering::Relaxed)
}

/// Live heap per replica of a NodeGroup hosting `groups` sleeping groups of `voters` voters
/// (the other voters on other NodeGroups of the same process: their heap is counted apart).
async fn node_group(groups: usize, voters: usize) -> (f64, f64, usize) {
    let c = Cluster::with_config(
        voters,
        |n| NodeGroupConfig {
            tick_interval: Duration::from_millis(20),
            ..NodeGroupConfig::new(n)
        },
        Default::default(),
    );
    tokio::time::sleep(Duration::from_millis(500)).await;
    let (heap0, rss0) = (live(), rss_bytes());
    let layout = range_layout(groups, &node_ids(voters));
    for chunk in layout.chunks(1000) {
        for n in 1..=voters as u64 {
            c.node(n).bootstrap_ranges(chunk.to_vec()).unwrap();
        }
    }
    let nodes: Vec<NodeId> = node_ids(voters);
    for d in &layout {
        let n = flotilla::layout::first_campaigner(d.id(), &nodes).unwrap();
        let _ = c.node(n.0).campaign(d.id());
    }
    let asleep = wait_until(Duration::from_secs(600), || {
        (1..=voters as u64).all(|n| {
            let st = c.node(n).node_status();
            st.awake == 0 && st.queued_wakes == 0
        }) && (1..=voters as u64)
            .map(|n| c.node(n).node_status().leaders)
            .sum::<usize>()
            == groups
    })
    .await;
    assert!(asleep, "not every group elected and fell asleep");
    tokio::time::sleep(Duration::from_millis(500)).await;
    let replicas = groups * voters;
    let heap = (live() - heap0) as f64 / replicas as f64;
    let rss = rss_bytes().saturating_sub(rss0) as f64 / replicas as f64;
    let _ = c.node(1).status(RangeId(1));
    (heap, rss, replicas)
}

/// Live heap of a bare raft-rs `RawNode` on an empty `MemStorage`, per node.
fn raw_nodes(count: usize, voters: u64) -> f64 {
    let logger = slog::Logger::root(slog::Discard, slog::o!());
    let before = live();
    let mut nodes = Vec::with_capacity(count);
    let vec_bytes = live() - before;
    for _ in 0..count {
        let storage = raft::storage::MemStorage::new_with_conf_state(
            raft::prelude::ConfState::from(((1..=voters).collect::<Vec<_>>(), vec![])),
        );
        let cfg = raft::Config {
            id: 1,
            election_tick: 10,
            heartbeat_tick: 2,
            max_inflight_msgs: 32,
            ..Default::default()
        };
        nodes.push(raft::RawNode::new(&cfg, storage, &logger).unwrap());
    }
    let per = (live() - before - vec_bytes) as f64 / count as f64;
    drop(nodes);
    per
}

/// Live heap of a range descriptor of `voters` replicas (as held once by the router and once
/// by the group's storage).
fn descriptor(voters: usize) -> f64 {
    let layout = range_layout(2, &node_ids(voters));
    let before = live();
    let copies: Vec<_> = (0..1000).map(|_| Box::new(layout[1].clone())).collect();
    let per = (live() - before) as f64 / 1000.0;
    drop(copies);
    per
}

fn main() {
    let quick = !std::env::args().any(|a| a == "--bench");
    let (single, triple) = if quick { (500, 100) } else { (20_000, 3_000) };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let raw1 = raw_nodes(1000, 1);
    let raw3 = raw_nodes(1000, 3);
    let desc1 = descriptor(1);
    let desc3 = descriptor(3);
    let (heap1, rss1, n1) = rt.block_on(node_group(single, 1));
    let (heap3, rss3, n3) = rt.block_on(node_group(triple, 3));
    println!(
        "RESULT {{\"voters\":1,\"replicas\":{n1},\"heap_bytes_per_replica\":{heap1:.0},\"rss_bytes_per_replica\":{rss1:.0},\"raw_node_bytes\":{raw1:.0},\"descriptor_bytes\":{desc1:.0}}}"
    );
    println!(
        "RESULT {{\"voters\":3,\"replicas\":{n3},\"heap_bytes_per_replica\":{heap3:.0},\"rss_bytes_per_replica\":{rss3:.0},\"raw_node_bytes\":{raw3:.0},\"descriptor_bytes\":{desc3:.0}}}"
    );
}
