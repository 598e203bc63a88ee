//! Data ingestion for whet: files in, [`Example`]s out.
//!
//! - [`read`]: JSONL, JSON arrays, CSV, Parquet and Arrow IPC from a file, directory or glob,
//!   streamed row by row and mapped onto the three [`Record`] shapes ([`mapping`]).
//! - [`pii`]: a scrubber that redacts personal data to typed placeholders, with an [`pii::Audit`].
//! - [`dedup`]: exact and MinHash/LSH near-duplicate removal, and a train/validation leakage check.
//! - [`split`]: deterministic train/validation splits and k-fold assignment by a stable hash.
//! - [`atomic`]: the one writer of every file and folder whet writes, and which folders it may
//!   write into (whet's other crates write through it too).
//! - [`byte_level`]: GPT-2's byte alphabet, a table that whet-tokenize and whet-model both read.
//!
//! Invariant: this crate knows nothing of tokenizers or tensors (the byte alphabet is a table of
//! 256 characters, here only because both of its readers depend on this crate).
//!
//! # Example
//!
//! Read a JSONL file of chats; the shape is detected from the fields.
//!
//! ```
//! use whet_data::{ReadOptions, Record, read_all};
//!
//! let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
//!     .join("../../fixtures/data/support/validation.jsonl");
//! let (examples, report) = read_all(&path, &ReadOptions::default())?;
//! assert_eq!(report.examples, examples.len() as u64);
//! let Record::Conversation { messages } = &examples[0].record else { panic!("not a chat") };
//! assert_eq!(messages[1].role.as_str(), "user");
//! # Ok::<(), whet_data::DataError>(())
//! ```

pub mod atomic;
pub mod byte_level;
pub mod dedup;
pub mod error;
pub mod mapping;
pub mod pii;
pub mod read;
pub mod record;
pub mod split;

pub use error::{DataError, Result, SkipReason};
pub use mapping::{Columns, Mapping};
pub use read::{
    DataReader, Format, PairExample, ReadOptions, ReadReport, open, read_all, read_pairs,
};
pub use record::{Example, Message, Origin, Record, Role, Shape};
