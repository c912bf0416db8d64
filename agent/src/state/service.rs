//! Services and their endpoints: what a connection to a Service address reaches.
//!
//! [`Service`] and [`EndpointSlice`] are the fields of the API objects the
//! agent uses. [`Snapshot::index`](super::Snapshot::index) turns them into
//! one [`ServiceTarget`] per Service address: (ClusterIP, port), and the
//! addresses kube-proxy also answers for, (external IP or load-balancer
//! IP, port) and (node address, nodePort); each with the Service port and
//! the endpoints of that address family with their port for it. The choice of
//! one endpoint per connection ([`Balancer`]) needs state that outlives a
//! snapshot (open connections, session affinity), so it lives beside the
//! store, not in it.

#![forbid(unsafe_code)]

use std::collections::HashMap;
use std::hash::{BuildHasher, RandomState};
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Default `sessionAffinityConfig.clientIP.timeoutSeconds` (Kubernetes').
pub(crate) const DEFAULT_AFFINITY_TIMEOUT: Duration = Duration::from_secs(10_800);

/// Most clients remembered for session affinity on the node; past it,
/// expired entries are dropped and, if none expired, a new client is not
/// remembered (its connections are balanced like any other).
pub(crate) const MAX_AFFINITY_ENTRIES: usize = 65_536;

/// A `v1/Service`, as far as the agent resolves it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Service {
    /// Namespace.
    pub(crate) namespace: String,
    /// Name.
    pub(crate) name: String,
    /// `spec.clusterIPs` (or `spec.clusterIP`); empty for headless Services.
    pub(crate) cluster_ips: Vec<IpAddr>,
    /// `spec.ports`.
    pub(crate) ports: Vec<ServicePort>,
    /// `spec.type` (`ClusterIP` when absent).
    pub(crate) kind: String,
    /// Whether `spec.selector` is set: a selector-less Service's endpoints
    /// are whatever someone wrote, possibly outside the cluster.
    pub(crate) has_selector: bool,
    /// `spec.internalTrafficPolicy: Local`: only endpoints on the client's node.
    pub(crate) internal_local: bool,
    /// `spec.sessionAffinity: ClientIP` with its timeout.
    pub(crate) affinity: Option<Duration>,
    /// `spec.externalIPs`.
    pub(crate) external_ips: Vec<IpAddr>,
    /// `status.loadBalancer.ingress[].ip` of a `LoadBalancer` Service whose
    /// `ipMode` is `VIP` (or unset): the addresses kube-proxy answers for
    /// on the node. `Proxy` ones are left to the load balancer.
    pub(crate) load_balancer_ips: Vec<IpAddr>,
}

impl Service {
    /// `namespace/name`.
    pub(crate) fn key(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }
}

/// One entry of `spec.ports`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct ServicePort {
    /// `name` (empty for a single unnamed port).
    pub(crate) name: String,
    /// `port`: what clients connect to.
    pub(crate) port: u16,
    /// `targetPort`: a number or a container port name (resolved by the
    /// endpoint slices, whose ports carry the Service port's name).
    pub(crate) target_port: String,
    /// `protocol` (`TCP` when absent).
    pub(crate) protocol: String,
    /// `nodePort`, of a `NodePort` or `LoadBalancer` Service only.
    pub(crate) node_port: Option<u16>,
}

/// A `discovery.k8s.io/v1` EndpointSlice.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct EndpointSlice {
    /// Namespace.
    pub(crate) namespace: String,
    /// Name.
    pub(crate) name: String,
    /// Label `kubernetes.io/service-name`: the Service it belongs to.
    pub(crate) service: String,
    /// `addressType` (`IPv4`, `IPv6`, `FQDN`).
    pub(crate) address_type: String,
    /// `ports`: the endpoint port of each Service port, by name.
    pub(crate) ports: Vec<SlicePort>,
    /// `endpoints`.
    pub(crate) endpoints: Vec<Endpoint>,
}

/// One entry of a slice's `ports`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct SlicePort {
    /// The Service port's name.
    pub(crate) name: String,
    /// The endpoints' port; `None` when the slice leaves it unset (no
    /// endpoint serves that Service port).
    pub(crate) port: Option<u16>,
    /// `protocol` (`TCP` when absent).
    pub(crate) protocol: String,
}

