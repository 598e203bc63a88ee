//! The candle custom ops behind the crate's public functions, one file per op: the public
//! function (argument checks, contiguous inputs, `apply_op*`) and the op struct it applies. Each
//! struct implements `cpu_fwd` (dispatching to [`crate::cpu`]), `cuda_fwd` with the `cuda`
//! feature (dispatching to `crate::cuda`), and `bwd`, which picks the CPU or CUDA kernels by the
//! device of its inputs.
//!
//! Arguments arrive contiguous (the public functions make them so) except where a kernel takes
//! strides (`rope`'s x, the weight of `linear` and of the LM head).
//!
//! `bwd` computes only the gradients of arguments that track one (`Tensor::track_op`): a frozen
//! weight gets no gradient and costs nothing.
//!
//! A value the forward computes and the backward needs again (a logsumexp, the LoRA down
//! projection, the LM head's gradients) waits on the op struct in a [`Stash`]: candle keeps the
//! struct in the graph from the forward to the backward.
//!
//! This file holds what the ops share: the stash, dtype checks, and the conversions between the
//! kernels' slices and vectors and candle's storages and tensors.

mod attention;
mod cross_entropy;
mod linear;
mod linear_cross_entropy;
mod lora_linear;
mod quantized_linear;
mod rms_norm;
mod rope;
mod swiglu;

pub use attention::attention;
#[cfg(feature = "cuda")]
pub use attention::attention_simt;
pub use cross_entropy::cross_entropy_sum;
pub use linear::linear;
pub use linear_cross_entropy::{linear_cross_entropy_sum, linear_cross_entropy_sum_for_training};
pub use lora_linear::lora_linear;
pub use quantized_linear::quantized_linear;
pub use rms_norm::rms_norm;
pub use rope::{rope, rope_tables};
pub use swiglu::{geglu, swiglu};

use std::sync::{Mutex, MutexGuard};

use candle_core::{CpuStorage, DType, Device, Layout, Result, Shape, Tensor, WithDType, bail};

use crate::cpu::{self, Float, Host};

/// A value one call on an op struct leaves for a later one: usually the forward's for the
/// backward (in [`crate::checkpoint`], the segment's output for the forward). The forward
/// [`put`](Self::put)s it; the backward either [`get`](Self::get)s a copy (it stays: a second
/// backward reads it again) or [`take`](Self::take)s it (a second backward finds the stash
/// empty). A backward that finds it empty (a second `take`, or no forward on this struct)
/// recomputes the value, so a stash saves work and never changes a result.
pub(crate) struct Stash<T>(Mutex<Option<T>>);

impl<T> Default for Stash<T> {
    fn default() -> Self {
        Self(Mutex::new(None))
    }
}

impl<T> Stash<T> {
    /// A stash that already holds `value`.
    pub(crate) fn holding(value: T) -> Self {
        Self(Mutex::new(Some(value)))
    }

    /// Stores `value`, replacing what was there.
    pub(crate) fn put(&self, value: T) {
        *self.lock() = Some(value);
    }

    /// The value, leaving the stash empty.
    pub(crate) fn take(&self) -> Option<T> {
        self.lock().take()
    }

    fn lock(&self) -> MutexGuard<'_, Option<T>> {
        // A poisoned lock only means another thread panicked mid-store; the value is replaced.
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl<T: Clone> Stash<T> {
    /// A copy of the value, which stays.
    pub(crate) fn get(&self) -> Option<T> {
        self.lock().clone()
    }

    /// A copy of the value, or `recompute()` when the stash is empty (which it leaves empty).
    pub(crate) fn get_or_else(&self, recompute: impl FnOnce() -> Result<T>) -> Result<T> {
        match self.get() {
            Some(value) => Ok(value),
            None => recompute(),
        }
    }
}

/// Errors unless every dtype is the first one: "{op}: dtype mismatch, {first} and {other}".
fn same_dtypes(op: &str, dtypes: &[DType]) -> Result<()> {
    for &other in dtypes.iter().skip(1) {
        if other != dtypes[0] {
            bail!("{op}: dtype mismatch, {:?} and {other:?}", dtypes[0])
        }
    }
    Ok(())
}

/// A kernel's output as a CPU tensor of `shape`.
fn vec_tensor<T: WithDType>(v: Vec<T>, shape: &Shape) -> Result<Tensor> {
    Tensor::from_vec(v, shape.clone(), &Device::Cpu)
}

/// A gradient the kernel may have skipped, as a CPU tensor of `shape`.
fn opt_tensor<T: WithDType>(v: Option<Vec<T>>, shape: &Shape) -> Result<Option<Tensor>> {
    v.map(|v| vec_tensor(v, shape)).transpose()
}

/// A 0-dim CPU storage holding `value` (a summed loss).
fn scalar_storage<T: Float>(value: f64) -> (CpuStorage, Shape) {
    (
        T::to_cpu_storage_owned(vec![T::from_f64(value)]),
        Shape::from(()),
    )
}

/// The scalar value of a 0-dim (or one-element) gradient.
fn scalar<T: Float>(g: &Tensor) -> Result<T> {
    g.flatten_all()?
        .to_dtype(T::DTYPE)?
        .to_vec1::<T>()?
        .first()
        .copied()
        .ok_or_else(|| candle_core::Error::Msg("empty gradient".into()))
}

/// `dims` with the last one replaced by `last`: the output shape of a linear map. Rank >= 1.
fn with_last_dim(dims: &[usize], last: usize) -> Shape {
    let mut out = dims.to_vec();
    *out.last_mut().expect("rank >= 1") = last;
    Shape::from(out)
}

/// A 2-D CPU tensor (any strides) as a matrix view.
fn mat2<'a, T: WithDType>(s: &'a CpuStorage, l: &Layout) -> Result<cpu::Mat<'a, T>> {
    let st = l.stride();
    Ok(cpu::Mat {
        data: &s.as_slice::<T>()?[l.start_offset()..],
        rs: st[0],
        cs: st[1],
    })
}

/// [`Host`] views of contiguous CPU tensors (in `bwd`, which gets tensors), in order.
fn hosts<'a, const N: usize>(ts: [&'a Tensor; N], op: &str) -> Result<[Host<'a>; N]> {
    let hosts = ts
        .into_iter()
        .map(|t| Host::new(t, op))
        .collect::<Result<Vec<_>>>()?;
    Ok(hosts
        .try_into()
        .unwrap_or_else(|_| unreachable!("one host per tensor")))
}
