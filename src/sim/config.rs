//! The simulator's configuration: the tenant, its app registrations, the Exchange mailboxes and the knobs
//! of reference §7 / §3. Everything has a default so `SimConfig::default()` is a working tenant.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::SimError;

/// Default tenant id of the simulated directory (a fixed GUID so printed configs are stable).
pub const DEFAULT_TENANT_ID: &str = "9188040d-6c67-4c5b-b112-36a304b66dad";
/// Default app registration (client id).
pub const DEFAULT_CLIENT_ID: &str = "0f6a3d44-7c2b-4e1a-9d55-3b2f1c8e7a10";
/// Default client secret value.
pub const DEFAULT_CLIENT_SECRET: &str = "sim~client~secret~value~0123456789";
/// Default mailbox.
pub const DEFAULT_MAILBOX: &str = "relay@contoso.example";
/// The Exchange Online resource (scope without `/.default`).
pub const EXCHANGE_RESOURCE: &str = "https://outlook.office365.com";
/// The application permission Exchange wants in an app-only token.
pub const SEND_AS_APP_ROLE: &str = "SMTP.SendAsApp";
/// The application permission Graph `sendMail` wants.
pub const MAIL_SEND_ROLE: &str = "Mail.Send";
/// The application permission Graph wants for drafts and upload sessions (large messages).
pub const MAIL_READ_WRITE_ROLE: &str = "Mail.ReadWrite";
/// The Microsoft Graph resource of the global cloud.
pub const GRAPH_RESOURCE: &str = "https://graph.microsoft.com";

/// Whole simulator configuration (TOML at the command line, a struct in tests).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct SimConfig {
    /// Tenant GUID; the token endpoint answers only for it (and its domains).
    pub tenant_id: String,
    /// Verified domains that may replace the GUID in the token URL.
    pub tenant_domains: Vec<String>,
    /// The authority host clients put in an assertion's `aud` (besides the simulator's own URL).
    pub authority_host: String,
    /// Resources (application ID URIs) that exist in the tenant; a scope must name one of them.
    pub resources: Vec<String>,
    /// App registrations.
    pub clients: Vec<ClientConfig>,
    /// `expires_in` (and `exp - iat`) of issued access tokens, in seconds.
    pub token_lifetime_secs: u64,
    /// Exchange Online side.
    pub smtp: SmtpConfig,
    /// Exchange mailboxes.
    pub mailboxes: Vec<MailboxConfig>,
    /// Microsoft Graph side (`sendMail` beside the token endpoint).
    pub graph: GraphConfig,
    /// Where `simulate` keeps its CA and mailbox (tests pass a directory to `Simulator::start` instead).
    pub state_dir: Option<PathBuf>,
}

/// One app registration with its credentials and the permission state of §1.7.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct ClientConfig {
    pub client_id: String,
    pub display_name: String,
    /// Object id of the Enterprise application (service principal); becomes `oid`/`sub` of the token.
    pub object_id: String,
    pub secrets: Vec<SecretConfig>,
    /// Registered certificates, PEM files.
    pub certificate_files: Vec<PathBuf>,
    /// Registered certificates, inline PEM (handy in tests).
    pub certificate_pems: Vec<String>,
    /// `roles` claim of issued tokens; `None` leaves the claim out entirely.
    pub roles: Option<Vec<String>>,
    /// `New-ServicePrincipal` was run in Exchange for this app; without it AUTH fails with 535 5.7.3.
    pub exchange_service_principal: bool,
}

/// A client secret; an expired one answers AADSTS7000222.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct SecretConfig {
    pub value: String,
    pub expired: bool,
}

/// An Exchange mailbox and what the app may do with it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct MailboxConfig {
    pub address: String,
    /// `Add-MailboxPermission -AccessRights FullAccess` for the app's service principal (or RBAC scope).
    pub full_access: bool,
    /// Addresses this mailbox may send as (header From / envelope sender), besides itself.
    pub send_as: Vec<String>,
    /// `Set-CASMailbox -SmtpClientAuthenticationDisabled $true`.
    pub smtp_auth_disabled: bool,
}

/// Microsoft Graph `sendMail` knobs (reference `graph-transport.md` §1, §3).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct GraphConfig {
    /// Largest request body (the base64); more gets 413.
    pub max_request_bytes: u64,
    /// Requests in flight per mailbox; more get 429 ApplicationThrottled.
    pub concurrency_per_mailbox: usize,
    /// RBAC for Applications: tokens need no `Mail.Send` role; `full_access` stands in for the
    /// management scope (`New-ManagementRoleAssignment -Role "Application Mail.Send"`).
    pub rbac_mode: bool,
    /// The mailbox's MaxSendSize for a draft and its attachments; more gets 400
    /// `ErrorMessageSizeExceeded` (graph-transport.md §2: "after 39 MB").
    pub max_message_bytes: u64,
    /// How long an upload session's URL lives (`expirationDateTime`).
    pub upload_session_secs: u64,
}

