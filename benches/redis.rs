//! Flotilla's Redis protocol beside a durable single-node Redis, in one run on one machine
//! (issue 13's Measure section): `redis-benchmark -t set,get -n N -r 100000 -c 50` with `-P 1`
//! and `-P 16` against
//! - `redis`: Debian's `redis-server` on a free port with `--appendonly yes --appendfsync
//!   always` (every write fsynced before it is answered: the durable single-node reference),
//!   data in a temporary directory;
//! - `flotilla`: three `flotilla-node` processes (started by the shared launcher,
//!   `flotilla_benchkit::nodes`; gRPC transport between them on loopback, one RocksDB engine
//!   each in a temporary directory, fsync on, default settings: 100 ms ticks) with
//!   `REDIS_BENCH_RANGES` ranges (default 12) that cut redis-benchmark's key space
//!   (`key:000000000000` to `key:000000099999`) evenly: one range at start, split at the
//!   boundaries over the admin API, leaders then moved round-robin over the nodes; the
//!   benchmark talks to node 1's Redis port, which forwards writes to ranges led elsewhere
//!   and reads the others' ranges linearizably from its own replicas (ReadIndex). So the
//!   comparison is process against process.
//!
//! Every write is replicated to three nodes and fsynced on a quorum before it is answered.
//! Environment: `REDIS_BENCH_N` (requests per test, default 200000), `REDIS_BENCH_RUNS`
//! (runs per case, default 3: the median is reported), `REDIS_BENCH_PIPELINES` (default
//! `1,16`). Needs `redis-server` and `redis-benchmark` (`apt-get install redis-server
//! redis-tools`). Prints one line per system, test and pipeline depth, then the ratios:
//!
//! ```text
//! RESULT {"system":"redis","test":"set","pipeline":16,"ops_per_sec":X,"p50_ms":X}
//! RATIO {"test":"set","pipeline":16,"flotilla_vs_redis":X}
//! ```

use std::net::SocketAddr;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use flotilla::proto::admin::admin_client::AdminClient;
use flotilla::proto::admin::{split_request, RangesRequest, SplitRequest, TransferLeaderRequest};
use flotilla_benchkit::nodes::{Layout, NodeProcs};
use flotilla_benchkit::{free_addr, Children};
use tonic::transport::Channel;

fn env<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// Runs redis-benchmark for one test and returns (ops/s, p50 ms) from its CSV output.
fn bench(addr: SocketAddr, test: &str, n: usize, pipeline: usize) -> anyhow::Result<(f64, f64)> {
    let out = Command::new("redis-benchmark")
        .args(["-h", &addr.ip().to_string(), "-p", &addr.port().to_string()])
        .args(["-t", test, "-n", &n.to_string(), "-r", "100000", "-c", "50"])
        .args(["-P", &pipeline.to_string(), "--csv"])
        .stderr(Stdio::inherit())
        .output()?;
    anyhow::ensure!(out.status.success(), "redis-benchmark failed: {out:?}");
    let text = String::from_utf8_lossy(&out.stdout);
    // "test","rps","avg_latency_ms","min_latency_ms","p50_latency_ms",...
    for line in text.lines() {
        let cols: Vec<&str> = line.split(',').map(|c| c.trim_matches('"')).collect();
        if cols.len() >= 5 && cols[0].eq_ignore_ascii_case(test) {
            return Ok((cols[1].parse()?, cols[4].parse()?));
        }
    }
    anyhow::bail!("no {test} line in redis-benchmark's output: {text}")
}

