//! `deploy/`: every manifest is a valid object of its Kubernetes type (no
//! field the API would drop), the DaemonSet passes only what `nodeward run`
//! and `nodeward-cni install` accept and mounts every path they use, the
//! RBAC rules are exactly read-only on what the agent watches, the
//! privileges are the three capabilities and nothing more, and kubectl
//! renders the kustomization.

use std::collections::{BTreeSet, HashMap};
use std::path::{Path, PathBuf};

use clap::CommandFactory;
use k8s_openapi::api::apps::v1::{DaemonSet, Deployment};
use k8s_openapi::api::core::v1::{Container, Namespace, Service, ServiceAccount};
use k8s_openapi::api::rbac::v1::{ClusterRole, ClusterRoleBinding};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use nodeward::cni::install::InstallArgs;
use nodeward::config::{Cli, Command, defaults};
use serde::Deserialize;
use serde_json::Value;

fn deploy_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy")
}

/// Every YAML document under `deploy/`, with the file it came from.
fn documents() -> Vec<(PathBuf, Value)> {
    fn walk(dir: &Path, out: &mut Vec<PathBuf>) {
        for e in std::fs::read_dir(dir).unwrap().flatten() {
            let p = e.path();
            if p.is_dir() {
                walk(&p, out);
            } else if p.extension().is_some_and(|x| x == "yaml") {
                out.push(p);
            }
        }
    }
    let mut files = Vec::new();
    walk(&deploy_dir(), &mut files);
    files.sort();
    let mut docs = Vec::new();
    for f in files {
        let text = std::fs::read_to_string(&f).unwrap();
        for de in serde_norway::Deserializer::from_str(&text) {
            let v = Value::deserialize(de).unwrap_or_else(|e| panic!("{}: {e}", f.display()));
            if !v.is_null() {
                docs.push((f.clone(), v));
            }
        }
    }
    docs
}

/// Parses `doc` as `T` and checks nothing was lost on the way: a field the
/// type does not have (a typo, a wrong nesting) would be dropped silently.
fn typed<T: serde::de::DeserializeOwned + serde::Serialize>(file: &Path, doc: &Value) -> T {
    let obj: T = serde_json::from_value(doc.clone()).unwrap_or_else(|e| panic!("{}: {e}", file.display()));
    let back = serde_json::to_value(&obj).unwrap();
    assert_eq!(&back, doc, "{}: fields lost parsing into its type", file.display());
    obj
}

/// The one object of `kind` in the agent's manifests (the CA service in
/// `deploy/ca/` is deployed on its own, with its own ServiceAccount).
fn only<T: serde::de::DeserializeOwned + serde::Serialize>(kind: &str) -> T {
    let ca = deploy_dir().join("ca");
    let docs: Vec<(PathBuf, Value)> = documents()
        .into_iter()
        .filter(|(f, d)| d["kind"] == kind && !f.starts_with(&ca))
        .collect();
    assert_eq!(docs.len(), 1, "one {kind} expected");
    typed(&docs[0].0, &docs[0].1)
}

fn daemonset() -> DaemonSet {
    only("DaemonSet")
}

fn container<'a>(ds: &'a DaemonSet, name: &str) -> &'a Container {
    let spec = ds.spec.template.spec.as_ref().unwrap();
    spec.containers
        .iter()
        .chain(spec.init_containers.iter().flatten())
        .find(|c| c.name == name)
        .unwrap_or_else(|| panic!("no container {name}"))
}

/// The agent container's environment, values from the downward API as
/// a sample value.
fn agent_env(ds: &DaemonSet) -> HashMap<String, String> {
    container(ds, "agent")
        .env
        .iter()
        .flatten()
        .map(|e| (e.name.clone(), e.value.clone().unwrap_or_else(|| "node-1".into())))
        .collect()
}

