//! The `flotilla-node` binary as an operator runs it: `--help` and `--version`; a config file
//! with mistakes refused at start with one line per mistake; one node from a config file
//! (flags overriding it) serving `/metrics` (scraped and parsed: the runtime's and the
//! transport's metrics are there, none labelled by range) and `/health`; SIGTERM stops it
//! with exit status 0, and after a restart every acknowledged write is there.

use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use flotilla::proto::kv::kv_client::KvClient;
use flotilla::proto::kv::{GetRequest, PutRequest};
use flotilla::testing::key_in_range;
use flotilla_benchkit::nodes::http_get;

const T: Duration = Duration::from_secs(30);
const NODE: &str = env!("CARGO_BIN_EXE_flotilla-node");

fn free_addr() -> SocketAddr {
    flotilla_benchkit::free_addr("127.0.0.1").unwrap()
}

/// Kills the node on drop if the test did not stop it, and prints its log on a failure.
struct Node {
    child: Option<Child>,
    log: std::path::PathBuf,
}

impl Node {
    fn spawn(args: &[String], log: &Path) -> Node {
        let err = std::fs::File::create(log).unwrap();
        let child = Command::new(NODE)
            .args(args)
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(err)
            .spawn()
            .expect("spawn flotilla-node");
        Node {
            child: Some(child),
            log: log.to_path_buf(),
        }
    }

    fn pid(&self) -> i32 {
        self.child.as_ref().unwrap().id() as i32
    }

