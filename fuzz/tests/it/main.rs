//! CI's fuzzing: every target runs for a bounded budget through the `whet-fuzz` binary (inputs
//! in worker processes, the counting allocator installed), and any finding fails the test. The
//! harness itself is checked on canary targets that panic, hang, allocate without bound and
//! overflow the stack; the seed corpus is checked against its generator and for validity.
//!
//! Budget per target: `WHET_FUZZ_SECONDS` (default 5) or `WHET_FUZZ_INPUTS` (default 20000),
//! whichever ends first; `WHET_FUZZ_SEED` picks the run (default fixed, so CI is repeatable).

use std::path::{Path, PathBuf};
use std::process::Command;

use whet_fuzz::targets::{CANARIES, TARGETS, Target};

mod regressions;

fn env_u64(key: &str, default: u64) -> u64 {
    std::env::var(key)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// A fresh findings folder for one test.
fn out_dir(tag: &str) -> PathBuf {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("fuzz-{tag}"));
    let _ = std::fs::remove_dir_all(&dir);
    dir
}

struct Run {
    ok: bool,
    stdout: String,
    result: std::collections::BTreeMap<String, String>,
}

fn fuzz(target: &str, extra: &[&str], out: &Path) -> Run {
    let output = Command::new(env!("CARGO_BIN_EXE_whet-fuzz"))
        .args(["run", "--target", target])
        .args(extra)
        .arg("--out")
        .arg(out)
        .output()
        .expect("running whet-fuzz");
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&output.stderr);
    // Shown with --nocapture, and on failure.
    println!("{stdout}");
    eprintln!("{stderr}");
    let line = stdout
        .lines()
        .find(|l| l.starts_with("RESULT "))
        .unwrap_or_else(|| panic!("no RESULT line from whet-fuzz:\n{stdout}\n{stderr}"));
    let result = line
        .split_whitespace()
        .skip(1)
        .filter_map(|kv| kv.split_once('='))
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    Run {
        ok: output.status.success(),
        stdout,
        result,
    }
}

/// Runs one target for CI's budget and fails on any finding outside its known kinds.
fn ci(target: &Target) {
    let seconds = env_u64("WHET_FUZZ_SECONDS", 5).to_string();
    let inputs = env_u64("WHET_FUZZ_INPUTS", 20_000).to_string();
    let seed = env_u64("WHET_FUZZ_SEED", 0x5eed).to_string();
    let out = out_dir(target.name);
    let run = fuzz(
        target.name,
        &[
            "--seconds",
            &seconds,
            "--inputs",
            &inputs,
            "--seed",
            &seed,
            // Generous on a loaded CI machine: a hang is an input that never ends.
            "--timeout-ms",
            "5000",
        ],
        &out,
    );
    let r = &run.result;
    eprintln!(
        "fuzz {}: {} inputs in {} s, corpus {}, findings {} (+{} known)",
        target.name, r["inputs"], r["seconds"], r["corpus"], r["findings"], r["known"]
    );
    assert!(
        run.ok && r["findings"] == "0",
        "fuzz target {} has findings (inputs under {}):\n{}",
        target.name,
        out.display(),
        run.stdout
    );
    let n: u64 = r["inputs"].parse().unwrap();
    assert!(n >= 20, "{}: only {n} inputs ran", target.name);
}

macro_rules! ci_targets {
    ($($name:ident),* $(,)?) => {
        $(
            #[test]
            fn $name() {
                ci(whet_fuzz::targets::find(stringify!($name)).expect("a target of that name"));
            }
        )*
        /// Every target has its CI test above.
        #[test]
        fn every_target_runs_in_ci() {
            let tested = [$(stringify!($name)),*];
            let all: Vec<&str> = TARGETS.iter().map(|t| t.name).collect();
            assert_eq!(all, tested);
        }
    };
}

ci_targets!(
    gguf,
    safetensors,
    model_config,
    model_folder,
    jsonl,
    json,
    csv,
    parquet,
    arrow,
    chat_template,
    train_config,
);

// ---------------------------------------------------------------------------------------------
// the harness on its canaries

fn canary(name: &str) -> (Run, Vec<PathBuf>) {
    assert!(CANARIES.iter().any(|t| t.name == name));
    let out = out_dir(name);
    let run = fuzz(
        name,
        &["--inputs", "8", "--seconds", "60", "--timeout-ms", "300"],
        &out,
    );
    let mut saved: Vec<PathBuf> = std::fs::read_dir(out.join(name))
        .map(|d| d.map(|e| e.unwrap().path()).collect())
        .unwrap_or_default();
    saved.sort();
    (run, saved)
}

fn saved_with(saved: &[PathBuf], prefix: &str, ext: &str) -> Vec<PathBuf> {
    saved
        .iter()
        .filter(|p| {
            let name = p.file_name().unwrap().to_string_lossy();
            name.starts_with(prefix) && name.ends_with(ext)
        })
        .cloned()
        .collect()
}

