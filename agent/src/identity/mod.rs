//! Workload identities: SPIFFE IDs, the certificates that prove them, and
//! the TLS configurations that check them.
//!
//! * `ca` — CA material both others use: Istio plug-in CA file names,
//!   errors, reading certificates and keys, serials, fingerprints, PEM.
//! * `authority` — the CA directory loaded at runtime, issuing SVIDs.
//! * `ca_cli` — the `nodeward ca` commands: init, intermediate, revoke.
//! * `issuer` — where certificates come from: the local CA or a CA service.
//! * `ca_proto` — Istio's CA protocol: its messages and gRPC framing.
//! * `ca_client` — the agent's client of a CA service (CSRs only).
//! * `manager` — per-identity certificates: issued on demand, shared by the
//!   pods of an identity, renewed around half-life, dropped when unused.
//! * `trust` — roots, CRLs and the identity deny list, hot-reloaded.
//! * `verify` — X.509-SVID verification with a fixed set of refusal kinds.
//! * `tls` — rustls server and client configurations.
//! * `revocation` — closes established connections whose peer became revoked.

#![forbid(unsafe_code)]

#[cfg(feature = "testing")]
pub mod authority;
#[cfg(not(feature = "testing"))]
pub(crate) mod authority;
pub mod ca;
pub mod ca_cli;
#[cfg(feature = "testing")]
pub mod ca_client;
#[cfg(not(feature = "testing"))]
pub(crate) mod ca_client;
pub(crate) mod ca_proto;
#[cfg(feature = "testing")]
pub mod issuer;
#[cfg(not(feature = "testing"))]
pub(crate) mod issuer;
#[cfg(feature = "testing")]
pub mod manager;
#[cfg(not(feature = "testing"))]
pub(crate) mod manager;
pub(crate) mod revocation;
#[cfg(feature = "testing")]
pub mod tls;
#[cfg(not(feature = "testing"))]
pub(crate) mod tls;
#[cfg(feature = "testing")]
pub mod trust;
#[cfg(not(feature = "testing"))]
pub(crate) mod trust;
#[cfg(feature = "testing")]
pub mod verify;
#[cfg(not(feature = "testing"))]
pub(crate) mod verify;

use std::fmt;

/// A workload identity: `spiffe://<trust-domain>/ns/<namespace>/sa/<service-account>`.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Identity {
    /// Trust domain, e.g. `cluster.local`.
    pub(crate) trust_domain: String,
    /// Kubernetes namespace.
    pub(crate) namespace: String,
    /// Kubernetes service account.
    pub(crate) service_account: String,
}

/// A string that is not a Kubernetes SPIFFE ID.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error(
    "{value:?} is not a SPIFFE ID of the form spiffe://<trust-domain>/ns/<namespace>/sa/<service-account>: {reason}"
)]
pub(crate) struct IdentityError {
    /// The offending string (certificate contents are public data).
    pub(crate) value: String,
    /// What is wrong.
    pub(crate) reason: &'static str,
}

impl Identity {
    /// An identity from its parts.
    pub fn new(trust_domain: &str, namespace: &str, service_account: &str) -> Self {
        Identity {
            trust_domain: trust_domain.into(),
            namespace: namespace.into(),
            service_account: service_account.into(),
        }
    }

    /// Parses a SPIFFE ID strictly: lowercase scheme and trust domain, no
    /// port, user info, query or fragment, exactly `/ns/<ns>/sa/<sa>`.
    pub(crate) fn parse(s: &str) -> Result<Self, IdentityError> {
        let err = |reason| IdentityError {
            value: s.chars().take(256).collect(),
            reason,
        };
        let rest = s
            .strip_prefix("spiffe://")
            .ok_or_else(|| err("scheme must be spiffe://"))?;
        let (td, path) = rest.split_once('/').ok_or_else(|| err("no path"))?;
        if td.is_empty() || td.len() > 255 {
            return Err(err("empty or overlong trust domain"));
        }
        if !td
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"-._".contains(&b))
        {
            return Err(err(
                "trust domain may hold only lowercase letters, digits, '-', '.' and '_'",
            ));
        }
        let segs: Vec<&str> = path.split('/').collect();
        let [ns_kw, ns, sa_kw, sa] = segs.as_slice() else {
            return Err(err("path must be /ns/<namespace>/sa/<service-account>"));
        };
        if *ns_kw != "ns" || *sa_kw != "sa" {
            return Err(err("path must be /ns/<namespace>/sa/<service-account>"));
        }
        for seg in [ns, sa] {
            if seg.is_empty() || *seg == "." || *seg == ".." {
                return Err(err("empty or dot path segment"));
            }
            if !seg.bytes().all(|b| b.is_ascii_alphanumeric() || b"-._".contains(&b)) {
                return Err(err("path segments may hold only letters, digits, '-', '.' and '_'"));
            }
        }
        Ok(Identity::new(td, ns, sa))
    }

    /// The identity without `spiffe://`, as Istio writes principals.
    pub(crate) fn principal(&self) -> String {
        format!(
            "{}/ns/{}/sa/{}",
            self.trust_domain, self.namespace, self.service_account
        )
    }
}

impl fmt::Display for Identity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "spiffe://{}", self.principal())
    }
}

/// Makes the agent's crypto provider ([`tls`]'s) the process default, for
/// whatever builds a TLS configuration without naming one (the Kubernetes
/// client): both rustls providers are built, so rustls picks none itself.
pub fn install_crypto_provider() {
    let _ = (*tls::provider()).clone().install_default();
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_kubernetes_spiffe_ids() {
        let id = Identity::parse("spiffe://cluster.local/ns/shop/sa/web").unwrap();
        assert_eq!(id, Identity::new("cluster.local", "shop", "web"));
        assert_eq!(id.to_string(), "spiffe://cluster.local/ns/shop/sa/web");
        assert_eq!(id.principal(), "cluster.local/ns/shop/sa/web");
    }

    #[test]
    fn rejects_everything_else() {
        for bad in [
            "https://cluster.local/ns/shop/sa/web",
            "SPIFFE://cluster.local/ns/shop/sa/web",
            "spiffe://Cluster.local/ns/shop/sa/web",
            "spiffe://cluster.local:443/ns/shop/sa/web",
            "spiffe://user@cluster.local/ns/shop/sa/web",
            "spiffe://cluster.local/ns/shop/sa/web/extra",
            "spiffe://cluster.local/ns/shop/sa/web?x=1",
            "spiffe://cluster.local/ns/shop/sa/web#f",
            "spiffe://cluster.local/ns//sa/web",
            "spiffe://cluster.local/ns/../sa/web",
            "spiffe://cluster.local/sa/web/ns/shop",
            "spiffe://cluster.local",
            "spiffe:///ns/shop/sa/web",
        ] {
            assert!(Identity::parse(bad).is_err(), "{bad} accepted");
        }
    }
}
