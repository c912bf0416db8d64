//! The certificate authority: a directory in the layout of Istio's plug-in
//! CA (`ca-cert.pem`, `ca-key.pem`, `root-cert.pem`, `cert-chain.pem`), so
//! an operator's existing `cacerts` secret works unchanged.
//!
//! Workload keys are ECDSA P-256, generated in memory and never written.

#![forbid(unsafe_code)]

use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use rcgen::{
    BasicConstraints, CertificateParams, CertificateRevocationListParams, DistinguishedName, DnType,
    ExtendedKeyUsagePurpose, IsCa, Issuer, KeyIdMethod, KeyPair, KeyUsagePurpose, RevokedCertParams, SanType,
    SerialNumber,
};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivatePkcs8KeyDer};
use x509_parser::prelude::{FromDer, X509Certificate};

use super::Identity;

/// The signing certificate (an intermediate, or the root itself).
pub const CA_CERT: &str = "ca-cert.pem";
/// The signing certificate's private key (PKCS#8).
pub const CA_KEY: &str = "ca-key.pem";
/// The trust bundle: one or more roots.
pub const ROOT_CERT: &str = "root-cert.pem";
/// The signing certificate's chain up to the root.
pub const CERT_CHAIN: &str = "cert-chain.pem";
/// The root's private key, written by `ca init`; keep it offline.
pub const ROOT_KEY: &str = "root-key.pem";
/// The CRL written by `ca revoke` for certificates the signing CA issued.
pub const CA_CRL: &str = "ca-crl.pem";
/// The CRL written by `ca revoke --root` for intermediates.
pub const ROOT_CRL: &str = "root-crl.pem";

/// Problems with CA material; each names the file.
#[derive(Debug, thiserror::Error)]
pub enum CaError {
    /// A file could not be read.
    #[error("{file}: {source}")]
    Read {
        /// The file.
        file: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// A file is not what it should be.
    #[error("{file}: {message}")]
    Invalid {
        /// The file.
        file: PathBuf,
        /// What is wrong.
        message: String,
    },
    /// The key does not belong to the certificate.
    #[error("{key} does not match the public key of {cert}")]
    KeyMismatch {
        /// The certificate file.
        cert: PathBuf,
        /// The key file.
        key: PathBuf,
    },
    /// Signing failed.
    #[error("signing: {0}")]
    Sign(String),
    /// A file could not be written.
    #[error("writing {file}: {source}")]
    Write {
        /// The file.
        file: PathBuf,
        /// Why.
        source: std::io::Error,
    },
}

/// A workload certificate with its chain and in-memory key.
pub struct IssuedCert {
    /// Leaf first, then the intermediates (never the root).
    pub chain: Vec<CertificateDer<'static>>,
    /// The private key, PKCS#8; it only ever lives in memory.
    pub key: PrivatePkcs8KeyDer<'static>,
    /// When it expires.
    pub not_after: SystemTime,
    /// Serial number bytes (big-endian).
    pub serial: Vec<u8>,
}

impl std::fmt::Debug for IssuedCert {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never print the key.
        f.debug_struct("IssuedCert")
            .field("serial", &hex(&self.serial))
            .field("not_after", &self.not_after)
            .finish_non_exhaustive()
    }
}

/// A loaded, validated CA directory.
pub struct Authority {
    issuer: Issuer<'static, KeyPair>,
    chain: Vec<CertificateDer<'static>>,
    roots: Vec<CertificateDer<'static>>,
    fingerprint: String,
}

impl std::fmt::Debug for Authority {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Authority")
            .field("fingerprint", &self.fingerprint)
            .finish_non_exhaustive()
    }
}

