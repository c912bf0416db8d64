//! A real `nodeward run` process in a node's namespace, with its JSON log
//! collected so tests can wait for and assert on what it reports.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, ExitStatus, Stdio};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::netns::nsenter;
use crate::topology::Node;

#[derive(Default)]
struct Log {
    lines: Vec<String>,
    closed: bool,
}

/// A running agent.
pub struct Agent {
    child: Child,
    log: Arc<(Mutex<Log>, Condvar)>,
    /// The node's name, for messages.
    pub node: String,
}

impl Agent {
    /// Starts `nodeward run` for `node` reading `config_dir`, with JSON logs.
    pub fn start(node: &Node, config_dir: &Path, extra: &[&str]) -> Agent {
        Agent::start_env(node, config_dir, extra, &[])
    }

    /// [`Agent::start`] with environment variables set for the agent (over
    /// those it inherits, e.g. the VM runner's `NODEWARD_EBPF_LOG`).
    pub fn start_env(node: &Node, config_dir: &Path, extra: &[&str], env: &[(&str, &str)]) -> Agent {
        let dir = config_dir.to_str().expect("utf-8 path");
        let args: Vec<&str> = ["--config-dir", dir].iter().chain(extra).copied().collect();
        Agent::start_with_env(node, &args, env)
    }

    /// Starts `nodeward run` for `node` with JSON logs and `args` (which
    /// choose the config source).
    pub fn start_with(node: &Node, args: &[&str]) -> Agent {
        Agent::start_with_env(node, args, &[])
    }

    fn start_with_env(node: &Node, args: &[&str], env: &[(&str, &str)]) -> Agent {
        Agent::start_bin(&crate::nodeward_bin(), node, args, env)
    }

    /// [`Agent::start_with`] running the binary `bin` (another release's,
    /// for an upgrade or a downgrade).
    pub fn start_bin(bin: &Path, node: &Node, args: &[&str], env: &[(&str, &str)]) -> Agent {
        let mut cmd = nsenter(&node.netns, &[bin.to_str().expect("utf-8 path")]);
        cmd.args(["run", "--node-name", &node.name])
            .args(["--log-format", "json"])
            .args(args)
            .env(
                "NODEWARD_LOG",
                std::env::var("NODEWARD_TEST_AGENT_LOG").unwrap_or_else(|_| "info".into()),
            )
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        Agent::spawn(cmd, &node.name)
    }

    /// Starts `nodeward ca serve` in `node`'s namespace (text logs: match
    /// them through `l["raw"]`).
    pub fn ca_serve(node: &Node, args: &[&str]) -> Agent {
        let bin = crate::nodeward_bin();
        let mut cmd = nsenter(&node.netns, &[bin.to_str().expect("utf-8 path")]);
        cmd.args(["ca", "serve"])
            .args(args)
            .env("NODEWARD_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        Agent::spawn(cmd, &format!("{}-ca", node.name))
    }

    /// Runs `cmd` (its stderr piped) as an agent named `name`: its log is
    /// collected as any agent's; for an agent started some other way (from
    /// its image, by a container runtime).
    pub fn spawn(mut cmd: std::process::Command, name: &str) -> Agent {
        let mut child = cmd.spawn().expect("start nodeward");
        let stderr = child.stderr.take().expect("stderr");
        let log: Arc<(Mutex<Log>, Condvar)> = Arc::default();
        let sink = log.clone();
        let echo = std::env::var("NODEWARD_TEST_ECHO").is_ok();
        let node_name = name.to_string();
        let name = node_name.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                if echo {
                    eprintln!("[{name}] {line}");
                }
                let (m, cv) = &*sink;
                m.lock().unwrap().lines.push(line);
                cv.notify_all();
            }
            let (m, cv) = &*sink;
            m.lock().unwrap().closed = true;
            cv.notify_all();
        });
        Agent {
            child,
            log,
            node: node_name,
        }
    }

    /// Every log line parsed as JSON (non-JSON lines as `{"raw": line}`).
    pub fn lines(&self) -> Vec<Value> {
        let (m, _) = &*self.log;
        m.lock().unwrap().lines.iter().map(|l| parse(l)).collect()
    }

    /// Waits up to `timeout` for a log line matching `pred`.
    pub fn wait_log(&self, timeout: Duration, pred: impl Fn(&Value) -> bool) -> Option<Value> {
        let deadline = Instant::now() + crate::patience(timeout);
        let (m, cv) = &*self.log;
        let mut g = m.lock().unwrap();
        let mut seen = 0;
        loop {
            for l in &g.lines[seen..] {
                let v = parse(l);
                if pred(&v) {
                    return Some(v);
                }
            }
            seen = g.lines.len();
            let now = Instant::now();
            if now >= deadline || g.closed {
                return None;
            }
            g = cv.wait_timeout(g, deadline - now).unwrap().0;
        }
    }

    /// The connection log lines (`message == "connection closed"`).
    pub fn connections(&self) -> Vec<Value> {
        self.lines()
            .into_iter()
            .filter(|l| l["message"] == "connection closed")
            .collect()
    }

    /// Waits for a closed-connection log line of `direction` to `dst`.
    pub fn wait_connection(&self, direction: &str, dst: &str, timeout: Duration) -> Option<Value> {
        self.wait_log(timeout, |l| {
            l["message"] == "connection closed" && l["direction"] == direction && l["dst"] == dst
        })
    }

    /// The whole log, for failure messages.
    pub fn dump(&self) -> String {
        let (m, _) = &*self.log;
        m.lock().unwrap().lines.join("\n")
    }

    /// The agent's process id (nsenter execs it, so this is the agent).
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Resident memory, KiB.
    pub fn rss_kib(&self) -> u64 {
        self.status_kib("VmRSS:")
    }

    /// Resident anonymous memory (heaps, stacks: not the binary's pages), KiB.
    pub fn anon_rss_kib(&self) -> u64 {
        self.status_kib("RssAnon:")
    }

    fn status_kib(&self, field: &str) -> u64 {
        std::fs::read_to_string(format!("/proc/{}/status", self.pid()))
            .ok()
            .and_then(|s| {
                s.lines()
                    .find_map(|l| l.strip_prefix(field))
                    .and_then(|v| v.split_whitespace().next()?.parse().ok())
            })
            .unwrap_or(0)
    }

    /// CPU time used so far (user + system), seconds.
    pub fn cpu_seconds(&self) -> f64 {
        let stat = std::fs::read_to_string(format!("/proc/{}/stat", self.pid())).unwrap_or_default();
        // Fields after the command name (which may hold spaces) start after ") ".
        let rest = stat.rsplit_once(") ").map(|(_, r)| r).unwrap_or("");
        let f: Vec<&str> = rest.split_whitespace().collect();
        let ticks = |i: usize| f.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
        // utime and stime are fields 14 and 15 of stat, 12 and 13 after the name.
        let hz = nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK)
            .ok()
            .flatten()
            .unwrap_or(100) as f64;
        (ticks(11) + ticks(12)) / hz
    }

    /// SIGKILL and reap.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Sends SIGTERM.
    pub fn terminate(&self) {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(self.child.id() as i32),
            nix::sys::signal::Signal::SIGTERM,
        );
    }

    /// Waits up to `timeout` for the process to exit.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Ok(Some(s)) = self.child.try_wait() {
                return Some(s);
            }
            if Instant::now() >= deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        self.kill();
    }
}

fn parse(l: &str) -> Value {
    serde_json::from_str(l).unwrap_or_else(|_| serde_json::json!({ "raw": l }))
}
