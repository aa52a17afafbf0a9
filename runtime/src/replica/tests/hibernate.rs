//! Hibernation: a quiet group sleeps on every replica, and every input wakes it.

use super::*;

fn asleep(sim: &Sim, node: u64) -> bool {
    sim.nodes[node as usize - 1].replica(1).is_asleep()
}

fn all_asleep(sim: &Sim) -> bool {
    (1..=sim.nodes.len() as u64).all(|n| asleep(sim, n))
}

/// Three replicas of range 1, node 1 leading, a first write applied everywhere, then quiet
/// until every replica sleeps.
fn sleeping_group() -> Sim {
    let mut sim = Sim::new(3);
    sim.elect(1, 1);
    assert!(kv_ok(&sim.put(1, b"a", b"1")));
    sim.tick_until("the group sleeps", all_asleep);
    sim
}

#[test]
fn a_quiet_group_sleeps_on_every_replica_and_ignores_ticks() {
    let mut sim = sleeping_group();
    let term = sim.node(1).replica(1).raw.raft.term;
    // Ticks reach a sleeping replica only if they raced with its sleep: nothing happens.
    for _ in 0..50 {
        sim.step(1);
        sim.settle();
    }
    assert!(all_asleep(&sim));
    assert!(sim.node(1).replica(1).is_leader());
    for n in &sim.nodes {
        let r = n.replica(1);
        assert_eq!(r.raw.raft.term, term);
        assert_eq!(
            r.raw.raft.raft_log.committed,
            sim.nodes[0].replica(1).raw.raft.raft_log.committed
        );
    }
}

#[test]
fn a_write_wakes_a_sleeping_group_and_it_sleeps_again() {
    let mut sim = sleeping_group();
    // Through a follower: forwarded to the sleeping leader, which the forward wakes.
    assert!(kv_ok(&sim.put(3, b"b", b"2")));
    assert!(!asleep(&sim, 1), "the leader took the write awake");
    assert!(kv_ok(&sim.put(1, b"c", b"3")));
    sim.tick_until("everyone applied", |s| {
        s.nodes
            .iter()
            .all(|n| n.engine.get(b"c").unwrap() == Some(b"3".to_vec()))
    });
    sim.tick_until("the group sleeps again", all_asleep);
}

#[test]
fn a_read_wakes_a_sleeping_group() {
    let mut sim = sleeping_group();
    // A linearizable read on a follower: its read index request wakes the leader.
    let token = sim.node(2).token();
    sim.node(2).post(
        1,
        PeerMsg::Read {
            token,
            lease: false,
        },
    );
    sim.settle();
    for _ in 0..5 {
        if sim.node(2).answers.contains_key(&token) {
            break;
        }
        sim.step(1);
        sim.settle();
    }
    assert!(sim.node(2).answers[&token].is_ok());
    // A lease read on the leader, woken by it (its lease may have lapsed: then it confirms).
    sim.tick_until("the group sleeps again", all_asleep);
    let token = sim.node(1).token();
    sim.node(1).post(1, PeerMsg::Read { token, lease: true });
    sim.settle();
    assert!(!asleep(&sim, 1));
    for _ in 0..5 {
        if sim.node(1).answers.contains_key(&token) {
            break;
        }
        sim.step(1);
        sim.settle();
    }
    assert!(sim.node(1).answers[&token].is_ok());
}

#[test]
fn a_vote_wakes_a_sleeping_replica() {
    let mut sim = sleeping_group();
    sim.node(2).post(1, PeerMsg::Campaign);
    // One round on node 2 only: its (pre)vote requests are now in the others' inboxes.
    let out = sim.node(2).round(1, 0);
    let mut out = out;
    sim.deliver(NodeId(2), &mut out);
    assert!(asleep(&sim, 3), "not yet handled");
    let _ = sim.node(3).round(1, 0);
    assert!(!asleep(&sim, 3), "the vote woke node 3");
    let _ = sim.node(1).round(1, 0);
    assert!(!asleep(&sim, 1), "the vote woke the leader");
    // The leader was not down: it keeps leading, and the group sleeps again.
    sim.settle();
    sim.tick_until("the group sleeps again", all_asleep);
    assert!(sim.node(1).replica(1).is_leader());
}