impl Authority {
    /// Loads and validates a CA directory: readable files, a CA certificate
    /// valid now whose key is the one in `ca-key.pem`, and a chain that
    /// reaches a root of `root-cert.pem`.
    pub fn load(dir: &Path) -> Result<Authority, CaError> {
        let cert_path = dir.join(CA_CERT);
        let key_path = dir.join(CA_KEY);
        let ca_pem = read_string(&cert_path)?;
        let ca_cert = first_cert(&cert_path, ca_pem.as_bytes())?;
        let key_pem = read_string(&key_path)?;
        let key = KeyPair::from_pem(&key_pem).map_err(|e| CaError::Invalid {
            file: key_path.clone(),
            message: format!("not a PKCS#8 private key ({e}); convert with `openssl pkcs8 -topk8 -nocrypt`"),
        })?;
        let roots = read_certs(&dir.join(ROOT_CERT))?;
        let chain_path = dir.join(CERT_CHAIN);
        let extra = if chain_path.exists() {
            read_certs(&chain_path)?
        } else {
            Vec::new()
        };

        let parsed = parse(&cert_path, &ca_cert)?;
        check_ca(&cert_path, &parsed)?;
        check_validity(&cert_path, &parsed)?;
        if key.public_key_raw() != &*parsed.tbs_certificate.subject_pki.subject_public_key.data {
            return Err(CaError::KeyMismatch {
                cert: cert_path,
                key: key_path,
            });
        }
        for r in &roots {
            let p = parse(&dir.join(ROOT_CERT), r)?;
            check_ca(&dir.join(ROOT_CERT), &p)?;
        }

        // The chain we send: ca-cert, then cert-chain's intermediates, never a root.
        let mut chain = vec![ca_cert.clone()];
        for c in extra {
            let p = parse(&chain_path, &c)?;
            if c != ca_cert && !is_self_signed(&p) {
                chain.push(c);
            }
        }
        verify_chain_to_roots(dir, &chain, &roots)?;

        let issuer = Issuer::from_ca_cert_der(&ca_cert, key).map_err(|e| CaError::Invalid {
            file: cert_path,
            message: e.to_string(),
        })?;
        Ok(Authority {
            issuer,
            chain,
            roots,
            fingerprint: sha256_hex(&ca_cert),
        })
    }

    /// The trust bundle of this CA directory.
    pub fn roots(&self) -> &[CertificateDer<'static>] {
        &self.roots
    }

    /// The signing certificate and intermediates sent after a leaf.
    pub fn chain(&self) -> &[CertificateDer<'static>] {
        &self.chain
    }

    /// SHA-256 of the signing certificate.
    pub fn fingerprint(&self) -> &str {
        &self.fingerprint
    }

    /// Issues an X.509-SVID for `id`, valid from one minute ago (clock
    /// skew) for `lifetime`.
    pub fn issue(&self, id: &Identity, lifetime: Duration) -> Result<IssuedCert, CaError> {
        let now = SystemTime::now();
        let not_after = now + lifetime;
        let (cert, key, serial) = self.issue_with(|params| {
            params.subject_alt_names = vec![SanType::URI(
                id.to_string()
                    .try_into()
                    .map_err(|e: rcgen::Error| CaError::Sign(e.to_string()))?,
            )];
            params.not_before = (now - Duration::from_secs(60)).into();
            params.not_after = not_after.into();
            Ok(())
        })?;
        let mut chain = vec![cert];
        chain.extend(self.chain.iter().cloned());
        Ok(IssuedCert {
            chain,
            key,
            not_after,
            serial,
        })
    }

    /// Issues a leaf with the SVID defaults, adjusted by `customise`. Tests
    /// use it to make certificates that break one rule at a time.
    pub fn issue_with(
        &self,
        customise: impl FnOnce(&mut CertificateParams) -> Result<(), CaError>,
    ) -> Result<(CertificateDer<'static>, PrivatePkcs8KeyDer<'static>, Vec<u8>), CaError> {
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).map_err(|e| CaError::Sign(e.to_string()))?;
        let serial = random_serial();
        let mut params = CertificateParams::default();
        params.distinguished_name = DistinguishedName::new();
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth, ExtendedKeyUsagePurpose::ClientAuth];
        params.use_authority_key_identifier_extension = true;
        params.serial_number = Some(SerialNumber::from_slice(&serial));
        customise(&mut params)?;
        let cert = params
            .signed_by(&key, &self.issuer)
            .map_err(|e| CaError::Sign(e.to_string()))?;
        let key = PrivatePkcs8KeyDer::from(key.serialize_der());
        Ok((cert.der().clone(), key, serial))
    }
}

/// What `ca init` and `ca intermediate` wrote.
#[derive(Debug)]
pub struct Written {
    /// (file, SHA-256 fingerprint for certificates).
    pub files: Vec<(PathBuf, Option<String>)>,
}

