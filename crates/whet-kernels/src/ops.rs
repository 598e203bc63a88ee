//! The candle custom ops behind the public functions. Each struct implements `cpu_fwd`
//! (dispatching to [`crate::cpu`]), `cuda_fwd` with the `cuda` feature (dispatching to
//! `crate::cuda`), and `bwd`, which picks the CPU or CUDA kernels by the device of its inputs.
//!
//! Arguments arrive contiguous (the public functions make them so) except where a kernel takes
//! strides (`rope`'s x, the weight of `linear` and of the LM head).
//!
//! `bwd` computes only the gradients of arguments that track one (`Tensor::track_op`): a frozen
//! weight gets no gradient and costs nothing.

use std::sync::{Arc, Mutex};

#[cfg(feature = "cuda")]
use candle_core::CudaStorage;
use candle_core::backend::BackendStorage;
use candle_core::{
    CpuStorage, CustomOp2, CustomOp3, DType, Device, Layout, Result, Shape, Tensor, WithDType, bail,
};

use crate::cpu::{self, Float, Host, contiguous, dispatch_float};

fn vec_tensor<T: WithDType>(v: Vec<T>, shape: &Shape) -> Result<Tensor> {
    Tensor::from_vec(v, shape.clone(), &Device::Cpu)
}

fn opt_tensor<T: WithDType>(v: Option<Vec<T>>, shape: &Shape) -> Result<Option<Tensor>> {
    v.map(|v| vec_tensor(v, shape)).transpose()
}

fn same_dtype(op: &str, a: DType, b: DType) -> Result<()> {
    if a != b {
        bail!("{op}: dtype mismatch, {a:?} and {b:?}")
    }
    Ok(())
}

/// The scalar value of a 0-dim (or one-element) gradient.
fn scalar<T: Float>(g: &Tensor) -> Result<T> {
    g.flatten_all()?
        .to_dtype(T::DTYPE)?
        .to_vec1::<T>()?
        .first()
        .copied()
        .ok_or_else(|| candle_core::Error::Msg("empty gradient".into()))
}

// ---------------------------------------------------------------------------------------------

/// RMSNorm: (x (.., H), weight (H)).
pub(crate) struct RmsNorm {
    pub eps: f64,
}

