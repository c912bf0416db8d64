//! The one relay every proxied connection ends in ([`relay`]), plaintext
//! or tunnel stream, either side. Copies bytes both ways: half-close propagates
//! (a FIN on one side becomes a shutdown on the other), backpressure comes
//! from awaiting each write before the next read, and the pair is closed
//! after an idle period. Returns what a log line and metrics need.
//!
//! Bytes move as [`Bytes`] chunks from a [`Source`] to a [`Sink`], so a
//! chunk read from a socket goes into an HTTP/2 DATA frame, and a DATA
//! frame goes to a socket, without being copied on the way.

#![forbid(unsafe_code)]

use std::future::Future;
use std::io;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bytes::{BufMut, Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio_util::sync::CancellationToken;

use super::report::final_reason;
use super::{PodContext, socket};
use crate::outcome::CloseReason;

/// Where one direction of a relay reads from.
pub(crate) trait Source: Send {
    /// The next chunk of bytes, or `None` at the end of the stream.
    fn next_chunk(&mut self) -> impl Future<Output = io::Result<Option<Bytes>>> + Send;

    /// The sink has taken `n` more bytes. A source with flow control (an
    /// HTTP/2 stream) lets its peer send more only now, so a slow reader
    /// throttles the sender.
    fn consumed(&mut self, _n: usize) {}
}

/// Where one direction of a relay writes to.
pub(crate) trait Sink: Send {
    /// Writes all of `chunk`, waiting for room as needed.
    fn write_chunk(&mut self, chunk: Bytes) -> impl Future<Output = io::Result<()>> + Send;

    /// Ends this direction (half-close): FIN, or END_STREAM.
    fn finish(&mut self) -> impl Future<Output = io::Result<()>> + Send;
}

/// A byte stream (a socket's read half) as a [`Source`]. Reads into a
/// buffer that starts at 4 KiB and grows to the bulk size on the first full
/// read; a chunk's memory is reused once its sink has dropped it.
pub(crate) struct StreamSource<R> {
    r: R,
    buf: BytesMut,
    size: usize,
    max: usize,
}

impl<R> StreamSource<R> {
    /// Reads `r` in chunks of at most `max` bytes.
    pub(crate) fn new(r: R, max: usize) -> Self {
        StreamSource {
            r,
            buf: BytesMut::new(),
            size: INITIAL_BUFFER.min(max),
            max,
        }
    }
}

impl<R: AsyncRead + Unpin + Send> Source for StreamSource<R> {
    async fn next_chunk(&mut self) -> io::Result<Option<Bytes>> {
        // Reclaims the previous chunk's memory when nothing holds it.
        self.buf.reserve(self.size);
        let n = self.r.read_buf(&mut (&mut self.buf).limit(self.size)).await?;
        if n == 0 {
            return Ok(None);
        }
        if n == self.size {
            self.size = self.max;
        }
        Ok(Some(self.buf.split().freeze()))
    }
}

/// A byte stream (a socket's write half) as a [`Sink`].
pub(crate) struct StreamSink<W>(pub W);

impl<W: AsyncWrite + Unpin + Send> Sink for StreamSink<W> {
    async fn write_chunk(&mut self, chunk: Bytes) -> io::Result<()> {
        self.0.write_all(&chunk).await
    }

    async fn finish(&mut self) -> io::Result<()> {
        self.0.shutdown().await
    }
}

/// Buffer a direction starts with, before it proves to carry bulk data.
const INITIAL_BUFFER: usize = 4096;

/// Byte counts and reason of a finished relay.
#[derive(Clone, Copy, Debug)]
pub(crate) struct RelayStats {
    /// Bytes from the downstream (accepted) side to the upstream side.
    pub(crate) sent: u64,
    /// Bytes from upstream to downstream.
    pub(crate) received: u64,
    /// Why it ended; `None` when cancelled (the caller knows why).
    pub(crate) reason: Option<CloseReason>,
}

/// Relay settings.
#[derive(Clone, Copy, Debug)]
pub(crate) struct RelayOptions {
    /// Close after this long without a byte either way.
    pub(crate) idle_timeout: Duration,
    /// Per-direction buffer of a direction that carries bulk data (each
    /// starts at 4 KiB and grows to this on its first full read).
    pub(crate) buffer_size: usize,
}

/// One side of a proxied connection: a socket or a tunnel stream.
pub(crate) trait Leg: Send {
    /// What this side's bytes are read from.
    type Source: Source;
    /// What bytes for this side are written to.
    type Sink: Sink;

    /// Both halves, to move bytes each way at once.
    fn halves(&mut self) -> (&mut Self::Source, &mut Self::Sink);

    /// Tells the other end the connection did not end cleanly.
    fn reset(&mut self);
}

/// A socket as one side of a relay.
pub(crate) struct TcpLeg {
    source: StreamSource<OwnedReadHalf>,
    sink: StreamSink<OwnedWriteHalf>,
}

impl TcpLeg {
    /// `s`, read in chunks of at most `buffer_size` bytes.
    pub(crate) fn new(s: TcpStream, buffer_size: usize) -> Self {
        let (r, w) = s.into_split();
        TcpLeg {
            source: StreamSource::new(r, buffer_size),
            sink: StreamSink(w),
        }
    }
}

impl Leg for TcpLeg {
    type Source = StreamSource<OwnedReadHalf>;
    type Sink = StreamSink<OwnedWriteHalf>;

    fn halves(&mut self) -> (&mut Self::Source, &mut Self::Sink) {
        (&mut self.source, &mut self.sink)
    }

    fn reset(&mut self) {
        socket::reset(self.source.r.as_ref());
    }
}

/// Relays a connection of `ctx`'s pod between `down` (the accepted side)
/// and `up` until it ends or `cancel` fires, then resets both sides unless
/// it ended cleanly. `cut_by` says which sweep cancelled it, if one did:
/// that wins over however the relay saw the end, since tearing a connection
/// down also errors it.
pub(crate) async fn relay(
    ctx: &PodContext,
    down: &mut impl Leg,
    up: &mut impl Leg,
    cancel: &CancellationToken,
    cut_by: impl FnOnce() -> Option<CloseReason>,
) -> RelayStats {
    let (ds, dk) = down.halves();
    let (us, uk) = up.halves();
    let mut stats = pump(ds, dk, us, uk, ctx.config.relay, cancel).await;
    if let Some(reason) = cut_by() {
        stats.reason = Some(reason);
    }
    if final_reason(ctx, stats.reason).resets() {
        down.reset();
        up.reset();
    }
    stats
}

/// Moves bytes between downstream (`ds` read, `dk` written) and upstream
/// (`us`, `uk`) until both directions finish, one fails, the idle timeout
/// passes or `cancel` fires.
pub(crate) async fn pump<DS, DK, US, UK>(
    ds: &mut DS,
    dk: &mut DK,
    us: &mut US,
    uk: &mut UK,
    opts: RelayOptions,
    cancel: &CancellationToken,
) -> RelayStats
where
    DS: Source,
    DK: Sink,
    US: Source,
    UK: Sink,
{
    let start = Instant::now();
    let last = AtomicU64::new(0);
    let sent = AtomicU64::new(0);
    let received = AtomicU64::new(0);
    let up = copy_one_way(ds, uk, &sent, &last, start);
    let down = copy_one_way(us, dk, &received, &last, start);
    let reason = tokio::select! {
        r = async { tokio::try_join!(up, down) } => Some(match r {
            Ok(_) => CloseReason::Done,
            Err(e) => CloseReason::from_io(&e),
        }),
        _ = idle(&last, start, opts.idle_timeout) => Some(CloseReason::IdleTimeout),
        _ = cancel.cancelled() => None,
    };
    RelayStats {
        sent: sent.load(Ordering::Relaxed),
        received: received.load(Ordering::Relaxed),
        reason,
    }
}

async fn copy_one_way<S: Source, K: Sink>(
    src: &mut S,
    sink: &mut K,
    count: &AtomicU64,
    last: &AtomicU64,
    start: Instant,
) -> io::Result<()> {
    loop {
        let Some(chunk) = src.next_chunk().await? else {
            // Half-close: pass the FIN on and keep the other direction open.
            // The peer may already be gone; that shows on the other direction.
            let _ = sink.finish().await;
            return Ok(());
        };
        let n = chunk.len();
        sink.write_chunk(chunk).await?;
        src.consumed(n);
        count.fetch_add(n as u64, Ordering::Relaxed);
        last.store(start.elapsed().as_millis() as u64, Ordering::Relaxed);
    }
}

async fn idle(last: &AtomicU64, start: Instant, timeout: Duration) {
    loop {
        let deadline = Duration::from_millis(last.load(Ordering::Relaxed)) + timeout;
        let now = start.elapsed();
        if now >= deadline {
            return;
        }
        tokio::time::sleep(deadline - now).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{DuplexStream, duplex};

    async fn relay_duplex(
        down: DuplexStream,
        up: DuplexStream,
        o: RelayOptions,
        cancel: &CancellationToken,
    ) -> RelayStats {
        let (dr, dw) = tokio::io::split(down);
        let (ur, uw) = tokio::io::split(up);
        let (mut ds, mut us) = (
            StreamSource::new(dr, o.buffer_size),
            StreamSource::new(ur, o.buffer_size),
        );
        pump(&mut ds, &mut StreamSink(dw), &mut us, &mut StreamSink(uw), o, cancel).await
    }

    fn opts(idle_ms: u64) -> RelayOptions {
        RelayOptions {
            idle_timeout: Duration::from_millis(idle_ms),
            buffer_size: 1024,
        }
    }

    #[tokio::test]
    async fn half_close_passes_through_and_the_other_direction_continues() {
        let (client, proxy_down) = duplex(64);
        let (proxy_up, server) = duplex(64);
        let cancel = CancellationToken::new();
        let relay = tokio::spawn(async move { relay_duplex(proxy_down, proxy_up, opts(5_000), &cancel).await });

        let (mut cr, mut cw) = tokio::io::split(client);
        let (mut sr, mut sw) = tokio::io::split(server);
        cw.write_all(b"request").await.unwrap();
        cw.shutdown().await.unwrap();
        let mut got = Vec::new();
        sr.read_to_end(&mut got).await.unwrap();
        assert_eq!(got, b"request", "server sees the request and then EOF");
        sw.write_all(b"response after the client's FIN").await.unwrap();
        sw.shutdown().await.unwrap();
        let mut back = Vec::new();
        cr.read_to_end(&mut back).await.unwrap();
        assert_eq!(back, b"response after the client's FIN");
        let stats = relay.await.unwrap();
        assert_eq!(stats.reason, Some(CloseReason::Done));
        assert_eq!((stats.sent, stats.received), (7, 31));
    }

    #[tokio::test]
    async fn bulk_data_crosses_intact_as_the_buffer_grows() {
        let (client, proxy_down) = duplex(64 << 10);
        let (proxy_up, server) = duplex(64 << 10);
        let cancel = CancellationToken::new();
        let o = RelayOptions {
            idle_timeout: Duration::from_secs(5),
            buffer_size: 32 << 10,
        };
        let relay = tokio::spawn(async move { relay_duplex(proxy_down, proxy_up, o, &cancel).await });
        let data: Vec<u8> = (0..1_000_003u32).map(|i| (i % 251) as u8).collect();
        let (_cr, mut cw) = tokio::io::split(client);
        let (mut sr, mut sw) = tokio::io::split(server);
        let sent = data.clone();
        let writer = tokio::spawn(async move {
            // Small writes first (the 4 KiB start), then large ones.
            cw.write_all(&sent[..100]).await.unwrap();
            cw.write_all(&sent[100..]).await.unwrap();
            cw.shutdown().await.unwrap();
        });
        let mut got = Vec::new();
        sr.read_to_end(&mut got).await.unwrap();
        writer.await.unwrap();
        assert!(
            got == data,
            "{} bytes arrived of {}, or out of order",
            got.len(),
            data.len()
        );
        sw.shutdown().await.unwrap();
        let stats = relay.await.unwrap();
        assert_eq!((stats.reason, stats.sent), (Some(CloseReason::Done), data.len() as u64));
    }

    #[tokio::test]
    async fn idle_connections_are_closed() {
        let (_client, proxy_down) = duplex(64);
        let (proxy_up, _server) = duplex(64);
        let cancel = CancellationToken::new();
        let stats = relay_duplex(proxy_down, proxy_up, opts(50), &cancel).await;
        assert_eq!(stats.reason, Some(CloseReason::IdleTimeout));
    }

    #[tokio::test]
    async fn cancellation_ends_the_relay() {
        let (_client, proxy_down) = duplex(64);
        let (proxy_up, _server) = duplex(64);
        let cancel = CancellationToken::new();
        cancel.cancel();
        let stats = relay_duplex(proxy_down, proxy_up, opts(60_000), &cancel).await;
        assert_eq!(stats.reason, None);
    }
}
