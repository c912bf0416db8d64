//! Command line and environment: every flag has a `NODEWARD_*` variable.
//! clap only parses them into [`RunArgs`]; [`Config::from_args`] checks
//! them all against each other and the filesystem, reporting every problem
//! at once, and builds the one [`Config`] the agent is wired from.

#![forbid(unsafe_code)]

use std::fmt;
use std::path::PathBuf;
use std::str::FromStr;
use std::time::Duration;

use clap::{Args, Parser, Subcommand, ValueEnum};

use crate::state::workload::EgressMode;

mod check;

pub(crate) use check::SourceConfig;
pub use check::{Config, ConfigErrors};

/// Every default of `nodeward run`, defined once: the flags and the
/// structs built without flags (tests, tools) read them from here.
pub mod defaults {
    use std::time::Duration;

    /// `--bpffs`.
    pub const BPFFS: &str = "/sys/fs/bpf";
    /// `--socket-mark`: "NW".
    pub(crate) const SOCKET_MARK: &str = "0x4e57";
    /// `--drain-timeout`.
    pub const DRAIN_TIMEOUT: Duration = Duration::from_secs(30);
    /// `--idle-timeout`.
    pub(crate) const IDLE_TIMEOUT: Duration = Duration::from_secs(3600);
    /// `--connect-timeout`.
    pub(crate) const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
    /// `--config-poll`.
    pub(crate) const CONFIG_POLL: Duration = Duration::from_millis(200);
    /// `--source-stale-after`: kube's watch backoff caps each retry at
    /// 30 s, so a minute is two failed retries in a row, which an API
    /// server's rolling restart or leader change does not reach.
    pub(crate) const SOURCE_STALE_AFTER: Duration = Duration::from_secs(60);
    /// `--buffer-size`, bytes.
    pub(crate) const BUFFER_SIZE: u32 = 32 * 1024;
    /// `--root-namespace`: Istio's.
    pub(crate) const ROOT_NAMESPACE: &str = "istio-system";
    /// `--trust-domain`: Kubernetes' and Istio's.
    pub(crate) const TRUST_DOMAIN: &str = "cluster.local";
    /// `--cluster-id`: Istio's default.
    pub(crate) const CLUSTER_ID: &str = "Kubernetes";
    /// `--cert-lifetime`.
    pub(crate) const CERT_LIFETIME: Duration = Duration::from_secs(24 * 3600);
    /// `--h2-stream-window`, bytes.
    pub(crate) const H2_STREAM_WINDOW: u32 = 4 << 20;
    /// `--h2-connection-window`, bytes.
    pub(crate) const H2_CONNECTION_WINDOW: u32 = 16 << 20;
    /// `--h2-frame-size`, bytes.
    pub(crate) const H2_FRAME_SIZE: u32 = 1 << 20;
    /// `--tunnel-max-streams`.
    pub(crate) const TUNNEL_MAX_STREAMS: u32 = 100;
    /// Most tunnel connections per destination when `--tunnel-connections`
    /// is not given (one per worker thread up to this).
    pub(crate) const TUNNEL_CONNECTIONS_MAX_AUTO: usize = 4;
    /// `--tunnel-idle-timeout`.
    pub(crate) const TUNNEL_IDLE_TIMEOUT: Duration = Duration::from_secs(60);
    /// `--handshake-timeout`.
    pub(crate) const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
    /// `--tunnel-keepalive`.
    pub(crate) const TUNNEL_KEEPALIVE: Duration = Duration::from_secs(30);
    /// `--admin-addr`: `/config_dump`, `/certs`, `/logging`, node loopback only.
    pub(crate) const ADMIN_ADDR: &str = "127.0.0.1:15000";
    /// `--metrics-addr`: ztunnel's port; bounded labels and no secrets, so
    /// the node's network may scrape it.
    pub(crate) const METRICS_ADDR: &str = "0.0.0.0:15020";
    /// `--readiness-addr`: ztunnel's port; kubelet probes it on the node's IP.
    pub(crate) const READINESS_ADDR: &str = "0.0.0.0:15021";
    /// `--max-connections`.
    pub(crate) const MAX_CONNECTIONS: u32 = 16384;
    /// `--max-connections-per-pod`.
    pub(crate) const MAX_CONNECTIONS_PER_POD: u32 = 8192;
    /// `--max-inbound-tunnels`.
    pub(crate) const MAX_INBOUND_TUNNELS: u32 = 1024;
    /// `--max-outbound-tunnels`.
    pub(crate) const MAX_OUTBOUND_TUNNELS: u32 = 1024;
    /// `--max-tunnels-per-peer`.
    pub(crate) const MAX_TUNNELS_PER_PEER: u32 = 128;
    /// `--max-tunnels-per-pod`.
    pub(crate) const MAX_TUNNELS_PER_POD: u32 = 128;
    /// `--max-handshakes`.
    pub(crate) const MAX_HANDSHAKES: u32 = 512;
    /// `--max-handshakes-per-peer`.
    pub(crate) const MAX_HANDSHAKES_PER_PEER: u32 = 64;
}

