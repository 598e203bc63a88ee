//! The Llama decoder (Touvron et al. 2023, arXiv:2302.13971) and the architectures that differ
//! from it by a few switches read off the config: Mistral (sliding-window attention), Qwen2
//! (q/k/v bias), Qwen3 (per-head q/k RMSNorm) and Gemma 3 (`1 + w` RMSNorms before and after
//! attention and MLP, GeGLU, q/k norms, embeddings scaled by `sqrt(hidden)`,
//! `query_pre_attn_scalar`, local sliding-window layers with a rotary base of their own between
//! global ones) and Phi-3 (fused `qkv_proj` and `gate_up_proj`, LongRoPE, partial rotary). Written for training: every op comes from `whet_kernels` (candle's fused
//! softmax / rms_norm / rope / sdpa have no backward), q/k/v stay (B, T, NH, D) straight from
//! the projection, and packed rows are handled by `segments` (a query attends only to keys of
//! its own document) plus per-document `positions`.
//!
//! Layout follows candle-transformers `models/llama.rs` and HF `modeling_llama.py`,
//! `modeling_qwen3.py`, `modeling_gemma3.py` and `modeling_phi3.py`: `Attention`, `Mlp`, `Block`, `Model`, each
//! with `load` and `forward`.
//!
//! Shapes: `B` batch, `T` tokens, `S` keys (T plus cached), `H` hidden, `NH` query heads,
//! `NKV` key/value heads, `D` head dim, `I` intermediate, `V` vocabulary, `N` rows = B * T.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use candle_core::{DType, Device, Tensor, Var};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use whet_kernels::{IGNORE_INDEX, Kernels, Ops, Segment, SideGrads, checkpoint, rope_tables};

use crate::config::{Config, LayerAttention};
use crate::error::{Error, Result};
use crate::load::{CONFIG_FILE, Init, Param, SafetensorsFiles, Source, Vb, WEIGHTS_FILE};
use crate::lora::{self, Linear, LoraConfig};

mod logps;
mod precision;

/// Rows of hidden states sent through the LM head + cross-entropy at once in [`Model::loss`]:
/// a 1024 x 128k-vocab f32 logits chunk is 512 MiB, the most we want alive at a time.
pub const LOSS_CHUNK_ROWS: usize = 1024;

/// How [`Model::load_with`] loads a model.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct LoadOptions {
    /// Keep the decoder's linear weights in this GGML type (QLoRA); `None` = f32.
    pub quantize: Option<candle_core::quantized::GgmlDType>,
}

/// The storage of the decoder's linear weights ([`Model::quant_summary`]).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct QuantSummary {
    /// Number of linear weights per storage type (`"q4_0"`, `"f32"`...).
    pub types: std::collections::BTreeMap<String, usize>,
    /// Bytes they take now.
    pub bytes: usize,
    /// Bytes they would take in f32.
    pub f32_bytes: usize,
}

/// Which weights get gradients.
#[derive(Debug, Clone, Default, PartialEq)]
pub enum Trainable {
    /// Everything frozen (evaluation, generation).
    #[default]
    None,
    /// Frozen base, LoRA adapters on the target modules, seeded init and dropout.
    Lora { config: LoraConfig, seed: u64 },
    /// Full fine-tuning: every weight is a Var.
    Full,
}

// ---------------------------------------------------------------------------------------------
// layers

#[derive(Debug, Clone)]
struct RmsNorm {
    weight: Param, // (H)
    eps: f64,
    /// Gemma: the norm scales by `1 + weight` (and a fresh weight is 0).
    offset: bool,
}

impl RmsNorm {
    fn load(vb: Vb, size: usize, cfg: &Config) -> Result<Self> {
        let offset = cfg.is_gemma();
        let init = if offset { Init::Zeros } else { Init::Ones };
        Ok(RmsNorm {
            weight: vb.get(&[size], "weight", init)?,
            eps: cfg.rms_norm_eps,
            offset,
        })
    }

    /// x: (.., H) -> (.., H)
    fn forward(&self, x: &Tensor, k: Kernels) -> Result<Tensor> {
        if self.offset {
            return Ok(k.rms_norm(x, &(&self.weight.t + 1.0)?, self.eps)?);
        }
        Ok(k.rms_norm(x, &self.weight.t, self.eps)?)
    }
}

/// One layer's cached keys and values, (B, S, NKV, D) each.
type KvSlot = Option<(Tensor, Tensor)>;

/// The q, k and v projections: three linears, or Phi-3's one `qkv_proj` whose output is q, then
/// k, then v.
// One per layer, built once: the size difference between the variants costs nothing.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone)]
enum QkvProj {
    Separate {
        q_proj: Linear,
        k_proj: Linear,
        v_proj: Linear,
    },
    Fused(Linear),
}

impl QkvProj {
    fn linears(&self) -> Vec<&Linear> {
        match self {
            QkvProj::Separate {
                q_proj,
                k_proj,
                v_proj,
            } => vec![q_proj, k_proj, v_proj],
            QkvProj::Fused(qkv_proj) => vec![qkv_proj],
        }
    }

    fn linears_mut(&mut self) -> Vec<&mut Linear> {
        match self {
            QkvProj::Separate {
                q_proj,
                k_proj,
                v_proj,
            } => vec![q_proj, k_proj, v_proj],
            QkvProj::Fused(qkv_proj) => vec![qkv_proj],
        }
    }
}

#[derive(Debug, Clone)]
pub struct Attention {
    qkv: QkvProj,
    o_proj: Linear,
    /// Qwen3, Gemma 3: RMSNorms over each head of q and of k, before rope.
    qk_norm: Option<(RmsNorm, RmsNorm)>,
    num_heads: usize,
    num_kv_heads: usize,
    head_dim: usize,
    /// The leading dimensions of each head that rotate (Phi-4-mini: 3/4 of them); the rest pass
    /// through rope unchanged.
    rotary_dim: usize,
    /// Score scale, `head_dim ** -0.5` unless the config says otherwise.
    scale: f64,
    /// Sliding window (keys) of this layer; `None` attends to the whole document.
    window: Option<usize>,
}

impl Attention {
    fn load(vb: Vb, cfg: &Config, layer: usize) -> Result<Self> {
        let (h, nh, nkv, d) = (
            cfg.hidden_size,
            cfg.num_attention_heads,
            cfg.num_kv_heads(),
            cfg.head_dim(),
        );
        let (qkv_bias, o_bias) = (cfg.qkv_bias(), cfg.o_bias());
        let qk_norm = if cfg.qk_norm() {
            Some((
                RmsNorm::load(vb.pp("q_norm"), d, cfg)?,
                RmsNorm::load(vb.pp("k_norm"), d, cfg)?,
            ))
        } else {
            None
        };
        let qkv = if cfg.fused_projections() {
            QkvProj::Fused(Linear::load(
                vb.pp("qkv_proj"),
                h,
                (nh + 2 * nkv) * d,
                qkv_bias,
            )?)
        } else {
            QkvProj::Separate {
                q_proj: Linear::load(vb.pp("q_proj"), h, nh * d, qkv_bias)?,
                k_proj: Linear::load(vb.pp("k_proj"), h, nkv * d, qkv_bias)?,
                v_proj: Linear::load(vb.pp("v_proj"), h, nkv * d, qkv_bias)?,
            }
        };
        Ok(Attention {
            qkv,
            o_proj: Linear::load(vb.pp("o_proj"), nh * d, h, o_bias)?,
            qk_norm,
            num_heads: nh,
            num_kv_heads: nkv,
            head_dim: d,
            rotary_dim: cfg.rotary_dim(),
            scale: cfg.attention_scale(),
            window: cfg.layer_window(layer),
        })
    }

