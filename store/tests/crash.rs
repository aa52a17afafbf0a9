//! Crash test: a writer process is killed with SIGKILL in the middle of a stream of synced
//! batches, and the engine it leaves behind must hold every batch it reported synced, and no
//! batch in part.
//!
//! The parent test re-executes this test binary to run [`crash_child_writer`] in a child
//! process (it does nothing unless `FLOTILLA_CRASH_CHILD_DIR` is set). The child writes batch
//! `n` = one log entry (index `INIT + n`), hard state, apply state and data keys for each of
//! [`GROUPS`] groups, all in one `WriteBatch`, and prints `synced <n>` once `write(batch, true)`
//! has returned. The parent kills it after a random number of such lines, reopens the engine
//! and checks it with [`verify`]; then it starts a new child on the same directory, which
//! recovers and continues, for [`ROUNDS`] rounds.

use std::io::{BufRead, BufReader, Read, Write};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use flotilla_proto::meta::RangeDescriptor;
use flotilla_proto::RangeId;
use flotilla_store::{Engine, GroupStorage, StoreConfig};
use raft::prelude::{ConfState, Entry, HardState};
use raft::{GetEntriesContext, Storage};
use rand::{Rng, SeedableRng};

const CHILD_ENV: &str = "FLOTILLA_CRASH_CHILD_DIR";
const CHILD_TEST: &str = "crash_child_writer";
/// Groups written by every batch.
const GROUPS: u64 = 50;
/// Groups are created truncated at this index; batch `n` writes log index `INIT + n`.
const INIT: u64 = 5;
const TERM: u64 = 3;
/// Every `COMPACT_EVERY` batches the batch also compacts each log to `n - COMPACT_LAG`, so
/// that range deletes are part of what must be atomic.
const COMPACT_EVERY: u64 = 16;
const COMPACT_LAG: u64 = 8;
const ROUNDS: usize = 5;
/// The parent kills the child after this many `synced` lines of a round (seeded).
const KILL_AFTER: std::ops::RangeInclusive<u64> = 20..=200;
/// Upper bound on one round (start, run, kill, verify); the whole test stays well under a
/// minute on a slow disk.
const ROUND_TIMEOUT: Duration = Duration::from_secs(25);

fn config() -> StoreConfig {
    StoreConfig {
        log_cache_entries: 4,
        block_cache_bytes: 4 << 20,
        write_buffer_bytes: 4 << 20,
        ..StoreConfig::default()
    }
}

fn group_id(g: u64) -> RangeId {
    RangeId(100 + g)
}

fn descriptor(g: u64) -> RangeDescriptor {
    let id = group_id(g).0;
    RangeDescriptor {
        range_id: id,
        start_key: format!("g{id}/").into_bytes().into(),
        end_key: format!("g{id}0").into_bytes().into(),
        ..Default::default()
    }
}

/// The data key batch `n` writes for group `g` (inside the group's range).
fn data_key(g: u64, n: u64) -> Vec<u8> {
    format!("g{}/b{n:08}", group_id(g).0).into_bytes()
}

/// The data key every batch overwrites with its number, for group `g`.
fn last_key(g: u64) -> Vec<u8> {
    format!("g{}/last", group_id(g).0).into_bytes()
}

fn payload(g: u64, n: u64) -> Vec<u8> {
    format!("group {g} batch {n} ")
        .repeat(1 + (n % 4) as usize)
        .into_bytes()
}

/// The truncation index of every log after batch `n`.
fn truncated_after(n: u64) -> u64 {
    let last_compaction = n - n % COMPACT_EVERY;
    if last_compaction == 0 {
        INIT
    } else {
        INIT + last_compaction - COMPACT_LAG
    }
}

/// Batch 0: creates the groups.
fn initialize(engine: &Arc<Engine>) -> Vec<GroupStorage> {
    let mut batch = engine.batch();
    let cs = ConfState {
        voters: vec![1],
        ..Default::default()
    };
    let groups = (0..GROUPS)
        .map(|g| {
            GroupStorage::initialize(
                engine.clone(),
                descriptor(g),
                cs.clone(),
                INIT,
                TERM,
                &mut batch,
            )
        })
        .collect();
    engine.write(batch, true).expect("write batch 0");
    groups
}

