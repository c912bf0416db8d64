//! Running code inside a named network namespace, and shell helpers.

use std::fs::File;
use std::os::fd::AsFd;
use std::process::Command;

use nix::sched::{CloneFlags, setns};

/// Path of a named namespace.
pub fn path(name: &str) -> String {
    format!("/var/run/netns/{name}")
}

/// Runs `f` on a fresh thread inside namespace `name`. Sockets it creates
/// stay in that namespace and may be used from any thread afterwards.
pub fn run_in<T: Send + 'static>(name: &str, f: impl FnOnce() -> T + Send + 'static) -> T {
    let file = File::open(path(name)).unwrap_or_else(|e| panic!("open netns {name}: {e}"));
    std::thread::spawn(move || {
        setns(file.as_fd(), CloneFlags::CLONE_NEWNET).expect("setns into test namespace");
        f()
    })
    .join()
    .unwrap_or_else(|e| std::panic::resume_unwind(e))
}

/// Runs a command, panicking with its output when it fails.
pub fn sh(args: &[&str]) {
    let out = Command::new(args[0])
        .args(&args[1..])
        .output()
        .unwrap_or_else(|e| panic!("{args:?}: {e}"));
    assert!(
        out.status.success(),
        "{args:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Runs a command and returns its stdout, ignoring failure.
pub fn sh_out(args: &[&str]) -> String {
    Command::new(args[0])
        .args(&args[1..])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_default()
}

/// Runs a command inside namespace `name` with `nsenter` (which, unlike
/// `ip netns exec`, keeps the host's /sys, so cgroup2 and bpffs stay visible).
pub fn nsenter(name: &str, args: &[&str]) -> Command {
    let mut c = Command::new("nsenter");
    c.arg(format!("--net={}", path(name))).arg("--").args(args);
    c
}
