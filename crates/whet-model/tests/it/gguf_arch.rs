//! GGUF files of the qwen2, qwen3 and gemma3 architectures read as transformers' GGUF loader
//! reads them: the tiny files of `fixtures/gguf/` hold the golden tiny models in llama.cpp's
//! layout (`fixtures/gen/make_gguf_arch_refs.py`), and the real Gemma 3 270M Q4_K_M, when the
//! cache has it, against transformers' logits on the same file.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use whet_model::gguf::{GgufArch, GgufFile};
use whet_model::{Config, LayerAttention, Model, ModelType, Trainable};

use crate::common::*;

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fixtures")
}

/// The file's tensors as HF-named candle tensors, and its config.
fn read(path: &Path) -> (Config, HashMap<String, Tensor>) {
    let f = GgufFile::open(path).unwrap();
    let cfg = f.config().unwrap();
    let tensors = f
        .hf_tensors()
        .unwrap()
        .into_iter()
        .map(|t| {
            let v = Tensor::from_vec(t.data, t.shape, &Device::Cpu).unwrap();
            (t.name, v)
        })
        .collect();
    (cfg, tensors)
}

fn golden(name: &str) -> (HashMap<String, Tensor>, HashMap<String, Tensor>) {
    let dir = fixtures().join("golden").join(name);
    let load = |f: &str| candle_core::safetensors::load(dir.join(f), &Device::Cpu).unwrap();
    (load("model.safetensors"), load("golden.safetensors"))
}

/// Logits of the golden batch (packed rows, per-document positions and segments).
fn batch_logits(model: &Model, g: &HashMap<String, Tensor>) -> Tensor {
    let u32_of = |k: &str| g[k].to_dtype(DType::U32).unwrap();
    model
        .logits(
            &u32_of("input_ids"),
            &u32_of("position_ids"),
            &u32_of("segment_ids"),
        )
        .unwrap()
}

/// llama.cpp's phi3 layout of the golden Phi-3 models: fused `attn_qkv`, gate + up in one
/// `ffn_up`, the window and the original context as keys, LongRoPE as two factor tensors and
/// Phi-4-mini's partial rotary as `rope.dimension_count`. whet's import must be the golden
/// model itself, window, partial rotary and LongRoPE included (transformers' GGUF loader drops
/// them; `make_gguf_arch_refs.py` checks it agrees where it reads the file whole).
#[test]
fn phi3_ggufs_are_the_golden_models() {
    for (file, name) in [("tiny_phi3", "phi3_tiny"), ("tiny_phi4", "phi4_tiny")] {
        let path = fixtures().join("gguf").join(format!("{file}.gguf"));
        assert_eq!(
            GgufFile::open(&path).unwrap().arch().unwrap(),
            GgufArch::Phi3
        );
        let (cfg, tensors) = read(&path);
        let (weights, g) = golden(name);
        let hf = whet_model::Config::from_file(
            &fixtures().join("golden").join(name).join("config.json"),
        )
        .unwrap();
        assert_eq!(cfg.model_type(), ModelType::Phi3);
        assert_eq!(
            (
                cfg.rotary_dim(),
                cfg.layer_window(0),
                cfg.tie_word_embeddings
            ),
            (hf.rotary_dim(), hf.layer_window(0), hf.tie_word_embeddings),
            "{file}"
        );
        assert_eq!(
            cfg.inv_freq(),
            hf.inv_freq(),
            "{file}: short (or plain) frequencies"
        );
        assert_eq!(
            cfg.inv_freq_long(),
            hf.inv_freq_long(),
            "{file}: long frequencies"
        );
        assert!(
            (cfg.rope_attention_factor() - hf.rope_attention_factor()).abs() < 1e-12,
            "{file}"
        );
        let mut names: Vec<_> = tensors.keys().collect();
        let mut want: Vec<_> = weights.keys().collect();
        names.sort();
        want.sort();
        assert_eq!(names, want, "{file}: tensor names");
        for (k, t) in &tensors {
            assert_eq!(max_abs_diff(t, &weights[k]), 0.0, "{file}: {k}");
        }
        let model = Model::from_tensors(&cfg, tensors, Trainable::None, &cpu()).unwrap();
        let d = max_abs_diff(&batch_logits(&model, &g), &g["logits"]);
        eprintln!("{file}.gguf: logits vs golden max |diff| {d:.2e}");
        assert!(d < 1e-4, "{file}: {d}");
    }
}

#[test]
fn qwen2_and_qwen3_ggufs_are_the_golden_models() {
    for (arch, name) in [(GgufArch::Qwen2, "qwen2"), (GgufArch::Qwen3, "qwen3")] {
        let path = fixtures().join("gguf").join(format!("tiny_{name}.gguf"));
        assert_eq!(GgufFile::open(&path).unwrap().arch().unwrap(), arch);
        let (cfg, tensors) = read(&path);
        let (weights, g) = golden(&format!("{name}_tiny"));
        assert_eq!(cfg.model_type, name);
        assert_eq!((cfg.head_dim(), cfg.num_kv_heads()), (16, 2));
        assert_eq!(cfg.qk_norm(), arch == GgufArch::Qwen3);
        assert_eq!(cfg.qkv_bias(), arch == GgufArch::Qwen2);
        // F32 in the file, no permutation for these architectures: the same numbers.
        let mut names: Vec<_> = tensors.keys().collect();
        let mut want: Vec<_> = weights.keys().collect();
        names.sort();
        want.sort();
        assert_eq!(names, want, "{name}: tensor names");
        for (k, t) in &tensors {
            assert_eq!(max_abs_diff(t, &weights[k]), 0.0, "{name}: {k}");
        }
        let model = Model::from_tensors(&cfg, tensors, Trainable::None, &cpu()).unwrap();
        let d = max_abs_diff(&batch_logits(&model, &g), &g["logits"]);
        eprintln!("tiny_{name}.gguf: logits vs golden max |diff| {d:.2e}");
        assert!(d < 1e-4, "{name}: {d}");
    }
}

