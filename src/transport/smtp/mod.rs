//! SMTP with `AUTH XOAUTH2` to Exchange Online: the first [`Transport`].
//!
//! Owns what only SMTP has: a pool of authenticated sessions (reused while young and recently
//! used), the MAIL FROM parameters (`BODY=8BITMIME`, `SMTPUTF8` when the server offers them),
//! and the rule that a `535` with a token close to expiry forces one refresh and one more try
//! (some Microsoft endpoints reject tokens in their last minutes). The session itself (EHLO,
//! STARTTLS, AUTH, MAIL/RCPT/DATA) is [`session`]; which extensions a message needs
//! (SMTPUTF8, 8BITMIME) is [`extensions`].

pub mod extensions;
pub mod session;

use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, SystemTime};

use crate::deliver::TokenSource;
use crate::deliver::classify::{HoldCause, Outcome, Stage, classify};
use crate::deliver::pacer::Progress;
use crate::metrics::Metrics;
use crate::transport::{
    AfterDot, Attempted, RecipientResult, Reply, Submission, Transport, TransportFuture,
};
use extensions::Needs;
use session::{SessionError, UpstreamSession, UpstreamTarget};

/// What the SMTP transport needs beyond the target.
#[derive(Debug, Clone)]
pub struct SmtpSettings {
    /// The XOAUTH2 `user=`: the mailbox the relay authenticates as.
    pub mailbox: String,
    /// Connections are not reused beyond this age (tokens are checked at AUTH only).
    pub session_max_age: Duration,
    /// Exchange closes idle connections; do not reuse one idle longer than this. Zero: no
    /// session is kept once its attempt ends (QUIT before the attempt returns).
    pub session_max_idle: Duration,
    /// A 535 with a token this close to expiry forces one refresh and one retry.
    pub refresh_before: Duration,
}

impl SmtpSettings {
    /// The settings `serve` uses: sessions reused for 10 minutes, 60 s idle at most (Exchange
    /// closes idle connections; none kept idle with `queue.backend = "postgres"`), the
    /// configured `oauth.refresh_before`.
    pub fn from_config(config: &crate::config::Config) -> SmtpSettings {
        SmtpSettings {
            mailbox: config.upstream.mail_account.clone().unwrap_or_default(),
            session_max_age: Duration::from_secs(600),
            // Relays sharing a queue share each mailbox's session slots: an idle session
            // would hold one that no attempt uses, so sessions end with their attempt.
            session_max_idle: if config.queue.backend == crate::config::Backend::Postgres {
                Duration::ZERO
            } else {
                Duration::from_secs(60)
            },
            refresh_before: config.oauth.refresh_before,
        }
    }
}

pub struct SmtpTransport {
    /// Where and how to connect; replaced by [`reconfigure`](Self::reconfigure) (SIGHUP).
    current: RwLock<Arc<Current>>,
    tokens: Arc<dyn TokenSource>,
    metrics: Arc<Metrics>,
    /// Idle authenticated sessions, reused by the next attempt.
    pool: Mutex<Vec<Pooled>>,
}

/// The settings new sessions are opened with.
struct Current {
    target: UpstreamTarget,
    settings: SmtpSettings,
    /// Sessions opened under older settings are never reused.
    generation: u64,
}

struct Pooled {
    generation: u64,
    session: UpstreamSession,
}

impl SmtpTransport {
    pub fn new(
        target: UpstreamTarget,
        settings: SmtpSettings,
        tokens: Arc<dyn TokenSource>,
        metrics: Arc<Metrics>,
    ) -> SmtpTransport {
        SmtpTransport {
            current: RwLock::new(Arc::new(Current {
                target,
                settings,
                generation: 0,
            })),
            tokens,
            metrics,
            pool: Mutex::new(Vec::new()),
        }
    }

