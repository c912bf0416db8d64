//! `cargo xtask vm-test`: the integration suite on other kernels, in VMs.
//!
//! Each kernel is a Debian package unpacked under `target/vm/kernels/` (never
//! installed into the host's `/boot`). The guest boots it under qemu with a
//! small initramfs (busybox, the virtio/virtiofs modules the package builds
//! as modules, `xtask/vm/init`) and mounts the host's root read-only over
//! virtiofs, so the agent, the test binaries and the test bed's tools
//! (iproute2, iptables, tcpdump) are the host's own. The init runs each
//! test binary with `CI=true` and reports on the serial console between
//! markers, which this module reads, prints, and totals.

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

use crate::{cargo, root, run, test_result_counts};

/// Kernel options the agent or the guest cannot do without, built in.
const BUILT_IN: &[&str] = &[
    "CONFIG_BPF_SYSCALL",
    "CONFIG_BPF_JIT",
    "CONFIG_CGROUPS",
    "CONFIG_CGROUP_BPF",
    "CONFIG_NET_NS",
    "CONFIG_BLK_DEV_INITRD",
    "CONFIG_DEVTMPFS",
    "CONFIG_TMPFS",
    "CONFIG_SERIAL_8250_CONSOLE",
];

/// Kernel options needed built in or as modules: virtio and virtiofs for the
/// guest's root, veth and bridge for the test bed's topologies.
const BUILT_IN_OR_MODULE: &[&str] = &[
    "CONFIG_VIRTIO_PCI",
    "CONFIG_FUSE_FS",
    "CONFIG_VIRTIO_FS",
    "CONFIG_VETH",
    "CONFIG_BRIDGE",
];

/// Modules the initramfs loads before it can mount the root (with their
/// dependencies, from the package's `modules.dep`), when not built in.
const EARLY_MODULES: &[&str] = &["virtio_pci", "virtiofs"];

/// The oldest kernel `cargo xtask test` runs the suite on in a VM.
pub const OLDEST: Kernel = Kernel::Debian61;

/// What `cargo xtask test` runs on [`OLDEST`] (libtest name filters), one
/// test per kernel feature the agent relies on: the startup checks;
/// capture and the tunnel across nodes in all address families (connect
/// hooks, sockops, sk_lookup); `getsockname` rewriting; the node's probes
/// (`bpf_bind` in the connect hooks); NodePort traffic through the
/// kernel's NAT into sk_lookup; no plaintext on the wire between enrolled
/// pods; UDP untouched; pinned links surviving SIGKILL and replaced by the
/// next agent; STRICT with the agent killed (fail closed); and the
/// programs' own log (`--ebpf-log`) on and off. A topology test takes half
/// a minute to a minute under TCG, the only accelerator on a host without
/// nested virtualisation; `vm-test` runs everything.
pub const CI_SUBSET: &[&str] = &[
    "refused_by_name",
    "without_privileges_the_missing_capabilities_are_named",
    "cross_node_connections_are_captured_on_both_ends_ipv4_ipv6_and_mapped",
    "getsockname_shows_the_pod_address_and_the_socket_port_but_loopback_stays_loopback",
    "probes_from_the_node_reach_a_strict_pod_from_the_probe_source",
    "node_port_traffic_masqueraded_to_the_node_address_is_plaintext_like_any_other",
    "no_plaintext_between_enrolled_pods_on_the_wire_but_plaintext_to_others",
    "udp_and_dns_style_traffic_is_untouched",
    "sigkill_fails_closed_and_a_restarted_agent_readopts_without_duplicates",
    "strict_still_refuses_plaintext_with_the_agent_killed",
    "with_ebpf_log_the_drops_made_while_the_agent_was_down_are_logged_when_it_is_back",
];

/// A kernel to test on.
#[derive(Clone, Debug, PartialEq)]
pub enum Kernel {
    /// Debian 12's own kernel (`linux-image-6.1.0-*-cloud-amd64`).
    Debian61,
    /// Debian 12's 6.12 (`linux-image-6.12.*+deb12-cloud-amd64`, security
    /// or backports).
    Debian612,
    /// The kernel the host runs, from `/boot`.
    Host,
    /// A kernel `.deb`, or a directory holding `boot/vmlinuz-*`,
    /// `boot/config-*` and `lib/modules/*`.
    Path(PathBuf),
}

