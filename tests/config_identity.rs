//! One owner of validity: what `check` calls a wrong Microsoft 365 value (a Secret ID given as
//! the secret, `common` as tenant, an app name as client id, a mailbox that is no address),
//! `config`, `serve` and `check` all refuse with exit 2, the key named and the fix given, and
//! the secret never quoted.

mod common;

use common::process::run_cli;

const SECRET_ID: &str = "3f2b8c1e-55aa-4d0e-9b7c-0d1e2f3a4b5c";

fn config_with(dir: &std::path::Path, oauth: &str, upstream: &str) -> std::path::PathBuf {
    let path = dir.join("relay.toml");
    let text = format!(
        "[queue]\ndir = \"{}/spool\"\n[upstream]\n{upstream}\n[oauth]\n{oauth}\n",
        dir.display()
    );
    std::fs::write(&path, text).expect("write relay.toml");
    path
}

#[test]
fn every_command_refuses_the_guides_pitfalls_with_exit_2() {
    let tenant = "tenant_id = \"9188040d-6c67-4c5b-b112-36a304b66dad\"";
    let client = "client_id = \"0f6a3d44-7c2b-4e1a-9d55-3b2f1c8e7a10\"";
    let secret = "client_secret = \"Xy8Q~abcdefghijklmnop\"";
    let account = "mail_account = \"relay@contoso.com\"";
    let cases = [
        (
            format!("{tenant}\n{client}\nclient_secret = \"{SECRET_ID}\""),
            account.to_string(),
            "oauth.client_secret",
            "not its Secret ID",
        ),
        (
            format!("tenant_id = \"common\"\n{client}\n{secret}"),
            account.to_string(),
            "oauth.tenant_id",
            "Directory (tenant) ID",
        ),
        (
            format!("{tenant}\nclient_id = \"relay-app\"\n{secret}"),
            account.to_string(),
            "oauth.client_id",
            "Application (client) ID",
        ),
        (
            format!("{tenant}\n{client}\n{secret}"),
            "mail_account = \"relay\"".to_string(),
            "upstream.mail_account",
            "is not an e-mail address",
        ),
    ];
    for (oauth, upstream, key, words) in cases {
        let dir = tempfile::tempdir().expect("tempdir");
        let config = config_with(dir.path(), &oauth, &upstream);
        for args in [
            &["config"][..],
            &["serve"],
            &["check"],
            &["check", "--json"],
        ] {
            let out = run_cli(&config, args, &[]);
            let stderr = String::from_utf8_lossy(&out.stderr);
            let stdout = String::from_utf8_lossy(&out.stdout);
            assert_eq!(
                out.status.code(),
                Some(2),
                "{args:?} with a wrong {key}:\n{stderr}{stdout}"
            );
            assert!(stderr.contains(key), "{args:?}: {key} not named:\n{stderr}");
            assert!(
                stderr.contains(words),
                "{args:?}: no fix for {key}:\n{stderr}"
            );
            assert!(
                !stderr.contains(SECRET_ID) && !stdout.contains(SECRET_ID),
                "{args:?}: the secret was quoted"
            );
            if args[0] == "check" {
                // The report's step 1 says the same, with the fix on its own line.
                assert!(stdout.contains(key), "{args:?}:\n{stdout}");
                assert!(stdout.contains(words), "{args:?}:\n{stdout}");
            }
        }
    }
}
