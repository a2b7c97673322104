//! A fake Entra ID token endpoint for the oauth tests (loopback, axum). It counts and records
//! requests, checks the form, verifies client assertions against a registered certificate, and
//! answers as scripted. Shared by `tests/oauth_sources.rs` and `tests/oauth_refresher.rs`.
#![allow(dead_code, clippy::result_large_err)]

use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use axum::extract::{Form, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use base64::Engine as _;
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use sha2::Digest as _;
use smtp_oauth_relay::config::Config;
use tokio::time::Instant;

pub const TENANT: &str = "contoso.onmicrosoft.com";
pub const CLIENT_ID: &str = "00000000-0000-4000-8000-00000000c11d";
pub const SCOPE: &str = "https://outlook.office365.com/.default";
pub const JWT_BEARER: &str = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer";

/// What the fake answers to one request.
#[derive(Debug, Clone, PartialEq)]
pub enum Reply {
    /// 200 with `expires_in` as a number (after the credential check).
    Ok,
    /// 200 with `expires_in` as a string.
    OkString,
    /// An Entra error body with this status, `error` and AADSTS code.
    Entra(u16, &'static str, u32),
    /// 429 with `Retry-After: <secs>`.
    TooMany(u64),
    /// 500 with an HTML body.
    ServerError,
    /// 200 that is not JSON.
    Malformed,
    /// Wait this long (tokio time), then answer as `Ok`.
    Slow(Duration),
}

/// How the fake checks the credential.
#[derive(Debug, Clone)]
pub enum Expect {
    /// Any credential is accepted.
    Anything,
    /// `client_secret` must equal this (else 401 AADSTS7000215, echoing what was sent so the
    /// client's scrubbing is exercised).
    Secret(String),
    /// `client_assertion` must be signed by this certificate's key (else 401 AADSTS700027).
    Certificate(TestCert),
}

/// One request as the fake saw it.
#[derive(Debug, Clone)]
pub struct Seen {
    pub at: Instant,
    pub form: HashMap<String, String>,
    pub reply: Reply,
    /// The verified assertion's header and claims, for certificate requests.
    pub assertion: Option<(jsonwebtoken::Header, serde_json::Value)>,
}

struct Script {
    queue: VecDeque<Reply>,
    default: Reply,
    expect: Expect,
    expires_in: u64,
    issued: u64,
    seen: Vec<Seen>,
}

#[derive(Clone)]
pub struct Fake {
    pub url: String,
    pub addr: SocketAddr,
    script: Arc<Mutex<Script>>,
}

impl Fake {
    /// Starts the fake on 127.0.0.1:0 in the current runtime.
    pub async fn start(expect: Expect, expires_in: u64) -> Fake {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let script = Arc::new(Mutex::new(Script {
            queue: VecDeque::new(),
            default: Reply::Ok,
            expect,
            expires_in,
            issued: 0,
            seen: Vec::new(),
        }));
        let url = format!("http://{addr}/{TENANT}/oauth2/v2.0/token");
        let app = axum::Router::new()
            .route("/{tenant}/oauth2/v2.0/token", axum::routing::post(token))
            .with_state((script.clone(), url.clone()));
        tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
        Fake { url, addr, script }
    }

    /// Replies for the next requests, in order; then `set_default` applies.
    pub fn push(&self, replies: impl IntoIterator<Item = Reply>) {
        self.script.lock().unwrap().queue.extend(replies);
    }

    pub fn set_default(&self, reply: Reply) {
        self.script.lock().unwrap().default = reply;
    }

    pub fn set_expect(&self, expect: Expect) {
        self.script.lock().unwrap().expect = expect;
    }

    pub fn requests(&self) -> usize {
        self.script.lock().unwrap().seen.len()
    }

    pub fn seen(&self) -> Vec<Seen> {
        self.script.lock().unwrap().seen.clone()
    }

    /// A config pointing at this fake, without a credential.
    pub fn config(&self) -> Config {
        let mut c = Config::default();
        c.oauth.tenant_id = Some(TENANT.into());
        c.oauth.client_id = Some(CLIENT_ID.into());
        c.oauth.token_url = Some(self.url.clone());
        c.upstream.mail_account = Some("relay@contoso.example".into());
        c
    }
}

type AppState = (Arc<Mutex<Script>>, String);

async fn token(
    State((script, url)): State<AppState>,
    Form(form): Form<HashMap<String, String>>,
) -> Response {
    let at = Instant::now();
    let (reply, expect, expires_in, n) = {
        let mut s = script.lock().unwrap();
        let reply = s.queue.pop_front().unwrap_or_else(|| s.default.clone());
        s.issued += 1;
        (reply, s.expect.clone(), s.expires_in, s.issued)
    };
    let mut seen = Seen {
        at,
        form: form.clone(),
        reply: reply.clone(),
        assertion: None,
    };
    let response = answer(&reply, &expect, &form, &url, expires_in, n, &mut seen).await;
    script.lock().unwrap().seen.push(seen);
    response
}

async fn answer(
    reply: &Reply,
    expect: &Expect,
    form: &HashMap<String, String>,
    url: &str,
    expires_in: u64,
    n: u64,
    seen: &mut Seen,
) -> Response {
    match reply {
        Reply::TooMany(secs) => {
            let mut r = entra(429, "temporarily_unavailable", 90055, "Too many requests.");
            r.headers_mut().insert(
                "retry-after",
                HeaderValue::from_str(&secs.to_string()).unwrap(),
            );
            return r;
        }
        Reply::ServerError => {
            return (StatusCode::INTERNAL_SERVER_ERROR, "<html>oops</html>").into_response();
        }
        Reply::Entra(status, error, code) => {
            return entra(*status, error, *code, "Scripted failure.");
        }
        Reply::Slow(d) => tokio::time::sleep(*d).await,
        Reply::Ok | Reply::OkString | Reply::Malformed => {}
    }
    if let Err(response) = check(expect, form, url, seen) {
        return response;
    }
    if *reply == Reply::Malformed {
        return (StatusCode::OK, "{\"token_type\":\"Bearer\",").into_response();
    }
    let expires: serde_json::Value = if *reply == Reply::OkString {
        expires_in.to_string().into()
    } else {
        expires_in.into()
    };
    let mut headers = HeaderMap::new();
    headers.insert(
        "cache-control",
        HeaderValue::from_static("no-store, no-cache"),
    );
    (
        StatusCode::OK,
        headers,
        axum::Json(serde_json::json!({
            "token_type": "Bearer",
            "expires_in": expires,
            "ext_expires_in": expires,
            "access_token": format!("fake-access-token-{n}"),
        })),
    )
        .into_response()
}

/// The form rules of reference §1.2/§1.3, then the credential.
fn check(
    expect: &Expect,
    form: &HashMap<String, String>,
    url: &str,
    seen: &mut Seen,
) -> Result<(), Response> {
    let field = |k: &str| form.get(k).map(String::as_str);
    if field("grant_type") != Some("client_credentials")
        || field("client_id") != Some(CLIENT_ID)
        || field("scope") != Some(SCOPE)
    {
        return Err(entra(
            400,
            "invalid_request",
            900144,
            "The request body must contain the following parameter: 'grant_type'.",
        ));
    }
    match expect {
        Expect::Anything => Ok(()),
        Expect::Secret(secret) => {
            let sent = field("client_secret").unwrap_or_default();
            if sent == secret {
                Ok(())
            } else {
                // Echo what was sent: the client must scrub it from its errors.
                Err(entra(
                    401,
                    "invalid_client",
                    7000215,
                    &format!(
                        "Invalid client secret provided ({sent}). Ensure the secret being sent in the request is the client secret value, not the client secret ID, for a secret added to app '{CLIENT_ID}'."
                    ),
                ))
            }
        }
        Expect::Certificate(cert) => {
            let bad = |why: &str| {
                let sent = field("client_assertion").unwrap_or_default();
                entra(
                    401,
                    "invalid_client",
                    700027,
                    &format!(
                        "Client assertion contains an invalid signature. [Reason - {why}, assertion {sent}]"
                    ),
                )
            };
            if field("client_assertion_type") != Some(JWT_BEARER) {
                return Err(bad("wrong client_assertion_type"));
            }
            let assertion = field("client_assertion").ok_or_else(|| bad("no assertion"))?;
            let (header, claims) = cert.verify(assertion, url).map_err(|why| bad(&why))?;
            seen.assertion = Some((header, claims));
            Ok(())
        }
    }
}

fn entra(status: u16, error: &str, code: u32, text: &str) -> Response {
    let trace = format!("trace-{code}");
    let corr = format!("corr-{code}");
    let body = serde_json::json!({
        "error": error,
        "error_description": format!("AADSTS{code}: {text}\r\nTrace ID: {trace}\r\nCorrelation ID: {corr}\r\nTimestamp: 2025-11-02 10:11:12Z"),
        "error_codes": [code],
        "timestamp": "2025-11-02 10:11:12Z",
        "trace_id": trace,
        "correlation_id": corr,
        "error_uri": format!("https://login.microsoftonline.com/error?code={code}"),
    });
    (StatusCode::from_u16(status).unwrap(), axum::Json(body)).into_response()
}

// ---------------------------------------------------------------------------------------------
// Test keys and certificates

/// An RSA key with a self-signed certificate.
#[derive(Clone)]
pub struct TestCert {
    /// PKCS#8 PEM (`BEGIN PRIVATE KEY`).
    pub key_pkcs8_pem: String,
    /// PKCS#1 PEM (`BEGIN RSA PRIVATE KEY`).
    pub key_pkcs1_pem: String,
    pub public_pem: String,
    pub cert_pem: String,
    pub cert_der: Vec<u8>,
}

impl std::fmt::Debug for TestCert {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("TestCert")
    }
}

impl TestCert {
    /// A new 2048-bit RSA key and certificate (aws-lc-rs generates, rcgen certifies).
    pub fn generate(name: &str) -> TestCert {
        use aws_lc_rs::encoding::AsDer;
        let kp = aws_lc_rs::rsa::KeyPair::generate(aws_lc_rs::rsa::KeySize::Rsa2048).unwrap();
        let pkcs8: Vec<u8> = AsDer::<aws_lc_rs::encoding::Pkcs8V1Der>::as_der(&kp)
            .unwrap()
            .as_ref()
            .to_vec();
        let rc = rcgen::KeyPair::from_pkcs8_der_and_sign_algo(
            &rustls_pki_types::PrivatePkcs8KeyDer::from(pkcs8.clone()),
            &rcgen::PKCS_RSA_SHA256,
        )
        .unwrap();
        let cert = rcgen::CertificateParams::new(vec![name.to_string()])
            .unwrap()
            .self_signed(&rc)
            .unwrap();
        TestCert {
            key_pkcs8_pem: pem("PRIVATE KEY", &pkcs8),
            key_pkcs1_pem: pem("RSA PRIVATE KEY", pkcs1_from_pkcs8(&pkcs8)),
            public_pem: rc.public_key_pem(),
            cert_pem: cert.pem(),
            cert_der: cert.der().to_vec(),
        }
    }

    /// Writes `cert.pem`, `key.pem` (PKCS#8) and `key-rsa.pem` (PKCS#1) into `dir`.
    pub fn write(&self, dir: &Path) -> (PathBuf, PathBuf, PathBuf) {
        let cert = dir.join("cert.pem");
        let key = dir.join("key.pem");
        let key1 = dir.join("key-rsa.pem");
        std::fs::write(&cert, &self.cert_pem).unwrap();
        std::fs::write(&key, &self.key_pkcs8_pem).unwrap();
        std::fs::write(&key1, &self.key_pkcs1_pem).unwrap();
        (cert, key, key1)
    }

    /// Checks an assertion as Entra does: the thumbprint names this certificate, the signature
    /// verifies with its key (PS256 or RS256), and the claims are the client-credential ones.
    pub fn verify(
        &self,
        assertion: &str,
        url: &str,
    ) -> Result<(jsonwebtoken::Header, serde_json::Value), String> {
        let header = jsonwebtoken::decode_header(assertion).map_err(|e| format!("header: {e}"))?;
        match header.alg {
            jsonwebtoken::Algorithm::PS256 => {
                let want = URL_SAFE_NO_PAD.encode(sha2::Sha256::digest(&self.cert_der));
                if header.x5t_s256.as_deref() != Some(want.as_str()) {
                    return Err("The key was not found (x5t#S256)".into());
                }
            }
            jsonwebtoken::Algorithm::RS256 => {
                let want = URL_SAFE_NO_PAD.encode(sha1::Sha1::digest(&self.cert_der));
                if header.x5t.as_deref() != Some(want.as_str()) {
                    return Err("The key was not found (x5t)".into());
                }
            }
            other => return Err(format!("algorithm {other:?} not accepted")),
        }
        if header.typ.as_deref() != Some("JWT") {
            return Err("typ is not JWT".into());
        }
        let key = jsonwebtoken::DecodingKey::from_rsa_pem(self.public_pem.as_bytes()).unwrap();
        let mut v = jsonwebtoken::Validation::new(header.alg);
        v.set_audience(&[url]);
        v.set_issuer(&[CLIENT_ID]);
        v.sub = Some(CLIENT_ID.into());
        v.set_required_spec_claims(&["exp", "nbf", "aud", "iss", "sub"]);
        v.validate_nbf = true;
        let data = jsonwebtoken::decode::<serde_json::Value>(assertion, &key, &v)
            .map_err(|e| format!("signature or claims: {e}"))?;
        let c = &data.claims;
        let n = |k: &str| c[k].as_u64().ok_or(format!("{k} missing"));
        let (nbf, iat, exp) = (n("nbf")?, n("iat")?, n("exp")?);
        if iat != nbf || exp <= nbf || exp - nbf > 600 {
            return Err(format!("bad validity nbf={nbf} iat={iat} exp={exp}"));
        }
        if c["jti"].as_str().is_none_or(str::is_empty) {
            return Err("jti missing".into());
        }
        Ok((header, data.claims))
    }
}

/// One generated certificate per test process (RSA generation is slow in debug builds).
pub fn registered_cert() -> &'static TestCert {
    static CERT: OnceLock<TestCert> = OnceLock::new();
    CERT.get_or_init(|| TestCert::generate("relay-test"))
}

