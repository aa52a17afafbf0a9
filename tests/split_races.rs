//! The hard cases of a range split (issue 5), on the in-memory network: a split racing a
//! leader change, a split racing a snapshot (a follower that missed the split and the
//! compacted log), a node stopped right after a split was proposed, and exactly-once /
//! no-phantom-read checks for request-id writers under concurrent splits.
//!
//! Each test lets the race go either way where the runtime may legitimately choose (the
//! split applies, or cleanly does not and a retry works) and asserts only what must hold in
//! every case: all nodes converge to the same descriptors, every range has a leader, no
//! replica is failed, and every acknowledged write is readable everywhere. Every wait is
//! bounded and polls a condition.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use flotilla::proto::command::{kv_request, CompareAndSet, KvRequest};
use flotilla::proto::meta::RangeDescriptor;
use flotilla::testing::{test_config, wait_until, Cluster};
use flotilla::transport::{IsolateFilter, PredicateFilter};
use flotilla::{
    Error, NodeGroupConfig, NodeId, ProposeOptions, RangeId, ReadConsistency, ReplicaId,
    StoreConfig,
};
use prost_raft::Message as _;
use raft::prelude::{Message, MessageType};

/// Bound of every wait.
const T: Duration = Duration::from_secs(20);

/// Logs to the test output when `RUST_LOG` is set.
fn init_log() {
    if let Ok(filter) = std::env::var("RUST_LOG") {
        let _ = tracing_subscriber::fmt()
            .with_env_filter(filter)
            .with_test_writer()
            .try_init();
    }
}

/// Runs a KV request through `node` until it gets an answer, retrying the errors that say
/// the request was not proposed (same request id, so a retry is safe either way).
async fn kv_retry(
    c: &Cluster,
    node: u64,
    req: &KvRequest,
    opts: ProposeOptions,
) -> flotilla::proto::command::KvResponse {
    let deadline = Instant::now() + T;
    loop {
        match c.node(node).kv(req.clone(), opts).await {
            Ok(r) => return r,
            Err(e @ (Error::NotLeader { .. } | Error::Busy(_) | Error::EpochNotMatch { .. }))
                if Instant::now() < deadline =>
            {
                let _ = e;
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            Err(e) => panic!("request failed: {e}"),
        }
    }
}

fn raft_type(m: &flotilla::proto::transport::RaftMessage) -> Option<MessageType> {
    Message::decode(&m.message[..])
        .ok()
        .map(|m| m.get_msg_type())
}

fn key(i: u32) -> Vec<u8> {
    format!("k{i:04}").into_bytes()
}

fn show(ranges: &[RangeDescriptor]) -> String {
    ranges
        .iter()
        .map(|d| {
            format!(
                "r{}[{}..{}) v{}",
                d.range_id,
                String::from_utf8_lossy(&d.start_key),
                String::from_utf8_lossy(&d.end_key),
                d.epoch_or_default().version
            )
        })
        .collect::<Vec<_>>()
        .join(" ")
}

/// Waits until every running node serves the same descriptors, they cover the key space
/// without gaps or overlaps, every range has a leader, and no replica is failed. Returns the
/// common descriptors.
async fn converge(c: &Cluster) -> Vec<RangeDescriptor> {
    let ok = wait_until(T, || {
        let nodes = c.running();
        let first = c.node(nodes[0]).ranges();
        let same = nodes.iter().all(|&n| c.node(n).ranges() == first);
        let tiled = first.first().is_some_and(|d| d.start_key.is_empty())
            && first.last().is_some_and(|d| d.end_key.is_empty())
            && first.windows(2).all(|w| w[0].end_key == w[1].start_key);
        let led = first.iter().all(|d| c.leader_of(d.id()).is_some());
        same && tiled && led
    })
    .await;
    let dump: Vec<String> = c
        .running()
        .iter()
        .map(|&n| format!("node {n}: {}", show(&c.node(n).ranges())))
        .collect();
    assert!(
        ok,
        "nodes did not converge:\n{}\n{}",
        dump.join("\n"),
        replica_states(c)
    );
    let ranges = c.node(c.running()[0]).ranges();
    for n in c.running() {
        for d in &ranges {
            assert!(!c.node(n).is_failed(d.id()), "node {n}: {} failed", d.id());
        }
    }
    ranges
}

/// What every running node's replicas are doing, for the message of a wait that failed.
fn replica_states(c: &Cluster) -> String {
    let mut out = String::new();
    for n in c.running() {
        let node = c.node(n);
        let ranges = node.ranges().iter().map(|d| d.id()).collect::<Vec<_>>();
        for r in ranges.into_iter().chain([RangeId::SYSTEM]) {
            if let Ok(s) = node.status(r) {
                out += &format!(
                    "node {n} {r}: {:?} term {} leader {} asleep {} commit {} last {}\n",
                    s.role, s.term, s.leader, s.asleep, s.commit, s.last_index
                );
            }
        }
    }
    out
}

/// Whether `split_key` is the start of a range on every running node.
fn split_at(c: &Cluster, split_key: &[u8]) -> bool {
    c.running().iter().all(|&n| {
        c.node(n)
            .ranges()
            .iter()
            .any(|d| &d.start_key[..] == split_key)
    })
}

/// Splits the range holding `split_key` at it, retrying transient errors until the split is
/// visible on every node. A split that already happened (from an earlier attempt whose
/// outcome was unknown) counts as done.
async fn split_until_done(c: &Cluster, split_key: &[u8]) {
    let deadline = Instant::now() + T;
    loop {
        if split_at(c, split_key) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "split at {} never happened",
            String::from_utf8_lossy(split_key)
        );
        let range = c.node(c.running()[0]).range_of(split_key).unwrap().id();
        let Some(l) = c.leader_of(range) else {
            tokio::time::sleep(Duration::from_millis(10)).await;
            continue;
        };
        match c.node(l).split(range, Some(split_key.to_vec())).await {
            Ok(_) => {
                assert!(wait_until(T, || split_at(c, split_key)).await);
                return;
            }
            Err(
                Error::NotLeader { .. }
                | Error::EpochNotMatch { .. }
                | Error::ProposalDropped
                | Error::Busy(_)
                | Error::RangeNotFound(_)
                | Error::AdminRefused(_),
            ) => tokio::time::sleep(Duration::from_millis(10)).await,
            Err(e) => panic!("split failed: {e}"),
        }
    }
}

