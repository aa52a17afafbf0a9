//! TLS from the server's config: three nodes whose transport runs mutual TLS and whose client
//! APIs require client certificates, all from a cluster CA made on the spot by rcgen. Node 3
//! holds a certificate from a foreign CA: the others refuse it (and it them), while nodes 1
//! and 2 serve. A client with a certificate from the cluster CA reads and writes; one
//! without a certificate, or with a foreign one, is refused at the handshake.
//!
//! The same as an operator runs it: three `flotilla-node` processes, each started with a
//! TOML config file that names its certificate files (written by the test), `flotilla-ctl`
//! with its CA and client certificate flags working against them, a client presenting no
//! certificate or a foreign one refused, and the node with a foreign certificate kept out.
//!
//! Plain `#[test]`s with their own runtime, so that the servers' shutdowns can wait.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use flotilla::proto::kv::kv_client::KvClient;
use flotilla::proto::kv::{GetRequest, PutRequest};
use flotilla::server::ClientTls;
use flotilla::testing::{key_in_range, test_config};
use flotilla::transport::TlsConfig;
use flotilla::{NodeId, Server, ServerConfig};
use flotilla_benchkit::nodes::{http_get, NodeProcs};
use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair, KeyUsagePurpose,
};
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};

const T: Duration = Duration::from_secs(30);

/// A CA that signs node and client certificates.
struct Ca {
    issuer: CertifiedIssuer<'static, KeyPair>,
}

/// A certificate and its key, PEM.
struct Cert {
    cert: String,
    key: String,
}

impl Ca {
    fn new(name: &str) -> Ca {
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.distinguished_name.push(DnType::CommonName, name);
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let issuer = CertifiedIssuer::self_signed(params, KeyPair::generate().unwrap()).unwrap();
        Ca { issuer }
    }

    fn pem(&self) -> String {
        self.issuer.pem()
    }

    /// A certificate for localhost / 127.0.0.1, valid as server and client.
    fn issue(&self, name: &str) -> Cert {
        let mut params =
            CertificateParams::new(vec!["localhost".to_string(), "127.0.0.1".to_string()]).unwrap();
        params.distinguished_name.push(DnType::CommonName, name);
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        let key = KeyPair::generate().unwrap();
        let cert = params.signed_by(&key, &*self.issuer).unwrap();
        Cert {
            cert: cert.pem(),
            key: key.serialize_pem(),
        }
    }
}

fn free_addr() -> SocketAddr {
    flotilla_benchkit::free_addr("127.0.0.1").unwrap()
}

/// A KV client of `addr` over TLS trusting `ca`, presenting `cert` if given.
async fn client(
    addr: SocketAddr,
    ca: &Ca,
    cert: Option<&Cert>,
) -> Result<KvClient<Channel>, String> {
    let mut tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(ca.pem()))
        .domain_name("localhost");
    if let Some(c) = cert {
        tls = tls.identity(Identity::from_pem(&c.cert, &c.key));
    }
    let channel = Endpoint::from_shared(format!("https://{addr}"))
        .unwrap()
        .tls_config(tls)
        .map_err(|e| e.to_string())?
        .connect_timeout(Duration::from_secs(5))
        .timeout(Duration::from_secs(5))
        .connect()
        .await
        .map_err(|e| format!("{e:?}"))?;
    Ok(KvClient::new(channel))
}

fn put_req(key: &[u8]) -> PutRequest {
    PutRequest {
        key: key.to_vec().into(),
        value: b"v".to_vec().into(),
        ..Default::default()
    }
}

