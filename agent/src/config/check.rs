//! [`RunArgs`] → [`Config`]: every flag checked against its range, the
//! others and the filesystem, all problems collected before any is
//! returned, so one failed start names everything to fix.

#![forbid(unsafe_code)]

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use super::{HumanDuration, LogFormat, RevocationUnknown, RunArgs, SourceKind, defaults};
use crate::capture::CaptureConfig;
use crate::identity::ca::{CA_CERT, CA_KEY, ROOT_CERT};
use crate::identity::ca_client::{CaClientConfig, parse_addresses};
use crate::identity::manager::{CaSource, IdentityConfig};
use crate::identity::trust::UnknownStatus;
use crate::proxy::ProxyConfig;
use crate::proxy::egress::EgressConfig;
use crate::proxy::hbone::H2Settings;
use crate::proxy::limits::LimitConfig;
use crate::proxy::relay::RelayOptions;
use crate::state::workload::parse_allow_list;

/// Everything `nodeward run` is wired from, checked as a whole.
#[derive(Clone, Debug)]
pub struct Config {
    /// This node's name: pods with this `spec.nodeName` are managed.
    pub(crate) node_name: String,
    /// Where the cluster's objects come from.
    pub(crate) source: SourceConfig,
    /// How often the config directory, CA files, CRLs and deny list are polled.
    pub(crate) config_poll: Duration,
    /// How long a kind's watch may fail before readiness does (`kube` source).
    pub(crate) source_stale_after: Duration,
    /// Istio root namespace (mesh-wide policies).
    pub(crate) root_namespace: String,
    /// Local trust domain.
    pub(crate) trust_domain: String,
    /// Trust domains policies treat as local.
    pub(crate) trust_domain_aliases: Vec<String>,
    /// Where and how capture attaches.
    pub(crate) capture: CaptureConfig,
    /// Settings of every proxied connection.
    pub(crate) proxy: ProxyConfig,
    /// Identities, when a CA directory is given.
    pub(crate) identity: Option<IdentityConfig>,
    /// HTTP/2 settings of tunnel connections.
    pub(crate) h2: H2Settings,
    /// Pooled tunnel connections unused this long are closed.
    pub(crate) tunnel_idle_timeout: Duration,
    /// Tunnel connections per destination that streams are spread over.
    pub(crate) tunnel_connections: usize,
    /// Threads of the proxy runtime; `None`: one per CPU.
    pub worker_threads: Option<usize>,
    /// Resource bounds.
    pub(crate) limits: LimitConfig,
    /// Admin address (`/config_dump`, `/certs`, `/logging`), loopback only.
    pub(crate) admin_addr: SocketAddr,
    /// Metrics address.
    pub(crate) metrics_addr: SocketAddr,
    /// Readiness address.
    pub(crate) readiness_addr: SocketAddr,
    /// Where the CNI plugin hands new pods over, if anywhere.
    pub(crate) cni_socket: Option<PathBuf>,
    /// How long SIGTERM waits for open connections.
    pub(crate) drain_timeout: Duration,
    /// Log line format.
    pub log_format: LogFormat,
}

/// Where the agent reads the cluster's objects from (`--source`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum SourceConfig {
    /// A directory of Kubernetes YAML, polled.
    Dir(PathBuf),
    /// The Kubernetes API.
    Kube {
        /// kubeconfig file (development); `None`: in-cluster settings,
        /// else the local kubeconfig.
        kubeconfig: Option<PathBuf>,
    },
}

