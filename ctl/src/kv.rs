//! `flotilla-ctl kv ...`: reads and writes through the KV gRPC API (`flotilla.kv.Kv`).
//!
//! A write goes to any reachable node (a follower forwards it to the range's leader) with a
//! request id of its own, so a retry on another node after a lost answer is applied at most
//! once; a read is linearizable (ReadIndex) unless `--stale`. Each subcommand is one function
//! here. `scan` follows the server's continuation tokens, so one command reads an interval
//! across as many ranges as it spans.

use anyhow::{bail, Result};
use clap::Subcommand;
use flotilla_proto::kv::{
    CompareAndSetRequest, DeleteRequest, GetRequest, PutRequest, ReadConsistency, ScanRequest,
};
use serde_json::json;

use crate::cluster::{describe, Cluster};
use crate::output::{show_bytes, table, Output};

/// The server's own cap on pairs per scan call (`ScanRequest.limit`).
const SCAN_PAGE: u32 = 10_000;

/// `kv` subcommands.
#[derive(Debug, Subcommand)]
pub enum KvCommand {
    /// Read a key's value (linearizable unless --stale).
    Get {
        /// The key (UTF-8).
        key: String,
        /// Answer from the contacted node's replica without a ReadIndex round (may be stale).
        #[arg(long)]
        stale: bool,
    },
    /// Write a key's value.
    Put {
        /// The key (UTF-8).
        key: String,
        /// The value (UTF-8).
        value: String,
    },
    /// Delete a key (a key that does not exist is not an error; the output says so).
    Del {
        /// The key (UTF-8).
        key: String,
    },
    /// The pairs of the key interval [START, END) in key order, across ranges.
    Scan {
        /// First key of the interval (default: the start of the key space).
        #[arg(default_value = "")]
        start: String,
        /// The key after the interval (default: to the end of the key space).
        #[arg(default_value = "")]
        end: String,
        /// At most this many pairs (0: no limit).
        #[arg(long, default_value_t = 1000)]
        limit: u64,
        /// Each range answers from the contacted node's replica (may be stale).
        #[arg(long)]
        stale: bool,
    },
    /// Compare-and-set: write NEW only if the key's value is EXPECTED ("absent": the key
    /// does not exist). Says whether it swapped and what the value is now.
    Cas {
        /// The key (UTF-8).
        key: String,
        /// The value the key must have, or the word `absent` (see --expected-value).
        expected: String,
        /// The value to write when it matches.
        new: String,
        /// Take EXPECTED as a value even if it is the word `absent`.
        #[arg(long)]
        expected_value: bool,
    },
}

/// Runs one `kv` subcommand.
pub async fn run(cluster: &Cluster, cmd: KvCommand, out: Output) -> Result<()> {
    match cmd {
        KvCommand::Get { key, stale } => get(cluster, key, stale, out).await,
        KvCommand::Put { key, value } => put(cluster, key, value, out).await,
        KvCommand::Del { key } => del(cluster, key, out).await,
        KvCommand::Scan {
            start,
            end,
            limit,
            stale,
        } => scan(cluster, start, end, limit, stale, out).await,
        KvCommand::Cas {
            key,
            expected,
            new,
            expected_value,
        } => {
            let expected = (expected_value || expected != "absent").then_some(expected);
            cas(cluster, key, expected, new, out).await
        }
    }
}

/// Tries `call` on each reachable node in turn until one answers: a node that cannot serve
/// (no leader yet, stopping) is not the last word while another can.
async fn on_any<T, F, Fut>(cluster: &Cluster, mut call: F) -> Result<T>
where
    F: FnMut(flotilla_proto::kv::kv_client::KvClient<tonic::transport::Channel>) -> Fut,
    Fut: std::future::Future<Output = std::result::Result<tonic::Response<T>, tonic::Status>>,
{
    let mut errors = Vec::new();
    for i in 0..cluster.reachable_count() {
        let (endpoint, client) = cluster.kv(i);
        match tokio::time::timeout(cluster.timeout(), call(client)).await {
            Ok(Ok(r)) => return Ok(r.into_inner()),
            Ok(Err(s)) if s.code() == tonic::Code::InvalidArgument => bail!("{}", describe(&s)),
            Ok(Err(s)) => errors.push(format!("{endpoint}: {}", describe(&s))),
            Err(_) => errors.push(format!(
                "{endpoint}: no answer within {:?}",
                cluster.timeout()
            )),
        }
    }
    bail!("no node could serve the request ({})", errors.join("; "))
}

/// A request id for one write: the retries `on_any` makes on other nodes keep it, so the
/// write is applied at most once.
fn request_id() -> (u64, u64) {
    (rand::random::<u64>() | 1, 1)
}

fn consistency(stale: bool) -> i32 {
    if stale {
        ReadConsistency::Stale as i32
    } else {
        ReadConsistency::Linearizable as i32
    }
}

