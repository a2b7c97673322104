//! Simulated Entra ID token endpoint (reference §1, checklist §7): client credentials with a secret (form body or
//! HTTP Basic) or a certificate assertion, Entra's JSON errors with real AADSTS codes, scripted faults.
//! Also mints and verifies the access tokens the SMTP side accepts.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::{Path, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use base64::Engine;
use jsonwebtoken::{Algorithm, Header, Validation};
use serde_json::{Value, json};

use super::SimError;
use super::config::{ClientConfig, SimConfig};
use super::control::{Shared, TokenFault};
use super::util::{entra_timestamp, guid, is_guid, unix_now};

const JWT_BEARER: &str = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer";
/// Audiences Exchange accepts on an SMTP token (the SASL blob validator's list).
pub const EXCHANGE_AUDIENCES: [&str; 3] = [
    "https://outlook.office365.com",
    "https://outlook.office.com",
    "https://outlook.office365.us",
];
/// Clock skew Entra tolerates on assertion `nbf`/`exp`.
const ASSERTION_SKEW_SECS: u64 = 300;

pub(crate) fn router(shared: Arc<Shared>) -> Router {
    Router::new()
        .route("/{tenant}/oauth2/v2.0/token", post(token))
        .with_state(shared)
}

/// An Entra error: HTTP status, `error`, AADSTS number and text (without the "AADSTSnnn: " prefix).
struct EntraError {
    status: StatusCode,
    error: &'static str,
    code: u32,
    text: String,
}

fn err(status: StatusCode, error: &'static str, code: u32, text: impl Into<String>) -> EntraError {
    EntraError {
        status,
        error,
        code,
        text: text.into(),
    }
}

fn missing(name: &str) -> EntraError {
    err(
        StatusCode::BAD_REQUEST,
        "invalid_request",
        900144,
        format!("The request body must contain the following parameter: '{name}'."),
    )
}

/// Headers every real answer carries (§1.4).
fn entra_headers(resp: &mut Response, trace_id: &str) {
    let h = resp.headers_mut();
    h.insert(
        header::CACHE_CONTROL,
        HeaderValue::from_static("no-store, no-cache"),
    );
    h.insert(header::PRAGMA, HeaderValue::from_static("no-cache"));
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json; charset=utf-8"),
    );
    h.insert(header::EXPIRES, HeaderValue::from_static("-1"));
    h.insert(
        header::STRICT_TRANSPORT_SECURITY,
        HeaderValue::from_static("max-age=31536000; includeSubDomains"),
    );
    if let Ok(v) = HeaderValue::from_str(trace_id) {
        h.insert("x-ms-request-id", v);
    }
    h.insert(
        "x-ms-ests-server",
        HeaderValue::from_static("2.1.99999.0 - SIM ProdSlices"),
    );
}

fn error_response(e: EntraError, authority: &str, correlation_id: &str) -> Response {
    let trace_id = guid();
    let ts = entra_timestamp();
    let body = json!({
        "error": e.error,
        "error_description": format!(
            "AADSTS{}: {}\r\nTrace ID: {trace_id}\r\nCorrelation ID: {correlation_id}\r\nTimestamp: {ts}",
            e.code, e.text
        ),
        "error_codes": [e.code],
        "timestamp": ts,
        "trace_id": trace_id,
        "correlation_id": correlation_id,
        "error_uri": format!("{authority}/error?code={}", e.code),
    });
    let mut resp = (e.status, body.to_string()).into_response();
    entra_headers(&mut resp, &trace_id);
    resp
}