#[test]
fn every_manifest_parses_into_its_kubernetes_type_without_losing_a_field() {
    let docs = documents();
    assert!(docs.len() >= 9, "{} documents", docs.len());
    for (file, doc) in &docs {
        match doc["kind"].as_str().unwrap_or_default() {
            "Kustomization" => {
                for r in doc["resources"].as_array().unwrap() {
                    let p = file.parent().unwrap().join(r.as_str().unwrap());
                    assert!(p.exists(), "{}: resource {} missing", file.display(), p.display());
                }
            }
            "Namespace" => drop(typed::<Namespace>(file, doc)),
            "ServiceAccount" => drop(typed::<ServiceAccount>(file, doc)),
            "ClusterRole" => drop(typed::<ClusterRole>(file, doc)),
            "ClusterRoleBinding" => drop(typed::<ClusterRoleBinding>(file, doc)),
            "DaemonSet" => drop(typed::<DaemonSet>(file, doc)),
            "Deployment" => drop(typed::<Deployment>(file, doc)),
            "Service" => drop(typed::<Service>(file, doc)),
            "PodDisruptionBudget" => drop(typed::<k8s_openapi::api::policy::v1::PodDisruptionBudget>(file, doc)),
            "CustomResourceDefinition" => drop(typed::<CustomResourceDefinition>(file, doc)),
            other => panic!("{}: unexpected kind {other:?}", file.display()),
        }
    }
}

#[test]
fn the_daemonset_passes_only_what_nodeward_run_and_the_installer_accept() {
    let ds = daemonset();
    let agent = container(&ds, "agent");
    let cli = Cli::command();
    let run = cli.find_subcommand("run").unwrap();
    // Every variable is one of `run`'s flags (NODEWARD_LOG is the log
    // filter, read by the logger), so it becomes that flag here.
    let mut argv: Vec<String> = vec!["nodeward".into()];
    argv.extend(agent.args.iter().flatten().cloned());
    for (name, value) in agent_env(&ds) {
        if name == "NODEWARD_LOG" {
            continue;
        }
        let arg = run
            .get_arguments()
            .find(|a| a.get_env().and_then(|e| e.to_str()) == Some(name.as_str()))
            .unwrap_or_else(|| panic!("{name} is not a variable of nodeward run"));
        argv.push(format!("--{}={value}", arg.get_long().unwrap()));
    }
    let cli = Cli::try_parse_from_args(&argv);
    let Command::Run(args) = cli.command else {
        panic!("the agent container must run `nodeward run`")
    };
    assert_eq!(
        args.cni_socket.as_deref(),
        Some(Path::new("/var/run/nodeward/cni.sock"))
    );

    let install = container(&ds, "install-cni");
    let cmd = install.command.clone().unwrap();
    assert_eq!(
        cmd[..2],
        ["/usr/local/bin/nodeward-cni".to_string(), "install".to_string()]
    );
    let parsed = InstallArgs::parse(&cmd[2..]).unwrap();
    assert_eq!(
        Some(parsed.socket.as_path()),
        args.cni_socket.as_deref(),
        "the plugin must dial where the agent listens"
    );
}

/// `Cli::try_parse_from` with a readable failure.
trait ParseArgs {
    fn try_parse_from_args(argv: &[String]) -> Cli;
}

impl ParseArgs for Cli {
    fn try_parse_from_args(argv: &[String]) -> Cli {
        <Cli as clap::Parser>::try_parse_from(argv).unwrap_or_else(|e| panic!("{argv:?}: {e}"))
    }
}

/// The host path behind `path` in `container`, if a hostPath volume is
/// mounted at or above it.
fn host_path_of(ds: &DaemonSet, c: &Container, path: &Path) -> Option<(String, PathBuf)> {
    let spec = ds.spec.template.spec.as_ref().unwrap();
    let m = c
        .volume_mounts
        .iter()
        .flatten()
        .filter(|m| path.starts_with(&m.mount_path))
        .max_by_key(|m| m.mount_path.len())?;
    let vol = spec.volumes.iter().flatten().find(|v| v.name == m.name)?;
    let rest = path.strip_prefix(&m.mount_path).ok()?;
    let host = vol.host_path.as_ref().map(|h| Path::new(&h.path).join(rest));
    Some((m.name.clone(), host.unwrap_or_default()))
}

