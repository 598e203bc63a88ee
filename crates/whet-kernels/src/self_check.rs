//! A self-check of the fused kernels on the user's own device: each op, forward and backward,
//! on small fixed inputs, against its composed reference in f32 on the same device. An op that
//! errors, returns a non-finite value or disagrees beyond the tolerance is reported, and
//! [`SelfCheck::kernels`] runs it as its reference instead.
//!
//! The fused CUDA kernels are compiled by NVRTC for whatever GPU the user has; this check is
//! what stands between a kernel that is wrong on that GPU and a silently wrong fine-tune. It
//! takes well under a second on a GPU; on the CPU (where CI tests the kernels thoroughly) it
//! runs only on request.

use std::fmt;
use std::time::{Duration, Instant};

use candle_core::{DType, Device, Result, Tensor, Var};

use crate::kernels::{Kernels, Op, Ops};
use crate::{IGNORE_INDEX, rope_tables};

/// Tolerance on `max |candidate - reference| / max |reference|` over the output and every
/// gradient, by the candidate's dtype. f32 kernels agree with the reference to ~1e-6; bf16
/// ones round each input and output to 8 bits of mantissa (2^-8 = 0.4%) and sum in f32.
fn tolerance(dtype: DType) -> f64 {
    match dtype {
        DType::F32 | DType::F64 => 1e-3,
        _ => 3e-2,
    }
}

/// The dtypes the fused kernels take on `device`: f32 everywhere, bf16 on CUDA (the CPU
/// kernels are f32 and f64 only).
fn dtypes(device: &Device) -> Vec<DType> {
    if device.is_cuda() {
        vec![DType::F32, DType::BF16]
    } else {
        vec![DType::F32]
    }
}

/// One op, one input case, one dtype.
#[derive(Debug, Clone)]
pub struct OpCheck {
    pub op: Op,
    pub case: &'static str,
    pub dtype: DType,
    /// `max |candidate - reference| / max |reference|` over the output and the gradients.
    pub error: f64,
    pub tolerance: f64,
    /// Why the op failed outright: an error, or a non-finite value.
    pub failure: Option<String>,
}

impl OpCheck {
    pub fn passed(&self) -> bool {
        self.failure.is_none() && self.error <= self.tolerance
    }
}

/// The result of [`self_check`].
#[derive(Debug, Clone)]
pub struct SelfCheck {
    pub device: String,
    pub checks: Vec<OpCheck>,
    pub elapsed: Duration,
}

impl SelfCheck {
    /// The ops with at least one failed check, in [`Op::ALL`] order.
    pub fn failed_ops(&self) -> Vec<Op> {
        Op::ALL
            .into_iter()
            .filter(|op| self.checks.iter().any(|c| c.op == *op && !c.passed()))
            .collect()
    }

    /// The fused set with every failed op on its reference.
    pub fn kernels(&self) -> Kernels {
        self.failed_ops()
            .into_iter()
            .fold(Kernels::FUSED, Kernels::with_reference)
    }
}

impl fmt::Display for SelfCheck {
    /// One line per op: the worst error of its checks against the tolerance, and the verdict.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "kernel self-check on {} ({} checks, {:.2} s): error = max |kernel - reference| / max |reference|",
            self.device,
            self.checks.len(),
            self.elapsed.as_secs_f64()
        )?;
        for op in Op::ALL {
            let mine: Vec<&OpCheck> = self.checks.iter().filter(|c| c.op == op).collect();
            if mine.is_empty() {
                continue;
            }
            write!(f, "  {:<26}", op.name())?;
            for c in &mine {
                match &c.failure {
                    Some(why) => write!(f, " {}/{:?} FAILED ({why})", c.case, c.dtype)?,
                    None => write!(
                        f,
                        " {}/{:?} {:.1e}{}",
                        c.case,
                        c.dtype,
                        c.error,
                        if c.passed() { "" } else { " > tolerance" }
                    )?,
                }
            }
            let ok = mine.iter().all(|c| c.passed());
            writeln!(f, "  {}", if ok { "ok" } else { "-> reference" })?;
        }
        Ok(())
    }
}

/// Checks whet's fused kernels on `device` (see the module docs).
pub fn self_check(device: &Device) -> Result<SelfCheck> {
    self_check_ops(&Kernels::FUSED, device)
}

/// Checks any implementation of the ops against [`Kernels::REFERENCE`] on `device`. An error
/// here means the inputs could not be built (the device itself is unusable); an op's own
/// errors are recorded in its [`OpCheck`].
pub fn self_check_ops(candidate: &dyn Ops, device: &Device) -> Result<SelfCheck> {
    let started = Instant::now();
    let mut checks = Vec::new();
    for dtype in dtypes(device) {
        for case in cases(device)? {
            let (error, failure) = match compare(candidate, &case, dtype) {
                Ok(e) if e.is_finite() => (e, None),
                Ok(_) => (f64::NAN, Some("non-finite values".to_string())),
                Err(e) => (f64::NAN, Some(first_line(&e.to_string()))),
            };
            checks.push(OpCheck {
                op: case.op,
                case: case.name,
                dtype,
                error,
                tolerance: tolerance(dtype),
                failure,
            });
        }
    }
    Ok(SelfCheck {
        device: device_name(device),
        checks,
        elapsed: started.elapsed(),
    })
}

