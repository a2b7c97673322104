//! Token sources: one token request is one HTTP POST to the token endpoint, authenticated with
//! a client secret, a certificate-signed client assertion, or a federated assertion read from a
//! file (`reference/exchange-online-protocol.md` §1.2, §1.3).

use std::collections::VecDeque;
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use sha1::Digest as _;

use crate::config::{AssertionAlg, Config, Secret};
use crate::redact::{self, Registration};

use super::cloud::{Endpoints, endpoints};
use super::error::{OAuthError, parse_token_response};

/// TCP (and TLS) connection set-up bound for a token request.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Whole-request bound for a token request, body included.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);
/// Lifetime of a client assertion (Entra: "5-10 minutes after nbf at most").
pub const ASSERTION_LIFETIME: Duration = Duration::from_secs(600);
const JWT_BEARER: &str = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer";
/// Larger answers are not token responses.
const MAX_BODY: usize = 256 * 1024;
/// Client assertions the scrubber keeps knowing: the current one and the one before.
const KEPT_ASSERTIONS: usize = 2;

/// An access token. The value is only reachable through [`AccessToken::secret`]; `Debug` shows
/// its length, never its text. While any copy is alive the scrubber knows it ([`redact`]).
#[derive(Clone)]
pub struct AccessToken {
    value: String,
    _registered: Option<Arc<Registration>>,
    /// When the token stops being valid (wall clock, for logs and `/healthz`).
    pub expires_at: SystemTime,
    /// When the request that obtained it was sent.
    pub issued_at: SystemTime,
    lifetime: Duration,
    refresh_in: Option<Duration>,
    /// `expires_at` on tokio's clock, so that paused-clock tests and the schedule agree.
    deadline: tokio::time::Instant,
}

impl AccessToken {
    /// A token valid for `lifetime` from now (tests and simulators; the relay gets its tokens
    /// from [`TokenClient::request`]).
    pub fn new(value: impl Into<String>, lifetime: Duration) -> AccessToken {
        AccessToken::issued(
            value.into(),
            lifetime,
            None,
            SystemTime::now(),
            tokio::time::Instant::now(),
        )
    }

    fn issued(
        value: String,
        lifetime: Duration,
        refresh_in: Option<Duration>,
        issued_at: SystemTime,
        started: tokio::time::Instant,
    ) -> AccessToken {
        AccessToken {
            _registered: redact::register(&value).map(Arc::new),
            value,
            expires_at: issued_at + lifetime,
            issued_at,
            lifetime,
            refresh_in,
            deadline: started + lifetime,
        }
    }

    /// The bearer token, for the XOAUTH2 string. Never log it.
    pub fn secret(&self) -> &str {
        &self.value
    }

    /// `expires_in` of the response that carried this token.
    pub fn lifetime(&self) -> Duration {
        self.lifetime
    }

    /// Time left before expiry (zero once expired), on tokio's clock.
    pub fn remaining(&self) -> Duration {
        self.deadline
            .saturating_duration_since(tokio::time::Instant::now())
    }

    /// True once the token has expired.
    pub fn is_expired(&self) -> bool {
        self.remaining().is_zero()
    }

    pub(crate) fn refresh_in(&self) -> Option<Duration> {
        self.refresh_in
    }

    pub(crate) fn deadline(&self) -> tokio::time::Instant {
        self.deadline
    }
}

impl fmt::Debug for AccessToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AccessToken")
            .field("value", &format_args!("<{} bytes>", self.value.len()))
            .field(
                "expires_at",
                &humantime::format_rfc3339_seconds(self.expires_at),
            )
            .field("lifetime", &self.lifetime)
            .finish()
    }
}

/// How the client proves its identity. Files are read again for every request, so a rotated
/// Kubernetes Secret or credential file needs no signal; `config::load` (the secret) and
/// [`TokenClient::from_config`] (certificate and key) read them once before, so an unusable
/// one is a start-up (or reload) error rather than a delivery one.
enum Credential {
    /// `oauth.client_secret` inline.
    Secret(Secret),
    /// `oauth.client_secret_file`, or the systemd credential `client_secret`.
    SecretFile(PathBuf),
    Certificate {
        cert_file: PathBuf,
        key_file: PathBuf,
        alg: AssertionAlg,
        /// As loaded when the client was built (for [`TokenClient::warnings`]).
        loaded: CertificateKey,
    },
    /// A federated token file (Kubernetes workload identity).
    Federated(PathBuf),
}

