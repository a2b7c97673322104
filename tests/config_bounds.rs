//! Numeric and duration keys with extreme values (issue 11, item 8), through the real binary.
//!
//! `smtp.max_connections = 4611686018427387904` used to pass validation and panic `serve`
//! (exit 101, which systemd restarts forever). Every numeric and duration key now has bounds:
//! zero, negative, the largest integers (beyond TOML's 64-bit range too), absurd durations and
//! rates are refused by `config`, `check` and `serve` with exit 2 and the key named, from the file
//! and from the environment, and nothing panics. (`queue.retry_min` / `retry_max` are left to
//! their own rules.)

mod common;

use std::path::Path;

use common::process::{free_port, run_cli};

const U64_MAX: &str = "18446744073709551615";
const I64_MAX: &str = "9223372036854775807";
/// The value of the issue: it fits a usize and broke a semaphore.
const HUGE: &str = "4611686018427387904";

/// `(section, key, values as TOML literals)`; every value must be refused.
const CASES: &[(&str, &str, &[&str])] = &[
    (
        "smtp",
        "max_message_size",
        &["0", "-1", HUGE, U64_MAX, "\"151MiB\"", "\"99999999999GiB\""],
    ),
    (
        "smtp",
        "max_recipients",
        &["0", "-1", "99", "1001", HUGE, U64_MAX],
    ),
    (
        "smtp",
        "max_connections",
        &["0", "-1", "10001", HUGE, I64_MAX, U64_MAX],
    ),
    (
        "smtp",
        "command_timeout",
        &[
            "\"0s\"",
            "\"-1s\"",
            "\"2h\"",
            "\"500000000y\"",
            "\"18446744073709551615s\"",
            "\"99999999999999999999y\"",
            "3",
        ],
    ),
    (
        "smtp",
        "data_timeout",
        &[
            "\"0s\"",
            "\"-1s\"",
            "\"2h\"",
            "\"500000000y\"",
            "\"18446744073709551615s\"",
        ],
    ),
    (
        "smtp",
        "max_errors",
        &["0", "-1", "1001", "4294967296", U64_MAX],
    ),
    (
        "queue",
        "max_age",
        &[
            "\"0s\"",
            "\"-5d\"",
            "\"31d\"",
            "\"500000000y\"",
            "\"18446744073709551615s\"",
        ],
    ),
    (
        "queue",
        "min_free_space",
        &["-1", U64_MAX, "\"9EiB\"", "\"99999999999GiB\""],
    ),
    ("upstream", "port", &["0", "-1", "65536", HUGE, U64_MAX]),
    ("upstream", "connections", &["0", "-1", "4", HUGE, U64_MAX]),
    (
        "upstream",
        "rate",
        &[
            "\"0/min\"",
            "\"-1/min\"",
            "\"4294967295/s\"",
            "\"4294967296/s\"",
            "\"3600001/h\"",
            "\"1/0s\"",
        ],
    ),
    (
        "oauth",
        "refresh_before",
        &[
            "\"0s\"",
            "\"-1m\"",
            "\"2h\"",
            "\"500000000y\"",
            "\"18446744073709551615s\"",
        ],
    ),
    (
        "service",
        "stop_timeout",
        &["\"0s\"", "\"-1s\"", "\"11m\"", "\"500000000y\"", "3"],
    ),
];

/// A valid relay.toml (free port, private spool) with `section.key = value` added.
fn config(dir: &Path, section: &str, line: &str) -> std::path::PathBuf {
    let mut sections = [
        (
            "smtp",
            format!(
                "listen = [\"127.0.0.1:{}\"]\nhostname = \"relay.test\"",
                free_port()
            ),
        ),
        (
            "queue",
            format!("dir = \"{}\"", dir.join("spool").display()),
        ),
        ("upstream", String::new()),
        ("oauth", String::new()),
        ("service", String::new()),
    ];
    for (name, body) in sections.iter_mut() {
        if *name == section {
            body.push('\n');
            body.push_str(line);
        }
    }
    let text: String = sections
        .iter()
        .map(|(name, body)| format!("[{name}]\n{body}\n"))
        .collect();
    let path = dir.join("relay.toml");
    std::fs::write(&path, text).expect("write relay.toml");
    path
}

