//! Command line of smtp-oauth-relay: parses arguments, loads the configuration and calls into
//! the library. Exit codes: 0 ok, 1 runtime failure, 2 invalid configuration or usage.

use std::io::{IsTerminal, Write};
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use smtp_oauth_relay::config::{self, Config, LogFormat};
use smtp_oauth_relay::spool::admin::{QueueCommand, run_queue_command};
use tokio_util::sync::CancellationToken;

const EXIT_RUNTIME: u8 = 1;
const EXIT_CONFIG: u8 = 2;

#[derive(Parser)]
#[command(
    name = "smtp-oauth-relay",
    version,
    about = "Local SMTP relay to Microsoft 365 with OAuth2 (XOAUTH2)"
)]
struct Cli {
    /// Configuration file (default: $RELAY_CONFIG, ./relay.toml, /etc/smtp-oauth-relay/relay.toml)
    #[arg(long, short, global = true, value_name = "FILE")]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the relay
    Serve {
        /// Deliver to a built-in simulator of Entra ID and Exchange Online (try it out before a
        /// tenant is configured)
        #[arg(long)]
        simulate: bool,
    },
    /// Print the effective configuration (secrets redacted); exit 2 if it is invalid
    Config,
    /// Walk config, token, TLS and AUTH (and send a test message with --send-to), explaining any
    /// failure with its fix; exit 0 when every step passed, 1 when one failed
    Check {
        /// Also send a real test message to this address
        #[arg(long, value_name = "ADDR")]
        send_to: Option<String>,
        /// Print the steps as a JSON array of {step, status, detail, fix}
        #[arg(long)]
        json: bool,
    },
    /// Inspect and manage the spool (safe while `serve` runs)
    #[command(subcommand)]
    Queue(QueueArgs),
    /// Run only the Entra ID + Exchange Online simulator and print a relay.toml fragment that
    /// points at it (--config names a simulator config such as sim.toml)
    Simulate,
    /// Query the admin endpoint's /readyz (container HEALTHCHECK): exit 0 when ready, 1 when
    /// not, 2 when [admin] listen is not set
    Health,
}

#[derive(Subcommand)]
enum QueueArgs {
    /// One line per message: id, age, sender, recipients, size, state
    List,
    /// Envelope, delivery state and headers of one message
    Show { id: String },
    /// Keep a message in the spool without delivering it
    Hold { id: String },
    /// Return a held message to the queue
    Release { id: String },
    /// Remove a message from the spool for good
    Delete { id: String },
    /// Deliver now: one message (also held or failed ones), or --all queued and held messages
    Retry {
        #[arg(required_unless_present = "all", conflicts_with = "all")]
        id: Option<String>,
        #[arg(long)]
        all: bool,
    },
}

fn main() -> ExitCode {
    smtp_oauth_relay::failpoint::init();
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            let _ = e.print();
            return ExitCode::from(if e.use_stderr() { EXIT_CONFIG } else { 0 });
        }
    };
    let path = cli.config.as_deref();
    match cli.command {
        Command::Simulate => simulate(path),
        Command::Config => with_config(path, |config| {
            print!("{}", config.to_redacted_toml());
            ExitCode::SUCCESS
        }),
        Command::Queue(args) => with_config(path, |config| queue(config, args)),
        Command::Check { send_to, json } => {
            let config_file = config::locate(path).ok().flatten();
            match config::load(path) {
                Ok(config) => {
                    let options = smtp_oauth_relay::check::CheckOptions {
                        send_to,
                        config_file,
                        timeouts: None,
                    };
                    check(&config, &options, json)
                }
                // Step 1 of the walk, in the report's form; exit 2 as for every command.
                Err(e) => {
                    eprintln!("smtp-oauth-relay: {e}");
                    let report = smtp_oauth_relay::check::Report::invalid_config(&e, config_file);
                    print_report(&report, json);
                    ExitCode::from(EXIT_CONFIG)
                }
            }
        }
        Command::Serve { simulate } => with_config(path, |config| {
            let options = smtp_oauth_relay::daemon::ServeOptions {
                simulate,
                reload: Some(cli.config.clone()),
            };
            serve(config, options)
        }),
        Command::Health => with_config(path, health),
    }
}

/// A tokio runtime (multi-threaded for the daemons, single for one-shot commands).
fn runtime(multi_thread: bool) -> Result<tokio::runtime::Runtime, ExitCode> {
    let mut builder = if multi_thread {
        tokio::runtime::Builder::new_multi_thread()
    } else {
        tokio::runtime::Builder::new_current_thread()
    };
    builder.enable_all().build().map_err(|e| {
        eprintln!("smtp-oauth-relay: cannot start the runtime: {e}");
        ExitCode::from(EXIT_RUNTIME)
    })
}

/// Loads the relay configuration, or reports every problem and exits 2.
fn with_config(path: Option<&std::path::Path>, run: impl FnOnce(&Config) -> ExitCode) -> ExitCode {
    match config::load(path) {
        Ok(config) => run(&config),
        Err(e) => {
            eprintln!("smtp-oauth-relay: {e}");
            ExitCode::from(EXIT_CONFIG)
        }
    }
}

