//! LoRA: PEFT init and names, merge, adapter round trip, dropout, frozen base.

use candle_core::Tensor;
use rand::SeedableRng;
use rand::rngs::StdRng;
use whet_model::{Error, LINEAR_MODULES, LoraConfig, Model, TargetModules, Trainable};

use crate::common::*;
use crate::model::spread_model;

/// Gives every lora_B a random value (fresh adapters have B = 0 and change nothing).
pub fn randomize_b(model: &Model, seed: u64) {
    let mut rng = StdRng::seed_from_u64(seed);
    for (name, var) in model.trainable() {
        if name.ends_with("lora_B.weight") {
            let v: Vec<f32> = (0..var.elem_count())
                .map(|_| 0.2 * whet_model::load::normal(&mut rng))
                .collect();
            var.set(&Tensor::from_vec(v, var.shape(), &cpu()).unwrap())
                .unwrap();
        }
    }
}

fn logits(model: &Model) -> Tensor {
    let b = packed_batch(model.config().vocab_size as u32, 9);
    model.logits(&b.ids, &b.positions, &b.segments).unwrap()
}

fn loss(model: &Model) -> f32 {
    let b = packed_batch(model.config().vocab_size as u32, 9);
    let (l, _) = model
        .loss(&b.ids, &b.positions, &b.segments, &b.targets)
        .unwrap();
    l.to_scalar::<f32>().unwrap()
}

#[test]
fn fresh_adapters_have_peft_names_shapes_and_init() {
    let cfg = tiny_config("llama");
    let base = spread_model(&cfg, 5, Trainable::None);
    let lcfg = LoraConfig::new(4, 8.0);
    let model = spread_model(
        &cfg,
        5,
        Trainable::Lora {
            config: lcfg,
            seed: 7,
        },
    );
    let vars = model.trainable();
    assert_eq!(vars.len(), cfg.num_hidden_layers * LINEAR_MODULES.len() * 2);
    assert_eq!(
        vars[0].0,
        "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
    );
    assert_eq!(
        vars[1].0,
        "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"
    );
    assert_eq!(
        vars[13].0,
        "base_model.model.model.layers.0.mlp.down_proj.lora_B.weight"
    );
    for (name, var) in &vars {
        let (rows, cols) = var.dims2().unwrap();
        if name.ends_with("lora_A.weight") {
            assert_eq!(rows, 4, "{name}");
            // kaiming_uniform(a = sqrt(5)): U(-1/sqrt(IN), 1/sqrt(IN)), not degenerate
            let bound = 1.0 / (cols as f32).sqrt();
            let m = max_abs(var.as_tensor());
            assert!(
                m <= bound && m > 0.5 * bound,
                "{name}: max |A| {m}, bound {bound}"
            );
        } else {
            assert_eq!(cols, 4, "{name}");
            assert_eq!(max_abs(var.as_tensor()), 0.0, "{name}: B starts at zero");
        }
    }
    // B = 0: the adapted model computes exactly what the base does.
    assert_eq!(max_abs_diff(&logits(&model), &logits(&base)), 0.0);
    // The same seed gives the same adapters.
    let again = spread_model(
        &cfg,
        5,
        Trainable::Lora {
            config: LoraConfig::new(4, 8.0),
            seed: 7,
        },
    );
    assert_eq!(
        max_abs_diff(again.trainable()[0].1.as_tensor(), vars[0].1.as_tensor()),
        0.0
    );
}

#[test]
fn only_the_adapters_get_gradients() {
    let cfg = tiny_config("qwen2");
    let model = spread_model(
        &cfg,
        6,
        Trainable::Lora {
            config: LoraConfig::new(2, 4.0),
            seed: 1,
        },
    );
    randomize_b(&model, 2);
    let b = packed_batch(64, 6);
    let (loss, _) = model
        .loss(&b.ids, &b.positions, &b.segments, &b.targets)
        .unwrap();
    let grads = loss.backward().unwrap();
    for (name, var) in model.trainable() {
        let g = grads
            .get(&var)
            .unwrap_or_else(|| panic!("no gradient for {name}"));
        assert!(max_abs(g) > 0.0, "{name}: zero gradient");
    }
    for (name, w) in model.named_weights().unwrap() {
        assert!(!w.is_variable(), "{name} is trainable under LoRA");
        assert!(grads.get(&w).is_none(), "{name} got a gradient under LoRA");
    }
    let (total, trainable) = model.num_params();
    assert!(
        trainable > 0 && trainable < total / 2,
        "{trainable} of {total}"
    );
}

