//! Storage benchmark: synced group commit of one log entry per group, for 1, 100 and 10,000
//! groups per batch, on one RocksDB engine in a temporary directory.
//!
//! Criterion measures each configuration (throughput in entries); afterwards a plain timed loop
//! measures the same thing again and prints one machine-readable line per configuration:
//!
//! ```text
//! RESULT {"bench":"storage_append","groups_per_batch":N,"entries_per_sec":X,"bytes_per_sec":X,"batch_ms_median":X}
//! ```
//!
//! `entries_per_sec` and `bytes_per_sec` are computed from the median batch time; bytes are the
//! encoded write batch (log keys, encoded entries, RocksDB record headers), i.e. what goes to
//! the WAL. Results are in docs/BENCHMARKS.md. Run with `cargo bench --bench storage`.

use std::sync::Arc;
use std::time::{Duration, Instant};

use criterion::{BenchmarkId, Criterion, Throughput};
use flotilla_proto::meta::RangeDescriptor;
use flotilla_store::{Engine, GroupStorage, StoreConfig};
use raft::prelude::{ConfState, Entry};

/// Groups per batch, with the number of batches the timed loop measures.
const CONFIGS: [(usize, usize); 3] = [(1, 1000), (100, 500), (10_000, 30)];
/// Payload of every entry, in bytes (a small client command).
const PAYLOAD_BYTES: usize = 64;
/// Batches written before the timed loop starts measuring.
const WARMUP_BATCHES: usize = 5;

/// One engine with `groups` initialized groups, and the next log index to append.
struct Fixture {
    _dir: tempfile::TempDir,
    engine: Arc<Engine>,
    groups: Vec<GroupStorage>,
    next: u64,
    payload: Vec<u8>,
}

impl Fixture {
    fn new(groups: usize) -> Fixture {
        let dir = tempfile::TempDir::new().expect("temp dir");
        let engine = Engine::open(dir.path(), StoreConfig::default()).expect("open engine");
        let cs = ConfState {
            voters: vec![1],
            ..Default::default()
        };
        let mut batch = engine.batch();
        let groups = (1..=groups as u64)
            .map(|id| {
                let desc = RangeDescriptor {
                    range_id: id,
                    start_key: format!("r{id:08}").into_bytes().into(),
                    end_key: format!("r{:08}", id + 1).into_bytes().into(),
                    ..Default::default()
                };
                GroupStorage::initialize(engine.clone(), desc, cs.clone(), 5, 5, &mut batch)
            })
            .collect();
        engine.write(batch, true).expect("write initial state");
        Fixture {
            _dir: dir,
            engine,
            groups,
            next: 6,
            payload: vec![0xab; PAYLOAD_BYTES],
        }
    }

    /// Appends one entry to every group in one batch and writes it with sync. Returns the
    /// encoded size of the batch.
    fn append_round(&mut self) -> usize {
        let mut batch = self.engine.batch();
        let e = Entry {
            index: self.next,
            term: 5,
            data: self.payload.clone(),
            ..Default::default()
        };
        for g in &mut self.groups {
            g.append(std::slice::from_ref(&e), &mut batch)
                .expect("append");
        }
        let bytes = batch.size_in_bytes();
        self.engine.write(batch, true).expect("synced write");
        self.next += 1;
        bytes
    }
}

fn criterion_benches(c: &mut Criterion) {
    let mut group = c.benchmark_group("storage_append");
    group.sample_size(10);
    for (groups, _) in CONFIGS {
        let (warm_up, measure) = if groups >= 10_000 {
            (Duration::from_secs(1), Duration::from_secs(4))
        } else {
            (Duration::from_millis(500), Duration::from_secs(2))
        };
        group.warm_up_time(warm_up).measurement_time(measure);
        group.throughput(Throughput::Elements(groups as u64));
        let mut fx = Fixture::new(groups);
        group.bench_function(
            BenchmarkId::new("synced_one_entry_per_group", groups),
            |b| b.iter(|| fx.append_round()),
        );
    }
    group.finish();
}

/// The plain timed loop behind the `RESULT` lines; returns the line's JSON.
fn timed_loop(groups: usize, batches: usize) -> String {
    let mut fx = Fixture::new(groups);
    for _ in 0..WARMUP_BATCHES {
        fx.append_round();
    }
    let mut times = Vec::with_capacity(batches);
    let mut bytes = 0;
    for _ in 0..batches {
        let t = Instant::now();
        bytes = fx.append_round();
        times.push(t.elapsed().as_secs_f64());
    }
    times.sort_by(f64::total_cmp);
    let median = times[times.len() / 2];
    // Written by hand to keep the field order stable for whoever greps these lines.
    format!(
        r#"{{"bench":"storage_append","groups_per_batch":{groups},"entries_per_sec":{:.0},"bytes_per_sec":{:.0},"batch_ms_median":{:.3}}}"#,
        groups as f64 / median,
        bytes as f64 / median,
        median * 1000.0,
    )
}

fn main() {
    // `cargo bench` passes `--bench`; `cargo test --benches` does not, and then criterion runs
    // each benchmark once as a smoke test and the timed loop is kept as short.
    let bench_mode = std::env::args().any(|a| a == "--bench");
    let mut c = Criterion::default().configure_from_args();
    criterion_benches(&mut c);
    c.final_summary();
    let started = Instant::now();
    for (groups, batches) in CONFIGS {
        if bench_mode {
            println!("RESULT {}", timed_loop(groups, batches));
        } else {
            // Two batches prove nothing about speed: not labelled RESULT.
            println!("smoke test, not a result: {}", timed_loop(groups, 2));
        }
    }
    eprintln!("timed loop took {:?}", started.elapsed());
}
