//! `nodeward audit`: a static review of a config directory, read with the
//! agent's own parsers (`source::dir` into a [`Snapshot`], `policy` for the
//! model), so the audit sees exactly what the agent would enforce.
//!
//! Each finding has a severity, the object (`Kind namespace/name`) and a
//! one-line why. The checks are grouped by what they look at: mTLS modes,
//! the exceptions register and the UDP/SCTP ports STRICT does not cover
//! (`mtls.rs`), authorization policies and the rules other rules shadow
//! (`authz.rs`).

#![forbid(unsafe_code)]

mod authz;
mod issuance;
mod mtls;

pub use issuance::Reported;

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use serde::Serialize;

use crate::policy::model::StrMatch;
use crate::source::dir::DirSource;
use crate::state::Snapshot;
use crate::state::workload::Namespace;

/// How much a finding matters; `--fail-on` compares against it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Severity {
    /// Listed for the record (a documented exception); never fails.
    #[value(skip)]
    Info,
    /// Redundant or dead configuration.
    Low,
    /// Weaker security than it looks.
    Medium,
    /// Security is off or the config does not mean what it says.
    High,
}

impl Severity {
    /// The lowercase label used in tables and JSON.
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Severity::Info => "info",
            Severity::Low => "low",
            Severity::Medium => "medium",
            Severity::High => "high",
        }
    }
}

/// What a finding is about: one per check, a closed set for machines.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub(crate) enum Kind {
    /// A PeerAuthentication sets DISABLE (mode or port).
    MtlsDisable,
    /// A PeerAuthentication sets PERMISSIVE in a production namespace.
    PermissiveInProduction,
    /// An enrolled namespace where no STRICT applies anywhere.
    NoStrict,
    /// An ALLOW rule with no source constraint or with `*` principals.
    AllowAnySource,
    /// A DENY or ALLOW policy that selects no workload.
    SelectsNothing,
    /// A rule every connection of which another rule of the same scope
    /// and action already matches.
    ShadowedRule,
    /// An AuthorizationPolicy with fields only an L7 proxy can enforce.
    L7Fields,
    /// A policy the agent's validation rejects (it fails safe).
    InvalidPolicy,
    /// A config file, or a document of one, the agent rejects.
    RejectedFile,
    /// An opted-out pod or excluded ports without a documented reason.
    UndocumentedException,
    /// An opted-out pod or excluded ports with a documented reason.
    DocumentedException,
    /// A certificate in use that no issuance log holds.
    UnloggedCertificate,
    /// An issuance log whose hash chain is broken.
    IssuanceLogBroken,
    /// An enrolled pod declaring UDP or SCTP ports under STRICT, which
    /// covers TCP only.
    UdpNotCovered,
}

impl Kind {
    /// The snake_case label used in tables and JSON.
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Kind::MtlsDisable => "mtls_disable",
            Kind::PermissiveInProduction => "permissive_in_production",
            Kind::NoStrict => "no_strict",
            Kind::AllowAnySource => "allow_any_source",
            Kind::SelectsNothing => "selects_nothing",
            Kind::ShadowedRule => "shadowed_rule",
            Kind::L7Fields => "l7_fields",
            Kind::InvalidPolicy => "invalid_policy",
            Kind::RejectedFile => "rejected_file",
            Kind::UndocumentedException => "undocumented_exception",
            Kind::DocumentedException => "documented_exception",
            Kind::UnloggedCertificate => "unlogged_certificate",
            Kind::IssuanceLogBroken => "issuance_log_broken",
            Kind::UdpNotCovered => "udp_not_covered",
        }
    }
}

/// One problem found.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Finding {
    /// How much it matters.
    pub(crate) severity: Severity,
    /// Which check found it.
    pub(crate) kind: Kind,
    /// The object: `Kind namespace/name` (a file path for rejected files).
    pub(crate) object: String,
    /// One line saying why it matters.
    pub(crate) why: String,
}

impl Finding {
    fn new(severity: Severity, kind: Kind, object: String, why: String) -> Self {
        Finding {
            severity,
            kind,
            object,
            why,
        }
    }
}

/// Annotation on a pod that documents why it is an exception (opted out
/// or with excluded ports); the exceptions register lists it.
pub(crate) const EXCEPTION_REASON_ANNOTATION: &str = "nodeward.io/exception-reason";

/// Which namespaces count as production: by name pattern (`prod*`,
/// `*-prod`, exact) or by a `key=value` label.
#[derive(Clone, Debug)]
pub struct Production {
    names: Vec<StrMatch>,
    labels: Vec<(String, String)>,
}

/// `--production-namespaces` default.
pub(crate) const DEFAULT_PRODUCTION_NAMESPACES: &str = "prod,prod-*,*-prod,production,production-*,*-production";
/// `--production-labels` default.
pub(crate) const DEFAULT_PRODUCTION_LABELS: &str = "env=prod,env=production,environment=prod,environment=production";

impl Production {
    /// Builds the matcher from name patterns and `key=value` labels.
    pub fn new(names: &[String], labels: &[String]) -> Result<Self, AuditError> {
        let mut parsed = Vec::new();
        for l in labels.iter().map(|l| l.trim()).filter(|l| !l.is_empty()) {
            match l.split_once('=') {
                Some((k, v)) if !k.is_empty() => parsed.push((k.to_string(), v.to_string())),
                _ => return Err(AuditError::BadLabel(l.to_string())),
            }
        }
        Ok(Production {
            names: names
                .iter()
                .map(|n| n.trim())
                .filter(|n| !n.is_empty())
                .map(StrMatch::parse)
                .collect(),
            labels: parsed,
        })
    }

