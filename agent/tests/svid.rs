//! X.509-SVID verification through real TLS 1.3 handshakes over loopback
//! sockets: every acceptance and every refusal kind the identity issue
//! names, session resumption, rotation, CA and CRL changes at runtime, and
//! established connections cut off on revocation.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use nodeward::identity::Identity;
use nodeward::identity::authority::Authority;
use nodeward::identity::ca;
use nodeward::identity::ca_cli::{self, Signer};
use nodeward::identity::manager::{CaSource, CertManager, IdentityConfig};
use nodeward::identity::tls::{self, CertSource, FixedCert, certified_key};
use nodeward::identity::trust::{DenyEntry, TrustSnapshot, TrustStore, UnknownStatus};
use nodeward::identity::verify::{Refusal, Role, refusal_of_io};
use nodeward::proxy::open::OpenConns;
use rcgen::{DnType, ExtendedKeyUsagePurpose, IsCa, SanType};
use rustls::pki_types::{CertificateDer, ServerName};
use rustls::sign::CertifiedKey;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::{TlsAcceptor, TlsConnector};
use tokio_util::sync::CancellationToken;

const TD: &str = "cluster.local";

fn tmp(tag: &str) -> PathBuf {
    use std::sync::atomic::{AtomicU32, Ordering};
    static N: AtomicU32 = AtomicU32::new(0);
    let d = std::env::temp_dir().join(format!(
        "nodeward-svid-{tag}-{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    ));
    let _ = std::fs::remove_dir_all(&d);
    d
}

/// A root + intermediate, and a second intermediate below the first.
struct Pki {
    dir: PathBuf,
    nested_dir: PathBuf,
    ca: Authority,
    nested: Authority,
}

fn pki() -> Pki {
    let dir = tmp("ca");
    ca_cli::init_with_path_len(&dir, &ca_cli::default_root_dir(&dir), 1).unwrap();
    let nested_dir = tmp("nested");
    ca_cli::intermediate(&dir, Signer::Intermediate, &nested_dir).unwrap();
    Pki {
        ca: Authority::load(&dir).unwrap(),
        nested: Authority::load(&nested_dir).unwrap(),
        dir,
        nested_dir,
    }
}

fn trust_for(a: &Authority) -> TrustSnapshot {
    TrustSnapshot::new(TD, a.roots().to_vec(), a.chain())
}

fn id(ns: &str, sa: &str) -> Identity {
    Identity::new(TD, ns, sa)
}

fn key_for(a: &Authority, who: &Identity) -> Arc<CertifiedKey> {
    let c = a.issue(who, Duration::from_secs(3600)).unwrap();
    certified_key(c.chain, c.key).unwrap()
}

/// A leaf from `a` with SVID defaults changed by `f`, followed by `chain`.
fn crafted(
    a: &Authority,
    chain: &[CertificateDer<'static>],
    f: impl FnOnce(&mut rcgen::CertificateParams),
) -> Arc<CertifiedKey> {
    let (leaf, key, _) = a
        .issue_with(|p| {
            p.subject_alt_names = vec![SanType::URI(id("shop", "web").to_string().try_into().unwrap())];
            let now = SystemTime::now();
            p.not_before = (now - Duration::from_secs(60)).into();
            p.not_after = (now + Duration::from_secs(3600)).into();
            f(p);
            Ok(())
        })
        .unwrap();
    let mut full = vec![leaf];
    full.extend(chain.iter().cloned());
    certified_key(full, key).unwrap()
}

struct Outcome {
    server: std::io::Result<Option<Identity>>,
    client: std::io::Result<()>,
}

/// One real handshake over loopback; each side's result.
async fn handshake(server_cfg: Arc<rustls::ServerConfig>, client_cfg: Arc<rustls::ClientConfig>) -> Outcome {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let server = tokio::spawn(async move {
        let (tcp, _) = listener.accept().await.unwrap();
        let mut tls = TlsAcceptor::from(server_cfg).accept(tcp).await?;
        let peer = tls::peer_identity(tls.get_ref().1.peer_certificates());
        let _ = tls.write_all(b"ok").await;
        let _ = tls.shutdown().await;
        Ok(peer)
    });
    let tcp = TcpStream::connect(addr).await.unwrap();
    let client = async {
        let mut tls = TlsConnector::from(client_cfg)
            .connect(ServerName::IpAddress(addr.ip().into()), tcp)
            .await?;
        let mut b = [0u8; 2];
        tls.read_exact(&mut b).await?;
        Ok(())
    }
    .await;
    Outcome {
        server: server.await.unwrap(),
        client,
    }
}

fn server_cfg(cert: Arc<CertifiedKey>, trust: Arc<TrustStore>) -> Arc<rustls::ServerConfig> {
    tls::server_config(Arc::new(FixedCert(cert)), id("shop", "api"), trust)
}

fn client_cfg(cert: Arc<CertifiedKey>, trust: Arc<TrustStore>, expected: Identity) -> Arc<rustls::ClientConfig> {
    tls::client_config(Arc::new(FixedCert(cert)), id("shop", "web"), trust, expected)
}

#[tokio::test]
async fn client_certificates_accepted_and_refused_each_for_its_own_reason() {
    let p = pki();
    let other = tmp("other");
    ca_cli::init(&other).unwrap();
    let other_ca = Authority::load(&other).unwrap();
    // The nested CA's chain is [I2, I1]; this node knows both.
    let nested_chain = p.nested.chain().to_vec();
    let web = id("shop", "web");

    let serial_hex = |k: &Arc<CertifiedKey>| {
        use x509_parser::prelude::{FromDer, X509Certificate};
        let (_, c) = X509Certificate::from_der(k.cert[0].as_ref()).unwrap();
        ca::hex(c.raw_serial())
    };
    let revoked_leaf = key_for(&p.ca, &web);
    ca_cli::revoke(&p.dir, Signer::Intermediate, &[serial_hex(&revoked_leaf)]).unwrap();
    // A sibling intermediate, issued by the root, then revoked by the root's CRL.
    let sibling_dir = tmp("sibling");
    let root_dir = ca_cli::default_root_dir(&p.dir);
    ca_cli::intermediate(&root_dir, Signer::Root, &sibling_dir).unwrap();
    let sibling = Authority::load(&sibling_dir).unwrap();
    let sibling_serial = {
        use x509_parser::prelude::{FromDer, X509Certificate};
        let (_, c) = X509Certificate::from_der(sibling.chain()[0].as_ref()).unwrap();
        ca::hex(c.raw_serial())
    };
    let root_crl_dir = tmp("rootcrl");
    std::fs::create_dir_all(&root_crl_dir).unwrap();
    for f in [ca::ROOT_CERT, ca::ROOT_KEY] {
        std::fs::copy(root_dir.join(f), root_crl_dir.join(f)).unwrap();
    }
    ca_cli::revoke(&root_crl_dir, Signer::Root, &[sibling_serial]).unwrap();

    let ca_chain = p.ca.chain().to_vec();
    type Case = (&'static str, Arc<CertifiedKey>, Option<Refusal>);
    let cases: Vec<Case> = vec![
        ("valid leaf", key_for(&p.ca, &web), None),
        ("valid leaf via two intermediates", key_for(&p.nested, &web), None),
        (
            "wrong trust domain",
            crafted(&p.ca, &ca_chain, |c| {
                c.subject_alt_names = vec![SanType::URI("spiffe://evil.example/ns/shop/sa/web".try_into().unwrap())]
            }),
            Some(Refusal::WrongTrustDomain),
        ),
        (
            "expired",
            crafted(&p.ca, &ca_chain, |c| {
                let now = SystemTime::now();
                c.not_before = (now - Duration::from_secs(7200)).into();
                c.not_after = (now - Duration::from_secs(3600)).into();
            }),
            Some(Refusal::Expired),
        ),
        (
            "not yet valid",
            crafted(&p.ca, &ca_chain, |c| {
                let now = SystemTime::now();
                c.not_before = (now + Duration::from_secs(3600)).into();
                c.not_after = (now + Duration::from_secs(7200)).into();
            }),
            Some(Refusal::NotYetValid),
        ),
        ("unknown root", key_for(&other_ca, &web), Some(Refusal::UnknownRoot)),
        (
            "missing intermediate",
            crafted(&p.nested, &nested_chain[..1], |_| {}),
            Some(Refusal::MissingIntermediate),
        ),
        ("revoked leaf", revoked_leaf.clone(), Some(Refusal::RevokedLeaf)),
        (
            "revoked intermediate",
            key_for(&sibling, &web),
            Some(Refusal::RevokedIntermediate),
        ),
        (
            "two URI SANs",
            crafted(&p.ca, &ca_chain, |c| {
                c.subject_alt_names = vec![
                    SanType::URI(id("shop", "web").to_string().try_into().unwrap()),
                    SanType::URI(id("shop", "admin").to_string().try_into().unwrap()),
                ]
            }),
            Some(Refusal::MultipleUriSans),
        ),
        (
            "no URI SAN",
            crafted(&p.ca, &ca_chain, |c| {
                c.subject_alt_names = vec![SanType::DnsName("web.shop.svc".try_into().unwrap())]
            }),
            Some(Refusal::NoUriSan),
        ),
        (
            "CA flag on the leaf",
            crafted(&p.ca, &ca_chain, |c| {
                c.is_ca = IsCa::Ca(rcgen::BasicConstraints::Unconstrained)
            }),
            Some(Refusal::CaCertificate),
        ),
        (
            "SPIFFE ID in a DNS SAN (CVE-2022-21656 class)",
            crafted(&p.ca, &ca_chain, |c| {
                c.subject_alt_names = vec![SanType::DnsName(id("shop", "web").to_string().try_into().unwrap())]
            }),
            Some(Refusal::SpiffeIdOutsideUriSan),
        ),
        (
            "SPIFFE ID in the subject CN (CVE-2022-21656 class)",
            crafted(&p.ca, &ca_chain, |c| {
                c.subject_alt_names = vec![];
                c.distinguished_name
                    .push(DnType::CommonName, id("shop", "web").to_string());
            }),
            Some(Refusal::SpiffeIdOutsideUriSan),
        ),
        (
            "no clientAuth extended key usage (CVE-2022-21657 class)",
            crafted(&p.ca, &ca_chain, |c| {
                c.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth]
            }),
            Some(Refusal::MissingClientAuth),
        ),
    ];

    // The server trusts the root, knows both CA chains, and has both CRLs.
    let mut snap = trust_for(&p.ca);
    snap.known_intermediates
        .extend(TrustSnapshot::new(TD, vec![], &nested_chain).known_intermediates);
    for crl in [p.dir.join(ca::CA_CRL), root_crl_dir.join(ca::ROOT_CRL)] {
        let issuers: Vec<_> = p.ca.roots().iter().chain(p.ca.chain()).cloned().collect();
        snap.crls
            .extend(nodeward::identity::trust::load_crl_file(&crl, &issuers).unwrap());
    }
    let server_trust = TrustStore::new(snap);
    let client_trust = TrustStore::new(trust_for(&p.ca));
    let server_key = key_for(&p.ca, &id("shop", "api"));

    let mut seen_kinds = Vec::new();
    for (name, client_key, want) in cases {
        let o = handshake(
            server_cfg(server_key.clone(), server_trust.clone()),
            client_cfg(client_key, client_trust.clone(), id("shop", "api")),
        )
        .await;
        match want {
            None => {
                let peer = o.server.unwrap_or_else(|e| panic!("{name}: refused: {e}"));
                assert_eq!(
                    peer,
                    Some(web.clone()),
                    "{name}: the server learns the client's identity"
                );
                o.client.unwrap_or_else(|e| panic!("{name}: client failed: {e}"));
            }
            Some(kind) => {
                let err = o.server.err().unwrap_or_else(|| panic!("{name}: accepted"));
                assert_eq!(refusal_of_io(&err), Some(kind), "{name}: {err}");
                assert!(o.client.is_err(), "{name}: the client must not get data");
                seen_kinds.push(kind);
            }
        }
    }

    // No client certificate at all.
    let no_cert = Arc::new(
        rustls::ClientConfig::builder_with_provider(tls::provider())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .unwrap()
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(nodeward::identity::verify::SvidVerifier::for_server(
                client_trust.clone(),
                tls::provider(),
                id("shop", "api"),
            )))
            .with_no_client_auth(),
    );
    let o = handshake(server_cfg(server_key.clone(), server_trust.clone()), no_cert).await;
    let err = o.server.expect_err("refused without a client certificate");
    assert_eq!(refusal_of_io(&err), Some(Refusal::NoClientCertificate), "{err}");
    seen_kinds.push(Refusal::NoClientCertificate);

    // Thirteen refusals of the issue's list (the DNS-SAN and CN variants of
    // the CVE-2022-21656 class are one item, one kind), thirteen kinds.
    let distinct: std::collections::BTreeSet<&str> = seen_kinds.iter().map(|k| k.as_str()).collect();
    assert_eq!(distinct.len(), 13, "every refusal has its own kind: {seen_kinds:?}");
}

#[tokio::test]
async fn clients_refuse_servers_that_are_not_the_expected_identity() {
    let p = pki();
    let trust = TrustStore::new(trust_for(&p.ca));
    let me = key_for(&p.ca, &id("shop", "web"));
    let cases: Vec<(&str, Arc<CertifiedKey>, Refusal)> = vec![
        (
            "another identity of the mesh",
            key_for(&p.ca, &id("shop", "admin")),
            Refusal::WrongIdentity,
        ),
        (
            "no serverAuth extended key usage",
            crafted(&p.ca, p.ca.chain(), |c| {
                c.subject_alt_names = vec![SanType::URI(id("shop", "api").to_string().try_into().unwrap())];
                c.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
            }),
            Refusal::MissingServerAuth,
        ),
    ];
    for (name, server_key, want) in cases {
        let o = handshake(
            server_cfg(server_key, trust.clone()),
            client_cfg(me.clone(), trust.clone(), id("shop", "api")),
        )
        .await;
        let err = o.client.err().unwrap_or_else(|| panic!("{name}: accepted"));
        assert_eq!(refusal_of_io(&err), Some(want), "{name}: {err}");
    }
}

#[tokio::test]
async fn deny_list_and_unknown_revocation_policy_refuse() {
    let p = pki();
    let server_key = key_for(&p.ca, &id("shop", "api"));
    let client_trust = TrustStore::new(trust_for(&p.ca));
    let client = || {
        client_cfg(
            key_for(&p.ca, &id("shop", "web")),
            client_trust.clone(),
            id("shop", "api"),
        )
    };

    let mut denied = trust_for(&p.ca);
    denied.deny.entries.push(DenyEntry::Namespace("shop".into()));
    let o = handshake(server_cfg(server_key.clone(), TrustStore::new(denied)), client()).await;
    assert_eq!(refusal_of_io(&o.server.err().unwrap()), Some(Refusal::DeniedIdentity));

    let mut strict = trust_for(&p.ca);
    strict.unknown_status = UnknownStatus::Refuse;
    let o = handshake(server_cfg(server_key, TrustStore::new(strict)), client()).await;
    assert_eq!(
        refusal_of_io(&o.server.err().unwrap()),
        Some(Refusal::RevocationUnknown)
    );
}

#[tokio::test]
async fn no_session_is_resumed_so_a_new_crl_applies_to_the_next_handshake() {
    let p = pki();
    let trust = TrustStore::new(trust_for(&p.ca));
    let server = server_cfg(key_for(&p.ca, &id("shop", "api")), trust.clone());
    let client_key = key_for(&p.ca, &id("shop", "web"));
    let client = client_cfg(client_key.clone(), trust.clone(), id("shop", "api"));

    for _ in 0..2 {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let acceptor = TlsAcceptor::from(server.clone());
        let srv = tokio::spawn(async move {
            let (tcp, _) = listener.accept().await.unwrap();
            let tls = acceptor.accept(tcp).await.unwrap();
            tls.get_ref().1.handshake_kind()
        });
        let tcp = TcpStream::connect(addr).await.unwrap();
        let c = TlsConnector::from(client.clone())
            .connect(ServerName::IpAddress(addr.ip().into()), tcp)
            .await
            .unwrap();
        assert_eq!(c.get_ref().1.handshake_kind(), Some(rustls::HandshakeKind::Full));
        assert_eq!(srv.await.unwrap(), Some(rustls::HandshakeKind::Full));
    }

    // Revoke the client: the very next handshake with the same client config is refused.
    use x509_parser::prelude::{FromDer, X509Certificate};
    let (_, leaf) = X509Certificate::from_der(client_key.cert[0].as_ref()).unwrap();
    ca_cli::revoke(&p.dir, Signer::Intermediate, &[ca::hex(leaf.raw_serial())]).unwrap();
    let mut snap = trust_for(&p.ca);
    let issuers: Vec<_> = p.ca.roots().iter().chain(p.ca.chain()).cloned().collect();
    snap.crls = nodeward::identity::trust::load_crl_file(&p.dir.join(ca::CA_CRL), &issuers).unwrap();
    trust.replace(snap);
    let o = handshake(server, client).await;
    assert_eq!(refusal_of_io(&o.server.err().unwrap()), Some(Refusal::RevokedLeaf));
}

fn manager(dir: &Path, lifetime: Duration, crl: Option<PathBuf>, deny: Option<PathBuf>) -> Arc<CertManager> {
    CertManager::start(IdentityConfig {
        trust_domain: TD.into(),
        ca: CaSource::Dir(dir.to_path_buf()),
        cert_lifetime: lifetime,
        crl_files: crl.into_iter().collect(),
        deny_file: deny,
        unknown_status: UnknownStatus::Accept,
    })
    .unwrap()
}

fn serial_of(k: &CertifiedKey) -> Vec<u8> {
    use x509_parser::prelude::{FromDer, X509Certificate};
    X509Certificate::from_der(k.cert[0].as_ref())
        .unwrap()
        .1
        .raw_serial()
        .to_vec()
}

#[tokio::test]
async fn rotation_keeps_established_connections_while_new_handshakes_get_the_new_certificate() {
    let p = pki();
    let m = manager(&p.dir, Duration::from_secs(4), None, None);
    let api = id("shop", "api");
    m.acquire(&api).unwrap();
    let first = serial_of(&m.current(&api).unwrap());
    let server = tls::server_config(m.clone() as Arc<dyn CertSource>, api.clone(), m.trust());
    let client = client_cfg(key_for(&p.ca, &id("shop", "web")), m.trust(), api.clone());

    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let acceptor = TlsAcceptor::from(server.clone());
    tokio::spawn(async move {
        loop {
            let (tcp, _) = listener.accept().await.unwrap();
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                let Ok(mut tls) = acceptor.accept(tcp).await else {
                    return;
                };
                let mut b = [0u8; 4];
                while tls.read_exact(&mut b).await.is_ok() {
                    if tls.write_all(&b).await.is_err() {
                        break;
                    }
                }
            });
        }
    });
    let connect = || async {
        let tcp = TcpStream::connect(addr).await.unwrap();
        TlsConnector::from(client.clone())
            .connect(ServerName::IpAddress(addr.ip().into()), tcp)
            .await
            .unwrap()
    };
    let mut long = connect().await;
    long.write_all(b"ping").await.unwrap();
    let mut b = [0u8; 4];
    long.read_exact(&mut b).await.unwrap();

    // Past the renewal point and past the first certificate's expiry.
    tokio::time::sleep(Duration::from_millis(2300)).await;
    m.tick();
    let second = serial_of(&m.current(&api).unwrap());
    assert_ne!(first, second, "renewed around half of the lifetime");
    tokio::time::sleep(Duration::from_millis(2200)).await;

    long.write_all(b"pong").await.unwrap();
    long.read_exact(&mut b).await.unwrap();
    assert_eq!(&b, b"pong", "the long-running connection survived rotation and expiry");
    let fresh = connect().await;
    let presented = fresh.get_ref().1.peer_certificates().unwrap()[0].clone();
    use x509_parser::prelude::{FromDer, X509Certificate};
    let (_, c) = X509Certificate::from_der(presented.as_ref()).unwrap();
    assert_ne!(
        c.raw_serial(),
        first.as_slice(),
        "new handshakes see a renewed certificate"
    );
}

