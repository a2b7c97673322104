//! Microsoft Entra ID app-only tokens (client credentials, `SMTP.SendAsApp`) for XOAUTH2.
//!
//! - [`cloud`]: token URL, scope and SMTP host per cloud, with overrides.
//! - [`source`]: one token request with a client secret, a certificate-signed assertion or a
//!   federated assertion file; [`AccessToken`] (redacting `Debug`).
//! - [`error`]: response parsing, AADSTS errors, transient vs permanent, `Retry-After`.
//! - [`refresher`]: [`TokenProvider`], the background refresher the deliverer reads from.
//!
//! Nothing here logs or displays a secret, an assertion, a private key or a token.

pub mod cloud;
pub mod error;
pub mod refresher;
pub mod source;

pub use cloud::{Endpoints, endpoints};
pub use error::OAuthError;
pub use refresher::{TokenProvider, TokenState, TokenStatus};
pub use source::{AccessToken, TokenClient};
