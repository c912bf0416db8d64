//! Entry points for the fuzz targets in `fuzz/` (feature `fuzzing`): each
//! feeds one input that crosses a trust boundary to the parser the agent
//! uses, and panics when what must hold of the result does not: a panic is
//! a finding, whether the parser's own or the property's.
//!
//! The parsers stay crate-private; these wrappers are the only way in, so
//! a target cannot come to depend on more than the parse it exercises.

use std::io::BufReader;
use std::path::Path;

/// A CONNECT `:authority` and a `forwarded` header, as a peer's tunnel
/// stream sends them.
///
/// Holds: an accepted authority has a port and is in canonical form (an
/// IPv4-mapped address is its IPv4 address, so a pod's IPv4 and its mapped
/// form name the same destination), and writing it back yields the same
/// address; an accepted `forwarded` client likewise round-trips.
pub fn hbone_headers(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let (authority, forwarded) = text.split_once('\n').unwrap_or((text, ""));
    if let Some(addr) = crate::proxy::hbone::parse_authority(authority) {
        assert_ne!(addr.port(), 0, "{authority:?} accepted with port 0");
        assert_eq!(
            addr.ip(),
            addr.ip().to_canonical(),
            "{authority:?} accepted uncanonical"
        );
        let again = crate::proxy::hbone::parse_authority(&crate::proxy::hbone::authority(addr));
        assert_eq!(again, Some(addr), "{authority:?} does not round-trip");
    }
    if let Some(client) = crate::proxy::hbone::parse_forwarded_for(forwarded) {
        let again = crate::proxy::hbone::parse_forwarded_for(&crate::proxy::hbone::forwarded_for(client));
        assert_eq!(again, Some(client), "forwarded {forwarded:?} does not round-trip");
    }
}

/// One line on the agent's CNI socket, as any local process may write it.
///
/// Holds: a line is read only whole and within the bound, and a request
/// that parses is re-encoded to a line that parses to the same request
/// (what the plugin sends is what the agent reads).
pub fn cni_request(data: &[u8]) {
    use crate::cni::protocol::{MAX_LINE, Request, encode, read_message};
    let mut r = BufReader::new(data);
    if let Ok(req) = read_message::<Request>(&mut r) {
        let line_end = data
            .iter()
            .position(|&b| b == b'\n')
            .expect("a read line ends in a newline");
        assert!(
            line_end < MAX_LINE,
            "a line of {line_end} bytes was read past the bound"
        );
        let line = encode(&req);
        let again: Request = read_message(&mut BufReader::new(&line[..])).expect("an encoded request reads back");
        assert_eq!(again, req, "the request does not round-trip");
    }
}

/// The first bytes an app sends to a destination outside the mesh, which
/// egress `tls-only` peeks at.
///
/// Holds: nothing that is not a TLS handshake record opening with a
/// ClientHello passes, whatever its length.
pub fn client_hello(data: &[u8]) {
    if crate::proxy::egress::could_be_client_hello(data) {
        for (i, want) in [(0, 0x16), (1, 0x03), (5, 0x01)] {
            if let Some(&b) = data.get(i) {
                assert_eq!(b, want, "byte {i} of {data:?} passed as a ClientHello");
            }
        }
        if let Some(&v) = data.get(2) {
            assert!((0x01..=0x03).contains(&v), "record version 3.{v} passed");
        }
    }
}

/// A duration from a flag, an environment variable or a config file.
///
/// Holds: an accepted duration is shown in a form that parses back to it.
pub fn duration(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(d) = crate::config::parse_duration(text) {
        let shown = crate::config::HumanDuration(d).to_string();
        assert_eq!(
            crate::config::parse_duration(&shown),
            Ok(d),
            "{text:?} is shown as {shown:?}"
        );
    }
}

