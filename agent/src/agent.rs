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
use crate::takeover::{ControlServer, Handed, Inherited};

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
    /// The agent running on the node did not hand it over.
    #[error(transparent)]
    Takeover(#[from] crate::takeover::TakeoverError),
}

/// Binds an admin listener (tokio's bind: `SO_REUSEADDR`, so a restarted
/// agent gets its ports back at once), for the admin thread to serve; or
/// serves the one the previous agent handed over, if it listens on `addr`.
async fn bind(
    inherited: &mut Option<Inherited>,
    which: Handed,
    flag: &'static str,
    addr: std::net::SocketAddr,
) -> Result<std::net::TcpListener, StartError> {
    if let Some(fd) = inherited.as_mut().and_then(|i| i.take(which)) {
        let l = std::net::TcpListener::from(fd);
        if l.local_addr().is_ok_and(|a| a == addr) {
            return Ok(l);
        }
    }
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
    // Everything that can fail is done: ask an agent still running on the
    // node (a rolling upgrade) to hand it over. Its pods stay captured by
    // its listeners until this agent's replace them, one map update each.
    let mut inherited = crate::takeover::request(&config.node_name, capture.maps.pods.fd())?;
    if let Some(i) = &inherited {
        tracing::info!(
            previous_version = %i.version,
            handed = ?i.listeners.iter().map(|(h, _)| *h).collect::<Vec<_>>(),
            runtime_pods = i.cni.pods.len(),
            "taking the node over from the agent running on it"
        );
    }
    let listeners = Listeners {
        readiness: bind(
            &mut inherited,
            Handed::Readiness,
            "readiness-addr",
            config.readiness_addr,
        )
        .await?,
        metrics: bind(&mut inherited, Handed::Metrics, "metrics-addr", config.metrics_addr).await?,
        admin: bind(&mut inherited, Handed::Admin, "admin-addr", config.admin_addr).await?,
    };
    // Kept to hand over in turn, to the agent that takes over from this one.
    let mut sockets: Vec<(Handed, std::os::fd::OwnedFd)> = Vec::new();
    for (h, l) in [
        (Handed::Readiness, &listeners.readiness),
        (Handed::Metrics, &listeners.metrics),
        (Handed::Admin, &listeners.admin),
    ] {
        if let Ok(fd) = l.try_clone() {
            sockets.push((h, fd.into()));
        }
    }
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
    // The admin thread stops serving at the end, or when a new agent took
    // its sockets.
    let admin_stop = tokio_util::sync::CancellationToken::new();
    {
        let (hard, handed, admin_stop) = (
            lifecycle.hard_stop.clone(),
            lifecycle.handed_over.clone(),
            admin_stop.clone(),
        );
        tokio::spawn(async move {
            tokio::select! {
                _ = hard.cancelled() => {}
                _ = handed.cancelled() => {}
            }
            admin_stop.cancel();
        });
    }
    crate::admin::server::spawn(listeners, admin, admin_stop).map_err(|source| StartError::Admin {
        flag: "admin-addr",
        addr: config.admin_addr,
        source,
    })?;
    let capture_for_handover = capture.clone();
    let mut manager = PodManager::new(
        config.node_name.clone(),
        store,
        capture,
        proxy_config,
        lifecycle.clone(),
        mesh,
    );
    let mut cni_task = None;
    if let Some(path) = &config.cni_socket {
        let server = match inherited
            .as_mut()
            .and_then(|i| i.take(Handed::Cni))
            .and_then(|fd| CniServer::inherit(path, fd))
        {
            Some(s) => s,
            None => CniServer::bind(path)?,
        };
        if let Ok(fd) = server.share() {
            sockets.push((Handed::Cni, fd));
        }
        let (tx, rx) = tokio::sync::mpsc::channel(64);
        cni_task = Some(tokio::spawn(server.run(
            tx,
            lifecycle.stop_accepting.clone(),
            lifecycle.handed_over.clone(),
        )));
        manager = manager.with_cni(rx);
    }
    if let Some(i) = inherited {
        manager = manager.taking_over().with_cni_state(i.cni);
        tokio::spawn(watch_predecessor(i.stream));
    }
    let (handover_tx, handover_rx) = tokio::sync::mpsc::channel(1);
    manager = manager.with_handover(handover_rx);
    let manager_task = tokio::spawn(manager.run());
    match ControlServer::bind(&config.node_name).await {
        Ok(control) => {
            tokio::spawn(hand_over_on_request(HandOverTo {
                control,
                capture: capture_for_handover,
                manager: handover_tx,
                lifecycle: lifecycle.clone(),
                sockets,
                cni_task,
            }));
        }
        Err(e) => tracing::warn!(
            "cannot listen for a successor on {}: {e}; an upgrade of this agent restarts it instead of taking over",
            crate::takeover::control_path(&config.node_name).display()
        ),
    }
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

/// What an agent hands to the one taking over from it.
struct HandOverTo {
    control: ControlServer,
    capture: Arc<Capture>,
    /// The pod manager, asked to stop writing the maps.
    manager: tokio::sync::mpsc::Sender<crate::pods::HandOver>,
    lifecycle: Lifecycle,
    /// The operator ports' and the CNI socket's listening sockets.
    sockets: Vec<(Handed, std::os::fd::OwnedFd)>,
    /// The CNI server, which stops accepting before its socket goes.
    cni_task: Option<tokio::task::JoinHandle<()>>,
}

/// Waits for a new agent on the node to ask for it, then hands it over
/// (`takeover`): the pod manager stops writing the maps, the operator ports
/// and the CNI socket stop being served here and are sent, with what the
/// runtime told this agent. This agent's open connections go on until
/// SIGTERM drains them.
async fn hand_over_on_request(h: HandOverTo) {
    let Some(ours) = crate::takeover::map_id(h.capture.maps.pods.fd()) else {
        tracing::warn!("the PODS map has no id: no successor can take over");
        return;
    };
    tracing::debug!(socket = h.control.name(), "listening for a successor");
    let (successor, cni) = loop {
        let successor = tokio::select! {
            s = h.control.next_successor(ours) => s,
            // Draining: no pod manager is left to hand anything over.
            _ = h.lifecycle.stop_accepting.cancelled() => return,
        };
        let (tx, mut rx) = tokio::sync::oneshot::channel();
        // Never waits: a request still queued means the manager has not
        // taken the last one yet.
        if h.manager.try_send(tx).is_err() {
            successor.refuse("this agent's pod manager is busy or has stopped".into());
            continue;
        }
        tokio::select! {
            r = &mut rx => match r {
                Ok(state) => break (successor, state),
                Err(_) => successor.refuse("this agent's pod manager has stopped (it is draining)".into()),
            },
            _ = tokio::time::sleep(crate::takeover::EXCHANGE_TIMEOUT / 2) => {
                // Closed before it is given up on: either the manager's
                // answer is already here (it went passive: hand over), or
                // its send now fails and it stays active.
                rx.close();
                match rx.try_recv() {
                    Ok(state) => break (successor, state),
                    Err(_) => successor.refuse("this agent's pod manager did not answer in time".into()),
                }
            }
        }
    };
    h.lifecycle.handed_over.cancel();
    if let Some(t) = h.cni_task {
        let _ = t.await;
    }
    // The name is the new agent's from now on.
    drop(h.control);
    let version = successor.hello.version.clone();
    let pods = h.capture.maps.pods.fd();
    match successor.release(pods, &h.sockets, cni) {
        Ok(stream) => {
            tracing::info!(new_version = %version, "handed the node over to a new agent");
            drop(h.sockets);
            // Open until this agent exits: the new agent learns of it so.
            h.lifecycle.hard_stop.cancelled().await;
            drop(stream);
        }
        Err(e) => tracing::error!(
            "handing the node over failed after its pods were let go: {e}; the next agent to start takes them over as after a crash"
        ),
    }
}

/// Logs when the agent this one took over from has exited.
async fn watch_predecessor(stream: std::os::unix::net::UnixStream) {
    let _ = stream.set_nonblocking(true);
    let Ok(mut stream) = tokio::net::UnixStream::from_std(stream) else {
        return;
    };
    let mut buf = [0u8; 64];
    loop {
        match tokio::io::AsyncReadExt::read(&mut stream, &mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(_) => {}
        }
    }
    tracing::info!("the agent this one took over from has exited");
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
