//! A LoRA linear (Hu et al. 2021, arXiv:2106.09685) in one graph node: [`lora_linear`] and its
//! CPU op, whose forward stashes the down projection for the backward.

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp3, DType, Layout, Result, Shape, Tensor, WithDType, bail};

use super::{Stash, mat2, vec_tensor, with_last_dim};
use crate::cpu::{self, Float, Host, contiguous, dispatch_float};
use crate::linear;

/// A LoRA linear: `x @ w^T [+ bias] + scale * ((x * mask) @ a^T) @ b^T` (PEFT's
/// `result + lora_B(lora_A(dropout(x))) * scaling`). x: (.., IN), w: (OUT, IN) frozen,
/// bias: (OUT) frozen, a: (R, IN), b: (OUT, R), mask: x's shape (the inverted-dropout mask, or
/// none) -> (.., OUT). Gradients flow to x, a and b.
///
/// On the CPU this is one op with its own backward, where the composed version is five graph
/// nodes; each node costs candle's backward a zero-filled gradient buffer and an add of the
/// size of its output, which on a SmolLM2 step ran single-threaded for a fifth of the wall time.
/// Elsewhere, or when w or the bias track a gradient, it is the composed version.
pub fn lora_linear(
    x: &Tensor,
    w: &Tensor,
    bias: Option<&Tensor>,
    (a, b): (&Tensor, &Tensor),
    scale: f64,
    mask: Option<&Tensor>,
) -> Result<Tensor> {
    let frozen = !w.track_op() && bias.is_none_or(|b| !b.track_op());
    if !x.device().is_cpu() || !frozen || !matches!(x.dtype(), DType::F32 | DType::F64) {
        let y = linear(x, w, bias)?;
        let x_in = match mask {
            Some(m) => (x * m)?,
            None => x.clone(),
        };
        let up = linear(&linear(&x_in, a, None)?, b, None)?;
        return y + (up * scale)?;
    }
    if let Some(m) = mask
        && m.dims() != x.dims()
    {
        bail!(
            "lora_linear: mask {:?} is not x's shape {:?}",
            m.dims(),
            x.dims()
        )
    }
    let op = LoraLinear {
        w: w.clone(),
        bias: bias.cloned(),
        mask: mask.map(|m| m.detach()),
        scale,
        down: Stash::default(),
    };
    x.contiguous()?.apply_op3(a, b, op)
}

/// A LoRA linear in one op: `x @ w^T [+ bias] + scale * ((x * mask) @ a^T) @ b^T`, with
/// (x (.., IN) contiguous, a (R, IN), b (OUT, R)) as the tracked arguments and the frozen w
/// (OUT, IN), bias (OUT) and dropout mask (x's shape, already scaled by 1 / (1 - p)) in the
/// struct. One graph node instead of five (base, down, up, scale, add), so candle's backward
/// allocates, zero-fills and adds one gradient of (.., OUT) instead of four.
struct LoraLinear {
    w: Tensor,
    bias: Option<Tensor>,
    mask: Option<Tensor>,
    scale: f64,
    /// `scale * (x * mask) @ a^T` (M, R) from the forward, taken by the backward (a second
    /// backward computes it again).
    down: Stash<Tensor>,
}

impl LoraLinear {
    /// (x * mask) as an owned copy when there is a mask.
    fn masked<T: Float>(&self, x: &[T]) -> Result<Option<Vec<T>>> {
        let Some(mask) = &self.mask else {
            return Ok(None);
        };
        let mask = mask.contiguous()?;
        let mh = Host::new(&mask, "whet-lora-linear")?;
        let m = mh.slice::<T>()?;
        if m.len() != x.len() {
            bail!(
                "whet-lora-linear: mask has {} values for {} of x",
                m.len(),
                x.len()
            )
        }
        Ok(Some(x.iter().zip(m).map(|(a, b)| *a * *b).collect()))
    }
}

