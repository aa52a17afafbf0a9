//! The clients: concurrent writers and readers of a few contended keys over the KV gRPC API,
//! and the recorder of everything they saw, for the checker.
//!
//! A write carries the client's id and a fresh sequence number and is retried with the same
//! pair (so it applies at most once) on the node the last error named as leader, else on the
//! next node, until it succeeds or its deadline passes. Its outcome, for the checker: ok if an
//! attempt succeeded; fail if every attempt was refused before it could be proposed or applied
//! (not the leader and no leader to forward to, busy, key not in range, epoch changed);
//! unknown otherwise (a timeout, a dropped proposal, a lost connection: it may still apply,
//! even later). A read is retried the same way; only a successful one is recorded as ok.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use flotilla_check::{Kind, Op, Outcome};
use flotilla_proto::kv::kv_client::KvClient;
use flotilla_proto::kv::{GetRequest, PutRequest};
use rand::Rng;
use tonic::transport::Channel;
use tonic::{Code, Status};

/// One attempt may take this long before it counts as a timeout (outcome unknown).
const ATTEMPT_TIMEOUT: Duration = Duration::from_millis(1500);
/// Pause between attempts of one operation.
const RETRY_PAUSE: Duration = Duration::from_millis(30);

/// Every operation of the run, with times on one clock (the node each went through is the
/// index in [`Nodes`]).
pub use flotilla_check::Recorder;

/// A KV client per node.
#[derive(Debug, Clone)]
pub struct Nodes {
    kv: Vec<KvClient<Channel>>,
}

impl Nodes {
    /// Lazy channels to each node's client address (they reconnect after a restart).
    pub fn new(addrs: &[SocketAddr]) -> anyhow::Result<Nodes> {
        let kv = addrs
            .iter()
            .map(|a| {
                let ch = Channel::from_shared(format!("http://{a}"))?
                    .connect_timeout(Duration::from_millis(500))
                    .connect_lazy();
                Ok(KvClient::new(ch))
            })
            .collect::<anyhow::Result<Vec<_>>>()?;
        Ok(Nodes { kv })
    }

    /// How many nodes.
    pub fn len(&self) -> usize {
        self.kv.len()
    }

    /// Whether there is no node.
    pub fn is_empty(&self) -> bool {
        self.kv.is_empty()
    }

    /// The KV client of node `i`.
    pub fn kv(&self, i: usize) -> KvClient<Channel> {
        self.kv[i].clone()
    }
}

/// The node index a status names as leader, if any (node ids are index + 1).
pub fn leader_hint(status: &Status, nodes: usize) -> Option<usize> {
    let v = status.metadata().get("flotilla-leader-node")?;
    let id: usize = v.to_str().ok()?.parse().ok()?;
    (1..=nodes).contains(&id).then(|| id - 1)
}

/// Whether an answer guarantees that the write was not applied by this attempt.
fn refused_before_apply(status: &Status) -> bool {
    match status.code() {
        Code::NotFound | Code::InvalidArgument | Code::FailedPrecondition | Code::Aborted => true,
        Code::Unavailable => {
            let m = status.message();
            m.contains("is not the leader") || m.starts_with("busy")
        }
        _ => false,
    }
}

/// Which nodes an operation may use, and where it starts.
#[derive(Debug, Clone, Copy)]
pub struct Route {
    /// The node to try first.
    pub first: usize,
    /// A node never to use (the availability probe avoids its victim).
    pub avoid: Option<usize>,
}

impl Route {
    fn next(&self, cur: usize, hint: Option<usize>, n: usize) -> usize {
        if let Some(h) = hint.filter(|h| Some(*h) != self.avoid && *h != cur) {
            return h;
        }
        let mut nxt = (cur + 1) % n;
        if Some(nxt) == self.avoid {
            nxt = (nxt + 1) % n;
        }
        nxt
    }
}