impl CustomOp2 for RmsNorm {
    fn name(&self) -> &'static str {
        "whet-rms-norm"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        same_dtype(self.name(), s1.dtype(), s2.dtype())?;
        dispatch_float!(s1.dtype(), self.name(), |F| {
            let x = contiguous::<F>(s1, l1, self.name())?;
            let w = contiguous::<F>(s2, l2, self.name())?;
            Ok((
                F::to_cpu_storage_owned(cpu::rms_norm::fwd(x, w, F::from_f64(self.eps))),
                l1.shape().clone(),
            ))
        })
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &CudaStorage,
        l1: &Layout,
        s2: &CudaStorage,
        l2: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        let y = crate::cuda::rms_norm::fwd(s1, l1, s2, l2, self.eps)?;
        Ok((y, l1.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let (need_dx, need_dw) = (x.track_op(), w.track_op());
        let grad = grad.contiguous()?;
        #[cfg(feature = "cuda")]
        if x.device().is_cuda() {
            return crate::cuda::rms_norm::bwd(x, w, &grad, self.eps, need_dx, need_dw);
        }
        dispatch_float!(x.dtype(), self.name(), |F| {
            let (hx, hw, hg) = (
                Host::new(x, self.name())?,
                Host::new(w, self.name())?,
                Host::new(&grad, self.name())?,
            );
            let (dx, dw) = cpu::rms_norm::bwd(
                hx.slice::<F>()?,
                hw.slice::<F>()?,
                hg.slice::<F>()?,
                F::from_f64(self.eps),
                need_dx,
                need_dw,
            );
            Ok((opt_tensor(dx, x.shape())?, opt_tensor(dw, w.shape())?))
        })
    }
}

// ---------------------------------------------------------------------------------------------

/// Rotary embedding: (x (B, T, NH, D), cos (B, T, D/2), sin (B, T, D/2)).
pub(crate) struct Rope;

impl Rope {
    fn dims(l: &Layout) -> Result<cpu::rope::Dims> {
        let (b, t, nh, d) = l.shape().dims4()?;
        let st = l.stride();
        if st[3] != 1 && d > 1 {
            bail!("whet-rope: x needs a unit stride on its last dim, got strides {st:?}")
        }
        Ok(cpu::rope::Dims {
            b,
            t,
            nh,
            d,
            stride: [st[0], st[1], st[2]],
        })
    }
}

impl CustomOp3 for Rope {
    fn name(&self) -> &'static str {
        "whet-rope"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        same_dtype(self.name(), s1.dtype(), s2.dtype())?;
        same_dtype(self.name(), s1.dtype(), s3.dtype())?;
        let dm = Self::dims(l1)?;
        dispatch_float!(s1.dtype(), self.name(), |F| {
            let x = &s1.as_slice::<F>()?[l1.start_offset()..];
            let cos = contiguous::<F>(s2, l2, self.name())?;
            let sin = contiguous::<F>(s3, l3, self.name())?;
            let y = cpu::rope::apply(x, cos, sin, dm, F::ONE);
            Ok((F::to_cpu_storage_owned(y), l1.shape().clone()))
        })
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &CudaStorage,
        l1: &Layout,
        s2: &CudaStorage,
        l2: &Layout,
        s3: &CudaStorage,
        l3: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        let y = crate::cuda::rope::apply(s1, l1, s2, l2, s3, l3, 1.0)?;
        Ok((y, l1.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        cos: &Tensor,
        sin: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        if !x.track_op() {
            return Ok((None, None, None));
        }
        let grad = grad.contiguous()?;
        #[cfg(feature = "cuda")]
        if x.device().is_cuda() {
            return Ok((Some(crate::cuda::rope::bwd(&grad, cos, sin)?), None, None));
        }
        let dm = Self::dims(grad.layout())?;
        dispatch_float!(x.dtype(), self.name(), |F| {
            let (hg, hc, hs) = (
                Host::new(&grad, self.name())?,
                Host::new(cos, self.name())?,
                Host::new(sin, self.name())?,
            );
            let dx = cpu::rope::apply(
                hg.slice::<F>()?,
                hc.slice::<F>()?,
                hs.slice::<F>()?,
                dm,
                -F::ONE,
            );
            Ok((Some(vec_tensor(dx, x.shape())?), None, None))
        })
    }
}

// ---------------------------------------------------------------------------------------------

/// Attention: (q (B, T, NH, D), k (B, S, NKV, D), v (B, S, NKV, D)); the segments travel in
/// the struct. The forward leaves its per-row logsumexp in `lse` for the backward.
pub(crate) struct Attention {
    pub scale: f64,
    pub mask: AttentionMask,
    /// (B, T, NH), set by the forward.
    pub lse: Mutex<Option<Tensor>>,
}

/// The segment mask in the form the device's kernels read.
pub(crate) enum AttentionMask {
    Cpu(Arc<cpu::attention::Windows>),
    #[cfg(feature = "cuda")]
    Cuda(
        Arc<crate::cuda::attention::Masks>,
        crate::cuda::attention::Kernel,
    ),
}

impl Attention {
    fn dims(lq: &Layout, lk: &Layout, lv: &Layout) -> Result<cpu::attention::Dims> {
        let (b, t, nh, d) = lq.shape().dims4()?;
        let (bk, s, nkv, dk) = lk.shape().dims4()?;
        if lk.shape() != lv.shape() || bk != b || dk != d || s < t || nkv == 0 || nh % nkv != 0 {
            bail!(
                "whet-attention: expected q (B, T, NH, D), k and v (B, S, NKV, D) with S >= T and NH a multiple of NKV, got q {:?} k {:?} v {:?}",
                lq.dims(),
                lk.dims(),
                lv.dims()
            )
        }
        Ok(cpu::attention::Dims {
            b,
            t,
            s,
            nh,
            nkv,
            d,
        })
    }

    fn stash(&self, lse: Tensor) {
        // A poisoned lock only means another thread panicked mid-store; the value is replaced.
        *self.lse.lock().unwrap_or_else(|e| e.into_inner()) = Some(lse);
    }

