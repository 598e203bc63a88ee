//! The ops of this crate composed from candle primitives that all have a backward.
//! These are the specification: the fast ops are tested against them. They are also the
//! fallback set of [`crate::Kernels`] (`Kernels::REFERENCE`), so they run on any device and
//! dtype candle supports: bf16/f16 logits go through the cross-entropy in f32, as the fused ops.

use candle_core::{D, DType, Result, Tensor};

use crate::IGNORE_INDEX;

/// x: (.., H), weight: (H)
pub fn rms_norm(x: &Tensor, weight: &Tensor, eps: f64) -> Result<Tensor> {
    let mean_sq = x.sqr()?.mean_keepdim(D::Minus1)?; // (.., 1)
    let inv = (mean_sq + eps)?.sqrt()?.recip()?;
    x.broadcast_mul(&inv)?.broadcast_mul(weight)
}

/// x: (B, T, NH, D), cos/sin: (B, T, D/2)
pub fn rope(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    let half = x.dim(D::Minus1)? / 2;
    let cos = cos.to_dtype(x.dtype())?.unsqueeze(2)?; // (B, T, 1, D/2)
    let sin = sin.to_dtype(x.dtype())?.unsqueeze(2)?;
    let x1 = x.narrow(D::Minus1, 0, half)?;
    let x2 = x.narrow(D::Minus1, half, half)?;
    let lo = (x1.broadcast_mul(&cos)? - x2.broadcast_mul(&sin)?)?;
    let hi = (x2.broadcast_mul(&cos)? + x1.broadcast_mul(&sin)?)?;
    Tensor::cat(&[lo, hi], D::Minus1)
}

/// Additive mask (B, 1, T, S): 0 where attention is allowed, -1e30 elsewhere; `window`: only
/// the `window` latest keys (`p - j < window`).
pub fn attention_bias(segments: &Tensor, t: usize, window: Option<usize>) -> Result<Tensor> {
    let (b, s) = segments.dims2()?;
    let seg = segments.to_vec2::<u32>()?;
    let offset = s - t;
    let mut bias = vec![0f32; b * t * s];
    for (bi, row) in seg.iter().enumerate() {
        for i in 0..t {
            let p = i + offset;
            for j in 0..s {
                if j > p || row[j] != row[p] || window.is_some_and(|w| p - j >= w) {
                    bias[(bi * t + i) * s + j] = -1e30;
                }
            }
        }
    }
    Tensor::from_vec(bias, (b, 1, t, s), segments.device())
}

/// Softmax over the last dim, from exp/sum/div (candle's fused softmax has no backward).
pub fn softmax_last_dim(x: &Tensor) -> Result<Tensor> {
    let max = x.max_keepdim(D::Minus1)?.detach();
    let e = x.broadcast_sub(&max)?.exp()?;
    e.broadcast_div(&e.sum_keepdim(D::Minus1)?)
}

/// q: (B, T, NH, D), k/v: (B, S, NKV, D), segments: (B, S) -> (B, T, NH, D)
pub fn attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    segments: &Tensor,
    scale: f64,
    window: Option<usize>,
) -> Result<Tensor> {
    let (b, t, nh, d) = q.dims4()?;
    let (_, s, nkv, _) = k.dims4()?;
    let rep = nh / nkv;
    // (B, S, NKV, D) -> (B, NH, S, D), kv head h/rep serving query head h.
    let expand = |x: &Tensor| -> Result<Tensor> {
        x.transpose(1, 2)?
            .unsqueeze(2)?
            .broadcast_as((b, nkv, rep, s, d))?
            .reshape((b, nh, s, d))
    };
    let q = q.transpose(1, 2)?.contiguous()?; // (B, NH, T, D)
    let k = expand(k)?.contiguous()?; // (B, NH, S, D)
    let v = expand(v)?.contiguous()?;
    let scores = (q.matmul(&k.t()?)? * scale)?; // (B, NH, T, S)
    let bias = attention_bias(segments, t, window)?.to_dtype(scores.dtype())?;
    let scores = scores.broadcast_add(&bias)?;
    let probs = softmax_last_dim(&scores)?;
    probs.matmul(&v)?.transpose(1, 2) // (B, T, NH, D)
}

/// `gelu_tanh(gate) * up` from candle's `gelu` (the tanh approximation), which has a backward.
pub fn geglu(gate: &Tensor, up: &Tensor) -> Result<Tensor> {
    gate.gelu()? * up
}

pub fn swiglu(gate: &Tensor, up: &Tensor) -> Result<Tensor> {
    let sigmoid = (gate.neg()?.exp()? + 1.0)?.recip()?;
    (gate * sigmoid)? * up
}

/// x: (.., IN), w: (OUT, IN), bias: (OUT)
pub fn linear(x: &Tensor, w: &Tensor, bias: Option<&Tensor>) -> Result<Tensor> {
    let y = x.broadcast_matmul(&w.t()?)?;
    match bias {
        Some(b) => y.broadcast_add(b),
        None => Ok(y),
    }
}

/// `x @ w^T [+ bias] + scale * ((x * mask) @ a^T) @ b^T` (PEFT's LoRA forward).
/// x: (.., IN), w: (OUT, IN), bias: (OUT), a: (R, IN), b: (OUT, R), mask: x's shape
pub fn lora_linear(
    x: &Tensor,
    w: &Tensor,
    bias: Option<&Tensor>,
    (a, b): (&Tensor, &Tensor),
    scale: f64,
    mask: Option<&Tensor>,
) -> Result<Tensor> {
    let y = linear(x, w, bias)?;
    let x_in = match mask {
        Some(m) => (x * m)?,
        None => x.clone(),
    };
    let up = linear(&linear(&x_in, a, None)?, b, None)?;
    y + (up * scale)?
}

/// logits: (N, V), targets: (N) i64 -> scalar (f32 for bf16/f16 logits)
pub fn cross_entropy_sum(logits: &Tensor, targets: &Tensor) -> Result<Tensor> {
    let logits = match logits.dtype() {
        DType::BF16 | DType::F16 => &logits.to_dtype(DType::F32)?,
        _ => logits,
    };
    let max = logits.max_keepdim(D::Minus1)?.detach(); // (N, 1)
    let shifted = logits.broadcast_sub(&max)?;
    let lse = shifted.exp()?.sum_keepdim(D::Minus1)?.log()?; // (N, 1)
    let keep = targets.ne(IGNORE_INDEX)?; // (N) u8
    let safe = keep.where_cond(targets, &targets.zeros_like()?)?;
    let picked = shifted.gather(&safe.to_dtype(DType::U32)?.unsqueeze(1)?, 1)?; // (N, 1)
    let nll = (lse - picked)?.squeeze(1)?; // (N)
    (nll * keep.to_dtype(logits.dtype())?)?.sum_all()
}

/// h: (N, H), w: (V, H), targets: (N)
pub fn linear_cross_entropy_sum(h: &Tensor, w: &Tensor, targets: &Tensor) -> Result<Tensor> {
    cross_entropy_sum(&linear(h, w, None)?, targets)
}
