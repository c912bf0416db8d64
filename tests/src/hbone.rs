//! Speaking HBONE to an agent from a test: as a legitimate workload, as an
//! impostor, or as a hostile client, with certificates from the topology's
//! CA (or another) through the agent's own identity library.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use nodeward::identity::Identity;
use nodeward::identity::authority::Authority;
use nodeward::identity::tls::{self, FixedCert, certified_key};
use nodeward::identity::trust::{TrustSnapshot, TrustStore};
use rustls::pki_types::ServerName;
use rustls::sign::CertifiedKey;
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;

use crate::netns::run_in;

/// A workload certificate for `identity` from the CA in `ca_dir`.
pub fn workload_cert(ca_dir: &Path, identity: &Identity) -> Arc<CertifiedKey> {
    let ca = Authority::load(ca_dir).expect("load test CA");
    let issued = ca.issue(identity, Duration::from_secs(3600)).expect("issue");
    certified_key(issued.chain, issued.key).expect("certified key")
}

/// Trust in the CA of `ca_dir`.
pub fn trust(ca_dir: &Path) -> Arc<TrustStore> {
    let ca = Authority::load(ca_dir).expect("load test CA");
    TrustStore::new(TrustSnapshot::new("cluster.local", ca.roots().to_vec(), ca.chain()))
}

/// A TCP connection made from inside namespace `netns`, for tokio.
pub fn tcp_from(netns: &str, dst: SocketAddr) -> std::io::Result<TcpStream> {
    let s = run_in(netns, move || {
        std::net::TcpStream::connect_timeout(&dst, Duration::from_secs(5))
    })?;
    s.set_nonblocking(true)?;
    TcpStream::from_std(s)
}

/// TLS to an agent's 15008 from `netns`, presenting `cert` as `me` and
/// requiring the server to be `expected`.
pub async fn tls_to(
    netns: &str,
    dst: SocketAddr,
    cert: Option<Arc<CertifiedKey>>,
    me: Identity,
    expected: Identity,
    trust: Arc<TrustStore>,
) -> std::io::Result<tokio_rustls::client::TlsStream<TcpStream>> {
    let tcp = tcp_from(netns, dst)?;
    tls_over(tcp, dst, cert, me, expected, trust).await
}

/// [`tls_to`] over a TCP connection to `dst` already made (a client that
/// takes its time before its ClientHello).
pub async fn tls_over(
    tcp: TcpStream,
    dst: SocketAddr,
    cert: Option<Arc<CertifiedKey>>,
    me: Identity,
    expected: Identity,
    trust: Arc<TrustStore>,
) -> std::io::Result<tokio_rustls::client::TlsStream<TcpStream>> {
    let config = match cert {
        Some(c) => tls::client_config(Arc::new(FixedCert(c)), me, trust, expected),
        None => Arc::new(
            rustls::ClientConfig::builder_with_provider(tls::provider())
                .with_protocol_versions(&[&rustls::version::TLS13])
                .expect("tls13")
                .dangerous()
                .with_custom_certificate_verifier(Arc::new(nodeward::identity::verify::SvidVerifier::for_server(
                    trust,
                    tls::provider(),
                    expected,
                )))
                .with_no_client_auth(),
        ),
    };
    let mut config = (*config).clone();
    config.alpn_protocols = vec![b"h2".to_vec()];
    TlsConnector::from(Arc::new(config))
        .connect(ServerName::IpAddress(dst.ip().into()), tcp)
        .await
}

/// An HTTP/2 client over an established TLS stream; the connection is
/// driven on a spawned task.
pub async fn h2_client(
    tls: tokio_rustls::client::TlsStream<TcpStream>,
    max_header_list: u32,
) -> Result<h2::client::SendRequest<Bytes>, h2::Error> {
    let (send, conn) = h2::client::Builder::new()
        .max_header_list_size(max_header_list)
        .handshake(tls)
        .await?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    Ok(send)
}

/// Sends a request with `method` and `authority` and returns the status,
/// or the error the stream ended with.
pub async fn request(
    send: &mut h2::client::SendRequest<Bytes>,
    method: http::Method,
    authority: &str,
    extra_header: Option<(&str, String)>,
) -> Result<http::StatusCode, h2::Error> {
    let mut b = http::Request::builder().method(method.clone());
    b = if method == http::Method::CONNECT {
        b.uri(authority)
    } else {
        b.uri(format!("http://{authority}/"))
    };
    if let Some((k, v)) = extra_header {
        b = b.header(k, v);
    }
    let req = b.body(()).expect("request");
    let mut ready = send.clone().ready().await?;
    let (resp, _body) = ready.send_request(req, false)?;
    Ok(resp.await?.status())
}

/// A hostile client's mix: `resets` times, opens a CONNECT stream to
/// `authority` and cancels it at once, each followed by `good_between`
/// well-behaved streams (answered, one byte each way with an
/// [`info_echo`](crate::traffic::info_echo) app, closed cleanly). Like a
/// real attacker it does not wait for the good streams before the next
/// reset (up to [`GOOD_IN_FLIGHT`] of them are open at once), so its reset
/// rate is the connection's, not one round trip per reset. Returns how
/// many resets were sent, or the error once the server cut the connection
/// off.
pub async fn interleaved_resets(
    send: &h2::client::SendRequest<Bytes>,
    authority: &str,
    resets: usize,
    good_between: usize,
) -> Result<usize, String> {
    let connect = || {
        http::Request::builder()
            .method(http::Method::CONNECT)
            .uri(authority)
            .body(())
            .expect("request")
    };
    let mut good = tokio::task::JoinSet::new();
    let finished = |r: Result<Result<(), h2::Error>, tokio::task::JoinError>, i: usize| match r {
        Ok(Ok(())) => Ok(()),
        Ok(Err(e)) => Err(format!("good stream after {i} resets: {e}")),
        Err(e) => Err(format!("good stream after {i} resets: {e}")),
    };
    for i in 0..resets {
        let mut ready = send
            .clone()
            .ready()
            .await
            .map_err(|e| format!("after {i} resets: {e}"))?;
        let (_resp, mut body) = ready
            .send_request(connect(), false)
            .map_err(|e| format!("after {i} resets: {e}"))?;
        body.send_reset(h2::Reason::CANCEL);
        for _ in 0..good_between {
            if good.len() >= GOOD_IN_FLIGHT
                && let Some(r) = good.join_next().await
            {
                finished(r, i)?;
            }
            let (send, req) = (send.clone(), connect());
            good.spawn(async move { good_stream(&send, req).await });
        }
    }
    while let Some(r) = good.join_next().await {
        finished(r, resets)?;
    }
    Ok(resets)
}

/// How many good streams [`interleaved_resets`] keeps open at once.
pub const GOOD_IN_FLIGHT: usize = 16;

/// One stream that does what a client should: waits for 200, sends a byte,
/// half-closes, and reads the app's answer to its end.
async fn good_stream(send: &h2::client::SendRequest<Bytes>, req: http::Request<()>) -> Result<(), h2::Error> {
    let mut ready = send.clone().ready().await?;
    let (resp, mut body) = ready.send_request(req, false)?;
    let resp = resp.await?;
    if resp.status() != http::StatusCode::OK {
        return Err(h2::Error::from(h2::Reason::REFUSED_STREAM));
    }
    body.send_data(Bytes::from_static(b"x"), true)?;
    let mut recv = resp.into_body();
    while let Some(chunk) = recv.data().await {
        let chunk = chunk?;
        let _ = recv.flow_control().release_capacity(chunk.len());
    }
    Ok(())
}
