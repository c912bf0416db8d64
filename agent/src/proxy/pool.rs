//! Pooled HBONE connections: many CONNECT streams share one mutually
//! authenticated HTTP/2 connection.
//!
//! Connections are keyed by (source pod, source identity, destination,
//! expected identity). The source pod is part of the key because the
//! connection is opened from that pod's network namespace and carries its
//! IP, which the destination app sees. A connection takes up to
//! `max_streams` streams; the next caller opens another. Concurrent first
//! callers for a key wait on one lock and share one handshake. Connections
//! with no stream for `idle_timeout` are released, and every connection
//! PINGs its server, closing it when a PING goes unanswered.
//!
//! Concurrent streams are spread over up to `spread` connections before any
//! connection takes a second one: each connection's TLS and HTTP/2 work runs
//! in one task, so a single connection would put every byte to a
//! destination through one core at each end.
//!
//! Each connection lives no longer than its peer is trusted: it carries the
//! peer's registration for revocation, is closed when that fires (peer
//! denied, revoked, its root removed, or its certificate expired), and takes
//! no new stream once 90 % of the certificate's remaining validity at
//! opening has passed, so a fresh connection (and handshake) serves new
//! streams before the old one is cut.

#![forbid(unsafe_code)]

use std::collections::HashMap;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;
use h2::client::SendRequest;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio_util::sync::CancellationToken;

use super::hbone::H2Settings;
#[cfg(test)]
use super::limits::LimitConfig;
use super::limits::{Limits, Refusal, send_buffer_per_stream};
use super::open::PeerRegistration;
use crate::identity::Identity;

/// What identifies a reusable tunnel connection.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub(crate) struct PoolKey {
    /// Network-namespace cookie of the source pod.
    pub(crate) src_netns: u64,
    /// Identity the connection presents.
    pub(crate) src: Identity,
    /// The destination's HBONE address.
    pub(crate) dst: SocketAddr,
    /// Identity the destination must prove.
    pub(crate) expected: Identity,
}

/// Why a stream could not be opened.
#[derive(Debug, thiserror::Error)]
pub(crate) enum PoolError {
    /// TCP or TLS failed (the TLS error may carry a refusal kind).
    #[error("connecting tunnel: {0}")]
    Connect(#[source] std::io::Error),
    /// The HTTP/2 layer failed.
    #[error("HTTP/2: {0}")]
    H2(#[from] h2::Error),
    /// The handshake did not finish in time.
    #[error("tunnel handshake timed out")]
    Timeout,
    /// Opening another connection would pass a bound on tunnel connections.
    #[error("not opening a tunnel connection: {0}")]
    Limit(#[from] Refusal),
}

/// A byte stream a tunnel runs over (TLS over TCP).
pub(crate) trait TunnelIo: AsyncRead + AsyncWrite + Unpin + Send + 'static {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send + 'static> TunnelIo for T {}

/// The transport of a new tunnel connection and what bounds its life.
pub(crate) struct Transport {
    /// TLS over TCP (or anything that carries HTTP/2).
    pub(crate) io: Box<dyn TunnelIo>,
    /// Fires when the peer stops being trusted: the connection is closed.
    pub(crate) revoked: CancellationToken,
    /// The peer's registration for revocation, kept while the connection lives.
    pub(crate) registration: Option<PeerRegistration>,
}

impl Transport {
    /// A transport no revocation applies to (tests, tools).
    #[cfg(test)]
    pub(crate) fn unregistered(io: Box<dyn TunnelIo>) -> Self {
        Transport {
            io,
            revoked: CancellationToken::new(),
            registration: None,
        }
    }
}

/// Opens the transport of a new tunnel connection.
pub(crate) type Connector<'a> = Pin<Box<dyn Future<Output = std::io::Result<Transport>> + Send + 'a>>;

struct Conn {
    /// For tests (logs carry the id from creation).
    #[cfg(test)]
    id: u64,
    sender: SendRequest<Bytes>,
    active: AtomicUsize,
    idle_since: Mutex<Instant>,
    closed: CancellationToken,
    /// The peer stopped being trusted.
    revoked: CancellationToken,
    /// No new stream from then on (the peer's certificate nears expiry).
    retire_at: Option<Instant>,
}

impl Conn {
    /// Whether the connection may take a new stream.
    fn usable(&self, now: Instant) -> bool {
        !self.closed.is_cancelled() && !self.revoked.is_cancelled() && self.retire_at.is_none_or(|t| now < t)
    }
}

type Slot = Arc<tokio::sync::Mutex<Vec<Arc<Conn>>>>;

/// The pool.
pub(crate) struct Pool {
    settings: H2Settings,
    idle_timeout: Duration,
    spread: usize,
    slots: Mutex<HashMap<PoolKey, Slot>>,
    next_id: AtomicU64,
    opened: AtomicU64,
    limits: Arc<Limits>,
}

impl std::fmt::Debug for Pool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pool")
            .field("opened", &self.opened())
            .finish_non_exhaustive()
    }
}

/// Holds a stream's place on its connection; releases it when dropped.
pub(crate) struct StreamLease {
    conn: Arc<Conn>,
}

impl StreamLease {
    /// The tunnel connection's id.
    #[cfg(test)]
    pub(crate) fn connection_id(&self) -> u64 {
        self.conn.id
    }

