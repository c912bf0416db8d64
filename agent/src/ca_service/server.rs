//! The gRPC endpoint of `nodeward ca serve`: TLS 1.3 with ALPN h2, one
//! method (`CreateCertificate`). Each request is authenticated by its
//! bearer token, authorized against the CA's view of pods, then issued from
//! the CSR's key alone; every refusal is answered with a gRPC status and a
//! reason, logged and counted.

#![forbid(unsafe_code)]

use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use bytes::Bytes;
use rcgen::SanType;
use rustls::ServerConfig;
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use tokio_util::sync::CancellationToken;

use super::authz::{Rules, authorize};
use super::jwt::{Expected, K8sClaims, KeySet};
use super::ledger::{Caller, Decision, Entry, Ledger};
use super::limit::{Limiter, Rate};
use super::metrics::{CaMetrics, RequestLabels, TableLabels};
use super::{ServeArgs, ServeError};
use crate::identity::authority::Authority;
use crate::identity::ca_proto::{
    CREATE_CERTIFICATE_PATH, Code, IstioCertificateRequest, IstioCertificateResponse, frame, read_body, unframe,
};
use crate::identity::tls::{certified_key, provider};
use crate::source::dir::DirSource;
use crate::state::Store;

/// Lifetime of the service's own TLS certificate; re-issued at half of it.
const SERVER_CERT_LIFETIME: Duration = Duration::from_secs(24 * 3600);
/// Deadline for a client's TLS and HTTP/2 handshakes.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Deadline for a request's body.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// A connection without a new request this long is closed (clients open
/// one per request or renewal round), so idle ones cannot hold the slots.
const IDLE_TIMEOUT: Duration = Duration::from_secs(60);
/// Connections served at once; more wait in the backlog.
const MAX_CONNECTIONS: usize = 1024;

/// A loaded CA service.
pub(crate) struct CaService {
    authority: Authority,
    keys: Keys,
    expected: Expected,
    rules: Rules,
    store: Store,
    max_lifetime: Duration,
    server_names: Vec<String>,
    limiter: Limiter,
    ledger: Mutex<Ledger>,
    /// This instance's name in the issuance log (its host name).
    replica: String,
    metrics: CaMetrics,
    /// The Kubernetes source's health, when pods come from the API.
    health: Option<crate::source::kube::SourceHealth>,
}

/// Where the token issuer's keys come from.
enum Keys {
    /// `--jwks`, read at start.
    File(Arc<KeySet>),
    /// The API server's OIDC discovery.
    Discovered(Arc<super::oidc::Discovered>),
}

impl Keys {
    fn current(&self) -> Arc<KeySet> {
        match self {
            Keys::File(k) => k.clone(),
            Keys::Discovered(d) => d.current(),
        }
    }
}

/// Where the CA's view of pods comes from, once the flags are checked.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum PodSource {
    /// `--config-dir`.
    Dir(std::path::PathBuf),
    /// The Kubernetes API's Pods.
    Kube,
}

impl PodSource {
    /// `--source` with `--config-dir`: the default is `dir` when a
    /// directory is named, else `kube`; each source takes only its own flag.
    fn of(a: &ServeArgs, problems: &mut Vec<String>) -> Option<PodSource> {
        use crate::config::SourceKind;
        let kind = a.source.unwrap_or(if a.config_dir.is_some() {
            SourceKind::Dir
        } else {
            SourceKind::Kube
        });
        match (kind, &a.config_dir) {
            (SourceKind::Dir, Some(dir)) if dir.is_dir() => Some(PodSource::Dir(dir.clone())),
            (SourceKind::Dir, Some(dir)) => {
                problems.push(format!(
                    "--config-dir (NODEWARD_CONFIG_DIR) {}: not a directory",
                    dir.display()
                ));
                None
            }
            (SourceKind::Dir, None) => {
                problems.push("--source dir needs --config-dir (NODEWARD_CONFIG_DIR)".into());
                None
            }
            (SourceKind::Kube, Some(_)) => {
                problems.push(
                    "--config-dir (NODEWARD_CONFIG_DIR) contradicts --source kube, which reads the Kubernetes API"
                        .into(),
                );
                None
            }
            (SourceKind::Kube, None) => Some(PodSource::Kube),
        }
    }

