//! GGUF export: a (merged) model plus its Hugging Face tokenizer files as one GGUF file that
//! llama.cpp, ollama and LM Studio load.
//!
//! Follows llama.cpp's `convert_hf_to_gguf.py` for the `llama` (which also covers Mistral),
//! `qwen2`, `qwen3` and `gemma3` architectures: the same metadata keys, tensor names
//! (`blk.N.attn_q.weight`, Qwen2's `attn_q.bias`, Qwen3's `attn_q_norm.weight`, Gemma's
//! `post_ffw_norm.weight`...; the importer's table, [`hf_tensor_name`], read backwards), the
//! Q/K row permutation of `llama` files (`LlamaModel.permute`, the inverse of what
//! [`crate::gguf`] undoes on import), llama3 rope as the `rope_freqs` tensor, Gemma's norm
//! weights stored plus one, norms and biases in F32, and the tokenizer as `tokenizer.ggml.*`
//! with `tokenizer.chat_template`: gpt2-style BPE (tokens in their byte-level spelling, merges,
//! token types, special ids), or for `gemma3` the SentencePiece vocabulary llama.cpp writes from
//! Gemma's `tokenizer.model`, rebuilt from `tokenizer.json` (tokens, scores, token types).
//!
//! A `gemma3` GGUF cannot say which layers are local, their rope, or `query_pre_attn_scalar`:
//! llama.cpp hard-codes Gemma 3's (every 6th layer global, local base 10000, scores scaled by
//! `head_dim ** -0.5`, which is 256's for every release but 27B) and transformers' and whet's
//! readers take `Gemma3TextConfig`'s defaults (the same, with `query_pre_attn_scalar` 256). A
//! model that differs is refused rather than written as another model. With a head size other
//! than 256 (and `query_pre_attn_scalar` 256, as in the tests' tiny model) the readers disagree:
//! the file is what llama.cpp's own converter writes and reads back in whet and transformers as
//! the same model, while llama.cpp scales its attention scores by `head_dim ** -0.5`.
//! Matrices take the requested type, or llama.cpp's fallback when its blocks do not tile a
//! row ([`crate::quant::fit`]), or F16 when nothing does; the output projection of a
//! quantized file gets Q6_K / Q8_0 as llama.cpp gives it ([`tensor_type`]).
//!
//! The file is written beside `out` under a temporary name and renamed into place, so an
//! existing file at `out` survives a failed export.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use candle_core::Tensor;
use candle_core::quantized::gguf_file::Value;
use candle_core::quantized::{GgmlDType, QTensor};
use serde_json::Value as Json;
use whet_data::atomic::{self, Existing};

use crate::config::{ModelType, RopeKind};
use crate::error::{Error, Result};
use crate::gguf::{GgufArch, hf_tensor_name, permute_qk_rows};
use crate::llama::Model;

/// What [`export_gguf`] wrote.
#[derive(Debug, Clone, PartialEq)]
pub struct ExportReport {
    pub path: PathBuf,
    /// Number of tensors per GGML type (`"q4_0"`, `"f32"`...).
    pub types: BTreeMap<String, usize>,
    pub tensors: usize,
    pub bytes: u64,
}

