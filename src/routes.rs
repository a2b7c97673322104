//! Routes: which mailbox (and which app, tenant and transport) a message is sent with.
//!
//! `[[route]]` tables in `relay.toml` (parsed and resolved in [`crate::config`]) become
//! [`RouteSpec`]s; the top-level `[upstream]` + `[oauth]` is the route named `default`, used when
//! no other route matches. Inbound chooses the route at `MAIL FROM` ([`Routes::choose`]) and the
//! store keeps its name with the message; the deliverer finds it again by name
//! ([`Routes::get`]) and derives the mailbox ([`RouteSpec::mailbox_for`]). A message whose route
//! is gone is never sent with another route's credentials: the deliverer keeps it held.

use std::net::SocketAddr;
use std::sync::Arc;

use crate::config::Config;

/// The name of the route formed by the top-level `[upstream]` and `[oauth]`.
pub const DEFAULT_ROUTE: &str = "default";

/// `[a-z0-9-]{1,32}`: the shape of a route name (`default` included), in relay.toml, the spool
/// and metrics labels.
pub fn is_route_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= crate::config::ROUTE_NAME_MAX
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
}

/// Which mailbox a route sends as.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MailboxSpec {
    /// `mail_account = "billing@contoso.com"`.
    Fixed(String),
    /// `mail_account = "{sender}"`: the envelope sender is the mailbox.
    Sender,
    /// `mail_account = "{auth_user}"`: the inbound AUTH user (an address) is the mailbox.
    AuthUser,
}

impl MailboxSpec {
    pub const SENDER: &'static str = "{sender}";
    pub const AUTH_USER: &'static str = "{auth_user}";

    pub fn parse(mail_account: &str) -> MailboxSpec {
        match mail_account.trim() {
            Self::SENDER => MailboxSpec::Sender,
            Self::AUTH_USER => MailboxSpec::AuthUser,
            other => MailboxSpec::Fixed(other.to_string()),
        }
    }

    pub fn is_template(&self) -> bool {
        !matches!(self, MailboxSpec::Fixed(_))
    }
}

/// A `match_sender` entry: an address, or `*@domain` for any local part. Case-insensitive.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SenderPattern {
    Address(String),
    Domain(String),
}

impl SenderPattern {
    /// `None` when `text` is neither an address nor `*@domain`.
    pub fn parse(text: &str) -> Option<SenderPattern> {
        let text = text.trim().to_ascii_lowercase();
        if let Some(domain) = text.strip_prefix("*@") {
            return crate::config::looks_like_address(&format!("x@{domain}"))
                .then(|| SenderPattern::Domain(domain.to_string()));
        }
        crate::config::looks_like_address(&text).then_some(SenderPattern::Address(text))
    }

    pub fn matches(&self, sender: &str) -> bool {
        match self {
            SenderPattern::Address(a) => sender.eq_ignore_ascii_case(a),
            SenderPattern::Domain(d) => sender
                .rsplit_once('@')
                .is_some_and(|(local, domain)| !local.is_empty() && domain.eq_ignore_ascii_case(d)),
        }
    }
}

/// One route, resolved: its matches and the configuration it delivers with.
#[derive(Debug, Clone)]
pub struct RouteSpec {
    pub name: String,
    /// Empty: any sender (likewise for the other two).
    pub match_sender: Vec<SenderPattern>,
    pub match_auth_user: Vec<String>,
    pub match_listener: Vec<SocketAddr>,
    pub mailbox: MailboxSpec,
    /// The top-level configuration with this route's `[upstream]` and `[oauth]` in effect
    /// (inherited keys filled in, `routes` empty). For a template route `mail_account` is the
    /// template; [`RouteSpec::lane_config`] gives one mailbox's.
    pub config: Config,
}

/// Why no route takes a message (the text of the `550 5.7.1`).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NoRoute {
    #[error("no route accepts mail from <{sender}> here and there is no default route")]
    NoMatch { sender: String },
    #[error("route {route} sends as the sender, and the null sender <> is not a mailbox")]
    NullSender { route: String },
    #[error("route {route} sends as the AUTH user, and this session has not authenticated")]
    NotAuthenticated { route: String },
    #[error("route {route} sends as the AUTH user, and {user:?} is not an e-mail address")]
    AuthUserNotAnAddress { route: String, user: String },
}

