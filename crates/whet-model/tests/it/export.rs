//! GGUF export: a tiny GGUF fixture is imported, exported in each type, and imported again.
//! The model and tokenizer must survive: same config, same vocabulary, merges, special ids and
//! chat template, logits equal within the type's quantization error.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::Tensor;
use candle_core::quantized::{GgmlDType, QTensor};
use serde_json::Value;
use whet_data::atomic::Existing;
use whet_model::export::{export_gguf, tensor_type, tokenizer_metadata};
use whet_model::gguf::{GgufArch, GgufFile, convert_gguf_to_hf};
use whet_model::{Config, Error, LayerAttention, LoraConfig, Model, Trainable};

use crate::common::*;

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../fixtures/gguf")
        .join(name)
}

fn golden_dir(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../fixtures/golden")
        .join(name)
}

fn json(path: &Path) -> Value {
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

fn all_logits(model: &Model) -> candle_core::Tensor {
    let b = packed_batch(model.config().vocab_size as u32, 5);
    model.logits(&b.ids, &b.positions, &b.segments).unwrap()
}

/// Max |a - b| relative to max |b|.
fn rel(a: &candle_core::Tensor, b: &candle_core::Tensor) -> f32 {
    rel_err(a, b)
}

#[test]
fn every_type_round_trips_model_and_tokenizer() {
    for file in ["tiny_llama_q8.gguf", "tiny_llama_bpe.gguf"] {
        let src = TempDir::new("export-src");
        convert_gguf_to_hf(&fixture(file), src.path()).unwrap();
        let model = Model::load(src.path(), Trainable::None, &cpu()).unwrap();
        let want = all_logits(&model);
        // Relative logit error allowed per type. A tiny random model amplifies weight error
        // (4-bit blocks move its logits by 30-70%), so 4-bit types are checked tensor by
        // tensor instead: each reloaded weight must equal whet's own quantize + dequantize.
        for (ty, tol, matrix_types) in [
            (GgmlDType::F16, 5e-3, &["f16"][..]),
            (GgmlDType::Q8_0, 0.1, &["q8_0"][..]),
            // The output projection (rows of 64, not a multiple of 256): Q8_0, not Q6_K.
            (GgmlDType::Q4_0, f32::INFINITY, &["q4_0", "q8_0"][..]),
            // hidden 64 and ffn 96 are not multiples of 256: llama.cpp's fallback, Q5_0.
            (GgmlDType::Q4K, f32::INFINITY, &["q5_0", "q8_0"][..]),
        ] {
            let out = src.path().join(format!("out-{ty:?}.gguf"));
            let report =
                export_gguf(&model, src.path(), &out, ty, "tiny", Existing::Replace).unwrap();
            let keys: Vec<&str> = report.types.keys().map(String::as_str).collect();
            let mut expect: Vec<&str> = matrix_types.to_vec();
            expect.push("f32");
            expect.sort();
            assert_eq!(keys, expect, "{file} {ty:?}: {:?}", report.types);

            let f = GgufFile::open(&out).unwrap();
            assert_eq!(f.architecture().unwrap(), "llama");
            let back = TempDir::new("export-back");
            convert_gguf_to_hf(&out, back.path()).unwrap();
            let reloaded = Model::load(back.path(), Trainable::None, &cpu()).unwrap();
            assert_eq!(reloaded.config(), model.config(), "{file} {ty:?}: config");
            let e = rel(&all_logits(&reloaded), &want);
            eprintln!("{file} {ty:?}: relative logit error {e:.2e}");
            assert!(e < tol, "{file} {ty:?}: relative logit error {e} >= {tol}");
            let original: std::collections::HashMap<_, _> =
                model.named_weights().unwrap().into_iter().collect();
            let tied = model.config().tie_word_embeddings;
            for (name, got) in reloaded.named_weights().unwrap() {
                let w = &original[&name];
                let expected = if w.rank() == 1 {
                    w.clone()
                } else {
                    let cols = w.dims2().unwrap().1;
                    let output =
                        name == "lm_head.weight" || (tied && name == "model.embed_tokens.weight");
                    let t = tensor_type(ty, cols, output);
                    QTensor::quantize(w, t).unwrap().dequantize(&cpu()).unwrap()
                };
                assert_eq!(
                    max_abs_diff(&got, &expected),
                    0.0,
                    "{file} {ty:?}: {name} is not its quantized self"
                );
            }

            let (t0, t1) = (
                json(&src.path().join("tokenizer.json")),
                json(&back.path().join("tokenizer.json")),
            );
            assert_eq!(
                t0, t1,
                "{file} {ty:?}: tokenizer.json differs after a round trip"
            );
            let (c0, c1) = (
                json(&src.path().join("tokenizer_config.json")),
                json(&back.path().join("tokenizer_config.json")),
            );
            assert_eq!(c0, c1, "{file} {ty:?}: tokenizer_config.json differs");
        }
    }
}

#[test]
fn an_unmerged_adapter_or_a_bad_tokenizer_is_an_error_and_keeps_the_old_file() {
    let src = TempDir::new("export-err");
    convert_gguf_to_hf(&fixture("tiny_llama_q8.gguf"), src.path()).unwrap();
    let out = src.path().join("keep.gguf");
    std::fs::write(&out, b"an earlier export").unwrap();

    let lora = Trainable::Lora {
        config: LoraConfig::new(2, 4.0),
        seed: 1,
    };
    let with_adapter = Model::load(src.path(), lora, &cpu()).unwrap();
    let err = export_gguf(
        &with_adapter,
        src.path(),
        &out,
        GgmlDType::Q8_0,
        "x",
        Existing::Replace,
    )
    .unwrap_err();
    assert!(err.to_string().contains("merge"), "{err}");

    let model = Model::load(src.path(), Trainable::None, &cpu()).unwrap();
    let tok = src.path().join("tokenizer.json");
    let mut t = json(&tok);
    t["model"]["type"] = Value::String("Unigram".into());
    std::fs::write(&tok, serde_json::to_string(&t).unwrap()).unwrap();
    let err = export_gguf(
        &model,
        src.path(),
        &out,
        GgmlDType::Q8_0,
        "x",
        Existing::Replace,
    )
    .unwrap_err();
    assert!(matches!(err, Error::Quantize { .. }), "{err}");
    assert!(
        err.to_string().contains("tokenizer.json") && err.to_string().contains("model.type"),
        "{err}"
    );
    assert_eq!(std::fs::read(&out).unwrap(), b"an earlier export");
    let leftovers: Vec<_> = std::fs::read_dir(src.path())
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            name.ends_with(".partial") || name.ends_with(".tmp")
        })
        .collect();
    assert!(leftovers.is_empty(), "a partial file was left behind");

    // Told to keep an existing file: refused before any work.
    let err = export_gguf(
        &model,
        src.path(),
        &out,
        GgmlDType::Q8_0,
        "x",
        Existing::Refuse,
    )
    .unwrap_err();
    assert!(
        matches!(
            err,
            Error::Write(whet_data::atomic::WriteError::Exists { .. })
        ),
        "{err}"
    );
    assert_eq!(std::fs::read(&out).unwrap(), b"an earlier export");
}

