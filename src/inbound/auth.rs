//! Optional inbound AUTH PLAIN / LOGIN (RFC 4954, RFC 4616), for devices that refuse to send
//! without authenticating. The relay's upstream identity is separate: these credentials only
//! decide who may hand mail to the relay.

use std::collections::HashMap;
use std::net::IpAddr;
use std::path::Path;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use smtp_proto::request::receiver::LineReceiver;
use smtp_proto::{AUTH_LOGIN, AUTH_PLAIN};

use super::reply;
use super::session::{Session, State};

/// Wrong credentials are answered only after this pause, to slow down guessing.
const FAILED_AUTH_DELAY: Duration = Duration::from_secs(1);

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AuthPolicy {
    /// AUTH is not offered; mail is accepted from allowed networks without it.
    Off,
    /// AUTH is offered and any credentials succeed; mail without AUTH is accepted too.
    AcceptAny,
    /// AUTH is required before MAIL and checked against a users file of argon2 PHC strings.
    Users(Arc<HashMap<String, String>>),
}

/// Why a password could not be hashed (`hash-password`).
#[derive(Debug, thiserror::Error)]
pub enum HashError {
    #[error("cannot hash the password: {0}")]
    Hash(String),
}

/// An argon2id PHC string (`$argon2id$v=19$m=...`) for a users file line `user:HASH`.
pub fn hash_password(password: &str) -> Result<String, HashError> {
    use argon2::password_hash::{PasswordHasher, SaltString, rand_core::OsRng};
    let salt = SaltString::generate(&mut OsRng);
    argon2::Argon2::default()
        .hash_password(password.as_bytes(), &salt)
        .map(|h| h.to_string())
        .map_err(|e| HashError::Hash(e.to_string()))
}

/// Checked against for unknown users, so that the time taken does not tell which users exist.
fn dummy_hash() -> &'static str {
    static DUMMY: OnceLock<String> = OnceLock::new();
    // A hashing failure leaves an unparsable string: verification then fails (as it must).
    DUMMY.get_or_init(|| hash_password("no such user").unwrap_or_default())
}

/// argon2's own verification (constant-time comparison of the derived key).
fn verify_hash(phc: &str, password: &str) -> bool {
    use argon2::password_hash::{PasswordHash, PasswordVerifier};
    PasswordHash::new(phc).is_ok_and(|hash| {
        argon2::Argon2::default()
            .verify_password(password.as_bytes(), &hash)
            .is_ok()
    })
}

impl AuthPolicy {
    /// `"off"`, `"accept-any"`, or the path of a users file with `user:HASH` lines, HASH an
    /// argon2 PHC string from `smtp-oauth-relay hash-password` (`#` starts a comment).
    pub fn from_setting(setting: &str) -> Result<AuthPolicy, String> {
        match setting {
            "off" => Ok(AuthPolicy::Off),
            "accept-any" => Ok(AuthPolicy::AcceptAny),
            path => {
                let text = std::fs::read_to_string(Path::new(path))
                    .map_err(|e| format!("cannot read users file {path}: {e}"))?;
                let mut users = HashMap::new();
                for (n, line) in text.lines().enumerate() {
                    let line = line.trim();
                    if line.is_empty() || line.starts_with('#') {
                        continue;
                    }
                    let (user, hash) = line.split_once(':').ok_or_else(|| {
                        format!("users file {path} line {}: expected user:HASH", n + 1)
                    })?;
                    // Never echo the value: a plaintext password must not reach the logs.
                    if !hash.starts_with("$argon2") {
                        return Err(format!(
                            "users file {path} line {}: the password of {user:?} is not an argon2 \
                             hash (plaintext passwords are refused); make one with \
                             `smtp-oauth-relay hash-password` and write {user}:<hash>",
                            n + 1
                        ));
                    }
                    if argon2::password_hash::PasswordHash::new(hash).is_err() {
                        return Err(format!(
                            "users file {path} line {}: the hash of {user:?} is not a valid argon2 \
                             PHC string; make one with `smtp-oauth-relay hash-password`",
                            n + 1
                        ));
                    }
                    users.insert(user.to_string(), hash.to_string());
                }
                if users.is_empty() {
                    return Err(format!("users file {path} lists no users"));
                }
                Ok(AuthPolicy::Users(Arc::new(users)))
            }
        }
    }

