//! What the comparison benchmark (`cargo bench --bench compare`) needs besides Flotilla: stubs
//! for etcd's KV API generated from a minimal copy of its rpc.proto (so that no etcd client
//! crate with its own tonic comes in), a bare echo service (the ceiling), a 3-member etcd
//! cluster of processes, and the CPU time of server processes; and `nodes`, the one launcher of
//! `flotilla-node` processes that the process tests, the benchmarks and the nemesis suite share.

use std::net::{SocketAddr, TcpListener};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};

pub mod nodes;

/// etcd's KV and Maintenance services (the part the benchmark calls).
#[allow(missing_docs, clippy::all, missing_debug_implementations)]
pub mod etcdpb {
    include!(concat!(env!("OUT_DIR"), "/etcdserverpb.rs"));
}

/// The echo service.
#[allow(missing_docs, clippy::all, missing_debug_implementations)]
pub mod echopb {
    include!(concat!(env!("OUT_DIR"), "/bench.echo.rs"));
}

/// The echo service: answers every message with itself.
#[derive(Debug, Default, Clone, Copy)]
pub struct EchoService;

#[tonic::async_trait]
impl echopb::echo_server::Echo for EchoService {
    async fn echo(
        &self,
        req: tonic::Request<echopb::EchoMessage>,
    ) -> Result<tonic::Response<echopb::EchoMessage>, tonic::Status> {
        Ok(tonic::Response::new(req.into_inner()))
    }
}

/// Serves [`EchoService`] on `listener` until the process ends.
///
/// # Errors
///
/// If the server fails.
pub async fn serve_echo(listener: tokio::net::TcpListener) -> anyhow::Result<()> {
    let incoming = tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true));
    tonic::transport::Server::builder()
        .add_service(echopb::echo_server::EchoServer::new(EchoService))
        .serve_with_incoming(incoming)
        .await?;
    Ok(())
}

/// User + system CPU time of process `pid` so far, in seconds (all its threads), from
/// `/proc/<pid>/stat`; 0 if it cannot be read.
pub fn cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the command name, which may itself contain spaces and parentheses.
    let after = stat.rsplit(')').next().unwrap_or("");
    let f: Vec<&str> = after.split_whitespace().collect();
    let ticks: f64 = [11, 12]
        .iter()
        .filter_map(|i| f.get(*i).and_then(|s| s.parse::<f64>().ok()))
        .sum();
    ticks / clock_ticks_per_second()
}

/// The kernel's clock ticks per second (`getconf CLK_TCK`), 100 if unknown.
pub fn clock_ticks_per_second() -> f64 {
    static TCK: std::sync::OnceLock<f64> = std::sync::OnceLock::new();
    *TCK.get_or_init(|| {
        Command::new("getconf")
            .arg("CLK_TCK")
            .output()
            .ok()
            .and_then(|o| String::from_utf8(o.stdout).ok())
            .and_then(|s| s.trim().parse().ok())
            .unwrap_or(100.0)
    })
}

/// A free TCP port on `ip` (bound and released: another process may take it meanwhile).
///
/// Chosen at random below Linux's ephemeral range (32768 and up), where the kernel does not
/// hand ports out by itself, and never twice in one process: with the kernel's own choice
/// (`bind` to port 0), two calls in one test could return the same port, and tests running
/// side by side often did (one then failed with "address in use").
///
/// # Errors
///
/// If nothing can be bound on `ip`.
pub fn free_addr(ip: &str) -> anyhow::Result<SocketAddr> {
    use std::collections::hash_map::RandomState;
    use std::hash::{BuildHasher, Hasher};
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::sync::Mutex;
    static GIVEN: Mutex<Vec<u16>> = Mutex::new(Vec::new());
    static CALLS: AtomicU64 = AtomicU64::new(0);
    let mut given = GIVEN.lock().unwrap_or_else(|e| e.into_inner());
    for _ in 0..200 {
        // A random number from the standard library: a fresh random hasher state per call.
        let mut h = RandomState::new().build_hasher();
        h.write_u64(CALLS.fetch_add(1, Ordering::Relaxed));
        h.write_u32(std::process::id());
        let port = 20_000 + (h.finish() % 12_000) as u16;
        if given.contains(&port) {
            continue;
        }
        if let Ok(l) = TcpListener::bind((ip, port)) {
            given.push(port);
            return Ok(l.local_addr()?);
        }
    }
    // Every try taken: fall back to the kernel's choice, still never twice.
    for _ in 0..100 {
        let l = TcpListener::bind((ip, 0)).with_context(|| format!("bind {ip}:0"))?;
        let addr = l.local_addr()?;
        if !given.contains(&addr.port()) {
            given.push(addr.port());
            return Ok(addr);
        }
    }
    bail!("no free port on {ip}")
}

