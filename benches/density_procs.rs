//! Group density on real processes: three `flotilla-node` processes on 127.0.0.1, .2 and .3,
//! each hosting N three-replica groups (every range on every node, leaders spread over the
//! three by the bootstrap layout), with hibernation on (the default).
//!
//! For each N it measures and prints one line:
//! `RESULT {"groups_per_node":N,"rss_bytes_per_replica":X,"idle_cpu_pct_per_node":X,
//! "heartbeat_rpcs_per_pair_per_sec":X,"create_secs":X,"restart_secs":X,"failover_secs":X,
//! "awake_groups":N,"elections_on_failover":N}` where
//! - `create_secs`: from the start of the processes until the leaders add up to N;
//! - `rss_bytes_per_replica`: (mean RSS of the nodes once every group sleeps − mean RSS of
//!   nodes without groups) / N;
//! - `idle_cpu_pct_per_node`: mean CPU of a node over `--idle-secs` (30) with every group
//!   asleep, in % of one core;
//! - `heartbeat_rpcs_per_pair_per_sec`: coalesced heartbeat batches sent per ordered node pair
//!   per second while idle (counted by the nodes), plus the transport's pings on idle streams
//!   (2 per second per pair at the node's default settings: `ping_interval` is a quarter of
//!   the 2 s liveness window);
//! - `restart_secs`: kill -9 of node 3, restart, until its paced wake queue is empty and every
//!   group is asleep again (every leader saw node 3's replicas caught up);
//! - `failover_secs`: kill -9 of node 1 (the first campaigner of a third of the ranges) until
//!   the two others lead all N groups and a sample of 200 ranges node 1 led took a write
//!   through them; `elections_on_failover` counts the elections the survivors won meanwhile;
//! - `awake_groups`: replicas awake on the three nodes during the idle measurement.
//!
//! A plot of RSS per replica and idle CPU against N is saved as `density_procs.png` in the
//! target directory (`target/criterion`'s parent), next to `density_procs.json` with the lines.
//!
//! Run: `cargo bench --bench density_procs` (N = 10,000, 50,000, 100,000), or choose:
//! `cargo bench --bench density_procs -- --groups 10000,20000 --idle-secs 10`.
//! Without `--bench` (as `cargo test` runs benches) it does one quick round with N = 300.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use flotilla::layout::{first_campaigner, range_start_key};
use flotilla::proto::kv::kv_client::KvClient;
use flotilla::proto::kv::{PutRequest, StatusRequest, StatusResponse};
use flotilla::{NodeId, RangeId};
use flotilla_benchkit::free_addr;
use flotilla_benchkit::nodes::{Layout, NodeProcs};
use tonic::transport::Channel;

const NODES: usize = 3;

/// The three nodes, on 127.0.0.1, .2 and .3 (the shared launcher kills them on drop).
fn start_procs(groups: usize) -> NodeProcs {
    let ips: Vec<String> = (1..=NODES).map(|i| format!("127.0.0.{i}")).collect();
    let free = |ip: &String| free_addr(ip).expect("a free port on loopback");
    let layout = Layout {
        raft: ips.iter().map(free).collect(),
        client: ips.iter().map(free).collect(),
        redis: Vec::new(),
        ranges: groups,
        extra: Vec::new(),
    };
    NodeProcs::start(Path::new(env!("CARGO_BIN_EXE_flotilla-node")), layout)
        .expect("start flotilla-node processes")
}

/// The pid of running node `i`.
fn pid(p: &NodeProcs, i: usize) -> u32 {
    p.pid(i).expect("running")
}

fn proc_field(pid: u32, file: &str) -> String {
    std::fs::read_to_string(format!("/proc/{pid}/{file}")).unwrap_or_default()
}

fn rss_bytes(pid: u32) -> u64 {
    proc_field(pid, "status")
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|kb| kb.parse::<u64>().ok())
        .unwrap_or(0)
        * 1024
}

/// utime + stime of a process, in seconds (USER_HZ is 100 on Linux).
fn cpu_secs(pid: u32) -> f64 {
    let stat = proc_field(pid, "stat");
    // Fields after the command name, which is in parentheses and may hold spaces.
    let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| f.get(i).and_then(|s| s.parse::<u64>().ok()).unwrap_or(0);
    // utime and stime are fields 14 and 15 of stat; `rest` starts at field 3.
    (ticks(11) + ticks(12)) as f64 / 100.0
}

