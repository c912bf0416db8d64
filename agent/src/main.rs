//! The `nodeward` binary.

use clap::Parser;
use nodeward::config::{CaCommand, Cli, Command};
use nodeward::identity::{ca, ca_cli};
use tracing_subscriber::EnvFilter;

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    let json = matches!(&cli.command, Command::Run(a) if a.log_format == "json");
    let logs = init_logging(json);
    let result = run(cli.command);
    // The last log lines go out before the final error, which explains them.
    drop(logs);
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn run(command: Command) -> anyhow::Result<()> {
    match command {
        Command::Run(args) => {
            raise_fd_limit();
            let mut rt = tokio::runtime::Builder::new_multi_thread();
            if let Some(n) = args.worker_threads {
                rt.worker_threads(usize::from(n));
            }
            let rt = rt.enable_all().build()?;
            rt.block_on(nodeward::agent::run(*args))?;
        }
        Command::Ca(CaCommand::Init { out }) => {
            print!("{}", ca_cli::init(&out)?);
            println!(
                "keep {} offline: the agent needs only ca-cert.pem, ca-key.pem, root-cert.pem and cert-chain.pem",
                out.join(ca::ROOT_KEY).display()
            );
        }
        Command::Ca(CaCommand::Intermediate { root, parent, out }) => {
            let (from, signer) = match (root, parent) {
                (Some(r), _) => (r, ca_cli::Signer::Root),
                (None, Some(p)) => (p, ca_cli::Signer::Intermediate),
                (None, None) => anyhow::bail!("--root or --parent is required"),
            };
            print!("{}", ca_cli::intermediate(&from, signer, &out)?);
        }
        Command::Ca(CaCommand::Revoke {
            ca: dir,
            as_root,
            serials,
        }) => {
            let signer = if as_root {
                ca_cli::Signer::Root
            } else {
                ca_cli::Signer::Intermediate
            };
            let (path, n) = ca_cli::revoke(&dir, signer, &serials)?;
            println!("wrote {} ({n} revoked serials)", path.display());
        }
        Command::Cleanup(args) => {
            if nodeward::capture::cleanup(&args.bpffs, &args.node_name)? {
                println!("removed Nodeward's eBPF programs and maps for node {}", args.node_name);
            } else {
                println!("nothing pinned for node {}", args.node_name);
            }
        }
    }
    Ok(())
}

/// A node proxy holds two sockets per connection: lift the soft descriptor
/// limit to the hard one, as the default 1024 would cap it near 500.
fn raise_fd_limit() {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    if let Ok((_, hard)) = getrlimit(Resource::RLIMIT_NOFILE) {
        let _ = setrlimit(Resource::RLIMIT_NOFILE, hard, hard);
    }
}

fn init_logging(json: bool) -> nodeward::logging::LogFlush {
    let filter = EnvFilter::try_from_env("NODEWARD_LOG").unwrap_or_else(|_| EnvFilter::new("info"));
    let (writer, flush) = nodeward::logging::batched_stderr();
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(writer);
    if json {
        builder.json().flatten_event(true).init();
    } else {
        // Peers' text in fields is escaped: no forged lines.
        builder.fmt_fields(nodeward::logging::EscapedFields).init();
    }
    flush
}
