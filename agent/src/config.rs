//! Command line and environment: every flag has a `NODEWARD_*` variable,
//! parsed in one place into one validated [`RunConfig`].

use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};

use crate::proxy::limits::LimitConfig;

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
}

/// `nodeward ca` subcommands.
#[derive(Debug, Subcommand)]
pub enum CaCommand {
    /// Create a root and an intermediate CA in Istio's plug-in CA layout
    /// (then move root-key.pem offline).
    Init {
        /// Directory to write.
        #[arg(long, env = "NODEWARD_CA_OUT")]
        out: PathBuf,
    },
    /// Issue a further intermediate CA.
    Intermediate {
        /// Sign with this directory's root (root-cert.pem + root-key.pem).
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
    /// Revoke certificates by serial: appends to the CRL and re-signs it.
    Revoke {
        /// CA directory whose ca-key.pem signs the CRL (ca-crl.pem).
        #[arg(long = "ca", env = "NODEWARD_CA_DIR")]
        ca: PathBuf,
        /// Sign with root-key.pem instead (root-crl.pem), to revoke intermediates.
        #[arg(long, env = "NODEWARD_CA_REVOKE_AS_ROOT")]
        as_root: bool,
        /// Serial numbers in hex, with or without colons.
        #[arg(required = true)]
        serials: Vec<String>,
    },
}

/// `nodeward run` flags.
#[derive(Debug, Args)]
pub struct RunArgs {
    /// Name of this node; pods whose spec.nodeName matches are managed.
    #[arg(long, env = "NODEWARD_NODE_NAME")]
    pub node_name: String,

    /// Directory of Kubernetes YAML (Namespace and Pod objects), re-read on change.
    #[arg(long, env = "NODEWARD_CONFIG_DIR")]
    pub config_dir: PathBuf,

    /// bpffs mount point (mounted there if it is not).
    #[arg(long, env = "NODEWARD_BPFFS", default_value = "/sys/fs/bpf")]
    pub bpffs: PathBuf,

    /// cgroup v2 root to attach to [default: found in /proc/mounts].
    #[arg(long, env = "NODEWARD_CGROUP2")]
    pub cgroup2: Option<PathBuf>,

    /// Socket mark that identifies the agent's own sockets to its eBPF programs.
    #[arg(long, env = "NODEWARD_SOCKET_MARK", default_value = "0x4e57", value_parser = parse_mark)]
    pub socket_mark: u32,

    /// How long SIGTERM waits for open connections before closing them.
    #[arg(long, env = "NODEWARD_DRAIN_TIMEOUT", default_value = "30s", value_parser = parse_duration)]
    pub drain_timeout: Duration,

    /// Close a proxied connection after this long without traffic.
    #[arg(long, env = "NODEWARD_IDLE_TIMEOUT", default_value = "1h", value_parser = parse_duration)]
    pub idle_timeout: Duration,

    /// Deadline for connecting to a destination.
    #[arg(long, env = "NODEWARD_CONNECT_TIMEOUT", default_value = "10s", value_parser = parse_duration)]
    pub connect_timeout: Duration,

    /// How often the config directory is checked for changes.
    #[arg(long, env = "NODEWARD_CONFIG_POLL", default_value = "200ms", value_parser = parse_duration)]
    pub config_poll: Duration,

    /// Per-direction relay buffer, bytes.
    #[arg(long, env = "NODEWARD_BUFFER_SIZE", default_value_t = 32 * 1024, value_parser = clap::value_parser!(u32).range(1024..=4 * 1024 * 1024))]
    pub buffer_size: u32,

    /// Log format.
    #[arg(long, env = "NODEWARD_LOG_FORMAT", default_value = "text", value_parser = ["text", "json"])]
    pub log_format: String,

    /// Istio root namespace: policies there apply mesh-wide.
    #[arg(long, env = "NODEWARD_ROOT_NAMESPACE", default_value = "istio-system")]
    pub root_namespace: String,

