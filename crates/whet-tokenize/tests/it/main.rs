//! Integration tests for whet-tokenize (one binary; modules per area).

mod cache;
mod common;
mod fastpath;
mod masking;
mod ollama;
mod pack;
mod parity;
mod store;
mod store_dedup;
mod template;
mod template_limits;
mod tokenize;
mod windows;
