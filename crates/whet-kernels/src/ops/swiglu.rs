//! SwiGLU (Shazeer 2020, "GLU Variants Improve Transformer", arXiv:2002.05202): [`swiglu`] and
//! its op.

#[cfg(feature = "cuda")]
use candle_core::CudaStorage;
use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp2, Layout, Result, Shape, Tensor, WithDType, bail};

use super::{hosts, opt_tensor, same_dtypes};
use crate::cpu::{self, contiguous, dispatch_float};

/// SwiGLU activation: `silu(gate) * up`. gate, up: (.., I) -> (.., I)
pub fn swiglu(gate: &Tensor, up: &Tensor) -> Result<Tensor> {
    gate.contiguous()?.apply_op2(&up.contiguous()?, Swiglu)
}

/// SwiGLU: (gate (.., I), up (.., I)).
struct Swiglu;

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
        let name = self.name();
        same_dtypes(name, &[s1.dtype(), s2.dtype()])?;
        if l1.shape() != l2.shape() {
            bail!(
                "whet-swiglu: gate {:?} and up {:?} differ in shape",
                l1.dims(),
                l2.dims()
            )
        }
        dispatch_float!(s1.dtype(), name, |F| {
            let g = contiguous::<F>(s1, l1, name)?;
            let u = contiguous::<F>(s2, l2, name)?;
            let y = cpu::swiglu::fwd(g, u);
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
        let y = crate::cuda::swiglu::fwd(s1, l1, s2, l2)?;
        Ok((y, l1.shape().clone()))
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
        let name = self.name();
        dispatch_float!(gate.dtype(), name, |F| {
            let [hg, hu, hd] = hosts([gate, up, &grad], name)?;
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
