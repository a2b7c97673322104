//! Validation: every rule in one pass, each problem naming its key, so the admin sees all of
//! them at once (`config`, `check` and `serve` refuse the same things, exit 2).

use super::*;

impl Config {
    /// Parses a configuration from TOML text without touching the environment (tests, fuzzing).
    pub fn from_toml_str(text: &str) -> Result<Config, ConfigError> {
        let credentials = std::env::var_os("CREDENTIALS_DIRECTORY").map(PathBuf::from);
        extract_and_validate(
            &Figment::from(Toml::string(text)),
            credentials.as_deref(),
            Some(text),
        )
        .map_err(|issues| ConfigError::Invalid { file: None, issues })
    }

    /// The networks allowed to connect: the configured list, or loopback only.
    pub fn allowed_networks(&self) -> Vec<IpNet> {
        match &self.smtp.allow_networks {
            Some(nets) => nets.clone(),
            None => loopback_networks(),
        }
    }

    /// Free space below which new mail is refused with 452 4.3.1.
    pub fn min_free_space(&self) -> u64 {
        if self.queue.min_free_space.0 == 0 {
            self.smtp.max_message_size.0.saturating_mul(2)
        } else {
            self.queue.min_free_space.0
        }
    }

    /// Reads `client_secret_file`, or the systemd credential `client_secret`, into `client_secret`.
    pub(super) fn resolve_secrets(
        &mut self,
        credentials: Option<&Path>,
        issues: &mut Vec<ConfigIssue>,
    ) {
        self.queue.resolve_url(issues);
        self.oauth.resolve_secret("", credentials, issues);
        self.resolve_routes(issues);
    }

