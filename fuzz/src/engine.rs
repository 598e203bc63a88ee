//! The fuzzing loop, split over two processes so that no input can take the fuzzer down with it.
//!
//! The *supervisor* ([`run`]) spawns a *worker* (this binary with `worker`), which mutates the
//! corpus and runs each input under `catch_unwind` on an input thread, waiting at most the
//! per-input time limit for it. Before each input the worker copies it into a memory-mapped
//! *flight recorder* file ([`Recorder`]), so when the worker dies (an abort on a refused
//! allocation, a stack overflow, any signal), the supervisor still has the input that killed
//! it, saves it as a finding and starts a new worker at the next iteration. A hang is reported
//! by the worker itself, which then exits (its input thread cannot be stopped) and is replaced.
//!
//! Findings go to `target/fuzz-findings/<target>/`: the input as `<kind>-<hash>.bin` and what
//! happened as `<kind>-<hash>.txt`; the first of each kind and place per run is kept.

use std::collections::{BTreeMap, HashSet};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use memmap2::MmapMut;

use crate::alloc;
use crate::mutate::{MAX_INPUT, Rng, mutate};
use crate::targets::{Kind, Scratch, Target};

/// How long one fuzzing run goes, and how.
#[derive(Debug, Clone)]
pub struct Budget {
    /// Stop after this many inputs ...
    pub inputs: u64,
    /// ... or this much time, whichever comes first.
    pub time: Duration,
    /// Run seed: iteration `i` mutates with `Rng::for_iteration(seed, i)`.
    pub seed: u64,
    /// An input running longer is a hang.
    pub timeout: Duration,
    /// The allocator's limit (one request or the live total), bytes.
    pub alloc_limit: usize,
    /// Where findings are saved.
    pub out: PathBuf,
}

/// What a run of one target did.
#[derive(Debug, Clone)]
pub struct Summary {
    pub target: &'static str,
    pub inputs: u64,
    pub elapsed: Duration,
    /// Seeds plus the inputs that behaved in a new way.
    pub corpus: u64,
    /// Findings (every occurrence), apart from the target's known kinds ...
    pub findings: u64,
    /// ... and those.
    pub known: u64,
    /// Worker processes started (one more after each hang or crash).
    pub workers: u32,
}

impl Summary {
    /// One line, also parsed by the tests.
    pub fn line(&self) -> String {
        format!(
            "RESULT target={} inputs={} seconds={:.1} corpus={} findings={} known={} workers={}",
            self.target,
            self.inputs,
            self.elapsed.as_secs_f64(),
            self.corpus,
            self.findings,
            self.known,
            self.workers,
        )
    }
}

/// The files of a corpus folder, sorted by name (none when it does not exist).
pub fn corpus_files(dir: &Path) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = match std::fs::read_dir(dir) {
        Ok(d) => d
            .map(|e| e.expect("readable corpus folder").path())
            .filter(|p| p.is_file())
            .collect(),
        Err(_) => Vec::new(),
    };
    files.sort();
    files
}

/// The seed corpus of `target`: the generated seeds under `fixtures/fuzz/<corpus>/`, then the
/// inputs earlier runs found under `fixtures/fuzz/found/<corpus>/` (or the target's built-in
/// seeds).
pub fn seeds(target: &Target) -> Vec<Vec<u8>> {
    let mut out: Vec<Vec<u8>> = target.builtin_seeds.iter().map(|s| s.to_vec()).collect();
    if !target.corpus.is_empty() {
        let root = crate::corpus_dir();
        let files = corpus_files(&root.join(target.corpus))
            .into_iter()
            .chain(corpus_files(&root.join("found").join(target.corpus)));
        for f in files {
            let mut bytes =
                std::fs::read(&f).unwrap_or_else(|e| panic!("seed {}: {e}", f.display()));
            bytes.truncate(MAX_INPUT);
            out.push(bytes);
        }
    }
    assert!(!out.is_empty(), "target {} has no seeds", target.name);
    out
}

// ---------------------------------------------------------------------------------------------
// the flight recorder

/// Header slots (u64) of the flight recorder file, then the current input at [`DATA`].
mod slot {
    pub const ITERATION: usize = 0;
    pub const LEN: usize = 1;
    /// Written by the allocator: the refused request and the live total then.
    pub const REFUSED: usize = 2;
    pub const DONE: usize = 4;
    pub const FINDINGS: usize = 5;
    pub const KNOWN: usize = 6;
    pub const CORPUS: usize = 7;
    /// 1 while the recorded input runs, 0 between inputs.
    pub const RUNNING: usize = 8;
    pub const COUNT: usize = 16;
}
const DATA: usize = slot::COUNT * 8;

