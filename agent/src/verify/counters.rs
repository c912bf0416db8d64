//! The outbound check: the pod's connections to enrolled peers, as the
//! agent counted them in Istio's `istio_tcp_connections_opened_total`
//! (`reporter="source"`), must all be `connection_security_policy=
//! "mutual_tls"`.
//!
//! A series belongs to the pod when its `source_principal` is the pod's
//! identity or its `source_workload` (in `source_workload_namespace`) is
//! the pod's name or `app` label; its peer is enrolled when the
//! destination's principal or workload is one of an enrolled pod of the
//! config. Pods sharing an identity on one node are counted together.

#![forbid(unsafe_code)]

use std::collections::{BTreeMap, HashSet};
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

use super::{Check, CheckKind, Status};
use crate::state::Snapshot;
use crate::state::workload::{Enrolment, Pod, enrolment};

/// The counter read.
const OPENED: &str = "istio_tcp_connections_opened_total";

/// Largest `/metrics` body read.
const MAX_BODY: u64 = 64 << 20;

/// Reads `http://addr/metrics`; the error says why it could not.
pub(crate) fn scrape(addr: SocketAddr, timeout: Duration) -> Result<String, String> {
    let fetch = || -> std::io::Result<(String, String)> {
        let mut s = TcpStream::connect_timeout(&addr, timeout)?;
        s.set_read_timeout(Some(timeout))?;
        s.set_write_timeout(Some(timeout))?;
        // HTTP/1.0: the body comes whole, never chunked, and ends at close.
        s.write_all(b"GET /metrics HTTP/1.0\r\nAccept: text/plain\r\n\r\n")?;
        let mut raw = Vec::new();
        s.take(MAX_BODY).read_to_end(&mut raw)?;
        let text = String::from_utf8_lossy(&raw).into_owned();
        let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
        Ok((head.lines().next().unwrap_or_default().to_string(), body.to_string()))
    };
    match fetch() {
        Ok((status, body)) if status.split_whitespace().nth(1) == Some("200") => Ok(body),
        Ok((status, _)) => Err(format!("http://{addr}/metrics answered {status:?}")),
        // A read or write timeout surfaces as EAGAIN, which says nothing.
        Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => Err(format!(
            "http://{addr}/metrics: no answer within {timeout:?} (--timeout)"
        )),
        Err(e) => Err(format!("http://{addr}/metrics: {e}")),
    }
}

/// One sample of the Prometheus text format.
#[derive(Debug, PartialEq)]
struct Sample {
    name: String,
    labels: BTreeMap<String, String>,
    value: f64,
}

/// Parses the samples of Prometheus text exposition; malformed lines are
/// skipped.
fn samples(text: &str) -> Vec<Sample> {
    text.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .filter_map(sample)
        .collect()
}

fn sample(line: &str) -> Option<Sample> {
    let name_end = line.find(['{', ' '])?;
    let name = line[..name_end].to_string();
    let mut labels = BTreeMap::new();
    let mut rest = &line[name_end..];
    if let Some(inner) = rest.strip_prefix('{') {
        let mut chars = inner.char_indices();
        let mut key = String::new();
        let mut end = None;
        while let Some((i, c)) = chars.next() {
            match c {
                '}' => {
                    end = Some(i + 1);
                    break;
                }
                ',' | ' ' => {}
                '=' => {
                    if chars.next()?.1 != '"' {
                        return None;
                    }
                    let mut value = String::new();
                    loop {
                        match chars.next()?.1 {
                            '"' => break,
                            '\\' => match chars.next()?.1 {
                                'n' => value.push('\n'),
                                other => value.push(other),
                            },
                            other => value.push(other),
                        }
                    }
                    labels.insert(std::mem::take(&mut key), value);
                }
                other => key.push(other),
            }
        }
        rest = &inner[end?..];
    }
    let value = rest.split_whitespace().next()?.parse().ok()?;
    Some(Sample { name, labels, value })
}

/// Counts of a pod's outbound connections to enrolled peers.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub(crate) struct OutboundSecurity {
    /// Over mutual TLS.
    pub(crate) mtls: f64,
    /// In plaintext (`connection_security_policy="none"`).
    pub(crate) plaintext: f64,
}