#[test]
fn every_path_the_binaries_use_is_mounted_from_the_node() {
    let ds = daemonset();
    let agent = container(&ds, "agent");
    let env = agent_env(&ds);
    let host = |c: &Container, p: &str| {
        host_path_of(&ds, c, Path::new(p)).unwrap_or_else(|| panic!("{p} is not mounted in {}", c.name))
    };
    // The node's own: the same path on the host, or the host's root cgroup.
    assert_eq!(host(agent, &env["NODEWARD_BPFFS"]).1, Path::new(defaults::BPFFS));
    assert_eq!(host(agent, &env["NODEWARD_CGROUP2"]).1, Path::new("/sys/fs/cgroup"));
    assert_eq!(host(agent, "/var/run/netns").1, Path::new("/var/run/netns"));
    let socket = &env["NODEWARD_CNI_SOCKET"];
    assert_eq!(
        host(agent, socket).1,
        Path::new(socket),
        "the runtime execs the plugin on the host: the socket must be at the same path there"
    );
    // From the cluster: the CA's root and a token for it; the config
    // comes from the API.
    for var in ["NODEWARD_CA_ROOT", "NODEWARD_CA_TOKEN"] {
        let (volume, _) = host(agent, &env[var]);
        assert!(
            ["ca-root", "ca-token"].contains(&volume.as_str()),
            "{var} is not on its volume"
        );
    }
    assert_eq!(env["NODEWARD_SOURCE"], "kube");
    let netns = agent
        .volume_mounts
        .iter()
        .flatten()
        .find(|m| m.mount_path == "/var/run/netns")
        .unwrap();
    assert_eq!(
        netns.mount_propagation.as_deref(),
        Some("HostToContainer"),
        "namespaces created after the agent started must appear"
    );

    let install = container(&ds, "install-cni");
    let args = InstallArgs::parse(&install.command.clone().unwrap()[2..]).unwrap();
    assert_eq!(
        host(install, args.bin_dir.to_str().unwrap()).1,
        Path::new("/opt/cni/bin")
    );
    assert_eq!(
        host(install, args.conf_dir.to_str().unwrap()).1,
        Path::new("/etc/cni/net.d")
    );
}

#[test]
fn rbac_grants_exactly_read_only_access_to_what_the_agent_watches() {
    let role: ClusterRole = only("ClusterRole");
    let mut granted = BTreeSet::new();
    for rule in role.rules.iter().flatten() {
        assert!(rule.resource_names.is_none() && rule.non_resource_urls.is_none());
        for g in rule.api_groups.iter().flatten() {
            for r in rule.resources.iter().flatten() {
                for v in &rule.verbs {
                    granted.insert((g.clone(), r.clone(), v.clone()));
                }
            }
        }
    }
    let mut want = BTreeSet::new();
    for (g, r) in [
        ("", "pods"),
        ("", "namespaces"),
        ("", "services"),
        ("", "nodes"),
        ("discovery.k8s.io", "endpointslices"),
        ("security.istio.io", "peerauthentications"),
        ("security.istio.io", "authorizationpolicies"),
    ] {
        // The watchers list and watch; they never get one object.
        for v in ["list", "watch"] {
            want.insert((g.to_string(), r.to_string(), v.to_string()));
        }
    }
    assert_eq!(granted, want);

    let binding: ClusterRoleBinding = only("ClusterRoleBinding");
    assert_eq!(binding.role_ref.name, role.metadata.name.clone().unwrap());
    let sa: ServiceAccount = only("ServiceAccount");
    let subjects = binding.subjects.unwrap();
    assert_eq!(subjects.len(), 1);
    assert_eq!(subjects[0].name, sa.metadata.name.clone().unwrap());
    assert_eq!(subjects[0].namespace, sa.metadata.namespace);
    let ds = daemonset();
    let spec = ds.spec.template.spec.as_ref().unwrap();
    assert_eq!(spec.service_account_name, sa.metadata.name);
}

