//! whet-tokenize: records to token ids, loss masks and packed rows.
//!
//! - [`Tokenizer`]: a Hugging Face `tokenizer.json` plus `tokenizer_config.json`
//!   (special tokens, `add_bos_token`, chat template).
//! - [`ChatTemplate`]: chat templates rendered with minijinja the way transformers'
//!   `apply_chat_template` renders them, with the spans of the assistant turns.
//! - [`Tokenizer::tokenize_examples`]: the three record shapes to [`TokenizedExample`]s
//!   (ids and labels, -100 where not learned), with truncation and a [`TokenizeReport`].
//! - [`pack`], [`padding_free`], [`pad_each`], [`Batch`]: training rows with position and
//!   segment ids; [`targets_from_labels`] for next-token targets in packed rows.
//! - [`Cache`]: the result on disk as Parquet, keyed by a [`Fingerprint`].
//! - [`store`]: tokenized documents in memory-mapped shards, for corpora larger than memory;
//!   [`store_dedup`]: their near-duplicate removal and leakage check in bounded memory.
//! - [`ollama::Modelfile`]: the chat template as an Ollama `Modelfile` (Go template, stops).
//!
//! Invariant: this crate knows nothing of tensors; everything is plain `Vec<u32>` /
//! `Vec<i64>`.
//!
//! # Example
//!
//! A model folder's tokenizer and chat template, a conversation rendered and tokenized with its
//! assistant turn as the learned tokens.
//!
//! ```
//! use whet_data::{Example, Message, Origin, Record, Role};
//! use whet_tokenize::{IGNORE_INDEX, TokenizeConfig, Tokenizer};
//!
//! let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fixtures/tiny_chat");
//! let tok = Tokenizer::from_dir(&dir)?;
//! let chat = vec![
//!     Message { role: Role::User, content: "Hi".into() },
//!     Message { role: Role::Assistant, content: "Hello!".into() },
//! ];
//! let text = tok.chat_template().expect("a chat model").render(&chat, false)?;
//! assert_eq!(text, "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\nHello!<|im_end|>\n");
//!
//! let example = Example {
//!     id: 0,
//!     origin: Origin { file: "chats.jsonl".into(), row: 0 },
//!     record: Record::Conversation { messages: chat },
//! };
//! let (done, _report) = tok.tokenize_examples(&[example], &TokenizeConfig::default())?;
//! let learned: Vec<u32> = done[0].input_ids.iter().zip(&done[0].labels)
//!     .filter(|(_, l)| **l != IGNORE_INDEX)
//!     .map(|(id, _)| *id)
//!     .collect();
//! assert_eq!(tok.decode(&learned, false)?, "Hello!<|im_end|>");
//! # Ok::<(), whet_tokenize::Error>(())
//! ```

pub mod cache;
pub mod error;
mod fast;
pub mod fingerprint;
pub mod ollama;
pub mod pack;
pub mod store;
pub mod store_dedup;
pub mod template;
pub mod tokenize;
pub mod tokenizer;

pub use cache::{Cache, CacheStatus, CachedDataset, Fingerprint, FingerprintBuilder};
pub use error::{Error, Result};
pub use pack::{
    Batch, PackConfig, PackReport, PackedRow, pack, pack_plan, pad_each, padding_free,
    targets_from_labels,
};
pub use template::{AssistantTurns, ChatTemplate, Rendered, SpanMethod};
pub use tokenize::{
    DoubleBos, ExcludeReason, Excluded, IGNORE_INDEX, LongDocuments, Outcome, TokenizeConfig,
    TokenizeReport, TokenizedExample, Truncated, Truncation, mask_from_spans, truncate, windows,
};
pub use tokenizer::{
    BYTES_PER_TOKEN, Encoded, PIECE_BYTES, SpecialToken, Tokenizer, bounded, piece_cuts,
};
