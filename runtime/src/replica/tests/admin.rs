//! Membership changes, splits and merges, driven round by round.

use super::*;

// ---- membership ----

#[test]
fn adding_a_learner_publishes_a_descriptor_with_a_new_conf_ver() {
    let mut sim = Sim::new(3);
    sim.elect(1, 1);
    let token = sim.node(1).token();
    sim.node(1).post(
        1,
        PeerMsg::ConfChange {
            token,
            changes: vec![MembershipChange::AddLearner(NodeId(4))],
        },
    );
    sim.settle();
    let answer = sim.node(1).answers.remove(&token).unwrap().unwrap();
    let desc = RangeDescriptor::decode(&answer[..]).unwrap();
    assert_eq!(desc.epoch_or_default().conf_ver, 2);
    assert!(desc.replica_on(NodeId(4)).is_some());
    // The router learned it through a Route effect.
    let routed = sim.node(1).router.get(RangeId(1)).unwrap();
    assert_eq!(routed.epoch_or_default().conf_ver, 2);
}

#[test]
fn a_removed_replica_asks_to_be_destroyed() {
    let mut sim = Sim::new(3);
    sim.elect(1, 1);
    let token = sim.node(1).token();
    sim.node(1).post(
        1,
        PeerMsg::ConfChange {
            token,
            changes: vec![MembershipChange::Remove(flotilla_proto::ReplicaId(3))],
        },
    );
    sim.settle();
    sim.tick_until("node 3 learns it was removed", |s| {
        s.nodes[2]
            .effects
            .iter()
            .any(|(_, e)| matches!(e, Effect::Removed))
    });
    assert!(sim.node(1).effects.is_empty());
}

#[test]
fn a_second_membership_change_while_one_is_in_flight_is_refused() {
    let mut sim = Sim::new(3);
    sim.elect(1, 1);
    let (t1, t2) = (sim.node(1).token(), sim.node(1).token());
    let node = sim.node(1);
    node.post(
        1,
        PeerMsg::ConfChange {
            token: t1,
            changes: vec![MembershipChange::AddLearner(NodeId(4))],
        },
    );
    node.post(
        1,
        PeerMsg::ConfChange {
            token: t2,
            changes: vec![MembershipChange::AddLearner(NodeId(5))],
        },
    );
    sim.settle();
    let node = sim.node(1);
    assert!(node.answers[&t1].is_ok());
    assert!(matches!(node.answers[&t2], Err(Error::AdminRefused(_))));
}

// ---- split ----

fn propose_split(sim: &mut Sim, key: &[u8], new_range: u64) -> u64 {
    let token = sim.node(1).token();
    sim.node(1).post(
        1,
        PeerMsg::Split {
            token,
            split_key: key.to_vec(),
            new_range_id: new_range,
        },
    );
    token
}

#[test]
fn an_applied_split_asks_its_owner_to_create_the_right_half_after_a_synced_write() {
    let mut sim = Sim::new(1);
    sim.elect(1, 1);
    sim.put(1, b"a", b"1").unwrap();
    let token = propose_split(&mut sim, b"m", 99);
    // Run the round that applies the split by hand, to look at its output.
    let mut saw_sync = false;
    for _ in 0..10 {
        let out = sim.node(1).round(1, 0);
        saw_sync |= out.sync_apply;
        if sim.node(1).answers.contains_key(&token) {
            break;
        }
    }
    assert!(saw_sync, "the split's apply batch must be synced");
    let answer = sim.node(1).answers.remove(&token).unwrap().unwrap();
    let halves = SplitResult::decode(&answer[..]).unwrap();
    let (left, right) = (halves.left.unwrap(), halves.right.unwrap());
    assert_eq!(&left.end_key[..], b"m");
    assert_eq!(&right.start_key[..], b"m");
    assert_eq!(right.range_id, 99);
    let created = sim.node(1).effects.iter().find_map(|(_, e)| match e {
        Effect::CreateSplit {
            left,
            storage,
            campaign,
            ..
        } => Some((left.clone(), storage.descriptor().cloned(), *campaign)),
        _ => None,
    });
    let (l, r, campaign) = created.expect("a CreateSplit effect");
    assert_eq!(*l, left);
    assert_eq!(r.unwrap(), right);
    assert!(campaign, "the parent's leader campaigns for the new half");
    // Both halves' state is on disk before the new replica exists.
    assert_eq!(
        sim.node(1).engine.descriptor(RangeId(99)).unwrap().unwrap(),
        right
    );
    assert_eq!(
        sim.node(1).engine.descriptor(RangeId(1)).unwrap().unwrap(),
        left
    );
}