#[tokio::test]
async fn certificates_are_shared_per_identity_and_dropped_with_the_last_pod() {
    let p = pki();
    let m = manager(&p.dir, Duration::from_secs(3600), None, None);
    let web = id("shop", "web");
    m.acquire(&web).unwrap();
    let k1 = m.current(&web).unwrap();
    m.acquire(&web).unwrap();
    assert!(
        Arc::ptr_eq(&k1, &m.current(&web).unwrap()),
        "a second pod shares the certificate"
    );
    m.release(&web);
    assert!(m.current(&web).is_some());
    m.release(&web);
    assert!(m.current(&web).is_none(), "dropped with the last pod");
    let info_lifetime = {
        m.acquire(&web).unwrap();
        let i = &m.certificates()[0];
        i.not_after.duration_since(SystemTime::now()).unwrap()
    };
    assert!(info_lifetime > Duration::from_secs(3500) && info_lifetime <= Duration::from_secs(3600));
}

#[tokio::test]
async fn garbage_ca_files_at_runtime_keep_the_old_ca_and_are_reported() {
    let p = pki();
    let m = manager(&p.dir, Duration::from_secs(3600), None, None);
    let web = id("shop", "web");
    m.acquire(&web).unwrap();
    assert!(m.problems().is_empty());
    std::fs::write(
        p.dir.join(ca::CA_CERT),
        "-----BEGIN CERTIFICATE-----\ngarbage\n-----END CERTIFICATE-----\n",
    )
    .unwrap();
    m.tick();
    let problems = m.problems();
    assert_eq!(problems.len(), 1, "{problems:?}");
    assert!(problems[0].contains("ca-cert.pem"), "{problems:?}");
    m.tick();
    assert_eq!(m.problems(), problems, "reported once, unchanged");
    // The old CA still signs: a new identity gets a certificate that verifies.
    let api = id("shop", "api");
    m.acquire(&api).unwrap();
    let o = handshake(
        tls::server_config(m.clone() as Arc<dyn CertSource>, api.clone(), m.trust()),
        client_cfg(key_for(&p.ca, &web), m.trust(), api),
    )
    .await;
    o.server.unwrap();
}

