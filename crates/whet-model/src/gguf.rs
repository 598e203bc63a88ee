//! GGUF (llama.cpp) model files in, Hugging Face folders out.
//!
//! [`GgufFile::open`] reads a GGUF header with candle's reader, after checking the header's counts
//! against the file size, and checks every tensor's byte range against the file before any data is
//! read. From there:
//!
//! * [`GgufFile::config`] turns the `llama.*` metadata into a transformers `LlamaConfig`;
//! * [`GgufFile::hf_tensors`] dequantizes every tensor to f32 (candle's dequantizers), renames it
//!   to its Hugging Face name and undoes the Q/K row permutation llama.cpp's converter applies;
//! * [`GgufFile::tokenizer_json`] / [`GgufFile::tokenizer_config_json`] rebuild a byte-level BPE
//!   `tokenizer.json` from `tokenizer.ggml.*` the way transformers' GGUF loader does
//!   (`transformers/integrations/gguf/gguf_tokenizer_mapping.py`), so token ids match it;
//! * [`convert_gguf_to_hf`] writes all of it as a folder `AutoModelForCausalLM` /
//!   `AutoTokenizer` (and whet) load.
//!
//! Only `general.architecture = "llama"` with a `gpt2` (byte-level BPE) tokenizer is supported;
//! anything else is a [`GgufError`] naming the file and what to do.

use std::borrow::Cow;
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fs::File;
use std::io::{BufReader, Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

use candle_core::Device;
use candle_core::quantized::GgmlDType;
use candle_core::quantized::ggml_file::qtensor_from_ggml;
use candle_core::quantized::gguf_file::{Content, Value};
use memmap2::Mmap;
use serde::Serialize;
use serde_json::{Value as Json, json};
use whet_data::atomic::{self, Existing};

/// Errors from reading or converting a GGUF file. Every variant names the file.
#[derive(Debug, thiserror::Error)]
pub enum GgufError {
    #[error("{}: cannot {action}: {source}", path.display())]
    Io {
        path: PathBuf,
        action: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("{}: not a GGUF file: {detail}", path.display())]
    NotGguf { path: PathBuf, detail: String },
    #[error(
        "{}: truncated or corrupt GGUF file: {detail}. Re-download or re-export it (compare its size and sha256 with the source)",
        path.display()
    )]
    Truncated { path: PathBuf, detail: String },
    #[error("{}: malformed GGUF header: {detail}", path.display())]
    Malformed { path: PathBuf, detail: String },
    #[error(
        "{}: general.architecture = {found:?}, but whet reads only \"llama\" GGUF files (SmolLM, TinyLlama, Llama 2); convert this model from its Hugging Face folder instead",
        path.display()
    )]
    UnsupportedArchitecture { path: PathBuf, found: String },
    /// `what` names the tensor when known ("tensor blk.0.attn_q.weight"), else "a tensor".
    #[error(
        "{}: {what} is stored as GGML type {type_name} (id {type_id}), which whet cannot dequantize; supported: {SUPPORTED_TYPES}. Requantize the file (llama-quantize ... Q8_0) or convert from the Hugging Face folder",
        path.display()
    )]
    UnsupportedQuantization {
        path: PathBuf,
        what: String,
        type_id: u32,
        type_name: String,
    },
    #[error("{}: metadata key {key} is missing: {hint}", path.display())]
    MissingKey {
        path: PathBuf,
        key: String,
        hint: &'static str,
    },
    #[error("{}: metadata key {key}: expected {expected}, found {found}", path.display())]
    BadValue {
        path: PathBuf,
        key: String,
        expected: String,
        found: String,
    },
    #[error("{}: tensor {tensor}: expected {expected}, found {found}", path.display())]
    BadTensor {
        path: PathBuf,
        tensor: String,
        expected: String,
        found: String,
    },
    #[error("{}: {detail}", path.display())]
    Unsupported { path: PathBuf, detail: String },
    /// The `llama.*` metadata describes a config that [`crate::Config::validate`] refuses.
    #[error("{}: the llama.* metadata gives an invalid model config: {source}", path.display())]
    InvalidConfig {
        path: PathBuf,
        #[source]
        source: Box<crate::Error>,
    },
    #[error("{}: cannot write {}: {detail}", path.display(), out.display())]
    Write {
        path: PathBuf,
        out: PathBuf,
        detail: String,
    },
    /// Writing the output failed, or was refused (a folder whet does not own).
    #[error(transparent)]
    Output(#[from] atomic::WriteError),
}

/// The run a converted folder's marker names: any conversion may replace it.
const CONVERT_RUN: &str = "whet convert";

fn write_error(gguf: &Path, out: &Path, detail: String) -> GgufError {
    GgufError::Write {
        path: gguf.to_path_buf(),
        out: out.to_path_buf(),
        detail,
    }
}

pub type Result<T, E = GgufError> = std::result::Result<T, E>;

const SUPPORTED_TYPES: &str =
    "F32, F16, BF16, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q2_K, Q3_K, Q4_K, Q5_K, Q6_K";

/// The one architecture [`GgufFile::config`] and [`GgufFile::hf_tensors`] accept.
pub const ARCHITECTURE: &str = "llama";

/// A GGUF file whose header has been read and whose tensor ranges have been checked against the
/// file size. Tensor data is memory-mapped and only read when dequantized.
pub struct GgufFile {
    path: PathBuf,
    file_len: u64,
    content: Content,
    mmap: Mmap,
    /// Tensors in file order (by offset), every byte range inside the file.
    tensors: Vec<TensorEntry>,
}

/// One tensor as the GGUF header describes it.
#[derive(Debug, Clone)]
pub struct TensorEntry {
    pub name: String,
    pub dtype: GgmlDType,
    /// Row-major dims, outermost first (`[rows, cols]` for a matrix), the reverse of GGUF's `ne`.
    pub shape: Vec<usize>,
    /// Absolute byte offset of the data in the file.
    pub start: u64,
    pub n_bytes: u64,
}

/// A dequantized tensor under its Hugging Face name, row-major f32.
#[derive(Debug, Clone)]
pub struct HfTensor {
    pub name: String,
    pub shape: Vec<usize>,
    pub data: Vec<f32>,
}

/// The `config.json` written for a llama GGUF: transformers' `LlamaConfig` fields.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct GgufLlamaConfig {
    pub architectures: Vec<String>,
    pub model_type: String,
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub num_key_value_heads: usize,
    pub head_dim: usize,
    pub max_position_embeddings: usize,
    pub rms_norm_eps: f64,
    /// transformers < 5 spelling; `rope_parameters` carries the same theta for >= 5.
    pub rope_theta: f64,
    pub rope_parameters: serde_json::Map<String, Json>,
    pub tie_word_embeddings: bool,
    pub hidden_act: String,
    pub attention_bias: bool,
    pub mlp_bias: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub bos_token_id: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub eos_token_id: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pad_token_id: Option<u32>,
    pub torch_dtype: String,
}

/// What [`convert_gguf_to_hf`] wrote.
#[derive(Debug, Clone)]
pub struct ConvertReport {
    pub config: GgufLlamaConfig,
    /// Tensors written to `model.safetensors`.
    pub n_tensors: usize,
    /// Parameters written (elements over all tensors).
    pub n_params: usize,
    pub files: Vec<PathBuf>,
}

fn ggml_type_name(id: u32) -> &'static str {
    match id {
        0 => "F32",
        1 => "F16",
        2 => "Q4_0",
        3 => "Q4_1",
        4 => "Q4_2 (removed)",
        5 => "Q4_3 (removed)",
        6 => "Q5_0",
        7 => "Q5_1",
        8 => "Q8_0",
        9 => "Q8_1",
        10 => "Q2_K",
        11 => "Q3_K",
        12 => "Q4_K",
        13 => "Q5_K",
        14 => "Q6_K",
        15 => "Q8_K",
        16 => "IQ2_XXS",
        17 => "IQ2_XS",
        18 => "IQ3_XXS",
        19 => "IQ1_S",
        20 => "IQ4_NL",
        21 => "IQ3_S",
        22 => "IQ2_S",
        23 => "IQ4_XS",
        24 => "I8",
        25 => "I16",
        26 => "I32",
        27 => "I64",
        28 => "F64",
        29 => "IQ1_M",
        30 => "BF16",
        34 => "TQ1_0",
        35 => "TQ2_0",
        39 => "MXFP4",
        _ => "unknown",
    }
}

