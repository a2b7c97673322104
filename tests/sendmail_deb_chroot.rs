//! The two Debian packages in a Debian system: a bookworm chroot (debootstrap --variant=minbase,
//! cached under target/sendmail-chroot/), into which dpkg installs smtp-oauth-relay,
//! smtp-oauth-relay-sendmail (both from target/static/debian, as .ci/run builds them) and
//! Debian's bsd-mailx, whose `Depends: default-mta | mail-transport-agent` only the sendmail
//! package satisfies. Then, inside the chroot, with relay.toml pointed at the simulator on
//! 127.0.0.1 (outside) and `[sendmail] aliases` root → admin@example.com:
//! - `echo test | mail -s ... root` as nobody while the relay is stopped: stored in the
//!   package's drop directory (2773 root:smtp-oauth-relay-drop), exit 0;
//! - the relay started as the unit runs it (an unprivileged dynamic uid with the drop-in's
//!   supplementary group smtp-oauth-relay-drop): it takes that message in;
//! - `echo test | mail -s x root` as root, through the listener;
//!
//! Both reach the simulator's mailbox addressed to the alias of root.
//!
//! Ignored by default: it needs root (chroot, dpkg), the .debs and, the first time, Debian's
//! mirror (`$DEBIAN_MIRROR`, default deb.debian.org). `.ci/run` runs it after building them:
//! `cargo test --test sendmail_deb_chroot -- --ignored`. Prints how long each step took.

mod common;

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::process::{free_port, output_bounded, relay_toml, with_upstream};
use common::sendmail::wait_delivered;
use common::sim_process::SimProc;

const REPO: &str = env!("CARGO_MANIFEST_DIR");
const SUITE: &str = "bookworm";
/// The cache's name: change it when what the base holds changes, so old caches are not reused.
const BASE_NAME: &str = "bookworm-minbase-1";
/// A uid in systemd's DynamicUser= range, as the unit would get one.
const RELAY_UID: u32 = 61_900;
const NOGROUP: u32 = 65_534;
const PATH: &str = "/usr/sbin:/usr/bin:/sbin:/bin";