#[tokio::test]
async fn revocation_and_deny_list_cut_established_connections_within_seconds() {
    let p = pki();
    let client_key = key_for(&p.ca, &id("shop", "web"));
    // An empty CRL to start with, and an empty deny list.
    ca_cli::revoke(&p.dir, Signer::Intermediate, &[]).unwrap();
    let crl = p.dir.join(ca::CA_CRL);
    let deny = p.dir.join("deny.txt");
    std::fs::write(&deny, "# nobody\n").unwrap();
    let m = manager(&p.dir, Duration::from_secs(3600), Some(crl.clone()), Some(deny.clone()));
    let stop = CancellationToken::new();
    tokio::spawn(m.clone().run(Duration::from_millis(200), stop.clone()));
    let registry = OpenConns::new();
    tokio::spawn(registry.clone().run(m.trust(), stop.clone()));

    let api = id("shop", "api");
    m.acquire(&api).unwrap();
    let server = tls::server_config(m.clone() as Arc<dyn CertSource>, api.clone(), m.trust());

    // Establish one connection per trigger, registered as the tunnel will do.
    let mut cut = Vec::new();
    let keys = [client_key.clone(), key_for(&p.ca, &id("shop", "web"))];
    for key in &keys {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let acceptor = TlsAcceptor::from(server.clone());
        let (reg, trust) = (registry.clone(), m.trust());
        let accepted = tokio::spawn(async move {
            let (tcp, _) = listener.accept().await.unwrap();
            let tls = acceptor.accept(tcp).await.unwrap();
            let chain: Vec<CertificateDer<'static>> = tls.get_ref().1.peer_certificates().unwrap().to_vec();
            let peer = tls::peer_identity(Some(&chain)).unwrap();
            let token = CancellationToken::new();
            let registration = reg.register(peer, &chain, Role::Client, token.clone(), &trust).unwrap();
            (tls, token, registration)
        });
        let tcp = TcpStream::connect(addr).await.unwrap();
        let c = TlsConnector::from(client_cfg(key.clone(), m.trust(), api.clone()))
            .connect(ServerName::IpAddress(addr.ip().into()), tcp)
            .await
            .unwrap();
        cut.push((c, accepted.await.unwrap()));
    }
    assert_eq!(registry.len(), 2);

    // A CRL signed by a CA we do not trust is rejected; nothing is cut.
    let other = tmp("other-crl");
    ca_cli::init(&other).unwrap();
    ca_cli::revoke(&other, Signer::Intermediate, &[ca::hex(&serial_of(&client_key))]).unwrap();
    let good_crl = std::fs::read(&crl).unwrap();
    std::fs::copy(other.join(ca::CA_CRL), &crl).unwrap();
    tokio::time::sleep(Duration::from_millis(800)).await;
    assert!(
        m.problems().iter().any(|p| p.contains("not signed by a trusted CA")),
        "{:?}",
        m.problems()
    );
    assert!(!cut[0].1.1.is_cancelled());
    std::fs::write(&crl, good_crl).unwrap();

    // Revoking the client's certificate closes the first connection.
    let revoked_at = std::time::Instant::now();
    ca_cli::revoke(&p.dir, Signer::Intermediate, &[ca::hex(&serial_of(&client_key))]).unwrap();
    tokio::time::timeout(Duration::from_secs(5), cut[0].1.1.cancelled())
        .await
        .expect("cut within 5 s of the CRL changing");
    assert!(revoked_at.elapsed() < Duration::from_secs(5));
    assert!(
        !cut[1].1.1.is_cancelled(),
        "a connection with another, unrevoked certificate stays"
    );

    // The deny list cuts an identity whatever certificate it holds.
    std::fs::write(&deny, "spiffe://cluster.local/ns/shop/sa/web\n").unwrap();
    tokio::time::timeout(Duration::from_secs(5), cut[1].1.1.cancelled())
        .await
        .expect("cut within 5 s of the deny list changing");
    stop.cancel();
    let _ = (std::fs::remove_dir_all(&p.dir), std::fs::remove_dir_all(&p.nested_dir));
}

