//! Rotary embedding on CUDA (`kernels/rope.cu`). x: (B, T, NH, D), any strides on (B, T, NH),
//! unit stride on D; cos, sin: (B, T, D/2) contiguous.

use candle_core::backend::BackendStorage;
use candle_core::{CudaStorage, Layout, Result, Tensor, bail};

use super::{ROPE, alloc, func, grid_1d, launch, ptr, ptr_at, suffix, tensor, with_storages};

const OP: &str = "whet-rope";

/// Rotates x by +angle (`sign` 1, the forward) or -angle (`sign` -1, the backward); the result
/// is contiguous.
pub(crate) fn apply(
    x: &CudaStorage,
    lx: &Layout,
    cos: &CudaStorage,
    lc: &Layout,
    sin: &CudaStorage,
    ls: &Layout,
    sign: f32,
) -> Result<CudaStorage> {
    let dt = x.dtype();
    if cos.dtype() != dt || sin.dtype() != dt {
        bail!(
            "{OP}: x, cos and sin must share a dtype, got {dt:?}, {:?}, {:?}",
            cos.dtype(),
            sin.dtype()
        )
    }
    let (b, t, nh, d) = lx.shape().dims4()?;
    let st = lx.stride();
    if st[3] != 1 && d > 1 {
        bail!("{OP}: x needs a unit stride on its last dim, got strides {st:?}")
    }
    let dev = x.device().clone();
    let px = ptr_at(x, lx.start_offset())?;
    let (pc, ps) = (ptr(cos, lc, OP)?, ptr(sin, ls, OP)?);
    let n = b * t * nh * d;
    let (out, py) = alloc(&dev, dt, n, false)?;
    if n == 0 {
        return Ok(out);
    }
    let half = d / 2;
    let pairs = half.is_multiple_of(2)
        && st[..3].iter().all(|s| s.is_multiple_of(2))
        && lx.start_offset().is_multiple_of(2)
        && lc.start_offset().is_multiple_of(2)
        && ls.start_offset().is_multiple_of(2);
    let (name, per) = if pairs { ("rope2", 2) } else { ("rope", 1) };
    let total = b * t * nh * (half / per);
    let f = func(&dev, &ROPE, &format!("{name}_{}", suffix(OP, dt)?))?;
    launch!(
        dev,
        f,
        grid_1d(total, 256),
        px,
        pc,
        ps,
        py,
        t as i32,
        nh as i32,
        d as i32,
        st[0] as i64,
        st[1] as i64,
        st[2] as i64,
        sign,
        total as i64
    )?;
    Ok(out)
}

/// The gradient of x: the incoming gradient rotated back.
pub(crate) fn bwd(grad: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    let out = with_storages([grad, cos, sin], OP, |[(g, lg), (c, lc), (s, ls)]| {
        apply(g, lg, c, lc, s, ls, -1.0)
    })?;
    Ok(tensor(out, grad.shape()))
}