/// Writes `model` (no LoRA adapters: merge them first) and the tokenizer of `tokenizer_dir`
/// (`tokenizer.json`, `tokenizer_config.json`) to the GGUF file `out`, matrices in `want`,
/// atomically. An existing `out` is replaced only with [`Existing::Replace`]; with
/// [`Existing::Refuse`] it is refused before any work (and again at the rename).
pub fn export_gguf(
    model: &Model,
    tokenizer_dir: &Path,
    out: &Path,
    want: GgmlDType,
    name: &str,
    existing: Existing,
) -> Result<ExportReport> {
    atomic::refuse_existing(out, existing)?;
    let cfg = model.config();
    let fail = |what: String| Err(Error::quantize(out, what));
    if model.lora_config().is_some() {
        return fail(
            "the model still has LoRA adapters; merge them first (`whet export` merges an --adapter itself)"
                .into(),
        );
    }
    let arch = match cfg.model_type() {
        ModelType::Llama | ModelType::Mistral => GgufArch::Llama,
        ModelType::Qwen2 => GgufArch::Qwen2,
        ModelType::Qwen3 => GgufArch::Qwen3,
        ModelType::Phi3 => GgufArch::Phi3,
        ModelType::Gemma3 => GgufArch::Gemma3,
    };
    if arch == GgufArch::Phi3 && cfg.head_dim() * cfg.num_attention_heads != cfg.hidden_size {
        return fail(format!(
            "head_dim {} x {} heads is not hidden_size {}: a phi3 GGUF has no key for the head size (llama.cpp takes hidden / heads)",
            cfg.head_dim(),
            cfg.num_attention_heads,
            cfg.hidden_size
        ));
    }
    if arch == GgufArch::Gemma3
        && let Some(why) = gemma3_layout_refusal(cfg)
    {
        return fail(why);
    }
    if cfg.o_bias() || cfg.mlp_bias || (cfg.qkv_bias() && arch != GgufArch::Qwen2) {
        return fail(format!(
            "attention or MLP biases have no place in {}'s GGUF layout",
            arch.name()
        ));
    }
    // Extra F32 tensors after the blocks: llama3's `rope_freqs`, Phi-3's LongRoPE factors.
    let rope_tensors: Vec<(&str, Vec<f32>)> = match cfg.rope_kind() {
        RopeKind::Default => vec![],
        RopeKind::Linear { .. } if arch != GgufArch::Phi3 => vec![],
        RopeKind::Llama3 { .. } if arch == GgufArch::Llama => {
            vec![("rope_freqs.weight", llama3_rope_factors(cfg))]
        }
        RopeKind::LongRope {
            short_factor,
            long_factor,
            ..
        } if arch == GgufArch::Phi3 => {
            let f32s = |v: Vec<f64>| v.into_iter().map(|f| f as f32).collect();
            vec![
                ("rope_factors_long.weight", f32s(long_factor)),
                ("rope_factors_short.weight", f32s(short_factor)),
            ]
        }
        other => {
            return fail(format!(
                "rope type {other:?} has no place in {}'s GGUF layout",
                arch.name()
            ));
        }
    };
    if !matches!(
        want,
        GgmlDType::F32
            | GgmlDType::F16
            | GgmlDType::Q8_0
            | GgmlDType::Q5_0
            | GgmlDType::Q5_1
            | GgmlDType::Q4_0
            | GgmlDType::Q4_1
            | GgmlDType::Q4K
            | GgmlDType::Q5K
            | GgmlDType::Q6K
    ) {
        return fail(format!(
            "cannot export as {want:?}; use one of {}",
            crate::quant::names()
        ));
    }

    let mut metadata = model_metadata(model, arch, want, name);
    metadata.extend(tokenizer_metadata(tokenizer_dir, arch, cfg.vocab_size)?);

    // Tensors in llama.cpp's order: token_embd, blocks, output_norm, output.
    let weights: BTreeMap<String, Tensor> = model.named_weights()?.into_iter().collect();
    let mut tensors: Vec<(String, QTensor)> = Vec::new();
    let mut types: BTreeMap<String, usize> = BTreeMap::new();
    let mut add = |gguf_name: String, hf_name: &str, permute_heads: Option<usize>| -> Result<()> {
        let t = weights.get(hf_name).ok_or_else(|| Error::MissingTensor {
            tensor: hf_name.to_string(),
            files: vec![],
        })?;
        let t = t.detach();
        let q = if t.rank() == 1 {
            // Gemma scales by `1 + w`; llama.cpp's converter stores `w + 1` (`norm_shift`).
            let t = if arch == GgufArch::Gemma3 && gguf_name.ends_with("norm.weight") {
                t.to_dtype(candle_core::DType::F32)?.affine(1.0, 1.0)?
            } else {
                t
            };
            QTensor::quantize(&t, GgmlDType::F32)?
        } else {
            let (rows, cols) = t.dims2()?;
            let t = match permute_heads {
                Some(heads) => {
                    let data = t.flatten_all()?.to_vec1::<f32>()?;
                    let p = permute_qk_rows(&data, rows, cols, heads);
                    Tensor::from_vec(p, (rows, cols), t.device())?
                }
                None => t,
            };
            let is_output = gguf_name == "output.weight"
                || (cfg.tie_word_embeddings && gguf_name == "token_embd.weight");
            QTensor::quantize(&t, tensor_type(want, cols, is_output))?
        };
        *types.entry(crate::quant::name(q.dtype())).or_default() += 1;
        tensors.push((gguf_name, q));
        Ok(())
    };
    add(
        "token_embd.weight".into(),
        "model.embed_tokens.weight",
        None,
    )?;
    // llama.cpp permutes Q and K rows for the llama architecture only.
    let (nh, nkv) = match arch {
        GgufArch::Llama => (Some(cfg.num_attention_heads), Some(cfg.num_kv_heads())),
        _ => (None, None),
    };
    for i in 0..cfg.num_hidden_layers {
        for part in block_tensors(arch) {
            let gguf_name = format!("blk.{i}.{part}");
            // The importer's table read backwards, so that export and import cannot disagree.
            let hf_name = hf_tensor_name(arch, &gguf_name).ok_or_else(|| {
                Error::quantize(
                    out,
                    format!(
                        "{gguf_name} has no Hugging Face name in whet's {} table",
                        arch.name()
                    ),
                )
            })?;
            let permute = match part {
                "attn_q.weight" => nh,
                "attn_k.weight" => nkv,
                _ => None,
            };
            add(gguf_name, &hf_name, permute)?;
        }
    }
    add("output_norm.weight".into(), "model.norm.weight", None)?;
    if !cfg.tie_word_embeddings {
        add("output.weight".into(), "lm_head.weight", None)?;
    }
    for (name, factors) in rope_tensors {
        let n = factors.len();
        let t = Tensor::from_vec(factors, n, &candle_core::Device::Cpu)?;
        let q = QTensor::quantize(&t, GgmlDType::F32)?;
        *types.entry(crate::quant::name(q.dtype())).or_default() += 1;
        tensors.push((name.into(), q));
    }

    let n = tensors.len();
    atomic::write_with(out, existing, |w| {
        let meta: Vec<(&str, &Value)> = metadata.iter().map(|(k, v)| (k.as_str(), v)).collect();
        let ts: Vec<(&str, &QTensor)> = tensors.iter().map(|(k, v)| (k.as_str(), v)).collect();
        candle_core::quantized::gguf_file::write(w, &meta, &ts)
            .map_err(|e| std::io::Error::other(format!("writing GGUF failed: {e}")))
    })?;
    let bytes = std::fs::metadata(out)
        .map_err(|e| Error::io(out, "stat", e))?
        .len();
    Ok(ExportReport {
        path: out.to_path_buf(),
        types,
        tensors: n,
        bytes,
    })
}

