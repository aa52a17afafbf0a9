//! The sending side: one [`Peer`] per destination node, each with its byte-budgeted queue and
//! one tokio task that owns the destination's stream.
//!
//! # The task's life
//!
//! `Connecting` → open a channel, open the `Batches` stream, send a ping, wait for its ack
//! (which names the node that answered) → `Connected`: a writer merges whatever is queued
//! into one frame at a time and a reader takes acks, both until the stream breaks →
//! `Backoff`: the queue is dropped, `send` answers `Unreachable`, the task sleeps with
//! exponential backoff → `Connecting` again. An address change (`set_peer`) cuts any phase
//! short and reconnects at once. The task ends only when it is aborted (`remove_peer`,
//! `shutdown`); everything it owns (channel, in-flight charges) is dropped with it.
//!
//! # Why the stream is fed through a channel of one frame
//!
//! While tonic/h2 is still busy with the previous frame, the writer waits on that channel and
//! `send` keeps queueing, so the next frame merges everything that arrived meanwhile: the
//! busier the link, the bigger the frames. Budget charges are released on the destination's
//! ack, not on write, so `Full` reflects what the destination has really taken.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};
use std::sync::Arc;
use std::time::Duration;

use flotilla_proto::transport::raft_transport_client::RaftTransportClient;
use flotilla_proto::transport::{BatchAck, NodeBatch};
use flotilla_proto::NodeId;
use parking_lot::Mutex;
use prost::Message;
use rand::Rng;
use tokio::sync::{mpsc, watch, Notify};
use tokio::task::JoinHandle;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::{Channel, Endpoint};
use tonic::Streaming;

use super::stats::Counters;
use super::Inner;
use crate::budget::{Charge, QueueBytes};
use crate::{metric, TransportError};

/// Where a peer's stream is. Only `Backoff` makes `send` refuse.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub(crate) enum State {
    /// Opening a stream (the first time, or after a backoff or an address change). Sends are
    /// queued: the benefit of the doubt, so a starting cluster loses nothing.
    Connecting = 0,
    /// The destination acknowledged the stream.
    Connected = 1,
    /// The last attempt failed or the stream broke; waiting before the next attempt.
    Backoff = 2,
}

/// One batch accepted by `send`, holding its share of the queue budget.
struct Queued {
    batch: NodeBatch,
    charge: Charge,
}

impl Queued {
    fn items(&self) -> usize {
        self.batch.messages.len() + self.batch.heartbeats.len()
    }
}

/// One destination node.
pub(crate) struct Peer {
    pub(crate) node: NodeId,
    /// Its current `host:port`; the task watches it to reconnect on change.
    addr: watch::Sender<String>,
    state: AtomicU8,
    queue: Mutex<VecDeque<Queued>>,
    queued: QueueBytes,
    /// Signalled on every enqueue. `Notify` keeps one permit when the writer is not waiting,
    /// so a batch queued between the writer's last look and its wait is never missed; and
    /// `notify_one` works from the runtime's plain OS threads.
    wake: Notify,
    task: Mutex<Option<JoinHandle<()>>>,
    /// The last connection attempt was refused (nothing listens at the address: the peer's
    /// process is gone), and no attempt has started since. See
    /// `Transport::connection_refused`.
    pub(crate) refused: AtomicBool,
}

impl Peer {
    /// Creates the peer and starts its task on the transport's runtime.
    pub(crate) fn spawn(inner: &Arc<Inner>, node: NodeId, addr: String) -> Arc<Peer> {
        let peer = Arc::new(Peer {
            node,
            addr: watch::Sender::new(addr),
            state: AtomicU8::new(State::Connecting as u8),
            queue: Mutex::new(VecDeque::new()),
            queued: QueueBytes::default(),
            wake: Notify::new(),
            task: Mutex::new(None),
            refused: AtomicBool::new(false),
        });
        let task = inner.runtime.spawn(run(inner.clone(), peer.clone()));
        *peer.task.lock() = Some(task);
        peer
    }

    pub(crate) fn state(&self) -> State {
        match self.state.load(Ordering::Acquire) {
            0 => State::Connecting,
            1 => State::Connected,
            _ => State::Backoff,
        }
    }

    fn set_state(&self, state: State) {
        self.state.store(state as u8, Ordering::Release);
    }

    /// Its current address.
    pub(crate) fn addr(&self) -> String {
        self.addr.borrow().clone()
    }

    /// Points the peer at a new address; a live stream to the old one is dropped.
    pub(crate) fn set_addr(&self, addr: String) {
        self.addr.send_if_modified(|cur| {
            let changed = *cur != addr;
            *cur = addr;
            changed
        });
    }

