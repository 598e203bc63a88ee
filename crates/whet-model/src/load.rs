//! Where weights come from: a Hugging Face folder (memory-mapped safetensors, one file or
//! sharded), an in-memory map (tests), or a seeded random init (tests, benches). The model
//! asks for each weight through [`Vb`] (a small `VarBuilder`), so every weight name is written
//! once, in `llama.rs`, and each loaded tensor remembers its full name in a [`Param`].

use std::collections::HashMap;
use std::path::{Component, Path, PathBuf};
use std::sync::Mutex;

use candle_core::safetensors::MmapedSafetensors;
use candle_core::{DType, Device, Tensor};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use crate::error::{Error, Result};

pub const CONFIG_FILE: &str = "config.json";
pub const WEIGHTS_FILE: &str = "model.safetensors";
pub const WEIGHTS_INDEX_FILE: &str = "model.safetensors.index.json";

/// A weight and its full name (HF name for base weights, PEFT name for LoRA weights).
/// A trainable weight is a `candle_core::Var`'s tensor (`t.is_variable()`); a frozen one is a
/// plain tensor, which gets no gradient and no optimizer state.
#[derive(Debug, Clone)]
pub(crate) struct Param {
    pub name: String,
    pub t: Tensor,
}

impl Param {
    /// Turns the weight into a Var (a copy) unless it already is one.
    pub fn make_trainable(&mut self) -> Result<()> {
        if !self.t.is_variable() {
            self.t = candle_core::Var::from_tensor(&self.t)?.into_inner();
        }
        Ok(())
    }
}

/// How a random weight is drawn (HF `LlamaPreTrainedModel._init_weights`).
#[derive(Debug, Clone, Copy)]
pub(crate) enum Init {
    /// Linear and embedding weights: N(0, initializer_range = 0.02).
    Normal,
    /// Biases.
    Zeros,
    /// RMSNorm weights.
    Ones,
}

// ---------------------------------------------------------------------------------------------
// safetensors files

/// One or more memory-mapped safetensors files and which file holds each tensor.
pub struct SafetensorsFiles {
    shards: Vec<(PathBuf, MmapedSafetensors)>,
    index: HashMap<String, usize>,
}

impl SafetensorsFiles {
    /// `dir/model.safetensors`, else the shards listed in `dir/model.safetensors.index.json`.
    pub fn open_dir(dir: &Path) -> Result<Self> {
        let single = dir.join(WEIGHTS_FILE);
        if single.is_file() {
            return Self::open(&[single]);
        }
        let index_path = dir.join(WEIGHTS_INDEX_FILE);
        if !index_path.is_file() {
            return Err(Error::MissingFile {
                path: single,
                what: "weights",
                hint: "expected model.safetensors or model.safetensors.index.json in the model folder (.bin checkpoints are not read; convert them to safetensors)",
            });
        }
        let text =
            std::fs::read_to_string(&index_path).map_err(|e| Error::io(&index_path, "read", e))?;
        #[derive(serde::Deserialize)]
        struct Index {
            weight_map: HashMap<String, String>,
        }
        let index: Index = crate::error::from_json_str(&text, &index_path)?;
        // (file, the first tensor naming it), in file order.
        let mut files: Vec<(&String, &String)> = index
            .weight_map
            .iter()
            .map(|(tensor, file)| (file, tensor))
            .collect();
        files.sort();
        files.dedup_by(|a, b| a.0 == b.0);
        let roots = shard_roots(dir);
        let mut paths = Vec::with_capacity(files.len());
        for (file, tensor) in files {
            let outside = |why: &str| Error::ShardOutsideFolder {
                path: index_path.clone(),
                tensor: tensor.clone(),
                file: file.clone(),
                why: why.to_string(),
            };
            let rel = Path::new(file);
            if rel.is_absolute() || rel.has_root() {
                return Err(outside("is an absolute path"));
            }
            if rel
                .components()
                .any(|c| !matches!(c, Component::Normal(_) | Component::CurDir))
            {
                return Err(outside("leaves the folder (`..`)"));
            }
            let p = dir.join(rel);
            if !p.is_file() {
                return Err(Error::MissingFile {
                    path: p,
                    what: "weight shard",
                    hint: "it is listed in model.safetensors.index.json; download it again",
                });
            }
            let real = p.canonicalize().map_err(|e| Error::io(&p, "resolve", e))?;
            if !roots.iter().any(|r| real.starts_with(r)) {
                return Err(outside(&format!(
                    "is a symlink to {}, outside the model folder",
                    real.display()
                )));
            }
            paths.push(p);
        }
        Self::open(&paths)
    }

