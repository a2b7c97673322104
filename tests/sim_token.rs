//! Simulated Entra ID token endpoint over HTTP: success shape and claims, every AADSTS error it implements,
//! HTTP Basic and form client auth, certificate assertions (PS256/x5t#S256, RS256/x5t), faults.

mod common;

use std::time::Duration;

use base64::Engine;
use common::sim::{TestSim, http, post_token, start};
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::{Value, json};
use sha1::Digest as _;
use smtp_oauth_relay::sim::{
    DEFAULT_CLIENT_ID, DEFAULT_CLIENT_SECRET, DEFAULT_TENANT_ID, EXCHANGE_SCOPE, TokenFault,
};

fn secret_form<'a>() -> Vec<(&'a str, &'a str)> {
    vec![
        ("grant_type", "client_credentials"),
        ("client_id", DEFAULT_CLIENT_ID),
        ("client_secret", DEFAULT_CLIENT_SECRET),
        ("scope", EXCHANGE_SCOPE),
    ]
}

/// Posts and asserts an Entra error: HTTP status, `error`, AADSTS code, and the full body shape.
async fn expect_error(resp: reqwest::Response, status: u16, error: &str, code: u64) -> Value {
    assert_eq!(resp.status().as_u16(), status);
    assert_eq!(
        resp.headers()["content-type"],
        "application/json; charset=utf-8"
    );
    let body: Value = resp.json().await.expect("json error body");
    assert_eq!(body["error"], error, "{body}");
    assert_eq!(body["error_codes"], json!([code]), "{body}");
    let desc = body["error_description"]
        .as_str()
        .expect("error_description");
    assert!(desc.starts_with(&format!("AADSTS{code}: ")), "{desc}");
    let trace = body["trace_id"].as_str().expect("trace_id");
    let corr = body["correlation_id"].as_str().expect("correlation_id");
    let ts = body["timestamp"].as_str().expect("timestamp");
    assert!(
        desc.contains(&format!(
            "\r\nTrace ID: {trace}\r\nCorrelation ID: {corr}\r\nTimestamp: {ts}"
        )),
        "{desc}"
    );
    // "YYYY-MM-DD HH:MM:SSZ"
    assert_eq!(ts.len(), 20, "{ts}");
    assert_eq!((&ts[4..5], &ts[10..11], &ts[19..]), ("-", " ", "Z"));
    assert_eq!(trace.len(), 36);
    assert_eq!(
        body["error_uri"],
        format!("https://login.microsoftonline.com/error?code={code}")
    );
    body
}

fn decode_claims(sim: &TestSim, token: &str) -> Value {
    let key = jsonwebtoken::DecodingKey::from_rsa_pem(
        sim.control().token_signing_public_key_pem().as_bytes(),
    )
    .expect("sim public key");
    let mut v = jsonwebtoken::Validation::new(Algorithm::RS256);
    v.validate_aud = false;
    jsonwebtoken::decode::<Value>(token, &key, &v)
        .expect("token verifies with the sim key")
        .claims
}

