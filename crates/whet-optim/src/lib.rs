//! Optimizers, learning-rate schedules and gradient clipping for whet.
//!
//! Every update is one pass over each parameter: the parameter, its gradient and its optimizer
//! state are read once and written once, with no chain of temporary tensors
//! (llm.c `adamw_update` style). The gradient scale (1 / supervised tokens, times the clipping
//! factor) is folded into the same pass, so the trainer never rescales gradients itself.
//!
//! Invariant: this crate knows nothing of models or data; a parameter is a name and a `Var`.
//!
//! # Example
//!
//! One AdamW step: the first update moves each weight by about `lr` against its gradient's sign.
//!
//! ```
//! use candle_core::{Device, Var};
//! use whet_optim::{AdamW, AdamWConfig, Optimizer, Param};
//!
//! let w = Var::new(&[1.0f32, -2.0, 3.0], &Device::Cpu)?;
//! let mut adamw = AdamW::new(vec![Param::new("w", w.clone())], AdamWConfig::default())?;
//! let loss = (w.as_tensor().sqr()?.sum_all()? * 0.5)?; // gradient = w
//! let grads = loss.backward()?;
//! adamw.step(&[grads.get(w.as_tensor()).cloned()], 0.1, 1.0)?;
//! let after = w.as_tensor().to_vec1::<f32>()?;
//! for (got, want) in after.iter().zip([0.9f32, -1.9, 2.9]) {
//!     assert!((got - want).abs() < 1e-5, "{after:?}");
//! }
//! assert_eq!(adamw.step_count(), 1);
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

mod adamw;
mod buffers;
mod clip;
mod error;
mod schedule;
mod sgd;

pub use adamw::{AdamW, AdamWConfig};
pub use clip::{clip_factor, global_norm};
pub use error::{OptimError, Result};
pub use schedule::{Schedule, ScheduleKind};
pub use sgd::{Sgd, SgdConfig};

use candle_core::{Tensor, Var};

/// A trainable tensor as the optimizer sees it.
#[derive(Debug, Clone)]
pub struct Param {
    /// The name written into checkpoints (PEFT or Hugging Face naming).
    pub name: String,
    pub var: Var,
    /// Whether decoupled weight decay applies (see [`decays_by_default`]).
    pub decay: bool,
}

impl Param {
    pub fn new(name: impl Into<String>, var: Var) -> Self {
        let name = name.into();
        let decay = decays_by_default(&name);
        Self { name, var, decay }
    }
}

/// Norm weights, biases and embedding tables get no weight decay (the usual transformer recipe,
/// as in Hugging Face `Trainer.get_decay_parameter_names` plus embeddings).
pub fn decays_by_default(name: &str) -> bool {
    let lowered = name.to_ascii_lowercase();
    !(lowered.contains("norm")
        || lowered.ends_with(".bias")
        || lowered.contains("embed_tokens")
        || lowered.contains("lm_head"))
}

/// Saved optimizer state: named f32 buffers plus the step counter, enough to resume exactly.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct OptimizerState {
    pub step: u64,
    /// `(buffer name, values)`, e.g. `("exp_avg.model.norm.weight", ..)`.
    pub buffers: Vec<(String, Vec<f32>)>,
}

/// What the trainer needs from an optimizer.
pub trait Optimizer {
    fn params(&self) -> &[Param];
    /// One update. `grads[i]` belongs to `params()[i]` (None: no gradient this step, skipped);
    /// every gradient is multiplied by `grad_scale` inside the update pass.
    fn step(&mut self, grads: &[Option<Tensor>], lr: f64, grad_scale: f64) -> Result<()>;
    /// Number of updates done so far.
    fn step_count(&self) -> u64;
    fn state(&self) -> OptimizerState;
    fn load_state(&mut self, state: &OptimizerState) -> Result<()>;
}

#[cfg(test)]
mod tests;
