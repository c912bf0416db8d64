//! The pod manager's side of the CNI hand-off: a pod the runtime names is
//! captured in the namespace the runtime gave (opened once, kept open),
//! before the runtime starts it; one the config does not know yet is held
//! closed until it does; a DEL of the sandbox it is in releases it (a DEL
//! of any other sandbox of the pod changes nothing), and the pod's end is
//! the config's word.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Arc;

use super::PodManager;

/// Deleted namespaces remembered per pod: a sandbox lingers for moments
/// after its DEL, and a pod has one sandbox at a time.
const RELEASED_KEPT: usize = 4;
use crate::cni::protocol::{Command, Reply, Request};
use crate::cni::server::CniRequest;
use crate::netns::{self, Netns};
use crate::state::Snapshot;
use crate::state::workload::{Enrolment, ManagedPod, enrolment};
use crate::takeover::{CniRecord, CniState};

/// A pod whose namespace the runtime handed over.
#[derive(Debug)]
pub(super) struct CniPod {
    /// `namespace/name`.
    key: String,
    /// The sandbox the namespace belongs to: a DEL of another sandbox of
    /// the same pod (an older one) leaves this one alone.
    container_id: String,
    /// The namespace, opened once from the runtime's path.
    pub(super) netns: Arc<Netns>,
    /// Addresses from the previous plugin's result.
    ips: Vec<IpAddr>,
    /// Steering and `PODS` are attached without listeners: the config has
    /// not said yet that the pod is captured or outside the mesh.
    held: bool,
}

/// The sandbox a pod is in now, as a DEL is compared with it.
struct Sandbox {
    /// Its namespace.
    cookie: u64,
    /// Its `CNI_CONTAINERID`, when this run saw its ADD.
    container_id: Option<String>,
}

/// What the config says about a pod the runtime named.
enum Known {
    /// Captured: the config lists it, enrolled, with addresses.
    Managed(ManagedPod),
    /// The config lists it outside the mesh.
    Outside,
    /// Not in the config yet, or enrolled without addresses yet.
    Unknown,
}

impl PodManager {
    /// Receives the CNI server's requests (without it, pods are only found
    /// by scanning for their IPs).
    pub(crate) fn with_cni(mut self, requests: tokio::sync::mpsc::Receiver<CniRequest>) -> Self {
        self.cni_rx = Some(requests);
        self
    }

    /// Acts on one request and answers it.
    pub(super) async fn handle_cni(&mut self, req: CniRequest) {
        let CniRequest { request, reply } = req;
        let answer = match request.command {
            Command::Add => self.cni_add(&request).await,
            Command::Del => self.cni_del(&request),
            Command::Check => self.cni_check(&request),
        };
        let level_info = !matches!(answer, Reply::Refused { .. });
        if level_info {
            tracing::info!(pod = %request.key(), command = ?request.command, container = %request.container_id, netns = %request.netns.display(), uid = %request.pod_uid, answer = ?answer, "CNI request");
        } else {
            tracing::warn!(pod = %request.key(), command = ?request.command, container = %request.container_id, answer = ?answer, "CNI request refused");
        }
        let _ = reply.send(answer);
    }

    /// The pod's uid: the runtime's, else the config's for its name.
    fn cni_uid(&self, request: &Request, snap: &Snapshot) -> Option<String> {
        if !request.pod_uid.is_empty() {
            return Some(request.pod_uid.clone());
        }
        snap.pods.get(&request.key()).map(|p| p.uid.clone())
    }

    /// The addresses the runtime's ADDs gave pods, by UID: they stand in
    /// for those the source has not reported yet.
    pub(super) fn runtime_ips(&self) -> HashMap<String, Vec<IpAddr>> {
        self.cni
            .iter()
            .filter(|(_, c)| !c.ips.is_empty())
            .map(|(uid, c)| (uid.clone(), c.ips.clone()))
            .collect()
    }

