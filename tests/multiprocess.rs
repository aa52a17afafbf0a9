//! A real cluster of processes: three `flotilla-node` processes on 127.0.0.1 (free ports
//! picked at run time) host 1,000 groups; a client writes and reads through them over gRPC;
//! one node is killed with SIGKILL, writes continue on the other two, the node restarts from
//! its data directory and catches up, and every acknowledged write is readable afterwards.
//!
//! A write is acknowledged only after it was applied on its leader, which needs it fsynced on a
//! quorum: that is why a SIGKILL of any one node cannot lose it.

use std::net::SocketAddr;
use std::path::Path;
use std::time::{Duration, Instant};

use flotilla_benchkit::nodes::{Layout, NodeProcs};

use flotilla::proto::admin::admin_client::AdminClient;
use flotilla::proto::admin::RangesRequest;
use flotilla::proto::kv::kv_client::KvClient;
use flotilla::proto::kv::{GetRequest, PutRequest, StatusRequest};
use flotilla::testing::key_in_range;
use tonic::transport::Channel;

const RANGES: usize = 1000;

async fn connect(addr: SocketAddr, timeout: Duration) -> KvClient<Channel> {
    let deadline = Instant::now() + timeout;
    loop {
        match KvClient::connect(format!("http://{addr}")).await {
            Ok(c) => return c,
            Err(e) if Instant::now() >= deadline => panic!("cannot connect to {addr}: {e}"),
            Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    }
}

async fn put_any(
    clients: &mut [KvClient<Channel>],
    alive: &[usize],
    key: &[u8],
    value: &[u8],
    timeout: Duration,
) -> bool {
    let deadline = Instant::now() + timeout;
    let mut i = 0;
    while Instant::now() < deadline {
        let c = &mut clients[alive[i % alive.len()]];
        let req = PutRequest {
            key: key.to_vec().into(),
            value: value.to_vec().into(),
            client_id: 0,
            seq: 0,
            route: None,
        };
        if c.put(req).await.is_ok() {
            return true;
        }
        i += 1;
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    false
}

async fn get(client: &mut KvClient<Channel>, key: &[u8], timeout: Duration) -> Option<Vec<u8>> {
    let deadline = Instant::now() + timeout;
    loop {
        match client
            .get(GetRequest {
                key: key.to_vec().into(),
                stale: false,
                route: None,
                consistency: 0,
            })
            .await
        {
            Ok(r) => {
                let r = r.into_inner();
                return r.found.then(|| r.value.to_vec());
            }
            Err(e) if Instant::now() >= deadline => {
                panic!("read of {} failed: {e}", String::from_utf8_lossy(key))
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(20)).await,
        }
    }
}

async fn wait_leaders(clients: &mut [KvClient<Channel>], alive: &[usize], timeout: Duration) {
    let deadline = Instant::now() + timeout;
    loop {
        let mut leaders = 0;
        for &i in alive {
            if let Ok(s) = clients[i].status(StatusRequest {}).await {
                leaders += s.into_inner().leaders;
            }
        }
        if leaders >= RANGES as u64 {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "only {leaders} of {RANGES} ranges have a leader"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Three nodes on free ports that bootstrap `ranges` ranges, not started yet; and their
/// client addresses.
fn three_nodes(ranges: usize) -> (NodeProcs, Vec<SocketAddr>) {
    let layout = Layout::local(3, ranges).unwrap();
    let procs = NodeProcs::prepare(Path::new(env!("CARGO_BIN_EXE_flotilla-node")), layout).unwrap();
    let client = procs.client.clone();
    (procs, client)
}

/// The number of ranges each node leads, as its status says.
async fn leaders_per_node(clients: &mut [KvClient<Channel>]) -> Vec<u64> {
    let mut counts = Vec::new();
    for c in clients.iter_mut() {
        let s = c.status(StatusRequest {}).await.map(|s| s.into_inner());
        counts.push(s.map_or(0, |s| s.leaders));
    }
    counts
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leaders_end_up_spread_over_the_nodes_after_a_staggered_start() {
    // Started a second apart, as an operator would: the first elections go to whichever
    // nodes are up, and the leaders then move to the nodes the layout chose.
    const SPREAD: usize = 64;
    let (mut procs, client) = three_nodes(SPREAD);
    let mut clients = Vec::new();
    for (i, addr) in client.iter().enumerate() {
        procs.spawn(i).unwrap();
        clients.push(connect(*addr, Duration::from_secs(60)).await);
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut counts = leaders_per_node(&mut clients).await;
    while counts.iter().sum::<u64>() < SPREAD as u64 {
        assert!(Instant::now() < deadline, "leaders {counts:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
        counts = leaders_per_node(&mut clients).await;
    }
    let first = counts.clone();
    // Range r's campaigner is node r % 3 + 1: 21, 22 and 21 ranges.
    let want = vec![21, 22, 21];
    while counts != want {
        assert!(
            Instant::now() < deadline,
            "leaders {counts:?} (when every range first had one: {first:?})"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
        counts = leaders_per_node(&mut clients).await;
    }
    eprintln!("leaders per node: {first:?} once every range had one, then {counts:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_processes_survive_a_sigkill_and_lose_no_acknowledged_write() {
    let (mut procs, client) = three_nodes(RANGES);
    for i in 0..3 {
        procs.spawn(i).unwrap();
    }
    let mut clients = Vec::new();
    for a in &client {
        clients.push(connect(*a, Duration::from_secs(60)).await);
    }
    let all = [0usize, 1, 2];
    wait_leaders(&mut clients, &all, Duration::from_secs(120)).await;
    // The node binary serves the admin API beside the KV API (tests/admin.rs covers it).
    let table = AdminClient::connect(format!("http://{}", client[0]))
        .await
        .unwrap()
        .ranges(RangesRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!((table.node_id, table.ranges.len()), (1, RANGES));

    // Phase 1: a write to every range, through all nodes.
    let mut acked = Vec::new();
    for r in 1..=RANGES as u64 {
        let key = key_in_range(r, "a");
        if put_any(
            &mut clients,
            &all[(r as usize) % 3..],
            &key,
            b"1",
            Duration::from_secs(20),
        )
        .await
        {
            acked.push((key, b"1".to_vec()));
        }
    }
    assert!(
        acked.len() >= RANGES,
        "phase 1 acknowledged only {}",
        acked.len()
    );

    // Kill node 3 with SIGKILL; the other two keep accepting writes.
    procs.kill(2);
    let alive = [0usize, 1];
    for r in (1..=RANGES as u64).step_by(3) {
        let key = key_in_range(r, "b");
        if put_any(&mut clients, &alive, &key, b"2", Duration::from_secs(30)).await {
            acked.push((key, b"2".to_vec()));
        }
    }
    assert!(
        acked.len() >= RANGES + RANGES / 3,
        "writes stalled with one node down"
    );

    // Restart node 3 from its data directory: it recovers its 1,000 replicas and catches up.
    procs.spawn(2).unwrap();
    clients[2] = connect(client[2], Duration::from_secs(60)).await;
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let s = clients[2]
            .status(StatusRequest {})
            .await
            .map(|s| s.into_inner());
        if s.as_ref().is_ok_and(|s| s.replicas == RANGES as u64) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "node 3 did not recover its replicas: {s:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Every acknowledged write is readable, linearizably, through every node (node 3's
    // reads wait for its replica to catch up to the leader's commit).
    for (i, c) in clients.iter_mut().enumerate() {
        eprintln!("verifying through node {}", i + 1);
        for (k, v) in acked.iter().step_by(if i == 2 { 1 } else { 7 }) {
            let got = get(c, k, Duration::from_secs(30)).await;
            assert_eq!(
                got.as_deref(),
                Some(&v[..]),
                "node {} lost {}",
                i + 1,
                String::from_utf8_lossy(k)
            );
        }
    }
}