/// Nodeward: a per-node, sidecarless service-mesh agent.
#[derive(Debug, Parser)]
#[command(name = "nodeward", version, about, long_about = None)]
pub struct Cli {
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// Subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the agent for one node, in that node's network namespace.
    Run(Box<RunArgs>),
    /// Detach and remove everything a node's agent left pinned (including
    /// the fail-closed programs); use after uninstalling.
    Cleanup(CleanupArgs),
    /// Certificate authority chores.
    #[command(subcommand)]
    Ca(CaCommand),
    /// Review a config directory statically: findings with a severity, the
    /// object and why; exits 1 when one is at or above --fail-on.
    Audit(AuditArgs),
    /// On a node, prove enforcement for its enrolled pods: plaintext
    /// refused, a foreign identity refused, outbound traffic mTLS; exits 1
    /// on any failure.
    Verify(VerifyArgs),
}

/// `--output` of `audit` and `verify`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Output {
    /// Aligned columns for people.
    Table,
    /// One JSON document for machines.
    Json,
}

/// `nodeward audit` flags.
#[derive(Debug, Args)]
pub struct AuditArgs {
    /// Directory of Kubernetes YAML to review, as `run` reads it.
    #[arg(long, env = "NODEWARD_CONFIG_DIR", required_unless_present = "issuance_log")]
    pub config_dir: Option<PathBuf>,

    /// CA service issuance logs (one per replica; repeat or separate with
    /// commas): each chain is checked, and every certificate the agents
    /// report (--certs, --agent-metrics) must be in one of them.
    #[arg(long, env = "NODEWARD_AUDIT_ISSUANCE_LOG", value_delimiter = ',')]
    pub issuance_log: Vec<PathBuf>,

    /// Saved `/certs` documents of agents (`curl 127.0.0.1:15000/certs` on
    /// each node), for --issuance-log.
    #[arg(long, env = "NODEWARD_AUDIT_CERTS", value_delimiter = ',', requires = "issuance_log")]
    pub certs: Vec<PathBuf>,

    /// Agents' metrics endpoints (`NODE:15020`), read for the certificates
    /// they hold, for --issuance-log.
    #[arg(
        long,
        env = "NODEWARD_AUDIT_AGENT_METRICS",
        value_delimiter = ',',
        requires = "issuance_log"
    )]
    pub agent_metrics: Vec<std::net::SocketAddr>,

    /// Exit 1 when a finding is at or above this severity.
    #[arg(long, env = "NODEWARD_AUDIT_FAIL_ON", value_enum, default_value_t = crate::audit::Severity::High)]
    pub fail_on: crate::audit::Severity,

    /// Output format.
    #[arg(long, env = "NODEWARD_OUTPUT", value_enum, default_value_t = Output::Table)]
    pub output: Output,

    /// Namespaces that are production, by name: exact, `prefix*` or `*suffix` (comma-separated).
    #[arg(long, env = "NODEWARD_AUDIT_PRODUCTION_NAMESPACES", value_delimiter = ',',
          default_value = crate::audit::DEFAULT_PRODUCTION_NAMESPACES)]
    pub production_namespaces: Vec<String>,

    /// Namespaces that are production, by label `key=value` (comma-separated).
    #[arg(long, env = "NODEWARD_AUDIT_PRODUCTION_LABELS", value_delimiter = ',',
          default_value = crate::audit::DEFAULT_PRODUCTION_LABELS)]
    pub production_labels: Vec<String>,

    /// Istio root namespace: its policies apply mesh-wide.
    #[arg(long, env = "NODEWARD_ROOT_NAMESPACE", default_value = defaults::ROOT_NAMESPACE)]
    pub root_namespace: String,
}

