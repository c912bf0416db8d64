//! `cargo xtask`: the project's chores, each installing what it needs first.
//!
//! * `demo` — two nodes and four pods in network namespaces, one agent per
//!   node, traffic through them, a table of what was captured, fail-closed
//!   shown live, then teardown.
//! * `bench` — the mesh against no mesh (the testbed's `nodeward-bench`).
//! * `test` — formatting, clippy, every fuzz target for 20 s, unit and
//!   integration tests, the 6.1 VM subset.
//! * `fuzz` — the fuzz targets in `fuzz/` (see `fuzz.rs`).
//! * `load` — build and run the agent on this host against a config
//!   directory, attached to the host's cgroup root, for development.
//!
//! xtask depends on nothing in the workspace: on a fresh machine it must
//! build before `bpf-linker` exists, so the demo and the bench live in the
//! testbed crate and are run from here once the prerequisites are in place.
//! * `prereqs` — only the idempotent installs (nightly rust-src, LLVM 22
//!   development packages, bpf-linker, iproute2, bpftool, tcpdump, iperf3,
//!   buildah, ...).
//! * `vm-test` — the integration suite on other kernels, each booted under
//!   qemu (see `vm.rs`).
//! * `image` — the agent's container image with buildah from `scratch`
//!   (the binaries, the shared libraries they load, a CycloneDX SBOM), as a
//!   docker-archive in `target/image` (see `image.rs`).

