//! The simulator's own tests: replay, a fixed set of seeds without a violation, an injected
//! defect caught, and the judge on hand-made histories.

use std::time::Instant;

use super::*;

/// The seeds the long test runs: `FLOTILLA_SIM_SEEDS` of them (200 by default) from
/// `FLOTILLA_SIM_FIRST_SEED` (0).
fn seeds() -> std::ops::Range<u64> {
    let var = |name: &str, default: u64| {
        std::env::var(name)
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or(default)
    };
    let first = var("FLOTILLA_SIM_FIRST_SEED", 0);
    first..first + var("FLOTILLA_SIM_SEEDS", 200)
}

fn summary(r: &Run) -> String {
    let count = |o: Outcome| r.history.iter().filter(|h| h.outcome == o).count();
    format!(
        "seed {}: {} ops ({} ok, {} fail, {} unknown), {} faults",
        r.seed,
        r.history.len(),
        count(Outcome::Ok),
        count(Outcome::Fail),
        count(Outcome::Unknown),
        r.faults.len()
    )
}

#[test]
fn the_same_seed_replays_the_same_run() {
    let a = run(11, SimConfig::default());
    let b = run(11, SimConfig::default());
    assert_eq!(a.history, b.history);
    assert_eq!(a.faults, b.faults);
    assert!(
        a.history.iter().any(|o| o.outcome == Outcome::Ok),
        "{}",
        summary(&a)
    );
}

#[test]
fn fixed_seeds_show_no_violation() {
    let started = Instant::now();
    let (mut ops, mut ok, mut faults) = (0, 0, 0);
    let mut isolated_runs = Vec::new();
    for seed in seeds() {
        let r = run(seed, SimConfig::default());
        ops += r.history.len();
        ok += r
            .history
            .iter()
            .filter(|o| o.outcome == Outcome::Ok)
            .count();
        faults += r.faults.len();
        // A replica isolated by a raft-rs panic fails the run too: raft-rs panics on input
        // that breaks its invariants, so it is the visible end of a bug that may also be one
        // of safety (seed 130's was: an acknowledgement of entries a follower did not hold).
        // Collected and printed together with the RESULT line, then failed below.
        if !r.isolated.is_empty() {
            isolated_runs.push((r.seed, r.isolated.clone()));
        }
        assert!(
            r.verdict.linearizable,
            "{}: not linearizable; witness {:#?}; faults {:?}",
            summary(&r),
            r.verdict.witness,
            r.faults
        );
    }
    println!(
        "RESULT {{\"sim_seeds\":{},\"ops\":{ops},\"ok\":{ok},\"faults\":{faults},\"violations\":0,\"runs_with_isolated_replicas\":{},\"secs\":{:.1}}}",
        seeds().count(),
        isolated_runs.len(),
        started.elapsed().as_secs_f64()
    );
    for (seed, isolated) in &isolated_runs {
        println!("seed {seed}: replicas isolated (node, range): {isolated:?}");
    }
    assert!(
        isolated_runs.is_empty(),
        "replicas isolated in {} runs (replay one with the debug_one_seed test)",
        isolated_runs.len()
    );
    assert!(ok > 0);
}

#[test]
fn an_injected_local_read_defect_is_caught_within_200_seeds() {
    let cfg = SimConfig {
        bug: Some(Bug::LocalReads),
        ..SimConfig::default()
    };
    let caught = (0..200).find(|seed| !run(*seed, cfg.clone()).verdict.linearizable);
    assert!(
        caught.is_some(),
        "serving reads locally went unnoticed for 200 seeds"
    );
    println!("local reads caught at seed {}", caught.unwrap_or_default());
}

#[test]
fn an_injected_ack_before_fsync_is_caught_within_200_seeds() {
    let cfg = SimConfig {
        bug: Some(Bug::AckBeforeSync),
        ..SimConfig::default()
    };
    // Caught: a write acknowledged then lost shows as a non-linearizable history (a read
    // older than an acknowledged write), or raft-rs refuses the state a lost log leaves (a
    // commit index past the log: the replica is isolated).
    let caught = (0..200)
        .map(|seed| run(seed, cfg.clone()))
        .find(|r| !r.verdict.linearizable || !r.isolated.is_empty());
    let Some(r) = caught else {
        panic!("acknowledging before the fsync went unnoticed for 200 seeds");
    };
    println!(
        "ack before fsync caught at seed {}: linearizable {}, isolated {:?}",
        r.seed, r.verdict.linearizable, r.isolated
    );
}

fn write(key: &str, v: &str, invoke: u64, complete: Option<u64>, outcome: Outcome) -> Op {
    Op {
        client: 0,
        key: key.as_bytes().to_vec(),
        kind: Kind::Write(v.as_bytes().to_vec()),
        outcome,
        invoke,
        complete,
        node: 1,
    }
}

