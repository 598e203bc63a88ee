//! The CUDA ops (feature `cuda`) against the CPU ops, forward and every gradient, in f32 and
//! bf16. Inputs are rounded to the tested dtype first, so both sides see the same values; the
//! CPU side computes in f32. Errors are measured as max |cuda - cpu| / max |cpu| per tensor
//! and printed, so a GPU run reports what it reached:
//!
//! | dtype | tolerance (relative to the tensor's max) |
//! |---|---|
//! | f32, own kernels | 2e-5 |
//! | f32, cuBLAS products (linear, LM head) | 2e-3 (cuBLAS may use TF32) |
//! | bf16 elementwise (RMSNorm, RoPE, SwiGLU) and cross entropy | 1e-2 |
//! | bf16 attention (tensor cores, P rounded to bf16) and LM head | 3e-2 |
//!
//! Without a CUDA device each test prints `skipped: no CUDA device (...)` and returns, except
//! `nvrtc_compiles_every_kernel`, which needs only NVRTC.

use anyhow::{Result, ensure};
use candle_core::{DType, Device, Tensor, Var};
use whet_kernels::{
    IGNORE_INDEX, attention, attention_simt, cross_entropy_sum, dropout_mask, linear,
    linear_cross_entropy_sum, rms_norm, rope, rope_tables, swiglu,
};

use crate::common::{rand, rand_vec};

/// The first CUDA device, or `None` after saying why the test is skipped.
fn gpu(test: &str) -> Option<Device> {
    match Device::new_cuda(0) {
        Ok(d) => Some(d),
        Err(e) => {
            eprintln!(
                "{test}: skipped: no CUDA device ({})",
                e.to_string().lines().next().unwrap_or_default()
            );
            None
        }
    }
}

macro_rules! gpu_or_skip {
    ($test:expr) => {
        match gpu($test) {
            Some(d) => d,
            None => return Ok(()),
        }
    };
}

type Op<'a> = &'a dyn Fn(&[Tensor]) -> candle_core::Result<Tensor>;

/// `max |got - want| <= tol * max |want|`, printing the ratio reached.
fn assert_rel(what: &str, got: &Tensor, want: &Tensor, tol: f64) -> Result<()> {
    ensure!(
        got.dims() == want.dims(),
        "{what}: shapes differ, {:?} vs {:?}",
        got.dims(),
        want.dims()
    );
    let host = |t: &Tensor| -> Result<Vec<f64>> {
        Ok(t.to_device(&Device::Cpu)?
            .to_dtype(DType::F64)?
            .flatten_all()?
            .to_vec1::<f64>()?)
    };
    let (g, w) = (host(got)?, host(want)?);
    let scale = w.iter().fold(0f64, |m, x| m.max(x.abs())).max(1e-30);
    let err = g
        .iter()
        .zip(&w)
        .fold(0f64, |m, (a, b)| m.max((a - b).abs()));
    eprintln!("{what}: max |diff| / max |want| = {:.2e}", err / scale);
    ensure!(
        err <= tol * scale && err.is_finite(),
        "{what}: max |diff| {err:.3e} exceeds {tol:.1e} x max |want| ({scale:.3e})"
    );
    Ok(())
}

/// Output and gradients of `sum(f(inputs) * r)` for the `track`ed inputs (as `Var`s); `r` is a
/// fixed random weighting, rounded to `dt` so both devices use the same values.
fn run(
    f: Op<'_>,
    inputs: &[Tensor],
    track: &[bool],
    dt: DType,
) -> Result<(Tensor, Vec<Option<Tensor>>)> {
    let args: Vec<Tensor> = inputs
        .iter()
        .zip(track)
        .map(|(t, &tr)| {
            if tr {
                Ok(Var::from_tensor(t)?.as_tensor().clone())
            } else {
                Ok(t.clone())
            }
        })
        .collect::<Result<_>>()?;
    let out = f(&args)?;
    let r: Vec<f32> = rand_vec(out.elem_count(), 4242, 1.0)
        .into_iter()
        .map(|x| x as f32)
        .collect();
    let r = Tensor::from_vec(r, out.dims(), out.device())?
        .to_dtype(dt)?
        .to_dtype(out.dtype())?;
    let loss = (&out * &r)?.sum_all()?;
    let grads = loss.backward()?;
    Ok((
        out,
        args.iter()
            .zip(track)
            .map(|(a, &tr)| if tr { grads.get(a).cloned() } else { None })
            .collect(),
    ))
}

