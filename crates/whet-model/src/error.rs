//! The crate's one error type. Every variant names the file it concerns (or says it concerns
//! in-memory tensors), the field or tensor, what was expected and what was found, and what to do.

use std::path::{Path, PathBuf};

pub type Result<T> = std::result::Result<T, Error>;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    // ---- files ----
    /// A file the model folder must contain is absent.
    #[error("{}: {what} not found; {hint}", path.display())]
    MissingFile {
        path: PathBuf,
        what: &'static str,
        hint: &'static str,
    },

    /// An I/O error other than "not found" while reading or writing a file.
    #[error("{}: {op}: {source}", path.display())]
    Io {
        path: PathBuf,
        op: &'static str,
        #[source]
        source: std::io::Error,
    },

    // ---- config.json / adapter_config.json ----
    /// A JSON file does not parse, or a field has the wrong type or an invalid value.
    /// `field` is the dotted path to the value (`rope_scaling.factor`), `.` for the root.
    #[error(
        "{}: field `{field}` (line {line}, column {column}): {message}; fix this value in the file",
        path.display()
    )]
    ConfigField {
        path: PathBuf,
        field: String,
        line: usize,
        column: usize,
        message: String,
    },

    /// `model_type` names an architecture this crate does not implement.
    #[error(
        "{}: unsupported model_type `{found}`; supported: {}. Convert the model or pick one of these",
        path.display(), supported.join(", ")
    )]
    UnsupportedModelType {
        path: PathBuf,
        found: String,
        supported: &'static [&'static str],
    },

    /// A config field holds a value whose feature this crate does not implement.
    #[error("{}: field `{field}` = {found} is not supported (expected {expected})", path.display())]
    UnsupportedConfig {
        path: PathBuf,
        field: &'static str,
        found: String,
        expected: String,
    },

    /// A config value whet can build no model from: not finite, out of range, or sizes whose
    /// shape arithmetic would overflow. `field` is the key in the file.
    #[error(
        "{}: field `{field}` = {found}: expected {expected}; fix this value in the file",
        path.display()
    )]
    InvalidConfig {
        path: PathBuf,
        field: String,
        found: String,
        expected: String,
    },

    // ---- weights ----
    /// A safetensors file (or a sharded index) is truncated or corrupt.
    #[error(
        "{}: cannot read safetensors data: {message}; the file is truncated or corrupt, download or write it again",
        path.display()
    )]
    Safetensors { path: PathBuf, message: String },

    /// An entry of `model.safetensors.index.json` names a file outside the model folder
    /// (an absolute path, `..`, or a symlink that leads out).
    #[error(
        "{}: weight_map entry `{tensor}` -> {file:?} {why}; shard files must lie inside the model folder",
        path.display()
    )]
    ShardOutsideFolder {
        path: PathBuf,
        tensor: String,
        file: String,
        why: String,
    },

    /// A weight holds NaN or infinite values.
    #[error(
        "{}: tensor `{tensor}` holds NaN or infinite values; the weights are corrupt (download or write them again)",
        path.display()
    )]
    NonFiniteWeight { path: PathBuf, tensor: String },

    /// A tensor the config implies is absent from every weight file.
    #[error(
        "tensor `{tensor}` not found in {}; the weights do not match config.json (wrong model, or a partial download)",
        display_paths(files)
    )]
    MissingTensor { tensor: String, files: Vec<PathBuf> },

    /// A tensor's shape disagrees with the shape config.json implies.
    #[error(
        "{}: tensor `{tensor}` has shape {found:?}, expected {expected:?} from config.json; the weights and config do not belong together",
        path.display()
    )]
    ShapeMismatch {
        path: PathBuf,
        tensor: String,
        expected: Vec<usize>,
        found: Vec<usize>,
    },

    /// A weight stored in a dtype other than f32, bf16 or f16.
    #[error(
        "{}: tensor `{tensor}` has dtype {found}, expected f32, bf16 or f16 (quantized weights are not supported)",
        path.display()
    )]
    UnsupportedDtype {
        path: PathBuf,
        tensor: String,
        found: String,
    },

    // ---- adapters ----
    /// A LoRA request or adapter that cannot be honoured (`what` says why and what to do).
    #[error("{}: LoRA: {what}", path.display())]
    Lora { path: PathBuf, what: String },

    // ---- quantization (QLoRA base, GGUF export) ----
    /// A quantization request that cannot be honoured (`what` says why and what to do).
    #[error("{}: quantization: {what}", path.display())]
    Quantize { path: PathBuf, what: String },

    // ---- inputs to forward / generate ----
    /// An argument to `loss`, `logits` or `generate` has the wrong shape, dtype or values.
    #[error("input `{input}`: expected {expected}, found {found}")]
    Input {
        input: &'static str,
        expected: String,
        found: String,
    },

    // ---- writing ----
    /// Writing an output failed, or was refused (an existing file, a folder whet does not own).
    #[error(transparent)]
    Write(#[from] whet_data::atomic::WriteError),

    /// A loss or logit came out NaN or infinite; `cause` names the likely reason.
    #[error("{what} is {value}: {cause}")]
    NonFinite {
        what: String,
        value: f32,
        cause: String,
    },

    // ---- tensor ops ----
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}

fn display_paths(files: &[PathBuf]) -> String {
    let names: Vec<String> = files.iter().map(|p| p.display().to_string()).collect();
    if names.is_empty() {
        "<no weight files>".to_string()
    } else {
        names.join(", ")
    }
}

impl Error {
    /// Wraps an `std::io::Error`, turning "not found" into [`Error::MissingFile`].
    pub(crate) fn io(path: &Path, op: &'static str, source: std::io::Error) -> Self {
        if source.kind() == std::io::ErrorKind::NotFound {
            Error::MissingFile {
                path: path.to_path_buf(),
                what: "file",
                hint: "check the path",
            }
        } else {
            Error::Io {
                path: path.to_path_buf(),
                op,
                source,
            }
        }
    }

    /// Wraps a serde_json error met while reading `path` (field `.` when the path is unknown).
    pub(crate) fn json(path: &Path, field: String, e: &serde_json::Error) -> Self {
        Error::ConfigField {
            path: path.to_path_buf(),
            field,
            line: e.line(),
            column: e.column(),
            message: e.to_string(),
        }
    }

    pub(crate) fn quantize(path: &Path, what: impl Into<String>) -> Self {
        Error::Quantize {
            path: path.to_path_buf(),
            what: what.into(),
        }
    }

    pub(crate) fn lora(path: &Path, what: impl Into<String>) -> Self {
        Error::Lora {
            path: path.to_path_buf(),
            what: what.into(),
        }
    }
}

/// Deserializes `text` (the contents of `path`) naming the failing field in the error.
pub(crate) fn from_json_str<T: serde::de::DeserializeOwned>(text: &str, path: &Path) -> Result<T> {
    let de = &mut serde_json::Deserializer::from_str(text);
    let value = serde_path_to_error::deserialize(&mut *de).map_err(|e| {
        let field = e.path().to_string();
        Error::json(path, field, e.inner())
    })?;
    de.end()
        .map_err(|e| Error::json(path, ".".to_string(), &e))?;
    Ok(value)
}
