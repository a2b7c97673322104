//! smtp-oauth-relay: accepts plain SMTP on loopback, spools every message durably, and
//! forwards the spool to Microsoft 365 with SASL XOAUTH2.
//!
//! # Layout
//! - [`check`]: `smtp-oauth-relay check`, the diagnostic walk config → token → TLS → AUTH → send.
//! - [`config`]: the `relay.toml` schema, figment loading (defaults, file, `RELAY_*` env), validation.
//! - [`inbound`]: the local SMTP listener and the per-connection session state machine.
//! - [`spool`]: the durable on-disk queue (commit protocol, recovery, operator commands).
//! - [`deliver`]: reply classification, the upstream XOAUTH2 session, the scheduler.
//! - [`oauth`]: Entra ID token sources (secret, certificate, federated) and the refresher.
//! - [`redact`]: the scrubber that removes every encoding of every held secret from upstream text.
//! - [`daemon`]: `serve`, wiring the parts together.
//! - [`service`]: systemd notifications (READY, STOPPING, WATCHDOG, STATUS) and SIGHUP reload.
//! - [`admin`]: the admin HTTP endpoint (`/readyz`) and the `health` client.
//! - [`sim`]: a stand-in for Entra ID and Exchange Online, used by tests, `simulate` and `serve --simulate`.
//!   It shares no code with the relay's upstream side on purpose: it is the independent party.

pub mod admin;
pub mod check;
pub mod config;
pub mod daemon;
pub mod deliver;
pub mod failpoint;
pub mod inbound;
pub mod metrics;
pub mod oauth;
pub mod redact;
pub mod service;
pub mod sim;
pub mod spool;
