//! The `nodeward` binary.

#![forbid(unsafe_code)]

use clap::Parser;
use nodeward::config::{AuditArgs, CaCommand, CleanupArgs, Cli, Command, Config, LogFormat, Output, VerifyArgs};
use nodeward::identity::ca_cli;
use tracing_subscriber::EnvFilter;

fn main() -> std::process::ExitCode {
    // Both rustls providers are built (the bench compares them), so
    // rustls cannot pick a process default itself: whatever builds a TLS
    // configuration without naming one (the Kubernetes client) gets the
    // agent's own.
    nodeward::identity::install_crypto_provider();
    let cli = Cli::parse();
    let result = match cli.command {
        // Flags are checked before anything starts, logging included: a
        // bad start names every problem and does nothing else.
        Command::Run(args) => Config::from_args(*args)
            .map_err(anyhow::Error::from)
            .and_then(|config| with_logging(config.log_format, || run_agent(config))),
        Command::Ca(command) => with_logging(LogFormat::Text, || ca_command(command)),
        Command::Cleanup(args) => with_logging(LogFormat::Text, || cleanup(&args)),
        // Both print their report on stdout and signal problems by exit
        // status only, so they log nothing themselves.
        Command::Audit(args) => audit(&args).and_then(failed_if),
        Command::Verify(args) => verify(&args).and_then(failed_if),
    };
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) if e.is::<Failed>() => std::process::ExitCode::FAILURE,
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
    nodeward::memory::fix_thresholds();
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
        CaCommand::Init {
            out,
            root_out,
            path_len,
        } => {
            let root_out = root_out.unwrap_or_else(|| ca_cli::default_root_dir(&out));
            print!("{}", ca_cli::init_with_path_len(&out, &root_out, path_len)?);
            println!(
                "keep {} offline: it signs intermediates and root CRLs only; {} is what a signer mounts",
                root_out.display(),
                out.display()
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
        CaCommand::Serve(args) => {
            let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
            rt.block_on(async {
                use tokio::signal::unix::{SignalKind, signal};
                let stop = tokio_util::sync::CancellationToken::new();
                let mut term = signal(SignalKind::terminate())?;
                let mut int = signal(SignalKind::interrupt())?;
                let serving = tokio::spawn(nodeward::ca_service::server::serve(*args, stop.clone()));
                tokio::select! {
                    r = serving => return r?.map_err(anyhow::Error::from),
                    _ = term.recv() => {}
                    _ = int.recv() => {}
                }
                stop.cancel();
                anyhow::Ok(())
            })?;
        }
        CaCommand::Log(nodeward::config::LogCommand::Verify { file }) => {
            match nodeward::ca_service::ledger::verify_file(&file) {
                Ok(report) => println!("{report}"),
                Err(broken) => {
                    eprintln!("{broken}");
                    return Err(Failed.into());
                }
            }
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

/// A report printed with findings or failures: exit 1, nothing more to say.
#[derive(Debug, thiserror::Error)]
#[error("failed")]
struct Failed;

fn failed_if(failed: bool) -> anyhow::Result<()> {
    if failed { Err(Failed.into()) } else { Ok(()) }
}

fn audit(args: &AuditArgs) -> anyhow::Result<bool> {
    use nodeward::audit;
    let production = audit::Production::new(&args.production_namespaces, &args.production_labels)?;
    let mut findings = match &args.config_dir {
        Some(dir) => audit::audit_dir(dir, &args.root_namespace, &production)?,
        None => Vec::new(),
    };
    if !args.issuance_log.is_empty() {
        let reported = audit::Reported {
            certs: args.certs.clone(),
            metrics: args.agent_metrics.clone(),
        };
        findings.extend(audit::audit_issuance(&args.issuance_log, &reported)?);
    }
    emit(&match args.output {
        Output::Table => audit::table(&findings),
        Output::Json => audit::json(&findings) + "\n",
    })?;
    Ok(audit::fails(&findings, args.fail_on))
}

fn verify(args: &VerifyArgs) -> anyhow::Result<bool> {
    use nodeward::verify;
    let checks = verify::run(&verify::Options {
        node_name: args.node_name.clone(),
        config_dir: args.config_dir.clone(),
        root_namespace: args.root_namespace.clone(),
        trust_domain: args.trust_domain.clone(),
        namespace: args.namespace.clone(),
        pod: args.pod.clone(),
        ca_dir: args.ca_dir.clone(),
        metrics_addr: args.metrics_addr,
        timeout: args.timeout.0,
    })?;
    emit(&match args.output {
        Output::Table => verify::table(&checks),
        Output::Json => verify::json(&checks) + "\n",
    })?;
    Ok(verify::failed(&checks))
}

/// Writes a report to stdout; a reader that went away (`| head`) is not
/// an error, the exit status still tells.
fn emit(text: &str) -> anyhow::Result<()> {
    use std::io::Write;
    match std::io::stdout().lock().write_all(text.as_bytes()) {
        Err(e) if e.kind() != std::io::ErrorKind::BrokenPipe => Err(e.into()),
        _ => Ok(()),
    }
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
