//! The relay with its deliverer, wired to the in-process simulator.

use std::time::Duration;

use smtp_oauth_relay::config::Config;
use smtp_oauth_relay::daemon::{point_at_simulator, start_delivery};
use smtp_oauth_relay::deliver::DeliveryHandle;
use smtp_oauth_relay::inbound::{InboundSettings, Server};
use smtp_oauth_relay::oauth::TokenProvider;
use smtp_oauth_relay::sim::{SimConfig, Simulator};
use smtp_oauth_relay::spool::Spool;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use super::Relay;

pub const MAILBOX: &str = "relay@contoso.example";

pub struct DeliveringRelay {
    pub relay: Relay,
    pub sim: Simulator,
    pub delivery: DeliveryHandle,
    pub tokens: TokenProvider,
    pub metrics: std::sync::Arc<smtp_oauth_relay::metrics::Metrics>,
    pub deliverer: tokio::task::JoinHandle<()>,
    _sim_dir: tempfile::TempDir,
}

impl DeliveringRelay {
    /// Waits (bounded) until `n` messages are in the simulator's mailbox.
    pub async fn wait_delivered(&self, n: usize) -> Vec<smtp_oauth_relay::sim::StoredMessage> {
        for _ in 0..300 {
            let got = self.sim.messages().expect("mailbox");
            if got.len() >= n {
                return got;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!(
            "only {} of {n} messages delivered; spool: {:?}",
            self.sim.messages().expect("mailbox").len(),
            self.relay.spool.list().expect("list")
        );
    }

    /// Sends one small message through the relay and waits for its 250.
    pub async fn send(&self, subject: &str) -> String {
        let mut c = self.relay.connect().await;
        c.begin_message("app@legacy.test", &["b@example.org"]).await;
        c.send(format!("Subject: {subject}\r\n\r\nx\r\n.\r\n").as_bytes())
            .await;
        let reply = c.expect("250 2.0.0 queued as").await;
        c.cmd_expect("QUIT", "221").await;
        super::queued_id(&reply)
    }

    /// Submits `message` (bytes as the client means them, no leading dots) with `mail` as the
    /// whole MAIL FROM argument (e.g. `<a@b> SMTPUTF8 BODY=8BITMIME`); returns the queue id.
    pub async fn submit(&self, mail: &str, rcpts: &[&str], message: &[u8]) -> String {
        let mut c = self.relay.connect().await;
        c.expect("220 ").await;
        c.cmd_expect("EHLO client.test", "250").await;
        c.cmd_expect(&format!("MAIL FROM:{mail}"), "250 2.1.0")
            .await;
        for rcpt in rcpts {
            c.cmd_expect(&format!("RCPT TO:<{rcpt}>"), "250 2.1.5")
                .await;
        }
        c.cmd_expect("DATA", "354").await;
        c.send(message).await;
        c.send(b".\r\n").await;
        let reply = c.expect("250 2.0.0 queued as").await;
        c.cmd_expect("QUIT", "221").await;
        super::queued_id(&reply)
    }

    /// Waits (bounded) until `check` holds for the relay's spool.
    pub async fn wait_for(&self, what: &str, check: impl Fn(&Relay) -> bool) {
        for _ in 0..300 {
            if check(&self.relay) {
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("timed out waiting for {what}");
    }
}

/// Listener + deliverer + simulator, wired exactly as `serve --simulate` wires them.
/// `relay_toml` adds relay settings (tests set fast retries and a high rate).
pub async fn start_delivering(relay_toml: &str, sim_config: SimConfig) -> DeliveringRelay {
    start_delivering_with(relay_toml, sim_config, |_, _| {}).await
}

/// As [`start_delivering`], with a last change to the configuration (e.g. a certificate) and
/// to the simulator (e.g. a fault) before the relay starts.
pub async fn start_delivering_with(
    relay_toml: &str,
    sim_config: SimConfig,
    customize: impl FnOnce(&mut Config, &Simulator),
) -> DeliveringRelay {
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    let sim_dir = tempfile::tempdir().expect("tempdir");
    let sim = Simulator::start(sim_config, sim_dir.path())
        .await
        .expect("simulator");
    let mut config = Config::from_toml_str(relay_toml).expect("relay config");
    let dir = tempfile::tempdir().expect("tempdir");
    config.queue.dir = dir.path().join("spool");
    config.queue.min_free_space = smtp_oauth_relay::config::ByteSize(1);
    point_at_simulator(&mut config, &sim).expect("point at simulator");
    customize(&mut config, &sim);
    let (spool, _) = Spool::open(&config.queue.dir).expect("spool");
    let shutdown = CancellationToken::new();
    let metrics = std::sync::Arc::new(smtp_oauth_relay::metrics::Metrics::default());
    let running = start_delivery(&config, &spool, &metrics, &shutdown)
        .expect("delivery starts")
        .expect("oauth configured");
    let inbound = InboundSettings::from_config(&config).expect("settings");
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let server = Server::new(
        inbound,
        spool.clone(),
        Some(running.handle.clone()),
        running.metrics.clone(),
    );
    let handle = tokio::spawn(server.run(vec![listener], shutdown.clone()));
    DeliveringRelay {
        relay: Relay {
            addr,
            spool,
            shutdown,
            handle,
            _dir: dir,
        },
        sim,
        delivery: running.handle,
        tokens: running.tokens,
        metrics,
        deliverer: running.deliverer,
        _sim_dir: sim_dir,
    }
}

/// A delivered message without the `Received:` field the relay prepended (asserted to be
/// there, first, naming the test client), i.e. the bytes to compare with what was sent.
pub fn after_relay_received(delivered: &[u8]) -> &[u8] {
    assert!(
        delivered.starts_with(b"Received: from client.test ("),
        "the relay's Received is not first: {:?}",
        String::from_utf8_lossy(delivered)
    );
    let mut rest = delivered;
    loop {
        let end = rest
            .windows(2)
            .position(|w| w == b"\r\n")
            .expect("CRLF in the Received field")
            + 2;
        rest = &rest[end..];
        if !rest.starts_with(b"\t") && !rest.starts_with(b" ") {
            return rest;
        }
    }
}
