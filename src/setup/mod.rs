//! `smtp-oauth-relay setup`: the setup guide's twenty manual steps as one command.
//!
//! 1. Gathers the five values (tenant, client id, client secret Value, mail account, from) from
//!    flags or, on a terminal, from questions, each checked by its rule in `config::identity`
//!    as it comes in ([`values`], [`prompt`]).
//! 2. Writes `relay.toml` (new from the annotated example, or edited in place keeping the
//!    user's comments) and the secret file (mode 0600, atomic); never the secret into
//!    `relay.toml`. For the systemd configuration the secret goes where the unit's
//!    `LoadCredential=` reads it ([`write`]).
//! 3. Runs `check` on what it wrote (and sends a test message with `--send-to`).
//! 4. Prints the Microsoft side (Azure CLI for part 1, Exchange Online PowerShell for part 2,
//!    RBAC for Applications variant) with the values filled in, the Enterprise applications
//!    Object ID read from the app's own token ([`script`]).
//!
//! `--route NAME` adds a `[[route]]` to an existing file instead ([`route`]).
//!
//! `--transport graph` writes `upstream.transport = "graph"` and prints the Graph variant of
//! the Microsoft side ([`script::ApiPermission`]: the permission part 1 grants and the RBAC
//! role part 2 assigns).

pub mod prompt;
pub mod route;
pub mod script;
pub mod values;
pub mod write;

use std::io::{IsTerminal, Read, Write as _};
use std::path::{Path, PathBuf};

use toml_edit::Value;

use crate::check::{self, CheckOptions, Report, Status};
use crate::config::identity::ValueProblem;
use crate::config::{self, Config, ConfigError, TransportKind};
use prompt::Terminal;
use values::{Existing, Given, SecretSource};
use write::{ConfigDoc, parent_dir, write_atomic};

/// Everything `setup` can be told on the command line.
#[derive(Debug, Clone, Default)]
pub struct SetupOptions {
    pub tenant_id: Option<String>,
    pub client_id: Option<String>,
    pub mail_account: Option<String>,
    pub from: Option<String>,
    pub client_secret_file: Option<PathBuf>,
    /// Read the secret Value from stdin (a pipe or a file, not the terminal).
    pub client_secret_stdin: bool,
    /// The Enterprise applications Object ID, for the script when no token can be had.
    pub object_id: Option<String>,
    /// `relay.toml` to write; default `$RELAY_CONFIG`, else `./relay.toml`.
    pub config_out: Option<PathBuf>,
    pub script_out: Option<PathBuf>,
    pub send_to: Option<String>,
    /// `upstream.cloud`.
    pub cloud: Option<String>,
    /// `upstream.transport`: `smtp` or `graph`.
    pub transport: Option<String>,
    /// Other keys as `section.key=value` (e.g. `upstream.host`, `oauth.token_url`: how a
    /// simulator or a proxy is named).
    pub set: Vec<String>,
    /// Lay the secret out for the systemd unit even when `config_out` is not
    /// `/etc/smtp-oauth-relay/relay.toml` (which implies it).
    pub systemd: bool,
    pub non_interactive: bool,
    pub no_check: bool,
    /// `--route NAME`: add a `[[route]]` to an existing file instead of the top level.
    pub route: Option<route::RouteOptions>,
}

#[derive(Debug, thiserror::Error)]
pub enum SetupError {
    #[error("{0}")]
    Usage(String),
    #[error("{flag}: {problem}\n  fix: {}", problem.fix)]
    Value { flag: String, problem: ValueProblem },
    #[error("no answer for {0} (input ended); nothing was written")]
    NoAnswer(String),
    #[error("too many answers refused for {0}; nothing was written")]
    GaveUp(String),
    #[error("{} is not valid TOML{}: {message}", file.display(), line.map(|l| format!(" (line {l})")).unwrap_or_default())]
    Syntax {
        file: PathBuf,
        line: Option<usize>,
        message: String,
    },
    #[error("the configuration would be invalid, nothing was written: {0}")]
    Invalid(ConfigError),
    #[error("cannot {what}: {source}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
}

impl SetupError {
    /// 2 for wrong values and usage (as for every command), 1 for runtime failures.
    pub fn exit_code(&self) -> u8 {
        match self {
            SetupError::Io { .. } => 1,
            _ => 2,
        }
    }
}

