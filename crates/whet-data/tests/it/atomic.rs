//! The one writer: a write appears whole or not at all, leaves no temporary file, never writes
//! through a link, never replaces what it was told to keep, and never writes into a folder
//! whet does not own.

use std::fs;
use std::io::{self, Write};
use std::path::Path;

use whet_data::atomic::{self, Claim, Existing, MARKER, WriteError};

use crate::common::tmp;

fn names(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    names.sort();
    names
}

#[test]
fn a_write_replaces_the_file_whole_and_leaves_no_temporary_file() {
    let dir = tmp();
    let path = dir.path().join("report.md");
    atomic::write_file(&path, b"first", Existing::Replace).unwrap();
    atomic::write_file(&path, b"second", Existing::Replace).unwrap();
    assert_eq!(fs::read(&path).unwrap(), b"second");
    assert_eq!(names(dir.path()), ["report.md"]);
    // The umask's permissions, as `File::create` gives, not a temporary file's 0600.
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let plain = dir.path().join("plain");
        fs::File::create(&plain).unwrap();
        let mode = |p: &Path| fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&path), mode(&plain));
    }
}

#[test]
fn a_failed_write_leaves_the_old_file_intact() {
    let dir = tmp();
    let path = dir.path().join("model.gguf");
    fs::write(&path, b"an earlier export").unwrap();
    let err = atomic::write_with(&path, Existing::Replace, |w| {
        w.write_all(&[7u8; 1 << 20])?; // a megabyte of the new file, then the disk is full
        Err(io::Error::new(
            io::ErrorKind::StorageFull,
            "No space left on device",
        ))
    })
    .unwrap_err();
    assert!(matches!(err, WriteError::Io { .. }), "{err}");
    assert!(err.to_string().contains("model.gguf"), "{err}");
    assert_eq!(fs::read(&path).unwrap(), b"an earlier export");
    assert_eq!(
        names(dir.path()),
        ["model.gguf"],
        "a temporary file was left"
    );

    // A panic mid-write too.
    let caught = std::panic::catch_unwind(|| {
        let _ = atomic::write_with(&path, Existing::Replace, |w| {
            w.write_all(b"half")?;
            panic!("killed mid-write");
        });
    });
    assert!(caught.is_err());
    assert_eq!(fs::read(&path).unwrap(), b"an earlier export");
    assert_eq!(
        names(dir.path()),
        ["model.gguf"],
        "a temporary file was left"
    );
}

#[test]
fn refuse_keeps_an_existing_file() {
    let dir = tmp();
    let path = dir.path().join("out.gguf");
    fs::write(&path, b"the user's").unwrap();
    let mut called = false;
    let err = atomic::write_with(&path, Existing::Refuse, |_| {
        called = true;
        Ok(())
    })
    .unwrap_err();
    assert!(matches!(err, WriteError::Exists { .. }), "{err}");
    assert!(err.to_string().contains("--force"), "{err}");
    assert!(!called, "the work ran before the refusal");
    assert_eq!(fs::read(&path).unwrap(), b"the user's");

    // A file that appears while whet writes is not replaced either.
    let late = dir.path().join("late.gguf");
    let err = atomic::write_with(&late, Existing::Refuse, |w| {
        fs::write(&late, b"appeared meanwhile")?;
        w.write_all(b"whet's")
    })
    .unwrap_err();
    assert!(matches!(err, WriteError::Exists { .. }), "{err}");
    assert_eq!(fs::read(&late).unwrap(), b"appeared meanwhile");
    assert_eq!(names(dir.path()), ["late.gguf", "out.gguf"]);
}

#[cfg(unix)]
#[test]
fn a_write_replaces_a_link_instead_of_following_it() {
    let dir = tmp();
    let theirs = dir.path().join("theirs.md");
    fs::write(&theirs, b"the user's report").unwrap();
    let out = dir.path().join("out");
    fs::create_dir(&out).unwrap();
    std::os::unix::fs::symlink(&theirs, out.join("report.md")).unwrap();
    atomic::write_file(&out.join("report.md"), b"whet's report", Existing::Replace).unwrap();
    assert_eq!(fs::read(&theirs).unwrap(), b"the user's report");
    assert!(
        !fs::symlink_metadata(out.join("report.md"))
            .unwrap()
            .is_symlink()
    );
    assert_eq!(fs::read(out.join("report.md")).unwrap(), b"whet's report");
}

