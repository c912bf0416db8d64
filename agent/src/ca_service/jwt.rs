//! Kubernetes ServiceAccount tokens: JWTs (RFC 7519) signed by the API
//! server's service-account issuer, verified against its public keys (a
//! JWKS file, RFC 7517) with `ring`. Only RS256 and ES256 are accepted;
//! `alg: none`, unsigned tokens, unknown keys, wrong issuer or audience,
//! expired and not-yet-valid tokens are refused, each with its own kind.

#![forbid(unsafe_code)]

use std::path::Path;

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use ring::signature::{ECDSA_P256_SHA256_FIXED, RSA_PKCS1_2048_8192_SHA256, RsaPublicKeyComponents, UnparsedPublicKey};
use serde::Deserialize;

/// Clock skew tolerated on `exp` and `nbf`, seconds (nodes and the API
/// server do not share a clock).
pub(crate) const LEEWAY_SECS: i64 = 60;

/// Why a token or key set was refused. Each kind is a log and metric label.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub(crate) enum JwtError {
    /// Not three base64url parts of JSON.
    #[error("malformed token: {0}")]
    Malformed(String),
    /// `alg` is `none` or anything but RS256/ES256.
    #[error("algorithm {0:?} is not accepted (RS256 or ES256 only)")]
    Algorithm(String),
    /// No signature part.
    #[error("token is unsigned")]
    Unsigned,
    /// No key of the issuer has this `kid` (or the token names none and the
    /// issuer has several).
    #[error("no key {0:?} in the issuer's key set")]
    UnknownKey(String),
    /// The signature does not verify.
    #[error("signature does not verify")]
    BadSignature,
    /// Past `exp`.
    #[error("token expired")]
    Expired,
    /// Before `nbf`.
    #[error("token not valid yet")]
    NotYetValid,
    /// `iss` is not the configured issuer.
    #[error("issuer {0:?} is not the configured one")]
    WrongIssuer(String),
    /// `aud` does not hold the configured audience.
    #[error("audience does not include {0:?}")]
    WrongAudience(String),
    /// A required claim is missing.
    #[error("claim {0} is missing")]
    MissingClaim(&'static str),
    /// The key set file is unusable.
    #[error("{file}: {message}")]
    KeySet {
        /// The JWKS file.
        file: String,
        /// What is wrong.
        message: String,
    },
}

impl JwtError {
    /// A fixed label for logs and counters.
    pub(crate) fn kind(&self) -> &'static str {
        match self {
            JwtError::Malformed(_) => "malformed",
            JwtError::Algorithm(_) => "algorithm",
            JwtError::Unsigned => "unsigned",
            JwtError::UnknownKey(_) => "unknown_key",
            JwtError::BadSignature => "bad_signature",
            JwtError::Expired => "expired",
            JwtError::NotYetValid => "not_yet_valid",
            JwtError::WrongIssuer(_) => "wrong_issuer",
            JwtError::WrongAudience(_) => "wrong_audience",
            JwtError::MissingClaim(_) => "missing_claim",
            JwtError::KeySet { .. } => "key_set",
        }
    }
}

#[derive(Debug, Clone)]
enum PublicKey {
    Rsa { n: Vec<u8>, e: Vec<u8> },
    P256(Vec<u8>),
}

/// The issuer's public keys, by `kid`.
#[derive(Debug, Clone, Default)]
pub(crate) struct KeySet {
    keys: Vec<(Option<String>, PublicKey)>,
}

#[derive(Deserialize)]
struct Jwks {
    keys: Vec<Jwk>,
}

#[derive(Deserialize)]
struct Jwk {
    kty: String,
    kid: Option<String>,
    #[serde(rename = "use")]
    use_: Option<String>,
    crv: Option<String>,
    n: Option<String>,
    e: Option<String>,
    x: Option<String>,
    y: Option<String>,
}

impl KeySet {
    /// Reads a JWKS file (`{"keys": [...]}`, RSA and EC P-256 keys; others,
    /// and keys not for signatures, are skipped). No usable key is an error.
    pub(crate) fn load(path: &Path) -> Result<KeySet, JwtError> {
        let err = |message: String| JwtError::KeySet {
            file: path.display().to_string(),
            message,
        };
        let text = std::fs::read_to_string(path).map_err(|e| err(e.to_string()))?;
        KeySet::parse(&text).map_err(err)
    }