/// A file the worker maps and writes the current input into; the supervisor reads it after the
/// worker exits, however it exited.
pub struct Recorder {
    map: MmapMut,
}

impl Recorder {
    /// Creates (or resets) the file at `path` and maps it.
    pub fn create(path: &Path) -> std::io::Result<Self> {
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(path)?;
        file.set_len((DATA + MAX_INPUT) as u64)?;
        // SAFETY: the file is this run's own (named after the supervisor's pid); the two
        // processes touch it through atomics and plain copies and never truncate it.
        let map = unsafe { MmapMut::map_mut(&file)? };
        Ok(Recorder { map })
    }

    fn slot(&self, i: usize) -> &AtomicU64 {
        assert!(i < slot::COUNT);
        // SAFETY: the map is page-aligned and at least DATA bytes long; slot `i` is an aligned
        // u64 inside it, only ever accessed atomically.
        unsafe { &*(self.map.as_ptr().add(i * 8) as *const AtomicU64) }
    }

    pub fn get(&self, i: usize) -> u64 {
        self.slot(i).load(Ordering::Acquire)
    }

    pub fn set(&self, i: usize, v: u64) {
        self.slot(i).store(v, Ordering::Release);
    }

    fn add(&self, i: usize) {
        self.slot(i).fetch_add(1, Ordering::AcqRel);
    }

    fn record_input(&mut self, iteration: u64, input: &[u8]) {
        let n = input.len().min(MAX_INPUT);
        self.map[DATA..DATA + n].copy_from_slice(&input[..n]);
        self.set(slot::LEN, n as u64);
        self.set(slot::ITERATION, iteration);
    }

    fn input(&self) -> Vec<u8> {
        let n = (self.get(slot::LEN) as usize).min(MAX_INPUT);
        self.map[DATA..DATA + n].to_vec()
    }

    /// The two slots the allocator writes a refusal into.
    fn refusal_slots(&self) -> *mut AtomicU64 {
        self.slot(slot::REFUSED) as *const AtomicU64 as *mut AtomicU64
    }
}

// ---------------------------------------------------------------------------------------------
// reporting

fn hex(data: &[u8], max: usize) -> String {
    let mut s: String = data.iter().take(max).map(|b| format!("{b:02x}")).collect();
    if data.len() > max {
        s.push_str("...");
    }
    s
}

/// Saves a finding's input and description; prints it; returns whether its kind is known for
/// the target. `place` groups findings: the first input per (kind, place) is kept.
fn report(
    target: &Target,
    budget: &Budget,
    kind: Kind,
    place: &str,
    detail: &str,
    iteration: u64,
    input: &[u8],
) -> bool {
    let known = target.known.contains(&kind);
    let dir = budget.out.join(target.name);
    let _ = std::fs::create_dir_all(&dir);
    let stem = format!("{}-{:016x}", kind.slug(), crate::engine_hash(place));
    let bin = dir.join(format!("{stem}.bin"));
    if !bin.exists() {
        let _ = std::fs::write(&bin, input);
        let _ = std::fs::write(
            dir.join(format!("{stem}.txt")),
            format!(
                "target: {}\nkind: {}\nseed: {}\niteration: {iteration}\n{detail}\n",
                target.name,
                kind.as_str(),
                budget.seed
            ),
        );
    }
    let label = if known { "KNOWN FINDING" } else { "FINDING" };
    let mut out = std::io::stdout().lock();
    let _ = writeln!(
        out,
        "{label} {}: {}: {detail}\n  seed {}, iteration {iteration}; input ({} bytes): {}\n  hex: {}\n  reproduce: cargo run -p whet-fuzz -- repro --target {} {}",
        target.name,
        kind.as_str(),
        budget.seed,
        input.len(),
        bin.display(),
        hex(input, 256),
        target.name,
        bin.display(),
    );
    known
}

// ---------------------------------------------------------------------------------------------
// the worker

/// The last panic on the input thread: (location, message).
static PANIC: Mutex<Option<(String, String)>> = Mutex::new(None);

const INPUT_THREAD: &str = "whet-fuzz-input";

fn install_panic_hook() {
    let default = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        if std::thread::current().name() != Some(INPUT_THREAD) {
            return default(info);
        }
        let location = info
            .location()
            .map(|l| format!("{}:{}:{}", l.file(), l.line(), l.column()))
            .unwrap_or_else(|| "unknown place".into());
        let message = if let Some(s) = info.payload().downcast_ref::<&str>() {
            (*s).to_string()
        } else if let Some(s) = info.payload().downcast_ref::<String>() {
            s.clone()
        } else {
            "(non-string panic payload)".into()
        };
        if let Ok(mut p) = PANIC.lock() {
            *p = Some((location, message));
        }
    }));
}