#[test]
fn a_folder_appears_whole_or_not_at_all() {
    let dir = tmp();
    let target = dir.path().join("adapter");
    atomic::write_dir(&target, |tmp| {
        atomic::write_file(&tmp.join("a"), b"1", Existing::Replace)?;
        atomic::write_file(&tmp.join("b"), b"2", Existing::Replace)
    })
    .unwrap();
    assert_eq!(names(&target), ["a", "b"]);

    // A failure half-way leaves the old folder as it was, and no temporary folder.
    let err = atomic::write_dir(&target, |tmp| {
        atomic::write_file(&tmp.join("a"), b"new", Existing::Replace)?;
        Err(WriteError::Io {
            path: tmp.join("b"),
            action: "write",
            source: io::Error::new(io::ErrorKind::StorageFull, "No space left on device"),
        })
    })
    .unwrap_err();
    assert!(err.to_string().contains("No space left"), "{err}");
    assert_eq!(names(&target), ["a", "b"]);
    assert_eq!(fs::read(target.join("a")).unwrap(), b"1");
    assert_eq!(names(dir.path()), ["adapter"]);

    // A success replaces it whole: no file of the old folder survives.
    atomic::write_dir(&target, |tmp| {
        atomic::write_file(&tmp.join("c"), b"3", Existing::Replace)
    })
    .unwrap();
    assert_eq!(names(&target), ["c"]);
    assert_eq!(names(dir.path()), ["adapter"]);

    atomic::remove_dir(&target).unwrap();
    assert!(names(dir.path()).is_empty());
}

#[test]
fn whet_claims_only_a_new_an_empty_or_its_own_folder() {
    let dir = tmp();
    let new = dir.path().join("runs/new");
    assert_eq!(atomic::claim(&new, "run-a").unwrap(), Claim::New);
    assert_eq!(names(&new), [MARKER]);
    assert_eq!(atomic::owner(&new).as_deref(), Some("run-a"));
    assert_eq!(atomic::claim(&new, "run-a").unwrap(), Claim::Own);

    let empty = dir.path().join("empty");
    fs::create_dir(&empty).unwrap();
    assert_eq!(atomic::claim(&empty, "run-a").unwrap(), Claim::New);

    // Another run's folder: refused, untouched.
    let err = atomic::claim(&new, "run-b").unwrap_err();
    assert!(matches!(err, WriteError::OtherRun { .. }), "{err}");
    assert_eq!(atomic::owner(&new).as_deref(), Some("run-a"));

    // A folder of other files (a model, a report), no marker: refused, untouched, named.
    let theirs = dir.path().join("theirs");
    fs::create_dir(&theirs).unwrap();
    fs::write(theirs.join("config.json"), b"{}").unwrap();
    fs::write(theirs.join("report.md"), b"mine").unwrap();
    let err = atomic::claim(&theirs, "run-a").unwrap_err();
    assert!(matches!(err, WriteError::NotOwned { .. }), "{err}");
    let msg = err.to_string();
    assert!(msg.contains(&theirs.display().to_string()), "{msg}");
    assert!(msg.contains("report.md") && msg.contains(MARKER), "{msg}");
    assert_eq!(names(&theirs), ["config.json", "report.md"]);

    // The same for a folder written as a whole.
    let err = atomic::write_owned_dir(&theirs, "whet merge", |tmp| {
        atomic::write_file(&tmp.join("config.json"), b"merged", Existing::Replace)
    })
    .unwrap_err();
    assert!(matches!(err, WriteError::NotOwned { .. }), "{err}");
    assert_eq!(fs::read(theirs.join("config.json")).unwrap(), b"{}");
    assert_eq!(
        names(dir.path()),
        ["empty", "runs", "theirs"],
        "a temporary folder was left"
    );

    // A claimed folder's temporary leftovers (a process killed mid-write) are swept.
    fs::write(new.join(".metrics.jsonl.x1Yz2A.tmp"), b"half").unwrap();
    fs::create_dir(new.join(".checkpoint-000004.AbCdEf.tmp")).unwrap();
    fs::write(new.join("metrics.jsonl"), b"").unwrap();
    assert_eq!(atomic::claim(&new, "run-a").unwrap(), Claim::Own);
    assert_eq!(names(&new), [MARKER, "metrics.jsonl"]);
}

#[test]
fn a_folder_written_as_a_whole_replaces_only_its_own_kind() {
    let dir = tmp();
    let out = dir.path().join("merged");
    for content in [&b"first"[..], b"second"] {
        atomic::write_owned_dir(&out, "whet merge", |tmp| {
            atomic::write_file(&tmp.join("model.safetensors"), content, Existing::Replace)
        })
        .unwrap();
        assert_eq!(names(&out), [MARKER, "model.safetensors"]);
        assert_eq!(fs::read(out.join("model.safetensors")).unwrap(), content);
    }
    let err =
        atomic::write_owned_dir(&out, "whet convert", |_| Ok::<(), WriteError>(())).unwrap_err();
    assert!(matches!(err, WriteError::OtherRun { .. }), "{err}");
    assert_eq!(fs::read(out.join("model.safetensors")).unwrap(), b"second");
    assert_eq!(names(dir.path()), ["merged"]);
}
