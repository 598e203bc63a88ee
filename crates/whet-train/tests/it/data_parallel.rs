//! Data-parallel training over an in-process group of ranks (threads behind the `Communicator`
//! trait): the same arithmetic as `mpirun -n N` (crates/whet/tests/it/distributed.rs runs that),
//! without an MPI installation.

use std::path::Path;

use whet_data::atomic::MARKER;
use whet_train::TrainError;

use crate::common::*;

/// Float summation order differs between world sizes (per-rank partial sums); nothing else may.
const TOL: f32 = 2e-5;

fn max_abs_diff(a: &[(String, Vec<f32>)], b: &[(String, Vec<f32>)]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|((na, va), (nb, vb))| {
            assert_eq!(na, nb);
            va.iter()
                .zip(vb)
                .map(|(x, y)| (x - y).abs())
                .fold(0f32, f32::max)
        })
        .fold(0f32, f32::max)
}

/// `(kind, step, loss, supervised tokens, tokens)` of every line of `metrics.jsonl`.
fn metrics(out: &Path) -> Vec<(String, u64, f64, u64, u64)> {
    std::fs::read_to_string(out.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).unwrap();
            let loss = v["loss"].as_f64().or(v["val_loss"].as_f64()).unwrap();
            (
                v["kind"].as_str().unwrap().to_string(),
                v["step"].as_u64().unwrap(),
                loss,
                v["supervised_tokens"]
                    .as_u64()
                    .or(v["val_tokens"].as_u64())
                    .unwrap(),
                v["tokens"].as_u64().unwrap_or(0),
            )
        })
        .collect()
}

/// Two epochs of 11 rows at 6 rows per step (micro-batch 2, 3 micro-batches): steps of 6 and
/// 5 rows, so ranks get unequal shares, and with 3 micro-batches per step a rank of a 2- or
/// 4-rank group gets 2, 1 or none. LoRA with dropout, AdamW, clipping, an evaluation per epoch.
const DP_RUN: &[&str] = &[
    "train.epochs=2",
    "train.grad_accum=3",
    "train.max_grad_norm=0.5",
    "train.lr=2e-2",
];

#[test]
fn every_world_size_reaches_the_parameters_of_one_process() {
    let (train, val) = (rows(11, 12), rows(5, 12));
    let one_out = tempdir("dp-1");
    let mut model = tiny_model(true);
    let one = run(&mut model, &config(&one_out, DP_RUN), &train, &val, "r").unwrap();
    let want = trainable_values(&model);
    let want_metrics = metrics(&one_out);
    assert_eq!(one.steps, 4);
    assert_eq!(one.evals.len(), 2);

    // Buckets of 200 values: the LoRA tensors (64 to 192 values each) fill several buckets.
    for (world, bucket) in [(2, 200), (3, 200), (4, 1 << 20)] {
        let out = tempdir("dp-n");
        let cfg = config(&out, DP_RUN);
        let ranks = run_ranks(world, bucket, true, &cfg, &train, &val, |_| "r".into());
        for (rank, (summary, values)) in ranks.iter().enumerate() {
            let s = summary.as_ref().unwrap();
            assert_eq!(s.steps, one.steps, "world {world} rank {rank}");
            for (a, b) in s.losses.iter().zip(&one.losses) {
                assert!((a - b).abs() < 1e-5, "world {world}: loss {a} vs {b}");
            }
            for (a, b) in s.evals.iter().zip(&one.evals) {
                assert!((a.val_loss - b.val_loss).abs() < 1e-6, "world {world}");
                assert_eq!(a.val_tokens, b.val_tokens, "world {world}");
            }
            let diff = max_abs_diff(values, &want);
            eprintln!("world {world} rank {rank}: max |param - one process| = {diff:.2e}");
            assert!(diff < TOL, "world {world} rank {rank}: {diff}");
        }
        // Every rank holds the same parameters, bit for bit: same summed gradients, same update.
        for (_, values) in &ranks[1..] {
            assert_eq!(values, &ranks[0].1, "world {world}: ranks drifted apart");
        }
        // One writer: each step and evaluation logged once, with the global token counts of one
        // process (no row skipped or seen twice by the shards).
        let got = metrics(&out);
        assert_eq!(got.len(), want_metrics.len(), "world {world}");
        for (g, w) in got.iter().zip(&want_metrics) {
            assert_eq!(
                (&g.0, g.1, g.3, g.4),
                (&w.0, w.1, w.3, w.4),
                "world {world}"
            );
        }
        let steps = |dir: &Path| {
            whet_train::checkpoint::list(dir)
                .into_iter()
                .map(|c| c.0)
                .collect::<Vec<_>>()
        };
        assert_eq!(steps(&out), steps(&one_out), "world {world}");
    }
}

