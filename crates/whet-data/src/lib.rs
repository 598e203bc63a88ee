//! Data ingestion for whet: files in, [`Example`]s out.
//!
//! Invariant: this crate knows nothing of tokenizers or tensors.

pub mod record;

pub use record::{Example, Message, Origin, Record, Role, Shape};
