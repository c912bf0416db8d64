//! `nodeward-cni`: the chained CNI plugin the runtime execs for each pod
//! sandbox. Logic in `nodeward::cni::plugin`; this only does the I/O.

#![forbid(unsafe_code)]

use std::io::Write;

fn main() {
    let out = nodeward::cni::plugin::run(|k| std::env::var(k).ok(), std::io::stdin().lock());
    let _ = std::io::stdout().write_all(&out.stdout);
    let _ = std::io::stderr().write_all(out.stderr.as_bytes());
    std::process::exit(out.status);
}
