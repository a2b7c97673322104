//! Runtime control: the live configuration, scripted faults, per-mailbox limit bookkeeping and counters.
//! Tests flip switches here while the simulator runs; both endpoints read the state on every request.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, RwLock};
use std::time::{Duration, Instant};

use super::SimError;
use super::config::{RateMode, SendAsReply, SimConfig};
use super::keys::{RegisteredCert, SigningKey, registered_certs};

/// A fault the token endpoint answers with instead of doing its job.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TokenFault {
    /// 429 with `Retry-After: secs` and an AADSTS90055 throttling body.
    TooManyRequests { retry_after_secs: u64 },
    /// 500 with a `temporarily_unavailable` body.
    InternalServerError,
    /// 503 with a `temporarily_unavailable` body and `Retry-After: 1`.
    ServiceUnavailable,
    /// Wait this long, then answer normally.
    Slow(Duration),
    /// 200 with a truncated JSON body.
    MalformedJson,
}

/// Where in an SMTP session a scripted fault fires.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum SmtpStage {
    /// Instead of the 220 banner.
    Greeting,
    /// On EHLO or HELO.
    Ehlo,
    /// On STARTTLS.
    StartTls,
    /// On AUTH (before any SASL exchange).
    Auth,
    /// On MAIL FROM.
    Mail,
    /// On RCPT TO.
    Rcpt,
    /// On the DATA (or first BDAT) command, before 354.
    Data,
    /// While the message body arrives: the final dot is never answered.
    DataBody,
    /// After the final dot (or BDAT LAST), instead of the end-of-data checks.
    DataEnd,
    /// On RSET.
    Rset,
    /// On QUIT.
    Quit,
}

/// What a scripted SMTP fault does.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SmtpFault {
    /// `421 4.3.2 Service not available, closing transmission channel`, then close.
    Reply421,
    /// `451 4.7.0 Temporary server error. Please try again later. PRX4 [...]`; the session goes on.
    Reply451,
    /// `430 4.2.0 STOREDRV; mailbox logon failure; ...`; the session goes on.
    Reply430,
    /// Any reply line (`code` + text incl. enhanced code); 421 closes, others continue.
    Reply { code: u16, text: String },
    /// Close the TCP connection without a reply (at DataEnd: the message is not kept).
    Drop,
    /// Keep the message, then close without the 250 (only meaningful at DataEnd): a lost reply.
    DropAfterAccept,
    /// Say nothing for `stall_duration`, then close.
    Stall,
}

/// What the Graph endpoint answers instead of doing its job (the error catalogue of
/// `graph-transport.md` §3.3 as switches).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum GraphFault {
    /// This status with Graph's JSON error body; `Retry-After: secs` when set.
    Error {
        status: u16,
        code: String,
        message: String,
        retry_after: Option<u64>,
    },
    /// Keep the message, then answer with this error status (a 504 that delivered anyway).
    KeepThenError { status: u16 },
    /// Keep the message, answer 202 with `Retry-After` (retrying it would duplicate).
    AcceptedWithRetryAfter { secs: u64 },
    /// Keep the message, then say nothing for this long before the 202 (a lost answer).
    KeepThenStall(Duration),
}

