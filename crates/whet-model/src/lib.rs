//! whet-model: the Llama family (llama, mistral, qwen2) written for fine-tuning.
//!
//! - [`config`]: `config.json` as Hugging Face writes it, validated; rotary frequencies.
//! - [`load`]: memory-mapped (sharded) safetensors, f32 / bf16 / f16 to f32.
//! - [`llama`]: the model; [`Model::loss`] for training, [`Model::logits`] for evaluation.
//! - [`lora`]: the linear layer the model is built from, with optional LoRA; PEFT adapters.
//! - [`generate`]: KV-cached generation and sampling.
//! - [`gguf`]: GGUF import; [`export`]: GGUF export; [`quant`]: GGML type names and fallbacks.
//!
//! Invariant: the training path uses only `whet_kernels` ops (they have a backward); frozen
//! weights are plain tensors, trainable ones are `candle_core::Var`s listed by
//! [`Model::trainable`].

pub mod config;
pub mod error;
pub mod export;
pub mod generate;
pub mod gguf;
pub mod llama;
pub mod load;
pub mod lora;
pub mod quant;

pub use config::{Config, ModelType, RopeKind, RopeScaling, TokenIds};
pub use error::{Error, Result};
pub use generate::{Finish, GenerationConfig, Sampler, generate, generate_stream};
pub use llama::{KvCache, LOSS_CHUNK_ROWS, LoadOptions, Model, QuantSummary, Trainable};
pub use lora::{LINEAR_MODULES, Linear, LoraConfig, TargetModules};
