//! The HBONE listener on 15008: terminates mutual TLS, accepts HTTP/2
//! `CONNECT` streams to this pod's own addresses, and relays each to the app.
//!
//! Every input is hostile: the TLS and HTTP/2 handshakes and the wait for
//! the first stream share one deadline; a connection with no open stream
//! for the idle timeout is sent GOAWAY, one whose peer stops answering PING
//! is closed, and so is one whose last few streams were all refused;
//! streams per connection, header size and reset floods are bounded by the
//! HTTP/2 layer; a request that is not a CONNECT to `ip:port` of this pod is
//! answered with a 4xx status and never reaches the app. Each refusal is
//! logged once with the peer. Before any of that, the accept loop bounds
//! handshakes and tunnel connections per remote IP and on the node
//! (`limits`); each stream then takes a place in the pod's inbound bound
//! or is answered 503.

#![forbid(unsafe_code)]

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use h2::RecvStream;
use h2::server::SendResponse;
use http::{Method, Request, Response, StatusCode};
use rustls::pki_types::CertificateDer;
use tokio::net::TcpStream;
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;

use super::hbone::{H2Stream, parse_authority, parse_forwarded_for};
use super::hop::{close_reason, connect_app};
use super::limits::{Side, TunnelPermit, send_buffer_per_stream};
use super::relay::{TcpLeg, relay};
use super::report::{Opened, Outcome, log_audits, log_connection};
use super::{PodContext, socket, unmap};
use crate::identity::Identity;
use crate::identity::tls::peer_identity;
use crate::identity::verify::{Role, refusal_of_io};
use crate::outcome::{CertRefusal, CloseReason, Counted, Direction, Refusal, Transport, TunnelEnd};
use crate::policy::ConnInfo;

/// Stream resets a client may make at once before the rapid-reset guard
/// closes its connection.
const RESET_BURST: f64 = 100.0;

/// Stream resets per second a connection earns back.
const RESET_REFILL_PER_SEC: f64 = 10.0;

/// The rapid-reset guard (CVE-2023-44487 class): a token bucket of the
/// streams a client resets, per connection. Each reset spends a token,
/// whether it came before or after the answer; tokens come back at a fixed
/// rate. Unlike a share of all streams, it cannot be sidestepped by
/// interleaving good streams, and a client that resets now and then never
/// runs out.
struct ResetGuard {
    bucket: Mutex<(f64, Instant)>,
    resets: AtomicU64,
    tripped: CancellationToken,
}

impl ResetGuard {
    fn new() -> Self {
        ResetGuard {
            bucket: Mutex::new((RESET_BURST, Instant::now())),
            resets: AtomicU64::new(0),
            tripped: CancellationToken::new(),
        }
    }

    /// Counts one client reset at `now`; trips the guard when the budget is spent.
    fn reset_at(&self, now: Instant) {
        self.resets.fetch_add(1, Ordering::Relaxed);
        let mut bucket = self.bucket.lock().unwrap_or_else(|e| e.into_inner());
        let (tokens, last) = *bucket;
        let earned = now.saturating_duration_since(last).as_secs_f64() * RESET_REFILL_PER_SEC;
        let left = (tokens + earned).min(RESET_BURST) - 1.0;
        *bucket = (left, now);
        if left < 0.0 {
            self.tripped.cancel();
        }
    }
}

/// Refused streams in a row after which a tunnel connection is closed: a
/// peer every stream of which is denied (by policy, or as a bad request)
/// has no use for the connection but to hold a place under the bounds.
const REFUSED_IN_A_ROW: u32 = 8;

/// What the streams of one tunnel connection tell its loop: how many are
/// open and since when none is (the idle timeout), and how many in a row
/// were refused for the peer's own doing.
struct Streams {
    open: AtomicUsize,
    idle_since: Mutex<Instant>,
    refused: AtomicU32,
    all_refused: CancellationToken,
}

impl Streams {
    fn new() -> Self {
        Streams {
            open: AtomicUsize::new(0),
            idle_since: Mutex::new(Instant::now()),
            refused: AtomicU32::new(0),
            all_refused: CancellationToken::new(),
        }
    }

    /// A stream starts; the returned guard ends it.
    fn open(self: &Arc<Self>) -> OpenStream {
        self.open.fetch_add(1, Ordering::AcqRel);
        OpenStream(self.clone())
    }

