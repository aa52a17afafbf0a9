//! The nemesis suite's command line.
//!
//! ```text
//! flotilla-nemesis --profile short
//! flotilla-nemesis --profile long --duration 30m [--node-bin PATH]
//! ```
//!
//! The node binary defaults to `flotilla-node` beside this one (same target directory). Prints
//! `RESULT {...}` lines and exits non-zero on a violation.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Context};
use flotilla_nemesis::{run, Config, Profile};

fn parse_duration(s: &str) -> anyhow::Result<Duration> {
    let (n, unit) = s.split_at(s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len()));
    let n: u64 = n.parse().with_context(|| format!("bad duration {s}"))?;
    Ok(match unit {
        "" | "s" => Duration::from_secs(n),
        "m" => Duration::from_secs(n * 60),
        "h" => Duration::from_secs(n * 3600),
        _ => bail!("bad duration unit in {s} (s, m or h)"),
    })
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> anyhow::Result<()> {
    let mut profile = "short".to_string();
    let mut duration = Duration::from_secs(30 * 60);
    let mut node_bin = std::env::current_exe()?.with_file_name("flotilla-node");
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut value = || it.next().with_context(|| format!("{flag} needs a value"));
        match flag.as_str() {
            "--profile" => profile = value()?,
            "--duration" => duration = parse_duration(&value()?)?,
            "--node-bin" => node_bin = PathBuf::from(value()?),
            other => bail!("unknown flag {other}"),
        }
    }
    let profile = match profile.as_str() {
        "short" => Profile::Short,
        "long" => Profile::Long(duration),
        other => bail!("unknown profile {other} (short or long)"),
    };
    anyhow::ensure!(
        node_bin.exists(),
        "{} not found: build it with `cargo build --release --bin flotilla-node` or pass --node-bin",
        node_bin.display()
    );
    // On SIGINT or SIGTERM the run is dropped, which kills every node it started.
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    let out = tokio::select! {
        out = run(Config::new(node_bin, profile)) => out?,
        _ = tokio::signal::ctrl_c() => bail!("interrupted"),
        _ = term.recv() => bail!("terminated"),
    };
    for line in &out.result_lines {
        println!("{line}");
    }
    for line in &out.details {
        println!("{line}");
    }
    if !out.passed() {
        std::process::exit(1);
    }
    Ok(())
}
