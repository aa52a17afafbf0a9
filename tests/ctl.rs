//! `flotilla-ctl` against a live cluster: three `flotilla-node` processes on 127.0.0.1 (free
//! ports picked at run time, killed by pid on drop) and the built `flotilla-ctl` binary run
//! against them: status, kv put/get, ranges (table and JSON, with sizes), split,
//! transfer-leader, members remove/add/promote/demote, kv scan/cas/del, merge, and a clear error with a non-zero exit when no
//! endpoint can be reached.
//!
//! `flotilla-ctl` is another package's binary: it is found beside `flotilla-node` in the
//! target directory, which `cargo build --workspace` (or nextest on the workspace) fills.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use flotilla_benchkit::nodes::{Ctl, Layout, NodeProcs};
use serde_json::Value;

const T: Duration = Duration::from_secs(30);
const RANGES: usize = 4;

fn ctl_binary() -> PathBuf {
    flotilla_benchkit::nodes::ctl_beside(Path::new(env!("CARGO_BIN_EXE_flotilla-node"))).unwrap()
}

/// The three node processes (killed on drop, their logs printed if the test failed) and the
/// endpoints to give `flotilla-ctl`.
struct Cluster {
    _procs: NodeProcs,
    endpoints: String,
}

impl Cluster {
    fn start() -> Cluster {
        // The test changes replicas and leaders itself.
        let layout =
            Layout::local(3, RANGES)
                .unwrap()
                .with_args(&["--tick-ms", "20", "--no-schedule"]);
        let procs =
            NodeProcs::start(Path::new(env!("CARGO_BIN_EXE_flotilla-node")), layout).unwrap();
        Cluster {
            endpoints: procs.endpoints(),
            _procs: procs,
        }
    }

    /// Runs `flotilla-ctl --endpoints <all> args...`.
    fn ctl(&self, args: &[&str]) -> Output {
        self.runner().run(args).unwrap()
    }

    fn runner(&self) -> Ctl {
        Ctl::beside(
            Path::new(env!("CARGO_BIN_EXE_flotilla-node")),
            &*self.endpoints,
        )
        .unwrap()
    }

