//! Fused multi-tensor AdamW on CUDA (`kernels/adamw.cu`): every parameter updated by one
//! launch, each element read and written once (param, grad, m, v), the gradient scale folded
//! in. The arithmetic is whet-optim's CPU AdamW, element for element.

use candle_core::backend::BackendDevice;
use candle_core::{CudaDevice, DType, Device, Result, Tensor, bail};

use super::{ADAMW, func, launch, suffix, tptr};

const OP: &str = "whet-adamw";
/// Elements per block.
const CHUNK: usize = 1 << 14;

/// The per-step scalars of [`MultiTensorAdamW::step`], torch's folded constants:
/// `m = b1 m + (1 - b1) g`, `v = b2 v + (1 - b2) g^2` (g = grad * `grad_scale`),
/// `p = p * decay - step_size * m / (sqrt(v) / bc2_sqrt + eps)` with `decay` only for the
/// parameters created with decay on.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AdamWHyper {
    pub beta1: f32,
    pub beta2: f32,
    pub eps: f32,
    /// lr / (1 - beta1^t)
    pub step_size: f32,
    /// sqrt(1 - beta2^t)
    pub bc2_sqrt: f32,
    pub grad_scale: f32,
    /// 1 - lr * weight_decay
    pub decay: f32,
}

/// AdamW state for f32 parameters on one CUDA device: the moments (f32, on the device) and the
/// launch tables, built once. Parameters are updated in place.
pub struct MultiTensorAdamW {
    dev: CudaDevice,
    params: Vec<Tensor>,
    m: Vec<Tensor>,
    v: Vec<Tensor>,
    decays: Vec<bool>,
    tables: Tables,
}

/// Device-side addresses and the block -> (tensor, start) map (i64 / u32 tensors: candle has
/// no u64 dtype; the bits are the same).
struct Tables {
    params: Tensor,
    m: Tensor,
    v: Tensor,
    sizes: Tensor,
    decays: Tensor,
    block_tensor: Tensor,
    block_start: Tensor,
    blocks: usize,
}

fn check(dev: &CudaDevice, t: &Tensor, what: &str) -> Result<()> {
    match t.device() {
        Device::Cuda(d) if d.same_device(dev) => {}
        other => bail!("{OP}: {what} is on {other:?}, not on the optimizer's CUDA device"),
    }
    if t.dtype() != DType::F32 || !t.is_contiguous() {
        bail!(
            "{OP}: {what} must be a contiguous f32 tensor, got {:?} (contiguous: {})",
            t.dtype(),
            t.is_contiguous()
        )
    }
    Ok(())
}

impl Tables {
    fn build(
        dev: &CudaDevice,
        params: &[Tensor],
        m: &[Tensor],
        v: &[Tensor],
        decays: &[bool],
    ) -> Result<Self> {
        let device = Device::Cuda(dev.clone());
        let addrs = |ts: &[Tensor]| -> Result<Tensor> {
            let a = ts
                .iter()
                .map(|t| tptr(t, OP).map(|p| p as i64))
                .collect::<Result<Vec<i64>>>()?;
            Tensor::from_vec(a, ts.len(), &device)
        };
        let mut bt = Vec::new();
        let mut bs = Vec::new();
        for (i, p) in params.iter().enumerate() {
            let n = p.elem_count();
            for s in (0..n).step_by(CHUNK) {
                bt.push(i as u32);
                bs.push(s as i64);
            }
        }
        let sizes: Vec<i64> = params.iter().map(|p| p.elem_count() as i64).collect();
        let dec: Vec<u32> = decays.iter().map(|&d| d as u32).collect();
        let blocks = bt.len();
        Ok(Tables {
            params: addrs(params)?,
            m: addrs(m)?,
            v: addrs(v)?,
            sizes: Tensor::from_vec(sizes, params.len(), &device)?,
            decays: Tensor::from_vec(dec, params.len(), &device)?,
            block_tensor: Tensor::from_vec(bt, blocks, &device)?,
            block_start: Tensor::from_vec(bs, blocks, &device)?,
            blocks,
        })
    }
}

impl MultiTensorAdamW {
    /// `params`: contiguous f32 tensors on one CUDA device (the optimizer's `Var`s);
    /// `decays[i]`: whether weight decay applies to `params[i]`. Moments start at zero.
    pub fn new(params: Vec<Tensor>, decays: Vec<bool>) -> Result<Self> {
        let Some(first) = params.first() else {
            bail!("{OP}: no parameters")
        };
        let dev = first.device().as_cuda_device()?.clone();
        if decays.len() != params.len() {
            bail!(
                "{OP}: {} decay flags for {} parameters",
                decays.len(),
                params.len()
            )
        }
        for (i, p) in params.iter().enumerate() {
            check(&dev, p, &format!("parameter {i}"))?;
        }
        let zeros = |p: &Tensor| p.zeros_like();
        let m = params.iter().map(zeros).collect::<Result<Vec<_>>>()?;
        let v = params.iter().map(zeros).collect::<Result<Vec<_>>>()?;
        let tables = Tables::build(&dev, &params, &m, &v, &decays)?;
        Ok(Self {
            dev,
            params,
            m,
            v,
            decays,
            tables,
        })
    }

