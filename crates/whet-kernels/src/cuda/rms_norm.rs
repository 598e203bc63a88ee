//! RMSNorm on CUDA (`kernels/rms_norm.cu`). x: (R, H), weight: (H).

use candle_core::backend::BackendStorage;
use candle_core::{CudaStorage, Layout, Result, Tensor, bail};

use super::{
    RMS_NORM, aligned16, alloc, func, grid_1d, launch, ptr, row_block, suffix, tensor, tptr,
    vec_width,
};

const OP: &str = "whet-rms-norm";

/// y = x * rstd(x) * w, same dtype as x.
pub(crate) fn fwd(
    x: &CudaStorage,
    lx: &Layout,
    w: &CudaStorage,
    lw: &Layout,
    eps: f64,
) -> Result<CudaStorage> {
    let dt = x.dtype();
    if w.dtype() != dt {
        bail!("{OP}: dtype mismatch, {dt:?} and {:?}", w.dtype())
    }
    let dev = x.device().clone();
    let h = lw.shape().elem_count();
    let n = lx.shape().elem_count();
    let (px, pw) = (ptr(x, lx, OP)?, ptr(w, lw, OP)?);
    let (out, py) = alloc(&dev, dt, n, false)?;
    if h == 0 || n == 0 {
        return Ok(out);
    }
    let nv = vec_width(dt);
    let vec = h.is_multiple_of(nv) && aligned16(&[px, pw, py]);
    let f = func(
        &dev,
        &RMS_NORM,
        &format!("rms_norm_fwd_{}", suffix(OP, dt)?),
    )?;
    let mut cfg = grid_1d(1, row_block(h, nv, 1024));
    cfg.grid_dim.0 = (n / h) as u32;
    launch!(dev, f, cfg, px, pw, py, h as i32, eps as f32, vec as i32)?;
    Ok(out)
}

/// (dx if `need_dx`, dw if `need_dw`), in the dtypes of x and w. All arguments contiguous.
pub(crate) fn bwd(
    x: &Tensor,
    w: &Tensor,
    dy: &Tensor,
    eps: f64,
    need_dx: bool,
    need_dw: bool,
) -> Result<(Option<Tensor>, Option<Tensor>)> {
    let dt = x.dtype();
    let dev = x.device().as_cuda_device()?.clone();
    let h = w.elem_count();
    let n = x.elem_count();
    if h == 0 || n == 0 || !(need_dx || need_dw) {
        return Ok((
            need_dx.then(|| x.zeros_like()).transpose()?,
            need_dw.then(|| w.zeros_like()).transpose()?,
        ));
    }
    let rows = n / h;
    let (px, pw, pdy) = (tptr(x, OP)?, tptr(w, OP)?, tptr(dy, OP)?);
    let (dx, pdx) = if need_dx {
        let (s, p) = alloc(&dev, dt, n, false)?;
        (Some(s), p)
    } else {
        (None, 0)
    };
    // Per-block partial sums of dw: enough blocks to fill the GPU, each striding over rows.
    let blocks = rows.min(4 * super::sm_count(&dev)? as usize).max(1);
    let (part, ppart) = alloc(
        &dev,
        candle_core::DType::F32,
        if need_dw { blocks * h } else { 1 },
        true,
    )?;
    let nv = vec_width(dt);
    let vec = h.is_multiple_of(nv) && aligned16(&[px, pw, pdy]) && (!need_dx || aligned16(&[pdx]));
    let sfx = suffix(OP, dt)?;
    let f = func(&dev, &RMS_NORM, &format!("rms_norm_bwd_{sfx}"))?;
    let mut cfg = grid_1d(1, row_block(h, nv, 1024));
    cfg.grid_dim.0 = blocks as u32;
    launch!(
        dev,
        f,
        cfg,
        px,
        pw,
        pdy,
        pdx,
        ppart,
        rows as i32,
        h as i32,
        eps as f32,
        need_dx as i32,
        need_dw as i32,
        vec as i32
    )?;
    let dw = if need_dw {
        let (s, pdw) = alloc(&dev, dt, h, false)?;
        let f = func(&dev, &RMS_NORM, &format!("rms_norm_dw_{sfx}"))?;
        launch!(dev, f, grid_1d(h, 256), ppart, pdw, blocks as i32, h as i32)?;
        Some(tensor(s, w.shape()))
    } else {
        None
    };
    drop(part);
    Ok((dx.map(|s| tensor(s, x.shape())), dw))
}