/// Exit status of a worker that reported a hang and gave up its stuck input thread.
pub const EXIT_HANG: i32 = 3;

/// The worker: runs iterations `start..` of `target` until the budget is spent, reporting
/// panics, hangs and handled refused allocations itself. Exits the process after a hang.
pub fn work(target: &'static Target, budget: &Budget, start: u64, recorder_path: &Path) {
    alloc::set_limit(budget.alloc_limit);
    let mut recorder = Recorder::create_for_worker(recorder_path)
        .unwrap_or_else(|e| panic!("flight recorder {}: {e}", recorder_path.display()));
    // SAFETY: the recorder is leaked below, so its map lives until the process exits.
    unsafe { alloc::share_refusals(recorder.refusal_slots()) };
    install_panic_hook();

    // The seeds come first in the corpus, which only grows at its end.
    let mut corpus = seeds(target);
    let n_seeds = corpus.len();
    let mut classes = HashSet::new();
    let (to_input, inputs) = mpsc::channel::<Vec<u8>>();
    let (to_main, outcomes) = mpsc::channel::<Result<String, (String, String)>>();
    let run = target.run;
    std::thread::Builder::new()
        .name(INPUT_THREAD.into())
        .stack_size(8 << 20) // a main thread's
        .spawn(move || {
            let scratch = Scratch::new().expect("a scratch folder for the fuzz target");
            for input in inputs {
                let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                    run(&scratch, &input).class(scratch.path())
                }))
                .map_err(|_| {
                    PANIC
                        .lock()
                        .ok()
                        .and_then(|mut p| p.take())
                        .unwrap_or_else(|| ("unknown place".into(), "panic".into()))
                });
                if to_main.send(outcome).is_err() {
                    return;
                }
            }
        })
        .expect("spawning the input thread");

    let started = Instant::now();
    let mut done = 0u64;
    let mut iteration = start;
    while done < budget.inputs && started.elapsed() < budget.time {
        let input = match corpus
            .get(iteration as usize)
            .filter(|_| iteration < n_seeds as u64)
        {
            Some(seed) => seed.clone(),
            None => mutate(
                &mut Rng::for_iteration(budget.seed, iteration),
                &corpus,
                target.structure,
            ),
        };
        recorder.record_input(iteration, &input);
        recorder.set(slot::RUNNING, 1);
        let _ = alloc::take_refusal();
        to_input
            .send(input.clone())
            .expect("the input thread is alive");
        let outcome = outcomes.recv_timeout(budget.timeout);
        let refused = alloc::take_refusal();
        if !matches!(outcome, Err(mpsc::RecvTimeoutError::Timeout)) {
            recorder.set(slot::RUNNING, 0);
        }
        let finding = |kind: Kind, place: &str, detail: &str| {
            let known = report(target, budget, kind, place, detail, iteration, &input);
            recorder.add(if known { slot::KNOWN } else { slot::FINDINGS });
        };
        match outcome {
            Ok(Ok(class)) => {
                if let Some(size) = refused {
                    finding(
                        Kind::Alloc,
                        "handled",
                        &format!(
                            "requested {size} bytes at once or past the live total (limit {}); the caller handled the refusal",
                            budget.alloc_limit
                        ),
                    );
                } else if corpus.len() < 2048 && classes.insert(class) {
                    corpus.push(input);
                }
            }
            Ok(Err((place, message))) => {
                finding(
                    Kind::Panic,
                    &place,
                    &format!("panicked at {place}: {message}"),
                );
            }
            Err(_) => {
                finding(
                    Kind::Hang,
                    "hang",
                    &format!("still running after {:?}", budget.timeout),
                );
                done += 1;
                recorder.set(slot::DONE, done);
                recorder.set(slot::CORPUS, corpus.len() as u64);
                let _ = std::io::stdout().flush();
                // The input thread cannot be stopped; the supervisor starts a new worker.
                std::process::exit(EXIT_HANG);
            }
        }
        done += 1;
        iteration += 1;
        recorder.set(slot::DONE, done);
        recorder.set(slot::CORPUS, corpus.len() as u64);
    }
    std::mem::forget(recorder);
}

impl Recorder {
    /// Maps the supervisor's file without resetting it.
    fn create_for_worker(path: &Path) -> std::io::Result<Self> {
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(path)?;
        // SAFETY: as in `create`.
        let map = unsafe { MmapMut::map_mut(&file)? };
        assert!(map.len() >= DATA + MAX_INPUT, "flight recorder too short");
        Ok(Recorder { map })
    }
}

// ---------------------------------------------------------------------------------------------
// the supervisor