    /// x: (B, T, H) -> q (B, T, NH * D), k and v (B, T, NKV * D).
    fn project(&self, x: &Tensor, train: bool, ops: Kernels) -> Result<(Tensor, Tensor, Tensor)> {
        match &self.qkv {
            QkvProj::Separate {
                q_proj,
                k_proj,
                v_proj,
            } => Ok((
                q_proj.forward(x, train, ops)?,
                k_proj.forward(x, train, ops)?,
                v_proj.forward(x, train, ops)?,
            )),
            QkvProj::Fused(qkv_proj) => {
                let (q, kv) = (
                    self.num_heads * self.head_dim,
                    self.num_kv_heads * self.head_dim,
                );
                let qkv = qkv_proj.forward(x, train, ops)?; // (B, T, (NH + 2 NKV) * D)
                Ok((
                    qkv.narrow(2, 0, q)?,
                    qkv.narrow(2, q, kv)?,
                    qkv.narrow(2, q + kv, kv)?,
                ))
            }
        }
    }

    /// Rope on the first `rotary_dim` dimensions of each head. x: (B, T, N, D), cos/sin:
    /// (B, T, R/2) -> (B, T, N, D)
    fn rotate(&self, x: &Tensor, cos: &Tensor, sin: &Tensor, ops: Kernels) -> Result<Tensor> {
        let (d, r) = (self.head_dim, self.rotary_dim);
        if r == d {
            return Ok(ops.rope(x, cos, sin)?);
        }
        let rotated = ops.rope(&x.narrow(3, 0, r)?.contiguous()?, cos, sin)?; // (B, T, N, R)
        Ok(Tensor::cat(&[&rotated, &x.narrow(3, r, d - r)?], 3)?)
    }

    /// x: (B, T, H), cos/sin: (B, T, R/2), segments: (B, S) -> (B, T, H).
    /// With a cache slot, this step's k/v are appended to it and S = cached + T.
    fn forward(
        &self,
        x: &Tensor,
        cos: &Tensor,
        sin: &Tensor,
        segments: &Tensor,
        cache: Option<&mut KvSlot>,
        (train, ops): (bool, Kernels),
    ) -> Result<Tensor> {
        let (b, t, _) = x.dims3()?;
        let (nh, nkv, d) = (self.num_heads, self.num_kv_heads, self.head_dim);
        let (q, k, v) = self.project(x, train, ops)?;
        let q = q.reshape((b, t, nh, d))?; // (B, T, NH, D)
        let k = k.reshape((b, t, nkv, d))?; // (B, T, NKV, D)
        let v = v.reshape((b, t, nkv, d))?; // (B, T, NKV, D)
        let (q, k) = match &self.qk_norm {
            Some((qn, kn)) => (qn.forward(&q, ops)?, kn.forward(&k, ops)?),
            None => (q, k),
        };
        let q = self.rotate(&q, cos, sin, ops)?; // (B, T, NH, D)
        let k = self.rotate(&k, cos, sin, ops)?; // (B, T, NKV, D)
        let (k, v) = match cache {
            None => (k, v),
            Some(slot) => {
                let (k, v) = match slot.take() {
                    None => (k, v),
                    Some((k0, v0)) => (Tensor::cat(&[&k0, &k], 1)?, Tensor::cat(&[&v0, &v], 1)?),
                }; // (B, S, NKV, D)
                *slot = Some((k.clone(), v.clone()));
                (k, v)
            }
        };
        let y = ops.attention(&q, &k, &v, segments, self.scale, self.window)?; // (B, T, NH, D)
        let y = y.reshape((b, t, nh * d))?; // (B, T, NH * D)
        self.o_proj.forward(&y, train, ops) // (B, T, H)
    }

    /// The linears in HF state-dict order.
    fn linears(&self) -> Vec<&Linear> {
        let mut v = self.qkv.linears();
        v.push(&self.o_proj);
        v
    }

    fn norms(&self) -> impl Iterator<Item = &RmsNorm> {
        self.qk_norm.iter().flat_map(|(q, k)| [q, k])
    }

    fn linears_mut(&mut self) -> Vec<&mut Linear> {
        let mut v = self.qkv.linears_mut();
        v.push(&mut self.o_proj);
        v
    }
}

/// The MLP's gate and up projections: two linears, or Phi-3's one `gate_up_proj` whose output is
/// the gate, then up.
#[derive(Debug, Clone)]
enum GateUpProj {
    Separate { gate_proj: Linear, up_proj: Linear },
    Fused(Linear),
}

#[derive(Debug, Clone)]
pub struct Mlp {
    gate_up: GateUpProj,
    down_proj: Linear,
    intermediate: usize,
    /// GeGLU (Gemma) instead of SwiGLU.
    gelu: bool,
}

impl Mlp {
    fn load(vb: Vb, cfg: &Config) -> Result<Self> {
        let (h, i) = (cfg.hidden_size, cfg.intermediate_size);
        let gate_up = if cfg.fused_projections() {
            GateUpProj::Fused(Linear::load(vb.pp("gate_up_proj"), h, 2 * i, false)?)
        } else {
            GateUpProj::Separate {
                gate_proj: Linear::load(vb.pp("gate_proj"), h, i, false)?,
                up_proj: Linear::load(vb.pp("up_proj"), h, i, false)?,
            }
        };
        Ok(Mlp {
            gate_up,
            down_proj: Linear::load(vb.pp("down_proj"), i, h, false)?,
            intermediate: i,
            gelu: cfg.is_gemma(),
        })
    }

    /// x: (B, T, H) -> (B, T, H). SwiGLU or GeGLU (Shazeer 2020, arXiv:2002.05202).
    fn forward(&self, x: &Tensor, train: bool, ops: Kernels) -> Result<Tensor> {
        let (gate, up) = match &self.gate_up {
            GateUpProj::Separate { gate_proj, up_proj } => (
                gate_proj.forward(x, train, ops)?,
                up_proj.forward(x, train, ops)?,
            ),
            GateUpProj::Fused(gate_up_proj) => {
                let i = self.intermediate;
                let gu = gate_up_proj.forward(x, train, ops)?; // (B, T, 2 I)
                (
                    gu.narrow(2, 0, i)?.contiguous()?,
                    gu.narrow(2, i, i)?.contiguous()?,
                )
            }
        }; // (B, T, I) each
        let act = if self.gelu {
            ops.geglu(&gate, &up)?
        } else {
            ops.swiglu(&gate, &up)?
        }; // (B, T, I)
        self.down_proj.forward(&act, train, ops) // (B, T, H)
    }

