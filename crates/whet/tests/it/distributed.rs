//! `mpirun -n 2 whet train`: data-parallel training over Open MPI (built with `--features mpi`;
//! CI installs Open MPI and runs `cargo test -p whet --features mpi`). These tests need `mpirun`
//! and fail without it: a build with the `mpi` feature has MPI installed.

use std::collections::HashMap;
use std::fs::{self, File};
use std::path::Path;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use candle_core::{Device, Tensor};

use crate::common::*;

/// 8 chats, one per row (no packing); 3 rows per step (micro-batch 1, 3 micro-batches): steps of
/// 3, 3 and 2 rows per epoch, so two ranks get 2 and 1 micro-batches. LoRA with dropout, AdamW,
/// clipping, evaluations.
const DP_RUN: &str = r#"
method = "lora"

[data]
train = "train.jsonl"
validation = "val.jsonl"
format = "chat"
max_len = 64
pack = false

[lora]
r = 4
alpha = 8.0
dropout = 0.1

[train]
epochs = 2
micro_batch = 1
grad_accum = 3
lr = 1e-2
max_grad_norm = 0.5
eval_every = 3

[output]
dir = "out"
"#;

/// A long run that checkpoints every step, to be interrupted.
const LONG_RUN: &str = r#"
method = "lora"

[data]
train = "train.jsonl"
validation = "val.jsonl"
format = "chat"
max_len = 64
pack = false

[lora]
r = 4
alpha = 8.0
dropout = 0.1

[train]
max_steps = 400
micro_batch = 1
grad_accum = 2
lr = 1e-3
eval_every = 50

[output]
dir = "out"
save_every = 1
keep_last = 3
"#;

/// `mpirun -n <n> whet <args>`, as root if need be, more ranks than cores allowed.
fn mpirun(n: usize, args: &[&str]) -> Command {
    let mut cmd = Command::new("mpirun");
    cmd.args([
        "--allow-run-as-root",
        "--oversubscribe",
        "--bind-to",
        "none",
    ])
    .args(["-n", &n.to_string(), BIN])
    .args(args)
    .env("OMPI_ALLOW_RUN_AS_ROOT", "1")
    .env("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1")
    // Containers often forbid the cross-memory-attach single copy of the shared-memory BTL.
    .env("OMPI_MCA_btl_vader_single_copy_mechanism", "none")
    .env(
        "WHET_CACHE",
        concat!(env!("CARGO_TARGET_TMPDIR"), "/whet-cache"),
    )
    .env_remove("RUST_BACKTRACE");
    cmd
}

fn spawn(mut cmd: Command, log: &Path) -> Child {
    cmd.stdout(Stdio::null())
        .stderr(File::create(log).unwrap())
        .spawn()
        .unwrap_or_else(|e| {
            panic!(
                "cannot run mpirun ({e}): the `mpi` tests need Open MPI \
                 (apt-get install openmpi-bin libopenmpi-dev)"
            )
        })
}

/// Waits for `child` up to `limit`; on timeout kills it and every rank, and panics.
fn wait_or_kill(child: &mut Child, limit: Duration, ranks: &[u32], what: &str) -> ExitStatus {
    let started = Instant::now();
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return status;
        }
        if started.elapsed() > limit {
            for pid in ranks {
                signal(*pid, "KILL");
            }
            let _ = child.kill();
            let _ = child.wait();
            panic!("{what}: still running after {} s (a hang)", limit.as_secs());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn signal(pid: u32, sig: &str) {
    let _ = Command::new("kill")
        .args([&format!("-{sig}"), &pid.to_string()])
        .status();
}

fn alive(pid: u32) -> bool {
    // A zombie has exited: only its /proc entry remains until it is reaped.
    fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|s| {
        s.rsplit(')')
            .next()
            .is_some_and(|r| !r.trim_start().starts_with('Z'))
    })
}

/// PIDs of the `whet` ranks whose command line names `config`, by MPI rank.
fn ranks_of(config: &Path) -> HashMap<usize, u32> {
    let mut found = HashMap::new();
    for e in fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let cmdline = fs::read(e.path().join("cmdline")).unwrap_or_default();
        let cmdline = String::from_utf8_lossy(&cmdline);
        if !cmdline.starts_with(BIN) || !cmdline.contains(s(config)) {
            continue;
        }
        let environ = fs::read(e.path().join("environ")).unwrap_or_default();
        let rank = environ
            .split(|&b| b == 0)
            .filter_map(|v| std::str::from_utf8(v).ok())
            .find_map(|v| v.strip_prefix("OMPI_COMM_WORLD_RANK="))
            .and_then(|r| r.parse().ok());
        if let Some(rank) = rank {
            found.insert(rank, pid);
        }
    }
    found
}

