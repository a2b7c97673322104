//! Token endpoint responses: the success body, Entra ID's error body (AADSTS codes, trace and
//! correlation ids), `Retry-After`, and the transient/permanent split the deliverer relies on
//! (`reference/exchange-online-protocol.md` §1.4, §1.5).
//!
//! No variant ever holds a secret, an assertion or a token: descriptions are cut to their first
//! line and scrubbed of every credential value the request carried.

use std::fmt;
use std::time::{Duration, SystemTime};

use serde::Deserialize;

/// Why no access token could be obtained.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum OAuthError {
    /// The `[oauth]` configuration cannot work (missing key, unreadable certificate or key,
    /// refused token URL). Permanent until the configuration is fixed.
    #[error("oauth configuration: {0}")]
    Config(String),
    /// The credential could not be produced for this request (assertion file unreadable or
    /// empty, signing failed). Permanent until fixed.
    #[error("oauth credential: {0}")]
    Credential(String),
    /// Entra ID answered with an OAuth error body.
    #[error("{}", DisplayEntra(self))]
    Entra {
        http_status: u16,
        /// The OAuth `error` (`invalid_client`, `invalid_scope`, `temporarily_unavailable`, ...).
        error: String,
        /// The AADSTS numbers (`7000215` for a wrong secret, `700027` for a bad signature, ...).
        error_codes: Vec<u32>,
        /// First line of `error_description`, without any credential.
        description: String,
        trace_id: Option<Box<str>>,
        correlation_id: Option<Box<str>>,
        retry_after: Option<Duration>,
    },
    /// An HTTP error status without an OAuth error body (proxies, gateways, a wrong URL).
    #[error("token endpoint answered HTTP {http_status} without an OAuth error body{}", retry_suffix(.retry_after))]
    Http {
        http_status: u16,
        retry_after: Option<Duration>,
    },
    /// The endpoint could not be reached (DNS, connect, TLS, reset).
    #[error("token endpoint unreachable: {0}")]
    Network(String),
    /// No complete answer within the request timeout.
    #[error("token endpoint did not answer in time ({0})")]
    Timeout(String),
    /// A response that is not what the protocol promises (bad JSON, no `access_token`, ...).
    #[error("token endpoint sent a malformed response (HTTP {http_status}): {detail}")]
    Malformed { http_status: u16, detail: String },
    /// The first token request has not completed within the wait bound of `TokenProvider::token`.
    #[error("no access token yet: the first token request did not complete within {0:?}")]
    NotReady(Duration),
    /// The token provider has shut down.
    #[error("the token provider has stopped")]
    Stopped,
}

/// AADSTS codes that mean "try again later" even when they arrive with a 4xx status.
const TRANSIENT_CODES: &[u32] = &[
    50033, // RetryableError
    50196, // LoopDetected: slow down
    90006, // ExternalServerRetryableError
    90024, // RequestBudgetExceededError
    90033, // MsodsServiceUnavailable
    90055, // TenantThrottlingError
];

impl OAuthError {
    /// True for failures that heal by themselves (HTTP 429 and 5xx, `temporarily_unavailable`,
    /// throttling codes, network trouble, timeouts, malformed answers): retry soon with backoff.
    /// False for configuration errors (HTTP 400/401 AADSTS, unreadable credentials): the relay
    /// holds mail and retries slowly.
    pub fn is_transient(&self) -> bool {
        match self {
            OAuthError::Config(_) | OAuthError::Credential(_) => false,
            OAuthError::Entra {
                http_status,
                error,
                error_codes,
                ..
            } => {
                transient_status(*http_status)
                    || error == "temporarily_unavailable"
                    || error_codes.iter().any(|c| TRANSIENT_CODES.contains(c))
            }
            OAuthError::Http { http_status, .. } => transient_status(*http_status),
            OAuthError::Network(_)
            | OAuthError::Timeout(_)
            | OAuthError::Malformed { .. }
            | OAuthError::NotReady(_)
            | OAuthError::Stopped => true,
        }
    }

    /// The delay the endpoint asked for with `Retry-After`, if any.
    pub fn retry_after(&self) -> Option<Duration> {
        match self {
            OAuthError::Entra { retry_after, .. } | OAuthError::Http { retry_after, .. } => {
                *retry_after
            }
            _ => None,
        }
    }

