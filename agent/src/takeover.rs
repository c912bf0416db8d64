//! A rolling upgrade: a new agent on the node takes it over from the one
//! running, with no moment in which a pod's connection meets no listener.
//!
//! The running agent listens on a Unix socket named after the node and
//! the pin layout, `/var/run/nodeward/takeover/<node>.v1.sock`: a
//! directory of the host that only root may enter (0700), which the
//! DaemonSet mounts (as it does for the CNI socket) and no pod can reach
//! without a `hostPath` of its own. Not an abstract name: those belong to
//! the network namespace, which every `hostNetwork` pod shares, and any of
//! them could bind the name first and be talked to as the node's agent.
//!
//! The exchange is one message each way, a JSON line with descriptors
//! (`SCM_RIGHTS`):
//! 1. the new agent sends [`Hello`] with a descriptor of its `PODS` map,
//!    opened from the node's pins;
//! 2. the running agent admits it only if that map is its own (same kernel
//!    map id, so the sender can open the node's bpffs pins, which no pod
//!    can) and the layout is its own ([`admit`]); it stops managing pods
//!    (no more map writes), stops serving its operator ports and the CNI
//!    socket, and answers [`Answer::Released`] with its own `PODS` map
//!    (so the new agent knows it is talking to the node's agent too), the
//!    listening sockets of its operator ports and of the CNI socket, and
//!    what the runtime told it about each pod ([`CniState`]);
//! 3. the new agent serves those sockets (their queues are shared, so no
//!    probe, scrape or CNI request is lost), files its own listeners in
//!    each pod's `LISTENERS` slots (each one map update: the old agent's
//!    listener gets no connection after it), and turns Ready;
//! 4. on SIGTERM the old agent accepts what its listeners still hold,
//!    sends GOAWAY on its tunnels, relays until its connections end or the
//!    drain timeout, and exits 0.
//!
//! Everything here but the socket calls is a decision without I/O
//! ([`admit`], [`parse_answer`]), tested as tables.

use std::io::{self, IoSlice, IoSliceMut, Read, Write};
use std::net::IpAddr;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::os::unix::fs::{DirBuilderExt, MetadataExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::time::Duration;

use nix::sys::socket::{ControlMessage, ControlMessageOwned, MsgFlags, recvmsg, sendmsg};
use serde::{Deserialize, Serialize};

use crate::capture::LAYOUT;

/// The longest message either side accepts: a node's CNI records, with
/// room (a record is a few hundred bytes; a node runs a few hundred pods).
const MAX_MESSAGE: usize = 4 << 20;
/// The most descriptors an answer carries: the map and four listeners.
const MAX_FDS: usize = 8;
/// How long either side waits for the other's message. The running agent
/// answers once its pod manager has finished the round it is in.
pub(crate) const EXCHANGE_TIMEOUT: Duration = Duration::from_secs(30);

/// This build's version, exchanged for the logs.
const VERSION: &str = env!("CARGO_PKG_VERSION");

/// Where the node's running agent listens for a successor: root's only.
pub(crate) const CONTROL_DIR: &str = "/var/run/nodeward/takeover";

/// The control socket of a node's running agent.
pub(crate) fn control_path(node: &str) -> PathBuf {
    // A node name is a DNS subdomain; nothing in it may leave the directory.
    let safe: String = node.chars().map(|c| if c == '/' { '_' } else { c }).collect();
    // A socket path has 107 bytes: a long name (up to 253) keeps a prefix
    // and a digest of the whole.
    let safe = if safe.len() > 48 {
        let digest = ring::digest::digest(&ring::digest::SHA256, node.as_bytes());
        let hex: String = digest.as_ref()[..8].iter().map(|b| format!("{b:02x}")).collect();
        let cut = (0..=32).rev().find(|i| safe.is_char_boundary(*i)).unwrap_or(0);
        format!("{}-{hex}", &safe[..cut])
    } else {
        safe
    };
    Path::new(CONTROL_DIR).join(format!("{safe}.v{LAYOUT}.sock"))
}

/// The control directory, made if missing, and checked: a directory owned
/// by root that no one else may write or enter (a socket in one anyone
/// could write could be replaced by anyone's).
fn control_dir(path: &Path) -> io::Result<&Path> {
    let dir = path
        .parent()
        .ok_or_else(|| io::Error::other("the control socket has no directory"))?;
    std::fs::DirBuilder::new().recursive(true).mode(0o700).create(dir)?;
    let m = std::fs::symlink_metadata(dir)?;
    if !m.is_dir() || m.uid() != 0 || m.mode() & 0o077 != 0 {
        return Err(io::Error::other(format!(
            "{} is not a directory that only root may enter (owner {}, mode {:o}): refusing to use it",
            dir.display(),
            m.uid(),
            m.mode() & 0o7777
        )));
    }
    Ok(dir)
}

/// What a new agent sends.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct Hello {
    /// Its pin layout ([`LAYOUT`]).
    pub(crate) layout: u32,
    /// Its version.
    pub(crate) version: String,
}