fn device_name(device: &Device) -> String {
    match device.location() {
        candle_core::DeviceLocation::Cpu => "cpu".into(),
        candle_core::DeviceLocation::Cuda { gpu_id } => format!("cuda:{gpu_id}"),
        other => format!("{other:?}"),
    }
}

fn first_line(s: &str) -> String {
    s.lines().next().unwrap_or("").chars().take(160).collect()
}

/// An input of a case: a float tensor (cast to the candidate's dtype; `track` makes it a `Var`)
/// or an index tensor (u32 segments, i64 targets) passed as it is.
struct Input {
    t: Tensor,
    track: bool,
}

type Run = fn(&dyn Ops, &[Tensor]) -> Result<Tensor>;

struct Case {
    op: Op,
    name: &'static str,
    inputs: Vec<Input>,
    run: Run,
    /// Also compare the gradients (a decode step only runs forward).
    backward: bool,
}

/// Deterministic values in [-1, 1] (xorshift).
fn values(n: usize, seed: u64) -> Vec<f32> {
    let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..n)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            ((s >> 11) as f64 / (1u64 << 53) as f64 * 2.0 - 1.0) as f32
        })
        .collect()
}

fn float(dims: &[usize], seed: u64, device: &Device, track: bool) -> Result<Input> {
    let n = dims.iter().product();
    Ok(Input {
        t: Tensor::from_vec(values(n, seed), dims, device)?,
        track,
    })
}

fn index(t: Tensor) -> Input {
    Input { t, track: false }
}

/// The inputs: small, but past each kernel's tile edges (attention's 16-query blocks and
/// 64-key tiles, a partial last block, two documents in a row, grouped heads; the LM head's
/// chunks; ignored targets).
fn cases(dev: &Device) -> Result<Vec<Case>> {
    let targets = |n: usize, v: usize| -> Result<Input> {
        let t: Vec<i64> = (0..n)
            .map(|i| {
                if i % 5 == 3 {
                    IGNORE_INDEX
                } else {
                    ((i * 37 + 11) % v) as i64
                }
            })
            .collect();
        Ok(index(Tensor::from_vec(t, n, dev)?))
    };
    // Row 0 one document; row 1 two (a packed row).
    let segments = |b: usize, s: usize| -> Result<Input> {
        let seg: Vec<u32> = (0..b * s)
            .map(|i| u32::from(i / s == 1 && i % s >= s / 2 - 3))
            .collect();
        Ok(index(Tensor::from_vec(seg, (b, s), dev)?))
    };
    let positions: Vec<u32> = (0..2 * 6).map(|i| (i % 6) as u32 * 7).collect();
    let positions = Tensor::from_vec(positions, (2, 6), dev)?;
    let inv_freq: Vec<f32> = (0..16).map(|i| 10000f32.powf(-(i as f32) / 16.0)).collect();
    let (cos, sin) = rope_tables(&positions, &inv_freq)?;
    let mask: Vec<f32> = values(2 * 5 * 48, 77)
        .into_iter()
        .map(|u| if u < -0.6 { 0.0 } else { 1.0 / 0.8 })
        .collect();
    let mask = Tensor::from_vec(mask, (2, 5, 48), dev)?;

    let attention: Run = |o, t| o.attention(&t[0], &t[1], &t[2], &t[3], 0.125, None);
    let mut cases = vec![
        Case {
            op: Op::RmsNorm,
            name: "2x5x64",
            inputs: vec![
                float(&[2, 5, 64], 1, dev, true)?,
                float(&[64], 2, dev, true)?,
            ],
            run: |o, t| o.rms_norm(&t[0], &t[1], 1e-5),
            backward: true,
        },
        Case {
            op: Op::Rope,
            name: "2x6x4x32",
            inputs: vec![
                float(&[2, 6, 4, 32], 3, dev, true)?,
                Input {
                    t: cos,
                    track: false,
                },
                Input {
                    t: sin,
                    track: false,
                },
            ],
            run: |o, t| o.rope(&t[0], &t[1], &t[2]),
            backward: true,
        },
    ];
    for (name, d) in [("d64", 64), ("d128", 128)] {
        cases.push(Case {
            op: Op::Attention,
            name,
            inputs: vec![
                float(&[2, 40, 4, d], 4, dev, true)?,
                float(&[2, 40, 2, d], 5, dev, true)?,
                float(&[2, 40, 2, d], 6, dev, true)?,
                segments(2, 40)?,
            ],
            run: attention,
            backward: true,
        });
    }
    cases.extend([
        Case {
            op: Op::Attention,
            name: "decode",
            inputs: vec![
                float(&[2, 1, 4, 64], 7, dev, false)?,
                float(&[2, 33, 2, 64], 8, dev, false)?,
                float(&[2, 33, 2, 64], 9, dev, false)?,
                index(Tensor::zeros((2, 33), DType::U32, dev)?),
            ],
            run: attention,
            backward: false,
        },
        Case {
            op: Op::Swiglu,
            name: "2x5x96",
            inputs: vec![
                float(&[2, 5, 96], 10, dev, true)?,
                float(&[2, 5, 96], 11, dev, true)?,
            ],
            run: |o, t| o.swiglu(&t[0], &t[1]),
            backward: true,
        },
        Case {
            op: Op::Geglu,
            name: "2x5x96",
            inputs: vec![
                float(&[2, 5, 96], 10, dev, true)?,
                float(&[2, 5, 96], 11, dev, true)?,
            ],
            run: |o, t| o.geglu(&t[0], &t[1]),
            backward: true,
        },
        Case {
            op: Op::Linear,
            name: "bias",
            inputs: vec![
                float(&[2, 5, 48], 12, dev, true)?,
                float(&[40, 48], 13, dev, true)?,
                float(&[40], 14, dev, true)?,
            ],
            run: |o, t| o.linear(&t[0], &t[1], Some(&t[2])),
            backward: true,
        },
        Case {
            op: Op::LoraLinear,
            name: "dropout",
            inputs: vec![
                float(&[2, 5, 48], 15, dev, true)?,
                float(&[40, 48], 16, dev, false)?,
                float(&[8, 48], 17, dev, true)?,
                float(&[40, 8], 18, dev, true)?,
                Input {
                    t: mask,
                    track: false,
                },
            ],
            run: |o, t| o.lora_linear(&t[0], &t[1], None, (&t[2], &t[3]), 2.0, Some(&t[4])),
            backward: true,
        },
        Case {
            op: Op::CrossEntropy,
            name: "12x100",
            inputs: vec![float(&[12, 100], 19, dev, true)?, targets(12, 100)?],
            run: |o, t| o.cross_entropy_sum(&(&t[0] * 4.0)?, &t[1]),
            backward: true,
        },
    ]);
    for (name, for_training) in [("train", true), ("eval", false)] {
        cases.push(Case {
            op: Op::LinearCrossEntropy,
            name,
            inputs: vec![
                float(&[12, 48], 20, dev, true)?,
                float(&[100, 48], 21, dev, true)?,
                targets(12, 100)?,
            ],
            run: if for_training {
                |o, t| o.linear_cross_entropy_sum(&t[0], &t[1], &t[2], 5, true)
            } else {
                |o, t| o.linear_cross_entropy_sum(&t[0], &t[1], &t[2], 5, false)
            },
            backward: true,
        });
    }
    Ok(cases)
}

