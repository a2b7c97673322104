//! `setup --route NAME`: one `[[route]]` table added to an existing `relay.toml` (its comments
//! and the other routes kept): the route's matches, its `[route.upstream] mail_account`, and in
//! `[route.oauth]` only what differs from the top level (another tenant, app or secret; the
//! secret in its own 0600 file named after the route). Then the route's own check and the
//! Microsoft side for its mailbox.

use std::path::{Path, PathBuf};

use toml_edit::{Array, Item, Table, Value};

use super::prompt::{Question, Terminal};
use super::values::{self, Answers, Existing, SecretSource};
use super::write::{ConfigDoc, write_atomic};
use super::{Layout, Outcome, SetupError, output_error};
use crate::check::{CheckOptions, Report};
use crate::config::identity::ValueProblem;
use crate::config::{self, Config, ConfigError, TransportKind, route_name_problem};
use crate::routes::{MailboxSpec, SenderPattern};

/// `--route NAME` and its matches.
#[derive(Debug, Clone, Default)]
pub struct RouteOptions {
    pub name: String,
    /// `--match-sender` (addresses or `*@domain`; repeatable or comma lists).
    pub match_sender: Vec<String>,
    /// `--match-auth-user`.
    pub match_auth_user: Vec<String>,
    /// Replace a route of that name instead of refusing.
    pub replace: bool,
}

/// The checks that need no answer: a usable name, an existing file, no route of that name
/// (unless `--replace`). Returns the position of the route `--replace` replaces.
pub(crate) fn preflight(
    route: &RouteOptions,
    layout: &Layout,
    doc: &ConfigDoc,
    existed: bool,
) -> Result<Option<usize>, SetupError> {
    if let Some(problem) = route_name_problem(&route.name) {
        return Err(SetupError::Usage(format!("--route: {problem}")));
    }
    if !existed {
        return Err(SetupError::Usage(format!(
            "--route adds a route to an existing relay.toml, and {} does not exist: run setup \
             without --route first (it writes the default route), then add routes",
            layout.config.display()
        )));
    }
    let at = doc.route_index(&route.name);
    if at.is_some() && !route.replace {
        return Err(SetupError::Usage(format!(
            "route {:?} is in {} already: give another name, or --replace to replace that \
             [[route]] table (its matches and keys) with this one",
            route.name,
            layout.config.display()
        )));
    }
    Ok(at)
}

const SENDERS: Question<'static> = Question {
    label: "Senders for this route",
    help: "The envelope senders this route takes: addresses or *@domain, comma-separated\n\
           (e.g. *@billing.contoso.com, erp@contoso.com).",
    optional: false,
};

fn senders_rule(value: &str) -> Result<(), ValueProblem> {
    match split(&[value.to_string()])
        .iter()
        .find(|p| SenderPattern::parse(p).is_none())
    {
        None if !value.trim().is_empty() => Ok(()),
        bad => Err(ValueProblem {
            key: "--match-sender",
            what: format!(
                "`{}` is neither an address nor *@domain",
                bad.map(String::as_str).unwrap_or(value)
            ),
            fix: "Give addresses or *@domain patterns, comma-separated.",
        }),
    }
}

/// Comma lists and repeated flags as one list.
fn split(values: &[String]) -> Vec<String> {
    values
        .iter()
        .flat_map(|v| v.split(','))
        .map(str::trim)
        .filter(|v| !v.is_empty())
        .map(str::to_string)
        .collect()
}

/// The route's values once asked.
pub(crate) struct Plan {
    pub answers: Answers,
    pub match_sender: Vec<String>,
    pub match_auth_user: Vec<String>,
}

/// Asks (or takes from flags) the route's values: its matches, then the setup guide's values with
/// the top level's app as the default (Enter keeps it) and no mailbox default.
pub(crate) fn gather(
    route: &RouteOptions,
    given: values::Given,
    doc: &ConfigDoc,
    layout: &Layout,
    mut terminal: Option<&mut Terminal>,
) -> Result<Plan, SetupError> {
    let mut match_sender = split(&route.match_sender);
    let match_auth_user = split(&route.match_auth_user);
    for s in &match_sender {
        if SenderPattern::parse(s).is_none() {
            return Err(SetupError::Value {
                flag: "--match-sender".into(),
                problem: ValueProblem {
                    key: "--match-sender",
                    what: format!("`{s}` is neither an address nor *@domain"),
                    fix: "Give addresses or *@domain patterns, comma-separated.",
                },
            });
        }
    }
    if match_sender.is_empty() && match_auth_user.is_empty() {
        // A route without a match takes all mail: the default route would get none.
        match terminal.as_deref_mut() {
            Some(t) => {
                let answer = t
                    .ask(&SENDERS, None, &senders_rule)?
                    .ok_or_else(|| SetupError::NoAnswer(SENDERS.label.into()))?;
                match_sender = split(&[answer]);
            }
            None => {
                return Err(SetupError::Usage(
                    "--route needs --match-sender or --match-auth-user (which mail the route \
                     takes; a route without a match would take all of it)"
                        .into(),
                ));
            }
        }
    }
    let existing = Existing::for_route(doc, layout.systemd_secret.as_deref());
    let answers = values::gather(given, &existing, terminal)?;
    Ok(Plan {
        answers,
        match_sender,
        match_auth_user,
    })
}

