//! The relay with its deliverer, wired to the in-process simulator: either exactly as
//! `serve --simulate` wires them ([`start_delivering`]), or with what the configuration cannot
//! say (short upstream timeouts, a short session idle limit, a changed upstream target) and a
//! deliverer the test can stop and start again ([`start_tuned`]).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use smtp_oauth_relay::config::{Config, TransportKind};
use smtp_oauth_relay::daemon::{point_at_simulator, start_delivery};
use smtp_oauth_relay::deliver::classify::HoldCause;
use smtp_oauth_relay::deliver::{Deliverer, DeliveryHandle, DeliverySettings, MailboxState};
use smtp_oauth_relay::inbound::{InboundSettings, Server};
use smtp_oauth_relay::oauth::TokenProvider;
use smtp_oauth_relay::sim::{SimConfig, Simulator};
use smtp_oauth_relay::spool::{DeliveryState, EntryState, Spool};
use smtp_oauth_relay::store::Store;
use smtp_oauth_relay::transport::Transport;
use smtp_oauth_relay::transport::graph::{GraphSettings, GraphTransport};
use smtp_oauth_relay::transport::smtp::session::{Timeouts, UpstreamTarget, upstream_target};
use smtp_oauth_relay::transport::smtp::{SmtpSettings, SmtpTransport};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use super::{Relay, fixtures};

pub const MAILBOX: &str = "relay@contoso.example";

/// What a tuned deliverer changes from `serve`'s wiring.
#[derive(Debug, Clone, Default)]
pub struct Tuning {
    pub timeouts: Option<Timeouts>,
    pub session_max_idle: Option<Duration>,
    /// `transport = "graph"`: the whole-request timeout (serve: 2 minutes).
    pub graph_request_timeout: Option<Duration>,
    /// `transport = "graph"`: another Graph root than the simulator's (an endpoint of the test).
    pub graph_url: Option<String>,
}

pub struct DeliveringRelay {
    pub relay: Relay,
    pub sim: Simulator,
    /// The handle of the deliverer running now (replaced by [`start_deliverer`](Self::start_deliverer)).
    pub delivery: DeliveryHandle,
    pub tokens: TokenProvider,
    pub metrics: Arc<smtp_oauth_relay::metrics::Metrics>,
    pub deliverer: tokio::task::JoinHandle<()>,
    pub config: Config,
    tuning: Tuning,
    /// Stops the deliverer and its refresher (a child of the relay's shutdown token).
    deliverer_stop: CancellationToken,
    refresher: Option<tokio::task::JoinHandle<()>>,
    running: bool,
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

    /// Sends one small message through the relay and waits for its 250; returns its id.
    pub async fn send(&self, subject: &str) -> String {
        let mut c = self.relay.connect().await;
        c.begin_message("app@legacy.test", &["b@example.org"]).await;
        c.send(format!("Subject: {subject}\r\n\r\nx\r\n.\r\n").as_bytes())
            .await;
        let reply = c.expect("250 2.0.0 queued as").await;
        c.cmd_expect("QUIT", "221").await;
        super::queued_id(&reply)
    }

    /// Sends `n` tracked messages ([`fixtures::message`], markers `<prefix>-<i>`, growing sizes)
    /// on one connection; all must be acknowledged. Returns (marker, queue id) pairs.
    pub async fn send_tracked(&self, prefix: &str, n: usize) -> Vec<(String, String)> {
        let mut c = self.relay.connect().await;
        c.expect("220").await;
        c.cmd_expect("EHLO client.test", "250").await;
        let mut sent = Vec::new();
        for i in 0..n {
            let marker = format!("{prefix}-{i}");
            c.cmd_expect("MAIL FROM:<app@legacy.test>", "250").await;
            c.cmd_expect("RCPT TO:<user@example.org>", "250").await;
            c.cmd_expect("DATA", "354").await;
            let msg = fixtures::message(&marker, 2_000 + 997 * i);
            c.send(&fixtures::data_block(&msg)).await;
            let reply = c.expect("250 2.0.0 queued as").await;
            sent.push((marker, super::queued_id(&reply)));
        }
        c.cmd_expect("QUIT", "221").await;
        sent
    }

    /// marker → copies delivered.
    pub fn delivered_markers(&self) -> HashMap<String, usize> {
        let mut m = HashMap::new();
        for msg in self.sim.messages().expect("mailbox") {
            if let Some(marker) = fixtures::marker_of(&msg.data) {
                *m.entry(marker).or_default() += 1;
            }
        }
        m
    }

