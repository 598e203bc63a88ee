//! The fused multi-tensor AdamW on CUDA (feature `cuda`) against the CPU AdamW: the same
//! parameters and gradients for three steps, weight decay on some parameters, a missing
//! gradient, then a state round trip. Tolerance: 1e-6 of each tensor's max (the arithmetic is
//! the same f32 formula; only fused multiply-adds may round differently). Without a CUDA device
//! the test prints `skipped: no CUDA device (...)` and returns.

use anyhow::{Result, ensure};
use candle_core::{Device, Tensor, Var};
use whet_optim::{AdamW, AdamWConfig, Optimizer, Param};

fn values(n: usize, seed: u64) -> Vec<f32> {
    let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..n)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            ((s >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
        })
        .collect()
}

fn max_rel(a: &Tensor, b: &Tensor) -> Result<f64> {
    let a = a.to_device(&Device::Cpu)?.flatten_all()?.to_vec1::<f32>()?;
    let b = b.to_device(&Device::Cpu)?.flatten_all()?.to_vec1::<f32>()?;
    let scale = b.iter().fold(0f32, |m, x| m.max(x.abs())).max(1e-30) as f64;
    let err = a
        .iter()
        .zip(&b)
        .fold(0f32, |m, (x, y)| m.max((x - y).abs())) as f64;
    Ok(err / scale)
}

#[test]
fn fused_adamw_matches_cpu() -> Result<()> {
    let gpu = match Device::new_cuda(0) {
        Ok(d) => d,
        Err(e) => {
            eprintln!(
                "fused_adamw_matches_cpu: skipped: no CUDA device ({})",
                e.to_string().lines().next().unwrap_or_default()
            );
            return Ok(());
        }
    };
    // Several blocks' worth of elements (16384 per block), odd sizes, decay and no decay.
    let shapes: [(&str, &[usize]); 4] = [
        ("model.layers.0.mlp.up_proj.weight", &[129, 301]),
        ("model.norm.weight", &[1000]),
        ("lora_A.weight", &[16, 7]),
        ("lm_head.weight", &[3, 5]),
    ];
    let make = |dev: &Device| -> Result<Vec<Param>> {
        shapes
            .iter()
            .enumerate()
            .map(|(i, (name, shape))| {
                let n = shape.iter().product();
                let t = Tensor::from_vec(values(n, 7 + i as u64), *shape, dev)?;
                Ok(Param::new(*name, Var::from_tensor(&t)?))
            })
            .collect()
    };
    let cfg = AdamWConfig {
        weight_decay: 0.1,
        ..Default::default()
    };
    let mut cpu_opt = AdamW::new(make(&Device::Cpu)?, cfg)?;
    let mut gpu_opt = AdamW::new(make(&gpu)?, cfg)?;
    for step in 0..3u64 {
        let grads = |dev: &Device| -> Result<Vec<Option<Tensor>>> {
            shapes
                .iter()
                .enumerate()
                .map(|(i, (_, shape))| {
                    if step == 1 && i == 2 {
                        return Ok(None); // no gradient this step: skipped
                    }
                    let n = shape.iter().product();
                    Ok(Some(Tensor::from_vec(
                        values(n, 100 * step + i as u64),
                        *shape,
                        dev,
                    )?))
                })
                .collect()
        };
        cpu_opt.step(&grads(&Device::Cpu)?, 1e-2, 0.5)?;
        gpu_opt.step(&grads(&gpu)?, 1e-2, 0.5)?;
    }
    for (c, g) in cpu_opt.params().iter().zip(gpu_opt.params()) {
        let e = max_rel(g.var.as_tensor(), c.var.as_tensor())?;
        eprintln!("{}: max |gpu - cpu| / max |cpu| = {e:.2e}", c.name);
        ensure!(e <= 1e-6, "{}: {e:.3e}", c.name);
    }
    let (sc, sg) = (cpu_opt.state(), gpu_opt.state());
    ensure!(sc.step == sg.step && sc.buffers.len() == sg.buffers.len());
    for ((nc, bc), (ng, bg)) in sc.buffers.iter().zip(&sg.buffers) {
        ensure!(nc == ng, "buffer order: {nc} vs {ng}");
        let e = max_rel(
            &Tensor::from_slice(bg, bg.len(), &Device::Cpu)?,
            &Tensor::from_slice(bc, bc.len(), &Device::Cpu)?,
        )?;
        ensure!(e <= 1e-6, "{nc}: {e:.3e}");
    }
    // Resume: a fresh GPU optimizer loaded from the saved state continues identically.
    let mut resumed = AdamW::new(make(&gpu)?, cfg)?;
    resumed.load_state(&sg)?;
    ensure!(resumed.state() == sg, "state round trip on the GPU");
    Ok(())
}
