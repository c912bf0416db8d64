//! `nodeward-cni`: the chained CNI plugin the runtime execs for each pod
//! sandbox (logic in `nodeward::cni::plugin`), and `nodeward-cni install
//! --bin-dir D --conf-dir D --socket P`, which the DaemonSet's init
//! container runs to put it on the node (`nodeward::cni::install`).

#![forbid(unsafe_code)]

use std::io::Write;

use nodeward::cni::install::{InstallArgs, install};

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.first().is_some_and(|a| a == "install") {
        let result = InstallArgs::parse(&args[1..]).and_then(|a| {
            let exe = std::env::current_exe().map_err(|e| format!("own executable: {e}"))?;
            install(&exe, &a).map_err(|e| e.to_string())
        });
        match result {
            Ok(conf) => println!("nodeward-cni installed and chained into {}", conf.display()),
            Err(e) => {
                eprintln!("nodeward-cni install: {e}");
                std::process::exit(1);
            }
        }
        return;
    }
    let out = nodeward::cni::plugin::run(|k| std::env::var(k).ok(), std::io::stdin().lock());
    let _ = std::io::stdout().write_all(&out.stdout);
    let _ = std::io::stderr().write_all(out.stderr.as_bytes());
    std::process::exit(out.status);
}
