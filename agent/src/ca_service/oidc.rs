//! Token verification keys from the API server's OIDC discovery
//! (`/.well-known/openid-configuration`, then its `jwks_uri`, normally
//! `/openid/v1/jwks`), fetched through the same Kubernetes client the pod
//! source uses, so in a cluster the service needs no JWKS file that would
//! go stale when the API server rotates its service-account keys.
//!
//! The keys are fetched at start (the discovered `issuer` must be
//! `--issuer`), again when a token names a `kid` the set lacks (a new key),
//! and every [`REFRESH_EVERY`] (so a removed key stops verifying even if no
//! token asks). Fetches are bounded: at most one per [`MIN_INTERVAL`]
//! whatever the tokens say, a body of at most [`MAX_BODY`] bytes, and a
//! failed or unusable fetch keeps the last good set.

#![forbid(unsafe_code)]

use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use serde::Deserialize;

use super::jwt::KeySet;

/// Fetches caused by unknown `kid`s are at least this far apart.
pub(crate) const MIN_INTERVAL: Duration = Duration::from_secs(10);
/// The set is fetched again this often regardless.
pub(crate) const REFRESH_EVERY: Duration = Duration::from_secs(300);
/// Largest discovery or JWKS document read.
const MAX_BODY: usize = 1024 * 1024;
/// Deadline of one fetch.
const FETCH_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Deserialize)]
struct Discovery {
    issuer: String,
    jwks_uri: String,
}

/// The issuer's keys as the API server publishes them.
pub(crate) struct Discovered {
    client: kube::Client,
    /// The path of `jwks_uri` on the API server.
    jwks_path: String,
    keys: RwLock<Arc<KeySet>>,
    /// When the last fetch was tried; serialises fetches.
    last: tokio::sync::Mutex<Instant>,
    /// The runtime, for fetches asked from the blocking request path.
    handle: tokio::runtime::Handle,
}

impl std::fmt::Debug for Discovered {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Discovered")
            .field("jwks_path", &self.jwks_path)
            .finish_non_exhaustive()
    }
}

/// GETs `path` from the API server as text, bounded in time and size.
async fn get(client: &kube::Client, path: &str) -> Result<String, String> {
    let req = http::Request::get(path)
        .body(Vec::new())
        .map_err(|e| format!("{path}: {e}"))?;
    let text = tokio::time::timeout(FETCH_TIMEOUT, client.request_text(req))
        .await
        .map_err(|_| format!("{path}: no answer within {FETCH_TIMEOUT:?}"))?
        .map_err(|e| format!("{path}: {e}"))?;
    if text.len() > MAX_BODY {
        return Err(format!("{path}: larger than {MAX_BODY} bytes"));
    }
    Ok(text)
}

impl Discovered {
    /// Discovers and fetches the keys; the discovered issuer must be `issuer`.
    pub(crate) async fn start(client: kube::Client, issuer: &str) -> Result<Discovered, String> {
        let text = get(&client, "/.well-known/openid-configuration").await?;
        let d: Discovery = serde_json::from_str(&text)
            .map_err(|e| format!("/.well-known/openid-configuration: not an OIDC discovery document: {e}"))?;
        if d.issuer != issuer {
            return Err(format!(
                "the API server's issuer is {:?}, not --issuer {issuer:?}: tokens would all be refused",
                d.issuer
            ));
        }
        let jwks_path = path_of(&d.jwks_uri)?;
        let keys = KeySet::parse(&get(&client, &jwks_path).await?).map_err(|e| format!("{jwks_path}: {e}"))?;
        Ok(Discovered {
            client,
            jwks_path,
            keys: RwLock::new(Arc::new(keys)),
            last: tokio::sync::Mutex::new(Instant::now()),
            handle: tokio::runtime::Handle::current(),
        })
    }

    /// The current keys.
    pub(crate) fn current(&self) -> Arc<KeySet> {
        self.keys.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Fetches the keys again unless a fetch was tried within
    /// `min_interval`; true when a new set is in place.
    pub(crate) async fn refresh(&self, min_interval: Duration) -> bool {
        let mut last = self.last.lock().await;
        if last.elapsed() < min_interval {
            return false;
        }
        *last = Instant::now();
        let fetched = get(&self.client, &self.jwks_path)
            .await
            .and_then(|text| KeySet::parse(&text).map_err(|e| format!("{}: {e}", self.jwks_path)));
        match fetched {
            Ok(keys) => {
                *self.keys.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(keys);
                tracing::info!(path = %self.jwks_path, "service-account issuer keys fetched");
                true
            }
            Err(e) => {
                tracing::warn!("fetching the service-account issuer's keys failed, keeping the last ones: {e}");
                false
            }
        }
    }

    /// [`Discovered::refresh`] for an unknown `kid`, from a blocking thread.
    pub(crate) fn refresh_blocking(&self) -> bool {
        self.handle.block_on(self.refresh(MIN_INTERVAL))
    }

    /// Refreshes every [`REFRESH_EVERY`] until `stop`.
    pub(crate) async fn run(self: Arc<Self>, stop: tokio_util::sync::CancellationToken) {
        loop {
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tokio::time::sleep(REFRESH_EVERY) => {}
            }
            self.refresh(Duration::ZERO).await;
        }
    }
}

/// The path (and query) of `uri`, which the API server serves.
fn path_of(uri: &str) -> Result<String, String> {
    let parsed: http::Uri = uri.parse().map_err(|e| format!("jwks_uri {uri:?}: {e}"))?;
    match parsed.path_and_query() {
        Some(p) if p.path().starts_with('/') && p.path() != "/" => Ok(p.to_string()),
        _ => Err(format!("jwks_uri {uri:?} names no path")),
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_jwks_path_is_taken_from_the_discovered_uri() {
        assert_eq!(
            super::path_of("https://10.0.0.1:6443/openid/v1/jwks").unwrap(),
            "/openid/v1/jwks"
        );
        assert_eq!(super::path_of("/openid/v1/jwks").unwrap(), "/openid/v1/jwks");
        assert!(super::path_of("https://issuer.example").is_err());
    }
}