    /// Trust domain of this cluster's SPIFFE identities.
    #[arg(long, env = "NODEWARD_TRUST_DOMAIN", default_value = "cluster.local")]
    pub trust_domain: String,

    /// Other trust domains that policies treat as this one (comma-separated),
    /// as Istio's trust domain aliases: a principal written with one of them
    /// or with `cluster.local` matches peers of any.
    #[arg(long, env = "NODEWARD_TRUST_DOMAIN_ALIASES", value_delimiter = ',')]
    pub trust_domain_aliases: Vec<String>,

    /// CA directory (Istio plug-in CA files: ca-cert.pem, ca-key.pem, root-cert.pem, cert-chain.pem);
    /// without it the agent issues no identities.
    #[arg(long, env = "NODEWARD_CA_DIR")]
    pub ca_dir: Option<PathBuf>,

    /// Lifetime of workload certificates; renewed around half of it.
    #[arg(long, env = "NODEWARD_CERT_LIFETIME", default_value = "24h", value_parser = parse_duration)]
    pub cert_lifetime: Duration,

    /// CRL files (PEM or DER), watched; repeat the flag or separate with commas.
    #[arg(long, env = "NODEWARD_CRL", value_delimiter = ',')]
    pub crl: Vec<PathBuf>,

    /// File of denied identities: one SPIFFE ID or `ns/<namespace>/*` per line, watched.
    #[arg(long, env = "NODEWARD_DENY_IDENTITIES")]
    pub deny_identities: Option<PathBuf>,

    /// Certificates no CRL speaks for: accept or refuse.
    #[arg(long, env = "NODEWARD_REVOCATION_UNKNOWN", default_value = "accept", value_parser = ["accept", "refuse"])]
    pub revocation_unknown: String,

    /// HTTP/2 stream window of tunnels, bytes (bounds memory per stream).
    #[arg(long, env = "NODEWARD_H2_STREAM_WINDOW", default_value_t = 4 << 20, value_parser = clap::value_parser!(u32).range(65535..=(1 << 30)))]
    pub h2_stream_window: u32,

    /// HTTP/2 connection window of tunnels, bytes.
    #[arg(long, env = "NODEWARD_H2_CONNECTION_WINDOW", default_value_t = 16 << 20, value_parser = clap::value_parser!(u32).range(65535..=(1 << 31) - 1))]
    pub h2_connection_window: u32,

    /// Largest HTTP/2 frame of tunnels, bytes.
    #[arg(long, env = "NODEWARD_H2_FRAME_SIZE", default_value_t = 1 << 20, value_parser = clap::value_parser!(u32).range(16384..=(1 << 24) - 1))]
    pub h2_frame_size: u32,

    /// Streams per tunnel connection; the pool opens another when full.
    #[arg(long, env = "NODEWARD_TUNNEL_MAX_STREAMS", default_value_t = 100, value_parser = clap::value_parser!(u32).range(1..=10_000))]
    pub tunnel_max_streams: u32,

    /// Tunnel connections per destination over which concurrent streams are
    /// spread, since each connection's TLS runs on one core at each end
    /// [default: one per worker thread, at most 4].
    #[arg(long, env = "NODEWARD_TUNNEL_CONNECTIONS", value_parser = clap::value_parser!(u16).range(1..=64))]
    pub tunnel_connections: Option<u16>,

    /// Release pooled tunnel connections unused this long.
    #[arg(long, env = "NODEWARD_TUNNEL_IDLE_TIMEOUT", default_value = "60s", value_parser = parse_duration)]
    pub tunnel_idle_timeout: Duration,

    /// Deadline for a peer's TLS and HTTP/2 handshakes.
    #[arg(long, env = "NODEWARD_HANDSHAKE_TIMEOUT", default_value = "10s", value_parser = parse_duration)]
    pub handshake_timeout: Duration,

    /// Threads of the proxy runtime [default: one per CPU].
    #[arg(long, env = "NODEWARD_WORKER_THREADS", value_parser = clap::value_parser!(u16).range(1..=256))]
    pub worker_threads: Option<u16>,