fn dtype_name(dtype: GgmlDType) -> &'static str {
    match dtype {
        GgmlDType::F32 => "F32",
        GgmlDType::F16 => "F16",
        GgmlDType::BF16 => "BF16",
        GgmlDType::Q4_0 => "Q4_0",
        GgmlDType::Q4_1 => "Q4_1",
        GgmlDType::Q5_0 => "Q5_0",
        GgmlDType::Q5_1 => "Q5_1",
        GgmlDType::Q8_0 => "Q8_0",
        GgmlDType::Q8_1 => "Q8_1",
        GgmlDType::Q2K => "Q2_K",
        GgmlDType::Q3K => "Q3_K",
        GgmlDType::Q4K => "Q4_K",
        GgmlDType::Q5K => "Q5_K",
        GgmlDType::Q6K => "Q6_K",
        GgmlDType::Q8K => "Q8_K",
    }
}

/// Types whose blocks candle can dequantize on the CPU (Q8_1 and Q8_K are matmul-only in ggml).
fn dequantizable(dtype: GgmlDType) -> bool {
    !matches!(dtype, GgmlDType::Q8_1 | GgmlDType::Q8K)
}

/// A short description of a metadata value for error messages.
fn describe(v: &Value) -> String {
    match v {
        Value::U8(x) => format!("u8 {x}"),
        Value::I8(x) => format!("i8 {x}"),
        Value::U16(x) => format!("u16 {x}"),
        Value::I16(x) => format!("i16 {x}"),
        Value::U32(x) => format!("u32 {x}"),
        Value::I32(x) => format!("i32 {x}"),
        Value::U64(x) => format!("u64 {x}"),
        Value::I64(x) => format!("i64 {x}"),
        Value::F32(x) => format!("f32 {x}"),
        Value::F64(x) => format!("f64 {x}"),
        Value::Bool(x) => format!("bool {x}"),
        Value::String(s) => {
            let short: String = s.chars().take(40).collect();
            if short.len() < s.len() {
                format!("string {short:?}...")
            } else {
                format!("string {s:?}")
            }
        }
        Value::Array(a) => format!("array of {} values", a.len()),
    }
}

fn value_u64(v: &Value) -> Option<u64> {
    match *v {
        Value::U8(x) => Some(x.into()),
        Value::U16(x) => Some(x.into()),
        Value::U32(x) => Some(x.into()),
        Value::U64(x) => Some(x),
        Value::I8(x) => u64::try_from(x).ok(),
        Value::I16(x) => u64::try_from(x).ok(),
        Value::I32(x) => u64::try_from(x).ok(),
        Value::I64(x) => u64::try_from(x).ok(),
        _ => None,
    }
}

fn value_f64(v: &Value) -> Option<f64> {
    match *v {
        Value::F32(x) => Some(x.into()),
        Value::F64(x) => Some(x),
        _ => value_u64(v).map(|x| x as f64),
    }
}

/// GPT-2's byte-to-unicode table (`bytes_to_unicode` in transformers / tokenizers).
fn bytes_to_unicode() -> [char; 256] {
    let mut table = ['\0'; 256];
    let mut extra = 0u32;
    for b in 0..=255u8 {
        let printable = (b'!'..=b'~').contains(&b) || (0xA1..=0xAC).contains(&b) || b >= 0xAE;
        table[b as usize] = if printable {
            char::from(b)
        } else {
            let c = char::from_u32(256 + extra).unwrap_or('\u{FFFD}');
            extra += 1;
            c
        };
    }
    table
}

/// The pre-tokenizer split regexes transformers' GGUF loader knows, by `tokenizer.ggml.pre`
/// (`GGUF_PRE_TOKENIZER_SPLITS`). Any other value keeps GPT-2's byte-level regex, as it does.
pub(crate) fn pre_tokenizer_split(pre: &str) -> Option<&'static str> {
    const LLAMA3: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
    const TEKKEN: &str = r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+";
    const GPT4O: &str = r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+";
    const QWEN2: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
    const QWEN35: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?[\p{L}\p{M}]+|\p{N}| ?[^\s\p{L}\p{M}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
    Some(match pre {
        "llama3" | "llama-v3" | "llama-bpe" | "falcon3" | "falcon-h1" | "pixtral" | "midm-2.0"
        | "lfm2" | "jina-v5-nano" | "dbrx" | "smaug-bpe" => LLAMA3,
        "tekken" => TEKKEN,
        "qwen2" | "deepseek-r1-qwen" | "kormo" | "f2llmv2" | "megrez" => QWEN2,
        "qwen35" => QWEN35,
        "gpt-4o" | "llama4" | "kanana2" | "talkie" | "minimax-m2" => GPT4O,
        _ => return None,
    })
}

/// The Hugging Face name of a llama GGUF tensor, or `None` for a name outside the llama layout.
pub fn hf_tensor_name(gguf_name: &str) -> Option<String> {
    match gguf_name {
        "token_embd.weight" => return Some("model.embed_tokens.weight".into()),
        "output_norm.weight" => return Some("model.norm.weight".into()),
        "output.weight" => return Some("lm_head.weight".into()),
        _ => {}
    }
    let rest = gguf_name.strip_prefix("blk.")?;
    let (layer, part) = rest.split_once('.')?;
    let canonical = layer == "0" || !layer.starts_with('0');
    if layer.is_empty()
        || !layer.bytes().all(|b| b.is_ascii_digit())
        || layer.len() > 6
        || !canonical
    {
        return None;
    }
    let hf = match part {
        "attn_q.weight" => "self_attn.q_proj.weight",
        "attn_k.weight" => "self_attn.k_proj.weight",
        "attn_v.weight" => "self_attn.v_proj.weight",
        "attn_output.weight" => "self_attn.o_proj.weight",
        "ffn_gate.weight" => "mlp.gate_proj.weight",
        "ffn_up.weight" => "mlp.up_proj.weight",
        "ffn_down.weight" => "mlp.down_proj.weight",
        "attn_norm.weight" => "input_layernorm.weight",
        "ffn_norm.weight" => "post_attention_layernorm.weight",
        _ => return None,
    };
    Some(format!("model.layers.{layer}.{hf}"))
}

/// llama.cpp's `LlamaModel.permute` on the rows of a row-major `[rows, cols]` matrix:
/// `w.reshape(n_head, 2, rows / n_head / 2, cols).swapaxes(1, 2)`, as GGUF export writes Q and
/// K. `rows` must divide by `2 * n_head`.
pub fn permute_qk_rows(data: &[f32], rows: usize, cols: usize, n_head: usize) -> Vec<f32> {
    let mut out = vec![0f32; data.len()];
    for_each_qk_row(rows, n_head, |hf_row, gguf_row| {
        out[gguf_row * cols..(gguf_row + 1) * cols]
            .copy_from_slice(&data[hf_row * cols..(hf_row + 1) * cols]);
    });
    out
}

/// The inverse of [`permute_qk_rows`]: GGUF row order back to Hugging Face's (rotate-half) order.
pub fn unpermute_qk_rows(data: &[f32], rows: usize, cols: usize, n_head: usize) -> Vec<f32> {
    let mut out = vec![0f32; data.len()];
    for_each_qk_row(rows, n_head, |hf_row, gguf_row| {
        out[hf_row * cols..(hf_row + 1) * cols]
            .copy_from_slice(&data[gguf_row * cols..(gguf_row + 1) * cols]);
    });
    out
}

