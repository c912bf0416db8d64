//! Sockets made inside a pod's namespace, marked as the agent's own.

use std::io;
use std::net::SocketAddr;
use std::os::fd::AsRawFd;
use std::time::Duration;

use nodeward_common::ListenerKey;
use tokio::net::{TcpListener, TcpSocket, TcpStream};

use crate::capture::Capture;
use crate::netns::{Netns, NetnsError};

/// Listen backlog; large enough for connection bursts.
const BACKLOG: i32 = 4096;

/// A listening socket bound to `addr` inside `netns`.
pub fn listen_in(netns: &Netns, addr: SocketAddr, mark: u32) -> Result<TcpListener, NetnsError> {
    let sock = netns.socket(socket2::Domain::for_address(addr), Some(mark))?;
    let err = |source| NetnsError::Socket {
        path: netns.path().to_path_buf(),
        source,
    };
    if addr.is_ipv6() {
        sock.set_only_v6(true).map_err(err)?;
    }
    // A restarted agent must rebind while its old connections linger.
    sock.set_reuse_address(true).map_err(err)?;
    sock.bind(&addr.into())
        .map_err(|e| err(io::Error::new(e.kind(), format!("bind {addr}: {e}"))))?;
    sock.listen(BACKLOG).map_err(err)?;
    sock.set_nonblocking(true).map_err(err)?;
    TcpListener::from_std(sock.into()).map_err(err)
}

/// Puts a listener into the sk_lookup sock hash under the pod's slot.
pub fn register_listener(capture: &Capture, netns: u64, slot: u32, l: &TcpListener) -> io::Result<()> {
    let key = ListenerKey { netns, slot, pad: 0 };
    capture.maps.listeners.insert(&key, &(l.as_raw_fd() as u32))
}

/// Connects from inside the pod's namespace, optionally from `bind`, with
/// the agent's mark so capture ignores it. `before_connect` sees the bound
/// local address first (the inbound hop registers it for getpeername).
pub async fn connect_from_pod(
    netns: &Netns,
    mark: u32,
    bind: Option<SocketAddr>,
    dst: SocketAddr,
    timeout: Duration,
    before_connect: impl FnOnce(SocketAddr) -> io::Result<()>,
) -> io::Result<TcpStream> {
    let sock = netns
        .socket(socket2::Domain::for_address(dst), Some(mark))
        .map_err(|e| io::Error::other(e.to_string()))?;
    sock.set_nonblocking(true)?;
    sock.set_tcp_nodelay(true)?;
    if let Some(b) = bind {
        sock.bind(&b.into())?;
    }
    let local = sock
        .local_addr()?
        .as_socket()
        .ok_or_else(|| io::Error::other("socket has no inet address"))?;
    before_connect(local)?;
    let sock = TcpSocket::from_std_stream(std::net::TcpStream::from(sock));
    match tokio::time::timeout(timeout, sock.connect(dst)).await {
        Ok(r) => r,
        Err(_) => Err(io::Error::new(io::ErrorKind::TimedOut, "connect timed out")),
    }
}

/// Makes the next close send a reset, so a failure on one side is seen as a
/// failure on the other, not as a clean end of data.
pub fn reset(s: &TcpStream) {
    let _ = socket2::SockRef::from(s).set_linger(Some(Duration::ZERO));
}