#[tokio::test]
async fn secret_in_form_body_issues_exchange_token() {
    let sim = start().await;
    let resp = post_token(&sim, &secret_form()).await;
    assert_eq!(resp.status(), 200);
    let h = resp.headers();
    assert_eq!(h["cache-control"], "no-store, no-cache");
    assert_eq!(h["pragma"], "no-cache");
    assert_eq!(h["content-type"], "application/json; charset=utf-8");
    assert_eq!(h["expires"], "-1");
    let body: Value = resp.json().await.expect("json");
    assert_eq!(body["token_type"], "Bearer");
    assert_eq!(body["expires_in"], 3599);
    assert_eq!(body["ext_expires_in"], 3599);
    let claims = decode_claims(&sim, body["access_token"].as_str().expect("token"));
    assert_eq!(claims["aud"], "https://outlook.office365.com");
    assert_eq!(
        claims["iss"],
        format!("https://sts.windows.net/{DEFAULT_TENANT_ID}/")
    );
    assert_eq!(claims["tid"], DEFAULT_TENANT_ID);
    assert_eq!(claims["appid"], DEFAULT_CLIENT_ID);
    assert_eq!(claims["appidacr"], "1");
    assert_eq!(claims["idtyp"], "app");
    assert_eq!(claims["roles"], json!(["SMTP.SendAsApp"]));
    assert!(claims["oid"].is_string());
    let (iat, nbf, exp) = (
        claims["iat"].as_u64(),
        claims["nbf"].as_u64(),
        claims["exp"].as_u64(),
    );
    assert_eq!(exp.zip(iat).map(|(e, i)| e - i), Some(3599));
    assert_eq!(nbf, iat);
    assert!(claims.get("scp").is_none() && claims.get("upn").is_none());
    assert_eq!(sim.control().tokens_issued(), 1);

    // Lifetime and roles follow the switches, including a missing claim.
    sim.control().set_token_lifetime(60);
    sim.control().set_roles(None);
    let body: Value = post_token(&sim, &secret_form())
        .await
        .json()
        .await
        .expect("json");
    assert_eq!(body["expires_in"], 60);
    let claims = decode_claims(&sim, body["access_token"].as_str().expect("token"));
    assert!(claims.get("roles").is_none());

    // The tenant may also be named by a verified domain.
    let url = format!(
        "{}/contoso.onmicrosoft.com/oauth2/v2.0/token",
        sim.token_base_url()
    );
    assert_eq!(
        http()
            .post(url)
            .form(&secret_form())
            .send()
            .await
            .expect("send")
            .status(),
        200
    );
}

#[tokio::test]
async fn secret_via_http_basic() {
    let sim = start().await;
    let resp = http()
        .post(sim.token_url())
        .basic_auth(DEFAULT_CLIENT_ID, Some(DEFAULT_CLIENT_SECRET))
        .form(&[
            ("grant_type", "client_credentials"),
            ("scope", EXCHANGE_SCOPE),
        ])
        .send()
        .await
        .expect("send");
    assert_eq!(resp.status(), 200);
    let resp = http()
        .post(sim.token_url())
        .basic_auth(DEFAULT_CLIENT_ID, Some("wrong"))
        .form(&[
            ("grant_type", "client_credentials"),
            ("scope", EXCHANGE_SCOPE),
        ])
        .send()
        .await
        .expect("send");
    expect_error(resp, 401, "invalid_client", 7000215).await;
}