#[test]
fn a_split_whose_new_range_is_busy_waits_and_applies_in_a_later_round() {
    let mut sim = Sim::new(1);
    sim.elect(1, 1);
    sim.node(1)
        .host
        .seal
        .borrow_mut()
        .insert(99, Existing::Busy);
    let token = propose_split(&mut sim, b"m", 99);
    for _ in 0..5 {
        sim.node(1).round(1, 0);
    }
    assert!(!sim.node(1).answers.contains_key(&token), "must wait");
    assert!(!sim.node(1).replica(1).stalled.is_empty());
    let applied = sim
        .node(1)
        .replica(1)
        .raw
        .store()
        .apply_state()
        .applied_index;
    sim.node(1).host.seal.borrow_mut().remove(&99);
    sim.node(1).round(1, 0);
    assert!(sim.node(1).answers[&token].is_ok());
    assert!(
        sim.node(1)
            .replica(1)
            .raw
            .store()
            .apply_state()
            .applied_index
            > applied
    );
}

#[test]
fn a_split_over_an_uninitialized_replica_keeps_its_term_and_vote() {
    let mut sim = Sim::new(1);
    sim.elect(1, 1);
    let hs = HardState {
        term: 42,
        vote: 3,
        commit: 0,
    };
    sim.node(1)
        .host
        .seal
        .borrow_mut()
        .insert(99, Existing::Uninitialized(hs));
    let token = propose_split(&mut sim, b"m", 99);
    sim.settle();
    assert!(sim.node(1).answers[&token].is_ok());
    let storage = sim
        .node(1)
        .effects
        .iter()
        .find_map(|(_, e)| match e {
            Effect::CreateSplit { storage, .. } => Some(storage.hard_state().clone()),
            _ => None,
        })
        .expect("created");
    assert_eq!((storage.term, storage.vote), (42, 3));
    assert_eq!(*sim.node(1).host.sealed.borrow(), vec![RangeId(99)]);
}

#[test]
fn a_split_with_a_stale_epoch_is_refused_alike_on_every_replica() {
    let mut sim = Sim::new(3);
    sim.elect(1, 1);
    // Two splits proposed under the same epoch: the second one applies after the first
    // bumped the version, and is refused everywhere.
    let t1 = propose_split(&mut sim, b"m", 98);
    let t2 = propose_split(&mut sim, b"t", 99);
    sim.settle();
    sim.tick_until("every replica applied both", |s| {
        s.nodes.iter().all(|n| {
            n.replica(1).raw.raft.raft_log.applied
                >= s.nodes[0].replica(1).raw.raft.raft_log.committed
        })
    });
    let node = sim.node(1);
    assert!(node.answers[&t1].is_ok());
    assert!(matches!(
        node.answers[&t2],
        Err(Error::EpochNotMatch { .. })
    ));
    for n in &sim.nodes {
        let creates = n
            .effects
            .iter()
            .filter(|(_, e)| matches!(e, Effect::CreateSplit { .. }))
            .count();
        assert_eq!(creates, 1, "node {}", n.id);
    }
}

// ---- leader placement ----

/// Every replica of range 1 is told that node 3's replica should lead.
fn prefer_node_3(sim: &mut Sim) {
    for id in 1..=3 {
        sim.node(id).post(1, PeerMsg::PreferLeader { replica: 3 });
    }
    sim.settle();
}

