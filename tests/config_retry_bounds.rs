//! `queue.retry_min` and `queue.retry_max`: `retry_min <= retry_max`, both within sane limits.
//! `config` and `serve` refuse a value outside them with exit 2 and the key named; RFC 5321
//! §4.5.4.1's 30 minutes is accepted.

mod common;

use std::fs;

use common::process::{free_port, run_cli};

/// Runs `args` with a relay.toml whose `[queue]` section has `queue` lines: (exit code, stderr).
fn run(queue: &str, args: &[&str]) -> (Option<i32>, String) {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("relay.toml");
    fs::write(
        &config,
        format!(
            "[smtp]\nlisten = [\"127.0.0.1:{}\"]\n[queue]\ndir = \"{}/spool\"\n{queue}\n",
            free_port(),
            dir.path().display()
        ),
    )
    .unwrap();
    let out = run_cli(&config, args, &[]);
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn thirty_minutes_is_accepted() {
    let (code, err) = run("retry_min = \"30m\"\nretry_max = \"2h\"", &["config"]);
    assert_eq!(code, Some(0), "{err}");
    let (code, err) = run("retry_min = \"30m\"\nretry_max = \"30m\"", &["config"]);
    assert_eq!(code, Some(0), "{err}");
}

#[test]
fn bounds_outside_the_limits_are_refused_naming_the_key() {
    for (queue, key, why) in [
        // Faster than ten times a second hammers an upstream that is failing.
        ("retry_min = \"10ms\"", "queue.retry_min", "at least 100ms"),
        // More than a day between attempts of a message that may live 5 days.
        ("retry_max = \"30d\"", "queue.retry_max", "at most 24h"),
        (
            "retry_min = \"2d\"\nretry_max = \"3d\"",
            "queue.retry_min",
            "at most 24h",
        ),
        (
            "retry_min = \"2h\"\nretry_max = \"1h\"",
            "queue.retry_max",
            "queue.retry_min",
        ),
    ] {
        for command in ["config", "serve"] {
            let (code, err) = run(queue, &[command]);
            assert_eq!(code, Some(2), "{command} with {queue:?}: {err}");
            let line = err
                .lines()
                .find(|l| l.contains(key))
                .unwrap_or_else(|| panic!("{command} with {queue:?}: {key} not named:\n{err}"));
            assert!(line.contains(why), "{queue:?}: {line}");
        }
    }
}
