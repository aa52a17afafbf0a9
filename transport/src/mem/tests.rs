//! Tests of the in-memory network without filters: ordering, merging, back-pressure, the node
//! lifecycle, and that `send` never runs a handler inline.
//!
//! Every wait is bounded and waits for an observable outcome (a counter, a channel message);
//! none sleeps and hopes.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread::ThreadId;
use std::time::Duration;

use bytes::Bytes;
use crossbeam_channel::{Receiver, Sender};
use flotilla_proto::transport::{Heartbeat, NodeBatch, RaftMessage};
use flotilla_proto::NodeId;
use parking_lot::Mutex;

use super::{MemConfig, MemNetwork, MemTransport};
use crate::{BatchHandler, PartitionFilter, Transport, TransportError};

/// Upper bound of every wait; generous so that a loaded CI machine does not fail tests.
pub(super) const WAIT: Duration = Duration::from_secs(20);

pub(super) const N1: NodeId = NodeId(1);
pub(super) const N2: NodeId = NodeId(2);
pub(super) const N3: NodeId = NodeId(3);

/// A raft message of `group` carrying a sequence number, so tests can check order.
pub(super) fn msg(group: u64, seq: u64) -> RaftMessage {
    RaftMessage {
        range_id: group,
        message: Bytes::copy_from_slice(&seq.to_be_bytes()),
        ..Default::default()
    }
}

pub(super) fn seq_of(m: &RaftMessage) -> u64 {
    u64::from_be_bytes(m.message[..8].try_into().expect("8-byte sequence number"))
}

pub(super) fn batch(msgs: Vec<RaftMessage>) -> NodeBatch {
    NodeBatch {
        messages: msgs,
        ..Default::default()
    }
}

/// Records every batch it receives.
#[derive(Default)]
pub(super) struct Recorder {
    batches: Mutex<Vec<NodeBatch>>,
}

impl Recorder {
    pub(super) fn new() -> Arc<Self> {
        Arc::default()
    }

    pub(super) fn batches(&self) -> Vec<NodeBatch> {
        self.batches.lock().clone()
    }

    /// `(from, seq)` of every raft message received, in arrival order.
    pub(super) fn seqs(&self) -> Vec<(u64, u64)> {
        let batches = self.batches.lock();
        batches
            .iter()
            .flat_map(|b| b.messages.iter().map(|m| (b.from_node, seq_of(m))))
            .collect()
    }

    pub(super) fn seqs_from(&self, from: NodeId) -> Vec<u64> {
        let seqs = self.seqs();
        seqs.into_iter()
            .filter(|(f, _)| *f == from.0)
            .map(|(_, s)| s)
            .collect()
    }
}

impl BatchHandler for Recorder {
    fn on_batch(&self, batch: NodeBatch) {
        self.batches.lock().push(batch);
    }
}

/// A handler that blocks in its first call until opened: lets a test hold the delivery
/// thread still while it queues more.
pub(super) struct Gate {
    entered_tx: Sender<()>,
    pub(super) entered: Receiver<()>,
    open_tx: Sender<()>,
    open_rx: Receiver<()>,
    first: AtomicBool,
    pub(super) inner: Arc<Recorder>,
    /// Set when the first (blocked) call returns.
    pub(super) returned: AtomicBool,
    /// Called in the first call after the gate opens.
    then: Mutex<Option<Box<dyn FnOnce() + Send>>>,
}

impl Gate {
    pub(super) fn new() -> Arc<Self> {
        let (entered_tx, entered) = crossbeam_channel::unbounded();
        let (open_tx, open_rx) = crossbeam_channel::unbounded();
        Arc::new(Self {
            entered_tx,
            entered,
            open_tx,
            open_rx,
            first: AtomicBool::new(true),
            inner: Recorder::new(),
            returned: AtomicBool::new(false),
            then: Mutex::new(None),
        })
    }

    pub(super) fn then(&self, f: impl FnOnce() + Send + 'static) {
        *self.then.lock() = Some(Box::new(f));
    }