impl Hello {
    /// This build's hello.
    pub(crate) fn ours() -> Self {
        Hello {
            layout: LAYOUT,
            version: VERSION.into(),
        }
    }
}

/// A listening socket the running agent hands over.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub(crate) enum Handed {
    /// `--readiness-addr`.
    Readiness,
    /// `--metrics-addr`.
    Metrics,
    /// `--admin-addr`.
    Admin,
    /// `--cni-socket`.
    Cni,
}

/// What the runtime told the running agent about one pod (its CNI ADD):
/// the new agent has not seen that ADD, and without it would look for the
/// pod by address, or not find a pod the API lists without one yet.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct CniRecord {
    /// Pod uid.
    pub(crate) uid: String,
    /// `namespace/name`.
    pub(crate) key: String,
    /// The sandbox.
    pub(crate) container_id: String,
    /// The runtime's namespace path.
    pub(crate) netns: PathBuf,
    /// That namespace's cookie: the path is reopened, and must still name it.
    pub(crate) cookie: u64,
    /// Addresses of the runtime's result.
    pub(crate) ips: Vec<IpAddr>,
    /// Held closed, waiting for its config.
    pub(crate) held: bool,
}

/// The running agent's CNI knowledge.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct CniState {
    /// Pods whose namespace the runtime handed over.
    pub(crate) pods: Vec<CniRecord>,
    /// Namespaces the runtime deleted, by pod uid: never captured again.
    pub(crate) released: Vec<(String, Vec<u64>)>,
    /// Pods whose sandbox was deleted, waiting for the ADD of a new one.
    pub(crate) awaiting_add: Vec<String>,
}

/// What the running agent answers.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "answer", rename_all = "snake_case")]
pub(crate) enum Answer {
    /// It manages nothing any more; the descriptors follow its own `PODS`
    /// map, in `handed`'s order.
    Released {
        /// Its version.
        version: String,
        /// The listening sockets, in descriptor order.
        handed: Vec<Handed>,
        /// What the runtime told it.
        cni: CniState,
    },
    /// It keeps the node.
    Refused {
        /// Why, for the new agent's error.
        reason: String,
    },
}

/// Why a new agent could not take over (it then does not start: the pods
/// stay with the running agent).
#[derive(Debug, thiserror::Error)]
pub enum TakeoverError {
    /// The running agent said no.
    #[error("the agent running on this node refused to hand it over: {0}")]
    Refused(String),
    /// The exchange failed.
    #[error("taking over through {name}: {source}")]
    Io {
        /// The control socket's name.
        name: String,
        /// Why.
        source: io::Error,
    },
    /// The other side sent something that is not the protocol.
    #[error("taking over through {name}: {message}")]
    Protocol {
        /// The control socket's name.
        name: String,
        /// What was wrong.
        message: String,
    },
    /// The process on the socket does not hold the node's maps.
    #[error(
        "the process listening on {name} does not hold this node's pinned maps, so it is no Nodeward agent of this node; nothing is taken from it"
    )]
    NotAnAgent {
        /// The control socket's name.
        name: String,
    },
}

/// Whether a new agent may take the node: it must hold the node's own
/// `PODS` map (`theirs`, the kernel id of the map it sent; `None` if it
/// sent none or not a map) and use the same pin layout.
pub(crate) fn admit(hello: &Hello, theirs: Option<u32>, ours: u32) -> Result<(), String> {
    if theirs != Some(ours) {
        return Err(match theirs {
            None => {
                "no map descriptor came with the request: only an agent holding the node's pins may take over".into()
            }
            Some(id) => format!(
                "the map sent is map {id}, not this node's PODS map ({ours}): only an agent holding the node's pins may take over"
            ),
        });
    }
    if hello.layout != LAYOUT {
        return Err(format!(
            "the new agent ({}) uses pin layout v{}, this one v{LAYOUT}: neither can read the other's maps, so the pods stay here",
            hello.version, hello.layout
        ));
    }
    Ok(())
}

