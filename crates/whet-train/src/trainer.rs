//! The training loop: micro-batches, gradient accumulation normalised by supervised tokens,
//! clipping, evaluation, early stopping, checkpoints and exact resume; data-parallel over the
//! ranks of a [`Communicator`].
//!
//! Data parallelism keeps the arithmetic of one process. A step's global batch is always
//! `micro_batch * grad_accum` rows of the seeded epoch order, whatever the world size: its
//! micro-batches are dealt round-robin to the ranks (micro-batch `j` to rank `j % world`), so each
//! rank reads a disjoint shard of every step and, over an epoch, every row exactly once. Each rank
//! accumulates the summed loss gradients of its micro-batches; the ranks sum their gradients
//! (bucketed all-reduce) and their supervised-token counts, and every rank applies the same
//! update `grad_sum / global supervised tokens`. Dropout is seeded by the global micro-batch
//! index. So a run gives the same parameters (up to float summation order) on any number of
//! ranks, and a checkpoint written at one world size resumes at another.

use std::path::{Path, PathBuf};
use std::time::Instant;

use candle_core::{DType, Device, Tensor};
use serde::Serialize;
use whet_model::Model;
use whet_optim::{AdamW, AdamWConfig, Optimizer, OptimizerState, Param, Schedule, Sgd, SgdConfig};

use crate::checkpoint::{self, TrainerState};
use crate::comm::{self, Agreement, Communicator};
use crate::config::{Config, Method, OptimizerKind};
use crate::rows::{Batch, Cursor, Row, epoch_order};
use crate::{Result, TrainError};

/// One optimizer step, as reported to observers and to `metrics.jsonl`.
#[derive(Debug, Clone, Serialize)]
pub struct StepMetrics {
    pub step: u64,
    pub total_steps: u64,
    pub epoch: f64,
    /// Mean cross-entropy per supervised token over the whole accumulated batch.
    pub loss: f64,
    pub lr: f64,
    pub grad_norm: f64,
    pub supervised_tokens: usize,
    pub tokens: usize,
    pub tokens_per_s: f64,
    pub elapsed_s: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct EvalMetrics {
    pub step: u64,
    pub val_loss: f64,
    pub val_ppl: f64,
    pub val_tokens: usize,
    pub improved: bool,
}

/// What the orchestrator shows the user (progress bar, logs).
pub trait Observer {
    fn on_start(&mut self, _total_steps: u64, _resumed_from: u64) {}
    fn on_step(&mut self, _m: &StepMetrics) {}
    fn on_eval(&mut self, _m: &EvalMetrics) {}
    fn on_checkpoint(&mut self, _dir: &Path) {}
}

/// An observer that does nothing.
pub struct Quiet;
impl Observer for Quiet {}

#[derive(Debug, Clone, Serialize)]
pub struct Summary {
    pub steps: u64,
    pub resumed_from: u64,
    pub first_loss: Option<f64>,
    pub last_loss: Option<f64>,
    pub best_val_loss: Option<f64>,
    pub best_step: Option<u64>,
    pub best_checkpoint: Option<PathBuf>,
    pub stopped_early: bool,
    pub evals: Vec<EvalMetrics>,
    pub losses: Vec<f64>,
}

/// Mean cross-entropy of `rows` under `model`, as `(loss, supervised tokens)`. The model should
/// be in evaluation mode (`set_training(false)`: no dropout).
pub fn evaluate(
    model: &Model,
    rows: &[Row],
    micro_batch: usize,
    device: &Device,
) -> Result<(f64, usize)> {
    evaluate_sharded(model, rows, micro_batch, device, &comm::Single)
}

/// [`evaluate`] over the ranks of `comm`: each rank scores the micro-batches `j` with
/// `j % world == rank`, and the loss sums and token counts are summed over the ranks, so every
/// rank returns the same value (that of one process, up to summation order).
pub fn evaluate_sharded(
    model: &Model,
    rows: &[Row],
    micro_batch: usize,
    device: &Device,
    comm: &dyn Communicator,
) -> Result<(f64, usize)> {
    let (rank, world) = (comm.rank(), comm.world_size());
    let (mut sum, mut n) = (0f64, 0usize);
    for (j, chunk) in rows.chunks(micro_batch.max(1)).enumerate() {
        if j % world != rank {
            continue;
        }
        let refs: Vec<&Row> = chunk.iter().collect();
        let batch = Batch::from_rows(&refs, device)?;
        if batch.supervised == 0 {
            continue;
        }
        let (loss, count) = model.loss(
            &batch.ids,
            &batch.positions,
            &batch.segments,
            &batch.targets,
        )?;
        let value = loss.to_scalar::<f32>()?;
        model.ensure_finite("the evaluation loss", value)?;
        sum += value as f64;
        n += count;
    }
    if world > 1 {
        let total = comm::sum_over_ranks(comm, &[sum, n as f64])?;
        (sum, n) = (total[0], total[1] as usize);
    }
    Ok((if n == 0 { f64::NAN } else { sum / n as f64 }, n))
}

pub struct Trainer<'a> {
    pub model: &'a mut Model,
    pub config: &'a Config,
    pub train: &'a [Row],
    pub validation: &'a [Row],
    pub out: &'a Path,
    pub device: Device,
    /// Identifies this run (config + data); a checkpoint of another run is never resumed.
    pub run_id: String,
    /// The ranks this run is data-parallel over ([`comm::Single`] for one process). Every rank
    /// runs the same `Trainer` on the same rows; rank 0 alone writes checkpoints and metrics.
    pub comm: &'a dyn Communicator,
}