#[test]
fn the_agent_has_the_three_capabilities_it_needs_and_no_more() {
    let ds = daemonset();
    let spec = &ds.spec;
    let pod = spec.template.spec.as_ref().unwrap();
    assert_eq!(pod.host_network, Some(true));
    assert_ne!(pod.host_pid, Some(true), "hostPID is not needed");
    assert_eq!(pod.priority_class_name.as_deref(), Some("system-node-critical"));
    let drain = defaults::DRAIN_TIMEOUT.as_secs() as i64;
    assert!(pod.termination_grace_period_seconds.unwrap() > drain + 5);
    // A rolling update starts the new agent beside the old one, which it
    // takes the node over from; the old one gets SIGTERM only once the new
    // one is Ready, which it turns once it holds every pod.
    let rolling = spec.update_strategy.as_ref().unwrap().rolling_update.as_ref().unwrap();
    use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
    assert_eq!(rolling.max_surge, Some(IntOrString::Int(1)));
    assert_eq!(rolling.max_unavailable, Some(IntOrString::Int(0)));
    let agent = container(&ds, "agent");
    let probe = agent
        .readiness_probe
        .as_ref()
        .and_then(|p| p.http_get.as_ref())
        .unwrap();
    assert_eq!(probe.path.as_deref(), Some("/healthz/ready"));
    assert_eq!(probe.port, IntOrString::Int(15021));
    for c in pod.containers.iter().chain(pod.init_containers.iter().flatten()) {
        let sc = c.security_context.as_ref().unwrap();
        assert_ne!(sc.privileged, Some(true), "{}", c.name);
        assert_eq!(sc.allow_privilege_escalation, Some(false), "{}", c.name);
        let caps = sc.capabilities.as_ref().unwrap();
        assert_eq!(caps.drop, Some(vec!["ALL".to_string()]), "{}", c.name);
        let added: BTreeSet<&str> = caps.add.iter().flatten().map(String::as_str).collect();
        let want: BTreeSet<&str> = if c.name == "agent" {
            ["BPF", "NET_ADMIN", "SYS_ADMIN"].into()
        } else {
            BTreeSet::new()
        };
        assert_eq!(added, want, "{}", c.name);
        assert!(c.resources.as_ref().unwrap().requests.is_some(), "{}", c.name);
    }
    let probe = container(&ds, "agent")
        .readiness_probe
        .as_ref()
        .unwrap()
        .http_get
        .as_ref()
        .unwrap();
    assert_eq!(probe.path.as_deref(), Some("/healthz/ready"));
    assert_eq!(
        probe.port,
        k8s_openapi::apimachinery::pkg::util::intstr::IntOrString::Int(15021)
    );
    assert_eq!(
        probe.host.as_deref(),
        Some("127.0.0.1"),
        "the admin port is on loopback only"
    );
}

