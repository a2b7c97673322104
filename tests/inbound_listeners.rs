//! `[[smtp.listener]]` for devices, through the real binary: SMTPS (`tls = "implicit"`) with
//! real clients (`swaks --tlsc`, `curl smtps://`, python `smtplib.SMTP_SSL`) whose messages
//! reach the simulator; AUTH PLAIN over SMTPS with a users file; `tls = "none"` offers no
//! STARTTLS; per-listener limits next to `[smtp]`'s; the brute-force limit (5 failures, then
//! 421 and the connection closed, shared by all listeners); invalid listener tables refused
//! by `config` and `serve` (exit 2, key named).
//!
//! The tools are required: when one is missing the test fails and says so (./run-tests
//! installs them).

mod common;

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

use common::Client;
use common::fixtures::{crlf, self_signed_tls};
use common::process::{
    Relay, free_port, hash_password_cli, output_bounded, relay_toml, require_tool, run_cli,
    with_upstream,
};
use common::sendmail::wait_delivered;
use common::sim_process::SimProc;
use tokio::io::AsyncReadExt;

/// A site: certificate and key, a users file with `scanner` / `right-password`.
struct Site {
    dir: tempfile::TempDir,
    cert: PathBuf,
    key: PathBuf,
    users: PathBuf,
}

fn site() -> Site {
    let dir = tempfile::tempdir().expect("tempdir");
    let (cert, key) = self_signed_tls(dir.path());
    let users = dir.path().join("users");
    let hash = hash_password_cli("right-password");
    fs::write(&users, format!("scanner:{hash}\n")).expect("write users");
    Site {
        dir,
        cert,
        key,
        users,
    }
}

impl Site {
    /// `text` with `@CERT@`, `@KEY@`, `@USERS@` replaced by this site's files.
    fn fill(&self, text: &str) -> String {
        text.replace("@CERT@", &self.cert.display().to_string())
            .replace("@KEY@", &self.key.display().to_string())
            .replace("@USERS@", &self.users.display().to_string())
    }

    /// `serve` with `smtp` lines in `[smtp]`, then `tables` (the `[[smtp.listener]]` tables,
    /// `@PORT0@`, `@PORT1@`, ... standing for ports chosen at each start attempt) and, when
    /// given, the simulator as upstream. Returns the relay and the ports of its tables.
    fn relay(&self, smtp: &str, tables: &str, sim: Option<&SimProc>) -> (Relay, Vec<u16>) {
        let smtp = self.fill(smtp);
        let tables = self.fill(tables);
        let upstream = sim
            .map(|s| with_upstream(&s.fragment, "rate = \"1000/s\"\nconnections = 3"))
            .unwrap_or_default();
        let count = (0..)
            .take_while(|n| tables.contains(&format!("@PORT{n}@")))
            .count();
        let chosen = std::sync::Mutex::new(Vec::new());
        let relay = Relay::builder()
            .work(self.dir.path())
            .config(|s| {
                // Fresh ports at every attempt, like the builder's own: one taken in the
                // meantime only costs a retry.
                let ports: Vec<u16> = (0..count).map(|_| free_port()).collect();
                let mut tables = tables.clone();
                for (n, port) in ports.iter().enumerate() {
                    tables = tables.replace(&format!("@PORT{n}@"), &port.to_string());
                }
                *chosen.lock().expect("ports") = ports;
                relay_toml(
                    s.smtp,
                    &s.spool,
                    &smtp,
                    "min_free_space = 1\nretry_min = \"1s\"\nretry_max = \"2s\"",
                    &format!("{tables}\n{upstream}\n[log]\nlevel = \"info\"\n"),
                )
            })
            .start();
        let ports = chosen.lock().expect("ports").clone();
        // The builder waited for smtp.listen; the tables are bound right after it.
        for port in &ports {
            let accepts = (0..250).any(|_| {
                let ok = std::net::TcpStream::connect(loopback(*port)).is_ok();
                if !ok {
                    std::thread::sleep(Duration::from_millis(20));
                }
                ok
            });
            assert!(
                accepts,
                "listener 127.0.0.1:{port} does not accept; relay log:\n{}",
                relay.log_text()
            );
        }
        (relay, ports)
    }
}

fn loopback(port: u16) -> std::net::SocketAddr {
    std::net::SocketAddr::from(([127, 0, 0, 1], port))
}

