//! The `<arch>.*` metadata (`llama`, `qwen2`, `qwen3`, `gemma3`) as the crate's one [`Config`]: read, checked key by key (each error
//! naming the metadata key), then validated as a `config.json` is.

use std::path::Path;

use super::GgufFile;
use crate::config::{Config, RopeKind, RopeParameters, RopeScaling, TokenIds};
use crate::error::{Error, Result};

/// The `general.architecture` values [`GgufFile::config`] and [`GgufFile::hf_tensors`] accept.
pub const ARCHITECTURES: &[&str] = &["llama", "qwen2", "qwen3", "gemma3"];

/// A GGUF architecture whet converts: its metadata prefix and the Hugging Face model it is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GgufArch {
    /// Llama 1/2/3, SmolLM, TinyLlama, Mistral (llama.cpp writes Mistral as `llama`).
    Llama,
    Qwen2,
    Qwen3,
    /// Gemma 3's text decoder (the vision tower, if any, is a separate file).
    Gemma3,
}

impl GgufArch {
    /// The `general.architecture` value, also the prefix of its metadata keys.
    pub fn name(self) -> &'static str {
        match self {
            GgufArch::Llama => "llama",
            GgufArch::Qwen2 => "qwen2",
            GgufArch::Qwen3 => "qwen3",
            GgufArch::Gemma3 => "gemma3",
        }
    }

    /// The Hugging Face `model_type`, as transformers' GGUF loader names it.
    pub fn model_type(self) -> &'static str {
        match self {
            GgufArch::Gemma3 => "gemma3_text",
            other => other.name(),
        }
    }

    fn from_name(name: &str) -> Option<GgufArch> {
        [
            GgufArch::Llama,
            GgufArch::Qwen2,
            GgufArch::Qwen3,
            GgufArch::Gemma3,
        ]
        .into_iter()
        .find(|a| a.name() == name)
    }
}

/// transformers >= 5's `rope_parameters`: one set, or Gemma 3's set per layer type (the local
/// layers at llama.cpp's fixed base 10000, unscaled).
fn rope_parameters(arch: GgufArch, theta: f64, scaling: Option<RopeScaling>) -> RopeParameters {
    let global = RopeScaling {
        rope_theta: Some(theta),
        kind: scaling.map_or(RopeKind::Default, |s| s.kind),
    };
    if arch != GgufArch::Gemma3 {
        return RopeParameters::One(global);
    }
    let local = RopeScaling {
        rope_theta: Some(10_000.0),
        kind: RopeKind::Default,
    };
    RopeParameters::PerLayerType(
        [
            ("full_attention".to_string(), global),
            ("sliding_attention".to_string(), local),
        ]
        .into(),
    )
}

impl GgufFile {
    /// The file's architecture, if whet converts it.
    pub fn arch(&self) -> Result<GgufArch> {
        let arch = self.architecture()?;
        GgufArch::from_name(arch).ok_or_else(|| Error::GgufArchitecture {
            path: self.path.clone(),
            found: arch.to_string(),
        })
    }

