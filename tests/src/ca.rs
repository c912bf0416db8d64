//! A CA service for a topology: `nodeward ca serve` in node 1's namespace
//! (on its fabric address, port 15012, so every node reaches it), the
//! service-account token issuer whose keys it trusts, and per node the
//! files an agent needs to use it: the root, and a token bound to the node.

use std::path::PathBuf;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use nodeward::ca_service::jwt::{TokenSigner, k8s_claims};

use crate::agent::Agent;
use crate::topology::Topology;

/// The token issuer (`--service-account-issuer` of a test API server).
pub const ISSUER: &str = "https://kubernetes.default.svc.cluster.local";
/// The node agent's ServiceAccount.
pub const NODE_AGENT: (&str, &str) = ("nodeward-system", "nodeward");

/// Seconds since the epoch.
pub fn now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

/// The CA service of a topology and what its clients need.
pub struct CaService {
    /// Signs tokens; its key is in `jwks.json`.
    pub signer: TokenSigner,
    /// Scratch directory: `jwks.json`, `root-cert.pem`, `<node>.token`.
    pub dir: PathBuf,
    /// `https://10.T.0.1:15012`.
    pub address: String,
    ca_dir: PathBuf,
    config_dir: PathBuf,
    host: String,
    node: usize,
    /// The running server, if any.
    pub server: Option<Agent>,
    /// Further `ca serve` flags.
    pub extra: Vec<String>,
    /// The name its certificate carries (`--server-name`) if not its address.
    pub server_name: Option<String>,
    /// A kubeconfig: pods and the issuer's keys come from that API server
    /// (`--source kube`, OIDC discovery) instead of the config directory
    /// and `jwks.json`.
    pub api: Option<PathBuf>,
}

/// The name of node `node`'s agent pod, which its token is bound to.
pub fn agent_pod(node: &str) -> String {
    format!("nodeward-{node}")
}

/// That pod's uid.
pub fn agent_pod_uid(node: &str) -> String {
    format!("agent-uid-{node}")
}

impl CaService {
    /// Prepares the files for `t`: the issuer's keys, a copy of the root
    /// alone (the agents never see the CA directory), a token of the node
    /// agent's ServiceAccount per node, bound to the node and to the
    /// agent's pod, which the cluster's config lists (`nodeward-agents`:
    /// hostNetwork pods of `nodeward-system`, as the DaemonSet's are).
    pub fn new(t: &Topology) -> CaService {
        let dir = t.ca_dir.with_extension("service");
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("CA service scratch dir");
        let signer = TokenSigner::generate("test-issuer-1");
        std::fs::write(dir.join("jwks.json"), signer.jwks()).expect("write jwks");
        std::fs::copy(t.ca_dir.join("root-cert.pem"), dir.join("root-cert.pem")).expect("copy root");
        let host = format!("10.{}.0.1", t.id);
        let s = CaService {
            signer,
            address: format!("https://{host}:15012"),
            dir,
            ca_dir: t.ca_dir.clone(),
            config_dir: t.config_dir.clone(),
            host,
            node: 0,
            server: None,
            extra: Vec::new(),
            server_name: None,
            api: None,
        };
        let mut pods = String::new();
        for node in &t.nodes {
            let (pod, uid) = (agent_pod(&node.name), agent_pod_uid(&node.name));
            let token = s.signer.sign(&k8s_claims(
                ISSUER,
                "istio-ca",
                NODE_AGENT.0,
                NODE_AGENT.1,
                (&pod, &uid),
                &node.name,
                now(),
            ));
            std::fs::write(s.token_file(&node.name), token).expect("write token");
            pods.push_str(&format!(
                "---\napiVersion: v1\nkind: Pod\nmetadata: {{name: {pod}, namespace: {}, uid: {uid}}}\n\
                 spec: {{nodeName: {}, serviceAccountName: {}, hostNetwork: true}}\nstatus: {{phase: Running}}\n",
                NODE_AGENT.0, node.name, NODE_AGENT.1
            ));
        }
        t.apply("nodeward-agents", &pods);
        s
    }

    /// The issuance log the server writes.
    pub fn issuance_log(&self) -> PathBuf {
        self.dir.join("issuance.jsonl")
    }

