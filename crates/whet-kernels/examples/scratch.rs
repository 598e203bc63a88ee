// TEMPORARY timing harness (min of N), removed before hand-off.
use candle_core::{DType, Device, Result, Tensor, Var};
use std::time::Instant;
use whet_kernels::*;

fn randn(shape: &[usize], seed: u64) -> Tensor {
    let n: usize = shape.iter().product();
    let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let v: Vec<f32> = (0..n)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            ((s >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
        })
        .collect();
    Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
}
fn time(name: &str, n: usize, f: &dyn Fn() -> Result<()>) {
    f().unwrap();
    let mut best = f64::MAX;
    for _ in 0..n {
        let t = Instant::now();
        f().unwrap();
        best = best.min(t.elapsed().as_secs_f64());
    }
    println!("{name:40} {:9.3} ms", best * 1e3);
}
type Op<'a> = &'a dyn Fn(&[Tensor]) -> Result<Tensor>;
fn pair(name: &str, n: usize, fast: Op, refr: Op, inputs: &[Tensor], train: &[bool]) {
    let args: Vec<Tensor> = inputs
        .iter()
        .zip(train)
        .map(|(t, &tr)| {
            if tr {
                Var::from_tensor(t).unwrap().as_tensor().clone()
            } else {
                t.clone()
            }
        })
        .collect();
    let only = std::env::args().nth(1).unwrap_or_default();
    if !name.contains(&only) {
        return;
    }
    for (k, f) in [("fast", fast), ("ref", refr)] {
        time(&format!("{name}/{k}/fwd"), n, &|| {
            f(inputs)?;
            Ok(())
        });
        time(&format!("{name}/{k}/fwd+bwd"), n, &|| {
            f(&args)?.sum_all()?.backward()?;
            Ok(())
        });
    }
}
fn main() {
    let (b, t, h, nh, nkv, d, i, v) = (4, 256, 576, 9, 3, 64, 1536, 49152);
    pair(
        "rms_norm",
        20,
        &|a| rms_norm(&a[0], &a[1], 1e-5),
        &|a| reference::rms_norm(&a[0], &a[1], 1e-5),
        &[randn(&[b, t, h], 1), randn(&[h], 2)],
        &[true, true],
    );
    let pos = Tensor::arange(0u32, t as u32, &Device::Cpu)
        .unwrap()
        .unsqueeze(0)
        .unwrap()
        .repeat((b, 1))
        .unwrap();
    let inv: Vec<f32> = (0..d / 2)
        .map(|i| 1.0 / 10000f32.powf(2.0 * i as f32 / d as f32))
        .collect();
    let (c, s) = rope_tables(&pos, &inv).unwrap();
    pair(
        "rope",
        20,
        &|a| rope(&a[0], &a[1], &a[2]),
        &|a| reference::rope(&a[0], &a[1], &a[2]),
        &[randn(&[b, t, nh, d], 3), c, s],
        &[true, false, false],
    );
    let seg = Tensor::zeros((b, t), DType::U32, &Device::Cpu).unwrap();
    pair(
        "attention",
        10,
        &|a| attention(&a[0], &a[1], &a[2], &seg, 0.125),
        &|a| reference::attention(&a[0], &a[1], &a[2], &seg, 0.125),
        &[
            randn(&[b, t, nh, d], 4),
            randn(&[b, t, nkv, d], 5),
            randn(&[b, t, nkv, d], 6),
        ],
        &[true, true, true],
    );
    pair(
        "swiglu",
        10,
        &|a| swiglu(&a[0], &a[1]),
        &|a| reference::swiglu(&a[0], &a[1]),
        &[randn(&[b, t, i], 7), randn(&[b, t, i], 8)],
        &[true, true],
    );
    pair(
        "linear_frozen",
        10,
        &|a| linear(&a[0], &a[1], None),
        &|a| reference::linear(&a[0], &a[1], None),
        &[randn(&[b, t, h], 9), randn(&[i, h], 10)],
        &[true, false],
    );
    let tg: Vec<i64> = (0..1024)
        .map(|i| {
            if i % 4 == 0 {
                IGNORE_INDEX
            } else {
                (i * 7919 % v) as i64
            }
        })
        .collect();
    let tg = Tensor::new(tg.as_slice(), &Device::Cpu).unwrap();
    pair(
        "cross_entropy",
        5,
        &|a| cross_entropy_sum(&a[0], &tg),
        &|a| reference::cross_entropy_sum(&a[0], &tg),
        &[(randn(&[1024, v], 11) * 4.0).unwrap()],
        &[true],
    );
    pair(
        "lm_head_ce",
        3,
        &|a| linear_cross_entropy_sum(&a[0], &a[1], &tg, 1024),
        &|a| reference::linear_cross_entropy_sum(&a[0], &a[1], &tg),
        &[randn(&[1024, h], 12), (randn(&[v, h], 13) * 0.05).unwrap()],
        &[true, true],
    );
}
