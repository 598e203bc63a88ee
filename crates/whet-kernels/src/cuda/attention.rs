//! Attention on CUDA (`kernels/attention.cu`): tensor-core kernels for bf16 at head dim 64 or
//! 128 on sm_80+, SIMT kernels otherwise (and on request, as the GPU-side reference).
//! q: (B, T, NH, D), k, v: (B, S, NKV, D), contiguous; lse: (B, T, NH) f32.

use candle_core::backend::BackendStorage;
use candle_core::{CudaDevice, CudaStorage, DType, Device, Layout, Result, Tensor, bail};

use super::{
    ATTENTION, aligned16, alloc, allow_shared, compute_cap, func, grid_1d, launch, ptr, suffix,
    tensor, tptr,
};
use crate::cpu::attention::Dims;

const OP: &str = "whet-attention";
/// The SIMT kernels keep a row of D floats per thread.
const MAX_D: usize = 256;

/// Which kernels to run.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Kernel {
    /// Tensor cores where they apply (bf16, D = 64 or 128, sm_80+), SIMT otherwise.
    Auto,
    /// Always the SIMT kernels.
    Simt,
}

/// The masking tables of a (B, S) segment-id matrix, on the device (u32 each): `seg`, `lo`
/// (first key each position may see: the first occurrence of its id), `hi` (last position that
/// may see each key: the last occurrence of its id) and `runs` (B: 1 when every id of the row
/// is one contiguous run).
pub(crate) struct Masks {
    seg: Tensor,
    lo: Tensor,
    hi: Tensor,
    runs: Tensor,
}

impl Masks {
    pub(crate) fn new(seg: &[u32], b: usize, s: usize, device: &Device) -> Result<Self> {
        let mut lo = vec![0u32; b * s];
        let mut hi = vec![0u32; b * s];
        let mut runs = vec![1u32; b];
        for bi in 0..b {
            let row = &seg[bi * s..(bi + 1) * s];
            let mut first = std::collections::HashMap::new();
            let mut last = std::collections::HashMap::new();
            for (p, &id) in row.iter().enumerate() {
                let f = *first.entry(id).or_insert(p);
                if f != p && row[p - 1] != id {
                    runs[bi] = 0; // the id came back after another one
                }
                last.insert(id, p);
            }
            for (p, &id) in row.iter().enumerate() {
                lo[bi * s + p] = first[&id] as u32;
                hi[bi * s + p] = last[&id] as u32;
            }
        }
        let up = |v: Vec<u32>| Tensor::from_vec(v, b * s, device);
        Ok(Masks {
            seg: up(seg.to_vec())?,
            lo: up(lo)?,
            hi: up(hi)?,
            runs: Tensor::from_vec(runs, b, device)?,
        })
    }
}

const fn dq_tile(d: usize) -> usize {
    if d == 64 { 64 } else { 32 }
}

fn fwd_smem(d: usize) -> u32 {
    ((2 * 64 * (d + 8) + d * 72) * 2) as u32
}

fn dq_smem(d: usize) -> u32 {
    let bc = dq_tile(d);
    ((2 * 64 * (d + 8) + 2 * bc * (d + 8) + d * (bc + 8)) * 2) as u32
}

fn dkdv_smem(d: usize) -> u32 {
    let bq = dq_tile(d);
    ((2 * 64 * (d + 8) + 2 * bq * (d + 8) + 2 * d * (bq + 8)) * 2) as u32
}

fn use_mma(dev: &CudaDevice, dt: DType, d: usize, kernel: Kernel, ptrs: &[u64]) -> Result<bool> {
    Ok(kernel == Kernel::Auto
        && dt == DType::BF16
        && (d == 64 || d == 128)
        && aligned16(ptrs)
        && compute_cap(dev)? >= 80)
}