/// What an answer gives the new agent, once the first descriptor (the
/// running agent's `PODS` map, `theirs`) is checked against its own.
pub(crate) fn parse_answer(
    line: &[u8],
    theirs: Option<u32>,
    ours: u32,
    fds: usize,
) -> Result<(String, Vec<Handed>, CniState), AnswerError> {
    let answer: Answer = serde_json::from_slice(line).map_err(|e| AnswerError::Protocol(format!("the answer: {e}")))?;
    match answer {
        Answer::Refused { reason } => Err(AnswerError::Refused(reason)),
        Answer::Released { version, handed, cni } => {
            if theirs != Some(ours) {
                return Err(AnswerError::NotAnAgent);
            }
            if handed.len() + 1 != fds {
                return Err(AnswerError::Protocol(format!(
                    "{} sockets named, {} descriptors sent",
                    handed.len(),
                    fds.saturating_sub(1)
                )));
            }
            let mut seen = std::collections::HashSet::new();
            if let Some(h) = handed.iter().find(|h| !seen.insert(**h)) {
                return Err(AnswerError::Protocol(format!("{h:?} handed over twice")));
            }
            Ok((version, handed, cni))
        }
    }
}

/// Why an answer is not a hand-over.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum AnswerError {
    /// The running agent refused.
    Refused(String),
    /// Not the protocol.
    Protocol(String),
    /// Its map is not the node's.
    NotAnAgent,
}

/// The kernel id of the BPF map behind `fd`, from `/proc/self/fdinfo`;
/// `None` if it is no map.
pub(crate) fn map_id(fd: BorrowedFd<'_>) -> Option<u32> {
    let info = std::fs::read_to_string(format!("/proc/self/fdinfo/{}", fd.as_raw_fd())).ok()?;
    info.lines()
        .find_map(|l| l.strip_prefix("map_id:"))
        .and_then(|v| v.trim().parse().ok())
}

/// Sends one JSON line with descriptors.
fn send(stream: &UnixStream, msg: &impl Serialize, fds: &[BorrowedFd<'_>]) -> io::Result<()> {
    let mut line = serde_json::to_vec(msg).map_err(io::Error::other)?;
    line.push(b'\n');
    let raw: Vec<i32> = fds.iter().map(|f| f.as_raw_fd()).collect();
    let cmsg = [ControlMessage::ScmRights(&raw)];
    let cmsgs: &[ControlMessage<'_>] = if raw.is_empty() { &[] } else { &cmsg };
    let sent = sendmsg::<()>(
        stream.as_raw_fd(),
        &[IoSlice::new(&line)],
        cmsgs,
        MsgFlags::empty(),
        None,
    )
    .map_err(io::Error::from)?;
    // The descriptors went with the first byte; the rest is plain data.
    (&*stream).write_all(&line[sent..])
}

/// Receives one JSON line and the descriptors sent with it.
fn receive(stream: &UnixStream) -> io::Result<(Vec<u8>, Vec<OwnedFd>)> {
    let mut buf = vec![0u8; 64 * 1024];
    let mut cmsg = nix::cmsg_space!([std::os::fd::RawFd; MAX_FDS]);
    let (n, fds) = {
        let mut iov = [IoSliceMut::new(&mut buf)];
        let msg = recvmsg::<()>(
            stream.as_raw_fd(),
            &mut iov,
            Some(&mut cmsg),
            MsgFlags::MSG_CMSG_CLOEXEC,
        )
        .map_err(io::Error::from)?;
        let mut fds = Vec::new();
        for c in msg.cmsgs().map_err(io::Error::from)? {
            if let ControlMessageOwned::ScmRights(raw) = c {
                for fd in raw {
                    // SAFETY: the kernel just installed `fd` in this
                    // process for this message; nothing else owns it.
                    fds.push(unsafe { OwnedFd::from_raw_fd(fd) });
                }
            }
        }
        if msg.flags.contains(MsgFlags::MSG_CTRUNC) {
            return Err(io::Error::other("more descriptors than the protocol sends"));
        }
        (msg.bytes, fds)
    };
    let mut line = buf[..n].to_vec();
    let mut chunk = [0u8; 16 * 1024];
    while !line.contains(&b'\n') {
        if line.len() > MAX_MESSAGE {
            return Err(io::Error::other(format!("a message over {MAX_MESSAGE} bytes")));
        }
        let n = (&*stream).read(&mut chunk)?;
        if n == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "closed before a whole message",
            ));
        }
        line.extend_from_slice(&chunk[..n]);
    }
    let end = line.iter().position(|b| *b == b'\n').unwrap_or(line.len());
    line.truncate(end);
    Ok((line, fds))
}

