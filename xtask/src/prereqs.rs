//! Idempotent installation of everything the build and tests need on a
//! fresh Debian 12 machine; each step checks first and is skipped when done.

use std::process::{Command, Stdio};

use anyhow::{Context, Result, bail};

/// Debian packages: LLVM 22 for bpf-linker, iproute2 for namespaces,
/// bpftool to observe attachments, tcpdump and iperf3 for later tests,
/// iptables for the NodePort-style DNAT/MASQUERADE of the exemption tests,
/// the reference CNI plugins (bridge, host-local, loopback) the CNI
/// hand-off tests chain `nodeward-cni` with, buildah for `cargo xtask image`
/// and the runtime tests' images, containerd (with its CRI plugin) and runc
/// for the runtime tests, a static busybox for their images, protoc for
/// the CRI client's generated code.
const APT_PACKAGES: &[&str] = &[
    "llvm-22-dev",
    "libpolly-22-dev",
    "libzstd-dev",
    "zlib1g-dev",
    "iproute2",
    "bpftool",
    "tcpdump",
    "iperf3",
    "iptables",
    "util-linux",
    "containernetworking-plugins",
    "buildah",
    "containerd",
    "runc",
    "busybox-static",
    "protobuf-compiler",
];

/// What `vm-test` adds: qemu (and its virtiofsd), a static busybox for the
/// guest's initramfs, kmod for the kernel packages' module dependencies,
/// xz to decompress modules, cpio to pack the initramfs.
const VM_PACKAGES: &[&str] = &["qemu-system-x86", "busybox-static", "kmod", "xz-utils", "cpio"];

/// Where `add_backports` declares bookworm-backports, if no source does.
const BACKPORTS_SOURCE: &str = "/etc/apt/sources.list.d/nodeward-bookworm-backports.sources";

/// Installs whatever is missing.
pub fn ensure() -> Result<()> {
    nightly_rust_src()?;
    apt()?;
    kubectl()?;
    bpf_linker()?;
    components()?;
    Ok(())
}

fn ok(cmd: &mut Command) -> bool {
    cmd.stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

fn output(cmd: &mut Command) -> String {
    cmd.output()
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_default()
}

fn must(cmd: &mut Command) -> Result<()> {
    let status = cmd.status().with_context(|| format!("starting {cmd:?}"))?;
    if !status.success() {
        bail!("{cmd:?} failed: {status}");
    }
    Ok(())
}

fn nightly_rust_src() -> Result<()> {
    if !output(Command::new("rustup").args(["toolchain", "list"]))
        .lines()
        .any(|l| l.starts_with("nightly"))
    {
        println!("installing the nightly toolchain (for the eBPF target)");
        must(Command::new("rustup").args(["toolchain", "install", "nightly", "--profile", "minimal"]))?;
    }
    let installed = output(Command::new("rustup").args(["component", "list", "--toolchain", "nightly", "--installed"]));
    if !installed.lines().any(|l| l.starts_with("rust-src")) {
        println!("adding rust-src to nightly (eBPF builds core from source)");
        must(Command::new("rustup").args(["component", "add", "rust-src", "--toolchain", "nightly"]))?;
    }
    Ok(())
}

/// What `cargo xtask fuzz` needs besides [`ensure`]: cargo-fuzz (nightly
/// is already there for the eBPF build).
pub fn ensure_fuzz() -> Result<()> {
    if ok(Command::new("cargo").args(["fuzz", "--version"])) {
        return Ok(());
    }
    println!("installing cargo-fuzz (a minute, once)");
    must(Command::new("cargo").args(["install", "cargo-fuzz", "--locked", "--version", "^0.13"]))
}

/// Installs what `vm-test` needs besides the build prerequisites.
pub fn ensure_vm() -> Result<()> {
    ensure()?;
    apt_install(VM_PACKAGES)
}

/// Declares bookworm-backports to apt (kernels only come from there when
/// bookworm-security does not carry the 6.12 line) and updates the lists.
/// apt's default priority for backports (100) keeps it from upgrading
/// anything installed.
pub fn add_backports() -> Result<()> {
    let declared = std::fs::read_dir("/etc/apt/sources.list.d")
        .into_iter()
        .flatten()
        .filter_map(|e| e.ok())
        .map(|e| e.path())
        .chain([std::path::PathBuf::from("/etc/apt/sources.list")])
        .any(|p| std::fs::read_to_string(p).is_ok_and(|s| s.contains("bookworm-backports")));
    if !declared {
        println!("declaring bookworm-backports in {BACKPORTS_SOURCE}");
        std::fs::write(
            BACKPORTS_SOURCE,
            "Types: deb\nURIs: http://deb.debian.org/debian\nSuites: bookworm-backports\nComponents: main\n\
             Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg\n",
        )
        .with_context(|| format!("writing {BACKPORTS_SOURCE}"))?;
    }
    must(Command::new("apt-get").args(["update", "-q"]))
}

fn apt() -> Result<()> {
    apt_install(APT_PACKAGES)
}

fn apt_install(packages: &[&str]) -> Result<()> {
    let missing: Vec<&str> = packages
        .iter()
        .copied()
        .filter(|p| {
            !output(Command::new("dpkg-query").args(["-W", "-f=${Status}", p])).contains("install ok installed")
        })
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    println!("installing Debian packages: {}", missing.join(" "));
    must(Command::new("apt-get").args(["update", "-q"]))?;
    must(
        Command::new("apt-get")
            .args(["install", "-y", "-q", "--no-install-recommends"])
            .args(&missing)
            .env("DEBIAN_FRONTEND", "noninteractive"),
    )
}

/// `kubectl` for rendering and dry-running `deploy/` (Debian's
/// `kubernetes-client`), unless one is already on the PATH.
fn kubectl() -> Result<()> {
    if ok(Command::new("kubectl").args(["version", "--client"])) {
        return Ok(());
    }
    println!("installing kubernetes-client (kubectl, for the deploy/ checks)");
    must(
        Command::new("apt-get")
            .args(["install", "-y", "-q", "--no-install-recommends", "kubernetes-client"])
            .env("DEBIAN_FRONTEND", "noninteractive"),
    )
}

fn bpf_linker() -> Result<()> {
    if ok(Command::new("bpf-linker").arg("--version")) {
        return Ok(());
    }
    println!("installing bpf-linker 0.13 against LLVM 22 (a few minutes, once)");
    must(
        Command::new("cargo")
            .args([
                "install",
                "bpf-linker",
                "--locked",
                "--version",
                "^0.13",
                "--no-default-features",
                "--features",
                "llvm-22",
            ])
            .env("LLVM_PREFIX", "/usr/lib/llvm-22"),
    )
}

fn components() -> Result<()> {
    for (check, component) in [("fmt", "rustfmt"), ("clippy", "clippy")] {
        if !ok(Command::new("cargo").args([check, "--version"])) {
            must(Command::new("rustup").args(["component", "add", component]))?;
        }
    }
    Ok(())
}
