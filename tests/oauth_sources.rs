//! Token sources against a fake Entra endpoint on loopback: the exact form of each credential,
//! certificate assertions verified with the certificate's key, federated assertion files read
//! afresh, error classification over real HTTP, and no credential in any error text.

mod oauth_fake;

use std::time::Duration;

use oauth_fake::{CLIENT_ID, Expect, Fake, JWT_BEARER, Reply, SCOPE, other_cert, registered_cert};
use smtp_oauth_relay::config::AssertionAlg;
use smtp_oauth_relay::oauth::{OAuthError, TokenClient};

const SECRET: &str = "Xq8~kV3.secret-value_that-must-never-show";

fn keys(form: &std::collections::HashMap<String, String>) -> Vec<&str> {
    let mut k: Vec<&str> = form.keys().map(String::as_str).collect();
    k.sort_unstable();
    k
}

#[tokio::test]
async fn client_secret_sends_exactly_the_documented_form() {
    let fake = Fake::start(Expect::Secret(SECRET.into()), 3599).await;
    let mut config = fake.config();
    config.oauth.client_secret = Some(smtp_oauth_relay::config::Secret::new(SECRET));
    let client = TokenClient::from_config(&config).unwrap();
    assert_eq!(client.credential_kind(), "client secret");
    assert!(!format!("{client:?}").contains(SECRET));

    let token = client.request().await.unwrap();
    assert_eq!(token.secret(), "fake-access-token-1");
    assert_eq!(token.lifetime(), Duration::from_secs(3599));
    let left = token.expires_at.duration_since(token.issued_at).unwrap();
    assert_eq!(left, Duration::from_secs(3599));
    assert!(
        !format!("{token:?}").contains("fake-access-token"),
        "Debug redacts"
    );

    let seen = fake.seen();
    assert_eq!(seen.len(), 1);
    let form = &seen[0].form;
    assert_eq!(
        keys(form),
        ["client_id", "client_secret", "grant_type", "scope"]
    );
    assert_eq!(form["grant_type"], "client_credentials");
    assert_eq!(form["client_id"], CLIENT_ID);
    assert_eq!(form["scope"], SCOPE);
    assert_eq!(form["client_secret"], SECRET);
}

#[tokio::test]
async fn expires_in_as_a_string_is_accepted() {
    let fake = Fake::start(Expect::Anything, 4000).await;
    fake.push([Reply::OkString]);
    let mut config = fake.config();
    config.oauth.client_secret = Some(smtp_oauth_relay::config::Secret::new(SECRET));
    let token = TokenClient::from_config(&config)
        .unwrap()
        .request()
        .await
        .unwrap();
    assert_eq!(token.lifetime(), Duration::from_secs(4000));
}

async fn certificate_round(alg: AssertionAlg, pkcs1: bool) {
    let dir = tempfile::tempdir().unwrap();
    let cert = registered_cert();
    let (cert_file, key8, key1) = cert.write(dir.path());
    let fake = Fake::start(Expect::Certificate(cert.clone()), 3599).await;
    let mut config = fake.config();
    config.oauth.certificate_file = Some(cert_file);
    config.oauth.private_key_file = Some(if pkcs1 { key1 } else { key8 });
    config.oauth.assertion_alg = alg;
    let client = TokenClient::from_config(&config).unwrap();
    assert_eq!(client.credential_kind(), "certificate");
    assert!(client.warnings().is_empty());
    client
        .request()
        .await
        .expect("the fake verified the assertion");
    client.request().await.expect("second request");

    let seen = fake.seen();
    assert_eq!(seen.len(), 2);
    let form = &seen[0].form;
    assert_eq!(
        keys(form),
        [
            "client_assertion",
            "client_assertion_type",
            "client_id",
            "grant_type",
            "scope"
        ]
    );
    assert_eq!(form["client_assertion_type"], JWT_BEARER);
    let (header, claims) = seen[0].assertion.clone().unwrap();
    match alg {
        AssertionAlg::PS256 => {
            assert_eq!(header.alg, jsonwebtoken::Algorithm::PS256);
            assert!(header.x5t_s256.is_some() && header.x5t.is_none());
        }
        AssertionAlg::RS256 => {
            assert_eq!(header.alg, jsonwebtoken::Algorithm::RS256);
            assert!(header.x5t.is_some() && header.x5t_s256.is_none());
        }
    }
    assert_eq!(claims["aud"], fake.url.as_str());
    assert_eq!(claims["iss"], CLIENT_ID);
    assert_eq!(claims["sub"], CLIENT_ID);
    assert_eq!(
        claims["exp"].as_u64().unwrap() - claims["nbf"].as_u64().unwrap(),
        600
    );
    let (_, second) = seen[1].assertion.clone().unwrap();
    assert_ne!(claims["jti"], second["jti"], "a fresh jti per assertion");
}