    pub(super) fn wait_entered(&self) {
        self.entered
            .recv_timeout(WAIT)
            .expect("handler was not called");
    }

    pub(super) fn open(&self) {
        self.open_tx.send(()).unwrap();
    }
}

impl BatchHandler for Gate {
    fn on_batch(&self, batch: NodeBatch) {
        self.inner.on_batch(batch);
        if self.first.swap(false, Ordering::AcqRel) {
            self.entered_tx.send(()).unwrap();
            self.open_rx.recv_timeout(WAIT).expect("gate never opened");
            if let Some(f) = self.then.lock().take() {
                f();
            }
            self.returned.store(true, Ordering::Release);
        }
    }
}

#[test]
fn delivers_in_order_per_pair_and_sets_node_ids() {
    let net = MemNetwork::new();
    let rec = Recorder::new();
    let _t3 = net.register(N3, rec.clone());
    let senders: Vec<_> = [N1, N2]
        .into_iter()
        .map(|n| net.register(n, Recorder::new()))
        .collect();
    let per_sender = 2000u64;
    std::thread::scope(|s| {
        for t in &senders {
            s.spawn(move || {
                let mut seq = 0;
                while seq < per_sender {
                    // Batches of 1 to 3 messages, plus a heartbeat, as a worker round would.
                    let n = (seq % 3 + 1).min(per_sender - seq);
                    let mut b = batch((seq..seq + n).map(|i| msg(7, i)).collect());
                    b.heartbeats.push(Heartbeat {
                        range_id: 7,
                        commit: seq,
                        ..Default::default()
                    });
                    b.from_node = 99; // the transport overwrites it
                    t.send(N3, b).unwrap();
                    seq += n;
                }
            });
        }
    });
    assert!(net.wait_for_stats(WAIT, |s| s.delivered_messages == 2 * per_sender));
    for from in [N1, N2] {
        assert_eq!(rec.seqs_from(from), (0..per_sender).collect::<Vec<_>>());
        let commits: Vec<u64> = rec
            .batches()
            .iter()
            .filter(|b| b.from_node == from.0)
            .flat_map(|b| b.heartbeats.iter().map(|h| h.commit))
            .collect();
        assert!(
            commits.windows(2).all(|w| w[0] < w[1]),
            "heartbeats reordered"
        );
    }
    assert!(rec.batches().iter().all(|b| b.to_node == N3.0));
    let stats = net.stats();
    assert_eq!(stats.sent_batches, stats.delivered_heartbeats);
    assert_eq!(stats.dropped_by_filters() + stats.dropped_unreachable, 0);
}

#[test]
fn merges_batches_queued_while_the_handler_runs() {
    let net = MemNetwork::new();
    let gate = Gate::new();
    let _t2 = net.register(N2, gate.clone());
    let t1 = net.register(N1, Recorder::new());
    t1.send(N2, batch(vec![msg(1, 0)])).unwrap();
    gate.wait_entered();
    for i in 1..=10 {
        t1.send(N2, batch(vec![msg(1, i)])).unwrap();
    }
    gate.open();
    assert!(net.wait_for_stats(WAIT, |s| s.delivered_messages == 11));
    // The ten queued while the handler was busy arrive as one batch, in order.
    assert_eq!(net.stats().delivered_batches, 2);
    assert_eq!(gate.inner.seqs_from(N1), (0..=10).collect::<Vec<_>>());
}

