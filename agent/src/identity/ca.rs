//! CA material shared by the runtime [`super::authority`] and the
//! `nodeward ca` commands ([`super::ca_cli`]): the file names of Istio's
//! plug-in CA directory (`ca-cert.pem`, `ca-key.pem`, `root-cert.pem`,
//! `cert-chain.pem`), so an operator's existing `cacerts` secret works
//! unchanged; reading certificates and keys; serial numbers; fingerprints;
//! PEM text (the `pem` crate).

#![forbid(unsafe_code)]

use std::path::{Path, PathBuf};

use rcgen::{Issuer, KeyPair};
use rustls::pki_types::CertificateDer;
use rustls::pki_types::pem::PemObject;
use x509_parser::prelude::{FromDer, X509Certificate};

/// The signing certificate (an intermediate, or the root itself).
pub const CA_CERT: &str = "ca-cert.pem";
/// The signing certificate's private key (PKCS#8).
pub const CA_KEY: &str = "ca-key.pem";
/// The trust bundle: one or more roots.
pub const ROOT_CERT: &str = "root-cert.pem";
/// The signing certificate's chain up to the root.
pub(crate) const CERT_CHAIN: &str = "cert-chain.pem";
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
    /// A signer's directory holds a private key it does not sign with
    /// (a root key, another CA's): whoever reads the directory could sign
    /// with that key too.
    #[error(
        "{file}: a private key other than ca-key.pem; a signer's directory holds only the key it signs with \
         (keep root keys offline: `nodeward ca init --root-out`)"
    )]
    ForeignKey {
        /// The file.
        file: PathBuf,
    },
    /// A file could not be written.
    #[error("writing {file}: {source}")]
    Write {
        /// The file.
        file: PathBuf,
        /// Why.
        source: std::io::Error,
    },
}

/// Largest file [`refuse_foreign_keys`] reads; a larger one is read this
/// far (a PEM key block starts within the first lines of any key file).
const KEY_SCAN_LIMIT: u64 = 1024 * 1024;

/// Refuses a signer's directory (`run --ca-dir`, `ca serve --ca-dir`) that
/// holds `root-key.pem` or any other file with a PEM private key besides
/// `ca-key.pem`: a root key on a node or in the CA service's Secret lets
/// whoever reads it mint intermediates past every CRL. Reads every regular
/// file of the directory (a mounted Secret's entries are links to files,
/// followed; its `..data` directories are not), each at most
/// [`KEY_SCAN_LIMIT`] bytes.
pub(crate) fn refuse_foreign_keys(dir: &Path) -> Result<(), CaError> {
    use std::io::Read;
    let entries = std::fs::read_dir(dir).map_err(|source| CaError::Read {
        file: dir.to_path_buf(),
        source,
    })?;
    let mut files: Vec<PathBuf> = entries
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.file_name().is_some_and(|n| n != CA_KEY) && p.is_file())
        .collect();
    files.sort();
    for file in files {
        if file.file_name().is_some_and(|n| n == ROOT_KEY) {
            return Err(CaError::ForeignKey { file });
        }
        let mut head = Vec::new();
        let read = std::fs::File::open(&file).and_then(|f| f.take(KEY_SCAN_LIMIT).read_to_end(&mut head));
        if let Err(source) = read {
            return Err(CaError::Read { file, source });
        }
        if head
            .windows(b"PRIVATE KEY-----".len())
            .any(|w| w == b"PRIVATE KEY-----")
        {
            return Err(CaError::ForeignKey { file });
        }
    }
    Ok(())
}

/// Parses `4f:a2:...` or `4fa2...` into bytes; `None` for anything else
/// (the input is typed by an operator and may hold any character).
pub(crate) fn parse_serial(s: &str) -> Option<Vec<u8>> {
    let hex: String = s.chars().filter(|c| *c != ':').collect();
    // ASCII hex digits only: slicing below is then on character boundaries,
    // and `from_str_radix` never sees a sign.
    if hex.is_empty() || hex.len() % 2 == 1 || !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
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

/// 16 random bytes, positive and without a leading zero byte, as X.509 wants.
pub(super) fn random_serial() -> Vec<u8> {
    use ring::rand::SecureRandom;
    let mut b = [0u8; 16];
    ring::rand::SystemRandom::new().fill(&mut b).expect("system randomness");
    b[0] &= 0x7f; // positive
    b[0] |= 0x01; // no leading zero byte to strip
    b.to_vec()
}

/// A new ECDSA P-256 key.
pub(super) fn new_key() -> Result<KeyPair, CaError> {
    KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).map_err(|e| CaError::Sign(e.to_string()))
}

/// A signing certificate and its key, checked to belong together.
pub(super) fn load_issuer(cert: &Path, key: &Path) -> Result<Issuer<'static, KeyPair>, CaError> {
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

/// A file's text, the error naming the file.
pub(super) fn read_string(path: &Path) -> Result<String, CaError> {
    std::fs::read_to_string(path).map_err(|source| CaError::Read {
        file: path.to_path_buf(),
        source,
    })
}

/// All certificates of a PEM file; at least one.
pub(crate) fn read_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, CaError> {
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

/// The first certificate of PEM text read from `path`.
pub(super) fn first_cert(path: &Path, pem: &[u8]) -> Result<CertificateDer<'static>, CaError> {
    CertificateDer::pem_slice_iter(pem)
        .next()
        .and_then(Result::ok)
        .ok_or_else(|| CaError::Invalid {
            file: path.to_path_buf(),
            message: "no PEM certificate in file".into(),
        })
}

/// The parsed certificate, the error naming `path`.
pub(super) fn parse<'a>(path: &Path, der: &'a CertificateDer<'_>) -> Result<X509Certificate<'a>, CaError> {
    X509Certificate::from_der(der.as_ref())
        .map(|(_, c)| c)
        .map_err(|e| CaError::Invalid {
            file: path.to_path_buf(),
            message: format!("not an X.509 certificate: {e}"),
        })
}

/// Refuses a certificate that is not a CA.
pub(super) fn check_ca(path: &Path, c: &X509Certificate<'_>) -> Result<(), CaError> {
    if !c.is_ca() {
        return Err(CaError::Invalid {
            file: path.to_path_buf(),
            message: format!("{} is not a CA certificate (basicConstraints CA:FALSE)", c.subject()),
        });
    }
    Ok(())
}

/// PEM text of DER bytes under `label`, `\n` line endings.
pub(crate) fn pem_text(label: &str, der: &[u8]) -> String {
    pem::encode_config(
        &pem::Pem::new(label, der),
        pem::EncodeConfig::new().set_line_ending(pem::LineEnding::LF),
    )
}

/// PEM text of a certificate.
#[cfg(test)]
pub(crate) fn cert_pem(der: &CertificateDer<'_>) -> String {
    pem_text("CERTIFICATE", der.as_ref())
}

#[cfg(test)]
mod tests {
    use super::super::ca_cli::init;
    use super::*;

    fn tmp(tag: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("nodeward-ca-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        d
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

    #[test]
    fn malformed_serials_are_refused_without_panicking() {
        for bad in ["", "é1", "zz", "aéb", "+1+2", "abc", ":"] {
            assert_eq!(parse_serial(bad), None, "{bad:?}");
        }
        assert_eq!(parse_serial("0a:FF"), Some(vec![0x0a, 0xff]));
        assert_eq!(parse_serial("4fa2"), Some(vec![0x4f, 0xa2]));
    }
}