impl Trainer<'_> {
    fn build_optimizer(&self, params: Vec<Param>) -> Result<Box<dyn Optimizer>> {
        let t = &self.config.train;
        Ok(match t.optimizer {
            OptimizerKind::Adamw => Box::new(AdamW::new(
                params,
                AdamWConfig {
                    beta1: t.beta1,
                    beta2: t.beta2,
                    eps: 1e-8,
                    weight_decay: t.weight_decay,
                },
            )?),
            OptimizerKind::Sgd => Box::new(Sgd::new(
                params,
                SgdConfig {
                    momentum: t.momentum,
                    nesterov: false,
                    weight_decay: t.weight_decay,
                },
            )?),
        })
    }

    pub fn steps_per_epoch(&self) -> u64 {
        let t = &self.config.train;
        // `run` refuses a config whose product overflows; saturate so this never panics.
        let per_step = t.micro_batch.saturating_mul(t.grad_accum).max(1);
        self.train.len().div_ceil(per_step).max(1) as u64
    }

    pub fn total_steps(&self) -> u64 {
        let t = &self.config.train;
        if t.max_steps > 0 {
            t.max_steps
        } else {
            ((t.epochs * self.steps_per_epoch() as f64).ceil() as u64).max(1)
        }
    }

    /// Runs (or resumes) training to the end and returns what happened. With several ranks,
    /// every rank calls this with the same config and rows and gets the same summary.
    pub fn run(&mut self, observer: &mut dyn Observer) -> Result<Summary> {
        // A config built in code has not been through `Config::load`.
        self.config.validate(Path::new("<training config>"))?;
        if self.train.is_empty() {
            return Err(TrainError::EmptySplit {
                split: "training",
                hint: "no rows survived reading and tokenization",
            });
        }
        if self.train.iter().all(|r| r.supervised() == 0) {
            return Err(TrainError::NoSupervisedTokens);
        }
        let comm = self.comm;
        let (rank, world) = (comm.rank(), comm.world_size());
        let writer = rank == 0;
        if writer {
            // Before anything is written: a new or empty folder, or this run's own.
            checkpoint::claim(self.out, &self.run_id)?;
        }
        let params: Vec<Param> = self
            .model
            .trainable()
            .into_iter()
            .map(|(name, var)| Param::new(name, var))
            .collect();
        let mut optimizer = self.build_optimizer(params)?;
        let t = self.config.train.clone();
        let total_steps = self.total_steps();
        let schedule = Schedule::new(
            t.schedule,
            t.lr,
            t.warmup_steps,
            total_steps,
            t.min_lr_ratio,
        )?;

        let mut state = TrainerState {
            step: 0,
            cursor: Cursor::default(),
            run_id: self.run_id.clone(),
            best_val_loss: None,
            best_step: None,
            stale_evals: 0,
            tokens_seen: 0,
        };
        // This run's folder: resume from its last checkpoint, or (killed before its first one)
        // start over; `MetricsLog::open` empties the metrics of the lost steps.
        if let Some((_, dir)) = checkpoint::list(self.out).pop() {
            state = self.resume(&dir, optimizer.as_mut())?;
            if writer {
                checkpoint::repair_best(self.out, state.best_step)?;
            }
        }
        let bucket_elems = comm.bucket_elems()?;
        if world > 1 {
            // Before rank 0 writes anything: every rank runs the same run from the same state.
            self.agree_on_start(&state, optimizer.params())?;
        }
        let resumed_from = state.step;
        observer.on_start(total_steps, resumed_from);
        let mut metrics = if writer {
            Some(crate::metrics::MetricsLog::open(
                &self.out.join("metrics.jsonl"),
                resumed_from,
            )?)
        } else {
            None
        };
        let mut summary = Summary {
            steps: 0,
            resumed_from,
            first_loss: None,
            last_loss: None,
            best_val_loss: state.best_val_loss,
            best_step: state.best_step,
            best_checkpoint: None,
            stopped_early: false,
            evals: Vec::new(),
            losses: Vec::new(),
        };
        let per_step = t.micro_batch * t.grad_accum; // checked by `validate`
        let steps_per_epoch = self.steps_per_epoch();
        let started = Instant::now();
        let mut order = epoch_order(self.train.len(), t.seed, state.cursor.epoch);
        self.model.set_training(true);
        self.model.set_neftune(t.neftune_alpha);
        self.model
            .set_activation_checkpointing(t.activation_checkpointing);

        while state.step < total_steps {
            // Gather this step's rows, crossing into the next epoch where needed. Every rank
            // walks the same global order; it computes only its own micro-batches.
            let mut rows: Vec<&Row> = Vec::with_capacity(per_step);
            while rows.len() < per_step {
                if state.cursor.offset >= order.len() {
                    state.cursor = Cursor {
                        epoch: state.cursor.epoch + 1,
                        offset: 0,
                    };
                    order = epoch_order(self.train.len(), t.seed, state.cursor.epoch);
                    if !rows.is_empty() && t.max_steps == 0 {
                        break; // an epoch boundary ends a short last step
                    }
                }
                rows.push(&self.train[order[state.cursor.offset]]);
                state.cursor.offset += 1;
            }
            let step_start = Instant::now();
            let mut grads: Vec<Option<Tensor>> = vec![None; optimizer.params().len()];
            let mut local = LocalStep::default();
            for (micro, chunk) in rows.chunks(t.micro_batch).enumerate() {
                if micro % world != rank {
                    continue; // another rank's micro-batch
                }
                local.tokens += chunk.iter().map(|r| r.input_ids.len()).sum::<usize>();
                local.supervised += chunk.iter().map(|r| r.supervised()).sum::<usize>();
                let batch = Batch::from_rows(chunk, &self.device)?;
                if batch.supervised == 0 {
                    continue;
                }
                self.model
                    .reseed_dropout(t.seed ^ (state.step << 16) ^ micro as u64);
                let (loss, _) = self.model.loss(
                    &batch.ids,
                    &batch.positions,
                    &batch.segments,
                    &batch.targets,
                )?;
                let value = loss.to_scalar::<f32>()?;
                if !value.is_finite() {
                    local.non_finite = Some((micro, value));
                    break;
                }
                local.loss_sum += value as f64;
                let store = self.model.backward(&loss)?;
                for (slot, p) in grads.iter_mut().zip(optimizer.params()) {
                    if let Some(g) = store.get(p.var.as_tensor()) {
                        *slot = Some(match slot.take() {
                            Some(acc) => (acc + g)?,
                            None => g.clone(),
                        });
                    }
                }
            }
            // Normalise by the supervised tokens of the whole accumulated batch, over every
            // rank, not per micro-batch or per rank.
            let global = if world == 1 {
                local.clone()
            } else {
                local.sum_over_ranks(comm, &grads)?
            };
            if let Some((micro, value)) = global.non_finite {
                return Err(TrainError::NonFinite {
                    step: state.step + 1,
                    micro,
                    value,
                    cause: self.model.non_finite_cause(),
                });
            }
            if world > 1 {
                grads = all_reduce_gradients(
                    comm,
                    optimizer.params(),
                    grads,
                    &global.has_grad,
                    bucket_elems,
                )?;
            }
            let (supervised, tokens) = (global.supervised, global.tokens);
            let scale = 1.0 / supervised.max(1) as f64;
            let grad_norm = whet_optim::global_norm(&grads, scale)?;
            if !grad_norm.is_finite() {
                return Err(TrainError::NonFinite {
                    step: state.step + 1,
                    micro: 0,
                    value: grad_norm as f32,
                    cause: self.model.non_finite_cause(),
                });
            }
            let factor = whet_optim::clip_factor(grad_norm, t.max_grad_norm);
            let lr = schedule.lr(state.step);
            optimizer.step(&grads, lr, scale * factor)?;
            drop(grads);
            state.step += 1;
            state.tokens_seen += tokens as u64;
            let loss = global.loss_sum * scale;
            summary.first_loss.get_or_insert(loss);
            summary.last_loss = Some(loss);
            summary.losses.push(loss);
            let m = StepMetrics {
                step: state.step,
                total_steps,
                epoch: state.cursor.epoch as f64
                    + state.cursor.offset as f64 / self.train.len() as f64,
                loss,
                lr,
                grad_norm,
                supervised_tokens: supervised,
                tokens,
                tokens_per_s: tokens as f64 / step_start.elapsed().as_secs_f64().max(1e-9),
                elapsed_s: started.elapsed().as_secs_f64(),
            };
            if let Some(log) = metrics.as_mut() {
                log.step(&m)?;
            }
            observer.on_step(&m);

            let end_of_epoch = state.step.is_multiple_of(steps_per_epoch);
            let last = state.step == total_steps;
            let eval_now = if t.eval_every > 0 {
                state.step.is_multiple_of(t.eval_every) || last
            } else {
                end_of_epoch || last
            };
            let mut stop = false;
            if eval_now && !self.validation.is_empty() {
                self.model.set_training(false);
                // Summed over the ranks: every rank sees the same loss and makes the same
                // early-stopping decision.
                let (val_loss, val_tokens) = evaluate_sharded(
                    self.model,
                    self.validation,
                    t.micro_batch,
                    &self.device,
                    comm,
                )?;
                self.model.set_training(true);
                let improved = state
                    .best_val_loss
                    .is_none_or(|b| val_loss < b - t.min_delta);
                if improved {
                    state.best_val_loss = Some(val_loss);
                    state.best_step = Some(state.step);
                    state.stale_evals = 0;
                } else {
                    state.stale_evals += 1;
                }
                let e = EvalMetrics {
                    step: state.step,
                    val_loss,
                    val_ppl: val_loss.exp(),
                    val_tokens,
                    improved,
                };
                if let Some(log) = metrics.as_mut() {
                    log.eval(&e)?;
                }
                observer.on_eval(&e);
                summary.evals.push(e);
                stop = t.patience > 0 && state.stale_evals >= t.patience;
            }
            let save_now = eval_now
                || (self.config.output.save_every > 0
                    && state.step.is_multiple_of(self.config.output.save_every));
            // Rank 0 writes; the others go on to the next step's collectives and wait there.
            if writer && (save_now || stop || last) {
                let dir = self.save(&state, optimizer.as_ref())?;
                observer.on_checkpoint(&dir);
                if state.best_step == Some(state.step) {
                    checkpoint::mark_best(self.out, state.step)?;
                }
                checkpoint::prune(self.out, self.config.output.keep_last, state.best_step)?;
            }
            if stop {
                summary.stopped_early = true;
                break;
            }
        }
        self.model.set_training(false);
        summary.steps = state.step;
        summary.best_val_loss = state.best_val_loss;
        summary.best_step = state.best_step;
        summary.best_checkpoint = state
            .best_step
            .map(|s| self.out.join(checkpoint::checkpoint_name(s)));
        Ok(summary)
    }

    /// Checks, before the first step, that every rank runs the same run (config and data) from
    /// the same checkpoint with the same trainable values.
    fn agree_on_start(&self, state: &TrainerState, params: &[Param]) -> Result<()> {
        let run = fnv64(self.run_id.as_bytes());
        let mut values = 0xcbf2_9ce4_8422_2325u64;
        for p in params {
            values = fnv64_continue(values, p.name.as_bytes());
            values = hash_values(values, p.var.as_tensor())?;
        }
        let low48 = |h: u64| (h & ((1 << 48) - 1)) as f64;
        comm::agree(
            self.comm,
            &[
                Agreement {
                    what: "the run (config and data)",
                    value: low48(run),
                    hint: "Every rank must read the same config, overrides and data files",
                },
                Agreement {
                    what: "the step to resume from",
                    value: state.step as f64,
                    hint: "The ranks see different checkpoints in output.dir: put it on a \
                           filesystem every host shares",
                },
                Agreement {
                    what: "the trainable values",
                    value: low48(values),
                    hint: "The ranks loaded different weights: every host needs the same model \
                           files (and output.dir shared, for resuming)",
                },
            ],
        )
    }

    fn save(&self, state: &TrainerState, optimizer: &dyn Optimizer) -> Result<PathBuf> {
        let opt_state = optimizer.state();
        checkpoint::write(self.out, state, &self.config.to_toml(), |dir| {
            match self.config.method {
                Method::Lora => self.model.save_adapter(dir)?,
                Method::Full => self.model.save_pretrained(dir)?,
            }
            crate::state_io::write_optimizer(&dir.join(checkpoint::OPTIMIZER_FILE), &opt_state)
        })
    }

    fn resume(&mut self, dir: &Path, optimizer: &mut dyn Optimizer) -> Result<TrainerState> {
        let state = checkpoint::read_state(dir)?;
        if state.run_id != self.run_id {
            return Err(TrainError::ForeignOutput {
                dir: self.out.to_path_buf(),
                why: format!(
                    "checkpoint {} was written by run {}, this is run {}",
                    dir.display(),
                    state.run_id,
                    self.run_id
                ),
            });
        }
        load_trainable(self.model, dir, self.config.method)?;
        let opt: OptimizerState =
            crate::state_io::read_optimizer(&dir.join(checkpoint::OPTIMIZER_FILE))?;
        optimizer.load_state(&opt)?;
        Ok(state)
    }
}