/// One entry of a slice's `endpoints`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Endpoint {
    /// `addresses`.
    pub(crate) addresses: Vec<IpAddr>,
    /// `conditions.ready` (absent means ready, as in the API).
    pub(crate) ready: bool,
    /// `conditions.serving` (absent means as `ready`).
    pub(crate) serving: bool,
    /// `conditions.terminating` (absent means not).
    pub(crate) terminating: bool,
    /// `nodeName`.
    pub(crate) node_name: String,
    /// `targetRef` when it is a Pod: `namespace/name`.
    pub(crate) pod: Option<String>,
}

/// One endpoint address for one Service port.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Candidate {
    /// Endpoint address and port.
    pub(crate) addr: SocketAddr,
    /// Ready and serving: takes new connections.
    pub(crate) ready: bool,
    /// Serving while terminating: used only when none is ready.
    pub(crate) serving_terminating: bool,
    /// Its node.
    pub(crate) node_name: String,
}

/// What a connection to one Service address may reach.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct ServiceTarget {
    /// The Service's `namespace/name`.
    pub(crate) service: String,
    /// The Service port's name: affinity is kept per Service port, as
    /// kube-proxy keeps it.
    pub(crate) port_name: String,
    /// Only endpoints on the client's node: `internalTrafficPolicy: Local`
    /// on a ClusterIP. Never on the other addresses, as for kube-proxy:
    /// `internalTrafficPolicy` is about ClusterIPs, and a pod calling an
    /// external address of an `externalTrafficPolicy: Local` Service is
    /// sent to every endpoint.
    pub(crate) internal_local: bool,
    /// Session affinity timeout, if `ClientIP`.
    pub(crate) affinity: Option<Duration>,
    /// The endpoints of the address's family, with their port for this
    /// Service port, in slice order.
    pub(crate) candidates: Vec<Candidate>,
}

/// The targets of every resolvable Service, as [`targets`] builds them.
#[derive(Clone, Debug, Default)]
pub(crate) struct Targets {
    /// By (ClusterIP, port) and (external or load-balancer IP, port).
    pub(crate) by_addr: HashMap<SocketAddr, Arc<ServiceTarget>>,
    /// By (nodePort, IPv4?): what a node address on that port reaches.
    /// Kept apart from `by_addr` so its size is the Services', not
    /// Services times node addresses.
    pub(crate) by_node_port: HashMap<(u16, bool), Arc<ServiceTarget>>,
}

