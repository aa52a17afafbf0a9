//! Unsafe recovery on the in-memory network (NodeGroups in one process, real engines,
//! workers and raft): two of three replicas destroyed for good, the survivor forced to
//! continue alone (`NodeGroup::force_alone`); it leads alone, keeps every write it had and
//! commits its uncommitted tail, a membership change in that tail (one that would re-add a
//! lost node) is dropped, the rewrite survives a restart, and the typed refusals. With five
//! replicas and two survivors, the one left behind is retired and a new replica placed on its
//! node catches up from the forced leader. On gRPC nodes in one process, a node marked
//! removed in the registry counts as dead at once: the scheduler rebuilds its replicas
//! without waiting for `down_time`.

use std::collections::BTreeSet;
use std::time::Duration;

use flotilla::layout::{first_campaigner, range_layout};
use flotilla::proto::meta::{NodeState, RangeDescriptor, ReplicaRole};
use flotilla::schedule::{ScheduleConfig, Standing};
use flotilla::testing::{
    bootstrap_ranges_and_system, key_in_range, local_server_config, node_ids, start_servers,
    test_config, wait_until, Cluster,
};
use flotilla::transport::IsolateFilter;
use flotilla::{
    Error, MembershipChange, NodeId, RangeId, ReadConsistency, RecoveryRefusal, ReplicaId,
    StateRole,
};

const T: Duration = Duration::from_secs(20);

fn ids(layout: &[RangeDescriptor]) -> Vec<RangeId> {
    layout.iter().map(|d| d.id()).collect()
}

fn nodes(list: &[u64]) -> BTreeSet<NodeId> {
    list.iter().copied().map(NodeId).collect()
}

fn refusal(e: Error) -> RecoveryRefusal {
    match e {
        Error::RecoveryRefused { why, .. } => why,
        other => panic!("expected a recovery refusal, got {other:?}"),
    }
}