/// Runs `f` on the CPU (f32) and on `dev` (`dt`) from the same inputs and compares the output
/// and the gradients of the tracked inputs. Integer inputs (ids, targets) pass through.
#[allow(clippy::too_many_arguments)]
fn check(
    what: &str,
    dev: &Device,
    dt: DType,
    f: Op<'_>,
    inputs: &[Tensor],
    track: &[bool],
    tol_out: f64,
    tol_grad: f64,
) -> Result<()> {
    let float = |t: &Tensor| t.dtype().is_float();
    let rounded: Vec<Tensor> = inputs
        .iter()
        .map(|t| {
            if float(t) {
                Ok(t.to_dtype(dt)?.to_dtype(DType::F32)?)
            } else {
                Ok(t.clone())
            }
        })
        .collect::<Result<_>>()?;
    let (want, gw) = run(f, &rounded, track, dt)?;
    let on_dev: Vec<Tensor> = rounded
        .iter()
        .map(|t| {
            let t = if float(t) { t.to_dtype(dt)? } else { t.clone() };
            Ok(t.to_device(dev)?)
        })
        .collect::<Result<_>>()?;
    let (got, gg) = run(f, &on_dev, track, dt)?;
    ensure!(got.device().is_cuda(), "{what}: the output left the GPU");
    assert_rel(&format!("{what} {dt:?} forward"), &got, &want, tol_out)?;
    for (i, (a, b)) in gg.iter().zip(&gw).enumerate() {
        match (a, b) {
            (Some(a), Some(b)) => assert_rel(&format!("{what} {dt:?} grad {i}"), a, b, tol_grad)?,
            (None, None) => {}
            _ => anyhow::bail!(
                "{what}: input {i} has a gradient on one device only (cuda {}, cpu {})",
                a.is_some(),
                b.is_some()
            ),
        }
    }
    Ok(())
}

fn tol(dt: DType, f32_tol: f64, bf16_tol: f64) -> f64 {
    if dt == DType::F32 { f32_tol } else { bf16_tol }
}

const DTYPES: [DType; 2] = [DType::F32, DType::BF16];

#[test]
fn nvrtc_compiles_every_kernel() -> Result<()> {
    // No device needed: NVRTC compiles on the host. compute_80 (A100) and compute_90 (H100).
    for arch in [80, 90] {
        for (name, bytes) in whet_kernels::nvrtc_check(arch)? {
            eprintln!("compute_{arch}: {name}.cu -> {bytes} bytes of PTX");
            ensure!(bytes > 0, "{name}: empty PTX");
        }
    }
    Ok(())
}

/// The self-check `whet train --device cuda` runs before training (f32 and bf16): on first
/// light, every fused kernel should pass it; the table says by how much.
#[test]
fn the_fused_kernels_pass_the_self_check() -> Result<()> {
    let dev = gpu_or_skip!("the_fused_kernels_pass_the_self_check");
    let check = whet_kernels::self_check(&dev)?;
    eprint!("{check}");
    ensure!(
        check.checks.iter().any(|c| c.dtype == DType::BF16),
        "bf16 was not checked"
    );
    ensure!(
        check.failed_ops().is_empty(),
        "fused kernels that disagree with the reference: {:?}",
        check.failed_ops()
    );
    Ok(())
}

#[test]
fn rms_norm_matches_cpu() -> Result<()> {
    let dev = gpu_or_skip!("rms_norm_matches_cpu");
    let f = |a: &[Tensor]| rms_norm(&a[0], &a[1], 1e-5);
    // H = 576 (16-byte vectors), H = 37 (element by element).
    for (rows, h) in [(64, 576), (9, 37)] {
        let x = rand(&[rows, h], 1, DType::F32)?;
        let w = (rand(&[h], 2, DType::F32)? + 1.0)?;
        for dt in DTYPES {
            let t = tol(dt, 2e-5, 1e-2);
            check(
                "rms_norm",
                &dev,
                dt,
                &f,
                &[x.clone(), w.clone()],
                &[true, true],
                t,
                t,
            )?;
            check(
                "rms_norm, frozen w",
                &dev,
                dt,
                &f,
                &[x.clone(), w.clone()],
                &[true, false],
                t,
                t,
            )?;
        }
    }
    Ok(())
}