    /// Parses JWKS text; the error says what is wrong.
    pub(crate) fn parse(text: &str) -> Result<KeySet, String> {
        let jwks: Jwks = serde_json::from_str(text).map_err(|e| format!("not a JWKS document: {e}"))?;
        let b64 = |v: &Option<String>, what: &str| -> Result<Vec<u8>, String> {
            let v = v.as_deref().ok_or_else(|| format!("key without {what}"))?;
            URL_SAFE_NO_PAD
                .decode(v.trim_end_matches('='))
                .map_err(|e| format!("{what}: {e}"))
        };
        let mut keys = Vec::new();
        for k in jwks.keys {
            if k.use_.as_deref().is_some_and(|u| u != "sig") {
                continue;
            }
            let key = match (k.kty.as_str(), k.crv.as_deref()) {
                ("RSA", _) => PublicKey::Rsa {
                    n: b64(&k.n, "n")?,
                    e: b64(&k.e, "e")?,
                },
                ("EC", Some("P-256")) => {
                    let (x, y) = (b64(&k.x, "x")?, b64(&k.y, "y")?);
                    if x.len() != 32 || y.len() != 32 {
                        return Err("P-256 key coordinates must be 32 bytes".into());
                    }
                    let mut point = vec![4u8];
                    point.extend(x);
                    point.extend(y);
                    PublicKey::P256(point)
                }
                _ => continue,
            };
            keys.push((k.kid, key));
        }
        if keys.is_empty() {
            return Err("no RSA or P-256 signing key".into());
        }
        Ok(KeySet { keys })
    }

    fn find(&self, kid: Option<&str>, alg: &str) -> Result<&PublicKey, JwtError> {
        let fits = |k: &PublicKey| {
            matches!(
                (alg, k),
                ("RS256", PublicKey::Rsa { .. }) | ("ES256", PublicKey::P256(_))
            )
        };
        let mut found = self
            .keys
            .iter()
            .filter(|(id, k)| fits(k) && (kid.is_none() || id.as_deref() == kid));
        match (found.next(), found.next(), kid) {
            (Some((_, k)), None, _) | (Some((_, k)), Some(_), Some(_)) => Ok(k),
            _ => Err(JwtError::UnknownKey(kid.unwrap_or("").to_string())),
        }
    }
}

/// What is checked besides the signature.
#[derive(Debug, Clone)]
pub(crate) struct Expected {
    /// `iss`.
    pub(crate) issuer: String,
    /// One of `aud`.
    pub(crate) audience: String,
}

/// The Kubernetes facts a verified token carries.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct K8sClaims {
    /// `kubernetes.io.namespace`.
    pub(crate) namespace: String,
    /// `kubernetes.io.serviceaccount.name`.
    pub(crate) service_account: String,
    /// `kubernetes.io.pod.name`, when the token is bound to a pod.
    pub(crate) pod: Option<String>,
    /// `kubernetes.io.pod.uid`: which pod of that name (a pod re-created
    /// under the same name has another).
    pub(crate) pod_uid: Option<String>,
    /// `kubernetes.io.node.name`, when the token carries its node.
    pub(crate) node: Option<String>,
}

