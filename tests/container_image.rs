//! The container image without a container engine: runs deploy/build-static.sh (what the
//! Dockerfile's build stage runs), takes OUT/rootfs (what the final `FROM scratch` stage copies,
//! and nothing else), and runs the binary in it with chroot as the image's USER, with exactly
//! the Dockerfile's ENV, ENTRYPOINT + CMD and HEALTHCHECK. It must accept and spool a message
//! (`250 ... queued as`), answer `health` with exit 0, and stop cleanly on SIGTERM.
//!
//! Ignored by default: it needs root (chroot, setuid) and a static release build (minutes the
//! first time). `.ci/run` runs it: `cargo test --test container_image -- --ignored`.
//! Prints the image's size (sum of its files).

mod common;

use std::net::{SocketAddr, TcpStream};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::process::free_addr;
use common::smtp::blocking::Client;

const REPO: &str = env!("CARGO_MANIFEST_DIR");

/// What the final stage of deploy/Dockerfile declares.
#[derive(Debug, Default)]
struct FinalStage {
    user: (u32, u32),
    env: Vec<(String, String)>,
    entrypoint: Vec<String>,
    cmd: Vec<String>,
    healthcheck: Vec<String>,
    copies: Vec<String>,
}

fn json_array(text: &str) -> Vec<String> {
    serde_json::from_str(text.trim()).unwrap_or_else(|e| panic!("not a JSON array: {text}: {e}"))
}

fn parse_dockerfile() -> FinalStage {
    let text = std::fs::read_to_string(Path::new(REPO).join("deploy/Dockerfile")).unwrap();
    let last_from = text.rfind("\nFROM ").expect("FROM");
    let stage = &text[last_from..];
    assert!(
        stage.starts_with("\nFROM scratch"),
        "final stage is not scratch"
    );
    let mut out = FinalStage::default();
    for line in stage.lines() {
        if let Some(rest) = line.strip_prefix("USER ") {
            let (u, g) = rest.trim().split_once(':').expect("USER uid:gid");
            out.user = (u.parse().unwrap(), g.parse().unwrap());
        } else if let Some(rest) = line.strip_prefix("ENV ") {
            let (k, v) = rest.trim().split_once('=').expect("ENV K=V");
            out.env.push((k.into(), v.into()));
        } else if let Some(rest) = line.strip_prefix("ENTRYPOINT ") {
            out.entrypoint = json_array(rest);
        } else if let Some(rest) = line.strip_prefix("CMD ") {
            out.cmd = json_array(rest);
        } else if let Some(rest) = line.strip_prefix("HEALTHCHECK ") {
            out.healthcheck = json_array(&rest[rest.find(" CMD ").expect("CMD") + 5..]);
        } else if let Some(rest) = line.strip_prefix("COPY ") {
            out.copies.push(rest.to_string());
        }
    }
    out
}

fn files_under(root: &Path) -> Vec<(String, u64)> {
    let mut out = Vec::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir).unwrap() {
            let entry = entry.unwrap();
            let meta = entry.metadata().unwrap();
            let rel = entry
                .path()
                .strip_prefix(root)
                .unwrap()
                .display()
                .to_string();
            if meta.is_dir() {
                out.push((format!("{rel}/"), 0));
                stack.push(entry.path());
            } else {
                out.push((rel, meta.len()));
            }
        }
    }
    out.sort();
    out
}

/// `argv` inside `rootfs` (chroot) as `uid:gid`, with exactly `env`.
fn in_image(rootfs: &Path, user: (u32, u32), env: &[(String, String)], argv: &[String]) -> Command {
    let mut cmd = Command::new(&argv[0]);
    cmd.args(&argv[1..]).env_clear();
    for (k, v) in env {
        cmd.env(k, v);
    }
    let root = std::ffi::CString::new(rootfs.as_os_str().as_encoded_bytes()).unwrap();
    let (uid, gid) = user;
    // SAFETY: only async-signal-safe calls between fork and exec.
    unsafe {
        cmd.pre_exec(move || {
            let check = |rc: libc::c_int| {
                if rc == 0 {
                    Ok(())
                } else {
                    Err(std::io::Error::last_os_error())
                }
            };
            check(libc::chroot(root.as_ptr()))?;
            check(libc::chdir(c"/".as_ptr()))?;
            check(libc::setgroups(0, std::ptr::null()))?;
            check(libc::setgid(gid))?;
            check(libc::setuid(uid))?;
            Ok(())
        });
    }
    cmd
}

fn smtp_send(addr: SocketAddr) -> String {
    let mut c = Client::open(addr).unwrap();
    c.set_timeout(Duration::from_secs(10));
    assert!(c.read_reply().unwrap().starts_with("220 "));
    let mut cmd = |bytes: &str, expect: &str| -> String {
        c.send_raw(bytes.as_bytes()).unwrap();
        let r = c.read_reply().unwrap();
        assert!(r.starts_with(expect), "{bytes:?}: {r:?}");
        r.raw
    };
    cmd("EHLO app.test\r\n", "250");
    cmd("MAIL FROM:<app@legacy.test>\r\n", "250 ");
    cmd("RCPT TO:<someone@example.org>\r\n", "250 ");
    cmd("DATA\r\n", "354");
    let r = cmd("Subject: from the image\r\n\r\nhello\r\n.\r\n", "250 ");
    cmd("QUIT\r\n", "221");
    r
}