    /// Every rule in one pass, so the admin sees all problems at once.
    pub(super) fn validate_into(&self, issues: &mut Vec<ConfigIssue>) {
        self.admin.validate_into(issues);
        within(
            issues,
            "service.stop_timeout",
            self.service.stop_timeout,
            bounds::STOP_TIMEOUT,
            duration_text,
        );
        let smtp = &self.smtp;
        if smtp.listen.is_empty() && smtp.listener.is_empty() {
            issues.push(issue(
                "smtp.listen",
                "at least one address (here or in [[smtp.listener]]) is required",
            ));
        }
        smtp.validate_listeners(issues);
        // No accidental open relay: anything but loopback needs an explicit allow-list.
        if smtp.allow_networks.is_none() {
            for addr in smtp.listen.iter().filter(|a| !a.ip().is_loopback()) {
                issues.push(issue(
                    "smtp.allow_networks",
                    format!(
                        "smtp.listen includes the non-loopback address {addr}; set smtp.allow_networks \
                         to the networks that may send mail (the default allows loopback only)"
                    ),
                ));
            }
        }
        if let Some(nets) = &smtp.allow_networks
            && nets.is_empty()
        {
            issues.push(issue(
                "smtp.allow_networks",
                "an empty list would refuse every client",
            ));
        }
        if smtp.hostname.trim().is_empty() || smtp.hostname.contains(char::is_whitespace) {
            issues.push(issue("smtp.hostname", "must be a host name without spaces"));
        }
        within(
            issues,
            "smtp.max_message_size",
            smtp.max_message_size.0,
            bounds::MAX_MESSAGE_SIZE,
            |n| ByteSize(n).to_string(),
        );
        within(
            issues,
            "smtp.max_recipients",
            smtp.max_recipients,
            bounds::MAX_RECIPIENTS,
            |n| n.to_string(),
        );
        within(
            issues,
            "smtp.max_connections",
            smtp.max_connections,
            bounds::MAX_CONNECTIONS,
            |n| n.to_string(),
        );
        within(
            issues,
            "smtp.command_timeout",
            smtp.command_timeout,
            bounds::COMMAND_TIMEOUT,
            duration_text,
        );
        within(
            issues,
            "smtp.data_timeout",
            smtp.data_timeout,
            bounds::DATA_TIMEOUT,
            duration_text,
        );
        within(
            issues,
            "smtp.max_errors",
            smtp.max_errors,
            bounds::MAX_ERRORS,
            |n| n.to_string(),
        );
        within(
            issues,
            "smtp.write_timeout",
            smtp.write_timeout,
            bounds::WRITE_TIMEOUT,
            duration_text,
        );
        within(
            issues,
            "smtp.min_data_rate",
            smtp.min_data_rate,
            bounds::MIN_DATA_RATE,
            |n| n.to_string(),
        );
        match (&smtp.tls_cert_file, &smtp.tls_key_file) {
            (Some(cert), Some(key)) => {
                readable_file(issues, "smtp.tls_cert_file", cert);
                readable_file(issues, "smtp.tls_key_file", key);
            }
            (Some(_), None) => issues.push(issue(
                "smtp.tls_key_file",
                "required when smtp.tls_cert_file is set",
            )),
            (None, Some(_)) => issues.push(issue(
                "smtp.tls_cert_file",
                "required when smtp.tls_key_file is set",
            )),
            (None, None) => {}
        }
        match smtp.auth.as_str() {
            "off" | "accept-any" => {}
            // The same parse serve does, so that `config` and `check` refuse plaintext lines too.
            path => {
                if let Err(e) = crate::inbound::AuthPolicy::from_setting(path) {
                    issues.push(issue("smtp.auth", e));
                }
            }
        }

        let queue = &self.queue;
        if queue.dir.as_os_str().is_empty() {
            issues.push(issue("queue.dir", "must not be empty"));
        }
        queue.validate_backend(issues);
        let d = |v: Duration| humantime::format_duration(v).to_string();
        // Faster retries hammer an upstream that is failing (and count towards Exchange's
        // continuous-error throttle); the tests' 200ms is the fastest anyone needs.
        if queue.retry_min < RETRY_MIN_FLOOR {
            issues.push(issue(
                "queue.retry_min",
                format!(
                    "{} is too short: must be at least {}",
                    d(queue.retry_min),
                    d(RETRY_MIN_FLOOR)
                ),
            ));
        }
        // Longer waits leave a message that may live `max_age` (5 days) a handful of
        // attempts, each up to a day after its cause is gone; RFC 5321 §4.5.4.1 suggests 30m.
        for (key, value) in [
            ("queue.retry_min", queue.retry_min),
            ("queue.retry_max", queue.retry_max),
        ] {
            if value > RETRY_CEILING {
                issues.push(issue(
                    key,
                    format!(
                        "{} is too long: must be at most 24h between two attempts",
                        d(value)
                    ),
                ));
            }
        }
        if queue.retry_max < queue.retry_min {
            issues.push(issue(
                "queue.retry_max",
                format!(
                    "{} must not be shorter than queue.retry_min ({})",
                    d(queue.retry_max),
                    d(queue.retry_min)
                ),
            ));
        }
        within(
            issues,
            "queue.max_age",
            queue.max_age,
            bounds::MAX_AGE,
            duration_text,
        );
        within(
            issues,
            "queue.min_free_space",
            queue.min_free_space.0,
            bounds::MIN_FREE_SPACE,
            |n| ByteSize(n).to_string(),
        );
        if queue.max_age < queue.retry_min {
            issues.push(issue(
                "queue.max_age",
                "must not be shorter than queue.retry_min",
            ));
        }

        if let Some(v) = &self.queue.notify
            && !looks_like_address(v)
        {
            issues.push(issue(
                "queue.notify",
                format!("`{v}` is not an e-mail address"),
            ));
        }
        // Without [[route]] tables the top level is the only route and must name its mailbox;
        // with them it is the default route only when it does.
        if self.oauth.is_configured()
            && self.upstream.mail_account.is_none()
            && self.route.is_empty()
        {
            issues.push(issue(
                "upstream.mail_account",
                "required: the mailbox the relay authenticates as",
            ));
        }
        validate_delivery(&self.upstream, &self.oauth, "", issues);
        self.validate_routes(issues);
        self.sendmail.validate_into(issues);
        if let Err(e) = tracing_subscriber::EnvFilter::try_new(&self.log.level) {
            issues.push(issue(
                "log.level",
                format!("`{}` is not a log filter: {e}", self.log.level),
            ));
        }
    }

    /// The effective configuration as TOML, secrets redacted.
    pub fn to_redacted_toml(&self) -> String {
        toml::to_string_pretty(self).unwrap_or_else(|e| format!("# cannot render: {e}\n"))
    }
}

