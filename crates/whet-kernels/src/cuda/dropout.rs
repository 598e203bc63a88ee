//! Dropout masks on CUDA (`kernels/dropout.cu`), drawn on the device: the host sends a seed,
//! not the mask.

use candle_core::{CudaDevice, DType, Result, Tensor};

use super::{DROPOUT, alloc, func, launch, suffix, tensor};

const OP: &str = "whet-dropout-mask";

/// `n` mask values of `dt` (see [`crate::dropout_mask`]), contiguous, as a tensor of `shape`.
pub(crate) fn mask(
    dev: &CudaDevice,
    shape: &candle_core::Shape,
    dt: DType,
    seed: u64,
    threshold: u32,
    keep: f32,
) -> Result<Tensor> {
    let n = shape.elem_count();
    let (out, py) = alloc(dev, dt, n, false)?;
    if n > 0 {
        let cap = 32 * super::sm_count(dev)? as usize;
        let blocks = n.div_ceil(256).clamp(1, cap.max(1));
        let cfg = super::cudarc::driver::LaunchConfig {
            grid_dim: (blocks as u32, 1, 1),
            block_dim: (256, 1, 1),
            shared_mem_bytes: 0,
        };
        let f = func(dev, &DROPOUT, &format!("dropout_mask_{}", suffix(OP, dt)?))?;
        launch!(dev, f, cfg, py, n as i64, seed, threshold, keep)?;
    }
    Ok(tensor(out, shape.clone()))
}