/// Asserts every acknowledged `(key, value)` is read back, linearizably, through every node.
async fn check_acked(c: &Cluster, acked: &[(Vec<u8>, Vec<u8>)]) {
    for n in c.running() {
        for (k, v) in acked {
            let got = c.get_from(n, k, T).await.unwrap();
            assert_eq!(
                got.as_deref(),
                Some(&v[..]),
                "node {n} lost acknowledged write to {}",
                String::from_utf8_lossy(k)
            );
        }
    }
}

/// Writes `keys` (value = key), returning what was acknowledged.
async fn write_all(c: &Cluster, keys: impl Iterator<Item = u32>) -> Vec<(Vec<u8>, Vec<u8>)> {
    let mut acked = Vec::new();
    for i in keys {
        let k = key(i);
        c.put(&k, &k, T).await.unwrap();
        acked.push((k.clone(), k));
    }
    acked
}

/// Acknowledged `(key, value)` writes of one writer.
type Acked = Vec<(Vec<u8>, Vec<u8>)>;

/// Background writers on unique keys `w{writer}-{n}`; returns the acknowledged ones on stop.
fn spawn_writers(
    c: &Arc<Cluster>,
    writers: u32,
    stop: &Arc<AtomicBool>,
) -> Vec<tokio::task::JoinHandle<Acked>> {
    (0..writers)
        .map(|w| {
            let (c, stop) = (c.clone(), stop.clone());
            tokio::spawn(async move {
                let mut acked = Vec::new();
                let mut n = 0u32;
                while !stop.load(Ordering::Relaxed) {
                    // Spread over the whole key space: "k0000".."k0199" style prefixes.
                    let k = format!("k{:04}-w{w}-{n}", (n * 37 + w * 11) % 200).into_bytes();
                    if c.put(&k, &k, Duration::from_secs(2)).await.is_ok() {
                        acked.push((k.clone(), k));
                    }
                    n += 1;
                }
                acked
            })
        })
        .collect()
}

// ---------------------------------------------------------------------------------------------
// a. A split racing a leader change.
// ---------------------------------------------------------------------------------------------