/// Qwen2 (q/k/v biases) and Qwen3 (q/k norms) leave as their own GGUF architectures, unpermuted,
/// and come back as the same model.
#[test]
fn qwen_models_round_trip_as_their_architectures() {
    for (file, arch) in [("tiny_qwen2.gguf", "qwen2"), ("tiny_qwen3.gguf", "qwen3")] {
        let src = TempDir::new("export-qwen-src");
        convert_gguf_to_hf(&fixture(file), src.path()).unwrap();
        let model = Model::load(src.path(), Trainable::None, &cpu()).unwrap();
        let want = all_logits(&model);
        for (ty, tol) in [(GgmlDType::F32, 1e-6), (GgmlDType::Q8_0, 0.1)] {
            let out = src.path().join(format!("out-{ty:?}.gguf"));
            export_gguf(&model, src.path(), &out, ty, "tiny", Existing::Replace).unwrap();
            let f = GgufFile::open(&out).unwrap();
            assert_eq!(f.architecture().unwrap(), arch);
            let names: Vec<&str> = f.tensors().iter().map(|t| t.name.as_str()).collect();
            let own = if arch == "qwen2" {
                "blk.0.attn_q.bias"
            } else {
                "blk.0.attn_q_norm.weight"
            };
            assert!(names.contains(&own), "{arch}: {names:?}");
            let back = TempDir::new("export-qwen-back");
            convert_gguf_to_hf(&out, back.path()).unwrap();
            let reloaded = Model::load(back.path(), Trainable::None, &cpu()).unwrap();
            assert_eq!(reloaded.config().model_type, arch);
            let e = rel(&all_logits(&reloaded), &want);
            eprintln!("{file} {ty:?}: relative logit error {e:.2e}");
            assert!(e < tol, "{file} {ty:?}: {e}");
        }
    }
}