/// `nodeward verify` flags.
#[derive(Debug, Args)]
pub struct VerifyArgs {
    /// This node's name: its enrolled pods are verified.
    #[arg(long, env = "NODEWARD_NODE_NAME")]
    pub node_name: String,

    /// The config directory the agent reads.
    #[arg(long, env = "NODEWARD_CONFIG_DIR")]
    pub config_dir: PathBuf,

    /// Only pods of this namespace.
    #[arg(long, env = "NODEWARD_VERIFY_NAMESPACE")]
    pub namespace: Option<String>,

    /// Only this pod (`name` or `namespace/name`).
    #[arg(long, env = "NODEWARD_VERIFY_POD")]
    pub pod: Option<String>,

    /// Output format.
    #[arg(long, env = "NODEWARD_OUTPUT", value_enum, default_value_t = Output::Table)]
    pub output: Output,

    /// CA directory to issue a throwaway foreign identity from; without it
    /// the foreign-identity check is not run.
    #[arg(long, env = "NODEWARD_CA_DIR")]
    pub ca_dir: Option<PathBuf>,

    /// Where the agent serves Prometheus `/metrics` (its counters).
    #[arg(long, env = "NODEWARD_VERIFY_METRICS_ADDR", default_value = "127.0.0.1:15020")]
    pub metrics_addr: std::net::SocketAddr,

    /// How long each probe waits for a refusal.
    #[arg(long, env = "NODEWARD_VERIFY_TIMEOUT", default_value_t = HumanDuration(std::time::Duration::from_secs(1)))]
    pub timeout: HumanDuration,

    /// Istio root namespace.
    #[arg(long, env = "NODEWARD_ROOT_NAMESPACE", default_value = defaults::ROOT_NAMESPACE)]
    pub root_namespace: String,

    /// SPIFFE trust domain.
    #[arg(long, env = "NODEWARD_TRUST_DOMAIN", default_value = defaults::TRUST_DOMAIN)]
    pub trust_domain: String,
}

/// `nodeward ca log` subcommands.
#[derive(Debug, Subcommand)]
pub enum LogCommand {
    /// Check an issuance log's hash chain from its first line: prints the
    /// line count and the head (record it elsewhere: nothing follows the
    /// newest line to vouch for it), or the first line that breaks the
    /// chain, and exits 1.
    Verify {
        /// The issuance log (`ca serve --issuance-log`), JSON Lines.
        file: PathBuf,
    },
}

/// `nodeward ca` subcommands.
#[derive(Debug, Subcommand)]
pub enum CaCommand {
    /// Create a root and an intermediate CA in Istio's plug-in CA layout.
    /// The root's key goes to its own directory, to be kept offline.
    Init {
        /// Directory to write the intermediate to (ca-cert.pem, ca-key.pem,
        /// cert-chain.pem, root-cert.pem): what a signer mounts.
        #[arg(long, env = "NODEWARD_CA_OUT")]
        out: PathBuf,
        /// Directory to write the root to (root-cert.pem, root-key.pem);
        /// never the same as --out [default: <out>-root].
        #[arg(long, env = "NODEWARD_CA_ROOT_OUT")]
        root_out: Option<PathBuf>,
        /// Levels of further CAs the intermediate may sign (0: workloads only).
        #[arg(long, env = "NODEWARD_CA_PATH_LEN", default_value_t = 0)]
        path_len: u8,
    },
    /// Issue a further intermediate CA.
    Intermediate {
        /// Sign with this root directory's key (root-cert.pem + root-key.pem,
        /// as `ca init --root-out` wrote them).
        #[arg(
            long,
            env = "NODEWARD_CA_ROOT",
            conflicts_with = "parent",
            required_unless_present = "parent"
        )]
        root: Option<PathBuf>,
        /// Sign with this directory's intermediate (ca-cert.pem + ca-key.pem), one level deeper.
        #[arg(long, env = "NODEWARD_CA_PARENT")]
        parent: Option<PathBuf>,
        /// Directory to write.
        #[arg(long, env = "NODEWARD_CA_OUT")]
        out: PathBuf,
    },
    /// Run the CA service: Istio's CA protocol on TLS (15012), callers
    /// authenticated by ServiceAccount tokens, node agents limited to the
    /// pods of their node. The signing key stays here, off the nodes.
    Serve(Box<crate::ca_service::ServeArgs>),
    /// The CA service's issuance log.
    #[command(subcommand)]
    Log(LogCommand),
    /// Revoke certificates by serial: appends to the CRL and re-signs it.
    Revoke {
        /// CA directory whose ca-key.pem signs the CRL (ca-crl.pem).
        #[arg(long = "ca", env = "NODEWARD_CA_DIR")]
        ca: PathBuf,
        /// Sign with root-key.pem instead (root-crl.pem), to revoke
        /// intermediates: `--ca` is then the root's directory; copy the
        /// new root-crl.pem to where the agents read their CRLs.
        #[arg(long, env = "NODEWARD_CA_REVOKE_AS_ROOT")]
        as_root: bool,
        /// Serial numbers in hex, with or without colons.
        #[arg(required = true)]
        serials: Vec<String>,
    },
}

