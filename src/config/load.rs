//! Loading: defaults → file → `RELAY_*` environment (figment), the lookup order of the file,
//! and the errors that name the key (never a value: it may be a secret).

use super::*;

/// One problem with the configuration, naming the key it concerns.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigIssue {
    pub key: String,
    pub message: String,
    /// What to do, where the setup guide says it (the Microsoft 365 values).
    pub fix: Option<&'static str>,
}

impl fmt::Display for ConfigIssue {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.key, self.message)?;
        match self.fix {
            Some(fix) => write!(f, " (fix: {fix})"),
            None => Ok(()),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("configuration file {0} does not exist")]
    Missing(PathBuf),
    #[error("invalid configuration{}:\n{}", source_suffix(.file), join_issues(.issues))]
    Invalid {
        file: Option<PathBuf>,
        issues: Vec<ConfigIssue>,
    },
}

impl ConfigError {
    pub fn issues(&self) -> &[ConfigIssue] {
        match self {
            ConfigError::Missing(_) => &[],
            ConfigError::Invalid { issues, .. } => issues,
        }
    }
}

pub(super) fn source_suffix(source: &Option<PathBuf>) -> String {
    source
        .as_ref()
        .map(|p| format!(" in {}", p.display()))
        .unwrap_or_default()
}

pub(super) fn join_issues(issues: &[ConfigIssue]) -> String {
    issues
        .iter()
        .map(|i| format!("  - {i}"))
        .collect::<Vec<_>>()
        .join("\n")
}

/// Which file to read, following the lookup order of DESIGN.md: `--config`, `$RELAY_CONFIG`,
/// `./relay.toml`, `/etc/smtp-oauth-relay/relay.toml`. An explicit file must exist; the implicit
/// ones are used only when present (otherwise defaults and environment apply).
pub fn locate(explicit: Option<&Path>) -> Result<Option<PathBuf>, ConfigError> {
    let named = explicit
        .map(Path::to_path_buf)
        .or_else(|| std::env::var_os(CONFIG_ENV).map(PathBuf::from));
    if let Some(path) = named {
        return if path.is_file() {
            Ok(Some(path))
        } else {
            Err(ConfigError::Missing(path))
        };
    }
    Ok(["relay.toml", SYSTEM_CONFIG]
        .iter()
        .map(PathBuf::from)
        .find(|p| p.is_file()))
}

/// Loads and validates the configuration. Secrets named by `*_file` keys or provided as systemd
/// credentials are read here, so a bad path is reported at start-up rather than at first delivery.
pub fn load(explicit: Option<&Path>) -> Result<Config, ConfigError> {
    let credentials = std::env::var_os("CREDENTIALS_DIRECTORY").map(PathBuf::from);
    load_with_credentials(explicit, credentials.as_deref())
}

/// [`load`] as a systemd service with `$CREDENTIALS_DIRECTORY` = `credentials` would see it
/// (`None`: no credentials). `setup` checks the file it wrote for the service this way, before
/// systemd has ever loaded the credential.
pub fn load_with_credentials(
    explicit: Option<&Path>,
    credentials: Option<&Path>,
) -> Result<Config, ConfigError> {
    let path = locate(explicit)?;
    let mut figment = Figment::new();
    if let Some(p) = &path {
        figment = figment.merge(Toml::file_exact(p));
    }
    figment = figment.merge(env_provider());
    let invalid = |issues| ConfigError::Invalid {
        file: path.clone(),
        issues,
    };
    // Kept to name the key of a TOML syntax error, which figment reports without one.
    let source = path.as_ref().and_then(|p| std::fs::read_to_string(p).ok());
    extract_and_validate(&figment, credentials, source.as_deref()).map_err(invalid)
}