#[tokio::test]
async fn a_bundle_with_two_roots_accepts_both_during_root_rotation() {
    let (old, new) = (pki(), pki());
    let mut roots = old.ca.roots().to_vec();
    roots.extend(new.ca.roots().iter().cloned());
    let bundle = TrustStore::new(TrustSnapshot::new(TD, roots, old.ca.chain()));
    let server_key = key_for(&old.ca, &id("shop", "api"));
    for (name, ca) in [("old root", &old.ca), ("new root", &new.ca)] {
        let o = handshake(
            server_cfg(server_key.clone(), bundle.clone()),
            client_cfg(key_for(ca, &id("shop", "web")), bundle.clone(), id("shop", "api")),
        )
        .await;
        assert!(o.server.is_ok(), "{name}: {:?}", o.server.err());
    }
    // Without the new root in the bundle, its workloads are refused.
    let only_old = TrustStore::new(trust_for(&old.ca));
    let o = handshake(
        server_cfg(server_key, only_old.clone()),
        client_cfg(key_for(&new.ca, &id("shop", "web")), only_old, id("shop", "api")),
    )
    .await;
    assert_eq!(refusal_of_io(&o.server.unwrap_err()), Some(Refusal::UnknownRoot));
}

// === CRLs: every one counts, stale ones, rollbacks ===