/// What a new agent takes over.
#[derive(Debug)]
pub(crate) struct Inherited {
    /// The previous agent's version.
    pub(crate) version: String,
    /// Its listening sockets.
    pub(crate) listeners: Vec<(Handed, OwnedFd)>,
    /// What the runtime told it.
    pub(crate) cni: CniState,
    /// The exchange's connection, kept open: it closes when the previous
    /// agent exits.
    pub(crate) stream: UnixStream,
}

impl Inherited {
    /// Takes the socket handed over as `which`, if it was.
    pub(crate) fn take(&mut self, which: Handed) -> Option<OwnedFd> {
        let i = self.listeners.iter().position(|(h, _)| *h == which)?;
        Some(self.listeners.remove(i).1)
    }
}

/// Asks the agent running on `node` to hand the node over, proving with
/// `pods_map` (this agent's `PODS` map) that this agent holds its pins.
/// `None`: no agent is listening (none runs, or it died): a plain start.
pub(crate) fn request(node: &str, pods_map: BorrowedFd<'_>) -> Result<Option<Inherited>, TakeoverError> {
    let path = control_path(node);
    let name = path.display().to_string();
    let io_err = |source| TakeoverError::Io {
        name: name.clone(),
        source,
    };
    control_dir(&path).map_err(io_err)?;
    let stream = match UnixStream::connect(&path) {
        Ok(s) => s,
        // None runs, or the last one is gone (its socket file stays).
        Err(e) if matches!(e.kind(), io::ErrorKind::ConnectionRefused | io::ErrorKind::NotFound) => {
            return Ok(None);
        }
        Err(e) => return Err(io_err(e)),
    };
    stream.set_read_timeout(Some(EXCHANGE_TIMEOUT)).map_err(io_err)?;
    stream.set_write_timeout(Some(EXCHANGE_TIMEOUT)).map_err(io_err)?;
    send(&stream, &Hello::ours(), &[pods_map]).map_err(io_err)?;
    let (line, mut fds) = receive(&stream).map_err(io_err)?;
    let theirs = fds.first().and_then(|f| map_id(f.as_fd()));
    let ours = map_id(pods_map).ok_or_else(|| TakeoverError::Protocol {
        name: name.clone(),
        message: "this agent's own PODS map has no id".into(),
    })?;
    let (version, handed, cni) = parse_answer(&line, theirs, ours, fds.len()).map_err(|e| match e {
        AnswerError::Refused(r) => TakeoverError::Refused(r),
        AnswerError::Protocol(message) => TakeoverError::Protocol {
            name: name.clone(),
            message,
        },
        AnswerError::NotAnAgent => TakeoverError::NotAnAgent { name: name.clone() },
    })?;
    fds.remove(0);
    stream.set_read_timeout(None).map_err(io_err)?;
    Ok(Some(Inherited {
        version,
        listeners: handed.into_iter().zip(fds).collect(),
        cni,
        stream,
    }))
}

/// The running agent's side: the control socket.
#[derive(Debug)]
pub(crate) struct ControlServer {
    listener: tokio::net::UnixListener,
    name: String,
}

/// A new agent that asked to take over and was admitted.
#[derive(Debug)]
pub(crate) struct Successor {
    stream: UnixStream,
    /// What it said.
    pub(crate) hello: Hello,
}

impl ControlServer {
    /// Listens as `node`'s running agent. A previous agent still listening
    /// (it answers a takeover, then lets go) is waited for, briefly.
    pub(crate) async fn bind(node: &str) -> io::Result<Self> {
        let path = control_path(node);
        let name = path.display().to_string();
        control_dir(&path)?;
        let mut tries = 0;
        let listener = loop {
            // A socket file no one listens on is a previous agent's.
            match UnixStream::connect(&path) {
                Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => match std::fs::remove_file(&path) {
                    Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(e),
                    _ => {}
                },
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => return Err(e),
                // A previous agent still listening answers a takeover, then
                // lets go: wait for it, briefly.
                Ok(_) if tries < 50 => {
                    tries += 1;
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
                Ok(_) => return Err(io::Error::new(io::ErrorKind::AddrInUse, "another agent listens there")),
            }
            match UnixListener::bind(&path) {
                Ok(l) => break l,
                Err(e) if e.kind() == io::ErrorKind::AddrInUse && tries < 50 => {
                    tries += 1;
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                Err(e) => return Err(e),
            }
        };
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))?;
        listener.set_nonblocking(true)?;
        Ok(ControlServer {
            listener: tokio::net::UnixListener::from_std(listener)?,
            name,
        })
    }

