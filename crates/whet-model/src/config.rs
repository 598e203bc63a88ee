//! `config.json` as Hugging Face writes it for the decoders whet implements: `llama` (SmolLM,
//! TinyLlama, Llama 2/3/3.2), `mistral`, `qwen2`, `qwen3`, `gemma3_text` (Gemma 3 270M, 1B) and
//! `phi3` (Phi-3/3.5/4-mini). The fields mirror transformers' `LlamaConfig`, `MistralConfig`,
//! `Qwen2Config`, `Qwen3Config`, `Gemma3TextConfig` and `Phi3Config`; unknown fields
//! (`architectures`, `torch_dtype`, Phi's dropout rates, which fine-tuning does not apply, ...)
//! are ignored. Values are checked by [`Config::validate`], which [`Config::from_file`] runs.

use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// The `model_type` values this crate implements.
pub const SUPPORTED_MODEL_TYPES: &[&str] =
    &["llama", "mistral", "qwen2", "qwen3", "gemma3_text", "phi3"];

/// Upper bounds on `config.json`'s sizes, far above every released Llama-family model (Llama 3
/// 405B: vocabulary 128256, hidden 16384, intermediate 53248, 126 layers, 128 heads of 128) and
/// low enough that no shape product overflows and nothing sized from them is absurd.
pub mod limits {
    pub const VOCAB_SIZE: usize = 1 << 24;
    pub const HIDDEN_SIZE: usize = 1 << 17;
    pub const INTERMEDIATE_SIZE: usize = 1 << 20;
    pub const LAYERS: usize = 1 << 12;
    pub const HEADS: usize = 1 << 12;
    pub const HEAD_DIM: usize = 1 << 12;
    /// `num_attention_heads * head_dim` (the rows of q_proj).
    pub const ATTENTION_WIDTH: usize = 1 << 20;
    pub const POSITIONS: usize = 1 << 24;
    /// `rope_theta`: at least 1 (below, the rotary frequencies grow with the pair index).
    pub const ROPE_THETA: (f64, f64) = (1.0, 1e15);
}

/// The architecture a [`Config`] names, after validation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ModelType {
    Llama,
    Mistral,
    Qwen2,
    /// Qwen2 without q/k/v bias, with per-head q/k RMSNorm.
    Qwen3,
    /// Gemma 3's text decoder: `(1 + w)` RMSNorms around attention and MLP, GeGLU, q/k norms,
    /// scaled embeddings, local sliding-window layers between global ones.
    Gemma3,
    /// Phi-3/3.5/4-mini: Llama with fused `qkv_proj` and `gate_up_proj`, LongRoPE, partial
    /// rotary, an optional sliding window on every layer.
    Phi3,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Config {
    pub model_type: String,
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    /// Grouped-query attention; absent means `num_attention_heads` (multi-head attention).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub num_key_value_heads: Option<usize>,
    /// Absent means `hidden_size / num_attention_heads`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub head_dim: Option<usize>,
    #[serde(default = "default_rms_norm_eps")]
    pub rms_norm_eps: f64,
    /// transformers < 5 keeps theta here; >= 5 moves it into `rope_parameters`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rope_theta: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rope_scaling: Option<RopeScaling>,
    /// transformers >= 5 spelling of `rope_theta` + `rope_scaling`; wins when present.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rope_parameters: Option<RopeParameters>,
    #[serde(default = "default_max_position_embeddings")]
    pub max_position_embeddings: usize,
    /// Phi-3: the pretraining context, which LongRoPE scales from (4096 when absent); it wins
    /// over the same key inside `rope_scaling` / `rope_parameters`, as in transformers.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub original_max_position_embeddings: Option<usize>,
    /// The fraction of each head's dimensions that rotate (Phi-4-mini: 0.75); the rest pass
    /// through. transformers 5 may write it inside `rope_parameters` instead.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub partial_rotary_factor: Option<f64>,
    #[serde(default)]
    pub tie_word_embeddings: bool,
    /// Llama only: bias on q/k/v/o projections. Qwen2 always has q/k/v bias (and none on o);
    /// Mistral never has any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub attention_bias: Option<bool>,
    /// Llama only; `true` is rejected by [`Config::validate`].
    #[serde(default)]
    pub mlp_bias: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bos_token_id: Option<u32>,
    /// One id, or a list (Llama 3 instruct stops at several).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub eos_token_id: Option<TokenIds>,
    #[serde(default = "default_hidden_act")]
    pub hidden_act: String,
    /// Sliding-window attention (keys): every Mistral layer, Gemma 3's local layers, Qwen's
    /// with `use_sliding_window` ([`Config::layer_attention`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sliding_window: Option<usize>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub use_sliding_window: Option<bool>,
    /// Qwen2/Qwen3 with `use_sliding_window`: layers from this index on use the window.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_window_layers: Option<usize>,
    /// Per layer, `"full_attention"` or `"sliding_attention"` (transformers >= 4.53).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub layer_types: Option<Vec<String>>,
    /// Gemma 3 before `layer_types`: every `n`-th layer is global, the others local.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sliding_window_pattern: Option<usize>,
    /// The same under the name transformers >= 4.53 writes (it also writes `layer_types`).
    #[serde(
        default,
        rename = "_sliding_window_pattern",
        skip_serializing_if = "Option::is_none"
    )]
    pub sliding_window_pattern_: Option<usize>,
    /// Gemma 3: the rotary base of the local (sliding-window) layers.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rope_local_base_freq: Option<f64>,
    /// Gemma 3: attention scores are scaled by `query_pre_attn_scalar ** -0.5`. Written as an
    /// integer when it is one (transformers' config class insists on an int).
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        serialize_with = "integer_if_whole"
    )]
    pub query_pre_attn_scalar: Option<f64>,
    /// Gemma's spelling of `hidden_act`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hidden_activation: Option<String>,
    /// Gemma 2's tanh caps; must be absent (null) for the models whet implements.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub final_logit_softcapping: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub attn_logit_softcapping: Option<f64>,
    /// EmbeddingGemma's encoder mode; must be absent or false.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub use_bidirectional_attention: Option<bool>,
}

