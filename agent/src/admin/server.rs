//! A deliberately small HTTP/1.1 server for the three listeners: one
//! request per connection, a request head of at most 8 KiB read within
//! [`READ_DEADLINE`], the answer written within [`WRITE_DEADLINE`],
//! `connection: close`. Operators' tools and Prometheus need nothing more,
//! and it keeps hyper out of the agent until something needs it.
//!
//! Readiness and metrics listen on the node's addresses, which every pod
//! can reach. So that no pod can hold the connections the kubelet's probe
//! needs, each listener keeps [`NODE_RESERVED`] places that only the node
//! itself can take ([`node_local`]: the kubelet probes from the node), and
//! shares [`SHARED`] others out at most [`PER_SOURCE`] to one source
//! (an IPv4 address or IPv6 /64); past its bound a connection is closed at
//! once.

#![forbid(unsafe_code)]

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;

use super::AdminState;

const MAX_HEAD: usize = 8 * 1024;
/// Every client sends its request head at once; a slow one only holds a place.
const READ_DEADLINE: Duration = Duration::from_secs(2);
/// For a client that reads the answer (a scrape: hundreds of KiB) slowly.
const WRITE_DEADLINE: Duration = Duration::from_secs(5);
/// Places only node-local clients take.
const NODE_RESERVED: usize = 16;
/// Places any client may take, node-local ones once theirs are taken.
const SHARED: usize = 32;
/// Shared places one source may hold.
const PER_SOURCE: usize = 4;

/// Whether a connection from `peer` to `local` comes from the node itself:
/// a loopback address, the address it was made to (a connection to one of
/// the node's own addresses comes from that address unless bound
/// otherwise: the kubelet's probe), or the probe source. A pod cannot
/// have one of these as source and complete a handshake: the node answers
/// such an address itself.
fn node_local(peer: IpAddr, local: IpAddr) -> bool {
    let (peer, local) = (peer.to_canonical(), local.to_canonical());
    peer.is_loopback()
        || peer == local
        || peer == IpAddr::V4(crate::capture::probe::PROBE_V4)
        || peer == IpAddr::V6(crate::capture::probe::PROBE_V6)
}

/// The places of one listener.
struct Places {
    node: Arc<Semaphore>,
    shared: Arc<Semaphore>,
    per_source: Mutex<HashMap<IpAddr, usize>>,
}

/// One connection's place; given back when dropped.
enum Place {
    Node(#[allow(dead_code)] OwnedSemaphorePermit),
    Shared(#[allow(dead_code)] OwnedSemaphorePermit, Arc<Places>, IpAddr),
}

impl Drop for Place {
    fn drop(&mut self) {
        if let Place::Shared(_, places, source) = self {
            let mut counts = places.per_source.lock().unwrap_or_else(|e| e.into_inner());
            if let Some(n) = counts.get_mut(source) {
                *n -= 1;
                if *n == 0 {
                    counts.remove(source);
                }
            }
        }
    }
}

impl Places {
    fn new() -> Arc<Self> {
        Arc::new(Places {
            node: Arc::new(Semaphore::new(NODE_RESERVED)),
            shared: Arc::new(Semaphore::new(SHARED)),
            per_source: Mutex::new(HashMap::new()),
        })
    }

    /// A place for a connection from `peer` (a known pod's address when
    /// `known_pod`) to `local`, if one is free.
    fn take(self: &Arc<Self>, peer: IpAddr, local: IpAddr, known_pod: bool) -> Option<Place> {
        if node_local(peer, local)
            && let Ok(p) = self.node.clone().try_acquire_owned()
        {
            return Some(Place::Node(p));
        }
        let source = crate::proxy::limits::peer_key(peer, known_pod);
        let mut counts = self.per_source.lock().unwrap_or_else(|e| e.into_inner());
        let n = counts.get(&source).copied().unwrap_or(0);
        if n >= PER_SOURCE {
            return None;
        }
        let permit = self.shared.clone().try_acquire_owned().ok()?;
        counts.insert(source, n + 1);
        Some(Place::Shared(permit, self.clone(), source))
    }
}

/// A parsed request line.
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct Request<'a> {
    /// `GET`, `POST`, ...
    pub(crate) method: &'a str,
    /// The path, without the query.
    pub(crate) path: &'a str,
    /// The query, without `?`.
    pub(crate) query: Option<&'a str>,
}

impl<'a> Request<'a> {
    /// The request line of `head`, if it has one.
    pub(crate) fn parse(head: &'a str) -> Option<Self> {
        let mut words = head.lines().next()?.split_whitespace();
        let method = words.next()?;
        let target = words.next()?;
        let (path, query) = match target.split_once('?') {
            Some((p, q)) => (p, Some(q)),
            None => (target, None),
        };
        Some(Request { method, path, query })
    }