#[test]
fn send_never_calls_the_handler_inline() {
    let net = MemNetwork::new();
    let worker_lock = Arc::new(Mutex::new(()));
    let handler_threads = Arc::new(Mutex::new(Vec::<ThreadId>::new()));
    let got_lock = Arc::new(AtomicUsize::new(0));
    let handler = {
        let (worker_lock, handler_threads, got_lock) = (
            worker_lock.clone(),
            handler_threads.clone(),
            got_lock.clone(),
        );
        move |_: NodeBatch| {
            handler_threads.lock().push(std::thread::current().id());
            // Called inline, this would wait for a lock its own thread holds: bounded, so
            // that the test fails instead of hanging.
            if worker_lock.try_lock_for(WAIT).is_some() {
                got_lock.fetch_add(1, Ordering::AcqRel);
            }
        }
    };
    let _t2 = net.register(N2, Arc::new(handler));
    let t1 = net.register(N1, Recorder::new());
    {
        // Like a worker: send while holding a lock the receiving side needs.
        let _held = worker_lock.lock();
        for i in 0..20 {
            t1.send(N2, batch(vec![msg(1, i)])).unwrap();
        }
    }
    assert!(net.wait_for_stats(WAIT, |s| s.delivered_messages == 20));
    let me = std::thread::current().id();
    assert!(handler_threads.lock().iter().all(|t| *t != me));
    assert_eq!(
        got_lock.load(Ordering::Acquire) as u64,
        net.stats().delivered_batches
    );
}

#[test]
fn full_queue_pushes_back_per_pair_until_delivered() {
    let net = MemNetwork::with_config(MemConfig {
        queue_budget_bytes: 1000,
        ..MemConfig::default()
    });
    let gate = Gate::new();
    let _t2 = net.register(N2, gate.clone());
    let t1 = net.register(N1, Recorder::new());
    let t3 = net.register(N3, Recorder::new());
    let big = |seq| {
        let mut m = msg(1, seq);
        m.start_key = Bytes::from(vec![b'k'; 600]);
        batch(vec![m])
    };
    t1.send(N2, big(0)).unwrap();
    gate.wait_entered();
    // The handler holds the first batch: its bytes still count as queued.
    let first = t1.queued_bytes(N2);
    assert!(first > 600, "{first}");
    match t1.send(N2, big(1)) {
        Err(TransportError::Full { to, queued_bytes }) => {
            assert_eq!((to, queued_bytes), (N2, first));
        }
        other => panic!("expected Full, got {other:?}"),
    }
    assert!(TransportError::Full {
        to: N2,
        queued_bytes: 0
    }
    .is_retryable());
    // Another sender's queue to the same node is separate.
    t3.send(N2, big(0)).unwrap();
    // Small batches still fit under the budget.
    t1.send(N2, batch(vec![msg(1, 2)])).unwrap();
    assert_eq!(net.stats().rejected_full, 1);

    gate.open();
    assert!(net.wait_for_stats(WAIT, |s| s.delivered_messages == 3));
    assert_eq!(t1.queued_bytes(N2), 0);
    assert_eq!(t3.queued_bytes(N2), 0);
    t1.send(N2, big(3)).unwrap();
    assert!(net.wait_for_stats(WAIT, |s| s.delivered_messages == 4));
    assert_eq!(gate.inner.seqs_from(N1), vec![0, 2, 3]);
}

#[test]
fn oversized_batch_is_refused() {
    let net = MemNetwork::with_config(MemConfig {
        max_frame_bytes: 100,
        ..MemConfig::default()
    });
    let _t2 = net.register(N2, Recorder::new());
    let t1 = net.register(N1, Recorder::new());
    let mut m = msg(1, 0);
    m.message = Bytes::from(vec![0; 200]);
    match t1.send(N2, batch(vec![m])) {
        Err(TransportError::FrameTooLarge { size, limit }) => {
            assert!(size > 200);
            assert_eq!(limit, 100);
        }
        other => panic!("expected FrameTooLarge, got {other:?}"),
    }
    assert_eq!(net.stats().sent_batches, 0);
    assert_eq!(t1.queued_bytes(N2), 0);
}

