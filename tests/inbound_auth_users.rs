//! Inbound AUTH against a users file of argon2id hashes made by `hash-password`: the right
//! password, a wrong one, an unknown user, and plaintext lines refused at load through the
//! real binary (exit 2, with how to make a hash).

mod common;

use common::process::{hash_password_cli, run_cli};
use common::start_relay;

#[test]
fn hash_password_prints_a_fresh_salted_argon2id_string() {
    let a = hash_password_cli("Tr0ub4dor");
    let b = hash_password_cli("Tr0ub4dor");
    assert!(a.starts_with("$argon2id$v=19$"), "{a}");
    assert_ne!(a, b, "each hash has its own salt");
    assert!(!a.contains("Tr0ub4dor"));
}

#[tokio::test]
async fn hashed_users_good_wrong_and_unknown() {
    let dir = tempfile::tempdir().expect("tempdir");
    let users = dir.path().join("users");
    let hash = hash_password_cli("right-password");
    std::fs::write(&users, format!("# devices\nscanner:{hash}\n")).expect("write");
    let relay = start_relay(&format!("[smtp]\nauth = \"{}\"\n", users.display())).await;
    let mut c = relay.connect().await;
    c.expect("220").await;
    c.cmd_expect("EHLO c", "250").await;
    // base64("\0scanner\0wrong")
    c.cmd_expect("AUTH PLAIN AHNjYW5uZXIAd3Jvbmc=", "535 5.7.8")
        .await;
    // base64("\0nobody\0right-password"): an unknown user fails like a wrong password.
    c.cmd_expect("AUTH PLAIN AG5vYm9keQByaWdodC1wYXNzd29yZA==", "535 5.7.8")
        .await;
    // AUTH LOGIN: base64("scanner"), base64("right-password")
    c.cmd_expect("AUTH LOGIN", "334 VXNlcm5hbWU6").await;
    c.cmd_expect("c2Nhbm5lcg==", "334 UGFzc3dvcmQ6").await;
    c.cmd_expect("cmlnaHQtcGFzc3dvcmQ=", "235").await;
    c.cmd_expect("MAIL FROM:<a@legacy.test>", "250").await;
}

#[test]
fn a_plaintext_users_file_is_refused_with_how_to_hash() {
    let dir = tempfile::tempdir().expect("tempdir");
    let users = dir.path().join("users");
    std::fs::write(&users, "scanner:Plain-Secret-1\n").expect("write");
    let config = dir.path().join("relay.toml");
    std::fs::write(
        &config,
        format!(
            "[smtp]\nlisten = [\"127.0.0.1:{}\"]\nauth = \"{}\"\n[queue]\ndir = \"{}\"\n",
            common::process::free_port(),
            users.display(),
            dir.path().join("spool").display()
        ),
    )
    .expect("write config");
    let out = run_cli(&config, &["config"], &[]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(2), "{stdout}{stderr}");
    assert!(stderr.contains("hash-password"), "{stderr}");
    assert!(
        stderr.contains("smtp.auth") || stderr.contains("users file"),
        "{stderr}"
    );
    assert!(
        !stderr.contains("Plain-Secret-1") && !stdout.contains("Plain-Secret-1"),
        "the plaintext password is echoed: {stderr}"
    );
}

/// A users file with `scanner` / `right-password`, in `dir`.
fn users_file(dir: &std::path::Path) -> std::path::PathBuf {
    let users = dir.join("users");
    let hash = hash_password_cli("right-password");
    std::fs::write(&users, format!("scanner:{hash}\n")).expect("write");
    users
}