    fn stashed(&self) -> Option<Tensor> {
        self.lse.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    fn windows(&self) -> Result<&cpu::attention::Windows> {
        match &self.mask {
            AttentionMask::Cpu(w) => Ok(w),
            #[cfg(feature = "cuda")]
            AttentionMask::Cuda(..) => {
                bail!("whet-attention: the mask was built for a CUDA device")
            }
        }
    }

    #[cfg(feature = "cuda")]
    fn cuda_masks(
        &self,
    ) -> Result<(
        &crate::cuda::attention::Masks,
        crate::cuda::attention::Kernel,
    )> {
        match &self.mask {
            AttentionMask::Cuda(m, k) => Ok((m, *k)),
            AttentionMask::Cpu(_) => bail!("whet-attention: the mask was built for the CPU"),
        }
    }
}

impl CustomOp3 for Attention {
    fn name(&self) -> &'static str {
        "whet-attention"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        same_dtype(self.name(), s1.dtype(), s2.dtype())?;
        same_dtype(self.name(), s1.dtype(), s3.dtype())?;
        let dm = Self::dims(l1, l2, l3)?;
        dispatch_float!(s1.dtype(), self.name(), |F| {
            let q = contiguous::<F>(s1, l1, self.name())?;
            let k = contiguous::<F>(s2, l2, self.name())?;
            let v = contiguous::<F>(s3, l3, self.name())?;
            let (o, lse) =
                cpu::attention::fwd(q, k, v, self.windows()?, dm, F::from_f64(self.scale));
            self.stash(Tensor::from_vec(lse, (dm.b, dm.t, dm.nh), &Device::Cpu)?);
            Ok((F::to_cpu_storage_owned(o), l1.shape().clone()))
        })
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &CudaStorage,
        l1: &Layout,
        s2: &CudaStorage,
        l2: &Layout,
        s3: &CudaStorage,
        l3: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        let dm = Self::dims(l1, l2, l3)?;
        let (masks, kernel) = self.cuda_masks()?;
        let (o, lse) =
            crate::cuda::attention::fwd(s1, l1, s2, l2, s3, l3, dm, masks, self.scale, kernel)?;
        self.stash(lse);
        Ok((o, l1.shape().clone()))
    }

    fn bwd(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let dm = Self::dims(q.layout(), k.layout(), v.layout())?;
        let (res, grad) = (res.contiguous()?, grad.contiguous()?);
        let name = self.name();
        #[cfg(feature = "cuda")]
        if q.device().is_cuda() {
            use crate::cuda::with_storage;
            let (masks, kernel) = self.cuda_masks()?;
            let lse = match self.stashed() {
                Some(lse) => lse,
                // Not reached through apply_op3 (the forward always stashes), as on the CPU.
                None => with_storage(q, name, |sq, lq| {
                    with_storage(k, name, |sk, lk| {
                        with_storage(v, name, |sv, lv| {
                            crate::cuda::attention::fwd(
                                sq, lq, sk, lk, sv, lv, dm, masks, self.scale, kernel,
                            )
                            .map(|(_, lse)| lse)
                        })
                    })
                })?,
            };
            let need = [q.track_op(), k.track_op(), v.track_op()];
            return crate::cuda::attention::bwd(
                q, k, v, &res, &grad, &lse, dm, masks, self.scale, kernel, need,
            );
        }
        dispatch_float!(q.dtype(), name, |F| {
            let (hq, hk, hv) = (
                Host::new(q, name)?,
                Host::new(k, name)?,
                Host::new(v, name)?,
            );
            let (q_, k_, v_) = (hq.slice::<F>()?, hk.slice::<F>()?, hv.slice::<F>()?);
            let scale = F::from_f64(self.scale);
            let lse = match self.stashed() {
                Some(lse) => lse,
                // Not reached through apply_op3 (the forward always stashes); kept so the op
                // stays correct if the forward ever runs elsewhere.
                None => {
                    let (_, lse) = cpu::attention::fwd(q_, k_, v_, self.windows()?, dm, scale);
                    Tensor::from_vec(lse, (dm.b, dm.t, dm.nh), &Device::Cpu)?
                }
            };
            let (ho, hg, hl) = (
                Host::new(&res, name)?,
                Host::new(&grad, name)?,
                Host::new(&lse, name)?,
            );
            let (dq, dk, dv) = cpu::attention::bwd(
                q_,
                k_,
                v_,
                ho.slice::<F>()?,
                hg.slice::<F>()?,
                hl.slice::<F>()?,
                self.windows()?,
                dm,
                scale,
            );
            let pick = |t: &Tensor, g: Vec<F>| {
                if t.track_op() {
                    vec_tensor(g, t.shape()).map(Some)
                } else {
                    Ok(None)
                }
            };
            Ok((pick(q, dq)?, pick(k, dk)?, pick(v, dv)?))
        })
    }
}

// ---------------------------------------------------------------------------------------------

/// SwiGLU: (gate (.., I), up (.., I)).
pub(crate) struct Swiglu;

impl CustomOp2 for Swiglu {
    fn name(&self) -> &'static str {
        "whet-swiglu"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        same_dtype(self.name(), s1.dtype(), s2.dtype())?;
        if l1.shape() != l2.shape() {
            bail!(
                "whet-swiglu: gate {:?} and up {:?} differ in shape",
                l1.dims(),
                l2.dims()
            )
        }
        dispatch_float!(s1.dtype(), self.name(), |F| {
            let g = contiguous::<F>(s1, l1, self.name())?;
            let u = contiguous::<F>(s2, l2, self.name())?;
            Ok((
                F::to_cpu_storage_owned(cpu::swiglu::fwd(g, u)),
                l1.shape().clone(),
            ))
        })
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &CudaStorage,
        l1: &Layout,
        s2: &CudaStorage,
        l2: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        Ok((
            crate::cuda::swiglu::fwd(s1, l1, s2, l2)?,
            l1.shape().clone(),
        ))
    }