#[test]
fn lora_gradients_match_finite_differences() {
    let cfg = tiny_config("llama");
    let model = spread_model(
        &cfg,
        11,
        Trainable::Lora {
            config: LoraConfig::new(2, 4.0),
            seed: 3,
        },
    );
    randomize_b(&model, 4);
    let b = packed_batch(64, 11);
    let loss_of = || -> f64 {
        let (l, _) = model
            .loss(&b.ids, &b.positions, &b.segments, &b.targets)
            .unwrap();
        l.to_scalar::<f32>().unwrap() as f64
    };
    let (l, _) = model
        .loss(&b.ids, &b.positions, &b.segments, &b.targets)
        .unwrap();
    let grads = l.backward().unwrap();
    let mut worst = 0f64;
    for (name, var) in model.trainable() {
        let g = grads
            .get(&var)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        let (i, &gi) = g
            .iter()
            .enumerate()
            .max_by(|a, b| a.1.abs().total_cmp(&b.1.abs()))
            .unwrap();
        let fd = finite_difference(&var, i, 2e-2, loss_of);
        let err = (fd - gi as f64).abs();
        worst = worst.max(err / (gi.abs() as f64).max(0.1));
        assert!(
            err <= 2e-2 * gi.abs() as f64 + 2e-3,
            "{name}[{i}]: {gi} vs FD {fd}"
        );
    }
    eprintln!("LoRA: worst FD rel err {worst:.2e}");
}

#[test]
fn merging_gives_the_same_model() {
    for use_rslora in [false, true] {
        let cfg = tiny_config("qwen2");
        let mut lcfg = LoraConfig::new(4, 16.0);
        lcfg.use_rslora = use_rslora;
        let mut model = spread_model(
            &cfg,
            8,
            Trainable::Lora {
                config: lcfg,
                seed: 2,
            },
        );
        randomize_b(&model, 3);
        let before = logits(&model);
        model.merge_lora().unwrap();
        assert!(model.trainable().is_empty());
        assert!(model.lora_config().is_none());
        let after = logits(&model);
        let d = max_abs_diff(&after, &before);
        eprintln!("merge (rslora {use_rslora}): max |merged - adapted| = {d:.2e}");
        assert!(d < 1e-4 * max_abs(&before).max(1.0), "{d}");
        assert!(max_abs_diff(&after, &logits(&spread_model(&cfg, 8, Trainable::None))) > 1e-3);
    }
}

#[test]
fn rslora_scales_by_alpha_over_sqrt_r() {
    // alpha / r with alpha = 8 equals alpha' / sqrt(r) with alpha' = 8 / sqrt(r): same model.
    let cfg = tiny_config("llama");
    let r = 4usize;
    let plain = spread_model(
        &cfg,
        12,
        Trainable::Lora {
            config: LoraConfig::new(r, 8.0),
            seed: 1,
        },
    );
    let mut rs = LoraConfig::new(r, 8.0 / (r as f64).sqrt());
    rs.use_rslora = true;
    let rs = spread_model(
        &cfg,
        12,
        Trainable::Lora {
            config: rs,
            seed: 1,
        },
    );
    randomize_b(&plain, 5);
    randomize_b(&rs, 5);
    let d = max_abs_diff(&logits(&plain), &logits(&rs));
    assert!(d < 1e-5, "{d}");
    let mut rs2 = LoraConfig::new(r, 8.0);
    rs2.use_rslora = true;
    let rs2 = spread_model(
        &cfg,
        12,
        Trainable::Lora {
            config: rs2,
            seed: 1,
        },
    );
    randomize_b(&rs2, 5);
    assert!(
        max_abs_diff(&logits(&plain), &logits(&rs2)) > 1e-3,
        "rsLoRA must change the scale"
    );
}