fn mma_cfg(x: usize, y: usize, z: usize, smem: u32) -> super::cudarc::driver::LaunchConfig {
    super::cudarc::driver::LaunchConfig {
        grid_dim: (x.div_ceil(64) as u32, y as u32, z as u32),
        block_dim: (128, 1, 1),
        shared_mem_bytes: smem,
    }
}

/// -> (o (B, T, NH, D), lse (B, T, NH) f32).
#[allow(clippy::too_many_arguments)]
pub(crate) fn fwd(
    q: &CudaStorage,
    lq: &Layout,
    k: &CudaStorage,
    lk: &Layout,
    v: &CudaStorage,
    lv: &Layout,
    dm: Dims,
    masks: &Masks,
    scale: f64,
    kernel: Kernel,
) -> Result<(CudaStorage, Tensor)> {
    let dt = q.dtype();
    if k.dtype() != dt || v.dtype() != dt {
        bail!("{OP}: q, k and v must share a dtype")
    }
    let Dims {
        b,
        t,
        s,
        nh,
        nkv,
        d,
    } = dm;
    let dev = q.device().clone();
    let (pq, pk, pv) = (ptr(q, lq, OP)?, ptr(k, lk, OP)?, ptr(v, lv, OP)?);
    let (o, po) = alloc(&dev, dt, b * t * nh * d, true)?;
    let (lse, plse) = alloc(&dev, DType::F32, b * t * nh, true)?;
    let lse_t = tensor(lse, (b, t, nh));
    if b * t * nh * d == 0 || s == 0 {
        return Ok((o, lse_t));
    }
    let (pseg, plo, pruns) = (
        tptr(&masks.seg, OP)?,
        tptr(&masks.lo, OP)?,
        tptr(&masks.runs, OP)?,
    );
    let sc = scale as f32;
    if use_mma(&dev, dt, d, kernel, &[pq, pk, pv, po])? {
        let f = func(&dev, &ATTENTION, &format!("attn_fwd_mma_d{d}"))?;
        let smem = fwd_smem(d);
        allow_shared(&f, smem)?;
        let cfg = mma_cfg(t, nh, b, smem);
        let (ti, si, nhi, nkvi) = (t as i32, s as i32, nh as i32, nkv as i32);
        launch!(
            dev, f, cfg, pq, pk, pv, pseg, plo, pruns, po, plse, ti, si, nhi, nkvi, sc
        )?;
    } else {
        if d > MAX_D {
            bail!("{OP}: head dim {d} is above the {MAX_D} the CUDA kernels support")
        }
        let f = func(
            &dev,
            &ATTENTION,
            &format!("attn_fwd_simt_{}", suffix(OP, dt)?),
        )?;
        let cfg = grid_1d(b * nh * t, 128);
        let dims = [b, t, s, nh, nkv, d].map(|x| x as i32);
        launch!(
            dev, f, cfg, pq, pk, pv, pseg, plo, po, plse, dims[0], dims[1], dims[2], dims[3],
            dims[4], dims[5], sc
        )?;
    }
    Ok((o, lse_t))
}

