//! NodeGroups on the in-memory network: many groups per node, failures, membership, snapshots,
//! restarts. Every wait is bounded and polls a condition; nothing sleeps and hopes.

use std::time::Duration;

use flotilla::layout::range_layout;
use flotilla::proto::meta::RangeDescriptor;
use flotilla::testing::{
    key_in_range, node_ids, test_config, wait_until, wait_until_async, Cluster,
};
use flotilla::transport::{IsolateFilter, PartitionFilter};
use flotilla::{
    Error, MembershipChange, NodeGroupConfig, NodeId, RangeId, ReadConsistency, ReplicaId,
    StateRole, StoreConfig,
};

const T: Duration = Duration::from_secs(30);

/// Ticks of 50ms keep a thousand groups per node affordable on a 2-core machine.
fn dense_config(node: u64) -> NodeGroupConfig {
    NodeGroupConfig {
        tick_interval: Duration::from_millis(50),
        ..test_config(node)
    }
}

fn init_tracing() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(std::env::var("RUST_LOG").unwrap_or_else(|_| "warn".into()))
        .with_test_writer()
        .try_init();
}

fn ids(layout: &[RangeDescriptor]) -> Vec<RangeId> {
    layout.iter().map(|d| d.id()).collect()
}

async fn write_all_and_read_back(c: &Cluster, layout: &[RangeDescriptor], tag: &str) {
    // One write per group, all in flight at once.
    let writes = layout.iter().map(|d| {
        let key = key_in_range(d.range_id, tag);
        async move { c.put(&key, tag.as_bytes(), T).await }
    });
    for r in futures_join_all(writes).await {
        r.expect("write");
    }
    // Every replica applies every write.
    for d in layout {
        let key = key_in_range(d.range_id, tag);
        for node in c.running() {
            let ok = wait_until(T, || {
                c.node(node).engine().get(&key).unwrap().as_deref() == Some(tag.as_bytes())
            })
            .await;
            assert!(ok, "{} never applied {tag} on node {node}", d.id());
        }
    }
}