#[test]
fn a_leader_hands_leadership_to_the_preferred_replica_once_it_is_up() {
    let mut sim = Sim::new(3);
    prefer_node_3(&mut sim);
    // Node 3 misses the first election and its leader's first appends.
    sim.cut.insert(3);
    sim.elect_among(1, 1, &[1, 2]);
    for _ in 0..30 {
        sim.step(1);
        sim.settle();
    }
    assert!(
        sim.node(1).replica(1).is_leader(),
        "no transfer to a node that is down"
    );
    sim.cut.clear();
    sim.tick_until("node 3 leads", |s| s.nodes[2].replica(1).is_leader());
    sim.tick_until("every node follows node 3", |s| {
        s.nodes.iter().all(|n| n.replica(1).raw.raft.leader_id == 3)
    });
    // Placed once: every replica forgot the preference (on its next tick).
    sim.step(1);
    sim.settle();
    assert!(sim.nodes.iter().all(|n| n.replica(1).placement.is_none()));
}

#[test]
fn a_preferred_replica_that_wins_the_first_election_keeps_leading() {
    let mut sim = Sim::new(3);
    prefer_node_3(&mut sim);
    sim.elect(3, 1);
    for _ in 0..30 {
        sim.step(1);
        sim.settle();
    }
    assert!(sim.node(3).replica(1).is_leader());
    assert!(sim.nodes.iter().all(|n| n.replica(1).placement.is_none()));
}

// ---- merge ----

/// Two adjacent ranges on one node: 1 = ["", "m"), 2 = ["m", ""), both led by node 1.
fn two_ranges() -> Sim {
    let mut sim = Sim::of(vec![Node::new(1, Arc::new(KvStateMachine))]);
    sim.node(1).bootstrap(&descriptor(1, b"", b"m", &[1]));
    sim.node(1).bootstrap(&descriptor(2, b"m", b"", &[1]));
    sim.elect(1, 1);
    sim.elect(1, 2);
    sim
}

#[test]
fn a_prepared_merge_freezes_the_source_and_wakes_the_target() {
    let mut sim = two_ranges();
    let target = sim.node(1).router.get(RangeId(2)).unwrap();
    let token = sim.node(1).token();
    sim.node(1).post(1, PeerMsg::PrepareMerge { token, target });
    sim.node(1).round(1, 0);
    sim.node(1).round(1, 0);
    assert!(sim.node(1).answers[&token].is_ok());
    let source = sim.node(1).router.get(RangeId(1)).unwrap();
    assert!(source.merge.is_some(), "the router shows the frozen source");
    assert_eq!(source.epoch_or_default().version, 2);
    // The target was woken (MergeResume) and the source refuses writes from now on.
    assert!(sim
        .node(1)
        .inbox
        .get(&2)
        .is_some_and(|m| m.iter().any(|m| matches!(m, PeerMsg::MergeResume))));
    let answer = sim.put(1, b"a", b"1");
    assert!(matches!(answer, Err(Error::Busy(_))), "{answer:?}");
}

#[test]
fn a_commit_merge_waits_for_the_source_hand_over_then_absorbs_it() {
    let mut sim = two_ranges();
    sim.put(1, b"a", b"1").unwrap();
    let target = sim.node(1).router.get(RangeId(2)).unwrap();
    let token = sim.node(1).token();
    sim.node(1).post(1, PeerMsg::PrepareMerge { token, target });
    sim.settle();
    // The source's leader proposed the CommitMerge through the target beside it.
    sim.tick_until("the source asks the target to commit", |s| {
        !s.nodes[0].replica(2).stalled.is_empty()
    });
    // The target waits, and asked the source to catch up to its prepare entry.
    let source = sim.node(1).replica(1).merge_state().cloned().unwrap();
    assert!(sim.node(1).effects.iter().any(|(r, e)| *r == RangeId(1)
        && matches!(e, Effect::HandOver { prepare, .. } if *prepare == source.prepare_index)));
    // What the owner does on HandOver: note it, and wake the target.
    sim.node(1)
        .host
        .handed_over
        .borrow_mut()
        .insert(1, source.prepare_index);
    sim.node(1).post(2, PeerMsg::MergeResume);
    let out = sim.node(1).round(2, 0);
    assert!(out.sync_apply);
    let merged = sim.node(1).effects.iter().find_map(|(_, e)| match e {
        Effect::MergedAway {
            source,
            merged,
            tombstone,
        } => Some((*source, merged.clone(), tombstone.clone())),
        _ => None,
    });
    let (src, merged, tomb) = merged.expect("a MergedAway effect");
    assert_eq!(src, RangeId(1));
    assert_eq!(
        (&merged.start_key[..], &merged.end_key[..]),
        (&b""[..], &b""[..])
    );
    assert_eq!(tomb.state, RangeState::Tombstone as i32);
    // The tombstone and the merged descriptor are on disk.
    let engine = &sim.node(1).engine;
    assert_eq!(
        engine.descriptor(RangeId(1)).unwrap().unwrap().state,
        RangeState::Tombstone as i32
    );
    assert_eq!(engine.descriptor(RangeId(2)).unwrap().unwrap(), *merged);
}

