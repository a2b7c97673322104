//! `[[smtp.listener]]`: listeners for devices that need more than `smtp.listen` gives them
//! (SMTPS on 465, their own `auth`, their own limits). Every key but `address` is optional and
//! inherits `[smtp]`; [`SmtpConfig::listener_settings`] resolves them once.

use super::*;

/// How a listener speaks TLS.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum ListenTls {
    /// Plain SMTP; STARTTLS is not offered.
    None,
    /// Plain SMTP with STARTTLS offered (port 587, "STARTTLS" or "TLS" in a device's menu).
    Starttls,
    /// TLS from the first byte (SMTPS, port 465, "SSL" in a device's menu).
    Implicit,
}

/// One `[[smtp.listener]]` table as written.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ListenerConfig {
    pub address: SocketAddr,
    /// Default: `"starttls"` when a certificate is set here or in `[smtp]`, else `"none"`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls: Option<ListenTls>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub auth: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls_cert_file: Option<PathBuf>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls_key_file: Option<PathBuf>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_message_size: Option<ByteSize>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_recipients: Option<usize>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_connections: Option<usize>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub allow_networks: Option<Vec<IpNet>>,
    #[serde(
        default,
        with = "humantime_serde",
        skip_serializing_if = "Option::is_none"
    )]
    pub command_timeout: Option<Duration>,
    #[serde(
        default,
        with = "humantime_serde",
        skip_serializing_if = "Option::is_none"
    )]
    pub data_timeout: Option<Duration>,
    #[serde(
        default,
        with = "humantime_serde",
        skip_serializing_if = "Option::is_none"
    )]
    pub write_timeout: Option<Duration>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub min_data_rate: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_errors: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub allow_plaintext_auth_on_loopback: Option<bool>,
}

/// A listener's settings with `[smtp]` filled in: what its sessions run with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ListenerSettings {
    pub tls: ListenTls,
    /// The certificate and key, when `tls` is not `none`.
    pub tls_files: Option<(PathBuf, PathBuf)>,
    pub auth: String,
    pub max_message_size: ByteSize,
    pub max_recipients: usize,
    pub max_connections: usize,
    /// `None`: loopback only, as for `smtp.allow_networks`.
    pub allow_networks: Option<Vec<IpNet>>,
    pub command_timeout: Duration,
    pub data_timeout: Duration,
    pub write_timeout: Duration,
    pub min_data_rate: u64,
    pub max_errors: u32,
    pub allow_plaintext_auth_on_loopback: bool,
}

impl ListenerSettings {
    /// The networks allowed to connect: the configured list, or loopback only.
    pub fn allowed_networks(&self) -> Vec<IpNet> {
        self.allow_networks
            .clone()
            .unwrap_or_else(loopback_networks)
    }
}

impl SmtpConfig {
    /// The `smtp.listen` addresses as listeners: the `[smtp]` keys themselves (STARTTLS when a
    /// certificate is set), sharing one `smtp.max_connections`.
    pub fn listen_settings(&self) -> ListenerSettings {
        let tls_files = self.tls_cert_file.clone().zip(self.tls_key_file.clone());
        ListenerSettings {
            tls: if tls_files.is_some() {
                ListenTls::Starttls
            } else {
                ListenTls::None
            },
            tls_files,
            auth: self.auth.clone(),
            max_message_size: self.max_message_size,
            max_recipients: self.max_recipients,
            max_connections: self.max_connections,
            allow_networks: self.allow_networks.clone(),
            command_timeout: self.command_timeout,
            data_timeout: self.data_timeout,
            write_timeout: self.write_timeout,
            min_data_rate: self.min_data_rate,
            max_errors: self.max_errors,
            allow_plaintext_auth_on_loopback: self.allow_plaintext_auth_on_loopback,
        }
    }

