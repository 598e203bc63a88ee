use whet_train::TrainError;

use crate::common::*;

#[test]
fn lora_training_lowers_train_and_validation_loss() {
    let out = tempdir("lowers");
    let cfg = config(
        &out,
        &["train.max_steps=60", "train.eval_every=20", "train.lr=2e-2"],
    );
    let (train, val) = (rows(16, 16), rows(4, 16));
    let mut model = tiny_model(true);
    let s = run(&mut model, &cfg, &train, &val, "r").unwrap();
    assert_eq!(s.steps, 60);
    let (first, last) = (s.first_loss.unwrap(), s.last_loss.unwrap());
    assert!(last < first - 0.2, "train loss {first} -> {last}");
    assert_eq!(s.evals.len(), 3);
    assert!(s.evals[2].val_loss < s.evals[0].val_loss, "{:?}", s.evals);
    // Checkpoints: the last two and the best, each complete.
    let ckpts = whet_train::checkpoint::list(&out);
    assert!(ckpts.len() >= 2 && ckpts.len() <= 3, "{ckpts:?}");
    for (_, dir) in &ckpts {
        for f in [
            "adapter_model.safetensors",
            "adapter_config.json",
            "optimizer.safetensors",
            "trainer_state.json",
            "config.toml",
        ] {
            assert!(dir.join(f).is_file(), "{} lacks {f}", dir.display());
        }
    }
    let best = std::fs::read_to_string(out.join("best")).unwrap();
    assert!(out.join(best.trim()).is_dir());
    let metrics = std::fs::read_to_string(out.join("metrics.jsonl")).unwrap();
    assert_eq!(
        metrics.lines().filter(|l| l.contains("\"train\"")).count(),
        60
    );
    assert_eq!(
        metrics.lines().filter(|l| l.contains("\"eval\"")).count(),
        3
    );
}

/// One step over 4 rows gives the same update whether the rows come as one micro-batch of 4,
/// two of 2 (accumulated) or four of 1: the loss is normalised by the supervised tokens of the
/// whole step, not averaged per micro-batch. Rows have different supervised counts, so
/// per-micro-batch averaging would differ.
#[test]
fn gradient_accumulation_normalises_by_supervised_tokens() {
    let train = rows(4, 12);
    let counts: Vec<usize> = train.iter().map(|r| r.supervised()).collect();
    assert!(
        counts.iter().any(|&c| c != counts[0]),
        "rows must differ in supervised tokens: {counts:?}"
    );
    let run = |mb: usize, acc: usize| {
        let out = tempdir("accum");
        let cfg = config(
            &out,
            &[
                &format!("train.micro_batch={mb}"),
                &format!("train.grad_accum={acc}"),
                "train.max_steps=1",
                "method=full",
                "train.max_grad_norm=0.0",
                "train.optimizer=\"sgd\"",
                "train.lr=1.0",
                "train.warmup_steps=0",
            ],
        );
        let mut model = tiny_model(false);
        let s = run(&mut model, &cfg, &train, &[], "r").unwrap();
        (s.first_loss.unwrap(), trainable_values(&model))
    };
    let (l4, p4) = run(4, 1);
    for (mb, acc) in [(2, 2), (1, 4)] {
        let (l, p) = run(mb, acc);
        assert!((l - l4).abs() < 1e-5, "loss {l} vs {l4}");
        for ((name, a), (_, b)) in p.iter().zip(&p4) {
            let diff = a
                .iter()
                .zip(b)
                .map(|(x, y)| (x - y).abs())
                .fold(0f32, f32::max);
            assert!(
                diff < 1e-5,
                "{name}: micro_batch {mb} x accum {acc} differs by {diff}"
            );
        }
    }
}