fn simulate(config: Option<&std::path::Path>) -> ExitCode {
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    let runtime = match runtime(true) {
        Ok(rt) => rt,
        Err(code) => return code,
    };
    match runtime.block_on(smtp_oauth_relay::sim::run_standalone(config)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e @ smtp_oauth_relay::sim::SimError::Config(_)) => {
            eprintln!("smtp-oauth-relay simulate: {e}");
            ExitCode::from(EXIT_CONFIG)
        }
        Err(e) => {
            eprintln!("smtp-oauth-relay simulate: {e}");
            ExitCode::from(EXIT_RUNTIME)
        }
    }
}

fn check(config: &Config, options: &smtp_oauth_relay::check::CheckOptions, json: bool) -> ExitCode {
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    let runtime = match runtime(false) {
        Ok(rt) => rt,
        Err(code) => return code,
    };
    let report = runtime.block_on(smtp_oauth_relay::check::run(config, options));
    print_report(&report, json);
    ExitCode::from(report.exit_code())
}

fn print_report(report: &smtp_oauth_relay::check::Report, json: bool) {
    if json {
        print!("{}", report.to_json());
    } else {
        print!("{}", report.to_text());
    }
    let _ = std::io::stdout().flush();
}

fn queue(config: &Config, args: QueueArgs) -> ExitCode {
    let cmd = match args {
        QueueArgs::List => QueueCommand::List,
        QueueArgs::Show { id } => QueueCommand::Show(id),
        QueueArgs::Hold { id } => QueueCommand::Hold(id),
        QueueArgs::Release { id } => QueueCommand::Release(id),
        QueueArgs::Delete { id } => QueueCommand::Delete(id),
        QueueArgs::Retry { id, .. } => QueueCommand::Retry(id),
    };
    let stdout = std::io::stdout();
    let mut out = stdout.lock();
    match run_queue_command(&config.queue.dir, &cmd, &mut out) {
        Ok(()) => {
            let _ = out.flush();
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("smtp-oauth-relay: {e}");
            ExitCode::from(EXIT_RUNTIME)
        }
    }
}

fn health(config: &Config) -> ExitCode {
    let Some(listen) = config.admin.listen else {
        eprintln!("smtp-oauth-relay health: [admin] listen is not set (RELAY_ADMIN__LISTEN)");
        return ExitCode::from(EXIT_CONFIG);
    };
    let runtime = match runtime(false) {
        Ok(rt) => rt,
        Err(code) => return code,
    };
    use smtp_oauth_relay::admin::{HEALTH_TIMEOUT, query_readyz};
    match runtime.block_on(query_readyz(listen, HEALTH_TIMEOUT)) {
        Ok((200, body)) => {
            println!("{body}");
            ExitCode::SUCCESS
        }
        Ok((code, body)) => {
            println!("{code} {body}");
            ExitCode::from(EXIT_RUNTIME)
        }
        Err(e) => {
            println!("unreachable: {e}");
            ExitCode::from(EXIT_RUNTIME)
        }
    }
}

fn serve(config: &Config, options: smtp_oauth_relay::daemon::ServeOptions) -> ExitCode {
    init_logging(config);
    for name in config::foreign_env_vars() {
        tracing::debug!(variable = %name, "ignored: not a RELAY_<SECTION>__<KEY> variable");
    }
    // One process-wide rustls provider, chosen explicitly (aws-lc-rs, no OpenSSL).
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    let runtime = match runtime(true) {
        Ok(rt) => rt,
        Err(code) => return code,
    };
    let result = runtime.block_on(async {
        let shutdown = CancellationToken::new();
        tokio::spawn(stop_on_signal(shutdown.clone()));
        smtp_oauth_relay::daemon::serve(config, options, shutdown).await
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!(error = %e, "relay stopped");
            eprintln!("smtp-oauth-relay: {e}");
            ExitCode::from(if e.is_config_error() {
                EXIT_CONFIG
            } else {
                EXIT_RUNTIME
            })
        }
    }
}

/// SIGTERM (systemd, container runtimes) and SIGINT (Ctrl-C) start a graceful stop.
async fn stop_on_signal(shutdown: CancellationToken) {
    use tokio::signal::unix::{SignalKind, signal};
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        tracing::error!("cannot install signal handlers");
        return;
    };
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM: stopping"),
        _ = int.recv() => tracing::info!("SIGINT: stopping"),
    }
    shutdown.cancel();
}

fn init_logging(config: &Config) {
    use tracing_subscriber::{EnvFilter, layer::SubscriberExt, reload, util::SubscriberInitExt};
    let filter = EnvFilter::try_new(&config.log.level).unwrap_or_else(|_| EnvFilter::new("info"));
    // log.level can change on SIGHUP (service::reload_log_level).
    let (filter, handle) = reload::Layer::new(filter);
    smtp_oauth_relay::service::set_log_reloader(move |level| {
        let filter = EnvFilter::try_new(level).map_err(|e| e.to_string())?;
        handle.reload(filter).map_err(|e| e.to_string())
    });
    let layer = tracing_subscriber::fmt::layer()
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr);
    let registry = tracing_subscriber::registry().with(filter);
    match config.log.format {
        LogFormat::Json => registry.with(layer.json()).init(),
        LogFormat::Text => registry.with(layer).init(),
    }
}