/// A second, unregistered key and certificate.
pub fn other_cert() -> &'static TestCert {
    static CERT: OnceLock<TestCert> = OnceLock::new();
    CERT.get_or_init(|| TestCert::generate("someone-else"))
}

fn pem(label: &str, der: &[u8]) -> String {
    let b64 = STANDARD.encode(der);
    let mut out = format!("-----BEGIN {label}-----\n");
    for line in b64.as_bytes().chunks(64) {
        out.push_str(std::str::from_utf8(line).unwrap());
        out.push('\n');
    }
    out.push_str(&format!("-----END {label}-----\n"));
    out
}

/// PrivateKeyInfo ::= SEQUENCE { version INTEGER, algorithm SEQUENCE, privateKey OCTET STRING }:
/// the OCTET STRING holds the PKCS#1 RSAPrivateKey.
fn pkcs1_from_pkcs8(pkcs8: &[u8]) -> &[u8] {
    fn item(b: &[u8]) -> (u8, &[u8], &[u8]) {
        let tag = b[0];
        let (len, hdr) = if b[1] < 0x80 {
            (b[1] as usize, 2)
        } else {
            let n = (b[1] & 0x7f) as usize;
            let len = b[2..2 + n]
                .iter()
                .fold(0usize, |a, x| (a << 8) | *x as usize);
            (len, 2 + n)
        };
        (tag, &b[hdr..hdr + len], &b[hdr + len..])
    }
    let (tag, body, _) = item(pkcs8);
    assert_eq!(tag, 0x30);
    let (_, _, rest) = item(body); // version
    let (_, _, rest) = item(rest); // algorithm
    let (tag, key, _) = item(rest);
    assert_eq!(tag, 0x04);
    key
}