impl GraphFault {
    /// The catalogue entry for `code`: its status and the message Microsoft sends with it.
    pub fn code(code: &str) -> GraphFault {
        let (status, message) = match code {
            "ErrorAccessDenied" => (403, "Access is denied. Check credentials and try again."),
            "ErrorSendAsDenied" => (
                403,
                "The user account which was used to submit this request does not have the right to \
                 send mail on behalf of the specified sending account., Cannot submit message.",
            ),
            "MailboxNotEnabledForRESTAPI" => (
                404,
                "The mailbox is either inactive, soft-deleted, or is hosted on-premise.",
            ),
            "ErrorInvalidUser" => (404, "The requested user is invalid."),
            "ResourceNotFound" => (404, "Resource could not be discovered."),
            "ErrorInvalidRecipients" => (
                400,
                "At least one recipient is not valid., Recipient is not resolved. All recipients must \
                 be resolved before a message can be submitted.",
            ),
            "ErrorMessageSizeExceeded" => (
                400,
                "The message exceeds the maximum supported size., Cannot save changes made to an item \
                 to store.",
            ),
            "ErrorMimeContentInvalidBase64String" => {
                (400, "Invalid base64 string for MIME content.")
            }
            "ErrorQuotaExceeded" => (507, "Mailbox has exceeded maximum mailbox size."),
            "ErrorMailboxStoreUnavailable" => {
                (503, "The mailbox database is temporarily unavailable.")
            }
            "MailboxInfoStale" => (503, "Target resource is currently on backend 'Unknown'."),
            "ErrorNonExistentMailBox" => {
                (404, "The SMTP address has no mailbox associated with it.")
            }
            "ApplicationThrottled" => (429, "Application is over its MailboxConcurrency limit."),
            "ErrorServerBusy" => (
                503,
                "The server cannot service this request right now. Try again later.",
            ),
            "ErrorInternalServerError" => (
                500,
                "An internal server error occurred. The operation failed.",
            ),
            "UnknownError" => (500, ""),
            "CommandConcurrencyLimitReached" => (503, "Too many concurrent requests."),
            "InvalidAuthenticationToken" => {
                (401, "Access token validation failure. Invalid audience.")
            }
            "NoPermissionsInAccessToken" => (
                401,
                "The token contains no permissions, or permissions can not be understood.",
            ),
            "Authorization_RequestDenied" => {
                (403, "Insufficient privileges to complete the operation.")
            }
            "RequestEntityTooLarge" => (413, "Request Entity Too Large"),
            _ => (400, "Bad request."),
        };
        let retry_after = matches!(status, 429 | 503).then_some(1);
        GraphFault::Error {
            status,
            code: code.to_string(),
            message: message.to_string(),
            retry_after,
        }
    }

    /// Every `error.code` of the catalogue.
    pub const CATALOGUE: [&'static str; 21] = [
        "ErrorAccessDenied",
        "ErrorSendAsDenied",
        "MailboxNotEnabledForRESTAPI",
        "ErrorInvalidUser",
        "ResourceNotFound",
        "ErrorInvalidRecipients",
        "ErrorMessageSizeExceeded",
        "ErrorMimeContentInvalidBase64String",
        "ErrorQuotaExceeded",
        "ErrorMailboxStoreUnavailable",
        "MailboxInfoStale",
        "ErrorNonExistentMailBox",
        "ApplicationThrottled",
        "ErrorServerBusy",
        "ErrorInternalServerError",
        "UnknownError",
        "CommandConcurrencyLimitReached",
        "InvalidAuthenticationToken",
        "NoPermissionsInAccessToken",
        "Authorization_RequestDenied",
        // 413 has no code of its own; the catalogue entry stands for the status.
        "RequestEntityTooLarge",
    ];
}

#[derive(Debug, Clone)]
struct ScriptedSmtpFault {
    stage: SmtpStage,
    fault: SmtpFault,
    remaining: usize,
}

/// Per-mailbox limit bookkeeping (§3).
#[derive(Debug, Default)]
pub(crate) struct MailboxUsage {
    /// Authenticated sessions right now.
    pub active_sessions: usize,
    /// Accept times inside the rate window.
    pub accepted: VecDeque<Instant>,
    /// (time, recipients) of accepted messages inside 24 h.
    pub recipients: VecDeque<(Instant, usize)>,
    /// SendAs denials in a row (continuous-error throttle).
    pub send_as_denials: u32,
    /// The most authenticated sessions at once so far.
    pub peak_sessions: usize,
    /// `432 4.3.2` answers so far (thread limit and submission rate).
    pub throttled: u64,
    /// When each transaction began (an authenticated MAIL FROM), the latest
    /// [`MAIL_TIMES_KEPT`] only.
    pub mail_times: VecDeque<Instant>,
}

