//! Differentiable fused ops for whet's training path.
//!
//! candle's own `softmax_last_dim`, `rms_norm`, `rope*`, `sdpa` and `QMatMul` have no backward:
//! they silently cut the gradient. Every op here has one, and every op exists twice:
//! - [`reference`]: the op composed from candle primitives, differentiated by candle's autograd.
//!   Slow and memory hungry, but obviously right; the tests compare against it.
//! - the public functions at the crate root: the fast version used by the model, candle custom
//!   ops (`src/ops/`, one file per op: the function and its op) over CPU kernels (`src/cpu/`,
//!   one file per op). They run on CPU tensors in f32 (and f64, which the finite-difference
//!   tests use); any other dtype or device is a candle error. Their backward computes a gradient
//!   only for arguments that track one.
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
//!
//! # Example
//!
//! A fused op and its reference give the same values and the same gradients.
//!
//! ```
//! use candle_core::{Device, Tensor, Var};
//!
//! let dev = Device::Cpu;
//! let x = Var::new(&[[3.0f32, 4.0], [1.0, -1.0]], &dev)?; // (T, H)
//! let w = Tensor::new(&[1.0f32, 2.0], &dev)?; // (H)
//! let fused = whet_kernels::rms_norm(x.as_tensor(), &w, 1e-6)?;
//! let reference = whet_kernels::reference::rms_norm(x.as_tensor(), &w, 1e-6)?;
//! let diff = (&fused - &reference)?.abs()?.max_all()?.to_scalar::<f32>()?;
//! assert!(diff < 1e-6);
//! // Row 0: x / sqrt(mean(x^2)) * w = [3, 4] / sqrt(12.5) * [1, 2].
//! let y = fused.to_vec2::<f32>()?;
//! assert!((y[0][1] - 8.0 / 12.5f32.sqrt()).abs() < 1e-5);
//! let g_fused = fused.sum_all()?.backward()?;
//! let g_ref = reference.sum_all()?.backward()?;
//! let (a, b) = (g_fused.get(x.as_tensor()).unwrap(), g_ref.get(x.as_tensor()).unwrap());
//! assert!((a - b)?.abs()?.max_all()?.to_scalar::<f32>()? < 1e-5);
//! # Ok::<(), candle_core::Error>(())
//! ```

mod checkpoint;
mod cpu;
#[cfg(feature = "cuda")]
mod cuda;
mod dropout;
// Its host-side planning is tested everywhere; only `flash-attn` builds call it.
#[cfg_attr(not(feature = "flash-attn"), allow(dead_code))]
mod flash;
pub mod gemm_profile;
mod kernels;
mod ops;
pub mod reference;
mod self_check;

pub use checkpoint::{Segment, SideGrads, checkpoint};
pub use dropout::dropout_mask;
pub use kernels::{Kernels, Op, Ops};
#[cfg(feature = "cuda")]
pub use ops::attention_simt;
pub use ops::{
    attention, cross_entropy_sum, geglu, linear, linear_cross_entropy_sum,
    linear_cross_entropy_sum_for_training, lora_linear, quantized_linear, rms_norm, rope,
    rope_tables, swiglu,
};
pub use self_check::{OpCheck, SelfCheck, self_check, self_check_ops};

#[cfg(feature = "cuda")]
pub use cuda::adamw::{AdamWHyper, MultiTensorAdamW};
#[cfg(feature = "cuda")]
pub use cuda::{cuda_memory_info, nvrtc_check};

/// Label value that marks a position as "not supervised" (the Hugging Face convention).
pub const IGNORE_INDEX: i64 = -100;

/// The instruction set the CPU kernels run with in this process: `"avx512"`, `"avx2"` or
/// `"scalar"`. The widest the CPU has, unless `WHET_CPU` names a lower one (so one machine can
/// test and bench every path below its own); a path the CPU lacks is refused with a warning on
/// stderr and the CPU's own runs. Read once, at the first kernel call.
pub fn cpu_path() -> &'static str {
    cpu::simd_level().name()
}

/// `c (m x n, row-major) = a (m x k) @ b (k x n)` in f32 on the CPU, through the same routine as
/// the ops' matmuls: whet's AVX-512 or AVX2 kernel (see [`cpu_path`]) where the problem is large,
/// the `gemm` crate otherwise. Element `(r, c)` of an operand is `data[r * strides[0] + c *
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
