//! flotilla-nemesis: runs real `flotilla-node` processes under faults while clients read and
//! write a few contended keys, then checks the recorded history for linearizability with
//! `flotilla-check`. It exists because the in-memory tests cannot show what a real process
//! does under SIGKILL, SIGSTOP, a partitioned socket or a live split on a loaded cluster.
//!
//! # Layout
//!
//! - the node processes (start, kill -9, restart, SIGSTOP/SIGCONT, cleanup by pid) are
//!   `flotilla_benchkit::nodes`, the launcher the process tests and benchmarks use too;
//! - [`proxy`]: the fault-injecting TCP proxy every raft connection goes through (partitions);
//! - [`workload`]: the clients and the recorder of their operations;
//! - [`faults`]: the nemeses themselves, their log, and the write-stall measurements.
//!
//! A run: start three nodes with a few ranges, start the clients, inject faults (the short
//! profile runs each once; the long one draws them at random for a duration), heal, stop the
//! clients, read every key from every node, check. The crate is a test tool: its library only
//! serves its binary and the CI test, so it reports errors with `anyhow` like a binary.

pub mod faults;
pub mod proxy;
pub mod workload;

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use flotilla_check::{Op, Outcome, Report};
use rand::seq::SliceRandom;
use rand::Rng;

use crate::faults::{Fault, Nemesis};
use crate::proxy::Proxies;
use crate::workload::{Nodes, Recorder, Route};
use flotilla_benchkit::nodes::{Layout, NodeProcs};

/// Which faults, how many, for how long.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Profile {
    /// Every fault once, in [`Fault::ALL`]'s order (about two minutes).
    Short,
    /// Random faults until the duration has passed.
    Long(Duration),
}

impl Profile {
    fn name(&self) -> &'static str {
        match self {
            Profile::Short => "short",
            Profile::Long(_) => "long",
        }
    }
}

/// A run's settings.
#[derive(Debug, Clone)]
pub struct Config {
    /// The `flotilla-node` binary.
    pub node_bin: PathBuf,
    /// The fault schedule.
    pub profile: Profile,
    /// Ranges bootstrapped (the keys are spread over them). Default 4.
    pub ranges: usize,
    /// Contended keys. Default 20.
    pub keys: usize,
    /// Concurrent clients. Default 8.
    pub clients: usize,
    /// How long a fault is held (longer than an election: ticks of 100 ms, 10 to 20 ticks).
    /// Default 4 s.
    pub hold: Duration,
    /// Quiet time between faults. Default 4 s.
    pub gap: Duration,
}

impl Config {
    /// The defaults for `profile` with `node_bin`.
    pub fn new(node_bin: PathBuf, profile: Profile) -> Config {
        Config {
            node_bin,
            profile,
            ranges: 4,
            keys: 20,
            clients: 8,
            hold: Duration::from_secs(4),
            gap: Duration::from_secs(4),
        }
    }
}

/// What a run found.
#[derive(Debug)]
pub struct Outcomes {
    /// The checker's verdict.
    pub report: Report,
    /// The `RESULT {...}` lines: the summary, then one per availability measurement.
    pub result_lines: Vec<String>,
    /// Human-readable details of a violation: the witness and the faults around it.
    pub details: Vec<String>,
}

impl Outcomes {
    /// No violation of any kind.
    pub fn passed(&self) -> bool {
        self.report.linearizable && self.report.lost_acked == 0 && self.report.bad_reads == 0
    }
}

/// Key `j` of the run: inside range `1 + j % ranges` of the bootstrap layout (`k` + the
/// range as 8 digits, as the node's `--bootstrap-ranges` lays them out).
fn key(j: usize, ranges: usize) -> Vec<u8> {
    format!("k{:08}/key-{j:02}", 1 + j % ranges).into_bytes()
}

