//! Scenario 2 of the fault campaign: upstream faults, via the in-process simulator.
//!
//! The relay (listener + deliverer + token refresher, wired like `serve`) delivers to the
//! simulator; the deliverer is built here with short upstream timeouts (connect 1 s, command
//! 1 s, final reply 2 s) so stalls longer than the timeouts are exercised in seconds, and with a
//! 50 ms session idle limit so every message opens a fresh session (AUTH is re-checked).
//!
//! For each fault: every message acknowledged is delivered once the fault clears, none ends up
//! in `failed/`, held mail resumes after the fix; duplicates are counted and reported.

mod fault_support;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use smtp_oauth_relay::config::Config;
use smtp_oauth_relay::daemon::point_at_simulator;
use smtp_oauth_relay::deliver::classify::HoldCause;
use smtp_oauth_relay::deliver::upstream::{Timeouts, UpstreamTarget, upstream_target};
use smtp_oauth_relay::deliver::{Deliverer, DeliveryHandle, DeliverySettings, MailboxState};
use smtp_oauth_relay::inbound::{InboundSettings, Server};
use smtp_oauth_relay::oauth::TokenProvider;
use smtp_oauth_relay::sim::{SimConfig, Simulator, SmtpFault, SmtpStage, TokenFault};
use smtp_oauth_relay::spool::{EntryState, Spool};
use smtp_oauth_relay::transport::smtp::{SmtpSettings, SmtpTransport};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;

const RELAY: &str = "[queue]\nretry_min = \"200ms\"\nretry_max = \"1s\"\n\
                     [upstream]\nrate = \"1000/s\"\nconnections = 3\n";

struct Running {
    handle: DeliveryHandle,
    stop: CancellationToken,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

struct Harness {
    sim: Simulator,
    config: Config,
    spool: Spool,
    addr: SocketAddr,
    inbound_stop: CancellationToken,
    deliverer: Option<Running>,
    _dirs: (tempfile::TempDir, tempfile::TempDir),
}

fn short_timeouts() -> Timeouts {
    Timeouts {
        connect: Duration::from_secs(1),
        command: Duration::from_secs(1),
        data_end: Duration::from_secs(2),
    }
}

impl Harness {
    /// Simulator + spool + a first deliverer (target changed by `target`) + the listener.
    async fn start(
        sim_config: SimConfig,
        sim_setup: impl FnOnce(&Simulator),
        target: impl FnOnce(&mut UpstreamTarget),
    ) -> Harness {
        let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
        let sim_dir = tempfile::tempdir().expect("tempdir");
        let sim = Simulator::start(sim_config, sim_dir.path())
            .await
            .expect("simulator");
        // Stalls end well after the relay's timeouts.
        sim.control().set_stall_duration(Duration::from_secs(4));
        sim_setup(&sim);
        let mut config = Config::from_toml_str(RELAY).expect("config");
        let dir = tempfile::tempdir().expect("tempdir");
        config.queue.dir = dir.path().join("spool");
        config.queue.min_free_space = smtp_oauth_relay::config::ByteSize(1);
        point_at_simulator(&mut config, &sim).expect("point");
        let (spool, _) = Spool::open(&config.queue.dir).expect("spool");
        let mut h = Harness {
            sim,
            config,
            spool,
            addr: "127.0.0.1:0".parse().unwrap(),
            inbound_stop: CancellationToken::new(),
            deliverer: None,
            _dirs: (sim_dir, dir),
        };
        h.start_deliverer(target);
        let inbound = InboundSettings::from_config(&h.config).expect("settings");
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        h.addr = listener.local_addr().unwrap();
        let handle = h.deliverer.as_ref().map(|d| d.handle.clone());
        tokio::spawn(
            Server::new(inbound, h.spool.clone(), handle, Default::default())
                .run(vec![listener], h.inbound_stop.clone()),
        );
        h
    }