impl Kernel {
    /// Parses `6.1`, `6.12`, `host` or a path.
    pub fn parse(s: &str) -> Result<Kernel, String> {
        match s {
            "6.1" => Ok(Kernel::Debian61),
            "6.12" => Ok(Kernel::Debian612),
            "host" => Ok(Kernel::Host),
            p if Path::new(p).exists() => Ok(Kernel::Path(PathBuf::from(p))),
            other => Err(format!(
                "{other}: not 6.1, 6.12, host, nor an existing .deb or directory"
            )),
        }
    }

    fn label(&self) -> String {
        match self {
            Kernel::Debian61 => "6.1".into(),
            Kernel::Debian612 => "6.12".into(),
            Kernel::Host => "host".into(),
            Kernel::Path(p) => p.display().to_string(),
        }
    }
}

/// What `vm-test` runs: kernels, which test binaries, what to pass them.
pub struct Plan {
    /// Kernels, in order.
    pub kernels: Vec<Kernel>,
    /// Test binaries (`capture`, `policy`, ...); empty: all of them.
    pub tests: Vec<String>,
    /// Arguments for each test binary (e.g. a test name filter).
    pub args: Vec<String>,
    /// Force TCG even when KVM opens.
    pub tcg: bool,
    /// Whole-run limit per kernel; `None`: 30 minutes under KVM, 180 under TCG.
    pub timeout: Option<Duration>,
}

/// An unpacked kernel ready to boot.
struct Unpacked {
    /// `uname -r` of the kernel.
    version: String,
    /// The package root (holds `boot/` and `lib/modules/<version>/`).
    dir: PathBuf,
    vmlinuz: PathBuf,
    config: PathBuf,
}

/// One kernel's outcome.
struct Outcome {
    label: String,
    passed: u64,
    failed: u64,
    failures: Vec<String>,
    problem: Option<String>,
    /// The guest said `NW-VM-DONE`.
    finished: bool,
}

/// Builds, then boots every kernel of the plan; fails if any test failed
/// or any guest did not finish. Returns the tests passed and failed over
/// all kernels.
pub fn run_plan(plan: &Plan) -> Result<(u64, u64)> {
    crate::prereqs::ensure_vm()?;
    crate::build()?;
    let tests = test_binaries(&plan.tests)?;
    let mut outcomes = Vec::new();
    for kernel in &plan.kernels {
        let label = kernel.label();
        println!("== vm-test on {label}");
        let unpacked = match unpack(kernel) {
            Ok(Some(u)) => u,
            Ok(None) => continue,
            Err(e) => {
                outcomes.push(Outcome::problem(&label, format!("{e:#}")));
                continue;
            }
        };
        let started = Instant::now();
        let outcome =
            boot(&label, &unpacked, &tests, plan).unwrap_or_else(|e| Outcome::problem(&label, format!("{e:#}")));
        println!("== {label} ({}) took {:.0?}", unpacked.version, started.elapsed());
        outcomes.push(outcome);
    }
    let mut bad = false;
    for o in &outcomes {
        bad |= !o.ok();
        let verdict = match &o.problem {
            _ if o.ok() => "ok".to_string(),
            Some(p) => format!("did not finish: {p}"),
            None => format!("failed: {}", o.failures.join(", ")),
        };
        println!("vm {}: {} passed, {} failed — {verdict}", o.label, o.passed, o.failed);
    }
    if bad {
        bail!("vm-test failed (serial logs under target/vm/run/)");
    }
    let passed = outcomes.iter().map(|o| o.passed).sum();
    let failed = outcomes.iter().map(|o| o.failed).sum();
    Ok((passed, failed))
}

impl Outcome {
    fn new(label: &str) -> Outcome {
        Outcome {
            label: label.to_string(),
            passed: 0,
            failed: 0,
            failures: Vec::new(),
            problem: None,
            finished: false,
        }
    }

    fn problem(label: &str, why: String) -> Outcome {
        Outcome {
            problem: Some(why),
            ..Outcome::new(label)
        }
    }