/// Calls `f(hf_row, gguf_row)` for every row: HF row `h*hd + j*hd/2 + i` is GGUF row
/// `h*hd + 2*i + j` (head `h`, half `j`, pair index `i`).
fn for_each_qk_row(rows: usize, n_head: usize, mut f: impl FnMut(usize, usize)) {
    let head_dim = rows / n_head;
    let half = head_dim / 2;
    for h in 0..n_head {
        for j in 0..2 {
            for i in 0..half {
                f(h * head_dim + j * half + i, h * head_dim + 2 * i + j);
            }
        }
    }
}

/// What [`GgufFile::plan`] decided for one tensor.
struct Planned<'a> {
    entry: &'a TensorEntry,
    hf_name: String,
    shape: Vec<usize>,
    /// Heads to un-permute over (Q: attention heads, K: KV heads).
    unpermute: Option<usize>,
}

impl GgufFile {
    /// Reads the header of `path` and checks every tensor's byte range against the file length.
    /// Does not read tensor data.
    pub fn open(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref().to_path_buf();
        let io = |action: &'static str| {
            let path = path.clone();
            move |source| GgufError::Io {
                path,
                action,
                source,
            }
        };
        let file = File::open(&path).map_err(io("open the GGUF file"))?;
        let file_len = file.metadata().map_err(io("stat the GGUF file"))?.len();
        HeaderScan {
            r: BufReader::new(&file),
            pos: 0,
            len: file_len,
            path: &path,
            wide: true,
            memory: 0,
        }
        .run()?;

        let mut reader = BufReader::new(&file);
        reader
            .seek(SeekFrom::Start(0))
            .map_err(io("seek in the GGUF file"))?;
        let content = Content::read(&mut reader).map_err(|e| GgufError::Malformed {
            path: path.clone(),
            detail: e.to_string(),
        })?;