    /// Bytes accepted by `send` and not yet acknowledged by the destination.
    pub(crate) fn queued_bytes(&self) -> usize {
        self.queued.load(Ordering::Acquire)
    }

    /// Queues one batch of `size` encoded bytes (from/to already set). Never blocks.
    pub(crate) fn enqueue(
        &self,
        batch: NodeBatch,
        size: usize,
        budget: usize,
    ) -> Result<(), TransportError> {
        if self.state() == State::Backoff {
            return Err(TransportError::Unreachable(self.node));
        }
        let charge = Charge::reserve(&self.queued, size, budget).map_err(|queued_bytes| {
            TransportError::Full {
                to: self.node,
                queued_bytes,
            }
        })?;
        self.queue.lock().push_back(Queued { batch, charge });
        self.wake.notify_one();
        Ok(())
    }

    /// Stops the task (and with it the stream). Idempotent.
    pub(crate) fn stop(&self) {
        if let Some(task) = self.task.lock().take() {
            task.abort();
        }
    }

    /// Merges queued batches, oldest first, into one frame of at most `max_items` messages
    /// plus heartbeats and `max_bytes` bytes (always at least one batch: `send` already
    /// refused any batch over `max_bytes`).
    fn take_frame(&self, max_items: usize, max_bytes: usize) -> Option<Queued> {
        let mut queue = self.queue.lock();
        let mut frame = queue.pop_front()?;
        let mut items = frame.items();
        while let Some(next) = queue.front() {
            // Sizes add up: a merged frame is the concatenation of the batches' repeated
            // fields, so it is never larger than the sum of their encodings.
            if items + next.items() > max_items
                || frame.charge.bytes() + next.charge.bytes() > max_bytes
            {
                break;
            }
            let next = queue.pop_front().expect("front was just seen");
            items += next.items();
            frame.batch.messages.extend(next.batch.messages);
            frame.batch.heartbeats.extend(next.batch.heartbeats);
            // Same peer, same queue: always absorbed.
            let _ = frame.charge.absorb(next.charge);
        }
        Some(frame)
    }

    /// Drops everything queued (the stream is gone); returns messages plus heartbeats dropped.
    fn clear_queue(&self) -> usize {
        let dropped: VecDeque<Queued> = std::mem::take(&mut *self.queue.lock());
        dropped.iter().map(Queued::items).sum()
    }
}

/// Why a session ended.
enum Ended {
    /// The address changed: reconnect at once, keep the queue.
    AddressChanged,
    /// The attempt failed (`was_connected == false`) or the stream broke.
    Failed { was_connected: bool },
}

/// The peer's task: sessions, separated by backoff. Runs until aborted.
async fn run(inner: Arc<Inner>, peer: Arc<Peer>) {
    let mut addr_rx = peer.addr.subscribe();
    let mut backoff = Backoff::new(
        inner.config.reconnect_backoff_min,
        inner.config.reconnect_backoff_max,
    );
    loop {
        peer.set_state(State::Connecting);
        let addr = addr_rx.borrow_and_update().clone();
        let ended = tokio::select! {
            ended = session(&inner, &peer, &addr) => ended,
            // The sender lives in `peer`, which this task owns: `changed` cannot fail here.
            _ = addr_rx.changed() => Ended::AddressChanged,
        };
        let Ended::Failed { was_connected } = ended else {
            tracing::info!(node = %inner.node, peer = %peer.node, "peer address changed; reconnecting");
            continue;
        };
        // State first, then clear: a concurrent `send` either sees Backoff, or its batch is
        // cleared here, or (a narrow race) it waits in the queue for the next session.
        peer.set_state(State::Backoff);
        let dropped = peer.clear_queue();
        Counters::add(&inner.counters.dropped_disconnected, dropped as u64);
        metric::dropped("disconnected", dropped as u64);
        inner.counters.notify();
        if was_connected {
            backoff.reset();
        }
        tokio::select! {
            _ = tokio::time::sleep(backoff.next_delay()) => {}
            _ = addr_rx.changed() => {}
        }
    }
}

/// One connection attempt and, if it succeeds, the stream's whole life.
async fn session(inner: &Inner, peer: &Peer, addr: &str) -> Ended {
    let counters = &inner.counters;
    peer.refused.store(false, Ordering::Release);
    let opened = tokio::time::timeout(inner.config.connect_timeout, open(inner, peer, addr)).await;
    let (tx, mut acks) = match opened {
        Ok(Ok(stream)) => stream,
        Ok(Err(why)) => return connect_failed(inner, peer, addr, &why),
        Err(_) => return connect_failed(inner, peer, addr, "timed out"),
    };
    peer.set_state(State::Connected);
    Counters::add(&counters.connects, 1);
    metric::grpc_connected();
    counters.notify();
    tracing::info!(node = %inner.node, peer = %peer.node, %addr, "stream to peer established");

    // Charges of data frames written and not yet acknowledged, by frame number on this
    // stream (the opening ping is frame 1). A plain mutex: the writer and the reader are
    // polled by this one task, never at the same instant, and never hold it across an await.
    let in_flight = Mutex::new(VecDeque::new());
    let why = tokio::select! {
        why = write(inner, peer, &tx, &in_flight) => why,
        why = read(inner, peer, &mut acks, &in_flight) => why,
    };
    Counters::add(&counters.disconnects, 1);
    metric::grpc_disconnected();
    counters.notify();
    tracing::info!(node = %inner.node, peer = %peer.node, %addr, why, "stream to peer broke");
    Ended::Failed {
        was_connected: true,
    }
}