    /// Takes in one line of the guest's serial console.
    fn read(&mut self, line: &str) {
        if let Some((p, f)) = test_result_counts(line) {
            self.passed += p;
            self.failed += f;
        }
        if let Some(name) = line.strip_prefix("test ").and_then(|l| l.strip_suffix(" ... FAILED")) {
            self.failures.push(name.to_string());
        }
        // A test binary that crashed prints no summary, or one that does not
        // account for its exit status.
        if let Some(rest) = line.strip_prefix("NW-VM-TEST-END ")
            && !rest.ends_with(" rc=0")
            && self.failures.is_empty()
        {
            self.problem = Some(format!("test binary ended badly: {rest}"));
        }
        if line.starts_with("NW-VM-FATAL") {
            self.problem = Some(line.to_string());
        }
        if line.starts_with("NW-VM-DONE") {
            self.finished = true;
        }
    }

    /// Whether every test passed and the guest got to the end.
    fn ok(&self) -> bool {
        self.problem.is_none() && self.failed == 0 && self.failures.is_empty() && self.finished
    }
}

/// Builds the integration tests; returns the executables of those named
/// (all when none are).
///
/// Built with the package selection `cargo test` uses (the default
/// members), not `--package nodeward-testbed`: features unify over the
/// packages selected, so a narrower selection would rebuild every
/// dependency a second time (gigabytes of target dir in a CI run that has
/// just built them).
fn test_binaries(names: &[String]) -> Result<Vec<PathBuf>> {
    let out = cargo()
        .args(["test", "--locked", "--tests", "--no-run", "--message-format=json"])
        .current_dir(root())
        .stderr(Stdio::inherit())
        .output()
        .context("starting cargo test --no-run")?;
    if !out.status.success() {
        bail!("building the integration tests failed");
    }
    let mut found = Vec::new();
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        // Only what is needed from cargo's JSON: the test targets' executables.
        if !is_testbed_test(line) {
            continue;
        }
        let Some(exe) = json_string(line, "executable") else {
            continue;
        };
        let name = Path::new(&exe)
            .file_name()
            .and_then(|n| n.to_str())
            .and_then(|n| n.rsplit_once('-'))
            .map(|(n, _)| n.to_string())
            .unwrap_or_default();
        if names.is_empty() || names.iter().any(|n| n == &name) {
            found.push(PathBuf::from(exe));
        }
    }
    if found.is_empty() {
        bail!("no integration test binary matches {names:?}");
    }
    found.sort();
    Ok(found)
}

/// Whether one line of cargo's JSON is an integration test of the test bed
/// (the agent's own tests and unit tests are not run in the guest).
fn is_testbed_test(line: &str) -> bool {
    line.contains("\"reason\":\"compiler-artifact\"")
        && line.contains("\"kind\":[\"test\"]")
        && line.contains("#nodeward-testbed@")
}

/// The string value of `"key":"..."` in one line of JSON (no escapes in
/// paths cargo prints for this workspace).
fn json_string(line: &str, key: &str) -> Option<String> {
    let start = line.find(&format!("\"{key}\":\""))? + key.len() + 4;
    let end = line[start..].find('"')?;
    Some(line[start..start + end].to_string())
}

// === kernels ===

fn vm_dir() -> PathBuf {
    root().join("target/vm")
}

/// Downloads and unpacks the kernel if it is not already; `None` when it
/// is to be skipped (the host's image is not readable).
fn unpack(kernel: &Kernel) -> Result<Option<Unpacked>> {
    let kernels = vm_dir().join("kernels");
    std::fs::create_dir_all(&kernels)?;
    let dir = match kernel {
        Kernel::Debian61 => debian_kernel(&kernels, r"^linux-image-6\.1\.0-[0-9]+-cloud-amd64$", false)?,
        Kernel::Debian612 => debian_kernel(&kernels, r"^linux-image-6\.12\.[0-9]+\+deb12-cloud-amd64$", true)?,
        Kernel::Host => return host_kernel(),
        Kernel::Path(p) if p.is_dir() => p.clone(),
        Kernel::Path(deb) => unpack_deb(deb, &kernels)?,
    };
    unpacked_in(&dir).map(Some)
}