fn assert_refused(what: &str, out: &std::process::Output, key: &str) {
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_ne!(out.status.code(), Some(101), "{what} panicked:\n{stderr}");
    assert_eq!(
        out.status.code(),
        Some(2),
        "{what}: exit {:?}\n{stderr}",
        out.status.code()
    );
    assert!(stderr.contains(key), "{what}: {key} not named:\n{stderr}");
    assert!(!stderr.contains("panicked"), "{what}:\n{stderr}");
}

#[test]
fn extreme_values_of_every_numeric_key_exit_2_naming_the_key() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut runs = 0;
    for (section, key, values) in CASES {
        let dotted = format!("{section}.{key}");
        for value in *values {
            let file = config(dir.path(), section, &format!("{key} = {value}"));
            for args in [&["config"][..], &["check"], &["serve"]] {
                let out = run_cli(&file, args, &[]);
                assert_refused(&format!("{args:?} with {dotted} = {value}"), &out, &dotted);
                runs += 1;
            }
            // The same value from the environment (where it is not limited to TOML's integers).
            let plain = config(dir.path(), "", "");
            let var = format!("RELAY_{}__{}", section.to_uppercase(), key.to_uppercase());
            let raw = value.trim_matches('"');
            for args in [&["config"][..], &["serve"]] {
                let out = run_cli(&plain, args, &[(&var, raw)]);
                assert_refused(&format!("{args:?} with {var}={raw}"), &out, &dotted);
                runs += 1;
            }
        }
    }
    assert!(runs > 200, "{runs} runs");
}

#[test]
fn the_limits_themselves_are_accepted() {
    let dir = tempfile::tempdir().expect("tempdir");
    for (section, line) in [
        (
            "smtp",
            "max_message_size = \"150MiB\"\nmax_recipients = 1000\nmax_connections = 10000",
        ),
        (
            "smtp",
            "max_message_size = \"64KiB\"\nmax_recipients = 100\nmax_connections = 1",
        ),
        (
            "smtp",
            "command_timeout = \"1h\"\ndata_timeout = \"1s\"\nmax_errors = 1000",
        ),
        ("queue", "max_age = \"30d\"\nmin_free_space = 0"),
        (
            "queue",
            "max_age = \"1s\"\nretry_min = \"1s\"\nmin_free_space = 9000000000000000000",
        ),
        (
            "upstream",
            "port = 65535\nconnections = 3\nrate = \"1000/s\"",
        ),
        ("upstream", "port = 1\nconnections = 1\nrate = \"1/h\""),
        ("oauth", "refresh_before = \"1h\""),
        ("oauth", "refresh_before = \"1m\""),
        ("service", "stop_timeout = \"1s\""),
        ("service", "stop_timeout = \"10m\""),
    ] {
        let file = config(dir.path(), section, line);
        let out = run_cli(&file, &["config"], &[]);
        assert_eq!(
            out.status.code(),
            Some(0),
            "[{section}] {line}:\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

#[test]
fn the_error_says_the_range_and_its_reason() {
    let dir = tempfile::tempdir().expect("tempdir");
    let file = config(dir.path(), "smtp", &format!("max_connections = {HUGE}"));
    let out = run_cli(&file, &["config"], &[]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("1..=10000"), "{stderr}");
    assert!(stderr.contains("descriptor"), "{stderr}");
    let file = config(dir.path(), "smtp", "max_recipients = 5000");
    let stderr = String::from_utf8_lossy(&run_cli(&file, &["config"], &[]).stderr).into_owned();
    assert!(
        stderr.contains("RFC 5321") && stderr.contains("100..=1000"),
        "{stderr}"
    );
}
