//! URL keys with user information (issue 11, item 3), through the real binary.
//!
//! `http://localhost:1@192.0.2.10/...` reads like loopback (allowed over plain http) but the HTTP
//! client connects to 192.0.2.10. Every URL key with `user[:password]@` is refused by `config`,
//! `check` and `serve` with exit 2 and the key named, the password never echoed; the host the
//! client would really connect to decides the https rule.

mod common;

use std::path::Path;

use common::process::{free_port, run_cli};

/// A relay.toml with `extra` lines in `[oauth]` (and a free port, a private spool).
fn config(dir: &Path, name: &str, oauth: &str) -> std::path::PathBuf {
    let path = dir.join(name);
    let text = format!(
        "[smtp]\nlisten = [\"127.0.0.1:{port}\"]\nhostname = \"relay.test\"\n\
         [queue]\ndir = \"{spool}\"\n[oauth]\n{oauth}\n",
        port = free_port(),
        spool = dir.join("spool").display(),
    );
    std::fs::write(&path, text).expect("write relay.toml");
    path
}

struct Run {
    code: Option<i32>,
    stderr: String,
    stdout: String,
}

fn run(config: &Path, args: &[&str], env: &[(&str, &str)]) -> Run {
    let out = run_cli(config, args, env);
    Run {
        code: out.status.code(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
    }
}

/// `(value, parts that must never be echoed, the host the client would connect to)`.
const REFUSED: &[(&str, &[&str], &str)] = &[
    (
        "http://localhost:1@192.0.2.10/t/oauth2/v2.0/token",
        &["localhost:1"],
        "192.0.2.10",
    ),
    (
        "http://[::1]@192.0.2.10/t/oauth2/v2.0/token",
        &["[::1]@"],
        "192.0.2.10",
    ),
    (
        "http://127.0.0.1:Pa55word-77@192.0.2.10/t",
        &["Pa55word-77"],
        "192.0.2.10",
    ),
    (
        "https://admin:Sup3rS3cret-42@login.microsoftonline.com/t/oauth2/v2.0/token",
        &["Sup3rS3cret-42", "admin:"],
        "login.microsoftonline.com",
    ),
    (
        "http://relay:Loop-Pa55-99@127.0.0.1:8080/t",
        &["Loop-Pa55-99"],
        "127.0.0.1",
    ),
];

#[test]
fn token_urls_with_userinfo_are_refused_by_config_check_and_serve() {
    let dir = tempfile::tempdir().expect("tempdir");
    for (i, (url, hidden, host)) in REFUSED.iter().enumerate() {
        let file = config(
            dir.path(),
            &format!("r{i}.toml"),
            &format!("token_url = \"{url}\""),
        );
        for args in [&["config"][..], &["check"], &["serve"]] {
            let r = run(&file, args, &[]);
            let all = format!("{}{}", r.stdout, r.stderr);
            assert_eq!(
                r.code,
                Some(2),
                "{args:?} with {url}: exit {:?}\n{all}",
                r.code
            );
            assert!(
                all.contains("oauth.token_url"),
                "{args:?} {url}: key not named\n{all}"
            );
            assert!(
                all.contains("user information") && all.contains(host),
                "{args:?} {url}: says neither why nor where it would connect\n{all}"
            );
            for part in *hidden {
                assert!(!all.contains(part), "{args:?} echoes {part:?}:\n{all}");
            }
        }
        // The same value from the environment.
        let plain = config(dir.path(), &format!("e{i}.toml"), "");
        let r = run(&plain, &["config"], &[("RELAY_OAUTH__TOKEN_URL", url)]);
        assert_eq!(r.code, Some(2), "env {url}: {}", r.stderr);
        assert!(r.stderr.contains("oauth.token_url"), "{}", r.stderr);
        for part in *hidden {
            assert!(
                !r.stderr.contains(part),
                "env: echoes {part:?}: {}",
                r.stderr
            );
        }
    }
}

#[test]
fn other_url_keys_refuse_userinfo_too() {
    let dir = tempfile::tempdir().expect("tempdir");
    let file = config(
        dir.path(),
        "scope.toml",
        "scope = \"https://svc:Sc0pe-Pa55@outlook.office365.com/.default\"",
    );
    let r = run(&file, &["config"], &[]);
    assert_eq!(r.code, Some(2), "{}", r.stderr);
    assert!(r.stderr.contains("oauth.scope"), "{}", r.stderr);
    assert!(!r.stderr.contains("Sc0pe-Pa55"), "{}", r.stderr);

    let file = dir.path().join("host.toml");
    std::fs::write(
        &file,
        format!(
            "[smtp]\nlisten = [\"127.0.0.1:{}\"]\n[queue]\ndir = \"{}\"\n\
             [upstream]\nhost = \"relay:H0st-Pa55@smtp.office365.com\"\n",
            free_port(),
            dir.path().join("spool").display()
        ),
    )
    .expect("write");
    let r = run(&file, &["config"], &[]);
    assert_eq!(r.code, Some(2), "{}", r.stderr);
    assert!(r.stderr.contains("upstream.host"), "{}", r.stderr);
    assert!(!r.stderr.contains("H0st-Pa55"), "{}", r.stderr);
}

#[test]
fn loopback_and_https_token_urls_still_work() {
    let dir = tempfile::tempdir().expect("tempdir");
    for url in [
        "http://127.0.0.1:8080/t/oauth2/v2.0/token",
        "http://[::1]:8080/t",
        "http://localhost/t",
        "https://login.microsoftonline.com/contoso.onmicrosoft.com/oauth2/v2.0/token",
    ] {
        let file = config(dir.path(), "ok.toml", &format!("token_url = \"{url}\""));
        let r = run(&file, &["config"], &[]);
        assert_eq!(r.code, Some(0), "{url}: {}", r.stderr);
        assert!(r.stdout.contains(url), "{url} not in the effective config");
    }
    // A host that is not loopback stays refused over plain http, the query never shown.
    let file = config(
        dir.path(),
        "http.toml",
        "token_url = \"http://login.example.com/t?client_secret=Qu3ry-Pa55\"",
    );
    let r = run(&file, &["config"], &[]);
    assert_eq!(r.code, Some(2), "{}", r.stderr);
    assert!(r.stderr.contains("https://"), "{}", r.stderr);
    assert!(!r.stderr.contains("Qu3ry-Pa55"), "{}", r.stderr);
}
