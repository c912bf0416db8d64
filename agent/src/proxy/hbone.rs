//! HBONE on the wire: HTTP/2 `CONNECT` streams over mutual TLS to port
//! 15008, as ztunnel speaks it, and the two halves of a stream as the
//! relay's [`Source`] and [`Sink`], so the same relay serves plaintext and
//! tunnels and DATA frames are never copied on the way.

#![forbid(unsafe_code)]

use std::io;
use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use bytes::Bytes;
use h2::{RecvStream, SendStream};

use super::relay::{Leg, Sink, Source};

/// Port of the HBONE listener in every pod.
pub(crate) const HBONE_PORT: u16 = nodeward_common::TUNNEL_PORT;

/// HTTP/2 settings of tunnel connections, both ends.
#[derive(Clone, Copy, Debug)]
pub(crate) struct H2Settings {
    /// Initial stream window (bytes a peer may send on one stream unacknowledged).
    pub(crate) stream_window: u32,
    /// Initial connection window.
    pub(crate) connection_window: u32,
    /// Largest frame.
    pub(crate) max_frame_size: u32,
    /// Streams per connection.
    pub(crate) max_streams: u32,
    /// Largest accepted header list (the request line and headers).
    pub(crate) max_header_list_size: u32,
    /// One deadline for TLS and HTTP/2 handshakes (inbound: from accept to
    /// the first stream).
    pub(crate) handshake_timeout: Duration,
    /// A connection with no open stream this long is closed (inbound: GOAWAY).
    pub(crate) idle_timeout: Duration,
    /// PING interval, and how long a PING may go unanswered before the
    /// peer is taken for dead.
    pub(crate) keepalive: Duration,
}

impl Default for H2Settings {
    /// The flags' defaults, for pools built without flags (tests, tools).
    fn default() -> Self {
        use crate::config::defaults;
        H2Settings {
            stream_window: defaults::H2_STREAM_WINDOW,
            connection_window: defaults::H2_CONNECTION_WINDOW,
            max_frame_size: defaults::H2_FRAME_SIZE,
            max_streams: defaults::TUNNEL_MAX_STREAMS,
            max_header_list_size: MAX_HEADER_LIST_SIZE,
            handshake_timeout: defaults::HANDSHAKE_TIMEOUT,
            idle_timeout: defaults::TUNNEL_IDLE_TIMEOUT,
            keepalive: defaults::TUNNEL_KEEPALIVE,
        }
    }
}

/// Pings the peer of a tunnel connection every `every` and returns once a
/// PING goes unanswered for as long again: the peer is gone (a half-open
/// connection, a powered-off node) while the connection looks open. Never
/// returns while the peer answers, nor once the connection itself has
/// ended (its owner sees that end). The connection must be polled
/// meanwhile, or no PONG can be read.
pub(crate) async fn dead_peer(ping: Option<h2::PingPong>, every: Duration) {
    let Some(mut ping) = ping else {
        return std::future::pending().await;
    };
    loop {
        tokio::time::sleep(every).await;
        match tokio::time::timeout(every, ping.ping(h2::Ping::opaque())).await {
            Ok(Ok(_)) => {}
            Ok(Err(_)) => return std::future::pending().await,
            Err(_) => return,
        }
    }
}

/// Largest header list accepted: a CONNECT carries a few short headers.
const MAX_HEADER_LIST_SIZE: u32 = 16 << 10;

/// `:authority` of a CONNECT for `dst`: `ip:port`, IPv6 in brackets.
pub(crate) fn authority(dst: SocketAddr) -> String {
    dst.to_string()
}

/// Parses a CONNECT authority; only literal `ip:port` is valid in HBONE.
pub(crate) fn parse_authority(a: &str) -> Option<SocketAddr> {
    let addr: SocketAddr = a.parse().ok()?;
    (addr.port() != 0).then_some(SocketAddr::new(addr.ip().to_canonical(), addr.port()))
}

/// The `forwarded` header value for the original client (RFC 7239).
pub(crate) fn forwarded_for(client: SocketAddr) -> String {
    format!("for=\"{client}\"")
}

/// The client address from a `forwarded` header, if well formed.
pub(crate) fn parse_forwarded_for(v: &str) -> Option<SocketAddr> {
    v.split([';', ',']).find_map(|part| {
        let val = part.trim().strip_prefix("for=")?.trim_matches('"');
        val.parse::<SocketAddr>()
            .ok()
            .or_else(|| val.parse::<IpAddr>().ok().map(|ip| SocketAddr::new(ip, 0)))
    })
}

/// A fresh W3C `traceparent` for a tunnel stream.
pub(crate) fn traceparent() -> String {
    use ring::rand::SecureRandom;
    let mut b = [0u8; 24];
    let _ = ring::rand::SystemRandom::new().fill(&mut b);
    let hex = |s: &[u8]| s.iter().map(|x| format!("{x:02x}")).collect::<String>();
    format!("00-{}-{}-01", hex(&b[..16]), hex(&b[16..]))
}

