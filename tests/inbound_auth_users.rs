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