/// Where the route's credential comes from.
enum Credential {
    /// The top level's (the same app and secret).
    Inherited,
    /// A new secret Value, written to `file`.
    Write { file: PathBuf, value: String },
    /// A file that holds the Value already.
    Named { file: PathBuf, value: String },
}

/// Writes the route and runs its check; returns the outcome to show.
#[allow(clippy::too_many_arguments)]
pub(crate) fn write_and_check(
    route: &RouteOptions,
    at: Option<usize>,
    plan: Plan,
    mut doc: ConfigDoc,
    layout: &Layout,
    cloud: Option<&str>,
    sets: Vec<(String, String, Value)>,
    no_check: bool,
    out: &mut dyn std::io::Write,
) -> Result<Outcome, SetupError> {
    let a = &plan.answers;
    let differs = |given: &str, top: Option<String>| {
        top.is_none_or(|t| !t.trim().eq_ignore_ascii_case(given.trim()))
    };
    let own_tenant = differs(&a.tenant_id, doc.get_str("oauth", "tenant_id"));
    let own_client = differs(&a.client_id, doc.get_str("oauth", "client_id"));
    let top_secret = top_secret(&doc, layout);
    let secret_file = layout.dir.join(format!("client_secret_{}", route.name));
    let credential = match &a.secret {
        SecretSource::Keep if own_tenant || own_client => {
            return Err(SetupError::Usage(format!(
                "route {:?} uses another {} than the top level: it needs that app's own secret \
                 (--client-secret-stdin or --client-secret-file)",
                route.name,
                if own_tenant { "tenant" } else { "app" }
            )));
        }
        SecretSource::Keep => Credential::Inherited,
        SecretSource::Value(v) if !own_tenant && !own_client && top_secret.as_ref() == Some(v) => {
            Credential::Inherited
        }
        SecretSource::Value(v) => Credential::Write {
            file: secret_file,
            value: v.clone(),
        },
        SecretSource::File(path) => {
            let value = values::read_secret_file(path)?;
            if !own_tenant && !own_client && top_secret.as_ref() == Some(&value) {
                Credential::Inherited
            } else {
                Credential::Named {
                    file: std::path::absolute(path).unwrap_or_else(|_| path.clone()),
                    value,
                }
            }
        }
    };
    if layout.systemd_secret.is_some() && !matches!(credential, Credential::Inherited) {
        // The unit runs as a dynamic user that reads only what LoadCredential= hands it.
        return Err(SetupError::Usage(format!(
            "route {:?} would have its own secret, but with the systemd layout the service reads \
             secrets only through the unit's LoadCredential= (client_secret, the top level's) and \
             setup writes no unit drop-ins: add the route without a new secret (it inherits the \
             top level's app), or add LoadCredential= for its secret with systemctl edit and set \
             its [route.oauth] client_secret_file by hand",
            route.name
        )));
    }
    let top_transport = doc.get_str("upstream", "transport");
    let transport = match a.transport {
        TransportKind::Smtp => "smtp",
        TransportKind::Graph => "graph",
    };

    // The table as written (the secret by file) and, for validation only, with the Value inline.
    let table = |inline_secret: bool| -> Result<Table, SetupError> {
        let mut t = Table::new();
        t.decor_mut().set_prefix(format!(
            "\n# Route {:?}: added by smtp-oauth-relay setup --route.\n",
            route.name
        ));
        t.insert("name", toml_edit::value(route.name.as_str()));
        for (key, list) in [
            ("match_sender", &plan.match_sender),
            ("match_auth_user", &plan.match_auth_user),
        ] {
            if !list.is_empty() {
                t.insert(key, toml_edit::value(list.iter().collect::<Array>()));
            }
        }
        let mut up = Table::new();
        up.insert("mail_account", toml_edit::value(a.mail_account.trim()));
        if !a.from.trim().eq_ignore_ascii_case(a.mail_account.trim()) {
            up.insert("from", toml_edit::value(a.from.trim()));
        }
        if top_transport.as_deref().unwrap_or("smtp") != transport {
            up.insert("transport", toml_edit::value(transport));
        }
        if let Some(c) = cloud {
            up.insert("cloud", toml_edit::value(c));
        }
        let mut oauth = Table::new();
        if own_tenant {
            oauth.insert("tenant_id", toml_edit::value(a.tenant_id.trim()));
        }
        if own_client {
            oauth.insert("client_id", toml_edit::value(a.client_id.trim()));
        }
        match &credential {
            Credential::Inherited => {}
            Credential::Write { file, value } | Credential::Named { file, value } => {
                if inline_secret {
                    oauth.insert("client_secret", toml_edit::value(value.as_str()));
                } else {
                    oauth.insert(
                        "client_secret_file",
                        toml_edit::value(file.to_string_lossy().as_ref()),
                    );
                }
            }
        }
        for (section, key, value) in &sets {
            let target = match section.as_str() {
                "upstream" => &mut up,
                "oauth" => &mut oauth,
                other => {
                    return Err(SetupError::Usage(format!(
                        "--set {other}.{key}: with --route, --set takes upstream.* and oauth.* \
                         keys, which go into [route.upstream] and [route.oauth]"
                    )));
                }
            };
            target.insert(key, Item::Value(value.clone()));
        }
        t.insert("upstream", Item::Table(up));
        if !oauth.is_empty() {
            t.insert("oauth", Item::Table(oauth));
        }
        Ok(t)
    };

    // Validate the whole file with the new route before anything is written.
    let validated = {
        let mut copy = ConfigDoc::parse(&doc.render(), &layout.config)?;
        copy.put_route(table(true)?, at);
        if let (Some(path), false) = (
            &layout.systemd_secret,
            copy.has("oauth", "client_secret_file"),
        ) && path.is_file()
        {
            copy.set_str("oauth", "client_secret", &values::read_secret_file(path)?);
        }
        Config::from_toml_str(&copy.render()).map_err(SetupError::Invalid)?
    };
    let routes = validated.route_table();
    let Some(spec) = routes.get(&route.name).cloned() else {
        return Err(SetupError::Usage(format!(
            "route {:?} did not resolve",
            route.name
        )));
    };
    let mailbox = match &spec.mailbox {
        MailboxSpec::Fixed(m) => m.clone(),
        _ => spec.example_mailbox().unwrap_or_default(),
    };

    if let Credential::Write { file, value } = &credential {
        write_atomic(file, value.as_bytes(), 0o600)?;
        writeln!(
            out,
            "wrote {} (mode 0600): route {}'s client secret Value, named by its \
             [route.oauth] client_secret_file",
            file.display(),
            route.name
        )
        .map_err(output_error)?;
    }
    doc.put_route(table(false)?, at);
    let mode = super::write::config_mode(&layout.config);
    write_atomic(&layout.config, doc.render().as_bytes(), mode)?;
    writeln!(
        out,
        "wrote {} ({} [[route]] {:?}; the rest of the file, comments and other routes kept)",
        layout.config.display(),
        if at.is_some() { "replaced" } else { "added" },
        route.name
    )
    .map_err(output_error)?;

    let report = if no_check {
        None
    } else {
        let report = check_route(layout, &route.name, &mailbox, a.send_to.clone());
        writeln!(out, "\n== route {} (mailbox {mailbox})", route.name).map_err(output_error)?;
        write!(out, "{}", report.to_text()).map_err(output_error)?;
        Some(report)
    };
    let c = &spec.config;
    Ok(Outcome {
        report,
        typed_object_id: a.object_id.clone(),
        tenant_id: c.oauth.tenant_id.clone().unwrap_or_default(),
        client_id: c.oauth.client_id.clone().unwrap_or_default(),
        from: c.upstream.from.clone().unwrap_or_else(|| mailbox.clone()),
        mail_account: mailbox,
        cloud: c.upstream.cloud,
        transport: c.upstream.transport,
        graph_large_messages: c.upstream.graph_large_messages,
        check_again: super::check_command(layout, Some(&route.name), a.send_to.as_deref()),
        start: format!(
            "{} (or SIGHUP a running one: it applies added routes)",
            if layout.systemd_secret.is_some() {
                "sudo systemctl restart smtp-oauth-relay".to_string()
            } else {
                format!(
                    "smtp-oauth-relay serve --config {}",
                    layout.config.display()
                )
            }
        ),
    })
}

