//! `serve`: opens the spool (running recovery), starts the token refresher and the deliverer
//! when a tenant is configured, binds the listener and runs until shutdown, supervising each
//! of these tasks (a dead one stops the relay with exit 1). With `--simulate` the built-in
//! simulator stands in for Entra ID and Exchange Online.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::admin::{self, AdminState};
use crate::config::TransportKind;
use crate::config::{Config, Secret};
use crate::deliver::{Deliverer, DeliveryHandle, DeliverySettings};
use crate::failpoint;
use crate::inbound::{InboundError, InboundSettings, Server};
use crate::metrics::Metrics;
use crate::oauth::{OAuthError, TokenProvider};
use crate::service;
use crate::sim::{SimConfig, SimError, Simulator};
use crate::spool::maildrop::DropDir;
use crate::stop::StopBudget;
use crate::store::Store;
use crate::supervise::{Supervisor, TaskDeath};
use crate::transport::Transport;
use crate::transport::graph::{GraphSettings, GraphTransport};
use crate::transport::smtp::session::upstream_target;
use crate::transport::smtp::{SmtpSettings, SmtpTransport};

mod upstreams;
pub use upstreams::{RouteUpstreams, UpstreamPool};

#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    #[error(transparent)]
    Inbound(#[from] InboundError),
    #[error(transparent)]
    Store(#[from] crate::store::OpenError),
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
    #[error(transparent)]
    TaskDied(TaskDeath),
}

impl DaemonError {
    /// Problems the admin fixes in `relay.toml` (exit code 2) as opposed to runtime failures.
    pub fn is_config_error(&self) -> bool {
        match self {
            DaemonError::Inbound(InboundError::Tls { .. } | InboundError::Auth { .. }) => true,
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

/// Runs the relay until `shutdown` is cancelled. Returns once sessions and deliveries drained,
/// or with [`DaemonError::TaskDied`] when one of its long-running tasks died (see
/// [`crate::supervise`]): the relay then stops as on SIGTERM, so that the service manager
/// restarts it.
pub async fn serve(
    config: &Config,
    options: ServeOptions,
    shutdown: CancellationToken,
) -> Result<(), DaemonError> {
    let mut config = config.clone();
    let (simulator, sim_pointer) = if options.simulate {
        let (sim, pointer) = start_simulator(&mut config).await?;
        (Some(sim), Some(pointer))
    } else {
        (None, None)
    };
    let settings = InboundSettings::from_config(&config)?;
    let (store, _recovered) = crate::store::open(&config.queue)?;
    let metrics = Arc::new(Metrics::default());
    let stop = StopBudget::from_config(&config);
    let delivery = start_delivery(&config, &store, &metrics, &shutdown, &stop)?;
    // Every listener's settings (certificates, users files) are resolved here, before binding.
    let listeners = Server::bind_config(&config).await?;
    let mut tasks = Supervisor::new();
    let server = Server::new(settings, store.clone(), metrics.clone())
        .with_stop_budget(stop.clone())
        .with_routes(config.route_table());
    let live = Live {
        delivery: delivery.as_ref().map(|d| LiveDelivery {
            handle: d.handle.clone(),
            pool: d.pool.clone(),
        }),
        sim: sim_pointer,
        inbound_routes: server.routes_handle(),
    };
    let (handle, tokens) = match delivery {
        Some(d) => {
            tasks.watch("dispatcher", d.deliverer);
            tasks.watch("refresher", d.refresher);
            (Some(d.handle), Some(d.tokens))
        }
        None => (None, None),
    };
    // The configuration in effect; SIGHUP applies reloads to the running parts and publishes
    // the result here (see service::merge_reload).
    let (config_tx, config_rx) = watch::channel(Arc::new(config.clone()));
    if let Some(path) = options.reload {
        let reload = service::reload_on_sighup(path, config_tx, Arc::new(live), shutdown.clone())
            .map_err(DaemonError::Signal)?;
        tasks.watch(
            "reload",
            tokio::spawn(async move {
                failpoint::panic_point("task-reload");
                reload.await
            }),
        );
    }
    let admin_state = AdminState::new(store.clone(), config_rx.clone())
        .with_delivery(metrics.clone(), handle.clone(), tokens)
        .with_tasks(tasks.health());
    // The admin endpoint outlives the other tasks, so /healthz answers during the drain.
    let admin_stop = CancellationToken::new();
    if let Some(addr) = config.admin.listen {
        let listener = admin::bind(addr)
            .await
            .map_err(|source| DaemonError::Admin { addr, source })?;
        tracing::info!(%addr, "admin endpoint: GET /readyz");
        let limits = admin::AdminLimits::from_config(&config);
        log_fd_budget(&config, &limits);
        let router = admin::router(admin_state.clone());
        let (stop, metrics) = (admin_stop.clone(), metrics.clone());
        tasks.watch(
            "admin",
            tokio::spawn(async move {
                failpoint::panic_point("task-admin");
                admin::serve_with(listener, router, limits, metrics, stop).await
            }),
        );
    }
    admin_state.accepting.store(true, Ordering::Release);
    // READY=1 only now: the listener is bound and spool recovery is done.
    let addresses: Vec<SocketAddr> = listeners.iter().map(|l| l.address).collect();
    service::ready(&format!("accepting SMTP on {addresses:?}"));
    let accepting = admin_state.accepting.clone();
    let stop_notice = shutdown.clone();
    let stop_budget = stop.clone();
    tokio::spawn(async move {
        stop_notice.cancelled().await;
        // The stop budget's clock starts now, for every part at once.
        let _ = stop_budget.deadline();
        accepting.store(false, Ordering::Release);
        service::stopping(&format!(
            "stopping: sessions and deliveries finish within {}",
            humantime::format_duration(stop_budget.budget())
        ));
    });
    // Messages sendmail stored while the relay was not running (or still starting).
    let maildrop = DropDir::from_config(&config);
    match maildrop.prepare() {
        Ok(()) => {
            tracing::info!(dir = %maildrop.path().display(), "taking in sendmail's drop directory");
            let submitter = server.local_submitter();
            let max = config.smtp.max_message_size.0;
            let stop = shutdown.clone();
            tasks.watch(
                "maildrop",
                tokio::spawn(async move {
                    failpoint::panic_point("task-maildrop");
                    let submit = move |envelope, message| {
                        let s = submitter.clone();
                        async move { s.submit(envelope, message).await }
                    };
                    maildrop.run(max, submit, stop).await
                }),
            );
        }
        Err(e) => tracing::error!(
            error = %e,
            "sendmail's drop directory is unusable: messages sendmail stores while the relay \
             is down are not taken in"
        ),
    }
    let server = server.serve(listeners, shutdown.clone());
    let watchdog = service::watchdog_interval();
    tasks.watch(
        "inbound",
        tokio::spawn(async move {
            failpoint::panic_point("task-inbound");
            // WATCHDOG=1 from the task that runs the server: a wedged server stops feeding it.
            match watchdog {
                Some(every) => tokio::select! {
                    () = server => {}
                    () = service::feed_watchdog(every) => {}
                },
                None => server.await,
            }
        }),
    );

    let mut death = None;
    while let Some(ended) = tasks.next(|| shutdown.is_cancelled()).await {
        if let Err(dead) = ended {
            tracing::error!(
                task = %dead.task,
                reason = %dead.reason,
                "task died: stopping the relay so that the service manager restarts it"
            );
            death.get_or_insert(dead);
            shutdown.cancel();
        }
        if tasks.alive() == ["admin"] {
            admin_stop.cancel();
        }
    }
    if let Some(sim) = simulator {
        sim.shutdown().await;
    }
    match death {
        Some(dead) => Err(DaemonError::TaskDied(dead)),
        None => {
            tracing::info!("stopped");
            Ok(())
        }
    }
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
    /// The default route's token (or the first route's), for `/healthz`.
    pub tokens: TokenProvider,
    /// Token providers and transports of every route (SIGHUP gives them new settings).
    pub pool: Arc<UpstreamPool>,
    pub deliverer: tokio::task::JoinHandle<()>,
    /// Supervises every token refresher (one per distinct app).
    pub refresher: tokio::task::JoinHandle<()>,
}

/// Starts the token refreshers and the deliverer, or returns `None` when no route has a
/// tenant configured.
pub fn start_delivery(
    config: &Config,
    store: &Arc<dyn Store>,
    metrics: &Arc<Metrics>,
    shutdown: &CancellationToken,
    stop: &StopBudget,
) -> Result<Option<RunningDelivery>, DaemonError> {
    if !config
        .route_table()
        .iter()
        .any(|r| r.config.oauth.is_configured())
    {
        tracing::warn!(
            "upstream not configured ([oauth] is empty): mail is accepted and kept in the spool, \
             nothing is delivered until a tenant is configured"
        );
        return Ok(None);
    }
    let (pool, refresher) = UpstreamPool::new(metrics.clone(), shutdown.clone());
    let upstreams = pool.upstreams(config)?;
    for route in config.route_table().iter() {
        log_route(route);
    }
    let Some(tokens) = pool.first_tokens(config) else {
        return Ok(None);
    };
    let (handle, deliverer) = Deliverer::start(
        store.clone(),
        Arc::new(upstreams),
        metrics.clone(),
        shutdown.clone(),
        stop.clone(),
    );
    Ok(Some(RunningDelivery {
        handle,
        metrics: metrics.clone(),
        tokens,
        pool,
        deliverer,
        refresher,
    }))
}

/// One line per route at start: what it matches and how it sends.
fn log_route(route: &crate::routes::RouteSpec) {
    let up = &route.config.upstream;
    tracing::info!(
        route = %route.name,
        mail_account = up.mail_account.as_deref().unwrap_or(""),
        transport = ?up.transport,
        match_sender = route.match_sender.len(),
        match_auth_user = route.match_auth_user.len(),
        match_listener = route.match_listener.len(),
        "route"
    );
}

/// The deliverer's settings for a configuration (one lane's), with the upstream's name for
/// failure notices.
pub(crate) fn delivery_settings(config: &Config) -> Result<DeliverySettings, String> {
    let host = match config.upstream.transport {
        TransportKind::Smtp => upstream_target(config)?.server_name,
        TransportKind::Graph => {
            let graph = GraphSettings::from_config(config)?;
            url::Url::parse(&graph.graph_url)
                .ok()
                .and_then(|u| u.host_str().map(str::to_string))
                .unwrap_or(graph.graph_url)
        }
    };
    Ok(DeliverySettings::from_config(config, &host))
}

/// The transport a relay delivers with, as `upstream.transport` chose it.
#[derive(Clone)]
pub enum UpstreamTransport {
    Smtp(Arc<SmtpTransport>),
    Graph(Arc<GraphTransport>),
}

impl UpstreamTransport {
    pub fn kind(&self) -> TransportKind {
        match self {
            UpstreamTransport::Smtp(_) => TransportKind::Smtp,
            UpstreamTransport::Graph(_) => TransportKind::Graph,
        }
    }

    pub fn as_dyn(&self) -> Arc<dyn Transport> {
        match self {
            UpstreamTransport::Smtp(t) => t.clone(),
            UpstreamTransport::Graph(t) => t.clone(),
        }
    }

    /// New settings from a reloaded configuration; the transport itself stays (changing it
    /// needs a restart).
    pub fn reconfigure(&self, config: &Config) -> Result<(), String> {
        match (self, config.upstream.transport) {
            (UpstreamTransport::Smtp(t), TransportKind::Smtp) => {
                t.reconfigure(upstream_target(config)?, SmtpSettings::from_config(config));
                Ok(())
            }
            (UpstreamTransport::Graph(t), TransportKind::Graph) => {
                t.reconfigure(GraphSettings::from_config(config)?)
            }
            _ => Err(
                "upstream.transport changed: restart the relay to use the other transport".into(),
            ),
        }
    }
}

/// The transport `upstream.transport` names and the deliverer's settings for it, as `serve`
/// builds them (the test harness too).
pub fn build_transport(
    config: &Config,
    tokens: Arc<dyn crate::deliver::TokenSource>,
    metrics: &Arc<Metrics>,
    endpoints: &crate::oauth::Endpoints,
) -> Result<(UpstreamTransport, DeliverySettings), DaemonError> {
    match config.upstream.transport {
        TransportKind::Smtp => {
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
                tokens,
                metrics.clone(),
            );
            Ok((UpstreamTransport::Smtp(Arc::new(transport)), settings))
        }
        TransportKind::Graph => {
            let graph = GraphSettings::from_config(config).map_err(DaemonError::UpstreamTls)?;
            let host = url::Url::parse(&graph.graph_url)
                .ok()
                .and_then(|u| u.host_str().map(str::to_string))
                .unwrap_or_else(|| graph.graph_url.clone());
            let settings = DeliverySettings::from_config(config, &host);
            tracing::info!(
                graph_url = %graph.graph_url,
                mailbox = %settings.mailbox,
                token_url = %endpoints.token_url,
                scope = %endpoints.scope,
                connections = settings.connections,
                rate = %settings.rate,
                "delivering through Microsoft Graph sendMail"
            );
            let transport = GraphTransport::new(graph, tokens, metrics.clone())
                .map_err(DaemonError::UpstreamTls)?;
            Ok((UpstreamTransport::Graph(Arc::new(transport)), settings))
        }
    }
}

/// What a SIGHUP can change in a running `serve`.
struct Live {
    delivery: Option<LiveDelivery>,
    /// `--simulate`: a reloaded config is pointed at the simulator again.
    sim: Option<SimPointer>,
    /// The routes inbound chooses from at MAIL FROM.
    inbound_routes: crate::inbound::RoutesHandle,
}

struct LiveDelivery {
    handle: DeliveryHandle,
    pool: Arc<UpstreamPool>,
}

impl service::LiveParts for Live {
    fn prepare(&self, config: &mut Config) {
        if let Some(sim) = &self.sim {
            sim.apply(config);
        }
    }

    fn delivering(&self) -> bool {
        self.delivery.is_some()
    }

    fn apply_delivery(&self, new: &Config, _changed: &[String]) -> Result<(), String> {
        let Some(d) = &self.delivery else {
            return Err("no deliverer is running".into());
        };
        // Everything that can fail first, so that a failure changes nothing: every route's
        // app and endpoints, then the lanes take their transports again.
        for route in new.route_table().iter() {
            if route.config.oauth.is_configured() && !route.mailbox.is_template() {
                delivery_settings(&route.config)?;
            }
        }
        let upstreams = d.pool.upstreams(new).map_err(|e| e.to_string())?;
        self.inbound_routes.set(new.route_table());
        d.handle.reconfigure(Arc::new(upstreams));
        Ok(())
    }
}

/// Starts the simulator beside the spool and points `config` at it.
async fn start_simulator(config: &mut Config) -> Result<(Simulator, SimPointer), DaemonError> {
    let state_dir = match config.queue.dir.parent() {
        Some(parent) if !parent.as_os_str().is_empty() => parent.join("simulator"),
        _ => PathBuf::from("simulator"),
    };
    // The simulated app has the permission its transport needs.
    let sim_config = match config.upstream.transport {
        TransportKind::Smtp => SimConfig::default(),
        TransportKind::Graph => SimConfig::graph(),
    };
    let sim = Simulator::start(sim_config, &state_dir).await?;
    let pointer = SimPointer::of(&sim)?;
    pointer.apply(config);
    tracing::info!(
        mailbox_dir = %sim.mailbox_dir().display(),
        token_url = %sim.token_url(),
        smtp = %sim.smtp_addr(),
        graph_url = %sim.graph_url(),
        "simulator running: delivered mail appears in the mailbox folder"
    );
    eprintln!(
        "smtp-oauth-relay: simulating Microsoft 365; delivered messages appear in {}",
        sim.mailbox_dir().display()
    );
    Ok((sim, pointer))
}

/// Points the upstream and OAuth settings at a running simulator (its first client, with its
/// client secret, and its first mailbox).
pub fn point_at_simulator(config: &mut Config, sim: &Simulator) -> Result<(), DaemonError> {
    SimPointer::of(sim)?.apply(config);
    Ok(())
}

/// The upstream and OAuth values that point a config at a simulator.
#[derive(Clone)]
struct SimPointer {
    addr: SocketAddr,
    ca_file: PathBuf,
    server_name: String,
    mailbox: String,
    tenant_id: String,
    client_id: String,
    secret: Option<String>,
    token_url: String,
    graph_url: String,
}

impl SimPointer {
    fn of(sim: &Simulator) -> Result<SimPointer, DaemonError> {
        let sim_config = sim.config();
        let (client, mailbox) = match (sim_config.clients.first(), sim_config.mailboxes.first()) {
            (Some(c), Some(m)) => (c.clone(), m.address.clone()),
            _ => {
                return Err(DaemonError::Simulator(SimError::Config(
                    "the simulator has no client or mailbox".into(),
                )));
            }
        };
        Ok(SimPointer {
            addr: sim.smtp_addr(),
            ca_file: sim.ca_file().to_path_buf(),
            server_name: sim_config.smtp.host_name.clone(),
            mailbox,
            tenant_id: sim_config.tenant_id.clone(),
            client_id: client.client_id.clone(),
            secret: client.secrets.first().map(|s| s.value.clone()),
            token_url: sim.token_url(),
            graph_url: sim.graph_url(),
        })
    }

    fn apply(&self, config: &mut Config) {
        let up = &mut config.upstream;
        up.host = Some(self.addr.ip().to_string());
        up.port = self.addr.port();
        up.ca_file = Some(self.ca_file.clone());
        up.tls_server_name = Some(self.server_name.clone());
        up.mail_account = Some(self.mailbox.clone());
        up.from = Some(self.mailbox.clone());
        let oauth = &mut config.oauth;
        oauth.tenant_id = Some(self.tenant_id.clone());
        oauth.client_id = Some(self.client_id.clone());
        oauth.client_secret = self.secret.clone().map(Secret::new);
        oauth.client_secret_file = None;
        oauth.client_secret_source = None;
        oauth.certificate_file = None;
        oauth.private_key_file = None;
        oauth.assertion_file = None;
        oauth.token_url = Some(self.token_url.clone());
        // The simulator checks the audience: Exchange Online's for SMTP, Graph's for Graph.
        oauth.scope = Some(
            match config.upstream.transport {
                TransportKind::Smtp => "https://outlook.office365.com/.default",
                TransportKind::Graph => "https://graph.microsoft.com/.default",
            }
            .into(),
        );
        config.upstream.graph_url = Some(self.graph_url.clone());
    }
}