/// The rules of one route's `[upstream]` and `[oauth]` (the top level with `prefix` empty, a
/// `[[route]]` with `route.NAME.`), each problem naming its key with the prefix.
pub(super) fn validate_delivery(
    up: &UpstreamConfig,
    oauth: &OAuthConfig,
    prefix: &str,
    issues: &mut Vec<ConfigIssue>,
) {
    let k = |key: &str| format!("{prefix}{key}");
    if up.provider != "microsoft365" {
        issues.push(issue(
            &k("upstream.provider"),
            format!(
                "unknown provider `{}` (supported: microsoft365)",
                up.provider
            ),
        ));
    }
    within(issues, &k("upstream.port"), up.port, bounds::PORT, |n| {
        n.to_string()
    });
    if let Some(host) = &up.host
        && let Err(e) = check_host(host)
    {
        issues.push(issue(&k("upstream.host"), e));
    }
    if let Some(ca) = &up.ca_file {
        readable_file(issues, &k("upstream.ca_file"), ca);
    }
    let template = up
        .mail_account
        .as_deref()
        .is_some_and(|m| crate::routes::MailboxSpec::parse(m).is_template());
    for (key, value) in [
        (k("upstream.mail_account"), &up.mail_account),
        (k("upstream.from"), &up.from),
    ] {
        if key == k("upstream.mail_account") && template {
            continue;
        }
        if let Some(v) = value
            && !looks_like_address(v)
        {
            issues.push(issue(&key, format!("`{v}` is not an e-mail address")));
        }
    }
    within(
        issues,
        &k("upstream.connections"),
        up.connections,
        match up.transport {
            TransportKind::Smtp => bounds::CONNECTIONS,
            TransportKind::Graph => bounds::GRAPH_CONNECTIONS,
        },
        |n| n.to_string(),
    );
    if up.graph_large_messages && up.transport != TransportKind::Graph {
        // An error, not a warning: a key that silently does nothing misleads.
        issues.push(issue(
            &k("upstream.graph_large_messages"),
            format!(
                "applies only to {prefix}upstream.transport = \"graph\" (SMTP takes messages up \
                 to smtp.max_message_size without it); remove it or set transport = \"graph\""
            ),
        ));
    }
    if let Some(url) = &up.graph_url
        && let Err(e) = check_token_url(url)
    {
        issues.push(issue(&k("upstream.graph_url"), e));
    }
    if up.rate.messages == 0 {
        issues.push(issue(&k("upstream.rate"), "must allow at least 1 message"));
    } else if up.rate.per / up.rate.messages < bounds::RATE_MIN_SPACING {
        issues.push(issue(
            &k("upstream.rate"),
            format!(
                "{} is faster than 1000/s, the most the relay paces (Exchange Online allows \
                 30/min per mailbox)",
                up.rate
            ),
        ));
    }

    within(
        issues,
        &k("oauth.refresh_before"),
        oauth.refresh_before,
        bounds::REFRESH_BEFORE,
        duration_text,
    );
    if oauth.is_configured() {
        match &oauth.tenant_id {
            None => issues.push(issue(
                &k("oauth.tenant_id"),
                "required: the Directory (tenant) ID of the app registration",
            )),
            Some(t) => value_rule(issues, prefix, identity::tenant_id(t)),
        }
        match &oauth.client_id {
            None => issues.push(issue(
                &k("oauth.client_id"),
                "required: the Application (client) ID of the app registration",
            )),
            Some(c) => value_rule(issues, prefix, identity::client_id(c)),
        }
        if let Some(secret) = &oauth.client_secret {
            value_rule(issues, prefix, identity::client_secret(secret.expose()));
        }
        let credentials = [
            oauth.client_secret.is_some(),
            oauth.certificate_file.is_some() || oauth.private_key_file.is_some(),
            oauth.assertion_file.is_some(),
        ];
        match credentials.iter().filter(|c| **c).count() {
            0 => issues.push(issue(
                &k("oauth.client_secret"),
                "required: a client secret (client_secret or client_secret_file), a certificate \
                 (certificate_file + private_key_file) or a federated assertion_file",
            )),
            1 => {}
            _ => issues.push(issue(
                &k("oauth.client_secret"),
                "set exactly one credential: client secret, certificate or assertion_file",
            )),
        }
        match (&oauth.certificate_file, &oauth.private_key_file) {
            (Some(c), Some(key)) => {
                readable_file(issues, &k("oauth.certificate_file"), c);
                readable_file(issues, &k("oauth.private_key_file"), key);
            }
            (Some(_), None) => issues.push(issue(
                &k("oauth.private_key_file"),
                "required when oauth.certificate_file is set",
            )),
            (None, Some(_)) => issues.push(issue(
                &k("oauth.certificate_file"),
                "required when oauth.private_key_file is set",
            )),
            (None, None) => {}
        }
        if let Some(a) = &oauth.assertion_file {
            readable_file(issues, &k("oauth.assertion_file"), a);
        }
    }
    if let Some(url) = &oauth.token_url
        && let Err(e) = check_token_url(url)
    {
        issues.push(issue(&k("oauth.token_url"), e));
    }
    if let Some(scope) = &oauth.scope
        && let Err(e) = check_scope(scope)
    {
        issues.push(issue(&k("oauth.scope"), e));
    }
}