fn connect_failed(inner: &Inner, peer: &Peer, addr: &str, why: &str) -> Ended {
    Counters::add(&inner.counters.connect_failures, 1);
    metric::grpc_connect_failed();
    inner.counters.notify();
    // Debug only: while a node is down this repeats on every backoff.
    tracing::debug!(node = %inner.node, peer = %peer.node, %addr, why, "cannot open stream to peer");
    Ended::Failed {
        was_connected: false,
    }
}

type FrameTx = mpsc::Sender<NodeBatch>;

/// Opens the channel and the stream, and waits for the ack of the opening ping: only then is
/// the stream known to be accepted by the node we meant.
async fn open(
    inner: &Inner,
    peer: &Peer,
    addr: &str,
) -> Result<(FrameTx, Streaming<BatchAck>), String> {
    let endpoint = inner.endpoint(peer.node, addr).map_err(|e| e.to_string())?;
    let channel: Channel = endpoint.connect().await.map_err(|e| {
        if is_refused(&e) {
            peer.refused.store(true, Ordering::Release);
        }
        error_chain(&e)
    })?;
    let limit = inner.config.max_frame_bytes;
    let mut client = RaftTransportClient::new(channel)
        .max_encoding_message_size(limit)
        .max_decoding_message_size(limit);
    let (tx, rx) = mpsc::channel(1);
    tx.try_send(inner.ping(peer.node))
        .expect("a new channel has room for one frame");
    Counters::add(&inner.counters.pings_sent, 1);
    metric::grpc_ping_sent();
    let response = client
        .batches(ReceiverStream::new(rx))
        .await
        .map_err(|s| format!("stream refused: {}", s.message()))?;
    let mut acks = response.into_inner();
    match acks.message().await {
        Ok(Some(ack)) if ack.node == peer.node.0 => {
            inner.heard(peer.node);
            Counters::add(&inner.counters.acks_received, 1);
            Ok((tx, acks))
        }
        Ok(Some(ack)) => {
            Counters::add(&inner.counters.wrong_peer, 1);
            tracing::warn!(
                node = %inner.node, peer = %peer.node, %addr, answered = ack.node,
                "the address of a peer is served by another node; fix the address book"
            );
            Err(format!("answered by node {} instead", ack.node))
        }
        Ok(None) => Err("stream closed before the first ack".into()),
        Err(s) => Err(format!("stream failed: {}", s.message())),
    }
}

/// The writer half: merges the queue into frames, pings when idle. Returns why it stopped.
async fn write(
    inner: &Inner,
    peer: &Peer,
    tx: &FrameTx,
    in_flight: &Mutex<VecDeque<(u64, Charge)>>,
) -> &'static str {
    let config = &inner.config;
    let counters = &inner.counters;
    let mut frames: u64 = 1; // the opening ping
                             // Statistics ride on every ping; on a busy stream (no pings) on a data frame at most once
                             // a ping interval, so they keep flowing under load without costing every frame.
    let mut stats_sent = tokio::time::Instant::now();
    loop {
        let Some(mut frame) = peer.take_frame(config.batch_max_messages, config.max_frame_bytes)
        else {
            if tokio::time::timeout(config.ping_interval, peer.wake.notified())
                .await
                .is_err()
            {
                frames += 1;
                stats_sent = tokio::time::Instant::now();
                if tx.send(inner.ping(peer.node)).await.is_err() {
                    return "stream closed";
                }
                Counters::add(&counters.pings_sent, 1);
                metric::grpc_ping_sent();
            }
            continue;
        };
        frames += 1;
        if stats_sent.elapsed() >= config.ping_interval {
            stats_sent = tokio::time::Instant::now();
            frame.batch.stats = inner.local_stats();
        }
        let (messages, heartbeats) = (frame.batch.messages.len(), frame.batch.heartbeats.len());
        let bytes = frame.batch.encoded_len();
        in_flight.lock().push_back((frames, frame.charge));
        if tx.send(frame.batch).await.is_err() {
            return "stream closed";
        }
        Counters::add(&counters.frames_sent, 1);
        Counters::add(&counters.frame_messages, messages as u64);
        Counters::add(&counters.frame_heartbeats, heartbeats as u64);
        Counters::add(&counters.heartbeat_frames, u64::from(heartbeats > 0));
        Counters::add(&counters.frame_bytes, bytes as u64);
        metric::grpc_frame_sent(bytes, messages + heartbeats);
        counters.notify();
    }
}

