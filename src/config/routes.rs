//! `[[route]]` tables: their schema, their resolution against the top level (unset keys of
//! `[route.upstream]` and `[route.oauth]` inherit `[upstream]` and `[oauth]`) and their rules.
//! What a resolved route does lives in [`crate::routes`].

use std::collections::BTreeMap;
use std::sync::Arc;

use serde::de::DeserializeOwned;

use super::*;
use crate::routes::{DEFAULT_ROUTE, MailboxSpec, RouteSpec, Routes, SenderPattern};

/// Longest route name: it is a metrics label and a column of `queue list`.
pub const ROUTE_NAME_MAX: usize = 32;

/// The credential keys of `[oauth]`: a route that sets any of them inherits none of them.
const CREDENTIAL_KEYS: [&str; 5] = [
    "client_secret",
    "client_secret_file",
    "certificate_file",
    "private_key_file",
    "assertion_file",
];

/// One `[[route]]` table as written.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RouteConfig {
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub match_sender: Option<Vec<String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub match_auth_user: Option<Vec<String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub match_listener: Option<Vec<SocketAddr>>,
    /// Any `[upstream]` key; checked when the route is resolved.
    #[serde(default)]
    pub upstream: RouteTable,
    /// Any `[oauth]` key; checked when the route is resolved.
    #[serde(default)]
    pub oauth: RouteTable,
}

/// The keys of a `[route.upstream]` or `[route.oauth]` table, kept as written until they are
/// laid over the top level. Printed with `client_secret` redacted.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(transparent)]
pub struct RouteTable(pub BTreeMap<String, figment::value::Value>);

impl Serialize for RouteTable {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeMap;
        let mut map = s.serialize_map(Some(self.0.len()))?;
        for (k, v) in &self.0 {
            if k.contains("secret") && !k.ends_with("_file") {
                map.serialize_entry(k, "<redacted>")?;
            } else {
                map.serialize_entry(k, v)?;
            }
        }
        map.end()
    }
}

impl Config {
    /// Every route this configuration delivers with: the `[[route]]` tables in file order, then
    /// the top level as the route named `default` when it names a mailbox (or, without any
    /// `[[route]]`, always: an unconfigured relay keeps its mail for the default route).
    pub fn route_table(&self) -> Routes {
        let mut specs: Vec<Arc<RouteSpec>> = self.routes.clone();
        let names_mailbox = self.upstream.mail_account.is_some();
        if names_mailbox || specs.is_empty() {
            let mut config = self.clone();
            config.route.clear();
            config.routes.clear();
            specs.push(Arc::new(RouteSpec {
                name: DEFAULT_ROUTE.into(),
                match_sender: vec![],
                match_auth_user: vec![],
                match_listener: vec![],
                mailbox: MailboxSpec::Fixed(self.upstream.mail_account.clone().unwrap_or_default()),
                config,
            }));
        }
        Routes::new(specs)
    }

