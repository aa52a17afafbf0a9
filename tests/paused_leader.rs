//! Reads served by a leader that was paused (a stopped process: SIGSTOP, a VM or GC stall)
//! while the others elected a new leader and took writes. "Paused" here means: its clock
//! stopped (`NodeGroup::pause_ticker`), its pings silenced (`MemNetwork::set_silent`) and
//! everything sent to it held by a `HoldFilter`,
//! then handed to it in the order that would make it answer with what it knew before the
//! pause. And, for contrast, a leader whose lease holds serves lease reads without asking.
//! Every wait is bounded and polls a condition.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use flotilla::proto::meta::RangeDescriptor;
use flotilla::testing::{test_config, wait_until, Cluster};
use flotilla::transport::{FilterId, HoldFilter, Packet, PartitionFilter, Payload};
use flotilla::{Error, NodeGroupConfig, NodeId, RangeId, ReadConsistency, StateRole, StoreConfig};
use prost_raft::Message as _;
use raft::prelude::{Message, MessageType};

const T: Duration = Duration::from_secs(20);
const KEY: &[u8] = b"k5";
const OLD: &[u8] = b"A";
const NEW: &[u8] = b"B";

/// Elections after 300-600ms without a leader: on a loaded 2-core machine, a 100ms timeout
/// makes leaders flap, and these tests need node 2 to lead until they pause it.
fn stable_config(node: u64) -> NodeGroupConfig {
    NodeGroupConfig {
        election_tick: 30,
        heartbeat_tick: 3,
        ..test_config(node)
    }
}

/// The raft message a packet carries, if it is one (not a coalesced heartbeat).
fn raft_message(p: &Packet) -> Option<Message> {
    match &p.payload {
        Payload::Message(m) => Message::decode(&m.message[..]).ok(),
        Payload::Heartbeat(_) => None,
    }
}

/// The read-index context of a heartbeat (`response`: of a heartbeat response, that is an
/// acknowledgement), coalesced or not; `None` for anything else or an empty context.
fn heartbeat_context(p: &Packet, response: bool) -> Option<Vec<u8>> {
    let ctx = match &p.payload {
        Payload::Heartbeat(h) => (h.response == response).then(|| h.context.to_vec())?,
        Payload::Message(_) => {
            let want = if response {
                MessageType::MsgHeartbeatResponse
            } else {
                MessageType::MsgHeartbeat
            };
            let m = raft_message(p).filter(|m| m.get_msg_type() == want)?;
            m.context.to_vec()
        }
    };
    (!ctx.is_empty()).then_some(ctx)
}

/// A read's outcome, with the value as text.
fn show(r: &Result<Option<Vec<u8>>, Error>) -> String {
    match r {
        Ok(Some(v)) => format!("{:?}", String::from_utf8_lossy(v)),
        Ok(None) => "nothing".into(),
        Err(e) => format!("error {e}"),
    }
}

fn is_read_index(p: &Packet) -> bool {
    raft_message(p).is_some_and(|m| m.get_msg_type() == MessageType::MsgReadIndex)
}