    /// The linears in HF state-dict order.
    fn linears(&self) -> Vec<&Linear> {
        let mut v = match &self.gate_up {
            GateUpProj::Separate { gate_proj, up_proj } => vec![gate_proj, up_proj],
            GateUpProj::Fused(gate_up_proj) => vec![gate_up_proj],
        };
        v.push(&self.down_proj);
        v
    }

    fn linears_mut(&mut self) -> Vec<&mut Linear> {
        let mut v = match &mut self.gate_up {
            GateUpProj::Separate { gate_proj, up_proj } => vec![gate_proj, up_proj],
            GateUpProj::Fused(gate_up_proj) => vec![gate_up_proj],
        };
        v.push(&mut self.down_proj);
        v
    }
}

#[derive(Debug, Clone)]
pub struct Block {
    self_attn: Attention,
    mlp: Mlp,
    input_layernorm: RmsNorm,
    /// Llama: the norm before the MLP. Gemma: the norm of the attention's output.
    post_attention_layernorm: RmsNorm,
    /// Gemma: the norms before and after the MLP.
    feedforward_norms: Option<(RmsNorm, RmsNorm)>,
    /// Which rotary table the layer reads (0 global, 1 local: [`Model::hidden`]).
    rope: usize,
}

impl Block {
    fn load(vb: Vb, cfg: &Config, layer: usize) -> Result<Self> {
        let h = cfg.hidden_size;
        let norm = |name: &str| RmsNorm::load(vb.pp(name), h, cfg);
        let feedforward_norms = if cfg.is_gemma() {
            Some((
                norm("pre_feedforward_layernorm")?,
                norm("post_feedforward_layernorm")?,
            ))
        } else {
            None
        };
        let local = cfg.local_rope() && cfg.layer_attention(layer) == LayerAttention::Sliding;
        Ok(Block {
            self_attn: Attention::load(vb.pp("self_attn"), cfg, layer)?,
            mlp: Mlp::load(vb.pp("mlp"), cfg)?,
            input_layernorm: norm("input_layernorm")?,
            post_attention_layernorm: norm("post_attention_layernorm")?,
            feedforward_norms,
            rope: usize::from(local),
        })
    }

    /// Pre-norm residual block (Gemma: also normed after attention and MLP).
    /// x: (B, T, H) -> (B, T, H)
    fn forward(
        &self,
        x: &Tensor,
        cos: &Tensor,
        sin: &Tensor,
        segments: &Tensor,
        cache: Option<&mut KvSlot>,
        (train, ops): (bool, Kernels),
    ) -> Result<Tensor> {
        let h = self.input_layernorm.forward(x, ops)?; // (B, T, H)
        let h = self
            .self_attn
            .forward(&h, cos, sin, segments, cache, (train, ops))?; // (B, T, H)
        let Some((pre_ff, post_ff)) = &self.feedforward_norms else {
            let x = (x + h)?; // (B, T, H)
            let h = self.post_attention_layernorm.forward(&x, ops)?; // (B, T, H)
            let h = self.mlp.forward(&h, train, ops)?; // (B, T, H)
            return Ok((x + h)?);
        };
        let h = self.post_attention_layernorm.forward(&h, ops)?; // (B, T, H)
        let x = (x + h)?; // (B, T, H)
        let h = pre_ff.forward(&x, ops)?; // (B, T, H)
        let h = self.mlp.forward(&h, train, ops)?; // (B, T, H)
        let h = post_ff.forward(&h, ops)?; // (B, T, H)
        Ok((x + h)?)
    }

    fn linears(&self) -> Vec<&Linear> {
        let mut v = self.self_attn.linears();
        v.extend(self.mlp.linears());
        v
    }

    fn linears_mut(&mut self) -> Vec<&mut Linear> {
        let mut v = self.self_attn.linears_mut();
        v.extend(self.mlp.linears_mut());
        v
    }

    /// The block's trainable weights (LoRA A/B, or everything under full fine-tuning).
    fn trainable_tensors(&self) -> Vec<Tensor> {
        let mut v: Vec<&Param> = self
            .linears()
            .into_iter()
            .flat_map(Linear::params)
            .collect();
        v.extend(self.norms());
        v.into_iter()
            .filter(|p| p.t.is_variable())
            .map(|p| p.t.clone())
            .collect()
    }

    /// [`Block::forward`] under activation checkpointing (`whet_kernels::checkpoint`): only
    /// the input and output stay alive; backward runs the block again. The LoRA dropout
    /// streams are snapshotted here and restored before each run, so the recomputation draws
    /// the same masks.
    fn forward_checkpointed(
        &self,
        x: &Tensor,
        cos: &Tensor,
        sin: &Tensor,
        segments: &Tensor,
        side: &SideGrads,
        ops: Kernels,
    ) -> Result<Tensor> {
        let params = self.trainable_tensors();
        if params.is_empty() {
            return self.forward(x, cos, sin, segments, None, (true, ops));
        }
        let snapshot: Vec<(Arc<Mutex<StdRng>>, StdRng)> = self
            .linears()
            .into_iter()
            .filter_map(|l| l.lora.as_ref())
            .map(|l| {
                let state = l.rng.lock().unwrap_or_else(|e| e.into_inner()).clone();
                (l.rng.clone(), state)
            })
            .collect();
        let (block, cos, sin, segments) =
            (self.clone(), cos.clone(), sin.clone(), segments.clone());
        let segment: Segment = Arc::new(move |x: &Tensor| {
            for (rng, state) in &snapshot {
                *rng.lock().unwrap_or_else(|e| e.into_inner()) = state.clone();
            }
            block
                .forward(x, &cos, &sin, &segments, None, (true, ops))
                .map_err(|e| match e {
                    Error::Candle(e) => e,
                    other => candle_core::Error::Msg(other.to_string()),
                })
        });
        Ok(checkpoint(x, segment, params, side)?)
    }

    /// Norm weights in HF state-dict order.
    fn norms(&self) -> Vec<&Param> {
        let mut v: Vec<&Param> = self.self_attn.norms().map(|n| &n.weight).collect();
        v.push(&self.input_layernorm.weight);
        v.push(&self.post_attention_layernorm.weight);
        if let Some((pre, post)) = &self.feedforward_norms {
            v.extend([&pre.weight, &post.weight]);
        }
        v
    }

