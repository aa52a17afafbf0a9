//! Each filter's behaviour through the network, and how filters compose.

use std::time::{Duration, Instant};

use flotilla_proto::transport::Heartbeat;
use flotilla_proto::NodeId;

use super::tests::{batch, msg, Recorder, N1, N2, N3, WAIT};
use super::{MemNetwork, MemTransport};
use crate::filter::{
    DelayFilter, DropFilter, DuplicateFilter, Filter, FilterKind, HoldFilter, IsolateFilter,
    PartitionFilter, PredicateFilter, ReorderFilter,
};
use crate::{Transport, TransportError};

/// Three nodes, each recording what it receives.
struct Cluster {
    net: std::sync::Arc<MemNetwork>,
    transports: Vec<MemTransport>,
    recorders: Vec<std::sync::Arc<Recorder>>,
}

impl Cluster {
    fn new() -> Self {
        let net = MemNetwork::new();
        let recorders: Vec<_> = (0..3).map(|_| Recorder::new()).collect();
        let transports = recorders
            .iter()
            .enumerate()
            .map(|(i, r)| net.register(NodeId(i as u64 + 1), r.clone()))
            .collect();
        Self {
            net,
            transports,
            recorders,
        }
    }

    fn t(&self, n: NodeId) -> &MemTransport {
        &self.transports[n.0 as usize - 1]
    }

    fn rec(&self, n: NodeId) -> &Recorder {
        &self.recorders[n.0 as usize - 1]
    }

    /// Sends one message per batch, `seqs` in order.
    fn send_seqs(&self, from: NodeId, to: NodeId, seqs: impl IntoIterator<Item = u64>) {
        for s in seqs {
            self.t(from).send(to, batch(vec![msg(1, s)])).unwrap();
        }
    }

    /// Waits until every packet sent so far was delivered or dropped by a filter.
    fn settle(&self, sent: u64) {
        assert!(
            self.net
                .wait_for_stats(WAIT, |s| s.delivered() + s.dropped_by_filters()
                    == sent + s.duplicated),
            "not settled: {:?}",
            self.net.stats()
        );
    }
}

#[test]
fn drop_filter_is_random_but_repeatable() {
    let run = || {
        let c = Cluster::new();
        c.net.add_filter(Box::new(DropFilter::new(0.3, 11)));
        c.send_seqs(N1, N2, 0..1000);
        c.settle(1000);
        (c.rec(N2).seqs_from(N1), c.net.stats())
    };
    let (first, stats) = run();
    let dropped = stats.dropped_by(FilterKind::Drop);
    assert!((200..400).contains(&dropped), "{dropped} of 1000 at p=0.3");
    assert_eq!(first.len() as u64 + dropped, 1000);
    assert!(
        first.windows(2).all(|w| w[0] < w[1]),
        "survivors stay in order"
    );
    assert_eq!(run().0, first, "same seed, same traffic: same losses");
}

#[test]
fn delay_filter_holds_packets_and_keeps_order() {
    let c = Cluster::new();
    let delay = Duration::from_millis(50);
    let id = c.net.add_filter(Box::new(DelayFilter::new(delay)));
    let start = Instant::now();
    c.send_seqs(N1, N2, 0..5);
    // Filters apply when the destination takes a batch in: wait until all five are held.
    assert!(c.net.wait_for_stats(WAIT, |s| s.delayed == 5));
    // Removing the filter must not let later packets overtake the held ones.
    assert!(c.net.remove_filter(id));
    assert!(!c.net.remove_filter(id));
    c.send_seqs(N1, N2, 5..10);
    c.settle(10);
    assert!(start.elapsed() >= delay);
    assert_eq!(c.rec(N2).seqs_from(N1), (0..10).collect::<Vec<_>>());
    assert_eq!(c.net.stats().delayed, 5);
}

