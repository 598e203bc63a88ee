//! whet-kernels' CUDA ops (feature `cuda`), bf16, at the sizes of a ~1B Llama layer at 4 x 2048
//! tokens (H = 2048, I = 8192, 32/8 heads of 64, V = 128256) plus attention at head dim 128.
//! Each op is timed by criterion (with a device synchronisation per iteration) and once more by
//! a plain loop that prints what it achieved next to two peers measured in the same run: a
//! device-to-device copy of 1 GiB (bytes read + written per second) for the memory-bound ops,
//! and cuBLAS's bf16 8192 x 8192 x 8192 product for attention and the LM head. A backward is
//! seeded by `out.backward()` (candle's ones of out's shape), not `out.sum_all().backward()`:
//! candle reduces a whole tensor in one thread block, which took ~1 ms at these sizes and hid
//! the kernels' own time.
//!
//! `cargo bench -p whet-benches --features cuda --bench cuda_kernels` (or the bundle of
//! `cargo xtask cuda-build` on the GPU machine). Without a CUDA device it says so and exits.

use std::hint::black_box;
use std::time::Instant;

use candle_core::{DType, Device, Result, Tensor, Var};
use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use whet_kernels::IGNORE_INDEX;

/// (copy bytes/s, bf16 matmul flop/s) on `dev`, each the mean of 20 runs after 3 warm-ups.
fn peers(dev: &Device) -> (f64, f64) {
    let x = Tensor::zeros(1usize << 29, DType::BF16, dev).expect("copy source"); // 1 GiB
    let copy = seconds(dev, 20, &|| {
        black_box(x.copy()?);
        Ok(())
    });
    let n = 8192;
    let a = randn(&[n, n], 40, dev);
    let b = randn(&[n, n], 41, dev);
    let mm = seconds(dev, 20, &|| {
        black_box(a.matmul(&b)?);
        Ok(())
    });
    let (bytes, flops) = (
        2.0 * (1u64 << 30) as f64 / copy,
        2.0 * (n as f64).powi(3) / mm,
    );
    println!(
        "cuda peers: device-to-device copy {:.0} GB/s (read + write), cuBLAS bf16 {n}^3 {:.0} TFLOP/s",
        bytes / 1e9,
        flops / 1e12
    );
    (bytes, flops)
}

const B: usize = 4;
const T: usize = 2048;
const H: usize = 2048;
const I: usize = 8192;
const NH: usize = 32;
const NKV: usize = 8;
const V: usize = 128_256;
/// LM-head rows per chunk (whet-model's LOSS_CHUNK_ROWS).
const CHUNK: usize = 1024;

fn randn(shape: &[usize], seed: u64, dev: &Device) -> Tensor {
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
    Tensor::from_vec(v, shape, dev)
        .and_then(|t| t.to_dtype(DType::BF16))
        .expect("tensor")
}

fn var(t: &Tensor) -> Tensor {
    Var::from_tensor(t).expect("var").as_tensor().clone()
}

/// Mean seconds of `f` over `iters` runs after 3 warm-ups, the device synchronised around.
fn seconds(dev: &Device, iters: usize, f: &dyn Fn() -> Result<()>) -> f64 {
    for _ in 0..3 {
        f().expect("warm-up");
    }
    dev.synchronize().expect("sync");
    let t0 = Instant::now();
    for _ in 0..iters {
        f().expect("run");
    }
    dev.synchronize().expect("sync");
    t0.elapsed().as_secs_f64() / iters as f64
}

enum Work {
    /// Bytes that must cross HBM at least once.
    Bytes(f64),
    /// Floating-point operations.
    Flops(f64),
}

/// Criterion bench plus one printed line: time and achieved fraction of the peers' rate.
fn bench(
    c: &mut Criterion,
    dev: &Device,
    peer: (f64, f64),
    name: &str,
    work: Work,
    f: &dyn Fn() -> Result<()>,
) {
    let s = seconds(dev, 20, f);
    let line = match work {
        Work::Bytes(b) => format!(
            "{:.0} GB/s = {:.0}% of the copy's",
            b / s / 1e9,
            100.0 * b / s / peer.0
        ),
        Work::Flops(x) => format!(
            "{:.0} TFLOP/s = {:.0}% of cuBLAS bf16's",
            x / s / 1e12,
            100.0 * x / s / peer.1
        ),
    };
    println!("cuda {name}: {:.3} ms, {line}", s * 1e3);
    let mut g = c.benchmark_group(name);
    match work {
        Work::Bytes(b) => g.throughput(Throughput::Bytes(b as u64)),
        Work::Flops(x) => g.throughput(Throughput::Elements(x as u64)),
    };
    g.sample_size(10);
    g.bench_function("cuda", |bn| {
        bn.iter(|| {
            f().expect("run");
            dev.synchronize().expect("sync");
        })
    });
    g.finish();
}