impl Credential {
    fn kind(&self) -> &'static str {
        match self {
            Credential::Secret(_) | Credential::SecretFile(_) => "client secret",
            Credential::Certificate { .. } => "certificate",
            Credential::Federated(_) => "federated assertion",
        }
    }
}

/// What the last request read from a credential file, with its scrubber registration.
enum LastRead {
    Secret {
        value: Secret,
        _registered: Option<Registration>,
    },
    Key {
        _key: CertificateKey,
    },
}

/// A client secret file as `config::load` reads it: trailing line ends dropped, not empty.
async fn read_secret_file(path: &Path) -> Result<Secret, OAuthError> {
    let text = tokio::fs::read_to_string(path).await.map_err(|e| {
        OAuthError::Credential(format!("oauth.client_secret_file {}: {e}", path.display()))
    })?;
    let value = text.trim_end_matches(['\r', '\n']);
    if value.is_empty() {
        return Err(OAuthError::Credential(format!(
            "oauth.client_secret_file {} is empty",
            path.display()
        )));
    }
    Ok(Secret::new(value))
}

/// A certificate and its private key, loaded once (and again on reload).
struct CertificateKey {
    key: EncodingKey,
    alg: AssertionAlg,
    /// base64url(SHA-256(DER)) for `x5t#S256`.
    x5t_s256: String,
    /// base64url(SHA-1(DER)) for `x5t`.
    x5t: String,
    /// The private key's public half differs from the certificate's.
    mismatch: bool,
    /// The key file's text and DER, known to the scrubber while the key is loaded.
    _registered: Vec<Registration>,
}

impl CertificateKey {
    fn load(cert_file: &Path, key_file: &Path, alg: AssertionAlg) -> Result<Self, OAuthError> {
        let cert = CertificateDer::from_pem_file(cert_file).map_err(|e| {
            OAuthError::Config(format!(
                "oauth.certificate_file {}: {}",
                cert_file.display(),
                pem_problem(&e, "certificate")
            ))
        })?;
        let key_problem = |what: String| {
            OAuthError::Config(format!(
                "oauth.private_key_file {}: {what}",
                key_file.display()
            ))
        };
        let key_der = PrivateKeyDer::from_pem_file(key_file)
            .map_err(|e| key_problem(pem_problem(&e, "private key")))?;
        let mut registered: Vec<Registration> = redact::register_bytes(key_der.secret_der())
            .into_iter()
            .collect();
        if let Ok(text) = std::fs::read_to_string(key_file) {
            registered.extend(redact::register(text.trim()));
        }
        let key = match &key_der {
            PrivateKeyDer::Pkcs1(k) => EncodingKey::from_rsa_der(k.secret_pkcs1_der()),
            PrivateKeyDer::Pkcs8(k) => {
                // jsonwebtoken takes PKCS#8 through its PEM reader (it unwraps the RSA key).
                let pem = format!(
                    "-----BEGIN PRIVATE KEY-----\n{}\n-----END PRIVATE KEY-----\n",
                    STANDARD.encode(k.secret_pkcs8_der())
                );
                EncodingKey::from_rsa_pem(pem.as_bytes())
                    .map_err(|_| key_problem("not an RSA private key".into()))?
            }
            _ => {
                return Err(key_problem(
                    "an EC key; Entra client assertions need an RSA key (PS256 or RS256)".into(),
                ));
            }
        };
        let loaded = CertificateKey {
            key,
            alg,
            x5t_s256: URL_SAFE_NO_PAD.encode(sha2::Sha256::digest(cert.as_ref())),
            x5t: URL_SAFE_NO_PAD.encode(sha1::Sha1::digest(cert.as_ref())),
            mismatch: key_mismatch(&cert, &key_der),
            _registered: registered,
        };
        // Sign once now, so an unusable key is a start-up error rather than a delivery one.
        loaded
            .assertion("urn:check", "check")
            .map_err(|_| key_problem("not a usable RSA private key".into()))?;
        Ok(loaded)
    }

