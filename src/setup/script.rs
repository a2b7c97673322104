//! The Microsoft side of the setup guide as one PowerShell script with the user's values filled
//! in: part 1 (Azure: app registration, secret, API permission, admin consent) as the equivalent
//! Azure CLI commands, commented out because the app usually exists already; part 2 (Exchange
//! Online PowerShell: service principal, mailbox permissions, SMTP AUTH) ready to run, with the
//! least-privilege RBAC for Applications variant beside it.
//!
//! `upstream.transport = "graph"` gets the Graph variant: Microsoft Graph `Mail.Send` in part 1,
//! and in part 2 no SMTP AUTH switches and no FullAccess, only the RBAC for Applications role
//! `Application Mail.Send` as the scoped alternative.
//!
//! Every identifier names where it was checked. App-role ids are never printed: the script
//! reads them from the tenant's own copy of the API (`az ad sp show`), as `az ad app permission
//! add` documents, instead of printing a guess.

use std::fmt::Write as _;

use crate::config::{Cloud, TransportKind};

/// A permission the app needs on an API: what part 1 grants in Entra ID and part 2's RBAC
/// variant assigns in Exchange.
pub struct ApiPermission {
    /// Display name of the API in "APIs my organization uses".
    pub api_name: &'static str,
    /// The API's application id.
    pub api_app_id: &'static str,
    /// Where `api_app_id` was checked.
    pub api_app_id_source: &'static str,
    /// The application permission (app role value).
    pub role: &'static str,
    /// The Exchange RBAC for Applications role that grants the same, scoped.
    pub rbac_role: &'static str,
}

/// `SMTP.SendAsApp` on Office 365 Exchange Online.
pub const SMTP_SEND_AS_APP: ApiPermission = ApiPermission {
    api_name: "Office 365 Exchange Online",
    // Microsoft Learn, "Verify first-party Microsoft applications in sign-in reports"
    // (learn.microsoft.com/troubleshoot/entra/entra-id/governance/verify-first-party-apps-sign-in):
    // "Office 365 Exchange Online | 00000002-0000-0ff1-ce00-000000000000".
    api_app_id: "00000002-0000-0ff1-ce00-000000000000",
    api_app_id_source: "Microsoft Learn: Verify first-party Microsoft applications in sign-in reports",
    // Microsoft Learn, "Authenticate an IMAP, POP or SMTP connection using OAuth": "For SMTP
    // access, choose the SMTP.SendAsApp permission".
    role: "SMTP.SendAsApp",
    // Microsoft Learn, "Role Based Access Control for Applications in Exchange Online",
    // Supported Application Roles: "Application SMTP.SendAsApp".
    rbac_role: "Application SMTP.SendAsApp",
};

// Microsoft Learn, Add-AzADAppPermission (learn.microsoft.com/powershell/module/az.resources/
// add-azadapppermission): "Microsoft Graph: Get-AzAdServicePrincipal -ApplicationId
// 00000003-0000-0000-c000-000000000000".
const GRAPH_APP_ID: &str = "00000003-0000-0000-c000-000000000000";
const GRAPH_APP_ID_SOURCE: &str = "Microsoft Learn: Add-AzADAppPermission";

/// `Mail.Send` (application) on Microsoft Graph: what `sendMail` needs.
pub const GRAPH_MAIL_SEND: ApiPermission = ApiPermission {
    api_name: "Microsoft Graph",
    api_app_id: GRAPH_APP_ID,
    api_app_id_source: GRAPH_APP_ID_SOURCE,
    // Microsoft Learn, user-sendmail "Permissions": Application, Mail.Send.
    role: "Mail.Send",
    // Microsoft Learn, "Role Based Access Control for Applications in Exchange Online",
    // Supported Application Roles: "Application Mail.Send".
    rbac_role: "Application Mail.Send",
};