/// Runs setup; returns the exit code: 0 check passed, 1 check failed (or a file could not be
/// written), 2 a value or the resulting configuration is invalid (nothing written then).
pub fn run(options: SetupOptions) -> u8 {
    let stdout = std::io::stdout();
    let mut out = stdout.lock();
    let code = match run_to(options, &mut out) {
        Ok(code) => code,
        Err(e) => {
            let _ = out.flush();
            eprintln!("smtp-oauth-relay setup: {e}");
            e.exit_code()
        }
    };
    let _ = out.flush();
    code
}

/// Where the relay's files go.
pub(crate) struct Layout {
    /// `relay.toml`, absolute.
    pub config: PathBuf,
    /// The secret file for a systemd service (`<config dir>/client_secret`), read by the unit's
    /// `LoadCredential=client_secret:...`; `None` when not for systemd.
    pub systemd_secret: Option<PathBuf>,
    pub dir: PathBuf,
}

impl Layout {
    fn of(options: &SetupOptions) -> Result<Layout, SetupError> {
        let named = options
            .config_out
            .clone()
            .or_else(|| std::env::var_os(config::CONFIG_ENV).map(PathBuf::from))
            .unwrap_or_else(|| PathBuf::from("relay.toml"));
        let config = std::path::absolute(&named).map_err(|source| SetupError::Io {
            what: format!("resolve {}", named.display()),
            source,
        })?;
        let dir = parent_dir(&config);
        let systemd = options.systemd || config == Path::new(config::SYSTEM_CONFIG);
        Ok(Layout {
            systemd_secret: systemd.then(|| dir.join("client_secret")),
            config,
            dir,
        })
    }
}

