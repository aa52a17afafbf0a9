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

impl Sim {
    /// The status of node `n`'s replica of `range`, if the node runs and hosts it.
    fn replica_status(&self, n: u64, range: u64) -> Option<crate::replica::ReplicaStatus> {
        let node = self.nodes[n as usize - 1].as_ref()?;
        let cell = node.shared.cell(flotilla_proto::RangeId(range))?;
        let guard = cell.replica.lock();
        guard.as_ref().map(|r| r.status())
    }

    /// The running node whose replica of `range` leads, if one does.
    fn leader_of(&self, range: u64) -> Option<u64> {
        (1..=self.cfg.nodes).find(|&n| {
            self.replica_status(n, range)
                .is_some_and(|s| s.role == raft::StateRole::Leader)
        })
    }

    /// Ticks the running nodes in turn and delivers what they send (no faults, no requests)
    /// until `done` holds; false if it did not within `rounds`.
    fn run_until(&mut self, rounds: usize, done: impl Fn(&Sim) -> bool) -> bool {
        for round in 0..rounds {
            if done(self) {
                return true;
            }
            self.step += 1;
            if self.net.is_empty() || round % 8 == 0 {
                self.tick(1 + (round as u64 % self.cfg.nodes));
            } else {
                let i = self.rng.gen_range(0..self.net.len());
                self.deliver(i, false);
            }
        }
        done(self)
    }
}

/// Whether node `n`'s replica of range 1 sleeps.
fn asleep(s: &Sim, n: u64) -> bool {
    s.replica_status(n, 1).is_some_and(|st| st.asleep)
}

/// A simulation of `seed` run until range 1 has elected a leader and every replica of it
/// sleeps; with that leader's node.
fn elected_and_asleep(seed: u64) -> (Sim, u64) {
    elected_and_asleep_with(seed, SimConfig::default())
}

fn elected_and_asleep_with(seed: u64, cfg: SimConfig) -> (Sim, u64) {
    let mut sim = Sim::new(seed, cfg);
    assert!(
        sim.run_until(20_000, |s| s.leader_of(1).is_some()
            && (1..=3).all(|n| asleep(s, n))),
        "range 1 never elected and slept"
    );
    let leader = sim.leader_of(1).expect("led");
    (sim, leader)
}

/// The flaky `split_races` case (a leader stopped right after both followers had restarted):
/// a replica recovered asleep knows no leader, and node liveness wakes a sleeping replica only
/// through the leader index, where a recovered replica stands under the node of the replica
/// it voted for. The round every recovered replica runs at start took it out of the index
/// again (it had learned no leader), so when the leader's node died, no survivor of its
/// group woke: no election, ever, without a request.
#[test]
fn survivors_restarted_asleep_elect_when_their_leader_dies() {
    let (mut sim, leader) = elected_and_asleep(1);
    let followers: Vec<u64> = (1..=3).filter(|&n| n != leader).collect();
    // Each follower restarts faster than liveness notices (no tick between crash and start),
    // so the leader has no reason to wake the group: the restarted replicas sleep, knowing no
    // leader.
    for &f in &followers {
        sim.crash(f);
        sim.net.retain(|p| p.to.0 != f);
        sim.start(f);
    }
    for &f in &followers {
        let st = sim.replica_status(f, 1).expect("recovered");
        assert!(st.asleep && st.leader == 0, "node {f}: {st:?}");
    }
    sim.crash(leader);
    assert!(
        sim.run_until(20_000, |s| s.leader_of(1).is_some()),
        "the survivors of range 1 never elected a leader: {:?}",
        followers
            .iter()
            .map(|&f| sim.replica_status(f, 1))
            .collect::<Vec<_>>()
    );
}

/// The other flake of the same `split_races` test (a follower stopped right after a split
/// was proposed): the follower appended the split and acknowledged it, then stopped before it
/// learned the commit; its leader, which saw it matched and not yet down, committed and put
/// the group to sleep, and the sleep notice that carried the commit found the follower gone.
/// Restarted asleep, faster than liveness noticed, the follower held an entry it never
/// learned was committed, and nothing woke it: its range table lagged the others' for good.
#[test]
fn a_follower_restarted_with_an_uncommitted_tail_learns_the_commit() {
    // The default liveness window (20 ticks): the case needs the group asleep before the
    // leader declares the stopped follower down, which the simulator's shortest window (10)
    // does not leave room for since awake replicas done with elections tick every other tick
    // and commits ride heartbeats.
    let cfg = SimConfig {
        node_down_ticks: 20,
        ..SimConfig::default()
    };
    let (mut sim, leader) = elected_and_asleep_with(2, cfg);
    let follower = 1 + leader % 3;
    // A write to range 1 ("k0"); the follower appends it, acknowledges, and stops.
    sim.invoke(0, leader, 0, Some(b"v".to_vec()));
    let appended = |s: &Sim| {
        s.replica_status(follower, 1)
            .is_some_and(|st| st.last_index > st.commit)
    };
    for _ in 0..1000 {
        if appended(&sim) {
            break;
        }
        match sim.net.iter().position(|p| p.to.0 == follower) {
            Some(i) => sim.deliver(i, false),
            None => sim.tick(leader),
        }
    }
    assert!(appended(&sim), "the follower never appended the write");
    sim.crash(follower);
    // The others commit and sleep, in fewer ticks than liveness takes to declare it down.
    let others: Vec<u64> = (1..=3).filter(|&n| n != follower).collect();
    for round in 0..2000 {
        if others.iter().all(|&n| asleep(&sim, n)) {
            break;
        }
        if sim.net.is_empty() {
            sim.tick(others[round % 2]);
        } else {
            sim.deliver(0, false);
        }
    }
    assert!(
        others.iter().all(|&n| asleep(&sim, n)),
        "the group never slept"
    );
    let live = sim.nodes[leader as usize - 1]
        .as_ref()
        .expect("running")
        .shared
        .liveness
        .snapshot();
    assert!(
        live.iter().any(|l| l.node.0 == follower && l.up),
        "the leader declared the follower down (its restart would wake the group): {live:?}"
    );
    // What was sent to the follower while it was down is lost (its sleep notice with it).
    sim.net.retain(|p| p.to.0 != follower);
    sim.start(follower);
    let st = sim.replica_status(follower, 1).expect("recovered");
    assert!(st.last_index > st.commit, "{st:?}");
    assert!(
        sim.run_until(20_000, |s| s.replica_status(follower, 1).is_some_and(
            |st| st.commit == st.last_index && st.applied == st.last_index
        )),
        "the restarted follower never learned the commit: {:?}",
        sim.replica_status(follower, 1)
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