fn ok(out: &Output, what: &str) {
    assert!(
        out.status.success(),
        "{what} failed ({}):\n{}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// `argv` run by the host's chroot(8) in `root` as `userspec` (`root`, `nobody:nogroup`).
fn in_chroot(root: &Path, userspec: &str, argv: &[&str]) -> Command {
    let mut cmd = Command::new("chroot");
    cmd.arg(format!("--userspec={userspec}"))
        .arg(root)
        .args(argv)
        .env_clear()
        .env("PATH", PATH)
        .env("LANG", "C")
        .env("HOME", "/root")
        .current_dir("/");
    cmd
}

fn sh(root: &Path, userspec: &str, script: &str, limit: Duration) -> Output {
    output_bounded(in_chroot(root, userspec, &["/bin/sh", "-c", script]), limit)
}

/// The cached minbase chroot and bsd-mailx's .deb: built once (debootstrap, then apt-get
/// download inside the chroot), reused by later runs.
fn base(cache: &Path) -> (PathBuf, PathBuf) {
    let base = cache.join(BASE_NAME);
    let debs = cache.join(format!("{BASE_NAME}-debs"));
    if !base.join(".complete").exists() {
        let tmp = cache.join(format!("{BASE_NAME}.tmp"));
        let _ = std::fs::remove_dir_all(&tmp);
        let _ = std::fs::remove_dir_all(&debs);
        std::fs::create_dir_all(&debs).unwrap();
        let mirror = std::env::var("DEBIAN_MIRROR")
            .unwrap_or_else(|_| "http://deb.debian.org/debian".to_string());
        let mut cmd = Command::new("timeout");
        cmd.args(["--kill-after=10", "900", "debootstrap", "--variant=minbase"])
            // procps: smtp-oauth-relay's one dependency (/bin/kill for ExecReload); bsd-mailx's
            // libraries. bsd-mailx itself is installed by dpkg in each run, with the relay's.
            .arg("--include=procps,libbsd0,liblockfile1")
            .arg(SUITE)
            .arg(&tmp)
            .arg(&mirror);
        let out = output_bounded(cmd, Duration::from_secs(960));
        ok(&out, "debootstrap (apt-get install -y debootstrap)");
        std::fs::copy("/etc/resolv.conf", tmp.join("etc/resolv.conf")).unwrap();
        std::fs::create_dir_all(tmp.join("tmp/dl")).unwrap();
        let out = sh(
            &tmp,
            "root",
            "cd /tmp/dl && apt-get -q update && apt-get -q download bsd-mailx && apt-get clean",
            Duration::from_secs(300),
        );
        ok(&out, "apt-get download bsd-mailx in the chroot");
        for e in std::fs::read_dir(tmp.join("tmp/dl")).unwrap().flatten() {
            std::fs::rename(e.path(), debs.join(e.file_name())).unwrap();
        }
        std::fs::remove_dir_all(tmp.join("tmp/dl")).unwrap();
        std::fs::write(tmp.join(".complete"), b"").unwrap();
        let _ = std::fs::remove_dir_all(&base);
        std::fs::rename(&tmp, &base).unwrap();
    }
    (base, debs)
}

/// The newest `<package>_*.deb` in `dir`.
fn newest_deb(dir: &Path, package: &str) -> PathBuf {
    let prefix = format!("{package}_");
    std::fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("{}: {e} (.ci/run builds the .debs first)", dir.display()))
        .flatten()
        .map(|e| e.path())
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with(&prefix) && n.ends_with(".deb"))
        })
        .max_by_key(|p| std::fs::metadata(p).and_then(|m| m.modified()).ok())
        .unwrap_or_else(|| panic!("no {prefix}*.deb in {}", dir.display()))
}

/// The gid of `name` in the chroot's /etc/group.
fn group_id(root: &Path, name: &str) -> u32 {
    let text = std::fs::read_to_string(root.join("etc/group")).unwrap();
    text.lines()
        .find_map(|l| {
            let mut f = l.split(':');
            (f.next() == Some(name)).then(|| f.nth(1)?.parse().ok())?
        })
        .unwrap_or_else(|| panic!("no group {name} in the chroot"))
}

/// The relay run as the unit runs it: `serve --config /etc/smtp-oauth-relay/relay.toml` in the
/// chroot, as RELAY_UID:nogroup with the drop-in's supplementary group.
struct ChrootRelay(std::process::Child);

impl ChrootRelay {
    fn start(root: &Path, drop_gid: u32, log: &Path) -> ChrootRelay {
        let mut cmd = Command::new("/usr/bin/smtp-oauth-relay");
        cmd.args(["serve", "--config", "/etc/smtp-oauth-relay/relay.toml"])
            .env_clear()
            .env("PATH", PATH)
            .stdin(Stdio::null())
            .stdout(std::fs::File::create(log).unwrap())
            .stderr(std::fs::File::create(log.with_extension("err")).unwrap());
        let root_c = std::ffi::CString::new(root.as_os_str().as_encoded_bytes()).unwrap();
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
                check(libc::chroot(root_c.as_ptr()))?;
                check(libc::chdir(c"/".as_ptr()))?;
                let groups = [drop_gid as libc::gid_t];
                check(libc::setgroups(1, groups.as_ptr()))?;
                check(libc::setgid(NOGROUP))?;
                check(libc::setuid(RELAY_UID))?;
                Ok(())
            });
        }
        ChrootRelay(cmd.spawn().expect("start the relay in the chroot"))
    }
}

