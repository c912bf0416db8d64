//! The agent's HTTP endpoints as tests read them: readiness on 15021,
//! metrics on 15020, the admin API on 127.0.0.1:15000 of a node.

use std::io::{Read, Write};
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use crate::traffic;

/// Readiness, on the node's loopback (it listens on every address).
pub const READINESS: &str = "127.0.0.1:15021";
/// Metrics.
pub const METRICS: &str = "127.0.0.1:15020";
/// The admin API (loopback only).
pub const ADMIN: &str = "127.0.0.1:15000";

/// One HTTP/1.1 request from inside `netns`: the status code and body.
pub fn http(netns: &str, addr: &str, method: &str, path: &str) -> std::io::Result<(u16, String)> {
    let addr: SocketAddr = addr.parse().map_err(std::io::Error::other)?;
    let mut s = traffic::connect_timeout(netns, addr, Duration::from_secs(3))?;
    write!(s, "{method} {path} HTTP/1.1\r\nhost: nodeward\r\n\r\n")?;
    let mut out = String::new();
    s.read_to_string(&mut out)?;
    let status = out
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| std::io::Error::other(format!("not an HTTP response: {out:?}")))?;
    let body = out
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    Ok((status, body))
}

/// `GET /metrics` of the node whose namespace is `netns`.
pub fn metrics(netns: &str) -> String {
    match http(netns, METRICS, "GET", "/metrics") {
        Ok((200, body)) => body,
        other => panic!("GET /metrics: {other:?}"),
    }
}

/// The value of the sample whose name and labels are exactly `series`
/// (`name{a="x",...}`), if the node exports it.
pub fn sample(metrics: &str, series: &str) -> Option<f64> {
    metrics
        .lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.trim().parse().ok())
}

/// Polls `/metrics` until `series` reads `want` (a counter that gets there
/// within `timeout`), then returns the whole scrape.
pub fn wait_sample(netns: &str, series: &str, want: f64, timeout: Duration) -> String {
    let deadline = Instant::now() + timeout;
    loop {
        let m = metrics(netns);
        if sample(&m, series) == Some(want) || Instant::now() > deadline {
            return m;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// `GET /config_dump` as JSON.
pub fn config_dump(netns: &str) -> serde_json::Value {
    match http(netns, ADMIN, "GET", "/config_dump") {
        Ok((200, body)) => serde_json::from_str(&body).expect("config_dump is JSON"),
        other => panic!("GET /config_dump: {other:?}"),
    }
}

/// Polls `/healthz/ready` until `pred(status, body)` holds or `timeout`
/// passes; returns the last answer.
pub fn wait_ready(netns: &str, timeout: Duration, pred: impl Fn(u16, &str) -> bool) -> (u16, String) {
    let deadline = Instant::now() + timeout;
    loop {
        let r = http(netns, READINESS, "GET", "/healthz/ready").unwrap_or((0, String::new()));
        if pred(r.0, &r.1) || Instant::now() > deadline {
            return r;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}