    fn bwd(
        &self,
        gate: &Tensor,
        up: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let grad = grad.contiguous()?;
        #[cfg(feature = "cuda")]
        if gate.device().is_cuda() {
            return crate::cuda::swiglu::bwd(gate, up, &grad, gate.track_op(), up.track_op());
        }
        dispatch_float!(gate.dtype(), self.name(), |F| {
            let (hg, hu, hd) = (
                Host::new(gate, self.name())?,
                Host::new(up, self.name())?,
                Host::new(&grad, self.name())?,
            );
            let (dg, du) = cpu::swiglu::bwd(
                hg.slice::<F>()?,
                hu.slice::<F>()?,
                hd.slice::<F>()?,
                gate.track_op(),
                up.track_op(),
            );
            Ok((opt_tensor(dg, gate.shape())?, opt_tensor(du, up.shape())?))
        })
    }
}

// ---------------------------------------------------------------------------------------------

/// `x @ w^T [+ bias]`: x (.., IN) contiguous, w (OUT, IN) any strides, bias (OUT).
fn linear_fwd(
    name: &'static str,
    sx: &CpuStorage,
    lx: &Layout,
    sw: &CpuStorage,
    lw: &Layout,
    bias: Option<(&CpuStorage, &Layout)>,
) -> Result<(CpuStorage, Shape)> {
    same_dtype(name, sx.dtype(), sw.dtype())?;
    let (n_out, n_in) = lw.shape().dims2()?;
    let xd = lx.dims();
    if xd.is_empty() || xd[xd.len() - 1] != n_in {
        bail!(
            "{name}: x {xd:?} does not end in IN = {n_in} (w is {:?})",
            lw.dims()
        )
    }
    if let Some((sb, lb)) = bias {
        same_dtype(name, sx.dtype(), sb.dtype())?;
        if lb.dims() != [n_out] {
            bail!("{name}: bias {:?} is not (OUT) = ({n_out})", lb.dims())
        }
    }
    let m = lx.shape().elem_count() / n_in.max(1);
    let mut out_dims = xd.to_vec();
    *out_dims.last_mut().expect("rank >= 1") = n_out;
    dispatch_float!(sx.dtype(), name, |F| {
        let x = contiguous::<F>(sx, lx, name)?;
        let w = &sw.as_slice::<F>()?[lw.start_offset()..];
        let b = bias
            .map(|(sb, lb)| contiguous::<F>(sb, lb, name))
            .transpose()?;
        let st = lw.stride();
        let y = cpu::linear::fwd(x, w, [st[0], st[1]], b, m, n_in, n_out);
        Ok((F::to_cpu_storage_owned(y), Shape::from(out_dims)))
    })
}

/// Gradients of `x @ w^T + b` with candle matmuls (multi-threaded gemm, any device), each only
/// if its argument tracks a gradient.
fn linear_bwd(
    x: &Tensor,
    w: &Tensor,
    b: Option<&Tensor>,
    grad: &Tensor,
) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
    let (n_out, n_in) = w.dims2()?;
    let m = x.elem_count() / n_in.max(1);
    if x.device().is_cpu() && matches!(x.dtype(), DType::F32 | DType::F64) {
        return linear_bwd_cpu(x, w, b, grad, (m, n_in, n_out));
    }
    let g = grad.reshape((m, n_out))?; // (M, OUT)
    let dx = if x.track_op() {
        Some(g.matmul(&w.detach())?.reshape(x.shape())?)
    } else {
        None
    };
    let dw = if w.track_op() {
        Some(g.t()?.matmul(&x.detach().reshape((m, n_in))?)?)
    } else {
        None
    };
    let db = match b {
        Some(b) if b.track_op() => Some(g.sum(0)?),
        _ => None,
    };
    Ok((dx, dw, db))
}