#[tokio::test]
async fn request_errors() {
    let sim = start().await;
    let base = sim.token_base_url();
    let post_to = |tenant: &str| {
        let url = format!("{base}/{tenant}/oauth2/v2.0/token");
        http().post(url).form(&secret_form()).send()
    };
    expect_error(
        post_to("common").await.expect("send"),
        400,
        "unsupported_grant_type",
        9001023,
    )
    .await;
    expect_error(
        post_to("consumers").await.expect("send"),
        400,
        "unsupported_grant_type",
        9001023,
    )
    .await;
    let body = expect_error(
        post_to("11111111-2222-3333-4444-555555555555")
            .await
            .expect("send"),
        400,
        "invalid_tenant",
        90002,
    )
    .await;
    assert!(body["error_description"].as_str().unwrap_or_default().contains(
        "AADSTS90002: Tenant '11111111-2222-3333-4444-555555555555' not found. Check to make sure you have the correct \
         tenant ID and are signing into the correct cloud."
    ));
    expect_error(
        post_to("not_a_tenant").await.expect("send"),
        400,
        "invalid_request",
        900023,
    )
    .await;

    let with = |k: &'static str, v: &'static str| {
        let mut f = secret_form();
        f.retain(|(n, _)| *n != k);
        if !v.is_empty() {
            f.push((k, v));
        }
        f
    };
    expect_error(
        post_token(&sim, &with("grant_type", "password")).await,
        400,
        "unsupported_grant_type",
        70003,
    )
    .await;
    expect_error(
        post_token(&sim, &with("grant_type", "")).await,
        400,
        "invalid_request",
        900144,
    )
    .await;
    let body = expect_error(
        post_token(
            &sim,
            &with("client_id", "99999999-9999-9999-9999-999999999999"),
        )
        .await,
        400,
        "unauthorized_client",
        700016,
    )
    .await;
    assert!(body["error_description"].as_str().unwrap_or_default().starts_with(&format!(
        "AADSTS700016: Application with identifier '99999999-9999-9999-9999-999999999999' was not found in the \
         directory '{DEFAULT_TENANT_ID}'."
    )));
    expect_error(
        post_token(
            &sim,
            &with("scope", "https://outlook.office365.com/SMTP.SendAsApp"),
        )
        .await,
        400,
        "invalid_scope",
        1002012,
    )
    .await;
    expect_error(
        post_token(&sim, &with("scope", "https://foo.example/.default")).await,
        400,
        "invalid_resource",
        500011,
    )
    .await;
    expect_error(
        post_token(&sim, &with("scope", "")).await,
        400,
        "invalid_request",
        900144,
    )
    .await;
    let body = expect_error(
        post_token(&sim, &with("client_secret", "")).await,
        401,
        "invalid_client",
        7000218,
    )
    .await;
    assert!(body["error_description"].as_str().unwrap_or_default().starts_with(
        "AADSTS7000218: The request body must contain the following parameter: 'client_assertion' or 'client_secret'."
    ));
    let body = expect_error(
        post_token(&sim, &with("client_secret", "nope")).await,
        401,
        "invalid_client",
        7000215,
    )
    .await;
    assert!(body["error_description"].as_str().unwrap_or_default().starts_with(&format!(
        "AADSTS7000215: Invalid client secret provided. Ensure the secret being sent in the request is the client \
         secret value, not the client secret ID, for a secret added to app '{DEFAULT_CLIENT_ID}'."
    )));
    sim.control().set_secrets_expired(true);
    let body = expect_error(
        post_token(&sim, &secret_form()).await,
        401,
        "invalid_client",
        7000222,
    )
    .await;
    assert!(body["error_description"].as_str().unwrap_or_default().starts_with(&format!(
        "AADSTS7000222: The provided client secret keys for app '{DEFAULT_CLIENT_ID}' are expired."
    )));

    // A JSON body is not read at all: the parameters are "missing".
    let resp = http()
        .post(sim.token_url())
        .json(&json!({"grant_type": "client_credentials"}))
        .send()
        .await;
    expect_error(resp.expect("send"), 400, "invalid_request", 900144).await;
    // The client's correlation id is echoed.
    let resp = http()
        .post(sim.token_url())
        .header("client-request-id", "0a0b0c0d-0000-1111-2222-333344445555")
        .form(&with("client_secret", "nope"))
        .send()
        .await
        .expect("send");
    let body = expect_error(resp, 401, "invalid_client", 7000215).await;
    assert_eq!(
        body["correlation_id"],
        "0a0b0c0d-0000-1111-2222-333344445555"
    );
}

/// A certificate (RSA) and its private key as PEM, self-signed, plus its thumbprints.
struct TestCert {
    cert_pem: String,
    key_pem: String,
    x5t: String,
    x5t_s256: String,
}

fn make_cert() -> TestCert {
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_RSA_SHA256).expect("rsa key");
    let cert = rcgen::CertificateParams::new(vec!["relay.test".to_string()])
        .expect("params")
        .self_signed(&key)
        .expect("cert");
    let der = cert.der().to_vec();
    let b64 = |b: &[u8]| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(b);
    TestCert {
        cert_pem: cert.pem(),
        key_pem: key.serialize_pem(),
        x5t: b64(&sha1::Sha1::digest(&der)),
        x5t_s256: b64(&sha2::Sha256::digest(&der)),
    }
}

fn assertion(cert: &TestCert, alg: Algorithm, claims: Value) -> String {
    let mut header = Header::new(alg);
    header.typ = Some("JWT".into());
    if alg == Algorithm::PS256 {
        header.x5t_s256 = Some(cert.x5t_s256.clone());
    } else {
        header.x5t = Some(cert.x5t.clone());
    }
    let key = EncodingKey::from_rsa_pem(cert.key_pem.as_bytes()).expect("encoding key");
    jsonwebtoken::encode(&header, &claims, &key).expect("sign")
}

