//! Differentiable fused ops for whet's training path.
//!
//! candle's own `softmax_last_dim`, `rms_norm`, `rope*`, `sdpa` and `QMatMul` have no backward:
//! they silently cut the gradient. Every op here has one, and every op exists twice:
//! - [`reference`]: the op composed from candle primitives, differentiated by candle's autograd.
//!   Slow and memory hungry, but obviously right; the tests compare against it.
//! - the public functions at the crate root: the fast version used by the model, candle custom
//!   ops (`src/ops.rs`) over CPU kernels (`src/cpu/`, one file per op). They run on CPU tensors
//!   in f32 (and f64, which the finite-difference tests use); any other dtype or device is a
//!   candle error. Their backward computes a gradient only for arguments that track one.
//! - with the `cuda` feature, the same ops on CUDA tensors in f32 and bf16 (`src/cuda/`: `.cu`
//!   sources compiled at run time by NVRTC, launched on candle's stream), plus the fused
//!   multi-tensor `MultiTensorAdamW`. No cudarc type appears in this crate's public API.
//! - [`Kernels`]: which of the two runs, op by op (the [`Ops`] trait), chosen by the caller;
//!   [`self_check`] compares the fused ops with the reference on a device and gives the set to
//!   use there (a fused op that disagrees runs its reference).
//!
//! Shapes follow the llm.c habit of a comment per tensor. `B` batch, `T` tokens (queries),
//! `S` keys, `H` hidden, `NH` query heads, `NKV` key/value heads, `D` head dim, `V` vocabulary.
//!
//! Invariant: nothing in this crate knows about models, configs or files.

mod checkpoint;
mod cpu;
#[cfg(feature = "cuda")]
mod cuda;
mod dropout;
// Its host-side planning is tested everywhere; only `flash-attn` builds call it.
#[cfg_attr(not(feature = "flash-attn"), allow(dead_code))]
mod flash;
mod kernels;
mod ops;
mod quantized;
pub mod reference;
mod self_check;

pub use checkpoint::{Segment, SideGrads, checkpoint};
pub use dropout::dropout_mask;
pub use kernels::{Kernels, Op, Ops};
pub use quantized::quantized_linear;
pub use self_check::{OpCheck, SelfCheck, self_check, self_check_ops};

#[cfg(feature = "cuda")]
pub use cuda::adamw::{AdamWHyper, MultiTensorAdamW};
#[cfg(feature = "cuda")]
pub use cuda::{cuda_memory_info, nvrtc_check};

use std::sync::{Arc, Mutex};

use candle_core::{DType, Result, Tensor, bail};

/// Label value that marks a position as "not supervised" (the Hugging Face convention).
pub const IGNORE_INDEX: i64 = -100;

/// RMSNorm over the last dim: `x / sqrt(mean(x^2) + eps) * weight`.
/// x: (.., H), weight: (H) -> (.., H)
pub fn rms_norm(x: &Tensor, weight: &Tensor, eps: f64) -> Result<Tensor> {
    let h = x.dim(candle_core::D::Minus1)?;
    if weight.dims() != [h] {
        bail!(
            "rms_norm: weight {:?} is not (H) = ({h}) for x {:?}",
            weight.dims(),
            x.dims()
        )
    }
    x.contiguous()?
        .apply_op2(&weight.contiguous()?, ops::RmsNorm { eps })
}

