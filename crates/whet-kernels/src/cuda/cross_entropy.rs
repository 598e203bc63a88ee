//! Cross entropy on CUDA (`kernels/cross_entropy.cu`): over given logits, and fused with the LM
//! head `chunk` supervised rows at a time (cuBLAS for the products). Per-row logsumexp and
//! losses are f32, and so is the summed loss, whatever the inputs' dtype (a bf16 sum would
//! round it to 3 digits); the incoming gradient is read as f32 too.

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CudaDevice, CudaStorage, DType, Layout, Result, Tensor, bail};

use super::linear::{Gemm, gemm, weight_operand};
use super::{
    CROSS_ENTROPY, aligned16, alloc, func, grid_1d, launch, ptr, ptr_at, suffix, tensor, tptr,
    upload, with_storage,
};
use crate::IGNORE_INDEX;

const OP: &str = "whet-cross-entropy";
const LCE: &str = "whet-linear-cross-entropy";

/// The targets, on the host, checked against the vocabulary (a small copy; the model has them
/// on the host anyway).
fn host_targets(s: &CudaStorage, l: &Layout, n: usize, v: usize, op: &str) -> Result<Vec<i64>> {
    if s.dtype() != DType::I64 {
        bail!("{op}: targets must be i64, got {:?}", s.dtype())
    }
    if l.dims() != [n] {
        bail!("{op}: targets {:?} is not (N) = ({n})", l.dims())
    }
    let CpuStorage::I64(all) = s.to_cpu_storage()? else {
        bail!("{op}: targets did not come back as i64")
    };
    let Some((a, b)) = l.contiguous_offsets() else {
        bail!("{op}: targets must be contiguous")
    };
    let t = all[a..b].to_vec();
    crate::cpu::cross_entropy::check_targets(&t, v)?;
    Ok(t)
}

/// Sums the f32 per-row losses into a one-element f32 buffer.
fn sum(dev: &CudaDevice, ploss: u64, n: usize) -> Result<CudaStorage> {
    let (out, pout) = alloc(dev, DType::F32, 1, false)?;
    let f = func(dev, &CROSS_ENTROPY, "ce_sum")?;
    launch!(dev, f, grid_1d(1024, 1024), ploss, pout, n as i64)?;
    Ok(out)
}

/// One block per row: per-row lse and loss of `rows` rows of logits (address `px`, dtype `dt`,
/// rows of `v`), row i being global row `rowmap[i]` (0: identity).
#[allow(clippy::too_many_arguments)]
fn rows_fwd(
    dev: &CudaDevice,
    dt: DType,
    px: u64,
    ptargets: u64,
    prowmap: u64,
    plse: u64,
    ploss: u64,
    rows: usize,
    v: usize,
) -> Result<()> {
    if rows == 0 {
        return Ok(());
    }
    let vec = v.is_multiple_of(8) && aligned16(&[px]);
    let f = func(dev, &CROSS_ENTROPY, &format!("ce_fwd_{}", suffix(OP, dt)?))?;
    let mut cfg = grid_1d(1, super::row_block(v, 8, 256));
    cfg.grid_dim.0 = rows as u32;
    launch!(
        dev, f, cfg, px, ptargets, prowmap, plse, ploss, v as i32, vec as i32
    )
}

/// d logits of `rows` rows: `name` is `ce_bwd_<T>` or `ce_bwd_f32_to_<T>`.
#[allow(clippy::too_many_arguments)]
fn rows_bwd(
    dev: &CudaDevice,
    name: &str,
    px: u64,
    ptargets: u64,
    prowmap: u64,
    plse: u64,
    pgrad: u64,
    pd: u64,
    rows: usize,
    v: usize,
) -> Result<()> {
    if rows == 0 || v == 0 {
        return Ok(());
    }
    let vec = v.is_multiple_of(8) && aligned16(&[px, pd]);
    let f = func(dev, &CROSS_ENTROPY, name)?;
    let slices = v.div_ceil(256 * 8).clamp(1, 64) as u32;
    let cfg = super::cudarc::driver::LaunchConfig {
        grid_dim: (rows as u32, slices, 1),
        block_dim: (256, 1, 1),
        shared_mem_bytes: 0,
    };
    launch!(
        dev, f, cfg, px, ptargets, prowmap, plse, pgrad, pd, v as i32, vec as i32
    )
}

