//! GGUF tensors as Hugging Face tensors: llama.cpp's names to transformers' names per
//! architecture, the shapes the config implies, the Q/K row permutation llama.cpp's converter
//! applies to llama files (and [`crate::export`] applies again), and the `+ 1` it adds to
//! Gemma's norm weights.

use std::collections::BTreeSet;

use super::file::dequantizable;
use super::{GgufArch, GgufFile, TensorEntry};
use crate::config::Config;
use crate::error::{Error, Result};

/// A dequantized tensor under its Hugging Face name, row-major f32.
#[derive(Debug, Clone)]
pub struct HfTensor {
    pub name: String,
    pub shape: Vec<usize>,
    pub data: Vec<f32>,
}

/// The Hugging Face name of a GGUF tensor of `arch` (llama.cpp's names, gguf-py's
/// `tensor_mapping.py`), or `None` for a name outside that architecture's layout.
pub fn hf_tensor_name(arch: GgufArch, gguf_name: &str) -> Option<String> {
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
    let gemma = arch == GgufArch::Gemma3;
    let qk_norm = matches!(arch, GgufArch::Qwen3 | GgufArch::Gemma3);
    let hf = match part {
        "attn_q.weight" => "self_attn.q_proj.weight",
        "attn_k.weight" => "self_attn.k_proj.weight",
        "attn_v.weight" => "self_attn.v_proj.weight",
        "attn_output.weight" => "self_attn.o_proj.weight",
        "ffn_gate.weight" => "mlp.gate_proj.weight",
        "ffn_up.weight" => "mlp.up_proj.weight",
        "ffn_down.weight" => "mlp.down_proj.weight",
        "attn_norm.weight" => "input_layernorm.weight",
        "ffn_norm.weight" if gemma => "pre_feedforward_layernorm.weight",
        "ffn_norm.weight" => "post_attention_layernorm.weight",
        "post_attention_norm.weight" if gemma => "post_attention_layernorm.weight",
        "post_ffw_norm.weight" if gemma => "post_feedforward_layernorm.weight",
        "attn_q_norm.weight" if qk_norm => "self_attn.q_norm.weight",
        "attn_k_norm.weight" if qk_norm => "self_attn.k_norm.weight",
        "attn_q.bias" if arch == GgufArch::Qwen2 => "self_attn.q_proj.bias",
        "attn_k.bias" if arch == GgufArch::Qwen2 => "self_attn.k_proj.bias",
        "attn_v.bias" if arch == GgufArch::Qwen2 => "self_attn.v_proj.bias",
        _ => return None,
    };
    Some(format!("model.layers.{layer}.{hf}"))
}

/// The per-layer tensors (`blk.N.<part>`) a file of `arch` must hold.
fn layer_parts(arch: GgufArch) -> Vec<&'static str> {
    let mut parts = vec![
        "attn_q.weight",
        "attn_k.weight",
        "attn_v.weight",
        "attn_output.weight",
        "ffn_gate.weight",
        "ffn_up.weight",
        "ffn_down.weight",
        "attn_norm.weight",
        "ffn_norm.weight",
    ];
    match arch {
        GgufArch::Llama => {}
        GgufArch::Qwen2 => parts.extend(["attn_q.bias", "attn_k.bias", "attn_v.bias"]),
        GgufArch::Qwen3 => parts.extend(["attn_q_norm.weight", "attn_k_norm.weight"]),
        GgufArch::Gemma3 => parts.extend([
            "attn_q_norm.weight",
            "attn_k_norm.weight",
            "post_attention_norm.weight",
            "post_ffw_norm.weight",
        ]),
    }
    parts
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
    /// Gemma: llama.cpp stored the norm weight plus one.
    minus_one: bool,
}