/// One problem with the flags. Each names its flag and that flag's
/// environment variable, since either may have set it.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub(crate) enum Problem {
    /// A number outside what the flag allows.
    #[error("{} = {value}: must be within {min}..={max}", named(.flag))]
    OutOfRange {
        /// The flag, without `--`.
        flag: &'static str,
        /// Its value.
        value: u64,
        /// Smallest allowed.
        min: u64,
        /// Largest allowed.
        max: u64,
    },
    /// A value larger than another flag's that bounds it.
    #[error("{} = {value} is larger than {} = {bound_value}: {why}", named(.flag), named(.bound))]
    Exceeds {
        /// The flag, without `--`.
        flag: &'static str,
        /// Its value.
        value: u64,
        /// The flag that bounds it.
        bound: &'static str,
        /// That flag's value.
        bound_value: u64,
        /// Why the one bounds the other.
        why: &'static str,
    },
    /// A duration of zero, where zero means nothing useful.
    #[error("{} = 0: {why}", named(.flag))]
    Zero {
        /// The flag, without `--`.
        flag: &'static str,
        /// What zero would do.
        why: &'static str,
    },
    /// A duration so long that deadlines computed from it could overflow.
    #[error("{} = {value}: longer than {max}", named(.flag))]
    TooLong {
        /// The flag, without `--`.
        flag: &'static str,
        /// Its value.
        value: HumanDuration,
        /// The longest allowed.
        max: HumanDuration,
    },
    /// An empty name.
    #[error("{} is empty", named(.flag))]
    Empty {
        /// The flag, without `--`.
        flag: &'static str,
    },
    /// A path that is missing or of the wrong kind.
    #[error("{} {}: {problem}", named(.flag), .path.display())]
    Path {
        /// The flag, without `--`.
        flag: &'static str,
        /// The path.
        path: PathBuf,
        /// What is wrong with it.
        problem: String,
    },
    /// A flag another flag's value requires.
    #[error("{} is required with {}: {why}", named(.flag), named(.by))]
    Required {
        /// The missing flag, without `--`.
        flag: &'static str,
        /// The flag (and value) that requires it.
        by: &'static str,
        /// Why.
        why: &'static str,
    },
    /// A flag that another flag's value makes meaningless.
    #[error("{} is given with {}: {why}", named(.flag), named(.other))]
    Contradicts {
        /// The flag given, without `--`.
        flag: &'static str,
        /// The flag it contradicts.
        other: &'static str,
        /// Why they do not go together.
        why: &'static str,
    },
    /// An address that must stay on the node's loopback.
    #[error("{} = {addr}: must be a loopback address (it shows the node's configuration and changes its log level)", named(.flag))]
    NotLoopback {
        /// The flag, without `--`.
        flag: &'static str,
        /// The address given.
        addr: SocketAddr,
    },
    /// Two listeners given the same address.
    #[error("{} = {addr} is also {}: each listener needs its own address", named(.flag), named(.other))]
    SameAddress {
        /// The flag, without `--`.
        flag: &'static str,
        /// The flag it collides with.
        other: &'static str,
        /// The address.
        addr: SocketAddr,
    },
    /// A flag that only means something with `--ca-dir` or `--ca-address`.
    #[error("{} is given without {} or {}: without a CA there are no identities to check", named(.flag), named("ca-dir"), named("ca-address"))]
    NeedsCaDir {
        /// The flag, without `--`.
        flag: &'static str,
    },
    /// Two flags that exclude each other.
    #[error("{} and {} are exclusive: {why}", named(.flag), named(.other))]
    Conflict {
        /// The flag, without `--`.
        flag: &'static str,
        /// The other flag.
        other: &'static str,
        /// Why.
        why: &'static str,
    },
    /// A flag that needs another.
    #[error("{} needs {}", named(.flag), named(.needs))]
    Requires {
        /// The flag, without `--`.
        flag: &'static str,
        /// The flag it needs.
        needs: &'static str,
    },
    /// A value of the wrong shape.
    #[error("{}: {problem}", named(.flag))]
    Invalid {
        /// The flag, without `--`.
        flag: &'static str,
        /// What is wrong.
        problem: String,
    },
}

impl Problem {
    /// The flag the problem is about, without `--`.
    #[cfg(test)]
    pub(crate) fn flag(&self) -> &'static str {
        match self {
            Problem::OutOfRange { flag, .. }
            | Problem::Exceeds { flag, .. }
            | Problem::Zero { flag, .. }
            | Problem::TooLong { flag, .. }
            | Problem::Empty { flag }
            | Problem::Path { flag, .. }
            | Problem::NeedsCaDir { flag }
            | Problem::Conflict { flag, .. }
            | Problem::Requires { flag, .. }
            | Problem::Invalid { flag, .. }
            | Problem::Required { flag, .. }
            | Problem::Contradicts { flag, .. }
            | Problem::NotLoopback { flag, .. }
            | Problem::SameAddress { flag, .. } => flag,
        }
    }
}

/// Every problem found with the flags of `nodeward run`.
#[derive(Debug, thiserror::Error)]
#[error("invalid flags:\n  {}", .0.iter().map(|p| p.to_string()).collect::<Vec<_>>().join("\n  "))]
pub struct ConfigErrors(pub(crate) Vec<Problem>);

/// The environment variable of a `run` flag (a unit test holds clap's
/// `env = ...` attributes to this rule).
pub(super) fn env_of(flag: &str) -> String {
    format!("NODEWARD_{}", flag.to_ascii_uppercase().replace('-', "_"))
}

fn named(name: &str) -> String {
    format!("--{name} ({})", env_of(name))
}

/// The checks, each pushing what it finds.
#[derive(Default)]
struct Checks(Vec<Problem>);

impl Checks {
    fn range(&mut self, flag: &'static str, value: u64, min: u64, max: u64) {
        if !(min..=max).contains(&value) {
            self.0.push(Problem::OutOfRange { flag, value, min, max });
        }
    }

    fn at_most(&mut self, part: (&'static str, u32), whole: (&'static str, u32), why: &'static str) {
        if part.1 > whole.1 {
            self.0.push(Problem::Exceeds {
                flag: part.0,
                value: part.1.into(),
                bound: whole.0,
                bound_value: whole.1.into(),
                why,
            });
        }
    }

    fn non_zero(&mut self, flag: &'static str, d: HumanDuration, why: &'static str) -> Duration {
        if d.0.is_zero() {
            self.0.push(Problem::Zero { flag, why });
        }
        self.not_too_long(flag, d)
    }

    fn not_too_long(&mut self, flag: &'static str, d: HumanDuration) -> Duration {
        if d.0 > MAX_DURATION {
            self.0.push(Problem::TooLong {
                flag,
                value: d,
                max: HumanDuration(MAX_DURATION),
            });
        }
        d.0
    }

