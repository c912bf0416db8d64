//! Inbound plaintext: a connection to the pod, steered to 15006 by sk_lookup.
//!
//! sk_lookup does not rewrite packets, so the accepted socket's local
//! address *is* the original destination. The agent connects to it from
//! inside the pod (loopback delivery, which sk_lookup leaves alone) and
//! registers its hop's endpoint so the app's `accept()`/`getpeername()`
//! report the real client. The tunnel listener reuses [`connect_app`].

#![forbid(unsafe_code)]

use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use nodeward_common::{INBOUND_PORT, OUTBOUND_PORT, TUNNEL_PORT};
use tokio::net::TcpStream;

use super::relay::CloseReason;
use super::{Outcome, PodContext, log_audits, relay_tcp, sock_addr, sock_key, socket, unmap};
use crate::policy::ConnInfo;
use crate::policy::model::Mode;

/// Handles one inbound plaintext connection: refused on a STRICT port,
/// otherwise authorized without a principal (PERMISSIVE), then relayed.
pub async fn handle(ctx: &PodContext, down: TcpStream, peer: SocketAddr) -> Outcome {
    let dst = match down.local_addr() {
        Ok(a) => unmap(a),
        Err(_) => return Outcome::refused(None, CloseReason::IoError),
    };
    if dst.ip().is_loopback() {
        // Only an app inside the pod can reach the listener by its loopback
        // address (sk_lookup hands over outside traffic with the pod's IP as
        // local address); relaying it would dial this listener again.
        socket::reset(&down);
        return Outcome::refused(Some(dst), CloseReason::LoopRefused);
    }
    let client = unmap(peer);
    let snap = ctx.mesh.store.current();
    let Some(pod) = snap.pods.get(&ctx.pod.key).cloned() else {
        socket::reset(&down);
        return Outcome::refused(Some(dst), CloseReason::PodRemoved);
    };
    if snap.mtls(&pod).mode(dst.port()) == Mode::Strict {
        socket::reset(&down);
        return Outcome::refused(Some(dst), CloseReason::MtlsStrict);
    }
    let info = ConnInfo {
        src_ip: client.ip(),
        src_identity: None,
        dst_ip: dst.ip(),
        dst_port: dst.port(),
    };
    let decision = snap.authorize(&pod, &info);
    log_audits(ctx, &info, &decision);
    if !decision.allowed {
        socket::reset(&down);
        let mut o = Outcome::refused(Some(dst), CloseReason::PolicyDenied);
        o.refusal = Some(decision.reason);
        o.policy = decision.policy;
        return o;
    }
    let live = ctx.live.register(info, &ctx.cancel);
    let up = match connect_app(ctx, dst, client).await {
        Ok(c) => c,
        Err(e) => {
            // The app's port is closed (or worse): the client must see a
            // reset, as it would without the mesh, not a hang.
            socket::reset(&down);
            return Outcome::refused(Some(dst), close_reason(&e));
        }
    };
    let mut stats = relay_tcp(ctx, down, up, &live.cancel).await;
    if live.closed_by_policy() {
        stats.reason = Some(CloseReason::PolicyChanged);
    }
    Outcome::relayed(dst, stats, "plaintext")
}

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
pub async fn connect_app(ctx: &PodContext, dst: SocketAddr, client: SocketAddr) -> io::Result<TcpStream> {
    if dst.ip().is_loopback() || is_agent_port(dst.port()) {
        // The agent's own listeners: a hop there would come back to us.
        return Err(io::Error::other(LoopRefused(dst)));
    }
    let maps = &ctx.capture.maps;
    let client = sock_addr(client);
    let sock = socket::pod_socket(&ctx.netns, ctx.config.socket_mark, dst, Some(hop_source(dst.ip())))?;
    let cookie = sock.cookie()?;
    maps.hop_peer.insert(&cookie, &client)?;
    let connecting = match socket::Connecting::start(sock, dst) {
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
pub struct LoopRefused(pub SocketAddr);

/// Whether `port` is one of the agent's listener ports (15001, 15006,
/// 15008), which no app behind the agent may be reached on.
pub fn is_agent_port(port: u16) -> bool {
    matches!(port, OUTBOUND_PORT | INBOUND_PORT | TUNNEL_PORT)
}

/// The close reason of a failed [`connect_app`].
pub fn close_reason(e: &io::Error) -> CloseReason {
    if e.get_ref().is_some_and(|inner| inner.is::<LoopRefused>()) {
        CloseReason::LoopRefused
    } else {
        CloseReason::from_io(e)
    }
}