#[test]
fn unknown_stopped_and_restarted_nodes() {
    let net = MemNetwork::new();
    let t1 = net.register(N1, Recorder::new());
    assert_eq!(
        t1.send(NodeId(9), batch(vec![msg(1, 0)])),
        Err(TransportError::UnknownNode(NodeId(9)))
    );
    assert!(!t1.is_reachable(NodeId(9)));

    let old = Recorder::new();
    let old_t2 = net.register(N2, old.clone());
    assert!(t1.is_reachable(N2));
    t1.send(N2, batch(vec![msg(1, 0)])).unwrap();
    assert!(net.wait_for_stats(WAIT, |s| s.delivered_messages == 1));

    assert!(net.unregister(N2));
    assert!(!net.unregister(N2), "second unregister is a no-op");
    assert!(!net.is_registered(N2));
    assert!(!t1.is_reachable(N2));
    assert_eq!(
        t1.send(N2, batch(vec![msg(1, 1)])),
        Err(TransportError::Unreachable(N2))
    );
    assert_eq!(
        old_t2.send(N1, batch(vec![msg(1, 0)])),
        Err(TransportError::Closed)
    );
    assert!(!old_t2.is_reachable(N1));

    // Restart: the same id with a new handler.
    let new = Recorder::new();
    let new_t2 = net.register(N2, new.clone());
    t1.send(N2, batch(vec![msg(1, 2)])).unwrap();
    assert!(net.wait_for_stats(WAIT, |s| s.delivered_messages == 2));
    assert_eq!(old.seqs_from(N1), vec![0]);
    assert_eq!(new.seqs_from(N1), vec![2]);
    // Shutting down the stale handle must not stop the new incarnation.
    old_t2.shutdown();
    assert!(net.is_registered(N2));
    new_t2.send(N1, batch(vec![msg(1, 3)])).unwrap();
    assert!(net.wait_for_stats(WAIT, |s| s.delivered_messages == 3));

    let stats = net.stats();
    assert_eq!(stats.rejected_unreachable, 2);
}

#[test]
fn unregister_from_the_handler_drops_what_is_queued() {
    let net = MemNetwork::new();
    let gate = Gate::new();
    let _t2 = net.register(N2, gate.clone());
    let t1 = net.register(N1, Recorder::new());
    {
        let net = Arc::downgrade(&net);
        gate.then(move || {
            let net = net.upgrade().expect("network alive");
            assert!(net.unregister(N2));
        });
    }
    t1.send(N2, batch(vec![msg(1, 0)])).unwrap();
    gate.wait_entered();
    for i in 1..=4 {
        t1.send(N2, batch(vec![msg(1, i), msg(2, i)])).unwrap();
    }
    gate.open();
    assert!(net.wait_for_stats(WAIT, |s| s.dropped_unreachable == 8));
    assert_eq!(gate.inner.seqs_from(N1), vec![0]);
    assert_eq!(t1.queued_bytes(N2), 0);
    assert!(!net.is_registered(N2));
}

#[test]
fn unregister_waits_for_a_running_handler() {
    let net = MemNetwork::new();
    let gate = Gate::new();
    let _t2 = net.register(N2, gate.clone());
    let t1 = net.register(N1, Recorder::new());
    t1.send(N2, batch(vec![msg(1, 0)])).unwrap();
    gate.wait_entered();
    std::thread::scope(|s| {
        let stopper = s.spawn(|| net.unregister(N2));
        gate.open();
        assert!(stopper.join().unwrap());
        // unregister returned: the handler call it overlapped must be over.
        assert!(gate.returned.load(Ordering::Acquire));
    });
}

#[test]
fn shutdown_closes_the_node() {
    let net = MemNetwork::new();
    let t1 = net.register(N1, Recorder::new());
    let t2: Arc<dyn Transport> = Arc::new(net.register(N2, Recorder::new()));
    t2.shutdown();
    t2.shutdown(); // idempotent
    assert_eq!(
        t2.send(N1, batch(vec![msg(1, 0)])),
        Err(TransportError::Closed)
    );
    assert_eq!(
        t1.send(N2, batch(vec![msg(1, 0)])),
        Err(TransportError::Unreachable(N2))
    );
    assert!(!net.is_registered(N2));
    // Node 1 no longer hears node 2: its liveness answer stops moving.
    let last = t1.last_heard_from(N2);
    std::thread::sleep(Duration::from_millis(2));
    assert_eq!(t1.last_heard_from(N2), last);
}