/// `rope_parameters`: one set for every layer, or (Gemma 3 in transformers >= 5) one per
/// layer type, `full_attention` and `sliding_attention`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum RopeParameters {
    PerLayerType(std::collections::BTreeMap<String, RopeScaling>),
    One(RopeScaling),
}

/// Which attention a decoder layer runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LayerAttention {
    /// Causal over the whole document.
    Full,
    /// Causal over the `window` latest keys (`Config::sliding_window`).
    Sliding,
}

/// [`Error::InvalidConfig`] for `field` of the config at `path`.
fn invalid_value(path: &Path, field: &str, found: String, expected: String) -> Error {
    Error::InvalidConfig {
        path: path.to_path_buf(),
        field: field.to_string(),
        found,
        expected,
    }
}

fn integer_if_whole<S: serde::Serializer>(
    v: &Option<f64>,
    s: S,
) -> std::result::Result<S::Ok, S::Error> {
    match v {
        Some(x) if x.fract() == 0.0 && x.abs() < 9e15 => s.serialize_some(&(*x as i64)),
        other => other.serialize(s),
    }
}

fn default_rms_norm_eps() -> f64 {
    1e-6
}
fn default_max_position_embeddings() -> usize {
    2048
}
fn default_hidden_act() -> String {
    "silu".to_string()
}

/// `eos_token_id`: an int or a list of ints.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum TokenIds {
    One(u32),
    Many(Vec<u32>),
}

/// `rope_scaling` / `rope_parameters`. Only the `default`, `linear` and `llama3` rope types
/// exist here; any other type (`dynamic`, `yarn`, `longrope`, ...) is a deserialization error
/// naming the field.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(try_from = "RopeRaw", into = "RopeRaw")]
pub struct RopeScaling {
    /// Only in transformers >= 5 `rope_parameters`.
    pub rope_theta: Option<f64>,
    /// Only in transformers >= 5 `rope_parameters` (Phi-4-mini).
    pub partial_rotary_factor: Option<f64>,
    pub kind: RopeKind,
}

#[derive(Debug, Clone, PartialEq)]
pub enum RopeKind {
    Default,
    /// Position interpolation (HF `_compute_linear_scaling_rope_parameters`): frequencies / factor.
    Linear {
        factor: f64,
    },
    /// Llama 3.1 frequency-dependent scaling (HF `_compute_llama3_parameters`).
    Llama3 {
        factor: f64,
        low_freq_factor: f64,
        high_freq_factor: f64,
        original_max_position_embeddings: usize,
    },
    /// LongRoPE (Phi-3.5, Phi-4-mini; HF `_compute_longrope_parameters`): per-frequency
    /// divisors, `short_factor` while every position is within the original context, else
    /// `long_factor`; cos and sin are scaled by the attention factor.
    LongRope {
        short_factor: Vec<f64>,
        long_factor: Vec<f64>,
        /// Absent: `max_position_embeddings / original_max_position_embeddings`.
        factor: Option<f64>,
        /// Absent: `sqrt(1 + ln(factor) / ln(original))`, 1 when `factor <= 1`.
        attention_factor: Option<f64>,
        /// Phi-3 reads the config's top-level key first ([`Config::rope_original_context`]).
        original_max_position_embeddings: Option<usize>,
    },
}

/// The JSON object as written; older files say `type`, newer `rope_type`, some both.
#[derive(Serialize, Deserialize)]
struct RopeRaw {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    rope_type: Option<String>,
    #[serde(default, rename = "type", skip_serializing_if = "Option::is_none")]
    type_: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    rope_theta: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    factor: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    low_freq_factor: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    high_freq_factor: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    original_max_position_embeddings: Option<usize>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    short_factor: Option<Vec<f64>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    long_factor: Option<Vec<f64>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    attention_factor: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    partial_rotary_factor: Option<f64>,
}

impl TryFrom<RopeRaw> for RopeScaling {
    type Error = String;

