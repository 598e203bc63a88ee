//! The linear layer every projection of the model is built from, with optional LoRA
//! (Hu et al. 2021, "LoRA: Low-Rank Adaptation of Large Language Models", arXiv:2106.09685):
//! `y = x W^T + b + scale * dropout(x) A^T B^T`, A: (R, IN), B: (OUT, R).
//!
//! Initialisation, scaling, dropout placement and parameter names follow PEFT
//! (`peft/tuners/lora/layer.py`), so adapters saved here load in PEFT and back.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{Tensor, Var};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};
use whet_data::atomic::{self, Existing};
use whet_kernels::{Kernels, Ops, quantized_linear};

use crate::error::{Error, Result};
use crate::load::{Init, Param, Vb};

/// The projections of the Llama layout (Llama, Mistral, Qwen, Gemma) that LoRA can target, in
/// model order. `all-linear` means all of a model's linears (PEFT's `all-linear` excludes the LM
/// head, as here): these, or [`FUSED_LINEAR_MODULES`] ([`crate::Config::linear_modules`]).
pub const LINEAR_MODULES: [&str; 7] = [
    "q_proj",
    "k_proj",
    "v_proj",
    "o_proj",
    "gate_proj",
    "up_proj",
    "down_proj",
];

/// Phi-3's projections, in model order: q, k and v in one `qkv_proj`, the MLP's gate and up in
/// one `gate_up_proj` (the names PEFT targets on Phi-3).
pub const FUSED_LINEAR_MODULES: [&str; 4] = ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"];

/// Every module name of either layout, in model order: what a target list may name before the
/// model is known.
pub const KNOWN_LINEAR_MODULES: [&str; 9] = [
    "q_proj",
    "k_proj",
    "v_proj",
    "qkv_proj",
    "o_proj",
    "gate_proj",
    "up_proj",
    "gate_up_proj",
    "down_proj",
];

/// Whether `modules` (any order) is every linear of one layout: what PEFT writes for
/// `all-linear`.
pub fn is_all_linear(modules: &[String]) -> bool {
    let mut given: Vec<&str> = modules.iter().map(String::as_str).collect();
    given.sort_unstable();
    given.dedup();
    [&LINEAR_MODULES[..], &FUSED_LINEAR_MODULES[..]]
        .iter()
        .any(|layout| {
            let mut l = layout.to_vec();
            l.sort_unstable();
            l == given
        })
}

pub const ADAPTER_CONFIG_FILE: &str = "adapter_config.json";
pub const ADAPTER_WEIGHTS_FILE: &str = "adapter_model.safetensors";

/// Prefix PEFT puts before a module path (`PeftModel.base_model` = `LoraModel`, whose
/// `.model` is the `LlamaForCausalLM`).
pub const PEFT_PREFIX: &str = "base_model.model.";

// ---------------------------------------------------------------------------------------------
// config

/// A LoRA recipe, as written in whet's TOML configs.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LoraConfig {
    /// Rank R.
    pub r: usize,
    /// `lora_alpha`; scale is alpha / r, or alpha / sqrt(r) with `use_rslora`.
    pub alpha: f64,
    /// Dropout on the LoRA input path during training.
    #[serde(default)]
    pub dropout: f64,
    #[serde(default)]
    pub target_modules: TargetModules,
    /// rsLoRA (Kalajdzievski 2023, arXiv:2312.03732): scale alpha / sqrt(r).
    #[serde(default)]
    pub use_rslora: bool,
}

/// `"all-linear"` or a list of module names from [`LINEAR_MODULES`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum TargetModules {
    One(String),
    Many(Vec<String>),
}

impl Default for TargetModules {
    fn default() -> Self {
        TargetModules::One("all-linear".to_string())
    }
}

impl LoraConfig {
    /// All linear projections, no dropout, plain LoRA scaling.
    pub fn new(r: usize, alpha: f64) -> Self {
        LoraConfig {
            r,
            alpha,
            dropout: 0.0,
            target_modules: TargetModules::default(),
            use_rslora: false,
        }
    }

    /// PEFT `LoraLayer.update_layer`: `lora_alpha / sqrt(r)` if rsLoRA else `lora_alpha / r`.
    pub fn scale(&self) -> f64 {
        if self.use_rslora {
            self.alpha / (self.r as f64).sqrt()
        } else {
            self.alpha / self.r as f64
        }
    }

