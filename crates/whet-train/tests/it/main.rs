//! whet-train integration tests: the loop on a tiny random model; the preference losses against
//! TRL on the golden tiny Llama.

mod common;
mod data_parallel;
mod loop_;
mod metrics;
mod preference;
mod resume;
mod selection;