/// Three nodes and one range led by node 2, with `KEY = OLD` written through it. The clocks
/// of nodes 1 and 3 are stopped: they follow node 2 and never campaign until the test
/// restarts them, so no election moves leadership while a test sets its scene up, however
/// slow the machine. Returns the range and node 2's term.
async fn led_by_node_2(config: fn(u64) -> NodeGroupConfig) -> (Arc<Cluster>, RangeId, u64) {
    let c = Arc::new(Cluster::with_config(3, config, StoreConfig::default()));
    let d: RangeDescriptor =
        flotilla::layout::range_layout(1, &flotilla::testing::node_ids(3)).remove(0);
    let range = d.id();
    for n in 1..=3 {
        c.node(n).bootstrap_range(d.clone()).expect("bootstrap");
    }
    c.node(1).pause_ticker(true);
    c.node(3).pause_ticker(true);
    c.node(2).campaign(range).expect("campaign");
    let led = wait_until(T, || c.leader_of(range) == Some(2)).await;
    assert!(led, "node 2 was not elected");
    let deadline = Instant::now() + T;
    while let Err(e) = c.node(2).put(KEY, OLD).await {
        assert!(Instant::now() < deadline, "no write through node 2: {e}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let st = c.node(2).status(range).expect("status of node 2");
    assert_eq!(
        st.role,
        StateRole::Leader,
        "node 2 lost leadership in setup"
    );
    let following = wait_until(T, || {
        [1, 3].into_iter().all(|n| {
            c.node(n)
                .status(range)
                .is_ok_and(|s| s.leader == 2 && s.term == st.term)
        })
    })
    .await;
    assert!(following, "nodes 1 and 3 do not follow node 2");
    (c, range, st.term)
}

/// Restarts the clocks of nodes 1 and 3: from now on they time out and elect a leader if
/// they do not hear from node 2.
fn restart_followers_clocks(c: &Cluster) {
    c.node(1).pause_ticker(false);
    c.node(3).pause_ticker(false);
}

/// Waits until node 1 or 3 leads `range` in a term after `term`, writes `KEY = NEW` through
/// it and reads it back linearizably through node 1: from then on, every read that begins
/// must see `NEW`. (Not `Cluster::put`: it could pick node 2, which still claims to lead and,
/// its clock stopped, would never time the write out.)
async fn elect_another_leader_and_write(c: &Cluster, range: RangeId, term: u64) {
    let new_leader = || {
        [1, 3].into_iter().find(|&n| {
            c.node(n)
                .status(range)
                .is_ok_and(|s| s.role == StateRole::Leader && s.term > term)
        })
    };
    let deadline = Instant::now() + T;
    loop {
        assert!(
            Instant::now() < deadline,
            "nodes 1 and 3 did not elect a leader and take a write while node 2 was paused"
        );
        let Some(n) = new_leader() else {
            tokio::time::sleep(Duration::from_millis(20)).await;
            continue;
        };
        match tokio::time::timeout(Duration::from_secs(5), c.node(n).put(KEY, NEW)).await {
            Ok(Ok(())) => break,
            _ => tokio::time::sleep(Duration::from_millis(20)).await,
        }
    }
    let read = c.get_from(1, KEY, T).await.expect("read through node 1");
    assert_eq!(read.as_deref(), Some(NEW), "node 1 does not see the write");
}

/// Returns once `node`'s replica of `range` ran a round that started after this call: an
/// empty membership change is refused there, with no effect. Two in a row tell that every
/// answer of the round that handled what was in the mailbox before went out.
async fn mailbox_round_trip(c: &Cluster, node: u64, range: RangeId) {
    let refused = c.node(node).change_membership(range, Vec::new()).await;
    assert!(
        matches!(refused, Err(Error::AdminRefused(_))),
        "an empty membership change was not refused: {refused:?}"
    );
}

/// Hands node 2 everything a hold filter kept and removes it; packets held between the
/// two deliveries (the filter still ran) go too.
fn release(c: &Cluster, hold: &HoldFilter, id: FilterId) {
    c.net
        .deliver(hold.take_all())
        .expect("deliver held packets");
    c.net.remove_filter(id);
    c.net
        .deliver(hold.take_all())
        .expect("deliver held packets");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_paused_leader_never_confirms_a_read_with_acknowledgements_older_than_the_read() {
    let (c, range, term) = led_by_node_2(stable_config).await;

    // Node 2's clock stops first, so that it neither steps down nor sends heartbeats of its
    // own while the acknowledgements of node 1's read are held.
    c.node(2).pause_ticker(true);
    // A paused process sends no pings either: node liveness stops hearing it.
    c.net.set_silent(NodeId(2), true);
    let paused = Arc::new(AtomicBool::new(false));
    let hold = {
        let paused = paused.clone();
        HoldFilter::new(move |p| {
            p.to == NodeId(2)
                && (paused.load(Ordering::Acquire) || heartbeat_context(p, true).is_some())
        })
    };
    let held_id = c.net.add_filter(Box::new(hold.clone()));
    // Nodes 1 and 3 may not elect a leader before node 1 asked node 2 again, whatever their
    // clocks do.
    let cut = c
        .net
        .add_filter(Box::new(PartitionFilter::new([NodeId(1)], [NodeId(3)])));

    // A linearizable read through node 1, a follower: node 2 queues it and sends heartbeats
    // with its context; both acknowledgements wait in node 2's "socket", and so does the
    // retry node 1 sends when no answer comes.
    let follower_read = {
        let c = c.clone();
        tokio::spawn(async move { c.node(1).get(KEY, ReadConsistency::Linearizable).await })
    };
    let acked = wait_until(T, || {
        let held = hold.held();
        [1, 3].into_iter().all(|n| {
            held.iter()
                .any(|p| p.from == NodeId(n) && heartbeat_context(p, true).is_some())
        })
    })
    .await;
    assert!(
        acked,
        "node 2 never asked for acknowledgements of node 1's read"
    );
    // Node 2 is paused now. Node 1's clock runs again: it asks node 2 again after two
    // heartbeat intervals, long before an election timeout.
    paused.store(true, Ordering::Release);
    restart_followers_clocks(&c);
    let retried = wait_until(T, || {
        hold.held()
            .iter()
            .any(|p| p.from == NodeId(1) && is_read_index(p))
    })
    .await;
    assert!(
        retried,
        "node 1 never asked node 2 again for its read index"
    );
    c.net.remove_filter(cut);

    elect_another_leader_and_write(&c, range, term).await;

    // Node 2 resumes, still leader of the old term as far as it knows. A read arrives; what
    // node 2 sends stays held too, so that we see it queued the read (its heartbeats carry
    // the read's context) without the others answering yet.
    let out = HoldFilter::new(|p| p.from == NodeId(2));
    let out_id = c.net.add_filter(Box::new(out.clone()));
    let stale_read = {
        let c = c.clone();
        tokio::spawn(async move { c.node(2).get(KEY, ReadConsistency::Linearizable).await })
    };
    let queued = wait_until(T, || {
        out.held()
            .iter()
            .any(|p| heartbeat_context(p, false).is_some())
    })
    .await;
    assert!(
        queued,
        "node 2 never asked for acknowledgements of its read"
    );

    // Then what waited in its socket, in an order a resumed process may read it: node 1's
    // packets up to its retry (its acknowledgement answers the first request; the retry is
    // queued behind the new read), then node 3's acknowledgement of the first request.
    let mut retry_seen = false;
    let from_1 = hold.take(|p| {
        if p.from != NodeId(1) || retry_seen {
            return false;
        }
        retry_seen = is_read_index(p);
        true
    });
    assert!(retry_seen, "node 1's retry is not among the held packets");
    c.net.deliver(from_1).expect("deliver node 1's packets");
    let mut first = true;
    let ack_3 = hold.take(|p| p.from == NodeId(3) && std::mem::take(&mut first));
    assert!(
        ack_3.len() == 1 && heartbeat_context(&ack_3[0], true).is_some(),
        "node 3's first held packet is not its acknowledgement: {ack_3:?}"
    );
    c.net
        .deliver(ack_3)
        .expect("deliver node 3's acknowledgement");

    // If node 2 confirmed the read now, its answer must be taken before node 2 can learn
    // the new value: the read's barrier is passed, but its value is read after it.
    assert!(
        c.net.wait_delivered(NodeId(2), T),
        "node 2 did not receive node 3's acknowledgement"
    );
    mailbox_round_trip(&c, 2, range).await;
    mailbox_round_trip(&c, 2, range).await;
    let confirmed = c.node(2).node_status().pending_requests == 0;
    let mut stale_read = stale_read;
    let early = if confirmed {
        Some(tokio::time::timeout(T, &mut stale_read).await)
    } else {
        None
    };

    // Everything else, and node 2's clock runs again: it learns of the new term.
    paused.store(false, Ordering::Release);
    release(&c, &hold, held_id);
    release(&c, &out, out_id);
    c.node(2).pause_ticker(false);
    // Resumed, it pings again.
    c.net.set_silent(NodeId(2), false);

    let got = match early {
        Some(early) => early,
        None => tokio::time::timeout(T, stale_read).await,
    }
    .expect("the read through node 2 never finished")
    .expect("read task");
    assert!(
        matches!(&got, Ok(Some(v)) if v == NEW),
        "a linearizable read through node 2 that began after {:?} was acknowledged returned \
         {}",
        String::from_utf8_lossy(NEW),
        show(&got),
    );
    let earlier = tokio::time::timeout(T, follower_read)
        .await
        .expect("node 1's first read never finished")
        .expect("read task");
    assert!(earlier.is_ok(), "node 1's first read failed: {earlier:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_paused_leader_whose_lease_ran_out_serves_no_lease_read() {
    let (c, range, term) = led_by_node_2(stable_config).await;
    let lease_read = c.node(2).get(KEY, ReadConsistency::Lease).await;
    assert_eq!(
        lease_read.expect("lease read before the pause").as_deref(),
        Some(OLD)
    );

    // Paused: no clock, nothing heard.
    c.node(2).pause_ticker(true);
    // A paused process sends no pings either: node liveness stops hearing it.
    c.net.set_silent(NodeId(2), true);
    let hold = HoldFilter::new(|p| p.to == NodeId(2));
    let held_id = c.net.add_filter(Box::new(hold.clone()));
    restart_followers_clocks(&c);

    elect_another_leader_and_write(&c, range, term).await;

    // Resumed, before its ticker ran or it read its socket: a lease read arrives. It must not
    // be served from the lease (which ran out during the pause); a leader without a lease
    // asks a quorum, and its heartbeats, held here, show it did.
    let out = HoldFilter::new(|p| p.from == NodeId(2));
    let out_id = c.net.add_filter(Box::new(out.clone()));
    let read = {
        let c = c.clone();
        tokio::spawn(async move { c.node(2).get(KEY, ReadConsistency::Lease).await })
    };
    let handled = wait_until(T, || {
        read.is_finished()
            || out
                .held()
                .iter()
                .any(|p| heartbeat_context(p, false).is_some())
    })
    .await;
    assert!(handled, "node 2 never handled the lease read");

    release(&c, &hold, held_id);
    release(&c, &out, out_id);
    c.node(2).pause_ticker(false);
    // Resumed, it pings again.
    c.net.set_silent(NodeId(2), false);

    let got = tokio::time::timeout(T, read)
        .await
        .expect("the lease read through node 2 never finished")
        .expect("read task");
    assert!(
        matches!(&got, Ok(Some(v)) if v == NEW),
        "a lease read through node 2 that began after {:?} was acknowledged returned {}",
        String::from_utf8_lossy(NEW),
        show(&got),
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_leader_whose_lease_holds_serves_lease_reads_without_asking_a_quorum() {
    // A 3s election timeout, so a lease of almost as long outlasts a slow machine's pauses.
    fn long_lease(node: u64) -> NodeGroupConfig {
        NodeGroupConfig {
            election_tick: 300,
            ..stable_config(node)
        }
    }
    let (c, _, _) = led_by_node_2(long_lease).await;
    // No lease yet: the first lease read asks a quorum, which starts the lease.
    let first = c.node(2).get(KEY, ReadConsistency::Lease).await;
    assert_eq!(first.expect("first lease read").as_deref(), Some(OLD));

    // From now on node 2 hears no acknowledgement: a read that asked would wait.
    let hold = HoldFilter::new(|p| p.to == NodeId(2) && heartbeat_context(p, true).is_some());
    let held_id = c.net.add_filter(Box::new(hold.clone()));
    let leased = tokio::time::timeout(
        Duration::from_secs(2),
        c.node(2).get(KEY, ReadConsistency::Lease),
    )
    .await
    .expect("a lease read waited for a quorum while the lease held");
    assert_eq!(leased.expect("lease read").as_deref(), Some(OLD));
    release(&c, &hold, held_id);
}