    /// Counts a stream refused for something the peer asked (a denied or
    /// invalid request): whether it is the [`REFUSED_IN_A_ROW`]th, after
    /// which the connection ends.
    fn refused(&self) -> bool {
        self.refused.fetch_add(1, Ordering::AcqRel) + 1 >= REFUSED_IN_A_ROW
    }

    /// A stream was accepted: the peer has a use for the connection.
    fn accepted(&self) {
        self.refused.store(0, Ordering::Release);
    }

    /// Whether no stream has been open for `idle`.
    fn idle_for(&self, idle: Duration) -> bool {
        self.open.load(Ordering::Acquire) == 0
            && self.idle_since.lock().unwrap_or_else(|e| e.into_inner()).elapsed() >= idle
    }
}

/// An open stream's place in [`Streams`].
struct OpenStream(Arc<Streams>);

impl Drop for OpenStream {
    fn drop(&mut self) {
        let mut since = self.0.idle_since.lock().unwrap_or_else(|e| e.into_inner());
        if self.0.open.fetch_sub(1, Ordering::AcqRel) == 1 {
            *since = Instant::now();
        }
    }
}

/// Serves one tunnel connection until it closes, the pod goes, its peer
/// is revoked, it idles, or its peer stops answering. `permit` is its
/// place under the bounds: it counts as a handshake until its first
/// stream, as a tunnel until it ends.
///
/// One deadline, `--handshake-timeout` from accept, covers the TLS
/// handshake, the HTTP/2 handshake and the wait for the first stream, so a
/// client slow at each step gets no more than one timeout in all.
pub(crate) async fn serve(ctx: Arc<PodContext>, tcp: TcpStream, peer: SocketAddr, mut permit: TunnelPermit) {
    let started = Instant::now();
    let settings = ctx.mesh.h2;
    let deadline = tokio::time::Instant::now() + settings.handshake_timeout;
    let peer = unmap(peer);
    let refused = |reason: CloseReason, refusal: Option<Refusal>| {
        let o = Outcome::refused(None, reason).via(Transport::Hbone).refusal(refusal);
        log_connection(&ctx, Direction::Tunnel, peer, o, started);
    };
    if tcp.local_addr().map_or(true, |a| unmap(a).ip().is_loopback()) {
        // Reached by its loopback address: only an app inside the pod can do
        // that (sk_lookup hands over outside traffic with the pod's IP).
        socket::reset(&tcp);
        return refused(CloseReason::LoopRefused, None);
    }
    let Some(tls_config) = ctx.tunnel_tls.clone() else {
        socket::reset(&tcp);
        return refused(CloseReason::NoIdentity, None);
    };
    // A new pod's first tunnels can come while its first certificate is
    // being signed: they wait for it within the handshake deadline (and
    // fail the handshake as before if it does not come).
    if let (Some(certs), Some(id)) = (&ctx.mesh.certs, &ctx.identity) {
        certs.wait_for(id, deadline).await;
    }
    let tls = match tokio::time::timeout_at(deadline, TlsAcceptor::from(tls_config).accept(tcp)).await {
        Err(_) => return refused(CloseReason::HandshakeTimeout, None),
        Ok(Err(e)) => {
            let refusal = refusal_of_io(&e).map_or(Refusal::TlsError, Refusal::Cert);
            tracing::warn!(pod = %ctx.pod.key, %peer, refusal = refusal.as_str(), "tunnel handshake refused: {e}");
            return refused(CloseReason::TlsRefused, Some(refusal));
        }
        Ok(Ok(tls)) => tls,
    };
    let chain: Vec<CertificateDer<'static>> = tls
        .get_ref()
        .1
        .peer_certificates()
        .map(<[_]>::to_vec)
        .unwrap_or_default();
    let Some(peer_id) = peer_identity(Some(&chain)) else {
        return refused(
            CloseReason::TlsRefused,
            Some(Refusal::Cert(CertRefusal::BadCertificate)),
        );
    };
    let Some(certs) = &ctx.mesh.certs else {
        return refused(CloseReason::NoIdentity, None);
    };
    let cancel = ctx.cancel.child_token();
    // Checked again once filed: a trust change during the handshake is not missed.
    let _registration = match ctx.mesh.open.register(
        peer_id.clone(),
        &chain,
        Role::Client,
        cancel.clone(),
        &certs.trust(),
    ) {
        Ok(r) => r,
        Err(e) => {
            tracing::warn!(pod = %ctx.pod.key, %peer, peer_identity = %peer_id, refusal = e.refusal.as_str(), "tunnel peer refused after the handshake: {}", e.detail);
            return refused(CloseReason::TlsRefused, Some(Refusal::Cert(e.refusal)));
        }
    };

    let handshake = h2::server::Builder::new()
        .initial_window_size(settings.stream_window)
        .initial_connection_window_size(settings.connection_window)
        .max_frame_size(settings.max_frame_size)
        .max_concurrent_streams(settings.max_streams)
        .max_header_list_size(settings.max_header_list_size)
        .max_pending_accept_reset_streams(20)
        .max_concurrent_reset_streams(50)
        .max_send_buffer_size(send_buffer_per_stream(
            settings.stream_window,
            settings.connection_window,
            settings.max_streams,
        ))
        .handshake::<_, Bytes>(tls);
    let mut conn = match tokio::time::timeout_at(deadline, handshake).await {
        Err(_) => return refused(CloseReason::HandshakeTimeout, None),
        Ok(Err(e)) => {
            tracing::warn!(pod = %ctx.pod.key, %peer, peer_identity = %peer_id, "tunnel HTTP/2 handshake failed: {e}");
            return refused(CloseReason::BadRequest, Some(Refusal::Http2Handshake));
        }
        Ok(Ok(c)) => c,
    };
    let mut streams = 0u64;
    let guard = Arc::new(ResetGuard::new());
    let open = Arc::new(Streams::new());
    let dead_peer = super::hbone::dead_peer(conn.ping_pong(), settings.keepalive);
    tokio::pin!(dead_peer);
    let mut idle_check =
        tokio::time::interval((settings.idle_timeout / 4).clamp(Duration::from_millis(100), Duration::from_secs(1)));
    let draining = ctx.lifecycle.stop_accepting.clone();
    let mut going_away = false;
    let end = loop {
        tokio::select! {
            biased;
            // Rapid reset: a peer that keeps cancelling streams only makes us dial the app.
            _ = guard.tripped.cancelled() => {
                let resets = guard.resets.load(Ordering::Relaxed);
                tracing::warn!(pod = %ctx.pod.key, %peer, peer_identity = %peer_id, streams, resets, "closing tunnel connection: rapid stream resets");
                conn.abrupt_shutdown(h2::Reason::ENHANCE_YOUR_CALM);
                break TunnelEnd::RapidReset;
            }
            _ = cancel.cancelled() => {
                conn.abrupt_shutdown(h2::Reason::CANCEL);
                break TunnelEnd::Cancelled;
            }
            _ = open.all_refused.cancelled() => {
                tracing::warn!(pod = %ctx.pod.key, %peer, peer_identity = %peer_id, streams, "closing tunnel connection: its last {REFUSED_IN_A_ROW} streams were all refused");
                // GOAWAY; the last refusal's answer still goes out.
                conn.graceful_shutdown();
                break TunnelEnd::StreamsRefused;
            }
            () = &mut dead_peer => {
                tracing::warn!(pod = %ctx.pod.key, %peer, peer_identity = %peer_id, streams, "closing tunnel connection: the peer does not answer PING");
                break TunnelEnd::DeadPeer;
            }
            // The one deadline runs on to the first stream.
            () = tokio::time::sleep_until(deadline), if streams == 0 => {
                break TunnelEnd::NoStream;
            }
            _ = idle_check.tick(), if streams > 0 => {
                if open.idle_for(settings.idle_timeout) {
                    // GOAWAY: no stream is open, and streams the peer may
                    // have sent meanwhile are named unprocessed, so its
                    // client retries them elsewhere.
                    conn.abrupt_shutdown(h2::Reason::NO_ERROR);
                    break TunnelEnd::Idle;
                }
            }
            _ = draining.cancelled(), if !going_away => {
                // Drain: GOAWAY, so the peer opens no new stream here; the
                // open ones finish, then the connection closes.
                conn.graceful_shutdown();
                going_away = true;
            }
            next = conn.accept() => match next {
                None => break TunnelEnd::Closed,
                Some(Err(e)) => {
                    // Floods of streams or resets end here (GOAWAY sent by h2).
                    tracing::warn!(pod = %ctx.pod.key, %peer, peer_identity = %peer_id, "tunnel connection error: {e}");
                    break TunnelEnd::ProtocolError;
                }
                Some(Ok((_, mut respond))) if draining.is_cancelled() => {
                    // A stream the peer opened before it saw the GOAWAY is
                    // a new connection all the same: refused while draining.
                    respond.send_reset(h2::Reason::REFUSED_STREAM);
                    ctx.mesh.counters.count(Direction::Tunnel, Counted::Closed(CloseReason::Shutdown), None);
                }
                Some(Ok((req, mut respond))) => {
                    if streams == 0 {
                        // Through to its first stream: no longer a handshake.
                        permit.authenticated();
                    }
                    streams += 1;
                    // Each stream becomes a connection to the app: it
                    // counts against the pod's inbound bound.
                    let held = match ctx.mesh.limits.connection(ctx.netns.cookie(), Side::Inbound) {
                        Ok(p) => p,
                        Err(refusal) => {
                            let resp = Response::builder().status(StatusCode::SERVICE_UNAVAILABLE).body(()).expect("valid status response");
                            let _ = respond.send_response(resp, true);
                            ctx.mesh.counters.count(Direction::Tunnel, Counted::Limit, Some(Refusal::Limit(refusal)));
                            ctx.mesh.limits.refused(refusal, Direction::Tunnel, &ctx.pod.key, Some(peer.ip()));
                            continue;
                        }
                    };
                    let (ctx, peer_id, cancel, guard) = (ctx.clone(), peer_id.clone(), cancel.clone(), guard.clone());
                    let (open, opened) = (open.clone(), open.open());
                    ctx.lifecycle.connections.clone().spawn(async move {
                        stream(&ctx, req, respond, peer_id, peer, &cancel, &guard, &open).await;
                        drop((held, opened));
                    });
                }
            }
        }
    };
    match end {
        // Let streams in flight finish their exchange.
        TunnelEnd::Closed => {
            let _ = std::future::poll_fn(|cx| conn.poll_closed(cx)).await;
        }
        // Send the GOAWAY, for no longer than a handshake may take: a peer
        // that does not read cannot hold the connection this way.
        TunnelEnd::Idle | TunnelEnd::StreamsRefused => {
            let closed = std::future::poll_fn(|cx| conn.poll_closed(cx));
            let _ = tokio::time::timeout(settings.handshake_timeout, closed).await;
        }
        _ => {}
    }
    match end {
        TunnelEnd::NoStream => refused(CloseReason::HandshakeTimeout, None),
        TunnelEnd::StreamsRefused => refused(CloseReason::StreamsRefused, None),
        _ => {}
    }
    tracing::debug!(pod = %ctx.pod.key, %peer, peer_identity = %peer_id, streams, end = end.as_str(), "tunnel connection closed");
}

