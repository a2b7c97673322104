//! The Store conformance suite (`common::store_suite`) against the file spool, the embedded
//! default, and against PostgreSQL (a fresh database per test on the cluster `./run-tests`
//! starts). Every store implementation runs the same checks.

mod common;

use std::path::PathBuf;
use std::sync::Arc;

use common::process;
use common::store_suite::{self as suite, StoreFixture};
use smtp_oauth_relay::config::{Backend, DbUrl, QueueConfig};
use smtp_oauth_relay::spool::Spool;
use smtp_oauth_relay::store::Store;

struct Files {
    work: tempfile::TempDir,
    daemon: Option<Arc<dyn Store>>,
}

impl Files {
    fn new() -> Files {
        let work = tempfile::tempdir().expect("tempdir");
        let mut files = Files { work, daemon: None };
        files.daemon = Some(files.open());
        files
    }

    fn dir(&self) -> PathBuf {
        self.work.path().join("spool")
    }

    fn open(&self) -> Arc<dyn Store> {
        let (spool, _report) = Spool::open(&self.dir()).expect("open spool");
        Arc::new(spool)
    }
}

impl StoreFixture for Files {
    fn daemon(&self) -> Arc<dyn Store> {
        self.daemon.clone().expect("open")
    }

    fn operator(&self) -> Arc<dyn Store> {
        Arc::new(Spool::open_for_admin(&self.dir()).expect("open for an operator"))
    }

    fn restart(&mut self) -> Arc<dyn Store> {
        // The lock goes with the last handle, as with a process that died.
        self.daemon = None;
        let store = self.open();
        self.daemon = Some(store.clone());
        store
    }

    fn queue_cli(&self, args: &[&str]) -> String {
        process::queue_cli(self.work.path(), &self.dir(), args)
    }
}

/// A PostgreSQL database of its own.
struct Postgres {
    work: tempfile::TempDir,
    url: String,
    daemon: Option<Arc<dyn Store>>,
}

impl Postgres {
    fn new() -> Postgres {
        let url = common::postgres::fresh_database();
        let mut pg = Postgres {
            work: tempfile::tempdir().expect("tempdir"),
            url,
            daemon: None,
        };
        pg.daemon = Some(pg.open());
        pg
    }

    fn queue(&self) -> QueueConfig {
        QueueConfig {
            dir: self.work.path().join("spool"),
            backend: Backend::Postgres,
            url: Some(DbUrl::new(self.url.clone())),
            ..Default::default()
        }
    }

    fn open(&self) -> Arc<dyn Store> {
        smtp_oauth_relay::store::open(&self.queue())
            .expect("open the PostgreSQL store")
            .0
    }
}

impl StoreFixture for Postgres {
    fn daemon(&self) -> Arc<dyn Store> {
        self.daemon.clone().expect("open")
    }

    fn operator(&self) -> Arc<dyn Store> {
        smtp_oauth_relay::store::open_for_operator(&self.queue()).expect("open for an operator")
    }

    fn restart(&mut self) -> Arc<dyn Store> {
        self.daemon = None;
        let store = self.open();
        self.daemon = Some(store.clone());
        store
    }

    fn queue_cli(&self, args: &[&str]) -> String {
        let toml = format!(
            "[queue]\ndir = \"{}\"\nbackend = \"postgres\"\nurl = \"{}\"\n",
            self.work.path().join("spool").display(),
            self.url
        );
        process::queue_cli_with(self.work.path(), &toml, args)
    }
}

/// Every check of the suite against one store, as `<prefix>_<check>` tests.
macro_rules! conformance {
    ($prefix:ident, $fixture:expr) => {
        mod $prefix {
            use super::*;

            #[tokio::test]
            async fn commits_are_durable_and_announced() {
                suite::commits_are_durable_and_announced(&mut $fixture).await;
            }

            #[tokio::test]
            async fn claims_are_exclusive() {
                suite::claims_are_exclusive(&mut $fixture).await;
            }

            #[tokio::test]
            async fn attempts_are_recorded_until_delivered_or_failed() {
                suite::attempts_are_recorded_until_delivered_or_failed(&mut $fixture).await;
            }

            #[tokio::test]
            async fn operator_commands_while_delivering() {
                suite::operator_commands_while_delivering(&mut $fixture).await;
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn events_cross_processes() {
                suite::events_cross_processes(&mut $fixture).await;
            }

            #[tokio::test]
            async fn ids_are_validated() {
                suite::ids_are_validated(&mut $fixture).await;
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn large_messages_are_read_in_pieces() {
                suite::large_messages_are_read_in_pieces(&mut $fixture).await;
            }

            #[tokio::test]
            async fn gauges_and_status() {
                suite::gauges_and_status(&mut $fixture).await;
            }
        }
    };
}

conformance!(files, Files::new());
conformance!(postgres, Postgres::new());

/// Unlike a spool file (open for the attempt), a message's rows go with `queue delete`: an
/// attempt still sending it gets an error, never a message cut short.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_a_message_deleted_while_it_is_sent_ends_its_read_with_an_error() {
    let pg = Postgres::new();
    let store = pg.daemon();
    let bytes = suite::body(4 * 1024 * 1024);
    let id = suite::put(&*store, &["a@example.org"], &bytes).await;
    let claimed = store.claim(&id).await.expect("claim").expect("queued");
    let mut reader = claimed.message.body.reader();
    let mut got = 0usize;
    for _ in 0..2 {
        got += reader
            .next_chunk()
            .await
            .expect("read")
            .expect("a piece")
            .len();
    }
    pg.operator().delete(&id).await.expect("delete");
    let error = loop {
        match reader.next_chunk().await {
            Ok(Some(piece)) => got += piece.len(),
            Ok(None) => panic!("a deleted message was read as whole ({got} bytes)"),
            Err(e) => break e,
        }
    };
    assert!(
        matches!(
            error,
            smtp_oauth_relay::spool::SpoolError::Unreadable { .. }
        ),
        "{error}"
    );
    assert!(
        error.to_string().contains("missing") || error.to_string().contains("found"),
        "{error}"
    );
    assert!(got < bytes.len());
}
