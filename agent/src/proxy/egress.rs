//! Egress: what a pod's connection to a destination outside the mesh may
//! carry. Under `tls-only` (`nodeward.io/egress` on the pod or its
//! namespace, else `--egress-default`) it passes only if the app's first
//! bytes are a TLS ClientHello, peeked and left in the socket so the app's
//! own TLS goes end to end, or if the destination is allow-listed;
//! otherwise it is refused, warned about per pod (rate-limited) and counted
//! as `egress_plaintext`.

#![forbid(unsafe_code)]

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use tokio::net::TcpStream;

use super::PodContext;
use super::limits::WARN_INTERVAL;
use crate::state::Destination;
use crate::state::workload::{EgressAllow, EgressMode, egress};

/// How long an app under `tls-only` has to send its first bytes; a
/// server-first protocol (SMTP, MySQL) never does and is refused after it.
pub(crate) const FIRST_BYTES_WAIT: Duration = Duration::from_secs(5);

/// The bytes that identify a ClientHello: the record header and the
/// handshake type.
const HELLO_PREFIX: usize = 6;

/// The mesh-wide egress settings (`--egress-default`, `--egress-allow`).
#[derive(Clone, Debug, Default)]
pub(crate) struct EgressConfig {
    /// The mode of pods whose annotations do not say.
    pub(crate) default: EgressMode,
    /// Destinations every pod may reach in plaintext.
    pub(crate) allow: Vec<EgressAllow>,
}

