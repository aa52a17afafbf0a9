//! Flotilla side by side with etcd and with a bare gRPC echo, in one run on one machine
//! (issue 11): every system on loopback, fsync on, one load generator (this process).
//!
//! Systems:
//! - `echo`: a tonic unary echo server in its own process (this binary re-executed), 16
//!   connections: the ceiling of a gRPC request/response on this machine.
//! - `etcd`: 3 members of Debian's etcd (3.4) on 127.0.0.1/.2/.3, free ports, fsync on;
//!   requests go to the leader (etcd's best case: no forwarding) over 16 connections, through
//!   stubs generated from a minimal copy of etcd's rpc.proto (`benchkit/`). Installed by
//!   `scripts/install-etcd.sh` if missing.
//! - `flotilla-client`: 3 `flotilla-node` processes (built by cargo, default settings, 100 ms
//!   ticks) bootstrapped with 64 ranges, through the client library (`flotilla-client`: range
//!   and leader cache, one `Batch` stream per node, requests straight to each range's leader).
//! - `flotilla-unary`: the same nodes through plain unary gRPC, one `Put` RPC per put, sent
//!   round-robin over 16 connections spread over the 3 nodes (what a client in another
//!   language does: a follower forwards to the leader).
//!
//! Keys are spread over the 64 ranges: each request picks a range uniformly at random and
//! writes `k<range as 8 digits>/<caller>-<n % 1000>` (range i of the bootstrap layout starts at
//! `k<i as 8 digits>`), the same keys for every system. Values are 16 bytes. Each caller does
//! one request at a time and waits for its answer. Batched case (`batch` 16): 16 puts per
//! request, all in one range (atomic there): etcd `Txn` of 16 puts, Flotilla's multi-put
//! through the client library.
//!
//! Per case: `COMPARE_WARMUP_SECS` (default 1) of warm-up, then `COMPARE_SECS` (default 10)
//! measured. Server CPU is user + system time of the server processes (`/proc/<pid>/stat`,
//! the three processes together) over the measured window, per acknowledged write.
//! Environment: `COMPARE_CALLERS` (default `1,64,256`), `COMPARE_BATCH_CALLERS` (callers of
//! the batched case, default `64,256`), `COMPARE_SYSTEMS` (default
//! `echo,etcd,flotilla-client,flotilla-unary`), `COMPARE_CONNECTIONS` (default 16),
//! `COMPARE_RANGES` (default 64), `COMPARE_NODE_BIN` (the `flotilla-node` binary to start
//! instead of the one cargo built: an A/B of two builds in one session) and
//! `COMPARE_NODE_CONFIG` (a TOML config file passed to every node with `--config`: an A/B of
//! settings with one binary).
//!
//! Prints one line per system, caller count and batch, then the ratios to etcd and a table:
//!
//! ```text
//! RESULT {"system":"etcd","callers":256,"batch":1,"writes_per_sec":X,"p50_ms":X,"p99_ms":X,"server_cpu_us_per_write":X,"errors":N}
//! RATIO {"system":"flotilla-client","callers":256,"batch":1,"writes_vs_etcd":X,"p50_vs_etcd":X,"p99_vs_etcd":X,"cpu_vs_etcd":X}
//! ```

use std::future::Future;
use std::io::BufRead as _;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use flotilla::layout::range_start_key;
use flotilla::proto::admin::admin_client::AdminClient;
use flotilla::proto::admin::RangesRequest;
use flotilla::proto::kv::kv_client::KvClient;
use flotilla::proto::kv::PutRequest;
use flotilla::testing::measure::percentile;
use flotilla_benchkit::echopb::echo_client::EchoClient;
use flotilla_benchkit::echopb::EchoMessage;
use flotilla_benchkit::etcdpb::kv_client::KvClient as EtcdKv;
use flotilla_benchkit::etcdpb::{self, request_op, RequestOp, TxnRequest};
use flotilla_benchkit::{free_addr, Children, Etcd};
use flotilla_client::{Client, ClientConfig};
use tonic::transport::{Channel, Endpoint};

const VALUE: &[u8; 16] = b"0123456789abcdef";
const ROLE: &str = "FLOTILLA_COMPARE_ROLE";

struct Settings {
    secs: f64,
    warmup: f64,
    callers: Vec<usize>,
    batch_callers: Vec<usize>,
    systems: Vec<String>,
    connections: usize,
    ranges: u64,
}

