//! The scheduler on in-process gRPC clusters: leaders spread after the ranges of one leader
//! split; a dead node's replicas are rebuilt on a node that hosted nothing, with every
//! acknowledged write still readable; a move interrupted by a leader change is finished by
//! the new leader without the range ever dropping below a quorum of live voters; two small
//! neighbours on different nodes are moved onto the same nodes and merged, whichever of their
//! leaders sees both, with every write kept. Node statistics travel on the node-pair streams
//! and show in every node's view.

use std::time::{Duration, Instant};

use flotilla::layout::{first_campaigner, range_layout};
use flotilla::proto::meta::{RangeDescriptor, ReplicaRole};
use flotilla::schedule::{NodeState, ScheduleConfig};
use flotilla::testing::{
    bootstrap_ranges_and_system, bootstrap_spread_layout, key_in_range, local_server_config,
    node_ids, start_servers, test_config, wait_until,
};
use flotilla::{
    MembershipChange, NodeGroup, NodeId, RangeId, ReadConsistency, ReplicaId, Server, StateRole,
};

const T: Duration = Duration::from_secs(60);

/// A scheduler that acts fast: passes every 100 ms, nodes stable after 300 ms, down for
/// good after `down_time`.
fn schedule(down_time: Duration) -> ScheduleConfig {
    ScheduleConfig {
        interval: Duration::from_millis(100),
        stable_time: Duration::from_millis(300),
        down_time,
        ..ScheduleConfig::default()
    }
}

/// `n` nodes in this process; node `id`'s scheduler set by `sched(id)`.
fn start(n: usize, dir: &std::path::Path, sched: impl Fn(u64) -> ScheduleConfig) -> Vec<Server> {
    let configs = (1..=n as u64)
        .map(|id| {
            let mut c = local_server_config(test_config(id), dir);
            c.schedule = sched(id);
            c
        })
        .collect();
    start_servers(configs, tokio::runtime::Handle::current()).unwrap()
}

/// Bootstraps `count` ranges replicated on nodes 1..=members, leaders spread over them.
fn bootstrap(nodes: &[Server], count: usize, members: usize) -> Vec<RangeDescriptor> {
    let ids = node_ids(members);
    let layout = range_layout(count, &ids);
    for n in &nodes[..members] {
        // With the system range: splits lease their new range's id from it.
        bootstrap_ranges_and_system(n.node(), layout.clone()).unwrap();
    }
    for d in &layout {
        let c = first_campaigner(d.id(), &ids).unwrap();
        nodes[c.0 as usize - 1].node().campaign(d.id()).unwrap();
    }
    layout
}

/// The index of the node whose replica of `range` leads, among `live`.
fn leader(nodes: &[Server], live: &[usize], range: RangeId) -> Option<usize> {
    live.iter().copied().find(|&i| {
        nodes[i]
            .node()
            .status(range)
            .is_ok_and(|s| s.role == StateRole::Leader)
    })
}

/// The descriptor of `range` on its leader, among `live`.
fn leader_desc(nodes: &[Server], live: &[usize], range: RangeId) -> Option<RangeDescriptor> {
    let l = leader(nodes, live, range)?;
    nodes[l].node().status(range).ok()?.descriptor
}

fn voters(d: &RangeDescriptor) -> Vec<u64> {
    let mut v: Vec<u64> = d
        .replicas
        .iter()
        .filter(|r| r.role == ReplicaRole::Voter as i32)
        .map(|r| r.node_id)
        .collect();
    v.sort();
    v
}

fn has_learner(d: &RangeDescriptor) -> bool {
    d.replicas
        .iter()
        .any(|r| r.role == ReplicaRole::Learner as i32)
}