/// Why a connection leaving the mesh was refused.
#[derive(Debug, thiserror::Error)]
pub(crate) enum EgressError {
    /// The app's first bytes are not a TLS ClientHello.
    #[error("first bytes are not a TLS ClientHello")]
    Plaintext,
    /// The app sent nothing within [`FIRST_BYTES_WAIT`].
    #[error("no bytes from the app within {0:?} (a server-first protocol needs an allow-list entry)")]
    Silent(Duration),
    /// The app closed before sending a whole record header.
    #[error("the app closed before sending a ClientHello")]
    Closed,
    /// Reading the app's socket failed.
    #[error("reading the app's first bytes: {0}")]
    Io(#[from] std::io::Error),
}

/// Whether the connection of `ctx`'s pod to `dst` may go on. Returns at
/// once for destinations in the mesh, `passthrough` pods and allow-listed
/// destinations; otherwise waits for the app's first bytes. A refusal is
/// warned about here (the caller resets and counts it).
pub(crate) async fn check(ctx: &PodContext, down: &TcpStream, dst: SocketAddr) -> Result<(), EgressError> {
    let snap = ctx.mesh.store.current();
    if !matches!(snap.destination(dst.ip()), Destination::Outside) {
        return Ok(());
    }
    let default = ctx.config.egress.default;
    let setting = match snap.pods.get(&ctx.pod.key) {
        Some(pod) => egress(pod, snap.namespaces.get(&pod.namespace), default),
        None => crate::state::workload::Egress {
            mode: default,
            allow: Vec::new(),
        },
    };
    if setting.mode == EgressMode::Passthrough
        || setting
            .allow
            .iter()
            .chain(&ctx.config.egress.allow)
            .any(|a| a.matches(dst))
    {
        return Ok(());
    }
    let result = first_bytes_are_client_hello(down, FIRST_BYTES_WAIT).await;
    if let Err(e) = &result {
        warn(&ctx.pod.key, dst, e);
    }
    result
}

/// Peeks at the app's first bytes (never consuming them) until they are
/// known to be or not to be the start of a ClientHello, for at most `wait`.
async fn first_bytes_are_client_hello(down: &TcpStream, wait: Duration) -> Result<(), EgressError> {
    let deadline = tokio::time::Instant::now() + wait;
    let mut buf = [0u8; HELLO_PREFIX];
    loop {
        let n = match tokio::time::timeout_at(deadline, down.peek(&mut buf)).await {
            Err(_) => return Err(EgressError::Silent(wait)),
            Ok(r) => r?,
        };
        if n == 0 {
            return Err(EgressError::Closed);
        }
        if !could_be_client_hello(&buf[..n]) {
            return Err(EgressError::Plaintext);
        }
        if n >= HELLO_PREFIX {
            return Ok(());
        }
        // A partial header: peek returns the same bytes at once until more
        // arrive, so wait a little before looking again.
        if tokio::time::Instant::now() >= deadline {
            return Err(EgressError::Silent(wait));
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// Whether `bytes` agree with the start of a TLS record carrying a
/// ClientHello: content type handshake (0x16), record version 3.1 to 3.3
/// (what TLS 1.0 to 1.3 clients send), handshake type ClientHello (0x01).
pub(crate) fn could_be_client_hello(bytes: &[u8]) -> bool {
    bytes.iter().enumerate().all(|(i, &b)| match i {
        0 => b == 0x16,
        1 => b == 0x03,
        2 => (0x01..=0x03).contains(&b),
        5 => b == 0x01,
        _ => true,
    })
}

/// Last warning per pod and refusals since, so a pod retrying in a loop
/// costs one line per [`WARN_INTERVAL`].
static WARNED: Mutex<Option<HashMap<String, (Instant, u64)>>> = Mutex::new(None);

/// Pods remembered in [`WARNED`] at most; past that it starts over.
const WARNED_MAX: usize = 4096;

fn warn(pod: &str, dst: SocketAddr, e: &EgressError) {
    let now = Instant::now();
    let count = {
        let mut warned = WARNED.lock().unwrap_or_else(|e| e.into_inner());
        let map = warned.get_or_insert_with(HashMap::new);
        if map.len() >= WARNED_MAX && !map.contains_key(pod) {
            map.clear();
        }
        let entry = map.entry(pod.to_string()).or_insert((now - WARN_INTERVAL, 0));
        entry.1 += 1;
        if now.duration_since(entry.0) < WARN_INTERVAL {
            return;
        }
        let count = entry.1;
        *entry = (now, 0);
        count
    };
    tracing::warn!(pod, dst = %dst, count, "refusing egress outside the mesh under tls-only: {e}");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_client_hello_is_recognised_from_its_first_bytes() {
        // TLS 1.2/1.3 ClientHello record header and handshake type.
        assert!(could_be_client_hello(&[0x16, 0x03, 0x01, 0x02, 0x00, 0x01]));
        assert!(could_be_client_hello(&[0x16, 0x03, 0x03, 0x00, 0x40, 0x01]));
        // A prefix is not refused before more bytes come.
        assert!(could_be_client_hello(&[0x16, 0x03]));
        for plaintext in [
            &b"GET / HTTP/1.1\r\n"[..],
            &b"EHLO x"[..],
            &[0x16, 0x03, 0x04, 0x00, 0x10, 0x01][..],
            &[0x16, 0x03, 0x01, 0x00, 0x10, 0x02][..],
            &[0x17, 0x03, 0x03, 0x00, 0x10, 0x01][..],
        ] {
            assert!(!could_be_client_hello(plaintext), "{plaintext:?}");
        }
    }

    #[test]
    fn allow_list_entries_match_networks_and_ports() {
        let a: EgressAllow = "10.1.0.0/16".parse().unwrap();
        assert!(a.matches("10.1.2.3:80".parse().unwrap()));
        assert!(a.matches("[::ffff:10.1.2.3]:80".parse().unwrap()));
        assert!(!a.matches("10.2.0.1:80".parse().unwrap()));
        let a: EgressAllow = "192.0.2.1:25".parse().unwrap();
        assert!(a.matches("192.0.2.1:25".parse().unwrap()));
        assert!(!a.matches("192.0.2.1:26".parse().unwrap()));
        let a: EgressAllow = "[2001:db8::]/32:443".parse().unwrap();
        assert!(a.matches("[2001:db8:1::1]:443".parse().unwrap()));
        assert!(!a.matches("[2001:db9::1]:443".parse().unwrap()));
        let a: EgressAllow = "0.0.0.0/0".parse().unwrap();
        assert!(a.matches("203.0.113.9:1".parse().unwrap()));
        assert!(!a.matches("[2001:db8::1]:1".parse().unwrap()));
        let a: EgressAllow = "[2001:db8::1]:443".parse().unwrap();
        assert_eq!(a.prefix, 128);
        assert_eq!(a.port, Some(443));
        for bad in ["10.0.0.0/33", "10.0.0.0/8:0", "example.com", "10.0.0.0/8:x", "10.0.0/8"] {
            assert!(bad.parse::<EgressAllow>().is_err(), "{bad}");
        }
    }

    #[test]
    fn the_strictest_of_flag_namespace_and_pod_applies_and_only_the_namespace_allow_lists() {
        use crate::state::workload::{EGRESS_ALLOW_ANNOTATION, EGRESS_ANNOTATION, Namespace, Pod};
        use EgressMode::{Passthrough, TlsOnly};
        let ns = |mode: Option<&str>| {
            let mut ns = Namespace::default();
            if let Some(m) = mode {
                ns.annotations.insert(EGRESS_ANNOTATION.into(), m.into());
            }
            ns
        };
        let pod = |mode: Option<&str>| {
            let mut pod = Pod {
                uid: "egress-test".into(),
                ..Default::default()
            };
            if let Some(m) = mode {
                pod.annotations.insert(EGRESS_ANNOTATION.into(), m.into());
            }
            pod
        };
        // (flag, namespace, pod) -> mode
        let table = [
            (Passthrough, None, None, Passthrough),
            (TlsOnly, None, None, TlsOnly),
            (Passthrough, Some("tls-only"), None, TlsOnly),
            (Passthrough, None, Some("tls-only"), TlsOnly),
            // A pod cannot relax its namespace, nor the flag ...
            (Passthrough, Some("tls-only"), Some("passthrough"), TlsOnly),
            (TlsOnly, None, Some("passthrough"), TlsOnly),
            // ... nor can a namespace relax the flag.
            (TlsOnly, Some("passthrough"), None, TlsOnly),
            (Passthrough, Some("passthrough"), Some("passthrough"), Passthrough),
            // An invalid value anywhere fails closed.
            (Passthrough, None, Some("plaintext-please"), TlsOnly),
            (Passthrough, Some("plaintext-please"), Some("passthrough"), TlsOnly),
        ];
        for (flag, n, p, want) in table {
            assert_eq!(
                egress(&pod(p), Some(&ns(n)), flag).mode,
                want,
                "flag {flag:?}, namespace {n:?}, pod {p:?}"
            );
        }
        // Only the namespace's allow list applies; a pod's is ignored.
        let mut n = ns(Some("tls-only"));
        n.annotations
            .insert(EGRESS_ALLOW_ANNOTATION.into(), "10.0.0.0/8, nonsense".into());
        let mut p = pod(None);
        p.annotations.insert(EGRESS_ALLOW_ANNOTATION.into(), "0.0.0.0/0".into());
        let e = egress(&p, Some(&n), Passthrough);
        assert_eq!(e.allow.len(), 1, "the namespace's good entry only: {:?}", e.allow);
        assert_eq!(e.allow[0].net, "10.0.0.0".parse::<std::net::IpAddr>().unwrap());
        assert!(egress(&p, None, TlsOnly).allow.is_empty(), "a pod allow-listed itself");
    }
}
