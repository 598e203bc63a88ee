//! GGUF export: a (merged) model plus its Hugging Face tokenizer files as one GGUF file that
//! llama.cpp, ollama and LM Studio load.
//!
//! Follows llama.cpp's `convert_hf_to_gguf.py` for the `llama` (which also covers Mistral),
//! `qwen2` and `qwen3` architectures: the same metadata keys, tensor names
//! (`blk.N.attn_q.weight`, Qwen2's `attn_q.bias`, Qwen3's `attn_q_norm.weight`...), the Q/K
//! row permutation of `llama` files (`LlamaModel.permute`, the inverse of what [`crate::gguf`]
//! undoes on import), llama3 rope as the `rope_freqs` tensor, norms and biases in F32, and the tokenizer as `tokenizer.ggml.*` (gpt2-style BPE: tokens in
//! their byte-level spelling, merges, token types, special ids) with `tokenizer.chat_template`.
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
use crate::gguf::{GgufArch, permute_qk_rows};
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
        ModelType::Phi3 => {
            return fail(
                "GGUF export of phi3 is not supported yet (its fused projections and LongRoPE factors have no writer in whet)".into(),
            );
        }
        ModelType::Gemma3 => {
            return fail(
                "GGUF export of gemma3_text is not supported yet: Gemma's SentencePiece tokenizer has no GGUF writer in whet (the weights would map; the vocabulary would not)".into(),
            );
        }
    };
    if cfg.o_bias() || cfg.mlp_bias || (cfg.qkv_bias() && arch != GgufArch::Qwen2) {
        return fail(format!(
            "attention or MLP biases have no place in {}'s GGUF layout",
            arch.name()
        ));
    }
    let rope_freqs = match cfg.rope_kind() {
        RopeKind::Default | RopeKind::Linear { .. } => None,
        RopeKind::Llama3 { .. } if arch == GgufArch::Llama => Some(llama3_rope_factors(cfg)),
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
    metadata.extend(tokenizer_metadata(tokenizer_dir)?);

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
        let hf = |s: &str| format!("model.layers.{i}.{s}");
        let gg = |s: &str| format!("blk.{i}.{s}");
        add(gg("attn_norm.weight"), &hf("input_layernorm.weight"), None)?;
        add(gg("attn_q.weight"), &hf("self_attn.q_proj.weight"), nh)?;
        add(gg("attn_k.weight"), &hf("self_attn.k_proj.weight"), nkv)?;
        add(gg("attn_v.weight"), &hf("self_attn.v_proj.weight"), None)?;
        if arch == GgufArch::Qwen2 {
            for p in ["q", "k", "v"] {
                add(
                    gg(&format!("attn_{p}.bias")),
                    &hf(&format!("self_attn.{p}_proj.bias")),
                    None,
                )?;
            }
        }
        if cfg.qk_norm() {
            add(
                gg("attn_q_norm.weight"),
                &hf("self_attn.q_norm.weight"),
                None,
            )?;
            add(
                gg("attn_k_norm.weight"),
                &hf("self_attn.k_norm.weight"),
                None,
            )?;
        }
        add(
            gg("attn_output.weight"),
            &hf("self_attn.o_proj.weight"),
            None,
        )?;
        add(
            gg("ffn_norm.weight"),
            &hf("post_attention_layernorm.weight"),
            None,
        )?;
        add(gg("ffn_gate.weight"), &hf("mlp.gate_proj.weight"), None)?;
        add(gg("ffn_up.weight"), &hf("mlp.up_proj.weight"), None)?;
        add(gg("ffn_down.weight"), &hf("mlp.down_proj.weight"), None)?;
    }
    add("output_norm.weight".into(), "model.norm.weight", None)?;
    if !cfg.tie_word_embeddings {
        add("output.weight".into(), "lm_head.weight", None)?;
    }
    if let Some(factors) = rope_freqs {
        let n = factors.len();
        let t = Tensor::from_vec(factors, n, &candle_core::Device::Cpu)?;
        let q = QTensor::quantize(&t, GgmlDType::F32)?;
        *types.entry(crate::quant::name(q.dtype())).or_default() += 1;
        tensors.push(("rope_freqs.weight".into(), q));
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
        (format!("{a}.rope.dimension_count"), u(cfg.head_dim())),
        (format!("{a}.vocab_size"), u(cfg.vocab_size)),
    ];
    if arch != GgufArch::Llama || cfg.head_dim() * cfg.num_attention_heads != cfg.hidden_size {
        m.push((format!("{a}.attention.key_length"), u(cfg.head_dim())));
        m.push((format!("{a}.attention.value_length"), u(cfg.head_dim())));
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
/// `pre_tokenizer`: plain byte-level is GPT-2's regex (`gpt2`); a Split + ByteLevel sequence
/// is named by its regex, the inverse of the table the importer uses.
fn pre_name(pre: &Json, path: &Path) -> Result<&'static str> {
    let kind = pre.get("type").and_then(Json::as_str).unwrap_or("");
    if kind == "ByteLevel" && pre.get("use_regex").and_then(Json::as_bool) != Some(false) {
        return Ok("gpt2");
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

/// `tokenizer.ggml.*` and `tokenizer.chat_template` from an HF tokenizer (byte-level BPE).
fn tokenizer_metadata(dir: &Path) -> Result<Vec<(String, Value)>> {
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
        return Err(bad(
            "model.type",
            "only BPE tokenizers export to GGUF's gpt2 tokenizer model".into(),
        ));
    }
    let pre = pre_name(tok.get("pre_tokenizer").unwrap_or(&Json::Null), &tok_path)?;

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
            return Err(bad(
                &format!("added_tokens[{i}]"),
                "needs an integer `id` and a string `content`".into(),
            ));
        };
        by_id.insert(id, content.to_string());
        let special = a.get("special").and_then(Json::as_bool).unwrap_or(false);
        // llama.cpp token types: 1 normal, 3 control, 4 user-defined.
        types.insert(id, if special { 3 } else { 4 });
    }
    let n = by_id.len();
    if by_id.keys().copied().ne(0..n as u64) {
        return Err(bad(
            "model.vocab",
            "token ids are not 0..N without gaps".into(),
        ));
    }
    let tokens: Vec<Value> = by_id.values().map(|t| Value::String(t.clone())).collect();
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

    let token_id = |field: &str| -> Option<u32> {
        let content = match tcfg.get(field)? {
            Json::String(s) => s.clone(),
            Json::Object(o) => o.get("content")?.as_str()?.to_string(),
            _ => return None,
        };
        by_id
            .iter()
            .find(|(_, t)| **t == content)
            .map(|(id, _)| *id as u32)
    };
    let mut m = vec![
        (
            "tokenizer.ggml.model".to_string(),
            Value::String("gpt2".into()),
        ),
        ("tokenizer.ggml.pre".to_string(), Value::String(pre.into())),
        ("tokenizer.ggml.tokens".to_string(), Value::Array(tokens)),
        (
            "tokenizer.ggml.token_type".to_string(),
            Value::Array(token_types),
        ),
        ("tokenizer.ggml.merges".to_string(), Value::Array(merges)),
    ];
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
        if let Some(b) = tcfg.get(field).and_then(Json::as_bool) {
            m.push((key.to_string(), Value::Bool(b)));
        }
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pre_tokenizer_names_invert_the_importer() {
        let p = Path::new("tokenizer.json");
        let plain =
            serde_json::json!({"type": "ByteLevel", "add_prefix_space": false, "use_regex": true});
        assert_eq!(pre_name(&plain, p).unwrap(), "gpt2");
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
    fn ftype_of_each_whole_file_type_is_llama_cpps() {
        assert_eq!(file_type(GgmlDType::F16), 1);
        assert_eq!(file_type(GgmlDType::Q8_0), 7);
        assert_eq!(file_type(GgmlDType::Q4_0), 2);
        assert_eq!(file_type(GgmlDType::Q4K), 15);
    }
}
