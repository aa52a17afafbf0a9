//! Who serves a write: proposal forwarding from followers (on by default, off by config) and
//! leader transfer. Every wait is bounded and polls a condition.

use std::time::{Duration, Instant};

use flotilla::testing::{test_config, wait_until, Cluster};
use flotilla::{
    Error, NodeGroupConfig, NodeId, RangeId, ReadConsistency, ReplicaId, StateRole, StoreConfig,
};

const T: Duration = Duration::from_secs(20);

/// Elections after 300-600ms without a leader: on a loaded 2-core machine, a 100ms timeout
/// makes leaders flap, and these tests care about who leads.
fn stable_config(node: u64) -> NodeGroupConfig {
    NodeGroupConfig {
        election_tick: 30,
        heartbeat_tick: 3,
        ..test_config(node)
    }
}

fn role(c: &Cluster, node: u64, range: RangeId) -> Option<StateRole> {
    c.node(node).status(range).ok().map(|s| s.role)
}

/// A node whose replica of `range` is a follower of `leader` and knows it.
async fn follower_of(c: &Cluster, range: RangeId, leader: u64) -> Option<u64> {
    let mut found = None;
    wait_until(T, || {
        found = c.running().into_iter().find(|&n| {
            n != leader
                && c.node(n).status(range).is_ok_and(|s| {
                    s.role == StateRole::Follower && s.leader_node == Some(NodeId(leader))
                })
        });
        found.is_some()
    })
    .await;
    found
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn follower_forwards_proposals_to_the_leader() {
    let c = Cluster::with_config(3, stable_config, StoreConfig::default());
    let d = c.bootstrap(1).remove(0);
    c.wait_leaders(&[d.id()], T).await;

    let deadline = Instant::now() + T;
    let mut forwarded = 0;
    let mut written = Vec::new();
    for i in 0..10u64 {
        let key = format!("fwd/{i:03}").into_bytes();
        let value = format!("v{i}").into_bytes();
        loop {
            let leader = c.leader_of(d.id()).expect("a leader");
            let f = follower_of(&c, d.id(), leader)
                .await
                .expect("a follower that knows the leader");
            match c.node(f).put(&key, &value).await {
                Ok(()) => {
                    // The future resolves once the entry is applied on the proposing node, so
                    // the follower has the value now, without any read barrier.
                    assert_eq!(
                        c.node(f).engine().get(&key).unwrap().as_deref(),
                        Some(&value[..]),
                        "forwarded put acknowledged before it was applied on node {f}"
                    );
                    if role(&c, f, d.id()) == Some(StateRole::Follower) {
                        forwarded += 1;
                    }
                    break;
                }
                // Leadership moved while we picked the follower: pick again.
                Err(e @ (Error::NotLeader { .. } | Error::ProposalDropped | Error::Busy(_))) => {
                    assert!(
                        Instant::now() < deadline,
                        "put {i} through a follower never succeeded: {e}"
                    );
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                Err(e) => panic!("put {i} through follower {f} failed: {e}"),
            }
        }
        written.push((key, value));
    }
    assert!(forwarded > 0, "no put was forwarded by a follower");
    // Readable everywhere, linearizably.
    for n in c.running() {
        for (key, value) in &written {
            let got = c.get_from(n, key, T).await.expect("read");
            assert_eq!(got.as_deref(), Some(&value[..]), "node {n} misses {key:?}");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn follower_refuses_with_a_leader_hint_when_forwarding_is_off() {
    let c = Cluster::with_config(
        3,
        |n| NodeGroupConfig {
            forward_proposals: false,
            ..stable_config(n)
        },
        StoreConfig::default(),
    );
    let d = c.bootstrap(1).remove(0);
    c.wait_leaders(&[d.id()], T).await;

    let deadline = Instant::now() + T;
    let mut refused = Vec::new();
    for attempt in 0.. {
        assert!(
            Instant::now() < deadline,
            "never saw a clean NotLeader from a follower"
        );
        let key = format!("nofwd/{attempt}").into_bytes();
        let leader = c.leader_of(d.id()).expect("a leader");
        let f = follower_of(&c, d.id(), leader)
            .await
            .expect("a follower that knows the leader");
        match c.node(f).put(&key, b"refused").await {
            Err(Error::NotLeader { range, leader_hint }) => {
                assert_eq!(range, d.id());
                refused.push(key);
                if leader_hint == Some(NodeId(leader)) {
                    break;
                }
                // Only acceptable if leadership really moved in between.
                assert_ne!(
                    c.leader_of(d.id()),
                    Some(leader),
                    "hint {leader_hint:?} but node {leader} still leads"
                );
            }
            Ok(()) => {
                assert_eq!(
                    role(&c, f, d.id()),
                    Some(StateRole::Leader),
                    "follower {f} accepted a write with forwarding off"
                );
            }
            Err(e) => panic!("expected NotLeader from follower {f}, got {e}"),
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Nothing refused was proposed: after a linearizable barrier no node has those keys...
    for n in c.running() {
        for key in &refused {
            assert_eq!(c.get_from(n, key, T).await.unwrap(), None, "node {n}");
        }
    }
    let key = b"nofwd/leader".to_vec();
    // ...and the leader itself still takes writes.
    c.put(&key, b"through-leader", T).await.unwrap();
    for n in c.running() {
        assert_eq!(
            c.get_from(n, &key, T).await.unwrap().as_deref(),
            Some(&b"through-leader"[..])
        );
    }
}

/// Asks the current leader to hand `range` to `target`, retrying (a transfer is abandoned
/// if the target does not catch up within an election timeout) until `target` leads.
async fn transfer_to(c: &Cluster, range: RangeId, target: u64) {
    let deadline = Instant::now() + T;
    while Instant::now() < deadline {
        let Some(leader) = c.leader_of(range) else {
            tokio::time::sleep(Duration::from_millis(20)).await;
            continue;
        };
        if leader == target {
            return;
        }
        match c
            .node(leader)
            .transfer_leader(range, ReplicaId(target))
            .await
        {
            Ok(()) | Err(Error::NotLeader { .. }) => {}
            Err(e) => panic!("transfer_leader failed: {e}"),
        }
        if wait_until(Duration::from_secs(3), || {
            c.leader_of(range) == Some(target)
        })
        .await
        {
            return;
        }
    }
    panic!("leadership of {range} never moved to node {target}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leader_transfer_moves_leadership_and_ignores_non_members() {
    let c = Cluster::with_config(3, stable_config, StoreConfig::default());
    let d = c.bootstrap(1).remove(0);
    c.wait_leaders(&[d.id()], T).await;
    let range = d.id();

    // Hand leadership to each replica in turn (replica id = node id in this layout).
    let first = c.leader_of(range).unwrap();
    let mut order: Vec<u64> = c.running().into_iter().filter(|&n| n != first).collect();
    order.push(first);
    for (i, &target) in order.iter().enumerate() {
        let term_before = c.node(target).status(range).unwrap().term;
        transfer_to(&c, range, target).await;
        let st = c.node(target).status(range).unwrap();
        assert_eq!(st.role, StateRole::Leader);
        assert!(
            st.term > term_before,
            "leadership changed without a new term"
        );
        // The new leader serves writes and every node agrees on it.
        let key = format!("t{i}").into_bytes();
        c.put(&key, b"x", T).await.unwrap();
        assert!(
            wait_until(T, || c.running().into_iter().all(|n| {
                c.node(n).status(range).unwrap().leader_node == Some(NodeId(target))
            }))
            .await
        );
    }

    // A transfer asked of a follower is refused with a hint.
    let leader = c.leader_of(range).unwrap();
    let f = follower_of(&c, range, leader).await.unwrap();
    match c.node(f).transfer_leader(range, ReplicaId(f)).await {
        Err(Error::NotLeader { .. }) => {}
        other => panic!("follower accepted a transfer: {other:?}"),
    }

    // Transfers to a replica that is not a member, or to the leader itself, are harmless:
    // the leader keeps leading and is not left "transferring" (which would refuse proposals).
    let st = c.node(leader).status(range).unwrap();
    c.node(leader)
        .transfer_leader(range, ReplicaId(99))
        .await
        .unwrap();
    c.node(leader)
        .transfer_leader(range, ReplicaId(leader))
        .await
        .unwrap();
    for i in 0..5 {
        let key = format!("after-bogus-transfer/{i}").into_bytes();
        match c.node(leader).put(&key, b"y").await {
            Ok(()) => {}
            Err(Error::Busy(why)) => panic!("leader stuck after a transfer to a non-member: {why}"),
            // Leadership moved for an unrelated reason (load): the cluster still takes writes.
            Err(_) => c.put(&key, b"y", T).await.unwrap(),
        }
    }
    let now = c.node(leader).status(range).unwrap();
    if now.role == StateRole::Leader {
        assert_eq!(
            now.term, st.term,
            "a transfer to a non-member started an election"
        );
    }
    let v = c
        .node(leader)
        .get(b"after-bogus-transfer/4", ReadConsistency::Linearizable)
        .await;
    assert!(
        matches!(v, Ok(Some(_)) | Err(Error::NotLeader { .. })),
        "{v:?}"
    );
    for n in c.running() {
        assert!(!c.node(n).is_failed(range));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forwarded_proposal_to_a_lost_leader_is_answered_once_leadership_moves() {
    // The leader is cut off right after a follower forwarded a proposal to it: the follower
    // answers ProposalDropped (outcome unknown) as soon as it follows a new leader, long
    // before the proposal timeout.
    let patient = |node| NodeGroupConfig {
        proposal_timeout: Duration::from_secs(120),
        ..stable_config(node)
    };
    let c = Cluster::with_config(3, patient, StoreConfig::default());
    let d = c.bootstrap(1).remove(0);
    c.wait_leaders(&[d.id()], T).await;
    let leader = c.leader_of(d.id()).unwrap();
    let f = follower_of(&c, d.id(), leader).await.unwrap();
    let cut = c
        .net
        .add_filter(Box::new(flotilla::transport::IsolateFilter::new(NodeId(
            leader,
        ))));
    let started = Instant::now();
    let res = tokio::time::timeout(Duration::from_secs(60), c.node(f).put(b"lost", b"v"))
        .await
        .expect("the forwarded proposal waited for its timeout");
    assert!(matches!(res, Err(Error::ProposalDropped)), "{res:?}");
    assert!(
        c.node(f).status(d.id()).unwrap().leader_node != Some(NodeId(leader)),
        "answered while still following the lost leader"
    );
    eprintln!("answered after {:?}", started.elapsed());
    c.net.remove_filter(cut);
    // A retry goes through the new leader.
    c.put(b"lost", b"v", T).await.unwrap();
}

/// Leaders per node (index 0 is node 1) over `ranges`.
fn leader_counts(c: &Cluster, ranges: &[RangeId]) -> Vec<usize> {
    let mut counts = vec![0; c.size()];
    for r in ranges {
        if let Some(n) = c.leader_of(*r) {
            counts[n as usize - 1] += 1;
        }
    }
    counts
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leaders_end_up_where_the_layout_puts_them_even_if_a_node_missed_the_first_elections() {
    let c = Cluster::with_config(3, stable_config, StoreConfig::default());
    // Node 3 is cut off while the 64 ranges elect their first leaders: the 21 ranges it
    // should lead are won by nodes 1 and 2.
    let cut = c
        .net
        .add_filter(Box::new(flotilla::transport::IsolateFilter::new(NodeId(3))));
    let ids: Vec<RangeId> = c.bootstrap(64).iter().map(|d| d.id()).collect();
    c.wait_leaders(&ids, T).await;
    let before = leader_counts(&c, &ids);
    assert_eq!(before[2], 0, "{before:?}");
    c.net.remove_filter(cut);
    // The layout's campaigner of range r is node r % 3 + 1 (members in id order): 21 ranges
    // for node 1, 22 for node 2, 21 for node 3. Their leaders hand leadership over to it.
    let want = vec![21, 22, 21];
    let mut counts = before.clone();
    let placed = wait_until(T, || {
        counts = leader_counts(&c, &ids);
        counts == want
    })
    .await;
    assert!(
        placed,
        "leaders {counts:?} (after the first elections {before:?})"
    );
    for r in &ids {
        assert_eq!(c.leader_of(*r), Some(r.0 % 3 + 1), "range {r}");
    }
}
