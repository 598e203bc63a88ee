//! whet-kernels: each fast op against its `reference` composition, forward and forward +
//! backward, at SmolLM2-135M layer sizes (B = 4, T = 256, H = 576, NH = 9, NKV = 3, D = 64,
//! I = 1536, V = 49152). Throughput is in tokens (B * T rows, or N rows for the LM head), except
//! attention's (FLOP of its products) and RMSNorm's (bytes of activations), which read against
//! the `peak` group: the FMA peak of each CPU path and the read bandwidth of all cores. Run
//! with `WHET_CPU=avx2` (or `scalar`) for a lower path.
//!
//! `cargo bench -p whet-benches --bench kernels -- --warm-up-time 1 --measurement-time 3`

use std::hint::black_box;

use candle_core::{DType, Device, Result, Tensor, Var};
use criterion::{
    BenchmarkGroup, Criterion, Throughput, criterion_group, criterion_main, measurement::WallTime,
};
use whet_kernels::{IGNORE_INDEX, reference};

#[path = "common/peak.rs"]
mod peak;

const B: usize = 4;
const T: usize = 256;
const H: usize = 576;
const NH: usize = 9;
const NKV: usize = 3;
const D: usize = 64;
const I: usize = 1536;
const V: usize = 49152;
/// Rows of the LM head + CE benches (the reference materialises (N, V) logits several times).
const N_HEAD: usize = 1024;
const CHUNK: usize = 1024;

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
    Tensor::from_vec(v, shape, &Device::Cpu).expect("tensor")
}

type Op<'a> = &'a dyn Fn(&[Tensor]) -> Result<Tensor>;

/// Benches `fast` and `reference` on `inputs`: forward, and forward + backward with the
/// inputs flagged in `train` as `Var`s (loss = sum of the output). `work`, when given, is the
/// (forward, forward + backward) work in FLOP or bytes, replacing the group's throughput.
fn bench_pair_with(
    g: &mut BenchmarkGroup<'_, WallTime>,
    work: Option<(Throughput, Throughput)>,
    fast: Op<'_>,
    refr: Op<'_>,
    inputs: &[Tensor],
    train: &[bool],
) {
    let args: Vec<Tensor> = inputs
        .iter()
        .zip(train)
        .map(|(t, &tr)| {
            if tr {
                Var::from_tensor(t).expect("var").as_tensor().clone()
            } else {
                t.clone()
            }
        })
        .collect();
    // The fast ops are named after the CPU path that ran (`fast-avx512`, `fast-avx2`, ...).
    let fast_name = format!("fast-{}", whet_kernels::cpu_path());
    for (name, f) in [(fast_name.as_str(), fast), ("reference", refr)] {
        if let Some((fwd, _)) = &work {
            g.throughput(fwd.clone());
        }
        g.bench_function(format!("{name}/fwd"), |b| {
            b.iter(|| black_box(f(inputs).expect("fwd")))
        });
        if let Some((_, both)) = &work {
            g.throughput(both.clone());
        }
        g.bench_function(format!("{name}/fwd+bwd"), |b| {
            b.iter(|| {
                let out = f(&args).expect("fwd");
                black_box(out.sum_all().expect("sum").backward().expect("bwd"))
            })
        });
    }
}

/// [`bench_pair_with`] at the group's throughput.
fn bench_pair(
    g: &mut BenchmarkGroup<'_, WallTime>,
    fast: Op<'_>,
    refr: Op<'_>,
    inputs: &[Tensor],
    train: &[bool],
) {
    bench_pair_with(g, None, fast, refr, inputs, train)
}

