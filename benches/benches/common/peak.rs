//! The machine's own ceilings, benched beside the kernels so that their throughput reads as a
//! share of the path's peak: `peak/fma-avx512` and `peak/fma-avx2` (GFLOP/s of independent
//! fused multiply-adds on every core, counted as 2 FLOP per lane) and `peak/read` (GB/s of a
//! 256 MiB sum on every core, far past the caches).

use std::hint::black_box;

use criterion::{Criterion, Throughput};

/// Multiply-add iterations per thread and bench iteration.
const ITERS: usize = 2_000_000;
/// Independent accumulators: enough to cover the FMA latency on both FMA ports.
const ACC: usize = 12;

fn threads() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

/// Runs `f` once on each of `threads()` threads and sums what they return.
fn on_all_threads(f: impl Fn(usize) -> f32 + Sync) -> f32 {
    std::thread::scope(|s| {
        let f = &f;
        let hs: Vec<_> = (0..threads()).map(|t| s.spawn(move || f(t))).collect();
        hs.into_iter().map(|h| h.join().expect("thread")).sum()
    })
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
fn fma_avx512(seed: f32) -> f32 {
    use std::arch::x86_64::*;
    let (a, b) = (_mm512_set1_ps(0.999_999), _mm512_set1_ps(1e-7));
    let mut acc = [_mm512_set1_ps(seed); ACC];
    for _ in 0..ITERS {
        for v in acc.iter_mut() {
            *v = _mm512_fmadd_ps(*v, a, b);
        }
    }
    acc.iter().map(|v| _mm512_reduce_add_ps(*v)).sum()
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
fn fma_avx2(seed: f32) -> f32 {
    use std::arch::x86_64::*;
    let (a, b) = (_mm256_set1_ps(0.999_999), _mm256_set1_ps(1e-7));
    let mut acc = [_mm256_set1_ps(seed); ACC];
    for _ in 0..ITERS {
        for v in acc.iter_mut() {
            *v = _mm256_fmadd_ps(*v, a, b);
        }
    }
    let mut lanes = [0f32; 8];
    let mut sum = 0.0;
    for v in acc {
        // SAFETY: `lanes` holds 8 floats.
        unsafe { _mm256_storeu_ps(lanes.as_mut_ptr(), v) };
        sum += lanes.iter().sum::<f32>();
    }
    sum
}

/// Sum of `xs` in 16 independent lanes (the compiler vectorises it at the target's width).
fn sum16(xs: &[f32]) -> f32 {
    let mut acc = [0f32; 16];
    let chunks = xs.chunks_exact(16);
    let tail: f32 = chunks.remainder().iter().sum();
    for c in chunks {
        for (a, x) in acc.iter_mut().zip(c) {
            *a += x;
        }
    }
    acc.iter().sum::<f32>() + tail
}

pub fn bench(c: &mut Criterion) {
    let mut g = c.benchmark_group("peak");
    #[cfg(target_arch = "x86_64")]
    {
        let n = threads() as u64;
        if is_x86_feature_detected!("avx512f") {
            g.throughput(Throughput::Elements(n * (ITERS * ACC * 16 * 2) as u64));
            g.bench_function("fma-avx512", |b| {
                // SAFETY: the CPU has AVX-512F (checked above).
                b.iter(|| on_all_threads(|t| unsafe { fma_avx512(black_box(t as f32)) }))
            });
        } else {
            println!("peak/fma-avx512 skipped: this CPU has no AVX-512F");
        }
        if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") {
            g.throughput(Throughput::Elements(n * (ITERS * ACC * 8 * 2) as u64));
            g.bench_function("fma-avx2", |b| {
                // SAFETY: the CPU has AVX2 and FMA (checked above).
                b.iter(|| on_all_threads(|t| unsafe { fma_avx2(black_box(t as f32)) }))
            });
        } else {
            println!("peak/fma-avx2 skipped: this CPU has no AVX2 + FMA");
        }
    }
    let data = vec![1f32; 64 << 20];
    let part = data.len().div_ceil(threads());
    g.throughput(Throughput::Bytes((data.len() * 4) as u64));
    g.sample_size(20);
    g.bench_function("read", |b| {
        b.iter(|| {
            on_all_threads(|t| {
                sum16(black_box(
                    &data[(t * part).min(data.len())..((t + 1) * part).min(data.len())],
                ))
            })
        })
    });
    g.finish();
}
