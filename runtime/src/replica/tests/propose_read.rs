//! Proposals, their apply, retries and reads, on one or three simulated nodes.

use super::*;

// ---- propose and apply ----

#[test]
fn a_single_voter_elects_itself_and_applies_a_put() {
    let mut sim = Sim::new(1);
    sim.elect(1, 1);
    assert!(sim.node(1).replica(1).is_leader());
    let answer = sim.put(1, b"k", b"v");
    assert!(kv_ok(&answer));
    assert_eq!(sim.node(1).engine.get(b"k").unwrap(), Some(b"v".to_vec()));
}

#[test]
fn three_replicas_apply_the_same_put_at_the_same_index() {
    let mut sim = Sim::new(3);
    sim.elect(2, 1);
    assert!(kv_ok(&sim.put(2, b"a", b"1")));
    sim.tick_until("followers apply", |s| {
        s.nodes
            .iter()
            .all(|n| n.engine.get(b"a").unwrap() == Some(b"1".to_vec()))
    });
    let applied: Vec<u64> = sim
        .nodes
        .iter()
        .map(|n| n.replica(1).raw.store().apply_state().applied_index)
        .collect();
    assert!(applied.iter().all(|a| *a == applied[0]), "{applied:?}");
}

#[test]
fn a_follower_forwards_a_proposal_and_answers_it_when_it_applies() {
    let mut sim = Sim::new(3);
    sim.elect(1, 1);
    let answer = sim.put(3, b"f", b"x");
    assert!(kv_ok(&answer));
    assert_eq!(sim.node(3).engine.get(b"f").unwrap(), Some(b"x".to_vec()));
}

#[test]
fn a_proposal_without_a_known_leader_is_answered_not_leader() {
    let mut sim = Sim::new(3);
    let answer = sim.put(2, b"k", b"v");
    assert!(
        matches!(
            answer,
            Err(Error::NotLeader {
                leader_hint: None,
                ..
            })
        ),
        "{answer:?}"
    );
}

#[test]
fn a_retried_request_gets_its_recorded_answer_without_a_second_apply() {
    let mut sim = Sim::new(1);
    sim.elect(1, 1);
    let node = sim.node(1);
    let (t1, t2) = (node.token(), node.token());
    let first = node.cmd(1, t1, b"k", b"v1", Some((7, 1)));
    node.post(
        1,
        PeerMsg::Propose {
            token: t1,
            data: first,
        },
    );
    sim.settle();
    // The same request id with another value: a retry, answered from the record.
    let node = sim.node(1);
    let retry = node.cmd(1, t2, b"k", b"v2", Some((7, 1)));
    node.post(
        1,
        PeerMsg::Propose {
            token: t2,
            data: retry,
        },
    );
    sim.settle();
    let node = sim.node(1);
    assert!(kv_ok(&node.answers[&t1]));
    assert!(kv_ok(&node.answers[&t2]));
    assert_eq!(node.engine.get(b"k").unwrap(), Some(b"v1".to_vec()));
}

/// The de-duplication check reads a client's record from the replica's memory (`retry`) while
/// it holds it, and from the engine once it gave its memory back (asleep): both answer a retry
/// from the record, on every replica.
#[test]
fn a_retry_is_answered_from_the_record_whether_the_replica_holds_it_in_memory_or_not() {
    let mut sim = Sim::new(3);
    sim.elect(1, 1);
    let propose = |sim: &mut Sim, value: &[u8]| {
        let node = sim.node(1);
        let token = node.token();
        let data = node.cmd(1, token, b"k", value, Some((7, 1)));
        node.post(1, PeerMsg::Propose { token, data });
        sim.settle();
        token
    };
    // Every replica applied every entry of node 1's log.
    let caught_up = |s: &Sim| {
        let last = s.nodes[0].replica(1).raw.raft.raft_log.last_index();
        s.nodes
            .iter()
            .all(|n| n.replica(1).raw.store().apply_state().applied_index == last)
    };
    let first = propose(&mut sim, b"v1");
    sim.tick_until("the followers apply the first request", caught_up);
    for n in &sim.nodes {
        assert_eq!(n.replica(1).retry_records.get(7).map(|r| r.seq), Some(1));
    }
    // From memory.
    let retry = propose(&mut sim, b"v2");
    sim.tick_until("the followers apply the retry", caught_up);
    // From the engine.
    for n in &mut sim.nodes {
        n.replicas.get_mut(&1).unwrap().retry_records.clear();
    }
    let second_retry = propose(&mut sim, b"v3");
    sim.tick_until("the followers apply the second retry", caught_up);
    let node = sim.node(1);
    for t in [first, retry, second_retry] {
        assert!(kv_ok(&node.answers[&t]), "{:?}", node.answers[&t]);
    }
    for n in &sim.nodes {
        assert_eq!(
            n.engine.get(b"k").unwrap(),
            Some(b"v1".to_vec()),
            "node {}",
            n.id
        );
    }
}