/// `kubectl apply --dry-run=client -k` asks an API server for discovery
/// even in client mode, so offline the check is that kubectl's own
/// kustomize renders both kustomizations into exactly the listed objects.
#[test]
fn kubectl_renders_the_kustomizations() {
    if std::process::Command::new("kubectl")
        .arg("version")
        .arg("--client")
        .output()
        .is_err()
    {
        eprintln!("SKIPPED kubectl_renders_the_kustomizations: no kubectl (cargo xtask installs kubernetes-client)");
        return;
    }
    for (dir, kinds) in [
        (
            deploy_dir(),
            vec![
                "ClusterRole",
                "ClusterRole",
                "ClusterRoleBinding",
                "ClusterRoleBinding",
                "ClusterRoleBinding",
                "DaemonSet",
                "Deployment",
                "Namespace",
                "PodDisruptionBudget",
                "Service",
                "ServiceAccount",
                "ServiceAccount",
            ],
        ),
        (deploy_dir().join("crds"), vec!["CustomResourceDefinition"; 2]),
    ] {
        let out = std::process::Command::new("kubectl")
            .arg("kustomize")
            .arg(&dir)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "kubectl kustomize {}: {}",
            dir.display(),
            String::from_utf8_lossy(&out.stderr)
        );
        let text = String::from_utf8(out.stdout).unwrap();
        let mut got: Vec<String> = serde_norway::Deserializer::from_str(&text)
            .map(|de| Value::deserialize(de).unwrap()["kind"].as_str().unwrap().to_string())
            .collect();
        got.sort();
        assert_eq!(got, kinds, "{}", dir.display());
    }
}

/// Every cargo command that builds what ships, or the tool that builds it,
/// uses the committed `Cargo.lock` (`--locked`): a build that may resolve
/// newer crates than the ones reviewed is not the build that was tested.
#[test]
fn every_shipping_build_and_the_bpf_linker_install_are_locked() {
    let root = deploy_dir().join("..");
    // The image builder's cargo calls (`cargo xtask image`): each
    // `.args([...])` list that starts with a cargo verb resolving crates.
    let image = std::fs::read_to_string(root.join("xtask/src/image.rs")).unwrap();
    let cargo_calls: Vec<&str> = image
        .split(".args([")
        .skip(1)
        .map(|c| c.split("])").next().unwrap_or(c))
        .filter(|c| {
            let verb = c.trim_start().trim_start_matches('"');
            ["build\"", "metadata\"", "tree\""].iter().any(|v| verb.starts_with(v))
        })
        .collect();
    assert!(
        cargo_calls.iter().any(|c| c.contains("\"build\"")),
        "xtask/src/image.rs builds nothing with cargo"
    );
    for call in cargo_calls {
        assert!(
            call.contains("\"--locked\""),
            "xtask/src/image.rs: `cargo {}` is not --locked",
            call.trim()
        );
    }
    // The xtask's installer of bpf-linker, which CI and the image both run.
    let prereqs = std::fs::read_to_string(root.join("xtask/src/prereqs.rs")).unwrap();
    let args = prereqs
        .split("\"install\",")
        .skip(1)
        .map(|call| call.split(')').next().unwrap())
        .find(|args| args.contains("\"bpf-linker\""))
        .expect("xtask/src/prereqs.rs installs bpf-linker with cargo install");
    assert!(
        args.contains("\"--locked\""),
        "bpf-linker is installed without --locked: {args}"
    );
}

/// The volumes of a pod spec that carry a Secret, directly or projected.
fn secret_volumes(spec: &k8s_openapi::api::core::v1::PodSpec) -> Vec<String> {
    spec.volumes
        .iter()
        .flatten()
        .filter(|v| {
            v.secret.is_some()
                || v.projected
                    .as_ref()
                    .is_some_and(|p| p.sources.iter().flatten().any(|s| s.secret.is_some()))
        })
        .map(|v| v.name.clone())
        .collect()
}

