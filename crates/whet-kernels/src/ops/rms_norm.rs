//! RMSNorm (Zhang & Sennrich 2019, arXiv:1910.07467): [`rms_norm`] and its op.

#[cfg(feature = "cuda")]
use candle_core::CudaStorage;
use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp2, Layout, Result, Shape, Tensor, WithDType, bail};

use super::{hosts, opt_tensor, same_dtypes};
use crate::cpu::{self, contiguous, dispatch_float};

/// RMSNorm over the last dim: `x / sqrt(mean(x^2) + eps) * weight`.
/// x: (.., H), weight: (H) -> (.., H)
pub fn rms_norm(x: &Tensor, weight: &Tensor, eps: f64) -> Result<Tensor> {
    let h = x.dim(candle_core::D::Minus1)?;
    if weight.dims() != [h] {
        bail!(
            "rms_norm: weight {:?} is not (H) = ({h}) for x {:?}",
            weight.dims(),
            x.dims()
        )
    }
    x.contiguous()?
        .apply_op2(&weight.contiguous()?, RmsNorm { eps })
}

/// RMSNorm: (x (.., H), weight (H)).
struct RmsNorm {
    eps: f64,
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
        let name = self.name();
        same_dtypes(name, &[s1.dtype(), s2.dtype()])?;
        dispatch_float!(s1.dtype(), name, |F| {
            let x = contiguous::<F>(s1, l1, name)?;
            let w = contiguous::<F>(s2, l2, name)?;
            let y = cpu::rms_norm::fwd(x, w, F::from_f64(self.eps));
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
        let name = self.name();
        dispatch_float!(x.dtype(), name, |F| {
            let [hx, hw, hg] = hosts([x, w, &grad], name)?;
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
