//! The agent's client of a CA service speaking Istio's CA protocol
//! (`nodeward ca serve`, istiod, istio-csr): each workload key is made in
//! memory here and only its CSR leaves the node. The ServiceAccount token
//! is re-read for every request (projected tokens rotate); the answer is
//! verified against `--ca-root` and must certify our key for the identity
//! asked for before it is used.

#![forbid(unsafe_code)]

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use rcgen::{CertificateParams, KeyPair, SanType};
use rustls::ClientConfig;
use rustls::pki_types::{CertificateDer, PrivatePkcs8KeyDer, ServerName};
use x509_parser::prelude::{FromDer, X509Certificate};

use super::Identity;
use super::authority::IssuedCert;
use super::ca::{CaError, read_certs};
use super::ca_proto::{
    CREATE_CERTIFICATE_PATH, IstioCertificateRequest, IstioCertificateResponse, frame, impersonating, read_body,
    unframe,
};
use super::issuer::{IssueError, Issuer};

/// Deadline of one certificate request, connection included.
const CALL_TIMEOUT: Duration = Duration::from_secs(10);
/// Deadline for TCP and TLS to one address of the service, before the
/// next is tried.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);

/// Where and how to reach the CA service.
#[derive(Clone, Debug)]
pub struct CaClientConfig {
    /// `https://HOST:PORT`, or several separated by commas (replicas
    /// without a Service in front; a name resolving to several addresses
    /// works too): each is tried in turn until one answers.
    pub address: String,
    /// Roots the service's TLS certificate and our chains must reach.
    pub root_file: PathBuf,
    /// The ServiceAccount token, re-read for every request.
    pub token_file: PathBuf,
    /// Sent as `ClusterID` metadata.
    pub cluster_id: String,
    /// Our trust domain: answers for another are rejected.
    pub trust_domain: String,
    /// Mark of the agent's own sockets, so capture never takes them.
    pub socket_mark: u32,
}

/// The (host, port) of each of `https://HOST:PORT,...`.
pub(crate) fn parse_addresses(addresses: &str) -> Result<Vec<(String, u16)>, String> {
    let targets: Vec<(String, u16)> = addresses
        .split(',')
        .map(str::trim)
        .filter(|a| !a.is_empty())
        .map(parse_address)
        .collect::<Result<_, _>>()?;
    if targets.is_empty() {
        return Err("no address".into());
    }
    Ok(targets)
}

/// The host and port of `https://HOST:PORT` (the port defaults to 15012).
pub(crate) fn parse_address(address: &str) -> Result<(String, u16), String> {
    let rest = address
        .strip_prefix("https://")
        .ok_or_else(|| format!("{address:?} must start with https://"))?;
    let rest = rest.trim_end_matches('/');
    if rest.is_empty() || rest.contains('/') {
        return Err(format!("{address:?} must be https://HOST:PORT"));
    }
    let (host, port) = if let Some(v6) = rest.strip_prefix('[') {
        let (h, after) = v6.split_once(']').ok_or_else(|| format!("{address:?}: unclosed ["))?;
        (
            h,
            after
                .strip_prefix(':')
                .unwrap_or(if after.is_empty() { "15012" } else { after }),
        )
    } else {
        match rest.split_once(':') {
            Some((h, p)) => (h, p),
            None => (rest, "15012"),
        }
    };
    let port: u16 = port
        .parse()
        .map_err(|_| format!("{address:?}: {port:?} is not a port"))?;
    if host.is_empty() {
        return Err(format!("{address:?} has no host"));
    }
    Ok((host.to_string(), port))
}

/// A client of one CA service.
pub struct CaClient {
    config: CaClientConfig,
    /// Each (host, port) of `--ca-address`.
    targets: Vec<(String, u16)>,
    /// The target that answered last: tried first next time.
    preferred: std::sync::atomic::AtomicUsize,
    roots: Vec<CertificateDer<'static>>,
    tls: Arc<ClientConfig>,
    chain: Mutex<Vec<CertificateDer<'static>>>,
    runtime: tokio::runtime::Handle,
}

