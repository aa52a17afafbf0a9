//! raft-rs logs through `slog`; this drain forwards its records to `tracing` so that a node
//! has one log stream. One root logger is shared; a replica's logger only adds its group and
//! replica ids as key-values.

use std::fmt::Write as _;

use slog::{Drain, Key, OwnedKVList, Record, Serializer, KV};

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
