//! Steps 4 to 6 for the SMTP transport: network and TLS, AUTH XOAUTH2 and the test message,
//! each failure explained with the reply Exchange gave and the fix.

use std::time::SystemTime;

use super::*;
use crate::config::looks_like_address;
use crate::deliver::classify::{HoldCause, Outcome, Stage, classify};
use crate::deliver::reply::{Enhanced, UpstreamReply};
use crate::transport::smtp::session::{SessionError, UpstreamSession};

pub(super) async fn connect(
    target: &crate::transport::smtp::session::UpstreamTarget,
) -> Result<(UpstreamSession, Step), Step> {
    let host = target
        .address
        .rsplit_once(':')
        .map_or(target.address.as_str(), |(h, _)| h)
        .to_string();
    let resolved = tokio::time::timeout(
        target.timeouts.connect,
        tokio::net::lookup_host(target.address.as_str()),
    )
    .await;
    let why = match resolved {
        Ok(Ok(addrs)) => (addrs.count() == 0).then(|| "no address".to_string()),
        Ok(Err(e)) => Some(e.to_string()),
        Err(_) => Some("no answer in time".into()),
    };
    if let Some(why) = why {
        return Err(Step::failed(
            "tls",
            format!("cannot resolve {host}: {why}"),
            "Check upstream.host (it defaults to smtp.office365.com, or the SMTP host of \
             upstream.cloud) and this host's DNS.",
        ));
    }
    let session = UpstreamSession::connect(target).await.map_err(|e| {
        let names = Names {
            mailbox: String::new(),
            from: String::new(),
            client_id: String::new(),
        };
        Step::failed("tls", session_detail(&e), connect_fix(&e, target, &names))
    })?;
    let peer = session
        .peer()
        .map(|p| p.to_string())
        .unwrap_or_else(|| "?".into());
    let tls = match session.tls_info() {
        Some((version, suite)) => {
            let version = match version.as_str() {
                "TLSv1_3" => "TLS 1.3".to_string(),
                "TLSv1_2" => "TLS 1.2".to_string(),
                other => other.to_string(),
            };
            format!("{version} ({suite})")
        }
        None => "TLS".to_string(),
    };
    let mode = match target.tls {
        crate::config::UpstreamTls::Starttls => "STARTTLS",
        crate::config::UpstreamTls::Implicit => "implicit TLS",
    };
    if !session.caps.xoauth2 {
        return Err(Step::failed(
            "tls",
            format!(
                "{} ({peer}): {mode}, {tls}, certificate verified, but AUTH XOAUTH2 is not offered",
                target.address
            ),
            HoldCause::ProtocolMismatch.fix(),
        ));
    }
    let detail = format!(
        "{} ({peer}): {mode}, {tls}, certificate verified for {}, AUTH XOAUTH2 offered",
        target.address, target.server_name
    );
    Ok((session, Step::ok("tls", detail)))
}

pub(super) fn connect_fix(
    e: &SessionError,
    target: &crate::transport::smtp::session::UpstreamTarget,
    names: &Names,
) -> String {
    match e {
        SessionError::Network { .. } | SessionError::Timeout { .. } => format!(
            "Check that this host can reach {} (outbound port {} is often blocked by firewalls or \
             hosting providers), and upstream.host, upstream.port and upstream.tls.",
            target.address,
            target.address.rsplit(':').next().unwrap_or("587"),
        ),
        _ => session_fix(e, names),
    }
}

/// The cause of a session failure: the exact reply when there is one.
pub(super) fn session_detail(e: &SessionError) -> String {
    match e {
        SessionError::Reply { stage, reply } => {
            format!("Exchange answered {}: {reply}", stage_words(*stage))
        }
        SessionError::Network { stage, message } => {
            format!("{}: {message}", stage_words(*stage))
        }
        SessionError::Timeout { stage, limit } => format!(
            "no answer {} within {}",
            stage_words(*stage),
            humantime::format_duration(*limit)
        ),
        SessionError::Certificate(m) => format!("the server certificate did not verify: {m}"),
        SessionError::Protocol { stage, what } => format!("{}: {what}", stage_words(*stage)),
        SessionError::Spool(e) => format!("reading the message: {e}"),
    }
}

pub(super) fn stage_words(stage: Stage) -> &'static str {
    match stage {
        Stage::Connect => "on connect",
        Stage::Ehlo => "to EHLO",
        Stage::StartTls => "to STARTTLS",
        Stage::Auth => "to AUTH XOAUTH2",
        Stage::MailFrom => "to MAIL FROM",
        Stage::RcptTo => "to RCPT TO",
        Stage::Data => "to DATA",
        Stage::DataEnd => "at the end of the message",
    }
}

