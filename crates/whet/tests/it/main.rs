//! End-to-end tests of the `whet` binary on a tiny Llama converted from a GGUF fixture.

mod chat;
mod common;
mod continue_;
mod data_settings;
#[cfg(feature = "mpi")]
mod distributed;
mod errors;
mod eval_merge;
mod eval_sets;
mod formats;
mod generate;
mod hardening;
mod inspect;
mod kernels;
mod kfold;
mod mixture;
mod ollama;
mod outputs;
mod preference;
mod prepare;
mod qlora_export;
mod recipes;
mod resume;
mod serve;
mod task_metrics;
mod train;