fn claims(aud: &str, iss: &str, sub: &str, nbf: i64, exp: i64) -> Value {
    json!({ "aud": aud, "iss": iss, "sub": sub, "jti": ulid::Ulid::generate().to_string(), "nbf": nbf, "iat": nbf, "exp": exp })
}

fn now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

async fn post_assertion(sim: &TestSim, jwt: &str) -> reqwest::Response {
    post_token(
        sim,
        &[
            ("grant_type", "client_credentials"),
            ("client_id", DEFAULT_CLIENT_ID),
            ("scope", EXCHANGE_SCOPE),
            (
                "client_assertion_type",
                "urn:ietf:params:oauth:client-assertion-type:jwt-bearer",
            ),
            ("client_assertion", jwt),
        ],
    )
    .await
}

#[tokio::test]
async fn certificate_assertions() {
    let sim = start().await;
    let cert = make_cert();
    sim.control()
        .add_client_certificate(DEFAULT_CLIENT_ID, &cert.cert_pem)
        .expect("register cert");
    let aud = sim.token_url();
    let t = now();

    for alg in [Algorithm::PS256, Algorithm::RS256] {
        let jwt = assertion(
            &cert,
            alg,
            claims(&aud, DEFAULT_CLIENT_ID, DEFAULT_CLIENT_ID, t, t + 600),
        );
        let resp = post_assertion(&sim, &jwt).await;
        assert_eq!(resp.status(), 200, "{alg:?}");
        let body: Value = resp.json().await.expect("json");
        assert_eq!(
            decode_claims(&sim, body["access_token"].as_str().expect("token"))["appidacr"],
            "2"
        );
    }
    // The production authority as audience is accepted too (what a client built for Microsoft sends).
    let prod_aud =
        format!("https://login.microsoftonline.com/{DEFAULT_TENANT_ID}/oauth2/v2.0/token");
    let jwt = assertion(
        &cert,
        Algorithm::PS256,
        claims(&prod_aud, DEFAULT_CLIENT_ID, DEFAULT_CLIENT_ID, t, t + 600),
    );
    assert_eq!(post_assertion(&sim, &jwt).await.status(), 200);

    // Unregistered key: 401 AADSTS700027 with the thumbprint.
    let stranger = make_cert();
    let jwt = assertion(
        &stranger,
        Algorithm::RS256,
        claims(&aud, DEFAULT_CLIENT_ID, DEFAULT_CLIENT_ID, t, t + 600),
    );
    let body = expect_error(
        post_assertion(&sim, &jwt).await,
        401,
        "invalid_client",
        700027,
    )
    .await;
    assert!(body["error_description"].as_str().unwrap_or_default().starts_with(
        "AADSTS700027: Client assertion contains an invalid signature. [Reason - The key was not found., Thumbprint of \
         key used by client: '"
    ));
    // Registered thumbprint but signed with another key.
    let mut forged = make_cert();
    forged.x5t_s256 = cert.x5t_s256.clone();
    let jwt = assertion(
        &forged,
        Algorithm::PS256,
        claims(&aud, DEFAULT_CLIENT_ID, DEFAULT_CLIENT_ID, t, t + 600),
    );
    expect_error(
        post_assertion(&sim, &jwt).await,
        401,
        "invalid_client",
        700027,
    )
    .await;

    // Claim checks.
    let jwt = assertion(
        &cert,
        Algorithm::PS256,
        claims(
            "https://elsewhere/",
            DEFAULT_CLIENT_ID,
            DEFAULT_CLIENT_ID,
            t,
            t + 600,
        ),
    );
    expect_error(
        post_assertion(&sim, &jwt).await,
        401,
        "invalid_client",
        700212,
    )
    .await;
    let other = "22222222-2222-2222-2222-222222222222";
    let jwt = assertion(
        &cert,
        Algorithm::PS256,
        claims(&aud, other, other, t, t + 600),
    );
    expect_error(
        post_assertion(&sim, &jwt).await,
        401,
        "invalid_client",
        700021,
    )
    .await;
    let jwt = assertion(
        &cert,
        Algorithm::PS256,
        claims(&aud, DEFAULT_CLIENT_ID, other, t, t + 600),
    );
    let body = expect_error(
        post_assertion(&sim, &jwt).await,
        401,
        "invalid_client",
        50048,
    )
    .await;
    assert!(
        body["error_description"]
            .as_str()
            .unwrap_or_default()
            .starts_with("AADSTS50048: Subject mismatches Issuer claim in the client assertion.")
    );
    let jwt = assertion(
        &cert,
        Algorithm::PS256,
        claims(
            &aud,
            DEFAULT_CLIENT_ID,
            DEFAULT_CLIENT_ID,
            t - 7200,
            t - 3600,
        ),
    );
    expect_error(
        post_assertion(&sim, &jwt).await,
        401,
        "invalid_client",
        700024,
    )
    .await;
    let jwt = assertion(
        &cert,
        Algorithm::PS256,
        claims(
            &aud,
            DEFAULT_CLIENT_ID,
            DEFAULT_CLIENT_ID,
            t + 3600,
            t + 7200,
        ),
    );
    expect_error(
        post_assertion(&sim, &jwt).await,
        401,
        "invalid_client",
        700024,
    )
    .await;
    expect_error(
        post_assertion(&sim, "not.a.jwt").await,
        401,
        "invalid_client",
        50027,
    )
    .await;
    // Only RS256 and PS256 are accepted.
    let mut header = Header::new(Algorithm::HS256);
    header.x5t = Some(cert.x5t.clone());
    let hs = jsonwebtoken::encode(
        &header,
        &claims(&aud, DEFAULT_CLIENT_ID, DEFAULT_CLIENT_ID, t, t + 600),
        &EncodingKey::from_secret(b"shared-secret-for-hs256-test").expect("hmac key"),
    )
    .expect("sign hs256");
    expect_error(
        post_assertion(&sim, &hs).await,
        401,
        "invalid_client",
        5002738,
    )
    .await;
}