impl OAuthConfig {
    /// Reads `client_secret_file`, or the systemd credential `client_secret` (`credentials`:
    /// the top level only), into `client_secret`. `prefix` names a route's keys.
    pub(super) fn resolve_secret(
        &mut self,
        prefix: &str,
        credentials: Option<&Path>,
        issues: &mut Vec<ConfigIssue>,
    ) {
        let k = |key: &str| format!("{prefix}{key}");
        let oauth = self;
        if oauth.client_secret.is_some() && oauth.client_secret_file.is_some() {
            issues.push(issue(
                &k("oauth.client_secret_file"),
                format!(
                    "set either {0}oauth.client_secret or {0}oauth.client_secret_file, not both",
                    prefix
                ),
            ));
            return;
        }
        let file = oauth.client_secret_file.clone().or_else(|| {
            // systemd's LoadCredential=client_secret:... (only when nothing else provides a credential)
            let no_other = oauth.client_secret.is_none()
                && oauth.certificate_file.is_none()
                && oauth.assertion_file.is_none();
            credentials
                .map(|d| d.join("client_secret"))
                .filter(|p| no_other && p.is_file())
        });
        if let Some(path) = file {
            match std::fs::read_to_string(&path) {
                Ok(text) => {
                    let value = text.trim_end_matches(['\r', '\n']);
                    if value.is_empty() {
                        issues.push(issue(
                            &k("oauth.client_secret_file"),
                            format!("{} is empty", path.display()),
                        ));
                    } else {
                        oauth.client_secret = Some(Secret::new(value));
                        oauth.client_secret_source = Some(path);
                    }
                }
                Err(e) => issues.push(issue(
                    &k("oauth.client_secret_file"),
                    format!("cannot read {}: {e}", path.display()),
                )),
            }
        }
    }
}

impl SendmailConfig {
    pub(super) fn validate_into(&self, issues: &mut Vec<ConfigIssue>) {
        if let Some(d) = &self.default_domain
            && !looks_like_address(&format!("root@{d}"))
        {
            issues.push(issue(
                "sendmail.default_domain",
                format!("`{d}` is not a domain (e.g. contoso.com)"),
            ));
        }
        for (name, target) in &self.aliases {
            let key = format!("sendmail.aliases.{name}");
            if name.is_empty() || name.contains(['@', ' ', '<', '>']) {
                issues.push(issue(
                    &key,
                    "an alias is a local name such as root or \"*\"",
                ));
            }
            if target.addresses().is_empty() {
                issues.push(issue(&key, "needs at least one address"));
            }
            for a in target.addresses() {
                if !looks_like_address(a) {
                    issues.push(issue(&key, format!("`{a}` is not an e-mail address")));
                }
            }
        }
        if let Some(d) = &self.drop_dir
            && !d.is_absolute()
        {
            issues.push(issue(
                "sendmail.drop_dir",
                "must be an absolute path (sendmail runs from any directory)",
            ));
        }
    }
}

