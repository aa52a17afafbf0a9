//! Flotilla's Redis protocol beside a durable single-node Redis, in one run on one machine
//! (issue 13's Measure section): `redis-benchmark -t set,get -n N -r 100000 -c 50` with `-P 1`
//! and `-P 16` against
//! - `redis`: Debian's `redis-server` on a free port with `--appendonly yes --appendfsync
//!   always` (every write fsynced before it is answered: the durable single-node reference),
//!   data in a temporary directory;
//! - `flotilla`: three Flotilla nodes in this process (gRPC transport between them on
//!   loopback, one RocksDB engine each in a temporary directory, fsync on, default settings: 100 ms ticks) with
//!   `REDIS_BENCH_RANGES` ranges (default 12) that cut redis-benchmark's key space
//!   (`key:000000000000` to `key:000000099999`) evenly, leaders spread over the nodes; the
//!   benchmark talks to node 1's Redis port, which forwards writes to ranges led elsewhere
//!   and reads the others' ranges linearizably from its own replicas (ReadIndex).
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
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use flotilla::layout::{first_campaigner, range_layout};
use flotilla::testing::{
    bootstrap_ranges_and_system, local_server_config, node_ids, start_servers,
};
use flotilla::{NodeGroupConfig, RangeId, StateRole};
use flotilla_benchkit::{free_addr, Children};

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

    // Three Flotilla nodes with a Redis port each.
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let configs = (1..=3)
        .map(|id| {
            let mut c = local_server_config(NodeGroupConfig::new(id), dir.path());
            c.redis_addr = Some("127.0.0.1:0".parse().expect("an address"));
            c
        })
        .collect();
    let servers = start_servers(configs, rt.handle().clone())?;
    let members = node_ids(3);
    let mut layout = range_layout(ranges, &members);
    let start = |i: usize| format!("key:{:012}", i * 100_000 / ranges).into_bytes();
    for (i, d) in layout.iter_mut().enumerate() {
        d.start_key = if i == 0 { Vec::new() } else { start(i) }.into();
        d.end_key = if i + 1 == ranges {
            Vec::new()
        } else {
            start(i + 1)
        }
        .into();
    }
    for s in &servers {
        bootstrap_ranges_and_system(s.node(), layout.clone())?;
    }
    for d in &layout {
        if let Some(c) = first_campaigner(d.id(), &members) {
            servers[c.0 as usize - 1].node().campaign(d.id())?;
        }
    }
    let deadline = Instant::now() + Duration::from_secs(30);
    for d in &layout {
        while !servers.iter().any(|s| {
            s.node()
                .status(RangeId(d.range_id))
                .is_ok_and(|st| st.role == StateRole::Leader)
        }) {
            anyhow::ensure!(Instant::now() < deadline, "no leader for r{}", d.range_id);
            std::thread::sleep(Duration::from_millis(10));
        }
    }
    let flotilla_addr = servers[0].redis_addr().expect("a redis port");
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
    for s in &servers {
        s.shutdown();
    }
    drop(children);
    Ok(())
}
