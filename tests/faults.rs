//! Faults from the network and the disk's point of view: forged or stale raft messages, lossy /
//! duplicating / reordering / slow links, and a node restarted while partitioned and left
//! behind a compacted log. Every wait is bounded and polls a condition.

use std::sync::Arc;
use std::time::{Duration, Instant};

use flotilla::layout::range_layout;
use flotilla::proto::meta::{RangeDescriptor, RangeEpoch, ReplicaDescriptor};
use flotilla::proto::transport::{Heartbeat, NodeBatch, RaftMessage};
use flotilla::testing::{key_in_range, node_ids, test_config, wait_until, Cluster};
use flotilla::transport::{
    DelayFilter, DropFilter, DuplicateFilter, Filter, FilterKind, MemTransport, NetStats,
    PartitionFilter, PredicateFilter, ReorderFilter, Transport,
};
use flotilla::{MembershipChange, NodeGroupConfig, NodeId, RangeId, ReplicaId, StoreConfig};
use prost_raft::Message as _;
use raft::prelude::{Entry, Message, MessageType};

const T: Duration = Duration::from_secs(20);

fn ids(layout: &[RangeDescriptor]) -> Vec<RangeId> {
    layout.iter().map(|d| d.id()).collect()
}

// ---------------------------------------------------------------------------------------------
// Forged and stale raft messages.
// ---------------------------------------------------------------------------------------------

/// Elections only after 1-2s without a leader: the test asserts that nothing disturbs the
/// leader, so a loaded machine must not make it flap on its own.
fn calm_config(node: u64) -> NodeGroupConfig {
    NodeGroupConfig {
        election_tick: 100,
        heartbeat_tick: 3,
        ..test_config(node)
    }
}

fn rd(replica: u64, node: u64) -> Option<ReplicaDescriptor> {
    Some(ReplicaDescriptor {
        replica_id: replica,
        node_id: node,
        role: 0,
    })
}

fn raft_msg(ty: MessageType, from: u64, to: u64, term: u64) -> Message {
    let mut m = Message::default();
    m.set_msg_type(ty);
    m.from = from;
    m.to = to;
    m.term = term;
    m
}

/// An envelope as a replica would send it; `conf_ver` is the sender's claimed view of the
/// membership (`None`: no epoch at all).
fn envelope(
    d: &RangeDescriptor,
    from: (u64, u64),
    to: (u64, u64),
    conf_ver: Option<u64>,
    m: &Message,
) -> RaftMessage {
    RaftMessage {
        range_id: d.range_id,
        from: rd(from.0, from.1),
        to: rd(to.0, to.1),
        epoch: conf_ver.map(|conf_ver| RangeEpoch {
            conf_ver,
            version: d.epoch_or_default().version,
        }),
        start_key: d.start_key.clone(),
        end_key: d.end_key.clone(),
        message: m.encode_to_vec().into(),
        snapshot: m.get_msg_type() == MessageType::MsgSnapshot,
        replicas: d.replicas.clone(),
    }
}

/// Sends raw batches from a fake node and waits until the network handed every message and
/// heartbeat to the destination's handler (which queues them in the replicas' mailboxes).
fn inject(c: &Cluster, t: &MemTransport, batches: Vec<(u64, NodeBatch)>) {
    let before = c.net.stats();
    let (mut msgs, mut hbs) = (0, 0);
    for (node, b) in batches {
        msgs += b.messages.len() as u64;
        hbs += b.heartbeats.len() as u64;
        t.send(NodeId(node), b).expect("send from the fake node");
    }
    let delivered = c.net.wait_for_stats(T, |s| {
        s.delivered_messages >= before.delivered_messages + msgs
            && s.delivered_heartbeats >= before.delivered_heartbeats + hbs
    });
    assert!(delivered, "injected messages were not delivered");
}

fn batch(to: u64, messages: Vec<RaftMessage>, heartbeats: Vec<Heartbeat>) -> (u64, NodeBatch) {
    (
        to,
        NodeBatch {
            from_node: 9,
            to_node: to,
            messages,
            heartbeats,
            stats: None,
        },
    )
}

