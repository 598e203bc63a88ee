//! Where and how models run: the device and compute dtype (`--device`, `--dtype`) and the kernel
//! set (`--kernels`, `WHET_KERNELS`), as one [`Runtime`] that `main.rs` builds from the flags and
//! passes to every command; and the loading that needs them (a model, a model for training),
//! with the tokenizer and the run id beside it.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use crate::config::{Config, Method};
use anyhow::{Context, Result, bail};
use candle_core::{DType, Device};
use whet_kernels::Kernels;
use whet_model::{LoadOptions, Model, Trainable};
use whet_tokenize::Tokenizer;
use whet_train::Row;

use crate::cli::ModelArgs;

/// `--kernels` as given, checked.
#[derive(Debug, Clone, Copy)]
enum KernelChoice {
    /// The fused kernels; on CUDA after the self-check.
    Auto,
    /// The self-check on any device.
    Check,
    /// `fused`, `reference` or `reference:OP,OP..`.
    Fixed(Kernels),
}

/// The device, compute dtype and kernel set of this process's commands.
#[derive(Debug)]
pub struct Runtime {
    device: Device,
    dtype: DType,
    kernels_choice: KernelChoice,
    /// The set `kernels_choice` resolved to, on the first model load (see [`Runtime::kernels`]).
    kernels: OnceLock<Kernels>,
}