fn run_to(options: SetupOptions, out: &mut dyn std::io::Write) -> Result<u8, SetupError> {
    let layout = Layout::of(&options)?;
    let (mut doc, existed) = ConfigDoc::open(&layout.config)?;
    let sets = parse_sets(&options.set)?;
    let route_at = match &options.route {
        Some(r) => route::preflight(r, &layout, &doc, existed)?,
        None => None,
    };
    let existing = Existing::of(&doc, layout.systemd_secret.as_deref());

    let stdin_is_terminal = std::io::stdin().is_terminal();
    if options.client_secret_stdin && stdin_is_terminal {
        return Err(SetupError::Usage(
            "--client-secret-stdin reads a pipe or a file (e.g. < client_secret); on a terminal leave \
             it out and setup asks for the secret without showing it"
                .into(),
        ));
    }
    let client_secret = if options.client_secret_stdin {
        let mut text = String::new();
        std::io::stdin()
            .read_to_string(&mut text)
            .map_err(|source| SetupError::Io {
                what: "read the client secret from stdin".into(),
                source,
            })?;
        Some(text.trim_end_matches(['\r', '\n']).to_string())
    } else {
        None
    };
    let interactive = !options.non_interactive && !options.client_secret_stdin && stdin_is_terminal;
    let mut terminal = interactive.then(Terminal::new);
    if let (Some(t), Some(r)) = (terminal.as_mut(), &options.route) {
        t.say(&format!(
            "smtp-oauth-relay setup --route {} adds a [[route]] to {} (its comments and the other \n\
             routes kept), runs that route's check, and prints the Exchange Online PowerShell for its\n\
             mailbox. Enter keeps the top level's app. Ctrl-D stops without writing anything.",
            r.name,
            layout.config.display()
        ));
    } else if let Some(t) = terminal.as_mut() {
        t.say(&format!(
            "smtp-oauth-relay setup writes {} ({}) and the client secret file, runs check, and prints\n\
             the Exchange Online PowerShell with your values. The values come from the Azure portal\n\
             (setup guide part 1). Ctrl-D stops without writing anything.",
            layout.config.display(),
            if existed {
                "edited in place, your comments kept"
            } else {
                "new, from the annotated example"
            },
        ));
    }
    let given = Given {
        tenant_id: options.tenant_id.clone(),
        client_id: options.client_id.clone(),
        mail_account: options.mail_account.clone(),
        from: options.from.clone(),
        client_secret_file: options.client_secret_file.clone(),
        client_secret,
        send_to: options.send_to.clone(),
        object_id: options.object_id.clone(),
        transport: options
            .transport
            .as_deref()
            .map(values::parse_transport)
            .transpose()
            .map_err(|problem| SetupError::Value {
                flag: "--transport".into(),
                problem,
            })?,
    };
    if let Some(r) = &options.route {
        let plan = route::gather(r, given, &doc, &layout, terminal.as_mut())?;
        drop(terminal);
        let outcome = route::write_and_check(
            r,
            route_at,
            plan,
            doc,
            &layout,
            options.cloud.as_deref(),
            sets,
            options.no_check,
            out,
        )?;
        return finish(out, outcome, options.script_out.as_deref());
    }
    let answers = values::gather(given, &existing, terminal.as_mut())?;
    drop(terminal);

    // The keys setup owns.
    doc.set_str("oauth", "tenant_id", answers.tenant_id.trim());
    doc.set_str("oauth", "client_id", answers.client_id.trim());
    doc.set_str("upstream", "mail_account", answers.mail_account.trim());
    doc.set_str("upstream", "from", answers.from.trim());
    doc.set_str(
        "upstream",
        "transport",
        match answers.transport {
            TransportKind::Smtp => "smtp",
            TransportKind::Graph => "graph",
        },
    );
    if let Some(cloud) = &options.cloud {
        doc.set_str("upstream", "cloud", cloud);
    }
    for (section, key, value) in sets {
        doc.set(&section, &key, value);
    }
    let secret = plan_secret(&mut doc, &layout, answers.secret)?;

    // Validate the whole result before anything is written, with the secret inline in a copy
    // that is never stored.
    let validated = {
        let mut copy = ConfigDoc::parse(&doc.render(), &layout.config)?;
        let inline = match (&secret, &layout.systemd_secret) {
            (Some((_, value)), _) => Some(value.clone()),
            (None, Some(path)) if path.is_file() => Some(values::read_secret_file(path)?),
            _ => None,
        };
        if let Some(value) = inline {
            copy.remove("oauth", "client_secret_file");
            copy.set_str("oauth", "client_secret", &value);
        }
        Config::from_toml_str(&copy.render()).map_err(SetupError::Invalid)?
    };

    if let Some((path, value)) = &secret {
        write_atomic(path, value.as_bytes(), 0o600)?;
        match &layout.systemd_secret {
            Some(_) => writeln!(
                out,
                "wrote {} (mode 0600): the client secret Value. The systemd unit hands it to the \
                 service as the credential client_secret (LoadCredential=client_secret:{}; the \
                 relay reads $CREDENTIALS_DIRECTORY/client_secret), so relay.toml names no secret. \
                 After changing it: sudo systemctl restart smtp-oauth-relay",
                path.display(),
                path.display()
            ),
            None => writeln!(
                out,
                "wrote {} (mode 0600): the client secret Value, named by oauth.client_secret_file",
                path.display()
            ),
        }
        .map_err(output_error)?;
    }
    let mode = write::config_mode(&layout.config);
    write_atomic(&layout.config, doc.render().as_bytes(), mode)?;
    writeln!(
        out,
        "wrote {} ({})",
        layout.config.display(),
        if existed {
            "edited in place; comments and layout kept"
        } else {
            "new, from the annotated example"
        }
    )
    .map_err(output_error)?;

    let report = if options.no_check {
        None
    } else {
        let report = run_check(&layout, answers.send_to.clone());
        writeln!(out).map_err(output_error)?;
        write!(out, "{}", report.to_text()).map_err(output_error)?;
        Some(report)
    };
    let start = if layout.systemd_secret.is_some() {
        "sudo systemctl restart smtp-oauth-relay".to_string()
    } else {
        format!(
            "smtp-oauth-relay serve --config {}",
            layout.config.display()
        )
    };
    finish(
        out,
        Outcome {
            report,
            typed_object_id: answers.object_id.clone(),
            tenant_id: answers.tenant_id.trim().to_string(),
            client_id: answers.client_id.trim().to_string(),
            mail_account: answers.mail_account.trim().to_string(),
            from: answers.from.trim().to_string(),
            cloud: validated.upstream.cloud,
            transport: validated.upstream.transport,
            graph_large_messages: validated.upstream.graph_large_messages,
            check_again: check_command(&layout, None, answers.send_to.as_deref()),
            start,
        },
        options.script_out.as_deref(),
    )
}

/// What is left to show once the files are written.
pub(crate) struct Outcome {
    /// `None`: check was not run (`--no-check`).
    pub report: Option<Report>,
    pub typed_object_id: Option<String>,
    pub tenant_id: String,
    pub client_id: String,
    pub mail_account: String,
    pub from: String,
    pub cloud: config::Cloud,
    pub transport: TransportKind,
    pub graph_large_messages: bool,
    /// The check command to run after fixing.
    pub check_again: String,
    /// How to start the relay.
    pub start: String,
}

/// `check` on `layout`'s file (`--route NAME`, `--send-to ADDR` when given).
pub(crate) fn check_command(layout: &Layout, route: Option<&str>, send_to: Option<&str>) -> String {
    format!(
        "smtp-oauth-relay check --config {}{}{}",
        layout.config.display(),
        route.map(|r| format!(" --route {r}")).unwrap_or_default(),
        send_to
            .map(|t| format!(" --send-to {t}"))
            .unwrap_or_default()
    )
}

