//! Per-sequence log-probabilities, the input of the preference losses (DPO, IPO, ORPO in
//! `whet_train::preference`), and the reference model of a LoRA run.
//!
//! A row's log-probability is `sum_t log p(targets[t] | ids[..=t])` over its supervised targets:
//! TRL's `DPOTrainer._compute_loss` (`per_token_logps.sum(dim=1)` over the completion mask) and
//! `ORPOTrainer.get_batch_logps` (the same sum, which ORPO divides by the count). Each row goes
//! through the fused LM head + cross-entropy of [`Model::loss`] on its own (its sum, negated), so
//! the (N, V) logits never exist, and the result is differentiable to the trainable weights.
//!
//! The reference policy of DPO/IPO with LoRA is the base model with the adapters switched off,
//! as TRL does for a PEFT model with `ref_model=None` (`trl.trainer.utils.use_adapter(model,
//! None)`, i.e. PEFT's `disable_adapter()`): [`Model::adapters_disabled`] is that view of the same
//! weights, with no second copy of the model.

use std::path::Path;

use candle_core::{DType, Tensor};
use whet_kernels::{Ops, SideGrads};

use super::{LOSS_CHUNK_ROWS, Model, check_2d};
use crate::error::{Error, Result};

impl Model {
    /// Per row of (B, T) u32 `ids` / `positions` / `segments` and (B, T) i64 `targets` (next
    /// tokens, [`whet_kernels::IGNORE_INDEX`] where unsupervised, as for [`Model::loss`]): the
    /// sum of `log p(target)` over the row's supervised targets, (B) f32, and their count per
    /// row. A row with no supervised target has log-probability 0 and count 0.
    ///
    /// This is TRL's sequence log-probability (`DPOTrainer._compute_loss`:
    /// `per_token_logps.sum(dim=1)`), computed through the fused LM head + cross-entropy one row
    /// at a time: the result is differentiable to the trainable weights, with LoRA dropout while
    /// [`Model::is_training`]. Under activation checkpointing, take gradients with
    /// [`Model::backward`].
    pub fn sequence_logps(
        &self,
        ids: &Tensor,
        positions: &Tensor,
        segments: &Tensor,
        targets: &Tensor,
    ) -> Result<(Tensor, Vec<usize>)> {
        let mut sets = self.sequence_logps_sets(ids, positions, segments, &[targets])?;
        Ok(sets.remove(0))
    }

    /// [`Model::sequence_logps`] for several target sets over one forward pass, one
    /// `(logps (B), counts)` per set, in order. ORPO needs two: the completion (its odds ratio,
    /// TRL `ORPOTrainer.get_batch_logps`) and the prompt plus the completion of the chosen rows
    /// (its NLL term, TRL `ORPOTrainer.concatenated_forward`'s `chosen_nll_loss`).
    pub fn sequence_logps_sets(
        &self,
        ids: &Tensor,
        positions: &Tensor,
        segments: &Tensor,
        targets: &[&Tensor],
    ) -> Result<Vec<(Tensor, Vec<usize>)>> {
        let (b, t) = self.check_inputs(ids, positions, segments)?;
        let mut sets = Vec::with_capacity(targets.len());
        for set in targets {
            check_2d(set, "targets", DType::I64, Some((b, t)))?;
            let flat = set.flatten_all()?; // (N)
            let mut rows: Vec<Vec<u32>> = vec![Vec::new(); b];
            for i in self.supervised_positions(&flat)? {
                rows[i as usize / t].push(i);
            }
            sets.push((flat, rows));
        }
        let zero = Tensor::zeros((), DType::F32, &self.device)?;
        if sets.iter().all(|(_, rows)| rows.iter().all(Vec::is_empty)) {
            let logps = Tensor::zeros(b, DType::F32, &self.device)?;
            return Ok(sets.iter().map(|_| (logps.clone(), vec![0; b])).collect());
        }
        let view = self.compute_view()?; // bf16 compute: see precision.rs
        let hidden = view.hidden(ids, positions, segments, self.training)?; // (B, T, H)
        let hidden = hidden.reshape((b * t, self.cfg.hidden_size))?; // (N, H)
        let mut out = Vec::with_capacity(sets.len());
        for (flat, rows) in sets {
            let counts: Vec<usize> = rows.iter().map(Vec::len).collect();
            let mut logps = Vec::with_capacity(b);
            for idx in rows {
                if idx.is_empty() {
                    logps.push(zero.clone());
                    continue;
                }
                let n = idx.len();
                let idx = Tensor::from_vec(idx, n, &self.device)?; // (n)
                let ce = self
                    .kernels
                    .linear_cross_entropy_sum(
                        &hidden.index_select(&idx, 0)?, // (n, H)
                        view.lm_head_weight(),
                        &flat.index_select(&idx, 0)?, // (n)
                        LOSS_CHUNK_ROWS,
                        self.training,
                    )?
                    .to_dtype(DType::F32)?; // ()
                logps.push(ce.neg()?);
            }
            out.push((Tensor::stack(&logps, 0)?, counts)); // (B)
        }
        Ok(out)
    }

    /// The reference policy of LoRA preference tuning: this model with every adapter switched
    /// off (TRL, `ref_model=None` on a PEFT model: `use_adapter(model, None)`, PEFT's
    /// `disable_adapter()`). A view, not a copy: it shares every base weight with `self` (and
    /// the compute dtype), holds no `Var`, and runs in evaluation mode (no dropout, no NEFTune,
    /// no checkpointing), so its outputs carry no gradient.
    ///
    /// Errors under full fine-tuning: the base weights are what is trained, so switching adapters
    /// off does not give the starting model; load a frozen copy (`Trainable::None`) before
    /// training and use it as the reference. A frozen model without adapters is its own
    /// reference.
    pub fn adapters_disabled(&self) -> Result<Model> {
        let mut m = self.clone(); // shares every tensor
        if m.base_params_mut().iter().any(|p| p.t.is_variable()) {
            return Err(Error::lora(
                Path::new("<model>"),
                "the base weights are trained (full fine-tuning), so switching adapters off does not give the reference model; load a frozen copy (Trainable::None) before training and use it as the reference",
            ));
        }
        for lin in m.linears_mut() {
            lin.lora = None;
        }
        let mut m = m.detached();
        m.lora = None;
        m.training = false;
        m.neftune_alpha = 0.0;
        m.checkpointing = false;
        m.side_grads = SideGrads::default();
        Ok(m)
    }

    /// [`Model::sequence_logps`] of the reference policy ([`Model::adapters_disabled`]), with no
    /// gradient: TRL's `DPOTrainer.compute_ref_log_probs` for a PEFT model without `ref_model`.
    pub fn reference_sequence_logps(
        &self,
        ids: &Tensor,
        positions: &Tensor,
        segments: &Tensor,
        targets: &Tensor,
    ) -> Result<(Tensor, Vec<usize>)> {
        let reference = self.adapters_disabled()?;
        let (logps, counts) = reference.sequence_logps(ids, positions, segments, targets)?;
        Ok((logps.detach(), counts))
    }
}