    fn non_empty(&mut self, flag: &'static str, s: &str) {
        if s.trim().is_empty() {
            self.0.push(Problem::Empty { flag });
        }
    }

    /// `--source` with `--config-dir` and `--kubeconfig`: each source
    /// takes only its own flag.
    fn source(&mut self, a: &RunArgs, in_cluster: bool) -> SourceConfig {
        let kind = a.source.unwrap_or(if in_cluster && a.config_dir.is_none() {
            SourceKind::Kube
        } else {
            SourceKind::Dir
        });
        match kind {
            SourceKind::Dir => {
                if a.kubeconfig.is_some() {
                    self.0.push(Problem::Contradicts {
                        flag: "kubeconfig",
                        other: "source",
                        why: "the dir source does not read the Kubernetes API (use --source kube)",
                    });
                }
                match &a.config_dir {
                    Some(dir) => {
                        self.dir("config-dir", dir);
                        SourceConfig::Dir(dir.clone())
                    }
                    None => {
                        self.0.push(Problem::Required {
                            flag: "config-dir",
                            by: "source",
                            why: "the dir source (the default outside a cluster) reads the cluster from it",
                        });
                        SourceConfig::Dir(PathBuf::new())
                    }
                }
            }
            SourceKind::Kube => {
                if a.config_dir.is_some() {
                    self.0.push(Problem::Contradicts {
                        flag: "config-dir",
                        other: "source",
                        why: "the kube source reads the Kubernetes API, not a directory",
                    });
                }
                if let Some(k) = &a.kubeconfig {
                    self.file("kubeconfig", k);
                }
                SourceConfig::Kube {
                    kubeconfig: a.kubeconfig.clone(),
                }
            }
        }
    }

    fn dir(&mut self, flag: &'static str, path: &Path) -> bool {
        self.kind(flag, path, true)
    }

    fn file(&mut self, flag: &'static str, path: &Path) -> bool {
        self.kind(flag, path, false)
    }

    fn kind(&mut self, flag: &'static str, path: &Path, dir: bool) -> bool {
        let problem = match std::fs::metadata(path) {
            Ok(m) if m.is_dir() == dir => return true,
            Ok(_) if dir => "not a directory".to_string(),
            Ok(_) => "not a file".to_string(),
            Err(e) => e.to_string(),
        };
        self.0.push(Problem::Path {
            flag,
            path: path.to_path_buf(),
            problem,
        });
        false
    }
}

/// Longest duration flag: ten years (87,600 h), far beyond any sensible
/// setting, and far from where adding it to a clock could overflow.
const MAX_DURATION: Duration = Duration::from_secs(10 * 365 * 24 * 3600);

/// h2's bounds (RFC 9113 §6.5.2): frames of 16 KiB to 16 MiB - 1.
const H2_MIN_FRAME: u64 = 16_384;
const H2_MAX_FRAME: u64 = (1 << 24) - 1;
/// The smallest window HTTP/2 starts with; below it a peer is slower than the protocol's default.
const H2_MIN_WINDOW: u64 = 65_535;
/// Largest stream window: 1 GiB per stream is already far more than any
/// flow needs (h2 itself allows 2^31 - 1, as for the connection window).
const H2_MAX_STREAM_WINDOW: u64 = 1 << 30;
const H2_MAX_WINDOW: u64 = (1 << 31) - 1;

impl Config {
    /// Checks every flag and builds the config, or returns every problem.
    /// `--source` defaults to `kube` inside a cluster (KUBERNETES_SERVICE_HOST
    /// set) unless `--config-dir` is given.
    pub fn from_args(a: RunArgs) -> Result<Config, ConfigErrors> {
        let in_cluster = std::env::var_os("KUBERNETES_SERVICE_HOST").is_some_and(|v| !v.is_empty());
        Self::from_args_in(a, in_cluster)
    }