/// Transaction start times kept per mailbox (bounded memory in a long simulation).
pub(crate) const MAIL_TIMES_KEPT: usize = 10_000;

pub(crate) struct Shared {
    config: RwLock<SimConfig>,
    certs: RwLock<HashMap<String, Vec<RegisteredCert>>>,
    token_faults: Mutex<VecDeque<(TokenFault, usize)>>,
    smtp_faults: Mutex<Vec<ScriptedSmtpFault>>,
    usage: Mutex<HashMap<String, MailboxUsage>>,
    pub signing_key: SigningKey,
    /// `http://127.0.0.1:PORT`, set once the HTTP listener is bound.
    pub token_base_url: String,
    pub token_requests: AtomicU64,
    pub tokens_issued: AtomicU64,
    pub smtp_connections: AtomicU64,
    graph_faults: Mutex<VecDeque<(GraphFault, usize)>>,
    graph_faults_fired: AtomicU64,
    /// Scripted answers to `PUT`s to upload URLs (apart from the API calls' faults).
    upload_faults: Mutex<VecDeque<(GraphFault, usize)>>,
    pub graph_requests: AtomicU64,
    /// `PUT`s to upload URLs (large messages), counted apart from the Graph API calls.
    pub graph_uploads: AtomicU64,
    /// Drafts and upload sessions of the large-message path.
    pub(crate) graph_drafts: super::graph_large::Drafts,
    /// Graph requests in flight per mailbox (lower case), and the most ever seen at once.
    graph_in_flight: Mutex<HashMap<String, usize>>,
    pub graph_max_in_flight: AtomicU64,
    /// Scripted faults handed out so far: tests check that the fault they set up fired.
    token_faults_fired: AtomicU64,
    smtp_faults_fired: Mutex<HashMap<SmtpStage, u64>>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic while holding one of these locks leaves plain data behind; keep serving.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

fn load_certs(cfg: &SimConfig) -> Result<HashMap<String, Vec<RegisteredCert>>, SimError> {
    let mut map = HashMap::new();
    for client in &cfg.clients {
        let mut certs = Vec::new();
        for path in &client.certificate_files {
            let pem = std::fs::read_to_string(path).map_err(|e| {
                SimError::Config(format!("cannot read certificate {}: {e}", path.display()))
            })?;
            certs.extend(registered_certs(&pem)?);
        }
        for pem in &client.certificate_pems {
            certs.extend(registered_certs(pem)?);
        }
        map.insert(client.client_id.to_ascii_lowercase(), certs);
    }
    Ok(map)
}

impl Shared {
    pub fn new(
        config: SimConfig,
        signing_key: SigningKey,
        token_base_url: String,
    ) -> Result<Shared, SimError> {
        let certs = load_certs(&config)?;
        Ok(Shared {
            config: RwLock::new(config),
            certs: RwLock::new(certs),
            token_faults: Mutex::new(VecDeque::new()),
            smtp_faults: Mutex::new(Vec::new()),
            usage: Mutex::new(HashMap::new()),
            signing_key,
            token_base_url,
            token_requests: AtomicU64::new(0),
            tokens_issued: AtomicU64::new(0),
            smtp_connections: AtomicU64::new(0),
            graph_faults: Mutex::new(VecDeque::new()),
            graph_faults_fired: AtomicU64::new(0),
            upload_faults: Mutex::new(VecDeque::new()),
            graph_requests: AtomicU64::new(0),
            graph_uploads: AtomicU64::new(0),
            graph_drafts: Default::default(),
            graph_in_flight: Mutex::new(HashMap::new()),
            graph_max_in_flight: AtomicU64::new(0),
            token_faults_fired: AtomicU64::new(0),
            smtp_faults_fired: Mutex::new(HashMap::new()),
        })
    }

