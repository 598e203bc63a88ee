//! The one writer of every file whet writes, of every folder it writes as a whole, and the rule
//! for which folders it writes into at all. This crate is a root of the workspace, so every
//! crate that writes reaches it without an upward dependency.
//!
//! - [`write_file`], [`write_with`], [`copy_file`]: the content goes to a
//!   temporary file beside the target (`.NAME.XXXXXX.tmp`, made by `tempfile`), which is
//!   flushed, fsynced and renamed onto the target; then the folder is fsynced. A reader, a crash,
//!   a `kill -9` or a full disk leaves the old file or the new one, never a part of one, and
//!   no temporary file survives an error or a panic. The rename replaces a symbolic link at the
//!   target instead of writing through it. [`Existing::Refuse`] refuses a target that exists,
//!   before writing and again at the rename (`renameat2(RENAME_NOREPLACE)` or `link`), so a file
//!   that appears meanwhile is not replaced either.
//! - [`write_dir`]: a folder built in a temporary sibling, every file fsynced, and renamed into
//!   place; a folder already there is moved aside (a temporary name) and deleted after.
//!   [`remove_dir`] renames a folder away before deleting it, so it disappears whole.
//! - [`claim`] and [`write_owned_dir`]: whet writes into a folder only when the folder is new or
//!   empty, or when whet made it: it holds [`MARKER`], naming the run (or command) it belongs
//!   to, and that run is this one. A folder with other files and no marker is never written.
//!
//! Appends (`metrics.jsonl`'s lines during a run) are not atomic; everything else is.

use std::fs::{self, File};
use std::io::{self, BufWriter, Write};
use std::path::{Path, PathBuf};

/// The file that marks a folder as whet's: `run = "<id>"`, written when whet claims the folder.
pub const MARKER: &str = ".whet-run";

/// What happens when the target of a write already exists.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Existing {
    /// Replace it (atomically).
    Replace,
    /// Fail with [`WriteError::Exists`] and leave it as it is.
    Refuse,
}

#[derive(Debug, thiserror::Error)]
pub enum WriteError {
    #[error("{}: cannot {action}: {source}", path.display())]
    Io {
        path: PathBuf,
        action: &'static str,
        #[source]
        source: io::Error,
    },
    #[error(
        "{} already exists and whet replaces an existing file only when told to: choose another path, or pass --force to replace it",
        path.display()
    )]
    Exists { path: PathBuf },
    #[error(
        "{} is not empty and was not made by whet (it has no `{MARKER}` file; it holds {found}): whet writes only into a new or empty folder, or one it made for the same run. Choose another folder; whet never writes between files it does not own",
        dir.display()
    )]
    NotOwned { dir: PathBuf, found: String },
    #[error(
        "{} belongs to whet run `{found}`, not to `{this}` (its `{MARKER}` says so): choose another folder, or rerun what made it",
        dir.display()
    )]
    OtherRun {
        dir: PathBuf,
        found: String,
        this: String,
    },
    #[error("{}: not a folder", path.display())]
    NotAFolder { path: PathBuf },
}

pub type Result<T, E = WriteError> = std::result::Result<T, E>;

fn io_err(path: &Path, action: &'static str) -> impl FnOnce(io::Error) -> WriteError {
    let path = path.to_path_buf();
    move |source| WriteError::Io {
        path,
        action,
        source,
    }
}

/// The folder `path` is in (`.` for a bare file name).
fn parent_of(path: &Path) -> PathBuf {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    }
}

fn file_name(path: &Path) -> Result<String> {
    path.file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .ok_or_else(|| WriteError::Io {
            path: path.to_path_buf(),
            action: "write",
            source: io::Error::new(io::ErrorKind::InvalidInput, "the path names no file"),
        })
}

/// A temporary name beside `target`: `.NAME.XXXXXX.tmp`, mode 0666 (0777 for folders) less the
/// umask, as `File::create` and `create_dir` would give.
fn builder(prefix: &str, folder: bool) -> tempfile::Builder<'_, 'static> {
    let mut b = tempfile::Builder::new();
    b.prefix(prefix).suffix(".tmp");
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        b.permissions(fs::Permissions::from_mode(if folder {
            0o777
        } else {
            0o666
        }));
    }
    #[cfg(not(unix))]
    let _ = folder;
    b
}

/// Whether `name` is one of this module's temporary names.
fn is_temporary(name: &str) -> bool {
    name.starts_with('.') && name.ends_with(".tmp")
}

fn sync_dir(dir: &Path) -> Result<()> {
    #[cfg(unix)]
    File::open(dir)
        .and_then(|f| f.sync_all())
        .map_err(io_err(dir, "sync the folder"))?;
    #[cfg(not(unix))]
    let _ = dir;
    Ok(())
}

/// With [`Existing::Refuse`], [`WriteError::Exists`] when something is at `path` already: the
/// check [`write_with`] makes first, for callers that want it before work of their own.
pub fn refuse_existing(path: &Path, existing: Existing) -> Result<()> {
    if existing == Existing::Refuse && fs::symlink_metadata(path).is_ok() {
        return Err(WriteError::Exists {
            path: path.to_path_buf(),
        });
    }
    Ok(())
}