/// Writes `key` through the range's leader among `live`, retrying until `T` passes.
async fn put(nodes: &[Server], live: &[usize], key: &[u8], value: &[u8]) {
    let deadline = Instant::now() + T;
    loop {
        // Any live node that hosts the key's range: balancing may have moved a replica off
        // the first one.
        let range = live
            .iter()
            .find_map(|&i| nodes[i].node().range_of(key).ok())
            .map(|d| d.id());
        if let Some(l) = range.and_then(|range| leader(nodes, live, range)) {
            if nodes[l].node().put(key, value).await.is_ok() {
                return;
            }
        }
        assert!(Instant::now() < deadline, "cannot write {key:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Reads `key` linearizably through node `i`, retrying while its range moves.
async fn get(nodes: &[Server], i: usize, key: &[u8]) -> Option<Vec<u8>> {
    let deadline = Instant::now() + T;
    loop {
        match nodes[i]
            .node()
            .get(key, ReadConsistency::Linearizable)
            .await
        {
            Ok(v) => return v,
            Err(e) => assert!(
                Instant::now() < deadline,
                "cannot read {key:?} on node {}: {e}",
                i + 1
            ),
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn leader_counts(nodes: &[Server], live: &[usize]) -> Vec<usize> {
    let mut counts = vec![0; nodes.len()];
    for d in nodes[live[0]].node().ranges() {
        if let Some(l) = leader(nodes, live, d.id()) {
            counts[l] += 1;
        }
    }
    counts
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn leaders_spread_over_the_nodes_after_one_leaders_ranges_split() {
    let dir = tempfile::tempdir().unwrap();
    let nodes = start(3, dir.path(), |_| schedule(Duration::from_secs(60)));
    let whole = bootstrap(&nodes, 1, 3).remove(0);
    let all = [0, 1, 2];
    assert!(wait_until(T, || leader(&nodes, &all, whole.id()).is_some()).await);
    // Every split is proposed by the leader, and the new range's leader is on the same node.
    let mut splits = 0;
    let deadline = Instant::now() + T;
    while splits < 11 {
        assert!(Instant::now() < deadline, "only {splits} splits");
        let ranges = nodes[0].node().ranges();
        let d = ranges.iter().max_by_key(|d| d.end_key.is_empty()).unwrap();
        let key = format!("k{splits:02}").into_bytes();
        let Some(l) = leader(&nodes, &all, d.id()) else {
            tokio::time::sleep(Duration::from_millis(20)).await;
            continue;
        };
        if nodes[l].node().split(d.id(), Some(key)).await.is_ok() {
            splits += 1;
        }
    }
    let balanced = wait_until(T, || {
        let c = leader_counts(&nodes, &all);
        c.iter().sum::<usize>() == 12 && c.iter().all(|&n| (3..=5).contains(&n))
    })
    .await;
    let counts = leader_counts(&nodes, &all);
    assert!(balanced, "leaders per node: {counts:?}");
    // The transfers are on record, with their outcome.
    let transfers: usize = nodes
        .iter()
        .map(|n| {
            n.placement()
                .events()
                .iter()
                .filter(|e| e.action == "transfer-leader" && e.outcome.is_ok())
                .count()
        })
        .sum();
    assert!(transfers >= 2, "{transfers} transfers recorded");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_dead_nodes_replicas_are_rebuilt_on_the_empty_node_and_no_write_is_lost() {
    let dir = tempfile::tempdir().unwrap();
    let nodes = start(4, dir.path(), |_| schedule(Duration::from_secs(1)));
    let layout = bootstrap(&nodes, 4, 3);
    let all = [0, 1, 2, 3];
    assert!(
        wait_until(T, || layout
            .iter()
            .all(|d| leader(&nodes, &all, d.id()).is_some()))
        .await
    );
    // Every node learns every other's statistics from the node-pair streams (node 4, which
    // started empty, receives replicas from the balancing).
    let seen = wait_until(T, || {
        let view = nodes[3].placement().nodes();
        view.len() == 4
            && view
                .iter()
                .all(|n| n.state == NodeState::Up && n.stats.is_some())
    })
    .await;
    assert!(seen, "node 4's view: {:?}", nodes[3].placement().nodes());

    let keys: Vec<Vec<u8>> = (1..=4u64)
        .flat_map(|r| (0..25).map(move |i| flotilla::testing::key_in_range(r, &format!("{i}"))))
        .collect();
    // Through any node: the balancing may already have moved a range's leadership to node 4.
    for k in &keys {
        put(&nodes, &all, k, b"before").await;
    }
    // Node 3 dies; after down_time its replicas are rebuilt on node 4.
    nodes[2].shutdown();
    let live = [0, 1, 3];
    let repaired = wait_until(T, || {
        layout.iter().all(|d| {
            leader_desc(&nodes, &live, d.id())
                .is_some_and(|d| voters(&d) == [1, 2, 4] && !has_learner(&d))
        })
    })
    .await;
    if !repaired {
        for d in &layout {
            for &i in &live {
                if let Ok(st) = nodes[i].node().status(d.id()) {
                    eprintln!(
                        "{} on n{}: {:?} term {} leader {} asleep {} voters {:?}",
                        d.id(),
                        i + 1,
                        st.role,
                        st.term,
                        st.leader,
                        st.asleep,
                        st.descriptor.as_ref().map(voters)
                    );
                }
            }
        }
    }
    assert!(
        repaired,
        "descriptors: {:?}",
        layout
            .iter()
            .map(|d| leader_desc(&nodes, &live, d.id()).map(|d| voters(&d)))
            .collect::<Vec<_>>()
    );
    let view = nodes[0].placement().nodes();
    assert_eq!(
        view.iter().find(|n| n.node == NodeId(3)).map(|n| n.state),
        Some(NodeState::Down)
    );
    // Every acknowledged write is readable, from the new replicas too.
    for k in &keys {
        for i in live {
            assert_eq!(
                get(&nodes, i, k).await.as_deref(),
                Some(&b"before"[..]),
                "{k:?} on {}",
                i + 1
            );
        }
    }
    let moves: Vec<_> = nodes
        .iter()
        .flat_map(|n| n.placement().events())
        .filter(|e| e.action == "promote" && e.outcome.is_ok())
        .collect();
    assert!(moves.len() >= 4, "{moves:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_move_interrupted_by_a_leader_change_is_finished_by_the_new_leader() {
    let dir = tempfile::tempdir().unwrap();
    // Node 2 (the layout's first leader of range 1) starts a move by hand and has no
    // scheduler: only the next leader can finish it.
    let nodes = start(4, dir.path(), |id| ScheduleConfig {
        enabled: id != 2,
        ..schedule(Duration::from_secs(60))
    });
    let range = bootstrap(&nodes, 1, 3).remove(0).id();
    let all = [0, 1, 2, 3];
    assert!(wait_until(T, || leader(&nodes, &all, range) == Some(1)).await);
    let keys: Vec<Vec<u8>> = (0..50).map(|i| format!("key{i:03}").into_bytes()).collect();
    for k in &keys {
        put(&nodes, &all, k, b"v").await;
    }
    let desc = nodes[1]
        .node()
        .change_membership(range, vec![MembershipChange::AddLearner(NodeId(4))])
        .await
        .unwrap();
    assert!(has_learner(&desc));
    let on_1 = ReplicaId(desc.replica_on(NodeId(1)).unwrap().replica_id);
    // The replica the move replaces: node 3 stops. Once node 1 knows it, leadership moves
    // there, the move half done.
    nodes[2].shutdown();
    let seen_down = wait_until(T, || {
        nodes[0]
            .placement()
            .nodes()
            .iter()
            .any(|n| n.node == NodeId(3) && n.state != NodeState::Up)
    })
    .await;
    assert!(seen_down);
    nodes[1].node().transfer_leader(range, on_1).await.unwrap();
    let live = [0, 1, 3];
    let mut lowest = usize::MAX;
    let finished = wait_until(T, || {
        let Some(d) = leader_desc(&nodes, &live, range) else {
            return false;
        };
        let up = voters(&d).iter().filter(|n| **n != 3).count();
        lowest = lowest.min(up);
        voters(&d) == [1, 2, 4] && !has_learner(&d)
    })
    .await;
    assert!(finished, "{:?}", leader_desc(&nodes, &live, range));
    // Two live voters out of three at every step: a quorum, never fewer.
    assert!(lowest >= 2, "{lowest} live voters at some point");
    for k in &keys {
        assert_eq!(get(&nodes, 3, k).await.as_deref(), Some(&b"v"[..]));
    }
    let by_1 = nodes[0].placement().events();
    assert!(
        by_1.iter()
            .any(|e| e.action == "promote" && e.outcome.is_ok()),
        "{by_1:?}"
    );
}

/// Two ranges of four nodes, range 1 on nodes 1, 2, 3 and range 2 on nodes 1, 2, 4, both
/// small, range 1 led on node `leader_of_1` and range 2 on node 2. The schedulers move one
/// range onto the other's nodes and merge range 1 into range 2; every write acknowledged
/// before or during the moves is read afterwards. Returns the range whose replica moved.
async fn small_neighbours_on_different_nodes_merge(leader_of_1: u64) -> RangeId {
    let dir = tempfile::tempdir().unwrap();
    let nodes = start(4, dir.path(), |_| ScheduleConfig {
        merge_below_bytes: 1 << 20,
        merge_delay: Duration::from_millis(300),
        ..schedule(Duration::from_secs(60))
    });
    let members = node_ids(3);
    let mut layout = range_layout(2, &members);
    let r2 = &mut layout[1];
    r2.replicas[2].replica_id = 4;
    r2.replicas[2].node_id = 4;
    r2.next_replica_id = 5;
    let groups: Vec<&NodeGroup> = nodes.iter().map(|n| &**n.node()).collect();
    bootstrap_spread_layout(&groups, &layout, &members, |_| None).unwrap();
    let all = [0, 1, 2, 3];
    let (a, b) = (RangeId(1), RangeId(2));
    nodes[leader_of_1 as usize - 1].node().campaign(a).unwrap();
    nodes[1].node().campaign(b).unwrap();
    assert!(
        wait_until(T, || leader(&nodes, &all, a).is_some()
            && leader(&nodes, &all, b).is_some())
        .await
    );
    // Writes before the ranges are found small for merge_delay, and while they move.
    let mut keys = Vec::new();
    let merged = |nodes: &[Server]| {
        let events = nodes.iter().flat_map(|n| n.placement().events());
        leader_desc(nodes, &all, b).is_some_and(|d| d.start_key.is_empty() && d.end_key.is_empty())
            && events
                .filter(|e| e.action == "merge" && e.outcome.is_ok())
                .count()
                == 1
    };
    let deadline = Instant::now() + T;
    let mut i = 0;
    while !merged(&nodes) {
        assert!(
            Instant::now() < deadline,
            "not merged: range 1 {:?}, range 2 {:?}; events {:?}",
            leader_desc(&nodes, &all, a),
            leader_desc(&nodes, &all, b),
            nodes
                .iter()
                .flat_map(|n| n.placement().events())
                .collect::<Vec<_>>()
        );
        let key = key_in_range(1 + i % 2, &format!("{i}"));
        put(&nodes, &all, &key, b"v").await;
        keys.push(key);
        i += 1;
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // Read through the merged range's leader (balancing may move it on meanwhile).
    for k in &keys {
        let l = leader(&nodes, &all, b).unwrap_or(0);
        assert_eq!(get(&nodes, l, k).await.as_deref(), Some(&b"v"[..]), "{k:?}");
    }
    let events: Vec<_> = nodes.iter().flat_map(|n| n.placement().events()).collect();
    let moved: Vec<RangeId> = events
        .iter()
        .filter(|e| e.action == "add-learner" && e.detail.contains("merge") && e.outcome.is_ok())
        .map(|e| e.range)
        .collect();
    // One move: a replica of one range onto the node of the other's that it lacked.
    assert_eq!(moved.len(), 1, "{events:?}");
    moved[0]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_small_range_moves_onto_its_right_neighbours_nodes_and_merges_into_it() {
    // Range 1's leader (node 1) hosts range 2: range 1 moves from node 3 to node 4.
    assert_eq!(
        small_neighbours_on_different_nodes_merge(1).await,
        RangeId(1)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_range_moves_onto_its_left_neighbours_nodes_when_that_leader_cannot_see_it() {
    // Range 1's leader (node 3) hosts no replica of range 2, so it cannot merge: range 2's
    // leader moves range 2 from node 4 to node 3, then node 3 merges range 1 into it.
    assert_eq!(
        small_neighbours_on_different_nodes_merge(3).await,
        RangeId(2)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_run_of_small_ranges_merges_into_one_with_every_write_kept() {
    let dir = tempfile::tempdir().unwrap();
    let nodes = start(3, dir.path(), |_| ScheduleConfig {
        merge_below_bytes: 1 << 20,
        merge_delay: Duration::from_millis(300),
        ..schedule(Duration::from_secs(60))
    });
    let layout = bootstrap(&nodes, 16, 3);
    let all = [0, 1, 2];
    assert!(
        wait_until(T, || layout
            .iter()
            .all(|d| leader(&nodes, &all, d.id()).is_some()))
        .await
    );
    let keys: Vec<Vec<u8>> = (1..=16u64)
        .flat_map(|r| (0..5).map(move |i| key_in_range(r, &format!("{i}"))))
        .collect();
    for k in &keys {
        put(&nodes, &all, k, b"v").await;
    }
    // One range, and the 15 merges on record (each recorded once its source's leader saw
    // the target cover it).
    let merges = |nodes: &[Server]| {
        let events = nodes.iter().flat_map(|n| n.placement().events());
        events
            .filter(|e| e.action == "merge" && e.outcome.is_ok())
            .count()
    };
    let one = wait_until(T, || {
        let ranges = nodes[0].node().ranges();
        ranges.len() == 1 && leader(&nodes, &all, ranges[0].id()).is_some() && merges(&nodes) >= 15
    })
    .await;
    let events: Vec<_> = nodes.iter().flat_map(|n| n.placement().events()).collect();
    assert!(
        one,
        "ranges {:?}; events {events:?}",
        nodes[0].node().ranges()
    );
    assert_eq!(merges(&nodes), 15, "{events:?}");
    for k in &keys {
        for i in all {
            assert_eq!(get(&nodes, i, k).await.as_deref(), Some(&b"v"[..]), "{k:?}");
        }
    }
}
