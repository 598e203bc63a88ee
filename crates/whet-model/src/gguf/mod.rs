//! GGUF (llama.cpp) model files in, Hugging Face folders out.
//!
//! [`GgufFile::open`] reads a GGUF header with candle's reader, after checking the header's counts
//! against the file size, and checks every tensor's byte range against the file before any data is
//! read. From there:
//!
//! * [`GgufFile::config`] turns the `<arch>.*` metadata (`llama`, `qwen2`, `qwen3`, `gemma3`)
//!   into the crate's [`Config`](crate::Config), validated as a `config.json` is, with a llama
//!   file's `rope_freqs.weight` (Llama 3.1-style rope) as `rope_scaling` of type `llama3`;
//! * [`GgufFile::hf_tensors`] dequantizes every tensor to f32 (candle's dequantizers), renames it
//!   to its Hugging Face name, undoes the Q/K row permutation llama.cpp's converter applies to
//!   llama files and the `+ 1` it adds to Gemma's norm weights;
//! * [`GgufFile::tokenizer_json`] / [`GgufFile::tokenizer_config_json`] rebuild a `tokenizer.json`
//!   from `tokenizer.ggml.*` the way transformers' GGUF loader does
//!   (`transformers/integrations/gguf/gguf_tokenizer_mapping.py`), so token ids match it:
//!   byte-level BPE (`gpt2`), and SentencePiece BPE with byte fallback (`llama`: Llama 2,
//!   Mistral v0.1, and Gemma's variant for gemma/gemma2/gemma3 files);
//! * [`convert_gguf_to_hf`] writes all of it as a folder `AutoModelForCausalLM` /
//!   `AutoTokenizer` (and whet) load.
//!
//! Other architectures, and tokenizers [`GgufFile::tokenizer_json`] cannot rebuild, are an
//! [`Error`](crate::Error) (its `NotGguf` and `Gguf*` variants) naming the file and what to do.
//!
//! One file per reason to change:
//! - `header.rs`: the walk over the header before candle reads it (counts, lengths, type ids,
//!   alignment, metadata memory);
//! - `file.rs`: [`GgufFile`] itself: opening, tensor byte ranges, dequantizing;
//! - `metadata.rs`: typed access to metadata values, and [`METADATA_MEMORY_LIMIT`];
//! - `config.rs`: `<arch>.*` metadata to [`Config`](crate::Config);
//! - `rope.rs`: Llama 3.1-style rope scaling from the `rope_freqs.weight` tensor;
//! - `tensors.rs`: tensor names and shapes, and the Q/K permutation;
//! - `tokenizer.rs`: `tokenizer.json` / `tokenizer_config.json` from `tokenizer.ggml.*`;
//! - `convert.rs`: the Hugging Face folder ([`convert_gguf_to_hf`]).

mod config;
mod convert;
mod file;
mod header;
mod metadata;
mod rope;
mod tensors;
mod tokenizer;

pub use config::{ARCHITECTURES, GgufArch};
pub use convert::{ConvertReport, convert_gguf_to_hf};
pub use file::{GgufFile, TensorEntry};
pub use metadata::METADATA_MEMORY_LIMIT;
pub use tensors::{HfTensor, hf_tensor_name, permute_qk_rows, unpermute_qk_rows};
pub(crate) use tokenizer::pre_tokenizer_split;
