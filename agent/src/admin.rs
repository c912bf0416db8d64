//! The admin endpoint, on the node only (never inside a pod, so apps cannot
//! reach it): `/healthz/ready` answers 200 when the agent is fully working
//! and 503 with the list of problems otherwise; `/stats` shows counters.
//!
//! A deliberately tiny HTTP/1.1 responder: one request per connection,
//! request head bounded to 8 KiB and 5 s.

#![forbid(unsafe_code)]

use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

/// What the admin endpoint reports.
pub trait Health: Send + Sync {
    /// Current problems; empty when healthy.
    fn problems(&self) -> Vec<String>;
    /// Counters in Prometheus text format.
    fn stats(&self) -> String;
}

const MAX_HEAD: usize = 8 * 1024;

/// Serves until `stop` fires.
pub async fn serve(listener: TcpListener, health: Arc<dyn Health>, stop: CancellationToken) {
    loop {
        let (mut s, _) = tokio::select! {
            _ = stop.cancelled() => return,
            a = listener.accept() => match a { Ok(a) => a, Err(_) => continue },
        };
        let health = health.clone();
        tokio::spawn(async move {
            let mut buf = vec![0u8; MAX_HEAD];
            let mut n = 0;
            let read = tokio::time::timeout(Duration::from_secs(5), async {
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
            let path = head.split_whitespace().nth(1).unwrap_or("");
            let (status, body) = match path {
                "/healthz/ready" => {
                    let problems = health.problems();
                    if problems.is_empty() {
                        ("200 OK", "ready\n".to_string())
                    } else {
                        (
                            "503 Service Unavailable",
                            format!("not ready:\n{}\n", problems.join("\n")),
                        )
                    }
                }
                "/stats" => ("200 OK", health.stats()),
                _ => ("404 Not Found", "not found\n".to_string()),
            };
            let resp = format!(
                "HTTP/1.1 {status}\r\ncontent-type: text/plain\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                body.len()
            );
            let _ = s.write_all(resp.as_bytes()).await;
            let _ = s.shutdown().await;
        });
    }
}