/// Phi-3 leaves as llama.cpp's `phi3` layout (fused `attn_qkv`, gate + up in `ffn_up`, the
/// window, the rotated dimensions, LongRoPE's original context, attention factor and factor
/// tensors) and comes back as the same model: the window of phi3_tiny and the partial rotary
/// and LongRoPE (short and long factors) of phi4_tiny included.
#[test]
fn phi3_models_round_trip_as_phi3_ggufs() {
    for file in ["tiny_phi3.gguf", "tiny_phi4.gguf"] {
        let src = TempDir::new("export-phi3-src");
        convert_gguf_to_hf(&fixture(file), src.path()).unwrap();
        let model = Model::load(src.path(), Trainable::None, &cpu()).unwrap();
        let cfg = model.config().clone();
        let want = all_logits(&model);
        for (ty, tol) in [(GgmlDType::F32, 1e-6), (GgmlDType::Q8_0, 0.1)] {
            let out = src.path().join(format!("out-{ty:?}.gguf"));
            export_gguf(&model, src.path(), &out, ty, "tiny", Existing::Replace).unwrap();
            let f = GgufFile::open(&out).unwrap();
            assert_eq!(f.architecture().unwrap(), "phi3");
            let names: Vec<&str> = f.tensors().iter().map(|t| t.name.as_str()).collect();
            assert!(
                names.contains(&"blk.0.attn_qkv.weight") && !names.contains(&"blk.0.attn_q.weight"),
                "{file}: {names:?}"
            );
            let longrope = cfg.inv_freq_long().is_some();
            assert_eq!(
                names.contains(&"rope_factors_long.weight"),
                longrope,
                "{file}"
            );
            assert_eq!(
                meta(&f, "phi3.rope.dimension_count").to_u32().unwrap() as usize,
                cfg.rotary_dim()
            );
            let back = TempDir::new("export-phi3-back");
            convert_gguf_to_hf(&out, back.path()).unwrap();
            let reloaded = Model::load(back.path(), Trainable::None, &cpu()).unwrap();
            let got = reloaded.config();
            assert_eq!(got.model_type, "phi3");
            assert_eq!(
                (got.layer_window(0), got.rotary_dim(), got.inv_freq_long()),
                (cfg.layer_window(0), cfg.rotary_dim(), cfg.inv_freq_long()),
                "{file} {ty:?}"
            );
            assert_eq!(got.inv_freq(), cfg.inv_freq(), "{file} {ty:?}");
            let e = rel(&all_logits(&reloaded), &want);
            eprintln!("{file} {ty:?}: relative logit error {e:.2e}");
            assert!(e < tol, "{file} {ty:?}: {e}");
        }
    }
}

/// Llama 3 rope scaling travels as llama.cpp's `rope_freqs` tensor: per rotary pair, the factor
/// its frequency is divided by (the plain frequency over the scaled one).
#[test]
fn llama3_rope_is_written_as_rope_freqs() {
    let dir = TempDir::new("export-llama3");
    // The llama3_tiny golden model with the byte-level tokenizer of a tiny GGUF of its vocabulary.
    let tok = TempDir::new("export-llama3-tok");
    convert_gguf_to_hf(&fixture("tiny_qwen2.gguf"), tok.path()).unwrap();
    let golden = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fixtures/golden/llama3_tiny");
    for f in ["config.json", "model.safetensors"] {
        std::fs::copy(golden.join(f), dir.path().join(f)).unwrap();
    }
    for f in ["tokenizer.json", "tokenizer_config.json"] {
        std::fs::copy(tok.path().join(f), dir.path().join(f)).unwrap();
    }
    let model = Model::load(dir.path(), Trainable::None, &cpu()).unwrap();
    let out = dir.path().join("llama3.gguf");
    export_gguf(
        &model,
        dir.path(),
        &out,
        GgmlDType::F32,
        "tiny",
        Existing::Replace,
    )
    .unwrap();
    let f = GgufFile::open(&out).unwrap();
    let factors = f.dequantize("rope_freqs.weight").unwrap();
    let cfg = model.config();
    let mut plain = cfg.clone();
    plain.rope_scaling = None;
    plain.rope_parameters = None;
    plain.rope_theta = Some(cfg.rope_base());
    let want: Vec<f32> = plain
        .inv_freq()
        .iter()
        .zip(cfg.inv_freq())
        .map(|(p, s)| p / s)
        .collect();
    assert_eq!(factors.len(), want.len());
    for (g, w) in factors.iter().zip(&want) {
        assert!(
            (g - w).abs() <= 1e-5 * w,
            "rope_freqs {factors:?} vs {want:?}"
        );
    }
    assert!(
        factors.iter().any(|&x| x > 1.5),
        "some frequencies are scaled"
    );
}

// ---------------------------------------------------------------------------------------------
// Gemma 3 as a `gemma3` GGUF with its SentencePiece tokenizer.

/// The Hugging Face tokenizer files of `tiny_spm_gemma3.gguf` (727 tokens in Gemma 3's layout:
/// control, user-defined newline and space runs, byte tokens, trained pieces), as whet's
/// converter writes them, in `dir`.
fn write_gemma_tokenizer(dir: &Path) {
    let f = GgufFile::open(fixture("tiny_spm_gemma3.gguf")).unwrap();
    for (name, json) in [
        ("tokenizer.json", f.tokenizer_json().unwrap()),
        ("tokenizer_config.json", f.tokenizer_config_json().unwrap()),
    ] {
        std::fs::write(dir.join(name), serde_json::to_string_pretty(&json).unwrap()).unwrap();
    }
}