/// `nodeward run` flags, as parsed: types and syntax only. Ranges and
/// relations between flags are checked by [`Config::from_args`], so every
/// problem is reported at once rather than clap's first.
#[derive(Debug, Args)]
pub struct RunArgs {
    /// Name of this node; pods whose spec.nodeName matches are managed.
    #[arg(long, env = "NODEWARD_NODE_NAME")]
    pub(crate) node_name: String,

    // Where the cluster's objects come from (one block: `--source`,
    // `--config-dir`, `--kubeconfig`).
    /// Where the cluster's objects come from [default: `kube` when
    /// KUBERNETES_SERVICE_HOST is set and no --config-dir is given, else `dir`].
    #[arg(long, env = "NODEWARD_SOURCE", value_enum)]
    pub(crate) source: Option<SourceKind>,

    /// Directory of Kubernetes YAML (Namespace, Pod and Istio policy objects),
    /// re-read on change; the `dir` source.
    #[arg(long, env = "NODEWARD_CONFIG_DIR")]
    pub(crate) config_dir: Option<PathBuf>,

    /// kubeconfig file for the `kube` source, for development [default:
    /// $KUBECONFIG or ~/.kube/config if present, else the pod's service account].
    #[arg(long, env = "NODEWARD_KUBECONFIG")]
    pub(crate) kubeconfig: Option<PathBuf>,

    /// bpffs mount point (mounted there if it is not).
    #[arg(long, env = "NODEWARD_BPFFS", default_value = defaults::BPFFS)]
    pub(crate) bpffs: PathBuf,

    /// cgroup v2 root to attach to [default: found in /proc/mounts].
    #[arg(long, env = "NODEWARD_CGROUP2")]
    pub(crate) cgroup2: Option<PathBuf>,

    /// Socket mark that identifies the agent's own sockets to its eBPF programs.
    #[arg(long, env = "NODEWARD_SOCKET_MARK", default_value = defaults::SOCKET_MARK, value_parser = parse_mark)]
    pub(crate) socket_mark: u32,

    /// How long SIGTERM waits for open connections before closing them.
    #[arg(long, env = "NODEWARD_DRAIN_TIMEOUT", default_value_t = HumanDuration(defaults::DRAIN_TIMEOUT))]
    pub(crate) drain_timeout: HumanDuration,

    /// Close a proxied connection after this long without traffic.
    #[arg(long, env = "NODEWARD_IDLE_TIMEOUT", default_value_t = HumanDuration(defaults::IDLE_TIMEOUT))]
    pub(crate) idle_timeout: HumanDuration,

    /// Deadline for connecting to a destination.
    #[arg(long, env = "NODEWARD_CONNECT_TIMEOUT", default_value_t = HumanDuration(defaults::CONNECT_TIMEOUT))]
    pub(crate) connect_timeout: HumanDuration,

    /// How often the config directory is checked for changes.
    #[arg(long, env = "NODEWARD_CONFIG_POLL", default_value_t = HumanDuration(defaults::CONFIG_POLL))]
    pub(crate) config_poll: HumanDuration,

    /// The `kube` source: a kind whose watch has been failing this long
    /// since it last worked makes readiness fail (its objects may be stale).
    #[arg(long, env = "NODEWARD_SOURCE_STALE_AFTER", default_value_t = HumanDuration(defaults::SOURCE_STALE_AFTER))]
    pub(crate) source_stale_after: HumanDuration,

    /// Per-direction relay buffer, bytes (1 KiB to 4 MiB).
    #[arg(long, env = "NODEWARD_BUFFER_SIZE", default_value_t = defaults::BUFFER_SIZE)]
    pub(crate) buffer_size: u32,

