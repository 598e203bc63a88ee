//! The data-parallel half of a training step: what one rank did (token counts, loss sum, the
//! first non-finite micro-batch, which parameters got a gradient) gathered from every rank, and
//! the bucketed all-reduce of the gradients. [`crate::step`] calls both between the backward
//! passes and the update.

use candle_core::{DType, Tensor};
use whet_optim::Param;

use super::{Communicator, plan_buckets};
use crate::Result;

/// What one rank did in a step, and after [`LocalStep::sum_over_ranks`], what all ranks did.
#[derive(Debug, Clone, Default)]
pub(crate) struct LocalStep {
    pub supervised: usize,
    pub tokens: usize,
    pub loss_sum: f64,
    /// The first micro-batch whose loss was not finite, and that loss.
    pub non_finite: Option<(usize, f32)>,
    /// Per parameter: whether any rank has a gradient for it (filled by `sum_over_ranks`).
    pub has_grad: Vec<bool>,
}

impl LocalStep {
    /// One all-gather of the counts, the loss sum, the first non-finite micro-batch and which
    /// parameters got a gradient, summed in rank order (the same bits on every rank).
    pub fn sum_over_ranks(
        &self,
        comm: &dyn Communicator,
        grads: &[Option<Tensor>],
    ) -> Result<Self> {
        let (micro, value) = self.non_finite.unwrap_or((usize::MAX, 0.0));
        let head = [
            self.supervised as f64,
            self.tokens as f64,
            self.loss_sum,
            micro as f64,
            value as f64,
        ];
        let mine: Vec<f64> = head
            .iter()
            .copied()
            .chain(grads.iter().map(|g| f64::from(u8::from(g.is_some()))))
            .collect();
        let all = comm.all_gather_host(&mine)?;
        let mut global = Self {
            has_grad: vec![false; grads.len()],
            ..Self::default()
        };
        for per_rank in all.chunks_exact(mine.len()) {
            global.supervised += per_rank[0] as usize;
            global.tokens += per_rank[1] as usize;
            global.loss_sum += per_rank[2];
            let micro = per_rank[3];
            if micro < usize::MAX as f64
                && global.non_finite.is_none_or(|(m, _)| (micro as usize) < m)
            {
                global.non_finite = Some((micro as usize, per_rank[4] as f32));
            }
            for (h, &x) in global.has_grad.iter_mut().zip(&per_rank[head.len()..]) {
                *h |= x > 0.0;
            }
        }
        Ok(global)
    }
}

/// Sums this rank's gradients with every other rank's: flattened into buckets of about
/// `bucket_elems` values (`WHET_BUCKET_MB`), all reduced in one call of the communicator. A
/// parameter no rank has a gradient for stays `None`, as in one process (the optimizer skips it).
///
/// No overlap with the backward pass: candle's `backward()` returns the whole gradient store at
/// once and has no per-tensor hooks, so no bucket is complete before backward ends. The buckets'
/// reductions overlap each other instead (MPI starts them all before waiting; NCCL queues them on
/// the device's stream).
pub(crate) fn all_reduce_gradients(
    comm: &dyn Communicator,
    params: &[Param],
    grads: Vec<Option<Tensor>>,
    has_grad: &[bool],
    bucket_elems: usize,
) -> Result<Vec<Option<Tensor>>> {
    let numels: Vec<usize> = params.iter().map(|p| p.var.elem_count()).collect();
    let plan = plan_buckets(&numels, bucket_elems);
    let mut buckets = Vec::with_capacity(plan.len());
    for range in &plan {
        let parts = range
            .clone()
            .map(|i| match &grads[i] {
                Some(g) => g.flatten_all()?.to_dtype(DType::F32),
                None => Tensor::zeros(numels[i], DType::F32, params[i].var.device()),
            })
            .collect::<candle_core::Result<Vec<_>>>()?;
        buckets.push(Tensor::cat(&parts, 0)?);
    }
    drop(grads);
    let summed = comm.all_reduce_sum(&buckets)?;
    drop(buckets);
    let mut out = Vec::with_capacity(params.len());
    for (range, bucket) in plan.iter().zip(&summed) {
        let mut offset = 0;
        for i in range.clone() {
            let p = &params[i];
            out.push(if has_grad[i] {
                // A view into the summed bucket: no copy.
                Some(
                    bucket
                        .narrow(0, offset, numels[i])?
                        .reshape(p.var.shape())?
                        .to_dtype(p.var.dtype())?,
                )
            } else {
                None
            });
            offset += numels[i];
        }
    }
    Ok(out)
}