/// The split is proposed and leadership is handed to another replica in the same instant,
/// three times in a row (on different ranges), under concurrent writes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn split_racing_a_leader_transfer_is_atomic() {
    let c = Arc::new(Cluster::new(3));
    let d = c.bootstrap(1).remove(0);
    c.wait_leaders(&[d.id()], T).await;
    let mut acked = write_all(&c, 0..200).await;
    let stop = Arc::new(AtomicBool::new(false));
    let writers = spawn_writers(&c, 2, &stop);
    let mut applied_directly = 0;
    for (round, split_key) in [key(50), key(100), key(150)].into_iter().enumerate() {
        let range = c.node(1).range_of(&split_key).unwrap();
        c.wait_leaders(&[range.id()], T).await;
        let l = c.leader_of(range.id()).unwrap();
        let to = (1..=3).filter(|&n| n != l).nth(round % 2).unwrap();
        let node = c.node(l);
        let (split, transfer) = tokio::join!(
            node.split(range.id(), Some(split_key.clone())),
            node.transfer_leader(range.id(), ReplicaId(to)),
        );
        match &split {
            Ok(_) => applied_directly += 1,
            Err(Error::ProposalDropped | Error::NotLeader { .. } | Error::Busy(_)) => {}
            Err(e) => panic!("unexpected split error: {e}"),
        }
        let _ = transfer;
        let ranges = converge(&c).await;
        // Either the split happened everywhere, or nowhere and retrying it works.
        let here = ranges.iter().any(|d| d.start_key == split_key);
        if split.is_ok() {
            assert!(here, "acknowledged split missing: {}", show(&ranges));
        }
        split_until_done(&c, &split_key).await;
    }
    stop.store(true, Ordering::Relaxed);
    for w in writers {
        acked.extend(w.await.unwrap());
    }
    let ranges = converge(&c).await;
    assert_eq!(ranges.len(), 4, "{}", show(&ranges));
    eprintln!(
        "split_racing_a_leader_transfer: {applied_directly}/3 splits acknowledged directly, {} writes",
        acked.len()
    );
    check_acked(&c, &acked).await;
    // Both halves of every split take writes.
    for d in &ranges {
        let mut k = d.start_key.to_vec();
        k.extend_from_slice(b"-after");
        c.put(&k, b"x", T).await.unwrap();
    }
}

/// The leader proposes a split that never leaves it (its appends are dropped), then is cut
/// off: the others elect a new leader and go on without the split; when the old leader comes
/// back its uncommitted split is overwritten, its caller is told the outcome is unknown, and
/// the retried split works. Then the other way round: the split reaches the followers but the
/// leader is cut off before it can commit it; the new leader commits it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn split_racing_a_leader_isolation_is_atomic() {
    let c = Arc::new(Cluster::new(3));
    let d = c.bootstrap(1).remove(0);
    c.wait_leaders(&[d.id()], T).await;
    let mut acked = write_all(&c, 0..100).await;

    // 1. The split entry stays on the leader only.
    let l = c.leader_of(d.id()).unwrap();
    let range = d.id();
    assert!(
        wait_until(T, || {
            let st = c.node(l).status(range).unwrap();
            st.commit == st.last_index
        })
        .await
    );
    let before = c.node(l).status(range).unwrap().last_index;
    let appends = c
        .net
        .add_filter(Box::new(PredicateFilter::messages(move |from, _, m| {
            from == NodeId(l)
                && m.range_id == range.0
                && raft_type(m) == Some(MessageType::MsgAppend)
        })));
    let split = {
        let c = c.clone();
        tokio::spawn(async move { c.node(l).split(range, Some(key(50))).await })
    };
    // The proposal is in the leader's log once its last index moves past the commit.
    assert!(
        wait_until(T, || {
            let st = c.node(l).status(range).unwrap();
            st.last_index > before && st.last_index > st.commit
        })
        .await
    );
    let iso = c.net.add_filter(Box::new(IsolateFilter::new(NodeId(l))));
    c.net.remove_filter(appends);
    assert!(
        wait_until(T, || c.leader_of(range).is_some_and(|n| n != l)).await,
        "no new leader"
    );
    acked.extend(write_all(&c, 100..120).await);
    c.net.remove_filter(iso);
    let res = split.await.unwrap();
    assert!(
        matches!(res, Err(Error::ProposalDropped)),
        "a split that was overwritten must not be acknowledged: {res:?}"
    );
    let ranges = converge(&c).await;
    assert_eq!(ranges.len(), 1, "split applied: {}", show(&ranges));
    split_until_done(&c, &key(50)).await;

    // 2. The split reaches the followers, but the leader is cut off before it learns it
    // committed (their append responses are dropped).
    let range = c.node(1).range_of(&key(80)).unwrap().id();
    c.wait_leaders(&[range], T).await;
    let l = c.leader_of(range).unwrap();
    // Everything the leader has (its new term's first entry among it) must be committed
    // first, or the wait below could pass on that entry before the split is even proposed.
    assert!(
        wait_until(T, || {
            let st = c.node(l).status(range).unwrap();
            st.commit == st.last_index
        })
        .await
    );
    let before = c.node(l).status(range).unwrap().last_index;
    let acks = c
        .net
        .add_filter(Box::new(PredicateFilter::messages(move |_, to, m| {
            to == NodeId(l)
                && m.range_id == range.0
                && raft_type(m) == Some(MessageType::MsgAppendResponse)
        })));
    let proposed = Instant::now();
    let split = {
        let c = c.clone();
        tokio::spawn(async move { c.node(l).split(range, Some(key(80))).await })
    };
    let followers: Vec<u64> = (1..=3).filter(|&n| n != l).collect();
    assert!(
        wait_until(T, || {
            let li = c.node(l).status(range).unwrap().last_index;
            let st = c.node(l).status(range).unwrap();
            st.last_index > before
                && st.last_index > st.commit
                && followers
                    .iter()
                    .all(|&f| c.node(f).status(range).unwrap().last_index >= li)
        })
        .await
    );
    let iso = c.net.add_filter(Box::new(IsolateFilter::new(NodeId(l))));
    c.net.remove_filter(acks);
    // The new leader commits the split with its first entry.
    assert!(
        wait_until(T, || followers
            .iter()
            .all(|&f| c.node(f).ranges().len() == 3))
        .await,
        "the new leader did not commit the split"
    );
    acked.extend(write_all(&c, 120..140).await);
    c.net.remove_filter(iso);
    let res = split.await.unwrap();
    // The old leader applies the split from the new leader's log: its caller learns it (unless
    // the machine was so slow that the request timed out first).
    let timed_out = proposed.elapsed() >= test_config(1).proposal_timeout;
    assert!(
        res.is_ok() || (timed_out && matches!(res, Err(Error::ProposalDropped))),
        "{res:?}"
    );
    let ranges = converge(&c).await;
    assert_eq!(ranges.len(), 3, "{}", show(&ranges));
    check_acked(&c, &acked).await;
}

