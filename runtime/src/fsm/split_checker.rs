//! The split checker: one thread that decides when a range this node leads should split.
//!
//! - **By size**: applying writes on a leader adds their bytes to the range's counter; a range
//!   whose counter passes an eighth of the size limit becomes a candidate, and the checker
//!   measures it (one scan of its keys, off the raft workers) and splits it at its middle key
//!   if it holds more than `max_range_bytes` or `max_range_keys`.
//! - **By load**: client requests are counted per range over `load_window`, with a small
//!   reservoir sample of their keys; a range above `load_qps` splits at the sampled median, a
//!   key that divides its load in two.
//!
//! The checker only proposes splits (through the replica's mailbox, as the admin API does);
//! the split itself is the replicated command in `replica::split`.

use std::sync::Arc;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, RecvTimeoutError};
use flotilla_proto::meta::RangeDescriptor;
use flotilla_proto::RangeId;
use flotilla_store::Engine;

use crate::fsm::load::LoadStats;
use crate::fsm::shared::Shared;
use crate::replica::PeerMsg;

/// Body of the split checker thread; returns when `stop` is disconnected.
pub(crate) fn run(shared: Arc<Shared>, stop: Receiver<()>) {
    let cfg = shared.config.split.clone();
    let mut window_start = Instant::now();
    loop {
        match stop.recv_timeout(cfg.check_interval) {
            Err(RecvTimeoutError::Timeout) => {}
            _ => return,
        }
        let candidates: Vec<u64> = std::mem::take(&mut *shared.split_candidates.lock())
            .into_iter()
            .collect();
        for range in candidates {
            if let Some(key) = size_split_key(&shared, RangeId(range)) {
                propose_split(&shared, RangeId(range), key, "size");
            }
        }
        if cfg.load_qps > 0 && window_start.elapsed() >= cfg.load_window {
            let secs = window_start.elapsed().as_secs_f64();
            window_start = Instant::now();
            let loads: Vec<(u64, LoadStats)> = {
                let keys: Vec<u64> = shared.load.iter().map(|e| *e.key()).collect();
                keys.into_iter()
                    .filter_map(|k| shared.load.remove(&k))
                    .collect()
            };
            for (range, mut stats) in loads {
                if (stats.requests as f64 / secs) < cfg.load_qps as f64 {
                    continue;
                }
                let Some(desc) = leader_descriptor(&shared, RangeId(range)) else {
                    continue;
                };
                stats.sample.sort();
                let median = stats.sample[stats.sample.len() / 2].clone();
                if desc.contains(&median) && median[..] != desc.start_key[..] {
                    propose_split(&shared, RangeId(range), median, "load");
                }
            }
        }
    }
}

/// The descriptor of `range` if this node's replica leads it.
fn leader_descriptor(shared: &Shared, range: RangeId) -> Option<RangeDescriptor> {
    let cell = shared.cell(range)?;
    let guard = cell.replica.lock();
    let r = guard.as_ref()?;
    if r.is_leader() {
        r.descriptor().cloned()
    } else {
        None
    }
}

/// What one scan of a range's keys tells.
pub(crate) struct RangeSize {
    pub(crate) keys: u64,
    pub(crate) bytes: u64,
    /// The key in the middle by count, if the range has at least two keys and it is not the
    /// range's start key (a split there would leave the left side empty).
    pub(crate) middle_key: Option<Vec<u8>>,
}

/// Reads every key of `desc` once: fine for ranges of the size splits are configured for.
pub(crate) fn measure(engine: &Engine, desc: &RangeDescriptor) -> crate::error::Result<RangeSize> {
    let rows = engine.scan(&desc.start_key, &desc.end_key, usize::MAX)?;
    let bytes = rows.iter().map(|(k, v)| (k.len() + v.len()) as u64).sum();
    let middle_key = (rows.len() >= 2)
        .then(|| rows[rows.len() / 2].0.clone())
        .filter(|mid| mid[..] != desc.start_key[..]);
    Ok(RangeSize {
        keys: rows.len() as u64,
        bytes,
        middle_key,
    })
}

/// Measures `range` and returns its middle key if it is over a size limit.
fn size_split_key(shared: &Shared, range: RangeId) -> Option<Vec<u8>> {
    let cfg = &shared.config.split;
    let desc = leader_descriptor(shared, range)?;
    let size = measure(&shared.engine, &desc).ok()?;
    let too_big = (cfg.max_range_bytes > 0 && size.bytes > cfg.max_range_bytes)
        || (cfg.max_range_keys > 0 && size.keys > cfg.max_range_keys);
    if too_big {
        size.middle_key
    } else {
        None
    }
}

fn propose_split(shared: &Shared, range: RangeId, key: Vec<u8>, why: &'static str) {
    // This thread may wait on the system range: it only measures and proposes splits, and
    // the wait is bounded by the proposal timeout. One split in ID_LEASE_BLOCK waits at all.
    let new_range_id = match shared.take_range_id() {
        Some(id) => id,
        None => {
            let leased = shared
                .lease_range_ids()
                .and_then(|rx| shared.add_range_ids(rx.blocking_recv().ok()));
            match leased.map(|()| shared.take_range_id()) {
                Ok(Some(id)) => id,
                Ok(None) => return,
                Err(e) => {
                    tracing::warn!(%range, "automatic split not proposed: {e}");
                    return;
                }
            }
        }
    };
    // Nobody awaits the outcome: the token only lets the replica report it (and expire).
    let (token, _rx) = shared.pending.register(Duration::from_secs(30));
    let msg = PeerMsg::Split {
        token,
        split_key: key,
        new_range_id,
    };
    if shared.post(range, msg).is_ok() {
        metrics::counter!("flotilla_runtime_auto_splits_proposed_total", "trigger" => why)
            .increment(1);
        tracing::info!(%range, trigger = why, "proposing automatic split");
    }
}