impl std::fmt::Display for Written {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        for (path, fp) in &self.files {
            match fp {
                Some(fp) => writeln!(f, "wrote {}  sha256:{fp}", path.display())?,
                None => writeln!(f, "wrote {}  (private key, mode 0600)", path.display())?,
            }
        }
        Ok(())
    }
}

/// `nodeward ca init`: a root and an intermediate for trying things out.
pub fn init(out: &Path) -> Result<Written, CaError> {
    std::fs::create_dir_all(out).map_err(|source| CaError::Write {
        file: out.to_path_buf(),
        source,
    })?;
    let root_key = new_key()?;
    let root_params = ca_params("Nodeward Root CA", Duration::from_secs(10 * 365 * 86400));
    let root = root_params
        .self_signed(&root_key)
        .map_err(|e| CaError::Sign(e.to_string()))?;
    let root_issuer = Issuer::new(root_params, root_key);
    let int_key = new_key()?;
    let int = ca_params("Nodeward Intermediate CA", Duration::from_secs(5 * 365 * 86400))
        .signed_by(&int_key, &root_issuer)
        .map_err(|e| CaError::Sign(e.to_string()))?;
    let mut w = Written { files: Vec::new() };
    write_cert(&mut w, &out.join(ROOT_CERT), &[root.der()])?;
    write_key(&mut w, &out.join(ROOT_KEY), &root_issuer.key().serialize_pem())?;
    write_cert(&mut w, &out.join(CA_CERT), &[int.der()])?;
    write_key(&mut w, &out.join(CA_KEY), &int_key.serialize_pem())?;
    write_cert(&mut w, &out.join(CERT_CHAIN), &[int.der(), root.der()])?;
    Ok(w)
}

/// Which key signs a new intermediate.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Signer {
    /// `root-cert.pem` + `root-key.pem`: a sibling of the existing intermediate.
    Root,
    /// `ca-cert.pem` + `ca-key.pem`: one level deeper.
    Intermediate,
}

/// `nodeward ca intermediate`: a further intermediate in `out`, signed from `from`.
pub fn intermediate(from: &Path, signer: Signer, out: &Path) -> Result<Written, CaError> {
    let (cert_file, key_file) = match signer {
        Signer::Root => (ROOT_CERT, ROOT_KEY),
        Signer::Intermediate => (CA_CERT, CA_KEY),
    };
    let issuer = load_issuer(&from.join(cert_file), &from.join(key_file))?;
    std::fs::create_dir_all(out).map_err(|source| CaError::Write {
        file: out.to_path_buf(),
        source,
    })?;
    let key = new_key()?;
    let cert = ca_params("Nodeward Intermediate CA", Duration::from_secs(5 * 365 * 86400))
        .signed_by(&key, &issuer)
        .map_err(|e| CaError::Sign(e.to_string()))?;
    let roots = read_certs(&from.join(ROOT_CERT))?;
    let mut chain: Vec<CertificateDer<'static>> = vec![cert.der().clone()];
    match signer {
        Signer::Root => chain.extend(roots.iter().cloned()),
        Signer::Intermediate => {
            let parent_chain = from.join(CERT_CHAIN);
            if parent_chain.exists() {
                chain.extend(read_certs(&parent_chain)?);
            } else {
                chain.push(first_cert(
                    &from.join(CA_CERT),
                    read_string(&from.join(CA_CERT))?.as_bytes(),
                )?);
            }
        }
    }
    let mut w = Written { files: Vec::new() };
    write_cert(&mut w, &out.join(CA_CERT), &[cert.der()])?;
    write_key(&mut w, &out.join(CA_KEY), &key.serialize_pem())?;
    let chain_refs: Vec<&CertificateDer<'_>> = chain.iter().collect();
    write_cert(&mut w, &out.join(CERT_CHAIN), &chain_refs)?;
    let root_refs: Vec<&CertificateDer<'_>> = roots.iter().collect();
    write_cert(&mut w, &out.join(ROOT_CERT), &root_refs)?;
    Ok(w)
}