impl std::fmt::Debug for CaClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CaClient")
            .field("address", &self.config.address)
            .finish_non_exhaustive()
    }
}

impl CaClient {
    /// Reads the roots and prepares TLS; `runtime` (multi-threaded: a
    /// current-thread runtime's IO is driven only by its own `block_on`)
    /// runs the calls, which the manager makes from a blocking thread.
    pub fn new(config: CaClientConfig, runtime: tokio::runtime::Handle) -> Result<CaClient, CaError> {
        let targets = parse_addresses(&config.address).map_err(|message| CaError::Invalid {
            file: config.root_file.clone(),
            message,
        })?;
        let roots = read_certs(&config.root_file)?;
        let mut store = rustls::RootCertStore::empty();
        for r in &roots {
            store.add(r.clone()).map_err(|e| CaError::Invalid {
                file: config.root_file.clone(),
                message: e.to_string(),
            })?;
        }
        let provider = super::tls::provider();
        let verifier = rustls::client::WebPkiServerVerifier::builder_with_provider(Arc::new(store), provider.clone())
            .build()
            .map_err(|e| CaError::Invalid {
                file: config.root_file.clone(),
                message: e.to_string(),
            })?;
        let mut tls = ClientConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13])
            .expect("ring supports TLS 1.3")
            .with_webpki_verifier(verifier)
            .with_no_client_auth();
        tls.alpn_protocols = vec![b"h2".to_vec()];
        Ok(CaClient {
            config,
            targets,
            preferred: Default::default(),
            roots,
            tls: Arc::new(tls),
            chain: Mutex::new(Vec::new()),
            runtime,
        })
    }

    fn token(&self) -> Result<String, IssueError> {
        let t = std::fs::read_to_string(&self.config.token_file).map_err(|e| IssueError::Token {
            file: self.config.token_file.display().to_string(),
            message: e.to_string(),
        })?;
        let t = t.trim().to_string();
        if t.is_empty() {
            return Err(IssueError::Token {
                file: self.config.token_file.display().to_string(),
                message: "empty".into(),
            });
        }
        Ok(t)
    }

    /// A TLS connection to the first target (the one that answered last
    /// first, then the others in order, each of its resolved addresses in
    /// turn) that completes TCP and TLS within [`CONNECT_TIMEOUT`]: a
    /// replica that is down costs one timeout, not the request.
    async fn connect(&self) -> Result<(tokio_rustls::client::TlsStream<tokio::net::TcpStream>, usize), IssueError> {
        use std::sync::atomic::Ordering;
        let n = self.targets.len();
        let first = self.preferred.load(Ordering::Relaxed) % n;
        let mut failures = Vec::new();
        for i in (0..n).map(|k| (first + k) % n) {
            let (host, port) = &self.targets[i];
            let addrs: Vec<SocketAddr> = match tokio::net::lookup_host((host.as_str(), *port)).await {
                Ok(a) => a.collect(),
                Err(e) => {
                    failures.push(format!("{host}: {e}"));
                    continue;
                }
            };
            if addrs.is_empty() {
                failures.push(format!("{host} resolves to nothing"));
            }
            for addr in addrs {
                match tokio::time::timeout(CONNECT_TIMEOUT, self.connect_to(host, addr)).await {
                    Ok(Ok(tls)) => {
                        self.preferred.store(i, Ordering::Relaxed);
                        return Ok((tls, i));
                    }
                    Ok(Err(e)) => failures.push(format!("{addr}: {e}")),
                    Err(_) => failures.push(format!("{addr}: no TLS connection within {CONNECT_TIMEOUT:?}")),
                }
            }
        }
        Err(IssueError::Unavailable(failures.join("; ")))
    }

    async fn connect_to(
        &self,
        host: &str,
        addr: SocketAddr,
    ) -> std::io::Result<tokio_rustls::client::TlsStream<tokio::net::TcpStream>> {
        let sock = if addr.is_ipv4() {
            tokio::net::TcpSocket::new_v4()
        } else {
            tokio::net::TcpSocket::new_v6()
        }?;
        socket2::SockRef::from(&sock).set_mark(self.config.socket_mark)?;
        let tcp = sock.connect(addr).await?;
        let name = ServerName::try_from(host.to_string()).map_err(std::io::Error::other)?;
        tokio_rustls::TlsConnector::from(self.tls.clone())
            .connect(name, tcp)
            .await
    }

    async fn call(&self, req: IstioCertificateRequest, token: String) -> Result<IstioCertificateResponse, IssueError> {
        let unavailable = |e: &dyn std::fmt::Display| IssueError::Unavailable(e.to_string());
        let (tls, target) = self.connect().await?;
        let (host, port) = &self.targets[target];
        let (mut client, conn) = h2::client::handshake(tls).await.map_err(|e| unavailable(&e))?;
        let driver = tokio::spawn(conn);
        let result = async {
            let request = http::Request::builder()
                .method("POST")
                .uri(format!("https://{host}:{port}{CREATE_CERTIFICATE_PATH}"))
                .header("content-type", "application/grpc")
                .header("te", "trailers")
                .header("authorization", format!("Bearer {token}"))
                .header("clusterid", &self.config.cluster_id)
                .body(())
                .map_err(|e| unavailable(&e))?;
            let (response, mut send) = client.send_request(request, false).map_err(|e| unavailable(&e))?;
            send.send_data(frame(&req), true).map_err(|e| unavailable(&e))?;
            let response = response.await.map_err(|e| unavailable(&e))?;
            let (head, mut body) = response.into_parts();
            if head.status != http::StatusCode::OK {
                return Err(IssueError::Unavailable(format!("HTTP status {}", head.status)));
            }
            // A trailers-only answer carries the status in the headers.
            if let Some(e) = grpc_error(&head.headers) {
                return Err(e);
            }
            let data = read_body(&mut body).await.map_err(IssueError::Unavailable)?;
            let trailers = body.trailers().await.map_err(|e| unavailable(&e))?.unwrap_or_default();
            if let Some(e) = grpc_error(&trailers) {
                return Err(e);
            }
            if trailers.get("grpc-status").is_none() {
                return Err(IssueError::Unavailable("no grpc-status".into()));
            }
            unframe::<IstioCertificateResponse>(data).map_err(|e| IssueError::BadResponse(e.to_string()))
        }
        .await;
        driver.abort();
        result
    }

    async fn issue_async(&self, id: &Identity, lifetime: Duration) -> Result<IssuedCert, IssueError> {
        let token = self.token()?;
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).map_err(|e| CaError::Sign(e.to_string()))?;
        let mut params = CertificateParams::default();
        params.subject_alt_names = vec![SanType::URI(
            id.to_string()
                .try_into()
                .map_err(|e: rcgen::Error| CaError::Sign(e.to_string()))?,
        )];
        let csr = params
            .serialize_request(&key)
            .and_then(|c| c.pem())
            .map_err(|e| CaError::Sign(e.to_string()))?;
        let req = IstioCertificateRequest {
            csr,
            validity_duration: lifetime.as_secs().min(i64::MAX as u64) as i64,
            metadata: Some(impersonating(&id.to_string())),
        };
        let resp = tokio::time::timeout(CALL_TIMEOUT, self.call(req, token))
            .await
            .map_err(|_| IssueError::Unavailable(format!("no answer within {CALL_TIMEOUT:?}")))??;
        self.accept(id, key, resp)
    }

    /// Checks an answer ([`check_answer`]) and keeps its intermediates.
    fn accept(&self, id: &Identity, key: KeyPair, resp: IstioCertificateResponse) -> Result<IssuedCert, IssueError> {
        let answer = check_answer(&self.roots, &self.config.trust_domain, id, key.public_key_raw(), &resp)?;
        *self.chain.lock().unwrap_or_else(|e| e.into_inner()) = answer.chain[1..].to_vec();
        Ok(IssuedCert {
            chain: answer.chain,
            key: PrivatePkcs8KeyDer::from(key.serialize_der()),
            not_after: answer.not_after,
            serial: answer.serial,
        })
    }
}

