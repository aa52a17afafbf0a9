//! A Flotilla node process: one NodeGroup on the gRPC transport, serving the KV client API
//! (`flotilla.kv.Kv`) and the admin API (`flotilla.admin.Admin`) on the client address, and
//! optionally `/metrics` and `/health` over HTTP.
//!
//! ```text
//! flotilla-node --config flotilla.toml
//! flotilla-node --id 1 --raft 127.0.0.1:7001 --client 127.0.0.1:8001 --data-dir /tmp/n1 \
//!     --peers 1=127.0.0.1:7001,2=127.0.0.1:7002,3=127.0.0.1:7003 [--bootstrap-ranges 1000] \
//!     [--tick-ms 100] [--no-hibernate] [--metrics 127.0.0.1:9001] [--bootstrap-replicas 3] \
//!     [--no-schedule] [--down-time-ms 30000]
//! flotilla-node --raft 127.0.0.1:7004 --client 127.0.0.1:8004 --data-dir /tmp/n4 \
//!     --join 127.0.0.1:8001
//! ```
//!
//! Settings come from the config file (`--config`, TOML; `flotilla.example.toml` documents
//! every key) and then the flags, which override the keys they name. Any mistake refuses the
//! start, each printed on its own line. The wiring is the library's ([`flotilla::Server`]);
//! this file only reads the settings. The process runs until SIGINT/SIGTERM, then stops
//! taking requests, fails what is still in flight, syncs the engine and exits 0 (or SIGKILL:
//! whatever it acknowledged is on disk already).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use flotilla::server::ConfigFile;
use flotilla::Server;

/// A Flotilla node: one process hosting thousands of raft groups (one per range) on one
/// RocksDB engine. Settings from `--config FILE` (see flotilla.example.toml), overridden by
/// the flags below.
#[derive(Debug, Parser)]
#[command(name = "flotilla-node", version, about, long_about = None)]
struct Args {
    /// TOML config file; every key is documented in flotilla.example.toml. Flags override it.
    #[arg(long, value_name = "PATH")]
    config: Option<PathBuf>,
    /// This node's id: non-zero, unique in the cluster (file: node.id).
    #[arg(long, value_name = "ID")]
    id: Option<u64>,
    /// Address the raft transport listens on, host:port (file: node.raft).
    #[arg(long, value_name = "ADDR")]
    raft: Option<SocketAddr>,
    /// Address the client APIs (KV and admin gRPC) listen on (file: node.client).
    #[arg(long, value_name = "ADDR")]
    client: Option<SocketAddr>,
    /// Directory of the node's engine; a directory holding a store resumes from it
    /// (file: node.data-dir).
    #[arg(long, value_name = "DIR")]
    data_dir: Option<PathBuf>,
    /// Raft addresses of every node, this one included: ID=HOST:PORT,... Replaces the file's
    /// [peers].
    #[arg(long, value_name = "ID=HOST:PORT,...", value_parser = parse_peers)]
    peers: Option<Peers>,
    /// On a fresh store, create N ranges covering the key space, replicated on every peer;
    /// every node of a new cluster must get the same N and peers (file: node.bootstrap-ranges).
    #[arg(long, value_name = "N")]
    bootstrap_ranges: Option<usize>,
    /// Client address (host:port) of a running node to join the cluster through: a new store
    /// gets its node id (no --id needed) and every peer from the node registry; a store that
    /// joined before keeps its id. Needs a fixed --raft port (file: node.join).
    #[arg(long, value_name = "ADDR")]
    join: Option<String>,
    /// Replicate the bootstrapped ranges on the N lowest peer ids only; the other peers start
    /// empty and the scheduler gives them replicas (file: node.bootstrap-replicas; default 0:
    /// every peer).
    #[arg(long, value_name = "N")]
    bootstrap_replicas: Option<usize>,
    /// Turn the scheduler off: no leader transfers or replica moves (file:
    /// schedule.enabled = false).
    #[arg(long)]
    no_schedule: bool,
    /// How long a node must be down before its replicas are rebuilt elsewhere, in ms (file:
    /// schedule.down-time-ms; default 30000).
    #[arg(long, value_name = "MS")]
    down_time_ms: Option<u64>,
    /// Raft tick interval in milliseconds (file: raft.tick-ms; default 100).
    #[arg(long, value_name = "MS")]
    tick_ms: Option<u64>,
    /// Keep every group awake (ticking, heartbeating) instead of letting idle groups sleep
    /// (file: raft.hibernate = false).
    #[arg(long)]
    no_hibernate: bool,
    /// Address of the HTTP endpoint serving /metrics (Prometheus) and /health
    /// (file: node.metrics; default: off).
    #[arg(long, value_name = "ADDR")]
    metrics: Option<SocketAddr>,
    /// Address of the Redis protocol (RESP) listener (file: node.redis; default: off).
    #[arg(long, value_name = "ADDR")]
    redis: Option<SocketAddr>,
    /// Check the settings, print the mistakes (or "config ok") and exit without starting.
    #[arg(long)]
    check_config: bool,
}