    /// Memory-maps each file and reads its header; a truncated or corrupt file fails here.
    pub fn open(paths: &[PathBuf]) -> Result<Self> {
        let mut shards = Vec::with_capacity(paths.len());
        let mut index = HashMap::new();
        for (i, p) in paths.iter().enumerate() {
            if !p.is_file() {
                return Err(Error::MissingFile {
                    path: p.clone(),
                    what: "safetensors file",
                    hint: "check the path",
                });
            }
            // SAFETY: the mapping is read-only; as with every mmap, the file must not be
            // modified while the model is loading (memmap2's documented caveat).
            let st = unsafe { MmapedSafetensors::new(p) }.map_err(|e| Error::Safetensors {
                path: p.clone(),
                message: e.to_string(),
            })?;
            for (name, _) in st.tensors() {
                index.insert(name, i);
            }
            shards.push((p.clone(), st));
        }
        Ok(SafetensorsFiles { shards, index })
    }

    pub fn paths(&self) -> Vec<PathBuf> {
        self.shards.iter().map(|(p, _)| p.clone()).collect()
    }

    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.index.keys().map(String::as_str)
    }

    pub fn contains(&self, name: &str) -> bool {
        self.index.contains_key(name)
    }

    /// Loads `name` as f32 on `device` (bf16 and f16 are converted), checking its shape
    /// when `expected` is given.
    pub fn load(&self, name: &str, expected: Option<&[usize]>, device: &Device) -> Result<Tensor> {
        let Some(&i) = self.index.get(name) else {
            return Err(Error::MissingTensor {
                tensor: name.to_string(),
                files: self.paths(),
            });
        };
        let (path, st) = &self.shards[i];
        let view = st.get(name).map_err(|e| Error::Safetensors {
            path: path.clone(),
            message: e.to_string(),
        })?;
        if let Some(expected) = expected
            && view.shape() != expected
        {
            return Err(Error::ShapeMismatch {
                path: path.clone(),
                tensor: name.to_string(),
                expected: expected.to_vec(),
                found: view.shape().to_vec(),
            });
        }
        use safetensors::Dtype as St;
        if !matches!(view.dtype(), St::F32 | St::BF16 | St::F16) {
            return Err(Error::UnsupportedDtype {
                path: path.clone(),
                tensor: name.to_string(),
                found: format!("{:?}", view.dtype()),
            });
        }
        let t = candle_core::safetensors::Load::load(&view, device).map_err(|e| {
            Error::Safetensors {
                path: path.clone(),
                message: format!("tensor `{name}`: {e}"),
            }
        })?;
        let t = t.to_dtype(DType::F32)?;
        if !all_finite(&t)? {
            return Err(Error::NonFiniteWeight {
                path: path.clone(),
                tensor: name.to_string(),
            });
        }
        Ok(t)
    }
}

/// Whether every element of `t` is finite: one pass over a contiguous f32 CPU tensor, else
/// `sum(t - t)`, which is 0 unless an element is NaN or infinite.
pub(crate) fn all_finite(t: &Tensor) -> Result<bool> {
    if t.dtype() == DType::F32 && t.device().is_cpu() {
        let (storage, layout) = t.storage_and_layout();
        if let (candle_core::Storage::Cpu(cpu), Some((start, end))) =
            (&*storage, layout.contiguous_offsets())
        {
            let data = cpu.as_slice::<f32>()?;
            return Ok(data[start..end].iter().all(|v| v.is_finite()));
        }
    }
    let zero = t
        .sub(t)?
        .to_dtype(DType::F32)?
        .sum_all()?
        .to_scalar::<f32>()?;
    Ok(zero.is_finite())
}

/// Where the shards of `dir` may resolve to: the folder itself and, for a snapshot of the
/// Hugging Face hub cache (`models--org--name/snapshots/REV`, whose files are symlinks into
/// `models--org--name/blobs`), that repository's `blobs` folder.
fn shard_roots(dir: &Path) -> Vec<PathBuf> {
    let Ok(real) = dir.canonicalize() else {
        return Vec::new();
    };
    let mut roots = vec![real.clone()];
    if let Some(snapshots) = real.parent()
        && snapshots.file_name().is_some_and(|n| n == "snapshots")
        && let Some(repo) = snapshots.parent()
        && repo
            .file_name()
            .is_some_and(|n| n.to_string_lossy().starts_with("models--"))
        && let Ok(blobs) = repo.join("blobs").canonicalize()
    {
        roots.push(blobs);
    }
    roots
}

// ---------------------------------------------------------------------------------------------
// weight sources and the builder

pub(crate) enum Source {
    Files(SafetensorsFiles),
    /// In-memory tensors; `label` stands in for a file name in errors.
    Map {
        tensors: HashMap<String, Tensor>,
        label: PathBuf,
    },
    /// HF init: N(0, std) for matrices, zeros for biases, ones for norms.
    Random {
        rng: Box<Mutex<StdRng>>,
        std: f32,
    },
}

impl Source {
    pub fn random(seed: u64) -> Source {
        Source::Random {
            rng: Box::new(Mutex::new(StdRng::seed_from_u64(seed))),
            std: 0.02,
        }
    }

