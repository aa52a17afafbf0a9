//! The connection to a cluster: one gRPC channel per `--endpoints` entry (TLS when given
//! certificates), the node id behind each (learned with `NodeStatus`), the merged range table
//! (each range as the node with the newest epoch sees it, its leader as the leader itself
//! says), and calls routed to a range's leader: a node that does not lead answers
//! UNAVAILABLE naming the leader's node in its metadata, and the call is sent there.

use std::collections::BTreeMap;
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use flotilla_proto::admin::admin_client::AdminClient;
use flotilla_proto::admin::{
    NodeStatusRequest, NodeStatusResponse, RangeInfo, RangeSizesRequest, RangesRequest,
};
use flotilla_proto::kv::kv_client::KvClient;
use flotilla_proto::LEADER_NODE_METADATA;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};

/// How to reach the cluster: the global flags.
#[derive(Debug, Clone)]
pub struct Dial {
    /// `host:port` of each node's client API.
    pub endpoints: Vec<String>,
    /// Per call and per connection attempt.
    pub timeout: Duration,
    /// TLS: the CA that signed the nodes' certificates, and this client's certificate and key
    /// (PEM contents).
    pub tls: Option<ClientTlsConfig>,
}

impl Dial {
    /// TLS settings from the PEM files given to the flags (none: plaintext).
    pub fn tls_from_files(
        ca: Option<&std::path::Path>,
        cert: Option<&std::path::Path>,
        key: Option<&std::path::Path>,
        server_name: Option<&str>,
    ) -> Result<Option<ClientTlsConfig>> {
        let read = |flag: &str, p: &std::path::Path| {
            std::fs::read_to_string(p)
                .with_context(|| format!("{flag}: cannot read {}", p.display()))
        };
        let Some(ca) = ca else {
            if cert.is_some() || key.is_some() {
                bail!(
                    "--cert and --key need --cacert (the CA that signed the nodes' certificates)"
                );
            }
            return Ok(None);
        };
        let mut tls =
            ClientTlsConfig::new().ca_certificate(Certificate::from_pem(read("--cacert", ca)?));
        match (cert, key) {
            (Some(c), Some(k)) => {
                tls = tls.identity(Identity::from_pem(read("--cert", c)?, read("--key", k)?));
            }
            (None, None) => {}
            _ => bail!("--cert and --key go together"),
        }
        if let Some(name) = server_name {
            tls = tls.domain_name(name);
        }
        Ok(Some(tls))
    }
}

/// One endpoint: its address, channel and (once it answered) node id.
#[derive(Debug, Clone)]
pub struct Node {
    /// As given in `--endpoints`.
    pub endpoint: String,
    channel: Channel,
    /// What it answered to `NodeStatus`, or why it did not.
    pub status: std::result::Result<NodeStatusResponse, String>,
}

impl Node {
    /// The admin client of this node.
    pub fn admin(&self) -> AdminClient<Channel> {
        AdminClient::new(self.channel.clone())
    }
}

/// The reachable part of a cluster.
#[derive(Debug)]
pub struct Cluster {
    /// Every endpoint, in the order given.
    pub nodes: Vec<Node>,
    timeout: Duration,
}

/// A range as the cluster sees it: the newest descriptor any node has, and the leader as
/// the leader's own node says (with its sizes, which the leader measured).
#[derive(Debug, Clone)]
pub struct Range {
    /// The descriptor and sizes.
    pub info: RangeInfo,
    /// The node that leads it, if any node says it leads it.
    pub leader: Option<u64>,
}

impl Cluster {
    /// An admin client for every endpoint that answered, with its node id.
    pub fn admins(&self) -> Vec<(u64, AdminClient<Channel>)> {
        self.nodes
            .iter()
            .filter_map(|n| {
                let id = n.status.as_ref().ok()?.node_id;
                Some((id, AdminClient::new(n.channel.clone())))
            })
            .collect()
    }