/// -> (summed loss, shape (); per-row lse (N) f32).
pub(crate) fn fwd(
    x: &CudaStorage,
    lx: &Layout,
    t: &CudaStorage,
    lt: &Layout,
) -> Result<(CudaStorage, Tensor)> {
    let dt = x.dtype();
    let (n, v) = lx.shape().dims2()?;
    host_targets(t, lt, n, v, OP)?;
    let dev = x.device().clone();
    let (px, pt) = (ptr(x, lx, OP)?, ptr(t, lt, OP)?);
    let (lse, plse) = alloc(&dev, DType::F32, n, true)?;
    let (loss, ploss) = alloc(&dev, DType::F32, n, true)?;
    if v > 0 {
        rows_fwd(&dev, dt, px, pt, 0, plse, ploss, n, v)?;
    }
    let out = sum(&dev, ploss, n)?;
    drop(loss);
    Ok((out, tensor(lse, n)))
}

/// d logits = g * (softmax - onehot) on supervised rows, 0 on ignored ones; all contiguous.
pub(crate) fn bwd(
    logits: &Tensor,
    targets: &Tensor,
    lse: &Tensor,
    grad: &Tensor,
) -> Result<Tensor> {
    let dt = logits.dtype();
    let (n, v) = logits.dims2()?;
    let dev = logits.device().as_cuda_device()?.clone();
    let grad = grad.to_dtype(DType::F32)?.contiguous()?;
    let (px, pt, plse, pg) = (
        tptr(logits, OP)?,
        tptr(targets, OP)?,
        tptr(lse, OP)?,
        tptr(&grad, OP)?,
    );
    let (d, pd) = alloc(&dev, dt, n * v, false)?;
    let name = format!("ce_bwd_{}", suffix(OP, dt)?);
    rows_bwd(&dev, &name, px, pt, 0, plse, pg, pd, n, v)?;
    Ok(tensor(d, logits.shape()))
}

/// Sizes of the LM-head op and the supervised rows.
struct Plan {
    h: usize,
    v: usize,
    chunk: usize,
    /// Supervised rows, in order.
    kept: Vec<u32>,
    /// Whether `kept` is 0..n (no gather needed).
    all: bool,
}

impl Plan {
    fn new(targets: &[i64], h: usize, v: usize, chunk: usize) -> Self {
        let n = targets.len();
        let kept: Vec<u32> = (0..n as u32)
            .filter(|&r| targets[r as usize] != IGNORE_INDEX)
            .collect();
        let all = kept.len() == n;
        Plan {
            h,
            v,
            chunk: chunk.max(1),
            kept,
            all,
        }
    }
}

/// Working buffers of one chunk: the gathered hidden rows (unless all rows are kept) and the
/// f32 logits.
struct Chunk {
    ph: u64,
    _h: Option<CudaStorage>,
    plogits: u64,
    _logits: CudaStorage,
}