/// `application/x-www-form-urlencoded` decoding (`+` is a space, `%XX` a byte).
fn parse_form(body: &[u8]) -> HashMap<String, String> {
    fn decode(s: &str) -> String {
        let bytes = s.as_bytes();
        let mut out = Vec::with_capacity(bytes.len());
        let mut i = 0;
        while i < bytes.len() {
            match bytes[i] {
                b'+' => out.push(b' '),
                b'%' if i + 2 < bytes.len() => {
                    match u8::from_str_radix(
                        std::str::from_utf8(&bytes[i + 1..i + 3]).unwrap_or("zz"),
                        16,
                    ) {
                        Ok(b) => {
                            out.push(b);
                            i += 2;
                        }
                        Err(_) => out.push(b'%'),
                    }
                }
                b => out.push(b),
            }
            i += 1;
        }
        String::from_utf8_lossy(&out).into_owned()
    }
    let text = String::from_utf8_lossy(body);
    let mut map = HashMap::new();
    for pair in text.split('&').filter(|p| !p.is_empty()) {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        // Entra uses the first occurrence of a repeated parameter.
        map.entry(decode(k)).or_insert_with(|| decode(v));
    }
    map
}

/// `Authorization: Basic base64(urlencoded(client_id):urlencoded(secret))` (RFC 6749 §2.3.1).
fn basic_auth(headers: &HeaderMap) -> Option<(String, String)> {
    let value = headers.get(header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, b64) = value.split_once(' ')?;
    if !scheme.eq_ignore_ascii_case("basic") {
        return None;
    }
    let raw = base64::engine::general_purpose::STANDARD
        .decode(b64.trim())
        .ok()?;
    let text = String::from_utf8(raw).ok()?;
    let (id, secret) = text.split_once(':')?;
    let form = parse_form(format!("a={id}&b={secret}").as_bytes());
    Some((form.get("a")?.clone(), form.get("b")?.clone()))
}

async fn token(
    State(shared): State<Arc<Shared>>,
    Path(tenant): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    shared.token_requests.fetch_add(1, Ordering::Relaxed);
    let cfg = shared.config();
    let correlation_id = headers
        .get("client-request-id")
        .and_then(|v| v.to_str().ok())
        .filter(|v| is_guid(v))
        .map(str::to_string)
        .unwrap_or_else(guid);

    if let Some(fault) = shared.next_token_fault() {
        match fault {
            TokenFault::Slow(d) => tokio::time::sleep(d).await,
            TokenFault::MalformedJson => {
                let mut resp = (
                    StatusCode::OK,
                    r#"{"token_type":"Bearer","expires_in":3599,"access_token":"eyJ0eXAiOiJKV1Q"#,
                )
                    .into_response();
                entra_headers(&mut resp, &guid());
                return resp;
            }
            TokenFault::TooManyRequests { retry_after_secs } => {
                let e = err(
                    StatusCode::TOO_MANY_REQUESTS,
                    "temporarily_unavailable",
                    90055,
                    "TenantThrottlingError: There are too many incoming requests. This indicates a configuration \
                     issue. Please try again later.",
                );
                let mut resp = error_response(e, &cfg.authority_host, &correlation_id);
                resp.headers_mut()
                    .insert(header::RETRY_AFTER, HeaderValue::from(retry_after_secs));
                return resp;
            }
            TokenFault::InternalServerError => {
                let e = err(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "temporarily_unavailable",
                    50033,
                    "RetryableError: A transient error has occurred. Please try again.",
                );
                return error_response(e, &cfg.authority_host, &correlation_id);
            }
            TokenFault::ServiceUnavailable => {
                let e = err(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "temporarily_unavailable",
                    90033,
                    "MsodsServiceUnavailable: A transient error has occurred. Please try again.",
                );
                let mut resp = error_response(e, &cfg.authority_host, &correlation_id);
                resp.headers_mut()
                    .insert(header::RETRY_AFTER, HeaderValue::from(1u32));
                return resp;
            }
        }
    }

    match issue(&shared, &cfg, &tenant, &headers, &body) {
        Ok(resp) => resp,
        Err(e) => error_response(e, &cfg.authority_host, &correlation_id),
    }
}

