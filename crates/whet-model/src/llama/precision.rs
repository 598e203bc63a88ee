//! Mixed precision: compute in bf16 (on CUDA) while the trainable weights stay f32 masters.
//!
//! [`Model::set_compute_dtype`] converts the frozen weights once (a frozen base needs no master
//! copy: PEFT on a bf16 base does the same) and records the dtype. Each forward then runs on
//! [`Model::compute_view`], a shallow copy whose trainable weights are `to_dtype` casts of the
//! f32 `Var`s: the cast has a backward, so gradients arrive at the masters in f32 and the
//! optimizer state (whet-optim) stays f32 too. The summed loss and the logits are returned in
//! f32 whatever the compute dtype.

use std::borrow::Cow;

use candle_core::DType;

use super::Model;
use crate::error::Result;

impl Model {
    /// Runs the forward in `dtype` (f32, the default, or bf16 / f16). Call it once the
    /// trainable weights are in place (after loading with [`super::Trainable`], or after
    /// `apply_lora` / `make_full_trainable`): frozen weights are converted now, `Var`s stay as
    /// they are and are cast in each forward.
    pub fn set_compute_dtype(&mut self, dtype: DType) -> Result<()> {
        for p in self.base_params_mut() {
            if !p.t.is_variable() && p.t.dtype() != dtype && p.t.dtype().is_float() {
                p.t = p.t.to_dtype(dtype)?;
            }
        }
        for lin in self.linears_mut() {
            for p in lin.lora_params_mut() {
                if !p.t.is_variable() && p.t.dtype() != dtype {
                    p.t = p.t.to_dtype(dtype)?;
                }
            }
        }
        self.compute_dtype = dtype;
        Ok(())
    }

    /// The dtype the forward computes in.
    pub fn compute_dtype(&self) -> DType {
        self.compute_dtype
    }

    /// The model the forward runs: `self` when every weight already has the compute dtype,
    /// else a shallow copy with the other weights cast (differentiably).
    pub(super) fn compute_view(&self) -> Result<Cow<'_, Model>> {
        let dt = self.compute_dtype;
        let mismatched = self.params().iter().any(|p| p.t.dtype() != dt);
        if !mismatched {
            return Ok(Cow::Borrowed(self));
        }
        let mut m = self.clone();
        for p in m.base_params_mut() {
            if p.t.dtype() != dt {
                p.t = p.t.to_dtype(dt)?;
            }
        }
        for lin in m.linears_mut() {
            for p in lin.lora_params_mut() {
                if p.t.dtype() != dt {
                    p.t = p.t.to_dtype(dt)?;
                }
            }
        }
        Ok(Cow::Owned(m))
    }
}
