//! Hostile upstreams that echo what they were sent: a token endpoint that puts the request's
//! client secret into its error description, and an SMTP server (STARTTLS, XOAUTH2) that puts
//! the AUTH line into its 535 reply. Each echoes the secret in every encoding of [`encodings`],
//! each labelled, followed by `end`, so a test can tell that the whole echo reached an output
//! (labels and `end` survive) and that no form of the secret did.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use base64::Engine as _;
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncWrite, AsyncWriteExt, BufReader};
use tokio::net::TcpListener;

/// Every form of `secret` an echo may carry, each with a short label.
pub fn encodings(secret: &str) -> Vec<(&'static str, String)> {
    let form: String = url::form_urlencoded::byte_serialize(secret.as_bytes()).collect();
    let pct20 = form.replace('+', "%20");
    let lower = lower_hex(&pct20);
    // JSON-escaped as an encoder that escapes every non-alphanumeric character would write it.
    let json: String = secret
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() {
                c.to_string()
            } else {
                format!("\\u{:04x}", c as u32)
            }
        })
        .collect();
    vec![
        ("raw", secret.to_string()),
        ("form", form),
        ("pct", pct20),
        ("lower", lower),
        ("json", json),
        ("b64", STANDARD.encode(secret)),
        ("b64url", URL_SAFE_NO_PAD.encode(secret)),
    ]
}

/// `%7E` → `%7e`.
fn lower_hex(s: &str) -> String {
    let mut out = String::new();
    let mut rest = s;
    while let Some(i) = rest.find('%') {
        out.push_str(&rest[..i]);
        let esc = rest.get(i..i + 3).unwrap_or(&rest[i..]);
        out.push_str(&esc.to_ascii_lowercase());
        rest = &rest[i + esc.len()..];
    }
    out.push_str(rest);
    out
}

/// `label=value` for each encoding, then `end`.
pub fn echo_text(secret: &str) -> String {
    let mut parts: Vec<String> = encodings(secret)
        .into_iter()
        .map(|(label, value)| format!("{label}={value}"))
        .collect();
    parts.push("end".into());
    parts.join(" ")
}

/// What an output must show when the echo reached it scrubbed: every label followed by the
/// redaction marker.
pub fn scrubbed_echo_markers(secret: &str) -> Vec<String> {
    let mut v: Vec<String> = encodings(secret)
        .into_iter()
        .map(|(label, _)| format!("{label}=<redacted>"))
        .collect();
    v.push("end".into());
    v
}

// ---------------------------------------------------------------------------------------------
// Token endpoint

/// A token endpoint on 127.0.0.1 that either refuses the credential (client secret or client
/// assertion), echoing it, or issues `token`.
pub struct EchoTokenEndpoint {
    pub addr: SocketAddr,
    requests: Arc<AtomicU64>,
}

impl EchoTokenEndpoint {
    /// `token`: `None` refuses every request with 401 AADSTS7000215 and the echo.
    pub async fn start(token: Option<String>) -> EchoTokenEndpoint {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let requests = Arc::new(AtomicU64::new(0));
        let counter = requests.clone();
        let app = axum::Router::new().route(
            "/{tenant}/oauth2/v2.0/token",
            axum::routing::post(move |body: String| {
                let token = token.clone();
                let counter = counter.clone();
                async move {
                    counter.fetch_add(1, Ordering::SeqCst);
                    answer(&body, token.as_deref())
                }
            }),
        );
        tokio::spawn(async move { axum::serve(listener, app).await.expect("serve") });
        EchoTokenEndpoint { addr, requests }
    }

    pub fn url(&self, tenant: &str) -> String {
        format!("http://{}/{tenant}/oauth2/v2.0/token", self.addr)
    }

    pub fn requests(&self) -> u64 {
        self.requests.load(Ordering::SeqCst)
    }
}

fn answer(body: &str, token: Option<&str>) -> axum::response::Response {
    use axum::http::StatusCode;
    use axum::response::IntoResponse;
    if let Some(token) = token {
        return axum::Json(serde_json::json!({
            "token_type": "Bearer", "expires_in": 3599, "ext_expires_in": 3599, "access_token": token,
        }))
        .into_response();
    }
    let secret = url::form_urlencoded::parse(body.as_bytes())
        .find(|(k, _)| k == "client_secret" || k == "client_assertion")
        .map(|(_, v)| v.into_owned())
        .unwrap_or_default();
    let description = format!(
        "AADSTS7000215: Invalid client secret provided. {}\r\nTrace ID: echo-trace\r\nCorrelation ID: echo-corr",
        echo_text(&secret)
    );
    let body = serde_json::json!({
        "error": "invalid_client",
        "error_description": description,
        "error_codes": [7000215],
        "trace_id": "echo-trace",
        "correlation_id": "echo-corr",
    });
    (StatusCode::UNAUTHORIZED, axum::Json(body)).into_response()
}

// ---------------------------------------------------------------------------------------------
// SMTP upstream

/// An SMTP server on 127.0.0.1 with STARTTLS (a fresh CA in `ca_file`) that offers XOAUTH2 and
/// answers the credential with `535 5.7.3 Authentication unsuccessful` followed by the AUTH line
/// it received and [`echo_text`] of the token in it.
pub struct EchoSmtp {
    pub addr: SocketAddr,
    pub ca_file: PathBuf,
    auth_lines: Arc<AtomicU64>,
}

