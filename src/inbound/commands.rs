//! One handler per SMTP verb (except DATA/BDAT in `data.rs` and AUTH in `auth.rs`).

use smtp_proto::{
    MAIL_BODY_BINARYMIME, MAIL_SMTPUTF8, MailFrom, RCPT_NOTIFY_DELAY, RCPT_NOTIFY_FAILURE,
    RCPT_NOTIFY_NEVER, RCPT_NOTIFY_SUCCESS, RcptTo, Request,
};

use super::auth::AuthPolicy;
use super::reply::{self, Reply};
use super::session::{Session, Transaction};

impl Session {
    /// Parses one command line (CRLF included) with smtp-proto, accepting two forms it refuses:
    /// - `MAIL FROM:addr` / `RCPT TO:addr` without angle brackets, as Postfix does by default
    ///   (`strict_rfc821_envelopes = no`) for old devices;
    /// - `RCPT TO:<Postmaster>` without a domain (RFC 5321 §4.5.1: must be accepted,
    ///   case-insensitive), delivered to `postmaster@` the domain of `upstream.from`
    ///   (see [`super::InboundSettings::postmaster`]).
    pub(super) fn parse_command(&self, line: &[u8]) -> Result<Request<String>, smtp_proto::Error> {
        let bracketed;
        let mut line = line;
        let mut parsed = Request::parse(&mut line.iter()).map(Request::into_owned);
        if matches!(parsed, Err(smtp_proto::Error::SyntaxError { .. }))
            && let Some(fixed) = bracket_bare_path(line)
        {
            bracketed = fixed;
            line = &bracketed;
            parsed = Request::parse(&mut line.iter()).map(Request::into_owned);
        }
        match parsed {
            // smtp-proto reads `<Postmaster>` as the empty path, which `<>` also gives.
            Ok(Request::Rcpt { mut to })
                if to.address.is_empty()
                    && path_of(line).is_some_and(|p| p.eq_ignore_ascii_case(b"postmaster")) =>
            {
                to.address = self.shared.settings.postmaster.clone();
                Ok(Request::Rcpt { to })
            }
            other => other,
        }
    }

    pub(super) async fn handle_command(&mut self, request: Request<String>) {
        match request {
            Request::Ehlo { host } => self.handle_ehlo(host),
            Request::Helo { host } => self.handle_helo(host),
            Request::Mail { from } => self.handle_mail(from),
            Request::Rcpt { to } => self.handle_rcpt(to),
            Request::Data => self.handle_data().await,
            Request::Bdat {
                chunk_size,
                is_last,
            } => self.handle_bdat(chunk_size, is_last).await,
            Request::Rset => self.handle_rset().await,
            Request::Noop { .. } => self.reply(reply::OK),
            Request::Quit => {
                self.reply(reply::BYE);
                self.close_after_reply();
            }
            Request::Vrfy { .. } => self.reply(reply::CANNOT_VRFY),
            Request::Help { .. } => self.handle_help(),
            Request::StartTls => self.handle_starttls(),
            Request::Auth {
                mechanism,
                initial_response,
            } => self.handle_auth(mechanism, initial_response).await,
            Request::Expn { .. }
            | Request::Lhlo { .. }
            | Request::Etrn { .. }
            | Request::Atrn { .. }
            | Request::Burl { .. } => self.reply(reply::NOT_IMPLEMENTED),
        }
    }

    /// RFC 5321 §4.1.1.1: EHLO resets the transaction and lists the extensions.
    fn handle_ehlo(&mut self, host: String) {
        self.start_over(host, true);
        let settings = &self.shared.settings;
        // RFC 5321 §4.1.1.1: the first line names this host; a plain greeting with the
        // client's address, as admins reading transcripts expect (RFC 2034 §3: no enhanced
        // code on EHLO/HELO replies).
        let mut lines = vec![
            format!("{} Hello {}", settings.hostname, self.client_literal()),
            "PIPELINING".to_string(),
            format!("SIZE {}", settings.max_message_size),
            "8BITMIME".to_string(),
            "SMTPUTF8".to_string(),
            "ENHANCEDSTATUSCODES".to_string(),
            "CHUNKING".to_string(),
        ];
        if settings.tls.is_some() && !self.tls {
            lines.push("STARTTLS".to_string());
        }
        if settings.auth != AuthPolicy::Off && self.auth_user.is_none() && self.auth_allowed() {
            lines.push("AUTH PLAIN LOGIN".to_string());
        }
        let mut out = Vec::with_capacity(256);
        for (i, line) in lines.iter().enumerate() {
            let sep = if i + 1 == lines.len() { ' ' } else { '-' };
            out.extend_from_slice(format!("250{sep}{line}\r\n").as_bytes());
        }
        self.reply_raw(&out);
    }

    /// `[127.0.0.1]` or `[IPv6:::1]` (RFC 5321 §4.1.3 address literals).
    fn client_literal(&self) -> String {
        match self.peer.ip().to_canonical() {
            std::net::IpAddr::V4(ip) => format!("[{ip}]"),
            std::net::IpAddr::V6(ip) => format!("[IPv6:{ip}]"),
        }
    }

    fn handle_helo(&mut self, host: String) {
        self.start_over(host, false);
        let text = format!(
            "250 {} Hello {}\r\n",
            self.shared.settings.hostname,
            self.client_literal()
        );
        self.reply_raw(text.as_bytes());
    }

    fn start_over(&mut self, host: String, esmtp: bool) {
        self.tx = None;
        self.helo = Some(host);
        self.esmtp = esmtp;
    }

