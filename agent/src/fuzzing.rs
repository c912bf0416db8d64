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
