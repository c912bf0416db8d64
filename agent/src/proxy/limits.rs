//! Bounds on what a peer or a pod can make the agent hold: proxied
//! connections per pod and in total, inbound tunnel connections per remote
//! peer and in total, outbound ones per source pod and in total, and
//! unauthenticated handshakes on 15008 per remote peer and in total.
//!
//! Inbound and outbound tunnels have bounds of their own, so peers holding
//! tunnels to this node cannot stop its pods from opening tunnels out, nor
//! the reverse. A remote peer is an IPv4 address, a known pod's IPv6
//! address, or else an IPv6 /64 ([`peer_key`]).
//!
//! Each bound is a counter taken when a connection is accepted (or a tunnel
//! opened) and given back when its [`Permit`] is dropped, so a count can
//! never leak past the connection it stands for. Over a bound the
//! connection is refused before any work is spent on it; refusals are
//! counted per reason and warned about at most once per [`WARN_INTERVAL`]
//! per reason, with the number refused since the last warning.

#![forbid(unsafe_code)]

use std::collections::HashMap;
use std::hash::Hash;
use std::net::IpAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::outcome::Direction;

/// At most one refusal warning per reason this often.
pub(crate) const WARN_INTERVAL: Duration = Duration::from_secs(5);

/// The configured bounds (see `RunArgs` for their flags and defaults).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct LimitConfig {
    /// Proxied connections on the node: outbound, inbound plaintext and
    /// inbound tunnel streams together.
    pub(crate) connections: usize,
    /// Proxied connections of one pod in one direction (outbound; inbound
    /// plaintext and tunnel streams).
    pub(crate) connections_per_pod: usize,
    /// Inbound tunnel connections on the node, handshakes included.
    pub(crate) tunnels_in: usize,
    /// Outbound (pooled) tunnel connections on the node.
    pub(crate) tunnels_out: usize,
    /// Inbound tunnel connections from one remote peer ([`peer_key`]),
    /// handshakes included.
    pub(crate) tunnels_per_peer: usize,
    /// Outbound (pooled) tunnel connections of one source pod.
    pub(crate) tunnels_per_pod: usize,
    /// Inbound connections on 15008 not yet through their TLS and HTTP/2
    /// handshakes.
    pub(crate) handshakes: usize,
    /// Such handshakes from one remote peer ([`peer_key`]).
    pub(crate) handshakes_per_peer: usize,
}

impl LimitConfig {
    /// No bound at all, for tests and tools that build a pool by hand.
    #[cfg(test)]
    pub(crate) const UNLIMITED: LimitConfig = LimitConfig {
        connections: usize::MAX,
        connections_per_pod: usize::MAX,
        tunnels_in: usize::MAX,
        tunnels_out: usize::MAX,
        tunnels_per_peer: usize::MAX,
        tunnels_per_pod: usize::MAX,
        handshakes: usize::MAX,
        handshakes_per_peer: usize::MAX,
    };
}

/// Bytes an HTTP/2 stream may queue for sending: the connection window
/// shared out over the streams, at least 64 KiB (two relay chunks), at
/// most the stream window. A tunnel connection then holds at most about one
/// connection window received (flow control) plus one queued to send,
/// however many streams it carries and however its peer behaves.
pub(crate) fn send_buffer_per_stream(stream_window: u32, connection_window: u32, max_streams: u32) -> usize {
    let share = connection_window as usize / (max_streams.max(1) as usize);
    share.max(64 << 10).min(stream_window as usize)
}

/// The remote peer `ip` is counted as: an IPv4 address (IPv4-mapped IPv6
/// included), an IPv6 address that is a known pod's (`known_pod`: pods of
/// one node share that node's /64, each its own /128), or else the /64 of
/// an IPv6 address, so a client cannot multiply its share by sourcing from
/// more addresses of its prefix (answering neighbour discovery for them
/// takes only `CAP_NET_RAW`): all the unknown addresses of a /64 share one
/// bound, while each known pod has its own.
pub(crate) fn peer_key(ip: IpAddr, known_pod: bool) -> IpAddr {
    match ip.to_canonical() {
        IpAddr::V6(v6) if !known_pod => IpAddr::V6(std::net::Ipv6Addr::from_bits(v6.to_bits() & !((1u128 << 64) - 1))),
        other => other,
    }
}