/// Rotary embedding, Hugging Face `rotate_half` convention (first half / second half pairs).
/// x: (B, T, NH, D), cos and sin: (B, T, D/2) -> (B, T, NH, D). cos/sin get no gradient.
pub fn rope(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    let (b, t, _, d) = x.dims4()?;
    if d % 2 != 0 || cos.dims() != [b, t, d / 2] || sin.dims() != [b, t, d / 2] {
        bail!(
            "rope: x {:?} needs an even D and cos/sin (B, T, D/2), got {:?} and {:?}",
            x.dims(),
            cos.dims(),
            sin.dims()
        )
    }
    // The kernel takes any strides on (B, T, NH) but needs D contiguous.
    let x = if x.stride()[3] == 1 {
        x.clone()
    } else {
        x.contiguous()?
    };
    x.apply_op3(&cos.contiguous()?, &sin.contiguous()?, ops::Rope)
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
///
/// With the `flash-attn` feature, CUDA bf16/f16 attention that tracks no gradient (evaluation,
/// generation) runs candle-flash-attn's FlashAttention-2 forward where it can express the mask
/// (`src/flash.rs`).
pub fn attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    segments: &Tensor,
    scale: f64,
) -> Result<Tensor> {
    let (b, s, _, _) = k.dims4()?;
    if segments.dtype() != DType::U32 || segments.dims() != [b, s] {
        bail!(
            "attention: segments must be (B, S) = ({b}, {s}) u32, got {:?} {:?}",
            segments.dims(),
            segments.dtype()
        )
    }
    let seg = segments.flatten_all()?.to_vec1::<u32>()?;
    #[cfg(feature = "flash-attn")]
    if let Some(y) = flash::forward(q, k, v, &seg, scale)? {
        return Ok(y);
    }
    let mask = match q.device() {
        #[cfg(feature = "cuda")]
        dev @ candle_core::Device::Cuda(_) => ops::AttentionMask::Cuda(
            Arc::new(cuda::attention::Masks::new(&seg, b, s, dev)?),
            cuda::attention::Kernel::Auto,
        ),
        _ => ops::AttentionMask::Cpu(Arc::new(cpu::attention::Windows::new(&seg, b, s))),
    };
    let op = ops::Attention {
        scale,
        mask,
        lse: Mutex::new(None),
    };
    q.contiguous()?
        .apply_op3(&k.contiguous()?, &v.contiguous()?, op)
}

/// [`attention`] on CUDA through the SIMT kernels only (no tensor cores): the tests compare the
/// tensor-core kernels with these. q, k, v on a CUDA device.
#[cfg(feature = "cuda")]
#[doc(hidden)]
pub fn attention_simt(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    segments: &Tensor,
    scale: f64,
) -> Result<Tensor> {
    let (b, s, _, _) = k.dims4()?;
    let seg = segments.flatten_all()?.to_vec1::<u32>()?;
    let op = ops::Attention {
        scale,
        mask: ops::AttentionMask::Cuda(
            Arc::new(cuda::attention::Masks::new(&seg, b, s, q.device())?),
            cuda::attention::Kernel::Simt,
        ),
        lse: Mutex::new(None),
    };
    q.contiguous()?
        .apply_op3(&k.contiguous()?, &v.contiguous()?, op)
}

/// SwiGLU activation: `silu(gate) * up`. gate, up: (.., I) -> (.., I)
pub fn swiglu(gate: &Tensor, up: &Tensor) -> Result<Tensor> {
    gate.contiguous()?.apply_op2(&up.contiguous()?, ops::Swiglu)
}

/// `x @ w^T + bias`. x: (.., IN), w: (OUT, IN), bias: (OUT) -> (.., OUT).
/// Unlike candle's matmul, the backward computes a gradient only for arguments that need one:
/// a frozen base weight gets neither a gradient buffer nor the matmul that would fill it.
pub fn linear(x: &Tensor, w: &Tensor, bias: Option<&Tensor>) -> Result<Tensor> {
    // w may keep its strides (e.g. a transposed view): the gemm reads them directly.
    let x = x.contiguous()?;
    if x.device().is_cuda() {
        // cuBLAS for x @ w^T; the bias through candle (its gradient is a cheap sum).
        let y = x.apply_op2(w, ops::Linear)?;
        return match bias {
            Some(b) => y.broadcast_add(b),
            None => Ok(y),
        };
    }
    match bias {
        Some(b) => x.apply_op3(w, &b.contiguous()?, ops::LinearBias),
        None => x.apply_op2(w, ops::Linear),
    }
}

/// A LoRA linear: `x @ w^T [+ bias] + scale * ((x * mask) @ a^T) @ b^T` (PEFT's
/// `result + lora_B(lora_A(dropout(x))) * scaling`). x: (.., IN), w: (OUT, IN) frozen,
/// bias: (OUT) frozen, a: (R, IN), b: (OUT, R), mask: x's shape (the inverted-dropout mask, or
/// none) -> (.., OUT). Gradients flow to x, a and b.
///
/// On the CPU this is one op with its own backward, where the composed version is five graph
/// nodes; each node costs candle's backward a zero-filled gradient buffer and an add of the
/// size of its output, which on a SmolLM2 step ran single-threaded for a fifth of the wall time.
/// Elsewhere, or when w or the bias track a gradient, it is the composed version.
pub fn lora_linear(
    x: &Tensor,
    w: &Tensor,
    bias: Option<&Tensor>,
    (a, b): (&Tensor, &Tensor),
    scale: f64,
    mask: Option<&Tensor>,
) -> Result<Tensor> {
    let frozen = !w.track_op() && bias.is_none_or(|b| !b.track_op());
    if !x.device().is_cpu() || !frozen || !matches!(x.dtype(), DType::F32 | DType::F64) {
        let y = linear(x, w, bias)?;
        let x_in = match mask {
            Some(m) => (x * m)?,
            None => x.clone(),
        };
        let up = linear(&linear(&x_in, a, None)?, b, None)?;
        return y + (up * scale)?;
    }
    if let Some(m) = mask
        && m.dims() != x.dims()
    {
        bail!(
            "lora_linear: mask {:?} is not x's shape {:?}",
            m.dims(),
            x.dims()
        )
    }
    let op = ops::LoraLinear {
        w: w.clone(),
        bias: bias.cloned(),
        mask: mask.map(|m| m.detach()),
        scale,
        down: Mutex::new(None),
    };
    x.contiguous()?.apply_op3(a, b, op)
}

