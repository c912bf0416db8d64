//! Outbound: a connection an app in the pod opened, redirected to 15001.
//!
//! The sockops program recorded the original destination under the app's
//! endpoint (our peer). The entry stays while the connection lives, because
//! the app's `getpeername()` reads it too, and is removed when it closes.
//!
//! A destination that is an enrolled workload is reached through an HBONE
//! tunnel to its pod's port 15008, presenting this pod's identity and
//! requiring the destination's; any other destination is passed through
//! unchanged from the pod's namespace.

#![forbid(unsafe_code)]

use std::net::{IpAddr, SocketAddr};

use http::{Method, Request, StatusCode};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;

use super::hbone::{self, HBONE_PORT};
use super::inbound::is_agent_port;
use super::pool::{Connector, PoolError, PoolKey, Transport};
use super::relay::{self, CloseReason, StreamSink, StreamSource};
use super::{Outcome, PodContext, final_reason, from_words, relay_tcp, sock_key, socket};
use crate::identity::Identity;
use crate::identity::verify::{Role, refusal_of_io};
use crate::state::Destination;

/// Handles one captured outbound connection.
pub async fn handle(ctx: &PodContext, down: TcpStream, peer: SocketAddr) -> Outcome {
    let key = sock_key(ctx.netns.cookie(), peer, 0);
    let orig = match ctx.capture.maps.orig_dst.get(&key) {
        Ok(Some(o)) => o,
        Ok(None) | Err(_) => {
            // Without its destination the connection cannot be forwarded;
            // refusing it is the only safe answer.
            socket::reset(&down);
            return Outcome::refused(None, CloseReason::NoOriginalDestination);
        }
    };
    let _entry = MapEntryGuard { ctx, key };
    let dst = from_words(orig.addr, orig.port);
    let snap = ctx.mesh.store.current();
    if is_agent_port(dst.port()) && snap.enrolled_workload(dst.ip()).is_some() {
        // An enrolled pod's agent ports belong to its agent, not its apps;
        // its tunnel would only be asked to dial them again.
        socket::reset(&down);
        return Outcome::refused(Some(dst), CloseReason::LoopRefused);
    }
    // A destination port in mTLS DISABLE is reached in plaintext: its
    // agent has stepped aside and would not capture the tunnel's stream.
    let workload = match snap.destination(dst.ip()) {
        Destination::Enrolled(w) => {
            Some(w).filter(|w| snap.mtls(w).mode(dst.port()) != crate::policy::model::Mode::Disable)
        }
        Destination::Outside => None,
        // Several live pods claim the IP: neither an identity nor plaintext is safe.
        Destination::Ambiguous(_) => {
            socket::reset(&down);
            return Outcome::refused(Some(dst), CloseReason::TunnelRefused);
        }
    };
    match workload {
        Some(w) => {
            let expected = match &ctx.mesh.certs {
                Some(c) => c.identity_of(&w.namespace, &w.service_account),
                None => {
                    // A meshed destination without identities would mean
                    // plaintext between meshed pods: refuse instead.
                    socket::reset(&down);
                    return Outcome::refused(Some(dst), CloseReason::NoIdentity);
                }
            };
            tunnel(ctx, down, peer, dst, expected).await
        }
        None => passthrough(ctx, down, dst).await,
    }
}

async fn passthrough(ctx: &PodContext, down: TcpStream, dst: SocketAddr) -> Outcome {
    let up = socket::connect_from_pod(&ctx.netns, ctx.config.socket_mark, dst, ctx.config.connect_timeout).await;
    let up = match up {
        Ok(up) => up,
        Err(e) => {
            socket::reset(&down);
            return Outcome::refused(Some(dst), CloseReason::from_io(&e));
        }
    };
    let stats = relay_tcp(ctx, down, up, &ctx.cancel).await;
    Outcome::relayed(dst, stats, "passthrough")
}

/// The pod's own address of `dst`'s family: the tunnel's source address
/// and the client address forwarded to the destination.
fn pod_ip_for(ctx: &PodContext, dst: IpAddr) -> Option<IpAddr> {
    ctx.pod.ips.iter().copied().find(|ip| ip.is_ipv4() == dst.is_ipv4())
}