/// `nodeward ca revoke`: adds serials to the CRL of the signing CA (or of
/// the root with `Signer::Root`) and re-signs it. Returns the CRL's path and
/// how many serials it now lists.
pub fn revoke(dir: &Path, signer: Signer, serials: &[String]) -> Result<(PathBuf, usize), CaError> {
    let (cert_file, key_file, crl_file) = match signer {
        Signer::Root => (ROOT_CERT, ROOT_KEY, ROOT_CRL),
        Signer::Intermediate => (CA_CERT, CA_KEY, CA_CRL),
    };
    let issuer = load_issuer(&dir.join(cert_file), &dir.join(key_file))?;
    let crl_path = dir.join(crl_file);
    let (mut revoked, number) = if crl_path.exists() {
        existing_crl(&crl_path)?
    } else {
        (Vec::new(), 0u64)
    };
    let now = time::OffsetDateTime::now_utc();
    for s in serials {
        let bytes = parse_serial(s).ok_or_else(|| CaError::Invalid {
            file: crl_path.clone(),
            message: format!("{s:?} is not a hexadecimal serial number"),
        })?;
        if !revoked.iter().any(|(b, _)| *b == bytes) {
            revoked.push((bytes, now));
        }
    }
    let params = CertificateRevocationListParams {
        this_update: now,
        next_update: now + time::Duration::days(7),
        crl_number: SerialNumber::from_slice(&(number + 1).to_be_bytes()),
        issuing_distribution_point: None,
        revoked_certs: revoked
            .iter()
            .map(|(serial, at)| RevokedCertParams {
                serial_number: SerialNumber::from_slice(serial),
                revocation_time: *at,
                reason_code: None,
                invalidity_date: None,
            })
            .collect(),
        key_identifier_method: KeyIdMethod::Sha256,
    };
    let crl = params.signed_by(&issuer).map_err(|e| CaError::Sign(e.to_string()))?;
    let pem = crl.pem().map_err(|e| CaError::Sign(e.to_string()))?;
    std::fs::write(&crl_path, pem).map_err(|source| CaError::Write {
        file: crl_path.clone(),
        source,
    })?;
    Ok((crl_path, revoked.len()))
}

/// Serials with their revocation times.
type RevokedSerials = Vec<(Vec<u8>, time::OffsetDateTime)>;

fn existing_crl(path: &Path) -> Result<(RevokedSerials, u64), CaError> {
    let ders = crate::identity::trust::read_crl_ders(path).map_err(|message| CaError::Invalid {
        file: path.to_path_buf(),
        message,
    })?;
    let der = ders.first().ok_or_else(|| CaError::Invalid {
        file: path.to_path_buf(),
        message: "no CRL in file".into(),
    })?;
    let (_, crl) =
        x509_parser::revocation_list::CertificateRevocationList::from_der(der).map_err(|e| CaError::Invalid {
            file: path.to_path_buf(),
            message: e.to_string(),
        })?;
    let revoked = crl
        .iter_revoked_certificates()
        .map(|r| {
            let at = time::OffsetDateTime::from_unix_timestamp(r.revocation_date.timestamp())
                .unwrap_or_else(|_| time::OffsetDateTime::now_utc());
            (r.raw_serial().to_vec(), at)
        })
        .collect();
    let number = crl
        .crl_number()
        .map(|n| n.to_u64_digits().first().copied().unwrap_or(0))
        .unwrap_or(0);
    Ok((revoked, number))
}

/// Parses `4f:a2:...` or `4fa2...` into bytes.
pub fn parse_serial(s: &str) -> Option<Vec<u8>> {
    let hex: String = s.chars().filter(|c| *c != ':').collect();
    if hex.is_empty() || hex.len() % 2 == 1 {
        return None;
    }
    (0..hex.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&hex[i..i + 2], 16).ok())
        .collect()
}

/// Bytes as lowercase hex.
pub fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// SHA-256 of DER bytes, hex with colons as `openssl x509 -fingerprint` prints.
pub fn sha256_hex(der: &[u8]) -> String {
    let d = ring::digest::digest(&ring::digest::SHA256, der);
    d.as_ref()
        .iter()
        .map(|x| format!("{x:02X}"))
        .collect::<Vec<_>>()
        .join(":")
}

fn random_serial() -> Vec<u8> {
    use ring::rand::SecureRandom;
    let mut b = [0u8; 16];
    ring::rand::SystemRandom::new().fill(&mut b).expect("system randomness");
    b[0] &= 0x7f; // positive
    b[0] |= 0x01; // no leading zero byte to strip
    b.to_vec()
}