    /// [`Config::from_args`], told whether the agent runs in a cluster.
    fn from_args_in(a: RunArgs, in_cluster: bool) -> Result<Config, ConfigErrors> {
        let mut c = Checks::default();
        c.non_empty("node-name", &a.node_name);
        c.non_empty("trust-domain", &a.trust_domain);
        c.non_empty("root-namespace", &a.root_namespace);
        let source = c.source(&a, in_cluster);
        if let Some(cg) = &a.cgroup2 {
            c.dir("cgroup2", cg);
        }
        if let Some(path) = a.cni_socket.as_ref().filter(|p| !p.is_absolute()) {
            c.0.push(Problem::Path {
                flag: "cni-socket",
                path: path.clone(),
                problem: "must be absolute (the plugin's agentSocket names the same file)".into(),
            });
        }
        if !a.admin_addr.ip().is_loopback() {
            c.0.push(Problem::NotLoopback {
                flag: "admin-addr",
                addr: a.admin_addr,
            });
        }
        let listeners = [
            ("admin-addr", a.admin_addr),
            ("metrics-addr", a.metrics_addr),
            ("readiness-addr", a.readiness_addr),
        ];
        for (i, (flag, addr)) in listeners.iter().enumerate() {
            if let Some((other, _)) = listeners[..i].iter().find(|(_, o)| o == addr) {
                c.0.push(Problem::SameAddress {
                    flag,
                    other,
                    addr: *addr,
                });
            }
        }
        if a.socket_mark == 0 {
            c.range("socket-mark", 0, 1, u32::MAX.into());
        }

        let drain = c.not_too_long("drain-timeout", a.drain_timeout);
        let idle = c.non_zero("idle-timeout", a.idle_timeout, "every connection would close at once");
        let connect = c.non_zero("connect-timeout", a.connect_timeout, "no connection could be made");
        let poll = c.non_zero(
            "config-poll",
            a.config_poll,
            "the directory would be read in a busy loop",
        );
        let stale_after = c.non_zero(
            "source-stale-after",
            a.source_stale_after,
            "any watch error would fail readiness",
        );
        let lifetime = c.non_zero("cert-lifetime", a.cert_lifetime, "certificates would expire as issued");
        let tunnel_idle = c.non_zero(
            "tunnel-idle-timeout",
            a.tunnel_idle_timeout,
            "tunnel connections would close as they are opened",
        );
        let handshake = c.non_zero("handshake-timeout", a.handshake_timeout, "no peer could ever connect");
        let keepalive = c.non_zero(
            "tunnel-keepalive",
            a.tunnel_keepalive,
            "every tunnel would be pinged in a busy loop",
        );
        if a.max_tunnels.is_some() {
            c.0.push(Problem::Invalid {
                flag: "max-tunnels",
                problem: "removed: inbound and outbound tunnels have bounds of their own now, \
                          --max-inbound-tunnels (NODEWARD_MAX_INBOUND_TUNNELS) and \
                          --max-outbound-tunnels (NODEWARD_MAX_OUTBOUND_TUNNELS)"
                    .into(),
            });
        }
        c.range("buffer-size", a.buffer_size.into(), 1024, 4 << 20);

        c.range(
            "h2-stream-window",
            a.h2_stream_window.into(),
            H2_MIN_WINDOW,
            H2_MAX_STREAM_WINDOW,
        );
        c.range(
            "h2-connection-window",
            a.h2_connection_window.into(),
            H2_MIN_WINDOW,
            H2_MAX_WINDOW,
        );
        c.range("h2-frame-size", a.h2_frame_size.into(), H2_MIN_FRAME, H2_MAX_FRAME);
        c.at_most(
            ("h2-stream-window", a.h2_stream_window),
            ("h2-connection-window", a.h2_connection_window),
            "one stream could never use its window",
        );
        c.at_most(
            ("h2-frame-size", a.h2_frame_size),
            ("h2-stream-window", a.h2_stream_window),
            "no frame could be that large",
        );
        c.range("tunnel-max-streams", a.tunnel_max_streams.into(), 1, 10_000);
        if let Some(n) = a.tunnel_connections {
            c.range("tunnel-connections", n.into(), 1, 64);
        }
        if let Some(n) = a.worker_threads {
            c.range("worker-threads", n.into(), 1, 256);
        }

        for (flag, v) in [
            ("max-connections", a.max_connections),
            ("max-connections-per-pod", a.max_connections_per_pod),
            ("max-inbound-tunnels", a.max_inbound_tunnels),
            ("max-outbound-tunnels", a.max_outbound_tunnels),
            ("max-tunnels-per-peer", a.max_tunnels_per_peer),
            ("max-tunnels-per-pod", a.max_tunnels_per_pod),
            ("max-handshakes", a.max_handshakes),
            ("max-handshakes-per-peer", a.max_handshakes_per_peer),
        ] {
            c.range(flag, v.into(), 1, u32::MAX.into());
        }
        let part = "a part cannot be larger than its whole";
        c.at_most(
            ("max-connections-per-pod", a.max_connections_per_pod),
            ("max-connections", a.max_connections),
            part,
        );
        c.at_most(
            ("max-tunnels-per-peer", a.max_tunnels_per_peer),
            ("max-inbound-tunnels", a.max_inbound_tunnels),
            part,
        );
        c.at_most(
            ("max-tunnels-per-pod", a.max_tunnels_per_pod),
            ("max-outbound-tunnels", a.max_outbound_tunnels),
            part,
        );
        c.at_most(
            ("max-handshakes", a.max_handshakes),
            ("max-inbound-tunnels", a.max_inbound_tunnels),
            part,
        );
        c.at_most(
            ("max-handshakes-per-peer", a.max_handshakes_per_peer),
            ("max-handshakes", a.max_handshakes),
            part,
        );
        c.at_most(
            ("max-handshakes-per-peer", a.max_handshakes_per_peer),
            ("max-tunnels-per-peer", a.max_tunnels_per_peer),
            part,
        );

        match &a.ca_dir {
            // Each missing file is named by its full path, the directory's
            // own absence included: that is the path to create.
            Some(dir) if dir.is_file() => {
                c.dir("ca-dir", dir);
            }
            Some(dir) => {
                for f in [CA_CERT, CA_KEY, ROOT_CERT] {
                    c.file("ca-dir", &dir.join(f));
                }
            }
            None if a.ca_address.is_some() => {}
            None => {
                if !a.crl.is_empty() {
                    c.0.push(Problem::NeedsCaDir { flag: "crl" });
                }
                if a.deny_identities.is_some() {
                    c.0.push(Problem::NeedsCaDir {
                        flag: "deny-identities",
                    });
                }
                if a.revocation_unknown == RevocationUnknown::Refuse {
                    c.0.push(Problem::NeedsCaDir {
                        flag: "revocation-unknown",
                    });
                }
            }
        }
        if a.ca_dir.is_some() && a.ca_address.is_some() {
            c.0.push(Problem::Conflict {
                flag: "ca-address",
                other: "ca-dir",
                why: "certificates come either from a CA service or from a CA directory on the node",
            });
        }
        match &a.ca_address {
            Some(addr) => {
                if let Err(problem) = parse_addresses(addr) {
                    c.0.push(Problem::Invalid {
                        flag: "ca-address",
                        problem,
                    });
                }
                for (flag, file) in [("ca-root", &a.ca_root), ("ca-token", &a.ca_token)] {
                    match file {
                        Some(f) => {
                            c.file(flag, f);
                        }
                        None => c.0.push(Problem::Requires {
                            flag: "ca-address",
                            needs: flag,
                        }),
                    }
                }
            }
            None => {
                for (flag, file) in [("ca-root", &a.ca_root), ("ca-token", &a.ca_token)] {
                    if file.is_some() {
                        c.0.push(Problem::Requires {
                            flag,
                            needs: "ca-address",
                        });
                    }
                }
            }
        }
        c.non_empty("cluster-id", &a.cluster_id);
        for crl in &a.crl {
            c.file("crl", crl);
        }
        if let Some(deny) = &a.deny_identities {
            c.file("deny-identities", deny);
        }

        // Egress: a bad allow-list entry stops the start rather than being
        // skipped, since the operator is there to fix it.
        let (egress_allow, bad) = parse_allow_list(&a.egress_allow.join(","));
        for e in bad {
            c.0.push(Problem::Invalid {
                flag: "egress-allow",
                problem: e.to_string(),
            });
        }

        if !c.0.is_empty() {
            return Err(ConfigErrors(c.0));
        }

        let n = |v: u32| v as usize;
        let worker_threads = a.worker_threads.map(usize::from);
        let tunnel_connections = match a.tunnel_connections {
            Some(n) => usize::from(n),
            None => worker_threads
                .or_else(|| std::thread::available_parallelism().ok().map(|n| n.get()))
                .unwrap_or(1)
                .min(defaults::TUNNEL_CONNECTIONS_MAX_AUTO),
        };
        let ca = match (a.ca_dir, a.ca_address, a.ca_root, a.ca_token) {
            (Some(dir), _, _, _) => Some(CaSource::Dir(dir)),
            (None, Some(address), Some(root_file), Some(token_file)) => Some(CaSource::Service(CaClientConfig {
                address,
                root_file,
                token_file,
                cluster_id: a.cluster_id,
                trust_domain: a.trust_domain.clone(),
                socket_mark: a.socket_mark,
            })),
            _ => None,
        };
        Ok(Config {
            identity: ca.map(|ca| IdentityConfig {
                trust_domain: a.trust_domain.clone(),
                ca,
                cert_lifetime: lifetime,
                crl_files: a.crl,
                deny_file: a.deny_identities,
                unknown_status: match a.revocation_unknown {
                    RevocationUnknown::Accept => UnknownStatus::Accept,
                    RevocationUnknown::Refuse => UnknownStatus::Refuse,
                },
            }),
            capture: CaptureConfig {
                bpffs: a.bpffs,
                node_name: a.node_name.clone(),
                cgroup2: a.cgroup2,
                socket_mark: a.socket_mark,
                ebpf_log: a.ebpf_log,
                local_redirect: a.local_redirect,
            },
            proxy: ProxyConfig {
                socket_mark: a.socket_mark,
                connect_timeout: connect,
                relay: RelayOptions {
                    idle_timeout: idle,
                    buffer_size: n(a.buffer_size),
                },
                egress: EgressConfig {
                    default: a.egress_default,
                    allow: egress_allow,
                },
            },
            h2: H2Settings {
                stream_window: a.h2_stream_window,
                connection_window: a.h2_connection_window,
                max_frame_size: a.h2_frame_size,
                max_streams: a.tunnel_max_streams,
                handshake_timeout: handshake,
                idle_timeout: tunnel_idle,
                keepalive,
                ..H2Settings::default()
            },
            limits: LimitConfig {
                connections: n(a.max_connections),
                connections_per_pod: n(a.max_connections_per_pod),
                tunnels_in: n(a.max_inbound_tunnels),
                tunnels_out: n(a.max_outbound_tunnels),
                tunnels_per_peer: n(a.max_tunnels_per_peer),
                tunnels_per_pod: n(a.max_tunnels_per_pod),
                handshakes: n(a.max_handshakes),
                handshakes_per_peer: n(a.max_handshakes_per_peer),
            },
            node_name: a.node_name,
            source,
            config_poll: poll,
            source_stale_after: stale_after,
            root_namespace: a.root_namespace,
            trust_domain: a.trust_domain,
            trust_domain_aliases: a.trust_domain_aliases,
            tunnel_idle_timeout: tunnel_idle,
            tunnel_connections,
            worker_threads,
            admin_addr: a.admin_addr,
            metrics_addr: a.metrics_addr,
            readiness_addr: a.readiness_addr,
            cni_socket: a.cni_socket,
            drain_timeout: drain,
            log_format: a.log_format,
        })
    }
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::super::{Cli, Command};
    use super::*;

