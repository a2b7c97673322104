//! `serve`: opens the spool (running recovery), binds the listener and runs until shutdown.

use tokio_util::sync::CancellationToken;

use crate::config::Config;
use crate::inbound::{InboundError, InboundSettings, Server};
use crate::spool::{Spool, SpoolError};

#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    #[error(transparent)]
    Inbound(#[from] InboundError),
    #[error("spool {dir}: {source}")]
    Spool { dir: String, source: SpoolError },
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
    let settings = InboundSettings::from_config(config)?;
    let (spool, _report) = Spool::open(&config.queue.dir).map_err(|source| DaemonError::Spool {
        dir: config.queue.dir.display().to_string(),
        source,
    })?;
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
    Server::new(settings, spool, None)
        .run(listeners, shutdown)
        .await;
    tracing::info!("stopped");
    Ok(())
}
