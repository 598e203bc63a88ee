//! Inputs earlier fuzzing runs found, kept under `fixtures/fuzz/found/<target>/` (they also seed
//! later runs). Each replays through its target in the `whet-fuzz` binary, with the counting
//! allocator, without a panic or a refused allocation.

use std::process::Command;

use whet_fuzz::engine::corpus_files;
use whet_fuzz::targets::TARGETS;

#[test]
fn every_found_input_replays_cleanly() {
    let found = whet_fuzz::corpus_dir().join("found");
    let mut replayed = 0;
    for t in TARGETS {
        let files = corpus_files(&found.join(t.corpus));
        if files.is_empty() {
            continue;
        }
        let output = Command::new(env!("CARGO_BIN_EXE_whet-fuzz"))
            .args(["repro", "--target", t.name])
            .args(&files)
            .env("RUST_BACKTRACE", "0")
            .output()
            .unwrap();
        let stdout = String::from_utf8_lossy(&output.stdout);
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(
            output.status.success(),
            "{}: a found input still fails:\n{stdout}\n{stderr}",
            t.name
        );
        replayed += files.len();
    }
    assert!(replayed >= 5, "only {replayed} found inputs");
}