    /// Connects to every endpoint (each within the timeout) and asks each its node id.
    ///
    /// # Errors
    ///
    /// When no endpoint answers: the endpoints, the timeout and each one's error.
    pub async fn connect(dial: &Dial) -> Result<Cluster> {
        if dial.endpoints.is_empty() {
            bail!("--endpoints is empty: give the client address (host:port) of at least one node");
        }
        let mut nodes = Vec::new();
        for e in &dial.endpoints {
            let channel = channel(e, dial)?;
            let status = tokio::time::timeout(
                dial.timeout,
                AdminClient::new(channel.clone()).node_status(NodeStatusRequest {}),
            )
            .await
            .map_err(|_| format!("no answer within {:?}", dial.timeout))
            .and_then(|r| r.map(|r| r.into_inner()).map_err(|s| describe(&s)));
            nodes.push(Node {
                endpoint: e.clone(),
                channel,
                status,
            });
        }
        if nodes.iter().all(|n| n.status.is_err()) {
            let why: Vec<String> = nodes
                .iter()
                .map(|n| format!("{}: {}", n.endpoint, n.status.as_ref().err().unwrap()))
                .collect();
            bail!(
                "cannot reach the cluster: no endpoint answered within {:?} ({})",
                dial.timeout,
                why.join("; ")
            );
        }
        Ok(Cluster {
            nodes,
            timeout: dial.timeout,
        })
    }

    /// The endpoint of node `id`, if one of the endpoints is that node.
    fn node(&self, id: u64) -> Option<&Node> {
        self.nodes
            .iter()
            .find(|n| n.status.as_ref().is_ok_and(|s| s.node_id == id))
    }

    /// Nodes that answered.
    pub fn reachable(&self) -> impl Iterator<Item = &Node> {
        self.nodes.iter().filter(|n| n.status.is_ok())
    }

    /// The admin client of node `id`, or of the first reachable node.
    pub fn admin(&self, id: Option<u64>) -> Result<(u64, AdminClient<Channel>)> {
        let node = match id {
            Some(id) => self.node(id).ok_or_else(|| {
                anyhow!("node {id} is not among the reachable --endpoints; add its client address")
            })?,
            None => self
                .reachable()
                .next()
                .expect("connect keeps a reachable node"),
        };
        let id = node.status.as_ref().map_or(0, |s| s.node_id);
        Ok((id, AdminClient::new(node.channel.clone())))
    }

    /// The KV client of any reachable node, starting with the `i`-th.
    pub fn kv(&self, i: usize) -> (String, KvClient<Channel>) {
        let reachable: Vec<&Node> = self.reachable().collect();
        let n = reachable[i % reachable.len()];
        (n.endpoint.clone(), KvClient::new(n.channel.clone()))
    }

    /// How many nodes answered.
    pub fn reachable_count(&self) -> usize {
        self.reachable().count()
    }

    /// The timeout of one call.
    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    /// The range table merged over every reachable node; with each range's keys and bytes
    /// if `sizes`.
    pub async fn ranges(&self, sizes: bool) -> Result<Vec<Range>> {
        let mut merged: BTreeMap<u64, Range> = BTreeMap::new();
        let mut answered = 0;
        for n in self.reachable() {
            let mut admin = AdminClient::new(n.channel.clone());
            let call = async move {
                if sizes {
                    admin.range_sizes(RangeSizesRequest {}).await
                } else {
                    admin.ranges(RangesRequest {}).await
                }
            };
            let Ok(Ok(table)) = tokio::time::timeout(self.timeout, call).await else {
                continue;
            };
            answered += 1;
            let table = table.into_inner();
            for info in table.ranges {
                let leads = info.leader_node_id == table.node_id;
                let entry = merged.entry(info.range_id).or_insert_with(|| Range {
                    info: info.clone(),
                    leader: None,
                });
                if newer(&info, &entry.info) {
                    entry.info = RangeInfo {
                        keys: entry.info.keys,
                        bytes: entry.info.bytes,
                        size_exact: entry.info.size_exact,
                        ..info.clone()
                    };
                }
                if leads {
                    entry.leader = Some(table.node_id);
                    // The leader's sizes are the ones shown (it has applied the most).
                    entry.info.keys = info.keys;
                    entry.info.bytes = info.bytes;
                    entry.info.size_exact = info.size_exact;
                }
            }
        }
        if answered == 0 {
            bail!(
                "no node answered the range table request within {:?}",
                self.timeout
            );
        }
        // A range some node still lists but a newer descriptor of a neighbour covers (a split
        // or merge it has not applied) is dropped: keep the newest tiling by start key.
        let mut ranges: Vec<Range> = merged.into_values().collect();
        ranges.sort_by(|a, b| a.info.start_key.cmp(&b.info.start_key));
        Ok(ranges)
    }

