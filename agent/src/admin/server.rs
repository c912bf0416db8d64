//! A deliberately small HTTP/1.1 server for the three listeners: one
//! request per connection, a request head of at most 8 KiB read within 5 s,
//! at most 32 connections at once per listener, `connection: close`.
//! Operators' tools and Prometheus need nothing more, and it keeps hyper
//! out of the agent until something needs it.

#![forbid(unsafe_code)]

use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;

use super::AdminState;

const MAX_HEAD: usize = 8 * 1024;
const READ_DEADLINE: Duration = Duration::from_secs(5);
const MAX_CONCURRENT: usize = 32;

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
pub(crate) async fn serve<S: Send + Sync + 'static>(
    listener: TcpListener,
    state: Arc<S>,
    route: Route<S>,
    stop: CancellationToken,
) {
    let slots = Arc::new(Semaphore::new(MAX_CONCURRENT));
    loop {
        let (mut s, _) = tokio::select! {
            _ = stop.cancelled() => return,
            a = listener.accept() => match a { Ok(a) => a, Err(_) => continue },
        };
        // Over the bound, a new connection is closed at once.
        let Ok(slot) = slots.clone().try_acquire_owned() else {
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
            let _ = s.write_all(out.as_bytes()).await;
            let _ = s.shutdown().await;
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
                        Ok(l) => tasks.push(tokio::spawn(serve(l, state.clone(), route, stop.clone()))),
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
}