    /// New upstream settings (a reload): every attempt from now on opens its session with
    /// them. Idle sessions are closed (QUIT) and sessions in use are not pooled again, so no
    /// message goes out over a connection made with the old settings or an old token.
    pub fn reconfigure(&self, target: UpstreamTarget, settings: SmtpSettings) {
        let idle: Vec<Pooled> = {
            let mut current = self.current.write().unwrap_or_else(|p| p.into_inner());
            let generation = current.generation + 1;
            *current = Arc::new(Current {
                target,
                settings,
                generation,
            });
            let mut pool = self.pool.lock().unwrap_or_else(|p| p.into_inner());
            pool.drain(..).collect()
        };
        tracing::info!(
            closed = idle.len(),
            "upstream settings reloaded: new sessions use them"
        );
        for pooled in idle {
            tokio::spawn(pooled.session.quit());
        }
    }

    fn current(&self) -> Arc<Current> {
        self.current
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Returns a session to the pool, unless it was opened under settings since replaced.
    fn pool_again(&self, generation: u64, session: UpstreamSession) {
        let mut pool = self.pool.lock().unwrap_or_else(|p| p.into_inner());
        if self.current().generation == generation {
            pool.push(Pooled {
                generation,
                session,
            });
        } else {
            drop(pool);
            tokio::spawn(session.quit());
        }
    }

    async fn attempt(&self, submission: Submission<'_>) -> Attempted {
        let count = submission.recipients.len();
        let current = self.current();
        let mut session = match self.session(&current).await {
            Ok(s) => s,
            Err(failure) => return failure.for_all(count),
        };
        // BODY=8BITMIME / SMTPUTF8 as the message needs them; a server that lacks one the
        // message cannot do without is refused here, before MAIL FROM (RFC 6531 §3.2,
        // RFC 6152): the session is untouched and stays usable.
        let needs = Needs::of(
            submission.mail_from,
            submission.recipients,
            &submission.envelope.mail_params,
            submission.body,
        );
        let params = match needs.mail_params(&session.caps, &current.target.server_name) {
            Ok(params) => params,
            Err(refusal) => {
                tracing::warn!(id = %submission.id, reply = %refusal, "message refused before sending: the upstream server lacks an extension it needs");
                self.pool_again(current.generation, session);
                return Attempted::all(
                    count,
                    Outcome::Failed,
                    Reply::Refused(refusal),
                    Progress::Transaction,
                );
            }
        };
        let started = std::time::Instant::now();
        let result = session
            .send(
                submission.mail_from,
                &params,
                submission.recipients,
                submission.body,
            )
            .await;
        self.metrics.transaction_seconds.observe(started.elapsed());
        let after_dot = session.dot_sent_at().and_then(|dot_at| {
            let (what, upstream_id) = match &result {
                Err(e) => (e.to_string(), e.reply().and_then(|r| r.queue_id())),
                Ok(tx) => {
                    let r = tx.data_reply.as_ref().filter(|r| r.is_transient())?;
                    (r.to_string(), r.queue_id())
                }
            };
            Some(AfterDot {
                dot_at,
                what,
                upstream_id,
            })
        });
        match result {
            Err(e) => {
                // A session that failed mid-transaction is not reused.
                tokio::spawn(session.quit());
                let mut attempted = Failure::from_session(&e, Progress::Transaction).for_all(count);
                attempted.after_dot = after_dot;
                attempted
            }
            Ok(tx) => {
                let data = tx.data_reply.as_ref().map(|r| {
                    let reply = Reply::Upstream {
                        stage: Stage::DataEnd,
                        reply: r.clone(),
                    };
                    (classify(Stage::DataEnd, r), reply)
                });
                let recipients = tx
                    .recipients
                    .iter()
                    .map(|refusal| match (refusal, &data) {
                        (Some(r), _) => RecipientResult {
                            class: classify(Stage::RcptTo, r),
                            reply: Reply::Upstream {
                                stage: Stage::RcptTo,
                                reply: r.clone(),
                            },
                        },
                        (None, Some((class, reply))) => RecipientResult {
                            class: *class,
                            reply: reply.clone(),
                        },
                        (None, None) => RecipientResult {
                            class: Outcome::Retry { throttle: false },
                            reply: Reply::Local("no data reply".into()),
                        },
                    })
                    .collect();
                if current.settings.session_max_idle.is_zero() {
                    session.quit().await;
                } else {
                    self.pool_again(current.generation, session);
                }
                Attempted {
                    recipients,
                    reached: Progress::Transaction,
                    after_dot,
                    retry_after: None,
                    summary: data.map(|(_, reply)| reply).unwrap_or_else(|| {
                        Reply::Local("every recipient refused: nothing was sent".into())
                    }),
                }
            }
        }
    }

    /// An authenticated session: an idle one from the pool, else a new one. A 535 with a
    /// token close to expiry forces one refresh and one more try.
    async fn session(&self, current: &Current) -> Result<UpstreamSession, Failure> {
        if let Some(session) = self.idle_session(current) {
            return Ok(session);
        }
        let mut refreshed = false;
        loop {
            let token = match self.tokens.token().await {
                Ok(t) => t,
                Err(f) => {
                    return Err(Failure {
                        class: if f.permanent {
                            Outcome::Hold(HoldCause::TokenRefused)
                        } else {
                            Outcome::Retry { throttle: false }
                        },
                        reply: Reply::Local(format!("token: {}", f.message)),
                        reached: Progress::Token,
                    });
                }
            };
            let opening = std::time::Instant::now();
            match UpstreamSession::open(&current.target, &current.settings.mailbox, &token.value)
                .await
            {
                Ok(session) => {
                    self.metrics.session_seconds.observe(opening.elapsed());
                    return Ok(session);
                }
                Err(e) => {
                    let near_expiry = token
                        .expires_at
                        .duration_since(SystemTime::now())
                        .map_or(true, |left| left < current.settings.refresh_before);
                    let auth_refused = matches!(&e, SessionError::Reply { stage: Stage::Auth, reply } if reply.code == 535);
                    if auth_refused && near_expiry && !refreshed {
                        tracing::info!(
                            "535 with a token close to expiry: refreshing it and trying once more"
                        );
                        refreshed = true;
                        if let Err(f) = self.tokens.refresh().await {
                            tracing::warn!(error = %f.message, "token refresh after 535 failed");
                        }
                        continue;
                    }
                    return Err(Failure::from_session(&e, Progress::Session));
                }
            }
        }
    }

    fn idle_session(&self, current: &Current) -> Option<UpstreamSession> {
        let mut pool = self.pool.lock().ok()?;
        while let Some(Pooled {
            generation,
            session,
        }) = pool.pop()
        {
            if generation == current.generation
                && session.reusable(
                    current.settings.session_max_age,
                    current.settings.session_max_idle,
                )
            {
                return Some(session);
            }
            tokio::spawn(session.quit());
        }
        None
    }
}

/// An attempt that ended before any recipient had its own answer.
struct Failure {
    class: Outcome,
    reply: Reply,
    reached: Progress,
}

impl Failure {
    fn from_session(e: &SessionError, reached: Progress) -> Failure {
        Failure {
            class: e.outcome(),
            reply: match e {
                SessionError::Reply { stage, reply } => Reply::Upstream {
                    stage: *stage,
                    reply: reply.clone(),
                },
                other => Reply::Local(other.to_string()),
            },
            reached,
        }
    }

    fn for_all(self, recipients: usize) -> Attempted {
        Attempted::all(recipients, self.class, self.reply, self.reached)
    }
}

impl Transport for SmtpTransport {
    fn send<'a>(&'a self, submission: Submission<'a>) -> TransportFuture<'a, Attempted> {
        Box::pin(self.attempt(submission))
    }

    fn close(&self) -> TransportFuture<'_, ()> {
        Box::pin(async move {
            let idle: Vec<Pooled> = self
                .pool
                .lock()
                .map(|mut p| p.drain(..).collect())
                .unwrap_or_default();
            // All at once: the stop budget is shared by every session's QUIT.
            let mut quits = tokio::task::JoinSet::new();
            for pooled in idle {
                quits.spawn(pooled.session.quit());
            }
            while quits.join_next().await.is_some() {}
        })
    }
}
