//! The agent's end of the CNI hand-off: a root-only Unix socket where
//! `nodeward-cni` asks, one line per pod, and gets its answer once the pod
//! manager has acted (see `pods/cni.rs`).

#![forbid(unsafe_code)]

use std::os::unix::fs::{DirBuilderExt, FileTypeExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::{Semaphore, mpsc, oneshot};
use tokio_util::sync::CancellationToken;

use super::protocol::{self, MAX_LINE, Reply, Request};

/// How long a plugin has to send its request.
const READ_TIMEOUT: Duration = Duration::from_secs(5);
/// How long the pod manager has to act on one (it answers in milliseconds
/// unless a namespace scan or a certificate is in the way).
const ANSWER_TIMEOUT: Duration = Duration::from_secs(30);
/// Requests served at once; more wait in the listen backlog.
const CONCURRENCY: usize = 64;

/// A request on its way to the pod manager, with where its answer goes.
#[derive(Debug)]
pub(crate) struct CniRequest {
    /// What the plugin asked.
    pub(crate) request: Request,
    /// Where the pod manager answers.
    pub(crate) reply: oneshot::Sender<Reply>,
}

/// Why the socket could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum CniServerError {
    /// Something that is not a socket sits at the path: not ours to remove.
    #[error("--cni-socket {0}: exists and is not a socket")]
    NotASocket(PathBuf),
    /// Creating the directory, binding or restricting the socket failed.
    #[error("--cni-socket {path}: {source}")]
    Io {
        /// The socket path.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
}

/// The listening socket.
#[derive(Debug)]
pub(crate) struct CniServer {
    listener: UnixListener,
    path: PathBuf,
}

impl CniServer {
    /// Binds `path` (mode 0600; its directory is created 0700 if missing),
    /// replacing a socket a previous run left there.
    pub(crate) fn bind(path: &Path) -> Result<Self, CniServerError> {
        let io = |source| CniServerError::Io {
            path: path.to_path_buf(),
            source,
        };
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty() && !d.exists()) {
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(dir)
                .map_err(io)?;
        }
        match std::fs::symlink_metadata(path) {
            Ok(m) if m.file_type().is_socket() => std::fs::remove_file(path).map_err(io)?,
            Ok(_) => return Err(CniServerError::NotASocket(path.to_path_buf())),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(io(e)),
        }
        let listener = UnixListener::bind(path).map_err(io)?;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).map_err(io)?;
        Ok(CniServer {
            listener,
            path: path.to_path_buf(),
        })
    }

    /// Serves the socket a previous agent listened on and handed over
    /// (`takeover`): its queue is the same, so no request is lost. `None`
    /// if it is not bound at `path` (the flags changed): bind anew.
    pub(crate) fn inherit(path: &Path, fd: std::os::fd::OwnedFd) -> Option<Self> {
        let std = std::os::unix::net::UnixListener::from(fd);
        let bound = std.local_addr().ok()?.as_pathname().map(Path::to_path_buf);
        if bound.as_deref() != Some(path) {
            return None;
        }
        std.set_nonblocking(true).ok()?;
        Some(CniServer {
            listener: UnixListener::from_std(std).ok()?,
            path: path.to_path_buf(),
        })
    }

    /// A second descriptor of the listening socket, to hand to a new agent.
    pub(crate) fn share(&self) -> std::io::Result<std::os::fd::OwnedFd> {
        use std::os::fd::AsFd;
        self.listener.as_fd().try_clone_to_owned()
    }

    /// Serves requests until `stop`, passing each to the pod manager
    /// through `manager`; removes the socket when it stops, so a plugin
    /// fails at once rather than waiting on a dead listener. On
    /// `handed_over` (a new agent serves the same socket) it only stops
    /// accepting, and leaves the socket in place.
    pub(crate) async fn run(
        self,
        manager: mpsc::Sender<CniRequest>,
        stop: CancellationToken,
        handed_over: CancellationToken,
    ) {
        let permits = Arc::new(Semaphore::new(CONCURRENCY));
        tracing::info!(socket = %self.path.display(), "CNI hand-off listening");
        loop {
            let stream = tokio::select! {
                biased;
                _ = handed_over.cancelled() => return,
                _ = stop.cancelled() => break,
                r = self.listener.accept() => match r {
                    Ok((s, _)) => s,
                    Err(e) => {
                        tracing::warn!(socket = %self.path.display(), "CNI accept: {e}");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                },
            };
            let Ok(permit) = permits.clone().acquire_owned().await else {
                break;
            };
            let manager = manager.clone();
            tokio::spawn(async move {
                serve(stream, manager).await;
                drop(permit);
            });
        }
        let _ = std::fs::remove_file(&self.path);
    }
}

async fn serve(mut stream: UnixStream, manager: mpsc::Sender<CniRequest>) {
    // The socket is 0600 already; the peer check also covers a socket
    // path reached through a mount with other permissions.
    match stream.peer_cred() {
        Ok(c) if c.uid() == 0 || c.uid() == nix::unistd::geteuid().as_raw() => {}
        Ok(c) => {
            tracing::warn!(uid = c.uid(), "CNI request from a non-root peer refused");
            return;
        }
        Err(e) => {
            tracing::warn!("CNI peer credentials: {e}");
            return;
        }
    }
    let (read, mut write) = stream.split();
    let mut line = Vec::new();
    let mut reader = BufReader::new(read).take(MAX_LINE as u64);
    let reply = match tokio::time::timeout(READ_TIMEOUT, reader.read_until(b'\n', &mut line)).await {
        Err(_) => Reply::Refused {
            message: format!("no request within {}s", READ_TIMEOUT.as_secs()),
        },
        Ok(Err(e)) => Reply::Refused {
            message: format!("reading the request: {e}"),
        },
        Ok(Ok(_)) if line.last() != Some(&b'\n') => Reply::Refused {
            message: format!("request not a line of at most {MAX_LINE} bytes"),
        },
        Ok(Ok(_)) => match serde_json::from_slice::<Request>(&line) {
            Err(e) => Reply::Refused {
                message: format!("malformed request: {e}"),
            },
            Ok(request) => ask_manager(request, &manager).await,
        },
    };
    if let Reply::Refused { message } = &reply {
        tracing::warn!("CNI request refused: {message}");
    }
    let _ = tokio::time::timeout(READ_TIMEOUT, write.write_all(&protocol::encode(&reply))).await;
}

async fn ask_manager(request: Request, manager: &mpsc::Sender<CniRequest>) -> Reply {
    let (tx, rx) = oneshot::channel();
    let stopping = || Reply::Refused {
        message: "the agent is shutting down".into(),
    };
    if manager.send(CniRequest { request, reply: tx }).await.is_err() {
        return stopping();
    }
    match tokio::time::timeout(ANSWER_TIMEOUT, rx).await {
        Ok(Ok(reply)) => reply,
        Ok(Err(_)) => stopping(),
        Err(_) => Reply::Refused {
            message: format!("the pod manager did not answer within {}s", ANSWER_TIMEOUT.as_secs()),
        },
    }
}
