//! The node wiring ([`flotilla::Server`]) the way the node binary uses it: fixed addresses and
//! the peer list in the config, the initial layout bootstrapped on a fresh store, the client
//! APIs on the client address. A node shut down from outside the runtime lets go of both
//! ports and restarts on them from its store without bootstrapping again; `run_until` returns
//! once its signal fires and leaves the client port free. Nodes bound on port 0 record the
//! address they bound in the registry, never port 0.
//!
//! A plain `#[test]` with its own tokio runtime, so that shutdowns can wait for the servers to
//! release their ports (they cannot on a runtime thread).

use std::net::{SocketAddr, TcpListener};
use std::path::Path;
use std::time::{Duration, Instant};

use flotilla::layout::range_layout;
use flotilla::proto::admin::admin_client::AdminClient;
use flotilla::proto::admin::RangesRequest;
use flotilla::proto::kv::kv_client::KvClient;
use flotilla::proto::kv::{GetRequest, StatusRequest};
use flotilla::testing::{
    bootstrap_ranges_and_system, key_in_range, node_ids, start_local_servers, test_config,
    wait_until_async,
};
use flotilla::{NodeId, RangeId, ReadConsistency, Server, ServerConfig};

const RANGES: usize = 6;
const T: Duration = Duration::from_secs(30);

fn free_addr() -> SocketAddr {
    flotilla_benchkit::free_addr("127.0.0.1").unwrap()
}

/// Node `i + 1` of three, as `flotilla-node --bootstrap-ranges 6` would be configured.
fn config(i: usize, raft: &[SocketAddr], client: &[SocketAddr], dir: &Path) -> ServerConfig {
    ServerConfig {
        node: test_config(i as u64 + 1),
        data_dir: dir.join(format!("n{}", i + 1)),
        raft_addr: raft[i],
        client_addr: client[i],
        peers: (0..3)
            .map(|j| (NodeId(j as u64 + 1), raft[j].to_string()))
            .collect(),
        bootstrap_ranges: RANGES,
        ..ServerConfig::default()
    }
}

/// Leaders the node at `client` reports, through its KV API (0 while it does not answer).
async fn leaders(client: SocketAddr) -> u64 {
    let Ok(mut kv) = KvClient::connect(format!("http://{client}")).await else {
        return 0;
    };
    kv.status(StatusRequest {})
        .await
        .map_or(0, |s| s.into_inner().leaders)
}

