//! [`GgufFile`]: a GGUF file opened (header checked, then read by candle), every tensor's byte
//! range checked against the file, and its tensors dequantized on request.

use std::collections::HashMap;
use std::fs::File;
use std::io::{BufReader, Seek, SeekFrom};
use std::path::{Path, PathBuf};

use candle_core::Device;
use candle_core::quantized::GgmlDType;
use candle_core::quantized::ggml_file::qtensor_from_ggml;
use candle_core::quantized::gguf_file::{Content, Value};
use memmap2::Mmap;

use super::header;
use crate::error::{Error, Result};

/// A GGUF file whose header has been read and whose tensor ranges have been checked against the
/// file size. Tensor data is memory-mapped and only read when dequantized.
pub struct GgufFile {
    pub(super) path: PathBuf,
    file_len: u64,
    pub(super) content: Content,
    mmap: Mmap,
    /// Tensors in file order (by offset), every byte range inside the file.
    pub(super) tensors: Vec<TensorEntry>,
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

/// The name llama.cpp gives `dtype`.
pub(super) fn dtype_name(dtype: GgmlDType) -> &'static str {
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
pub(super) fn dequantizable(dtype: GgmlDType) -> bool {
    !matches!(dtype, GgmlDType::Q8_1 | GgmlDType::Q8K)
}

impl GgufFile {
    /// Reads the header of `path` and checks every tensor's byte range against the file length.
    /// Does not read tensor data.
    pub fn open(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref().to_path_buf();
        let io = |op: &'static str| {
            let path = path.clone();
            move |source| Error::Io { path, op, source }
        };
        let file = File::open(&path).map_err(io("cannot open the GGUF file"))?;
        let file_len = file
            .metadata()
            .map_err(io("cannot stat the GGUF file"))?
            .len();
        header::scan(BufReader::new(&file), file_len, &path)?;

        let mut reader = BufReader::new(&file);
        reader
            .seek(SeekFrom::Start(0))
            .map_err(io("cannot seek in the GGUF file"))?;
        let content = Content::read(&mut reader).map_err(|e| Error::GgufMalformed {
            path: path.clone(),
            detail: e.to_string(),
        })?;

        // SAFETY: the map is read-only and lives as long as `self`; as with every mmap-based
        // loader, the file must not be truncated or rewritten while it is open.
        let mmap = unsafe { Mmap::map(&file) }.map_err(io("cannot memory-map the GGUF file"))?;
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

    /// Dequantizes one tensor to f32 in the file's own layout (no renaming, no un-permuting).
    pub fn dequantize(&self, name: &str) -> Result<Vec<f32>> {
        let entry = self.tensor(name).ok_or_else(|| Error::GgufTensor {
            path: self.path.clone(),
            tensor: name.to_string(),
            expected: "present".into(),
            found: "no such tensor in the file".into(),
        })?;
        self.dequantize_entry(entry)
    }

    pub(super) fn not_dequantizable(&self, entry: &TensorEntry) -> Error {
        Error::GgufQuantization {
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

    pub(super) fn dequantize_entry(&self, entry: &TensorEntry) -> Result<Vec<f32>> {
        if !dequantizable(entry.dtype) {
            return Err(self.not_dequantizable(entry));
        }
        // `open` checked start + n_bytes <= file_len and 4-byte alignment (the map is
        // page-aligned), which candle's block cast needs.
        let (start, end) = (entry.start as usize, (entry.start + entry.n_bytes) as usize);
        let raw = &self.mmap[start..end];
        let fail = |e: candle_core::Error| Error::GgufTensor {
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
            return Err(Error::GgufTensor {
                path: self.path.clone(),
                tensor: entry.name.clone(),
                expected: "finite values".into(),
                found: format!("{} at element {i}", data[i]),
            });
        }
        Ok(data)
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
    let bad = |expected: String, found: String| Error::GgufTensor {
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
            return Err(Error::GgufTruncated {
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