        // SAFETY: the map is read-only and lives as long as `self`; as with every mmap-based
        // loader, the file must not be truncated or rewritten while it is open.
        let mmap = unsafe { Mmap::map(&file) }.map_err(io("memory-map the GGUF file"))?;
        let mut tensors = Vec::with_capacity(content.tensor_infos.len());
        for (name, info) in &content.tensor_infos {
            tensors.push(check_tensor(
                &path,
                file_len,
                content.tensor_data_offset,
                name,
                info.ggml_dtype,
                info.shape.dims(),
                info.offset,
            )?);
        }
        tensors.sort_by(|a, b| (a.start, &a.name).cmp(&(b.start, &b.name)));
        Ok(Self {
            path,
            file_len,
            content,
            mmap,
            tensors,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn file_len(&self) -> u64 {
        self.file_len
    }

    /// All metadata, as candle read it.
    pub fn metadata(&self) -> &HashMap<String, Value> {
        &self.content.metadata
    }

    /// The tensors in file order.
    pub fn tensors(&self) -> &[TensorEntry] {
        &self.tensors
    }

    pub fn tensor(&self, name: &str) -> Option<&TensorEntry> {
        self.tensors.iter().find(|t| t.name == name)
    }

    /// `general.architecture`.
    pub fn architecture(&self) -> Result<&str> {
        self.req_str("general.architecture", "every GGUF names its architecture")
    }

    fn missing(&self, key: &str, hint: &'static str) -> GgufError {
        GgufError::MissingKey {
            path: self.path.clone(),
            key: key.to_string(),
            hint,
        }
    }

    fn bad(&self, key: &str, expected: impl Into<String>, found: impl Into<String>) -> GgufError {
        GgufError::BadValue {
            path: self.path.clone(),
            key: key.to_string(),
            expected: expected.into(),
            found: found.into(),
        }
    }

    fn req_str(&self, key: &str, hint: &'static str) -> Result<&str> {
        match self.content.metadata.get(key) {
            None => Err(self.missing(key, hint)),
            Some(Value::String(s)) => Ok(s),
            Some(v) => Err(self.bad(key, "a string", describe(v))),
        }
    }

    fn opt_str(&self, key: &str) -> Result<Option<&str>> {
        match self.content.metadata.get(key) {
            None => Ok(None),
            Some(Value::String(s)) => Ok(Some(s)),
            Some(v) => Err(self.bad(key, "a string", describe(v))),
        }
    }

    fn opt_u64(&self, key: &str) -> Result<Option<u64>> {
        match self.content.metadata.get(key) {
            None => Ok(None),
            Some(v) => value_u64(v)
                .map(Some)
                .ok_or_else(|| self.bad(key, "a non-negative integer", describe(v))),
        }
    }

    /// A positive count that must fit comfortably in memory arithmetic.
    fn req_count(&self, key: &str, hint: &'static str) -> Result<usize> {
        let v = self.opt_u64(key)?.ok_or_else(|| self.missing(key, hint))?;
        if v == 0 || v > (1 << 24) {
            return Err(self.bad(key, "a count in 1..=16777216", v.to_string()));
        }
        Ok(v as usize)
    }

    fn opt_f64(&self, key: &str) -> Result<Option<f64>> {
        match self.content.metadata.get(key) {
            None => Ok(None),
            Some(v) => value_f64(v)
                .map(Some)
                .ok_or_else(|| self.bad(key, "a number", describe(v))),
        }
    }

    fn opt_bool(&self, key: &str) -> Result<Option<bool>> {
        match self.content.metadata.get(key) {
            None => Ok(None),
            Some(Value::Bool(b)) => Ok(Some(*b)),
            Some(v) => Err(self.bad(key, "a bool", describe(v))),
        }
    }

    fn opt_token_id(&self, key: &str, n_tokens: usize) -> Result<Option<u32>> {
        match self.opt_u64(key)? {
            None => Ok(None),
            Some(id) if (id as usize) < n_tokens => Ok(Some(id as u32)),
            Some(id) => Err(self.bad(
                key,
                format!("a token id below the vocabulary size {n_tokens}"),
                id.to_string(),
            )),
        }
    }

    fn string_array(&self, key: &str) -> Result<Option<Vec<&str>>> {
        match self.content.metadata.get(key) {
            None => Ok(None),
            Some(Value::Array(items)) => items
                .iter()
                .enumerate()
                .map(|(i, v)| match v {
                    Value::String(s) => Ok(s.as_str()),
                    v => Err(self.bad(&format!("{key}[{i}]"), "a string", describe(v))),
                })
                .collect::<Result<Vec<_>>>()
                .map(Some),
            Some(v) => Err(self.bad(key, "an array of strings", describe(v))),
        }
    }

    fn int_array(&self, key: &str) -> Result<Option<Vec<i64>>> {
        match self.content.metadata.get(key) {
            None => Ok(None),
            Some(Value::Array(items)) => items
                .iter()
                .enumerate()
                .map(|(i, v)| match *v {
                    Value::I32(x) => Ok(i64::from(x)),
                    Value::U32(x) => Ok(i64::from(x)),
                    Value::I8(x) => Ok(i64::from(x)),
                    Value::U8(x) => Ok(i64::from(x)),
                    Value::I16(x) => Ok(i64::from(x)),
                    Value::U16(x) => Ok(i64::from(x)),
                    ref v => Err(self.bad(&format!("{key}[{i}]"), "an integer", describe(v))),
                })
                .collect::<Result<Vec<_>>>()
                .map(Some),
            Some(v) => Err(self.bad(key, "an array of integers", describe(v))),
        }
    }

    fn check_llama(&self) -> Result<()> {
        let arch = self.architecture()?;
        if arch != ARCHITECTURE {
            return Err(GgufError::UnsupportedArchitecture {
                path: self.path.clone(),
                found: arch.to_string(),
            });
        }
        Ok(())
    }

    /// The vocabulary size: the length of `tokenizer.ggml.tokens`.
    pub fn vocab_size(&self) -> Result<usize> {
        let key = "tokenizer.ggml.tokens";
        match self.content.metadata.get(key) {
            None => Err(self.missing(
                key,
                "the file carries no vocabulary; whet needs the tokenizer inside the GGUF",
            )),
            Some(Value::Array(items)) if !items.is_empty() => Ok(items.len()),
            Some(v) => Err(self.bad(key, "a non-empty array of strings", describe(v))),
        }
    }

    /// The Hugging Face `LlamaConfig` the `llama.*` metadata describes.
    pub fn config(&self) -> Result<GgufLlamaConfig> {
        self.check_llama()?;
        const HINT: &str = "llama.cpp writes it for every llama model; the file was written by a tool that left it out";
        let hidden = self.req_count("llama.embedding_length", HINT)?;
        let layers = self.req_count("llama.block_count", HINT)?;
        let heads = self.req_count("llama.attention.head_count", HINT)?;
        let kv_heads = match self.opt_u64("llama.attention.head_count_kv")? {
            None => heads,
            Some(_) => self.req_count("llama.attention.head_count_kv", HINT)?,
        };
        let ffn = self.req_count("llama.feed_forward_length", HINT)?;
        let ctx = self.req_count("llama.context_length", HINT)?;
        let eps = self
            .opt_f64("llama.attention.layer_norm_rms_epsilon")?
            .ok_or_else(|| self.missing("llama.attention.layer_norm_rms_epsilon", HINT))?;
        if !(eps > 0.0 && eps < 1.0) {
            return Err(self.bad(
                "llama.attention.layer_norm_rms_epsilon",
                "a number in (0, 1)",
                eps.to_string(),
            ));
        }
        // llama.cpp's default when the key is absent.
        let theta = self.opt_f64("llama.rope.freq_base")?.unwrap_or(10_000.0);
        if !(theta > 0.0 && theta.is_finite()) {
            return Err(self.bad(
                "llama.rope.freq_base",
                "a positive number",
                theta.to_string(),
            ));
        }
        if heads % kv_heads != 0 {
            return Err(self.bad(
                "llama.attention.head_count_kv",
                format!("a divisor of llama.attention.head_count = {heads}"),
                kv_heads.to_string(),
            ));
        }
        let head_dim = match self.opt_u64("llama.attention.key_length")? {
            Some(k) => k as usize,
            None => hidden / heads,
        };
        if head_dim == 0 || head_dim % 2 != 0 || head_dim > (1 << 16) {
            return Err(self.bad(
                "llama.attention.key_length",
                "an even head size",
                head_dim.to_string(),
            ));
        }
        if let Some(v) = self.opt_u64("llama.attention.value_length")?
            && v as usize != head_dim
        {
            return Err(self.bad(
                "llama.attention.value_length",
                format!("the key length {head_dim} (Llama uses one head size)"),
                v.to_string(),
            ));
        }
        if let Some(d) = self.opt_u64("llama.rope.dimension_count")?
            && d as usize != head_dim
        {
            return Err(self.bad(
                "llama.rope.dimension_count",
                format!("the head size {head_dim} (partial rotary embeddings are not Llama)"),
                d.to_string(),
            ));
        }
        match self.opt_str("llama.rope.scaling.type")? {
            None | Some("none") => {}
            Some(other) => {
                return Err(GgufError::Unsupported {
                    path: self.path.clone(),
                    detail: format!(
                        "llama.rope.scaling.type = {other:?}: only unscaled rope converts; convert this model from its Hugging Face folder instead"
                    ),
                });
            }
        }
        let vocab = self.vocab_size()?;
        if let Some(v) = self.opt_u64("llama.vocab_size")?
            && v as usize != vocab
        {
            return Err(self.bad(
                "llama.vocab_size",
                format!("the length of tokenizer.ggml.tokens, {vocab}"),
                v.to_string(),
            ));
        }
        let mut rope_parameters = serde_json::Map::new();
        rope_parameters.insert("rope_type".into(), json!("default"));
        rope_parameters.insert("rope_theta".into(), json!(theta));
        let cfg = GgufLlamaConfig {
            architectures: vec!["LlamaForCausalLM".into()],
            model_type: "llama".into(),
            vocab_size: vocab,
            hidden_size: hidden,
            intermediate_size: ffn,
            num_hidden_layers: layers,
            num_attention_heads: heads,
            num_key_value_heads: kv_heads,
            head_dim,
            max_position_embeddings: ctx,
            rms_norm_eps: eps,
            rope_theta: theta,
            rope_parameters,
            tie_word_embeddings: self.tensor("output.weight").is_none(),
            hidden_act: "silu".into(),
            attention_bias: false,
            mlp_bias: false,
            bos_token_id: self.opt_token_id("tokenizer.ggml.bos_token_id", vocab)?,
            eos_token_id: self.opt_token_id("tokenizer.ggml.eos_token_id", vocab)?,
            pad_token_id: self.opt_token_id("tokenizer.ggml.padding_token_id", vocab)?,
            torch_dtype: "float32".into(),
        };
        // The same checks as a config.json (sizes, products, floats), before any shape
        // arithmetic on these values.
        let invalid = |source: crate::Error| GgufError::InvalidConfig {
            path: self.path.clone(),
            source: Box::new(source),
        };
        let label = Path::new("config.json (from the llama.* metadata)");
        let json = serde_json::to_string(&cfg)
            .map_err(|e| invalid(crate::Error::json(label, ".".into(), &e)))?;
        crate::Config::from_json_str(&json, label).map_err(invalid)?;
        Ok(cfg)
    }

    /// Maps every tensor to its HF name and expected shape; errors on unknown, missing or
    /// mis-shaped tensors before anything is dequantized.
    fn plan(&self, cfg: &GgufLlamaConfig) -> Result<Vec<Planned<'_>>> {
        let (h, v, f) = (cfg.hidden_size, cfg.vocab_size, cfg.intermediate_size);
        let q_rows = cfg.num_attention_heads * cfg.head_dim;
        let kv_rows = cfg.num_key_value_heads * cfg.head_dim;
        let mut planned = Vec::with_capacity(self.tensors.len());
        let mut seen = BTreeSet::new();
        for entry in &self.tensors {
            if entry.name == "rope_freqs.weight" {
                return Err(GgufError::Unsupported {
                    path: self.path.clone(),
                    detail: "rope_freqs.weight (Llama 3.1-style rope scaling) is not supported yet; convert this model from its Hugging Face folder instead".into(),
                });
            }
            let Some(hf_name) = hf_tensor_name(&entry.name) else {
                return Err(GgufError::Unsupported {
                    path: self.path.clone(),
                    detail: format!(
                        "tensor {} is not part of the llama layout whet converts (token_embd, output_norm, output, blk.N.{{attn_q,attn_k,attn_v,attn_output,ffn_gate,ffn_up,ffn_down,attn_norm,ffn_norm}}.weight)",
                        entry.name
                    ),
                });
            };
            let (shape, unpermute) = match entry.name.as_str() {
                "token_embd.weight" | "output.weight" => (vec![v, h], None),
                "output_norm.weight" => (vec![h], None),
                name => {
                    let layer: usize = name
                        .strip_prefix("blk.")
                        .and_then(|r| r.split_once('.'))
                        .and_then(|(l, _)| l.parse().ok())
                        .unwrap_or(usize::MAX);
                    if layer >= cfg.num_hidden_layers {
                        return Err(GgufError::BadTensor {
                            path: self.path.clone(),
                            tensor: entry.name.clone(),
                            expected: format!(
                                "a layer index below llama.block_count = {}",
                                cfg.num_hidden_layers
                            ),
                            found: format!("layer {layer}"),
                        });
                    }
                    match name.splitn(3, '.').nth(2) {
                        Some("attn_q.weight") => (vec![q_rows, h], Some(cfg.num_attention_heads)),
                        Some("attn_k.weight") => (vec![kv_rows, h], Some(cfg.num_key_value_heads)),
                        Some("attn_v.weight") => (vec![kv_rows, h], None),
                        Some("attn_output.weight") => (vec![h, q_rows], None),
                        Some("ffn_gate.weight" | "ffn_up.weight") => (vec![f, h], None),
                        Some("ffn_down.weight") => (vec![h, f], None),
                        _ => (vec![h], None), // attn_norm, ffn_norm
                    }
                }
            };
            if entry.shape != shape {
                return Err(GgufError::BadTensor {
                    path: self.path.clone(),
                    tensor: entry.name.clone(),
                    expected: format!("shape {shape:?} from the llama.* metadata"),
                    found: format!("shape {:?}", entry.shape),
                });
            }
            if !dequantizable(entry.dtype) {
                return Err(self.not_dequantizable(entry));
            }
            seen.insert(entry.name.clone());
            planned.push(Planned {
                entry,
                hf_name,
                shape,
                unpermute,
            });
        }
        let mut required = vec![
            "token_embd.weight".to_string(),
            "output_norm.weight".to_string(),
        ];
        for l in 0..cfg.num_hidden_layers {
            for p in [
                "attn_q",
                "attn_k",
                "attn_v",
                "attn_output",
                "ffn_gate",
                "ffn_up",
                "ffn_down",
                "attn_norm",
                "ffn_norm",
            ] {
                required.push(format!("blk.{l}.{p}.weight"));
            }
        }
        if let Some(missing) = required.iter().find(|n| !seen.contains(*n)) {
            return Err(GgufError::BadTensor {
                path: self.path.clone(),
                tensor: missing.clone(),
                expected: format!(
                    "present (llama.block_count = {} layers)",
                    cfg.num_hidden_layers
                ),
                found: "no such tensor in the file".into(),
            });
        }
        Ok(planned)
    }

    /// Dequantizes one tensor to f32 in the file's own layout (no renaming, no un-permuting).
    pub fn dequantize(&self, name: &str) -> Result<Vec<f32>> {
        let entry = self.tensor(name).ok_or_else(|| GgufError::BadTensor {
            path: self.path.clone(),
            tensor: name.to_string(),
            expected: "present".into(),
            found: "no such tensor in the file".into(),
        })?;
        self.dequantize_entry(entry)
    }

    fn not_dequantizable(&self, entry: &TensorEntry) -> GgufError {
        GgufError::UnsupportedQuantization {
            path: self.path.clone(),
            what: format!("tensor {}", entry.name),
            type_id: match entry.dtype {
                GgmlDType::Q8_1 => 9,
                GgmlDType::Q8K => 15,
                _ => u32::MAX,
            },
            type_name: dtype_name(entry.dtype).into(),
        }
    }

    fn dequantize_entry(&self, entry: &TensorEntry) -> Result<Vec<f32>> {
        if !dequantizable(entry.dtype) {
            return Err(self.not_dequantizable(entry));
        }
        // `open` checked start + n_bytes <= file_len and 4-byte alignment (the map is
        // page-aligned), which candle's block cast needs.
        let (start, end) = (entry.start as usize, (entry.start + entry.n_bytes) as usize);
        let raw = &self.mmap[start..end];
        let fail = |e: candle_core::Error| GgufError::BadTensor {
            path: self.path.clone(),
            tensor: entry.name.clone(),
            expected: format!("{} data candle can dequantize", dtype_name(entry.dtype)),
            found: e.to_string(),
        };
        let q =
            qtensor_from_ggml(entry.dtype, raw, entry.shape.clone(), &Device::Cpu).map_err(fail)?;
        let t = q.dequantize(&Device::Cpu).map_err(fail)?;
        let data = t
            .flatten_all()
            .and_then(|t| t.to_vec1::<f32>())
            .map_err(fail)?;
        if let Some(i) = data.iter().position(|x| !x.is_finite()) {
            return Err(GgufError::BadTensor {
                path: self.path.clone(),
                tensor: entry.name.clone(),
                expected: "finite values".into(),
                found: format!("{} at element {i}", data[i]),
            });
        }
        Ok(data)
    }

    /// Every tensor dequantized to f32 under its Hugging Face name, with Q/K rows back in
    /// Hugging Face order. `lm_head.weight` is absent when embeddings are tied.
    pub fn hf_tensors(&self) -> Result<Vec<HfTensor>> {
        let cfg = self.config()?;
        self.hf_tensors_with(&cfg)
    }

    fn hf_tensors_with(&self, cfg: &GgufLlamaConfig) -> Result<Vec<HfTensor>> {
        let plan = self.plan(cfg)?;
        let mut out = Vec::with_capacity(plan.len());
        for p in plan {
            let mut data = self.dequantize_entry(p.entry)?;
            if let Some(n_head) = p.unpermute {
                data = unpermute_qk_rows(&data, p.shape[0], p.shape[1], n_head);
            }
            out.push(HfTensor {
                name: p.hf_name,
                shape: p.shape,
                data,
            });
        }
        out.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(out)
    }

    fn tokenizer_parts(&self) -> Result<TokenizerParts<'_>> {
        let model_key = "tokenizer.ggml.model";
        let model = self.req_str(model_key, "the file carries no tokenizer")?;
        if model != "gpt2" {
            return Err(GgufError::Unsupported {
                path: self.path.clone(),
                detail: format!(
                    "{model_key} = {model:?}: whet rebuilds only byte-level BPE (\"gpt2\") tokenizers from GGUF; take tokenizer.json from the model's Hugging Face repo"
                ),
            });
        }
        let tokens = self.string_array("tokenizer.ggml.tokens")?.ok_or_else(|| {
            self.missing("tokenizer.ggml.tokens", "the file carries no vocabulary")
        })?;
        let n = tokens.len();
        let types = self.int_array("tokenizer.ggml.token_type")?;
        if let Some(t) = &types
            && t.len() != n
        {
            return Err(self.bad(
                "tokenizer.ggml.token_type",
                format!("one type per token ({n})"),
                format!("{} types", t.len()),
            ));
        }
        let merges = self.string_array("tokenizer.ggml.merges")?.ok_or_else(|| {
            self.missing(
                "tokenizer.ggml.merges",
                "a byte-level BPE vocabulary needs its merges",
            )
        })?;
        let pre = self.opt_str("tokenizer.ggml.pre")?.unwrap_or("default");
        let id = |key: &str| self.opt_token_id(key, n);
        Ok(TokenizerParts {
            tokens,
            types,
            merges,
            pre,
            bos: id("tokenizer.ggml.bos_token_id")?,
            eos: id("tokenizer.ggml.eos_token_id")?,
            unk: id("tokenizer.ggml.unknown_token_id")?,
            pad: id("tokenizer.ggml.padding_token_id")?,
            add_bos: self
                .opt_bool("tokenizer.ggml.add_bos_token")?
                .unwrap_or(false),
            add_eos: self
                .opt_bool("tokenizer.ggml.add_eos_token")?
                .unwrap_or(false),
        })
    }