#[test]
fn nodes_and_clients_without_a_certificate_from_the_cluster_ca_are_refused() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new("flotilla cluster CA");
    let foreign = Ca::new("someone else's CA");
    let raft: Vec<SocketAddr> = (0..3).map(|_| free_addr()).collect();
    let clients: Vec<SocketAddr> = (0..3).map(|_| free_addr()).collect();
    let servers: Vec<Server> = (0..3)
        .map(|i| {
            // Node 3 trusts and presents the foreign CA's certificates.
            let issuer = if i == 2 { &foreign } else { &ca };
            let cert = issuer.issue(&format!("node {}", i + 1));
            let mut config = ServerConfig {
                node: test_config(i as u64 + 1),
                data_dir: dir.path().join(format!("n{}", i + 1)),
                raft_addr: raft[i],
                client_addr: clients[i],
                peers: (0..3)
                    .map(|j| (NodeId(j as u64 + 1), raft[j].to_string()))
                    .collect(),
                bootstrap_ranges: 2,
                client_tls: Some(ClientTls {
                    cert_pem: cert.cert.clone(),
                    key_pem: cert.key.clone(),
                    client_ca_pem: Some(issuer.pem()),
                }),
                ..ServerConfig::default()
            };
            config.grpc.tls = Some(TlsConfig::new(issuer.pem(), cert.cert, cert.key));
            Server::start(config, rt.handle().clone()).unwrap()
        })
        .collect();

    let client_cert = ca.issue("operator");
    let foreign_cert = foreign.issue("intruder");
    rt.block_on(async {
        // A client with a cluster certificate writes and reads (nodes 1 and 2 are a quorum).
        let key = key_in_range(1, "tls");
        let deadline = Instant::now() + T;
        loop {
            let ok = match client(clients[0], &ca, Some(&client_cert)).await {
                Ok(mut c) => c.put(put_req(&key)).await.is_ok(),
                Err(_) => false,
            };
            if ok {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "the cluster never took a write over TLS"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let mut c = client(clients[1], &ca, Some(&client_cert)).await.unwrap();
        let got = c
            .get(GetRequest {
                key: key.clone().into(),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        assert!(got.found);

        // No client certificate, or a foreign one: refused at the handshake (the first call
        // fails even if the connection seemed to open).
        for cert in [None, Some(&foreign_cert)] {
            let refused = match client(clients[0], &ca, cert).await {
                Err(_) => true,
                Ok(mut c) => c.put(put_req(&key)).await.is_err(),
            };
            assert!(
                refused,
                "a client with certificate {:?} was served",
                cert.map(|_| "foreign")
            );
        }
        // Plaintext to a TLS port: refused too.
        let plain = async {
            let mut c = KvClient::connect(format!("http://{}", clients[0]))
                .await
                .ok()?;
            c.put(put_req(&key)).await.ok()
        };
        assert!(plain.await.is_none());
    });

    // Node 3's certificate is refused by nodes 1 and 2: their connections to it fail, and it
    // never hears from them (so never learns a leader), while they serve.
    let refused = |s: &Server| s.transport().stats().connect_failures > 0;
    let deadline = Instant::now() + T;
    while !(refused(&servers[0]) && refused(&servers[1]) && refused(&servers[2])) {
        assert!(
            Instant::now() < deadline,
            "a node with a foreign certificate was not refused"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(servers[2].node().ranges().iter().all(|d| servers[2]
        .node()
        .status(d.id())
        .unwrap()
        .leader_node
        .is_none()));
    for s in &servers {
        s.shutdown();
    }
}

/// Writes `text` to `dir/name` and returns the path as a string for a config or a flag.
fn write(dir: &Path, name: &str, text: &str) -> String {
    let path = dir.join(name);
    std::fs::write(&path, text).unwrap();
    path.display().to_string()
}

/// The value of the unlabelled counter `name` on a `/metrics` page.
fn counter(page: &str, name: &str) -> f64 {
    page.lines()
        .filter_map(|l| l.strip_prefix(name)?.strip_prefix(' '))
        .filter_map(|v| v.trim().parse::<f64>().ok())
        .sum()
}

fn ctl_binary() -> PathBuf {
    flotilla_benchkit::nodes::ctl_beside(Path::new(env!("CARGO_BIN_EXE_flotilla-node"))).unwrap()
}

#[test]
fn node_processes_take_tls_from_their_config_files_and_refuse_foreign_certificates() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let ca = Ca::new("flotilla cluster CA");
    let foreign = Ca::new("someone else's CA");
    let ca_file = write(d, "ca.pem", &ca.pem());
    let foreign_ca_file = write(d, "foreign-ca.pem", &foreign.pem());
    let raft: Vec<SocketAddr> = (0..3).map(|_| free_addr()).collect();
    let client: Vec<SocketAddr> = (0..3).map(|_| free_addr()).collect();
    let metrics: Vec<SocketAddr> = (0..3).map(|_| free_addr()).collect();
    let peers: String = (0..3)
        .map(|j| format!("{} = \"{}\"\n", j + 1, raft[j]))
        .collect();
    // Node 3 presents, and trusts, certificates of the foreign CA only.
    let args = (0..3)
        .map(|i| {
            let id = i + 1;
            let (issuer, trust) = if i == 2 {
                (&foreign, &foreign_ca_file)
            } else {
                (&ca, &ca_file)
            };
            let cert = issuer.issue(&format!("node {id}"));
            let config = format!(
                "[node]\nid = {id}\ndata-dir = \"{data}\"\nraft = \"{raft}\"\n\
                 client = \"{client}\"\nmetrics = \"{metrics}\"\nbootstrap-ranges = 2\n\
                 [peers]\n{peers}[raft]\ntick-ms = 20\n\
                 [tls]\nca-file = \"{trust}\"\ncert-file = \"{cert}\"\nkey-file = \"{key}\"\n",
                data = d.join(format!("n{id}")).display(),
                raft = raft[i],
                client = client[i],
                metrics = metrics[i],
                cert = write(d, &format!("n{id}.pem"), &cert.cert),
                key = write(d, &format!("n{id}-key.pem"), &cert.key),
            );
            let file = write(d, &format!("n{id}.toml"), &config);
            vec!["--config".to_string(), file]
        })
        .collect();
    let mut procs = NodeProcs::start_args(
        Path::new(env!("CARGO_BIN_EXE_flotilla-node")),
        args,
        client.clone(),
    )
    .unwrap();

    let operator = ca.issue("operator");
    let operator_cert = write(d, "operator.pem", &operator.cert);
    let operator_key = write(d, "operator-key.pem", &operator.key);
    let intruder = foreign.issue("intruder");
    let intruder_cert = write(d, "intruder.pem", &intruder.cert);
    let intruder_key = write(d, "intruder-key.pem", &intruder.key);
    // flotilla-ctl against nodes 1 and 2 (a quorum), with the given TLS flags.
    let healthy = format!("{},{}", client[0], client[1]);
    let ctl = |endpoints: &str, tls: &[&str], args: &[&str]| {
        Command::new(ctl_binary())
            .args(["--endpoints", endpoints, "--timeout", "5s"])
            .args(["--server-name", "localhost"])
            .args(tls)
            .args(args)
            .output()
            .unwrap()
    };
    let operator_tls = [
        "--cacert",
        ca_file.as_str(),
        "--cert",
        operator_cert.as_str(),
        "--key",
        operator_key.as_str(),
    ];
    let deadline = Instant::now() + T;
    loop {
        let out = ctl(
            &healthy,
            &operator_tls,
            &["kv", "put", "k00000001-tls", "v"],
        );
        if out.status.success() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "flotilla-ctl never wrote over TLS: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let got = ctl(&healthy, &operator_tls, &["kv", "get", "k00000001-tls"]);
    assert!(got.status.success(), "{got:?}");
    assert_eq!(String::from_utf8_lossy(&got.stdout).trim(), "v");

    // No client certificate, one from a foreign CA, or plaintext: refused.
    let refused = [
        ("no certificate", vec!["--cacert", ca_file.as_str()]),
        (
            "a foreign certificate",
            vec![
                "--cacert",
                ca_file.as_str(),
                "--cert",
                intruder_cert.as_str(),
                "--key",
                intruder_key.as_str(),
            ],
        ),
        ("plaintext", vec![]),
    ];
    for (what, tls) in refused {
        let out = ctl(&healthy, &tls, &["kv", "get", "k00000001-tls"]);
        assert!(!out.status.success(), "a client with {what} was served");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains("cannot reach the cluster"), "{what}: {err}");
    }

    // Nodes 1 and 2 serve: every range they host knows its leader.
    for (i, addr) in metrics.iter().enumerate().take(2) {
        let deadline = Instant::now() + T;
        loop {
            let (code, body) = http_get(*addr, "/health").unwrap();
            if code == 200 {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "node {} does not serve: {body}",
                i + 1
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
    // Node 3 cannot join: with the cluster up, nodes 1 and 2 keep failing to connect to it
    // (its certificate is refused, and theirs by it) and it to them, so it never learns a
    // leader (its /health says so).
    let failures = |i: usize| {
        http_get(metrics[i], "/metrics").map_or(0.0, |(_, page)| {
            counter(&page, "flotilla_transport_grpc_connect_failures_total")
        })
    };
    let before: Vec<f64> = (0..3).map(failures).collect();
    let deadline = Instant::now() + T;
    while !(0..3).all(|i| failures(i) > before[i]) {
        assert!(
            Instant::now() < deadline,
            "a node with a foreign certificate was not refused: {before:?} then {:?}",
            (0..3).map(failures).collect::<Vec<_>>()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let (code, body) = http_get(metrics[2], "/health").unwrap();
    assert_eq!(code, 503, "node 3 serves: {body}");
    // Seen by an operator who holds node 3's foreign CA: its ranges have no leader.
    let alone = ctl(
        &client[2].to_string(),
        &[
            "--cacert",
            foreign_ca_file.as_str(),
            "--cert",
            intruder_cert.as_str(),
            "--key",
            intruder_key.as_str(),
        ],
        &["ranges", "--no-sizes", "-o", "json"],
    );
    assert!(alone.status.success(), "{alone:?}");
    let list: serde_json::Value = serde_json::from_slice(&alone.stdout).unwrap();
    assert!(
        list.as_array()
            .unwrap()
            .iter()
            .all(|r| r["leader_node_id"].is_null()),
        "{list:#}"
    );

    // A fourth node joins over TLS (`join` in its config file, the cluster's certificates): it
    // asks node 1's client API for an id over TLS, gets 4, and is listed by the registry with
    // the addresses it bound.
    let (raft4, client4) = (free_addr(), free_addr());
    let cert4 = ca.issue("node 4");
    let config4 = format!(
        "[node]\ndata-dir = \"{data}\"\nraft = \"{raft4}\"\nclient = \"{client4}\"\n\
         join = \"{join}\"\n[raft]\ntick-ms = 20\n\
         [tls]\nca-file = \"{ca_file}\"\ncert-file = \"{cert}\"\nkey-file = \"{key}\"\n",
        data = d.join("n4").display(),
        join = client[0],
        cert = write(d, "n4.pem", &cert4.cert),
        key = write(d, "n4-key.pem", &cert4.key),
    );
    procs
        .add(
            vec!["--config".to_string(), write(d, "n4.toml", &config4)],
            client4,
        )
        .unwrap();
    let deadline = Instant::now() + T;
    loop {
        let out = ctl(&healthy, &operator_tls, &["registry", "-o", "json"]);
        let listed = out.status.success() && {
            let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
            v.as_array().unwrap().iter().any(|x| {
                x["id"] == 4
                    && x["raft"] == raft4.to_string().as_str()
                    && x["client"] == client4.to_string().as_str()
            })
        };
        if listed {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "node 4 never joined over TLS: {} {}; its log: {}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr),
            procs.log_tail(3, 20)
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    drop(procs);
}