/// The configuration as `sendmail` needs it: the same file and environment, but no secret is
/// read (a caller such as www-data may not, and sendmail never needs one) and only the keys
/// sendmail uses (`smtp.*`, `queue.*`, `sendmail.*`) may make it invalid.
pub fn load_for_sendmail(explicit: Option<&Path>) -> Result<Config, ConfigError> {
    let path = locate(explicit)?;
    let mut figment = Figment::new();
    if let Some(p) = &path {
        figment = figment.merge(Toml::file_exact(p));
    }
    figment = figment.merge(env_provider());
    let source = path.as_ref().and_then(|p| std::fs::read_to_string(p).ok());
    let (config, issues) = extract_all(&figment, source.as_deref());
    // The TLS key and the users file (of [smtp] and of each [[smtp.listener]]) are the
    // listener's, and may be unreadable to the caller.
    let theirs = ["smtp.tls_cert_file", "smtp.tls_key_file", "smtp.auth"];
    let mine = |i: &ConfigIssue| {
        i.key.is_empty()
            || (["smtp.", "queue.", "sendmail."]
                .iter()
                .any(|p| i.key.starts_with(p))
                && !theirs.contains(&i.key.as_str())
                && !(i.key.starts_with("smtp.listener.")
                    && theirs.iter().any(|t| i.key.ends_with(&t["smtp".len()..]))))
    };
    let mut issues: Vec<ConfigIssue> = issues.into_iter().filter(mine).collect();
    let invalid = |issues| ConfigError::Invalid {
        file: path.clone(),
        issues,
    };
    let Some(config) = config else {
        return Err(invalid(issues));
    };
    let mut found = Vec::new();
    config.validate_into(&mut found);
    issues.extend(found.into_iter().filter(mine));
    if issues.is_empty() {
        Ok(config)
    } else {
        Err(invalid(issues))
    }
}

/// Deserializes the merged sources, then resolves secrets and validates. A key with a wrong type
/// or an unknown name is reported, dropped (so its default applies) and extraction retried, so
/// that every other key is still checked and the admin sees every problem at once. Validation
/// findings about a key already reported as badly typed are left out (they would only describe
/// the default that stood in for it).
pub(super) fn extract_and_validate(
    figment: &Figment,
    credentials: Option<&Path>,
    source: Option<&str>,
) -> Result<Config, Vec<ConfigIssue>> {
    let (config, mut issues) = extract_all(figment, source);
    let mut config = config.ok_or_else(|| issues.clone())?;
    let bad_keys: Vec<String> = issues.iter().map(|i| i.key.clone()).collect();
    let mut found = Vec::new();
    config.resolve_secrets(credentials, &mut found);
    config.validate_into(&mut found);
    found.retain(|i| !bad_keys.iter().any(|k| keys_overlap(k, &i.key)));
    issues.extend(found);
    if issues.is_empty() {
        Ok(config)
    } else {
        Err(issues)
    }
}

/// `smtp.allow_networks` and `smtp.allow_networks.0` are about the same setting.
pub(super) fn keys_overlap(a: &str, b: &str) -> bool {
    let within = |long: &str, short: &str| {
        long.strip_prefix(short)
            .is_some_and(|rest| rest.is_empty() || rest.starts_with('.'))
    };
    within(a, b) || within(b, a)
}

/// Extracts a [`Config`], collecting the type errors of every key (see [`extract_and_validate`]).
/// Returns no config only when the sources themselves cannot be read (e.g. TOML syntax).
pub(super) fn extract_all(
    figment: &Figment,
    source: Option<&str>,
) -> (Option<Config>, Vec<ConfigIssue>) {
    let mut errors = match figment.extract::<Config>() {
        Ok(config) => return (Some(config), Vec::new()),
        Err(e) => e,
    };
    let mut dict = match figment.extract::<figment::value::Dict>() {
        Ok(dict) => dict,
        Err(e) => return (None, figment_issues(e, source)),
    };
    let mut issues = Vec::new();
    // Each round removes at least one key, so this ends; the bound is belt and braces.
    for round in 0..256 {
        let mut removed = false;
        for mut e in errors {
            removed |= remove_key(&mut dict, &e.path);
            // After the first round errors come from the re-serialized dictionary: name the
            // original source (file or environment) instead.
            if round > 0 {
                e.metadata = find_origin(figment, &e.path).cloned();
            }
            issues.push(figment_issue(&e));
        }
        if !removed {
            return (None, issues);
        }
        match Figment::from(figment::providers::Serialized::defaults(&dict)).extract::<Config>() {
            Ok(config) => return (Some(config), issues),
            Err(e) => errors = e,
        }
    }
    (None, issues)
}