/// The pod's outbound connections to enrolled peers in `metrics`; `None`
/// when the text has no `istio_tcp_connections_opened_total` at all.
pub(crate) fn outbound_security(
    metrics: &str,
    snap: &Snapshot,
    pod: &Pod,
    trust_domain: &str,
) -> Option<OutboundSecurity> {
    let all = samples(metrics);
    if !all.iter().any(|s| s.name == OPENED) {
        return None;
    }
    // As the agent exports them (and Istio writes them): full SPIFFE IDs.
    let principal = |p: &Pod| format!("spiffe://{trust_domain}/ns/{}/sa/{}", p.namespace, p.service_account);
    let names = |p: &Pod| -> Vec<String> {
        let mut n = vec![p.name.clone()];
        n.extend(
            ["app", "app.kubernetes.io/name"]
                .iter()
                .filter_map(|k| p.labels.get(*k).cloned()),
        );
        n
    };
    let enrolled: Vec<&Pod> = snap
        .pods
        .values()
        .map(AsRef::as_ref)
        .filter(|p| enrolment(p, snap.namespaces.get(&p.namespace)) == Enrolment::Enrolled)
        .collect();
    let peer_principals: HashSet<String> = enrolled.iter().map(|p| principal(p)).collect();
    let peer_workloads: HashSet<(String, String)> = enrolled
        .iter()
        .flat_map(|p| names(p).into_iter().map(|n| (p.namespace.clone(), n)))
        .collect();
    let own = principal(pod);
    let own_names = names(pod);
    let label = |s: &Sample, k: &str| s.labels.get(k).map(|v| v.trim_start_matches("spiffe://").to_string());
    let mut out = OutboundSecurity::default();
    for s in all.iter().filter(|s| s.name == OPENED) {
        if s.labels.get("reporter").map(String::as_str) != Some("source") {
            continue;
        }
        let mine = label(s, "source_principal").as_deref() == Some(own.as_str())
            || (label(s, "source_workload_namespace").as_deref() == Some(pod.namespace.as_str())
                && label(s, "source_workload").is_some_and(|w| own_names.contains(&w)));
        let to_enrolled = label(s, "destination_principal").is_some_and(|p| peer_principals.contains(&p))
            || match (
                label(s, "destination_workload_namespace"),
                label(s, "destination_workload"),
            ) {
                (Some(ns), Some(w)) => peer_workloads.contains(&(ns, w)),
                _ => false,
            };
        if !mine || !to_enrolled {
            continue;
        }
        match s.labels.get("connection_security_policy").map(String::as_str) {
            Some("mutual_tls") => out.mtls += s.value,
            _ => out.plaintext += s.value,
        }
    }
    Some(out)
}

/// The outbound check of `pod` from a scrape (or why there is none).
pub(super) fn check(
    metrics: &Result<String, String>,
    snap: &Snapshot,
    pod: &Pod,
    trust_domain: &str,
    addr: SocketAddr,
) -> Check {
    let (status, detail) = match metrics {
        Err(e) => (Status::NotTested, format!("agent counters unavailable: {e}")),
        Ok(text) => match outbound_security(text, snap, pod, trust_domain) {
            None => (Status::NotTested, format!("http://{addr}/metrics has no {OPENED}")),
            Some(c) if c.plaintext > 0.0 => (
                Status::Fail,
                format!(
                    "{} of {} outbound connections to enrolled peers were plaintext",
                    c.plaintext,
                    c.plaintext + c.mtls
                ),
            ),
            Some(c) if c.mtls > 0.0 => (
                Status::Pass,
                format!("all {} outbound connections to enrolled peers were mTLS", c.mtls),
            ),
            Some(_) => (
                Status::NotTested,
                "no outbound connection to an enrolled peer counted yet".into(),
            ),
        },
    };
    Check {
        pod: pod.key(),
        check: CheckKind::OutboundMtls,
        port: None,
        status,
        detail,
    }
}

#[cfg(test)]
mod tests {
    use std::net::TcpListener;
    use std::sync::Arc;

    use super::*;
    use crate::state::workload::Namespace;

    fn pod(name: &str, ns: &str, sa: &str) -> Arc<Pod> {
        Arc::new(Pod {
            namespace: ns.into(),
            name: name.into(),
            uid: name.into(),
            labels: [("app".to_string(), name.to_string())].into(),
            service_account: sa.into(),
            ips: vec!["10.0.0.1".parse().unwrap()],
            phase: "Running".into(),
            node_name: "n1".into(),
            ..Default::default()
        })
    }