    /// Sends SIGTERM and waits (bounded) for the exit status.
    fn terminate(&mut self) -> std::process::ExitStatus {
        let mut child = self.child.take().unwrap();
        // The `kill` utility, as the nemesis crate does: the workspace denies unsafe code.
        let sent = Command::new("kill")
            .args(["-TERM", &child.id().to_string()])
            .status()
            .unwrap();
        assert!(sent.success());
        let deadline = Instant::now() + T;
        loop {
            if let Some(status) = child.try_wait().unwrap() {
                return status;
            }
            assert!(Instant::now() < deadline, "node did not exit after SIGTERM");
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        if std::thread::panicking() {
            let log = std::fs::read_to_string(&self.log).unwrap_or_default();
            eprintln!("--- node log ---\n{log}");
        }
    }
}

/// Waits for `/health` to answer 200.
fn wait_healthy(metrics: SocketAddr) -> String {
    let deadline = Instant::now() + T;
    let mut last = String::new();
    while Instant::now() < deadline {
        match http_get(metrics, "/health") {
            Ok((200, body)) => return body,
            Ok((code, body)) => last = format!("{code} {body}"),
            Err(e) => last = e.to_string(),
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    panic!("node never healthy; last answer: {last}");
}

async fn put(client: SocketAddr, key: &[u8], value: &[u8]) {
    let deadline = Instant::now() + T;
    loop {
        let done = async {
            let mut kv = KvClient::connect(format!("http://{client}")).await.ok()?;
            kv.put(PutRequest {
                key: key.to_vec().into(),
                value: value.to_vec().into(),
                client_id: 7,
                seq: u64::from(key[key.len() - 1]),
                ..Default::default()
            })
            .await
            .ok()
        }
        .await;
        if done.is_some() {
            return;
        }
        assert!(Instant::now() < deadline, "put never acknowledged");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn get(client: SocketAddr, key: &[u8]) -> Option<Vec<u8>> {
    let deadline = Instant::now() + T;
    loop {
        let r = async {
            let mut kv = KvClient::connect(format!("http://{client}")).await.ok()?;
            kv.get(GetRequest {
                key: key.to_vec().into(),
                ..Default::default()
            })
            .await
            .ok()
        }
        .await;
        if let Some(r) = r {
            let r = r.into_inner();
            return r.found.then(|| r.value.to_vec());
        }
        assert!(Instant::now() < deadline, "get never answered");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[test]
fn help_and_version_describe_the_flags() {
    let help = Command::new(NODE).arg("--help").output().unwrap();
    assert!(help.status.success());
    let text = String::from_utf8_lossy(&help.stdout);
    for flag in [
        "--config",
        "--id",
        "--raft",
        "--client",
        "--data-dir",
        "--peers",
        "--bootstrap-ranges",
        "--tick-ms",
        "--no-hibernate",
        "--metrics",
        "--redis",
    ] {
        assert!(
            text.contains(flag),
            "--help does not mention {flag}:\n{text}"
        );
    }
    let version = Command::new(NODE).arg("--version").output().unwrap();
    assert!(version.status.success());
    assert!(String::from_utf8_lossy(&version.stdout).contains(env!("CARGO_PKG_VERSION")));
    // A bad flag value is named.
    let bad = Command::new(NODE)
        .args(["--tick-ms", "soon"])
        .output()
        .unwrap();
    assert_eq!(bad.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&bad.stderr).contains("--tick-ms"));
}

#[test]
fn a_config_with_mistakes_is_refused_with_one_line_per_mistake() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("bad.toml");
    std::fs::write(
        &file,
        "[node]\nid = 0\nraft = \"127.0.0.1:7001\"\nclient = \"127.0.0.1:7001\"\n\
         [raft]\nheartbeat-ticks = 0\n[store]\nbackground-jobs = 0\n",
    )
    .unwrap();
    let out = Command::new(NODE)
        .args(["--config", file.to_str().unwrap(), "--check-config"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    let lines: Vec<&str> = err.lines().filter(|l| l.starts_with("error: ")).collect();
    for needle in [
        "node_id must be non-zero",
        "node.data-dir (--data-dir) is required",
        "heartbeat_tick must be at least 1",
        "background_jobs must be at least 1",
        "cannot both use 127.0.0.1:7001",
    ] {
        assert!(
            lines.iter().filter(|l| l.contains(needle)).count() == 1,
            "expected one line with {needle:?}:\n{err}"
        );
    }
    // A flag fixes the file's mistake it overrides.
    let out = Command::new(NODE)
        .args([
            "--config",
            file.to_str().unwrap(),
            "--check-config",
            "--id",
            "4",
        ])
        .output()
        .unwrap();
    assert!(!String::from_utf8_lossy(&out.stderr).contains("node_id"));
    // An unknown key is named with its line.
    std::fs::write(&file, "[node]\nid = 1\ntick = 5\n").unwrap();
    let out = Command::new(NODE)
        .args(["--config", file.to_str().unwrap()])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("tick") && err.contains("line 3"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_from_a_config_file_serves_metrics_and_stops_cleanly_on_sigterm() {
    let dir = tempfile::tempdir().unwrap();
    let (raft, client, metrics) = (free_addr(), free_addr(), free_addr());
    let file = dir.path().join("flotilla.toml");
    std::fs::write(
        &file,
        format!(
            "[node]\nid = 1\ndata-dir = {:?}\nraft = \"{raft}\"\nclient = \"{client}\"\n\
             metrics = \"{metrics}\"\nbootstrap-ranges = 4\n\
             [peers]\n1 = \"{raft}\"\n[raft]\ntick-ms = 1000\n",
            dir.path().join("n1").display().to_string()
        ),
    )
    .unwrap();
    // The flag overrides the file's tick (1 s would make the test slow).
    let args: Vec<String> = vec![
        "--config".into(),
        file.display().to_string(),
        "--tick-ms".into(),
        "20".into(),
    ];
    let mut node = Node::spawn(&args, &dir.path().join("node.log"));
    let health = wait_healthy(metrics);
    assert!(health.starts_with("ok: 4 ranges"), "{health}");

    let keys: Vec<Vec<u8>> = (0..4).map(|i| key_in_range(i, "k")).collect();
    for (i, k) in keys.iter().enumerate() {
        let mut key = k.clone();
        key.push(b'0' + i as u8);
        put(client, &key, format!("v{i}").as_bytes()).await;
    }

    let (code, page) = http_get(metrics, "/metrics").unwrap();
    assert_eq!(code, 200);
    let mut names = std::collections::BTreeMap::new();
    for line in page
        .lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
    {
        // `name{labels} value`: every sample parses.
        let (series, value) = line.rsplit_once(' ').expect("sample line");
        value
            .parse::<f64>()
            .unwrap_or_else(|_| panic!("bad value in {line:?}"));
        let name = series.split('{').next().unwrap();
        assert!(
            !series.contains("range"),
            "a series labelled by range: {line}"
        );
        names.insert(name.to_string(), value.to_string());
    }
    for want in [
        "flotilla_runtime_worker_rounds_total",
        "flotilla_runtime_ticks_total",
        "flotilla_runtime_elections_won_total",
        "flotilla_runtime_replicas",
        "flotilla_runtime_leaders",
        "flotilla_runtime_awake_replicas",
        "flotilla_runtime_splits_total",
        "flotilla_transport_grpc_connects_total",
    ] {
        assert!(
            names.contains_key(want),
            "{want} missing from /metrics:\n{page}"
        );
    }
    assert_eq!(names["flotilla_runtime_replicas"], "4");
    assert_eq!(names["flotilla_runtime_leaders"], "4");
    // Every metric without labels is there from the start, recorded yet or not.
    for (name, kind, labelled, _) in flotilla::server::METRICS {
        if !labelled && *kind != flotilla::server::MetricKind::Histogram {
            assert!(names.contains_key(*name), "{name} missing from /metrics");
        }
    }

    let pid = node.pid();
    let status = node.terminate();
    assert_eq!(status.code(), Some(0), "exit status after SIGTERM of {pid}");
    let log = std::fs::read_to_string(dir.path().join("node.log")).unwrap();
    assert!(log.contains("stop signal received"), "{log}");

    // Restarted from the same store (no bootstrap: it has ranges): every write is there.
    let mut node = Node::spawn(&args, &dir.path().join("node2.log"));
    wait_healthy(metrics);
    for (i, k) in keys.iter().enumerate() {
        let mut key = k.clone();
        key.push(b'0' + i as u8);
        assert_eq!(get(client, &key).await, Some(format!("v{i}").into_bytes()));
    }
    assert_eq!(node.terminate().code(), Some(0));
}
