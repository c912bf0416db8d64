//! Istio's CA protocol (`security/v1alpha1/ca.proto`), shared by the
//! agent's client and `nodeward ca serve`: the two messages, derived by
//! hand with prost (no code generator), and gRPC's unary-call framing over
//! h2 (a 5-byte prefix per message, status in trailers), so istiod,
//! istio-csr and ztunnel speak to either side unchanged.

#![forbid(unsafe_code)]

use std::collections::BTreeMap;

use bytes::{Buf, BufMut, Bytes, BytesMut};

/// The one method: `istio.v1.auth.IstioCertificateService/CreateCertificate`.
pub(crate) const CREATE_CERTIFICATE_PATH: &str = "/istio.v1.auth.IstioCertificateService/CreateCertificate";
/// Request metadata key naming the identity a node agent asks for.
pub(crate) const IMPERSONATED_IDENTITY: &str = "ImpersonatedIdentity";
/// Largest message either side accepts: a CSR or a chain is a few KiB.
pub(crate) const MAX_MESSAGE: usize = 64 * 1024;

/// `IstioCertificateRequest`.
#[derive(Clone, PartialEq, prost::Message)]
pub(crate) struct IstioCertificateRequest {
    /// PEM CSR; only its public key is used.
    #[prost(string, tag = "1")]
    pub(crate) csr: String,
    /// Requested lifetime, seconds.
    #[prost(int64, tag = "3")]
    pub(crate) validity_duration: i64,
    /// `ImpersonatedIdentity` and the like.
    #[prost(message, optional, tag = "4")]
    pub(crate) metadata: Option<Struct>,
}

/// `IstioCertificateResponse`.
#[derive(Clone, PartialEq, prost::Message)]
pub(crate) struct IstioCertificateResponse {
    /// PEM certificates: leaf first, then intermediates, the root last.
    #[prost(string, repeated, tag = "1")]
    pub(crate) cert_chain: Vec<String>,
}

/// `google.protobuf.Struct`.
#[derive(Clone, PartialEq, prost::Message)]
pub(crate) struct Struct {
    /// Its fields.
    #[prost(btree_map = "string, message", tag = "1")]
    pub(crate) fields: BTreeMap<String, Value>,
}

/// `google.protobuf.Value`, scalar kinds only (nested structs and lists
/// are skipped as unknown fields: the protocol uses none).
#[derive(Clone, PartialEq, prost::Message)]
pub(crate) struct Value {
    /// The value.
    #[prost(oneof = "Kind", tags = "1, 2, 3, 4")]
    pub(crate) kind: Option<Kind>,
}

/// `google.protobuf.Value.kind`.
#[derive(Clone, PartialEq, prost::Oneof)]
// The variants keep protobuf's field names (`null_value`, ...).
#[allow(clippy::enum_variant_names)]
pub(crate) enum Kind {
    /// `null_value`.
    #[prost(int32, tag = "1")]
    NullValue(i32),
    /// `number_value`.
    #[prost(double, tag = "2")]
    NumberValue(f64),
    /// `string_value`.
    #[prost(string, tag = "3")]
    StringValue(String),
    /// `bool_value`.
    #[prost(bool, tag = "4")]
    BoolValue(bool),
}

impl IstioCertificateRequest {
    /// The `ImpersonatedIdentity` metadata, if any.
    pub(crate) fn impersonated(&self) -> Option<&str> {
        match self
            .metadata
            .as_ref()?
            .fields
            .get(IMPERSONATED_IDENTITY)?
            .kind
            .as_ref()?
        {
            Kind::StringValue(s) => Some(s),
            _ => None,
        }
    }
}

/// Metadata holding `ImpersonatedIdentity: id`.
pub(crate) fn impersonating(id: &str) -> Struct {
    let mut fields = BTreeMap::new();
    fields.insert(
        IMPERSONATED_IDENTITY.to_string(),
        Value {
            kind: Some(Kind::StringValue(id.to_string())),
        },
    );
    Struct { fields }
}

/// gRPC's length-prefixed message: flag 0 (uncompressed), length, bytes.
pub(crate) fn frame(msg: &impl prost::Message) -> Bytes {
    let body = msg.encode_to_vec();
    let mut b = BytesMut::with_capacity(5 + body.len());
    b.put_u8(0);
    b.put_u32(body.len() as u32);
    b.put_slice(&body);
    b.freeze()
}