mod fuzz;
mod image;
mod prereqs;
mod sbom;
mod vm;

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result, bail};
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "xtask", about = "Nodeward's build, demo and test chores")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Install the build and test prerequisites (idempotent).
    Prereqs,
    /// Build the agent (and the eBPF programs it embeds).
    Build,
    /// Run the demo topology on the embedded defaults, then tear it down.
    Demo,
    /// Benchmark the mesh against no mesh on the namespace topology.
    Bench {
        /// Smoke mode: one short round with the debug build, to prove the harness.
        #[arg(long)]
        quick: bool,
        /// A/B rounds (medians are taken over them).
        #[arg(long, default_value_t = 3)]
        rounds: usize,
        /// Only these scenario groups, comma-separated: throughput, latency, conn-rate, scale, crypto.
        #[arg(long)]
        only: Option<String>,
        /// An extra flag for the mesh column's agents, repeatable
        /// (`--agent-arg=--local-redirect`): an A/B of one setting is two
        /// runs that differ only here.
        #[arg(long = "agent-arg", allow_hyphen_values = true)]
        agent_args: Vec<String>,
    },
    /// Build and run the agent on this host, in the host's network namespace
    /// and attached to its cgroup root, against a config directory; Ctrl-C
    /// drains and stops it (capture stays pinned: `nodeward cleanup` removes it).
    Load {
        /// Kubernetes YAML the agent reads.
        #[arg(long, default_value = "deploy/sample-config")]
        config_dir: PathBuf,
        /// Node name the pods in the config are placed on [default: the host name].
        #[arg(long)]
        node_name: Option<String>,
        /// Further `nodeward run` flags (after `--`).
        #[arg(last = true)]
        args: Vec<String>,
    },
    /// Run the integration tests on other kernels, each in a qemu VM.
    VmTest {
        /// Kernel: 6.1 (Debian 12), 6.12 (Debian 12's newer line), host, or
        /// the path of a kernel .deb or unpacked package; repeatable.
        #[arg(long = "kernel", value_parser = vm::Kernel::parse)]
        kernels: Vec<vm::Kernel>,
        /// The full matrix: 6.1, 6.12 and host.
        #[arg(long, conflicts_with = "kernels")]
        all: bool,
        /// Only these integration test binaries (capture, policy, ...); repeatable.
        #[arg(long = "test")]
        tests: Vec<String>,
        /// Use TCG even when /dev/kvm opens.
        #[arg(long)]
        tcg: bool,
        /// Limit per kernel, in minutes (default 30 under KVM, 180 under TCG).
        #[arg(long)]
        timeout_min: Option<u64>,
        /// Arguments for each test binary (e.g. a test name filter), after `--`.
        #[arg(last = true)]
        args: Vec<String>,
    },
    /// Build the agent's container image with buildah, from scratch: a
    /// docker-archive (`nodeward:latest`) and its CycloneDX SBOM.
    Image {
        /// The debug build instead of the release build (what the test suite uses).
        #[arg(long)]
        dev: bool,
        /// Where the archive and the SBOM go [default: target/image].
        #[arg(long)]
        out: Option<PathBuf>,
    },
    /// Run the fuzz targets in `fuzz/` (cargo-fuzz, nightly), each for a
    /// fixed time; a crash fails and its input is kept in
    /// `target/fuzz/artifacts/<target>/`.
    Fuzz {
        /// Seconds per target.
        #[arg(long, default_value_t = 60)]
        seconds: u64,
        /// Targets to run (default: all).
        targets: Vec<String>,
    },
    /// The chaos soak: eight pods on two nodes under continuous mixed
    /// traffic while agents are killed, pods come and go, policies flip,
    /// an identity is revoked, the CA service restarts and a broken config
    /// file appears; stops at the first broken invariant, with its seed.
    Soak {
        /// How long to inject faults.
        #[arg(long, default_value_t = 10.0)]
        minutes: f64,
        /// Repeat a run: the seed it printed [default: the clock].
        #[arg(long)]
        seed: Option<u64>,
    },
    /// Run every check and test: fmt, clippy, every fuzz target briefly,
    /// unit and integration tests, then a subset of the integration tests
    /// on the oldest supported kernel in a VM.
    Test {
        /// Extra arguments for `cargo test` (e.g. a test name filter).
        #[arg(trailing_var_arg = true)]
        args: Vec<String>,
    },
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    match cli.cmd {
        Cmd::Prereqs => prereqs::ensure(),
        Cmd::Build => {
            prereqs::ensure()?;
            build().map(|bin| println!("built {}", bin.display()))
        }
        Cmd::Demo => {
            require_root("the demo creates network namespaces and loads eBPF")?;
            prereqs::ensure()?;
            let bin = build()?;
            run(testbed_bin("nodeward-demo", false).env("NODEWARD_BIN", bin))
        }
        Cmd::Bench {
            quick,
            rounds,
            only,
            agent_args,
        } => {
            require_root("the benchmark creates network namespaces and loads eBPF")?;
            prereqs::ensure()?;
            bench(quick, rounds, only.as_deref(), &agent_args)
        }
        Cmd::Load {
            config_dir,
            node_name,
            args,
        } => {
            require_root("the agent loads eBPF and attaches it to the host's cgroup root")?;
            prereqs::ensure()?;
            load(&config_dir, node_name, &args)
        }
        Cmd::VmTest {
            kernels,
            all,
            tests,
            tcg,
            timeout_min,
            args,
        } => {
            require_root("the guests' tests create network namespaces and load eBPF; KVM and virtiofsd need root")?;
            let kernels = if all {
                vec![vm::Kernel::Debian61, vm::Kernel::Debian612, vm::Kernel::Host]
            } else if kernels.is_empty() {
                vec![vm::OLDEST]
            } else {
                kernels
            };
            let timeout = timeout_min.map(|m| std::time::Duration::from_secs(m * 60));
            vm::run_plan(&vm::Plan {
                kernels,
                tests,
                args,
                tcg,
                timeout,
            })
            .map(|_| ())
        }
        Cmd::Image { dev, out } => {
            require_root("buildah mounts the image's root filesystem")?;
            prereqs::ensure()?;
            image::image(dev, out).map(|_| ())
        }
        Cmd::Soak { minutes, seed } => {
            require_root("the soak creates network namespaces and loads eBPF")?;
            prereqs::ensure()?;
            soak(minutes, seed)
        }
        Cmd::Fuzz { seconds, targets } => {
            prereqs::ensure_fuzz()?;
            fuzz::run(seconds, None, &targets)
        }
        Cmd::Test { args } => {
            prereqs::ensure()?;
            test(&args)
        }
    }
}

/// The workspace root.
fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("workspace root")
        .to_path_buf()
}

fn require_root(why: &str) -> Result<()> {
    if !nix_is_root() {
        bail!("run as root: {why}");
    }
    Ok(())
}

fn nix_is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("Uid:").map(|v| v.split_whitespace().nth(1) == Some("0")))
        })
        .unwrap_or(false)
}

/// Runs a command in the workspace root, failing with its name.
fn run(cmd: &mut Command) -> Result<()> {
    cmd.current_dir(root());
    let status = cmd.status().with_context(|| format!("starting {cmd:?}"))?;
    if !status.success() {
        bail!("{cmd:?} failed: {status}");
    }
    Ok(())
}

fn cargo() -> Command {
    Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
}

/// Builds the agent; returns the binary's path.
fn build() -> Result<PathBuf> {
    run(cargo().args(["build", "--locked", "--package", "nodeward"]))?;
    Ok(root().join("target/debug/nodeward"))
}

/// Builds the agent optimised, for benchmarks.
fn build_release() -> Result<PathBuf> {
    run(cargo().args(["build", "--locked", "--release", "--package", "nodeward"]))?;
    Ok(root().join("target/release/nodeward"))
}