/// [`linear_bwd`] on the CPU: the two products go straight to [`cpu::gemm`] on the tensors'
/// own memory (w in any strides), with no transposed copies.
fn linear_bwd_cpu(
    x: &Tensor,
    w: &Tensor,
    b: Option<&Tensor>,
    grad: &Tensor,
    (m, n_in, n_out): (usize, usize, usize),
) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
    let name = "whet-linear";
    let grad = grad.contiguous()?;
    let gh = Host::new(&grad, name)?;
    let (ws, wl) = w.storage_and_layout();
    let candle_core::Storage::Cpu(ws) = &*ws else {
        bail!("{name}: x on the CPU, w on {:?}", w.device())
    };
    dispatch_float!(x.dtype(), name, |F| {
        let g = gh.slice::<F>()?; // (M, OUT)
        let dx = if x.track_op() {
            // dx (M, IN) = g (M, OUT) @ w (OUT, IN)
            let dx = cpu::matmul(
                cpu::Mat::row_major(g, n_out),
                mat2::<F>(ws, wl)?,
                m,
                n_in,
                n_out,
            );
            Some(vec_tensor(dx, x.shape())?)
        } else {
            None
        };
        let dw = if w.track_op() {
            // dw (OUT, IN) = g^T (OUT, M) @ x (M, IN)
            let x = x.contiguous()?;
            let xh = Host::new(&x, name)?;
            let xm = cpu::Mat::row_major(xh.slice::<F>()?, n_in);
            let dw = cpu::matmul(cpu::Mat::transposed(g, n_out), xm, n_out, n_in, m);
            Some(vec_tensor(dw, w.shape())?)
        } else {
            None
        };
        let db = match b {
            Some(b) if b.track_op() => Some(grad.reshape((m, n_out))?.sum(0)?),
            _ => None,
        };
        Ok((dx, dw, db))
    })
}

/// `x @ w^T`.
pub(crate) struct Linear;

impl CustomOp2 for Linear {
    fn name(&self) -> &'static str {
        "whet-linear"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        linear_fwd(self.name(), s1, l1, s2, l2, None)
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &CudaStorage,
        l1: &Layout,
        s2: &CudaStorage,
        l2: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        crate::cuda::linear::fwd(s1, l1, s2, l2)
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let (dx, dw, _) = linear_bwd(x, w, None, grad)?;
        Ok((dx, dw))
    }
}

/// `x @ w^T + bias`.
pub(crate) struct LinearBias;

impl CustomOp3 for LinearBias {
    fn name(&self) -> &'static str {
        "whet-linear-bias"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        linear_fwd(self.name(), s1, l1, s2, l2, Some((s3, l3)))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        b: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        linear_bwd(x, w, Some(b), grad)
    }
}

// ---------------------------------------------------------------------------------------------

