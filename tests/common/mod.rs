//! The one test harness. Every test file says `mod common;` and takes what it needs:
//!
//! - here: the relay's listener in-process on 127.0.0.1:0 with a temporary spool (mini-redis
//!   style), [`start_relay`];
//! - [`delivery`]: the listener plus the deliverer and the in-process simulator;
//! - [`process`]: the real binary as a process (`serve` and the one-shot commands);
//! - [`sim_process`]: the standalone simulator as a process;
//! - [`sim`]: the simulator in-process for tests that talk to it directly;
//! - [`proxy`]: a counting TCP forwarder (which connections used which upstream settings);
//! - [`smtp`]: the SMTP client (async, and [`smtp::blocking`] for thread-based tests);
//! - [`fixtures`]: dot-stuffing, the seeded PRNG, message builders, spool inspection;
//! - [`logs`]: the in-process log, captured, for tests that await a log line;
//! - [`sendmail`]: `sendmail` runs (subcommand or a link, stdin, another uid), its config,
//!   the simulator's mailbox.
#![allow(dead_code)]

pub mod counting_token;
pub mod delivery;
pub mod echo;
pub mod fixtures;
pub mod limited;
pub mod logs;
pub mod postgres;
pub mod process;
pub mod proxy;
pub mod sendmail;
pub mod session;
pub mod setup_cli;
pub mod sim;
pub mod sim_process;
pub mod smtp;
pub mod store_suite;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use smtp_oauth_relay::config::Config;
use smtp_oauth_relay::inbound::{InboundSettings, Server};
use smtp_oauth_relay::spool::Spool;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

// Each test binary uses a different part of the harness.
#[allow(unused_imports)]
pub use fixtures::strip_added_headers;
#[allow(unused_imports)]
pub use smtp::{Client, REPLY_TIMEOUT, Reply, queued_id};

pub struct Relay {
    pub addr: SocketAddr,
    pub spool: Spool,
    pub shutdown: CancellationToken,
    pub handle: JoinHandle<()>,
    pub(crate) _dir: tempfile::TempDir,
}

impl Relay {
    pub fn spool_dir(&self) -> &Path {
        self.spool.dir()
    }

    /// Stored messages (the bytes after the spool's envelope header), in arrival order.
    pub fn stored_messages(&self) -> Vec<Vec<u8>> {
        self.spool
            .list()
            .expect("list")
            .iter()
            .map(|e| self.stored_message(&e.id))
            .collect()
    }

    pub fn stored_message(&self, id: &str) -> Vec<u8> {
        fixtures::read_stored(&fixtures::queued_path(self.spool_dir(), id))
            .unwrap_or_else(|e| panic!("{e}"))
            .body
    }

    pub fn files_in(&self, sub: &str) -> Vec<PathBuf> {
        std::fs::read_dir(self.spool_dir().join(sub))
            .map(|rd| rd.filter_map(|e| e.ok().map(|e| e.path())).collect())
            .unwrap_or_default()
    }

    pub async fn connect(&self) -> Client {
        Client::connect(self.addr).await
    }

    /// Waits (bounded) until the listener refuses connections: the server has seen `shutdown`
    /// and stopped accepting.
    pub async fn wait_not_accepting(&self) {
        for _ in 0..500 {
            if tokio::net::TcpStream::connect(self.addr).await.is_err() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!("the listener still accepts connections");
    }

    pub async fn stop(self) {
        self.shutdown.cancel();
        tokio::time::timeout(Duration::from_secs(30), self.handle)
            .await
            .expect("server stops")
            .expect("server task");
    }
}

/// Starts the listener with `toml` (a relay.toml fragment) on an ephemeral port.
pub async fn start_relay(toml: &str) -> Relay {
    let mut config = Config::from_toml_str(toml).expect("test config valid");
    let dir = tempfile::tempdir().expect("tempdir");
    config.queue.dir = dir.path().join("spool");
    // Tests run on filesystems of any size: only the explicit tests exercise the disk guard.
    if config.queue.min_free_space.0 == 0 {
        config.queue.min_free_space = smtp_oauth_relay::config::ByteSize(1);
    }
    let settings = InboundSettings::from_config(&config).expect("settings");
    let (spool, _) = Spool::open(&config.queue.dir).expect("spool");
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let shutdown = CancellationToken::new();
    let server = Server::new(settings, Arc::new(spool.clone()), Default::default());
    let handle = tokio::spawn(server.run(vec![listener], shutdown.clone()));
    Relay {
        addr,
        spool,
        shutdown,
        handle,
        _dir: dir,
    }
}

/// `smtp-oauth-relay queue CMD` as `main` runs it (the store opened for an operator), against
/// the spool at `dir`, in this process; the printed text or the error.
#[allow(dead_code)]
pub async fn queue_command(
    dir: &Path,
    cmd: &smtp_oauth_relay::queue_command::QueueCommand,
) -> Result<String, smtp_oauth_relay::queue_command::QueueCommandError> {
    let queue = smtp_oauth_relay::config::QueueConfig {
        dir: dir.to_path_buf(),
        ..Default::default()
    };
    let store = smtp_oauth_relay::store::open_for_operator(&queue)?;
    let mut out = Vec::new();
    smtp_oauth_relay::queue_command::run(&*store, cmd, &mut out).await?;
    Ok(String::from_utf8_lossy(&out).into_owned())
}