fn read(key: &str, v: Option<&str>, invoke: u64, complete: u64) -> Op {
    Op {
        client: 1,
        key: key.as_bytes().to_vec(),
        kind: Kind::Read(v.map(|v| v.as_bytes().to_vec())),
        outcome: Outcome::Ok,
        invoke,
        complete: Some(complete),
        node: 1,
    }
}

#[test]
fn the_judge_refuses_a_stale_read_a_lost_write_and_a_read_of_a_failed_write() {
    let a = write("k", "a", 0, Some(1), Outcome::Ok);
    let b = write("k", "b", 2, Some(3), Outcome::Ok);
    assert!(!check(&[a.clone(), b.clone(), read("k", Some("a"), 4, 5)]).linearizable);
    let lost = check(&[a.clone(), read("k", None, 4, 5)]);
    assert!(!lost.linearizable && lost.lost_acked == 1);
    let failed = write("k", "c", 0, Some(1), Outcome::Fail);
    let bad = check(&[failed, read("k", Some("c"), 2, 3)]);
    assert!(!bad.linearizable && bad.bad_reads == 1);
    assert!(!check(&[read("k", Some("zz"), 0, 1)]).linearizable);
    // Reads that go back in time.
    let inverted = [
        a.clone(),
        b.clone(),
        read("k", Some("b"), 4, 5),
        read("k", Some("a"), 6, 7),
    ];
    assert!(!check(&inverted).linearizable);
}

#[test]
fn the_judge_accepts_concurrent_and_unknown_writes() {
    // A read concurrent with a write may see either value.
    let a = write("k", "a", 0, Some(1), Outcome::Ok);
    let b = write("k", "b", 2, Some(6), Outcome::Ok);
    assert!(check(&[a.clone(), b.clone(), read("k", Some("a"), 3, 4)]).linearizable);
    assert!(check(&[a.clone(), b.clone(), read("k", Some("b"), 3, 4)]).linearizable);
    // An unknown write may have taken effect, or not.
    let u = write("k", "u", 2, None, Outcome::Unknown);
    assert!(check(&[a.clone(), u.clone(), read("k", Some("u"), 8, 9)]).linearizable);
    assert!(check(&[a.clone(), u.clone(), read("k", Some("a"), 8, 9)]).linearizable);
    // Even when it was answered "unknown" early: a dropped proposal may still commit later.
    let late = write("k", "late", 2, Some(3), Outcome::Unknown);
    let acked = write("k", "b", 4, Some(5), Outcome::Ok);
    assert!(check(&[a, late, acked, read("k", Some("late"), 8, 9)]).linearizable);
}

/// The first defect the simulator found, kept as a regression test: in seed 130 the leader
/// sent a restarted follower an append at index 24 carrying entries 22..=24 (raft-rs's append
/// batching merged resent entries into a pending empty append); the follower acknowledged
/// index 27, which it did not hold, and the next heartbeat's commit 26 made raft-rs panic
/// ("to_commit 26 is out of range [last_index 24]"). Fixed by `batch_append: false`
/// (`config::tests::every_append_a_leader_sends_starts_right_after_its_index`).
#[test]
fn seed_130_no_follower_acknowledges_entries_it_does_not_hold() {
    let r = run(130, SimConfig::default());
    assert!(
        r.isolated.is_empty(),
        "{}: isolated {:?}",
        summary(&r),
        r.isolated
    );
}

/// The second defect the simulator found (in its 10,000-seed run), kept as a regression test:
/// request tokens restarted at 1 when a node restarted, so an entry the node's earlier life
/// had proposed with token 7, applied after the restart, completed the new life's request 7
/// with its answer: a write acknowledged that was never applied. Tokens now carry the node's
/// start count (`Pending::start_life`).
#[test]
fn seed_3142_no_request_is_answered_by_an_earlier_lifes_entry() {
    let r = run(3142, SimConfig::default());
    assert!(
        r.verdict.linearizable,
        "{}: witness {:#?}",
        summary(&r),
        r.verdict.witness
    );
}

/// Replays seed `SEED` with the runtime's and raft-rs's log on (`RUST_LOG`), to read what a
/// failing seed did. Ignored: run it by name.
#[test]
#[ignore]
fn debug_one_seed() {
    let seed: u64 = std::env::var("SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let _ = tracing_subscriber::fmt()
        .with_env_filter(std::env::var("RUST_LOG").unwrap_or_else(|_| "debug".into()))
        .with_ansi(false)
        .try_init();
    let r = run(seed, SimConfig::default());
    println!(
        "{} isolated {:?} faults {:?}",
        summary(&r),
        r.isolated,
        r.faults
    );
}
