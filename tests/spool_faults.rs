//! Fault matrix: every step of the commit protocol failing with ENOSPC and EIO.

use std::fs;
use std::path::Path;
use std::time::{Duration, UNIX_EPOCH};

use smtp_oauth_relay::spool::{
    Envelope, Fault, FaultPoint, MailParams, Recipient, Spool, SpoolError,
};

fn envelope() -> Envelope {
    Envelope {
        mail_from: "app@example.com".into(),
        mail_params: MailParams::default(),
        recipients: vec![Recipient::new("alice@example.com")],
        client: "127.0.0.1:40000".into(),
        helo: "app.example".into(),
        auth_user: None,
        received_at: UNIX_EPOCH + Duration::from_secs(1_764_441_240),
        route: "default".into(),
    }
}

/// The errno an I/O failure of the spool carries (the injected one, if the fault fired).
fn errno_of(err: &SpoolError) -> Option<i32> {
    match err {
        SpoolError::NoSpace { source, .. } | SpoolError::Io { source, .. } => source.raw_os_error(),
        _ => None,
    }
}

fn count(dir: &Path) -> usize {
    fs::read_dir(dir).unwrap().count()
}

/// Create, write `size` bytes in 64 KiB chunks, commit; the first error wins.
async fn attempt(spool: &Spool, size: usize) -> Result<String, SpoolError> {
    let data = vec![b'x'; size];
    let mut m = spool.create(&envelope()).await?;
    for c in data.chunks(64 * 1024) {
        m.write_all(c).await?;
    }
    m.commit().await
}

const POINTS: [FaultPoint; 5] = [
    FaultPoint::Create,
    FaultPoint::Write,
    FaultPoint::FileFsync,
    FaultPoint::Rename,
    FaultPoint::DirFsync,
];

#[tokio::test]
async fn every_step_every_errno() {
    for point in POINTS {
        for (fault, no_space) in [(Fault::enospc(point), true), (Fault::eio(point), false)] {
            // Small (written only at commit) and large (written during write_all) bodies.
            for size in [100usize, 1024 * 1024] {
                let tmp = tempfile::tempdir().unwrap();
                let (spool, _) = Spool::open(tmp.path()).unwrap();
                let ok_before = attempt(&spool, 10).await.unwrap();
                spool.inject_fault(Some(fault));
                let err = attempt(&spool, size)
                    .await
                    .expect_err(&format!("{point:?} {fault:?} size {size} must fail"));
                let what = format!("{point:?} errno {} size {size}: {err}", fault.errno);
                assert_eq!(err.is_no_space(), no_space, "{what}");
                match &err {
                    SpoolError::NoSpace { source, .. } | SpoolError::Io { source, .. } => {
                        assert_eq!(source.raw_os_error(), Some(fault.errno), "{what}")
                    }
                    other => panic!("{what}: unexpected error type {other:?}"),
                }
                // Nothing partial: only the earlier message in queue/, nothing in tmp/.
                assert_eq!(count(&tmp.path().join("queue")), 1, "{what}");
                assert_eq!(count(&tmp.path().join("tmp")), 0, "{what}");
                let listed: Vec<String> = spool.list().unwrap().into_iter().map(|e| e.id).collect();
                assert_eq!(listed, vec![ok_before.clone()], "{what}");
                // The spool keeps working.
                let next = attempt(&spool, size).await.unwrap();
                assert_eq!(spool.list().unwrap().len(), 2, "{what}");
                assert_eq!(count(&tmp.path().join("tmp")), 0, "{what}");
                // And a restart finds exactly the two good messages.
                drop(spool);
                let (_spool, report) = Spool::open(tmp.path()).unwrap();
                assert_eq!(
                    (report.queued, report.corrupt, report.tmp_removed),
                    (2, 0, 0),
                    "{what}"
                );
                assert!(
                    tmp.path()
                        .join("queue")
                        .join(format!("{next}.msg"))
                        .exists()
                );
            }
        }
    }
}

#[tokio::test]
async fn failed_message_refuses_further_writes() {
    let tmp = tempfile::tempdir().unwrap();
    let (spool, _) = Spool::open(tmp.path()).unwrap();
    let mut m = spool.create(&envelope()).await.unwrap();
    spool.inject_fault(Some(Fault::enospc(FaultPoint::Write)));
    let big = vec![b'y'; 300 * 1024];
    let err = m.write_all(&big).await.unwrap_err();
    assert!(err.is_no_space());
    assert_eq!(
        errno_of(&err),
        Some(libc::ENOSPC),
        "the injected fault fired: {err}"
    );
    assert_eq!(
        count(&tmp.path().join("tmp")),
        0,
        "tmp removed at the failure"
    );
    assert!(matches!(
        m.write_all(b"more").await,
        Err(SpoolError::Discarded(_))
    ));
    assert!(matches!(m.commit().await, Err(SpoolError::Discarded(_))));
    assert_eq!(count(&tmp.path().join("queue")), 0);
}

