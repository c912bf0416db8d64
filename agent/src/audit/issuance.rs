//! `nodeward audit --issuance-log`: the certificates agents hold, checked
//! against the CA service's issuance logs. A certificate in use whose
//! serial no log holds was signed outside the service: with its signing
//! key in other hands, or by a replica whose log was not given. A log
//! whose chain is broken was edited after the fact.

#![forbid(unsafe_code)]

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use super::{AuditError, Finding, Kind, Severity};
use crate::ca_service::ledger::{self, Decision};

/// A certificate an agent reports holding.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct InUse {
    /// SPIFFE ID.
    pub(crate) identity: String,
    /// Serial, lowercase hex.
    pub(crate) serial: String,
    /// Where it was reported: a `/certs` file or an agent's metrics address.
    pub(crate) source: String,
    /// The certificate's SHA-256, when the report carries it (`/certs`).
    pub(crate) sha256: Option<String>,
}

/// Where the audit reads what is in use.
#[derive(Clone, Debug, Default)]
pub struct Reported {
    /// Saved `/certs` documents (`curl 127.0.0.1:15000/certs` on a node).
    pub certs: Vec<PathBuf>,
    /// Agents' metrics endpoints (`NODE:15020`), scraped for
    /// `nodeward_certificate_expiry_timestamp_seconds{identity,serial}`.
    pub metrics: Vec<SocketAddr>,
}

#[derive(Deserialize)]
struct CertsDoc {
    certificates: Vec<CertsEntry>,
}

#[derive(Deserialize)]
struct CertsEntry {
    identity: String,
    serial: String,
    /// The leaf's SHA-256, from agents that report it.
    #[serde(default)]
    sha256: Option<String>,
}

/// Serials as one form: lowercase hex without colons.
fn canonical(serial: &str) -> String {
    serial
        .chars()
        .filter(|c| *c != ':')
        .collect::<String>()
        .to_ascii_lowercase()
}

/// What the agents report holding.
fn in_use(reported: &Reported) -> Result<Vec<InUse>, AuditError> {
    let mut out = Vec::new();
    for file in &reported.certs {
        let bad = |message: String| AuditError::Reported {
            what: file.display().to_string(),
            message,
        };
        let text = std::fs::read_to_string(file).map_err(|e| bad(e.to_string()))?;
        let doc: CertsDoc = serde_json::from_str(&text).map_err(|e| bad(format!("not a /certs document: {e}")))?;
        out.extend(doc.certificates.into_iter().map(|c| InUse {
            identity: c.identity,
            serial: canonical(&c.serial),
            source: file.display().to_string(),
            sha256: c.sha256.map(|h| canonical(&h)),
        }));
    }
    for addr in &reported.metrics {
        let text =
            crate::verify::counters::scrape(*addr, Duration::from_secs(5)).map_err(|message| AuditError::Reported {
                what: addr.to_string(),
                message,
            })?;
        out.extend(from_metrics(&text).into_iter().map(|(identity, serial)| InUse {
            identity,
            serial: canonical(&serial),
            source: addr.to_string(),
            sha256: None,
        }));
    }
    Ok(out)
}

/// (identity, serial) of each `nodeward_certificate_expiry_timestamp_seconds` series.
fn from_metrics(text: &str) -> Vec<(String, String)> {
    let label = |labels: &str, name: &str| {
        let start = labels.find(&format!("{name}=\""))? + name.len() + 2;
        let end = labels[start..].find('"')? + start;
        Some(labels[start..end].to_string())
    };
    text.lines()
        .filter_map(|l| l.strip_prefix("nodeward_certificate_expiry_timestamp_seconds{"))
        .filter_map(|l| l.split_once('}').map(|(labels, _)| labels))
        .filter_map(|labels| Some((label(labels, "identity")?, label(labels, "serial")?)))
        .collect()
}

/// The findings: each broken log, and each certificate in use that no log
/// issued (or issued for another identity).
pub(crate) fn audit(logs: &[PathBuf], reported: &Reported) -> Result<Vec<Finding>, AuditError> {
    let mut findings = Vec::new();
    // serial -> (identity, log, SHA-256)
    let mut issued: HashMap<String, (String, &Path, Option<String>)> = HashMap::new();
    for log in logs {
        let file = std::fs::File::open(log).map_err(|e| AuditError::Reported {
            what: log.display().to_string(),
            message: e.to_string(),
        })?;
        match ledger::verify(file) {
            Ok(v) => {
                for e in v.entries.into_iter().filter(|e| e.decision == Decision::Issued) {
                    if let Some(serial) = e.serial {
                        issued.insert(canonical(&serial), (e.requested, log, e.sha256.map(|h| canonical(&h))));
                    }
                }
            }
            Err(b) => findings.push(Finding::new(
                Severity::High,
                Kind::IssuanceLogBroken,
                log.display().to_string(),
                format!("the chain breaks at {b}: the log was edited, cut or reordered after it was written"),
            )),
        }
    }
    for c in in_use(reported)? {
        let object = format!("Certificate {} ({})", c.serial, c.identity);
        match issued.get(&c.serial) {
            None => findings.push(Finding::new(
                Severity::High,
                Kind::UnloggedCertificate,
                object,
                format!(
                    "held on {} but in no issuance log: signed outside the CA service (its signing key is in other hands), or by a replica whose log was not given",
                    c.source
                ),
            )),
            Some((_, log, Some(logged))) if c.sha256.as_ref().is_some_and(|h| h != logged) => {
                findings.push(Finding::new(
                    Severity::High,
                    Kind::UnloggedCertificate,
                    object,
                    format!(
                        "held on {} with serial {}, but it is not the certificate {} logs under that serial (another SHA-256): a forgery reusing a logged serial",
                        c.source,
                        c.serial,
                        log.display()
                    ),
                ))
            }
            Some((identity, log, _)) if *identity != c.identity => findings.push(Finding::new(
                Severity::High,
                Kind::UnloggedCertificate,
                object,
                format!(
                    "held on {} for {}, but {} logs serial {} as issued for {identity}",
                    c.source,
                    c.identity,
                    log.display(),
                    c.serial
                ),
            )),
            Some(_) => {}
        }
    }
    Ok(findings)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metrics_series_name_their_identity_and_serial() {
        let text = "# TYPE nodeward_certificate_expiry_timestamp_seconds gauge\n\
            nodeward_certificate_expiry_timestamp_seconds{identity=\"spiffe://cluster.local/ns/a/sa/b\",serial=\"0A:ff\"} 1\n\
            nodeward_certificate_issuances_total{kind=\"issue\",result=\"success\"} 1\n";
        assert_eq!(
            from_metrics(text),
            vec![("spiffe://cluster.local/ns/a/sa/b".to_string(), "0A:ff".to_string())]
        );
        assert_eq!(canonical("0A:ff"), "0aff");
    }
}