impl EchoSmtp {
    pub async fn start(dir: &Path) -> EchoSmtp {
        let (ca_file, server_config) = test_tls(dir);
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let auth_lines = Arc::new(AtomicU64::new(0));
        let counter = auth_lines.clone();
        let acceptor = tokio_rustls::TlsAcceptor::from(server_config);
        tokio::spawn(async move {
            // Bounded: a test makes a handful of connections.
            for _ in 0..1000 {
                let Ok((stream, _)) = listener.accept().await else {
                    return;
                };
                let acceptor = acceptor.clone();
                let counter = counter.clone();
                tokio::spawn(async move {
                    let _ = session(stream, acceptor, counter).await;
                });
            }
        });
        EchoSmtp {
            addr,
            ca_file,
            auth_lines,
        }
    }

    /// Credentials received (and echoed) so far.
    pub fn auth_lines(&self) -> u64 {
        self.auth_lines.load(Ordering::SeqCst)
    }
}

async fn session(
    stream: tokio::net::TcpStream,
    acceptor: tokio_rustls::TlsAcceptor,
    counter: Arc<AtomicU64>,
) -> std::io::Result<()> {
    let mut plain = BufReader::new(stream);
    plain
        .get_mut()
        .write_all(b"220 echo.test ESMTP\r\n")
        .await?;
    for _ in 0..20 {
        let line = read_line(&mut plain).await?;
        let verb = line.to_ascii_uppercase();
        if verb.starts_with("EHLO") {
            plain
                .get_mut()
                .write_all(b"250-echo.test\r\n250 STARTTLS\r\n")
                .await?;
        } else if verb.starts_with("STARTTLS") {
            plain.get_mut().write_all(b"220 2.0.0 go ahead\r\n").await?;
            let tls = acceptor.accept(plain.into_inner()).await?;
            return secured(BufReader::new(tls), counter).await;
        } else {
            plain
                .get_mut()
                .write_all(b"530 5.7.0 STARTTLS first\r\n")
                .await?;
        }
    }
    Ok(())
}

async fn secured<S: AsyncRead + AsyncWrite + Unpin>(
    mut s: BufReader<S>,
    counter: Arc<AtomicU64>,
) -> std::io::Result<()> {
    for _ in 0..20 {
        let line = read_line(&mut s).await?;
        let verb = line.to_ascii_uppercase();
        if verb.starts_with("EHLO") {
            s.get_mut()
                .write_all(b"250-echo.test\r\n250 AUTH XOAUTH2\r\n")
                .await?;
        } else if verb.starts_with("AUTH XOAUTH2") {
            s.get_mut().write_all(b"334 \r\n").await?;
            let credential = read_line(&mut s).await?;
            let decoded = STANDARD.decode(credential.trim()).unwrap_or_default();
            let decoded = String::from_utf8_lossy(&decoded).into_owned();
            let token = decoded
                .split('\x01')
                .find_map(|part| part.strip_prefix("auth=Bearer "))
                .unwrap_or_default()
                .to_string();
            counter.fetch_add(1, Ordering::SeqCst);
            let reply = format!(
                "535 5.7.3 Authentication unsuccessful line={} {}\r\n",
                credential.trim(),
                echo_text(&token)
            );
            s.get_mut().write_all(reply.as_bytes()).await?;
        } else if verb.starts_with("QUIT") {
            s.get_mut().write_all(b"221 2.0.0 bye\r\n").await?;
            return Ok(());
        } else {
            s.get_mut().write_all(b"503 5.5.1 AUTH first\r\n").await?;
        }
    }
    Ok(())
}

async fn read_line<R: AsyncBufReadExt + Unpin>(r: &mut R) -> std::io::Result<String> {
    let mut line = String::new();
    if r.read_line(&mut line).await? == 0 {
        return Err(std::io::ErrorKind::UnexpectedEof.into());
    }
    Ok(line.trim_end_matches(['\r', '\n']).to_string())
}

/// A CA (written to `dir/echo-ca.pem`) and a leaf for `localhost` and 127.0.0.1.
fn test_tls(dir: &Path) -> (PathBuf, Arc<rustls::ServerConfig>) {
    use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair};
    let ca_key = KeyPair::generate().expect("ca key");
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).expect("ca params");
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca_cert = ca_params.self_signed(&ca_key).expect("ca cert");
    let issuer = Issuer::new(ca_params, ca_key);
    let leaf_key = KeyPair::generate().expect("leaf key");
    let leaf = CertificateParams::new(vec!["localhost".to_string(), "127.0.0.1".to_string()])
        .expect("leaf params")
        .signed_by(&leaf_key, &issuer)
        .expect("leaf cert");
    let ca_file = dir.join("echo-ca.pem");
    std::fs::write(&ca_file, ca_cert.pem()).expect("write ca");
    let key = rustls_pki_types::PrivateKeyDer::try_from(leaf_key.serialize_der()).expect("key");
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .expect("versions")
        .with_no_client_auth()
        .with_single_cert(vec![leaf.der().clone(), ca_cert.der().clone()], key)
        .expect("server config");
    (ca_file, Arc::new(config))
}