/// gemma3_tiny in the one form a `gemma3` GGUF can state: its weights, its two layers repeated
/// to six (so that the sixth is global, as llama.cpp's pattern has it), `query_pre_attn_scalar`
/// 256, no `layer_types`, Gemma's special ids, and the embedding grown to `vocab` rows (row `i`
/// is row `i % 256`, negated in every other block of 256).
fn gemma3_tiny_for_gguf(vocab: usize) -> Model {
    let dir = golden_dir("gemma3_tiny");
    let mut cfg = Config::from_file(&dir.join("config.json")).unwrap();
    let weights = candle_core::safetensors::load(dir.join("model.safetensors"), &cpu()).unwrap();
    cfg.num_hidden_layers = 6;
    cfg.vocab_size = vocab;
    cfg.query_pre_attn_scalar = Some(256.0);
    cfg.layer_types = None;
    cfg.bos_token_id = Some(2);
    cfg.eos_token_id = Some(whet_model::TokenIds::One(1));
    let mut tensors = HashMap::new();
    for (name, t) in &weights {
        match name.strip_prefix("model.layers.") {
            Some(rest) => {
                let (layer, part) = rest.split_once('.').unwrap();
                let layer: usize = layer.parse().unwrap();
                for copy in (layer..6).step_by(2) {
                    tensors.insert(format!("model.layers.{copy}.{part}"), t.clone());
                }
            }
            None if name == "model.embed_tokens.weight" => {
                let rows: Vec<u32> = (0..vocab as u32).map(|i| i % 256).collect();
                let signs: Vec<f32> = (0..vocab)
                    .map(|i| if (i / 256) % 2 == 0 { 1.0 } else { -1.0 })
                    .collect();
                let idx = Tensor::new(rows.as_slice(), &cpu()).unwrap();
                let signs = Tensor::from_vec(signs, (vocab, 1), &cpu()).unwrap();
                let grown = t
                    .index_select(&idx, 0)
                    .unwrap()
                    .broadcast_mul(&signs)
                    .unwrap();
                tensors.insert(name.clone(), grown);
            }
            None => {
                tensors.insert(name.clone(), t.clone());
            }
        }
    }
    Model::from_tensors(&cfg, tensors, Trainable::None, &cpu()).unwrap()
}

fn meta<'a>(f: &'a GgufFile, key: &str) -> &'a candle_core::quantized::gguf_file::Value {
    f.metadata()
        .get(key)
        .unwrap_or_else(|| panic!("{key} is missing"))
}