    fn try_from(raw: RopeRaw) -> std::result::Result<Self, String> {
        let ty = raw
            .rope_type
            .or(raw.type_)
            .unwrap_or_else(|| "default".to_string());
        let kind = match ty.as_str() {
            "default" => RopeKind::Default,
            "linear" => match raw.factor {
                Some(factor) if factor.is_finite() && factor > 0.0 => RopeKind::Linear { factor },
                other => {
                    return Err(format!(
                        "rope type `linear` needs a finite `factor` > 0, found {other:?}"
                    ));
                }
            },
            "llama3" => {
                let need = |v: Option<f64>, name: &str| {
                    v.ok_or_else(|| format!("rope type `llama3` needs `{name}`"))
                };
                let factor = need(raw.factor, "factor")?;
                let low_freq_factor = need(raw.low_freq_factor, "low_freq_factor")?;
                let high_freq_factor = need(raw.high_freq_factor, "high_freq_factor")?;
                let original_max_position_embeddings = raw
                    .original_max_position_embeddings
                    .ok_or("rope type `llama3` needs `original_max_position_embeddings`")?;
                if let Some(theta) = raw.rope_theta
                    && !theta.is_finite()
                {
                    return Err(format!("rope_theta must be a finite number, found {theta}"));
                }
                let finite = [factor, low_freq_factor, high_freq_factor]
                    .iter()
                    .all(|v| v.is_finite());
                if !finite
                    || factor <= 0.0
                    || low_freq_factor <= 0.0
                    || high_freq_factor <= low_freq_factor
                    || original_max_position_embeddings == 0
                {
                    return Err(format!(
                        "rope type `llama3` needs finite factor > 0, high_freq_factor > low_freq_factor > 0 and original_max_position_embeddings > 0, found factor {factor}, low {low_freq_factor}, high {high_freq_factor}, original_max_position_embeddings {original_max_position_embeddings}"
                    ));
                }
                RopeKind::Llama3 {
                    factor,
                    low_freq_factor,
                    high_freq_factor,
                    original_max_position_embeddings,
                }
            }
            // `su` is LongRoPE's first name (Phi-3-mini-128k's early config.json).
            "longrope" | "su" => {
                let factors = |v: Option<Vec<f64>>, name: &str| match v {
                    Some(v) if !v.is_empty() && v.iter().all(|f| f.is_finite() && *f > 0.0) => {
                        Ok(v)
                    }
                    Some(_) => Err(format!(
                        "rope type `longrope` needs `{name}` to be a list of finite numbers > 0"
                    )),
                    None => Err(format!("rope type `longrope` needs `{name}`")),
                };
                let short_factor = factors(raw.short_factor, "short_factor")?;
                let long_factor = factors(raw.long_factor, "long_factor")?;
                for (name, v) in [
                    ("factor", raw.factor),
                    ("attention_factor", raw.attention_factor),
                ] {
                    if let Some(v) = v
                        && !(v.is_finite() && v > 0.0)
                    {
                        return Err(format!(
                            "rope type `longrope` needs a finite `{name}` > 0, found {v}"
                        ));
                    }
                }
                if raw.original_max_position_embeddings == Some(0) {
                    return Err(
                        "rope type `longrope` needs original_max_position_embeddings > 0".into(),
                    );
                }
                RopeKind::LongRope {
                    short_factor,
                    long_factor,
                    factor: raw.factor,
                    attention_factor: raw.attention_factor,
                    original_max_position_embeddings: raw.original_max_position_embeddings,
                }
            }
            other => {
                return Err(format!(
                    "rope type `{other}` is not supported; supported: default, linear, llama3, longrope (phi3)"
                ));
            }
        };
        if let Some(p) = raw.partial_rotary_factor
            && !(p.is_finite() && p > 0.0 && p <= 1.0)
        {
            return Err(format!(
                "partial_rotary_factor must be a number in (0, 1], found {p}"
            ));
        }
        Ok(RopeScaling {
            rope_theta: raw.rope_theta,
            partial_rotary_factor: raw.partial_rotary_factor,
            kind,
        })
    }
}

impl From<RopeScaling> for RopeRaw {
    fn from(r: RopeScaling) -> Self {
        let mut raw = RopeRaw {
            rope_type: Some("default".to_string()),
            type_: None,
            rope_theta: r.rope_theta,
            factor: None,
            low_freq_factor: None,
            high_freq_factor: None,
            original_max_position_embeddings: None,
            short_factor: None,
            long_factor: None,
            attention_factor: None,
            partial_rotary_factor: r.partial_rotary_factor,
        };
        if let RopeKind::LongRope {
            short_factor,
            long_factor,
            factor,
            attention_factor,
            original_max_position_embeddings,
        } = r.kind
        {
            raw.rope_type = Some("longrope".to_string());
            raw.short_factor = Some(short_factor);
            raw.long_factor = Some(long_factor);
            raw.factor = factor;
            raw.attention_factor = attention_factor;
            raw.original_max_position_embeddings = original_max_position_embeddings;
            return raw;
        }
        if let RopeKind::Linear { factor } = r.kind {
            raw.rope_type = Some("linear".to_string());
            raw.factor = Some(factor);
        }
        if let RopeKind::Llama3 {
            factor,
            low_freq_factor,
            high_freq_factor,
            original_max_position_embeddings,
        } = r.kind
        {
            raw.rope_type = Some("llama3".to_string());
            raw.factor = Some(factor);
            raw.low_freq_factor = Some(low_freq_factor);
            raw.high_freq_factor = Some(high_freq_factor);
            raw.original_max_position_embeddings = Some(original_max_position_embeddings);
        }
        raw
    }
}