    /// The block's HF (base) weights: linears, biases, norms.
    fn base_params_mut(&mut self) -> Vec<&mut Param> {
        let Block {
            self_attn,
            mlp,
            input_layernorm,
            post_attention_layernorm,
            feedforward_norms,
            ..
        } = self;
        let Attention {
            qkv,
            o_proj,
            qk_norm,
            ..
        } = self_attn;
        let mut v = Vec::new();
        for l in qkv
            .linears_mut()
            .into_iter()
            .chain([o_proj])
            .chain(mlp.linears_mut())
        {
            v.extend(l.base_params_mut());
        }
        if let Some((q, k)) = qk_norm {
            v.extend([&mut q.weight, &mut k.weight]);
        }
        v.push(&mut input_layernorm.weight);
        v.push(&mut post_attention_layernorm.weight);
        if let Some((pre, post)) = feedforward_norms {
            v.extend([&mut pre.weight, &mut post.weight]);
        }
        v
    }
}

/// Keys and values of earlier tokens, per layer, for incremental decoding.
#[derive(Debug, Clone)]
pub struct KvCache {
    layers: Vec<KvSlot>,
    len: usize,
}

impl KvCache {
    /// Tokens cached so far.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

// ---------------------------------------------------------------------------------------------
// the model

/// A causal LM (`LlamaForCausalLM`, `MistralForCausalLM`, `Qwen2ForCausalLM`,
/// `Qwen3ForCausalLM`, `Gemma3ForCausalLM`, `Phi3ForCausalLM`), f32.
#[derive(Debug, Clone)]
pub struct Model {
    cfg: Config,
    embed_tokens: Param, // (V, H)
    layers: Vec<Block>,
    norm: RmsNorm,
    /// (V, H); `None` when `tie_word_embeddings`, the head then reads `embed_tokens`.
    lm_head: Option<Param>,
    /// Rotary inverse frequencies, (D/2) each: the global layers', then (Gemma 3) the local
    /// layers'. A block reads `rope[block.rope]`.
    rope: Vec<Vec<f32>>,
    /// LongRoPE (Phi-3.5, Phi-4-mini): the global table for rows whose positions pass
    /// `rope_original` (transformers switches per forward, on the largest position).
    rope_long: Option<Vec<f32>>,
    rope_original: usize,
    /// LongRoPE's attention factor on cos and sin; 1 otherwise.
    rope_scale: f64,
    lora: Option<LoraConfig>,
    training: bool,
    /// NEFTune (Jain et al. 2023, arXiv:2310.05914): uniform noise of magnitude
    /// `alpha / sqrt(T * H)` on the input embeddings while training; 0 is off.
    neftune_alpha: f64,
    neftune_rng: Arc<Mutex<StdRng>>,
    /// The folder the weights came from (`base_model_name_or_path` of saved adapters).
    source: Option<PathBuf>,
    device: Device,
    /// The dtype the forward computes in (`precision.rs`); f32 unless set.
    compute_dtype: DType,
    /// Activation checkpointing per decoder layer while training.
    checkpointing: bool,
    /// Parameter gradients of checkpointed layers, merged by [`Model::backward`].
    side_grads: SideGrads,
    /// Fused kernel or composed reference, op by op ([`Model::set_kernels`]).
    kernels: Kernels,
}

impl Model {
    fn load_vb(vb: Vb, cfg: &Config) -> Result<Self> {
        let (v, h) = (cfg.vocab_size, cfg.hidden_size);
        let m = vb.pp("model");
        let embed_tokens = m.pp("embed_tokens").get(&[v, h], "weight", Init::Normal)?;
        let layers = (0..cfg.num_hidden_layers)
            .map(|i| Block::load(m.pp("layers").pp(i), cfg, i))
            .collect::<Result<Vec<_>>>()?;
        let norm = RmsNorm::load(m.pp("norm"), h, cfg)?;
        let mut rope = vec![cfg.inv_freq_for(LayerAttention::Full)];
        if cfg.local_rope() {
            rope.push(cfg.inv_freq_for(LayerAttention::Sliding));
        }
        let lm_head = if cfg.tie_word_embeddings {
            None
        } else {
            Some(vb.pp("lm_head").get(&[v, h], "weight", Init::Normal)?)
        };
        Ok(Model {
            cfg: cfg.clone(),
            embed_tokens,
            layers,
            norm,
            lm_head,
            rope,
            rope_long: cfg.inv_freq_long(),
            rope_original: cfg.rope_original_context(),
            rope_scale: cfg.rope_attention_factor(),
            lora: None,
            training: true,
            neftune_alpha: 0.0,
            neftune_rng: Arc::new(Mutex::new(StdRng::seed_from_u64(0))),
            source: None,
            device: vb.device().clone(),
            compute_dtype: DType::F32,
            checkpointing: false,
            side_grads: SideGrads::default(),
            kernels: Kernels::FUSED,
        })
    }

    /// Loads a Hugging Face folder: `config.json` plus `model.safetensors` or the shards of
    /// `model.safetensors.index.json`, memory-mapped; f32 / bf16 / f16 weights become f32.
    pub fn load(dir: &Path, trainable: Trainable, device: &Device) -> Result<Model> {
        Model::load_with(dir, trainable, &LoadOptions::default(), device)
    }

    /// [`Model::load`] with options: `quantize` keeps the decoder's linear weights in GGML
    /// blocks (QLoRA: each is quantized as it loads, so the f32 model never exists whole).
    /// Embeddings, norms and the LM head stay f32, as in QLoRA.
    pub fn load_with(
        dir: &Path,
        trainable: Trainable,
        options: &LoadOptions,
        device: &Device,
    ) -> Result<Model> {
        let cfg = Config::from_file(&dir.join(CONFIG_FILE))?;
        if options.quantize.is_some() && trainable == Trainable::Full {
            return Err(Error::quantize(
                dir,
                "full fine-tuning needs f32 base weights; a quantized base is for LoRA (QLoRA)",
            ));
        }
        if options.quantize.is_some() && !device.is_cpu() {
            return Err(Error::quantize(
                dir,
                "a quantized base is implemented on the CPU only",
            ));
        }
        let src = Source::Files(SafetensorsFiles::open_dir(dir)?);
        let vb = Vb::new(&src, device).with_quantize(options.quantize);
        let mut model = Model::load_vb(vb, &cfg)?;
        model.source = Some(dir.to_path_buf());
        model.set_trainable(trainable)?;
        Ok(model)
    }

    /// Quantizes every f32 decoder linear weight to `want` (or its fallback, see
    /// [`crate::quant::fit`]); the base must be frozen. For models built in memory; files
    /// go through [`Model::load_with`].
    pub fn quantize_base(
        &mut self,
        want: candle_core::quantized::GgmlDType,
    ) -> Result<QuantSummary> {
        self.ensure_base_frozen(Path::new("<quantize>"))?;
        for lin in self.linears_mut() {
            if lin.quantized_type().is_none() {
                lin.quantize(want)?;
            }
        }
        Ok(self.quant_summary())
    }

