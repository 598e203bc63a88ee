//! The crate's one error type. Every variant names the file it concerns (or says it concerns
//! in-memory tensors), the field or tensor, what was expected and what was found, and what to do.

use std::path::{Path, PathBuf};

/// The GGML types whet dequantizes (`gguf::file`), as [`Error::GgufQuantization`] lists them.
/// Kept here, where the message is, so the error type imports nothing of the crate.
pub(crate) const SUPPORTED_TYPES: &str =
    "F32, F16, BF16, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q2_K, Q3_K, Q4_K, Q5_K, Q6_K";

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

    /// An I/O error other than "not found" while reading or writing a file (GGUF reading keeps
    /// "not found" here too: its `op` says "cannot open the GGUF file").
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

    // ---- GGUF files (`gguf/`) ----
    /// The file does not start with the GGUF magic.
    #[error("{}: not a GGUF file: {detail}", path.display())]
    NotGguf { path: PathBuf, detail: String },

    /// The header or a tensor's data runs past the end of the file.
    #[error(
        "{}: truncated or corrupt GGUF file: {detail}. Re-download or re-export it (compare its size and sha256 with the source)",
        path.display()
    )]
    GgufTruncated { path: PathBuf, detail: String },

    /// The header cannot be read as GGUF (or its metadata would take too much memory).
    #[error("{}: malformed GGUF header: {detail}", path.display())]
    GgufMalformed { path: PathBuf, detail: String },

    /// `general.architecture` is not one whet reads ([`crate::gguf::ARCHITECTURES`]).
    #[error(
        "{}: general.architecture = {found:?}, but whet reads only \"llama\" (Llama, SmolLM, TinyLlama, Mistral), \"qwen2\", \"qwen3\" and \"gemma3\" GGUF files; convert this model from its Hugging Face folder instead",
        path.display()
    )]
    GgufArchitecture { path: PathBuf, found: String },

    /// A tensor type whet cannot dequantize. `what` names the tensor when known
    /// ("tensor blk.0.attn_q.weight"), else "a tensor".
    #[error(
        "{}: {what} is stored as GGML type {type_name} (id {type_id}), which whet cannot dequantize; supported: {SUPPORTED_TYPES}. Requantize the file (llama-quantize ... Q8_0) or convert from the Hugging Face folder",
        path.display()
    )]
    GgufQuantization {
        path: PathBuf,
        what: String,
        type_id: u32,
        type_name: String,
    },

    /// A metadata key whet needs is absent; `hint` says why it matters.
    #[error("{}: metadata key {key} is missing: {hint}", path.display())]
    GgufMissingKey {
        path: PathBuf,
        key: String,
        hint: &'static str,
    },

    /// A metadata value of the wrong type or out of range.
    #[error("{}: metadata key {key}: expected {expected}, found {found}", path.display())]
    GgufValue {
        path: PathBuf,
        key: String,
        expected: String,
        found: String,
    },

    /// A tensor whose shape, range, data or presence disagrees with the header or the metadata.
    #[error("{}: tensor {tensor}: expected {expected}, found {found}", path.display())]
    GgufTensor {
        path: PathBuf,
        tensor: String,
        expected: String,
        found: String,
    },

    /// A GGUF feature whet does not convert (`detail` says which, and what to do instead).
    #[error("{}: {detail}", path.display())]
    GgufUnsupported { path: PathBuf, detail: String },

    /// The `llama.*` metadata describes a config that [`crate::Config::validate`] refuses.
    #[error("{}: the llama.* metadata gives an invalid model config: {source}", path.display())]
    GgufConfig {
        path: PathBuf,
        #[source]
        source: Box<Error>,
    },

    /// A converted folder's file could not be written (`path` is the GGUF, `out` the folder).
    #[error("{}: cannot write {}: {detail}", path.display(), out.display())]
    GgufWrite {
        path: PathBuf,
        out: PathBuf,
        detail: String,
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
