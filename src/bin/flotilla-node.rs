//! A Flotilla node process: one NodeGroup on the gRPC transport, serving the KV client API
//! (`flotilla.kv.Kv`) and the admin API (`flotilla.admin.Admin`: split, merge, range table)
//! on the client address.
//!
//! ```text
//! flotilla-node --id 1 --raft 127.0.0.1:7001 --client 127.0.0.1:8001 --data-dir /tmp/n1 \
//!     --peers 1=127.0.0.1:7001,2=127.0.0.1:7002,3=127.0.0.1:7003 [--bootstrap-ranges 1000] \
//!     [--tick-ms 100] [--no-hibernate]
//! ```
//!
//! `--no-hibernate` keeps every group awake (ticking and heartbeating) instead of letting
//! idle groups sleep (`NodeGroupConfig::hibernate`).
//!
//! With `--bootstrap-ranges N` a node whose store is empty creates N ranges that together
//! cover the key space (range i starts at `k` + i as 8 digits), replicated on every peer; each
//! node must be started with the same N and peers. A node with a store resumes from it.
//! The wiring is the library's ([`flotilla::Server`]); this file only reads the flags.
//! The process runs until SIGINT/SIGTERM (or SIGKILL: whatever it acknowledged is on disk).

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::Duration;

use anyhow::{bail, Context};
use flotilla::{NodeId, Server, ServerConfig};

struct Args {
    id: u64,
    raft: SocketAddr,
    client: SocketAddr,
    data_dir: std::path::PathBuf,
    peers: BTreeMap<NodeId, String>,
    bootstrap_ranges: usize,
    tick_ms: u64,
    hibernate: bool,
}

fn parse_args() -> anyhow::Result<Args> {
    let mut it = std::env::args().skip(1);
    let (mut id, mut raft, mut client, mut dir) = (None, None, None, None);
    let mut peers = BTreeMap::new();
    let (mut bootstrap_ranges, mut tick_ms, mut hibernate) = (0usize, 100u64, true);
    while let Some(flag) = it.next() {
        let mut value = || it.next().with_context(|| format!("{flag} needs a value"));
        match flag.as_str() {
            "--id" => id = Some(value()?.parse()?),
            "--raft" => raft = Some(value()?.parse()?),
            "--client" => client = Some(value()?.parse()?),
            "--data-dir" => dir = Some(value()?.into()),
            "--bootstrap-ranges" => bootstrap_ranges = value()?.parse()?,
            "--tick-ms" => tick_ms = value()?.parse()?,
            "--no-hibernate" => hibernate = false,
            "--peers" => {
                for p in value()?.split(',') {
                    let (n, a) = p.split_once('=').context("peer must be ID=HOST:PORT")?;
                    peers.insert(NodeId(n.parse()?), a.to_string());
                }
            }
            other => bail!("unknown flag {other}"),
        }
    }
    Ok(Args {
        id: id.context("--id is required")?,
        raft: raft.context("--raft is required")?,
        client: client.context("--client is required")?,
        data_dir: dir.context("--data-dir is required")?,
        peers,
        bootstrap_ranges,
        tick_ms,
        hibernate,
    })
}

/// Resolves on SIGINT or SIGTERM.
async fn stop_signal() {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .expect("signal handler");
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(std::env::var("RUST_LOG").unwrap_or_else(|_| "warn".into()))
        .init();
    let args = parse_args()?;
    let mut config = ServerConfig::new(NodeId(args.id), args.data_dir);
    config.node.tick_interval = Duration::from_millis(args.tick_ms);
    config.node.hibernate = args.hibernate;
    config.raft_addr = args.raft;
    config.client_addr = args.client;
    config.peers = args.peers;
    config.bootstrap_ranges = args.bootstrap_ranges;
    let server = Server::start(config, tokio::runtime::Handle::current())?;
    println!(
        "node {} serving raft on {} and clients on {}",
        args.id,
        server.raft_addr(),
        server.client_addr()
    );
    server.run_until(stop_signal()).await?;
    Ok(())
}