    fn start_deliverer(&mut self, change: impl FnOnce(&mut UpstreamTarget)) {
        let stop = CancellationToken::new();
        let (tokens, refresher) = TokenProvider::start(&self.config, stop.clone()).expect("tokens");
        let mut target = upstream_target(&self.config).expect("target");
        target.timeouts = short_timeouts();
        change(&mut target);
        let mailbox = self.config.upstream.mail_account.clone().unwrap();
        let settings = DeliverySettings {
            from: mailbox.clone(),
            mailbox,
            rewrite_from: self.config.upstream.rewrite_from,
            connections: self.config.upstream.connections,
            rate: self.config.upstream.rate,
            retry_min: self.config.queue.retry_min,
            retry_max: self.config.queue.retry_max,
            max_age: self.config.queue.max_age,
            notify: None,
            reporting_host: "relay.test".into(),
            upstream_host: "smtp.office365.com".into(),
        };
        let transport = SmtpTransport::new(
            target,
            SmtpSettings {
                mailbox: settings.mailbox.clone(),
                session_max_age: Duration::from_secs(600),
                session_max_idle: Duration::from_millis(50),
                refresh_before: self.config.oauth.refresh_before,
            },
            Arc::new(tokens),
            Default::default(),
        );
        let (handle, deliverer) = Deliverer::start(
            self.spool.clone(),
            settings,
            Arc::new(transport),
            Default::default(),
            stop.clone(),
        );
        self.deliverer = Some(Running {
            handle,
            stop,
            tasks: vec![deliverer, refresher],
        });
    }

    async fn stop_deliverer(&mut self) {
        if let Some(d) = self.deliverer.take() {
            d.stop.cancel();
            for t in d.tasks {
                let _ = tokio::time::timeout(Duration::from_secs(30), t).await;
            }
        }
    }

    fn status(&self) -> MailboxState {
        self.deliverer.as_ref().unwrap().handle.status().state
    }

    /// Sends `n` tracked messages on one connection; all must be acknowledged.
    async fn send(&self, prefix: &str, n: usize) -> Vec<String> {
        let stream = TcpStream::connect(self.addr).await.expect("connect");
        let mut c = BufReader::new(stream);
        let mut markers = Vec::new();
        expect(&mut c, None, "220").await;
        expect(&mut c, Some("EHLO client.test"), "250").await;
        for i in 0..n {
            let marker = format!("{prefix}-{i}");
            expect(&mut c, Some("MAIL FROM:<app@legacy.test>"), "250").await;
            expect(&mut c, Some("RCPT TO:<user@example.org>"), "250").await;
            expect(&mut c, Some("DATA"), "354").await;
            let msg = fault_support::message(&marker, 2_000 + 997 * i);
            c.get_mut()
                .write_all(&fault_support::dot_stuff(&msg))
                .await
                .unwrap();
            expect(&mut c, Some("."), "250 2.0.0 queued as").await;
            markers.push(marker);
        }
        expect(&mut c, Some("QUIT"), "221").await;
        markers
    }

    /// marker → copies delivered.
    fn delivered(&self) -> HashMap<String, usize> {
        let mut m = HashMap::new();
        for msg in self.sim.messages().expect("mailbox") {
            if let Some(marker) = fault_support::marker_of(&msg.data) {
                *m.entry(marker).or_default() += 1;
            }
        }
        m
    }