fn env_list(name: &str, default: &str) -> Vec<String> {
    std::env::var(name)
        .unwrap_or_else(|_| default.into())
        .split(',')
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty())
        .collect()
}

fn env_num(name: &str, default: f64) -> f64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

impl Settings {
    fn from_env() -> Settings {
        let nums = |name, default| {
            env_list(name, default)
                .iter()
                .map(|s| s.parse().expect("a number"))
                .collect()
        };
        Settings {
            secs: env_num("COMPARE_SECS", 10.0),
            warmup: env_num("COMPARE_WARMUP_SECS", 1.0),
            callers: nums("COMPARE_CALLERS", "1,64,256"),
            batch_callers: nums("COMPARE_BATCH_CALLERS", "64,256"),
            systems: env_list(
                "COMPARE_SYSTEMS",
                "echo,etcd,flotilla-client,flotilla-unary",
            ),
            connections: env_num("COMPARE_CONNECTIONS", 16.0) as usize,
            ranges: env_num("COMPARE_RANGES", 64.0) as u64,
        }
    }

    fn runs(&self, system: &str) -> bool {
        self.systems.iter().any(|s| s == system)
    }
}

/// One measured case.
#[derive(Debug, Clone)]
struct Measured {
    system: String,
    callers: usize,
    batch: usize,
    writes_per_sec: f64,
    p50_ms: f64,
    p99_ms: f64,
    cpu_us_per_write: f64,
    errors: u64,
}

impl Measured {
    fn print(&self) {
        println!(
            "RESULT {{\"system\":\"{}\",\"callers\":{},\"batch\":{},\"writes_per_sec\":{:.0},\"p50_ms\":{:.3},\"p99_ms\":{:.3},\"server_cpu_us_per_write\":{:.1},\"errors\":{}}}",
            self.system,
            self.callers,
            self.batch,
            self.writes_per_sec,
            self.p50_ms,
            self.p99_ms,
            self.cpu_us_per_write,
            self.errors
        );
    }
}

/// The key of request `n` of `caller` in range `range`.
fn key(range: u64, caller: usize, n: u64) -> Vec<u8> {
    let mut k = range_start_key(range);
    k.extend_from_slice(format!("/{caller}-{}", n % 1000).as_bytes());
    k
}

fn random_range(ranges: u64) -> u64 {
    rand::random::<u64>() % ranges + 1
}

/// Runs `callers` callers, each calling `op(caller, n)` for n = 0, 1, ... one at a time, for
/// the warm-up and then the measured window; `batch` writes per call.
async fn run_case<F, Fut>(
    s: &Settings,
    system: &str,
    callers: usize,
    batch: usize,
    servers: &[u32],
    op: F,
) -> Measured
where
    F: Fn(usize, u64) -> Fut + Send + Sync + Clone + 'static,
    Fut: Future<Output = Result<(), String>> + Send,
{
    let measuring = Arc::new(AtomicBool::new(false));
    let stop = Arc::new(AtomicBool::new(false));
    let mut tasks = Vec::new();
    for caller in 0..callers {
        let (op, measuring, stop) = (op.clone(), measuring.clone(), stop.clone());
        tasks.push(tokio::spawn(async move {
            let mut lat = Vec::new();
            let mut errors = 0u64;
            let mut last_error = None;
            let mut n = 0u64;
            while !stop.load(Ordering::Relaxed) {
                let t0 = Instant::now();
                let r = op(caller, n).await;
                n += 1;
                let counted = measuring.load(Ordering::Relaxed);
                match r {
                    Ok(()) if counted => lat.push(t0.elapsed().as_secs_f64() * 1000.0),
                    Ok(()) => {}
                    Err(e) => {
                        if counted {
                            errors += 1;
                        }
                        last_error = Some(e);
                        tokio::time::sleep(Duration::from_millis(10)).await;
                    }
                }
            }
            (lat, errors, last_error)
        }));
    }
    let cpu = |pids: &[u32]| -> f64 {
        pids.iter()
            .map(|p| flotilla_benchkit::cpu_seconds(*p))
            .sum()
    };
    tokio::time::sleep(Duration::from_secs_f64(s.warmup)).await;
    let (cpu0, t0) = (cpu(servers), Instant::now());
    measuring.store(true, Ordering::Relaxed);
    tokio::time::sleep(Duration::from_secs_f64(s.secs)).await;
    measuring.store(false, Ordering::Relaxed);
    let (cpu1, elapsed) = (cpu(servers), t0.elapsed().as_secs_f64());
    stop.store(true, Ordering::Relaxed);
    let mut lat = Vec::new();
    let mut errors = 0;
    for t in tasks {
        let (l, e, last) = t.await.expect("caller");
        lat.extend(l);
        errors += e;
        if let (Some(last), true) = (last, e > 0) {
            eprintln!("{system} caller error: {last}");
        }
    }
    lat.sort_by(|a, b| a.total_cmp(b));
    let writes = (lat.len() * batch) as f64;
    let m = Measured {
        system: system.into(),
        callers,
        batch,
        writes_per_sec: writes / elapsed,
        p50_ms: percentile(&lat, 0.5),
        p99_ms: percentile(&lat, 0.99),
        cpu_us_per_write: if writes > 0.0 {
            (cpu1 - cpu0) * 1e6 / writes
        } else {
            0.0
        },
        errors,
    };
    m.print();
    m
}

