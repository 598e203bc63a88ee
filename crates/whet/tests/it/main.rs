//! End-to-end tests of the `whet` binary on a tiny Llama converted from a GGUF fixture.

mod chat;
mod common;
#[cfg(feature = "mpi")]
mod distributed;
mod errors;
mod eval_merge;
mod formats;
mod generate;
mod hardening;
mod inspect;
mod kernels;
mod kfold;
mod outputs;
mod qlora_export;
mod recipes;
mod resume;
mod serve;
mod train;