impl GgufFile {
    /// Maps every tensor to its HF name and expected shape; errors on unknown, missing or
    /// mis-shaped tensors before anything is dequantized.
    fn plan(&self, cfg: &Config) -> Result<Vec<Planned<'_>>> {
        let arch = self.arch()?;
        let (h, v, f) = (cfg.hidden_size, cfg.vocab_size, cfg.intermediate_size);
        let q_rows = cfg.num_attention_heads * cfg.head_dim();
        let kv_rows = cfg.num_kv_heads() * cfg.head_dim();
        let mut planned = Vec::with_capacity(self.tensors.len());
        let mut seen = BTreeSet::new();
        for entry in &self.tensors {
            // Llama 3.1-style rope scaling: `config` read it into `rope_scaling`.
            if entry.name == super::rope::ROPE_FREQS && arch == GgufArch::Llama {
                seen.insert(entry.name.clone());
                continue;
            }
            let Some(hf_name) = hf_tensor_name(arch, &entry.name) else {
                return Err(Error::GgufUnsupported {
                    path: self.path.clone(),
                    detail: format!(
                        "tensor {} is not part of the {} layout whet converts (token_embd, output_norm, output, blk.N.{{{}}})",
                        entry.name,
                        arch.name(),
                        layer_parts(arch).join(",")
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
                        return Err(Error::GgufTensor {
                            path: self.path.clone(),
                            tensor: entry.name.clone(),
                            expected: format!(
                                "a layer index below llama.block_count = {}",
                                cfg.num_hidden_layers
                            ),
                            found: format!("layer {layer}"),
                        });
                    }
                    // llama.cpp permutes Q and K rows for the llama architecture only.
                    let permuted = arch == GgufArch::Llama;
                    match name.splitn(3, '.').nth(2) {
                        Some("attn_q.weight") => {
                            (vec![q_rows, h], permuted.then_some(cfg.num_attention_heads))
                        }
                        Some("attn_k.weight") => {
                            (vec![kv_rows, h], permuted.then_some(cfg.num_kv_heads()))
                        }
                        Some("attn_v.weight") => (vec![kv_rows, h], None),
                        Some("attn_q.bias") => (vec![q_rows], None),
                        Some("attn_k.bias" | "attn_v.bias") => (vec![kv_rows], None),
                        Some("attn_q_norm.weight" | "attn_k_norm.weight") => {
                            (vec![cfg.head_dim()], None)
                        }
                        Some("attn_output.weight") => (vec![h, q_rows], None),
                        Some("ffn_gate.weight" | "ffn_up.weight") => (vec![f, h], None),
                        Some("ffn_down.weight") => (vec![h, f], None),
                        _ => (vec![h], None), // the layer norms
                    }
                }
            };
            if entry.shape != shape {
                return Err(Error::GgufTensor {
                    path: self.path.clone(),
                    tensor: entry.name.clone(),
                    expected: format!("shape {shape:?} from the {}.* metadata", arch.name()),
                    found: format!("shape {:?}", entry.shape),
                });
            }
            if !dequantizable(entry.dtype) {
                return Err(self.not_dequantizable(entry));
            }
            seen.insert(entry.name.clone());
            let minus_one = arch == GgufArch::Gemma3 && entry.name.ends_with("norm.weight");
            planned.push(Planned {
                entry,
                hf_name,
                shape,
                unpermute,
                minus_one,
            });
        }
        let mut required = vec![
            "token_embd.weight".to_string(),
            "output_norm.weight".to_string(),
        ];
        for l in 0..cfg.num_hidden_layers {
            for p in layer_parts(arch) {
                required.push(format!("blk.{l}.{p}"));
            }
        }
        if let Some(missing) = required.iter().find(|n| !seen.contains(*n)) {
            return Err(Error::GgufTensor {
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

    /// Every tensor dequantized to f32 under its Hugging Face name, with Q/K rows back in
    /// Hugging Face order. `lm_head.weight` is absent when embeddings are tied.
    pub fn hf_tensors(&self) -> Result<Vec<HfTensor>> {
        let cfg = self.config()?;
        self.hf_tensors_with(&cfg)
    }

    pub(super) fn hf_tensors_with(&self, cfg: &Config) -> Result<Vec<HfTensor>> {
        let plan = self.plan(cfg)?;
        let mut out = Vec::with_capacity(plan.len());
        for p in plan {
            let mut data = self.dequantize_entry(p.entry)?;
            if let Some(n_head) = p.unpermute {
                data = unpermute_qk_rows(&data, p.shape[0], p.shape[1], n_head);
            }
            if p.minus_one {
                // transformers' `Gemma2TensorProcessor`: llama.cpp's converter added 1.
                data.iter_mut().for_each(|w| *w -= 1.0);
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
            hf_tensor_name(GgufArch::Llama, "blk.12.attn_output.weight").as_deref(),
            Some("model.layers.12.self_attn.o_proj.weight")
        );
        assert_eq!(
            hf_tensor_name(GgufArch::Llama, "blk.0.ffn_norm.weight").as_deref(),
            Some("model.layers.0.post_attention_layernorm.weight")
        );
        // Gemma's ffn_norm is the norm before the MLP; its post_attention_norm the one after
        // attention.
        assert_eq!(
            hf_tensor_name(GgufArch::Gemma3, "blk.0.ffn_norm.weight").as_deref(),
            Some("model.layers.0.pre_feedforward_layernorm.weight")
        );
        assert_eq!(
            hf_tensor_name(GgufArch::Gemma3, "blk.3.post_attention_norm.weight").as_deref(),
            Some("model.layers.3.post_attention_layernorm.weight")
        );
        assert_eq!(
            hf_tensor_name(GgufArch::Qwen2, "blk.0.attn_q.bias").as_deref(),
            Some("model.layers.0.self_attn.q_proj.bias")
        );
        assert_eq!(
            hf_tensor_name(GgufArch::Qwen3, "blk.1.attn_k_norm.weight").as_deref(),
            Some("model.layers.1.self_attn.k_norm.weight")
        );
        assert_eq!(
            hf_tensor_name(GgufArch::Llama, "blk.0.attn_k_norm.weight"),
            None
        );
        assert_eq!(
            hf_tensor_name(GgufArch::Llama, "output.weight").as_deref(),
            Some("lm_head.weight")
        );
        assert_eq!(hf_tensor_name(GgufArch::Llama, "blk.x.attn_q.weight"), None);
        assert_eq!(hf_tensor_name(GgufArch::Llama, "blk.0.attn_q.bias"), None);
        assert_eq!(hf_tensor_name(GgufArch::Llama, "rope_freqs.weight"), None);
    }
}