#[test]
fn gemma3_round_trips_as_a_gemma3_gguf() {
    let dir = TempDir::new("export-gemma3");
    write_gemma_tokenizer(dir.path());
    let model = gemma3_tiny_for_gguf(727);
    let cfg = model.config().clone();
    let want = all_logits(&model);
    for (ty, tol) in [(GgmlDType::F32, 1e-5), (GgmlDType::Q8_0, 0.1)] {
        let out = dir.path().join(format!("gemma3-{ty:?}.gguf"));
        export_gguf(&model, dir.path(), &out, ty, "tiny", Existing::Replace).unwrap();
        let f = GgufFile::open(&out).unwrap();
        assert_eq!(f.architecture().unwrap(), "gemma3");
        use candle_core::quantized::gguf_file::Value as V;
        let u = |k: &str| meta(&f, k).to_u32().unwrap();
        for (key, want) in [
            ("gemma3.context_length", 128),
            ("gemma3.embedding_length", 64),
            ("gemma3.block_count", 6),
            ("gemma3.feed_forward_length", 128),
            ("gemma3.attention.head_count", 4),
            ("gemma3.attention.head_count_kv", 2),
            ("gemma3.attention.key_length", 16),
            ("gemma3.attention.value_length", 16),
            ("gemma3.attention.sliding_window", 6),
            ("tokenizer.ggml.bos_token_id", 2),
            ("tokenizer.ggml.eos_token_id", 1),
            ("tokenizer.ggml.unknown_token_id", 3),
            ("tokenizer.ggml.padding_token_id", 0),
        ] {
            assert_eq!(u(key), want, "{key}");
        }
        let f32_of = |k: &str| meta(&f, k).to_f32().unwrap();
        assert_eq!(f32_of("gemma3.rope.freq_base"), 1e6);
        assert_eq!(f32_of("gemma3.attention.layer_norm_rms_epsilon"), 1e-6);
        assert_eq!(
            meta(&f, "tokenizer.ggml.model").to_string().unwrap(),
            "llama"
        );
        assert_eq!(
            meta(&f, "tokenizer.ggml.pre").to_string().unwrap(),
            "default"
        );
        for (key, want) in [
            ("tokenizer.ggml.add_bos_token", true),
            ("tokenizer.ggml.add_eos_token", false),
            ("tokenizer.ggml.add_space_prefix", false),
        ] {
            assert_eq!(meta(&f, key).to_bool().unwrap(), want, "{key}");
        }
        assert!(
            matches!(meta(&f, "tokenizer.chat_template"), V::String(t) if t.contains("<start_of_turn>"))
        );
        for key in [
            "tokenizer.ggml.tokens",
            "tokenizer.ggml.scores",
            "tokenizer.ggml.token_type",
        ] {
            assert_eq!(meta(&f, key).to_vec().unwrap().len(), 727, "{key}");
        }
        assert!(!f.metadata().contains_key("tokenizer.ggml.merges"));

        // llama.cpp's tensor names, norms stored plus one, no `output.weight` (tied).
        let names: Vec<&str> = f.tensors().iter().map(|t| t.name.as_str()).collect();
        assert_eq!(names.len(), 2 + 6 * 13, "{names:?}");
        for part in [
            "attn_norm",
            "attn_q_norm",
            "attn_k_norm",
            "post_attention_norm",
            "ffn_norm",
            "post_ffw_norm",
        ] {
            assert!(
                names.contains(&format!("blk.5.{part}.weight").as_str()),
                "{part}"
            );
        }
        assert!(!names.contains(&"output.weight"));
        let weights: HashMap<_, _> = model.named_weights().unwrap().into_iter().collect();
        let hf = weights["model.layers.0.pre_feedforward_layernorm.weight"]
            .to_vec1::<f32>()
            .unwrap();
        let stored = f.dequantize("blk.0.ffn_norm.weight").unwrap();
        for (s, w) in stored.iter().zip(&hf) {
            assert_eq!(*s, w + 1.0);
        }

        let back = TempDir::new("export-gemma3-back");
        convert_gguf_to_hf(&out, back.path()).unwrap();
        let reloaded = Model::load(back.path(), Trainable::None, &cpu()).unwrap();
        let got = reloaded.config();
        assert_eq!(got.model_type, "gemma3_text");
        assert_eq!(got.attention_scale(), cfg.attention_scale());
        assert_eq!(got.vocab_size, 727);
        for i in 0..6 {
            assert_eq!(got.layer_window(i), cfg.layer_window(i), "layer {i}");
        }
        assert_eq!(cfg.layer_window(5), None, "the sixth layer is global");
        for kind in [LayerAttention::Full, LayerAttention::Sliding] {
            assert_eq!(got.inv_freq_for(kind), cfg.inv_freq_for(kind), "{kind:?}");
        }
        let e = rel(&all_logits(&reloaded), &want);
        eprintln!("gemma3 {ty:?}: relative logit error after export and re-import {e:.2e}");
        assert!(e < tol, "gemma3 {ty:?}: {e}");
    }
}

