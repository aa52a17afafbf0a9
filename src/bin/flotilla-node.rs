//! A Flotilla node process: one NodeGroup on the gRPC transport, serving the KV client API
//! (`flotilla.kv.Kv`) and the admin API (`flotilla.admin.Admin`: split, merge, range table)
//! on the client address.
//!
//! ```text
//! flotilla-node --id 1 --raft 127.0.0.1:7001 --client 127.0.0.1:8001 --data-dir /tmp/n1 \
//!     --peers 1=127.0.0.1:7001,2=127.0.0.1:7002,3=127.0.0.1:7003 [--bootstrap-ranges 1000]
//! ```
//!
//! With `--bootstrap-ranges N` a node whose store is empty creates N ranges that together
//! cover the key space (range i starts at `k` + i as 8 digits), replicated on every peer; each
//! node must be started with the same N and peers. A node with a store resumes from it.
//! The process runs until SIGINT/SIGTERM (or SIGKILL: whatever it acknowledged is on disk).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context};
use flotilla::admin_service::AdminService;
use flotilla::kv_service::KvService;
use flotilla::testing::Cluster;
use flotilla::transport::{GrpcConfig, GrpcTransport, Transport};
use flotilla::{Engine, KvStateMachine, NodeGroup, NodeGroupConfig, NodeId, RangeId};

struct Args {
    id: u64,
    raft: SocketAddr,
    client: SocketAddr,
    data_dir: std::path::PathBuf,
    peers: Vec<(u64, String)>,
    bootstrap_ranges: usize,
    tick_ms: u64,
}

fn parse_args() -> anyhow::Result<Args> {
    let mut it = std::env::args().skip(1);
    let (mut id, mut raft, mut client, mut dir, mut peers) = (None, None, None, None, Vec::new());
    let (mut bootstrap_ranges, mut tick_ms) = (0usize, 100u64);
    while let Some(flag) = it.next() {
        let mut value = || it.next().with_context(|| format!("{flag} needs a value"));
        match flag.as_str() {
            "--id" => id = Some(value()?.parse()?),
            "--raft" => raft = Some(value()?.parse()?),
            "--client" => client = Some(value()?.parse()?),
            "--data-dir" => dir = Some(value()?.into()),
            "--bootstrap-ranges" => bootstrap_ranges = value()?.parse()?,
            "--tick-ms" => tick_ms = value()?.parse()?,
            "--peers" => {
                for p in value()?.split(',') {
                    let (n, a) = p.split_once('=').context("peer must be ID=HOST:PORT")?;
                    peers.push((n.parse()?, a.to_string()));
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
    })
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(std::env::var("RUST_LOG").unwrap_or_else(|_| "warn".into()))
        .init();
    let args = parse_args()?;
    let me = NodeId(args.id);
    let config = NodeGroupConfig {
        tick_interval: Duration::from_millis(args.tick_ms),
        ..NodeGroupConfig::new(args.id)
    };
    let engine = Engine::open(&args.data_dir, Default::default())?;
    let fresh = engine.recover()?.is_empty();
    let listener = GrpcTransport::bind(
        me,
        GrpcConfig::default(),
        args.raft,
        tokio::runtime::Handle::current(),
    )?;
    for (n, addr) in &args.peers {
        if *n != args.id {
            listener.set_peer(NodeId(*n), addr.clone())?;
        }
    }
    let node = Arc::new(NodeGroup::start(
        config,
        engine,
        Arc::new(KvStateMachine),
        |h| Arc::new(listener.serve(h)) as Arc<dyn Transport>,
    )?);
    if fresh && args.bootstrap_ranges > 0 {
        let members: Vec<u64> = args.peers.iter().map(|(n, _)| *n).collect();
        let layout = Cluster::range_layout(args.bootstrap_ranges, &members);
        node.bootstrap_ranges(layout)?;
        // Spread the first elections over the nodes so that leaders start balanced.
        let nodes = members.len() as u64;
        let rank = members.iter().position(|n| *n == args.id).unwrap_or(0) as u64;
        for r in 1..=args.bootstrap_ranges as u64 {
            if r % nodes == rank {
                let _ = node.campaign(RangeId(r));
            }
        }
    }
    println!(
        "node {} serving raft on {} and clients on {}",
        args.id, args.raft, args.client
    );
    let shutdown = async {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .expect("signal handler");
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term.recv() => {}
        }
    };
    tonic::transport::Server::builder()
        .add_service(KvService::server(node.clone()))
        .add_service(AdminService::server(node.clone()))
        .serve_with_shutdown(args.client, shutdown)
        .await?;
    node.shutdown();
    Ok(())
}