#[tokio::test]
async fn scripted_faults() {
    let sim = start().await;
    sim.control().script_token_fault(
        TokenFault::TooManyRequests {
            retry_after_secs: 7,
        },
        2,
    );
    for _ in 0..2 {
        let resp = post_token(&sim, &secret_form()).await;
        assert_eq!(resp.headers()["retry-after"], "7");
        expect_error(resp, 429, "temporarily_unavailable", 90055).await;
    }
    sim.control()
        .script_token_fault(TokenFault::InternalServerError, 1);
    sim.control()
        .script_token_fault(TokenFault::ServiceUnavailable, 1);
    sim.control()
        .script_token_fault(TokenFault::MalformedJson, 1);
    sim.control()
        .script_token_fault(TokenFault::Slow(Duration::from_millis(100)), 1);
    expect_error(
        post_token(&sim, &secret_form()).await,
        500,
        "temporarily_unavailable",
        50033,
    )
    .await;
    expect_error(
        post_token(&sim, &secret_form()).await,
        503,
        "temporarily_unavailable",
        90033,
    )
    .await;
    let resp = post_token(&sim, &secret_form()).await;
    assert_eq!(resp.status(), 200);
    assert!(
        resp.json::<Value>().await.is_err(),
        "malformed JSON expected"
    );
    // Slow, then normal.
    assert_eq!(post_token(&sim, &secret_form()).await.status(), 200);
    assert_eq!(post_token(&sim, &secret_form()).await.status(), 200);
    assert_eq!(sim.control().token_requests(), 7);
    assert_eq!(sim.control().tokens_issued(), 2);
    // Each scripted fault answered exactly one request (the slow one too, then normally).
    assert_eq!(sim.control().token_faults_fired(), 6);
    assert_eq!(sim.control().token_faults_pending(), 0);
}
