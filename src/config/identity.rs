//! The values a user brings from the Microsoft 365 setup (Tenant ID, Client ID, Client secret,
//! Mail Account, From) and the mistakes the setup guide's readers make with them.
//!
//! One owner of these rules: configuration validation (`config`, `serve`: exit 2), `check`
//! (step 1, with the fix) and `setup` (as each value is typed) all call these functions, so
//! that what one of them calls wrong the others refuse too.

/// A value that cannot work, and what to do instead (in the setup guide's words).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ValueProblem {
    /// The configuration key, e.g. `oauth.tenant_id`.
    pub key: &'static str,
    /// What is wrong, without the key (the value itself is quoted only if it is no secret).
    pub what: String,
    pub fix: &'static str,
}

impl std::fmt::Display for ValueProblem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} {}", self.key, self.what)
    }
}

const TENANT_FIX: &str = "Set oauth.tenant_id to the Directory (tenant) ID (a GUID) from the app \
                          registration's Overview, or a verified domain such as \
                          contoso.onmicrosoft.com.";
const CLIENT_FIX: &str = "Set oauth.client_id to the Application (client) ID (a GUID) from the \
                          app registration's Overview.";
const SECRET_ID_FIX: &str = "Copy the secret's Value, not its Secret ID: in App registrations > \
                             your app > Certificates & secrets the Value is shown only once, right \
                             after New client secret; create a new one if it is gone.";
const MAIL_ACCOUNT_FIX: &str = "Set upstream.mail_account to the mailbox the relay signs in as \
                                (the XOAUTH2 user), e.g. no-reply@contoso.com.";
const FROM_FIX: &str = "Set upstream.from to the sender address shown in outgoing mail (or remove \
                        it to use upstream.mail_account).";

const OBJECT_ID_FIX: &str = "Use the Object ID on Microsoft Entra admin center > Enterprise \
                             applications > your app > Overview. It is neither the Object ID on \
                             App registrations > your app > Overview nor the Application (client) \
                             ID; with either of those Exchange answers 535 5.7.3.";

/// The Object ID of the app's *Enterprise application* (its service principal), which
/// `New-ServicePrincipal -ObjectId` wants: a GUID, and not the Application (client) ID, the
/// other GUID on the same page that people paste. (That it is not the App registrations Object
/// ID cannot be seen from the value; `setup` compares it with the token's `oid` claim.)
pub fn enterprise_object_id(value: &str, client_id: &str) -> Result<(), ValueProblem> {
    let v = value.trim();
    let what = if v.is_empty() {
        "is empty".to_string()
    } else if !is_guid(v) {
        format!("`{v}` is not a GUID")
    } else if v.eq_ignore_ascii_case(client_id.trim()) {
        format!("`{v}` is the Application (client) ID, not the Enterprise application's Object ID")
    } else {
        return Ok(());
    };
    Err(ValueProblem {
        key: "Enterprise application Object ID",
        what,
        fix: OBJECT_ID_FIX,
    })
}

/// `oauth.tenant_id`: a GUID or a verified domain. The multi-tenant aliases cannot issue
/// app-only tokens (AADSTS90002-like failures at the first refresh).
pub fn tenant_id(value: &str) -> Result<(), ValueProblem> {
    let t = value.trim();
    let problem = |what: String| ValueProblem {
        key: "oauth.tenant_id",
        what,
        fix: TENANT_FIX,
    };
    if t.is_empty() {
        return Err(problem("is empty".into()));
    }
    if ["common", "organizations", "consumers"]
        .iter()
        .any(|alias| t.eq_ignore_ascii_case(alias))
    {
        return Err(problem(format!(
            "`{t}` is not a tenant: app-only tokens need the tenant itself"
        )));
    }
    if !is_guid(t) && !is_domain(t) {
        return Err(problem(format!("`{t}` is neither a GUID nor a domain")));
    }
    Ok(())
}

/// `oauth.client_id`: the Application (client) ID, a GUID.
pub fn client_id(value: &str) -> Result<(), ValueProblem> {
    let c = value.trim();
    if is_guid(c) {
        return Ok(());
    }
    Err(ValueProblem {
        key: "oauth.client_id",
        what: if c.is_empty() {
            "is empty".into()
        } else {
            format!("`{c}` is not a GUID")
        },
        fix: CLIENT_FIX,
    })
}