#[tokio::test]
async fn fault_is_one_shot_and_clearable() {
    let tmp = tempfile::tempdir().unwrap();
    let (spool, _) = Spool::open(tmp.path()).unwrap();
    spool.inject_fault(Some(Fault::eio(FaultPoint::Rename)));
    spool.inject_fault(None);
    attempt(&spool, 10).await.unwrap();
    spool.inject_fault(Some(Fault::eio(FaultPoint::Create)));
    let err = attempt(&spool, 10).await.expect_err("the fault fires");
    assert_eq!(errno_of(&err), Some(libc::EIO), "{err}");
    attempt(&spool, 10).await.unwrap();
    assert_eq!(spool.list().unwrap().len(), 2);
}

/// Commits that are cancelled (the client disconnects mid-commit) never wedge group commit.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancelled_commits_do_not_wedge_others() {
    let tmp = tempfile::tempdir().unwrap();
    let (spool, _) = Spool::open(tmp.path()).unwrap();
    let mut cancelled = 0;
    for round in 0..20 {
        let mut handles = Vec::new();
        for i in 0..8 {
            let spool = spool.clone();
            handles.push(tokio::spawn(async move { attempt(&spool, 1000 + i).await }));
        }
        // Abort some mid-flight.
        tokio::task::yield_now().await;
        for h in handles.iter().step_by(3) {
            h.abort();
        }
        for h in handles {
            match h.await {
                Ok(r) => {
                    r.unwrap();
                }
                Err(e) => {
                    assert!(e.is_cancelled(), "round {round}: {e}");
                    cancelled += 1;
                }
            }
        }
    }
    // The premise: some commits really were cut off (an fsync'd commit cannot finish in the
    // one yield before the abort).
    assert!(cancelled > 0, "no commit was cancelled");
    // A fresh commit completes promptly.
    tokio::time::timeout(Duration::from_secs(10), attempt(&spool, 10))
        .await
        .expect("group commit wedged")
        .unwrap();
    // Nothing half-there: every file in queue/ decodes and is whole.
    drop(spool);
    let (_spool, report) = Spool::open(tmp.path()).unwrap();
    assert_eq!(report.corrupt, 0, "{report}");
}

/// A real full filesystem (a 1 MiB tmpfs). Needs CAP_SYS_ADMIN; skipped (with a note) without.
#[tokio::test]
async fn real_disk_full_on_tmpfs() {
    struct Unmount(std::ffi::CString);
    impl Drop for Unmount {
        fn drop(&mut self) {
            // SAFETY: valid NUL-terminated path.
            unsafe { libc::umount2(self.0.as_ptr(), libc::MNT_DETACH) };
        }
    }
    let base = tempfile::tempdir().unwrap();
    let mnt = base.path().join("mnt");
    fs::create_dir(&mnt).unwrap();
    let c = |s: &str| std::ffi::CString::new(s).unwrap();
    let target = c(mnt.to_str().unwrap());
    // SAFETY: all pointers are valid NUL-terminated strings.
    let rc = unsafe {
        libc::mount(
            c("tmpfs").as_ptr(),
            target.as_ptr(),
            c("tmpfs").as_ptr(),
            0,
            c("size=1m,mode=0700").as_ptr().cast(),
        )
    };
    if rc != 0 {
        eprintln!(
            "skipping real disk-full test: cannot mount tmpfs: {}",
            std::io::Error::last_os_error()
        );
        return;
    }
    let _unmount = Unmount(target);
    let (spool, _) = Spool::open(&mnt.join("spool")).unwrap();
    let first = attempt(&spool, 1000).await.unwrap();
    assert!(spool.free_space().unwrap() < 1024 * 1024);
    let err = attempt(&spool, 2 * 1024 * 1024).await.unwrap_err();
    assert!(err.is_no_space(), "{err}");
    assert_eq!(count(&mnt.join("spool/tmp")), 0);
    assert_eq!(count(&mnt.join("spool/queue")), 1);
    // The space of the failed message is back: the next message fits.
    let second = attempt(&spool, 100 * 1024).await.unwrap();
    let ids: Vec<String> = spool.list().unwrap().into_iter().map(|e| e.id).collect();
    assert_eq!(ids, vec![first, second]);
    drop(spool);
}
