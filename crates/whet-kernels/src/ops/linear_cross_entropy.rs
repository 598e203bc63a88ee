//! The LM head fused with the summed cross entropy, `chunk` rows at a time:
//! [`linear_cross_entropy_sum`], [`linear_cross_entropy_sum_for_training`] and their op, whose
//! forward stashes the per-row logsumexp (and on the CPU, for training, the gradients) for the
//! backward.

#[cfg(feature = "cuda")]
use candle_core::CudaStorage;
use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp3, Device, Layout, Result, Shape, Tensor, bail};

use super::cross_entropy::targets_of;
use super::{Stash, opt_tensor, same_dtypes, scalar, scalar_storage};
use crate::cpu::{self, Host, contiguous, dispatch_float};

/// LM head fused with [`cross_entropy_sum`](crate::cross_entropy_sum):
/// `cross_entropy_sum(h @ w^T, targets)` computed `chunk` rows at a time, so the (N, V) logits
/// never exist at once, forward or backward. h: (N, H), w: (V, H), targets: (N) i64 -> scalar
/// f32. Rows whose target is [`IGNORE_INDEX`](crate::IGNORE_INDEX) are dropped before the
/// matmuls; `chunk` (at least 1) counts supervised rows. On CUDA, h and w may be bf16 (the
/// chunk's logits are f32, the sum is f32).
pub fn linear_cross_entropy_sum(
    h: &Tensor,
    w: &Tensor,
    targets: &Tensor,
    chunk: usize,
) -> Result<Tensor> {
    lce(h, w, targets, chunk, (false, false))
}

/// [`linear_cross_entropy_sum`] for a loss whose backward will run: on the CPU the forward also
/// computes the gradients of `h` and `w` (those that track one) from the same logits, and the
/// backward only scales them by the upstream gradient. The LM head's logits are then computed
/// once per step instead of twice (the forward's, and the backward's recomputation); the
/// gradients equal the two-pass ones up to float rounding. Memory: dh (N, H), and dw (V, H) when
/// w is trained, held from the forward to the backward.
pub fn linear_cross_entropy_sum_for_training(
    h: &Tensor,
    w: &Tensor,
    targets: &Tensor,
    chunk: usize,
) -> Result<Tensor> {
    lce(h, w, targets, chunk, (h.track_op(), w.track_op()))
}

fn lce(
    h: &Tensor,
    w: &Tensor,
    targets: &Tensor,
    chunk: usize,
    grads_in_forward: (bool, bool),
) -> Result<Tensor> {
    if chunk == 0 {
        bail!("linear_cross_entropy_sum: chunk must be at least 1")
    }
    let op = LinearCrossEntropy {
        chunk,
        lse: Stash::default(),
        grads_in_forward,
        grads: Stash::default(),
    };
    h.contiguous()?.apply_op3(w, &targets.contiguous()?, op)
}

/// LM head + summed cross entropy, `chunk` rows at a time: (h (N, H) contiguous, w (V, H) any
/// strides, targets (N) i64). The forward leaves the per-row logsumexp in `lse`.
struct LinearCrossEntropy {
    chunk: usize,
    /// (N), set by the forward.
    lse: Stash<Tensor>,
    /// (dh wanted, dw wanted) when the forward also computes the gradients (on the CPU), for a
    /// loss whose backward will run; they wait in `grads` for an upstream gradient to scale by.
    grads_in_forward: (bool, bool),
    /// (dh, dw) for an upstream gradient of 1, taken by the first backward (a second one
    /// computes them again from `lse`).
    grads: Stash<(Option<Tensor>, Option<Tensor>)>,
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
        let name = self.name();
        same_dtypes(name, &[s1.dtype(), s2.dtype()])?;
        let dm = self.dims(l1, l2)?;
        let targets = targets_of(name, s3, l3, dm.n, dm.v)?;
        dispatch_float!(s1.dtype(), name, |F| {
            let h = contiguous::<F>(s1, l1, name)?;
            let w = &s2.as_slice::<F>()?[l2.start_offset()..];
            let (need_dh, need_dw) = self.grads_in_forward;
            let (loss, lse) = if need_dh || need_dw {
                let (loss, lse, (dh, dw)) =
                    cpu::linear_cross_entropy::fwd_with_grads(h, w, &targets, dm, need_dh, need_dw);
                self.grads
                    .put((opt_tensor(dh, l1.shape())?, opt_tensor(dw, l2.shape())?));
                (loss, lse)
            } else {
                cpu::linear_cross_entropy::fwd(h, w, &targets, dm)
            };
            self.lse.put(Tensor::from_vec(lse, dm.n, &Device::Cpu)?);
            Ok(scalar_storage::<F>(loss))
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
        self.lse.put(lse);
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
        let name = self.name();
        #[cfg(feature = "cuda")]
        if h.device().is_cuda() {
            let targets = targets.contiguous()?;
            let lse = self.lse.get_or_else(|| {
                crate::cuda::with_storages(
                    [h, w, &targets],
                    name,
                    |[(sh, lh), (sw, lw), (st, lt)]| {
                        crate::cuda::cross_entropy::lce_fwd(sh, lh, sw, lw, st, lt, self.chunk)
                            .map(|(_, l)| l)
                    },
                )
            })?;
            let (dh, dw) = crate::cuda::cross_entropy::lce_bwd(
                h, w, &targets, &lse, grad, self.chunk, need_dh, need_dw,
            )?;
            return Ok((dh, dw, None));
        }
        if let Some((dh, dw)) = self.grads.take() {
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
        dispatch_float!(h.dtype(), name, |F| {
            let hh = Host::new(h, name)?;
            let h_ = hh.slice::<F>()?;
            // w may be strided: read its storage from its start offset.
            let (sw, lw) = w.storage_and_layout();
            let candle_core::Storage::Cpu(sw) = &*sw else {
                bail!("{name}: backward is implemented on the CPU only")
            };
            let w_ = &sw.as_slice::<F>()?[lw.start_offset()..];
            let lse = match self.lse.get() {
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
