use whet_train::TrainError;

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
        best_step: None,
        stale_evals: 0,
        tokens_seen: 0,
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

fn copy_dir(from: &std::path::Path, to: &std::path::Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), to.join(e.file_name())).unwrap();
    }
}