/// The provider that set `path` (or its closest enclosing key) in the original sources.
pub(super) fn find_origin<'a>(
    figment: &'a Figment,
    path: &[String],
) -> Option<&'a figment::Metadata> {
    (1..=path.len())
        .rev()
        .find_map(|n| figment.find_metadata(&path[..n].join(".")))
}

/// Removes the key at `path` from `dict`. A path into a table of an array of tables
/// (`smtp.listener.1.tls`) removes that key only, so the other tables are still checked; any
/// other path into an array removes the whole array.
pub(super) fn remove_key(dict: &mut figment::value::Dict, path: &[String]) -> bool {
    use figment::value::Value;
    let Some((first, rest)) = path.split_first() else {
        return false;
    };
    if rest.is_empty() {
        return dict.remove(first).is_some();
    }
    let removed = match dict.get_mut(first) {
        Some(Value::Dict(_, inner)) => remove_key(inner, rest),
        Some(Value::Array(_, items)) => match rest.split_first() {
            Some((index, inner_path)) if !inner_path.is_empty() => {
                match index.parse::<usize>().ok().and_then(|i| items.get_mut(i)) {
                    Some(Value::Dict(_, table)) => remove_key(table, inner_path),
                    _ => false,
                }
            }
            _ => false,
        },
        Some(_) => false,
        None => return false,
    };
    removed || dict.remove(first).is_some()
}

/// The relay's variables are `RELAY_<SECTION>__<KEY>`: the double underscore marks them.
/// Everything else with the prefix belongs to someone else and is ignored: Kubernetes injects
/// `RELAY_PORT`, `RELAY_SERVICE_HOST`, `RELAY_SERVICE_PORT_SMTP`, ... for a Service named
/// `relay` (its names never hold `__`), `RELAY_CONFIG` names the file and `RELAY_FAILPOINT` arms
/// a test crash point (src/failpoint.rs). A typo with the double underscore
/// (`RELAY_OAUTH__CLIENT_IDD`) is still the relay's, and an error naming the variable.
pub(super) fn env_provider() -> Env {
    Env::prefixed(ENV_PREFIX)
        .filter(|rest| is_key_variable(rest.as_str()))
        .split("__")
}

pub(super) fn is_key_variable(after_prefix: &str) -> bool {
    after_prefix.contains("__")
}

/// The key path a variable of ours sets: `RELAY_OAUTH__CLIENT_ID` → `oauth.client_id`.
pub(super) fn variable_key(name: &str) -> Option<String> {
    let rest = name.get(ENV_PREFIX.len()..)?;
    (name[..ENV_PREFIX.len()].eq_ignore_ascii_case(ENV_PREFIX) && is_key_variable(rest))
        .then(|| rest.to_ascii_lowercase().replace("__", "."))
}

/// The `RELAY_*` variables that are not the relay's and are ignored (names only: a value may be
/// anything, even a secret put in a misspelt variable). `serve` logs them at debug level.
pub fn foreign_env_vars() -> Vec<String> {
    let mut names: Vec<String> = std::env::vars_os()
        .filter_map(|(k, _)| k.into_string().ok())
        .filter(|k| {
            k.get(..ENV_PREFIX.len())
                .is_some_and(|p| p.eq_ignore_ascii_case(ENV_PREFIX))
                && variable_key(k).is_none()
        })
        .collect();
    names.sort();
    names
}

/// The variables of ours that set `path` or a key inside it, for messages.
pub(super) fn variables_setting(path: &[String]) -> Vec<String> {
    let key = path.join(".").to_ascii_lowercase();
    let mut names: Vec<String> = std::env::vars_os()
        .filter_map(|(k, _)| k.into_string().ok())
        .filter(|k| variable_key(k).is_some_and(|v| keys_overlap(&v, &key)))
        .collect();
    names.sort();
    names
}

