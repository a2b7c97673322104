//! From an upstream reply to what happens to the message: the outcome classes of DESIGN.md.
//!
//! | class | action |
//! |---|---|
//! | Delivered | remove from the spool |
//! | Retry | reschedule with backoff; `throttle` slows the whole mailbox |
//! | Hold | keep every message, pause the mailbox, probe slowly, tell the admin the fix |
//! | Failed | move to `failed/`, never retried automatically |
//!
//! The basic code and the enhanced code decide; text is consulted only where Exchange uses one
//! enhanced code for several conditions (`554 5.2.0`).

use std::fmt;

use super::reply::{Enhanced, UpstreamReply};

/// Where in the session a reply came.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stage {
    Connect,
    Ehlo,
    StartTls,
    Auth,
    MailFrom,
    RcptTo,
    Data,
    /// The reply to the final `.`.
    DataEnd,
}

/// Why the mailbox is held. Each cause knows the fix an admin applies (shown by logs, `queue
/// list`, and later `check` and `/healthz`).
/// Its serde name is how a hold is shared with other relays (see `store::budget`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum HoldCause {
    /// 535 5.7.139: SMTP AUTH is disabled for the tenant or the mailbox, or a policy blocks it.
    SmtpAuthDisabled,
    /// 535 5.7.3 (after one forced token refresh): Exchange does not accept the app for the mailbox.
    AuthenticationFailed,
    /// 550 5.7.30: basic authentication refused (should not happen with XOAUTH2).
    BasicAuthRefused,
    /// 550 5.7.60, 554 5.2.252, 554 5.2.0 SendAsDenied: the mailbox may not send as this From.
    SendAsDenied,
    /// 550 5.2.251-255: Exchange throttles the sender after continuous errors.
    ContinuousErrorThrottle,
    /// 554 5.2.0 SubmissionQuotaExceeded, 550 5.7.233: daily recipient limits.
    QuotaExceeded,
    /// 554 5.2.2: the mailbox (its Sent Items) is full.
    MailboxFull,
    /// 550 5.1.8: the account is in Restricted entities.
    SenderBlocked,
    /// 421 4.7.66: the TLS version was refused.
    TlsRefused,
    /// The server lacks STARTTLS or AUTH XOAUTH2, or rejects the exchange (504 5.7.4, 530 5.7.57).
    ProtocolMismatch,
    /// The server certificate did not verify.
    CertificateInvalid,
    /// Entra ID refused to issue a token (AADSTS error).
    TokenRefused,
    /// Graph `403 ErrorAccessDenied` (or `Authorization_RequestDenied`): no consented
    /// `Mail.Send`, or an RBAC scope that does not cover the mailbox.
    GraphAccessDenied,
    /// Graph `MailboxNotEnabledForRESTAPI`: the mailbox is inactive, soft-deleted, on-premises
    /// or unlicensed.
    GraphMailboxNotEnabled,
    /// Graph `ErrorInvalidUser` / `ResourceNotFound`: no mailbox by that name in the URL.
    GraphMailboxNotFound,
    /// Graph `401 InvalidAuthenticationToken` after one fresh token: wrong audience (scope or
    /// cloud) or a token Graph cannot read.
    GraphTokenRejected,
    /// Graph `NoPermissionsInAccessToken`: the token carries no application permission.
    GraphNoPermissions,
    /// Graph `403 ErrorAccessDenied` on a draft or an upload session (the large-message path,
    /// `upstream.graph_large_messages`): no consented `Mail.ReadWrite`.
    GraphReadWriteDenied,
}