    /// Namespace `mesh` (enrolled): a, c; namespace `plain`: d.
    fn snap() -> Snapshot {
        let mut s = Snapshot::default();
        let ambient = [("istio.io/dataplane-mode".to_string(), "ambient".to_string())].into();
        s.namespaces.insert(
            "mesh".into(),
            Namespace {
                name: "mesh".into(),
                labels: ambient,
                ..Default::default()
            },
        );
        for p in [pod("a", "mesh", "a"), pod("c", "mesh", "c"), pod("d", "plain", "d")] {
            s.pods.insert(p.key(), p);
        }
        s.index()
    }

    fn series(src: &str, dst_ns: &str, dst: &str, dst_principal: &str, security: &str, n: u32) -> String {
        format!(
            "{OPENED}{{reporter=\"source\",source_workload=\"{src}\",source_workload_namespace=\"mesh\",source_principal=\"spiffe://cluster.local/ns/mesh/sa/{src}\",destination_workload=\"{dst}\",destination_workload_namespace=\"{dst_ns}\",destination_principal=\"{dst_principal}\",connection_security_policy=\"{security}\",response_flags=\"-\"}} {n}\n"
        )
    }

    /// Serves `body` once as `/metrics` on a loopback port: a fake agent.
    fn fake_agent(body: String) -> SocketAddr {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        std::thread::spawn(move || {
            let (mut s, _) = l.accept().unwrap();
            let mut req = [0u8; 1024];
            let n = s.read(&mut req).unwrap();
            assert!(String::from_utf8_lossy(&req[..n]).starts_with("GET /metrics "));
            let _ = write!(s, "HTTP/1.0 200 OK\r\nContent-Type: text/plain\r\n\r\n{body}");
        });
        addr
    }

    fn verdict(body: String) -> Check {
        let addr = fake_agent(body);
        let snap = snap();
        let a = snap.pods["mesh/a"].clone();
        check(&scrape(addr, Duration::from_secs(5)), &snap, &a, "cluster.local", addr)
    }

    #[test]
    fn outbound_connections_to_enrolled_peers_all_mtls_pass() {
        let body = format!(
            "# TYPE {OPENED} counter\n{}{}{}",
            series("a", "mesh", "c", "spiffe://cluster.local/ns/mesh/sa/c", "mutual_tls", 3),
            // To a pod outside the mesh: plaintext is expected there.
            series("a", "plain", "d", "unknown", "none", 5),
            // Another pod's plaintext is not a's.
            series("c", "mesh", "a", "unknown", "none", 1),
        );
        let c = verdict(body);
        assert_eq!(c.status, Status::Pass, "{c:?}");
        assert!(c.detail.contains("all 3 outbound"), "{c:?}");
    }

    #[test]
    fn a_plaintext_connection_to_an_enrolled_peer_fails() {
        let body = format!(
            "{}{}",
            series("a", "mesh", "c", "spiffe://cluster.local/ns/mesh/sa/c", "mutual_tls", 3),
            series("a", "mesh", "c", "unknown", "none", 2),
        );
        let c = verdict(body);
        assert_eq!(c.status, Status::Fail, "{c:?}");
        assert!(c.detail.contains("2 of 5"), "{c:?}");
    }

    #[test]
    fn an_agent_that_does_not_answer_in_time_is_named_with_the_timeout() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        // Accepted (by the backlog) and never answered.
        let e = scrape(addr, Duration::from_millis(100)).unwrap_err();
        assert_eq!(e, format!("http://{addr}/metrics: no answer within 100ms (--timeout)"));
        drop(listener);
    }

    #[test]
    fn no_counters_is_not_tested_never_a_pass() {
        let c = verdict("nodeward_config_reloads_total 1\n".into());
        assert_eq!(c.status, Status::NotTested, "{c:?}");
        let c = verdict(series("a", "plain", "d", "unknown", "none", 5));
        assert_eq!(c.status, Status::NotTested, "{c:?}");
        let closed = TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap();
        let snap = snap();
        let a = snap.pods["mesh/a"].clone();
        let c = check(
            &scrape(closed, Duration::from_secs(1)),
            &snap,
            &a,
            "cluster.local",
            closed,
        );
        assert_eq!(c.status, Status::NotTested, "{c:?}");
        assert!(c.detail.contains("unavailable"), "{c:?}");
    }

    #[test]
    fn label_values_with_escapes_parse() {
        let s = sample(r#"m{a="x\"y",b="p\\q"} 2.5"#).unwrap();
        assert_eq!(s.labels["a"], "x\"y");
        assert_eq!(s.labels["b"], "p\\q");
        assert_eq!(s.value, 2.5);
        assert_eq!(sample("plain 7").unwrap().value, 7.0);
        assert!(sample("broken{a=1} 2").is_none());
    }
}
