//! Per-sequence log-probabilities ([`Model::sequence_logps`]) against the summed loss, and the
//! reference view of a LoRA model ([`Model::adapters_disabled`]). Parity with TRL is in
//! `golden.rs` (log-probs) and whet-train's `tests/it/preference.rs` (losses, gradients).

use candle_core::{DType, Tensor};
use whet_model::{LoraConfig, Model, Trainable};

use crate::common::*;
use crate::lora::randomize_b;
use crate::model::spread_model;

fn lora_model(dropout: f64) -> Model {
    let mut lora = LoraConfig::new(4, 8.0);
    lora.dropout = dropout;
    let model = spread_model(
        &tiny_config("llama"),
        21,
        Trainable::Lora {
            config: lora,
            seed: 5,
        },
    );
    randomize_b(&model, 6);
    model
}

/// Row `r` of a (B, T) tensor, as (1, T).
fn row(t: &Tensor, r: usize) -> Tensor {
    t.narrow(0, r, 1).unwrap()
}

#[test]
fn each_row_is_minus_its_own_summed_loss() {
    let model = lora_model(0.0);
    let b = packed_batch(64, 3);
    let (logps, counts) = model
        .sequence_logps(&b.ids, &b.positions, &b.segments, &b.targets)
        .unwrap();
    assert_eq!(logps.dims(), [2]);
    let logps = logps.to_vec1::<f32>().unwrap();
    for (r, (&lp, &n)) in logps.iter().zip(&counts).enumerate() {
        let (sum, want_n) = model
            .loss(
                &row(&b.ids, r),
                &row(&b.positions, r),
                &row(&b.segments, r),
                &row(&b.targets, r),
            )
            .unwrap();
        assert_eq!(n, want_n, "row {r}: count");
        let sum = sum.to_scalar::<f32>().unwrap();
        assert!((lp + sum).abs() < 1e-4, "row {r}: {lp} vs -{sum}");
        assert!(lp < 0.0);
    }
    let supervised = b.targets_rows.iter().flatten().filter(|&&t| t >= 0).count();
    assert_eq!(counts.iter().sum::<usize>(), supervised);
}

#[test]
fn gradients_of_the_summed_logps_are_minus_the_loss_gradients() {
    let model = lora_model(0.0);
    let b = packed_batch(64, 4);
    let (logps, _) = model
        .sequence_logps(&b.ids, &b.positions, &b.segments, &b.targets)
        .unwrap();
    // Weight the rows differently, as a preference loss does.
    let w = Tensor::new(&[0.75f32, -1.5], &cpu()).unwrap();
    let g = model
        .backward(&(logps * &w).unwrap().sum_all().unwrap())
        .unwrap();
    let mut worst = 0f32;
    for (name, var) in model.trainable() {
        let mut want: Option<Tensor> = None;
        for (r, wr) in [(0, 0.75), (1, -1.5)] {
            let (sum, _) = model
                .loss(
                    &row(&b.ids, r),
                    &row(&b.positions, r),
                    &row(&b.segments, r),
                    &row(&b.targets, r),
                )
                .unwrap();
            let gr = model.backward(&sum).unwrap();
            let gr = (gr.get(var.as_tensor()).unwrap() * -wr).unwrap();
            want = Some(match want {
                None => gr,
                Some(acc) => (acc + gr).unwrap(),
            });
        }
        let e = rel_err(g.get(var.as_tensor()).unwrap(), &want.unwrap());
        worst = worst.max(e);
        assert!(e < 1e-4, "{name}: rel err {e}");
    }
    eprintln!("sequence_logps gradients vs per-row loss gradients: worst rel err {worst:.2e}");
}