fn issuers_of(a: &Authority) -> Vec<CertificateDer<'static>> {
    a.roots().iter().chain(a.chain()).cloned().collect()
}

/// Revokes `keys` in a CRL of its own (a fresh `ca-crl.pem`), returns its PEM.
fn crl_revoking(p: &Pki, keys: &[&CertifiedKey]) -> Vec<u8> {
    let _ = std::fs::remove_file(p.dir.join(ca::CA_CRL));
    let serials: Vec<String> = keys.iter().map(|k| ca::hex(&serial_of(k))).collect();
    ca_cli::revoke(&p.dir, Signer::Intermediate, &serials).unwrap();
    std::fs::read(p.dir.join(ca::CA_CRL)).unwrap()
}

/// A CRL of the intermediate whose `nextUpdate` passed yesterday.
fn stale_crl(p: &Pki) -> Vec<u8> {
    use rcgen::{CertificateRevocationListParams, Issuer, KeyIdMethod, KeyPair, SerialNumber};
    let cert = std::fs::read_to_string(p.dir.join(ca::CA_CERT)).unwrap();
    let key = KeyPair::from_pem(&std::fs::read_to_string(p.dir.join(ca::CA_KEY)).unwrap()).unwrap();
    let issuer = Issuer::from_ca_cert_pem(&cert, key).unwrap();
    let now = time::OffsetDateTime::now_utc();
    CertificateRevocationListParams {
        this_update: now - time::Duration::days(2),
        next_update: now - time::Duration::days(1),
        crl_number: SerialNumber::from(9u64),
        issuing_distribution_point: None,
        revoked_certs: Vec::new(),
        key_identifier_method: KeyIdMethod::Sha256,
    }
    .signed_by(&issuer)
    .unwrap()
    .pem()
    .unwrap()
    .into_bytes()
}

