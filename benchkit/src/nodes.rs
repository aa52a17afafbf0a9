//! `flotilla-node` processes on loopback, the one launcher that the process tests
//! (`tests/ctl.rs`, `tests/multiprocess.rs`, `tests/tls.rs`), the benchmarks that run real
//! processes and the nemesis suite share: start (from flags or from each node's own
//! arguments, e.g. `--config`), SIGKILL and restart, SIGSTOP and SIGCONT, and on drop,
//! whatever happened, kill every process it started, by pid (and print the tail of each log
//! if the thread is panicking, since a node's log says why a test's client only saw errors).
//!
//! Signals are sent with the `kill` utility rather than `libc::kill` so that the workspace
//! stays free of `unsafe`. Ports are chosen free at run time ([`crate::free_addr`]).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

use anyhow::Context as _;

use crate::free_addr;

/// One node: how to start it, and its process while it runs.
#[derive(Debug)]
struct Node {
    args: Vec<String>,
    child: Option<Child>,
    /// SIGSTOPped (and not resumed since).
    paused: bool,
}

/// The `flotilla-node` processes of one cluster.
#[derive(Debug)]
pub struct NodeProcs {
    bin: PathBuf,
    nodes: Vec<Node>,
    /// Each node's client (KV + admin) address.
    pub client: Vec<SocketAddr>,
    /// Each node's own raft address (empty when started from arguments).
    pub raft: Vec<SocketAddr>,
    dir: tempfile::TempDir,
}

/// Settings of [`NodeProcs::start_with`]: where each node listens and how it reaches the
/// others.
#[derive(Debug, Clone)]
pub struct Layout {
    /// Node `i` (id `i + 1`) listens for raft at `raft[i]`.
    pub raft: Vec<SocketAddr>,
    /// And for clients at `client[i]`.
    pub client: Vec<SocketAddr>,
    /// And for Redis clients at `redis[i]` (`--redis`); empty: no Redis listener.
    pub redis: Vec<SocketAddr>,
    /// `--bootstrap-ranges`.
    pub ranges: usize,
    /// Flags every node gets after the others (`--tick-ms 20`, ...).
    pub extra: Vec<String>,
}

impl Layout {
    /// `n` nodes on free ports of 127.0.0.1.
    ///
    /// # Errors
    ///
    /// As [`crate::free_addr`].
    pub fn local(n: usize, ranges: usize) -> anyhow::Result<Layout> {
        let addrs = |_| free_addr("127.0.0.1");
        Ok(Layout {
            raft: (0..n).map(addrs).collect::<anyhow::Result<_>>()?,
            client: (0..n).map(addrs).collect::<anyhow::Result<_>>()?,
            redis: Vec::new(),
            ranges,
            extra: Vec::new(),
        })
    }

    /// Gives every node a Redis listener on a free port of 127.0.0.1.
    ///
    /// # Errors
    ///
    /// As [`crate::free_addr`].
    pub fn with_redis(mut self) -> anyhow::Result<Layout> {
        self.redis = (0..self.raft.len())
            .map(|_| free_addr("127.0.0.1"))
            .collect::<anyhow::Result<_>>()?;
        Ok(self)
    }

    /// Adds flags every node gets.
    pub fn with_args(mut self, args: &[&str]) -> Layout {
        self.extra.extend(args.iter().map(|a| a.to_string()));
        self
    }
}

impl NodeProcs {
    /// Starts the nodes of `layout`, each reaching every other at its raft address, each
    /// with its data in a directory of its own under a fresh temporary directory.
    ///
    /// # Errors
    ///
    /// If the temporary directory or a process cannot be made.
    pub fn start(bin: &Path, layout: Layout) -> anyhow::Result<NodeProcs> {
        let mut procs = Self::prepare(bin, layout)?;
        procs.spawn_all()?;
        Ok(procs)
    }

    /// As [`NodeProcs::start`] without starting any process: start each with
    /// [`NodeProcs::spawn`] when the caller wants it (a staggered start).
    ///
    /// # Errors
    ///
    /// If the temporary directory cannot be made.
    pub fn prepare(bin: &Path, layout: Layout) -> anyhow::Result<NodeProcs> {
        let raft = layout.raft.clone();
        Self::prepare_with(bin, layout, |_, j| raft[j])
    }