    fn known(&self, uid: &str, snap: &Snapshot) -> Known {
        let (desired, _) = snap.managed_pods_given(&self.node, &self.runtime_ips());
        if let Some(p) = desired.get(uid) {
            return Known::Managed(p.clone());
        }
        match snap.pods.values().find(|p| p.uid == uid) {
            Some(p) => match enrolment(p, snap.namespaces.get(&p.namespace)) {
                Enrolment::NotEnrolled | Enrolment::OptedOut | Enrolment::HostNetwork => Known::Outside,
                _ if p.node_name != self.node => Known::Outside,
                _ => Known::Unknown,
            },
            None => Known::Unknown,
        }
    }

    async fn cni_add(&mut self, request: &Request) -> Reply {
        let snap = self.store.current();
        let Some(uid) = self.cni_uid(request, &snap) else {
            return refused("no K8S_POD_UID and the config does not know the pod yet (the runtime retries)");
        };
        let ns = match Netns::open(&request.netns) {
            Ok(ns) => Arc::new(ns),
            Err(e) => return refused(&e.to_string()),
        };
        if netns::home_id().is_ok_and(|home| home == ns.id()) {
            return refused("the namespace is the node's own");
        }
        // A new sandbox of the same pod replaces the old one.
        if let Some(old) = self.cni.get(&uid)
            && old.netns.cookie() != ns.cookie()
        {
            self.cni_release(&uid);
        }
        let cookie = ns.cookie();
        self.cni_awaiting_add.remove(&uid);
        // The runtime says this namespace is live after all.
        if let Some(gone) = self.cni_released.get_mut(&uid) {
            gone.retain(|c| *c != cookie);
        }
        self.cni.insert(
            uid.clone(),
            CniPod {
                key: request.key(),
                container_id: request.container_id.clone(),
                netns: ns,
                ips: request.ips.clone(),
                held: self.cni.get(&uid).is_some_and(|c| c.held),
            },
        );
        match self.known(&uid, &snap) {
            Known::Outside => {
                self.unhold(&uid);
                Reply::NotManaged
            }
            Known::Unknown => match self.hold(&uid) {
                Ok(()) => {
                    self.pin_sandbox(cookie, request);
                    Reply::Held
                }
                Err(e) => refused(&e),
            },
            Known::Managed(want) => {
                if let Some(a) = self.active.get(&uid) {
                    if a.ctx.netns.cookie() == cookie {
                        self.pin_sandbox(cookie, request);
                        return Reply::Captured;
                    }
                    // Found by a scan in some other namespace holding its IP.
                    if let Some(a) = self.active.remove(&uid) {
                        self.stop_pod(&a);
                    }
                }
                match self.start_pod(&want).await {
                    Ok(a) => {
                        self.active.insert(uid.clone(), a);
                        self.quarantine(&want, &[], Some(cookie));
                        if let Some(c) = self.cni.get_mut(&uid) {
                            c.held = false;
                        }
                        self.pin_sandbox(cookie, request);
                        Reply::Captured
                    }
                    Err(e) => refused(&e.to_string()),
                }
            }
        }
    }