/// The type a matrix with rows of `cols` elements is written in when the file's type is
/// `want`. As llama.cpp's quantizer (`llama_tensor_get_type`), the output projection (the
/// token embedding when tied) of a quantized file gets Q6_K, or Q8_0 when its rows do not tile
/// 256-element blocks: 4-bit logits cost far more quality than 4-bit inner layers.
/// Other matrices take `want` or its fallback ([`crate::quant::fit`]), else F16.
pub fn tensor_type(want: GgmlDType, cols: usize, is_output: bool) -> GgmlDType {
    let quantized = !matches!(want, GgmlDType::F32 | GgmlDType::F16);
    if is_output && quantized && want != GgmlDType::Q8_0 {
        return crate::quant::fit(GgmlDType::Q6K, cols).unwrap_or(GgmlDType::F16);
    }
    crate::quant::fit(want, cols).unwrap_or(GgmlDType::F16)
}

/// The tensors of block N (`blk.N.<part>`), in the order llama.cpp's converter writes them.
fn block_tensors(arch: GgufArch) -> Vec<&'static str> {
    if arch == GgufArch::Phi3 {
        // Phi3MiniModel: q/k/v fused, gate and up fused into `ffn_up`.
        return vec![
            "attn_norm.weight",
            "attn_qkv.weight",
            "attn_output.weight",
            "ffn_norm.weight",
            "ffn_up.weight",
            "ffn_down.weight",
        ];
    }
    let mut parts = vec![
        "attn_norm.weight",
        "attn_q.weight",
        "attn_k.weight",
        "attn_v.weight",
    ];
    match arch {
        GgufArch::Llama | GgufArch::Phi3 => {}
        GgufArch::Qwen2 => parts.extend(["attn_q.bias", "attn_k.bias", "attn_v.bias"]),
        GgufArch::Qwen3 | GgufArch::Gemma3 => {
            parts.extend(["attn_q_norm.weight", "attn_k_norm.weight"]);
        }
    }
    parts.push("attn_output.weight");
    if arch == GgufArch::Gemma3 {
        parts.push("post_attention_norm.weight");
    }
    parts.extend([
        "ffn_norm.weight",
        "ffn_gate.weight",
        "ffn_up.weight",
        "ffn_down.weight",
    ]);
    if arch == GgufArch::Gemma3 {
        parts.push("post_ffw_norm.weight");
    }
    parts
}

/// Why a Gemma 3 config cannot travel as a `gemma3` GGUF, if it cannot. The file has no key for
/// what llama.cpp hard-codes (`llm_load_hparams`: every 6th layer global, the local layers at
/// rope base 10000 unscaled) and what transformers' and whet's GGUF readers take from
/// `Gemma3TextConfig`'s defaults (the same pattern and local base, `query_pre_attn_scalar`
/// 256), so a model that differs would come back as another model.
fn gemma3_layout_refusal(cfg: &crate::Config) -> Option<String> {
    use crate::config::LayerAttention::{Full, Sliding};
    let Some(window) = cfg.sliding_window else {
        return Some(
            "sliding_window is unset, but a gemma3 GGUF names the local layers' window (gemma3.attention.sliding_window)".into(),
        );
    };
    let pattern = |i: usize| {
        if (i + 1).is_multiple_of(6) {
            Full
        } else {
            Sliding
        }
    };
    if let Some(i) = (0..cfg.num_hidden_layers).find(|&i| cfg.layer_attention(i) != pattern(i)) {
        let name = |a| if a == Full { "global" } else { "local" };
        return Some(format!(
            "layer {i} is a {} layer (layer_types / sliding_window_pattern), but a gemma3 GGUF cannot say which layers are local: llama.cpp and the GGUF readers make every 6th layer global (layers 5, 11, ...) and the others local (window {window}), so layer {i} would come back {}",
            name(cfg.layer_attention(i)),
            name(pattern(i)),
        ));
    }
    let (base, kind) = (cfg.rope_base_for(Sliding), cfg.rope_kind_for(Sliding));
    if base != 10_000.0 || kind != RopeKind::Default {
        return Some(format!(
            "the local layers' rope (base {base}, {kind:?}) is not the one a gemma3 GGUF implies: llama.cpp and the GGUF readers fix it at base 10000, unscaled"
        ));
    }
    let scale = cfg.attention_scale();
    if (scale - 1.0 / 16.0).abs() > 1e-12 * scale {
        return Some(format!(
            "attention scores are scaled by {scale} (query_pre_attn_scalar {:?}, head_dim {}), but a gemma3 GGUF does not carry the scale: transformers' and whet's GGUF readers take query_pre_attn_scalar 256 (scale 1/16), as in every Gemma 3 release but 27B",
            cfg.query_pre_attn_scalar,
            cfg.head_dim()
        ));
    }
    None
}

/// llama.cpp's `LLAMA_FTYPE_*` for a whole-file type (`general.file_type`).
fn file_type(t: GgmlDType) -> u32 {
    match t {
        GgmlDType::F32 => 0,
        GgmlDType::F16 => 1,
        GgmlDType::Q4_0 => 2,
        GgmlDType::Q4_1 => 3,
        GgmlDType::Q8_0 => 7,
        GgmlDType::Q5_0 => 8,
        GgmlDType::Q5_1 => 9,
        GgmlDType::Q4K => 15, // Q4_K_M
        GgmlDType::Q5K => 17, // Q5_K_M
        GgmlDType::Q6K => 18,
        _ => 0,
    }
}