impl CustomOp3 for LoraLinear {
    fn name(&self) -> &'static str {
        "whet-lora-linear"
    }

    fn cpu_fwd(
        &self,
        sx: &CpuStorage,
        lx: &Layout,
        sa: &CpuStorage,
        la: &Layout,
        sb: &CpuStorage,
        lb: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let name = self.name();
        let (n_out, n_in) = self.w.dims2()?;
        let (r, a_in) = la.shape().dims2()?;
        let (b_out, b_r) = lb.shape().dims2()?;
        let xd = lx.dims();
        if xd.last() != Some(&n_in) || a_in != n_in || b_out != n_out || b_r != r {
            bail!(
                "{name}: x {xd:?}, w {:?}, a {:?}, b {:?} do not fit (.., IN), (OUT, IN), (R, IN), (OUT, R)",
                self.w.dims(),
                la.dims(),
                lb.dims()
            )
        }
        let m = lx.shape().elem_count() / n_in.max(1);
        let (ws, wl) = self.w.storage_and_layout();
        let candle_core::Storage::Cpu(ws) = &*ws else {
            bail!("{name}: w is not on the CPU")
        };
        let bias = self.bias.as_ref().map(|b| b.contiguous()).transpose()?;
        let bias_host = bias.as_ref().map(|b| Host::new(b, name)).transpose()?;
        dispatch_float!(sx.dtype(), name, |F| {
            let x = contiguous::<F>(sx, lx, name)?;
            let w = mat2::<F>(ws, wl)?; // (OUT, IN)
            let bias = bias_host.as_ref().map(|h| h.slice::<F>()).transpose()?;
            let xm = self.masked(x)?;
            let xin = cpu::Mat::row_major(xm.as_deref().unwrap_or(x), n_in);
            // down (M, R) = scale * x_in @ a^T
            let mut down = cpu::matmul(xin, mat2::<F>(sa, la)?.t(), m, r, n_in);
            cpu::scal(&mut down, F::from_f64(self.scale));
            // y (M, OUT) = x @ w^T [+ bias] + down @ b^T, the update reduced with the product
            let bt = mat2::<F>(sb, lb)?.t();
            let up = (cpu::Mat::row_major(&down, r), bt, r);
            let (shape, stride) = ((m, n_in, n_out), [w.rs, w.cs]);
            let y = cpu::linear::fwd_plus(x, w.data, stride, bias, shape, Some(up));
            self.down.put(vec_tensor(down, &Shape::from((m, r)))?);
            Ok((F::to_cpu_storage_owned(y), with_last_dim(xd, n_out)))
        })
    }

    fn bwd(
        &self,
        x: &Tensor,
        a: &Tensor,
        b: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let name = self.name();
        let (n_out, n_in) = self.w.dims2()?;
        let r = a.dim(0)?;
        let m = x.elem_count() / n_in.max(1);
        let down = self.down.take();
        let grad = grad.contiguous()?;
        let x = x.contiguous()?;
        let (gh, xh) = (Host::new(&grad, name)?, Host::new(&x, name)?);
        let (ws, wl) = self.w.storage_and_layout();
        let candle_core::Storage::Cpu(ws) = &*ws else {
            bail!("{name}: w is not on the CPU")
        };
        let (sa, la) = a.storage_and_layout();
        let (sb, lb) = b.storage_and_layout();
        let (candle_core::Storage::Cpu(sa), candle_core::Storage::Cpu(sb)) = (&*sa, &*sb) else {
            bail!("{name}: a and b must be on the CPU")
        };
        dispatch_float!(x.dtype(), name, |F| {
            let g = gh.slice::<F>()?; // (M, OUT)
            let xs = xh.slice::<F>()?; // (M, IN)
            let (w, am, bm) = (mat2::<F>(ws, wl)?, mat2::<F>(sa, la)?, mat2::<F>(sb, lb)?);
            let s = F::from_f64(self.scale);
            let xm = self.masked(xs)?;
            let xin = cpu::Mat::row_major(xm.as_deref().unwrap_or(xs), n_in);
            let down = match down {
                Some(t) => t.flatten_all()?.to_vec1::<F>()?,
                None => {
                    let mut d = cpu::matmul(xin, am.t(), m, r, n_in);
                    cpu::scal(&mut d, s);
                    d
                }
            };
            let gm = cpu::Mat::row_major(g, n_out); // (M, OUT)
            // g_down (M, R) = scale * g @ b
            let mut gd = cpu::matmul(gm, bm, m, r, n_out);
            cpu::scal(&mut gd, s);
            let gdm = cpu::Mat::row_major(&gd, r);
            // db (OUT, R) = g^T @ down
            let db = b.track_op().then(|| {
                let db = cpu::matmul(gm.t(), cpu::Mat::row_major(&down, r), n_out, r, m);
                vec_tensor(db, b.shape())
            });
            // da (R, IN) = g_down^T @ x_in
            let da = a
                .track_op()
                .then(|| vec_tensor(cpu::matmul(gdm.t(), xin, r, n_in, m), a.shape()));
            let dx = if x.track_op() {
                // dx (M, IN) = g @ w + (g_down @ a) * mask
                let dx = match &self.mask {
                    None => cpu::matmul_plus((gm, w, n_out), Some((gdm, am, r)), m, n_in),
                    Some(mask) => {
                        let mut dx = cpu::matmul(gm, w, m, n_in, n_out);
                        let lora = cpu::matmul(gdm, am, m, n_in, r);
                        let mask = mask.contiguous()?;
                        let mh = Host::new(&mask, name)?;
                        for ((d, l), k) in dx.iter_mut().zip(&lora).zip(mh.slice::<F>()?) {
                            *d += *l * *k;
                        }
                        dx
                    }
                };
                Some(vec_tensor(dx, x.shape())?)
            } else {
                None
            };
            let (da, db) = (da.transpose()?, db.transpose()?);
            Ok((dx, da, db))
        })
    }
}