#[test]
fn adapters_round_trip_through_peft_files() {
    let cfg = tiny_config("llama");
    let mut lcfg = LoraConfig::new(4, 16.0);
    lcfg.dropout = 0.05;
    lcfg.target_modules =
        TargetModules::Many(vec!["v_proj".into(), "q_proj".into(), "down_proj".into()]);
    let model = spread_model(
        &cfg,
        13,
        Trainable::Lora {
            config: lcfg.clone(),
            seed: 4,
        },
    );
    randomize_b(&model, 6);
    assert_eq!(model.trainable().len(), 2 * 3 * 2);
    let dir = TempDir::new("adapter");
    model.save_adapter(dir.path()).unwrap();

    let json: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(dir.path().join("adapter_config.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(json["peft_type"], "LORA");
    assert_eq!(json["task_type"], "CAUSAL_LM");
    assert_eq!(json["r"], 4);
    assert_eq!(json["lora_alpha"], 16);
    assert_eq!(json["lora_dropout"], 0.05);
    assert_eq!(
        json["target_modules"],
        serde_json::json!(["q_proj", "v_proj", "down_proj"])
    );
    assert_eq!(json["use_rslora"], false);
    assert_eq!(json["bias"], "none");
    assert_eq!(json["fan_in_fan_out"], false);
    assert_eq!(json["inference_mode"], true);
    assert!(json.get("base_model_name_or_path").is_some());

    let mut fresh = spread_model(&cfg, 13, Trainable::None);
    let read = fresh.load_adapter(dir.path()).unwrap();
    assert_eq!(read.r, 4);
    assert_eq!(read.alpha, 16.0);
    assert_eq!(read.dropout, 0.05);
    let names = |m: &Model| {
        m.trainable()
            .into_iter()
            .map(|(n, _)| n)
            .collect::<Vec<_>>()
    };
    assert_eq!(names(&fresh), names(&model));
    assert_eq!(max_abs_diff(&logits(&fresh), &logits(&model)), 0.0);

    // An adapter for a bigger model does not load silently.
    let mut other = tiny_config("llama");
    other.hidden_size = 48;
    let mut wrong = Model::random(&other, 0, &cpu()).unwrap();
    let e = wrong.load_adapter(dir.path()).unwrap_err();
    assert!(matches!(e, Error::ShapeMismatch { .. }), "{e}");
    assert!(
        e.to_string().contains("adapter_model.safetensors") && e.to_string().contains("lora_A"),
        "{e}"
    );
}

#[test]
fn unsupported_peft_features_are_named() {
    let dir = TempDir::new("dora");
    let cfg = LoraConfig::new(4, 8.0)
        .to_peft_json("base", &LINEAR_MODULES)
        .unwrap();
    let mut v: serde_json::Value = serde_json::from_str(&cfg).unwrap();
    v["use_dora"] = serde_json::json!(true);
    std::fs::write(dir.path().join("adapter_config.json"), v.to_string()).unwrap();
    let mut model = Model::random(&tiny_config("llama"), 0, &cpu()).unwrap();
    let e = model.load_adapter(dir.path()).unwrap_err().to_string();
    assert!(
        e.contains("adapter_config.json") && e.contains("use_dora"),
        "{e}"
    );

    v["use_dora"] = serde_json::json!(false);
    v["target_modules"] = serde_json::json!(["q_proj", "lm_head"]);
    std::fs::write(dir.path().join("adapter_config.json"), v.to_string()).unwrap();
    let e = model.load_adapter(dir.path()).unwrap_err().to_string();
    assert!(e.contains("lm_head"), "{e}");

    v["r"] = serde_json::json!("eight");
    std::fs::write(dir.path().join("adapter_config.json"), v.to_string()).unwrap();
    let e = model.load_adapter(dir.path()).unwrap_err().to_string();
    assert!(
        e.contains("adapter_config.json") && e.contains("`r`"),
        "{e}"
    );
}

#[test]
fn dropout_is_seeded_and_only_in_training() {
    let cfg = tiny_config("llama");
    let mut lcfg = LoraConfig::new(4, 8.0);
    lcfg.dropout = 0.5;
    let mk = |c: &LoraConfig| {
        let m = spread_model(
            &cfg,
            14,
            Trainable::Lora {
                config: c.clone(),
                seed: 9,
            },
        );
        randomize_b(&m, 7);
        m
    };
    let mut with = mk(&lcfg);
    let mut no_dropout = lcfg.clone();
    no_dropout.dropout = 0.0;
    let without = mk(&no_dropout);
    assert!(with.is_training());
    let l1 = loss(&with);
    let l2 = loss(&with);
    assert_ne!(l1, l2, "each training step draws a new mask");
    assert_eq!(l1, loss(&mk(&lcfg)), "same seed, same first mask");
    assert_ne!(l1, loss(&without));
    // logits (evaluation) never drop
    assert_eq!(max_abs_diff(&logits(&with), &logits(&without)), 0.0);
    with.set_training(false);
    assert_eq!(loss(&with), loss(&without));
}

#[test]
fn full_and_lora_do_not_mix() {
    let cfg = tiny_config("llama");
    let mut m = Model::random(&cfg, 0, &cpu()).unwrap();
    m.make_full_trainable().unwrap();
    let e = m.apply_lora(&LoraConfig::new(2, 2.0), 0).unwrap_err();
    assert!(e.to_string().contains("frozen base"), "{e}");
    let mut m = Model::random(&cfg, 0, &cpu()).unwrap();
    m.apply_lora(&LoraConfig::new(2, 2.0), 0).unwrap();
    assert!(m.make_full_trainable().is_err());
    assert!(m.trainable().iter().all(|(n, _)| n.contains(".lora_")));
}

#[test]
fn with_adapter_shares_the_base_and_leaves_it_unchanged() {
    let cfg = tiny_config("llama");
    let tuned = spread_model(
        &cfg,
        13,
        Trainable::Lora {
            config: LoraConfig::new(4, 8.0),
            seed: 1,
        },
    );
    randomize_b(&tuned, 3);
    let dir = TempDir::new("with-adapter");
    tuned.save_adapter(dir.path()).unwrap();

    let base = spread_model(&cfg, 13, Trainable::None);
    let before = logits(&base);
    let a = base.with_adapter(dir.path()).unwrap();
    assert!(base.lora_config().is_none(), "the base got the adapter");
    assert_eq!(max_abs_diff(&logits(&base), &before), 0.0);
    assert_eq!(max_abs_diff(&logits(&a), &logits(&tuned)), 0.0);
    assert!(max_abs_diff(&logits(&a), &before) > 1e-3);
    // The same base tensors, not copies.
    let ids = |m: &Model| {
        m.named_weights()
            .unwrap()
            .into_iter()
            .map(|(n, t)| (n, t.id()))
            .collect::<Vec<_>>()
    };
    assert_eq!(ids(&a), ids(&base));
}