    /// The AADSTS codes (empty unless Entra answered with an error body).
    pub fn error_codes(&self) -> &[u32] {
        match self {
            OAuthError::Entra { error_codes, .. } => error_codes,
            _ => &[],
        }
    }

    /// The HTTP status of the answer, when there was one.
    pub fn http_status(&self) -> Option<u16> {
        match self {
            OAuthError::Entra { http_status, .. }
            | OAuthError::Http { http_status, .. }
            | OAuthError::Malformed { http_status, .. } => Some(*http_status),
            _ => None,
        }
    }

    /// What an administrator should check, for the AADSTS codes a relay meets in practice.
    pub fn hint(&self) -> Option<&'static str> {
        self.error_codes().iter().find_map(|c| hint_for(*c))
    }
}

/// The fixes speak the language of the Microsoft 365 setup guide (App registrations, Enterprise
/// applications, Certificates & secrets, API permissions); `check` prints them and logs append them.
fn hint_for(code: u32) -> Option<&'static str> {
    Some(match code {
        7000215 => {
            "oauth.client_secret must be the client secret's Value, not its Secret ID: in the Azure portal \
             open App registrations > your app > Certificates & secrets, create a New client secret and copy \
             its Value right away (it is shown only once)"
        }
        7000222 => {
            "the client secret has expired: App registrations > your app > Certificates & secrets > New client \
             secret, put its Value in oauth.client_secret and delete the expired one (or use a certificate)"
        }
        7000218 | 7000216 | 900144 => {
            "no credential reached Entra ID: set oauth.client_secret (the secret's Value) or \
             oauth.client_secret_file, oauth.certificate_file + oauth.private_key_file, or oauth.assertion_file"
        }
        700016 => {
            "the app is not in this tenant: oauth.client_id must be the Application (client) ID and \
             oauth.tenant_id the Directory (tenant) ID, both from the app registration's Overview; for GCC High, \
             DoD or China set upstream.cloud"
        }
        90002 | 900023 => {
            "tenant not found: oauth.tenant_id must be the Directory (tenant) ID from the app registration's \
             Overview (or a verified domain such as contoso.onmicrosoft.com); for GCC High, DoD or China set \
             upstream.cloud"
        }
        700027 => {
            "the certificate is not registered on the app: upload oauth.certificate_file under App registrations \
             > your app > Certificates & secrets > Certificates, and make sure oauth.private_key_file is its key"
        }
        700024 => "the client assertion is outside its validity window: check this host's clock",
        70011 | 1002012 | 700022 | 700023 => {
            "oauth.scope must be a single resource followed by /.default: remove oauth.scope to use \
             https://outlook.office365.com/.default (or the one of upstream.cloud)"
        }
        500011 => {
            "Office 365 Exchange Online is not in this tenant or not consented: check upstream.cloud and that the \
             tenant has Exchange Online, then in App registrations > your app > API permissions add \
             SMTP.SendAsApp and Grant admin consent"
        }
        65001 => {
            "admin consent is missing: App registrations > your app > API permissions > Grant admin consent \
             (Office 365 Exchange Online > SMTP.SendAsApp)"
        }
        7000112 | 70001 => {
            "the application is disabled: Enterprise applications > your app > Properties > Enabled for users to \
             sign-in = Yes"
        }
        53003 | 530032 => {
            "a Conditional Access policy blocks this service principal: exclude it from the policy"
        }
        _ => return None,
    })
}

fn transient_status(status: u16) -> bool {
    status == 408 || status == 429 || status >= 500
}

fn retry_suffix(retry_after: &Option<Duration>) -> String {
    match retry_after {
        Some(d) => format!(" (Retry-After {}s)", d.as_secs()),
        None => String::new(),
    }
}

struct DisplayEntra<'a>(&'a OAuthError);