/// `Mail.ReadWrite` (application) on Microsoft Graph: the draft and upload sessions of
/// `upstream.graph_large_messages`.
pub const GRAPH_MAIL_READ_WRITE: ApiPermission = ApiPermission {
    api_name: "Microsoft Graph",
    api_app_id: GRAPH_APP_ID,
    api_app_id_source: GRAPH_APP_ID_SOURCE,
    role: "Mail.ReadWrite",
    // Same article, Supported Application Roles: "Application Mail.ReadWrite".
    rbac_role: "Application Mail.ReadWrite",
};

/// The values the script needs.
pub struct ScriptValues<'a> {
    pub tenant_id: &'a str,
    pub client_id: &'a str,
    pub mail_account: &'a str,
    pub from: &'a str,
    pub cloud: Cloud,
    /// The Enterprise applications Object ID, when known.
    pub object_id: Option<&'a str>,
    /// True when `object_id` came from the app's own token (claim `oid`), so it is certainly the
    /// Enterprise application's.
    pub object_id_from_token: bool,
    pub transport: TransportKind,
    /// `upstream.graph_large_messages`: Graph also needs `Mail.ReadWrite`.
    pub graph_large_messages: bool,
}

impl ScriptValues<'_> {
    /// What the app needs on which API: the first is the one sending needs.
    fn permissions(&self) -> Vec<&'static ApiPermission> {
        match self.transport {
            TransportKind::Smtp => vec![&SMTP_SEND_AS_APP],
            TransportKind::Graph if self.graph_large_messages => {
                vec![&GRAPH_MAIL_SEND, &GRAPH_MAIL_READ_WRITE]
            }
            TransportKind::Graph => vec![&GRAPH_MAIL_SEND],
        }
    }
}

const OBJECT_ID_PLACEHOLDER: &str = "<ENTERPRISE-APP-OBJECT-ID>";

/// The whole script (PowerShell; `#` lines are comments).
pub fn render(v: &ScriptValues<'_>) -> String {
    let mut s = String::new();
    let permissions = v.permissions();
    let transport = match v.transport {
        TransportKind::Smtp => "SMTP AUTH (XOAUTH2)",
        TransportKind::Graph => "Microsoft Graph sendMail",
    };
    let _ = writeln!(
        s,
        "# smtp-oauth-relay setup: the Microsoft 365 side, with your values filled in.\n\
         # Tenant {tenant}, app (client) id {client}, mail account {mailbox}, from {from}.\n\
         # Transport: {transport}.\n\
         # The setup guide's part 1 (Azure) is below as Azure CLI commands, commented out; part 2\n\
         # (Exchange Online PowerShell) is ready to run in PowerShell 7 or Windows PowerShell.\n\
         # This file holds no secret.",
        tenant = v.tenant_id,
        client = v.client_id,
        mailbox = v.mail_account,
        from = v.from,
    );
    part1(&mut s, v, &permissions);
    match v.transport {
        TransportKind::Smtp => part2(&mut s, v, permissions[0]),
        TransportKind::Graph => part2_graph(&mut s, v, &permissions),
    }
    s
}

