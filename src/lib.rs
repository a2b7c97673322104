//! smtp-oauth-relay: accepts plain SMTP on loopback, spools every message durably, and
//! forwards the spool to Microsoft 365 with SASL XOAUTH2.
//!
//! # The flow of a message
//! 1. [`inbound`] accepts a connection (allow-list, limits) and runs one session per client;
//!    [`inbound::framing`] finds the end of DATA (only `CRLF . CRLF`) and unstuffs it.
//! 2. The session streams the message into the [`store::Store`] (the file [`spool`]: `tmp/` →
//!    fsync → rename into `queue/` → directory fsync) and only then answers `250 queued as ID`.
//! 3. The store announces the commit; the deliverer ([`deliver::scheduler`]) schedules every
//!    queued message, claims it when due, and asks the mailbox's [`deliver::pacer::Pacer`]
//!    when an attempt may start (rate, sessions, hold).
//! 4. Each attempt applies the sender policy ([`deliver::sender`]) and hands the message to a
//!    [`transport::Transport`]: [`transport::smtp`] signs in with a token from [`oauth`].
//! 5. The transport's per-recipient outcomes are classified ([`deliver::classify`]: delivered,
//!    retry, hold, failed) and written back to the store; failures get a notice
//!    ([`deliver::notice`]), holds say what to fix in logs, `queue list`, `/healthz` and `check`.
//!
//! # Layout
//! - [`check`]: `smtp-oauth-relay check`, the diagnostic walk config → token → TLS → AUTH → send.
//! - [`config`]: the `relay.toml` schema, figment loading (defaults, file, `RELAY_*` env),
//!   validation; [`config::identity`] owns the rules for the Microsoft 365 values.
//! - [`inbound`]: the local SMTP listener and the per-connection session state machine.
//! - [`headers`]: the one reader of message header sections (on mail-parser), byte offsets kept.
//! - [`store`]: the Store seam, the one owner of where messages live (put, claim, update,
//!   complete, fail, hold, release, delete, retry, events); [`spool`] is its file
//!   implementation (commit protocol, recovery); [`queue_command`]: `queue ...` over it.
//! - [`deliver`]: the scheduler, the per-mailbox pacer, reply classification, sender policy.
//! - [`transport`]: the Transport seam and its SMTP XOAUTH2 implementation.
//! - [`oauth`]: Entra ID token sources (secret, certificate, federated) and the refresher.
//! - [`redact`]: the scrubber that removes every encoding of every held secret from upstream text.
//! - [`daemon`]: `serve`, wiring the parts together; [`supervise`]: its tasks, watched by name.
//! - [`setup`]: `smtp-oauth-relay setup`, the setup guide as one command (values, files, script, check).
//! - [`sendmail`]: `sendmail`/`mailq`/`newaliases` for cron, PHP and system tools: hands a
//!   message to the listener, or stores it in the drop directory ([`spool::maildrop`]).
//! - [`service`]: systemd notifications (READY, STOPPING, WATCHDOG, STATUS) and SIGHUP reload.
//! - [`admin`]: the admin HTTP endpoint (`/readyz`) and the `health` client.
//! - [`fds`]: the file-descriptor budget that keeps descriptors free for SMTP.
//! - [`sim`]: a stand-in for Entra ID and Exchange Online, used by tests, `simulate` and `serve --simulate`.
//!   It shares no code with the relay's upstream side on purpose: it is the independent party.

pub mod admin;
pub mod check;
pub mod config;
pub mod daemon;
pub mod deliver;
pub mod failpoint;
pub mod fds;
pub mod headers;
pub mod inbound;
pub mod metrics;
pub mod oauth;
pub mod queue_command;
pub mod redact;
pub mod routes;
pub mod sendmail;
pub mod service;
pub mod setup;
pub mod sim;
pub mod spool;
pub mod stop;
pub mod store;
pub mod supervise;
pub mod transport;