    /// Log format.
    #[arg(long, env = "NODEWARD_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    pub(crate) log_format: LogFormat,

    /// Have the eBPF programs record their rare decisions (fail-closed
    /// drops, missing or failed map entries, failed probe-source binds) and
    /// log them under the target `nodeward::ebpf`. Off: the programs carry
    /// no logging code once verified.
    #[arg(long, env = "NODEWARD_EBPF_LOG")]
    pub(crate) ebpf_log: bool,

    /// Join each pod-local leg (app ↔ agent on the pod's loopback) with a
    /// sock hash and `sk_msg`, so its bytes go socket to socket without the
    /// loopback TCP stack. Off by default: see ARCHITECTURE.md, "The
    /// pod-local leg without TCP", for what it measured and what it costs
    /// (an eBPF program per `sendmsg()` on those legs, and no receive-window
    /// bound on them).
    #[arg(long, env = "NODEWARD_LOCAL_REDIRECT")]
    pub(crate) local_redirect: bool,

    /// Istio root namespace: policies there apply mesh-wide.
    #[arg(long, env = "NODEWARD_ROOT_NAMESPACE", default_value = defaults::ROOT_NAMESPACE)]
    pub(crate) root_namespace: String,

    /// Trust domain of this cluster's SPIFFE identities.
    #[arg(long, env = "NODEWARD_TRUST_DOMAIN", default_value = defaults::TRUST_DOMAIN)]
    pub(crate) trust_domain: String,

    /// Other trust domains that policies treat as this one (comma-separated),
    /// as Istio's trust domain aliases: a principal written with one of them
    /// or with `cluster.local` matches peers of any.
    #[arg(long, env = "NODEWARD_TRUST_DOMAIN_ALIASES", value_delimiter = ',')]
    pub(crate) trust_domain_aliases: Vec<String>,

    /// CA directory (Istio plug-in CA files: ca-cert.pem, ca-key.pem, root-cert.pem, cert-chain.pem);
    /// without it the agent issues no identities.
    #[arg(long, env = "NODEWARD_CA_DIR")]
    pub(crate) ca_dir: Option<PathBuf>,

    /// CA service speaking Istio's CA protocol, `https://HOST:PORT`
    /// (`nodeward ca serve`, istiod): keys stay on the node, only CSRs
    /// leave; exclusive with --ca-dir. Several, comma-separated, are
    /// tried in turn (replicas without a Service in front), as are the
    /// addresses a name resolves to.
    #[arg(long, env = "NODEWARD_CA_ADDRESS")]
    pub(crate) ca_address: Option<String>,

    /// Roots (PEM) the CA service's TLS certificate and the issued chains must reach.
    #[arg(long, env = "NODEWARD_CA_ROOT")]
    pub(crate) ca_root: Option<PathBuf>,

    /// The agent's ServiceAccount token for the CA service (audience
    /// istio-ca), re-read for every request.
    #[arg(long, env = "NODEWARD_CA_TOKEN")]
    pub(crate) ca_token: Option<PathBuf>,

    /// Cluster ID sent to the CA service (Istio's `ClusterID` metadata).
    #[arg(long, env = "NODEWARD_CLUSTER_ID", default_value = defaults::CLUSTER_ID)]
    pub(crate) cluster_id: String,

    /// Lifetime of workload certificates; renewed around half of it.
    #[arg(long, env = "NODEWARD_CERT_LIFETIME", default_value_t = HumanDuration(defaults::CERT_LIFETIME))]
    pub(crate) cert_lifetime: HumanDuration,

    /// CRL files (PEM or DER), watched; repeat the flag or separate with commas.
    #[arg(long, env = "NODEWARD_CRL", value_delimiter = ',')]
    pub(crate) crl: Vec<PathBuf>,

    /// File of denied identities: one SPIFFE ID or `ns/<namespace>/*` per line, watched.
    #[arg(long, env = "NODEWARD_DENY_IDENTITIES")]
    pub(crate) deny_identities: Option<PathBuf>,

    /// Certificates no CRL speaks for.
    #[arg(long, env = "NODEWARD_REVOCATION_UNKNOWN", value_enum, default_value_t = RevocationUnknown::Accept)]
    pub(crate) revocation_unknown: RevocationUnknown,

    /// HTTP/2 stream window of tunnels, bytes (bounds memory per stream).
    #[arg(long, env = "NODEWARD_H2_STREAM_WINDOW", default_value_t = defaults::H2_STREAM_WINDOW)]
    pub(crate) h2_stream_window: u32,