    /// What the decoder's linear weights are stored as, and their bytes against f32.
    pub fn quant_summary(&self) -> QuantSummary {
        let mut s = QuantSummary::default();
        for lin in self.linears() {
            let (o, i) = lin.dims().unwrap_or((0, 0));
            s.f32_bytes += o * i * 4;
            s.bytes += lin.weight_bytes();
            let name = lin
                .quantized_type()
                .map(crate::quant::name)
                .unwrap_or_else(|| "f32".to_string());
            *s.types.entry(name).or_default() += 1;
        }
        s
    }

    /// Builds a model from named tensors (HF names), e.g. for tests. Errors name `label`.
    pub fn from_tensors(
        cfg: &Config,
        tensors: HashMap<String, Tensor>,
        trainable: Trainable,
        device: &Device,
    ) -> Result<Model> {
        let label = PathBuf::from("<in-memory tensors>");
        cfg.validate(&label)?;
        let src = Source::Map { tensors, label };
        let mut model = Model::load_vb(Vb::new(&src, device), cfg)?;
        model.set_trainable(trainable)?;
        Ok(model)
    }

    /// A frozen model with HF's init (N(0, 0.02) matrices, unit norms, zero biases), seeded.
    pub fn random(cfg: &Config, seed: u64, device: &Device) -> Result<Model> {
        cfg.validate(Path::new("<random model config>"))?;
        let src = Source::random(seed);
        Model::load_vb(Vb::new(&src, device), cfg)
    }

    fn set_trainable(&mut self, trainable: Trainable) -> Result<()> {
        match trainable {
            Trainable::None => Ok(()),
            Trainable::Lora { config, seed } => self.apply_lora(&config, seed),
            Trainable::Full => self.make_full_trainable(),
        }
    }