/// Writes `value` to `key` as request `id` (client, seq), retrying until `deadline`; records the
/// operation and returns its outcome and the node that answered ok.
pub async fn put(
    rec: &Recorder,
    nodes: &Nodes,
    id: (u64, u64),
    key: &[u8],
    value: &[u8],
    route: Route,
    deadline: Duration,
) -> (Outcome, usize) {
    let (client, seq) = id;
    let invoke = rec.now();
    let until = Instant::now() + deadline;
    let mut node = route.first;
    let mut definite = true;
    let outcome = loop {
        let req = PutRequest {
            key: key.to_vec().into(),
            value: value.to_vec().into(),
            client_id: client,
            seq,
            route: None,
        };
        let mut kv = nodes.kv(node);
        let hint = match tokio::time::timeout(ATTEMPT_TIMEOUT, kv.put(req)).await {
            Ok(Ok(_)) => break Outcome::Ok,
            Ok(Err(status)) => {
                definite &= refused_before_apply(&status);
                leader_hint(&status, nodes.len())
            }
            Err(_) => {
                definite = false;
                None
            }
        };
        if Instant::now() >= until {
            break if definite {
                Outcome::Fail
            } else {
                Outcome::Unknown
            };
        }
        node = route.next(node, hint, nodes.len());
        tokio::time::sleep(RETRY_PAUSE).await;
    };
    let complete = rec.now();
    rec.record(
        Op {
            client,
            key: key.to_vec(),
            kind: Kind::Write(value.to_vec()),
            outcome,
            invoke_ns: invoke,
            complete_ns: (outcome != Outcome::Unknown).then_some(complete),
        },
        node as u64,
    );
    (outcome, node)
}

/// A linearizable read of `key`, retried until `deadline`; a successful one is recorded.
/// With `stay`, only `route.first` is asked (the final reads ask each node in turn).
pub async fn get(
    rec: &Recorder,
    nodes: &Nodes,
    client: u64,
    key: &[u8],
    route: Route,
    stay: bool,
    deadline: Duration,
) -> Option<(Option<Vec<u8>>, usize)> {
    let invoke = rec.now();
    let until = Instant::now() + deadline;
    let mut node = route.first;
    loop {
        let req = GetRequest {
            key: key.to_vec().into(),
            stale: false,
            route: None,
            consistency: 0,
        };
        let mut kv = nodes.kv(node);
        let hint = match tokio::time::timeout(ATTEMPT_TIMEOUT, kv.get(req)).await {
            Ok(Ok(r)) => {
                let r = r.into_inner();
                let seen = r.found.then(|| r.value.to_vec());
                rec.record(
                    Op {
                        client,
                        key: key.to_vec(),
                        kind: Kind::Read(seen.clone()),
                        outcome: Outcome::Ok,
                        invoke_ns: invoke,
                        complete_ns: Some(rec.now()),
                    },
                    node as u64,
                );
                return Some((seen, node));
            }
            Ok(Err(status)) => leader_hint(&status, nodes.len()),
            Err(_) => None,
        };
        if Instant::now() >= until {
            return None;
        }
        if !stay {
            node = route.next(node, hint, nodes.len());
        }
        tokio::time::sleep(RETRY_PAUSE).await;
    }
}

/// Runs one client until `stop`: random reads and writes (half each) of random `keys`, each
/// write with a value no other write uses.
pub async fn client_loop(
    id: u64,
    rec: Arc<Recorder>,
    nodes: Nodes,
    keys: Arc<Vec<Vec<u8>>>,
    stop: Arc<AtomicBool>,
) {
    // Client ids must be non-zero for the node to de-duplicate retries; make them unlikely
    // to collide with a previous run's on the same data (there is none, but it costs nothing).
    let client_id = (id << 32) | rand::thread_rng().gen_range(1..u32::MAX as u64);
    let mut seq = 0;
    // The node that last answered for a key: usually its leader.
    let mut last: HashMap<usize, usize> = HashMap::new();
    while !stop.load(Ordering::Relaxed) {
        let (k, write, pause) = {
            let mut rng = rand::thread_rng();
            (
                rng.gen_range(0..keys.len()),
                rng.gen_bool(0.5),
                rng.gen_range(0..20),
            )
        };
        let route = Route {
            first: *last.get(&k).unwrap_or(&(id as usize % nodes.len())),
            avoid: None,
        };
        if write {
            seq += 1;
            let value = format!("c{id}-{seq}").into_bytes();
            let deadline = Duration::from_secs(5);
            let (outcome, node) = put(
                &rec,
                &nodes,
                (client_id, seq),
                &keys[k],
                &value,
                route,
                deadline,
            )
            .await;
            if outcome == Outcome::Ok {
                last.insert(k, node);
            }
        } else if let Some((_, node)) = get(
            &rec,
            &nodes,
            client_id,
            &keys[k],
            route,
            false,
            Duration::from_secs(5),
        )
        .await
        {
            last.insert(k, node);
        }
        tokio::time::sleep(Duration::from_millis(pause)).await;
    }
}