    /// As [`NodeProcs::start`], but node `i` reaches node `j` at `peer_addr(i, j)` (a proxy,
    /// say).
    ///
    /// # Errors
    ///
    /// As [`NodeProcs::start`].
    pub fn start_with(
        bin: &Path,
        layout: Layout,
        peer_addr: impl Fn(usize, usize) -> SocketAddr,
    ) -> anyhow::Result<NodeProcs> {
        let mut procs = Self::prepare_with(bin, layout, peer_addr)?;
        procs.spawn_all()?;
        Ok(procs)
    }

    fn prepare_with(
        bin: &Path,
        layout: Layout,
        peer_addr: impl Fn(usize, usize) -> SocketAddr,
    ) -> anyhow::Result<NodeProcs> {
        let dir = temp_dir()?;
        let n = layout.raft.len();
        let args = (0..n)
            .map(|i| {
                let peers = (0..n)
                    .map(|j| {
                        let a = if i == j {
                            layout.raft[i]
                        } else {
                            peer_addr(i, j)
                        };
                        format!("{}={a}", j + 1)
                    })
                    .collect::<Vec<_>>()
                    .join(",");
                let mut args: Vec<String> = vec![
                    "--id".into(),
                    (i + 1).to_string(),
                    "--raft".into(),
                    layout.raft[i].to_string(),
                    "--client".into(),
                    layout.client[i].to_string(),
                    "--data-dir".into(),
                    dir.path().join(format!("n{}", i + 1)).display().to_string(),
                    "--peers".into(),
                    peers,
                    "--bootstrap-ranges".into(),
                    layout.ranges.to_string(),
                ];
                if let Some(redis) = layout.redis.get(i) {
                    args.extend(["--redis".to_string(), redis.to_string()]);
                }
                args.extend(layout.extra.iter().cloned());
                args
            })
            .collect();
        Ok(Self::new(bin, dir, args, layout.client, layout.raft))
    }

    /// Starts node `i` with `args[i]` alone (its flags name everything, e.g. `--config
    /// FILE`); `client[i]` is the client address it was told to serve on.
    ///
    /// # Errors
    ///
    /// As [`NodeProcs::start`].
    pub fn start_args(
        bin: &Path,
        args: Vec<Vec<String>>,
        client: Vec<SocketAddr>,
    ) -> anyhow::Result<NodeProcs> {
        let mut procs = Self::new(bin, temp_dir()?, args, client, Vec::new());
        procs.spawn_all()?;
        Ok(procs)
    }

    fn new(
        bin: &Path,
        dir: tempfile::TempDir,
        args: Vec<Vec<String>>,
        client: Vec<SocketAddr>,
        raft: Vec<SocketAddr>,
    ) -> NodeProcs {
        let nodes = args
            .into_iter()
            .map(|args| Node {
                args,
                child: None,
                paused: false,
            })
            .collect();
        NodeProcs {
            bin: bin.to_path_buf(),
            nodes,
            client,
            raft,
            dir,
        }
    }

    fn spawn_all(&mut self) -> anyhow::Result<()> {
        for i in 0..self.nodes.len() {
            self.spawn(i)?;
        }
        Ok(())
    }

    /// How many nodes.
    pub fn len(&self) -> usize {
        self.nodes.len()
    }

    /// Whether there is no node (never, once started).
    pub fn is_empty(&self) -> bool {
        self.nodes.is_empty()
    }

    /// The client addresses as `--endpoints` takes them: `a,b,c`.
    pub fn endpoints(&self) -> String {
        self.client
            .iter()
            .map(|a| a.to_string())
            .collect::<Vec<_>>()
            .join(",")
    }

