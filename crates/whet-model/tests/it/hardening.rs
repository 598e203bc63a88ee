//! Hostile model files: config values that are not finite, out of range or whose shape
//! arithmetic overflows, shard paths that leave the model folder, NaN weights; and a
//! non-finite loss or logit reported the same way everywhere, naming its likely cause.

use std::collections::HashMap;
use std::path::Path;

use candle_core::Tensor;
use whet_model::{Config, GenerationConfig, Model, Trainable};

use crate::common::*;
use crate::model::spread_model;

/// The tiny config's JSON with `key` set to `value` (raw JSON).
fn tiny_json_with(key: &str, value: &str) -> String {
    let mut v = serde_json::to_value(tiny_config("llama")).unwrap();
    v[key] = serde_json::from_str(value).unwrap();
    v.to_string()
}

/// The error text of parsing the tiny config with `key` = `value`; panics if it parses.
fn config_error(key: &str, value: &str) -> String {
    let json = tiny_json_with(key, value);
    match Config::from_json_str(&json, Path::new("/models/x/config.json")) {
        Ok(_) => panic!("{key} = {value} was accepted"),
        Err(e) => e.to_string(),
    }
}

#[test]
fn out_of_range_config_values_name_the_file_and_the_field() {
    for (key, value) in [
        ("rope_theta", "0.0"),
        ("rope_theta", "-10000.0"),
        ("rope_theta", "1e300"),
        ("rms_norm_eps", "-1e-5"),
        ("rms_norm_eps", "0.0"),
        ("rms_norm_eps", "2.0"),
        ("max_position_embeddings", "0"),
        ("vocab_size", "1000000000000"),
        ("hidden_size", "1000000000000"),
        ("intermediate_size", "1000000000000"),
        ("num_hidden_layers", "100000000"),
        ("num_attention_heads", "100000000"),
        ("max_position_embeddings", "1000000000000"),
    ] {
        let msg = config_error(key, value);
        assert!(
            msg.contains("/models/x/config.json") && msg.contains(&format!("`{key}`")),
            "{key} = {value}: {msg}"
        );
    }
    // transformers >= 5 spelling.
    let mut v = serde_json::to_value(tiny_config("llama")).unwrap();
    v["rope_parameters"] = serde_json::json!({"rope_type": "default", "rope_theta": -1.0});
    let msg = Config::from_json_str(&v.to_string(), Path::new("c/config.json"))
        .unwrap_err()
        .to_string();
    assert!(msg.contains("rope_parameters.rope_theta"), "{msg}");
}

#[test]
fn a_head_dim_whose_shapes_overflow_is_an_error_not_a_panic() {
    // 2^61: `heads * head_dim` overflows usize and the rotary table would be 2^60 floats.
    for head_dim in ["2305843009213693952", "1048576"] {
        let json = tiny_json_with("head_dim", head_dim);
        let msg = std::panic::catch_unwind(|| {
            Config::from_json_str(&json, Path::new("/models/x/config.json")).map(|c| {
                // What the old code did with the config: build the rotary frequencies.
                let _ = Model::random(&c, 0, &cpu());
            })
        })
        .unwrap_or_else(|_| panic!("head_dim = {head_dim} panicked"))
        .expect_err("an absurd head_dim must be refused")
        .to_string();
        assert!(
            msg.contains("config.json") && msg.contains("head_dim"),
            "{msg}"
        );
    }
}

#[test]
fn a_llama3_rope_with_non_positive_factors_is_refused() {
    let mut v = serde_json::to_value(tiny_config("llama")).unwrap();
    v["rope_scaling"] = serde_json::json!({
        "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 0.0,
        "high_freq_factor": 4.0, "original_max_position_embeddings": 8192
    });
    let msg = Config::from_json_str(&v.to_string(), Path::new("c/config.json"))
        .unwrap_err()
        .to_string();
    assert!(msg.contains("rope_scaling") && msg.contains("low"), "{msg}");
}

/// A saved tiny model whose weights are split over two shards named by an index.
fn sharded(tag: &str) -> (TempDir, Vec<String>) {
    let cfg = tiny_config("llama");
    let model = spread_model(&cfg, 5, Trainable::None);
    let dir = TempDir::new(tag);
    model.save_pretrained(dir.path()).unwrap();
    std::fs::remove_file(dir.path().join("model.safetensors")).unwrap();
    let weights: HashMap<String, Tensor> = model.named_weights().unwrap().into_iter().collect();
    let mut names: Vec<String> = weights.keys().cloned().collect();
    names.sort();
    let (a, b) = names.split_at(names.len() / 2);
    for (file, part) in [("a.safetensors", a), ("b.safetensors", b)] {
        let shard: HashMap<String, Tensor> = part
            .iter()
            .map(|n| (n.clone(), weights[n].clone()))
            .collect();
        candle_core::safetensors::save(&shard, dir.path().join(file)).unwrap();
    }
    (dir, names)
}

fn write_index(dir: &Path, names: &[String], second: &str) {
    let half = names.len() / 2;
    let map: serde_json::Map<String, serde_json::Value> = names
        .iter()
        .enumerate()
        .map(|(i, n)| {
            let file = if i < half { "a.safetensors" } else { second };
            (n.clone(), file.into())
        })
        .collect();
    std::fs::write(
        dir.join("model.safetensors.index.json"),
        serde_json::json!({ "weight_map": map }).to_string(),
    )
    .unwrap();
}

