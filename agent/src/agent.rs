//! `nodeward run`: wires the config source, state, capture, pod manager and
//! proxies together, and drains on SIGTERM.

#![forbid(unsafe_code)]

use std::sync::Arc;
use std::time::Duration;

use tokio::signal::unix::{SignalKind, signal};

use crate::admin::readiness::Readiness;
use crate::admin::server::Listeners;
use crate::admin::{AdminState, Captures, ConfigStatus};
use crate::capture::{Capture, CaptureError};
use crate::cni::server::CniServer;
use crate::config::{Config, SourceConfig};
use crate::identity::ca::CaError;
use crate::identity::manager::CertManager;
use crate::metrics::Metrics;
use crate::pods::PodManager;
use crate::proxy::counters::Counters;
use crate::proxy::limits::{LimitConfig, Limits};
use crate::proxy::open::OpenConns;
use crate::proxy::pool::Pool;
use crate::proxy::{Lifecycle, Mesh};
use crate::source::Assembler;
use crate::source::dir::DirSource;
use crate::source::kube::{KubeError, KubeSource, SourceHealth};
use crate::state::Store;

/// Why the agent could not start (the flags were checked before, by
/// [`Config::from_args`]).
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// Capture could not be set up.
    #[error(transparent)]
    Capture(#[from] CaptureError),
    /// The certificate authority is unusable.
    #[error("certificate authority: {0}")]
    Identity(#[from] CaError),
    /// A listener of the admin endpoints could not be set up.
    #[error("--{flag} {addr}: {source}")]
    Admin {
        /// The flag that set the address.
        flag: &'static str,
        /// The address.
        addr: std::net::SocketAddr,
        /// Why.
        source: std::io::Error,
    },
    /// The CNI hand-off socket could not be set up.
    #[error(transparent)]
    Cni(#[from] crate::cni::server::CniServerError),
    /// The Kubernetes API source could not be set up.
    #[error(transparent)]
    Kube(#[from] KubeError),
    /// A config file cannot be parsed at all at start.
    #[error(transparent)]
    Config(#[from] crate::source::dir::DirError),
    /// A signal handler could not be installed.
    #[error("installing signal handlers: {0}")]
    Signals(std::io::Error),
}

/// Binds an admin listener (tokio's bind: `SO_REUSEADDR`, so a restarted
/// agent gets its ports back at once), for the admin thread to serve.
async fn bind(flag: &'static str, addr: std::net::SocketAddr) -> Result<std::net::TcpListener, StartError> {
    let err = |source| StartError::Admin { flag, addr, source };
    tokio::net::TcpListener::bind(addr)
        .await
        .and_then(|l| l.into_std())
        .map_err(err)
}

/// The readiness checks of the modules wired here; the config source and
/// the pod manager report into theirs.
fn register_checks(readiness: &Readiness, identity: Option<&Arc<CertManager>>, captures: &Arc<Captures>) {
    if let Some(m) = identity {
        let m2 = m.clone();
        readiness.register_polled("ca", move || m2.problems());
        let m = m.clone();
        readiness.register_polled("certificates", move || {
            let now = std::time::SystemTime::now();
            m.certificates()
                .into_iter()
                .filter(|c| c.not_after <= now)
                .map(|c| format!("the certificate of {} (serial {}) has expired", c.identity, c.serial))
                .collect()
        });
    }
    let captures = captures.clone();
    readiness.register_polled("pods", move || captures.problems());
}

/// The config source, ready to run.
enum Source {
    /// A directory of YAML, read once.
    Dir(DirSource),
    /// The Kubernetes API, through this client.
    Kube(kube::Client),
}

/// Runs the agent until SIGTERM/SIGINT, then drains and returns. Wiring
/// only: every setting was checked by [`Config::from_args`].
pub async fn run(config: Config) -> Result<(), StartError> {
    let limits = Limits::new(config.limits);
    check_fd_budget(&limits.config());
    crate::netns::init_home();
    let identity = match config.identity {
        Some(id) => Some(CertManager::start(id)?),
        None => {
            tracing::warn!("neither --ca-dir nor --ca-address: workloads get no identities");
            None
        }
    };
    let listeners = Listeners {
        readiness: bind("readiness-addr", config.readiness_addr).await?,
        metrics: bind("metrics-addr", config.metrics_addr).await?,
        admin: bind("admin-addr", config.admin_addr).await?,
    };
    let metrics = Arc::new(Metrics::new());
    let readiness = Arc::new(Readiness::default());
    let ebpf = readiness.register("ebpf", "programs not attached yet");
    let config_status = Arc::new(ConfigStatus::new(
        readiness.register("config", "config directory not read yet"),
        metrics.clone(),
    ));
    let captures = Arc::new(Captures::default());
    if let Some(m) = &identity {
        m.count_into(metrics.clone());
    }
    register_checks(&readiness, identity.as_ref(), &captures);
    // Before capture starts: a bad kubeconfig or a config file that does
    // not parse stops the agent having touched nothing.
    let source = match &config.source {
        SourceConfig::Kube { kubeconfig } => Source::Kube(crate::source::kube::client(kubeconfig.as_deref()).await?),
        SourceConfig::Dir(dir) => {
            let mut source = DirSource::new(dir.clone());
            source.start()?;
            Source::Dir(source)
        }
    };
    let mut capture = Capture::start(config.capture)?;
    let program_log = capture.take_program_log();
    let capture = Arc::new(capture);
    ebpf.ready();
    let mut sigterm = signal(SignalKind::terminate()).map_err(StartError::Signals)?;
    let mut sigint = signal(SignalKind::interrupt()).map_err(StartError::Signals)?;

    let store = Store::new();
    let lifecycle = Lifecycle::default();
    if let Some(log) = program_log {
        tokio::spawn(log.run(lifecycle.hard_stop.clone()));
    }
    let proxy_config = Arc::new(config.proxy);
    let open = OpenConns::new();
    if let Some(m) = &identity {
        tokio::spawn(m.clone().run(config.config_poll, lifecycle.hard_stop.clone()));
        tokio::spawn(open.clone().run(m.trust(), lifecycle.hard_stop.clone()));
    }
    let assembler = Assembler::new(
        &config.root_namespace,
        &config.trust_domain,
        &config.trust_domain_aliases,
    );
    let source_task = match source {
        Source::Kube(client) => {
            let source = KubeSource::new(client, &config.node_name, assembler)
                .with_staleness(config.source_stale_after, metrics.clone());
            // No files to reject: readiness follows the watchers' first sync.
            config_status.report(Vec::new(), false);
            let health: SourceHealth = source.health();
            readiness.register_polled("source", move || health.problems());
            tokio::spawn(source.run(store.clone(), lifecycle.stop_accepting.clone()))
        }
        Source::Dir(source) => {
            let source = source.with_assembler(assembler).with_status(config_status.clone());
            tokio::spawn(source.run(store.clone(), config.config_poll, lifecycle.stop_accepting.clone()))
        }
    };
    let h2 = config.h2;
    let pool = Pool::with_limits(
        h2,
        config.tunnel_idle_timeout,
        config.tunnel_connections,
        limits.clone(),
    );
    tokio::spawn(pool.clone().run(lifecycle.hard_stop.clone()));
    let admin = Arc::new(AdminState {
        node: config.node_name.clone(),
        readiness,
        metrics: metrics.clone(),
        store: store.clone(),
        certs: identity.clone(),
        captures: captures.clone(),
        config: config_status,
    });
    let mesh = Arc::new(Mesh {
        store: store.clone(),
        certs: identity,
        pool,
        open,
        h2,
        counters: Counters::new(metrics),
        captures,
        limits,
    });
    crate::admin::server::spawn(listeners, admin, lifecycle.hard_stop.clone()).map_err(|source| StartError::Admin {
        flag: "admin-addr",
        addr: config.admin_addr,
        source,
    })?;
    let mut manager = PodManager::new(
        config.node_name.clone(),
        store,
        capture,
        proxy_config,
        lifecycle.clone(),
        mesh,
    );
    if let Some(path) = &config.cni_socket {
        let server = CniServer::bind(path)?;
        let (tx, rx) = tokio::sync::mpsc::channel(64);
        tokio::spawn(server.run(tx, lifecycle.stop_accepting.clone()));
        manager = manager.with_cni(rx);
    }
    let manager_task = tokio::spawn(manager.run());
    match &config.source {
        SourceConfig::Dir(dir) => {
            tracing::info!(node = %config.node_name, config_dir = %dir.display(), "agent running")
        }
        SourceConfig::Kube { .. } => tracing::info!(node = %config.node_name, source = "kube", "agent running"),
    }

    let signal = tokio::select! {
        _ = sigterm.recv() => "SIGTERM",
        _ = sigint.recv() => "SIGINT",
    };
    // Stop accepting before saying so: whoever reads the line may rely on
    // no new connection being handled from then on.
    lifecycle.stop_accepting.cancel();
    tracing::info!("{signal}: draining");
    drain(&lifecycle, config.drain_timeout).await;
    let _ = manager_task.await;
    if let Err(e) = source_task.await {
        tracing::error!("config source task failed: {e}");
    }
    lifecycle.hard_stop.cancel();
    Ok(())
}

/// Stops accepting, waits for open connections up to `deadline`, then
/// closes the rest. Capture stays attached: fail closed.
async fn drain(lifecycle: &Lifecycle, deadline: Duration) {
    lifecycle.stop_accepting.cancel();
    lifecycle.listeners.close();
    lifecycle.listeners.wait().await;
    lifecycle.connections.close();
    let open = lifecycle.connections.len();
    tracing::info!(open, "stopped accepting; draining open connections");
    if tokio::time::timeout(deadline, lifecycle.connections.wait())
        .await
        .is_err()
    {
        tracing::warn!(
            open = lifecycle.connections.len(),
            "drain deadline passed; closing connections"
        );
        lifecycle.hard_stop.cancel();
        let _ = tokio::time::timeout(Duration::from_secs(5), lifecycle.connections.wait()).await;
    }
    tracing::info!(
        drained = open,
        "drained; eBPF capture stays attached so pods fail closed (`nodeward cleanup` removes it)"
    );
}

/// Descriptors the agent keeps for itself: listeners (three per family per
/// pod are counted in the connection bounds' slack), maps, logs, admin.
const FD_RESERVE: u64 = 1024;

/// Raises the soft `RLIMIT_NOFILE` to the hard limit if it is lower, and
/// warns when the bounds allow more sockets than that: each proxied
/// connection holds two, each tunnel one (handshakes are tunnels).
fn check_fd_budget(limits: &LimitConfig) {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    let Ok((soft, hard)) = getrlimit(Resource::RLIMIT_NOFILE) else {
        return;
    };
    let soft = if soft < hard && setrlimit(Resource::RLIMIT_NOFILE, hard, hard).is_ok() {
        hard
    } else {
        soft
    };
    let needed = (limits.connections as u64)
        .saturating_mul(2)
        .saturating_add(limits.tunnels_in as u64)
        .saturating_add(limits.tunnels_out as u64)
        .saturating_add(FD_RESERVE);
    if needed > soft {
        tracing::warn!(
            nofile = soft,
            needed,
            "RLIMIT_NOFILE is below what --max-connections, --max-inbound-tunnels and --max-outbound-tunnels allow: accept() may fail with EMFILE before they refuse"
        );
    }
}