#[tokio::test]
async fn certificate_ps256_with_x5t_s256_is_verified_by_the_fake() {
    certificate_round(AssertionAlg::PS256, false).await;
}

#[tokio::test]
async fn certificate_rs256_with_x5t_is_verified_by_the_fake() {
    certificate_round(AssertionAlg::RS256, false).await;
}

#[tokio::test]
async fn pkcs1_private_keys_work_too() {
    certificate_round(AssertionAlg::PS256, true).await;
}

#[tokio::test]
async fn wrong_key_gives_a_permanent_aadsts700027() {
    let dir = tempfile::tempdir().unwrap();
    // The registered certificate, signed with someone else's key.
    let (cert_file, _, _) = registered_cert().write(dir.path());
    let other = tempfile::tempdir().unwrap();
    let (_, wrong_key, _) = other_cert().write(other.path());
    let fake = Fake::start(Expect::Certificate(registered_cert().clone()), 3599).await;
    let mut config = fake.config();
    config.oauth.certificate_file = Some(cert_file);
    config.oauth.private_key_file = Some(wrong_key);
    let client = TokenClient::from_config(&config).unwrap();
    assert!(
        client.warnings()[0].contains("does not belong"),
        "detected locally too"
    );
    let e = client.request().await.unwrap_err();
    assert_eq!(e.error_codes(), &[700027], "{e}");
    assert_eq!(e.http_status(), Some(401));
    assert!(!e.is_transient());
    let shown = e.to_string();
    assert!(
        shown.contains("AADSTS700027") && shown.contains("trace-700027"),
        "{shown}"
    );
    // The fake echoed the assertion; it must not survive into the error.
    let sent = &fake.seen()[0].form["client_assertion"];
    assert!(!shown.contains(sent.as_str()));
    assert!(!format!("{e:?}").contains(sent.as_str()));

    // An unregistered certificate (other thumbprint) is refused the same way.
    let (other_cert_file, other_key, _) = other_cert().write(other.path());
    config.oauth.certificate_file = Some(other_cert_file);
    config.oauth.private_key_file = Some(other_key);
    let e = TokenClient::from_config(&config)
        .unwrap()
        .request()
        .await
        .unwrap_err();
    assert_eq!(e.error_codes(), &[700027]);
}

#[tokio::test]
async fn unusable_key_files_fail_at_construction() {
    let dir = tempfile::tempdir().unwrap();
    let (cert_file, _, _) = registered_cert().write(dir.path());
    let fake = Fake::start(Expect::Anything, 3599).await;
    let mut config = fake.config();
    config.oauth.certificate_file = Some(cert_file.clone());
    let garbage = dir.path().join("garbage.pem");
    std::fs::write(
        &garbage,
        "-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n",
    )
    .unwrap();
    for key in [dir.path().join("missing.pem"), garbage, cert_file] {
        config.oauth.private_key_file = Some(key.clone());
        let e = TokenClient::from_config(&config).unwrap_err();
        assert!(matches!(e, OAuthError::Config(_)), "{key:?}: {e}");
        assert!(e.to_string().contains("oauth.private_key_file"), "{e}");
        assert!(!e.is_transient());
    }
    assert_eq!(fake.requests(), 0);
}

