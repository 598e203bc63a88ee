//! The crate's one error type.
//!
//! Every row-level error names the file, the row (1-based line for JSONL/CSV, 0-based row index
//! for JSON arrays, Parquet and Arrow — see [`Origin`]), the field, what was expected and what to
//! do about it. Messages never quote field *values* (they may hold personal data), only their
//! JSON type.

use std::io;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::record::Origin;

pub type Result<T, E = DataError> = std::result::Result<T, E>;

#[derive(Debug, thiserror::Error)]
pub enum DataError {
    // ---- locating and opening sources ----
    #[error("{}: cannot {action}: {source}; check that the path exists and is readable", path.display())]
    Io {
        path: PathBuf,
        action: &'static str,
        #[source]
        source: io::Error,
    },
    #[error(
        "{source_spec}: no supported data files found (looked for .jsonl, .json, .csv, .parquet, \
         .arrow, .ipc, .feather); point at a file, a directory holding such files, or a glob"
    )]
    NoFiles { source_spec: String },
    #[error("{pattern}: invalid glob pattern: {message}; fix the pattern (e.g. `data/*.jsonl`)")]
    BadGlob { pattern: String, message: String },
    #[error(
        "{}: unknown file extension {extension:?}; expected one of .jsonl, .json, .csv, .parquet, \
         .arrow, .ipc, .feather, or set ReadOptions::format to override",
        path.display()
    )]
    UnknownFormat { path: PathBuf, extension: String },

    // ---- parsing the container format ----
    #[error("{origin}: malformed JSON: {message}; fix or remove this record, or set skip_invalid")]
    MalformedJson { origin: Origin, message: String },
    #[error("{origin}: malformed CSV: {message}; fix or remove this row, or set skip_invalid")]
    MalformedCsv { origin: Origin, message: String },
    #[error(
        "{origin}: corrupt or unreadable {format} data: {message}; re-export the file, or set \
         skip_invalid to skip the rest of it"
    )]
    Corrupt {
        origin: Origin,
        format: &'static str,
        message: String,
    },
    #[error(
        "{origin}, column `{field}`: unsupported Arrow type {data_type}; expected strings \
         (Utf8/LargeUtf8/Utf8View) or List<Struct> for conversations; cast the column or map \
         another one"
    )]
    UnsupportedColumn {
        origin: Origin,
        field: String,
        data_type: String,
    },

    // ---- mapping a row onto a record shape ----
    #[error(
        "{origin}: missing field `{field}` for shape {shape}; add it, map another column with \
         Columns, or set skip_invalid"
    )]
    MissingField {
        origin: Origin,
        field: String,
        shape: &'static str,
    },
    #[error(
        "{origin}: cannot tell the record shape: found fields [{found}], expected {expected}; \
         map the columns with Columns or set Shape"
    )]
    UnknownShape {
        origin: Origin,
        found: String,
        expected: String,
    },
    #[error(
        "{origin}, field `{field}`: expected {expected}, found {found}; fix the value, map \
         another column with Columns, or set skip_invalid"
    )]
    WrongType {
        origin: Origin,
        field: String,
        expected: &'static str,
        found: &'static str,
    },
    #[error(
        "{origin}, field `{field}`: unknown role {role:?}; expected system, user, assistant or \
         tool (aliases: human, gpt, model, bot, developer, function, ipython, observation)"
    )]
    UnknownRole {
        origin: Origin,
        field: String,
        role: String,
    },
    #[error("{origin}, field `{field}`: empty conversation; drop the row or set skip_invalid")]
    EmptyConversation { origin: Origin, field: String },
    #[error(
        "{origin}, field `{field}`: conversation has no assistant turn, so nothing would be \
         learned; add one, drop the row, or set skip_invalid"
    )]
    NoAssistantTurn { origin: Origin, field: String },
    #[error(
        "{origin}, field `{field}`: invalid preference pair: {why}; fix or drop the row, or set \
         skip_invalid"
    )]
    InvalidPair {
        origin: Origin,
        field: String,
        why: &'static str,
    },

    // ---- configuration ----
    #[error("invalid {setting}: expected {expected}, got {got}")]
    InvalidConfig {
        setting: &'static str,
        expected: &'static str,
        got: String,
    },
    #[error(
        "PII rule `{name}`: invalid regex: {message}; fix the pattern (Rust `regex` syntax, no \
         look-around)"
    )]
    BadRuleRegex { name: String, message: String },

    // ---- writing outputs ----
    #[error(transparent)]
    Write(#[from] crate::atomic::WriteError),
}