    /// Waits (bounded) until every marker is delivered and the spool is empty; asserts that no
    /// message failed. Returns the duplicates.
    async fn drain(&self, markers: &[String], what: &str) -> usize {
        let deadline = Instant::now() + Duration::from_secs(40);
        loop {
            let got = self.delivered();
            let missing: Vec<&String> = markers.iter().filter(|m| !got.contains_key(*m)).collect();
            let failed = self.spool_in(EntryState::Failed);
            assert_eq!(failed, 0, "{what}: a transient fault failed mail");
            if missing.is_empty() && self.spool.list().expect("list").is_empty() {
                return markers.iter().map(|m| got[m] - 1).sum();
            }
            assert!(
                Instant::now() < deadline,
                "{what}: not delivered: {missing:?}; spool {:?}",
                self.spool.list().expect("list")
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    fn spool_in(&self, state: EntryState) -> usize {
        self.spool
            .list()
            .expect("list")
            .iter()
            .filter(|e| e.state == state)
            .count()
    }
}

async fn expect(c: &mut BufReader<TcpStream>, cmd: Option<&str>, prefix: &str) -> String {
    if let Some(cmd) = cmd {
        c.get_mut()
            .write_all(format!("{cmd}\r\n").as_bytes())
            .await
            .unwrap();
    }
    let mut all = String::new();
    loop {
        let mut line = String::new();
        let n = tokio::time::timeout(Duration::from_secs(20), c.read_line(&mut line))
            .await
            .expect("reply in time")
            .expect("read");
        assert!(n > 0, "{cmd:?}: connection closed");
        all.push_str(&line);
        if line.len() < 4 || line.as_bytes()[3] == b' ' {
            break;
        }
    }
    assert!(
        all.starts_with(prefix),
        "{cmd:?}: expected {prefix}, got {all:?}"
    );
    all
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transient_replies_and_drops_at_every_step_lose_nothing() {
    let h = Harness::start(SimConfig::default(), |_| {}, |_| {}).await;
    let c = h.sim.control();
    for stage in [
        SmtpStage::Greeting,
        SmtpStage::Ehlo,
        SmtpStage::StartTls,
        SmtpStage::Auth,
        SmtpStage::Mail,
        SmtpStage::Rcpt,
        SmtpStage::Data,
        SmtpStage::DataEnd,
    ] {
        c.script_smtp_fault(stage, SmtpFault::Reply421, 1);
    }
    c.script_smtp_fault(SmtpStage::Mail, SmtpFault::Reply451, 1);
    c.script_smtp_fault(SmtpStage::Rcpt, SmtpFault::Reply451, 1);
    c.script_smtp_fault(SmtpStage::DataEnd, SmtpFault::Reply430, 1);
    // Throttling: 432 4.3.2 at the end of DATA.
    c.script_smtp_fault(
        SmtpStage::DataEnd,
        SmtpFault::Reply {
            code: 432,
            text: "4.3.2 STOREDRV.ClientSubmit; sender thread limit exceeded".into(),
        },
        2,
    );
    // Dropped before the final dot (not kept) and after it (kept, reply lost: a duplicate).
    c.script_smtp_fault(SmtpStage::DataBody, SmtpFault::Drop, 1);
    c.script_smtp_fault(SmtpStage::DataEnd, SmtpFault::Drop, 1);
    c.script_smtp_fault(SmtpStage::DataEnd, SmtpFault::DropAfterAccept, 1);
    let markers = h.send("steps", 12).await;
    let dups = h.drain(&markers, "421/451/432/drops").await;
    fault_support::report(&format!(
        "upstream/421-451-432-drops acked={} delivered={} lost=0 duplicates={dups} failed=0",
        markers.len(),
        markers.len()
    ));
    // DropAfterAccept: Exchange kept a copy whose 250 never arrived.
    assert!(dups <= 1, "more duplicates than lost 250s: {dups}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stalls_longer_than_the_timeouts_are_retried() {
    let h = Harness::start(SimConfig::default(), |_| {}, |_| {}).await;
    let c = h.sim.control();
    for stage in [
        SmtpStage::Greeting,
        SmtpStage::Ehlo,
        SmtpStage::Auth,
        SmtpStage::Mail,
        SmtpStage::DataBody,
        SmtpStage::DataEnd,
    ] {
        c.script_smtp_fault(stage, SmtpFault::Stall, 1);
    }
    let markers = h.send("stall", 5).await;
    let dups = h.drain(&markers, "stalls").await;
    fault_support::report(&format!(
        "upstream/stalls(6 stages, 4s > timeouts 1s/2s) acked={} delivered={} lost=0 duplicates={dups} failed=0",
        markers.len(),
        markers.len()
    ));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn smtp_auth_revoked_mid_run_holds_then_resumes() {
    let h = Harness::start(SimConfig::default(), |_| {}, |_| {}).await;
    let mut markers = h.send("before", 3).await;
    h.drain(&markers, "before the revocation").await;
    h.sim.control().set_smtp_auth_disabled(true);
    markers.extend(h.send("revoked", 4).await);
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if let MailboxState::Held { cause, .. } = h.status() {
            assert_eq!(cause, HoldCause::SmtpAuthDisabled);
            break;
        }
        assert!(Instant::now() < deadline, "never held: {:?}", h.status());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Held, not failed: the messages wait in queue/.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(h.spool_in(EntryState::Failed), 0);
    assert_eq!(h.spool_in(EntryState::Queued), 4);
    h.sim.control().set_smtp_auth_disabled(false);
    let dups = h.drain(&markers, "after re-enabling SMTP AUTH").await;
    assert_eq!(h.status(), MailboxState::Running);
    fault_support::report(&format!(
        "upstream/535-5.7.139-mid-run acked={} delivered={} lost=0 duplicates={dups} failed=0 held_then_resumed=yes",
        markers.len(),
        markers.len()
    ));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn token_endpoint_errors_slowness_and_garbage_keep_mail_queued() {
    // Scripted before the first token request: the refresher meets all of them in turn.
    let setup = |sim: &Simulator| {
        let c = sim.control();
        // One of each: the refresher backs off 1 s, 2 s, 4 s between them (by design).
        c.script_token_fault(TokenFault::InternalServerError, 1);
        c.script_token_fault(
            TokenFault::TooManyRequests {
                retry_after_secs: 1,
            },
            1,
        );
        c.script_token_fault(TokenFault::MalformedJson, 1);
        c.script_token_fault(TokenFault::Slow(Duration::from_millis(1500)), 1);
    };
    let h = Harness::start(SimConfig::default(), setup, |_| {}).await;
    let c = h.sim.control();
    let markers = h.send("token", 5).await;
    let dups = h.drain(&markers, "token faults").await;
    fault_support::report(&format!(
        "upstream/token-500-429-garbage-slow acked={} delivered={} lost=0 duplicates={dups} failed=0 token_requests={}",
        markers.len(),
        markers.len(),
        c.token_requests()
    ));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_connections_and_tls_failures_keep_mail_until_fixed() {
    // Phase 1: nothing listens at the upstream address (connection refused).
    let closed = fault_support::free_port();
    let mut h = Harness::start(
        SimConfig::default(),
        |_| {},
        |t| t.address = format!("127.0.0.1:{closed}"),
    )
    .await;
    let markers = h.send("down", 6).await;
    tokio::time::sleep(Duration::from_millis(2500)).await;
    assert_eq!(h.spool_in(EntryState::Queued), 6, "refused: still queued");
    assert_eq!(h.spool_in(EntryState::Failed), 0);
    assert!(h.delivered().is_empty());
    h.stop_deliverer().await;

    // Phase 2: TLS handshake fails (a CA that did not sign the server's certificate).
    let other_ca = rcgen::generate_simple_self_signed(vec!["other.test".to_string()]).unwrap();
    let ca_path = h._dirs.1.path().join("wrong-ca.pem");
    std::fs::write(&ca_path, other_ca.cert.pem()).unwrap();
    let wrong = smtp_oauth_relay::deliver::upstream::tls_connector(Some(&ca_path)).unwrap();
    h.start_deliverer(|t| t.connector = wrong);
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if let MailboxState::Held { cause, .. } = h.status() {
            assert_eq!(cause, HoldCause::CertificateInvalid);
            break;
        }
        assert!(Instant::now() < deadline, "never held: {:?}", h.status());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(h.spool_in(EntryState::Failed), 0);
    assert!(h.delivered().is_empty());
    h.stop_deliverer().await;

    // Phase 3: fixed; everything drains.
    h.start_deliverer(|_| {});
    let dups = h.drain(&markers, "after the fix").await;
    fault_support::report(&format!(
        "upstream/refused-then-bad-tls-then-fixed acked={} delivered={} lost=0 duplicates={dups} failed=0",
        markers.len(),
        markers.len()
    ));
    h.inbound_stop.cancel();
}
