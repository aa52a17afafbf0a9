//! A three-node cluster in one process (NodeGroups on the in-memory network, each on its own
//! RocksDB): bootstraps 64 ranges, writes from several clients, stops a node mid-stream,
//! keeps writing on the majority, restarts the node from its data directory, and verifies
//! that every acknowledged write is readable on every node.
//!
//! This is the project's run command until the range-split demo (issue 5) replaces it.
//! Run: `cargo run --release --example cluster_demo`.

use std::sync::Arc;
use std::time::{Duration, Instant};

use flotilla::testing::{key_in_range, test_config, Cluster};
use flotilla::{NodeGroupConfig, RangeId, StoreConfig};
use tokio::sync::RwLock;

const RANGES: usize = 64;
const CLIENTS: usize = 8;
const T: Duration = Duration::from_secs(30);

fn config(node: u64) -> NodeGroupConfig {
    NodeGroupConfig {
        tick_interval: Duration::from_millis(20),
        ..test_config(node)
    }
}

async fn write_phase(
    c: &Arc<RwLock<Cluster>>,
    phase: &str,
    per_client: usize,
) -> Vec<(Vec<u8>, Vec<u8>)> {
    let mut tasks = Vec::new();
    for client in 0..CLIENTS {
        let c = c.clone();
        let phase = phase.to_string();
        tasks.push(tokio::spawn(async move {
            let mut acked = Vec::new();
            for i in 0..per_client {
                let range = ((client * per_client + i) % RANGES) as u64 + 1;
                let key = key_in_range(range, &format!("{phase}-{client}-{i}"));
                let value = format!("{phase}:{client}:{i}").into_bytes();
                let cl = c.read().await;
                if cl.put(&key, &value, T).await.is_ok() {
                    acked.push((key, value));
                }
            }
            acked
        }));
    }
    let mut all = Vec::new();
    for t in tasks {
        all.extend(t.await.expect("client task"));
    }
    all
}

fn print_table(c: &Cluster) {
    println!(
        "{:>6}  {:<14} {:<14} {:>6} {:>6}",
        "range", "start", "end", "leader", "commit"
    );
    let ranges = c.node(c.running()[0]).ranges();
    for d in ranges.iter().take(8) {
        let leader = c
            .leader_of(d.id())
            .map_or("-".to_string(), |n| format!("n{n}"));
        let commit = c
            .node(c.running()[0])
            .status(d.id())
            .map(|s| s.commit)
            .unwrap_or(0);
        println!(
            "{:>6}  {:<14} {:<14} {:>6} {:>6}",
            d.id().to_string(),
            String::from_utf8_lossy(&d.start_key),
            String::from_utf8_lossy(&d.end_key),
            leader,
            commit
        );
    }
    if ranges.len() > 8 {
        println!("   ... {} more ranges", ranges.len() - 8);
    }
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(std::env::var("RUST_LOG").unwrap_or_else(|_| "warn".into()))
        .init();
    let started = Instant::now();
    let cluster = Cluster::with_config(3, config, StoreConfig::default());
    let layout = cluster.bootstrap(RANGES);
    let ids: Vec<RangeId> = layout.iter().map(|d| d.id()).collect();
    cluster.wait_leaders(&ids, Duration::from_secs(60)).await;
    println!(
        "3 nodes, {RANGES} ranges, all with leaders after {:.1}s",
        started.elapsed().as_secs_f64()
    );
    print_table(&cluster);
    let c = Arc::new(RwLock::new(cluster));

    let mut acked = write_phase(&c, "a", 100).await;
    println!("phase a: {} writes acknowledged", acked.len());

    c.write().await.stop(3);
    println!("node 3 stopped");
    acked.extend(write_phase(&c, "b", 100).await);
    println!(
        "phase b (node 3 down): {} writes acknowledged in all",
        acked.len()
    );

    c.write().await.start(3);
    println!("node 3 restarted from its data directory");
    acked.extend(write_phase(&c, "c", 50).await);

    let cl = c.read().await;
    print_table(&cl);
    let mut lost = 0usize;
    for node in cl.running() {
        for (k, v) in &acked {
            match cl.get_from(node, k, T).await {
                Ok(Some(got)) if &got == v => {}
                other => {
                    lost += 1;
                    eprintln!("node {node}: {} -> {other:?}", String::from_utf8_lossy(k));
                }
            }
        }
    }
    let secs = started.elapsed().as_secs_f64();
    println!(
        "verified {} acknowledged writes across {RANGES} ranges on 3 nodes: {lost} lost",
        acked.len()
    );
    println!(
        "RESULT {{\"demo\":\"cluster\",\"nodes\":3,\"ranges\":{RANGES},\"acknowledged\":{},\"lost\":{lost},\"seconds\":{secs:.1}}}",
        acked.len()
    );
    drop(cl);
    if lost > 0 {
        std::process::exit(1);
    }
    Ok(())
}