    /// A signed client assertion for `audience` (the token URL) and `client_id`.
    fn assertion(&self, audience: &str, client_id: &str) -> Result<String, OAuthError> {
        let mut header = Header::new(match self.alg {
            AssertionAlg::PS256 => Algorithm::PS256,
            AssertionAlg::RS256 => Algorithm::RS256,
        });
        header.typ = Some("JWT".into());
        match self.alg {
            AssertionAlg::PS256 => header.x5t_s256 = Some(self.x5t_s256.clone()),
            AssertionAlg::RS256 => header.x5t = Some(self.x5t.clone()),
        }
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default()
            .as_secs();
        let claims = serde_json::json!({
            "aud": audience,
            "iss": client_id,
            "sub": client_id,
            "jti": ulid::Ulid::generate().to_string(),
            "nbf": now,
            "iat": now,
            "exp": now + ASSERTION_LIFETIME.as_secs(),
        });
        // The error of a failed signature says nothing about the key; keep only its kind.
        jsonwebtoken::encode(&header, &claims, &self.key).map_err(|e| {
            OAuthError::Credential(format!("cannot sign the client assertion: {:?}", e.kind()))
        })
    }
}

/// True when the key certainly does not belong to the certificate (Entra would answer
/// AADSTS700027). Unknown cases count as a match: Entra has the last word.
fn key_mismatch(cert: &CertificateDer<'_>, key: &PrivateKeyDer<'_>) -> bool {
    let Ok(signer) = rustls::crypto::aws_lc_rs::sign::any_supported_type(key) else {
        return false;
    };
    let certified = rustls::sign::CertifiedKey::new(vec![cert.clone().into_owned()], signer);
    matches!(
        certified.keys_match(),
        Err(rustls::Error::InconsistentKeys(
            rustls::InconsistentKeys::KeyMismatch
        ))
    )
}

/// A PEM problem, described without quoting the file.
fn pem_problem(e: &rustls_pki_types::pem::Error, what: &str) -> String {
    use rustls_pki_types::pem::Error;
    match e {
        Error::Io(io) => format!("cannot read: {io}"),
        Error::NoItemsFound => format!("no PEM {what} found"),
        _ => format!("malformed PEM ({what})"),
    }
}

/// Requests tokens from one endpoint with one credential. [`super::TokenProvider`] owns one and
/// schedules its requests; `check` may use one directly.
pub struct TokenClient {
    http: reqwest::Client,
    endpoints: Endpoints,
    client_id: String,
    credential: Credential,
    /// The client secret, known to the scrubber while this client exists.
    _secret_registered: Option<Registration>,
    /// The secret or key last read from its file (it may have been rotated since the client
    /// was built), known to the scrubber until the next read replaces it.
    last_read: Mutex<Option<LastRead>>,
    /// The last client assertions sent (an echo may arrive after the next one is made).
    assertions: Mutex<VecDeque<Registration>>,
}

impl fmt::Debug for TokenClient {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TokenClient")
            .field("endpoints", &self.endpoints)
            .field("client_id", &self.client_id)
            .field("credential", &self.credential.kind())
            .finish()
    }
}

