//! EHLO and HELO: the extension lists Exchange Online advertises before and after STARTTLS.

use tokio::io::{AsyncRead, AsyncWrite};

use super::*;
use crate::sim::config::SimConfig;

impl Session {
    pub(super) async fn ehlo<S: AsyncRead + AsyncWrite + Unpin>(
        &mut self,
        conn: &mut Conn<S>,
        cfg: &SimConfig,
        host: &str,
        extended: bool,
    ) -> Step {
        if host.is_empty() {
            return self.reply(conn, "501 5.5.4 Invalid domain name").await;
        }
        self.reset_transaction();
        self.helo = true;
        let hello = format!("{} Hello [{}]", cfg.smtp.server_name, self.peer.ip());
        if !extended {
            return self.reply(conn, &format!("250 {hello}")).await;
        }
        // Exactly the recorded lists: STARTTLS before TLS, `AUTH LOGIN XOAUTH2` after it.
        let mut caps = vec![
            hello,
            format!("SIZE {}", cfg.smtp.advertised_size),
            "PIPELINING".into(),
            "DSN".into(),
            "ENHANCEDSTATUSCODES".into(),
        ];
        caps.push(if self.tls {
            "AUTH LOGIN XOAUTH2".into()
        } else {
            "STARTTLS".into()
        });
        if cfg.smtp.eight_bit_mime {
            caps.push("8BITMIME".into());
            caps.push("BINARYMIME".into());
        }
        caps.push("CHUNKING".into());
        if cfg.smtp.smtputf8 {
            caps.push("SMTPUTF8".into());
        }
        let last = caps.len() - 1;
        let text = caps
            .iter()
            .enumerate()
            .map(|(i, c)| format!("250{}{c}", if i == last { ' ' } else { '-' }))
            .collect::<Vec<_>>()
            .join("\r\n");
        self.reply(conn, &text).await
    }
}
