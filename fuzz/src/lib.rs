//! whet's fuzzer on stable Rust: fuzz targets for every reader of untrusted input (GGUF,
//! safetensors and `config.json`, each data format, chat templates, run configs with `--set`),
//! a mutation engine seeded from `fixtures/fuzz/`, and a supervisor that catches panics,
//! hangs, aborts and allocations past a limit, and saves each finding's input.
//!
//! `cargo test -p whet-fuzz` runs every target for a few seconds; `cargo xtask fuzz --minutes N`
//! runs them longer; `cargo run -p whet-fuzz -- repro --target NAME FILE` replays a finding.
//! See `src/engine.rs` for how a run is split between a supervisor and worker processes, and
//! `src/alloc.rs` for how an unbounded allocation is caught without undefined behaviour.

use std::path::{Path, PathBuf};

pub mod alloc;
pub mod engine;
pub mod mutate;
pub mod seeds;
pub mod targets;

/// The workspace root.
pub fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("fuzz/ sits in the workspace")
        .to_path_buf()
}

/// `fixtures/fuzz`: one folder of seeds per target.
pub fn corpus_dir() -> PathBuf {
    workspace().join("fixtures/fuzz")
}

/// `target/fuzz-findings` (under `CARGO_TARGET_DIR` when set).
pub fn default_out() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace().join("target"))
        .join("fuzz-findings")
}

/// A stable 64-bit FNV-1a hash (seed weights are salted with their names).
pub(crate) fn engine_hash(s: &str) -> u64 {
    whet_data::split::fnv1a64(s.as_bytes())
}