#[test]
fn hold_filter_keeps_packets_until_the_test_delivers_them_in_its_own_order() {
    let c = Cluster::new();
    let hold = HoldFilter::new(|p| p.to == N2);
    let id = c.net.add_filter(Box::new(hold.clone()));
    c.send_seqs(N1, N2, 0..3);
    c.send_seqs(N3, N2, 10..13);
    c.send_seqs(N1, N3, 20..21);
    assert!(c
        .net
        .wait_for_stats(WAIT, |s| s.held == 6 && s.delivered_messages == 1));
    assert!(c.rec(N2).seqs().is_empty());
    assert_eq!(c.t(N1).queued_bytes(N2), 0, "held packets hold no budget");
    let seq = |p: &crate::Packet| match &p.payload {
        crate::Payload::Message(m) => super::tests::seq_of(m),
        crate::Payload::Heartbeat(_) => unreachable!("only messages were sent"),
    };
    let mut held: Vec<u64> = hold.held().iter().map(seq).collect();
    held.sort_unstable();
    assert_eq!(held, vec![0, 1, 2, 10, 11, 12]);

    // Node 3's second packet first, then all of node 1's, then the rest; the filter is still
    // installed and holds neither the released packets nor (once removed) new ones.
    let first = hold.take(|p| seq(p) == 11);
    c.net.deliver(first).unwrap();
    assert!(c.net.wait_delivered(N2, WAIT));
    assert_eq!(c.rec(N2).seqs(), vec![(3, 11)]);
    c.net.deliver(hold.take(|p| p.from == N1)).unwrap();
    assert!(c.net.wait_for_stats(WAIT, |s| s.delivered_messages == 5));
    assert!(c.net.remove_filter(id));
    c.net.deliver(hold.take_all()).unwrap();
    c.send_seqs(N1, N2, 3..4);
    assert!(c.net.wait_for_stats(WAIT, |s| s.delivered_messages == 8));
    let got: Vec<u64> = c.rec(N2).seqs().into_iter().map(|(_, s)| s).collect();
    assert_eq!(got, vec![11, 0, 1, 2, 10, 12, 3]);
    assert!(hold.held().is_empty());
    assert_eq!(c.net.stats().held, 6);
    assert_eq!(c.net.stats().dropped_by_filters(), 0);

    // Nothing is waited for on a node that is gone, and nothing can be delivered to it.
    assert!(!c.net.wait_delivered(NodeId(9), WAIT));
    let lost = crate::Packet {
        from: N1,
        to: NodeId(9),
        payload: crate::Payload::Message(super::tests::msg(1, 99)),
    };
    assert!(matches!(
        c.net.deliver(vec![lost]),
        Err(TransportError::UnknownNode(_))
    ));
}

#[test]
fn duplicate_filter_delivers_copies_right_after_the_original() {
    let c = Cluster::new();
    c.net.add_filter(Box::new(DuplicateFilter::new(1.0, 5)));
    c.send_seqs(N1, N2, 0..10);
    c.settle(10);
    let expected: Vec<u64> = (0..10).flat_map(|s| [s, s]).collect();
    assert_eq!(c.rec(N2).seqs_from(N1), expected);
    let stats = c.net.stats();
    assert_eq!((stats.duplicated, stats.delivered_messages), (10, 20));
    assert_eq!(
        c.t(N1).queued_bytes(N2),
        0,
        "copies' bytes are released too"
    );
}

#[test]
fn reorder_filter_shuffles_within_its_window() {
    let c = Cluster::new();
    c.net
        .add_filter(Box::new(ReorderFilter::new(Duration::from_millis(30), 9)));
    c.send_seqs(N1, N2, 0..100);
    c.settle(100);
    let got = c.rec(N2).seqs_from(N1);
    let mut sorted = got.clone();
    sorted.sort_unstable();
    assert_eq!(
        sorted,
        (0..100).collect::<Vec<_>>(),
        "nothing lost or added"
    );
    assert_ne!(
        got, sorted,
        "100 packets with random holds came out in order"
    );
    assert_eq!(c.net.stats().reordered, 100);
}

#[test]
fn partition_cuts_links_until_removed() {
    let c = Cluster::new();
    let id = c
        .net
        .add_filter(Box::new(PartitionFilter::new([N1], [N2, N3])));
    assert!(!c.t(N1).is_reachable(N2));
    assert!(!c.t(N3).is_reachable(N1));
    assert!(c.t(N2).is_reachable(N3));
    c.send_seqs(N1, N2, 0..3);
    c.send_seqs(N2, N1, 0..3);
    c.send_seqs(N2, N3, 0..3);
    c.settle(9);
    assert!(c.rec(N2).seqs_from(N1).is_empty());
    assert!(c.rec(N1).seqs_from(N2).is_empty());
    assert_eq!(c.rec(N3).seqs_from(N2), vec![0, 1, 2]);
    assert_eq!(c.net.stats().dropped_by(FilterKind::Partition), 6);

    assert!(c.net.remove_filter(id));
    assert!(c.t(N1).is_reachable(N2));
    c.send_seqs(N1, N2, 3..4);
    c.settle(10);
    assert_eq!(c.rec(N2).seqs_from(N1), vec![3]);
}

