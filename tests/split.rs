//! Range splits on the in-memory network: on request, under concurrent writes, with the hard
//! cases (a follower partitioned during the split, a node restarted after it).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use flotilla::testing::{wait_until, Cluster};
use flotilla::transport::IsolateFilter;
use flotilla::{Error, NodeId, RangeId, ReadConsistency};

const T: Duration = Duration::from_secs(30);

fn leader(c: &Cluster, r: RangeId) -> u64 {
    c.leader_of(r).expect("leader")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn split_on_request_moves_no_data_and_both_halves_serve() {
    let c = Cluster::new(3);
    let d = c.bootstrap(1).remove(0);
    c.wait_leaders(&[d.id()], T).await;
    for i in 0..100u32 {
        c.put(format!("key{i:03}").as_bytes(), b"v", T)
            .await
            .unwrap();
    }
    let l = leader(&c, d.id());
    let (left, right) = c
        .node(l)
        .split(d.id(), Some(b"key050".to_vec()))
        .await
        .unwrap();
    assert_eq!(&left.end_key[..], b"key050");
    assert_eq!(&right.start_key[..], b"key050");
    assert!(right.end_key.is_empty());
    assert_eq!(left.epoch.unwrap().version, d.epoch.unwrap().version + 1);
    // Every node learns both halves and the new group elects a leader.
    for n in 1..=3 {
        assert!(wait_until(T, || c.node(n).ranges().len() == 2).await);
    }
    c.wait_leaders(&[right.id()], T).await;
    // Both halves read their keys (no data moved) and take writes.
    for n in 1..=3 {
        let v = c.get_from(n, b"key010", T).await.unwrap();
        assert_eq!(v.as_deref(), Some(&b"v"[..]));
        let v = c.get_from(n, b"key090", T).await.unwrap();
        assert_eq!(v.as_deref(), Some(&b"v"[..]));
    }
    c.put(b"key000", b"w", T).await.unwrap();
    c.put(b"key099", b"w", T).await.unwrap();
    assert_eq!(
        c.node(1).range_of(b"key099").unwrap().range_id,
        right.range_id
    );
    // A client with the old epoch is told the current shape.
    let res = c
        .node(leader(&c, d.id()))
        .propose(
            b"key001",
            vec![],
            flotilla::ProposeOptions {
                epoch: d.epoch,
                ..Default::default()
            },
        )
        .await;
    assert!(matches!(res, Err(Error::EpochNotMatch { .. })), "{res:?}");
    // A split key outside the range is refused.
    let l = leader(&c, d.id());
    let res = c.node(l).split(d.id(), Some(b"zzz".to_vec())).await;
    assert!(matches!(res, Err(Error::AdminRefused(_))), "{res:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn repeated_splits_under_concurrent_writes_lose_nothing() {
    let c = Arc::new(Cluster::new(3));
    let d = c.bootstrap(1).remove(0);
    c.wait_leaders(&[d.id()], T).await;
    let stop = Arc::new(AtomicBool::new(false));
    let mut writers = Vec::new();
    for w in 0..4u32 {
        let (c, stop) = (c.clone(), stop.clone());
        writers.push(tokio::spawn(async move {
            let mut acked = Vec::new();
            let mut i = 0u32;
            while !stop.load(Ordering::Relaxed) {
                let key = format!("{:02}-{w}-{i:05}", i % 97).into_bytes();
                let val = format!("{w}:{i}").into_bytes();
                if c.put(&key, &val, T).await.is_ok() {
                    acked.push((key, val));
                }
                i += 1;
            }
            acked
        }));
    }
    // Split by middle key until there are 8 ranges.
    let mut splits = 0;
    while c.node(1).ranges().len() < 8 {
        tokio::time::sleep(Duration::from_millis(50)).await;
        let ranges = c.node(1).ranges();
        let target = ranges[splits % ranges.len()].id();
        let Some(l) = c.leader_of(target) else {
            continue;
        };
        match c.node(l).split(target, None).await {
            Ok(_) => splits += 1,
            Err(
                Error::AdminRefused(_)
                | Error::NotLeader { .. }
                | Error::EpochNotMatch { .. }
                | Error::ProposalDropped,
            ) => {}
            Err(e) => panic!("split failed: {e}"),
        }
        assert!(splits < 100);
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    stop.store(true, Ordering::Relaxed);
    let mut acked = Vec::new();
    for w in writers {
        acked.extend(w.await.unwrap());
    }
    assert!(acked.len() > 50, "only {} writes", acked.len());
    let ranges = c.node(1).ranges();
    assert!(ranges.len() >= 8);
    // Ranges partition the key space.
    assert!(ranges[0].start_key.is_empty() && ranges.last().unwrap().end_key.is_empty());
    for w in ranges.windows(2) {
        assert_eq!(w[0].end_key, w[1].start_key);
    }
    for n in 1..=3 {
        for (k, v) in &acked {
            let got = c.get_from(n, k, T).await.unwrap();
            assert_eq!(
                got.as_deref(),
                Some(&v[..]),
                "node {n} lost {}",
                String::from_utf8_lossy(k)
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn follower_partitioned_during_split_catches_up_without_conflict() {
    let c = Cluster::new(3);
    let d = c.bootstrap(1).remove(0);
    c.wait_leaders(&[d.id()], T).await;
    for i in 0..20u32 {
        c.put(format!("k{i:02}").as_bytes(), b"v", T).await.unwrap();
    }
    let l = leader(&c, d.id());
    let lagger = (1..=3).find(|&n| n != l).unwrap();
    let f = c
        .net
        .add_filter(Box::new(IsolateFilter::new(NodeId(lagger))));
    let (_, right) = c
        .node(l)
        .split(d.id(), Some(b"k10".to_vec()))
        .await
        .unwrap();
    c.wait_leaders(&[right.id()], T).await;
    // The new group takes writes while the lagger has not applied the split: its leader's
    // messages to the lagger must not create a conflicting empty replica there.
    c.put(b"k15", b"new", T).await.unwrap();
    c.net.remove_filter(f);
    assert!(
        wait_until(T, || c.node(lagger).ranges().len() == 2).await,
        "lagger never applied the split"
    );
    let v = c.get_from(lagger, b"k15", T).await.unwrap();
    assert_eq!(v.as_deref(), Some(&b"new"[..]));
    assert!(!c.node(lagger).is_failed(right.id()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn split_survives_a_restart_of_every_node() {
    let mut c = Cluster::new(3);
    let d = c.bootstrap(1).remove(0);
    c.wait_leaders(&[d.id()], T).await;
    for i in 0..30u32 {
        c.put(format!("r{i:02}").as_bytes(), b"1", T).await.unwrap();
    }
    let l = leader(&c, d.id());
    let (_, right) = c.node(l).split(d.id(), None).await.unwrap();
    c.put(&right.start_key, b"2", T).await.unwrap();
    for n in 1..=3 {
        c.stop(n);
    }
    for n in 1..=3 {
        c.start(n);
    }
    c.wait_leaders(&[d.id(), right.id()], T).await;
    for n in 1..=3 {
        assert_eq!(c.node(n).ranges().len(), 2);
        let v = c
            .node(n)
            .get(&right.start_key, ReadConsistency::Stale)
            .await
            .unwrap();
        assert!(v.is_some());
    }
    for i in 0..30u32 {
        let v = c
            .get_from(1, format!("r{i:02}").as_bytes(), T)
            .await
            .unwrap();
        assert!(v.is_some());
    }
}

fn splitting_config(
    keys: u64,
    qps: u64,
) -> impl Fn(u64) -> flotilla::NodeGroupConfig + Send + Sync {
    move |n| flotilla::NodeGroupConfig {
        split: flotilla::SplitConfig {
            max_range_keys: keys,
            load_qps: qps,
            load_window: Duration::from_millis(500),
            check_interval: Duration::from_millis(100),
            ..Default::default()
        },
        ..flotilla::testing::test_config(n)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ranges_split_by_themselves_when_they_hold_too_many_keys() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(std::env::var("RUST_LOG").unwrap_or_else(|_| "warn".into()))
        .with_test_writer()
        .try_init();
    let c = Cluster::with_config(3, splitting_config(50, 0), Default::default());
    let d = c.bootstrap(1).remove(0);
    c.wait_leaders(&[d.id()], T).await;
    for i in 0..400u32 {
        c.put(format!("s{i:04}").as_bytes(), b"v", T).await.unwrap();
    }
    assert!(
        wait_until(T, || c.node(1).ranges().len() >= 4).await,
        "only {} ranges",
        c.node(1).ranges().len()
    );
    for i in (0..400u32).step_by(7) {
        let v = c
            .get_from(2, format!("s{i:04}").as_bytes(), T)
            .await
            .unwrap();
        assert!(v.is_some());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hot_range_splits_at_a_key_that_divides_its_load() {
    let c = Cluster::with_config(3, splitting_config(0, 50), Default::default());
    let d = c.bootstrap(1).remove(0);
    c.wait_leaders(&[d.id()], T).await;
    // Reads and writes spread over keys a..z through the leader's node.
    let deadline = std::time::Instant::now() + T;
    let mut i = 0u32;
    while c.node(1).ranges().len() < 2 {
        assert!(
            std::time::Instant::now() < deadline,
            "hot range never split"
        );
        let key = [b'a' + (i % 26) as u8];
        c.put(&key, b"x", T).await.unwrap();
        i += 1;
    }
    let ranges = c.node(1).ranges();
    let split_key = ranges[1].start_key.clone();
    // The median of keys uniformly spread over a..z lands well inside, not at an edge.
    assert!(
        split_key[..] > b"c"[..] && split_key[..] < b"x"[..],
        "{split_key:?}"
    );
}