#[test]
fn a_diverging_run_stops_with_a_clear_error_and_keeps_its_checkpoint() {
    let out = tempdir("nan");
    let cfg = config(
        &out,
        &[
            "method=full",
            "train.max_steps=40",
            "train.lr=1e30",
            "train.max_grad_norm=0.0",
            "output.save_every=1",
            "train.warmup_steps=0",
            "train.schedule=\"constant\"",
        ],
    );
    let train = rows(8, 12);
    let mut model = tiny_model(false);
    let err = run(&mut model, &cfg, &train, &[], "r").unwrap_err();
    assert!(matches!(err, TrainError::NonFinite { .. }), "{err}");
    assert!(err.to_string().contains("train.lr"), "{err}");
    let ckpts = whet_train::checkpoint::list(&out);
    assert!(
        !ckpts.is_empty(),
        "the checkpoint before the divergence survives"
    );
    whet_train::checkpoint::read_state(&ckpts.last().unwrap().1).unwrap();
}

#[test]
fn early_stopping_stops_after_patience_evaluations_without_improvement() {
    let out = tempdir("early");
    // min_delta is huge: only the first evaluation counts as an improvement.
    let cfg = config(
        &out,
        &[
            "train.max_steps=50",
            "train.eval_every=2",
            "train.patience=2",
            "train.min_delta=1e9",
        ],
    );
    let (train, val) = (rows(8, 12), rows(2, 12));
    let mut model = tiny_model(true);
    let s = run(&mut model, &cfg, &train, &val, "r").unwrap();
    assert!(s.stopped_early);
    assert_eq!(s.steps, 6, "evals at 2 (best), 4 and 6 (stale x2)");
    assert_eq!(s.best_step, Some(2));
    assert!(
        whet_train::checkpoint::list(&out)
            .iter()
            .any(|(step, _)| *step == 2),
        "the best checkpoint is kept"
    );
}

#[test]
fn a_dataset_without_supervised_tokens_is_refused() {
    let out = tempdir("nosup");
    let cfg = config(&out, &["train.max_steps=2"]);
    let mut train = rows(4, 12);
    for r in &mut train {
        r.targets.iter_mut().for_each(|t| *t = -100);
    }
    let mut model = tiny_model(true);
    let err = run(&mut model, &cfg, &train, &[], "r").unwrap_err();
    assert!(matches!(err, TrainError::NoSupervisedTokens), "{err}");
}

/// NEFTune noise changes what training sees (so the losses differ from a run without it) but
/// is seeded: two runs with it are identical.
#[test]
fn neftune_noise_is_applied_and_reproducible() {
    let train = rows(6, 12);
    let run = |alpha: f64| {
        let out = tempdir("neftune");
        let cfg = config(
            &out,
            &[
                "train.max_steps=3",
                &format!("train.neftune_alpha={alpha:.1}"),
            ],
        );
        let mut model = tiny_model(true);
        let s = run(&mut model, &cfg, &train, &[], "r").unwrap();
        s.losses
    };
    let (plain, noisy, again) = (run(0.0), run(5.0), run(5.0));
    assert_eq!(noisy, again);
    assert_ne!(plain[1..], noisy[1..]);
}

#[test]
fn a_config_built_in_code_with_an_overflowing_batch_is_an_error_not_a_panic() {
    let out = tempdir("overflow");
    let train = rows(8, 12);
    // micro_batch * grad_accum wraps to 0 (division by zero) and to 4 (another batch).
    for (grad_accum, epochs) in [(1usize << 62, 1.0), ((1 << 62) + 1, 1.0), (1, f64::NAN)] {
        let mut cfg = config(&out, &["train.max_steps=0"]);
        cfg.trainer.micro_batch = 4;
        cfg.trainer.grad_accum = grad_accum;
        cfg.trainer.epochs = epochs;
        let mut model = tiny_model(true);
        let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            run(&mut model, &cfg, &train, &[], "r")
        }));
        let err = result
            .unwrap_or_else(|_| panic!("grad_accum {grad_accum}, epochs {epochs}: panicked"))
            .expect_err("an invalid config must not train");
        let msg = err.to_string();
        assert!(
            msg.contains("train.grad_accum") || msg.contains("train.epochs"),
            "{msg}"
        );
        assert!(
            whet_train::checkpoint::list(&out).is_empty(),
            "a refused config wrote a checkpoint"
        );
    }
}