#[derive(Deserialize)]
struct Header {
    alg: String,
    kid: Option<String>,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum Audience {
    One(String),
    Many(Vec<String>),
}

#[derive(Deserialize)]
struct Named {
    name: String,
    uid: Option<String>,
}

#[derive(Deserialize)]
struct KubernetesIo {
    namespace: Option<String>,
    serviceaccount: Option<Named>,
    pod: Option<Named>,
    node: Option<Named>,
}

#[derive(Deserialize)]
struct Claims {
    iss: Option<String>,
    aud: Option<Audience>,
    exp: Option<i64>,
    nbf: Option<i64>,
    #[serde(rename = "kubernetes.io")]
    kubernetes: Option<KubernetesIo>,
}

/// Verifies `token` at unix time `now` and returns its Kubernetes claims.
/// The signature is checked before any claim is believed.
pub(crate) fn verify(token: &str, keys: &KeySet, expected: &Expected, now: i64) -> Result<K8sClaims, JwtError> {
    let mut parts = token.trim().split('.');
    let (Some(h), Some(p), sig, None) = (parts.next(), parts.next(), parts.next(), parts.next()) else {
        return Err(JwtError::Malformed("not three dot-separated parts".into()));
    };
    let decode = |s: &str, what: &str| {
        URL_SAFE_NO_PAD
            .decode(s)
            .map_err(|e| JwtError::Malformed(format!("{what}: {e}")))
    };
    let header: Header =
        serde_json::from_slice(&decode(h, "header")?).map_err(|e| JwtError::Malformed(format!("header: {e}")))?;
    if header.alg != "RS256" && header.alg != "ES256" {
        return Err(JwtError::Algorithm(header.alg));
    }
    let sig = match sig {
        Some(s) if !s.is_empty() => decode(s, "signature")?,
        _ => return Err(JwtError::Unsigned),
    };
    let key = keys.find(header.kid.as_deref(), &header.alg)?;
    let signed = &token.trim().as_bytes()[..h.len() + 1 + p.len()];
    let ok = match key {
        PublicKey::Rsa { n, e } => RsaPublicKeyComponents { n, e }
            .verify(&RSA_PKCS1_2048_8192_SHA256, signed, &sig)
            .is_ok(),
        PublicKey::P256(point) => UnparsedPublicKey::new(&ECDSA_P256_SHA256_FIXED, point)
            .verify(signed, &sig)
            .is_ok(),
    };
    if !ok {
        return Err(JwtError::BadSignature);
    }
    let claims: Claims =
        serde_json::from_slice(&decode(p, "payload")?).map_err(|e| JwtError::Malformed(format!("payload: {e}")))?;
    let exp = claims.exp.ok_or(JwtError::MissingClaim("exp"))?;
    if now > exp.saturating_add(LEEWAY_SECS) {
        return Err(JwtError::Expired);
    }
    if claims.nbf.is_some_and(|nbf| now.saturating_add(LEEWAY_SECS) < nbf) {
        return Err(JwtError::NotYetValid);
    }
    let iss = claims.iss.ok_or(JwtError::MissingClaim("iss"))?;
    if iss != expected.issuer {
        return Err(JwtError::WrongIssuer(iss));
    }
    let aud_ok = match &claims.aud {
        Some(Audience::One(a)) => *a == expected.audience,
        Some(Audience::Many(v)) => v.contains(&expected.audience),
        None => false,
    };
    if !aud_ok {
        return Err(JwtError::WrongAudience(expected.audience.clone()));
    }
    let k = claims.kubernetes.ok_or(JwtError::MissingClaim("kubernetes.io"))?;
    Ok(K8sClaims {
        namespace: k
            .namespace
            .filter(|n| !n.is_empty())
            .ok_or(JwtError::MissingClaim("kubernetes.io.namespace"))?,
        service_account: k
            .serviceaccount
            .map(|s| s.name)
            .filter(|n| !n.is_empty())
            .ok_or(JwtError::MissingClaim("kubernetes.io.serviceaccount.name"))?,
        pod_uid: k.pod.as_ref().and_then(|p| p.uid.clone()).filter(|u| !u.is_empty()),
        pod: k.pod.map(|p| p.name),
        node: k.node.map(|n| n.name),
    })
}

#[cfg(any(test, feature = "testing"))]
/// An ES256 token issuer: what the API server does when it projects a
/// ServiceAccount token. For tests and tools that need real signed tokens.
pub struct TokenSigner {
    key: ring::signature::EcdsaKeyPair,
    kid: String,
}

#[cfg(any(test, feature = "testing"))]
impl TokenSigner {
    /// A fresh P-256 key named `kid`.
    pub fn generate(kid: &str) -> TokenSigner {
        let rng = ring::rand::SystemRandom::new();
        let pkcs8 =
            ring::signature::EcdsaKeyPair::generate_pkcs8(&ring::signature::ECDSA_P256_SHA256_FIXED_SIGNING, &rng)
                .expect("P-256 key generation");
        let key = ring::signature::EcdsaKeyPair::from_pkcs8(
            &ring::signature::ECDSA_P256_SHA256_FIXED_SIGNING,
            pkcs8.as_ref(),
            &rng,
        )
        .expect("generated key parses");
        TokenSigner { key, kid: kid.into() }
    }