/// Runs `ops` on the case's inputs in `dtype`; returns the output and the gradient of
/// `sum(out * r)` (r a fixed weighting) for each tracked input, all in f32.
fn outputs(ops: &dyn Ops, case: &Case, dtype: DType) -> Result<Vec<Tensor>> {
    let mut vars = Vec::new();
    let mut args = Vec::new();
    for input in &case.inputs {
        let t = if input.t.dtype().is_float() {
            input.t.to_dtype(dtype)?
        } else {
            input.t.clone()
        };
        if input.track && case.backward {
            let v = Var::from_tensor(&t)?;
            args.push(v.as_tensor().clone());
            vars.push(v);
        } else {
            args.push(t);
        }
    }
    let out = (case.run)(ops, &args)?.to_dtype(DType::F32)?;
    let mut all = vec![out.clone()];
    if case.backward {
        let r = Tensor::from_vec(values(out.elem_count(), 4242), out.dims(), out.device())?;
        let grads = (&out * r)?.sum_all()?.backward()?;
        for v in &vars {
            let g = grads
                .get(v.as_tensor())
                .ok_or_else(|| candle_core::Error::Msg("an input got no gradient".into()))?;
            all.push(g.to_dtype(DType::F32)?);
        }
    }
    Ok(all)
}

/// The worst relative error of `candidate` in `dtype` against the reference in f32.
fn compare(candidate: &dyn Ops, case: &Case, dtype: DType) -> Result<f64> {
    let got = outputs(candidate, case, dtype)?;
    let want = outputs(&Kernels::REFERENCE, case, DType::F32)?;
    let mut worst = 0f64;
    for (g, w) in got.iter().zip(&want) {
        if g.dims() != w.dims() {
            candle_core::bail!("shape {:?}, reference {:?}", g.dims(), w.dims())
        }
        let g = g.flatten_all()?.to_vec1::<f32>()?;
        let w = w.flatten_all()?.to_vec1::<f32>()?;
        if g.iter().any(|x| !x.is_finite()) {
            return Ok(f64::NAN);
        }
        let scale = w.iter().fold(0f32, |m, x| m.max(x.abs())).max(1e-6) as f64;
        let diff = g
            .iter()
            .zip(&w)
            .fold(0f32, |m, (a, b)| m.max((a - b).abs())) as f64;
        worst = worst.max(diff / scale);
    }
    Ok(worst)
}