/// The newest package matching `pattern` from apt, unpacked once under
/// `kernels/<package>/` (a later run reuses it, offline).
fn debian_kernel(kernels: &Path, pattern: &str, backports: bool) -> Result<PathBuf> {
    let cached = newest_cached(kernels, pattern);
    if let Some(dir) = cached {
        return Ok(dir);
    }
    let mut package = newest_package(pattern)?;
    if package.is_none() && backports {
        crate::prereqs::add_backports()?;
        package = newest_package(pattern)?;
    }
    let Some(package) = package else {
        bail!("no Debian package matches {pattern} (after apt-get update)");
    };
    let debs = vm_dir().join("debs");
    std::fs::create_dir_all(&debs)?;
    println!("downloading {package}");
    // Not `run`: that runs in the workspace root. Downloads as root (apt's
    // `_apt` user may not write under target/).
    let status = Command::new("apt-get")
        .args(["download", "-q", "-o", "APT::Sandbox::User=root", &package])
        .current_dir(&debs)
        .status()
        .context("starting apt-get download")?;
    if !status.success() {
        bail!("apt-get download {package} failed: {status}");
    }
    let deb = std::fs::read_dir(&debs)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .find(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with(&format!("{package}_")))
        })
        .with_context(|| format!("apt-get download left no {package}_*.deb in {}", debs.display()))?;
    let dir = unpack_deb(&deb, kernels)?;
    // The unpacked tree is the cache; the .deb is not needed again.
    let _ = std::fs::remove_file(&deb);
    Ok(dir)
}

/// Unpacks a kernel `.deb` into `kernels/<file stem>/` and builds its
/// `modules.dep` (the package's postinst would, and we do not install it).
fn unpack_deb(deb: &Path, kernels: &Path) -> Result<PathBuf> {
    let name = deb
        .file_name()
        .and_then(|n| n.to_str())
        .and_then(|n| n.split('_').next())
        .with_context(|| format!("{}: not a .deb file name", deb.display()))?;
    let dir = kernels.join(name);
    if dir.join(".complete").exists() {
        return Ok(dir);
    }
    let _ = std::fs::remove_dir_all(&dir);
    run(Command::new("dpkg-deb").arg("-x").arg(deb).arg(&dir))?;
    let u = unpacked_in(&dir)?;
    run(Command::new("depmod").arg("-b").arg(&dir).arg(&u.version))?;
    std::fs::write(dir.join(".complete"), "")?;
    Ok(dir)
}

/// An unpacked package already under `kernels/` whose name matches.
fn newest_cached(kernels: &Path, pattern: &str) -> Option<PathBuf> {
    let prefix = regex_prefix(pattern);
    let mut names: Vec<String> = std::fs::read_dir(kernels)
        .ok()?
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .filter(|n| n.starts_with(&prefix) && kernels.join(n).join(".complete").exists())
        .collect();
    names.sort_by(|a, b| version_cmp(a, b));
    names.pop().map(|n| kernels.join(n))
}

/// The literal start of an anchored package pattern (`linux-image-6.1.0-`).
fn regex_prefix(pattern: &str) -> String {
    let body = pattern.trim_start_matches('^');
    let literal: String = body
        .chars()
        .take_while(|c| !matches!(c, '[' | '(' | '*' | '+'))
        .collect();
    literal.replace('\\', "")
}

/// The newest package apt knows whose name matches `pattern`.
fn newest_package(pattern: &str) -> Result<Option<String>> {
    let list = |cmd: &mut Command| -> Result<Vec<String>> {
        let out = cmd.output().context("starting apt-cache")?;
        Ok(String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter_map(|l| l.split_whitespace().next().map(str::to_string))
            .collect())
    };
    let mut names = list(Command::new("apt-cache").args(["search", "--names-only", pattern]))?;
    if names.is_empty() {
        run(Command::new("apt-get").args(["update", "-q"]))?;
        names = list(Command::new("apt-cache").args(["search", "--names-only", pattern]))?;
    }
    names.sort_by(|a, b| version_cmp(a, b));
    Ok(names.pop())
}

/// Orders names by their numeric runs (`6.12.117` after `6.12.95`).
fn version_cmp(a: &str, b: &str) -> std::cmp::Ordering {
    fn parts(s: &str) -> Vec<(u64, String)> {
        let mut out = Vec::new();
        let mut chars = s.chars().peekable();
        while chars.peek().is_some() {
            let digits: String = std::iter::from_fn(|| chars.next_if(char::is_ascii_digit)).collect();
            let rest: String = std::iter::from_fn(|| chars.next_if(|c| !c.is_ascii_digit())).collect();
            out.push((digits.parse().unwrap_or(0), rest));
        }
        out
    }
    parts(a).cmp(&parts(b))
}