    /// The targeted module names of a model whose linears are `linears` (in model order,
    /// [`crate::Config::linear_modules`]): `all-linear` is all of them; a listed name the model
    /// does not have is an error naming the model's own. `path` labels errors.
    pub fn modules_for(&self, linears: &[&'static str], path: &Path) -> Result<Vec<&'static str>> {
        let known = self.modules(path)?;
        if matches!(&self.target_modules, TargetModules::One(s) if s == "all-linear") {
            return Ok(linears.to_vec());
        }
        if let Some(missing) = known.iter().find(|m| !linears.contains(m)) {
            return Err(Error::lora(
                path,
                format!(
                    "target module `{missing}` is not a linear of this model; its linears are {linears:?} (or \"all-linear\")"
                ),
            ));
        }
        Ok(known)
    }

    /// The targeted module names, in [`KNOWN_LINEAR_MODULES`] order (`all-linear`: all of
    /// them; [`LoraConfig::modules_for`] resolves against one model); `path` labels errors.
    pub fn modules(&self, path: &Path) -> Result<Vec<&'static str>> {
        if self.r == 0 {
            return Err(Error::lora(path, "r = 0; the rank must be at least 1"));
        }
        if !(0.0..1.0).contains(&self.dropout) {
            return Err(Error::lora(
                path,
                format!("dropout = {}; expected a value in [0, 1)", self.dropout),
            ));
        }
        let wanted: Vec<&str> = match &self.target_modules {
            TargetModules::One(s) if s == "all-linear" => {
                return Ok(KNOWN_LINEAR_MODULES.to_vec());
            }
            TargetModules::One(s) => {
                return Err(Error::lora(
                    path,
                    format!(
                        "target_modules = {s:?}: a single string is a regex in PEFT, which is not supported; use \"all-linear\" or a list of {KNOWN_LINEAR_MODULES:?}"
                    ),
                ));
            }
            TargetModules::Many(v) => v.iter().map(String::as_str).collect(),
        };
        if wanted.is_empty() {
            return Err(Error::lora(path, "target_modules is empty"));
        }
        for w in &wanted {
            if !KNOWN_LINEAR_MODULES.contains(w) {
                return Err(Error::lora(
                    path,
                    format!(
                        "target module `{w}` is not supported; supported: {KNOWN_LINEAR_MODULES:?} or \"all-linear\""
                    ),
                ));
            }
        }
        Ok(KNOWN_LINEAR_MODULES
            .iter()
            .copied()
            .filter(|m| wanted.contains(m))
            .collect())
    }

    /// PEFT's `adapter_config.json` for this recipe on a model whose linears are `linears`
    /// (target modules expanded, as PEFT saves them after resolving `all-linear`).
    pub fn to_peft_json(
        &self,
        base_model_name_or_path: &str,
        linears: &[&'static str],
    ) -> Result<String> {
        let modules = self.modules_for(linears, Path::new(ADAPTER_CONFIG_FILE))?;
        let alpha = if self.alpha.fract() == 0.0 && self.alpha.abs() < 1e15 {
            serde_json::json!(self.alpha as i64)
        } else {
            serde_json::json!(self.alpha)
        };
        let v = serde_json::json!({
            "alpha_pattern": {},
            "auto_mapping": null,
            "base_model_name_or_path": base_model_name_or_path,
            "bias": "none",
            "fan_in_fan_out": false,
            "inference_mode": true,
            "init_lora_weights": true,
            "layers_pattern": null,
            "layers_to_transform": null,
            "lora_alpha": alpha,
            "lora_dropout": self.dropout,
            "modules_to_save": null,
            "peft_type": "LORA",
            "r": self.r,
            "rank_pattern": {},
            "revision": null,
            "target_modules": modules,
            "task_type": "CAUSAL_LM",
            "use_dora": false,
            "use_rslora": self.use_rslora,
        });
        serde_json::to_string_pretty(&v)
            .map_err(|e| Error::json(Path::new(ADAPTER_CONFIG_FILE), ".".into(), &e))
    }

    /// Reads PEFT's `adapter_config.json` text (`path` labels errors). Returns the recipe and
    /// `base_model_name_or_path`. Features PEFT has and this crate lacks are errors.
    pub fn from_peft_json(text: &str, path: &Path) -> Result<(LoraConfig, Option<String>)> {
        let f: PeftAdapterConfig = crate::error::from_json_str(text, path)?;
        let fail = |what: String| Err(Error::lora(path, what));
        if f.peft_type != "LORA" {
            return fail(format!(
                "peft_type = {:?}; only \"LORA\" adapters are supported",
                f.peft_type
            ));
        }
        if f.bias != "none" {
            return fail(format!("bias = {:?}; only \"none\" is supported", f.bias));
        }
        if f.fan_in_fan_out {
            return fail("fan_in_fan_out = true (GPT-2 Conv1D layout) is not supported".into());
        }
        if f.use_dora {
            return fail("use_dora = true: DoRA adapters are not supported".into());
        }
        if f.rank_pattern.as_ref().is_some_and(|m| !m.is_empty())
            || f.alpha_pattern.as_ref().is_some_and(|m| !m.is_empty())
        {
            return fail(
                "rank_pattern / alpha_pattern (per-module ranks) are not supported".into(),
            );
        }
        if f.modules_to_save.as_ref().is_some_and(|m| !m.is_empty()) {
            return fail("modules_to_save (fully trained extra modules) is not supported".into());
        }
        if f.layers_to_transform.as_ref().is_some_and(|v| !v.is_null()) {
            return fail("layers_to_transform (LoRA on some layers only) is not supported".into());
        }
        for (field, value) in [
            ("exclude_modules", &f.exclude_modules),
            ("target_parameters", &f.target_parameters),
            ("trainable_token_indices", &f.trainable_token_indices),
            ("layer_replication", &f.layer_replication),
        ] {
            if value.as_ref().is_some_and(|v| !v.is_null()) {
                return fail(format!(
                    "{field} is set; this PEFT feature is not supported"
                ));
            }
        }
        if f.lora_bias {
            return fail("lora_bias = true (a bias on lora_B) is not supported".into());
        }
        let cfg = LoraConfig {
            r: f.r,
            alpha: f.lora_alpha,
            dropout: f.lora_dropout,
            // PEFT's default for llama / mistral / qwen2
            // (`TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING`).
            target_modules: f
                .target_modules
                .unwrap_or_else(|| TargetModules::Many(vec!["q_proj".into(), "v_proj".into()])),
            use_rslora: f.use_rslora,
        };
        cfg.modules(path)?;
        Ok((cfg, f.base_model_name_or_path))
    }
}

/// The fields of PEFT's `LoraConfig` this crate reads.
#[derive(Deserialize)]
struct PeftAdapterConfig {
    peft_type: String,
    r: usize,
    lora_alpha: f64,
    #[serde(default)]
    lora_dropout: f64,
    #[serde(default)]
    target_modules: Option<TargetModules>,
    #[serde(default)]
    use_rslora: bool,
    #[serde(default = "bias_none")]
    bias: String,
    #[serde(default)]
    base_model_name_or_path: Option<String>,
    #[serde(default)]
    fan_in_fan_out: bool,
    #[serde(default)]
    use_dora: bool,
    #[serde(default)]
    rank_pattern: Option<serde_json::Map<String, serde_json::Value>>,
    #[serde(default)]
    alpha_pattern: Option<serde_json::Map<String, serde_json::Value>>,
    #[serde(default)]
    modules_to_save: Option<Vec<String>>,
    #[serde(default)]
    layers_to_transform: Option<serde_json::Value>,
    #[serde(default)]
    exclude_modules: Option<serde_json::Value>,
    #[serde(default)]
    target_parameters: Option<serde_json::Value>,
    #[serde(default)]
    trainable_token_indices: Option<serde_json::Value>,
    #[serde(default)]
    layer_replication: Option<serde_json::Value>,
    #[serde(default)]
    lora_bias: bool,
}

fn bias_none() -> String {
    "none".to_string()
}

// ---------------------------------------------------------------------------------------------
// the layer

/// A linear projection: frozen (or fully trainable) base weight, optional bias, optional LoRA.
#[derive(Debug, Clone)]
pub struct Linear {
    /// HF module path, e.g. `model.layers.0.self_attn.q_proj`.
    prefix: String,
    pub(crate) weight: Weight,      // (OUT, IN)
    pub(crate) bias: Option<Param>, // (OUT)
    pub(crate) lora: Option<Lora>,
}

/// A projection's base weight.
#[derive(Debug, Clone)]
pub(crate) enum Weight {
    /// f32, frozen or a Var.
    Dense(Param),
    /// Frozen, in GGML blocks (the QLoRA base): dequantized for each matmul by
    /// `whet_kernels::quantized_linear`, never kept in f32.
    Quantized { name: String, q: Arc<QTensor> },
}

#[derive(Debug, Clone)]
pub(crate) struct Lora {
    pub a: Param, // (R, IN), a Var
    pub b: Param, // (OUT, R), a Var
    pub scale: f64,
    pub dropout: f32,
    /// Dropout masks; seeded per layer so a run is reproducible.
    pub rng: Arc<Mutex<StdRng>>,
}

impl Linear {
    /// Loads the weight (and bias); with `vb.quantize()` set, the weight is quantized right
    /// away, so the f32 copies of all layers never exist at once.
    pub(crate) fn load(vb: Vb, in_dim: usize, out_dim: usize, bias: bool) -> Result<Self> {
        let weight = vb.get(&[out_dim, in_dim], "weight", Init::Normal)?;
        let bias = if bias {
            Some(vb.get(&[out_dim], "bias", Init::Zeros)?)
        } else {
            None
        };
        let mut lin = Linear {
            prefix: vb.prefix().to_string(),
            weight: Weight::Dense(weight),
            bias,
            lora: None,
        };
        if let Some(want) = vb.quantize() {
            lin.quantize(want)?;
        }
        Ok(lin)
    }

    /// Replaces a frozen f32 base weight by its GGML blocks of type `want` (or llama.cpp's
    /// fallback when `want`'s blocks do not tile a row, see [`crate::quant::fit`]). Returns
    /// the type used; `None` leaves the weight as it is (rows not a multiple of 32).
    pub fn quantize(&mut self, want: GgmlDType) -> Result<Option<GgmlDType>> {
        let Weight::Dense(p) = &self.weight else {
            return Err(Error::quantize(
                std::path::Path::new(&self.prefix),
                "the base weight is already quantized",
            ));
        };
        if p.t.is_variable() {
            return Err(Error::quantize(
                std::path::Path::new(&self.prefix),
                "a trainable (full fine-tuning) weight cannot be quantized; QLoRA keeps the base frozen",
            ));
        }
        let (_, in_dim) = p.t.dims2()?;
        let Some(ty) = crate::quant::fit(want, in_dim) else {
            return Ok(None);
        };
        let q = QTensor::quantize(&p.t, ty)?;
        self.weight = Weight::Quantized {
            name: p.name.clone(),
            q: Arc::new(q),
        };
        Ok(Some(ty))
    }

    /// The GGML type of a quantized base weight; `None` for an f32 one.
    pub fn quantized_type(&self) -> Option<GgmlDType> {
        match &self.weight {
            Weight::Dense(_) => None,
            Weight::Quantized { q, .. } => Some(q.dtype()),
        }
    }

    /// Bytes the base weight occupies in memory (f32, or its GGML blocks).
    pub fn weight_bytes(&self) -> usize {
        match &self.weight {
            Weight::Dense(p) => p.t.elem_count() * p.t.dtype().size_in_bytes(),
            Weight::Quantized { q, .. } => q.storage_size_in_bytes(),
        }
    }

    /// The base weight under its HF name, f32 (dequantized if quantized).
    pub(crate) fn base_weight(&self) -> Result<(String, Tensor)> {
        Ok(match &self.weight {
            Weight::Dense(p) => (p.name.clone(), p.t.clone()),
            Weight::Quantized { name, q } => {
                (name.clone(), q.dequantize(&candle_core::Device::Cpu)?)
            }
        })
    }

    /// The module's own name (`q_proj`), matched against LoRA target modules.
    pub fn module(&self) -> &str {
        self.prefix.rsplit('.').next().unwrap_or(&self.prefix)
    }

    /// The HF module path (`model.layers.0.self_attn.q_proj`).
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// (OUT, IN)
    pub fn dims(&self) -> Result<(usize, usize)> {
        Ok(match &self.weight {
            Weight::Dense(p) => p.t.dims2()?,
            Weight::Quantized { q, .. } => q.shape().dims2()?,
        })
    }

    /// PEFT's names for this layer's A and B.
    pub fn peft_names(&self) -> (String, String) {
        (
            format!("{PEFT_PREFIX}{}.lora_A.weight", self.prefix),
            format!("{PEFT_PREFIX}{}.lora_B.weight", self.prefix),
        )
    }

    /// x: (.., IN) -> (.., OUT). `train` turns LoRA dropout on; `ops` picks each op's
    /// implementation.
    pub fn forward(&self, x: &Tensor, train: bool, ops: Kernels) -> Result<Tensor> {
        let bias = self.bias.as_ref().map(|b| &b.t);
        if let (Weight::Dense(w), Some(lora)) = (&self.weight, &self.lora) {
            // PEFT `Linear.forward`: `result + lora_B(lora_A(dropout(x))) * scaling`, one op.
            let mask = if train && lora.dropout > 0.0 {
                Some(dropout_mask(x, lora.dropout, &lora.rng)?) // (..)
            } else {
                None
            };
            return Ok(ops.lora_linear(
                x,
                &w.t,
                bias,
                (&lora.a.t, &lora.b.t),
                lora.scale,
                mask.as_ref(),
            )?); // (.., OUT)
        }
        let y = match (&self.weight, bias) {
            (Weight::Dense(w), bias) => ops.linear(x, &w.t, bias)?, // (.., OUT)
            (Weight::Quantized { q, .. }, None) => quantized_linear(x, q)?,
            (Weight::Quantized { q, .. }, Some(b)) => quantized_linear(x, q)?.broadcast_add(b)?,
        };
        let Some(lora) = &self.lora else {
            return Ok(y);
        };
        // PEFT `Linear.forward`: `result + lora_B(lora_A(dropout(x))) * scaling`.
        let x_in = if train && lora.dropout > 0.0 {
            dropout(x, lora.dropout, &lora.rng)? // (.., IN)
        } else {
            x.clone()
        };
        let down = ops.linear(&x_in, &lora.a.t, None)?; // (.., R)
        let up = ops.linear(&down, &lora.b.t, None)?; // (.., OUT)
        Ok((y + (up * lora.scale)?)?)
    }

    /// Attaches a fresh adapter, PEFT init: A ~ kaiming_uniform(a = sqrt(5)), which is
    /// U(-1/sqrt(IN), 1/sqrt(IN)); B = 0, so the model starts unchanged.
    pub(crate) fn attach_lora(
        &mut self,
        cfg: &LoraConfig,
        init: &mut StdRng,
        dropout_seed: u64,
    ) -> Result<()> {
        let (out_dim, in_dim) = self.dims()?;
        if cfg.r > out_dim.min(in_dim) {
            // A rank past min(in, out) adds nothing a full update would not, and a huge one
            // would abort on allocation below.
            return Err(Error::lora(
                Path::new("<lora config>"),
                format!(
                    "r = {} is larger than {} = min(out {out_dim}, in {in_dim}) of `{}`; use a rank of at most {}",
                    cfg.r,
                    out_dim.min(in_dim),
                    self.module(),
                    out_dim.min(in_dim)
                ),
            ));
        }
        let dev = match &self.weight {
            Weight::Dense(p) => p.t.device().clone(),
            Weight::Quantized { .. } => candle_core::Device::Cpu,
        };
        let bound = 1.0 / (in_dim as f32).sqrt();
        let a: Vec<f32> = (0..cfg.r * in_dim)
            .map(|_| init.random_range(-bound..bound))
            .collect();
        let a = Var::from_vec(a, (cfg.r, in_dim), &dev)?.into_inner(); // (R, IN)
        let b = Var::zeros((out_dim, cfg.r), candle_core::DType::F32, &dev)?.into_inner(); // (OUT, R)
        self.set_lora(cfg, a, b, dropout_seed)
    }

    /// Installs A (R, IN) and B (OUT, R) as trainable Vars.
    pub(crate) fn set_lora(
        &mut self,
        cfg: &LoraConfig,
        a: Tensor,
        b: Tensor,
        dropout_seed: u64,
    ) -> Result<()> {
        let (name_a, name_b) = self.peft_names();
        let mut a = Param { name: name_a, t: a };
        let mut b = Param { name: name_b, t: b };
        a.make_trainable()?;
        b.make_trainable()?;
        self.lora = Some(Lora {
            a,
            b,
            scale: cfg.scale(),
            dropout: cfg.dropout as f32,
            rng: Arc::new(Mutex::new(StdRng::seed_from_u64(dropout_seed))),
        });
        Ok(())
    }

    /// `W += scale * B @ A` in f32, then drops the adapter. The merged weight is frozen and
    /// f32 (a quantized base is dequantized first).
    pub(crate) fn merge_lora(&mut self) -> Result<()> {
        let Some(lora) = self.lora.take() else {
            return Ok(());
        };
        let delta = lora.b.t.detach().matmul(&lora.a.t.detach())?; // (OUT, IN)
        let (name, base) = self.base_weight()?;
        let merged = (base.detach() + (delta * lora.scale)?)?; // (OUT, IN)
        self.weight = Weight::Dense(Param { name, t: merged });
        Ok(())
    }

    /// f32 base weight, bias, then LoRA A and B. A quantized base weight is not a `Param`
    /// and is left out.
    pub(crate) fn params(&self) -> Vec<&Param> {
        let mut v: Vec<&Param> = match &self.weight {
            Weight::Dense(p) => vec![p],
            Weight::Quantized { .. } => vec![],
        };
        v.extend(self.bias.as_ref());
        if let Some(l) = &self.lora {
            v.push(&l.a);
            v.push(&l.b);
        }
        v
    }

    /// f32 base weight and bias only (the HF state dict less quantized weights).
    pub(crate) fn base_params_mut(&mut self) -> Vec<&mut Param> {
        let mut v: Vec<&mut Param> = match &mut self.weight {
            Weight::Dense(p) => vec![p],
            Weight::Quantized { .. } => vec![],
        };
        v.extend(self.bias.as_mut());
        v
    }

    pub(crate) fn lora_params_mut(&mut self) -> Vec<&mut Param> {
        match &mut self.lora {
            Some(l) => vec![&mut l.a, &mut l.b],
            None => vec![],
        }
    }
}

/// Inverted dropout: zero each element with probability `p`, scale the rest by 1 / (1 - p).
/// x: (..) -> (..). The mask is drawn from `rng`, so runs are reproducible.
fn dropout(x: &Tensor, p: f32, rng: &Mutex<StdRng>) -> Result<Tensor> {
    Ok((x * dropout_mask(x, p, rng)?)?)
}

/// The mask of [`dropout`]: 0 with probability `p`, else 1 / (1 - p); x's shape and dtype.
/// One draw from `rng` seeds the mask, which `whet_kernels::dropout_mask` computes on x's own
/// device (the same mask on every device for the same stream).
fn dropout_mask(x: &Tensor, p: f32, rng: &Mutex<StdRng>) -> Result<Tensor> {
    let seed: u64 = rng.lock().unwrap_or_else(|e| e.into_inner()).random();
    Ok(whet_kernels::dropout_mask(
        x.shape(),
        p,
        seed,
        x.dtype(),
        x.device(),
    )?) // (..)
}

/// Writes `adapter_model.safetensors` (PEFT names) and `adapter_config.json` into `dir`, each
/// file atomically (a folder written as a whole is the caller's `whet_data::atomic::write_dir`).
pub(crate) fn write_adapter(
    dir: &Path,
    cfg: &LoraConfig,
    base_model_name_or_path: &str,
    linears: &[&'static str],
    tensors: Vec<(String, Tensor)>,
) -> Result<()> {
    let cfg_path = dir.join(ADAPTER_CONFIG_FILE);
    let json = cfg.to_peft_json(base_model_name_or_path, linears)?;
    atomic::write_file(&cfg_path, json.as_bytes(), Existing::Replace)?;
    crate::load::save_safetensors(&dir.join(ADAPTER_WEIGHTS_FILE), tensors, None)
}

/// Reads `adapter_config.json` from `dir`.
pub(crate) fn read_adapter_config(dir: &Path) -> Result<(LoraConfig, Option<String>, PathBuf)> {
    let path = dir.join(ADAPTER_CONFIG_FILE);
    let text = std::fs::read_to_string(&path).map_err(|e| match e.kind() {
        std::io::ErrorKind::NotFound => Error::MissingFile {
            path: path.clone(),
            what: "adapter_config.json",
            hint: "a PEFT adapter folder holds adapter_config.json and adapter_model.safetensors",
        },
        _ => Error::io(&path, "read", e),
    })?;
    let (cfg, base) = LoraConfig::from_peft_json(&text, &path)?;
    Ok((cfg, base, dir.join(ADAPTER_WEIGHTS_FILE)))
}