/// llama.cpp's `rope_freqs` for llama3 rope (`LlamaModel.generate_extra_tensors`): per rotary
/// pair, the factor its frequency is divided by.
fn llama3_rope_factors(cfg: &crate::Config) -> Vec<f32> {
    let RopeKind::Llama3 {
        factor,
        low_freq_factor,
        high_freq_factor,
        original_max_position_embeddings,
    } = cfg.rope_kind()
    else {
        return vec![];
    };
    let dim = cfg.head_dim();
    let base = cfg.rope_base() as f32;
    let old = original_max_position_embeddings as f32;
    let (factor, low, high) = (
        factor as f32,
        low_freq_factor as f32,
        high_freq_factor as f32,
    );
    let (low_wavelen, high_wavelen) = (old / low, old / high);
    (0..dim)
        .step_by(2)
        .map(|i| {
            let freq = 1.0 / base.powf(i as f32 / dim as f32);
            let wavelen = 2.0 * std::f32::consts::PI / freq;
            if wavelen < high_wavelen {
                1.0
            } else if wavelen > low_wavelen {
                factor
            } else {
                let smooth = (old / wavelen - low) / (high - low);
                1.0 / ((1.0 - smooth) / factor + smooth)
            }
        })
        .collect()
}

/// `general.*` and `<arch>.*` keys (`convert_hf_to_gguf.py`, `TextModel.set_gguf_parameters`).
fn model_metadata(
    model: &Model,
    arch: GgufArch,
    want: GgmlDType,
    name: &str,
) -> Vec<(String, Value)> {
    let cfg = model.config();
    let u = |v: usize| Value::U32(v as u32);
    let a = arch.name();
    let mut m = vec![
        ("general.architecture".into(), Value::String(a.into())),
        ("general.type".into(), Value::String("model".into())),
        ("general.name".into(), Value::String(name.into())),
        ("general.file_type".into(), Value::U32(file_type(want))),
        ("general.quantization_version".into(), Value::U32(2)),
        (
            format!("{a}.context_length"),
            u(cfg.max_position_embeddings),
        ),
        (format!("{a}.embedding_length"), u(cfg.hidden_size)),
        (format!("{a}.block_count"), u(cfg.num_hidden_layers)),
        (format!("{a}.feed_forward_length"), u(cfg.intermediate_size)),
        (
            format!("{a}.attention.head_count"),
            u(cfg.num_attention_heads),
        ),
        (
            format!("{a}.attention.head_count_kv"),
            u(cfg.num_kv_heads()),
        ),
        (
            format!("{a}.rope.freq_base"),
            Value::F32(cfg.rope_base() as f32),
        ),
        (
            format!("{a}.attention.layer_norm_rms_epsilon"),
            Value::F32(cfg.rms_norm_eps as f32),
        ),
        (format!("{a}.rope.dimension_count"), u(cfg.rotary_dim())),
        (format!("{a}.vocab_size"), u(cfg.vocab_size)),
    ];
    if arch == GgufArch::Phi3 {
        // Phi3MiniModel.set_gguf_parameters: no key/value length (head_dim is hidden / heads);
        // a window of 0 means none; LongRoPE's original context and attention factor.
        m.push((
            format!("{a}.rope.scaling.original_context_length"),
            u(cfg.rope_original_context()),
        ));
        m.push((
            format!("{a}.attention.sliding_window"),
            u(cfg.sliding_window.unwrap_or(0)),
        ));
        if matches!(cfg.rope_kind(), RopeKind::LongRope { .. }) {
            m.push((
                format!("{a}.rope.scaling.attn_factor"),
                Value::F32(cfg.rope_attention_factor() as f32),
            ));
        }
    } else if arch != GgufArch::Llama || cfg.head_dim() * cfg.num_attention_heads != cfg.hidden_size
    {
        m.push((format!("{a}.attention.key_length"), u(cfg.head_dim())));
        m.push((format!("{a}.attention.value_length"), u(cfg.head_dim())));
    }
    if arch == GgufArch::Gemma3
        && let Some(window) = cfg.sliding_window
    {
        m.push((format!("{a}.attention.sliding_window"), u(window)));
    }
    if let RopeKind::Linear { factor } = cfg.rope_kind() {
        m.push((
            format!("{a}.rope.scaling.type"),
            Value::String("linear".into()),
        ));
        m.push((
            format!("{a}.rope.scaling.factor"),
            Value::F32(factor as f32),
        ));
    }
    m
}

fn read_json(path: &Path) -> Result<Json> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, "read", e))?;
    crate::error::from_json_str(&text, path)
}

/// The pre-tokenizer's llama.cpp name (`tokenizer.ggml.pre`), from `tokenizer.json`'s
/// `pre_tokenizer`: plain byte-level is GPT-2's regex (`gpt-2`, llama.cpp's spelling: it
/// refuses a file saying `gpt2`; readers without a split for the name keep GPT-2's, as whet's
/// does); a Split + ByteLevel sequence is named by its regex, the inverse of the table the
/// importer uses.
fn pre_name(pre: &Json, path: &Path) -> Result<&'static str> {
    let kind = pre.get("type").and_then(Json::as_str).unwrap_or("");
    if kind == "ByteLevel" && pre.get("use_regex").and_then(Json::as_bool) != Some(false) {
        return Ok("gpt-2");
    }
    let split = pre
        .get("pretokenizers")
        .and_then(Json::as_array)
        .and_then(|v| v.first())
        .and_then(|s| s.pointer("/pattern/Regex"))
        .and_then(Json::as_str);
    if kind == "Sequence"
        && let Some(regex) = split
    {
        for name in ["llama-bpe", "qwen2", "tekken", "gpt-4o", "qwen35"] {
            if crate::gguf::pre_tokenizer_split(name) == Some(regex) {
                return Ok(name);
            }
        }
    }
    Err(Error::quantize(
        path,
        format!(
            "pre_tokenizer {} has no llama.cpp name whet knows (byte-level GPT-2, Llama-3, Qwen2, Tekken, GPT-4o); the GGUF would tokenize differently",
            serde_json::to_string(pre).unwrap_or_default()
        ),
    ))
}

