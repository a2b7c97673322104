//! The routes as the deliverer sees them ([`Upstreams`]): which lane a message is in, and each
//! lane's settings and transport, built from its route's configuration. Routes that use the
//! same app (cloud, tenant, client, token endpoint and scope) share one token refresher; each
//! mailbox gets its own transport (its own session pool and XOAUTH2 user).

use std::collections::HashMap;
use std::hash::{Hash, Hasher};
use std::sync::{Arc, Mutex};

use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use super::{DaemonError, UpstreamTransport, build_transport};
use crate::config::Config;
use crate::deliver::{LaneKey, LaneParts, Unroutable, Upstreams};
use crate::metrics::Metrics;
use crate::oauth::TokenProvider;
use crate::routes::{RouteSpec, Routes};
use crate::store::Routing;
use crate::transport::Transport;

/// The app a route signs in as: routes with the same key share one token.
fn app_key(config: &Config) -> String {
    let o = &config.oauth;
    let endpoints = crate::oauth::endpoints(config).ok();
    format!(
        "{:?}|{}|{}|{}|{}|{:?}",
        config.upstream.cloud,
        o.tenant_id.as_deref().unwrap_or_default(),
        o.client_id.as_deref().unwrap_or_default(),
        endpoints.as_ref().map_or("", |e| e.token_url.as_str()),
        endpoints.as_ref().map_or("", |e| e.scope.as_str()),
        config.upstream.ca_file,
    )
}

/// What a token provider was built from, secrets included (as a hash: never shown), so that a
/// reload rotates a changed secret in place.
fn token_fingerprint(config: &Config) -> u64 {
    let mut h = std::collections::hash_map::DefaultHasher::new();
    let o = &config.oauth;
    o.client_secret.as_ref().map(|s| s.expose()).hash(&mut h);
    o.client_secret_source.hash(&mut h);
    o.certificate_file.hash(&mut h);
    o.private_key_file.hash(&mut h);
    o.assertion_file.hash(&mut h);
    format!("{:?}", o.assertion_alg).hash(&mut h);
    o.refresh_before.hash(&mut h);
    h.finish()
}

struct App {
    tokens: TokenProvider,
    fingerprint: u64,
}

struct Opened {
    app: String,
    transport: UpstreamTransport,
}

/// Token providers and transports, kept across reloads.
pub struct UpstreamPool {
    metrics: Arc<Metrics>,
    shutdown: CancellationToken,
    apps: Mutex<HashMap<String, App>>,
    transports: Mutex<HashMap<LaneKey, Opened>>,
    /// Refreshers started after the first ones go to their supervisor here.
    refreshers: mpsc::UnboundedSender<JoinHandle<()>>,
}

impl UpstreamPool {
    /// The pool and the task that supervises every token refresher it starts (it ends, and the
    /// relay stops, when one of them dies).
    pub fn new(
        metrics: Arc<Metrics>,
        shutdown: CancellationToken,
    ) -> (Arc<UpstreamPool>, JoinHandle<()>) {
        let (tx, mut rx) = mpsc::unbounded_channel::<JoinHandle<()>>();
        let stop = shutdown.clone();
        let supervisor = tokio::spawn(async move {
            let mut running = tokio::task::JoinSet::new();
            loop {
                tokio::select! {
                    Some(handle) = rx.recv() => {
                        running.spawn(handle);
                    }
                    Some(ended) = running.join_next(), if !running.is_empty() => {
                        match ended {
                            Ok(Ok(())) if stop.is_cancelled() => {}
                            Ok(Ok(())) => return,
                            Ok(Err(e)) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
                            _ => return,
                        }
                    }
                    _ = stop.cancelled() => {
                        while running.join_next().await.is_some() {}
                        return;
                    }
                    // The pool is gone and nothing runs: nothing left to watch.
                    else => return,
                }
            }
        });
        let pool = Arc::new(UpstreamPool {
            metrics,
            shutdown,
            apps: Mutex::new(HashMap::new()),
            transports: Mutex::new(HashMap::new()),
            refreshers: tx,
        });
        (pool, supervisor)
    }

    /// The token provider of `config`'s app: started if new, its credential replaced if the
    /// configuration changed it.
    fn tokens(&self, config: &Config) -> Result<(String, TokenProvider), DaemonError> {
        let key = app_key(config);
        let fingerprint = token_fingerprint(config);
        let mut apps = self.apps.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(app) = apps.get_mut(&key) {
            if app.fingerprint != fingerprint {
                app.tokens.reload(config)?;
                app.fingerprint = fingerprint;
            }
            return Ok((key, app.tokens.clone()));
        }
        let (tokens, refresher) = TokenProvider::start(config, self.shutdown.clone())?;
        let _ = self.refreshers.send(refresher);
        apps.insert(
            key.clone(),
            App {
                tokens: tokens.clone(),
                fingerprint,
            },
        );
        Ok((key, tokens))
    }