// ---- reads ----

#[test]
fn a_linearizable_read_on_the_leader_completes_after_its_read_index() {
    let mut sim = Sim::new(3);
    sim.elect(1, 1);
    sim.put(1, b"k", b"v").unwrap();
    let token = sim.node(1).token();
    sim.node(1).post(
        1,
        PeerMsg::Read {
            token,
            lease: false,
        },
    );
    sim.settle();
    assert!(matches!(sim.node(1).answers.get(&token), Some(Ok(_))));
}

#[test]
fn a_follower_read_waits_for_the_leaders_read_index_and_its_own_apply() {
    let mut sim = Sim::new(3);
    sim.elect(1, 1);
    sim.put(1, b"k", b"v").unwrap();
    let token = sim.node(3).token();
    sim.node(3).post(
        1,
        PeerMsg::Read {
            token,
            lease: false,
        },
    );
    sim.settle();
    assert!(matches!(sim.node(3).answers.get(&token), Some(Ok(_))));
    // The read completed only once the follower applied what the leader had committed.
    let (leader, follower) = (
        sim.node(1).replica(1).raw.raft.raft_log.committed,
        sim.node(3).replica(1).raw.raft.raft_log.applied,
    );
    assert!(follower >= leader, "follower applied {follower} < {leader}");
}

/// One tick round of every replica of range 1, then delivery and settling; returns the plain
/// heartbeats (no read-index context, not a response, not a sleep notice) node 1 sent in it.
fn tick_counting_plain_heartbeats(sim: &mut Sim) -> usize {
    let mut sent = Vec::new();
    for i in 0..sim.nodes.len() {
        let id = sim.nodes[i].id;
        sent.push((id, sim.nodes[i].round(1, 1)));
    }
    let plain = |h: &Heartbeat| !h.response && !h.hibernate && h.context.is_empty();
    let mut n = 0;
    for (from, out) in &sent {
        if from.0 == 1 {
            n += out.tick_heartbeats.iter().filter(|(_, h)| plain(h)).count();
            n += out
                .outbox
                .values()
                .map(|o| o.batch.heartbeats.iter().filter(|h| plain(h)).count())
                .sum::<usize>();
        }
    }
    for (from, mut out) in sent {
        sim.deliver(from, &mut out);
    }
    sim.settle();
    n
}

/// Heartbeats node 1 (the leader) sends over `ticks` ticks, when `busy` with a put proposed
/// in every tick's round (its append goes out with the tick's heartbeats, as on a group that
/// always has entries in flight); and whether a linearizable read during them completed.
fn heartbeats_over(sim: &mut Sim, ticks: usize, busy: bool) -> (usize, bool) {
    let mut heartbeats = 0;
    let token = sim.node(1).token();
    let mut puts = Vec::new();
    for t in 0..ticks {
        if busy {
            let node = sim.node(1);
            let put = node.token();
            let data = node.put_cmd(1, put, format!("k{t}").as_bytes(), b"v");
            node.post(1, PeerMsg::Propose { token: put, data });
            puts.push(put);
        }
        if t == ticks / 2 {
            // A read-index confirmation goes out as a heartbeat with a context: never skipped.
            sim.node(1).post(
                1,
                PeerMsg::Read {
                    token,
                    lease: false,
                },
            );
        }
        heartbeats += tick_counting_plain_heartbeats(sim);
    }
    for put in puts {
        assert!(kv_ok(&sim.node(1).answers[&put]));
    }
    let read = matches!(sim.node(1).answers.get(&token), Some(Ok(_)));
    (heartbeats, read)
}

/// Three nodes with range 1, node 1 its leader, `skip_heartbeats_after_append` as given and
/// hibernation off: a group with no traffic must keep heartbeating here, not fall asleep.
fn heartbeating_three(skip: bool) -> Sim {
    let desc = descriptor(1, b"", b"", &[1, 2, 3]);
    let nodes = (1..=3)
        .map(|id| {
            let mut node = Node::new(id, Arc::new(KvStateMachine));
            node.config.skip_heartbeats_after_append = skip;
            node.config.hibernate = false;
            node.bootstrap(&desc);
            node
        })
        .collect();
    let mut sim = Sim::of(nodes);
    sim.elect(1, 1);
    sim
}