    /// The socket's name, for logs.
    pub(crate) fn name(&self) -> &str {
        &self.name
    }

    /// Waits for a new agent that may take over (`ours`: the kernel id of
    /// this agent's `PODS` map); refuses, with the reason, any other.
    pub(crate) async fn next_successor(&self, ours: u32) -> Successor {
        loop {
            let Ok((stream, _)) = self.listener.accept().await else {
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            };
            let read = tokio::task::spawn_blocking(move || {
                let stream = stream.into_std()?;
                stream.set_nonblocking(false)?;
                stream.set_read_timeout(Some(EXCHANGE_TIMEOUT))?;
                stream.set_write_timeout(Some(EXCHANGE_TIMEOUT))?;
                let (line, fds) = receive(&stream)?;
                Ok::<_, io::Error>((stream, line, fds))
            })
            .await;
            let (stream, line, fds) = match read {
                Ok(Ok(r)) => r,
                Ok(Err(e)) => {
                    tracing::warn!(socket = %self.name, "takeover request unreadable: {e}");
                    continue;
                }
                Err(_) => continue,
            };
            let hello: Hello = match serde_json::from_slice(&line) {
                Ok(h) => h,
                Err(e) => {
                    let reason = format!("not a takeover request: {e}");
                    tracing::warn!(socket = %self.name, "{reason}");
                    refuse(&stream, reason);
                    continue;
                }
            };
            let theirs = match fds.as_slice() {
                [one] => map_id(one.as_fd()),
                _ => None,
            };
            match admit(&hello, theirs, ours) {
                Ok(()) => return Successor { stream, hello },
                Err(reason) => {
                    tracing::warn!(socket = %self.name, version = %hello.version, "takeover refused: {reason}");
                    refuse(&stream, reason);
                }
            }
        }
    }
}

fn refuse(stream: &UnixStream, reason: String) {
    let _ = send(stream, &Answer::Refused { reason }, &[]);
}

impl Successor {
    /// Hands the node over: this agent's `PODS` map first, then `sockets`.
    /// The connection is returned, to be held until this agent exits.
    pub(crate) fn release(
        self,
        pods_map: BorrowedFd<'_>,
        sockets: &[(Handed, OwnedFd)],
        cni: CniState,
    ) -> io::Result<UnixStream> {
        let answer = Answer::Released {
            version: VERSION.into(),
            handed: sockets.iter().map(|(h, _)| *h).collect(),
            cni,
        };
        let mut fds = vec![pods_map];
        fds.extend(sockets.iter().map(|(_, f)| f.as_fd()));
        send(&self.stream, &answer, &fds)?;
        Ok(self.stream)
    }