impl HoldCause {
    /// What the admin should do, in one or two sentences.
    pub fn fix(self) -> &'static str {
        match self {
            HoldCause::SmtpAuthDisabled => {
                "Enable SMTP AUTH for the mail account: Set-CASMailbox -Identity <mail_account> \
                 -SmtpClientAuthenticationDisabled $false (and for the tenant: Set-TransportConfig \
                 -SmtpClientAuthenticationDisabled $false); Security defaults or Conditional Access may \
                 also block it. Where SMTP AUTH must stay off, deliver through Microsoft Graph instead: \
                 upstream.transport = \"graph\" (README: Microsoft Graph instead of SMTP AUTH)."
            }
            HoldCause::AuthenticationFailed => {
                "Register the app's service principal in Exchange with the Enterprise application's \
                 object id (New-ServicePrincipal -AppId <client_id> -ObjectId <enterprise app object id>), \
                 grant it FullAccess on the mail account (Add-MailboxPermission -Identity <mail_account> \
                 -User <service principal> -AccessRights FullAccess), and check admin consent for \
                 SMTP.SendAsApp."
            }
            HoldCause::BasicAuthRefused => {
                "Exchange saw basic authentication; check that upstream.host is the Exchange Online \
                 endpoint of your cloud."
            }
            HoldCause::SendAsDenied => {
                "Grant SendAs for the From address to the mail account's service principal \
                 (Add-RecipientPermission -Identity <from> -Trustee <service principal> -AccessRights \
                 SendAs), or set upstream.from / upstream.rewrite_from so the header From is an address \
                 the mailbox may send as."
            }
            HoldCause::ContinuousErrorThrottle => {
                "Exchange throttles this sender after repeated errors; fix the cause named in the reply. \
                 The throttle lifts by itself after a while; support cannot lift it."
            }
            HoldCause::QuotaExceeded => {
                "The mailbox or tenant reached its daily recipient limit; delivery resumes when the \
                 rolling window frees up."
            }
            HoldCause::MailboxFull => {
                "The mail account's mailbox is full (sent mail is saved in Sent Items); free space or \
                 raise its quota."
            }
            HoldCause::SenderBlocked => {
                "The mail account is in Restricted entities (Microsoft Defender portal); release it."
            }
            HoldCause::TlsRefused => {
                "Exchange refused the TLS version; the relay needs TLS 1.2 or newer."
            }
            HoldCause::ProtocolMismatch => {
                "The upstream server does not speak Exchange Online's protocol (STARTTLS then AUTH \
                 XOAUTH2); check upstream.host, upstream.port and upstream.tls."
            }
            HoldCause::CertificateInvalid => {
                "The upstream certificate did not verify; check upstream.host, upstream.tls_server_name \
                 and upstream.ca_file."
            }
            HoldCause::TokenRefused => {
                "Entra ID refused the token request; the AADSTS code in the reply names the problem \
                 (e.g. 7000215 wrong secret value, 700016 app not in this tenant, 90002 tenant not found)."
            }
            HoldCause::GraphAccessDenied => {
                "The app may not send as the Mail Account through Graph. Either open API permissions, \
                 Add a permission, Microsoft Graph, Application permissions, Mail.Send, and Grant admin \
                 consent; or (least privilege) in Exchange Online PowerShell: New-ServicePrincipal \
                 -AppId <client_id> -ObjectId <Enterprise applications Object ID>, New-ManagementScope \
                 -Name relay-senders -RecipientRestrictionFilter \"PrimarySmtpAddress -eq \
                 '<mail_account>'\", New-ManagementRoleAssignment -App <client_id> -Role \"Application \
                 Mail.Send\" -CustomResourceScope relay-senders, then Test-ServicePrincipalAuthorization \
                 -Identity <client_id> -Resource <mail_account> (changes take 15-30 minutes, an \
                 Application Access Policy over an hour)."
            }
            HoldCause::GraphMailboxNotEnabled => {
                "The Mail Account must be an Exchange Online mailbox with a licence (or a shared \
                 mailbox), not soft-deleted or on-premises: check it with Get-EXOMailbox -Identity \
                 <mail_account>."
            }
            HoldCause::GraphMailboxNotFound => {
                "Graph knows no mailbox by the Mail Account: set upstream.mail_account to the mailbox's \
                 primary SMTP address or user principal name (Get-EXOMailbox -Identity <mail_account> | \
                 Format-List PrimarySmtpAddress,UserPrincipalName)."
            }
            HoldCause::GraphTokenRejected => {
                "Graph refused the token even after a fresh one: its audience must be Microsoft Graph of \
                 your cloud. Remove oauth.scope to derive it (https://graph.microsoft.com/.default for \
                 global), and check upstream.cloud."
            }
            HoldCause::GraphNoPermissions => {
                "The token carries no application permission: open API permissions, Add a permission, \
                 Microsoft Graph, Application permissions, Mail.Send, and Grant admin consent (or assign \
                 the RBAC role \"Application Mail.Send\" with New-ManagementRoleAssignment)."
            }
            HoldCause::GraphReadWriteDenied => {
                "Messages larger than sendMail takes go through a draft and upload sessions \
                 (upstream.graph_large_messages), which need Mail.ReadWrite: open API permissions, Add \
                 a permission, Microsoft Graph, Application permissions, Mail.ReadWrite, and Grant \
                 admin consent; or (RBAC for Applications) New-ManagementRoleAssignment -App \
                 <client_id> -Role \"Application Mail.ReadWrite\" -CustomResourceScope relay-senders. \
                 Without that grant, set upstream.graph_large_messages = false: larger messages are \
                 then refused at accept (552 5.3.4)."
            }
        }
    }
}

