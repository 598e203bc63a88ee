//! Activation checkpointing changes memory, never the result: the loss and every trainable
//! gradient equal the plain graph's, with LoRA dropout on (the recomputation must replay the
//! same masks) and under full fine-tuning.

use whet_model::{LoraConfig, Model, Trainable};

use crate::common::*;
use crate::lora::randomize_b;
use crate::model::spread_model;

fn grads(model: &Model, checkpointing: bool) -> (f32, Vec<(String, candle_core::Tensor)>) {
    let mut m = model.clone();
    m.set_activation_checkpointing(checkpointing);
    m.set_training(true);
    m.reseed_dropout(42);
    let b = packed_batch(64, 7);
    let (loss, _) = m
        .loss(&b.ids, &b.positions, &b.segments, &b.targets)
        .unwrap();
    let g = m.backward(&loss).unwrap();
    let named = m
        .trainable()
        .into_iter()
        .map(|(n, v)| {
            let t = g
                .get(v.as_tensor())
                .unwrap_or_else(|| panic!("{n}: no gradient (checkpointing {checkpointing})"))
                .clone();
            (n, t)
        })
        .collect();
    (loss.to_scalar::<f32>().unwrap(), named)
}

#[test]
fn checkpointed_gradients_equal_the_plain_graph() {
    let mut lora = LoraConfig::new(4, 8.0);
    lora.dropout = 0.3;
    for (model_type, trainable) in [
        (
            "llama",
            Trainable::Lora {
                config: lora,
                seed: 3,
            },
        ),
        ("qwen2", Trainable::Full),
    ] {
        let model = spread_model(&tiny_config(model_type), 12, trainable);
        randomize_b(&model, 4);
        let (l0, g0) = grads(&model, false);
        let (l1, g1) = grads(&model, true);
        assert_eq!(l0, l1, "{model_type}: loss");
        assert_eq!(g0.len(), g1.len());
        for ((name, a), (_, b)) in g0.iter().zip(&g1) {
            let e = rel_err(b, a);
            assert!(e < 1e-5, "{model_type} {name}: rel err {e}");
        }
    }
}