impl RouteSpec {
    /// Every `match_*` key present must match (AND); within one list any entry does (OR).
    pub fn matches(
        &self,
        sender: &str,
        auth_user: Option<&str>,
        listener: Option<SocketAddr>,
    ) -> bool {
        let sender_ok =
            self.match_sender.is_empty() || self.match_sender.iter().any(|p| p.matches(sender));
        let user_ok = self.match_auth_user.is_empty()
            || auth_user.is_some_and(|u| {
                self.match_auth_user
                    .iter()
                    .any(|m| m.eq_ignore_ascii_case(u))
            });
        let listener_ok = self.match_listener.is_empty()
            || listener.is_some_and(|l| self.match_listener.contains(&l));
        sender_ok && user_ok && listener_ok
    }

    /// The mailbox a message with this envelope is sent as. For a template route the address
    /// is lowercased, so that `Alerts@x` and `alerts@x` share one mailbox (one pacer).
    pub fn mailbox_for(&self, sender: &str, auth_user: Option<&str>) -> Result<String, NoRoute> {
        match &self.mailbox {
            MailboxSpec::Fixed(m) => Ok(m.clone()),
            MailboxSpec::Sender if sender.is_empty() => Err(NoRoute::NullSender {
                route: self.name.clone(),
            }),
            MailboxSpec::Sender => Ok(sender.to_ascii_lowercase()),
            MailboxSpec::AuthUser => match auth_user {
                None => Err(NoRoute::NotAuthenticated {
                    route: self.name.clone(),
                }),
                Some(u) if !crate::config::looks_like_address(u) => {
                    Err(NoRoute::AuthUserNotAnAddress {
                        route: self.name.clone(),
                        user: u.to_string(),
                    })
                }
                Some(u) => Ok(u.to_ascii_lowercase()),
            },
        }
    }

    /// A mailbox a template route may send as, for `check`: the first address of its match.
    pub fn example_mailbox(&self) -> Option<String> {
        match &self.mailbox {
            MailboxSpec::Fixed(m) => Some(m.clone()),
            MailboxSpec::Sender => self.match_sender.iter().find_map(|p| match p {
                SenderPattern::Address(a) => Some(a.clone()),
                SenderPattern::Domain(_) => None,
            }),
            MailboxSpec::AuthUser => self
                .match_auth_user
                .iter()
                .find(|u| crate::config::looks_like_address(u))
                .map(|u| u.to_ascii_lowercase()),
        }
    }

    /// The configuration one mailbox of this route delivers with: `mail_account` is the
    /// mailbox and, unless the route sets `from`, so is the From it may send as.
    pub fn lane_config(&self, mailbox: &str) -> Config {
        let mut config = self.config.clone();
        if self.mailbox.is_template() {
            config.upstream.mail_account = Some(mailbox.to_string());
        }
        config
    }
}

/// The routes of a configuration, in file order, then the default route (when the top level
/// names a mailbox).
#[derive(Debug, Clone, Default)]
pub struct Routes {
    routes: Vec<Arc<RouteSpec>>,
}

impl Routes {
    pub fn new(routes: Vec<Arc<RouteSpec>>) -> Routes {
        Routes { routes }
    }

    /// Routes from `[[route]]` tables exist (otherwise only the default route, as before
    /// routes existed).
    pub fn configured(&self) -> bool {
        self.routes.iter().any(|r| r.name != DEFAULT_ROUTE)
    }

    pub fn iter(&self) -> impl Iterator<Item = &Arc<RouteSpec>> {
        self.routes.iter()
    }

    pub fn get(&self, name: &str) -> Option<&Arc<RouteSpec>> {
        self.routes.iter().find(|r| r.name == name)
    }

    pub fn names(&self) -> Vec<String> {
        self.routes.iter().map(|r| r.name.clone()).collect()
    }

