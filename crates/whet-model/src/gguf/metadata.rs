//! Typed access to a GGUF's metadata (candle's `Value`s): strings, counts, numbers, token ids
//! and arrays, each error naming the key, what was expected and what was found; and the bound
//! on the memory the metadata may take, which the header walk enforces.

use candle_core::quantized::gguf_file::Value;

use super::GgufFile;
use crate::error::{Error, Result};

/// The most memory the metadata of one GGUF may take once candle has read it. candle holds each
/// value as a `Value` (32 bytes), so a one-byte array element costs 32 bytes: without a bound a
/// file of N bytes of `u8` arrays takes ~31 N. Real vocabularies (262k tokens, their scores,
/// types and merges) take under 64 MiB.
pub const METADATA_MEMORY_LIMIT: u64 = 256 << 20;

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

impl GgufFile {
    /// `general.architecture`.
    pub fn architecture(&self) -> Result<&str> {
        self.req_str("general.architecture", "every GGUF names its architecture")
    }

    pub(super) fn missing(&self, key: &str, hint: &'static str) -> Error {
        Error::GgufMissingKey {
            path: self.path.clone(),
            key: key.to_string(),
            hint,
        }
    }

    pub(super) fn bad(
        &self,
        key: &str,
        expected: impl Into<String>,
        found: impl Into<String>,
    ) -> Error {
        Error::GgufValue {
            path: self.path.clone(),
            key: key.to_string(),
            expected: expected.into(),
            found: found.into(),
        }
    }

    pub(super) fn req_str(&self, key: &str, hint: &'static str) -> Result<&str> {
        match self.content.metadata.get(key) {
            None => Err(self.missing(key, hint)),
            Some(Value::String(s)) => Ok(s),
            Some(v) => Err(self.bad(key, "a string", describe(v))),
        }
    }

    pub(super) fn opt_str(&self, key: &str) -> Result<Option<&str>> {
        match self.content.metadata.get(key) {
            None => Ok(None),
            Some(Value::String(s)) => Ok(Some(s)),
            Some(v) => Err(self.bad(key, "a string", describe(v))),
        }
    }

    pub(super) fn opt_u64(&self, key: &str) -> Result<Option<u64>> {
        match self.content.metadata.get(key) {
            None => Ok(None),
            Some(v) => value_u64(v)
                .map(Some)
                .ok_or_else(|| self.bad(key, "a non-negative integer", describe(v))),
        }
    }

    /// A positive count that must fit comfortably in memory arithmetic.
    pub(super) fn req_count(&self, key: &str, hint: &'static str) -> Result<usize> {
        let v = self.opt_u64(key)?.ok_or_else(|| self.missing(key, hint))?;
        if v == 0 || v > (1 << 24) {
            return Err(self.bad(key, "a count in 1..=16777216", v.to_string()));
        }
        Ok(v as usize)
    }

    pub(super) fn opt_f64(&self, key: &str) -> Result<Option<f64>> {
        match self.content.metadata.get(key) {
            None => Ok(None),
            Some(v) => value_f64(v)
                .map(Some)
                .ok_or_else(|| self.bad(key, "a number", describe(v))),
        }
    }

    pub(super) fn opt_bool(&self, key: &str) -> Result<Option<bool>> {
        match self.content.metadata.get(key) {
            None => Ok(None),
            Some(Value::Bool(b)) => Ok(Some(*b)),
            Some(v) => Err(self.bad(key, "a bool", describe(v))),
        }
    }

    pub(super) fn opt_token_id(&self, key: &str, n_tokens: usize) -> Result<Option<u32>> {
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

    pub(super) fn string_array(&self, key: &str) -> Result<Option<Vec<&str>>> {
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

    pub(super) fn int_array(&self, key: &str) -> Result<Option<Vec<i64>>> {
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

    pub(super) fn float_array(&self, key: &str) -> Result<Option<Vec<f64>>> {
        match self.content.metadata.get(key) {
            None => Ok(None),
            Some(Value::Array(items)) => items
                .iter()
                .enumerate()
                .map(|(i, v)| match *v {
                    Value::F32(x) => Ok(f64::from(x)),
                    Value::F64(x) => Ok(x),
                    ref v => Err(self.bad(&format!("{key}[{i}]"), "a number", describe(v))),
                })
                .collect::<Result<Vec<_>>>()
                .map(Some),
            Some(v) => Err(self.bad(key, "an array of numbers", describe(v))),
        }
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
}