    pub fn is_required(&self) -> bool {
        matches!(self, AuthPolicy::Users(_))
    }

    /// argon2 is slow on purpose: run it on the blocking pool, never on the async threads.
    async fn verify(&self, user: String, password: String) -> bool {
        match self {
            AuthPolicy::Off => false,
            AuthPolicy::AcceptAny => true,
            AuthPolicy::Users(users) => {
                let users = Arc::clone(users);
                tokio::task::spawn_blocking(move || match users.get(&user) {
                    Some(phc) => verify_hash(phc, &password),
                    None => {
                        verify_hash(dummy_hash(), &password);
                        false
                    }
                })
                .await
                .unwrap_or(false)
            }
        }
    }
}

/// Failed AUTH attempts per client IP: the failure that reaches [`MAX_FAILURES`] within
/// [`FAILURE_WINDOW`] ends the connection (421 4.7.0), and so does any AUTH from that address
/// until the window has passed.
pub const MAX_FAILURES: u32 = 5;
pub const FAILURE_WINDOW: Duration = Duration::from_secs(600);
/// Entries kept at most: a spray from many addresses cannot grow memory without bound.
const MAX_TRACKED: usize = 4096;

#[derive(Debug, Default)]
pub struct AuthFailures {
    table: Mutex<HashMap<IpAddr, (u32, Instant)>>,
}

impl AuthFailures {
    pub fn blocked(&self, ip: IpAddr) -> bool {
        let table = self.table.lock().unwrap_or_else(|p| p.into_inner());
        table
            .get(&ip)
            .is_some_and(|(n, since)| *n >= MAX_FAILURES && since.elapsed() < FAILURE_WINDOW)
    }

    /// Counts a failure; true when this one reached the limit.
    pub fn record(&self, ip: IpAddr) -> bool {
        let mut table = self.table.lock().unwrap_or_else(|p| p.into_inner());
        if table.len() >= MAX_TRACKED && !table.contains_key(&ip) {
            table.retain(|_, (_, since)| since.elapsed() < FAILURE_WINDOW);
            if table.len() >= MAX_TRACKED {
                // Still full of live entries: forget the oldest one.
                let oldest = table.iter().min_by_key(|(_, (_, s))| *s).map(|(k, _)| *k);
                if let Some(k) = oldest {
                    table.remove(&k);
                }
            }
        }
        let entry = table.entry(ip).or_insert((0, Instant::now()));
        if entry.1.elapsed() >= FAILURE_WINDOW {
            *entry = (0, Instant::now());
        }
        entry.0 += 1;
        entry.0 >= MAX_FAILURES
    }