/// The host's kernel, if its image and config are readable in `/boot`.
fn host_kernel() -> Result<Option<Unpacked>> {
    let version = String::from_utf8_lossy(&Command::new("uname").arg("-r").output()?.stdout)
        .trim()
        .to_string();
    let vmlinuz = PathBuf::from(format!("/boot/vmlinuz-{version}"));
    let config = PathBuf::from(format!("/boot/config-{version}"));
    for f in [&vmlinuz, &config] {
        if std::fs::File::open(f).is_err() {
            println!(
                "vm host: SKIPPED: {} is not readable on this machine (kernel {version}); \
                 `cargo xtask test` runs the suite on the host kernel directly",
                f.display()
            );
            return Ok(None);
        }
    }
    Ok(Some(Unpacked {
        version,
        dir: PathBuf::from("/"),
        vmlinuz,
        config,
    }))
}

/// Finds `boot/vmlinuz-*` and `boot/config-*` in an unpacked package.
fn unpacked_in(dir: &Path) -> Result<Unpacked> {
    let boot = dir.join("boot");
    let entries: Vec<String> = std::fs::read_dir(&boot)
        .with_context(|| format!("{}: no boot/ directory (not a kernel package)", dir.display()))?
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .collect();
    let version = entries
        .iter()
        .find_map(|n| n.strip_prefix("vmlinuz-"))
        .with_context(|| format!("{}: no vmlinuz-*", boot.display()))?
        .to_string();
    let config = boot.join(format!("config-{version}"));
    if !config.exists() {
        bail!("{}: missing", config.display());
    }
    Ok(Unpacked {
        vmlinuz: boot.join(format!("vmlinuz-{version}")),
        config,
        version,
        dir: dir.to_path_buf(),
    })
}

