//! The training loop: each step's rows in the seeded epoch order, one [`Step`] (gradient
//! accumulation normalised by supervised tokens, clipping, the update), evaluation, early
//! stopping, checkpoints and exact resume; data-parallel over the ranks of a [`Communicator`].
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

use candle_core::Device;
use serde::Serialize;
use whet_model::Model;
use whet_optim::{Optimizer, OptimizerState, Param};

use crate::checkpoint::{self, TrainerState};
use crate::comm::{self, Communicator};
use crate::config::{Method, TrainerConfig};
use crate::metrics::{EvalMetrics, MetricsLog, SetLoss, StepMetrics};
use crate::preference::{
    Objective, PreferenceMetrics, PreferenceObjective, ReferenceLogps, SeqLogp,
};
use crate::rows::{Batch, Cursor, Row, RowSource, epoch_order};
use crate::step::Step;
use crate::{Result, TrainError};

/// What the orchestrator shows the user (progress bar, logs).
pub trait Observer {
    fn on_start(&mut self, _total_steps: u64, _resumed_from: u64) {}
    fn on_step(&mut self, _m: &StepMetrics) {}
    fn on_eval(&mut self, _m: &EvalMetrics) {}
    fn on_checkpoint(&mut self, _dir: &Path) {}
}

/// Task metrics of the model as it is now, for `TrainerConfig::select_by` and
/// `TrainerConfig::metric_every`: the orchestrator generates completions for its evaluation
/// examples and scores them (whet's `task_eval`). Every value is higher-is-better.
pub trait TaskScorer {
    /// The names of the values [`TaskScorer::score`] returns, in that order (`accuracy`, ...).
    fn names(&self) -> Vec<String>;
    /// One value per name. The model is in evaluation mode.
    fn score(
        &mut self,
        model: &Model,
    ) -> std::result::Result<Vec<f64>, Box<dyn std::error::Error + Send + Sync>>;
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
    /// The best value of the metric that selects (`TrainerConfig::select_by`), if one does.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub best_metric: Option<f64>,
    pub best_step: Option<u64>,
    pub best_checkpoint: Option<PathBuf>,
    pub stopped_early: bool,
    pub evals: Vec<EvalMetrics>,
    pub losses: Vec<f64>,
    /// Where this call's time went.
    pub time: TrainTime,
    /// Supervised tokens trained on from each source of a mixture, by name, over the whole run
    /// (a resumed run's included); empty for rows of one source.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub tokens_by_source: Vec<(String, u64)>,
}

/// Seconds a [`Trainer::run`] spent in each part of the loop.
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct TrainTime {
    /// Optimizer steps: forward, backward, update.
    pub steps_s: f64,
    /// Validation (and named eval sets) during training.
    pub eval_s: f64,
    /// Writing checkpoints.
    pub checkpoint_s: f64,
    /// Task metrics during training (generation and scoring; part of `eval_s`).
    pub metric_s: f64,
}

/// The mean preference loss of pair `rows` (laid out as [`Objective`] says) under `model`, in
/// batches of `micro_batch` pairs, and the pair-weighted means of the rewards, margin and
/// accuracy (`None` without pairs). `reference`: the rows' precomputed reference
/// log-probabilities, if the reference is not the model with its adapters off. The model should
/// be in evaluation mode.
pub fn evaluate_preference(
    model: &Model,
    objective: &PreferenceObjective,
    rows: &(impl RowSource + ?Sized),
    reference: Option<&[SeqLogp]>,
    micro_batch: usize,
    device: &Device,
) -> Result<(f64, Option<PreferenceMetrics>)> {
    evaluate_preference_sharded(
        model,
        objective,
        rows,
        reference,
        micro_batch,
        device,
        &comm::Single,
    )
}