/// A file of Kubernetes YAML in the config directory (policies, pods,
/// Services, namespaces), or the same objects from the API.
///
/// Holds: the parse finishes without a panic whatever the text (deep
/// nesting, aliases, huge numbers, any bytes), and the same text parses to
/// the same objects and rejections twice (no hidden state).
pub fn k8s_yaml(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let path = Path::new("fuzz.yaml");
    let first = crate::source::objects::parse_file(path, text);
    let second = crate::source::objects::parse_file(path, text);
    match (&first, &second) {
        (Ok(a), Ok(b)) => assert_eq!(a, b, "two parses of one text disagree"),
        (Err(a), Err(b)) => assert_eq!(a, b, "two parses fail differently"),
        _ => panic!("one text parsed once and failed once"),
    }
}

/// A gRPC body on the CA service's `CreateCertificate`, from any caller
/// that reaches the port, and the CSR inside it.
///
/// Holds: an accepted message declared no more than the bound and came
/// uncompressed; it re-frames to a body that reads back the same; and a
/// CSR the CA accepts carries an ECDSA P-256 key whose own signature
/// verified (the only thing the CA takes from it).
pub fn ca_request(data: &[u8]) {
    use crate::identity::ca_proto::{IstioCertificateRequest, MAX_MESSAGE, frame, unframe};
    let Ok(req) = unframe::<IstioCertificateRequest>(bytes::Bytes::copy_from_slice(data)) else {
        return;
    };
    assert_eq!(data[0], 0, "a compressed message was read");
    let declared = u32::from_be_bytes([data[1], data[2], data[3], data[4]]) as usize;
    assert!(
        declared <= MAX_MESSAGE,
        "a message of {declared} bytes was read past the bound"
    );
    let again: IstioCertificateRequest = unframe(frame(&req)).expect("a framed request reads back");
    assert_eq!(again, req, "the request does not round-trip");
    if let Ok(spki) = crate::identity::authority::csr_public_key(&req.csr) {
        assert_eq!(
            rcgen::PublicKeyData::algorithm(&spki),
            &rcgen::PKCS_ECDSA_P256_SHA256,
            "a CSR with another key type was accepted"
        );
    }
}

/// The CA service's issuance log, read back by `nodeward ca log verify`
/// and the audit (whoever can write the file).
///
/// Holds: reading ends without a panic whatever the bytes, and a log that
/// verifies verifies again to the same head and line count.
pub fn issuance_log(data: &[u8]) {
    let first = crate::ca_service::ledger::verify(data);
    let second = crate::ca_service::ledger::verify(data);
    match (first, second) {
        (Ok(a), Ok(b)) => assert_eq!(a, b, "two reads of one log disagree"),
        (Err(_), Err(_)) => {}
        _ => panic!("one log verified once and failed once"),
    }
}

/// A ServiceAccount token presented to the CA service (any caller), and a
/// JWKS document as OIDC discovery returns it (the API server's).
///
/// Holds: no token verifies against a key whose private half nobody
/// outside this process has (the fuzzer signs nothing: an accepted token
/// is a forgery), and none verifies against a key set taken from the
/// input either (a weak key or `alg` confusion that let a chosen key
/// verify an unsigned token would); a JWKS document gets an answer.
pub fn jwt(data: &[u8]) {
    use crate::ca_service::jwt::{Expected, KeySet, verify};
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let (jwks, token) = text.split_once('\n').unwrap_or(("", text));
    let expected = Expected {
        issuer: "https://kubernetes.default.svc.cluster.local".into(),
        audience: "istio-ca".into(),
    };
    let now = 1_800_000_000;
    let r = verify(token, fuzz_keys(), &expected, now);
    assert!(r.is_err(), "a token nobody signed was accepted: {token:?} -> {r:?}");
    if let Ok(keys) = KeySet::parse(jwks) {
        let r = verify(token, &keys, &expected, now);
        assert!(
            r.is_err(),
            "a token verified against the input's own key set: {text:?} -> {r:?}"
        );
    }
}