/// `cargo run` of one of the testbed's binaries.
fn testbed_bin(name: &str, release: bool) -> Command {
    let mut cmd = cargo();
    cmd.args([
        "run",
        "--locked",
        "--quiet",
        "--package",
        "nodeward-testbed",
        "--bin",
        name,
    ]);
    if release {
        cmd.arg("--release");
    }
    cmd
}

/// The benchmark: release agent and harness, or the debug build for the
/// quick smoke run (which measures nothing, only proves the harness).
fn bench(quick: bool, rounds: usize, only: Option<&str>, agent_args: &[String]) -> Result<()> {
    let bin = if quick { build()? } else { build_release()? };
    let mut cmd = testbed_bin("nodeward-bench", !quick);
    cmd.arg("--").arg(format!("--rounds={rounds}"));
    if quick {
        cmd.arg("--quick");
    }
    if let Some(only) = only {
        cmd.arg(format!("--only={only}"));
    }
    for a in agent_args {
        cmd.arg(format!("--agent-arg={a}"));
    }
    run(cmd.env("NODEWARD_BIN", bin))
}

/// The chaos soak on the debug build (the suite's build; the invariants,
/// not speed, are what it checks).
fn soak(minutes: f64, seed: Option<u64>) -> Result<()> {
    let bin = build()?;
    let mut cmd = testbed_bin("nodeward-soak", false);
    cmd.arg("--").arg(format!("--minutes={minutes}"));
    if let Some(seed) = seed {
        cmd.arg(format!("--seed={seed}"));
    }
    run(cmd.env("NODEWARD_BIN", bin))
}

/// `cargo xtask load`: the agent in the foreground on this host. Ctrl-C
/// reaches the agent too (same process group), which drains on SIGINT as
/// on SIGTERM; xtask waits for it to finish rather than dying first.
fn load(config_dir: &Path, node_name: Option<String>, extra: &[String]) -> Result<()> {
    let bin = build()?;
    let config_dir = root().join(config_dir);
    let node = match node_name {
        Some(n) => n,
        None => std::fs::read_to_string("/proc/sys/kernel/hostname")
            .context("reading the host name (or pass --node-name)")?
            .trim()
            .to_string(),
    };
    println!(
        "running {} for node {node} against {} (Ctrl-C drains and stops it)",
        bin.display(),
        config_dir.display()
    );
    let mut child = Command::new(&bin)
        .args(["run", "--node-name", &node, "--config-dir"])
        .arg(&config_dir)
        .args(extra)
        .spawn()
        .with_context(|| format!("starting {}", bin.display()))?;
    ignore_interrupts();
    let status = child.wait()?;
    if !status.success() {
        bail!("nodeward run exited with {status}");
    }
    Ok(())
}

/// Lets Ctrl-C stop only the agent (spawned before, so it keeps the
/// default disposition): this process waits for its drain.
fn ignore_interrupts() {
    // SAFETY: SIG_IGN installs no handler code; nothing else in xtask
    // relies on SIGINT.
    unsafe {
        libc::signal(libc::SIGINT, libc::SIG_IGN);
    }
}

/// How long `cargo xtask test` runs each fuzz target: long enough to pass
/// the seeds' neighbourhoods, short enough for the suite's budget.
const FUZZ_SECONDS_IN_TEST: u64 = 15;
/// The suite's soak: three minutes, with a fixed seed (the same faults in
/// the same order each run; `cargo xtask soak` draws a fresh one).
const SOAK_MINUTES_IN_TEST: f64 = 3.0;
const SOAK_SEED_IN_TEST: u64 = 20261207;
/// The libFuzzer seed of those runs.
const FUZZ_SEED_IN_TEST: u64 = 27_182;