fn text(out: &Output) -> String {
    format!(
        "status {}\nstdout:\n{}\nstderr:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

fn swaks_smtps(port: u16, extra: &[&str], body: &str) -> Output {
    let mut cmd = Command::new("swaks");
    cmd.args(["--server", "127.0.0.1", "--port"])
        .arg(port.to_string())
        .args(["--tlsc", "--helo", "printer.test"])
        .args(["--from", "scanner@legacy.local", "--to", "user@example.org"])
        .args(["--header", "Subject: scan"])
        .args(["--body", body])
        .args(extra);
    output_bounded(cmd, Duration::from_secs(60))
}

const SMTP_SSL_SCRIPT: &str = r#"
import smtplib, ssl, sys
port, marker = int(sys.argv[1]), sys.argv[2]
context = ssl._create_unverified_context()
s = smtplib.SMTP_SSL("127.0.0.1", port, local_hostname="py.client.test", context=context, timeout=60)
msg = ("From: app@legacy.local\r\nTo: user@example.org\r\nSubject: python\r\n\r\n" + marker + "\r\n").encode()
refused = s.sendmail("app@legacy.local", ["user@example.org"], msg)
print("SENDMAIL", repr(refused), flush=True)
s.quit()
"#;

#[test]
fn smtps_real_clients_are_stored_and_delivered() {
    require_tool("swaks", &["--version"]);
    require_tool("curl", &["--version"]);
    require_tool("python3", &["-c", "pass"]);
    let site = site();
    let sim = SimProc::start(site.dir.path(), "");
    let (relay, ports) = site.relay(
        "",
        "[[smtp.listener]]\naddress = \"127.0.0.1:@PORT0@\"\ntls = \"implicit\"\n\
         tls_cert_file = \"@CERT@\"\ntls_key_file = \"@KEY@\"\n",
        Some(&sim),
    );
    let port = ports[0];

    let out = swaks_smtps(port, &[], "swaks-over-smtps-1");
    assert!(out.status.success(), "swaks: {}", text(&out));
    let transcript = String::from_utf8_lossy(&out.stdout);
    assert!(transcript.contains("250 2.0.0 queued as"), "{transcript}");
    assert!(
        !transcript.contains("STARTTLS"),
        "STARTTLS offered inside SMTPS: {transcript}"
    );

    let message = site.dir.path().join("curl.eml");
    fs::write(
        &message,
        crlf(&[
            "From: app@legacy.local",
            "To: user@example.org",
            "Subject: curl",
            "",
            "curl-over-smtps-2",
        ]),
    )
    .expect("write message");
    let mut cmd = Command::new("curl");
    cmd.args(["--silent", "--show-error", "--insecure", "--max-time", "60"])
        .arg(format!("smtps://127.0.0.1:{port}"))
        .args(["--mail-from", "app@legacy.local"])
        .args(["--mail-rcpt", "user@example.org"])
        .arg("--upload-file")
        .arg(&message);
    let out = output_bounded(cmd, Duration::from_secs(90));
    assert!(out.status.success(), "curl: {}", text(&out));

    let mut cmd = Command::new("python3");
    cmd.args(["-c", SMTP_SSL_SCRIPT])
        .arg(port.to_string())
        .arg("python-over-smtps-3");
    let out = output_bounded(cmd, Duration::from_secs(90));
    assert!(out.status.success(), "python: {}", text(&out));
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("SENDMAIL {}"),
        "{}",
        text(&out)
    );

    for marker in [
        "swaks-over-smtps-1",
        "curl-over-smtps-2",
        "python-over-smtps-3",
    ] {
        let d = wait_delivered(&sim, marker);
        assert_eq!(d.rcpt_to, ["user@example.org"], "{marker}");
    }
    drop(relay);
}

#[tokio::test]
async fn auth_plain_over_smtps_with_a_users_file() {
    require_tool("swaks", &["--version"]);
    let site = site();
    let sim = SimProc::start(site.dir.path(), "");
    // The exemption is off: AUTH is allowed on this listener only because TLS is on.
    let (relay, ports) = site.relay(
        "",
        "[[smtp.listener]]\naddress = \"127.0.0.1:@PORT0@\"\ntls = \"implicit\"\n\
         tls_cert_file = \"@CERT@\"\ntls_key_file = \"@KEY@\"\nauth = \"@USERS@\"\n\
         allow_plaintext_auth_on_loopback = false\n",
        Some(&sim),
    );
    let port = ports[0];
    let out = swaks_smtps(
        port,
        &[
            "--auth",
            "PLAIN",
            "--auth-user",
            "scanner",
            "--auth-password",
            "right-password",
        ],
        "authenticated-over-smtps",
    );
    assert!(out.status.success(), "swaks: {}", text(&out));
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("235 2.7.0"),
        "{}",
        text(&out)
    );
    wait_delivered(&sim, "authenticated-over-smtps");

    let mut c = Client::connect_smtps(loopback(port), &site.cert, "localhost").await;
    c.expect("220 ").await;
    let ehlo = c.cmd("EHLO printer.test").await;
    assert!(ehlo.contains("AUTH PLAIN LOGIN"), "{ehlo:?}");
    assert!(!ehlo.contains("STARTTLS"), "{ehlo:?}");
    c.cmd_expect("STARTTLS", "503 5.5.1").await;
    c.cmd_expect("MAIL FROM:<scanner@legacy.local>", "530 5.7.0")
        .await;
    // base64("\0scanner\0right-password")
    c.cmd_expect("AUTH PLAIN AHNjYW5uZXIAcmlnaHQtcGFzc3dvcmQ=", "235")
        .await;
    c.cmd_expect("MAIL FROM:<scanner@legacy.local>", "250")
        .await;
    // The [smtp] listener keeps its own auth ("off").
    let mut c = Client::connect(relay.addr()).await;
    c.expect("220 ").await;
    let ehlo = c.cmd("EHLO c").await;
    assert!(!ehlo.contains("AUTH"), "{ehlo:?}");
    c.cmd_expect("MAIL FROM:<a@legacy.local>", "250").await;
}