// ---------------------------------------------------------------------------------------------
// b. A split racing a snapshot.
// ---------------------------------------------------------------------------------------------

/// A follower misses the parent's writes, the split and the writes to both halves, and the
/// parent's log is compacted before and after the split: it must catch up through a snapshot
/// of the left half and get the right half's group (by snapshot too), with all data, no
/// failed replica and the same descriptors as the others.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn follower_behind_a_split_and_a_compacted_log_catches_up_by_snapshot() {
    init_log();
    let c = Cluster::new(3);
    let d = c.bootstrap(1).remove(0);
    c.wait_leaders(&[d.id()], T).await;
    let mut acked = write_all(&c, 0..20).await;
    let l = c.leader_of(d.id()).unwrap();
    let lagger = (1..=3).find(|&n| n != l).unwrap();
    let others: Vec<u64> = (1..=3).filter(|&n| n != lagger).collect();
    // Count the snapshots sent to the lagger, per range (the spy drops nothing).
    let snapshots: Arc<Mutex<HashMap<u64, u32>>> = Default::default();
    let spy = {
        let snapshots = snapshots.clone();
        PredicateFilter::messages(move |_, to, m| {
            if to == NodeId(lagger) && raft_type(m) == Some(MessageType::MsgSnapshot) {
                *snapshots.lock().unwrap().entry(m.range_id).or_default() += 1;
            }
            false
        })
    };
    c.net.add_filter(Box::new(spy));
    let iso = c
        .net
        .add_filter(Box::new(IsolateFilter::new(NodeId(lagger))));
    acked.extend(write_all(&c, 20..150).await);
    for &n in &others {
        c.node(n).compact_log(d.id()).await.unwrap();
    }
    let l = c.leader_of(d.id()).unwrap();
    // Leadership may move under load meanwhile: the split goes to whoever leads then.
    let deadline = Instant::now() + T;
    let right = loop {
        let leader = c.leader_of(d.id()).unwrap_or(l);
        match c.node(leader).split(d.id(), Some(key(100))).await {
            Ok((_, right)) => break right,
            Err(Error::NotLeader { .. } | Error::ProposalDropped | Error::Busy(_))
                if Instant::now() < deadline =>
            {
                tokio::time::sleep(Duration::from_millis(10)).await
            }
            Err(e) => panic!("split failed: {e}"),
        }
    };
    c.wait_leaders(&[d.id(), right.id()], T).await;
    acked.extend(write_all(&c, (150..200).chain(1000..1030)).await);
    // Overwrite some old keys on both sides, so stale data on the lagger would show.
    for i in [5u32, 60, 110, 140] {
        c.put(&key(i), b"new", T).await.unwrap();
        acked.retain(|(k, _)| k[..] != key(i)[..]);
        acked.push((key(i), b"new".to_vec()));
    }
    // Apply everything on both reachable replicas before compacting, so the whole log goes.
    for &n in &others {
        let target = c.node(c.leader_of(d.id()).unwrap()).status(d.id()).unwrap();
        assert!(
            wait_until(T, || c.node(n).status(d.id()).unwrap().applied
                >= target.commit)
            .await
        );
        c.node(n).compact_log(d.id()).await.unwrap();
    }
    assert!(
        !c.node(lagger).ranges().iter().any(|r| r.id() == right.id()),
        "the lagger got the split while isolated"
    );
    c.net.remove_filter(iso);
    let ranges = converge(&c).await;
    assert_eq!(ranges.len(), 2, "{}", show(&ranges));
    let st = c.node(lagger).status(right.id()).unwrap();
    assert!(
        st.descriptor.is_some(),
        "right replica on the lagger is not initialized"
    );
    check_acked(&c, &acked).await;
    // The lagger's own applied state (not just reads through it) has the data.
    for (k, v) in &acked {
        let got = c.node(lagger).get(k, ReadConsistency::Stale).await.unwrap();
        assert_eq!(
            got.as_deref(),
            Some(&v[..]),
            "{}",
            String::from_utf8_lossy(k)
        );
    }
    let sent = snapshots.lock().unwrap().clone();
    assert!(
        sent.get(&d.range_id).copied().unwrap_or(0) >= 1,
        "the left half did not catch up by snapshot: {sent:?}"
    );
    assert!(
        sent.get(&right.range_id).copied().unwrap_or(0) >= 1,
        "the right half did not reach the lagger by snapshot: {sent:?}"
    );
    for r in [d.id(), right.id()] {
        assert!(!c.node(lagger).is_failed(r));
    }
    // Both halves take writes that the lagger applies.
    c.put(&key(10), b"last", T).await.unwrap();
    c.put(&key(190), b"last", T).await.unwrap();
    for k in [key(10), key(190)] {
        let v = c.get_from(lagger, &k, T).await.unwrap();
        assert_eq!(v.as_deref(), Some(&b"last"[..]));
    }
}