/// A linearizable read through the KV API at `client`, retried until it answers.
async fn get(client: SocketAddr, key: &[u8]) -> Option<Vec<u8>> {
    let deadline = Instant::now() + T;
    loop {
        let answer = match KvClient::connect(format!("http://{client}")).await {
            Ok(mut kv) => kv
                .get(GetRequest {
                    key: key.to_vec().into(),
                    stale: false,
                    route: None,
                    consistency: 0,
                })
                .await
                .map(|r| r.into_inner())
                .map_err(|e| e.to_string()),
            Err(e) => Err(e.to_string()),
        };
        match answer {
            Ok(r) => return r.found.then(|| r.value.to_vec()),
            Err(e) => assert!(Instant::now() < deadline, "read through {client}: {e}"),
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[test]
fn a_server_bootstraps_once_serves_clients_and_restarts_on_its_ports() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let raft: Vec<SocketAddr> = (0..3).map(|_| free_addr()).collect();
    let client: Vec<SocketAddr> = (0..3).map(|_| free_addr()).collect();
    let mut nodes: Vec<Option<Server>> = (0..3)
        .map(|i| {
            let server = Server::start(config(i, &raft, &client, dir.path()), rt.handle().clone())
                .expect("start");
            assert_eq!(
                (server.raft_addr(), server.client_addr()),
                (raft[i], client[i])
            );
            Some(server)
        })
        .collect();

    // Every range of the layout elects a leader; the first campaigns were spread, so no
    // election waits for a timeout on every range.
    rt.block_on(async {
        let deadline = Instant::now() + T;
        loop {
            let mut total = 0;
            for c in &client {
                total += leaders(*c).await;
            }
            if total == RANGES as u64 {
                break;
            }
            assert!(Instant::now() < deadline, "{total} of {RANGES} leaders");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    });
    let node1 = nodes[0].as_ref().unwrap().node().clone();
    rt.block_on(async {
        for r in 1..=RANGES as u64 {
            let deadline = Instant::now() + T;
            while node1.put(&key_in_range(r, "a"), b"a").await.is_err() {
                assert!(Instant::now() < deadline, "put to r{r}");
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    });
    // The admin API is served beside the KV API and lists the layout.
    let table = rt.block_on(async {
        AdminClient::connect(format!("http://{}", client[1]))
            .await
            .unwrap()
            .ranges(RangesRequest {})
            .await
            .unwrap()
            .into_inner()
    });
    assert_eq!((table.node_id, table.ranges.len()), (2, RANGES));

    // Node 3 stops, from outside the runtime: both its ports are free once that returns.
    let n3 = nodes[2].take().unwrap();
    let applied: Vec<u64> = (1..=RANGES as u64)
        .map(|r| n3.node().status(RangeId(r)).unwrap().applied)
        .collect();
    n3.shutdown();
    drop(n3);
    for addr in [raft[2], client[2]] {
        TcpListener::bind(addr).unwrap_or_else(|e| panic!("{addr} still taken: {e}"));
    }

    // It restarts with the same config on the same ports and resumes from its store: the
    // layout is not bootstrapped over it (which would reset what it applied).
    let n3 = Server::start(config(2, &raft, &client, dir.path()), rt.handle().clone())
        .expect("restart node 3");
    for r in 1..=RANGES as u64 {
        let st = n3.node().status(RangeId(r)).unwrap();
        assert!(st.applied >= applied[r as usize - 1], "r{r}: {st:?}");
    }
    nodes[2] = Some(n3);
    rt.block_on(async {
        for r in 1..=RANGES as u64 {
            let got = get(client[2], &key_in_range(r, "a")).await;
            assert_eq!(got.as_deref(), Some(&b"a"[..]), "r{r} through node 3");
        }
    });

    // `run_until` returns once its signal fires and the client API has let go of its port.
    let n1 = nodes[0].take().unwrap();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let run = rt.spawn(n1.run_until(async {
        let _ = stopped.await;
    }));
    stop.send(()).unwrap();
    rt.block_on(run).unwrap().expect("run_until");
    TcpListener::bind(client[0]).expect("node 1's client port is free");

    for n in nodes.iter().flatten() {
        n.shutdown();
    }
}

/// Nodes configured with port 0 (the system picks a free port, as every in-process cluster
/// of the tests does) record in the registry the raft address they bound. They recorded the
/// configured `127.0.0.1:0`: every node that then learned it from the registry lost its
/// link to them while their own sends still went through, a one-way partition in which a
/// range left with two live voters out of three never elected a leader.
#[test]
fn nodes_bound_on_port_zero_record_their_bound_raft_address_in_the_registry() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let nodes = start_local_servers(3, test_config, dir.path(), rt.handle().clone()).unwrap();
    let layout = range_layout(1, &node_ids(3));
    for n in &nodes {
        // Seeds the registry with the three nodes and no address: each records its own.
        bootstrap_ranges_and_system(n.node(), layout.clone()).unwrap();
    }
    let records = rt.block_on(async {
        let node = nodes[0].node();
        let recorded = wait_until_async(T, || async {
            node.nodes(ReadConsistency::Linearizable)
                .await
                .is_ok_and(|r| r.len() == 3 && r.iter().all(|n| !n.raft_addr.is_empty()))
        })
        .await;
        assert!(recorded, "the nodes did not record their addresses");
        node.nodes(ReadConsistency::Linearizable).await.unwrap()
    });
    for n in &nodes {
        let record = records.iter().find(|r| r.node_id == n.node_id().0);
        assert_eq!(
            record.map(|r| r.raft_addr.as_str()),
            Some(n.raft_addr().to_string().as_str()),
            "{}'s record",
            n.node_id()
        );
    }
    for n in &nodes {
        n.shutdown();
    }
}