/// The validation chain in Entra's order: tenant, grant type, client, scope, credential.
fn issue(
    shared: &Shared,
    cfg: &SimConfig,
    tenant: &str,
    headers: &HeaderMap,
    body: &[u8],
) -> Result<Response, EntraError> {
    use StatusCode as S;
    let tenant_l = tenant.to_ascii_lowercase();
    if tenant_l == "common" || tenant_l == "consumers" {
        return Err(err(
            S::BAD_REQUEST,
            "unsupported_grant_type",
            9001023,
            "The grant type isn't supported over the /common or /consumers endpoints. Please use the \
             /organizations or tenant-specific endpoint.",
        ));
    }
    let known_tenant = tenant_l == cfg.tenant_id.to_ascii_lowercase()
        || cfg
            .tenant_domains
            .iter()
            .any(|d| d.eq_ignore_ascii_case(tenant));
    if !known_tenant {
        if !is_guid(tenant) && !tenant.contains('.') {
            return Err(err(
                S::BAD_REQUEST,
                "invalid_request",
                900023,
                format!(
                    "Specified tenant identifier '{tenant}' is neither a valid DNS name, nor a valid external domain."
                ),
            ));
        }
        return Err(err(
            S::BAD_REQUEST,
            "invalid_tenant",
            90002,
            format!(
                "Tenant '{tenant}' not found. Check to make sure you have the correct tenant ID and are signing into \
                 the correct cloud. Check with your subscription administrator, this may happen if there are no \
                 active subscriptions for the tenant."
            ),
        ));
    }

    // Only form bodies are read; anything else looks like a request without parameters (900144 grant_type).
    let is_form = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .map(|v| {
            v.to_ascii_lowercase()
                .starts_with("application/x-www-form-urlencoded")
        })
        .unwrap_or(false);
    let form = if is_form {
        parse_form(body)
    } else {
        HashMap::new()
    };
    let basic = basic_auth(headers);

    let grant_type = form
        .get("grant_type")
        .ok_or_else(|| missing("grant_type"))?;
    if grant_type != "client_credentials" {
        return Err(err(
            S::BAD_REQUEST,
            "unsupported_grant_type",
            70003,
            format!("The app requested an unsupported grant type '{grant_type}'."),
        ));
    }

    let client_id = form
        .get("client_id")
        .cloned()
        .or_else(|| basic.as_ref().map(|(id, _)| id.clone()))
        .ok_or_else(|| missing("client_id"))?;
    let client = cfg.client(&client_id).ok_or_else(|| {
        err(
            S::BAD_REQUEST,
            "unauthorized_client",
            700016,
            format!(
                "Application with identifier '{client_id}' was not found in the directory '{tenant}'. This can \
                 happen if the application has not been installed by the administrator of the tenant or consented \
                 to by any user in the tenant. You may have sent your authentication request to the wrong tenant."
            ),
        )
    })?;

    let scope = form.get("scope").ok_or_else(|| missing("scope"))?;
    let scopes: Vec<&str> = scope.split_whitespace().collect();
    if scopes.is_empty() {
        return Err(missing("scope"));
    }
    if scopes.len() > 1 || !scopes[0].ends_with("/.default") {
        return Err(err(
            S::BAD_REQUEST,
            "invalid_scope",
            1002012,
            format!(
                "The provided value for scope {scope} is not valid. Client credential flows must have a scope value \
                 with /.default suffixed to the resource identifier (application ID URI)."
            ),
        ));
    }
    let resource = scopes[0].trim_end_matches("/.default");
    let resource = cfg.resources.iter().find(|r| r.trim_end_matches('/').eq_ignore_ascii_case(resource)).ok_or_else(|| {
        err(
            S::BAD_REQUEST,
            "invalid_resource",
            500011,
            format!(
                "The resource principal named {resource} was not found in the tenant named {tenant}. This can happen \
                 if the application has not been installed by the administrator of the tenant or consented to by \
                 any user in the tenant. You might have sent your authentication request to the wrong tenant."
            ),
        )
    })?;

    let secret = form
        .get("client_secret")
        .cloned()
        .or_else(|| basic.as_ref().map(|(_, s)| s.clone()));
    let appidacr = if let Some(assertion) = form.get("client_assertion") {
        match form.get("client_assertion_type") {
            Some(t) if t == JWT_BEARER => {}
            Some(_) => {
                return Err(err(
                    S::BAD_REQUEST,
                    "invalid_request",
                    7000213,
                    "Invalid client_assertion_type. Only urn:ietf:params:oauth:client-assertion-type:jwt-bearer is \
                     supported.",
                ));
            }
            None => return Err(missing("client_assertion_type")),
        }
        check_assertion(shared, cfg, client, tenant, assertion)?;
        "2"
    } else if let Some(secret) = secret {
        check_secret(client, &secret)?;
        "1"
    } else {
        return Err(err(
            S::UNAUTHORIZED,
            "invalid_client",
            7000218,
            "The request body must contain the following parameter: 'client_assertion' or 'client_secret'.",
        ));
    };

    let now = unix_now();
    let lifetime = cfg.token_lifetime_secs;
    let issuer = format!("https://sts.windows.net/{}/", cfg.tenant_id);
    let mut claims = json!({
        "aud": resource,
        "iss": issuer,
        "iat": now,
        "nbf": now,
        "exp": now + lifetime,
        "aio": guid(),
        "app_displayname": client.display_name,
        "appid": client.client_id,
        "appidacr": appidacr,
        "idp": issuer,
        "idtyp": "app",
        "oid": client.object_id,
        "rh": "0.SIM",
        "sub": client.object_id,
        "tid": cfg.tenant_id,
        "uti": ulid::Ulid::generate().to_string(),
        "ver": "1.0",
    });
    if let (Some(roles), Some(obj)) = (&client.roles, claims.as_object_mut()) {
        obj.insert("roles".into(), json!(roles));
    }
    let access_token = sign_claims(shared, &claims).map_err(|e| {
        err(
            S::INTERNAL_SERVER_ERROR,
            "temporarily_unavailable",
            50033,
            format!("RetryableError: {e}"),
        )
    })?;
    shared.tokens_issued.fetch_add(1, Ordering::Relaxed);
    let body = json!({
        "token_type": "Bearer",
        "expires_in": lifetime,
        "ext_expires_in": lifetime,
        "access_token": access_token,
    });
    let mut resp = Response::new(Body::from(body.to_string()));
    entra_headers(&mut resp, &guid());
    Ok(resp)
}

