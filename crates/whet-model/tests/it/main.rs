//! whet-model's one integration test binary.

mod common;
mod config;
mod files;
mod generate;
mod gguf;
mod golden;
mod lora;
mod model;
