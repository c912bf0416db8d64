//! The hop into the pod: the agent's own connection to the app, which both
//! inbound steps (plaintext and tunnel streams) end in. It comes from the
//! pod's loopback, and the real client is filed for the app's
//! `accept()`/`getpeername()` before the SYN leaves.

#![forbid(unsafe_code)]

use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use nodeward_common::{INBOUND_PORT, OUTBOUND_PORT, TUNNEL_PORT};
use tokio::net::TcpStream;

use super::{PodContext, socket};
use crate::capture::keys::{sock_addr, sock_key};
use crate::outcome::CloseReason;

/// Connects to the app at `dst` from inside the pod, so that the app sees
/// `client` as its peer.
///
/// The hop comes from the pod's loopback (`127.0.0.6`, `::1`), not from the
/// pod's IP: the kernel may reuse a loopback 4-tuple still in TIME_WAIT
/// (`tcp_tw_reuse`), so thousands of hops a second to one app port do not
/// run out of ports, and `connect()` picks the port with its fast 4-tuple
/// search. The client is left under the socket's cookie; sockops files it
/// under (hop endpoint, app port) inside `connect()`, before the SYN, so
/// the app can never accept the hop before its real peer is known, and
/// removes it when the hop closes. If it was not filed (a full map), the
/// app would see a loopback peer, which apps tend to trust: the hop is
/// refused instead.
pub(crate) async fn connect_app(ctx: &PodContext, dst: SocketAddr, client: SocketAddr) -> io::Result<TcpStream> {
    if dst.ip().is_loopback() || is_agent_port(dst.port()) {
        // The agent's own listeners: a hop there would come back to us.
        return Err(io::Error::other(LoopRefused(dst)));
    }
    let maps = &ctx.capture.maps;
    let client = sock_addr(client);
    let sock = socket::pod_socket(&ctx.netns, ctx.config.socket_mark, dst, Some(hop_source(dst.ip())))?;
    let cookie = sock.cookie()?;
    maps.hop_peer.insert(&cookie, &client)?;
    let connecting = match socket::Connecting::start(&ctx.capture, sock, dst) {
        Ok(c) => c,
        Err(e) => {
            // connect() failed before choosing a port: sockops never ran.
            let _ = maps.hop_peer.remove(&cookie);
            return Err(e);
        }
    };
    let key = sock_key(ctx.netns.cookie(), connecting.local_addr(), dst.port());
    if !matches!(maps.inbound_peer.get(&key), Ok(Some(filed)) if filed == client) {
        // Over loopback a refused connect() is over before it returns, and
        // its entry already gone with it: report the refusal itself.
        let e = connecting.take_error().unwrap_or_else(|| {
            io::Error::other("the hop's client could not be filed for the app's getpeername (INBOUND_PEER full?)")
        });
        connecting.abort();
        return Err(e);
    }
    connecting.finish(ctx.config.connect_timeout).await
}

/// Source address of the hop to an app at `dst`: the loopback of its family
/// (Istio uses 127.0.0.6 for the same purpose).
fn hop_source(dst: IpAddr) -> IpAddr {
    match dst {
        IpAddr::V4(_) => IpAddr::V4(Ipv4Addr::new(127, 0, 0, 6)),
        IpAddr::V6(_) => IpAddr::V6(Ipv6Addr::LOCALHOST),
    }
}

/// A hop the agent refused to dial because it would reach its own listeners.
#[derive(Debug, thiserror::Error)]
#[error("{0} is the agent's own listener: not dialled")]
pub(crate) struct LoopRefused(pub SocketAddr);

/// Whether `port` is one of the agent's listener ports (15001, 15006,
/// 15008), which no app behind the agent may be reached on.
pub(crate) fn is_agent_port(port: u16) -> bool {
    matches!(port, OUTBOUND_PORT | INBOUND_PORT | TUNNEL_PORT)
}

/// The close reason of a failed [`connect_app`].
pub(crate) fn close_reason(e: &io::Error) -> CloseReason {
    if e.get_ref().is_some_and(|inner| inner.is::<LoopRefused>()) {
        CloseReason::LoopRefused
    } else {
        CloseReason::from_io(e)
    }
}