fn kernels(c: &mut Criterion) {
    let tokens = (B * T) as u64;

    // RMSNorm in bytes of activations moved (read x, write y; then read x and dy, write dx),
    // against `peak/read`.
    let mut g = c.benchmark_group("rms_norm");
    let x = randn(&[B, T, H], 1);
    let w = (randn(&[H], 2) + 1.0).expect("w");
    let act = (B * T * H * 4) as u64;
    bench_pair_with(
        &mut g,
        Some((Throughput::Bytes(2 * act), Throughput::Bytes(5 * act))),
        &|a| whet_kernels::rms_norm(&a[0], &a[1], 1e-5),
        &|a| reference::rms_norm(&a[0], &a[1], 1e-5),
        &[x, w],
        &[true, true],
    );
    g.finish();

    let mut g = c.benchmark_group("rope");
    g.throughput(Throughput::Elements(tokens));
    let pos = Tensor::arange(0u32, T as u32, &Device::Cpu)
        .and_then(|p| p.unsqueeze(0)?.repeat((B, 1)))
        .expect("pos");
    let inv: Vec<f32> = (0..D / 2)
        .map(|i| 1.0 / 10000f32.powf(2.0 * i as f32 / D as f32))
        .collect();
    let (cos, sin) = whet_kernels::rope_tables(&pos, &inv).expect("tables");
    bench_pair(
        &mut g,
        &|a| whet_kernels::rope(&a[0], &a[1], &a[2]),
        &|a| reference::rope(&a[0], &a[1], &a[2]),
        &[randn(&[B, T, NH, D], 3), cos, sin],
        &[true, false, false],
    );
    g.finish();

    // Attention in FLOP of its products over the causal triangle (2 forward: QK^T, PV; 5 more
    // backward: the recomputed QK^T, dV, dP, dQ, dK), against `peak/fma-*`.
    let mut g = c.benchmark_group("attention");
    // One document per row: the full causal triangle (packing only makes the fast op faster).
    let seg = Tensor::zeros((B, T), DType::U32, &Device::Cpu).expect("seg");
    let scale = 1.0 / (D as f64).sqrt();
    let product = (2 * B * NH * T * (T + 1) / 2 * D) as u64;
    bench_pair_with(
        &mut g,
        Some((
            Throughput::Elements(2 * product),
            Throughput::Elements(7 * product),
        )),
        &|a| whet_kernels::attention(&a[0], &a[1], &a[2], &seg, scale, None),
        &|a| reference::attention(&a[0], &a[1], &a[2], &seg, scale, None),
        &[
            randn(&[B, T, NH, D], 4),
            randn(&[B, T, NKV, D], 5),
            randn(&[B, T, NKV, D], 6),
        ],
        &[true, true, true],
    );
    g.finish();

    let mut g = c.benchmark_group("swiglu");
    g.throughput(Throughput::Elements(tokens));
    bench_pair(
        &mut g,
        &|a| whet_kernels::swiglu(&a[0], &a[1]),
        &|a| reference::swiglu(&a[0], &a[1]),
        &[randn(&[B, T, I], 7), randn(&[B, T, I], 8)],
        &[true, true],
    );
    g.finish();

    // The MLP up projection: (B, T, H) @ (I, H)^T. LoRA case: the weight is frozen.
    let x = randn(&[B, T, H], 9);
    let w = (randn(&[I, H], 10) * 0.05).expect("w");
    let fast: Op<'_> = &|a| whet_kernels::linear(&a[0], &a[1], None);
    let refr: Op<'_> = &|a| reference::linear(&a[0], &a[1], None);
    let mut g = c.benchmark_group("linear_frozen_w");
    g.throughput(Throughput::Elements(tokens));
    bench_pair(&mut g, fast, refr, &[x.clone(), w.clone()], &[true, false]);
    g.finish();
    let mut g = c.benchmark_group("linear_trained_w");
    g.throughput(Throughput::Elements(tokens));
    bench_pair(&mut g, fast, refr, &[x, w], &[true, true]);
    g.finish();

    // Targets with ~1/4 of the rows ignored (prompt tokens in SFT).
    let targets: Vec<i64> = (0..N_HEAD)
        .map(|i| {
            if i % 4 == 0 {
                IGNORE_INDEX
            } else {
                (i * 7919 % V) as i64
            }
        })
        .collect();
    let targets = Tensor::new(targets.as_slice(), &Device::Cpu).expect("targets");

    let mut g = c.benchmark_group("cross_entropy");
    g.throughput(Throughput::Elements(N_HEAD as u64));
    g.sample_size(10);
    bench_pair(
        &mut g,
        &|a| whet_kernels::cross_entropy_sum(&a[0], &targets),
        &|a| reference::cross_entropy_sum(&a[0], &targets),
        &[(randn(&[N_HEAD, V], 11) * 4.0).expect("logits")],
        &[true],
    );
    g.finish();

    let mut g = c.benchmark_group("linear_cross_entropy");
    g.throughput(Throughput::Elements(N_HEAD as u64));
    g.sample_size(10);
    bench_pair(
        &mut g,
        &|a| whet_kernels::linear_cross_entropy_sum(&a[0], &a[1], &targets, CHUNK),
        &|a| reference::linear_cross_entropy_sum(&a[0], &a[1], &targets),
        &[
            randn(&[N_HEAD, H], 12),
            (randn(&[V, H], 13) * 0.05).expect("w"),
        ],
        &[true, true],
    );
    g.finish();
}

criterion_group!(benches, peak::bench, kernels);
criterion_main!(benches);
