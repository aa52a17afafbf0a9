//! Log compaction: a leader keeps what followers that are up still need, within the
//! retention limits; past them, and for followers that are down, a snapshot. "Up" is node
//! liveness's view of the follower's node; raft's activity marks decide only without it.

use super::*;

/// Three nodes whose logs are considered for compaction every 16 applied entries, keeping 4,
/// with node 1 leading; `tune` sets the retention limits.
fn three_nodes(tune: impl Fn(&mut NodeGroupConfig)) -> Sim {
    let mut sim = Sim::new(3);
    for node in &mut sim.nodes {
        node.config.log_compact_threshold = 16;
        node.config.log_compact_trailing = 4;
        tune(&mut node.config);
        node.config.validate().unwrap();
    }
    sim.elect(1, 1);
    sim
}

/// Writes `n` keys through node 1 while node 3 is cut off (no ticks pass, so the leader's
/// view of node 3 as recently active stands: a follower that is up but slow).
fn write_while_node_3_lags(sim: &mut Sim, n: u8) {
    sim.cut.insert(3);
    for i in 0..n {
        sim.put(1, &[b'k', i], b"value").unwrap();
    }
}

/// (index node 3 has as the leader sees it, the leader's first log index - 1, its applied).
fn leader_log(sim: &mut Sim) -> (u64, u64, u64) {
    let leader = sim.node(1).replica(1);
    let state = leader.raw.store().apply_state();
    (
        leader.raw.raft.prs().get(3).unwrap().matched,
        state.truncated_index,
        state.applied_index,
    )
}

fn heal_and_catch_up(sim: &mut Sim, n: u8) {
    sim.cut.clear();
    sim.tick_until("node 3 catches up", |s| {
        s.nodes[2].engine.get(&[b'k', n - 1]).unwrap() == Some(b"value".to_vec())
    });
    assert!(sim.node(3).failed.is_empty());
}

#[test]
fn a_follower_behind_by_more_than_the_trailing_entries_catches_up_from_the_log() {
    let mut sim = three_nodes(|c| c.log_retain_max_entries = 1000);
    write_while_node_3_lags(&mut sim, 100);
    let (node_3_has, truncated, applied) = leader_log(&mut sim);
    assert!(
        applied - node_3_has > 64,
        "node 3 lags by {}",
        applied - node_3_has
    );
    assert!(
        truncated <= node_3_has,
        "the leader compacted what node 3 needs"
    );
    // Node 2, up to date, compacted as a follower does: it keeps only the trailing entries.
    let node_2 = *sim.node(2).replica(1).raw.store().apply_state();
    assert!(node_2.truncated_index > node_3_has, "{node_2:?}");
    heal_and_catch_up(&mut sim, 100);
    assert_eq!(sim.snapshots, 0, "node 3 caught up by a snapshot");
    // Once node 3 has it all, the leader compacts again.
    for i in 100..140u8 {
        sim.put(1, &[b'k', i], b"value").unwrap();
    }
    let (_, truncated, applied) = leader_log(&mut sim);
    assert!(
        applied - truncated <= 16,
        "log ({truncated}, {applied}] kept"
    );
}

#[test]
fn a_follower_behind_the_retention_limits_gets_a_snapshot() {
    // By count of entries, then by bytes (each entry here is about 50 bytes).
    type Tune = fn(&mut NodeGroupConfig);
    let limits: [(&str, Tune); 2] = [
        ("entries", |c| c.log_retain_max_entries = 40),
        ("bytes", |c| c.log_retain_max_bytes = 2_000),
    ];
    for (limit, tune) in limits {
        let mut sim = three_nodes(tune);
        write_while_node_3_lags(&mut sim, 100);
        let (node_3_has, truncated, applied) = leader_log(&mut sim);
        assert!(
            truncated > node_3_has,
            "{limit}: the leader kept the log for node 3"
        );
        assert!(
            applied - truncated <= 40 + 16,
            "{limit}: log ({truncated}, {applied}]"
        );
        heal_and_catch_up(&mut sim, 100);
        assert!(
            sim.snapshots > 0,
            "{limit}: node 3 caught up without a snapshot"
        );
    }
}