/// Runs `target` for `budget` in worker processes (this executable, `worker ...`); saves and
/// prints every finding; returns what happened.
pub fn run(target: &'static Target, budget: &Budget) -> std::io::Result<Summary> {
    std::fs::create_dir_all(&budget.out)?;
    let recorder_path =
        budget
            .out
            .join(format!(".recorder-{}-{}", target.name, std::process::id()));
    let exe = std::env::current_exe()?;
    let started = Instant::now();
    let (mut findings, mut known) = (0u64, 0u64);
    let (mut inputs, mut corpus, mut workers) = (0u64, 0u64, 0u32);
    let mut start = 0u64;
    while inputs < budget.inputs && started.elapsed() < budget.time && workers < 200 {
        let recorder = Recorder::create(&recorder_path)?;
        recorder.set(slot::ITERATION, u64::MAX);
        let left = budget.time.saturating_sub(started.elapsed());
        let status = Command::new(&exe)
            // An abort's message, without a backtrace per finding; `repro` shows one.
            .env("RUST_BACKTRACE", "0")
            .arg("worker")
            .args(["--target", target.name])
            .args(["--seed", &budget.seed.to_string()])
            .args(["--start", &start.to_string()])
            .args(["--inputs", &(budget.inputs - inputs).to_string()])
            .args(["--millis", &left.as_millis().to_string()])
            .args(["--timeout-ms", &budget.timeout.as_millis().to_string()])
            .args(["--limit-mb", &(budget.alloc_limit >> 20).to_string()])
            .arg("--out")
            .arg(&budget.out)
            .arg("--recorder")
            .arg(&recorder_path)
            .status()?;
        workers += 1;
        let done = recorder.get(slot::DONE);
        inputs += done;
        corpus = corpus.max(recorder.get(slot::CORPUS));
        // The worker reported its own findings; count them here.
        findings += recorder.get(slot::FINDINGS);
        known += recorder.get(slot::KNOWN);
        let iteration = recorder.get(slot::ITERATION);
        match status.code() {
            Some(0) => break,
            Some(EXIT_HANG) => {}
            _ if iteration == u64::MAX || recorder.get(slot::RUNNING) == 0 => {
                return Err(std::io::Error::other(format!(
                    "the {} worker failed outside a fuzz input (a fault of the fuzzer itself): {status}",
                    target.name
                )));
            }
            _ => {
                // Died on the recorded input: an abort after a refused allocation, or a crash.
                inputs += 1;
                let input = recorder.input();
                let refused = recorder.get(slot::REFUSED);
                let (kind, place, detail) = if refused > 0 {
                    (
                        Kind::Alloc,
                        // One saved input per power of two requested.
                        format!("abort-2^{}", refused.ilog2()),
                        format!(
                            "requested {refused} bytes (live total then {} bytes; limit {}); the process aborted ({status})",
                            recorder.get(slot::REFUSED + 1),
                            budget.alloc_limit
                        ),
                    )
                } else {
                    (
                        Kind::Crash,
                        status.to_string(),
                        format!(
                            "the worker died: {status} (a stack overflow or an abort; run the reproduce command to see its message)"
                        ),
                    )
                };
                if report(target, budget, kind, &place, &detail, iteration, &input) {
                    known += 1;
                } else {
                    findings += 1;
                }
            }
        }
        if iteration == u64::MAX {
            break;
        }
        start = iteration + 1;
    }
    let _ = std::fs::remove_file(&recorder_path);
    Ok(Summary {
        target: target.name,
        inputs,
        elapsed: started.elapsed(),
        corpus,
        findings,
        known,
        workers,
    })
}

/// Runs each file through `target` once in this process, printing the outcome (a panic prints
/// its message and backtrace as usual). Returns whether every file ran without a panic.
pub fn repro(target: &'static Target, files: &[PathBuf]) -> bool {
    let scratch = Scratch::new().expect("a scratch folder for the fuzz target");
    let mut clean = true;
    let mut classes: BTreeMap<String, usize> = BTreeMap::new();
    for f in files {
        let data = std::fs::read(f).unwrap_or_else(|e| panic!("{}: {e}", f.display()));
        let started = Instant::now();
        let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            (target.run)(&scratch, &data)
        }));
        match outcome {
            Ok(trace) => {
                println!(
                    "{}: ok in {:?} (live memory after: {} bytes, peak {})",
                    f.display(),
                    started.elapsed(),
                    alloc::live(),
                    alloc::peak()
                );
                println!("  {trace:?}");
                *classes.entry(trace.class(scratch.path())).or_default() += 1;
            }
            Err(_) => {
                println!("{}: panicked (see above)", f.display());
                clean = false;
            }
        }
        if let Some(size) = alloc::take_refusal() {
            println!("  refused an allocation of {size} bytes");
            clean = false;
        }
    }
    clean
}
