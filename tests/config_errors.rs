//! Invalid configurations, run through the real binary: `config` (and `serve` where it matters)
//! must exit 2 and name the offending key on stderr; several problems are reported at once; a
//! valid configuration prints with its secret redacted.

mod common;

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Output;

use common::process::{free_port, run_cli};

/// A temporary directory with `relay.toml` containing `body` (with `@DIR@` replaced by the
/// directory) and a spool directory inside it.
struct Case {
    dir: tempfile::TempDir,
    config: PathBuf,
}

fn case(body: &str) -> Case {
    let dir = tempfile::tempdir().expect("tempdir");
    let text = body.replace("@DIR@", &dir.path().display().to_string());
    let with_queue = if text.contains("[queue]") {
        text
    } else {
        format!(
            "{text}\n[queue]\ndir = \"{}/spool\"\n",
            dir.path().display()
        )
    };
    let config = dir.path().join("relay.toml");
    fs::write(&config, with_queue).expect("write relay.toml");
    Case { dir, config }
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// Runs `args` against the case's config and asserts exit code 2 with every key named on stderr.
fn assert_invalid(config: &Path, args: &[&str], env: &[(&str, &str)], keys: &[&str]) -> String {
    let out = run_cli(config, args, env);
    let err = stderr(&out);
    assert_eq!(
        out.status.code(),
        Some(2),
        "`{}` should exit 2 for this config; stderr:\n{err}\nstdout:\n{}",
        args.join(" "),
        String::from_utf8_lossy(&out.stdout)
    );
    for key in keys {
        assert!(
            err.contains(key),
            "`{}`: stderr does not name `{key}`:\n{err}",
            args.join(" ")
        );
    }
    assert!(
        out.stdout.is_empty(),
        "nothing on stdout for an invalid config"
    );
    err
}

const OAUTH_OK: &str = "[upstream]\nmail_account = \"relay@contoso.example\"\n";

#[test]
fn missing_required_oauth_client_id_is_named() {
    let c = case(&format!(
        "{OAUTH_OK}[oauth]\ntenant_id = \"contoso.onmicrosoft.com\"\nclient_secret = \"x\"\n"
    ));
    let err = assert_invalid(&c.config, &["config"], &[], &["oauth.client_id"]);
    assert!(!err.contains("oauth.tenant_id"), "{err}");
}

#[test]
fn bad_cidr_in_allow_networks_is_named() {
    let c = case("[smtp]\nallow_networks = [\"127.0.0.0/8\", \"10.0.0.300/8\"]\n");
    assert_invalid(&c.config, &["config"], &[], &["smtp.allow_networks"]);
    let c = case("[smtp]\nallow_networks = [\"10.0.0.0/33\"]\n");
    assert_invalid(&c.config, &["config"], &[], &["smtp.allow_networks"]);
}

#[test]
fn bad_size_is_named() {
    let c = case("[smtp]\nmax_message_size = \"lots\"\n");
    let err = assert_invalid(&c.config, &["config"], &[], &["smtp.max_message_size"]);
    assert!(err.contains("lots"), "the bad value is quoted: {err}");
}

#[test]
fn non_loopback_bind_without_allow_networks_is_refused_by_config_and_serve() {
    let port = free_port();
    let c = case(&format!("[smtp]\nlisten = [\"0.0.0.0:{port}\"]\n"));
    assert_invalid(&c.config, &["config"], &[], &["smtp.allow_networks"]);
    // `serve` refuses before binding anything or creating the spool.
    assert_invalid(&c.config, &["serve"], &[], &["smtp.allow_networks"]);
    assert!(
        !c.dir.path().join("spool").exists(),
        "serve created the spool for an invalid config"
    );
}

#[test]
fn unreadable_secret_file_is_named() {
    // A path that does not exist.
    let c = case(&format!(
        "{OAUTH_OK}[oauth]\ntenant_id = \"t.example\"\nclient_id = \"0f6a3d44-7c2b-4e1a-9d55-3b2f1c8e7a10\"\n\
         client_secret_file = \"@DIR@/no/such/secret\"\n"
    ));
    let err = assert_invalid(&c.config, &["config"], &[], &["oauth.client_secret_file"]);
    assert!(err.contains("no/such/secret"), "the path is shown: {err}");
    // A path that exists but cannot be read as a file (we run as root, so modes do not stop us).
    let c = case(&format!(
        "{OAUTH_OK}[oauth]\ntenant_id = \"t.example\"\nclient_id = \"0f6a3d44-7c2b-4e1a-9d55-3b2f1c8e7a10\"\n\
         client_secret_file = \"@DIR@\"\n"
    ));
    assert_invalid(&c.config, &["config"], &[], &["oauth.client_secret_file"]);
    assert_invalid(&c.config, &["serve"], &[], &["oauth.client_secret_file"]);
}

#[test]
fn unknown_key_is_named() {
    let c = case("[smtp]\nlisen = [\"127.0.0.1:2525\"]\n");
    assert_invalid(&c.config, &["config"], &[], &["smtp.lisen"]);
    let c = case("[smpt]\nlisten = [\"127.0.0.1:2525\"]\n");
    assert_invalid(&c.config, &["config"], &[], &["smpt"]);
}

#[test]
fn missing_explicit_config_file_exits_2() {
    let dir = tempfile::tempdir().expect("tempdir");
    let missing = dir.path().join("absent.toml");
    for args in [&["config"][..], &["serve"][..], &["queue", "list"][..]] {
        let out = run_cli(&missing, args, &[]);
        let err = stderr(&out);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {err}");
        assert!(
            err.contains("absent.toml"),
            "{args:?}: the path is named: {err}"
        );
    }
}

#[test]
fn environment_override_is_validated_and_named() {
    let c = case("[smtp]\nmax_recipients = 200\n");
    let out = run_cli(&c.config, &["config"], &[]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert_invalid(
        &c.config,
        &["config"],
        &[("RELAY_SMTP__MAX_RECIPIENTS", "5")],
        &["smtp.max_recipients"],
    );
    // A badly typed environment value is named too.
    assert_invalid(
        &c.config,
        &["config"],
        &[("RELAY_SMTP__MAX_RECIPIENTS", "many")],
        &["smtp.max_recipients"],
    );
}

#[test]
fn several_validation_problems_are_reported_at_once() {
    let c = case(&format!(
        "[smtp]\nlisten = [\"0.0.0.0:2525\"]\nmax_recipients = 5\n\
         {OAUTH_OK}[oauth]\ntenant_id = \"t.example\"\nclient_secret_file = \"@DIR@/missing\"\n"
    ));
    assert_invalid(
        &c.config,
        &["config"],
        &[],
        &[
            "smtp.allow_networks",
            "smtp.max_recipients",
            "oauth.client_id",
            "oauth.client_secret_file",
        ],
    );
}

#[test]
fn type_errors_and_validation_problems_are_reported_together() {
    // A bad size, a bad CIDR and an unknown key (type errors) next to a too-small
    // max_recipients and a missing client_id (validation): all five at once.
    let c = case(&format!(
        "[smtp]\nmax_message_size = \"lots\"\nallow_networks = [\"10.0.0.300/8\"]\n\
         max_recipients = 5\nlisen = 1\n\
         {OAUTH_OK}[oauth]\ntenant_id = \"t.example\"\nclient_secret = \"x\"\n"
    ));
    assert_invalid(
        &c.config,
        &["config"],
        &[],
        &[
            "smtp.max_message_size",
            "smtp.allow_networks",
            "smtp.lisen",
            "smtp.max_recipients",
            "oauth.client_id",
        ],
    );
}

#[test]
fn valid_config_prints_without_the_secret() {
    let secret = "S3cr3t~Val.ue-9f8e7d6c5b4a";
    let c = case(&format!(
        "{OAUTH_OK}[oauth]\ntenant_id = \"t.example\"\nclient_id = \"0f6a3d44-7c2b-4e1a-9d55-3b2f1c8e7a10\"\n\
         client_secret = \"{secret}\"\n"
    ));
    let out = run_cli(&c.config, &["config"], &[]);
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert!(!stdout.contains(secret), "secret printed:\n{stdout}");
    assert!(!stderr(&out).contains(secret), "secret on stderr");
    assert!(stdout.contains("<redacted>"), "{stdout}");
    assert!(
        stdout.contains("mail_account = \"relay@contoso.example\""),
        "{stdout}"
    );

    // Same secret from a file, and from the environment: never printed either.
    let secret_file = c.dir.path().join("secret");
    fs::write(&secret_file, format!("{secret}\n")).expect("write secret");
    let c2 = case(&format!(
        "{OAUTH_OK}[oauth]\ntenant_id = \"t.example\"\nclient_id = \"0f6a3d44-7c2b-4e1a-9d55-3b2f1c8e7a10\"\n\
         client_secret_file = \"{}\"\n",
        secret_file.display()
    ));
    let out = run_cli(&c2.config, &["config"], &[]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert!(!String::from_utf8_lossy(&out.stdout).contains(secret));
    let c3 = case(&format!(
        "{OAUTH_OK}[oauth]\ntenant_id = \"t.example\"\nclient_id = \"0f6a3d44-7c2b-4e1a-9d55-3b2f1c8e7a10\"\n"
    ));
    let out = run_cli(
        &c3.config,
        &["config"],
        &[("RELAY_OAUTH__CLIENT_SECRET", secret)],
    );
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert!(!String::from_utf8_lossy(&out.stdout).contains(secret));
    assert!(!stderr(&out).contains(secret));
}