/// The reader half: takes acks, releases the charges of acknowledged frames, records
/// liveness, and gives up on silence. Returns why it stopped.
async fn read(
    inner: &Inner,
    peer: &Peer,
    acks: &mut Streaming<BatchAck>,
    in_flight: &Mutex<VecDeque<(u64, Charge)>>,
) -> &'static str {
    loop {
        let ack = match tokio::time::timeout(inner.config.ping_timeout, acks.message()).await {
            Err(_) => return "no ack within ping_timeout",
            Ok(Err(status)) => {
                tracing::debug!(node = %inner.node, peer = %peer.node, ?status, "stream to peer failed");
                return "stream failed";
            }
            Ok(Ok(None)) => return "closed by the peer",
            Ok(Ok(Some(ack))) => ack,
        };
        inner.heard(peer.node);
        Counters::add(&inner.counters.acks_received, 1);
        {
            let mut in_flight = in_flight.lock();
            while in_flight.front().is_some_and(|(n, _)| *n <= ack.received) {
                in_flight.pop_front(); // releases its budget
            }
        }
        inner.counters.notify();
    }
}

/// Exponential backoff with jitter, so that the nodes of a cluster that lost one peer do not
/// all knock on its door at the same instant when it comes back.
#[derive(Debug)]
struct Backoff {
    min: Duration,
    max: Duration,
    next: Duration,
}

impl Backoff {
    fn new(min: Duration, max: Duration) -> Self {
        Self {
            min,
            max,
            next: min,
        }
    }

    fn reset(&mut self) {
        self.next = self.min;
    }

    /// A delay in `[d/2, d]` where `d` doubles from `min` up to `max` with each call.
    fn next_delay(&mut self) -> Duration {
        let d = self.next;
        self.next = (d * 2).min(self.max);
        rand::thread_rng().gen_range(d / 2..=d)
    }
}

/// Whether a connection attempt failed because nothing listens at the address (TCP answered
/// with a reset: `ECONNREFUSED`), as opposed to a timeout, a TLS or protocol failure.
fn is_refused(e: &(dyn std::error::Error + 'static)) -> bool {
    let mut cause: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(c) = cause {
        if let Some(io) = c.downcast_ref::<std::io::Error>() {
            if io.kind() == std::io::ErrorKind::ConnectionRefused {
                return true;
            }
        }
        cause = c.source();
    }
    false
}

/// A tonic transport error with its causes: the top level alone is just "transport error".
pub(crate) fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cause = c.source();
    }
    s
}

/// The endpoint for `addr`, with TLS if configured. Also used by `set_peer` to validate.
pub(crate) fn endpoint(
    node: NodeId,
    addr: &str,
    config: &super::GrpcConfig,
    tls: Option<&tonic::transport::ClientTlsConfig>,
) -> Result<Endpoint, TransportError> {
    let invalid = || TransportError::InvalidAddress {
        node,
        addr: addr.to_string(),
    };
    let scheme = if tls.is_some() { "https" } else { "http" };
    let uri: tonic::codegen::http::Uri = format!("{scheme}://{addr}")
        .parse()
        .map_err(|_| invalid())?;
    // `host:port` exactly: no scheme, no path, and an explicit port.
    if uri.authority().map(|a| a.as_str()) != Some(addr) || uri.port().is_none() {
        return Err(invalid());
    }
    let endpoint = Endpoint::from(uri)
        .connect_timeout(config.connect_timeout)
        .tcp_nodelay(true);
    match tls {
        Some(tls) => endpoint
            .tls_config(tls.clone())
            .map_err(|e| TransportError::Tls(error_chain(&e))),
        None => Ok(endpoint),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_up_to_max_with_jitter_and_resets() {
        let (min, max) = (Duration::from_millis(10), Duration::from_millis(35));
        let mut b = Backoff::new(min, max);
        let delays: Vec<_> = (0..4).map(|_| b.next_delay()).collect();
        for (d, cap) in delays.iter().zip([10, 20, 35, 35]) {
            let cap = Duration::from_millis(cap);
            assert!(
                *d >= cap / 2 && *d <= cap,
                "{d:?} outside [{:?}, {cap:?}]",
                cap / 2
            );
        }
        b.reset();
        assert!(b.next_delay() <= min);
    }
}