impl fmt::Display for HoldCause {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let name = match self {
            HoldCause::SmtpAuthDisabled => "SMTP AUTH disabled",
            HoldCause::AuthenticationFailed => "authentication failed",
            HoldCause::BasicAuthRefused => "basic authentication refused",
            HoldCause::SendAsDenied => "SendAs denied",
            HoldCause::ContinuousErrorThrottle => "sender throttled after continuous errors",
            HoldCause::QuotaExceeded => "sending quota exceeded",
            HoldCause::MailboxFull => "mailbox full",
            HoldCause::SenderBlocked => "sender blocked",
            HoldCause::TlsRefused => "TLS version refused",
            HoldCause::ProtocolMismatch => "protocol mismatch",
            HoldCause::CertificateInvalid => "certificate invalid",
            HoldCause::TokenRefused => "token refused",
            HoldCause::GraphAccessDenied => "Graph access denied",
            HoldCause::GraphMailboxNotEnabled => "mailbox not enabled for Graph",
            HoldCause::GraphMailboxNotFound => "mailbox not found by Graph",
            HoldCause::GraphTokenRejected => "Graph rejected the token",
            HoldCause::GraphNoPermissions => "no permissions in the token",
            HoldCause::GraphReadWriteDenied => "Graph drafts denied (no Mail.ReadWrite)",
        };
        f.write_str(name)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Delivered,
    /// Try again later. `throttle`: the server asked the whole mailbox to slow down.
    Retry {
        throttle: bool,
    },
    Hold(HoldCause),
    Failed,
}

const fn e(class: u8, subject: u16, detail: u16) -> Enhanced {
    Enhanced::new(class, subject, detail)
}

