//! Entra ID + Exchange Online simulator (issue 3; spec: reference `exchange-online-protocol.md` §1, §2, §3, §7).
//!
//! Two loopback endpoints on ephemeral ports: HTTP (the OAuth2 token endpoint, and Microsoft Graph `sendMail`
//! beside it) and Exchange Online client submission (SMTP with STARTTLS and XOAUTH2). Accepted messages land in
//! a directory, whichever way they came. Every switch and fault can be
//! flipped at runtime through [`Control`]. This module shares no code with the relay's upstream side on purpose:
//! it is the independent party the delivery code is tested against.
//!
//! ```no_run
//! # async fn demo() -> Result<(), smtp_oauth_relay::sim::SimError> {
//! use smtp_oauth_relay::sim::{SimConfig, Simulator};
//! let dir = std::env::temp_dir().join("sim-demo");
//! let sim = Simulator::start(SimConfig::default(), &dir).await?;
//! sim.control().set_smtp_auth_disabled(true);
//! println!("{}", sim.relay_config_fragment());
//! sim.shutdown().await;
//! # Ok(()) }
//! ```

mod config;
mod control;
mod graph;
mod graph_large;
mod keys;
mod mailbox;
mod smtp;
mod token;
mod util;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

pub use config::{
    ClientConfig, DEFAULT_CLIENT_ID, DEFAULT_CLIENT_SECRET, DEFAULT_MAILBOX, DEFAULT_TENANT_ID,
    EXCHANGE_RESOURCE, GRAPH_RESOURCE, GraphConfig, MAIL_READ_WRITE_ROLE, MAIL_SEND_ROLE,
    MailboxConfig, RateMode, SEND_AS_APP_ROLE, SecretConfig, SendAsReply, SimConfig, SmtpConfig,
};
pub use control::{Control, GraphFault, SmtpFault, SmtpStage, TokenFault};
pub use mailbox::{Envelope, StoredMessage, list_dir};

/// Scope the relay asks for.
pub const EXCHANGE_SCOPE: &str = "https://outlook.office365.com/.default";

/// Everything that can go wrong starting or running the simulator.
#[derive(Debug, thiserror::Error)]
pub enum SimError {
    #[error("simulator config: {0}")]
    Config(String),
    #[error("simulator I/O: {0}: {1}")]
    Io(String, #[source] std::io::Error),
    #[error("simulator crypto: {0}")]
    Crypto(String),
}

/// A running simulator. Dropping it stops both endpoints; `shutdown` also waits for them.
pub struct Simulator {
    control: Control,
    token_addr: SocketAddr,
    smtp_addr: SocketAddr,
    ca_file: PathBuf,
    mailbox: Arc<mailbox::Mailbox>,
    state_dir: PathBuf,
    stop: CancellationToken,
    tasks: Vec<JoinHandle<()>>,
}

impl Simulator {
    /// Generates keys and the test CA under `state_dir`, binds 127.0.0.1:0 twice and starts serving.
    pub async fn start(config: SimConfig, state_dir: &Path) -> Result<Simulator, SimError> {
        config.validate()?;
        std::fs::create_dir_all(state_dir)
            .map_err(|e| SimError::Io(format!("create {}", state_dir.display()), e))?;
        // Key generation (RSA for tokens) is CPU work; keep it off the async workers.
        let dir = state_dir.to_path_buf();
        let host = config.smtp.host_name.clone();
        let (tls, signing_key) = tokio::task::spawn_blocking(move || -> Result<_, SimError> {
            Ok((keys::make_tls(&dir, &host)?, keys::make_signing_key()?))
        })
        .await
        .map_err(|e| SimError::Crypto(format!("key generation task: {e}")))??;
        let mailbox = Arc::new(mailbox::Mailbox::open(&state_dir.join("mailbox"))?);

        let http = bind().await?;
        let token_addr = local_addr(&http)?;
        let shared = Arc::new(control::Shared::new(
            config,
            signing_key,
            format!("http://{token_addr}"),
        )?);
        let smtp_listener = bind().await?;
        let smtp_addr = local_addr(&smtp_listener)?;

        let stop = CancellationToken::new();
        let app =
            token::router(shared.clone()).merge(graph::router(shared.clone(), mailbox.clone()));
        let http_stop = stop.clone();
        let http_task = tokio::spawn(async move {
            let served = axum::serve(http, app)
                .with_graceful_shutdown(http_stop.cancelled_owned())
                .await;
            if let Err(e) = served {
                tracing::warn!(error = %e, "simulator token endpoint stopped");
            }
        });
        let ctx = Arc::new(smtp::SmtpCtx {
            shared: shared.clone(),
            tls: tokio_rustls::TlsAcceptor::from(tls.server_config),
            mailbox: mailbox.clone(),
        });
        let smtp_task = tokio::spawn(smtp::serve(smtp_listener, ctx, stop.clone()));

        Ok(Simulator {
            control: Control { shared },
            token_addr,
            smtp_addr,
            ca_file: tls.ca_file,
            mailbox,
            state_dir: state_dir.to_path_buf(),
            stop,
            tasks: vec![http_task, smtp_task],
        })
    }

    /// `http://127.0.0.1:PORT` (authority of the token endpoint).
    pub fn token_base_url(&self) -> String {
        format!("http://{}", self.token_addr)
    }

    /// Full token URL for the configured tenant: `http://127.0.0.1:PORT/{tenant}/oauth2/v2.0/token`.
    pub fn token_url(&self) -> String {
        format!(
            "{}/{}/oauth2/v2.0/token",
            self.token_base_url(),
            self.control.config().tenant_id
        )
    }

