//! Token lifecycle through the relay and the simulator: background refresh with short-lived
//! tokens, an Entra outage, and certificate / federated assertions checked by the simulator.

mod common;

use std::time::Duration;

use common::delivery::{DeliveringRelay, start_delivering, start_delivering_with};
use smtp_oauth_relay::config::{AssertionAlg, Secret};
use smtp_oauth_relay::deliver::classify::HoldCause;
use smtp_oauth_relay::sim::{SimConfig, TokenFault};

const FAST: &str =
    "[queue]\nretry_min = \"200ms\"\nretry_max = \"1s\"\n[upstream]\nrate = \"1000/s\"\n";

/// Waits (bounded) until the simulator has answered at least `n` token requests.
async fn wait_token_requests(r: &DeliveringRelay, n: u64) -> u64 {
    for _ in 0..400 {
        let requests = r.sim.control().token_requests();
        if requests >= n {
            return requests;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!(
        "only {} of {n} token requests; refresher: {:?}",
        r.sim.control().token_requests(),
        r.tokens.status()
    );
}

#[tokio::test]
async fn short_lived_tokens_are_refreshed_in_the_background_not_per_message() {
    let sim = SimConfig {
        token_lifetime_secs: 4,
        ..SimConfig::default()
    };
    let r = start_delivering(FAST, sim).await;
    // With no mail at all, the refresher renews 4 s tokens by itself: the first request and two
    // renewals (the signal is the simulator's own request counter, not elapsed time).
    wait_token_requests(&r, 3).await;
    // 16 messages back to back: they all ride on the token the refresher holds.
    let before = r.sim.control().token_requests();
    for i in 0..16 {
        r.send(&format!("m{i}")).await;
    }
    r.wait_delivered(16).await;
    let during = r.sim.control().token_requests() - before;
    assert!(
        during < 16,
        "{during} token requests while 16 messages were delivered: a token per message"
    );
    assert_eq!(r.tokens.status().requests, r.sim.control().token_requests());
}

#[tokio::test]
async fn an_entra_outage_keeps_mail_queued_and_delivery_resumes_after() {
    // Entra answers 503 from the start: no token exists yet.
    let r = start_delivering_with(FAST, SimConfig::default(), |_, sim| {
        sim.control()
            .script_token_fault(TokenFault::ServiceUnavailable, 1000)
    })
    .await;
    r.send("queued while Entra is down").await;
    // The refresher has been refused twice more after the message was queued: delivery had
    // its chances meanwhile (retries every <= 1 s) and must have kept the message.
    let refused = r.sim.control().token_requests();
    wait_token_requests(&r, refused + 2).await;
    assert_eq!(
        r.relay.spool.list().expect("list").len(),
        1,
        "kept in the spool"
    );
    assert!(
        r.relay.files_in("failed").is_empty(),
        "an outage never fails mail"
    );
    assert!(r.sim.messages().expect("mailbox").is_empty());
    assert!(
        r.tokens.status().requests >= 2,
        "the refresher keeps trying"
    );
    r.sim.control().clear_faults();
    r.wait_delivered(1).await;
    r.wait_for("empty spool", |relay| {
        relay.spool.list().expect("list").is_empty()
    })
    .await;
}

struct TestCert {
    dir: tempfile::TempDir,
    cert_pem: String,
}

impl TestCert {
    fn new() -> TestCert {
        let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_RSA_SHA256).expect("rsa key");
        let cert = rcgen::CertificateParams::new(vec!["relay.test".to_string()])
            .expect("params")
            .self_signed(&key)
            .expect("cert");
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::write(dir.path().join("app.crt"), cert.pem()).expect("cert");
        std::fs::write(dir.path().join("app.key"), key.serialize_pem()).expect("key");
        TestCert {
            dir,
            cert_pem: cert.pem(),
        }
    }
}

fn use_certificate(
    config: &mut smtp_oauth_relay::config::Config,
    cert: &TestCert,
    alg: AssertionAlg,
) {
    config.oauth.client_secret = None;
    config.oauth.certificate_file = Some(cert.dir.path().join("app.crt"));
    config.oauth.private_key_file = Some(cert.dir.path().join("app.key"));
    config.oauth.assertion_alg = alg;
}

#[tokio::test]
async fn certificate_assertions_are_accepted_when_registered() {
    for alg in [AssertionAlg::PS256, AssertionAlg::RS256] {
        let cert = TestCert::new();
        let mut sim = SimConfig::default();
        sim.clients[0].certificate_pems.push(cert.cert_pem.clone());
        let r = start_delivering_with(FAST, sim, |c, _| use_certificate(c, &cert, alg)).await;
        r.send("signed with a certificate").await;
        let got = r.wait_delivered(1).await;
        assert_eq!(got.len(), 1, "{alg:?}");
    }
}

#[tokio::test]
async fn an_unregistered_certificate_holds_delivery_with_aadsts700027() {
    let cert = TestCert::new();
    let r = start_delivering_with(FAST, SimConfig::default(), |c, _| {
        use_certificate(c, &cert, AssertionAlg::PS256)
    })
    .await;
    r.send("signed with the wrong key").await;
    let (cause, reply) = r.wait_held().await;
    assert_eq!(cause, HoldCause::TokenRefused);
    assert!(reply.contains("700027"), "{reply}");
    assert_eq!(r.relay.spool.list().expect("list").len(), 1);
}

#[tokio::test]
async fn a_federated_assertion_file_is_read_for_each_request() {
    use base64::Engine;
    use sha2::Digest;
    // Stand-in for the workload identity token: a JWT signed with a key the simulator trusts.
    let cert = TestCert::new();
    let mut sim = SimConfig::default();
    sim.clients[0].certificate_pems.push(cert.cert_pem.clone());
    let client_id = sim.clients[0].client_id.clone();
    let assertion_path = cert.dir.path().join("federated-token");
    let key_pem = std::fs::read_to_string(cert.dir.path().join("app.key")).expect("key");
    let der = rustls_pki_types::pem::PemObject::from_pem_slice(cert.cert_pem.as_bytes())
        .map(|c: rustls_pki_types::CertificateDer<'static>| c.to_vec())
        .expect("der");
    let write_assertion = |token_url: &str| {
        let mut header = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::RS256);
        header.x5t =
            Some(base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(sha1::Sha1::digest(&der)));
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .expect("clock")
            .as_secs();
        let claims = serde_json::json!({
            "aud": token_url, "iss": client_id, "sub": client_id,
            "jti": format!("{now}-{}", std::process::id()),
            "nbf": now - 5, "iat": now, "exp": now + 600,
        });
        let key = jsonwebtoken::EncodingKey::from_rsa_pem(key_pem.as_bytes()).expect("key");
        let jwt = jsonwebtoken::encode(&header, &claims, &key).expect("sign");
        std::fs::write(&assertion_path, jwt).expect("write assertion");
    };
    // The file must exist before the relay starts (its path is validated).
    write_assertion("http://placeholder/");
    let path = assertion_path.clone();
    let r = start_delivering_with(FAST, sim, move |c, _| {
        c.oauth.client_secret = None::<Secret>;
        c.oauth.assertion_file = Some(path);
    })
    .await;
    // Now write a valid one for the real token URL: the relay re-reads the file per request.
    write_assertion(&r.sim.token_url());
    let _ = r.tokens.refresh_now().await;
    r.send("federated").await;
    r.wait_delivered(1).await;
}
