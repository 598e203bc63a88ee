//! QLoRA: LoRA on a base whose linear weights stay in GGML blocks. The reference is the same
//! model with those weights dequantized to f32 up front: logits and every LoRA gradient
//! must match it (the quantized matmul's backward carries the gradient through every frozen
//! projection to the adapters below it).

use std::collections::HashMap;

use candle_core::quantized::GgmlDType;
use whet_model::{Error, LoadOptions, LoraConfig, Model, Trainable};

use crate::common::*;
use crate::lora::randomize_b;
use crate::model::spread_model;

fn lora(seed: u64) -> Trainable {
    Trainable::Lora {
        config: LoraConfig::new(4, 8.0),
        seed,
    }
}

/// (quantized model with LoRA, the same model dequantized with the same LoRA).
fn pair(model_type: &str, intermediate: usize, ty: GgmlDType) -> (Model, Model) {
    let mut cfg = tiny_config(model_type);
    cfg.intermediate_size = intermediate;
    let mut q = spread_model(&cfg, 31, Trainable::None);
    q.quantize_base(ty).unwrap();
    q.apply_lora(&LoraConfig::new(4, 8.0), 5).unwrap();
    let weights: HashMap<_, _> = q.named_weights().unwrap().into_iter().collect();
    let deq = Model::from_tensors(&cfg, weights, lora(5), &cpu()).unwrap();
    randomize_b(&q, 9);
    randomize_b(&deq, 9);
    (q, deq)
}

#[test]
fn logits_and_lora_gradients_equal_the_dequantized_model() {
    for (model_type, intermediate, ty) in [
        ("llama", 64, GgmlDType::Q8_0),
        ("qwen2", 64, GgmlDType::Q4_0),
        // 48 is not a multiple of 32: down_proj keeps its f32 weight, the rest is Q4_1.
        ("llama", 48, GgmlDType::Q4_1),
    ] {
        let (q, deq) = pair(model_type, intermediate, ty);
        let summary = q.quant_summary();
        assert!(summary.bytes < summary.f32_bytes, "{summary:?}");
        let b = packed_batch(64, 3);
        let lq = q.logits(&b.ids, &b.positions, &b.segments).unwrap();
        let ld = deq.logits(&b.ids, &b.positions, &b.segments).unwrap();
        assert!(max_abs_diff(&lq, &ld) < 1e-5, "{model_type} {ty:?} logits");

        let (loss_q, n) = q
            .loss(&b.ids, &b.positions, &b.segments, &b.targets)
            .unwrap();
        let (loss_d, _) = deq
            .loss(&b.ids, &b.positions, &b.segments, &b.targets)
            .unwrap();
        assert!(n > 0);
        let gq = loss_q.backward().unwrap();
        let gd = loss_d.backward().unwrap();
        let (vq, vd) = (q.trainable(), deq.trainable());
        assert_eq!(vq.len(), vd.len());
        for ((name, a), (_, b)) in vq.iter().zip(&vd) {
            let ga = gq.get(a).unwrap_or_else(|| panic!("{name}: no gradient"));
            let gb = gd.get(b).unwrap_or_else(|| panic!("{name}: no gradient"));
            assert!(max_abs(gb) > 0.0, "{name}: zero reference gradient");
            let e = rel_err(ga, gb);
            assert!(e < 1e-4, "{model_type} {ty:?} {name}: rel err {e}");
        }
    }
}

#[test]
fn mixed_storage_is_reported_and_only_adapters_train() {
    let (q, _) = pair("llama", 48, GgmlDType::Q4_1);
    let s = q.quant_summary();
    let layers = q.config().num_hidden_layers;
    assert_eq!(s.types.get("q4_1"), Some(&(6 * layers)), "{s:?}");
    assert_eq!(s.types.get("f32"), Some(&layers), "{s:?}");
    let (total, trainable) = q.num_params();
    let (_, deq) = pair("llama", 48, GgmlDType::Q4_1);
    assert_eq!(
        total,
        deq.num_params().0,
        "quantized weights still count as parameters"
    );
    assert_eq!(
        trainable,
        q.trainable()
            .iter()
            .map(|(_, v)| v.elem_count())
            .sum::<usize>()
    );
    assert!(q.trainable().iter().all(|(n, _)| n.contains("lora_")));
}

#[test]
fn merge_dequantizes_and_saves_an_f32_model() {
    let (mut q, mut deq) = pair("llama", 64, GgmlDType::Q8_0);
    q.merge_lora().unwrap();
    deq.merge_lora().unwrap();
    assert_eq!(q.quant_summary().types.get("f32"), Some(&14));
    let dir = TempDir::new("qlora-merge");
    q.save_pretrained(dir.path()).unwrap();
    let loaded = Model::load(dir.path(), Trainable::None, &cpu()).unwrap();
    let b = packed_batch(64, 4);
    let a = loaded.logits(&b.ids, &b.positions, &b.segments).unwrap();
    let want = deq.logits(&b.ids, &b.positions, &b.segments).unwrap();
    assert!(max_abs_diff(&a, &want) < 1e-5);
}

#[test]
fn load_with_quantize_keeps_blocks_and_refuses_full_fine_tuning() {
    let mut cfg = tiny_config("llama");
    cfg.intermediate_size = 64;
    let dense = spread_model(&cfg, 8, Trainable::None);
    let dir = TempDir::new("qlora-load");
    dense.save_pretrained(dir.path()).unwrap();
    let opts = LoadOptions {
        quantize: Some(GgmlDType::Q4_0),
    };
    let q = Model::load_with(dir.path(), lora(1), &opts, &cpu()).unwrap();
    let s = q.quant_summary();
    assert_eq!(s.types.get("q4_0"), Some(&14), "{s:?}");
    // Q4_0: 18 bytes per 32 weights against 128.
    assert_eq!(s.bytes * 128, s.f32_bytes * 18);
    let err = Model::load_with(dir.path(), Trainable::Full, &opts, &cpu()).unwrap_err();
    assert!(matches!(err, Error::Quantize { .. }), "{err}");
    assert!(err.to_string().contains("full fine-tuning"), "{err}");
    let mut frozen = Model::load_with(dir.path(), Trainable::None, &opts, &cpu()).unwrap();
    let err = frozen.make_full_trainable().unwrap_err();
    assert!(matches!(err, Error::Quantize { .. }), "{err}");
}
