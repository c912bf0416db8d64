//! The foreign-identity check: an HBONE connection (mTLS to the pod's
//! 15008, then `CONNECT pod:port`) presenting a throwaway certificate of
//! `spiffe://<td>/ns/nodeward-verify/sa/denied` issued from `--ca-dir`.
//!
//! Where the config's policies would refuse that identity, the connection
//! must be refused (any answer but 200, a reset, or a failed handshake);
//! where they would not, the check says so and is not counted as a pass.

#![forbid(unsafe_code)]

use std::net::{IpAddr, SocketAddr};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use rustls::pki_types::ServerName;
use rustls::sign::CertifiedKey;
use tokio_rustls::TlsConnector;

use super::{Check, CheckKind, Status, probe};
use crate::identity::Identity;
use crate::identity::authority::Authority;
use crate::identity::tls::{FixedCert, certified_key, client_config};
use crate::identity::trust::{TrustSnapshot, TrustStore};
use crate::policy::ConnInfo;
use crate::state::Snapshot;
use crate::state::workload::Pod;

/// Namespace of the foreign identity: one no workload runs in.
pub(crate) const FOREIGN_NAMESPACE: &str = "nodeward-verify";
/// Service account of the foreign identity.
pub(crate) const FOREIGN_SERVICE_ACCOUNT: &str = "denied";

/// Lifetime of the throwaway certificate.
const LIFETIME: Duration = Duration::from_secs(600);

/// Why an HBONE attempt got no status.
enum Failed {
    /// Before the tunnel was up (TCP, TLS, HTTP/2 handshake): says nothing
    /// about policy.
    Reach(String),
    /// The tunnel refused the stream (reset, GOAWAY).
    Tunnel(String),
}

/// An HBONE client holding the foreign identity's certificate.
pub(crate) struct Client {
    me: Identity,
    cert: Arc<CertifiedKey>,
    trust: Arc<TrustStore>,
    trust_domain: String,
    rt: tokio::runtime::Runtime,
}

impl Client {
    /// Issues the throwaway certificate from the CA in `ca_dir`.
    pub(crate) fn new(ca_dir: &Path, trust_domain: &str) -> Result<Client, String> {
        let ca = Authority::load(ca_dir).map_err(|e| e.to_string())?;
        let me = Identity::new(trust_domain, FOREIGN_NAMESPACE, FOREIGN_SERVICE_ACCOUNT);
        let issued = ca.issue(&me, LIFETIME).map_err(|e| e.to_string())?;
        let cert = certified_key(issued.chain, issued.key).map_err(|e| e.to_string())?;
        let trust = TrustStore::new(TrustSnapshot::new(trust_domain, ca.roots().to_vec(), ca.chain()));
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| e.to_string())?;
        Ok(Client {
            me,
            cert,
            trust,
            trust_domain: trust_domain.to_string(),
            rt,
        })
    }

    /// The check for `pod`'s `port` at `target`.
    pub(crate) fn check(
        &self,
        snap: &Snapshot,
        pod: &Pod,
        key: &str,
        target: IpAddr,
        port: u16,
        timeout: Duration,
    ) -> Check {
        let check = |status, detail: String| Check {
            pod: key.to_string(),
            check: CheckKind::ForeignIdentity,
            port: Some(port),
            status,
            detail,
        };
        let dst = SocketAddr::new(target, port);
        let src_ip = probe::source_for(dst).unwrap_or(target);
        let decision = snap.authorize(
            pod,
            &ConnInfo {
                src_ip,
                src_identity: Some(self.me.clone()),
                dst_ip: target,
                dst_port: port,
            },
        );
        if decision.allowed {
            return check(
                Status::NotTested,
                format!("no DENY/ALLOW would refuse a foreign identity ({})", self.me),
            );
        }
        let by = decision.policy.map(|p| format!(" by {p}")).unwrap_or_default();
        let expected = Identity::new(&self.trust_domain, &pod.namespace, &pod.service_account);
        match self
            .rt
            .block_on(async { tokio::time::timeout(timeout * 2, self.connect(dst, expected, timeout)).await })
        {
            Ok(Ok(status)) if status == http::StatusCode::OK => check(
                Status::Fail,
                format!(
                    "{} ACCEPTED over mTLS although policy should refuse it ({}{by})",
                    self.me,
                    decision.reason.as_str()
                ),
            ),
            Ok(Ok(status)) => check(
                Status::Pass,
                format!(
                    "{} refused (HTTP {}); expected: {}{by}",
                    self.me,
                    status.as_u16(),
                    decision.reason.as_str()
                ),
            ),
            Ok(Err(Failed::Tunnel(e))) => check(
                Status::Pass,
                format!("{} refused ({e}); expected: {}{by}", self.me, decision.reason.as_str()),
            ),
            // Not reaching the tunnel says nothing about policy.
            Ok(Err(Failed::Reach(e))) => check(Status::NotTested, format!("cannot reach the pod's tunnel: {e}")),
            Err(_) => check(Status::NotTested, format!("no answer within {:?}", timeout * 2)),
        }
    }

    /// HBONE to `dst`'s pod: TLS with the foreign certificate, then
    /// `CONNECT dst`; the response status.
    async fn connect(
        &self,
        dst: SocketAddr,
        expected: Identity,
        timeout: Duration,
    ) -> Result<http::StatusCode, Failed> {
        let reach = |e: String| Failed::Reach(e);
        let refused = |e: String| Failed::Tunnel(e);
        let tunnel = SocketAddr::new(dst.ip(), nodeward_common::TUNNEL_PORT);
        let tcp = probe::connect_from_node(tunnel, timeout).map_err(|e| reach(format!("connect {tunnel}: {e}")))?;
        tcp.set_nonblocking(true).map_err(|e| reach(e.to_string()))?;
        let tcp = tokio::net::TcpStream::from_std(tcp).map_err(|e| reach(e.to_string()))?;
        let config = client_config(
            Arc::new(FixedCert(self.cert.clone())),
            self.me.clone(),
            self.trust.clone(),
            expected,
        );
        let tls = TlsConnector::from(config)
            .connect(ServerName::IpAddress(dst.ip().into()), tcp)
            .await
            .map_err(|e| reach(format!("TLS: {e}")))?;
        let (send, conn) = h2::client::handshake(tls)
            .await
            .map_err(|e| reach(format!("HTTP/2: {e}")))?;
        tokio::spawn(async move {
            let _ = conn.await;
        });
        let req = http::Request::builder()
            .method(http::Method::CONNECT)
            .uri(dst.to_string())
            .body(())
            .map_err(|e| reach(e.to_string()))?;
        let mut ready = send.ready().await.map_err(|e| refused(format!("HTTP/2: {e}")))?;
        let (resp, mut body) = ready
            .send_request(req, false)
            .map_err(|e| refused(format!("HTTP/2: {e}")))?;
        let status = resp.await.map_err(|e| refused(format!("stream: {e}")))?.status();
        let _ = body.send_data(Bytes::new(), true);
        Ok(status)
    }
}