    /// A Hugging Face `tokenizer.json` equal to the one transformers builds from this file.
    pub fn tokenizer_json(&self) -> Result<Json> {
        let p = self.tokenizer_parts()?;
        let table = bytes_to_unicode();
        let alphabet: BTreeSet<char> = table.iter().copied().collect();
        let in_alphabet = |t: &str| t.chars().all(|c| alphabet.contains(&c));

        // Tokens outside the byte alphabet are respelled byte by byte; a duplicate keeps the
        // last id, as transformers' dict comprehension does.
        let mut vocab = serde_json::Map::new();
        for (id, token) in p.tokens.iter().enumerate() {
            let key = if in_alphabet(token) {
                (*token).to_string()
            } else {
                token.bytes().map(|b| table[b as usize]).collect()
            };
            vocab.insert(key, json!(id));
        }
        let mut merges = Vec::with_capacity(p.merges.len());
        for (i, m) in p.merges.iter().enumerate() {
            let parts: Vec<&str> = m.split(' ').collect();
            if parts.len() != 2 || parts.iter().any(|s| s.is_empty()) {
                return Err(self.bad(
                    &format!("tokenizer.ggml.merges[{i}]"),
                    "two tokens separated by one space",
                    format!("{m:?}"),
                ));
            }
            merges.push(json!([parts[0], parts[1]]));
        }

        // Added tokens: CONTROL (3) ones as special (skipping mislabelled ones outside the byte
        // alphabet), USER_DEFINED (4) ones present in the vocabulary as plain added tokens, and
        // the bos/eos/unk/pad tokens as special, as transformers' tokenizer classes do.
        let mut added: BTreeMap<u64, (String, bool)> = BTreeMap::new();
        let vocab_id = |content: &str| vocab.get(content).and_then(Json::as_u64);
        if let Some(types) = &p.types {
            for (token, &ty) in p.tokens.iter().zip(types) {
                let special = match ty {
                    3 if in_alphabet(token) => true,
                    4 => false,
                    _ => continue,
                };
                if let Some(id) = vocab_id(token) {
                    added.entry(id).or_insert(((*token).to_string(), special));
                }
            }
        }
        for id in [p.bos, p.eos, p.unk, p.pad].into_iter().flatten() {
            let token = p.tokens[id as usize];
            if let Some(vid) = vocab_id(token) {
                added.insert(vid, (token.to_string(), true));
            }
        }
        let added_tokens: Vec<Json> = added
            .iter()
            .map(|(id, (content, special))| {
                json!({
                    "id": id, "content": content, "single_word": false, "lstrip": false,
                    "rstrip": false, "normalized": false, "special": special,
                })
            })
            .collect();

        let byte_level = |add_prefix_space: bool, use_regex: bool| json!({"type": "ByteLevel", "add_prefix_space": add_prefix_space, "trim_offsets": true, "use_regex": use_regex});
        let pre_tokenizer = match pre_tokenizer_split(p.pre) {
            Some(regex) => json!({
                "type": "Sequence",
                "pretokenizers": [
                    {"type": "Split", "pattern": {"Regex": regex}, "behavior": "Isolated", "invert": false},
                    byte_level(false, false),
                ],
            }),
            None => byte_level(false, true),
        };

        // TemplateProcessing as transformers' `update_post_processor` writes it:
        // single = [bos:0] $A:0 [eos:0]; pair = single [bos:1] $B:1 [eos:1].
        let mut specials = serde_json::Map::new();
        let mut special = |id: Option<u32>, enabled: bool| -> Option<String> {
            let id = id.filter(|_| enabled)?;
            let token = p.tokens[id as usize].to_string();
            specials.insert(
                token.clone(),
                json!({"id": token, "ids": [id], "tokens": [token]}),
            );
            Some(token)
        };
        let bos = special(p.bos, p.add_bos);
        let eos = special(p.eos, p.add_eos);
        let template = |seq: &str, type_id: u32| {
            let mut parts = Vec::new();
            if let Some(b) = &bos {
                parts.push(json!({"SpecialToken": {"id": b, "type_id": type_id}}));
            }
            parts.push(json!({"Sequence": {"id": seq, "type_id": type_id}}));
            if let Some(e) = &eos {
                parts.push(json!({"SpecialToken": {"id": e, "type_id": type_id}}));
            }
            parts
        };
        let single = template("A", 0);
        let pair: Vec<Json> = single.iter().cloned().chain(template("B", 1)).collect();

        Ok(json!({
            "version": "1.0",
            "truncation": null,
            "padding": null,
            "added_tokens": added_tokens,
            "normalizer": null,
            "pre_tokenizer": pre_tokenizer,
            "post_processor": {
                "type": "TemplateProcessing",
                "single": single,
                "pair": pair,
                "special_tokens": specials,
            },
            "decoder": byte_level(true, true),
            "model": {
                "type": "BPE",
                "dropout": null,
                "unk_token": null,
                "continuing_subword_prefix": "",
                "end_of_word_suffix": "",
                "fuse_unk": false,
                "byte_fallback": false,
                "ignore_merges": false,
                "vocab": vocab,
                "merges": merges,
            },
        }))
    }