#[test]
fn rope_matches_cpu() -> Result<()> {
    let dev = gpu_or_skip!("rope_matches_cpu");
    for (d, strided) in [(16, false), (16, true), (6, false)] {
        let (b, t, nh) = (2, 7, 4);
        let pos: Vec<u32> = (0..b * t).map(|i| (i % t) as u32 * 3).collect();
        let pos = Tensor::from_vec(pos, (b, t), &Device::Cpu)?;
        let inv: Vec<f32> = (0..d / 2)
            .map(|i| 1.0 / 10000f32.powf(2.0 * i as f32 / d as f32))
            .collect();
        let (cos, sin) = rope_tables(&pos, &inv)?;
        // Strided: every other head of a (B, T, 2 NH, D) tensor.
        let x = if strided {
            rand(&[b, t, 2 * nh, d], 3, DType::F32)?
        } else {
            rand(&[b, t, nh, d], 3, DType::F32)?
        };
        let f = move |a: &[Tensor]| {
            let x = if strided {
                a[0].reshape((b, t, nh, 2 * d))?.narrow(3, 0, d)?
            } else {
                a[0].clone()
            };
            rope(&x, &a[1], &a[2])
        };
        for dt in DTYPES {
            let tl = tol(dt, 2e-5, 1e-2);
            check(
                &format!("rope d={d} strided={strided}"),
                &dev,
                dt,
                &f,
                &[x.clone(), cos.clone(), sin.clone()],
                &[true, false, false],
                tl,
                tl,
            )?;
        }
    }
    Ok(())
}

#[test]
fn dropout_masks_on_cuda_equal_the_cpus_bit_for_bit() -> Result<()> {
    let dev = gpu_or_skip!("dropout_masks_on_cuda_equal_the_cpus_bit_for_bit");
    for dt in DTYPES {
        for (shape, p, seed) in [
            (vec![3, 5, 7], 0.5f32, 1u64),
            (vec![2, 512, 576], 0.05, u64::MAX),
        ] {
            let want = dropout_mask(shape.as_slice(), p, seed, dt, &Device::Cpu)?;
            let got = dropout_mask(shape.as_slice(), p, seed, dt, &dev)?;
            ensure!(got.dims() == shape.as_slice() && got.dtype() == dt);
            let (g, w) = (
                got.to_device(&Device::Cpu)?
                    .to_dtype(DType::F32)?
                    .flatten_all()?
                    .to_vec1::<f32>()?,
                want.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?,
            );
            let differ = g
                .iter()
                .zip(&w)
                .filter(|(a, b)| a.to_bits() != b.to_bits())
                .count();
            eprintln!(
                "dropout mask {shape:?} p {p} {dt:?}: {differ} of {} values differ",
                w.len()
            );
            ensure!(
                differ == 0,
                "dropout mask {shape:?} {dt:?}: {differ} values differ"
            );
        }
    }
    Ok(())
}

#[test]
fn swiglu_matches_cpu() -> Result<()> {
    let dev = gpu_or_skip!("swiglu_matches_cpu");
    let f = |a: &[Tensor]| swiglu(&a[0], &a[1]);
    for shape in [[8, 1536], [5, 333]] {
        let g = (rand(&shape, 4, DType::F32)? * 4.0)?;
        let u = rand(&shape, 5, DType::F32)?;
        for dt in DTYPES {
            let t = tol(dt, 2e-5, 1e-2);
            check(
                "swiglu",
                &dev,
                dt,
                &f,
                &[g.clone(), u.clone()],
                &[true, true],
                t,
                t,
            )?;
            check(
                "swiglu, up frozen",
                &dev,
                dt,
                &f,
                &[g.clone(), u.clone()],
                &[true, false],
                t,
                t,
            )?;
        }
    }
    Ok(())
}

/// Documents of the given lengths, numbered from 0, packed into one row.
fn docs(lens: &[usize]) -> Vec<u32> {
    lens.iter()
        .enumerate()
        .flat_map(|(i, &n)| std::iter::repeat_n(i as u32, n))
        .collect()
}

