//! Loading Hugging Face folders: single file, shards, bf16/f16, and broken folders. Each
//! broken folder is written to a temp dir here; every error must name the file and the
//! tensor or field.

use std::collections::HashMap;
use std::path::Path;

use candle_core::{DType, Tensor};
use whet_model::{Config, Error, Model, Trainable};

use crate::common::*;
use crate::model::spread_model;

fn logits(m: &Model) -> Tensor {
    let b = packed_batch(m.config().vocab_size as u32, 3);
    m.logits(&b.ids, &b.positions, &b.segments).unwrap()
}

fn write_config(dir: &Path, cfg: &Config) {
    std::fs::write(
        dir.join("config.json"),
        serde_json::to_string_pretty(cfg).unwrap(),
    )
    .unwrap();
}

fn save(dir: &Path, tensors: &HashMap<String, Tensor>) {
    candle_core::safetensors::save(tensors, dir.join("model.safetensors")).unwrap();
}

/// A saved tiny model: (folder, the model, its weights by HF name).
fn saved(tag: &str) -> (TempDir, Model, HashMap<String, Tensor>) {
    let cfg = tiny_config("qwen2");
    let model = spread_model(&cfg, 21, Trainable::None);
    let dir = TempDir::new(tag);
    model.save_pretrained(dir.path()).unwrap();
    let weights = model.named_weights().unwrap().into_iter().collect();
    (dir, model, weights)
}

#[test]
fn save_and_load_round_trip() {
    let (dir, model, _) = saved("roundtrip");
    let loaded = Model::load(dir.path(), Trainable::None, &cpu()).unwrap();
    assert_eq!(loaded.config(), model.config());
    assert_eq!(max_abs_diff(&logits(&loaded), &logits(&model)), 0.0);
    let full = Model::load(dir.path(), Trainable::Full, &cpu()).unwrap();
    assert_eq!(full.trainable().len(), model.named_weights().unwrap().len());
}

#[test]
fn sharded_checkpoints_load() {
    let (dir, model, weights) = saved("sharded");
    std::fs::remove_file(dir.path().join("model.safetensors")).unwrap();
    let mut names: Vec<&String> = weights.keys().collect();
    names.sort();
    let (a, b) = names.split_at(names.len() / 2);
    let mut weight_map = serde_json::Map::new();
    for (file, part) in [
        ("model-00001-of-00002.safetensors", a),
        ("model-00002-of-00002.safetensors", b),
    ] {
        let shard: HashMap<String, Tensor> = part
            .iter()
            .map(|n| ((*n).clone(), weights[*n].clone()))
            .collect();
        candle_core::safetensors::save(&shard, dir.path().join(file)).unwrap();
        for n in part {
            weight_map.insert((*n).clone(), file.into());
        }
    }
    let index = serde_json::json!({"metadata": {"total_size": 0}, "weight_map": weight_map});
    std::fs::write(
        dir.path().join("model.safetensors.index.json"),
        index.to_string(),
    )
    .unwrap();
    let loaded = Model::load(dir.path(), Trainable::None, &cpu()).unwrap();
    assert_eq!(max_abs_diff(&logits(&loaded), &logits(&model)), 0.0);

    // A shard the index names but the folder lacks.
    std::fs::remove_file(dir.path().join("model-00002-of-00002.safetensors")).unwrap();
    let e = Model::load(dir.path(), Trainable::None, &cpu()).unwrap_err();
    assert!(matches!(e, Error::MissingFile { .. }), "{e}");
    assert!(
        e.to_string().contains("model-00002-of-00002.safetensors"),
        "{e}"
    );
}

#[test]
fn half_precision_weights_become_f32() {
    for dtype in [DType::BF16, DType::F16] {
        let (dir, _, weights) = saved("half");
        let half: HashMap<String, Tensor> = weights
            .iter()
            .map(|(n, t)| (n.clone(), t.to_dtype(dtype).unwrap()))
            .collect();
        save(dir.path(), &half);
        let loaded = Model::load(dir.path(), Trainable::None, &cpu()).unwrap();
        for (name, t) in loaded.named_weights().unwrap() {
            assert_eq!(t.dtype(), DType::F32, "{name}");
            let want = half[&name].to_dtype(DType::F32).unwrap();
            assert_eq!(max_abs_diff(&t, &want), 0.0, "{name} ({dtype:?})");
        }
    }
}