/// Which bound refused a connection (defined with every other outcome label).
pub(crate) use crate::outcome::LimitRefusal as Refusal;

const REASONS: usize = Refusal::COUNT;

/// Which side of a pod a proxied connection is on; each has its own bound,
/// so a flood from outside cannot starve the pod's own outbound traffic.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub(crate) enum Side {
    /// Opened by the pod's apps.
    Outbound,
    /// Addressed to the pod, in plaintext or as a tunnel stream.
    Inbound,
}

/// A bounded count.
#[derive(Debug)]
struct Gauge {
    n: AtomicUsize,
    max: usize,
}

impl Gauge {
    fn new(max: usize) -> Arc<Gauge> {
        Arc::new(Gauge {
            n: AtomicUsize::new(0),
            max,
        })
    }

    fn take(self: &Arc<Self>) -> Option<Held> {
        self.n
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| (n < self.max).then_some(n + 1))
            .ok()
            .map(|_| Held::Total(self.clone()))
    }

    fn give(&self) {
        self.n.fetch_sub(1, Ordering::AcqRel);
    }
}

/// A bounded count per key; a key whose count falls to zero is forgotten,
/// so the map holds only keys with something open.
#[derive(Debug)]
struct KeyedGauge<K> {
    counts: Mutex<HashMap<K, usize>>,
    max: usize,
}

impl<K: Hash + Eq + Copy> KeyedGauge<K> {
    fn new(max: usize) -> Arc<Self> {
        Arc::new(KeyedGauge {
            counts: Mutex::new(HashMap::new()),
            max,
        })
    }

    fn try_take(&self, key: K) -> bool {
        let mut counts = self.counts.lock().unwrap_or_else(|e| e.into_inner());
        let n = counts.entry(key).or_insert(0);
        if *n >= self.max {
            if *n == 0 {
                counts.remove(&key);
            }
            return false;
        }
        *n += 1;
        true
    }

    fn give(&self, key: K) {
        let mut counts = self.counts.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(n) = counts.get_mut(&key) {
            *n -= 1;
            if *n == 0 {
                counts.remove(&key);
            }
        }
    }

    #[cfg(test)]
    fn held(&self, key: K) -> usize {
        let counts = self.counts.lock().unwrap_or_else(|e| e.into_inner());
        counts.get(&key).copied().unwrap_or(0)
    }
}

/// One count held by a permit.
#[derive(Debug)]
enum Held {
    Total(Arc<Gauge>),
    Pod(Arc<KeyedGauge<(u64, Side)>>, (u64, Side)),
    Peer(Arc<KeyedGauge<IpAddr>>, IpAddr),
    SourcePod(Arc<KeyedGauge<u64>>, u64),
}

impl Drop for Held {
    fn drop(&mut self) {
        match self {
            Held::Total(g) => g.give(),
            Held::Pod(g, k) => g.give(*k),
            Held::Peer(g, k) => g.give(*k),
            Held::SourcePod(g, k) => g.give(*k),
        }
    }
}

/// A place under `per` for `key`, then one under `total`: both or neither
/// (`refusals` name the bound hit, per key first).
fn take_both<K: Hash + Eq + Copy>(
    per: &Arc<KeyedGauge<K>>,
    key: K,
    held: fn(Arc<KeyedGauge<K>>, K) -> Held,
    total: &Arc<Gauge>,
    refusals: [Refusal; 2],
) -> Result<Permit, Refusal> {
    if !per.try_take(key) {
        return Err(refusals[0]);
    }
    let per = held(per.clone(), key);
    let total = total.take().ok_or(refusals[1])?;
    Ok(Permit { _held: [per, total] })
}

/// Counts held for one connection; dropping it gives them back.
#[derive(Debug)]
#[must_use = "the counts are given back when the permit is dropped"]
pub(crate) struct Permit {
    _held: [Held; 2],
}

