//! Generation and sampling.

use candle_core::{DType, Tensor};
use whet_model::generate::{apply_repetition_penalty, softmax, top_k_filter, top_p_filter};
use whet_model::{GenerationConfig, LoraConfig, Model, Sampler, Trainable, generate};

use crate::common::*;
use crate::model::spread_model;

/// Greedy decoding without a cache: the full forward over the whole sequence each step.
fn greedy_reference(model: &Model, prompt: &[u32], n: usize) -> Vec<u32> {
    let mut seq = prompt.to_vec();
    for _ in 0..n {
        let t = seq.len();
        let ids = Tensor::new(seq.as_slice(), &cpu())
            .unwrap()
            .unsqueeze(0)
            .unwrap();
        let pos = Tensor::arange(0u32, t as u32, &cpu())
            .unwrap()
            .unsqueeze(0)
            .unwrap();
        let seg = Tensor::zeros((1, t), DType::U32, &cpu()).unwrap();
        let logits = model.logits(&ids, &pos, &seg).unwrap(); // (1, T, V)
        let last = logits
            .get(0)
            .unwrap()
            .get(t - 1)
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        let mut best = 0;
        for (i, &x) in last.iter().enumerate() {
            if x > last[best] {
                best = i;
            }
        }
        seq.push(best as u32);
    }
    seq[prompt.len()..].to_vec()
}

#[test]
fn greedy_generation_matches_argmax_of_the_full_forward() {
    let cfg = tiny_config("llama");
    let model = spread_model(
        &cfg,
        31,
        Trainable::Lora {
            config: LoraConfig::new(2, 4.0),
            seed: 0,
        },
    );
    let prompt = [1u32, 17, 5, 40];
    let mut gc = GenerationConfig::greedy(12);
    gc.eos_token_ids = Some(vec![]);
    let got = generate(&model, &prompt, &gc).unwrap();
    assert_eq!(got.len(), 12);
    assert_eq!(got, greedy_reference(&model, &prompt, 12));
    // generation builds no graph: the trainable model is untouched and still trainable
    assert!(!model.trainable().is_empty());
}

#[test]
fn generation_stops_at_any_eos_id() {
    let cfg = tiny_config("llama");
    let model = spread_model(&cfg, 32, Trainable::None);
    let prompt = [3u32, 9];
    let free = greedy_reference(&model, &prompt, 6);
    let mut gc = GenerationConfig::greedy(6);
    gc.eos_token_ids = Some(vec![63, free[2]]);
    let stop_at = free
        .iter()
        .position(|t| gc.eos_token_ids.as_ref().unwrap().contains(t))
        .unwrap();
    let got = generate(&model, &prompt, &gc).unwrap();
    assert_eq!(
        got,
        free[..=stop_at].to_vec(),
        "the stop token is included, nothing after it"
    );
    let e = generate(&model, &[], &gc).unwrap_err();
    assert!(e.to_string().contains("prompt_ids"), "{e}");
}

#[test]
fn sampling_is_seeded() {
    let cfg = tiny_config("qwen2");
    let model = spread_model(&cfg, 33, Trainable::None);
    let gc = GenerationConfig {
        max_new_tokens: 16,
        temperature: 1.5,
        top_k: 40,
        top_p: 0.95,
        repetition_penalty: 1.1,
        seed: 5,
        eos_token_ids: Some(vec![]),
    };
    let a = generate(&model, &[1, 2, 3], &gc).unwrap();
    let b = generate(&model, &[1, 2, 3], &gc).unwrap();
    assert_eq!(a, b);
    let c = generate(
        &model,
        &[1, 2, 3],
        &GenerationConfig {
            seed: 6,
            ..gc.clone()
        },
    )
    .unwrap();
    assert_ne!(a, c, "16 tokens at temperature 1.5 from another seed");
    let k1 = GenerationConfig {
        top_k: 1,
        repetition_penalty: 1.0,
        ..gc
    };
    assert_eq!(
        generate(&model, &[1, 2, 3], &k1).unwrap(),
        greedy_reference(&model, &[1, 2, 3], 16),
        "top_k = 1 is greedy"
    );
}

#[test]
fn repetition_penalty_follows_hf() {
    let mut s = vec![2.0f32, -1.0, 0.5, 3.0];
    apply_repetition_penalty(&mut s, &[0, 1, 1, 0], 2.0);
    assert_eq!(
        s,
        vec![1.0, -2.0, 0.5, 3.0],
        "positive / penalty, negative * penalty, once each"
    );
}

#[test]
fn top_k_and_top_p_keep_the_right_tokens() {
    let probs = [0.5f64, 0.3, 0.15, 0.05];
    let logits: Vec<f32> = probs.iter().map(|p| p.ln() as f32).collect();
    let kept = |s: &[f32]| s.iter().map(|x| x.is_finite()).collect::<Vec<_>>();

    let mut s = logits.clone();
    top_k_filter(&mut s, 2);
    assert_eq!(kept(&s), [true, true, false, false]);

    for (p, want) in [
        (0.45, [true, false, false, false]),
        (0.6, [true, true, false, false]),
        (0.9, [true, true, true, false]),
        (1.0, [true, true, true, true]),
    ] {
        let mut s = logits.clone();
        top_p_filter(&mut s, p);
        assert_eq!(kept(&s), want, "top_p {p}");
    }
}