/// `oauth.client_secret`: the secret's Value. A GUID is its Secret ID (Entra answers
/// AADSTS7000215). The value is never quoted: it is a secret.
pub fn client_secret(value: &str) -> Result<(), ValueProblem> {
    let v = value.trim();
    let what = if v.is_empty() {
        "is empty"
    } else if is_guid(v) {
        "looks like a Secret ID (a GUID), not a secret Value"
    } else {
        return Ok(());
    };
    Err(ValueProblem {
        key: "oauth.client_secret",
        what: what.into(),
        fix: SECRET_ID_FIX,
    })
}

/// `upstream.mail_account`: the mailbox address.
pub fn mail_account(value: &str) -> Result<(), ValueProblem> {
    address("upstream.mail_account", value, MAIL_ACCOUNT_FIX)
}

/// `upstream.from`: the sender address.
pub fn from(value: &str) -> Result<(), ValueProblem> {
    address("upstream.from", value, FROM_FIX)
}

fn address(key: &'static str, value: &str, fix: &'static str) -> Result<(), ValueProblem> {
    if looks_like_address(value) {
        return Ok(());
    }
    Err(ValueProblem {
        key,
        what: format!("`{value}` is not an e-mail address"),
        fix,
    })
}

/// `local@domain.tld`, without spaces or angle brackets.
pub fn looks_like_address(v: &str) -> bool {
    match v.rsplit_once('@') {
        Some((local, domain)) => {
            !local.is_empty()
                && domain.contains('.')
                && !v.contains(|c: char| c.is_whitespace() || c == '<' || c == '>')
        }
        None => false,
    }
}

/// `xxxxxxxx-xxxx-xxxx-xxxx-xxxxxxxxxxxx` in hex.
pub fn is_guid(s: &str) -> bool {
    let groups: Vec<&str> = s.split('-').collect();
    groups.len() == 5
        && groups
            .iter()
            .zip([8, 4, 4, 4, 12])
            .all(|(g, n)| g.len() == n && g.chars().all(|c| c.is_ascii_hexdigit()))
}

/// A DNS name with at least two labels (`contoso.onmicrosoft.com`).
pub fn is_domain(s: &str) -> bool {
    let labels: Vec<&str> = s.trim_end_matches('.').split('.').collect();
    s.len() <= 253
        && labels.len() >= 2
        && labels.iter().all(|l| {
            !l.is_empty()
                && l.len() <= 63
                && !l.starts_with('-')
                && !l.ends_with('-')
                && l.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn guids_and_domains() {
        assert!(is_guid("9188040d-6c67-4c5b-b112-36a304b66dad"));
        assert!(!is_guid("9188040d6c674c5bb11236a304b66dad"));
        assert!(!is_guid("abc8Q~9188040d-6c67-4c5b-b112-36a304b66dad"));
        assert!(is_domain("contoso.onmicrosoft.com"));
        assert!(!is_domain("contoso"));
        assert!(!is_domain("-bad.example"));
        assert!(!is_domain("has space.example"));
    }

    #[test]
    fn the_guides_pitfalls_are_refused() {
        assert!(tenant_id("common").is_err());
        assert!(tenant_id("Organizations").is_err());
        assert!(tenant_id("not a tenant").is_err());
        assert!(tenant_id("contoso.onmicrosoft.com").is_ok());
        assert!(tenant_id("72f988bf-86f1-41af-91ab-2d7cd011db47").is_ok());
        assert!(client_id("my-app").is_err());
        assert!(client_id("8a7b6c5d-1234-4e5f-9a8b-0c1d2e3f4a5b").is_ok());
        let secret_id = client_secret("8a7b6c5d-1234-4e5f-9a8b-0c1d2e3f4a5b").unwrap_err();
        assert!(secret_id.what.contains("Secret ID"));
        assert!(!secret_id.to_string().contains("8a7b6c5d"), "never quoted");
        assert!(client_secret("Xy8Q~abcdefghijklmnopqrstuvwxyz0123456789").is_ok());
        assert!(mail_account("relay").is_err());
        assert!(mail_account("relay@contoso.com").is_ok());
        assert!(from("<a@b.c>").is_err());
        let client = "8a7b6c5d-1234-4e5f-9a8b-0c1d2e3f4a5b";
        assert!(enterprise_object_id(client, client).is_err());
        assert!(enterprise_object_id("app-object", client).is_err());
        assert!(enterprise_object_id("6233fba6-0198-4277-892f-9275bf728bcc", client).is_ok());
    }
}