/// The server's refusal of `client`, or `None` when it was accepted.
async fn refusal_for(p: &Pki, server_trust: Arc<TrustStore>, client: Arc<CertifiedKey>) -> Option<Refusal> {
    let server_key = key_for(&p.ca, &id("shop", "api"));
    let client_trust = TrustStore::new(trust_for(&p.ca));
    let o = handshake(
        server_cfg(server_key, server_trust),
        client_cfg(client, client_trust, id("shop", "api")),
    )
    .await;
    o.server
        .err()
        .map(|e| refusal_of_io(&e).expect("refused by the verifier"))
}

#[tokio::test]
async fn two_crls_of_one_issuer_both_count_in_the_handshake() {
    let p = pki();
    let (first, second) = (key_for(&p.ca, &id("shop", "web")), key_for(&p.ca, &id("shop", "web")));
    let crl_a = crl_revoking(&p, &[&first]);
    let crl_b = crl_revoking(&p, &[&second]);
    let dir = tmp("two-crls");
    std::fs::create_dir_all(&dir).unwrap();
    let (file_a, file_b, both) = (dir.join("a.pem"), dir.join("b.pem"), dir.join("both.pem"));
    std::fs::write(&file_a, &crl_a).unwrap();
    std::fs::write(&file_b, &crl_b).unwrap();
    std::fs::write(&both, [crl_a, crl_b].concat()).unwrap();
    let issuers = issuers_of(&p.ca);
    // Two files, and two PEM blocks of one file: the serial revoked by the
    // second CRL of the issuer is refused as well as the first's.
    for files in [vec![&file_a, &file_b], vec![&both]] {
        let mut snap = trust_for(&p.ca);
        for f in &files {
            snap.crls
                .extend(nodeward::identity::trust::load_crl_file(f, &issuers).unwrap());
        }
        let trust = TrustStore::new(snap);
        for (name, key) in [("first", &first), ("second", &second)] {
            assert_eq!(
                refusal_for(&p, trust.clone(), key.clone()).await,
                Some(Refusal::RevokedLeaf),
                "{name} CRL's serial, from {files:?}"
            );
        }
        let other = key_for(&p.ca, &id("shop", "web"));
        assert_eq!(
            refusal_for(&p, trust.clone(), other).await,
            None,
            "an unrevoked certificate"
        );
    }
    let _ = (std::fs::remove_dir_all(&p.dir), std::fs::remove_dir_all(&p.nested_dir));
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test]
async fn a_crl_past_its_next_update_refuses_what_it_speaks_for_when_unknown_status_is_refused() {
    use nodeward::identity::trust::{TrustSources, unix_now};
    let p = pki();
    // The root's CRL (for the intermediate) is fresh throughout.
    let (root_crl, _) = ca_cli::revoke(&ca_cli::default_root_dir(&p.dir), Signer::Root, &[]).unwrap();
    let ca_crl = p.dir.join(ca::CA_CRL);
    ca_cli::revoke(&p.dir, Signer::Intermediate, &[]).unwrap();
    let issuers = issuers_of(&p.ca);
    let client = || key_for(&p.ca, &id("shop", "web"));
    let sources = |status| {
        let mut s = TrustSources::new(&[root_crl.clone(), ca_crl.clone()], None).with_unknown_status(status);
        s.refresh(&issuers, true);
        s
    };
    let snapshot = |s: &TrustSources, status| {
        let mut base = trust_for(&p.ca);
        base.unknown_status = status;
        TrustStore::new(s.apply(base, &issuers))
    };

    let fresh = sources(UnknownStatus::Refuse);
    let trust = snapshot(&fresh, UnknownStatus::Refuse);
    assert_eq!(
        refusal_for(&p, trust, client()).await,
        None,
        "fresh CRLs vouch for the chain"
    );

    std::fs::write(&ca_crl, stale_crl(&p)).unwrap();
    let mut stale = sources(UnknownStatus::Refuse);
    assert!(stale.check_stale(unix_now()), "the stale CRL is reported");
    assert!(!stale.check_stale(unix_now()), "once per file change");
    let problems = stale.problems();
    assert!(
        problems
            .iter()
            .any(|p| p.contains(ca::CA_CRL) && p.contains("nextUpdate")),
        "readiness names the file: {problems:?}"
    );
    let trust = snapshot(&stale, UnknownStatus::Refuse);
    assert_eq!(
        refusal_for(&p, trust, client()).await,
        Some(Refusal::RevocationUnknown),
        "a stale CRL no longer vouches for its issuer's certificates"
    );

    // Accepting unknown status, the stale CRL is reported but refuses nothing.
    let mut lenient = sources(UnknownStatus::Accept);
    assert!(lenient.check_stale(unix_now()));
    assert!(lenient.problems().is_empty(), "{:?}", lenient.problems());
    let trust = snapshot(&lenient, UnknownStatus::Accept);
    assert_eq!(refusal_for(&p, trust, client()).await, None);
    let _ = (std::fs::remove_dir_all(&p.dir), std::fs::remove_dir_all(&p.nested_dir));
}

