use serde::{Deserialize, Serialize};

use crate::{OptimError, Result};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ScheduleKind {
    Constant,
    Linear,
    #[default]
    Cosine,
}

/// Learning rate as a function of the update step: linear warm-up from 0 to `peak` over
/// `warmup` steps, then constant, linear or cosine decay to `peak * floor` at `total` steps.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Schedule {
    pub kind: ScheduleKind,
    pub peak: f64,
    pub warmup: u64,
    pub total: u64,
    /// Final learning rate as a fraction of `peak` (0 decays to zero).
    pub floor: f64,
}

impl Schedule {
    pub fn new(kind: ScheduleKind, peak: f64, warmup: u64, total: u64, floor: f64) -> Result<Self> {
        if !(peak.is_finite() && peak > 0.0) {
            return Err(OptimError::InvalidSetting {
                field: "lr",
                value: peak.to_string(),
                expected: "a learning rate > 0 (e.g. 2e-4 for LoRA, 2e-5 for full fine-tuning)",
            });
        }
        if !(0.0..=1.0).contains(&floor) {
            return Err(OptimError::InvalidSetting {
                field: "min_lr_ratio",
                value: floor.to_string(),
                expected: "a fraction of the peak learning rate in [0, 1]",
            });
        }
        Ok(Self {
            kind,
            peak,
            warmup,
            total: total.max(1),
            floor,
        })
    }

    /// The learning rate for update number `step` (0-based).
    pub fn lr(&self, step: u64) -> f64 {
        if step < self.warmup {
            return self.peak * (step + 1) as f64 / (self.warmup + 1) as f64;
        }
        let min = self.peak * self.floor;
        let span = self.total.saturating_sub(self.warmup).max(1) as f64;
        let progress = ((step - self.warmup) as f64 / span).min(1.0);
        match self.kind {
            ScheduleKind::Constant => self.peak,
            ScheduleKind::Linear => min + (self.peak - min) * (1.0 - progress),
            ScheduleKind::Cosine => {
                min + (self.peak - min) * 0.5 * (1.0 + (std::f64::consts::PI * progress).cos())
            }
        }
    }
}