    /// The Microsoft Graph root (`upstream.graph_url`): `http://127.0.0.1:PORT`, beside the token endpoint.
    pub fn graph_url(&self) -> String {
        self.token_base_url()
    }

    pub fn smtp_addr(&self) -> SocketAddr {
        self.smtp_addr
    }

    /// PEM of the CA that signed the STARTTLS certificate.
    pub fn ca_file(&self) -> &Path {
        &self.ca_file
    }

    /// Where accepted messages are stored (`<id>.eml` + `<id>.json`).
    pub fn mailbox_dir(&self) -> &Path {
        self.mailbox.dir()
    }

    pub fn state_dir(&self) -> &Path {
        &self.state_dir
    }

    /// A snapshot of the live configuration.
    pub fn config(&self) -> SimConfig {
        self.control.config()
    }

    pub fn control(&self) -> &Control {
        &self.control
    }

    /// Accepted messages, in order of acceptance.
    pub fn messages(&self) -> Result<Vec<StoredMessage>, SimError> {
        self.mailbox.list()
    }

    /// A `relay.toml` fragment that points the relay at this simulator (first client, first mailbox).
    pub fn relay_config_fragment(&self) -> String {
        let cfg = self.control.config();
        let mailbox = cfg
            .mailboxes
            .first()
            .map(|m| m.address.clone())
            .unwrap_or_else(|| DEFAULT_MAILBOX.into());
        let client = cfg.primary_client().cloned().unwrap_or_default();
        let secret = client
            .secrets
            .iter()
            .find(|s| !s.expired)
            .or(client.secrets.first());
        let secret_line = match secret {
            Some(s) => format!("client_secret = {}", toml_str(&s.value)),
            None => "# client_secret: this client has only certificates; set certificate_file + private_key_file"
                .to_string(),
        };
        format!(
            "# smtp-oauth-relay simulator: Entra ID at {token_base}, Exchange Online at {smtp}\n\
             [upstream]\n\
             host = \"127.0.0.1\"\n\
             port = {port}\n\
             tls = \"starttls\"\n\
             ca_file = {ca}\n\
             tls_server_name = {server_name}\n\
             mail_account = {mailbox}\n\
             from = {mailbox}\n\
             \n\
             [oauth]\n\
             tenant_id = {tenant}\n\
             client_id = {client_id}\n\
             {secret_line}\n\
             token_url = {token_url}\n\
             scope = {scope}\n",
            token_base = self.token_base_url(),
            smtp = self.smtp_addr,
            port = self.smtp_addr.port(),
            ca = toml_str(&self.ca_file.to_string_lossy()),
            server_name = toml_str(&cfg.smtp.host_name),
            mailbox = toml_str(&mailbox),
            tenant = toml_str(&cfg.tenant_id),
            client_id = toml_str(&client.client_id),
            token_url = toml_str(&self.token_url()),
            scope = toml_str(EXCHANGE_SCOPE),
        )
    }

    /// Stops both endpoints and waits for them; open SMTP sessions are cut.
    pub async fn shutdown(mut self) {
        self.stop.cancel();
        for task in self.tasks.drain(..) {
            let _ = task.await;
        }
    }
}

impl Drop for Simulator {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

async fn bind() -> Result<TcpListener, SimError> {
    TcpListener::bind("127.0.0.1:0")
        .await
        .map_err(|e| SimError::Io("bind 127.0.0.1:0".into(), e))
}

fn local_addr(l: &TcpListener) -> Result<SocketAddr, SimError> {
    l.local_addr()
        .map_err(|e| SimError::Io("local_addr".into(), e))
}

/// A TOML basic string.
fn toml_str(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if c.is_control() => out.push_str(&format!("\\u{:04X}", c as u32)),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

/// `smtp-oauth-relay simulate [--config FILE]`: start, print where everything is, run until Ctrl-C or SIGTERM.
/// State (CA, mailbox) goes to `state_dir` from the config, else `$TMPDIR/smtp-oauth-relay-sim-<pid>`.
pub async fn run_standalone(config_path: Option<&Path>) -> Result<(), SimError> {
    let config = match config_path {
        Some(p) => SimConfig::from_toml_file(p)?,
        None => SimConfig::default(),
    };
    let state_dir = config.state_dir.clone().unwrap_or_else(|| {
        std::env::temp_dir().join(format!("smtp-oauth-relay-sim-{}", std::process::id()))
    });
    let sim = Simulator::start(config, &state_dir).await?;
    println!("Entra ID token URL:   {}", sim.token_url());
    println!(
        "Exchange SMTP:        {} (STARTTLS, XOAUTH2)",
        sim.smtp_addr()
    );
    println!("SMTP port:            {}", sim.smtp_addr().port());
    println!(
        "Graph sendMail root:  {} (upstream.graph_url)",
        sim.graph_url()
    );
    println!("CA file:              {}", sim.ca_file().display());
    println!("Mailbox directory:    {}", sim.mailbox_dir().display());
    println!();
    println!("# --- relay.toml fragment ---");
    print!("{}", sim.relay_config_fragment());
    println!("# --- end ---");
    wait_for_signal().await?;
    sim.shutdown().await;
    Ok(())
}

async fn wait_for_signal() -> Result<(), SimError> {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .map_err(|e| SimError::Io("install SIGTERM handler".into(), e))?;
    tokio::select! {
        r = tokio::signal::ctrl_c() => r.map_err(|e| SimError::Io("wait for Ctrl-C".into(), e)),
        _ = term.recv() => Ok(()),
    }
}
