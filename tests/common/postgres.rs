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
