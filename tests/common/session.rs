//! One SMTP session over an in-memory stream with a real spool: the input is delivered to the
//! session in reads of a chosen size (1 byte at a time, say), which a TCP socket cannot promise.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::AtomicU64;
use std::time::Duration;

use smtp_oauth_relay::config::Config;
use smtp_oauth_relay::inbound::{InboundSettings, Session, Shared};
use smtp_oauth_relay::spool::Spool;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_util::sync::CancellationToken;

pub struct SessionRig {
    pub shared: Arc<Shared>,
    pub spool: Spool,
    _dir: tempfile::TempDir,
}

/// A session environment for `toml` (a relay.toml fragment) with its own temporary spool.
pub fn session_rig(toml: &str) -> SessionRig {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut config = Config::from_toml_str(toml).expect("test config valid");
    config.queue.dir = dir.path().join("spool");
    config.queue.min_free_space = smtp_oauth_relay::config::ByteSize(1);
    let (spool, _) = Spool::open(&config.queue.dir).expect("spool");
    let settings = InboundSettings::from_config(&config).expect("settings");
    SessionRig {
        shared: Arc::new(Shared {
            settings,
            store: Arc::new(spool.clone()),
            accepted: AtomicU64::new(0),
            metrics: Default::default(),
            auth_failures: Default::default(),
            routes: Default::default(),
        }),
        spool,
        _dir: dir,
    }
}

/// Runs one session: the session reads `input` at most `read_size` bytes at a time, then the
/// client half-closes; returns everything the session wrote. Panics on a hang (10 s).
pub async fn run_session(rig: &SessionRig, input: &[u8], read_size: usize) -> Vec<u8> {
    // The pipe holds at most `read_size` bytes, so no read can return more.
    let (mut client, mut server) = tokio::io::duplex(read_size.max(1));
    let shared = rig.shared.clone();
    let server_task = tokio::spawn(async move {
        let peer: SocketAddr = "127.0.0.1:40000".parse().expect("addr");
        let mut session = Session::new(shared, peer);
        session.greeting();
        let _ = session.drive(&mut server, &CancellationToken::new()).await;
        let _ = server.shutdown().await;
    });
    let (mut rd, mut wr) = tokio::io::split(&mut client);
    let input = input.to_vec();
    let write = async move {
        let _ = wr.write_all(&input).await;
        let _ = wr.shutdown().await;
    };
    let read = async move {
        let mut out = Vec::new();
        let _ = rd.read_to_end(&mut out).await;
        out
    };
    let (_, out) =
        tokio::time::timeout(Duration::from_secs(10), async { tokio::join!(write, read) })
            .await
            .expect("session finished");
    tokio::time::timeout(Duration::from_secs(10), server_task)
        .await
        .expect("session task ended")
        .expect("session task did not panic");
    out
}

/// The final lines of the replies in `out` (one per reply), e.g. `"250 2.0.0 queued as ..."`.
pub fn final_replies(out: &[u8]) -> Vec<String> {
    String::from_utf8_lossy(out)
        .split("\r\n")
        .filter(|l| l.len() >= 4 && l.as_bytes()[3] == b' ')
        .map(str::to_string)
        .collect()
}

/// The three-digit codes of [`final_replies`].
pub fn reply_codes(out: &[u8]) -> Vec<u16> {
    final_replies(out)
        .iter()
        .filter_map(|l| l[..3].parse().ok())
        .collect()
}