    /// The public key as a JWKS document.
    pub fn jwks(&self) -> String {
        use ring::signature::KeyPair;
        let point = self.key.public_key().as_ref();
        serde_json::json!({"keys": [{
            "kty": "EC", "crv": "P-256", "use": "sig", "alg": "ES256", "kid": self.kid,
            "x": URL_SAFE_NO_PAD.encode(&point[1..33]),
            "y": URL_SAFE_NO_PAD.encode(&point[33..65]),
        }]})
        .to_string()
    }

    /// Signs `claims` with header `{"alg":"ES256","kid":...}`.
    pub fn sign(&self, claims: &serde_json::Value) -> String {
        let header = serde_json::json!({"alg": "ES256", "typ": "JWT", "kid": self.kid});
        let input = format!(
            "{}.{}",
            URL_SAFE_NO_PAD.encode(header.to_string()),
            URL_SAFE_NO_PAD.encode(claims.to_string())
        );
        let sig = self
            .key
            .sign(&ring::rand::SystemRandom::new(), input.as_bytes())
            .expect("ECDSA signing");
        format!("{input}.{}", URL_SAFE_NO_PAD.encode(sig.as_ref()))
    }
}

#[cfg(any(test, feature = "testing"))]
/// Claims of a projected ServiceAccount token bound to pod `pod` (name,
/// uid) on a node, valid for an hour from `now`.
pub fn k8s_claims(
    issuer: &str,
    audience: &str,
    namespace: &str,
    service_account: &str,
    pod: (&str, &str),
    node: &str,
    now: i64,
) -> serde_json::Value {
    let (pod, pod_uid) = pod;
    serde_json::json!({
        "iss": issuer, "aud": [audience], "iat": now, "nbf": now, "exp": now + 3600,
        "sub": format!("system:serviceaccount:{namespace}:{service_account}"),
        "kubernetes.io": {
            "namespace": namespace,
            "serviceaccount": {"name": service_account, "uid": "00000000-0000-0000-0000-000000000001"},
            "pod": {"name": pod, "uid": pod_uid},
            "node": {"name": node, "uid": "00000000-0000-0000-0000-000000000003"},
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const NOW: i64 = 1_800_000_000;

    fn expected() -> Expected {
        Expected {
            issuer: "https://kubernetes.default.svc".into(),
            audience: "istio-ca".into(),
        }
    }

    fn claims() -> serde_json::Value {
        k8s_claims(
            "https://kubernetes.default.svc",
            "istio-ca",
            "shop",
            "web",
            ("web-1", "uid-web-1"),
            "node-1",
            NOW - 10,
        )
    }

    fn signer() -> (TokenSigner, KeySet) {
        let s = TokenSigner::generate("k1");
        let keys = KeySet::parse(&s.jwks()).unwrap();
        (s, keys)
    }

    #[test]
    fn a_good_es256_token_yields_its_kubernetes_claims() {
        let (s, keys) = signer();
        let c = verify(&s.sign(&claims()), &keys, &expected(), NOW).unwrap();
        assert_eq!(
            c,
            K8sClaims {
                namespace: "shop".into(),
                service_account: "web".into(),
                pod: Some("web-1".into()),
                pod_uid: Some("uid-web-1".into()),
                node: Some("node-1".into()),
            }
        );
    }

    #[test]
    fn a_good_rs256_token_verifies() {
        use ring::signature::{RSA_PKCS1_SHA256, RsaKeyPair};
        let pem = include_str!("testdata/rsa-test-key.pem");
        let der = pem::parse(pem).unwrap();
        let kp = RsaKeyPair::from_pkcs8(der.contents()).unwrap();
        let parts: RsaPublicKeyComponents<Vec<u8>> = kp.public().into();
        let (n, e) = (parts.n, parts.e);
        let jwks = serde_json::json!({"keys": [{"kty": "RSA", "kid": "r1",
            "n": URL_SAFE_NO_PAD.encode(n), "e": URL_SAFE_NO_PAD.encode(e)}]});
        let keys = KeySet::parse(&jwks.to_string()).unwrap();
        let input = format!(
            "{}.{}",
            URL_SAFE_NO_PAD.encode(r#"{"alg":"RS256","kid":"r1"}"#),
            URL_SAFE_NO_PAD.encode(claims().to_string())
        );
        let mut sig = vec![0; kp.public().modulus_len()];
        kp.sign(
            &RSA_PKCS1_SHA256,
            &ring::rand::SystemRandom::new(),
            input.as_bytes(),
            &mut sig,
        )
        .unwrap();
        let token = format!("{input}.{}", URL_SAFE_NO_PAD.encode(&sig));
        assert!(verify(&token, &keys, &expected(), NOW).is_ok());
        // One flipped bit of the payload: refused.
        let mut bad = claims();
        bad["kubernetes.io"]["namespace"] = "kube-system".into();
        let forged = format!(
            "{}.{}.{}",
            URL_SAFE_NO_PAD.encode(r#"{"alg":"RS256","kid":"r1"}"#),
            URL_SAFE_NO_PAD.encode(bad.to_string()),
            URL_SAFE_NO_PAD.encode(&sig)
        );
        assert_eq!(verify(&forged, &keys, &expected(), NOW), Err(JwtError::BadSignature));
    }

    #[test]
    fn alg_none_and_unsigned_tokens_are_refused() {
        let (_, keys) = signer();
        let body = URL_SAFE_NO_PAD.encode(claims().to_string());
        let none = format!("{}.{body}.", URL_SAFE_NO_PAD.encode(r#"{"alg":"none"}"#));
        assert_eq!(
            verify(&none, &keys, &expected(), NOW),
            Err(JwtError::Algorithm("none".into()))
        );
        let hs = format!("{}.{body}.c2ln", URL_SAFE_NO_PAD.encode(r#"{"alg":"HS256"}"#));
        assert!(matches!(
            verify(&hs, &keys, &expected(), NOW),
            Err(JwtError::Algorithm(_))
        ));
        let unsigned = format!("{}.{body}.", URL_SAFE_NO_PAD.encode(r#"{"alg":"ES256","kid":"k1"}"#));
        assert_eq!(verify(&unsigned, &keys, &expected(), NOW), Err(JwtError::Unsigned));
        let two_parts = format!("{}.{body}", URL_SAFE_NO_PAD.encode(r#"{"alg":"ES256","kid":"k1"}"#));
        assert_eq!(verify(&two_parts, &keys, &expected(), NOW), Err(JwtError::Unsigned));
    }

    #[test]
    fn another_key_unknown_kid_expired_early_wrong_issuer_or_audience_are_refused() {
        let (s, keys) = signer();
        let other = TokenSigner::generate("k1");
        assert_eq!(
            verify(&other.sign(&claims()), &keys, &expected(), NOW),
            Err(JwtError::BadSignature)
        );
        let stranger = TokenSigner::generate("k2");
        assert!(matches!(
            verify(&stranger.sign(&claims()), &keys, &expected(), NOW),
            Err(JwtError::UnknownKey(_))
        ));
        let t = s.sign(&claims());
        assert_eq!(
            verify(&t, &keys, &expected(), NOW + 3600 + LEEWAY_SECS + 1),
            Err(JwtError::Expired)
        );
        assert_eq!(
            verify(&t, &keys, &expected(), NOW - LEEWAY_SECS - 100),
            Err(JwtError::NotYetValid)
        );
        let mut c = claims();
        c["iss"] = "https://evil".into();
        assert!(matches!(
            verify(&s.sign(&c), &keys, &expected(), NOW),
            Err(JwtError::WrongIssuer(_))
        ));
        let mut c = claims();
        c["aud"] = serde_json::json!(["https://kubernetes.default.svc"]);
        assert!(matches!(
            verify(&s.sign(&c), &keys, &expected(), NOW),
            Err(JwtError::WrongAudience(_))
        ));
        let mut c = claims();
        c["aud"] = "istio-ca".into();
        assert!(
            verify(&s.sign(&c), &keys, &expected(), NOW).is_ok(),
            "a single audience string"
        );
        let mut c = claims();
        c.as_object_mut().unwrap().remove("exp");
        assert_eq!(
            verify(&s.sign(&c), &keys, &expected(), NOW),
            Err(JwtError::MissingClaim("exp"))
        );
    }

    #[test]
    fn garbage_never_panics() {
        let (_, keys) = signer();
        for t in ["", ".", "..", "a.b.c", "ey.ey.ey", "\u{0}.\u{0}.\u{0}", "a.b.c.d"] {
            assert!(verify(t, &keys, &expected(), NOW).is_err(), "{t:?}");
        }
        assert!(KeySet::parse("{}").is_err());
        assert!(KeySet::parse(r#"{"keys":[{"kty":"oct","k":"AA"}]}"#).is_err());
    }
}