impl fmt::Display for DisplayEntra<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let OAuthError::Entra {
            http_status,
            error,
            error_codes,
            description,
            trace_id,
            correlation_id,
            retry_after,
        } = self.0
        else {
            return Ok(());
        };
        write!(
            f,
            "Entra ID refused the token request: HTTP {http_status} {error}"
        )?;
        // The description normally starts with "AADSTS<code>:"; name the codes when it does not.
        let codes_named = error_codes
            .iter()
            .all(|c| description.contains(&format!("AADSTS{c}")));
        if !codes_named {
            let codes: Vec<String> = error_codes.iter().map(|c| format!("AADSTS{c}")).collect();
            write!(f, " [{}]", codes.join(", "))?;
        }
        if !description.is_empty() {
            write!(f, ": {description}")?;
        }
        write!(
            f,
            " (trace_id {}, correlation_id {})",
            trace_id.as_deref().unwrap_or("-"),
            correlation_id.as_deref().unwrap_or("-")
        )?;
        f.write_str(&retry_suffix(retry_after))?;
        if let Some(hint) = self.0.hint() {
            write!(f, "; hint: {hint}")?;
        }
        Ok(())
    }
}

/// A successful token response.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct TokenResponse {
    pub access_token: String,
    pub expires_in: Duration,
    /// ESTS's suggested refresh time, when present.
    pub refresh_in: Option<Duration>,
}

#[derive(Deserialize)]
struct SuccessBody {
    token_type: Option<String>,
    expires_in: Option<NumberOrString>,
    refresh_in: Option<NumberOrString>,
    access_token: Option<String>,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum NumberOrString {
    Number(f64),
    Text(String),
}

impl NumberOrString {
    fn seconds(&self) -> Option<Duration> {
        let n = match self {
            NumberOrString::Number(n) => *n,
            NumberOrString::Text(t) => t.trim().parse::<f64>().ok()?,
        };
        (0.0..1e9)
            .contains(&n)
            .then(|| Duration::from_secs(n as u64))
    }
}

#[derive(Deserialize)]
struct ErrorBody {
    error: Option<String>,
    error_description: Option<String>,
    error_codes: Option<Vec<u32>>,
    trace_id: Option<String>,
    correlation_id: Option<String>,
}

/// Longest description kept (Entra's first lines are well below this).
const MAX_DESCRIPTION: usize = 400;
/// Longest token lifetime believed (token lifetime policies allow at most one day).
pub const MAX_LIFETIME: Duration = Duration::from_secs(86_400);

/// Interprets one token endpoint answer. `retry_after` is the raw `Retry-After` header;
/// `sensitive` lists the credential values the request carried, which are scrubbed from any text
/// kept from the answer.
pub(crate) fn parse_token_response(
    http_status: u16,
    retry_after: Option<&str>,
    body: &[u8],
    sensitive: &[&str],
) -> Result<TokenResponse, OAuthError> {
    let retry_after = retry_after.and_then(|v| parse_retry_after(v, SystemTime::now()));
    if (200..300).contains(&http_status) {
        let malformed = |detail: String| OAuthError::Malformed {
            http_status,
            detail,
        };
        let parsed: SuccessBody = serde_json::from_slice(body)
            // serde_json may quote a value of the body in its message.
            .map_err(|e| {
                malformed(format!(
                    "not a JSON token response ({})",
                    scrub(&e.to_string(), sensitive)
                ))
            })?;
        let access_token = parsed
            .access_token
            .filter(|t| !t.is_empty())
            .ok_or_else(|| malformed("no access_token".into()))?;
        if let Some(tt) = &parsed.token_type
            && !tt.eq_ignore_ascii_case("bearer")
        {
            return Err(malformed(format!(
                "token_type `{}` is not Bearer",
                scrub(tt, sensitive)
            )));
        }
        let expires_in = parsed
            .expires_in
            .as_ref()
            .and_then(NumberOrString::seconds)
            .ok_or_else(|| malformed("expires_in missing or not a number of seconds".into()))?;
        let refresh_in = parsed
            .refresh_in
            .as_ref()
            .and_then(NumberOrString::seconds)
            .map(|r| r.min(MAX_LIFETIME));
        // Entra's longest configurable lifetime is a day: a longer claim is not believed, so
        // the refresher never sleeps for years on a token that expires in an hour.
        let expires_in = expires_in.min(MAX_LIFETIME);
        return Ok(TokenResponse {
            access_token,
            expires_in,
            refresh_in,
        });
    }
    match serde_json::from_slice::<ErrorBody>(body) {
        Ok(b) if b.error.is_some() => {
            // Scrubbed whole before it is cut: a secret spanning lines (a PEM key) or the
            // length limit must not leave a piece behind.
            let full = scrub(&b.error_description.unwrap_or_default(), sensitive);
            let first = full.lines().next().unwrap_or("").trim();
            let mut description = first.to_string();
            if description.len() > MAX_DESCRIPTION {
                let mut cut = MAX_DESCRIPTION;
                while !description.is_char_boundary(cut) {
                    cut -= 1;
                }
                description.truncate(cut);
                description.push('…');
            }
            let error_codes = match b.error_codes {
                Some(codes) if !codes.is_empty() => codes,
                _ => codes_in(&full),
            };
            let trace_id = b
                .trace_id
                .or_else(|| labelled(&full, "Trace ID:"))
                .map(|v| scrub(&v, sensitive).into());
            let correlation_id = b
                .correlation_id
                .or_else(|| labelled(&full, "Correlation ID:"))
                .map(|v| scrub(&v, sensitive).into());
            Err(OAuthError::Entra {
                http_status,
                error: scrub(b.error.as_deref().unwrap_or_default(), sensitive),
                error_codes,
                description,
                trace_id,
                correlation_id,
                retry_after,
            })
        }
        _ => Err(OAuthError::Http {
            http_status,
            retry_after,
        }),
    }
}

/// Every encoding of every secret the relay holds, and of the request's own credential values,
/// replaced with `<redacted>` (see [`crate::redact`]).
fn scrub(text: &str, sensitive: &[&str]) -> String {
    crate::redact::scrub_with(text, sensitive)
}

/// The AADSTS numbers mentioned in a description (when `error_codes` is absent).
fn codes_in(text: &str) -> Vec<u32> {
    let mut codes = Vec::new();
    for (i, _) in text.match_indices("AADSTS") {
        let digits: String = text[i + 6..]
            .chars()
            .take_while(char::is_ascii_digit)
            .collect();
        if let Ok(c) = digits.parse::<u32>()
            && !codes.contains(&c)
        {
            codes.push(c);
        }
    }
    codes
}

/// The value after `label` on its line (`Trace ID: <guid>`).
fn labelled(text: &str, label: &str) -> Option<String> {
    text.lines()
        .find_map(|l| l.trim().strip_prefix(label))
        .map(|v| v.trim().to_string())
        .filter(|v| !v.is_empty())
}

/// `Retry-After` as delay-seconds or an HTTP date (RFC 9110 §10.2.3). A date in the past gives
/// zero; anything unparseable gives `None`.
pub fn parse_retry_after(value: &str, now: SystemTime) -> Option<Duration> {
    let v = value.trim();
    if let Ok(secs) = v.parse::<u64>() {
        return Some(Duration::from_secs(secs));
    }
    let at = httpdate::parse_http_date(v).ok()?;
    Some(at.duration_since(now).unwrap_or(Duration::ZERO))
}

#[cfg(test)]
mod tests {
    use super::*;

