//! Mutual TLS tests with certificates made on the spot by rcgen: a cluster CA with node
//! certificates for `localhost` / 127.0.0.1, and a foreign CA whose certificate must be
//! refused both as a client and as a server.

use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair, KeyUsagePurpose,
};

use super::tests::{any_port, config, one, runtime, Node};
use super::*;

/// A CA that signs node certificates.
struct Ca {
    issuer: CertifiedIssuer<'static, KeyPair>,
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

    /// A node certificate valid as server and client for localhost and 127.0.0.1, with the
    /// TLS config that trusts `trust`.
    fn node_tls(&self, trust: &Ca) -> TlsConfig {
        let mut params =
            CertificateParams::new(vec!["localhost".to_string(), "127.0.0.1".to_string()]).unwrap();
        params
            .distinguished_name
            .push(DnType::CommonName, "flotilla node");
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        let key = KeyPair::generate().unwrap();
        let cert = params.signed_by(&key, &*self.issuer).unwrap();
        TlsConfig::new(trust.issuer.pem(), cert.pem(), key.serialize_pem())
    }
}

fn tls_config(tls: TlsConfig) -> GrpcConfig {
    GrpcConfig {
        tls: Some(tls),
        ..config()
    }
}

#[test]
fn nodes_with_certificates_from_the_cluster_ca_exchange_batches() {
    let rt = runtime();
    let ca = Ca::new("flotilla test CA");
    let n1 = Node::start(&rt, 1, tls_config(ca.node_tls(&ca)));
    let n2 = Node::start(&rt, 2, tls_config(ca.node_tls(&ca)));
    n1.knows(&n2);
    n2.knows(&n1);
    for tag in 1..=50 {
        n1.t.send(NodeId(2), one(tag)).unwrap();
        n2.t.send(NodeId(1), one(tag)).unwrap();
    }
    assert!(n2.wait(|s| s.delivered_messages == 50));
    assert!(n1.wait(|s| s.delivered_messages == 50));
    assert_eq!(n2.tags_from(1), (1..=50).collect::<Vec<_>>());
    assert_eq!(n1.tags_from(2), (1..=50).collect::<Vec<_>>());
    assert_eq!(n1.t.stats().connect_failures, 0);
    n1.t.shutdown();
    n2.t.shutdown();
}

#[test]
fn a_certificate_from_another_ca_is_refused_both_ways() {
    let rt = runtime();
    let ca = Ca::new("flotilla test CA");
    let foreign = Ca::new("someone else's CA");
    let n1 = Node::start(&rt, 1, tls_config(ca.node_tls(&ca)));
    // Node 3 trusts its own CA and presents a certificate from it.
    let n3 = Node::start(&rt, 3, tls_config(foreign.node_tls(&foreign)));
    // Node 4 trusts the cluster CA but presents a foreign certificate.
    let n4 = Node::start(&rt, 4, tls_config(foreign.node_tls(&ca)));
    // Node 5 speaks plaintext.
    let n5 = Node::start(&rt, 5, config());
    for n in [&n3, &n4, &n5] {
        n.knows(&n1);
        n1.knows(n);
        let _ = n.t.send(NodeId(1), one(n.t.node().0));
        let _ = n1.t.send(n.t.node(), one(1));
    }
    // Several attempts each, to be sure none ever gets through.
    for n in [&n3, &n4, &n5] {
        assert!(n.wait(|s| s.connect_failures >= 2), "{:?}", n.t.stats());
    }
    assert!(
        n1.wait(|s| s.connect_failures >= 6),
        "n1 refuses each server too"
    );
    for n in [&n1, &n3, &n4, &n5] {
        let s = n.t.stats();
        assert_eq!(s.connects, 0, "{s:?}");
        assert_eq!(s.frames_received, 0, "{s:?}");
        assert!(n.inbox.lock().is_empty());
    }
    for n in [&n1, &n3, &n4, &n5] {
        n.t.shutdown();
    }
}

#[test]
fn unreadable_tls_material_fails_bind() {
    let rt = runtime();
    let ca = Ca::new("flotilla test CA");
    let mut tls = ca.node_tls(&ca);
    tls.key_pem = "-----BEGIN PRIVATE KEY-----\nnot base64\n-----END PRIVATE KEY-----\n".into();
    assert!(matches!(
        GrpcTransport::bind(NodeId(1), tls_config(tls), any_port(), rt.handle().clone()),
        Err(TransportError::Tls(_))
    ));
}