#[test]
fn isolate_cuts_one_node_off() {
    let c = Cluster::new();
    c.net.add_filter(Box::new(IsolateFilter::new(N3)));
    assert!(!c.t(N3).is_reachable(N1));
    assert!(!c.t(N1).is_reachable(N3));
    assert!(c.t(N1).is_reachable(N2));
    c.send_seqs(N3, N1, 0..2);
    c.send_seqs(N2, N3, 0..2);
    c.send_seqs(N1, N2, 0..2);
    c.settle(6);
    assert_eq!(c.net.stats().dropped_by(FilterKind::Isolate), 4);
    assert_eq!(c.rec(N2).seqs_from(N1), vec![0, 1]);
    assert!(c.rec(N3).seqs().is_empty());
    c.net.clear_filters();
    assert!(c.t(N3).is_reachable(N1));
}

#[test]
fn predicate_filter_drops_part_of_a_batch() {
    let c = Cluster::new();
    // All raft messages of group 5 are lost; its heartbeats and other groups get through.
    c.net
        .add_filter(Box::new(PredicateFilter::messages(|_, _, m| {
            m.range_id == 5
        })));
    let mut b = batch(vec![msg(5, 0), msg(6, 1), msg(5, 2), msg(6, 3)]);
    b.heartbeats.push(Heartbeat {
        range_id: 5,
        ..Default::default()
    });
    c.t(N1).send(N2, b).unwrap();
    c.settle(5);
    let got = c.rec(N2).batches();
    let groups: Vec<u64> = got
        .iter()
        .flat_map(|b| b.messages.iter().map(|m| m.range_id))
        .collect();
    assert_eq!(groups, vec![6, 6]);
    assert_eq!(got.iter().map(|b| b.heartbeats.len()).sum::<usize>(), 1);
    assert_eq!(c.net.stats().dropped_by(FilterKind::Predicate), 2);
}

#[test]
fn heartbeat_predicate_spares_raft_messages() {
    let c = Cluster::new();
    c.net
        .add_filter(Box::new(PredicateFilter::heartbeats(|_, to, _| to == N2)));
    let mut b = batch(vec![msg(1, 0)]);
    b.heartbeats.push(Heartbeat::default());
    c.t(N1).send(N2, b.clone()).unwrap();
    c.t(N1).send(N3, b).unwrap();
    c.settle(4);
    let stats = c.net.stats();
    assert_eq!(
        (stats.delivered_messages, stats.delivered_heartbeats),
        (2, 1)
    );
    assert_eq!(stats.dropped_by(FilterKind::Predicate), 1);
}

#[test]
fn filters_compose_in_installation_order() {
    let c = Cluster::new();
    // Copies made by the first filter go through the second: each group 5 message is
    // dropped twice, each other one delivered twice.
    c.net.add_filter(Box::new(DuplicateFilter::new(1.0, 1)));
    c.net
        .add_filter(Box::new(PredicateFilter::messages(|_, _, m| {
            m.range_id == 5
        })));
    // A scoped delay: only packets to N3 wait.
    let delay = Duration::from_millis(40);
    c.net
        .add_filter(Box::new(DelayFilter::new(delay).when(|p| p.to == N3)));
    let start = Instant::now();
    c.t(N1).send(N2, batch(vec![msg(5, 0), msg(6, 1)])).unwrap();
    c.settle(2);
    let stats = c.net.stats();
    assert_eq!(stats.dropped_by(FilterKind::Predicate), 2);
    assert_eq!(stats.delivered_messages, 2);
    assert_eq!(c.rec(N2).seqs_from(N1), vec![1, 1]);
    assert_eq!(stats.delayed, 0);

    c.t(N1).send(N3, batch(vec![msg(6, 2)])).unwrap();
    c.settle(3);
    assert!(start.elapsed() >= delay);
    assert_eq!(c.rec(N3).seqs_from(N1), vec![2, 2]);
    assert_eq!(c.net.stats().delayed, 2);
}

#[test]
fn filters_run_on_the_delivery_thread() {
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;

    let c = Cluster::new();
    let sender = std::thread::current().id();
    let on_sender = Arc::new(AtomicBool::new(false));
    {
        let on_sender = on_sender.clone();
        c.net.add_filter(Box::new(PredicateFilter::new(move |_| {
            if std::thread::current().id() == sender {
                on_sender.store(true, Ordering::Release);
            }
            false
        })));
    }
    c.send_seqs(N1, N2, 0..20);
    c.settle(20);
    assert!(!on_sender.load(Ordering::Acquire));
}
