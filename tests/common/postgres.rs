//! The throwaway PostgreSQL cluster `./run-tests` starts (`TEST_PG_URL`, a loopback superuser
//! URL): one fresh database per test, so tests never see each other's queue.

use std::sync::atomic::{AtomicU32, Ordering};

/// The variable `./run-tests` exports.
pub const URL_ENV: &str = "TEST_PG_URL";

/// The cluster's URL. Panics with the fix when it is not set: these tests need a database.
pub fn cluster_url() -> String {
    std::env::var(URL_ENV).unwrap_or_else(|_| {
        panic!(
            "{URL_ENV} is not set: run ./run-tests (it starts a throwaway PostgreSQL on a \
             loopback port), or point {URL_ENV} at a PostgreSQL superuser URL on 127.0.0.1"
        )
    })
}

/// A new, empty database on the cluster; its URL (sslmode=disable: loopback).
pub fn fresh_database() -> String {
    static SEQ: AtomicU32 = AtomicU32::new(0);
    let base = cluster_url();
    let name = format!(
        "relay_{}_{}_{}",
        std::process::id(),
        SEQ.fetch_add(1, Ordering::Relaxed),
        ulid::Ulid::generate().to_string().to_ascii_lowercase()
    );
    let admin = base.clone();
    let create = name.clone();
    // Its own thread and runtime: fixtures are built from sync code and from inside tests'
    // runtimes alike.
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        rt.block_on(async move {
            let (client, conn) = tokio_postgres::connect(&admin, tokio_postgres::NoTls)
                .await
                .expect("connect to the test cluster");
            let driver = tokio::spawn(conn);
            client
                .batch_execute(&format!("CREATE DATABASE {create}"))
                .await
                .expect("create database");
            drop(client);
            let _ = driver.await;
        })
    })
    .join()
    .expect("create the test database");
    with_database(&base, &name)
}

/// `url` with its database replaced by `name`.
pub fn with_database(url: &str, name: &str) -> String {
    let mut u = url::Url::parse(url).expect("TEST_PG_URL is a URL");
    u.set_path(&format!("/{name}"));
    u.to_string()
}

/// A psql-free SQL statement against `url` (for tests that inspect or break the database).
pub fn execute(url: &str, sql: &str) {
    let (url, sql) = (url.to_string(), sql.to_string());
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        rt.block_on(async move {
            let (client, conn) = tokio_postgres::connect(&url, tokio_postgres::NoTls)
                .await
                .expect("connect");
            let driver = tokio::spawn(conn);
            client.batch_execute(&sql).await.expect("execute");
            drop(client);
            let _ = driver.await;
        })
    })
    .join()
    .expect("execute");
}

/// The first column of every row of `sql` against `url`, as text (`NULL` as `None`).
pub fn query_texts(url: &str, sql: &str) -> Vec<Option<String>> {
    let (url, sql) = (url.to_string(), sql.to_string());
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        rt.block_on(async move {
            let (client, conn) = tokio_postgres::connect(&url, tokio_postgres::NoTls)
                .await
                .expect("connect");
            let driver = tokio::spawn(conn);
            let rows = client.query(&sql, &[]).await.expect("query");
            drop(client);
            let _ = driver.await;
            rows.iter().map(|r| r.get::<_, Option<String>>(0)).collect()
        })
    })
    .join()
    .expect("query")
}

/// A PostgreSQL cluster of one test's own, on a loopback port, for a test that stops and starts
/// the server itself (the shared cluster must stay up for the others). As root it runs as the
/// `postgres` user, as `./run-tests` runs the shared one.
pub struct PrivateCluster {
    dir: tempfile::TempDir,
    bin: std::path::PathBuf,
    port: u16,
}