/// What an accepted connection on 15008 holds: its place as a tunnel
/// connection for as long as it lives, and its place as a handshake until
/// [`TunnelPermit::authenticated`].
#[derive(Debug)]
#[must_use = "the counts are given back when the permit is dropped"]
pub(crate) struct TunnelPermit {
    _tunnel: Permit,
    handshake: Option<Permit>,
}

impl TunnelPermit {
    /// The peer finished its TLS and HTTP/2 handshakes: it no longer counts
    /// as a handshake in progress.
    pub(crate) fn authenticated(&mut self) {
        self.handshake = None;
    }
}

/// The agent's bounds and their current counts.
#[derive(Debug)]
pub(crate) struct Limits {
    config: LimitConfig,
    connections: Arc<Gauge>,
    connections_per_pod: Arc<KeyedGauge<(u64, Side)>>,
    tunnels_in: Arc<Gauge>,
    tunnels_out: Arc<Gauge>,
    tunnels_per_peer: Arc<KeyedGauge<IpAddr>>,
    tunnels_per_pod: Arc<KeyedGauge<u64>>,
    handshakes: Arc<Gauge>,
    handshakes_per_peer: Arc<KeyedGauge<IpAddr>>,
    warner: RateLimitedWarner,
}

impl Limits {
    /// Bounds with nothing held yet.
    pub(crate) fn new(config: LimitConfig) -> Arc<Limits> {
        Arc::new(Limits {
            config,
            connections: Gauge::new(config.connections),
            connections_per_pod: KeyedGauge::new(config.connections_per_pod),
            tunnels_in: Gauge::new(config.tunnels_in),
            tunnels_out: Gauge::new(config.tunnels_out),
            tunnels_per_peer: KeyedGauge::new(config.tunnels_per_peer),
            tunnels_per_pod: KeyedGauge::new(config.tunnels_per_pod),
            handshakes: Gauge::new(config.handshakes),
            handshakes_per_peer: KeyedGauge::new(config.handshakes_per_peer),
            warner: RateLimitedWarner::new(WARN_INTERVAL),
        })
    }

    /// The configured bounds.
    pub(crate) fn config(&self) -> LimitConfig {
        self.config
    }

    /// A place for one proxied connection of the pod with network-namespace
    /// cookie `pod` on `side`.
    pub(crate) fn connection(&self, pod: u64, side: Side) -> Result<Permit, Refusal> {
        let refusals = [Refusal::ConnectionsPerPod, Refusal::Connections];
        take_both(
            &self.connections_per_pod,
            (pod, side),
            Held::Pod,
            &self.connections,
            refusals,
        )
    }

    /// A place for one inbound connection on 15008 from `peer` (a known
    /// pod's address when `known_pod`), before any byte of it is read.
    pub(crate) fn tunnel_in(&self, peer: IpAddr, known_pod: bool) -> Result<TunnelPermit, Refusal> {
        let peer = peer_key(peer, known_pod);
        // Handshakes first: the bound a silent client runs into.
        let refusals = [Refusal::HandshakesPerPeer, Refusal::Handshakes];
        let handshake = take_both(&self.handshakes_per_peer, peer, Held::Peer, &self.handshakes, refusals)?;
        let refusals = [Refusal::TunnelsPerPeer, Refusal::InboundTunnels];
        let tunnel = take_both(&self.tunnels_per_peer, peer, Held::Peer, &self.tunnels_in, refusals)?;
        Ok(TunnelPermit {
            _tunnel: tunnel,
            handshake: Some(handshake),
        })
    }

    /// A place for one outbound tunnel connection of the pod with
    /// network-namespace cookie `pod`.
    pub(crate) fn tunnel_out(&self, pod: u64) -> Result<Permit, Refusal> {
        let refusals = [Refusal::TunnelsPerPod, Refusal::OutboundTunnels];
        take_both(&self.tunnels_per_pod, pod, Held::SourcePod, &self.tunnels_out, refusals)
    }

    /// Proxied connections the pod holds on `side` now.
    #[cfg(test)]
    pub(crate) fn pod_connections(&self, pod: u64, side: Side) -> usize {
        self.connections_per_pod.held((pod, side))
    }

