//! The five values of the setup guide (and the test address), each from its flag, else asked on
//! the terminal, else kept from the file being edited, and each checked by its one rule in
//! `config::identity` as it comes in: a flag's wrong value stops setup (exit 2) with the
//! explanation, a typed one is explained and asked again.

use std::path::{Path, PathBuf};

use super::SetupError;
use super::prompt::{Question, Terminal};
use super::write::ConfigDoc;
use crate::config::TransportKind;
use crate::config::identity::{self, ValueProblem};

/// Where the client secret comes from.
pub enum SecretSource {
    /// A Value to write into the secret file (typed, from stdin, or moved out of relay.toml).
    Value(String),
    /// A file that already holds the Value (`--client-secret-file`).
    File(PathBuf),
    /// Nothing new: the credential relay.toml already has stays.
    Keep,
}

/// What setup was told.
pub struct Answers {
    pub tenant_id: String,
    pub client_id: String,
    pub secret: SecretSource,
    pub mail_account: String,
    pub from: String,
    pub send_to: Option<String>,
    pub object_id: Option<String>,
    pub transport: TransportKind,
}

/// The values given as flags (`None`: not given).
#[derive(Debug, Clone, Default)]
pub struct Given {
    pub tenant_id: Option<String>,
    pub client_id: Option<String>,
    pub mail_account: Option<String>,
    pub from: Option<String>,
    pub client_secret_file: Option<PathBuf>,
    /// The secret read from stdin (`--client-secret-stdin`).
    pub client_secret: Option<String>,
    pub send_to: Option<String>,
    pub object_id: Option<String>,
    /// `--transport`.
    pub transport: Option<TransportKind>,
}

/// What the file being edited already says.
pub struct Existing {
    tenant_id: Option<String>,
    client_id: Option<String>,
    mail_account: Option<String>,
    from: Option<String>,
    transport: Option<String>,
    inline_secret: Option<String>,
    /// A credential setup leaves alone when no new secret is given.
    credential: Option<String>,
}

impl Existing {
    pub fn of(doc: &ConfigDoc, systemd_secret: Option<&Path>) -> Existing {
        let credential = if let Some(f) = doc.get_str("oauth", "client_secret_file") {
            Some(format!("the secret in {f}"))
        } else if doc.has("oauth", "certificate_file") {
            Some("the certificate (oauth.certificate_file)".into())
        } else if doc.has("oauth", "assertion_file") {
            Some("the federated token (oauth.assertion_file)".into())
        } else {
            systemd_secret
                .filter(|p| p.is_file())
                .map(|p| format!("the systemd credential {}", p.display()))
        };
        Existing {
            tenant_id: doc.get_str("oauth", "tenant_id"),
            client_id: doc.get_str("oauth", "client_id"),
            mail_account: doc.get_str("upstream", "mail_account"),
            from: doc.get_str("upstream", "from"),
            transport: doc.get_str("upstream", "transport"),
            inline_secret: doc.get_str("oauth", "client_secret"),
            credential,
        }
    }
}

impl Existing {
    /// For a new `[[route]]`: the top level's app (tenant, client, transport) is the default and
    /// its credential is inherited on Enter; the mailbox and From are the route's own.
    pub fn for_route(doc: &ConfigDoc, systemd_secret: Option<&Path>) -> Existing {
        let top = Existing::of(doc, systemd_secret);
        let credential = top
            .credential
            .clone()
            .or_else(|| top.inline_secret.as_ref().map(|_| "the secret".to_string()))
            .map(|c| format!("{c} of the top level (inherited)"));
        Existing {
            mail_account: None,
            from: None,
            inline_secret: None,
            credential,
            ..top
        }
    }
}

/// A rule's refusal of a flag's value: stops setup with the explanation (exit 2).
fn flag(name: &str, rule: Result<(), ValueProblem>) -> Result<(), SetupError> {
    rule.map_err(|problem| SetupError::Value {
        flag: name.to_string(),
        problem,
    })
}

fn missing(flag: &str, what: &str) -> SetupError {
    SetupError::Usage(format!(
        "{flag} is required ({what}); or run setup on a terminal"
    ))
}