#[test]
fn gemma3_gguf_reads_as_transformers_reads_it() {
    let path = fixtures().join("gguf/tiny_gemma3.gguf");
    let (cfg, tensors) = read(&path);
    let (weights, _) = golden("gemma3_tiny");
    assert_eq!(cfg.model_type(), ModelType::Gemma3);
    assert!(cfg.tie_word_embeddings && cfg.is_gemma());
    // What the file does not say takes Gemma3TextConfig's defaults, as in transformers.
    assert_eq!(
        cfg.attention_scale(),
        1.0 / 16.0,
        "query_pre_attn_scalar 256"
    );
    assert_eq!(
        (cfg.layer_window(0), cfg.layer_window(1)),
        (Some(6), Some(6))
    );
    assert_eq!(cfg.rope_base_for(LayerAttention::Full), 1e6);
    assert_eq!(cfg.rope_base_for(LayerAttention::Sliding), 1e4);
    // Norm weights come back from llama.cpp's `w + 1`; everything else is exact.
    for (k, t) in &tensors {
        let d = max_abs_diff(t, &weights[k]);
        let tol = if k.ends_with("norm.weight") {
            1e-7
        } else {
            0.0
        };
        assert!(d <= tol, "{k}: {d}");
    }
    assert_eq!(tensors.len(), weights.len());
    let model = Model::from_tensors(&cfg, tensors, Trainable::None, &cpu()).unwrap();
    let want = candle_core::safetensors::load(
        fixtures().join("gguf/tiny_gemma3_logits.safetensors"),
        &Device::Cpu,
    )
    .unwrap();
    let d = max_abs_diff(&batch_logits(&model, &want), &want["logits"]);
    eprintln!("tiny_gemma3.gguf: logits vs transformers' GGUF loader max |diff| {d:.2e}");
    assert!(d < 1e-4, "{d}");
}

// ---------------------------------------------------------------------------------------------
// The real Gemma 3 270M (Q4_K_M), when present.

const GEMMA_FILE: &str = "gemma-3-270m-q4_k_m.gguf";

fn gemma_path() -> PathBuf {
    cached_model("gemma3-270m", GEMMA_FILE)
}

#[test]
fn gemma3_270m_gguf_matches_transformers() {
    let path = gemma_path();
    if !path.exists() {
        eprintln!(
            "SKIP gemma3_270m_gguf_matches_transformers: {} is absent (`cargo xtask fetch-model gemma3-270m` puts it there); the tiny gemma3 GGUF covers the reader",
            path.display()
        );
        return;
    }
    let refs: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(fixtures().join("gguf/gemma3_270m_logits.json")).unwrap(),
    )
    .unwrap();
    let (cfg, tensors) = read(&path);
    assert_eq!(
        (
            cfg.num_hidden_layers,
            cfg.hidden_size,
            cfg.vocab_size,
            cfg.head_dim()
        ),
        (18, 640, 262144, 256)
    );
    let global: Vec<usize> = (0..18).filter(|&i| cfg.layer_window(i).is_none()).collect();
    assert_eq!(global, [5, 11, 17]);
    assert_eq!(cfg.layer_window(0), Some(512));
    let model = Model::from_tensors(&cfg, tensors, Trainable::None, &cpu()).unwrap();
    let mut worst = 0f32;
    for prompt in refs["prompts"].as_array().unwrap() {
        let ids: Vec<u32> = prompt["ids"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_u64().unwrap() as u32)
            .collect();
        let t = ids.len();
        let ids = Tensor::new(ids.as_slice(), &cpu())
            .unwrap()
            .unsqueeze(0)
            .unwrap();
        let positions = Tensor::arange(0u32, t as u32, &cpu())
            .unwrap()
            .unsqueeze(0)
            .unwrap();
        let segments = Tensor::zeros((1, t), DType::U32, &cpu()).unwrap();
        let logits = model
            .logits(&ids, &positions, &segments)
            .unwrap()
            .squeeze(0)
            .unwrap();
        let rows: Vec<Vec<f32>> = logits.to_vec2().unwrap();
        for (pos, top) in prompt["top"].as_array().unwrap().iter().enumerate() {
            let want_ids: Vec<usize> = top["ids"]
                .as_array()
                .unwrap()
                .iter()
                .map(|v| v.as_u64().unwrap() as usize)
                .collect();
            let row = &rows[pos];
            for (&i, v) in want_ids.iter().zip(top["values"].as_array().unwrap()) {
                worst = worst.max((row[i] - v.as_f64().unwrap() as f32).abs());
            }
            let argmax = row
                .iter()
                .enumerate()
                .fold(0, |b, (i, &x)| if x > row[b] { i } else { b });
            assert_eq!(argmax, want_ids[0], "argmax at position {pos}");
        }
    }
    eprintln!("Gemma 3 270M Q4_K_M: top-10 logits max |diff| {worst:.2e} vs transformers");
    assert!(
        worst < 2e-3,
        "Gemma 3 270M logits differ from transformers' by {worst}"
    );
}
