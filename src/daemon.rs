//! `serve`: opens the spool (running recovery), binds the listener and runs until shutdown.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::admin::{self, AdminState};
use crate::config::Config;
use crate::inbound::{InboundError, InboundSettings, Server};
use crate::service;
use crate::spool::{Spool, SpoolError};

#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    #[error(transparent)]
    Inbound(#[from] InboundError),
    #[error("spool {dir}: {source}")]
    Spool { dir: String, source: SpoolError },
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
        matches!(
            self,
            DaemonError::Inbound(InboundError::Tls(_) | InboundError::Auth(_))
        )
    }
}

/// Runs the relay until `shutdown` is cancelled. Returns once sessions have drained.
pub async fn serve(config: &Config, shutdown: CancellationToken) -> Result<(), DaemonError> {
    run(config, None, shutdown).await
}

/// [`serve`], plus SIGHUP reloads that re-run `config::load(config_path)` (`--config`, or
/// `None` for the usual lookup) and re-read secret files and systemd credentials.
pub async fn serve_with_reload(
    config: &Config,
    config_path: Option<PathBuf>,
    shutdown: CancellationToken,
) -> Result<(), DaemonError> {
    run(config, Some(config_path), shutdown).await
}

/// `reload`: `Some(path)` handles SIGHUP, `None` leaves it alone.
async fn run(
    config: &Config,
    reload: Option<Option<PathBuf>>,
    shutdown: CancellationToken,
) -> Result<(), DaemonError> {
    let settings = InboundSettings::from_config(config)?;
    let (spool, report) = Spool::open(&config.queue.dir).map_err(|source| DaemonError::Spool {
        dir: config.queue.dir.display().to_string(),
        source,
    })?;
    tracing::info!(dir = %config.queue.dir.display(), "spool recovered: {report}");
    let listeners = Server::bind(&config.smtp.listen).await?;
    for listener in &listeners {
        if let Ok(addr) = listener.local_addr() {
            tracing::info!(%addr, "accepting SMTP");
        }
    }
    if !config.oauth.is_configured() {
        tracing::warn!(
            "upstream not configured ([oauth] is empty): mail is accepted and kept in the spool, \
             nothing is delivered until a tenant is configured"
        );
    }
    // --- service hooks (src/service.rs, src/admin.rs) ---
    // The configuration in effect; SIGHUP publishes reloads here. Delivery subscribes with
    // `config_rx.clone()` (restart-only keys keep their running values, see service::merge_reload).
    let (config_tx, config_rx) = watch::channel(Arc::new(config.clone()));
    if let Some(path) = reload {
        let reload = service::reload_on_sighup(path, config_tx, shutdown.clone())
            .map_err(DaemonError::Signal)?;
        tokio::spawn(reload);
    }
    let admin_state = AdminState::new(spool.clone(), config_rx.clone());
    let admin_stop = CancellationToken::new();
    let admin_task = match config.admin.listen {
        Some(addr) => {
            let listener = admin::bind(addr)
                .await
                .map_err(|source| DaemonError::Admin { addr, source })?;
            tracing::info!(%addr, "admin endpoint: GET /readyz");
            let router = admin::router(admin_state.clone());
            Some(tokio::spawn(admin::serve(
                listener,
                router,
                admin_stop.clone(),
            )))
        }
        None => None,
    };
    admin_state.accepting.store(true, Ordering::Release);
    service::ready(&format!("accepting SMTP on {:?}", config.smtp.listen));
    let accepting = admin_state.accepting.clone();
    let stop_notice = shutdown.clone();
    tokio::spawn(async move {
        stop_notice.cancelled().await;
        accepting.store(false, Ordering::Release);
        service::stopping("stopping: draining SMTP sessions");
    });
    let server = Server::new(settings, spool).run(listeners, shutdown);
    // WATCHDOG=1 from the task that runs the server: a wedged server stops feeding it.
    match service::watchdog_interval() {
        Some(every) => tokio::select! {
            () = server => {}
            () = service::feed_watchdog(every) => {}
        },
        None => server.await,
    }
    admin_stop.cancel();
    if let Some(task) = admin_task {
        let _ = task.await;
    }
    // --- end service hooks ---
    tracing::info!("stopped");
    Ok(())
}