/// A key set of one fresh P-256 key, made once per process.
fn fuzz_keys() -> &'static crate::ca_service::jwt::KeySet {
    use base64::Engine;
    use ring::signature::KeyPair;
    static KEYS: std::sync::OnceLock<crate::ca_service::jwt::KeySet> = std::sync::OnceLock::new();
    KEYS.get_or_init(|| {
        let rng = ring::rand::SystemRandom::new();
        let alg = &ring::signature::ECDSA_P256_SHA256_FIXED_SIGNING;
        let pkcs8 = ring::signature::EcdsaKeyPair::generate_pkcs8(alg, &rng).expect("P-256 key generation");
        let key = ring::signature::EcdsaKeyPair::from_pkcs8(alg, pkcs8.as_ref(), &rng).expect("generated key parses");
        let point = key.public_key().as_ref();
        let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
        let jwks = serde_json::json!({"keys": [{
            "kty": "EC", "crv": "P-256", "use": "sig", "kid": "fuzz",
            "x": b64.encode(&point[1..33]), "y": b64.encode(&point[33..65]),
        }]});
        crate::ca_service::jwt::KeySet::parse(&jwks.to_string()).expect("the fuzz key set parses")
    })
}

/// A CRL file (`--crl`) or a PEM certificate file (`--ca-root`, the CA
/// directory), as whoever can write them left them.
///
/// Holds: a CRL is loaded only if a trusted CA signed it (here a fresh CA
/// nobody outside this process holds the key of, so none is), and the
/// certificates of an accepted PEM file read back the same from the PEM
/// this agent writes for them.
pub fn crl_pem(data: &[u8]) {
    use std::io::Write;
    let path = std::env::temp_dir().join(format!("nodeward-fuzz-crl-pem-{}", std::process::id()));
    let written = std::fs::File::create(&path).and_then(|mut f| f.write_all(data));
    if written.is_err() {
        return;
    }
    if let Ok(ders) = crate::identity::trust::read_crl_ders(&path) {
        let loaded = crate::identity::trust::validate_crls(&ders, std::slice::from_ref(fuzz_issuer()));
        assert!(loaded.is_err(), "a CRL nobody signed was loaded");
    }
    if let Ok(certs) = crate::identity::ca::read_certs(&path) {
        let pem: String = certs
            .iter()
            .map(|c| crate::identity::ca::pem_text("CERTIFICATE", c.as_ref()))
            .collect();
        let again = std::fs::write(&path, pem).map(|()| crate::identity::ca::read_certs(&path));
        match again {
            Ok(Ok(again)) => assert_eq!(again, certs, "certificates do not read back from their own PEM"),
            Ok(Err(e)) => panic!("certificates written as PEM no longer read: {e}"),
            Err(_) => {}
        }
    }
}

/// A CA certificate made once per process.
fn fuzz_issuer() -> &'static rustls::pki_types::CertificateDer<'static> {
    static ISSUER: std::sync::OnceLock<rustls::pki_types::CertificateDer<'static>> = std::sync::OnceLock::new();
    ISSUER.get_or_init(|| {
        let key = rcgen::KeyPair::generate().expect("key generation");
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).expect("params");
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        params.distinguished_name.push(rcgen::DnType::CommonName, "fuzz CA");
        params.self_signed(&key).expect("self-signed CA").der().clone()
    })
}

/// The head of a request on the readiness, metrics or admin port (the
/// first from anything that reaches the node's address).
///
/// Holds: an accepted request line's method and path are single words of
/// that line, the path holds no query, and every query parameter read
/// is a piece of the query with no separator in it.
pub fn admin_request(data: &[u8]) {
    let head = String::from_utf8_lossy(data);
    let Some(req) = crate::admin::server::Request::parse(&head) else {
        return;
    };
    let first = head.lines().next().expect("a parsed head has a line");
    let words: Vec<&str> = first.split_whitespace().collect();
    assert_eq!(words.first(), Some(&req.method), "method {:?} of {first:?}", req.method);
    assert!(!req.path.contains('?'), "path {:?} holds a query", req.path);
    let target = words.get(1).expect("a parsed line has a target");
    assert!(target.starts_with(req.path), "path {:?} is not {target:?}'s", req.path);
    if let Some(q) = req.query {
        for name in q.split('&').filter_map(|kv| kv.split_once('=').map(|(k, _)| k)) {
            let v = req.param(name).expect("a parameter in the query is found");
            assert!(
                q.contains(v) && !v.contains('&'),
                "param {name:?} read as {v:?} from {q:?}"
            );
        }
    }
}

