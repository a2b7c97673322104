//! Small filesystem helpers, fault injection and counters.

use std::ffi::CString;
use std::fs::{File, OpenOptions};
use std::io::{self, Read};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

use super::error::SpoolError;
use super::format::{self, DecodeError, Header, MAX_HEADER_LEN};

/// A step of the commit protocol that a test can make fail.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FaultPoint {
    /// `open(tmp/<ID>.msg, O_CREAT|O_EXCL)`.
    Create,
    /// Any write of the message file (header, body chunk, length patch).
    Write,
    /// `fsync` of the message file.
    FileFsync,
    /// The commit rename `tmp/ → queue/`.
    Rename,
    /// The (group) `fsync` of `queue/`.
    DirFsync,
}

/// A one-shot injected failure: the next time `point` is reached it fails with `errno`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Fault {
    pub point: FaultPoint,
    pub errno: i32,
}

impl Fault {
    pub fn enospc(point: FaultPoint) -> Fault {
        Fault {
            point,
            errno: libc::ENOSPC,
        }
    }

    pub fn eio(point: FaultPoint) -> Fault {
        Fault {
            point,
            errno: libc::EIO,
        }
    }
}

#[derive(Default)]
pub(crate) struct Faults(Mutex<Option<Fault>>);

impl Faults {
    pub(crate) fn set(&self, f: Option<Fault>) {
        *self.0.lock().unwrap_or_else(|e| e.into_inner()) = f;
    }

    /// Fail (once) if a fault is armed for `point`.
    pub(crate) fn check(&self, point: FaultPoint) -> io::Result<()> {
        let mut g = self.0.lock().unwrap_or_else(|e| e.into_inner());
        match *g {
            Some(f) if f.point == point => {
                *g = None;
                Err(io::Error::from_raw_os_error(f.errno))
            }
            _ => Ok(()),
        }
    }
}

/// Counters for tests and metrics.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SpoolStats {
    /// Messages committed (acknowledgeable).
    pub commits: u64,
    /// `fsync` calls on message files.
    pub file_fsyncs: u64,
    /// `fsync` rounds on `queue/` by the commit path (each shared by a group of commits;
    /// failed attempts included).
    pub dir_fsyncs: u64,
}

#[derive(Default)]
pub(crate) struct Counters {
    pub(crate) commits: AtomicU64,
    pub(crate) file_fsyncs: AtomicU64,
    pub(crate) dir_fsyncs: AtomicU64,
}

impl Counters {
    pub(crate) fn snapshot(&self) -> SpoolStats {
        SpoolStats {
            commits: self.commits.load(Ordering::Relaxed),
            file_fsyncs: self.file_fsyncs.load(Ordering::Relaxed),
            dir_fsyncs: self.dir_fsyncs.load(Ordering::Relaxed),
        }
    }
}

/// `fsync` a directory so that renames/creations/unlinks in it are durable.
pub(crate) fn fsync_dir(dir: &Path) -> Result<(), SpoolError> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| SpoolError::io("fsync directory", dir, e))
}

fn cstr(p: &Path) -> io::Result<CString> {
    CString::new(p.as_os_str().as_bytes())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "path contains NUL"))
}

/// `rename` that never replaces an existing destination (`renameat2(RENAME_NOREPLACE)`), so a
/// committed message can never be overwritten. Falls back to check-then-rename where the
/// filesystem does not support the flag.
pub(crate) fn rename_noreplace(from: &Path, to: &Path) -> io::Result<()> {
    #[cfg(target_os = "linux")]
    {
        let (f, t) = (cstr(from)?, cstr(to)?);
        // SAFETY: both pointers are valid NUL-terminated strings for the duration of the call.
        let rc = unsafe {
            libc::syscall(
                libc::SYS_renameat2,
                libc::AT_FDCWD,
                f.as_ptr(),
                libc::AT_FDCWD,
                t.as_ptr(),
                libc::RENAME_NOREPLACE,
            )
        };
        if rc == 0 {
            return Ok(());
        }
        let e = io::Error::last_os_error();
        match e.raw_os_error() {
            Some(libc::EINVAL) | Some(libc::ENOSYS) | Some(libc::EOPNOTSUPP) => {}
            _ => return Err(e),
        }
    }
    if to.symlink_metadata().is_ok() {
        return Err(io::Error::from_raw_os_error(libc::EEXIST));
    }
    std::fs::rename(from, to)
}

/// Open a new file exclusively with mode 0600.
pub(crate) fn create_exclusive(path: &Path) -> io::Result<File> {
    OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
}