/// Why a row was rejected; the key of [`ReadReport::skipped`](crate::ReadReport::skipped).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SkipReason {
    MalformedJson,
    MalformedCsv,
    /// A Parquet/Arrow batch (or the whole file) could not be decoded; the rest of that file is
    /// skipped and counted once.
    Corrupt,
    UnsupportedColumn,
    MissingField,
    UnknownShape,
    WrongType,
    UnknownRole,
    EmptyConversation,
    NoAssistantTurn,
    /// A preference row with an empty side or equal sides.
    InvalidPair,
}

impl DataError {
    /// The skip reason when this is a per-row (or per-file data) problem that `skip_invalid`
    /// may skip; `None` for I/O, configuration and output errors, which are always fatal.
    pub fn skip_reason(&self) -> Option<SkipReason> {
        Some(match self {
            DataError::MalformedJson { .. } => SkipReason::MalformedJson,
            DataError::MalformedCsv { .. } => SkipReason::MalformedCsv,
            DataError::Corrupt { .. } => SkipReason::Corrupt,
            DataError::UnsupportedColumn { .. } => SkipReason::UnsupportedColumn,
            DataError::MissingField { .. } => SkipReason::MissingField,
            DataError::UnknownShape { .. } => SkipReason::UnknownShape,
            DataError::WrongType { .. } => SkipReason::WrongType,
            DataError::UnknownRole { .. } => SkipReason::UnknownRole,
            DataError::EmptyConversation { .. } => SkipReason::EmptyConversation,
            DataError::NoAssistantTurn { .. } => SkipReason::NoAssistantTurn,
            DataError::InvalidPair { .. } => SkipReason::InvalidPair,
            DataError::Io { .. }
            | DataError::NoFiles { .. }
            | DataError::BadGlob { .. }
            | DataError::UnknownFormat { .. }
            | DataError::InvalidConfig { .. }
            | DataError::BadRuleRegex { .. }
            | DataError::Write(_) => return None,
        })
    }

    /// Where the offending row came from, for row-level errors.
    pub fn origin(&self) -> Option<&Origin> {
        match self {
            DataError::MalformedJson { origin, .. }
            | DataError::MalformedCsv { origin, .. }
            | DataError::Corrupt { origin, .. }
            | DataError::UnsupportedColumn { origin, .. }
            | DataError::MissingField { origin, .. }
            | DataError::UnknownShape { origin, .. }
            | DataError::WrongType { origin, .. }
            | DataError::UnknownRole { origin, .. }
            | DataError::EmptyConversation { origin, .. }
            | DataError::NoAssistantTurn { origin, .. }
            | DataError::InvalidPair { origin, .. } => Some(origin),
            _ => None,
        }
    }

    /// The field the error is about, when there is one.
    pub fn field(&self) -> Option<&str> {
        match self {
            DataError::UnsupportedColumn { field, .. }
            | DataError::MissingField { field, .. }
            | DataError::WrongType { field, .. }
            | DataError::UnknownRole { field, .. }
            | DataError::EmptyConversation { field, .. }
            | DataError::NoAssistantTurn { field, .. }
            | DataError::InvalidPair { field, .. } => Some(field),
            _ => None,
        }
    }
}
