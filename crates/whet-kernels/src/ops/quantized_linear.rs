//! A linear layer over a frozen weight kept in GGML quantized blocks: the QLoRA base
//! (Dettmers et al. 2023, "QLoRA", arXiv:2305.14314), with GGML's block formats (Q4_0, Q8_0,
//! K-quants...) in place of NF4.
//!
//! candle's `QMatMul` has no backward: the gradient to `x` is silently dropped, so nothing
//! upstream of a quantized projection would learn. [`quantized_linear`] has one. Both passes
//! dequantize the weight for the one matmul and drop it afterwards, so the f32 copy of a
//! weight exists only while its own matmul runs: the autograd graph keeps the quantized blocks
//! (an `Arc`), never a dequantized tensor.
//!
//! The matmul itself is the f32 one of [`crate::linear`] on the dequantized weight, so the
//! result equals `linear(x, w.dequantize())` exactly (candle's `QMatMul` would also quantize the
//! activations to Q8 for its dot products; training wants the exact gradient instead).

use std::sync::Arc;

use candle_core::backend::BackendStorage;
use candle_core::quantized::QTensor;
use candle_core::{CpuStorage, CustomOp1, DType, Device, Layout, Result, Shape, Tensor, bail};

use super::with_last_dim;
use crate::cpu::{self, Host};

/// `x @ dequantize(w)^T`. x: (.., IN) f32, w: (OUT, IN) quantized -> (.., OUT) f32.
/// The gradient flows to `x` only; `w` is frozen.
pub fn quantized_linear(x: &Tensor, w: &Arc<QTensor>) -> Result<Tensor> {
    let (_, n_in) = w.shape().dims2()?;
    if x.dim(candle_core::D::Minus1)? != n_in {
        bail!(
            "quantized_linear: x {:?} does not end in IN = {n_in} (w is {:?} {:?})",
            x.dims(),
            w.shape().dims(),
            w.dtype()
        )
    }
    x.contiguous()?.apply_op1(QuantizedLinear { w: w.clone() })
}

struct QuantizedLinear {
    w: Arc<QTensor>,
}

impl CustomOp1 for QuantizedLinear {
    fn name(&self) -> &'static str {
        "whet-quantized-linear"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let name = self.name();
        if s.dtype() != DType::F32 {
            bail!("{name}: x must be f32, got {:?}", s.dtype())
        }
        let (n_out, n_in) = self.w.shape().dims2()?;
        let x = cpu::contiguous::<f32>(s, l, name)?;
        let m = x.len() / n_in.max(1);
        let w = self.w.dequantize(&Device::Cpu)?; // (OUT, IN), dropped on return
        let host = Host::new(&w, name)?;
        let y = cpu::linear::fwd(x, host.slice::<f32>()?, [n_in, 1], None, m, n_in, n_out);
        Ok((CpuStorage::F32(y), with_last_dim(l.dims(), n_out)))
    }

    fn bwd(&self, x: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        let (n_out, n_in) = self.w.shape().dims2()?;
        let m = x.elem_count() / n_in.max(1);
        let w = self.w.dequantize(grad.device())?; // (OUT, IN), dropped on return
        let dx = grad.reshape((m, n_out))?.matmul(&w)?; // (M, IN)
        Ok(Some(dx.reshape(x.shape())?))
    }
}
