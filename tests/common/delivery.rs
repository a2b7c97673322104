//! The relay with its deliverer, wired to the in-process simulator.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, SystemTime};

use smtp_oauth_relay::config::{Config, Rate, UpstreamTls};
use smtp_oauth_relay::deliver::upstream::{Timeouts, UpstreamTarget, tls_connector};
use smtp_oauth_relay::deliver::{
    Deliverer, DeliveryHandle, DeliverySettings, Token, TokenFailure, TokenFuture, TokenSource,
};
use smtp_oauth_relay::inbound::{InboundSettings, Server};
use smtp_oauth_relay::sim::{SimConfig, Simulator};
use smtp_oauth_relay::spool::Spool;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use super::Relay;

pub const MAILBOX: &str = "relay@contoso.example";

/// Fetches a token from the simulator with the client secret, once per `token()` after a
/// `force_refresh` (a stand-in until tests use the real refresher).
pub struct SimTokens {
    url: String,
    client_id: String,
    secret: String,
    cached: tokio::sync::Mutex<Option<Token>>,
    stale: AtomicBool,
}

impl SimTokens {
    pub fn new(sim: &Simulator) -> SimTokens {
        let cfg = sim.config();
        SimTokens {
            url: sim.token_url(),
            client_id: cfg.clients[0].client_id.clone(),
            secret: cfg.clients[0].secrets[0].value.clone(),
            cached: tokio::sync::Mutex::new(None),
            stale: AtomicBool::new(false),
        }
    }
}

impl TokenSource for SimTokens {
    fn token(&self) -> TokenFuture<'_> {
        Box::pin(async move {
            let mut cached = self.cached.lock().await;
            if let Some(t) = cached.as_ref()
                && !self.stale.load(Ordering::SeqCst)
                && t.expires_at > SystemTime::now()
            {
                return Ok(t.clone());
            }
            let resp = reqwest::Client::new()
                .post(&self.url)
                .form(&[
                    ("grant_type", "client_credentials"),
                    ("client_id", self.client_id.as_str()),
                    ("client_secret", self.secret.as_str()),
                    ("scope", "https://outlook.office365.com/.default"),
                ])
                .send()
                .await
                .map_err(|e| TokenFailure {
                    permanent: false,
                    message: e.to_string(),
                })?;
            let status = resp.status();
            let body: serde_json::Value = resp.json().await.map_err(|e| TokenFailure {
                permanent: false,
                message: e.to_string(),
            })?;
            if !status.is_success() {
                return Err(TokenFailure {
                    permanent: status.is_client_error() && status.as_u16() != 429,
                    message: body["error_description"].as_str().unwrap_or("").to_string(),
                });
            }
            let token = Token {
                value: body["access_token"].as_str().unwrap_or("").to_string(),
                expires_at: SystemTime::now()
                    + Duration::from_secs(body["expires_in"].as_u64().unwrap_or(3599)),
            };
            self.stale.store(false, Ordering::SeqCst);
            *cached = Some(token.clone());
            Ok(token)
        })
    }

    fn refresh(&self) -> TokenFuture<'_> {
        self.stale.store(true, Ordering::SeqCst);
        self.token()
    }
}

pub struct DeliveringRelay {
    pub relay: Relay,
    pub sim: Simulator,
    pub delivery: DeliveryHandle,
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

/// Listener + deliverer + simulator. `relay_toml` adds relay settings; fast retries by default.
pub async fn start_delivering(relay_toml: &str, sim_config: SimConfig) -> DeliveringRelay {
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    let sim_dir = tempfile::tempdir().expect("tempdir");
    let sim = Simulator::start(sim_config, sim_dir.path())
        .await
        .expect("simulator");
    let mut config = Config::from_toml_str(relay_toml).expect("relay config");
    let dir = tempfile::tempdir().expect("tempdir");
    config.queue.dir = dir.path().join("spool");
    config.queue.min_free_space = smtp_oauth_relay::config::ByteSize(1);
    let (spool, _) = Spool::open(&config.queue.dir).expect("spool");
    let target = UpstreamTarget {
        address: sim.smtp_addr().to_string(),
        server_name: "smtp.office365.com".into(),
        tls: UpstreamTls::Starttls,
        connector: tls_connector(Some(sim.ca_file())).expect("connector"),
        helo: "relay.test".into(),
        timeouts: Timeouts {
            connect: Duration::from_secs(5),
            command: Duration::from_secs(5),
            data_end: Duration::from_secs(10),
        },
    };
    let settings = DeliverySettings {
        mailbox: MAILBOX.into(),
        from: MAILBOX.into(),
        rewrite_from: config.upstream.rewrite_from,
        connections: config.upstream.connections,
        rate: Rate {
            messages: config.upstream.rate.messages.max(1000),
            per: Duration::from_secs(1),
        },
        retry_min: config.queue.retry_min,
        retry_max: config.queue.retry_max,
        max_age: config.queue.max_age,
        session_max_age: Duration::from_secs(600),
        session_max_idle: Duration::from_secs(30),
        refresh_before: Duration::from_secs(600),
    };
    let shutdown = CancellationToken::new();
    let tokens = Arc::new(SimTokens::new(&sim));
    let (delivery, deliverer) =
        Deliverer::start(spool.clone(), target, settings, tokens, shutdown.clone());
    let inbound = InboundSettings::from_config(&config).expect("settings");
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let server = Server::new(inbound, spool.clone(), Some(delivery.clone()));
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
        delivery,
        deliverer,
        _sim_dir: sim_dir,
    }
}
