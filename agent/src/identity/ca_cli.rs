//! `nodeward ca`: `init` (a root and an intermediate), `intermediate`
//! (another one, beside or below), `revoke` (serials into a re-signed CRL).
//! What the agent itself signs with at runtime is [`super::authority`].

#![forbid(unsafe_code)]

use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use rcgen::{
    BasicConstraints, CertificateParams, CertificateRevocationListParams, DistinguishedName, DnType, IsCa, Issuer,
    KeyIdMethod, KeyUsagePurpose, RevokedCertParams, SerialNumber,
};
use rustls::pki_types::CertificateDer;
use x509_parser::prelude::FromDer;

use super::ca::{
    CA_CERT, CA_CRL, CA_KEY, CERT_CHAIN, CaError, ROOT_CERT, ROOT_CRL, ROOT_KEY, first_cert, hex, load_issuer, new_key,
    parse_serial, pem_text, random_serial, read_certs, read_string, sha256_hex,
};

/// What `ca init` and `ca intermediate` wrote.
#[derive(Debug)]
pub struct Written {
    /// (file, SHA-256 fingerprint for certificates).
    pub(crate) files: Vec<(PathBuf, Option<String>)>,
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

/// Where `ca init --out DIR` puts the root unless told: `DIR-root`, beside
/// `DIR` and never in it, so that copying the CA directory into a Secret
/// cannot carry the root key along.
pub fn default_root_dir(out: &Path) -> PathBuf {
    let mut name = out.file_name().map(|n| n.to_os_string()).unwrap_or_else(|| "ca".into());
    name.push("-root");
    out.with_file_name(name)
}

/// `nodeward ca init`: a root and an intermediate for trying things out;
/// the intermediate signs workloads only (`pathLenConstraint: 0`). The
/// root's key goes to [`default_root_dir`].
pub fn init(out: &Path) -> Result<Written, CaError> {
    init_with_path_len(out, &default_root_dir(out), 0)
}

/// [`init`] with the root written to `root_out` (its certificate and key:
/// what `ca intermediate --root` and `ca revoke --as-root` sign with, to be
/// kept offline) and an intermediate that may sign `path_len` levels of
/// further CAs (`ca init --path-len`, for `ca intermediate --parent`).
/// `out` gets what a signer needs: the intermediate's certificate and key,
/// the chain, and the root's certificate, never its key.
pub fn init_with_path_len(out: &Path, root_out: &Path, path_len: u8) -> Result<Written, CaError> {
    for dir in [out, root_out] {
        std::fs::create_dir_all(dir).map_err(|source| CaError::Write {
            file: dir.to_path_buf(),
            source,
        })?;
    }
    let same = |a: &Path, b: &Path| match (a.canonicalize(), b.canonicalize()) {
        (Ok(a), Ok(b)) => a == b,
        _ => a == b,
    };
    if same(out, root_out) {
        return Err(CaError::Invalid {
            file: root_out.to_path_buf(),
            message: "the root's directory must not be the intermediate's: whatever holds the \
                      intermediate (a Secret, a node) would hold the root key too"
                .into(),
        });
    }
    let root_key = new_key()?;
    let root_params = ca_params(
        "Nodeward Root CA",
        Duration::from_secs(10 * 365 * 86400),
        BasicConstraints::Unconstrained,
    );
    let root = root_params
        .self_signed(&root_key)
        .map_err(|e| CaError::Sign(e.to_string()))?;
    let root_issuer = Issuer::new(root_params, root_key);
    let int_key = new_key()?;
    let int = ca_params(
        "Nodeward Intermediate CA",
        Duration::from_secs(5 * 365 * 86400),
        BasicConstraints::Constrained(path_len),
    )
    .signed_by(&int_key, &root_issuer)
    .map_err(|e| CaError::Sign(e.to_string()))?;
    let mut w = Written { files: Vec::new() };
    write_cert(&mut w, &root_out.join(ROOT_CERT), &[root.der()])?;
    write_key(&mut w, &root_out.join(ROOT_KEY), &root_issuer.key().serialize_pem())?;
    write_cert(&mut w, &out.join(ROOT_CERT), &[root.der()])?;
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
    // The new CA may sign one level fewer than its parent; a parent that may
    // sign only leaves (`ca init`'s intermediate) cannot have sub-CAs.
    let constraint = match signer {
        Signer::Root => BasicConstraints::Constrained(0),
        Signer::Intermediate => match path_len(&from.join(cert_file))? {
            None => BasicConstraints::Constrained(0),
            Some(0) => {
                return Err(CaError::Invalid {
                    file: from.join(cert_file),
                    message: "pathLenConstraint is 0: this CA may sign only workload certificates; sign the new intermediate with --root".into(),
                });
            }
            Some(n) => BasicConstraints::Constrained(n - 1),
        },
    };
    std::fs::create_dir_all(out).map_err(|source| CaError::Write {
        file: out.to_path_buf(),
        source,
    })?;
    let key = new_key()?;
    let cert = ca_params(
        "Nodeward Intermediate CA",
        Duration::from_secs(5 * 365 * 86400),
        constraint,
    )
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

/// The pathLenConstraint of the CA certificate in `file`, `None` when unconstrained.
fn path_len(file: &Path) -> Result<Option<u8>, CaError> {
    let der = first_cert(file, read_string(file)?.as_bytes())?;
    let cert = super::ca::parse(file, &der)?;
    let bc = cert
        .basic_constraints()
        .ok()
        .flatten()
        .map(|e| e.value.path_len_constraint);
    Ok(bc.flatten().map(|n| n.min(255) as u8))
}

/// Parameters of a CA certificate. The common name gets a random suffix:
/// CAs with equal names would make CRL and chain matching by name ambiguous.
/// Intermediates get a path length (`ca init`'s: 0, so a stolen intermediate
/// key cannot mint further CAs that verify).
pub(crate) fn ca_params(cn: &str, lifetime: Duration, constraints: BasicConstraints) -> CertificateParams {
    let mut p = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::OrganizationName, "Nodeward");
    dn.push(DnType::CommonName, format!("{cn} {}", &hex(&random_serial())[..8]));
    p.distinguished_name = dn;
    p.is_ca = IsCa::Ca(constraints);
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

fn write_cert(w: &mut Written, path: &Path, certs: &[&CertificateDer<'_>]) -> Result<(), CaError> {
    let mut pem = String::new();
    for c in certs {
        pem.push_str(&pem_text("CERTIFICATE", c.as_ref()));
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

#[cfg(test)]
mod tests {
    use super::super::authority::Authority;
    use super::*;
    use crate::identity::ca::new_key;

    fn tmp(tag: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("nodeward-ca-cli-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        d
    }

    #[test]
    fn init_writes_a_loadable_ca_with_private_keys_hidden_and_the_root_key_apart() {
        let d = tmp("init");
        let r = default_root_dir(&d);
        let _ = std::fs::remove_dir_all(&r);
        let w = init(&d).unwrap();
        assert_eq!(w.files.len(), 6);
        let ca = Authority::load(&d).unwrap();
        assert_eq!(ca.chain().len(), 1, "the root is never sent");
        assert_eq!(ca.roots().len(), 1);
        assert!(!d.join(ROOT_KEY).exists(), "the root key sits beside the intermediate");
        use std::os::unix::fs::PermissionsExt;
        for k in [d.join(CA_KEY), r.join(ROOT_KEY)] {
            let mode = std::fs::metadata(&k).unwrap().permissions().mode() & 0o777;
            assert_eq!(mode, 0o600, "{}", k.display());
        }
        // The root's directory can sign a sibling intermediate.
        let sibling = tmp("init-sibling");
        intermediate(&r, Signer::Root, &sibling).unwrap();
        Authority::load(&sibling).unwrap();
        // The root never goes into the intermediate's own directory.
        let e = init_with_path_len(&d, &d, 0).unwrap_err().to_string();
        assert!(e.contains("must not be the intermediate's"), "{e}");
        let _ = (
            std::fs::remove_dir_all(&d),
            std::fs::remove_dir_all(&r),
            std::fs::remove_dir_all(&sibling),
        );
    }

    #[test]
    fn a_signer_directory_holding_another_private_key_is_refused_naming_the_file() {
        let d = tmp("foreign");
        let r = default_root_dir(&d);
        init(&d).unwrap();
        // The root key copied in, under its own name or any other.
        for name in [ROOT_KEY, "backup.pem", "..2026_12_07_key"] {
            std::fs::copy(r.join(ROOT_KEY), d.join(name)).unwrap();
            let e = Authority::load(&d).unwrap_err();
            assert!(
                matches!(&e, CaError::ForeignKey { file } if file.ends_with(name)),
                "{name}: {e}"
            );
            assert!(e.to_string().contains(name), "{e}");
            std::fs::remove_file(d.join(name)).unwrap();
        }
        // Certificates and CRLs beside the key are fine.
        Authority::load(&d).unwrap();
        let _ = (std::fs::remove_dir_all(&d), std::fs::remove_dir_all(&r));
    }

    fn verify(dir: &Path, chain: &[CertificateDer<'static>]) -> Result<(), super::super::verify::Refusal> {
        use super::super::trust::TrustSnapshot;
        use super::super::verify::{Role, verify_peer};
        let roots = read_certs(&dir.join(ROOT_CERT)).unwrap();
        let trust = TrustSnapshot::new("cluster.local", roots, &[]);
        let now = rustls::pki_types::UnixTime::now();
        verify_peer(chain, &trust, Role::Client, now, &super::super::tls::provider())
            .map(|_| ())
            .map_err(|e| e.refusal)
    }

    #[test]
    fn an_init_intermediate_cannot_sign_a_ca_that_verifies() {
        let d = tmp("pathlen");
        init(&d).unwrap();
        let ca = Authority::load(&d).unwrap();
        let good = ca
            .issue(
                &super::super::Identity::new("cluster.local", "ns", "sa"),
                Duration::from_secs(600),
            )
            .unwrap();
        assert_eq!(verify(&d, &good.chain), Ok(()), "its own leaves verify");

        // `ca intermediate --parent` refuses, naming the file and why.
        let e = intermediate(&d, Signer::Intermediate, &tmp("pathlen-out"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("pathLenConstraint"), "{e}");

        // A stolen intermediate key mints a CA, and a leaf under it.
        let int = load_issuer(&d.join(CA_CERT), &d.join(CA_KEY)).unwrap();
        let sub_key = new_key().unwrap();
        let sub_params = ca_params("Rogue CA", Duration::from_secs(3600), BasicConstraints::Unconstrained);
        let sub = sub_params.clone().signed_by(&sub_key, &int).unwrap();
        std::fs::write(d.join(CA_CERT), sub.pem()).unwrap();
        std::fs::write(d.join(CA_KEY), sub_key.serialize_pem()).unwrap();
        let int_der = read_certs(&d.join(CERT_CHAIN)).unwrap()[0].clone();
        let mut chain_pem = sub.pem();
        chain_pem.push_str(&pem_text("CERTIFICATE", int_der.as_ref()));
        std::fs::write(d.join(CERT_CHAIN), chain_pem).unwrap();
        let rogue = Authority::load(&d).unwrap();
        let leaf = rogue
            .issue(
                &super::super::Identity::new("cluster.local", "ns", "sa"),
                Duration::from_secs(600),
            )
            .unwrap();
        assert_eq!(leaf.chain.len(), 3);
        assert!(verify(&d, &leaf.chain).is_err(), "a leaf under a rogue sub-CA verified");

        let _ = std::fs::remove_dir_all(&d);
    }

    /// webpki refuses every URI SAN under a URI name constraint (it does not
    /// implement them), so the intermediate carries none and the trust
    /// domain is enforced by the verifier; this holds it to that.
    #[test]
    fn a_leaf_outside_the_trust_domain_does_not_verify() {
        let d = tmp("trustdomain");
        init(&d).unwrap();
        let ca = Authority::load(&d).unwrap();
        let leaf = ca
            .issue(
                &super::super::Identity::new("evil.example", "ns", "sa"),
                Duration::from_secs(600),
            )
            .unwrap();
        assert_eq!(
            verify(&d, &leaf.chain),
            Err(super::super::verify::Refusal::WrongTrustDomain)
        );
        let _ = std::fs::remove_dir_all(&d);
    }
}
