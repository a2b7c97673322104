//! Start-up recovery (daemon only, under the spool lock).

use std::collections::HashSet;
use std::fs;
use std::io;
use std::path::{Path, PathBuf};

use super::error::SpoolError;
use super::fsutil;
use super::id::is_valid_id;
use super::{EntryState, Inner};

/// What start-up recovery found and did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RecoveryReport {
    /// Whole messages in `queue/`.
    pub queued: usize,
    /// Whole messages in `held/`.
    pub held: usize,
    /// Whole messages in `failed/`.
    pub failed: usize,
    /// Entries removed from `tmp/` (uncommitted messages, unfinished state writes).
    pub tmp_removed: usize,
    /// Message files moved to `corrupt/` (unreadable, truncated, or misnamed).
    pub corrupt: usize,
    /// `state/*.json` removed because their message no longer exists.
    pub orphan_states_removed: usize,
    /// Each quarantined file (its new path) and why.
    pub corrupt_files: Vec<(PathBuf, String)>,
}

impl std::fmt::Display for RecoveryReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "spool recovered: {} queued, {} held, {} failed; {} temporary files removed, \
             {} orphan state files removed, {} corrupt files moved to corrupt/",
            self.queued,
            self.held,
            self.failed,
            self.tmp_removed,
            self.orphan_states_removed,
            self.corrupt
        )
    }
}

fn read_dir_names(dir: &Path) -> Result<Vec<String>, SpoolError> {
    let rd = fs::read_dir(dir).map_err(|e| SpoolError::io("read directory", dir, e))?;
    let mut names = Vec::new();
    for ent in rd {
        let ent = ent.map_err(|e| SpoolError::io("read directory", dir, e))?;
        match ent.file_name().into_string() {
            Ok(n) => names.push(n),
            Err(n) => {
                tracing::warn!(dir = %dir.display(), name = ?n, "ignoring non-UTF-8 file name in spool")
            }
        }
    }
    names.sort();
    Ok(names)
}

/// Move `src` into `corrupt/` under `name` (or `name.N` if taken). Never deletes.
pub(crate) fn quarantine(inner: &Inner, src: &Path, name: &str) -> Result<PathBuf, SpoolError> {
    let dir = inner.sub("corrupt");
    if !dir.is_dir() {
        fs::create_dir(&dir).map_err(|e| SpoolError::io("create directory", &dir, e))?;
    }
    for n in 0..1000 {
        let dst = if n == 0 {
            dir.join(name)
        } else {
            dir.join(format!("{name}.{n}"))
        };
        match fsutil::rename_noreplace(src, &dst) {
            Ok(()) => return Ok(dst),
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => continue,
            Err(e) => return Err(SpoolError::io("rename", src, e)),
        }
    }
    Err(SpoolError::io(
        "rename",
        src,
        io::Error::other("too many files of this name in corrupt/"),
    ))
}

pub(crate) fn recover(inner: &Inner) -> Result<RecoveryReport, SpoolError> {
    let mut report = RecoveryReport::default();

    // 1. Nothing in tmp/ was ever acknowledged.
    let tmp = inner.tmp_dir();
    for name in read_dir_names(&tmp)? {
        let p = tmp.join(&name);
        let r = match fs::symlink_metadata(&p) {
            Ok(m) if m.is_dir() => fs::remove_dir_all(&p),
            Ok(_) => fs::remove_file(&p),
            Err(e) => Err(e),
        };
        match r {
            Ok(()) => report.tmp_removed += 1,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(SpoolError::io("remove", &p, e)),
        }
    }
    if report.tmp_removed > 0 {
        fsutil::fsync_dir(&tmp)?;
    }

    // 2. Every message must decode and be whole; anything else goes to corrupt/.
    let mut live: HashSet<String> = HashSet::new();
    let mut quarantined: HashSet<String> = HashSet::new();
    for st in EntryState::ALL {
        let dir = inner.state_dir_of(st);
        let mut moved = false;
        for name in read_dir_names(&dir)? {
            let path = dir.join(&name);
            let Some(stem) = name.strip_suffix(".msg") else {
                tracing::warn!(path = %path.display(), "ignoring unexpected file in spool");
                continue;
            };
            let problem = if !is_valid_id(stem) {
                Some("file name is not <ULID>.msg".to_string())
            } else if live.contains(stem) {
                Some("duplicate of a message in another state directory".to_string())
            } else {
                match fsutil::open_message(&path) {
                    Ok(m) if m.header.id == stem => None,
                    Ok(m) => Some(format!(
                        "header Id {} does not match the file name",
                        m.header.id
                    )),
                    Err(SpoolError::Corrupt { reason, .. }) => Some(reason),
                    Err(e) if e.is_io_not_found() => continue,
                    // Unreadable (EIO, EACCES, ...): quarantine rather than guess.
                    Err(e) => Some(e.to_string()),
                }
            };
            match problem {
                None => {
                    live.insert(stem.to_string());
                    match st {
                        EntryState::Queued => report.queued += 1,
                        EntryState::Held => report.held += 1,
                        EntryState::Failed => report.failed += 1,
                    }
                }
                Some(reason) => {
                    let dst = quarantine(inner, &path, &name)?;
                    tracing::error!(
                        from = %path.display(), to = %dst.display(), %reason,
                        "corrupt spool message moved to corrupt/"
                    );
                    moved = true;
                    report.corrupt += 1;
                    report.corrupt_files.push((dst, reason));
                    quarantined.insert(stem.to_string());
                }
            }
        }
        if moved {
            fsutil::fsync_dir(&dir)?;
        }
    }
    if report.corrupt > 0 {
        fsutil::fsync_dir(&inner.sub("corrupt"))?;
    }

    // 3. State files without a message: keep beside a quarantined message, else remove.
    let sdir = inner.sub("state");
    let mut changed = false;
    for name in read_dir_names(&sdir)? {
        let Some(stem) = name.strip_suffix(".json") else {
            tracing::warn!(path = %sdir.join(&name).display(), "ignoring unexpected file in spool state/");
            continue;
        };
        if live.contains(stem) {
            continue;
        }
        let p = sdir.join(&name);
        if quarantined.contains(stem) {
            quarantine(inner, &p, &name)?;
            changed = true;
            continue;
        }
        match fs::remove_file(&p) {
            Ok(()) => {
                report.orphan_states_removed += 1;
                changed = true;
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(SpoolError::io("unlink", &p, e)),
        }
    }
    if changed {
        fsutil::fsync_dir(&sdir)?;
        fsutil::fsync_dir(&inner.sub("corrupt"))?;
    }
    tracing::info!("{report}");
    Ok(report)
}