impl Config {
    /// Reads and validates `config.json`. Errors name the file and the field.
    pub fn from_file(path: &Path) -> Result<Config> {
        let text = std::fs::read_to_string(path).map_err(|e| match e.kind() {
            std::io::ErrorKind::NotFound => Error::MissingFile {
                path: path.to_path_buf(),
                what: "config.json",
                hint: "a Hugging Face model folder holds config.json next to the weights",
            },
            _ => Error::io(path, "read", e),
        })?;
        Config::from_json_str(&text, path)
    }

    /// Parses and validates config JSON; `path` only labels errors.
    pub fn from_json_str(text: &str, path: &Path) -> Result<Config> {
        let mut cfg: Config = crate::error::from_json_str(text, path)?;
        if cfg.model_type == "gemma3_text" {
            // `Gemma3TextConfig` ties the head by default, and transformers leaves out of
            // config.json the values equal to `PretrainedConfig`'s own default (true).
            let raw: serde_json::Value = crate::error::from_json_str(text, path)?;
            if raw.get("tie_word_embeddings").is_none() {
                cfg.tie_word_embeddings = true;
            }
        }
        cfg.validate(path)?;
        Ok(cfg)
    }

    /// Rejects what this crate does not implement; `path` labels the errors.
    pub fn validate(&self, path: &Path) -> Result<()> {
        let unsupported = |field: &'static str, found: String, expected: &str| {
            Err(Error::UnsupportedConfig {
                path: path.to_path_buf(),
                field,
                found,
                expected: expected.to_string(),
            })
        };
        let ty = self.model_type_checked(path)?;
        self.validate_ranges(path)?;
        if ty == ModelType::Gemma3 {
            let act = self
                .hidden_activation
                .as_deref()
                .unwrap_or("gelu_pytorch_tanh");
            if act != "gelu_pytorch_tanh" {
                return unsupported(
                    "hidden_activation",
                    format!("{act:?}"),
                    "\"gelu_pytorch_tanh\" (Gemma 3's GeGLU)",
                );
            }
        } else if self.hidden_act != "silu" {
            return unsupported("hidden_act", format!("{:?}", self.hidden_act), "\"silu\"");
        }
        for (field, v) in [
            ("final_logit_softcapping", self.final_logit_softcapping),
            ("attn_logit_softcapping", self.attn_logit_softcapping),
        ] {
            if let Some(v) = v {
                return unsupported(
                    field,
                    v.to_string(),
                    "null: soft-capping is not implemented",
                );
            }
        }
        if self.use_bidirectional_attention == Some(true) {
            return unsupported(
                "use_bidirectional_attention",
                "true".into(),
                "false: whet trains causal language models",
            );
        }
        self.validate_layer_attention(path)?;
        self.validate_rotary(path, ty)?;
        if self.mlp_bias {
            return unsupported(
                "mlp_bias",
                "true".into(),
                "false: MLP biases are not implemented",
            );
        }
        let heads = self.num_attention_heads;
        let kv = self.num_kv_heads();
        if heads == 0 || kv == 0 || !heads.is_multiple_of(kv) {
            return unsupported(
                "num_key_value_heads",
                kv.to_string(),
                &format!("a positive divisor of num_attention_heads = {heads}"),
            );
        }
        if self.head_dim.is_none() && !self.hidden_size.is_multiple_of(heads) {
            return unsupported(
                "num_attention_heads",
                heads.to_string(),
                &format!(
                    "a divisor of hidden_size = {} (or set head_dim)",
                    self.hidden_size
                ),
            );
        }
        let d = self.head_dim();
        if d == 0 || !d.is_multiple_of(2) {
            return unsupported(
                "head_dim",
                d.to_string(),
                "a positive even number (rotary pairs)",
            );
        }
        for (field, v) in [
            ("vocab_size", self.vocab_size),
            ("hidden_size", self.hidden_size),
            ("intermediate_size", self.intermediate_size),
        ] {
            if v == 0 {
                return unsupported(field, "0".into(), "a positive size");
            }
        }
        Ok(())
    }

    /// Sizes within [`limits`] whose shape products do not overflow, finite positive floats.
    fn validate_ranges(&self, path: &Path) -> Result<()> {
        let invalid = |field: &str, found: String, expected: String| {
            Err(invalid_value(path, field, found, expected))
        };
        for (field, v, max) in [
            ("vocab_size", Some(self.vocab_size), limits::VOCAB_SIZE),
            ("hidden_size", Some(self.hidden_size), limits::HIDDEN_SIZE),
            (
                "intermediate_size",
                Some(self.intermediate_size),
                limits::INTERMEDIATE_SIZE,
            ),
            (
                "num_hidden_layers",
                Some(self.num_hidden_layers),
                limits::LAYERS,
            ),
            (
                "num_attention_heads",
                Some(self.num_attention_heads),
                limits::HEADS,
            ),
            (
                "num_key_value_heads",
                self.num_key_value_heads,
                limits::HEADS,
            ),
            // Stated or derived (hidden / heads): rope tables and caches are sized from it
            // (whet-fuzz found a config.json of 200 bytes whose head size asked for 4 GiB).
            ("head_dim", Some(self.head_dim()), limits::HEAD_DIM),
            (
                "max_position_embeddings",
                Some(self.max_position_embeddings),
                limits::POSITIONS,
            ),
        ] {
            if let Some(v) = v
                && v > max
            {
                return invalid(field, v.to_string(), format!("at most {max}"));
            }
        }
        if self.max_position_embeddings == 0 {
            return invalid(
                "max_position_embeddings",
                "0".into(),
                "a positive number of positions".into(),
            );
        }
        let d = self.head_dim();
        match self.num_attention_heads.checked_mul(d) {
            Some(w) if w <= limits::ATTENTION_WIDTH => {}
            _ => {
                return invalid(
                    "head_dim",
                    d.to_string(),
                    format!(
                        "num_attention_heads ({}) * head_dim at most {}",
                        self.num_attention_heads,
                        limits::ATTENTION_WIDTH
                    ),
                );
            }
        }
        let eps = self.rms_norm_eps;
        if !(eps.is_finite() && eps > 0.0 && eps < 1.0) {
            return invalid(
                "rms_norm_eps",
                eps.to_string(),
                "a finite number in (0, 1), such as 1e-5".into(),
            );
        }
        let (field, theta) = match self
            .rope_parameters_for(LayerAttention::Full)
            .and_then(|r| r.rope_theta)
        {
            Some(t) => ("rope_parameters.rope_theta", t),
            None => ("rope_theta", self.rope_base()),
        };
        let (lo, hi) = limits::ROPE_THETA;
        if !(theta.is_finite() && (lo..=hi).contains(&theta)) {
            return invalid(
                field,
                theta.to_string(),
                format!("a finite number in [{lo}, {hi:e}], such as 10000"),
            );
        }
        Ok(())
    }

    /// `layer_types`, the window and the Gemma 3 layer pattern agree with the layer count.
    fn validate_layer_attention(&self, path: &Path) -> Result<()> {
        let invalid = |field: &str, found: String, expected: String| {
            Err(invalid_value(path, field, found, expected))
        };
        if let Some(types) = &self.layer_types {
            if types.len() != self.num_hidden_layers {
                return invalid(
                    "layer_types",
                    format!("{} entries", types.len()),
                    format!(
                        "one per layer (num_hidden_layers = {})",
                        self.num_hidden_layers
                    ),
                );
            }
            if let Some((i, t)) = types
                .iter()
                .enumerate()
                .find(|(_, t)| !matches!(t.as_str(), "full_attention" | "sliding_attention"))
            {
                return invalid(
                    &format!("layer_types[{i}]"),
                    format!("{t:?}"),
                    "\"full_attention\" or \"sliding_attention\"".into(),
                );
            }
        }
        if self.sliding_window_pattern == Some(0) || self.sliding_window_pattern_ == Some(0) {
            return invalid(
                "sliding_window_pattern",
                "0".into(),
                "a positive layer count".into(),
            );
        }
        let sliding =
            (0..self.num_hidden_layers).any(|i| self.layer_attention(i) == LayerAttention::Sliding);
        if sliding && self.sliding_window.is_none_or(|w| w == 0) {
            return invalid(
                "sliding_window",
                format!("{:?}", self.sliding_window),
                "a positive number of keys: some layers use sliding-window attention".into(),
            );
        }
        if let Some(q) = self.query_pre_attn_scalar
            && !(q.is_finite() && q > 0.0)
        {
            return invalid(
                "query_pre_attn_scalar",
                q.to_string(),
                "a finite number > 0, such as 256".into(),
            );
        }
        if let Some(theta) = self.rope_local_base_freq
            && !(theta.is_finite()
                && (limits::ROPE_THETA.0..=limits::ROPE_THETA.1).contains(&theta))
        {
            return invalid(
                "rope_local_base_freq",
                theta.to_string(),
                "a finite number in [1, 1e15], such as 10000".into(),
            );
        }
        Ok(())
    }

    /// Partial rotary and LongRoPE: a whole, even number of rotated dimensions per head and one
    /// factor per rotated pair; LongRoPE only where transformers runs it (Phi-3).
    fn validate_rotary(&self, path: &Path, ty: ModelType) -> Result<()> {
        let invalid = |field: &str, found: String, expected: String| {
            Err(invalid_value(path, field, found, expected))
        };
        if let Some(p) = self.partial_rotary_factor
            && !(p.is_finite() && p > 0.0 && p <= 1.0)
        {
            return invalid(
                "partial_rotary_factor",
                p.to_string(),
                "a number in (0, 1], such as 0.75".into(),
            );
        }
        let (d, r) = (self.head_dim(), self.rotary_dim());
        if r < 2 || !r.is_multiple_of(2) {
            return invalid(
                "partial_rotary_factor",
                self.partial_rotary_factor().to_string(),
                format!(
                    "a fraction of head_dim = {d} that leaves a positive even number of rotated dimensions (got {r})"
                ),
            );
        }
        if r != d && ty != ModelType::Phi3 {
            return Err(Error::UnsupportedConfig {
                path: path.to_path_buf(),
                field: "partial_rotary_factor",
                found: self.partial_rotary_factor().to_string(),
                expected: format!(
                    "1 for model_type \"{}\" (partial rotary: phi3 only)",
                    self.model_type
                ),
            });
        }
        let RopeKind::LongRope {
            short_factor,
            long_factor,
            ..
        } = self.rope_kind()
        else {
            return Ok(());
        };
        if ty != ModelType::Phi3 {
            return Err(Error::UnsupportedConfig {
                path: path.to_path_buf(),
                field: "rope_scaling",
                found: "rope_type \"longrope\"".into(),
                expected: format!(
                    "default, linear or llama3 for model_type \"{}\" (longrope: phi3 only)",
                    self.model_type
                ),
            });
        }
        for (field, v) in [("short_factor", short_factor), ("long_factor", long_factor)] {
            if v.len() != r / 2 {
                return invalid(
                    &format!("rope_scaling.{field}"),
                    format!("{} values", v.len()),
                    format!("one per rotated pair: rotary_dim / 2 = {}", r / 2),
                );
            }
        }
        let original = self.rope_original_context();
        if original < 2 {
            return invalid(
                "original_max_position_embeddings",
                original.to_string(),
                "the pretraining context, at least 2 positions".into(),
            );
        }
        let a = self.rope_attention_factor();
        if !(a.is_finite() && a > 0.0) {
            return invalid(
                "rope_scaling.attention_factor",
                a.to_string(),
                "a finite number > 0".into(),
            );
        }
        Ok(())
    }

    fn model_type_checked(&self, path: &Path) -> Result<ModelType> {
        match self.model_type.as_str() {
            "llama" => Ok(ModelType::Llama),
            "mistral" => Ok(ModelType::Mistral),
            "qwen2" => Ok(ModelType::Qwen2),
            "qwen3" => Ok(ModelType::Qwen3),
            "gemma3_text" => Ok(ModelType::Gemma3),
            "phi3" => Ok(ModelType::Phi3),
            other => Err(Error::UnsupportedModelType {
                path: path.to_path_buf(),
                found: other.to_string(),
                supported: SUPPORTED_MODEL_TYPES,
            }),
        }
    }

    /// The architecture. Falls back to `Llama` for a config that was never validated.
    pub fn model_type(&self) -> ModelType {
        self.model_type_checked(Path::new("config.json"))
            .unwrap_or(ModelType::Llama)
    }

    pub fn num_kv_heads(&self) -> usize {
        self.num_key_value_heads.unwrap_or(self.num_attention_heads)
    }

    pub fn head_dim(&self) -> usize {
        self.head_dim
            .unwrap_or(self.hidden_size / self.num_attention_heads.max(1))
    }

    /// `(out, in)` of a decoder linear of this architecture by its module name
    /// ([`Config::linear_modules`]), as `Attention::load` and `Mlp::load` build them; `None`
    /// for a name this architecture does not have.
    pub fn linear_shape(&self, module: &str) -> Option<(usize, usize)> {
        if !self.linear_modules().contains(&module) {
            return None;
        }
        let (h, d) = (self.hidden_size, self.head_dim());
        let q = self.num_attention_heads.saturating_mul(d);
        let kv = self.num_kv_heads().saturating_mul(d);
        let i = self.intermediate_size;
        Some(match module {
            "q_proj" => (q, h),
            "k_proj" | "v_proj" => (kv, h),
            "qkv_proj" => (q.saturating_add(kv.saturating_mul(2)), h),
            "o_proj" => (h, q),
            "gate_proj" | "up_proj" => (i, h),
            "gate_up_proj" => (i.saturating_mul(2), h),
            "down_proj" => (h, i),
            _ => return None,
        })
    }

    /// Phi-3's layout: one `qkv_proj` for q, k and v, one `gate_up_proj` for the MLP's gate and
    /// up projections (in that order along the output).
    pub fn fused_projections(&self) -> bool {
        self.model_type() == ModelType::Phi3
    }

    /// The decoder's linear modules in model order: what LoRA's `all-linear` targets here.
    pub fn linear_modules(&self) -> &'static [&'static str] {
        if self.fused_projections() {
            &crate::lora::FUSED_LINEAR_MODULES
        } else {
            &crate::lora::LINEAR_MODULES
        }
    }

    /// Bias on q_proj, k_proj, v_proj.
    pub fn qkv_bias(&self) -> bool {
        match self.model_type() {
            // HF `Qwen2Attention`: `nn.Linear(..., bias=True)` for q/k/v, hard-coded.
            ModelType::Qwen2 => true,
            // `Qwen3Attention`, `Gemma3Attention`: `bias=config.attention_bias` on all four.
            ModelType::Llama | ModelType::Qwen3 | ModelType::Gemma3 => {
                self.attention_bias.unwrap_or(false)
            }
            // `Phi3Attention`: `qkv_proj` and `o_proj` without bias.
            ModelType::Mistral | ModelType::Phi3 => false,
        }
    }

    /// Bias on o_proj.
    pub fn o_bias(&self) -> bool {
        match self.model_type() {
            ModelType::Qwen2 | ModelType::Mistral | ModelType::Phi3 => false,
            // HF `LlamaAttention`: `o_proj = nn.Linear(..., bias=config.attention_bias)`.
            ModelType::Llama | ModelType::Qwen3 | ModelType::Gemma3 => {
                self.attention_bias.unwrap_or(false)
            }
        }
    }

    /// RMSNorm over each head of q and k before rope (Qwen3, Gemma 3).
    pub fn qk_norm(&self) -> bool {
        matches!(self.model_type(), ModelType::Qwen3 | ModelType::Gemma3)
    }

    /// Gemma's layout: RMSNorms scale by `1 + w` (weights start at 0), the attention and MLP
    /// outputs are normed before the residual add, embeddings are scaled by `sqrt(hidden)`,
    /// the MLP is GeGLU.
    pub fn is_gemma(&self) -> bool {
        self.model_type() == ModelType::Gemma3
    }

    /// The attention score scale: `query_pre_attn_scalar ** -0.5` for Gemma 3, else
    /// `head_dim ** -0.5`.
    pub fn attention_scale(&self) -> f64 {
        match (self.model_type(), self.query_pre_attn_scalar) {
            (ModelType::Gemma3, Some(q)) => 1.0 / q.sqrt(),
            _ => 1.0 / (self.head_dim() as f64).sqrt(),
        }
    }

    /// Which attention layer `i` runs: `layer_types` when given, else Gemma 3's pattern (every
    /// `sliding_window_pattern`-th layer global, 6 by default), Mistral's window on every layer,
    /// and Qwen's `use_sliding_window` from `max_window_layers` on (transformers' rules).
    pub fn layer_attention(&self, i: usize) -> LayerAttention {
        use LayerAttention::{Full, Sliding};
        if let Some(types) = &self.layer_types {
            return match types.get(i).map(String::as_str) {
                Some("sliding_attention") => Sliding,
                _ => Full,
            };
        }
        match self.model_type() {
            ModelType::Gemma3 => {
                let n = self
                    .sliding_window_pattern
                    .or(self.sliding_window_pattern_)
                    .unwrap_or(6)
                    .max(1);
                if (i + 1).is_multiple_of(n) {
                    Full
                } else {
                    Sliding
                }
            }
            // Phi-3 (`Phi3Attention` passes `sliding_window` on every layer), like Mistral.
            ModelType::Mistral | ModelType::Phi3 if self.sliding_window.is_some() => Sliding,
            ModelType::Qwen2 | ModelType::Qwen3
                if self.use_sliding_window == Some(true)
                    && i >= self.max_window_layers.unwrap_or(0) =>
            {
                Sliding
            }
            _ => Full,
        }
    }

    /// The key window of layer `i` (`None`: the whole document).
    pub fn layer_window(&self, i: usize) -> Option<usize> {
        match self.layer_attention(i) {
            LayerAttention::Full => None,
            LayerAttention::Sliding => self.sliding_window,
        }
    }

    /// All end-of-sequence ids (empty when the config names none).
    pub fn eos_token_ids(&self) -> Vec<u32> {
        match &self.eos_token_id {
            None => vec![],
            Some(TokenIds::One(id)) => vec![*id],
            Some(TokenIds::Many(ids)) => ids.clone(),
        }
    }

    /// The `rope_parameters` entry for one attention kind: the single set (Gemma 3: of its
    /// global layers only), or the set of its layer type.
    fn rope_parameters_for(&self, kind: LayerAttention) -> Option<&RopeScaling> {
        match self.rope_parameters.as_ref()? {
            RopeParameters::One(_) if kind == LayerAttention::Sliding && self.is_gemma() => None,
            RopeParameters::One(r) => Some(r),
            RopeParameters::PerLayerType(m) => m.get(match kind {
                LayerAttention::Full => "full_attention",
                LayerAttention::Sliding => "sliding_attention",
            }),
        }
    }

    /// Whether the local layers have rotary tables of their own (Gemma 3).
    pub fn local_rope(&self) -> bool {
        self.is_gemma() || matches!(self.rope_parameters, Some(RopeParameters::PerLayerType(_)))
    }

    /// Rotary base of the global layers: `rope_parameters.rope_theta`, else `rope_theta`,
    /// else 10000 (Gemma 3: 1e6).
    pub fn rope_base(&self) -> f64 {
        self.rope_base_for(LayerAttention::Full)
    }

    /// Rotary base of one attention kind. Gemma 3's local layers: `rope_local_base_freq`
    /// (10000 by default), or `rope_parameters.sliding_attention.rope_theta`.
    pub fn rope_base_for(&self, kind: LayerAttention) -> f64 {
        let given = self.rope_parameters_for(kind).and_then(|r| r.rope_theta);
        match (kind, self.local_rope()) {
            (LayerAttention::Sliding, true) => {
                given.or(self.rope_local_base_freq).unwrap_or(10_000.0)
            }
            _ => given.or(self.rope_theta).unwrap_or(if self.is_gemma() {
                1_000_000.0
            } else {
                10_000.0
            }),
        }
    }

    /// The rope type in force on the global layers: `rope_parameters` when present, else
    /// `rope_scaling`.
    pub fn rope_kind(&self) -> RopeKind {
        self.rope_kind_for(LayerAttention::Full)
    }

    /// The rope type of one attention kind; Gemma 3's local layers never scale.
    pub fn rope_kind_for(&self, kind: LayerAttention) -> RopeKind {
        if kind == LayerAttention::Sliding && self.local_rope() {
            return self
                .rope_parameters_for(kind)
                .map(|r| r.kind.clone())
                .unwrap_or(RopeKind::Default);
        }
        self.rope_parameters_for(kind)
            .or(self.rope_scaling.as_ref())
            .map(|r| r.kind.clone())
            .unwrap_or(RopeKind::Default)
    }

    /// [`Config::inv_freq_for`] the global layers.
    pub fn inv_freq(&self) -> Vec<f32> {
        self.inv_freq_for(LayerAttention::Full)
    }

    /// The fraction of each head that rotates: `rope_parameters.partial_rotary_factor`, else
    /// the top-level `partial_rotary_factor`, else 1.
    pub fn partial_rotary_factor(&self) -> f64 {
        self.rope_parameters_for(LayerAttention::Full)
            .and_then(|r| r.partial_rotary_factor)
            .or(self.partial_rotary_factor)
            .unwrap_or(1.0)
    }

    /// The rotated dimensions of each head, `int(head_dim * partial_rotary_factor)` as in
    /// transformers; the first `rotary_dim` of q and k rotate, the others pass through.
    pub fn rotary_dim(&self) -> usize {
        (self.head_dim() as f64 * self.partial_rotary_factor()) as usize
    }

    /// The context LongRoPE scales from: Phi-3's top-level `original_max_position_embeddings`,
    /// which `Phi3Config` defaults to 4096 and which overrides the rope parameters' own key
    /// (transformers' `standardize_rope_params`).
    pub fn rope_original_context(&self) -> usize {
        self.original_max_position_embeddings.unwrap_or(4096)
    }

    /// LongRoPE's scale on cos and sin (1 for every other rope type): `attention_factor`, else
    /// `sqrt(1 + ln(factor) / ln(original))` with `factor` (default: `max_position_embeddings /
    /// original`) above 1, else 1 (HF `_compute_longrope_parameters`).
    pub fn rope_attention_factor(&self) -> f64 {
        let RopeKind::LongRope {
            factor,
            attention_factor,
            ..
        } = self.rope_kind()
        else {
            return 1.0;
        };
        let original = self.rope_original_context() as f64;
        let factor = factor.unwrap_or(self.max_position_embeddings as f64 / original);
        attention_factor.unwrap_or_else(|| {
            if factor <= 1.0 {
                1.0
            } else {
                (1.0 + factor.ln() / original.ln()).sqrt()
            }
        })
    }

    /// LongRoPE's frequencies for sequences past [`Config::rope_original_context`] (the
    /// `long_factor` divisors); `None` for every other rope type.
    pub fn inv_freq_long(&self) -> Option<Vec<f32>> {
        match self.rope_kind() {
            RopeKind::LongRope { long_factor, .. } => {
                Some(self.longrope_inv_freq(LayerAttention::Full, &long_factor))
            }
            _ => None,
        }
    }

    /// `1 / (ext_factors * base ** (arange(0, dim, 2).float() / dim))` in f32.
    fn longrope_inv_freq(&self, kind: LayerAttention, factors: &[f64]) -> Vec<f32> {
        let dim = self.rotary_dim();
        let base = self.rope_base_for(kind) as f32;
        (0..dim)
            .step_by(2)
            .zip(factors)
            .map(|(i, &f)| 1.0 / (f as f32 * base.powf(i as f32 / dim as f32)))
            .collect()
    }

    /// Rotary inverse frequencies, `rotary_dim / 2` values, computed in f32 like transformers'
    /// `_compute_default_rope_parameters`:
    /// `1 / base ** (arange(0, dim, 2).float() / dim)`, then for `linear` rope divided by the
    /// factor and for `llama3` rope `_compute_llama3_parameters` (`modeling_rope_utils.py`),
    /// line for line.
    pub fn inv_freq_for(&self, kind: LayerAttention) -> Vec<f32> {
        let dim = self.rotary_dim();
        let base = self.rope_base_for(kind) as f32;
        let inv: Vec<f32> = (0..dim)
            .step_by(2)
            .map(|i| 1.0 / base.powf(i as f32 / dim as f32))
            .collect();
        let (factor, low_freq_factor, high_freq_factor, original_max_position_embeddings) =
            match self.rope_kind_for(kind) {
                RopeKind::Default => return inv,
                // The short factors: [`Config::inv_freq_long`] has the others.
                RopeKind::LongRope { short_factor, .. } => {
                    return self.longrope_inv_freq(kind, &short_factor);
                }
                RopeKind::Linear { factor } => {
                    let factor = factor as f32;
                    return inv.into_iter().map(|f| f / factor).collect();
                }
                RopeKind::Llama3 {
                    factor,
                    low_freq_factor,
                    high_freq_factor,
                    original_max_position_embeddings,
                } => (
                    factor,
                    low_freq_factor,
                    high_freq_factor,
                    original_max_position_embeddings,
                ),
            };
        let (factor, low, high) = (
            factor as f32,
            low_freq_factor as f32,
            high_freq_factor as f32,
        );
        let old_context_len = original_max_position_embeddings as f32;
        let low_freq_wavelen = old_context_len / low;
        let high_freq_wavelen = old_context_len / high;
        inv.into_iter()
            .map(|f| {
                let wavelen = 2.0 * std::f32::consts::PI / f;
                // wavelen > low_freq_wavelen: divide by factor
                let f_llama = if wavelen > low_freq_wavelen {
                    f / factor
                } else {
                    f
                };
                // wavelen < high_freq_wavelen: keep; otherwise interpolate smoothly.
                // HF: `~(wavelen < high_freq_wavelen) * ~(wavelen > low_freq_wavelen)` (no NaN here).
                let is_medium = wavelen >= high_freq_wavelen && wavelen <= low_freq_wavelen;
                if is_medium {
                    let smooth = (old_context_len / wavelen - low) / (high - low);
                    (1.0 - smooth) * f_llama / factor + smooth * f_llama
                } else {
                    f_llama
                }
            })
            .collect()
    }
}