#[test]
fn a_busy_leader_sends_no_heartbeat_a_follower_just_had_an_append_for() {
    for skip in [true, false] {
        let mut sim = heartbeating_three(skip);
        // heartbeat_tick is 2: 10 ticks hold 5 heartbeat broadcasts to 2 followers.
        let (busy, busy_read) = heartbeats_over(&mut sim, 10, true);
        // When the burst ends, the next heartbeat (two ticks at most) tells the followers the
        // commit of its last entries, which no append carried.
        for _ in 0..2 {
            tick_counting_plain_heartbeats(&mut sim);
        }
        let commit = sim.node(1).replica(1).raw.raft.raft_log.committed;
        for id in 2..=3 {
            let known = sim.node(id).replica(1).raw.raft.raft_log.committed;
            assert_eq!(known, commit, "node {id} knows the commit (skip {skip})");
        }
        let (idle, idle_read) = heartbeats_over(&mut sim, 10, false);
        assert!(busy_read && idle_read, "reads complete (skip {skip})");
        assert!(idle >= 8, "an idle leader heartbeats (skip {skip}): {idle}");
        if skip {
            assert_eq!(
                busy, 0,
                "a follower that had an append gets no plain heartbeat"
            );
        } else {
            assert!(
                busy >= 8,
                "every heartbeat is sent when not skipping: {busy}"
            );
        }
        // Followers kept their leader throughout: no election while heartbeats were skipped.
        let term = sim.node(1).replica(1).raw.raft.term;
        for id in 2..=3 {
            let raft = &sim.node(id).replica(1).raw.raft;
            assert_eq!(
                (raft.leader_id, raft.term),
                (1, term),
                "node {id} (skip {skip})"
            );
        }
    }
}

/// One tick of every replica of range 1, then rounds until nothing is in flight (bounded),
/// as `Sim::step` and `settle` run them; returns the empty appends node 1 sent. With `lose`,
/// the appends with entries node 1 sends are lost on the way.
fn tick_counting_empty_appends(sim: &mut Sim, lose: bool) -> usize {
    let mut empty = 0;
    for pass in 0..200 {
        let ticks = u32::from(pass == 0);
        let mut sent = Vec::new();
        for i in 0..sim.nodes.len() {
            let id = sim.nodes[i].id;
            if ticks == 0 && !sim.nodes[i].scheduled.remove(&1) {
                continue;
            }
            let mut out = sim.nodes[i].round(1, ticks);
            if id.0 == 1 {
                for outgoing in out.outbox.values_mut() {
                    outgoing.batch.messages.retain(|env| {
                        let m = raft::prelude::Message::decode(&env.message[..]).unwrap();
                        if m.get_msg_type() != MessageType::MsgAppend {
                            return true;
                        }
                        empty += usize::from(m.entries.is_empty());
                        !lose || m.entries.is_empty()
                    });
                }
            }
            sent.push((id, out));
        }
        let mut any = false;
        for (from, mut out) in sent {
            any |= sim.deliver(from, &mut out);
        }
        if !any && sim.nodes.iter().all(|n| n.scheduled.is_empty()) {
            return empty;
        }
    }
    panic!("the simulation did not settle in 200 rounds");
}

