//! Summed cross entropy over supervised rows: [`cross_entropy_sum`] and its op, whose forward
//! stashes the per-row logsumexp for the backward.

#[cfg(feature = "cuda")]
use candle_core::CudaStorage;
use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp2, DType, Device, Layout, Result, Shape, Tensor, bail};

use super::{Stash, scalar, scalar_storage, vec_tensor};
use crate::cpu::{self, Host, contiguous, dispatch_float};

/// Sum over supervised rows of `-log softmax(logits)[target]`; rows whose target is
/// [`IGNORE_INDEX`](crate::IGNORE_INDEX) contribute nothing. logits: (N, V) f32, targets: (N)
/// i64 -> scalar f32. On CUDA the logits may be bf16; the sum is f32 there whatever their dtype.
pub fn cross_entropy_sum(logits: &Tensor, targets: &Tensor) -> Result<Tensor> {
    logits.contiguous()?.apply_op2(
        &targets.contiguous()?,
        CrossEntropy {
            lse: Stash::default(),
        },
    )
}

/// The targets (N) i64 of a CPU storage, each checked to be a class below `v` or
/// [`IGNORE_INDEX`](crate::IGNORE_INDEX).
pub(super) fn targets_of(
    name: &str,
    s: &CpuStorage,
    l: &Layout,
    n: usize,
    v: usize,
) -> Result<Vec<i64>> {
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
struct CrossEntropy {
    /// (N), set by the forward.
    lse: Stash<Tensor>,
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
        let name = self.name();
        let (n, v) = l1.shape().dims2()?;
        let targets = targets_of(name, s2, l2, n, v)?;
        dispatch_float!(s1.dtype(), name, |F| {
            let x = contiguous::<F>(s1, l1, name)?;
            let (loss, lse) = cpu::cross_entropy::fwd(x, &targets, v);
            self.lse.put(Tensor::from_vec(lse, n, &Device::Cpu)?);
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
    ) -> Result<(CudaStorage, Shape)> {
        let (loss, lse) = crate::cuda::cross_entropy::fwd(s1, l1, s2, l2)?;
        self.lse.put(lse);
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
        let name = self.name();
        #[cfg(feature = "cuda")]
        if logits.device().is_cuda() {
            let targets = targets.contiguous()?;
            let lse = self.lse.get_or_else(|| {
                crate::cuda::with_storages([logits, &targets], name, |[(sx, lx), (st, lt)]| {
                    crate::cuda::cross_entropy::fwd(sx, lx, st, lt).map(|(_, l)| l)
                })
            })?;
            let d = crate::cuda::cross_entropy::bwd(logits, &targets, &lse, grad)?;
            return Ok((Some(d), None));
        }
        let (_, v) = logits.dims2()?;
        let t = targets.contiguous()?.to_vec1::<i64>()?;
        dispatch_float!(logits.dtype(), name, |F| {
            let hx = Host::new(logits, name)?;
            let x = hx.slice::<F>()?;
            let lse = match self.lse.get() {
                Some(l) => l.to_vec1::<F>()?,
                None => cpu::cross_entropy::fwd(x, &t, v).1,
            };
            let d = cpu::cross_entropy::bwd(x, &t, &lse, scalar::<F>(grad)?, v);
            Ok((Some(vec_tensor(d, logits.shape())?), None))
        })
    }
}
