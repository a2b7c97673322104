//! Environment variables that are not the relay's (issue 11, item 9), through the real binary.
//!
//! Kubernetes injects `RELAY_PORT`, `RELAY_SERVICE_HOST`, `RELAY_SERVICE_PORT_SMTP`, ... into
//! every pod of a namespace with a Service named `relay`. Only `RELAY_<SECTION>__<KEY>` and
//! `RELAY_CONFIG` are the relay's: `config`, `check` and `serve` ignore the others (`serve` names
//! them at debug level, never their values), while a misspelt key with the double underscore is
//! still refused with exit 2 and the variable named.

mod common;

use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use common::process::{bin, free_port, run_cli, scrub_env};

/// What the kubelet sets for `kind: Service, name: relay` with a port named `smtp` (2525).
const KUBERNETES: &[(&str, &str)] = &[
    ("RELAY_PORT", "tcp://10.0.0.1:2525"),
    ("RELAY_PORT_2525_TCP", "tcp://10.0.0.1:2525"),
    ("RELAY_PORT_2525_TCP_PROTO", "tcp"),
    ("RELAY_PORT_2525_TCP_PORT", "2525"),
    ("RELAY_PORT_2525_TCP_ADDR", "10.0.0.1"),
    ("RELAY_SERVICE_HOST", "10.0.0.1"),
    ("RELAY_SERVICE_PORT", "2525"),
    ("RELAY_SERVICE_PORT_SMTP", "2525"),
];

fn config(dir: &Path, port: u16) -> PathBuf {
    let path = dir.join("relay.toml");
    std::fs::write(
        &path,
        format!(
            "[smtp]\nlisten = [\"127.0.0.1:{port}\"]\nhostname = \"relay.test\"\n\
             [queue]\ndir = \"{}\"\nmin_free_space = 1\n[log]\nlevel = \"debug\"\n",
            dir.join("spool").display()
        ),
    )
    .expect("write relay.toml");
    path
}

#[test]
fn kubernetes_service_variables_do_not_stop_config_or_check() {
    let dir = tempfile::tempdir().expect("tempdir");
    let file = config(dir.path(), free_port());
    let clean = run_cli(&file, &["config"], &[]);
    assert_eq!(clean.status.code(), Some(0));
    let with = run_cli(&file, &["config"], KUBERNETES);
    assert_eq!(
        with.status.code(),
        Some(0),
        "config refused the Kubernetes variables:\n{}",
        String::from_utf8_lossy(&with.stderr)
    );
    assert_eq!(
        with.stdout, clean.stdout,
        "the effective configuration changed"
    );
    // `check` gets past step 1 (it then fails for want of [oauth], with exit 1, not 2).
    let check = run_cli(&file, &["check"], KUBERNETES);
    assert_eq!(
        check.status.code(),
        Some(1),
        "{}",
        String::from_utf8_lossy(&check.stdout)
    );
    // The relay's own variables still apply next to them.
    let mut env = KUBERNETES.to_vec();
    env.push(("RELAY_SMTP__MAX_RECIPIENTS", "200"));
    let with = run_cli(&file, &["config"], &env);
    assert_eq!(with.status.code(), Some(0));
    assert!(String::from_utf8_lossy(&with.stdout).contains("max_recipients = 200"));
}

#[test]
fn serve_starts_with_kubernetes_service_variables_and_names_them_at_debug() {
    let dir = tempfile::tempdir().expect("tempdir");
    let port = free_port();
    let file = config(dir.path(), port);
    let log = dir.path().join("serve.log");
    let mut cmd = Command::new(bin());
    cmd.arg("--config").arg(&file).arg("serve");
    scrub_env(&mut cmd);
    cmd.envs(KUBERNETES.iter().copied());
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).expect("log"))
        .spawn()
        .expect("spawn serve");
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    let mut up = false;
    for _ in 0..400 {
        if TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok() {
            up = true;
            break;
        }
        if child.try_wait().expect("try_wait").is_some() {
            break;
        }
        std::thread::sleep(Duration::from_millis(25));
    }
    let exited = child.try_wait().expect("try_wait");
    let _ = child.kill();
    let _ = child.wait();
    let text = std::fs::read_to_string(&log).unwrap_or_default();
    assert!(
        up && exited.is_none(),
        "serve did not run ({exited:?}):\n{text}"
    );
    for (name, value) in KUBERNETES {
        assert!(
            text.contains(name),
            "{name} not named at debug level:\n{text}"
        );
        assert!(
            !text.contains(&format!("{name}={value}")),
            "the value of {name} is logged"
        );
    }
    assert!(
        !text.contains("tcp://10.0.0.1"),
        "a value is logged:\n{text}"
    );
}

#[test]
fn a_misspelt_key_variable_is_still_refused_with_its_name() {
    let dir = tempfile::tempdir().expect("tempdir");
    let file = config(dir.path(), free_port());
    for (name, key) in [
        ("RELAY_OAUTH__CLIENT_IDD", "oauth.client_idd"),
        ("RELAY_SMTPP__LISTEN", "smtpp"),
    ] {
        let mut env = KUBERNETES.to_vec();
        env.push((name, "0f6a3d44-7c2b-4e1a-9d55-3b2f1c8e7a10"));
        for args in [&["config"][..], &["check"], &["serve"]] {
            let out = run_cli(&file, args, &env);
            let err = String::from_utf8_lossy(&out.stderr);
            assert_eq!(out.status.code(), Some(2), "{args:?} {name}: {err}");
            assert!(err.contains(name) && err.contains(key), "{args:?}: {err}");
            assert!(
                !err.contains("RELAY_SERVICE_HOST") && !err.contains("RELAY_PORT"),
                "{args:?}: a foreign variable is reported: {err}"
            );
        }
    }
}
