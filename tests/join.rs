//! A node joins a running cluster with `--join`: three `flotilla-node` processes bootstrap a
//! layout (and the system range), a fourth starts with only `--join` (no id, no peers), gets
//! id 4 from the node registry, is listed by `flotilla-ctl nodes`, is reached by the others
//! (a learner replica of a range added on it catches up and serves the range's data), and
//! keeps its id when it restarts. A node is decommissioned (`flotilla-ctl node decommission`):
//! refused while the others are too few for the replication factor, then drained of every
//! replica (the system range's too) and leadership, and removed, with no write lost. A node
//! killed for good has its replicas rebuilt on the others after `down-time-ms`, with no write
//! lost. Free ports picked at run time; processes killed by pid.

use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use flotilla::proto::kv::kv_client::KvClient;
use flotilla::proto::kv::{GetRequest, ReadConsistency, StatusRequest};
use flotilla_benchkit::nodes::Ctl;
use serde_json::Value;

const T: Duration = Duration::from_secs(30);

fn free_addr() -> SocketAddr {
    flotilla_benchkit::free_addr("127.0.0.1").unwrap()
}

struct Nodes {
    dir: tempfile::TempDir,
    raft: Vec<SocketAddr>,
    client: Vec<SocketAddr>,
    /// Node processes by position (node i + 1 for the bootstrap ones; the joiner last).
    children: Vec<Option<Child>>,
}

impl Nodes {
    /// Room for four nodes on free ports, none started.
    fn new() -> Nodes {
        Nodes {
            dir: tempfile::tempdir().unwrap(),
            raft: (0..4).map(|_| free_addr()).collect(),
            client: (0..4).map(|_| free_addr()).collect(),
            children: (0..4).map(|_| None).collect(),
        }
    }

    /// Starts nodes 1 to 3 (positions 0 to 2), each with `extra` flags, bootstrapping
    /// `ranges` ranges (and the system range) over them; returns when every range is led.
    fn bootstrap_three(&mut self, extra: &[String], ranges: usize) {
        let peers = (0..3)
            .map(|i| format!("{}={}", i + 1, self.raft[i]))
            .collect::<Vec<_>>()
            .join(",");
        for i in 0..3 {
            let mut args = extra.to_vec();
            args.extend([
                "--id".to_string(),
                (i + 1).to_string(),
                "--peers".to_string(),
                peers.clone(),
                "--bootstrap-ranges".to_string(),
                ranges.to_string(),
            ]);
            self.spawn(i, &args);
        }
        self.ctl_until(&["ranges", "--no-sizes", "-o", "json"], "ranges led", |v| {
            every_range_led(v, ranges)
        });
    }

    fn spawn(&mut self, i: usize, extra: &[String]) {
        let log = std::fs::File::options()
            .create(true)
            .append(true)
            .open(self.dir.path().join(format!("p{i}.log")))
            .unwrap();
        let child = Command::new(env!("CARGO_BIN_EXE_flotilla-node"))
            .args(["--raft", &self.raft[i].to_string()])
            .args(["--client", &self.client[i].to_string()])
            .args(["--data-dir", &data_dir(self.dir.path(), i)])
            .args(["--tick-ms", "20"])
            .args(extra)
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("spawn flotilla-node");
        self.children[i] = Some(child);
    }

