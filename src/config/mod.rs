//! `relay.toml`: the schema, its defaults, loading (defaults → file → `RELAY_*` environment) and
//! validation that reports every problem at once, each naming its key.
//!
//! The annotated `relay.toml` at the repository root documents every key; keep the two in step.

pub mod identity;
pub use identity::looks_like_address;

use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use figment::Figment;
use figment::providers::{Env, Format, Toml};
use ipnet::IpNet;
use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// Where `serve`, `config`, `queue` and `check` look for the configuration when `--config` is absent.
pub const CONFIG_ENV: &str = "RELAY_CONFIG";
pub const SYSTEM_CONFIG: &str = "/etc/smtp-oauth-relay/relay.toml";
/// Prefix of environment overrides: `RELAY_SMTP__MAX_RECIPIENTS=100` sets `smtp.max_recipients`.
pub const ENV_PREFIX: &str = "RELAY_";

const MIB: u64 = 1024 * 1024;

/// Shortest `queue.retry_min`.
pub const RETRY_MIN_FLOOR: Duration = Duration::from_millis(100);
/// Longest `queue.retry_min` and `queue.retry_max`: a day between two attempts.
pub const RETRY_CEILING: Duration = Duration::from_secs(24 * 3600);

#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    pub smtp: SmtpConfig,
    pub queue: QueueConfig,
    pub upstream: UpstreamConfig,
    pub oauth: OAuthConfig,
    pub admin: AdminConfig,
    pub log: LogConfig,
    pub service: ServiceConfig,
    pub sendmail: SendmailConfig,
}

/// The local listener that legacy applications talk to.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct SmtpConfig {
    pub listen: Vec<SocketAddr>,
    /// Name used in the greeting, the EHLO reply and the Received header.
    pub hostname: String,
    pub max_message_size: ByteSize,
    pub max_recipients: usize,
    pub max_connections: usize,
    /// Clients allowed to connect. `None` means loopback only; see `Config::allowed_networks`.
    pub allow_networks: Option<Vec<IpNet>>,
    #[serde(with = "humantime_serde")]
    pub command_timeout: Duration,
    #[serde(with = "humantime_serde")]
    pub data_timeout: Duration,
    /// How long one batch of replies may take to reach a client that does not read.
    #[serde(with = "humantime_serde")]
    pub write_timeout: Duration,
    /// Bytes per second a DATA/BDAT transfer must keep up, beyond `data_timeout` of slack.
    pub min_data_rate: u64,
    /// Replies of class 4xx/5xx a client may provoke before it is disconnected with 421.
    pub max_errors: u32,
    pub tls_cert_file: Option<PathBuf>,
    pub tls_key_file: Option<PathBuf>,
    /// `"off"`, `"accept-any"`, or the path of a users file (`user:password` per line).
    pub auth: String,
}

impl Default for SmtpConfig {
    fn default() -> Self {
        SmtpConfig {
            listen: vec![SocketAddr::from(([127, 0, 0, 1], 2525))],
            hostname: default_hostname(),
            // Exchange Online's default maximum send size for a mailbox.
            max_message_size: ByteSize(35 * MIB),
            max_recipients: 500,
            max_connections: 100,
            allow_networks: None,
            // RFC 5321 §4.5.3.2.7: a server SHOULD wait at least 5 minutes for the next command.
            command_timeout: Duration::from_secs(300),
            // RFC 5321 §4.5.3.2.5: 3 minutes per data block.
            data_timeout: Duration::from_secs(180),
            // Postfix bounds each write with smtpd_timeout (300s); a client whose buffers are
            // full and that has read nothing for a minute is not coming back.
            write_timeout: Duration::from_secs(60),
            // Postfix smtpd_min_data_rate: 500 bytes/s.
            min_data_rate: 500,
            max_errors: 10,
            tls_cert_file: None,
            tls_key_file: None,
            auth: "off".into(),
        }
    }
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct QueueConfig {
    pub dir: PathBuf,
    /// A message still undelivered after this long is failed (RFC 5321 §4.5.4.1: 4-5 days).
    #[serde(with = "humantime_serde")]
    pub max_age: Duration,
    #[serde(with = "humantime_serde")]
    pub retry_min: Duration,
    #[serde(with = "humantime_serde")]
    pub retry_max: Duration,
    /// Refuse new mail with `452 4.3.1` when the spool's filesystem has less free space than this.
    /// `0` means automatic: twice `smtp.max_message_size`.
    pub min_free_space: ByteSize,
    /// Where a delivery status report goes when a message fails for good or expires.
    pub notify: Option<String>,
    /// Where messages live: this host's spool directory, or a PostgreSQL database shared by
    /// several relays.
    pub backend: Backend,
    /// The database (`backend = "postgres"`), as a `postgres://` URL. Holds the password:
    /// never printed (see [`DbUrl`]).
    pub url: Option<DbUrl>,
    /// A file holding `url` (read at load, like `oauth.client_secret_file`).
    pub url_file: Option<PathBuf>,
    /// Extra PEM roots to trust for the database's certificate (a private CA).
    pub ca_file: Option<PathBuf>,
    /// How long a claim lives without renewal before another relay may take the message.
    #[serde(with = "humantime_serde")]
    pub lease: Duration,
}

/// `queue.backend`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Backend {
    #[default]
    Files,
    Postgres,
}

/// A database URL. `Debug` and `Serialize` show it with the password replaced, so `config`
/// output, logs and errors never carry it.
#[derive(Clone, PartialEq, Eq, Deserialize)]
#[serde(transparent)]
pub struct DbUrl(String);

