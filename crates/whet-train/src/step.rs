//! One optimizer step, the only one whet has: [`crate::Trainer::run`] calls it once per step,
//! `whet bench-step` and the CUDA step bench (`benches/benches/cuda_step.rs`) time it.
//!
//! A step accumulates the summed-loss gradients of this rank's micro-batches (micro-batch `j` is
//! rank `j % world`'s), sums the counts and gradients over the ranks, normalises by the supervised
//! tokens of the whole accumulated batch (not per micro-batch, nor per rank), clips the global
//! gradient norm and applies the update. A non-finite loss or gradient norm stops it with
//! [`TrainError::NonFinite`] before anything is updated.

use candle_core::Tensor;
use whet_model::Model;
use whet_optim::{Optimizer, Param};

use crate::comm::{self, Communicator, LocalStep};
use crate::preference::{Objective, PreferenceMetrics};
use crate::rows::Batch;
use crate::{Result, TrainError};

/// What a step needs besides the model, the optimizer and its micro-batches: the same for every
/// step of a run.
pub struct Step<'a> {
    /// The ranks the step is data-parallel over ([`comm::Single`] for one process).
    pub comm: &'a dyn Communicator,
    /// Gradient bucket size of the all-reduce, in f32 values ([`Communicator::bucket_elems`]).
    pub bucket_elems: usize,
    /// Clip the global gradient norm to this (0: off).
    pub max_grad_norm: f64,
    /// Reseed dropout before each micro-batch from this seed, the step and the global
    /// micro-batch index (the same masks on any number of ranks, and on resume); `None` leaves
    /// the model's dropout stream as it is.
    pub dropout_seed: Option<u64>,
    /// Called after each micro-batch's backward pass, while its activations and gradients are
    /// alive (the CUDA bench samples the device memory there).
    pub after_backward: Option<&'a dyn Fn()>,
    /// The loss: cross-entropy, or a preference loss on pair batches
    /// ([`Batch::from_pair_rows`], whose `supervised` counts pairs, so the step's loss is the
    /// mean over the pairs of all its micro-batches).
    pub objective: Objective,
}

/// What a step did, summed over every rank.
#[derive(Debug, Clone, PartialEq)]
pub struct StepOutcome {
    /// Mean cross-entropy per supervised token over the whole accumulated batch.
    pub loss: f64,
    /// The global norm of the normalised gradient, before clipping.
    pub grad_norm: f64,
    pub supervised: usize,
    pub tokens: usize,
    /// The pair-weighted means of a preference step's rewards, margin and accuracy.
    pub preference: Option<PreferenceMetrics>,
}

impl Step<'_> {
    /// One process, no clipping, dropout left alone: the step the benches time.
    pub fn single() -> Step<'static> {
        Step {
            comm: &comm::Single,
            bucket_elems: usize::MAX,
            max_grad_norm: 0.0,
            dropout_seed: None,
            after_backward: None,
            objective: Objective::Sft,
        }
    }

    /// Step number `done + 1` (`done` steps came before it) at learning rate `lr`, over
    /// `micro_batches` micro-batches of which this rank builds and computes its own with
    /// `batch(j)`.
    pub fn run(
        &self,
        model: &mut Model,
        optimizer: &mut dyn Optimizer,
        done: u64,
        lr: f64,
        micro_batches: usize,
        batch: impl FnMut(usize) -> Result<Batch>,
    ) -> Result<StepOutcome> {
        let (grads, local, preference) =
            self.accumulate(model, optimizer.params(), done, micro_batches, batch)?;
        let (rank, world) = (self.comm.rank(), self.comm.world_size());
        debug_assert!(rank < world);
        // Normalise by the supervised tokens of the whole accumulated batch, over every
        // rank, not per micro-batch or per rank.
        let global = if world == 1 {
            local
        } else {
            local.sum_over_ranks(self.comm, &grads)?
        };
        if let Some((micro, value)) = global.non_finite {
            return Err(TrainError::NonFinite {
                step: done + 1,
                micro,
                value,
                cause: model.non_finite_cause(),
            });
        }
        let mut grads = grads;
        if world > 1 {
            grads = comm::all_reduce_gradients(
                self.comm,
                optimizer.params(),
                grads,
                &global.has_grad,
                self.bucket_elems,
            )?;
        }
        let (supervised, tokens) = (global.supervised, global.tokens);
        let scale = 1.0 / supervised.max(1) as f64;
        let grad_norm = whet_optim::global_norm(&grads, scale)?;
        if !grad_norm.is_finite() {
            return Err(TrainError::NonFinite {
                step: done + 1,
                micro: 0,
                value: grad_norm as f32,
                cause: model.non_finite_cause(),
            });
        }
        let factor = whet_optim::clip_factor(grad_norm, self.max_grad_norm);
        optimizer.step(&grads, lr, scale * factor)?;
        drop(grads);
        Ok(StepOutcome {
            loss: global.loss_sum * scale,
            grad_norm,
            supervised,
            tokens,
            preference: PreferenceMetrics::over_ranks(
                PreferenceMetrics::weighted_mean(&preference),
                self.comm,
            )?,
        })
    }

    /// Forward and backward over this rank's micro-batches: the summed-loss gradients per
    /// parameter of `params` (`None`: none this step) and what this rank did.
    fn accumulate(
        &self,
        model: &mut Model,
        params: &[Param],
        done: u64,
        micro_batches: usize,
        mut batch: impl FnMut(usize) -> Result<Batch>,
    ) -> Result<(Vec<Option<Tensor>>, LocalStep, Vec<PreferenceMetrics>)> {
        let (rank, world) = (self.comm.rank(), self.comm.world_size());
        let mut grads: Vec<Option<Tensor>> = vec![None; params.len()];
        let mut local = LocalStep::default();
        let mut preference = Vec::new();
        for micro in 0..micro_batches {
            if micro % world != rank {
                continue; // another rank's micro-batch
            }
            let batch = batch(micro)?;
            local.tokens += batch.tokens;
            local.supervised += batch.supervised;
            if batch.supervised == 0 {
                continue;
            }
            if let Some(seed) = self.dropout_seed {
                model.reseed_dropout(seed ^ (done << 16) ^ micro as u64);
            }
            let loss = match &self.objective {
                Objective::Sft => {
                    model
                        .loss(
                            &batch.ids,
                            &batch.positions,
                            &batch.segments,
                            &batch.targets,
                        )?
                        .0
                }
                Objective::Preference(p) => {
                    // The mean over this micro-batch's pairs, times its pairs: a sum, which the
                    // step normalises by the pairs of all micro-batches.
                    let out = p.batch_loss(model, &batch)?;
                    preference.push(out.metrics);
                    (out.loss * batch.supervised as f64)?
                }
            };
            let value = loss.to_scalar::<f32>()?;
            if !value.is_finite() {
                local.non_finite = Some((micro, value));
                break;
            }
            local.loss_sum += value as f64;
            let store = model.backward(&loss)?;
            if let Some(after_backward) = self.after_backward {
                after_backward();
            }
            for (slot, p) in grads.iter_mut().zip(params) {
                if let Some(g) = store.get(p.var.as_tensor()) {
                    *slot = Some(match slot.take() {
                        Some(acc) => (acc + g)?,
                        None => g.clone(),
                    });
                }
            }
        }
        Ok((grads, local, preference))
    }
}