    /// Releases the sandbox the DEL names, if it is the pod's current one
    /// (or a namespace quarantined for the pod); any other DEL (of an older
    /// or failed sandbox, a repeat, one the agent cannot match after a
    /// restart) leaves the pod as it is. A DEL never ends the pod: the
    /// config still lists it, and a new sandbox of it is captured as any
    /// is; only the released namespace is never taken back.
    fn cni_del(&mut self, request: &Request) -> Reply {
        let snap = self.store.current();
        let uid = self.cni_uid(request, &snap).or_else(|| {
            self.cni
                .iter()
                .find(|(_, c)| c.key == request.key())
                .map(|(u, _)| u.clone())
        });
        let Some(uid) = uid else {
            return Reply::Released;
        };
        // The namespace the DEL names, while its file still opens (the
        // runtime may pass none, or one already removed).
        let named = (!request.netns.as_os_str().is_empty())
            .then(|| Netns::open(&request.netns).ok())
            .flatten()
            .map(|ns| ns.cookie());
        match self.current_sandbox(&uid) {
            Some(current) if self.names(&current, named, &request.container_id) => {
                self.cni_release(&uid);
                self.forget_namespace(&uid, current.cookie);
                self.cni_awaiting_add.insert(uid.clone());
                tracing::info!(pod = %request.key(), container = %request.container_id, cookie = current.cookie, "the runtime deleted the pod's current sandbox: released");
            }
            current => {
                if let Some(cookie) = named
                    && self
                        .quarantined
                        .get(&uid)
                        .is_some_and(|q| q.iter().any(|q| q.netns.cookie() == cookie))
                {
                    self.release_quarantined(&uid, cookie);
                    self.forget_namespace(&uid, cookie);
                }
                tracing::info!(
                    pod = %request.key(),
                    container = %request.container_id,
                    current = ?current.map(|c| c.cookie),
                    named = ?named,
                    "DEL of a sandbox that is not the pod's current one: the pod stays as it is"
                );
            }
        }
        Reply::Released
    }

    /// The pod's current sandbox as far as the agent knows it: the one its
    /// ADD gave, else the namespace it is captured in (found by a scan, or
    /// adopted from a previous run's pins, which may record its sandbox id).
    fn current_sandbox(&self, uid: &str) -> Option<Sandbox> {
        if let Some(c) = self.cni.get(uid) {
            return Some(Sandbox {
                cookie: c.netns.cookie(),
                container_id: Some(c.container_id.clone()),
            });
        }
        let cookie = self.active.get(uid)?.ctx.netns.cookie();
        Some(Sandbox {
            cookie,
            container_id: None,
        })
    }

    /// Whether a DEL of `container_id` in the namespace `named` (`None`:
    /// its path gave none) names `current`. Both must agree where known:
    /// the namespace by cookie, the sandbox id by this run's ADD or the
    /// pins; with no namespace to compare, only a known, equal sandbox id
    /// names it. Anything unknown is not a match: a live pod stays captured.
    fn names(&self, current: &Sandbox, named: Option<u64>, container_id: &str) -> bool {
        let same_id = match &current.container_id {
            Some(id) => Some(id == container_id),
            None => self.capture.pinned_sandbox_is(current.cookie, container_id),
        };
        match named {
            Some(cookie) => cookie == current.cookie && same_id != Some(false),
            None => same_id == Some(true),
        }
    }

    fn cni_check(&self, request: &Request) -> Reply {
        let snap = self.store.current();
        let Some(uid) = self.cni_uid(request, &snap) else {
            return refused("the pod is not known");
        };
        let Some(c) = self.cni.get(&uid) else {
            return match self.known(&uid, &snap) {
                Known::Outside => Reply::NotManaged,
                _ => refused("the agent holds no namespace for the pod"),
            };
        };
        if c.held {
            return Reply::Held;
        }
        match (self.known(&uid, &snap), self.active.get(&uid)) {
            (Known::Outside, _) => Reply::NotManaged,
            (_, Some(a)) if a.ctx.netns.cookie() == c.netns.cookie() => Reply::Captured,
            _ => refused("the pod is not captured in the namespace its ADD gave"),
        }
    }

    /// Undoes everything held for `uid`: its capture, its hold, its quarantine.
    fn cni_release(&mut self, uid: &str) {
        if let Some(a) = self.active.remove(uid) {
            self.stop_pod(&a);
        }
        self.unhold(uid);
        if let Some(q) = self.quarantined.remove(uid) {
            self.release(uid, q, None);
        }
        self.cni.remove(uid);
    }

    /// Records the ADD's sandbox id beside the namespace's pins, for a DEL
    /// a restarted agent must match (see [`PodManager::names`]). Without it
    /// such a DEL leaves the pod captured: the safe side.
    fn pin_sandbox(&self, cookie: u64, request: &Request) {
        if let Err(e) = self.capture.pin_sandbox(cookie, &request.container_id) {
            tracing::warn!(pod = %request.key(), cookie, "recording the pod's sandbox: {e}");
        }
    }