/// Full fine-tuning (every weight, embeddings included) with SGD: the same parameters at two
/// ranks as in one process.
#[test]
fn full_fine_tuning_at_two_ranks_matches_one_process() {
    let overrides = [
        "method=full",
        "train.max_steps=3",
        "train.grad_accum=2",
        "train.optimizer=\"sgd\"",
        "train.lr=0.5",
        // No clipping: it would hide a wrong normalisation (the clipped norm is fixed).
        "train.max_grad_norm=0.0",
    ];
    let train = rows(9, 12);
    let out = tempdir("dp-full-1");
    let mut model = tiny_model(false);
    run(&mut model, &config(&out, &overrides), &train, &[], "r").unwrap();
    let want = trainable_values(&model);
    let out = tempdir("dp-full-2");
    let ranks = run_ranks(
        2,
        1000,
        false,
        &config(&out, &overrides),
        &train,
        &[],
        |_| "r".into(),
    );
    for (summary, values) in &ranks {
        summary.as_ref().unwrap();
        let diff = max_abs_diff(values, &want);
        assert!(diff < TOL, "{diff}");
    }
}

/// A checkpoint written by two ranks resumes at one and at three ranks, and those runs end where
/// the uninterrupted two-rank run ends.
#[test]
fn a_checkpoint_resumes_at_another_world_size() {
    let overrides = [
        "train.max_steps=8",
        "train.grad_accum=2",
        "output.save_every=1",
        "output.keep_last=20",
        "train.eval_every=4",
    ];
    let (train, val) = (rows(10, 12), rows(3, 12));
    let full = tempdir("dp-resume-full");
    let ranks = run_ranks(
        2,
        1000,
        true,
        &config(&full, &overrides),
        &train,
        &val,
        |_| "r".into(),
    );
    let want = ranks[0].1.clone();
    let want_losses = ranks[0].0.as_ref().unwrap().losses.clone();

    for world in [1, 3] {
        let out = tempdir("dp-resume-part");
        let ckpt = whet_train::checkpoint::checkpoint_name(3);
        copy_dir(&full.join(&ckpt), &out.join(&ckpt));
        std::fs::copy(full.join(MARKER), out.join(MARKER)).unwrap();
        std::fs::copy(full.join("metrics.jsonl"), out.join("metrics.jsonl")).unwrap();
        let cfg = config(&out, &overrides);
        let (summary, values) = if world == 1 {
            let mut model = tiny_model(true);
            let s = run(&mut model, &cfg, &train, &val, "r").unwrap();
            (s, trainable_values(&model))
        } else {
            let mut r = run_ranks(world, 1000, true, &cfg, &train, &val, |_| "r".into());
            let (s, v) = r.swap_remove(0);
            (s.unwrap(), v)
        };
        assert_eq!(summary.resumed_from, 3, "world {world}");
        assert_eq!(summary.steps, 8);
        for (a, b) in summary.losses.iter().zip(&want_losses[3..]) {
            assert!((a - b).abs() < 1e-5, "world {world}: {a} vs {b}");
        }
        let diff = max_abs_diff(&values, &want);
        assert!(diff < TOL, "world {world}: {diff}");
    }
}

/// Ranks that were given different data (or config) refuse to start, every one of them with the
/// same message, before anything is written.
#[test]
fn ranks_of_different_runs_refuse_to_start_and_write_nothing() {
    let out = tempdir("dp-mismatch");
    let cfg = config(&out, &["train.max_steps=2"]);
    let train = rows(4, 12);
    let ranks = run_ranks(2, 1000, true, &cfg, &train, &[], |rank| {
        format!("run-{}", rank.min(1))
    });
    for (summary, _) in &ranks {
        let err = summary.as_ref().unwrap_err();
        assert!(matches!(err, TrainError::RankMismatch { .. }), "{err}");
        assert!(
            err.to_string()
                .starts_with("the ranks disagree on the run (config and data): rank 0 has"),
            "{err}"
        );
    }
    assert!(!out.join("metrics.jsonl").exists());
    assert!(whet_train::checkpoint::list(&out).is_empty());
}