fn new_key() -> Result<KeyPair, CaError> {
    KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).map_err(|e| CaError::Sign(e.to_string()))
}

/// Parameters of a CA certificate. The common name gets a random suffix:
/// CAs with equal names would make CRL and chain matching by name ambiguous.
fn ca_params(cn: &str, lifetime: Duration) -> CertificateParams {
    let mut p = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::OrganizationName, "Nodeward");
    dn.push(DnType::CommonName, format!("{cn} {}", &hex(&random_serial())[..8]));
    p.distinguished_name = dn;
    p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    p.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    let now = SystemTime::now();
    p.not_before = (now - Duration::from_secs(3600)).into();
    p.not_after = (now + lifetime).into();
    p.serial_number = Some(SerialNumber::from_slice(&random_serial()));
    p.use_authority_key_identifier_extension = true;
    p
}

fn load_issuer(cert: &Path, key: &Path) -> Result<Issuer<'static, KeyPair>, CaError> {
    let key_pem = read_string(key)?;
    let kp = KeyPair::from_pem(&key_pem).map_err(|e| CaError::Invalid {
        file: key.to_path_buf(),
        message: format!("not a PKCS#8 private key: {e}"),
    })?;
    let der = first_cert(cert, read_string(cert)?.as_bytes())?;
    let parsed = parse(cert, &der)?;
    if kp.public_key_raw() != &*parsed.tbs_certificate.subject_pki.subject_public_key.data {
        return Err(CaError::KeyMismatch {
            cert: cert.to_path_buf(),
            key: key.to_path_buf(),
        });
    }
    Issuer::from_ca_cert_der(&der, kp).map_err(|e| CaError::Invalid {
        file: cert.to_path_buf(),
        message: e.to_string(),
    })
}

fn read_string(path: &Path) -> Result<String, CaError> {
    std::fs::read_to_string(path).map_err(|source| CaError::Read {
        file: path.to_path_buf(),
        source,
    })
}

/// All certificates of a PEM file; at least one.
pub fn read_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, CaError> {
    let pem = std::fs::read(path).map_err(|source| CaError::Read {
        file: path.to_path_buf(),
        source,
    })?;
    let certs: Vec<_> = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<_, _>>()
        .map_err(|e| CaError::Invalid {
            file: path.to_path_buf(),
            message: format!("bad PEM: {e:?}"),
        })?;
    if certs.is_empty() {
        return Err(CaError::Invalid {
            file: path.to_path_buf(),
            message: "no certificate in file".into(),
        });
    }
    for c in &certs {
        parse(path, c)?;
    }
    Ok(certs)
}

fn first_cert(path: &Path, pem: &[u8]) -> Result<CertificateDer<'static>, CaError> {
    CertificateDer::pem_slice_iter(pem)
        .next()
        .and_then(Result::ok)
        .ok_or_else(|| CaError::Invalid {
            file: path.to_path_buf(),
            message: "no PEM certificate in file".into(),
        })
}

fn parse<'a>(path: &Path, der: &'a CertificateDer<'_>) -> Result<X509Certificate<'a>, CaError> {
    X509Certificate::from_der(der.as_ref())
        .map(|(_, c)| c)
        .map_err(|e| CaError::Invalid {
            file: path.to_path_buf(),
            message: format!("not an X.509 certificate: {e}"),
        })
}

fn check_ca(path: &Path, c: &X509Certificate<'_>) -> Result<(), CaError> {
    if !c.is_ca() {
        return Err(CaError::Invalid {
            file: path.to_path_buf(),
            message: format!("{} is not a CA certificate (basicConstraints CA:FALSE)", c.subject()),
        });
    }
    Ok(())
}

fn check_validity(path: &Path, c: &X509Certificate<'_>) -> Result<(), CaError> {
    let v = c.validity();
    if !v.is_valid() {
        return Err(CaError::Invalid {
            file: path.to_path_buf(),
            message: format!(
                "certificate is not valid now (valid from {} to {})",
                v.not_before, v.not_after
            ),
        });
    }
    Ok(())
}

fn is_self_signed(c: &X509Certificate<'_>) -> bool {
    c.subject().as_raw() == c.issuer().as_raw() && c.verify_signature(None).is_ok()
}

