//! whet-model: the Llama family (llama, mistral, qwen2) written for fine-tuning.
//!
//! - [`config`]: `config.json` as Hugging Face writes it, validated; rotary frequencies.
//! - [`load`]: memory-mapped (sharded) safetensors, f32 / bf16 / f16 to f32.
//! - [`llama`]: the model; [`Model::loss`] for training, [`Model::logits`] for evaluation,
//!   [`Model::sequence_logps`] and [`Model::adapters_disabled`] for preference tuning.
//! - [`lora`]: the linear layer the model is built from, with optional LoRA; PEFT adapters.
//! - [`generate`]: KV-cached generation and sampling.
//! - [`gguf`]: GGUF import; [`export`]: GGUF export; [`quant`]: GGML type names and fallbacks.
//!
//! Invariant: the training path uses only `whet_kernels` ops (they have a backward); frozen
//! weights are plain tensors, trainable ones are `candle_core::Var`s listed by
//! [`Model::trainable`].
//!
//! # Example
//!
//! Load a Hugging Face folder and compute the loss of a packed row: the summed cross-entropy over
//! the supervised targets, and their count.
//!
//! ```
//! use candle_core::{DType, Device, Tensor};
//! use whet_model::{Model, Trainable};
//!
//! let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fixtures/tiny_chat");
//! let dev = Device::Cpu;
//! let model = Model::load(&dir, Trainable::None, &dev)?;
//! let ids = Tensor::new(&[[1u32, 40, 41, 42, 43]], &dev)?; // (B, T)
//! let positions = Tensor::new(&[[0u32, 1, 2, 3, 4]], &dev)?; // (B, T)
//! let segments = Tensor::zeros((1, 5), DType::U32, &dev)?; // one document
//! let targets = Tensor::new(&[[40i64, 41, 42, 43, -100]], &dev)?; // next tokens, -100 unlearned
//! let (sum, n) = model.loss(&ids, &positions, &segments, &targets)?;
//! assert_eq!(n, 4);
//! let logits = model.logits(&ids, &positions, &segments)?; // (B, T, V)
//! assert_eq!(logits.dims(), [1, 5, model.config().vocab_size]);
//! assert!(sum.to_scalar::<f32>()? > 0.0);
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

pub mod config;
pub mod error;
pub mod export;
pub mod generate;
pub mod gguf;
pub mod llama;
pub mod load;
pub mod lora;
pub mod quant;

pub use config::{
    Config, LayerAttention, ModelType, RopeKind, RopeParameters, RopeScaling, TokenIds,
};
pub use error::{Error, Result};
pub use generate::{
    Finish, Generated, GenerationConfig, Sampler, generate, generate_batch, generate_stream,
};
pub use llama::{KvCache, LOSS_CHUNK_ROWS, LoadOptions, Model, QuantSummary, Trainable};
pub use lora::{
    FUSED_LINEAR_MODULES, KNOWN_LINEAR_MODULES, LINEAR_MODULES, Linear, LoraConfig, TargetModules,
};
