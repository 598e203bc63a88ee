//! The model against itself and against first principles: loss vs logits, packed rows vs
//! separate documents, KV-cached decoding vs the full forward, gradients vs finite differences.

use std::collections::HashMap;

use candle_core::{DType, Tensor};
use rand::SeedableRng;
use rand::rngs::StdRng;
use whet_model::{Config, Error, Model, Trainable};

use crate::common::*;

/// A model whose weights are large enough for gradients to stand out of f32 noise:
/// matrices N(0, 0.3), norms 1 + N(0, 0.2), biases N(0, 0.1).
pub fn spread_model(cfg: &Config, seed: u64, trainable: Trainable) -> Model {
    let base = Model::random(cfg, seed, &cpu()).unwrap();
    let mut rng = StdRng::seed_from_u64(seed ^ 0xABCD);
    let mut map = HashMap::new();
    for (name, t) in base.named_weights().unwrap() {
        let n = t.elem_count();
        let (mean, std) = if name.ends_with("norm.weight") {
            (1.0, 0.2)
        } else if name.ends_with(".bias") {
            (0.0, 0.1)
        } else {
            (0.0, 0.3)
        };
        let v: Vec<f32> = (0..n)
            .map(|_| mean + std * whet_model::load::normal(&mut rng))
            .collect();
        map.insert(name, Tensor::from_vec(v, t.shape(), &cpu()).unwrap());
    }
    Model::from_tensors(cfg, map, trainable, &cpu()).unwrap()
}

#[test]
fn loss_is_the_summed_cross_entropy_of_the_logits() {
    for model_type in ["llama", "mistral", "qwen2"] {
        let cfg = tiny_config(model_type);
        let model = spread_model(&cfg, 1, Trainable::None);
        let b = packed_batch(cfg.vocab_size as u32, 1);
        let (loss, n) = model
            .loss(&b.ids, &b.positions, &b.segments, &b.targets)
            .unwrap();
        let logits = model.logits(&b.ids, &b.positions, &b.segments).unwrap();
        assert_eq!(logits.dims(), &[2, 12, cfg.vocab_size]);
        let logits = logits.to_vec3::<f32>().unwrap();
        let mut want = 0.0;
        let mut want_n = 0;
        for (row, targets) in b.targets_rows.iter().enumerate() {
            for (t, &tgt) in targets.iter().enumerate() {
                if tgt != -100 {
                    want += ce_row(&logits[row][t], tgt as usize);
                    want_n += 1;
                }
            }
        }
        let got = loss.to_scalar::<f32>().unwrap() as f64;
        let rel = (got - want).abs() / want;
        eprintln!("{model_type}: loss {got} vs reference {want}, rel err {rel:.2e}, n {n}");
        assert_eq!(n, want_n);
        assert!(rel < 1e-5, "{model_type}: loss {got} vs {want}");
    }
}

#[test]
fn no_supervised_target_gives_zero_loss() {
    let cfg = tiny_config("llama");
    let model = Model::random(&cfg, 0, &cpu()).unwrap();
    let b = packed_batch(64, 0);
    let targets = Tensor::full(-100i64, (2, 12), &cpu()).unwrap();
    let (loss, n) = model
        .loss(&b.ids, &b.positions, &b.segments, &targets)
        .unwrap();
    assert_eq!(n, 0);
    assert_eq!(loss.to_scalar::<f32>().unwrap(), 0.0);
}

#[test]
fn packed_documents_do_not_see_each_other() {
    let cfg = tiny_config("qwen2");
    let model = spread_model(&cfg, 2, Trainable::None);
    let b = packed_batch(cfg.vocab_size as u32, 2);
    let packed = model.logits(&b.ids, &b.positions, &b.segments).unwrap(); // (2, 12, V)
    let row1 = &b.ids_rows[1];
    for (start, len) in [(0usize, 5usize), (5, 7)] {
        let doc = &row1[start..start + len];
        let ids = Tensor::new(doc, &cpu()).unwrap().unsqueeze(0).unwrap();
        let pos = Tensor::arange(0u32, len as u32, &cpu())
            .unwrap()
            .unsqueeze(0)
            .unwrap();
        let seg = Tensor::zeros((1, len), DType::U32, &cpu()).unwrap();
        let alone = model.logits(&ids, &pos, &seg).unwrap(); // (1, len, V)
        let inside = packed
            .narrow(0, 1, 1)
            .unwrap()
            .narrow(1, start, len)
            .unwrap();
        let d = max_abs_diff(&inside, &alone);
        eprintln!(
            "document at {start}..{}: max |packed - alone| = {d:.2e}",
            start + len
        );
        assert!(d < 1e-5, "document {start}: {d}");
    }
}