/// A CA service's answer that passed [`check_answer`].
#[derive(Debug)]
pub(crate) struct CheckedAnswer {
    /// Leaf first, then intermediates (never a root).
    pub(crate) chain: Vec<CertificateDer<'static>>,
    /// The leaf's expiry.
    pub(crate) not_after: SystemTime,
    /// The leaf's serial.
    pub(crate) serial: Vec<u8>,
}

/// What an answer must be before it is used, decided without I/O: PEM
/// certificates, a leaf for `public_key` (the key whose CSR was sent) and
/// `id` that verifies against `roots` (ours, never the answer's).
pub(crate) fn check_answer(
    roots: &[CertificateDer<'static>],
    trust_domain: &str,
    id: &Identity,
    public_key: &[u8],
    resp: &IstioCertificateResponse,
) -> Result<CheckedAnswer, IssueError> {
    use rustls::pki_types::pem::PemObject;
    let bad = |m: String| IssueError::BadResponse(m);
    let mut certs: Vec<CertificateDer<'static>> = Vec::new();
    for pem in &resp.cert_chain {
        for c in CertificateDer::pem_slice_iter(pem.as_bytes()) {
            certs.push(c.map_err(|e| bad(format!("certificate chain: {e:?}")))?);
        }
    }
    // Leaf and intermediates; the roots are ours, never the answer's.
    certs.retain(|c| !roots.contains(c));
    let leaf = certs.first().ok_or_else(|| bad("empty certificate chain".into()))?;
    let (_, parsed) = X509Certificate::from_der(leaf.as_ref()).map_err(|e| bad(e.to_string()))?;
    if *parsed.tbs_certificate.subject_pki.subject_public_key.data != *public_key {
        return Err(bad("the leaf does not certify the key we sent".into()));
    }
    let mut trust = super::trust::TrustSnapshot::new(trust_domain, roots.to_vec(), &[]);
    trust.unknown_status = super::trust::UnknownStatus::Accept;
    let got = super::verify::verify_peer(
        &certs,
        &trust,
        super::verify::Role::Client,
        rustls::pki_types::UnixTime::now(),
        &super::tls::provider(),
    )
    .map_err(|e| bad(e.to_string()))?;
    if &got != id {
        return Err(bad(format!("certificate is for {got}, not {id}")));
    }
    let not_after = SystemTime::UNIX_EPOCH + Duration::from_secs(parsed.validity().not_after.timestamp().max(0) as u64);
    let serial = parsed.raw_serial().to_vec();
    Ok(CheckedAnswer {
        chain: certs,
        not_after,
        serial,
    })
}

fn grpc_error(headers: &http::HeaderMap) -> Option<IssueError> {
    let code: u32 = headers.get("grpc-status")?.to_str().ok()?.trim().parse().ok()?;
    if code == 0 {
        return None;
    }
    let message = headers
        .get("grpc-message")
        .and_then(|v| v.to_str().ok())
        .map(percent_decode)
        .unwrap_or_default();
    Some(IssueError::Refused { code, message })
}

/// grpc-message is percent-encoded.
fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%'
            && let Some(Ok(v)) = s.get(i + 1..i + 3).map(|h| u8::from_str_radix(h, 16))
        {
            out.push(v);
            i += 3;
            continue;
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

impl Issuer for CaClient {
    fn issue(&self, id: &Identity, lifetime: Duration) -> Result<IssuedCert, IssueError> {
        self.runtime.block_on(self.issue_async(id, lifetime))
    }

    fn roots(&self) -> Vec<CertificateDer<'static>> {
        self.roots.clone()
    }

    fn chain(&self) -> Vec<CertificateDer<'static>> {
        self.chain.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    fn describe(&self) -> String {
        format!("CA service {}", self.config.address)
    }

    fn is_local(&self) -> bool {
        false
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses() {
        assert_eq!(
            parse_address("https://ca.example:15012"),
            Ok(("ca.example".into(), 15012))
        );
        assert_eq!(parse_address("https://10.0.0.1"), Ok(("10.0.0.1".into(), 15012)));
        assert_eq!(parse_address("https://[fd00::1]:443"), Ok(("fd00::1".into(), 443)));
        for bad in ["http://x:1", "https://", "https://x:port", "https://x:1/path", "x:1"] {
            assert!(parse_address(bad).is_err(), "{bad}");
        }
    }

    /// A CA directory, and a client trusting its root alone.
    fn setup(tag: &str) -> (std::path::PathBuf, tokio::runtime::Runtime, CaClient) {
        let d = std::env::temp_dir().join(format!("nodeward-ca-client-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        super::super::ca_cli::init(&d).unwrap();
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .build()
            .unwrap();
        let config = CaClientConfig {
            address: "https://ca.test:15012".into(),
            root_file: d.join(super::super::ca::ROOT_CERT),
            token_file: d.join("token"),
            cluster_id: "Kubernetes".into(),
            trust_domain: "cluster.local".into(),
            socket_mark: 1,
        };
        let client = CaClient::new(config, rt.handle().clone()).unwrap();
        (d, rt, client)
    }

    /// What a CA at `dir` answers for `who` over `key`.
    fn answer(dir: &std::path::Path, who: &Identity, key: &KeyPair) -> IstioCertificateResponse {
        let ca = super::super::authority::Authority::load(dir).unwrap();
        let csr = CertificateParams::default()
            .serialize_request(key)
            .unwrap()
            .pem()
            .unwrap();
        let (chain, _) = ca.issue_for_csr(who, Duration::from_secs(600), &csr).unwrap();
        IstioCertificateResponse {
            cert_chain: chain
                .iter()
                .map(|c| super::super::ca::pem_text("CERTIFICATE", c.as_ref()))
                .collect(),
        }
    }

    fn new_key() -> KeyPair {
        KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap()
    }

    #[test]
    fn an_answer_is_used_only_for_our_key_our_identity_and_our_roots() {
        let (d, _rt, client) = setup("accept");
        let web = Identity::new("cluster.local", "shop", "web");
        let key = new_key();
        let good = answer(&d, &web, &key);
        assert!(
            client.accept(&web, new_key(), good.clone()).is_err(),
            "another key accepted"
        );
        let cert = client.accept(&web, key, good).unwrap();
        assert_eq!(cert.chain.len(), 2, "leaf and intermediate, never the root");
        assert_eq!(client.chain().len(), 1, "the intermediate is learnt");

        let key = new_key();
        let db = Identity::new("cluster.local", "shop", "db");
        let e = client.accept(&web, key, answer(&d, &db, &new_key())).unwrap_err();
        assert!(matches!(e, IssueError::BadResponse(_)), "{e}");
        let key = new_key();
        let e = client
            .accept(
                &db,
                KeyPair::from_pem(&key.serialize_pem()).unwrap(),
                answer(&d, &web, &key),
            )
            .unwrap_err();
        assert!(
            e.to_string().contains("not spiffe://cluster.local/ns/shop/sa/db"),
            "{e}"
        );

        let other = d.with_extension("other");
        let _ = std::fs::remove_dir_all(&other);
        super::super::ca_cli::init(&other).unwrap();
        let key = new_key();
        let foreign = answer(&other, &web, &key);
        let e = client.accept(&web, key, foreign).unwrap_err();
        assert!(
            matches!(e, IssueError::BadResponse(_)),
            "a chain to another root was accepted"
        );
        let e = client
            .accept(
                &web,
                new_key(),
                IstioCertificateResponse {
                    cert_chain: vec!["junk".into()],
                },
            )
            .unwrap_err();
        assert!(matches!(e, IssueError::BadResponse(_)));
        let _ = (std::fs::remove_dir_all(&d), std::fs::remove_dir_all(&other));
    }

    #[test]
    fn grpc_messages_are_percent_decoded() {
        assert_eq!(percent_decode("not%20on%20node%"), "not on node%");
    }
}
