use whet_data::atomic::MARKER;
use whet_train::TrainError;
use whet_train::checkpoint::{self, TrainerState};

use crate::common::*;

fn losses(out: &std::path::Path) -> Vec<String> {
    std::fs::read_to_string(out.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .filter_map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).unwrap();
            (v["kind"] == "train").then(|| format!("{}:{}", v["step"], v["loss"]))
        })
        .collect()
}

/// A run interrupted after any checkpoint and resumed reaches bit-identical losses and weights
/// (optimizer moments, schedule position, data cursor and dropout streams are all restored).
#[test]
fn resume_is_bit_identical() {
    let overrides = [
        "train.max_steps=8",
        "output.save_every=1",
        "output.keep_last=20",
        "train.eval_every=4",
    ];
    let (train, val) = (rows(10, 12), rows(2, 12));
    let full_out = tempdir("resume-full");
    let cfg = config(&full_out, &overrides);
    let mut model = tiny_model(true);
    run(&mut model, &cfg, &train, &val, "r").unwrap();
    let want_losses = losses(&full_out);
    let want_weights = trainable_values(&model);

    for stop_after in [3u64, 5] {
        let out = tempdir("resume-part");
        // Simulate a kill: copy the uninterrupted run's state as it was after `stop_after`
        // steps (the checkpoint and the metrics written so far), in a fresh folder.
        let ckpt = whet_train::checkpoint::checkpoint_name(stop_after);
        copy_dir(&full_out.join(&ckpt), &out.join(&ckpt));
        std::fs::copy(full_out.join(MARKER), out.join(MARKER)).unwrap();
        let metrics: Vec<String> = std::fs::read_to_string(full_out.join("metrics.jsonl"))
            .unwrap()
            .lines()
            .map(String::from)
            .chain(["{\"kind\":\"train\",\"step\":999,\"loss\":1.0}".to_string()]) // a line past the checkpoint
            .collect();
        std::fs::write(out.join("metrics.jsonl"), metrics.join("\n") + "\n").unwrap();
        let cfg = config(&out, &overrides);
        let mut model = tiny_model(true);
        let s = run(&mut model, &cfg, &train, &val, "r").unwrap();
        assert_eq!(s.resumed_from, stop_after);
        assert_eq!(losses(&out), want_losses, "resumed after step {stop_after}");
        assert_eq!(
            trainable_values(&model),
            want_weights,
            "resumed after step {stop_after}"
        );
    }
}

#[test]
fn an_output_folder_of_another_run_is_refused_and_left_intact() {
    let out = tempdir("foreign");
    let cfg = config(&out, &["train.max_steps=2"]);
    let train = rows(4, 12);
    let mut model = tiny_model(true);
    run(&mut model, &cfg, &train, &[], "first").unwrap();
    let before = whet_train::checkpoint::list(&out);
    let state_before = std::fs::read(before[0].1.join("trainer_state.json")).unwrap();
    let mut model = tiny_model(true);
    let err = run(&mut model, &cfg, &train, &[], "second").unwrap_err();
    assert!(matches!(err, TrainError::ForeignOutput { .. }), "{err}");
    assert_eq!(whet_train::checkpoint::list(&out), before);
    assert_eq!(
        std::fs::read(before[0].1.join("trainer_state.json")).unwrap(),
        state_before
    );
}

