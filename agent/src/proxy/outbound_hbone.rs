//! Outbound through a tunnel: a captured connection whose destination is
//! an enrolled workload becomes an HTTP/2 `CONNECT` stream on a pooled
//! mutual-TLS connection (`pool`) to the destination pod's 15008, opened
//! from this pod's namespace, presenting this pod's identity and requiring
//! the destination's.

#![forbid(unsafe_code)]

use std::net::{IpAddr, SocketAddr};

use http::{Method, Request, StatusCode};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;

use super::hbone::{self, H2Stream, HBONE_PORT};
use super::pool::{Connector, PoolError, PoolKey, Transport};
use super::relay::{TcpLeg, relay};
use super::report::{Opened, Outcome};
use super::{PodContext, socket};
use crate::identity::Identity;
use crate::identity::verify::{Role, refusal_of_io};
use crate::outcome::{CloseReason, Direction, Refusal, Transport as Carried};

/// The pod's own address of `dst`'s family: the tunnel's source address
/// and the client address forwarded to the destination.
fn pod_ip_for(ctx: &PodContext, dst: IpAddr) -> Option<IpAddr> {
    ctx.pod.ips.iter().copied().find(|ip| ip.is_ipv4() == dst.is_ipv4())
}

/// Carries one captured connection to `dst` (an endpoint of `service`,
/// when the app called one) through a tunnel whose server must prove
/// `expected`.
pub(crate) async fn handle(
    ctx: &PodContext,
    down: TcpStream,
    peer: SocketAddr,
    dst: SocketAddr,
    expected: Identity,
    service: Option<&str>,
) -> Outcome {
    let refused = |down: &TcpStream, reason: CloseReason, refusal: Option<Refusal>| {
        socket::reset(down);
        Outcome::refused(Some(dst), reason).via(Carried::Hbone).refusal(refusal)
    };
    let (Some(src_id), Some(certs)) = (ctx.identity.clone(), ctx.mesh.certs.clone()) else {
        return refused(&down, CloseReason::NoIdentity, None);
    };
    // Its certificate not obtained yet: a new pod's first connections wait
    // for it, up to the connect timeout; with a CA service down or
    // refusing past that, they are refused.
    let by = tokio::time::Instant::now() + ctx.config.connect_timeout;
    if !certs.wait_for(&src_id, by).await {
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
    let (netns, capture) = (ctx.netns.clone(), ctx.capture.clone());
    let (mark, timeout, tunnel_addr) = (ctx.config.socket_mark, ctx.config.connect_timeout, key.dst);
    let expected_server = expected.clone();
    let open = ctx.mesh.open.clone();
    // Only called when the pool has no connection with room: the TLS
    // configuration is built then, not for every stream.
    let connect = move || -> Connector<'static> {
        let trust = certs.trust();
        let tls = crate::identity::tls::client_config(certs.clone(), src_id, trust.clone(), expected_server.clone());
        Box::pin(async move {
            let tcp = socket::connect_from_pod(&capture, &netns, mark, tunnel_addr, timeout).await?;
            let server_name = rustls::pki_types::ServerName::IpAddress(tunnel_addr.ip().into());
            let tls = TlsConnector::from(tls).connect(server_name, tcp).await?;
            let chain = tls.get_ref().1.peer_certificates().unwrap_or_default().to_vec();
            // Filed like an accepted tunnel, so a trust change or the
            // server certificate's expiry closes the pooled connection.
            let revoked = tokio_util::sync::CancellationToken::new();
            let registration = open
                .register(expected_server, &chain, Role::Server, revoked.clone(), &trust)
                .map_err(std::io::Error::other)?;
            Ok(Transport {
                io: Box::new(tls),
                revoked,
                registration: Some(registration),
            })
        })
    };
    // A stream the server never took (GOAWAY raced it: the server's idle
    // timeout or drain) reached no app: it is tried once more, on another
    // connection.
    let mut attempt = 0;
    let (lease, response, send) = loop {
        attempt += 1;
        let (mut sender, lease) = match ctx.mesh.pool.sender(&key, connect.clone()).await {
            Ok(s) => s,
            Err(PoolError::H2(e)) if e.is_go_away() && attempt == 1 => continue,
            Err(PoolError::Limit(limit)) => {
                // Counted and warned about at a bounded rate, not per connection.
                ctx.mesh.limits.refused(limit, Direction::Outbound, &ctx.pod.key, None);
                return refused(&down, CloseReason::TunnelRefused, Some(Refusal::Limit(limit)));
            }
            Err(e) => {
                let refusal = match &e {
                    PoolError::Connect(io) => refusal_of_io(io).map(Refusal::Cert),
                    _ => None,
                };
                tracing::warn!(pod = %ctx.pod.key, %dst, %expected, refusal = refusal.map(Refusal::as_str), "tunnel to destination failed: {e}");
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
        let sent = sender.send_request(req, false);
        let answer = match sent {
            Ok((response, send)) => response.await.map(|r| (r, send)),
            Err(e) => Err(e),
        };
        match answer {
            Ok((response, send)) => break (lease, response, send),
            // REFUSED_STREAM: the server did not process it (RFC 9113
            // §8.7), which a draining agent answers to a stream sent before
            // its GOAWAY arrived; as safe to try elsewhere as a GOAWAY.
            Err(e) if (e.is_go_away() || e.reason() == Some(h2::Reason::REFUSED_STREAM)) && attempt == 1 => {
                lease.retire()
            }
            Err(_) => return refused(&down, CloseReason::TunnelRefused, None),
        }
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
    let size = ctx.config.relay.buffer_size;
    let (mut down, mut up) = (TcpLeg::new(down, size), H2Stream::new(send, response.into_body()));
    let cut_by = || (lease.peer_revoked() && !ctx.cancel.is_cancelled()).then_some(CloseReason::PeerRevoked);
    let opened = Opened::count(
        ctx,
        Direction::Outbound,
        peer,
        dst,
        Carried::Hbone,
        Some(&expected),
        service,
    );
    let stats = relay(ctx, &mut down, &mut up, &ctx.cancel, cut_by).await;
    Outcome::relayed(opened, stats)
}