    /// A token of pod `name` of `t` for its own ServiceAccount, bound to it.
    pub fn pod_token(&self, t: &Topology, name: &str) -> String {
        let p = t
            .workloads
            .pods
            .iter()
            .find(|p| p.spec.name == name)
            .unwrap_or_else(|| panic!("no pod {name}"));
        self.signer.sign(&k8s_claims(
            ISSUER,
            "istio-ca",
            &p.spec.namespace,
            &p.spec.service_account,
            (name, &p.uid),
            &p.node,
            now(),
        ))
    }

    /// The token file of `node`'s agent.
    pub fn token_file(&self, node: &str) -> PathBuf {
        self.dir.join(format!("{node}.token"))
    }

    /// The root the agents trust.
    pub fn root_file(&self) -> PathBuf {
        self.dir.join("root-cert.pem")
    }

    /// Flags that point node `node`'s agent at the service.
    pub fn agent_flags(&self, node: &str) -> Vec<String> {
        vec![
            "--ca-address".into(),
            self.address.clone(),
            "--ca-root".into(),
            self.root_file().display().to_string(),
            "--ca-token".into(),
            self.token_file(node).display().to_string(),
        ]
    }

    /// Starts the server in node 1's namespace and waits until it serves.
    pub fn start(&mut self, t: &Topology) {
        let server = self.spawn_replica(t, self.node, &self.host.clone(), &self.issuance_log());
        self.server = Some(server);
    }

    /// Starts another replica of the service (same CA directory, a log of
    /// its own) in node `k`'s namespace, on its fabric address, and waits
    /// until it serves; its address is [`CaService::replica_address`].
    pub fn start_replica(&self, t: &Topology, k: usize) -> Agent {
        let host = format!("10.{}.0.{}", t.id, k + 1);
        self.spawn_replica(t, k, &host, &self.replica_log(k))
    }

    /// The address of node `k`'s replica.
    pub fn replica_address(&self, t: &Topology, k: usize) -> String {
        format!("https://10.{}.0.{}:15012", t.id, k + 1)
    }

    /// The issuance log of node `k`'s replica.
    pub fn replica_log(&self, k: usize) -> PathBuf {
        self.dir.join(format!("issuance-{k}.jsonl"))
    }

    fn spawn_replica(&self, t: &Topology, k: usize, host: &str, log: &std::path::Path) -> Agent {
        let view: Vec<String> = match &self.api {
            Some(kubeconfig) => vec![
                "--source".into(),
                "kube".into(),
                "--kubeconfig".into(),
                kubeconfig.display().to_string(),
            ],
            None => vec![
                "--jwks".into(),
                self.dir.join("jwks.json").display().to_string(),
                "--config-dir".into(),
                self.config_dir.display().to_string(),
            ],
        };
        let args: Vec<String> = vec![
            "--ca-dir".into(),
            self.ca_dir.display().to_string(),
            "--listen".into(),
            format!("{host}:15012"),
            "--issuer".into(),
            ISSUER.into(),
            "--server-name".into(),
            self.server_name.clone().unwrap_or_else(|| host.to_string()),
            "--issuance-log".into(),
            log.display().to_string(),
        ];
        let mut args = args;
        args.extend(view);
        args.extend(self.extra.iter().cloned());
        // Each replica's admin endpoint on its own port (two may share a
        // node's namespace).
        args.extend(["--admin-addr".into(), format!("127.0.0.1:{}", 15022 + k)]);
        let refs: Vec<&str> = args.iter().map(String::as_str).collect();
        let server = Agent::ca_serve(&t.nodes[k], &refs);
        server
            .wait_log(Duration::from_secs(10), |l| {
                l["raw"].as_str().is_some_and(|r| r.contains("CA service running"))
            })
            .unwrap_or_else(|| panic!("CA service did not start:\n{}", server.dump()));
        server
    }

    /// Kills the server.
    pub fn kill(&mut self) {
        if let Some(mut s) = self.server.take() {
            s.kill();
        }
    }

    /// The server's log.
    pub fn dump(&self) -> String {
        self.server.as_ref().map(|s| s.dump()).unwrap_or_default()
    }
}

impl Drop for CaService {
    fn drop(&mut self) {
        self.kill();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
