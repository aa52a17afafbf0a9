//! The one ticker thread of a NodeGroup.
//!
//! Every `tick_interval` it adds a tick to each *awake* replica (a counter and a schedule, no
//! allocation; a replica done with any election is scheduled every `heartbeat_tick` ticks),
//! sends the heartbeats the previous tick's rounds produced as one batch per node pair, and
//! expires requests past their deadline. It iterates only the awake set, so replicas that
//! hibernate cost nothing here. It also flushes the store's memtables once the node fell
//! idle ([`IdleFlush`]).

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Instant;

use crossbeam_channel::{Receiver, RecvTimeoutError};

use crate::fsm::mailbox::ReplicaCell;
use crate::fsm::shared::Shared;

/// Body of the ticker thread; returns when `stop` is signalled or dropped.
pub(crate) fn run(shared: Arc<Shared>, stop: Receiver<()>) {
    let interval = shared.config.tick_interval;
    let mut next = Instant::now() + interval;
    let mut idle = IdleFlush::default();
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
        idle.tick(&shared);
    }
}

/// A store idle with fewer entries than this in its memtables is flushed at most once every
/// `IDLE_FLUSH_SPACING` times `idle_flush_ticks` ticks (a minute at the defaults): replaying
/// so few costs little, and a node written to in small bursts a few seconds apart should not
/// write a handful of small table files per burst. More (a bootstrap, a burst of writes)
/// are flushed as soon as the store falls idle.
const IDLE_FLUSH_MIN_ENTRIES: u64 = 10_000;
const IDLE_FLUSH_SPACING: usize = 30;

/// The idle flush (`NodeGroupConfig::idle_flush_ticks`): once the store has seen no write
/// for that many ticks, its memtables are written out in the background, so that a restart
/// replays no write-ahead log. Only the ticker thread does this (the simulator drives
/// `tick_once` and never flushes).
#[derive(Debug, Default)]
pub(crate) struct IdleFlush {
    /// The store's write sequence at the last check, and the ticks it has not moved.
    seen: u64,
    quiet: usize,
    /// The sequence the last idle flush covered, and the ticks since it was asked for.
    flushed: Option<u64>,
    since: Option<usize>,
}

impl IdleFlush {
    /// One tick's check; true if it started a flush.
    pub(crate) fn tick(&mut self, shared: &Shared) -> bool {
        let ticks = shared.config.idle_flush_ticks;
        if ticks == 0 {
            return false;
        }
        if let Some(t) = &mut self.since {
            *t = t.saturating_add(1);
        }
        let seq = shared.engine.write_sequence();
        if seq != self.seen {
            self.seen = seq;
            self.quiet = 0;
            return false;
        }
        self.quiet = self.quiet.saturating_add(1);
        if self.quiet < ticks || self.flushed == Some(seq) {
            return false;
        }
        let entries = shared.engine.memtable_entries();
        let spaced = self
            .since
            .is_none_or(|t| t >= IDLE_FLUSH_SPACING.saturating_mul(ticks));
        if entries == 0 {
            // Nothing to write out (no write since the store opened, or since the last flush).
            self.flushed = Some(seq);
            return false;
        }
        if entries < IDLE_FLUSH_MIN_ENTRIES && !spaced {
            return false;
        }
        self.flushed = Some(seq);
        self.since = Some(0);
        match shared.engine.flush_memtables(false) {
            Ok(()) => {
                tracing::info!(node = %shared.node, "store idle: memtables flushed");
                metrics::counter!("flotilla_runtime_idle_flushes_total").increment(1);
                true
            }
            Err(e) => {
                tracing::warn!(node = %shared.node, "idle flush failed: {e}");
                false
            }
        }
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
    // A replica done with any election (a leader whose term's first entry is committed, a
    // follower that knows its leader: `ReplicaCell::settled`) runs a round for its ticks only
    // every `heartbeat_tick` ticks, stepping them together: nothing it does on a tick comes
    // sooner than a heartbeat interval (a leader's heartbeats, a follower's election timer
    // and its poke after two silent intervals), while a round per tick was most of the work
    // of the thousands of replicas that an election storm leaves awake for a few ticks before
    // they sleep again. Messages and requests still schedule it at once.
    let lazy = u32::try_from(shared.config.heartbeat_tick).unwrap_or(u32::MAX);
    let every = |cell: &ReplicaCell| {
        if cell.settled.load(Ordering::Acquire) {
            lazy
        } else {
            1
        }
    };
    if ordered {
        let mut cells: Vec<_> = shared.awake.iter().map(|c| c.clone()).collect();
        cells.sort_by_key(|c| c.range.0);
        for cell in cells {
            cell.tick(&shared.ready_tx, every(&cell));
            ticked += 1;
        }
    } else {
        for cell in shared.awake.iter() {
            cell.tick(&shared.ready_tx, every(&cell));
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
