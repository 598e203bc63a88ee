//! f32 matmuls of a SmolLM2-135M training step (4 x 256 tokens, H = 576, I = 1536, KV = 192,
//! V = 49152): whet's GEMM (`whet_kernels::matmul_f32`) against the `gemm` crate that candle's
//! CPU matmul uses, both on all threads, in the three layouts of a linear layer: `fwd`
//! y = x @ w^T, `dx` = dy @ w, `dw` = dy^T @ x, and the rank-16 LoRA products. Throughput is
//! in FLOP (2 m n k), to read against the `peak` group's FMA peak of each path. whet's entries are named after the CPU path that ran (`whet-avx512`,
//! `whet-avx2`, `whet-scalar`); `WHET_CPU` forces a lower one:
//!
//! `cargo bench -p whet-benches --bench gemm -- --warm-up-time 1 --measurement-time 3`
//! `WHET_CPU=avx2 cargo bench -p whet-benches --bench gemm -- --warm-up-time 1 --measurement-time 3`

use std::hint::black_box;

use criterion::{Criterion, Throughput, criterion_group, criterion_main};

#[path = "common/peak.rs"]
mod peak;

const M: usize = 1024;

fn values(n: usize, seed: usize) -> Vec<f32> {
    (0..n)
        .map(|i| ((i * seed) % 1000) as f32 * 1e-3 - 0.5)
        .collect()
}

/// `c = a @ b` through the `gemm` crate, operands as (data, [row stride, column stride]).
fn gemm_crate(
    c: &mut [f32],
    a: (&[f32], [usize; 2]),
    b: (&[f32], [usize; 2]),
    (m, n, k): (usize, usize, usize),
) {
    let threads = rayon_threads();
    // SAFETY: the shapes and strides below address only elements inside a, b and c.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            c.as_mut_ptr(),
            1,
            n as isize,
            false,
            a.0.as_ptr(),
            a.1[1] as isize,
            a.1[0] as isize,
            b.0.as_ptr(),
            b.1[1] as isize,
            b.1[0] as isize,
            1.0,
            1.0,
            false,
            false,
            false,
            if threads > 1 {
                gemm::Parallelism::Rayon(threads)
            } else {
                gemm::Parallelism::None
            },
        )
    }
}

fn rayon_threads() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

/// One product: (name, (m, n, k), a, b), operands as (data, [row stride, column stride]).
type Case<'a> = (
    &'static str,
    (usize, usize, usize),
    (&'a [f32], [usize; 2]),
    (&'a [f32], [usize; 2]),
);

/// Benches each case with whet's GEMM and with the `gemm` crate, in group `name`.
fn bench_group(c: &mut Criterion, name: &str, cases: &[Case<'_>]) {
    let mut g = c.benchmark_group(name);
    for &(layout, (m, n, k), a, b) in cases {
        g.throughput(Throughput::Elements(2 * (m * n * k) as u64));
        let mut out = vec![0f32; m * n];
        g.bench_function(
            format!("{layout}/whet-{}", whet_kernels::cpu_path()),
            |bch| bch.iter(|| whet_kernels::matmul_f32(black_box(&mut out), a, b, (m, n, k))),
        );
        g.bench_function(format!("{layout}/gemm-crate"), |bch| {
            bch.iter(|| gemm_crate(black_box(&mut out), a, b, (m, n, k)))
        });
    }
    g.finish();
}

fn bench(c: &mut Criterion) {
    // (OUT, IN) of q/o, k/v, gate/up, down, and the LM head.
    let layers = [
        ("q", 576, 576),
        ("kv", 192, 576),
        ("up", 1536, 576),
        ("down", 576, 1536),
        ("head", 49152, 576),
    ];
    for (name, n_out, n_in) in layers {
        let x = values(M * n_in, 7919);
        let w = values(n_out * n_in, 104_729);
        let dy = values(M * n_out, 31);
        let cases = [
            (
                "fwd",
                (M, n_out, n_in),
                (&x[..], [n_in, 1]),
                (&w[..], [1, n_in]),
            ),
            (
                "dx",
                (M, n_in, n_out),
                (&dy[..], [n_out, 1]),
                (&w[..], [n_in, 1]),
            ),
            (
                "dw",
                (n_out, n_in, M),
                (&dy[..], [1, n_out]),
                (&x[..], [n_in, 1]),
            ),
        ];
        bench_group(c, &format!("gemm/{name}"), &cases);
    }
    // The LoRA products of a rank-16 adapter on a (576 -> 576) layer: the down projection
    // x @ A^T (16 columns), and the gradients of A and B, gd^T @ x (16 rows) and dy^T @ gd
    // (16 columns).
    let (r, h) = (16, 576);
    let x = values(M * h, 7919);
    let a = values(r * h, 104_729);
    let dy = values(M * h, 31);
    let gd = values(M * r, 17);
    let cases = [
        ("down", (M, r, h), (&x[..], [h, 1]), (&a[..], [1, h])),
        ("dA", (r, h, M), (&gd[..], [1, r]), (&x[..], [h, 1])),
        ("dB", (h, r, M), (&dy[..], [1, h]), (&gd[..], [r, 1])),
    ];
    bench_group(c, "gemm/lora-r16", &cases);
}

criterion_group!(benches, peak::bench, bench);
criterion_main!(benches);