    /// Whether the Kubernetes API is needed: for pods, or for the keys.
    pub(crate) fn needs_api(a: &ServeArgs) -> bool {
        a.jwks.is_none() || !matches!(PodSource::of(a, &mut Vec::new()), Some(PodSource::Dir(_)))
    }
}

/// A refusal: the gRPC status, its reason label, the message.
type Refusal = (Code, &'static str, String);

/// A certificate signed for a request.
struct Signed {
    resp: IstioCertificateResponse,
    /// Serial, hex.
    serial: String,
    /// notAfter, unix seconds.
    not_after: i64,
    /// SHA-256 of the leaf's DER.
    sha256: String,
}

/// What one request came to, for its answer, its counter and its log line.
struct Outcome {
    caller: Caller,
    requested: String,
    result: Result<Signed, Refusal>,
    /// Whether the answer gets a line of the issuance log: not before the
    /// caller is known (anyone could flood it), and for a rate limit only
    /// the first refusal of an episode.
    logged: bool,
}

impl std::fmt::Debug for CaService {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CaService")
            .field("rules", &self.rules)
            .finish_non_exhaustive()
    }
}

impl CaService {
    /// [`CaService::load_with`] with keys from `--jwks` only.
    #[cfg(test)]
    pub(crate) fn load(a: &ServeArgs) -> Result<CaService, ServeError> {
        Self::load_with(a, None)
    }

