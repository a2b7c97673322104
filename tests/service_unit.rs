//! systemd/smtp-oauth-relay.service: `systemd-analyze verify` is clean and
//! `systemd-analyze security --offline=true` rates it below 2.0. The unit's ExecStart names
//! /usr/bin/smtp-oauth-relay, which verify requires to exist: the copy checked here points at
//! the freshly built binary instead (the only change). The drop-in that smtp-oauth-relay-sendmail
//! ships (deploy/sendmail/service-sendmail.conf) is verified together with the unit.

use std::path::Path;
use std::process::Command;

const UNIT: &str = include_str!("../systemd/smtp-oauth-relay.service");
const NAME: &str = "smtp-oauth-relay.service";
const SENDMAIL_DROP_IN: &str = include_str!("../deploy/sendmail/service-sendmail.conf");

fn analyze_present() -> bool {
    let found = Command::new("systemd-analyze")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    if !found {
        eprintln!("SKIP: systemd-analyze not installed (.ci/run installs systemd)");
    }
    found
}

fn unit_copy(dir: &Path) -> std::path::PathBuf {
    let bin = env!("CARGO_BIN_EXE_smtp-oauth-relay");
    assert_eq!(
        UNIT.matches("ExecStart=/usr/bin/smtp-oauth-relay ").count(),
        1
    );
    let text = UNIT.replace(
        "ExecStart=/usr/bin/smtp-oauth-relay ",
        &format!("ExecStart={bin} "),
    );
    let path = dir.join(NAME);
    std::fs::write(&path, text).unwrap();
    path
}

#[test]
fn verify_is_clean() {
    if !analyze_present() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let unit = unit_copy(dir.path());
    let out = Command::new("systemd-analyze")
        .arg("verify")
        .arg(&unit)
        .current_dir(dir.path())
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "verify failed:\n{stderr}");
    let ours: Vec<&str> = stderr
        .lines()
        .filter(|l| l.contains("smtp-oauth-relay"))
        .collect();
    assert!(ours.is_empty(), "verify complains:\n{stderr}");
}

#[test]
fn security_exposure_below_2() {
    if !analyze_present() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let unit = unit_copy(dir.path());
    let out = Command::new("systemd-analyze")
        .args(["security", "--offline=true", "--no-pager"])
        .arg(&unit)
        .current_dir(dir.path())
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let line = stdout
        .lines()
        .find(|l| l.contains("Overall exposure level"))
        .unwrap_or_else(|| {
            panic!(
                "no score:\n{stdout}\n{}",
                String::from_utf8_lossy(&out.stderr)
            )
        });
    let score: f64 = line
        .split(": ")
        .nth(1)
        .and_then(|s| s.split_whitespace().next())
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("cannot parse {line:?}"));
    eprintln!("systemd-analyze security: {score}");
    assert!(score < 2.0, "{line}");
}

#[test]
fn unit_has_the_contract() {
    for needle in [
        "Type=notify\n",
        "WatchdogSec=",
        "DynamicUser=yes\n",
        "StateDirectory=smtp-oauth-relay\n",
        "ConfigurationDirectory=smtp-oauth-relay\n",
        "LoadCredential=client_secret:/etc/smtp-oauth-relay/client_secret\n",
        "UMask=0077\n",
        "Restart=on-failure\n",
        "RestartPreventExitStatus=2\n",
        "CapabilityBoundingSet=\n",
        "SystemCallFilter=@system-service\n",
        "ExecReload=/bin/kill -HUP $MAINPID\n",
        "ExecStart=/usr/bin/smtp-oauth-relay serve --config /etc/smtp-oauth-relay/relay.toml\n",
    ] {
        assert!(UNIT.contains(needle), "unit lacks {needle:?}");
    }
}

/// `systemd-analyze verify` on the unit with the sendmail package's drop-in beside it, where
/// verify looks for drop-ins (the unit's directory is on its load path). Its stderr.
fn verify_with_drop_in(drop_in: &str) -> (bool, String) {
    let dir = tempfile::tempdir().unwrap();
    let unit = unit_copy(dir.path());
    let d = dir.path().join(format!("{NAME}.d"));
    std::fs::create_dir(&d).unwrap();
    std::fs::write(d.join("sendmail.conf"), drop_in).unwrap();
    let out = Command::new("systemd-analyze")
        .arg("verify")
        .arg(&unit)
        .current_dir(dir.path())
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn verify_is_clean_with_the_sendmail_drop_in() {
    if !analyze_present() {
        return;
    }
    // The drop-in is read: a key systemd does not know, added to it, is reported by name.
    let (_, stderr) = verify_with_drop_in(&format!("{SENDMAIL_DROP_IN}NoSuchKeyForTheTest=1\n"));
    assert!(
        stderr.contains("NoSuchKeyForTheTest") && stderr.contains("sendmail.conf"),
        "verify did not read the drop-in:\n{stderr}"
    );
    let (ok, stderr) = verify_with_drop_in(SENDMAIL_DROP_IN);
    assert!(ok, "verify failed:\n{stderr}");
    let ours: Vec<&str> = stderr
        .lines()
        .filter(|l| l.contains("smtp-oauth-relay") || l.contains("sendmail.conf"))
        .collect();
    assert!(ours.is_empty(), "verify complains:\n{stderr}");
    for needle in [
        "SupplementaryGroups=smtp-oauth-relay-drop\n",
        "ReadWritePaths=/var/spool/smtp-oauth-relay\n",
    ] {
        assert!(
            SENDMAIL_DROP_IN.contains(needle),
            "drop-in lacks {needle:?}"
        );
    }
}