#[tokio::test]
async fn starttls_is_offered_only_where_the_listener_says() {
    let site = site();
    let (relay, ports) = site.relay(
        "tls_cert_file = \"@CERT@\"\ntls_key_file = \"@KEY@\"\n",
        "[[smtp.listener]]\naddress = \"127.0.0.1:@PORT0@\"\ntls = \"none\"\n\
         [[smtp.listener]]\naddress = \"127.0.0.1:@PORT1@\"\n",
        None,
    );
    let (none, inherited) = (ports[0], ports[1]);
    let mut c = Client::connect(loopback(none)).await;
    c.expect("220 ").await;
    let ehlo = c.cmd("EHLO c").await;
    assert!(
        !ehlo.contains("STARTTLS"),
        "tls = none offers STARTTLS: {ehlo:?}"
    );
    c.cmd_expect("STARTTLS", "502 5.5.1").await;
    c.cmd_expect("MAIL FROM:<a@legacy.local>", "250").await;
    // No tls key and a certificate in [smtp]: STARTTLS, as on smtp.listen.
    for addr in [loopback(inherited), relay.addr()] {
        let mut c = Client::connect(addr).await;
        c.expect("220 ").await;
        let ehlo = c.cmd("EHLO c").await;
        assert!(ehlo.contains("STARTTLS"), "{addr}: {ehlo:?}");
        let mut c = c.starttls(&site.cert, "localhost").await;
        c.cmd_expect("EHLO c", "250").await;
    }
}

#[tokio::test]
async fn an_smtps_listener_says_nothing_before_the_handshake_and_bounds_it() {
    let site = site();
    let (_relay, ports) = site.relay(
        "tls_cert_file = \"@CERT@\"\ntls_key_file = \"@KEY@\"\n",
        "[[smtp.listener]]\naddress = \"127.0.0.1:@PORT0@\"\ntls = \"implicit\"\n\
         command_timeout = \"1s\"\n",
        None,
    );
    let port = ports[0];
    // A client that connects and sends nothing gets no plaintext greeting, and is closed once
    // the handshake's bound (this listener's command_timeout) has passed.
    let mut tcp = tokio::net::TcpStream::connect(loopback(port))
        .await
        .expect("connect");
    let mut buf = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(30), tcp.read_to_end(&mut buf)).await;
    assert!(read.is_ok(), "the handshake is not bounded");
    assert!(
        !String::from_utf8_lossy(&buf).contains("220"),
        "plaintext greeting on an SMTPS port: {buf:?}"
    );
    // The certificate inherited from [smtp] serves SMTPS.
    let mut c = Client::connect_smtps(loopback(port), &site.cert, "localhost").await;
    c.expect("220 ").await;
}

/// MAIL, RCPT, DATA and `body` (lines ending in CRLF); the reply to the final dot.
async fn send(c: &mut Client, body: &str) -> common::Reply {
    c.cmd_expect("MAIL FROM:<a@legacy.local>", "250").await;
    c.cmd_expect("RCPT TO:<b@example.org>", "250").await;
    c.cmd_expect("DATA", "354").await;
    c.send(&common::fixtures::data_block(body)).await;
    c.reply().await
}