#[test]
fn liveness_follows_registrations_partitions_and_silence() {
    let net = MemNetwork::new();
    let t1 = net.register(N1, Recorder::new());
    let _t2 = net.register(N2, Recorder::new());
    let moving = |t: &MemTransport| {
        let a = t.last_heard_from(N2).expect("tracked");
        std::thread::sleep(Duration::from_millis(2));
        t.last_heard_from(N2).expect("tracked") > a
    };
    assert!(moving(&t1), "a registered node is heard");
    net.set_silent(N2, true);
    assert!(!moving(&t1), "a silent node (paused process) is not");
    net.set_silent(N2, false);
    assert!(moving(&t1));
    let cut = net.add_filter(Box::new(PartitionFilter::new([N1], [N2])));
    assert!(!moving(&t1), "nor one cut off by a partition");
    net.remove_filter(cut);
    assert!(moving(&t1));
    // A node never registered: silent since this transport started.
    assert!(t1.last_heard_from(NodeId(9)).is_some());
}

#[test]
fn dropping_the_network_stops_delivery_and_releases_handlers() {
    struct Flag(Arc<AtomicBool>);
    impl Drop for Flag {
        fn drop(&mut self) {
            self.0.store(true, Ordering::Release);
        }
    }
    let released = Arc::new(AtomicBool::new(false));
    let net = MemNetwork::new();
    let flag = Flag(released.clone());
    // The handler owning its node's transport is the usual shape; it must not keep the
    // network's threads alive.
    let slot: Arc<Mutex<Option<super::MemTransport>>> = Arc::default();
    let handler = {
        let slot = slot.clone();
        move |_: NodeBatch| {
            let _ = (&flag, &slot);
        }
    };
    *slot.lock() = Some(net.register(N1, Arc::new(handler)));
    let t2 = net.register(N2, Recorder::new());
    drop(net);
    assert!(released.load(Ordering::Acquire), "handler not dropped");
    assert_eq!(
        t2.send(N1, batch(vec![msg(1, 0)])),
        Err(TransportError::Closed)
    );
}

#[test]
fn empty_batches_are_accepted_and_discarded() {
    let net = MemNetwork::new();
    let rec = Recorder::new();
    let _t2 = net.register(N2, rec.clone());
    let t1 = net.register(N1, Recorder::new());
    t1.send(N2, NodeBatch::default()).unwrap();
    t1.send(N2, batch(vec![msg(1, 0)])).unwrap();
    assert!(net.wait_for_stats(WAIT, |s| s.delivered_batches == 1));
    assert_eq!(rec.batches().len(), 1);
}

#[test]
#[should_panic(expected = "already registered")]
fn registering_twice_panics() {
    let net = MemNetwork::new();
    let _a = net.register(N1, Recorder::new());
    let _b = net.register(N1, Recorder::new());
}

#[test]
fn snapshots_travel_beside_the_frame_limit_and_the_queue_budget() {
    let net = MemNetwork::with_config(MemConfig {
        queue_budget_bytes: 1 << 20,
        max_frame_bytes: 1 << 20,
    });
    let got = Arc::new(Mutex::new(Vec::new()));
    let sink = got.clone();
    let _n2 = net.register(N2, Arc::new(move |b: NodeBatch| sink.lock().push(b)));
    let n1 = net.register(N1, Arc::new(|_: NodeBatch| {}));
    let big = |snapshot| NodeBatch {
        messages: vec![RaftMessage {
            range_id: 1,
            message: vec![7u8; 4 << 20].into(),
            snapshot,
            ..Default::default()
        }],
        ..Default::default()
    };
    assert!(matches!(
        n1.send(N2, big(false)),
        Err(TransportError::FrameTooLarge { .. })
    ));
    n1.send(N2, big(true)).unwrap();
    assert!(net.wait_for_stats(WAIT, |s| s.delivered_messages == 1));
    assert_eq!(got.lock()[0].messages[0].message.len(), 4 << 20);
}