    /// Checks every flag and file, reporting all problems at once; the
    /// issuer's keys are `discovered` from the API server when no `--jwks`
    /// is given.
    pub(crate) fn load_with(
        a: &ServeArgs,
        discovered: Option<Arc<super::oidc::Discovered>>,
    ) -> Result<CaService, ServeError> {
        let mut problems = Vec::new();
        let authority = Authority::load(&a.ca_dir)
            .map_err(|e| problems.push(format!("--ca-dir (NODEWARD_CA_DIR): {e}")))
            .ok();
        let keys = match (&a.jwks, discovered) {
            (Some(file), _) => KeySet::load(file)
                .map(|k| Keys::File(Arc::new(k)))
                .map_err(|e| problems.push(format!("--jwks (NODEWARD_CA_JWKS): {e}")))
                .ok(),
            (None, Some(d)) => Some(Keys::Discovered(d)),
            (None, None) => {
                problems.push("no --jwks (NODEWARD_CA_JWKS) and no keys discovered from the API server".into());
                None
            }
        };
        PodSource::of(a, &mut problems);
        let node_agent = match a.node_agent_sa.split_once('/') {
            Some((ns, sa)) if !ns.is_empty() && !sa.is_empty() && !sa.contains('/') => Some((ns.into(), sa.into())),
            _ => {
                problems.push(format!(
                    "--node-agent-sa (NODEWARD_CA_NODE_AGENT_SA) {:?}: must be namespace/name",
                    a.node_agent_sa
                ));
                None
            }
        };
        for (flag, env, v) in [
            ("issuer", "NODEWARD_CA_ISSUER", &a.issuer),
            ("audience", "NODEWARD_CA_AUDIENCE", &a.audience),
            ("trust-domain", "NODEWARD_TRUST_DOMAIN", &a.trust_domain),
        ] {
            if v.trim().is_empty() {
                problems.push(format!("--{flag} ({env}) is empty"));
            }
        }
        if a.max_cert_lifetime.is_zero() {
            problems.push(
                "--max-cert-lifetime (NODEWARD_CA_MAX_CERT_LIFETIME) = 0: certificates would expire as issued".into(),
            );
        }
        if a.server_name.iter().all(|n| n.trim().is_empty()) {
            problems.push("--server-name (NODEWARD_CA_SERVER_NAME) is empty".into());
        }
        for (flag, env, v) in [
            ("caller-rate", "NODEWARD_CA_CALLER_RATE", a.caller_rate),
            ("caller-burst", "NODEWARD_CA_CALLER_BURST", a.caller_burst),
            ("node-rate", "NODEWARD_CA_NODE_RATE", a.node_rate),
            ("node-burst", "NODEWARD_CA_NODE_BURST", a.node_burst),
        ] {
            if !(v.is_finite() && v > 0.0) {
                problems.push(format!("--{flag} ({env}) = {v}: must be a positive number"));
            }
        }
        for (flag, env, burst) in [
            ("caller-burst", "NODEWARD_CA_CALLER_BURST", a.caller_burst),
            ("node-burst", "NODEWARD_CA_NODE_BURST", a.node_burst),
        ] {
            if burst.is_finite() && burst > 0.0 && burst < 1.0 {
                problems.push(format!(
                    "--{flag} ({env}) = {burst}: below 1, nothing could ever be issued"
                ));
            }
        }
        let ledger = Ledger::open(&a.issuance_log)
            .map_err(|e| problems.push(e.to_string()))
            .ok();
        match (authority, keys, node_agent, ledger) {
            (Some(authority), Some(keys), Some(node_agent), Some(ledger)) if problems.is_empty() => Ok(CaService {
                authority,
                keys,
                expected: Expected {
                    issuer: a.issuer.clone(),
                    audience: a.audience.clone(),
                },
                rules: Rules {
                    trust_domain: a.trust_domain.clone(),
                    node_agent,
                },
                store: Store::new(),
                max_lifetime: a.max_cert_lifetime,
                server_names: a.server_name.clone(),
                limiter: Limiter::new(
                    Rate {
                        per_second: a.caller_rate,
                        burst: a.caller_burst,
                    },
                    Rate {
                        per_second: a.node_rate,
                        burst: a.node_burst,
                    },
                ),
                ledger: Mutex::new(ledger),
                replica: std::fs::read_to_string("/proc/sys/kernel/hostname")
                    .map(|h| h.trim().to_string())
                    .unwrap_or_default(),
                metrics: CaMetrics::new(),
                health: None,
            }),
            _ => Err(ServeError::Setup(problems)),
        }
    }

    /// The service's TLS certificate: a leaf of its own CA with the
    /// configured DNS names and IP addresses (what clients dial), so a
    /// client needs only the mesh's root to trust it.
    fn server_cert(&self) -> Result<Arc<CertifiedKey>, String> {
        let now = std::time::SystemTime::now();
        let names = self.server_names.clone();
        let (cert, key, _) =
            self.authority
                .issue_with(|p| {
                    p.subject_alt_names =
                        names
                            .iter()
                            .filter(|n| !n.trim().is_empty())
                            .map(|n| match n.parse::<IpAddr>() {
                                Ok(ip) => Ok(SanType::IpAddress(ip)),
                                Err(_) => n.clone().try_into().map(SanType::DnsName).map_err(|e: rcgen::Error| {
                                    crate::identity::ca::CaError::Sign(format!("{n:?}: {e}"))
                                }),
                            })
                            .collect::<Result<_, _>>()?;
                    p.not_before = (now - Duration::from_secs(60)).into();
                    p.not_after = (now + SERVER_CERT_LIFETIME).into();
                    Ok(())
                })
                .map_err(|e| e.to_string())?;
        let mut chain = vec![cert];
        chain.extend(self.authority.chain().iter().cloned());
        certified_key(chain, key).map_err(|e| e.to_string())
    }

    fn count(&self, result: &'static str, reason: &'static str) {
        self.metrics
            .requests
            .get_or_create(&RequestLabels { result, reason })
            .inc();
    }