pub(super) fn session_fix(e: &SessionError, names: &Names) -> String {
    match e {
        SessionError::Reply { stage, reply } => reply_fix(*stage, reply, names),
        SessionError::Network { .. } | SessionError::Timeout { .. } => {
            "The connection broke; run check again. If it keeps happening, check firewalls and \
             proxies between this host and upstream.host."
                .into()
        }
        SessionError::Certificate(_) => HoldCause::CertificateInvalid.fix().into(),
        SessionError::Protocol { .. } => HoldCause::ProtocolMismatch.fix().into(),
        SessionError::Spool(_) => {
            "The message could not be read back; check the disk that holds queue.dir.".into()
        }
    }
}

pub(super) fn is_535_573(e: &SessionError) -> bool {
    e.reply()
        .is_some_and(|r| r.code == 535 && r.enhanced != Some(Enhanced::new(5, 7, 139)))
}

/// The fix for an Exchange reply: the deliverer's [`HoldCause::fix`] where the reply holds the
/// mailbox, with the configured names filled in.
pub(super) fn reply_fix(stage: Stage, reply: &UpstreamReply, names: &Names) -> String {
    if reply.code == 430 || reply.enhanced == Some(Enhanced::new(4, 2, 0)) {
        return names.fill(
            "Exchange could not open the mail account's mailbox (mailbox logon failure). Check that \
             <mail_account> exists in Exchange Online (Get-EXOMailbox -Identity <mail_account>), that the \
             service principal has FullAccess on it (Add-MailboxPermission -Identity <mail_account> -User \
             <service principal> -AccessRights FullAccess), and that the service principal was created \
             with the Enterprise application's object id (New-ServicePrincipal -AppId <client_id> -ObjectId \
             <enterprise app object id>; Get-ServicePrincipal shows its Identity).",
        );
    }
    let text = match classify(stage, reply) {
        Outcome::Hold(cause) => cause.fix().to_string(),
        Outcome::Retry { .. } => {
            "Exchange answered with a temporary error; run check again in a few minutes.".into()
        }
        Outcome::Failed => "Exchange refused the message; the reply above names the reason.".into(),
        Outcome::Delivered => String::new(),
    };
    names.fill(&text)
}

pub(super) async fn send_test(session: &mut UpstreamSession, names: &Names, to: &str) -> Step {
    if !looks_like_address(to) {
        return Step::failed(
            "send",
            format!("--send-to `{to}` is not an e-mail address"),
            "Pass an address that can receive mail, e.g. --send-to you@contoso.com.",
        );
    }
    let body = crate::spool::MessageBody::from_bytes(test_message(
        &names.from,
        to,
        &names.mailbox,
        "through Exchange Online (SASL XOAUTH2)",
        "",
    ));
    let result = match session
        .send(&names.from, "", &[to.to_string()], &body)
        .await
    {
        Ok(r) => r,
        Err(e) => {
            return Step::failed("send", session_detail(&e), session_fix(&e, names));
        }
    };
    if let Some(Some(refused)) = result.recipients.first() {
        return Step::failed(
            "send",
            format!("Exchange refused the recipient {to}: {refused}"),
            reply_fix(Stage::RcptTo, refused, names),
        );
    }
    match result.data_reply {
        Some(r) if r.is_positive() => Step::ok(
            "send",
            format!("test message from {} to {to} accepted: {r}", names.from),
        ),
        Some(r) => Step::failed(
            "send",
            format!("Exchange answered at the end of the message: {r}"),
            reply_fix(Stage::DataEnd, &r, names),
        ),
        None => Step::failed(
            "send",
            "no recipient was accepted",
            "Check the --send-to address.",
        ),
    }
}

/// The message `check --send-to` sends; `through` and `after` say how it travelled.
pub(super) fn test_message(
    from: &str,
    to: &str,
    mailbox: &str,
    through: &str,
    after: &str,
) -> Vec<u8> {
    let now = SystemTime::now();
    let domain = mailbox.rsplit_once('@').map_or("localhost", |(_, d)| d);
    format!(
        "From: {from}\r\n\
         To: {to}\r\n\
         Subject: Test message from smtp-oauth-relay check\r\n\
         Date: {date}\r\n\
         Message-ID: <{id}.check@{domain}>\r\n\
         MIME-Version: 1.0\r\n\
         Content-Type: text/plain; charset=utf-8\r\n\
         Content-Transfer-Encoding: 7bit\r\n\
         \r\n\
         This is a test message from `smtp-oauth-relay check`.\r\n\
         \r\n\
         It was sent {through} as {mailbox} with an app-only OAuth2 token. If you can\r\n\
         read it, the relay can deliver mail.{after}\r\n",
        date = crate::inbound::message::rfc5322_date(now),
        id = ulid::Ulid::generate(),
    )
    .into_bytes()
}