    /// The first and second moments, one f32 tensor per parameter.
    pub fn moments(&self) -> (&[Tensor], &[Tensor]) {
        (&self.m, &self.v)
    }

    /// Replaces the moments (a resumed run); each must match its parameter's shape.
    pub fn set_moments(&mut self, m: Vec<Tensor>, v: Vec<Tensor>) -> Result<()> {
        if m.len() != self.params.len() || v.len() != self.params.len() {
            bail!(
                "{OP}: moments for {} / {} of {} parameters",
                m.len(),
                v.len(),
                self.params.len()
            )
        }
        let device = Device::Cuda(self.dev.clone());
        let fit = |t: Tensor, p: &Tensor| -> Result<Tensor> {
            if t.dims() != p.dims() {
                bail!(
                    "{OP}: a moment of shape {:?} for a parameter of shape {:?}",
                    t.dims(),
                    p.dims()
                )
            }
            // A fresh, contiguous f32 copy on the device, owned by the optimizer.
            t.to_device(&device)?
                .to_dtype(DType::F32)?
                .contiguous()?
                .copy()
        };
        self.m = m
            .into_iter()
            .zip(&self.params)
            .map(|(t, p)| fit(t, p))
            .collect::<Result<_>>()?;
        self.v = v
            .into_iter()
            .zip(&self.params)
            .map(|(t, p)| fit(t, p))
            .collect::<Result<_>>()?;
        self.tables = Tables::build(&self.dev, &self.params, &self.m, &self.v, &self.decays)?;
        Ok(())
    }

    /// One update of every parameter that has a gradient (`None`: skipped). Gradients have
    /// their parameter's shape, f32 or bf16 (all the same dtype).
    pub fn step(&self, grads: &[Option<Tensor>], h: &AdamWHyper) -> Result<()> {
        if grads.len() != self.params.len() {
            bail!(
                "{OP}: {} gradients for {} parameters",
                grads.len(),
                self.params.len()
            )
        }
        let dt = grads
            .iter()
            .flatten()
            .map(|g| g.dtype())
            .next()
            .unwrap_or(DType::F32);
        let sfx = suffix(OP, dt)?;
        let mut keep = Vec::with_capacity(grads.len());
        let mut addrs = Vec::with_capacity(grads.len());
        for (i, (g, p)) in grads.iter().zip(&self.params).enumerate() {
            match g {
                None => addrs.push(0i64),
                Some(g) => {
                    if g.dims() != p.dims() || g.dtype() != dt {
                        bail!(
                            "{OP}: gradient {i} is {:?} {:?}, its parameter {:?} (gradients share one dtype)",
                            g.dims(),
                            g.dtype(),
                            p.dims()
                        )
                    }
                    let g = g.contiguous()?;
                    addrs.push(tptr(&g, OP)? as i64);
                    keep.push(g);
                }
            }
        }
        if self.tables.blocks == 0 {
            return Ok(());
        }
        let device = Device::Cuda(self.dev.clone());
        let gt = Tensor::from_vec(addrs, grads.len(), &device)?;
        let t = &self.tables;
        let ptrs = [
            tptr(&t.params, OP)?,
            tptr(&gt, OP)?,
            tptr(&t.m, OP)?,
            tptr(&t.v, OP)?,
            tptr(&t.sizes, OP)?,
            tptr(&t.decays, OP)?,
            tptr(&t.block_tensor, OP)?,
            tptr(&t.block_start, OP)?,
        ];
        let f = func(&self.dev, &ADAMW, &format!("adamw_{sfx}"))?;
        let mut cfg = super::grid_1d(1, 256);
        cfg.grid_dim.0 = t.blocks as u32;
        launch!(
            self.dev,
            f,
            cfg,
            ptrs[0],
            ptrs[1],
            ptrs[2],
            ptrs[3],
            ptrs[4],
            ptrs[5],
            ptrs[6],
            ptrs[7],
            CHUNK as i32,
            h.beta1,
            h.beta2,
            h.eps,
            h.step_size,
            h.bc2_sqrt,
            h.grad_scale,
            h.decay
        )?;
        // The gradients and the address table stay alive until here; their buffers are freed
        // in stream order, after the launch.
        drop(keep);
        drop(gt);
        Ok(())
    }
}