    fn get(&self, name: &str, shape: &[usize], init: Init, device: &Device) -> Result<Tensor> {
        match self {
            Source::Files(files) => files.load(name, Some(shape), device),
            Source::Map { tensors, label } => {
                let t = tensors.get(name).ok_or_else(|| Error::MissingTensor {
                    tensor: name.to_string(),
                    files: vec![label.clone()],
                })?;
                if t.dims() != shape {
                    return Err(Error::ShapeMismatch {
                        path: label.clone(),
                        tensor: name.to_string(),
                        expected: shape.to_vec(),
                        found: t.dims().to_vec(),
                    });
                }
                Ok(t.to_dtype(DType::F32)?.to_device(device)?)
            }
            Source::Random { rng, std } => {
                let n: usize = shape.iter().product();
                let data = match init {
                    Init::Zeros => vec![0f32; n],
                    Init::Ones => vec![1f32; n],
                    Init::Normal => {
                        let mut rng = rng.lock().unwrap_or_else(|p| p.into_inner());
                        (0..n).map(|_| std * normal(&mut *rng)).collect()
                    }
                };
                Ok(Tensor::from_vec(data, shape, device)?)
            }
        }
    }
}

/// A standard normal draw (Box-Muller).
pub fn normal(rng: &mut impl Rng) -> f32 {
    let u1: f64 = rng.random::<f64>().max(f64::MIN_POSITIVE);
    let u2: f64 = rng.random::<f64>();
    ((-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()) as f32
}

/// A prefix into a [`Source`]: `vb.pp("model").pp("layers").pp(0).get(..., "weight")`
/// reads `model.layers.0.weight`.
#[derive(Clone)]
pub(crate) struct Vb<'a> {
    src: &'a Source,
    prefix: String,
    device: &'a Device,
    /// Quantize linear weights as they load (the QLoRA base).
    quantize: Option<candle_core::quantized::GgmlDType>,
}

impl<'a> Vb<'a> {
    pub fn new(src: &'a Source, device: &'a Device) -> Self {
        Vb {
            src,
            prefix: String::new(),
            device,
            quantize: None,
        }
    }

    pub fn with_quantize(self, quantize: Option<candle_core::quantized::GgmlDType>) -> Self {
        Vb { quantize, ..self }
    }

    pub fn quantize(&self) -> Option<candle_core::quantized::GgmlDType> {
        self.quantize
    }

    pub fn pp(&self, s: impl std::fmt::Display) -> Self {
        let prefix = if self.prefix.is_empty() {
            s.to_string()
        } else {
            format!("{}.{s}", self.prefix)
        };
        Vb {
            src: self.src,
            prefix,
            device: self.device,
            quantize: self.quantize,
        }
    }

    /// The dotted module path this builder reads under.
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    pub fn device(&self) -> &Device {
        self.device
    }

    pub fn get(&self, shape: &[usize], name: &str, init: Init) -> Result<Param> {
        let name = self.pp(name).prefix;
        let t = self.src.get(&name, shape, init, self.device)?;
        Ok(Param { name, t })
    }
}

/// Writes `tensors` as one safetensors file at `path`, atomically (`whet_data::atomic`) and
/// streamed: the header, then each tensor's bytes in turn, never the whole file in memory. The
/// layout is `safetensors::serialize`'s: by descending dtype, then by name, the header padded
/// with spaces to 8 bytes.
pub fn save_safetensors<V: safetensors::View>(
    path: &Path,
    mut tensors: Vec<(String, V)>,
    metadata: Option<HashMap<String, String>>,
) -> Result<()> {
    use safetensors::tensor::{Metadata, TensorInfo};
    use std::io::Write;
    tensors.sort_by(|(a, x), (b, y)| y.dtype().cmp(&x.dtype()).then(a.cmp(b)));
    let mut offset = 0;
    let infos = tensors
        .iter()
        .map(|(name, t)| {
            let n = t.data_len();
            let info = TensorInfo {
                dtype: t.dtype(),
                shape: t.shape().to_vec(),
                data_offsets: (offset, offset + n),
            };
            offset += n;
            (name.clone(), info)
        })
        .collect();
    let bad = |message: String| Error::Safetensors {
        path: path.to_path_buf(),
        message: format!("writing failed: {message}"),
    };
    let header = Metadata::new(metadata, infos).map_err(|e| bad(e.to_string()))?;
    let mut header = serde_json::to_vec(&header).map_err(|e| bad(e.to_string()))?;
    header.resize(header.len().next_multiple_of(8), b' ');
    whet_data::atomic::write_with(path, whet_data::atomic::Existing::Replace, |w| {
        w.write_all(&(header.len() as u64).to_le_bytes())?;
        w.write_all(&header)?;
        for (_, t) in &tensors {
            w.write_all(&t.data())?;
        }
        Ok(())
    })?;
    Ok(())
}
