//! What the agent trusts, as one immutable snapshot replaced whole on change:
//! the roots (several, for root rotation), the CRLs (only those signed by a
//! CA we trust), and the identity deny list.
//!
//! Sources are files polled for changes. A file that becomes invalid keeps
//! its previous good content in force, and its error is reported once and
//! through readiness.

#![forbid(unsafe_code)]

use std::collections::{BTreeMap, HashSet};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, CertificateRevocationListDer};
use tokio::sync::watch;
use webpki::{CertRevocationList, OwnedCertRevocationList};
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
    pub fn parse(path: &Path, text: &str) -> (DenyList, Vec<String>) {
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
    pub fn denies(&self, id: &Identity) -> bool {
        self.entries.iter().any(|e| match e {
            DenyEntry::Exact(d) => d == id,
            DenyEntry::Namespace(ns) => *ns == id.namespace,
        })
    }
}

/// A CRL that passed validation, with an index for classifying refusals.
#[derive(Debug)]
pub struct LoadedCrl {
    /// The file it came from.
    pub file: PathBuf,
    /// Raw DER issuer name.
    pub issuer: Vec<u8>,
    /// Revoked serials.
    pub serials: HashSet<Vec<u8>>,
    /// For webpki.
    pub crl: CertRevocationList<'static>,
}

/// Everything a verification needs, immutable.
#[derive(Debug)]
pub struct TrustSnapshot {
    /// Our trust domain.
    pub trust_domain: String,
    /// Trusted roots.
    pub roots: Vec<CertificateDer<'static>>,
    /// Roots as webpki anchors.
    pub anchors: Vec<rustls::pki_types::TrustAnchor<'static>>,
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
    pub generation: u64,
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
            roots,
            anchors,
            known_intermediates,
            crls: Vec::new(),
            deny: DenyList::default(),
            unknown_status: UnknownStatus::Accept,
            generation: 0,
        }
    }

    /// Whether a certificate with this issuer and serial is revoked.
    pub fn is_revoked(&self, issuer: &[u8], serial: &[u8]) -> bool {
        self.crls
            .iter()
            .any(|c| c.issuer == issuer && c.serials.contains(serial))
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
    pub fn current(&self) -> Arc<TrustSnapshot> {
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
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.changes.subscribe()
    }
}

/// Reads the CRLs in a file, PEM or DER.
pub fn read_crl_ders(path: &Path) -> Result<Vec<Vec<u8>>, String> {
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

/// Parses and checks one CRL file: every CRL in it must be signed by one
/// of `issuers` (the roots and our CA chain).
pub fn load_crl_file(path: &Path, issuers: &[CertificateDer<'static>]) -> Result<Vec<LoadedCrl>, String> {
    validate_crls(path, &read_crl_ders(path)?, issuers)
}

fn validate_crls(path: &Path, ders: &[Vec<u8>], issuers: &[CertificateDer<'static>]) -> Result<Vec<LoadedCrl>, String> {
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
            file: path.to_path_buf(),
            issuer: issuer_raw,
            serials,
            crl: CertRevocationList::Owned(owned),
        });
    }
    Ok(out)
}

/// A polled file: reread when (inode, size, mtime) changes.
#[derive(Debug, Default)]
pub struct WatchedFile {
    /// Path.
    pub path: PathBuf,
    stamp: Option<(u64, u64, i64, i64)>,
}

impl WatchedFile {
    /// A file to watch.
    pub fn new(path: PathBuf) -> Self {
        WatchedFile { path, stamp: None }
    }

    /// True when the file changed (or appeared, or vanished) since the last call.
    pub fn changed(&mut self) -> bool {
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

/// The file-backed sources of trust and their last good contents.
#[derive(Debug)]
pub struct TrustSources {
    /// CRL files.
    pub crl_files: Vec<WatchedFile>,
    /// The deny list file.
    pub deny_file: Option<WatchedFile>,
    /// DER of each file's last good CRLs.
    crl_good: BTreeMap<PathBuf, Vec<Vec<u8>>>,
    deny_good: DenyList,
    /// Current problems, by file.
    pub problems: BTreeMap<PathBuf, String>,
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
        }
    }

    /// Re-reads changed files (all of them when `force`). Returns true when
    /// the good contents changed.
    pub fn refresh(&mut self, issuers: &[CertificateDer<'static>], force: bool) -> bool {
        let mut changed = false;
        for f in &mut self.crl_files {
            if !f.changed() && !force {
                continue;
            }
            let loaded =
                read_crl_ders(&f.path).and_then(|ders| validate_crls(&f.path, &ders, issuers).map(|c| (ders, c)));
            match loaded {
                Ok((ders, crls)) => {
                    if self.problems.remove(&f.path).is_some() {
                        tracing::info!(file = %f.path.display(), "CRL is valid again");
                    }
                    tracing::info!(file = %f.path.display(), crls = crls.len(), revoked = crls.iter().map(|c| c.serials.len()).sum::<usize>(), "CRL loaded");
                    self.crl_good.insert(f.path.clone(), ders);
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

    /// Builds a snapshot from the good contents on top of `base`. CRLs are
    /// re-validated against the current issuers: a CRL whose signer left
    /// the bundle stops counting.
    pub fn apply(&self, mut base: TrustSnapshot, issuers: &[CertificateDer<'static>]) -> TrustSnapshot {
        for (path, ders) in &self.crl_good {
            match validate_crls(path, ders, issuers) {
                Ok(crls) => base.crls.extend(crls),
                Err(e) => tracing::warn!(file = %path.display(), "CRL no longer applies: {e}"),
            }
        }
        base.deny = self.deny_good.clone();
        base
    }

    /// Problems with trust files, for readiness.
    pub fn problems(&self) -> Vec<String> {
        self.problems
            .iter()
            .map(|(p, e)| format!("{}: {e}", p.display()))
            .collect()
    }
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
