//! whet as a library: a LoRA fine-tune with a loop of its own, from `whet-model` (the model,
//! LoRA, the loss), `whet-tokenize` (the tokenizer) and `whet-kernels` (the label convention),
//! with plain SGD written out by hand instead of `whet-optim` and `whet-train`.
//!
//! ```
//! let losses = lora_loop::fine_tune(&lora_loop::tiny_model(), &lora_loop::TEXTS, 8, 0.5).unwrap();
//! assert!(losses[7] < losses[0]);
//! ```

use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};
use whet_kernels::IGNORE_INDEX;
use whet_model::{LoraConfig, Model, Trainable};
use whet_tokenize::Tokenizer;

pub type Result<T> = std::result::Result<T, Box<dyn std::error::Error + Send + Sync>>;

/// A few lines to learn.
pub const TEXTS: [&str; 3] = [
    "The tide comes in twice a day.",
    "Sea water is salty because rivers carry salt to it.",
    "Waves are made by the wind.",
];

/// The tiny Llama with a ChatML tokenizer in `fixtures/tiny_chat` (see fixtures/MANIFEST.md).
pub fn tiny_model() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fixtures/tiny_chat")
}

/// `texts` packed into one row: token ids, positions that restart per text, a segment id per
/// text (attention never crosses texts), and next-token targets (`IGNORE_INDEX` at each text's
/// end, so no target crosses a text either). Each tensor is (1, T).
pub fn packed_row(tok: &Tokenizer, texts: &[&str], dev: &Device) -> Result<[Tensor; 4]> {
    let (mut ids, mut pos, mut seg, mut tgt) = (vec![], vec![], vec![], vec![]);
    for (s, text) in texts.iter().enumerate() {
        let doc = tok.encode_ids(text)?;
        for (i, &id) in doc.iter().enumerate() {
            ids.push(id);
            pos.push(i as u32);
            seg.push(s as u32);
            tgt.push(doc.get(i + 1).map_or(IGNORE_INDEX, |&next| next as i64));
        }
    }
    let n = ids.len();
    Ok([
        Tensor::from_vec(ids, (1, n), dev)?,
        Tensor::from_vec(pos, (1, n), dev)?,
        Tensor::from_vec(seg, (1, n), dev)?,
        Tensor::from_vec(tgt, (1, n), dev)?,
    ])
}

/// Loads the model folder `model_dir` with rank-8 LoRA adapters on every linear layer, and runs
/// `steps` steps of SGD with learning rate `lr` on `texts`; returns each step's mean loss.
pub fn fine_tune(model_dir: &Path, texts: &[&str], steps: usize, lr: f64) -> Result<Vec<f32>> {
    let dev = Device::Cpu;
    let tok = Tokenizer::from_dir(model_dir)?;
    let lora = LoraConfig {
        r: 8,
        alpha: 16.0,
        dropout: 0.0,
        target_modules: Default::default(), // all linear layers
        use_rslora: false,
    };
    let trainable = Trainable::Lora {
        config: lora,
        seed: 0,
    };
    let mut model = Model::load(model_dir, trainable, &dev)?;
    model.set_training(true);
    let [ids, pos, seg, targets] = packed_row(&tok, texts, &dev)?;

    // The loop: forward, backward, and SGD on the LoRA A/B matrices.
    let mut losses = Vec::with_capacity(steps);
    for _ in 0..steps {
        let (sum, n) = model.loss(&ids, &pos, &seg, &targets)?; // summed CE, supervised tokens
        let loss = (sum / n as f64)?;
        let grads = model.backward(&loss)?;
        for (_name, var) in model.trainable() {
            if let Some(g) = grads.get(var.as_tensor()) {
                var.set(&(var.as_tensor() - (g * lr)?)?)?;
            }
        }
        losses.push(loss.to_scalar::<f32>()?);
    }
    Ok(losses)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_loop_lowers_the_loss_on_the_tiny_model() {
        let losses = fine_tune(&tiny_model(), &TEXTS, 12, 0.5).unwrap();
        assert_eq!(losses.len(), 12);
        assert!(losses.iter().all(|l| l.is_finite()), "{losses:?}");
        assert!(
            losses[11] < 0.9 * losses[0],
            "the loss did not come down: {losses:?}"
        );
    }

    #[test]
    fn packed_targets_never_cross_a_text() {
        let tok = Tokenizer::from_dir(tiny_model()).unwrap();
        let [ids, _, seg, tgt] = packed_row(&tok, &["ab", "cd"], &Device::Cpu).unwrap();
        let (ids, seg) = (ids.to_vec2::<u32>().unwrap(), seg.to_vec2::<u32>().unwrap());
        let tgt = tgt.to_vec2::<i64>().unwrap();
        for i in 0..ids[0].len() {
            let last_of_text = i + 1 == ids[0].len() || seg[0][i + 1] != seg[0][i];
            if last_of_text {
                assert_eq!(tgt[0][i], IGNORE_INDEX);
            } else {
                assert_eq!(tgt[0][i], ids[0][i + 1] as i64);
            }
        }
    }
}