/// Makes sure every replica of `range` on `nodes` has handled what is queued in its mailbox:
/// a request queued after it completes only after the same or a later worker round.
async fn drain_mailboxes(c: &Cluster, range: RangeId, nodes: &[u64], tag: &str) {
    let key = key_in_range(range.0, tag);
    c.put(&key, b"1", T).await.expect("write after injection");
    for &n in nodes {
        let v = c.get_from(n, &key, T).await.expect("read after injection");
        assert_eq!(v.as_deref(), Some(&b"1"[..]), "node {n}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn removed_replica_and_stale_terms_do_not_disturb_the_group() {
    let c = Cluster::with_config(4, calm_config, StoreConfig::default());
    let d = range_layout(1, &node_ids(4)).remove(0);
    for n in 1..=4 {
        c.node(n).bootstrap_range(d.clone()).unwrap();
    }
    c.node(1).campaign(d.id()).unwrap();
    c.wait_leaders(&[d.id()], T).await;
    let range = d.id();
    c.put(&key_in_range(1, "before"), b"1", T).await.unwrap();

    // Remove a follower's replica; its node keeps running.
    let leader = c.leader_of(range).unwrap();
    let gone = (1..=4).rev().find(|&n| n != leader).unwrap();
    let old_conf_ver = c
        .node(leader)
        .status(range)
        .unwrap()
        .descriptor
        .unwrap()
        .epoch_or_default()
        .conf_ver;
    let deadline = Instant::now() + T;
    let desc = loop {
        let l = c.leader_of(range).expect("a leader");
        if l == gone {
            // Leadership moved to the replica we remove: hand it back first.
            let _ = c.node(l).transfer_leader(range, ReplicaId(leader)).await;
            wait_until(Duration::from_secs(3), || c.leader_of(range) != Some(gone)).await;
            continue;
        }
        match c
            .node(l)
            .change_membership(range, vec![MembershipChange::Remove(ReplicaId(gone))])
            .await
        {
            Ok(desc) => break desc,
            Err(e) => {
                let st = c.node(l).status(range).unwrap();
                if st
                    .descriptor
                    .is_some_and(|d| d.replica(ReplicaId(gone)).is_none())
                {
                    break c.node(l).status(range).unwrap().descriptor.unwrap();
                }
                assert!(Instant::now() < deadline, "removal never succeeded: {e}");
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    };
    let conf_ver = desc.epoch_or_default().conf_ver;
    assert!(conf_ver > old_conf_ver);
    let members: Vec<u64> = desc.replicas.iter().map(|r| r.node_id).collect();
    assert_eq!(members.len(), 3, "{members:?}");
    assert!(
        wait_until(T, || c.node(gone).status(range).is_err()).await,
        "the removed replica on node {gone} was not destroyed"
    );
    // Every member applied the removal.
    assert!(
        wait_until(T, || members.iter().all(|&n| {
            c.node(n).status(range).is_ok_and(|s| {
                s.descriptor
                    .is_some_and(|d| d.epoch_or_default().conf_ver >= conf_ver)
            })
        }))
        .await
    );

    // A fake node 9 on the same network sends whatever we craft.
    let t = c.net.register(NodeId(9), Arc::new(|_b: NodeBatch| {}));

    // Control: a well-formed message from a current member gets through. MsgTransferLeader
    // from a follower makes the leader hand leadership to that follower.
    let leader = c.leader_of(range).unwrap();
    let target = *members.iter().find(|&&n| n != leader).unwrap();
    let term = c.node(leader).status(range).unwrap().term;
    let m = raft_msg(MessageType::MsgTransferLeader, target, leader, term);
    inject(
        &c,
        &t,
        vec![batch(
            leader,
            vec![envelope(
                &d,
                (target, target),
                (leader, leader),
                Some(conf_ver),
                &m,
            )],
            vec![],
        )],
    );
    assert!(
        wait_until(T, || c.leader_of(range) == Some(target)).await,
        "the crafted MsgTransferLeader from a member had no effect: the envelopes are wrong"
    );
    assert!(
        wait_until(T, || members.iter().all(|&n| {
            c.node(n).status(range).unwrap().leader_node == Some(NodeId(target))
        }))
        .await
    );
    drain_mailboxes(&c, range, &members, "control").await;

    let leader = c.leader_of(range).unwrap();
    let term = c.node(leader).status(range).unwrap().term;
    let last = c.node(leader).status(range).unwrap().last_index;
    assert!(term >= 2, "term {term}: no room for a stale term");
    const HUGE: u64 = 1_000_000;

    // From the removed replica, with the membership view it had (or the current one, or none):
    // votes that would force an election (CampaignTransfer ignores leases), pre-votes, appends
    // and heartbeats with a huge term, a TimeoutNow, and a term-0 append of forged entries.
    let mut from_removed = Vec::new();
    for &to in &members {
        for cv in [Some(old_conf_ver), Some(conf_ver), None] {
            let mut vote = raft_msg(MessageType::MsgRequestVote, gone, to, term + HUGE);
            vote.log_term = term + HUGE;
            vote.index = last + HUGE;
            vote.context = raft::CAMPAIGN_TRANSFER.to_vec();
            let mut pre = vote.clone();
            pre.set_msg_type(MessageType::MsgRequestPreVote);
            let mut app = raft_msg(MessageType::MsgAppend, gone, to, term + HUGE);
            app.index = last;
            app.log_term = term;
            app.commit = last;
            let hb = raft_msg(MessageType::MsgHeartbeat, gone, to, term + HUGE);
            let timeout_now = raft_msg(MessageType::MsgTimeoutNow, gone, to, term);
            // Term 0 skips raft's term checks: raft would take `gone` as its leader and
            // append and commit these forged entries.
            let mut forged = raft_msg(MessageType::MsgAppend, gone, to, 0);
            forged.index = last;
            forged.log_term = term;
            forged.commit = last + 5;
            forged.entries = (last + 1..=last + 5)
                .map(|i| Entry {
                    index: i,
                    term,
                    data: b"forged".to_vec(),
                    ..Default::default()
                })
                .collect();
            for m in [&vote, &pre, &app, &hb, &timeout_now, &forged] {
                from_removed.push((to, envelope(&d, (gone, gone), (to, to), cv, m)));
            }
        }
    }
    let mut batches: Vec<(u64, NodeBatch)> = members
        .iter()
        .map(|&to| {
            let msgs = from_removed
                .iter()
                .filter(|(n, _)| *n == to)
                .map(|(_, e)| e.clone())
                .collect();
            // Coalesced heartbeats from the removed replica with a huge term.
            let hbs = vec![Heartbeat {
                range_id: range.0,
                from_replica: gone,
                to_replica: to,
                term: term + HUGE,
                commit: last + HUGE,
                response: false,
                context: Default::default(),
                hibernate: false,
            }];
            batch(to, msgs, hbs)
        })
        .collect();

    // From current members, with stale terms: heartbeats (as messages and coalesced), appends,
    // votes and a TimeoutNow of an older term are ignored (or answered) by raft.
    for &to in &members {
        let mut msgs = Vec::new();
        let mut hbs = Vec::new();
        for &from in members.iter().filter(|&&n| n != to) {
            let mut hb = raft_msg(MessageType::MsgHeartbeat, from, to, term - 1);
            hb.commit = 1;
            let mut app = raft_msg(MessageType::MsgAppend, from, to, term - 1);
            app.index = 1;
            app.log_term = 1;
            app.entries = vec![Entry {
                index: 2,
                term: term - 1,
                data: b"stale".to_vec(),
                ..Default::default()
            }];
            let mut vote = raft_msg(MessageType::MsgRequestVote, from, to, term - 1);
            vote.log_term = term - 1;
            vote.index = last + HUGE;
            let timeout_now = raft_msg(MessageType::MsgTimeoutNow, from, to, term - 1);
            for m in [&hb, &app, &vote, &timeout_now] {
                msgs.push(envelope(&d, (from, from), (to, to), Some(conf_ver), m));
            }
            hbs.push(Heartbeat {
                range_id: range.0,
                from_replica: from,
                to_replica: to,
                term: term - 1,
                commit: 1,
                response: false,
                context: Default::default(),
                hibernate: false,
            });
        }
        batches.push(batch(to, msgs, hbs));
    }
    // To the removed replica's node, as the group would have sent before the removal: must not
    // recreate the destroyed replica.
    let mut app = raft_msg(MessageType::MsgAppend, leader, gone, term);
    app.index = last;
    app.log_term = term;
    let hb = raft_msg(MessageType::MsgHeartbeat, leader, gone, term);
    batches.push(batch(
        gone,
        vec![
            envelope(&d, (leader, leader), (gone, gone), Some(old_conf_ver), &app),
            envelope(&d, (leader, leader), (gone, gone), Some(conf_ver), &hb),
        ],
        vec![Heartbeat {
            range_id: range.0,
            from_replica: leader,
            to_replica: gone,
            term,
            commit: last,
            response: false,
            context: Default::default(),
            hibernate: false,
        }],
    ));
    inject(&c, &t, batches);
    drain_mailboxes(&c, range, &members, "after").await;

    // No disruption: same leader, same term everywhere; nobody adopted the forged term;
    // nothing panicked; the removed replica stayed removed.
    for &n in &members {
        let st = c.node(n).status(range).unwrap();
        assert!(st.term < HUGE, "node {n} adopted a forged term: {st:?}");
        assert_eq!(st.term, term, "node {n}: term changed: {st:?}");
        assert_eq!(
            st.leader_node,
            Some(NodeId(leader)),
            "node {n}: leader changed: {st:?}"
        );
        assert!(!c.node(n).is_failed(range), "node {n} isolated its replica");
        let desc = st.descriptor.unwrap();
        assert!(desc.replica(ReplicaId(gone)).is_none());
        assert_eq!(desc.epoch_or_default().conf_ver, conf_ver);
    }
    assert_eq!(c.leader_of(range), Some(leader));
    assert!(
        c.node(gone).status(range).is_err(),
        "the removed replica was recreated"
    );
    assert!(c
        .node(gone)
        .engine()
        .get(&key_in_range(1, "after"))
        .unwrap()
        .is_none());
    // Writes keep working and reach every member.
    for i in 0..5 {
        let key = key_in_range(1, &format!("still/{i}"));
        c.put(&key, b"ok", T).await.unwrap();
    }
    for &n in &members {
        let v = c.get_from(n, &key_in_range(1, "still/4"), T).await.unwrap();
        assert_eq!(v.as_deref(), Some(&b"ok"[..]));
        let v = c.get_from(n, &key_in_range(1, "before"), T).await.unwrap();
        assert_eq!(v.as_deref(), Some(&b"1"[..]));
    }
    drop(t);
    c.net.unregister(NodeId(9));
}

// ---------------------------------------------------------------------------------------------
// Lossy, duplicating, reordering and slow links.
// ---------------------------------------------------------------------------------------------

/// Writes to a few groups with `filter` installed from the start (elections included), then
/// checks that every acknowledged write is on every replica and that the filter acted.
async fn writes_converge_despite(
    filter: Box<dyn Filter>,
    acted: impl Fn(&NetStats) -> bool,
    reads_under_filter: bool,
) {
    let c = Arc::new(Cluster::new(3));
    let fid = c.net.add_filter(filter);
    let layout = c.bootstrap(4);
    c.wait_leaders(&ids(&layout), T).await;

    // One task per group: fresh keys, plus one key overwritten in sequence.
    let mut tasks = Vec::new();
    for d in &layout {
        let (c, r) = (c.clone(), d.range_id);
        tasks.push(tokio::spawn(async move {
            let mut expect = Vec::new();
            for i in 0..6 {
                let key = key_in_range(r, &format!("k{i}"));
                let value = format!("r{r}-{i}").into_bytes();
                c.put(&key, &value, T).await.expect("write under faults");
                expect.push((key, value));
                let last = key_in_range(r, "last");
                c.put(&last, &i.to_string().into_bytes(), T)
                    .await
                    .expect("overwrite under faults");
            }
            expect.push((key_in_range(r, "last"), b"5".to_vec()));
            expect
        }));
    }
    let mut expect = Vec::new();
    for t in tasks {
        expect.extend(t.await.expect("writer task"));
    }
    // Every replica converges to the same values, with the faults still on.
    for n in c.running() {
        let ok = wait_until(T, || {
            expect
                .iter()
                .all(|(k, v)| c.node(n).engine().get(k).unwrap().as_deref() == Some(&v[..]))
        })
        .await;
        assert!(ok, "node {n} did not converge");
    }
    let stats = c.net.stats();
    assert!(acted(&stats), "the filter never acted: {stats:?}");
    if !reads_under_filter {
        // A lost MsgReadIndex (or its response) is never retried by the runtime: the read
        // waits for proposal_timeout (see `lost_read_index_is_retried`). Read without losses.
        c.net.remove_filter(fid);
    }
    // Linearizable reads through every node, followers included.
    for d in &layout {
        let key = key_in_range(d.range_id, "last");
        for n in c.running() {
            let v = c.get_from(n, &key, T).await.unwrap();
            assert_eq!(v.as_deref(), Some(&b"5"[..]), "node {n}, {}", d.id());
            assert!(!c.node(n).is_failed(d.id()));
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_converge_despite_dropped_messages() {
    writes_converge_despite(
        Box::new(DropFilter::new(0.2, 7)),
        |s| s.dropped_by(FilterKind::Drop) > 0,
        false,
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_converge_despite_duplicated_messages() {
    writes_converge_despite(
        Box::new(DuplicateFilter::new(0.3, 11)),
        |s| s.duplicated > 0,
        true,
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_converge_despite_reordered_messages() {
    writes_converge_despite(
        Box::new(ReorderFilter::new(Duration::from_millis(15), 13)),
        |s| s.reordered > 0,
        true,
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_converge_despite_delayed_messages() {
    writes_converge_despite(
        Box::new(DelayFilter::new(Duration::from_millis(20))),
        |s| s.delayed > 0,
        true,
    )
    .await;
}

/// A follower's linearizable read sends MsgReadIndex to the leader; if that message (or the
/// answer) is lost, raft-rs never re-sends it, and neither does the runtime today: the read
/// waits for `proposal_timeout` (10s by default) even though the group is healthy again
/// milliseconds later. The same happens when the leader has not committed an entry in its term
/// yet (raft-rs drops the request silently). Ignored until the runtime re-issues pending reads.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lost_read_index_is_retried() {
    let c = Arc::new(Cluster::new(3));
    let d = c.bootstrap(1).remove(0);
    c.wait_leaders(&[d.id()], T).await;
    c.put(b"r", b"1", T).await.unwrap();
    let leader = c.leader_of(d.id()).unwrap();
    let f = (1..=3).find(|&n| n != leader).unwrap();
    assert!(
        wait_until(T, || c.node(f).status(d.id()).unwrap().leader_node
            == Some(NodeId(leader)))
        .await
    );
    let fid = c
        .net
        .add_filter(Box::new(PredicateFilter::messages(|_, _, m| {
            Message::decode(&m.message[..])
                .is_ok_and(|m| m.get_msg_type() == MessageType::MsgReadIndex)
        })));
    let before = c.net.stats().dropped_by(FilterKind::Predicate);
    let started = Instant::now();
    let c2 = c.clone();
    let read = tokio::spawn(async move {
        c2.node(f)
            .get(b"r", flotilla::ReadConsistency::Linearizable)
            .await
    });
    assert!(
        wait_until(T, || c.net.stats().dropped_by(FilterKind::Predicate)
            > before)
        .await,
        "the follower never asked the leader"
    );
    c.net.remove_filter(fid);
    // proposal_timeout is 5s in the test config; a retry on any tick-based schedule answers
    // well before that.
    let res = tokio::time::timeout(Duration::from_millis(2500), read).await;
    assert!(
        matches!(&res, Ok(Ok(Ok(Some(v)))) if v == b"1"),
        "read not retried after its MsgReadIndex was lost: {res:?} after {:?}",
        started.elapsed()
    );
}

// ---------------------------------------------------------------------------------------------
// Restart behind a compacted log.
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn node_restarted_while_partitioned_catches_up_by_snapshot_after_compaction() {
    let mut c = Cluster::new(3);
    let d = c.bootstrap(1).remove(0);
    let range = d.id();
    c.wait_leaders(&[range], T).await;
    let mut acked = Vec::new();
    for i in 0..20 {
        let k = format!("a{i:03}").into_bytes();
        c.put(&k, b"a", T).await.unwrap();
        acked.push((k, b"a".to_vec()));
    }
    let leader = c.leader_of(range).unwrap();
    let lagger = (1..=3).find(|&n| n != leader).unwrap();
    let others: Vec<u64> = (1..=3).filter(|&n| n != lagger).collect();
    // The lagger has everything so far (it is needed for the check below).
    let lk = acked.last().unwrap().0.clone();
    assert!(wait_until(T, || c.node(lagger).engine().get(&lk).unwrap().is_some()).await);

    let cut = c.net.add_filter(Box::new(PartitionFilter::new(
        [NodeId(lagger)],
        others.iter().map(|&n| NodeId(n)),
    )));
    for i in 0..50 {
        let k = format!("b{i:03}").into_bytes();
        c.put(&k, b"b", T).await.unwrap();
        acked.push((k, b"b".to_vec()));
    }
    let lag_last = c.node(lagger).status(range).unwrap().last_index;
    // Stopped while partitioned.
    c.stop(lagger);
    for i in 0..50 {
        let k = format!("c{i:03}").into_bytes();
        c.put(&k, b"c", T).await.unwrap();
        acked.push((k, b"c".to_vec()));
    }
    // Both remaining replicas compact their whole applied log: whoever leads next cannot
    // send the lagger entries it misses.
    for &n in &others {
        c.node(n).compact_log(range).await.unwrap();
    }
    let compacted_to = others
        .iter()
        .map(|&n| c.node(n).status(range).unwrap().applied)
        .min()
        .unwrap();
    assert!(
        compacted_to > lag_last + 1,
        "compaction did not pass the lagger's log"
    );

    // Restarted while still partitioned: it recovers what it had, and nothing more.
    c.start(lagger);
    let st = c.node(lagger).status(range).expect("replica recovered");
    assert_eq!(st.last_index, lag_last, "{st:?}");
    assert!(c.node(lagger).engine().get(b"a019").unwrap().is_some());
    assert!(c.node(lagger).engine().get(b"c000").unwrap().is_none());
    assert!(!c.node(lagger).is_failed(range));

    c.net.remove_filter(cut);
    // Only a snapshot can bring it past the compacted entries.
    assert!(
        wait_until(T, || c
            .node(lagger)
            .status(range)
            .is_ok_and(|s| s.applied >= compacted_to))
        .await,
        "the lagger never caught up: {:?}",
        c.node(lagger).status(range)
    );
    for (k, v) in &acked {
        let got = c.get_from(lagger, k, T).await.unwrap();
        assert_eq!(
            got.as_deref(),
            Some(&v[..]),
            "lagger lost {}",
            String::from_utf8_lossy(k)
        );
    }

    // Restart it again: it must recover from the installed snapshot (data, applied index,
    // truncated log), then keep following.
    c.stop(lagger);
    for i in 0..10 {
        let k = format!("d{i:03}").into_bytes();
        c.put(&k, b"d", T).await.unwrap();
        acked.push((k, b"d".to_vec()));
    }
    c.start(lagger);
    let st = c
        .node(lagger)
        .status(range)
        .expect("replica recovered after the snapshot");
    assert!(st.applied >= compacted_to, "{st:?}");
    for (k, v) in &acked {
        let got = c.get_from(lagger, k, T).await.unwrap();
        assert_eq!(
            got.as_deref(),
            Some(&v[..]),
            "lagger lost {}",
            String::from_utf8_lossy(k)
        );
    }

    // And the node whose log was compacted (the leader, if it still leads) restarts fine too.
    let l = c.leader_of(range).unwrap();
    c.stop(l);
    c.wait_leaders(&[range], T).await;
    c.put(b"e000", b"e", T).await.unwrap();
    acked.push((b"e000".to_vec(), b"e".to_vec()));
    c.start(l);
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
        assert!(!c.node(n).is_failed(range));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_a_member_sender_creates_a_replica() {
    let c = Cluster::new(3);
    let t = c.net.register(NodeId(9), Arc::new(|_b: NodeBatch| {}));
    let d = RangeDescriptor {
        range_id: 777,
        epoch: Some(RangeEpoch {
            conf_ver: 1,
            version: 1,
        }),
        ..Default::default()
    };
    let vote = |from: u64| {
        let mut m = raft_msg(MessageType::MsgRequestVote, from, 2, 5);
        m.log_term = 5;
        m.index = 5;
        m
    };
    let with_members = |from: (u64, u64), members: Vec<(u64, u64)>| {
        let mut env = envelope(&d, from, (2, 2), Some(1), &vote(from.0));
        env.replicas = members
            .into_iter()
            .map(|(r, n)| rd(r, n).unwrap())
            .collect();
        env
    };
    // No membership claim; a sender that claims to live on another node than the one the
    // batch came from; a claim that does not list the addressee.
    inject(
        &c,
        &t,
        vec![batch(
            2,
            vec![
                with_members((9, 9), vec![]),
                with_members((1, 1), vec![(1, 1), (2, 2)]),
                with_members((9, 9), vec![(9, 9), (3, 3)]),
            ],
            vec![],
        )],
    );
    c.node(2).node_status(); // the handler ran synchronously: nothing was created
    assert!(
        c.node(2).status(RangeId(777)).is_err(),
        "created by a non-member"
    );
    // A member on the sending node, addressed to a member here: the replica is created
    // (uninitialized, waiting for its leader's snapshot).
    inject(
        &c,
        &t,
        vec![batch(
            2,
            vec![with_members((9, 9), vec![(9, 9), (2, 2)])],
            vec![],
        )],
    );
    assert!(wait_until(T, || c.node(2).status(RangeId(777)).is_ok()).await);
    assert!(
        c.node(2).ranges().is_empty(),
        "an uninitialized replica has no keys"
    );
    c.net.unregister(NodeId(9));
}