/// The top level's secret Value, to tell whether a route's is another one.
fn top_secret(doc: &ConfigDoc, layout: &Layout) -> Option<String> {
    if let Some(inline) = doc.get_str("oauth", "client_secret") {
        return Some(inline);
    }
    let file = doc
        .get_str("oauth", "client_secret_file")
        .map(PathBuf::from)
        .or_else(|| layout.systemd_secret.clone())?;
    values::read_secret_file(Path::new(&file)).ok()
}

/// `check --route NAME` on the file as written.
fn check_route(layout: &Layout, name: &str, mailbox: &str, send_to: Option<String>) -> Report {
    let credentials = layout.systemd_secret.as_ref().map(|_| layout.dir.as_path());
    let config_file = Some(layout.config.clone());
    let config = match config::load_with_credentials(Some(&layout.config), credentials) {
        Ok(c) => c,
        Err(e) => return Report::invalid_config(&e, config_file),
    };
    let Some(spec) = config.route_table().get(name).cloned() else {
        return Report::invalid_config(
            &ConfigError::Invalid {
                file: config_file.clone(),
                issues: vec![config::ConfigIssue {
                    key: format!("route.{name}"),
                    message: "not in the file as written".into(),
                    fix: None,
                }],
            },
            config_file,
        );
    };
    let lane = spec.lane_config(mailbox);
    let options = CheckOptions {
        send_to,
        config_file: config_file.clone(),
        timeouts: None,
    };
    super::block_on_check(&lane, &options, config_file)
}
