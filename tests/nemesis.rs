//! The nemesis suite's short profile, so that CI runs it: three `flotilla-node` processes on
//! 127.0.0.1, eight clients, every fault once (kill -9, SIGSTOP, isolation and bridge through
//! the proxy, live split and merge, a merge while a replica is down, a replica replacement),
//! then the history is checked for linearizability.
//!
//! The suite kills every process it started when it returns, and on a panic (its `NodeProcs`
//! are dropped while unwinding); the whole run is bounded by a timeout.

use std::path::PathBuf;
use std::time::Duration;

use flotilla_nemesis::{run, Config, Profile};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_short_nemesis_profile_finds_every_history_linearizable() {
    let config = Config::new(
        PathBuf::from(env!("CARGO_BIN_EXE_flotilla-node")),
        Profile::Short,
    );
    let out = tokio::time::timeout(Duration::from_secs(300), run(config))
        .await
        .expect("the short profile finishes within 5 minutes")
        .expect("the suite runs");
    for line in out.result_lines.iter().chain(&out.details) {
        println!("{line}");
    }
    assert!(out.passed(), "{}", out.details.join("\n"));
    assert!(out.report.violation.is_none());
}
