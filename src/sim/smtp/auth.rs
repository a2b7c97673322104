//! AUTH XOAUTH2 (two-step and inline) and the permission model behind it.

use base64::Engine;
use tokio::io::{AsyncRead, AsyncWrite};

use super::*;
use crate::sim::config::{SEND_AS_APP_ROLE, SimConfig};
use crate::sim::token::verify_access_token;

impl Session {
    /// Reads one SASL continuation line; `None` when the connection is gone.
    pub(super) async fn sasl_line<S: AsyncRead + AsyncWrite + Unpin>(
        &self,
        conn: &mut Conn<S>,
        cfg: &SimConfig,
        challenge: &str,
    ) -> Option<String> {
        if !conn.write(challenge).await {
            return None;
        }
        match conn.line(cfg.smtp.idle_timeout).await {
            Ok(l) => Some(l),
            Err(ReadEnd::Idle) => {
                let _ = conn
                    .write(&format!(
                        "451 4.7.0 Timeout waiting for client input {}",
                        self.suffix(cfg)
                    ))
                    .await;
                None
            }
            Err(_) => None,
        }
    }

    pub(super) async fn auth<S: AsyncRead + AsyncWrite + Unpin>(
        &mut self,
        conn: &mut Conn<S>,
        cfg: &SimConfig,
        args: &str,
    ) -> Step {
        let mut parts = args.split_whitespace();
        let mechanism = parts.next().unwrap_or_default().to_ascii_uppercase();
        let initial = parts.next().map(str::to_string);
        if !self.tls || !(mechanism == "XOAUTH2" || mechanism == "LOGIN") {
            // Before TLS no AUTH is advertised at all; PLAIN and others are never offered.
            return self
                .reply(
                    conn,
                    &format!(
                        "504 5.7.4 Unrecognized authentication type {}",
                        self.suffix(cfg)
                    ),
                )
                .await;
        }
        if !self.helo {
            return self.reply(conn, "503 5.5.1 Bad sequence of commands").await;
        }
        if self.auth.is_some() {
            return self.reply(conn, "503 5.5.1 Bad sequence of commands").await;
        }
        if mechanism == "LOGIN" {
            // Basic authentication: read both prompts' answers, then refuse.
            for prompt in ["334 VXNlcm5hbWU6", "334 UGFzc3dvcmQ6"] {
                match self.sasl_line(conn, cfg, prompt).await {
                    None => return Step::Close,
                    Some(l) if l.trim() == "*" => {
                        return self.reply(conn, "501 5.0.0 Authentication cancelled").await;
                    }
                    Some(_) => {}
                }
            }
            // Since the Basic retirement Exchange refuses Basic outright (reference §2.5, [DOC]).
            let text = if cfg.smtp.smtp_auth_disabled {
                tenant_disabled_text()
            } else {
                "550 5.7.30 Basic authentication is not supported for Client Submission."
                    .to_string()
            };
            return self
                .reply(conn, &format!("{text} {}", self.suffix(cfg)))
                .await;
        }
        let blob = match initial {
            Some(ir) if ir != "=" => ir,
            _ => match self.sasl_line(conn, cfg, "334 ").await {
                None => return Step::Close,
                Some(l) => l.trim().to_string(),
            },
        };
        if blob == "*" {
            return self.reply(conn, "501 5.0.0 Authentication cancelled").await;
        }
        let Ok(raw) = base64::engine::general_purpose::STANDARD.decode(blob.as_bytes()) else {
            return self.reply(conn, "501 5.5.4 Invalid arguments").await;
        };
        match self.check_xoauth2(cfg, &raw) {
            Ok(auth) => {
                self.auth = Some(auth);
                self.reply(conn, "235 2.7.0 Authentication successful")
                    .await
            }
            Err(text) => {
                self.reply(conn, &format!("{text} {}", self.suffix(cfg)))
                    .await
            }
        }
    }

    /// The permission model of §1.7 and §2.4. Err carries the reply without its suffix.
    pub(super) fn check_xoauth2(
        &self,
        cfg: &SimConfig,
        raw: &[u8],
    ) -> Result<Authenticated, String> {
        let generic = || "535 5.7.3 Authentication unsuccessful".to_string();
        let text = String::from_utf8_lossy(raw);
        let mut user = None;
        let mut bearer = None;
        for field in text.split('\x01') {
            if let Some(u) = field.strip_prefix("user=") {
                user = Some(u.trim().to_string());
            } else if let Some(a) = field.strip_prefix("auth=")
                // `get` rather than slicing: the blob is client data and may split a UTF-8 character.
                && a.get(..7).is_some_and(|p| p.eq_ignore_ascii_case("bearer "))
                && let Some(t) = a.get(7..)
            {
                bearer = Some(t.trim().to_string());
            }
        }
        let (Some(user), Some(token)) = (user, bearer) else {
            return Err(generic());
        };
        let identity = verify_access_token(&self.ctx.shared, cfg, &token).ok_or_else(generic)?;
        let client = cfg.client(&identity.appid).ok_or_else(generic)?;
        if !client.exchange_service_principal {
            return Err(generic());
        }
        let has_role = identity
            .roles
            .as_ref()
            .is_some_and(|r| r.iter().any(|x| x == SEND_AS_APP_ROLE));
        if !cfg.smtp.rbac_mode && !has_role {
            return Err(generic());
        }
        let mailbox = cfg
            .mailbox(&user)
            .filter(|m| m.full_access)
            .ok_or_else(generic)?;
        if cfg.smtp.smtp_auth_disabled {
            return Err(tenant_disabled_text());
        }
        if mailbox.smtp_auth_disabled {
            return Err("535 5.7.139 Authentication unsuccessful, SmtpClientAuthentication is disabled for the \
                        Mailbox. Visit https://aka.ms/smtp_auth_disabled for more information."
                .to_string());
        }
        let key = mailbox.address.to_ascii_lowercase();
        {
            let mut usage = self.ctx.shared.usage();
            let u = usage.entry(key.clone()).or_default();
            u.active_sessions += 1;
            u.peak_sessions = u.peak_sessions.max(u.active_sessions);
        }
        Ok(Authenticated {
            mailbox: key.clone(),
            appid: identity.appid,
            _guard: ActiveGuard {
                shared: self.ctx.shared.clone(),
                mailbox: key,
            },
        })
    }
}
