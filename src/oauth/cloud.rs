//! Cloud presets: the token URL, the scopes, the SMTP host and the Graph root of each Microsoft
//! cloud (`reference/exchange-online-protocol.md` §1.1 and §2.1, `graph-transport.md` §1.2).
//! Explicit `oauth.token_url`, `oauth.scope`, `upstream.host` and `upstream.graph_url` override
//! the preset (that is how tests reach a simulator). The scope follows the transport: a token
//! for Exchange Online is not accepted by Graph, nor one for another cloud.

use crate::config::{Cloud, Config, TransportKind, check_token_url};

use super::OAuthError;

/// One cloud's defaults. `token_url` contains `{tenant}`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Preset {
    pub token_url: &'static str,
    /// The scope for the SMTP transport (Exchange Online).
    pub scope: &'static str,
    pub smtp_host: &'static str,
    /// The Microsoft Graph root; its scope is this + `/.default`.
    pub graph_url: &'static str,
}

impl Preset {
    /// The scope a token for `transport` asks for in this cloud.
    pub fn scope_for(&self, transport: TransportKind) -> String {
        match transport {
            TransportKind::Smtp => self.scope.to_string(),
            TransportKind::Graph => format!("{}/.default", self.graph_url),
        }
    }
}

/// The preset for `cloud`.
pub fn preset(cloud: Cloud) -> Preset {
    match cloud {
        Cloud::Global => Preset {
            token_url: "https://login.microsoftonline.com/{tenant}/oauth2/v2.0/token",
            scope: "https://outlook.office365.com/.default",
            smtp_host: "smtp.office365.com",
            graph_url: "https://graph.microsoft.com",
        },
        Cloud::GccHigh => Preset {
            token_url: "https://login.microsoftonline.us/{tenant}/oauth2/v2.0/token",
            scope: "https://outlook.office365.us/.default",
            smtp_host: "smtp.office365.us",
            graph_url: "https://graph.microsoft.us",
        },
        // The reference lists `smtp.office365.us` and `outlook-dod.office365.us` for DoD;
        // `upstream.host` overrides it when the tenant needs the other.
        Cloud::Dod => Preset {
            token_url: "https://login.microsoftonline.us/{tenant}/oauth2/v2.0/token",
            scope: "https://outlook-dod.office365.us/.default",
            smtp_host: "smtp.office365.us",
            graph_url: "https://dod-graph.microsoft.us",
        },
        Cloud::China => Preset {
            token_url: "https://login.partner.microsoftonline.cn/{tenant}/oauth2/v2.0/token",
            scope: "https://partner.outlook.cn/.default",
            smtp_host: "smtp.partner.outlook.cn",
            graph_url: "https://microsoftgraph.chinacloudapi.cn",
        },
    }
}

/// The effective endpoints: preset values with the configured overrides applied.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Endpoints {
    pub token_url: String,
    pub scope: String,
    pub smtp_host: String,
    /// The Graph root (`https://graph.microsoft.com`), without a trailing slash.
    pub graph_url: String,
}

/// Derives the endpoints from `upstream.cloud` and `oauth.tenant_id`, applying `oauth.token_url`,
/// `oauth.scope` and `upstream.host` when set. A token URL that is not `https://` (or plain
/// `http://` to a loopback host) is refused, as is a preset URL without a tenant.
pub fn endpoints(config: &Config) -> Result<Endpoints, OAuthError> {
    let preset = preset(config.upstream.cloud);
    let token_url = match &config.oauth.token_url {
        Some(url) => url.clone(),
        None => {
            let tenant = config
                .oauth
                .tenant_id
                .as_deref()
                .map(str::trim)
                .filter(|t| !t.is_empty())
                .ok_or_else(|| {
                    OAuthError::Config(
                        "oauth.tenant_id is required to derive the token URL".to_string(),
                    )
                })?;
            if tenant.contains(['/', '?', '#', ' ']) {
                return Err(OAuthError::Config(format!(
                    "oauth.tenant_id `{tenant}` is not a tenant ID or domain"
                )));
            }
            preset.token_url.replace("{tenant}", tenant)
        }
    };
    check_token_url(&token_url).map_err(|e| OAuthError::Config(format!("oauth.token_url: {e}")))?;
    let scope = config
        .oauth
        .scope
        .clone()
        .unwrap_or_else(|| preset.scope_for(config.upstream.transport));
    let graph_url = config
        .upstream
        .graph_url
        .as_deref()
        .unwrap_or(preset.graph_url)
        .trim()
        .trim_end_matches('/')
        .to_string();
    let smtp_host = config
        .upstream
        .host
        .clone()
        .unwrap_or_else(|| preset.smtp_host.to_string());
    Ok(Endpoints {
        token_url,
        scope,
        smtp_host,
        graph_url,
    })
}