struct Case {
    name: &'static str,
    b: usize,
    t: usize,
    s: usize,
    nh: usize,
    nkv: usize,
    d: usize,
    seg: Vec<Vec<u32>>,
}

impl Case {
    fn inputs(&self) -> Result<Vec<Tensor>> {
        let seg = Tensor::from_vec(self.seg.concat(), (self.b, self.s), &Device::Cpu)?;
        Ok(vec![
            rand(&[self.b, self.t, self.nh, self.d], 11, DType::F32)?,
            rand(&[self.b, self.s, self.nkv, self.d], 12, DType::F32)?,
            rand(&[self.b, self.s, self.nkv, self.d], 13, DType::F32)?,
            seg,
        ])
    }

    /// The op (tensor cores where they apply) against the CPU op.
    fn check(&self, dev: &Device, dt: DType) -> Result<()> {
        let scale = 1.0 / (self.d as f64).sqrt();
        let f = |a: &[Tensor]| attention(&a[0], &a[1], &a[2], &a[3], scale, None);
        let t = tol(dt, 2e-5, 3e-2);
        let x = self.inputs()?;
        check(self.name, dev, dt, &f, &x, &[true, true, true, false], t, t)?;
        check(
            &format!("{}, k frozen", self.name),
            dev,
            dt,
            &f,
            &x,
            &[true, false, true, false],
            t,
            t,
        )
    }

    /// The SIMT kernels against the CPU op.
    fn check_simt(&self, dev: &Device, dt: DType) -> Result<()> {
        let scale = 1.0 / (self.d as f64).sqrt();
        let f = |a: &[Tensor]| {
            if a[0].device().is_cuda() {
                attention_simt(&a[0], &a[1], &a[2], &a[3], scale)
            } else {
                attention(&a[0], &a[1], &a[2], &a[3], scale, None)
            }
        };
        let t = tol(dt, 2e-5, 2e-2);
        let x = self.inputs()?;
        check(
            &format!("{} (simt)", self.name),
            dev,
            dt,
            &f,
            &x,
            &[true, true, true, false],
            t,
            t,
        )
    }
}

fn small_cases() -> Vec<Case> {
    vec![
        Case {
            name: "packed gqa, d=8",
            b: 2,
            t: 20,
            s: 20,
            nh: 4,
            nkv: 2,
            d: 8,
            seg: vec![docs(&[9, 11]), vec![3; 20]],
        },
        Case {
            name: "T=5 S=13 (offset)",
            b: 2,
            t: 5,
            s: 13,
            nh: 4,
            nkv: 2,
            d: 8,
            seg: vec![docs(&[6, 7]), docs(&[10, 3])],
        },
        Case {
            name: "decode T=1",
            b: 2,
            t: 1,
            s: 9,
            nh: 4,
            nkv: 2,
            d: 8,
            seg: vec![docs(&[4, 5]), vec![0; 9]],
        },
        Case {
            name: "reused segment id",
            b: 1,
            t: 40,
            s: 40,
            nh: 2,
            nkv: 1,
            d: 16,
            seg: vec![[vec![0; 10], vec![1; 10], vec![0; 20]].concat()],
        },
    ]
}

/// Shapes that take the tensor-core path in bf16 (D = 64 and 128) and span several tiles.
fn tile_cases() -> Vec<Case> {
    let mut v = Vec::new();
    for d in [64, 128] {
        v.push(Case {
            name: if d == 64 { "tiles d=64" } else { "tiles d=128" },
            b: 2,
            t: 150,
            s: 150,
            nh: 4,
            nkv: 2,
            d,
            seg: vec![docs(&[40, 70, 40]), vec![0; 150]],
        });
    }
    v.push(Case {
        name: "tiles d=64 T=70 S=200 (offset)",
        b: 1,
        t: 70,
        s: 200,
        nh: 2,
        nkv: 2,
        d: 64,
        seg: vec![docs(&[120, 80])],
    });
    v.push(Case {
        name: "tiles d=64 reused id",
        b: 1,
        t: 130,
        s: 130,
        nh: 2,
        nkv: 1,
        d: 64,
        seg: vec![[vec![5; 50], vec![6; 30], vec![5; 50]].concat()],
    });
    v
}

