use rayon::prelude::*;
use serde::{Deserialize, Serialize};

use candle_core::Tensor;

use crate::buffers::{CHUNK, Update, check_grad, restore};
use crate::{OptimError, Optimizer, OptimizerState, Param, Result};

#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SgdConfig {
    pub momentum: f64,
    pub nesterov: bool,
    /// Decoupled weight decay, `p -= lr * wd * p`.
    pub weight_decay: f64,
}

impl Default for SgdConfig {
    fn default() -> Self {
        Self {
            momentum: 0.9,
            nesterov: false,
            weight_decay: 0.0,
        }
    }
}

/// SGD with (optionally Nesterov) momentum, `torch.optim.SGD` semantics with dampening 0.
pub struct Sgd {
    params: Vec<Param>,
    buf: Vec<Vec<f32>>,
    cfg: SgdConfig,
    step: u64,
}

impl Sgd {
    pub fn new(params: Vec<Param>, cfg: SgdConfig) -> Result<Self> {
        if !(0.0..1.0).contains(&cfg.momentum) || cfg.weight_decay < 0.0 {
            return Err(OptimError::InvalidSetting {
                field: "momentum",
                value: format!("{} (weight_decay {})", cfg.momentum, cfg.weight_decay),
                expected: "momentum in [0, 1) and weight_decay >= 0",
            });
        }
        let buf = params
            .iter()
            .map(|p| vec![0f32; p.var.elem_count()])
            .collect();
        Ok(Self {
            params,
            buf,
            cfg,
            step: 0,
        })
    }
}

impl Optimizer for Sgd {
    fn params(&self) -> &[Param] {
        &self.params
    }

    fn step(&mut self, grads: &[Option<Tensor>], lr: f64, grad_scale: f64) -> Result<()> {
        if grads.len() != self.params.len() {
            return Err(OptimError::GradCount {
                expected: self.params.len(),
                found: grads.len(),
            });
        }
        let first = self.step == 0;
        self.step += 1;
        let (mu, nesterov) = (self.cfg.momentum as f32, self.cfg.nesterov);
        let (lr32, gs) = (lr as f32, grad_scale as f32);
        for (i, param) in self.params.iter().enumerate() {
            let Some(grad) = &grads[i] else { continue };
            check_grad(&param.name, param.var.as_tensor(), grad)?;
            let decay = if param.decay {
                (1.0 - lr * self.cfg.weight_decay) as f32
            } else {
                1.0
            };
            let buf = std::sync::Mutex::new(&mut self.buf[i]);
            let update = |p: &mut [f32], g: &[f32]| {
                let mut buf = buf.lock().unwrap_or_else(|e| e.into_inner());
                p.par_chunks_mut(CHUNK)
                    .zip(g.par_chunks(CHUNK))
                    .zip(buf.par_chunks_mut(CHUNK))
                    .for_each(|((p, g), b)| {
                        for j in 0..p.len() {
                            let g = g[j] * gs;
                            b[j] = if first { g } else { mu * b[j] + g };
                            let d = if nesterov { g + mu * b[j] } else { b[j] };
                            p[j] = p[j] * decay - lr32 * d;
                        }
                    });
            };
            if !param.var.device().is_cpu() {
                // A GPU parameter: the same update on host copies (SGD has no fused kernel;
                // AdamW does), the momentum buffer staying on the host.
                let t = param.var.as_tensor();
                let mut p = t.flatten_all()?.to_vec1::<f32>()?;
                let g = grad.flatten_all()?.to_vec1::<f32>()?;
                update(&mut p, &g);
                param
                    .var
                    .set(&Tensor::from_vec(p, t.shape(), t.device())?)?;
                continue;
            }
            let op = Update {
                name: &param.name,
                update: &update,
            };
            param
                .var
                .as_tensor()
                .inplace_op2(&grad.contiguous()?, &op)?;
        }
        Ok(())
    }

    fn step_count(&self) -> u64 {
        self.step
    }

    fn state(&self) -> OptimizerState {
        let buffers = self
            .params
            .iter()
            .zip(&self.buf)
            .map(|(p, b)| (format!("momentum.{}", p.name), b.clone()))
            .collect();
        OptimizerState {
            step: self.step,
            buffers,
        }
    }

    fn load_state(&mut self, state: &OptimizerState) -> Result<()> {
        for (i, p) in self.params.iter().enumerate() {
            restore(state, &format!("momentum.{}", p.name), &mut self.buf[i])?;
        }
        self.step = state.step;
        Ok(())
    }
}