#[test]
fn a_panic_is_a_finding_with_its_input_saved() {
    let (run, saved) = canary("canary_panic");
    assert!(!run.ok);
    assert!(
        run.stdout.contains("FINDING canary_panic: panic"),
        "{}",
        run.stdout
    );
    assert!(run.stdout.contains("canary: input starts with P"));
    assert!(
        run.stdout.contains("seed 24301, iteration 1"),
        "{}",
        run.stdout
    );
    let bins = saved_with(&saved, "panic-", ".bin");
    assert_eq!(bins.len(), 1, "{saved:?}");
    assert!(std::fs::read(&bins[0]).unwrap().starts_with(b"P"));
    // Mutants of "Panic" that still start with P panic at the same place: counted, one input kept.
    assert!(run.result["findings"].parse::<u64>().unwrap() >= 1);
    assert_eq!(run.result["inputs"], "8");
}

#[test]
fn an_input_past_the_time_limit_is_a_hang_and_the_run_goes_on() {
    let (run, saved) = canary("canary_hang");
    assert!(!run.ok);
    assert!(
        run.stdout.contains("FINDING canary_hang: hang"),
        "{}",
        run.stdout
    );
    assert_eq!(saved_with(&saved, "hang-", ".bin").len(), 1, "{saved:?}");
    // The worker stuck on the hang was replaced and the budget was used up.
    assert!(run.result["workers"].parse::<u32>().unwrap() >= 2);
    assert_eq!(run.result["inputs"], "8");
}

#[test]
fn unbounded_allocations_are_findings_handled_or_not() {
    let (run, saved) = canary("canary_alloc");
    assert!(!run.ok);
    // "Abort": vec![1; 3 GiB] is refused and aborts the worker; the supervisor reports it.
    assert!(
        run.stdout
            .contains("unbounded allocation: requested 3221225472 bytes"),
        "{}",
        run.stdout
    );
    // "Try": try_reserve(3 GiB) is refused and handled; the worker reports it.
    assert!(
        run.stdout.contains("the caller handled the refusal"),
        "{}",
        run.stdout
    );
    // "Live": twelve 100 MiB blocks, each under the limit, pass 1 GiB live in total.
    assert!(
        run.stdout
            .contains("requested 104857600 bytes (live total then"),
        "{}",
        run.stdout
    );
    assert!(saved_with(&saved, "alloc-", ".bin").len() >= 2, "{saved:?}");
    assert_eq!(run.result["inputs"], "8");
}

#[test]
fn a_stack_overflow_is_a_crash_finding_not_a_dead_fuzzer() {
    let (run, saved) = canary("canary_stack");
    assert!(!run.ok);
    assert!(
        run.stdout.contains("FINDING canary_stack: crash"),
        "{}",
        run.stdout
    );
    let bins = saved_with(&saved, "crash-", ".bin");
    assert_eq!(bins.len(), 1, "{saved:?}");
    assert!(std::fs::read(&bins[0]).unwrap().starts_with(b"S"));
}

#[test]
fn a_saved_finding_replays() {
    let out = out_dir("repro");
    std::fs::create_dir_all(&out).unwrap();
    let input = out.join("input.bin");
    std::fs::write(&input, b"Pxyz").unwrap();
    let output = Command::new(env!("CARGO_BIN_EXE_whet-fuzz"))
        .args(["repro", "--target", "canary_panic"])
        .arg(&input)
        .output()
        .unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("canary: input starts with P"), "{stderr}");
}

// ---------------------------------------------------------------------------------------------
// the seed corpus

#[test]
fn the_seed_corpus_is_what_its_generator_writes() {
    let dir = out_dir("seeds");
    let n = whet_fuzz::seeds::write(&dir).unwrap();
    let committed = whet_fuzz::corpus_dir();
    let mut checked = 0;
    for (target, name, bytes) in whet_fuzz::seeds::all() {
        let path = committed.join(target).join(&name);
        let have = std::fs::read(&path).unwrap_or_else(|e| {
            panic!(
                "{}: {e}; run `cargo run -p whet-fuzz -- seeds`",
                path.display()
            )
        });
        assert!(
            have == bytes,
            "{} differs from its generator; run `cargo run -p whet-fuzz -- seeds`",
            path.display()
        );
        checked += 1;
    }
    assert_eq!(checked, n);
    // No stray files in the committed corpus.
    for t in TARGETS {
        let files = std::fs::read_dir(committed.join(t.corpus)).unwrap().count();
        let generated = std::fs::read_dir(dir.join(t.corpus)).unwrap().count();
        assert_eq!(files, generated, "fixtures/fuzz/{}", t.corpus);
    }
}

/// Seeds are valid inputs (their every step succeeds), except `bad-*` ones, so mutations start
/// deep inside each reader.
#[test]
fn every_seed_but_the_bad_ones_is_read_without_error() {
    let scratch = whet_fuzz::targets::Scratch::new().unwrap();
    for t in TARGETS {
        let dir = whet_fuzz::corpus_dir().join(t.corpus);
        let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().path())
            .collect();
        files.sort();
        assert!(!files.is_empty(), "{}", dir.display());
        for f in files {
            let trace = (t.run)(&scratch, &std::fs::read(&f).unwrap());
            let errors = trace.errors();
            let bad = f.file_name().unwrap().to_string_lossy().starts_with("bad-");
            assert_eq!(errors.is_empty(), !bad, "{}: {errors:?}", f.display());
            assert!(trace.steps() > 0);
        }
    }
}