    /// The range `id` as the cluster sees it.
    pub async fn range(&self, id: u64) -> Result<Range> {
        self.ranges(false)
            .await?
            .into_iter()
            .find(|r| r.info.range_id == id)
            .ok_or_else(|| anyhow!("no reachable node knows range {id}"))
    }

    /// Runs `call` on the leader of `range` (as the table says, else any node), following
    /// the leader a node names when it does not lead, a few times.
    pub async fn on_leader<T, F, Fut>(&self, range: u64, mut call: F) -> Result<T>
    where
        F: FnMut(AdminClient<Channel>) -> Fut,
        Fut: std::future::Future<Output = std::result::Result<tonic::Response<T>, tonic::Status>>,
    {
        let mut target = self.range(range).await?.leader;
        let mut last = None;
        for _ in 0..4 {
            let (_, client) = self.admin(target)?;
            match tokio::time::timeout(self.timeout, call(client)).await {
                Err(_) => bail!("no answer within {:?}", self.timeout),
                Ok(Ok(r)) => return Ok(r.into_inner()),
                Ok(Err(s)) => {
                    let hint = s
                        .metadata()
                        .get(LEADER_NODE_METADATA)
                        .and_then(|v| v.to_str().ok()?.parse::<u64>().ok());
                    match hint {
                        Some(leader) if s.code() == tonic::Code::Unavailable => {
                            target = Some(leader);
                            last = Some(s);
                        }
                        _ => bail!("{}", describe(&s)),
                    }
                }
            }
        }
        bail!(
            "the leader of range {range} kept moving: {}",
            last.map(|s| describe(&s)).unwrap_or_default()
        )
    }
}

/// Whether `a` is a newer descriptor than `b` (epochs only grow).
fn newer(a: &RangeInfo, b: &RangeInfo) -> bool {
    let key = |i: &RangeInfo| i.epoch.as_ref().map_or((0, 0), |e| (e.version, e.conf_ver));
    key(a) > key(b)
}

/// A channel to `endpoint` (`host:port`, or with its scheme), connecting lazily.
fn channel(endpoint: &str, dial: &Dial) -> Result<Channel> {
    let scheme = if dial.tls.is_some() { "https" } else { "http" };
    let uri = if endpoint.contains("://") {
        endpoint.to_string()
    } else {
        format!("{scheme}://{endpoint}")
    };
    let mut e = Endpoint::from_shared(uri)
        .with_context(|| format!("--endpoints: {endpoint:?} is not host:port"))?
        .connect_timeout(dial.timeout)
        .timeout(dial.timeout);
    if let Some(tls) = &dial.tls {
        e = e
            .tls_config(tls.clone())
            .with_context(|| format!("TLS settings for {endpoint}"))?;
    }
    Ok(e.connect_lazy())
}

/// A status as one line: the code's meaning and the message, and the transport's cause.
pub fn describe(s: &tonic::Status) -> String {
    use std::error::Error as _;
    let mut out = format!("{:?}: {}", s.code(), s.message());
    let mut source = s.source();
    while let Some(e) = source {
        out.push_str(&format!(": {e}"));
        source = e.source();
    }
    out
}