fn part1(s: &mut String, v: &ScriptValues<'_>, permissions: &[&ApiPermission]) {
    let p = permissions[0];
    let roles = permissions
        .iter()
        .map(|p| p.role)
        .collect::<Vec<_>>()
        .join(" and ");
    let mut lookups = String::new();
    let mut adds = String::new();
    for (i, perm) in permissions.iter().enumerate() {
        let var = if i == 0 {
            "$Role".to_string()
        } else {
            format!("$Role{}", i + 1)
        };
        let _ = writeln!(
            lookups,
            "# {var} = az ad sp show --id $Api --query \"appRoles[?value=='{role}'].id\" -o tsv",
            role = perm.role
        );
        let _ = writeln!(
            adds,
            "# az ad app permission add --id $App --api $Api --api-permissions \"{var}=Role\""
        );
    }
    let _ = writeln!(
        s,
        "\n# ---------------------------------------------------------------------------------------\n\
         ## Part 1, Azure: the app registration, its secret, {roles} ({api}, application) and\n\
         ## admin consent, as Azure CLI commands (az login --tenant {tenant} first). Done already if\n\
         ## you have the client id above; the last four also repair a missing permission or consent.\n\
         ## To run a command, remove its leading '# ' (lines starting with ## explain).\n\
         ## Commands and parameters: Azure CLI reference, az ad app and az ad sp\n\
         ## (learn.microsoft.com/cli/azure/ad).\n\
         ##\n\
         ## The {api} API's application id ({source}):\n\
         # $Api = '{api_id}'\n\
         ## App-role ids are read from your tenant rather than printed here (az ad app permission\n\
         ## add help: the API's appRoles hold the ids to use with =Role):\n\
         {lookups}\
         ##\n\
         ## Only for a NEW app registration (its appId is then the client id):\n\
         # $App = az ad app create --display-name 'smtp-oauth-relay' --query appId -o tsv\n\
         ## A NEW client secret Value, into a file only, never on screen (then run setup with\n\
         ## --client-secret-file client_secret):\n\
         # az ad app credential reset --id $App --append --display-name 'smtp-oauth-relay' --years 1 --query password -o tsv > client_secret\n\
         ##\n\
         # $App = '{client}'\n\
         {adds}\
         ## The Enterprise application (service principal); \"already exists\" is fine:\n\
         # az ad sp create --id $App\n\
         # az ad app permission admin-consent --id $App\n\
         ## The Enterprise applications Object ID that part 2 needs (Microsoft Graph's id of the\n\
         ## service principal):\n\
         # az ad sp show --id $App --query id -o tsv",
        roles = roles,
        tenant = v.tenant_id,
        api = p.api_name,
        source = p.api_app_id_source,
        api_id = p.api_app_id,
        client = v.client_id,
        lookups = lookups,
        adds = adds,
    );
}

/// Connect-ExchangeOnline's argument for the cloud (Connect-ExchangeOnline reference,
/// -ExchangeEnvironmentName: none for Microsoft 365 (global and GCC), O365USGovGCCHigh,
/// O365USGovDoD, O365China (21Vianet)).
fn environment(cloud: Cloud) -> &'static str {
    match cloud {
        Cloud::Global => "",
        Cloud::GccHigh => " -ExchangeEnvironmentName O365USGovGCCHigh",
        Cloud::Dod => " -ExchangeEnvironmentName O365USGovDoD",
        Cloud::China => " -ExchangeEnvironmentName O365China",
    }
}