    /// Admin address (readiness), on the node only.
    #[arg(long, env = "NODEWARD_ADMIN_ADDR", default_value = "127.0.0.1:15021")]
    pub admin_addr: std::net::SocketAddr,

    // Resource bounds (see ARCHITECTURE.md "Resource bounds" for the sizing).
    /// Proxied connections on the node (outbound, inbound plaintext and
    /// tunnel streams together); past it new ones are reset.
    #[arg(long, env = "NODEWARD_MAX_CONNECTIONS", default_value_t = 16384, value_parser = clap::value_parser!(u32).range(1..))]
    pub max_connections: u32,

    /// Proxied connections of one pod, per direction (outbound; inbound
    /// plaintext and tunnel streams), so one pod cannot take them all.
    #[arg(long, env = "NODEWARD_MAX_CONNECTIONS_PER_POD", default_value_t = 8192, value_parser = clap::value_parser!(u32).range(1..))]
    pub max_connections_per_pod: u32,

    /// Tunnel connections on the node, inbound and outbound together.
    #[arg(long, env = "NODEWARD_MAX_TUNNELS", default_value_t = 1024, value_parser = clap::value_parser!(u32).range(1..))]
    pub max_tunnels: u32,

    /// Inbound tunnel connections from one remote IP, handshakes included.
    #[arg(long, env = "NODEWARD_MAX_TUNNELS_PER_PEER", default_value_t = 128, value_parser = clap::value_parser!(u32).range(1..))]
    pub max_tunnels_per_peer: u32,

    /// Outbound tunnel connections of one pod (at the bound, streams share
    /// the connections it has).
    #[arg(long, env = "NODEWARD_MAX_TUNNELS_PER_POD", default_value_t = 128, value_parser = clap::value_parser!(u32).range(1..))]
    pub max_tunnels_per_pod: u32,

    /// Inbound connections on 15008 still in their TLS/HTTP/2 handshakes;
    /// past it new ones are closed before TLS.
    #[arg(long, env = "NODEWARD_MAX_HANDSHAKES", default_value_t = 512, value_parser = clap::value_parser!(u32).range(1..))]
    pub max_handshakes: u32,

    /// Such handshakes from one remote IP.
    #[arg(long, env = "NODEWARD_MAX_HANDSHAKES_PER_PEER", default_value_t = 64, value_parser = clap::value_parser!(u32).range(1..))]
    pub max_handshakes_per_peer: u32,
}

/// Flags that contradict each other.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// Every contradiction found, one per line.
    #[error("invalid flags:\n  {}", .0.join("\n  "))]
    Invalid(Vec<String>),
}

