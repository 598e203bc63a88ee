//! The linear layer `x @ w^T [+ bias]`: [`linear`] and its two ops (with and without a bias on
//! the CPU; on CUDA the bias is a candle add).

#[cfg(feature = "cuda")]
use candle_core::CudaStorage;
use candle_core::backend::BackendStorage;
use candle_core::{
    CpuStorage, CustomOp2, CustomOp3, DType, Layout, Result, Shape, Tensor, WithDType, bail,
};

use super::{mat2, same_dtypes, vec_tensor, with_last_dim};
use crate::cpu::{self, Host, contiguous, dispatch_float};

/// `x @ w^T + bias`. x: (.., IN), w: (OUT, IN), bias: (OUT) -> (.., OUT).
/// Unlike candle's matmul, the backward computes a gradient only for arguments that need one:
/// a frozen base weight gets neither a gradient buffer nor the matmul that would fill it.
pub fn linear(x: &Tensor, w: &Tensor, bias: Option<&Tensor>) -> Result<Tensor> {
    // w may keep its strides (e.g. a transposed view): the gemm reads them directly.
    let x = x.contiguous()?;
    if x.device().is_cuda() {
        // cuBLAS for x @ w^T; the bias through candle (its gradient is a cheap sum).
        let y = x.apply_op2(w, Linear)?;
        return match bias {
            Some(b) => y.broadcast_add(b),
            None => Ok(y),
        };
    }
    match bias {
        Some(b) => x.apply_op3(w, &b.contiguous()?, LinearBias),
        None => x.apply_op2(w, Linear),
    }
}

/// `x @ w^T [+ bias]`: x (.., IN) contiguous, w (OUT, IN) any strides, bias (OUT).
fn linear_fwd(
    name: &'static str,
    sx: &CpuStorage,
    lx: &Layout,
    sw: &CpuStorage,
    lw: &Layout,
    bias: Option<(&CpuStorage, &Layout)>,
) -> Result<(CpuStorage, Shape)> {
    same_dtypes(name, &[sx.dtype(), sw.dtype()])?;
    let (n_out, n_in) = lw.shape().dims2()?;
    let xd = lx.dims();
    if xd.is_empty() || xd[xd.len() - 1] != n_in {
        bail!(
            "{name}: x {xd:?} does not end in IN = {n_in} (w is {:?})",
            lw.dims()
        )
    }
    if let Some((sb, lb)) = bias {
        same_dtypes(name, &[sx.dtype(), sb.dtype()])?;
        if lb.dims() != [n_out] {
            bail!("{name}: bias {:?} is not (OUT) = ({n_out})", lb.dims())
        }
    }
    let m = lx.shape().elem_count() / n_in.max(1);
    dispatch_float!(sx.dtype(), name, |F| {
        let x = contiguous::<F>(sx, lx, name)?;
        let w = mat2::<F>(sw, lw)?;
        let b = bias
            .map(|(sb, lb)| contiguous::<F>(sb, lb, name))
            .transpose()?;
        let y = cpu::linear::fwd(x, w.data, [w.rs, w.cs], b, m, n_in, n_out);
        Ok((F::to_cpu_storage_owned(y), with_last_dim(xd, n_out)))
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
struct Linear;

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
struct LinearBias;

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