/// Renames the finished temporary file onto `path` (or, refusing, next to nothing).
fn persist(tmp: tempfile::TempPath, path: &Path, existing: Existing) -> Result<()> {
    let result = match existing {
        Existing::Replace => tmp.persist(path),
        Existing::Refuse => tmp.persist_noclobber(path),
    };
    match result {
        Ok(()) => {}
        Err(e)
            if existing == Existing::Refuse && e.error.kind() == io::ErrorKind::AlreadyExists =>
        {
            return Err(WriteError::Exists {
                path: path.to_path_buf(),
            });
        }
        // Dropping `e.path` removes the temporary file.
        Err(e) => return Err(io_err(path, "rename into place")(e.error)),
    }
    sync_dir(&parent_of(path))
}

/// Writes `bytes` to `path` atomically (see the module documentation).
pub fn write_file(path: &Path, bytes: &[u8], existing: Existing) -> Result<()> {
    write_with(path, existing, |w| w.write_all(bytes))
}

/// Writes `path` atomically from `write`, which fills a buffered temporary file (seekable, for
/// formats that patch a header). An error from `write` (or a panic) removes the temporary file
/// and leaves `path` as it was.
pub fn write_with(
    path: &Path,
    existing: Existing,
    write: impl FnOnce(&mut BufWriter<File>) -> io::Result<()>,
) -> Result<()> {
    refuse_existing(path, existing)?;
    let dir = parent_of(path);
    fs::create_dir_all(&dir).map_err(io_err(&dir, "create the folder"))?;
    let prefix = format!(".{}.", file_name(path)?);
    let tmp = builder(&prefix, false)
        .tempfile_in(&dir)
        .map_err(io_err(&dir, "create a temporary file in"))?;
    let (file, tmp) = tmp.into_parts();
    let mut w = BufWriter::new(file);
    write(&mut w).map_err(io_err(path, "write"))?;
    let file = w
        .into_inner()
        .map_err(|e| io_err(path, "write")(e.into_error()))?;
    file.sync_all().map_err(io_err(path, "sync"))?;
    drop(file);
    persist(tmp, path, existing)
}

/// Copies `from` to `to` atomically.
pub fn copy_file(from: &Path, to: &Path, existing: Existing) -> Result<()> {
    let mut src = File::open(from).map_err(io_err(from, "read"))?;
    write_with(to, existing, |w| io::copy(&mut src, w).map(|_| ()))
}

/// Writes the folder `dir` as a whole: `fill` writes its files into a temporary sibling, which
/// is renamed onto `dir` once every file in it is fsynced. Whatever was at `dir` is replaced
/// (moved aside, then deleted). An error from `fill` removes the temporary folder and leaves
/// `dir` as it was.
pub fn write_dir<E: From<WriteError>>(
    dir: &Path,
    fill: impl FnOnce(&Path) -> Result<(), E>,
) -> Result<(), E> {
    let parent = parent_of(dir);
    fs::create_dir_all(&parent).map_err(io_err(&parent, "create the folder"))?;
    let prefix = format!(".{}.", file_name(dir)?);
    let tmp = builder(&prefix, true)
        .tempdir_in(&parent)
        .map_err(io_err(&parent, "create a temporary folder in"))?;
    fill(tmp.path())?;
    for entry in fs::read_dir(tmp.path()).map_err(io_err(tmp.path(), "list"))? {
        let path = entry.map_err(io_err(tmp.path(), "list"))?.path();
        if path.is_file() {
            File::open(&path)
                .and_then(|f| f.sync_all())
                .map_err(io_err(&path, "sync"))?;
        }
    }
    sync_dir(tmp.path())?;
    // A folder already there moves aside first: `rename` replaces only an empty one.
    let old = match fs::symlink_metadata(dir) {
        Ok(m) if m.is_dir() => {
            let aside = builder(&prefix, true)
                .tempdir_in(&parent)
                .map_err(io_err(&parent, "create a temporary folder in"))?;
            fs::rename(dir, aside.path()).map_err(io_err(dir, "move the old folder aside"))?;
            Some(aside)
        }
        Ok(_) => {
            return Err(WriteError::NotAFolder {
                path: dir.to_path_buf(),
            }
            .into());
        }
        Err(_) => None,
    };
    if let Err(e) = fs::rename(tmp.path(), dir) {
        if let Some(aside) = &old {
            let _ = fs::rename(aside.path(), dir);
        }
        return Err(io_err(dir, "rename into place")(e).into());
    }
    // Renamed: nothing is left at the temporary path for its guard to delete.
    let _ = tmp.keep();
    drop(old); // deletes the old folder
    sync_dir(&parent)?;
    Ok(())
}

