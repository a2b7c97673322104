//! SMTP with `AUTH XOAUTH2` to Exchange Online: the first [`Transport`].
//!
//! Owns what only SMTP has: a pool of authenticated sessions (reused while young and recently
//! used), the MAIL FROM parameters (`BODY=8BITMIME`, `SMTPUTF8` when the server offers them),
//! and the rule that a `535` with a token close to expiry forces one refresh and one more try
//! (some Microsoft endpoints reject tokens in their last minutes). The session itself is
//! [`crate::deliver::upstream`].

use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use super::{AfterDot, Attempted, RecipientResult, Reply, Submission, Transport, TransportFuture};
use crate::deliver::TokenSource;
use crate::deliver::classify::{HoldCause, Outcome, Stage, classify};
use crate::deliver::extensions::Needs;
use crate::deliver::pacer::Progress;
use crate::deliver::upstream::{SessionError, UpstreamSession, UpstreamTarget};
use crate::metrics::Metrics;

/// What the SMTP transport needs beyond the target.
#[derive(Debug, Clone)]
pub struct SmtpSettings {
    /// The XOAUTH2 `user=`: the mailbox the relay authenticates as.
    pub mailbox: String,
    /// Connections are not reused beyond this age (tokens are checked at AUTH only).
    pub session_max_age: Duration,
    /// Exchange closes idle connections; do not reuse one idle longer than this.
    pub session_max_idle: Duration,
    /// A 535 with a token this close to expiry forces one refresh and one retry.
    pub refresh_before: Duration,
}

impl SmtpSettings {
    /// The settings `serve` uses: sessions reused for 10 minutes, 60 s idle at most (Exchange
    /// closes idle connections), the configured `oauth.refresh_before`.
    pub fn from_config(config: &crate::config::Config) -> SmtpSettings {
        SmtpSettings {
            mailbox: config.upstream.mail_account.clone().unwrap_or_default(),
            session_max_age: Duration::from_secs(600),
            session_max_idle: Duration::from_secs(60),
            refresh_before: config.oauth.refresh_before,
        }
    }
}

pub struct SmtpTransport {
    target: UpstreamTarget,
    settings: SmtpSettings,
    tokens: Arc<dyn TokenSource>,
    metrics: Arc<Metrics>,
    /// Idle authenticated sessions, reused by the next attempt.
    pool: Mutex<Vec<UpstreamSession>>,
}

impl SmtpTransport {
    pub fn new(
        target: UpstreamTarget,
        settings: SmtpSettings,
        tokens: Arc<dyn TokenSource>,
        metrics: Arc<Metrics>,
    ) -> SmtpTransport {
        SmtpTransport {
            target,
            settings,
            tokens,
            metrics,
            pool: Mutex::new(Vec::new()),
        }
    }

    async fn attempt(&self, submission: Submission<'_>) -> Attempted {
        let count = submission.recipients.len();
        let mut session = match self.session().await {
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
        let params = match needs.mail_params(&session.caps, &self.target.server_name) {
            Ok(params) => params,
            Err(refusal) => {
                tracing::warn!(id = %submission.id, reply = %refusal, "message refused before sending: the upstream server lacks an extension it needs");
                if let Ok(mut pool) = self.pool.lock() {
                    pool.push(session);
                }
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
                if let Ok(mut pool) = self.pool.lock() {
                    pool.push(session);
                }
                Attempted {
                    recipients,
                    reached: Progress::Transaction,
                    after_dot,
                    summary: data.map(|(_, reply)| reply).unwrap_or_else(|| {
                        Reply::Local("every recipient refused: nothing was sent".into())
                    }),
                }
            }
        }
    }

    /// An authenticated session: an idle one from the pool, else a new one. A 535 with a
    /// token close to expiry forces one refresh and one more try.
    async fn session(&self) -> Result<UpstreamSession, Failure> {
        if let Some(session) = self.idle_session() {
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
            match UpstreamSession::open(&self.target, &self.settings.mailbox, &token.value).await {
                Ok(session) => {
                    self.metrics.session_seconds.observe(opening.elapsed());
                    return Ok(session);
                }
                Err(e) => {
                    let near_expiry = token
                        .expires_at
                        .duration_since(SystemTime::now())
                        .map_or(true, |left| left < self.settings.refresh_before);
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

    fn idle_session(&self) -> Option<UpstreamSession> {
        let mut pool = self.pool.lock().ok()?;
        while let Some(s) = pool.pop() {
            if s.reusable(
                self.settings.session_max_age,
                self.settings.session_max_idle,
            ) {
                return Some(s);
            }
            tokio::spawn(s.quit());
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
            let idle: Vec<UpstreamSession> = self
                .pool
                .lock()
                .map(|mut p| p.drain(..).collect())
                .unwrap_or_default();
            for session in idle {
                session.quit().await;
            }
        })
    }
}