/// A checkpoint whose writing fails (a full disk, say) leaves no partial folder and does not
/// touch the checkpoints already there.
#[test]
fn a_failed_checkpoint_write_leaves_earlier_checkpoints_intact() {
    let out = tempdir("diskfull");
    let state = |step| whet_train::checkpoint::TrainerState {
        step,
        cursor: Default::default(),
        run_id: "r".into(),
        best_val_loss: None,
        best_metric: None,
        best_step: None,
        stale_evals: 0,
        tokens_seen: 0,
        tokens_by_source: Vec::new(),
    };
    whet_train::checkpoint::write(&out, &state(1), "x = 1", |dir| {
        std::fs::write(dir.join("weights.bin"), b"good").unwrap();
        Ok(())
    })
    .unwrap();
    let err = whet_train::checkpoint::write(&out, &state(2), "x = 1", |dir| {
        std::fs::write(dir.join("weights.bin"), b"partial").unwrap();
        Err(TrainError::CheckpointWrite {
            path: dir.join("weights.bin"),
            source: std::io::Error::new(std::io::ErrorKind::StorageFull, "No space left on device"),
        })
    })
    .unwrap_err();
    assert!(
        err.to_string().contains("previous checkpoints are intact"),
        "{err}"
    );
    let names: Vec<String> = std::fs::read_dir(&out)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    assert_eq!(
        names,
        vec!["checkpoint-000001".to_string()],
        "no temporary or partial folder left"
    );
    assert_eq!(
        std::fs::read(out.join("checkpoint-000001/weights.bin")).unwrap(),
        b"good"
    );
}

/// A run killed before its first checkpoint left its marker, some metrics and a half-written
/// checkpoint folder: the same run starts over (the metrics of the lost steps dropped), another
/// run is refused.
#[test]
fn a_run_killed_before_its_first_checkpoint_starts_over() {
    let overrides = ["train.max_steps=4", "output.save_every=3"];
    let train = rows(8, 12);
    let reference = tempdir("restart-ref");
    let mut model = tiny_model(true);
    run(
        &mut model,
        &config(&reference, &overrides),
        &train,
        &[],
        "r",
    )
    .unwrap();
    let want = losses(&reference);

    let killed = |tag| {
        let out = tempdir(tag);
        std::fs::copy(reference.join(MARKER), out.join(MARKER)).unwrap();
        // Two steps' lines, and a third cut by the kill.
        let text = std::fs::read_to_string(reference.join("metrics.jsonl")).unwrap();
        let two: Vec<&str> = text.lines().take(2).collect();
        let cut = two.join("\n") + "\n{\"kind\":\"tr";
        std::fs::write(out.join("metrics.jsonl"), cut).unwrap();
        std::fs::create_dir(out.join(".checkpoint-000003.Ab12Cd.tmp")).unwrap();
        std::fs::write(
            out.join(".checkpoint-000003.Ab12Cd.tmp/adapter_config.json"),
            b"{",
        )
        .unwrap();
        out
    };

    let out = killed("restart");
    let mut model = tiny_model(true);
    let s = run(&mut model, &config(&out, &overrides), &train, &[], "r").unwrap();
    assert_eq!(s.resumed_from, 0);
    assert_eq!(
        losses(&out),
        want,
        "the rerun's metrics are not one clean history"
    );
    let mut names: Vec<String> = std::fs::read_dir(&out)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    names.sort();
    assert_eq!(
        names,
        [
            MARKER,
            "checkpoint-000003",
            "checkpoint-000004",
            "metrics.jsonl"
        ],
        "a leftover of the killed run survived"
    );

    // Another run (another config or data) in that folder: refused, nothing touched.
    let out = killed("restart-other");
    let metrics = std::fs::read(out.join("metrics.jsonl")).unwrap();
    let mut model = tiny_model(true);
    let err = run(&mut model, &config(&out, &overrides), &train, &[], "other").unwrap_err();
    assert!(matches!(err, TrainError::ForeignOutput { .. }), "{err}");
    assert!(err.to_string().contains("output.dir"), "{err}");
    assert_eq!(std::fs::read(out.join("metrics.jsonl")).unwrap(), metrics);
    assert!(out.join(".checkpoint-000003.Ab12Cd.tmp").is_dir());
    assert!(checkpoint::list(&out).is_empty());
}

