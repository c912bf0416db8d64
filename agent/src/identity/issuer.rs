//! Where workload certificates come from: the [`Issuer`] the certificate
//! manager asks. Two kinds: the local [`Authority`] (a CA directory on the
//! node, `--ca-dir`) and the remote [`super::ca_client::CaClient`] (a CA
//! service, `--ca-address`), which keeps signing keys off the nodes.

#![forbid(unsafe_code)]

use std::time::Duration;

use rustls::pki_types::CertificateDer;

use super::Identity;
use super::authority::{Authority, IssuedCert};
use super::ca::CaError;

/// Why no certificate was obtained.
#[derive(Debug, thiserror::Error)]
pub enum IssueError {
    /// The local CA failed.
    #[error(transparent)]
    Local(#[from] CaError),
    /// The CA service could not be reached or the call failed in transit.
    #[error("CA service unavailable: {0}")]
    Unavailable(String),
    /// The CA service answered with a gRPC error.
    #[error("CA service refused (grpc-status {code}): {message}")]
    Refused {
        /// gRPC status code.
        code: u32,
        /// grpc-message.
        message: String,
    },
    /// The answer is not a chain for the key and identity asked for, or
    /// does not verify against the configured roots.
    #[error("CA service answer rejected: {0}")]
    BadResponse(String),
    /// The token file could not be read.
    #[error("token file {file}: {message}")]
    Token {
        /// The file.
        file: String,
        /// Why.
        message: String,
    },
}

impl IssueError {
    /// A fixed label for logs and counters.
    pub(crate) fn kind(&self) -> &'static str {
        match self {
            IssueError::Local(_) => "local_ca",
            IssueError::Unavailable(_) => "unavailable",
            IssueError::Refused { .. } => "refused",
            IssueError::BadResponse(_) => "bad_response",
            IssueError::Token { .. } => "token",
        }
    }
}

/// A source of workload certificates.
pub trait Issuer: Send + Sync + std::fmt::Debug {
    /// Issues a certificate for `id` lasting at most `lifetime`, with a key
    /// made in this process. May block (a remote call): callers on the
    /// runtime use [`Issuer::is_local`] to decide.
    fn issue(&self, id: &Identity, lifetime: Duration) -> Result<IssuedCert, IssueError>;
    /// The roots what it issues chains to (the trust bundle).
    fn roots(&self) -> Vec<CertificateDer<'static>>;
    /// Intermediates between leaves and roots, as far as known (CRL issuers).
    fn chain(&self) -> Vec<CertificateDer<'static>>;
    /// For logs: a fingerprint or an address.
    fn describe(&self) -> String;
    /// Whether issuing is a quick local signature (done inline when a pod
    /// arrives) rather than a network call (done by housekeeping).
    fn is_local(&self) -> bool;
}

impl Issuer for Authority {
    fn issue(&self, id: &Identity, lifetime: Duration) -> Result<IssuedCert, IssueError> {
        Ok(Authority::issue(self, id, lifetime)?)
    }

    fn roots(&self) -> Vec<CertificateDer<'static>> {
        Authority::roots(self).to_vec()
    }

    fn chain(&self) -> Vec<CertificateDer<'static>> {
        Authority::chain(self).to_vec()
    }

    fn describe(&self) -> String {
        format!("local CA sha256:{}", self.fingerprint())
    }

    fn is_local(&self) -> bool {
        true
    }
}