#[test]
fn kv_cache_decoding_matches_the_full_forward() {
    let cfg = tiny_config("llama");
    let model = spread_model(&cfg, 3, Trainable::None);
    let seq: Vec<u32> = (0..10).map(|i| (i * 11 + 5) % 64).collect();
    let ids = Tensor::new(seq.as_slice(), &cpu())
        .unwrap()
        .unsqueeze(0)
        .unwrap();
    let pos = Tensor::arange(0u32, 10, &cpu())
        .unwrap()
        .unsqueeze(0)
        .unwrap();
    let seg = Tensor::zeros((1, 10), DType::U32, &cpu()).unwrap();
    let full = model.logits(&ids, &pos, &seg).unwrap().squeeze(0).unwrap(); // (10, V)
    let mut cache = model.new_cache();
    let prefill = ids.narrow(1, 0, 4).unwrap();
    let last = model.forward_cached(&prefill, &mut cache).unwrap(); // (1, V)
    let mut worst = max_abs_diff(&last.squeeze(0).unwrap(), &full.get(3).unwrap());
    for t in 4..10 {
        let step = ids.narrow(1, t, 1).unwrap();
        let last = model.forward_cached(&step, &mut cache).unwrap();
        worst = worst.max(max_abs_diff(
            &last.squeeze(0).unwrap(),
            &full.get(t).unwrap(),
        ));
    }
    assert_eq!(cache.len(), 10);
    eprintln!("kv cache: max |cached - full| = {worst:.2e}");
    assert!(worst < 1e-5, "{worst}");
}

#[test]
fn full_fine_tuning_gradients_match_finite_differences() {
    for (model_type, tie) in [("llama", false), ("qwen2", true)] {
        let mut cfg = tiny_config(model_type);
        cfg.tie_word_embeddings = tie;
        let model = spread_model(&cfg, 4, Trainable::Full);
        let b = packed_batch(cfg.vocab_size as u32, 4);
        let vars = model.trainable();
        let names: Vec<&str> = vars.iter().map(|(n, _)| n.as_str()).collect();
        let want: Vec<String> = model
            .named_weights()
            .unwrap()
            .into_iter()
            .map(|(n, _)| n)
            .collect();
        assert_eq!(
            names, want,
            "full fine-tuning trains exactly the HF weights"
        );
        assert_eq!(names.contains(&"lm_head.weight"), !tie);
        assert_eq!(
            names.contains(&"model.layers.0.self_attn.q_proj.bias"),
            model_type == "qwen2"
        );
        assert!(!names.contains(&"model.layers.0.self_attn.o_proj.bias"));

        let loss_of = || -> f64 {
            let (l, _) = model
                .loss(&b.ids, &b.positions, &b.segments, &b.targets)
                .unwrap();
            l.to_scalar::<f32>().unwrap() as f64
        };
        let (loss, _) = model
            .loss(&b.ids, &b.positions, &b.segments, &b.targets)
            .unwrap();
        let grads = loss.backward().unwrap();
        let eps = 2e-2f32;
        let mut worst = 0f64;
        for (name, var) in &vars {
            let g = grads
                .get(var)
                .unwrap_or_else(|| panic!("no gradient for {name}"));
            let g = g.flatten_all().unwrap().to_vec1::<f32>().unwrap();
            // the element with the largest gradient: the most signal against f32 noise
            let (i, &gi) = g
                .iter()
                .enumerate()
                .max_by(|a, b| a.1.abs().total_cmp(&b.1.abs()))
                .unwrap();
            let fd = finite_difference(var, i, eps, loss_of);
            let err = (fd - gi as f64).abs();
            worst = worst.max(err / (gi.abs() as f64).max(0.1));
            assert!(
                err <= 2e-2 * gi.abs() as f64 + 2e-3,
                "{model_type} {name}[{i}]: autograd {gi} vs finite difference {fd}"
            );
        }
        eprintln!(
            "{model_type} (tied {tie}): {} weights, worst FD rel err {worst:.2e}",
            vars.len()
        );
    }
}

#[test]
fn frozen_model_has_nothing_to_train() {
    let cfg = tiny_config("llama");
    let model = Model::random(&cfg, 0, &cpu()).unwrap();
    assert!(model.trainable().is_empty());
    let (total, trainable) = model.num_params();
    assert_eq!(trainable, 0);
    // embed + head + 2 * (q, k, v, o, gate, up, down, 2 norms) + final norm
    let (v, h, i, kv) = (64, 32, 48, 16);
    let per_layer = h * h + 2 * kv * h + h * h + 3 * h * i + 2 * h;
    assert_eq!(total, 2 * v * h + 2 * per_layer + h);
}

#[test]
fn bad_inputs_are_errors_not_panics() {
    let cfg = tiny_config("llama");
    let model = Model::random(&cfg, 0, &cpu()).unwrap();
    let b = packed_batch(64, 0);
    let big = (b.ids.clone() + 64.0).unwrap();
    match model.logits(&big, &b.positions, &b.segments) {
        Err(e @ Error::Input { input: "ids", .. }) => {
            let msg = e.to_string();
            assert!(
                msg.contains("vocab_size = 64") && msg.contains("flat position 0"),
                "{msg}"
            );
        }
        other => panic!("expected an ids error, got {other:?}"),
    }
    let short = b.targets.narrow(1, 0, 5).unwrap();
    let e = model
        .loss(&b.ids, &b.positions, &b.segments, &short)
        .unwrap_err();
    assert!(e.to_string().contains("targets"), "{e}");
    let bad_target = Tensor::full(64i64, (2, 12), &cpu()).unwrap();
    let e = model
        .loss(&b.ids, &b.positions, &b.segments, &bad_target)
        .unwrap_err();
    assert!(
        e.to_string().contains("targets") && e.to_string().contains("64"),
        "{e}"
    );
    let f32_ids = b.ids.to_dtype(DType::F32).unwrap();
    let e = model
        .logits(&f32_ids, &b.positions, &b.segments)
        .unwrap_err();
    assert!(e.to_string().contains("ids"), "{e}");
}