/// `statvfs`: bytes available to unprivileged users.
pub(crate) fn free_space(path: &Path) -> Result<u64, SpoolError> {
    let c = cstr(path).map_err(|e| SpoolError::io("statvfs", path, e))?;
    // SAFETY: zeroed statvfs is a valid out-parameter; `c` is NUL-terminated.
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    let rc = unsafe { libc::statvfs(c.as_ptr(), &mut st) };
    if rc != 0 {
        return Err(SpoolError::io("statvfs", path, io::Error::last_os_error()));
    }
    #[allow(clippy::unnecessary_cast)]
    Ok((st.f_bavail as u64).saturating_mul(st.f_frsize as u64))
}

/// Take an exclusive, non-blocking `flock` on `path` (created if missing).
pub(crate) fn lock_file(path: &Path) -> Result<Option<File>, SpoolError> {
    use std::os::fd::AsRawFd;
    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o600)
        .open(path)
        .map_err(|e| SpoolError::io("open lock file", path, e))?;
    // SAFETY: plain syscall on a valid fd.
    let rc = unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
    if rc == 0 {
        return Ok(Some(f));
    }
    let e = io::Error::last_os_error();
    if e.raw_os_error() == Some(libc::EWOULDBLOCK) {
        Ok(None)
    } else {
        Err(SpoolError::io("flock", path, e))
    }
}

/// An opened and validated message file.
pub(crate) struct OpenedMessage {
    pub(crate) file: File,
    pub(crate) header: Header,
    /// Bytes already read past the header (the start of the body).
    pub(crate) body_prefix: Vec<u8>,
}

/// Open a message file, decode its header and check that it is whole
/// (size == header length + Body-Length). I/O errors keep their kind (NotFound matters to
/// callers racing with concurrent moves); a bad file is [`SpoolError::Corrupt`].
pub(crate) fn open_message(path: &Path) -> Result<OpenedMessage, SpoolError> {
    let mut file = File::open(path).map_err(|e| SpoolError::io("open", path, e))?;
    let size = file
        .metadata()
        .map_err(|e| SpoolError::io("stat", path, e))?
        .len();
    let corrupt = |reason: String| SpoolError::Corrupt {
        path: path.to_path_buf(),
        reason,
    };
    // Headers are small: read 8 KiB first and grow, so listing or recovering a large spool
    // does not read much of each body.
    let mut buf = Vec::with_capacity(8192);
    let mut chunk = vec![0u8; 8192];
    loop {
        match format::decode(&buf) {
            Ok(header) => {
                if size != header.file_len() {
                    return Err(corrupt(format!(
                        "file is {size} bytes, header says {} + {} (truncated or extended)",
                        header.header_len, header.body_length
                    )));
                }
                let body_prefix = buf.split_off(header.header_len as usize);
                return Ok(OpenedMessage {
                    file,
                    header,
                    body_prefix,
                });
            }
            Err(DecodeError::Invalid(reason)) => return Err(corrupt(reason)),
            Err(DecodeError::Incomplete) => {}
        }
        if buf.len() >= MAX_HEADER_LEN {
            return Err(corrupt("header too long".into()));
        }
        let n = file
            .read(&mut chunk)
            .map_err(|e| SpoolError::io("read", path, e))?;
        if n == 0 {
            return Err(corrupt(format!(
                "file ends ({} bytes) before the end of the header",
                buf.len()
            )));
        }
        buf.extend_from_slice(&chunk[..n]);
        if chunk.len() < 1 << 20 && buf.len() >= chunk.len() {
            chunk.resize(chunk.len() * 2, 0);
        }
    }
}

/// `path` is a directory this process may create files in (`faccessat(W_OK|X_OK)`, which
/// also answers `EROFS` on a read-only mount). Creates nothing.
pub(crate) fn check_writable_dir(path: &Path) -> io::Result<()> {
    let meta = std::fs::symlink_metadata(path)?;
    if !meta.is_dir() {
        return Err(io::Error::other("not a directory"));
    }
    let c = cstr(path)?;
    // SAFETY: `c` is NUL-terminated; access(2) only reads it.
    let rc = unsafe { libc::access(c.as_ptr(), libc::W_OK | libc::X_OK) };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Whether the filesystem holding `path` is mounted read-only (`statvfs` `ST_RDONLY`).
pub(crate) fn is_read_only(path: &Path) -> io::Result<bool> {
    let c = cstr(path)?;
    // SAFETY: zeroed statvfs is a valid out-parameter; `c` is NUL-terminated.
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    let rc = unsafe { libc::statvfs(c.as_ptr(), &mut st) };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(st.f_flag & libc::ST_RDONLY != 0)
}