/// Waits until node `id`'s replica of every range in `ranges` has applied what the range's
/// leader committed (so that the node holds every acknowledged write of it).
async fn caught_up(c: &Cluster, id: u64, ranges: &[RangeId]) {
    let ok = wait_until(T, || {
        ranges.iter().all(|&r| {
            let Some(leader) = c.leader_of(r) else {
                return false;
            };
            let commit = c.node(leader).status(r).unwrap().commit;
            c.node(id).status(r).is_ok_and(|s| s.applied >= commit)
        })
    })
    .await;
    assert!(ok, "node {id} did not catch up");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_survivor_of_two_destroyed_replicas_leads_alone_and_keeps_every_write_it_had() {
    let mut c = Cluster::new(3);
    let layout = c.bootstrap(3);
    let ranges = ids(&layout);
    c.wait_leaders(&ranges, T).await;
    let mut acked = Vec::new();
    for d in &layout {
        for i in 0..20 {
            let key = key_in_range(d.range_id, &format!("k{i}"));
            let value = format!("v{i}-{}", d.range_id).into_bytes();
            c.put(&key, &value, T).await.unwrap();
            acked.push((key, value));
        }
    }
    caught_up(&c, 1, &ranges).await;

    // Node 1 leads the first range and is cut off: a write and a membership change that
    // would make a node that never existed a voter are appended to its log, never committed.
    let target = layout[0].id();
    if c.leader_of(target) != Some(1) {
        let leader = c.leader_of(target).unwrap();
        c.node(leader)
            .transfer_leader(target, ReplicaId(1))
            .await
            .unwrap();
        assert!(wait_until(T, || c.leader_of(target) == Some(1)).await);
    }
    let isolate = c.net.add_filter(Box::new(IsolateFilter::new(NodeId(1))));
    let tail_key = key_in_range(target.0, "tail");
    let short = Duration::from_millis(300);
    let (put, change) = tokio::join!(
        tokio::time::timeout(short, c.node(1).put(&tail_key, b"uncommitted")),
        tokio::time::timeout(
            short,
            c.node(1)
                .change_membership(target, vec![MembershipChange::AddVoter(NodeId(9))])
        ),
    );
    assert!(!matches!(put, Ok(Ok(()))), "an isolated leader committed");
    assert!(
        !matches!(change, Ok(Ok(_))),
        "an isolated leader changed membership"
    );

    // Nodes 2 and 3 are destroyed for good.
    c.destroy(2);
    c.destroy(3);
    c.net.remove_filter(isolate);
    let lost = nodes(&[2, 3]);

    // The report: every range (and the system range) lost its quorum; the target's log holds
    // the uncommitted tail with the membership change in it.
    let report = c.node(1).recovery_report(&lost, None).unwrap();
    let reported: BTreeSet<RangeId> = report.iter().map(|r| r.range).collect();
    let mut expected: BTreeSet<RangeId> = ranges.iter().copied().collect();
    expected.insert(RangeId::SYSTEM);
    assert_eq!(reported, expected);
    let t = report.iter().find(|r| r.range == target).unwrap();
    assert!(t.quorum_lost);
    assert_eq!(t.voters, vec![1, 2, 3]);
    assert!(
        t.last_index >= t.commit + 2,
        "the write and the change are past the commit index: {t:?}"
    );
    assert_eq!(t.conf_change_indexes.len(), 1, "{t:?}");

    // Typed refusals, and nothing changed by them.
    let why = refusal(
        c.node(1)
            .force_alone(target, &nodes(&[1, 2]), None, 0)
            .unwrap_err(),
    );
    assert_eq!(why, RecoveryRefusal::LostIncludesSelf(NodeId(1)));
    let why = refusal(
        c.node(1)
            .force_alone(target, &nodes(&[2]), None, 0)
            .unwrap_err(),
    );
    assert_eq!(
        why,
        RecoveryRefusal::QuorumAlive {
            alive: 2,
            voters: 3
        }
    );
    let conf_ver = t.descriptor.as_ref().unwrap().epoch.unwrap().conf_ver;
    let why = refusal(
        c.node(1)
            .force_alone(target, &lost, Some(conf_ver + 7), 0)
            .unwrap_err(),
    );
    assert!(matches!(why, RecoveryRefusal::Changed { .. }), "{why:?}");
    assert!(matches!(
        c.node(1).force_alone(RangeId(999), &lost, None, 0),
        Err(Error::RangeNotFound(_))
    ));

    // The system range first, then the others.
    for r in std::iter::once(RangeId::SYSTEM).chain(ranges.iter().copied()) {
        let rep = report.iter().find(|x| x.range == r).unwrap();
        let expect = rep.descriptor.as_ref().unwrap().epoch.unwrap().conf_ver;
        let forced = c.node(1).force_alone(r, &lost, Some(expect), 0).unwrap();
        assert_eq!(forced.replica_id, 1);
        assert_eq!(forced.descriptor.replicas.len(), 1);
        assert_eq!(forced.descriptor.replicas[0].node_id, 1);
        assert_eq!(
            forced.descriptor.replicas[0].role,
            ReplicaRole::Voter as i32
        );
        assert_eq!(forced.descriptor.epoch.unwrap().conf_ver, expect + 1);
        if r == target {
            assert_eq!(forced.neutralized, t.conf_change_indexes);
            assert_eq!(forced.last_index, t.last_index);
        }
    }
    let all: Vec<RangeId> = std::iter::once(RangeId::SYSTEM)
        .chain(ranges.iter().copied())
        .collect();
    let leads = |c: &Cluster| {
        all.iter().all(|&r| {
            c.node(1)
                .status(r)
                .is_ok_and(|s| s.role == StateRole::Leader && s.commit >= s.last_index)
        })
    };
    assert!(
        wait_until(T, || leads(&c)).await,
        "node 1 does not lead alone"
    );
    let st = c.node(1).status(target).unwrap();
    assert!(st.term > t.term, "a new term: {} after {}", st.term, t.term);
    assert_eq!(
        st.descriptor.unwrap().replicas.len(),
        1,
        "the change was dropped"
    );

    // Every acknowledged write it had is there; the tail became committed; new writes work
    // (the dropped change would have made a second, dead voter: no quorum).
    let read = |key: Vec<u8>| {
        let node = c.node(1);
        async move { node.get(&key, ReadConsistency::Linearizable).await }
    };
    for (key, value) in &acked {
        assert_eq!(
            read(key.clone()).await.unwrap().as_deref(),
            Some(&value[..])
        );
    }
    assert_eq!(
        read(tail_key.clone()).await.unwrap().as_deref(),
        Some(&b"uncommitted"[..]),
        "the survivor's uncommitted tail is committed by the new membership"
    );
    for d in &layout {
        let key = key_in_range(d.range_id, "after");
        c.node(1).put(&key, b"alone").await.unwrap();
    }
    // The system range answers again (a split leases a range id from it).
    c.node(1)
        .split(target, Some(key_in_range(target.0, "m")))
        .await
        .unwrap();

    // The rewrite is durable: after a restart node 1 leads alone again.
    c.stop(1);
    c.start(1);
    for &r in &all {
        let _ = c.node(1).campaign(r);
    }
    assert!(
        wait_until(T, || all.iter().all(|&r| c
            .node(1)
            .status(r)
            .is_ok_and(|s| s.role == StateRole::Leader)))
        .await
    );
    for (key, value) in acked.iter().take(5) {
        assert_eq!(
            c.get_from(1, key, T).await.unwrap().as_deref(),
            Some(&value[..])
        );
    }
    // The split's right half (created alone, from the forced range) elects itself too.
    c.put(&tail_key, b"after restart", T).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn of_two_survivors_one_continues_and_the_other_is_retired_and_replaced() {
    let mut c = Cluster::new(5);
    let layout = c.bootstrap(1);
    let range = layout[0].id();
    c.wait_leaders(&[range], T).await;
    let mut acked = Vec::new();
    for i in 0..30 {
        let key = key_in_range(range.0, &format!("k{i}"));
        c.put(&key, b"v", T).await.unwrap();
        acked.push(key);
    }
    caught_up(&c, 1, &[range]).await;
    caught_up(&c, 2, &[range]).await;
    for n in [3, 4, 5] {
        c.destroy(n);
    }
    let lost = nodes(&[3, 4, 5]);
    let report: Vec<_> = [1u64, 2]
        .iter()
        .map(|&n| {
            let r = c.node(n).recovery_report(&lost, Some(&[range])).unwrap();
            assert_eq!(r.len(), 1);
            (n, r[0].clone())
        })
        .collect();
    // The highest last (term, index) continues; ties go to the lower node id.
    let (survivor, best) = report
        .iter()
        .max_by_key(|(n, r)| (r.last_term, r.last_index, std::cmp::Reverse(*n)))
        .unwrap()
        .clone();
    let other = if survivor == 1 { 2 } else { 1 };
    let min_conf_ver = report
        .iter()
        .map(|(_, r)| r.descriptor.as_ref().unwrap().epoch.unwrap().conf_ver)
        .max()
        .unwrap()
        + 1;
    let forced = c
        .node(survivor)
        .force_alone(range, &lost, None, min_conf_ver)
        .unwrap();
    let new_conf_ver = forced.descriptor.epoch.unwrap().conf_ver;
    assert_eq!(new_conf_ver, min_conf_ver);
    assert_eq!(forced.last_index, best.last_index);

    // The other survivor's replica is older than the forced membership: retired (a replica
    // that is not older is refused).
    let why = refusal(
        c.node(other)
            .retire_replica(range, new_conf_ver - 1)
            .unwrap_err(),
    );
    assert!(matches!(why, RecoveryRefusal::NotStale { .. }), "{why:?}");
    c.node(other).retire_replica(range, new_conf_ver).unwrap();
    assert!(c.node(other).status(range).is_err());
    assert!(
        c.node(other).range_of(&acked[0]).is_err(),
        "its keys are gone"
    );

    assert!(wait_until(T, || c.leader_of(range) == Some(survivor)).await);
    for key in &acked {
        assert_eq!(
            c.get_from(survivor, key, T).await.unwrap().as_deref(),
            Some(&b"v"[..])
        );
    }
    // A new replica on the retired node (what the scheduler does) catches up from the forced
    // leader: the tombstone keeps out only the old membership's messages.
    c.node(survivor)
        .change_membership(range, vec![MembershipChange::AddVoter(NodeId(other))])
        .await
        .unwrap();
    c.put(&key_in_range(range.0, "after"), b"two", T)
        .await
        .unwrap();
    let ok = wait_until(T, || {
        c.node(other)
            .status(range)
            .is_ok_and(|s| s.applied >= forced.last_index + 2)
    })
    .await;
    assert!(ok, "the new replica did not catch up");
    assert_eq!(
        c.node(other)
            .get(&acked[7], ReadConsistency::Stale)
            .await
            .unwrap()
            .as_deref(),
        Some(&b"v"[..])
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_removed_from_the_registry_has_its_replicas_rebuilt_without_waiting_for_down_time() {
    let dir = tempfile::tempdir().unwrap();
    // Down for an hour before a silent node counts as dead, and no balancing (the thresholds
    // at their widest): only the removal can make the scheduler move anything.
    let configs = (1..=4)
        .map(|id| {
            let mut c = local_server_config(test_config(id), dir.path());
            c.schedule = ScheduleConfig {
                interval: Duration::from_millis(100),
                stable_time: Duration::from_millis(300),
                down_time: Duration::from_secs(3600),
                replica_threshold: 1.0,
                leader_threshold: 1.0,
                ..ScheduleConfig::default()
            };
            c
        })
        .collect();
    let nodes = start_servers(configs, tokio::runtime::Handle::current()).unwrap();
    let members = node_ids(3);
    let layout = range_layout(2, &members);
    for n in &nodes[..3] {
        bootstrap_ranges_and_system(n.node(), layout.clone()).unwrap();
    }
    for d in &layout {
        let first = first_campaigner(d.id(), &members).unwrap();
        nodes[first.0 as usize - 1].node().campaign(d.id()).unwrap();
    }
    // The voters' nodes and the replica count of `range` on its leader among `live`.
    let leader_voters = |live: &[usize], range: RangeId| {
        live.iter().find_map(|&i| {
            let st = nodes[i].node().status(range).ok()?;
            let d = st.descriptor.filter(|_| st.role == StateRole::Leader)?;
            let mut v: Vec<u64> = d
                .replicas
                .iter()
                .filter(|r| r.role == ReplicaRole::Voter as i32)
                .map(|r| r.node_id)
                .collect();
            v.sort();
            Some((v, d.replicas.len()))
        })
    };
    assert!(
        wait_until(T, || layout.iter().all(|d| leader_voters(
            &[0, 1, 2],
            d.id()
        )
        .is_some_and(|(v, _)| v == [1, 2, 3])))
        .await
    );
    nodes[2].shutdown();
    nodes[0]
        .node()
        .set_node_state(NodeId(3), NodeState::Removed)
        .await
        .unwrap();
    let live = [0, 1, 3];
    let rebuilt = wait_until(T, || {
        layout
            .iter()
            .all(|d| leader_voters(&live, d.id()) == Some((vec![1, 2, 4], 3)))
    })
    .await;
    assert!(
        rebuilt,
        "{:?}",
        layout
            .iter()
            .map(|d| leader_voters(&live, d.id()))
            .collect::<Vec<_>>()
    );
    let view = nodes[0].placement().nodes();
    assert!(view
        .iter()
        .any(|n| n.node == NodeId(3) && n.standing == Standing::Removed));
    for n in &nodes {
        n.shutdown();
    }
}