/// A CA service's answer to `CreateCertificate`, as the gRPC body the
/// agent's client reads (whoever answers on `--ca-address`).
///
/// Holds: an answer is used only if it certifies the key the agent sent
/// for the identity it asked, under the agent's own roots: with roots
/// whose key stays in this process, no answer passes, however it is
/// built; and an answer that reads re-frames to itself.
pub fn ca_response(data: &[u8]) {
    use crate::identity::ca_proto::{IstioCertificateResponse, frame, unframe};
    let Ok(resp) = unframe::<IstioCertificateResponse>(bytes::Bytes::copy_from_slice(data)) else {
        return;
    };
    let again: IstioCertificateResponse = unframe(frame(&resp)).expect("a framed response reads back");
    assert_eq!(again, resp, "the response does not round-trip");
    let id = crate::identity::Identity::new("cluster.local", "ns", "sa");
    let key = fuzz_workload_key();
    let r =
        crate::identity::ca_client::check_answer(std::slice::from_ref(fuzz_issuer()), "cluster.local", &id, key, &resp);
    assert!(r.is_err(), "an answer nobody signed was accepted: {r:?}");
}

/// The public key of a workload key made once per process.
fn fuzz_workload_key() -> &'static [u8] {
    static KEY: std::sync::OnceLock<Vec<u8>> = std::sync::OnceLock::new();
    KEY.get_or_init(|| {
        rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)
            .expect("key generation")
            .public_key_raw()
            .to_vec()
    })
}

/// The socket the CNI plugin target's configs name: one that does not
/// exist, so no run ever dials a real socket on the host.
const NO_AGENT: &str = "/nonexistent/nodeward-fuzz/cni.sock";

/// The CNI plugin's environment and stdin, as the runtime (or anything
/// that can run the binary) passes them: `NAME=value` lines, an empty
/// line, then the network configuration.
///
/// Holds: with no agent answering, no ADD or CHECK succeeds (a pod never
/// starts uncaptured, whatever the config and environment say), the exit
/// status is 0 only for VERSION and DEL, and stdout is always one JSON
/// object: the result, or the spec's error with its code.
pub fn cni_plugin(data: &[u8]) {
    let split = data.windows(2).position(|w| w == b"\n\n");
    let (env_part, stdin) = match split {
        Some(i) => (&data[..i], &data[i + 2..]),
        None => (data, &[][..]),
    };
    let env: std::collections::HashMap<String, String> = String::from_utf8_lossy(env_part)
        .lines()
        .filter_map(|l| l.split_once('=').map(|(k, v)| (k.to_string(), v.to_string())))
        .collect();
    // A config the plugin decodes names its socket; any other JSON shape
    // could too (serde reads a struct from an array), so only objects run,
    // with the socket replaced.
    let stdin = match serde_json::from_slice::<serde_json::Value>(stdin) {
        Ok(serde_json::Value::Object(mut conf)) => {
            conf.insert("agentSocket".into(), NO_AGENT.into());
            serde_json::to_vec(&conf).expect("a JSON object serialises")
        }
        Ok(_) => return,
        Err(_) => stdin.to_vec(),
    };
    let out = crate::cni::plugin::run(|k| env.get(k).cloned(), &stdin[..]);
    let command = env.get("CNI_COMMAND").map(String::as_str).unwrap_or("");
    if out.status == 0 {
        assert!(
            matches!(command, "VERSION" | "DEL"),
            "{command} succeeded with no agent: {}",
            String::from_utf8_lossy(&out.stdout)
        );
    }
    let printed: Result<serde_json::Value, _> = serde_json::from_slice(&out.stdout);
    match printed {
        Ok(serde_json::Value::Object(o)) => {
            if out.status != 0 {
                assert!(
                    o.get("code").is_some_and(|c| c.is_u64()),
                    "an error without a code: {o:?}"
                );
            }
        }
        // DEL prints nothing.
        _ if out.stdout.is_empty() && out.status == 0 => {}
        other => panic!("stdout is not one JSON object: {other:?} ({:?})", out.stdout),
    }
}