/// The weights file a checkpoint of `method` holds.
pub fn weights_file(dir: &Path, method: Method) -> PathBuf {
    dir.join(match method {
        Method::Lora => "adapter_model.safetensors",
        Method::Full => "model.safetensors",
    })
}

/// Copies a checkpoint's values into the model's existing trainable `Var`s, so an optimizer
/// that holds those `Var`s keeps working (resume, and "load the best checkpoint").
pub fn load_trainable(model: &Model, dir: &Path, method: Method) -> Result<()> {
    let path = weights_file(dir, method);
    let bad = |message: String| TrainError::CheckpointRead {
        path: path.clone(),
        message,
    };
    let tensors =
        candle_core::safetensors::load(&path, model.device()).map_err(|e| bad(e.to_string()))?;
    for (name, var) in model.trainable() {
        let t = tensors
            .get(&name)
            .ok_or_else(|| bad(format!("no tensor `{name}`")))?;
        if t.dims() != var.dims() {
            return Err(bad(format!(
                "`{name}` has shape {:?}, the model needs {:?}",
                t.dims(),
                var.dims()
            )));
        }
        var.set(&t.to_dtype(var.dtype())?)?;
    }
    Ok(())
}

/// What one rank did in a step, and after [`LocalStep::sum_over_ranks`], what all ranks did.
#[derive(Debug, Clone, Default)]
struct LocalStep {
    supervised: usize,
    tokens: usize,
    loss_sum: f64,
    /// The first micro-batch whose loss was not finite, and that loss.
    non_finite: Option<(usize, f32)>,
    /// Per parameter: whether any rank has a gradient for it (filled by `sum_over_ranks`).
    has_grad: Vec<bool>,
}