    /// Says no, with the reason.
    pub(crate) fn refuse(self, reason: String) {
        refuse(&self.stream, reason);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hello(layout: u32) -> Hello {
        Hello {
            layout,
            version: "9.9.9".into(),
        }
    }

    #[test]
    fn only_an_agent_holding_the_nodes_own_map_and_layout_is_admitted() {
        type Row = (&'static str, Hello, Option<u32>, Result<(), &'static str>);
        let table: &[Row] = &[
            ("the node's map, same layout", hello(LAYOUT), Some(7), Ok(())),
            (
                "no descriptor (any process on the host network)",
                hello(LAYOUT),
                None,
                Err("no map descriptor"),
            ),
            (
                "another map (another node's pins, its own map)",
                hello(LAYOUT),
                Some(8),
                Err("map 8, not this node's"),
            ),
            (
                "the node's map, another layout",
                hello(LAYOUT + 1),
                Some(7),
                Err("pin layout v2"),
            ),
        ];
        for (what, h, theirs, want) in table {
            let got = admit(h, *theirs, 7);
            match (want, &got) {
                (Ok(()), Ok(())) => {}
                (Err(frag), Err(msg)) => assert!(msg.contains(frag), "{what}: {msg}"),
                _ => panic!("{what}: {got:?}"),
            }
        }
    }

    fn released(handed: Vec<Handed>) -> Vec<u8> {
        serde_json::to_vec(&Answer::Released {
            version: "1.0.0".into(),
            handed,
            cni: CniState::default(),
        })
        .unwrap()
    }

    #[test]
    fn an_answer_is_a_hand_over_only_from_the_nodes_agent_with_one_descriptor_per_socket() {
        use Handed::*;
        let two = released(vec![Readiness, Metrics]);
        type Row = (&'static str, Vec<u8>, Option<u32>, usize, Result<usize, AnswerError>);
        let table: &[Row] = &[
            ("map and two sockets", two.clone(), Some(3), 3, Ok(2)),
            (
                "a stranger's map",
                two.clone(),
                Some(4),
                3,
                Err(AnswerError::NotAnAgent),
            ),
            ("no map", two.clone(), None, 2, Err(AnswerError::NotAnAgent)),
            (
                "a socket short",
                two.clone(),
                Some(3),
                2,
                Err(AnswerError::Protocol("2 sockets named, 1 descriptors sent".into())),
            ),
            (
                "a socket twice",
                released(vec![Admin, Admin]),
                Some(3),
                3,
                Err(AnswerError::Protocol("Admin handed over twice".into())),
            ),
            (
                "refused",
                serde_json::to_vec(&Answer::Refused { reason: "busy".into() }).unwrap(),
                Some(3),
                0,
                Err(AnswerError::Refused("busy".into())),
            ),
        ];
        for (what, line, theirs, fds, want) in table {
            let got = parse_answer(line, *theirs, 3, *fds).map(|(_, h, _)| h.len());
            assert_eq!(&got, want, "{what}");
        }
        assert!(matches!(
            parse_answer(b"{\"answer\":\"maybe\"}", Some(3), 3, 1),
            Err(AnswerError::Protocol(_))
        ));
    }

    #[test]
    fn a_message_with_descriptors_crosses_whole_and_a_truncated_one_is_an_error() {
        let (a, b) = UnixStream::pair().unwrap();
        let file = std::fs::File::open("/proc/self/status").unwrap();
        let state = CniState {
            pods: (0..2000)
                .map(|i| CniRecord {
                    uid: format!("uid-{i}"),
                    key: format!("ns/pod-{i}"),
                    container_id: "c".repeat(64),
                    netns: format!("/var/run/netns/cni-{i}").into(),
                    cookie: i,
                    ips: vec!["10.0.0.1".parse().unwrap()],
                    held: i % 2 == 0,
                })
                .collect(),
            ..Default::default()
        };
        let msg = Answer::Released {
            version: "x".into(),
            handed: vec![Handed::Cni],
            cni: state.clone(),
        };
        let sender = std::thread::spawn(move || send(&a, &msg, &[file.as_fd()]).unwrap());
        let (line, fds) = receive(&b).unwrap();
        sender.join().unwrap();
        assert_eq!(fds.len(), 1, "the descriptor came with the message");
        let back: Answer = serde_json::from_slice(&line).unwrap();
        assert!(
            matches!(back, Answer::Released { cni, .. } if cni == state),
            "a message over 64 KiB arrives whole"
        );

        let (a, b) = UnixStream::pair().unwrap();
        (&a).write_all(b"{\"answer\":").unwrap();
        drop(a);
        let e = receive(&b).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::UnexpectedEof);
    }

    #[test]
    fn every_node_name_gives_a_socket_path_that_fits_and_stays_in_the_directory() {
        let long = "n".repeat(253);
        for node in [
            "node-1",
            "a/../../etc",
            long.as_str(),
            "ünï-côdé-ünï-côdé-ünï-côdé-ünï-côdé-ünï-côdé-ünï",
        ] {
            let p = control_path(node);
            assert!(p.as_os_str().len() < 108, "{node}: {}", p.display());
            assert_eq!(p.parent(), Some(Path::new(CONTROL_DIR)), "{node}: {}", p.display());
        }
        assert_ne!(control_path(&long), control_path(&format!("{long}x")));
    }

    #[test]
    fn a_descriptor_that_is_no_bpf_map_has_no_map_id() {
        let file = std::fs::File::open("/proc/self/status").unwrap();
        assert_eq!(map_id(file.as_fd()), None);
    }
}