/// Where the Object ID below came from.
fn object_note(v: &ScriptValues<'_>) -> &'static str {
    match (v.object_id, v.object_id_from_token) {
        (Some(_), true) => {
            "# setup read this Object ID from the app's own access token (claim oid: the service\n\
             # principal), so it is the Enterprise application's, as New-ServicePrincipal needs."
        }
        (Some(_), false) => {
            "# This is the Object ID you gave; setup could not compare it with the app's token."
        }
        (None, _) => {
            "# Replace the placeholder (setup got no token to read it from): Microsoft Entra admin\n\
             # center > Enterprise applications > your app > Overview > Object ID, or\n\
             # az ad sp show --id <client id> --query id -o tsv."
        }
    }
}

fn part2(s: &mut String, v: &ScriptValues<'_>, p: &ApiPermission) {
    let environment = environment(v.cloud);
    let object_id = v.object_id.unwrap_or(OBJECT_ID_PLACEHOLDER);
    let object_note = object_note(v);
    let mailbox = ps(v.mail_account);
    let from_differs = !v.from.eq_ignore_ascii_case(v.mail_account);
    let send_as = if from_differs {
        format!(
            "\n# From ({from}) differs from the mail account: the app needs SendAs on it\n\
             # (Add-RecipientPermission reference: -Identity, -Trustee, -AccessRights SendAs).\n\
             Add-RecipientPermission -Identity {from_ps} -Trustee $Sp.Identity -AccessRights SendAs -Confirm:$false\n",
            from = v.from,
            from_ps = ps(v.from),
        )
    } else {
        String::new()
    };
    let scope_name = format!("smtp-oauth-relay {}", v.mail_account);
    let filter = format!(
        "PrimarySmtpAddress -eq '{}'",
        v.mail_account.replace('\'', "''")
    );
    let _ = writeln!(
        s,
        "\n# ---------------------------------------------------------------------------------------\n\
         # Part 2, Exchange Online PowerShell. Commands and parameters: Microsoft Learn, \"Authenticate\n\
         # an IMAP, POP or SMTP connection using OAuth\" and the Exchange cmdlet reference.\n\
         Install-Module -Name ExchangeOnlineManagement   # once per machine\n\
         Import-Module ExchangeOnlineManagement\n\
         Connect-ExchangeOnline{environment}\n\
         \n\
         $AppId    = {client}   # Application (client) ID\n\
         # The Object ID of the app in Microsoft Entra admin center > ENTERPRISE APPLICATIONS > your app\n\
         # > Overview. NOT the Object ID on App registrations > your app > Overview: that one is the\n\
         # application object, and with it Exchange answers 535 5.7.3 Authentication unsuccessful.\n\
         {object_note}\n\
         $ObjectId = {object_id}\n\
         $Mailbox  = {mailbox}   # Mail Account: the mailbox the relay signs in as\n\
         \n\
         # The mailbox must exist in Exchange Online (a shared mailbox is enough:\n\
         # New-Mailbox -Shared -Name 'No Reply' -PrimarySmtpAddress <address>):\n\
         Get-EXOMailbox -Identity $Mailbox | Format-List DisplayName,PrimarySmtpAddress,RecipientTypeDetails\n\
         \n\
         # Register the app's service principal in Exchange (New-ServicePrincipal -AppId -ObjectId):\n\
         New-ServicePrincipal -AppId $AppId -ObjectId $ObjectId -DisplayName 'smtp-oauth-relay'\n\
         $Sp = Get-ServicePrincipal -Identity $ObjectId\n\
         $Sp | Format-Table DisplayName,AppId,ObjectId,Identity\n\
         \n\
         # SMTP AUTH must be allowed for the tenant and for the mailbox (both must say False):\n\
         Get-TransportConfig | Format-List SmtpClientAuthenticationDisabled\n\
         Get-CASMailbox -Identity $Mailbox | Format-List SmtpClientAuthenticationDisabled\n\
         Set-CASMailbox -Identity $Mailbox -SmtpClientAuthenticationDisabled $false\n\
         # Only if the tenant-wide value is True and your policy allows it:\n\
         # Set-TransportConfig -SmtpClientAuthenticationDisabled $false\n\
         # Still 535 5.7.139 with both False: Microsoft Entra Security defaults (or a Conditional\n\
         # Access policy) block SMTP AUTH.\n\
         \n\
         # Then EITHER A (the setup guide) OR B (least privilege), not both.\n\
         #\n\
         # A. The guide: {role} consented tenant-wide in part 1, plus FullAccess on the mailbox\n\
         #    (Add-MailboxPermission reference: -Identity, -User, -AccessRights FullAccess).\n\
         Add-MailboxPermission -Identity $Mailbox -User $Sp.Identity -AccessRights FullAccess\n\
         {send_as}\
         #\n\
         # B. RBAC for Applications (Microsoft Learn, \"Role Based Access Control for Applications in\n\
         #    Exchange Online\"): the app may act only on the mailboxes of a management scope.\n\
         #    Remove the tenant-wide {role} consent of part 1 (Entra and Exchange grants add up),\n\
         #    skip A's Add-MailboxPermission, and run these instead. That article does not say whether\n\
         #    SMTP also needs FullAccess: if AUTH answers 535 5.7.3 with B alone, add A's line.\n\
         #    With B the token carries no roles; smtp-oauth-relay check then warns, as expected.\n\
         # New-ManagementScope -Name {scope} -RecipientRestrictionFilter {filter}\n\
         # New-ManagementRoleAssignment -App $ObjectId -Role {rbac_role} -CustomResourceScope {scope}\n\
         # Test-ServicePrincipalAuthorization -Identity $ObjectId -Resource $Mailbox | Format-Table\n\
         \n\
         # Finally, on the relay's host: smtp-oauth-relay check --send-to <your address>",
        environment = environment,
        client = ps(v.client_id),
        object_note = object_note,
        object_id = ps(object_id),
        mailbox = mailbox,
        role = p.role,
        send_as = send_as,
        scope = ps(&scope_name),
        filter = ps(&filter),
        rbac_role = ps(p.rbac_role),
    );
}

/// Part 2 for Microsoft Graph: no SMTP AUTH and no mailbox permission, only SendAs for a
/// different From and the scoped RBAC for Applications variant.
fn part2_graph(s: &mut String, v: &ScriptValues<'_>, permissions: &[&ApiPermission]) {
    let object_id = v.object_id.unwrap_or(OBJECT_ID_PLACEHOLDER);
    let roles = permissions
        .iter()
        .map(|p| p.role)
        .collect::<Vec<_>>()
        .join(" and ");
    let from_differs = !v.from.eq_ignore_ascii_case(v.mail_account);
    let send_as = if from_differs {
        format!(
            "\n# From ({from}) differs from the mail account: with Graph the MAILBOX needs SendAs on\n\
             # it (Graph sends as the mailbox it is called for; ErrorSendAsDenied otherwise):\n\
             Add-RecipientPermission -Identity {from_ps} -Trustee $Mailbox -AccessRights SendAs -Confirm:$false\n",
            from = v.from,
            from_ps = ps(v.from),
        )
    } else {
        String::new()
    };
    let scope_name = ps(&format!("smtp-oauth-relay {}", v.mail_account));
    let filter = ps(&format!(
        "PrimarySmtpAddress -eq '{}'",
        v.mail_account.replace('\'', "''")
    ));
    let mut assignments = String::new();
    for p in permissions {
        let _ = writeln!(
            assignments,
            "# New-ManagementRoleAssignment -App $ObjectId -Role {role} -CustomResourceScope {scope}",
            role = ps(p.rbac_role),
            scope = scope_name,
        );
    }
    let _ = writeln!(
        s,
        "\n# ---------------------------------------------------------------------------------------\n\
         # Part 2, Exchange Online PowerShell, for Microsoft Graph. Not needed with Graph: SMTP AUTH\n\
         # (the Get-/Set-CASMailbox and Set-TransportConfig SmtpClientAuthenticationDisabled steps),\n\
         # SMTP.SendAsApp and FullAccess. Every message sent is kept in the mailbox's Sent Items:\n\
         # give it a retention policy.\n\
         Install-Module -Name ExchangeOnlineManagement   # once per machine\n\
         Import-Module ExchangeOnlineManagement\n\
         Connect-ExchangeOnline{environment}\n\
         \n\
         $AppId    = {client}   # Application (client) ID\n\
         # The Object ID of the app in Microsoft Entra admin center > ENTERPRISE APPLICATIONS > your app\n\
         # > Overview, not the one on App registrations (that is the application object).\n\
         {object_note}\n\
         $ObjectId = {object_id}\n\
         $Mailbox  = {mailbox}   # Mail Account: the mailbox Graph sends as\n\
         \n\
         # The mailbox must exist in Exchange Online (licensed or shared), named by its primary SMTP\n\
         # address or UPN (an alias gives ErrorInvalidUser):\n\
         Get-EXOMailbox -Identity $Mailbox | Format-List DisplayName,PrimarySmtpAddress,RecipientTypeDetails\n\
         {send_as}\
         \n\
         # Then EITHER A OR B, not both.\n\
         #\n\
         # A. {roles} (Microsoft Graph, Application permissions) consented in part 1: nothing more to\n\
         #    do here. The app may then send as EVERY mailbox of the tenant.\n\
         #\n\
         # B. RBAC for Applications (Microsoft Learn, \"Role Based Access Control for Applications in\n\
         #    Exchange Online\"): the app may send only as the mailboxes of a management scope.\n\
         #    Do NOT add (or remove) part 1's Entra permission: Entra and Exchange grants add up.\n\
         #    Assignments take a while (15-30 minutes) to apply. With B the token carries no roles;\n\
         #    smtp-oauth-relay check then warns, as expected.\n\
         # New-ServicePrincipal -AppId $AppId -ObjectId $ObjectId -DisplayName 'smtp-oauth-relay'\n\
         # New-ManagementScope -Name {scope} -RecipientRestrictionFilter {filter}\n\
         {assignments}\
         # Test-ServicePrincipalAuthorization -Identity $ObjectId -Resource $Mailbox | Format-Table\n\
         \n\
         # Finally, on the relay's host: smtp-oauth-relay check --send-to <your address>",
        environment = environment(v.cloud),
        client = ps(v.client_id),
        object_note = object_note(v),
        object_id = ps(object_id),
        mailbox = ps(v.mail_account),
        send_as = send_as,
        roles = roles,
        scope = scope_name,
        filter = filter,
        assignments = assignments,
    );
}

/// A PowerShell single-quoted string: nothing inside is expanded; `'` is doubled.
fn ps(value: &str) -> String {
    format!("'{}'", value.replace('\'', "''"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn values<'a>(from: &'a str, object_id: Option<&'a str>) -> ScriptValues<'a> {
        ScriptValues {
            tenant_id: "9188040d-6c67-4c5b-b112-36a304b66dad",
            client_id: "0f6a3d44-7c2b-4e1a-9d55-3b2f1c8e7a10",
            mail_account: "no-reply@contoso.com",
            from,
            cloud: Cloud::Global,
            object_id,
            object_id_from_token: object_id.is_some(),
            transport: TransportKind::Smtp,
            graph_large_messages: false,
        }
    }

    #[test]
    fn fills_in_the_values_and_sendas_only_when_from_differs() {
        let same = render(&values(
            "no-reply@contoso.com",
            Some("6233fba6-0198-4277-892f-9275bf728bcc"),
        ));
        assert!(same.contains("$ObjectId = '6233fba6-0198-4277-892f-9275bf728bcc'"));
        assert!(same.contains("$AppId    = '0f6a3d44-7c2b-4e1a-9d55-3b2f1c8e7a10'"));
        assert!(same.contains("New-ServicePrincipal -AppId $AppId -ObjectId $ObjectId"));
        assert!(same.contains("-AccessRights FullAccess"));
        assert!(!same.contains("Add-RecipientPermission"));
        assert!(same.contains("-Role 'Application SMTP.SendAsApp'"));
        assert!(same.contains("'PrimarySmtpAddress -eq ''no-reply@contoso.com'''"));
        let other = render(&values("alerts@contoso.com", None));
        assert!(other.contains("Add-RecipientPermission -Identity 'alerts@contoso.com'"));
        assert!(other.contains(OBJECT_ID_PLACEHOLDER));
        assert!(other.contains("00000002-0000-0ff1-ce00-000000000000"));
    }

    #[test]
    fn graph_gets_mail_send_and_no_smtp_auth_steps() {
        let mut v = values(
            "alerts@contoso.com",
            Some("6233fba6-0198-4277-892f-9275bf728bcc"),
        );
        v.transport = TransportKind::Graph;
        let graph = render(&v);
        assert!(graph.contains("# $Api = '00000003-0000-0000-c000-000000000000'"));
        assert!(graph.contains("appRoles[?value=='Mail.Send'].id"));
        assert!(graph.contains("-Role 'Application Mail.Send' -CustomResourceScope"));
        assert!(graph.contains("Test-ServicePrincipalAuthorization"));
        assert!(graph.contains("-Trustee $Mailbox -AccessRights SendAs"));
        for absent in [
            "Set-CASMailbox -Identity",
            "Add-MailboxPermission",
            "SMTP.SendAsApp'",
            "00000002-0000-0ff1-ce00-000000000000",
            "Mail.ReadWrite",
        ] {
            assert!(!graph.contains(absent), "{absent} in:\n{graph}");
        }
        v.graph_large_messages = true;
        let large = render(&v);
        assert!(large.contains("appRoles[?value=='Mail.ReadWrite'].id"));
        assert!(large.contains("\"$Role2=Role\""));
        assert!(large.contains("-Role 'Application Mail.ReadWrite'"));
    }

    #[test]
    fn quoting_expands_nothing() {
        assert_eq!(ps("a'b$c"), "'a''b$c'");
    }
}