    /// Whether the connection was closed because its peer stopped being trusted.
    pub(crate) fn peer_revoked(&self) -> bool {
        self.conn.revoked.is_cancelled()
    }

    /// The peer sent GOAWAY (its idle timeout, a drain): the connection
    /// takes no new stream.
    pub(crate) fn retire(&self) {
        self.conn.closed.cancel();
    }
}

impl Drop for StreamLease {
    fn drop(&mut self) {
        if self.conn.active.fetch_sub(1, Ordering::AcqRel) == 1 {
            *self.conn.idle_since.lock().unwrap_or_else(|e| e.into_inner()) = Instant::now();
        }
    }
}

impl Pool {
    /// An empty pool that spreads concurrent streams to one destination
    /// over up to `spread` connections (at least one).
    #[cfg(test)]
    pub(crate) fn new(settings: H2Settings, idle_timeout: Duration, spread: usize) -> Arc<Pool> {
        Self::with_limits(settings, idle_timeout, spread, Limits::new(LimitConfig::UNLIMITED))
    }

    /// [`Pool::new`] whose connections count against `limits` (per source
    /// pod and in total) for as long as they are open.
    pub(crate) fn with_limits(
        settings: H2Settings,
        idle_timeout: Duration,
        spread: usize,
        limits: Arc<Limits>,
    ) -> Arc<Pool> {
        Arc::new(Pool {
            settings,
            idle_timeout,
            spread: spread.max(1),
            slots: Mutex::new(HashMap::new()),
            next_id: AtomicU64::new(1),
            opened: AtomicU64::new(0),
            limits,
        })
    }

    /// Tunnel connections opened so far.
    pub(crate) fn opened(&self) -> u64 {
        self.opened.load(Ordering::Relaxed)
    }

    /// A ready sender on a connection for `key` with a free stream,
    /// opening one with `connect` if none has room.
    pub(crate) async fn sender(
        &self,
        key: &PoolKey,
        connect: impl FnOnce() -> Connector<'static>,
    ) -> Result<(SendRequest<Bytes>, StreamLease), PoolError> {
        let slot = self
            .slots
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry(key.clone())
            .or_default()
            .clone();
        let conn = {
            let mut conns = slot.lock().await;
            let now = Instant::now();
            conns.retain(|c| c.usable(now));
            let max = self.settings.max_streams as usize;
            // The least busy connection with room; an idle one is taken as is.
            let least = conns
                .iter()
                .map(|c| (c.active.load(Ordering::Acquire), c))
                .filter(|(n, _)| *n < max)
                .min_by_key(|(n, _)| *n)
                .map(|(n, c)| (n, c.clone()));
            // Streams are only taken under the slot lock, so the counts read
            // above still hold.
            let conn = match least {
                Some((n, c)) if n == 0 || conns.len() >= self.spread => c,
                _ => match self.open(key, connect).await {
                    Ok(c) => {
                        conns.push(c.clone());
                        c
                    }
                    // Spreading is an optimisation: when another connection
                    // cannot be opened, one with room still serves.
                    Err(e) => least.map(|(_, c)| c).ok_or(e)?,
                },
            };
            conn.active.fetch_add(1, Ordering::AcqRel);
            conn
        };
        let lease = StreamLease { conn: conn.clone() };
        let sender = match conn.sender.clone().ready().await {
            Ok(s) => s,
            Err(e) => {
                // Gone or going away (GOAWAY): no other stream goes there.
                conn.closed.cancel();
                return Err(e.into());
            }
        };
        Ok((sender, lease))
    }

