//! raft-rs logs through `slog`; this drain forwards its records to `tracing` so that a node
//! has one log stream.
//!
//! One logger per node, shared by every replica: a child logger per replica (`Logger::new`
//! with the group as a key-value) costs two heap allocations that an idle replica would hold
//! for nothing (raft-rs already makes its own child per `RawNode`, adding `raft_id`, the
//! replica id). The group a record is about comes instead from the thread that drives the
//! replica: whoever runs a replica's phases does it inside [`in_group`], and the drain adds
//! `group=` from there.

use std::cell::Cell;
use std::fmt::Write as _;

use flotilla_proto::RangeId;
use slog::{Drain, Key, OwnedKVList, Record, Serializer, KV};

thread_local! {
    /// The group whose replica this thread is running, for the records raft-rs logs meanwhile.
    static GROUP: Cell<Option<u64>> = const { Cell::new(None) };
}

/// Runs `f` (phases of one replica of `range`) with raft-rs's records tagged `group=range`.
pub(crate) fn in_group<T>(range: RangeId, f: impl FnOnce() -> T) -> T {
    /// Restores the outer group even if `f` panics (a worker catches a replica's panic and
    /// goes on with the next replica).
    struct Restore(Option<u64>);
    impl Drop for Restore {
        fn drop(&mut self) {
            GROUP.with(|g| g.set(self.0));
        }
    }
    let _restore = Restore(GROUP.with(|g| g.replace(Some(range.0))));
    f()
}

/// A slog drain that emits each record as a `tracing` event on target `raft`.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct TracingDrain;

struct KvFormatter(String);

impl Serializer for KvFormatter {
    fn emit_arguments(&mut self, key: Key, val: &std::fmt::Arguments<'_>) -> slog::Result {
        let _ = write!(self.0, " {key}={val}");
        Ok(())
    }
}

impl Drain for TracingDrain {
    type Ok = ();
    type Err = slog::Never;

    fn log(&self, record: &Record<'_>, values: &OwnedKVList) -> Result<(), slog::Never> {
        // Formatting is skipped entirely when tracing would drop the event anyway.
        let enabled = match record.level() {
            slog::Level::Critical | slog::Level::Error => tracing::enabled!(tracing::Level::ERROR),
            slog::Level::Warning => tracing::enabled!(tracing::Level::WARN),
            slog::Level::Info => tracing::enabled!(tracing::Level::INFO),
            slog::Level::Debug => tracing::enabled!(tracing::Level::DEBUG),
            slog::Level::Trace => tracing::enabled!(tracing::Level::TRACE),
        };
        if !enabled {
            return Ok(());
        }
        let mut kv = KvFormatter(String::new());
        if let Some(group) = GROUP.with(Cell::get) {
            let _ = write!(kv.0, " group={group}");
        }
        let _ = values.serialize(record, &mut kv);
        let _ = record.kv().serialize(record, &mut kv);
        let msg = record.msg();
        let kv = kv.0;
        match record.level() {
            slog::Level::Critical | slog::Level::Error => {
                tracing::error!(target: "raft", "{msg}{kv}")
            }
            slog::Level::Warning => tracing::warn!(target: "raft", "{msg}{kv}"),
            slog::Level::Info => tracing::info!(target: "raft", "{msg}{kv}"),
            slog::Level::Debug => tracing::debug!(target: "raft", "{msg}{kv}"),
            slog::Level::Trace => tracing::trace!(target: "raft", "{msg}{kv}"),
        }
        Ok(())
    }
}

/// The root logger of a NodeGroup.
pub(crate) fn root_logger(node: u64) -> slog::Logger {
    slog::Logger::root(TracingDrain.fuse(), slog::o!("node" => node))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn current() -> Option<u64> {
        GROUP.with(Cell::get)
    }

    #[test]
    fn in_group_tags_the_thread_and_restores_the_outer_group_even_after_a_panic() {
        assert_eq!(current(), None);
        in_group(RangeId(7), || {
            assert_eq!(current(), Some(7));
            in_group(RangeId(8), || assert_eq!(current(), Some(8)));
            assert_eq!(current(), Some(7));
            let panicked = std::panic::catch_unwind(|| in_group(RangeId(9), || panic!("replica")));
            assert!(panicked.is_err());
            assert_eq!(current(), Some(7));
        });
        assert_eq!(current(), None);
    }
}