/// (dq, dk, dv), each only when asked for; every tensor contiguous.
#[allow(clippy::too_many_arguments)]
pub(crate) fn bwd(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    o: &Tensor,
    dout: &Tensor,
    lse: &Tensor,
    dm: Dims,
    masks: &Masks,
    scale: f64,
    kernel: Kernel,
    need: [bool; 3],
) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
    let dt = q.dtype();
    let Dims {
        b,
        t,
        s,
        nh,
        nkv,
        d,
    } = dm;
    let dev = q.device().as_cuda_device()?.clone();
    let (dq, pdq) = alloc(&dev, dt, if need[0] { b * t * nh * d } else { 1 }, true)?;
    let need_kv = need[1] || need[2];
    let kv_n = if need_kv { b * s * nkv * d } else { 1 };
    let (dk, pdk) = alloc(&dev, dt, kv_n, true)?;
    let (dv, pdv) = alloc(&dev, dt, kv_n, true)?;
    if b * t * nh * d > 0 && s > 0 && (need[0] || need_kv) {
        let dout = dout.to_dtype(dt)?.contiguous()?;
        let (pq, pk, pv, po, pdo, plse) = (
            tptr(q, OP)?,
            tptr(k, OP)?,
            tptr(v, OP)?,
            tptr(o, OP)?,
            tptr(&dout, OP)?,
            tptr(lse, OP)?,
        );
        let (pseg, plo, phi) = (
            tptr(&masks.seg, OP)?,
            tptr(&masks.lo, OP)?,
            tptr(&masks.hi, OP)?,
        );
        let sfx = suffix(OP, dt)?;
        // delta = rowsum(dO * O), f32, one warp per row.
        let rows = b * t * nh;
        let (delta, pdelta) = alloc(&dev, DType::F32, rows, false)?;
        let f = func(&dev, &ATTENTION, &format!("attn_delta_{sfx}"))?;
        launch!(
            dev,
            f,
            grid_1d(rows * 32, 256),
            po,
            pdo,
            pdelta,
            rows as i64,
            d as i32
        )?;
        let sc = scale as f32;
        let (ti, si, nhi, nkvi) = (t as i32, s as i32, nh as i32, nkv as i32);
        let ptrs = [pq, pk, pv, pdo, pdq, pdk, pdv];
        if use_mma(&dev, dt, d, kernel, &ptrs)? {
            if need[0] {
                let f = func(&dev, &ATTENTION, &format!("attn_dq_mma_d{d}"))?;
                let smem = dq_smem(d);
                allow_shared(&f, smem)?;
                let cfg = mma_cfg(t, nh, b, smem);
                launch!(
                    dev, f, cfg, pq, pk, pv, pdo, plse, pdelta, pseg, plo, pdq, ti, si, nhi, nkvi,
                    sc
                )?;
            }
            if need_kv {
                let f = func(&dev, &ATTENTION, &format!("attn_dkdv_mma_d{d}"))?;
                let smem = dkdv_smem(d);
                allow_shared(&f, smem)?;
                let cfg = mma_cfg(s, nkv, b, smem);
                launch!(
                    dev, f, cfg, pq, pk, pv, pdo, plse, pdelta, pseg, phi, pdk, pdv, ti, si, nhi,
                    nkvi, sc
                )?;
            }
        } else {
            if d > MAX_D {
                bail!("{OP}: head dim {d} is above the {MAX_D} the CUDA kernels support")
            }
            let (bi, di) = (b as i32, d as i32);
            if need[0] {
                let f = func(&dev, &ATTENTION, &format!("attn_dq_simt_{sfx}"))?;
                launch!(
                    dev,
                    f,
                    grid_1d(b * nh * t, 128),
                    pq,
                    pk,
                    pv,
                    pdo,
                    plse,
                    pdelta,
                    pseg,
                    plo,
                    pdq,
                    bi,
                    ti,
                    si,
                    nhi,
                    nkvi,
                    di,
                    sc
                )?;
            }
            if need_kv {
                let f = func(&dev, &ATTENTION, &format!("attn_dkdv_simt_{sfx}"))?;
                launch!(
                    dev,
                    f,
                    grid_1d(b * nkv * s, 128),
                    pq,
                    pk,
                    pv,
                    pdo,
                    plse,
                    pdelta,
                    pseg,
                    phi,
                    pdk,
                    pdv,
                    bi,
                    ti,
                    si,
                    nhi,
                    nkvi,
                    di,
                    sc
                )?;
            }
        }
        drop(delta);
    }
    let pick = |st: CudaStorage, want: bool, like: &Tensor| want.then(|| tensor(st, like.shape()));
    Ok((
        pick(dq, need[0], q),
        pick(dk, need[1], k),
        pick(dv, need[2], v),
    ))
}