    /// A snapshot of the live configuration.
    pub fn config(&self) -> SimConfig {
        self.config
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    pub fn certs_of(&self, client_id: &str) -> Vec<RegisteredCert> {
        let certs = self.certs.read().unwrap_or_else(|p| p.into_inner());
        certs
            .get(&client_id.to_ascii_lowercase())
            .cloned()
            .unwrap_or_default()
    }

    /// Takes the next scripted token fault, if any.
    pub fn next_token_fault(&self) -> Option<TokenFault> {
        let mut q = lock(&self.token_faults);
        let (fault, remaining) = q.front_mut()?;
        let fault = fault.clone();
        *remaining -= 1;
        if *remaining == 0 {
            q.pop_front();
        }
        self.token_faults_fired.fetch_add(1, Ordering::Relaxed);
        Some(fault)
    }

    /// Takes a scripted SMTP fault for `stage`, if any.
    pub fn next_smtp_fault(&self, stage: SmtpStage) -> Option<SmtpFault> {
        let mut faults = lock(&self.smtp_faults);
        let idx = faults
            .iter()
            .position(|f| f.stage == stage && f.remaining > 0)?;
        let fault = faults[idx].fault.clone();
        faults[idx].remaining -= 1;
        if faults[idx].remaining == 0 {
            faults.remove(idx);
        }
        *lock(&self.smtp_faults_fired).entry(stage).or_default() += 1;
        Some(fault)
    }

    /// Takes the next scripted Graph fault, if any.
    pub fn next_graph_fault(&self) -> Option<GraphFault> {
        let mut q = lock(&self.graph_faults);
        let (fault, remaining) = q.front_mut()?;
        let fault = fault.clone();
        *remaining -= 1;
        if *remaining == 0 {
            q.pop_front();
        }
        self.graph_faults_fired.fetch_add(1, Ordering::Relaxed);
        Some(fault)
    }

    /// Takes the next scripted fault for an upload `PUT`, if any.
    pub fn next_upload_fault(&self) -> Option<GraphFault> {
        let mut q = lock(&self.upload_faults);
        let (fault, remaining) = q.front_mut()?;
        let fault = fault.clone();
        *remaining -= 1;
        if *remaining == 0 {
            q.pop_front();
        }
        self.graph_faults_fired.fetch_add(1, Ordering::Relaxed);
        Some(fault)
    }

    /// One more Graph request in flight for `mailbox`; returns how many are now.
    pub fn graph_enter(&self, mailbox: &str) -> usize {
        let mut m = lock(&self.graph_in_flight);
        let n = m.entry(mailbox.to_ascii_lowercase()).or_default();
        *n += 1;
        self.graph_max_in_flight
            .fetch_max(*n as u64, Ordering::Relaxed);
        *n
    }

    pub fn graph_leave(&self, mailbox: &str) {
        if let Some(n) = lock(&self.graph_in_flight).get_mut(&mailbox.to_ascii_lowercase()) {
            *n = n.saturating_sub(1);
        }
    }

    pub fn usage(&self) -> MutexGuard<'_, HashMap<String, MailboxUsage>> {
        lock(&self.usage)
    }
}

/// Handle to flip the simulator's switches at runtime (cheap to clone).
#[derive(Clone)]
pub struct Control {
    pub(crate) shared: Arc<Shared>,
}

impl Control {
    /// Changes the live configuration; registered certificates are re-read. On error nothing changes.
    pub fn update(&self, change: impl FnOnce(&mut SimConfig)) -> Result<(), SimError> {
        let mut cfg = self
            .shared
            .config
            .write()
            .unwrap_or_else(|p| p.into_inner());
        let mut next = cfg.clone();
        change(&mut next);
        next.validate()?;
        let certs = load_certs(&next)?;
        *cfg = next;
        *self.shared.certs.write().unwrap_or_else(|p| p.into_inner()) = certs;
        Ok(())
    }

    /// Like `update` for changes that cannot fail (no certificate edits).
    fn set(&self, change: impl FnOnce(&mut SimConfig)) {
        let mut cfg = self
            .shared
            .config
            .write()
            .unwrap_or_else(|p| p.into_inner());
        change(&mut cfg);
    }