/// The endpoint values in effect, as TOML comments for `config` (which prints the keys as set):
/// each says whether it was set or derived from `upstream.cloud`, `upstream.transport` and
/// `oauth.tenant_id`.
pub fn effective_comment(config: &Config) -> String {
    let preset = preset(config.upstream.cloud);
    let origin = |set: bool| if set { "set" } else { "derived" };
    let mut out = String::from("\n# Endpoints in effect:\n");
    let mut line = |key: &str, value: &str, set: bool| {
        out.push_str(&format!("# {key} = \"{value}\"  ({})\n", origin(set)));
    };
    let up = &config.upstream;
    match endpoints(config) {
        Ok(e) => {
            line(
                "oauth.token_url",
                &e.token_url,
                config.oauth.token_url.is_some(),
            );
            line("oauth.scope", &e.scope, config.oauth.scope.is_some());
            match up.transport {
                TransportKind::Smtp => line("upstream.host", &e.smtp_host, up.host.is_some()),
                TransportKind::Graph => {
                    line("upstream.graph_url", &e.graph_url, up.graph_url.is_some())
                }
            }
        }
        Err(err) => {
            let scope = config
                .oauth
                .scope
                .clone()
                .unwrap_or_else(|| preset.scope_for(up.transport));
            line("oauth.scope", &scope, config.oauth.scope.is_some());
            out.push_str(&format!("# oauth.token_url: not derived ({err})\n"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(cloud: Cloud) -> Config {
        let mut c = Config::default();
        c.upstream.cloud = cloud;
        c.oauth.tenant_id = Some("contoso.onmicrosoft.com".into());
        c
    }

    #[test]
    fn presets_match_the_reference() {
        let cases = [
            (
                Cloud::Global,
                "https://login.microsoftonline.com/contoso.onmicrosoft.com/oauth2/v2.0/token",
                "https://outlook.office365.com/.default",
                "smtp.office365.com",
            ),
            (
                Cloud::GccHigh,
                "https://login.microsoftonline.us/contoso.onmicrosoft.com/oauth2/v2.0/token",
                "https://outlook.office365.us/.default",
                "smtp.office365.us",
            ),
            (
                Cloud::Dod,
                "https://login.microsoftonline.us/contoso.onmicrosoft.com/oauth2/v2.0/token",
                "https://outlook-dod.office365.us/.default",
                "smtp.office365.us",
            ),
            (
                Cloud::China,
                "https://login.partner.microsoftonline.cn/contoso.onmicrosoft.com/oauth2/v2.0/token",
                "https://partner.outlook.cn/.default",
                "smtp.partner.outlook.cn",
            ),
        ];
        for (cloud, url, scope, host) in cases {
            let e = endpoints(&config(cloud)).unwrap();
            assert_eq!(e.token_url, url, "{cloud:?}");
            assert_eq!(e.scope, scope, "{cloud:?}");
            assert_eq!(e.smtp_host, host, "{cloud:?}");
        }
    }

    #[test]
    fn graph_scope_and_root_follow_the_cloud() {
        let cases = [
            (Cloud::Global, "https://graph.microsoft.com"),
            (Cloud::GccHigh, "https://graph.microsoft.us"),
            (Cloud::Dod, "https://dod-graph.microsoft.us"),
            (Cloud::China, "https://microsoftgraph.chinacloudapi.cn"),
        ];
        for (cloud, root) in cases {
            let mut c = config(cloud);
            c.upstream.transport = TransportKind::Graph;
            let e = endpoints(&c).unwrap();
            assert_eq!(e.graph_url, root, "{cloud:?}");
            assert_eq!(e.scope, format!("{root}/.default"), "{cloud:?}");
        }
        let mut c = config(Cloud::Global);
        c.upstream.transport = TransportKind::Graph;
        c.upstream.graph_url = Some("http://127.0.0.1:8080/".into());
        let e = endpoints(&c).unwrap();
        assert_eq!(e.graph_url, "http://127.0.0.1:8080");
        // The scope still names the cloud's Graph: a simulator checks the audience.
        assert_eq!(e.scope, "https://graph.microsoft.com/.default");
    }

    #[test]
    fn explicit_values_override_the_preset() {
        let mut c = config(Cloud::China);
        c.oauth.token_url = Some("http://127.0.0.1:8080/t/oauth2/v2.0/token".into());
        c.oauth.scope = Some("api://sim/.default".into());
        c.upstream.host = Some("127.0.0.1".into());
        let e = endpoints(&c).unwrap();
        assert_eq!(e.token_url, "http://127.0.0.1:8080/t/oauth2/v2.0/token");
        assert_eq!(e.scope, "api://sim/.default");
        assert_eq!(e.smtp_host, "127.0.0.1");
    }

    #[test]
    fn insecure_token_url_and_missing_tenant_are_refused() {
        let mut c = config(Cloud::Global);
        c.oauth.token_url = Some("http://login.example.com/t/oauth2/v2.0/token".into());
        let e = endpoints(&c).unwrap_err();
        assert!(e.to_string().contains("https://"), "{e}");
        assert!(!e.is_transient());

        let mut c = Config::default();
        c.oauth.tenant_id = None;
        assert!(endpoints(&c).unwrap_err().to_string().contains("tenant_id"));
        c.oauth.tenant_id = Some("a/b".into());
        assert!(endpoints(&c).is_err());
    }
}
