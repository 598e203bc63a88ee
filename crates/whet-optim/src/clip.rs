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
                data.iter().map(|&x| (x as f64) * (x as f64)).sum::<f64>()
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

/// The factor that brings a gradient of norm `norm` down to `max_norm` (1 when it is already
/// within bounds, or when clipping is off with `max_norm <= 0`).
pub fn clip_factor(norm: f64, max_norm: f64) -> f64 {
    if max_norm > 0.0 && norm > max_norm {
        max_norm / (norm + 1e-6)
    } else {
        1.0
    }
}