#[test]
fn a_snapshot_wakes_a_sleeping_follower_and_installs() {
    let mut sim = sleeping_group();
    // Node 1 declares node 3 down; node 3 (its replica taken off the network) hears nothing
    // of what follows.
    sim.node(1).host.down.borrow_mut().insert(3);
    let r3 = sim.node(3).replicas.remove(&1).unwrap();
    for i in 0..5u8 {
        assert!(kv_ok(&sim.put(1, &[b'k', i], b"v")));
    }
    let token = sim.node(1).token();
    sim.node(1).post(1, PeerMsg::CompactLog { token });
    sim.settle();
    // The leader sleeps without node 3 (down).
    sim.tick_until("leader and node 2 sleep", |s| asleep(s, 1) && asleep(s, 2));
    sim.node(3).inbox.clear();
    sim.node(3).replicas.insert(1, r3);
    assert!(asleep(&sim, 3));
    // Node 3 is back: the leader is woken (as liveness does) and catches it up by snapshot.
    sim.node(1).host.down.borrow_mut().clear();
    sim.node(1).post(1, PeerMsg::Wake);
    let is_snapshot = |m: &PeerMsg| matches!(m, PeerMsg::Raft { msg, .. } if msg.get_msg_type() == MessageType::MsgSnapshot);
    let mut woke = false;
    for _ in 0..200 {
        if sim
            .node(3)
            .inbox
            .get(&1)
            .is_some_and(|i| i.iter().any(is_snapshot))
        {
            // Node 3's replica asleep when the snapshot arrives, as a restarted node's are
            // until their paced wake: the snapshot wakes it.
            sim.node(3).replicas.get_mut(&1).unwrap().start_asleep();
            let _ = sim.node(3).round(1, 0);
            assert!(!asleep(&sim, 3), "the snapshot woke node 3");
            woke = true;
            // Delivered: the report a worker sends for a transport that does not report.
            sim.node(1)
                .post(1, PeerMsg::SnapshotStatus { to: 3, ok: true });
            break;
        }
        if !sim.step(0) {
            sim.step(1);
        }
    }
    assert!(woke, "the leader sent no snapshot");
    sim.settle();
    sim.tick_until("node 3 installed the snapshot", |s| {
        s.nodes[2].engine.get(&[b'k', 4]).unwrap() == Some(b"v".to_vec())
    });
    assert!(sim.node(3).failed.is_empty());
    sim.tick_until("the group sleeps again", all_asleep);
}

/// Keeps, of what waits for node 3's replica, only appends that carry entries and sleep
/// notices (so it never learns a commit index but from a notice); returns the notices kept.
fn starve_node_3_of_commits(sim: &mut Sim) -> usize {
    let inbox = sim.node(3).inbox.remove(&1).unwrap_or_default();
    let kept: Vec<PeerMsg> = inbox
        .into_iter()
        .filter(|m| match m {
            PeerMsg::Raft { msg, .. } => {
                msg.get_msg_type() == MessageType::MsgAppend && !msg.entries.is_empty()
            }
            PeerMsg::Sleep { .. } => true,
            _ => false,
        })
        .collect();
    let notices = kept
        .iter()
        .filter(|m| matches!(m, PeerMsg::Sleep { .. }))
        .count();
    if kept.is_empty() {
        sim.node(3).scheduled.remove(&1);
    } else {
        sim.node(3).inbox.insert(1, kept);
    }
    notices
}

#[test]
fn a_follower_behind_on_commit_does_not_sleep() {
    let mut sim = sleeping_group();
    // A write whose commit node 3 does not learn: it gets the entry (so the leader sees it
    // matched) but none of the messages that carry the new commit index.
    let token = sim.node(1).token();
    let data = sim.node(1).put_cmd(1, token, b"b", b"2");
    sim.node(1).post(1, PeerMsg::Propose { token, data });
    let mut notice = false;
    for _ in 0..300 {
        let notices = starve_node_3_of_commits(&mut sim);
        let commit = sim.node(1).replica(1).raw.raft.raft_log.committed;
        let behind = sim.node(3).replica(1).raw.raft.raft_log.committed < commit;
        if notices > 0 {
            assert!(behind, "node 3 learned the commit before the notice");
            assert!(asleep(&sim, 1), "the leader sleeps, having sent its notice");
            sim.step(0);
            let r3 = sim.node(3).replica(1);
            assert!(!r3.is_asleep(), "a follower behind on commit slept");
            assert!(
                r3.raw.raft.raft_log.committed < commit,
                "a notice commits nothing"
            );
            // Node 3 asked the leader to wake.
            sim.step(0);
            assert!(!asleep(&sim, 1), "the leader was woken");
            notice = true;
            break;
        }
        if !sim.step(0) {
            sim.step(1);
        }
    }
    assert!(notice, "the leader never tried to sleep");
    // The follower asked the leader to wake; now that it knows the commit, the group sleeps.
    sim.settle();
    sim.tick_until("the group sleeps with node 3", all_asleep);
    let commits: Vec<u64> = sim
        .nodes
        .iter()
        .map(|n| n.replica(1).raw.raft.raft_log.committed)
        .collect();
    assert!(commits.iter().all(|c| *c == commits[0]), "{commits:?}");
}