/// Hidden rows `kept[c0..c0 + c]` (gathered when needed) and their logits (c, V) f32.
#[allow(clippy::too_many_arguments)]
fn chunk_logits(
    dev: &CudaDevice,
    dt: DType,
    plan: &Plan,
    ph: u64,
    prowmap: u64,
    pw: u64,
    wop: (bool, usize),
    c0: usize,
    c: usize,
) -> Result<Chunk> {
    let (hd, v) = (plan.h, plan.v);
    let esz = dt.size_in_bytes() as u64;
    let (hc, phc) = if plan.all {
        (None, ph + (c0 * hd) as u64 * esz)
    } else {
        let (s, p) = alloc(dev, dt, c * hd, false)?;
        let f = func(
            dev,
            &CROSS_ENTROPY,
            &format!("gather_rows_{}", suffix(LCE, dt)?),
        )?;
        let mut cfg = grid_1d(1, 256);
        cfg.grid_dim.0 = c as u32;
        launch!(dev, f, cfg, ph, prowmap + 4 * c0 as u64, p, hd as i32)?;
        (Some(s), p)
    };
    let (logits, pl) = alloc(dev, DType::F32, c * v, false)?;
    // Column-major: logits^T (V x c) = W (V x H) @ hc^T (H x c).
    gemm(
        dev,
        Gemm {
            trans_a: wop.0,
            trans_b: false,
            m: v,
            n: c,
            k: hd,
            a: pw,
            lda: wop.1,
            b: phc,
            ldb: hd.max(1),
            c: pl,
            ldc: v.max(1),
            beta: 0.0,
            ab: dt,
            c_dtype: DType::F32,
        },
    )?;
    Ok(Chunk {
        ph: phc,
        _h: hc,
        plogits: pl,
        _logits: logits,
    })
}

/// LM head + summed CE. h (N, H) contiguous, w (V, H) with a unit stride on one dim,
/// targets (N) i64. -> (summed loss, shape (); per-row lse (N) f32).
#[allow(clippy::too_many_arguments)]
pub(crate) fn lce_fwd(
    hs: &CudaStorage,
    lh: &Layout,
    ws: &CudaStorage,
    lw: &Layout,
    ts: &CudaStorage,
    lt: &Layout,
    chunk: usize,
) -> Result<(CudaStorage, Tensor)> {
    let dt = hs.dtype();
    if ws.dtype() != dt {
        bail!("{LCE}: dtype mismatch, {dt:?} and {:?}", ws.dtype())
    }
    let (n, h) = lh.shape().dims2()?;
    let (v, hw) = lw.shape().dims2()?;
    if h != hw {
        bail!("{LCE}: h {:?} and w {:?} differ in H", lh.dims(), lw.dims())
    }
    let targets = host_targets(ts, lt, n, v, LCE)?;
    let plan = Plan::new(&targets, h, v, chunk);
    let dev = hs.device().clone();
    let (ph, pw, pt) = (
        ptr(hs, lh, LCE)?,
        ptr_at(ws, lw.start_offset())?,
        ptr(ts, lt, LCE)?,
    );
    let wop = weight_operand(v, h, lw.stride())?;
    let (lse, plse) = alloc(&dev, DType::F32, n, true)?;
    let (loss, ploss) = alloc(&dev, DType::F32, n, true)?;
    if v > 0 && !plan.kept.is_empty() {
        let rowmap = upload(&dev, plan.kept.clone())?;
        let prm = tptr(&rowmap, LCE)?;
        let mut c0 = 0;
        while c0 < plan.kept.len() {
            let c = plan.chunk.min(plan.kept.len() - c0);
            let ch = chunk_logits(&dev, dt, &plan, ph, prm, pw, wop, c0, c)?;
            rows_fwd(
                &dev,
                DType::F32,
                ch.plogits,
                pt,
                prm + 4 * c0 as u64,
                plse,
                ploss,
                c,
                v,
            )?;
            c0 += c;
        }
    }
    let out = sum(&dev, ploss, n)?;
    drop(loss);
    Ok((out, tensor(lse, n)))
}

