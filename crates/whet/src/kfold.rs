//! k-fold cross-validation: k fresh models, each trained on k-1 folds and validated on the
//! held-out one; the mean and spread of the best validation losses (and of the task metrics,
//! `eval.metrics`, of each fold's best checkpoint) say how much a single split's number can be
//! trusted.

use std::path::Path;

use anyhow::{Result, bail};
use serde::Serialize;
use whet_tokenize::Tokenizer;
use whet_train::{Quiet, Trainer};

use whet_train::score::Metric;

use crate::config::Config;
use crate::pipeline::{self, Prepared};
use crate::report::task_settings;
use crate::runtime::{Runtime, run_id};
use crate::task_eval::{self, TaskScores};

#[derive(Debug, Serialize)]
pub struct FoldResult {
    pub fold: usize,
    pub train_rows: usize,
    pub validation_rows: usize,
    pub base_val_loss: f64,
    pub best_val_loss: f64,
    pub best_step: Option<u64>,
    /// Task metrics (`eval.metrics`) of the base model on this fold's validation examples.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub base_task: Option<TaskScores>,
    /// The same for the fold's best checkpoint.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub task: Option<TaskScores>,
}

/// One task metric over the folds: the tuned models' mean and spread, and the base model's
/// mean.
#[derive(Debug, Serialize)]
pub struct MetricOverFolds {
    pub metric: Metric,
    pub mean: f64,
    pub std: f64,
    pub base_mean: f64,
}

#[derive(Debug, Serialize)]
pub struct KFoldReport {
    pub k: usize,
    pub folds: Vec<FoldResult>,
    pub mean_val_loss: f64,
    pub std_val_loss: f64,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub metrics: Vec<MetricOverFolds>,
}

/// Mean and (population) standard deviation.
pub fn mean_std(xs: &[f64]) -> (f64, f64) {
    let n = xs.len().max(1) as f64;
    let mean = xs.iter().sum::<f64>() / n;
    let var = xs.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / n;
    (mean, var.sqrt())
}

pub fn run(rt: &Runtime, cfg: &Config, tok: &Tokenizer, data: &Prepared, out: &Path) -> Result<()> {
    let k = cfg.train.k_folds as usize;
    let all: Vec<_> = data
        .train_examples
        .iter()
        .chain(&data.validation_examples)
        .cloned()
        .collect();
    let trainer_cfg = cfg.trainer();
    let labels = task_eval::label_set(cfg.eval.labels.as_deref(), &all, &cfg.eval.normalize);
    let settings = task_settings(cfg, &labels);
    let mut folds = Vec::with_capacity(k);
    for fold in 0..k {
        let split = whet_data::split::fold_split(all.iter().cloned(), k, fold, cfg.train.seed)?;
        if split.validation.is_empty() || split.train.is_empty() {
            bail!(
                "fold {fold} of {k} is empty: {} examples are too few for {k} folds",
                all.len()
            );
        }
        let train = pipeline::rows(tok, &split.train, &cfg.data, None)?.rows;
        let validation = pipeline::rows(tok, &split.validation, &cfg.data, None)?.rows;
        let mut model = rt.load_for_training(cfg, cfg.train.seed)?;
        model.set_training(false);
        let (base, _) =
            whet_train::evaluate(&model, &validation, cfg.train.micro_batch, rt.device())?;
        let task_examples = if cfg.eval.metrics.is_empty() {
            None
        } else {
            let scored = task_eval::first(&split.validation, cfg.eval.metric_examples);
            Some(task_eval::task_examples(tok, scored)?)
        };
        let base_task = match &task_examples {
            Some(e) => Some(task_eval::score_model(&model, tok, e, &settings)?),
            None => None,
        };
        let fold_out = out.join(format!("fold-{fold}"));
        // Each fold selects its best checkpoint by its own validation examples' metric.
        let mut scorer = match &task_examples {
            Some(examples) if trainer_cfg.metric_every > 0 => Some(task_eval::Scorer {
                tok,
                examples,
                settings: settings.clone(),
            }),
            _ => None,
        };
        let mut trainer = Trainer {
            model: &mut model,
            config: &trainer_cfg,
            train: &train,
            validation: &validation,
            out: &fold_out,
            device: rt.device().clone(),
            run_id: format!("{}-fold{fold}", run_id(cfg, &train)),
            comm: &whet_train::comm::Single,
            eval_sets: &[],
            scorer: scorer
                .as_mut()
                .map(|s| s as &mut dyn whet_train::TaskScorer),
            reference: None,
        };
        let summary = trainer.run(&mut Quiet)?;
        let best = summary.best_val_loss.unwrap_or(f64::NAN);
        eprintln!("fold {fold}/{k}: validation loss {base:.4} -> best {best:.4}");
        let task = match &task_examples {
            Some(e) => {
                if let Some(best) = &summary.best_checkpoint {
                    whet_train::load_trainable(&model, best, cfg.method)?;
                }
                model.set_training(false);
                let t = task_eval::score_model(&model, tok, e, &settings)?;
                for ((m, b), (_, a)) in base_task.iter().flat_map(|b| &b.values).zip(&t.values) {
                    eprintln!("fold {fold}/{k}: {m} {b:.4} -> {a:.4}");
                }
                Some(t)
            }
            None => None,
        };
        folds.push(FoldResult {
            fold,
            train_rows: train.len(),
            validation_rows: validation.len(),
            base_val_loss: base,
            best_val_loss: best,
            best_step: summary.best_step,
            base_task,
            task,
        });
    }
    let losses: Vec<f64> = folds.iter().map(|f| f.best_val_loss).collect();
    let (mean, std) = mean_std(&losses);
    let metrics: Vec<MetricOverFolds> = cfg
        .eval
        .metrics
        .iter()
        .map(|&metric| {
            let of = |t: &Option<TaskScores>| t.as_ref().and_then(|t| t.value(metric));
            let tuned: Vec<f64> = folds.iter().filter_map(|f| of(&f.task)).collect();
            let base: Vec<f64> = folds.iter().filter_map(|f| of(&f.base_task)).collect();
            let (mean, std) = mean_std(&tuned);
            MetricOverFolds {
                metric,
                mean,
                std,
                base_mean: mean_std(&base).0,
            }
        })
        .collect();
    for m in &metrics {
        eprintln!(
            "{k}-fold cross-validation: {} {:.4} ± {:.4} (base {:.4})",
            m.metric, m.mean, m.std, m.base_mean
        );
    }
    let report = KFoldReport {
        k,
        folds,
        mean_val_loss: mean,
        std_val_loss: std,
        metrics,
    };
    let path = out.join("kfold.json");
    let json = serde_json::to_string_pretty(&report)?;
    whet_data::atomic::write_file(&path, json.as_bytes(), whet_data::atomic::Existing::Replace)?;
    eprintln!(
        "{k}-fold cross-validation: validation loss {mean:.4} ± {std:.4} (report: {})",
        path.display()
    );
    Ok(())
}