    /// `[[smtp.listener]]` `l` with every unset key taken from `[smtp]`. A certificate is the
    /// listener's own pair when either file is set there, else `[smtp]`'s.
    pub fn listener_settings(&self, l: &ListenerConfig) -> ListenerSettings {
        let own = l.tls_cert_file.is_some() || l.tls_key_file.is_some();
        let files = if own {
            l.tls_cert_file.clone().zip(l.tls_key_file.clone())
        } else {
            self.tls_cert_file.clone().zip(self.tls_key_file.clone())
        };
        let tls = l.tls.unwrap_or(if files.is_some() {
            ListenTls::Starttls
        } else {
            ListenTls::None
        });
        ListenerSettings {
            tls,
            tls_files: files.filter(|_| tls != ListenTls::None),
            auth: l.auth.clone().unwrap_or_else(|| self.auth.clone()),
            max_message_size: l.max_message_size.unwrap_or(self.max_message_size),
            max_recipients: l.max_recipients.unwrap_or(self.max_recipients),
            max_connections: l.max_connections.unwrap_or(self.max_connections),
            allow_networks: l
                .allow_networks
                .clone()
                .or_else(|| self.allow_networks.clone()),
            command_timeout: l.command_timeout.unwrap_or(self.command_timeout),
            data_timeout: l.data_timeout.unwrap_or(self.data_timeout),
            write_timeout: l.write_timeout.unwrap_or(self.write_timeout),
            min_data_rate: l.min_data_rate.unwrap_or(self.min_data_rate),
            max_errors: l.max_errors.unwrap_or(self.max_errors),
            allow_plaintext_auth_on_loopback: l
                .allow_plaintext_auth_on_loopback
                .unwrap_or(self.allow_plaintext_auth_on_loopback),
        }
    }

    /// SMTP sessions open at most: `smtp.max_connections` for the `smtp.listen` addresses
    /// (they share it) plus each listener's own (the file-descriptor reserve counts them all).
    pub fn max_sessions(&self) -> u64 {
        let shared = if self.listen.is_empty() {
            0
        } else {
            self.max_connections as u64
        };
        self.listener
            .iter()
            .map(|l| self.listener_settings(l).max_connections as u64)
            .fold(shared, u64::saturating_add)
    }

    /// The rules of `[[smtp.listener]]`, each issue named `smtp.listener.N.key` (N from 0, as
    /// the loader names a badly typed key in the same table).
    pub(super) fn validate_listeners(&self, issues: &mut Vec<ConfigIssue>) {
        let mut seen: Vec<SocketAddr> = Vec::new();
        for addr in &self.listen {
            if seen.contains(addr) {
                issues.push(issue("smtp.listen", format!("{addr} is listed twice")));
            }
            seen.push(*addr);
        }
        for (n, l) in self.listener.iter().enumerate() {
            let key = |k: &str| format!("smtp.listener.{n}.{k}");
            let at = l.address;
            if seen.contains(&at) {
                issues.push(issue(
                    &key("address"),
                    format!("{at} is already in smtp.listen or another [[smtp.listener]]"),
                ));
            }
            seen.push(at);
            let s = self.listener_settings(l);
            match (&l.tls_cert_file, &l.tls_key_file) {
                (Some(cert), Some(key_file)) => {
                    readable_file(issues, &key("tls_cert_file"), cert);
                    readable_file(issues, &key("tls_key_file"), key_file);
                }
                (Some(_), None) => issues.push(issue(
                    &key("tls_key_file"),
                    "required when tls_cert_file is set",
                )),
                (None, Some(_)) => issues.push(issue(
                    &key("tls_cert_file"),
                    "required when tls_key_file is set",
                )),
                (None, None) => {}
            }
            let has_files = l.tls_cert_file.is_some() || l.tls_key_file.is_some();
            if s.tls != ListenTls::None && s.tls_files.is_none() && !has_files {
                issues.push(issue(
                    &key("tls"),
                    format!(
                        "{} on {at} needs a certificate: set tls_cert_file and tls_key_file \
                         here or in [smtp], or tls = \"none\"",
                        tls_name(s.tls)
                    ),
                ));
            }
            if s.allow_networks.is_none() && !at.ip().is_loopback() {
                issues.push(issue(
                    &key("allow_networks"),
                    format!(
                        "{at} is not a loopback address; set allow_networks here or \
                         smtp.allow_networks to the networks that may send mail (the default \
                         allows loopback only)"
                    ),
                ));
            }
            if let Some(nets) = &l.allow_networks
                && nets.is_empty()
            {
                issues.push(issue(
                    &key("allow_networks"),
                    "an empty list would refuse every client",
                ));
            }
            if let Some(auth) = &l.auth
                && !matches!(auth.as_str(), "off" | "accept-any")
                && let Err(e) = crate::inbound::AuthPolicy::from_setting(auth)
            {
                issues.push(issue(&key("auth"), e));
            }
            self.validate_limits(l, &key, issues);
        }
    }