/// The tokenizer part of [`export_gguf`]: `tokenizer.ggml.*` and `tokenizer.chat_template` from
/// the Hugging Face tokenizer in `dir` (`tokenizer.json`, `tokenizer_config.json`,
/// `chat_template.jinja`) for a model of `arch` with `n_vocab` embedding rows. Byte-level BPE
/// becomes llama.cpp's `gpt2` tokenizer model; for `gemma3`, Gemma's SentencePiece vocabulary
/// becomes its `llama` model (`sentencepiece_vocab`: tokens, scores and token types as llama.cpp's
/// converter writes them, exactly `n_vocab` of them). Errors name the file and the field.
pub fn tokenizer_metadata(dir: &Path, arch: GgufArch, n_vocab: usize) -> Result<Metadata> {
    let tok_path = dir.join("tokenizer.json");
    let cfg_path = dir.join("tokenizer_config.json");
    let tok = read_json(&tok_path)?;
    let tcfg = if cfg_path.is_file() {
        read_json(&cfg_path)?
    } else {
        Json::Object(Default::default())
    };
    let bad = |field: &str, what: String| Error::quantize(&tok_path, format!("`{field}`: {what}"));
    let model = tok
        .get("model")
        .ok_or_else(|| bad("model", "absent".into()))?;
    if model.get("type").and_then(Json::as_str) != Some("BPE") {
        let what = if arch == GgufArch::Gemma3 {
            "gemma3 exports Gemma's SentencePiece BPE tokenizer (a BPE model with byte fallback)"
        } else {
            "only BPE tokenizers export to GGUF's gpt2 tokenizer model"
        };
        return Err(bad("model.type", what.into()));
    }
    let (mut m, by_content) = if arch == GgufArch::Gemma3 {
        let v = sentencepiece_vocab(&tok, &tok_path, n_vocab)?;
        let m = vec![
            (
                "tokenizer.ggml.model".to_string(),
                Value::String("llama".into()),
            ),
            (
                "tokenizer.ggml.pre".to_string(),
                Value::String("default".into()),
            ),
            ("tokenizer.ggml.tokens".to_string(), strings(v.tokens)),
            (
                "tokenizer.ggml.scores".to_string(),
                Value::Array(v.scores.into_iter().map(Value::F32).collect()),
            ),
            (
                "tokenizer.ggml.token_type".to_string(),
                Value::Array(v.types.into_iter().map(Value::I32).collect()),
            ),
        ];
        (m, v.by_content)
    } else {
        byte_level_vocab(&tok, &tok_path)?
    };

    let token_id = |field: &str| -> Option<u32> {
        let content = match tcfg.get(field)? {
            Json::String(s) => s.clone(),
            Json::Object(o) => o.get("content")?.as_str()?.to_string(),
            _ => return None,
        };
        by_content.get(&content).copied()
    };
    for (field, key) in [
        ("bos_token", "tokenizer.ggml.bos_token_id"),
        ("eos_token", "tokenizer.ggml.eos_token_id"),
        ("unk_token", "tokenizer.ggml.unknown_token_id"),
        ("pad_token", "tokenizer.ggml.padding_token_id"),
    ] {
        if let Some(id) = token_id(field) {
            m.push((key.to_string(), Value::U32(id)));
        }
    }
    for (field, key) in [
        ("add_bos_token", "tokenizer.ggml.add_bos_token"),
        ("add_eos_token", "tokenizer.ggml.add_eos_token"),
    ] {
        let stated = tcfg.get(field).and_then(Json::as_bool);
        // Every reader adds BOS to a SentencePiece file that does not say; so say what the
        // tokenizer's post-processor does (llama.cpp's `SpecialVocab` reads it there too).
        let value = match (stated, arch) {
            (Some(b), _) => Some(b),
            (None, GgufArch::Gemma3) => Some(post_processor_adds(&tok, &tcfg, field)),
            (None, _) => None,
        };
        if let Some(b) = value {
            m.push((key.to_string(), Value::Bool(b)));
        }
    }
    if arch == GgufArch::Gemma3 {
        // Gemma3Model.set_vocab: no dummy prefix.
        m.push((
            "tokenizer.ggml.add_space_prefix".to_string(),
            Value::Bool(false),
        ));
    }
    // transformers 5 may keep the template in its own file.
    let jinja = dir.join("chat_template.jinja");
    let template = match tcfg.get("chat_template").and_then(Json::as_str) {
        Some(t) => Some(t.to_string()),
        None if jinja.is_file() => {
            Some(std::fs::read_to_string(&jinja).map_err(|e| Error::io(&jinja, "read", e))?)
        }
        None => None,
    };
    if let Some(t) = template {
        m.push(("tokenizer.chat_template".to_string(), Value::String(t)));
    }
    Ok(m)
}

/// GGUF metadata: keys and values, in the order they are written.
pub type Metadata = Vec<(String, Value)>;

/// Token ids by their `tokenizer.json` spelling (the first id of a repeated one).
type IdsByContent = BTreeMap<String, u32>;

fn strings(v: Vec<String>) -> Value {
    Value::Array(v.into_iter().map(Value::String).collect())
}