impl DbUrl {
    pub fn new(value: impl Into<String>) -> Self {
        DbUrl(value.into())
    }
    /// The URL with its password, for the connection only.
    pub fn expose(&self) -> &str {
        &self.0
    }
    /// The URL with the password (and any `password=` parameter) replaced by `<redacted>`.
    pub fn shown(&self) -> String {
        match url::Url::parse(self.0.trim()) {
            Ok(mut u) => {
                if u.password().is_some() {
                    let _ = u.set_password(Some("redacted"));
                }
                let pairs: Vec<(String, String)> = u
                    .query_pairs()
                    .map(|(k, v)| {
                        let v = if k.eq_ignore_ascii_case("password") {
                            "redacted".to_string()
                        } else {
                            v.into_owned()
                        };
                        (k.into_owned(), v)
                    })
                    .collect();
                if !pairs.is_empty() {
                    u.query_pairs_mut().clear().extend_pairs(pairs);
                }
                u.to_string()
            }
            // Not a URL: nothing is known about where a password might be.
            Err(_) => "<redacted>".to_string(),
        }
    }
}

impl fmt::Debug for DbUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.shown())
    }
}

impl Serialize for DbUrl {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.shown())
    }
}

impl Default for QueueConfig {
    fn default() -> Self {
        QueueConfig {
            dir: default_queue_dir(),
            max_age: Duration::from_secs(5 * 24 * 3600),
            retry_min: Duration::from_secs(60),
            retry_max: Duration::from_secs(3600),
            min_free_space: ByteSize(0),
            notify: None,
            backend: Backend::Files,
            url: None,
            url_file: None,
            ca_file: None,
            lease: Duration::from_secs(120),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Cloud {
    Global,
    GccHigh,
    Dod,
    China,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum UpstreamTls {
    Starttls,
    Implicit,
}

/// How messages reach Microsoft 365.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum TransportKind {
    /// SMTP client submission with `AUTH XOAUTH2` (needs SMTP AUTH enabled for the mailbox).
    Smtp,
    /// Microsoft Graph `sendMail` with the MIME message (needs no SMTP AUTH).
    Graph,
}

/// Graph has no envelope: what to do with a message whose To/Cc/Bcc name addresses that are not
/// among its envelope recipients (Graph would deliver to them too).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum ExtraRecipients {
    /// Fail the message (kept in failed/, notice sent): nobody gets mail the client did not address.
    Refuse,
    /// Warn and send: the header recipients outside the envelope get the message too.
    Send,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum RewriteFrom {
    /// Replace a header From the mailbox may not send as with `from`, keeping the original in Reply-To.
    WhenDifferent,
    /// Always replace the header From with `from`.
    Always,
    /// Never touch the header From (Exchange refuses mail the mailbox may not send as).
    Never,
}

/// `smtp-oauth-relay sendmail` (cron, PHP `mail()`, system tools): how local names become
/// addresses and where a message waits while the relay is not running.
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct SendmailConfig {
    /// Qualifies a bare name (`root`, `www-data`) that no alias maps.
    pub default_domain: Option<String>,
    /// Local name → address(es); the key `"*"` catches every other local name.
    pub aliases: std::collections::BTreeMap<String, AliasTarget>,
    /// The drop directory: where `sendmail` stores a message durably while the relay does not
    /// run (the relay takes it in at start and while running). Default: inside `queue.dir`.
    pub drop_dir: Option<PathBuf>,
}

/// One alias: a single address or a list.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(untagged)]
pub enum AliasTarget {
    One(String),
    Many(Vec<String>),
}

impl AliasTarget {
    pub fn addresses(&self) -> &[String] {
        match self {
            AliasTarget::One(a) => std::slice::from_ref(a),
            AliasTarget::Many(list) => list,
        }
    }
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct UpstreamConfig {
    pub provider: String,
    pub cloud: Cloud,
    pub transport: TransportKind,
    /// Microsoft Graph root for `transport = "graph"`; derived from `cloud` when unset.
    pub graph_url: Option<String>,
    pub graph_extra_recipients: ExtraRecipients,
    /// Derived from `cloud` when unset.
    pub host: Option<String>,
    pub port: u16,
    pub tls: UpstreamTls,
    /// Extra PEM roots trusted in addition to the system's.
    pub ca_file: Option<PathBuf>,
    /// Name the server certificate must carry when `host` is an address (tests, simulators).
    pub tls_server_name: Option<String>,
    pub mail_account: Option<String>,
    pub from: Option<String>,
    pub rewrite_from: RewriteFrom,
    pub connections: usize,
    pub rate: Rate,
}

impl Default for UpstreamConfig {
    fn default() -> Self {
        UpstreamConfig {
            provider: "microsoft365".into(),
            cloud: Cloud::Global,
            transport: TransportKind::Smtp,
            graph_url: None,
            graph_extra_recipients: ExtraRecipients::Refuse,
            host: None,
            port: 587,
            tls: UpstreamTls::Starttls,
            ca_file: None,
            tls_server_name: None,
            mail_account: None,
            from: None,
            rewrite_from: RewriteFrom::WhenDifferent,
            // Exchange Online allows 3 concurrent SMTP connections per mailbox.
            connections: 3,
            // Exchange Online allows 30 messages per minute per mailbox.
            rate: Rate {
                messages: 30,
                per: Duration::from_secs(60),
            },
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
pub enum AssertionAlg {
    PS256,
    RS256,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct OAuthConfig {
    pub tenant_id: Option<String>,
    pub client_id: Option<String>,
    pub client_secret: Option<Secret>,
    pub client_secret_file: Option<PathBuf>,
    /// The file `client_secret` was read from at load (`client_secret_file`, or the systemd
    /// credential): the token client reads it again at every request, so a rotated secret
    /// (a Kubernetes Secret, a new credential) needs no signal. Not a key.
    #[serde(skip)]
    pub client_secret_source: Option<PathBuf>,
    pub certificate_file: Option<PathBuf>,
    pub private_key_file: Option<PathBuf>,
    pub assertion_alg: AssertionAlg,
    /// A federated token (e.g. `AZURE_FEDERATED_TOKEN_FILE`), re-read on every request.
    pub assertion_file: Option<PathBuf>,
    /// Derived from `upstream.cloud` and `tenant_id` when unset.
    pub token_url: Option<String>,
    pub scope: Option<String>,
    /// Refresh the token at the latest this long before it expires.
    #[serde(with = "humantime_serde")]
    pub refresh_before: Duration,
}

impl Default for OAuthConfig {
    fn default() -> Self {
        OAuthConfig {
            tenant_id: None,
            client_id: None,
            client_secret: None,
            client_secret_file: None,
            client_secret_source: None,
            certificate_file: None,
            private_key_file: None,
            assertion_alg: AssertionAlg::PS256,
            assertion_file: None,
            token_url: None,
            scope: None,
            // Some Microsoft endpoints refuse tokens in their last 10 minutes.
            refresh_before: Duration::from_secs(600),
        }
    }
}

impl OAuthConfig {
    /// True when any identity key is set: the relay is then expected to deliver, and every
    /// required key must be present.
    pub fn is_configured(&self) -> bool {
        self.tenant_id.is_some()
            || self.client_id.is_some()
            || self.client_secret.is_some()
            || self.client_secret_file.is_some()
            || self.certificate_file.is_some()
            || self.assertion_file.is_some()
    }
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct AdminConfig {
    pub listen: Option<SocketAddr>,
    /// Admin connections open at once; more are closed at once (probes need a handful).
    pub max_connections: usize,
    /// A connection that has not sent a whole request head by then is closed (also the idle
    /// limit between keep-alive requests).
    #[serde(with = "humantime_serde")]
    pub header_timeout: Duration,
}

/// Bounds of `admin.max_connections`: SMTP's file descriptors come first (see `fds`).
pub const ADMIN_MAX_CONNECTIONS: std::ops::RangeInclusive<usize> = 1..=1024;
/// Bounds of `admin.header_timeout`: a probe's request arrives in milliseconds.
pub const ADMIN_HEADER_TIMEOUT: std::ops::RangeInclusive<Duration> =
    Duration::from_millis(100)..=Duration::from_secs(300);

impl Default for AdminConfig {
    fn default() -> Self {
        AdminConfig {
            listen: None,
            max_connections: 64,
            header_timeout: Duration::from_secs(10),
        }
    }
}

impl AdminConfig {
    fn validate_into(&self, issues: &mut Vec<ConfigIssue>) {
        if !ADMIN_MAX_CONNECTIONS.contains(&self.max_connections) {
            issues.push(issue(
                "admin.max_connections",
                format!(
                    "{} is outside {}..={}: each connection holds a file descriptor SMTP may need",
                    self.max_connections,
                    ADMIN_MAX_CONNECTIONS.start(),
                    ADMIN_MAX_CONNECTIONS.end()
                ),
            ));
        }
        if !ADMIN_HEADER_TIMEOUT.contains(&self.header_timeout) {
            issues.push(issue(
                "admin.header_timeout",
                format!(
                    "{} is outside 100ms..=5m: longer lets idle clients hold connections",
                    humantime::format_duration(self.header_timeout)
                ),
            ));
        }
    }
}

/// How the relay runs under a service manager (systemd, a container runtime).
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct ServiceConfig {
    /// From SIGTERM to exit, at most: sessions in DATA, delivery attempts in flight and the
    /// upstream QUITs share this one budget. Keep it below the manager's limit (systemd
    /// `TimeoutStopSec=30s`, Kubernetes `terminationGracePeriodSeconds` 30, `docker stop` 10 s).
    #[serde(with = "humantime_serde")]
    pub stop_timeout: Duration,
}

impl Default for ServiceConfig {
    fn default() -> Self {
        ServiceConfig {
            stop_timeout: Duration::from_secs(25),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct LogConfig {
    pub format: LogFormat,
    /// A tracing filter: `info`, `debug`, or per module (`info,smtp_oauth_relay::inbound=debug`).
    pub level: String,
}

impl Default for LogConfig {
    fn default() -> Self {
        LogConfig {
            format: LogFormat::Text,
            level: "info".into(),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Value types

/// A secret (client secret). Never printed: `Debug`, `Display` and `Serialize` all redact it.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    pub fn new(value: impl Into<String>) -> Self {
        Secret(value.into())
    }
    /// The only way to read the value; grep for it when auditing where secrets go.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("<redacted>")
    }
}

impl Serialize for Secret {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str("<redacted>")
    }
}

impl<'de> Deserialize<'de> for Secret {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        // figment types environment values: a numeric secret arrives as a number.
        Ok(Secret(ScalarString::deserialize(d)?.0))
    }
}

/// Accepts any scalar (string, integer, float, bool) as its text.
struct ScalarString(String);

impl<'de> Deserialize<'de> for ScalarString {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl serde::de::Visitor<'_> for V {
            type Value = ScalarString;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a string")
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<ScalarString, E> {
                Ok(ScalarString(v.to_owned()))
            }
            fn visit_i64<E: serde::de::Error>(self, v: i64) -> Result<ScalarString, E> {
                Ok(ScalarString(v.to_string()))
            }
            fn visit_u64<E: serde::de::Error>(self, v: u64) -> Result<ScalarString, E> {
                Ok(ScalarString(v.to_string()))
            }
            fn visit_f64<E: serde::de::Error>(self, v: f64) -> Result<ScalarString, E> {
                Ok(ScalarString(v.to_string()))
            }
            fn visit_bool<E: serde::de::Error>(self, v: bool) -> Result<ScalarString, E> {
                Ok(ScalarString(v.to_string()))
            }
        }
        d.deserialize_any(V)
    }
}

/// A size in bytes: an integer, or a string such as `"35MiB"`, `"10 MB"`, `"512k"`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct ByteSize(pub u64);

impl ByteSize {
    pub fn parse(text: &str) -> Result<ByteSize, String> {
        let t = text.trim();
        let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
        let (num, unit) = t.split_at(split);
        let n: u64 = num
            .parse()
            .map_err(|_| format!("`{text}` is not a size (e.g. 35MiB, 10MB, 1048576)"))?;
        let mult: u64 = match unit.trim().to_ascii_lowercase().as_str() {
            "" | "b" => 1,
            "k" | "kb" => 1000,
            "kib" => 1024,
            "m" | "mb" => 1_000_000,
            "mib" => MIB,
            "g" | "gb" => 1_000_000_000,
            "gib" => 1024 * MIB,
            other => return Err(format!("unknown size unit `{other}` in `{text}`")),
        };
        n.checked_mul(mult)
            .map(ByteSize)
            .ok_or_else(|| format!("`{text}` is too large"))
    }
}

impl fmt::Display for ByteSize {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.0 != 0 && self.0.is_multiple_of(MIB) {
            write!(f, "{}MiB", self.0 / MIB)
        } else {
            write!(f, "{}", self.0)
        }
    }
}

impl Serialize for ByteSize {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.to_string())
    }
}

impl<'de> Deserialize<'de> for ByteSize {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = ScalarString::deserialize(d)?.0;
        ByteSize::parse(&text).map_err(serde::de::Error::custom)
    }
}

/// A delivery rate such as `"30/min"`, `"2/s"` or `"1000/h"`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rate {
    pub messages: u32,
    pub per: Duration,
}

impl Rate {
    pub fn parse(text: &str) -> Result<Rate, String> {
        let bad = || format!("`{text}` is not a rate (e.g. 30/min, 2/s, 1000/h)");
        let (n, unit) = text.split_once('/').ok_or_else(bad)?;
        let messages: u32 = n.trim().parse().map_err(|_| bad())?;
        let per = match unit.trim() {
            "s" | "sec" | "second" => Duration::from_secs(1),
            "m" | "min" | "minute" => Duration::from_secs(60),
            "h" | "hour" => Duration::from_secs(3600),
            _ => return Err(bad()),
        };
        Ok(Rate { messages, per })
    }
}

impl fmt::Display for Rate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let unit = match self.per.as_secs() {
            1 => "s",
            3600 => "h",
            _ => "min",
        };
        write!(f, "{}/{}", self.messages, unit)
    }
}

impl Serialize for Rate {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.to_string())
    }
}