    /// Waits (bounded) until every marker is delivered and the spool is empty; asserts that no
    /// message failed meanwhile. Returns the duplicates.
    pub async fn drain(&self, markers: &[String], what: &str) -> usize {
        let deadline = Instant::now() + Duration::from_secs(40);
        loop {
            let got = self.delivered_markers();
            let missing: Vec<&String> = markers.iter().filter(|m| !got.contains_key(*m)).collect();
            let failed = self.spool_in(EntryState::Failed);
            assert_eq!(failed, 0, "{what}: a transient fault failed mail");
            if missing.is_empty() && self.relay.spool.list().expect("list").is_empty() {
                return markers.iter().map(|m| got[m] - 1).sum();
            }
            assert!(
                Instant::now() < deadline,
                "{what}: not delivered: {missing:?}; spool {:?}",
                self.relay.spool.list().expect("list")
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Messages of the spool in `state`.
    pub fn spool_in(&self, state: EntryState) -> usize {
        self.relay
            .spool
            .list()
            .expect("list")
            .iter()
            .filter(|e| e.state == state)
            .count()
    }

    /// The delivery state the deliverer recorded for `id` (attempts, last reply), if any.
    pub fn delivery_state(&self, id: &str) -> Option<DeliveryState> {
        self.relay.spool.read_state(id).expect("delivery state")
    }

    /// The state of the mailbox as the running deliverer reports it.
    pub fn status(&self) -> MailboxState {
        self.delivery.status().state
    }

    /// Waits (bounded: 20 s) until the mailbox is held; returns why and the reply.
    pub async fn wait_held(&self) -> (HoldCause, String) {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let state = self.status();
            if let MailboxState::Held { cause, reply, .. } = state {
                return (cause, reply);
            }
            assert!(
                Instant::now() < deadline,
                "delivery never held: {:?}",
                self.delivery.status()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
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

    /// Stops the deliverer and its token refresher (the listener keeps accepting and
    /// spooling) and waits (bounded) for them to finish.
    pub async fn stop_deliverer(&mut self) {
        if !self.running {
            return;
        }
        self.running = false;
        self.deliverer_stop.cancel();
        let _ = tokio::time::timeout(Duration::from_secs(30), &mut self.deliverer).await;
        if let Some(refresher) = self.refresher.take() {
            let _ = tokio::time::timeout(Duration::from_secs(30), refresher).await;
        }
    }

    /// Starts a new deliverer (and refresher) on the same spool, with this relay's tuning and
    /// the upstream target changed by `change`. The listener still announces new mail to the
    /// first deliverer; this one finds the spool's messages when it starts.
    pub fn start_deliverer(&mut self, change: impl FnOnce(&mut UpstreamTarget)) {
        assert!(!self.running, "stop_deliverer first");
        let stop = self.relay.shutdown.child_token();
        let (tokens, refresher) = TokenProvider::start(&self.config, stop.clone()).expect("tokens");
        let (handle, deliverer) = tuned_deliverer(
            &self.config,
            &self.relay.spool,
            &self.tuning,
            change,
            tokens.clone(),
            &self.metrics,
            &stop,
        );
        self.delivery = handle;
        self.deliverer = deliverer;
        self.tokens = tokens;
        self.refresher = Some(refresher);
        self.deliverer_stop = stop;
        self.running = true;
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
    let (sim, sim_dir, mut config, dir) = prepare(relay_toml, sim_config).await;
    customize(&mut config, &sim);
    let (spool, _) = Spool::open(&config.queue.dir).expect("spool");
    let shutdown = CancellationToken::new();
    let deliverer_stop = shutdown.child_token();
    let metrics = Arc::new(smtp_oauth_relay::metrics::Metrics::default());
    let running = start_delivery(
        &config,
        &(Arc::new(spool.clone()) as Arc<dyn Store>),
        &metrics,
        &deliverer_stop,
        &Default::default(),
    )
    .expect("delivery starts")
    .expect("oauth configured");
    let relay = listen(&config, spool, &running.metrics, shutdown, dir).await;
    DeliveringRelay {
        relay,
        sim,
        delivery: running.handle,
        tokens: running.tokens,
        metrics,
        deliverer: running.deliverer,
        config,
        tuning: Tuning::default(),
        deliverer_stop,
        refresher: Some(running.refresher),
        running: true,
        _sim_dir: sim_dir,
    }
}

/// Listener + simulator + a deliverer built here: `tuning` applied, the upstream target changed
/// by `target`, and `sim_setup` run on the simulator before anything connects to it (faults the
/// very first token request must meet).
pub async fn start_tuned(
    relay_toml: &str,
    sim_config: SimConfig,
    sim_setup: impl FnOnce(&Simulator),
    tuning: Tuning,
    target: impl FnOnce(&mut UpstreamTarget),
) -> DeliveringRelay {
    let (sim, sim_dir, config, dir) = prepare(relay_toml, sim_config).await;
    sim_setup(&sim);
    let (spool, _) = Spool::open(&config.queue.dir).expect("spool");
    let shutdown = CancellationToken::new();
    let deliverer_stop = shutdown.child_token();
    let metrics = Arc::new(smtp_oauth_relay::metrics::Metrics::default());
    let (tokens, refresher) =
        TokenProvider::start(&config, deliverer_stop.clone()).expect("tokens");
    let (handle, deliverer) = tuned_deliverer(
        &config,
        &spool,
        &tuning,
        target,
        tokens.clone(),
        &metrics,
        &deliverer_stop,
    );
    let relay = listen(&config, spool, &metrics, shutdown, dir).await;
    DeliveringRelay {
        relay,
        sim,
        delivery: handle,
        tokens,
        metrics,
        deliverer,
        config,
        tuning,
        deliverer_stop,
        refresher: Some(refresher),
        running: true,
        _sim_dir: sim_dir,
    }
}

/// The simulator and a config pointing at it, with a temporary spool.
async fn prepare(
    relay_toml: &str,
    sim_config: SimConfig,
) -> (Simulator, tempfile::TempDir, Config, tempfile::TempDir) {
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
    (sim, sim_dir, config, dir)
}

async fn listen(
    config: &Config,
    spool: Spool,
    metrics: &Arc<smtp_oauth_relay::metrics::Metrics>,
    shutdown: CancellationToken,
    dir: tempfile::TempDir,
) -> Relay {
    let inbound = InboundSettings::from_config(config).expect("settings");
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let server = Server::new(inbound, Arc::new(spool.clone()), metrics.clone());
    let handle = tokio::spawn(server.run(vec![listener], shutdown.clone()));
    Relay {
        addr,
        spool,
        shutdown,
        handle,
        _dir: dir,
    }
}

/// The deliverer as `daemon::start_delivery` builds it, with `tuning` and `change` applied.
fn tuned_deliverer(
    config: &Config,
    spool: &Spool,
    tuning: &Tuning,
    change: impl FnOnce(&mut UpstreamTarget),
    tokens: TokenProvider,
    metrics: &Arc<smtp_oauth_relay::metrics::Metrics>,
    stop: &CancellationToken,
) -> (DeliveryHandle, tokio::task::JoinHandle<()>) {
    let (settings, transport): (DeliverySettings, Arc<dyn Transport>) =
        if config.upstream.transport == TransportKind::Graph {
            let mut graph = GraphSettings::from_config(config).expect("graph settings");
            if let Some(t) = tuning.graph_request_timeout {
                graph.request_timeout = t;
            }
            if let Some(url) = &tuning.graph_url {
                graph.graph_url = url.clone();
            }
            let transport = GraphTransport::new(graph, Arc::new(tokens), metrics.clone())
                .expect("graph transport");
            (
                DeliverySettings::from_config(config, "graph"),
                Arc::new(transport),
            )
        } else {
            let mut target = upstream_target(config).expect("target");
            if let Some(t) = &tuning.timeouts {
                target.timeouts = t.clone();
            }
            change(&mut target);
            let settings = DeliverySettings::from_config(config, &target.server_name);
            let mut smtp = SmtpSettings::from_config(config);
            if let Some(idle) = tuning.session_max_idle {
                smtp.session_max_idle = idle;
            }
            let transport = SmtpTransport::new(target, smtp, Arc::new(tokens), metrics.clone());
            (settings, Arc::new(transport))
        };
    Deliverer::start_fixed(
        Arc::new(spool.clone()),
        settings,
        transport,
        metrics.clone(),
        stop.clone(),
        Default::default(),
    )
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
