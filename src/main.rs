//! Command line of smtp-oauth-relay: parses arguments, loads the configuration and calls into
//! the library. Exit codes: 0 ok, 1 runtime failure, 2 invalid configuration or usage.

use std::io::{IsTerminal, Write};
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use smtp_oauth_relay::config::{self, Config, LogFormat};
use smtp_oauth_relay::queue_command::{self, QueueCommand};
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
        /// Print the steps as a JSON array of {step, status, detail, fix} (with [[route]]
        /// tables: an object of such arrays by route name)
        #[arg(long)]
        json: bool,
        /// Check only this route ("default" for the top level); without it every route is
        /// checked
        #[arg(long, value_name = "NAME")]
        route: Option<String>,
        /// The mailbox to check a template route ("{sender}", "{auth_user}") with; default:
        /// the first address of its match_sender / match_auth_user
        #[arg(long, value_name = "ADDR")]
        mailbox: Option<String>,
    },
    /// Inspect and manage the spool (safe while `serve` runs)
    #[command(subcommand)]
    Queue(QueueArgs),
    /// Run only the Entra ID + Exchange Online simulator and print a relay.toml fragment that
    /// points at it (--config names a simulator config such as sim.toml)
    Simulate,
    /// Configure a Microsoft 365 tenant: ask (or take from flags) the setup guide's five values,
    /// write relay.toml and the secret file (0600), run check, print the Exchange Online
    /// PowerShell with the values filled in (--transport graph: the Graph variant; --route NAME:
    /// add a [[route]] to an existing relay.toml)
    Setup(Box<SetupArgs>),
    /// sendmail for cron, PHP mail() and system tools: `sendmail [flags] [recipient...]`
    /// (also when run as sendmail, mailq or newaliases; see README "Cron jobs and sendmail")
    #[command(disable_help_flag = true)]
    Sendmail {
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<std::ffi::OsString>,
    },
    /// Query the admin endpoint's /readyz (container HEALTHCHECK): exit 0 when ready, 1 when
    /// not, 2 when [admin] listen is not set
    Health,
    /// Read a password from stdin (or a prompt) and print its argon2id hash for a users file
    /// line `user:HASH` (smtp.auth)
    HashPassword,
}