impl Drop for ChrootRelay {
    fn drop(&mut self) {
        // SAFETY: kill(2) on our own child; SIGTERM is the unit's stop.
        unsafe { libc::kill(self.0.id() as libc::pid_t, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.0.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
#[ignore = "needs root, the .debs of target/static/debian and (once) Debian's mirror; .ci/run runs it"]
fn packages_install_and_mail_reaches_the_mailbox_with_the_alias() {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("SKIP: needs root (chroot, dpkg)");
        return;
    }
    let t0 = Instant::now();
    let target = std::env::var_os("CARGO_TARGET_DIR_STATIC")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(REPO).join("target/static"));
    let deb_dir = target.join("debian");
    let relay_deb = newest_deb(&deb_dir, "smtp-oauth-relay");
    let sendmail_deb = newest_deb(&deb_dir, "smtp-oauth-relay-sendmail");
    let cache = Path::new(REPO).join("target/sendmail-chroot");
    std::fs::create_dir_all(&cache).unwrap();
    let (base, debs) = base(&cache);
    let mailx_deb = newest_deb(&debs, "bsd-mailx");
    eprintln!("base chroot ready: {:.1?}", t0.elapsed());

    // A fresh copy of the base for this run (the cache stays clean).
    let work = tempfile::tempdir_in(&cache).unwrap();
    let root = work.path().join("root");
    let out = output_bounded(
        {
            let mut c = Command::new("cp");
            c.arg("-a").arg(&base).arg(&root);
            c
        },
        Duration::from_secs(300),
    );
    ok(&out, "cp -a base");
    let inbox = root.join("tmp/debs");
    std::fs::create_dir_all(&inbox).unwrap();
    for d in [&relay_deb, &sendmail_deb, &mailx_deb] {
        std::fs::copy(d, inbox.join(d.file_name().unwrap())).unwrap();
    }
    eprintln!("chroot copied: {:.1?}", t0.elapsed());

    // dpkg installs all three together: bsd-mailx depends on mail-transport-agent, which only
    // smtp-oauth-relay-sendmail provides here.
    let out = sh(
        &root,
        "root",
        "dpkg -i /tmp/debs/*.deb",
        Duration::from_secs(300),
    );
    ok(&out, "dpkg -i");
    let out = sh(
        &root,
        "root",
        "dpkg-query -W -f '${Package} ${Status}\\n' smtp-oauth-relay smtp-oauth-relay-sendmail \
         bsd-mailx; dpkg-query -S /usr/sbin/sendmail; readlink -f /usr/bin/mail",
        Duration::from_secs(60),
    );
    ok(&out, "dpkg-query");
    let status = String::from_utf8_lossy(&out.stdout).into_owned();
    eprintln!("{status}");
    for p in ["smtp-oauth-relay", "smtp-oauth-relay-sendmail", "bsd-mailx"] {
        assert!(
            status.contains(&format!("{p} install ok installed")),
            "{p} not installed:\n{status}"
        );
    }
    assert!(
        status.contains("smtp-oauth-relay-sendmail: /usr/sbin/sendmail"),
        "{status}"
    );
    let drop_gid = group_id(&root, "smtp-oauth-relay-drop");
    let spool = root.join("var/spool/smtp-oauth-relay");
    let meta = std::fs::metadata(&spool).expect("the package's drop directory");
    assert_eq!(meta.permissions().mode() & 0o7777, 0o2773);
    assert_eq!((meta.uid(), meta.gid()), (0, drop_gid));
    eprintln!("packages installed: {:.1?}", t0.elapsed());

    // The operator's part: relay.toml (as the package installs it, 0644, edited), the secret
    // in its own file readable by the relay only, the state directory the unit would create.
    let work_sim = work.path().join("sim");
    std::fs::create_dir(&work_sim).unwrap();
    let sim = SimProc::start(&work_sim, "");
    let etc = root.join("etc/smtp-oauth-relay");
    let mut fragment = String::new();
    for line in sim.fragment.lines() {
        if let Some(v) = line.strip_prefix("client_secret = ") {
            let secret: String = toml::from_str::<toml::Value>(&format!("v = {v}")).unwrap()["v"]
                .as_str()
                .unwrap()
                .to_string();
            let path = etc.join("client_secret");
            std::fs::write(&path, secret).unwrap();
            std::os::unix::fs::chown(&path, Some(RELAY_UID), Some(NOGROUP)).unwrap();
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
            fragment.push_str("client_secret_file = \"/etc/smtp-oauth-relay/client_secret\"\n");
        } else if let Some(v) = line.strip_prefix("ca_file = ") {
            let host_path: String =
                toml::from_str::<toml::Value>(&format!("v = {v}")).unwrap()["v"]
                    .as_str()
                    .unwrap()
                    .to_string();
            std::fs::copy(host_path, etc.join("simulator-ca.pem")).unwrap();
            fragment.push_str("ca_file = \"/etc/smtp-oauth-relay/simulator-ca.pem\"\n");
        } else {
            fragment.push_str(line);
            fragment.push('\n');
        }
    }
    let port = free_port();
    let toml_text = relay_toml(
        port,
        Path::new("/var/lib/smtp-oauth-relay"),
        "",
        "min_free_space = 1\nretry_min = \"1s\"\nretry_max = \"2s\"",
        &format!(
            "{}\n[sendmail]\ndefault_domain = \"example.com\"\n\
             aliases = {{ root = \"admin@example.com\" }}\n\n[log]\nlevel = \"info\"\n",
            with_upstream(&fragment, "rate = \"1000/s\"\nconnections = 3")
        ),
    );
    std::fs::write(etc.join("relay.toml"), toml_text).unwrap();
    std::fs::set_permissions(
        etc.join("relay.toml"),
        std::fs::Permissions::from_mode(0o644),
    )
    .unwrap();
    let state = root.join("var/lib/smtp-oauth-relay");
    std::fs::create_dir_all(&state).unwrap();
    std::os::unix::fs::chown(&state, Some(RELAY_UID), Some(NOGROUP)).unwrap();
    std::fs::set_permissions(&state, std::fs::Permissions::from_mode(0o700)).unwrap();

    // The relay stopped: an unprivileged user's mail is stored in the drop directory.
    let out = sh(
        &root,
        "nobody:nogroup",
        "echo test | mail -s chroot-while-stopped root",
        Duration::from_secs(60),
    );
    ok(&out, "mail as nobody, relay stopped");
    let dropped: Vec<_> = std::fs::read_dir(&spool)
        .unwrap()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().ends_with(".drop"))
        .collect();
    assert_eq!(dropped.len(), 1, "one message in the drop directory");

    // The relay started as the unit runs it; it takes the dropped message in.
    let log = work.path().join("relay.log");
    let relay = ChrootRelay::start(&root, drop_gid, &log);
    let d = wait_delivered(&sim, "chroot-while-stopped");
    assert_eq!(d.rcpt_to, ["admin@example.com"], "the alias of root");
    assert!(d.text.contains("\r\n\r\ntest\r\n"), "{}", d.text);

    // The relay running: `echo test | mail -s x root` as root goes through the listener.
    let deadline = Instant::now() + Duration::from_secs(30);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(
            Instant::now() < deadline,
            "the relay in the chroot does not listen:\n{}",
            std::fs::read_to_string(log.with_extension("err")).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let out = sh(
        &root,
        "root",
        "echo test | mail -s x root && echo test | mail -s chroot-running root",
        Duration::from_secs(60),
    );
    ok(&out, "mail as root, relay running");
    let d = wait_delivered(&sim, "chroot-running");
    assert_eq!(d.rcpt_to, ["admin@example.com"], "the alias of root");
    let x = wait_delivered(&sim, "\r\nSubject: x\r\n");
    assert_eq!(x.rcpt_to, ["admin@example.com"]);
    assert!(
        std::fs::read_dir(&spool)
            .unwrap()
            .flatten()
            .all(|e| !e.file_name().to_string_lossy().ends_with(".drop")),
        "the drop directory is empty once taken in"
    );
    drop(relay);
    eprintln!("total: {:.1?}", t0.elapsed());
}