    /// Handles one request to an answer: the response or a gRPC status
    /// with its reason, counted, and written to the issuance log before it
    /// is answered. A line that cannot be written fails the request: a
    /// certificate nobody can account for is never handed out.
    fn create(&self, token: Option<&str>, body: Bytes, peer: SocketAddr) -> Result<IstioCertificateResponse, Refusal> {
        let Outcome {
            caller,
            requested,
            result,
            logged,
        } = self.decide(token, body);
        let (decision, reason, serial, not_after) = match &result {
            Ok(s) => (Decision::Issued, "ok", Some(s.serial.clone()), Some(s.not_after)),
            Err((_, reason, _)) => (Decision::Refused, *reason, None, None),
        };
        let entry = Entry {
            time: time::OffsetDateTime::now_utc()
                .format(&time::format_description::well_known::Rfc3339)
                .unwrap_or_default(),
            replica: self.replica.clone(),
            caller,
            peer: peer.to_string(),
            requested,
            decision,
            reason: reason.to_string(),
            serial,
            not_after,
            sha256: result.as_ref().ok().map(|s| s.sha256.clone()),
            prev: String::new(),
        };
        let issued = decision == Decision::Issued;
        let written = match logged || issued {
            true => self
                .ledger
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .append(entry, issued),
            false => Ok(()),
        };
        let result = match (result, written) {
            (r, Ok(())) => r,
            (_, Err(e)) => {
                tracing::error!("{e}: refusing every request until the issuance log can be written");
                Err((
                    Code::Unavailable,
                    "log_unavailable",
                    "the issuance log cannot be written".into(),
                ))
            }
        };
        match &result {
            Ok(_) => self.count("issued", "ok"),
            Err((_, reason, _)) => self.count("refused", reason),
        }
        result.map(|s| s.resp)
    }

    /// The decision on one request, with who asked and for what.
    fn decide(&self, token: Option<&str>, body: Bytes) -> Outcome {
        let mut out = Outcome {
            caller: Caller::default(),
            requested: String::new(),
            result: Err((Code::Internal, "internal", String::new())),
            logged: false,
        };
        out.result = self.decide_into(token, body, &mut out);
        out
    }

    fn decide_into(&self, token: Option<&str>, body: Bytes, out: &mut Outcome) -> Result<Signed, Refusal> {
        let token = token.ok_or((Code::Unauthenticated, "no_token", "no bearer token".to_string()))?;
        let now = crate::identity::trust::unix_now();
        let mut verified = super::jwt::verify(token, &self.keys.current(), &self.expected, now);
        // A key the set lacks may be a new one the API server rotated in.
        let unknown_key = matches!(verified, Err(super::jwt::JwtError::UnknownKey(_)));
        if unknown_key
            && let Keys::Discovered(d) = &self.keys
            && d.refresh_blocking()
        {
            verified = super::jwt::verify(token, &d.current(), &self.expected, now);
        }
        let claims = verified.map_err(|e| (Code::Unauthenticated, e.kind(), format!("token refused: {e}")))?;
        out.caller = caller_of(&claims);
        out.logged = true;
        let req: IstioCertificateRequest =
            unframe(body).map_err(|e| (Code::InvalidArgument, "bad_request", e.to_string()))?;
        out.requested = req.impersonated().map_or_else(
            || {
                format!(
                    "spiffe://{}/ns/{}/sa/{}",
                    self.rules.trust_domain, claims.namespace, claims.service_account
                )
            },
            |r| r.chars().take(512).collect(),
        );
        let caller = format!("{}/{}", claims.namespace, claims.service_account);
        let key = out.caller.pod.clone().unwrap_or_else(|| caller.clone());
        // The node's budget is the node agent's: a workload asking for its
        // own identity spends only its own, so pods of a node cannot starve
        // their agent's renewals.
        let node_agent =
            claims.namespace == self.rules.node_agent.0 && claims.service_account == self.rules.node_agent.1;
        let node = claims.node.as_deref().filter(|_| node_agent);
        if let Err(l) = self.limiter.admit(&key, node, Instant::now()) {
            out.logged = l.first();
            return Err((
                Code::ResourceExhausted,
                l.reason(),
                format!("{key}: issuance rate limit reached"),
            ));
        }
        let id = authorize(&claims, req.impersonated(), &self.rules, &self.store.current())
            .map_err(|e| (Code::PermissionDenied, e.kind(), format!("{caller}: {e}")))?;
        let asked = u64::try_from(req.validity_duration).unwrap_or(0);
        let lifetime = match asked {
            0 => self.max_lifetime,
            s => Duration::from_secs(s).min(self.max_lifetime),
        };
        let (chain, serial) = self
            .authority
            .issue_for_csr(&id, lifetime, &req.csr)
            .map_err(|e| (Code::InvalidArgument, "bad_csr", e.to_string()))?;
        let serial = crate::identity::ca::hex(&serial);
        let not_after = not_after(chain[0].as_ref());
        tracing::info!(
            identity = %id,
            caller = %caller,
            node = claims.node.as_deref().unwrap_or(""),
            serial = %serial,
            lifetime_s = lifetime.as_secs(),
            "certificate issued"
        );
        let mut cert_chain: Vec<String> = chain
            .iter()
            .map(|c| crate::identity::ca::pem_text("CERTIFICATE", c.as_ref()))
            .collect();
        // Istio's answers end with the root.
        if let Some(root) = self.authority.roots().first() {
            cert_chain.push(crate::identity::ca::pem_text("CERTIFICATE", root.as_ref()));
        }
        Ok(Signed {
            resp: IstioCertificateResponse { cert_chain },
            serial,
            not_after,
            sha256: crate::identity::ca::sha256_hex(chain[0].as_ref()),
        })
    }

