//! `nodeward ca serve`: the CA service. It holds the CA directory so the
//! nodes do not, and speaks Istio's CA protocol with TLS on 15012, so
//! Nodeward agents, ztunnel and Istio's own clients can use it.
//!
//! * `jwt` — ServiceAccount tokens verified against the issuer's keys.
//! * `authz` — who may obtain which identity (node-scoped impersonation).
//! * `limit` — issuance rate limits per caller and per node.
//! * `ledger` — the hash-chained issuance log and its verifier.
//! * `oidc` — the token issuer's keys from the API server's OIDC discovery.
//! * `metrics` — the service's own metric families.
//! * `server` — the gRPC endpoint: authenticate, limit, authorize, issue,
//!   log, count.

#![forbid(unsafe_code)]

pub(crate) mod authz;
#[cfg(feature = "testing")]
pub mod jwt;
#[cfg(not(feature = "testing"))]
pub(crate) mod jwt;
pub mod ledger;
pub(crate) mod limit;
pub(crate) mod metrics;
pub(crate) mod oidc;
pub mod server;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::Args;

/// `nodeward ca serve` flags.
#[derive(Debug, Args)]
pub struct ServeArgs {
    /// CA directory (Istio plug-in CA files); mount it read-only.
    #[arg(long, env = "NODEWARD_CA_DIR")]
    pub(crate) ca_dir: PathBuf,
    /// Address of the gRPC endpoint (Istio's port is 15012).
    #[arg(long, env = "NODEWARD_CA_LISTEN", default_value = "0.0.0.0:15012")]
    pub(crate) listen: SocketAddr,
    /// The service-account issuer's public keys, a JWKS file (RFC 7517).
    /// Without it they come from the API server's OIDC discovery
    /// (`/.well-known/openid-configuration`, `/openid/v1/jwks`), refreshed
    /// when a token names an unknown key and every 5 minutes.
    #[arg(long, env = "NODEWARD_CA_JWKS")]
    pub(crate) jwks: Option<PathBuf>,
    /// Expected `iss` of tokens (the API server's --service-account-issuer).
    #[arg(long, env = "NODEWARD_CA_ISSUER")]
    pub(crate) issuer: String,
    /// Expected audience of tokens.
    #[arg(long, env = "NODEWARD_CA_AUDIENCE", default_value = "istio-ca")]
    pub(crate) audience: String,
    /// The node agent's ServiceAccount, `namespace/name`: it may obtain the
    /// identities of pods on its token's node.
    #[arg(long, env = "NODEWARD_CA_NODE_AGENT_SA", default_value = "nodeward-system/nodeward")]
    pub(crate) node_agent_sa: String,
    /// Where the CA's view of pods comes from (who runs where, as which
    /// ServiceAccount): `kube` watches the API's Pods, and nothing else;
    /// `dir` reads `--config-dir` [default: dir with --config-dir, else kube].
    #[arg(long, env = "NODEWARD_SOURCE", value_enum)]
    pub(crate) source: Option<crate::config::SourceKind>,
    /// Kubernetes YAML with the cluster's pods, for `--source dir`.
    #[arg(long, env = "NODEWARD_CONFIG_DIR")]
    pub(crate) config_dir: Option<PathBuf>,
    /// kubeconfig for the Kubernetes API (`--source kube`, OIDC discovery)
    /// [default: the local kubeconfig if any, else in-cluster settings].
    #[arg(long, env = "NODEWARD_KUBECONFIG")]
    pub(crate) kubeconfig: Option<PathBuf>,
    /// SPIFFE trust domain of issued identities.
    #[arg(long, env = "NODEWARD_TRUST_DOMAIN", default_value = crate::config::defaults::TRUST_DOMAIN)]
    pub(crate) trust_domain: String,
    /// Longest certificate issued, whatever is asked.
    #[arg(long, env = "NODEWARD_CA_MAX_CERT_LIFETIME", default_value = "24h", value_parser = crate::config::parse_duration)]
    pub(crate) max_cert_lifetime: Duration,
    /// Names in the service's TLS certificate (DNS names or IP addresses);
    /// clients verify the one they dial. Repeat or separate with commas.
    #[arg(
        long,
        env = "NODEWARD_CA_SERVER_NAME",
        value_delimiter = ',',
        default_value = "nodeward-ca.nodeward-system.svc"
    )]
    pub(crate) server_name: Vec<String>,
    /// Readiness (once the view of pods is in) and `/metrics`.
    #[arg(long, env = "NODEWARD_CA_ADMIN_ADDR", default_value = "127.0.0.1:15022")]
    pub(crate) admin_addr: SocketAddr,
    /// The issuance log: one hash-chained JSON line per certificate issued
    /// (synced before the answer) and per request refused once its token
    /// verified (a rate-limit episode: its first refusal); `nodeward ca log
    /// verify` checks it. Each replica writes its own file.
    #[arg(long, env = "NODEWARD_CA_ISSUANCE_LOG")]
    pub(crate) issuance_log: PathBuf,
    /// Certificates per second one caller (the pod its token is bound to,
    /// else its ServiceAccount) may obtain, after its burst.
    #[arg(long, env = "NODEWARD_CA_CALLER_RATE", default_value_t = 5.0)]
    pub(crate) caller_rate: f64,
    /// Certificates one caller may obtain at once.
    #[arg(long, env = "NODEWARD_CA_CALLER_BURST", default_value_t = 200.0)]
    pub(crate) caller_burst: f64,
    /// Certificates per second for all callers of one node (the token's
    /// node), after its burst.
    #[arg(long, env = "NODEWARD_CA_NODE_RATE", default_value_t = 10.0)]
    pub(crate) node_rate: f64,
    /// Certificates all callers of one node may obtain at once.
    #[arg(long, env = "NODEWARD_CA_NODE_BURST", default_value_t = 400.0)]
    pub(crate) node_burst: f64,
}

/// Why the CA service could not start; each names its flag or file.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// Problems with the flags and files, all of them.
    #[error("invalid `nodeward ca serve` setup:\n  {}", .0.join("\n  "))]
    Setup(Vec<String>),
    /// A socket could not be bound.
    #[error("{addr}: {source}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// Why.
        source: std::io::Error,
    },
}