fn channels(endpoints: &[String], n: usize) -> Vec<Channel> {
    (0..n)
        .map(|i| {
            Endpoint::from_shared(endpoints[i % endpoints.len()].clone())
                .expect("endpoint")
                .tcp_nodelay(true)
                .connect_lazy()
        })
        .collect()
}

// ---- echo ----

/// The echo server process: this binary with `ROLE=echo`; prints its address.
fn echo_server_main() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        println!("ECHO {}", listener.local_addr().expect("addr"));
        flotilla_benchkit::serve_echo(listener)
            .await
            .expect("serve");
    });
}

async fn bench_echo(s: &Settings, out: &mut Vec<Measured>) {
    let mut child = Command::new(std::env::current_exe().expect("exe"))
        .env(ROLE, "echo")
        .stdout(Stdio::piped())
        .spawn()
        .expect("spawn echo server");
    let mut line = String::new();
    std::io::BufReader::new(child.stdout.take().expect("stdout"))
        .read_line(&mut line)
        .expect("echo address");
    let addr = line
        .trim()
        .strip_prefix("ECHO ")
        .expect("ECHO line")
        .to_string();
    let procs = Children(vec![child]);
    let chans = channels(&[format!("http://{addr}")], s.connections);
    let next = Arc::new(AtomicUsize::new(0));
    for &callers in &s.callers {
        let (chans, next) = (chans.clone(), next.clone());
        let op = move |_caller: usize, _n: u64| {
            let i = next.fetch_add(1, Ordering::Relaxed) % chans.len();
            let mut c = EchoClient::new(chans[i].clone());
            async move {
                c.echo(EchoMessage {
                    payload: bytes_of(VALUE),
                })
                .await
                .map(|_| ())
                .map_err(|e| e.to_string())
            }
        };
        out.push(run_case(s, "echo", callers, 1, &procs.pids(), op).await);
    }
}

fn bytes_of(b: &[u8]) -> flotilla_client::Bytes {
    flotilla_client::Bytes::copy_from_slice(b)
}

// ---- etcd ----

async fn bench_etcd(s: &Settings, out: &mut Vec<Measured>) -> anyhow::Result<()> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    flotilla_benchkit::ensure_etcd(&root.join("scripts/install-etcd.sh"))?;
    let dir = tempfile::tempdir()?;
    let etcd = Etcd::start(dir.path()).await?;
    let leader = etcd.leader().await?;
    println!("etcd: 3 members, leader {}", etcd.client_urls[leader]);
    let chans = channels(&[etcd.client_urls[leader].clone()], s.connections);
    let next = Arc::new(AtomicUsize::new(0));
    let pids = etcd.procs.pids();
    let ranges = s.ranges;
    for &callers in &s.callers {
        let (chans, next) = (chans.clone(), next.clone());
        let op = move |caller: usize, n: u64| {
            let i = next.fetch_add(1, Ordering::Relaxed) % chans.len();
            let mut c = EtcdKv::new(chans[i].clone());
            let req = etcdpb::PutRequest {
                key: key(random_range(ranges), caller, n).into(),
                value: bytes_of(VALUE),
                ..Default::default()
            };
            async move { c.put(req).await.map(|_| ()).map_err(|e| e.to_string()) }
        };
        out.push(run_case(s, "etcd", callers, 1, &pids, op).await);
    }
    for &callers in &s.batch_callers {
        let (chans, next) = (chans.clone(), next.clone());
        let op = move |caller: usize, n: u64| {
            let i = next.fetch_add(1, Ordering::Relaxed) % chans.len();
            let mut c = EtcdKv::new(chans[i].clone());
            let range = random_range(ranges);
            let success = (0..16)
                .map(|j| RequestOp {
                    request: Some(request_op::Request::RequestPut(etcdpb::PutRequest {
                        key: key(range, caller, n * 16 + j).into(),
                        value: bytes_of(VALUE),
                        ..Default::default()
                    })),
                })
                .collect();
            let req = TxnRequest {
                success,
                failure: vec![],
            };
            async move { c.txn(req).await.map(|_| ()).map_err(|e| e.to_string()) }
        };
        out.push(run_case(s, "etcd", callers, 16, &pids, op).await);
    }
    Ok(())
}