impl Runtime {
    /// Picks the device (`cpu`, `cuda`, `cuda:N`), the compute dtype (`auto`: bf16 on CUDA, f32
    /// on the CPU; `f32`; `bf16`, CUDA only) and how each op runs (`auto`: the fused kernels; on
    /// CUDA after a self-check against the composed reference, an op that fails it running its
    /// reference; `check`: the same self-check on any device; `fused`, `reference`, or
    /// `reference:OP,OP..`). The kernels are checked now, resolved when a command first loads
    /// a model.
    pub fn new(device: &str, dtype: &str, kernels: &str) -> Result<Runtime> {
        let dev = match device {
            "cpu" => Device::Cpu,
            cuda if cuda == "cuda" || cuda.starts_with("cuda:") => {
                let ordinal: usize = match cuda.strip_prefix("cuda:") {
                    Some(n) => n
                        .parse()
                        .with_context(|| format!("--device {cuda}: expected cuda:N, N a number"))?,
                    // One rank per GPU: the rank's local rank among the visible devices.
                    None => whet_train::comm::local_cuda_ordinal(),
                };
                if !cfg!(feature = "cuda") {
                    bail!(
                        "--device {cuda}: this whet was built without CUDA; build it with `cargo build --release -p whet --features cuda` (a CUDA toolkit is needed; `cargo xtask cuda-build` installs one)"
                    )
                }
                Device::new_cuda(ordinal).with_context(|| format!("--device {cuda}"))?
            }
            other => bail!("--device {other:?}: expected cpu, cuda or cuda:N"),
        };
        let dt = match (dtype, dev.is_cuda()) {
            ("auto", true) | ("bf16", true) => DType::BF16,
            ("auto", false) | ("f32", _) => DType::F32,
            ("bf16", false) => bail!("--dtype bf16 needs --device cuda (the CPU kernels are f32)"),
            (other, _) => bail!("--dtype {other:?}: expected auto, f32 or bf16"),
        };
        let kernels_choice = match kernels {
            "auto" => KernelChoice::Auto,
            "check" => KernelChoice::Check,
            other => KernelChoice::Fixed(
                Kernels::parse(other).map_err(|e| anyhow::anyhow!("--kernels {e}"))?,
            ),
        };
        Ok(Runtime {
            device: dev,
            dtype: dt,
            kernels_choice,
            kernels: OnceLock::new(),
        })
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    /// The dtype the forward computes in (trainable weights and optimizer state stay f32).
    pub fn compute_dtype(&self) -> DType {
        self.dtype
    }

    /// The kernel set models run with on [`Runtime::device`] (see [`Runtime::new`]); the
    /// self-check runs once per process, on the first call, and prints its table to stderr.
    pub fn kernels(&self) -> Result<Kernels> {
        if let Some(k) = self.kernels.get() {
            return Ok(*k);
        }
        let dev = &self.device;
        let k = match self.kernels_choice {
            KernelChoice::Check => checked_kernels(dev)?,
            KernelChoice::Auto if dev.is_cuda() => checked_kernels(dev)?,
            KernelChoice::Auto => Kernels::FUSED,
            KernelChoice::Fixed(k) => {
                if k != Kernels::FUSED {
                    eprintln!("kernels: {k} (--kernels)");
                }
                k
            }
        };
        Ok(*self.kernels.get_or_init(|| k))
    }

    /// Sets a loaded model's compute dtype and kernel set to this runtime's.
    pub fn configure(&self, model: &mut Model) -> Result<()> {
        model.set_compute_dtype(self.dtype)?;
        model.set_kernels(self.kernels()?);
        Ok(())
    }

    /// Loads a model folder (frozen) and, when given, a LoRA adapter on top.
    pub fn load_model(&self, args: &ModelArgs, trainable: Trainable) -> Result<Model> {
        let mut model = Model::load(&args.model, trainable, &self.device)?;
        if let Some(adapter) = &args.adapter {
            model.load_adapter(adapter)?;
        }
        self.configure(&mut model)?;
        model.set_training(false);
        Ok(model)
    }

    /// `base` with the LoRA adapter in `dir`, sharing the base's weights (one base in memory
    /// for several adapters: `whet serve`, `whet chat --compare`).
    pub fn with_adapter(&self, base: &Model, dir: &Path) -> Result<Model> {
        let mut model = base
            .with_adapter(dir)
            .with_context(|| format!("loading the adapter {}", dir.display()))?;
        self.configure(&mut model)?;
        model.set_training(false);
        Ok(model)
    }

    /// The model a training config asks for: its method's trainable weights, and a quantized
    /// base when `model.quantize` is set (QLoRA).
    pub fn load_for_training(&self, cfg: &Config, seed: u64) -> Result<Model> {
        let options = LoadOptions {
            quantize: cfg.model.quantize_type(),
        };
        let start = match &cfg.model.adapter {
            // The adapter's A/B, loaded as trainable Vars onto the frozen base.
            Some(_) => Trainable::None,
            None => trainable(cfg, seed),
        };
        let mut model = Model::load_with(&cfg.model.path, start, &options, &self.device)?;
        if let Some(adapter) = &cfg.model.adapter {
            let loaded = model
                .load_adapter(adapter)
                .with_context(|| format!("model.adapter = {}", adapter.display()))?;
            // The config adopted the adapter's settings when it loaded (`Config::from_toml`).
            debug_assert_eq!(loaded.r, cfg.lora.r);
        }
        self.configure(&mut model)?;
        Ok(model)
    }
}

fn checked_kernels(dev: &Device) -> Result<Kernels> {
    let check = whet_kernels::self_check(dev).context("the kernel self-check")?;
    eprint!("{check}");
    let k = check.kernels();
    for op in check.failed_ops() {
        eprintln!(
            "warning: whet's fused `{op}` kernel disagrees with its reference on {}: it runs as the composed reference (slower, correct); please report this with the table above",
            check.device
        );
    }
    Ok(k)
}

pub fn load_tokenizer(dir: &Path) -> Result<Tokenizer> {
    Tokenizer::from_dir(dir).with_context(|| format!("loading the tokenizer of {}", dir.display()))
}

/// The tokenizer of `dir` with the chat template `chat_template` names (a template whet ships,
/// or a file; see [`crate::config::chat_template_source`]) in place of its own; `field` is the
/// setting or flag that named it, for errors. Every command that renders chats loads its
/// tokenizer through here, so a run's `data.chat_template` (or `--chat-template`) is the one
/// template of training, evaluation, the report's generations and task metrics.
pub fn load_tokenizer_with(
    dir: &Path,
    chat_template: Option<&str>,
    field: &str,
) -> Result<Tokenizer> {
    let mut tok = load_tokenizer(dir)?;
    if let Some(choice) = chat_template {
        let (source, origin) = crate::config::chat_template_source(choice, field)?;
        tok.set_chat_template_from(&source, origin.clone())
            .with_context(|| format!("`{field}`: {origin}"))?;
    }
    Ok(tok)
}

/// A training run's tokenizer: `model.path`'s, with `data.chat_template` when set.
pub fn run_tokenizer(cfg: &Config) -> Result<Tokenizer> {
    load_tokenizer_with(
        &cfg.model.path,
        cfg.data.chat_template.as_deref(),
        "data.chat_template",
    )
}

pub fn trainable(cfg: &Config, seed: u64) -> Trainable {
    match cfg.method {
        Method::Lora => Trainable::Lora {
            config: cfg.lora_config(),
            seed,
        },
        Method::Full => Trainable::Full,
    }
}

/// A stable id of the run: the resolved config (less its output folder) and the data.
pub fn run_id(cfg: &Config, train: &[Row]) -> String {
    let mut h = whet_tokenize::fingerprint::Fnv128::new();
    let mut c = cfg.clone();
    c.output.dir = PathBuf::new();
    h.bytes(c.to_toml().as_bytes());
    // A run continued from an adapter is another run when the adapter's weights change.
    if let Some(adapter) = &cfg.model.adapter
        && let Ok(bytes) = std::fs::read(adapter.join(whet_model::lora::ADAPTER_WEIGHTS_FILE))
    {
        h.bytes(&bytes);
    }
    for r in train {
        for id in &r.input_ids {
            h.bytes(&id.to_le_bytes());
        }
    }
    h.hex()[..16].to_string()
}
