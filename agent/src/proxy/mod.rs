//! The per-pod proxy: listeners inside the pod's network namespace and the
//! data path behind them, one file per step of ARCHITECTURE.md's walk.
//!
//! * `outbound` — 15001: connections the pod's apps open, redirected by
//!   `connect()`; the original destination comes from the `ORIG_DST` map;
//!   passed through, or handed to `outbound_hbone`, which opens a stream
//!   through a pooled (`pool`) tunnel to the destination's 15008.
//! * `inbound_hbone` — 15008: the HBONE listener (mTLS + HTTP/2 CONNECT);
//!   `hbone` is the wire format and the stream adapter.
//! * `inbound_plaintext` — 15006: plaintext to the pod on any port,
//!   steered by `sk_lookup`.
//! * `hop` — the dial into the pod's app that both inbound steps end in.
//! * `relay` — the one relay every proxied connection ends in; `report`
//!   its log line and counters (`counters`).
//! * `open` — the register of open connections that policy and trust
//!   changes sweep; `limits` — bounds taken in the accept loops before any
//!   work is spent on a connection.

#![forbid(unsafe_code)]

pub(crate) mod counters;
pub(crate) mod egress;
pub(crate) mod hbone;
pub(crate) mod hop;
pub(crate) mod inbound_hbone;
pub(crate) mod inbound_plaintext;
pub(crate) mod limits;
pub mod open;
pub(crate) mod outbound;
pub(crate) mod outbound_hbone;
pub(crate) mod pool;
pub(crate) mod relay;
pub(crate) mod report;
pub(crate) mod socket;

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use nodeward_common::{
    INBOUND_PORT, OUTBOUND_PORT, SLOT_INBOUND_V4, SLOT_INBOUND_V6, SLOT_OUTBOUND_V4, SLOT_OUTBOUND_V6, SLOT_TUNNEL_V4,
    SLOT_TUNNEL_V6, TUNNEL_PORT,
};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::capture::Capture;
use crate::capture::keys::sock_key;
use crate::identity::Identity;
use crate::identity::manager::CertManager;
use crate::netns::{Netns, NetnsError};
use crate::outcome::{Counted, Direction, Refusal};
use crate::state::Store;
use crate::state::workload::ManagedPod;
use limits::Side;
use open::OpenConns;
use relay::RelayOptions;
use report::log_connection;

/// Proxy settings shared by all pods.
#[derive(Clone, Debug)]
pub(crate) struct ProxyConfig {
    /// Mark on every socket the agent opens inside a pod.
    pub(crate) socket_mark: u32,
    /// Deadline for connecting upstream.
    pub(crate) connect_timeout: Duration,
    /// Relay settings.
    pub(crate) relay: RelayOptions,
    /// Mesh-wide egress settings.
    pub(crate) egress: egress::EgressConfig,
}

/// Agent-wide lifecycle signals and the set of live connections.
#[derive(Clone, Debug, Default)]
pub(crate) struct Lifecycle {
    /// Stops every accept loop (drain begins).
    pub(crate) stop_accepting: CancellationToken,
    /// Aborts every connection still open (drain deadline).
    pub(crate) hard_stop: CancellationToken,
    /// Every connection task, so drain can wait for them.
    pub(crate) connections: TaskTracker,
    /// Every accept loop, so drain knows when no listener is left.
    pub(crate) listeners: TaskTracker,
    /// A new agent took the node over (`takeover`): its listeners are the
    /// pods' now, so when drain stops these accept loops they first take
    /// what their queues still hold, instead of resetting it.
    pub(crate) handed_over: CancellationToken,
}

/// What the proxies of all pods share: the state to find destinations in,
/// certificates, the tunnel pool and the register of open connections.
#[derive(Debug)]
pub(crate) struct Mesh {
    /// Cluster state.
    pub(crate) store: Store,
    /// Workload certificates and trust; `None` without a CA.
    pub(crate) certs: Option<Arc<CertManager>>,
    /// Outbound tunnel connections.
    pub(crate) pool: Arc<pool::Pool>,
    /// Open connections, swept on policy and trust changes.
    pub(crate) open: Arc<OpenConns>,
    /// HTTP/2 settings of tunnels.
    pub(crate) h2: hbone::H2Settings,
    /// Outcome counters, recording into the agent's metrics.
    pub(crate) counters: counters::Counters,
    /// Capture state of enrolled pods, for readiness and `/config_dump`.
    pub(crate) captures: Arc<crate::admin::Captures>,
    /// Bounds on connections, tunnels and handshakes.
    pub(crate) limits: Arc<limits::Limits>,
}

