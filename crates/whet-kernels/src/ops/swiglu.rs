//! Gated linear units (Shazeer 2020, "GLU Variants Improve Transformer", arXiv:2002.05202):
//! [`swiglu`] (Llama, Qwen, Mistral) and [`geglu`] (Gemma), one op with the gate's activation
//! as its parameter.

#[cfg(feature = "cuda")]
use candle_core::CudaStorage;
use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp2, Layout, Result, Shape, Tensor, WithDType, bail};

use super::{hosts, opt_tensor, same_dtypes};
use crate::cpu::swiglu::Act;
use crate::cpu::{self, contiguous, dispatch_float};

/// SwiGLU activation: `silu(gate) * up`. gate, up: (.., I) -> (.., I)
pub fn swiglu(gate: &Tensor, up: &Tensor) -> Result<Tensor> {
    gate.contiguous()?
        .apply_op2(&up.contiguous()?, Glu(Act::Silu))
}

/// GeGLU activation: `gelu_tanh(gate) * up`, with PyTorch's tanh approximation of GELU
/// (transformers' `gelu_pytorch_tanh`). gate, up: (.., I) -> (.., I)
///
/// The fused kernel is CPU only; on CUDA this is [`crate::reference::geglu`] (candle's `gelu`,
/// the same approximation, and its backward).
pub fn geglu(gate: &Tensor, up: &Tensor) -> Result<Tensor> {
    if gate.device().is_cuda() {
        return crate::reference::geglu(gate, up);
    }
    gate.contiguous()?
        .apply_op2(&up.contiguous()?, Glu(Act::GeluTanh))
}

/// A gated linear unit: (gate (.., I), up (.., I)).
struct Glu(Act);

impl CustomOp2 for Glu {
    fn name(&self) -> &'static str {
        match self.0 {
            Act::Silu => "whet-swiglu",
            Act::GeluTanh => "whet-geglu",
        }
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
                "{name}: gate {:?} and up {:?} differ in shape",
                l1.dims(),
                l2.dims()
            )
        }
        dispatch_float!(s1.dtype(), name, |F| {
            let g = contiguous::<F>(s1, l1, name)?;
            let u = contiguous::<F>(s2, l2, name)?;
            let y = cpu::swiglu::fwd(g, u, self.0);
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
        if self.0 != Act::Silu {
            bail!(
                "{}: no CUDA kernel (geglu runs the reference on CUDA)",
                self.name()
            )
        }
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
        if gate.device().is_cuda() && self.0 == Act::Silu {
            return crate::cuda::swiglu::bwd(gate, up, &grad, gate.track_op(), up.track_op());
        }
        let name = self.name();
        dispatch_float!(gate.dtype(), name, |F| {
            let [hg, hu, hd] = hosts([gate, up, &grad], name)?;
            let (dg, du) = cpu::swiglu::bwd(
                (hg.slice::<F>()?, hu.slice::<F>()?, hd.slice::<F>()?),
                gate.track_op(),
                up.track_op(),
                self.0,
            );
            Ok((opt_tensor(dg, gate.shape())?, opt_tensor(du, up.shape())?))
        })
    }
}
