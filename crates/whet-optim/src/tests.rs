use candle_core::{Device, Tensor, Var};

use super::*;

fn var(values: &[f32]) -> Var {
    Var::from_tensor(&Tensor::new(values, &Device::Cpu).unwrap()).unwrap()
}

fn values(v: &Var) -> Vec<f32> {
    v.as_tensor().to_vec1::<f32>().unwrap()
}

/// torch.optim.AdamW written out in f64, one element at a time.
fn adamw_reference(p0: f64, grads: &[f64], lr: f64, cfg: AdamWConfig, decay: bool) -> f64 {
    let (mut p, mut m, mut v) = (p0, 0.0, 0.0);
    for (t, g) in grads.iter().enumerate() {
        let t = (t + 1) as i32;
        if decay {
            p *= 1.0 - lr * cfg.weight_decay;
        }
        m = cfg.beta1 * m + (1.0 - cfg.beta1) * g;
        v = cfg.beta2 * v + (1.0 - cfg.beta2) * g * g;
        let mhat = m / (1.0 - cfg.beta1.powi(t));
        let vhat = v / (1.0 - cfg.beta2.powi(t));
        p -= lr * mhat / (vhat.sqrt() + cfg.eps);
    }
    p
}

#[test]
fn adamw_matches_the_torch_formula() {
    let cfg = AdamWConfig {
        weight_decay: 0.1,
        ..Default::default()
    };
    let start = [0.5f32, -1.5, 2.0];
    let grad_seq: Vec<[f32; 3]> = vec![[0.1, -0.2, 0.3], [0.05, 0.4, -0.3], [-0.2, 0.1, 0.0]];
    let w = var(&start);
    let mut opt = AdamW::new(
        vec![Param {
            name: "w".into(),
            var: w.clone(),
            decay: true,
        }],
        cfg,
    )
    .unwrap();
    for g in &grad_seq {
        // grads arrive unscaled (x2) and the optimizer folds in the 0.5 scale.
        let g2: Vec<f32> = g.iter().map(|x| x * 2.0).collect();
        opt.step(
            &[Some(Tensor::new(g2.as_slice(), &Device::Cpu).unwrap())],
            1e-2,
            0.5,
        )
        .unwrap();
    }
    for (j, got) in values(&w).into_iter().enumerate() {
        let gs: Vec<f64> = grad_seq.iter().map(|g| g[j] as f64).collect();
        let want = adamw_reference(start[j] as f64, &gs, 1e-2, cfg, true);
        assert!(
            (got as f64 - want).abs() < 1e-6,
            "element {j}: {got} vs {want}"
        );
    }
}

#[test]
fn no_decay_for_norms_biases_and_embeddings() {
    assert!(!decays_by_default("model.layers.0.input_layernorm.weight"));
    assert!(!decays_by_default("model.norm.weight"));
    assert!(!decays_by_default("model.layers.0.self_attn.q_proj.bias"));
    assert!(!decays_by_default("model.embed_tokens.weight"));
    assert!(decays_by_default("model.layers.0.self_attn.q_proj.weight"));
    assert!(decays_by_default(
        "base_model.model.model.layers.0.mlp.up_proj.lora_A.weight"
    ));
}

#[test]
fn weight_decay_is_skipped_where_excluded() {
    let cfg = AdamWConfig {
        weight_decay: 0.5,
        ..Default::default()
    };
    let decayed = var(&[1.0]);
    let kept = var(&[1.0]);
    let params = vec![
        Param {
            name: "a".into(),
            var: decayed.clone(),
            decay: true,
        },
        Param {
            name: "b".into(),
            var: kept.clone(),
            decay: false,
        },
    ];
    let mut opt = AdamW::new(params, cfg).unwrap();
    let zero = || Some(Tensor::new(&[0f32], &Device::Cpu).unwrap());
    opt.step(&[zero(), zero()], 0.1, 1.0).unwrap();
    assert!((values(&decayed)[0] - 0.95).abs() < 1e-6);
    assert_eq!(values(&kept)[0], 1.0);
}