/// Runs `ticks` ticks (settling after each) while node `down` receives nothing.
fn ticks_with_node_down(sim: &mut Sim, down: u64, ticks: u32) {
    for _ in 0..ticks {
        sim.step(1);
        sim.node(down).inbox.clear();
        for _ in 0..200 {
            let more = sim.step(0);
            sim.node(down).inbox.clear();
            if !more {
                break;
            }
        }
    }
}

#[test]
fn a_merge_a_down_replica_cannot_acknowledge_is_abandoned_and_rolled_back() {
    // Ranges 1 = ["", "m") and 2 = ["m", "") on three nodes, both led by node 1.
    let mut sim = Sim::of(
        (1..=3)
            .map(|id| Node::new(id, Arc::new(KvStateMachine)))
            .collect(),
    );
    for node in &mut sim.nodes {
        node.bootstrap(&descriptor(1, b"", b"m", &[1, 2, 3]));
        node.bootstrap(&descriptor(2, b"m", b"", &[1, 2, 3]));
        // 10 ticks of freeze at most.
        node.config.merge_freeze_limit = node.config.tick_interval * 10;
    }
    sim.elect(1, 1);
    sim.elect(1, 2);
    assert!(kv_ok(&sim.put(1, b"a", b"1")));
    let target_before = sim.node(1).router.get(RangeId(2)).unwrap();

    // Node 3 goes down as the merge is prepared: it never acknowledges the prepare entry, so
    // the commit cannot be proposed.
    let token = sim.node(1).token();
    sim.node(1).post(
        1,
        PeerMsg::PrepareMerge {
            token,
            target: target_before.clone(),
        },
    );
    ticks_with_node_down(&mut sim, 3, 0);
    sim.node(3).inbox.clear();
    for _ in 0..3 {
        sim.step(0);
        sim.node(3).inbox.clear();
    }
    assert!(
        sim.node(1).answers[&token].is_ok(),
        "the merge was prepared"
    );
    assert!(sim.node(1).replica(1).merge_state().is_some());

    // Within the limit (and a retry period) the target refuses the merge and the source
    // rolls back, without node 3.
    let mut ticks = 0;
    while sim.node(1).replica(1).merge_state().is_some() {
        ticks_with_node_down(&mut sim, 3, 1);
        ticks += 1;
        assert!(
            ticks <= 40,
            "the source is still frozen after {ticks} ticks"
        );
    }
    let target_after = sim.node(1).router.get(RangeId(2)).unwrap();
    assert_eq!(
        target_after.epoch_or_default().version,
        target_before.epoch_or_default().version + 1,
        "the abandon moved the target's epoch on"
    );
    assert_eq!(target_after.end_key, target_before.end_key);
    assert_eq!(
        &sim.node(1).router.get(RangeId(1)).unwrap().end_key[..],
        b"m",
        "the source is still its own range"
    );
    assert!(
        kv_ok(&sim.put(1, b"b", b"2")),
        "the source takes writes again"
    );
    assert!(!sim.nodes.iter().any(|n| n
        .effects
        .iter()
        .any(|(_, e)| matches!(e, Effect::MergedAway { .. }))));

    // Node 3 returns: it applies the prepare and the rollback like everyone else.
    sim.tick_until("node 3 catches up, unfrozen", |s| {
        s.nodes[2].engine.get(b"b").unwrap() == Some(b"2".to_vec())
            && s.nodes[2].replica(1).merge_state().is_none()
    });
}