/// Checks the kernel's config; returns the early modules to load (their
/// paths in load order), or names every missing option.
fn check_config(k: &Unpacked) -> Result<Vec<PathBuf>> {
    let text = std::fs::read_to_string(&k.config).with_context(|| format!("reading {}", k.config.display()))?;
    let value = |opt: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(opt)?.strip_prefix('='))
            .unwrap_or("n")
            .to_string()
    };
    let mut missing = Vec::new();
    for opt in BUILT_IN {
        if value(opt) != "y" {
            missing.push(format!("{opt}={} (needs y)", value(opt)));
        }
    }
    let mut summary = Vec::new();
    for opt in BUILT_IN_OR_MODULE {
        let v = value(opt);
        if v != "y" && v != "m" {
            missing.push(format!("{opt}={v} (needs y or m)"));
        }
        summary.push(format!("{}={v}", opt.trim_start_matches("CONFIG_")));
    }
    if !missing.is_empty() {
        bail!(
            "kernel {} ({}) lacks: {}",
            k.version,
            k.config.display(),
            missing.join(", ")
        );
    }
    println!(
        "kernel {}: BPF syscall, BPF JIT, cgroup BPF, netns built in; {}",
        k.version,
        summary.join(" ")
    );
    let mut modules: Vec<PathBuf> = Vec::new();
    for m in EARLY_MODULES {
        let out = Command::new("modprobe")
            .arg("-d")
            .arg(&k.dir)
            .args(["-S", &k.version, "--show-depends", m])
            .output()
            .context("starting modprobe")?;
        if !out.status.success() {
            bail!(
                "kernel {}: module {m} not found: {}",
                k.version,
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        for line in String::from_utf8_lossy(&out.stdout).lines() {
            if let Some(path) = line.strip_prefix("insmod ") {
                let path = PathBuf::from(path.trim());
                if !modules.contains(&path) {
                    modules.push(path);
                }
            }
        }
    }
    Ok(modules)
}

// === the guest ===

/// The initramfs: busybox, the init script and the early modules
/// (decompressed: busybox's insmod reads plain `.ko`).
fn initramfs(run_dir: &Path, modules: &[PathBuf]) -> Result<PathBuf> {
    let staging = run_dir.join("initramfs");
    let _ = std::fs::remove_dir_all(&staging);
    std::fs::create_dir_all(staging.join("bin"))?;
    std::fs::create_dir_all(staging.join("modules"))?;
    std::fs::copy("/bin/busybox", staging.join("bin/busybox")).context("copying /bin/busybox (busybox-static)")?;
    std::os::unix::fs::symlink("busybox", staging.join("bin/sh"))?;
    std::fs::copy(root().join("xtask/vm/init"), staging.join("init"))?;
    let mut order = String::new();
    for m in modules {
        let file = m.file_name().and_then(|n| n.to_str()).context("module file name")?;
        let (plain, tool) = match file.rsplit_once('.') {
            Some((stem, "xz")) => (stem.to_string(), Some("xz")),
            Some((stem, "zst")) => (stem.to_string(), Some("zstd")),
            _ => (file.to_string(), None),
        };
        let dest = staging.join("modules").join(&plain);
        match tool {
            None => {
                std::fs::copy(m, &dest).with_context(|| format!("copying {}", m.display()))?;
            }
            Some(tool) => {
                let out = Command::new(tool)
                    .arg("-dc")
                    .arg(m)
                    .output()
                    .with_context(|| format!("starting {tool}"))?;
                if !out.status.success() {
                    bail!("{tool} -dc {} failed", m.display());
                }
                std::fs::write(&dest, out.stdout)?;
            }
        }
        order.push_str(&plain);
        order.push('\n');
    }
    std::fs::write(staging.join("modules/order"), order)?;
    let image = run_dir.join("initramfs.cpio");
    let files = Command::new("find").arg(".").current_dir(&staging).output()?.stdout;
    let mut cpio = Command::new("cpio")
        .args(["-o", "-H", "newc", "--quiet"])
        .current_dir(&staging)
        .stdin(Stdio::piped())
        .stdout(std::fs::File::create(&image)?)
        .spawn()
        .context("starting cpio")?;
    cpio.stdin.take().context("cpio stdin")?.write_all(&files)?;
    if !cpio.wait()?.success() {
        bail!("cpio failed");
    }
    Ok(image)
}

/// Whether KVM is to be used: `/dev/kvm` opens and an earlier boot under it
/// did not fail (remembered in `target/vm/no-kvm`).
fn use_kvm(plan: &Plan) -> bool {
    !plan.tcg
        && std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open("/dev/kvm")
            .is_ok()
        && !vm_dir().join("no-kvm").exists()
}

/// Boots one kernel and runs the tests in it.
fn boot(label: &str, k: &Unpacked, tests: &[PathBuf], plan: &Plan) -> Result<Outcome> {
    let modules = check_config(k)?;
    let run_dir = vm_dir().join("run").join(&k.version);
    std::fs::create_dir_all(&run_dir)?;
    let image = initramfs(&run_dir, &modules)?;
    let args = plan.args.join(" ");
    let list: String = tests.iter().map(|t| format!("{} {args}\n", t.display())).collect();
    std::fs::write(run_dir.join("tests"), list)?;
    let kvm = use_kvm(plan);
    match guest(label, k, &run_dir, &image, kvm, plan)? {
        Boot::Ran(o) => Ok(o),
        Boot::NoKvm => {
            println!(
                "vm {label}: the guest did not reach its init under KVM within {}s (qemu failed or hung: \
                 nested KVM on this host cannot run it); falling back to TCG, remembered in target/vm/no-kvm",
                KVM_BOOT_LIMIT.as_secs()
            );
            std::fs::write(vm_dir().join("no-kvm"), "")?;
            match guest(label, k, &run_dir, &image, false, plan)? {
                Boot::Ran(o) => Ok(o),
                Boot::NoKvm => bail!("unreachable: TCG is not KVM"),
            }
        }
    }
}

/// How much longer tests wait under TCG, which emulates every instruction.
const TCG_PATIENCE: u32 = 10;

/// How long a KVM guest may take to reach its init.
const KVM_BOOT_LIMIT: Duration = Duration::from_secs(30);

/// How a boot ended.
enum Boot {
    /// The guest ran the suite (or tried to).
    Ran(Outcome),
    /// Under KVM, qemu died or the guest hung before its init said a word.
    NoKvm,
}

/// Kills a child process on drop (virtiofsd, qemu), whatever happened.
struct Reaped(Child);

impl Drop for Reaped {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn guest(label: &str, k: &Unpacked, run_dir: &Path, image: &Path, kvm: bool, plan: &Plan) -> Result<Boot> {
    let socket = run_dir.join("virtiofs.sock");
    let _ = std::fs::remove_file(&socket);
    let vfs_log = std::fs::File::create(run_dir.join("virtiofsd.log"))?;
    // chroot sandbox: the default (namespace + pivot_root) cannot pivot on `/`.
    let virtiofsd = Command::new("/usr/lib/qemu/virtiofsd")
        .arg(format!("--socket-path={}", socket.display()))
        .args(["-o", "source=/", "-o", "cache=auto", "-o", "sandbox=chroot"])
        .stdout(vfs_log.try_clone()?)
        .stderr(vfs_log)
        .spawn()
        .context("starting /usr/lib/qemu/virtiofsd (qemu-system-common)")?;
    let _virtiofsd = Reaped(virtiofsd);
    let start = Instant::now();
    while !socket.exists() {
        if start.elapsed() > Duration::from_secs(10) {
            bail!("virtiofsd did not create {} (see virtiofsd.log)", socket.display());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let (accel, cpu) = if kvm { ("kvm", "host") } else { ("tcg", "max") };
    let limit = plan.timeout.unwrap_or(if kvm {
        Duration::from_secs(30 * 60)
    } else {
        Duration::from_secs(180 * 60)
    });
    println!(
        "vm {label}: booting {} under {accel} (limit {} min)",
        k.version,
        limit.as_secs() / 60
    );
    let cmdline = format!(
        "console=ttyS0 loglevel=4 panic=-1 NW_ROOT={} NW_RUN={} NW_KDIR={} NW_PATIENCE={}",
        root().display(),
        run_dir.display(),
        k.dir.display(),
        if kvm { 1 } else { TCG_PATIENCE }
    );
    let mut qemu = Command::new("nice");
    qemu.args([
        "-n",
        "10",
        "qemu-system-x86_64",
        "-nodefaults",
        "-no-reboot",
        "-display",
        "none",
    ])
    .args([
        "-machine",
        &format!("q35,accel={accel}"),
        "-cpu",
        cpu,
        "-smp",
        "2",
        "-m",
        "4G",
    ])
    .args([
        "-object",
        "memory-backend-memfd,id=mem,size=4G,share=on",
        "-numa",
        "node,memdev=mem",
    ])
    .arg("-chardev")
    .arg(format!("socket,id=vfs,path={}", socket.display()))
    .args(["-device", "vhost-user-fs-pci,chardev=vfs,tag=root"])
    .arg("-kernel")
    .arg(&k.vmlinuz)
    .arg("-initrd")
    .arg(image)
    .args(["-append", &cmdline, "-serial", "stdio", "-monitor", "none"])
    .stdin(Stdio::null())
    .stdout(Stdio::piped())
    .stderr(Stdio::inherit());
    let mut child = qemu.spawn().context("starting qemu-system-x86_64")?;
    let stdout = child.stdout.take().context("qemu stdout")?;
    let pid = child.id();
    let qemu = Reaped(child);
    let alive = Arc::new(AtomicBool::new(false));
    let done = Arc::new(AtomicBool::new(false));
    let timed_out = Arc::new(AtomicBool::new(false));
    {
        let (alive, done, timed_out) = (alive.clone(), done.clone(), timed_out.clone());
        std::thread::spawn(move || {
            let start = Instant::now();
            while !done.load(Ordering::Relaxed) {
                let hung = kvm && !alive.load(Ordering::Relaxed) && start.elapsed() > KVM_BOOT_LIMIT;
                if hung || start.elapsed() > limit {
                    timed_out.store(true, Ordering::Relaxed);
                    let _ = Command::new("kill").args(["-9", &pid.to_string()]).status();
                    return;
                }
                std::thread::sleep(Duration::from_millis(200));
            }
        });
    }
    let mut serial = std::fs::File::create(run_dir.join("serial.log"))?;
    let mut outcome = Outcome::new(label);
    for line in BufReader::new(stdout).split(b'\n') {
        let line = String::from_utf8_lossy(&line?).trim_end_matches('\r').to_string();
        writeln!(serial, "{line}")?;
        if line.contains("NW-VM-ALIVE") || line.contains("NW-VM-KERNEL") {
            alive.store(true, Ordering::Relaxed);
        }
        println!("[{label}] {line}");
        outcome.read(&line);
    }
    done.store(true, Ordering::Relaxed);
    drop(qemu);
    if kvm && !alive.load(Ordering::Relaxed) {
        return Ok(Boot::NoKvm);
    }
    if !outcome.finished && outcome.problem.is_none() {
        outcome.problem = Some(if timed_out.load(Ordering::Relaxed) {
            format!("timed out after {} min", limit.as_secs() / 60)
        } else {
            "the guest stopped before the suite ended (kernel panic? see the serial log above)".into()
        });
    }
    Ok(Boot::Ran(outcome))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kernel_package_versions_order_numerically() {
        let mut v = [
            "linux-image-6.12.95+deb12-cloud-amd64",
            "linux-image-6.12.117+deb12-cloud-amd64",
            "linux-image-6.12.43+deb12-cloud-amd64",
        ];
        v.sort_by(|a, b| version_cmp(a, b));
        assert_eq!(v.last(), Some(&"linux-image-6.12.117+deb12-cloud-amd64"));
        assert_eq!(
            regex_prefix(r"^linux-image-6\.1\.0-[0-9]+-cloud-amd64$"),
            "linux-image-6.1.0-"
        );
        assert_eq!(
            regex_prefix(r"^linux-image-6\.12\.[0-9]+\+deb12-cloud-amd64$"),
            "linux-image-6.12."
        );
    }

    fn guest(lines: &[&str]) -> Outcome {
        let mut o = Outcome::new("6.1");
        for l in lines {
            o.read(l);
        }
        o
    }

    #[test]
    fn a_failed_test_in_the_guest_fails_the_kernel_and_is_named() {
        let o = guest(&[
            "NW-VM-TEST-BEGIN /w/target/debug/deps/capture-1",
            "test a ... ok",
            "test b ... FAILED",
            "test result: FAILED. 1 passed; 1 failed; 0 ignored; 0 measured; 0 filtered out",
            "NW-VM-TEST-END /w/target/debug/deps/capture-1 rc=101",
            "NW-VM-DONE failed=1",
        ]);
        assert!(!o.ok());
        assert_eq!((o.passed, o.failed, o.failures.clone()), (1, 1, vec!["b".to_string()]));
        assert!(o.problem.is_none());
    }

    #[test]
    fn a_crashed_test_binary_or_a_guest_that_never_finishes_fails() {
        let crashed = guest(&[
            "test a ... ok",
            "NW-VM-TEST-END /w/target/debug/deps/policy-2 rc=139",
            "NW-VM-DONE failed=1",
        ]);
        assert!(!crashed.ok());
        assert!(
            crashed
                .problem
                .as_deref()
                .is_some_and(|p| p.contains("policy-2 rc=139"))
        );
        let cut_short = guest(&["test result: ok. 3 passed; 0 failed; 0 ignored; 0 measured; 0 filtered out"]);
        assert!(!cut_short.ok());
        let fine = guest(&[
            "test result: ok. 3 passed; 0 failed; 0 ignored; 0 measured; 0 filtered out",
            "NW-VM-TEST-END /w/target/debug/deps/policy-2 rc=0",
            "NW-VM-DONE failed=0",
        ]);
        assert!(fine.ok());
    }

    #[test]
    fn cargo_json_executables_are_read() {
        let line = r#"{"reason":"compiler-artifact","package_id":"path+file:///w/tests#nodeward-testbed@0.1.0","target":{"kind":["test"]},"executable":"/w/target/debug/deps/capture-84"}"#;
        assert!(is_testbed_test(line));
        assert_eq!(
            json_string(line, "executable").as_deref(),
            Some("/w/target/debug/deps/capture-84")
        );
        let agent_test = r#"{"reason":"compiler-artifact","package_id":"path+file:///w/agent#nodeward@0.1.0","target":{"kind":["test"]},"executable":"/w/target/debug/deps/cli-1"}"#;
        assert!(!is_testbed_test(agent_test));
        let unit_test = r#"{"reason":"compiler-artifact","package_id":"path+file:///w/tests#nodeward-testbed@0.1.0","target":{"kind":["lib"]},"executable":"/w/target/debug/deps/nodeward_testbed-1"}"#;
        assert!(!is_testbed_test(unit_test));
    }
}