#[test]
fn resumed_state_continues_bit_identically() {
    let grads: Vec<Vec<f32>> = (0..6)
        .map(|i| vec![(i as f32 * 0.37).sin(), (i as f32).cos()])
        .collect();
    let run = |split: Option<usize>| -> Vec<f32> {
        let w = var(&[0.3, -0.7]);
        let mk =
            |w: &Var| AdamW::new(vec![Param::new("w", w.clone())], AdamWConfig::default()).unwrap();
        let mut opt = mk(&w);
        for (i, g) in grads.iter().enumerate() {
            if Some(i) == split {
                let saved = opt.state();
                opt = mk(&w);
                opt.load_state(&saved).unwrap();
            }
            opt.step(
                &[Some(Tensor::new(g.as_slice(), &Device::Cpu).unwrap())],
                1e-2,
                1.0,
            )
            .unwrap();
        }
        values(&w)
    };
    assert_eq!(run(None), run(Some(3)));
}

#[test]
fn sgd_momentum_matches_the_torch_formula() {
    let w = var(&[1.0]);
    let mut opt = Sgd::new(vec![Param::new("w", w.clone())], SgdConfig::default()).unwrap();
    let (mut p, mut b) = (1.0f64, 0.0f64);
    for (t, g) in [0.5f64, -0.25, 1.0].iter().enumerate() {
        b = if t == 0 { *g } else { 0.9 * b + g };
        p -= 0.1 * b;
        opt.step(
            &[Some(Tensor::new(&[*g as f32], &Device::Cpu).unwrap())],
            0.1,
            1.0,
        )
        .unwrap();
    }
    assert!((values(&w)[0] as f64 - p).abs() < 1e-6);
}

#[test]
fn mismatched_gradient_is_an_error() {
    let mut opt = AdamW::new(
        vec![Param::new("w", var(&[1.0, 2.0]))],
        AdamWConfig::default(),
    )
    .unwrap();
    let err = opt
        .step(
            &[Some(Tensor::new(&[1f32], &Device::Cpu).unwrap())],
            0.1,
            1.0,
        )
        .unwrap_err();
    assert!(err.to_string().contains("`w`"), "{err}");
}

#[test]
fn schedules_warm_up_and_reach_the_floor() {
    let s = Schedule::new(ScheduleKind::Cosine, 1.0, 4, 104, 0.1).unwrap();
    assert!(s.lr(0) < s.lr(1) && s.lr(3) < 1.0);
    assert!((s.lr(4) - 1.0).abs() < 1e-12);
    assert!((s.lr(54) - 0.55).abs() < 1e-9, "{}", s.lr(54));
    assert!((s.lr(104) - 0.1).abs() < 1e-12);
    assert!((s.lr(500) - 0.1).abs() < 1e-12);
    let l = Schedule::new(ScheduleKind::Linear, 2.0, 0, 10, 0.0).unwrap();
    assert!((l.lr(5) - 1.0).abs() < 1e-12);
    let c = Schedule::new(ScheduleKind::Constant, 3.0, 0, 10, 0.0).unwrap();
    assert_eq!(c.lr(9), 3.0);
    let err = Schedule::new(ScheduleKind::Cosine, 0.0, 0, 10, 0.0).unwrap_err();
    assert!(err.to_string().contains("lr"), "{err}");
}

#[test]
fn clipping_uses_the_global_norm() {
    let grads = vec![
        Some(Tensor::new(&[3f32], &Device::Cpu).unwrap()),
        None,
        Some(Tensor::new(&[4f32], &Device::Cpu).unwrap()),
    ];
    let norm = global_norm(&grads, 0.5).unwrap();
    assert!((norm - 2.5).abs() < 1e-9);
    assert!((clip_factor(norm, 1.0) * norm - 1.0).abs() < 1e-5);
    assert_eq!(clip_factor(norm, 10.0), 1.0);
    assert_eq!(clip_factor(norm, 0.0), 1.0);
}

#[test]
fn the_global_norm_of_long_gradients_counts_every_element_once() {
    // Longer than one parallel chunk and not a multiple of the 8 accumulators; squares of
    // multiples of 0.5 sum exactly in f64, so the expected norm is exact. The second gradient is
    // a narrowed view: only its own elements count.
    let n = 3 * (1 << 16) + 5;
    let value = |i: usize| ((i % 7) as f32 - 3.0) * 0.5;
    let long: Vec<f32> = (0..n).map(value).collect();
    let expected: f64 = (0..n).map(|i| (value(i) as f64).powi(2)).sum::<f64>() + 9.0;
    let backing = Tensor::new(&[1f32, 3.0, 2.0], &Device::Cpu).unwrap();
    let grads = vec![
        Some(Tensor::new(long.as_slice(), &Device::Cpu).unwrap()),
        Some(backing.narrow(0, 1, 1).unwrap()),
    ];
    let norm = global_norm(&grads, 1.0).unwrap();
    assert_eq!(norm, expected.sqrt());
}