    /// HTTP/2 connection window of tunnels, bytes.
    #[arg(long, env = "NODEWARD_H2_CONNECTION_WINDOW", default_value_t = defaults::H2_CONNECTION_WINDOW)]
    pub(crate) h2_connection_window: u32,

    /// Largest HTTP/2 frame of tunnels, bytes.
    #[arg(long, env = "NODEWARD_H2_FRAME_SIZE", default_value_t = defaults::H2_FRAME_SIZE)]
    pub(crate) h2_frame_size: u32,

    /// Streams per tunnel connection; the pool opens another when full.
    #[arg(long, env = "NODEWARD_TUNNEL_MAX_STREAMS", default_value_t = defaults::TUNNEL_MAX_STREAMS)]
    pub(crate) tunnel_max_streams: u32,

    /// Tunnel connections per destination over which concurrent streams are
    /// spread, since each connection's TLS runs on one core at each end
    /// [default: one per worker thread, at most 4].
    #[arg(long, env = "NODEWARD_TUNNEL_CONNECTIONS")]
    pub(crate) tunnel_connections: Option<u16>,

    /// Close tunnel connections, inbound and outbound, with no open stream
    /// for this long (inbound: GOAWAY).
    #[arg(long, env = "NODEWARD_TUNNEL_IDLE_TIMEOUT", default_value_t = HumanDuration(defaults::TUNNEL_IDLE_TIMEOUT))]
    pub(crate) tunnel_idle_timeout: HumanDuration,

    /// HTTP/2 PING on every tunnel connection this often; a peer that does
    /// not answer within as long again is closed as dead.
    #[arg(long, env = "NODEWARD_TUNNEL_KEEPALIVE", default_value_t = HumanDuration(defaults::TUNNEL_KEEPALIVE))]
    pub(crate) tunnel_keepalive: HumanDuration,

    /// One deadline for an inbound tunnel connection from accept through
    /// its TLS and HTTP/2 handshakes to its first stream (and for an
    /// outbound one's connect and handshakes).
    #[arg(long, env = "NODEWARD_HANDSHAKE_TIMEOUT", default_value_t = HumanDuration(defaults::HANDSHAKE_TIMEOUT))]
    pub(crate) handshake_timeout: HumanDuration,

    /// Threads of the proxy runtime [default: one per CPU].
    #[arg(long, env = "NODEWARD_WORKER_THREADS")]
    pub(crate) worker_threads: Option<u16>,

    /// Admin address (`/config_dump`, `/certs`, `/logging`): must be a
    /// loopback address, as it shows the node's whole configuration.
    #[arg(long, env = "NODEWARD_ADMIN_ADDR", default_value = defaults::ADMIN_ADDR)]
    pub(crate) admin_addr: std::net::SocketAddr,

    /// Metrics address (`/metrics`, `/stats/prometheus`).
    #[arg(long, env = "NODEWARD_METRICS_ADDR", default_value = defaults::METRICS_ADDR)]
    pub(crate) metrics_addr: std::net::SocketAddr,

    /// Readiness address (`/healthz/ready`).
    #[arg(long, env = "NODEWARD_READINESS_ADDR", default_value = defaults::READINESS_ADDR)]
    pub(crate) readiness_addr: std::net::SocketAddr,

    /// Unix socket (mode 0600) where `nodeward-cni` hands new pods over, so
    /// each is captured before it starts; without it new pods are found by
    /// scanning for their IPs.
    #[arg(long, env = "NODEWARD_CNI_SOCKET")]
    pub cni_socket: Option<PathBuf>,

    // Resource bounds (see ARCHITECTURE.md "Resource bounds" for the sizing).
    /// Proxied connections on the node (outbound, inbound plaintext and
    /// tunnel streams together); past it new ones are reset.
    #[arg(long, env = "NODEWARD_MAX_CONNECTIONS", default_value_t = defaults::MAX_CONNECTIONS)]
    pub(crate) max_connections: u32,

    /// Proxied connections of one pod, per direction (outbound; inbound
    /// plaintext and tunnel streams), so one pod cannot take them all.
    #[arg(long, env = "NODEWARD_MAX_CONNECTIONS_PER_POD", default_value_t = defaults::MAX_CONNECTIONS_PER_POD)]
    pub(crate) max_connections_per_pod: u32,