/// Early stopping is decided from validation sums reduced over the ranks: every rank stops at
/// the same step. A divergence stops every rank with the same error.
#[test]
fn ranks_stop_early_and_fail_together() {
    let (train, val) = (rows(8, 12), rows(3, 12));
    let out = tempdir("dp-early");
    let cfg = config(
        &out,
        &[
            "train.max_steps=50",
            "train.eval_every=2",
            "train.patience=2",
            "train.min_delta=1e9",
        ],
    );
    for (summary, _) in run_ranks(2, 1000, true, &cfg, &train, &val, |_| "r".into()) {
        let s = summary.unwrap();
        assert!(s.stopped_early);
        assert_eq!((s.steps, s.best_step), (6, Some(2)));
    }

    let out = tempdir("dp-nan");
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
    let errors: Vec<String> = run_ranks(2, 1000, false, &cfg, &train, &[], |_| "r".into())
        .into_iter()
        .map(|(s, _)| {
            let e = s.unwrap_err();
            assert!(matches!(e, TrainError::NonFinite { .. }), "{e}");
            e.to_string()
        })
        .collect();
    assert_eq!(errors[0], errors[1]);
    let ckpts = whet_train::checkpoint::list(&out);
    assert!(
        !ckpts.is_empty(),
        "the checkpoint before the divergence survives"
    );
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), to.join(e.file_name())).unwrap();
    }
}

/// Preference runs are data-parallel too: each rank takes whole pairs, the loss is normalised by
/// the pairs of all ranks, and the logged rewards are the pair-weighted means over every rank's
/// pairs: DPO and ORPO on 2 and 3 ranks reach one process's losses, rewards and parameters.
#[test]
fn preference_runs_reach_one_process_on_every_world_size() {
    use whet_train::preference::{DpoConfig, DpoLoss, Objective, PreferenceObjective};
    // 11 pairs, 3 micro-batches of 2 pairs per step: ranks get unequal shares.
    let (train, val) = (rows(22, 12), rows(10, 12));
    let objectives = [
        PreferenceObjective::Dpo(DpoConfig {
            beta: 0.5,
            loss: DpoLoss::Sigmoid {
                label_smoothing: 0.0,
            },
        }),
        PreferenceObjective::Orpo { beta: 0.2 },
    ];
    for objective in objectives {
        let settings = |out: &Path| {
            let mut cfg = config(out, DP_RUN);
            cfg.trainer.objective = Objective::Preference(objective);
            cfg
        };
        let one_out = tempdir("dp-pref-1");
        let mut model = tiny_model(true);
        let one = run(&mut model, &settings(&one_out), &train, &val, "r").unwrap();
        let want = trainable_values(&model);
        assert_eq!(one.steps, 4);
        for world in [2, 3] {
            let out = tempdir("dp-pref-n");
            let ranks = run_ranks(world, 200, true, &settings(&out), &train, &val, |_| {
                "r".into()
            });
            for (rank, (summary, values)) in ranks.iter().enumerate() {
                let s = summary.as_ref().unwrap();
                let at = format!("{objective:?} world {world} rank {rank}");
                for (a, b) in s.losses.iter().zip(&one.losses) {
                    assert!((a - b).abs() < 1e-5, "{at}: loss {a} vs {b}");
                }
                for (a, b) in s.evals.iter().zip(&one.evals) {
                    assert!((a.val_loss - b.val_loss).abs() < 1e-5, "{at}");
                    let (pa, pb) = (
                        a.preference.as_ref().unwrap(),
                        b.preference.as_ref().unwrap(),
                    );
                    assert_eq!(pa.pairs, pb.pairs, "{at}");
                    assert!((pa.reward_margin - pb.reward_margin).abs() < 1e-5, "{at}");
                    assert!(
                        (pa.reward_accuracy - pb.reward_accuracy).abs() < 1e-9,
                        "{at}"
                    );
                    assert_eq!(pa.nll.is_some(), pb.nll.is_some(), "{at}");
                }
                let diff = max_abs_diff(values, &want);
                assert!(diff < TOL, "{at}: max |param - one process| = {diff}");
            }
        }
    }
}