    /// Runs it until it succeeds (the cluster may still be electing), returning stdout.
    fn ctl_ok(&self, args: &[&str]) -> String {
        let deadline = Instant::now() + T;
        loop {
            let out = self.ctl(args);
            if out.status.success() {
                return String::from_utf8(out.stdout).unwrap();
            }
            assert!(
                Instant::now() < deadline,
                "flotilla-ctl {args:?} kept failing: {}",
                String::from_utf8_lossy(&out.stderr)
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// The range table as JSON, once `ok` accepts it.
    fn ranges_until(&self, what: &str, ok: impl Fn(&[Value]) -> bool) -> Vec<Value> {
        let list = self
            .runner()
            .until(&["ranges", "-o", "json"], what, T, |v| {
                v.as_array().is_some_and(|l| ok(l))
            });
        list.unwrap().as_array().unwrap().clone()
    }
}

fn leader(r: &Value) -> Option<u64> {
    r["leader_node_id"].as_u64()
}

#[test]
fn flotilla_ctl_operates_a_three_node_cluster() {
    let c = Cluster::start();
    let all_led = |l: &[Value]| l.len() == RANGES && l.iter().all(|r| leader(r).is_some());
    c.ranges_until("led", all_led);

    // status: one row per node, all reachable; JSON parses.
    let status: Value = serde_json::from_str(&c.ctl_ok(&["status", "-o", "json"])).unwrap();
    let nodes = status.as_array().unwrap();
    assert_eq!(nodes.len(), 3);
    assert!(nodes.iter().all(|n| n["reachable"] == true), "{status:#}");
    let leaders: u64 = nodes.iter().map(|n| n["leaders"].as_u64().unwrap()).sum();
    assert_eq!(leaders, RANGES as u64);
    let table = c.ctl_ok(&["status"]);
    assert!(
        table.starts_with("ENDPOINT") && table.lines().count() == 4,
        "{table}"
    );

    // nodes: every node up with the statistics it published on the node-pair streams (the
    // 3 × RANGES replicas add up); placement: the scheduler is off here, nothing decided.
    let deadline = Instant::now() + T;
    loop {
        let v: Value = serde_json::from_str(&c.ctl_ok(&["nodes", "-o", "json"])).unwrap();
        let list = v["nodes"].as_array().unwrap();
        let replicas: u64 = list.iter().map(|n| n["replicas"].as_u64().unwrap()).sum();
        if list.len() == 3
            && list
                .iter()
                .all(|n| n["status"] == "up" && n["has_stats"] == true)
            && replicas == 3 * RANGES as u64
        {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "nodes never all up with stats: {v:#}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(c.ctl_ok(&["nodes"]).contains("STATUS"));
    let placement: Value = serde_json::from_str(&c.ctl_ok(&["placement", "-o", "json"])).unwrap();
    let summary = placement["nodes"].as_array().unwrap();
    assert_eq!(summary.len(), 3);
    assert!(
        summary.iter().all(|n| n["enabled"] == false),
        "{placement:#}"
    );
    assert_eq!(placement["events"].as_array().unwrap().len(), 0);

    // kv put / get, in both formats.
    assert_eq!(
        c.ctl_ok(&["kv", "put", "k00000001-a", "hello"]).trim(),
        "OK"
    );
    assert_eq!(c.ctl_ok(&["kv", "get", "k00000001-a"]).trim(), "hello");
    let got: Value =
        serde_json::from_str(&c.ctl_ok(&["kv", "get", "k00000001-a", "-o", "json"])).unwrap();
    assert_eq!(got["value"], "hello");
    let missing = c.ctl(&["kv", "get", "k00000001-missing"]);
    assert!(!missing.status.success());
    assert!(String::from_utf8_lossy(&missing.stderr).contains("not found"));
    for i in 0..20 {
        c.ctl_ok(&["kv", "put", &format!("k00000002-{i:02}"), "v"]);
    }

    // ranges: the table has every column, and the sizes count the keys just written.
    let table = c.ctl_ok(&["ranges"]);
    let header = table.lines().next().unwrap();
    for col in ["ID", "START", "END", "REPLICAS", "LEADER", "KEYS", "SIZE"] {
        assert!(header.contains(col), "{table}");
    }
    assert_eq!(table.lines().count(), RANGES + 1, "{table}");
    let list = c.ranges_until("sized", |l| {
        l.iter()
            .any(|r| r["start"] == "k00000002" && r["keys"] == 20)
    });
    let r2 = list.iter().find(|r| r["start"] == "k00000002").unwrap();
    assert!(r2["bytes"].as_u64().unwrap() > 20 * 10, "{r2:#}");
    let r2_id = r2["range_id"].as_u64().unwrap();

    // split at a key: two ranges where there was one, the data still readable.
    let halves: Value = serde_json::from_str(&c.ctl_ok(&[
        "split",
        "--range",
        &format!("r{r2_id}"),
        "--at",
        "k00000002-10",
        "-o",
        "json",
    ]))
    .unwrap();
    assert_eq!(halves.as_array().unwrap().len(), 2, "{halves:#}");
    assert_eq!(halves[1]["start"], "k00000002-10");
    let right_id = halves[1]["range_id"].as_u64().unwrap();
    c.ranges_until("split", |l| {
        l.len() == RANGES + 1 && l.iter().all(|r| leader(r).is_some())
    });
    assert_eq!(c.ctl_ok(&["kv", "get", "k00000002-15"]).trim(), "v");

    // transfer-leader: the right half's leadership moves to another node.
    let list = c.ranges_until("led after the split", |l| {
        l.iter()
            .any(|r| r["range_id"] == right_id && leader(r).is_some())
    });
    let from = leader(list.iter().find(|r| r["range_id"] == right_id).unwrap()).unwrap();
    let to = from % 3 + 1;
    let moved: Value = serde_json::from_str(&c.ctl_ok(&[
        "transfer-leader",
        "--range",
        &right_id.to_string(),
        "--to",
        &to.to_string(),
        "-o",
        "json",
    ]))
    .unwrap();
    assert_eq!(moved[0]["leader_node_id"], to, "{moved:#}");
    c.ranges_until("led by the new node", |l| {
        l.iter()
            .any(|r| r["range_id"] == right_id && leader(r) == Some(to))
    });

    // members: remove the replica on a node that does not lead, then add one back.
    let gone = to % 3 + 1;
    let removed: Value = serde_json::from_str(&c.ctl_ok(&[
        "members",
        "remove",
        "--range",
        &right_id.to_string(),
        "--node",
        &gone.to_string(),
        "-o",
        "json",
    ]))
    .unwrap();
    assert_eq!(
        removed[0]["replicas"].as_array().unwrap().len(),
        2,
        "{removed:#}"
    );
    let added: Value = serde_json::from_str(&c.ctl_ok(&[
        "members",
        "add",
        "--range",
        &right_id.to_string(),
        "--node",
        &gone.to_string(),
        "--learner",
        "-o",
        "json",
    ]))
    .unwrap();
    let replicas = added[0]["replicas"].as_array().unwrap();
    assert_eq!(replicas.len(), 3, "{added:#}");
    assert!(replicas
        .iter()
        .any(|r| r["node_id"] == gone && r["learner"] == true));
    let promoted: Value = serde_json::from_str(&c.ctl_ok(&[
        "members",
        "promote",
        "--range",
        &right_id.to_string(),
        "--node",
        &gone.to_string(),
        "-o",
        "json",
    ]))
    .unwrap();
    assert!(promoted[0]["replicas"]
        .as_array()
        .unwrap()
        .iter()
        .all(|r| r["learner"] == false));
    assert_eq!(c.ctl_ok(&["kv", "get", "k00000002-15"]).trim(), "v");

    // members demote: the voter becomes a learner; promote it back for the merge below.
    let demoted: Value = serde_json::from_str(&c.ctl_ok(&[
        "members",
        "demote",
        "--range",
        &right_id.to_string(),
        "--node",
        &gone.to_string(),
        "-o",
        "json",
    ]))
    .unwrap();
    assert!(
        demoted[0]["replicas"]
            .as_array()
            .unwrap()
            .iter()
            .any(|r| r["node_id"] == gone && r["learner"] == true),
        "{demoted:#}"
    );
    c.ctl_ok(&[
        "members",
        "promote",
        "--range",
        &right_id.to_string(),
        "--node",
        &gone.to_string(),
    ]);

    // kv scan: across three ranges (k00000001, and both halves of the split), following the
    // continuations; a limit stops early and says so.
    let scan = |args: &[&str]| -> Value {
        let mut all = vec!["kv", "scan", "k00000001", "k00000003", "-o", "json"];
        all.extend_from_slice(args);
        serde_json::from_str(&c.ctl_ok(&all)).unwrap()
    };
    let everything = scan(&["--limit", "0"]);
    assert_eq!(everything["count"], 21, "{everything:#}");
    assert_eq!(everything["complete"], true);
    let keys: Vec<&str> = everything["pairs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["key"].as_str().unwrap())
        .collect();
    let mut sorted = keys.clone();
    sorted.sort_unstable();
    assert_eq!(keys, sorted, "in key order");
    assert_eq!(keys[0], "k00000001-a");
    assert_eq!(keys[20], "k00000002-19");
    let first = scan(&["--limit", "12"]);
    assert_eq!(first["count"], 12, "{first:#}");
    assert_eq!(first["complete"], false);
    assert_eq!(first["pairs"][11]["key"], "k00000002-10");
    let table = c.ctl_ok(&["kv", "scan", "k00000002-18"]);
    assert!(table.starts_with("KEY"), "{table}");
    assert!(table.contains("k00000002-19"), "{table}");

    // kv cas: a mismatch says so and shows the current value; a match swaps; "absent" creates.
    let miss: Value =
        serde_json::from_str(&c.ctl_ok(&["kv", "cas", "k00000001-a", "nope", "x", "-o", "json"]))
            .unwrap();
    assert_eq!(miss["swapped"], false, "{miss:#}");
    assert_eq!(miss["current"], "hello");
    let out = c.ctl_ok(&["kv", "cas", "k00000001-a", "hello", "world"]);
    assert_eq!(out.trim(), "swapped; current value: world");
    let out = c.ctl_ok(&["kv", "cas", "k00000001-a", "absent", "again"]);
    assert_eq!(out.trim(), "not swapped; current value: world");
    let created: Value = serde_json::from_str(&c.ctl_ok(&[
        "kv",
        "cas",
        "k00000001-new",
        "absent",
        "fresh",
        "-o",
        "json",
    ]))
    .unwrap();
    assert_eq!(created["swapped"], true, "{created:#}");
    assert_eq!(created["current"], "fresh");

    // kv del: the old value is reported; a second delete finds nothing.
    let deleted: Value =
        serde_json::from_str(&c.ctl_ok(&["kv", "del", "k00000001-new", "-o", "json"])).unwrap();
    assert_eq!(deleted["deleted"], true, "{deleted:#}");
    assert_eq!(deleted["previous"], "fresh");
    assert_eq!(
        c.ctl_ok(&["kv", "del", "k00000001-new"]).trim(),
        "not found (nothing to delete)"
    );
    let gone_key = c.ctl(&["kv", "get", "k00000001-new"]);
    assert!(!gone_key.status.success());

    // merge: the split's right half goes back into its left half; its keys still read.
    let left_id = halves[0]["range_id"].as_u64().unwrap();
    let merged: Value = serde_json::from_str(&c.ctl_ok(&[
        "merge",
        "--source",
        &right_id.to_string(),
        "--target",
        &left_id.to_string(),
        "-o",
        "json",
    ]))
    .unwrap();
    assert_eq!(merged[0]["range_id"], left_id, "{merged:#}");
    assert_eq!(merged[0]["start"], "k00000002", "{merged:#}");
    c.ranges_until("merged", |l| {
        l.len() == RANGES && l.iter().all(|r| r["range_id"] != right_id)
    });
    assert_eq!(c.ctl_ok(&["kv", "get", "k00000002-15"]).trim(), "v");
}

#[test]
fn unreachable_endpoints_give_a_clear_error_and_a_failure_status() {
    // Ports that were free a moment ago: nothing listens there.
    let a = flotilla_benchkit::free_addr("127.0.0.1").unwrap();
    let b = flotilla_benchkit::free_addr("127.0.0.1").unwrap();
    let started = Instant::now();
    let out = Command::new(ctl_binary())
        .args([
            "--endpoints",
            &format!("{a},{b}"),
            "--timeout",
            "1s",
            "ranges",
        ])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("cannot reach the cluster"), "{err}");
    assert!(
        err.contains(&a.to_string()) && err.contains(&b.to_string()),
        "{err}"
    );
    // Bounded by the timeout per endpoint, not a default of minutes.
    assert!(started.elapsed() < T, "{:?}", started.elapsed());
    // A malformed endpoint is named.
    let out = Command::new(ctl_binary())
        .args(["--endpoints", "not an address", "status"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("not an address"));
}