    /// Resolves the `[[route]]` tables into [`Config::routes`]: each one's keys over the top
    /// level's, its secret file read. Problems name `route.NAME.…`.
    pub(super) fn resolve_routes(&mut self, issues: &mut Vec<ConfigIssue>) {
        let mut specs = Vec::new();
        for (i, table) in self.route.iter().enumerate() {
            let prefix = route_prefix(i, &table.name);
            let upstream = match merged(&self.upstream, &table.upstream, &["from"], false) {
                Ok(u) => u,
                Err(e) => {
                    issues.push(issue(&format!("{prefix}upstream"), e));
                    continue;
                }
            };
            let own_credential = CREDENTIAL_KEYS
                .iter()
                .any(|k| table.oauth.0.contains_key(*k));
            let dropped: &[&str] = if own_credential {
                &CREDENTIAL_KEYS
            } else {
                &["client_secret"]
            };
            let mut oauth: OAuthConfig = match merged(&self.oauth, &table.oauth, dropped, true) {
                Ok(o) => o,
                Err(e) => {
                    issues.push(issue(&format!("{prefix}oauth"), e));
                    continue;
                }
            };
            if own_credential {
                oauth.client_secret_source = None;
                oauth.resolve_secret(&prefix, None, issues);
            } else {
                // Serialized secrets read `<redacted>`: the value itself is carried over.
                oauth.client_secret = self.oauth.client_secret.clone();
                oauth.client_secret_source = self.oauth.client_secret_source.clone();
            }
            let mut config = self.clone();
            config.route.clear();
            config.routes.clear();
            config.upstream = upstream;
            config.oauth = oauth;
            let mailbox =
                MailboxSpec::parse(config.upstream.mail_account.as_deref().unwrap_or_default());
            specs.push(Arc::new(RouteSpec {
                name: table.name.clone(),
                match_sender: table
                    .match_sender
                    .iter()
                    .flatten()
                    .filter_map(|s| SenderPattern::parse(s))
                    .collect(),
                match_auth_user: table.match_auth_user.clone().unwrap_or_default(),
                match_listener: table.match_listener.clone().unwrap_or_default(),
                mailbox,
                config,
            }));
        }
        self.routes = specs;
    }

    /// The rules of the `[[route]]` tables (names, matches, templates) and of each resolved
    /// route's `[upstream]`/`[oauth]`. A problem the top level already has is not repeated
    /// for every route that inherits it.
    pub(super) fn validate_routes(&self, issues: &mut Vec<ConfigIssue>) {
        let mut top = Vec::new();
        validate_delivery(&self.upstream, &self.oauth, "", &mut top);
        let mut seen = std::collections::HashSet::new();
        for (i, table) in self.route.iter().enumerate() {
            let prefix = route_prefix(i, &table.name);
            let name = &table.name;
            if let Some(problem) = route_name_problem(name) {
                issues.push(issue(&format!("{prefix}name"), problem));
            } else if !seen.insert(name.clone()) {
                issues.push(issue(
                    &format!("{prefix}name"),
                    format!("route {name:?} is defined twice: route names must be unique"),
                ));
            }
            for pattern in table.match_sender.iter().flatten() {
                if SenderPattern::parse(pattern).is_none() {
                    issues.push(issue(
                        &format!("{prefix}match_sender"),
                        format!("`{pattern}` is neither an address nor *@domain"),
                    ));
                }
            }
            for (key, list) in [
                ("match_sender", table.match_sender.as_ref().map(Vec::len)),
                (
                    "match_auth_user",
                    table.match_auth_user.as_ref().map(Vec::len),
                ),
                (
                    "match_listener",
                    table.match_listener.as_ref().map(Vec::len),
                ),
            ] {
                if list == Some(0) {
                    issues.push(issue(
                        &format!("{prefix}{key}"),
                        "an empty list matches nothing: remove the key to match everything",
                    ));
                }
            }
            for addr in table.match_listener.iter().flatten() {
                let listens = self.smtp.listen.contains(addr)
                    || self.smtp.listener.iter().any(|l| l.address == *addr);
                if !listens {
                    issues.push(issue(
                        &format!("{prefix}match_listener"),
                        format!(
                            "{addr} is neither in smtp.listen nor an [[smtp.listener]] address: \
                             the route would never match"
                        ),
                    ));
                }
            }
            let Some(spec) = self.routes.iter().find(|r| r.name == *name) else {
                continue; // not resolved: its problem is reported already
            };
            let up = &spec.config.upstream;
            match &spec.mailbox {
                MailboxSpec::Fixed(m) if m.is_empty() => issues.push(issue(
                    &format!("{prefix}upstream.mail_account"),
                    "required: the mailbox this route sends as (an address, \"{sender}\" or \
                     \"{auth_user}\")",
                )),
                MailboxSpec::Sender if table.match_sender.is_none() => issues.push(issue(
                    &format!("{prefix}upstream.mail_account"),
                    "\"{sender}\" needs match_sender: only the senders it allows may become a \
                     mailbox",
                )),
                MailboxSpec::AuthUser if table.match_auth_user.is_none() => issues.push(issue(
                    &format!("{prefix}upstream.mail_account"),
                    "\"{auth_user}\" needs match_auth_user: only the users it allows may become \
                     a mailbox",
                )),
                _ => {}
            }
            if up.mail_account.as_deref().is_some_and(|m| m.contains('{'))
                && !spec.mailbox.is_template()
            {
                issues.push(issue(
                    &format!("{prefix}upstream.mail_account"),
                    "the templates are \"{sender}\" and \"{auth_user}\"",
                ));
            }
            if !spec.config.oauth.is_configured() {
                issues.push(issue(
                    &format!("{prefix}oauth"),
                    "no app to send with: set [oauth] at the top level (inherited) or \
                     [route.oauth] tenant_id, client_id and a credential",
                ));
            }
            let mut found = Vec::new();
            validate_delivery(up, &spec.config.oauth, &prefix, &mut found);
            for f in found {
                let inherited = top.iter().any(|t| {
                    f.key.strip_prefix(prefix.as_str()) == Some(t.key.as_str())
                        && f.message == t.message
                });
                if !inherited {
                    issues.push(f);
                }
            }
        }
    }
}