async fn tunnel(
    ctx: &PodContext,
    mut down: TcpStream,
    peer: SocketAddr,
    dst: SocketAddr,
    expected: Identity,
) -> Outcome {
    let refused = |down: &TcpStream, reason: CloseReason, refusal: Option<&'static str>| {
        socket::reset(down);
        let mut o = Outcome::refused(Some(dst), reason);
        o.transport = "hbone";
        o.refusal = refusal;
        o
    };
    let (Some(src_id), Some(certs)) = (ctx.identity.clone(), ctx.mesh.certs.clone()) else {
        return refused(&down, CloseReason::NoIdentity, None);
    };
    // Its certificate not obtained yet (a CA service down or refusing).
    if certs.current(&src_id).is_none() {
        return refused(&down, CloseReason::NoIdentity, None);
    }
    let Some(client_ip) = pod_ip_for(ctx, dst.ip()) else {
        return refused(&down, CloseReason::ConnectFailed, None);
    };
    let client = SocketAddr::new(client_ip, peer.port());
    let key = PoolKey {
        src_netns: ctx.netns.cookie(),
        src: src_id.clone(),
        dst: SocketAddr::new(dst.ip(), HBONE_PORT),
        expected: expected.clone(),
    };
    let netns = ctx.netns.clone();
    let (mark, timeout, tunnel_addr) = (ctx.config.socket_mark, ctx.config.connect_timeout, key.dst);
    let expected_server = expected.clone();
    let peers = ctx.mesh.peers.clone();
    // Only called when the pool has no connection with room: the TLS
    // configuration is built then, not for every stream.
    let connect = move || -> Connector<'static> {
        let trust = certs.trust();
        let tls = crate::identity::tls::client_config(certs.clone(), src_id, trust.clone(), expected_server.clone());
        Box::pin(async move {
            let tcp = socket::connect_from_pod(&netns, mark, tunnel_addr, timeout).await?;
            let server_name = rustls::pki_types::ServerName::IpAddress(tunnel_addr.ip().into());
            let tls = TlsConnector::from(tls).connect(server_name, tcp).await?;
            let chain = tls.get_ref().1.peer_certificates().unwrap_or_default().to_vec();
            // Filed like an accepted tunnel, so a trust change or the
            // server certificate's expiry closes the pooled connection.
            let revoked = tokio_util::sync::CancellationToken::new();
            let registration = peers
                .register(expected_server, &chain, Role::Server, revoked.clone(), &trust)
                .map_err(std::io::Error::other)?;
            Ok(Transport {
                io: Box::new(tls),
                revoked,
                registration: Some(registration),
            })
        })
    };
    let (mut sender, lease) = match ctx.mesh.pool.sender(&key, connect).await {
        Ok(s) => s,
        Err(PoolError::Limit(limit)) => {
            // Counted and warned about at a bounded rate, not per connection.
            ctx.mesh.limits.refused(limit, "outbound", &ctx.pod.key, None);
            return refused(&down, CloseReason::TunnelRefused, Some(limit.as_str()));
        }
        Err(e) => {
            let refusal = match &e {
                PoolError::Connect(io) => refusal_of_io(io).map(|r| r.as_str()),
                _ => None,
            };
            tracing::warn!(pod = %ctx.pod.key, %dst, %expected, refusal, "tunnel to destination failed: {e}");
            let reason = match &e {
                PoolError::Connect(io) if refusal.is_none() => CloseReason::from_io(io),
                PoolError::Timeout => CloseReason::ConnectTimeout,
                _ => CloseReason::TunnelRefused,
            };
            return refused(&down, reason, refusal);
        }
    };
    let req = Request::builder()
        .method(Method::CONNECT)
        .uri(hbone::authority(dst))
        .header("forwarded", hbone::forwarded_for(client))
        .header("traceparent", hbone::traceparent())
        .body(())
        .expect("valid CONNECT request");
    let (response, send) = match sender.send_request(req, false) {
        Ok(r) => r,
        Err(_) => return refused(&down, CloseReason::TunnelRefused, None),
    };
    let response = match response.await {
        Ok(r) => r,
        Err(_) => return refused(&down, CloseReason::TunnelRefused, None),
    };
    if response.status() != StatusCode::OK {
        // The destination refused the stream (its app port closed, or the
        // request was invalid): the app sees a reset, as without a mesh.
        let reason = if response.status() == StatusCode::SERVICE_UNAVAILABLE {
            CloseReason::ConnectRefused
        } else {
            CloseReason::TunnelRefused
        };
        return refused(&down, reason, None);
    }
    let (mut tunnel_send, mut tunnel_recv) = hbone::stream_halves(send, response.into_body());
    let stats = {
        let (dr, dw) = down.split();
        let (mut ds, mut dk) = (StreamSource::new(dr, ctx.config.relay.buffer_size), StreamSink(dw));
        relay::relay(
            &mut ds,
            &mut dk,
            &mut tunnel_recv,
            &mut tunnel_send,
            ctx.config.relay,
            &ctx.cancel,
        )
        .await
    };
    let mut stats = stats;
    if lease.peer_revoked() && !ctx.cancel.is_cancelled() {
        stats.reason = Some(CloseReason::PeerRevoked);
    }
    if final_reason(ctx, stats.reason).resets() {
        socket::reset(&down);
        tunnel_send.reset();
    }
    let mut o = Outcome::relayed(dst, stats, "hbone");
    o.peer_identity = Some(expected);
    o
}

/// Removes the connection's `ORIG_DST` entry when the handler ends.
struct MapEntryGuard<'a> {
    ctx: &'a PodContext,
    key: nodeward_common::SockKey,
}

impl Drop for MapEntryGuard<'_> {
    fn drop(&mut self) {
        let _ = self.ctx.capture.maps.orig_dst.remove(&self.key);
    }
}
