//! Selection by a task metric (`select_by`, `metric_every`) with a scripted scorer, and
//! preference training against reference log-probabilities computed before training.

use whet_model::Model;
use whet_train::TaskScorer;
use whet_train::TrainError;
use whet_train::preference::{DpoConfig, DpoLoss, Objective, PreferenceObjective};

use crate::common::{config, precompute, rows, run, run_ranks_with, run_with, tempdir, tiny_model};

/// Returns `accuracy` from a script, one value per call (and a constant `chrf`), and records the
/// calls.
struct Scripted {
    accuracy: Vec<f64>,
    calls: usize,
}

impl Scripted {
    fn new(accuracy: &[f64]) -> Self {
        Self {
            accuracy: accuracy.to_vec(),
            calls: 0,
        }
    }
}

impl TaskScorer for Scripted {
    fn names(&self) -> Vec<String> {
        vec!["accuracy".into(), "chrf".into()]
    }

    fn score(
        &mut self,
        _model: &Model,
    ) -> Result<Vec<f64>, Box<dyn std::error::Error + Send + Sync>> {
        let v = *self
            .accuracy
            .get(self.calls)
            .ok_or("the script has no more values")?;
        self.calls += 1;
        Ok(vec![v, 0.5])
    }
}

#[test]
fn a_task_metric_selects_the_best_checkpoint_and_stops_early() {
    let out = tempdir("select");
    let cfg = config(
        &out,
        &[
            "train.max_steps=50",
            "train.eval_every=2",
            "train.patience=2",
            "train.select_by=accuracy",
            "eval.metric_every=1",
        ],
    );
    let (train, val) = (rows(8, 12), rows(2, 12));
    let mut model = tiny_model(true);
    // Evaluations at steps 2 (0.2, best), 4 (0.9, best), 6 (0.5, stale) and 8 (0.85: stale):
    // the second stale evaluation stops the run.
    let mut scorer = Scripted::new(&[0.2, 0.9, 0.5, 0.85]);
    let s = run_with(&mut model, &cfg, &train, &val, "r", Some(&mut scorer), None).unwrap();
    assert_eq!(scorer.calls, 4);
    assert!(s.stopped_early);
    assert_eq!(s.steps, 8);
    assert_eq!(s.best_step, Some(4));
    assert_eq!(s.best_metric, Some(0.9));
    let improved: Vec<bool> = s.evals.iter().map(|e| e.improved).collect();
    assert_eq!(improved, [true, true, false, false]);
    assert_eq!(
        s.best_val_loss,
        Some(s.evals[1].val_loss),
        "the best step's validation loss, whatever the lowest one"
    );
    let task = s.evals[2].task.as_ref().unwrap();
    assert_eq!((task["accuracy"], task["chrf"]), (0.5, 0.5));
    assert_eq!(
        whet_train::checkpoint::best(&out),
        Some(4),
        "`best` points at the metric's best step"
    );
    let metrics = std::fs::read_to_string(out.join("metrics.jsonl")).unwrap();
    assert!(
        metrics.contains(r#""task":{"accuracy":0.9,"chrf":0.5}"#),
        "{metrics}"
    );
}

/// `metric_every = 2` scores every second evaluation and the last; the ones between neither
/// improve nor count as stale.
#[test]
fn metric_every_scores_every_nth_evaluation_and_the_last() {
    let out = tempdir("metric-every");
    let cfg = config(
        &out,
        &[
            "train.max_steps=5",
            "train.eval_every=1",
            "train.patience=1",
            "train.select_by=accuracy",
            "eval.metric_every=2",
        ],
    );
    let (train, val) = (rows(8, 12), rows(2, 12));
    let mut model = tiny_model(true);
    let mut scorer = Scripted::new(&[0.5, 0.6, 0.7]);
    let s = run_with(&mut model, &cfg, &train, &val, "r", Some(&mut scorer), None).unwrap();
    let scored: Vec<u64> = s
        .evals
        .iter()
        .filter(|e| e.task.is_some())
        .map(|e| e.step)
        .collect();
    assert_eq!(scored, [2, 4, 5]);
    assert_eq!(scorer.calls, 3);
    assert!(!s.stopped_early, "unscored evaluations are not stale");
    assert_eq!((s.best_step, s.best_metric), (Some(5), Some(0.7)));
}

/// The best value so far is part of the checkpointed state: a resumed run does not take its
/// first metric for an improvement.
#[test]
fn the_selecting_metric_survives_a_resume() {
    let out = tempdir("select-resume");
    let (train, val) = (rows(8, 12), rows(2, 12));
    let settings = |steps: u64| {
        config(
            &out,
            &[
                &format!("train.max_steps={steps}"),
                "train.eval_every=2",
                "train.select_by=accuracy",
                "eval.metric_every=1",
            ],
        )
    };
    let mut model = tiny_model(true);
    let mut first = Scripted::new(&[0.9, 0.1]);
    let s = run_with(
        &mut model,
        &settings(4),
        &train,
        &val,
        "r",
        Some(&mut first),
        None,
    )
    .unwrap();
    assert_eq!(s.best_step, Some(2));
    let mut model = tiny_model(true);
    let mut second = Scripted::new(&[0.5]);
    let s = run_with(
        &mut model,
        &settings(6),
        &train,
        &val,
        "r",
        Some(&mut second),
        None,
    )
    .unwrap();
    assert_eq!(s.resumed_from, 4);
    assert_eq!(second.calls, 1);
    assert_eq!((s.best_step, s.best_metric), (Some(2), Some(0.9)));
    assert_eq!(whet_train::checkpoint::best(&out), Some(2));
}

/// Data-parallel: rank 0 scores and every rank selects by its values (another rank's scorer,
/// scripted differently here, is never asked), so the ranks stop and select together.
#[test]
fn ranks_select_by_rank_zeros_metric() {
    let (train, val) = (rows(8, 12), rows(3, 12));
    let out = tempdir("dp-select");
    let cfg = config(
        &out,
        &[
            "train.max_steps=50",
            "train.eval_every=2",
            "train.patience=2",
            "train.select_by=accuracy",
            "eval.metric_every=1",
        ],
    );
    let runs = run_ranks_with(
        2,
        1000,
        true,
        &cfg,
        &train,
        &val,
        |_| "r".into(),
        |rank| {
            let script: &[f64] = if rank == 0 {
                &[0.2, 0.9, 0.5, 0.85]
            } else {
                &[]
            };
            Some(Box::new(Scripted::new(script)))
        },
    );
    for (summary, _) in runs {
        let s = summary.unwrap();
        assert!(s.stopped_early);
        assert_eq!(
            (s.steps, s.best_step, s.best_metric),
            (8, Some(4), Some(0.9))
        );
        let acc: Vec<f64> = s
            .evals
            .iter()
            .map(|e| e.task.as_ref().unwrap()["accuracy"])
            .collect();
        assert_eq!(acc, [0.2, 0.9, 0.5, 0.85]);
    }
}

/// A tie with the best metric goes to the lower validation loss.
#[test]
fn a_tied_metric_is_broken_by_the_validation_loss() {
    let out = tempdir("select-tie");
    let cfg = config(
        &out,
        &[
            "train.max_steps=6",
            "train.eval_every=2",
            "train.select_by=accuracy",
            "eval.metric_every=1",
        ],
    );
    let (train, val) = (rows(8, 12), rows(2, 12));
    let mut model = tiny_model(true);
    let mut scorer = Scripted::new(&[1.0, 1.0, 1.0]);
    let s = run_with(&mut model, &cfg, &train, &val, "r", Some(&mut scorer), None).unwrap();
    let lowest = s
        .evals
        .iter()
        .min_by(|a, b| a.val_loss.total_cmp(&b.val_loss))
        .unwrap();
    assert!(
        s.evals[0].val_loss > lowest.val_loss,
        "the losses fall: {:?}",
        s.evals
    );
    assert_eq!(s.best_step, Some(lowest.step));
    assert_eq!(s.best_val_loss, Some(lowest.val_loss));
}

#[test]
fn metric_selection_without_the_metric_is_refused() {
    let (train, val) = (rows(8, 12), rows(2, 12));
    let refused = |overrides: &[&str], scorer: Option<Scripted>| {
        let out = tempdir("select-refused");
        let cfg = config(&out, overrides);
        let mut model = tiny_model(true);
        let mut scorer = scorer;
        let scorer = scorer.as_mut().map(|s| s as &mut dyn TaskScorer);
        let err = run_with(&mut model, &cfg, &train, &val, "r", scorer, None).unwrap_err();
        assert!(matches!(err, TrainError::Config { .. }), "{err}");
        err.to_string()
    };
    let select = [
        "train.max_steps=2",
        "train.select_by=accuracy",
        "eval.metric_every=1",
    ];
    let msg = refused(&select, None);
    assert!(
        msg.contains("`train.select_by`") && msg.contains("no task scorer"),
        "{msg}"
    );
    let msg = refused(
        &[
            "train.max_steps=2",
            "train.select_by=f1",
            "eval.metric_every=1",
        ],
        Some(Scripted::new(&[])),
    );
    assert!(
        msg.contains("`f1`") && msg.contains("accuracy, chrf"),
        "{msg}"
    );
    let msg = refused(&["train.max_steps=2", "eval.metric_every=1"], None);
    assert!(msg.contains("`eval.metric_every`"), "{msg}");
    let msg = refused(
        &["train.max_steps=2", "train.select_by=accuracy"],
        Some(Scripted::new(&[])),
    );
    assert!(
        msg.contains("`eval.metric_every`") && msg.contains("never scores"),
        "{msg}"
    );
}

fn dpo() -> Objective {
    Objective::Preference(PreferenceObjective::Dpo(DpoConfig {
        beta: 0.5,
        loss: DpoLoss::Sigmoid {
            label_smoothing: 0.0,
        },
    }))
}

/// For LoRA the precomputed reference is the adapter-off forward each step would run: the
/// same losses and evaluations.
#[test]
fn a_precomputed_reference_gives_the_losses_of_the_adapter_off_reference() {
    let (train, val) = (rows(12, 12), rows(4, 12));
    let go = |precomputed: bool| {
        let out = tempdir("dpo-ref");
        let mut cfg = config(&out, &["train.max_steps=4", "train.eval_every=2"]);
        cfg.trainer.objective = dpo();
        let mut model = tiny_model(true);
        let reference = precomputed.then(|| precompute(&mut model, &train, &val));
        run_with(
            &mut model,
            &cfg,
            &train,
            &val,
            "r",
            None,
            reference.as_ref(),
        )
        .unwrap()
    };
    let (live, pre) = (go(false), go(true));
    assert_eq!(live.losses.len(), 4);
    for (a, b) in live.losses.iter().zip(&pre.losses) {
        assert!(
            (a - b).abs() < 1e-5,
            "{:?} vs {:?}",
            live.losses,
            pre.losses
        );
    }
    for (a, b) in live.evals.iter().zip(&pre.evals) {
        assert!(
            (a.val_loss - b.val_loss).abs() < 1e-5,
            "{} vs {}",
            a.val_loss,
            b.val_loss
        );
        let (a, b) = (
            a.preference.as_ref().unwrap(),
            b.preference.as_ref().unwrap(),
        );
        assert!((a.reward_margin - b.reward_margin).abs() < 1e-5);
    }
    assert!(
        (live.losses[0] - std::f64::consts::LN_2).abs() < 1e-6,
        "at the first step the policy is the reference: {}",
        live.losses[0]
    );
}

/// Full fine-tuning has no adapter to switch off: DPO needs the reference computed before the
/// weights move, and learns with it.
#[test]
fn full_fine_tuning_dpo_trains_against_a_precomputed_reference() {
    let (train, val) = (rows(12, 12), rows(4, 12));
    let out = tempdir("dpo-full");
    let mut cfg = config(
        &out,
        &[
            "method=full",
            "train.max_steps=12",
            "train.eval_every=12",
            "train.lr=1e-3",
        ],
    );
    cfg.trainer.objective = dpo();
    let mut model = tiny_model(false);
    let err = run(&mut model, &cfg, &train, &val, "r").unwrap_err();
    assert!(
        err.to_string().contains("reference log-probabilities"),
        "{err}"
    );
    let reference = precompute(&mut model, &train, &val);
    let mut short = reference.clone();
    short.validation.pop();
    let err = run_with(&mut model, &cfg, &train, &val, "r", None, Some(&short)).unwrap_err();
    assert!(
        err.to_string()
            .contains("3 validation values for 12 and 4 rows"),
        "{err}"
    );
    let s = run_with(&mut model, &cfg, &train, &val, "r", None, Some(&reference)).unwrap();
    assert!(
        (s.losses[0] - std::f64::consts::LN_2).abs() < 1e-6,
        "{:?}",
        s.losses
    );
    let late = s.losses[8..].iter().sum::<f64>() / 4.0;
    assert!(late < 0.75 * std::f64::consts::LN_2, "{:?}", s.losses);
    let eval = s.evals.last().unwrap().preference.as_ref().unwrap();
    assert!(eval.reward_margin > 0.0, "{eval:?}");
}