/// Forward, and backward from ones of the output's shape, with every float input a `Var`.
fn fwd_bwd(op: &dyn Fn(&[Tensor]) -> Result<Tensor>, inputs: &[Tensor]) -> Result<()> {
    let out = op(inputs)?;
    black_box(out.backward()?);
    Ok(())
}

fn kernels(c: &mut Criterion) {
    let dev = match Device::new_cuda(0) {
        Ok(d) => d,
        Err(e) => {
            eprintln!(
                "cuda_kernels: skipped: no CUDA device ({})",
                e.to_string().lines().next().unwrap_or_default()
            );
            return;
        }
    };
    let peer = peers(&dev);
    let n = B * T;
    let bf = 2.0; // bytes per bf16

    // RMSNorm (N, H): fwd reads x, w and writes y; bwd reads x, w, dy, writes dx (+ dw).
    let x = randn(&[n, H], 1, &dev);
    let w = (randn(&[H], 2, &dev) + 1.0).expect("w");
    let fwd = |a: &[Tensor]| whet_kernels::rms_norm(&a[0], &a[1], 1e-5);
    bench(
        c,
        &dev,
        peer,
        "rms_norm/fwd",
        Work::Bytes(2.0 * (n * H) as f64 * bf),
        &|| {
            black_box(fwd(&[x.clone(), w.clone()])?);
            Ok(())
        },
    );
    let (xv, wv) = (var(&x), var(&w));
    bench(
        c,
        &dev,
        peer,
        "rms_norm/fwd+bwd",
        Work::Bytes(5.0 * (n * H) as f64 * bf),
        &|| fwd_bwd(&fwd, &[xv.clone(), wv.clone()]),
    );

    // RoPE on q (B, T, NH, D): reads x and cos/sin, writes y; the backward the same again.
    let d = 64;
    let q = randn(&[B, T, NH, d], 3, &dev);
    let pos = Tensor::arange(0u32, T as u32, &dev)
        .and_then(|p| p.unsqueeze(0)?.repeat((B, 1)))
        .expect("pos");
    let inv: Vec<f32> = (0..d / 2)
        .map(|i| 1.0 / 500000f32.powf(2.0 * i as f32 / d as f32))
        .collect();
    let (cos, sin) = whet_kernels::rope_tables(&pos, &inv).expect("tables");
    let (cos, sin) = (
        cos.to_dtype(DType::BF16).expect("cos"),
        sin.to_dtype(DType::BF16).expect("sin"),
    );
    let qn = (B * T * NH * d) as f64;
    let rope = |a: &[Tensor]| whet_kernels::rope(&a[0], &a[1], &a[2]);
    bench(
        c,
        &dev,
        peer,
        "rope/fwd",
        Work::Bytes(2.0 * qn * bf),
        &|| {
            black_box(rope(&[q.clone(), cos.clone(), sin.clone()])?);
            Ok(())
        },
    );
    let qv = var(&q);
    bench(
        c,
        &dev,
        peer,
        "rope/fwd+bwd",
        Work::Bytes(4.0 * qn * bf),
        &|| fwd_bwd(&rope, &[qv.clone(), cos.clone(), sin.clone()]),
    );

    // SwiGLU (N, I): fwd reads gate and up, writes y; bwd reads gate, up, dy, writes 2.
    let gate = randn(&[n, I], 4, &dev);
    let up = randn(&[n, I], 5, &dev);
    let ni = (n * I) as f64;
    let sw = |a: &[Tensor]| whet_kernels::swiglu(&a[0], &a[1]);
    bench(
        c,
        &dev,
        peer,
        "swiglu/fwd",
        Work::Bytes(3.0 * ni * bf),
        &|| {
            black_box(sw(&[gate.clone(), up.clone()])?);
            Ok(())
        },
    );
    let (gv, uv) = (var(&gate), var(&up));
    bench(
        c,
        &dev,
        peer,
        "swiglu/fwd+bwd",
        Work::Bytes(8.0 * ni * bf),
        &|| fwd_bwd(&sw, &[gv.clone(), uv.clone()]),
    );

    // Attention, causal, one document per row: fwd 2 products over the causal half,
    // fwd + bwd counted as 3.5 x fwd (whet's backward recomputes S and dP for dq).
    let seg = Tensor::zeros((B, T), DType::U32, &dev).expect("seg");
    for (d, nh, nkv) in [(64, NH, NKV), (128, 16, 8)] {
        let scale = 1.0 / (d as f64).sqrt();
        let q = randn(&[B, T, nh, d], 6, &dev);
        let k = randn(&[B, T, nkv, d], 7, &dev);
        let v = randn(&[B, T, nkv, d], 8, &dev);
        let att = |a: &[Tensor]| whet_kernels::attention(&a[0], &a[1], &a[2], &seg, scale, None);
        let fwd_flops = 4.0 * (B * nh * d) as f64 * (T as f64) * (T as f64) / 2.0;
        bench(
            c,
            &dev,
            peer,
            &format!("attention_d{d}/fwd"),
            Work::Flops(fwd_flops),
            &|| {
                black_box(att(&[q.clone(), k.clone(), v.clone()])?);
                Ok(())
            },
        );
        let (qv, kv, vv) = (var(&q), var(&k), var(&v));
        bench(
            c,
            &dev,
            peer,
            &format!("attention_d{d}/fwd+bwd"),
            Work::Flops(3.5 * fwd_flops),
            &|| fwd_bwd(&att, &[qv.clone(), kv.clone(), vv.clone()]),
        );
    }

    // Cross entropy over (rows, V) bf16 logits: fwd reads them once, bwd reads and writes.
    let rows = 1024;
    let logits = (randn(&[rows, V], 9, &dev) * 4.0).expect("logits");
    let tg: Vec<i64> = (0..rows)
        .map(|i| {
            if i % 4 == 0 {
                IGNORE_INDEX
            } else {
                (i * 7919 % V) as i64
            }
        })
        .collect();
    let targets = Tensor::new(tg.as_slice(), &dev).expect("targets");
    let ce = |a: &[Tensor]| whet_kernels::cross_entropy_sum(&a[0], &targets);
    let ln = (rows * V) as f64;
    bench(
        c,
        &dev,
        peer,
        "cross_entropy/fwd",
        Work::Bytes(ln * bf),
        &|| {
            black_box(ce(std::slice::from_ref(&logits))?);
            Ok(())
        },
    );
    let lv = var(&logits);
    bench(
        c,
        &dev,
        peer,
        "cross_entropy/fwd+bwd",
        Work::Bytes(3.0 * ln * bf),
        &|| fwd_bwd(&ce, std::slice::from_ref(&lv)),
    );

    // The chunked LM head + CE: products of 2 * rows * H * V flops, 3 of them in the
    // backward plus the recomputed logits.
    let hs = randn(&[n, H], 10, &dev);
    let wh = (randn(&[V, H], 11, &dev) * 0.02).expect("w");
    let tg: Vec<i64> = (0..n).map(|i| (i * 7919 % V) as i64).collect();
    let t_all = Tensor::new(tg.as_slice(), &dev).expect("targets");
    let lce = |a: &[Tensor]| whet_kernels::linear_cross_entropy_sum(&a[0], &a[1], &t_all, CHUNK);
    let mm = 2.0 * (n * H) as f64 * V as f64;
    bench(
        c,
        &dev,
        peer,
        "linear_cross_entropy/fwd",
        Work::Flops(mm),
        &|| {
            black_box(lce(&[hs.clone(), wh.clone()])?);
            Ok(())
        },
    );
    let (hv, whv) = (var(&hs), var(&wh));
    bench(
        c,
        &dev,
        peer,
        "linear_cross_entropy/fwd+bwd (dh, dw)",
        Work::Flops(5.0 * mm),
        &|| fwd_bwd(&lce, &[hv.clone(), whv.clone()]),
    );
    let hv2 = var(&hs);
    bench(
        c,
        &dev,
        peer,
        "linear_cross_entropy/fwd+bwd (dh, w frozen)",
        Work::Flops(4.0 * mm),
        &|| fwd_bwd(&lce, &[hv2.clone(), wh.clone()]),
    );

    // Fused AdamW over ~100M f32 parameters in 7 tensors: reads p, g, m, v, writes p, m, v.
    let sizes = [
        32 << 20,
        16 << 20,
        16 << 20,
        16 << 20,
        8 << 20,
        4 << 20,
        2048,
    ];
    let params: Vec<Tensor> = sizes
        .iter()
        .enumerate()
        .map(|(i, &s)| {
            randn(&[s], 20 + i as u64, &dev)
                .to_dtype(DType::F32)
                .expect("p")
        })
        .collect();
    let grads: Vec<Option<Tensor>> = params
        .iter()
        .map(|p| Some((p * 0.01).expect("g")))
        .collect();
    let opt = whet_kernels::MultiTensorAdamW::new(params.clone(), vec![true; params.len()])
        .expect("adamw");
    let hyper = whet_kernels::AdamWHyper {
        beta1: 0.9,
        beta2: 0.999,
        eps: 1e-8,
        step_size: 1e-4,
        bc2_sqrt: 0.03,
        grad_scale: 1.0,
        decay: 1.0,
    };
    let total: usize = sizes.iter().sum();
    bench(
        c,
        &dev,
        peer,
        "adamw/fused step",
        Work::Bytes(7.0 * 4.0 * total as f64),
        &|| opt.step(&grads, &hyper),
    );
}

criterion_group!(benches, kernels);
criterion_main!(benches);
