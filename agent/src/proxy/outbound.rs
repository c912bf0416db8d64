//! Outbound: a connection an app in the pod opened, redirected to 15001.
//!
//! The sockops program recorded the original destination under the app's
//! endpoint (our peer). The entry stays while the connection lives, because
//! the app's `getpeername()` reads it too, and is removed when it closes.
//!
//! A destination that is a Service address (its ClusterIP, an external or
//! load-balancer IP and a Service port, a node address and its nodePort)
//! is first resolved to one of its endpoints (`state::service`), the same
//! way for each: the connection then goes to
//! that endpoint as if the app had dialled it. A destination that is an
//! enrolled workload is reached through an HBONE tunnel (`outbound_hbone`);
//! any other destination is passed through unchanged from the pod's
//! namespace, here.

#![forbid(unsafe_code)]

use std::net::SocketAddr;

use tokio::net::TcpStream;

use super::hop::is_agent_port;
use super::relay::{TcpLeg, relay};
use super::report::{Opened, Outcome};
use super::{PodContext, egress, outbound_hbone, socket};
use crate::capture::keys::{from_words, sock_key};
use crate::outcome::{CloseReason, Direction, Transport};
use crate::state::Destination;

/// Handles one captured outbound connection.
pub(crate) async fn handle(ctx: &PodContext, down: TcpStream, peer: SocketAddr) -> Outcome {
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
    let asked = from_words(orig.addr, orig.port);
    let snap = ctx.mesh.store.current();
    let (dst, _open, service) = match snap.service(asked) {
        None => (asked, None, None),
        Some(target) => {
            let node = snap.node_of(&ctx.pod.key).unwrap_or_default();
            let client = ctx
                .pod
                .ips
                .iter()
                .copied()
                .find(|ip| ip.is_ipv4() == asked.ip().to_canonical().is_ipv4())
                .unwrap_or(peer.ip());
            match ctx.mesh.store.balancer().pick(&target, node, client) {
                Some(open) => (open.addr(), Some(open), Some(target.service.clone())),
                None => {
                    // Like kube-proxy: no endpoint, the connection is refused at once.
                    socket::reset(&down);
                    return Outcome::refused(Some(asked), CloseReason::NoEndpoint)
                        .service(Some(target.service.clone()));
                }
            }
        }
    };
    handle_to(ctx, down, peer, dst, &snap, service.as_deref())
        .await
        .service(service)
}

/// Carries a connection to `dst`, a pod or an address outside the mesh
/// (an endpoint of `service`, when the app called one).
async fn handle_to(
    ctx: &PodContext,
    down: TcpStream,
    peer: SocketAddr,
    dst: SocketAddr,
    snap: &crate::state::Snapshot,
    service: Option<&str>,
) -> Outcome {
    if ctx.pod.ips.contains(&dst.ip()) {
        // A pod calling its own Service, resolved to itself: the
        // connection never leaves the pod, as if it had dialled its own IP.
        return passthrough(ctx, down, peer, dst, service).await;
    }
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
            outbound_hbone::handle(ctx, down, peer, dst, expected, service).await
        }
        None => passthrough(ctx, down, peer, dst, service).await,
    }
}

async fn passthrough(
    ctx: &PodContext,
    down: TcpStream,
    peer: SocketAddr,
    dst: SocketAddr,
    service: Option<&str>,
) -> Outcome {
    if egress::check(ctx, &down, dst).await.is_err() {
        socket::reset(&down);
        return Outcome::refused(Some(dst), CloseReason::EgressPlaintext);
    }
    let up = socket::connect_from_pod(
        &ctx.capture,
        &ctx.netns,
        ctx.config.socket_mark,
        dst,
        ctx.config.connect_timeout,
    )
    .await;
    let up = match up {
        Ok(up) => up,
        Err(e) => {
            socket::reset(&down);
            return Outcome::refused(Some(dst), CloseReason::from_io(&e));
        }
    };
    let size = ctx.config.relay.buffer_size;
    let (mut down, mut up) = (TcpLeg::new(down, size), TcpLeg::new(up, size));
    let opened = Opened::count(
        ctx,
        Direction::Outbound,
        peer,
        dst,
        Transport::Passthrough,
        None,
        service,
    );
    let stats = relay(ctx, &mut down, &mut up, &ctx.cancel, || None).await;
    Outcome::relayed(opened, stats)
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