/// Waits until `dir` exists (the run got that far) and both ranks are found.
fn wait_for(child: &mut Child, dir: &Path, config: &Path, log: &Path) -> HashMap<usize, u32> {
    let started = Instant::now();
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            panic!(
                "mpirun exited ({status}) before {}:\n{}",
                dir.display(),
                fs::read_to_string(log).unwrap()
            );
        }
        if dir.is_dir() {
            let ranks = ranks_of(config);
            if ranks.len() == 2 {
                return ranks;
            }
        }
        assert!(
            started.elapsed() < Duration::from_secs(120),
            "no {} after 120 s:\n{}",
            dir.display(),
            fs::read_to_string(log).unwrap()
        );
        std::thread::sleep(Duration::from_millis(2));
    }
}

fn tensors(path: &Path) -> HashMap<String, Tensor> {
    candle_core::safetensors::load(path, &Device::Cpu)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn max_abs_diff(a: &Path, b: &Path) -> f32 {
    let (a, b) = (tensors(a), tensors(b));
    assert_eq!(
        a.keys().collect::<std::collections::BTreeSet<_>>(),
        b.keys().collect()
    );
    a.iter()
        .map(|(name, t)| {
            (t - &b[name])
                .unwrap()
                .abs()
                .unwrap()
                .flatten_all()
                .unwrap()
                .max(0)
                .unwrap()
                .to_scalar::<f32>()
                .unwrap()
        })
        .fold(0f32, f32::max)
}

/// The last checkpoint of `out` is complete and loads: state, adapter, optimizer state.
fn assert_last_checkpoint_intact(out: &Path) -> u64 {
    let (step, dir) = whet_train::checkpoint::list(out)
        .pop()
        .unwrap_or_else(|| panic!("no checkpoint left in {}", out.display()));
    let state = whet_train::checkpoint::read_state(&dir).unwrap();
    assert_eq!(state.step, step);
    let adapter = tensors(&dir.join("adapter_model.safetensors"));
    assert!(!adapter.is_empty());
    let optimizer = tensors(&dir.join("optimizer.safetensors"));
    assert_eq!(
        optimizer.len(),
        2 * adapter.len(),
        "exp_avg + exp_avg_sq per tensor"
    );
    step
}

#[test]
fn two_mpi_ranks_reach_the_parameters_of_one_process() {
    let tmp = Tmp::new("mpi-parity");
    let m = model(&tmp);
    chat_data(&tmp);
    let cfg = config(&tmp, &m, DP_RUN);
    let (one, two) = (tmp.join("one"), tmp.join("two"));
    whet([
        "train",
        "--config",
        s(&cfg),
        "--no-report",
        "--set",
        &format!("output.dir={}", s(&one)),
    ])
    .ok();

    let started = Instant::now();
    let log = tmp.join("mpirun.log");
    let out_set = format!("output.dir={}", s(&two));
    let mut cmd = mpirun(
        2,
        &[
            "train",
            "--config",
            s(&cfg),
            "--no-report",
            "--set",
            &out_set,
        ],
    );
    // Buckets of 2 KiB: the adapter's gradients go through several all-reduces.
    cmd.env("WHET_BUCKET_MB", "0.002");
    let mut child = spawn(cmd, &log);
    let status = wait_or_kill(&mut child, Duration::from_secs(300), &[], "mpirun -n 2");
    let stderr = fs::read_to_string(&log).unwrap();
    assert!(
        status.success(),
        "mpirun -n 2 whet train: {status}\n{stderr}"
    );
    eprintln!(
        "mpirun -n 2 whet train: {:.1} s",
        started.elapsed().as_secs_f64()
    );
    assert_eq!(
        stderr.matches("data-parallel over 2 ranks (mpi)").count(),
        1,
        "rank 0 alone reports:\n{stderr}"
    );
    assert!(
        stderr.contains("train.grad_accum = 3 is not a multiple of the 2 ranks"),
        "{stderr}"
    );

    // The same history: one line per step and evaluation (one writer), the same global token
    // counts (the shards cover every row once), losses up to summation order.
    for field in ["supervised_tokens", "tokens"] {
        assert_eq!(series(&two, "train", field), series(&one, "train", field));
    }
    let (a, b) = (series(&two, "train", "loss"), series(&one, "train", "loss"));
    assert_eq!(a.len(), 6);
    for ((step, x), (_, y)) in a.iter().zip(&b) {
        assert!((x - y).abs() < 1e-5, "step {step}: loss {x} vs {y}");
    }
    let (a, b) = (
        series(&two, "eval", "val_loss"),
        series(&one, "eval", "val_loss"),
    );
    assert_eq!(a.len(), 2);
    // As for the training losses: at ~13, 1e-6 would be one f32 ulp, which a different split of
    // the rows (and so of the matmuls) over the ranks may move.
    for ((step, x), (_, y)) in a.iter().zip(&b) {
        assert!((x - y).abs() < 1e-5, "eval at {step}: {x} vs {y}");
    }
    let diff = max_abs_diff(
        &two.join("adapter/adapter_model.safetensors"),
        &one.join("adapter/adapter_model.safetensors"),
    );
    eprintln!("max |adapter(2 ranks) - adapter(1 process)| = {diff:.3e}");
    // The ranks sum their micro-batches' gradients in another order (2 + 1 instead of 3), and
    // AdamW at lr 1e-2 with clipping magnifies those last-bit differences into the parameters:
    // under 2e-5 until 2026-12-05, 2.03e-5 once the kernels' rounding changed (fused
    // multiply-adds, the LoRA update reduced with the frozen product), with the losses still
    // within 1e-5. A real divergence is orders of magnitude larger (lr x steps = 6e-2).
    assert!(diff < 5e-5, "the 2-rank adapter differs by {diff}");
    assert_eq!(
        whet_train::checkpoint::list(&two)
            .iter()
            .map(|c| c.0)
            .collect::<Vec<_>>(),
        whet_train::checkpoint::list(&one)
            .iter()
            .map(|c| c.0)
            .collect::<Vec<_>>()
    );
}

/// `kill -9` of rank 1 mid-run: `mpirun` ends rank 0 too and says which rank died; the last
/// checkpoint is intact, and one process resumes from it (another world size).
#[test]
fn a_killed_rank_ends_every_rank_and_the_last_checkpoint_resumes() {
    let tmp = Tmp::new("mpi-kill");
    let m = model(&tmp);
    chat_data(&tmp);
    let cfg = config(&tmp, &m, LONG_RUN);
    let out = tmp.join("out");
    let log = tmp.join("mpirun.log");
    let mut child = spawn(
        mpirun(2, &["train", "--config", s(&cfg), "--no-report"]),
        &log,
    );
    let ranks = wait_for(&mut child, &out.join("checkpoint-000003"), &cfg, &log);
    let killed_at = Instant::now();
    signal(ranks[&1], "KILL");
    let status = wait_or_kill(
        &mut child,
        Duration::from_secs(60),
        &[ranks[&0]],
        "mpirun after rank 1 was killed",
    );
    let took = killed_at.elapsed();
    let stderr = fs::read_to_string(&log).unwrap();
    eprintln!(
        "rank 1 killed: mpirun exited {status} after {:.2} s; its report:\n{}",
        took.as_secs_f64(),
        stderr
            .lines()
            .filter(|l| l.contains("rank") || l.contains("signal"))
            .collect::<Vec<_>>()
            .join("\n")
    );
    assert!(!status.success(), "{stderr}");
    assert!(
        stderr.contains("rank 1") && stderr.contains("signal 9"),
        "mpirun should name the killed rank and the signal:\n{stderr}"
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    while alive(ranks[&0]) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(!alive(ranks[&0]), "rank 0 outlived mpirun");
    assert!(
        !out.join("checkpoint-000400").exists(),
        "the run finished before the kill; the test needs a longer run"
    );

    let last = assert_last_checkpoint_intact(&out);
    // One process resumes what two ranks started.
    let r = whet(["train", "--config", s(&cfg), "--no-report"]).ok();
    assert!(
        r.stderr.contains(&format!("resuming at step {last}")),
        "{}",
        r.stderr
    );
    assert_eq!(series(&out, "train", "loss").len(), 400);
    assert!(out.join("adapter/adapter_model.safetensors").is_file());
}

/// A rank that hangs (SIGSTOP) is not noticed by mpirun; the other rank's watchdog ends the job
/// after `WHET_COMM_TIMEOUT_S`, saying which collective waited.
#[test]
fn a_hung_rank_is_ended_by_the_watchdog() {
    let tmp = Tmp::new("mpi-hang");
    let m = model(&tmp);
    chat_data(&tmp);
    let cfg = config(&tmp, &m, LONG_RUN);
    let out = tmp.join("out");
    let log = tmp.join("mpirun.log");
    let mut cmd = mpirun(2, &["train", "--config", s(&cfg), "--no-report"]);
    // Long enough that a slow checkpoint write on a loaded machine does not trip it first.
    cmd.env("WHET_COMM_TIMEOUT_S", "5");
    let mut child = spawn(cmd, &log);
    let ranks = wait_for(&mut child, &out.join("checkpoint-000003"), &cfg, &log);
    let stopped_at = Instant::now();
    signal(ranks[&1], "STOP");
    let status = wait_or_kill(
        &mut child,
        Duration::from_secs(60),
        &[ranks[&0], ranks[&1]],
        "mpirun after rank 1 was stopped",
    );
    let took = stopped_at.elapsed();
    for pid in [ranks[&0], ranks[&1]] {
        if alive(pid) {
            signal(pid, "KILL");
        }
    }
    let stderr = fs::read_to_string(&log).unwrap();
    eprintln!(
        "rank 1 stopped: mpirun exited {status} after {:.2} s:\n{}",
        took.as_secs_f64(),
        stderr
            .lines()
            .filter(|l| l.contains("rank") || l.contains("MPI_ABORT"))
            .collect::<Vec<_>>()
            .join("\n")
    );
    assert!(!status.success());
    assert!(
        stderr.contains("error: rank 0 of 2 (mpi): ")
            && stderr.contains("has waited")
            && stderr.contains("WHET_COMM_TIMEOUT_S"),
        "rank 0's watchdog should say what hung:\n{stderr}"
    );
    assert!(took >= Duration::from_secs(5), "ended before the timeout");
    assert_last_checkpoint_intact(&out);
}