/// Issues for errors that may come without a key path: a TOML syntax error names a line, and
/// the key on that line of `source` is named instead of `(file)` (a value too large for TOML's
/// 64-bit integers is such an error).
pub(super) fn figment_issues(error: figment::Error, source: Option<&str>) -> Vec<ConfigIssue> {
    error
        .into_iter()
        .map(|e| {
            let mut found = figment_issue(&e);
            if found.key == "(file)"
                && let Some(key) = source.and_then(|src| key_of_error_line(src, &found.message))
            {
                found.key = key;
            }
            found
        })
        .collect()
}

/// The dotted key on the line a TOML parse error names (`TOML parse error at line 2, ...`):
/// only a bare key under one of the schema's sections, so that nothing but a key name is
/// ever taken from the file (a line inside a multi-line string may hold a secret).
pub(super) fn key_of_error_line(source: &str, message: &str) -> Option<String> {
    const SECTIONS: [&str; 7] = [
        "smtp", "queue", "upstream", "oauth", "admin", "log", "service",
    ];
    let rest = &message[message.find("at line ")? + "at line ".len()..];
    let line: usize = rest
        .split(|c: char| !c.is_ascii_digit())
        .next()?
        .parse()
        .ok()?;
    let mut table = "";
    // Inside a multi-line string (`"""` or `'''`) a line is text, not a key.
    let mut open: Option<&str> = None;
    for (i, text) in source.lines().enumerate() {
        let t = text.trim();
        if open.is_none() && t.starts_with('[') {
            table = t.trim_matches(['[', ']']).trim();
        }
        if i + 1 == line {
            if open.is_some() {
                return None;
            }
            let key = t.split_once('=')?.0.trim();
            let bare = !key.is_empty()
                && key.len() <= 64
                && key
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_');
            return (bare && SECTIONS.contains(&table)).then(|| format!("{table}.{key}"));
        }
        let mut rest = text;
        loop {
            let next = match open {
                Some(quote) => rest.find(quote).map(|at| (at, quote)),
                None => ["\"\"\"", "'''"]
                    .iter()
                    .filter_map(|q| rest.find(q).map(|at| (at, *q)))
                    .min(),
            };
            let Some((at, quote)) = next else { break };
            open = if open.is_some() { None } else { Some(quote) };
            rest = &rest[at + 3..];
        }
    }
    None
}

pub(super) fn figment_issue(e: &figment::Error) -> ConfigIssue {
    let key = if e.path.is_empty() {
        "(file)".to_string()
    } else {
        e.path.join(".")
    };
    let origin = match &e.metadata {
        // Name the variable itself: the admin has to find it in a unit file or a pod spec.
        Some(m) if m.name.contains("environment") => {
            let names = variables_setting(&e.path);
            if names.is_empty() {
                format!(" (from {})", m.name)
            } else {
                format!(" (from environment variable {})", names.join(", "))
            }
        }
        Some(m) => format!(" (from {})", m.name),
        None => String::new(),
    };
    let message = if key.contains("secret") {
        // The value may be quoted in the error ("invalid type: found ..."): never show it.
        "invalid value (not shown: it is a secret)".to_string()
    } else {
        without_source_snippet(&e.kind.to_string())
    };
    ConfigIssue {
        key,
        message: format!("{message}{origin}"),
        fix: None,
    }
}

/// TOML parse errors quote the offending source lines (`21 | client_secret = "..."`), which may
/// hold a secret: keep the position and the explanation, drop the quoted source.
pub(super) fn without_source_snippet(text: &str) -> String {
    let is_snippet = |line: &str| {
        let t = line.trim_start();
        let digits = t.bytes().take_while(u8::is_ascii_digit).count();
        t[digits..].trim_start().starts_with('|')
    };
    text.lines()
        .filter(|l| !is_snippet(l))
        .collect::<Vec<_>>()
        .join("\n")
}
