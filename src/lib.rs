//! smtp-oauth-relay: accepts plain SMTP on loopback, spools every message durably, and
//! forwards the spool to Microsoft 365 with SASL XOAUTH2.
//!
//! # Layout
//! - [`check`]: `smtp-oauth-relay check`, the diagnostic walk config → token → TLS → AUTH → send.
//! - [`config`]: the `relay.toml` schema, figment loading (defaults, file, `RELAY_*` env), validation.
//! - [`inbound`]: the local SMTP listener and the per-connection session state machine.
//! - [`spool`]: the durable on-disk queue (commit protocol, recovery, operator commands).
//! - [`sim`]: a stand-in for Entra ID and Exchange Online, used by tests, `simulate` and `serve --simulate`.
//!   It shares no code with the relay's upstream side on purpose: it is the independent party.

pub mod check;
pub mod config;
pub mod daemon;
pub mod deliver;
pub mod inbound;
pub mod oauth;
pub mod sim;
pub mod spool;