impl Default for GraphConfig {
    fn default() -> Self {
        GraphConfig {
            // Peers treat 4 MB of base64 as the limit (§1.5).
            max_request_bytes: 4 * 1024 * 1024,
            concurrency_per_mailbox: 4,
            rbac_mode: false,
            max_message_bytes: 35 * 1024 * 1024,
            upload_session_secs: 900,
        }
    }
}

/// Which reply a SendAs violation gets at the end of DATA.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, Default)]
pub enum SendAsReply {
    /// `550 5.7.60 SMTP; Client does not have permissions to send as this sender`
    #[default]
    #[serde(rename = "5.7.60")]
    Code5760,
    /// `554 5.2.252 SendAsDenied; ...` with the long diagnostic tail.
    #[serde(rename = "5.2.252")]
    Code52252,
}

/// What happens to a message over the per-minute rate.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum RateMode {
    /// `432 4.3.2` at the end of DATA.
    #[default]
    Reject,
    /// Hold the end-of-DATA reply until the window has room (current Microsoft doc).
    Delay,
}

/// Exchange Online SMTP knobs.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct SmtpConfig {
    /// Name the client connects to; the TLS leaf certificate is valid for it (and localhost/127.0.0.1).
    pub host_name: String,
    /// Front-end server name in the banner, EHLO and diagnostic suffixes.
    pub server_name: String,
    /// Mailbox server name used in queue ids (`<ID@MBX.namprd14.prod.outlook.com>`).
    pub mailbox_server: String,
    /// EHLO `SIZE`; `MAIL SIZE=` above it gets 552 5.3.4.
    pub advertised_size: u64,
    /// Mailbox MaxSendSize; larger messages get 554 5.2.0 ...MaxSubmissionExceeded.
    pub max_send_size: u64,
    /// Recipients per message; more get 452 4.5.3.
    pub max_recipients: usize,
    /// Concurrent authenticated connections per mailbox; more get 432 4.3.2.
    pub connections_per_mailbox: usize,
    /// Messages per rate window per mailbox.
    pub messages_per_window: usize,
    /// The rate window (60 s in Exchange; shorter in tests).
    #[serde(with = "humantime_serde")]
    pub rate_window: Duration,
    pub rate_mode: RateMode,
    /// Rolling 24 h recipient quota; over it: 554 5.2.0 ...SubmissionQuotaExceededException.
    pub recipients_per_day: usize,
    /// Close a connection idle for this long (451 4.7.0 Timeout waiting for client input).
    #[serde(with = "humantime_serde")]
    pub idle_timeout: Duration,
    /// How long a scripted stall holds the connection silent before closing it.
    #[serde(with = "humantime_serde")]
    pub stall_duration: Duration,
    /// How long the end of DATA takes to be answered (Exchange takes a moment to submit); the
    /// session counts against the mailbox's limit meanwhile.
    #[serde(with = "humantime_serde")]
    pub data_end_delay: Duration,
    /// `Set-TransportConfig -SmtpClientAuthenticationDisabled $true` (tenant-wide 535 5.7.139).
    pub smtp_auth_disabled: bool,
    /// RBAC for Applications: tokens need no `roles`; FullAccess stands in for the management scope.
    pub rbac_mode: bool,
    pub send_as_reply: SendAsReply,
    /// After this many SendAs denials in a row a mailbox gets 550 5.2.252 "Sender throttled"; 0 = never.
    pub continuous_error_threshold: u32,
    /// EHLO offers 8BITMIME (and BINARYMIME), as Exchange does. Off (a server that does not):
    /// `BODY=8BITMIME` gets 501 5.5.4.
    pub eight_bit_mime: bool,
    /// EHLO offers SMTPUTF8, as Exchange does. Off: the `SMTPUTF8` parameter, or a non-ASCII
    /// address without it, gets 501 5.5.4.
    pub smtputf8: bool,
}

impl Default for SimConfig {
    fn default() -> Self {
        SimConfig {
            tenant_id: DEFAULT_TENANT_ID.to_string(),
            tenant_domains: vec!["contoso.onmicrosoft.com".to_string()],
            authority_host: "https://login.microsoftonline.com".to_string(),
            resources: vec![
                EXCHANGE_RESOURCE.to_string(),
                "https://outlook.office.com".to_string(),
                "https://graph.microsoft.com".to_string(),
            ],
            clients: vec![ClientConfig::default()],
            token_lifetime_secs: 3599,
            smtp: SmtpConfig::default(),
            mailboxes: vec![MailboxConfig::default()],
            graph: GraphConfig::default(),
            state_dir: None,
        }
    }
}