async fn client(addr: SocketAddr) -> Option<KvClient<Channel>> {
    let ch = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
        .ok()?
        .connect_timeout(Duration::from_millis(500))
        .timeout(Duration::from_secs(10))
        .connect()
        .await
        .ok()?;
    Some(KvClient::new(ch))
}

async fn status(addr: SocketAddr) -> Option<StatusResponse> {
    let mut c = client(addr).await?;
    c.status(StatusRequest {})
        .await
        .ok()
        .map(|r| r.into_inner())
}

/// Status of every node in `which` (None for a node that does not answer).
async fn statuses(p: &NodeProcs, which: &[usize]) -> Vec<Option<StatusResponse>> {
    let mut out = Vec::new();
    for &i in which {
        out.push(status(p.client[i]).await);
    }
    out
}

async fn wait_for<F>(what: &str, timeout: Duration, mut cond: F) -> Duration
where
    F: AsyncFnMut() -> bool,
{
    let t = Instant::now();
    while !cond().await {
        assert!(t.elapsed() < timeout, "{what}: not within {timeout:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    t.elapsed()
}

fn all() -> Vec<usize> {
    (0..NODES).collect()
}

async fn everything_asleep(p: &NodeProcs, which: &[usize]) -> bool {
    asleep(&statuses(p, which).await)
}

fn asleep(st: &[Option<StatusResponse>]) -> bool {
    st.iter().all(|s| {
        s.as_ref()
            .is_some_and(|s| s.awake == 0 && s.queued_wakes == 0)
    })
}

/// Every 10 s of a long wait, what each node reports (a stuck step shows where it is stuck).
fn show_progress(shown: &mut Instant, groups: usize, what: &str, st: &[Option<StatusResponse>]) {
    show_every(Duration::from_secs(10), shown, groups, what, st)
}

/// What each node reports, every `period` (the restart and failover steps, which last seconds,
/// show each second: where their time goes).
fn show_every(
    period: Duration,
    shown: &mut Instant,
    groups: usize,
    what: &str,
    st: &[Option<StatusResponse>],
) {
    if shown.elapsed() < period {
        return;
    }
    *shown = Instant::now();
    let show: Vec<String> = st
        .iter()
        .map(|s| match s {
            Some(s) => format!(
                "{} replicas, {} leaders, {} awake, {} queued, {} won",
                s.replicas, s.leaders, s.awake, s.queued_wakes, s.elections_won
            ),
            None => "no answer".into(),
        })
        .collect();
    eprintln!("{groups}: {what}: {show:?}");
}

/// Mean RSS of three processes without groups.
async fn empty_rss() -> f64 {
    let p = start_procs(0);
    wait_for("empty nodes answer", Duration::from_secs(60), async || {
        statuses(&p, &all()).await.iter().all(Option::is_some)
    })
    .await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    (0..NODES)
        .map(|i| rss_bytes(pid(&p, i)) as f64)
        .sum::<f64>()
        / NODES as f64
}

#[derive(Debug, Clone)]
struct Row {
    groups: usize,
    rss_per_replica: f64,
    idle_cpu_pct: f64,
    heartbeat_rpcs: f64,
    create_secs: f64,
    restart_secs: f64,
    failover_secs: f64,
    awake: u64,
    failover_elections: u64,
}

async fn measure(groups: usize, idle: Duration, base_rss: f64) -> Row {
    let mut p = start_procs(groups);
    let t0 = Instant::now();
    let long = Duration::from_secs(900);
    let mut shown = Instant::now();
    wait_for("every range has a leader", long, async || {
        let st = statuses(&p, &all()).await;
        show_progress(&mut shown, groups, "waiting for leaders", &st);
        st.iter().flatten().map(|s| s.leaders).sum::<u64>() >= groups as u64
    })
    .await;
    let create_secs = t0.elapsed().as_secs_f64();
    eprintln!("{groups}: every range has a leader after {create_secs:.1}s");
    wait_for("every group asleep", long, async || {
        everything_asleep(&p, &all()).await
    })
    .await;
    eprintln!(
        "{groups}: every group asleep after {:.1}s",
        t0.elapsed().as_secs_f64()
    );
    tokio::time::sleep(Duration::from_secs(2)).await;

    // Memory and idle CPU, every group asleep.
    let rss = (0..NODES)
        .map(|i| rss_bytes(pid(&p, i)) as f64)
        .sum::<f64>()
        / NODES as f64;
    let rss_per_replica = (rss - base_rss) / groups as f64;
    let hb0: u64 = statuses(&p, &all())
        .await
        .iter()
        .flatten()
        .map(|s| s.heartbeat_batches)
        .sum();
    let cpu0: Vec<f64> = (0..NODES).map(|i| cpu_secs(pid(&p, i))).collect();
    let t = Instant::now();
    tokio::time::sleep(idle).await;
    let secs = t.elapsed().as_secs_f64();
    let cpu1: Vec<f64> = (0..NODES).map(|i| cpu_secs(pid(&p, i))).collect();
    let st = statuses(&p, &all()).await;
    let hb1: u64 = st.iter().flatten().map(|s| s.heartbeat_batches).sum();
    let awake: u64 = st.iter().flatten().map(|s| s.awake).sum();
    let idle_cpu_pct =
        (0..NODES).map(|i| cpu1[i] - cpu0[i]).sum::<f64>() / NODES as f64 / secs * 100.0;
    let pairs = (NODES * (NODES - 1)) as f64;
    // Pings: every 500 ms per idle stream at the node's defaults (100 ms ticks, 2 s window).
    let heartbeat_rpcs = (hb1 - hb0) as f64 / pairs / secs + 2.0;
    eprintln!(
        "{groups}: idle {idle_cpu_pct:.2}% CPU per node, {awake} awake, RSS {:.0} B per replica",
        rss_per_replica
    );

    // Restart of node 3.
    p.kill(2);
    let t = Instant::now();
    p.spawn(2).expect("restart node 3");
    let mut shown = Instant::now();
    let mut answered = None;
    let mut led_again = None;
    wait_for("node 3 recovered and caught up", long, async || {
        let st = statuses(&p, &all()).await;
        if answered.is_none() && st[2].is_some() {
            answered = Some(t.elapsed());
        }
        if led_again.is_none()
            && st.iter().flatten().map(|s| s.leaders).sum::<u64>() >= groups as u64
        {
            led_again = Some(t.elapsed());
        }
        show_every(
            Duration::from_secs(1),
            &mut shown,
            groups,
            "waiting for the restart",
            &st,
        );
        st[2].as_ref().is_some_and(|s| s.replicas >= groups as u64) && asleep(&st)
    })
    .await;
    let restart_secs = t.elapsed().as_secs_f64();
    // What node 3 logged of its start (with RUST_LOG=info: engine opened, replicas recovered).
    for line in p.log_tail(2, 200).lines() {
        if line.contains("engine opened")
            || line.contains("recovered replicas")
            || line.contains("memtables flushed")
        {
            eprintln!("{groups}: node 3: {line}");
        }
    }
    eprintln!(
        "{groups}: node 3 restarted and caught up in {restart_secs:.1}s (answering after {answered:.1?}, every range led after {led_again:.1?})"
    );

    // Failover: kill node 1; the two others must lead everything and take writes.
    let survivors = [1usize, 2];
    let won0: u64 = statuses(&p, &survivors)
        .await
        .iter()
        .flatten()
        .map(|s| s.elections_won)
        .sum();
    let nodes: Vec<NodeId> = (1..=NODES as u64).map(NodeId).collect();
    let led_by_1: Vec<u64> = (1..=groups as u64)
        .filter(|&r| first_campaigner(RangeId(r), &nodes) == Some(NodeId(1)))
        .collect();
    let step = (led_by_1.len() / 200).max(1);
    let sample: Vec<u64> = led_by_1.iter().step_by(step).copied().collect();
    p.kill(0);
    let t = Instant::now();
    let mut shown = Instant::now();
    let led = wait_for("the survivors lead every range", long, async || {
        let st = statuses(&p, &survivors).await;
        show_every(
            Duration::from_secs(1),
            &mut shown,
            groups,
            "waiting for the failover",
            &st,
        );
        st.iter().flatten().map(|s| s.leaders).sum::<u64>() >= groups as u64
    })
    .await;
    eprintln!("{groups}: the survivors lead every range after {led:.1?}");
    for r in &sample {
        let mut key = range_start_key(*r);
        key.extend_from_slice(b"/failover");
        let deadline = Instant::now() + long;
        'retry: loop {
            for &i in &survivors {
                if let Some(mut c) = client(p.client[i]).await {
                    let put = PutRequest {
                        key: key.clone().into(),
                        value: b"v".to_vec().into(),
                        ..Default::default()
                    };
                    if c.put(put).await.is_ok() {
                        break 'retry;
                    }
                }
            }
            assert!(
                Instant::now() < deadline,
                "no write to range {r} after the failover"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    let failover_secs = t.elapsed().as_secs_f64();
    let won1: u64 = statuses(&p, &survivors)
        .await
        .iter()
        .flatten()
        .map(|s| s.elections_won)
        .sum();
    eprintln!(
        "{groups}: failover of node 1's {} groups in {failover_secs:.1}s, {} elections",
        led_by_1.len(),
        won1 - won0
    );
    Row {
        groups,
        rss_per_replica,
        idle_cpu_pct,
        heartbeat_rpcs,
        create_secs,
        restart_secs,
        failover_secs,
        awake,
        failover_elections: won1 - won0,
    }
}

fn line(r: &Row) -> String {
    format!(
        "RESULT {{\"groups_per_node\":{},\"rss_bytes_per_replica\":{:.0},\"idle_cpu_pct_per_node\":{:.2},\"heartbeat_rpcs_per_pair_per_sec\":{:.2},\"create_secs\":{:.1},\"restart_secs\":{:.1},\"failover_secs\":{:.1},\"awake_groups\":{},\"elections_on_failover\":{}}}",
        r.groups,
        r.rss_per_replica,
        r.idle_cpu_pct,
        r.heartbeat_rpcs,
        r.create_secs,
        r.restart_secs,
        r.failover_secs,
        r.awake,
        r.failover_elections
    )
}

/// Where results go: the target directory (next to `criterion/`).
fn out_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("bench path");
    // target/release/deps/density_procs-… → target/
    exe.ancestors()
        .nth(3)
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from("."))
}

fn plot(rows: &[Row], path: &Path) -> Result<(), Box<dyn std::error::Error>> {
    use plotters::prelude::*;
    let font = std::fs::read("/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf")?;
    plotters::style::register_font(
        "sans-serif",
        FontStyle::Normal,
        Box::leak(font.into_boxed_slice()),
    )
    .map_err(|_| "font")?;
    let root = BitMapBackend::new(path, (900, 700)).into_drawing_area();
    root.fill(&WHITE)?;
    let (top, bottom) = root.split_vertically(350);
    let max_n = rows.iter().map(|r| r.groups).max().unwrap_or(1) as f64 * 1.1;
    let series = [
        (
            top,
            "RSS per idle replica (bytes)",
            rows.iter()
                .map(|r| (r.groups as f64, r.rss_per_replica))
                .collect::<Vec<_>>(),
            RED,
        ),
        (
            bottom,
            "idle CPU per node (% of a core)",
            rows.iter()
                .map(|r| (r.groups as f64, r.idle_cpu_pct))
                .collect::<Vec<_>>(),
            BLUE,
        ),
    ];
    for (area, title, points, color) in series {
        let max_y = points.iter().map(|p| p.1).fold(0.0f64, f64::max).max(1.0) * 1.2;
        let mut chart = ChartBuilder::on(&area)
            .caption(title, ("sans-serif", 22))
            .margin(12)
            .x_label_area_size(40)
            .y_label_area_size(70)
            .build_cartesian_2d(0.0..max_n, 0.0..max_y)?;
        chart
            .configure_mesh()
            .x_desc("groups per node (three replicas each, three nodes)")
            .draw()?;
        chart.draw_series(LineSeries::new(points.clone(), &color))?;
        chart.draw_series(points.iter().map(|p| Circle::new(*p, 4, color.filled())))?;
    }
    root.present()?;
    Ok(())
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let bench = args.iter().any(|a| a == "--bench");
    let value = |name: &str| {
        args.iter()
            .position(|a| a == name)
            .and_then(|i| args.get(i + 1))
            .cloned()
    };
    let sizes: Vec<usize> = match value("--groups") {
        Some(v) => v
            .split(',')
            .map(|s| s.parse().expect("--groups N,M"))
            .collect(),
        None if bench => vec![10_000, 50_000, 100_000],
        None => vec![300],
    };
    let idle = Duration::from_secs(
        value("--idle-secs")
            .map(|s| s.parse().expect("--idle-secs S"))
            .unwrap_or(if bench { 30 } else { 3 }),
    );
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let base = rt.block_on(empty_rss());
    eprintln!("empty node: {:.1} MiB RSS", base / (1 << 20) as f64);
    let mut rows = Vec::new();
    for n in sizes {
        let row = rt.block_on(measure(n, idle, base));
        println!("{}", line(&row));
        rows.push(row);
    }
    if bench {
        let dir = out_dir();
        let json: Vec<String> = rows.iter().map(line).collect();
        let _ = std::fs::write(dir.join("density_procs.json"), json.join("\n") + "\n");
        let png = dir.join("density_procs.png");
        match plot(&rows, &png) {
            Ok(()) => eprintln!("plot: {}", png.display()),
            Err(e) => eprintln!("no plot: {e}"),
        }
    }
}