/// `https://` always; plain `http://` only for a loopback host (simulators, tests). The host is
/// the one the HTTP client connects to: the URL is parsed with the parser reqwest uses, and user
/// information (`user:password@` before the host) is refused, since `http://localhost:1@192.0.2.10/`
/// reads like loopback but connects to 192.0.2.10. Messages show the URL without its user
/// information and query, which may hold secrets.
pub fn check_token_url(url: &str) -> Result<(), String> {
    let parsed = parse_url_key(url)?;
    match parsed.scheme() {
        "https" => Ok(()),
        "http" if is_loopback_host(&parsed) => Ok(()),
        "http" => Err(format!(
            "`{}` must use https:// (plain http is allowed only for a loopback host)",
            shown_url(&parsed)
        )),
        _ => Err(format!("`{}` is not an http(s) URL", shown_url(&parsed))),
    }
}

impl QueueConfig {
    /// Reads `url_file` into `url`.
    pub(super) fn resolve_url(&mut self, issues: &mut Vec<ConfigIssue>) {
        let Some(path) = self.url_file.clone() else {
            return;
        };
        if self.url.is_some() {
            issues.push(issue(
                "queue.url_file",
                "set either queue.url or queue.url_file, not both",
            ));
            return;
        }
        match std::fs::read_to_string(&path) {
            Ok(text) => {
                let value = text.trim();
                if value.is_empty() {
                    issues.push(issue(
                        "queue.url_file",
                        format!("{} is empty", path.display()),
                    ));
                } else {
                    self.url = Some(DbUrl::new(value));
                }
            }
            Err(e) => issues.push(issue(
                "queue.url_file",
                format!("cannot read {}: {e}", path.display()),
            )),
        }
    }

    pub(super) fn validate_backend(&self, issues: &mut Vec<ConfigIssue>) {
        within(
            issues,
            "queue.lease",
            self.lease,
            bounds::LEASE,
            duration_text,
        );
        let key = if self.url_file.is_some() {
            "queue.url_file"
        } else {
            "queue.url"
        };
        match (self.backend, &self.url) {
            (Backend::Files, Some(_)) => {
                issues.push(issue(key, "only used with queue.backend = \"postgres\""))
            }
            (Backend::Files, None) => {}
            (Backend::Postgres, None) => {
                if self.url_file.is_none() {
                    issues.push(issue(
                        "queue.url",
                        "required with queue.backend = \"postgres\" (or queue.url_file)",
                    ))
                }
            }
            (Backend::Postgres, Some(url)) => {
                if let Err(e) = check_db_url(url.expose()) {
                    issues.push(issue(key, e));
                }
            }
        }
        if let Some(ca) = &self.ca_file {
            readable_file(issues, "queue.ca_file", ca);
        }
    }
}

/// `queue.url`: `postgres://` with a host, a known `sslmode`, and TLS for anything but a
/// loopback host. Messages never quote the URL (it may hold the password).
pub fn check_db_url(text: &str) -> Result<(), String> {
    let parsed =
        url::Url::parse(text.trim()).map_err(|e| format!("is not a postgres:// URL ({e})"))?;
    if !matches!(parsed.scheme(), "postgres" | "postgresql") {
        return Err(format!(
            "must be a postgres:// URL, not {}://",
            parsed.scheme()
        ));
    }
    if parsed.host().is_none() {
        return Err("names no host (a Unix socket path is not supported)".into());
    }
    let mode = parsed
        .query_pairs()
        .find(|(k, _)| k == "sslmode")
        .map(|(_, v)| v.into_owned());
    match mode.as_deref() {
        None | Some("require") => Ok(()),
        Some("disable" | "prefer") if is_loopback_host(&parsed) => Ok(()),
        Some(m @ ("disable" | "prefer")) => Err(format!(
            "sslmode={m} is allowed only for a loopback host: the password and the mail would \
             cross the network in clear (use sslmode=require, the default)"
        )),
        Some(other) => Err(format!(
            "sslmode={other} is not supported (disable, prefer or require; certificates are \
             always verified when TLS is used)"
        )),
    }
}