impl SimConfig {
    /// A tenant set up for the Graph transport: the app has the consented `Mail.Send`
    /// application permission (and no SMTP.SendAsApp).
    pub fn graph() -> SimConfig {
        let mut c = SimConfig::default();
        for client in &mut c.clients {
            client.roles = Some(vec![MAIL_SEND_ROLE.to_string()]);
        }
        c
    }
}

impl Default for ClientConfig {
    fn default() -> Self {
        ClientConfig {
            client_id: DEFAULT_CLIENT_ID.to_string(),
            display_name: "smtp-oauth-relay".to_string(),
            object_id: "5e2c7a91-0b3d-4f6e-8a1c-2d4b6f8e0a13".to_string(),
            secrets: vec![SecretConfig::default()],
            certificate_files: Vec::new(),
            certificate_pems: Vec::new(),
            roles: Some(vec![SEND_AS_APP_ROLE.to_string()]),
            exchange_service_principal: true,
        }
    }
}

impl Default for SecretConfig {
    fn default() -> Self {
        SecretConfig {
            value: DEFAULT_CLIENT_SECRET.to_string(),
            expired: false,
        }
    }
}

impl Default for MailboxConfig {
    fn default() -> Self {
        MailboxConfig {
            address: DEFAULT_MAILBOX.to_string(),
            full_access: true,
            send_as: Vec::new(),
            smtp_auth_disabled: false,
        }
    }
}

impl Default for SmtpConfig {
    fn default() -> Self {
        SmtpConfig {
            host_name: "smtp.office365.com".to_string(),
            server_name: "SY5P282CA0097.outlook.office365.com".to_string(),
            mailbox_server: "CH2PR14MB4005".to_string(),
            advertised_size: 157_286_400,
            max_send_size: 36_700_160,
            max_recipients: 500,
            connections_per_mailbox: 3,
            messages_per_window: 30,
            rate_window: Duration::from_secs(60),
            rate_mode: RateMode::Reject,
            recipients_per_day: 10_000,
            idle_timeout: Duration::from_secs(300),
            stall_duration: Duration::from_secs(600),
            data_end_delay: Duration::ZERO,
            smtp_auth_disabled: false,
            rbac_mode: false,
            send_as_reply: SendAsReply::Code5760,
            continuous_error_threshold: 0,
            eight_bit_mime: true,
            smtputf8: true,
        }
    }
}

impl SimConfig {
    /// Reads a TOML file; every key is optional (defaults above), unknown keys are errors.
    pub fn from_toml_file(path: &Path) -> Result<SimConfig, SimError> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| SimError::Config(format!("cannot read {}: {e}", path.display())))?;
        Self::from_toml_str(&text).map_err(|e| match e {
            SimError::Config(msg) => SimError::Config(format!("{}: {msg}", path.display())),
            other => other,
        })
    }

    /// Parses TOML text (see [`SimConfig::from_toml_file`]).
    pub fn from_toml_str(text: &str) -> Result<SimConfig, SimError> {
        // figment is already a dependency of the crate; its TOML provider gives good error messages.
        use figment::Figment;
        use figment::providers::{Format, Toml};
        let cfg: SimConfig = Figment::new()
            .merge(Toml::string(text))
            .extract()
            .map_err(|e| SimError::Config(e.to_string()))?;
        cfg.validate()?;
        Ok(cfg)
    }

    /// Checks what would otherwise surface as confusing runtime behaviour.
    pub fn validate(&self) -> Result<(), SimError> {
        if self.tenant_id.trim().is_empty() {
            return Err(SimError::Config("tenant_id is empty".into()));
        }
        if self.clients.iter().any(|c| c.client_id.trim().is_empty()) {
            return Err(SimError::Config("a client has an empty client_id".into()));
        }
        if self.smtp.host_name.trim().is_empty() {
            return Err(SimError::Config("smtp.host_name is empty".into()));
        }
        Ok(())
    }

    /// The first client (the one `relay_config_fragment` prints).
    pub fn primary_client(&self) -> Option<&ClientConfig> {
        self.clients.first()
    }

    pub(crate) fn client(&self, client_id: &str) -> Option<&ClientConfig> {
        self.clients
            .iter()
            .find(|c| c.client_id.eq_ignore_ascii_case(client_id))
    }

    pub(crate) fn mailbox(&self, address: &str) -> Option<&MailboxConfig> {
        self.mailboxes
            .iter()
            .find(|m| m.address.eq_ignore_ascii_case(address))
    }

    pub(crate) fn mailbox_mut(&mut self, address: &str) -> Option<&mut MailboxConfig> {
        self.mailboxes
            .iter_mut()
            .find(|m| m.address.eq_ignore_ascii_case(address))
    }

    pub(crate) fn client_mut(&mut self, client_id: &str) -> Option<&mut ClientConfig> {
        self.clients
            .iter_mut()
            .find(|c| c.client_id.eq_ignore_ascii_case(client_id))
    }
}
