//! The three record shapes whet trains on, one per fine-tuning method.

use std::fmt;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

/// One training example, already mapped from whatever layout the file used.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "shape", rename_all = "snake_case")]
pub enum Record {
    /// Continued pre-training: every token is a target.
    Text { text: String },
    /// Supervised fine-tuning: only the completion (and EOS) is learned.
    PromptCompletion { prompt: String, completion: String },
    /// Instruction fine-tuning: only assistant turns are learned.
    Conversation { messages: Vec<Message> },
}

/// The shape a dataset is read as; `Auto` picks from the fields present. The one record-shape
/// choice of whet: `data.format` in a training config and `--format` on the command line are
/// this, spelled as [`Shape::name`] (`auto`, `text`, `prompt-completion`, `chat`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Shape {
    #[default]
    Auto,
    Text,
    PromptCompletion,
    /// [`Record::Conversation`]; a config or the command line says `chat`.
    #[serde(rename = "chat")]
    Conversation,
}

impl Shape {
    /// Every shape, in the order `--help` and serde's errors list them.
    pub const ALL: [Shape; 4] = [
        Shape::Auto,
        Shape::Text,
        Shape::PromptCompletion,
        Shape::Conversation,
    ];

    /// The name a config file and the command line use (serde's spelling).
    pub fn name(self) -> &'static str {
        match self {
            Shape::Auto => "auto",
            Shape::Text => "text",
            Shape::PromptCompletion => "prompt-completion",
            Shape::Conversation => "chat",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Message {
    pub role: Role,
    pub content: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    System,
    User,
    Assistant,
    Tool,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::System => "system",
            Role::User => "user",
            Role::Assistant => "assistant",
            Role::Tool => "tool",
        }
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Where a record came from, so every later error and audit line can point at it.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Origin {
    pub file: PathBuf,
    /// 1-based line for JSONL/CSV, 0-based row index for JSON arrays, Parquet and Arrow.
    pub row: u64,
}

impl fmt::Display for Origin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: row {}", self.file.display(), self.row)
    }
}

/// A record with its origin and a stable id (used by splits, dedup and audits).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Example {
    /// Stable across runs: a hash of the record's content (see `split::stable_hash`).
    pub id: u64,
    pub origin: Origin,
    pub record: Record,
}