impl RunArgs {
    /// Checks the flags against each other, reporting every problem at once.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let mut problems = Vec::new();
        let mut at_most = |part: (&str, u32), whole: (&str, u32)| {
            if part.1 > whole.1 {
                problems.push(format!(
                    "--{} ({}) is larger than --{} ({}), which it is part of",
                    part.0, part.1, whole.0, whole.1
                ));
            }
        };
        at_most(
            ("max-connections-per-pod", self.max_connections_per_pod),
            ("max-connections", self.max_connections),
        );
        at_most(
            ("max-tunnels-per-peer", self.max_tunnels_per_peer),
            ("max-tunnels", self.max_tunnels),
        );
        at_most(
            ("max-tunnels-per-pod", self.max_tunnels_per_pod),
            ("max-tunnels", self.max_tunnels),
        );
        at_most(
            ("max-handshakes", self.max_handshakes),
            ("max-tunnels", self.max_tunnels),
        );
        at_most(
            ("max-handshakes-per-peer", self.max_handshakes_per_peer),
            ("max-handshakes", self.max_handshakes),
        );
        at_most(
            ("max-handshakes-per-peer", self.max_handshakes_per_peer),
            ("max-tunnels-per-peer", self.max_tunnels_per_peer),
        );
        if self.h2_stream_window > self.h2_connection_window {
            problems.push(format!(
                "--h2-stream-window ({}) is larger than --h2-connection-window ({}): one stream could never use its window",
                self.h2_stream_window, self.h2_connection_window
            ));
        }
        if problems.is_empty() {
            Ok(())
        } else {
            Err(ConfigError::Invalid(problems))
        }
    }

    /// The resource bounds the flags set.
    pub fn limits(&self) -> LimitConfig {
        let n = |v: u32| v as usize;
        LimitConfig {
            connections: n(self.max_connections),
            connections_per_pod: n(self.max_connections_per_pod),
            tunnels: n(self.max_tunnels),
            tunnels_per_peer: n(self.max_tunnels_per_peer),
            tunnels_per_pod: n(self.max_tunnels_per_pod),
            handshakes: n(self.max_handshakes),
            handshakes_per_peer: n(self.max_handshakes_per_peer),
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
    #[arg(long, env = "NODEWARD_BPFFS", default_value = "/sys/fs/bpf")]
    pub bpffs: PathBuf,
}

/// Parses `30s`, `250ms`, `5m`, `1h` or a bare number of seconds.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let n: u64 = num
        .parse()
        .map_err(|_| format!("{s:?} is not a duration (expected e.g. 250ms, 30s, 5m, 1h)"))?;
    let d = match unit {
        "ms" => Duration::from_millis(n),
        "" | "s" => Duration::from_secs(n),
        "m" => Duration::from_secs(n * 60),
        "h" => Duration::from_secs(n * 3600),
        _ => return Err(format!("{s:?}: unknown unit {unit:?} (use ms, s, m or h)")),
    };
    Ok(d)
}

/// Parses a socket mark in decimal or `0x` hex; zero is refused because
/// unmarked sockets have mark 0.
pub fn parse_mark(s: &str) -> Result<u32, String> {
    let v = match s.strip_prefix("0x").or_else(|| s.strip_prefix("0X")) {
        Some(hex) => u32::from_str_radix(hex, 16),
        None => s.parse(),
    }
    .map_err(|_| format!("{s:?} is not a 32-bit number"))?;
    if v == 0 {
        return Err("the socket mark must not be 0: every unmarked socket has mark 0".into());
    }
    Ok(v)
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
    }

    #[test]
    fn marks() {
        assert_eq!(parse_mark("0x4e57"), Ok(0x4e57));
        assert_eq!(parse_mark("1337"), Ok(1337));
        assert!(parse_mark("0").is_err());
        assert!(parse_mark("x").is_err());
    }

    fn run_args(extra: &[&str]) -> RunArgs {
        let mut argv = vec!["nodeward", "run", "--node-name", "n1", "--config-dir", "/tmp"];
        argv.extend_from_slice(extra);
        match Cli::try_parse_from(argv).unwrap().command {
            Command::Run(a) => *a,
            _ => unreachable!(),
        }
    }

    #[test]
    fn default_bounds_are_consistent() {
        let a = run_args(&[]);
        a.validate().unwrap();
        assert_eq!(a.limits().connections, 16384);
        assert_eq!(a.limits().handshakes_per_peer, 64);
    }

    #[test]
    fn contradictory_bounds_are_all_reported_by_flag() {
        let a = run_args(&[
            "--max-connections",
            "10",
            "--max-connections-per-pod",
            "20",
            "--max-handshakes-per-peer",
            "600",
        ]);
        let e = a.validate().unwrap_err().to_string();
        assert!(
            e.contains("--max-connections-per-pod (20) is larger than --max-connections (10)"),
            "{e}"
        );
        assert!(
            e.contains("--max-handshakes-per-peer (600) is larger than --max-handshakes (512)"),
            "{e}"
        );
        assert!(
            e.contains("--max-handshakes-per-peer (600) is larger than --max-tunnels-per-peer (128)"),
            "{e}"
        );
        assert!(
            Cli::try_parse_from([
                "nodeward",
                "run",
                "--node-name",
                "n",
                "--config-dir",
                "/",
                "--max-tunnels",
                "0"
            ])
            .is_err()
        );
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
}
