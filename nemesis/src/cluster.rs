//! The node processes under test: start, SIGKILL and restart, SIGSTOP and SIGCONT, and —
//! on drop, whatever happened — kill every process this suite started, by its pid.
//!
//! Signals are sent with the `kill` utility rather than `libc::kill` so that the workspace
//! stays free of `unsafe`.

use std::net::{SocketAddr, TcpListener};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};

use anyhow::Context;

/// A free port on loopback, for a process to bind shortly after.
pub fn free_addr() -> anyhow::Result<SocketAddr> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?)
}

/// One node: how to start it and its process, if running.
#[derive(Debug)]
struct Node {
    args: Vec<String>,
    child: Option<Child>,
    stopped: bool,
}

/// The processes of a cluster of `flotilla-node`s, all on 127.0.0.1.
#[derive(Debug)]
pub struct Cluster {
    bin: PathBuf,
    nodes: Vec<Node>,
    /// Each node's client (KV + admin) address.
    pub client: Vec<SocketAddr>,
    /// Each node's own raft address (the proxies forward to it).
    pub raft: Vec<SocketAddr>,
    dir: tempfile::TempDir,
}

impl Cluster {
    /// Starts `n` nodes; node `i` (id `i + 1`) reaches node `j` at `peer_addr(i, j)`.
    pub fn start(
        bin: PathBuf,
        raft: Vec<SocketAddr>,
        ranges: usize,
        peer_addr: impl Fn(usize, usize) -> SocketAddr,
    ) -> anyhow::Result<Cluster> {
        let n = raft.len();
        let dir = tempfile::Builder::new()
            .prefix("flotilla-nemesis")
            .tempdir()?;
        let client = (0..n)
            .map(|_| free_addr())
            .collect::<anyhow::Result<Vec<_>>>()?;
        let nodes = (0..n)
            .map(|i| {
                let peers = (0..n)
                    .map(|j| {
                        let a = if i == j { raft[i] } else { peer_addr(i, j) };
                        format!("{}={a}", j + 1)
                    })
                    .collect::<Vec<_>>()
                    .join(",");
                let args = vec![
                    "--id".into(),
                    (i + 1).to_string(),
                    "--raft".into(),
                    raft[i].to_string(),
                    "--client".into(),
                    client[i].to_string(),
                    "--data-dir".into(),
                    dir.path().join(format!("n{}", i + 1)).display().to_string(),
                    "--peers".into(),
                    peers,
                    "--bootstrap-ranges".into(),
                    ranges.to_string(),
                    // The nemesis replaces replicas itself; the scheduler would race it.
                    "--no-schedule".into(),
                ];
                Node {
                    args,
                    child: None,
                    stopped: false,
                }
            })
            .collect();
        let mut cluster = Cluster {
            bin,
            nodes,
            client,
            raft,
            dir,
        };
        for i in 0..n {
            cluster.spawn(i)?;
        }
        Ok(cluster)
    }

    /// How many nodes.
    pub fn len(&self) -> usize {
        self.nodes.len()
    }

    /// Whether the cluster has no node (never, once started).
    pub fn is_empty(&self) -> bool {
        self.nodes.is_empty()
    }

    /// Starts node `i` (again), appending to its log.
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
        self.nodes[i].stopped = false;
        Ok(())
    }

    /// SIGKILL node `i` and reap it.
    pub fn kill(&mut self, i: usize) {
        if let Some(mut c) = self.nodes[i].child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        self.nodes[i].stopped = false;
    }

    /// SIGSTOP node `i`: it keeps its sockets but answers nothing.
    pub fn pause(&mut self, i: usize) -> anyhow::Result<()> {
        self.signal(i, "-STOP")?;
        self.nodes[i].stopped = true;
        Ok(())
    }

    /// SIGCONT node `i`.
    pub fn resume(&mut self, i: usize) -> anyhow::Result<()> {
        self.signal(i, "-CONT")?;
        self.nodes[i].stopped = false;
        Ok(())
    }

    /// Whether node `i` has a process.
    pub fn running(&self, i: usize) -> bool {
        self.nodes[i].child.is_some()
    }

    /// Resumes every paused node and restarts every killed one.
    pub fn heal(&mut self) -> anyhow::Result<()> {
        for i in 0..self.nodes.len() {
            if self.nodes[i].stopped {
                self.resume(i)?;
            }
            if self.nodes[i].child.is_none() {
                self.spawn(i)?;
            }
        }
        Ok(())
    }

    fn signal(&self, i: usize, sig: &str) -> anyhow::Result<()> {
        let pid = self.nodes[i]
            .child
            .as_ref()
            .context("node is not running")?
            .id();
        let status = Command::new("kill")
            .args([sig, &pid.to_string()])
            .status()?;
        anyhow::ensure!(status.success(), "kill {sig} {pid} failed");
        Ok(())
    }

    fn log_path(&self, i: usize) -> PathBuf {
        self.dir.path().join(format!("node-{}.log", i + 1))
    }

    /// The last `lines` lines of node `i`'s log.
    pub fn log_tail(&self, i: usize, lines: usize) -> String {
        let log = std::fs::read_to_string(self.log_path(i)).unwrap_or_default();
        let tail: Vec<&str> = log.lines().rev().take(lines).collect();
        tail.into_iter().rev().collect::<Vec<_>>().join("\n")
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for i in 0..self.nodes.len() {
            // A stopped process still dies of SIGKILL; resume anyway so that nothing is left
            // half-alive if the kill raced with a stop.
            if self.nodes[i].stopped {
                let _ = self.signal(i, "-CONT");
            }
            self.kill(i);
        }
    }
}