impl TokenClient {
    /// Builds the client: endpoints, credential (certificate and key are read and checked now),
    /// HTTP client with timeouts. Every configuration problem is returned here.
    pub fn from_config(config: &Config) -> Result<TokenClient, OAuthError> {
        let oauth = &config.oauth;
        let endpoints = endpoints(config)?;
        let client_id = oauth
            .client_id
            .as_deref()
            .map(str::trim)
            .filter(|c| !c.is_empty())
            .ok_or_else(|| OAuthError::Config("oauth.client_id is required".into()))?
            .to_string();
        let has_cert = oauth.certificate_file.is_some() || oauth.private_key_file.is_some();
        // The file the secret came from, if any: it is read again at every request.
        let secret_file = oauth
            .client_secret_source
            .as_ref()
            .or(oauth.client_secret_file.as_ref());
        // (After `config::load` a secret from a file is also in `client_secret`.)
        let credential = match (
            secret_file,
            &oauth.client_secret,
            has_cert,
            &oauth.assertion_file,
        ) {
            (Some(path), _, false, None) => Credential::SecretFile(path.clone()),
            (None, Some(secret), false, None) => Credential::Secret(secret.clone()),
            (None, None, true, None) => {
                let (Some(cert), Some(key)) = (&oauth.certificate_file, &oauth.private_key_file)
                else {
                    return Err(OAuthError::Config(
                        "oauth.certificate_file and oauth.private_key_file go together".into(),
                    ));
                };
                Credential::Certificate {
                    cert_file: cert.clone(),
                    key_file: key.clone(),
                    alg: oauth.assertion_alg,
                    loaded: CertificateKey::load(cert, key, oauth.assertion_alg)?,
                }
            }
            (None, None, false, Some(file)) => Credential::Federated(file.clone()),
            (None, None, false, None) => {
                return Err(OAuthError::Config(
                    "no credential: set oauth.client_secret (or client_secret_file), \
                     oauth.certificate_file + oauth.private_key_file, or oauth.assertion_file"
                        .into(),
                ));
            }
            _ => {
                return Err(OAuthError::Config(
                    "set exactly one credential: client secret, certificate or assertion_file"
                        .into(),
                ));
            }
        };
        let mut builder = reqwest::Client::builder()
            .connect_timeout(CONNECT_TIMEOUT)
            .timeout(REQUEST_TIMEOUT)
            // A redirect would re-send the credential to another place: never follow one.
            .redirect(reqwest::redirect::Policy::none())
            .user_agent(concat!("smtp-oauth-relay/", env!("CARGO_PKG_VERSION")));
        if let Some(ca) = &config.upstream.ca_file {
            let pem = std::fs::read(ca).map_err(|e| {
                OAuthError::Config(format!("upstream.ca_file {}: {e}", ca.display()))
            })?;
            let certs = reqwest::Certificate::from_pem_bundle(&pem).map_err(|e| {
                OAuthError::Config(format!("upstream.ca_file {}: {e}", ca.display()))
            })?;
            builder = builder.tls_certs_merge(certs);
        }
        let http = builder
            .build()
            .map_err(|e| OAuthError::Config(format!("cannot build the HTTP client: {e}")))?;
        // A secret from a file was read by `config::load` too: that value is known at once.
        let secret_registered = match (&credential, &oauth.client_secret) {
            (Credential::Secret(secret), _) | (Credential::SecretFile(_), Some(secret)) => {
                redact::register(secret.expose())
            }
            _ => None,
        };
        let client = TokenClient {
            http,
            endpoints,
            client_id,
            credential,
            _secret_registered: secret_registered,
            last_read: Mutex::new(None),
            assertions: Mutex::new(VecDeque::new()),
        };
        for w in client.warnings() {
            tracing::warn!("{w}");
        }
        Ok(client)
    }

    pub fn endpoints(&self) -> &Endpoints {
        &self.endpoints
    }

    /// Problems found while loading that do not stop the relay but will most likely make Entra
    /// refuse it (a private key that does not belong to the certificate). Also logged.
    pub fn warnings(&self) -> Vec<String> {
        match &self.credential {
            Credential::Certificate { loaded: c, .. } if c.mismatch => vec![
                "oauth.private_key_file does not belong to oauth.certificate_file: \
                 Entra will answer AADSTS700027 (invalid signature)"
                    .to_string(),
            ],
            _ => Vec::new(),
        }
    }