#[tokio::test]
async fn federated_assertion_file_is_read_for_every_request() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("azure-identity-token");
    std::fs::write(&file, "eyJhbGciOiJSUzI1NiJ9.first.sig\n").unwrap();
    let fake = Fake::start(Expect::Anything, 3599).await;
    let mut config = fake.config();
    config.oauth.assertion_file = Some(file.clone());
    let client = TokenClient::from_config(&config).unwrap();
    assert_eq!(client.credential_kind(), "federated assertion");
    client.request().await.unwrap();
    // The platform rotates the projected token (atomically, by rename).
    let tmp = dir.path().join("new");
    std::fs::write(&tmp, "eyJhbGciOiJSUzI1NiJ9.second.sig").unwrap();
    std::fs::rename(&tmp, &file).unwrap();
    client.request().await.unwrap();

    let seen = fake.seen();
    assert_eq!(
        seen[0].form["client_assertion"],
        "eyJhbGciOiJSUzI1NiJ9.first.sig"
    );
    assert_eq!(
        seen[1].form["client_assertion"],
        "eyJhbGciOiJSUzI1NiJ9.second.sig"
    );
    for s in &seen {
        assert_eq!(s.form["client_assertion_type"], JWT_BEARER);
        assert!(!s.form.contains_key("client_secret"));
    }

    // A vanished file is a credential error, without a request.
    std::fs::remove_file(&file).unwrap();
    let e = client.request().await.unwrap_err();
    assert!(matches!(e, OAuthError::Credential(_)), "{e}");
    assert_eq!(fake.requests(), 2);
}

#[tokio::test]
async fn no_secret_or_assertion_in_any_error() {
    let fake = Fake::start(Expect::Secret("the-right-one".into()), 3599).await;
    let mut config = fake.config();
    config.oauth.client_secret = Some(smtp_oauth_relay::config::Secret::new(SECRET));
    let client = TokenClient::from_config(&config).unwrap();
    let mut errors = vec![client.request().await.unwrap_err()];
    assert_eq!(errors[0].error_codes(), &[7000215]);
    assert!(!errors[0].is_transient());
    assert!(errors[0].hint().unwrap().contains("Value"));

    // Federated: the fake (expecting a secret) refuses and echoes nothing, but scripted
    // errors of every kind must not carry the assertion either.
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("token");
    let assertion = "eyJhbGciOiJSUzI1NiJ9.federated-assertion-text.signature";
    std::fs::write(&file, assertion).unwrap();
    let mut fed = fake.config();
    fed.oauth.assertion_file = Some(file);
    let fed = TokenClient::from_config(&fed).unwrap();
    fake.set_expect(Expect::Anything);
    fake.push([
        Reply::Entra(400, "invalid_request", 90002),
        Reply::TooMany(3),
        Reply::ServerError,
        Reply::Malformed,
    ]);
    for _ in 0..4 {
        errors.push(fed.request().await.unwrap_err());
    }
    // Unreachable endpoint.
    let mut dead = fake.config();
    dead.oauth.client_secret = Some(smtp_oauth_relay::config::Secret::new(SECRET));
    dead.oauth.token_url = Some("http://127.0.0.1:1/t/oauth2/v2.0/token".into());
    errors.push(
        TokenClient::from_config(&dead)
            .unwrap()
            .request()
            .await
            .unwrap_err(),
    );

    for e in &errors {
        for text in [e.to_string(), format!("{e:?}")] {
            assert!(!text.contains(SECRET), "secret in {text}");
            assert!(!text.contains(assertion), "assertion in {text}");
            assert!(
                !text.contains("federated-assertion-text"),
                "assertion in {text}"
            );
        }
    }
    // And they are classified.
    assert!(!errors[1].is_transient(), "{}", errors[1]);
    assert_eq!(errors[2].retry_after(), Some(Duration::from_secs(3)));
    assert!(errors[2].is_transient() && errors[3].is_transient());
    assert!(matches!(errors[4], OAuthError::Malformed { .. }) && errors[4].is_transient());
    assert!(
        matches!(errors[5], OAuthError::Network(_)) && errors[5].is_transient(),
        "{}",
        errors[5]
    );
}

#[tokio::test(start_paused = true)]
async fn a_request_that_does_not_answer_times_out() {
    let fake = Fake::start(Expect::Anything, 3599).await;
    fake.push([Reply::Slow(Duration::from_secs(45))]);
    let mut config = fake.config();
    config.oauth.client_secret = Some(smtp_oauth_relay::config::Secret::new(SECRET));
    let client = TokenClient::from_config(&config).unwrap();
    let started = tokio::time::Instant::now();
    let e = client.request().await.unwrap_err();
    assert!(matches!(e, OAuthError::Timeout(_)), "{e}");
    assert!(e.is_transient());
    assert_eq!(started.elapsed().as_secs(), 30, "REQUEST_TIMEOUT");
}
