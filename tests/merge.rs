//! Range merges on the in-memory network: a split undone, merges under concurrent writes, a
//! follower cut off during the merge, a rollback when the target changes meanwhile, restarts.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use flotilla::proto::meta::RangeDescriptor;
use flotilla::testing::{test_config, wait_until, wait_until_async, Cluster};
use flotilla::transport::{FilterId, IsolateFilter, Packet, Payload, PredicateFilter};
use flotilla::{Error, NodeGroupConfig, NodeId, RangeId, ReadConsistency, StoreConfig};
use prost_raft::Message as _;
use raft::prelude::Message;
use tokio::task::JoinHandle;

const T: Duration = Duration::from_secs(30);

/// Merges `source` into `target` through the source's leader, retrying while leadership
/// moves.
async fn merge(c: &Cluster, source: RangeId, target: RangeId) -> Result<RangeDescriptor, Error> {
    let deadline = std::time::Instant::now() + T;
    loop {
        let l = c.leader_of(source).unwrap_or(1);
        match c.node(l).merge(source, target).await {
            Err(Error::NotLeader { .. } | Error::RangeNotFound(_))
                if std::time::Instant::now() < deadline =>
            {
                tokio::time::sleep(Duration::from_millis(20)).await
            }
            other => return other,
        }
    }
}

async fn split(c: &Cluster, range: RangeId, key: &[u8]) -> (RangeDescriptor, RangeDescriptor) {
    c.wait_leaders(&[range], T).await;
    let l = c.leader_of(range).unwrap();
    c.node(l).split(range, Some(key.to_vec())).await.unwrap()
}

/// One range with keys `m00`..`m39` (value `v`, returned) split at `m20`; both halves have
/// a leader.
async fn two_halves(c: &Cluster) -> (RangeDescriptor, RangeDescriptor, Vec<(Vec<u8>, Vec<u8>)>) {
    let d = c.bootstrap(1).remove(0);
    c.wait_leaders(&[d.id()], T).await;
    let mut data = Vec::new();
    for i in 0..40u32 {
        let k = format!("m{i:02}").into_bytes();
        c.put(&k, b"v", T).await.unwrap();
        data.push((k, b"v".to_vec()));
    }
    let (left, right) = split(c, d.id(), b"m20").await;
    c.wait_leaders(&[right.id(), left.id()], T).await;
    (left, right, data)
}

/// Cuts a follower of the source off, starts merging `right` into `left` on the source's
/// leader and waits until that leader froze the source. Returns the leader, the cut-off
/// node, the cut and the merge call.
async fn prepare_with_a_follower_cut_off(
    c: &Arc<Cluster>,
    left: &RangeDescriptor,
    right: &RangeDescriptor,
) -> (
    u64,
    u64,
    FilterId,
    JoinHandle<Result<RangeDescriptor, Error>>,
) {
    let l = c.leader_of(right.id()).unwrap();
    let lagger = (1..=3).find(|&n| n != l).unwrap();
    let cut = c
        .net
        .add_filter(Box::new(IsolateFilter::new(NodeId(lagger))));
    let task = {
        let (c, source, target) = (c.clone(), right.id(), left.id());
        tokio::spawn(async move { c.node(l).merge(source, target).await })
    };
    assert!(
        wait_until(T, || c
            .node(l)
            .ranges()
            .iter()
            .any(|r| r.range_id == right.range_id && r.merge.is_some()))
        .await
    );
    (l, lagger, cut, task)
}

/// Waits until `lagger`'s replica of `source` applied everything its leader `l` committed (so
/// the source's next entry will be a prepare), then returns a packet predicate that hides from
/// `lagger` every later commit index of `source`: it gets the entries but never learns that
/// they committed.
async fn hide_next_commits(
    c: &Cluster,
    source: &RangeDescriptor,
    l: u64,
    lagger: u64,
) -> impl Fn(&Packet) -> bool + Send + Sync + 'static {
    let commit = c.node(l).status(source.id()).unwrap().commit;
    assert!(
        wait_until(T, || c
            .node(lagger)
            .status(source.id())
            .is_ok_and(|s| s.applied == commit))
        .await
    );
    let source = source.id();
    move |p: &Packet| {
        p.to == NodeId(lagger)
            && p.payload.range_id() == source
            && match &p.payload {
                Payload::Heartbeat(h) => h.commit > commit,
                Payload::Message(m) => {
                    Message::decode(&m.message[..]).is_ok_and(|m| m.commit > commit)
                }
            }
    }
}