// ---------------------------------------------------------------------------------------------
// c. A node stopped right after a split was proposed.
// ---------------------------------------------------------------------------------------------

/// Stops a node (the proposing leader or a follower) at different moments of a split: before
/// the split left its mailbox, while it replicates, right after it was acknowledged. After the
/// restart all nodes agree on the ranges and every acknowledged write is readable.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn node_stopped_right_after_a_split_was_proposed() {
    init_log();
    let mut c = Cluster::new(3);
    let d = c.bootstrap(1).remove(0);
    c.wait_leaders(&[d.id()], T).await;
    let mut acked = write_all(&c, 0..200).await;
    #[derive(Debug, Clone, Copy)]
    enum Victim {
        Leader,
        Follower,
        /// The leader, with the split only in its own log (its appends are dropped).
        LeaderAlone,
    }
    // (victim, how long the split may run before the stop; None: until it is acknowledged)
    let cases = [
        (Victim::Leader, Some(Duration::ZERO)),
        (Victim::Leader, Some(Duration::from_millis(2))),
        (Victim::Follower, Some(Duration::ZERO)),
        (Victim::Follower, Some(Duration::from_millis(2))),
        (Victim::Leader, None),
        (Victim::LeaderAlone, Some(Duration::ZERO)),
    ];
    for (i, (victim, delay)) in cases.into_iter().enumerate() {
        let split_key = key(20 + 35 * i as u32);
        let range = c.node(1).range_of(&split_key).unwrap().id();
        c.wait_leaders(&[range], T).await;
        let l = c.leader_of(range).unwrap();
        let v = match victim {
            Victim::Leader | Victim::LeaderAlone => l,
            Victim::Follower => (1..=3).find(|&n| n != l).unwrap(),
        };
        let appends = matches!(victim, Victim::LeaderAlone).then(|| {
            c.net
                .add_filter(Box::new(PredicateFilter::messages(move |from, _, m| {
                    from == NodeId(l)
                        && m.range_id == range.0
                        && raft_type(m) == Some(MessageType::MsgAppend)
                })))
        });
        let outcome = {
            let fut = c.node(l).split(range, Some(split_key.clone()));
            // The leader alone: abandoned once the split is in its log (the split first leases
            // its new range id from the system range, which may take a round trip).
            let in_log = || {
                let st = c.node(l).status(range).unwrap();
                st.last_index > st.commit
            };
            let abandon = async {
                match (victim, delay) {
                    (Victim::LeaderAlone, _) => {
                        wait_until(T, in_log).await;
                    }
                    (_, Some(delay)) => tokio::time::sleep(delay).await,
                    (_, None) => std::future::pending().await,
                }
            };
            // Polled once (the request is queued), then abandoned when `abandon` is done.
            tokio::select! {
                biased;
                r = fut => Some(r.map(|_| ())),
                _ = abandon => None,
            }
        };
        if let Some(f) = appends {
            // Stop only once the split is in the leader's log.
            assert!(
                wait_until(T, || {
                    let st = c.node(l).status(range).unwrap();
                    st.last_index > st.commit
                })
                .await
            );
            c.stop(v);
            c.net.remove_filter(f);
        } else {
            c.stop(v);
        }
        // The survivors keep going. Wait for them to elect leaders first: a write forwarded to
        // the stopped leader would only fail after the proposal timeout.
        let survivor = c.running()[0];
        let ids: Vec<RangeId> = c.node(survivor).ranges().iter().map(|d| d.id()).collect();
        let led = wait_until(T, || ids.iter().all(|r| c.leader_of(*r).is_some())).await;
        assert!(
            led,
            "case {i}: the survivors did not elect a leader for every range:\n{}",
            replica_states(&c)
        );
        let base = 1000 + 10 * i as u32;
        acked.extend(write_all(&c, base..base + 4).await);
        c.start(v);
        let ranges = converge(&c).await;
        if matches!(outcome, Some(Ok(()))) {
            assert!(
                ranges.iter().any(|d| d.start_key == split_key),
                "case {i}: acknowledged split lost: {}",
                show(&ranges)
            );
        }
        eprintln!(
            "case {i} ({victim:?}, {delay:?}): split outcome {outcome:?}, split {}",
            if ranges.iter().any(|d| d.start_key == split_key) {
                "applied"
            } else {
                "not applied"
            }
        );
        split_until_done(&c, &split_key).await;
        acked.extend(write_all(&c, base + 4..base + 6).await);
    }
    let ranges = converge(&c).await;
    assert_eq!(ranges.len(), 1 + cases.len(), "{}", show(&ranges));
    check_acked(&c, &acked).await;
}

