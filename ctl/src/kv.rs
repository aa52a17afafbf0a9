//! `flotilla-ctl kv ...`: reads and writes through the KV gRPC API (`flotilla.kv.Kv`).
//!
//! A write goes to any reachable node (a follower forwards it to the range's leader) with a
//! request id of its own, so a retry after a lost answer is applied at most once; a read is
//! linearizable (ReadIndex) unless `--stale`. Each subcommand is one function here, so that
//! more (delete, scan, compare-and-set) can join them as the KV API grows.

use anyhow::{bail, Result};
use clap::Subcommand;
use flotilla_proto::kv::{GetRequest, PutRequest};
use serde_json::json;

use crate::cluster::{describe, Cluster};
use crate::output::{show_bytes, Output};

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
}

/// Runs one `kv` subcommand.
pub async fn run(cluster: &Cluster, cmd: KvCommand, out: Output) -> Result<()> {
    match cmd {
        KvCommand::Get { key, stale } => get(cluster, key, stale, out).await,
        KvCommand::Put { key, value } => put(cluster, key, value, out).await,
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
            let value = r
                .found
                .then(|| String::from_utf8_lossy(&r.value).into_owned());
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
    // A request id of its own: the retries below (on another node) are applied at most once.
    let client_id = rand::random::<u64>() | 1;
    on_any(cluster, |mut c| {
        let req = PutRequest {
            key: key.clone().into_bytes().into(),
            value: value.clone().into_bytes().into(),
            client_id,
            seq: 1,
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