fn targets_of(name: &str, s: &CpuStorage, l: &Layout, n: usize, v: usize) -> Result<Vec<i64>> {
    if s.dtype() != DType::I64 {
        bail!("{name}: targets must be i64, got {:?}", s.dtype())
    }
    if l.dims() != [n] {
        bail!("{name}: targets {:?} is not (N) = ({n})", l.dims())
    }
    let t = contiguous::<i64>(s, l, name)?;
    cpu::cross_entropy::check_targets(t, v)?;
    Ok(t.to_vec())
}

/// Summed cross entropy: (logits (N, V), targets (N) i64). The forward leaves the per-row
/// logsumexp in `lse` for the backward.
pub(crate) struct CrossEntropy {
    pub lse: Mutex<Option<Tensor>>,
}

impl CustomOp2 for CrossEntropy {
    fn name(&self) -> &'static str {
        "whet-cross-entropy"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (n, v) = l1.shape().dims2()?;
        let targets = targets_of(self.name(), s2, l2, n, v)?;
        dispatch_float!(s1.dtype(), self.name(), |F| {
            let x = contiguous::<F>(s1, l1, self.name())?;
            let (loss, lse) = cpu::cross_entropy::fwd(x, &targets, v);
            *self.lse.lock().unwrap_or_else(|e| e.into_inner()) =
                Some(Tensor::from_vec(lse, n, &Device::Cpu)?);
            Ok((
                F::to_cpu_storage_owned(vec![F::from_f64(loss)]),
                Shape::from(()),
            ))
        })
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &CudaStorage,
        l1: &Layout,
        s2: &CudaStorage,
        l2: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        let (loss, lse) = crate::cuda::cross_entropy::fwd(s1, l1, s2, l2)?;
        *self.lse.lock().unwrap_or_else(|e| e.into_inner()) = Some(lse);
        Ok((loss, Shape::from(())))
    }

    fn bwd(
        &self,
        logits: &Tensor,
        targets: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        if !logits.track_op() {
            return Ok((None, None));
        }
        #[cfg(feature = "cuda")]
        if logits.device().is_cuda() {
            let targets = targets.contiguous()?;
            let lse = match self.lse.lock().unwrap_or_else(|e| e.into_inner()).clone() {
                Some(l) => l,
                None => crate::cuda::with_storage(logits, self.name(), |sx, lx| {
                    crate::cuda::with_storage(&targets, self.name(), |st, lt| {
                        crate::cuda::cross_entropy::fwd(sx, lx, st, lt).map(|(_, l)| l)
                    })
                })?,
            };
            let d = crate::cuda::cross_entropy::bwd(logits, &targets, &lse, grad)?;
            return Ok((Some(d), None));
        }
        let (_, v) = logits.dims2()?;
        let t = targets.contiguous()?.to_vec1::<i64>()?;
        let stashed = self.lse.lock().unwrap_or_else(|e| e.into_inner()).clone();
        dispatch_float!(logits.dtype(), self.name(), |F| {
            let hx = Host::new(logits, self.name())?;
            let x = hx.slice::<F>()?;
            let lse = match stashed {
                Some(l) => l.to_vec1::<F>()?,
                None => cpu::cross_entropy::fwd(x, &t, v).1,
            };
            let d = cpu::cross_entropy::bwd(x, &t, &lse, scalar::<F>(grad)?, v);
            Ok((Some(vec_tensor(d, logits.shape())?), None))
        })
    }
}

// ---------------------------------------------------------------------------------------------

/// LM head + summed cross entropy, `chunk` rows at a time: (h (N, H) contiguous, w (V, H) any
/// strides, targets (N) i64). The forward leaves the per-row logsumexp in `lse`.
pub(crate) struct LinearCrossEntropy {
    pub chunk: usize,
    pub lse: Mutex<Option<Tensor>>,
    /// (dh wanted, dw wanted) when the forward also computes the gradients (on the CPU), for a
    /// loss whose backward will run; they wait in `grads` for an upstream gradient to scale by.
    pub grads_in_forward: (bool, bool),
    pub grads: Mutex<Option<(Option<Tensor>, Option<Tensor>)>>,
}