    pub fn config(&self) -> &Config {
        &self.cfg
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    /// `loss` applies LoRA dropout while training (the default); `logits` and generation
    /// never do.
    pub fn set_training(&mut self, training: bool) {
        self.training = training;
    }

    /// Restarts every LoRA dropout stream from `seed`. The trainer calls this before each
    /// micro-batch with a seed derived from the step, so a resumed run draws the same masks
    /// as an uninterrupted one.
    pub fn reseed_dropout(&mut self, seed: u64) {
        *self.neftune_rng.lock().unwrap_or_else(|e| e.into_inner()) =
            StdRng::seed_from_u64(dropout_seed(seed, usize::MAX - 1));
        for (i, lin) in self.linears_mut().enumerate() {
            if let Some(lora) = lin.lora.as_mut() {
                *lora.rng.lock().unwrap_or_else(|e| e.into_inner()) =
                    StdRng::seed_from_u64(dropout_seed(seed, i));
            }
        }
    }

    /// Activation checkpointing per decoder layer (training only): a layer keeps only its
    /// input, and backward recomputes it, trading about one extra forward for activation
    /// memory. Gradients then come from [`Model::backward`], not `loss.backward()`.
    pub fn set_activation_checkpointing(&mut self, on: bool) {
        self.checkpointing = on;
    }

    pub fn activation_checkpointing(&self) -> bool {
        self.checkpointing
    }

    /// `loss.backward()`, plus the parameter gradients that checkpointed layers computed
    /// on the side. Use this rather than `loss.backward()` for a loss from [`Model::loss`].
    pub fn backward(&self, loss: &Tensor) -> Result<candle_core::backprop::GradStore> {
        self.side_grads.clear();
        let mut grads = loss.backward()?;
        self.side_grads.merge_into(&mut grads)?;
        Ok(grads)
    }

    /// Runs each op as `kernels` says: its fused kernel (the default) or its composed reference
    /// (`whet_kernels::self_check` finds the fused ops that are wrong on a device).
    pub fn set_kernels(&mut self, kernels: Kernels) {
        self.kernels = kernels;
    }

    pub fn kernels(&self) -> Kernels {
        self.kernels
    }

    /// Turns NEFTune embedding noise on (`alpha > 0`, typically 5) or off (0) for training.
    pub fn set_neftune(&mut self, alpha: f64) {
        self.neftune_alpha = alpha.max(0.0);
    }

    pub fn is_training(&self) -> bool {
        self.training
    }

    pub fn lora_config(&self) -> Option<&LoraConfig> {
        self.lora.as_ref()
    }

    fn linears(&self) -> impl Iterator<Item = &Linear> {
        self.layers.iter().flat_map(Block::linears)
    }

    fn linears_mut(&mut self) -> impl Iterator<Item = &mut Linear> {
        self.layers.iter_mut().flat_map(Block::linears_mut)
    }

    /// Every weight, HF state-dict order, LoRA A/B right after the layer they adapt.
    fn params(&self) -> Vec<&Param> {
        let mut v = vec![&self.embed_tokens];
        for block in &self.layers {
            for l in block.linears() {
                v.extend(l.params());
            }
            v.extend(block.norms());
        }
        v.push(&self.norm.weight);
        v.extend(self.lm_head.as_ref());
        v
    }

    /// The HF (base) weights only.
    fn base_params_mut(&mut self) -> Vec<&mut Param> {
        let mut v = vec![&mut self.embed_tokens];
        for block in &mut self.layers {
            v.extend(block.base_params_mut());
        }
        v.push(&mut self.norm.weight);
        v.extend(self.lm_head.as_mut());
        v
    }

    /// The weights that get gradients, with their names: PEFT names
    /// (`base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight`) under LoRA, HF
    /// names (`model.layers.0.self_attn.q_proj.weight`) under full fine-tuning, none when
    /// frozen. A tied LM head appears once, as `model.embed_tokens.weight`.
    pub fn trainable(&self) -> Vec<(String, Var)> {
        self.params()
            .into_iter()
            .filter(|p| p.t.is_variable())
            .filter_map(|p| Var::from_tensor(&p.t).ok().map(|v| (p.name.clone(), v)))
            .collect()
    }

    /// The base model's weights with HF names (what `model.safetensors` holds), f32; a
    /// quantized base weight is dequantized.
    pub fn named_weights(&self) -> Result<Vec<(String, Tensor)>> {
        let p = |p: &Param| (p.name.clone(), p.t.clone());
        let mut v = vec![p(&self.embed_tokens)];
        for block in &self.layers {
            for l in block.linears() {
                v.push(l.base_weight()?);
                v.extend(l.bias.as_ref().map(p));
            }
            v.extend(block.norms().into_iter().map(p));
        }
        v.push(p(&self.norm.weight));
        v.extend(self.lm_head.as_ref().map(p));
        Ok(v)
    }

    /// (total weights, trainable weights), in elements.
    pub fn num_params(&self) -> (usize, usize) {
        let ps = self.params();
        let quantized: usize = self
            .linears()
            .filter(|l| l.quantized_type().is_some())
            .map(|l| l.dims().map(|(o, i)| o * i).unwrap_or(0))
            .sum();
        let total = ps.iter().map(|p| p.t.elem_count()).sum::<usize>() + quantized;
        let trainable = ps
            .iter()
            .filter(|p| p.t.is_variable())
            .map(|p| p.t.elem_count())
            .sum();
        (total, trainable)
    }

    /// The first weight (base, bias, norm, LoRA A/B) holding NaN or an infinity, by name. A
    /// quantized base weight is not scanned here: its f32 values were checked as it loaded.
    pub fn first_non_finite_weight(&self) -> Result<Option<String>> {
        for p in self.params() {
            if !crate::load::all_finite(&p.t)? {
                return Ok(Some(p.name.clone()));
            }
        }
        Ok(None)
    }

    /// Why a loss or logit of this model came out NaN or infinite: a weight holding NaN/inf
    /// (named), else arithmetic that overflowed with finite weights. Evaluation, generation
    /// and training all report through this ([`Model::ensure_finite`]).
    pub fn non_finite_cause(&self) -> String {
        match self.first_non_finite_weight() {
            Ok(Some(name)) => {
                format!("the model weights contain NaN/inf (checked: tensor `{name}`)")
            }
            Ok(None) => format!(
                "the weights are finite (checked: all {} tensors), so the arithmetic overflowed: check rope_theta ({}) and rms_norm_eps ({}) in config.json, weights of extreme scale, {}and, when training, a learning rate that is too high",
                self.params().len(),
                self.cfg.rope_base(),
                self.cfg.rms_norm_eps,
                if self.compute_dtype == DType::F32 {
                    ""
                } else {
                    "the reduced-precision compute (try --dtype f32), "
                }
            ),
            Err(e) => format!("the weights could not be checked for NaN/inf ({e})"),
        }
    }

    /// `Ok` for a finite `value`; otherwise [`Error::NonFinite`] naming `what` ("the loss",
    /// "a logit") and [`Model::non_finite_cause`].
    pub fn ensure_finite(&self, what: &str, value: f32) -> Result<()> {
        if value.is_finite() {
            return Ok(());
        }
        Err(Error::NonFinite {
            what: what.to_string(),
            value,
            cause: self.non_finite_cause(),
        })
    }

    /// Full fine-tuning: every base weight becomes a Var (a copy of the frozen tensor).
    pub fn make_full_trainable(&mut self) -> Result<()> {
        if self.lora.is_some() {
            return Err(Error::lora(
                Path::new("<model>"),
                "full fine-tuning requested on a model with LoRA adapters; call merge_lora first",
            ));
        }
        if self.linears().any(|l| l.quantized_type().is_some()) {
            return Err(Error::quantize(
                Path::new("<model>"),
                "full fine-tuning needs f32 base weights; a quantized base is for LoRA (QLoRA)",
            ));
        }
        for p in self.base_params_mut() {
            p.make_trainable()?;
        }
        Ok(())
    }

    /// Attaches fresh LoRA adapters (PEFT init, seeded) to the target modules, replacing any
    /// existing ones. The base stays frozen.
    pub fn apply_lora(&mut self, cfg: &LoraConfig, seed: u64) -> Result<()> {
        let label = Path::new("<lora config>");
        let modules = cfg.modules_for(self.cfg.linear_modules(), label)?;
        self.ensure_base_frozen(label)?;
        let mut init = StdRng::seed_from_u64(seed);
        for (i, lin) in self.linears_mut().enumerate() {
            if modules.contains(&lin.module()) {
                lin.attach_lora(cfg, &mut init, dropout_seed(seed, i))?;
            } else {
                lin.lora = None;
            }
        }
        self.lora = Some(cfg.clone());
        Ok(())
    }

    fn ensure_base_frozen(&mut self, label: &Path) -> Result<()> {
        if self.base_params_mut().iter().any(|p| p.t.is_variable()) {
            return Err(Error::lora(
                label,
                "the base weights are trainable (full fine-tuning); LoRA needs a frozen base",
            ));
        }
        Ok(())
    }

    /// Folds every adapter into its base weight (`W += scale * B @ A`, f32) and removes the
    /// adapters; the merged model is frozen and saves as a plain HF model.
    pub fn merge_lora(&mut self) -> Result<()> {
        for lin in self.linears_mut() {
            lin.merge_lora()?;
        }
        self.lora = None;
        Ok(())
    }

    /// Writes PEFT's `adapter_config.json` and `adapter_model.safetensors` into `dir` (created
    /// if needed), each atomically; to write the folder as a whole, call this inside
    /// `whet_data::atomic::write_dir`.
    pub fn save_adapter(&self, dir: &Path) -> Result<()> {
        let Some(cfg) = &self.lora else {
            return Err(Error::lora(dir, "the model has no LoRA adapters to save"));
        };
        let tensors: Vec<(String, Tensor)> = self
            .linears()
            .filter_map(|l| l.lora.as_ref())
            .flat_map(|l| {
                [
                    (l.a.name.clone(), l.a.t.clone()),
                    (l.b.name.clone(), l.b.t.clone()),
                ]
            })
            .collect();
        let base = self
            .source
            .as_ref()
            .map(|p| p.display().to_string())
            .unwrap_or_default();
        lora::write_adapter(dir, cfg, &base, self.cfg.linear_modules(), tensors)
    }

    /// Loads a PEFT LoRA adapter folder onto the (frozen) base, replacing any adapters.
    /// The loaded A/B are Vars, so training can continue from them. Returns its config.
    pub fn load_adapter(&mut self, dir: &Path) -> Result<LoraConfig> {
        let (cfg, _base, weights_path) = lora::read_adapter_config(dir)?;
        let modules = cfg.modules_for(
            self.cfg.linear_modules(),
            &dir.join(lora::ADAPTER_CONFIG_FILE),
        )?;
        self.ensure_base_frozen(dir)?;
        let files = SafetensorsFiles::open(std::slice::from_ref(&weights_path))?;
        let mut used = 0;
        let r = cfg.r;
        let device = self.device.clone();
        let mut loaded = Vec::new();
        for (i, lin) in self.linears().enumerate() {
            if !modules.contains(&lin.module()) {
                continue;
            }
            let (out_dim, in_dim) = lin.dims()?;
            let (name_a, name_b) = lin.peft_names();
            let a = files.load(&name_a, Some(&[r, in_dim]), &device)?; // (R, IN)
            let b = files.load(&name_b, Some(&[out_dim, r]), &device)?; // (OUT, R)
            used += 2;
            loaded.push((i, a, b));
        }
        let total = files.names().count();
        if used != total {
            let known: Vec<String> = self
                .linears()
                .flat_map(|l| {
                    let (a, b) = l.peft_names();
                    [a, b]
                })
                .collect();
            let mut extra: Vec<&str> = files
                .names()
                .filter(|n| !known.iter().any(|k| k == n))
                .collect();
            extra.sort();
            return Err(Error::lora(
                &weights_path,
                format!(
                    "{} tensor(s) match no targeted module of this model (first: {:?}); the adapter was made for another model or targets unsupported modules",
                    total - used,
                    extra
                        .first()
                        .copied()
                        .unwrap_or("a module outside target_modules")
                ),
            ));
        }
        let mut loaded = loaded.into_iter().peekable();
        for (i, lin) in self.linears_mut().enumerate() {
            match loaded.next_if(|(j, _, _)| *j == i) {
                Some((_, a, b)) => lin.set_lora(&cfg, a, b, dropout_seed(0, i))?,
                None => lin.lora = None,
            }
        }
        self.lora = Some(cfg.clone());
        Ok(cfg)
    }

    /// A copy of this (frozen) model with the adapter in `dir` loaded, its own adapters
    /// replacing any `self` has; `self` is unchanged. Every base weight is shared with `self`
    /// (tensors are reference-counted): one base in memory serves several adapters.
    pub fn with_adapter(&self, dir: &Path) -> Result<Model> {
        let mut m = self.clone();
        m.load_adapter(dir)?;
        Ok(m)
    }

    /// Writes `config.json` and `model.safetensors` (f32, HF names) into `dir`: a full
    /// fine-tuning checkpoint, or a merged LoRA model (call [`Model::merge_lora`] first). Each
    /// file is written atomically; see [`Model::save_adapter`] for the folder.
    pub fn save_pretrained(&self, dir: &Path) -> Result<()> {
        if self.lora.is_some() {
            return Err(Error::lora(
                dir,
                "save_pretrained writes base weights only; call merge_lora first or use save_adapter",
            ));
        }
        let cfg_path = dir.join(CONFIG_FILE);
        let json = serde_json::to_string_pretty(&self.cfg)
            .map_err(|e| Error::json(&cfg_path, ".".into(), &e))?;
        whet_data::atomic::write_file(
            &cfg_path,
            json.as_bytes(),
            whet_data::atomic::Existing::Replace,
        )?;
        crate::load::save_safetensors(&dir.join(WEIGHTS_FILE), self.named_weights()?, None)
    }

    /// A copy whose weights are plain tensors (shared storage, no Vars): running it builds no
    /// autograd graph. Generation uses it.
    pub fn detached(&self) -> Model {
        let mut m = self.clone();
        for p in m.base_params_mut() {
            p.t = p.t.detach();
        }
        for lin in m.linears_mut() {
            for p in lin.lora_params_mut() {
                p.t = p.t.detach();
            }
        }
        m
    }

    fn lm_head_weight(&self) -> &Tensor {
        &self.lm_head.as_ref().unwrap_or(&self.embed_tokens).t // (V, H)
    }

    // ---- forward ----

    /// ids, positions, segments: (B, T) u32, checked.
    fn check_inputs(
        &self,
        ids: &Tensor,
        positions: &Tensor,
        segments: &Tensor,
    ) -> Result<(usize, usize)> {
        let (b, t) = check_2d(ids, "ids", DType::U32, None)?;
        check_2d(positions, "positions", DType::U32, Some((b, t)))?;
        check_2d(segments, "segments", DType::U32, Some((b, t)))?;
        self.check_id_range(ids)?;
        Ok((b, t))
    }

    fn check_id_range(&self, ids: &Tensor) -> Result<()> {
        let v = self.cfg.vocab_size as u32;
        if let Some((i, &id)) = ids
            .flatten_all()?
            .to_vec1::<u32>()?
            .iter()
            .enumerate()
            .find(|(_, id)| **id >= v)
        {
            return Err(Error::Input {
                input: "ids",
                expected: format!("token ids below vocab_size = {v}"),
                found: format!("{id} at flat position {i}"),
            });
        }
        Ok(())
    }

    /// Final hidden states (after the last norm). ids/positions/segments: (B, T) -> (B, T, H)
    fn hidden(
        &self,
        ids: &Tensor,
        positions: &Tensor,
        segments: &Tensor,
        train: bool,
    ) -> Result<Tensor> {
        let (b, t) = ids.dims2()?;
        let (h, ops) = (self.cfg.hidden_size, self.kernels);
        let mut x = self.embed(ids)?; // (B, T, H)
        if train && self.neftune_alpha > 0.0 {
            // HF `neftune_post_forward_hook`: U(-mag, mag) with mag = alpha / sqrt(T * H).
            let mag = (self.neftune_alpha / ((t * h) as f64).sqrt()) as f32;
            let mut rng = self.neftune_rng.lock().unwrap_or_else(|e| e.into_inner());
            let noise: Vec<f32> = (0..b * t * h)
                .map(|_| rng.random_range(-mag..=mag))
                .collect();
            let noise = Tensor::from_vec(noise, (b, t, h), &self.device)?.to_dtype(x.dtype())?;
            x = (x + noise)?; // (B, T, H)
        }
        let tables = self.rope_tables(positions, x.dtype())?;
        for block in &self.layers {
            let (cos, sin) = &tables[block.rope];
            x = if train && self.checkpointing {
                block.forward_checkpointed(&x, cos, sin, segments, &self.side_grads, ops)?
            } else {
                block.forward(&x, cos, sin, segments, None, (train, ops))?
            }; // (B, T, H)
        }
        self.norm.forward(&x, ops) // (B, T, H)
    }

    /// Token embeddings, (B, T) -> (B, T, H); Gemma scales them by `sqrt(hidden)`.
    fn embed(&self, ids: &Tensor) -> Result<Tensor> {
        let (b, t) = ids.dims2()?;
        let h = self.cfg.hidden_size;
        let x = self
            .embed_tokens
            .t
            .embedding(&ids.flatten_all()?)? // (B * T, H)
            .reshape((b, t, h))?; // (B, T, H)
        if self.cfg.is_gemma() {
            // HF `Gemma3TextScaledWordEmbedding`: the scale in the weights' dtype.
            let scale = Tensor::new((h as f32).sqrt(), x.device())?.to_dtype(x.dtype())?;
            return Ok(x.broadcast_mul(&scale)?);
        }
        Ok(x)
    }

    /// (cos, sin), (B, T, R/2) each in `dtype`, per rotary table. LongRoPE: the long table when
    /// the largest position reaches past the original context (HF `longrope_frequency_update`),
    /// cos and sin scaled by the attention factor.
    fn rope_tables(&self, positions: &Tensor, dtype: DType) -> Result<Vec<(Tensor, Tensor)>> {
        let long = match &self.rope_long {
            Some(long) => {
                let last = positions.flatten_all()?.max(0)?.to_scalar::<u32>()? as usize;
                (last + 1 > self.rope_original).then_some(long)
            }
            None => None,
        };
        self.rope
            .iter()
            .enumerate()
            .map(|(i, inv_freq)| {
                let inv_freq = match long {
                    Some(long) if i == 0 => long,
                    _ => inv_freq,
                };
                let (mut cos, mut sin) = rope_tables(positions, inv_freq)?;
                if self.rope_scale != 1.0 {
                    (cos, sin) = ((cos * self.rope_scale)?, (sin * self.rope_scale)?);
                }
                Ok((cos.to_dtype(dtype)?, sin.to_dtype(dtype)?))
            })
            .collect()
    }

    /// Training forward. ids, positions, segments: (B, T) u32 (a packed row restarts
    /// positions and changes segment at each document); targets: (B, T) i64 next-token ids
    /// already shifted, [`IGNORE_INDEX`] where unsupervised.
    ///
    /// Returns the **sum** of cross-entropy over supervised positions and their count; the
    /// trainer divides by the count over the whole accumulated batch. Only supervised rows go
    /// through the LM head, [`LOSS_CHUNK_ROWS`] at a time, so the (N, V) logits never exist.
    /// LoRA dropout is on while [`Model::is_training`].
    pub fn loss(
        &self,
        ids: &Tensor,
        positions: &Tensor,
        segments: &Tensor,
        targets: &Tensor,
    ) -> Result<(Tensor, usize)> {
        let (b, t) = self.check_inputs(ids, positions, segments)?;
        check_2d(targets, "targets", DType::I64, Some((b, t)))?;
        let targets = targets.flatten_all()?; // (N)
        let rows = self.supervised_positions(&targets)?;
        let n = rows.len();
        if n == 0 {
            return Ok((Tensor::zeros((), DType::F32, &self.device)?, 0));
        }
        let view = self.compute_view()?; // bf16 compute: see precision.rs
        let hidden = view.hidden(ids, positions, segments, self.training)?; // (B, T, H)
        let hidden = hidden.reshape((b * t, self.cfg.hidden_size))?; // (N, H)
        let (hidden, targets) = if n == b * t {
            (hidden, targets)
        } else {
            let idx = Tensor::from_vec(rows, n, &self.device)?; // (n)
            (
                hidden.index_select(&idx, 0)?,
                targets.index_select(&idx, 0)?,
            ) // (n, H), (n)
        };
        // While training, the backward will run: the LM head computes its gradients from the
        // forward's logits instead of recomputing them.
        let loss = self
            .kernels
            .linear_cross_entropy_sum(
                &hidden,
                view.lm_head_weight(),
                &targets,
                LOSS_CHUNK_ROWS,
                self.training,
            )?
            .to_dtype(DType::F32)?; // ()
        Ok((loss, n))
    }

    /// The flat positions of `targets` (N) i64 that are supervised (not [`IGNORE_INDEX`]), in
    /// order; a target outside the vocabulary is an error naming its flat position.
    fn supervised_positions(&self, targets: &Tensor) -> Result<Vec<u32>> {
        let v = self.cfg.vocab_size as i64;
        let mut rows: Vec<u32> = Vec::new();
        for (i, &tgt) in targets.to_vec1::<i64>()?.iter().enumerate() {
            if tgt == IGNORE_INDEX {
                continue;
            }
            if !(0..v).contains(&tgt) {
                return Err(Error::Input {
                    input: "targets",
                    expected: format!("token ids in [0, {v}) or {IGNORE_INDEX}"),
                    found: format!("{tgt} at flat position {i}"),
                });
            }
            rows.push(i as u32);
        }
        Ok(rows)
    }

    /// Evaluation forward (no dropout): (B, T) u32 inputs -> logits (B, T, V).
    pub fn logits(&self, ids: &Tensor, positions: &Tensor, segments: &Tensor) -> Result<Tensor> {
        self.check_inputs(ids, positions, segments)?;
        let view = self.compute_view()?;
        let hidden = view.hidden(ids, positions, segments, false)?; // (B, T, H)
        let logits = self.kernels.linear(&hidden, view.lm_head_weight(), None)?;
        Ok(logits.to_dtype(DType::F32)?) // (B, T, V)
    }

    pub fn new_cache(&self) -> KvCache {
        KvCache {
            layers: vec![None; self.layers.len()],
            len: 0,
        }
    }

    /// Incremental decoding: runs `ids` (B, T) u32 after the `cache.len()` tokens already in
    /// `cache` (positions continue from there, one document per row), appends their keys and
    /// values, and returns the logits of the last position, (B, V). No dropout.
    pub fn forward_cached(&self, ids: &Tensor, cache: &mut KvCache) -> Result<Tensor> {
        let (b, t) = check_2d(ids, "ids", DType::U32, None)?;
        let start = cache.len;
        let s = start + t;
        let positions: Vec<u32> = (0..b).flat_map(|_| start as u32..s as u32).collect();
        let positions = Tensor::from_vec(positions, (b, t), &self.device)?; // (B, T)
        let segments = Tensor::zeros((b, s), DType::U32, &self.device)?; // (B, S)
        self.forward_cached_with(ids, &positions, &segments, cache)
    }

    /// [`Model::forward_cached`] with each new token's position in its row's document
    /// (`positions`, (B, T) u32) and the segment of every key, cached and new (`segments`,
    /// (B, S) u32 with S = `cache.len()` + T): rows of different lengths decode together,
    /// left-padded, their padding in a segment of its own. Returns the last position's logits,
    /// (B, V).
    pub fn forward_cached_with(
        &self,
        ids: &Tensor,
        positions: &Tensor,
        segments: &Tensor,
        cache: &mut KvCache,
    ) -> Result<Tensor> {
        let (b, t) = check_2d(ids, "ids", DType::U32, None)?;
        check_2d(positions, "positions", DType::U32, Some((b, t)))?;
        let s = cache.len + t;
        check_2d(segments, "segments", DType::U32, Some((b, s)))?;
        self.check_id_range(ids)?;
        let ops = self.kernels;
        let view = self.compute_view()?;
        let this = view.as_ref();
        let mut x = this.embed(ids)?; // (B, T, H)
        let tables = self.rope_tables(positions, x.dtype())?;
        for (block, slot) in this.layers.iter().zip(cache.layers.iter_mut()) {
            let (cos, sin) = &tables[block.rope];
            x = block.forward(&x, cos, sin, segments, Some(slot), (false, ops))?; // (B, T, H)
        }
        cache.len = s;
        let last = x.narrow(1, t - 1, 1)?.squeeze(1)?; // (B, H)
        let last = this.norm.forward(&last, ops)?; // (B, H)
        let logits = ops.linear(&last, this.lm_head_weight(), None)?;
        Ok(logits.to_dtype(DType::F32)?) // (B, V)
    }
}

/// A per-layer dropout seed derived from the run seed (splitmix64 step).
fn dropout_seed(seed: u64, layer_index: usize) -> u64 {
    let mut z = seed ^ (layer_index as u64 + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

fn check_2d(
    t: &Tensor,
    input: &'static str,
    dtype: DType,
    dims: Option<(usize, usize)>,
) -> Result<(usize, usize)> {
    let want = match dims {
        Some((b, t)) => format!("({b}, {t}) {dtype:?}"),
        None => format!("(B, T) {dtype:?} with T >= 1"),
    };
    let ok_rank = t.rank() == 2 && t.dtype() == dtype;
    let found = t.dims().to_vec();
    if !ok_rank || found[1] == 0 || dims.is_some_and(|(b, tt)| found != [b, tt]) {
        return Err(Error::Input {
            input,
            expected: want,
            found: format!("{found:?} {:?}", t.dtype()),
        });
    }
    Ok((found[0], found[1]))
}