/// The value of `--peers`: (node id, raft address) pairs. A newtype so that clap takes the
/// whole list as one value (it reads a `Vec` as a repeated flag).
#[derive(Debug, Clone)]
struct Peers(Vec<(u64, String)>);

/// `1=host:port,2=host:port`.
fn parse_peers(s: &str) -> Result<Peers, String> {
    let peers: Result<Vec<(u64, String)>, String> = s
        .split(',')
        .filter(|p| !p.is_empty())
        .map(|p| {
            let (id, addr) = p
                .split_once('=')
                .ok_or_else(|| format!("{p:?} is not ID=HOST:PORT"))?;
            let id = id
                .parse()
                .map_err(|_| format!("{id:?} in {p:?} is not a node id"))?;
            Ok((id, addr.to_string()))
        })
        .collect();
    peers.map(Peers)
}

impl Args {
    /// The file (or an empty one), with the flags written over it.
    fn into_file(self) -> Result<ConfigFile, String> {
        let mut f = match &self.config {
            Some(path) => ConfigFile::load(path)?,
            None => ConfigFile::default(),
        };
        let n = &mut f.node;
        n.id = self.id.or(n.id);
        n.raft = self.raft.or(n.raft);
        n.client = self.client.or(n.client);
        n.data_dir = self.data_dir.or(n.data_dir.take());
        n.metrics = self.metrics.or(n.metrics);
        n.redis = self.redis.or(n.redis);
        n.bootstrap_ranges = self.bootstrap_ranges.or(n.bootstrap_ranges);
        n.join = self.join.or(n.join.take());
        n.bootstrap_replicas = self.bootstrap_replicas.or(n.bootstrap_replicas);
        if self.no_schedule {
            f.schedule.enabled = Some(false);
        }
        f.schedule.down_time_ms = self.down_time_ms.or(f.schedule.down_time_ms);
        if let Some(Peers(peers)) = self.peers {
            f.peers = peers
                .into_iter()
                .map(|(id, addr)| (id.to_string(), addr))
                .collect();
        }
        f.raft.tick_ms = self.tick_ms.or(f.raft.tick_ms);
        if self.no_hibernate {
            f.raft.hibernate = Some(false);
        }
        Ok(f)
    }
}

/// Resolves on SIGINT or SIGTERM.
async fn stop_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        // Without handlers the default action (exit) applies; serve until then.
        return std::future::pending().await;
    };
    tokio::select! {
        _ = int.recv() => {}
        _ = term.recv() => {}
    }
    tracing::info!("stop signal received: shutting down");
}

fn main() -> ExitCode {
    let args = Args::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .init();
    let check_only = args.check_config;
    let mut async_threads = None;
    let config = match args.into_file().map_err(|e| vec![e]).and_then(|f| {
        async_threads = f.node.async_threads.filter(|n| *n > 0);
        f.to_server_config()
    }) {
        Ok(c) => c,
        Err(mistakes) => {
            for m in &mistakes {
                eprintln!("error: {m}");
            }
            eprintln!(
                "flotilla-node: {} mistake(s) in the settings; not starting",
                mistakes.len()
            );
            return ExitCode::from(2);
        }
    };
    if check_only {
        println!("config ok");
        return ExitCode::SUCCESS;
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(async_threads.unwrap_or_else(flotilla_runtime::default_thread_share))
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the tokio runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let served = runtime.block_on(async move {
        let mut config = config;
        flotilla::server::join(&mut config).await?;
        let id = config.node_id();
        let server = Server::start(config, tokio::runtime::Handle::current())?;
        println!(
            "node {id} serving raft on {} and clients on {}{}",
            server.raft_addr(),
            server.client_addr(),
            server
                .metrics_addr()
                .map(|a| format!(", metrics on http://{a}/metrics"))
                .unwrap_or_default()
        );
        server.run_until(stop_signal()).await.map(|()| id)
    });
    match served {
        Ok(id) => {
            tracing::info!(node = %id, "stopped");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}
