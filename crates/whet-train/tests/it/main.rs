//! whet-train integration tests: the loop on a tiny random model.

mod common;
mod data_parallel;
mod loop_;
mod metrics;
mod resume;
