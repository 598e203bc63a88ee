//! [`convert_gguf_to_hf`]: a llama GGUF written as a Hugging Face folder (`config.json`,
//! `model.safetensors`, the tokenizer files, `generation_config.json`), atomically, into a folder
//! whet may write.

use std::borrow::Cow;
use std::collections::HashMap;
use std::path::{Path, PathBuf};

use serde_json::{Value as Json, json};
use whet_data::atomic::{self, Existing};

use super::GgufFile;
use crate::config::{Config, ModelType};
use crate::error::{Error, Result};

/// The run a converted folder's marker names: any conversion may replace it.
const CONVERT_RUN: &str = "whet convert";

fn write_error(gguf: &Path, out: &Path, detail: String) -> Error {
    Error::GgufWrite {
        path: gguf.to_path_buf(),
        out: out.to_path_buf(),
        detail,
    }
}

/// What [`convert_gguf_to_hf`] wrote.
#[derive(Debug, Clone)]
pub struct ConvertReport {
    pub config: Config,
    /// Tensors written to `model.safetensors`.
    pub n_tensors: usize,
    /// Parameters written (elements over all tensors).
    pub n_params: usize,
    pub files: Vec<PathBuf>,
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
    let pad_token_id = file.pad_token_id()?;
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
        let config = config_json(&config, pad_token_id);
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
        Ok::<(), Error>(())
    })?;
    let files = names.iter().map(|n| out.join(n)).collect();
    Ok(ConvertReport {
        config,
        n_tensors: tensors.len(),
        n_params,
        files,
    })
}

/// `config.json` for a converted GGUF: `config` with the keys transformers writes beside it
/// (`architectures`, `pad_token_id`, `torch_dtype`).
fn config_json(config: &Config, pad_token_id: Option<u32>) -> Json {
    let mut json = serde_json::to_value(config).unwrap_or(Json::Null);
    let class = match config.model_type() {
        ModelType::Llama => "LlamaForCausalLM",
        ModelType::Mistral => "MistralForCausalLM",
        ModelType::Qwen2 => "Qwen2ForCausalLM",
        ModelType::Qwen3 => "Qwen3ForCausalLM",
        ModelType::Gemma3 => "Gemma3ForCausalLM",
        ModelType::Phi3 => "Phi3ForCausalLM",
    };
    if let Json::Object(map) = &mut json {
        if config.is_gemma() {
            map.remove("hidden_act"); // Gemma says `hidden_activation`
        }
        map.insert("architectures".into(), json!([class]));
        if let Some(pad) = pad_token_id {
            map.insert("pad_token_id".into(), json!(pad));
        }
        map.insert("torch_dtype".into(), json!("float32"));
    }
    json
}

impl GgufFile {
    /// `generation_config.json`: the special token ids.
    pub fn generation_config_json(&self) -> Result<Json> {
        let cfg = self.config()?;
        let mut g = serde_json::Map::new();
        g.insert("_from_model_config".into(), json!(true));
        for (k, v) in [
            ("bos_token_id", cfg.bos_token_id),
            // A GGUF names one end-of-sequence id.
            ("eos_token_id", cfg.eos_token_ids().first().copied()),
            ("pad_token_id", self.pad_token_id()?),
        ] {
            if let Some(v) = v {
                g.insert(k.into(), json!(v));
            }
        }
        Ok(Json::Object(g))
    }
}