    async fn handle(
        self: Arc<Self>,
        req: http::Request<h2::RecvStream>,
        mut respond: h2::server::SendResponse<Bytes>,
        peer: SocketAddr,
    ) {
        let (head, mut body) = req.into_parts();
        let result = if head.method != http::Method::POST || head.uri.path() != CREATE_CERTIFICATE_PATH {
            self.count("refused", "unimplemented");
            Err((
                Code::Unimplemented,
                "unimplemented",
                format!("no method {}", head.uri.path()),
            ))
        } else {
            let read = tokio::time::timeout(REQUEST_TIMEOUT, read_body(&mut body)).await;
            match read.unwrap_or_else(|_| Err(format!("no whole request within {REQUEST_TIMEOUT:?}"))) {
                Err(e) => {
                    self.count("refused", "bad_request");
                    Err((Code::ResourceExhausted, "bad_request", e))
                }
                Ok(bytes) => {
                    let token = head
                        .headers
                        .get(http::header::AUTHORIZATION)
                        .and_then(|v| v.to_str().ok())
                        .and_then(|v| v.strip_prefix("Bearer ").or_else(|| v.strip_prefix("bearer ")))
                        .map(|t| t.trim().to_string());
                    // Signing and the synced log line block: off the runtime's threads.
                    let started = Instant::now();
                    let service = self.clone();
                    let answer =
                        tokio::task::spawn_blocking(move || service.create(token.as_deref(), bytes, peer)).await;
                    self.metrics.duration.observe(started.elapsed().as_secs_f64());
                    answer.unwrap_or_else(|_| Err((Code::Internal, "internal", "the request's task failed".into())))
                }
            }
        };
        match result {
            Ok(resp) => {
                let head = http::Response::builder()
                    .status(200)
                    .header("content-type", "application/grpc")
                    .body(())
                    .unwrap_or_default();
                if let Ok(mut send) = respond.send_response(head, false) {
                    let _ = send.send_data(frame(&resp), false);
                    let mut trailers = http::HeaderMap::new();
                    trailers.insert("grpc-status", http::HeaderValue::from_static("0"));
                    let _ = send.send_trailers(trailers);
                }
            }
            Err((code, reason, message)) => {
                tracing::warn!(peer = %peer, reason, grpc_status = code as u32, "certificate request refused: {message}");
                let head = http::Response::builder()
                    .status(200)
                    .header("content-type", "application/grpc")
                    .header("grpc-status", (code as u32).to_string())
                    .header("grpc-message", percent_encode(&message))
                    .body(())
                    .unwrap_or_default();
                let _ = respond.send_response(head, true);
            }
        }
    }
}