/// A minimal join_all, to avoid a dependency for it.
async fn futures_join_all<F: std::future::Future>(
    futs: impl IntoIterator<Item = F>,
) -> Vec<F::Output> {
    let handles: Vec<_> = futs.into_iter().collect();
    let mut out = Vec::with_capacity(handles.len());
    // Drive them concurrently with tokio's JoinSet-free approach: pin and poll via join!.
    let mut pinned: Vec<std::pin::Pin<Box<F>>> = handles.into_iter().map(Box::pin).collect();
    let mut results: Vec<Option<F::Output>> = (0..pinned.len()).map(|_| None).collect();
    std::future::poll_fn(|cx| {
        let mut pending = false;
        for (i, f) in pinned.iter_mut().enumerate() {
            if results[i].is_none() {
                match f.as_mut().poll(cx) {
                    std::task::Poll::Ready(v) => results[i] = Some(v),
                    std::task::Poll::Pending => pending = true,
                }
            }
        }
        if pending {
            std::task::Poll::Pending
        } else {
            std::task::Poll::Ready(())
        }
    })
    .await;
    for r in results {
        out.push(r.expect("completed"));
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_nodes_host_a_thousand_groups() {
    let c = Cluster::with_config(3, dense_config, StoreConfig::default());
    let layout = c.bootstrap(1000);
    c.wait_leaders(&ids(&layout), Duration::from_secs(60)).await;
    write_all_and_read_back(&c, &layout, "v1").await;
    // Linearizable reads through every node (followers use ReadIndex via the leader).
    for d in layout.iter().step_by(50) {
        let key = key_in_range(d.range_id, "v1");
        for node in c.running() {
            let v = c.get_from(node, &key, T).await.expect("read");
            assert_eq!(v.as_deref(), Some(&b"v1"[..]));
        }
    }
    let st = c.node(1).node_status();
    assert_eq!(st.replicas, 1000);
    assert_eq!(st.ranges, 1000);
    // Leaders' heartbeats travel coalesced, many groups per node-pair batch.
    let ok = c.net.wait_for_stats(T, |s| {
        s.delivered_heartbeats > 1000 && s.delivered_batches < s.delivered_heartbeats
    });
    assert!(ok, "{:?}", c.net.stats());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn five_nodes_host_a_thousand_groups_on_three_replicas_each() {
    let c = Cluster::with_config(5, dense_config, StoreConfig::default());
    // Range i lives on 3 of the 5 nodes, rotating.
    let mut layout = Vec::new();
    for i in 1..=1000u64 {
        let nodes: Vec<NodeId> = (0..3).map(|k| NodeId((i + k) % 5 + 1)).collect();
        let mut d = range_layout(1000, &nodes)[i as usize - 1].clone();
        d.range_id = i;
        layout.push(d);
    }
    for d in &layout {
        for r in &d.replicas {
            c.node(r.node_id).bootstrap_range(d.clone()).unwrap();
        }
        c.node(d.replicas[0].node_id).campaign(d.id()).unwrap();
    }
    c.wait_leaders(&ids(&layout), Duration::from_secs(60)).await;
    let cr = &c;
    let writes = layout.iter().map(|d| {
        let key = key_in_range(d.range_id, "x");
        async move { cr.put(&key, b"x", T).await }
    });
    for r in futures_join_all(writes).await {
        r.expect("write");
    }
    for d in layout.iter().step_by(37) {
        let key = key_in_range(d.range_id, "x");
        for r in &d.replicas {
            let v = c.get_from(r.node_id, &key, T).await.expect("read");
            assert_eq!(v.as_deref(), Some(&b"x"[..]));
        }
        // A node without a replica of the range refuses with a typed error.
        let outsider = (1..=5)
            .find(|n| !d.replicas.iter().any(|r| r.node_id == *n))
            .unwrap();
        match c
            .node(outsider)
            .get(&key, ReadConsistency::Linearizable)
            .await
        {
            Err(Error::KeyNotInRange { .. }) => {}
            other => panic!("expected KeyNotInRange, got {other:?}"),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn isolated_leader_node_loses_its_groups_and_the_majority_continues() {
    let c = Cluster::new(3);
    let layout = c.bootstrap(20);
    c.wait_leaders(&ids(&layout), T).await;
    // Make node 1 lead every group, then cut it off.
    for d in &layout {
        let leader = c.leader_of(d.id()).unwrap();
        if leader != 1 {
            c.node(leader)
                .transfer_leader(d.id(), ReplicaId(1))
                .await
                .unwrap();
        }
    }
    assert!(wait_until(T, || layout.iter().all(|d| c.leader_of(d.id()) == Some(1))).await);
    let filter = c.net.add_filter(Box::new(IsolateFilter::new(NodeId(1))));

    // The majority elects new leaders and keeps accepting writes.
    let ok = wait_until(T, || {
        layout.iter().all(|d| {
            [2, 3]
                .iter()
                .any(|&n| c.node(n).status(d.id()).unwrap().role == StateRole::Leader)
        })
    })
    .await;
    assert!(ok, "majority did not elect new leaders");
    for d in &layout {
        let key = key_in_range(d.range_id, "after");
        let leader = [2u64, 3]
            .into_iter()
            .find(|&n| c.node(n).status(d.id()).unwrap().role == StateRole::Leader)
            .unwrap();
        c.node(leader).put(&key, b"majority").await.unwrap();
    }
    // The isolated node neither commits nor serves linearizable reads.
    let d = &layout[0];
    let key = key_in_range(d.range_id, "minority");
    match c.node(1).put(&key, b"lost").await {
        Err(Error::NotLeader { .. } | Error::ProposalDropped) => {}
        other => panic!("isolated node accepted a write: {other:?}"),
    }
    match c
        .node(1)
        .get(
            &key_in_range(d.range_id, "after"),
            ReadConsistency::Linearizable,
        )
        .await
    {
        Err(Error::NotLeader { .. } | Error::ProposalDropped) => {}
        other => panic!("isolated node served a linearizable read: {other:?}"),
    }
    // Heal: node 1 catches up and has the majority's writes.
    c.net.remove_filter(filter);
    for d in &layout {
        let key = key_in_range(d.range_id, "after");
        assert!(wait_until(T, || c.node(1).engine().get(&key).unwrap().is_some()).await);
    }
    assert_eq!(
        c.node(1).engine().get(&key).unwrap(),
        None,
        "minority write must not exist"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replace_a_replica_under_writes() {
    init_tracing();
    let mut c = Cluster::new(4);
    // Range 1 on nodes 1-3; node 4 starts empty.
    let d = range_layout(1, &node_ids(3)).remove(0);
    for n in 1..=3 {
        c.node(n).bootstrap_range(d.clone()).unwrap();
    }
    c.node(1).campaign(d.id()).unwrap();
    c.wait_leaders(&[d.id()], T).await;

    let mut acked = Vec::new();
    let mut i = 0u64;
    let mut step = 0;
    let leader_node = |c: &Cluster| c.leader_of(d.id()).unwrap();
    loop {
        let key = format!("w{i:05}").into_bytes();
        if c.put(&key, &i.to_be_bytes(), T).await.is_ok() {
            acked.push((key, i));
        }
        i += 1;
        if !i.is_multiple_of(10) {
            continue;
        }
        let l = leader_node(&c);
        let res = match step {
            0 => {
                c.node(l)
                    .change_membership(d.id(), vec![MembershipChange::AddLearner(NodeId(4))])
                    .await
            }
            1 => {
                let desc = c.node(l).status(d.id()).unwrap().descriptor.unwrap();
                let learner = desc.replica_on(NodeId(4)).unwrap().replica_id;
                // Wait for the learner to catch up before promoting it.
                let caught_up = wait_until(T, || {
                    c.node(4)
                        .status(d.id())
                        .map(|s| s.applied + 2 >= c.node(l).status(d.id()).unwrap().commit)
                        .unwrap_or(false)
                })
                .await;
                assert!(caught_up);
                c.node(l)
                    .change_membership(d.id(), vec![MembershipChange::Promote(ReplicaId(learner))])
                    .await
            }
            2 => {
                // Remove the replica on node 3 (if it leads, hand leadership away first).
                if l == 3 {
                    c.node(3)
                        .transfer_leader(d.id(), ReplicaId(1))
                        .await
                        .unwrap();
                    assert!(wait_until(T, || c.leader_of(d.id()).is_some_and(|n| n != 3)).await);
                }
                let l = leader_node(&c);
                c.node(l)
                    .change_membership(d.id(), vec![MembershipChange::Remove(ReplicaId(3))])
                    .await
            }
            _ => break,
        };
        match res {
            Ok(desc) => {
                step += 1;
                tracing::info!("membership now {:?}", desc.replicas);
            }
            Err(
                e @ (Error::AdminRefused(_) | Error::NotLeader { .. } | Error::ProposalDropped),
            ) => {
                eprintln!("step {step} at write {i}: {e}");
                assert!(i < 5000, "membership change never succeeded");
            }
            Err(e) => panic!("membership change failed: {e}"),
        }
    }
    // Node 3's replica is destroyed; node 4 serves.
    assert!(
        wait_until(T, || c.node(3).status(d.id()).is_err()).await,
        "removed replica not destroyed"
    );
    let final_desc = c
        .node(c.leader_of(d.id()).unwrap())
        .status(d.id())
        .unwrap()
        .descriptor
        .unwrap();
    let members: Vec<u64> = final_desc.replicas.iter().map(|r| r.node_id).collect();
    assert!(members.contains(&4) && !members.contains(&3), "{members:?}");
    // Every acknowledged write is readable on every remaining member.
    for n in [1u64, 2, 4] {
        for (key, v) in &acked {
            let got = c.get_from(n, key, T).await.unwrap();
            assert_eq!(
                got.as_deref(),
                Some(&v.to_be_bytes()[..]),
                "node {n} lost {key:?}"
            );
        }
    }
    // Messages to the removed replica's range on node 3 do not recreate it.
    c.stop(3);
    c.start(3);
    assert!(c.node(3).status(d.id()).is_err());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn partitioned_follower_catches_up_through_a_snapshot() {
    let c = Cluster::new(3);
    let d = c.bootstrap(1).remove(0);
    c.wait_leaders(&[d.id()], T).await;
    let leader = c.leader_of(d.id()).unwrap();
    let lagger = [1u64, 2, 3].into_iter().find(|&n| n != leader).unwrap();
    let others: Vec<NodeId> = [1u64, 2, 3]
        .into_iter()
        .filter(|&n| n != lagger)
        .map(NodeId)
        .collect();
    let f = c
        .net
        .add_filter(Box::new(PartitionFilter::new([NodeId(lagger)], others)));
    for i in 0..200u64 {
        c.put(format!("s{i:04}").as_bytes(), b"v", T).await.unwrap();
    }
    let leader = c.leader_of(d.id()).unwrap();
    c.node(leader).compact_log(d.id()).await.unwrap();
    for n in c.running() {
        if n != lagger {
            let _ = c.node(n).compact_log(d.id()).await;
        }
    }
    c.net.remove_filter(f);
    // The lagger cannot get the entries any more: only a snapshot brings it up to date.
    let key = b"s0199".to_vec();
    assert!(wait_until(T, || c.node(lagger).engine().get(&key).unwrap().is_some()).await);
    let v = c.get_from(lagger, b"s0000", T).await.unwrap();
    assert_eq!(v.as_deref(), Some(&b"v"[..]));
    let st = c.node(lagger).status(d.id()).unwrap();
    assert!(st.applied >= 200, "{st:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stopped_node_recovers_from_its_store_and_catches_up() {
    let mut c = Cluster::new(3);
    let layout = c.bootstrap(50);
    c.wait_leaders(&ids(&layout), T).await;
    let mut acked = Vec::new();
    for d in &layout {
        let k = key_in_range(d.range_id, "before");
        c.put(&k, b"1", T).await.unwrap();
        acked.push(k);
    }
    c.stop(2);
    for d in &layout {
        let k = key_in_range(d.range_id, "during");
        c.put(&k, b"2", T).await.unwrap();
        acked.push(k);
    }
    c.start(2);
    assert_eq!(c.node(2).node_status().replicas, 50);
    for k in &acked {
        let v = c.get_from(2, k, T).await.unwrap();
        assert!(v.is_some(), "node 2 lost {:?}", String::from_utf8_lossy(k));
    }
    // Stop everything, restart everything: all acknowledged writes survive.
    for n in 1..=3 {
        c.stop(n);
    }
    for n in 1..=3 {
        c.start(n);
    }
    c.wait_leaders(&ids(&layout), T).await;
    for k in &acked {
        let v = c.get_from(1, k, T).await.unwrap();
        assert!(
            v.is_some(),
            "lost {:?} after full restart",
            String::from_utf8_lossy(k)
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_gets_typed_errors() {
    let c = Cluster::new(3);
    // Only part of the key space is covered.
    let mut d = range_layout(2, &node_ids(3)).remove(1);
    d.end_key = b"z".to_vec().into();
    for n in 1..=3 {
        c.node(n).bootstrap_range(d.clone()).unwrap();
    }
    c.node(1).campaign(d.id()).unwrap();
    c.wait_leaders(&[d.id()], T).await;
    let leader = c.leader_of(d.id()).unwrap();
    let ng = c.node(leader);

    // Key outside every range.
    assert!(matches!(
        ng.put(b"a", b"v").await,
        Err(Error::KeyNotInRange { .. })
    ));
    assert!(matches!(
        ng.put(b"zz", b"v").await,
        Err(Error::KeyNotInRange { .. })
    ));
    // Oversized proposal.
    let big = vec![0u8; 1 << 20];
    assert!(matches!(
        ng.put(&key_in_range(2, "big"), &big).await,
        Err(Error::ProposalTooLarge { .. })
    ));
    // Proposal to a range this node does not have.
    assert!(matches!(
        ng.compact_log(RangeId(99)).await,
        Err(Error::RangeNotFound(_))
    ));
    // A stale epoch.
    let res = ng
        .propose(
            &key_in_range(2, "e"),
            vec![],
            flotilla::ProposeOptions {
                epoch: Some(flotilla::proto::meta::RangeEpoch {
                    conf_ver: 0,
                    version: 0,
                }),
                ..Default::default()
            },
        )
        .await;
    assert!(matches!(res, Err(Error::EpochNotMatch { .. })), "{res:?}");
    // A command the state machine cannot decode: refused, deterministic, not fatal.
    let res = ng
        .propose(
            &key_in_range(2, "junk"),
            vec![0xff, 0xff, 0xff],
            Default::default(),
        )
        .await;
    assert!(matches!(res, Err(Error::InvalidCommand(_))), "{res:?}");
    // Invalid configuration.
    let cfg = NodeGroupConfig {
        election_tick: 1,
        ..test_config(9)
    };
    assert!(matches!(
        cfg.validate(),
        Err(flotilla::ConfigError::ElectionTickNotGreaterThanHeartbeat { .. })
    ));
    // Lease reads without check-quorum would never hold a lease: refused up front rather
    // than every lease read failing with a misleading NotLeader.
    let cfg = NodeGroupConfig {
        check_quorum: false,
        ..test_config(9)
    };
    assert!(cfg.validate().is_err(), "lease reads without check_quorum");
    // Garbage from the network: malformed raft bytes, wrong node, unknown group; nothing
    // panics and the group keeps serving.
    inject_garbage(&c);
    c.put(&key_in_range(2, "still"), b"ok", T).await.unwrap();
    assert!(!c.node(1).is_failed(d.id()));
}

fn inject_garbage(c: &Cluster) {
    use flotilla::proto::meta::ReplicaDescriptor;
    use flotilla::proto::transport::{NodeBatch, RaftMessage};
    use flotilla::transport::Transport;
    let rd = |r: u64, n: u64| {
        Some(ReplicaDescriptor {
            replica_id: r,
            node_id: n,
            role: 0,
        })
    };
    // A transport handle for a fake node 7 on the same network.
    let t = c
        .net
        .register(NodeId(7), std::sync::Arc::new(|_b: NodeBatch| {}));
    let junk = vec![
        RaftMessage {
            range_id: 2,
            from: rd(1, 1),
            to: rd(2, 2),
            message: vec![0xde, 0xad].into(),
            ..Default::default()
        },
        RaftMessage {
            range_id: 2,
            from: None,
            to: None,
            ..Default::default()
        },
        RaftMessage {
            range_id: 424242,
            from: rd(9, 7),
            to: rd(2, 2),
            message: vec![].into(),
            ..Default::default()
        },
    ];
    let _ = t.send(
        NodeId(2),
        NodeBatch {
            from_node: 7,
            to_node: 2,
            messages: junk,
            heartbeats: vec![],
            stats: None,
        },
    );
    let _ = t.send(
        NodeId(2),
        NodeBatch {
            from_node: 7,
            to_node: 3,
            messages: vec![],
            heartbeats: vec![],
            stats: None,
        },
    );
    std::thread::sleep(Duration::from_millis(100));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retried_request_is_applied_once() {
    let c = Cluster::new(3);
    let d = c.bootstrap(1).remove(0);
    c.wait_leaders(&[d.id()], T).await;
    let leader = c.leader_of(d.id()).unwrap();
    let ng = c.node(leader);
    use flotilla::proto::command::{kv_request, CompareAndSet, KvRequest};
    use flotilla::proto::Message;
    ng.put(b"ctr", b"0").await.unwrap();
    let cas = |from: &[u8], to: &[u8]| KvRequest {
        op: Some(kv_request::Op::Cas(CompareAndSet {
            key: b"ctr".to_vec().into(),
            expected: Some(from.to_vec().into()),
            value: to.to_vec().into(),
            delete: false,
        })),
    };
    let opts = flotilla::ProposeOptions {
        request_id: Some((77, 1)),
        epoch: None,
    };
    let first = ng.kv(cas(b"0", b"1"), opts).await.unwrap();
    assert!(first.ok);
    // The same request again (a client retry): the recorded answer, no second apply.
    let retry = ng.kv(cas(b"0", b"1"), opts).await.unwrap();
    assert_eq!(retry.encode_to_vec(), first.encode_to_vec());
    // A different request from a fresh seq is applied.
    let opts2 = flotilla::ProposeOptions {
        request_id: Some((77, 2)),
        epoch: None,
    };
    let second = ng.kv(cas(b"0", b"2"), opts2).await.unwrap();
    assert!(!second.ok, "value is 1, not 0");
    assert_eq!(
        ng.get(b"ctr", ReadConsistency::Linearizable)
            .await
            .unwrap()
            .as_deref(),
        Some(&b"1"[..])
    );
    // A lease read on the leader agrees.
    assert!(
        wait_until_async(T, || async {
            ng.get(b"ctr", ReadConsistency::Lease)
                .await
                .ok()
                .flatten()
                .as_deref()
                == Some(&b"1"[..])
        })
        .await
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bootstrap_replaces_a_replica_a_peer_message_created_first() {
    // Nodes 1 and 2 bootstrap and elect; node 3 is connected but bootstraps late, so the
    // leaders' messages create uninitialized replicas there first (as when node processes
    // start one after another).
    let c = Cluster::new(3);
    let layout = range_layout(20, &node_ids(3));
    for n in [1, 2] {
        c.node(n).bootstrap_ranges(layout.clone()).unwrap();
    }
    for d in &layout {
        c.node(1).campaign(d.id()).unwrap();
    }
    c.wait_leaders(&ids(&layout), T).await;
    assert!(wait_until(T, || c.node(3).node_status().replicas == 20).await);
    c.node(3).bootstrap_ranges(layout.clone()).unwrap();
    for d in &layout {
        let key = key_in_range(d.range_id, "late");
        c.put(&key, b"v", T).await.unwrap();
        let v = c.get_from(3, &key, T).await.unwrap();
        assert_eq!(v.as_deref(), Some(&b"v"[..]));
    }
    assert_eq!(c.node(3).ranges().len(), 20);
}