/// The Microsoft side's script and the verdict: 0 check passed (or not run), 1 it failed,
/// 2 the configuration did not load.
pub(crate) fn finish(
    out: &mut dyn std::io::Write,
    o: Outcome,
    script_out: Option<&Path>,
) -> Result<u8, SetupError> {
    let report = o.report;
    // The Enterprise applications Object ID: the token's own `oid` beats a typed one.
    let token_oid = report.as_ref().and_then(|r| r.service_principal_id.clone());
    if let (Some(typed), Some(oid)) = (&o.typed_object_id, &token_oid)
        && !typed.trim().eq_ignore_ascii_case(oid)
    {
        writeln!(
            out,
            "\nWARNING: --object-id {typed} is not the app's service principal: the token Entra \
             issued to the app says {oid}. {typed} is probably the App registrations Object ID; \
             the script below uses {oid}."
        )
        .map_err(output_error)?;
    }
    let object_id = token_oid.clone().or(o.typed_object_id.clone());
    let text = script::render(&script::ScriptValues {
        tenant_id: &o.tenant_id,
        client_id: &o.client_id,
        mail_account: &o.mail_account,
        from: &o.from,
        cloud: o.cloud,
        object_id: object_id.as_deref(),
        object_id_from_token: token_oid.is_some(),
        transport: o.transport,
        graph_large_messages: o.graph_large_messages,
    });
    writeln!(out, "\n{text}").map_err(output_error)?;
    if let Some(path) = script_out {
        write_atomic(path, text.as_bytes(), 0o644)?;
        writeln!(out, "wrote the script to {}", path.display()).map_err(output_error)?;
    }

    let check_again = o.check_again;
    let code = match &report {
        None => {
            writeln!(
                out,
                "\nsetup: files written; check not run (--no-check). When the Microsoft side is \
                 done: {check_again}"
            )
            .map_err(output_error)?;
            0
        }
        Some(r) if r.passed() => {
            let start = &o.start;
            writeln!(out, "\nsetup: done, check passed. Start the relay: {start}")
                .map_err(output_error)?;
            0
        }
        Some(r) => {
            let failed = r.steps.iter().find(|s| s.status == Status::Failed);
            if let Some(step) = failed {
                writeln!(
                    out,
                    "\nsetup: check FAILED at {}: {}",
                    step.title(),
                    step.detail
                )
                .map_err(output_error)?;
                if let Some(fix) = &step.fix {
                    writeln!(out, "fix: {fix}").map_err(output_error)?;
                }
            }
            writeln!(
                out,
                "Then run setup again, or run check after fixing: {check_again}"
            )
            .map_err(output_error)?;
            // Step 1 failing means the configuration did not load: exit 2 as check does.
            if failed.is_some_and(|s| s.step == "config") {
                2
            } else {
                1
            }
        }
    };
    Ok(code)
}

pub(crate) fn output_error(source: std::io::Error) -> SetupError {
    SetupError::Io {
        what: "write to stdout".into(),
        source,
    }
}

/// Decides where the secret goes and updates `relay.toml`'s credential keys to match.
/// Returns the file to write and the Value (`None`: nothing to write).
fn plan_secret(
    doc: &mut ConfigDoc,
    layout: &Layout,
    source: SecretSource,
) -> Result<Option<(PathBuf, String)>, SetupError> {
    let fresh = matches!(source, SecretSource::Value(_) | SecretSource::File(_));
    if fresh {
        for key in ["certificate_file", "private_key_file", "assertion_file"] {
            if doc.has("oauth", key) {
                return Err(SetupError::Usage(format!(
                    "{} already uses oauth.{key}; a client secret would be a second credential. \
                     Remove the certificate or assertion keys first, or run setup without a new \
                     secret to keep them",
                    layout.config.display()
                )));
            }
        }
    }
    let absolute = |p: &Path| std::path::absolute(p).unwrap_or_else(|_| p.to_path_buf());
    Ok(match (source, &layout.systemd_secret) {
        (SecretSource::Keep, _) => None,
        // systemd: the unit's LoadCredential= names the file; relay.toml names none.
        (SecretSource::Value(value), Some(path)) => {
            doc.remove("oauth", "client_secret");
            doc.remove("oauth", "client_secret_file");
            Some((path.clone(), value))
        }
        (SecretSource::File(from), Some(path)) => {
            let value = values::read_secret_file(&from)?;
            doc.remove("oauth", "client_secret");
            doc.remove("oauth", "client_secret_file");
            Some((path.clone(), value))
        }
        (SecretSource::Value(value), None) => {
            // A file relay.toml already names is where the secret is rotated; else one beside it.
            let path = doc
                .get_str("oauth", "client_secret_file")
                .map(|p| absolute(Path::new(&p)))
                .unwrap_or_else(|| layout.dir.join("client_secret"));
            doc.remove("oauth", "client_secret");
            doc.set_str("oauth", "client_secret_file", &path.to_string_lossy());
            Some((path, value))
        }
        (SecretSource::File(from), None) => {
            doc.remove("oauth", "client_secret");
            doc.set_str(
                "oauth",
                "client_secret_file",
                &absolute(&from).to_string_lossy(),
            );
            None
        }
    })
}