    /// Starts node `i` (again, from its data directory), appending to its log.
    ///
    /// # Errors
    ///
    /// If the log cannot be opened or the process cannot start.
    pub fn spawn(&mut self, i: usize) -> anyhow::Result<()> {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log_path(i))?;
        let child = Command::new(&self.bin)
            .args(&self.nodes[i].args)
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .with_context(|| format!("spawn {}", self.bin.display()))?;
        self.nodes[i].child = Some(child);
        self.nodes[i].paused = false;
        Ok(())
    }

    /// SIGKILL node `i` and reap it.
    pub fn kill(&mut self, i: usize) {
        if let Some(mut c) = self.nodes[i].child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        self.nodes[i].paused = false;
    }

    /// SIGSTOP node `i`: it keeps its sockets but answers nothing.
    ///
    /// # Errors
    ///
    /// If it is not running or `kill` fails.
    pub fn pause(&mut self, i: usize) -> anyhow::Result<()> {
        self.signal(i, "-STOP")?;
        self.nodes[i].paused = true;
        Ok(())
    }

    /// SIGCONT node `i`.
    ///
    /// # Errors
    ///
    /// As [`NodeProcs::pause`].
    pub fn resume(&mut self, i: usize) -> anyhow::Result<()> {
        self.signal(i, "-CONT")?;
        self.nodes[i].paused = false;
        Ok(())
    }

    /// Whether node `i` has a process.
    pub fn running(&self, i: usize) -> bool {
        self.nodes[i].child.is_some()
    }

    /// Resumes every paused node and restarts every killed one.
    ///
    /// # Errors
    ///
    /// As [`NodeProcs::spawn`] and [`NodeProcs::resume`].
    pub fn heal(&mut self) -> anyhow::Result<()> {
        for i in 0..self.nodes.len() {
            if self.nodes[i].paused {
                self.resume(i)?;
            }
            if self.nodes[i].child.is_none() {
                self.spawn(i)?;
            }
        }
        Ok(())
    }

    /// Whether node `i` is SIGSTOPped.
    pub fn paused(&self, i: usize) -> bool {
        self.nodes[i].paused
    }

    /// The pid of node `i`, if it runs.
    pub fn pid(&self, i: usize) -> Option<u32> {
        self.nodes[i].child.as_ref().map(Child::id)
    }

    /// Whether node `i`'s process has exited (it is then reaped and no longer running).
    pub fn exited(&mut self, i: usize) -> Option<std::process::ExitStatus> {
        let status = self.nodes[i].child.as_mut()?.try_wait().ok()??;
        self.nodes[i].child = None;
        Some(status)
    }

    fn signal(&self, i: usize, sig: &str) -> anyhow::Result<()> {
        let pid = self.pid(i).context("node is not running")?;
        let status = Command::new("kill")
            .args([sig, &pid.to_string()])
            .status()?;
        anyhow::ensure!(status.success(), "kill {sig} {pid} failed");
        Ok(())
    }

    /// Adds node `i = len()` started with `args` alone (its own flags: `--join ADDR`,
    /// `--config FILE`, ...; give it `--data-dir` under [`NodeProcs::dir`]), serving clients at
    /// `client`, and starts it; returns `i`.
    ///
    /// # Errors
    ///
    /// As [`NodeProcs::spawn`].
    pub fn add(&mut self, args: Vec<String>, client: SocketAddr) -> anyhow::Result<usize> {
        self.nodes.push(Node {
            args,
            child: None,
            paused: false,
        });
        self.client.push(client);
        let i = self.nodes.len() - 1;
        self.spawn(i)?;
        Ok(i)
    }

    /// The temporary directory holding the nodes' data directories and logs.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// Node `i`'s data directory (as [`NodeProcs::start`] lays them out).
    pub fn data_dir(&self, i: usize) -> PathBuf {
        self.dir.path().join(format!("n{}", i + 1))
    }

    /// Where node `i` writes its log (its stderr).
    pub fn log_path(&self, i: usize) -> PathBuf {
        self.dir.path().join(format!("node-{}.log", i + 1))
    }

    /// The last `lines` lines of node `i`'s log.
    pub fn log_tail(&self, i: usize, lines: usize) -> String {
        let log = std::fs::read_to_string(self.log_path(i)).unwrap_or_default();
        let tail: Vec<&str> = log.lines().rev().take(lines).collect();
        tail.into_iter().rev().collect::<Vec<_>>().join("\n")
    }
}