/// Whether `tokenizer.json`'s TemplateProcessing starts (`add_bos_token`) or ends
/// (`add_eos_token`) a single sequence with the `tokenizer_config.json` token of that name.
fn post_processor_adds(tok: &Json, tcfg: &Json, field: &str) -> bool {
    let (special, first) = match field {
        "add_bos_token" => ("bos_token", true),
        _ => ("eos_token", false),
    };
    let Some(want) = tcfg.get(special).and_then(|v| match v {
        Json::String(s) => Some(s.as_str()),
        Json::Object(o) => o.get("content").and_then(Json::as_str),
        _ => None,
    }) else {
        return false;
    };
    let processors = match tok.get("post_processor") {
        Some(p) if p.get("type").and_then(Json::as_str) == Some("Sequence") => p
            .get("processors")
            .and_then(Json::as_array)
            .cloned()
            .unwrap_or_default(),
        Some(p) => vec![p.clone()],
        None => vec![],
    };
    processors.iter().any(|p| {
        let single = p.get("single").and_then(Json::as_array);
        let end = single.and_then(|s| if first { s.first() } else { s.last() });
        end.and_then(|e| e.pointer("/SpecialToken/id"))
            .and_then(Json::as_str)
            == Some(want)
    })
}

/// The byte-level BPE vocabulary (`tokenizer.ggml.model = "gpt2"`): tokens in their byte-level
/// spelling, token types, merges; and each token's id by its spelling.
fn byte_level_vocab(tok: &Json, tok_path: &Path) -> Result<(Metadata, IdsByContent)> {
    let bad = |field: &str, what: String| Error::quantize(tok_path, format!("`{field}`: {what}"));
    let model = &tok["model"];
    let pre = pre_name(tok.get("pre_tokenizer").unwrap_or(&Json::Null), tok_path)?;

    // Tokens by id: the BPE vocabulary plus added tokens (which may lie beyond it).
    let mut by_id: BTreeMap<u64, String> = BTreeMap::new();
    let vocab = model
        .get("vocab")
        .and_then(Json::as_object)
        .ok_or_else(|| bad("model.vocab", "absent or not an object".into()))?;
    for (token, id) in vocab {
        let id = id
            .as_u64()
            .ok_or_else(|| bad("model.vocab", format!("id of {token:?} is not an integer")))?;
        by_id.insert(id, token.clone());
    }
    let mut types: BTreeMap<u64, i32> = BTreeMap::new();
    for a in added_tokens(tok, tok_path)? {
        by_id.insert(a.id, a.content.clone());
        // llama.cpp token types: 1 normal, 3 control, 4 user-defined.
        types.insert(a.id, if a.special { 3 } else { 4 });
    }
    let n = by_id.len();
    if by_id.keys().copied().ne(0..n as u64) {
        return Err(bad(
            "model.vocab",
            "token ids are not 0..N without gaps".into(),
        ));
    }
    let token_types: Vec<Value> = (0..n as u64)
        .map(|id| Value::I32(types.get(&id).copied().unwrap_or(1)))
        .collect();

    let mut merges = Vec::new();
    for (i, m) in model
        .get("merges")
        .and_then(Json::as_array)
        .into_iter()
        .flatten()
        .enumerate()
    {
        let pair = match m {
            Json::String(s) => s.clone(),
            Json::Array(p) if p.len() == 2 => match (p[0].as_str(), p[1].as_str()) {
                (Some(a), Some(b)) => format!("{a} {b}"),
                _ => String::new(),
            },
            _ => String::new(),
        };
        if pair.is_empty() {
            return Err(bad(
                &format!("model.merges[{i}]"),
                "expected \"a b\" or [\"a\", \"b\"]".into(),
            ));
        }
        merges.push(Value::String(pair));
    }
    // The first id of each spelling, as the search over ids found it.
    let mut by_content = BTreeMap::new();
    for (id, t) in &by_id {
        by_content.entry(t.clone()).or_insert(*id as u32);
    }
    let m = vec![
        (
            "tokenizer.ggml.model".to_string(),
            Value::String("gpt2".into()),
        ),
        ("tokenizer.ggml.pre".to_string(), Value::String(pre.into())),
        (
            "tokenizer.ggml.tokens".to_string(),
            strings(by_id.into_values().collect()),
        ),
        (
            "tokenizer.ggml.token_type".to_string(),
            Value::Array(token_types),
        ),
        ("tokenizer.ggml.merges".to_string(), Value::Array(merges)),
    ];
    Ok((m, by_content))
}

/// One entry of `tokenizer.json`'s `added_tokens`.
struct Added {
    id: u64,
    content: String,
    special: bool,
}

fn added_tokens(tok: &Json, tok_path: &Path) -> Result<Vec<Added>> {
    let mut out = Vec::new();
    for (i, a) in tok
        .get("added_tokens")
        .and_then(Json::as_array)
        .into_iter()
        .flatten()
        .enumerate()
    {
        let (Some(id), Some(content)) = (
            a.get("id").and_then(Json::as_u64),
            a.get("content").and_then(Json::as_str),
        ) else {
            return Err(Error::quantize(
                tok_path,
                format!("`added_tokens[{i}]`: needs an integer `id` and a string `content`"),
            ));
        };
        out.push(Added {
            id,
            content: content.to_string(),
            special: a.get("special").and_then(Json::as_bool).unwrap_or(false),
        });
    }
    Ok(out)
}

/// A SentencePiece vocabulary as llama.cpp stores it.
struct SpVocab {
    tokens: Vec<String>,
    scores: Vec<f32>,
    types: Vec<i32>,
    by_content: IdsByContent,
}

/// llama.cpp's SentencePiece token types (`SentencePieceTokenTypes`).
const NORMAL: i32 = 1;
const UNKNOWN: i32 = 2;
const CONTROL: i32 = 3;
const USER_DEFINED: i32 = 4;
const UNUSED: i32 = 5;
const BYTE: i32 = 6;

