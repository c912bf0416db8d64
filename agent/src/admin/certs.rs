//! `/certs`: per workload identity, the certificate the agent holds — its
//! serial, validity, the issuer chain it is presented with, and how long
//! until it is renewed. Public facts only: keys never leave the manager.

#![forbid(unsafe_code)]

use std::time::SystemTime;

use serde_json::{Value, json};
use x509_parser::prelude::{FromDer, X509Certificate};

use super::AdminState;
use crate::metrics::unix_seconds;

/// The dump, as JSON.
pub(crate) fn dump(state: &AdminState) -> Value {
    let Some(manager) = &state.certs else {
        return json!({"certificates": [], "note": "no --ca-dir: no workload identities"});
    };
    let now = SystemTime::now();
    let certificates: Vec<Value> = manager
        .certificates()
        .into_iter()
        .map(|c| {
            let chain: Vec<Value> = manager
                .current(&c.identity)
                .map(|k| k.cert.iter().map(|der| describe(der.as_ref())).collect())
                .unwrap_or_default();
            let to_renewal = c.renew_at.duration_since(now).map(|d| d.as_secs()).unwrap_or(0);
            json!({
                "identity": c.identity.to_string(),
                "serial": c.serial,
                "sha256": chain.first().and_then(|l| l.get("sha256").cloned()),
                "not_before": chain.first().and_then(|l| l.get("not_before").cloned()),
                "not_after": unix_seconds(c.not_after),
                "renew_at": unix_seconds(c.renew_at),
                "seconds_to_renewal": to_renewal,
                "pods": c.pods,
                "chain": chain,
            })
        })
        .collect();
    json!({"certificates": certificates})
}

/// Subject, issuer, serial and validity (unix seconds) of one certificate.
fn describe(der: &[u8]) -> Value {
    match X509Certificate::from_der(der) {
        Ok((_, cert)) => json!({
            "subject": cert.subject().to_string(),
            "issuer": cert.issuer().to_string(),
            "serial": cert.raw_serial_as_string(),
            "sha256": crate::identity::ca::sha256_hex(der),
            "not_before": cert.validity().not_before.timestamp(),
            "not_after": cert.validity().not_after.timestamp(),
        }),
        Err(e) => json!({"error": format!("unparsable certificate: {e}")}),
    }
}