/// [`evaluate_preference`] over the ranks of `comm`: each rank scores the batches `j` with
/// `j % world == rank`; the sums and metrics are combined over the ranks, so every rank returns
/// the same values (those of one process, up to summation order).
pub fn evaluate_preference_sharded(
    model: &Model,
    objective: &PreferenceObjective,
    rows: &(impl RowSource + ?Sized),
    reference: Option<&[SeqLogp]>,
    micro_batch: usize,
    device: &Device,
    comm: &dyn Communicator,
) -> Result<(f64, Option<PreferenceMetrics>)> {
    let (rank, world) = (comm.rank(), comm.world_size());
    let (mut sum, mut parts) = (0f64, Vec::new());
    let size = 2 * micro_batch.max(1);
    for (j, start) in (0..rows.len()).step_by(size).enumerate() {
        if j % world != rank {
            continue;
        }
        let end = (start + size).min(rows.len());
        let owned: Vec<_> = (start..end).map(|i| rows.row(i)).collect();
        let refs: Vec<&Row> = owned.iter().map(|r| r.as_ref()).collect();
        let batch = match reference {
            Some(r) => Batch::from_pair_rows_with_reference(&refs, &r[start..end], device)?,
            None => Batch::from_pair_rows(&refs, device)?,
        };
        if batch.supervised == 0 {
            continue;
        }
        let out = objective.batch_loss(model, &batch)?;
        let value = out.loss.to_scalar::<f32>()?;
        model.ensure_finite("the evaluation loss", value)?;
        sum += value as f64 * batch.supervised as f64;
        parts.push(out.metrics);
    }
    if world > 1 {
        sum = comm::sum_over_ranks(comm, &[sum])?[0];
    }
    let metrics = PreferenceMetrics::over_ranks(PreferenceMetrics::weighted_mean(&parts), comm)?;
    let pairs = metrics.as_ref().map_or(0, |m| m.pairs);
    let loss = if pairs == 0 {
        f64::NAN
    } else {
        sum / pairs as f64
    };
    Ok((loss, metrics))
}

