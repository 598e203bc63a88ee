//! The walk over a GGUF header before candle reads it: the file-format checks candle's reader
//! does not make (counts against the file size, length prefixes, type ids, `general.alignment`)
//! and the memory its metadata values will take.

use std::io::{Read, Seek};
use std::path::Path;

use candle_core::quantized::gguf_file::Value;

use super::metadata::METADATA_MEMORY_LIMIT;
use crate::error::{Error, Result};

/// GGML type ids candle's reader knows; any other id makes it fail without naming the tensor.
fn candle_knows_type(id: u32) -> bool {
    matches!(id, 0..=3 | 6..=15 | 30)
}

/// The name llama.cpp gives GGML type `id` (for errors about types candle cannot read).
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

/// Checks the header of `path` (a file of `len` bytes, read from `r` at its start) as
/// [`HeaderScan`] describes.
pub(super) fn scan(r: impl Read + Seek, len: u64, path: &Path) -> Result<()> {
    HeaderScan {
        r,
        pos: 0,
        len,
        path,
        wide: true,
        memory: 0,
    }
    .run()
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
    fn truncated(&self, what: &str, need: u64) -> Error {
        Error::GgufTruncated {
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
        self.r.read_exact(&mut b).map_err(|source| Error::Io {
            path: self.path.to_path_buf(),
            op: "cannot read the GGUF header",
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
            return Err(Error::GgufMalformed {
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
        self.r.seek_relative(step).map_err(|source| Error::Io {
            path: self.path.to_path_buf(),
            op: "cannot seek in the GGUF header",
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
            return Err(Error::GgufMalformed {
                path: self.path.to_path_buf(),
                detail: format!("{what} at byte {} is {n} bytes long", self.pos),
            });
        }
        let mut buf = vec![0u8; n as usize];
        self.r.read_exact(&mut buf).map_err(|source| Error::Io {
            path: self.path.to_path_buf(),
            op: "cannot read the GGUF header",
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
                    return Err(Error::GgufMalformed {
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

    fn bad_type(&self, key: &str, ty: u32) -> Error {
        Error::GgufValue {
            path: self.path.to_path_buf(),
            key: key.to_string(),
            expected: "a GGUF value type (0..=12)".into(),
            found: format!("type id {ty}"),
        }
    }

    fn run(mut self) -> Result<()> {
        let path = self.path.to_path_buf();
        if self.len < 8 {
            return Err(Error::GgufTruncated {
                path,
                detail: format!("the file is {} bytes, shorter than a GGUF header", self.len),
            });
        }
        let magic = self.bytes::<4>("the magic")?;
        if &magic != b"GGUF" {
            return Err(Error::NotGguf {
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
                return Err(Error::GgufUnsupported {
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
            return Err(Error::GgufTruncated {
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
                        return Err(Error::GgufValue {
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
                return Err(Error::GgufTensor {
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
                return Err(Error::GgufQuantization {
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
