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
        // A replica isolated by a raft-rs panic is a defect, but one of availability: the
        // history stays linearizable. One such defect is known and open (seeds 130 and 863:
        // a restarted follower is sent a commit index past its log; see
        // `known_defect_a_restarted_follower_is_sent_a_commit_past_its_log`), so isolations are
        // counted and printed here rather than failing the run.
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

/// An open defect the simulator found (ignored until fixed, so that it fails loudly then): in
/// seed 130 a follower that crashed and restarted is sent an append whose commit index is
/// past its log (raft-rs: "to_commit 26 is out of range [last_index 24]"), as if entries it
/// had acknowledged before the crash were gone; raft-rs panics and the replica is isolated.
#[test]
#[ignore]
fn known_defect_a_restarted_follower_is_sent_a_commit_past_its_log() {
    let r = run(130, SimConfig::default());
    assert!(
        r.isolated.is_empty(),
        "{}: isolated {:?}",
        summary(&r),
        r.isolated
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