#[test]
fn attention_simt_matches_cpu() -> Result<()> {
    let dev = gpu_or_skip!("attention_simt_matches_cpu");
    for case in small_cases().iter().chain(tile_cases().iter()) {
        for dt in DTYPES {
            case.check_simt(&dev, dt)?;
        }
    }
    Ok(())
}

#[test]
fn attention_matches_cpu() -> Result<()> {
    let dev = gpu_or_skip!("attention_matches_cpu");
    for case in small_cases().iter().chain(tile_cases().iter()) {
        for dt in DTYPES {
            case.check(&dev, dt)?;
        }
    }
    Ok(())
}

#[test]
fn attention_tensor_cores_match_simt() -> Result<()> {
    let dev = gpu_or_skip!("attention_tensor_cores_match_simt");
    for case in tile_cases() {
        let scale = 1.0 / (case.d as f64).sqrt();
        let x: Vec<Tensor> = case
            .inputs()?
            .into_iter()
            .map(|t| {
                if !t.dtype().is_float() {
                    return Ok(t.to_device(&dev)?);
                }
                // Tracked, so that a `flash-attn` build runs whet's kernel, not FlashAttention.
                let t = t.to_dtype(DType::BF16)?.to_device(&dev)?;
                Ok(Var::from_tensor(&t)?.as_tensor().clone())
            })
            .collect::<Result<_>>()?;
        let mma = attention(&x[0], &x[1], &x[2], &x[3], scale, None)?;
        let simt = attention_simt(&x[0], &x[1], &x[2], &x[3], scale)?;
        assert_rel(&format!("{}: mma vs simt", case.name), &mma, &simt, 2e-2)?;
    }
    Ok(())
}

/// With `flash-attn`, untracked bf16 attention runs candle-flash-attn where it can express the
/// mask: one document per row (with and without a KV cache) and packed rows (varlen). Each
/// against whet's SIMT kernel.
#[cfg(feature = "flash-attn")]
#[test]
fn flash_attention_matches_the_simt_kernel() -> Result<()> {
    let dev = gpu_or_skip!("flash_attention_matches_the_simt_kernel");
    struct Case {
        name: &'static str,
        /// B, T, S, NH, NKV, D
        dims: [usize; 6],
        /// The segment of key j in row r.
        seg: fn(usize, usize) -> u32,
    }
    let one = |_: usize, _: usize| 0u32;
    let packed = |r: usize, j: usize| u32::from(r == 1 && j >= 45) + u32::from(j >= 90);
    let cases = [
        Case {
            name: "one document, d64",
            dims: [2, 128, 128, 8, 2, 64],
            seg: one,
        },
        Case {
            name: "decode with a cache, d128",
            dims: [2, 1, 77, 8, 8, 128],
            seg: one,
        },
        Case {
            name: "prefill after a cache, d64",
            dims: [2, 19, 77, 4, 2, 64],
            seg: one,
        },
        Case {
            name: "packed rows (varlen), d64",
            dims: [2, 128, 128, 4, 1, 64],
            seg: packed,
        },
    ];
    for Case { name, dims, seg } in cases {
        let [b, t, s, nh, nkv, d] = dims;
        let q = rand(&[b, t, nh, d], 1, DType::F32)?;
        let k = rand(&[b, s, nkv, d], 2, DType::F32)?;
        let v = rand(&[b, s, nkv, d], 3, DType::F32)?;
        let segs: Vec<u32> = (0..b * s).map(|i| seg(i / s, i % s)).collect();
        let on = |x: &Tensor| -> Result<Tensor> { Ok(x.to_dtype(DType::BF16)?.to_device(&dev)?) };
        let (q, k, v) = (on(&q)?, on(&k)?, on(&v)?);
        let segs = Tensor::from_vec(segs, (b, s), &dev)?;
        let scale = 1.0 / (d as f64).sqrt();
        let flash = attention(&q, &k, &v, &segs, scale, None)?;
        let simt = attention_simt(&q, &k, &v, &segs, scale)?;
        assert_rel(&format!("{name}: flash vs simt"), &flash, &simt, 2e-2)?;
    }
    Ok(())
}

