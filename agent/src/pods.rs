//! Keeps the set of captured pods equal to the set the state says this node
//! manages: finds each pod's namespace, binds its listeners, fills the maps,
//! attaches steering, and undoes all of it when the pod goes.

#![forbid(unsafe_code)]

use std::collections::{HashMap, HashSet};
use std::net::IpAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use nodeward_common::{
    DIRECTION_INBOUND, DIRECTION_OUTBOUND, POD_DROP_INBOUND_UDP, POD_HAS_IPV4, POD_HAS_IPV6, PodInfo, PortKey,
};

use crate::capture::keys::ip_words;
use crate::capture::{Capture, CaptureError};
use crate::cni::server::CniRequest;
use crate::identity::Identity;
use crate::identity::ca::CaError;
use crate::identity::manager::CertManager;
use crate::netns::{Netns, NetnsError, NetnsFinder, Scan};
use crate::proxy::{Lifecycle, Mesh, PodContext, PodListeners, ProxyConfig};
use crate::state::Store;
use crate::state::workload::ManagedPod;

mod cni;

/// How often unresolved pods trigger a namespace scan at most.
const SCAN_INTERVAL: Duration = Duration::from_millis(500);
/// Reconcile at least this often, even without config changes.
const TICK: Duration = Duration::from_millis(500);