/// Adds batch `n` for groups `which` to one write batch and writes it with sync. The crash
/// test writes every group; [`verifier_detects_lost_and_half_applied_batches`] writes some,
/// to build the damage the verifier must catch.
fn write_batch_n(
    engine: &Arc<Engine>,
    groups: &mut [GroupStorage],
    n: u64,
    which: std::ops::Range<usize>,
) {
    let index = INIT + n;
    let mut batch = engine.batch();
    for (g, s) in groups
        .iter_mut()
        .enumerate()
        .take(which.end)
        .skip(which.start)
    {
        let g = g as u64;
        let e = Entry {
            index,
            term: TERM,
            data: payload(g, n),
            ..Default::default()
        };
        s.append(&[e], &mut batch).expect("append");
        let hs = HardState {
            term: TERM,
            vote: 1,
            commit: index,
        };
        s.set_hard_state(hs, &mut batch);
        s.set_applied(index, TERM, &mut batch);
        batch.put_data(&data_key(g, n), &payload(g, n));
        batch.put_data(&last_key(g), &n.to_be_bytes());
        if n.is_multiple_of(COMPACT_EVERY) {
            s.compact(truncated_after(n), &mut batch).expect("compact");
        }
    }
    engine.write(batch, true).expect("synced write");
}

/// The child: recovers (or creates) the groups and writes batches until it is killed.
#[test]
fn crash_child_writer() {
    let Some(dir) = std::env::var_os(CHILD_ENV) else {
        return; // Only meaningful as the child of `kill9_loses_no_synced_batch`.
    };
    let engine = Engine::open(&dir, config()).expect("child: open");
    let recovered = engine.recover().expect("child: recover");
    let mut groups: Vec<GroupStorage> = if recovered.is_empty() {
        initialize(&engine)
    } else {
        recovered
            .into_iter()
            .map(|r| GroupStorage::recover(engine.clone(), r).expect("child: recover group"))
            .collect()
    };
    assert_eq!(groups.len() as u64, GROUPS);
    let mut n = groups[0].last_index_value() - INIT;
    let deadline = Instant::now() + ROUND_TIMEOUT * 2;
    // Normally killed long before the deadline; the bound keeps an orphaned child from
    // writing forever if the parent dies.
    while Instant::now() < deadline {
        n += 1;
        write_batch_n(&engine, &mut groups, n, 0..GROUPS as usize);
        // Only now, after the synced write returned, is batch n reported.
        let mut out = std::io::stdout().lock();
        writeln!(out, "synced {n}").expect("child: stdout");
        out.flush().expect("child: flush");
    }
}