/// Why `name` cannot name a `[[route]]` (`None`: it can). The one rule for relay.toml and
/// `setup --route`.
pub fn route_name_problem(name: &str) -> Option<String> {
    if !crate::routes::is_route_name(name) {
        Some(format!(
            "{name:?} is not a route name: 1 to {ROUTE_NAME_MAX} of a-z, 0-9 and - (it becomes a \
             metrics label and a queue list column)"
        ))
    } else if name == DEFAULT_ROUTE {
        Some(
            "\"default\" is the top-level [upstream] + [oauth]; give this route another name"
                .into(),
        )
    } else {
        None
    }
}

/// `route.billing.` (or `route[2].` for a table whose name cannot be used).
fn route_prefix(index: usize, name: &str) -> String {
    if crate::routes::is_route_name(name) {
        format!("route.{name}.")
    } else {
        format!("route[{}].", index + 1)
    }
}

/// `base` with the keys of `over` laid on top, minus `dropped`: the typed section again, with
/// its defaults for keys set nowhere. Errors never quote a value of `secret` tables.
fn merged<T: Serialize + DeserializeOwned>(
    base: &T,
    over: &RouteTable,
    dropped: &[&str],
    secret: bool,
) -> Result<T, String> {
    let mut value = serde_json::to_value(base).map_err(|e| e.to_string())?;
    let Some(fields) = value.as_object_mut() else {
        return Err("cannot be merged".into());
    };
    for key in dropped {
        fields.remove(*key);
    }
    for (key, v) in &over.0 {
        let v = serde_json::to_value(v).map_err(|e| e.to_string())?;
        fields.insert(key.clone(), v);
    }
    serde_json::from_value(value).map_err(|e| {
        let text = e.to_string();
        if secret && !text.starts_with("unknown field") {
            "invalid value (not shown: this table may hold a secret)".to_string()
        } else {
            text
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const TOP: &str = r#"
[upstream]
mail_account = "relay@contoso.com"
from = "noreply@contoso.com"
connections = 2
[oauth]
tenant_id = "contoso.onmicrosoft.com"
client_id = "11111111-2222-3333-4444-555555555555"
client_secret = "abc~defghijklmnopqrstuvwxyz0123456789ABC"
"#;

    fn load(extra: &str) -> Result<Config, Vec<String>> {
        Config::from_toml_str(&format!("{TOP}{extra}"))
            .map_err(|e| e.issues().iter().map(|i| i.to_string()).collect())
    }

    #[test]
    fn a_route_inherits_unset_keys_but_not_from() {
        let c = load(
            r#"
[[route]]
name = "billing"
match_sender = ["*@billing.contoso.com"]
[route.upstream]
mail_account = "billing@contoso.com"
"#,
        )
        .unwrap();
        let routes = c.route_table();
        assert_eq!(routes.names(), ["billing", "default"]);
        let billing = routes.get("billing").unwrap();
        assert_eq!(billing.config.upstream.connections, 2);
        assert_eq!(billing.config.upstream.from, None);
        assert_eq!(
            billing
                .config
                .oauth
                .client_secret
                .as_ref()
                .map(|s| s.expose().to_string()),
            c.oauth
                .client_secret
                .as_ref()
                .map(|s| s.expose().to_string())
        );
        assert_eq!(
            routes
                .get("default")
                .unwrap()
                .config
                .upstream
                .from
                .as_deref(),
            Some("noreply@contoso.com")
        );
    }

    #[test]
    fn printing_redacts_a_route_secret() {
        let c = load(
            r#"
[[route]]
name = "other"
[route.upstream]
mail_account = "o@fabrikam.com"
[route.oauth]
tenant_id = "fabrikam.onmicrosoft.com"
client_secret = "zzz~defghijklmnopqrstuvwxyz0123456789ABC"
"#,
        )
        .unwrap();
        let text = c.to_redacted_toml();
        assert!(!text.contains("zzz~"), "{text}");
        assert!(text.contains("fabrikam.onmicrosoft.com"));
    }

    #[test]
    fn bad_routes_name_their_key() {
        let cases = [
            (
                "[[route]]\nname = \"Bad Name\"\n[route.upstream]\nmail_account = \"a@b.com\"\n",
                "route[1].name",
            ),
            (
                "[[route]]\nname = \"a\"\n[route.upstream]\nmail_account = \"a@b.com\"\n[[route]]\nname = \"a\"\n[route.upstream]\nmail_account = \"c@b.com\"\n",
                "route.a.name",
            ),
            (
                "[[route]]\nname = \"t\"\n[route.upstream]\nmail_account = \"{sender}\"\n",
                "route.t.upstream.mail_account",
            ),
            (
                "[[route]]\nname = \"t\"\n[route.upstream]\nmail_acount = \"x@b.com\"\n",
                "route.t.upstream",
            ),
            (
                "[[route]]\nname = \"t\"\nmatch_sender = [\"nobody\"]\n[route.upstream]\nmail_account = \"x@b.com\"\n",
                "route.t.match_sender",
            ),
            (
                "[[route]]\nname = \"t\"\n[route.upstream]\nmail_account = \"x@b.com\"\nport = 0\n",
                "route.t.upstream.port",
            ),
            (
                "[[route]]\nname = \"t\"\n[route.upstream]\nmail_account = \"x@b.com\"\n[route.oauth]\nclient_id = \"not-a-guid\"\n",
                "route.t.oauth.client_id",
            ),
            (
                "[[route]]\nname = \"default\"\n[route.upstream]\nmail_account = \"x@b.com\"\n",
                "route.default.name",
            ),
            (
                "[[route]]\nname = \"t\"\nmatch_listener = [\"127.0.0.1:9\"]\n[route.upstream]\nmail_account = \"x@b.com\"\n",
                "route.t.match_listener",
            ),
        ];
        for (extra, key) in cases {
            let issues = load(extra).unwrap_err();
            assert!(
                issues.iter().any(|i| i.starts_with(&format!("{key}:"))),
                "{key} not in {issues:?}"
            );
        }
    }

    #[test]
    fn a_route_with_its_own_credential_inherits_none() {
        let c = load(
            r#"
[[route]]
name = "cert"
[route.upstream]
mail_account = "c@contoso.com"
[route.oauth]
assertion_file = "/dev/null"
"#,
        )
        .unwrap();
        let cert = c.route_table().get("cert").unwrap().clone();
        assert!(cert.config.oauth.client_secret.is_none());
    }
}