/// Why a pod could not be captured (it is retried).
#[derive(Debug, thiserror::Error)]
pub(crate) enum PodError {
    /// No namespace holds the pod's IP yet.
    #[error("no network namespace on this node holds {0:?} yet")]
    NoNamespace(Vec<IpAddr>),
    /// Several namespaces hold the IP: capturing either could be wrong, and
    /// leaving them alone would leave the pod open, so all are quarantined.
    #[error(
        "{ips:?} are held by several network namespaces ({}): their traffic is refused until one remains",
        describe(.namespaces)
    )]
    Ambiguous {
        /// The pod's addresses.
        ips: Vec<IpAddr>,
        /// The namespaces, as the scan opened them.
        namespaces: Vec<Arc<Netns>>,
    },
    /// The runtime deleted the pod's current sandbox (CNI DEL): no
    /// namespace is looked for by address until its ADD names a new one,
    /// since the freed address may already be another pod's.
    #[error("the runtime deleted the pod's sandbox (CNI DEL); waiting for the ADD of a new one")]
    SandboxDeleted,
    /// The next namespace scan is not due yet; nothing is known.
    #[error("waiting for the next namespace scan")]
    Pending,
    /// Namespace trouble.
    #[error(transparent)]
    Netns(#[from] NetnsError),
    /// eBPF trouble.
    #[error(transparent)]
    Capture(#[from] CaptureError),
    /// A map write failed.
    #[error("updating eBPF maps: {0}")]
    Map(#[from] std::io::Error),
    /// The pod's certificate could not be issued.
    #[error("issuing the pod's certificate: {0}")]
    Identity(#[from] CaError),
}

fn describe(namespaces: &[Arc<Netns>]) -> String {
    let names: Vec<String> = namespaces
        .iter()
        .map(|n| format!("{} (cookie {})", n.path().display(), n.cookie()))
        .collect();
    names.join(", ")
}

/// A namespace whose traffic is refused while a pod's IP is ambiguous.
struct Quarantined {
    netns: Arc<Netns>,
    /// Whether its `sk_lookup` is attached (retried until it is).
    steering: bool,
}

struct ActivePod {
    ctx: Arc<PodContext>,
    /// The latest spec; `ctx.pod` keeps the one the pod was captured with.
    spec: ManagedPod,
    /// The identity whose certificate this pod holds a share of.
    identity: Option<Identity>,
}

/// The reconciler.
pub(crate) struct PodManager {
    node: String,
    store: Store,
    capture: Arc<Capture>,
    config: Arc<ProxyConfig>,
    lifecycle: Lifecycle,
    finder: NetnsFinder,
    active: HashMap<String, ActivePod>,
    /// This round's scan, if one ran; dropped at the end of each round so
    /// no namespace is kept open (alive) longer than needed.
    scan: Option<Scan>,
    last_scan: Option<(Instant, u64)>,
    /// `PODS` entries a previous run left, until adopted or purged.
    previous: HashMap<u64, PodInfo>,
    /// Namespaces quarantined for ambiguous pods, by pod uid.
    quarantined: HashMap<String, Vec<Quarantined>>,
    warned: HashMap<String, String>,
    adopted_previous_run: bool,
    identity: Option<Arc<CertManager>>,
    mesh: Arc<Mesh>,
    revalidated: u64,
    /// Requests of the CNI hand-off, when it is on.
    cni_rx: Option<tokio::sync::mpsc::Receiver<CniRequest>>,
    /// Pods whose namespace the runtime handed over, by uid.
    cni: HashMap<String, cni::CniPod>,
    /// Namespaces the runtime deleted (CNI DEL) by pod uid, while the
    /// config still lists the pod: never captured again.
    cni_released: HashMap<String, Vec<u64>>,
    /// Pods whose current sandbox the runtime deleted: found again only by
    /// the ADD of their next one, never by a scan for their addresses
    /// (IPAM may have given them to a new pod whose ADD is still on its
    /// way). Kept while the config lists the pod.
    cni_awaiting_add: HashSet<String>,
    /// Requests of a new agent to take the pods over (`takeover`): the
    /// manager answers with what the runtime told it and stops writing to
    /// the maps.
    handover_rx: Option<tokio::sync::mpsc::Receiver<HandOver>>,
    /// This agent took the node over from a running one, whose open
    /// connections' map entries must stay.
    took_over: bool,
}

/// A new agent's request for the pods, answered with the CNI state.
pub(crate) type HandOver = tokio::sync::oneshot::Sender<crate::takeover::CniState>;

impl PodManager {
    /// A manager for `node`.
    pub(crate) fn new(
        node: String,
        store: Store,
        capture: Arc<Capture>,
        config: Arc<ProxyConfig>,
        lifecycle: Lifecycle,
        mesh: Arc<Mesh>,
    ) -> Self {
        PodManager {
            node,
            store,
            capture,
            config,
            lifecycle,
            finder: NetnsFinder::default(),
            active: HashMap::new(),
            scan: None,
            last_scan: None,
            previous: HashMap::new(),
            quarantined: HashMap::new(),
            warned: HashMap::new(),
            adopted_previous_run: false,
            identity: mesh.certs.clone(),
            mesh,
            revalidated: 0,
            cni_rx: None,
            cni: HashMap::new(),
            cni_released: HashMap::new(),
            cni_awaiting_add: HashSet::new(),
            handover_rx: None,
            took_over: false,
        }
    }

    /// Answers a new agent's requests for the pods (`takeover`).
    pub(crate) fn with_handover(mut self, requests: tokio::sync::mpsc::Receiver<HandOver>) -> Self {
        self.handover_rx = Some(requests);
        self
    }

    /// This agent took over from a running one, which still relays its
    /// open connections: their map entries are not a dead run's to purge.
    pub(crate) fn taking_over(mut self) -> Self {
        self.took_over = true;
        self
    }

    /// Reconciles on every state change and every tick until drain begins,
    /// then stops managing pods (their pins stay, for fail-closed).
    pub(crate) async fn run(mut self) {
        let mut rx = self.store.subscribe();
        // Connections of a previous run died with it; their entries go
        // before any new connection can make one. After a takeover the
        // previous agent still relays its connections, and removes each
        // entry as its connection ends.
        if !self.took_over {
            purge_connection_entries(&self.capture, None);
        }
        for cookie in self.capture.maps.pods.keys().unwrap_or_default() {
            if let Ok(Some(info)) = self.capture.maps.pods.get(&cookie) {
                self.previous.insert(cookie, info);
            }
        }
        let stop = self.lifecycle.stop_accepting.clone();
        let mut cni_rx = self.cni_rx.take();
        let mut handover_rx = self.handover_rx.take();
        loop {
            self.reconcile().await;
            tokio::select! {
                _ = stop.cancelled() => break,
                r = rx.changed() => if r.is_err() { break },
                req = next_cni(&mut cni_rx) => match req {
                    Some(req) => self.handle_cni(req).await,
                    None => cni_rx = None,
                },
                req = next_of(&mut handover_rx) => match req {
                    // Passive only if the hand-over still waits for this
                    // answer: one given up on (it timed out) leaves this
                    // agent managing the node.
                    Some(reply) => {
                        if reply.send(self.cni_state()).is_ok() {
                            return self.passive(rx, cni_rx).await;
                        }
                        tracing::warn!("a hand-over was given up before the pod manager answered; still managing the node");
                    }
                    None => handover_rx = None,
                },
                _ = tokio::time::sleep(TICK) => {}
            }
        }
        tracing::info!(
            pods = self.active.len(),
            "stopped managing pods; capture stays attached"
        );
    }

    /// After a hand-over: the maps, listeners' slots and steering are the
    /// new agent's, and nothing here writes them again. What stays is this
    /// agent's open connections: policy and trust changes still sweep
    /// them, and a pod's end still closes its own.
    async fn passive(
        mut self,
        mut rx: tokio::sync::watch::Receiver<Arc<crate::state::Snapshot>>,
        mut cni_rx: Option<tokio::sync::mpsc::Receiver<CniRequest>>,
    ) {
        tracing::info!(
            pods = self.active.len(),
            "handed the node's pods to a new agent; relaying the open connections until SIGTERM"
        );
        let stop = self.lifecycle.stop_accepting.clone();
        loop {
            let snap = self.store.current();
            if snap.generation != self.revalidated {
                self.revalidated = snap.generation;
                self.mesh.open.revalidate(&snap);
            }
            let (desired, _) = snap.managed_pods_given(&self.node, &self.runtime_ips());
            let identity = self.identity.clone();
            self.active.retain(|uid, a| {
                let kept = desired.get(uid).is_some_and(|d| same_addresses(&d.ips, &a.spec.ips));
                if !kept {
                    a.ctx.cancel.cancel();
                    if let (Some(m), Some(id)) = (&identity, &a.identity) {
                        m.release(id);
                    }
                }
                kept
            });
            tokio::select! {
                _ = stop.cancelled() => break,
                r = rx.changed() => if r.is_err() { break },
                req = next_cni(&mut cni_rx) => match req {
                    // Sent before the socket changed hands: the runtime
                    // retries, and reaches the new agent.
                    Some(req) => {
                        let _ = req.reply.send(crate::cni::protocol::Reply::Refused {
                            message: "this agent has handed the node to a new agent; try again".into(),
                        });
                    }
                    None => cni_rx = None,
                },
                _ = tokio::time::sleep(TICK) => {}
            }
        }
        tracing::info!(pods = self.active.len(), "stopped relaying for handed-over pods");
    }

    async fn reconcile(&mut self) {
        let snap = self.store.current();
        if snap.generation != self.revalidated {
            // Policy may have changed: close what it no longer allows.
            self.revalidated = snap.generation;
            self.mesh.open.revalidate(&snap);
        }
        let (desired, _skipped) = snap.managed_pods_given(&self.node, &self.runtime_ips());

        let gone: Vec<String> = self
            .active
            .iter()
            .filter(|(uid, a)| desired.get(*uid).is_none_or(|d| !same_addresses(&d.ips, &a.spec.ips)))
            .map(|(uid, _)| uid.clone())
            .collect();
        for uid in gone {
            if let Some(a) = self.active.remove(&uid) {
                self.stop_pod(&a);
            }
        }

        for (uid, want) in &desired {
            if let Some(active) = self.active.get_mut(uid) {
                if active.spec != *want {
                    let cookie = active.ctx.netns.cookie();
                    update_exclusions(&self.capture, cookie, &active.spec, want);
                    if let Err(e) = self.capture.maps.pods.insert(&cookie, &pod_entry(want)) {
                        tracing::error!(pod = %want.key, "updating pod capture: {e}");
                    }
                    active.spec = want.clone();
                }
                continue;
            }
            match self.start_pod(want).await {
                Ok(a) => {
                    self.warned.remove(uid);
                    let cookie = a.ctx.netns.cookie();
                    self.active.insert(uid.clone(), a);
                    self.quarantine(want, &[], Some(cookie));
                }
                Err(PodError::Pending) => {}
                Err(e) => {
                    match &e {
                        PodError::Ambiguous { namespaces, .. } => self.quarantine(want, namespaces, None),
                        // The namespaces it was quarantined in hold its IP no more.
                        PodError::NoNamespace(_) | PodError::SandboxDeleted => self.quarantine(want, &[], None),
                        // Still ambiguous as far as we know: stay closed.
                        _ => {}
                    }
                    let msg = e.to_string();
                    if self.warned.get(uid) != Some(&msg) {
                        if matches!(e, PodError::Ambiguous { .. }) {
                            tracing::warn!(pod = %want.key, "pod quarantined, will retry: {msg}");
                        } else {
                            tracing::warn!(pod = %want.key, "cannot capture pod yet, will retry: {msg}");
                        }
                        self.warned.insert(uid.clone(), msg);
                    }
                }
            }
        }
        self.warned.retain(|uid, _| desired.contains_key(uid));
        let undesired: Vec<String> = self
            .quarantined
            .keys()
            .filter(|uid| !desired.contains_key(*uid))
            .cloned()
            .collect();
        for uid in undesired {
            let old = self.quarantined.remove(&uid).unwrap_or_default();
            self.release(&uid, old, None);
        }
        self.scan = None;
        // Not before the first config: readiness would read "every enrolled
        // pod captured" off an empty list (and a new agent taking over
        // would be Ready before it had a single pod), and every pod the
        // runtime handed over (the previous agent's, after a takeover)
        // would look unlisted, and be let go.
        if snap.generation > 0 {
            self.reconcile_cni(&snap, &desired);
            self.report_captures(&desired);
        }

        // Nothing is purged before the first config is read: every pod
        // would look unmanaged, and its capture would lapse until re-adopted.
        if snap.generation > 0 && (!self.adopted_previous_run || !self.previous.is_empty()) {
            self.purge_stale(&desired);
            self.adopted_previous_run = true;
        }
    }

    async fn start_pod(&mut self, pod: &ManagedPod) -> Result<ActivePod, PodError> {
        let netns = self.resolve(pod).await?;
        let identity = match &self.identity {
            Some(m) => {
                let id = m.identity_of(&pod.namespace, &pod.service_account);
                m.acquire(&id)?;
                Some(id)
            }
            None => None,
        };
        let started = self.capture_pod(pod, netns, identity.clone()).await;
        match started {
            Ok(ctx) => Ok(ActivePod {
                ctx,
                spec: pod.clone(),
                identity,
            }),
            Err(e) => {
                if let (Some(m), Some(id)) = (&self.identity, &identity) {
                    m.release(id);
                }
                Err(e)
            }
        }
    }

    async fn capture_pod(
        &self,
        pod: &ManagedPod,
        netns: Arc<Netns>,
        identity: Option<Identity>,
    ) -> Result<Arc<PodContext>, PodError> {
        let cookie = netns.cookie();
        let tunnel_tls = match (&self.mesh.certs, &identity) {
            (Some(m), Some(id)) => Some(crate::identity::tls::server_config(m.clone(), id.clone(), m.trust())),
            _ => None,
        };
        let ctx = Arc::new(PodContext {
            pod: pod.clone(),
            netns,
            identity,
            tunnel_tls,
            mesh: self.mesh.clone(),
            config: self.config.clone(),
            capture: self.capture.clone(),
            cancel: self.lifecycle.hard_stop.child_token(),
            lifecycle: self.lifecycle.clone(),
        });
        // Order matters for fail-closed: listeners and their sock-hash
        // entries first, then steering, then outbound capture.
        let listeners = PodListeners::bind(&ctx)?;
        self.capture.attach_pod(&ctx.netns, Some(&pod.uid))?;
        let info = pod_entry(pod);
        update_exclusions(&self.capture, cookie, &empty_like(pod), pod);
        for ip in &pod.ips {
            self.capture.maps.pod_addrs.insert(&ip_words(*ip), &1)?;
        }
        self.capture.maps.pods.insert(&cookie, &info)?;
        listeners.serve(ctx.clone());
        tracing::info!(
            pod = %pod.key,
            netns = %ctx.netns.path().display(),
            cookie,
            ips = ?pod.ips,
            exclude_inbound = ?pod.exclude_inbound,
            exclude_outbound = ?pod.exclude_outbound,
            drop_inbound_udp = pod.drop_inbound_udp,
            "pod captured"
        );
        Ok(ctx)
    }

    /// Tells readiness, metrics and `/config_dump` which enrolled pods are
    /// captured, and why the others are not.
    fn report_captures(&self, desired: &HashMap<String, ManagedPod>) {
        let pods = desired
            .iter()
            .map(|(uid, want)| {
                let cookie = self.active.get(uid).map(|a| a.ctx.netns.cookie());
                let problem = cookie.is_none().then(|| self.warned.get(uid).cloned()).flatten();
                let capture = crate::admin::PodCapture {
                    uid: uid.clone(),
                    netns_cookie: cookie,
                    problem,
                };
                (want.key.clone(), capture)
            })
            .collect();
        self.mesh.captures.report(pods);
    }

    fn stop_pod(&self, a: &ActivePod) {
        let cookie = a.ctx.netns.cookie();
        let pod = &a.spec;
        let _ = self.capture.maps.pods.remove(&cookie);
        for ip in &pod.ips {
            let _ = self.capture.maps.pod_addrs.remove(&ip_words(*ip));
        }
        if let Err(e) = self.capture.detach_pod(cookie) {
            tracing::error!(pod = %pod.key, "detaching inbound steering: {e}");
        }
        update_exclusions(&self.capture, cookie, pod, &empty_like(pod));
        a.ctx.cancel.cancel();
        purge_connection_entries(&self.capture, Some(cookie));
        if let (Some(m), Some(id)) = (&self.identity, &a.identity) {
            m.release(id);
        }
        tracing::info!(pod = %pod.key, cookie, "pod released");
    }

    /// Removes what a previous run left for pods that are no longer managed.
    /// An entry a desired pod still claims stays (its namespace fails
    /// closed) until that pod is adopted or goes.
    fn purge_stale(&mut self, desired: &HashMap<String, ManagedPod>) {
        let mut live: HashSet<u64> = self.active.values().map(|a| a.ctx.netns.cookie()).collect();
        live.extend(self.quarantined.values().flatten().map(|q| q.netns.cookie()));
        live.extend(self.held_cookies());
        let mut stale: HashSet<u64> = self.previous.keys().copied().collect();
        if !self.adopted_previous_run {
            stale.extend(self.capture.pinned_pods());
        }
        for cookie in stale {
            if live.contains(&cookie) {
                self.previous.remove(&cookie);
                continue;
            }
            let claimed = desired
                .values()
                .any(|p| !self.active.contains_key(&p.uid) && self.claims(cookie, p));
            if claimed {
                continue;
            }
            self.previous.remove(&cookie);
            let _ = self.capture.maps.pods.remove(&cookie);
            let _ = self.capture.detach_pod(cookie);
            for k in self.capture.maps.excluded_ports.keys().unwrap_or_default() {
                if k.netns == cookie {
                    let _ = self.capture.maps.excluded_ports.remove(&k);
                }
            }
            tracing::info!(cookie, "removed capture of a pod no longer managed");
        }
        let live_addrs: HashSet<[u32; 4]> = self
            .active
            .values()
            .flat_map(|a| a.spec.ips.iter().map(|ip| ip_words(*ip)))
            .collect();
        for k in self.capture.maps.pod_addrs.keys().unwrap_or_default() {
            if !live_addrs.contains(&k) {
                let _ = self.capture.maps.pod_addrs.remove(&k);
            }
        }
    }

    /// Whether `cookie` is where a previous run captured `pod`: its `PODS`
    /// entry has the pod's addresses and its pins record the pod's uid.
    fn claims(&self, cookie: u64, pod: &ManagedPod) -> bool {
        let want = pod_info(&pod.ips);
        self.previous.get(&cookie).is_some_and(|prev| {
            let ips = POD_HAS_IPV4 | POD_HAS_IPV6;
            prev.ipv4 == want.ipv4 && prev.ipv6 == want.ipv6 && prev.flags & ips == want.flags & ips
        }) && self.capture.pinned_pod_is(cookie, &pod.uid)
    }

    /// Sets the namespaces quarantined for `pod` to `namespaces`: each gets
    /// `sk_lookup` and a `PODS` entry but no listeners, so inbound traffic
    /// is dropped and outbound `connect()` is sent to a closed port.
    /// Namespaces left out are released, except `keep` (the one the pod was
    /// just captured in) and any an active pod owns.
    fn quarantine(&mut self, pod: &ManagedPod, namespaces: &[Arc<Netns>], keep: Option<u64>) {
        let owned: HashSet<u64> = self.active.values().map(|a| a.ctx.netns.cookie()).collect();
        let mut info = pod_info(&pod.ips);
        info.flags &= POD_HAS_IPV4 | POD_HAS_IPV6;
        let old = self.quarantined.remove(&pod.uid).unwrap_or_default();
        let mut now: Vec<Quarantined> = Vec::new();
        for ns in namespaces {
            let cookie = ns.cookie();
            if owned.contains(&cookie) || now.iter().any(|q| q.netns.cookie() == cookie) {
                continue;
            }
            let mut q = match old.iter().find(|q| q.netns.cookie() == cookie) {
                Some(q) => Quarantined {
                    netns: q.netns.clone(),
                    steering: q.steering,
                },
                None => {
                    if let Err(e) = self.capture.maps.pods.insert(&cookie, &info) {
                        tracing::error!(pod = %pod.key, netns = %ns.path().display(), "quarantining: {e}");
                    }
                    Quarantined {
                        netns: ns.clone(),
                        steering: false,
                    }
                }
            };
            if !q.steering {
                match self.capture.attach_pod(&q.netns, None) {
                    Ok(()) => q.steering = true,
                    Err(e) => tracing::error!(pod = %pod.key, netns = %ns.path().display(), "quarantining: {e}"),
                }
            }
            now.push(q);
        }
        let left: Vec<Quarantined> = old
            .into_iter()
            .filter(|q| !now.iter().any(|n| n.netns.cookie() == q.netns.cookie()))
            .collect();
        self.release(&pod.key, left, keep);
        if !now.is_empty() {
            self.quarantined.insert(pod.uid.clone(), now);
        }
    }

    /// Ends the quarantine of namespaces, except `keep` and any an active
    /// pod owns (their capture replaced it). `pod` names them in the log.
    fn release(&self, pod: &str, quarantined: Vec<Quarantined>, keep: Option<u64>) {
        let owned: HashSet<u64> = self.active.values().map(|a| a.ctx.netns.cookie()).collect();
        for q in quarantined {
            let cookie = q.netns.cookie();
            if owned.contains(&cookie) || keep == Some(cookie) {
                continue;
            }
            let _ = self.capture.maps.pods.remove(&cookie);
            if let Err(e) = self.capture.detach_pod(cookie) {
                tracing::error!(pod, cookie, "releasing quarantine: {e}");
            }
            tracing::info!(pod, netns = %q.netns.path().display(), cookie, "quarantine released");
        }
    }

    /// Finds the namespace of a pod to capture: the one a previous run
    /// captured it in if that still exists (found by cookie, whatever other
    /// namespaces claim its IP), else the only one holding its IP.
    /// A namespace the runtime handed over (CNI) is the pod's, no scan needed.
    async fn resolve(&mut self, pod: &ManagedPod) -> Result<Arc<Netns>, PodError> {
        if let Some(c) = self.cni.get(&pod.uid) {
            return Ok(c.netns.clone());
        }
        if self.cni_awaiting_add.contains(&pod.uid) {
            return Err(PodError::SandboxDeleted);
        }
        if self.scan.is_none() {
            // Scan at once for a new config (a pod just appeared), otherwise
            // at most every SCAN_INTERVAL while some pod is unresolved.
            let snap = self.store.current();
            let due = self
                .last_scan
                .is_none_or(|(t, generation)| t.elapsed() >= SCAN_INTERVAL || generation != snap.generation);
            if !due {
                return Err(PodError::Pending);
            }
            let (desired, _) = snap.managed_pods_given(&self.node, &self.runtime_ips());
            let wanted: HashSet<IpAddr> = desired
                .values()
                .filter(|p| !self.active.contains_key(&p.uid))
                .flat_map(|p| p.ips.iter().copied())
                .collect();
            let cookies: HashSet<u64> = self.previous.keys().copied().collect();
            let finder = NetnsFinder {
                extra_dirs: self.finder.extra_dirs.clone(),
            };
            let scan = tokio::task::spawn_blocking(move || finder.scan(&wanted, &cookies))
                .await
                .unwrap_or_default();
            self.scan = Some(scan);
            self.last_scan = Some((Instant::now(), snap.generation));
        }
        let scan = self.scan.as_ref().ok_or(PodError::Pending)?;
        let released = self.released_cookies(&pod.uid);
        let claimed: Vec<u64> = self
            .previous
            .keys()
            .copied()
            .filter(|c| !released.contains(c) && self.claims(*c, pod))
            .collect();
        if let [cookie] = claimed.as_slice()
            && let Some(ns) = scan.by_cookie.get(cookie)
        {
            return Ok(ns.clone());
        }
        // Every namespace holding any of its addresses: one address in
        // another namespace is as ambiguous as two holding the same one.
        // A namespace the runtime handed over for another pod is that pod's.
        let others = self.cni_cookies_except(&pod.uid);
        let mut found: Vec<Arc<Netns>> = Vec::new();
        for ns in pod.ips.iter().filter_map(|ip| scan.by_ip.get(ip)).flatten() {
            let cookie = ns.cookie();
            if !others.contains(&cookie) && !released.contains(&cookie) && !found.iter().any(|f| f.cookie() == cookie) {
                found.push(ns.clone());
            }
        }
        match found.len() {
            0 => {}
            1 => return Ok(found.remove(0)),
            _ => {
                return Err(PodError::Ambiguous {
                    ips: pod.ips.clone(),
                    namespaces: found,
                });
            }
        }
        Err(PodError::NoNamespace(pod.ips.clone()))
    }
}

/// The next CNI request, or never when the hand-off is off.
async fn next_cni(rx: &mut Option<tokio::sync::mpsc::Receiver<CniRequest>>) -> Option<CniRequest> {
    next_of(rx).await
}

/// The next message of an optional channel, or never without one.
async fn next_of<T>(rx: &mut Option<tokio::sync::mpsc::Receiver<T>>) -> Option<T> {
    match rx {
        Some(rx) => rx.recv().await,
        None => std::future::pending().await,
    }
}

fn empty_like(pod: &ManagedPod) -> ManagedPod {
    ManagedPod {
        exclude_inbound: Vec::new(),
        exclude_outbound: Vec::new(),
        ..pod.clone()
    }
}

/// The `PODS` entry of a pod: its addresses (a captured pod's, or those
/// the runtime handed over for a pod held closed).
pub(crate) fn pod_info(ips: &[IpAddr]) -> PodInfo {
    let mut info = PodInfo::default();
    for ip in ips {
        match ip {
            IpAddr::V4(_) => {
                info.ipv4 = ip_words(*ip)[3];
                info.flags |= POD_HAS_IPV4;
            }
            IpAddr::V6(_) => {
                info.ipv6 = ip_words(*ip);
                info.flags |= POD_HAS_IPV6;
            }
        }
    }
    info
}

/// The `PODS` entry of a captured pod: its addresses and its flags.
fn pod_entry(pod: &ManagedPod) -> PodInfo {
    let mut info = pod_info(&pod.ips);
    if pod.drop_inbound_udp {
        info.flags |= POD_DROP_INBOUND_UDP;
    }
    info
}

/// Applies the difference in excluded ports between two versions of a pod.
fn update_exclusions(capture: &Capture, cookie: u64, old: &ManagedPod, new: &ManagedPod) {
    let key = |port, direction| PortKey {
        netns: cookie,
        port,
        direction,
        pad: [0; 5],
    };
    let sets = [
        (&old.exclude_inbound, &new.exclude_inbound, DIRECTION_INBOUND),
        (&old.exclude_outbound, &new.exclude_outbound, DIRECTION_OUTBOUND),
    ];
    for (before, after, dir) in sets {
        for p in before.iter().filter(|p| !after.contains(p)) {
            let _ = capture.maps.excluded_ports.remove(&key(*p, dir));
        }
        for p in after.iter().filter(|p| !before.contains(p)) {
            if let Err(e) = capture.maps.excluded_ports.insert(&key(*p, dir), &1) {
                tracing::error!(pod = %new.key, port = p, "cannot exclude port: {e}");
            }
        }
    }
}

/// Drops per-connection map entries of one namespace, or of all.
fn purge_connection_entries(capture: &Capture, cookie: Option<u64>) {
    for k in capture.maps.orig_dst.keys().unwrap_or_default() {
        if cookie.is_none_or(|c| c == k.netns) {
            let _ = capture.maps.orig_dst.remove(&k);
        }
    }
    for k in capture.maps.inbound_peer.keys().unwrap_or_default() {
        if cookie.is_none_or(|c| c == k.netns) {
            let _ = capture.maps.inbound_peer.remove(&k);
        }
    }
}

/// Whether two address lists name the same addresses, in any order: the
/// runtime's result and the API's `podIPs` may list a dual-stack pod's
/// families in either order, which is no reason to capture it anew.
fn same_addresses(a: &[IpAddr], b: &[IpAddr]) -> bool {
    let set = |v: &[IpAddr]| {
        v.iter()
            .map(|ip| ip.to_canonical())
            .collect::<std::collections::BTreeSet<_>>()
    };
    set(a) == set(b)
}