    /// The model config the `<arch>.*` metadata describes, as transformers' GGUF loader reads
    /// the same file (`GGUF_CONFIG_MAPPING`, then the model's config class defaults).
    pub fn config(&self) -> Result<Config> {
        let arch = self.arch()?;
        let key = |k: &str| format!("{}.{k}", arch.name());
        const HINT: &str = "llama.cpp writes it for every model of this architecture; the file was written by a tool that left it out";
        let hidden = self.req_count(&key("embedding_length"), HINT)?;
        let layers = self.req_count(&key("block_count"), HINT)?;
        let heads = self.req_count(&key("attention.head_count"), HINT)?;
        let kv_heads = match self.opt_u64(&key("attention.head_count_kv"))? {
            None => heads,
            Some(_) => self.req_count(&key("attention.head_count_kv"), HINT)?,
        };
        let ffn = self.req_count(&key("feed_forward_length"), HINT)?;
        let ctx = self.req_count(&key("context_length"), HINT)?;
        let eps_key = key("attention.layer_norm_rms_epsilon");
        let eps = self
            .opt_f64(&eps_key)?
            .ok_or_else(|| self.missing(&eps_key, HINT))?;
        if !(eps > 0.0 && eps < 1.0) {
            return Err(self.bad(&eps_key, "a number in (0, 1)", eps.to_string()));
        }
        // llama.cpp's default when the key is absent (Gemma 3: its global layers' base).
        let theta_key = key("rope.freq_base");
        let theta = self.opt_f64(&theta_key)?.unwrap_or(match arch {
            GgufArch::Gemma3 => 1_000_000.0,
            _ => 10_000.0,
        });
        if !(theta > 0.0 && theta.is_finite()) {
            return Err(self.bad(&theta_key, "a positive number", theta.to_string()));
        }
        if heads % kv_heads != 0 {
            return Err(self.bad(
                &key("attention.head_count_kv"),
                format!("a divisor of {} = {heads}", key("attention.head_count")),
                kv_heads.to_string(),
            ));
        }
        let head_dim = match self.opt_u64(&key("attention.key_length"))? {
            Some(k) => k as usize,
            None => hidden / heads,
        };
        if head_dim == 0 || head_dim % 2 != 0 || head_dim > (1 << 16) {
            return Err(self.bad(
                &key("attention.key_length"),
                "an even head size",
                head_dim.to_string(),
            ));
        }
        if let Some(v) = self.opt_u64(&key("attention.value_length"))?
            && v as usize != head_dim
        {
            return Err(self.bad(
                &key("attention.value_length"),
                format!("the key length {head_dim} (one head size for keys and values)"),
                v.to_string(),
            ));
        }
        if let Some(d) = self.opt_u64(&key("rope.dimension_count"))?
            && d as usize != head_dim
        {
            return Err(self.bad(
                &key("rope.dimension_count"),
                format!("the head size {head_dim} (partial rotary embeddings are not supported)"),
                d.to_string(),
            ));
        }
        let scaling = match self.opt_str(&key("rope.scaling.type"))? {
            None | Some("none") => None,
            Some("linear") => {
                let factor_key = key("rope.scaling.factor");
                let factor = self.opt_f64(&factor_key)?.ok_or_else(|| {
                    self.missing(&factor_key, "linear rope scaling needs its factor")
                })?;
                if !(factor.is_finite() && factor > 0.0) {
                    return Err(self.bad(&factor_key, "a finite number > 0", factor.to_string()));
                }
                Some(RopeScaling {
                    rope_theta: None,
                    kind: RopeKind::Linear { factor },
                })
            }
            Some(other) => {
                return Err(Error::GgufUnsupported {
                    path: self.path.clone(),
                    detail: format!(
                        "{} = {other:?}: only unscaled and linear rope convert; convert this model from its Hugging Face folder instead",
                        key("rope.scaling.type")
                    ),
                });
            }
        };
        // Llama 3.1-style scaling travels as the `rope_freqs.weight` tensor, not as keys.
        let scaling = match (arch, self.tensor(super::rope::ROPE_FREQS)) {
            (_, None) => scaling,
            (GgufArch::Llama, Some(_)) if scaling.is_some() => {
                return Err(Error::GgufUnsupported {
                    path: self.path.clone(),
                    detail: format!(
                        "{} = \"linear\" and a {} tensor: two rope scalings at once; convert this model from its Hugging Face folder instead",
                        key("rope.scaling.type"),
                        super::rope::ROPE_FREQS
                    ),
                });
            }
            (GgufArch::Llama, Some(_)) => {
                self.rope_freqs_llama3(head_dim, theta)?
                    .map(|p| RopeScaling {
                        rope_theta: None,
                        kind: p.kind(),
                    })
            }
            // Not part of the other layouts: `plan` names it.
            (_, Some(_)) => scaling,
        };
        let vocab = self.vocab_size()?;
        if let Some(v) = self.opt_u64(&key("vocab_size"))?
            && v as usize != vocab
        {
            return Err(self.bad(
                &key("vocab_size"),
                format!("the length of tokenizer.ggml.tokens, {vocab}"),
                v.to_string(),
            ));
        }
        let gemma = arch == GgufArch::Gemma3;
        let sliding_window = if gemma {
            let window_key = key("attention.sliding_window");
            Some(self.req_count(&window_key, "Gemma 3's local layers need their window")?)
        } else {
            None
        };
        for softcap in ["final_logit_softcapping", "attn_logit_softcapping"] {
            if let Some(v) = self.opt_f64(&key(softcap))? {
                return Err(Error::GgufUnsupported {
                    path: self.path.clone(),
                    detail: format!(
                        "{} = {v}: logit soft-capping is not implemented",
                        key(softcap)
                    ),
                });
            }
        }
        let cfg = Config {
            model_type: arch.model_type().into(),
            vocab_size: vocab,
            hidden_size: hidden,
            intermediate_size: ffn,
            num_hidden_layers: layers,
            num_attention_heads: heads,
            num_key_value_heads: Some(kv_heads),
            head_dim: Some(head_dim),
            rms_norm_eps: eps,
            // transformers < 5 spelling; `rope_parameters` carries the same theta for >= 5.
            rope_theta: Some(theta),
            rope_scaling: scaling.clone(),
            rope_parameters: Some(rope_parameters(arch, theta, scaling)),
            max_position_embeddings: ctx,
            tie_word_embeddings: self.tensor("output.weight").is_none(),
            attention_bias: Some(false),
            mlp_bias: false,
            bos_token_id: self.opt_token_id("tokenizer.ggml.bos_token_id", vocab)?,
            eos_token_id: self
                .opt_token_id("tokenizer.ggml.eos_token_id", vocab)?
                .map(TokenIds::One),
            hidden_act: "silu".into(),
            sliding_window,
            use_sliding_window: None,
            max_window_layers: None,
            layer_types: None,
            sliding_window_pattern: None,
            sliding_window_pattern_: None,
            // Not in the file: transformers' GGUF loader takes Gemma3TextConfig's defaults
            // (local layers at base 10000, scores scaled by 256 ** -0.5, every 6th layer
            // global), which are those of the 270M, 1B, 4B and 12B models; llama.cpp hard-codes
            // the same.
            rope_local_base_freq: gemma.then_some(10_000.0),
            query_pre_attn_scalar: gemma.then_some(256.0),
            hidden_activation: gemma.then(|| "gelu_pytorch_tanh".into()),
            final_logit_softcapping: None,
            attn_logit_softcapping: None,
            use_bidirectional_attention: None,
        };
        // Not part of `Config` (convert writes it), but checked with the other ids.
        self.pad_token_id()?;
        // The same checks as a config.json (sizes, products, floats), before any shape
        // arithmetic on these values.
        let invalid = |source: Error| Error::GgufConfig {
            path: self.path.clone(),
            source: Box::new(source),
        };
        let label = format!("config.json (from the {}.* metadata)", arch.name());
        let label = Path::new(&label);
        cfg.validate(label).map_err(invalid)?;
        self.check_rope_freqs(&cfg)?;
        Ok(cfg)
    }

    /// `tokenizer.ggml.padding_token_id`, checked against the vocabulary size.
    pub fn pad_token_id(&self) -> Result<Option<u32>> {
        self.opt_token_id("tokenizer.ggml.padding_token_id", self.vocab_size()?)
    }
}