#[test]
fn shard_paths_outside_the_model_folder_are_refused() {
    let (dir, names) = sharded("shards-outside");
    write_index(dir.path(), &names, "b.safetensors");
    Model::load(dir.path(), Trainable::None, &cpu()).expect("the honest index loads");

    // The same shard reached from outside: by `..`, by an absolute path, through a symlink.
    let outside = TempDir::new("shards-elsewhere");
    std::fs::rename(
        dir.path().join("b.safetensors"),
        outside.path().join("b.safetensors"),
    )
    .unwrap();
    let abs = outside.path().join("b.safetensors");
    let up = format!(
        "../{}/b.safetensors",
        outside.path().file_name().unwrap().to_str().unwrap()
    );
    std::os::unix::fs::symlink(&abs, dir.path().join("link.safetensors")).unwrap();
    for entry in [up.as_str(), abs.to_str().unwrap(), "link.safetensors"] {
        write_index(dir.path(), &names, entry);
        let msg = match Model::load(dir.path(), Trainable::None, &cpu()) {
            Ok(_) => panic!("the shard {entry:?} outside the folder was read"),
            Err(e) => e.to_string(),
        };
        assert!(
            msg.contains("model.safetensors.index.json")
                && msg.contains(entry)
                && msg.contains(&names[names.len() / 2])
                && msg.contains("outside"),
            "{entry}: {msg}"
        );
    }
}

#[test]
fn nan_weights_are_named_at_load() {
    let cfg = tiny_config("llama");
    let model = spread_model(&cfg, 9, Trainable::None);
    let dir = TempDir::new("nan-weights");
    model.save_pretrained(dir.path()).unwrap();
    let mut weights: HashMap<String, Tensor> = model.named_weights().unwrap().into_iter().collect();
    let name = "model.layers.1.mlp.down_proj.weight";
    let w = weights[name]
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap();
    let mut bad = w.clone();
    bad[7] = f32::NAN;
    let shape = weights[name].dims().to_vec();
    weights.insert(
        name.to_string(),
        Tensor::from_vec(bad, shape.as_slice(), &cpu()).unwrap(),
    );
    candle_core::safetensors::save(&weights, dir.path().join("model.safetensors")).unwrap();
    let msg = match Model::load(dir.path(), Trainable::None, &cpu()) {
        Ok(_) => panic!("NaN weights loaded"),
        Err(e) => e.to_string(),
    };
    assert!(
        msg.contains(name) && msg.contains("model.safetensors") && msg.contains("NaN"),
        "{msg}"
    );
}

/// The tiny model with `name` replaced by `value` everywhere (built in memory: not checked
/// at load, as a model changed by training would not be).
fn model_with(name: &str, value: f32) -> Model {
    let cfg = tiny_config("llama");
    let model = spread_model(&cfg, 9, Trainable::None);
    let mut weights: HashMap<String, Tensor> = model.named_weights().unwrap().into_iter().collect();
    let t = &weights[name];
    let filled = (t.ones_like().unwrap() * value as f64).unwrap();
    weights.insert(name.to_string(), filled);
    Model::from_tensors(&cfg, weights, Trainable::None, &cpu()).unwrap()
}

#[test]
fn non_finite_loss_and_logits_are_errors_naming_the_cause() {
    let b = packed_batch(64, 3);
    // A NaN weight: loss, logits and generation all name it.
    let name = "model.layers.0.self_attn.v_proj.weight";
    let m = model_with(name, f32::NAN);
    let (loss, _) = m
        .loss(&b.ids, &b.positions, &b.segments, &b.targets)
        .unwrap();
    let value = loss.to_scalar::<f32>().unwrap();
    let msg = m.ensure_finite("the loss", value).unwrap_err().to_string();
    assert!(msg.contains("NaN") && msg.contains(name), "{msg}");
    let msg = match whet_model::generate(&m, &[1, 5, 9], &GenerationConfig::greedy(4)) {
        Ok(ids) => panic!("NaN logits generated {ids:?}"),
        Err(e) => e.to_string(),
    };
    assert!(msg.contains("logit") && msg.contains(name), "{msg}");

    // Finite weights of extreme scale: the arithmetic overflows; the cause says so.
    let m = model_with("model.norm.weight", 3e38);
    let msg = match whet_model::generate(&m, &[1, 5, 9], &GenerationConfig::greedy(4)) {
        Ok(ids) => panic!("overflowing logits generated {ids:?}"),
        Err(e) => e.to_string(),
    };
    assert!(
        msg.contains("weights are finite") && msg.contains("rope_theta"),
        "{msg}"
    );
    // A finite value passes.
    m.ensure_finite("the loss", 1.5).unwrap();
}

#[test]
fn a_lora_rank_above_the_layer_size_is_refused_before_allocating() {
    let cfg = tiny_config("llama");
    let mut model = Model::random(&cfg, 1, &cpu()).unwrap();
    // usize::MAX / 4: `r * in` overflows; the old code aborted on allocation.
    let lora = whet_model::LoraConfig::new(usize::MAX / 4, 8.0);
    let msg = model.apply_lora(&lora, 0).unwrap_err().to_string();
    assert!(msg.contains("r = ") && msg.contains("min("), "{msg}");
    // Exactly min(in, out) of the smallest layer (k_proj: 16 x 32) is fine.
    model
        .apply_lora(&whet_model::LoraConfig::new(16, 8.0), 0)
        .unwrap();
}
