//! TLS 1.3 record throughput of a rustls crypto provider and cipher suite,
//! in memory on one core: the part of the byte path that is crypto, as the
//! agent runs it (rustls seals each record the peer opens), measured for
//! both providers and the three TLS 1.3 suites. `nodeward-bench --only
//! crypto` prints the table that chose the agent's provider and order.

use std::io::{Read, Write};
use std::sync::Arc;
use std::time::Instant;

use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName};
use rustls::{ClientConfig, ClientConnection, RootCertStore, ServerConfig, ServerConnection, SupportedCipherSuite};

/// A provider under test.
#[derive(Clone, Copy, Debug)]
pub enum Provider {
    /// `ring`, what the agent used before the measurement.
    Ring,
    /// `aws-lc-rs`, what ztunnel's release builds use.
    AwsLcRs,
}

impl Provider {
    /// Its name in the table.
    pub fn name(self) -> &'static str {
        match self {
            Provider::Ring => "ring",
            Provider::AwsLcRs => "aws-lc-rs",
        }
    }

    fn provider(self) -> CryptoProvider {
        match self {
            Provider::Ring => rustls::crypto::ring::default_provider(),
            Provider::AwsLcRs => rustls::crypto::aws_lc_rs::default_provider(),
        }
    }
}

/// The TLS 1.3 suites, by name.
pub const SUITES: &[&str] = &[
    "TLS13_AES_128_GCM_SHA256",
    "TLS13_AES_256_GCM_SHA384",
    "TLS13_CHACHA20_POLY1305_SHA256",
];

fn only_suite(p: Provider, suite: &str) -> Arc<CryptoProvider> {
    let mut provider = p.provider();
    provider
        .cipher_suites
        .retain(|s: &SupportedCipherSuite| format!("{:?}", s.suite()) == suite);
    assert_eq!(provider.cipher_suites.len(), 1, "{} has no {suite}", p.name());
    Arc::new(provider)
}

/// GB/s of application data carried client → server through sealing and
/// opening 16 KiB records, over `total` bytes (one core, both ends).
pub fn throughput_gbps(p: Provider, suite: &str, total: usize) -> f64 {
    let cert = rcgen::generate_simple_self_signed(vec!["bench.test".to_string()]).expect("certificate");
    let der = CertificateDer::from(cert.cert.der().to_vec());
    let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(cert.signing_key.serialize_der()));
    let provider = only_suite(p, suite);
    let server = ServerConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .expect("TLS 1.3")
        .with_no_client_auth()
        .with_single_cert(vec![der.clone()], key)
        .expect("server config");
    let mut roots = RootCertStore::empty();
    roots.add(der).expect("root");
    let client = ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .expect("TLS 1.3")
        .with_root_certificates(roots)
        .with_no_client_auth();
    let mut c = ClientConnection::new(Arc::new(client), ServerName::try_from("bench.test").unwrap()).unwrap();
    let mut s = ServerConnection::new(Arc::new(server)).unwrap();
    let mut wire = Vec::with_capacity(1 << 20);
    let shuttle = |from: &mut dyn rustls_io::Side, to: &mut dyn rustls_io::Side, wire: &mut Vec<u8>| {
        wire.clear();
        while from.wants_write() {
            from.write_tls(wire).unwrap();
        }
        let mut rd = &wire[..];
        while !rd.is_empty() {
            to.read_tls(&mut rd).unwrap();
            to.process().expect("TLS record");
        }
    };
    while c.is_handshaking() || s.is_handshaking() {
        shuttle(&mut c, &mut s, &mut wire);
        shuttle(&mut s, &mut c, &mut wire);
    }
    c.set_buffer_limit(None);
    let chunk = vec![0x5au8; 64 << 10];
    let mut out = vec![0u8; 64 << 10];
    let start = Instant::now();
    let mut sent = 0;
    let mut received = 0;
    while sent < total {
        c.writer().write_all(&chunk).unwrap();
        sent += chunk.len();
        wire.clear();
        while c.wants_write() {
            c.write_tls(&mut wire).unwrap();
        }
        let mut rd = &wire[..];
        while !rd.is_empty() {
            s.read_tls(&mut rd).unwrap();
            s.process_new_packets().expect("TLS record");
            loop {
                match s.reader().read(&mut out) {
                    Ok(0) => break,
                    Ok(n) => received += n,
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                    Err(e) => panic!("reading: {e}"),
                }
            }
        }
    }
    assert_eq!(received, sent, "bytes lost");
    sent as f64 / start.elapsed().as_secs_f64() / 1e9
}

/// One side of a connection, as the shuttle drives it.
mod rustls_io {
    /// What the shuttle needs of a client or server connection.
    pub trait Side {
        fn wants_write(&self) -> bool;
        fn write_tls(&mut self, wr: &mut dyn std::io::Write) -> std::io::Result<usize>;
        fn read_tls(&mut self, rd: &mut dyn std::io::Read) -> std::io::Result<usize>;
        fn process(&mut self) -> Result<(), rustls::Error>;
    }

    macro_rules! side {
        ($t:ty) => {
            impl Side for $t {
                fn wants_write(&self) -> bool {
                    std::ops::Deref::deref(self).wants_write()
                }
                fn write_tls(&mut self, wr: &mut dyn std::io::Write) -> std::io::Result<usize> {
                    std::ops::DerefMut::deref_mut(self).write_tls(wr)
                }
                fn read_tls(&mut self, rd: &mut dyn std::io::Read) -> std::io::Result<usize> {
                    std::ops::DerefMut::deref_mut(self).read_tls(rd)
                }
                fn process(&mut self) -> Result<(), rustls::Error> {
                    std::ops::DerefMut::deref_mut(self)
                        .process_new_packets()
                        .map(|_| ())
                }
            }
        };
    }
    side!(rustls::ClientConnection);
    side!(rustls::ServerConnection);
}
