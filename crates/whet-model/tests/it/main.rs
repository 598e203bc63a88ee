//! whet-model's one integration test binary.

mod checkpointing;
mod common;
mod config;
#[cfg(feature = "cuda")]
mod cuda;
mod export;
mod files;
mod generate;
mod gguf;
mod gguf_arch;
mod golden;
mod hardening;
mod logps;
mod lora;
mod model;
mod qlora;