fn verify_chain_to_roots(
    dir: &Path,
    chain: &[CertificateDer<'static>],
    roots: &[CertificateDer<'static>],
) -> Result<(), CaError> {
    let chain_file = dir.join(CERT_CHAIN);
    let parsed: Vec<X509Certificate<'_>> = chain.iter().map(|c| parse(&chain_file, c)).collect::<Result<_, _>>()?;
    for pair in parsed.windows(2) {
        let (child, parent) = (&pair[0], &pair[1]);
        if child.issuer().as_raw() != parent.subject().as_raw()
            || child.verify_signature(Some(parent.public_key())).is_err()
        {
            return Err(CaError::Invalid {
                file: chain_file,
                message: format!("{} is not issued by {}", child.subject(), parent.subject()),
            });
        }
    }
    let top = parsed.last().expect("chain has ca-cert");
    let root_file = dir.join(ROOT_CERT);
    for r in roots {
        let root = parse(&root_file, r)?;
        if chain.last() == Some(r)
            || (top.issuer().as_raw() == root.subject().as_raw()
                && top.verify_signature(Some(root.public_key())).is_ok())
        {
            return Ok(());
        }
    }
    Err(CaError::Invalid {
        file: root_file,
        message: format!(
            "no root in the bundle issued {} (issuer {})",
            top.subject(),
            top.issuer()
        ),
    })
}

fn write_cert(w: &mut Written, path: &Path, certs: &[&CertificateDer<'_>]) -> Result<(), CaError> {
    let mut pem = String::new();
    for c in certs {
        pem.push_str(&pem_encode("CERTIFICATE", c.as_ref()));
    }
    std::fs::write(path, pem).map_err(|source| CaError::Write {
        file: path.to_path_buf(),
        source,
    })?;
    w.files.push((path.to_path_buf(), Some(sha256_hex(certs[0].as_ref()))));
    Ok(())
}

fn write_key(w: &mut Written, path: &Path, pem: &str) -> Result<(), CaError> {
    use std::io::Write;
    let _ = std::fs::remove_file(path);
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .map_err(|source| CaError::Write {
            file: path.to_path_buf(),
            source,
        })?;
    f.write_all(pem.as_bytes()).map_err(|source| CaError::Write {
        file: path.to_path_buf(),
        source,
    })?;
    w.files.push((path.to_path_buf(), None));
    Ok(())
}

fn pem_encode(label: &str, der: &[u8]) -> String {
    const B64: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut b64 = String::new();
    for chunk in der.chunks(3) {
        let n = chunk
            .iter()
            .enumerate()
            .fold(0u32, |acc, (i, b)| acc | (u32::from(*b) << (16 - 8 * i)));
        for i in 0..4 {
            if i <= chunk.len() {
                b64.push(B64[((n >> (18 - 6 * i)) & 63) as usize] as char);
            } else {
                b64.push('=');
            }
        }
    }
    let mut out = format!("-----BEGIN {label}-----\n");
    for line in b64.as_bytes().chunks(64) {
        out.push_str(std::str::from_utf8(line).expect("base64 is ASCII"));
        out.push('\n');
    }
    out.push_str(&format!("-----END {label}-----\n"));
    out
}

/// PEM text of a certificate.
pub fn cert_pem(der: &CertificateDer<'_>) -> String {
    pem_encode("CERTIFICATE", der.as_ref())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tmp(tag: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("nodeward-ca-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        d
    }

    #[test]
    fn init_writes_a_loadable_ca_with_private_keys_hidden() {
        let d = tmp("init");
        let w = init(&d).unwrap();
        assert_eq!(w.files.len(), 5);
        let ca = Authority::load(&d).unwrap();
        assert_eq!(ca.chain().len(), 1, "the root is never sent");
        assert_eq!(ca.roots().len(), 1);
        use std::os::unix::fs::PermissionsExt;
        for k in [CA_KEY, ROOT_KEY] {
            let mode = std::fs::metadata(d.join(k)).unwrap().permissions().mode() & 0o777;
            assert_eq!(mode, 0o600, "{k}");
        }
        let _ = std::fs::remove_dir_all(&d);
    }

    #[test]
    fn mismatched_key_is_refused_naming_both_files() {
        let (a, b) = (tmp("mis-a"), tmp("mis-b"));
        init(&a).unwrap();
        init(&b).unwrap();
        std::fs::copy(b.join(CA_KEY), a.join(CA_KEY)).unwrap();
        let e = Authority::load(&a).unwrap_err().to_string();
        assert!(
            e.contains("ca-key.pem") && e.contains("ca-cert.pem") && e.contains("does not match"),
            "{e}"
        );
        let _ = (std::fs::remove_dir_all(&a), std::fs::remove_dir_all(&b));
    }

    #[test]
    fn unreadable_or_garbage_files_are_named() {
        let d = tmp("garbage");
        init(&d).unwrap();
        std::fs::write(d.join(CA_CERT), "garbage").unwrap();
        let e = Authority::load(&d).unwrap_err().to_string();
        assert!(e.contains("ca-cert.pem"), "{e}");
        std::fs::remove_file(d.join(CA_CERT)).unwrap();
        let e = Authority::load(&d).unwrap_err().to_string();
        assert!(e.contains("ca-cert.pem") && e.contains("No such file"), "{e}");
        let _ = std::fs::remove_dir_all(&d);
    }

    #[test]
    fn a_chain_from_another_root_is_refused() {
        let (a, b) = (tmp("root-a"), tmp("root-b"));
        init(&a).unwrap();
        init(&b).unwrap();
        std::fs::copy(b.join(ROOT_CERT), a.join(ROOT_CERT)).unwrap();
        let e = Authority::load(&a).unwrap_err().to_string();
        assert!(e.contains("root-cert.pem") || e.contains("cert-chain.pem"), "{e}");
        let _ = (std::fs::remove_dir_all(&a), std::fs::remove_dir_all(&b));
    }

    #[test]
    fn nested_intermediates_load_and_send_the_whole_chain() {
        let (a, b) = (tmp("nest-a"), tmp("nest-b"));
        init(&a).unwrap();
        intermediate(&a, Signer::Intermediate, &b).unwrap();
        let ca = Authority::load(&b).unwrap();
        assert_eq!(ca.chain().len(), 2, "both intermediates are sent");
        let leaf = ca
            .issue(&Identity::new("cluster.local", "x", "y"), Duration::from_secs(60))
            .unwrap();
        assert_eq!(leaf.chain.len(), 3);
        let _ = (std::fs::remove_dir_all(&a), std::fs::remove_dir_all(&b));
    }

    #[test]
    fn an_expired_signing_certificate_is_refused() {
        let d = tmp("expired");
        init(&d).unwrap();
        // Re-sign the intermediate with a validity that ended yesterday.
        let root = load_issuer(&d.join(ROOT_CERT), &d.join(ROOT_KEY)).unwrap();
        let key = new_key().unwrap();
        let mut params = ca_params("Expired Intermediate", Duration::from_secs(1));
        let now = SystemTime::now();
        params.not_before = (now - Duration::from_secs(2 * 86400)).into();
        params.not_after = (now - Duration::from_secs(86400)).into();
        let cert = params.signed_by(&key, &root).unwrap();
        std::fs::write(d.join(CA_CERT), cert.pem()).unwrap();
        std::fs::write(d.join(CA_KEY), key.serialize_pem()).unwrap();
        std::fs::write(d.join(CERT_CHAIN), cert.pem()).unwrap();
        let e = Authority::load(&d).unwrap_err().to_string();
        assert!(e.contains("ca-cert.pem") && e.contains("not valid now"), "{e}");
        let _ = std::fs::remove_dir_all(&d);
    }

    #[test]
    fn serials_parse_with_or_without_colons() {
        assert_eq!(parse_serial("4f:a2"), Some(vec![0x4f, 0xa2]));
        assert_eq!(parse_serial("4FA2"), Some(vec![0x4f, 0xa2]));
        assert_eq!(parse_serial("4fa"), None);
        assert_eq!(parse_serial("zz"), None);
    }

    #[test]
    fn pem_encoding_round_trips() {
        let d = tmp("pem");
        init(&d).unwrap();
        let certs = read_certs(&d.join(CERT_CHAIN)).unwrap();
        let again: Vec<_> = CertificateDer::pem_slice_iter(cert_pem(&certs[0]).as_bytes())
            .collect::<Result<_, _>>()
            .unwrap();
        assert_eq!(again, vec![certs[0].clone()]);
        let _ = std::fs::remove_dir_all(&d);
    }
}