    // Bodies as in reference/exchange-online-protocol.md §1.5.
    const INVALID_SCOPE: &str = r#"{
  "error": "invalid_scope",
  "error_description": "AADSTS70011: The provided value for the input parameter 'scope' is not valid. The scope https://foo.microsoft.com/.default is not valid.\r\nTrace ID: 255d1aef-8c98-452f-ac51-23d051240864\r\nCorrelation ID: fb3d2015-bc17-4bb9-bb85-30c5cf1aaaa7\r\nTimestamp: 2016-01-09 02:02:12Z",
  "error_codes": [70011],
  "timestamp": "2016-01-09 02:02:12Z",
  "trace_id": "255d1aef-8c98-452f-ac51-23d051240864",
  "correlation_id": "fb3d2015-bc17-4bb9-bb85-30c5cf1aaaa7",
  "error_uri": "https://login.microsoftonline.com/error?code=70011"
}"#;

    fn entra_body(code: u32, error: &str, text: &str) -> String {
        serde_json::json!({
            "error": error,
            "error_description": format!("AADSTS{code}: {text}\r\nTrace ID: 0b4f-trace\r\nCorrelation ID: 9c1e-corr\r\nTimestamp: 2025-11-02 10:11:12Z"),
            "error_codes": [code],
            "timestamp": "2025-11-02 10:11:12Z",
            "trace_id": "0b4f-trace",
            "correlation_id": "9c1e-corr",
        })
        .to_string()
    }