    /// A snapshot of the live configuration.
    pub fn config(&self) -> SimConfig {
        self.shared.config()
    }

    /// Tenant-wide SMTP AUTH off: `535 5.7.139 ... disabled for the Tenant`.
    pub fn set_smtp_auth_disabled(&self, disabled: bool) {
        self.set(|c| c.smtp.smtp_auth_disabled = disabled);
    }

    /// SMTP AUTH off for one mailbox: `535 5.7.139 ... disabled for the Mailbox`.
    pub fn set_mailbox_smtp_auth_disabled(&self, mailbox: &str, disabled: bool) {
        self.set(|c| {
            if let Some(m) = c.mailbox_mut(mailbox) {
                m.smtp_auth_disabled = disabled;
            }
        });
    }

    /// RBAC for Applications: tokens need no SMTP.SendAsApp role.
    pub fn set_rbac_mode(&self, on: bool) {
        self.set(|c| c.smtp.rbac_mode = on);
    }

    /// `roles` of tokens issued to every client from now on (`None`: no claim at all).
    pub fn set_roles(&self, roles: Option<Vec<String>>) {
        self.set(|c| c.clients.iter_mut().for_each(|cl| cl.roles = roles.clone()));
    }

    /// `expires_in` of tokens issued from now on (0 gives tokens that are already expired).
    pub fn set_token_lifetime(&self, secs: u64) {
        self.set(|c| c.token_lifetime_secs = secs);
    }

    /// Marks every client secret expired (AADSTS7000222) or valid again.
    pub fn set_secrets_expired(&self, expired: bool) {
        self.set(|c| {
            c.clients
                .iter_mut()
                .flat_map(|cl| cl.secrets.iter_mut())
                .for_each(|s| s.expired = expired)
        });
    }

    /// Whether the apps' service principals exist in Exchange (`New-ServicePrincipal`).
    pub fn set_exchange_service_principal(&self, present: bool) {
        self.set(|c| {
            c.clients
                .iter_mut()
                .for_each(|cl| cl.exchange_service_principal = present)
        });
    }

    /// FullAccess of the app on `mailbox`; adds the mailbox if it does not exist.
    pub fn set_full_access(&self, mailbox: &str, granted: bool) {
        self.set(|c| match c.mailbox_mut(mailbox) {
            Some(m) => m.full_access = granted,
            None => c.mailboxes.push(super::config::MailboxConfig {
                address: mailbox.to_string(),
                full_access: granted,
                send_as: Vec::new(),
                smtp_auth_disabled: false,
            }),
        });
    }

    /// Addresses `mailbox` may send as (besides itself).
    pub fn set_send_as(&self, mailbox: &str, addresses: Vec<String>) {
        self.set(|c| {
            if let Some(m) = c.mailbox_mut(mailbox) {
                m.send_as = addresses;
            }
        });
    }

    /// Which reply a SendAs violation gets.
    pub fn set_send_as_reply(&self, reply: SendAsReply) {
        self.set(|c| c.smtp.send_as_reply = reply);
    }

    pub fn set_idle_timeout(&self, timeout: Duration) {
        self.set(|c| c.smtp.idle_timeout = timeout);
    }

    pub fn set_stall_duration(&self, d: Duration) {
        self.set(|c| c.smtp.stall_duration = d);
    }

    /// The end of DATA is answered after `d` (the concurrency and rate checks come after it).
    pub fn set_data_end_delay(&self, d: Duration) {
        self.set(|c| c.smtp.data_end_delay = d);
    }

    /// `limit` messages per `window` per mailbox, over it reject (432 4.3.2) or delay.
    pub fn set_rate_limit(&self, limit: usize, window: Duration, mode: RateMode) {
        self.set(|c| {
            c.smtp.messages_per_window = limit;
            c.smtp.rate_window = window;
            c.smtp.rate_mode = mode;
        });
    }