/// Calls `call` on each node in turn until one succeeds (only a range's leader splits it or
/// hands its leadership on; the others refuse), for up to 30 s.
async fn on_some_node<T, F, Fut>(
    admins: &[AdminClient<Channel>],
    what: &str,
    call: F,
) -> anyhow::Result<T>
where
    F: Fn(AdminClient<Channel>) -> Fut,
    Fut: std::future::Future<Output = Result<tonic::Response<T>, tonic::Status>>,
{
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let mut last = None;
        for a in admins {
            match call(a.clone()).await {
                Ok(r) => return Ok(r.into_inner()),
                Err(e) => last = Some(e),
            }
        }
        anyhow::ensure!(Instant::now() < deadline, "{what}: {last:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Splits the one range at `boundaries` (in order), then moves range `i`'s leadership to node
/// `i % 3 + 1`, and returns once every node sees each range led where it should be.
async fn lay_out(clients: &[SocketAddr], boundaries: &[Vec<u8>]) -> anyhow::Result<()> {
    let admins: Vec<AdminClient<Channel>> = clients
        .iter()
        .map(|a| {
            let ch = Channel::from_shared(format!("http://{a}"))?.connect_lazy();
            Ok(AdminClient::new(ch))
        })
        .collect::<anyhow::Result<_>>()?;
    let mut ids = Vec::new();
    for at in boundaries {
        let halves = on_some_node(&admins, "split", |mut a| {
            let req = SplitRequest {
                range: Some(split_request::Range::RangeKey(at.clone().into())),
                split_key: at.clone().into(),
            };
            async move { a.split(req).await }
        })
        .await?;
        if ids.is_empty() {
            ids.push(halves.left.map_or(0, |r| r.range_id));
        }
        ids.push(halves.right.map_or(0, |r| r.range_id));
    }
    if ids.is_empty() {
        ids.push(
            on_some_node(&admins, "ranges", |mut a| async move {
                a.ranges(RangesRequest {}).await
            })
            .await?
            .ranges[0]
                .range_id,
        );
    }
    for (i, &range) in ids.iter().enumerate() {
        let to = (i % 3) as u64 + 1;
        on_some_node(&admins, "transfer-leader", |mut a| async move {
            a.transfer_leader(TransferLeaderRequest {
                range_id: range,
                to_node_id: to,
            })
            .await
        })
        .await?;
    }
    let deadline = Instant::now() + Duration::from_secs(30);
    'wait: loop {
        anyhow::ensure!(Instant::now() < deadline, "the leaders did not settle");
        for a in &admins {
            let table = a.clone().ranges(RangesRequest {}).await?.into_inner();
            let placed = ids.iter().enumerate().all(|(i, id)| {
                table
                    .ranges
                    .iter()
                    .any(|r| r.range_id == *id && r.leader_node_id == (i % 3) as u64 + 1)
            });
            if !placed {
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue 'wait;
            }
        }
        return Ok(());
    }
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn main() -> anyhow::Result<()> {
    for tool in ["redis-server", "redis-benchmark"] {
        if Command::new(tool).arg("--version").output().is_err() {
            anyhow::bail!("{tool} is not installed: apt-get install redis-server redis-tools");
        }
    }
    let n: usize = env("REDIS_BENCH_N", 200_000);
    let runs: usize = env("REDIS_BENCH_RUNS", 3).max(1);
    let ranges: usize = env("REDIS_BENCH_RANGES", 12).max(1);
    let pipelines: Vec<usize> = std::env::var("REDIS_BENCH_PIPELINES")
        .unwrap_or_else(|_| "1,16".into())
        .split(',')
        .filter_map(|p| p.trim().parse().ok())
        .collect();
    let dir = tempfile::tempdir()?;

    // The durable single-node reference.
    let redis_addr = free_addr("127.0.0.1")?;
    let redis_dir = dir.path().join("redis");
    std::fs::create_dir_all(&redis_dir)?;
    let mut children = Children::default();
    children.0.push(
        Command::new("redis-server")
            .args([
                "--port",
                &redis_addr.port().to_string(),
                "--bind",
                "127.0.0.1",
            ])
            .args([
                "--appendonly",
                "yes",
                "--appendfsync",
                "always",
                "--save",
                "",
            ])
            .arg("--dir")
            .arg(&redis_dir)
            .stdout(Stdio::null())
            .spawn()?,
    );

    // Three flotilla-node processes with a Redis port each: one range at first, split at the
    // boundaries below, each range's leadership then moved to its node in turn.
    let layout = Layout::local(3, 1)?.with_redis()?;
    let flotilla_addr = layout.redis[0];
    let procs = NodeProcs::start(Path::new(env!("CARGO_BIN_EXE_flotilla-node")), layout)?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let boundaries: Vec<Vec<u8>> = (1..ranges)
        .map(|i| format!("key:{:012}", i * 100_000 / ranges).into_bytes())
        .collect();
    rt.block_on(lay_out(&procs.client, &boundaries))?;
    // The reference is up once it answers.
    let deadline = Instant::now() + Duration::from_secs(10);
    while std::net::TcpStream::connect(redis_addr).is_err() {
        anyhow::ensure!(Instant::now() < deadline, "redis-server did not start");
        std::thread::sleep(Duration::from_millis(20));
    }

    let mut results = Vec::new();
    for &p in &pipelines {
        for test in ["set", "get"] {
            for (system, addr) in [("redis", redis_addr), ("flotilla", flotilla_addr)] {
                let (mut ops, mut p50) = (Vec::new(), Vec::new());
                for _ in 0..runs {
                    let (o, l) = bench(addr, test, n, p)?;
                    ops.push(o);
                    p50.push(l);
                }
                let (ops, p50) = (median(ops), median(p50));
                println!(
                    "RESULT {{\"system\":\"{system}\",\"test\":\"{test}\",\"pipeline\":{p},\
                     \"ops_per_sec\":{ops:.0},\"p50_ms\":{p50:.3}}}"
                );
                results.push((system, test, p, ops));
            }
        }
    }
    for &p in &pipelines {
        for test in ["set", "get"] {
            let find = |sys: &str| {
                results
                    .iter()
                    .find(|r| r.0 == sys && r.1 == test && r.2 == p)
                    .map_or(0.0, |r| r.3)
            };
            let (r, f) = (find("redis"), find("flotilla"));
            println!(
                "RATIO {{\"test\":\"{test}\",\"pipeline\":{p},\"flotilla_vs_redis\":{:.2}}}",
                if r > 0.0 { f / r } else { 0.0 }
            );
        }
    }
    drop(procs);
    drop(children);
    Ok(())
}
