//! TLS from the server's config: three nodes whose transport runs mutual TLS and whose client
//! APIs require client certificates, all from a cluster CA made on the spot by rcgen. Node 3
//! holds a certificate from a foreign CA: the others refuse it (and it them), while nodes 1
//! and 2 serve. A client with a certificate from the cluster CA reads and writes; one
//! without a certificate, or with a foreign one, is refused at the handshake.
//!
//! A plain `#[test]` with its own runtime, so that the servers' shutdowns can wait.

use std::net::{SocketAddr, TcpListener};
use std::time::{Duration, Instant};

use flotilla::proto::kv::kv_client::KvClient;
use flotilla::proto::kv::{GetRequest, PutRequest};
use flotilla::server::ClientTls;
use flotilla::testing::{key_in_range, test_config};
use flotilla::transport::TlsConfig;
use flotilla::{NodeId, Server, ServerConfig};
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
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
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