async fn get(cluster: &Cluster, key: String, stale: bool, out: Output) -> Result<()> {
    let r = on_any(cluster, |mut c| {
        let req = GetRequest {
            key: key.clone().into_bytes().into(),
            stale,
            ..Default::default()
        };
        async move { c.get(req).await }
    })
    .await?;
    match out {
        Output::Json => {
            let value = r.found.then(|| show_bytes(&r.value));
            println!(
                "{}",
                json!({ "key": key, "found": r.found, "value": value })
            );
        }
        Output::Table => {
            if !r.found {
                bail!("key {key:?} not found");
            }
            println!("{}", show_bytes(&r.value));
        }
    }
    Ok(())
}

async fn put(cluster: &Cluster, key: String, value: String, out: Output) -> Result<()> {
    let (client_id, seq) = request_id();
    on_any(cluster, |mut c| {
        let req = PutRequest {
            key: key.clone().into_bytes().into(),
            value: value.clone().into_bytes().into(),
            client_id,
            seq,
            ..Default::default()
        };
        async move { c.put(req).await }
    })
    .await?;
    match out {
        Output::Json => println!("{}", json!({ "key": key, "written": true })),
        Output::Table => println!("OK"),
    }
    Ok(())
}

async fn del(cluster: &Cluster, key: String, out: Output) -> Result<()> {
    let (client_id, seq) = request_id();
    let r = on_any(cluster, |mut c| {
        let req = DeleteRequest {
            key: key.clone().into_bytes().into(),
            client_id,
            seq,
            ..Default::default()
        };
        async move { c.delete(req).await }
    })
    .await?;
    match out {
        Output::Json => {
            let previous = r.deleted.then(|| show_bytes(&r.previous));
            println!(
                "{}",
                json!({ "key": key, "deleted": r.deleted, "previous": previous })
            );
        }
        Output::Table if r.deleted => println!("deleted (was {})", show_bytes(&r.previous)),
        Output::Table => println!("not found (nothing to delete)"),
    }
    Ok(())
}

async fn scan(
    cluster: &Cluster,
    start: String,
    end: String,
    limit: u64,
    stale: bool,
    out: Output,
) -> Result<()> {
    let mut pairs = Vec::new();
    let mut continuation = bytes::Bytes::new();
    // The server returns a page per call (it may stop at a range's end before the page is
    // full); follow its continuation until the interval is exhausted or the limit reached.
    let complete = loop {
        let want = match limit {
            0 => SCAN_PAGE,
            n => (n - pairs.len() as u64).min(u64::from(SCAN_PAGE)) as u32,
        };
        let r = on_any(cluster, |mut c| {
            let req = ScanRequest {
                start: start.clone().into_bytes().into(),
                end: end.clone().into_bytes().into(),
                limit: want,
                consistency: consistency(stale),
                continuation: continuation.clone(),
            };
            async move { c.scan(req).await }
        })
        .await?;
        pairs.extend(r.pairs);
        continuation = r.continuation;
        if continuation.is_empty() {
            break true;
        }
        if limit != 0 && pairs.len() as u64 >= limit {
            break false;
        }
    };
    match out {
        Output::Json => {
            let list: Vec<_> = pairs
                .iter()
                .map(|p| json!({ "key": show_bytes(&p.key), "value": show_bytes(&p.value) }))
                .collect();
            println!(
                "{}",
                json!({ "pairs": list, "count": pairs.len(), "complete": complete })
            );
        }
        Output::Table => {
            let rows: Vec<Vec<String>> = pairs
                .iter()
                .map(|p| vec![show_bytes(&p.key), show_bytes(&p.value)])
                .collect();
            table(&["KEY", "VALUE"], &rows);
            if !complete {
                eprintln!("(stopped at --limit {limit}; more keys follow)");
            }
        }
    }
    Ok(())
}

async fn cas(
    cluster: &Cluster,
    key: String,
    expected: Option<String>,
    new: String,
    out: Output,
) -> Result<()> {
    let (client_id, seq) = request_id();
    let r = on_any(cluster, |mut c| {
        let req = CompareAndSetRequest {
            key: key.clone().into_bytes().into(),
            expected: expected.clone().map(|e| e.into_bytes().into()),
            value: new.clone().into_bytes().into(),
            delete: false,
            client_id,
            seq,
            ..Default::default()
        };
        async move { c.compare_and_set(req).await }
    })
    .await?;
    let current = r.found.then(|| show_bytes(&r.current));
    match out {
        Output::Json => println!(
            "{}",
            json!({ "key": key, "swapped": r.succeeded, "found": r.found, "current": current })
        ),
        Output::Table => {
            let now = current.unwrap_or_else(|| "absent".into());
            if r.succeeded {
                println!("swapped; current value: {now}");
            } else {
                println!("not swapped; current value: {now}");
            }
        }
    }
    Ok(())
}