/// The CA service's own admin endpoint: `/healthz/ready` (serving) and
/// its request counters on `/stats` and `/metrics`.
fn admin_route(service: &CaService, req: &crate::admin::server::Request<'_>) -> crate::admin::server::Response {
    use crate::admin::server::Response;
    match (req.method, req.path) {
        ("GET", "/healthz/ready") => {
            let mut problems = service.health.as_ref().map(|h| h.problems()).unwrap_or_default();
            if service.store.current().generation == 0 {
                problems.push("no view of pods yet: every node agent's request would be refused".into());
            }
            match problems.is_empty() {
                true => Response::text("ready\n"),
                false => Response::with(
                    "503 Service Unavailable",
                    "text/plain; charset=utf-8",
                    problems.join("\n") + "\n",
                ),
            }
        }
        ("GET", "/stats" | "/metrics" | "/stats/prometheus") => Response::text(service.stats()),
        (_, "/healthz/ready" | "/stats" | "/metrics" | "/stats/prometheus") => Response::method_not_allowed(),
        _ => Response::not_found(),
    }
}

impl CaService {
    /// The metrics text, the gauges read from their sources first.
    fn stats(&self) -> String {
        let m = &self.metrics;
        let (callers, nodes) = self.limiter.tracked();
        for (table, n) in [("caller", callers), ("node", nodes)] {
            m.limiter_keys
                .get_or_create(&TableLabels { table })
                .set(i64::try_from(n).unwrap_or(i64::MAX));
        }
        if let Some(ca) = self.authority.chain().first() {
            m.intermediate_expiry.set(not_after(ca.as_ref()));
        }
        m.render()
    }
}

/// Who asked, for the issuance log: the token's ServiceAccount, node and pod.
fn caller_of(claims: &K8sClaims) -> Caller {
    Caller {
        service_account: format!("{}/{}", claims.namespace, claims.service_account),
        node: claims.node.clone(),
        pod: claims.pod.as_ref().map(|p| format!("{}/{p}", claims.namespace)),
    }
}

/// A certificate's notAfter, unix seconds (0 if it cannot be read).
fn not_after(der: &[u8]) -> i64 {
    use x509_parser::prelude::FromDer;
    x509_parser::certificate::X509Certificate::from_der(der)
        .map(|(_, c)| c.validity().not_after.timestamp())
        .unwrap_or(0)
}

/// grpc-message: printable ASCII except `%`, the rest percent-encoded.
fn percent_encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if (0x20..0x7f).contains(&b) && b != b'%' {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

#[derive(Debug)]
struct Rotating(RwLock<Arc<CertifiedKey>>);

impl ResolvesServerCert for Rotating {
    fn resolve(&self, _: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.0.read().unwrap_or_else(|e| e.into_inner()).clone())
    }
}

