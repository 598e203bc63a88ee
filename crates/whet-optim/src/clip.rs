use candle_core::Tensor;

use crate::Result;

/// `sqrt(sum over all gradients of g^2) * scale`: the norm of the scaled gradient.
/// Computed in f64 from the raw gradients, one read of each, no temporary tensors. On a GPU the
/// per-gradient sums stay on the device (f32 squares summed in f64) and come back once.
pub fn global_norm(grads: &[Option<Tensor>], scale: f64) -> Result<f64> {
    let mut sum = 0f64;
    let mut on_device: Option<Tensor> = None;
    for g in grads.iter().flatten() {
        if !g.device().is_cpu() {
            let sq = g
                .to_dtype(candle_core::DType::F32)?
                .sqr()?
                .sum_all()?
                .to_dtype(candle_core::DType::F64)?;
            on_device = Some(match on_device.take() {
                Some(acc) => (acc + sq)?,
                None => sq,
            });
            continue;
        }
        let g = g.flatten_all()?;
        let (storage, layout) = g.storage_and_layout();
        let sq = match &*storage {
            candle_core::Storage::Cpu(cpu) => {
                let data = cpu.as_slice::<f32>()?;
                let data = &data[layout.start_offset()..layout.start_offset() + g.elem_count()];
                sum_of_squares(data)
            }
            _ => {
                drop(storage);
                g.to_dtype(candle_core::DType::F64)?
                    .sqr()?
                    .sum_all()?
                    .to_scalar::<f64>()?
            }
        };
        sum += sq;
    }
    if let Some(acc) = on_device {
        sum += acc.to_scalar::<f64>()?;
    }
    Ok(sum.sqrt() * scale.abs())
}

/// `sum(x^2)` in f64, in the same order on any machine: fixed chunks summed in parallel, each
/// with eight independent accumulators (one serial chain of additions over a full model's
/// gradients was bound by the adder's latency: about 70 ms per step for 135M parameters).
fn sum_of_squares(data: &[f32]) -> f64 {
    use rayon::prelude::*;
    const CHUNK: usize = 1 << 16;
    fn chunk(xs: &[f32]) -> f64 {
        let mut acc = [0f64; 8];
        let mut it = xs.chunks_exact(8);
        for c in &mut it {
            for (a, &x) in acc.iter_mut().zip(c) {
                *a += (x as f64) * (x as f64);
            }
        }
        for (a, &x) in acc.iter_mut().zip(it.remainder()) {
            *a += (x as f64) * (x as f64);
        }
        acc.iter().sum()
    }
    if data.len() <= CHUNK {
        return chunk(data);
    }
    let parts: Vec<f64> = data.par_chunks(CHUNK).map(chunk).collect();
    parts.iter().sum()
}

/// The factor that brings a gradient of norm `norm` down to `max_norm` (1 when it is already
/// within bounds, or when clipping is off with `max_norm <= 0`).
pub fn clip_factor(norm: f64, max_norm: f64) -> f64 {
    if max_norm > 0.0 && norm > max_norm {
        max_norm / (norm + 1e-6)
    } else {
        1.0
    }
}