fn check_secret(client: &ClientConfig, secret: &str) -> Result<(), EntraError> {
    match client.secrets.iter().find(|s| s.value == secret) {
        Some(s) if s.expired => Err(err(
            StatusCode::UNAUTHORIZED,
            "invalid_client",
            7000222,
            format!(
                "The provided client secret keys for app '{}' are expired. Visit the Azure portal to create new keys \
                 for your app: https://aka.ms/NewClientSecret, or consider using certificate credentials for added \
                 security: https://aka.ms/certCreds.",
                client.client_id
            ),
        )),
        Some(_) => Ok(()),
        None => Err(err(
            StatusCode::UNAUTHORIZED,
            "invalid_client",
            7000215,
            format!(
                "Invalid client secret provided. Ensure the secret being sent in the request is the client secret \
                 value, not the client secret ID, for a secret added to app '{}'.",
                client.client_id
            ),
        )),
    }
}

fn check_assertion(
    shared: &Shared,
    cfg: &SimConfig,
    client: &ClientConfig,
    tenant: &str,
    assertion: &str,
) -> Result<(), EntraError> {
    use StatusCode as S;
    let malformed = || {
        err(
            S::UNAUTHORIZED,
            "invalid_client",
            50027,
            "JWT token is invalid or malformed.",
        )
    };
    let header = jsonwebtoken::decode_header(assertion).map_err(|_| malformed())?;
    if !matches!(header.alg, Algorithm::RS256 | Algorithm::PS256) {
        return Err(err(
            S::UNAUTHORIZED,
            "invalid_client",
            5002738,
            format!(
                "Invalid JWT token. '{:?}' is not a supported signature algorithm.",
                header.alg
            ),
        ));
    }
    let certs = shared.certs_of(&client.client_id);
    let presented = header.x5t_s256.clone().or_else(|| header.x5t.clone());
    let cert = certs.iter().find(|c| {
        header.x5t_s256.as_deref() == Some(c.x5t_s256.as_str())
            || header.x5t.as_deref() == Some(c.x5t.as_str())
    });
    let not_found = |reason: &str, thumb: String| {
        err(
            S::UNAUTHORIZED,
            "invalid_client",
            700027,
            format!(
                "Client assertion contains an invalid signature. [Reason - {reason}, Thumbprint of key used by \
                 client: '{thumb}', Please visit the Azure Portal, Graph Explorer or directly use MS Graph to see \
                 configured keys for app Id '{}'. Review the documentation at \
                 https://docs.microsoft.com/en-us/graph/deployments if you are not using a global cloud.]",
                client.client_id
            ),
        )
    };
    let Some(cert) = cert else {
        let thumb = presented.map(|t| thumb_hex(&t)).unwrap_or_default();
        return Err(not_found("The key was not found.", thumb));
    };

    let mut validation = Validation::new(header.alg);
    // Claims are checked below, one by one, so each failure gets its own AADSTS code.
    validation.required_spec_claims.clear();
    validation.validate_exp = false;
    validation.validate_nbf = false;
    validation.validate_aud = false;
    let data =
        jsonwebtoken::decode::<Value>(assertion, &cert.key, &validation).map_err(|e| {
            match e.kind() {
                jsonwebtoken::errors::ErrorKind::InvalidSignature => not_found(
                    "The provided signature value did not match the expected signature value.",
                    cert.thumbprint_hex.clone(),
                ),
                _ => malformed(),
            }
        })?;
    let c = data.claims;
    let s = |k: &str| c.get(k).and_then(Value::as_str).map(str::to_string);

    let mut audiences = vec![format!(
        "{}/{tenant}/oauth2/v2.0/token",
        shared.token_base_url
    )];
    for t in std::iter::once(&cfg.tenant_id).chain(cfg.tenant_domains.iter()) {
        audiences.push(format!("{}/{t}/oauth2/v2.0/token", shared.token_base_url));
        audiences.push(format!("{}/{t}/oauth2/v2.0/token", cfg.authority_host));
        audiences.push(format!("{}/{t}/oauth2/token", cfg.authority_host));
        audiences.push(format!("{}/{t}/", cfg.authority_host));
    }
    let aud_ok = match c.get("aud") {
        Some(Value::String(a)) => audiences.iter().any(|x| x.eq_ignore_ascii_case(a)),
        Some(Value::Array(list)) => list
            .iter()
            .filter_map(Value::as_str)
            .any(|a| audiences.iter().any(|x| x.eq_ignore_ascii_case(a))),
        _ => false,
    };
    if !aud_ok {
        return Err(err(
            S::UNAUTHORIZED,
            "invalid_client",
            700212,
            format!(
                "The audience claim of the client assertion is invalid. Expected one of: '{}'.",
                audiences.first().map(String::as_str).unwrap_or_default()
            ),
        ));
    }
    let iss = s("iss").unwrap_or_default();
    if !iss.eq_ignore_ascii_case(&client.client_id) {
        return Err(err(
            S::UNAUTHORIZED,
            "invalid_client",
            700021,
            "Client assertion application identifier doesn't match 'client_id' parameter. Review the documentation \
             at https://docs.microsoft.com/en-us/azure/active-directory/develop/active-directory-certificate-credentials .",
        ));
    }
    let sub = s("sub").unwrap_or_default();
    if !sub.eq_ignore_ascii_case(&iss) {
        return Err(err(
            S::UNAUTHORIZED,
            "invalid_client",
            50048,
            "Subject mismatches Issuer claim in the client assertion.",
        ));
    }
    let now = unix_now();
    let nbf = c.get("nbf").and_then(Value::as_u64);
    let exp = c.get("exp").and_then(Value::as_u64);
    let in_range = match (nbf, exp) {
        (nbf, Some(exp)) => {
            nbf.unwrap_or(0) <= now + ASSERTION_SKEW_SECS && now < exp + ASSERTION_SKEW_SECS
        }
        (_, None) => false,
    };
    if !in_range {
        return Err(err(
            S::UNAUTHORIZED,
            "invalid_client",
            700024,
            format!(
                "Client assertion is not within its valid time range. Current time: {now}, assertion valid from \
                 {}, expiry time of assertion {}. Review the documentation at \
                 https://docs.microsoft.com/en-us/azure/active-directory/develop/active-directory-certificate-credentials .",
                nbf.map(|v| v.to_string()).unwrap_or_default(),
                exp.map(|v| v.to_string()).unwrap_or_default()
            ),
        ));
    }
    Ok(())
}