// ---------------------------------------------------------------------------------------------
// d. Exactly once and no phantom reads across splits.
// ---------------------------------------------------------------------------------------------

fn counter_key(k: u32) -> Vec<u8> {
    format!("c{k:02}").into_bytes()
}

fn cas(key: &[u8], expected: u64, value: u64) -> KvRequest {
    KvRequest {
        op: Some(kv_request::Op::Cas(CompareAndSet {
            key: key.to_vec().into(),
            expected: (expected > 0).then(|| expected.to_string().into_bytes().into()),
            value: value.to_string().into_bytes().into(),
            delete: false,
        })),
    }
}

fn parse(v: Option<&[u8]>) -> u64 {
    v.map(|v| {
        std::str::from_utf8(v)
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| panic!("read a value never written: {v:02x?}"))
    })
    .unwrap_or(0)
}

#[derive(Debug, Default)]
struct ClientTally {
    /// Increments acknowledged (CAS answered `ok`).
    acked: u64,
    /// Increments abandoned with an unknown outcome (may or may not have applied).
    unknown: u64,
    /// Retries of an earlier attempt with the same request id.
    retries: u64,
    /// Values this client observed for its key, in order.
    seen_max: u64,
}

/// CAS-increment counters with request ids, two clients per key, each sending through its own
/// node (forwarding to the leader), while ranges split under them; plus linearizable readers.
/// Final counters must lie in `[acked, acked + unknown]`, and every value read must be a
/// value that was written, never going backwards for one reader.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_id_counters_stay_exact_across_concurrent_splits() {
    const KEYS: u32 = 8;
    const CLIENTS_PER_KEY: u32 = 2;
    let c = Arc::new(Cluster::new(3));
    let d = c.bootstrap(1).remove(0);
    c.wait_leaders(&[d.id()], T).await;
    let stop = Arc::new(AtomicBool::new(false));
    let ops = Arc::new(AtomicU64::new(0));
    let mut clients = Vec::new();
    for k in 0..KEYS {
        for j in 0..CLIENTS_PER_KEY {
            let (c, stop, ops) = (c.clone(), stop.clone(), ops.clone());
            let client_id = 1 + (k * CLIENTS_PER_KEY + j) as u64;
            let via = 1 + (client_id % 3);
            clients.push(tokio::spawn(async move {
                let key = counter_key(k);
                let mut t = ClientTally::default();
                let mut seq = 0u64;
                let mut expected = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    seq += 1;
                    let req = cas(&key, expected, expected + 1);
                    let opts = ProposeOptions {
                        request_id: Some((client_id, seq)),
                        ..Default::default()
                    };
                    let give_up = Instant::now() + Duration::from_secs(8);
                    let mut attempt = 0;
                    loop {
                        attempt += 1;
                        if attempt > 1 {
                            t.retries += 1;
                        }
                        match c.node(via).kv(req.clone(), opts).await {
                            Ok(resp) => {
                                let prev = parse(resp.previous.as_deref());
                                if resp.ok {
                                    assert_eq!(prev, expected, "CAS ok but previous differs");
                                    t.acked += 1;
                                    expected += 1;
                                } else {
                                    // Someone else moved it (or, with a broken de-duplication,
                                    // our own earlier attempt did).
                                    assert!(
                                        prev >= expected,
                                        "client {client_id}: counter went back {expected} -> {prev}"
                                    );
                                    expected = prev;
                                }
                                t.seen_max = t.seen_max.max(expected);
                                ops.fetch_add(1, Ordering::Relaxed);
                                break;
                            }
                            Err(e) => {
                                if Instant::now() >= give_up {
                                    let unknown = !matches!(
                                        e,
                                        Error::NotLeader { .. }
                                            | Error::Busy(_)
                                            | Error::KeyNotInRange { .. }
                                            | Error::RangeNotFound(_)
                                            | Error::EpochNotMatch { .. }
                                    );
                                    // A refusal of this attempt says nothing of earlier ones.
                                    if unknown || attempt > 1 {
                                        t.unknown += 1;
                                    }
                                    break;
                                }
                                tokio::time::sleep(Duration::from_millis(5)).await;
                            }
                        }
                    }
                }
                (k, t)
            }));
        }
    }
    // Linearizable readers through every node: values are counters that were written and,
    // for one reader, never go back.
    let mut readers = Vec::new();
    for r in 0..3u64 {
        let (c, stop) = (c.clone(), stop.clone());
        readers.push(tokio::spawn(async move {
            let mut last: BTreeMap<u32, u64> = BTreeMap::new();
            let mut reads = 0u64;
            let mut i = r;
            while !stop.load(Ordering::Relaxed) {
                i += 1;
                let k = (i % KEYS as u64) as u32;
                let node = 1 + (i / KEYS as u64 + r) % 3;
                if let Ok(v) = c
                    .node(node)
                    .get(&counter_key(k), ReadConsistency::Linearizable)
                    .await
                {
                    let v = parse(v.as_deref());
                    let prev = last.entry(k).or_default();
                    assert!(v >= *prev, "reader {r}: c{k:02} went back {prev} -> {v}");
                    *prev = v;
                    reads += 1;
                } else {
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
            }
            (last, reads)
        }));
    }
    // Split between the counter keys, in an order that keeps several groups splitting.
    let mut splits = 0;
    for k in [4u32, 2, 6, 1, 3, 5, 7] {
        // Let some increments through between splits.
        let before = ops.load(Ordering::Relaxed);
        assert!(wait_until(T, || ops.load(Ordering::Relaxed) >= before + 20).await);
        split_until_done(&c, &counter_key(k)).await;
        splits += 1;
    }
    let before = ops.load(Ordering::Relaxed);
    assert!(wait_until(T, || ops.load(Ordering::Relaxed) >= before + 50).await);
    stop.store(true, Ordering::Relaxed);
    let mut tallies: BTreeMap<u32, Vec<ClientTally>> = BTreeMap::new();
    for h in clients {
        let (k, t) = h.await.unwrap();
        tallies.entry(k).or_default().push(t);
    }
    let mut read_max: BTreeMap<u32, u64> = BTreeMap::new();
    let mut reads = 0;
    for h in readers {
        let (last, n) = h.await.unwrap();
        reads += n;
        for (k, v) in last {
            let m = read_max.entry(k).or_default();
            *m = (*m).max(v);
        }
    }
    let ranges = converge(&c).await;
    assert_eq!(ranges.len(), 1 + splits, "{}", show(&ranges));
    let mut total = 0;
    for (k, ts) in &tallies {
        let acked: u64 = ts.iter().map(|t| t.acked).sum();
        let unknown: u64 = ts.iter().map(|t| t.unknown).sum();
        let mut values = Vec::new();
        for n in 1..=3 {
            let v = c.get_from(n, &counter_key(*k), T).await.unwrap();
            values.push(parse(v.as_deref()));
        }
        assert!(
            values.iter().all(|v| *v == values[0]),
            "c{k:02}: nodes disagree: {values:?}"
        );
        let fin = values[0];
        assert!(
            acked <= fin && fin <= acked + unknown,
            "c{k:02}: final {fin}, acknowledged {acked}, unknown {unknown}: {ts:?}"
        );
        for t in ts {
            assert!(t.seen_max <= fin);
        }
        assert!(read_max.get(k).copied().unwrap_or(0) <= fin);
        total += acked;
    }
    let retries: u64 = tallies.values().flatten().map(|t| t.retries).sum();
    let unknown: u64 = tallies.values().flatten().map(|t| t.unknown).sum();
    eprintln!(
        "request_id_counters: {total} increments acknowledged, {unknown} unknown, {retries} retries, {reads} reads, {} ranges",
        ranges.len()
    );
    assert!(total >= 100, "only {total} increments");
}