    /// `tokenizer_config.json`: special tokens, `add_bos_token` / `add_eos_token` as the file
    /// states them, and `tokenizer.chat_template`.
    pub fn tokenizer_config_json(&self) -> Result<Json> {
        let p = self.tokenizer_parts()?;
        let name = |id: Option<u32>| id.map(|i| p.tokens[i as usize].to_string());
        let mut cfg = serde_json::Map::new();
        cfg.insert("tokenizer_class".into(), json!("PreTrainedTokenizerFast"));
        cfg.insert("add_bos_token".into(), json!(p.add_bos));
        cfg.insert("add_eos_token".into(), json!(p.add_eos));
        cfg.insert("bos_token".into(), json!(name(p.bos)));
        cfg.insert("eos_token".into(), json!(name(p.eos)));
        cfg.insert("pad_token".into(), json!(name(p.pad)));
        cfg.insert("unk_token".into(), json!(name(p.unk)));
        cfg.insert("clean_up_tokenization_spaces".into(), json!(false));
        if let Some(ctx) = self.opt_u64("llama.context_length")? {
            cfg.insert("model_max_length".into(), json!(ctx));
        }
        if let Some(t) = self.opt_str("tokenizer.chat_template")? {
            cfg.insert("chat_template".into(), json!(t));
        }
        Ok(Json::Object(cfg))
    }

    /// `generation_config.json`: the special token ids.
    pub fn generation_config_json(&self) -> Result<Json> {
        let cfg = self.config()?;
        let mut g = serde_json::Map::new();
        g.insert("_from_model_config".into(), json!(true));
        for (k, v) in [
            ("bos_token_id", cfg.bos_token_id),
            ("eos_token_id", cfg.eos_token_id),
            ("pad_token_id", cfg.pad_token_id),
        ] {
            if let Some(v) = v {
                g.insert(k.into(), json!(v));
            }
        }
        Ok(Json::Object(g))
    }
}

struct TokenizerParts<'a> {
    tokens: Vec<&'a str>,
    types: Option<Vec<i64>>,
    merges: Vec<&'a str>,
    pre: &'a str,
    bos: Option<u32>,
    eos: Option<u32>,
    unk: Option<u32>,
    pad: Option<u32>,
    add_bos: bool,
    add_eos: bool,
}

/// The most memory the metadata of one GGUF may take once candle has read it. candle holds each
/// value as a `Value` (32 bytes), so a one-byte array element costs 32 bytes: without a bound a
/// file of N bytes of `u8` arrays takes ~31 N. Real vocabularies (262k tokens, their scores,
/// types and merges) take under 64 MiB.
pub const METADATA_MEMORY_LIMIT: u64 = 256 << 20;

/// GGML type ids candle's reader knows; any other id makes it fail without naming the tensor.
fn candle_knows_type(id: u32) -> bool {
    matches!(id, 0..=3 | 6..=15 | 30)
}

/// Walks the header once before candle reads it: checks the declared counts against the file
/// size (so nothing is allocated from an absurd count), that every length-prefixed field fits in
/// the file, and every tensor's type id; checks `general.alignment`, which candle divides by
/// unchecked; and adds up the memory candle's metadata values will take, which must stay under
/// [`METADATA_MEMORY_LIMIT`]. Keys and tensor names are read; values are skipped.
struct HeaderScan<'a, R> {
    r: R,
    pos: u64,
    len: u64,
    path: &'a Path,
    /// Length prefixes and counts are u32 in GGUF v1, u64 after.
    wide: bool,
    /// Bytes candle will hold for the metadata read so far (values, string contents, keys).
    memory: u64,
}