impl PrivateCluster {
    /// initdb and start (fsync off: the tests measure behaviour, not the disk).
    pub fn start() -> PrivateCluster {
        let bin = pg_bin_dir();
        let dir = tempfile::tempdir().expect("tempdir");
        if is_root() {
            run(
                std::process::Command::new("chown")
                    .arg("postgres:")
                    .arg(dir.path()),
                "chown the cluster directory",
            );
        }
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("a free port")
            .port();
        let cluster = PrivateCluster { dir, bin, port };
        run(
            cluster
                .command("initdb")
                .arg("-D")
                .arg(cluster.data())
                .args(["-U", "postgres", "--auth=trust", "-E", "UTF8"]),
            "initdb",
        );
        cluster.start_server();
        cluster
    }

    /// The superuser URL of its `postgres` database.
    pub fn url(&self) -> String {
        format!(
            "postgres://postgres@127.0.0.1:{}/postgres?sslmode=disable",
            self.port
        )
    }

    /// Starts the server again (after [`stop_server`](Self::stop_server)), waiting until it
    /// accepts connections.
    pub fn start_server(&self) {
        let options = format!(
            "-p {} -k {} -c listen_addresses=127.0.0.1 -c fsync=off -c max_connections=100",
            self.port,
            self.dir.path().display()
        );
        run(
            self.command("pg_ctl")
                .arg("-D")
                .arg(self.data())
                .arg("-l")
                .arg(self.dir.path().join("server.log"))
                .args(["-w", "-t", "60", "-o", &options, "start"]),
            "pg_ctl start",
        );
    }

    /// Stops the server as an administrator does (`-m fast`: sessions are ended, their open
    /// transactions rolled back).
    pub fn stop_server(&self) {
        run(
            self.command("pg_ctl")
                .arg("-D")
                .arg(self.data())
                .args(["-m", "fast", "-w", "-t", "60", "stop"]),
            "pg_ctl stop",
        );
    }

    fn data(&self) -> std::path::PathBuf {
        self.dir.path().join("data")
    }

    fn command(&self, program: &str) -> std::process::Command {
        let program = self.bin.join(program);
        if is_root() {
            let mut c = std::process::Command::new("runuser");
            c.args(["-u", "postgres", "--"]).arg(program);
            c
        } else {
            std::process::Command::new(program)
        }
    }
}

impl Drop for PrivateCluster {
    fn drop(&mut self) {
        let _ = self
            .command("pg_ctl")
            .arg("-D")
            .arg(self.data())
            .args(["-m", "immediate", "-w", "-t", "30", "stop"])
            .output();
    }
}

/// Debian's newest PostgreSQL, as `./run-tests` picks it; else what `PATH` has.
fn pg_bin_dir() -> std::path::PathBuf {
    let mut dirs: Vec<(u32, std::path::PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let version = e.file_name().to_str()?.parse().ok()?;
            let bin = e.path().join("bin");
            bin.join("initdb").exists().then_some((version, bin))
        })
        .collect();
    dirs.sort();
    dirs.pop()
        .map(|(_, bin)| bin)
        .unwrap_or_else(|| std::path::PathBuf::from("/usr/bin"))
}

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

fn run(command: &mut std::process::Command, what: &str) {
    let out = command.output().unwrap_or_else(|e| panic!("{what}: {e}"));
    assert!(
        out.status.success(),
        "{what} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The relay process on the PostgreSQL queue at `url`, quick to retry, its admin endpoint on
/// (for `/readyz`), delivering with `fragment` (the simulator's); `queue` adds `[queue]` lines.
pub fn relay_on(
    work: &std::path::Path,
    url: &str,
    queue: &str,
    fragment: &str,
) -> super::process::Relay {
    let spool = work.join("spool");
    super::process::Relay::builder()
        .work(work)
        .config(|s| {
            super::process::relay_toml(
                s.smtp,
                &spool,
                "",
                &format!(
                    "backend = \"postgres\"\nurl = \"{url}\"\nretry_min = \"200ms\"\n\
                     retry_max = \"1s\"\nmin_free_space = 1\n{queue}"
                ),
                &format!(
                    "[admin]\nlisten = \"127.0.0.1:{}\"\n[log]\nlevel = \"info\"\n\n{fragment}",
                    s.admin
                ),
            )
        })
        .start()
}