const TENANT: Question<'static> = Question {
    label: "Directory (tenant) ID",
    help: "Azure portal > App registrations > your app > Overview: \"Directory (tenant) ID\" (a GUID,\n\
           or a verified domain such as contoso.onmicrosoft.com).",
    optional: false,
};
const CLIENT: Question<'static> = Question {
    label: "Application (client) ID",
    help: "Same Overview page: \"Application (client) ID\" (a GUID). Not an Object ID.",
    optional: false,
};
const SECRET: Question<'static> = Question {
    label: "Client secret Value",
    help: "Certificates & secrets > Client secrets: the secret's VALUE (shown only once, right after\n\
           New client secret), not its Secret ID.",
    optional: false,
};
const MAILBOX: Question<'static> = Question {
    label: "Mail Account",
    help: "The mailbox the relay signs in as (the XOAUTH2 user), e.g. no-reply@contoso.com.",
    optional: false,
};
const FROM: Question<'static> = Question {
    label: "From",
    help: "The sender address shown in outgoing mail (Enter: the mail account itself).",
    optional: false,
};
const TRANSPORT: Question<'static> = Question {
    label: "Transport (smtp or graph)",
    help: "smtp: SMTP AUTH with XOAUTH2, as in the setup guide. graph: Microsoft Graph sendMail,\n\
           for tenants or mailboxes where SMTP AUTH is disabled and stays so (README \"Microsoft\n\
           Graph instead of SMTP AUTH\").",
    optional: false,
};
const SEND_TO: Question<'static> = Question {
    label: "Send a test message to",
    help: "After writing the files setup runs check; give an address to also send a real test\n\
           message (Enter: no test message).",
    optional: true,
};

fn address_rule(value: &str) -> Result<(), ValueProblem> {
    // The same plausibility test the relay applies to every address it is configured with.
    if crate::config::looks_like_address(value) {
        Ok(())
    } else {
        Err(ValueProblem {
            key: "--send-to",
            what: format!("`{value}` is not an e-mail address"),
            fix: "Give the address that should receive the test message, e.g. you@contoso.com.",
        })
    }
}

/// `smtp` or `graph`, as `upstream.transport` spells them.
pub fn parse_transport(value: &str) -> Result<TransportKind, ValueProblem> {
    match value.trim().to_ascii_lowercase().as_str() {
        "smtp" => Ok(TransportKind::Smtp),
        "graph" => Ok(TransportKind::Graph),
        other => Err(ValueProblem {
            key: "upstream.transport",
            what: format!("`{other}` is not a transport"),
            fix: "Give smtp (SMTP AUTH, the setup guide) or graph (Microsoft Graph sendMail, when \
                  SMTP AUTH is disabled).",
        }),
    }
}

fn transport_rule(value: &str) -> Result<(), ValueProblem> {
    parse_transport(value).map(|_| ())
}