/// Deletes the folder `dir` whole: renamed to a temporary name first, so a crash never leaves
/// half of it under its own name.
pub fn remove_dir(dir: &Path) -> Result<()> {
    let parent = parent_of(dir);
    let prefix = format!(".{}.", file_name(dir)?);
    let aside = builder(&prefix, true)
        .tempdir_in(&parent)
        .map_err(io_err(&parent, "create a temporary folder in"))?;
    fs::rename(dir, aside.path()).map_err(io_err(dir, "remove"))?;
    let path = aside.keep();
    fs::remove_dir_all(&path).map_err(io_err(&path, "remove"))?;
    sync_dir(&parent)
}

/// How [`claim`] found a folder.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Claim {
    /// It did not exist, or was empty: whet made it its own.
    New,
    /// Its marker names this run: whet made it before, for the same run.
    Own,
}

/// The run `dir`'s marker names, if it has one.
pub fn owner(dir: &Path) -> Option<String> {
    let text = fs::read_to_string(dir.join(MARKER)).ok()?;
    text.lines().find_map(|l| {
        let v = l
            .trim()
            .strip_prefix("run")?
            .trim_start()
            .strip_prefix('=')?;
        Some(v.trim().trim_matches('"').to_string())
    })
}

fn marker_text(run: &str) -> String {
    format!(
        "# This folder was made by whet, which writes into it only for this run.\nrun = \"{}\"\n",
        run.escape_default()
    )
}

/// What [`claim`] would find at `dir`, without writing: `Ok(None)` when it does not exist.
pub fn check(dir: &Path, run: &str) -> Result<Option<Claim>> {
    let entries = match fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(_) if dir.exists() && !dir.is_dir() => {
            return Err(WriteError::NotAFolder {
                path: dir.to_path_buf(),
            });
        }
        Err(e) => return Err(io_err(dir, "list")(e)),
    };
    if dir.join(MARKER).is_file() {
        let found = owner(dir).unwrap_or_default();
        return if found == run {
            Ok(Some(Claim::Own))
        } else {
            Err(WriteError::OtherRun {
                dir: dir.to_path_buf(),
                found,
                this: run.to_string(),
            })
        };
    }
    let mut names: Vec<String> = entries
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    if names.is_empty() {
        return Ok(Some(Claim::New));
    }
    names.sort();
    let n = names.len();
    names.truncate(4);
    let mut found = names
        .iter()
        .map(|n| format!("`{n}`"))
        .collect::<Vec<_>>()
        .join(", ");
    if n > names.len() {
        found.push_str(&format!(" and {} more", n - names.len()));
    }
    Err(WriteError::NotOwned {
        dir: dir.to_path_buf(),
        found,
    })
}

/// Makes `dir` this run's, or refuses: a new or empty folder gets [`MARKER`] naming `run`
/// (created atomically; of two processes claiming one empty folder, one wins); a folder whose
/// marker names `run` is this run's already, and its temporary leftovers (an earlier process
/// killed mid-write) are deleted. Any other folder is refused and left as it is.
pub fn claim(dir: &Path, run: &str) -> Result<Claim> {
    match check(dir, run)? {
        Some(Claim::Own) => {
            sweep(dir)?;
            Ok(Claim::Own)
        }
        found => {
            if found.is_none() {
                fs::create_dir_all(dir).map_err(io_err(dir, "create the folder"))?;
            }
            match write_file(
                &dir.join(MARKER),
                marker_text(run).as_bytes(),
                Existing::Refuse,
            ) {
                Ok(()) => Ok(Claim::New),
                // Another process claimed it first: whose is it?
                Err(WriteError::Exists { .. }) => check(dir, run).map(|_| Claim::Own),
                Err(e) => Err(e),
            }
        }
    }
}

/// Writes the folder `dir` as a whole for `run` (one command's output folder: a merged model,
/// a converted one): refused unless [`check`] allows it, built with its marker in a temporary
/// sibling by `fill`, and renamed into place (replacing `dir`, which is new, empty or `run`'s).
pub fn write_owned_dir<E: From<WriteError>>(
    dir: &Path,
    run: &str,
    fill: impl FnOnce(&Path) -> Result<(), E>,
) -> Result<(), E> {
    check(dir, run)?;
    write_dir(dir, |tmp| {
        write_file(
            &tmp.join(MARKER),
            marker_text(run).as_bytes(),
            Existing::Refuse,
        )?;
        fill(tmp)?;
        // Checked again at the end: nothing the user put there meanwhile is deleted.
        check(dir, run)?;
        Ok(())
    })
}

/// Deletes this module's temporary files and folders in `dir` (left by a killed process).
/// Only for a folder whet owns.
fn sweep(dir: &Path) -> Result<()> {
    for entry in fs::read_dir(dir).map_err(io_err(dir, "list"))? {
        let entry = entry.map_err(io_err(dir, "list"))?;
        if !is_temporary(&entry.file_name().to_string_lossy()) {
            continue;
        }
        let path = entry.path();
        let removed = if entry.file_type().is_ok_and(|t| t.is_dir()) {
            fs::remove_dir_all(&path)
        } else {
            fs::remove_file(&path)
        };
        removed.map_err(io_err(&path, "remove a temporary leftover"))?;
    }
    Ok(())
}