/// Sum over supervised rows of `-log softmax(logits)[target]`; rows whose target is
/// [`IGNORE_INDEX`] contribute nothing. logits: (N, V) f32, targets: (N) i64 -> scalar f32.
/// On CUDA the logits may be bf16; the sum is f32 there whatever their dtype.
pub fn cross_entropy_sum(logits: &Tensor, targets: &Tensor) -> Result<Tensor> {
    logits.contiguous()?.apply_op2(
        &targets.contiguous()?,
        ops::CrossEntropy {
            lse: Mutex::new(None),
        },
    )
}

/// LM head fused with [`cross_entropy_sum`]: `cross_entropy_sum(h @ w^T, targets)` computed
/// `chunk` rows at a time, so the (N, V) logits never exist at once, forward or backward.
/// h: (N, H), w: (V, H), targets: (N) i64 -> scalar f32.
/// Rows whose target is [`IGNORE_INDEX`] are dropped before the matmuls; `chunk` (at least 1)
/// counts supervised rows. On CUDA, h and w may be bf16 (the chunk's logits are f32, the sum
/// is f32).
pub fn linear_cross_entropy_sum(
    h: &Tensor,
    w: &Tensor,
    targets: &Tensor,
    chunk: usize,
) -> Result<Tensor> {
    lce(h, w, targets, chunk, (false, false))
}

/// [`linear_cross_entropy_sum`] for a loss whose backward will run: on the CPU the forward also
/// computes the gradients of `h` and `w` (those that track one) from the same logits, and the
/// backward only scales them by the upstream gradient. The LM head's logits are then computed
/// once per step instead of twice (the forward's, and the backward's recomputation); the
/// gradients equal the two-pass ones up to float rounding. Memory: dh (N, H), and dw (V, H) when
/// w is trained, held from the forward to the backward.
pub fn linear_cross_entropy_sum_for_training(
    h: &Tensor,
    w: &Tensor,
    targets: &Tensor,
    chunk: usize,
) -> Result<Tensor> {
    lce(h, w, targets, chunk, (h.track_op(), w.track_op()))
}

fn lce(
    h: &Tensor,
    w: &Tensor,
    targets: &Tensor,
    chunk: usize,
    grads_in_forward: (bool, bool),
) -> Result<Tensor> {
    if chunk == 0 {
        bail!("linear_cross_entropy_sum: chunk must be at least 1")
    }
    let op = ops::LinearCrossEntropy {
        chunk,
        lse: Mutex::new(None),
        grads_in_forward,
        grads: Mutex::new(None),
    };
    h.contiguous()?.apply_op3(w, &targets.contiguous()?, op)
}

/// `c (m x n, row-major) = a (m x k) @ b (k x n)` in f32 on the CPU, through the same routine as
/// the ops' matmuls: whet's AVX-512 kernel where the CPU has it and the problem is large, the
/// `gemm` crate otherwise. Element `(r, c)` of an operand is `data[r * strides[0] + c *
/// strides[1]]`, so transposed views cost nothing. For benches and tests; the model calls the ops.
///
/// # Panics
/// When an operand is too short for its shape and strides.
pub fn matmul_f32(
    c: &mut [f32],
    a: (&[f32], [usize; 2]),
    b: (&[f32], [usize; 2]),
    (m, n, k): (usize, usize, usize),
) {
    fn mat<'a>((data, s): (&'a [f32], [usize; 2])) -> cpu::Mat<'a, f32> {
        cpu::Mat {
            data,
            rs: s[0],
            cs: s[1],
        }
    }
    cpu::gemm(c, false, mat(a), mat(b), m, n, k);
}