    fn validate_limits(
        &self,
        l: &ListenerConfig,
        key: &dyn Fn(&str) -> String,
        issues: &mut Vec<ConfigIssue>,
    ) {
        if let Some(v) = l.max_message_size {
            within(
                issues,
                &key("max_message_size"),
                v.0,
                bounds::MAX_MESSAGE_SIZE,
                |n| ByteSize(n).to_string(),
            );
        }
        let count = |n: usize| n.to_string();
        if let Some(v) = l.max_recipients {
            within(
                issues,
                &key("max_recipients"),
                v,
                bounds::MAX_RECIPIENTS,
                count,
            );
        }
        if let Some(v) = l.max_connections {
            within(
                issues,
                &key("max_connections"),
                v,
                bounds::MAX_CONNECTIONS,
                count,
            );
        }
        for (name, value, bound) in [
            (
                "command_timeout",
                l.command_timeout,
                bounds::COMMAND_TIMEOUT,
            ),
            ("data_timeout", l.data_timeout, bounds::DATA_TIMEOUT),
            ("write_timeout", l.write_timeout, bounds::WRITE_TIMEOUT),
        ] {
            if let Some(v) = value {
                within(issues, &key(name), v, bound, duration_text);
            }
        }
        if let Some(v) = l.min_data_rate {
            within(
                issues,
                &key("min_data_rate"),
                v,
                bounds::MIN_DATA_RATE,
                |n| n.to_string(),
            );
        }
        if let Some(v) = l.max_errors {
            within(issues, &key("max_errors"), v, bounds::MAX_ERRORS, |n| {
                n.to_string()
            });
        }
    }
}

fn tls_name(tls: ListenTls) -> &'static str {
    match tls {
        ListenTls::None => "tls = \"none\"",
        ListenTls::Starttls => "tls = \"starttls\"",
        ListenTls::Implicit => "tls = \"implicit\"",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn keys(text: &str) -> Vec<String> {
        match Config::from_toml_str(text) {
            Ok(_) => vec![],
            Err(e) => e.issues().iter().map(|i| i.key.clone()).collect(),
        }
    }

    #[test]
    fn unset_keys_inherit_smtp_and_tls_follows_the_certificate() {
        let c = Config::from_toml_str(
            "[smtp]\nmax_recipients = 200\nallow_networks = [\"10.0.0.0/8\"]\n\
             [[smtp.listener]]\naddress = \"127.0.0.1:2526\"\nmax_recipients = 300\n\
             [[smtp.listener]]\naddress = \"10.1.2.3:2527\"\n",
        )
        .expect("valid");
        let a = c.smtp.listener_settings(&c.smtp.listener[0]);
        assert_eq!(a.max_recipients, 300);
        assert_eq!(a.tls, ListenTls::None);
        assert_eq!(a.max_errors, c.smtp.max_errors);
        let b = c.smtp.listener_settings(&c.smtp.listener[1]);
        assert_eq!(b.max_recipients, 200);
        assert_eq!(b.allow_networks, c.smtp.allow_networks);
        assert_eq!(c.smtp.max_sessions(), 300);
    }

    #[test]
    fn listener_problems_name_their_table_and_key() {
        assert_eq!(
            keys("[[smtp.listener]]\naddress = \"127.0.0.1:465\"\ntls = \"implicit\"\n"),
            vec!["smtp.listener.0.tls"]
        );
        assert_eq!(
            keys("[[smtp.listener]]\naddress = \"127.0.0.1:2525\"\n"),
            vec!["smtp.listener.0.address"]
        );
        assert_eq!(
            keys("[[smtp.listener]]\naddress = \"0.0.0.0:2600\"\n"),
            vec!["smtp.listener.0.allow_networks"]
        );
        assert_eq!(
            keys(
                "[[smtp.listener]]\naddress = \"127.0.0.1:2600\"\n\
                 [[smtp.listener]]\naddress = \"127.0.0.1:2601\"\nmax_recipients = 5\n"
            ),
            vec!["smtp.listener.1.max_recipients"]
        );
        let k = keys("[[smtp.listener]]\naddress = \"127.0.0.1:2600\"\ntsl = \"none\"\n");
        assert!(k.iter().any(|k| k.contains("tsl")), "{k:?}");
        let k = keys("[[smtp.listener]]\naddress = \"127.0.0.1:2600\"\ntls = \"ssl\"\n");
        assert!(k.iter().any(|k| k.starts_with("smtp.listener")), "{k:?}");
    }

    #[test]
    fn sendmail_does_not_need_a_listeners_private_files() {
        // The certificate key and users file of a listener may be readable by the relay only.
        let dir = tempfile::tempdir().expect("tempdir");
        let missing = dir.path().join("missing");
        let path = dir.path().join("relay.toml");
        std::fs::write(
            &path,
            format!(
                "[[smtp.listener]]\naddress = \"127.0.0.1:2600\"\ntls = \"implicit\"\n\
                 auth = \"{m}\"\ntls_cert_file = \"{m}\"\ntls_key_file = \"{m}\"\n",
                m = missing.display()
            ),
        )
        .expect("write");
        assert!(load_for_sendmail(Some(&path)).is_ok());
        assert!(load(Some(&path)).is_err());
    }
}