    async fn open(&self, key: &PoolKey, connect: impl FnOnce() -> Connector<'static>) -> Result<Arc<Conn>, PoolError> {
        let s = self.settings;
        // Held by the connection's driver task, so it counts until the
        // connection is really gone.
        let permit = self.limits.tunnel_out(key.src_netns)?;
        let handshake = async {
            let transport = connect().await.map_err(PoolError::Connect)?;
            let (io, revoked, registration) = (transport.io, transport.revoked, transport.registration);
            let (sender, connection) = h2::client::Builder::new()
                .initial_window_size(s.stream_window)
                .initial_connection_window_size(s.connection_window)
                .max_frame_size(s.max_frame_size)
                .max_header_list_size(s.max_header_list_size)
                .max_concurrent_streams(0)
                .max_send_buffer_size(send_buffer_per_stream(
                    s.stream_window,
                    s.connection_window,
                    s.max_streams,
                ))
                .enable_push(false)
                .handshake::<_, Bytes>(io)
                .await?;
            Ok::<_, PoolError>((sender, connection, revoked, registration))
        };
        let (sender, mut connection, revoked, registration) = tokio::time::timeout(s.handshake_timeout, handshake)
            .await
            .map_err(|_| PoolError::Timeout)??;
        let dead_peer = super::hbone::dead_peer(connection.ping_pong(), s.keepalive);
        let retire_at = registration.as_ref().map(|r| {
            let left = r
                .not_after()
                .duration_since(SystemTime::now())
                .unwrap_or(Duration::ZERO);
            Instant::now() + left.mul_f64(0.9)
        });
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        self.opened.fetch_add(1, Ordering::Relaxed);
        let closed = CancellationToken::new();
        let (done, cut) = (closed.clone(), revoked.clone());
        let (src, dst, expected) = (key.src.clone(), key.dst, key.expected.clone());
        tracing::info!(id, %src, %dst, %expected, "tunnel connection opened");
        tokio::spawn(async move {
            // Filed for revocation as long as the connection lives.
            let _registration = registration;
            let error = tokio::select! {
                r = connection => r.err().map(|e| e.to_string()),
                // Dropping the connection closes it and fails its streams.
                _ = cut.cancelled() => Some("peer no longer trusted".to_string()),
                () = dead_peer => Some("the peer does not answer PING".to_string()),
            };
            drop(permit);
            done.cancel();
            tracing::info!(id, %src, %dst, error, "tunnel connection closed");
        });
        Ok(Arc::new(Conn {
            #[cfg(test)]
            id,
            sender,
            active: AtomicUsize::new(0),
            idle_since: Mutex::new(Instant::now()),
            closed,
            revoked,
            retire_at,
        }))
    }

    /// Releases connections idle longer than the idle timeout; run it
    /// periodically. Dropping the last sender closes the connection.
    pub(crate) async fn release_idle(&self) {
        let slots: Vec<(PoolKey, Slot)> = self
            .slots
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        for (key, slot) in slots {
            let mut conns = slot.lock().await;
            let now = Instant::now();
            conns.retain(|c| {
                let idle = c.active.load(Ordering::Acquire) == 0
                    && c.idle_since.lock().unwrap_or_else(|e| e.into_inner()).elapsed() >= self.idle_timeout;
                !idle && c.usable(now)
            });
            if conns.is_empty() {
                drop(conns);
                let mut slots = self.slots.lock().unwrap_or_else(|e| e.into_inner());
                if slots
                    .get(&key)
                    .is_some_and(|s| s.try_lock().is_ok_and(|v| v.is_empty()))
                {
                    slots.remove(&key);
                }
            }
        }
    }

    /// Runs [`Pool::release_idle`] every second until `stop`.
    pub(crate) async fn run(self: Arc<Self>, stop: CancellationToken) {
        loop {
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tokio::time::sleep(Duration::from_secs(1)) => self.release_idle().await,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key() -> PoolKey {
        PoolKey {
            src_netns: 1,
            src: Identity::new("cluster.local", "a", "client"),
            dst: "10.0.0.2:15008".parse().unwrap(),
            expected: Identity::new("cluster.local", "c", "server"),
        }
    }

    /// A connector to an in-memory HTTP/2 server that accepts every stream.
    fn to_server() -> Connector<'static> {
        Box::pin(async {
            let (client, server) = tokio::io::duplex(64 << 10);
            tokio::spawn(async move {
                let Ok(mut conn) = h2::server::handshake(server).await else {
                    return;
                };
                while let Some(Ok((_req, mut respond))) = conn.accept().await {
                    let _ = respond.send_response(http::Response::new(()), false);
                }
            });
            Ok(Transport::unregistered(Box::new(client)))
        })
    }

    fn refused() -> Connector<'static> {
        Box::pin(async { Err(std::io::Error::new(std::io::ErrorKind::ConnectionRefused, "refused")) })
    }

