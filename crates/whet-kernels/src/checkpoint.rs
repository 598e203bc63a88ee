//! Activation checkpointing (Chen et al. 2016, "Training Deep Nets with Sublinear Memory Cost",
//! arXiv:1604.06174) for candle's autograd, which has none.
//!
//! [`checkpoint`] runs a segment (a decoder layer) once without keeping its intermediate
//! tensors: only its input and output stay alive. In backward it runs the segment again on the
//! saved input, with autograd this time, and back-propagates the incoming gradient through
//! that copy. The gradient to the input is returned to candle's backward as usual; the
//! gradients of the segment's own parameters cannot be (a candle op returns gradients for its
//! arguments only), so they go to a [`SideGrads`] that the caller merges into the outer
//! `GradStore` ([`SideGrads::merge_into`]).
//!
//! The segment must compute the same function both times: anything random in it (dropout) has
//! to be replayed by the closure itself.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use candle_core::backprop::GradStore;
use candle_core::{
    CpuStorage, CustomOp2, DType, Layout, Result, Shape, Tensor, TensorId, Var, bail,
};

use crate::ops::Stash;

/// The segment: input -> output, both (.., H); called once forward and once in backward.
pub type Segment = Arc<dyn Fn(&Tensor) -> Result<Tensor> + Send + Sync>;

/// Parameter gradients computed by checkpointed segments during a backward pass.
#[derive(Debug, Clone, Default)]
pub struct SideGrads(Arc<Mutex<HashMap<TensorId, Tensor>>>);

impl SideGrads {
    fn add(&self, id: TensorId, g: Tensor) -> Result<()> {
        let mut map = self.0.lock().unwrap_or_else(|e| e.into_inner());
        let sum = match map.remove(&id) {
            Some(prev) => (prev + g)?,
            None => g,
        };
        map.insert(id, sum);
        Ok(())
    }

    /// Moves every collected gradient into `grads`, adding to what is there.
    pub fn merge_into(&self, grads: &mut GradStore) -> Result<()> {
        let taken = std::mem::take(&mut *self.0.lock().unwrap_or_else(|e| e.into_inner()));
        for (id, g) in taken {
            let sum = match grads.get_id(id) {
                Some(prev) => (prev + g)?,
                None => g,
            };
            grads.insert_id(id, sum);
        }
        Ok(())
    }

    /// Drops collected gradients (a backward that was abandoned).
    pub fn clear(&self) {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).clear();
    }
}

/// `segment(x)`, keeping only `x` and the output for backward. `params` are the segment's
/// trainable Vars (as tensors); their gradients land in `side`. With no trainable parameter and
/// an `x` that needs no gradient, this is just `segment(x)`.
pub fn checkpoint(
    x: &Tensor,
    segment: Segment,
    params: Vec<Tensor>,
    side: &SideGrads,
) -> Result<Tensor> {
    let Some(anchor) = params.first().cloned() else {
        if x.track_op() {
            bail!("checkpoint: a segment without parameters gains nothing; call it directly")
        }
        return segment(x);
    };
    // Forward without a lasting graph: the graph built here dies with `y`'s tracked copy.
    let y = segment(&x.detach())?.detach();
    let op = Checkpoint {
        y: Stash::holding(y),
        segment,
        params,
        side: side.clone(),
    };
    // `anchor` (a parameter) makes the node part of the graph even when `x` is not.
    x.contiguous()?.apply_op2(&anchor, op)
}

struct Checkpoint {
    /// The forward result, handed over once by `cpu_fwd`.
    y: Stash<Tensor>,
    segment: Segment,
    params: Vec<Tensor>,
    side: SideGrads,
}

impl CustomOp2 for Checkpoint {
    fn name(&self) -> &'static str {
        "whet-checkpoint"
    }

    fn cpu_fwd(
        &self,
        _s1: &CpuStorage,
        _l1: &Layout,
        _s2: &CpuStorage,
        _l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let Some(y) = self.y.take() else {
            bail!("whet-checkpoint: forward ran twice")
        };
        let shape = y.shape().clone();
        let y = y.flatten_all()?;
        let storage = match y.dtype() {
            DType::F32 => CpuStorage::F32(y.to_vec1::<f32>()?),
            DType::F64 => CpuStorage::F64(y.to_vec1::<f64>()?),
            DType::BF16 => CpuStorage::BF16(y.to_vec1()?),
            DType::F16 => CpuStorage::F16(y.to_vec1()?),
            other => bail!("whet-checkpoint: unsupported dtype {other:?}"),
        };
        Ok((storage, shape))
    }

    fn bwd(
        &self,
        x: &Tensor,
        _anchor: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        // Recompute with autograd on a copy of the input, then push `grad` through it.
        let xv = Var::from_tensor(&x.detach())?;
        let y = (self.segment)(xv.as_tensor())?;
        let grads = (y * grad.detach())?.sum_all()?.backward()?;
        for p in &self.params {
            if let Some(g) = grads.get(p) {
                self.side.add(p.id(), g.clone())?;
            }
        }
        let dx = if x.track_op() {
            grads.get(xv.as_tensor()).cloned()
        } else {
            None
        };
        Ok((dx, None))
    }
}