fn test(extra: &[String]) -> Result<()> {
    // Each stage says when it starts, so the suite's time can be read
    // stage by stage from the log.
    let began = std::time::Instant::now();
    let at = || format!("[{:>4} s]", began.elapsed().as_secs());
    println!("{} == cargo fmt --check", at());
    run(cargo().args(["fmt", "--all", "--", "--check"]))?;
    println!("{} == cargo clippy", at());
    run(cargo().args(["clippy", "--locked", "--all-targets", "--", "-D", "warnings"]))?;
    println!("{} == build", at());
    let bin = build()?;
    if !nix_is_root() {
        println!("note: not root — integration tests that need network namespaces and eBPF will be skipped");
    }
    if extra.is_empty() {
        println!(
            "{} == every fuzz target for {FUZZ_SECONDS_IN_TEST} s (cargo xtask fuzz --seconds {FUZZ_SECONDS_IN_TEST})",
            at()
        );
        prereqs::ensure_fuzz()?;
        // A fixed seed: the suite's verdict must not depend on a dice roll
        // (exploration with a fresh seed is `cargo xtask fuzz`'s job).
        fuzz::run(FUZZ_SECONDS_IN_TEST, Some(FUZZ_SEED_IN_TEST), &[])?;
        if std::env::var_os("CI").is_some() {
            // Its build is several GB the rest of the run does not need.
            let _ = std::fs::remove_dir_all(root().join("fuzz/target"));
        }
    }
    if nix_is_root() && extra.is_empty() {
        println!("{} == benchmark harness smoke run (cargo xtask bench --quick)", at());
        bench(true, 1, None, &[])?;
    }
    if nix_is_root() && extra.is_empty() {
        println!(
            "{} == chaos soak, {SOAK_MINUTES_IN_TEST} min (cargo xtask soak --minutes {SOAK_MINUTES_IN_TEST})",
            at()
        );
        soak(SOAK_MINUTES_IN_TEST, Some(SOAK_SEED_IN_TEST))?;
    }
    let mut image_archive = None;
    if nix_is_root() {
        // The image test runs the agent from this image (named to it, so
        // it builds nothing itself while the tests run).
        println!("{} == the agent image, debug profile (cargo xtask image --dev)", at());
        image_archive = Some(image::image(true, None)?);
    }
    println!("{} == cargo test", at());
    let mut cmd = cargo();
    if let Some(archive) = &image_archive {
        cmd.env("NODEWARD_IMAGE", archive);
    }
    cmd.args(["test", "--locked", "--no-fail-fast"])
        .args(extra)
        .env("NODEWARD_BIN", &bin)
        .env("RUST_TEST_THREADS", "2");
    let (mut passed, mut failed) = run_tests(&mut cmd)?;
    if nix_is_root() && extra.is_empty() {
        println!(
            "{} == the oldest supported kernel, in a VM (cargo xtask vm-test --kernel 6.1 for all tests)",
            at()
        );
        let (p, f) = vm::run_plan(&vm::Plan {
            kernels: vec![vm::OLDEST],
            tests: Vec::new(),
            args: vm::CI_SUBSET.iter().map(|s| s.to_string()).collect(),
            tcg: false,
            timeout: None,
        })?;
        passed += p;
        failed += f;
        // One total for the whole run, host and VM, as its last line.
        println!("tests: {passed} passed, {failed} failed");
        println!("{} == done", at());
    }
    Ok(())
}

/// Runs `cargo test`, passing its output through, and ends with one line
/// totalling every test binary's result: cargo's own last line belongs to
/// whichever binary ran last (often a doc-test run of no tests).
fn run_tests(cmd: &mut Command) -> Result<(u64, u64)> {
    use std::io::{BufRead, BufReader};
    cmd.current_dir(root()).stdout(std::process::Stdio::piped());
    let mut child = cmd.spawn().with_context(|| format!("starting {cmd:?}"))?;
    let (mut passed, mut failed) = (0u64, 0u64);
    if let Some(out) = child.stdout.take() {
        for line in BufReader::new(out).lines() {
            let line = line.context("reading cargo test output")?;
            println!("{line}");
            if let Some((p, f)) = test_result_counts(&line) {
                passed += p;
                failed += f;
            }
        }
    }
    let status = child.wait()?;
    println!("tests: {passed} passed, {failed} failed");
    if !status.success() {
        bail!("{cmd:?} failed: {status}");
    }
    Ok((passed, failed))
}

/// (passed, failed) from a libtest summary line
/// (`test result: ok. 12 passed; 0 failed; ...`).
fn test_result_counts(line: &str) -> Option<(u64, u64)> {
    // "ok" or "FAILED", then "N passed; N failed; ..."
    let (_, counts) = line.strip_prefix("test result: ")?.split_once(". ")?;
    let count = |word: &str| {
        counts
            .split(';')
            .find_map(|part| part.trim().strip_suffix(word)?.parse::<u64>().ok())
    };
    Some((count(" passed")?, count(" failed")?))
}

#[cfg(test)]
mod tests {
    use super::test_result_counts;

    #[test]
    fn libtest_summaries_are_counted() {
        assert_eq!(
            test_result_counts(
                "test result: ok. 12 passed; 0 failed; 0 ignored; 0 measured; 0 filtered out; finished in 0.07s"
            ),
            Some((12, 0))
        );
        assert_eq!(
            test_result_counts("test result: FAILED. 3 passed; 2 failed; 0 ignored; 0 measured; 5 filtered out"),
            Some((3, 2))
        );
        assert_eq!(test_result_counts("running 3 tests"), None);
    }
}
