//! `/readyz` asks the spool whether it can take mail and creates no file to find out (it used to
//! create and remove a probe file in `tmp/` on every call, i.e. every few seconds per probe for
//! the life of the pod). Watched with inotify: no file appears anywhere in the spool.

use std::ffi::CString;
use std::os::unix::ffi::OsStrExt;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use smtp_oauth_relay::admin::{AdminState, router};
use smtp_oauth_relay::config::Config;
use smtp_oauth_relay::spool::Spool;
use tokio_util::sync::CancellationToken;

/// An inotify instance watching for files created in `dirs`.
struct Watch(i32);

impl Watch {
    fn new(dirs: &[std::path::PathBuf]) -> Watch {
        // SAFETY: plain syscalls; the paths are NUL-terminated.
        let fd = unsafe { libc::inotify_init1(libc::IN_NONBLOCK | libc::IN_CLOEXEC) };
        assert!(
            fd >= 0,
            "inotify_init1: {}",
            std::io::Error::last_os_error()
        );
        for dir in dirs {
            let c = CString::new(dir.as_os_str().as_bytes()).expect("path");
            let wd = unsafe {
                libc::inotify_add_watch(fd, c.as_ptr(), libc::IN_CREATE | libc::IN_MOVED_TO)
            };
            assert!(
                wd >= 0,
                "watch {}: {}",
                dir.display(),
                std::io::Error::last_os_error()
            );
        }
        Watch(fd)
    }

    /// Bytes of events queued so far (0: nothing was created).
    fn pending(&self) -> usize {
        let mut buf = [0u8; 4096];
        let mut total = 0;
        for _ in 0..1000 {
            // SAFETY: reading into a local buffer of the given size.
            let n = unsafe { libc::read(self.0, buf.as_mut_ptr().cast(), buf.len()) };
            if n <= 0 {
                break;
            }
            total += n as usize;
        }
        total
    }
}

impl Drop for Watch {
    fn drop(&mut self) {
        // SAFETY: closing our own descriptor once.
        unsafe { libc::close(self.0) };
    }
}

#[tokio::test]
async fn readyz_creates_no_file() {
    let dir = tempfile::tempdir().expect("tempdir");
    let spool_dir = dir.path().join("spool");
    let (spool, _) = Spool::open(&spool_dir).expect("spool");
    let mut config = Config::from_toml_str("").expect("config");
    config.queue.min_free_space = smtp_oauth_relay::config::ByteSize(1);
    let (_tx, rx) = tokio::sync::watch::channel(Arc::new(config));
    let state = AdminState::new(std::sync::Arc::new(spool), rx);
    state.accepting.store(true, Ordering::Release);
    let listener = smtp_oauth_relay::admin::bind("127.0.0.1:0".parse().expect("addr"))
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(smtp_oauth_relay::admin::serve(
        listener,
        router(state),
        CancellationToken::new(),
    ));
    let client = reqwest::Client::new();
    let mut dirs = vec![spool_dir.clone()];
    for sub in ["tmp", "queue", "held", "failed", "state", "corrupt"] {
        dirs.push(spool_dir.join(sub));
    }
    let watch = Watch::new(&dirs);
    for _ in 0..20 {
        let resp = client
            .get(format!("http://{addr}/readyz"))
            .send()
            .await
            .expect("GET /readyz");
        assert_eq!(resp.status(), 200);
        assert_eq!(resp.text().await.expect("body"), "ready\n");
    }
    // The events of a create during a request are queued before its response is sent.
    assert_eq!(watch.pending(), 0, "/readyz created files in the spool");
}