    /// Ends the quarantine of one namespace of `uid`'s (the runtime deleted it).
    fn release_quarantined(&mut self, uid: &str, cookie: u64) {
        let Some(all) = self.quarantined.remove(uid) else {
            return;
        };
        let (gone, kept): (Vec<_>, Vec<_>) = all.into_iter().partition(|q| q.netns.cookie() == cookie);
        self.release(uid, gone, None);
        if !kept.is_empty() {
            self.quarantined.insert(uid.to_string(), kept);
        }
    }

    /// Remembers that the runtime deleted `uid`'s namespace `cookie`: the
    /// scan must not capture it again in the moment before its addresses
    /// go. Cookies are never reused, so remembering one cannot hide a new
    /// sandbox; the last few per pod are kept, while the config lists it.
    fn forget_namespace(&mut self, uid: &str, cookie: u64) {
        let gone = self.cni_released.entry(uid.to_string()).or_default();
        if !gone.contains(&cookie) {
            gone.push(cookie);
        }
        if gone.len() > RELEASED_KEPT {
            gone.remove(0);
        }
    }

    /// Namespaces of `uid` the runtime deleted (see [`PodManager::forget_namespace`]).
    pub(super) fn released_cookies(&self, uid: &str) -> &[u64] {
        self.cni_released.get(uid).map_or(&[], Vec::as_slice)
    }

    /// Attaches steering and a `PODS` entry without listeners to the pod's
    /// namespace, recording its uid: inbound is dropped, outbound refused.
    fn hold(&mut self, uid: &str) -> Result<(), String> {
        let Some(c) = self.cni.get_mut(uid) else {
            return Err("no namespace".into());
        };
        let cookie = c.netns.cookie();
        // The pod's own annotations are not known yet; its namespace's
        // `nodeward.io/inbound-udp` may be, and holds already.
        let mut info = super::pod_info(&c.ips);
        let namespace = c.key.split_once('/').map_or("", |(ns, _)| ns);
        let ns = self.store.current().namespaces.get(namespace).cloned();
        let probe = crate::state::workload::Pod {
            uid: uid.to_string(),
            namespace: namespace.to_string(),
            ..Default::default()
        };
        if crate::state::workload::drop_inbound_udp(&probe, ns.as_ref()) {
            info.flags |= nodeward_common::POD_DROP_INBOUND_UDP;
        }
        self.capture
            .attach_pod(&c.netns, Some(uid))
            .map_err(|e| format!("holding the pod closed: {e}"))?;
        self.capture
            .maps
            .pods
            .insert(&cookie, &info)
            .map_err(|e| format!("holding the pod closed: {e}"))?;
        if !c.held {
            tracing::info!(pod = %c.key, netns = %c.netns.path().display(), cookie, "pod held closed until its config arrives");
        }
        c.held = true;
        Ok(())
    }

    /// Ends a hold (not a capture that replaced it).
    fn unhold(&mut self, uid: &str) {
        let Some(c) = self.cni.get_mut(uid) else { return };
        if !c.held {
            return;
        }
        c.held = false;
        let cookie = c.netns.cookie();
        if self.active.get(uid).is_some_and(|a| a.ctx.netns.cookie() == cookie) {
            return;
        }
        let _ = self.capture.maps.pods.remove(&cookie);
        if let Err(e) = self.capture.detach_pod(cookie) {
            tracing::error!(pod = %c.key, cookie, "releasing a held pod: {e}");
        }
        tracing::info!(pod = %c.key, cookie, "hold released: the config puts the pod outside the mesh");
    }