    /// Inbound tunnel connections on the node (15008 of every pod),
    /// handshakes included.
    #[arg(long, env = "NODEWARD_MAX_INBOUND_TUNNELS", default_value_t = defaults::MAX_INBOUND_TUNNELS)]
    pub(crate) max_inbound_tunnels: u32,

    /// Outbound (pooled) tunnel connections on the node.
    #[arg(long, env = "NODEWARD_MAX_OUTBOUND_TUNNELS", default_value_t = defaults::MAX_OUTBOUND_TUNNELS)]
    pub(crate) max_outbound_tunnels: u32,

    /// Removed: one node-wide bound let peers' tunnels starve the pods'
    /// own. Refused at start, naming its replacements.
    #[arg(long, env = "NODEWARD_MAX_TUNNELS", hide = true)]
    pub(crate) max_tunnels: Option<u32>,

    /// Inbound tunnel connections from one remote peer (an IPv4 address or
    /// an IPv6 /64), handshakes included.
    #[arg(long, env = "NODEWARD_MAX_TUNNELS_PER_PEER", default_value_t = defaults::MAX_TUNNELS_PER_PEER)]
    pub(crate) max_tunnels_per_peer: u32,

    /// Outbound tunnel connections of one pod (at the bound, streams share
    /// the connections it has).
    #[arg(long, env = "NODEWARD_MAX_TUNNELS_PER_POD", default_value_t = defaults::MAX_TUNNELS_PER_POD)]
    pub(crate) max_tunnels_per_pod: u32,

    /// Inbound connections on 15008 still in their TLS/HTTP/2 handshakes;
    /// past it new ones are closed before TLS.
    #[arg(long, env = "NODEWARD_MAX_HANDSHAKES", default_value_t = defaults::MAX_HANDSHAKES)]
    pub(crate) max_handshakes: u32,

    /// Such handshakes from one remote peer (IPv4 address or IPv6 /64).
    #[arg(long, env = "NODEWARD_MAX_HANDSHAKES_PER_PEER", default_value_t = defaults::MAX_HANDSHAKES_PER_PEER)]
    pub(crate) max_handshakes_per_peer: u32,

    /// What connections to destinations outside the mesh may carry, for
    /// pods whose `nodeward.io/egress` annotation (pod or namespace) does
    /// not say: `passthrough` (anything) or `tls-only` (a TLS ClientHello
    /// first, unless allow-listed).
    #[arg(long, env = "NODEWARD_EGRESS_DEFAULT", value_enum, default_value_t = EgressMode::Passthrough)]
    pub(crate) egress_default: EgressMode,

    /// Destinations outside the mesh every pod may reach even in plaintext
    /// under `tls-only`: `CIDR[:PORT],...` (e.g. `10.0.0.0/8,192.0.2.1:25`).
    #[arg(long, env = "NODEWARD_EGRESS_ALLOW", value_delimiter = ',')]
    pub(crate) egress_allow: Vec<String>,
}

/// `--source`: where the cluster's objects come from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub(crate) enum SourceKind {
    /// A directory of Kubernetes YAML (`--config-dir`): the demo, the test
    /// bed, and nodes without API access.
    Dir,
    /// The Kubernetes API: watches pods, namespaces, Services, EndpointSlices and Istio policies.
    Kube,
}

/// `--log-format`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line, fields flattened, for log collectors.
    Json,
}

/// `--revocation-unknown`: what to do with a certificate whose issuer has
/// published no CRL.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub(crate) enum RevocationUnknown {
    /// Accept it (the default: CRLs are optional).
    Accept,
    /// Refuse it: only issuers with a CRL are trusted.
    Refuse,
}

/// A duration flag: parsed from `250ms`, `30s`, `5m`, `1h` or bare seconds,
/// and shown the same way in `--help`, so each default is written once as
/// a [`Duration`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HumanDuration(pub Duration);

impl FromStr for HumanDuration {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        parse_duration(s).map(HumanDuration)
    }
}

impl fmt::Display for HumanDuration {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let ms = self.0.as_millis();
        match ms {
            0 => write!(f, "0s"),
            _ if ms.is_multiple_of(3_600_000) => write!(f, "{}h", ms / 3_600_000),
            _ if ms.is_multiple_of(60_000) => write!(f, "{}m", ms / 60_000),
            _ if ms.is_multiple_of(1000) => write!(f, "{}s", ms / 1000),
            _ => write!(f, "{ms}ms"),
        }
    }
}