    pub fn set_connections_per_mailbox(&self, n: usize) {
        self.set(|c| c.smtp.connections_per_mailbox = n);
    }

    pub fn set_recipients_per_day(&self, n: usize) {
        self.set(|c| c.smtp.recipients_per_day = n);
    }

    pub fn set_max_recipients(&self, n: usize) {
        self.set(|c| c.smtp.max_recipients = n);
    }

    pub fn set_max_send_size(&self, bytes: u64) {
        self.set(|c| c.smtp.max_send_size = bytes);
    }

    pub fn set_continuous_error_threshold(&self, n: u32) {
        self.set(|c| c.smtp.continuous_error_threshold = n);
    }

    /// Whether EHLO offers 8BITMIME and SMTPUTF8 (a server other than Exchange may offer neither).
    pub fn set_extensions(&self, eight_bit_mime: bool, smtputf8: bool) {
        self.set(|c| {
            c.smtp.eight_bit_mime = eight_bit_mime;
            c.smtp.smtputf8 = smtputf8;
        });
    }

    /// Registers a certificate (PEM) on a client; its key may then sign assertions.
    pub fn add_client_certificate(&self, client_id: &str, pem: &str) -> Result<(), SimError> {
        let id = client_id.to_string();
        let pem = pem.to_string();
        let mut found = false;
        self.update(|c| {
            if let Some(cl) = c.client_mut(&id) {
                cl.certificate_pems.push(pem);
                found = true;
            }
        })?;
        if found {
            Ok(())
        } else {
            Err(SimError::Config(format!("no client {client_id}")))
        }
    }

    /// The next `times` token requests get `fault`. Faults queue in order.
    pub fn script_token_fault(&self, fault: TokenFault, times: usize) {
        if times > 0 {
            lock(&self.shared.token_faults).push_back((fault, times));
        }
    }

    /// The next `times` sessions that reach `stage` get `fault` there.
    pub fn script_smtp_fault(&self, stage: SmtpStage, fault: SmtpFault, times: usize) {
        if times > 0 {
            lock(&self.shared.smtp_faults).push(ScriptedSmtpFault {
                stage,
                fault,
                remaining: times,
            });
        }
    }

    /// Forgets every scripted fault not yet used.
    pub fn clear_faults(&self) {
        lock(&self.shared.token_faults).clear();
        lock(&self.shared.smtp_faults).clear();
        lock(&self.shared.graph_faults).clear();
        lock(&self.shared.upload_faults).clear();
    }

    /// The next `times` Graph `sendMail` requests get `fault`. Faults queue in order.
    pub fn script_graph_fault(&self, fault: GraphFault, times: usize) {
        if times > 0 {
            lock(&self.shared.graph_faults).push_back((fault, times));
        }
    }

    /// The next `times` PUTs to upload URLs get `fault` (only [`GraphFault::Error`] applies).
    pub fn script_upload_fault(&self, fault: GraphFault, times: usize) {
        if times > 0 {
            lock(&self.shared.upload_faults).push_back((fault, times));
        }
    }

    /// Scripted Graph faults that have fired.
    pub fn graph_faults_fired(&self) -> u64 {
        self.shared.graph_faults_fired.load(Ordering::Relaxed)
    }

    /// `sendMail` requests seen (whatever their answer).
    pub fn graph_requests(&self) -> u64 {
        self.shared.graph_requests.load(Ordering::Relaxed)
    }

    /// `PUT`s to upload URLs seen (whatever their answer).
    pub fn graph_uploads(&self) -> u64 {
        self.shared.graph_uploads.load(Ordering::Relaxed)
    }

    /// Drafts neither sent nor deleted (orphans of the large-message path), all mailboxes.
    pub fn graph_drafts(&self) -> usize {
        self.shared.graph_drafts.count()
    }

    /// The most Graph requests ever in flight at once for one mailbox.
    pub fn graph_max_in_flight(&self) -> u64 {
        self.shared.graph_max_in_flight.load(Ordering::Relaxed)
    }