/// Checks the engine at `dir` after a crash. `reported` is the highest batch the child said
/// was synced. Returns the batch the engine holds.
fn verify(dir: &Path, reported: u64) -> Result<u64, String> {
    let engine = Engine::open(dir, config()).map_err(|e| format!("reopen: {e}"))?;
    let recovered = engine.recover().map_err(|e| format!("recover: {e}"))?;
    if recovered.len() as u64 != GROUPS {
        return Err(format!(
            "{} groups recovered, want {GROUPS}",
            recovered.len()
        ));
    }
    // A half-applied batch shows as groups whose logs end at different batches.
    let lasts: Vec<u64> = recovered.iter().map(|r| r.last_index - INIT).collect();
    let n = lasts[0];
    if lasts.iter().any(|&l| l != n) {
        return Err(format!(
            "half-applied batch: groups end at batches {lasts:?}"
        ));
    }
    if n < reported {
        return Err(format!(
            "batch {reported} was reported synced, the engine ends at batch {n}"
        ));
    }
    // The child cannot have written batch reported+2 before printing reported+1.
    if n > reported + 1 {
        return Err(format!(
            "engine holds batch {n}, but only {reported} was reported"
        ));
    }
    let ctx = || GetEntriesContext::empty(false);
    for (g, rec) in recovered.into_iter().enumerate() {
        let g = g as u64;
        let at = format!("group {g} at batch {n}");
        if rec.group != group_id(g) {
            return Err(format!("{at}: recovered {:?}", rec.group));
        }
        if rec.descriptor.as_ref() != Some(&descriptor(g)) {
            return Err(format!("{at}: descriptor {:?}", rec.descriptor));
        }
        let a = rec.apply_state;
        let s = GroupStorage::recover(engine.clone(), rec).map_err(|e| format!("{at}: {e}"))?;
        // The commit index is not written on its own: recovery raises it to the applied one.
        let commit = s.hard_state().commit;
        let want = (INIT + n, INIT + n, truncated_after(n));
        if (commit, a.applied_index, a.truncated_index) != want {
            return Err(format!(
                "{at}: commit/applied/truncated {:?}, want {want:?}",
                (commit, a.applied_index, a.truncated_index)
            ));
        }
        if s.initial_state().unwrap().conf_state.voters != [1] {
            return Err(format!("{at}: lost its membership"));
        }
        let first = s.first_index().unwrap();
        let ents = s
            .entries(first, INIT + n + 1, None, ctx())
            .map_err(|e| format!("{at}: {e}"))?;
        for (i, e) in (first..).zip(&ents) {
            let b = i - INIT;
            if e.index != i || e.term != TERM || e.data != payload(g, b) {
                return Err(format!("{at}: log entry {i} is {e:?}"));
            }
        }
        if ents.len() as u64 != INIT + n + 1 - first {
            return Err(format!(
                "{at}: log holds {} entries from {first}",
                ents.len()
            ));
        }
        let last = engine.get(&last_key(g)).map_err(|e| e.to_string())?;
        if n > 0 && last != Some(n.to_be_bytes().to_vec()) {
            return Err(format!("{at}: last-batch key is {last:?}"));
        }
        // Exactly the data keys of batches 1..=n: none lost, none from a later batch.
        let start = data_key(g, 0);
        let end = format!("g{}/c", group_id(g).0).into_bytes();
        let data = engine
            .scan(&start, &end, usize::MAX)
            .map_err(|e| e.to_string())?;
        let want: Vec<(Vec<u8>, Vec<u8>)> =
            (1..=n).map(|b| (data_key(g, b), payload(g, b))).collect();
        if data != want {
            let batches: Vec<String> = data
                .iter()
                .map(|(k, _)| String::from_utf8_lossy(k).into_owned())
                .collect();
            return Err(format!("{at}: data keys {batches:?}"));
        }
    }
    Ok(n)
}

/// Kills the child if the parent gives up (panic, timeout), so that no writer outlives the test.
struct ChildGuard(Child);

impl Drop for ChildGuard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Runs one child on `dir` and SIGKILLs it after `kill_after` synced lines. Returns the highest
/// batch it reported synced (including lines still in the pipe when it died).
fn run_child_and_kill(dir: &Path, kill_after: u64) -> u64 {
    let deadline = Instant::now() + ROUND_TIMEOUT;
    let exe = std::env::current_exe().expect("current_exe");
    let child = Command::new(exe)
        .args(["--exact", CHILD_TEST, "--nocapture", "--test-threads=1"])
        .env(CHILD_ENV, dir)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn child");
    let mut child = ChildGuard(child);
    let stdout = child.0.stdout.take().expect("stdout");
    let mut stderr = child.0.stderr.take().expect("stderr");
    let (tx, rx) = mpsc::channel();
    let reader = std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            if let Some(n) = line.strip_prefix("synced ") {
                if tx
                    .send(n.trim().parse::<u64>().expect("batch number"))
                    .is_err()
                {
                    break;
                }
            }
        }
    });
    let errors = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = stderr.read_to_string(&mut s);
        s
    });

    let mut seen = 0;
    let mut reported = 0;
    let mut early_exit = None;
    while seen < kill_after {
        let left = deadline.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left) {
            Ok(n) => {
                assert!(n > reported, "batches out of order: {n} after {reported}");
                reported = n;
                seen += 1;
            }
            Err(mpsc::RecvTimeoutError::Timeout) => {
                drop(child);
                panic!("child reported {seen} of {kill_after} batches within {ROUND_TIMEOUT:?}");
            }
            Err(mpsc::RecvTimeoutError::Disconnected) => {
                early_exit = Some(child.0.wait());
                break;
            }
        }
    }
    if let Some(status) = early_exit {
        let err = errors.join().unwrap_or_default();
        panic!("child exited after {seen} batches ({status:?}):\n{err}");
    }
    // SIGKILL, while the child is writing the next batch.
    child.0.kill().expect("SIGKILL child");
    let status = child.0.wait().expect("wait child");
    assert!(
        !status.success(),
        "child was killed, not finished: {status:?}"
    );
    // Lines already in the pipe were printed after a synced write: they count too.
    reader.join().expect("reader thread");
    reported = rx.try_iter().fold(reported, u64::max);
    let _ = errors.join();
    reported
}