#[test]
fn target_sets_share_one_forward_and_empty_rows_are_zero() {
    let model = lora_model(0.0);
    let b = packed_batch(64, 5);
    // Set 2: row 0 unsupervised, row 1 only its first target.
    let mut partial = vec![-100i64; 24];
    let first = b.targets_rows[1].iter().position(|&t| t >= 0).unwrap();
    partial[12 + first] = b.targets_rows[1][first];
    let partial = Tensor::from_vec(partial, (2, 12), &cpu()).unwrap();
    let sets = model
        .sequence_logps_sets(&b.ids, &b.positions, &b.segments, &[&b.targets, &partial])
        .unwrap();
    let alone = model
        .sequence_logps(&b.ids, &b.positions, &b.segments, &b.targets)
        .unwrap();
    assert_eq!(sets[0].1, alone.1);
    assert!(max_abs_diff(&sets[0].0, &alone.0) == 0.0);
    assert_eq!(sets[1].1, [0, 1]);
    let p = sets[1].0.to_vec1::<f32>().unwrap();
    assert_eq!(p[0], 0.0);
    assert!(p[1] < 0.0);
    // Nothing supervised at all: zeros, no forward needed.
    let none = Tensor::full(-100i64, (2, 12), &cpu()).unwrap();
    let (lp, n) = model
        .sequence_logps(&b.ids, &b.positions, &b.segments, &none)
        .unwrap();
    assert_eq!(
        (lp.to_vec1::<f32>().unwrap(), n),
        (vec![0.0, 0.0], vec![0, 0])
    );
    // Bad targets are named.
    let bad = Tensor::full(64i64, (2, 12), &cpu()).unwrap();
    let e = model
        .sequence_logps(&b.ids, &b.positions, &b.segments, &bad)
        .unwrap_err()
        .to_string();
    assert!(e.contains("targets"), "{e}");
}

#[test]
fn checkpointing_and_dropout_keep_the_gradients() {
    let model = lora_model(0.2);
    let b = packed_batch(64, 6);
    let run = |checkpointing: bool| {
        let mut m = model.clone();
        m.set_activation_checkpointing(checkpointing);
        m.reseed_dropout(9);
        let (lp, _) = m
            .sequence_logps(&b.ids, &b.positions, &b.segments, &b.targets)
            .unwrap();
        let g = m
            .backward(&(lp.get(0).unwrap() - lp.get(1).unwrap()).unwrap())
            .unwrap();
        m.trainable()
            .into_iter()
            .map(|(n, v)| (n, g.get(v.as_tensor()).unwrap().clone()))
            .collect::<Vec<_>>()
    };
    for ((name, a), (_, b)) in run(false).iter().zip(&run(true)) {
        let e = rel_err(b, a);
        assert!(e < 1e-5, "{name}: rel err {e}");
    }
}

#[test]
fn adapters_disabled_is_the_base_model_without_gradients() {
    let model = lora_model(0.3);
    let b = packed_batch(64, 8);
    let reference = model.adapters_disabled().unwrap();
    assert!(reference.trainable().is_empty());
    assert!(reference.lora_config().is_none() && !reference.is_training());
    assert!(
        model.lora_config().is_some() && model.is_training(),
        "self unchanged"
    );
    // The base alone: the same weights, loaded without adapters.
    let base = spread_model(&tiny_config("llama"), 21, Trainable::None);
    let (want, n_want) = base
        .sequence_logps(&b.ids, &b.positions, &b.segments, &b.targets)
        .unwrap();
    let (got, n) = model
        .reference_sequence_logps(&b.ids, &b.positions, &b.segments, &b.targets)
        .unwrap();
    assert_eq!(n, n_want);
    assert_eq!(max_abs_diff(&got, &want), 0.0);
    assert!(!got.track_op());
    // ... and different from the adapted policy.
    let mut eval = model.clone();
    eval.set_training(false);
    let (policy, _) = eval
        .sequence_logps(&b.ids, &b.positions, &b.segments, &b.targets)
        .unwrap();
    assert!(max_abs_diff(&policy, &want) > 1e-3);
    // Under full fine-tuning there is no reference inside the model.
    let full = spread_model(&tiny_config("llama"), 21, Trainable::Full);
    let e = full.adapters_disabled().unwrap_err().to_string();
    assert!(
        e.contains("full fine-tuning") && e.contains("frozen copy"),
        "{e}"
    );
    // A frozen model is its own reference.
    let (again, _) = base
        .reference_sequence_logps(&b.ids, &b.positions, &b.segments, &b.targets)
        .unwrap();
    assert_eq!(max_abs_diff(&again, &want), 0.0);
    assert_eq!(again.dtype(), DType::F32);
}