impl LocalStep {
    /// One all-gather of the counts, the loss sum, the first non-finite micro-batch and which
    /// parameters got a gradient, summed in rank order (the same bits on every rank).
    fn sum_over_ranks(&self, comm: &dyn Communicator, grads: &[Option<Tensor>]) -> Result<Self> {
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
fn all_reduce_gradients(
    comm: &dyn Communicator,
    params: &[Param],
    grads: Vec<Option<Tensor>>,
    has_grad: &[bool],
    bucket_elems: usize,
) -> Result<Vec<Option<Tensor>>> {
    let numels: Vec<usize> = params.iter().map(|p| p.var.elem_count()).collect();
    let plan = comm::plan_buckets(&numels, bucket_elems);
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

fn fnv64(bytes: &[u8]) -> u64 {
    fnv64_continue(0xcbf2_9ce4_8422_2325, bytes)
}

fn fnv64_continue(mut h: u64, bytes: &[u8]) -> u64 {
    for &b in bytes {
        h ^= b as u64;
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}

/// Folds the exact bits of `t`'s values into `h`, in order: equal on two ranks only when the
/// values are identical (no float sum whose order could differ between hosts).
fn hash_values(h: u64, t: &Tensor) -> Result<u64> {
    let t = t.flatten_all()?;
    let (storage, layout) = t.storage_and_layout();
    if let candle_core::Storage::Cpu(cpu) = &*storage
        && let Ok(data) = cpu.as_slice::<f32>()
    {
        let start = layout.start_offset();
        let data = &data[start..start + t.elem_count()];
        return Ok(data
            .iter()
            .fold(h, |h, x| fnv64_continue(h, &x.to_bits().to_le_bytes())));
    }
    drop(storage);
    let values = t.to_dtype(DType::F32)?.to_vec1::<f32>()?;
    Ok(values
        .iter()
        .fold(h, |h, x| fnv64_continue(h, &x.to_bits().to_le_bytes())))
}