    /// A scratch directory, removed when dropped.
    struct Scratch(PathBuf);

    impl Scratch {
        fn path(&self) -> &Path {
            &self.0
        }
    }

    impl Drop for Scratch {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    /// A scratch directory with a CA directory's files, a CRL and a deny list.
    fn scratch() -> Scratch {
        use std::sync::atomic::{AtomicU32, Ordering};
        static N: AtomicU32 = AtomicU32::new(0);
        let n = N.fetch_add(1, Ordering::Relaxed);
        let d = Scratch(std::env::temp_dir().join(format!("nodeward-config-{}-{n}", std::process::id())));
        let ca = d.path().join("ca");
        std::fs::create_dir_all(&ca).unwrap();
        for f in [CA_CERT, CA_KEY, ROOT_CERT, "crl.pem", "deny.txt"] {
            std::fs::write(ca.join(f), "").unwrap();
        }
        d
    }

    fn args(dir: &Path, extra: &[&str]) -> RunArgs {
        let config_dir = dir.display().to_string();
        let mut argv = vec!["nodeward", "run"];
        // The two required flags, unless the case sets them itself.
        for (flag, value) in [("--node-name", "n1"), ("--config-dir", config_dir.as_str())] {
            if !extra.contains(&flag) {
                argv.extend([flag, value]);
            }
        }
        argv.extend_from_slice(extra);
        match Cli::try_parse_from(argv).unwrap().command {
            Command::Run(a) => *a,
            _ => unreachable!(),
        }
    }

