//! What the agent trusts, as one immutable snapshot replaced whole on change:
//! the roots (several, for root rotation), the CRLs (only those signed by a
//! CA we trust), and the identity deny list.
//!
//! Sources are files polled for changes. A file that becomes invalid keeps
//! its previous good content in force, and its error is reported once and
//! through readiness.
//!
//! Every CRL counts: a serial listed in any loaded CRL of its issuer is
//! revoked, whichever file or PEM block it came from. A reloaded file may
//! not roll an issuer's CRL back to a lower CRL number (the newer one is
//! kept), and a CRL past its `nextUpdate` is reported and, when unknown
//! revocation status is refused, stops speaking for its issuer.

#![forbid(unsafe_code)]

use std::collections::{BTreeMap, HashSet};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::{SystemTime, UNIX_EPOCH};

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, CertificateRevocationListDer};
use tokio::sync::watch;
use webpki::{CertRevocationList, OwnedCertRevocationList};
use x509_parser::num_bigint::BigUint;
use x509_parser::prelude::{FromDer, X509Certificate};

use super::Identity;

/// What to do with a certificate whose issuer has published no CRL.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum UnknownStatus {
    /// Accept it (the default: CRLs are optional).
    Accept,
    /// Refuse it.
    Refuse,
}

/// One entry of the deny list.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum DenyEntry {
    /// One identity.
    Exact(Identity),
    /// Every service account of a namespace (`ns/<ns>/*`).
    Namespace(String),
}

/// Identities cut off whatever certificates they hold.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DenyList {
    /// Entries.
    pub entries: Vec<DenyEntry>,
}

impl DenyList {
    /// Parses a deny file: one SPIFFE ID or `ns/<ns>/*` per line, `#`
    /// comments. Valid lines apply even when others are invalid (denying
    /// more, never less); the invalid ones are returned as errors.
    pub(crate) fn parse(path: &Path, text: &str) -> (DenyList, Vec<String>) {
        let mut list = DenyList::default();
        let mut errors = Vec::new();
        for (i, raw) in text.lines().enumerate() {
            let line = raw.split('#').next().unwrap_or("").trim();
            if line.is_empty() {
                continue;
            }
            if let Some(ns) = line.strip_prefix("ns/").and_then(|r| r.strip_suffix("/*"))
                && !ns.is_empty()
                && ns.bytes().all(|b| b.is_ascii_alphanumeric() || b"-._".contains(&b))
            {
                list.entries.push(DenyEntry::Namespace(ns.to_string()));
                continue;
            }
            match Identity::parse(line) {
                Ok(id) => list.entries.push(DenyEntry::Exact(id)),
                Err(e) => errors.push(format!("{}:{}: {e}", path.display(), i + 1)),
            }
        }
        (list, errors)
    }

    /// Whether `id` is denied.
    pub(crate) fn denies(&self, id: &Identity) -> bool {
        self.entries.iter().any(|e| match e {
            DenyEntry::Exact(d) => d == id,
            DenyEntry::Namespace(ns) => *ns == id.namespace,
        })
    }
}

/// A CRL that passed validation, with an index for classifying refusals.
#[derive(Debug)]
pub struct LoadedCrl {
    /// Raw DER issuer name.
    pub(crate) issuer: Vec<u8>,
    /// Revoked serials.
    pub(crate) serials: HashSet<Vec<u8>>,
    /// The CRL number extension, if any: a lower number never replaces a
    /// higher one for the same issuer.
    pub(crate) number: Option<BigUint>,
    /// `nextUpdate`, seconds since the epoch, if any.
    pub(crate) next_update: Option<i64>,
    /// For webpki.
    pub(crate) crl: CertRevocationList<'static>,
}

impl LoadedCrl {
    /// Whether its `nextUpdate` has passed at `now` (seconds since the epoch).
    pub(crate) fn is_stale(&self, now: i64) -> bool {
        self.next_update.is_some_and(|t| t <= now)
    }
}

/// Seconds since the epoch, now.
pub fn unix_now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