impl<R: Read + Seek> HeaderScan<'_, R> {
    fn truncated(&self, what: &str, need: u64) -> GgufError {
        GgufError::Truncated {
            path: self.path.to_path_buf(),
            detail: format!(
                "{what} at byte {} needs {need} bytes, but the file ends at byte {}",
                self.pos, self.len
            ),
        }
    }

    fn need(&self, what: &str, n: u64) -> Result<()> {
        if n > self.len - self.pos {
            return Err(self.truncated(what, n));
        }
        Ok(())
    }

    fn bytes<const N: usize>(&mut self, what: &str) -> Result<[u8; N]> {
        self.need(what, N as u64)?;
        let mut b = [0u8; N];
        self.r.read_exact(&mut b).map_err(|source| GgufError::Io {
            path: self.path.to_path_buf(),
            action: "read the GGUF header",
            source,
        })?;
        self.pos += N as u64;
        Ok(b)
    }

    fn u32(&mut self, what: &str) -> Result<u32> {
        self.bytes::<4>(what).map(u32::from_le_bytes)
    }

    fn u64(&mut self, what: &str) -> Result<u64> {
        self.bytes::<8>(what).map(u64::from_le_bytes)
    }

    fn length(&mut self, what: &str) -> Result<u64> {
        if self.wide {
            self.u64(what)
        } else {
            self.u32(what).map(u64::from)
        }
    }

    /// Counts `n` bytes of metadata memory; errors past [`METADATA_MEMORY_LIMIT`].
    fn hold(&mut self, key: &str, n: u64) -> Result<()> {
        self.memory = self.memory.saturating_add(n);
        if self.memory > METADATA_MEMORY_LIMIT {
            return Err(GgufError::Malformed {
                path: self.path.to_path_buf(),
                detail: format!(
                    "the metadata up to {key} (byte {}) would take more than {} MiB in memory; no model's metadata is that large",
                    self.pos,
                    METADATA_MEMORY_LIMIT >> 20
                ),
            });
        }
        Ok(())
    }

    fn skip(&mut self, what: &str, n: u64) -> Result<()> {
        self.need(what, n)?;
        let step = i64::try_from(n).map_err(|_| self.truncated(what, n))?;
        self.r.seek_relative(step).map_err(|source| GgufError::Io {
            path: self.path.to_path_buf(),
            action: "seek in the GGUF header",
            source,
        })?;
        self.pos += n;
        Ok(())
    }

    /// A key or tensor name: read in full (bounded by the file size and 64 KiB).
    fn name(&mut self, what: &str) -> Result<String> {
        let n = self.length(what)?;
        self.need(what, n)?;
        if n > 1 << 16 {
            return Err(GgufError::Malformed {
                path: self.path.to_path_buf(),
                detail: format!("{what} at byte {} is {n} bytes long", self.pos),
            });
        }
        let mut buf = vec![0u8; n as usize];
        self.r
            .read_exact(&mut buf)
            .map_err(|source| GgufError::Io {
                path: self.path.to_path_buf(),
                action: "read the GGUF header",
                source,
            })?;
        self.pos += n;
        Ok(String::from_utf8_lossy(&buf).into_owned())
    }

    /// Skips one value of type `ty`; returns it when it is an integer (for `general.alignment`).
    fn skip_value(&mut self, key: &str, ty: u32, depth: usize) -> Result<Option<u64>> {
        let fixed = |ty: u32| match ty {
            0 | 1 | 7 => Some(1u64),
            2 | 3 => Some(2),
            4..=6 => Some(4),
            10..=12 => Some(8),
            _ => None,
        };
        // Integers are returned (negative ones as None), everything else skipped.
        match ty {
            0 => Ok(Some(u64::from(self.bytes::<1>(key)?[0]))),
            1 => Ok(u64::try_from(i8::from_le_bytes(self.bytes::<1>(key)?)).ok()),
            2 => Ok(Some(u64::from(u16::from_le_bytes(self.bytes::<2>(key)?)))),
            3 => Ok(u64::try_from(i16::from_le_bytes(self.bytes::<2>(key)?)).ok()),
            4 => Ok(Some(u64::from(self.u32(key)?))),
            5 => Ok(u64::try_from(i32::from_le_bytes(self.bytes::<4>(key)?)).ok()),
            10 => Ok(Some(self.u64(key)?)),
            11 => Ok(u64::try_from(i64::from_le_bytes(self.bytes::<8>(key)?)).ok()),
            8 => {
                let n = self.length(key)?;
                self.skip(key, n)?;
                self.hold(key, n)?;
                Ok(None)
            }
            9 => {
                if depth > 8 {
                    return Err(GgufError::Malformed {
                        path: self.path.to_path_buf(),
                        detail: format!("metadata {key}: arrays nested more than 8 deep"),
                    });
                }
                let elem = self.u32(key)?;
                let count = self.length(key)?;
                // candle holds every element as a `Value`, whatever its size in the file.
                let value_size = std::mem::size_of::<Value>() as u64;
                if let Some(size) = fixed(elem) {
                    self.need(key, count.saturating_mul(size))?;
                    self.hold(key, count.saturating_mul(value_size))?;
                    self.skip(key, count.saturating_mul(size))?;
                } else if elem == 8 || elem == 9 {
                    // Each element has at least a length prefix: bound the count first.
                    let prefix = if self.wide { 8 } else { 4 };
                    self.need(key, count.saturating_mul(prefix))?;
                    self.hold(key, count.saturating_mul(value_size))?;
                    for _ in 0..count {
                        self.skip_value(key, elem, depth + 1)?;
                    }
                } else {
                    return Err(self.bad_type(key, elem));
                }
                Ok(None)
            }
            _ => match fixed(ty) {
                Some(size) => self.skip(key, size).map(|()| None),
                None => Err(self.bad_type(key, ty)),
            },
        }
    }

    fn bad_type(&self, key: &str, ty: u32) -> GgufError {
        GgufError::BadValue {
            path: self.path.to_path_buf(),
            key: key.to_string(),
            expected: "a GGUF value type (0..=12)".into(),
            found: format!("type id {ty}"),
        }
    }

    fn run(mut self) -> Result<()> {
        let path = self.path.to_path_buf();
        if self.len < 8 {
            return Err(GgufError::Truncated {
                path,
                detail: format!("the file is {} bytes, shorter than a GGUF header", self.len),
            });
        }
        let magic = self.bytes::<4>("the magic")?;
        if &magic != b"GGUF" {
            return Err(GgufError::NotGguf {
                path,
                detail: format!(
                    "it starts with {:?}, not the magic \"GGUF\"",
                    String::from_utf8_lossy(&magic)
                ),
            });
        }
        match self.u32("the version")? {
            1 => self.wide = false,
            2 | 3 => self.wide = true,
            v => {
                return Err(GgufError::Unsupported {
                    path,
                    detail: format!("GGUF version {v}: whet reads versions 1 to 3"),
                });
            }
        }
        let tensor_count = self.length("the tensor count")?;
        let kv_count = self.length("the metadata count")?;
        // Smallest possible entries: a key (length prefix) + type (u32) + one byte of value; a
        // tensor info with an empty name: length prefix + n_dims (u32) + type (u32) + offset (u64).
        let prefix = if self.wide { 8u64 } else { 4 };
        let needed = kv_count
            .saturating_mul(prefix + 4 + 1)
            .saturating_add(tensor_count.saturating_mul(prefix + 4 + 4 + 8));
        let available = self.len - self.pos;
        if needed > available {
            return Err(GgufError::Truncated {
                path,
                detail: format!(
                    "the header declares {tensor_count} tensors and {kv_count} metadata entries, which need at least {needed} bytes, but only {available} follow"
                ),
            });
        }
        for _ in 0..kv_count {
            let key = self.name("a metadata key")?;
            // The map's entry: the key (a `String` and its bytes) and the value.
            let entry = (std::mem::size_of::<String>() + std::mem::size_of::<Value>()) as u64;
            self.hold(&key, entry + key.len() as u64)?;
            let ty = self.u32(&key)?;
            let value = self.skip_value(&key, ty, 0)?;
            if key == "general.alignment" {
                match value {
                    Some(a) if a.is_power_of_two() => {}
                    _ => {
                        return Err(GgufError::BadValue {
                            path,
                            key,
                            expected: "a power of two (an unsigned integer)".into(),
                            found: value.map_or(format!("value type {ty}"), |a| a.to_string()),
                        });
                    }
                }
            }
        }
        for _ in 0..tensor_count {
            let name = self.name("a tensor name")?;
            let n_dims = self.u32(&name)?;
            if n_dims > 4 {
                return Err(GgufError::BadTensor {
                    path,
                    tensor: name,
                    expected: "at most 4 dimensions".into(),
                    found: n_dims.to_string(),
                });
            }
            let dim_size = if self.wide { 8 } else { 4 };
            self.skip(&name, u64::from(n_dims) * dim_size)?;
            let ty = self.u32(&name)?;
            if !candle_knows_type(ty) {
                return Err(GgufError::UnsupportedQuantization {
                    path,
                    what: format!("tensor {name}"),
                    type_id: ty,
                    type_name: ggml_type_name(ty).into(),
                });
            }
            self.skip(&name, 8)?; // offset
        }
        Ok(())
    }
}