/// Builds the targets of every resolvable Service, by Service address:
/// each (ClusterIP, port), (external IP or load-balancer IP, port) and
/// nodePort, which resolve to the same endpoints as the ClusterIP (see
/// [`ServiceTarget::internal_local`] for the one difference).
///
/// Headless Services (no ClusterIP), `ExternalName` and non-TCP ports are
/// left out (connections go through unchanged), and so are selector-less
/// Services none of whose endpoints is a pod (`is_pod_ip`): their endpoints
/// are outside the cluster. An address other than a ClusterIP never takes
/// over a ClusterIP or a pod's IP (`is_pod_ip`): a Service's author sets
/// `externalIPs`, and the pod's identity is what its IP is known by; of two
/// Services claiming one, the first by `namespace/name` keeps it. Each is
/// warned about.
pub(crate) fn targets(
    services: &[Arc<Service>],
    slices: &[Arc<EndpointSlice>],
    is_pod_ip: impl Fn(IpAddr) -> bool,
    is_node_ip: impl Fn(IpAddr) -> bool,
) -> Targets {
    let mut by_service: HashMap<(&str, &str), Vec<&EndpointSlice>> = HashMap::new();
    for s in slices {
        by_service
            .entry((s.namespace.as_str(), s.service.as_str()))
            .or_default()
            .push(s);
    }
    let mut out = Targets::default();
    // Address -> (rank, target): a load balancer's address (written by its
    // controller into `status`) outranks `spec.externalIPs`, which any
    // Service author may write (CVE-2020-8554).
    let mut external: HashMap<SocketAddr, (u8, Arc<ServiceTarget>)> = HashMap::new();
    // By `namespace/name`, so which of two claims wins does not depend on
    // the order a source lists them in.
    let mut services: Vec<&Arc<Service>> = services.iter().collect();
    services.sort_by(|a, b| (&a.namespace, &a.name).cmp(&(&b.namespace, &b.name)));
    for svc in services {
        if svc.kind == "ExternalName" || svc.cluster_ips.is_empty() {
            continue;
        }
        let slices = by_service
            .get(&(svc.namespace.as_str(), svc.name.as_str()))
            .map(Vec::as_slice)
            .unwrap_or_default();
        let any_pod = slices
            .iter()
            .flat_map(|s| &s.endpoints)
            .flat_map(|e| &e.addresses)
            .any(|ip| is_pod_ip(*ip));
        if !svc.has_selector && !any_pod {
            continue;
        }
        for sp in svc.ports.iter().filter(|p| p.protocol == "TCP") {
            // One target per (family, internal_local), shared by every
            // address of that family.
            let mut built: [Option<Arc<ServiceTarget>>; 4] = Default::default();
            let mut target = |v4: bool, internal_local: bool| {
                built[usize::from(v4) * 2 + usize::from(internal_local)]
                    .get_or_insert_with(|| {
                        Arc::new(ServiceTarget {
                            service: svc.key(),
                            port_name: sp.name.clone(),
                            internal_local,
                            affinity: svc.affinity,
                            candidates: candidates(slices, sp, v4),
                        })
                    })
                    .clone()
            };
            for vip in &svc.cluster_ips {
                out.by_addr.insert(
                    SocketAddr::new(vip.to_canonical(), sp.port),
                    target(vip.is_ipv4(), svc.internal_local),
                );
            }
            let ranked = svc
                .load_balancer_ips
                .iter()
                .map(|ip| (0u8, ip))
                .chain(svc.external_ips.iter().map(|ip| (1u8, ip)));
            for (rank, ip) in ranked {
                let addr = SocketAddr::new(ip.to_canonical(), sp.port);
                if is_pod_ip(addr.ip()) {
                    tracing::warn!(service = %svc.key(), %addr, "Service address is a pod's IP; not resolved, the pod keeps it");
                } else if is_node_ip(addr.ip()) {
                    // A node's address stays the node's (its kubelet, its
                    // hostNetwork pods): nodePorts are the one way a
                    // Service is reached there.
                    tracing::warn!(service = %svc.key(), %addr, "Service address is a node's address; not resolved, the node keeps it");
                } else if let Some((held, first)) = external.get(&addr).filter(|(_, f)| f.service != svc.key())
                    && *held <= rank
                {
                    tracing::warn!(service = %svc.key(), %addr, holder = %first.service, "Service address already claimed by another Service; not resolved for this one");
                } else {
                    external.insert(addr, (rank, target(addr.is_ipv4(), false)));
                }
            }
            if let Some(port) = sp.node_port {
                for v4 in [true, false] {
                    match out.by_node_port.get(&(port, v4)) {
                        Some(first) if first.service != svc.key() => {
                            tracing::warn!(service = %svc.key(), node_port = port, holder = %first.service, "nodePort already claimed by another Service; not resolved for this one");
                        }
                        _ => {
                            out.by_node_port.insert((port, v4), target(v4, false));
                        }
                    }
                }
            }
        }
    }
    for (addr, (_, t)) in external {
        match out.by_addr.get(&addr) {
            Some(holder) => {
                tracing::warn!(service = %t.service, %addr, holder = %holder.service, "Service address is another Service's ClusterIP; not resolved for this one");
            }
            None => {
                out.by_addr.insert(addr, t);
            }
        }
    }
    out
}

/// The endpoints of `slices` of one family (`v4` or not) with their port
/// for Service port `sp`.
fn candidates(slices: &[&EndpointSlice], sp: &ServicePort, v4: bool) -> Vec<Candidate> {
    let family = if v4 { "IPv4" } else { "IPv6" };
    let mut candidates = Vec::new();
    for slice in slices.iter().filter(|s| s.address_type == family) {
        let Some(port) = slice
            .ports
            .iter()
            .find(|p| p.name == sp.name && p.protocol == sp.protocol)
            .and_then(|p| p.port)
        else {
            continue;
        };
        for e in &slice.endpoints {
            for ip in e.addresses.iter().filter(|ip| ip.is_ipv4() == v4) {
                candidates.push(Candidate {
                    addr: SocketAddr::new(*ip, port),
                    ready: e.ready && e.serving && !e.terminating,
                    serving_terminating: e.serving && e.terminating,
                    node_name: e.node_name.clone(),
                });
            }
        }
    }
    candidates
}