    #[test]
    fn success_with_numeric_or_string_expires_in() {
        let ok = parse_token_response(
            200,
            None,
            br#"{"token_type":"Bearer","expires_in":3599,"ext_expires_in":3599,"access_token":"eyJ0eXAi.x.y"}"#,
            &[],
        )
        .unwrap();
        assert_eq!(ok.access_token, "eyJ0eXAi.x.y");
        assert_eq!(ok.expires_in, Duration::from_secs(3599));
        assert_eq!(ok.refresh_in, None);

        let v1 = parse_token_response(
            200,
            None,
            br#"{"token_type":"Bearer","expires_in":"3599","refresh_in":"1800","access_token":"t"}"#,
            &[],
        )
        .unwrap();
        assert_eq!(v1.expires_in, Duration::from_secs(3599));
        assert_eq!(v1.refresh_in, Some(Duration::from_secs(1800)));
    }

    #[test]
    fn malformed_success_is_transient() {
        for body in [
            &b"<html>gateway</html>"[..],
            br#"{"token_type":"Bearer","expires_in":3599}"#,
            br#"{"token_type":"Bearer","expires_in":"soon","access_token":"t"}"#,
            br#"{"token_type":"pop","expires_in":3599,"access_token":"t"}"#,
        ] {
            let e = parse_token_response(200, None, body, &[]).unwrap_err();
            assert!(matches!(e, OAuthError::Malformed { .. }), "{e:?}");
            assert!(e.is_transient());
        }
    }

    #[test]
    fn reference_error_body_is_parsed() {
        let e = parse_token_response(400, None, INVALID_SCOPE.as_bytes(), &[]).unwrap_err();
        let OAuthError::Entra {
            http_status,
            error,
            error_codes,
            description,
            trace_id,
            correlation_id,
            retry_after,
        } = &e
        else {
            panic!("{e:?}")
        };
        assert_eq!(*http_status, 400);
        assert_eq!(error, "invalid_scope");
        assert_eq!(error_codes, &[70011]);
        assert!(description.starts_with("AADSTS70011: The provided value"));
        assert!(!description.contains("Trace ID"), "first line only");
        assert_eq!(
            trace_id.as_deref(),
            Some("255d1aef-8c98-452f-ac51-23d051240864")
        );
        assert_eq!(
            correlation_id.as_deref(),
            Some("fb3d2015-bc17-4bb9-bb85-30c5cf1aaaa7")
        );
        assert_eq!(*retry_after, None);
        assert!(!e.is_transient());
        let shown = e.to_string();
        for part in [
            "HTTP 400",
            "invalid_scope",
            "AADSTS70011",
            "255d1aef-8c98-452f-ac51-23d051240864",
            "fb3d2015-bc17-4bb9-bb85-30c5cf1aaaa7",
            "hint",
        ] {
            assert!(shown.contains(part), "{part} missing in {shown}");
        }
    }