    fn kill(&mut self, i: usize) {
        if let Some(mut c) = self.children[i].take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    fn endpoints(&self) -> String {
        self.client
            .iter()
            .map(|a| a.to_string())
            .collect::<Vec<_>>()
            .join(",")
    }

    fn ctl(&self, args: &[&str]) -> Output {
        self.ctl_runner().run(args).unwrap()
    }

    /// Runs flotilla-ctl until it succeeds and `ok` accepts its JSON output.
    fn ctl_until(&self, args: &[&str], what: &str, ok: impl Fn(&Value) -> bool) -> Value {
        self.ctl_runner().until(args, what, T, ok).unwrap()
    }

    /// Writes `v-<key>` under 24 keys spread over every range of the layout (by their first
    /// byte); returns the keys.
    fn put_keys(&self) -> Vec<String> {
        let keys: Vec<String> = (0..24u8)
            .map(|i| format!("{}-key-{i}", (b'a' + i) as char))
            .collect();
        for k in &keys {
            let value = format!("v-{k}");
            self.ctl_until(&["kv", "put", k, &value, "-o", "json"], "put", |_| true);
        }
        keys
    }

    /// Reads back every key `put_keys` wrote.
    fn read_keys(&self, keys: &[String]) {
        for k in keys {
            let got = self.ctl_until(&["kv", "get", k, "-o", "json"], "read back", |_| true);
            assert_eq!(got["value"], format!("v-{k}"), "{got:#}");
        }
    }

    /// Starts the fourth node with `--config config --join <node 1>`; returns once it has id
    /// 4 and the cluster sees it up.
    fn join_fourth(&mut self, rt: &tokio::runtime::Runtime, config: &str) {
        let join = self.client[0].to_string();
        let args = ["--config", config, "--join", &join].map(String::from);
        self.spawn(3, &args);
        assert_eq!(node_id_at(rt, self.client[3]), 4);
        self.ctl_until(&["nodes", "-o", "json"], "node 4 up", |v| {
            v["nodes"]
                .as_array()
                .unwrap()
                .iter()
                .any(|x| x["node_id"] == 4 && x["status"] == "up")
        });
    }

    /// Writes a config file: `FAST_SCHEDULE` and then `more` (keys of `[schedule]`); returns
    /// its path.
    fn config_file(&self, more: &str) -> String {
        let path = self.dir.path().join("fast.toml");
        std::fs::write(&path, format!("{FAST_SCHEDULE}{more}")).unwrap();
        path.display().to_string()
    }

    fn ctl_runner(&self) -> Ctl {
        Ctl::beside(
            Path::new(env!("CARGO_BIN_EXE_flotilla-node")),
            self.endpoints(),
        )
        .unwrap()
    }
}

/// Whether `flotilla-ctl ranges -o json` lists `count` ranges, each with a leader.
fn every_range_led(v: &Value, count: usize) -> bool {
    let l = v.as_array().unwrap();
    l.len() == count && l.iter().all(|r| r["leader_node_id"].as_u64().is_some())
}

fn data_dir(root: &Path, i: usize) -> String {
    root.join(format!("n{i}")).display().to_string()
}

impl Drop for Nodes {
    fn drop(&mut self) {
        for i in 0..self.children.len() {
            self.kill(i);
        }
        if std::thread::panicking() {
            for i in 0..self.children.len() {
                let log = std::fs::read_to_string(self.dir.path().join(format!("p{i}.log")))
                    .unwrap_or_default();
                eprintln!("--- process {i} ---");
                for l in log.lines().rev().take(20).collect::<Vec<_>>().iter().rev() {
                    eprintln!("{l}");
                }
            }
        }
    }
}

/// Polls `get` on `client` (a stale read of that node's own replica) until it finds `key`.
fn stale_get(rt: &tokio::runtime::Runtime, client: SocketAddr, key: &[u8]) -> Option<Vec<u8>> {
    rt.block_on(async {
        let deadline = Instant::now() + T;
        loop {
            if let Ok(mut kv) = KvClient::connect(format!("http://{client}")).await {
                let req = GetRequest {
                    key: key.to_vec().into(),
                    consistency: ReadConsistency::Stale as i32,
                    ..Default::default()
                };
                if let Ok(r) = kv.get(req).await {
                    let r = r.into_inner();
                    if r.found {
                        return Some(r.value.to_vec());
                    }
                }
            }
            if Instant::now() >= deadline {
                return None;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    })
}

fn node_id_at(rt: &tokio::runtime::Runtime, client: SocketAddr) -> u64 {
    rt.block_on(async {
        let deadline = Instant::now() + T;
        loop {
            if let Ok(mut kv) = KvClient::connect(format!("http://{client}")).await {
                if let Ok(s) = kv.status(StatusRequest {}).await {
                    return s.into_inner().node_id;
                }
            }
            assert!(Instant::now() < deadline, "{client} never answered");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    })
}

#[test]
fn a_node_joins_with_join_gets_id_4_is_reached_by_the_others_and_keeps_its_id() {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let mut n = Nodes::new();
    // Every range led; then a key written into the first range.
    n.bootstrap_three(&[], 2);
    let led = |v: &Value| every_range_led(v, 2);
    let put = n.ctl(&["kv", "put", "a-key", "a-value"]);
    assert!(
        put.status.success(),
        "{}",
        String::from_utf8_lossy(&put.stderr)
    );

    // The fourth node: no id, no peers, only the join address.
    let join = ["--join".to_string(), n.client[0].to_string()];
    n.spawn(3, &join);
    assert_eq!(node_id_at(&rt, n.client[3]), 4);
    let raft4 = n.raft[3].to_string();
    let client4 = n.client[3].to_string();
    let listed = n.ctl_until(&["registry", "-o", "json"], "node 4 listed", |v| {
        let l = v.as_array().unwrap();
        l.len() == 4
            && l.iter().all(|x| x["state"] == "up")
            && l.iter().any(|x| {
                x["id"] == 4 && x["raft"] == raft4.as_str() && x["client"] == client4.as_str()
            })
    });
    // The bootstrap nodes recorded their own client addresses too.
    for i in 0..3 {
        let c = n.client[i].to_string();
        assert!(
            n.ctl_until(
                &["registry", "-o", "json"],
                "client addresses recorded",
                |v| {
                    v.as_array()
                        .unwrap()
                        .iter()
                        .any(|x| x["client"] == c.as_str())
                }
            )
            .is_array(),
            "{listed:#}"
        );
    }

    // The others reach it: a learner of the first range on node 4 catches up (snapshot or
    // log from the leader) and serves the key from its own replica.
    let ranges = n.ctl_until(&["ranges", "--no-sizes", "-o", "json"], "ranges", led);
    let first = ranges.as_array().unwrap()[0]["range_id"].as_u64().unwrap();
    let added = n.ctl_until(
        &[
            "members",
            "add",
            "--range",
            &first.to_string(),
            "--node",
            "4",
            "--learner",
            "-o",
            "json",
        ],
        "learner added",
        |_| true,
    );
    assert!(
        added[0]["replicas"]
            .as_array()
            .unwrap()
            .iter()
            .any(|r| r["node_id"] == 4),
        "{added:#}"
    );
    assert_eq!(
        stale_get(&rt, n.client[3], b"a-key").as_deref(),
        Some(&b"a-value"[..])
    );

    // Restarted (with the same flags), it keeps id 4 and the registry still lists 4 nodes.
    n.kill(3);
    n.spawn(3, &join);
    assert_eq!(node_id_at(&rt, n.client[3]), 4);
    n.ctl_until(&["registry", "-o", "json"], "still four nodes", |v| {
        v.as_array().unwrap().len() == 4
    });
    assert_eq!(
        stale_get(&rt, n.client[3], b"a-key").as_deref(),
        Some(&b"a-value"[..])
    );
}

/// A scheduler that acts within a second, for the process tests.
const FAST_SCHEDULE: &str = "[schedule]\ninterval-ms = 100\nstable-time-ms = 500\n";

#[test]
fn a_decommissioned_node_is_drained_then_removed_and_no_write_is_lost() {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let mut n = Nodes::new();
    let config = n.config_file("");
    n.bootstrap_three(&["--config".to_string(), config.clone()], 6);
    let led = |v: &Value| every_range_led(v, 6);
    // Keys over every range (the layout spreads them by their first byte).
    let keys = n.put_keys();

    // Three nodes for a factor of three: node 2 cannot be decommissioned yet.
    n.ctl_until(&["registry", "-o", "json"], "three nodes registered", |v| {
        v.as_array().unwrap().len() == 3
    });
    let refused = n.ctl(&["node", "decommission", "2"]);
    assert!(!refused.status.success());
    let err = String::from_utf8_lossy(&refused.stderr);
    assert!(err.contains("add a node first"), "{err}");

    // Node 4 joins; then node 2 is decommissioned: drained of every replica and leadership
    // (moved to node 4 or handed to the others), then removed.
    n.join_fourth(&rt, &config);
    let out = n.ctl(&["node", "decommission", "2", "--wait", "60s", "-o", "json"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let done: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(done["state"], "removed", "{done:#}");

    // Node 2 holds nothing; every range (the system range too) has three voters elsewhere.
    n.ctl_until(&["registry", "-o", "json"], "node 2 removed", |v| {
        v.as_array()
            .unwrap()
            .iter()
            .any(|x| x["id"] == 2 && x["state"] == "removed")
    });
    let ranges = n.ctl_until(&["ranges", "--no-sizes", "-o", "json"], "ranges led", led);
    for r in ranges.as_array().unwrap() {
        let replicas = r["replicas"].as_array().unwrap();
        assert!(replicas.iter().all(|x| x["node_id"] != 2), "{r:#}");
        assert_eq!(replicas.len(), 3, "{r:#}");
        assert_ne!(r["leader_node_id"], 2, "{r:#}");
    }
    // Node 2 gone, node 3 killed: every range, the system range (the registry) included, has
    // its other two voters on nodes 1 and 4, so the registry still answers (linearizable)
    // and every write acknowledged before is read back.
    n.kill(1);
    n.kill(2);
    n.ctl_until(
        &["registry", "-o", "json"],
        "the registry without nodes 2 and 3",
        |v| v.as_array().unwrap().len() == 4,
    );
    n.read_keys(&keys);
}

#[test]
fn a_killed_nodes_replicas_are_rebuilt_on_the_others_and_no_write_is_lost() {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let mut n = Nodes::new();
    let config = n.config_file("down-time-ms = 2000\n");
    n.bootstrap_three(&["--config".to_string(), config.clone()], 6);
    let keys = n.put_keys();
    // A fourth node joins (the balancing may give it replicas); then node 3 is killed for
    // good. Two seconds after it is declared down its replicas are rebuilt on the others.
    n.join_fourth(&rt, &config);
    n.kill(2);
    n.ctl_until(&["nodes", "-o", "json"], "node 3 down", |v| {
        v["nodes"]
            .as_array()
            .unwrap()
            .iter()
            .any(|x| x["node_id"] == 3 && x["status"] == "down")
    });
    let repaired = n.ctl_until(
        &["ranges", "--no-sizes", "-o", "json"],
        "every range at three replicas, none on node 3",
        |v| {
            every_range_led(v, 6)
                && v.as_array().unwrap().iter().all(|r| {
                    let replicas = r["replicas"].as_array().unwrap();
                    replicas.len() == 3
                        && replicas
                            .iter()
                            .all(|x| x["node_id"] != 3 && x["learner"] == false)
                })
        },
    );
    assert!(
        repaired.as_array().unwrap().iter().all(|r| r["replicas"]
            .as_array()
            .unwrap()
            .iter()
            .any(|x| x["node_id"] == 4)),
        "node 3's replicas went to node 4 (the only node without them): {repaired:#}"
    );
    n.read_keys(&keys);
}