/// Everything a verification needs, immutable.
#[derive(Debug)]
pub struct TrustSnapshot {
    /// Our trust domain.
    pub(crate) trust_domain: String,
    /// Roots as webpki anchors.
    pub(crate) anchors: Vec<rustls::pki_types::TrustAnchor<'static>>,
    /// Raw subjects of intermediates this node's CA chain contains; a peer
    /// certificate issued by one of them but sent without it is missing an
    /// intermediate, not from an unknown root.
    pub known_intermediates: Vec<Vec<u8>>,
    /// Valid CRLs.
    pub crls: Vec<LoadedCrl>,
    /// The deny list.
    pub deny: DenyList,
    /// Policy for certificates without revocation information.
    pub unknown_status: UnknownStatus,
    /// Increases with every change.
    pub(crate) generation: u64,
}

impl TrustSnapshot {
    /// A snapshot of roots and intermediates alone (no CRLs, no deny list).
    pub fn new(
        trust_domain: &str,
        roots: Vec<CertificateDer<'static>>,
        intermediates: &[CertificateDer<'static>],
    ) -> TrustSnapshot {
        let anchors = roots
            .iter()
            .filter_map(|r| webpki::anchor_from_trusted_cert(r).ok().map(|a| a.to_owned()))
            .collect();
        let known_intermediates = intermediates
            .iter()
            .filter_map(|c| {
                X509Certificate::from_der(c.as_ref())
                    .ok()
                    .map(|(_, p)| p.subject().as_raw().to_vec())
            })
            .collect();
        TrustSnapshot {
            trust_domain: trust_domain.to_string(),
            anchors,
            known_intermediates,
            crls: Vec::new(),
            deny: DenyList::default(),
            unknown_status: UnknownStatus::Accept,
            generation: 0,
        }
    }

    /// Whether a certificate with this issuer and serial is revoked by any
    /// loaded CRL (stale ones included: a revocation is never undone).
    pub(crate) fn is_revoked(&self, issuer: &[u8], serial: &[u8]) -> bool {
        self.crls
            .iter()
            .any(|c| c.issuer == issuer && c.serials.contains(serial))
    }

    /// The CRLs that may vouch for a certificate's status at `now`: all of
    /// them, except that when unknown status is refused a CRL past its
    /// `nextUpdate` no longer counts (its issuer's certificates become
    /// unknown). Revoked serials are checked separately, over every CRL.
    pub(crate) fn status_crls(&self, now: i64) -> Vec<&CertRevocationList<'static>> {
        self.crls
            .iter()
            .filter(|c| self.unknown_status == UnknownStatus::Accept || !c.is_stale(now))
            .map(|c| &c.crl)
            .collect()
    }

    /// Whether a CRL of `issuer` is loaded but past its `nextUpdate`.
    pub(crate) fn has_stale_crl(&self, issuer: &[u8], now: i64) -> bool {
        self.crls.iter().any(|c| c.issuer == issuer && c.is_stale(now))
    }
}

/// The current trust, shared by every verifier; replaced whole.
#[derive(Debug)]
pub struct TrustStore {
    current: RwLock<Arc<TrustSnapshot>>,
    changes: watch::Sender<u64>,
}

impl TrustStore {
    /// A store starting at `snapshot`.
    pub fn new(snapshot: TrustSnapshot) -> Arc<TrustStore> {
        let (changes, _) = watch::channel(snapshot.generation);
        Arc::new(TrustStore {
            current: RwLock::new(Arc::new(snapshot)),
            changes,
        })
    }