/// The de-duplication record of a request must survive the split of its range: a client
/// whose request applied in the parent (but who did not learn it: the proposing node was cut
/// off from the commit and timed out) retries with the same request id after the split, and
/// the retry reaches the new right-hand range. It must get the recorded answer, not a second
/// apply.
///
/// Fails today: client records are keyed by range id and `apply_split` does not copy the
/// parent's records to the new range, so the retry is applied again there (here the CAS
/// answers `ok: false, previous: "1"` to the client whose own first attempt wrote "1").
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retry_after_a_split_is_answered_not_applied_again() {
    fn cfg(n: u64) -> NodeGroupConfig {
        NodeGroupConfig {
            proposal_timeout: Duration::from_millis(600),
            ..test_config(n)
        }
    }
    let c = Cluster::with_config(3, cfg, StoreConfig::default());
    let d = c.bootstrap(1).remove(0);
    c.wait_leaders(&[d.id()], T).await;
    let l = c.leader_of(d.id()).unwrap();
    let f = (1..=3).find(|&n| n != l).unwrap();
    let k = key(150);
    let req = cas(&k, 0, 1);
    let opts = ProposeOptions {
        request_id: Some((77, 1)),
        ..Default::default()
    };
    // The follower forwards the proposal, but hears nothing back from the leader of the range:
    // the entry commits and applies on the other two, the follower's caller times out.
    let range = d.range_id;
    let cut = c.net.add_filter(Box::new(PredicateFilter::new(move |p| {
        p.from == NodeId(l) && p.to == NodeId(f) && p.payload.range_id().0 == range
    })));
    let first = c.node(f).kv(req.clone(), opts).await;
    assert!(matches!(first, Err(Error::ProposalDropped)), "{first:?}");
    let v = c.node(l).get(&k, ReadConsistency::Stale).await.unwrap();
    assert_eq!(
        v.as_deref(),
        Some(&b"1"[..]),
        "the first attempt did not apply"
    );
    // Same retry before the split: answered from the record.
    let again = kv_retry(&c, l, &req, opts).await;
    assert!(again.ok, "retry before the split: {again:?}");
    // Leadership may move under load meanwhile: the split goes to whoever leads then.
    let deadline = Instant::now() + T;
    let right = loop {
        let leader = c.leader_of(d.id()).unwrap_or(l);
        match c.node(leader).split(d.id(), Some(key(100))).await {
            Ok((_, right)) => break right,
            Err(Error::NotLeader { .. } | Error::ProposalDropped | Error::Busy(_))
                if Instant::now() < deadline =>
            {
                tokio::time::sleep(Duration::from_millis(10)).await
            }
            Err(e) => panic!("split failed: {e}"),
        }
    };
    c.net.remove_filter(cut);
    converge(&c).await;
    assert_eq!(c.node(f).range_of(&k).unwrap().range_id, right.range_id);
    let retry = kv_retry(&c, f, &req, opts).await;
    assert!(
        retry.ok,
        "the retry was applied a second time in the new range (answer {retry:?}): the split \
         did not carry the parent's de-duplication records"
    );
}

