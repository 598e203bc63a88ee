//! Helpers shared by the test modules: tiny configs, packed inputs, temp dirs, comparisons.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};

use candle_core::{Device, Tensor};
use whet_model::Config;

pub fn cpu() -> Device {
    Device::Cpu
}

/// A tiny Llama: GQA (4 heads, 2 KV heads), untied head.
pub fn tiny_config(model_type: &str) -> Config {
    let json = format!(
        r#"{{
            "model_type": "{model_type}",
            "vocab_size": 64,
            "hidden_size": 32,
            "intermediate_size": 48,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "rms_norm_eps": 1e-5,
            "rope_theta": 10000.0,
            "max_position_embeddings": 128,
            "tie_word_embeddings": false,
            "bos_token_id": 1,
            "eos_token_id": 2
        }}"#
    );
    Config::from_json_str(&json, Path::new("tiny/config.json")).expect("tiny config parses")
}

/// Batch of 2 rows x 12 tokens; row 1 packs two documents (5 + 7 tokens): positions restart
/// and the segment id changes. Targets are the next token within a document, -100 at each
/// document's last token and on the first 3 tokens of row 0 (a "prompt").
pub struct Batch {
    pub ids: Tensor,       // (B, T) u32
    pub positions: Tensor, // (B, T) u32
    pub segments: Tensor,  // (B, T) u32
    pub targets: Tensor,   // (B, T) i64
    pub ids_rows: Vec<Vec<u32>>,
    pub targets_rows: Vec<Vec<i64>>,
}

pub fn packed_batch(vocab: u32, seed: u32) -> Batch {
    let t = 12;
    let tok = |i: u32| (i * 7 + seed * 13 + 3) % vocab;
    let row0: Vec<u32> = (0..t).map(tok).collect();
    let row1: Vec<u32> = (0..t).map(|i| tok(i + 40)).collect();
    let pos0: Vec<u32> = (0..t).collect();
    let pos1: Vec<u32> = (0..5).chain(0..7).collect();
    let seg0 = vec![0u32; t as usize];
    let seg1: Vec<u32> = std::iter::repeat_n(0, 5)
        .chain(std::iter::repeat_n(1, 7))
        .collect();
    let shift = |ids: &[u32], seg: &[u32]| -> Vec<i64> {
        (0..ids.len())
            .map(|i| {
                if i + 1 < ids.len() && seg[i + 1] == seg[i] {
                    ids[i + 1] as i64
                } else {
                    -100
                }
            })
            .collect()
    };
    let mut tgt0 = shift(&row0, &seg0);
    for x in tgt0.iter_mut().take(3) {
        *x = -100;
    }
    let tgt1 = shift(&row1, &seg1);
    let dev = cpu();
    let t2 = |a: &[u32], b: &[u32]| Tensor::from_vec([a, b].concat(), (2, a.len()), &dev).unwrap();
    Batch {
        ids: t2(&row0, &row1),
        positions: t2(&pos0, &pos1),
        segments: t2(&seg0, &seg1),
        targets: Tensor::from_vec(
            [tgt0.as_slice(), tgt1.as_slice()].concat(),
            (2, tgt0.len()),
            &dev,
        )
        .unwrap(),
        ids_rows: vec![row0, row1],
        targets_rows: vec![tgt0, tgt1],
    }
}

/// max |a - b| over all elements.
pub fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
    assert_eq!(a.dims(), b.dims(), "shapes differ");
    (a - b)
        .unwrap()
        .abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
}

pub fn max_abs(a: &Tensor) -> f32 {
    a.abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
}

/// max|a - b| / max(max|b|, 1e-12): the error relative to the reference's scale.
pub fn rel_err(a: &Tensor, reference: &Tensor) -> f32 {
    max_abs_diff(a, reference) / max_abs(reference).max(1e-12)
}

/// A fresh directory under the system temp dir, removed on drop.
pub struct TempDir(PathBuf);

impl TempDir {
    pub fn new(tag: &str) -> TempDir {
        static N: AtomicUsize = AtomicUsize::new(0);
        let n = N.fetch_add(1, Ordering::SeqCst);
        let p =
            std::env::temp_dir().join(format!("whet-model-it-{}-{n}-{tag}", std::process::id()));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).unwrap();
        TempDir(p)
    }

    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Log-sum-exp cross-entropy of one logits row, in f64: the test's own reference.
pub fn ce_row(logits: &[f32], target: usize) -> f64 {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
    let lse = logits
        .iter()
        .map(|&x| (x as f64 - max).exp())
        .sum::<f64>()
        .ln()
        + max;
    lse - logits[target] as f64
}

/// d f / d var[i] by central differences with Richardson extrapolation (steps `eps` and
/// `eps / 2`, truncation error O(eps^4)); `var` is restored afterwards.
pub fn finite_difference(var: &candle_core::Var, i: usize, eps: f32, f: impl Fn() -> f64) -> f64 {
    let orig = var
        .as_tensor()
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap();
    let at = |d: f32| {
        let mut v = orig.clone();
        v[i] += d;
        var.set(&Tensor::from_vec(v, var.shape(), var.device()).unwrap())
            .unwrap();
        f()
    };
    let wide = (at(eps) - at(-eps)) / (2.0 * eps as f64);
    let narrow = (at(eps / 2.0) - at(-eps / 2.0)) / eps as f64;
    var.set(&Tensor::from_vec(orig, var.shape(), var.device()).unwrap())
        .unwrap();
    (4.0 * narrow - wide) / 3.0
}

/// `<cache>/models/<dir>/<file>`: where `cargo xtask fetch-model` puts a real model (`$WHET_CACHE`,
/// else `~/.cache/whet`). Tests that need one skip with a printed reason when it is absent.
pub fn cached_model(dir: &str, file: &str) -> PathBuf {
    let base = std::env::var_os("WHET_CACHE")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            let home = std::env::var_os("HOME")
                .map(PathBuf::from)
                .unwrap_or_default();
            home.join(".cache").join("whet")
        });
    base.join("models").join(dir).join(file)
}
