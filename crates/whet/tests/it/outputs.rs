//! whet writes only into a folder it made (its `.whet-run` marker names the run) or a new or
//! empty one, and replaces an existing single file only with `--force`.

use std::fs;

use crate::common::*;

#[test]
fn train_never_writes_into_a_folder_of_other_files() {
    let tmp = Tmp::new("not-owned");
    let m = model(&tmp);
    chat_data(&tmp);
    write(&tmp.join("report.md"), "my own notes");
    write(&tmp.join("loss.svg"), "<svg>my plot</svg>");
    // `output.dir = "."`: the folder of the config, the base model and the user's files.
    let cfg = config(&tmp, &m, &CHAT_RUN.replace("dir = \"out\"", "dir = \".\""));
    let before = snapshot(tmp.path());
    let r = whet(["train", "--config", s(&cfg)]).fails();
    assert!(
        r.stderr.contains("not made by whet") && r.stderr.contains(".whet-run"),
        "{}",
        r.stderr
    );
    assert!(
        r.stderr.contains(s(tmp.path())) && r.stderr.contains("output.dir"),
        "the folder or the way out is not named:\n{}",
        r.stderr
    );
    assert_eq!(
        snapshot(tmp.path()),
        before,
        "whet wrote into a folder it does not own"
    );

    // An empty `output.dir` is an error naming the key; nothing is written where whet runs.
    let cwd = tmp.join("cwd");
    fs::create_dir(&cwd).unwrap();
    let cfg = config(&tmp, &m, &CHAT_RUN.replace("dir = \"out\"", "dir = \"\""));
    let out = whet_cmd(["train", "--config", s(&cfg)])
        .current_dir(&cwd)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("`output.dir` is empty"), "{stderr}");
    assert_eq!(
        fs::read_dir(&cwd).unwrap().count(),
        0,
        "whet wrote into its working folder"
    );
}

#[test]
fn export_replaces_an_existing_gguf_only_with_force() {
    let tmp = Tmp::new("export-force");
    let m = model(&tmp);
    let gguf = tmp.join("mine.gguf");
    write(&gguf, "the user's file");
    let export = |extra: &[&str]| {
        let mut args = vec![
            "export",
            "--model",
            s(&m),
            "--gguf",
            s(&gguf),
            "--type",
            "q8_0",
        ];
        args.extend_from_slice(extra);
        whet(args)
    };
    let r = export(&[]).fails();
    assert!(
        r.stderr.contains(s(&gguf)) && r.stderr.contains("--force"),
        "{}",
        r.stderr
    );
    assert_eq!(fs::read(&gguf).unwrap(), b"the user's file");
    export(&["--force"]).ok();
    assert_eq!(&fs::read(&gguf).unwrap()[..4], b"GGUF");
    let leftovers: Vec<_> = walk(tmp.path())
        .into_iter()
        .filter(|p| p.to_string_lossy().ends_with(".tmp"))
        .collect();
    assert!(leftovers.is_empty(), "temporary files left: {leftovers:?}");
}

#[test]
fn convert_writes_a_new_folder_or_its_own_and_nothing_else() {
    let tmp = Tmp::new("convert-owned");
    let m = model(&tmp);
    let first = snapshot(&m);
    assert!(first.contains_key(std::path::Path::new(".whet-run")));
    // Again into its own folder: replaced whole, the same files.
    model(&tmp);
    assert_eq!(snapshot(&m), first);

    let theirs = tmp.join("theirs");
    fs::create_dir(&theirs).unwrap();
    write(&theirs.join("config.json"), "{\"mine\": true}");
    let r = whet([
        "convert",
        "--from-gguf",
        s(&fixture("gguf/tiny_llama_bpe.gguf")),
        "--out",
        s(&theirs),
    ])
    .fails();
    assert!(
        r.stderr.contains(s(&theirs)) && r.stderr.contains("not made by whet"),
        "{}",
        r.stderr
    );
    assert_eq!(
        fs::read_to_string(theirs.join("config.json")).unwrap(),
        "{\"mine\": true}"
    );
    assert_eq!(fs::read_dir(&theirs).unwrap().count(), 1);
}