/// Mean cross-entropy of `rows` under `model`, as `(loss, supervised tokens)`. The model should
/// be in evaluation mode (`set_training(false)`: no dropout).
pub fn evaluate(
    model: &Model,
    rows: &(impl RowSource + ?Sized),
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
    rows: &(impl RowSource + ?Sized),
    micro_batch: usize,
    device: &Device,
    comm: &dyn Communicator,
) -> Result<(f64, usize)> {
    let (rank, world) = (comm.rank(), comm.world_size());
    let (mut sum, mut n) = (0f64, 0usize);
    let size = micro_batch.max(1);
    for (j, start) in (0..rows.len()).step_by(size).enumerate() {
        if j % world != rank {
            continue;
        }
        let owned: Vec<_> = (start..(start + size).min(rows.len()))
            .map(|i| rows.row(i))
            .collect();
        let refs: Vec<&Row> = owned.iter().map(|r| r.as_ref()).collect();
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
    pub config: &'a TrainerConfig,
    /// The training rows: in memory, or made on demand from a store ([`RowSource`]).
    pub train: &'a dyn RowSource,
    /// The validation rows: in memory, or made on demand from a store.
    pub validation: &'a dyn RowSource,
    pub out: &'a Path,
    pub device: Device,
    /// Identifies this run (config + data); a checkpoint of another run is never resumed.
    pub run_id: String,
    /// The ranks this run is data-parallel over ([`comm::Single`] for one process). Every rank
    /// runs the same `Trainer` on the same rows; rank 0 alone writes checkpoints and metrics.
    pub comm: &'a dyn Communicator,
    /// Named evaluation sets, each scored at every evaluation beside `validation` and logged
    /// with its name; only `validation` decides early stopping and the best checkpoint.
    pub eval_sets: &'a [(String, Vec<Row>)],
    /// Task metrics during training: needed when `config.select_by` names a metric or
    /// `config.metric_every > 0`.
    pub scorer: Option<&'a mut dyn TaskScorer>,
    /// A preference run's reference log-probabilities computed before training: required for
    /// DPO / IPO with full fine-tuning (no reference is left once the weights move); for LoRA
    /// they replace the adapter-off forward of every step.
    pub reference: Option<&'a ReferenceLogps>,
}

impl<'a> Trainer<'a> {
    pub fn steps_per_epoch(&self) -> u64 {
        let t = self.config;
        // `run` refuses a config whose product overflows; saturate so this never panics.
        let per_step = t.micro_batch.saturating_mul(t.grad_accum).max(1);
        self.units().div_ceil(per_step).max(1) as u64
    }

    /// The units of training data: rows, or pairs of rows for a preference objective.
    fn units(&self) -> usize {
        self.train.epoch_len() / self.config.objective.rows_per_unit()
    }

    /// The units epoch `epoch` visits, in order: the rows' own order ([`RowSource::epoch_order`])
    /// or, for pairs, a seeded shuffle of the pairs.
    fn order(&self, epoch: u64) -> Vec<usize> {
        match self.config.objective.rows_per_unit() {
            1 => self.train.epoch_order(self.config.seed, epoch),
            _ => epoch_order(self.units(), self.config.seed, epoch),
        }
    }

    pub fn total_steps(&self) -> u64 {
        let t = self.config;
        if t.max_steps > 0 {
            t.max_steps
        } else {
            ((t.epochs * self.steps_per_epoch() as f64).ceil() as u64).max(1)
        }
    }

    /// Runs (or resumes) training to the end and returns what happened. With several ranks,
    /// every rank calls this with the same config and rows and gets the same summary.
    pub fn run(&mut self, observer: &mut dyn Observer) -> Result<Summary> {
        self.check()?;
        let (t, comm) = (self.config, self.comm);
        let writer = comm.rank() == 0;
        if writer {
            // Before anything is written: a new or empty folder, or this run's own.
            checkpoint::claim(self.out, &self.run_id)?;
        }
        let mut optimizer = self.optimizer()?;
        let total_steps = self.total_steps();
        let schedule = t.schedule(total_steps)?;
        let mut state = self.start(optimizer.as_mut(), writer)?;
        let step = Step {
            comm,
            bucket_elems: comm.bucket_elems()?,
            max_grad_norm: t.max_grad_norm,
            dropout_seed: Some(t.seed),
            after_backward: None,
            objective: t.objective,
        };
        if comm.world_size() > 1 {
            // Before rank 0 writes anything: every rank runs the same run from the same state.
            comm::agree_on_start(comm, &self.run_id, state.step, optimizer.params())?;
        }
        observer.on_start(total_steps, state.step);
        let mut log = Log::open(self.out, writer, &state, observer)?;
        let started = Instant::now();
        let mut order = self.order(state.cursor.epoch);
        let sources = self.train.source_names();
        state.tokens_by_source.resize(sources.len(), 0);
        let unit = t.objective.rows_per_unit();
        self.model.set_training(true);
        self.model.set_neftune(t.neftune_alpha);
        self.model
            .set_activation_checkpointing(t.activation_checkpointing);

        while state.step < total_steps {
            let picked = self.next_rows(&mut state.cursor, &mut order);
            let step_start = Instant::now();
            let lr = schedule.lr(state.step);
            let micro_batches: Vec<&[usize]> = picked.chunks(t.micro_batch * unit).collect();
            let (device, train, reference) = (&self.device, self.train, self.reference);
            let step_clock = Instant::now();
            let done = step.run(
                self.model,
                optimizer.as_mut(),
                state.step,
                lr,
                micro_batches.len(),
                |j| {
                    let owned: Vec<std::borrow::Cow<'_, Row>> =
                        micro_batches[j].iter().map(|&i| train.row(i)).collect();
                    let rows: Vec<&Row> = owned.iter().map(|r| r.as_ref()).collect();
                    match (t.objective, reference) {
                        (Objective::Sft, _) => Batch::from_rows(&rows, device),
                        (Objective::Preference(_), None) => Batch::from_pair_rows(&rows, device),
                        (Objective::Preference(_), Some(r)) => {
                            let values: Vec<SeqLogp> =
                                micro_batches[j].iter().map(|&i| r.train[i]).collect();
                            Batch::from_pair_rows_with_reference(&rows, &values, device)
                        }
                    }
                },
            )?;
            log.summary.time.steps_s += step_clock.elapsed().as_secs_f64();
            state.step += 1;
            state.tokens_seen += done.tokens as u64;
            if !sources.is_empty() {
                // Every rank counts every rank's rows: the counts agree without a message.
                for &i in &picked {
                    state.tokens_by_source[self.train.source(i)] += self.train.supervised(i) as u64;
                }
            }
            log.step(&StepMetrics {
                step: state.step,
                total_steps,
                epoch: state.cursor.epoch as f64 + state.cursor.offset as f64 / self.units() as f64,
                loss: done.loss,
                lr,
                grad_norm: done.grad_norm,
                supervised_tokens: done.supervised,
                tokens: done.tokens,
                tokens_per_s: done.tokens as f64 / step_start.elapsed().as_secs_f64().max(1e-9),
                elapsed_s: started.elapsed().as_secs_f64(),
                preference: done.preference,
            })?;

            let last = state.step == total_steps;
            let eval_now = self.eval_due(state.step, last);
            let mut stop = false;
            if eval_now && !self.validation.is_empty() {
                let clock = Instant::now();
                let (e, metric_s) = self.evaluate_now(&mut state, last)?;
                log.summary.time.eval_s += clock.elapsed().as_secs_f64();
                log.summary.time.metric_s += metric_s;
                log.eval(e)?;
                stop = t.patience > 0 && state.stale_evals >= t.patience;
            }
            let save_now =
                eval_now || (t.save_every > 0 && state.step.is_multiple_of(t.save_every));
            // Rank 0 writes; the others go on to the next step's collectives and wait there.
            if writer && (save_now || stop || last) {
                let clock = Instant::now();
                self.checkpoint(&state, optimizer.as_ref(), &mut log)?;
                log.summary.time.checkpoint_s += clock.elapsed().as_secs_f64();
            }
            if stop {
                log.summary.stopped_early = true;
                break;
            }
        }
        self.model.set_training(false);
        log.summary.tokens_by_source = sources
            .into_iter()
            .zip(state.tokens_by_source.iter().copied())
            .collect();
        Ok(log.finish(&state, self.out))
    }

    /// The config (one built in code has not been through the run config's validation) and
    /// rows with something to learn.
    fn check(&self) -> Result<()> {
        self.config.validate(Path::new("<training config>"))?;
        if self.train.is_empty() {
            return Err(TrainError::EmptySplit {
                split: "training",
                hint: "no rows survived reading and tokenization",
            });
        }
        if !self.train.any_supervised() {
            return Err(TrainError::NoSupervisedTokens);
        }
        let config = |message: String| TrainError::Config {
            path: "<training config>".into(),
            message,
        };
        let names = self.scorer.as_ref().map(|s| s.names());
        if let Some(name) = &self.config.select_by {
            match &names {
                None => {
                    return Err(config(format!(
                        "`train.select_by` follows the task metric `{name}`, and the trainer has no task scorer"
                    )));
                }
                Some(names) if !names.contains(name) => {
                    return Err(config(format!(
                        "`train.select_by` follows the task metric `{name}`, which is not scored: the scored ones are {}; add it to eval.metrics",
                        names.join(", ")
                    )));
                }
                Some(_) => {}
            }
        }
        if self.config.metric_every > 0 && names.is_none() {
            return Err(config(
                "`eval.metric_every` > 0 scores task metrics during training, and the trainer has no task scorer".into(),
            ));
        }
        if let Objective::Preference(p) = self.config.objective {
            let refuse = |message: String| {
                Err(TrainError::Preference {
                    loss: "preference training",
                    message,
                })
            };
            if !self.train.len().is_multiple_of(2) || !self.validation.len().is_multiple_of(2) {
                return refuse(format!(
                    "preference rows come in (chosen, rejected) pairs; got {} training and {} validation rows",
                    self.train.len(),
                    self.validation.len()
                ));
            }
            if p.needs_reference() && self.config.method == Method::Full && self.reference.is_none()
            {
                return refuse(
                    "DPO / IPO with method = \"full\" needs the reference log-probabilities computed before training (preference::reference_logps into Trainer::reference): once the weights move no reference is left".into(),
                );
            }
            if let Some(r) = self.reference
                && (r.train.len() != self.train.len()
                    || r.validation.len() != self.validation.len())
            {
                return refuse(format!(
                    "the precomputed reference holds {} training and {} validation values for {} and {} rows",
                    r.train.len(),
                    r.validation.len(),
                    self.train.len(),
                    self.validation.len()
                ));
            }
            if self.scorer.is_some() || self.config.select_by.is_some() {
                return refuse(
                    "task metrics are not scored in preference runs; the validation pairs' rewards are".into(),
                );
            }
        }
        Ok(())
    }

    /// The configured optimizer over the model's trainable weights.
    fn optimizer(&self) -> Result<Box<dyn Optimizer>> {
        let params: Vec<Param> = self
            .model
            .trainable()
            .into_iter()
            .map(|(name, var)| Param::new(name, var))
            .collect();
        self.config.optimizer.build(params)
    }

    /// Where the run starts: this run's folder resumes from its last checkpoint (weights and
    /// optimizer state loaded into `optimizer`), or (killed before its first one) starts over;
    /// `MetricsLog::open` empties the metrics of the lost steps.
    fn start(&mut self, optimizer: &mut dyn Optimizer, writer: bool) -> Result<TrainerState> {
        let Some((_, dir)) = checkpoint::list(self.out).pop() else {
            return Ok(TrainerState {
                step: 0,
                cursor: Cursor::default(),
                run_id: self.run_id.clone(),
                best_val_loss: None,
                best_metric: None,
                best_step: None,
                stale_evals: 0,
                tokens_seen: 0,
                tokens_by_source: Vec::new(),
            });
        };
        let state = self.resume(&dir, optimizer)?;
        if writer {
            checkpoint::repair_best(self.out, state.best_step)?;
        }
        Ok(state)
    }

    /// The indices in `train` of this step's rows, crossing into the next epoch where needed.
    /// Every rank walks the same global order; it computes only its own micro-batches.
    fn next_rows(&self, cursor: &mut Cursor, order: &mut Vec<usize>) -> Vec<usize> {
        let t = self.config;
        let unit = t.objective.rows_per_unit();
        let per_step = t.micro_batch * t.grad_accum * unit; // checked by `validate`
        let mut rows: Vec<usize> = Vec::with_capacity(per_step);
        while rows.len() < per_step {
            if cursor.offset >= order.len() {
                *cursor = Cursor {
                    epoch: cursor.epoch + 1,
                    offset: 0,
                };
                *order = self.order(cursor.epoch);
                if !rows.is_empty() && t.max_steps == 0 {
                    break; // an epoch boundary ends a short last step
                }
            }
            let first = order[cursor.offset] * unit;
            rows.extend(first..first + unit);
            cursor.offset += 1;
        }
        rows
    }

    /// Whether step `step` (the `last` one or not) evaluates: every `eval_every` steps, or at
    /// the end of each epoch; always at the last.
    fn eval_due(&self, step: u64, last: bool) -> bool {
        let t = self.config;
        if t.eval_every > 0 {
            step.is_multiple_of(t.eval_every) || last
        } else {
            step.is_multiple_of(self.steps_per_epoch()) || last
        }
    }

    /// Whether the evaluation of step `step` scores task metrics: every `metric_every`-th
    /// evaluation (counted from the step, so a resumed run scores at the same steps) and the
    /// last.
    fn metric_due(&self, step: u64, last: bool) -> bool {
        let t = self.config;
        if t.metric_every == 0 {
            return false;
        }
        let period = if t.eval_every > 0 {
            t.eval_every
        } else {
            self.steps_per_epoch()
        };
        last || (step / period).is_multiple_of(t.metric_every)
    }

    /// The task metrics now, by name: rank 0 scores, and every rank gets its values.
    fn score_task(&mut self, step: u64) -> Result<std::collections::BTreeMap<String, f64>> {
        let scorer = self
            .scorer
            .as_deref_mut()
            .expect("`check` refuses metrics without a scorer");
        let names = scorer.names();
        let mut values = if self.comm.rank() == 0 {
            scorer
                .score(self.model)
                .map_err(|source| TrainError::TaskScore { step, source })?
        } else {
            vec![0.0; names.len()]
        };
        if values.len() != names.len() {
            return Err(TrainError::TaskScore {
                step,
                source: format!(
                    "the scorer returned {} values for the {} metrics {}",
                    values.len(),
                    names.len(),
                    names.join(", ")
                )
                .into(),
            });
        }
        if self.comm.world_size() > 1 {
            values = comm::sum_over_ranks(self.comm, &values)?;
        }
        Ok(names.into_iter().zip(values).collect())
    }

    /// The cross-entropy of each named evaluation set now (text, prompt/completion or chat rows,
    /// whatever the run's objective).
    fn eval_set_losses(&self) -> Result<Vec<SetLoss>> {
        let mut sets = Vec::with_capacity(self.eval_sets.len());
        for (name, rows) in self.eval_sets {
            let (loss, tokens) = evaluate_sharded(
                self.model,
                rows,
                self.config.micro_batch,
                &self.device,
                self.comm,
            )?;
            sets.push(SetLoss {
                name: name.clone(),
                loss,
                ppl: loss.exp(),
                tokens,
            });
        }
        Ok(sets)
    }

    /// The validation loss now (and the task metrics when due), the early-stopping state they
    /// update, and the seconds the task metrics took.
    fn evaluate_now(&mut self, state: &mut TrainerState, last: bool) -> Result<(EvalMetrics, f64)> {
        self.model.set_training(false);
        if let Objective::Preference(p) = &self.config.objective {
            let (val_loss, metrics) = evaluate_preference_sharded(
                self.model,
                p,
                self.validation,
                self.reference.map(|r| r.validation.as_slice()),
                self.config.micro_batch,
                &self.device,
                self.comm,
            )?;
            let sets = self.eval_set_losses()?;
            self.model.set_training(true);
            let improved = self.record_eval(state, val_loss, None);
            let e = EvalMetrics {
                step: state.step,
                val_loss,
                val_ppl: f64::NAN,
                val_tokens: metrics.as_ref().map_or(0, |m| m.pairs),
                improved,
                sets,
                preference: metrics,
                task: None,
            };
            return Ok((e, 0.0));
        }
        // Summed over the ranks: every rank sees the same loss and makes the same
        // early-stopping decision.
        let (val_loss, val_tokens) = evaluate_sharded(
            self.model,
            self.validation,
            self.config.micro_batch,
            &self.device,
            self.comm,
        )?;
        let sets = self.eval_set_losses()?;
        let clock = Instant::now();
        let task = if self.metric_due(state.step, last) {
            Some(self.score_task(state.step)?)
        } else {
            None
        };
        let metric_s = if task.is_some() {
            clock.elapsed().as_secs_f64()
        } else {
            0.0
        };
        self.model.set_training(true);
        let selecting = match (&self.config.select_by, &task) {
            (Some(name), Some(values)) => Some(values[name]),
            _ => None,
        };
        let improved = self.record_eval(state, val_loss, selecting);
        let e = EvalMetrics {
            step: state.step,
            val_loss,
            val_ppl: val_loss.exp(),
            val_tokens,
            improved,
            sets,
            preference: None,
            task,
        };
        Ok((e, metric_s))
    }

    /// Updates the early-stopping state with an evaluation; whether it improved. By the
    /// validation loss (lower is better), or with `select_by` by the metric (higher is better;
    /// a tie with the best is broken by the lower validation loss, so a metric that has
    /// saturated still lets the loss choose; `metric` is `None` at evaluations that did not
    /// score it, which then neither improve nor count as stale). The best step's validation
    /// loss is kept as `best_val_loss`.
    fn record_eval(&self, state: &mut TrainerState, val_loss: f64, metric: Option<f64>) -> bool {
        let min_delta = self.config.min_delta;
        let improved = if self.config.select_by.is_none() {
            state.best_val_loss.is_none_or(|b| val_loss < b - min_delta)
        } else {
            let Some(m) = metric else {
                return false;
            };
            m.is_finite()
                && state.best_metric.is_none_or(|b| {
                    m > b + min_delta
                        || (m == b && state.best_val_loss.is_none_or(|l| val_loss < l))
                })
        };
        if improved {
            state.best_val_loss = Some(val_loss);
            state.best_metric = metric;
            state.best_step = Some(state.step);
            state.stale_evals = 0;
        } else {
            state.stale_evals += 1;
        }
        improved
    }

    /// Rank 0's checkpoint of this step: written atomically, `best` pointed at it when it is
    /// the best so far, and the old ones pruned.
    fn checkpoint(
        &self,
        state: &TrainerState,
        optimizer: &dyn Optimizer,
        log: &mut Log<'_>,
    ) -> Result<()> {
        let dir = self.save(state, optimizer)?;
        log.observer.on_checkpoint(&dir);
        if state.best_step == Some(state.step) {
            checkpoint::mark_best(self.out, state.step)?;
        }
        checkpoint::prune(self.out, self.config.keep_last, state.best_step)
    }

    fn save(&self, state: &TrainerState, optimizer: &dyn Optimizer) -> Result<PathBuf> {
        let opt_state = optimizer.state();
        checkpoint::write(self.out, state, &self.config.config_toml, |dir| {
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

/// Where a run's steps and evaluations go: `metrics.jsonl` (rank 0's), the observer, and the
/// summary `run` returns.
struct Log<'o> {
    metrics: Option<MetricsLog>,
    observer: &'o mut dyn Observer,
    summary: Summary,
}

impl<'o> Log<'o> {
    fn open(
        out: &Path,
        writer: bool,
        state: &TrainerState,
        observer: &'o mut dyn Observer,
    ) -> Result<Self> {
        let metrics = if writer {
            Some(MetricsLog::open(&out.join("metrics.jsonl"), state.step)?)
        } else {
            None
        };
        let summary = Summary {
            steps: 0,
            resumed_from: state.step,
            first_loss: None,
            last_loss: None,
            best_val_loss: state.best_val_loss,
            best_metric: state.best_metric,
            best_step: state.best_step,
            best_checkpoint: None,
            stopped_early: false,
            evals: Vec::new(),
            losses: Vec::new(),
            time: TrainTime::default(),
            tokens_by_source: Vec::new(),
        };
        Ok(Self {
            metrics,
            observer,
            summary,
        })
    }

    fn step(&mut self, m: &StepMetrics) -> Result<()> {
        let s = &mut self.summary;
        s.first_loss.get_or_insert(m.loss);
        s.last_loss = Some(m.loss);
        s.losses.push(m.loss);
        if let Some(log) = self.metrics.as_mut() {
            log.step(m)?;
        }
        self.observer.on_step(m);
        Ok(())
    }

    fn eval(&mut self, e: EvalMetrics) -> Result<()> {
        if let Some(log) = self.metrics.as_mut() {
            log.eval(&e)?;
        }
        self.observer.on_eval(&e);
        self.summary.evals.push(e);
        Ok(())
    }

    fn finish(self, state: &TrainerState, out: &Path) -> Summary {
        Summary {
            steps: state.step,
            best_val_loss: state.best_val_loss,
            best_metric: state.best_metric,
            best_step: state.best_step,
            best_checkpoint: state
                .best_step
                .map(|s| out.join(checkpoint::checkpoint_name(s))),
            ..self.summary
        }
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