/// `setup`'s flags: every question also a flag, for scripts (see README "Setup").
#[derive(clap::Args)]
struct SetupArgs {
    /// Directory (tenant) ID: a GUID or a verified domain (contoso.onmicrosoft.com)
    #[arg(long, value_name = "ID")]
    tenant_id: Option<String>,
    /// Application (client) ID of the app registration (a GUID)
    #[arg(long, value_name = "GUID")]
    client_id: Option<String>,
    /// A file holding the client secret Value (relay.toml then names this file)
    #[arg(long, value_name = "FILE", conflicts_with = "client_secret_stdin")]
    client_secret_file: Option<PathBuf>,
    /// Read the client secret Value from stdin (a pipe or a file)
    #[arg(long)]
    client_secret_stdin: bool,
    /// Mail Account: the mailbox the relay signs in as
    #[arg(long, value_name = "ADDR")]
    mail_account: Option<String>,
    /// From: the sender address (default: the mail account)
    #[arg(long, value_name = "ADDR")]
    from: Option<String>,
    /// upstream.cloud: global, gcc-high, dod or china
    #[arg(long, value_name = "CLOUD")]
    cloud: Option<String>,
    /// upstream.transport: smtp (SMTP AUTH XOAUTH2, the setup guide) or graph (Microsoft Graph
    /// sendMail, when SMTP AUTH is disabled); the printed script follows it
    #[arg(long, value_name = "smtp|graph")]
    transport: Option<String>,
    /// The Object ID on Enterprise applications (for the script when setup cannot read it from
    /// the app's token)
    #[arg(long, value_name = "GUID")]
    object_id: Option<String>,
    /// The relay.toml to write or edit (default: --config, $RELAY_CONFIG, ./relay.toml).
    /// /etc/smtp-oauth-relay/relay.toml puts the secret where the systemd unit loads it
    #[arg(long, value_name = "FILE")]
    config_out: Option<PathBuf>,
    /// Also write the Microsoft 365 script (Azure CLI + Exchange Online PowerShell) here
    #[arg(long, value_name = "FILE")]
    script_out: Option<PathBuf>,
    /// Have check send a real test message to this address
    #[arg(long, value_name = "ADDR")]
    send_to: Option<String>,
    /// Any other key of relay.toml, e.g. upstream.host=127.0.0.1 (repeatable; no secrets)
    #[arg(long, value_name = "SECTION.KEY=VALUE")]
    set: Vec<String>,
    /// Lay the secret out for the systemd unit (implied by /etc/smtp-oauth-relay/relay.toml)
    #[arg(long)]
    systemd: bool,
    /// Never ask: every value from flags or the existing file (exit 2 naming what is missing)
    #[arg(long)]
    non_interactive: bool,
    /// Write the files and print the script, but do not run check
    #[arg(long)]
    no_check: bool,
    /// Add a [[route]] named NAME ([a-z0-9-], not "default") to an EXISTING relay.toml instead
    /// of writing the top level: its mailbox, and in [route.oauth] only what differs from the
    /// top level (another tenant, client or secret; the secret in client_secret_NAME, 0600).
    /// --set then writes into [route.upstream]/[route.oauth]. Check and the script are the route's
    #[arg(long, value_name = "NAME")]
    route: Option<String>,
    /// With --route: the envelope senders it takes (addresses or *@domain; repeatable or a
    /// comma list)
    #[arg(
        long,
        value_name = "ADDR|*@DOMAIN",
        value_delimiter = ',',
        requires = "route"
    )]
    match_sender: Vec<String>,
    /// With --route: the inbound AUTH users it takes (repeatable or a comma list)
    #[arg(long, value_name = "USER", value_delimiter = ',', requires = "route")]
    match_auth_user: Vec<String>,
    /// With --route: replace the route of that name (its matches and keys) instead of refusing
    #[arg(long, requires = "route")]
    replace: bool,
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
    if let Some(code) = sendmail_entry() {
        return ExitCode::from(code);
    }
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
            // Unset endpoint keys are derived (cloud, transport, tenant): show what is used.
            print!(
                "{}",
                smtp_oauth_relay::oauth::cloud::effective_comment(config)
            );
            ExitCode::SUCCESS
        }),
        Command::Queue(args) => with_config(path, |config| queue(config, args)),
        Command::Check {
            send_to,
            json,
            route,
            mailbox,
        } => {
            let config_file = config::locate(path).ok().flatten();
            match config::load(path) {
                Ok(config) => {
                    let options = smtp_oauth_relay::check::CheckOptions {
                        send_to,
                        config_file,
                        timeouts: None,
                    };
                    if route.is_none() && !config.route_table().configured() {
                        check(&config, &options, json)
                    } else {
                        check_routes(
                            &config,
                            &options,
                            json,
                            route.as_deref(),
                            mailbox.as_deref(),
                        )
                    }
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
        Command::HashPassword => hash_password(),
        Command::Setup(args) => setup(*args, cli.config),
        // Taken by sendmail_entry before clap; here only with other global flags before it.
        Command::Sendmail { args } => ExitCode::from(smtp_oauth_relay::sendmail::run(
            smtp_oauth_relay::sendmail::Personality::Sendmail,
            &args,
            cli.config,
        )),
    }
}

/// `hash-password`: the first line of stdin is the password (a prompt on stderr when it is a
/// terminal); the PHC string goes to stdout.
fn hash_password() -> ExitCode {
    use std::io::{BufRead, IsTerminal, Write};
    let stdin = std::io::stdin();
    if stdin.is_terminal() {
        eprint!("Password: ");
        let _ = std::io::stderr().flush();
    }
    let mut line = String::new();
    if let Err(e) = stdin.lock().read_line(&mut line) {
        eprintln!("smtp-oauth-relay: cannot read the password: {e}");
        return ExitCode::from(1);
    }
    let password = line.trim_end_matches(['\r', '\n']);
    if password.is_empty() {
        eprintln!(
            "smtp-oauth-relay: empty password (give it on stdin: echo -n ... | hash-password)"
        );
        return ExitCode::from(EXIT_CONFIG);
    }
    match smtp_oauth_relay::inbound::hash_password(password) {
        Ok(hash) => {
            println!("{hash}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("smtp-oauth-relay: {e}");
            ExitCode::from(1)
        }
    }
}

/// `sendmail`, `mailq` and `newaliases` (by argv[0], as /usr/sbin/sendmail is a link to this
/// binary), and `smtp-oauth-relay [--config FILE] sendmail ...`: their flags are sendmail's,
/// which clap cannot parse (`-FCronDaemon`, `-oi`, `-B8BITMIME`), so they never reach it.
fn sendmail_entry() -> Option<u8> {
    use smtp_oauth_relay::sendmail::{self, Personality};
    let args: Vec<std::ffi::OsString> = std::env::args_os().collect();
    if let Some(p) = args.first().and_then(|a| Personality::from_argv0(a)) {
        return Some(sendmail::run(p, &args[1..], None));
    }
    let (config, rest) = match args.get(1).and_then(|a| a.to_str()) {
        Some("sendmail") => (None, &args[2..]),
        Some("--config" | "-c") if args.get(3).is_some_and(|a| a == "sendmail") => {
            (Some(PathBuf::from(&args[2])), &args[4..])
        }
        Some(a) if a.starts_with("--config=") && args.get(2).is_some_and(|a| a == "sendmail") => {
            (Some(PathBuf::from(&a["--config=".len()..])), &args[3..])
        }
        _ => return None,
    };
    Some(sendmail::run(Personality::Sendmail, rest, config))
}

fn setup(a: SetupArgs, config: Option<PathBuf>) -> ExitCode {
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    let options = smtp_oauth_relay::setup::SetupOptions {
        tenant_id: a.tenant_id,
        client_id: a.client_id,
        mail_account: a.mail_account,
        from: a.from,
        client_secret_file: a.client_secret_file,
        client_secret_stdin: a.client_secret_stdin,
        object_id: a.object_id,
        config_out: a.config_out.or(config),
        script_out: a.script_out,
        send_to: a.send_to,
        cloud: a.cloud,
        transport: a.transport,
        set: a.set,
        systemd: a.systemd,
        non_interactive: a.non_interactive,
        no_check: a.no_check,
        route: a
            .route
            .map(|name| smtp_oauth_relay::setup::route::RouteOptions {
                name,
                match_sender: a.match_sender,
                match_auth_user: a.match_auth_user,
                replace: a.replace,
            }),
    };
    ExitCode::from(smtp_oauth_relay::setup::run(options))
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

/// `check` for each route (or the one named): the walk with the route's configuration, one
/// report per route; exit 1 when any failed, 2 for a route that does not exist.
fn check_routes(
    config: &Config,
    options: &smtp_oauth_relay::check::CheckOptions,
    json: bool,
    only: Option<&str>,
    mailbox: Option<&str>,
) -> ExitCode {
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    let table = config.route_table();
    let routes: Vec<_> = table
        .iter()
        .filter(|r| only.is_none_or(|name| r.name == name))
        .cloned()
        .collect();
    if routes.is_empty() {
        eprintln!(
            "smtp-oauth-relay: check --route: no route {:?} (routes: {})",
            only.unwrap_or_default(),
            table.names().join(", ")
        );
        return ExitCode::from(EXIT_CONFIG);
    }
    let runtime = match runtime(false) {
        Ok(rt) => rt,
        Err(code) => return code,
    };
    let mut failed = false;
    let mut reports = serde_json::Map::new();
    for route in routes {
        let checked_as = match (&route.mailbox, mailbox) {
            (smtp_oauth_relay::routes::MailboxSpec::Fixed(m), _) => Some(m.clone()),
            (_, Some(m)) => Some(m.to_string()),
            (_, None) => route.example_mailbox(),
        };
        let Some(checked_as) = checked_as else {
            eprintln!(
                "route {}: a template route with no address to check it with: run check --route \
                 {} --mailbox ADDR",
                route.name, route.name
            );
            failed = true;
            continue;
        };
        let lane = route.lane_config(&checked_as);
        let report = runtime.block_on(smtp_oauth_relay::check::run(&lane, options));
        failed |= !report.passed();
        if json {
            let steps = serde_json::from_str(&report.to_json()).unwrap_or_default();
            reports.insert(route.name.clone(), steps);
        } else {
            println!("== route {} (mailbox {checked_as})", route.name);
            print!("{}", report.to_text());
            println!();
        }
    }
    if json {
        println!(
            "{}",
            serde_json::to_string_pretty(&reports).unwrap_or_default()
        );
    }
    let _ = std::io::stdout().flush();
    ExitCode::from(if failed { 1 } else { 0 })
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
    let store = match smtp_oauth_relay::store::open_for_operator(&config.queue) {
        Ok(store) => store,
        Err(e) => {
            eprintln!("smtp-oauth-relay: {e}");
            return ExitCode::from(EXIT_RUNTIME);
        }
    };
    let runtime = match runtime(false) {
        Ok(r) => r,
        Err(code) => return code,
    };
    let stdout = std::io::stdout();
    let mut out = stdout.lock();
    match runtime.block_on(queue_command::run(&*store, &cmd, &mut out)) {
        Ok(()) => ExitCode::SUCCESS,
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