// ---- Flotilla ----

/// Three `flotilla-node` processes with `ranges` ranges; returns them and their client URLs
/// once every range has a leader.
async fn start_flotilla(dir: &Path, ranges: u64) -> anyhow::Result<(Children, Vec<String>)> {
    let raft: Vec<_> = (0..3)
        .map(|_| free_addr("127.0.0.1"))
        .collect::<Result<_, _>>()?;
    let client: Vec<_> = (0..3)
        .map(|_| free_addr("127.0.0.1"))
        .collect::<Result<_, _>>()?;
    let peers: Vec<String> = raft
        .iter()
        .enumerate()
        .map(|(i, a)| format!("{}={a}", i + 1))
        .collect();
    let mut procs = Children::default();
    for i in 0..3 {
        let log = std::fs::File::create(dir.join(format!("node-{}.log", i + 1)))?;
        let bin = std::env::var("COMPARE_NODE_BIN")
            .unwrap_or_else(|_| env!("CARGO_BIN_EXE_flotilla-node").to_string());
        let mut cmd = Command::new(bin);
        if let Ok(config) = std::env::var("COMPARE_NODE_CONFIG") {
            cmd.args(["--config", &config]);
        }
        let child = cmd
            .args(["--id", &(i + 1).to_string()])
            .args(["--raft", &raft[i].to_string()])
            .args(["--client", &client[i].to_string()])
            .args([
                "--data-dir",
                &dir.join(format!("n{}", i + 1)).display().to_string(),
            ])
            .args(["--peers", &peers.join(",")])
            .args(["--bootstrap-ranges", &ranges.to_string()])
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()?;
        procs.0.push(child);
    }
    let urls: Vec<String> = client.iter().map(|a| format!("http://{a}")).collect();
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        procs.check_alive()?;
        let mut leaders = [0usize; 3];
        let mut ready = 0;
        for url in &urls {
            let Ok(mut admin) = AdminClient::connect(url.clone()).await else {
                continue;
            };
            let Ok(r) = admin.ranges(RangesRequest {}).await else {
                continue;
            };
            let r = r.into_inner();
            if r.ranges.len() as u64 == ranges && r.ranges.iter().all(|x| x.leader_node_id != 0) {
                ready += 1;
                for x in &r.ranges {
                    if (1..=3).contains(&x.leader_node_id) && r.node_id == 1 {
                        leaders[x.leader_node_id as usize - 1] += 1;
                    }
                }
            }
        }
        if ready == 3 {
            println!("flotilla: 3 nodes, {ranges} ranges, leaders per node {leaders:?}");
            return Ok((procs, urls));
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "ranges without leader after 60 s"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

async fn bench_flotilla(s: &Settings, out: &mut Vec<Measured>) -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let (procs, urls) = start_flotilla(dir.path(), s.ranges).await?;
    let pids = procs.pids();
    let ranges = s.ranges;
    if s.runs("flotilla-client") {
        let client = Client::connect(ClientConfig::new(urls.clone())).await?;
        client.load_ranges().await?;
        for &callers in &s.callers {
            let client = client.clone();
            let op = move |caller: usize, n: u64| {
                let client = client.clone();
                let k = key(random_range(ranges), caller, n);
                async move {
                    client
                        .put(k, bytes_of(VALUE))
                        .await
                        .map_err(|e| e.to_string())
                }
            };
            out.push(run_case(s, "flotilla-client", callers, 1, &pids, op).await);
        }
        for &callers in &s.batch_callers {
            let client = client.clone();
            let op = move |caller: usize, n: u64| {
                let client = client.clone();
                let range = random_range(ranges);
                let pairs: Vec<(Vec<u8>, flotilla_client::Bytes)> = (0..16)
                    .map(|j| (key(range, caller, n * 16 + j), bytes_of(VALUE)))
                    .collect();
                async move { client.multi_put(pairs).await.map_err(|e| e.to_string()) }
            };
            out.push(run_case(s, "flotilla-client", callers, 16, &pids, op).await);
        }
        let st = client.stats();
        println!(
            "flotilla-client: {} requests in {} frames ({:.1} per frame), {} not-leader, {} epoch, {} no-answer",
            st.framed_requests,
            st.frames,
            st.framed_requests as f64 / st.frames.max(1) as f64,
            st.not_leader,
            st.epoch_not_match,
            st.no_answer
        );
    }
    if s.runs("flotilla-unary") {
        let chans = channels(&urls, s.connections);
        let next = Arc::new(AtomicUsize::new(0));
        for &callers in &s.callers {
            let (chans, next) = (chans.clone(), next.clone());
            let op = move |caller: usize, n: u64| {
                let i = next.fetch_add(1, Ordering::Relaxed) % chans.len();
                let mut c = KvClient::new(chans[i].clone());
                let req = PutRequest {
                    key: key(random_range(ranges), caller, n).into(),
                    value: bytes_of(VALUE),
                    client_id: 0,
                    seq: 0,
                    route: None,
                };
                async move { c.put(req).await.map(|_| ()).map_err(|e| e.to_string()) }
            };
            out.push(run_case(s, "flotilla-unary", callers, 1, &pids, op).await);
        }
    }
    Ok(())
}

fn report(results: &[Measured]) {
    let etcd = |callers: usize, batch: usize| {
        results
            .iter()
            .find(|m| m.system == "etcd" && m.callers == callers && m.batch == batch)
    };
    let ratio = |a: f64, b: f64| if b > 0.0 { a / b } else { 0.0 };
    for m in results.iter().filter(|m| m.system != "etcd") {
        if let Some(e) = etcd(m.callers, m.batch) {
            println!(
                "RATIO {{\"system\":\"{}\",\"callers\":{},\"batch\":{},\"writes_vs_etcd\":{:.2},\"p50_vs_etcd\":{:.2},\"p99_vs_etcd\":{:.2},\"cpu_vs_etcd\":{:.2}}}",
                m.system,
                m.callers,
                m.batch,
                ratio(m.writes_per_sec, e.writes_per_sec),
                ratio(m.p50_ms, e.p50_ms),
                ratio(m.p99_ms, e.p99_ms),
                ratio(m.cpu_us_per_write, e.cpu_us_per_write),
            );
        }
    }
    println!();
    println!("| system | callers | batch | writes/s | p50 ms | p99 ms | server CPU µs/write | errors | writes × etcd |");
    println!("|---|---:|---:|---:|---:|---:|---:|---:|---:|");
    for m in results {
        let vs = etcd(m.callers, m.batch)
            .filter(|_| m.system != "etcd")
            .map_or("".to_string(), |e| {
                format!("{:.2}", ratio(m.writes_per_sec, e.writes_per_sec))
            });
        println!(
            "| {} | {} | {} | {:.0} | {:.2} | {:.2} | {:.1} | {} | {} |",
            m.system,
            m.callers,
            m.batch,
            m.writes_per_sec,
            m.p50_ms,
            m.p99_ms,
            m.cpu_us_per_write,
            m.errors,
            vs
        );
    }
}

fn main() -> anyhow::Result<()> {
    if std::env::var(ROLE).as_deref() == Ok("echo") {
        echo_server_main();
        return Ok(());
    }
    let s = Settings::from_env();
    println!(
        "compare: {} s measured per case after {} s of warm-up; callers {:?}, batched {:?}; systems {:?}",
        s.secs, s.warmup, s.callers, s.batch_callers, s.systems
    );
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    rt.block_on(async {
        let mut results = Vec::new();
        if s.runs("echo") {
            bench_echo(&s, &mut results).await;
        }
        if s.runs("etcd") {
            bench_etcd(&s, &mut results).await?;
        }
        if s.runs("flotilla-client") || s.runs("flotilla-unary") {
            bench_flotilla(&s, &mut results).await?;
        }
        report(&results);
        anyhow::Ok(())
    })
}