/// Classifies a negative (4xx/5xx) reply, or a positive reply to the final dot.
pub fn classify(stage: Stage, reply: &UpstreamReply) -> Outcome {
    let code = reply.code;
    if reply.is_positive() {
        return if stage == Stage::DataEnd {
            Outcome::Delivered
        } else {
            // A positive reply where the session expected a different step is a protocol error.
            Outcome::Retry { throttle: false }
        };
    }
    let esc = reply.enhanced;
    let has = |en: Enhanced| esc == Some(en);
    let text = reply.text.to_ascii_lowercase();

    // Configuration and mailbox-wide conditions first: they hold, whatever the stage.
    if code == 535 {
        return Outcome::Hold(if has(e(5, 7, 139)) {
            HoldCause::SmtpAuthDisabled
        } else {
            HoldCause::AuthenticationFailed
        });
    }
    if has(e(5, 7, 30)) {
        return Outcome::Hold(HoldCause::BasicAuthRefused);
    }
    if code == 421 && has(e(4, 7, 66)) {
        return Outcome::Hold(HoldCause::TlsRefused);
    }
    if (code == 504 && stage == Stage::Auth) || has(e(5, 7, 57)) {
        return Outcome::Hold(HoldCause::ProtocolMismatch);
    }
    if has(e(5, 7, 60)) || (code == 554 && has(e(5, 2, 252))) {
        return Outcome::Hold(HoldCause::SendAsDenied);
    }
    if let Some(en) = esc
        && code == 550
        && en.class == 5
        && en.subject == 2
        && (251..=255).contains(&en.detail)
    {
        return Outcome::Hold(HoldCause::ContinuousErrorThrottle);
    }
    if has(e(5, 2, 0)) {
        // Exchange reuses 5.2.0 for several store-driver failures; the exception name decides.
        if text.contains("sendasdenied") {
            return Outcome::Hold(HoldCause::SendAsDenied);
        }
        if text.contains("submissionquotaexceeded") {
            return Outcome::Hold(HoldCause::QuotaExceeded);
        }
        return Outcome::Failed;
    }
    if has(e(5, 7, 233)) || has(e(5, 1, 90)) {
        return Outcome::Hold(HoldCause::QuotaExceeded);
    }
    if has(e(5, 2, 2)) {
        return Outcome::Hold(HoldCause::MailboxFull);
    }
    if has(e(5, 1, 8)) {
        return Outcome::Hold(HoldCause::SenderBlocked);
    }

    if reply.is_transient() {
        // 432 4.3.2 (sender thread limit) and 421 (closing) mean: fewer, slower connections.
        let throttle = code == 421 || code == 432 || has(e(4, 3, 2));
        return Outcome::Retry { throttle };
    }
    // Any other 5xx is about this message or recipient.
    if (500..600).contains(&code) {
        return Outcome::Failed;
    }
    Outcome::Retry { throttle: false }
}

