//! Snapshots, creation by message, and failures that isolate a replica.

use super::*;

// ---- snapshot ----

#[test]
fn a_follower_behind_a_compacted_log_installs_the_leaders_snapshot() {
    let mut sim = Sim::new(3);
    sim.elect(1, 1);
    // Node 3 misses writes: its inbox is dropped while they happen.
    for i in 0..5u8 {
        sim.put(1, &[b'k', i], b"v").unwrap();
        sim.node(3).inbox.clear();
    }
    let token = sim.node(1).token();
    sim.node(1).post(1, PeerMsg::CompactLog { token });
    sim.settle();
    sim.node(3).inbox.clear();
    sim.tick_until("node 3 catches up by snapshot", |s| {
        s.nodes[2].engine.get(&[b'k', 4]).unwrap() == Some(b"v".to_vec())
    });
    assert!(sim.node(3).failed.is_empty());
    assert!(sim.node(3).router.get(RangeId(1)).is_some());
}

#[test]
fn a_snapshot_over_a_range_absorbed_in_a_missed_merge_retires_it_first() {
    // Node 1 hosts range 1 = ["", "p") and range 7 = ["p", "q"); it missed the merge of 7
    // into 1, and a snapshot of the merged range 1 = ["", "q") arrives.
    let mut sim = Sim::of(vec![Node::new(1, Arc::new(KvStateMachine))]);
    sim.node(1).bootstrap(&descriptor(1, b"", b"p", &[1]));
    let old = descriptor(7, b"p", b"q", &[1]);
    sim.node(1).bootstrap(&old);
    let mut snapshot_of_1 = descriptor(1, b"", b"q", &[1]);
    snapshot_of_1.epoch = Some(RangeEpoch {
        conf_ver: 2,
        version: 3,
    });
    let header = flotilla_proto::meta::SnapshotHeader {
        descriptor: Some(snapshot_of_1),
        ..Default::default()
    };
    let mut msg = raft::prelude::Message::default();
    msg.set_msg_type(MessageType::MsgSnapshot);
    msg.mut_snapshot().data = header.encode_to_vec();
    let mut out = Output::default();
    let Node {
        id,
        config,
        engine,
        router,
        sm,
        pending,
        host,
        replicas,
        ..
    } = &mut sim.nodes[0];
    let env = Env {
        config,
        node: *id,
        engine,
        router,
        state_machine: &**sm,
        pending,
        host,
    };
    let replica = replicas.get_mut(&1).unwrap();
    assert!(!replica.accept_snapshot(&msg, &env, &mut out));
    assert!(matches!(&out.effects[..], [Effect::Retire(d)] if *d == old));
}

// ---- isolation on error ----

/// A state machine whose store fails on a key, and refuses another.
struct Faulty;

impl StateMachine for Faulty {
    fn apply(
        &self,
        range: &RangeDescriptor,
        index: u64,
        command: &[u8],
        ctx: &mut ApplyContext<'_>,
    ) -> Result<Vec<u8>, ApplyError> {
        let req = KvRequest::decode(command).unwrap();
        let Some(kv_request::Op::Put(p)) = &req.op else {
            unreachable!()
        };
        match &p.key[..] {
            b"io" => Err(ApplyError::Store(flotilla_store::StoreError::Corruption {
                what: "test",
                key: p.key.to_vec(),
                reason: "injected".into(),
            })),
            b"no" => Err(ApplyError::Refused("refused by the test".into())),
            _ => KvStateMachine.apply(range, index, command, ctx),
        }
    }
}

#[test]
fn a_store_failure_during_apply_fails_the_replica_instead_of_answering() {
    let mut sim = Sim::with_state_machine(1, Arc::new(Faulty));
    sim.elect(1, 1);
    let applied = sim
        .node(1)
        .replica(1)
        .raw
        .store()
        .apply_state()
        .applied_index;
    let node = sim.node(1);
    let token = node.token();
    let data = node.put_cmd(1, token, b"io", b"x");
    node.post(1, PeerMsg::Propose { token, data });
    sim.settle();
    let node = sim.node(1);
    assert!(matches!(node.failed.get(&1), Some(Error::Store(_))));
    assert!(
        !node.answers.contains_key(&token),
        "no answer may come of it"
    );
    // Nothing of the failed apply reached the disk: a restart applies the entry again.
    let on_disk = flotilla_store::GroupStorage::recover(
        node.engine.clone(),
        node.engine
            .recover()
            .unwrap()
            .into_iter()
            .find(|g| g.group == RangeId(1))
            .unwrap(),
    )
    .unwrap();
    assert_eq!(on_disk.apply_state().applied_index, applied);
}

#[test]
fn a_refusal_is_the_replicated_answer_and_the_entry_counts_as_applied() {
    let mut sim = Sim::with_state_machine(1, Arc::new(Faulty));
    sim.elect(1, 1);
    let answer = sim.put(1, b"no", b"x");
    assert!(
        matches!(answer, Err(Error::InvalidCommand(ref m)) if m.contains("refused by the test"))
    );
    let r = sim.node(1).replica(1);
    assert_eq!(
        r.raw.store().apply_state().applied_index,
        r.raw.raft.raft_log.committed
    );
    assert!(sim.node(1).failed.is_empty());
}

#[test]
fn an_unreadable_client_record_fails_the_replica_instead_of_applying_twice() {
    let mut sim = Sim::new(1);
    sim.elect(1, 1);
    // Damage the retry record of client 9.
    let mut batch = sim.node(1).engine.batch();
    batch.put_client_record(RangeId(1), 9, b"\xff\xff\xff");
    sim.node(1).engine.write(batch, true).unwrap();
    let node = sim.node(1);
    let token = node.token();
    let data = node.cmd(1, token, b"k", b"v", Some((9, 1)));
    node.post(1, PeerMsg::Propose { token, data });
    sim.settle();
    let node = sim.node(1);
    assert!(matches!(node.failed.get(&1), Some(Error::Store(_))));
    assert!(!node.answers.contains_key(&token));
}

// ---- creation ----

#[test]
fn an_uninitialized_replica_writes_its_placeholder_with_its_first_round() {
    let mut node = Node::new(1, Arc::new(KvStateMachine));
    let logger = crate::logger::root_logger(1);
    let r = Replica::open_uninitialized(
        node.engine.clone(),
        RangeId(5),
        3,
        NodeId(1),
        &node.config,
        &logger,
    )
    .unwrap();
    node.replicas.insert(5, r);
    assert!(node.engine.descriptor(RangeId(5)).unwrap().is_none());
    node.round(5, 0);
    let placeholder = node.engine.descriptor(RangeId(5)).unwrap().unwrap();
    assert_eq!(placeholder.state, RangeState::Uninitialized as i32);
    assert_eq!(placeholder.replica_on(NodeId(1)).unwrap().replica_id, 3);
}