/// The receiving half of a tunnel stream: DATA frames as they arrive, the
/// flow-control window given back only as the relay hands bytes on, so a
/// slow reader throttles the sender and memory per stream is bounded by the
/// stream window.
pub(crate) struct H2Recv(RecvStream);

/// The sending half of a tunnel stream: DATA within the peer's window,
/// END_STREAM as half-close, RST_STREAM as reset.
pub(crate) struct H2Send(SendStream<Bytes>);

/// One tunnel stream as one side of a relay.
pub(crate) struct H2Stream {
    send: H2Send,
    recv: H2Recv,
}

impl H2Stream {
    /// The stream of a sent (or received) `CONNECT` and the body answering it.
    pub(crate) fn new(send: SendStream<Bytes>, recv: RecvStream) -> Self {
        H2Stream {
            send: H2Send(send),
            recv: H2Recv(recv),
        }
    }
}

impl Leg for H2Stream {
    type Source = H2Recv;
    type Sink = H2Send;

    fn halves(&mut self) -> (&mut H2Recv, &mut H2Send) {
        (&mut self.recv, &mut self.send)
    }

    /// The peer sees RST_STREAM instead of a clean end.
    fn reset(&mut self) {
        self.send.0.send_reset(h2::Reason::CANCEL);
    }
}

fn h2_io(e: h2::Error) -> io::Error {
    if e.is_io() {
        return e.into_io().unwrap_or_else(|| io::Error::other("h2 I/O error"));
    }
    let kind = if e.is_reset() || e.is_go_away() {
        io::ErrorKind::ConnectionReset
    } else {
        io::ErrorKind::Other
    };
    io::Error::new(kind, e)
}

impl Source for H2Recv {
    async fn next_chunk(&mut self) -> io::Result<Option<Bytes>> {
        loop {
            match std::future::poll_fn(|cx| self.0.poll_data(cx)).await {
                // An empty DATA frame carries nothing to pass on.
                Some(Ok(data)) if data.is_empty() => continue,
                Some(Ok(data)) => return Ok(Some(data)),
                Some(Err(e)) => return Err(h2_io(e)),
                None => return Ok(None),
            }
        }
    }

    fn consumed(&mut self, n: usize) {
        let _ = self.0.flow_control().release_capacity(n);
    }
}

impl Sink for H2Send {
    async fn write_chunk(&mut self, mut chunk: Bytes) -> io::Result<()> {
        while !chunk.is_empty() {
            self.0.reserve_capacity(chunk.len());
            let cap = match std::future::poll_fn(|cx| self.0.poll_capacity(cx)).await {
                Some(Ok(cap)) => cap,
                Some(Err(e)) => return Err(h2_io(e)),
                None => return Err(io::Error::new(io::ErrorKind::BrokenPipe, "stream closed")),
            };
            // Splitting a Bytes shares its memory: no copy.
            let part = chunk.split_to(cap.min(chunk.len()));
            self.0.send_data(part, false).map_err(h2_io)?;
        }
        Ok(())
    }

    async fn finish(&mut self) -> io::Result<()> {
        self.0.send_data(Bytes::new(), true).map_err(h2_io)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn authorities_are_literal_ip_and_port() {
        assert_eq!(parse_authority("10.1.2.3:80"), Some("10.1.2.3:80".parse().unwrap()));
        assert_eq!(parse_authority("[fd00::1]:443"), Some("[fd00::1]:443".parse().unwrap()));
        assert_eq!(
            parse_authority("[::ffff:10.0.0.1]:1"),
            Some("10.0.0.1:1".parse().unwrap())
        );
        for bad in [
            "example.com:80",
            "10.1.2.3",
            "10.1.2.3:0",
            "10.1.2.3:99999",
            "",
            "[fd00::1]",
            ":80",
        ] {
            assert_eq!(parse_authority(bad), None, "{bad}");
        }
        assert_eq!(authority("[fd00::1]:443".parse().unwrap()), "[fd00::1]:443");
    }

    #[test]
    fn forwarded_round_trips() {
        let c: SocketAddr = "[fd00::7]:4711".parse().unwrap();
        assert_eq!(parse_forwarded_for(&forwarded_for(c)), Some(c));
        assert_eq!(parse_forwarded_for("for=10.0.0.1"), Some("10.0.0.1:0".parse().unwrap()));
        assert_eq!(parse_forwarded_for("proto=https"), None);
    }

    #[test]
    fn traceparent_has_the_w3c_shape() {
        let t = traceparent();
        let parts: Vec<&str> = t.split('-').collect();
        assert_eq!(parts.len(), 4);
        assert_eq!(
            (parts[0], parts[1].len(), parts[2].len(), parts[3]),
            ("00", 32, 16, "01")
        );
    }
}