/// Runs the suite. Every process it started is killed when it returns, error or not.
pub async fn run(config: Config) -> anyhow::Result<Outcomes> {
    // The nemesis replaces replicas itself; the scheduler would race it.
    let layout = Layout::local(3, config.ranges)?.with_args(&["--no-schedule"]);
    let proxies = Proxies::start(&layout.raft).await?;
    let cluster = NodeProcs::start_with(&config.node_bin, layout, |i, j| proxies.addr(i, j))?;
    let nodes = Nodes::new(&cluster.client)?;
    let rec = Arc::new(Recorder::new());
    let keys: Arc<Vec<Vec<u8>>> =
        Arc::new((0..config.keys).map(|j| key(j, config.ranges)).collect());
    let mut nemesis = Nemesis::new(
        cluster,
        proxies,
        nodes.clone(),
        rec.clone(),
        keys.clone(),
        config.hold,
    )?;
    if !nemesis.wait_settled(Duration::from_secs(60)).await {
        for i in 0..3 {
            eprintln!(
                "--- node {} ---\n{}",
                i + 1,
                nemesis.cluster.log_tail(i, 30)
            );
        }
        anyhow::bail!("the cluster did not elect leaders within 60 s");
    }
    nemesis.note(format!(
        "cluster up: {} ranges, {} keys, {} clients, profile {}",
        config.ranges,
        config.keys,
        config.clients,
        config.profile.name()
    ));

    let stop = Arc::new(AtomicBool::new(false));
    let clients: Vec<_> = (0..config.clients)
        .map(|i| {
            tokio::spawn(workload::client_loop(
                i as u64,
                rec.clone(),
                nodes.clone(),
                keys.clone(),
                stop.clone(),
            ))
        })
        .collect();

    let faults_result = inject(&mut nemesis, &config).await;

    nemesis.heal_all().await?;
    let settled = nemesis.wait_settled(Duration::from_secs(60)).await;
    // Let the clients see the healed cluster for a moment before they stop.
    tokio::time::sleep(config.gap).await;
    stop.store(true, Ordering::Relaxed);
    for c in clients {
        // A client's operations are each bounded (5 s of attempts), so this is too.
        c.await.context("client task")?;
    }
    faults_result?;
    if !settled {
        nemesis.note("heal: some range has no leader after 60 s".into());
    }

    // The final reads: every key from every node, each node asked in turn.
    nemesis.note("final reads".into());
    let mut unread = 0;
    for k in keys.iter() {
        for i in 0..nodes.len() {
            let route = Route {
                first: i,
                avoid: None,
            };
            let got = workload::get(&rec, &nodes, 0, k, route, true, Duration::from_secs(15)).await;
            if got.is_none() {
                unread += 1;
            }
        }
    }
    if unread > 0 {
        nemesis.note(format!("final reads: {unread} key/node pairs unreadable"));
    }

    let history = rec.ops();
    let started = Instant::now();
    let report = flotilla_check::check(&history);
    nemesis.note(format!(
        "checked {} operations in {} ms",
        history.len(),
        started.elapsed().as_millis()
    ));
    Ok(summarize(&config, &nemesis, &history, report))
}

/// Runs the profile's faults with quiet gaps between them.
async fn inject(nemesis: &mut Nemesis, config: &Config) -> anyhow::Result<()> {
    tokio::time::sleep(config.gap).await;
    match config.profile {
        Profile::Short => {
            for f in Fault::ALL {
                nemesis.run(f).await?;
                tokio::time::sleep(config.gap).await;
            }
        }
        Profile::Long(duration) => {
            let end = Instant::now() + duration;
            while Instant::now() < end {
                let f = *Fault::ALL.choose(&mut rand::thread_rng()).expect("faults");
                nemesis.run(f).await?;
                let gap = rand::thread_rng().gen_range(config.gap / 2..=config.gap * 2);
                tokio::time::sleep(gap).await;
            }
        }
    }
    Ok(())
}

fn summarize(config: &Config, nemesis: &Nemesis, history: &[Op], report: Report) -> Outcomes {
    let count = |o: Outcome| history.iter().filter(|op| op.outcome == o).count();
    let mut result_lines = vec![format!(
        "RESULT {}",
        serde_json::json!({
            "nemesis": config.profile.name(),
            "ops": history.len(),
            "ok": count(Outcome::Ok),
            "fail": count(Outcome::Fail),
            "unknown": count(Outcome::Unknown),
            "faults": nemesis.log.injected,
            "linearizable": report.linearizable,
            "lost_acked": report.lost_acked,
            "bad_reads": report.bad_reads,
        })
    )];
    for (fault, stall) in &nemesis.log.stalls {
        result_lines.push(format!(
            "RESULT {}",
            serde_json::json!({"availability": fault, "stall_ms": stall.as_millis() as u64})
        ));
    }
    let mut details = Vec::new();
    if let Some(witness) = &report.violation {
        details.push(format!("VIOLATION: {} operations:", witness.len()));
        let ms = |ns: u64| ns as f64 / 1e6;
        for op in witness {
            details.push(format!(
                "  client {:#x} {:?} {} on {} via node {} invoked {:.1} ms completed {}",
                op.client,
                op.outcome,
                op.kind_text(),
                String::from_utf8_lossy(&op.key),
                nemesis.rec.via(op).map_or(0, |n| n + 1),
                ms(op.invoke_ns),
                op.complete_ns
                    .map_or("never".to_string(), |c| format!("{:.1} ms", ms(c)))
            ));
        }
        let from = witness.iter().map(|o| o.invoke_ns).min().unwrap_or(0);
        let to = witness
            .iter()
            .filter_map(|o| o.complete_ns)
            .max()
            .unwrap_or(u64::MAX);
        let margin = 10_000_000_000;
        details.push("faults around it:".into());
        for (t, what) in &nemesis.log.events {
            if *t + margin >= from && *t <= to.saturating_add(margin) {
                details.push(format!("  {:.1} ms: {what}", ms(*t)));
            }
        }
    }
    Outcomes {
        report,
        result_lines,
        details,
    }
}

/// How an operation reads in a violation report.
trait KindText {
    fn kind_text(&self) -> String;
}

impl KindText for Op {
    fn kind_text(&self) -> String {
        match &self.kind {
            flotilla_check::Kind::Write(v) => format!("write {}", String::from_utf8_lossy(v)),
            flotilla_check::Kind::Read(Some(v)) => format!("read {}", String::from_utf8_lossy(v)),
            flotilla_check::Kind::Read(None) => "read (absent)".into(),
        }
    }
}