#[test]
#[ignore = "needs root and a static release build; .ci/run runs it"]
fn image_rootfs_accepts_mail_and_answers_health() {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("SKIP: needs root (chroot, setuid)");
        return;
    }
    let stage = parse_dockerfile();
    assert_eq!(
        stage.copies,
        [
            "--from=build /out/rootfs/ /",
            "--from=build --chown=10001:10001 /out/rootfs/var/lib/smtp-oauth-relay/ /var/lib/smtp-oauth-relay/",
        ],
        "the image must be exactly OUT/rootfs"
    );
    assert_ne!(stage.user.0, 0, "the image runs as non-root");

    // The build stage.
    let out = tempfile::tempdir().unwrap();
    let target = std::env::var_os("CARGO_TARGET_DIR_STATIC")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(REPO).join("target/static"));
    let build = Command::new(Path::new(REPO).join("deploy/build-static.sh"))
        .arg(out.path())
        .env("CARGO_TARGET_DIR", &target)
        .env_remove("RUSTFLAGS")
        .status()
        .expect("run build-static.sh");
    assert!(build.success(), "build-static.sh failed");
    let rootfs = out.path().join("rootfs");

    // Exactly these files: no shell, no libc.
    let files = files_under(&rootfs);
    let names: Vec<&str> = files.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(
        names,
        [
            "etc/",
            "etc/group",
            "etc/passwd",
            "etc/smtp-oauth-relay/",
            "etc/smtp-oauth-relay/relay.toml",
            "etc/ssl/",
            "etc/ssl/certs/",
            "etc/ssl/certs/ca-certificates.crt",
            "run/",
            "run/secrets/",
            "usr/",
            "usr/bin/",
            "usr/bin/smtp-oauth-relay",
            "var/",
            "var/lib/",
            "var/lib/smtp-oauth-relay/",
        ]
    );
    let total: u64 = files.iter().map(|(_, s)| s).sum();
    for (name, size) in &files {
        if *size > 0 {
            eprintln!("IMAGE {size:>10}  /{name}");
        }
    }
    eprintln!(
        "IMAGE {total:>10}  total ({:.1} MiB)",
        total as f64 / 1048576.0
    );
    let bin = rootfs.join("usr/bin/smtp-oauth-relay");
    let file = Command::new("file").arg("-b").arg(&bin).output().unwrap();
    let file = String::from_utf8_lossy(&file.stdout);
    assert!(
        file.contains("static-pie linked") || file.contains("statically linked"),
        "{file}"
    );
    let passwd = std::fs::read_to_string(rootfs.join("etc/passwd")).unwrap();
    assert!(passwd.starts_with(&format!("relay:x:{}:{}:", stage.user.0, stage.user.1)));

    // Run it: the Dockerfile's ENV, plus the two ports moved off their defaults so the test
    // cannot collide with anything on this host (also proves config by RELAY_* variables).
    let smtp = free_addr();
    let admin = free_addr();
    let mut env = stage.env.clone();
    env.push(("RELAY_SMTP__LISTEN".into(), format!("[\"{smtp}\"]")));
    env.push(("RELAY_ADMIN__LISTEN".into(), admin.to_string()));
    // Tests run on filesystems of any size.
    env.push(("RELAY_QUEUE__MIN_FREE_SPACE".into(), "1".into()));
    let argv: Vec<String> = stage.entrypoint.iter().chain(&stage.cmd).cloned().collect();
    let mut relay = in_image(&rootfs, stage.user, &env, &argv)
        .stderr(Stdio::piped())
        .spawn()
        .expect("start the relay in the image");
    let deadline = Instant::now() + Duration::from_secs(30);
    while TcpStream::connect(smtp).is_err() {
        if let Some(status) = relay.try_wait().unwrap() {
            let mut log = String::new();
            std::io::Read::read_to_string(relay.stderr.as_mut().unwrap(), &mut log).unwrap();
            panic!("relay exited: {status}\n{log}");
        }
        assert!(Instant::now() < deadline, "relay did not start");
        std::thread::sleep(Duration::from_millis(50));
    }

    let r = smtp_send(smtp);
    assert!(r.starts_with("250 2.0.0") && r.contains("queued as"), "{r}");

    let health = in_image(&rootfs, stage.user, &env, &stage.healthcheck)
        .output()
        .unwrap();
    assert_eq!(
        health.status.code(),
        Some(0),
        "health: {}{}",
        String::from_utf8_lossy(&health.stdout),
        String::from_utf8_lossy(&health.stderr)
    );
    let list = in_image(
        &rootfs,
        stage.user,
        &env,
        &[argv[0].clone(), "queue".into(), "list".into()],
    )
    .output()
    .unwrap();
    let list = String::from_utf8_lossy(&list.stdout);
    let rows: Vec<&str> = list.lines().filter(|l| !l.starts_with("ID\t")).collect();
    assert_eq!(rows.len(), 1, "{list}");
    assert!(rows[0].contains("\tqueued"), "{list}");

    // SIGTERM: a clean exit well within the 30 s grace period.
    // SAFETY: kill(2) on our child.
    unsafe { libc::kill(relay.id() as libc::pid_t, libc::SIGTERM) };
    let stop = Instant::now();
    let status = loop {
        if let Some(s) = relay.try_wait().unwrap() {
            break s;
        }
        assert!(
            stop.elapsed() < Duration::from_secs(30),
            "no exit on SIGTERM"
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(status.success(), "{status}");

    // The message is in the volume, owned by the image's user.
    use std::os::unix::fs::MetadataExt;
    let queue = rootfs.join("var/lib/smtp-oauth-relay/queue");
    let msgs: Vec<_> = std::fs::read_dir(&queue).unwrap().collect();
    assert_eq!(msgs.len(), 1);
    let meta = msgs[0].as_ref().unwrap().metadata().unwrap();
    assert_eq!(meta.uid(), stage.user.0);
}