impl<'de> Deserialize<'de> for Rate {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        Rate::parse(&text).map_err(serde::de::Error::custom)
    }
}

// ---------------------------------------------------------------------------------------------
// Loading

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

fn source_suffix(source: &Option<PathBuf>) -> String {
    source
        .as_ref()
        .map(|p| format!(" in {}", p.display()))
        .unwrap_or_default()
}

fn join_issues(issues: &[ConfigIssue]) -> String {
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
    // The TLS key and the users file are the listener's, and may be unreadable to the caller.
    let theirs = ["smtp.tls_cert_file", "smtp.tls_key_file", "smtp.auth"];
    let mine = |i: &ConfigIssue| {
        i.key.is_empty()
            || (["smtp.", "queue.", "sendmail."]
                .iter()
                .any(|p| i.key.starts_with(p))
                && !theirs.contains(&i.key.as_str()))
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
fn extract_and_validate(
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
fn keys_overlap(a: &str, b: &str) -> bool {
    let within = |long: &str, short: &str| {
        long.strip_prefix(short)
            .is_some_and(|rest| rest.is_empty() || rest.starts_with('.'))
    };
    within(a, b) || within(b, a)
}

/// Extracts a [`Config`], collecting the type errors of every key (see [`extract_and_validate`]).
/// Returns no config only when the sources themselves cannot be read (e.g. TOML syntax).
fn extract_all(figment: &Figment, source: Option<&str>) -> (Option<Config>, Vec<ConfigIssue>) {
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
fn find_origin<'a>(figment: &'a Figment, path: &[String]) -> Option<&'a figment::Metadata> {
    (1..=path.len())
        .rev()
        .find_map(|n| figment.find_metadata(&path[..n].join(".")))
}

/// Removes the key at `path` from `dict`; a path into an array removes the whole array.
fn remove_key(dict: &mut figment::value::Dict, path: &[String]) -> bool {
    use figment::value::Value;
    let Some((first, rest)) = path.split_first() else {
        return false;
    };
    if rest.is_empty() {
        return dict.remove(first).is_some();
    }
    match dict.get_mut(first) {
        Some(Value::Dict(_, inner)) => remove_key(inner, rest) || dict.remove(first).is_some(),
        Some(_) => dict.remove(first).is_some(),
        None => false,
    }
}

/// The relay's variables are `RELAY_<SECTION>__<KEY>`: the double underscore marks them.
/// Everything else with the prefix belongs to someone else and is ignored: Kubernetes injects
/// `RELAY_PORT`, `RELAY_SERVICE_HOST`, `RELAY_SERVICE_PORT_SMTP`, ... for a Service named
/// `relay` (its names never hold `__`), `RELAY_CONFIG` names the file and `RELAY_FAILPOINT` arms
/// a test crash point (src/failpoint.rs). A typo with the double underscore
/// (`RELAY_OAUTH__CLIENT_IDD`) is still the relay's, and an error naming the variable.
fn env_provider() -> Env {
    Env::prefixed(ENV_PREFIX)
        .filter(|rest| is_key_variable(rest.as_str()))
        .split("__")
}

fn is_key_variable(after_prefix: &str) -> bool {
    after_prefix.contains("__")
}

/// The key path a variable of ours sets: `RELAY_OAUTH__CLIENT_ID` → `oauth.client_id`.
fn variable_key(name: &str) -> Option<String> {
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
fn variables_setting(path: &[String]) -> Vec<String> {
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
fn figment_issues(error: figment::Error, source: Option<&str>) -> Vec<ConfigIssue> {
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
fn key_of_error_line(source: &str, message: &str) -> Option<String> {
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

fn figment_issue(e: &figment::Error) -> ConfigIssue {
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
fn without_source_snippet(text: &str) -> String {
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
    fn resolve_secrets(&mut self, credentials: Option<&Path>, issues: &mut Vec<ConfigIssue>) {
        self.queue.resolve_url(issues);
        let oauth = &mut self.oauth;
        if oauth.client_secret.is_some() && oauth.client_secret_file.is_some() {
            issues.push(issue(
                "oauth.client_secret_file",
                "set either oauth.client_secret or oauth.client_secret_file, not both",
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
                            "oauth.client_secret_file",
                            format!("{} is empty", path.display()),
                        ));
                    } else {
                        oauth.client_secret = Some(Secret::new(value));
                        oauth.client_secret_source = Some(path);
                    }
                }
                Err(e) => issues.push(issue(
                    "oauth.client_secret_file",
                    format!("cannot read {}: {e}", path.display()),
                )),
            }
        }
    }

    /// Every rule in one pass, so the admin sees all problems at once.
    fn validate_into(&self, issues: &mut Vec<ConfigIssue>) {
        self.admin.validate_into(issues);
        within(
            issues,
            "service.stop_timeout",
            self.service.stop_timeout,
            bounds::STOP_TIMEOUT,
            duration_text,
        );
        let smtp = &self.smtp;
        if smtp.listen.is_empty() {
            issues.push(issue("smtp.listen", "at least one address is required"));
        }
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
            path => readable_file(issues, "smtp.auth", Path::new(path)),
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

        let up = &self.upstream;
        if up.provider != "microsoft365" {
            issues.push(issue(
                "upstream.provider",
                format!(
                    "unknown provider `{}` (supported: microsoft365)",
                    up.provider
                ),
            ));
        }
        within(issues, "upstream.port", up.port, bounds::PORT, |n| {
            n.to_string()
        });
        if let Some(host) = &up.host
            && let Err(e) = check_host(host)
        {
            issues.push(issue("upstream.host", e));
        }
        if let Some(ca) = &up.ca_file {
            readable_file(issues, "upstream.ca_file", ca);
        }
        for (key, value) in [
            ("upstream.mail_account", &up.mail_account),
            ("upstream.from", &up.from),
            ("queue.notify", &self.queue.notify),
        ] {
            if let Some(v) = value
                && !looks_like_address(v)
            {
                issues.push(issue(key, format!("`{v}` is not an e-mail address")));
            }
        }
        within(
            issues,
            "upstream.connections",
            up.connections,
            match up.transport {
                TransportKind::Smtp => bounds::CONNECTIONS,
                TransportKind::Graph => bounds::GRAPH_CONNECTIONS,
            },
            |n| n.to_string(),
        );
        if let Some(url) = &up.graph_url
            && let Err(e) = check_token_url(url)
        {
            issues.push(issue("upstream.graph_url", e));
        }
        if up.rate.messages == 0 {
            issues.push(issue("upstream.rate", "must allow at least 1 message"));
        } else if up.rate.per / up.rate.messages < bounds::RATE_MIN_SPACING {
            issues.push(issue(
                "upstream.rate",
                format!(
                    "{} is faster than 1000/s, the most the relay paces (Exchange Online allows \
                     30/min per mailbox)",
                    up.rate
                ),
            ));
        }

        let oauth = &self.oauth;
        within(
            issues,
            "oauth.refresh_before",
            oauth.refresh_before,
            bounds::REFRESH_BEFORE,
            duration_text,
        );
        if oauth.is_configured() {
            match &oauth.tenant_id {
                None => issues.push(issue(
                    "oauth.tenant_id",
                    "required: the Directory (tenant) ID of the app registration",
                )),
                Some(t) => value_rule(issues, identity::tenant_id(t)),
            }
            match &oauth.client_id {
                None => issues.push(issue(
                    "oauth.client_id",
                    "required: the Application (client) ID of the app registration",
                )),
                Some(c) => value_rule(issues, identity::client_id(c)),
            }
            if let Some(secret) = &oauth.client_secret {
                value_rule(issues, identity::client_secret(secret.expose()));
            }
            if up.mail_account.is_none() {
                issues.push(issue(
                    "upstream.mail_account",
                    "required: the mailbox the relay authenticates as",
                ));
            }
            let credentials = [
                oauth.client_secret.is_some(),
                oauth.certificate_file.is_some() || oauth.private_key_file.is_some(),
                oauth.assertion_file.is_some(),
            ];
            match credentials.iter().filter(|c| **c).count() {
                0 => issues.push(issue(
                    "oauth.client_secret",
                    "required: a client secret (client_secret or client_secret_file), a certificate \
                     (certificate_file + private_key_file) or a federated assertion_file",
                )),
                1 => {}
                _ => issues.push(issue(
                    "oauth.client_secret",
                    "set exactly one credential: client secret, certificate or assertion_file",
                )),
            }
            match (&oauth.certificate_file, &oauth.private_key_file) {
                (Some(c), Some(k)) => {
                    readable_file(issues, "oauth.certificate_file", c);
                    readable_file(issues, "oauth.private_key_file", k);
                }
                (Some(_), None) => issues.push(issue(
                    "oauth.private_key_file",
                    "required when oauth.certificate_file is set",
                )),
                (None, Some(_)) => issues.push(issue(
                    "oauth.certificate_file",
                    "required when oauth.private_key_file is set",
                )),
                (None, None) => {}
            }
            if let Some(a) = &oauth.assertion_file {
                readable_file(issues, "oauth.assertion_file", a);
            }
        }
        if let Some(url) = &oauth.token_url
            && let Err(e) = check_token_url(url)
        {
            issues.push(issue("oauth.token_url", e));
        }
        if let Some(scope) = &oauth.scope
            && let Err(e) = check_scope(scope)
        {
            issues.push(issue("oauth.scope", e));
        }
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

impl SendmailConfig {
    fn validate_into(&self, issues: &mut Vec<ConfigIssue>) {
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
    fn resolve_url(&mut self, issues: &mut Vec<ConfigIssue>) {
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

    fn validate_backend(&self, issues: &mut Vec<ConfigIssue>) {
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
fn parse_url_key(url: &str) -> Result<url::Url, String> {
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
fn check_scope(scope: &str) -> Result<(), String> {
    match url::Url::parse(scope.trim()) {
        Ok(u) if !u.username().is_empty() || u.password().is_some() => Err(
            "must not contain user information (`...@` before the host): a scope names a \
             resource, e.g. https://outlook.office365.com/.default"
                .into(),
        ),
        _ => Ok(()),
    }
}

fn is_loopback_host(url: &url::Url) -> bool {
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
fn shown_url(url: &url::Url) -> String {
    let mut shown = format!("{}://{}", url.scheme(), url.host_str().unwrap_or(""));
    if let Some(port) = url.port() {
        shown.push_str(&format!(":{port}"));
    }
    shown.push_str(url.path());
    shown
}

/// `upstream.host`: a host name or an IP address, nothing around it (no scheme, port or `@`).
fn check_host(host: &str) -> Result<(), String> {
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

/// The allowed range of every numeric and duration key, with its reason. Validation refuses
/// anything outside (exit 2, key named), so no value can overflow a timer, a semaphore or a
/// size computation later. (`queue.retry_min` and `retry_max` have their own rules.)
pub mod bounds {
    use std::time::Duration;

    /// A range and why it is what it is.
    #[derive(Debug, Clone, Copy)]
    pub struct Bound<T> {
        pub min: T,
        pub max: T,
        pub why: &'static str,
    }

    const MIB: u64 = 1024 * 1024;
    const MINUTE: Duration = Duration::from_secs(60);
    const HOUR: Duration = Duration::from_secs(3600);

    pub const MAX_MESSAGE_SIZE: Bound<u64> = Bound {
        min: 64 * 1024,
        max: 150 * MIB,
        why: "RFC 5321 §4.5.3.1.7 requires at least 64 KiB; Exchange Online accepts at most \
              150 MiB (its EHLO SIZE 157286400)",
    };
    pub const MAX_RECIPIENTS: Bound<usize> = Bound {
        min: 100,
        max: 1000,
        why: "RFC 5321 §4.5.3.1.8 requires at least 100; Exchange Online takes at most 1000 \
              recipients per message (500 unless the admin raised it)",
    };
    pub const MAX_CONNECTIONS: Bound<usize> = Bound {
        min: 1,
        max: 10_000,
        why: "each connection holds a file descriptor and a task, and the systemd unit allows \
              the process 4096 descriptors",
    };
    pub const COMMAND_TIMEOUT: Bound<Duration> = Bound {
        min: Duration::from_secs(1),
        max: HOUR,
        why: "RFC 5321 §4.5.3.2.7 asks for 5 minutes; beyond an hour a silent client only holds \
              one of smtp.max_connections",
    };
    pub const DATA_TIMEOUT: Bound<Duration> = Bound {
        min: Duration::from_secs(1),
        max: HOUR,
        why: "RFC 5321 §4.5.3.2.5 asks for 3 minutes per block; beyond an hour a stalled client \
              only holds one of smtp.max_connections",
    };
    pub const WRITE_TIMEOUT: Bound<Duration> = Bound {
        min: Duration::from_secs(1),
        max: HOUR,
        why: "a client that reads nothing holds a connection slot for this long (Postfix \
              bounds writes with smtpd_timeout, 300s)",
    };
    pub const MIN_DATA_RATE: Bound<u64> = Bound {
        min: 1,
        max: 1_000_000_000,
        why: "bytes per second a client must keep up during DATA (Postfix smtpd_min_data_rate, \
              500); above 1 GB/s no client could send",
    };
    pub const MAX_ERRORS: Bound<u32> = Bound {
        min: 1,
        max: 1000,
        why: "a client that provokes more error replies is not going to succeed",
    };
    pub const STOP_TIMEOUT: Bound<Duration> = Bound {
        min: Duration::from_secs(1),
        max: Duration::from_secs(600),
        why: "the service manager kills the relay at its own stop timeout (systemd \
              TimeoutStopSec, 30 s in our unit; docker stop, 10 s); a stop that waits longer \
              only delays the restart",
    };
    pub const MAX_AGE: Bound<Duration> = Bound {
        min: Duration::from_secs(1),
        max: Duration::from_secs(30 * 86_400),
        why: "a message must live for one attempt at least; RFC 5321 §4.5.4.1 suggests 4-5 \
              days, and mail a month old is of no use to its recipient",
    };
    pub const MIN_FREE_SPACE: Bound<u64> = Bound {
        min: 0,
        max: i64::MAX as u64,
        why: "no filesystem is larger than 8 EiB (the most XFS supports), so more would refuse \
              all mail",
    };
    pub const LEASE: Bound<Duration> = Bound {
        min: Duration::from_secs(5),
        max: HOUR,
        why: "a claim is renewed at a third of its lease, so a shorter one risks a second \
              relay taking a message still being sent; a longer one strands the mail of a \
              relay that died for that long",
    };
    pub const PORT: Bound<u16> = Bound {
        min: 1,
        max: u16::MAX,
        why: "a TCP port",
    };
    pub const CONNECTIONS: Bound<usize> = Bound {
        min: 1,
        max: 3,
        why: "Exchange Online allows 3 concurrent SMTP connections per mailbox and answers more \
              with 432 4.3.2",
    };
    /// `upstream.connections` with `transport = "graph"`: requests in flight per mailbox.
    pub const GRAPH_CONNECTIONS: Bound<usize> = Bound {
        min: 1,
        max: 4,
        why: "Microsoft Graph allows 4 concurrent requests per app and mailbox and answers more \
              with 429 ApplicationThrottled",
    };
    /// `upstream.rate`: at most 1000 messages a second (the pacer's timers count milliseconds).
    pub const RATE_MIN_SPACING: Duration = Duration::from_millis(1);
    pub const REFRESH_BEFORE: Bound<Duration> = Bound {
        min: MINUTE,
        max: HOUR,
        why: "a session needs the token to outlive its AUTH; Entra tokens live 60-90 minutes and \
              are refreshed at half their lifetime at the latest",
    };
}

/// Refuses `value` outside `bound`, naming the range and its reason.
fn within<T: PartialOrd + Copy>(
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

fn duration_text(d: Duration) -> String {
    humantime::format_duration(d).to_string()
}

/// A rule of [`identity`] as a configuration issue: what is wrong, then the fix.
fn value_rule(issues: &mut Vec<ConfigIssue>, rule: Result<(), identity::ValueProblem>) {
    if let Err(p) = rule {
        issues.push(ConfigIssue {
            key: p.key.to_string(),
            message: p.what,
            fix: Some(p.fix),
        });
    }
}

fn issue(key: &str, message: impl Into<String>) -> ConfigIssue {
    ConfigIssue {
        key: key.to_string(),
        message: message.into(),
        fix: None,
    }
}

fn readable_file(issues: &mut Vec<ConfigIssue>, key: &str, path: &Path) {
    if let Err(e) = std::fs::File::open(path) {
        issues.push(issue(key, format!("cannot read {}: {e}", path.display())));
    }
}

/// `local@domain.tld`, without spaces or angle brackets (a plausibility check, not RFC 5322).
pub fn loopback_networks() -> Vec<IpNet> {
    vec![
        IpNet::from(ipnet::Ipv4Net::new(std::net::Ipv4Addr::new(127, 0, 0, 0), 8).expect("valid")),
        IpNet::from(ipnet::Ipv6Net::new(std::net::Ipv6Addr::LOCALHOST, 128).expect("valid")),
    ]
}

fn default_queue_dir() -> PathBuf {
    // systemd's StateDirectory= may list several directories separated by ':'; the first is ours.
    match std::env::var("STATE_DIRECTORY") {
        Ok(v) if !v.is_empty() => PathBuf::from(v.split(':').next().unwrap_or(&v)),
        _ => PathBuf::from("spool"),
    }
}

fn default_hostname() -> String {
    let mut buf = [0u8; 256];
    // SAFETY: gethostname writes at most buf.len() bytes into a buffer we own.
    let rc = unsafe { libc::gethostname(buf.as_mut_ptr().cast(), buf.len()) };
    if rc == 0 {
        let end = buf.iter().position(|b| *b == 0).unwrap_or(buf.len());
        if let Ok(name) = std::str::from_utf8(&buf[..end])
            && !name.is_empty()
        {
            return name.to_string();
        }
    }
    "localhost".to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn keys(text: &str) -> Vec<String> {
        match Config::from_toml_str(text) {
            Ok(_) => vec![],
            Err(e) => e.issues().iter().map(|i| i.key.clone()).collect(),
        }
    }

    #[test]
    fn toml_syntax_errors_do_not_quote_the_secret_line() {
        let e = Config::from_toml_str("[oauth]\nclient_secret = \"s3cr3t-value\" x\n")
            .unwrap_err()
            .to_string();
        assert!(!e.contains("s3cr3t-value"), "{e}");
        assert!(e.contains("line 2"), "{e}");
        let e = Config::from_toml_str("[oauth]\nclient_secret = [\"s3cr3t-value\"]\n")
            .unwrap_err()
            .to_string();
        assert!(!e.contains("s3cr3t-value"), "{e}");
    }

    #[test]
    fn integers_too_large_for_toml_name_their_key() {
        assert_eq!(
            keys("[smtp]\nhostname = \"x\"\nmax_connections = 18446744073709551615\n"),
            vec!["smtp.max_connections"]
        );
        // Never a piece of a value: a line inside a multi-line string is not a key.
        let k = keys("[oauth]\nclient_secret = \"\"\"\nab=cd\"\"\" 1\n");
        assert!(k.iter().all(|k| !k.contains("ab")), "{k:?}");
    }

    #[test]
    fn defaults_are_valid_and_loopback_only() {
        let c = Config::from_toml_str("").expect("defaults valid");
        assert_eq!(c.smtp.listen, vec!["127.0.0.1:2525".parse().unwrap()]);
        assert_eq!(c.smtp.max_message_size, ByteSize(35 * MIB));
        assert_eq!(c.smtp.max_recipients, 500);
        assert!(!c.oauth.is_configured());
        assert!(c.allowed_networks().iter().all(|n| n.addr().is_loopback()));
    }

    #[test]
    fn shipped_relay_toml_is_valid_and_matches_the_defaults() {
        let shipped =
            Config::from_toml_str(include_str!("../../relay.toml")).expect("relay.toml valid");
        let defaults = Config::from_toml_str("").expect("defaults valid");
        assert_eq!(shipped.to_redacted_toml(), defaults.to_redacted_toml());
    }

    #[test]
    fn sizes_and_rates_parse() {
        assert_eq!(ByteSize::parse("35MiB").unwrap(), ByteSize(35 * MIB));
        assert_eq!(ByteSize::parse("10 MB").unwrap(), ByteSize(10_000_000));
        assert_eq!(ByteSize::parse("1048576").unwrap(), ByteSize(MIB));
        assert!(ByteSize::parse("ten").is_err());
        assert!(ByteSize::parse("5 parsecs").is_err());
        assert_eq!(
            Rate::parse("30/min").unwrap(),
            Rate {
                messages: 30,
                per: Duration::from_secs(60)
            }
        );
        assert!(Rate::parse("30 per minute").is_err());
    }

    #[test]
    fn every_problem_is_reported_at_once() {
        let k = keys(
            "[smtp]\nmax_recipients = 5\nmax_message_size = 100\n[queue]\nretry_min = \"1h\"\nretry_max = \"1m\"\n",
        );
        assert_eq!(
            k,
            vec![
                "smtp.max_message_size",
                "smtp.max_recipients",
                "queue.retry_max"
            ]
        );
    }

    #[test]
    fn non_loopback_bind_needs_allow_networks() {
        assert_eq!(
            keys("[smtp]\nlisten = [\"0.0.0.0:2525\"]\n"),
            vec!["smtp.allow_networks"]
        );
        assert!(
            keys("[smtp]\nlisten = [\"0.0.0.0:2525\"]\nallow_networks = [\"10.0.0.0/8\"]\n")
                .is_empty()
        );
    }

    #[test]
    fn partial_oauth_names_each_missing_key() {
        let k = keys("[oauth]\ntenant_id = \"contoso.onmicrosoft.com\"\n");
        assert_eq!(
            k,
            vec![
                "oauth.client_id",
                "upstream.mail_account",
                "oauth.client_secret"
            ]
        );
    }

    #[test]
    fn unknown_keys_and_bad_types_are_named() {
        assert_eq!(keys("[smtp]\nlisen = []\n"), vec!["smtp.lisen"]);
        assert_eq!(
            keys("[smtp]\nmax_recipients = \"many\"\n"),
            vec!["smtp.max_recipients"]
        );
        assert_eq!(
            keys("[smtp]\nallow_networks = [\"10.0.0.300/8\"]\n"),
            vec!["smtp.allow_networks.0"]
        );
    }

    #[test]
    fn type_errors_do_not_hide_other_problems() {
        let k = keys(
            "[smtp]\nmax_message_size = \"lots\"\nallow_networks = [\"10.0.0.300/8\"]\n\
             listen = [\"0.0.0.0:2525\"]\nmax_recipients = 5\nlisen = 1\n[queue]\nmax_age = 3\n",
        );
        assert_eq!(
            k,
            vec![
                "queue.max_age",
                "smtp.allow_networks.0",
                "smtp.lisen",
                "smtp.max_message_size",
                "smtp.max_recipients"
            ]
        );
    }

    #[test]
    fn token_url_must_be_https_unless_loopback() {
        assert!(check_token_url("https://login.microsoftonline.com/x/oauth2/v2.0/token").is_ok());
        assert!(check_token_url("http://127.0.0.1:8080/t/oauth2/v2.0/token").is_ok());
        assert!(check_token_url("http://[::1]:8080/t").is_ok());
        assert!(check_token_url("http://localhost/t").is_ok());
        assert!(check_token_url("http://login.example.com/t").is_err());
        assert!(check_token_url("ftp://x").is_err());
    }

    #[test]
    fn token_url_host_is_the_one_connected_to_and_userinfo_is_refused() {
        for url in [
            "http://localhost:1@192.0.2.10/t",
            "http://[::1]@192.0.2.10/t",
            "http://127.0.0.1@192.0.2.10/t",
            "http://user:pass@127.0.0.1:8080/t",
            "https://user@login.microsoftonline.com/t",
        ] {
            let e = check_token_url(url).unwrap_err();
            assert!(e.contains("user information"), "{url}: {e}");
            assert!(!e.contains("pass") && !e.contains("localhost:1"), "{e}");
        }
        assert!(check_token_url("http://localhost.example.com/t").is_err());
        assert!(check_token_url("http://127.0.0.1.example.com/t").is_err());
        assert!(check_token_url("not a url").is_err());
        let e = check_token_url("http://login.example.com/t?client_secret=x1y2").unwrap_err();
        assert!(!e.contains("x1y2"), "{e}");
    }

    #[test]
    fn hosts_and_scopes_have_no_userinfo() {
        assert!(check_host("smtp.office365.com").is_ok());
        assert!(check_host("127.0.0.1").is_ok() && check_host("::1").is_ok());
        for bad in [
            "user@smtp.office365.com",
            "smtp.office365.com:587",
            "smtp://x",
            "",
        ] {
            assert!(check_host(bad).is_err(), "{bad}");
        }
        assert!(check_scope("https://outlook.office365.com/.default").is_ok());
        assert!(check_scope("api://0f6a3d44-7c2b-4e1a-9d55-3b2f1c8e7a10/.default").is_ok());
        assert!(check_scope("https://u:p@outlook.office365.com/.default").is_err());
    }

    #[test]
    fn graph_keys_are_validated_by_name() {
        assert!(keys("[upstream]\ntransport = \"graph\"\nconnections = 4\n").is_empty());
        assert_eq!(
            keys("[upstream]\ntransport = \"graph\"\nconnections = 5\n"),
            vec!["upstream.connections"]
        );
        assert_eq!(
            keys("[upstream]\nconnections = 4\n"),
            vec!["upstream.connections"]
        );
        assert_eq!(
            keys("[upstream]\ntransport = \"graph\"\ngraph_url = \"http://graph.example.com\"\n"),
            vec!["upstream.graph_url"]
        );
        assert_eq!(
            keys("[upstream]\ntransport = \"mapi\"\n"),
            vec!["upstream.transport"]
        );
        assert_eq!(
            keys("[upstream]\ngraph_extra_recipients = \"maybe\"\n"),
            vec!["upstream.graph_extra_recipients"]
        );
    }

    #[test]
    fn secrets_never_render() {
        let c = Config::from_toml_str(
            "[oauth]\ntenant_id = \"t.example\"\nclient_id = \"0f6a3d44-7c2b-4e1a-9d55-3b2f1c8e7a10\"\nclient_secret = \"s3cr3t-value\"\n[upstream]\nmail_account = \"relay@contoso.example\"\n",
        )
        .expect("valid");
        let shown = c.to_redacted_toml();
        assert!(!shown.contains("s3cr3t-value"), "{shown}");
        assert!(shown.contains("<redacted>"));
        assert!(!format!("{c:?}").contains("s3cr3t-value"));
    }
}