/// `check` on the file as written (as the systemd service will see it, for the systemd layout).
fn run_check(layout: &Layout, send_to: Option<String>) -> Report {
    let credentials = layout.systemd_secret.as_ref().map(|_| layout.dir.as_path());
    let config_file = Some(layout.config.clone());
    let config = match config::load_with_credentials(Some(&layout.config), credentials) {
        Ok(c) => c,
        Err(e) => return Report::invalid_config(&e, config_file),
    };
    let options = CheckOptions {
        send_to,
        config_file: config_file.clone(),
        timeouts: None,
    };
    block_on_check(&config, &options, config_file)
}

/// The check walk on its own runtime (setup is synchronous).
pub(crate) fn block_on_check(
    config: &Config,
    options: &CheckOptions,
    config_file: Option<PathBuf>,
) -> Report {
    match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt.block_on(check::run(config, options)),
        Err(e) => Report::invalid_config(
            &ConfigError::Invalid {
                file: config_file.clone(),
                issues: vec![config::ConfigIssue {
                    key: "(runtime)".into(),
                    message: format!("cannot start the runtime for check: {e}"),
                    fix: None,
                }],
            },
            config_file,
        ),
    }
}

/// The keys setup asks for itself; `--set` must not bypass their rules.
const OWN_KEYS: [(&str, &str); 6] = [
    ("oauth.tenant_id", "--tenant-id"),
    ("oauth.client_id", "--client-id"),
    ("upstream.mail_account", "--mail-account"),
    ("upstream.from", "--from"),
    ("upstream.cloud", "--cloud"),
    ("upstream.transport", "--transport"),
];

/// `--set section.key=value`: TOML values (`2587`, `true`, `["a"]`, `"x"`) as typed, anything
/// else as a string. Secrets are refused: they never go into relay.toml.
fn parse_sets(sets: &[String]) -> Result<Vec<(String, String, Value)>, SetupError> {
    sets.iter()
        .map(|s| {
            let bad = |why: &str| SetupError::Usage(format!("--set {s}: {why}"));
            let (key, value) = s
                .split_once('=')
                .ok_or_else(|| bad("expected section.key=value"))?;
            let key = key.trim();
            let (section, name) = key
                .split_once('.')
                .filter(|(a, b)| {
                    let ok = |p: &str| {
                        !p.is_empty() && p.chars().all(|c| c.is_ascii_lowercase() || c == '_')
                    };
                    ok(a) && ok(b)
                })
                .ok_or_else(|| bad("expected section.key=value, e.g. upstream.host=127.0.0.1"))?;
            if name.contains("secret") {
                return Err(bad(
                    "secrets are never written into relay.toml: use --client-secret-stdin or \
                     --client-secret-file",
                ));
            }
            if let Some((_, flag)) = OWN_KEYS.iter().find(|(k, _)| *k == key) {
                return Err(bad(&format!("use {flag}, which checks the value")));
            }
            let value = value
                .trim()
                .parse::<Value>()
                .unwrap_or_else(|_| Value::from(value.trim()));
            Ok((section.to_string(), name.to_string(), value))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sets_are_typed_and_secrets_refused() {
        let s = parse_sets(&[
            "upstream.port=2587".into(),
            "upstream.host=127.0.0.1".into(),
        ])
        .unwrap();
        assert_eq!(s[0].2.as_integer(), Some(2587));
        assert_eq!(s[1].2.as_str(), Some("127.0.0.1"));
        assert!(parse_sets(&["oauth.client_secret=x".into()]).is_err());
        assert!(parse_sets(&["oauth.client_secret_file=/x".into()]).is_err());
        assert!(parse_sets(&["oauth.tenant_id=common".into()]).is_err());
        assert!(parse_sets(&["nodot=1".into()]).is_err());
    }
}