#[tokio::test]
async fn a_lower_numbered_crl_does_not_replace_a_higher_one() {
    use nodeward::identity::trust::TrustSources;
    let p = pki();
    let (first, second) = (key_for(&p.ca, &id("shop", "web")), key_for(&p.ca, &id("shop", "web")));
    // CRL 1 revokes the first certificate; CRL 2 both.
    let _ = std::fs::remove_file(p.dir.join(ca::CA_CRL));
    ca_cli::revoke(&p.dir, Signer::Intermediate, &[ca::hex(&serial_of(&first))]).unwrap();
    let older = std::fs::read(p.dir.join(ca::CA_CRL)).unwrap();
    ca_cli::revoke(&p.dir, Signer::Intermediate, &[ca::hex(&serial_of(&second))]).unwrap();
    let newer = std::fs::read(p.dir.join(ca::CA_CRL)).unwrap();

    let file = p.dir.join("served-crl.pem");
    std::fs::write(&file, &newer).unwrap();
    let issuers = issuers_of(&p.ca);
    let mut sources = TrustSources::new(std::slice::from_ref(&file), None);
    assert!(sources.refresh(&issuers, false));
    assert!(sources.problems().is_empty(), "{:?}", sources.problems());

    // A stale replica serves the older CRL.
    std::fs::write(&file, &older).unwrap();
    sources.refresh(&issuers, false);
    let problems = sources.problems();
    assert!(
        problems
            .iter()
            .any(|p| p.contains("served-crl.pem") && p.contains("rollback") && p.contains("older")),
        "the rollback is reported naming the file: {problems:?}"
    );
    let trust = TrustStore::new(sources.apply(trust_for(&p.ca), &issuers));
    assert_eq!(
        refusal_for(&p, trust, second.clone()).await,
        Some(Refusal::RevokedLeaf),
        "the newer CRL stays in force"
    );

    // A newer CRL still replaces it.
    ca_cli::revoke(&p.dir, Signer::Intermediate, &[]).unwrap();
    std::fs::write(&file, std::fs::read(p.dir.join(ca::CA_CRL)).unwrap()).unwrap();
    sources.refresh(&issuers, false);
    assert!(sources.problems().is_empty(), "{:?}", sources.problems());
    let _ = (std::fs::remove_dir_all(&p.dir), std::fs::remove_dir_all(&p.nested_dir));
}