#[allow(clippy::too_many_arguments)]
async fn stream(
    ctx: &PodContext,
    req: Request<RecvStream>,
    mut respond: SendResponse<Bytes>,
    peer_id: Identity,
    peer: SocketAddr,
    cancel: &CancellationToken,
    resets: &ResetGuard,
    streams: &Streams,
) {
    let started = Instant::now();
    let outcome = |dst: Option<SocketAddr>, reason: CloseReason, refusal: Option<Refusal>| {
        Outcome::refused(dst, reason)
            .via(Transport::Hbone)
            .peer(peer_id.clone())
            .refusal(refusal)
    };
    let reject = |respond: &mut SendResponse<Bytes>, status: StatusCode| {
        let resp = Response::builder()
            .status(status)
            .body(())
            .expect("valid status response");
        // The peer's own doing (a 4xx), not the pod's or the app's; the
        // connection closes once the peer has its answer, before its next
        // stream can arrive.
        let last = status.is_client_error() && streams.refused();
        let _ = respond.send_response(resp, true);
        if last {
            streams.all_refused.cancel();
        }
    };
    if req.method() != Method::CONNECT {
        reject(&mut respond, StatusCode::METHOD_NOT_ALLOWED);
        let o = outcome(None, CloseReason::BadRequest, Some(Refusal::MethodNotAllowed));
        return log_connection(ctx, Direction::Tunnel, peer, o, started);
    }
    let Some(dst) = req.uri().authority().and_then(|a| parse_authority(a.as_str())) else {
        reject(&mut respond, StatusCode::BAD_REQUEST);
        let o = outcome(None, CloseReason::BadRequest, Some(Refusal::MalformedAuthority));
        return log_connection(ctx, Direction::Tunnel, peer, o, started);
    };
    if !ctx.pod.ips.contains(&dst.ip()) {
        reject(&mut respond, StatusCode::FORBIDDEN);
        let o = outcome(Some(dst), CloseReason::BadRequest, Some(Refusal::NotThisPod));
        return log_connection(ctx, Direction::Tunnel, peer, o, started);
    }
    let snap = ctx.mesh.store.current();
    let Some(pod) = snap.pods.get(&ctx.pod.key).cloned() else {
        reject(&mut respond, StatusCode::SERVICE_UNAVAILABLE);
        let o = outcome(Some(dst), CloseReason::PodRemoved, None);
        return log_connection(ctx, Direction::Tunnel, peer, o, started);
    };
    let info = ConnInfo {
        src_ip: peer.ip(),
        src_identity: Some(peer_id.clone()),
        dst_ip: dst.ip(),
        dst_port: dst.port(),
    };
    let decision = snap.authorize(&pod, &info);
    log_audits(ctx, &info, &decision);
    if !decision.allowed {
        reject(&mut respond, StatusCode::FORBIDDEN);
        let mut o = outcome(
            Some(dst),
            CloseReason::PolicyDenied,
            Some(Refusal::Policy(decision.reason)),
        );
        o.policy = decision.policy;
        return log_connection(ctx, Direction::Tunnel, peer, o, started);
    }
    let open = ctx.mesh.open.register_conn(&ctx.pod.key, info, cancel);
    // The tunnel's source is the client pod (authenticated by mTLS); the
    // forwarded header may only add the client's port.
    let client = req
        .headers()
        .get("forwarded")
        .and_then(|v| v.to_str().ok())
        .and_then(parse_forwarded_for)
        .filter(|f| f.ip().to_canonical() == peer.ip() && f.port() != 0)
        .unwrap_or(peer);
    let up = match connect_app(ctx, dst, client).await {
        Ok(c) => c,
        Err(e) => {
            reject(&mut respond, StatusCode::SERVICE_UNAVAILABLE);
            let o = outcome(Some(dst), close_reason(&e), None);
            return log_connection(ctx, Direction::Tunnel, client, o, started);
        }
    };
    let ok = Response::builder().status(StatusCode::OK).body(()).expect("valid 200");
    streams.accepted();
    let send = match respond.send_response(ok, false) {
        Ok(s) => s,
        Err(_) => {
            // Reset by the peer before we answered: counted for the
            // connection's rapid-reset guard, logged with it, not here.
            resets.reset_at(Instant::now());
            ctx.mesh.counters.count(Direction::Tunnel, Counted::EarlyReset, None);
            return;
        }
    };
    let size = ctx.config.relay.buffer_size;
    let (mut down, mut up) = (H2Stream::new(send, req.into_body()), TcpLeg::new(up, size));
    // A policy sweep cut the stream, or the trust sweep its connection.
    let cut_by = || {
        open.cut_by()
            .or((cancel.is_cancelled() && !ctx.cancel.is_cancelled()).then_some(CloseReason::PeerRevoked))
    };
    let opened = Opened::count(
        ctx,
        Direction::Tunnel,
        client,
        dst,
        Transport::Hbone,
        Some(&peer_id),
        None,
    )
    .allowed_by(decision.policy);
    let stats = relay(ctx, &mut down, &mut up, &open.cancel, cut_by).await;
    if stats.reason == Some(CloseReason::PeerReset) {
        // Every client reset counts for the guard, also after the app spoke.
        resets.reset_at(Instant::now());
        if stats.sent == 0 && stats.received == 0 {
            // Opened and cancelled without a byte: counted for the
            // connection rather than logged one by one.
            ctx.mesh.counters.count(Direction::Tunnel, Counted::EarlyReset, None);
            return opened.close(CloseReason::PeerReset);
        }
    }
    log_connection(ctx, Direction::Tunnel, client, Outcome::relayed(opened, stats), started);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_reset_guard_tolerates_a_burst_and_a_steady_trickle_but_not_a_flood() {
        let start = Instant::now();
        let g = ResetGuard::new();
        for _ in 0..100 {
            g.reset_at(start);
        }
        assert!(!g.tripped.is_cancelled(), "a burst of 100 resets is allowed");
        // Five resets a second for ten minutes: well under the refill rate.
        let g = ResetGuard::new();
        for i in 0..3000 {
            g.reset_at(start + Duration::from_millis(200 * i));
        }
        assert!(!g.tripped.is_cancelled());
        // Resets faster than the refill, however spread: spent eventually.
        let g = ResetGuard::new();
        for i in 0..1000 {
            g.reset_at(start + Duration::from_millis(50 * i));
        }
        assert!(g.tripped.is_cancelled());
        let g = ResetGuard::new();
        for _ in 0..101 {
            g.reset_at(start);
        }
        assert!(g.tripped.is_cancelled());
    }
}