/// Classifies a Microsoft Graph answer to `sendMail` (reference `graph-transport.md` §3.3) by
/// HTTP status and `error.code`, never by the message text. `401 InvalidAuthenticationToken` is
/// a hold here: the transport refreshes the token once before it gets this far.
pub fn classify_graph(status: u16, code: Option<&str>) -> Outcome {
    use HoldCause::*;
    if status == 202 {
        // Final: Exchange took the message, whatever other headers came with it.
        return Outcome::Delivered;
    }
    match code.unwrap_or("") {
        "ErrorAccessDenied" | "Authorization_RequestDenied" => Outcome::Hold(GraphAccessDenied),
        // The From the mailbox may not send as: the configured from or rewrite_from is wrong.
        "ErrorSendAsDenied" => Outcome::Hold(SendAsDenied),
        "MailboxNotEnabledForRESTAPI" => Outcome::Hold(GraphMailboxNotEnabled),
        "ErrorInvalidUser" | "ResourceNotFound" => Outcome::Hold(GraphMailboxNotFound),
        "ErrorQuotaExceeded" => Outcome::Hold(MailboxFull),
        "InvalidAuthenticationToken" => Outcome::Hold(GraphTokenRejected),
        "NoPermissionsInAccessToken" => Outcome::Hold(GraphNoPermissions),
        // About this message: never better on a retry.
        "ErrorInvalidRecipients"
        | "ErrorMessageSizeExceeded"
        | "ErrorMimeContentInvalidBase64String" => Outcome::Failed,
        "ApplicationThrottled" => Outcome::Retry { throttle: true },
        // Mailbox moves and store hiccups; the message's max_age bounds the retries.
        "MailboxInfoStale" | "ErrorMailboxStoreUnavailable" | "ErrorNonExistentMailBox" => {
            Outcome::Retry { throttle: false }
        }
        "ErrorServerBusy" | "CommandConcurrencyLimitReached" => Outcome::Retry { throttle: true },
        _ => match status {
            429 => Outcome::Retry { throttle: true },
            401 => Outcome::Hold(GraphTokenRejected),
            403 => Outcome::Hold(GraphAccessDenied),
            404 => Outcome::Hold(GraphMailboxNotFound),
            413 => Outcome::Failed,
            // 503 and 504 are Graph's "come back later"; any other 5xx is the server's problem.
            500..=599 => Outcome::Retry {
                throttle: status == 503,
            },
            // An unknown 4xx is about this request.
            400..=499 => Outcome::Failed,
            // 200 instead of 202 was seen for oversized MIME (graph-docs #3079): not a success.
            _ => Outcome::Retry { throttle: false },
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reply(line: &str) -> UpstreamReply {
        UpstreamReply::parse(&[line.to_string()]).expect("reply")
    }

    /// Every reply of the reference catalogue (exchange-online-protocol.md §2.5), with its class.
    #[test]
    fn the_reference_catalogue() {
        use HoldCause::*;
        use Outcome::*;
        use Stage::*;
        let table: &[(Stage, &str, Outcome)] = &[
            (
                DataEnd,
                "250 2.0.0 OK <CH2PR14MB4005@CH2PR14MB4005.namprd14.prod.outlook.com> [Hostname=CH2PR14MB4005.namprd14.prod.outlook.com]",
                Delivered,
            ),
            (
                Auth,
                "535 5.7.3 Authentication unsuccessful [SN2PR00CA0018.namprd00.prod.outlook.com]",
                Hold(AuthenticationFailed),
            ),
            (
                Auth,
                "535 5.7.139 Authentication unsuccessful, SmtpClientAuthentication is disabled for the Tenant. Visit https://aka.ms/smtp_auth_disabled for more information.",
                Hold(SmtpAuthDisabled),
            ),
            (
                Auth,
                "535 5.7.139 Authentication unsuccessful, SmtpClientAuthentication is disabled for the Mailbox. Visit https://aka.ms/smtp_auth_disabled for more information.",
                Hold(SmtpAuthDisabled),
            ),
            (
                Auth,
                "535 5.7.139 Authentication unsuccessful, the request did not meet the criteria to be authenticated successfully. Contact your administrator.",
                Hold(SmtpAuthDisabled),
            ),
            (
                Auth,
                "535 5.7.139 Authentication unsuccessful, user is locked by your organization's security defaults policy. Contact your administrator.",
                Hold(SmtpAuthDisabled),
            ),
            (
                Auth,
                "535 5.7.139 Authentication unsuccessful, basic authentication is disabled.",
                Hold(SmtpAuthDisabled),
            ),
            (
                Auth,
                "535 5.7.139 Authentication unsuccessful, the user credentials were incorrect.",
                Hold(SmtpAuthDisabled),
            ),
            (
                Auth,
                "550 5.7.30 Basic authentication is not supported for Client Submission.",
                Hold(BasicAuthRefused),
            ),
            (
                Auth,
                "504 5.7.4 Unrecognized authentication type",
                Hold(ProtocolMismatch),
            ),
            (
                MailFrom,
                "530 5.7.57 Client not authenticated to send mail",
                Hold(ProtocolMismatch),
            ),
            (
                Ehlo,
                "421 4.7.66 TLS 1.0 and 1.1 are not supported. Please upgrade/update your client to support TLS 1.2. Visit https://aka.ms/smtp_auth_tls.",
                Hold(TlsRefused),
            ),
            (
                DataEnd,
                "550 5.7.60 SMTP; Client does not have permissions to send as this sender",
                Hold(SendAsDenied),
            ),
            (
                DataEnd,
                "554 5.2.252 SendAsDenied; relay@contoso.com not allowed to send as other@contoso.com; STOREDRV.Submission.Exception:SendAsDeniedException.MapiExceptionSendAsDenied; Failed to process message due to a permanent exception with message [BeginDiagnosticData]Cannot submit message. 0.35250:0A00",
                Hold(SendAsDenied),
            ),
            (
                DataEnd,
                "554 5.2.0 STOREDRV.Submission.Exception:SendAsDeniedException.MapiExceptionSendAsDenied; Failed to process message due to a permanent exception with message Cannot submit message.",
                Hold(SendAsDenied),
            ),
            (
                MailFrom,
                "550 5.2.252 Sender throttled due to continuous send as denied errors.",
                Hold(ContinuousErrorThrottle),
            ),
            (
                MailFrom,
                "550 5.2.251 Sender throttled due to continuous mailbox full errors.",
                Hold(ContinuousErrorThrottle),
            ),
            (
                MailFrom,
                "550 5.2.253 Sender throttled due to continuous invalid license errors.",
                Hold(ContinuousErrorThrottle),
            ),
            (
                MailFrom,
                "550 5.2.254 Sender throttled due to continuous too many recipients errors.",
                Hold(ContinuousErrorThrottle),
            ),
            (
                MailFrom,
                "550 5.2.255 Sender throttled due to continuous invalid recipients errors.",
                Hold(ContinuousErrorThrottle),
            ),
            (
                DataEnd,
                "432 4.3.2 STOREDRV.ClientSubmit; sender thread limit exceeded [Hostname=X.namprd08.prod.outlook.com]",
                Retry { throttle: true },
            ),
            (
                DataEnd,
                "554 5.2.0 STOREDRV.Submission.Exception:SubmissionQuotaExceededException.MapiExceptionQuotaExceeded; Cannot submit message.",
                Hold(QuotaExceeded),
            ),
            (
                DataEnd,
                "554 5.2.2 mailbox full; STOREDRV.Submission.Exception:QuotaExceededException.MapiExceptionShutoffQuotaExceeded",
                Hold(MailboxFull),
            ),
            (
                DataEnd,
                "430 4.2.0 STOREDRV; mailbox logon failure; STOREDRV.Submission.Exception:ConnectionFailedTransientException.MapiExceptionLogonFailed; Failed to process message due to a transient exception with message [BeginDiagnosticData]Cannot open mailbox.",
                Retry { throttle: false },
            ),
            (
                RcptTo,
                "451 4.7.0 Temporary server error. Please try again later. PRX4 [host]",
                Retry { throttle: false },
            ),
            (
                DataEnd,
                "451 4.3.111 Temporary server error. Please try again later MRH1 [Hostname=X]",
                Retry { throttle: false },
            ),
            (
                MailFrom,
                "451 4.7.500 Server busy. Please try again later from [1.2.3.4]. (S77719)",
                Retry { throttle: false },
            ),
            (
                MailFrom,
                "450 4.7.650 Access denied, please try again later",
                Retry { throttle: false },
            ),
            (
                Data,
                "421 4.3.2 Service not available, closing transmission channel",
                Retry { throttle: true },
            ),
            (
                RcptTo,
                "452 4.5.3 Too many recipients",
                Retry { throttle: false },
            ),
            (
                MailFrom,
                "552 5.3.4 Message size exceeds fixed maximum message size",
                Failed,
            ),
            (
                DataEnd,
                "552 5.3.4 Header size exceeds fixed maximum size",
                Failed,
            ),
            (
                DataEnd,
                "554 5.2.0 MapiExceptionMaxSubmissionExceeded; Message size exceeds maximum size limit.; STOREDRV.Submission.Exception:MessageSubmissionExceededException.MapiExceptionMaxSubmissionExceeded; Failed to process message due to a permanent exception with message [BeginDiagnosticData]Cannot save changes made to an item to store.",
                Failed,
            ),
            (
                DataEnd,
                "554 5.6.211 Invalid MIME Content: Single text value size (33061) exceeded allowed maximum (32768) for the 'Autocrypt' header.",
                Failed,
            ),
            (DataEnd, "550 5.6.11 Invalid characters", Failed),
            (
                MailFrom,
                "550 5.1.8 Access denied, bad outbound sender",
                Hold(SenderBlocked),
            ),
            (
                DataEnd,
                "550 5.7.233 - Your message can't be sent because your tenant has exceeded its daily limit for sending email to external recipients (tenant external recipient rate limit).",
                Hold(QuotaExceeded),
            ),
            (
                RcptTo,
                "550 5.1.10 RESOLVER.ADR.RecipientNotFound; Recipient not found by SMTP address lookup",
                Failed,
            ),
            (Connect, "500 5.3.3 Unrecognized command 'FOO'", Failed),
        ];
        for (stage, line, expected) in table {
            assert_eq!(classify(*stage, &reply(line)), *expected, "{line}");
        }
    }

    #[test]
    fn basic_code_decides_when_there_is_no_enhanced_code() {
        assert_eq!(
            classify(Stage::RcptTo, &reply("450 mailbox busy")),
            Outcome::Retry { throttle: false }
        );
        assert_eq!(
            classify(Stage::RcptTo, &reply("550 no such user")),
            Outcome::Failed
        );
        assert_eq!(
            classify(Stage::Auth, &reply("535 Authentication failed")),
            Outcome::Hold(HoldCause::AuthenticationFailed)
        );
    }

    /// Every row of the reference's Graph error table (graph-transport.md §3.3), with its class.
    #[test]
    fn the_graph_error_table() {
        use HoldCause::*;
        use Outcome::*;
        let table: &[(u16, Option<&str>, Outcome)] = &[
            (202, None, Delivered),
            (403, Some("ErrorAccessDenied"), Hold(GraphAccessDenied)),
            (403, Some("ErrorSendAsDenied"), Hold(SendAsDenied)),
            (
                404,
                Some("MailboxNotEnabledForRESTAPI"),
                Hold(GraphMailboxNotEnabled),
            ),
            (404, Some("ErrorInvalidUser"), Hold(GraphMailboxNotFound)),
            (404, Some("ResourceNotFound"), Hold(GraphMailboxNotFound)),
            (400, Some("ErrorInvalidRecipients"), Failed),
            (400, Some("ErrorMessageSizeExceeded"), Failed),
            (413, None, Failed),
            (400, Some("ErrorMimeContentInvalidBase64String"), Failed),
            (507, Some("ErrorQuotaExceeded"), Hold(MailboxFull)),
            (
                503,
                Some("ErrorMailboxStoreUnavailable"),
                Retry { throttle: false },
            ),
            (503, Some("MailboxInfoStale"), Retry { throttle: false }),
            (
                404,
                Some("ErrorNonExistentMailBox"),
                Retry { throttle: false },
            ),
            (429, Some("ApplicationThrottled"), Retry { throttle: true }),
            (503, Some("ErrorServerBusy"), Retry { throttle: true }),
            (
                500,
                Some("ErrorInternalServerError"),
                Retry { throttle: false },
            ),
            (500, Some("UnknownError"), Retry { throttle: false }),
            (429, Some("UnknownError"), Retry { throttle: true }),
            (
                503,
                Some("CommandConcurrencyLimitReached"),
                Retry { throttle: true },
            ),
            (504, None, Retry { throttle: false }),
            (
                401,
                Some("InvalidAuthenticationToken"),
                Hold(GraphTokenRejected),
            ),
            (
                401,
                Some("NoPermissionsInAccessToken"),
                Hold(GraphNoPermissions),
            ),
            (
                403,
                Some("Authorization_RequestDenied"),
                Hold(GraphAccessDenied),
            ),
            (400, Some("SomethingNew"), Failed),
            (200, None, Retry { throttle: false }),
        ];
        for (status, code, expected) in table {
            assert_eq!(
                classify_graph(*status, *code),
                *expected,
                "{status} {code:?}"
            );
        }
    }

    #[test]
    fn every_hold_cause_has_a_fix() {
        for cause in [
            HoldCause::SmtpAuthDisabled,
            HoldCause::AuthenticationFailed,
            HoldCause::SendAsDenied,
            HoldCause::TokenRefused,
            HoldCause::GraphAccessDenied,
            HoldCause::GraphMailboxNotEnabled,
            HoldCause::GraphMailboxNotFound,
            HoldCause::GraphTokenRejected,
            HoldCause::GraphNoPermissions,
        ] {
            assert!(cause.fix().len() > 40, "{cause}");
        }
    }
}