#[tokio::test]
async fn per_listener_limits_leave_the_smtp_values_alone() {
    let site = site();
    let (relay, ports) = site.relay(
        "",
        "[[smtp.listener]]\naddress = \"127.0.0.1:@PORT0@\"\nmax_message_size = \"64KiB\"\n\
         [[smtp.listener]]\naddress = \"127.0.0.1:@PORT1@\"\nmax_connections = 1\n",
        None,
    );
    let (small, single) = (ports[0], ports[1]);
    // 100 KiB in lines of 72 octets.
    let big = format!("{}\r\n", "x".repeat(70)).repeat(1500);
    let ehlo_size = |ehlo: &str| {
        ehlo.lines()
            .find_map(|l| l.get(4..).and_then(|r| r.strip_prefix("SIZE ")))
            .map(str::to_string)
    };
    let mut c = Client::connect(loopback(small)).await;
    c.expect("220 ").await;
    let ehlo = c.cmd("EHLO c").await.text();
    assert_eq!(ehlo_size(&ehlo).as_deref(), Some("65536"), "{ehlo}");
    c.cmd_expect("MAIL FROM:<a@legacy.local> SIZE=100000", "552 5.3.4")
        .await;
    send(&mut c, &big).await.assert(552, "5.3.4");

    let mut c = Client::connect(relay.addr()).await;
    c.expect("220 ").await;
    let ehlo = c.cmd("EHLO c").await.text();
    assert_eq!(ehlo_size(&ehlo).as_deref(), Some("36700160"), "{ehlo}");
    c.cmd_expect("MAIL FROM:<a@legacy.local> SIZE=100000", "250")
        .await;
    c.cmd_expect("RSET", "250").await;
    send(&mut c, &big).await.assert(250, "2.0.0");

    // max_connections = 1 on one listener: its second client is refused, [smtp]'s are not.
    let mut first = Client::connect(loopback(single)).await;
    first.expect("220 ").await;
    let mut second = Client::connect(loopback(single)).await;
    second.expect("421 4.3.2").await;
    let mut other = Client::connect(relay.addr()).await;
    other.expect("220 ").await;
    first.cmd_expect("QUIT", "221").await;
}

#[tokio::test]
async fn five_failures_over_smtps_end_the_connection_and_lock_every_listener() {
    let site = site();
    let (relay, ports) = site.relay(
        "auth = \"@USERS@\"\n",
        "[[smtp.listener]]\naddress = \"127.0.0.1:@PORT0@\"\ntls = \"implicit\"\n\
         tls_cert_file = \"@CERT@\"\ntls_key_file = \"@KEY@\"\n",
        None,
    );
    let port = ports[0];
    let mut c = Client::connect_smtps(loopback(port), &site.cert, "localhost").await;
    c.expect("220 ").await;
    c.cmd_expect("EHLO c", "250").await;
    // base64("\0scanner\0wrong")
    for _ in 0..5 {
        c.cmd_expect("AUTH PLAIN AHNjYW5uZXIAd3Jvbmc=", "535 5.7.8")
            .await;
    }
    c.expect("421 4.7.0").await;
    c.expect_closed().await;
    // One table for all listeners: the [smtp] listener refuses this address too.
    let mut c = Client::connect(relay.addr()).await;
    c.expect("220 ").await;
    c.cmd_expect("EHLO c", "250").await;
    c.cmd_expect("AUTH PLAIN AHNjYW5uZXIAcmlnaHQtcGFzc3dvcmQ=", "421 4.7.0")
        .await;
    c.expect_closed().await;
}

// ---------------------------------------------------------------------------------------------
// Invalid listener tables, through the real binary

/// `config` (or `args`) on `body` (a relay.toml with `@CERT@`, `@KEY@`, `@USERS@` filled in
/// and a spool added): exit 2, every key named on stderr, nothing on stdout.
fn assert_invalid(site: &Site, body: &str, args: &[&str], keys: &[&str]) -> String {
    let config = write_config(site, body);
    let out = run_cli(&config, args, &[]);
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(out.status.code(), Some(2), "{args:?}: {}", text(&out));
    for key in keys {
        assert!(
            err.contains(key),
            "{args:?}: stderr does not name `{key}`:\n{err}"
        );
    }
    assert!(out.stdout.is_empty(), "{}", text(&out));
    err
}

fn write_config(site: &Site, body: &str) -> PathBuf {
    let config = site.dir.path().join("relay.toml");
    let spool = site.dir.path().join("spool");
    fs::write(
        &config,
        format!(
            "{}\n[queue]\ndir = \"{}\"\n",
            site.fill(body),
            spool.display()
        ),
    )
    .expect("write relay.toml");
    config
}