/// (dh (N, H) if `need_dh`, dw (V, H) if `need_dw`) for the loss scaled by `grad`.
#[allow(clippy::too_many_arguments)]
pub(crate) fn lce_bwd(
    h: &Tensor,
    w: &Tensor,
    targets: &Tensor,
    lse: &Tensor,
    grad: &Tensor,
    chunk: usize,
    need_dh: bool,
    need_dw: bool,
) -> Result<(Option<Tensor>, Option<Tensor>)> {
    let dt = h.dtype();
    let (n, hd) = h.dims2()?;
    let (v, _) = w.dims2()?;
    let dev = h.device().as_cuda_device()?.clone();
    let t = with_storage(targets, LCE, |s, l| host_targets(s, l, n, v, LCE))?;
    let plan = Plan::new(&t, hd, v, chunk);
    let grad = grad.to_dtype(DType::F32)?.contiguous()?;
    let (ph, pt, plse, pg) = (
        tptr(h, LCE)?,
        tptr(targets, LCE)?,
        tptr(lse, LCE)?,
        tptr(&grad, LCE)?,
    );
    let (pw, wop) = with_storage(w, LCE, |s, l| {
        Ok((
            ptr_at(s, l.start_offset())?,
            weight_operand(v, hd, l.stride())?,
        ))
    })?;
    let (dh, pdh) = alloc(&dev, dt, if need_dh { n * hd } else { 1 }, true)?;
    let (dw32, pdw) = alloc(&dev, DType::F32, if need_dw { v * hd } else { 1 }, true)?;
    if v > 0 && hd > 0 && !plan.kept.is_empty() && (need_dh || need_dw) {
        let rowmap = upload(&dev, plan.kept.clone())?;
        let prm = tptr(&rowmap, LCE)?;
        let esz = dt.size_in_bytes() as u64;
        let sfx = suffix(LCE, dt)?;
        let mut c0 = 0;
        while c0 < plan.kept.len() {
            let c = plan.chunk.min(plan.kept.len() - c0);
            let ch = chunk_logits(&dev, dt, &plan, ph, prm, pw, wop, c0, c)?;
            let (dl, pdl) = alloc(&dev, dt, c * v, false)?;
            rows_bwd(
                &dev,
                &format!("ce_bwd_f32_to_{sfx}"),
                ch.plogits,
                pt,
                prm + 4 * c0 as u64,
                plse,
                pg,
                pdl,
                c,
                v,
            )?;
            if need_dh {
                // Column-major: dh_c^T (H x c) = W^T (H x V) @ dlogits^T (V x c).
                let (tmp, pdst) = if plan.all {
                    (None, pdh + (c0 * hd) as u64 * esz)
                } else {
                    let (s, p) = alloc(&dev, dt, c * hd, false)?;
                    (Some(s), p)
                };
                gemm(
                    &dev,
                    Gemm {
                        trans_a: !wop.0,
                        trans_b: false,
                        m: hd,
                        n: c,
                        k: v,
                        a: pw,
                        lda: wop.1,
                        b: pdl,
                        ldb: v,
                        c: pdst,
                        ldc: hd,
                        beta: 0.0,
                        ab: dt,
                        c_dtype: dt,
                    },
                )?;
                if tmp.is_some() {
                    let f = func(&dev, &CROSS_ENTROPY, &format!("scatter_rows_{sfx}"))?;
                    let mut cfg = grid_1d(1, 256);
                    cfg.grid_dim.0 = c as u32;
                    launch!(dev, f, cfg, pdst, prm + 4 * c0 as u64, pdh, hd as i32)?;
                }
                drop(tmp);
            }
            if need_dw {
                // Column-major: dw^T (H x V) += hc^T (H x c) @ dlogits (c x V), f32 accumulator.
                gemm(
                    &dev,
                    Gemm {
                        trans_a: false,
                        trans_b: true,
                        m: hd,
                        n: v,
                        k: c,
                        a: ch.ph,
                        lda: hd,
                        b: pdl,
                        ldb: v,
                        c: pdw,
                        ldc: hd,
                        beta: 1.0,
                        ab: dt,
                        c_dtype: DType::F32,
                    },
                )?;
            }
            drop(dl);
            drop(ch);
            c0 += c;
        }
    }
    let dh = need_dh.then(|| tensor(dh, (n, hd)));
    let dw = if need_dw {
        let dw = tensor(dw32, (v, hd));
        Some(if dt == DType::F32 {
            dw
        } else {
            dw.to_dtype(dt)?
        })
    } else {
        None
    };
    Ok((dh, dw))
}