/// Picks endpoints for new connections: random with two choices by open
/// connections, honouring `internalTrafficPolicy: Local` and ClientIP
/// session affinity. Shared by every pod of the node.
#[derive(Debug, Default)]
pub(crate) struct Balancer {
    /// Open connections per endpoint, on this node.
    open: Mutex<HashMap<SocketAddr, usize>>,
    /// (Service, port name, client IP) → endpoint, and when the client
    /// last used it.
    affinity: Mutex<HashMap<AffinityKey, (SocketAddr, Instant)>>,
    /// Random source state.
    seed: AtomicU64,
    hasher: RandomState,
}

/// Whose affinity: (Service, port name, client IP).
type AffinityKey = (String, String, IpAddr);

/// An open connection to an endpoint; counted until dropped.
#[derive(Debug)]
pub(crate) struct OpenGuard {
    balancer: Arc<Balancer>,
    addr: SocketAddr,
}

impl Drop for OpenGuard {
    fn drop(&mut self) {
        let mut open = self.balancer.open.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(n) = open.get_mut(&self.addr) {
            *n -= 1;
            if *n == 0 {
                open.remove(&self.addr);
            }
        }
    }
}

impl OpenGuard {
    /// The endpoint chosen.
    pub(crate) fn addr(&self) -> SocketAddr {
        self.addr
    }
}

impl Balancer {
    /// A random number (not for secrets: spreading load only).
    fn random(&self) -> u64 {
        self.hasher.hash_one(self.seed.fetch_add(1, Ordering::Relaxed))
    }

    /// Open connections to `addr` through this node's agent.
    #[cfg(test)]
    pub(crate) fn open_count(&self, addr: SocketAddr) -> usize {
        self.open
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&addr)
            .copied()
            .unwrap_or(0)
    }

    /// Chooses an endpoint of `target` for a connection from `client` on
    /// `node` and counts it open until the guard drops; `None` when no
    /// endpoint may take it (the connection is refused).
    pub(crate) fn pick(self: &Arc<Self>, target: &ServiceTarget, node: &str, client: IpAddr) -> Option<OpenGuard> {
        self.pick_at(target, node, client, Instant::now())
    }

    fn pick_at(
        self: &Arc<Self>,
        target: &ServiceTarget,
        node: &str,
        client: IpAddr,
        now: Instant,
    ) -> Option<OpenGuard> {
        let local = |c: &&Candidate| !target.internal_local || c.node_name == node;
        let mut pool: Vec<&Candidate> = target.candidates.iter().filter(local).filter(|c| c.ready).collect();
        if pool.is_empty() {
            pool = target
                .candidates
                .iter()
                .filter(local)
                .filter(|c| c.serving_terminating)
                .collect();
        }
        if pool.is_empty() {
            return None;
        }
        let sticky = target.affinity.and_then(|timeout| {
            let aff = self.affinity.lock().unwrap_or_else(|e| e.into_inner());
            aff.get(&(target.service.clone(), target.port_name.clone(), client))
                .filter(|(addr, at)| now.duration_since(*at) < timeout && pool.iter().any(|c| c.addr == *addr))
                .map(|(addr, _)| *addr)
        });
        let mut open = self.open.lock().unwrap_or_else(|e| e.into_inner());
        let addr = sticky.unwrap_or_else(|| {
            let n = pool.len() as u64;
            let i = (self.random() % n) as usize;
            let j = if n > 1 {
                // A second, different endpoint.
                (i + 1 + (self.random() % (n - 1)) as usize) % pool.len()
            } else {
                i
            };
            let load = |c: &Candidate| open.get(&c.addr).copied().unwrap_or(0);
            if load(pool[j]) < load(pool[i]) {
                pool[j].addr
            } else {
                pool[i].addr
            }
        });
        *open.entry(addr).or_insert(0) += 1;
        drop(open);
        if let Some(timeout) = target.affinity {
            self.remember(
                (target.service.clone(), target.port_name.clone(), client),
                addr,
                now,
                timeout,
            );
        }
        Some(OpenGuard {
            balancer: self.clone(),
            addr,
        })
    }

    fn remember(&self, key: AffinityKey, addr: SocketAddr, now: Instant, timeout: Duration) {
        let mut aff = self.affinity.lock().unwrap_or_else(|e| e.into_inner());
        if aff.len() >= MAX_AFFINITY_ENTRIES && !aff.contains_key(&key) {
            aff.retain(|_, (_, at)| now.duration_since(*at) < timeout);
            if aff.len() >= MAX_AFFINITY_ENTRIES {
                return;
            }
        }
        aff.insert(key, (addr, now));
    }
}

#[cfg(test)]
mod tests;
