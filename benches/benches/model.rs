//! whet-model training steps (loss forward + backward) on random models built in code:
//! 1. a tiny Llama (vocab 256, H 64, 2 layers), full fine-tuning, B = 2 x T = 24;
//! 2. one SmolLM2-135M-sized decoder layer (H 576, NH 9, NKV 3, D 64, I 1536) at
//!    B = 4 x T = 256 with LoRA r = 16 on all linears. The model around it has a 256-token
//!    vocabulary, so embedding + LM head are ~2% of the FLOPs: the number is the layer's.
//!    Throughput is in tokens (1024 per step).
//!
//! `cargo bench -p whet-benches --bench model -- --warm-up-time 1 --measurement-time 5`

use std::hint::black_box;
use std::path::Path;

use candle_core::{Device, Tensor};
use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use whet_model::{Config, LoraConfig, Model};

fn config(
    vocab: usize,
    hidden: usize,
    inter: usize,
    layers: usize,
    heads: usize,
    kv: usize,
) -> Config {
    let json = format!(
        r#"{{"model_type": "llama", "vocab_size": {vocab}, "hidden_size": {hidden},
            "intermediate_size": {inter}, "num_hidden_layers": {layers},
            "num_attention_heads": {heads}, "num_key_value_heads": {kv}, "rms_norm_eps": 1e-5,
            "rope_theta": 100000.0, "tie_word_embeddings": true}}"#
    );
    Config::from_json_str(&json, Path::new("<bench config>")).expect("config")
}

/// (ids, positions, segments, targets) for B rows of T tokens, one document per row.
fn batch(b: usize, t: usize, vocab: usize) -> (Tensor, Tensor, Tensor, Tensor) {
    let dev = Device::Cpu;
    let ids: Vec<u32> = (0..b * t)
        .map(|i| ((i * 7919 + 13) % vocab) as u32)
        .collect();
    let targets: Vec<i64> = (0..b * t)
        .map(|i| {
            if (i + 1) % t == 0 {
                -100
            } else {
                ids[i + 1] as i64
            }
        })
        .collect();
    let positions: Vec<u32> = (0..b).flat_map(|_| 0..t as u32).collect();
    (
        Tensor::from_vec(ids, (b, t), &dev).expect("ids"),
        Tensor::from_vec(positions, (b, t), &dev).expect("positions"),
        Tensor::zeros((b, t), candle_core::DType::U32, &dev).expect("segments"),
        Tensor::from_vec(targets, (b, t), &dev).expect("targets"),
    )
}

fn step(model: &Model, x: &(Tensor, Tensor, Tensor, Tensor)) {
    let (loss, _n) = model.loss(&x.0, &x.1, &x.2, &x.3).expect("loss");
    black_box(loss.backward().expect("backward"));
}

fn model(c: &mut Criterion) {
    let dev = Device::Cpu;

    let mut g = c.benchmark_group("model/tiny_full_ft");
    let cfg = config(256, 64, 128, 2, 4, 2);
    let mut tiny = Model::random(&cfg, 0, &dev).expect("model");
    tiny.make_full_trainable().expect("full");
    let x = batch(2, 24, 256);
    g.throughput(Throughput::Elements(48));
    g.bench_function("fwd+bwd", |b| b.iter(|| step(&tiny, &x)));
    g.finish();

    let mut g = c.benchmark_group("model/smollm2_layer_lora16");
    g.sample_size(10);
    let cfg = config(256, 576, 1536, 1, 9, 3);
    let mut layer = Model::random(&cfg, 0, &dev).expect("model");
    layer
        .apply_lora(&LoraConfig::new(16, 32.0), 0)
        .expect("lora");
    let x = batch(4, 256, 256);
    g.throughput(Throughput::Elements(1024));
    g.bench_function("fwd+bwd", |b| b.iter(|| step(&layer, &x)));
    g.finish();
}

criterion_group!(benches, model);
criterion_main!(benches);