/// What a managed pod's handlers share.
#[derive(Debug)]
pub(crate) struct PodContext {
    /// The pod.
    pub(crate) pod: ManagedPod,
    /// Its network namespace.
    pub(crate) netns: Arc<Netns>,
    /// Its identity, when the agent has a CA.
    pub(crate) identity: Option<Identity>,
    /// TLS configuration of its tunnel listener.
    pub(crate) tunnel_tls: Option<Arc<rustls::ServerConfig>>,
    /// Shared mesh services.
    pub(crate) mesh: Arc<Mesh>,
    /// Settings.
    pub(crate) config: Arc<ProxyConfig>,
    /// Maps.
    pub(crate) capture: Arc<Capture>,
    /// Fires when the pod stops being managed or the agent stops hard.
    pub(crate) cancel: CancellationToken,
    /// Agent lifecycle.
    pub(crate) lifecycle: Lifecycle,
}

/// Listeners of one pod, bound inside its namespace.
pub(crate) struct PodListeners {
    outbound: Vec<TcpListener>,
    inbound: Vec<TcpListener>,
    tunnel: Vec<TcpListener>,
}

impl PodListeners {
    /// Binds 15001, 15006 and 15008 on the pod's loopback, IPv4 and (when
    /// the pod has IPv6) IPv6, and registers them for sk_lookup.
    ///
    /// Loopback only: outbound connections reach 15001 by a rewritten
    /// `connect()`, inbound ones reach 15006/15008, all through sk_lookup,
    /// which may hand a connection to any listener regardless of its
    /// address, so nothing outside the pod can address these sockets
    /// directly. Every one is bound before any is registered, and each
    /// registration replaces one slot (an agent taking over replaces the
    /// previous agent's listener there): a connection meets the old
    /// listener or the new, never none.
    pub(crate) fn bind(ctx: &PodContext) -> Result<Self, NetnsError> {
        let mut l = PodListeners {
            outbound: Vec::new(),
            inbound: Vec::new(),
            tunnel: Vec::new(),
        };
        let families: &[(IpAddr, [u32; 3])] = &[
            (
                IpAddr::V4(Ipv4Addr::LOCALHOST),
                [SLOT_OUTBOUND_V4, SLOT_INBOUND_V4, SLOT_TUNNEL_V4],
            ),
            (
                IpAddr::V6(Ipv6Addr::LOCALHOST),
                [SLOT_OUTBOUND_V6, SLOT_INBOUND_V6, SLOT_TUNNEL_V6],
            ),
        ];
        let register = |slot: u32, s: &TcpListener| {
            socket::register_listener(&ctx.capture, ctx.netns.cookie(), slot, s).map_err(|source| NetnsError::Socket {
                path: ctx.netns.path().to_path_buf(),
                source,
            })
        };
        // Bound first, all of them, then filed: a pod is switched from a
        // previous agent's listeners to these slot by slot, each switch one
        // map update, and none before every socket exists.
        let mut bound: Vec<(u32, TcpListener, Direction)> = Vec::new();
        for &(ip, [outbound_slot, inbound_slot, tunnel_slot]) in families {
            let v6 = ip.is_ipv6();
            match socket::listen_in(&ctx.netns, SocketAddr::new(ip, OUTBOUND_PORT), ctx.config.socket_mark) {
                Ok(s) => bound.push((outbound_slot, s, Direction::Outbound)),
                // A namespace without IPv6 cannot have IPv6 connections either.
                Err(e) if v6 => {
                    tracing::debug!(pod = %ctx.pod.key, "no IPv6 listeners: {e}");
                    continue;
                }
                Err(e) => return Err(e),
            }
            for (port, slot, dir) in [
                (INBOUND_PORT, inbound_slot, Direction::Inbound),
                (TUNNEL_PORT, tunnel_slot, Direction::Tunnel),
            ] {
                let s = socket::listen_in(&ctx.netns, SocketAddr::new(ip, port), ctx.config.socket_mark)?;
                bound.push((slot, s, dir));
            }
        }
        for (slot, s, dir) in bound {
            register(slot, &s)?;
            match dir {
                Direction::Outbound => l.outbound.push(s),
                Direction::Inbound => l.inbound.push(s),
                Direction::Tunnel => l.tunnel.push(s),
            }
        }
        Ok(l)
    }

