//! The CA the agent signs with at runtime: a CA directory loaded and
//! validated, and workload certificates (X.509-SVIDs) issued from it.
//!
//! Workload keys are ECDSA P-256, generated in memory and never written.

#![forbid(unsafe_code)]

use std::path::Path;
use std::time::{Duration, SystemTime};

use rcgen::{
    CertificateParams, DistinguishedName, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose, SanType,
    SerialNumber,
};
use rustls::pki_types::{CertificateDer, PrivatePkcs8KeyDer};
use x509_parser::prelude::X509Certificate;

use super::Identity;
use super::ca::{
    CA_CERT, CA_KEY, CERT_CHAIN, CaError, ROOT_CERT, check_ca, first_cert, hex, parse, random_serial, read_certs,
    read_string, refuse_foreign_keys, sha256_hex,
};

/// A workload certificate with its chain and in-memory key.
pub struct IssuedCert {
    /// Leaf first, then the intermediates (never the root).
    pub chain: Vec<CertificateDer<'static>>,
    /// The private key, PKCS#8; it only ever lives in memory.
    pub key: PrivatePkcs8KeyDer<'static>,
    /// When it expires.
    pub(crate) not_after: SystemTime,
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
    /// Loads and validates a CA directory: no private key but `ca-key.pem`
    /// in it ([`refuse_foreign_keys`]), readable files, a CA certificate
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
        refuse_foreign_keys(dir)?;
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
    pub(crate) fn fingerprint(&self) -> &str {
        &self.fingerprint
    }

    /// Issues an X.509-SVID for `id`, valid from one minute ago (clock
    /// skew) for `lifetime`, with a fresh in-memory key.
    pub fn issue(&self, id: &Identity, lifetime: Duration) -> Result<IssuedCert, CaError> {
        let now = SystemTime::now();
        let not_after = now + lifetime;
        let (cert, key, serial) = self.issue_with(|params| svid_params(params, id, now, not_after))?;
        let mut chain = vec![cert];
        chain.extend(self.chain.iter().cloned());
        Ok(IssuedCert {
            chain,
            key,
            not_after,
            serial,
        })
    }

    /// Issues an X.509-SVID for `id` over the public key of a PEM CSR (the
    /// CA service's path): the CSR's signature is checked and its key must
    /// be ECDSA P-256; its subject, SANs and extensions are ignored, never
    /// copied. Returns the leaf then the chain, and the serial.
    pub(crate) fn issue_for_csr(
        &self,
        id: &Identity,
        lifetime: Duration,
        csr_pem: &str,
    ) -> Result<(Vec<CertificateDer<'static>>, Vec<u8>), CaError> {
        let spki = csr_public_key(csr_pem)?;
        let now = SystemTime::now();
        let mut params = CertificateParams::default();
        base_params(&mut params);
        let serial = random_serial();
        params.serial_number = Some(SerialNumber::from_slice(&serial));
        svid_params(&mut params, id, now, now + lifetime)?;
        let cert = params
            .signed_by(&spki, &self.issuer)
            .map_err(|e| CaError::Sign(e.to_string()))?;
        let mut chain = vec![cert.der().clone()];
        chain.extend(self.chain.iter().cloned());
        Ok((chain, serial))
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
        base_params(&mut params);
        params.serial_number = Some(SerialNumber::from_slice(&serial));
        customise(&mut params)?;
        let cert = params
            .signed_by(&key, &self.issuer)
            .map_err(|e| CaError::Sign(e.to_string()))?;
        let key = PrivatePkcs8KeyDer::from(key.serialize_der());
        Ok((cert.der().clone(), key, serial))
    }
}

/// What every leaf has: no subject, not a CA, digital signature, client
/// and server auth, an authority key identifier.
fn base_params(params: &mut CertificateParams) {
    params.distinguished_name = DistinguishedName::new();
    params.is_ca = IsCa::ExplicitNoCa;
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth, ExtendedKeyUsagePurpose::ClientAuth];
    params.use_authority_key_identifier_extension = true;
}

/// What makes a leaf an SVID of `id`: its one URI SAN and its validity.
fn svid_params(
    params: &mut CertificateParams,
    id: &Identity,
    now: SystemTime,
    not_after: SystemTime,
) -> Result<(), CaError> {
    params.subject_alt_names = vec![SanType::URI(
        id.to_string()
            .try_into()
            .map_err(|e: rcgen::Error| CaError::Sign(e.to_string()))?,
    )];
    params.not_before = (now - Duration::from_secs(60)).into();
    params.not_after = not_after.into();
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

/// The public key of a PEM CSR (what a pod's agent sends the CA), once its
/// signature verifies with that key; only ECDSA P-256 is accepted. Nothing
/// else of the CSR is used: names come from the caller's identity.
pub(crate) fn csr_public_key(csr_pem: &str) -> Result<rcgen::SubjectPublicKeyInfo, CaError> {
    use x509_parser::prelude::FromDer;
    let bad = |message: String| CaError::Invalid {
        file: "CSR".into(),
        message,
    };
    let der = pem::parse(csr_pem).map_err(|e| bad(format!("not PEM: {e}")))?;
    let (_, csr) = x509_parser::certification_request::X509CertificationRequest::from_der(der.contents())
        .map_err(|e| bad(format!("not a certificate request: {e}")))?;
    csr.verify_signature()
        .map_err(|_| bad("signature does not verify with its own key".into()))?;
    let spki = rcgen::SubjectPublicKeyInfo::from_der(csr.certification_request_info.subject_pki.raw)
        .map_err(|e| bad(format!("public key: {e}")))?;
    if rcgen::PublicKeyData::algorithm(&spki) != &rcgen::PKCS_ECDSA_P256_SHA256 {
        return Err(bad("the key must be ECDSA P-256".into()));
    }
    Ok(spki)
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;

    use super::super::ca::{ROOT_KEY, load_issuer, new_key};
    use super::super::ca_cli::{Signer, ca_params, default_root_dir, init, init_with_path_len, intermediate};
    use super::*;

    fn tmp(tag: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("nodeward-authority-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        d
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
        // `ca init`'s intermediate signs only leaves unless told otherwise.
        init_with_path_len(&a, &default_root_dir(&a), 1).unwrap();
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
        let r = default_root_dir(&d);
        let root = load_issuer(&r.join(ROOT_CERT), &r.join(ROOT_KEY)).unwrap();
        let key = new_key().unwrap();
        let mut params = ca_params(
            "Expired Intermediate",
            Duration::from_secs(1),
            rcgen::BasicConstraints::Constrained(0),
        );
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
}
