use candle_core::{Device, Tensor, Var};
use whet_optim::{AdamW, AdamWConfig, Optimizer, Param, Schedule, ScheduleKind, Sgd, SgdConfig};

/// Least squares `|X w - y|^2` with a known solution; returns (first loss, last loss, distance to w*).
fn fit(make: impl Fn(Vec<Param>) -> Box<dyn Optimizer>, lr: f64, steps: u64) -> (f32, f32, f32) {
    let dev = Device::Cpu;
    let x = Tensor::new(&[[1f32, 2.0], [3.0, -1.0], [0.5, 0.5], [-2.0, 1.0]], &dev).unwrap();
    let w_star = Tensor::new(&[[0.7f32], [-1.3]], &dev).unwrap();
    let y = x.matmul(&w_star).unwrap();
    let w = Var::zeros((2, 1), candle_core::DType::F32, &dev).unwrap();
    let mut opt = make(vec![Param::new("w", w.clone())]);
    let sched = Schedule::new(ScheduleKind::Cosine, lr, 5, steps, 0.0).unwrap();
    let mut first = None;
    let mut last = 0.0;
    for step in 0..steps {
        let loss = x
            .matmul(w.as_tensor())
            .unwrap()
            .sub(&y)
            .unwrap()
            .sqr()
            .unwrap()
            .sum_all()
            .unwrap();
        last = loss.to_scalar::<f32>().unwrap();
        first.get_or_insert(last);
        let grads = loss.backward().unwrap();
        let g = grads.get(w.as_tensor()).cloned();
        opt.step(&[g], sched.lr(step), 1.0).unwrap();
    }
    let dist = w
        .as_tensor()
        .sub(&w_star)
        .unwrap()
        .sqr()
        .unwrap()
        .sum_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    (first.unwrap(), last, dist.sqrt())
}

#[test]
fn adamw_solves_least_squares() {
    let (first, last, dist) = fit(
        |p| Box::new(AdamW::new(p, AdamWConfig::default()).unwrap()),
        0.1,
        300,
    );
    assert!(last < first * 1e-3, "loss {first} -> {last}");
    assert!(dist < 0.05, "distance to the solution {dist}");
}

#[test]
fn sgd_solves_least_squares() {
    let (first, last, dist) = fit(
        |p| Box::new(Sgd::new(p, SgdConfig::default()).unwrap()),
        0.01,
        300,
    );
    assert!(last < first * 1e-3, "loss {first} -> {last}");
    assert!(dist < 0.05, "distance to the solution {dist}");
}
