//! The Transport seam: how one attempt hands a message to Microsoft 365.
//!
//! The scheduler decides *when* (with the pacer) and records *what happened* (in the store); a
//! transport only sends: `send(submission) -> one outcome per recipient`. Everything specific
//! to the protocol lives behind it: for SMTP the session pool, STARTTLS, `AUTH XOAUTH2`, the
//! MAIL parameters and the "535 with a token near expiry: refresh once" rule ([`smtp`]); for
//! Microsoft Graph the envelope-to-Bcc rule, the request limit and the HTTP error catalogue
//! ([`graph`]). Outcome classes ([`Outcome`]) are shared by every transport.

pub mod graph;
pub mod smtp;

use std::future::Future;
use std::pin::Pin;

use crate::deliver::classify::{Outcome, Stage};
use crate::deliver::pacer::Progress;
use crate::deliver::reply::UpstreamReply;
use crate::spool::{Envelope, MessageBody};

/// One message for one attempt.
#[derive(Debug, Clone, Copy)]
pub struct Submission<'a> {
    /// The spool id (for logs).
    pub id: &'a str,
    /// The envelope as received (its MAIL parameters: 8BITMIME, SMTPUTF8).
    pub envelope: &'a Envelope,
    /// The envelope sender for this attempt (`upstream.from`).
    pub mail_from: &'a str,
    /// The recipients still pending, in order.
    pub recipients: &'a [String],
    /// The message bytes as they are to be sent (sender policy applied, not dot-stuffed), never
    /// whole in memory: read them with [`MessageBody::reader`], a piece at a time.
    pub body: &'a MessageBody,
}

/// What the transport learnt about one recipient.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RecipientResult {
    pub class: Outcome,
    /// The reply that decided it: the server's, typed, when there was one.
    pub reply: Reply,
}

/// A reply as data: the upstream's own (code, enhanced code, text), or what happened locally
/// when the upstream never answered (connection dropped, token endpoint down, ...).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reply {
    /// The upstream's reply at `stage`.
    Upstream {
        stage: Stage,
        reply: UpstreamReply,
    },
    /// The relay's own refusal, in the form of a reply (e.g. `553 5.6.7` when the upstream
    /// lacks SMTPUTF8): permanent, decided without sending.
    Refused(UpstreamReply),
    /// Microsoft Graph's answer: HTTP status and `error.code` (what decides), its message and
    /// request id (for logs and support).
    Graph(GraphReply),
    Local(String),
}

/// A Microsoft Graph response, as data.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GraphReply {
    pub status: u16,
    /// `error.code` of the JSON error body (`ErrorAccessDenied`, `ApplicationThrottled`, ...).
    pub code: Option<String>,
    pub message: Option<String>,
    /// `request-id` (header or `error.innerError`): what Microsoft support asks for.
    pub request_id: Option<String>,
}

impl std::fmt::Display for GraphReply {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Graph HTTP {}", self.status)?;
        if self.status == 202 {
            // What 202 means: accepted for sending, not delivered to anyone yet.
            f.write_str(" Accepted (saved and queued for sending by Exchange)")?;
        }
        if let Some(code) = &self.code {
            write!(f, " {code}")?;
        }
        if let Some(message) = &self.message {
            write!(f, ": {message}")?;
        }
        if let Some(id) = &self.request_id {
            write!(f, " [request-id {id}]")?;
        }
        Ok(())
    }
}

impl Reply {
    /// The reply as the store records it: code, enhanced code and text kept apart, rendered
    /// the same as [`Display`](std::fmt::Display).
    pub fn record(&self) -> crate::store::RecordedReply {
        let typed = |stage: Option<String>, reply: &UpstreamReply| crate::store::RecordedReply {
            code: Some(reply.code),
            enhanced: reply.enhanced.map(|e| e.to_string()),
            text: reply.text.clone(),
            stage,
        };
        match self {
            Reply::Upstream {
                stage: Stage::RcptTo | Stage::DataEnd,
                reply,
            } => typed(None, reply),
            Reply::Upstream { stage, reply } => typed(Some(format!("{stage:?}")), reply),
            Reply::Refused(reply) => typed(None, reply),
            Reply::Local(text) => crate::store::RecordedReply::local(text.clone()),
            // An HTTP status is no SMTP code: Graph's answer is kept as its words.
            Reply::Graph(reply) => crate::store::RecordedReply::local(reply.to_string()),
        }
    }
}

impl std::fmt::Display for Reply {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            // A recipient's own answer (RCPT, or the final dot) is shown as it came.
            Reply::Upstream {
                stage: Stage::RcptTo | Stage::DataEnd,
                reply,
            } => write!(f, "{reply}"),
            Reply::Upstream { stage, reply } => write!(f, "{stage:?}: upstream replied {reply}"),
            Reply::Refused(reply) => write!(f, "{reply}"),
            Reply::Graph(reply) => write!(f, "{reply}"),
            Reply::Local(text) => f.write_str(text),
        }
    }
}

/// The result of one attempt.
#[derive(Debug, Clone)]
pub struct Attempted {
    /// One result per recipient of the submission, in the same order.
    pub recipients: Vec<RecipientResult>,
    /// How far the attempt got (the pacer ends a hold only on proof that its cause is gone).
    pub reached: Progress,
    /// The reply that sums the attempt up for the log: the final dot's, or the failure's.
    pub summary: Reply,
    /// The whole message was handed over and no success came back (a drop, a timeout or a
    /// 4xx after the final dot): the upstream may have it, and a retry may deliver it twice.
    pub after_dot: Option<AfterDot>,
    /// The upstream asked for this wait before the next attempt (HTTP `Retry-After`): the
    /// retry is not scheduled sooner.
    pub retry_after: Option<std::time::Duration>,
}

/// What is known of an attempt that may have delivered without the relay knowing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AfterDot {
    /// When the end of the message was written.
    pub dot_at: std::time::SystemTime,
    /// What came instead of the success (the reply or the error).
    pub what: String,
    /// The upstream's queue id, when its reply named one.
    pub upstream_id: Option<String>,
}

impl Attempted {
    /// Every recipient ends the same way (the attempt failed before the transaction, or the
    /// whole transaction did).
    pub fn all(recipients: usize, class: Outcome, reply: Reply, reached: Progress) -> Attempted {
        Attempted {
            recipients: vec![
                RecipientResult {
                    class,
                    reply: reply.clone(),
                };
                recipients
            ],
            reached,
            summary: reply,
            after_dot: None,
            retry_after: None,
        }
    }
}

pub type TransportFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// A way to hand messages to Microsoft 365. Implementations keep their own connections and
/// limits of the protocol; the mailbox's pace is the caller's (the pacer).
pub trait Transport: Send + Sync + 'static {
    /// One attempt for `submission`. Never panics on what the upstream sends; every failure is
    /// an outcome.
    fn send<'a>(&'a self, submission: Submission<'a>) -> TransportFuture<'a, Attempted>;

    /// Closes idle connections politely (QUIT); called once when the deliverer stops.
    fn close(&self) -> TransportFuture<'_, ()>;
}