    /// The defaults: names `prod`, `prod-*`, `*-prod`, `production`…,
    /// labels `env`/`environment` = `prod`/`production`.
    #[cfg(test)]
    pub(crate) fn defaults() -> Self {
        let split = |s: &str| s.split(',').map(String::from).collect::<Vec<_>>();
        Production::new(&split(DEFAULT_PRODUCTION_NAMESPACES), &split(DEFAULT_PRODUCTION_LABELS)).unwrap_or(
            Production {
                names: Vec::new(),
                labels: Vec::new(),
            },
        )
    }

    /// Whether namespace `name` (with its object, if the config has one)
    /// looks like production.
    pub(crate) fn matches(&self, name: &str, ns: Option<&Namespace>) -> bool {
        self.names.iter().any(|m| m.matches(name))
            || ns.is_some_and(|ns| self.labels.iter().any(|(k, v)| ns.labels.get(k) == Some(v)))
    }
}

/// Why an audit could not run.
#[derive(Debug, thiserror::Error)]
pub enum AuditError {
    /// The config directory cannot be listed.
    #[error("cannot read config directory {dir}: {source}")]
    ReadDir {
        /// The directory.
        dir: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// A `--production-labels` entry that is not `key=value`.
    #[error("--production-labels: {0:?} is not key=value")]
    BadLabel(String),
    /// An issuance log, a `/certs` file or an agent's metrics could not be read.
    #[error("{what}: {message}")]
    Reported {
        /// The file or address.
        what: String,
        /// Why.
        message: String,
    },
}

/// Audits the certificates agents report (`reported`) against the CA
/// service's issuance `logs`.
pub fn audit_issuance(logs: &[PathBuf], reported: &Reported) -> Result<Vec<Finding>, AuditError> {
    let mut findings = issuance::audit(logs, reported)?;
    sort(&mut findings);
    Ok(findings)
}

/// Audits the config directory `dir` as the agent would read it.
pub fn audit_dir(dir: &Path, root_namespace: &str, production: &Production) -> Result<Vec<Finding>, AuditError> {
    std::fs::read_dir(dir).map_err(|source| AuditError::ReadDir {
        dir: dir.to_path_buf(),
        source,
    })?;
    let mut source = DirSource::new(dir).with_assembler(crate::source::Assembler::new(
        root_namespace,
        crate::config::defaults::TRUST_DOMAIN,
        &[],
    ));
    source.refresh();
    let mut findings: Vec<Finding> = source
        .errors()
        .into_iter()
        .map(|(path, e)| {
            let what = if source.unparseable(&path) {
                "the agent cannot parse this file: it keeps the file's last good version, and does not start without one"
            } else {
                "the agent rejects this document (its object keeps its last good version, if any; the file's other documents stand)"
            };
            Finding::new(
                Severity::High,
                Kind::RejectedFile,
                path.display().to_string(),
                format!("{what}: {e}"),
            )
        })
        .collect();
    findings.extend(audit_snapshot(&source.snapshot(), production));
    sort(&mut findings);
    Ok(findings)
}

/// Audits a snapshot: every check, findings most severe first.
pub(crate) fn audit_snapshot(snap: &Snapshot, production: &Production) -> Vec<Finding> {
    let mut out = Vec::new();
    mtls::check(snap, production, &mut out);
    mtls::exceptions(snap, &mut out);
    mtls::datagram_ports(snap, &mut out);
    authz::check(snap, &mut out);
    sort(&mut out);
    out
}

fn sort(findings: &mut [Finding]) {
    findings.sort_by(|a, b| {
        b.severity
            .cmp(&a.severity)
            .then_with(|| a.object.cmp(&b.object))
            .then_with(|| a.kind.as_str().cmp(b.kind.as_str()))
    });
}

/// Whether any finding is at or above `fail_on`.
pub fn fails(findings: &[Finding], fail_on: Severity) -> bool {
    findings.iter().any(|f| f.severity >= fail_on)
}

/// A table for people: one finding per line, then a count per severity.
pub fn table(findings: &[Finding]) -> String {
    let mut out = String::new();
    if findings.is_empty() {
        out.push_str("no findings\n");
        return out;
    }
    let w_kind = findings.iter().map(|f| f.kind.as_str().len()).max().unwrap_or(0).max(4);
    let w_obj = findings.iter().map(|f| f.object.len()).max().unwrap_or(0).max(6);
    let _ = writeln!(out, "{:<8} {:<w_kind$} {:<w_obj$} WHY", "SEVERITY", "KIND", "OBJECT");
    for f in findings {
        let _ = writeln!(
            out,
            "{:<8} {:<w_kind$} {:<w_obj$} {}",
            f.severity.as_str(),
            f.kind.as_str(),
            f.object,
            f.why
        );
    }
    let count = |s| findings.iter().filter(|f| f.severity == s).count();
    let _ = writeln!(
        out,
        "\n{} findings: {} high, {} medium, {} low, {} info",
        findings.len(),
        count(Severity::High),
        count(Severity::Medium),
        count(Severity::Low),
        count(Severity::Info)
    );
    out
}

/// JSON for machines: `{"findings": [...]}`.
pub fn json(findings: &[Finding]) -> String {
    #[derive(Serialize)]
    struct Report<'a> {
        findings: &'a [Finding],
    }
    serde_json::to_string_pretty(&Report { findings }).unwrap_or_else(|e| format!("{{\"error\":\"{e}\"}}"))
}

#[cfg(test)]
mod tests;