#[test]
fn missing_files_are_named() {
    let (dir, _, _) = saved("missing");
    std::fs::remove_file(dir.path().join("model.safetensors")).unwrap();
    let e = Model::load(dir.path(), Trainable::None, &cpu()).unwrap_err();
    assert!(matches!(e, Error::MissingFile { .. }), "{e}");
    assert!(e.to_string().contains("model.safetensors"), "{e}");
    std::fs::remove_file(dir.path().join("config.json")).unwrap();
    let e = Model::load(dir.path(), Trainable::None, &cpu()).unwrap_err();
    assert!(e.to_string().contains("config.json"), "{e}");
}

#[test]
fn unsupported_model_type_names_the_file() {
    let (dir, model, _) = saved("modeltype");
    let mut cfg = model.config().clone();
    cfg.model_type = "gemma".into();
    write_config(dir.path(), &cfg);
    let e = Model::load(dir.path(), Trainable::None, &cpu()).unwrap_err();
    let msg = e.to_string();
    assert!(matches!(e, Error::UnsupportedModelType { .. }), "{msg}");
    assert!(
        msg.contains(&dir.path().join("config.json").display().to_string()),
        "{msg}"
    );
    assert!(msg.contains("gemma") && msg.contains("qwen2"), "{msg}");
}

#[test]
fn config_field_of_wrong_type_names_file_and_field() {
    let (dir, _, _) = saved("fieldtype");
    let path = dir.path().join("config.json");
    let text = std::fs::read_to_string(&path).unwrap();
    let text = text.replace("\"num_hidden_layers\": 2", "\"num_hidden_layers\": [2]");
    std::fs::write(&path, text).unwrap();
    let e = Model::load(dir.path(), Trainable::None, &cpu()).unwrap_err();
    let msg = e.to_string();
    assert!(
        matches!(&e, Error::ConfigField { field, .. } if field == "num_hidden_layers"),
        "{msg}"
    );
    assert!(msg.contains(&path.display().to_string()), "{msg}");
}

#[test]
fn missing_tensor_names_tensor_and_file() {
    let (dir, _, mut weights) = saved("missingtensor");
    weights.remove("model.layers.1.mlp.up_proj.weight");
    save(dir.path(), &weights);
    let e = Model::load(dir.path(), Trainable::None, &cpu()).unwrap_err();
    let msg = e.to_string();
    assert!(matches!(e, Error::MissingTensor { .. }), "{msg}");
    assert!(msg.contains("model.layers.1.mlp.up_proj.weight"), "{msg}");
    assert!(
        msg.contains(&dir.path().join("model.safetensors").display().to_string()),
        "{msg}"
    );
}

#[test]
fn mis_shaped_tensor_names_tensor_shapes_and_file() {
    let (dir, _, mut weights) = saved("shape");
    let name = "model.layers.0.self_attn.k_proj.weight";
    weights.insert(
        name.into(),
        Tensor::zeros((16, 31), DType::F32, &cpu()).unwrap(),
    );
    save(dir.path(), &weights);
    let e = Model::load(dir.path(), Trainable::None, &cpu()).unwrap_err();
    let msg = e.to_string();
    match &e {
        Error::ShapeMismatch {
            tensor,
            expected,
            found,
            path,
        } => {
            assert_eq!(tensor, name);
            assert_eq!(expected, &[16, 32]);
            assert_eq!(found, &[16, 31]);
            assert!(path.ends_with("model.safetensors"));
        }
        _ => panic!("expected a shape mismatch, got {msg}"),
    }
    assert!(
        msg.contains(name) && msg.contains("[16, 31]") && msg.contains("[16, 32]"),
        "{msg}"
    );
}

#[test]
fn truncated_safetensors_names_the_file() {
    let (dir, _, _) = saved("truncated");
    let path = dir.path().join("model.safetensors");
    let bytes = std::fs::read(&path).unwrap();
    for keep in [bytes.len() - 100, 200, 4] {
        std::fs::write(&path, &bytes[..keep]).unwrap();
        let e = Model::load(dir.path(), Trainable::None, &cpu()).unwrap_err();
        let msg = e.to_string();
        assert!(
            matches!(e, Error::Safetensors { .. }),
            "{keep} bytes: {msg}"
        );
        assert!(msg.contains(&path.display().to_string()), "{msg}");
        eprintln!("truncated to {keep} bytes: {msg}");
    }
}

#[test]
fn integer_weights_are_refused() {
    let (dir, _, mut weights) = saved("dtype");
    let name = "model.norm.weight";
    weights.insert(name.into(), Tensor::zeros(32, DType::I64, &cpu()).unwrap());
    save(dir.path(), &weights);
    let e = Model::load(dir.path(), Trainable::None, &cpu()).unwrap_err();
    assert!(matches!(e, Error::UnsupportedDtype { .. }), "{e}");
    assert!(e.to_string().contains(name), "{e}");
}