impl LinearCrossEntropy {
    fn dims(&self, lh: &Layout, lw: &Layout) -> Result<cpu::linear_cross_entropy::Dims> {
        let (n, h) = lh.shape().dims2()?;
        let (v, hw) = lw.shape().dims2()?;
        if h != hw {
            bail!(
                "whet-linear-cross-entropy: h {:?} and w {:?} differ in H",
                lh.dims(),
                lw.dims()
            )
        }
        let st = lw.stride();
        Ok(cpu::linear_cross_entropy::Dims {
            n,
            h,
            v,
            chunk: self.chunk,
            w_stride: [st[0], st[1]],
        })
    }
}

impl CustomOp3 for LinearCrossEntropy {
    fn name(&self) -> &'static str {
        "whet-linear-cross-entropy"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        same_dtype(self.name(), s1.dtype(), s2.dtype())?;
        let dm = self.dims(l1, l2)?;
        let targets = targets_of(self.name(), s3, l3, dm.n, dm.v)?;
        dispatch_float!(s1.dtype(), self.name(), |F| {
            let h = contiguous::<F>(s1, l1, self.name())?;
            let w = &s2.as_slice::<F>()?[l2.start_offset()..];
            let (need_dh, need_dw) = self.grads_in_forward;
            let (loss, lse) = if need_dh || need_dw {
                let (loss, lse, (dh, dw)) =
                    cpu::linear_cross_entropy::fwd_with_grads(h, w, &targets, dm, need_dh, need_dw);
                *self.grads.lock().unwrap_or_else(|e| e.into_inner()) =
                    Some((opt_tensor(dh, l1.shape())?, opt_tensor(dw, l2.shape())?));
                (loss, lse)
            } else {
                cpu::linear_cross_entropy::fwd(h, w, &targets, dm)
            };
            *self.lse.lock().unwrap_or_else(|e| e.into_inner()) =
                Some(Tensor::from_vec(lse, dm.n, &Device::Cpu)?);
            Ok((
                F::to_cpu_storage_owned(vec![F::from_f64(loss)]),
                Shape::from(()),
            ))
        })
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &CudaStorage,
        l1: &Layout,
        s2: &CudaStorage,
        l2: &Layout,
        s3: &CudaStorage,
        l3: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        let (loss, lse) = crate::cuda::cross_entropy::lce_fwd(s1, l1, s2, l2, s3, l3, self.chunk)?;
        *self.lse.lock().unwrap_or_else(|e| e.into_inner()) = Some(lse);
        Ok((loss, Shape::from(())))
    }

    fn bwd(
        &self,
        h: &Tensor,
        w: &Tensor,
        targets: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (need_dh, need_dw) = (h.track_op(), w.track_op());
        if !(need_dh || need_dw) {
            return Ok((None, None, None));
        }
        #[cfg(feature = "cuda")]
        if h.device().is_cuda() {
            let targets = targets.contiguous()?;
            let lse = match self.lse.lock().unwrap_or_else(|e| e.into_inner()).clone() {
                Some(l) => l,
                None => crate::cuda::with_storage(h, self.name(), |sh, lh| {
                    crate::cuda::with_storage(w, self.name(), |sw, lw| {
                        crate::cuda::with_storage(&targets, self.name(), |st, lt| {
                            crate::cuda::cross_entropy::lce_fwd(sh, lh, sw, lw, st, lt, self.chunk)
                                .map(|(_, l)| l)
                        })
                    })
                })?,
            };
            let (dh, dw) = crate::cuda::cross_entropy::lce_bwd(
                h, w, &targets, &lse, grad, self.chunk, need_dh, need_dw,
            )?;
            return Ok((dh, dw, None));
        }
        if let Some((dh, dw)) = self.grads.lock().unwrap_or_else(|e| e.into_inner()).take() {
            // Computed by the forward for an upstream gradient of 1.
            let g = scalar::<f64>(grad)?;
            let scale = |t: Option<Tensor>, need: bool| match t {
                Some(t) if need => t.affine(g, 0.0).map(Some),
                _ => Ok(None),
            };
            return Ok((scale(dh, need_dh)?, scale(dw, need_dw)?, None));
        }
        let dm = self.dims(h.layout(), w.layout())?;
        let t = targets.contiguous()?.to_vec1::<i64>()?;
        let stashed = self.lse.lock().unwrap_or_else(|e| e.into_inner()).clone();
        let name = self.name();
        dispatch_float!(h.dtype(), name, |F| {
            let hh = Host::new(h, name)?;
            let h_ = hh.slice::<F>()?;
            // w may be strided: read its storage from its start offset.
            let (sw, lw) = w.storage_and_layout();
            let candle_core::Storage::Cpu(sw) = &*sw else {
                bail!("{name}: backward is implemented on the CPU only")
            };
            let w_ = &sw.as_slice::<F>()?[lw.start_offset()..];
            let lse = match stashed {
                Some(l) => l.to_vec1::<F>()?,
                None => cpu::linear_cross_entropy::fwd(h_, w_, &t, dm).1,
            };
            let (dh, dw) = cpu::linear_cross_entropy::bwd(
                h_,
                w_,
                &t,
                &lse,
                scalar::<F>(grad)?,
                dm,
                need_dh,
                need_dw,
            );
            Ok((opt_tensor(dh, h.shape())?, opt_tensor(dw, w.shape())?, None))
        })
    }
}

