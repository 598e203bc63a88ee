//! Raw access to f32 CPU buffers for the one-pass updates.

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, InplaceOp2, Layout, Tensor};

use crate::{OptimError, Result};

/// A contiguous f32 slice of a CPU storage, or a clear error.
pub(crate) fn contiguous_f32<'a>(
    name: &str,
    s: &'a CpuStorage,
    l: &Layout,
) -> candle_core::Result<&'a [f32]> {
    let CpuStorage::F32(data) = s else {
        candle_core::bail!(
            "parameter `{name}`: only f32 is supported, found {:?}",
            s.dtype()
        )
    };
    let Some((start, end)) = l.contiguous_offsets() else {
        candle_core::bail!("parameter `{name}`: gradient is not contiguous")
    };
    Ok(&data[start..end])
}

/// Runs `update(param, grad)` over the parameter's storage in place: param is written once.
pub(crate) struct Update<'n, F: Fn(&mut [f32], &[f32])> {
    pub name: &'n str,
    pub update: F,
}

impl<F: Fn(&mut [f32], &[f32])> InplaceOp2 for Update<'_, F> {
    fn name(&self) -> &'static str {
        "whet-optim-update"
    }

    fn cpu_fwd(
        &self,
        dst: &mut CpuStorage,
        dst_l: &Layout,
        gs: &CpuStorage,
        gl: &Layout,
    ) -> candle_core::Result<()> {
        let grad = contiguous_f32(self.name, gs, gl)?;
        let Some((start, end)) = dst_l.contiguous_offsets() else {
            candle_core::bail!("parameter `{}` is not contiguous", self.name)
        };
        let CpuStorage::F32(param) = dst else {
            candle_core::bail!(
                "parameter `{}`: only f32 is supported, found {:?}",
                self.name,
                dst.dtype()
            )
        };
        (self.update)(&mut param[start..end], grad);
        Ok(())
    }
}

/// Checks a gradient against its parameter before an update.
pub(crate) fn check_grad(name: &str, param: &Tensor, grad: &Tensor) -> Result<()> {
    if param.dims() != grad.dims() {
        return Err(OptimError::GradShape {
            name: name.to_string(),
            expected: param.dims().to_vec(),
            found: grad.dims().to_vec(),
        });
    }
    for t in [param, grad] {
        if t.dtype() != candle_core::DType::F32 {
            return Err(OptimError::DType {
                name: name.to_string(),
                dtype: format!("{:?}", t.dtype()),
            });
        }
    }
    Ok(())
}

/// Restores one named buffer from saved state.
pub(crate) fn restore(state: &crate::OptimizerState, name: &str, into: &mut [f32]) -> Result<()> {
    let (_, values) = state
        .buffers
        .iter()
        .find(|(n, _)| n == name)
        .ok_or_else(|| OptimError::MissingState {
            name: name.to_string(),
        })?;
    if values.len() != into.len() {
        return Err(OptimError::StateSize {
            name: name.to_string(),
            expected: into.len(),
            found: values.len(),
        });
    }
    into.copy_from_slice(values);
    Ok(())
}

/// Splits work over rayon threads in chunks big enough to be worth a thread.
pub(crate) const CHUNK: usize = 1 << 14;
