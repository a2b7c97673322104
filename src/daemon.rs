//! `serve`: opens the spool (running recovery), starts the token refresher and the deliverer
//! when a tenant is configured, binds the listener and runs until shutdown. With `--simulate`
//! the built-in simulator stands in for Entra ID and Exchange Online.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::admin::{self, AdminState};
use crate::config::{Config, Secret};
use crate::deliver::upstream::upstream_target;
use crate::deliver::{Deliverer, DeliveryHandle, DeliverySettings};
use crate::inbound::{InboundError, InboundSettings, Server};
use crate::metrics::Metrics;
use crate::oauth::{OAuthError, TokenProvider};
use crate::service;
use crate::sim::{SimConfig, SimError, Simulator};
use crate::spool::{Spool, SpoolError};
use crate::transport::smtp::{SmtpSettings, SmtpTransport};

#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    #[error(transparent)]
    Inbound(#[from] InboundError),
    #[error("spool {dir}: {source}")]
    Spool { dir: String, source: SpoolError },
    #[error("oauth: {0}")]
    OAuth(Box<OAuthError>),
    #[error("{0}")]
    UpstreamTls(String),
    #[error("simulator: {0}")]
    Simulator(#[from] SimError),
    #[error("admin.listen: cannot listen on {addr}: {source}")]
    Admin {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("cannot install the SIGHUP handler: {0}")]
    Signal(std::io::Error),
}

impl DaemonError {
    /// Problems the admin fixes in `relay.toml` (exit code 2) as opposed to runtime failures.
    pub fn is_config_error(&self) -> bool {
        match self {
            DaemonError::Inbound(InboundError::Tls(_) | InboundError::Auth(_)) => true,
            DaemonError::OAuth(e) => {
                matches!(**e, OAuthError::Config(_) | OAuthError::Credential(_))
            }
            DaemonError::UpstreamTls(_) => true,
            _ => false,
        }
    }
}

impl From<OAuthError> for DaemonError {
    fn from(e: OAuthError) -> Self {
        DaemonError::OAuth(Box::new(e))
    }
}

#[derive(Debug, Clone, Default)]
pub struct ServeOptions {
    /// Run the simulator in-process and deliver to it.
    pub simulate: bool,
    /// Handle SIGHUP by re-running `config::load` on this path (`Some(None)`: the usual lookup);
    /// `None` leaves SIGHUP alone.
    pub reload: Option<Option<PathBuf>>,
}

/// Runs the relay until `shutdown` is cancelled. Returns once sessions and deliveries drained.
pub async fn serve(
    config: &Config,
    options: ServeOptions,
    shutdown: CancellationToken,
) -> Result<(), DaemonError> {
    let mut config = config.clone();
    let simulator = if options.simulate {
        Some(start_simulator(&mut config).await?)
    } else {
        None
    };
    let settings = InboundSettings::from_config(&config)?;
    let (spool, _report) = Spool::open(&config.queue.dir).map_err(|source| DaemonError::Spool {
        dir: config.queue.dir.display().to_string(),
        source,
    })?;
    let metrics = Arc::new(Metrics::default());
    let delivery = start_delivery(&config, &spool, &metrics, &shutdown)?;
    let listeners = Server::bind(&config.smtp.listen).await?;
    for listener in &listeners {
        if let Ok(addr) = listener.local_addr() {
            tracing::info!(%addr, "accepting SMTP");
        }
    }
    // The configuration in effect; SIGHUP publishes reloads here (restart-only keys keep their
    // running values, see service::merge_reload).
    let (config_tx, config_rx) = watch::channel(Arc::new(config.clone()));
    if let Some(path) = options.reload {
        let reload = service::reload_on_sighup(path, config_tx, shutdown.clone())
            .map_err(DaemonError::Signal)?;
        tokio::spawn(reload);
    }
    let admin_state = AdminState::new(spool.clone(), config_rx.clone()).with_delivery(
        metrics.clone(),
        delivery.as_ref().map(|d| d.handle.clone()),
        delivery.as_ref().map(|d| d.tokens.clone()),
    );
    let admin_stop = CancellationToken::new();
    let admin_task = match config.admin.listen {
        Some(addr) => {
            let listener = admin::bind(addr)
                .await
                .map_err(|source| DaemonError::Admin { addr, source })?;
            tracing::info!(%addr, "admin endpoint: GET /readyz");
            let limits = admin::AdminLimits::from_config(&config);
            log_fd_budget(&config, &limits);
            let router = admin::router(admin_state.clone());
            Some(tokio::spawn(admin::serve_with(
                listener,
                router,
                limits,
                metrics.clone(),
                admin_stop.clone(),
            )))
        }
        None => None,
    };
    admin_state.accepting.store(true, Ordering::Release);
    // READY=1 only now: the listener is bound and spool recovery is done.
    service::ready(&format!("accepting SMTP on {:?}", config.smtp.listen));
    let accepting = admin_state.accepting.clone();
    let stop_notice = shutdown.clone();
    tokio::spawn(async move {
        stop_notice.cancelled().await;
        accepting.store(false, Ordering::Release);
        service::stopping("stopping: draining SMTP sessions");
    });
    let handle = delivery.as_ref().map(|d| d.handle.clone());
    let server = Server::new(settings, spool, handle, metrics).run(listeners, shutdown);
    // WATCHDOG=1 from the task that runs the server: a wedged server stops feeding it.
    match service::watchdog_interval() {
        Some(every) => tokio::select! {
            () = server => {}
            () = service::feed_watchdog(every) => {}
        },
        None => server.await,
    }
    if let Some(delivery) = delivery {
        let _ = delivery.deliverer.await;
        let _ = delivery.refresher.await;
    }
    admin_stop.cancel();
    if let Some(task) = admin_task {
        let _ = task.await;
    }
    if let Some(sim) = simulator {
        sim.shutdown().await;
    }
    tracing::info!("stopped");
    Ok(())
}

/// Says how many descriptors the admin endpoint may use, and warns when `RLIMIT_NOFILE` is too
/// low for it to reach `admin.max_connections` once SMTP's reserve is set aside.
fn log_fd_budget(config: &Config, limits: &admin::AdminLimits) {
    let Some(limit) = limits.fds.limit else {
        tracing::info!("file descriptors: no limit");
        return;
    };
    let open = crate::fds::open_now().unwrap_or(0);
    let ceiling = limits.fds.ceiling().unwrap_or(limit);
    let for_admin = ceiling.saturating_sub(open) / admin::FDS_PER_CONNECTION;
    tracing::info!(
        limit,
        open,
        reserved_for_smtp = limits.fds.reserve,
        admin_max_connections = limits.max_connections,
        "file descriptors: the admin endpoint never uses SMTP's reserve"
    );
    if for_admin < limits.max_connections as u64 {
        tracing::warn!(
            limit,
            reserved_for_smtp = limits.fds.reserve,
            "RLIMIT_NOFILE {limit} leaves the admin endpoint room for about {for_admin} \
             connections once {} are kept for smtp.max_connections = {} and \
             upstream.connections = {}: raise LimitNOFILE (or ulimit -n), or lower \
             smtp.max_connections",
            limits.fds.reserve,
            config.smtp.max_connections,
            config.upstream.connections
        );
    }
}

/// The delivery side of a running relay.
pub struct RunningDelivery {
    pub handle: DeliveryHandle,
    pub metrics: Arc<Metrics>,
    pub tokens: TokenProvider,
    pub deliverer: tokio::task::JoinHandle<()>,
    pub refresher: tokio::task::JoinHandle<()>,
}

/// Starts the token refresher and the deliverer, or returns `None` when no tenant is configured.
pub fn start_delivery(
    config: &Config,
    spool: &Spool,
    metrics: &Arc<Metrics>,
    shutdown: &CancellationToken,
) -> Result<Option<RunningDelivery>, DaemonError> {
    if !config.oauth.is_configured() {
        tracing::warn!(
            "upstream not configured ([oauth] is empty): mail is accepted and kept in the spool, \
             nothing is delivered until a tenant is configured"
        );
        return Ok(None);
    }
    let endpoints = crate::oauth::endpoints(config)?;
    let (tokens, refresher) = TokenProvider::start(config, shutdown.clone())?;
    let target = upstream_target(config).map_err(DaemonError::UpstreamTls)?;
    let settings = DeliverySettings::from_config(config, &target.server_name);
    tracing::info!(
        upstream = %target.address,
        tls_name = %target.server_name,
        mailbox = %settings.mailbox,
        token_url = %endpoints.token_url,
        connections = settings.connections,
        rate = %settings.rate,
        "delivering to Exchange Online"
    );
    let transport = SmtpTransport::new(
        target,
        SmtpSettings::from_config(config),
        Arc::new(tokens.clone()),
        metrics.clone(),
    );
    let (handle, deliverer) = Deliverer::start(
        spool.clone(),
        settings,
        Arc::new(transport),
        metrics.clone(),
        shutdown.clone(),
    );
    Ok(Some(RunningDelivery {
        handle,
        metrics: metrics.clone(),
        tokens,
        deliverer,
        refresher,
    }))
}

/// Starts the simulator beside the spool and points `config` at it.
async fn start_simulator(config: &mut Config) -> Result<Simulator, DaemonError> {
    let state_dir = match config.queue.dir.parent() {
        Some(parent) if !parent.as_os_str().is_empty() => parent.join("simulator"),
        _ => PathBuf::from("simulator"),
    };
    let sim = Simulator::start(SimConfig::default(), &state_dir).await?;
    point_at_simulator(config, &sim)?;
    tracing::info!(
        mailbox_dir = %sim.mailbox_dir().display(),
        token_url = %sim.token_url(),
        smtp = %sim.smtp_addr(),
        "simulator running: delivered mail appears in the mailbox folder"
    );
    eprintln!(
        "smtp-oauth-relay: simulating Microsoft 365; delivered messages appear in {}",
        sim.mailbox_dir().display()
    );
    Ok(sim)
}

/// Points the upstream and OAuth settings at a running simulator (its first client, with its
/// client secret, and its first mailbox).
pub fn point_at_simulator(config: &mut Config, sim: &Simulator) -> Result<(), DaemonError> {
    let sim_config = sim.config();
    let (client, mailbox) = match (sim_config.clients.first(), sim_config.mailboxes.first()) {
        (Some(c), Some(m)) => (c.clone(), m.address.clone()),
        _ => {
            return Err(DaemonError::Simulator(SimError::Config(
                "the simulator has no client or mailbox".into(),
            )));
        }
    };
    let up = &mut config.upstream;
    up.host = Some(sim.smtp_addr().ip().to_string());
    up.port = sim.smtp_addr().port();
    up.ca_file = Some(sim.ca_file().to_path_buf());
    up.tls_server_name = Some(sim_config.smtp.host_name.clone());
    up.mail_account = Some(mailbox.clone());
    up.from = Some(mailbox.clone());
    let oauth = &mut config.oauth;
    oauth.tenant_id = Some(sim_config.tenant_id.clone());
    oauth.client_id = Some(client.client_id.clone());
    oauth.client_secret = client.secrets.first().map(|s| Secret::new(s.value.clone()));
    oauth.client_secret_file = None;
    oauth.certificate_file = None;
    oauth.private_key_file = None;
    oauth.assertion_file = None;
    oauth.token_url = Some(sim.token_url());
    oauth.scope = Some("https://outlook.office365.com/.default".into());
    Ok(())
}
