//! `whet bench-step`: the training step that `cargo xtask bench train-step` measures against
//! PyTorch + PEFT (`benches/train_step.py` runs the same workload there).

use std::path::PathBuf;
use std::time::Instant;

use anyhow::Result;
use candle_core::{DType, Tensor};
use whet_model::{LoraConfig, Model, TargetModules, Trainable};
use whet_optim::{AdamW, AdamWConfig, Param};
use whet_train::{Batch, Step};

use crate::runtime::Runtime;

/// Peak resident memory of this process in MiB (Linux `VmHWM`), if known.
pub fn peak_rss_mib() -> Option<f64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kib: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib / 1024.0)
}

/// `whet bench-step`'s arguments.
#[derive(clap::Args, Debug, Clone)]
pub struct StepArgs {
    #[arg(long)]
    pub model: PathBuf,
    #[arg(long, default_value = "lora")]
    pub method: String,
    #[arg(long, default_value_t = 4)]
    pub batch: usize,
    #[arg(long, default_value_t = 256)]
    pub seq: usize,
    #[arg(long, default_value_t = 5)]
    pub steps: usize,
    #[arg(long, default_value_t = 1)]
    pub warmup: usize,
    /// QLoRA: keep the base's linear weights in this GGML type (q4_0, q8_0, q4_k, ...).
    #[arg(long)]
    pub quantize: Option<String>,
    /// Activation checkpointing per decoder layer.
    #[arg(long)]
    pub checkpoint: bool,
    /// Time whet's f32 GEMM kernels during the timed steps: a table per product shape on
    /// stderr (calls, seconds, GFLOP/s) and the GEMMs' share of the step in the JSON line.
    #[arg(long)]
    pub gemm_profile: bool,
}

/// Times `steps` optimizer steps (`whet_train::Step`: forward, backward, the global gradient
/// norm, AdamW; no clipping) on random tokens after `warmup` untimed ones; prints one JSON line.
pub fn train_step(rt: &Runtime, args: &StepArgs) -> Result<()> {
    let StepArgs {
        model: model_dir,
        method,
        batch,
        seq,
        steps,
        warmup,
        quantize,
        checkpoint: checkpointing,
        gemm_profile,
    } = args.clone();
    let quantize = quantize.as_deref();
    let method = method.as_str();
    let model_dir = model_dir.as_path();
    let trainable = match method {
        "lora" => {
            let mut l = LoraConfig::new(16, 32.0);
            l.target_modules = TargetModules::One("all-linear".into());
            Trainable::Lora { config: l, seed: 0 }
        }
        "full" => Trainable::Full,
        other => anyhow::bail!("--method must be lora or full, not `{other}`"),
    };
    let dev = rt.device().clone();
    let quantize = match quantize {
        None => None,
        Some(q) => Some(whet_model::quant::parse(q).ok_or_else(|| {
            anyhow::anyhow!(
                "--quantize {q:?}: use one of {}",
                whet_model::quant::names()
            )
        })?),
    };
    let options = whet_model::LoadOptions { quantize };
    let mut model = Model::load_with(model_dir, trainable, &options, &dev)?;
    rt.configure(&mut model)?;
    model.set_training(true);
    model.set_activation_checkpointing(checkpointing);
    let params: Vec<Param> = model
        .trainable()
        .into_iter()
        .map(|(n, v)| Param::new(n, v))
        .collect();
    let mut opt = AdamW::new(params, AdamWConfig::default())?;
    let vocab = model.config().vocab_size as u32;
    // Fixed pseudo-random tokens (an LCG), the same every run.
    let mut state = 12345u64;
    let ids: Vec<u32> = (0..batch * seq)
        .map(|_| {
            state = state
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((state >> 33) as u32) % vocab
        })
        .collect();
    let targets: Vec<i64> = (0..batch * seq)
        .map(|i| {
            if (i + 1) % seq == 0 {
                -100
            } else {
                ids[i + 1] as i64
            }
        })
        .collect();
    let micro_batch = Batch {
        supervised: targets.iter().filter(|&&t| t >= 0).count(),
        tokens: batch * seq,
        ids: Tensor::from_vec(ids, (batch, seq), &dev)?,
        targets: Tensor::from_vec(targets, (batch, seq), &dev)?,
        positions: Tensor::arange(0u32, seq as u32, &dev)?
            .unsqueeze(0)?
            .repeat((batch, 1))?,
        segments: Tensor::zeros((batch, seq), DType::U32, &dev)?,
        reference: None,
    };
    let step = Step::single();
    let mut times = Vec::new();
    let mut losses = Vec::new();
    for i in 0..warmup + steps {
        if i == warmup && gemm_profile {
            whet_kernels::gemm_profile::start();
        }
        let t0 = Instant::now();
        let done = step.run(&mut model, &mut opt, i as u64, 1e-4, 1, |_| {
            Ok(micro_batch.clone())
        })?;
        losses.push(done.loss);
        if i >= warmup {
            times.push(t0.elapsed().as_secs_f64());
        }
    }
    let mean = times.iter().sum::<f64>() / times.len().max(1) as f64;
    let gemm =
        gemm_profile.then(|| gemm_summary(&whet_kernels::gemm_profile::stop(), times.len(), mean));
    println!(
        "{}",
        serde_json::json!({
            "impl": "whet",
            // Which CPU kernels ran (`WHET_CPU` forces a lower path); none on a GPU.
            "cpu_path": dev.is_cpu().then(whet_kernels::cpu_path),
            "method": method,
            "batch": batch,
            "seq": seq,
            "steps": steps,
            "step_s": mean,
            "tokens_per_s": (batch * seq) as f64 / mean,
            "peak_rss_mib": peak_rss_mib(),
            "quantize": quantize.map(whet_model::quant::name),
            "activation_checkpointing": checkpointing,
            "linear_weight_mib": model.quant_summary().bytes as f64 / (1 << 20) as f64,
            "losses": losses,
            "gemm": gemm,
        })
    );
    Ok(())
}

/// Prints the GEMM profile of `steps` timed steps to stderr, one line per product shape;
/// returns its totals for the JSON line.
fn gemm_summary(
    entries: &[whet_kernels::gemm_profile::Entry],
    steps: usize,
    step_s: f64,
) -> serde_json::Value {
    let steps = steps.max(1) as f64;
    let seconds: f64 = entries.iter().map(|e| e.seconds).sum();
    let flop: f64 = entries.iter().map(|e| e.flop()).sum();
    let per_step = seconds / steps;
    let gflops = flop / seconds.max(f64::MIN_POSITIVE) / 1e9;
    eprintln!(
        "GEMMs: {per_step:.3} s a step ({:.0}% of {step_s:.3} s), {gflops:.1} GFLOP/s",
        100.0 * per_step / step_s
    );
    eprintln!("     m      n      k  k2 A^T B^T  calls/step  s/step  GFLOP/s");
    for e in entries {
        let s = e.shape;
        eprintln!(
            "{:>6} {:>6} {:>6} {:>3} {:>3} {:>3} {:>11.1} {:>7.3} {:>8.1}",
            s.m,
            s.n,
            s.k,
            s.k2,
            if s.a_transposed { "T" } else { "" },
            if s.b_transposed { "T" } else { "" },
            e.calls as f64 / steps,
            e.seconds / steps,
            e.gflops()
        );
    }
    serde_json::json!({
        "seconds_per_step": per_step,
        "share_of_step": per_step / step_s,
        "gflops": gflops,
    })
}