/// Same contract on the snapshot path (no split involved, but the split-vs-snapshot race of
/// case b takes it): a replica that catches up by snapshot must get the group's
/// de-duplication records with the data, or a retry of a request applied before the snapshot
/// point is applied again on that replica only, and the replicas diverge.
///
/// Fails today: `SnapshotHeader` carries the descriptor and the data chunks only; the
/// installing replica keeps no record of `(77, 1)`, re-applies its retried put over a later
/// write, and serves a different value than the other two replicas.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retry_after_catching_up_by_snapshot_does_not_diverge_replicas() {
    let c = Cluster::new(3);
    let d = c.bootstrap(1).remove(0);
    c.wait_leaders(&[d.id()], T).await;
    let l = c.leader_of(d.id()).unwrap();
    let lagger = (1..=3).find(|&n| n != l).unwrap();
    let k = key(7);
    let put = |v: &[u8]| KvRequest {
        op: Some(kv_request::Op::Put(flotilla::proto::command::Put {
            key: k.clone().into(),
            value: v.to_vec().into(),
        })),
    };
    let opts = ProposeOptions {
        request_id: Some((77, 1)),
        ..Default::default()
    };
    let iso = c
        .net
        .add_filter(Box::new(IsolateFilter::new(NodeId(lagger))));
    kv_retry(&c, l, &put(b"a"), opts).await;
    // Another client overwrites it; then the lagger catches up by snapshot.
    c.put(&k, b"b", T).await.unwrap();
    for n in (1..=3).filter(|&n| n != lagger) {
        c.node(n).compact_log(d.id()).await.unwrap();
    }
    c.net.remove_filter(iso);
    assert!(
        wait_until(T, || {
            let target = c.node(l).status(d.id()).unwrap().commit;
            c.node(lagger).status(d.id()).unwrap().applied >= target
        })
        .await
    );
    // Client 77 retries its first request (it never saw the answer).
    let l = c.leader_of(d.id()).unwrap();
    kv_retry(&c, l, &put(b"a"), opts).await;
    let target = c.node(l).status(d.id()).unwrap().commit;
    for n in 1..=3 {
        assert!(wait_until(T, || c.node(n).status(d.id()).unwrap().applied >= target).await);
    }
    let mut values = Vec::new();
    for n in 1..=3 {
        values.push(c.node(n).get(&k, ReadConsistency::Stale).await.unwrap());
    }
    assert!(
        values.iter().all(|v| v == &values[0]),
        "replicas diverged after a retry (lagger = node {lagger}): {values:?}"
    );
}
