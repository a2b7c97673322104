//! `[queue] backend`, `url`, `url_file`, `ca_file` and `lease` through the real binary:
//! validation with exit 2 naming the key, and the database password never printed (`config`
//! output, errors of `queue` commands).

mod common;

use std::path::{Path, PathBuf};

use common::process::{free_port, run_cli};

const PASSWORD: &str = "Db-Pa55word-93";

fn config(dir: &Path, name: &str, queue: &str) -> PathBuf {
    let path = dir.join(name);
    let text = format!(
        "[smtp]\nlisten = [\"127.0.0.1:{port}\"]\nhostname = \"relay.test\"\n\
         [queue]\ndir = \"{spool}\"\n{queue}\n",
        port = free_port(),
        spool = dir.join("spool").display(),
    );
    std::fs::write(&path, text).expect("write relay.toml");
    path
}

fn run(config: &Path, args: &[&str]) -> (Option<i32>, String, String) {
    let out = run_cli(config, args, &[]);
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn config_shows_the_database_url_without_its_password() {
    let dir = tempfile::tempdir().expect("tempdir");
    let url = format!("postgres://relay:{PASSWORD}@db.internal:5433/relay?sslmode=require");
    let path = config(
        dir.path(),
        "inline.toml",
        &format!("backend = \"postgres\"\nurl = \"{url}\"\nlease = \"90s\""),
    );
    let (code, stdout, stderr) = run(&path, &["config"]);
    assert_eq!(code, Some(0), "{stdout}{stderr}");
    assert!(
        !stdout.contains(PASSWORD) && !stderr.contains(PASSWORD),
        "{stdout}"
    );
    assert!(stdout.contains("backend = \"postgres\""), "{stdout}");
    assert!(
        stdout.contains("postgres://relay:redacted@db.internal:5433/relay?sslmode=require"),
        "{stdout}"
    );
    assert!(stdout.contains("lease = \"1m 30s\""), "{stdout}");

    // The same from a file, with the password as a parameter too.
    let file = dir.path().join("database_url");
    std::fs::write(
        &file,
        format!("postgres://relay@db.internal/relay?password={PASSWORD}\n"),
    )
    .expect("write url file");
    let path = config(
        dir.path(),
        "file.toml",
        &format!("backend = \"postgres\"\nurl_file = \"{}\"", file.display()),
    );
    let (code, stdout, stderr) = run(&path, &["config"]);
    assert_eq!(code, Some(0), "{stdout}{stderr}");
    assert!(!stdout.contains(PASSWORD), "{stdout}");
    assert!(stdout.contains("password=redacted"), "{stdout}");
}

#[test]
fn bad_backend_settings_exit_2_naming_the_key() {
    let dir = tempfile::tempdir().expect("tempdir");
    let url_file = dir.path().join("database_url");
    std::fs::write(&url_file, "postgres://relay@127.0.0.1/relay\n").expect("write");
    let cases: Vec<(String, &str)> = vec![
        ("backend = \"postgres\"".into(), "queue.url"),
        ("backend = \"mysql\"".into(), "queue.backend"),
        (
            format!("url = \"postgres://relay:{PASSWORD}@127.0.0.1/relay\""),
            "queue.url",
        ),
        (
            format!(
                "backend = \"postgres\"\nurl = \"postgres://relay:{PASSWORD}@db.internal/relay?sslmode=disable\""
            ),
            "queue.url",
        ),
        (
            format!(
                "backend = \"postgres\"\nurl = \"postgres://relay:{PASSWORD}@10.1.2.3/relay?sslmode=prefer\""
            ),
            "queue.url",
        ),
        (
            format!(
                "backend = \"postgres\"\nurl = \"postgres://relay:{PASSWORD}@db.internal/relay?sslmode=verify-full\""
            ),
            "queue.url",
        ),
        (
            format!("backend = \"postgres\"\nurl = \"mysql://relay:{PASSWORD}@db.internal/relay\""),
            "queue.url",
        ),
        (
            format!(
                "backend = \"postgres\"\nurl = \"postgres://127.0.0.1/relay\"\nurl_file = \"{}\"",
                url_file.display()
            ),
            "queue.url_file",
        ),
        (
            "backend = \"postgres\"\nurl_file = \"/nonexistent/database_url\"".into(),
            "queue.url_file",
        ),
        (
            "backend = \"postgres\"\nurl = \"postgres://127.0.0.1/relay\"\nlease = \"1s\"".into(),
            "queue.lease",
        ),
        (
            "backend = \"postgres\"\nurl = \"postgres://127.0.0.1/relay\"\nca_file = \"/nonexistent/ca.pem\"".into(),
            "queue.ca_file",
        ),
    ];
    for (i, (queue, key)) in cases.iter().enumerate() {
        let path = config(dir.path(), &format!("bad{i}.toml"), queue);
        for args in [&["config"][..], &["queue", "list"][..]] {
            let (code, stdout, stderr) = run(&path, args);
            assert_eq!(code, Some(2), "{queue} {args:?}: {stdout}{stderr}");
            assert!(stderr.contains(key), "{queue}: {key} not named: {stderr}");
            assert!(
                !stderr.contains(PASSWORD) && !stdout.contains(PASSWORD),
                "{queue}: password echoed: {stderr}"
            );
        }
    }
    // Loopback may go without TLS (the test cluster does).
    let path = config(
        dir.path(),
        "loopback.toml",
        "backend = \"postgres\"\nurl = \"postgres://relay@127.0.0.1:5432/relay?sslmode=disable\"",
    );
    let (code, stdout, stderr) = run(&path, &["config"]);
    assert_eq!(code, Some(0), "{stdout}{stderr}");
}

#[test]
fn an_unreachable_database_fails_queue_commands_without_the_password() {
    let dir = tempfile::tempdir().expect("tempdir");
    let url = format!(
        "postgres://relay:{PASSWORD}@127.0.0.1:{}/relay?sslmode=disable",
        free_port()
    );
    let path = config(
        dir.path(),
        "down.toml",
        &format!("backend = \"postgres\"\nurl = \"{url}\""),
    );
    let (code, stdout, stderr) = run(&path, &["queue", "list"]);
    assert_ne!(code, Some(0), "{stdout}{stderr}");
    assert!(stderr.contains("PostgreSQL"), "{stderr}");
    assert!(
        !stderr.contains(PASSWORD) && !stdout.contains(PASSWORD),
        "{stderr}"
    );
}