    /// Records a refusal and warns about it, at most once per reason per
    /// [`WARN_INTERVAL`], with the number refused since the last warning.
    /// The warning names the pod and peer of the refusal that triggered it.
    pub(crate) fn refused(&self, refusal: Refusal, direction: Direction, pod: &str, peer: Option<IpAddr>) {
        if let Some(count) = self.warner.refused(refusal, Instant::now()) {
            tracing::warn!(
                reason = refusal.as_str(),
                direction = direction.as_str(),
                pod,
                peer = peer.map(|p| p.to_canonical().to_string()),
                refused = count,
                "refusing connections: {refusal} (count since the last warning)"
            );
        }
    }
}

/// Turns a stream of refusals into at most one warning per reason per
/// interval, each carrying how many were refused since the previous one.
#[derive(Debug)]
pub(crate) struct RateLimitedWarner {
    interval: Duration,
    state: [Mutex<WarnState>; REASONS],
}

#[derive(Debug, Default)]
struct WarnState {
    last: Option<Instant>,
    since: u64,
}

impl RateLimitedWarner {
    /// A warner that speaks at most once per `interval` per reason.
    pub(crate) fn new(interval: Duration) -> Self {
        RateLimitedWarner {
            interval,
            state: Default::default(),
        }
    }

    /// Counts one refusal at `now`; `Some(n)` when a warning is due, `n`
    /// being the refusals since the last warning, this one included.
    pub(crate) fn refused(&self, reason: Refusal, now: Instant) -> Option<u64> {
        let mut s = self.state[reason as usize].lock().unwrap_or_else(|e| e.into_inner());
        s.since += 1;
        let due = s
            .last
            .is_none_or(|last| now.saturating_duration_since(last) >= self.interval);
        if !due {
            return None;
        }
        s.last = Some(now);
        Some(std::mem::take(&mut s.since))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn small() -> LimitConfig {
        LimitConfig {
            connections: 3,
            connections_per_pod: 2,
            tunnels_in: 3,
            tunnels_out: 3,
            tunnels_per_peer: 2,
            tunnels_per_pod: 2,
            handshakes: 2,
            handshakes_per_peer: 1,
        }
    }

    #[test]
    fn warnings_come_at_most_once_per_interval_per_reason_with_the_count() {
        let w = RateLimitedWarner::new(Duration::from_secs(5));
        let t0 = Instant::now();
        assert_eq!(w.refused(Refusal::Connections, t0), Some(1), "the first refusal warns");
        for i in 1..100 {
            assert_eq!(
                w.refused(Refusal::Connections, t0 + Duration::from_millis(i * 10)),
                None
            );
        }
        assert_eq!(
            w.refused(Refusal::Handshakes, t0 + Duration::from_secs(1)),
            Some(1),
            "another reason has its own interval"
        );
        assert_eq!(
            w.refused(Refusal::Connections, t0 + Duration::from_secs(5)),
            Some(100),
            "the next warning counts every refusal since the last one"
        );
        assert_eq!(w.refused(Refusal::Connections, t0 + Duration::from_secs(6)), None);
    }

    #[test]
    fn a_pod_is_bounded_per_side_and_the_node_in_total() {
        let l = Limits::new(small());
        let a1 = l.connection(1, Side::Outbound).unwrap();
        let _a2 = l.connection(1, Side::Outbound).unwrap();
        assert_eq!(l.connection(1, Side::Outbound).unwrap_err(), Refusal::ConnectionsPerPod);
        // Inbound has its own per-pod bound, but the node's total is shared.
        let _b1 = l.connection(1, Side::Inbound).unwrap();
        assert_eq!(l.connection(2, Side::Outbound).unwrap_err(), Refusal::Connections);
        assert_eq!(l.pod_connections(2, Side::Outbound), 0, "a refused take holds nothing");
        drop(a1);
        let _c = l.connection(2, Side::Outbound).unwrap();
        assert_eq!(l.pod_connections(1, Side::Outbound), 1);
    }

    #[test]
    fn handshakes_are_bounded_per_peer_and_released_once_authenticated() {
        let l = Limits::new(small());
        let (p, q, r): (IpAddr, IpAddr, IpAddr) = (
            "10.0.0.1".parse().unwrap(),
            "10.0.0.2".parse().unwrap(),
            "::ffff:10.0.0.3".parse().unwrap(),
        );
        let mut t1 = l.tunnel_in(p, false).unwrap();
        assert_eq!(l.tunnel_in(p, false).unwrap_err(), Refusal::HandshakesPerPeer);
        let _t2 = l.tunnel_in(q, false).unwrap();
        assert_eq!(l.tunnel_in(r, false).unwrap_err(), Refusal::Handshakes);
        t1.authenticated();
        // p's handshake place is free again; its tunnel place is not.
        let _t3 = l.tunnel_in(p, false).unwrap();
        assert_eq!(l.tunnel_in(p, false).unwrap_err(), Refusal::HandshakesPerPeer);
    }

    #[test]
    fn inbound_tunnels_at_their_bound_leave_outbound_ones_their_own() {
        let l = Limits::new(LimitConfig {
            tunnels_per_peer: 10,
            ..small()
        });
        let peer: IpAddr = "10.0.0.1".parse().unwrap();
        let held: Vec<_> = (0..3)
            .map(|_| {
                let mut t = l.tunnel_in(peer, false).unwrap();
                t.authenticated();
                t
            })
            .collect();
        assert_eq!(l.tunnel_in(peer, false).unwrap_err(), Refusal::InboundTunnels);
        let out: Vec<_> = (1..=3).map(|pod| l.tunnel_out(pod).unwrap()).collect();
        assert_eq!(l.tunnel_out(4).unwrap_err(), Refusal::OutboundTunnels);
        assert_eq!(l.tunnel_in(peer, false).unwrap_err(), Refusal::InboundTunnels);
        drop((held, out));
    }

    #[test]
    fn an_ipv6_peer_is_its_64_and_an_ipv4_mapped_one_its_ipv4_address() {
        let k = |s: &str| peer_key(s.parse().unwrap(), false);
        assert_eq!(k("fd00:1:2:3:4:5:6:7"), k("fd00:1:2:3:ffff::1"));
        assert_eq!(k("fd00:1:2:3:4:5:6:7"), "fd00:1:2:3::".parse::<IpAddr>().unwrap());
        assert_ne!(k("fd00:1:2:3::1"), k("fd00:1:2:4::1"));
        assert_eq!(k("::ffff:10.0.0.3"), "10.0.0.3".parse::<IpAddr>().unwrap());
        assert_ne!(k("10.0.0.3"), k("10.0.0.4"));
        // Two addresses of one /64 share the per-peer bound.
        let l = Limits::new(small());
        let _a = l.tunnel_in("fd00::1".parse().unwrap(), false).unwrap();
        assert_eq!(
            l.tunnel_in("fd00::2".parse().unwrap(), false).unwrap_err(),
            Refusal::HandshakesPerPeer
        );
        let _b = l.tunnel_in("fd00:0:0:1::1".parse().unwrap(), false).unwrap();
    }

    #[test]
    fn a_tunnel_queues_about_one_connection_window_to_send() {
        // Defaults: 16 MiB over 100 streams.
        assert_eq!(send_buffer_per_stream(4 << 20, 16 << 20, 100), (16 << 20) / 100);
        assert_eq!(
            send_buffer_per_stream(4 << 20, 16 << 20, 1),
            4 << 20,
            "never above the stream window"
        );
        assert_eq!(
            send_buffer_per_stream(4 << 20, 65535, 1000),
            64 << 10,
            "at least two relay chunks"
        );
    }

    #[test]
    fn outbound_tunnels_are_bounded_per_source_pod() {
        let l = Limits::new(LimitConfig {
            tunnels_out: 10,
            ..small()
        });
        let _a = l.tunnel_out(1).unwrap();
        let _b = l.tunnel_out(1).unwrap();
        assert_eq!(l.tunnel_out(1).unwrap_err(), Refusal::TunnelsPerPod);
        let _c = l.tunnel_out(2).unwrap();
    }
}