#[test]
fn gemma3_tokenizer_round_trips_through_its_gguf_form() {
    // Export writes the vocabulary llama.cpp writes; importing it gives the same ids as the
    // original tokenizer, and as transformers' reading of the original file.
    let refs = json(&fixture("tiny_spm_refs.json"));
    let refs = &refs["tiny_spm_gemma3.gguf"];
    let dir = TempDir::new("export-gemma3-tok");
    write_gemma_tokenizer(dir.path());
    let model = gemma3_tiny_for_gguf(727);
    let out = dir.path().join("gemma3.gguf");
    export_gguf(
        &model,
        dir.path(),
        &out,
        GgmlDType::F32,
        "tiny",
        Existing::Replace,
    )
    .unwrap();
    let back = TempDir::new("export-gemma3-tok-back");
    convert_gguf_to_hf(&out, back.path()).unwrap();

    let original = tokenizers::Tokenizer::from_file(dir.path().join("tokenizer.json")).unwrap();
    let again = tokenizers::Tokenizer::from_file(back.path().join("tokenizer.json")).unwrap();
    let mut texts: Vec<String> = refs["texts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t.as_str().unwrap().to_string())
        .collect();
    let n_refs = texts.len();
    // Beyond the fixture's texts: byte fallback for characters the vocabulary lacks, runs of
    // every whitespace kind, and specials mixed into text.
    texts.extend(
        [
            "ß∑𝔘\u{10FFFF}\u{0}",
            "     five spaces\n\n\n\n\n\n\tand\t\t\t tabs  ",
            "<bos><start_of_turn>model\n<unused2>  ok<end_of_turn>",
            "naïve café ✓ — “quotes” 東京",
        ]
        .map(String::from),
    );
    for (i, text) in texts.iter().enumerate() {
        let a = original.encode(text.as_str(), true).unwrap();
        let b = again.encode(text.as_str(), true).unwrap();
        assert_eq!(a.get_ids(), b.get_ids(), "{text:?}");
        if i < n_refs {
            let want: Vec<u32> = refs["token_ids"][i]
                .as_array()
                .unwrap()
                .iter()
                .map(|v| v.as_u64().unwrap() as u32)
                .collect();
            assert_eq!(b.get_ids(), want, "transformers' ids for {text:?}");
        }
    }
    // The same special tokens, flags and chat template; `model_max_length` is the model's
    // context now, not the fixture file's.
    let config_of = |d: &Path| {
        let mut c = json(&d.join("tokenizer_config.json"));
        c.as_object_mut().unwrap().remove("model_max_length");
        c
    };
    assert_eq!(config_of(dir.path()), config_of(back.path()));

    // Token by token against the llama.cpp-layout fixture the tokenizer came from.
    let src = GgufFile::open(fixture("tiny_spm_gemma3.gguf")).unwrap();
    let f = GgufFile::open(&out).unwrap();
    let list = |f: &GgufFile, k: &str| meta(f, k).to_vec().unwrap().clone();
    let (tokens0, tokens1) = (
        list(&src, "tokenizer.ggml.tokens"),
        list(&f, "tokenizer.ggml.tokens"),
    );
    let (types0, types1) = (
        list(&src, "tokenizer.ggml.token_type"),
        list(&f, "tokenizer.ggml.token_type"),
    );
    let (scores0, scores1) = (
        list(&src, "tokenizer.ggml.scores"),
        list(&f, "tokenizer.ggml.scores"),
    );
    // What the importer kept of the source (tokenizer.json has no id for a token repeated once
    // respelled, and spells the fixture's trained space-run pieces as its user-defined ones)
    // comes back as the source has it; the rest as llama.cpp writes a missing id.
    let kept = json(&dir.path().join("tokenizer.json"));
    let mut kept_ids: Vec<u64> = kept["model"]["vocab"]
        .as_object()
        .unwrap()
        .values()
        .map(|v| v.as_u64().unwrap())
        .collect();
    kept_ids.extend(
        kept["added_tokens"]
            .as_array()
            .unwrap()
            .iter()
            .map(|a| a["id"].as_u64().unwrap()),
    );
    let text = |v: &candle_core::quantized::gguf_file::Value| v.to_string().unwrap().clone();
    let ty = |v: &candle_core::quantized::gguf_file::Value| v.to_i32().unwrap();
    let mut respelled = vec![];
    for i in 0..727 {
        if !kept_ids.contains(&(i as u64)) {
            assert_eq!(
                (text(&tokens1[i]), ty(&types1[i])),
                (format!("[PAD{i}]"), 5)
            );
        } else if text(&tokens0[i]).chars().count() >= 2
            && text(&tokens0[i]).chars().all(|c| c == '\u{2581}')
            && ty(&types0[i]) == 1
        {
            assert_eq!(ty(&types1[i]), 4, "id {i}");
            respelled.push(i);
        } else {
            assert_eq!(
                (text(&tokens1[i]), ty(&types1[i])),
                (text(&tokens0[i]), ty(&types0[i])),
                "id {i}"
            );
            if ty(&types0[i]) != 1 {
                let (a, b) = (scores0[i].to_f32().unwrap(), scores1[i].to_f32().unwrap());
                assert_eq!(a, b, "id {i}: score");
            }
        }
    }
    assert_eq!(
        respelled.len(),
        3,
        "the fixture's three repeated space runs"
    );
    // The trained pieces' scores: SentencePiece's (the negated rank), so in the same order.
    let normal = |scores: &[candle_core::quantized::gguf_file::Value]| {
        let mut ids: Vec<usize> = (0..727).filter(|i| ty(&types1[*i]) == 1).collect();
        ids.sort_by(|&a, &b| {
            let (x, y) = (scores[a].to_f32().unwrap(), scores[b].to_f32().unwrap());
            y.partial_cmp(&x).unwrap()
        });
        ids
    };
    assert_eq!(normal(&scores0), normal(&scores1));
}

/// Gemma 3 4B-27B scale their global layers' rope linearly: that travels as
/// `gemma3.rope.scaling.*` and comes back on the global layers only.
#[test]
fn gemma3_linear_rope_on_global_layers_round_trips() {
    let dir = TempDir::new("export-gemma3-linear");
    write_gemma_tokenizer(dir.path());
    let base = gemma3_tiny_for_gguf(727);
    let mut cfg = base.config().clone();
    let Some(whet_model::RopeParameters::PerLayerType(sets)) = &mut cfg.rope_parameters else {
        panic!("gemma3_tiny has rope_parameters per layer type");
    };
    sets.get_mut("full_attention").unwrap().kind = whet_model::RopeKind::Linear { factor: 8.0 };
    let weights: HashMap<_, _> = base.named_weights().unwrap().into_iter().collect();
    let model = Model::from_tensors(&cfg, weights, Trainable::None, &cpu()).unwrap();
    let out = dir.path().join("linear.gguf");
    export_gguf(
        &model,
        dir.path(),
        &out,
        GgmlDType::F32,
        "x",
        Existing::Replace,
    )
    .unwrap();
    let f = GgufFile::open(&out).unwrap();
    assert_eq!(
        meta(&f, "gemma3.rope.scaling.type").to_string().unwrap(),
        "linear"
    );
    assert_eq!(
        meta(&f, "gemma3.rope.scaling.factor").to_f32().unwrap(),
        8.0
    );
    let back = TempDir::new("export-gemma3-linear-back");
    convert_gguf_to_hf(&out, back.path()).unwrap();
    let reloaded = Model::load(back.path(), Trainable::None, &cpu()).unwrap();
    for kind in [LayerAttention::Full, LayerAttention::Sliding] {
        assert_eq!(
            reloaded.config().inv_freq_for(kind),
            cfg.inv_freq_for(kind),
            "{kind:?}"
        );
    }
    let d = max_abs_diff(&all_logits(&reloaded), &all_logits(&model));
    assert!(d < 1e-5, "{d}");
}

/// The real Gemma 3 270M, when cached: its tokenizer as whet converts it, exported again, is the
/// vocabulary llama.cpp's converter wrote into the file, all 262,144 tokens.
#[test]
fn gemma3_270m_tokenizer_exports_as_llama_cpp_wrote_it() {
    let path = cached_model("gemma3-270m", "gemma-3-270m-q4_k_m.gguf");
    if !path.exists() {
        eprintln!(
            "SKIP gemma3_270m_tokenizer_exports_as_llama_cpp_wrote_it: {} is absent (`cargo xtask fetch-model gemma3-270m` puts it there); the tiny SentencePiece fixture covers the writer",
            path.display()
        );
        return;
    }
    let src = GgufFile::open(&path).unwrap();
    let dir = TempDir::new("export-gemma3-270m-tok");
    for (name, json) in [
        ("tokenizer.json", src.tokenizer_json().unwrap()),
        (
            "tokenizer_config.json",
            src.tokenizer_config_json().unwrap(),
        ),
    ] {
        std::fs::write(dir.path().join(name), serde_json::to_string(&json).unwrap()).unwrap();
    }
    let written: HashMap<String, candle_core::quantized::gguf_file::Value> =
        tokenizer_metadata(dir.path(), GgufArch::Gemma3, 262_144)
            .unwrap()
            .into_iter()
            .collect();
    for key in [
        "tokenizer.ggml.model",
        "tokenizer.ggml.pre",
        "tokenizer.ggml.tokens",
        "tokenizer.ggml.token_type",
        "tokenizer.ggml.bos_token_id",
        "tokenizer.ggml.eos_token_id",
        "tokenizer.ggml.unknown_token_id",
        "tokenizer.ggml.padding_token_id",
        "tokenizer.ggml.add_bos_token",
        "tokenizer.ggml.add_eos_token",
        "tokenizer.ggml.add_space_prefix",
    ] {
        assert_eq!(
            format!("{:?}", written[key]),
            format!("{:?}", meta(&src, key)),
            "{key}"
        );
    }
    // Scores: the same order. (The file's pieces skip 31 ranks before "▁", id 236743, as
    // Google's tokenizer.model does; a rank is all llama.cpp's tokenizer compares.)
    let scores = |v: &candle_core::quantized::gguf_file::Value| -> Vec<f32> {
        v.to_vec()
            .unwrap()
            .iter()
            .map(|x| x.to_f32().unwrap())
            .collect()
    };
    let (ours, theirs) = (
        scores(&written["tokenizer.ggml.scores"]),
        scores(meta(&src, "tokenizer.ggml.scores")),
    );
    let types = written["tokenizer.ggml.token_type"].to_vec().unwrap();
    let normal: Vec<usize> = (0..ours.len())
        .filter(|&i| types[i].to_i32().unwrap() == 1)
        .collect();
    for i in (0..ours.len()).filter(|&i| types[i].to_i32().unwrap() != 1) {
        assert_eq!(ours[i], theirs[i], "id {i}");
    }
    for w in normal.windows(2) {
        assert!(
            ours[w[1]] < ours[w[0]] && theirs[w[1]] < theirs[w[0]],
            "ids {w:?}"
        );
    }
    let differ = normal.iter().filter(|&&i| ours[i] != theirs[i]).count();
    eprintln!(
        "Gemma 3 270M: tokens and types equal to llama.cpp's; {differ} normal scores differ in value (not in order)"
    );
}

#[test]
fn gemma3_configs_a_gguf_cannot_state_are_refused() {
    let dir = TempDir::new("export-gemma3-refused");
    write_gemma_tokenizer(dir.path());
    let out = dir.path().join("no.gguf");
    let export = |model: &Model| {
        export_gguf(
            model,
            dir.path(),
            &out,
            GgmlDType::F32,
            "x",
            Existing::Replace,
        )
        .unwrap_err()
        .to_string()
    };
    // The golden model itself: layer 1 is global, and query_pre_attn_scalar is 24.
    let golden = Model::load(&golden_dir("gemma3_tiny"), Trainable::None, &cpu()).unwrap();
    let err = export(&golden);
    assert!(
        err.contains("layer 1 is a global layer") && err.contains("every 6th layer"),
        "{err}"
    );
    let mut cfg = golden.config().clone();
    cfg.layer_types = None;
    let weights: HashMap<_, _> = golden.named_weights().unwrap().into_iter().collect();
    let scaled = Model::from_tensors(&cfg, weights, Trainable::None, &cpu()).unwrap();
    let err = export(&scaled);
    assert!(err.contains("query_pre_attn_scalar Some(24.0)"), "{err}");
    // A vocabulary larger than the model's embedding.
    let small = gemma3_tiny_for_gguf(256);
    let err = export(&small);
    assert!(
        err.contains("tokenizer.json") && err.contains("past the model's vocab_size 256"),
        "{err}"
    );
    assert!(!out.exists());
}

// ---------------------------------------------------------------------------------------------
// Llama 3.1-style rope back from `rope_freqs.weight`.

/// A golden llama3-rope model with the byte-level tokenizer of a tiny GGUF of its vocabulary, in
/// `dir`.
fn llama3_golden(name: &str, dir: &Path) -> Model {
    let tok = TempDir::new("export-llama3-tok");
    convert_gguf_to_hf(&fixture("tiny_qwen2.gguf"), tok.path()).unwrap();
    for f in ["config.json", "model.safetensors"] {
        std::fs::copy(golden_dir(name).join(f), dir.join(f)).unwrap();
    }
    for f in ["tokenizer.json", "tokenizer_config.json"] {
        std::fs::copy(tok.path().join(f), dir.join(f)).unwrap();
    }
    Model::load(dir, Trainable::None, &cpu()).unwrap()
}

#[test]
fn llama3_rope_comes_back_from_rope_freqs() {
    for name in ["llama32_tiny", "llama3_tiny"] {
        let dir = TempDir::new("export-llama32");
        let model = llama3_golden(name, dir.path());
        let want = all_logits(&model);
        let out = dir.path().join("llama32.gguf");
        export_gguf(
            &model,
            dir.path(),
            &out,
            GgmlDType::F32,
            "tiny",
            Existing::Replace,
        )
        .unwrap();
        let back = TempDir::new("export-llama32-back");
        let report = convert_gguf_to_hf(&out, back.path()).unwrap();
        let cfg = model.config();
        assert_eq!(report.config.rope_kind(), cfg.rope_kind(), "{name}");
        assert!(matches!(
            cfg.rope_kind(),
            whet_model::RopeKind::Llama3 { .. }
        ));
        assert_eq!(report.config.rope_base(), cfg.rope_base());
        let reloaded = Model::load(back.path(), Trainable::None, &cpu()).unwrap();
        assert_eq!(reloaded.config().rope_kind(), cfg.rope_kind());
        assert_eq!(reloaded.config().inv_freq(), cfg.inv_freq());
        let d = max_abs_diff(&all_logits(&reloaded), &want);
        eprintln!("{name}: logits after export and re-import max |diff| {d:.2e}");
        assert!(d < 1e-5, "{name}: {d}");
        // transformers' `rope_scaling` in the written config.json.
        let written = json(&back.path().join("config.json"));
        let rs = &written["rope_scaling"];
        assert_eq!(rs["rope_type"], "llama3", "{written}");
        assert_eq!(rs["low_freq_factor"], 1.0);
        assert_eq!(rs["high_freq_factor"], 4.0);
        assert_eq!(rs["original_max_position_embeddings"], 32);
    }
}

#[test]
fn corrupted_rope_freqs_are_refused() {
    let dir = TempDir::new("export-rope-bad");
    let model = llama3_golden("llama32_tiny", dir.path());
    let out = dir.path().join("llama32.gguf");
    export_gguf(
        &model,
        dir.path(),
        &out,
        GgmlDType::F32,
        "tiny",
        Existing::Replace,
    )
    .unwrap();
    let entry = GgufFile::open(&out)
        .unwrap()
        .tensor("rope_freqs.weight")
        .unwrap()
        .clone();
    let factors = GgufFile::open(&out)
        .unwrap()
        .dequantize("rope_freqs.weight")
        .unwrap();
    assert_eq!(factors, [1.0, 32.0, 32.0, 32.0, 32.0, 32.0, 32.0, 32.0]);
    // One long-wavelength pair scaled less than the pairs around it; then a factor below 1.
    for (pair, value, says) in [(3, 31.0f32, "grow with the wavelength"), (5, 0.5, ">= 1")] {
        let mut bytes = std::fs::read(&out).unwrap();
        let at = entry.start as usize + 4 * pair;
        bytes[at..at + 4].copy_from_slice(&value.to_le_bytes());
        let bad = dir.path().join("bad.gguf");
        std::fs::write(&bad, &bytes).unwrap();
        let back = TempDir::new("export-rope-bad-back");
        let err = convert_gguf_to_hf(&bad, back.path())
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("bad.gguf") && err.contains("rope_freqs.weight") && err.contains(says),
            "{err}"
        );
    }
}
