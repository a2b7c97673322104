//! SMTP replies. Every reply carries an enhanced status code (RFC 2034, RFC 3463) whose class
//! agrees with the basic code, and texts stay generic: nothing internal leaks to the client.

use std::borrow::Cow;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reply {
    pub code: u16,
    /// Enhanced status code, e.g. `"5.3.4"`.
    pub status: &'static str,
    pub text: Cow<'static, str>,
}

impl Reply {
    pub const fn new(code: u16, status: &'static str, text: &'static str) -> Reply {
        Reply {
            code,
            status,
            text: Cow::Borrowed(text),
        }
    }

    pub fn with_text(code: u16, status: &'static str, text: String) -> Reply {
        Reply {
            code,
            status,
            text: Cow::Owned(text),
        }
    }

    /// 4xx and 5xx replies count towards the per-session error budget.
    pub fn is_error(&self) -> bool {
        self.code >= 400
    }

    pub fn write_to(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(self.code.to_string().as_bytes());
        out.push(b' ');
        out.extend_from_slice(self.status.as_bytes());
        out.push(b' ');
        out.extend_from_slice(self.text.as_bytes());
        out.extend_from_slice(b"\r\n");
    }
}

pub const OK: Reply = Reply::new(250, "2.0.0", "OK");
pub const SENDER_OK: Reply = Reply::new(250, "2.1.0", "Sender OK");
pub const RECIPIENT_OK: Reply = Reply::new(250, "2.1.5", "Recipient OK");
pub const RESET: Reply = Reply::new(250, "2.0.0", "Reset state");
pub const BYE: Reply = Reply::new(221, "2.0.0", "Bye");
pub const START_DATA: Reply = Reply::new(354, "2.0.0", "Start mail input; end with <CRLF>.<CRLF>");
pub const START_TLS: Reply = Reply::new(220, "2.0.0", "Ready to start TLS");
/// RFC 5321 §4.5.1: VRFY must be supported, 252 answers it without disclosing anything.
pub const CANNOT_VRFY: Reply = Reply::new(
    252,
    "2.5.0",
    "Cannot VRFY user, but will accept message and attempt delivery",
);
pub const AUTH_OK: Reply = Reply::new(235, "2.7.0", "Authentication successful");

pub const SHUTTING_DOWN: Reply = Reply::new(
    421,
    "4.3.2",
    "Service shutting down, closing transmission channel",
);
pub const TOO_MANY_CONNECTIONS: Reply =
    Reply::new(421, "4.3.2", "Too many connections, try again later");
pub const TIMEOUT: Reply = Reply::new(421, "4.4.2", "Timeout exceeded, closing connection");
/// Postfix `smtpd_min_data_rate`: message data that trickles in is cut off.
pub const TOO_SLOW: Reply = Reply::new(
    421,
    "4.4.2",
    "Message data arrives too slowly, closing connection",
);
pub const TOO_MANY_ERRORS: Reply = Reply::new(421, "4.7.0", "Too many errors, closing connection");
pub const LOCAL_ERROR: Reply = Reply::new(
    451,
    "4.3.0",
    "Requested action aborted: local error in processing",
);
pub const NO_SPACE: Reply = Reply::new(452, "4.3.1", "Insufficient system storage");
/// RFC 5321 §4.5.3.1.10: too many recipients is a temporary 452, not 552.
pub const TOO_MANY_RECIPIENTS: Reply = Reply::new(452, "4.5.3", "Too many recipients");
pub const AUTH_TEMP_FAILURE: Reply = Reply::new(454, "4.7.0", "Temporary authentication failure");

pub const UNKNOWN_COMMAND: Reply = Reply::new(500, "5.5.1", "Command unrecognized");
pub const LINE_TOO_LONG: Reply = Reply::new(500, "5.5.2", "Line too long");
pub const NOT_HTTP: Reply = Reply::new(502, "5.5.1", "This is an SMTP server, not an HTTP server");
pub const NOT_IMPLEMENTED: Reply = Reply::new(502, "5.5.1", "Command not implemented");
pub const NEED_MAIL: Reply = Reply::new(503, "5.5.1", "Need MAIL command first");
pub const NESTED_MAIL: Reply = Reply::new(503, "5.5.1", "Sender already specified");
pub const NEED_RCPT: Reply = Reply::new(503, "5.5.1", "Need RCPT command first");
pub const NO_VALID_RECIPIENTS: Reply = Reply::new(554, "5.5.1", "No valid recipients");
pub const BAD_SEQUENCE: Reply = Reply::new(503, "5.5.1", "Bad sequence of commands");
pub const MIXED_DATA_BDAT: Reply = Reply::new(
    503,
    "5.5.1",
    "DATA and BDAT cannot be mixed in one transaction",
);
pub const ALREADY_TLS: Reply = Reply::new(503, "5.5.1", "TLS already active");
pub const ALREADY_AUTHENTICATED: Reply = Reply::new(503, "5.5.1", "Already authenticated");
pub const AUTH_MECHANISM_UNKNOWN: Reply =
    Reply::new(504, "5.5.4", "Unrecognized authentication type");
pub const AUTH_BAD_BASE64: Reply = Reply::new(501, "5.5.2", "Cannot Base64-decode client response");
pub const AUTH_CANCELLED: Reply = Reply::new(501, "5.0.0", "Authentication cancelled");
pub const AUTH_REQUIRED: Reply = Reply::new(530, "5.7.0", "Authentication required");
pub const ENCRYPTION_REQUIRED: Reply = Reply::new(
    538,
    "5.7.11",
    "Encryption required for requested authentication mechanism",
);
pub const AUTH_TOO_MANY_FAILURES: Reply = Reply::new(
    421,
    "4.7.0",
    "Too many failed authentications from this address, closing connection; try again later",
);
pub const AUTH_INVALID: Reply = Reply::new(535, "5.7.8", "Authentication credentials invalid");
pub const NOT_ALLOWED: Reply = Reply::new(
    554,
    "5.7.1",
    "Your address is not allowed to send mail through this relay",
);
/// RFC 1870 §6.1: a declared or actual size above the limit is a permanent failure.
pub const MESSAGE_TOO_BIG: Reply = Reply::new(
    552,
    "5.3.4",
    "Message size exceeds fixed maximum message size",
);
pub const BINARYMIME_UNSUPPORTED: Reply =
    Reply::new(555, "5.5.4", "BODY=BINARYMIME is not supported");
/// RFC 6531 §3.5: a non-ASCII address needs the SMTPUTF8 parameter.
pub const NEEDS_SMTPUTF8: Reply = Reply::new(
    553,
    "5.6.7",
    "Non-ASCII address requires the SMTPUTF8 parameter",
);

/// `550 5.7.1` at MAIL FROM: no route takes mail from this sender here (the reason names the
/// sender and the route, nothing secret).
pub fn no_route(reason: &crate::routes::NoRoute) -> Reply {
    Reply::with_text(550, "5.7.1", format!("Not accepted: {reason}"))
}
