//! SwiGLU on CUDA (`kernels/swiglu.cu`): elementwise over contiguous gate and up.

use candle_core::backend::BackendStorage;
use candle_core::{CudaDevice, CudaStorage, Layout, Result, Tensor, bail};

use super::{SWIGLU, aligned16, alloc, func, launch, ptr, suffix, tensor, tptr, vec_width};

const OP: &str = "whet-swiglu";

/// Enough blocks of 256 threads for `n` elements handled `vec` at a time, capped (the kernel
/// strides over the rest).
fn cfg(dev: &CudaDevice, n: usize, vec: usize) -> Result<super::cudarc::driver::LaunchConfig> {
    let cap = 32 * super::sm_count(dev)? as usize;
    let blocks = n.div_ceil(vec).div_ceil(256).clamp(1, cap.max(1));
    Ok(super::cudarc::driver::LaunchConfig {
        grid_dim: (blocks as u32, 1, 1),
        block_dim: (256, 1, 1),
        shared_mem_bytes: 0,
    })
}

pub(crate) fn fwd(
    g: &CudaStorage,
    lg: &Layout,
    u: &CudaStorage,
    lu: &Layout,
) -> Result<CudaStorage> {
    let dt = g.dtype();
    if u.dtype() != dt || lg.shape() != lu.shape() {
        bail!(
            "{OP}: gate {:?} {dt:?} and up {:?} {:?} differ",
            lg.dims(),
            lu.dims(),
            u.dtype()
        )
    }
    let dev = g.device().clone();
    let n = lg.shape().elem_count();
    let (pg, pu) = (ptr(g, lg, OP)?, ptr(u, lu, OP)?);
    let (out, py) = alloc(&dev, dt, n, false)?;
    if n == 0 {
        return Ok(out);
    }
    let nv = vec_width(dt);
    let vec = aligned16(&[pg, pu, py]);
    let f = func(&dev, &SWIGLU, &format!("swiglu_fwd_{}", suffix(OP, dt)?))?;
    launch!(dev, f, cfg(&dev, n, nv)?, pg, pu, py, n as i64, vec as i32)?;
    Ok(out)
}

/// (d gate if `need_dg`, d up if `need_du`); all arguments contiguous.
pub(crate) fn bwd(
    gate: &Tensor,
    up: &Tensor,
    dy: &Tensor,
    need_dg: bool,
    need_du: bool,
) -> Result<(Option<Tensor>, Option<Tensor>)> {
    if !(need_dg || need_du) {
        return Ok((None, None));
    }
    let dt = gate.dtype();
    let dev = gate.device().as_cuda_device()?.clone();
    let n = gate.elem_count();
    let (pg, pu, pd) = (tptr(gate, OP)?, tptr(up, OP)?, tptr(dy, OP)?);
    let (dg, pdg) = if need_dg {
        let (s, p) = alloc(&dev, dt, n, false)?;
        (Some(s), p)
    } else {
        (None, 0)
    };
    let (du, pdu) = if need_du {
        let (s, p) = alloc(&dev, dt, n, false)?;
        (Some(s), p)
    } else {
        (None, 0)
    };
    if n > 0 {
        let nv = vec_width(dt);
        let outs: Vec<u64> = [pdg, pdu].into_iter().filter(|p| *p != 0).collect();
        let vec = aligned16(&[pg, pu, pd]) && aligned16(&outs);
        let f = func(&dev, &SWIGLU, &format!("swiglu_bwd_{}", suffix(OP, dt)?))?;
        launch!(
            dev,
            f,
            cfg(&dev, n, nv)?,
            pg,
            pu,
            pd,
            pdg,
            pdu,
            n as i64,
            vec as i32
        )?;
    }
    Ok((
        dg.map(|s| tensor(s, gate.shape())),
        du.map(|s| tensor(s, up.shape())),
    ))
}
