//! `relay.toml`: the schema, its defaults, loading (defaults → file → `RELAY_*` environment) and
//! validation that reports every problem at once, each naming its key.
//!
//! The annotated `relay.toml` at the repository root documents every key; keep the two in step.
//!
//! Here: the schema (one struct per section) and its defaults. `load.rs`: reading it;
//! `validate.rs`: its rules; [`bounds`]: every numeric range with its reason; `values.rs`:
//! the value types; [`identity`]: the rules for the Microsoft 365 values.

pub mod bounds;
pub mod identity;
mod listener;
mod load;
mod routes;
mod validate;
mod values;
pub use identity::looks_like_address;
pub use listener::*;
pub use load::*;
pub use routes::{ROUTE_NAME_MAX, RouteConfig, RouteTable, route_name_problem};
pub use validate::*;
pub use values::*;

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
    /// `[[route]]` tables as written (see `routes.rs`).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub route: Vec<RouteConfig>,
    /// The `[[route]]` tables resolved at load; [`Config::route_table`] adds the default route.
    #[serde(skip)]
    pub routes: Vec<std::sync::Arc<crate::routes::RouteSpec>>,
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
    /// `"off"`, `"accept-any"`, or the path of a users file (`user:HASH` per line, argon2 PHC).
    pub auth: String,
    /// AUTH without TLS from loopback clients (nothing on the wire to sniff); elsewhere 538.
    pub allow_plaintext_auth_on_loopback: bool,
    /// `[[smtp.listener]]` tables (see [`ListenerConfig`]); last, as TOML wants tables after keys.
    pub listener: Vec<ListenerConfig>,
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
            allow_plaintext_auth_on_loopback: true,
            listener: Vec::new(),
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
    /// `transport = "graph"`: messages above what `sendMail` takes go through a draft and
    /// upload sessions (needs `Mail.ReadWrite`) instead of being refused at accept.
    pub graph_large_messages: bool,
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
            // Off: the upload path needs the broad Mail.ReadWrite grant, which many tenants refuse.
            graph_large_messages: false,
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
                "upstream.mail_account",
                "oauth.client_id",
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
        assert!(
            keys(
                "[upstream]\ntransport = \"graph\"\nconnections = 4\ngraph_large_messages = true\n"
            )
            .is_empty()
        );
        assert_eq!(
            keys("[upstream]\ngraph_large_messages = true\n"),
            vec!["upstream.graph_large_messages"]
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