    /// The routes of `config` over this pool: checks every route's app and transport now, so
    /// that `serve` and a reload report a bad route before any mail is attempted.
    pub fn upstreams(self: &Arc<Self>, config: &Config) -> Result<RouteUpstreams, DaemonError> {
        let routes = config.route_table();
        for route in routes.iter().filter(|r| r.config.oauth.is_configured()) {
            crate::oauth::endpoints(&route.config)?;
            self.tokens(&route.config)?;
        }
        Ok(RouteUpstreams {
            routes,
            pool: self.clone(),
        })
    }

    /// The token provider of the default route (or the first route with an app): `/healthz`'s
    /// token.
    pub fn first_tokens(&self, config: &Config) -> Option<TokenProvider> {
        let routes = config.route_table();
        let first = routes
            .get(crate::routes::DEFAULT_ROUTE)
            .filter(|r| r.config.oauth.is_configured())
            .or_else(|| routes.iter().find(|r| r.config.oauth.is_configured()))?;
        let apps = self.apps.lock().unwrap_or_else(|p| p.into_inner());
        apps.get(&app_key(&first.config)).map(|a| a.tokens.clone())
    }

    /// The lane's transport: the one it had, with the settings of `config`, or a new one when
    /// its app or its kind changed (the old one is closed).
    fn transport(&self, lane: &LaneKey, config: &Config) -> Result<LaneParts, String> {
        let (app, tokens) = self.tokens(config).map_err(|e| e.to_string())?;
        let endpoints = crate::oauth::endpoints(config).map_err(|e| e.to_string())?;
        let mut transports = self.transports.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(opened) = transports.get(lane)
            && opened.app == app
            && opened.transport.kind() == config.upstream.transport
        {
            opened.transport.reconfigure(config)?;
            let settings = super::delivery_settings(config)?;
            return Ok(LaneParts {
                settings,
                transport: opened.transport.as_dyn(),
            });
        }
        let (transport, settings) =
            build_transport(config, Arc::new(tokens), &self.metrics, &endpoints)
                .map_err(|e| e.to_string())?;
        if let Some(old) = transports.insert(
            lane.clone(),
            Opened {
                app,
                transport: transport.clone(),
            },
        ) {
            let old = old.transport.as_dyn();
            tokio::spawn(async move { old.close().await });
        }
        Ok(LaneParts {
            settings,
            transport: transport.as_dyn(),
        })
    }

    fn all_transports(&self) -> Vec<Arc<dyn Transport>> {
        let transports = self.transports.lock().unwrap_or_else(|p| p.into_inner());
        transports.values().map(|o| o.transport.as_dyn()).collect()
    }
}

/// The routes of one configuration over the shared pool.
pub struct RouteUpstreams {
    routes: Routes,
    pool: Arc<UpstreamPool>,
}

impl RouteUpstreams {
    fn route(&self, name: &str) -> Option<&Arc<RouteSpec>> {
        self.routes.get(name)
    }
}

impl Upstreams for RouteUpstreams {
    fn lane_of(&self, routing: &Routing) -> Result<LaneKey, Unroutable> {
        let unroutable = |reason: String| Unroutable {
            route: routing.route.clone(),
            reason,
        };
        let Some(route) = self.route(&routing.route) else {
            return Err(unroutable(format!(
                "route {} is not in relay.toml any more",
                routing.route
            )));
        };
        if !route.config.oauth.is_configured() {
            return Err(unroutable(format!(
                "route {} has no app configured ([oauth] is empty): the message waits until a \
                 tenant is configured",
                routing.route
            )));
        }
        let mailbox = route
            .mailbox_for(&routing.mail_from, routing.auth_user.as_deref())
            .map_err(|e| unroutable(e.to_string()))?;
        // A template route's match decides who may become a mailbox: after a reload that
        // narrowed it, a queued message of a sender it no longer allows is not sent.
        if route.mailbox.is_template()
            && !route.matches(&routing.mail_from, routing.auth_user.as_deref(), None)
            && route.match_listener.is_empty()
        {
            return Err(unroutable(format!(
                "route {} no longer allows {} as a mailbox",
                routing.route, mailbox
            )));
        }
        Ok(LaneKey {
            route: routing.route.clone(),
            mailbox,
        })
    }

    fn open(&self, lane: &LaneKey) -> Result<LaneParts, String> {
        let route = self
            .route(&lane.route)
            .ok_or_else(|| format!("route {} is not in relay.toml any more", lane.route))?;
        self.pool.transport(lane, &route.lane_config(&lane.mailbox))
    }

    fn transports(&self) -> Vec<Arc<dyn Transport>> {
        self.pool.all_transports()
    }
}