    /// The value of `name` in the query (no percent-decoding: the values
    /// the endpoints take need none).
    pub(crate) fn param(&self, name: &str) -> Option<&'a str> {
        self.query?
            .split('&')
            .filter_map(|kv| kv.split_once('='))
            .find(|(k, _)| *k == name)
            .map(|(_, v)| v)
    }
}

/// A response.
#[derive(Debug)]
pub(crate) struct Response {
    /// Status line text, e.g. `200 OK`.
    pub(crate) status: &'static str,
    /// Content type.
    pub(crate) content_type: &'static str,
    /// Body.
    pub(crate) body: String,
}

impl Response {
    /// 200 with a plain-text body.
    pub(crate) fn text(body: impl Into<String>) -> Self {
        Response::with("200 OK", "text/plain; charset=utf-8", body)
    }

    /// 200 with a JSON body.
    pub(crate) fn json(value: &serde_json::Value) -> Self {
        let mut body = serde_json::to_string_pretty(value).unwrap_or_default();
        body.push('\n');
        Response::with("200 OK", "application/json", body)
    }

    /// Any status with a plain-text body.
    pub(crate) fn with(status: &'static str, content_type: &'static str, body: impl Into<String>) -> Self {
        Response {
            status,
            content_type,
            body: body.into(),
        }
    }

    /// 404.
    pub(crate) fn not_found() -> Self {
        Response::with("404 Not Found", "text/plain; charset=utf-8", "not found\n")
    }

    /// 405.
    pub(crate) fn method_not_allowed() -> Self {
        Response::with(
            "405 Method Not Allowed",
            "text/plain; charset=utf-8",
            "method not allowed\n",
        )
    }
}

/// What a listener answers, from the state `S` it serves (the agent's
/// [`AdminState`], or the CA service's own).
pub(crate) type Route<S = AdminState> = fn(&S, &Request<'_>) -> Response;

/// Serves `route` on `listener` until `stop` fires.
/// `known_pod` says whether a source address is a known pod's (each then
/// has its own bound; unknown IPv6 sources share one per /64).
pub(crate) async fn serve<S: Send + Sync + 'static>(
    listener: TcpListener,
    state: Arc<S>,
    route: Route<S>,
    known_pod: fn(&S, IpAddr) -> bool,
    stop: CancellationToken,
) {
    let places = Places::new();
    loop {
        let (mut s, peer) = tokio::select! {
            _ = stop.cancelled() => return,
            a = listener.accept() => match a { Ok(a) => a, Err(_) => continue },
        };
        let Ok(local) = s.local_addr() else { continue };
        // Over the bound, a new connection is closed at once.
        let Some(slot) = places.take(peer.ip(), local.ip(), known_pod(&state, peer.ip())) else {
            continue;
        };
        let state = state.clone();
        tokio::spawn(async move {
            let _slot = slot;
            let mut buf = vec![0u8; MAX_HEAD];
            let mut n = 0;
            let read = tokio::time::timeout(READ_DEADLINE, async {
                while n < buf.len() {
                    let k = s.read(&mut buf[n..]).await?;
                    if k == 0 {
                        break;
                    }
                    n += k;
                    if buf[..n].windows(4).any(|w| w == b"\r\n\r\n") {
                        break;
                    }
                }
                Ok::<_, std::io::Error>(())
            })
            .await;
            if !matches!(read, Ok(Ok(()))) {
                return;
            }
            let head = String::from_utf8_lossy(&buf[..n]);
            let resp = match Request::parse(&head) {
                Some(req) => route(&state, &req),
                None => Response::with("400 Bad Request", "text/plain; charset=utf-8", "bad request\n"),
            };
            let out = format!(
                "HTTP/1.1 {}\r\ncontent-type: {}\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{}",
                resp.status,
                resp.content_type,
                resp.body.len(),
                resp.body
            );
            let _ = tokio::time::timeout(WRITE_DEADLINE, async {
                s.write_all(out.as_bytes()).await?;
                s.shutdown().await
            })
            .await;
        });
    }
}

/// The three listeners, bound by the agent before anything starts.
#[derive(Debug)]
pub(crate) struct Listeners {
    /// `--readiness-addr`.
    pub(crate) readiness: std::net::TcpListener,
    /// `--metrics-addr`.
    pub(crate) metrics: std::net::TcpListener,
    /// `--admin-addr`.
    pub(crate) admin: std::net::TcpListener,
}