/// Collects the answers. `terminal` is `None` without a terminal (or with
/// `--non-interactive`): then every value must come from a flag or the existing file.
pub fn gather(
    given: Given,
    existing: &Existing,
    mut terminal: Option<&mut Terminal>,
) -> Result<Answers, SetupError> {
    // Flags first: a wrong flag stops setup before any question is asked.
    if let Some(t) = &given.tenant_id {
        flag("--tenant-id", identity::tenant_id(t))?;
    }
    if let Some(c) = &given.client_id {
        flag("--client-id", identity::client_id(c))?;
    }
    if let Some(s) = &given.client_secret {
        flag("--client-secret-stdin", identity::client_secret(s))?;
    }
    let file_secret = match &given.client_secret_file {
        Some(path) => {
            let value = read_secret_file(path)?;
            flag("--client-secret-file", identity::client_secret(&value))?;
            Some(path.clone())
        }
        None => None,
    };
    if let Some(m) = &given.mail_account {
        flag("--mail-account", identity::mail_account(m))?;
    }
    if let Some(f) = &given.from {
        flag("--from", identity::from(f))?;
    }
    if let Some(to) = &given.send_to {
        flag("--send-to", address_rule(to))?;
    }

    let tenant_id = value(
        given.tenant_id,
        existing.tenant_id.as_deref(),
        &mut terminal,
        &TENANT,
        &identity::tenant_id,
        ("--tenant-id", "the Directory (tenant) ID"),
    )?;
    let client_id = value(
        given.client_id,
        existing.client_id.as_deref(),
        &mut terminal,
        &CLIENT,
        &identity::client_id,
        ("--client-id", "the Application (client) ID"),
    )?;
    if let Some(o) = &given.object_id {
        flag("--object-id", identity::enterprise_object_id(o, &client_id))?;
    }

    let secret = if let Some(s) = given.client_secret {
        SecretSource::Value(s)
    } else if let Some(path) = file_secret {
        SecretSource::File(path)
    } else if let Some(t) = terminal.as_deref_mut() {
        // A secret written inline in relay.toml is moved to the secret file, never kept there.
        let keep = existing
            .inline_secret
            .as_ref()
            .map(|_| "the one in relay.toml (moved to the secret file)".to_string())
            .or_else(|| existing.credential.clone());
        match t.ask_secret(&SECRET, keep.as_deref(), &identity::client_secret)? {
            Some(v) => SecretSource::Value(v),
            None => keep_existing(existing)?,
        }
    } else {
        keep_existing(existing)?
    };

    let mail_account = value(
        given.mail_account,
        existing.mail_account.as_deref(),
        &mut terminal,
        &MAILBOX,
        &identity::mail_account,
        ("--mail-account", "the mailbox the relay signs in as"),
    )?;
    let from_default = existing
        .from
        .clone()
        .unwrap_or_else(|| mail_account.clone());
    let from = value(
        given.from,
        Some(&from_default),
        &mut terminal,
        &FROM,
        &identity::from,
        ("--from", "the sender address"),
    )?;
    let transport = match given.transport {
        Some(t) => t,
        None => {
            // The file's transport is kept; a new file (whose example says smtp) is asked.
            let kept = existing.transport.clone().unwrap_or_else(|| "smtp".into());
            let answer = match terminal.as_deref_mut() {
                Some(t) => {
                    let default = Some(kept.as_str()).filter(|k| transport_rule(k).is_ok());
                    t.ask(&TRANSPORT, default, &transport_rule)?
                        .ok_or_else(|| SetupError::NoAnswer(TRANSPORT.label.to_string()))?
                }
                None => kept,
            };
            parse_transport(&answer).map_err(|problem| SetupError::Value {
                flag: "--transport".into(),
                problem,
            })?
        }
    };
    let send_to = match (given.send_to, terminal) {
        (Some(to), _) => Some(to),
        (None, Some(t)) => t.ask(&SEND_TO, None, &address_rule)?,
        (None, None) => None,
    };
    Ok(Answers {
        tenant_id,
        client_id,
        secret,
        mail_account,
        from,
        send_to,
        object_id: given.object_id,
        transport,
    })
}

/// A value from its flag (already checked), else the terminal, else the existing file.
fn value(
    flag_value: Option<String>,
    existing: Option<&str>,
    terminal: &mut Option<&mut Terminal>,
    question: &Question<'_>,
    rule: &dyn Fn(&str) -> Result<(), ValueProblem>,
    (flag_name, what): (&str, &str),
) -> Result<String, SetupError> {
    if let Some(v) = flag_value {
        return Ok(v.trim().to_string());
    }
    // A value kept from the file is held to the same rule (it may be the wrong one setup is
    // run to fix); on the terminal it is offered as the default only when it passes.
    let existing = existing.map(str::trim).filter(|e| !e.is_empty());
    if let Some(t) = terminal.as_deref_mut() {
        let default = existing.filter(|e| rule(e).is_ok());
        let answer = t.ask(question, default, rule)?;
        return answer.ok_or_else(|| SetupError::NoAnswer(question.label.to_string()));
    }
    match existing {
        Some(e) => {
            flag(flag_name, rule(e))?;
            Ok(e.to_string())
        }
        None => Err(missing(flag_name, what)),
    }
}

fn keep_existing(existing: &Existing) -> Result<SecretSource, SetupError> {
    if let Some(inline) = &existing.inline_secret {
        flag("oauth.client_secret", identity::client_secret(inline))?;
        return Ok(SecretSource::Value(inline.clone()));
    }
    match existing.credential {
        Some(_) => Ok(SecretSource::Keep),
        None => Err(missing(
            "--client-secret-stdin or --client-secret-file",
            "the client secret Value",
        )),
    }
}

/// The secret in a file, as the relay will read it (trailing line end dropped).
pub fn read_secret_file(path: &Path) -> Result<String, SetupError> {
    let text = std::fs::read_to_string(path).map_err(|source| SetupError::Io {
        what: format!("read {}", path.display()),
        source,
    })?;
    Ok(text.trim_end_matches(['\r', '\n']).to_string())
}