// ---------------------------------------------------------------------------------------------

/// A LoRA linear in one op: `x @ w^T [+ bias] + scale * ((x * mask) @ a^T) @ b^T`, with
/// (x (.., IN) contiguous, a (R, IN), b (OUT, R)) as the tracked arguments and the frozen w
/// (OUT, IN), bias (OUT) and dropout mask (x's shape, already scaled by 1 / (1 - p)) in the
/// struct. One graph node instead of five (base, down, up, scale, add), so candle's backward
/// allocates, zero-fills and adds one gradient of (.., OUT) instead of four.
pub(crate) struct LoraLinear {
    pub w: Tensor,
    pub bias: Option<Tensor>,
    pub mask: Option<Tensor>,
    pub scale: f64,
    /// `scale * (x * mask) @ a^T` (M, R) from the forward, for the backward.
    pub down: Mutex<Option<Tensor>>,
}

/// A 2-D CPU tensor (any strides) as a matrix view.
fn mat2<'a, T: WithDType>(s: &'a CpuStorage, l: &Layout) -> Result<cpu::Mat<'a, T>> {
    let st = l.stride();
    Ok(cpu::Mat {
        data: &s.as_slice::<T>()?[l.start_offset()..],
        rs: st[0],
        cs: st[1],
    })
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
        let mut out_dims = xd.to_vec();
        *out_dims.last_mut().expect("rank >= 1") = n_out;
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
            let mut y = cpu::linear::fwd(x, w.data, [w.rs, w.cs], bias, m, n_in, n_out); // (M, OUT)
            let xm = self.masked(x)?;
            let xin = cpu::Mat::row_major(xm.as_deref().unwrap_or(x), n_in);
            // down (M, R) = scale * x_in @ a^T
            let mut down = cpu::matmul(xin, mat2::<F>(sa, la)?.t(), m, r, n_in);
            cpu::scal(&mut down, F::from_f64(self.scale));
            // y += down @ b^T
            let bt = mat2::<F>(sb, lb)?.t();
            cpu::gemm(&mut y, true, cpu::Mat::row_major(&down, r), bt, m, n_out, r);
            *self.down.lock().unwrap_or_else(|e| e.into_inner()) =
                Some(vec_tensor(down, &Shape::from((m, r)))?);
            Ok((F::to_cpu_storage_owned(y), Shape::from(out_dims)))
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
        let down = self.down.lock().unwrap_or_else(|e| e.into_inner()).take();
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
                let mut dx = cpu::matmul(gm, w, m, n_in, n_out);
                match &self.mask {
                    None => cpu::gemm(&mut dx, true, gdm, am, m, n_in, r),
                    Some(mask) => {
                        let lora = cpu::matmul(gdm, am, m, n_in, r);
                        let mask = mask.contiguous()?;
                        let mh = Host::new(&mask, name)?;
                        for ((d, l), k) in dx.iter_mut().zip(&lora).zip(mh.slice::<F>()?) {
                            *d += *l * *k;
                        }
                    }
                }
                Some(vec_tensor(dx, x.shape())?)
            } else {
                None
            };
            let (da, db) = (da.transpose()?, db.transpose()?);
            Ok((dx, da, db))
        })
    }
}
