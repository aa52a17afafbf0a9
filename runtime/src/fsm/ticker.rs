//! The one ticker thread of a NodeGroup.
//!
//! Every `tick_interval` it adds a tick to each *awake* replica (a counter and a schedule, no
//! allocation), sends the heartbeats the previous tick's rounds produced as one batch per
//! node pair, and expires requests past their deadline. It iterates only the awake set, so
//! replicas that hibernate cost nothing here.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Instant;

use crossbeam_channel::{Receiver, RecvTimeoutError};

use crate::fsm::shared::Shared;

/// Body of the ticker thread; returns when `stop` is signalled or dropped.
pub(crate) fn run(shared: Arc<Shared>, stop: Receiver<()>) {
    let interval = shared.config.tick_interval;
    let mut next = Instant::now() + interval;
    loop {
        let wait = next.saturating_duration_since(Instant::now());
        match stop.recv_timeout(wait) {
            Err(RecvTimeoutError::Timeout) => {}
            _ => return,
        }
        next += interval;
        let now = Instant::now();
        if next < now {
            // We fell behind (machine overloaded): skip the missed ticks rather than burst.
            next = now + interval;
        }
        // A test stopped this node's clock (`NodeGroup::pause_ticker`).
        if shared.ticker_paused.load(Ordering::Acquire) {
            continue;
        }
        let started = Instant::now();
        let ticked = tick_once(&shared, false);
        let expired = shared.pending.expire(now);
        metrics::counter!("flotilla_runtime_ticks_total").increment(ticked);
        metrics::counter!("flotilla_runtime_requests_expired_total").increment(expired as u64);
        metrics::histogram!("flotilla_runtime_tick_round_seconds")
            .record(started.elapsed().as_secs_f64());
    }
}

/// One tick of the node's clock: sends the heartbeats the last tick's rounds produced, checks
/// node liveness, wakes a bounded number of queued groups (`fsm::liveness`), and adds a tick
/// to every awake replica. `ordered` ticks them in range order (the simulator's determinism);
/// the ticker walks the awake set as it lies. Returns how many replicas were ticked.
pub(crate) fn tick_once(shared: &Shared, ordered: bool) -> u64 {
    send_heartbeats(shared);
    crate::fsm::liveness::check(shared);
    crate::fsm::liveness::drain_wakes(shared);
    let mut ticked = 0u64;
    if ordered {
        let mut cells: Vec<_> = shared.awake.iter().map(|c| c.clone()).collect();
        cells.sort_by_key(|c| c.range.0);
        for cell in cells {
            cell.tick(&shared.ready_tx);
            ticked += 1;
        }
    } else {
        for cell in shared.awake.iter() {
            cell.tick(&shared.ready_tx);
            ticked += 1;
        }
    }
    metrics::gauge!("flotilla_runtime_awake_replicas").set(ticked as f64);
    ticked
}

/// Sends the plain heartbeats the rounds of the last tick produced: one batch per node pair.
pub(crate) fn send_heartbeats(shared: &Shared) {
    let pending = std::mem::take(&mut *shared.tick_heartbeats.lock());
    let Some(transport) = shared.transport.get() else {
        return;
    };
    for (node, heartbeats) in pending {
        let count = heartbeats.len() as u64;
        let batch = flotilla_proto::transport::NodeBatch {
            from_node: shared.node.0,
            to_node: node.0,
            messages: Vec::new(),
            heartbeats,
            stats: None,
        };
        // A lost heartbeat is harmless: raft sends the next one.
        if transport.send(node, batch).is_ok() {
            metrics::counter!("flotilla_runtime_heartbeats_sent_total").increment(count);
            shared
                .heartbeat_batches
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
    }
}