    #[test]
    fn reference_codes_classify() {
        let permanent = [
            (
                401,
                7000215,
                "invalid_client",
                "Invalid client secret provided. Ensure the secret being sent in the request is the client secret value, not the client secret ID, for a secret added to app '00000000-0000-0000-0000-000000000001'.",
            ),
            (
                401,
                7000222,
                "invalid_client",
                "The provided client secret keys for app '00000000-0000-0000-0000-000000000001' are expired.",
            ),
            (
                401,
                700027,
                "invalid_client",
                "Client assertion contains an invalid signature. [Reason - The key was not found., Thumbprint of key used by client: 'ABCDEF']",
            ),
            (
                400,
                700016,
                "unauthorized_client",
                "Application with identifier 'x' was not found in the directory 'y'.",
            ),
            (400, 90002, "invalid_request", "Tenant 'x' not found."),
            (
                400,
                1002012,
                "invalid_scope",
                "The provided value for scope x is not valid.",
            ),
            (
                400,
                500011,
                "invalid_resource",
                "The resource principal named x was not found in the tenant named y.",
            ),
        ];
        for (status, code, error, text) in permanent {
            let e =
                parse_token_response(status, None, entra_body(code, error, text).as_bytes(), &[])
                    .unwrap_err();
            assert_eq!(e.error_codes(), &[code]);
            assert!(!e.is_transient(), "{code} must be permanent");
            let shown = e.to_string();
            assert!(shown.contains(&format!("AADSTS{code}")), "{shown}");
            assert!(
                shown.contains("0b4f-trace") && shown.contains("9c1e-corr"),
                "{shown}"
            );
            assert!(e.hint().is_some(), "{code} has a hint");
        }
        let transient = [
            (503, 50033, "temporarily_unavailable"),
            (400, 90055, "invalid_request"),
            (400, 50196, "invalid_request"),
            (500, 90033, "server_error"),
        ];
        for (status, code, error) in transient {
            let e = parse_token_response(
                status,
                Some("7"),
                entra_body(code, error, "x").as_bytes(),
                &[],
            )
            .unwrap_err();
            assert!(e.is_transient(), "{code} must be transient");
            assert_eq!(e.retry_after(), Some(Duration::from_secs(7)));
        }
    }

    #[test]
    fn codes_and_ids_are_recovered_from_the_description() {
        let body = r#"{"error":"invalid_client","error_description":"AADSTS7000215: Invalid client secret is provided.\r\nTrace ID: t-1\r\nCorrelation ID: c-1\r\nTimestamp: 2025-01-01 00:00:00Z"}"#;
        let e = parse_token_response(401, None, body.as_bytes(), &[]).unwrap_err();
        assert_eq!(e.error_codes(), &[7000215]);
        let OAuthError::Entra {
            trace_id,
            correlation_id,
            ..
        } = &e
        else {
            panic!()
        };
        assert_eq!(trace_id.as_deref(), Some("t-1"));
        assert_eq!(correlation_id.as_deref(), Some("c-1"));
    }

    #[test]
    fn http_errors_without_body() {
        let e =
            parse_token_response(502, Some("30"), b"<html>bad gateway</html>", &[]).unwrap_err();
        assert_eq!(
            e,
            OAuthError::Http {
                http_status: 502,
                retry_after: Some(Duration::from_secs(30))
            }
        );
        assert!(e.is_transient());
        assert!(e.to_string().contains("502") && e.to_string().contains("Retry-After 30s"));
        let e = parse_token_response(429, None, b"", &[]).unwrap_err();
        assert!(e.is_transient());
        let e = parse_token_response(404, None, b"not found", &[]).unwrap_err();
        assert!(
            !e.is_transient(),
            "a wrong token URL is a configuration error"
        );
    }

    #[test]
    fn credentials_are_scrubbed_from_descriptions() {
        let secret = "Abc8Q~very-secret-value";
        let body = entra_body(
            7000215,
            "invalid_client",
            &format!("bad secret {secret} sent"),
        );
        let e = parse_token_response(401, None, body.as_bytes(), &[secret]).unwrap_err();
        assert!(!e.to_string().contains(secret));
        assert!(!format!("{e:?}").contains(secret));
        assert!(e.to_string().contains("<redacted>"));
    }

    #[test]
    fn stays_small_enough_for_result() {
        // clippy::result_large_err fires above 128 bytes in every caller's signature.
        assert!(std::mem::size_of::<OAuthError>() <= 128);
    }

    #[test]
    fn retry_after_seconds_and_dates() {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000);
        assert_eq!(
            parse_retry_after("120", now),
            Some(Duration::from_secs(120))
        );
        assert_eq!(parse_retry_after(" 0 ", now), Some(Duration::ZERO));
        let later = httpdate::fmt_http_date(now + Duration::from_secs(90));
        assert_eq!(
            parse_retry_after(&later, now),
            Some(Duration::from_secs(90))
        );
        let earlier = httpdate::fmt_http_date(now - Duration::from_secs(90));
        assert_eq!(parse_retry_after(&earlier, now), Some(Duration::ZERO));
        assert_eq!(parse_retry_after("soon", now), None);
        assert_eq!(parse_retry_after("-5", now), None);
    }
}
