//! Credential files are read at every token request: a client secret file and a certificate
//! with its key, replaced in place (as the kubelet swaps a mounted Secret), are used by the
//! next request of the same token client, against an endpoint that accepts only the new one.

mod oauth_fake;

use oauth_fake::{Expect, Fake, other_cert, registered_cert};
use smtp_oauth_relay::config::{self, Config};
use smtp_oauth_relay::oauth::TokenClient;
use smtp_oauth_relay::redact;

const OLD: &str = "Old0~secret-value-0123456789abcdefghijk";
const NEW: &str = "New1~secret-value-0123456789abcdefghijk";

/// The fake's config as `config::load` reads it from a file naming `client_secret_file`.
fn loaded_with_secret_file(fake: &Fake, dir: &std::path::Path) -> Config {
    let secret_file = dir.join("client_secret");
    std::fs::write(&secret_file, format!("{OLD}\n")).unwrap();
    let base = fake.config();
    let file = dir.join("relay.toml");
    std::fs::write(
        &file,
        format!(
            "[queue]\ndir = \"{}/spool\"\n[upstream]\nmail_account = \"relay@contoso.example\"\n\
             [oauth]\ntenant_id = \"{}\"\nclient_id = \"{}\"\nclient_secret_file = \"{}\"\n\
             token_url = \"{}\"\n",
            dir.display(),
            base.oauth.tenant_id.as_deref().unwrap(),
            base.oauth.client_id.as_deref().unwrap(),
            secret_file.display(),
            base.oauth.token_url.as_deref().unwrap(),
        ),
    )
    .unwrap();
    config::load(Some(&file)).expect("valid config")
}

#[tokio::test]
async fn a_rotated_client_secret_file_is_sent_by_the_next_request() {
    let dir = tempfile::tempdir().unwrap();
    let fake = Fake::start(Expect::Secret(OLD.into()), 3599).await;
    let config = loaded_with_secret_file(&fake, dir.path());
    let client = TokenClient::from_config(&config).unwrap();
    client.request().await.expect("the old secret is accepted");

    std::fs::write(dir.path().join("client_secret"), format!("{NEW}\n")).unwrap();
    fake.set_expect(Expect::Secret(NEW.into()));
    client
        .request()
        .await
        .expect("the next request sends the rotated secret");
    let seen = fake.seen();
    assert_eq!(seen[0].form["client_secret"], OLD);
    assert_eq!(seen[1].form["client_secret"], NEW);
    // The scrubber knows the secret it read, so an upstream echo of it is never shown.
    let echoed = redact::scrub(&format!("invalid_client: got {NEW}"));
    assert!(!echoed.contains(NEW), "{echoed}");
}

#[tokio::test]
async fn a_renewed_certificate_and_key_are_used_by_the_next_request() {
    let dir = tempfile::tempdir().unwrap();
    let (cert_file, key_file, _) = registered_cert().write(dir.path());
    let fake = Fake::start(Expect::Certificate(registered_cert().clone()), 3599).await;
    let mut config = fake.config();
    config.oauth.certificate_file = Some(cert_file);
    config.oauth.private_key_file = Some(key_file);
    let client = TokenClient::from_config(&config).unwrap();
    client.request().await.expect("the first certificate works");

    // Renewed in place: same file names, a new certificate and key; Entra knows only the new.
    other_cert().write(dir.path());
    fake.set_expect(Expect::Certificate(other_cert().clone()));
    client
        .request()
        .await
        .expect("the next assertion is signed with the renewed key");
}