    fn problems(dir: &Path, extra: &[&str]) -> Vec<Problem> {
        match Config::from_args(args(dir, extra)) {
            Ok(_) => Vec::new(),
            Err(ConfigErrors(p)) => p,
        }
    }

    #[test]
    fn the_defaults_are_a_valid_config() {
        let d = scratch();
        let c = Config::from_args(args(d.path(), &[])).unwrap();
        assert_eq!(c.limits.connections, 16384);
        assert_eq!(c.limits.handshakes_per_peer, 64);
        assert_eq!(c.config_poll, defaults::CONFIG_POLL);
        assert_eq!(c.h2.stream_window, H2Settings::default().stream_window);
        assert_eq!(c.h2.handshake_timeout, H2Settings::default().handshake_timeout);
        assert_eq!(c.log_format, LogFormat::Text);
        assert!(c.identity.is_none());
        assert!((1..=defaults::TUNNEL_CONNECTIONS_MAX_AUTO).contains(&c.tunnel_connections));
    }

    #[test]
    fn a_full_identity_setup_is_valid() {
        let d = scratch();
        let ca = d.path().join("ca");
        let ca_s = ca.display().to_string();
        let crl = ca.join("crl.pem").display().to_string();
        let deny = ca.join("deny.txt").display().to_string();
        let c = Config::from_args(args(
            d.path(),
            &[
                "--ca-dir",
                &ca_s,
                "--crl",
                &crl,
                "--deny-identities",
                &deny,
                "--revocation-unknown",
                "refuse",
                "--log-format",
                "json",
                "--worker-threads",
                "3",
            ],
        ))
        .unwrap();
        let id = c.identity.unwrap();
        assert_eq!(id.unknown_status, UnknownStatus::Refuse);
        assert_eq!(id.crl_files.len(), 1);
        assert_eq!(c.log_format, LogFormat::Json);
        assert_eq!(c.tunnel_connections, 3);
    }

    #[test]
    fn the_admin_api_stays_on_loopback_and_listeners_do_not_collide() {
        let d = scratch();
        let p = problems(d.path(), &["--admin-addr", "0.0.0.0:15000"]);
        assert_eq!(
            p,
            vec![Problem::NotLoopback {
                flag: "admin-addr",
                addr: "0.0.0.0:15000".parse().unwrap()
            }]
        );
        assert!(p[0].to_string().contains("NODEWARD_ADMIN_ADDR"), "{}", p[0]);
        let p = problems(d.path(), &["--metrics-addr", "0.0.0.0:15021"]);
        assert_eq!(p.len(), 1, "{p:?}");
        assert!(matches!(
            p[0],
            Problem::SameAddress {
                flag: "readiness-addr",
                other: "metrics-addr",
                ..
            }
        ));
        let c = Config::from_args(args(d.path(), &[])).unwrap();
        assert_eq!(c.admin_addr, "127.0.0.1:15000".parse().unwrap());
        assert_eq!(c.metrics_addr, "0.0.0.0:15020".parse().unwrap());
        assert_eq!(c.readiness_addr, "0.0.0.0:15021".parse().unwrap());
    }