/// A URL-valued key: parsed, with a host, and without user information.
pub(super) fn parse_url_key(url: &str) -> Result<url::Url, String> {
    // The parser's message never quotes the value, and neither does this one.
    let parsed = url::Url::parse(url.trim()).map_err(|e| format!("is not a URL ({e})"))?;
    if parsed.host().is_none() {
        return Err(format!("`{}` names no host", shown_url(&parsed)));
    }
    if !parsed.username().is_empty() || parsed.password().is_some() {
        return Err(format!(
            "must not contain user information (`...@` before the host): the connection would go \
             to {}, not to what precedes the `@`",
            parsed.host_str().unwrap_or("?")
        ));
    }
    Ok(parsed)
}

/// `oauth.scope` when it is a URL (`https://outlook.office365.com/.default`): no user
/// information. Other scope forms (`api://...` with a GUID, a bare GUID) are left to Entra.
pub(super) fn check_scope(scope: &str) -> Result<(), String> {
    match url::Url::parse(scope.trim()) {
        Ok(u) if !u.username().is_empty() || u.password().is_some() => Err(
            "must not contain user information (`...@` before the host): a scope names a \
             resource, e.g. https://outlook.office365.com/.default"
                .into(),
        ),
        _ => Ok(()),
    }
}

pub(super) fn is_loopback_host(url: &url::Url) -> bool {
    match url.host() {
        // postgres:// is not a special scheme: the parser leaves an IPv4 host as a name.
        Some(url::Host::Domain(d)) => {
            d.eq_ignore_ascii_case("localhost")
                || d.parse::<IpAddr>().is_ok_and(|ip| ip.is_loopback())
        }
        Some(url::Host::Ipv4(ip)) => ip.is_loopback(),
        Some(url::Host::Ipv6(ip)) => ip.is_loopback(),
        None => false,
    }
}

/// `scheme://host[:port]/path`: what a URL is, without the parts that may hold a secret.
pub(super) fn shown_url(url: &url::Url) -> String {
    let mut shown = format!("{}://{}", url.scheme(), url.host_str().unwrap_or(""));
    if let Some(port) = url.port() {
        shown.push_str(&format!(":{port}"));
    }
    shown.push_str(url.path());
    shown
}

/// `upstream.host`: a host name or an IP address, nothing around it (no scheme, port or `@`).
pub(super) fn check_host(host: &str) -> Result<(), String> {
    if host.parse::<IpAddr>().is_ok() {
        return Ok(());
    }
    match url::Host::parse(host) {
        Ok(url::Host::Domain(_)) if !host.contains(['@', ':', '/']) => Ok(()),
        _ => Err(
            "must be a host name or an IP address, without scheme, port (see upstream.port) or \
             user information"
                .into(),
        ),
    }
}

/// Refuses `value` outside `bound`, naming the range and its reason.
pub(super) fn within<T: PartialOrd + Copy>(
    issues: &mut Vec<ConfigIssue>,
    key: &str,
    value: T,
    bound: bounds::Bound<T>,
    show: impl Fn(T) -> String,
) {
    if value < bound.min || value > bound.max {
        issues.push(issue(
            key,
            format!(
                "{} is outside {}..={} ({})",
                show(value),
                show(bound.min),
                show(bound.max),
                bound.why
            ),
        ));
    }
}

pub(super) fn duration_text(d: Duration) -> String {
    humantime::format_duration(d).to_string()
}

/// A rule of [`identity`] as a configuration issue: what is wrong, then the fix.
pub(super) fn value_rule(
    issues: &mut Vec<ConfigIssue>,
    prefix: &str,
    rule: Result<(), identity::ValueProblem>,
) {
    if let Err(p) = rule {
        issues.push(ConfigIssue {
            key: format!("{prefix}{}", p.key),
            message: p.what,
            fix: Some(p.fix),
        });
    }
}

pub(super) fn issue(key: &str, message: impl Into<String>) -> ConfigIssue {
    ConfigIssue {
        key: key.to_string(),
        message: message.into(),
        fix: None,
    }
}

pub(super) fn readable_file(issues: &mut Vec<ConfigIssue>, key: &str, path: &Path) {
    if let Err(e) = std::fs::File::open(path) {
        issues.push(issue(key, format!("cannot read {}: {e}", path.display())));
    }
}