#[tokio::test]
async fn five_failures_end_the_connection_and_lock_the_address_out() {
    let dir = tempfile::tempdir().expect("tempdir");
    let users = users_file(dir.path());
    let relay = start_relay(&format!("[smtp]\nauth = \"{}\"\n", users.display())).await;
    let mut c = relay.connect().await;
    c.expect("220").await;
    c.cmd_expect("EHLO c", "250").await;
    // base64("\0scanner\0wrong"), 4 times, each after the failure delay.
    for _ in 0..4 {
        c.cmd_expect("AUTH PLAIN AHNjYW5uZXIAd3Jvbmc=", "535 5.7.8")
            .await;
    }
    // The 5th (the limit) is answered, then the connection ends with 421.
    c.cmd_expect("AUTH PLAIN AHNjYW5uZXIAd3Jvbmc=", "535 5.7.8")
        .await;
    c.expect("421 4.7.0").await;
    c.expect_closed().await;
    // The limit is the address's, not the connection's: even the right password
    // (base64("\0scanner\0right-password")) is refused without being checked.
    let mut c = relay.connect().await;
    c.expect("220").await;
    c.cmd_expect("EHLO c", "250").await;
    c.cmd_expect("AUTH PLAIN AHNjYW5uZXIAcmlnaHQtcGFzc3dvcmQ=", "421 4.7.0")
        .await;
    c.expect_closed().await;
    // Without AUTH the address gets no further than before.
    let mut c = relay.connect().await;
    c.expect("220").await;
    c.cmd_expect("EHLO c", "250").await;
    c.cmd_expect("MAIL FROM:<a@legacy.test>", "530 5.7.0").await;
}

#[tokio::test]
async fn auth_before_tls_is_refused_and_not_offered_without_the_loopback_exemption() {
    use std::sync::Arc;
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    let dir = tempfile::tempdir().expect("tempdir");
    let users = users_file(dir.path());
    let cert = rcgen::generate_simple_self_signed(vec!["localhost".to_string()]).expect("cert");
    let (cert_path, key_path) = (dir.path().join("tls.crt"), dir.path().join("tls.key"));
    std::fs::write(&cert_path, cert.cert.pem()).expect("write cert");
    std::fs::write(&key_path, cert.signing_key.serialize_pem()).expect("write key");
    // Tests reach the relay only over loopback: turning the exemption off makes this client
    // what any other network's client is.
    let relay = start_relay(&format!(
        "[smtp]\nauth = \"{}\"\nallow_plaintext_auth_on_loopback = false\n\
         tls_cert_file = \"{}\"\ntls_key_file = \"{}\"\n",
        users.display(),
        cert_path.display(),
        key_path.display()
    ))
    .await;
    let mut c = relay.connect().await;
    c.expect("220").await;
    let ehlo = c.cmd("EHLO c").await;
    assert!(!ehlo.contains("AUTH"), "AUTH offered before TLS: {ehlo}");
    c.cmd_expect("AUTH PLAIN AHNjYW5uZXIAcmlnaHQtcGFzc3dvcmQ=", "538 5.7.11")
        .await;
    c.cmd_expect("STARTTLS", "220 2.0.0").await;
    let mut roots = rustls::RootCertStore::empty();
    roots.add(cert.cert.der().clone()).expect("root");
    let config = rustls::ClientConfig::builder()
        .with_root_certificates(roots)
        .with_no_client_auth();
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    let name = rustls_pki_types::ServerName::try_from("localhost").expect("name");
    let tls = connector
        .connect(name, c.into_inner())
        .await
        .expect("handshake");
    let mut c = common::Client::new(tls);
    let ehlo = c.cmd("EHLO c").await;
    assert!(ehlo.contains("AUTH PLAIN LOGIN"), "{ehlo}");
    c.cmd_expect("AUTH PLAIN AHNjYW5uZXIAcmlnaHQtcGFzc3dvcmQ=", "235")
        .await;
    c.cmd_expect("MAIL FROM:<a@legacy.test>", "250").await;
}

#[tokio::test]
async fn plaintext_auth_from_loopback_is_allowed_by_default() {
    let dir = tempfile::tempdir().expect("tempdir");
    let users = users_file(dir.path());
    let relay = start_relay(&format!("[smtp]\nauth = \"{}\"\n", users.display())).await;
    let mut c = relay.connect().await;
    c.expect("220").await;
    let ehlo = c.cmd("EHLO c").await;
    assert!(ehlo.contains("AUTH PLAIN LOGIN"), "{ehlo}");
    c.cmd_expect("AUTH PLAIN AHNjYW5uZXIAcmlnaHQtcGFzc3dvcmQ=", "235")
        .await;
}
