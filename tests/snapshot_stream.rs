//! End to end over gRPC: a node that was down while its group compacted the log catches up by
//! a snapshot too large for one frame, streamed in chunks on the Snapshot RPC.
//!
//! A plain `#[test]` with its own tokio runtime: stopping a node from outside the runtime
//! makes its transport wait until the server has released the port, so that the node can be
//! restarted on the same address (the one its peers know).

use std::net::SocketAddr;
use std::path::Path;
use std::time::{Duration, Instant};

use flotilla::layout::range_layout;
use flotilla::proto::meta::RangeDescriptor;
use flotilla::testing::{local_server_config, node_ids, start_servers, test_config};
use flotilla::transport::GrpcConfig;
use flotilla::{NodeGroupConfig, NodeId, ReadConsistency, Server, ServerConfig, StateRole};

const T: Duration = Duration::from_secs(30);
const KEYS: usize = 300;
const VALUE_BYTES: usize = 10 << 10;

/// Frames of 256 KiB: the range (about 3 MiB) is a dozen frames big.
fn grpc() -> GrpcConfig {
    GrpcConfig {
        max_frame_bytes: 256 << 10,
        snapshot_chunk_bytes: 64 << 10,
        reconnect_backoff_min: Duration::from_millis(10),
        reconnect_backoff_max: Duration::from_millis(200),
        ..GrpcConfig::default()
    }
}

/// Appends stay well within a frame.
fn config(node: u64) -> NodeGroupConfig {
    NodeGroupConfig {
        max_size_per_msg: 64 << 10,
        max_proposal_bytes: 32 << 10,
        ..test_config(node)
    }
}

/// Node `node` of the test, its engine in `dir`, on the transport settings above.
fn server_config(node: u64, dir: &Path) -> ServerConfig {
    ServerConfig {
        grpc: grpc(),
        ..local_server_config(config(node), dir)
    }
}

fn key(i: usize) -> Vec<u8> {
    format!("k{i:05}").into_bytes()
}

fn value(i: usize) -> Vec<u8> {
    let mut v = vec![(i % 251) as u8; VALUE_BYTES];
    v[..8].copy_from_slice(&(i as u64).to_be_bytes());
    v
}

fn leader(nodes: &[Option<Server>], range: &RangeDescriptor) -> Option<usize> {
    nodes.iter().position(|n| {
        n.as_ref().is_some_and(|n| {
            n.node()
                .status(range.id())
                .is_ok_and(|s| s.role == StateRole::Leader)
        })
    })
}

async fn put(nodes: &[Option<Server>], range: &RangeDescriptor, i: usize) {
    let deadline = Instant::now() + T;
    loop {
        if let Some(l) = leader(nodes, range) {
            let node = nodes[l].as_ref().unwrap().node();
            if node.put(&key(i), &value(i)).await.is_ok() {
                return;
            }
        }
        assert!(Instant::now() < deadline, "put {i} did not succeed");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[test]
fn a_restarted_node_catches_up_by_a_snapshot_streamed_in_chunks() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let configs = (1..=3).map(|n| server_config(n, dir.path())).collect();
    let nodes = start_servers(configs, rt.handle().clone()).expect("start 3 nodes");
    let addrs: Vec<SocketAddr> = nodes.iter().map(|n| n.raft_addr()).collect();
    let mut nodes: Vec<Option<Server>> = nodes.into_iter().map(Some).collect();
    let range = range_layout(1, &node_ids(3)).remove(0);
    for n in nodes.iter().flatten() {
        n.node().bootstrap_range(range.clone()).unwrap();
    }
    nodes[0]
        .as_ref()
        .unwrap()
        .node()
        .campaign(range.id())
        .unwrap();
    let deadline = Instant::now() + T;
    while leader(&nodes, &range).is_none() {
        assert!(Instant::now() < deadline, "no leader elected");
        std::thread::sleep(Duration::from_millis(10));
    }
    rt.block_on(put(&nodes, &range, 0));

    // Node 3 goes down (from outside the runtime: its port is free once this returns).
    nodes[2].take().unwrap().shutdown();

    rt.block_on(async {
        for i in 1..KEYS {
            put(&nodes, &range, i).await;
        }
    });
    // Both remaining logs forget the entries node 3 misses: only a snapshot can bring it up.
    for n in nodes.iter().flatten() {
        rt.block_on(n.node().compact_log(range.id())).unwrap();
    }

    let restart = ServerConfig {
        raft_addr: addrs[2],
        peers: [
            (NodeId(1), addrs[0].to_string()),
            (NodeId(2), addrs[1].to_string()),
        ]
        .into(),
        ..server_config(3, dir.path())
    };
    let n3 = Server::start(restart, rt.handle().clone()).expect("restart node 3 on its address");
    let t3 = n3.transport().clone();
    nodes[2] = Some(n3);
    assert!(
        t3.wait_for_stats(T, |s| s.snapshots_received >= 1),
        "node 3 got no snapshot: {:?}",
        t3.stats()
    );
    let s3 = t3.stats();
    let frame = grpc().max_frame_bytes as u64;
    assert!(
        s3.snapshot_chunks_received > 1 && s3.snapshot_bytes_received > 4 * frame,
        "the snapshot is several frames big and came in chunks: {s3:?}"
    );
    assert_eq!(s3.snapshots_refused(), 0, "{s3:?}");
    // The sender's report follows the receiver's ack.
    let reported = || {
        nodes[..2]
            .iter()
            .flatten()
            .map(|n| n.transport().stats().snapshots_sent)
            .sum::<u64>()
            >= 1
    };
    let deadline = Instant::now() + T;
    while !reported() {
        assert!(
            Instant::now() < deadline,
            "the sender never heard the snapshot arrived"
        );
        std::thread::sleep(Duration::from_millis(10));
    }

    // Node 3 serves every key, with the value written while it was down.
    let n3 = nodes[2].as_ref().unwrap().node();
    rt.block_on(async {
        for i in 0..KEYS {
            let deadline = Instant::now() + T;
            let got = loop {
                match n3.get(&key(i), ReadConsistency::Linearizable).await {
                    Ok(v) => break v,
                    Err(e) => assert!(Instant::now() < deadline, "read {i} on node 3: {e}"),
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            };
            assert!(
                got == Some(value(i)),
                "node 3 has the wrong value of key {i}"
            );
        }
    });
    let st = n3.status(range.id()).unwrap();
    assert!(st.applied >= KEYS as u64, "{st:?}");

    for n in nodes.iter().flatten() {
        n.shutdown();
    }
}