/// A kill between a checkpoint's rename and the update of `best` left `best` naming an older
/// checkpoint: the resumed run points it at the checkpoint its state names, and pruning keeps
/// that one.
#[test]
fn a_best_pointer_left_behind_by_a_kill_is_repaired_and_never_pruned() {
    let train = rows(8, 12);
    let out = tempdir("best");
    let first = [
        "train.max_steps=3",
        "output.save_every=1",
        "output.keep_last=20",
    ];
    let mut model = tiny_model(true);
    run(&mut model, &config(&out, &first), &train, &[], "r").unwrap();
    assert_eq!(checkpoint::list(&out).len(), 3);

    // The on-disk state of the kill: checkpoint 3 improved on the best (its state says so,
    // written before its rename), `best` still names checkpoint 1.
    let path = out
        .join(checkpoint::checkpoint_name(3))
        .join(checkpoint::STATE_FILE);
    let mut state: TrainerState =
        serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    state.best_step = Some(3);
    state.best_val_loss = Some(1.5);
    std::fs::write(&path, serde_json::to_string(&state).unwrap()).unwrap();
    checkpoint::mark_best(&out, 1).unwrap();

    let resumed = [
        "train.max_steps=5",
        "output.save_every=1",
        "output.keep_last=1",
    ];
    let mut model = tiny_model(true);
    let s = run(&mut model, &config(&out, &resumed), &train, &[], "r").unwrap();
    assert_eq!((s.resumed_from, s.best_step), (3, Some(3)));
    let steps: Vec<u64> = checkpoint::list(&out).into_iter().map(|(s, _)| s).collect();
    assert_eq!(
        steps,
        [3, 5],
        "the best checkpoint was pruned, or an old one kept"
    );
    assert_eq!(
        checkpoint::best(&out),
        Some(3),
        "`best` names a pruned checkpoint"
    );
    assert_eq!(
        s.best_checkpoint.as_deref(),
        Some(out.join(checkpoint::checkpoint_name(3)).as_path())
    );
}

fn copy_dir(from: &std::path::Path, to: &std::path::Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), to.join(e.file_name())).unwrap();
    }
}

/// Preference runs resume bit-identically too: LoRA DPO (the adapter-off reference) and full
/// fine-tuning DPO, whose reference log-probs are computed again from the fresh base before the
/// checkpoint is loaded, as `whet train` does.
#[test]
fn preference_resume_is_bit_identical() {
    use whet_train::preference::{DpoConfig, DpoLoss, Objective, PreferenceObjective};
    let overrides = [
        "train.max_steps=6",
        "output.save_every=1",
        "output.keep_last=20",
    ];
    let (train, val) = (rows(12, 12), rows(4, 12));
    for lora in [true, false] {
        let settings = |out: &std::path::Path| {
            let mut cfg = config(out, &overrides);
            cfg.trainer.objective = Objective::Preference(PreferenceObjective::Dpo(DpoConfig {
                beta: 0.5,
                loss: DpoLoss::Sigmoid {
                    label_smoothing: 0.1,
                },
            }));
            if !lora {
                cfg.trainer.method = whet_train::Method::Full;
                cfg.trainer.lr = 1e-3;
            }
            cfg
        };
        let go = |out: &std::path::Path| {
            let mut model = tiny_model(lora);
            let reference = (!lora).then(|| precompute(&mut model, &train, &val));
            let cfg = settings(out);
            let s = run_with(
                &mut model,
                &cfg,
                &train,
                &val,
                "r",
                None,
                reference.as_ref(),
            )
            .unwrap();
            (s, trainable_values(&model))
        };
        let full_out = tempdir("pref-resume-full");
        let (_, want_weights) = go(&full_out);
        let want_losses = losses(&full_out);
        let out = tempdir("pref-resume-part");
        let ckpt = checkpoint::checkpoint_name(3);
        copy_dir(&full_out.join(&ckpt), &out.join(&ckpt));
        std::fs::copy(full_out.join(MARKER), out.join(MARKER)).unwrap();
        std::fs::copy(full_out.join("metrics.jsonl"), out.join("metrics.jsonl")).unwrap();
        let (s, weights) = go(&out);
        assert_eq!(s.resumed_from, 3, "lora {lora}");
        assert_eq!(losses(&out), want_losses, "lora {lora}");
        assert!(weights == want_weights, "lora {lora}: the weights differ");
    }
}
