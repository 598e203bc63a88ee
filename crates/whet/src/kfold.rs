//! k-fold cross-validation: k fresh models, each trained on k-1 folds and validated on the
//! held-out one; the mean and spread of the best validation losses say how much a single
//! split's number can be trusted.

use std::path::Path;

use anyhow::{Result, bail};
use serde::Serialize;
use whet_tokenize::Tokenizer;
use whet_train::{Quiet, Trainer};

use crate::config::Config;
use crate::pipeline::{self, Prepared};
use crate::runtime::{Runtime, run_id};

#[derive(Debug, Serialize)]
pub struct FoldResult {
    pub fold: usize,
    pub train_rows: usize,
    pub validation_rows: usize,
    pub base_val_loss: f64,
    pub best_val_loss: f64,
    pub best_step: Option<u64>,
}

#[derive(Debug, Serialize)]
pub struct KFoldReport {
    pub k: usize,
    pub folds: Vec<FoldResult>,
    pub mean_val_loss: f64,
    pub std_val_loss: f64,
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
        let fold_out = out.join(format!("fold-{fold}"));
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
        };
        let summary = trainer.run(&mut Quiet)?;
        let best = summary.best_val_loss.unwrap_or(f64::NAN);
        eprintln!("fold {fold}/{k}: validation loss {base:.4} -> best {best:.4}");
        folds.push(FoldResult {
            fold,
            train_rows: train.len(),
            validation_rows: validation.len(),
            base_val_loss: base,
            best_val_loss: best,
            best_step: summary.best_step,
        });
    }
    let losses: Vec<f64> = folds.iter().map(|f| f.best_val_loss).collect();
    let (mean, std) = mean_std(&losses);
    let report = KFoldReport {
        k,
        folds,
        mean_val_loss: mean,
        std_val_loss: std,
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