    /// Each bad setting alone is reported, naming its flag and variable.
    #[test]
    fn each_bad_flag_is_named_with_its_variable() {
        let d = scratch();
        let missing = d.path().join("missing").display().to_string();
        let file = d.path().join("ca").join(CA_CERT).display().to_string();
        let empty_dir = d.path().display().to_string();
        let ca_dir = d.path().join("ca").display().to_string();
        let table: &[(&[&str], &str)] = &[
            (&["--node-name", " "], "node-name"),
            (&["--trust-domain", ""], "trust-domain"),
            (&["--root-namespace", ""], "root-namespace"),
            (&["--config-dir", &missing], "config-dir"),
            (&["--config-dir", &file], "config-dir"),
            (&["--cgroup2", &missing], "cgroup2"),
            (&["--socket-mark", "0"], "socket-mark"),
            (&["--cni-socket", "cni.sock"], "cni-socket"),
            (&["--idle-timeout", "0s"], "idle-timeout"),
            (&["--connect-timeout", "0ms"], "connect-timeout"),
            (&["--config-poll", "0"], "config-poll"),
            (&["--cert-lifetime", "0h"], "cert-lifetime"),
            (&["--tunnel-idle-timeout", "0s"], "tunnel-idle-timeout"),
            (&["--handshake-timeout", "0s"], "handshake-timeout"),
            (&["--drain-timeout", "87601h"], "drain-timeout"),
            (&["--cert-lifetime", "100000000000s"], "cert-lifetime"),
            (&["--buffer-size", "512"], "buffer-size"),
            (&["--h2-frame-size", "16383"], "h2-frame-size"),
            (&["--h2-frame-size", "16777216"], "h2-frame-size"),
            (&["--h2-stream-window", "65534"], "h2-stream-window"),
            (&["--h2-connection-window", "2147483648"], "h2-connection-window"),
            (
                &["--h2-stream-window", "8388608", "--h2-connection-window", "4194304"],
                "h2-stream-window",
            ),
            (
                &["--h2-frame-size", "2097152", "--h2-stream-window", "1048576"],
                "h2-frame-size",
            ),
            (&["--tunnel-max-streams", "0"], "tunnel-max-streams"),
            (&["--tunnel-connections", "65"], "tunnel-connections"),
            (&["--worker-threads", "0"], "worker-threads"),
            (&["--max-inbound-tunnels", "0"], "max-inbound-tunnels"),
            (&["--max-outbound-tunnels", "0"], "max-outbound-tunnels"),
            (&["--max-tunnels", "1024"], "max-tunnels"),
            (&["--tunnel-keepalive", "0s"], "tunnel-keepalive"),
            (
                &["--max-connections", "10", "--max-connections-per-pod", "20"],
                "max-connections-per-pod",
            ),
            (
                &["--max-outbound-tunnels", "100", "--max-tunnels-per-pod", "200"],
                "max-tunnels-per-pod",
            ),
            (&["--ca-dir", &missing], "ca-dir"),
            (&["--ca-dir", &file], "ca-dir"),
            (&["--ca-dir", &empty_dir], "ca-dir"),
            (&["--crl", &file], "crl"),
            (&["--deny-identities", &file], "deny-identities"),
            (&["--revocation-unknown", "refuse"], "revocation-unknown"),
            (&["--ca-address", "https://ca:15012", "--ca-dir", &ca_dir], "ca-address"),
            (&["--ca-address", "http://ca:15012"], "ca-address"),
            (&["--ca-address", "https://ca:15012"], "ca-address"),
            (
                &["--ca-address", "https://ca", "--ca-root", &missing, "--ca-token", &file],
                "ca-root",
            ),
            (
                &["--ca-address", "https://ca", "--ca-root", &file, "--ca-token", &missing],
                "ca-token",
            ),
            (&["--ca-root", &file], "ca-root"),
            (&["--ca-token", &file], "ca-token"),
            (&["--cluster-id", ""], "cluster-id"),
            (&["--egress-allow", "10.0.0.0/8,example.com:443"], "egress-allow"),
        ];
        for (extra, flag) in table {
            let found = problems(d.path(), extra);
            assert!(
                found.iter().any(|p| p.flag() == *flag),
                "{extra:?}: expected a problem with --{flag}, got {found:?}"
            );
            for p in &found {
                let text = p.to_string();
                assert!(
                    text.contains(&format!("--{}", p.flag())) && text.contains(&env_of(p.flag())),
                    "{text}"
                );
            }
        }
    }