fn temp_dir() -> anyhow::Result<tempfile::TempDir> {
    Ok(tempfile::Builder::new()
        .prefix("flotilla-nodes")
        .tempdir()?)
}

impl Drop for NodeProcs {
    fn drop(&mut self) {
        for i in 0..self.nodes.len() {
            // A stopped process still dies of SIGKILL; resume anyway so that nothing is left
            // half-alive if the kill raced with a stop.
            if self.nodes[i].paused {
                let _ = self.signal(i, "-CONT");
            }
            self.kill(i);
        }
        if std::thread::panicking() {
            for i in 0..self.nodes.len() {
                eprintln!("--- node {} log (last lines) ---", i + 1);
                eprintln!("{}", self.log_tail(i, 30));
            }
        }
    }
}

/// `flotilla-ctl`, built beside the node binary `bin` (by `cargo build --workspace`: a test
/// target alone does not build it).
///
/// # Errors
///
/// If it is missing.
pub fn ctl_beside(bin: &Path) -> anyhow::Result<PathBuf> {
    let path = bin.with_file_name("flotilla-ctl");
    anyhow::ensure!(
        path.exists(),
        "{} is missing: build the workspace first (cargo build --release --workspace)",
        path.display()
    );
    Ok(path)
}

/// `flotilla-ctl` against one cluster, as the process tests run and poll it.
#[derive(Debug, Clone)]
pub struct Ctl {
    bin: PathBuf,
    endpoints: String,
}

impl Ctl {
    /// The `flotilla-ctl` beside `node_bin` ([`ctl_beside`]), talking to `endpoints`
    /// (client addresses, comma-separated).
    ///
    /// # Errors
    ///
    /// If the binary is missing.
    pub fn beside(node_bin: &Path, endpoints: impl Into<String>) -> anyhow::Result<Ctl> {
        Ok(Ctl {
            bin: ctl_beside(node_bin)?,
            endpoints: endpoints.into(),
        })
    }

    /// Runs it once: `flotilla-ctl --endpoints <endpoints> --timeout 5s args...`.
    ///
    /// # Errors
    ///
    /// If it cannot be started.
    pub fn run(&self, args: &[&str]) -> std::io::Result<std::process::Output> {
        Command::new(&self.bin)
            .args(["--endpoints", &self.endpoints, "--timeout", "5s"])
            .args(args)
            .output()
    }

    /// Runs it (with `-o json` among `args`) every 100 ms until it succeeds and `ok` accepts
    /// its output, for at most `timeout`: the cluster may still be electing, moving or
    /// merging.
    ///
    /// # Errors
    ///
    /// Past `timeout`: names `what` and shows the last output or error.
    pub fn until(
        &self,
        args: &[&str],
        what: &str,
        timeout: std::time::Duration,
        ok: impl Fn(&serde_json::Value) -> bool,
    ) -> anyhow::Result<serde_json::Value> {
        let deadline = std::time::Instant::now() + timeout;
        loop {
            let out = self.run(args)?;
            let last = if out.status.success() {
                let v: serde_json::Value = serde_json::from_slice(&out.stdout)
                    .with_context(|| format!("flotilla-ctl {args:?} printed no JSON"))?;
                if ok(&v) {
                    return Ok(v);
                }
                format!("{v:#}")
            } else {
                String::from_utf8_lossy(&out.stderr).into_owned()
            };
            anyhow::ensure!(
                std::time::Instant::now() < deadline,
                "{what}: never within {timeout:?}; last: {last}"
            );
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
    }
}

/// `GET path` on a node's metrics address (`/health`, `/metrics`): the status code and the
/// body. A plain HTTP/1.1 exchange, enough for the node's two endpoints.
pub fn http_get(addr: SocketAddr, path: &str) -> std::io::Result<(u16, String)> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect_timeout(&addr, std::time::Duration::from_secs(5))?;
    s.set_read_timeout(Some(std::time::Duration::from_secs(10)))?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )?;
    let mut text = String::new();
    s.read_to_string(&mut text)?;
    let code = text
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    Ok((code, body))
}
