//! The `nodeward` binary.

#![forbid(unsafe_code)]

use clap::Parser;
use nodeward::config::{CaCommand, CleanupArgs, Cli, Command, Config, LogFormat};
use nodeward::identity::{ca, ca_cli};
use tracing_subscriber::EnvFilter;

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        // Flags are checked before anything starts, logging included: a
        // bad start names every problem and does nothing else.
        Command::Run(args) => Config::from_args(*args)
            .map_err(anyhow::Error::from)
            .and_then(|config| with_logging(config.log_format, || run_agent(config))),
        Command::Ca(command) => with_logging(LogFormat::Text, || ca_command(command)),
        Command::Cleanup(args) => with_logging(LogFormat::Text, || cleanup(&args)),
    };
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

/// Runs `f` with logging set up, and flushes the last log lines before the
/// caller prints the final error, which they explain.
fn with_logging(format: LogFormat, f: impl FnOnce() -> anyhow::Result<()>) -> anyhow::Result<()> {
    let logs = init_logging(format);
    let result = f();
    drop(logs);
    result
}

fn run_agent(config: Config) -> anyhow::Result<()> {
    raise_fd_limit();
    let mut rt = tokio::runtime::Builder::new_multi_thread();
    if let Some(n) = config.worker_threads {
        rt.worker_threads(n);
    }
    let rt = rt.enable_all().build()?;
    rt.block_on(nodeward::agent::run(config))?;
    Ok(())
}

fn ca_command(command: CaCommand) -> anyhow::Result<()> {
    match command {
        CaCommand::Init { out } => {
            print!("{}", ca_cli::init(&out)?);
            println!(
                "keep {} offline: the agent needs only ca-cert.pem, ca-key.pem, root-cert.pem and cert-chain.pem",
                out.join(ca::ROOT_KEY).display()
            );
        }
        CaCommand::Intermediate { root, parent, out } => {
            let (from, signer) = match (root, parent) {
                (Some(r), _) => (r, ca_cli::Signer::Root),
                (None, Some(p)) => (p, ca_cli::Signer::Intermediate),
                (None, None) => anyhow::bail!("--root or --parent is required"),
            };
            print!("{}", ca_cli::intermediate(&from, signer, &out)?);
        }
        CaCommand::Revoke {
            ca: dir,
            as_root,
            serials,
        } => {
            let signer = if as_root {
                ca_cli::Signer::Root
            } else {
                ca_cli::Signer::Intermediate
            };
            let (path, n) = ca_cli::revoke(&dir, signer, &serials)?;
            println!("wrote {} ({n} revoked serials)", path.display());
        }
    }
    Ok(())
}

fn cleanup(args: &CleanupArgs) -> anyhow::Result<()> {
    if nodeward::capture::cleanup(&args.bpffs, &args.node_name)? {
        println!("removed Nodeward's eBPF programs and maps for node {}", args.node_name);
    } else {
        println!("nothing pinned for node {}", args.node_name);
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

fn init_logging(format: LogFormat) -> nodeward::logging::LogFlush {
    use tracing_subscriber::layer::SubscriberExt;
    use tracing_subscriber::util::SubscriberInitExt;
    let spec = std::env::var("NODEWARD_LOG")
        .ok()
        .filter(|s| EnvFilter::try_new(s).is_ok())
        .unwrap_or_else(|| "info".into());
    let (writer, flush) = nodeward::logging::batched_stderr();
    let registry = tracing_subscriber::registry().with(nodeward::logging::reloadable_filter(&spec));
    let layer = tracing_subscriber::fmt::layer().with_writer(writer);
    if format == LogFormat::Json {
        registry.with(layer.json().flatten_event(true)).init();
    } else {
        registry.with(layer.fmt_fields(nodeward::logging::EscapedFields)).init();
    }
    flush
}
