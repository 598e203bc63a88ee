//! GGUF export: a tiny GGUF fixture is imported, exported in each type, and imported again.
//! The model and tokenizer must survive: same config, same vocabulary, merges, special ids and
//! chat template, logits equal within the type's quantization error.

use std::path::{Path, PathBuf};

use candle_core::quantized::{GgmlDType, QTensor};
use serde_json::Value;
use whet_data::atomic::Existing;
use whet_model::export::{export_gguf, tensor_type};
use whet_model::gguf::{GgufFile, convert_gguf_to_hf};
use whet_model::{Error, LoraConfig, Model, Trainable};

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
