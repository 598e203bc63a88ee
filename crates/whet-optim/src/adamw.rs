use rayon::prelude::*;
use serde::{Deserialize, Serialize};

use candle_core::Tensor;

use crate::buffers::{CHUNK, Update, check_grad, restore};
use crate::{OptimError, Optimizer, OptimizerState, Param, Result};

#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AdamWConfig {
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    /// Decoupled weight decay (Loshchilov & Hutter 2019), applied as `p -= lr * wd * p`.
    pub weight_decay: f64,
}

impl Default for AdamWConfig {
    fn default() -> Self {
        Self {
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.0,
        }
    }
}

/// AdamW as in `torch.optim.AdamW` (bias-corrected moments, decoupled decay), with the whole
/// update for one parameter in a single pass over (param, grad, m, v).
///
/// Parameters on a CUDA device (feature `cuda`) are updated by whet-kernels' fused multi-tensor
/// kernel, one launch per step, with f32 moments kept on the device; `state` copies them to the
/// host (and panics if the device fails meanwhile: training could not go on anyway).
pub struct AdamW {
    params: Vec<Param>,
    m: Vec<Vec<f32>>,
    v: Vec<Vec<f32>>,
    cfg: AdamWConfig,
    step: u64,
    #[cfg(feature = "cuda")]
    fused: Option<whet_kernels::MultiTensorAdamW>,
}

impl AdamW {
    pub fn new(params: Vec<Param>, cfg: AdamWConfig) -> Result<Self> {
        for (field, value, ok) in [
            ("beta1", cfg.beta1, (0.0..1.0).contains(&cfg.beta1)),
            ("beta2", cfg.beta2, (0.0..1.0).contains(&cfg.beta2)),
            ("eps", cfg.eps, cfg.eps > 0.0),
            ("weight_decay", cfg.weight_decay, cfg.weight_decay >= 0.0),
        ] {
            if !ok {
                return Err(OptimError::InvalidSetting {
                    field,
                    value: value.to_string(),
                    expected: "betas in [0, 1), eps > 0, weight_decay >= 0",
                });
            }
        }
        #[cfg(feature = "cuda")]
        if params.first().is_some_and(|p| p.var.device().is_cuda()) {
            for p in &params {
                if p.var.dtype() != candle_core::DType::F32 {
                    return Err(OptimError::DType {
                        name: p.name.clone(),
                        dtype: format!("{:?}", p.var.dtype()),
                    });
                }
            }
            let fused = whet_kernels::MultiTensorAdamW::new(
                params.iter().map(|p| p.var.as_tensor().clone()).collect(),
                params.iter().map(|p| p.decay).collect(),
            )?;
            return Ok(Self {
                params,
                m: Vec::new(),
                v: Vec::new(),
                cfg,
                step: 0,
                fused: Some(fused),
            });
        }
        let m = params
            .iter()
            .map(|p| vec![0f32; p.var.elem_count()])
            .collect();
        let v = params
            .iter()
            .map(|p| vec![0f32; p.var.elem_count()])
            .collect();
        Ok(Self {
            params,
            m,
            v,
            cfg,
            step: 0,
            #[cfg(feature = "cuda")]
            fused: None,
        })
    }
}

