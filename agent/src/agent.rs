//! `nodeward run`: wires the config source, state, capture, pod manager and
//! proxies together, and drains on SIGTERM.

use std::sync::Arc;
use std::time::Duration;

use tokio::signal::unix::{SignalKind, signal};

use crate::capture::{Capture, CaptureConfig, CaptureError};
use crate::config::RunArgs;
use crate::pods::PodManager;
use crate::proxy::relay::RelayOptions;
use crate::proxy::{Lifecycle, ProxyConfig};
use crate::source::dir::DirSource;
use crate::state::Store;

/// Why the agent could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// The config directory is unusable.
    #[error("config directory {path}: {message}")]
    ConfigDir {
        /// The directory.
        path: String,
        /// Why.
        message: String,
    },
    /// Capture could not be set up.
    #[error(transparent)]
    Capture(#[from] CaptureError),
    /// A signal handler could not be installed.
    #[error("installing signal handlers: {0}")]
    Signals(std::io::Error),
}

/// Runs the agent until SIGTERM/SIGINT, then drains and returns.
pub async fn run(args: RunArgs) -> Result<(), StartError> {
    match std::fs::metadata(&args.config_dir) {
        Ok(m) if m.is_dir() => {}
        Ok(_) => {
            return Err(StartError::ConfigDir {
                path: args.config_dir.display().to_string(),
                message: "not a directory".into(),
            });
        }
        Err(e) => {
            return Err(StartError::ConfigDir {
                path: args.config_dir.display().to_string(),
                message: e.to_string(),
            });
        }
    }
    crate::netns::init_home();
    let capture = Arc::new(Capture::start(CaptureConfig {
        bpffs: args.bpffs.clone(),
        node_name: args.node_name.clone(),
        cgroup2: args.cgroup2.clone(),
        socket_mark: args.socket_mark,
    })?);
    let mut sigterm = signal(SignalKind::terminate()).map_err(StartError::Signals)?;
    let mut sigint = signal(SignalKind::interrupt()).map_err(StartError::Signals)?;

    let store = Store::new();
    let lifecycle = Lifecycle::default();
    let proxy_config = Arc::new(ProxyConfig {
        socket_mark: args.socket_mark,
        connect_timeout: args.connect_timeout,
        relay: RelayOptions {
            idle_timeout: args.idle_timeout,
            buffer_size: args.buffer_size as usize,
        },
    });
    let source = DirSource::new(&args.config_dir);
    let source_task = tokio::spawn(source.run(
        store.clone(),
        args.config_poll,
        lifecycle.stop_accepting.clone(),
    ));
    let manager = PodManager::new(
        args.node_name.clone(),
        store,
        capture,
        proxy_config,
        lifecycle.clone(),
    );
    let manager_task = tokio::spawn(manager.run());
    tracing::info!(node = %args.node_name, config_dir = %args.config_dir.display(), "agent running");

    tokio::select! {
        _ = sigterm.recv() => tracing::info!("SIGTERM: draining"),
        _ = sigint.recv() => tracing::info!("SIGINT: draining"),
    }
    drain(&lifecycle, args.drain_timeout).await;
    let _ = manager_task.await;
    let _ = source_task.await;
    Ok(())
}

/// Stops accepting, waits for open connections up to `deadline`, then
/// closes the rest. Capture stays attached: fail closed.
async fn drain(lifecycle: &Lifecycle, deadline: Duration) {
    lifecycle.stop_accepting.cancel();
    lifecycle.connections.close();
    let open = lifecycle.connections.len();
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
