//! Sockets made inside a pod's namespace, marked as the agent's own, and
//! their `connect()`, during which each is registered as the agent's in
//! `AGENT_SOCKETS` (the mark alone proves nothing: any process with
//! `CAP_NET_RAW` can set it).

#![forbid(unsafe_code)]

use std::io;
use std::net::{IpAddr, SocketAddr};
use std::os::fd::AsRawFd;
use std::time::Duration;

use nodeward_common::ListenerKey;
use tokio::net::{TcpListener, TcpStream};

use crate::capture::Capture;
use crate::netns::{Netns, NetnsError};

/// Listen backlog; large enough for connection bursts.
const BACKLOG: i32 = 4096;

/// A listening socket bound to `addr` inside `netns`.
pub(crate) fn listen_in(netns: &Netns, addr: SocketAddr, mark: u32) -> Result<TcpListener, NetnsError> {
    let sock = netns.socket(socket2::Domain::for_address(addr), Some(mark))?;
    let err = |source| NetnsError::Socket {
        path: netns.path().to_path_buf(),
        source,
    };
    if addr.is_ipv6() {
        sock.set_only_v6(true).map_err(err)?;
    }
    // A restarted agent must rebind while its old connections linger, and
    // an agent taking over binds beside the listener it replaces (every
    // listener is reached through `sk_lookup`, which picks the one socket
    // in `LISTENERS`, never another of its reuseport group).
    sock.set_reuse_address(true).map_err(err)?;
    sock.set_reuse_port(true).map_err(err)?;
    sock.bind(&addr.into())
        .map_err(|e| err(io::Error::new(e.kind(), format!("bind {addr}: {e}"))))?;
    sock.listen(BACKLOG).map_err(err)?;
    sock.set_nonblocking(true).map_err(err)?;
    TcpListener::from_std(sock.into()).map_err(err)
}

/// Puts a listener into the sk_lookup sock hash under the pod's slot.
pub(crate) fn register_listener(capture: &Capture, netns: u64, slot: u32, l: &TcpListener) -> io::Result<()> {
    let key = ListenerKey { netns, slot, pad: 0 };
    capture.maps.listeners.insert(&key, &(l.as_raw_fd() as u32))
}

/// A marked TCP socket created inside the pod's namespace for `dst`'s
/// family, optionally bound to the address `source` (never to a port: the
/// port is chosen by `connect()`, see [`Connecting`]).
pub(crate) fn pod_socket(
    netns: &Netns,
    mark: u32,
    dst: SocketAddr,
    source: Option<IpAddr>,
) -> io::Result<socket2::Socket> {
    let sock = netns
        .socket(socket2::Domain::for_address(dst), Some(mark))
        .map_err(|e| io::Error::other(e.to_string()))?;
    sock.set_nonblocking(true)?;
    sock.set_tcp_nodelay(true)?;
    if let Some(ip) = source {
        // Without this, bind(ip, 0) picks a port on the spot by scanning
        // every port bound on `ip`, TIME_WAIT included: it cost three
        // quarters of the agent's CPU at a few thousand connections/s.
        // With it, connect() picks the port for the whole 4-tuple.
        set_bind_address_no_port(&sock)?;
        sock.bind(&SocketAddr::new(ip, 0).into())?;
    }
    Ok(sock)
}

fn set_bind_address_no_port(sock: &socket2::Socket) -> io::Result<()> {
    use nix::sys::socket::{setsockopt, sockopt::IpBindAddressNoPort};
    setsockopt(sock, IpBindAddressNoPort, &true).map_err(io::Error::from)
}

/// A connection whose SYN is on its way: its local endpoint is known (the
/// kernel chose the port in `connect()`), the handshake is not finished.
pub(crate) struct Connecting {
    sock: socket2::Socket,
    local: SocketAddr,
}

impl Connecting {
    /// Issues the non-blocking `connect()`, the socket registered as the
    /// agent's own for the call (see [`connect_as_agent`]).
    pub(crate) fn start(capture: &Capture, sock: socket2::Socket, dst: SocketAddr) -> io::Result<Self> {
        match connect_as_agent(capture, &sock, dst) {
            Ok(()) => {}
            Err(e) if e.raw_os_error() == Some(libc::EINPROGRESS) => {}
            Err(e) => return Err(e),
        }
        let local = sock
            .local_addr()?
            .as_socket()
            .ok_or_else(|| io::Error::other("socket has no inet address"))?;
        Ok(Connecting { sock, local })
    }

    /// The local endpoint the kernel chose.
    pub(crate) fn local_addr(&self) -> SocketAddr {
        self.local
    }

    /// The connection's error, if it has already failed.
    pub(crate) fn take_error(&self) -> Option<io::Error> {
        self.sock.take_error().ok().flatten()
    }

    /// Gives up on the connection; the peer sees a reset, never data.
    pub(crate) fn abort(self) {
        let _ = self.sock.set_linger(Some(Duration::ZERO));
    }

    /// Waits for the handshake, up to `timeout`.
    pub(crate) async fn finish(self, timeout: Duration) -> io::Result<TcpStream> {
        let stream = TcpStream::from_std(std::net::TcpStream::from(self.sock))?;
        let established = async {
            stream.writable().await?;
            if let Some(e) = stream.take_error()? {
                return Err(e);
            }
            // Writable without an error can still mean "not connected" on
            // some paths; the peer address settles it.
            stream.peer_addr()?;
            Ok(())
        };
        match tokio::time::timeout(timeout, established).await {
            Ok(r) => r.map(|()| stream),
            Err(_) => Err(io::Error::new(io::ErrorKind::TimedOut, "connect timed out")),
        }
    }
}

/// `connect()` of one of the agent's own sockets, its cookie filed in
/// `AGENT_SOCKETS` for exactly the call: the connect hooks run inside it
/// (before a non-blocking call returns `EINPROGRESS`), and leave the socket
/// alone only if it carries the mark and is filed. Not filed (the insert
/// failed), the socket is not connected at all: captured, it would come
/// back to the agent as the pod's own connection.
pub(crate) fn connect_as_agent(capture: &Capture, sock: &socket2::Socket, dst: SocketAddr) -> io::Result<()> {
    let agent = &capture.maps.agent_sockets;
    let cookie = sock.cookie()?;
    agent.insert(&cookie, &1).map_err(|e| {
        io::Error::new(
            e.kind(),
            format!("registering the agent's socket in AGENT_SOCKETS: {e}"),
        )
    })?;
    let connected = sock.connect(&dst.into());
    if let Err(e) = agent.remove(&cookie) {
        // Harmless: cookies are never reused, and the map is LRU.
        tracing::debug!(cookie, "AGENT_SOCKETS entry not removed: {e}");
    }
    connected
}

/// Connects from inside the pod's namespace as the agent (marked and
/// registered), so capture leaves the connection alone.
pub(crate) async fn connect_from_pod(
    capture: &Capture,
    netns: &Netns,
    mark: u32,
    dst: SocketAddr,
    timeout: Duration,
) -> io::Result<TcpStream> {
    let sock = pod_socket(netns, mark, dst, None)?;
    Connecting::start(capture, sock, dst)?.finish(timeout).await
}

/// Makes the next close send a reset, so a failure on one side is seen as a
/// failure on the other, not as a clean end of data.
pub(crate) fn reset(s: &TcpStream) {
    let _ = socket2::SockRef::from(s).set_linger(Some(Duration::ZERO));
}