    fn handle_mail(&mut self, from: MailFrom<String>) {
        if self.tx.is_some() {
            return self.reply(reply::NESTED_MAIL);
        }
        if self.shared.settings.auth.is_required() && self.auth_user.is_none() && !self.local {
            return self.reply(reply::AUTH_REQUIRED);
        }
        if from.flags & MAIL_BODY_BINARYMIME != 0 {
            return self.reply(reply::BINARYMIME_UNSUPPORTED);
        }
        if !from.address.is_ascii() && from.flags & MAIL_SMTPUTF8 == 0 {
            return self.reply(reply::NEEDS_SMTPUTF8);
        }
        // The route is chosen now (and stored with the message): its transport bounds the size.
        let (route, size_limit) = match self.shared.choose_route(
            &from.address,
            self.auth_user.as_deref(),
            self.listener,
        ) {
            Ok(chosen) => chosen,
            Err(reason) => {
                tracing::warn!(client = %self.peer, sender = %from.address, %reason, "no route: refused");
                return self.reply(reply::no_route(&reason));
            }
        };
        // RFC 1870 §6.1: refuse a declared size above the limit before any data is sent.
        let declared = from.size as u64;
        if declared > size_limit {
            return self.reply(reply::MESSAGE_TOO_BIG);
        }
        if let Err(reply) = self.shared.check_free_space(declared) {
            return self.reply(reply);
        }
        self.tx = Some(Transaction {
            mail_from: from.address,
            mail_flags: from.flags,
            env_id: from.env_id,
            recipients: Vec::new(),
            route,
            size_limit,
            bdat: None,
        });
        self.reply(reply::SENDER_OK);
    }

    fn handle_rcpt(&mut self, to: RcptTo<String>) {
        let max = self.shared.settings.max_recipients;
        let Some(tx) = self.tx.as_mut() else {
            return self.reply(reply::NEED_MAIL);
        };
        if to.address.is_empty() {
            return self.reply(Reply::new(501, "5.1.3", "Invalid recipient address"));
        }
        if !to.address.is_ascii() && tx.mail_flags & MAIL_SMTPUTF8 == 0 {
            return self.reply(reply::NEEDS_SMTPUTF8);
        }
        if tx.recipients.len() >= max {
            return self.reply(reply::TOO_MANY_RECIPIENTS);
        }
        tx.recipients.push(crate::spool::Recipient {
            address: to.address,
            notify: notify_text(to.flags),
            orcpt: to.orcpt,
        });
        self.reply(reply::RECIPIENT_OK);
    }

    async fn handle_rset(&mut self) {
        self.abort_bdat().await;
        self.reply(reply::RESET);
    }

    fn handle_help(&mut self) {
        let mut verbs = String::from("EHLO HELO MAIL RCPT DATA BDAT RSET NOOP QUIT VRFY HELP");
        if self.shared.settings.tls.is_some() && !self.tls {
            verbs.push_str(" STARTTLS");
        }
        if self.shared.settings.auth != AuthPolicy::Off {
            verbs.push_str(" AUTH");
        }
        self.reply(Reply::with_text(
            214,
            "2.0.0",
            format!("smtp-oauth-relay; commands: {verbs}"),
        ));
    }

    fn handle_starttls(&mut self) {
        if self.shared.settings.tls.is_none() {
            return self.reply(reply::NOT_IMPLEMENTED);
        }
        if self.tls {
            return self.reply(reply::ALREADY_TLS);
        }
        self.reply(reply::START_TLS);
        self.start_tls_after_reply();
    }
}

/// `MAIL FROM:a@b.c SIZE=1` → `MAIL FROM:<a@b.c> SIZE=1` (likewise `RCPT TO:`); `None` for
/// any other line, or one whose path is already bracketed or empty.
fn bracket_bare_path(line: &[u8]) -> Option<Vec<u8>> {
    let prefix_len = [&b"MAIL FROM:"[..], b"RCPT TO:"]
        .iter()
        .find(|p| line.len() >= p.len() && line[..p.len()].eq_ignore_ascii_case(p))?
        .len();
    let rest = &line[prefix_len..];
    let start = prefix_len + rest.iter().position(|&b| b != b' ')?;
    let len = line[start..]
        .iter()
        .position(|&b| matches!(b, b' ' | b'\r' | b'\n'))
        .unwrap_or(line.len() - start);
    if len == 0 || line[start] == b'<' {
        return None;
    }
    let mut fixed = Vec::with_capacity(line.len() + 2);
    fixed.extend_from_slice(&line[..start]);
    fixed.push(b'<');
    fixed.extend_from_slice(&line[start..start + len]);
    fixed.push(b'>');
    fixed.extend_from_slice(&line[start + len..]);
    Some(fixed)
}

/// The text between `<` and `>` after the command's colon.
fn path_of(line: &[u8]) -> Option<&[u8]> {
    let colon = line.iter().position(|&b| b == b':')?;
    let rest = &line[colon + 1..];
    let open = rest.iter().position(|&b| b != b' ')?;
    let rest = rest[open..].strip_prefix(b"<")?;
    let close = rest.iter().position(|&b| b == b'>')?;
    Some(&rest[..close])
}

/// RFC 3461 NOTIFY as stored in the spool (`SUCCESS,FAILURE`), `None` when not given.
fn notify_text(flags: u64) -> Option<String> {
    if flags & RCPT_NOTIFY_NEVER != 0 {
        return Some("NEVER".into());
    }
    let words: Vec<&str> = [
        (RCPT_NOTIFY_SUCCESS, "SUCCESS"),
        (RCPT_NOTIFY_FAILURE, "FAILURE"),
        (RCPT_NOTIFY_DELAY, "DELAY"),
    ]
    .iter()
    .filter(|(bit, _)| flags & bit != 0)
    .map(|(_, w)| *w)
    .collect();
    (!words.is_empty()).then(|| words.join(","))
}
