//! An end-to-end LoRA training step on the GPU (feature `cuda`): SmolLM2-135M-shaped and a
//! ~1B Llama-shaped model (Llama-3.2-1B's shapes) with random weights, batch 4 x 2048 tokens
//! (`WHET_STEP_BATCH`, `WHET_STEP_SEQ` override), r = 16 and alpha = 32 on every linear layer,
//! no dropout, AdamW (the fused CUDA kernel); bf16 compute, f32 LoRA weights and optimizer state,
//! as `whet train --device cuda`, through whet-train's one training step (`whet_train::Step`,
//! which also takes the global gradient norm; no clipping). Prints tokens/s and the peak GPU memory (the driver's used
//! bytes, sampled after each step, minus those in use before the model was built), one JSON
//! line per model; `benches/train_step_gpu.py` runs the same step with PyTorch + PEFT.
//!
//! `cargo bench -p whet-benches --features cuda --bench cuda_step`. Without a CUDA device it
//! says so and exits.

use std::cell::Cell;
use std::path::Path;
use std::time::Instant;

use candle_core::{DType, Device, Tensor};
use criterion::{Criterion, criterion_group, criterion_main};
use whet_model::{Config, LoraConfig, Model, TargetModules};
use whet_optim::{AdamW, AdamWConfig, Param};
use whet_train::{Batch, Step};

const SMOLLM2_135M: &str = r#"{
    "model_type": "llama", "vocab_size": 49152, "hidden_size": 576,
    "intermediate_size": 1536, "num_hidden_layers": 30, "num_attention_heads": 9,
    "num_key_value_heads": 3, "rms_norm_eps": 1e-5, "rope_theta": 100000.0,
    "max_position_embeddings": 8192, "tie_word_embeddings": true,
    "bos_token_id": 1, "eos_token_id": 2
}"#;

const LLAMA_1B: &str = r#"{
    "model_type": "llama", "vocab_size": 128256, "hidden_size": 2048,
    "intermediate_size": 8192, "num_hidden_layers": 16, "num_attention_heads": 32,
    "num_key_value_heads": 8, "rms_norm_eps": 1e-5, "rope_theta": 500000.0,
    "max_position_embeddings": 131072, "tie_word_embeddings": true,
    "bos_token_id": 128000, "eos_token_id": 128001
}"#;

fn env(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn used_bytes(dev: &Device) -> usize {
    whet_kernels::cuda_memory_info(dev)
        .map(|(free, total)| total - free)
        .unwrap_or(0)
}

/// Builds the model and optimizer, runs `warmup` + `steps` steps; returns
/// (tokens/s, peak GPU MiB above the baseline, first loss).
fn run(name: &str, json: &str, dev: &Device, steps: usize) -> anyhow::Result<(f64, f64, f64)> {
    let (batch, seq) = (env("WHET_STEP_BATCH", 4), env("WHET_STEP_SEQ", 2048));
    let cfg = Config::from_json_str(json, Path::new(name))?;
    dev.synchronize()?;
    let base = used_bytes(dev);
    let mut model = Model::random(&cfg, 0, dev)?;
    let mut lora = LoraConfig::new(16, 32.0);
    lora.target_modules = TargetModules::One("all-linear".into());
    lora.dropout = 0.0;
    model.apply_lora(&lora, 0)?;
    model.set_compute_dtype(DType::BF16)?;
    model.set_training(true);
    let params: Vec<Param> = model
        .trainable()
        .into_iter()
        .map(|(n, v)| Param::new(n, v))
        .collect();
    let mut opt = AdamW::new(params, AdamWConfig::default())?;
    let vocab = cfg.vocab_size as u32;
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
        ids: Tensor::from_vec(ids, (batch, seq), dev)?,
        targets: Tensor::from_vec(targets, (batch, seq), dev)?,
        positions: Tensor::arange(0u32, seq as u32, dev)?
            .unsqueeze(0)?
            .repeat((batch, 1))?,
        segments: Tensor::zeros((batch, seq), DType::U32, dev)?,
        reference: None,
    };
    let warmup = 2;
    // Sampled after each backward pass, while the activations and gradients are alive.
    let peak = Cell::new(used_bytes(dev));
    let sample = || peak.set(peak.get().max(used_bytes(dev)));
    let step = Step {
        after_backward: Some(&sample),
        ..Step::single()
    };
    let mut first = f64::NAN;
    let mut t0 = Instant::now();
    for i in 0..warmup + steps {
        if i == warmup {
            dev.synchronize()?;
            t0 = Instant::now();
        }
        let done = step.run(&mut model, &mut opt, i as u64, 1e-4, 1, |_| {
            Ok(micro_batch.clone())
        })?;
        if i == 0 {
            first = done.loss;
        }
    }
    let peak = peak.get();
    dev.synchronize()?;
    let step_s = t0.elapsed().as_secs_f64() / steps as f64;
    Ok((
        (batch * seq) as f64 / step_s,
        (peak.saturating_sub(base)) as f64 / (1 << 20) as f64,
        first,
    ))
}

fn step(c: &mut Criterion) {
    let dev = match Device::new_cuda(0) {
        Ok(d) => d,
        Err(e) => {
            eprintln!(
                "cuda_step: skipped: no CUDA device ({})",
                e.to_string().lines().next().unwrap_or_default()
            );
            return;
        }
    };
    let _ = c; // the step is timed by hand: minutes of criterion samples would add nothing
    let steps = env("WHET_STEP_STEPS", 10);
    for (name, json) in [("smollm2-135m", SMOLLM2_135M), ("llama-1b", LLAMA_1B)] {
        match run(name, json, &dev, steps) {
            Ok((tps, mib, loss)) => println!(
                "{{\"impl\": \"whet\", \"model\": \"{name}\", \"batch\": {}, \"seq\": {}, \"tokens_per_s\": {tps:.1}, \"peak_gpu_mib\": {mib:.0}, \"first_loss\": {loss:.4}}}",
                env("WHET_STEP_BATCH", 4),
                env("WHET_STEP_SEQ", 2048)
            ),
            Err(e) => println!("{{\"impl\": \"whet\", \"model\": \"{name}\", \"error\": \"{e}\"}}"),
        }
    }
}

criterion_group!(benches, step);
criterion_main!(benches);