#[test]
fn temperature_sampling_draws_from_the_softmax() {
    let logits = [1.0f32, 0.0, -1.0, 2.0];
    let temperature = 2.0;
    let mut sampler = Sampler::new(&GenerationConfig {
        temperature,
        seed: 1,
        ..Default::default()
    });
    let n = 40_000;
    let mut counts = [0usize; 4];
    for _ in 0..n {
        counts[sampler.sample(&logits, &[]) as usize] += 1;
    }
    let scaled: Vec<f32> = logits.iter().map(|x| x / temperature as f32).collect();
    let want = softmax(&scaled);
    for i in 0..4 {
        let freq = counts[i] as f64 / n as f64;
        assert!(
            (freq - want[i]).abs() < 0.01,
            "token {i}: {freq} vs {}",
            want[i]
        );
    }
}

#[test]
fn generate_stream_hands_out_generate_s_tokens_one_by_one_and_can_halt() {
    use std::ops::ControlFlow;
    use whet_model::{Finish, generate_stream};
    let cfg = tiny_config("llama");
    let model = spread_model(&cfg, 31, Trainable::None);
    let prompt = [1u32, 17, 5, 40];
    let mut gc = GenerationConfig::greedy(10);
    gc.eos_token_ids = Some(vec![]);
    let all = generate(&model, &prompt, &gc).unwrap();
    let mut streamed = Vec::new();
    let finish = generate_stream(&model, &prompt, &gc, |id| {
        streamed.push(id);
        ControlFlow::Continue(())
    })
    .unwrap();
    assert_eq!((finish, &streamed), (Finish::Length, &all));

    // Halting after three tokens: exactly three, reported as halted.
    let mut first = Vec::new();
    let finish = generate_stream(&model, &prompt, &gc, |id| {
        first.push(id);
        if first.len() == 3 {
            ControlFlow::Break(())
        } else {
            ControlFlow::Continue(())
        }
    })
    .unwrap();
    assert_eq!((finish, first.as_slice()), (Finish::Halted, &all[..3]));

    // A stop id ends it after that token.
    gc.eos_token_ids = Some(vec![all[4]]);
    let mut upto = Vec::new();
    let first_stop = all.iter().position(|&t| t == all[4]).unwrap();
    let finish = generate_stream(&model, &prompt, &gc, |id| {
        upto.push(id);
        ControlFlow::Continue(())
    })
    .unwrap();
    assert_eq!(
        (finish, upto.as_slice()),
        (Finish::Stop, &all[..=first_stop])
    );
}

/// Batched greedy decoding of prompts of different lengths (left-padded, the padding in a
/// segment of its own) gives each row what decoding it alone gives, stop ids included: on the
/// Llama layout, Mistral's window, Gemma 3's local layers and Phi-4-mini's partial rotary.
#[test]
fn batched_generation_equals_one_prompt_at_a_time() {
    use whet_model::{Finish, generate_batch};
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fixtures/golden");
    for name in ["llama_tiny", "mistral_tiny", "gemma3_tiny", "phi4_tiny"] {
        let dir = root.join(name);
        if !dir.join("model.safetensors").is_file() {
            eprintln!("SKIP {name}: fixture absent");
            continue;
        }
        let model = Model::load(&dir, Trainable::None, &cpu()).unwrap();
        let prompts: [&[u32]; 4] = [
            &[1, 17, 5, 40],
            &[1, 99],
            &[1, 3, 8, 200, 31, 77, 12, 9, 150],
            &[1, 42, 42, 42, 42, 42],
        ];
        let mut gc = GenerationConfig::greedy(10);
        gc.eos_token_ids = Some(vec![]);
        // A stop id that some row reaches: the first row's third greedy token.
        let alone: Vec<Vec<u32>> = prompts
            .iter()
            .map(|p| generate(&model, p, &gc).unwrap())
            .collect();
        gc.eos_token_ids = Some(vec![alone[0][2]]);
        let alone: Vec<Vec<u32>> = prompts
            .iter()
            .map(|p| generate(&model, p, &gc).unwrap())
            .collect();
        let batch = generate_batch(&model, &prompts, &gc).unwrap();
        for (r, (got, want)) in batch.iter().zip(&alone).enumerate() {
            assert_eq!(&got.ids, want, "{name} row {r}");
            let stopped = want.last() == Some(&alone[0][2]) && want.len() <= 10;
            assert_eq!(got.finish == Finish::Stop, stopped, "{name} row {r}");
        }
        assert_eq!(
            batch[0].finish,
            Finish::Stop,
            "{name}: row 0 reaches its stop id"
        );
        eprintln!(
            "{name}: batched greedy equals one-at-a-time ({:?} new tokens)",
            batch.iter().map(|g| g.ids.len()).collect::<Vec<_>>()
        );
    }
}