    pub fn len(&self) -> usize {
        self.table.lock().unwrap_or_else(|p| p.into_inner()).len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// What the next SASL line from the client is.
#[derive(Debug, Default)]
pub enum SaslStep {
    PlainResponse,
    LoginUser,
    LoginPassword(String),
    #[default]
    Done,
}

impl Session {
    pub(super) async fn handle_auth(&mut self, mechanism: u64, initial_response: String) {
        if self.shared.settings.auth == AuthPolicy::Off {
            return self.reply(reply::NOT_IMPLEMENTED);
        }
        if !self.auth_allowed() {
            return self.reply(reply::ENCRYPTION_REQUIRED);
        }
        if self.auth_user.is_some() {
            return self.reply(reply::ALREADY_AUTHENTICATED);
        }
        if self.shared.auth_failures.blocked(self.peer.ip()) {
            return self.refuse_guessing();
        }
        if self.tx.is_some() {
            return self.reply(reply::BAD_SEQUENCE);
        }
        let initial = (!initial_response.is_empty()).then_some(initial_response);
        match mechanism {
            AUTH_PLAIN => match initial {
                Some(ir) => {
                    self.handle_sasl_line(SaslStep::PlainResponse, ir.into_bytes())
                        .await
                }
                None => self.ask(SaslStep::PlainResponse, ""),
            },
            AUTH_LOGIN => match initial {
                Some(ir) => {
                    self.handle_sasl_line(SaslStep::LoginUser, ir.into_bytes())
                        .await
                }
                // base64("Username:")
                None => self.ask(SaslStep::LoginUser, "VXNlcm5hbWU6"),
            },
            _ => self.reply(reply::AUTH_MECHANISM_UNKNOWN),
        }
    }

    /// Passwords only over TLS, except from loopback (unless
    /// `smtp.allow_plaintext_auth_on_loopback` is off): nothing on the wire to sniff there.
    pub(super) fn auth_allowed(&self) -> bool {
        self.tls
            || self.local
            || (self.shared.settings.plaintext_auth_on_loopback && self.peer.ip().is_loopback())
    }

    fn ask(&mut self, step: SaslStep, challenge: &str) {
        self.reply_raw(format!("334 {challenge}\r\n").as_bytes());
        self.state = State::Sasl(LineReceiver::new(step));
    }

    pub(super) async fn handle_sasl_line(&mut self, step: SaslStep, line: Vec<u8>) {
        let line = String::from_utf8_lossy(&line).trim().to_string();
        if line == "*" {
            return self.reply(reply::AUTH_CANCELLED);
        }
        // RFC 4954 §4: "=" is an empty initial response.
        let decoded = if line == "=" {
            Ok(Vec::new())
        } else {
            STANDARD.decode(line.as_bytes())
        };
        let Ok(decoded) = decoded else {
            return self.reply(reply::AUTH_BAD_BASE64);
        };
        match step {
            SaslStep::PlainResponse => {
                // RFC 4616: [authzid] NUL authcid NUL passwd
                let mut parts = decoded.split(|b| *b == 0);
                let (_authz, user, password) = (parts.next(), parts.next(), parts.next());
                match (user, password, parts.next()) {
                    (Some(user), Some(password), None) => {
                        let user = String::from_utf8_lossy(user).into_owned();
                        let password = String::from_utf8_lossy(password).into_owned();
                        self.finish_auth(user, password).await;
                    }
                    _ => self.reply(reply::AUTH_BAD_BASE64),
                }
            }
            SaslStep::LoginUser => {
                let user = String::from_utf8_lossy(&decoded).into_owned();
                // base64("Password:")
                self.ask(SaslStep::LoginPassword(user), "UGFzc3dvcmQ6");
            }
            SaslStep::LoginPassword(user) => {
                let password = String::from_utf8_lossy(&decoded).into_owned();
                self.finish_auth(user, password).await;
            }
            SaslStep::Done => self.reply(reply::AUTH_TEMP_FAILURE),
        }
    }

    async fn finish_auth(&mut self, user: String, password: String) {
        let ok = self
            .shared
            .settings
            .auth
            .verify(user.clone(), password)
            .await;
        if ok {
            tracing::info!(client = %self.peer, user = %user, "client authenticated");
            self.auth_user = Some(user);
            self.reply(reply::AUTH_OK);
        } else {
            tracing::warn!(client = %self.peer, user = %user, "client authentication failed");
            let limit = self.shared.auth_failures.record(self.peer.ip());
            tokio::time::sleep(FAILED_AUTH_DELAY).await;
            self.reply(reply::AUTH_INVALID);
            if limit {
                tracing::warn!(client = %self.peer, "too many failed authentications: AUTH refused for this address");
                self.refuse_guessing();
            }
        }
    }

    /// 421 and disconnect: a guesser gets no further attempts on this connection.
    fn refuse_guessing(&mut self) {
        if self.closing() {
            // Already saying 421 (smtp.max_errors reached by the same reply).
            return;
        }
        self.close_after_reply();
        self.reply(reply::AUTH_TOO_MANY_FAILURES);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_failure_table_stays_bounded_and_limits_per_address() {
        let failures = AuthFailures::default();
        let a: IpAddr = [192, 0, 2, 1].into();
        for i in 1..MAX_FAILURES {
            assert!(!failures.record(a), "limit reached after {i}");
            assert!(!failures.blocked(a));
        }
        assert!(failures.record(a));
        assert!(failures.blocked(a));
        for n in 0..(MAX_TRACKED as u32 + 100) {
            failures.record(IpAddr::from(std::net::Ipv6Addr::from(u128::from(n) + 1)));
        }
        assert!(failures.len() <= MAX_TRACKED, "{}", failures.len());
    }
}