/// Processes that are killed (SIGKILL) when this is dropped.
#[derive(Debug, Default)]
pub struct Children(pub Vec<Child>);

impl Children {
    /// Their process ids.
    pub fn pids(&self) -> Vec<u32> {
        self.0.iter().map(Child::id).collect()
    }

    /// Their CPU seconds together.
    pub fn cpu_seconds(&self) -> f64 {
        self.pids().into_iter().map(cpu_seconds).sum()
    }

    /// Fails if one of them has exited.
    ///
    /// # Errors
    ///
    /// Names the first process that exited, with its status.
    pub fn check_alive(&mut self) -> anyhow::Result<()> {
        for c in &mut self.0 {
            if let Some(status) = c.try_wait()? {
                bail!("process {} exited: {status}", c.id());
            }
        }
        Ok(())
    }
}

impl Drop for Children {
    fn drop(&mut self) {
        for c in &mut self.0 {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// A 3-member etcd cluster of processes, member i on 127.0.0.i (free ports), fsync on (etcd's
/// default), data in `dir`.
#[derive(Debug)]
pub struct Etcd {
    /// The members' processes.
    pub procs: Children,
    /// Client URL of each member.
    pub client_urls: Vec<String>,
}

impl Etcd {
    /// Starts the members and waits until they have a leader.
    ///
    /// # Errors
    ///
    /// If `etcd` cannot be started or elects no leader within 30 s.
    pub async fn start(dir: &Path) -> anyhow::Result<Etcd> {
        let mut clients = Vec::new();
        let mut peers = Vec::new();
        for i in 1..=3 {
            let ip = format!("127.0.0.{i}");
            clients.push(free_addr(&ip)?);
            peers.push(free_addr(&ip)?);
        }
        let cluster: Vec<String> = peers
            .iter()
            .enumerate()
            .map(|(i, p)| format!("m{}=http://{p}", i + 1))
            .collect();
        let mut procs = Children::default();
        for i in 0..3 {
            let log = std::fs::File::create(dir.join(format!("etcd-{}.log", i + 1)))?;
            let child = Command::new("etcd")
                .arg(format!("--name=m{}", i + 1))
                .arg(format!(
                    "--data-dir={}",
                    dir.join(format!("m{}", i + 1)).display()
                ))
                .arg(format!("--listen-client-urls=http://{}", clients[i]))
                .arg(format!("--advertise-client-urls=http://{}", clients[i]))
                .arg(format!("--listen-peer-urls=http://{}", peers[i]))
                .arg(format!("--initial-advertise-peer-urls=http://{}", peers[i]))
                .arg(format!("--initial-cluster={}", cluster.join(",")))
                .arg("--initial-cluster-state=new")
                .arg("--initial-cluster-token=flotilla-compare")
                .arg("--logger=zap")
                .arg("--log-level=error")
                .stdout(Stdio::null())
                .stderr(log)
                .spawn()
                .context("spawn etcd (install it: scripts/install-etcd.sh)")?;
            procs.0.push(child);
        }
        let etcd = Etcd {
            procs,
            client_urls: clients.iter().map(|c| format!("http://{c}")).collect(),
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if etcd.leader().await.is_ok() {
                return Ok(etcd);
            }
            if Instant::now() > deadline {
                bail!(
                    "etcd elected no leader within 30 s (logs in {})",
                    dir.display()
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// The index (into `client_urls`) of the member that leads.
    ///
    /// # Errors
    ///
    /// If a member does not answer or there is no leader.
    pub async fn leader(&self) -> anyhow::Result<usize> {
        use etcdpb::maintenance_client::MaintenanceClient;
        let mut leader = None;
        let mut members = Vec::new();
        for url in &self.client_urls {
            let mut c = MaintenanceClient::connect(url.clone()).await?;
            let s = c.status(etcdpb::StatusRequest {}).await?.into_inner();
            leader = Some(s.leader).filter(|l| *l != 0);
            members.push(s.header.map_or(0, |h| h.member_id));
        }
        let leader = leader.context("no leader")?;
        members
            .iter()
            .position(|m| *m == leader)
            .context("the leader is not a member")
    }
}

/// Makes sure `etcd` is installed, running `script` (which installs Debian's `etcd-server`)
/// if it is not.
///
/// # Errors
///
/// If the script fails or `etcd` is still missing after it.
pub fn ensure_etcd(script: &Path) -> anyhow::Result<()> {
    let found = || {
        Command::new("etcd")
            .arg("--version")
            .stdout(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    };
    if found() {
        return Ok(());
    }
    let status = Command::new("bash").arg(script).status()?;
    if !status.success() || !found() {
        bail!("etcd is not installed and {} failed", script.display());
    }
    Ok(())
}