fn targets(n: usize, v: usize, ignore_every: usize) -> Result<Tensor> {
    let t: Vec<i64> = (0..n)
        .map(|i| {
            if ignore_every > 0 && i % ignore_every == 1 {
                IGNORE_INDEX
            } else {
                ((i * 7919) % v) as i64
            }
        })
        .collect();
    Ok(Tensor::from_vec(t, n, &Device::Cpu)?)
}

#[test]
fn cross_entropy_matches_cpu() -> Result<()> {
    let dev = gpu_or_skip!("cross_entropy_matches_cpu");
    let f = |a: &[Tensor]| cross_entropy_sum(&a[0], &a[1]);
    for v in [1000, 999] {
        let logits = (rand(&[37, v], 21, DType::F32)? * 5.0)?;
        let t = targets(37, v, 4)?;
        for dt in DTYPES {
            let tl = tol(dt, 2e-5, 1e-2);
            check(
                &format!("cross_entropy V={v}"),
                &dev,
                dt,
                &f,
                &[logits.clone(), t.clone()],
                &[true, false],
                tl,
                tl,
            )?;
        }
    }
    Ok(())
}

#[test]
fn linear_cross_entropy_matches_cpu() -> Result<()> {
    let dev = gpu_or_skip!("linear_cross_entropy_matches_cpu");
    let (n, h, v) = (50, 64, 1000);
    let hs = rand(&[n, h], 31, DType::F32)?;
    let w = (rand(&[v, h], 32, DType::F32)? * 0.3)?;
    let wt = (rand(&[h, v], 33, DType::F32)? * 0.3)?;
    for (ignore, chunk) in [(0, 16), (5, 16), (5, 1024)] {
        let t = targets(n, v, ignore)?;
        let f = move |a: &[Tensor]| linear_cross_entropy_sum(&a[0], &a[1], &a[2], chunk);
        // w as a transposed view: a (H, V) tensor seen as (V, H).
        let ft = move |a: &[Tensor]| linear_cross_entropy_sum(&a[0], &a[1].t()?, &a[2], chunk);
        for dt in DTYPES {
            let tl = tol(dt, 2e-3, 3e-2);
            let what = format!("linear_cross_entropy ignore={ignore} chunk={chunk}");
            check(
                &what,
                &dev,
                dt,
                &f,
                &[hs.clone(), w.clone(), t.clone()],
                &[true, true, false],
                tl,
                tl,
            )?;
            check(
                &format!("{what}, w frozen"),
                &dev,
                dt,
                &f,
                &[hs.clone(), w.clone(), t.clone()],
                &[true, false, false],
                tl,
                tl,
            )?;
            check(
                &format!("{what}, w transposed"),
                &dev,
                dt,
                &ft,
                &[hs.clone(), wt.clone(), t.clone()],
                &[true, true, false],
                tl,
                tl,
            )?;
        }
    }
    Ok(())
}

#[test]
fn linear_matches_cpu() -> Result<()> {
    let dev = gpu_or_skip!("linear_matches_cpu");
    let x = rand(&[3, 5, 64], 41, DType::F32)?;
    let w = rand(&[96, 64], 42, DType::F32)?;
    let wt = rand(&[64, 96], 43, DType::F32)?;
    let b = rand(&[96], 44, DType::F32)?;
    let plain = |a: &[Tensor]| linear(&a[0], &a[1], None);
    let bias = |a: &[Tensor]| linear(&a[0], &a[1], Some(&a[2]));
    let trans = |a: &[Tensor]| linear(&a[0], &a[1].t()?, None);
    for dt in DTYPES {
        let tl = tol(dt, 2e-3, 1e-2);
        check(
            "linear",
            &dev,
            dt,
            &plain,
            &[x.clone(), w.clone()],
            &[true, true],
            tl,
            tl,
        )?;
        check(
            "linear, w frozen",
            &dev,
            dt,
            &plain,
            &[x.clone(), w.clone()],
            &[true, false],
            tl,
            tl,
        )?;
        check(
            "linear + bias",
            &dev,
            dt,
            &bias,
            &[x.clone(), w.clone(), b.clone()],
            &[true, true, true],
            tl,
            tl,
        )?;
        check(
            "linear, w transposed",
            &dev,
            dt,
            &trans,
            &[x.clone(), wt.clone()],
            &[true, true],
            tl,
            tl,
        )?;
    }
    Ok(())
}