/// Why a gRPC body could not be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub(crate) enum FrameError {
    /// Fewer bytes than the prefix says.
    #[error("truncated gRPC message")]
    Truncated,
    /// Compressed messages are not negotiated.
    #[error("compressed gRPC message (no compression was negotiated)")]
    Compressed,
    /// Larger than [`MAX_MESSAGE`].
    #[error("gRPC message of {0} bytes is too large")]
    TooLarge(usize),
    /// Not the expected protobuf.
    #[error("undecodable message: {0}")]
    Decode(String),
}

/// Decodes the one message of a unary body.
pub(crate) fn unframe<M: prost::Message + Default>(mut body: Bytes) -> Result<M, FrameError> {
    if body.len() < 5 {
        return Err(FrameError::Truncated);
    }
    let flag = body.get_u8();
    let len = body.get_u32() as usize;
    if flag != 0 {
        return Err(FrameError::Compressed);
    }
    if len > MAX_MESSAGE {
        return Err(FrameError::TooLarge(len));
    }
    if body.len() < len {
        return Err(FrameError::Truncated);
    }
    M::decode(body.split_to(len)).map_err(|e| FrameError::Decode(e.to_string()))
}

/// gRPC status codes used here.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Code {
    /// 3: a malformed request.
    InvalidArgument = 3,
    /// 7: authenticated, not allowed.
    PermissionDenied = 7,
    /// 8: a body too large.
    ResourceExhausted = 8,
    /// 12: another method.
    Unimplemented = 12,
    /// 13: the service failed itself.
    Internal = 13,
    /// 14: the service cannot answer now (its issuance log cannot be
    /// written); the client retries.
    Unavailable = 14,
    /// 16: no or a bad token.
    Unauthenticated = 16,
}

/// Reads a body up to [`MAX_MESSAGE`] plus prefix, releasing flow control
/// as it goes.
pub(crate) async fn read_body(body: &mut h2::RecvStream) -> Result<Bytes, String> {
    let mut buf = BytesMut::new();
    while let Some(chunk) = body.data().await {
        let chunk = chunk.map_err(|e| e.to_string())?;
        let _ = body.flow_control().release_capacity(chunk.len());
        if buf.len() + chunk.len() > MAX_MESSAGE + 5 {
            return Err(format!("body larger than {MAX_MESSAGE} bytes"));
        }
        buf.extend_from_slice(&chunk);
    }
    Ok(buf.freeze())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_request_round_trips_with_its_impersonated_identity() {
        let req = IstioCertificateRequest {
            csr: "-----BEGIN CERTIFICATE REQUEST-----".into(),
            validity_duration: 3600,
            metadata: Some(impersonating("spiffe://cluster.local/ns/a/sa/b")),
        };
        let back: IstioCertificateRequest = unframe(frame(&req)).unwrap();
        assert_eq!(back, req);
        assert_eq!(back.impersonated(), Some("spiffe://cluster.local/ns/a/sa/b"));
        // Field numbers of ca.proto: csr = 1 (0x0a), validity_duration = 3 (0x18), metadata = 4 (0x22).
        let wire = prost::Message::encode_to_vec(&req);
        assert_eq!(wire[0], 0x0a);
        assert!(wire.contains(&0x18) && wire.contains(&0x22));
    }

    #[test]
    fn bad_bodies_are_errors() {
        assert_eq!(
            unframe::<IstioCertificateResponse>(Bytes::from_static(&[0, 0])),
            Err(FrameError::Truncated)
        );
        assert_eq!(
            unframe::<IstioCertificateResponse>(Bytes::from_static(&[1, 0, 0, 0, 0])),
            Err(FrameError::Compressed)
        );
        assert_eq!(
            unframe::<IstioCertificateResponse>(Bytes::from_static(&[0, 0xff, 0, 0, 0])),
            Err(FrameError::TooLarge(0xff00_0000))
        );
        assert!(unframe::<IstioCertificateResponse>(Bytes::from_static(&[0, 0, 0, 0, 2, 0xff, 0xff])).is_err());
    }
}