    #[tokio::test]
    async fn concurrent_streams_spread_then_share() {
        let pool = Pool::new(H2Settings::default(), Duration::from_secs(60), 2);
        let (_s1, l1) = pool.sender(&key(), to_server).await.unwrap();
        let (_s2, l2) = pool.sender(&key(), to_server).await.unwrap();
        assert_ne!(
            l1.connection_id(),
            l2.connection_id(),
            "the second stream gets its own connection"
        );
        let (_s3, l3) = pool.sender(&key(), refused).await.unwrap();
        assert!([l1.connection_id(), l2.connection_id()].contains(&l3.connection_id()));
        assert_eq!(pool.opened(), 2, "no more than the spread");
        // Both streams of one connection end: it is idle, and taken first.
        let idle = l1.connection_id();
        let busy = if l3.connection_id() == idle { None } else { Some(l3) };
        drop(l1);
        let (_s4, l4) = pool.sender(&key(), refused).await.unwrap();
        assert_eq!(l4.connection_id(), idle, "an idle connection is taken first");
        drop(busy);
    }

    #[tokio::test]
    async fn a_connection_that_cannot_be_opened_falls_back_to_one_with_room() {
        let pool = Pool::new(H2Settings::default(), Duration::from_secs(60), 2);
        let (_s1, l1) = pool.sender(&key(), to_server).await.unwrap();
        // The spread asks for a second connection; it cannot be opened.
        let (_s2, l2) = pool.sender(&key(), refused).await.unwrap();
        assert_eq!(l1.connection_id(), l2.connection_id());
        // With no connection at all, the failure is the caller's.
        let other = PoolKey { src_netns: 2, ..key() };
        assert!(matches!(pool.sender(&other, refused).await, Err(PoolError::Connect(_))));
    }

    #[tokio::test]
    async fn a_pod_at_its_tunnel_bound_shares_what_it_has_and_is_refused_without_any() {
        let limits = Limits::new(LimitConfig {
            tunnels_per_pod: 1,
            ..LimitConfig::UNLIMITED
        });
        let pool = Pool::with_limits(H2Settings::default(), Duration::from_secs(60), 2, limits);
        let (_s1, l1) = pool.sender(&key(), to_server).await.unwrap();
        // The spread would open a second connection; the bound says no.
        let (_s2, l2) = pool.sender(&key(), to_server).await.unwrap();
        assert_eq!(l1.connection_id(), l2.connection_id());
        assert_eq!(pool.opened(), 1);
        // Another destination of the same pod needs a connection of its own.
        let elsewhere = PoolKey {
            dst: "10.0.0.3:15008".parse().unwrap(),
            ..key()
        };
        assert!(matches!(
            pool.sender(&elsewhere, to_server).await,
            Err(PoolError::Limit(Refusal::TunnelsPerPod))
        ));
        // Another pod has its own bound.
        let other = PoolKey { src_netns: 2, ..key() };
        assert!(pool.sender(&other, to_server).await.is_ok());
    }

    #[tokio::test]
    async fn a_connection_whose_peer_is_revoked_takes_no_new_stream_and_closes() {
        let pool = Pool::new(H2Settings::default(), Duration::from_secs(60), 1);
        let revoked = CancellationToken::new();
        let cut = revoked.clone();
        let first = move || -> Connector<'static> {
            Box::pin(async move {
                let mut t = to_server().await?;
                t.revoked = cut;
                Ok(t)
            })
        };
        let (_s1, l1) = pool.sender(&key(), first).await.unwrap();
        revoked.cancel();
        assert!(l1.peer_revoked());
        let (_s2, l2) = pool.sender(&key(), to_server).await.unwrap();
        assert_ne!(
            l1.connection_id(),
            l2.connection_id(),
            "a fresh connection serves new streams"
        );
        assert_eq!(pool.opened(), 2);
        // The revoked connection itself is closed, streams and all.
        tokio::time::timeout(Duration::from_secs(5), l1.conn.closed.cancelled())
            .await
            .expect("closed");
    }
}
