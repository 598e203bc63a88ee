//! `whet-fuzz`: run the fuzz targets, replay findings, write the seed corpus.
//!
//! ```text
//! whet-fuzz run [--target NAME]... [--seconds S] [--inputs N] [--seed S] [--timeout-ms MS]
//!               [--limit-mb MB] [--out DIR]      every target (or those named), S seconds each
//!               [--total-seconds T]              (or T seconds in all, split evenly over them)
//! whet-fuzz repro --target NAME FILE...          run saved inputs once, in this process
//!                                                (non-zero on a panic or refused allocation)
//! whet-fuzz seeds [DIR]                          write the seed corpus (default fixtures/fuzz)
//! whet-fuzz list                                 the targets and their seeds
//! ```
//! Exits non-zero when a run has a finding outside its target's known kinds.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use whet_fuzz::alloc::{CountingAlloc, DEFAULT_LIMIT};
use whet_fuzz::engine::{self, Budget};
use whet_fuzz::targets::{self, TARGETS};

#[global_allocator]
static ALLOC: CountingAlloc = CountingAlloc;

struct Args {
    targets: Vec<String>,
    files: Vec<PathBuf>,
    budget: Budget,
    start: u64,
    recorder: Option<PathBuf>,
    /// `--total-seconds`: the time for all chosen targets together.
    total: Option<u64>,
}

fn parse(args: &[String]) -> Result<Args, String> {
    let mut a = Args {
        targets: Vec::new(),
        files: Vec::new(),
        budget: Budget {
            inputs: u64::MAX,
            time: Duration::from_secs(10),
            seed: 0x5eed,
            timeout: Duration::from_secs(2),
            alloc_limit: DEFAULT_LIMIT,
            out: whet_fuzz::default_out(),
        },
        start: 0,
        recorder: None,
        total: None,
    };
    let mut it = args.iter();
    while let Some(arg) = it.next() {
        let mut value = || {
            it.next()
                .cloned()
                .ok_or_else(|| format!("{arg} needs a value"))
        };
        let number = |v: String| {
            v.parse::<u64>()
                .map_err(|_| format!("{arg} {v:?}: not a number"))
        };
        match arg.as_str() {
            "--target" => a.targets.push(value()?),
            "--seconds" => a.budget.time = Duration::from_secs(number(value()?)?),
            "--total-seconds" => a.total = Some(number(value()?)?),
            "--millis" => a.budget.time = Duration::from_millis(number(value()?)?),
            "--inputs" => a.budget.inputs = number(value()?)?,
            "--seed" => a.budget.seed = number(value()?)?,
            "--timeout-ms" => a.budget.timeout = Duration::from_millis(number(value()?)?),
            "--limit-mb" => a.budget.alloc_limit = (number(value()?)? as usize) << 20,
            "--out" => a.budget.out = PathBuf::from(value()?),
            "--start" => a.start = number(value()?)?,
            "--recorder" => a.recorder = Some(PathBuf::from(value()?)),
            flag if flag.starts_with("--") => return Err(format!("unknown option {flag}")),
            file => a.files.push(PathBuf::from(file)),
        }
    }
    Ok(a)
}

fn target(name: &str) -> Result<&'static targets::Target, String> {
    targets::find(name).ok_or_else(|| {
        let names: Vec<&str> = TARGETS.iter().map(|t| t.name).collect();
        format!("no fuzz target {name:?}; targets: {}", names.join(", "))
    })
}

fn main() -> ExitCode {
    let argv: Vec<String> = std::env::args().skip(1).collect();
    let (command, rest) = match argv.split_first() {
        Some((c, rest)) => (c.as_str(), rest),
        None => ("help", &[][..]),
    };
    match run(command, rest) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("whet-fuzz: {e}");
            ExitCode::from(2)
        }
    }
}

fn run(command: &str, rest: &[String]) -> Result<ExitCode, String> {
    let args = parse(rest)?;
    match command {
        "run" => {
            let chosen: Vec<&'static targets::Target> = if args.targets.is_empty() {
                TARGETS.iter().collect()
            } else {
                args.targets
                    .iter()
                    .map(|n| target(n))
                    .collect::<Result<_, _>>()?
            };
            let mut budget = args.budget;
            if let Some(total) = args.total {
                let each = (total as f64 / chosen.len() as f64).max(1.0).round();
                budget.time = Duration::from_secs(each as u64);
                eprintln!(
                    "fuzzing {} target(s) for {each} s each, seed {}",
                    chosen.len(),
                    budget.seed
                );
            }
            let mut failed = false;
            for t in chosen {
                let summary = engine::run(t, &budget).map_err(|e| e.to_string())?;
                println!("{}", summary.line());
                failed |= summary.findings > 0;
            }
            Ok(if failed {
                ExitCode::FAILURE
            } else {
                ExitCode::SUCCESS
            })
        }
        "worker" => {
            let [name] = &args.targets[..] else {
                return Err("worker takes one --target".into());
            };
            let recorder = args.recorder.ok_or("worker needs --recorder")?;
            engine::work(target(name)?, &args.budget, args.start, &recorder);
            Ok(ExitCode::SUCCESS)
        }
        "repro" => {
            let [name] = &args.targets[..] else {
                return Err("repro takes one --target".into());
            };
            let t = target(name)?;
            whet_fuzz::alloc::set_limit(args.budget.alloc_limit);
            Ok(if engine::repro(t, &args.files) {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            })
        }
        "seeds" => {
            let dir = if args.files.is_empty() {
                whet_fuzz::corpus_dir()
            } else {
                args.files[0].clone()
            };
            let n = whet_fuzz::seeds::write(&dir).map_err(|e| e.to_string())?;
            println!("wrote {n} seeds under {}", dir.display());
            Ok(ExitCode::SUCCESS)
        }
        "list" => {
            for t in TARGETS {
                println!("{:14} {} seeds", t.name, engine::seeds(t).len());
            }
            Ok(ExitCode::SUCCESS)
        }
        _ => {
            eprintln!(
                "usage: whet-fuzz run [--target NAME]... [--seconds S] [--inputs N] [--seed S] [--timeout-ms MS] [--limit-mb MB] [--out DIR]\n       whet-fuzz repro --target NAME FILE...\n       whet-fuzz seeds [DIR]\n       whet-fuzz list"
            );
            Ok(if command == "help" {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(2)
            })
        }
    }
}