/// The SentencePiece vocabulary llama.cpp's converter writes for Gemma (`_create_vocab_sentencepiece`
/// from `tokenizer.model`, then `tokenizer_config.json`'s added tokens), rebuilt from
/// `tokenizer.json`, `n_vocab` tokens:
///
/// * an added token marked special is CONTROL, another added token USER_DEFINED with its "▁"
///   written as spaces ("pre-normalize user-defined spaces"); both score -1000;
/// * a vocabulary token `<0xXX>` is BYTE, the model's `unk_token` (when not added) UNKNOWN, both
///   score 0;
/// * a vocabulary token of two or more "▁" is one of Gemma's space runs, USER_DEFINED and stored
///   with spaces, as llama.cpp's file has it (the inverse of the importer's respelling);
/// * every other token is NORMAL, scored -0, -1, -2, ... in id order: SentencePiece's BPE scores
///   (the negated merge rank; llama.cpp's tokenizer only compares them, and the readers that
///   rebuild merges from a Gemma file take the same order from the token order);
/// * ids without a token are `[PAD<id>]`, UNUSED, scored -10000; added tokens at or past
///   `n_vocab` (Gemma 3's `<image_soft_token>`) are left out, as llama.cpp leaves them.
///
/// `tokenizer.json` must normalize as Gemma's does (spaces to "▁", no dummy prefix, no split but
/// on spaces): that is the tokenizer a `gemma3` GGUF describes.
fn sentencepiece_vocab(tok: &Json, tok_path: &Path, n_vocab: usize) -> Result<SpVocab> {
    let bad = |field: &str, what: String| Error::quantize(tok_path, format!("`{field}`: {what}"));
    let model = &tok["model"];
    if model.get("byte_fallback").and_then(Json::as_bool) != Some(true) {
        return Err(bad(
            "model.byte_fallback",
            "gemma3 exports a SentencePiece vocabulary with byte fallback; this BPE model has none (a byte-level tokenizer has no gemma3 GGUF form)".into(),
        ));
    }
    check_gemma_text_steps(tok, tok_path)?;
    let vocab = model
        .get("vocab")
        .and_then(Json::as_object)
        .ok_or_else(|| bad("model.vocab", "absent or not an object".into()))?;
    let unk = model.get("unk_token").and_then(Json::as_str);

    #[derive(Clone)]
    enum Slot {
        Empty,
        Vocab(String),
        Added(String, bool),
    }
    let mut slots = vec![Slot::Empty; n_vocab];
    let mut by_content = BTreeMap::new();
    for (token, id) in vocab {
        let id = id
            .as_u64()
            .ok_or_else(|| bad("model.vocab", format!("id of {token:?} is not an integer")))?;
        let Some(slot) = slots.get_mut(id as usize) else {
            return Err(bad(
                "model.vocab",
                format!("{token:?} has id {id}, past the model's vocab_size {n_vocab}"),
            ));
        };
        *slot = Slot::Vocab(token.clone());
    }
    let added = added_tokens(tok, tok_path)?;
    for a in &added {
        if let Some(slot) = slots.get_mut(a.id as usize) {
            *slot = Slot::Added(a.content.clone(), a.special);
        }
    }
    let is_byte = |t: &str| {
        t.len() == 6
            && t.starts_with("<0x")
            && t.ends_with('>')
            && t[3..5]
                .bytes()
                .all(|b| b.is_ascii_digit() || (b'A'..=b'F').contains(&b))
    };
    let is_space_run = |t: &str| t.chars().count() >= 2 && t.chars().all(|c| c == '\u{2581}');
    let mut v = SpVocab {
        tokens: Vec::with_capacity(n_vocab),
        scores: Vec::with_capacity(n_vocab),
        types: Vec::with_capacity(n_vocab),
        by_content: BTreeMap::new(),
    };
    let mut normal = 0u32;
    for (id, slot) in slots.into_iter().enumerate() {
        let (token, score, ty) = match slot {
            Slot::Empty => (format!("[PAD{id}]"), -10000.0, UNUSED),
            Slot::Added(t, true) => (t, -1000.0, CONTROL),
            Slot::Added(t, false) => {
                by_content.entry(t.clone()).or_insert(id as u32);
                (t.replace('\u{2581}', " "), -1000.0, USER_DEFINED)
            }
            Slot::Vocab(t) if is_byte(&t) => (t, 0.0, BYTE),
            Slot::Vocab(t) if Some(t.as_str()) == unk => (t, 0.0, UNKNOWN),
            Slot::Vocab(t) if is_space_run(&t) => {
                by_content.entry(t.clone()).or_insert(id as u32);
                (t.replace('\u{2581}', " "), -1000.0, USER_DEFINED)
            }
            Slot::Vocab(t) => {
                let score = -(normal as f32);
                normal += 1;
                (t, score, NORMAL)
            }
        };
        by_content.entry(token.clone()).or_insert(id as u32);
        v.tokens.push(token);
        v.scores.push(score);
        v.types.push(ty);
    }
    v.by_content = by_content;
    Ok(v)
}

