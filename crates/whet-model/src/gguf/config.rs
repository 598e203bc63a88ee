//! The `llama.*` metadata as the crate's one [`Config`]: read, checked key by key (each error
//! naming the metadata key), then validated as a `config.json` is.

use std::path::Path;

use super::GgufFile;
use crate::config::{Config, RopeKind, RopeParameters, RopeScaling, TokenIds};
use crate::error::{Error, Result};

/// The one architecture [`GgufFile::config`] and [`GgufFile::hf_tensors`] accept.
pub const ARCHITECTURE: &str = "llama";

impl GgufFile {
    fn check_llama(&self) -> Result<()> {
        let arch = self.architecture()?;
        if arch != ARCHITECTURE {
            return Err(Error::GgufArchitecture {
                path: self.path.clone(),
                found: arch.to_string(),
            });
        }
        Ok(())
    }

    /// The model config the `llama.*` metadata describes, as transformers' `LlamaConfig` reads
    /// the same file.
    pub fn config(&self) -> Result<Config> {
        self.check_llama()?;
        const HINT: &str = "llama.cpp writes it for every llama model; the file was written by a tool that left it out";
        let hidden = self.req_count("llama.embedding_length", HINT)?;
        let layers = self.req_count("llama.block_count", HINT)?;
        let heads = self.req_count("llama.attention.head_count", HINT)?;
        let kv_heads = match self.opt_u64("llama.attention.head_count_kv")? {
            None => heads,
            Some(_) => self.req_count("llama.attention.head_count_kv", HINT)?,
        };
        let ffn = self.req_count("llama.feed_forward_length", HINT)?;
        let ctx = self.req_count("llama.context_length", HINT)?;
        let eps = self
            .opt_f64("llama.attention.layer_norm_rms_epsilon")?
            .ok_or_else(|| self.missing("llama.attention.layer_norm_rms_epsilon", HINT))?;
        if !(eps > 0.0 && eps < 1.0) {
            return Err(self.bad(
                "llama.attention.layer_norm_rms_epsilon",
                "a number in (0, 1)",
                eps.to_string(),
            ));
        }
        // llama.cpp's default when the key is absent.
        let theta = self.opt_f64("llama.rope.freq_base")?.unwrap_or(10_000.0);
        if !(theta > 0.0 && theta.is_finite()) {
            return Err(self.bad(
                "llama.rope.freq_base",
                "a positive number",
                theta.to_string(),
            ));
        }
        if heads % kv_heads != 0 {
            return Err(self.bad(
                "llama.attention.head_count_kv",
                format!("a divisor of llama.attention.head_count = {heads}"),
                kv_heads.to_string(),
            ));
        }
        let head_dim = match self.opt_u64("llama.attention.key_length")? {
            Some(k) => k as usize,
            None => hidden / heads,
        };
        if head_dim == 0 || head_dim % 2 != 0 || head_dim > (1 << 16) {
            return Err(self.bad(
                "llama.attention.key_length",
                "an even head size",
                head_dim.to_string(),
            ));
        }
        if let Some(v) = self.opt_u64("llama.attention.value_length")?
            && v as usize != head_dim
        {
            return Err(self.bad(
                "llama.attention.value_length",
                format!("the key length {head_dim} (Llama uses one head size)"),
                v.to_string(),
            ));
        }
        if let Some(d) = self.opt_u64("llama.rope.dimension_count")?
            && d as usize != head_dim
        {
            return Err(self.bad(
                "llama.rope.dimension_count",
                format!("the head size {head_dim} (partial rotary embeddings are not Llama)"),
                d.to_string(),
            ));
        }
        match self.opt_str("llama.rope.scaling.type")? {
            None | Some("none") => {}
            Some(other) => {
                return Err(Error::GgufUnsupported {
                    path: self.path.clone(),
                    detail: format!(
                        "llama.rope.scaling.type = {other:?}: only unscaled rope converts; convert this model from its Hugging Face folder instead"
                    ),
                });
            }
        }
        let vocab = self.vocab_size()?;
        if let Some(v) = self.opt_u64("llama.vocab_size")?
            && v as usize != vocab
        {
            return Err(self.bad(
                "llama.vocab_size",
                format!("the length of tokenizer.ggml.tokens, {vocab}"),
                v.to_string(),
            ));
        }
        let cfg = Config {
            model_type: "llama".into(),
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
            rope_scaling: None,
            rope_parameters: Some(RopeParameters::One(RopeScaling {
                rope_theta: Some(theta),
                kind: RopeKind::Default,
            })),
            max_position_embeddings: ctx,
            tie_word_embeddings: self.tensor("output.weight").is_none(),
            attention_bias: Some(false),
            mlp_bias: false,
            bos_token_id: self.opt_token_id("tokenizer.ggml.bos_token_id", vocab)?,
            eos_token_id: self
                .opt_token_id("tokenizer.ggml.eos_token_id", vocab)?
                .map(TokenIds::One),
            hidden_act: "silu".into(),
            sliding_window: None,
            use_sliding_window: None,
            max_window_layers: None,
            layer_types: None,
            sliding_window_pattern: None,
            sliding_window_pattern_: None,
            rope_local_base_freq: None,
            query_pre_attn_scalar: None,
            hidden_activation: None,
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
        let label = Path::new("config.json (from the llama.* metadata)");
        cfg.validate(label).map_err(invalid)?;
        Ok(cfg)
    }

    /// `tokenizer.ggml.padding_token_id`, checked against the vocabulary size.
    pub fn pad_token_id(&self) -> Result<Option<u32>> {
        self.opt_token_id("tokenizer.ggml.padding_token_id", self.vocab_size()?)
    }
}