/// Kill -9 a writer of synced multi-group batches, several times: nothing reported synced is
/// lost and no batch is half there.
#[test]
fn kill9_loses_no_synced_batch() {
    if std::env::var_os(CHILD_ENV).is_some() {
        return; // The child runs only `crash_child_writer`.
    }
    let started = Instant::now();
    let dir = tempfile::TempDir::new().unwrap();
    let seed: u64 = rand::random();
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut present = 0;
    for round in 0..ROUNDS {
        let kill_after = rng.gen_range(KILL_AFTER);
        let reported = run_child_and_kill(dir.path(), kill_after);
        assert!(
            reported >= present + kill_after,
            "round {round}: reported {reported}"
        );
        present = verify(dir.path(), reported).unwrap_or_else(|e| {
            panic!("round {round} (seed {seed}, kill after {kill_after}): {e}")
        });
        eprintln!(
            "round {round}: killed after {kill_after} batches, reported {reported}, engine holds {present}"
        );
    }
    assert!(
        started.elapsed() < Duration::from_secs(60),
        "took {:?}",
        started.elapsed()
    );
}

/// The verifier itself: it must reject an engine that lost a reported batch or holds part of
/// one, or the crash test proves nothing.
#[test]
fn verifier_detects_lost_and_half_applied_batches() {
    let dir = tempfile::TempDir::new().unwrap();
    {
        let engine = Engine::open(dir.path(), config()).unwrap();
        let mut groups = initialize(&engine);
        for n in 1..=20 {
            write_batch_n(&engine, &mut groups, n, 0..GROUPS as usize);
        }
    }
    assert_eq!(verify(dir.path(), 20), Ok(20));
    assert_eq!(
        verify(dir.path(), 19),
        Ok(20),
        "a synced but unreported batch is fine"
    );
    let lost = verify(dir.path(), 21).unwrap_err();
    assert!(lost.contains("reported synced"), "{lost}");
    assert!(
        verify(dir.path(), 18).is_err(),
        "batch 20 cannot exist if only 18 was reported"
    );
    {
        let engine = Engine::open(dir.path(), config()).unwrap();
        let mut groups: Vec<GroupStorage> = engine
            .recover()
            .unwrap()
            .into_iter()
            .map(|r| GroupStorage::recover(engine.clone(), r).unwrap())
            .collect();
        // Batch 21 for only some of the groups: what a non-atomic write would leave.
        write_batch_n(&engine, &mut groups, 21, 0..GROUPS as usize / 2);
    }
    let half = verify(dir.path(), 20).unwrap_err();
    assert!(half.contains("half-applied"), "{half}");
    {
        // A lost data key of an otherwise complete batch.
        let engine = Engine::open(dir.path(), config()).unwrap();
        let mut groups: Vec<GroupStorage> = engine
            .recover()
            .unwrap()
            .into_iter()
            .map(|r| GroupStorage::recover(engine.clone(), r).unwrap())
            .collect();
        write_batch_n(
            &engine,
            &mut groups,
            21,
            GROUPS as usize / 2..GROUPS as usize,
        );
        let mut batch = engine.batch();
        batch.delete_data(&data_key(7, 13));
        engine.write(batch, true).unwrap();
    }
    let missing = verify(dir.path(), 21).unwrap_err();
    assert!(missing.contains("data keys"), "{missing}");
}