    /// The first route that matches, and the mailbox it would send as. With no `[[route]]`
    /// tables every message takes the default route, configured or not (an unconfigured relay
    /// keeps mail in the queue until a tenant is configured).
    pub fn choose(
        &self,
        sender: &str,
        auth_user: Option<&str>,
        listener: Option<SocketAddr>,
    ) -> Result<(Arc<RouteSpec>, String), NoRoute> {
        if !self.configured() {
            let mailbox = self
                .get(DEFAULT_ROUTE)
                .and_then(|r| r.mailbox_for(sender, auth_user).ok())
                .unwrap_or_default();
            let spec = self.get(DEFAULT_ROUTE).cloned().unwrap_or_else(|| {
                Arc::new(RouteSpec {
                    name: DEFAULT_ROUTE.into(),
                    match_sender: vec![],
                    match_auth_user: vec![],
                    match_listener: vec![],
                    mailbox: MailboxSpec::Fixed(String::new()),
                    config: Config::default(),
                })
            });
            return Ok((spec, mailbox));
        }
        let route = self
            .routes
            .iter()
            .find(|r| r.matches(sender, auth_user, listener))
            .ok_or_else(|| NoRoute::NoMatch {
                sender: sender.to_string(),
            })?;
        let mailbox = route.mailbox_for(sender, auth_user)?;
        Ok((route.clone(), mailbox))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(name: &str, senders: &[&str], mailbox: MailboxSpec) -> Arc<RouteSpec> {
        Arc::new(RouteSpec {
            name: name.into(),
            match_sender: senders
                .iter()
                .map(|s| SenderPattern::parse(s).unwrap())
                .collect(),
            match_auth_user: vec![],
            match_listener: vec![],
            mailbox,
            config: Config::default(),
        })
    }

    #[test]
    fn first_match_wins_and_default_catches_the_rest() {
        let routes = Routes::new(vec![
            spec(
                "billing",
                &["*@billing.contoso.com"],
                MailboxSpec::Fixed("b@contoso.com".into()),
            ),
            spec(
                "erp",
                &["erp@contoso.com", "*@billing.contoso.com"],
                MailboxSpec::Sender,
            ),
            spec(
                DEFAULT_ROUTE,
                &[],
                MailboxSpec::Fixed("relay@contoso.com".into()),
            ),
        ]);
        let (r, m) = routes
            .choose("Inv@Billing.Contoso.com", None, None)
            .unwrap();
        assert_eq!((r.name.as_str(), m.as_str()), ("billing", "b@contoso.com"));
        let (r, m) = routes.choose("ERP@contoso.com", None, None).unwrap();
        assert_eq!((r.name.as_str(), m.as_str()), ("erp", "erp@contoso.com"));
        let (r, _) = routes.choose("other@x.org", None, None).unwrap();
        assert_eq!(r.name, DEFAULT_ROUTE);
    }

    #[test]
    fn no_match_without_default_is_refused_with_the_reason() {
        let routes = Routes::new(vec![spec("erp", &["erp@contoso.com"], MailboxSpec::Sender)]);
        let e = routes.choose("x@y.org", None, None).unwrap_err();
        assert_eq!(
            e,
            NoRoute::NoMatch {
                sender: "x@y.org".into()
            }
        );
        assert!(e.to_string().contains("no default route"));
    }

    #[test]
    fn all_match_keys_must_match() {
        let mut r = (*spec("scan", &["*@contoso.com"], MailboxSpec::AuthUser)).clone();
        r.match_auth_user = vec!["Scanner@contoso.com".into()];
        r.match_listener = vec!["127.0.0.1:2526".parse().unwrap()];
        let l = Some("127.0.0.1:2526".parse().unwrap());
        assert!(r.matches("a@contoso.com", Some("scanner@contoso.com"), l));
        assert!(!r.matches("a@contoso.com", None, l));
        assert!(!r.matches("a@contoso.com", Some("scanner@contoso.com"), None));
        assert!(!r.matches("a@other.com", Some("scanner@contoso.com"), l));
        assert_eq!(
            r.mailbox_for("a@contoso.com", Some("Scanner@contoso.com"))
                .unwrap(),
            "scanner@contoso.com"
        );
        assert!(matches!(
            r.mailbox_for("a@contoso.com", Some("scanner")),
            Err(NoRoute::AuthUserNotAnAddress { .. })
        ));
    }

    #[test]
    fn domain_patterns_need_a_local_part() {
        let p = SenderPattern::parse("*@contoso.com").unwrap();
        assert!(p.matches("a@CONTOSO.com"));
        assert!(!p.matches("@contoso.com"));
        assert!(!p.matches("a@sub.contoso.com"));
        assert!(SenderPattern::parse("*").is_none());
        assert!(SenderPattern::parse("contoso.com").is_none());
    }

    #[test]
    fn template_routes_refuse_the_null_sender() {
        let r = spec("t", &["*@contoso.com"], MailboxSpec::Sender);
        assert!(matches!(
            r.mailbox_for("", None),
            Err(NoRoute::NullSender { .. })
        ));
    }
}