    /// After each reconcile: a held pod that got captured is no longer
    /// held; one the config now puts outside the mesh is released; the
    /// deleted namespaces of pods the config no longer lists are forgotten.
    pub(super) fn reconcile_cni(&mut self, snap: &Snapshot, desired: &HashMap<String, ManagedPod>) {
        let uids: Vec<String> = self
            .cni
            .iter()
            .filter(|(_, c)| c.held)
            .map(|(u, _)| u.clone())
            .collect();
        for uid in uids {
            if let Some(a) = self.active.get(&uid) {
                let cookie = a.ctx.netns.cookie();
                if let Some(c) = self.cni.get_mut(&uid)
                    && c.netns.cookie() == cookie
                {
                    c.held = false;
                }
                continue;
            }
            if !desired.contains_key(&uid) && matches!(self.known(&uid, snap), Known::Outside) {
                self.unhold(&uid);
            }
        }
        let listed: std::collections::HashSet<&str> = snap.pods.values().map(|p| p.uid.as_str()).collect();
        self.cni_released.retain(|u, _| listed.contains(u.as_str()));
        self.cni_awaiting_add.retain(|u| listed.contains(u.as_str()));
        // A pod the config does not list, neither captured nor held (its
        // config put it outside the mesh, and then it went) whose DEL never
        // came: let its namespace go, the entry holds it open. A held pod
        // stays held: its config may not have arrived yet (fail closed).
        let gone: Vec<String> = self
            .cni
            .iter()
            .filter(|(u, c)| !listed.contains(u.as_str()) && !c.held && !self.active.contains_key(*u))
            .map(|(u, _)| u.clone())
            .collect();
        for uid in gone {
            self.cni_release(&uid);
        }
    }

    /// Namespaces the runtime gave for pods other than `uid`: a scan for
    /// `uid`'s addresses must not pick them.
    pub(super) fn cni_cookies_except(&self, uid: &str) -> Vec<u64> {
        self.cni
            .iter()
            .filter(|(u, _)| u.as_str() != uid)
            .map(|(_, c)| c.netns.cookie())
            .collect()
    }

    /// What the runtime told this agent, for the agent taking over.
    pub(super) fn cni_state(&self) -> CniState {
        CniState {
            pods: self
                .cni
                .iter()
                .map(|(uid, c)| CniRecord {
                    uid: uid.clone(),
                    key: c.key.clone(),
                    container_id: c.container_id.clone(),
                    netns: c.netns.path().to_path_buf(),
                    cookie: c.netns.cookie(),
                    ips: c.ips.clone(),
                    held: c.held,
                })
                .collect(),
            released: self.cni_released.iter().map(|(u, c)| (u.clone(), c.clone())).collect(),
            awaiting_add: self.cni_awaiting_add.iter().cloned().collect(),
        }
    }

    /// Starts from what the previous agent was told (`takeover`). A record
    /// whose path no longer opens the namespace it named is left out: that
    /// sandbox is gone, and its pod is found by its next ADD.
    pub(crate) fn with_cni_state(mut self, state: CniState) -> Self {
        for r in state.pods {
            match Netns::open(&r.netns) {
                Ok(ns) if ns.cookie() == r.cookie => {
                    self.cni.insert(
                        r.uid,
                        CniPod {
                            key: r.key,
                            container_id: r.container_id,
                            netns: Arc::new(ns),
                            ips: r.ips,
                            held: r.held,
                        },
                    );
                }
                Ok(_) => {
                    tracing::info!(pod = %r.key, netns = %r.netns.display(), "the runtime's namespace of this pod was replaced since its ADD; waiting for the next")
                }
                Err(e) => {
                    tracing::info!(pod = %r.key, "the runtime's namespace of this pod is gone since its ADD: {e}")
                }
            }
        }
        self.cni_released.extend(state.released);
        self.cni_awaiting_add.extend(state.awaiting_add);
        self
    }

    /// Namespaces held closed: not stale, whatever a purge finds.
    pub(super) fn held_cookies(&self) -> impl Iterator<Item = u64> + '_ {
        self.cni.values().filter(|c| c.held).map(|c| c.netns.cookie())
    }
}

fn refused(message: &str) -> Reply {
    Reply::Refused {
        message: message.to_string(),
    }
}
