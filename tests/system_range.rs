//! The system range on the in-memory network: it is created with the layout and never routed
//! to, split or merged, and the range ids it leases are short, unique across the cluster and
//! never handed out twice, restarts included; a split fails with a typed error when no id can
//! be leased.

use std::collections::HashSet;
use std::time::Duration;

use flotilla::testing::{key_in_range, test_config, wait_until, Cluster};
use flotilla::{Error, RangeId, StoreConfig, ID_LEASE_BLOCK};

const T: Duration = Duration::from_secs(30);

fn leader(c: &Cluster, r: RangeId) -> u64 {
    c.leader_of(r).expect("leader")
}

/// Splits `range` at `key` on its leader; the new range's id.
async fn split(c: &Cluster, range: RangeId, key: Vec<u8>) -> RangeId {
    let l = leader(c, range);
    let (_, right) = c.node(l).split(range, Some(key)).await.unwrap();
    c.wait_leaders(&[right.id()], T).await;
    right.id()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_system_range_is_created_with_the_layout_and_holds_no_user_key() {
    let c = Cluster::new(3);
    let layout = c.bootstrap(2);
    c.wait_leaders(&[RangeId::SYSTEM, layout[0].id(), layout[1].id()], T)
        .await;
    for n in 1..=3 {
        let node = c.node(n);
        assert!(node.replica_ranges().contains(&RangeId::SYSTEM));
        // Not in the range table, and no key routes to it.
        assert_eq!(node.ranges().len(), 2);
        assert!(node.ranges().iter().all(|d| !d.id().is_system()));
        assert_ne!(node.range_of(b"").unwrap().id(), RangeId::SYSTEM);
        assert_ne!(node.range_of(b"\xff\xff").unwrap().id(), RangeId::SYSTEM);
        let st = node.node_status();
        assert_eq!(st.replicas, 2);
        assert!(st.system.is_some());
    }
    let sys = leader(&c, RangeId::SYSTEM);
    let refused = c
        .node(sys)
        .split(RangeId::SYSTEM, Some(b"k".to_vec()))
        .await;
    assert!(
        matches!(refused, Err(Error::AdminRefused(_))),
        "{refused:?}"
    );
    let refused = c.node(sys).merge(RangeId::SYSTEM, layout[0].id()).await;
    assert!(refused.is_err(), "{refused:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn range_ids_after_many_splits_are_small_and_unique_across_nodes() {
    let c = Cluster::new(3);
    let layout = c.bootstrap(3);
    let ids: Vec<RangeId> = layout.iter().map(|d| d.id()).collect();
    c.wait_leaders(&ids, T).await;
    let mut seen: HashSet<RangeId> = ids.iter().copied().collect();
    // The layout's three ranges lead on three nodes (first campaigners): splitting each of
    // them leases ids on three nodes, more splits than one lease block on one of them.
    let per_range = ID_LEASE_BLOCK as usize / 2 + 2;
    for (i, d) in layout.iter().enumerate() {
        let mut parent = d.id();
        for j in 0..per_range {
            let key = key_in_range(i as u64 + 1, &format!("{j:04}"));
            let new = split(&c, parent, key).await;
            assert!(seen.insert(new), "{new} handed out twice");
            parent = new;
        }
    }
    let max = seen.iter().map(|r| r.0).max().unwrap();
    // Every id comes from the counter, past the layout: at most a lease block per node and
    // per block taken more than the splits made.
    assert!(seen.iter().all(|r| r.0 >= 1), "{seen:?}");
    assert!(
        max < 3 + (per_range as u64 * 3) + 3 * ID_LEASE_BLOCK * 2,
        "ids are not short: {max}"
    );
    // Every node sees the same range table.
    let total = 3 + 3 * per_range;
    for n in 1..=3 {
        assert!(wait_until(T, || c.node(n).ranges().len() == total).await);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_split_on_a_node_that_does_not_lead_the_system_range_leases_its_ids_through_it() {
    let c = Cluster::new(3);
    let layout = c.bootstrap(3);
    let mut all: Vec<RangeId> = layout.iter().map(|d| d.id()).collect();
    all.push(RangeId::SYSTEM);
    c.wait_leaders(&all, T).await;
    let sys = leader(&c, RangeId::SYSTEM);
    // A range led elsewhere (the layout spreads first leaders over the three nodes).
    let (i, d) = layout
        .iter()
        .enumerate()
        .find(|(_, d)| leader(&c, d.id()) != sys)
        .expect("a range led by another node");
    let l = leader(&c, d.id());
    assert_ne!(l, sys);
    let (_, right) = c
        .node(l)
        .split(d.id(), Some(key_in_range(i as u64 + 1, "m")))
        .await
        .unwrap();
    assert!(
        right.range_id > 3 && right.range_id < 1000,
        "{}",
        right.id()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn range_ids_are_never_handed_out_again_after_a_restart() {
    let mut c = Cluster::new(3);
    let layout = c.bootstrap(1);
    let r = layout[0].id();
    c.wait_leaders(&[r, RangeId::SYSTEM], T).await;
    let mut seen = HashSet::from([r]);
    let mut parent = r;
    for j in 0..3 {
        let new = split(&c, parent, key_in_range(1, &format!("a{j}"))).await;
        assert!(seen.insert(new));
        parent = new;
    }
    // Every node restarts: the ids left in their leases are gone, not reused.
    for n in 1..=3 {
        c.stop(n);
    }
    for n in 1..=3 {
        c.start(n);
    }
    let ranges: Vec<RangeId> = seen.iter().copied().collect();
    c.wait_leaders(&ranges, T).await;
    c.wait_leaders(&[RangeId::SYSTEM], T).await;
    for j in 0..3 {
        let new = split(&c, parent, key_in_range(1, &format!("b{j}"))).await;
        assert!(seen.insert(new), "{new} handed out again after a restart");
        parent = new;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_split_whose_ids_cannot_be_leased_fails_with_a_typed_error() {
    let mut c = Cluster::with_config(
        3,
        |n| {
            let mut cfg = test_config(n);
            cfg.proposal_timeout = Duration::from_secs(1);
            cfg
        },
        StoreConfig::default(),
    );
    let layout = c.bootstrap(1);
    let r = layout[0].id();
    c.wait_leaders(&[r, RangeId::SYSTEM], T).await;
    let l = leader(&c, r);
    // The system range loses its quorum; the range's own leader is still up, with no ids
    // leased yet.
    for n in (1..=3).filter(|n| *n != l).take(2) {
        c.stop(n);
    }
    let res = c.node(l).split(r, Some(key_in_range(1, "x"))).await;
    assert!(matches!(res, Err(Error::SystemUnavailable(_))), "{res:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lagging_system_replica_catches_up_by_snapshot_with_the_counters() {
    let mut c = Cluster::new(3);
    let layout = c.bootstrap(1);
    let r = layout[0].id();
    c.wait_leaders(&[r, RangeId::SYSTEM], T).await;
    let sys = leader(&c, RangeId::SYSTEM);
    let behind = (1..=3).find(|n| *n != sys).unwrap();
    c.stop(behind);
    // Leases move the counter while the node is down (a split leases a block on the range's
    // leader), then the system range's log is compacted: the node needs a snapshot.
    let mut parent = r;
    for j in 0..3 {
        c.wait_leaders(&[parent], T).await;
        let l = leader(&c, parent);
        let (_, right) = c
            .node(l)
            .split(parent, Some(key_in_range(1, &format!("s{j}"))))
            .await
            .unwrap();
        parent = right.id();
    }
    c.wait_leaders(&[RangeId::SYSTEM], T).await;
    let sys = leader(&c, RangeId::SYSTEM);
    c.node(sys).compact_log(RangeId::SYSTEM).await.unwrap();
    let expected = c.node(sys).engine().system_records().unwrap();
    c.start(behind);
    let caught_up = wait_until(T, || {
        c.node(behind).engine().system_records().unwrap() == expected
    })
    .await;
    assert!(caught_up, "the system records did not reach node {behind}");
}