impl Optimizer for AdamW {
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
        self.step += 1;
        let t = self.step as i32;
        let (b1, b2) = (self.cfg.beta1, self.cfg.beta2);
        // Folded constants, as in torch's single-tensor AdamW.
        let bc1 = 1.0 - b1.powi(t);
        let bc2 = 1.0 - b2.powi(t);
        let step_size = (lr / bc1) as f32;
        let bc2_sqrt = bc2.sqrt() as f32;
        let (b1, b2, eps, gs) = (b1 as f32, b2 as f32, self.cfg.eps as f32, grad_scale as f32);
        #[cfg(feature = "cuda")]
        if let Some(fused) = &self.fused {
            for (param, grad) in self.params.iter().zip(grads) {
                if let Some(g) = grad
                    && g.dims() != param.var.dims()
                {
                    return Err(OptimError::GradShape {
                        name: param.name.clone(),
                        expected: param.var.dims().to_vec(),
                        found: g.dims().to_vec(),
                    });
                }
            }
            let grads: Vec<Option<Tensor>> = grads
                .iter()
                .map(|g| {
                    g.as_ref()
                        .map(|g| g.to_dtype(candle_core::DType::F32))
                        .transpose()
                })
                .collect::<candle_core::Result<_>>()?;
            let hyper = whet_kernels::AdamWHyper {
                beta1: b1,
                beta2: b2,
                eps,
                step_size,
                bc2_sqrt,
                grad_scale: gs,
                decay: (1.0 - lr * self.cfg.weight_decay) as f32,
            };
            fused.step(&grads, &hyper)?;
            return Ok(());
        }
        for (i, param) in self.params.iter().enumerate() {
            let Some(grad) = &grads[i] else { continue };
            check_grad(&param.name, param.var.as_tensor(), grad)?;
            let decay = if param.decay {
                (1.0 - lr * self.cfg.weight_decay) as f32
            } else {
                1.0
            };
            let m = std::sync::Mutex::new(&mut self.m[i]);
            let v = std::sync::Mutex::new(&mut self.v[i]);
            let op = Update {
                name: &param.name,
                update: |p: &mut [f32], g: &[f32]| {
                    let mut m = m.lock().unwrap_or_else(|e| e.into_inner());
                    let mut v = v.lock().unwrap_or_else(|e| e.into_inner());
                    p.par_chunks_mut(CHUNK)
                        .zip(g.par_chunks(CHUNK))
                        .zip(m.par_chunks_mut(CHUNK).zip(v.par_chunks_mut(CHUNK)))
                        .for_each(|((p, g), (m, v))| {
                            for j in 0..p.len() {
                                let g = g[j] * gs;
                                m[j] = b1 * m[j] + (1.0 - b1) * g;
                                v[j] = b2 * v[j] + (1.0 - b2) * g * g;
                                let denom = v[j].sqrt() / bc2_sqrt + eps;
                                p[j] = p[j] * decay - step_size * m[j] / denom;
                            }
                        });
                },
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
        #[cfg(feature = "cuda")]
        if let Some(fused) = &self.fused {
            let host = |t: &Tensor| -> Vec<f32> {
                t.flatten_all()
                    .and_then(|t| t.to_vec1::<f32>())
                    .expect("copying the AdamW moments from the GPU failed")
            };
            let (m, v) = fused.moments();
            let mut buffers = Vec::with_capacity(2 * self.params.len());
            for (i, p) in self.params.iter().enumerate() {
                buffers.push((format!("exp_avg.{}", p.name), host(&m[i])));
                buffers.push((format!("exp_avg_sq.{}", p.name), host(&v[i])));
            }
            return OptimizerState {
                step: self.step,
                buffers,
            };
        }
        let mut buffers = Vec::with_capacity(2 * self.params.len());
        for (i, p) in self.params.iter().enumerate() {
            buffers.push((format!("exp_avg.{}", p.name), self.m[i].clone()));
            buffers.push((format!("exp_avg_sq.{}", p.name), self.v[i].clone()));
        }
        OptimizerState {
            step: self.step,
            buffers,
        }
    }

    fn load_state(&mut self, state: &OptimizerState) -> Result<()> {
        #[cfg(feature = "cuda")]
        if let Some(fused) = &mut self.fused {
            let (mut ms, mut vs) = (Vec::new(), Vec::new());
            for p in &self.params {
                let dev = p.var.device();
                let mut m = vec![0f32; p.var.elem_count()];
                let mut v = vec![0f32; p.var.elem_count()];
                restore(state, &format!("exp_avg.{}", p.name), &mut m)?;
                restore(state, &format!("exp_avg_sq.{}", p.name), &mut v)?;
                ms.push(Tensor::from_vec(m, p.var.shape(), dev)?);
                vs.push(Tensor::from_vec(v, p.var.shape(), dev)?);
            }
            fused.set_moments(ms, vs)?;
            self.step = state.step;
            return Ok(());
        }
        for (i, p) in self.params.iter().enumerate() {
            restore(state, &format!("exp_avg.{}", p.name), &mut self.m[i])?;
            restore(state, &format!("exp_avg_sq.{}", p.name), &mut self.v[i])?;
        }
        self.step = state.step;
        Ok(())
    }
}
