//! What a message needs from the upstream server's SMTP extensions, decided before MAIL FROM:
//! the parameters to declare, or the local, permanent refusal when the server lacks what the
//! message needs. Nothing is sent that the server would have to reject or mangle.
//!
//! - **SMTPUTF8** (RFC 6531): needed when a recipient or the envelope sender is not ASCII, or the
//!   client declared SMTPUTF8 and the header section carries 8-bit bytes (an internationalized
//!   message). A server without it gets no such message (§3.2); it fails here with `553 5.6.7`
//!   (non-ASCII address) or `554 5.6.9` (UTF-8 header fields). A declared SMTPUTF8 that nothing
//!   needs is dropped rather than refused.
//! - **8BITMIME** (RFC 6152): needed when any byte is 8-bit, declared or not (legacy devices send
//!   8-bit text without `BODY=8BITMIME`); it is then declared. A server without it fails the
//!   message with `554 5.6.3`. Converting to 7-bit is not attempted: it would mean re-encoding
//!   every MIME part (and the 8-bit header bytes of ERP mail have no charset to encode from), a
//!   rewrite the relay does not make to a message it promises to forward unchanged.

use super::session::Capabilities;
use crate::deliver::reply::{Enhanced, UpstreamReply};
use crate::spool::MessageBody;

/// What the message needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Needs {
    /// A recipient or the envelope sender is not ASCII.
    pub utf8_address: bool,
    /// Internationalized header fields (SMTPUTF8 declared, 8-bit bytes in the header section).
    pub utf8_headers: bool,
    /// The client declared SMTPUTF8 (declared again where the server offers it).
    pub smtputf8_declared: bool,
    /// Some byte of the message is 8-bit.
    pub eight_bit: bool,
    /// The client declared `BODY=8BITMIME`.
    pub eight_bit_declared: bool,
}

impl Needs {
    /// Reads the upstream envelope and the message as it will be sent (the body knows its
    /// 8-bit bytes without being read again: see [`MessageBody::eight_bit`]).
    pub fn of(
        mail_from: &str,
        recipients: &[String],
        params: &crate::spool::MailParams,
        message: &MessageBody,
    ) -> Needs {
        let utf8_address = !mail_from.is_ascii() || recipients.iter().any(|r| !r.is_ascii());
        let utf8_headers = params.smtputf8 && message.header_eight_bit();
        Needs {
            utf8_address,
            utf8_headers,
            smtputf8_declared: params.smtputf8,
            eight_bit: message.eight_bit(),
            eight_bit_declared: params.body == crate::spool::BodyType::EightBitMime,
        }
    }

    /// The MAIL FROM parameters for a server with `caps` (each with a leading space), or the
    /// reply the message fails with because that server cannot take it as it is.
    pub fn mail_params(&self, caps: &Capabilities, server: &str) -> Result<String, UpstreamReply> {
        let mut params = String::new();
        if (self.eight_bit || self.eight_bit_declared) && caps.eight_bit {
            params.push_str(" BODY=8BITMIME");
        }
        if self.utf8_address || self.utf8_headers || self.smtputf8_declared {
            if caps.smtputf8 {
                params.push_str(" SMTPUTF8");
            } else if self.utf8_address {
                return Err(local(
                    553,
                    Enhanced::new(5, 6, 7),
                    format!(
                        "Non-ASCII addresses not permitted: {server} does not offer SMTPUTF8 \
                         (RFC 6531 section 3.2); refused by the relay, nothing was sent"
                    ),
                ));
            } else if self.utf8_headers {
                return Err(local(
                    554,
                    Enhanced::new(5, 6, 9),
                    format!(
                        "UTF-8 header fields cannot be transferred: {server} does not offer \
                         SMTPUTF8 (RFC 6531 section 3.2); refused by the relay, nothing was sent"
                    ),
                ));
            }
        }
        if self.eight_bit && !caps.eight_bit {
            return Err(local(
                554,
                Enhanced::new(5, 6, 3),
                format!(
                    "Conversion required but not supported: the message has 8-bit content and \
                     {server} does not offer 8BITMIME (RFC 6152); refused by the relay, nothing \
                     was sent"
                ),
            ));
        }
        Ok(params)
    }
}

fn local(code: u16, enhanced: Enhanced, text: String) -> UpstreamReply {
    UpstreamReply {
        code,
        enhanced: Some(enhanced),
        text,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::spool::{BodyType, MailParams};

    fn caps(eight_bit: bool, smtputf8: bool) -> Capabilities {
        Capabilities {
            eight_bit,
            smtputf8,
            ..Capabilities::default()
        }
    }

    fn needs(rcpt: &str, smtputf8: bool, body: BodyType, message: &[u8]) -> Needs {
        let params = MailParams {
            body,
            smtputf8,
            ..MailParams::default()
        };
        let message = MessageBody::from_bytes(message.to_vec());
        Needs::of("relay@contoso.com", &[rcpt.to_string()], &params, &message)
    }

    #[test]
    fn a_server_with_both_gets_the_message_declared() {
        let n = needs(
            "jürgen@bücher.example",
            true,
            BodyType::EightBitMime,
            "Subject: Grüße\r\n\r\nü\r\n".as_bytes(),
        );
        assert_eq!(
            n.mail_params(&caps(true, true), "up").expect("sendable"),
            " BODY=8BITMIME SMTPUTF8"
        );
        // Undeclared 8-bit content is declared for the client.
        let legacy = needs("b@example.org", false, BodyType::SevenBit, b"x\r\n\xe9\r\n");
        assert_eq!(
            legacy
                .mail_params(&caps(true, true), "up")
                .expect("sendable"),
            " BODY=8BITMIME"
        );
        let plain = needs(
            "b@example.org",
            false,
            BodyType::SevenBit,
            b"x\r\n\r\ny\r\n",
        );
        assert_eq!(
            plain
                .mail_params(&caps(false, false), "up")
                .expect("sendable"),
            ""
        );
    }

    #[test]
    fn what_the_server_lacks_fails_locally_with_its_code() {
        let to = |n: Needs, c| n.mail_params(&c, "up").expect_err("refused");
        let utf8 = needs(
            "jürgen@bücher.example",
            true,
            BodyType::SevenBit,
            b"x\r\n\r\ny\r\n",
        );
        let r = to(utf8, caps(true, false));
        assert_eq!((r.code, r.enhanced), (553, Some(Enhanced::new(5, 6, 7))));
        let headers = needs(
            "b@example.org",
            true,
            BodyType::SevenBit,
            "Subject: Grüße\r\n\r\ny\r\n".as_bytes(),
        );
        let r = to(headers, caps(true, false));
        assert_eq!((r.code, r.enhanced), (554, Some(Enhanced::new(5, 6, 9))));
        let body = needs(
            "b@example.org",
            false,
            BodyType::EightBitMime,
            b"x\r\n\r\n\xe9\r\n",
        );
        let r = to(body, caps(false, true));
        assert_eq!((r.code, r.enhanced), (554, Some(Enhanced::new(5, 6, 3))));
        assert!(r.to_string().starts_with("554 5.6.3 "), "{r}");
    }

    #[test]
    fn a_declaration_nothing_needs_is_dropped_not_refused() {
        let n = needs(
            "b@example.org",
            true,
            BodyType::EightBitMime,
            b"x\r\n\r\ny\r\n",
        );
        assert_eq!(
            n.mail_params(&caps(false, false), "up").expect("sendable"),
            ""
        );
    }
}