    /// Starts the accept loops on the runtime.
    pub(crate) fn serve(self, ctx: Arc<PodContext>) {
        let tasks = &ctx.lifecycle.listeners;
        for l in self.outbound {
            tasks.spawn(accept_loop(ctx.clone(), l, Direction::Outbound));
        }
        for l in self.inbound {
            tasks.spawn(accept_loop(ctx.clone(), l, Direction::Inbound));
        }
        for l in self.tunnel {
            tasks.spawn(accept_loop(ctx.clone(), l, Direction::Tunnel));
        }
    }
}

async fn accept_loop(ctx: Arc<PodContext>, listener: TcpListener, dir: Direction) {
    loop {
        let stops = [&ctx.cancel, &ctx.lifecycle.stop_accepting];
        let Some(accepted) = next_connection(&listener, stops, &ctx.lifecycle.handed_over).await else {
            if ctx.lifecycle.handed_over.is_cancelled() && !ctx.cancel.is_cancelled() {
                take_backlog(&ctx, &listener, dir);
            }
            return;
        };
        match accepted {
            Ok((stream, peer)) => dispatch(&ctx, dir, stream, peer),
            Err(e) => {
                // EMFILE and friends: back off instead of spinning.
                tracing::warn!(pod = %ctx.pod.key, direction = dir.as_str(), "accept failed: {e}");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

/// Handles every connection still in a listener's queue. Only for an
/// agent whose pods a new agent took over: the queue then holds only
/// connections that arrived before the switch, and no more come.
fn take_backlog(ctx: &Arc<PodContext>, listener: &TcpListener, dir: Direction) {
    let (queued, error) = queued(listener);
    if let Some(e) = error {
        tracing::warn!(pod = %ctx.pod.key, direction = dir.as_str(), "taking the queue: {e}");
    }
    let taken = queued.len();
    for (stream, peer) in queued {
        dispatch(ctx, dir, stream, peer);
    }
    if taken > 0 {
        tracing::info!(pod = %ctx.pod.key, direction = dir.as_str(), taken, "took the connections queued before the new agent's listeners");
    }
}

/// Every connection waiting in a (non-blocking) listener's queue, and the
/// error that stopped the taking, if one did before the queue was empty.
fn queued(listener: &TcpListener) -> (Vec<(TcpStream, SocketAddr)>, Option<std::io::Error>) {
    let mut out = Vec::new();
    loop {
        let sock = match socket2::SockRef::from(listener).accept() {
            Ok((sock, _)) => sock,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return (out, None),
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return (out, Some(e)),
        };
        let std: std::net::TcpStream = sock.into();
        let taken = std
            .set_nonblocking(true)
            .and_then(|()| std.peer_addr())
            .and_then(|peer| Ok((TcpStream::from_std(std)?, peer)));
        match taken {
            Ok(c) => out.push(c),
            Err(e) => return (out, Some(e)),
        }
    }
}

/// Takes the bounds for one accepted connection and hands it to its handler.
fn dispatch(ctx: &Arc<PodContext>, dir: Direction, stream: TcpStream, peer: SocketAddr) {
    // Bounds are taken before any byte is read: a refused connection
    // is reset at once and counted, never logged one by one.
    let limits = &ctx.mesh.limits;
    let permit = match dir {
        Direction::Outbound => limits
            .connection(ctx.netns.cookie(), Side::Outbound)
            .map(Permit::Connection),
        Direction::Inbound => limits
            .connection(ctx.netns.cookie(), Side::Inbound)
            .map(Permit::Connection),
        Direction::Tunnel => {
            let known = ctx.mesh.store.current().claims_ip(peer.ip());
            limits.tunnel_in(peer.ip(), known).map(Permit::Tunnel)
        }
    };
    let permit = match permit {
        Ok(p) => p,
        Err(refusal) => {
            refuse(ctx, dir, &stream, peer, refusal);
            return;
        }
    };
    let _ = stream.set_nodelay(true);
    let ctx = ctx.clone();
    ctx.lifecycle.connections.clone().spawn(async move {
        let started = Instant::now();
        // The permit is held until the handler is done.
        let outcome = match (dir, permit) {
            // A tunnel connection carries many streams; each is logged.
            (_, Permit::Tunnel(p)) => return inbound_hbone::serve(ctx, stream, peer, p).await,
            (Direction::Outbound, Permit::Connection(_held)) => outbound::handle(&ctx, stream, peer).await,
            (_, Permit::Connection(_held)) => inbound_plaintext::handle(&ctx, stream, peer).await,
        };
        log_connection(&ctx, dir, peer, outcome, started);
    });
}

/// What an accepted connection holds while it lives.
enum Permit {
    Connection(limits::Permit),
    Tunnel(limits::TunnelPermit),
}

/// Closes a connection over a bound at once (a reset, so the client learns
/// without waiting), counts it, and warns at a bounded rate.
pub(crate) fn refuse(ctx: &PodContext, dir: Direction, stream: &TcpStream, peer: SocketAddr, refusal: limits::Refusal) {
    socket::reset(stream);
    if dir == Direction::Outbound {
        // The handler that would have removed the app's entry never runs.
        let _ = ctx.capture.maps.orig_dst.remove(&sock_key(ctx.netns.cookie(), peer, 0));
    }
    ctx.mesh
        .counters
        .count(dir, Counted::Limit, Some(Refusal::Limit(refusal)));
    // An outbound peer is the app's own loopback endpoint: the pod says it all.
    let peer = (dir != Direction::Outbound).then(|| peer.ip());
    ctx.mesh.limits.refused(refusal, dir, &ctx.pod.key, peer);
}

/// The next accepted connection, or `None` once a `stops` token fired.
///
/// Stopping wins over a connection waiting in the backlog (an unbiased
/// `select!` picks either at random when both are ready, so a connection
/// could be accepted after drain began), and a connection accepted while a
/// token fired is reset rather than handled: nothing accepted after drain
/// began reaches an app. The listener is closed when the loop returns, which
/// resets the backlog. Once `handed_over` (a new agent has the pods), a
/// connection accepted as drain began is one that arrived before the new
/// agent's listeners did, and is handled like the rest of the backlog.
async fn next_connection(
    listener: &TcpListener,
    stops: [&CancellationToken; 2],
    handed_over: &CancellationToken,
) -> Option<std::io::Result<(TcpStream, SocketAddr)>> {
    let accepted = tokio::select! {
        biased;
        _ = stops[0].cancelled() => return None,
        _ = stops[1].cancelled() => return None,
        a = listener.accept() => a,
    };
    if stops.iter().any(|s| s.is_cancelled()) {
        if handed_over.is_cancelled() && !stops[0].is_cancelled() {
            return Some(accepted);
        }
        if let Ok((s, _)) = &accepted {
            socket::reset(s);
        }
        return None;
    }
    Some(accepted)
}

/// An IPv4-mapped address as plain IPv4, for logs and connects.
pub(crate) fn unmap(a: SocketAddr) -> SocketAddr {
    match a {
        SocketAddr::V6(v6) => match v6.ip().to_ipv4_mapped() {
            Some(v4) => SocketAddr::new(IpAddr::V4(v4), v6.port()),
            None => a,
        },
        v4 => v4,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn after_a_hand_over_every_connection_waiting_in_the_queue_is_taken_not_reset() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let clients: Vec<std::net::TcpStream> = (0..5)
            .map(|_| std::net::TcpStream::connect(listener.local_addr().unwrap()).unwrap())
            .collect();
        let (pod, drain, handed_over) = (
            CancellationToken::new(),
            CancellationToken::new(),
            CancellationToken::new(),
        );
        drain.cancel();
        handed_over.cancel();
        assert!(next_connection(&listener, [&pod, &drain], &handed_over).await.is_none());
        let (taken, error) = queued(&listener);
        assert!(error.is_none(), "{error:?}");
        let mut ports: Vec<u16> = taken.iter().map(|(_, peer)| peer.port()).collect();
        let mut want: Vec<u16> = clients.iter().map(|c| c.local_addr().unwrap().port()).collect();
        ports.sort();
        want.sort();
        assert_eq!(ports, want, "each queued client, once");
        assert!(queued(&listener).0.is_empty(), "and then nothing");
    }

    #[tokio::test]
    async fn a_connection_waiting_when_drain_begins_is_not_accepted() {
        // Ready at once, both: the stop and a handshake done in the backlog.
        for _ in 0..32 {
            let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
            let client = std::net::TcpStream::connect(listener.local_addr().unwrap()).unwrap();
            client.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
            // Let the reactor see the listener readable, as a busy agent's has.
            tokio::time::sleep(Duration::from_millis(5)).await;
            let (pod, drain) = (CancellationToken::new(), CancellationToken::new());
            drain.cancel();
            assert!(
                next_connection(&listener, [&pod, &drain], &CancellationToken::new())
                    .await
                    .is_none()
            );
            drop(listener);
            let mut buf = [0u8; 1];
            let r = std::io::Read::read(&mut &client, &mut buf);
            assert!(matches!(r, Ok(0) | Err(_)), "the waiting client is refused: {r:?}");
        }
    }
}