/// Refuses a `tokenizer.json` whose normalizer or pre-tokenizer is not Gemma's: the GGUF's
/// readers (llama.cpp's SentencePiece tokenizer with `add_space_prefix = false`, and the
/// `gemma_tokenizer` of transformers and whet) only write spaces as "▁".
fn check_gemma_text_steps(tok: &Json, tok_path: &Path) -> Result<()> {
    let bad = |field: &str, v: &Json, why: &str| {
        Error::quantize(
            tok_path,
            format!(
                "`{field}`: {} {why}; a gemma3 GGUF's tokenizer only writes spaces as \"\u{2581}\" (no dummy prefix, no other normalization), so it would tokenize differently",
                serde_json::to_string(v).unwrap_or_default()
            ),
        )
    };
    let replaces_spaces = |n: &Json| {
        n.get("type").and_then(Json::as_str) == Some("Replace")
            && n.pointer("/pattern/String").and_then(Json::as_str) == Some(" ")
            && n.get("content").and_then(Json::as_str) == Some("\u{2581}")
    };
    let normalizer = tok.get("normalizer").unwrap_or(&Json::Null);
    let steps: Vec<&Json> = match normalizer.get("type").and_then(Json::as_str) {
        Some("Sequence") => normalizer
            .get("normalizers")
            .and_then(Json::as_array)
            .map(|a| a.iter().collect())
            .unwrap_or_default(),
        _ => vec![normalizer],
    };
    if steps.len() != 1 || !replaces_spaces(steps[0]) {
        return Err(bad(
            "normalizer",
            normalizer,
            "is not Gemma's (Replace \" \" with \"\u{2581}\")",
        ));
    }
    // After that normalizer a split on spaces (GemmaConverter's) finds none.
    let harmless = |p: &Json| {
        p.get("type").and_then(Json::as_str) == Some("Split")
            && p.pointer("/pattern/String").and_then(Json::as_str) == Some(" ")
    };
    let pre = tok.get("pre_tokenizer").unwrap_or(&Json::Null);
    let ok = match pre.get("type").and_then(Json::as_str) {
        None => pre.is_null(),
        Some("Sequence") => pre
            .get("pretokenizers")
            .and_then(Json::as_array)
            .is_some_and(|a| a.iter().all(harmless)),
        Some(_) => harmless(pre),
    };
    if !ok {
        return Err(bad(
            "pre_tokenizer",
            pre,
            "splits the text in a way Gemma's tokenizer does not",
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pre_tokenizer_names_invert_the_importer() {
        let p = Path::new("tokenizer.json");
        let plain =
            serde_json::json!({"type": "ByteLevel", "add_prefix_space": false, "use_regex": true});
        assert_eq!(pre_name(&plain, p).unwrap(), "gpt-2");
        assert_eq!(
            crate::gguf::pre_tokenizer_split("gpt-2"),
            None,
            "GPT-2's own regex"
        );
        let regex = crate::gguf::pre_tokenizer_split("llama3").unwrap();
        let seq = serde_json::json!({"type": "Sequence", "pretokenizers": [
            {"type": "Split", "pattern": {"Regex": regex}, "behavior": "Isolated", "invert": false},
            {"type": "ByteLevel", "add_prefix_space": false, "use_regex": false}]});
        let name = pre_name(&seq, p).unwrap();
        assert_eq!(crate::gguf::pre_tokenizer_split(name), Some(regex));
        let metaspace = serde_json::json!({"type": "Metaspace"});
        let err = pre_name(&metaspace, p).unwrap_err().to_string();
        assert!(
            err.contains("Metaspace") && err.contains("tokenizer.json"),
            "{err}"
        );
    }

    #[test]
    fn only_gemmas_text_steps_export_as_a_gemma3_tokenizer() {
        let p = Path::new("tokenizer.json");
        let replace = serde_json::json!({"type": "Replace", "pattern": {"String": " "}, "content": "\u{2581}"});
        let split = serde_json::json!({"type": "Split", "pattern": {"String": " "}, "behavior": "MergedWithPrevious", "invert": false});
        for (normalizer, pre) in [
            (replace.clone(), split.clone()),
            (replace.clone(), Json::Null),
            (
                serde_json::json!({"type": "Sequence", "normalizers": [replace.clone()]}),
                split.clone(),
            ),
        ] {
            let tok = serde_json::json!({"normalizer": normalizer, "pre_tokenizer": pre});
            check_gemma_text_steps(&tok, p).unwrap();
        }
        // Llama 2's dummy prefix, as a normalizer or as Metaspace.
        let prepend = serde_json::json!({"type": "Sequence", "normalizers": [
            {"type": "Prepend", "prepend": "\u{2581}"}, replace.clone()]});
        let tok = serde_json::json!({"normalizer": prepend, "pre_tokenizer": null});
        let err = check_gemma_text_steps(&tok, p).unwrap_err().to_string();
        assert!(
            err.contains("`normalizer`") && err.contains("Prepend"),
            "{err}"
        );
        let metaspace = serde_json::json!({"type": "Metaspace", "replacement": "\u{2581}", "prepend_scheme": "first", "split": false});
        let tok = serde_json::json!({"normalizer": replace, "pre_tokenizer": metaspace});
        let err = check_gemma_text_steps(&tok, p).unwrap_err().to_string();
        assert!(
            err.contains("`pre_tokenizer`") && err.contains("tokenizer.json"),
            "{err}"
        );
    }

    #[test]
    fn add_bos_comes_from_the_post_processor_when_the_config_is_silent() {
        let tcfg = serde_json::json!({"bos_token": "<bos>", "eos_token": {"content": "<eos>"}});
        let bos_first = serde_json::json!({"post_processor": {"type": "TemplateProcessing",
            "single": [{"SpecialToken": {"id": "<bos>", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}]}});
        assert!(post_processor_adds(&bos_first, &tcfg, "add_bos_token"));
        assert!(!post_processor_adds(&bos_first, &tcfg, "add_eos_token"));
        let none = serde_json::json!({"post_processor": null});
        assert!(!post_processor_adds(&none, &tcfg, "add_bos_token"));
    }

    #[test]
    fn ftype_of_each_whole_file_type_is_llama_cpps() {
        assert_eq!(file_type(GgmlDType::F16), 1);
        assert_eq!(file_type(GgmlDType::Q8_0), 7);
        assert_eq!(file_type(GgmlDType::Q4_0), 2);
        assert_eq!(file_type(GgmlDType::Q4K), 15);
    }
}