#[test]
fn followers_of_a_leader_declared_down_forget_it_and_the_chosen_campaigner_campaigns() {
    let mut sim = sleeping_group();
    let term = sim.node(1).replica(1).raw.raft.term;
    // Node 1 dies: nodes 2 and 3 declare it down and wake the groups it led.
    for n in [2, 3] {
        sim.node(n).host.down.borrow_mut().insert(1);
        sim.node(n).post(1, PeerMsg::NodeDown(NodeId(1)));
    }
    // Range 1's live voters are replicas 2 and 3: the choice by range id is replica 3.
    let desc = sim.node(2).replica(1).descriptor().cloned().unwrap();
    let chosen = crate::replica::campaigner(&desc, NodeId(1), NodeId(2), |n| Some(n != NodeId(1)));
    assert_eq!(chosen, Some(3));
    sim.node(1).replicas.clear();
    // The campaigner skips the pre-vote: the leader's node was declared down.
    let mut out = sim.node(3).round(1, 0);
    assert_eq!(
        sim.node(3).replica(1).raw.raft.state,
        raft::StateRole::Candidate
    );
    sim.deliver(NodeId(3), &mut out);
    sim.settle();
    assert_eq!(
        sim.node(3).replica(1).raw.raft.leader_id,
        3,
        "node 3 campaigned and won"
    );
    assert_eq!(sim.node(2).replica(1).raw.raft.leader_id, 3);
    assert!(sim.node(3).replica(1).raw.raft.term > term);
}

/// A queued campaign (a recovered replica that voted for itself, a bootstrapped group's chosen
/// first leader) skips the pre-vote while its replica knows no leader, and does nothing once
/// it knows one.
#[test]
fn a_queued_campaign_skips_the_pre_vote_and_only_while_no_leader_is_known() {
    let mut sim = Sim::new(3);
    assert!(sim.node(2).config.pre_vote);
    sim.node(2).post(1, PeerMsg::CampaignUnled);
    let mut out = sim.node(2).round(1, 0);
    assert_eq!(
        sim.node(2).replica(1).raw.raft.state,
        raft::StateRole::Candidate,
        "a candidate at once, not a pre-candidate"
    );
    sim.deliver(NodeId(2), &mut out);
    sim.settle();
    assert_eq!(sim.node(3).replica(1).raw.raft.leader_id, 2);
    let term = sim.node(3).replica(1).raw.raft.term;
    // Node 3 knows its leader: the campaign is dropped.
    sim.node(3).post(1, PeerMsg::CampaignUnled);
    let mut out = sim.node(3).round(1, 0);
    sim.deliver(NodeId(3), &mut out);
    sim.settle();
    let r = &sim.node(3).replica(1).raw.raft;
    assert_eq!(
        (r.state, r.leader_id, r.term),
        (raft::StateRole::Follower, 2, term)
    );
}

#[test]
fn a_sleeping_replica_gives_back_its_log_cache_and_raft_buffers() {
    let mut sim = Sim::new(3);
    sim.elect(1, 1);
    for i in 0..20u8 {
        assert!(kv_ok(&sim.put(1, &[b'w', i], b"v")));
    }
    assert!(sim.node(1).replica(1).raw.store().cached_entries() > 0);
    sim.tick_until("the group sleeps", all_asleep);
    for n in &sim.nodes {
        let r = n.replica(1);
        assert_eq!(r.raw.store().cached_entries(), 0, "node {}", n.id);
        assert_eq!(r.raw.raft.msgs.capacity(), 0);
        for (_, pr) in r.raw.raft.prs().iter() {
            assert_eq!(pr.ins.buffer_capacity(), 0);
        }
    }
    // Where an idle replica's bytes go, inline (printed with --nocapture; see BENCHMARKS.md).
    println!(
        "size_of: Replica {} (RawNode {}, GroupStorage {}, Ready {}, reads {}), cell {}, descriptor {}",
        std::mem::size_of::<Replica>(),
        std::mem::size_of::<raft::RawNode<GroupStorage>>(),
        std::mem::size_of::<GroupStorage>(),
        std::mem::size_of::<Option<raft::Ready>>(),
        std::mem::size_of::<crate::replica::read::Reads>(),
        std::mem::size_of::<crate::fsm::mailbox::ReplicaCell>(),
        std::mem::size_of::<RangeDescriptor>(),
    );
}