/// Runs the service until `stop` fires.
pub async fn serve(args: ServeArgs, stop: CancellationToken) -> Result<(), ServeError> {
    let setup = |e: String| ServeError::Setup(vec![e]);
    let client = match PodSource::needs_api(&args) {
        true => Some(
            crate::source::kube::client(args.kubeconfig.as_deref())
                .await
                .map_err(|e| setup(e.to_string()))?,
        ),
        false => None,
    };
    let discovered = match (&args.jwks, &client) {
        (None, Some(c)) => Some(Arc::new(
            super::oidc::Discovered::start(c.clone(), &args.issuer)
                .await
                .map_err(|e| setup(format!("OIDC discovery (no --jwks): {e}")))?,
        )),
        _ => None,
    };
    let mut service = CaService::load_with(&args, discovered.clone())?;
    // The view of pods: a directory, or the API's Pods alone.
    let assembler = || crate::source::Assembler::new(crate::config::defaults::ROOT_NAMESPACE, &args.trust_domain, &[]);
    let pods = PodSource::of(&args, &mut Vec::new());
    let kube_source = match (&pods, client) {
        (Some(PodSource::Kube), Some(client)) => {
            let source =
                crate::source::kube::KubeSource::watching(client, "", assembler(), &[crate::source::kube::Kind::Pods]);
            service.health = Some(source.health());
            Some(source)
        }
        _ => None,
    };
    let service = Arc::new(service);
    match (pods, kube_source) {
        (_, Some(source)) => {
            tokio::spawn(source.run(service.store.clone(), stop.clone()));
        }
        (Some(PodSource::Dir(dir)), None) => {
            let source = DirSource::new(&dir).with_assembler(assembler());
            tokio::spawn(source.run(service.store.clone(), Duration::from_millis(200), stop.clone()));
        }
        _ => return Err(setup("no source of pods".into())),
    }
    if let Some(d) = discovered {
        tokio::spawn(d.run(stop.clone()));
    }
    let cert = service
        .server_cert()
        .map_err(|e| ServeError::Setup(vec![format!("--server-name: {e}")]))?;
    let resolver = Arc::new(Rotating(RwLock::new(cert)));
    let mut tls = ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .expect("ring supports TLS 1.3")
        .with_no_client_auth()
        .with_cert_resolver(resolver.clone());
    tls.alpn_protocols = vec![b"h2".to_vec()];
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(tls));
    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .map_err(|source| ServeError::Bind {
            addr: args.listen,
            source,
        })?;
    let admin = tokio::net::TcpListener::bind(args.admin_addr)
        .await
        .map_err(|source| ServeError::Bind {
            addr: args.admin_addr,
            source,
        })?;
    tokio::spawn(crate::admin::server::serve(
        admin,
        service.clone(),
        admin_route,
        |s: &CaService, ip| s.store.current().claims_ip(ip),
        stop.clone(),
    ));
    {
        let (service, resolver, stop) = (service.clone(), resolver.clone(), stop.clone());
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    _ = stop.cancelled() => return,
                    _ = tokio::time::sleep(SERVER_CERT_LIFETIME / 2) => {}
                }
                match service.server_cert() {
                    Ok(c) => *resolver.0.write().unwrap_or_else(|e| e.into_inner()) = c,
                    Err(e) => tracing::error!("re-issuing the service's TLS certificate failed: {e}"),
                }
            }
        });
    }
    tracing::info!(
        listen = %args.listen,
        trust_domain = %args.trust_domain,
        node_agent = %args.node_agent_sa,
        "CA service running"
    );
    let slots = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
    loop {
        let permit = tokio::select! {
            _ = stop.cancelled() => return Ok(()),
            p = slots.clone().acquire_owned() => match p { Ok(p) => p, Err(_) => return Ok(()) },
        };
        let (tcp, peer) = tokio::select! {
            _ = stop.cancelled() => return Ok(()),
            a = listener.accept() => match a { Ok(a) => a, Err(_) => continue },
        };
        let (acceptor, service) = (acceptor.clone(), service.clone());
        tokio::spawn(async move {
            let _permit = permit;
            let conn = tokio::time::timeout(HANDSHAKE_TIMEOUT, async {
                let tls = acceptor.accept(tcp).await.ok()?;
                h2::server::Builder::new()
                    .max_concurrent_streams(16)
                    .handshake::<_, Bytes>(tls)
                    .await
                    .ok()
            })
            .await;
            let Ok(Some(mut conn)) = conn else { return };
            while let Ok(Some(Ok((req, respond)))) = tokio::time::timeout(IDLE_TIMEOUT, conn.accept()).await {
                tokio::spawn(service.clone().handle(req, respond, peer));
            }
        });
    }
}

#[cfg(test)]
mod tests;