/// No node holds a signing key: the DaemonSet mounts no Secret at all (a
/// Secret is where a CA's private key would come from) and runs without
/// `--ca-dir`; its certificates come from the CA service.
#[test]
fn the_daemonset_mounts_no_secret_and_no_ca_directory_and_uses_the_ca_service() {
    let ds = daemonset();
    let spec = ds.spec.template.spec.as_ref().unwrap();
    assert_eq!(
        secret_volumes(spec),
        Vec::<String>::new(),
        "a Secret is mounted into the DaemonSet"
    );
    let agent = container(&ds, "agent");
    let env = agent_env(&ds);
    assert!(
        !env.contains_key("NODEWARD_CA_DIR"),
        "the agents run with a CA directory"
    );
    assert!(
        !agent.args.iter().flatten().any(|a| a.starts_with("--ca-dir")),
        "the agents run with --ca-dir"
    );
    assert_eq!(
        env["NODEWARD_CA_ADDRESS"],
        "https://nodeward-ca.nodeward-system.svc:15012"
    );
    // The token: projected, for the CA's audience, short-lived.
    let token = spec
        .volumes
        .iter()
        .flatten()
        .find(|v| v.name == "ca-token")
        .and_then(|v| v.projected.as_ref())
        .expect("a projected ca-token volume");
    let sat = token
        .sources
        .iter()
        .flatten()
        .find_map(|s| s.service_account_token.as_ref())
        .expect("a serviceAccountToken source");
    assert_eq!(sat.audience.as_deref(), Some("istio-ca"));
    assert!(sat.expiration_seconds.is_some_and(|s| s <= 3600), "a long-lived token");
}

/// The CA service as the install runs it: two replicas, a disruption
/// budget, a Service on 15012, flags `nodeward ca serve` accepts, pods from
/// the API and keys by OIDC discovery, and the one Secret of the install.
#[test]
fn the_ca_service_runs_two_replicas_behind_a_service_and_alone_holds_the_signing_key() {
    let ca = deploy_dir().join("ca");
    let docs: Vec<(PathBuf, Value)> = documents().into_iter().filter(|(f, _)| f.starts_with(&ca)).collect();
    let of = |kind: &str| {
        docs.iter()
            .find(|(_, d)| d["kind"] == kind)
            .map(|(f, d)| (f.clone(), d.clone()))
            .unwrap()
    };
    let (f, d) = of("Deployment");
    let dep: Deployment = typed(&f, &d);
    let spec = dep.spec;
    assert_eq!(spec.replicas, Some(2));
    let labels = spec.selector.match_labels.clone().unwrap();
    let (f, d) = of("PodDisruptionBudget");
    let pdb: k8s_openapi::api::policy::v1::PodDisruptionBudget = typed(&f, &d);
    let pdb = pdb.spec.unwrap();
    assert_eq!(pdb.selector.unwrap().match_labels.unwrap(), labels);
    assert!(pdb.min_available.is_some());
    let (f, d) = of("Service");
    let svc: Service = typed(&f, &d);
    let svc = svc.spec.unwrap();
    assert_eq!(svc.selector.unwrap(), labels);
    assert!(svc.ports.unwrap().iter().any(|p| p.port == 15012));
    let pod = spec.template.spec.unwrap();
    let c = &pod.containers[0];
    let mut argv = vec!["nodeward".to_string()];
    argv.extend(c.args.iter().flatten().cloned());
    let Command::Ca(nodeward::config::CaCommand::Serve(_)) = Cli::try_parse_from_args(&argv).command else {
        panic!("the CA container must run `nodeward ca serve`: {argv:?}")
    };
    for flag in ["--config-dir", "--jwks", "--kubeconfig"] {
        assert!(
            !argv.iter().any(|a| a.starts_with(flag)),
            "{flag}: pods and keys come from the API"
        );
    }
    assert!(argv.iter().any(|a| a.starts_with("--issuance-log=")));
    assert_eq!(secret_volumes(&pod), vec!["cacerts".to_string()]);
    // Nothing else in the install mounts a Secret.
    for (f, d) in documents() {
        if d["kind"] == "DaemonSet" || (d["kind"] == "Deployment" && !f.starts_with(&ca)) {
            let spec = d["spec"]["template"]["spec"].clone();
            let spec: k8s_openapi::api::core::v1::PodSpec = serde_json::from_value(spec).unwrap();
            assert!(secret_volumes(&spec).is_empty(), "{} mounts a Secret", f.display());
        }
    }
}