#[test]
fn a_heartbeat_answered_with_entries_in_flight_brings_no_empty_append_yet_lost_entries_arrive() {
    for skip in [true, false] {
        let mut sim = heartbeating_three(skip);
        assert!(kv_ok(&sim.put(1, b"before", b"v")));
        // A put whose entries never reach the followers, while heartbeats do: to the leader
        // its entries are in flight, and each heartbeat answer says they are not acknowledged.
        let node = sim.node(1);
        let put = node.token();
        let data = node.put_cmd(1, put, b"k", b"v");
        node.post(1, PeerMsg::Propose { token: put, data });
        let mut empty = 0;
        // heartbeat_tick is 2: three heartbeat intervals, within which entries sent count as
        // in flight.
        for _ in 0..6 {
            empty += tick_counting_empty_appends(&mut sim, true);
        }
        assert!(
            !sim.node(1).answers.contains_key(&put),
            "the put cannot commit yet (skip {skip})"
        );
        if skip {
            assert_eq!(empty, 0, "no empty append while entries are in flight");
        } else {
            assert!(empty >= 2, "raft answers heartbeat answers: {empty}");
        }
        // The loss is found all the same: once no entries went to a follower for a while, its
        // heartbeat answer brings the empty append raft probes with, and the entries follow.
        for _ in 0..30 {
            if sim.node(1).answers.contains_key(&put) {
                break;
            }
            tick_counting_empty_appends(&mut sim, false);
        }
        assert!(
            kv_ok(&sim.node(1).answers[&put]),
            "the lost put commits (skip {skip})"
        );
        let commit = sim.node(1).replica(1).raw.raft.raft_log.committed;
        for _ in 0..4 {
            tick_counting_empty_appends(&mut sim, false);
        }
        for id in 2..=3 {
            let known = sim.node(id).replica(1).raw.raft.raft_log.committed;
            assert!(known >= commit, "node {id} learns the commit (skip {skip})");
        }
    }
}

#[test]
fn a_read_without_a_known_leader_is_answered_not_leader() {
    let mut sim = Sim::new(3);
    let token = sim.node(2).token();
    sim.node(2).post(
        1,
        PeerMsg::Read {
            token,
            lease: false,
        },
    );
    sim.settle();
    assert!(matches!(
        sim.node(2).answers.get(&token),
        Some(Err(Error::NotLeader { .. }))
    ));
}

#[test]
fn lease_reads_are_refused_when_the_config_turns_them_off() {
    let mut sim = Sim::new(1);
    sim.node(1).config.lease_reads = false;
    sim.elect(1, 1);
    let token = sim.node(1).token();
    sim.node(1).post(1, PeerMsg::Read { token, lease: true });
    sim.settle();
    assert!(matches!(
        sim.node(1).answers.get(&token),
        Some(Err(Error::InvalidCommand(_)))
    ));
}

// ---- forwarded proposals ----

/// Node 3 forwards a put to leader 1, which receives it; then node `cut` is cut off. Returns
/// the proposal's token on node 3.
fn forward_then_cut_off(sim: &mut Sim, cut: u64) -> u64 {
    sim.elect(1, 1);
    let node = sim.node(3);
    let token = node.token();
    let data = node.put_cmd(1, token, b"f", b"x");
    node.post(1, PeerMsg::Propose { token, data });
    // Node 3's round forwards it; the delivery puts it in node 1's mailbox.
    sim.step(0);
    sim.cut.insert(cut);
    sim.settle();
    assert!(!sim.node(3).answers.contains_key(&token));
    token
}

#[test]
fn a_forwarded_proposal_is_answered_at_once_when_its_follower_installs_a_snapshot() {
    let mut sim = Sim::new(3);
    let token = forward_then_cut_off(&mut sim, 3);
    assert_eq!(sim.node(1).engine.get(b"f").unwrap(), Some(b"x".to_vec()));
    // The leader compacts its log: node 3 can only catch up by a snapshot, which holds the
    // forwarded put; node 3 never applies its entry one by one.
    let compact = sim.node(1).token();
    sim.node(1).post(1, PeerMsg::CompactLog { token: compact });
    sim.settle();
    sim.cut.clear();
    sim.tick_until("node 3 installs a snapshot", |s| s.snapshots > 0);
    sim.settle();
    assert_eq!(sim.node(3).engine.get(b"f").unwrap(), Some(b"x".to_vec()));
    // Answered (outcome unknown) in the round that installed the snapshot, not at the
    // proposal timeout, which never passes in this test.
    assert!(
        matches!(
            sim.node(3).answers.get(&token),
            Some(Err(Error::ProposalDropped))
        ),
        "{:?}",
        sim.node(3).answers.get(&token)
    );
}

#[test]
fn a_forwarded_proposal_is_answered_at_once_when_its_follower_stops_following_the_leader() {
    let mut sim = Sim::new(3);
    // The leader appended the put but is cut off before anyone else has it: nodes 2 and 3
    // elect a new leader, whose log does not hold it.
    let token = forward_then_cut_off(&mut sim, 1);
    sim.tick_until("node 3 stops following node 1", |s| {
        s.nodes[2].replica(1).raw.raft.leader_id != 1
    });
    assert!(
        matches!(
            sim.node(3).answers.get(&token),
            Some(Err(Error::ProposalDropped))
        ),
        "{:?}",
        sim.node(3).answers.get(&token)
    );
}