/// `nodeward cleanup` flags.
#[derive(Debug, Args)]
pub struct CleanupArgs {
    /// Name of the node whose pins to remove.
    #[arg(long, env = "NODEWARD_NODE_NAME")]
    pub node_name: String,

    /// bpffs mount point.
    #[arg(long, env = "NODEWARD_BPFFS", default_value = defaults::BPFFS)]
    pub bpffs: PathBuf,
}

/// Parses `30s`, `250ms`, `5m`, `1h` or a bare number of seconds.
pub(crate) fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let n: u64 = num
        .parse()
        .map_err(|_| format!("{s:?} is not a duration (expected e.g. 250ms, 30s, 5m, 1h)"))?;
    let secs = |per: u64| {
        n.checked_mul(per)
            .map(Duration::from_secs)
            .ok_or_else(|| format!("{s:?} is too long"))
    };
    match unit {
        "ms" => Ok(Duration::from_millis(n)),
        "" | "s" => secs(1),
        "m" => secs(60),
        "h" => secs(3600),
        _ => Err(format!("{s:?}: unknown unit {unit:?} (use ms, s, m or h)")),
    }
}

/// Parses a socket mark in decimal or `0x` hex (zero is refused by
/// [`Config::from_args`]).
pub(crate) fn parse_mark(s: &str) -> Result<u32, String> {
    match s.strip_prefix("0x").or_else(|| s.strip_prefix("0X")) {
        Some(hex) => u32::from_str_radix(hex, 16),
        None => s.parse(),
    }
    .map_err(|_| format!("{s:?} is not a 32-bit number"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(parse_duration("30s"), Ok(Duration::from_secs(30)));
        assert_eq!(parse_duration("7"), Ok(Duration::from_secs(7)));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
        assert!(parse_duration("soon").is_err());
        assert!(parse_duration("5d").is_err());
        assert!(parse_duration("99999999999999999999h").is_err());
        assert!(parse_duration("9999999999999999999h").is_err());
    }

    #[test]
    fn durations_are_shown_as_they_are_written() {
        for s in ["250ms", "30s", "1h", "5m", "0s", "1500ms", "90s"] {
            assert_eq!(s.parse::<HumanDuration>().unwrap().to_string(), s);
        }
    }

    #[test]
    fn marks() {
        assert_eq!(parse_mark("0x4e57"), Ok(0x4e57));
        assert_eq!(parse_mark("1337"), Ok(1337));
        assert!(parse_mark("x").is_err());
    }

    #[test]
    fn trust_domain_aliases_are_comma_separated() {
        let cli = Cli::try_parse_from([
            "nodeward",
            "run",
            "--node-name=n",
            "--config-dir=d",
            "--trust-domain-aliases=old.org,older.org",
        ])
        .unwrap();
        let Command::Run(args) = cli.command else {
            panic!("run expected")
        };
        assert_eq!(args.trust_domain_aliases, vec!["old.org", "older.org"]);
    }

    #[test]
    fn stringly_flags_only_take_their_values() {
        let parse =
            |flag: &str, v: &str| Cli::try_parse_from(["nodeward", "run", "--node-name=n", "--config-dir=d", flag, v]);
        assert!(parse("--log-format", "json").is_ok());
        assert!(parse("--log-format", "xml").is_err());
        assert!(parse("--revocation-unknown", "refuse").is_ok());
        assert!(parse("--revocation-unknown", "maybe").is_err());
    }

    #[test]
    fn every_flag_has_an_environment_variable() {
        let cmd = Cli::command();
        for sub in cmd.get_subcommands() {
            for arg in sub.get_arguments() {
                if arg.get_id() == "help" || arg.get_id() == "version" {
                    continue;
                }
                assert!(
                    arg.get_env().is_some(),
                    "{} --{} has no environment variable",
                    sub.get_name(),
                    arg.get_id()
                );
            }
        }
    }

    /// Problems name a flag's variable by rule; the rule must hold.
    #[test]
    fn every_run_flags_variable_is_named_after_it() {
        let cmd = Cli::command();
        let run = cmd.find_subcommand("run").unwrap();
        for arg in run.get_arguments() {
            let Some(long) = arg.get_long() else { continue };
            if long == "help" {
                continue;
            }
            assert_eq!(
                arg.get_env().and_then(|e| e.to_str()),
                Some(check::env_of(long).as_str()),
                "--{long}"
            );
        }
    }
}