    /// RBAC for Applications on the Graph side: no `Mail.Send` role needed, `full_access` decides.
    pub fn set_graph_rbac_mode(&self, on: bool) {
        self.set(|c| c.graph.rbac_mode = on);
    }

    /// Largest `sendMail` request body (base64) accepted; more gets 413.
    pub fn set_graph_max_request_bytes(&self, bytes: u64) {
        self.set(|c| c.graph.max_request_bytes = bytes);
    }

    /// Forgets rate, quota and throttle history (not the live sessions).
    pub fn reset_usage(&self) {
        for u in self.shared.usage().values_mut() {
            u.accepted.clear();
            u.recipients.clear();
            u.send_as_denials = 0;
        }
    }

    /// Requests seen by the token endpoint (including failed and faulted ones).
    pub fn token_requests(&self) -> u64 {
        self.shared.token_requests.load(Ordering::Relaxed)
    }

    /// Access tokens issued.
    pub fn tokens_issued(&self) -> u64 {
        self.shared.tokens_issued.load(Ordering::Relaxed)
    }

    /// Scripted token faults that have fired (each answered one token request).
    pub fn token_faults_fired(&self) -> u64 {
        self.shared.token_faults_fired.load(Ordering::Relaxed)
    }

    /// Scripted token faults not used yet.
    pub fn token_faults_pending(&self) -> usize {
        lock(&self.shared.token_faults).iter().map(|(_, n)| n).sum()
    }

    /// Scripted SMTP faults that have fired at `stage` (each met one session there).
    pub fn smtp_faults_fired(&self, stage: SmtpStage) -> u64 {
        lock(&self.shared.smtp_faults_fired)
            .get(&stage)
            .copied()
            .unwrap_or(0)
    }

    /// Scripted SMTP faults not used yet (at any stage).
    pub fn smtp_faults_pending(&self) -> usize {
        lock(&self.shared.smtp_faults)
            .iter()
            .map(|f| f.remaining)
            .sum()
    }

    /// SMTP connections accepted so far.
    pub fn smtp_connections(&self) -> u64 {
        self.shared.smtp_connections.load(Ordering::Relaxed)
    }

    /// Authenticated sessions open right now for `mailbox`.
    pub fn active_sessions(&self, mailbox: &str) -> usize {
        self.shared
            .usage()
            .get(&mailbox.to_ascii_lowercase())
            .map(|u| u.active_sessions)
            .unwrap_or(0)
    }

    /// The most authenticated sessions `mailbox` had at once so far.
    pub fn peak_sessions(&self, mailbox: &str) -> usize {
        self.shared
            .usage()
            .get(&mailbox.to_ascii_lowercase())
            .map(|u| u.peak_sessions)
            .unwrap_or(0)
    }

    /// `432 4.3.2` answers `mailbox` got so far for its session count or submission rate.
    pub fn throttled(&self, mailbox: &str) -> u64 {
        self.shared
            .usage()
            .get(&mailbox.to_ascii_lowercase())
            .map(|u| u.throttled)
            .unwrap_or(0)
    }

    /// When each transaction for `mailbox` began (an authenticated MAIL FROM), oldest first:
    /// tests see when attempts started, whichever relay made them.
    pub fn mail_times(&self, mailbox: &str) -> Vec<Instant> {
        self.shared
            .usage()
            .get(&mailbox.to_ascii_lowercase())
            .map(|u| u.mail_times.iter().copied().collect())
            .unwrap_or_default()
    }

    /// Signs an access token with the simulator's key from arbitrary claims (tests: expired, wrong audience...).
    pub fn mint_token(&self, claims: &serde_json::Value) -> Result<String, SimError> {
        super::token::sign_claims(&self.shared, claims)
    }

    /// The PEM public key access tokens are signed with.
    pub fn token_signing_public_key_pem(&self) -> String {
        self.shared.signing_key.public_pem.clone()
    }
}