async fn assert_readable_everywhere(c: &Cluster, data: &[(Vec<u8>, Vec<u8>)]) {
    for n in c.running() {
        for (k, v) in data {
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
async fn split_then_merge_back_restores_one_range_in_both_directions() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(std::env::var("RUST_LOG").unwrap_or_else(|_| "warn".into()))
        .with_test_writer()
        .try_init();
    let c = Cluster::new(3);
    let d = c.bootstrap(1).remove(0);
    c.wait_leaders(&[d.id()], T).await;
    let mut data = Vec::new();
    for i in 0..100u32 {
        let (k, v) = (format!("key{i:03}").into_bytes(), b"v0".to_vec());
        c.put(&k, &v, T).await.unwrap();
        data.push((k, v));
    }
    let (left, right) = split(&c, d.id(), b"key050").await;
    c.wait_leaders(&[right.id()], T).await;
    for (k, v) in data.iter_mut().step_by(7) {
        *v = b"v1".to_vec();
        c.put(k, v, T).await.unwrap();
    }

    // The right half merges back into the left one.
    let merged = merge(&c, right.id(), left.id()).await.unwrap();
    assert_eq!(merged.range_id, left.range_id);
    assert!(merged.start_key.is_empty() && merged.end_key.is_empty());
    assert!(merged.epoch.unwrap().version > right.epoch.unwrap().version);
    for n in 1..=3 {
        assert!(
            wait_until(T, || c.node(n).ranges().len() == 1).await,
            "node {n} still has {:?}",
            c.node(n).ranges()
        );
        assert_eq!(
            c.node(n).range_of(b"key099").unwrap().range_id,
            left.range_id
        );
        assert!(matches!(
            c.node(n).status(right.id()),
            Err(Error::RangeNotFound(_))
        ));
    }
    assert_readable_everywhere(&c, &data).await;
    c.put(b"key077", b"after", T).await.unwrap();
    data.retain(|(k, _)| k != b"key077");
    data.push((b"key077".to_vec(), b"after".to_vec()));

    // Split again, and this time the left half merges into the right one.
    let (left, right) = split(&c, left.id(), b"key030").await;
    c.wait_leaders(&[right.id()], T).await;
    let merged = merge(&c, left.id(), right.id()).await.unwrap();
    assert_eq!(merged.range_id, right.range_id);
    assert!(merged.start_key.is_empty() && merged.end_key.is_empty());
    for n in 1..=3 {
        assert!(wait_until(T, || c.node(n).ranges().len() == 1).await);
    }
    c.put(b"key000", b"again", T).await.unwrap();
    data.retain(|(k, _)| k != b"key000");
    data.push((b"key000".to_vec(), b"again".to_vec()));
    assert_readable_everywhere(&c, &data).await;

    // Bad requests are refused with a reason.
    let l = c.leader_of(right.id()).unwrap();
    let res = c.node(l).merge(right.id(), right.id()).await;
    assert!(
        matches!(res, Err(Error::RangeNotFound(_) | Error::AdminRefused(_))),
        "{res:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn non_adjacent_ranges_are_refused() {
    let c = Cluster::new(3);
    let d = c.bootstrap(1).remove(0);
    c.wait_leaders(&[d.id()], T).await;
    let (a, bc) = split(&c, d.id(), b"b").await;
    let (_b, cc) = split(&c, bc.id(), b"c").await;
    c.wait_leaders(&[cc.id()], T).await;
    let res = merge(&c, a.id(), cc.id()).await;
    assert!(matches!(res, Err(Error::AdminRefused(_))), "{res:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn merges_under_concurrent_writes_lose_nothing() {
    let c = Arc::new(Cluster::new(3));
    let d = c.bootstrap(1).remove(0);
    c.wait_leaders(&[d.id()], T).await;
    // Eight ranges first.
    let mut current = d.id();
    for s in ["1", "2", "3", "4", "5", "6", "7"] {
        let (_, right) = split(&c, current, s.as_bytes()).await;
        current = right.id();
    }
    assert!(wait_until(T, || (1..=3).all(|n| c.node(n).ranges().len() == 8)).await);
    let stop = Arc::new(AtomicBool::new(false));
    let mut writers = Vec::new();
    for w in 0..4u32 {
        let (c, stop) = (c.clone(), stop.clone());
        writers.push(tokio::spawn(async move {
            let mut acked = Vec::new();
            let mut i = 0u32;
            while !stop.load(Ordering::Relaxed) {
                // Keys spread over all eight ranges; every key written once.
                let key = format!("{}-{w}-{i:05}", i % 8).into_bytes();
                let val = format!("{w}:{i}").into_bytes();
                if c.put(&key, &val, T).await.is_ok() {
                    acked.push((key, val));
                }
                i += 1;
            }
            acked
        }));
    }
    // Merge neighbours until one range is left: each time the second range into the first.
    let mut merges = 0;
    while c.node(1).ranges().len() > 1 {
        tokio::time::sleep(Duration::from_millis(30)).await;
        let ranges = c.node(1).ranges();
        if ranges.len() < 2 {
            break;
        }
        let (target, source) = (ranges[0].id(), ranges[1].id());
        match merge(&c, source, target).await {
            Ok(_) => merges += 1,
            // The node's view may be behind for a moment.
            Err(Error::AdminRefused(_) | Error::ProposalDropped | Error::EpochNotMatch { .. }) => {}
            Err(e) => panic!("merge failed: {e}"),
        }
        assert!(merges <= 7);
    }
    assert_eq!(merges, 7);
    tokio::time::sleep(Duration::from_millis(200)).await;
    stop.store(true, Ordering::Relaxed);
    let mut acked = Vec::new();
    for w in writers {
        acked.extend(w.await.unwrap());
    }
    assert!(acked.len() > 50, "only {} writes", acked.len());
    for n in 1..=3 {
        assert!(wait_until(T, || c.node(n).ranges().len() == 1).await);
        let r = &c.node(n).ranges()[0];
        assert!(r.start_key.is_empty() && r.end_key.is_empty());
    }
    assert_readable_everywhere(&c, &acked).await;
    // Nothing was applied that was not acknowledged-or-attempted: every key on every node
    // holds a value some writer wrote for it.
    for n in 1..=3 {
        let all = c
            .node(n)
            .scan(b"", b"", 1_000_000, ReadConsistency::Stale)
            .await
            .unwrap()
            .pairs;
        for (k, v) in all {
            let k = String::from_utf8(k).unwrap();
            let v = String::from_utf8(v).unwrap();
            let (w, i) = v.split_once(':').unwrap();
            let i: u32 = i.parse().unwrap();
            assert_eq!(
                k,
                format!("{}-{w}-{i:05}", i % 8),
                "node {n}: foreign value"
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn follower_cut_off_during_merge_delays_it_and_catches_up() {
    let c = Arc::new(Cluster::new(3));
    let (left, right, _) = two_halves(&c).await;
    // The source is frozen at once, but the target cannot take it over while a source
    // replica misses the prepare entry.
    let (l, lagger, cut, task) = prepare_with_a_follower_cut_off(&c, &left, &right).await;
    let res = c.node(l).put(b"m30", b"frozen").await;
    assert!(matches!(res, Err(Error::Busy(_))), "{res:?}");
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(!task.is_finished(), "merged without the cut-off replica");
    c.net.remove_filter(cut);
    let merged = task.await.unwrap().unwrap();
    assert!(merged.start_key.is_empty() && merged.end_key.is_empty());
    assert!(
        wait_until(T, || c.node(lagger).ranges().len() == 1).await,
        "lagger still has {:?}",
        c.node(lagger).ranges()
    );
    c.put(b"m30", b"after", T).await.unwrap();
    let v = c.get_from(lagger, b"m30", T).await.unwrap();
    assert_eq!(v.as_deref(), Some(&b"after"[..]));
    let v = c.get_from(lagger, b"m05", T).await.unwrap();
    assert_eq!(v.as_deref(), Some(&b"v"[..]));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn merge_rolls_back_when_the_target_splits_meanwhile() {
    let c = Arc::new(Cluster::new(3));
    let (left, right, _) = two_halves(&c).await;
    // With a source replica cut off, the merge stays prepared long enough to split the target.
    let (_, _, cut, task) = prepare_with_a_follower_cut_off(&c, &left, &right).await;
    let (_, _) = split(&c, left.id(), b"m10").await;
    let res = task.await.unwrap();
    assert!(
        matches!(&res, Err(Error::AdminRefused(m)) if m.contains("rolled back")),
        "{res:?}"
    );
    c.net.remove_filter(cut);
    // The source serves again, on every node.
    c.put(b"m30", b"after", T).await.unwrap();
    for n in 1..=3 {
        assert!(wait_until(T, || c.node(n).ranges().len() == 3).await);
        assert!(c.node(n).ranges().iter().all(|r| r.merge.is_none()));
        let v = c.get_from(n, b"m30", T).await.unwrap();
        assert_eq!(v.as_deref(), Some(&b"after"[..]));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn merge_survives_a_restart_of_every_node() {
    let mut c = Cluster::new(3);
    let d = c.bootstrap(1).remove(0);
    c.wait_leaders(&[d.id()], T).await;
    let mut data = Vec::new();
    for i in 0..30u32 {
        let k = format!("r{i:02}").into_bytes();
        c.put(&k, b"1", T).await.unwrap();
        data.push((k, b"1".to_vec()));
    }
    let (left, right) = split(&c, d.id(), b"r15").await;
    c.wait_leaders(&[right.id()], T).await;
    merge(&c, right.id(), left.id()).await.unwrap();
    c.put(b"r20", b"2", T).await.unwrap();
    data.retain(|(k, _)| k != b"r20");
    data.push((b"r20".to_vec(), b"2".to_vec()));
    for n in 1..=3 {
        assert!(wait_until(T, || c.node(n).ranges().len() == 1).await);
    }
    for n in 1..=3 {
        c.stop(n);
    }
    for n in 1..=3 {
        c.start(n);
    }
    c.wait_leaders(&[left.id()], T).await;
    for n in 1..=3 {
        assert_eq!(c.node(n).ranges().len(), 1);
        assert!(c.node(n).status(right.id()).is_err());
    }
    assert_readable_everywhere(&c, &data).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn target_waits_for_a_source_replica_that_never_learned_the_prepare_committed() {
    // A follower has the prepare entry in its log (so the merge may commit) but is never told
    // by the source's leader that it committed. Its target replica must wait at the
    // CommitMerge, tell the source replica the entry is committed, and merge once it applied.
    let c = Arc::new(Cluster::new(3));
    let (left, right, _) = two_halves(&c).await;
    c.put(b"m25", b"w", T).await.unwrap();
    let l = c.leader_of(right.id()).unwrap();
    let lagger = (1..=3).find(|&n| n != l).unwrap();
    let hides = hide_next_commits(&c, &right, l, lagger).await;
    let hide_commit = c.net.add_filter(Box::new(PredicateFilter::new(hides)));
    let merged = merge(&c, right.id(), left.id()).await.unwrap();
    assert!(merged.start_key.is_empty() && merged.end_key.is_empty());
    assert!(
        wait_until(T, || c.node(lagger).ranges().len() == 1).await,
        "lagger still has {:?}",
        c.node(lagger).ranges()
    );
    c.net.remove_filter(hide_commit);
    let v = c.get_from(lagger, b"m25", T).await.unwrap();
    assert_eq!(v.as_deref(), Some(&b"w"[..]));
    c.put(b"m30", b"after", T).await.unwrap();
    let v = c.get_from(lagger, b"m30", T).await.unwrap();
    assert_eq!(v.as_deref(), Some(&b"after"[..]));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replica_that_missed_the_merge_catches_up_by_a_snapshot_of_the_merged_range() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(std::env::var("RUST_LOG").unwrap_or_else(|_| "warn".into()))
        .with_test_writer()
        .try_init();
    // A follower gets the prepare entry but never learns it committed, and its target replica
    // misses the merge and the log after it (compacted away). The snapshot of the merged
    // range it then receives overlaps its stale source replica: that replica is retired and
    // the snapshot installed.
    let c = Arc::new(Cluster::new(3));
    let (left, right, _) = two_halves(&c).await;
    let l = c.leader_of(right.id()).unwrap();
    let lagger = (1..=3)
        .find(|&n| n != l && Some(n) != c.leader_of(left.id()))
        .unwrap();
    let hides = hide_next_commits(&c, &right, l, lagger).await;
    let target = left.id();
    let cut = c.net.add_filter(Box::new(PredicateFilter::new(move |p| {
        (p.to == NodeId(lagger) && p.payload.range_id() == target) || hides(p)
    })));
    merge(&c, right.id(), left.id()).await.unwrap();
    // Through the nodes that know the merged range (the lagger still routes to the source).
    let writer = c.leader_of(left.id()).unwrap();
    assert!(
        wait_until_async(T, || async {
            c.node(writer).put(b"m30", b"after").await.is_ok()
        })
        .await
    );
    for n in (1..=3).filter(|&n| n != lagger) {
        assert!(wait_until(T, || c.node(n).ranges().len() == 1).await);
        c.node(n).compact_log(left.id()).await.unwrap();
    }
    assert_eq!(
        c.node(lagger).ranges().len(),
        2,
        "the lagger saw nothing yet"
    );
    c.net.remove_filter(cut);
    assert!(
        wait_until(T, || c.node(lagger).ranges().len() == 1).await,
        "lagger still has {:?}",
        c.node(lagger).ranges()
    );
    assert!(!c.node(lagger).is_failed(left.id()));
    let v = c.get_from(lagger, b"m30", T).await.unwrap();
    assert_eq!(v.as_deref(), Some(&b"after"[..]));
    let v = c.get_from(lagger, b"m05", T).await.unwrap();
    assert_eq!(v.as_deref(), Some(&b"v"[..]));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn merge_waits_for_a_stopped_node_and_finishes_after_it_restarts() {
    // A node is down when the merge is prepared: the source freezes, but the commit waits
    // until that node's source replica has the prepare entry; the node restarts from its
    // store, catches up and every node ends with the merged range.
    let quick = |node| NodeGroupConfig {
        merge_timeout: Duration::from_millis(500),
        ..test_config(node)
    };
    let mut c = Cluster::with_config(3, quick, StoreConfig::default());
    let (left, right, mut data) = two_halves(&c).await;
    let l = c.leader_of(right.id()).unwrap();
    let down = (1..=3)
        .find(|&n| n != l && Some(n) != c.leader_of(left.id()))
        .unwrap_or_else(|| (1..=3).find(|&n| n != l).unwrap());
    c.stop(down);
    let res = c.node(l).merge(right.id(), left.id()).await;
    assert!(matches!(res, Err(Error::ProposalDropped)), "{res:?}");
    assert!(c
        .node(l)
        .ranges()
        .iter()
        .any(|r| r.range_id == right.range_id && r.merge.is_some()));
    c.start(down);
    for n in 1..=3 {
        assert!(
            wait_until(T, || c.node(n).ranges().len() == 1).await,
            "node {n} still has {:?}",
            c.node(n).ranges()
        );
    }
    let writer = c.leader_of(left.id()).unwrap_or(l);
    assert!(
        wait_until_async(T, || async {
            c.node(writer).put(b"m30", b"after").await.is_ok()
        })
        .await
    );
    data.retain(|(k, _)| k != b"m30");
    data.push((b"m30".to_vec(), b"after".to_vec()));
    assert_readable_everywhere(&c, &data).await;
}