    #[test]
    fn several_bad_flags_are_all_reported_at_once() {
        let d = scratch();
        let missing = d.path().join("nope");
        let missing_s = missing.display().to_string();
        let e = Config::from_args(args(
            d.path(),
            &[
                "--max-connections",
                "10",
                "--max-connections-per-pod",
                "20",
                "--max-handshakes-per-peer",
                "600",
                "--config-poll",
                "0",
                "--h2-frame-size",
                "1",
                "--deny-identities",
                &missing_s,
            ],
        ))
        .unwrap_err();
        let text = e.to_string();
        for expected in [
            "--max-connections-per-pod (NODEWARD_MAX_CONNECTIONS_PER_POD) = 20 is larger than --max-connections (NODEWARD_MAX_CONNECTIONS) = 10",
            "--max-handshakes-per-peer (NODEWARD_MAX_HANDSHAKES_PER_PEER) = 600 is larger than --max-handshakes (NODEWARD_MAX_HANDSHAKES) = 512",
            "--max-handshakes-per-peer (NODEWARD_MAX_HANDSHAKES_PER_PEER) = 600 is larger than --max-tunnels-per-peer",
            "--config-poll (NODEWARD_CONFIG_POLL) = 0",
            "--h2-frame-size (NODEWARD_H2_FRAME_SIZE) = 1: must be within 16384..=16777215",
            "--deny-identities (NODEWARD_DENY_IDENTITIES) is given without --ca-dir",
        ] {
            assert!(text.contains(expected), "missing {expected:?} in:\n{text}");
        }
        assert!(
            text.contains(&format!("--deny-identities (NODEWARD_DENY_IDENTITIES) {missing_s}:")),
            "{text}"
        );
        assert_eq!(e.0.len(), 7, "{text}");
    }

    #[test]
    fn a_ca_service_setup_is_valid_and_keeps_revocation_flags() {
        let d = scratch();
        let ca = d.path().join("ca");
        let root = ca.join(ROOT_CERT).display().to_string();
        let token = ca.join("deny.txt").display().to_string();
        let crl = ca.join("crl.pem").display().to_string();
        let c = Config::from_args(args(
            d.path(),
            &[
                "--ca-address",
                "https://10.0.0.1:15012",
                "--ca-root",
                &root,
                "--ca-token",
                &token,
                "--crl",
                &crl,
            ],
        ))
        .unwrap();
        let id = c.identity.unwrap();
        let CaSource::Service(s) = id.ca else {
            panic!("CA service expected")
        };
        assert_eq!(s.address, "https://10.0.0.1:15012");
        assert_eq!(s.cluster_id, "Kubernetes");
        assert_eq!(id.crl_files.len(), 1);
    }

    #[test]
    fn the_cert_chain_is_optional_in_the_ca_directory() {
        let d = scratch();
        let ca = d.path().join("ca").display().to_string();
        assert_eq!(problems(d.path(), &["--ca-dir", &ca]), Vec::new());
        std::fs::remove_file(d.path().join("ca").join(CA_KEY)).unwrap();
        let found = problems(d.path(), &["--ca-dir", &ca]);
        assert!(
            matches!(&found[..], [Problem::Path { flag: "ca-dir", path, .. }] if path.ends_with(CA_KEY)),
            "{found:?}"
        );
    }

    fn run_args(argv: &[&str]) -> RunArgs {
        let argv = ["nodeward", "run", "--node-name", "n1"].iter().chain(argv);
        match Cli::try_parse_from(argv).unwrap().command {
            Command::Run(a) => *a,
            _ => unreachable!(),
        }
    }

    #[test]
    fn the_source_is_kube_in_a_cluster_unless_a_config_dir_is_given() {
        let d = scratch();
        let dir = d.path().display().to_string();
        let source = |argv: &[&str], in_cluster| Config::from_args_in(run_args(argv), in_cluster).map(|c| c.source);
        assert_eq!(source(&[], true).unwrap(), SourceConfig::Kube { kubeconfig: None });
        assert_eq!(
            source(&["--config-dir", &dir], true).unwrap(),
            SourceConfig::Dir(d.path().to_path_buf())
        );
        assert_eq!(
            source(&["--config-dir", &dir], false).unwrap(),
            SourceConfig::Dir(d.path().to_path_buf())
        );
        let kubeconfig = d.path().join("ca").join(CA_CERT);
        let k = kubeconfig.display().to_string();
        assert_eq!(
            source(&["--source", "kube", "--kubeconfig", &k], false).unwrap(),
            SourceConfig::Kube {
                kubeconfig: Some(kubeconfig)
            }
        );
    }

    #[test]
    fn each_source_takes_only_its_own_flags() {
        let d = scratch();
        let dir = d.path().display().to_string();
        let missing = d.path().join("missing").display().to_string();
        let file = d.path().join("ca").join(CA_CERT).display().to_string();
        let table: &[(&[&str], &str, &str)] = &[
            (
                &[],
                "config-dir",
                "--config-dir (NODEWARD_CONFIG_DIR) is required with --source (NODEWARD_SOURCE)",
            ),
            (&["--source", "dir"], "config-dir", "is required"),
            (
                &["--source", "kube", "--config-dir", &dir],
                "config-dir",
                "the kube source reads the Kubernetes API",
            ),
            (
                &["--config-dir", &dir, "--kubeconfig", &file],
                "kubeconfig",
                "--kubeconfig (NODEWARD_KUBECONFIG) is given with --source (NODEWARD_SOURCE)",
            ),
            (&["--source", "kube", "--kubeconfig", &missing], "kubeconfig", "missing"),
        ];
        for (argv, flag, text) in table {
            let Err(ConfigErrors(found)) = Config::from_args_in(run_args(argv), false) else {
                panic!("{argv:?}: accepted")
            };
            assert!(
                found.iter().any(|p| p.flag() == *flag && p.to_string().contains(text)),
                "{argv:?}: expected a problem with --{flag} saying {text:?}, got {found:?}"
            );
        }
    }
}