    /// `"client secret"`, `"certificate"` or `"federated assertion"`.
    pub fn credential_kind(&self) -> &'static str {
        self.credential.kind()
    }

    /// Keeps what a request read from a credential file (a secret only when it changed).
    fn remember(&self, read: LastRead) {
        let mut last = self.last_read.lock().unwrap_or_else(|e| e.into_inner());
        if let (LastRead::Secret { value: new, .. }, Some(LastRead::Secret { value: old, .. })) =
            (&read, &*last)
            && new == old
        {
            return;
        }
        *last = Some(read);
    }

    /// One token request: one HTTP POST, bounded by [`CONNECT_TIMEOUT`] and [`REQUEST_TIMEOUT`].
    pub async fn request(&self) -> Result<AccessToken, OAuthError> {
        let mut form: Vec<(&str, &str)> = vec![
            ("grant_type", "client_credentials"),
            ("client_id", &self.client_id),
            ("scope", &self.endpoints.scope),
        ];
        let assertion;
        let from_file;
        match &self.credential {
            Credential::Secret(secret) => form.push(("client_secret", secret.expose())),
            Credential::SecretFile(path) => {
                from_file = read_secret_file(path).await?;
                self.remember(LastRead::Secret {
                    value: from_file.clone(),
                    _registered: redact::register(from_file.expose()),
                });
                form.push(("client_secret", from_file.expose()));
            }
            Credential::Certificate {
                cert_file,
                key_file,
                alg,
                ..
            } => {
                // Read again: a renewed certificate and key replace the files in place.
                let (cert, key, alg) = (cert_file.clone(), key_file.clone(), *alg);
                let cert =
                    tokio::task::spawn_blocking(move || CertificateKey::load(&cert, &key, alg))
                        .await
                        .map_err(|e| {
                            OAuthError::Credential(format!("loading the certificate: {e}"))
                        })??;
                assertion = cert.assertion(&self.endpoints.token_url, &self.client_id)?;
                // Keeps the (maybe renewed) key registered with the scrubber.
                self.remember(LastRead::Key { _key: cert });
                form.push(("client_assertion_type", JWT_BEARER));
                form.push(("client_assertion", &assertion));
            }
            Credential::Federated(path) => {
                assertion = read_assertion(path).await?;
                form.push(("client_assertion_type", JWT_BEARER));
                form.push(("client_assertion", &assertion));
            }
        }
        if let Some(a) = form
            .iter()
            .find(|(k, _)| *k == "client_assertion")
            .and_then(|(_, v)| redact::register(v))
        {
            let mut kept = self.assertions.lock().unwrap_or_else(|e| e.into_inner());
            kept.push_back(a);
            while kept.len() > KEPT_ASSERTIONS {
                kept.pop_front();
            }
        }
        let sensitive: Vec<&str> = form
            .iter()
            .filter(|(k, _)| *k == "client_secret" || *k == "client_assertion")
            .map(|(_, v)| *v)
            .collect();
        tracing::debug!(
            token_url = %self.endpoints.token_url,
            credential = self.credential.kind(),
            "requesting an access token"
        );
        let issued_at = SystemTime::now();
        let started = tokio::time::Instant::now();
        let response = self
            .http
            .post(&self.endpoints.token_url)
            .header(reqwest::header::ACCEPT, "application/json")
            .form(&form)
            .send()
            .await
            .map_err(|e| transport_error(&e, &sensitive))?;
        let status = response.status().as_u16();
        let retry_after = response
            .headers()
            .get(reqwest::header::RETRY_AFTER)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned);
        let body = read_body(response)
            .await
            .map_err(|e| transport_error(&e, &sensitive))?;
        let parsed = parse_token_response(status, retry_after.as_deref(), &body, &sensitive)?;
        Ok(AccessToken::issued(
            parsed.access_token,
            parsed.expires_in,
            parsed.refresh_in,
            issued_at,
            started,
        ))
    }
}

/// Reads at most [`MAX_BODY`] bytes of the answer.
async fn read_body(mut response: reqwest::Response) -> Result<Vec<u8>, reqwest::Error> {
    let mut body = Vec::new();
    while let Some(chunk) = response.chunk().await? {
        body.extend_from_slice(&chunk);
        if body.len() > MAX_BODY {
            body.truncate(MAX_BODY);
            break;
        }
    }
    Ok(body)
}

/// The federated token file, read afresh: the platform rotates it.
async fn read_assertion(path: &Path) -> Result<String, OAuthError> {
    let text = tokio::fs::read_to_string(path).await.map_err(|e| {
        OAuthError::Credential(format!("oauth.assertion_file {}: {e}", path.display()))
    })?;
    let value = text.trim();
    if value.is_empty() {
        return Err(OAuthError::Credential(format!(
            "oauth.assertion_file {} is empty",
            path.display()
        )));
    }
    Ok(value.to_string())
}

/// A reqwest failure as a transient error, with its cause chain but no credential.
fn transport_error(e: &reqwest::Error, sensitive: &[&str]) -> OAuthError {
    let mut text = e.to_string();
    let mut source = std::error::Error::source(e);
    while let Some(s) = source {
        let part = s.to_string();
        if !text.contains(&part) {
            text.push_str(": ");
            text.push_str(&part);
        }
        source = s.source();
    }
    let text = redact::scrub_with(&text, sensitive);
    if e.is_timeout() {
        OAuthError::Timeout(text)
    } else {
        OAuthError::Network(text)
    }
}