/// Upper-case hex of a base64url thumbprint (as AADSTS700027 prints it); the raw text if it does not decode.
fn thumb_hex(b64: &str) -> String {
    match base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(b64.trim_end_matches('=')) {
        Ok(bytes) => bytes.iter().map(|b| format!("{b:02X}")).collect(),
        Err(_) => b64.to_string(),
    }
}

/// Signs claims as the simulated Entra ID (RS256, `x5t`/`kid` of its key).
pub(crate) fn sign_claims(shared: &Shared, claims: &Value) -> Result<String, SimError> {
    let mut header = Header::new(Algorithm::RS256);
    header.typ = Some("JWT".into());
    header.kid = Some(shared.signing_key.kid.clone());
    header.x5t = Some(shared.signing_key.kid.clone());
    jsonwebtoken::encode(&header, claims, &shared.signing_key.encoding)
        .map_err(|e| SimError::Crypto(e.to_string()))
}

/// What Exchange learns from a valid access token.
pub(crate) struct TokenIdentity {
    pub appid: String,
    pub roles: Option<Vec<String>>,
}

/// Checks an access token as Exchange would: our signature, not expired, an Exchange audience, our tenant.
/// Roles and mailbox permissions are the caller's business.
pub(crate) fn verify_access_token(
    shared: &Shared,
    cfg: &SimConfig,
    token: &str,
) -> Option<TokenIdentity> {
    let mut validation = Validation::new(Algorithm::RS256);
    validation.required_spec_claims.clear();
    validation.validate_exp = false;
    validation.validate_nbf = false;
    validation.validate_aud = false;
    let data =
        jsonwebtoken::decode::<Value>(token, &shared.signing_key.decoding, &validation).ok()?;
    let c = data.claims;
    let now = unix_now();
    // No leeway: a token at or past `exp` is refused (tests use lifetime 0 instead of sleeping).
    let exp = c.get("exp")?.as_u64()?;
    if exp <= now {
        return None;
    }
    if let Some(nbf) = c.get("nbf").and_then(Value::as_u64)
        && nbf > now + ASSERTION_SKEW_SECS
    {
        return None;
    }
    let aud = c.get("aud")?.as_str()?;
    if !EXCHANGE_AUDIENCES
        .iter()
        .any(|a| a.eq_ignore_ascii_case(aud.trim_end_matches('/')))
    {
        return None;
    }
    if !c.get("tid")?.as_str()?.eq_ignore_ascii_case(&cfg.tenant_id) {
        return None;
    }
    let appid = c.get("appid")?.as_str()?.to_string();
    let roles = c.get("roles").and_then(Value::as_array).map(|r| {
        r.iter()
            .filter_map(Value::as_str)
            .map(str::to_string)
            .collect()
    });
    Some(TokenIdentity { appid, roles })
}
