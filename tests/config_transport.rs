//! `upstream.transport` through the real binary: `config` shows the endpoints it derives from
//! transport and cloud (scope, Graph root, token URL) and says which were set; Graph keys that
//! are wrong are refused with exit 2 and the key named, by `config` and by `serve`.

mod common;

use std::path::{Path, PathBuf};

use common::process::{free_port, run_cli};

fn config(dir: &Path, upstream: &str) -> PathBuf {
    let path = dir.join("relay.toml");
    let text = format!(
        "[smtp]\nlisten = [\"127.0.0.1:{port}\"]\nhostname = \"relay.test\"\n\
         [queue]\ndir = \"{spool}\"\n\
         [upstream]\nmail_account = \"relay@contoso.com\"\n{upstream}\n\
         [oauth]\ntenant_id = \"contoso.onmicrosoft.com\"\n\
         client_id = \"0f6a3d44-7c2b-4e1a-9d55-3b2f1c8e7a10\"\nclient_secret = \"abc8Q~value\"\n",
        port = free_port(),
        spool = dir.join("spool").display(),
    );
    std::fs::write(&path, text).expect("write relay.toml");
    path
}

#[test]
fn config_shows_what_graph_derives_from_the_cloud() {
    let dir = tempfile::tempdir().expect("tempdir");
    let out = run_cli(
        &config(dir.path(), "transport = \"graph\"\ncloud = \"gcc-high\""),
        &["config"],
        &[],
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{stdout}");
    assert!(stdout.contains("transport = \"graph\""), "{stdout}");
    for line in [
        "# oauth.scope = \"https://graph.microsoft.us/.default\"  (derived)",
        "# upstream.graph_url = \"https://graph.microsoft.us\"  (derived)",
        "# oauth.token_url = \"https://login.microsoftonline.us/contoso.onmicrosoft.com/oauth2/v2.0/token\"  (derived)",
    ] {
        assert!(stdout.contains(line), "missing {line:?} in\n{stdout}");
    }
    assert!(!stdout.contains("abc8Q~value"));

    // SMTP: the Exchange scope and host; a set value says so.
    let out = run_cli(
        &config(dir.path(), "host = \"smtp-alt.example.com\""),
        &["config"],
        &[],
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains("# oauth.scope = \"https://outlook.office365.com/.default\"  (derived)"),
        "{stdout}"
    );
    assert!(
        stdout.contains("# upstream.host = \"smtp-alt.example.com\"  (set)"),
        "{stdout}"
    );
}

#[test]
fn wrong_graph_keys_are_refused_with_the_key_named() {
    let dir = tempfile::tempdir().expect("tempdir");
    for (upstream, key, words) in [
        (
            "transport = \"graph\"\ngraph_url = \"http://graph.example.com\"",
            "upstream.graph_url",
            "https://",
        ),
        (
            "transport = \"graph\"\ngraph_url = \"https://u:Pa55-graph@graph.microsoft.com\"",
            "upstream.graph_url",
            "user information",
        ),
        (
            "transport = \"graph\"\nconnections = 5",
            "upstream.connections",
            "429 ApplicationThrottled",
        ),
        ("transport = \"ews\"", "upstream.transport", "ews"),
        (
            "transport = \"smtp\"\ngraph_large_messages = true",
            "upstream.graph_large_messages",
            "applies only to upstream.transport = \"graph\"",
        ),
    ] {
        let file = config(dir.path(), upstream);
        for command in [&["config"][..], &["serve"][..]] {
            let out = run_cli(&file, command, &[]);
            let stderr = String::from_utf8_lossy(&out.stderr);
            assert_eq!(
                out.status.code(),
                Some(2),
                "{command:?} {upstream}: {stderr}"
            );
            assert!(stderr.contains(key), "{upstream}: {stderr}");
            assert!(stderr.contains(words), "{upstream}: {stderr}");
            assert!(!stderr.contains("Pa55-graph"), "{stderr}");
        }
    }
}
