//! `flotilla-ctl recover` against `flotilla-node` processes: three nodes take acknowledged
//! writes, two are killed for good (SIGKILL, data directories deleted), the operator's typed
//! mistakes are refused (an unreachable endpoint, a lost node that answers, a live node left
//! out), `--dry-run` prints the plan and changes nothing, and `recover --lost 2,3` against the
//! survivor forces every range (the system range first) to continue there alone and marks the
//! lost nodes removed: every acknowledged write is readable and new writes succeed. Two nodes
//! then join with `--join`, the scheduler brings every range back to three replicas on them,
//! and with the survivor killed too the two new nodes still serve every write.

use std::path::Path;
use std::process::Output;
use std::time::{Duration, Instant};

use flotilla::testing::key_in_range;
use flotilla_benchkit::nodes::{Ctl, Layout, NodeProcs};
use flotilla_client::{Client, ClientConfig};
use serde_json::Value;

const T: Duration = Duration::from_secs(30);
const RANGES: u64 = 4;

fn ctl_runner(endpoints: &str) -> Ctl {
    Ctl::beside(Path::new(env!("CARGO_BIN_EXE_flotilla-node")), endpoints).unwrap()
}

fn ctl(endpoints: &str, args: &[&str]) -> Output {
    ctl_runner(endpoints).run(args).unwrap()
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// Runs flotilla-ctl (JSON output) until it succeeds and `ok` accepts the answer.
fn ctl_until(endpoints: &str, args: &[&str], what: &str, ok: impl Fn(&Value) -> bool) -> Value {
    ctl_runner(endpoints).until(args, what, T, ok).unwrap()
}

/// The voters' nodes of a range of `flotilla-ctl ranges -o json`, and whether it has a
/// learner.
fn voters(range: &Value) -> (Vec<u64>, bool) {
    let list = range["replicas"].as_array().unwrap();
    let mut v: Vec<u64> = list
        .iter()
        .filter(|r| r["learner"] == false)
        .map(|r| r["node_id"].as_u64().unwrap())
        .collect();
    v.sort();
    (v, list.iter().any(|r| r["learner"] == true))
}

/// A client of `endpoints`, once one of them answers (the nodes may still be starting).
async fn client(endpoints: &[String]) -> Client {
    let mut config = ClientConfig::new(endpoints.iter().cloned());
    config.timeout = T;
    let deadline = Instant::now() + T;
    loop {
        match Client::connect(config.clone()).await {
            Ok(c) => return c,
            Err(e) => assert!(Instant::now() < deadline, "no endpoint answered: {e}"),
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[test]
fn flotilla_ctl_recover_brings_back_a_cluster_that_lost_two_of_three_nodes() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let conf_dir = tempfile::tempdir().unwrap();
    // A scheduler that acts within a second: passes every 200 ms, a joined node receives
    // replicas once it has been up for 300 ms.
    let config = conf_dir.path().join("node.toml");
    std::fs::write(
        &config,
        "[schedule]\ninterval-ms = 200\nstable-time-ms = 300\n",
    )
    .unwrap();
    let config = config.display().to_string();
    let common = ["--tick-ms", "20", "--config", config.as_str()];
    let layout = Layout::local(3, RANGES as usize)
        .unwrap()
        .with_args(&common);
    let bin = Path::new(env!("CARGO_BIN_EXE_flotilla-node"));
    let mut procs = NodeProcs::start(bin, layout).unwrap();
    let all = procs.endpoints();
    let survivor = procs.client[0].to_string();

    // Acknowledged writes in every range.
    let mut acked = Vec::new();
    rt.block_on(async {
        let c = client(
            &procs
                .client
                .iter()
                .map(|a| a.to_string())
                .collect::<Vec<_>>(),
        )
        .await;
        for r in 1..=RANGES {
            for i in 0..25 {
                let key = key_in_range(r, &format!("k{i}"));
                let value = format!("v{r}-{i}").into_bytes();
                c.put(key.clone(), value.clone()).await.unwrap();
                acked.push((key, value));
            }
        }
    });

    // Nodes 2 and 3 are gone for good.
    for i in [1, 2] {
        procs.kill(i);
        std::fs::remove_dir_all(procs.data_dir(i)).unwrap();
    }

    // The operator's mistakes are refused before anything is decided.
    let out = ctl(&all, &["recover", "--lost", "2,3"]);
    assert!(!out.status.success());
    assert!(stderr(&out).contains("did not answer"), "{}", stderr(&out));
    let out = ctl(&survivor, &["recover", "--lost", "1,2"]);
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("answers, so it is not lost"),
        "{}",
        stderr(&out)
    );
    let out = ctl(&survivor, &["recover", "--lost", "2"]);
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("node 3") && stderr(&out).contains("neither"),
        "{}",
        stderr(&out)
    );

    // The plan: every range and the system range (first) continue on node 1; nothing
    // changes.
    let out = ctl(
        &survivor,
        &["recover", "--lost", "2,3", "--dry-run", "-o", "json"],
    );
    assert!(out.status.success(), "{}", stderr(&out));
    let plan: Value = serde_json::from_slice(&out.stdout).unwrap();
    let ranges = plan["ranges"].as_array().unwrap();
    assert_eq!(ranges.len(), RANGES as usize + 1, "{plan:#}");
    assert_eq!(ranges[0]["range"], "system");
    for r in ranges {
        assert_eq!(r["survivor_node"], 1, "{r:#}");
        assert!(r["outcome"].is_null(), "a dry run acted: {r:#}");
        assert!(r["last_index"].as_u64() >= r["commit"].as_u64());
    }
    assert!(plan["warning"].as_str().unwrap().contains("gone for good"));
    let table = ctl_until(
        &survivor,
        &["ranges", "--no-sizes", "-o", "json"],
        "listed",
        |v| v.as_array().is_some_and(|l| l.len() == RANGES as usize),
    );
    for r in table.as_array().unwrap() {
        assert_eq!(voters(r).0, vec![1, 2, 3], "the dry run changed {r:#}");
    }

    // The recovery.
    let out = ctl(&survivor, &["recover", "--lost", "2,3"]);
    let text = stdout(&out);
    assert!(out.status.success(), "{text}\n{}", stderr(&out));
    assert!(text.contains("WARNING"), "{text}");
    assert_eq!(
        text.matches("forced, leads at term").count(),
        RANGES as usize + 1,
        "{text}"
    );
    assert!(
        text.contains("marked removed in the registry (refused from now on): node(s) 2, 3"),
        "{text}"
    );
    let registry = ctl_until(&survivor, &["registry", "-o", "json"], "removed", |v| {
        let state = |id: u64| {
            v.as_array()
                .unwrap()
                .iter()
                .find(|n| n["id"] == id)
                .map(|n| n["state"].clone())
        };
        state(2) == Some("removed".into()) && state(3) == Some("removed".into())
    });
    assert_eq!(registry.as_array().unwrap().len(), 3);

    // Every acknowledged write is there, and new writes succeed.
    rt.block_on(async {
        let c = client(std::slice::from_ref(&survivor)).await;
        for (key, value) in &acked {
            let got = c.get(key.clone()).await.unwrap();
            assert_eq!(got.as_deref(), Some(&value[..]), "{key:?}");
        }
        for r in 1..=RANGES {
            c.put(key_in_range(r, "after"), &b"recovered"[..])
                .await
                .unwrap();
        }
    });
    // A second run finds nothing left to force.
    let again = ctl(&survivor, &["recover", "--lost", "2,3"]);
    assert!(again.status.success(), "{}", stderr(&again));
    assert!(
        stdout(&again).contains("nothing to force"),
        "{}",
        stdout(&again)
    );

    // Two fresh nodes join; the scheduler brings every range back to three voters on them.
    for _ in 0..2 {
        let raft = flotilla_benchkit::free_addr("127.0.0.1").unwrap();
        let client_addr = flotilla_benchkit::free_addr("127.0.0.1").unwrap();
        let i = procs.len();
        let data = procs.dir().join(format!("joined-{i}"));
        let mut args: Vec<String> = vec![
            "--raft".into(),
            raft.to_string(),
            "--client".into(),
            client_addr.to_string(),
            "--data-dir".into(),
            data.display().to_string(),
            "--join".into(),
            survivor.clone(),
        ];
        args.extend(common.iter().map(|s| s.to_string()));
        procs.add(args, client_addr).unwrap();
    }
    let live = format!("{survivor},{},{}", procs.client[3], procs.client[4]);
    ctl_until(
        &live,
        &["ranges", "--no-sizes", "-o", "json"],
        "three voters each",
        |v| {
            let list = v.as_array().unwrap();
            list.len() == RANGES as usize
                && list.iter().all(|r| {
                    let (v, learner) = voters(r);
                    v == vec![1, 4, 5] && !learner
                })
        },
    );

    // The survivor dies too: the two joined nodes hold every write.
    procs.kill(0);
    rt.block_on(async {
        let c = client(&[procs.client[3].to_string(), procs.client[4].to_string()]).await;
        for (key, value) in &acked {
            let got = c.get(key.clone()).await.unwrap();
            assert_eq!(got.as_deref(), Some(&value[..]), "{key:?}");
        }
        for r in 1..=RANGES {
            let got = c.get(key_in_range(r, "after")).await.unwrap();
            assert_eq!(got.as_deref(), Some(&b"recovered"[..]));
        }
    });
}
