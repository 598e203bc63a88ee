//! `config.json` as Hugging Face writes it for the Llama family: `llama` (SmolLM, TinyLlama,
//! Llama 2/3), `mistral` and `qwen2`. The fields mirror transformers' `LlamaConfig`,
//! `MistralConfig` and `Qwen2Config`; unknown fields (`architectures`, `torch_dtype`, ...) are
//! ignored. Values are checked by [`Config::validate`], which [`Config::from_file`] runs.

use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// The `model_type` values this crate implements.
pub const SUPPORTED_MODEL_TYPES: &[&str] = &["llama", "mistral", "qwen2"];

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
    pub rope_parameters: Option<RopeScaling>,
    #[serde(default = "default_max_position_embeddings")]
    pub max_position_embeddings: usize,
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
    /// Mistral / Qwen2 sliding-window attention. Ignored: whet trains at sequence lengths
    /// below the window (4096 for Mistral 7B v0.1; Qwen2 ships `use_sliding_window: false`),
    /// where the window changes nothing.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sliding_window: Option<usize>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub use_sliding_window: Option<bool>,
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

/// `rope_scaling` / `rope_parameters`. Only the `default` and `llama3` rope types exist here;
/// any other type (`linear`, `dynamic`, `yarn`, `longrope`, ...) is a deserialization error
/// naming the field.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(try_from = "RopeRaw", into = "RopeRaw")]
pub struct RopeScaling {
    /// Only in transformers >= 5 `rope_parameters`.
    pub rope_theta: Option<f64>,
    pub kind: RopeKind,
}

#[derive(Debug, Clone, PartialEq)]
pub enum RopeKind {
    Default,
    /// Llama 3.1 frequency-dependent scaling (HF `_compute_llama3_parameters`).
    Llama3 {
        factor: f64,
        low_freq_factor: f64,
        high_freq_factor: f64,
        original_max_position_embeddings: usize,
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
            other => {
                return Err(format!(
                    "rope type `{other}` is not supported; supported: default, llama3"
                ));
            }
        };
        Ok(RopeScaling {
            rope_theta: raw.rope_theta,
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
        };
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
        let cfg: Config = crate::error::from_json_str(text, path)?;
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
        self.model_type_checked(path)?;
        self.validate_ranges(path)?;
        if self.hidden_act != "silu" {
            return unsupported("hidden_act", format!("{:?}", self.hidden_act), "\"silu\"");
        }
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
            Err(Error::InvalidConfig {
                path: path.to_path_buf(),
                field: field.to_string(),
                found,
                expected,
            })
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
        let (field, theta) = match self.rope_parameters.as_ref().and_then(|r| r.rope_theta) {
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

    fn model_type_checked(&self, path: &Path) -> Result<ModelType> {
        match self.model_type.as_str() {
            "llama" => Ok(ModelType::Llama),
            "mistral" => Ok(ModelType::Mistral),
            "qwen2" => Ok(ModelType::Qwen2),
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

    /// `(out, in)` of a decoder linear by its module name ([`crate::LINEAR_MODULES`]), as
    /// `Attention::load` and `Mlp::load` build them.
    pub fn linear_shape(&self, module: &str) -> Option<(usize, usize)> {
        let (h, d) = (self.hidden_size, self.head_dim());
        let q = self.num_attention_heads.saturating_mul(d);
        let kv = self.num_kv_heads().saturating_mul(d);
        let i = self.intermediate_size;
        Some(match module {
            "q_proj" => (q, h),
            "k_proj" | "v_proj" => (kv, h),
            "o_proj" => (h, q),
            "gate_proj" | "up_proj" => (i, h),
            "down_proj" => (h, i),
            _ => return None,
        })
    }

    /// Bias on q_proj, k_proj, v_proj.
    pub fn qkv_bias(&self) -> bool {
        match self.model_type() {
            // HF `Qwen2Attention`: `nn.Linear(..., bias=True)` for q/k/v, hard-coded.
            ModelType::Qwen2 => true,
            ModelType::Llama => self.attention_bias.unwrap_or(false),
            ModelType::Mistral => false,
        }
    }

    /// Bias on o_proj.
    pub fn o_bias(&self) -> bool {
        match self.model_type() {
            ModelType::Qwen2 | ModelType::Mistral => false,
            // HF `LlamaAttention`: `o_proj = nn.Linear(..., bias=config.attention_bias)`.
            ModelType::Llama => self.attention_bias.unwrap_or(false),
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

    /// Rotary base: `rope_parameters.rope_theta`, else `rope_theta`, else 10000.
    pub fn rope_base(&self) -> f64 {
        self.rope_parameters
            .as_ref()
            .and_then(|r| r.rope_theta)
            .or(self.rope_theta)
            .unwrap_or(10_000.0)
    }

    /// The rope type in force: `rope_parameters` when present, else `rope_scaling`.
    pub fn rope_kind(&self) -> RopeKind {
        self.rope_parameters
            .as_ref()
            .or(self.rope_scaling.as_ref())
            .map(|r| r.kind.clone())
            .unwrap_or(RopeKind::Default)
    }

    /// Rotary inverse frequencies, `head_dim / 2` values, computed in f32 like transformers'
    /// `_compute_default_rope_parameters`:
    /// `1 / base ** (arange(0, dim, 2).float() / dim)`, then for `llama3` rope
    /// `_compute_llama3_parameters` (`modeling_rope_utils.py`), line for line.
    pub fn inv_freq(&self) -> Vec<f32> {
        let dim = self.head_dim();
        let base = self.rope_base() as f32;
        let inv: Vec<f32> = (0..dim)
            .step_by(2)
            .map(|i| 1.0 / base.powf(i as f32 / dim as f32))
            .collect();
        let RopeKind::Llama3 {
            factor,
            low_freq_factor,
            high_freq_factor,
            original_max_position_embeddings,
        } = self.rope_kind()
        else {
            return inv;
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