    /// The current snapshot.
    pub(crate) fn current(&self) -> Arc<TrustSnapshot> {
        self.current.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Replaces the snapshot and wakes watchers (the revocation sweeper).
    pub fn replace(&self, mut snapshot: TrustSnapshot) {
        let mut cur = self.current.write().unwrap_or_else(|e| e.into_inner());
        snapshot.generation = cur.generation + 1;
        let generation = snapshot.generation;
        *cur = Arc::new(snapshot);
        drop(cur);
        self.changes.send_replace(generation);
    }

    /// A receiver that wakes on every change.
    pub(crate) fn subscribe(&self) -> watch::Receiver<u64> {
        self.changes.subscribe()
    }
}

/// Reads the CRLs in a file, PEM or DER.
pub(crate) fn read_crl_ders(path: &Path) -> Result<Vec<Vec<u8>>, String> {
    let bytes = std::fs::read(path).map_err(|e| e.to_string())?;
    if bytes.starts_with(b"-----") || bytes.iter().take(64).all(|b| b.is_ascii()) {
        let crls: Vec<_> = CertificateRevocationListDer::pem_slice_iter(&bytes)
            .collect::<Result<_, _>>()
            .map_err(|e| format!("bad PEM: {e:?}"))?;
        if crls.is_empty() {
            return Err("no X509 CRL block in PEM file".into());
        }
        return Ok(crls.into_iter().map(|c| c.as_ref().to_vec()).collect());
    }
    Ok(vec![bytes])
}

#[cfg(any(test, feature = "testing"))]
/// Parses and checks one CRL file: every CRL in it must be signed by one
/// of `issuers` (the roots and our CA chain).
pub fn load_crl_file(path: &Path, issuers: &[CertificateDer<'static>]) -> Result<Vec<LoadedCrl>, String> {
    validate_crls(&read_crl_ders(path)?, issuers)
}

pub(crate) fn validate_crls(ders: &[Vec<u8>], issuers: &[CertificateDer<'static>]) -> Result<Vec<LoadedCrl>, String> {
    let mut out = Vec::new();
    for der in ders {
        let (_, parsed) = x509_parser::revocation_list::CertificateRevocationList::from_der(der)
            .map_err(|e| format!("not an X.509 CRL: {e}"))?;
        let issuer_raw = parsed.issuer().as_raw().to_vec();
        let signed = issuers.iter().any(|c| {
            X509Certificate::from_der(c.as_ref()).is_ok_and(|(_, cert)| {
                cert.subject().as_raw() == issuer_raw.as_slice() && parsed.verify_signature(cert.public_key()).is_ok()
            })
        });
        if !signed {
            return Err(format!(
                "CRL issued by {} is not signed by a trusted CA",
                parsed.issuer()
            ));
        }
        let serials = parsed
            .iter_revoked_certificates()
            .map(|r| r.raw_serial().to_vec())
            .collect();
        let owned = OwnedCertRevocationList::from_der(der).map_err(|e| format!("CRL rejected: {e:?}"))?;
        out.push(LoadedCrl {
            issuer: issuer_raw,
            serials,
            number: parsed.crl_number().cloned(),
            next_update: parsed.next_update().map(|t| t.timestamp()),
            crl: CertRevocationList::Owned(owned),
        });
    }
    Ok(out)
}

/// A polled file: reread when (inode, size, mtime) changes.
#[derive(Debug, Default)]
pub(crate) struct WatchedFile {
    /// Path.
    pub(crate) path: PathBuf,
    stamp: Option<(u64, u64, i64, i64)>,
}

impl WatchedFile {
    /// A file to watch.
    pub(crate) fn new(path: PathBuf) -> Self {
        WatchedFile { path, stamp: None }
    }

    /// True when the file changed (or appeared, or vanished) since the last call.
    pub(crate) fn changed(&mut self) -> bool {
        let now = std::fs::metadata(&self.path)
            .ok()
            .map(|m| (m.ino(), m.size(), m.mtime(), m.mtime_nsec()));
        if now == self.stamp {
            return false;
        }
        self.stamp = now;
        true
    }
}

/// What is kept of one CRL of a file between reloads.
#[derive(Clone, Debug)]
struct GoodCrl {
    der: Vec<u8>,
    issuer: Vec<u8>,
    issuer_name: String,
    number: Option<BigUint>,
    next_update: Option<i64>,
}

/// The file-backed sources of trust and their last good contents.
#[derive(Debug)]
pub struct TrustSources {
    /// CRL files.
    pub(crate) crl_files: Vec<WatchedFile>,
    /// The deny list file.
    pub(crate) deny_file: Option<WatchedFile>,
    /// Each file's last good CRLs.
    crl_good: BTreeMap<PathBuf, Vec<GoodCrl>>,
    deny_good: DenyList,
    /// Current problems, by file.
    pub(crate) problems: BTreeMap<PathBuf, String>,
    /// Files holding a CRL past its `nextUpdate`, reported once per change.
    stale: BTreeMap<PathBuf, String>,
    unknown_status: UnknownStatus,
}

impl TrustSources {
    /// Sources for the given files.
    pub fn new(crl_files: &[PathBuf], deny_file: Option<&Path>) -> Self {
        TrustSources {
            crl_files: crl_files.iter().cloned().map(WatchedFile::new).collect(),
            deny_file: deny_file.map(|p| WatchedFile::new(p.to_path_buf())),
            crl_good: BTreeMap::new(),
            deny_good: DenyList::default(),
            problems: BTreeMap::new(),
            stale: BTreeMap::new(),
            unknown_status: UnknownStatus::Accept,
        }
    }

    /// Sets the policy for unknown revocation status: with `Refuse`, a
    /// stale CRL refuses certificates and is shown in readiness.
    pub fn with_unknown_status(mut self, status: UnknownStatus) -> Self {
        self.unknown_status = status;
        self
    }

    /// Re-reads changed files (all of them when `force`). Returns true when
    /// the good contents changed.
    pub fn refresh(&mut self, issuers: &[CertificateDer<'static>], force: bool) -> bool {
        let mut changed = false;
        for f in &mut self.crl_files {
            if !f.changed() && !force {
                continue;
            }
            let loaded = read_crl_ders(&f.path).and_then(|ders| validate_crls(&ders, issuers).map(|c| (ders, c)));
            match loaded {
                Ok((ders, crls)) => {
                    let fresh: Vec<GoodCrl> = ders
                        .into_iter()
                        .zip(&crls)
                        .map(|(der, c)| GoodCrl {
                            der,
                            issuer: c.issuer.clone(),
                            issuer_name: issuer_name(&c.issuer),
                            number: c.number.clone(),
                            next_update: c.next_update,
                        })
                        .collect();
                    let previous = self.crl_good.get(&f.path).map(Vec::as_slice).unwrap_or_default();
                    let (kept, rollbacks) = keep_newer(previous, fresh);
                    if rollbacks.is_empty() {
                        if self.problems.remove(&f.path).is_some() {
                            tracing::info!(file = %f.path.display(), "CRL is valid again");
                        }
                    } else {
                        let msg = format!("CRL rollback refused, keeping the newer CRL: {}", rollbacks.join("; "));
                        tracing::error!(file = %f.path.display(), "{msg}");
                        self.problems.insert(f.path.clone(), msg);
                    }
                    self.stale.remove(&f.path);
                    tracing::info!(file = %f.path.display(), crls = crls.len(), revoked = crls.iter().map(|c| c.serials.len()).sum::<usize>(), "CRL loaded");
                    self.crl_good.insert(f.path.clone(), kept);
                    changed = true;
                }
                Err(e) => {
                    tracing::error!(file = %f.path.display(), "rejected CRL, keeping the previous one: {e}");
                    self.problems.insert(f.path.clone(), format!("CRL rejected: {e}"));
                }
            }
        }
        if let Some(f) = &mut self.deny_file
            && (f.changed() || force)
        {
            match std::fs::read_to_string(&f.path) {
                Ok(text) => {
                    let (list, errors) = DenyList::parse(&f.path, &text);
                    if errors.is_empty() {
                        self.problems.remove(&f.path);
                    } else {
                        for e in &errors {
                            tracing::error!(file = %f.path.display(), "ignoring deny-list line: {e}");
                        }
                        self.problems.insert(f.path.clone(), errors.join("; "));
                    }
                    tracing::info!(file = %f.path.display(), entries = list.entries.len(), "identity deny list loaded");
                    changed |= list != self.deny_good;
                    self.deny_good = list;
                }
                Err(e) => {
                    tracing::error!(file = %f.path.display(), "cannot read deny list, keeping the previous one: {e}");
                    self.problems.insert(f.path.clone(), e.to_string());
                }
            }
        }
        changed
    }

    /// Reports, once per file version, CRLs whose `nextUpdate` has passed
    /// at `now`. Returns true when a file became stale, so the caller can
    /// rebuild the snapshot (and sweep live connections) at once.
    pub fn check_stale(&mut self, now: i64) -> bool {
        let mut newly = false;
        for (path, crls) in &self.crl_good {
            if self.stale.contains_key(path) {
                continue;
            }
            let stale: Vec<String> = crls
                .iter()
                .filter(|c| c.next_update.is_some_and(|t| t <= now))
                .map(|c| c.issuer_name.clone())
                .collect();
            if stale.is_empty() {
                continue;
            }
            let refused = if self.unknown_status == UnknownStatus::Refuse {
                "; certificates it speaks for are refused (--revocation-unknown refuse)"
            } else {
                ""
            };
            let msg = format!("CRL of {} is past its nextUpdate{refused}", stale.join(", "));
            tracing::warn!(file = %path.display(), "{msg}");
            self.stale.insert(path.clone(), msg);
            newly = true;
        }
        newly
    }

    /// Builds a snapshot from the good contents on top of `base`. CRLs are
    /// re-validated against the current issuers: a CRL whose signer left
    /// the bundle stops counting.
    pub fn apply(&self, mut base: TrustSnapshot, issuers: &[CertificateDer<'static>]) -> TrustSnapshot {
        for (path, good) in &self.crl_good {
            let ders: Vec<Vec<u8>> = good.iter().map(|c| c.der.clone()).collect();
            match validate_crls(&ders, issuers) {
                Ok(crls) => base.crls.extend(crls),
                Err(e) => tracing::warn!(file = %path.display(), "CRL no longer applies: {e}"),
            }
        }
        base.deny = self.deny_good.clone();
        base
    }

    /// Problems with trust files, for readiness. A stale CRL is one only
    /// when it refuses certificates (unknown status refused).
    pub fn problems(&self) -> Vec<String> {
        let stale = self
            .stale
            .iter()
            .filter(|_| self.unknown_status == UnknownStatus::Refuse);
        self.problems
            .iter()
            .chain(stale)
            .map(|(p, e)| format!("{}: {e}", p.display()))
            .collect()
    }
}

/// A DER name for messages.
fn issuer_name(raw: &[u8]) -> String {
    x509_parser::x509::X509Name::from_der(raw)
        .map(|(_, n)| n.to_string())
        .unwrap_or_else(|_| "an unparsable issuer".into())
}

/// The CRLs a reloaded file puts in force: its new ones, except that for an
/// issuer whose previous CRL number is higher than any new one, the
/// previous CRLs are kept (a rollback). Also returns each rollback, described.
fn keep_newer(previous: &[GoodCrl], fresh: Vec<GoodCrl>) -> (Vec<GoodCrl>, Vec<String>) {
    let newest = |crls: &[GoodCrl], issuer: &[u8]| {
        crls.iter()
            .filter(|c| c.issuer == issuer)
            .map(|c| c.number.clone())
            .max()
    };
    let mut rolled_back: Vec<Vec<u8>> = Vec::new();
    let mut reports = Vec::new();
    for c in &fresh {
        if rolled_back.contains(&c.issuer) {
            continue;
        }
        // `None` (no CRL number) sorts below every number.
        if let (Some(old), Some(new)) = (newest(previous, &c.issuer), newest(&fresh, &c.issuer))
            && old > new
        {
            let show = |n: Option<BigUint>| n.map(|n| n.to_string()).unwrap_or_else(|| "none".into());
            reports.push(format!(
                "{}: CRL number {} is older than the loaded {}",
                c.issuer_name,
                show(new),
                show(old)
            ));
            rolled_back.push(c.issuer.clone());
        }
    }
    let mut kept: Vec<GoodCrl> = fresh.into_iter().filter(|c| !rolled_back.contains(&c.issuer)).collect();
    kept.extend(previous.iter().filter(|c| rolled_back.contains(&c.issuer)).cloned());
    (kept, reports)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deny_list_takes_ids_and_namespace_patterns_and_reports_bad_lines() {
        let text = "# compromised\nspiffe://cluster.local/ns/shop/sa/web\nns/payments/*\nnot an id\n\n";
        let (list, errors) = DenyList::parse(Path::new("deny.txt"), text);
        assert_eq!(list.entries.len(), 2);
        assert_eq!(errors.len(), 1);
        assert!(errors[0].starts_with("deny.txt:4:"), "{errors:?}");
        assert!(list.denies(&Identity::new("cluster.local", "shop", "web")));
        assert!(!list.denies(&Identity::new("cluster.local", "shop", "api")));
        assert!(list.denies(&Identity::new("cluster.local", "payments", "anything")));
    }
}