/// Checks one tensor's shape and byte range; every failure names the tensor.
fn check_tensor(
    path: &Path,
    file_len: u64,
    data_offset: u64,
    name: &str,
    dtype: GgmlDType,
    dims: &[usize],
    offset: u64,
) -> Result<TensorEntry> {
    let bad = |expected: String, found: String| GgufError::BadTensor {
        path: path.to_path_buf(),
        tensor: name.to_string(),
        expected,
        found,
    };
    let elems = dims
        .iter()
        .try_fold(1u64, |acc, &d| acc.checked_mul(d as u64))
        .filter(|&n| n > 0)
        .ok_or_else(|| {
            bad(
                "non-zero dimensions whose product fits in 64 bits".into(),
                format!("{dims:?}"),
            )
        })?;
    let block = dtype.block_size() as u64;
    let inner = dims.last().copied().unwrap_or(1) as u64;
    if !inner.is_multiple_of(block) {
        return Err(bad(
            format!(
                "a row length divisible by the {} block size {block}",
                dtype_name(dtype)
            ),
            format!("shape {dims:?}"),
        ));
    }
    let n_bytes = (elems / block)
        .checked_mul(dtype.type_size() as u64)
        .ok_or_else(|| {
            bad(
                "a byte size that fits in 64 bits".into(),
                format!("{dims:?}"),
            )
        })?;
    let start = data_offset
        .checked_add(offset)
        .ok_or_else(|| bad("an offset inside the file".into(), offset.to_string()))?;
    let end = start.checked_add(n_bytes);
    match end {
        Some(end) if end <= file_len => {}
        _ => {
            return Err(GgufError::Truncated {
                path: path.to_path_buf(),
                detail: format!(
                    "tensor {name} ({} {dims:?}, {n_bytes} bytes) starts at byte {start} and needs the file to be at least {} bytes, but it is {file_len}",
                    dtype_name(dtype),
                    start.saturating_add(n_bytes)
                ),
            });
        }
    }
    if start % 4 != 0 {
        return Err(bad(
            "data aligned to 4 bytes (general.alignment)".into(),
            format!("data at byte {start}"),
        ));
    }
    if usize::try_from(start + n_bytes).is_err() {
        return Err(bad(
            "a range addressable on this machine".into(),
            format!("end {}", start + n_bytes),
        ));
    }
    Ok(TensorEntry {
        name: name.to_string(),
        dtype,
        shape: dims.to_vec(),
        start,
        n_bytes,
    })
}

/// A row-major f32 tensor as a safetensors view; bytes are produced when the writer asks.
struct F32View<'a> {
    shape: &'a [usize],
    data: &'a [f32],
}

impl safetensors::View for F32View<'_> {
    fn dtype(&self) -> safetensors::Dtype {
        safetensors::Dtype::F32
    }
    fn shape(&self) -> &[usize] {
        self.shape
    }
    fn data(&self) -> Cow<'_, [u8]> {
        Cow::Owned(self.data.iter().flat_map(|x| x.to_le_bytes()).collect())
    }
    fn data_len(&self) -> usize {
        self.data.len() * 4
    }
}

/// Converts a llama GGUF into a Hugging Face folder at `out` (created if needed): `config.json`,
/// `model.safetensors` (f32), `tokenizer.json`, `tokenizer_config.json`,
/// `generation_config.json`, and whet's marker (`whet_data::atomic::MARKER`). Everything is read
/// and checked before the first file is written; the folder is built beside `out` and renamed
/// into place, replacing a folder an earlier conversion made. A folder with other files and no
/// marker is refused and left as it is.
pub fn convert_gguf_to_hf(gguf: &Path, out: &Path) -> Result<ConvertReport> {
    let file = GgufFile::open(gguf)?;
    let config = file.config()?;
    let tokenizer = file.tokenizer_json()?;
    let tokenizer_config = file.tokenizer_config_json()?;
    let generation = file.generation_config_json()?;
    let tensors = file.hf_tensors_with(&config)?;
    let n_params = tensors.iter().map(|t| t.data.len()).sum();

    let names = [
        "model.safetensors",
        "config.json",
        "tokenizer.json",
        "tokenizer_config.json",
        "generation_config.json",
    ];
    atomic::write_owned_dir(out, CONVERT_RUN, |dir| {
        let views = tensors
            .iter()
            .map(|t| {
                let view = F32View {
                    shape: &t.shape,
                    data: &t.data,
                };
                (t.name.clone(), view)
            })
            .collect();
        let meta = HashMap::from([("format".to_string(), "pt".to_string())]);
        crate::load::save_safetensors(&dir.join(names[0]), views, Some(meta))
            .map_err(|e| write_error(gguf, out, e.to_string()))?;
        let config = serde_json::to_value(&config).unwrap_or(Json::Null);
        for (name, value) in
            names[1..]
                .iter()
                .zip([config, tokenizer, tokenizer_config, generation])
        {
            let mut text = serde_json::to_string_pretty(&value)
                .map_err(|e| write_error(gguf, out, e.to_string()))?;
            text.push('\n');
            atomic::write_file(&dir.join(name), text.as_bytes(), Existing::Replace)?;
        }
        Ok::<(), GgufError>(())
    })?;
    let files = names.iter().map(|n| out.join(n)).collect();
    Ok(ConvertReport {
        config,
        n_tensors: tensors.len(),
        n_params,
        files,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unpermute_inverts_llama_cpp_permute() {
        // 2 heads of size 4, 3 columns: the permutation interleaves each head's two halves.
        let rows = 8;
        let cols = 3;
        let w: Vec<f32> = (0..rows * cols).map(|x| x as f32).collect();
        let p = permute_qk_rows(&w, rows, cols, 2);
        // Head 0 rows [0 1 2 3] -> [0 2 1 3]; head 1 rows [4 5 6 7] -> [4 6 5 7].
        let row = |m: &[f32], r: usize| m[r * cols] as usize / cols;
        let order: Vec<usize> = (0..rows).map(|r| row(&p, r)).collect();
        assert_eq!(order, [0, 2, 1, 3, 4, 6, 5, 7]);
        assert_eq!(unpermute_qk_rows(&p, rows, cols, 2), w);
    }

    #[test]
    fn names_map_to_hf() {
        assert_eq!(
            hf_tensor_name("blk.12.attn_output.weight").as_deref(),
            Some("model.layers.12.self_attn.o_proj.weight")
        );
        assert_eq!(
            hf_tensor_name("blk.0.ffn_norm.weight").as_deref(),
            Some("model.layers.0.post_attention_layernorm.weight")
        );
        assert_eq!(
            hf_tensor_name("output.weight").as_deref(),
            Some("lm_head.weight")
        );
        assert_eq!(hf_tensor_name("blk.x.attn_q.weight"), None);
        assert_eq!(hf_tensor_name("blk.0.attn_q.bias"), None);
        assert_eq!(hf_tensor_name("rope_freqs.weight"), None);
    }

    #[test]
    fn byte_alphabet_matches_gpt2() {
        let t = bytes_to_unicode();
        assert_eq!(t[b' ' as usize], 'Ġ');
        assert_eq!(t[b'\n' as usize], 'Ċ');
        assert_eq!(t[b'a' as usize], 'a');
        assert_eq!(t.iter().collect::<BTreeSet<_>>().len(), 256);
    }
}
