//! README's "Using it", as a program that runs: three nodes started as a library
//! (`flotilla::Server`, the same wiring as the `flotilla-node` binary) in this process, on
//! real gRPC ports of 127.0.0.1, then an application talking to them with the client library
//! (`flotilla-client`), then a read through one node's NodeGroup, then a clean stop.
//!
//! Run: `cargo run --release --example using_it`. It prints what it read and exits 0.

use std::collections::BTreeMap;
use std::net::{SocketAddr, TcpListener};

use anyhow::{ensure, Context};
use bytes::Bytes;
use flotilla::{NodeId, ReadConsistency, Server, ServerConfig};
use flotilla_client::{Client, ClientConfig};

/// A port of 127.0.0.1 free right now (a real deployment names its ports in its config).
fn free_addr() -> anyhow::Result<SocketAddr> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?)
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let raft: Vec<SocketAddr> = (0..3).map(|_| free_addr()).collect::<Result<_, _>>()?;
    let peers: BTreeMap<NodeId, String> = (1..=3)
        .map(|id| (NodeId(id), raft[id as usize - 1].to_string()))
        .collect();

    // --- A node as a library: one `Server` per node (here three in one process).
    let mut servers = Vec::new();
    for id in 1..=3u64 {
        let mut config = ServerConfig::new(NodeId(id), dir.path().join(format!("n{id}")));
        config.raft_addr = raft[id as usize - 1];
        config.client_addr = "127.0.0.1:0".parse()?; // port 0: read it back below
        config.peers = peers.clone(); // every node of the cluster, itself included
        config.bootstrap_ranges = 8; // fresh store only; the same on every node
        config.validate()?; // one named error per mistake
        servers.push(Server::start(config, tokio::runtime::Handle::current())?);
    }
    let endpoints: Vec<String> = servers
        .iter()
        .map(|s| s.client_addr().to_string())
        .collect();

    // --- An application: the client library routes each request to its range's leader and
    // retries (same request id) until its deadline, so it may start before leaders exist.
    let client = Client::connect(ClientConfig::new(endpoints)).await?;
    client.put("greeting", "hello").await?;
    let swapped = client
        .compare_and_set("greeting", Some(Bytes::from("hello")), Some("hi".into()))
        .await?;
    ensure!(swapped.succeeded, "the compare-and-set should have matched");
    for i in 0..5 {
        client.put(format!("user/{i}"), format!("name {i}")).await?;
    }
    let page = client.scan("user/", "user0", 100, None).await?;
    ensure!(
        page.pairs.len() == 5,
        "scan found {} users",
        page.pairs.len()
    );
    ensure!(client.delete("user/0").await?, "user/0 existed");

    // --- The NodeGroup inside a node: the same data, routed to the key's range here.
    let node = servers[0].node();
    let v = node
        .get(b"greeting", ReadConsistency::Linearizable)
        .await?
        .context("greeting is missing")?;
    println!(
        "greeting = {}, {} users scanned, node {} hosts {} ranges",
        String::from_utf8_lossy(&v),
        page.pairs.len(),
        servers[0].node_id(),
        node.ranges().len()
    );

    // --- A clean stop (the binary does this on SIGTERM, see `Server::run_until`).
    drop(client);
    for s in &servers {
        s.shutdown();
    }
    Ok(())
}