#[tokio::test]
async fn a_trust_change_during_the_handshake_is_caught_when_the_peer_is_registered() {
    let p = pki();
    let client_key = key_for(&p.ca, &id("shop", "web"));
    let trust = TrustStore::new(trust_for(&p.ca));
    let registry = OpenConns::new();
    let o = handshake(
        server_cfg(key_for(&p.ca, &id("shop", "api")), trust.clone()),
        client_cfg(client_key.clone(), trust.clone(), id("shop", "api")),
    )
    .await;
    assert!(o.server.is_ok());
    // The deny list changes after the handshake verified the client but
    // before its connection is filed, so no sweep will see it.
    let mut denied = trust_for(&p.ca);
    denied.deny.entries.push(DenyEntry::Exact(id("shop", "web")));
    trust.replace(denied);
    let r = registry.register(
        id("shop", "web"),
        &client_key.cert,
        Role::Client,
        CancellationToken::new(),
        &trust,
    );
    assert_eq!(r.err().map(|e| e.refusal), Some(Refusal::DeniedIdentity));
    assert!(registry.is_empty(), "a refused registration is not kept");
    let _ = (std::fs::remove_dir_all(&p.dir), std::fs::remove_dir_all(&p.nested_dir));
}

#[tokio::test]
async fn a_registered_connection_is_cancelled_when_its_peer_certificate_expires() {
    let p = pki();
    let trust = TrustStore::new(trust_for(&p.ca));
    let registry = OpenConns::new();
    let stop = CancellationToken::new();
    tokio::spawn(registry.clone().run(trust.clone(), stop.clone()));
    // A long-lived peer first, then one whose certificate ends in 2 s.
    let long = key_for(&p.ca, &id("shop", "web"));
    let issued = p.ca.issue(&id("shop", "web"), Duration::from_secs(2)).unwrap();
    let (long_token, short_token) = (CancellationToken::new(), CancellationToken::new());
    let _long = registry
        .register(id("shop", "web"), &long.cert, Role::Client, long_token.clone(), &trust)
        .unwrap();
    let short = registry
        .register(
            id("shop", "web"),
            &issued.chain,
            Role::Client,
            short_token.clone(),
            &trust,
        )
        .unwrap();
    assert!(short.not_after() <= SystemTime::now() + Duration::from_secs(2));
    tokio::time::timeout(Duration::from_secs(5), short_token.cancelled())
        .await
        .expect("cancelled when the certificate expires");
    assert!(SystemTime::now() >= short.not_after(), "not before its notAfter");
    assert!(!long_token.is_cancelled());
    stop.cancel();
    let _ = (std::fs::remove_dir_all(&p.dir), std::fs::remove_dir_all(&p.nested_dir));
}

#[tokio::test]
async fn removing_a_root_cuts_the_connections_that_chain_to_it() {
    let (old, new) = (pki(), pki());
    let mut roots = old.ca.roots().to_vec();
    roots.extend(new.ca.roots().iter().cloned());
    let trust = TrustStore::new(TrustSnapshot::new(TD, roots, old.ca.chain()));
    let registry = OpenConns::new();
    let stop = CancellationToken::new();
    tokio::spawn(registry.clone().run(trust.clone(), stop.clone()));
    let (from_old, from_new) = (CancellationToken::new(), CancellationToken::new());
    let old_server = key_for(&old.ca, &id("shop", "api"));
    let new_server = key_for(&new.ca, &id("shop", "api"));
    let _a = registry
        .register(
            id("shop", "api"),
            &old_server.cert,
            Role::Server,
            from_old.clone(),
            &trust,
        )
        .unwrap();
    let _b = registry
        .register(
            id("shop", "api"),
            &new_server.cert,
            Role::Server,
            from_new.clone(),
            &trust,
        )
        .unwrap();
    // Root rotation completes: the old root leaves the bundle.
    trust.replace(trust_for(&new.ca));
    tokio::time::timeout(Duration::from_secs(5), from_old.cancelled())
        .await
        .expect("the connection under the removed root is cut");
    assert!(!from_new.is_cancelled(), "the one under the remaining root stays");
    stop.cancel();
    for p in [old, new] {
        let _ = (std::fs::remove_dir_all(&p.dir), std::fs::remove_dir_all(&p.nested_dir));
    }
}