/// Ticks node 1's leadership through two check-quorum windows with node 3 cut off, until
/// raft no longer counts node 3 recently active, in this window or the last.
fn let_raft_mark_node_3_inactive(sim: &mut Sim) {
    sim.cut.insert(3);
    // A write first: a sleeping group does not tick, and one that waits for node 3 cannot
    // sleep again.
    sim.put(1, b"wake", b"value").unwrap();
    for _ in 0..25 {
        sim.step(1);
        sim.settle();
    }
    let leader = sim.node(1).replica(1);
    assert!(leader.is_leader());
    assert!(!leader.raw.raft.prs().get(3).unwrap().recent_active);
}

/// After a sleep (no heartbeats, so raft hears nothing of its followers) and a wake, raft's
/// marks may say a follower is inactive while its node is perfectly up: node liveness, not
/// the marks, decides, and the follower catches up from the log.
#[test]
fn a_follower_on_a_node_that_is_up_holds_the_log_though_raft_marks_it_inactive() {
    let mut sim = three_nodes(|c| c.log_retain_max_entries = 1000);
    sim.tick_until("the group sleeps", |s| {
        s.nodes.iter().all(|n| n.replica(1).is_asleep())
    });
    let_raft_mark_node_3_inactive(&mut sim);
    write_while_node_3_lags(&mut sim, 100);
    let (node_3_has, truncated, applied) = leader_log(&mut sim);
    assert!(
        applied - node_3_has > 64,
        "node 3 lags by {}",
        applied - node_3_has
    );
    assert!(
        truncated <= node_3_has,
        "the leader compacted what node 3, on a node that is up, needs"
    );
    heal_and_catch_up(&mut sim, 100);
    assert_eq!(sim.snapshots, 0, "node 3 caught up by a snapshot");
}

/// A follower on a node that liveness declared down holds nothing back, even while raft still
/// counts it recently active (no tick since it went silent).
#[test]
fn a_follower_on_a_node_declared_down_holds_nothing_back() {
    // Hibernation off: with node 3 down, the leader would sleep once node 2 matched, and
    // nothing here wakes it on healing as liveness would.
    let mut sim = three_nodes(|c| {
        c.log_retain_max_entries = 1000;
        c.hibernate = false;
    });
    sim.node(1).host.down.borrow_mut().insert(3);
    write_while_node_3_lags(&mut sim, 100);
    let leader = sim.node(1).replica(1);
    assert!(leader.raw.raft.prs().get(3).unwrap().recent_active);
    let (node_3_has, truncated, applied) = leader_log(&mut sim);
    assert!(
        truncated > node_3_has,
        "the leader kept the log for a node declared down"
    );
    assert!(applied - truncated <= 16, "log ({truncated}, {applied}]");
    sim.node(1).host.down.borrow_mut().clear();
    heal_and_catch_up(&mut sim, 100);
    assert!(sim.snapshots > 0);
}

/// Without node liveness (a transport that does not track it), raft's marks decide: a
/// follower silent for a whole check-quorum window counts as down.
#[test]
fn without_liveness_a_follower_raft_marks_inactive_holds_nothing_back() {
    // No liveness: groups do not sleep.
    let mut sim = three_nodes(|c| c.log_retain_max_entries = 1000);
    for node in &sim.nodes {
        node.host.no_liveness.set(true);
    }
    let_raft_mark_node_3_inactive(&mut sim);
    write_while_node_3_lags(&mut sim, 100);
    let (node_3_has, truncated, applied) = leader_log(&mut sim);
    assert!(
        truncated > node_3_has,
        "the leader kept the log for a node that is down"
    );
    assert!(applied - truncated <= 16, "log ({truncated}, {applied}]");
    heal_and_catch_up(&mut sim, 100);
    assert!(sim.snapshots > 0);
}