fn path_text(p: &Path) -> String {
    p.display().to_string()
}

#[test]
fn invalid_listener_tables_are_named() {
    let site = site();
    let port = free_port();
    let smtp = format!("[smtp]\nlisten = [\"127.0.0.1:{port}\"]\n");
    // TLS without a certificate (here or in [smtp]).
    for tls in ["implicit", "starttls"] {
        let err = assert_invalid(
            &site,
            &format!(
                "{smtp}[[smtp.listener]]\naddress = \"127.0.0.1:{}\"\ntls = \"{tls}\"\n",
                free_port()
            ),
            &["config"],
            &["smtp.listener.0.tls"],
        );
        assert!(err.contains("certificate"), "{err}");
    }
    // The same address twice: against smtp.listen, and between two tables.
    assert_invalid(
        &site,
        &format!("{smtp}[[smtp.listener]]\naddress = \"127.0.0.1:{port}\"\n"),
        &["config"],
        &["smtp.listener.0.address"],
    );
    let other = free_port();
    assert_invalid(
        &site,
        &format!(
            "{smtp}[[smtp.listener]]\naddress = \"127.0.0.1:{other}\"\n\
             [[smtp.listener]]\naddress = \"127.0.0.1:{other}\"\n"
        ),
        &["config"],
        &["smtp.listener.1.address"],
    );
    // Every problem at once, each in its own table: an unknown key, a bad value, a limit out
    // of range, a non-loopback address without allow_networks.
    assert_invalid(
        &site,
        &format!(
            "{smtp}[[smtp.listener]]\naddress = \"127.0.0.1:{}\"\ntsl = \"implicit\"\n\
             [[smtp.listener]]\naddress = \"127.0.0.1:{}\"\ntls = \"ssl\"\n\
             [[smtp.listener]]\naddress = \"127.0.0.1:{}\"\nmax_recipients = 5\n\
             [[smtp.listener]]\naddress = \"0.0.0.0:{}\"\n",
            free_port(),
            free_port(),
            free_port(),
            free_port()
        ),
        &["config"],
        &[
            "smtp.listener.0.tsl",
            "smtp.listener.1.tls",
            "smtp.listener.2.max_recipients",
            "smtp.listener.3.allow_networks",
        ],
    );
    // A users file with a plaintext password: refused, the password never shown.
    let plain = site.dir.path().join("plain-users");
    fs::write(&plain, "scanner:Plain-Secret-1\n").expect("write");
    let err = assert_invalid(
        &site,
        &format!(
            "{smtp}[[smtp.listener]]\naddress = \"127.0.0.1:{}\"\nauth = \"{}\"\n",
            free_port(),
            path_text(&plain)
        ),
        &["config"],
        &["smtp.listener.0.auth", "hash-password"],
    );
    assert!(!err.contains("Plain-Secret-1"), "{err}");
    // A certificate file that is not there, and serve refuses what config refuses.
    let body = format!(
        "{smtp}[[smtp.listener]]\naddress = \"127.0.0.1:{}\"\ntls = \"implicit\"\n\
         tls_cert_file = \"{}\"\ntls_key_file = \"@KEY@\"\n",
        free_port(),
        path_text(&site.dir.path().join("missing.crt"))
    );
    assert_invalid(
        &site,
        &body,
        &["config"],
        &["smtp.listener.0.tls_cert_file"],
    );
    assert_invalid(&site, &body, &["serve"], &["smtp.listener.0.tls_cert_file"]);
}

#[test]
fn config_prints_the_listener_tables() {
    let site = site();
    let (a, b) = (free_port(), free_port());
    let config = write_config(
        &site,
        &format!(
            "[smtp]\nlisten = []\n[[smtp.listener]]\naddress = \"127.0.0.1:{a}\"\ntls = \"implicit\"\n\
             tls_cert_file = \"@CERT@\"\ntls_key_file = \"@KEY@\"\nauth = \"@USERS@\"\n\
             [[smtp.listener]]\naddress = \"127.0.0.1:{b}\"\nmax_message_size = \"10MiB\"\n"
        ),
    );
    let out = run_cli(&config, &["config"], &[]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    let shown = String::from_utf8_lossy(&out.stdout);
    assert_eq!(shown.matches("[[smtp.listener]]").count(), 2, "{shown}");
    assert!(
        shown.contains(&format!("address = \"127.0.0.1:{a}\"")),
        "{shown}"
    );
    assert!(shown.contains("tls = \"implicit\""), "{shown}");
    assert!(shown.contains("max_message_size = \"10MiB\""), "{shown}");
}