/// Serves the three listeners on a thread and runtime of their own until
/// `stop` fires, so scrapes and dumps never run on the proxies' threads.
pub(crate) fn spawn(
    listeners: Listeners,
    state: Arc<AdminState>,
    stop: CancellationToken,
) -> std::io::Result<std::thread::JoinHandle<()>> {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    std::thread::Builder::new()
        .name("nodeward-admin".into())
        .spawn(move || {
            rt.block_on(async move {
                let mut tasks = Vec::new();
                for (listener, route) in [
                    (listeners.readiness, readiness as Route),
                    (listeners.metrics, metrics as Route),
                    (listeners.admin, admin as Route),
                ] {
                    match TcpListener::from_std(listener) {
                        Ok(l) => tasks.push(tokio::spawn(serve(
                            l,
                            state.clone(),
                            route,
                            |s: &AdminState, ip| s.store.current().claims_ip(ip),
                            stop.clone(),
                        ))),
                        Err(e) => tracing::error!("admin listener: {e}"),
                    }
                }
                for t in tasks {
                    let _ = t.await;
                }
            })
        })
}

/// `:15021`.
pub(crate) fn readiness(state: &AdminState, req: &Request<'_>) -> Response {
    match req.path {
        "/healthz/ready" => {
            let problems = state.readiness.problems();
            if problems.is_empty() {
                Response::text("ready\n")
            } else {
                Response::with(
                    "503 Service Unavailable",
                    "text/plain; charset=utf-8",
                    format!("not ready:\n{}\n", problems.join("\n")),
                )
            }
        }
        _ => Response::not_found(),
    }
}

/// `:15020`.
pub(crate) fn metrics(state: &AdminState, req: &Request<'_>) -> Response {
    match req.path {
        "/metrics" | "/stats/prometheus" => Response::with(
            "200 OK",
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
            state.render_metrics(),
        ),
        _ => Response::not_found(),
    }
}

/// `127.0.0.1:15000`.
pub(crate) fn admin(state: &AdminState, req: &Request<'_>) -> Response {
    match req.path {
        "/config_dump" => Response::json(&super::config_dump::dump(state)),
        "/certs" => Response::json(&super::certs::dump(state)),
        "/logging" => logging(req),
        _ => Response::not_found(),
    }
}

/// `GET /logging` shows the filter; `POST /logging?level=SPEC` sets it.
fn logging(req: &Request<'_>) -> Response {
    match (req.method, req.param("level")) {
        ("GET", None) => Response::text(format!(
            "level: {}\n",
            crate::logging::current_level().unwrap_or_default()
        )),
        ("POST", Some(spec)) => match crate::logging::set_level(spec) {
            Ok(()) => {
                tracing::info!(level = spec, "log level changed");
                Response::text(format!("level: {spec}\n"))
            }
            Err(e) => Response::with("400 Bad Request", "text/plain; charset=utf-8", format!("{e}\n")),
        },
        ("POST", None) => Response::with(
            "400 Bad Request",
            "text/plain; charset=utf-8",
            "POST /logging?level=SPEC (e.g. debug, nodeward=debug)\n",
        ),
        _ => Response::method_not_allowed(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_lines_and_query_parameters() {
        let r = Request::parse("POST /logging?level=nodeward=debug&x=1 HTTP/1.1\r\nhost: x\r\n\r\n").unwrap();
        assert_eq!((r.method, r.path), ("POST", "/logging"));
        assert_eq!(r.param("level"), Some("nodeward=debug"));
        assert_eq!(r.param("y"), None);
        assert_eq!(Request::parse(""), None);
    }

    #[test]
    fn the_node_keeps_its_places_however_many_a_pod_holds() {
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        let (node, pod) = (ip("10.0.0.1"), ip("10.1.0.7"));
        let places = Places::new();
        let from_pod: Vec<Place> = (0..200).filter_map(|_| places.take(pod, node, false)).collect();
        assert_eq!(from_pod.len(), PER_SOURCE, "one source holds a few places");
        // Addresses of one /64 are one source.
        let v6: Vec<Place> = (1..50)
            .filter_map(|i| places.take(ip(&format!("fd00::{i:x}")), ip("fd00:1::1"), false))
            .collect();
        assert_eq!(v6.len(), PER_SOURCE);
        // Many sources take the shared places, never the node's.
        let many: Vec<Place> = (0..255)
            .filter_map(|i| places.take(ip(&format!("10.2.0.{i}")), node, false))
            .collect();
        assert_eq!(many.len(), SHARED - 2 * PER_SOURCE);
        for (peer, local) in [
            ("10.0.0.1", "10.0.0.1"),
            ("127.0.0.1", "127.0.0.1"),
            ("::1", "::1"),
            ("169.254.7.127", "10.0.0.1"),
            ("::ffff:10.0.0.1", "10.0.0.1"),
        ] {
            assert!(node_local(ip(peer), ip(local)), "{peer} to {local}");
        }
        let held: Vec<Place> = (0..NODE_RESERVED)
            .filter_map(|_| places.take(node, node, false))
            .collect();
        assert_eq!(held.len(), NODE_RESERVED, "the node's reserve is whole");
        assert!(places.take(pod, node, false).is_none());
        drop(from_pod);
        assert!(places.take(pod, node, false).is_some(), "a source's places come back");
    }
}
