//! The one ticker thread of a NodeGroup.
//!
//! Every `tick_interval` it adds a tick to each *awake* replica (a counter and a schedule, no
//! allocation) and expires requests past their deadline. It iterates only the awake set, so
//! replicas that hibernate cost nothing here.

use std::sync::Arc;
use std::time::Instant;

use crossbeam_channel::{Receiver, RecvTimeoutError};

use crate::node_group::Shared;

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
        let started = Instant::now();
        let mut ticked = 0u64;
        for cell in shared.awake.iter() {
            cell.tick(&shared.ready_tx);
            ticked += 1;
        }
        let expired = shared.pending.expire(now);
        metrics::counter!("flotilla_runtime_ticks_total").increment(ticked);
        metrics::counter!("flotilla_runtime_requests_expired_total").increment(expired as u64);
        metrics::histogram!("flotilla_runtime_tick_round_seconds")
            .record(started.elapsed().as_secs_f64());
    }
}
