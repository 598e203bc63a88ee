//! CUDA versions of the ops (feature `cuda`): `.cu` sources in `kernels/`, compiled at run time
//! by NVRTC for the device's compute capability (once per process and source), loaded into
//! candle's device as custom modules and launched on candle's stream, so they order with
//! candle's own kernels and cuBLAS calls without any synchronisation.
//!
//! One file per op, called from `cuda_fwd` and `bwd` in [`crate::ops`]. Kernels take raw device
//! addresses (u64) of contiguous data; everything is f32 or bf16 with f32 arithmetic.
//!
//! Invariant: no cudarc or candle CUDA type leaves this module through the crate's public API.

pub(crate) mod adamw;
pub(crate) mod attention;
pub(crate) mod cross_entropy;
pub(crate) mod dropout;
pub(crate) mod linear;
pub(crate) mod rms_norm;
pub(crate) mod rope;
pub(crate) mod swiglu;

use std::collections::HashMap;
use std::sync::{Mutex, OnceLock};

use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc;
use candle_core::cuda_backend::cudarc::driver::CudaFunction;
use candle_core::cuda_backend::cudarc::driver::{CudaSlice, DevicePtr, DeviceRepr};
use candle_core::cuda_backend::{CudaDType, CudaStorageSlice, WrapErr};
use candle_core::op::BackpropOp;
use candle_core::{CudaDevice, CudaStorage, DType, Layout, Result, Shape, Storage, Tensor, bail};

/// A `.cu` source of `kernels/`, compiled with `common.cuh` in front.
pub(crate) struct Src {
    pub name: &'static str,
    pub code: &'static str,
}

const COMMON: &str = include_str!("kernels/common.cuh");

pub(crate) const ADAMW: Src = Src {
    name: "adamw",
    code: include_str!("kernels/adamw.cu"),
};
pub(crate) const ATTENTION: Src = Src {
    name: "attention",
    code: include_str!("kernels/attention.cu"),
};
pub(crate) const CROSS_ENTROPY: Src = Src {
    name: "cross_entropy",
    code: include_str!("kernels/cross_entropy.cu"),
};
pub(crate) const DROPOUT: Src = Src {
    name: "dropout",
    code: include_str!("kernels/dropout.cu"),
};
pub(crate) const RMS_NORM: Src = Src {
    name: "rms_norm",
    code: include_str!("kernels/rms_norm.cu"),
};
pub(crate) const ROPE: Src = Src {
    name: "rope",
    code: include_str!("kernels/rope.cu"),
};
pub(crate) const SWIGLU: Src = Src {
    name: "swiglu",
    code: include_str!("kernels/swiglu.cu"),
};

pub(crate) const ALL: [&Src; 7] = [
    &ADAMW,
    &ATTENTION,
    &CROSS_ENTROPY,
    &DROPOUT,
    &RMS_NORM,
    &ROPE,
    &SWIGLU,
];

fn msg(s: String) -> candle_core::Error {
    candle_core::Error::Msg(s)
}

/// The PTX of `src` for `compute_<arch>`, compiled by NVRTC on first use.
pub(crate) fn ptx(src: &Src, arch: u32) -> Result<&'static str> {
    type Cache = Mutex<HashMap<(&'static str, u32), &'static str>>;
    static CACHE: OnceLock<Cache> = OnceLock::new();
    let cache = CACHE.get_or_init(Default::default);
    if let Some(p) = cache
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .get(&(src.name, arch))
    {
        return Ok(p);
    }
    let code = format!("{COMMON}\n{}", src.code);
    let opts = cudarc::nvrtc::CompileOptions {
        options: vec![
            format!("--gpu-architecture=compute_{arch}"),
            "--std=c++17".into(),
        ],
        name: Some(format!("{}.cu", src.name)),
        ..Default::default()
    };
    let ptx = cudarc::nvrtc::compile_ptx_with_opts(code, opts).map_err(|e| {
        let detail = match &e {
            cudarc::nvrtc::CompileError::CompileError { log, .. } => {
                log.to_string_lossy().into_owned()
            }
            other => format!("{other:?}"),
        };
        msg(format!(
            "whet-kernels: NVRTC could not compile {}.cu for compute_{arch}: {detail}",
            src.name
        ))
    })?;
    // A handful of sources per process: leaking them gives the `&'static str` that every
    // later lookup returns.
    let text: &'static str = Box::leak(ptx.to_src().into_boxed_str());
    cache
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .insert((src.name, arch), text);
    Ok(text)
}

/// Compute capability of `dev` as `10 * major + minor` (90 on an H100).
pub(crate) fn compute_cap(dev: &CudaDevice) -> Result<u32> {
    use cudarc::driver::sys::CUdevice_attribute as A;
    let stream = dev.cuda_stream();
    let ctx = stream.context();
    let major = ctx
        .attribute(A::CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR)
        .w()?;
    let minor = ctx
        .attribute(A::CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR)
        .w()?;
    Ok((10 * major + minor) as u32)
}

/// Number of streaming multiprocessors of `dev`.
pub(crate) fn sm_count(dev: &CudaDevice) -> Result<u32> {
    use cudarc::driver::sys::CUdevice_attribute as A;
    let stream = dev.cuda_stream();
    Ok(stream
        .context()
        .attribute(A::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT)
        .w()? as u32)
}

/// Kernel `name` of `src`, loaded into `dev` (compiled and loaded once per process).
pub(crate) fn func(dev: &CudaDevice, src: &Src, name: &str) -> Result<CudaFunction> {
    let arch = compute_cap(dev)?;
    let ptx = ptx(src, arch)?;
    Ok(dev
        .get_or_load_custom_func(name, &format!("whet_{}_{arch}", src.name), ptx)?
        .into_cuda_function())
}

/// Launches kernel `$f` (a `CudaFunction`) with `$cfg` on `$dev`'s stream; each argument is a
/// value (`u64` address, `i32`, `i64`, `f32`) passed by reference to the launch.
macro_rules! launch {
    ($dev:expr, $f:expr, $cfg:expr, $($arg:expr),* $(,)?) => {{
        use candle_core::cuda_backend::WrapErr as _;
        use candle_core::cuda_backend::cudarc::driver::PushKernelArg as _;
        let stream = $dev.cuda_stream();
        let f = $f;
        let mut b = stream.launch_builder(&f);
        $( let a = $arg; b.arg(&a); )*
        // SAFETY: the arguments match the kernel's parameters (see its .cu source) and every
        // address points into a live buffer of the size the kernel reads or writes.
        unsafe { b.launch($cfg) }.w().map(|_| ())
    }};
}
pub(crate) use launch;

/// Allows `bytes` of dynamic shared memory for `f` (needed above 48 KiB).
pub(crate) fn allow_shared(f: &CudaFunction, bytes: u32) -> Result<()> {
    use cudarc::driver::sys::CUfunction_attribute as F;
    if bytes > 48 * 1024 {
        f.set_attribute(
            F::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
            bytes as i32,
        )
        .w()?;
    }
    Ok(())
}

/// The kernel-name suffix of a dtype.
pub(crate) fn suffix(op: &'static str, dt: DType) -> Result<&'static str> {
    match dt {
        DType::F32 => Ok("f32"),
        DType::BF16 => Ok("bf16"),
        dt => Err(candle_core::Error::UnsupportedDTypeForOp(dt, op).bt()),
    }
}

/// Elements per 16-byte vector (the `VEC<T>::N` of `common.cuh`).
pub(crate) fn vec_width(dt: DType) -> usize {
    16 / dt.size_in_bytes()
}

/// Whether every address is 16-byte aligned.
pub(crate) fn aligned16(ptrs: &[u64]) -> bool {
    ptrs.iter().all(|p| p % 16 == 0)
}

/// Device address of the slice's first element. Every whet kernel and every candle op runs on
/// the device's one stream, so the address stays valid (and ordered) for launches that follow.
fn slice_ptr<T>(s: &CudaSlice<T>) -> u64 {
    let stream = s.stream().clone();
    let (p, _sync) = s.device_ptr(&stream);
    p
}

/// Device address of element `offset` of a CUDA storage.
pub(crate) fn ptr_at(s: &CudaStorage, offset: usize) -> Result<u64> {
    let (base, size) = match &s.slice {
        CudaStorageSlice::F32(x) => (slice_ptr(x), 4),
        CudaStorageSlice::BF16(x) => (slice_ptr(x), 2),
        CudaStorageSlice::F16(x) => (slice_ptr(x), 2),
        CudaStorageSlice::F64(x) => (slice_ptr(x), 8),
        CudaStorageSlice::U32(x) => (slice_ptr(x), 4),
        CudaStorageSlice::I64(x) => (slice_ptr(x), 8),
        CudaStorageSlice::U8(x) => (slice_ptr(x), 1),
        _ => bail!(
            "whet-kernels: unsupported CUDA storage dtype {:?}",
            s.dtype()
        ),
    };
    Ok(base + (offset * size) as u64)
}

/// Device address of a contiguous layout over `s`; an error names `op` otherwise.
pub(crate) fn ptr(s: &CudaStorage, l: &Layout, op: &str) -> Result<u64> {
    match l.contiguous_offsets() {
        Some((start, _)) => ptr_at(s, start),
        None => bail!(
            "{op}: expected a contiguous input, got shape {:?} strides {:?}",
            l.dims(),
            l.stride()
        ),
    }
}

/// Device address of a contiguous CUDA tensor.
pub(crate) fn tptr(t: &Tensor, op: &str) -> Result<u64> {
    let (s, l) = t.storage_and_layout();
    match &*s {
        Storage::Cuda(cs) => ptr(cs, l, op),
        _ => bail!("{op}: expected a CUDA tensor, got one on {:?}", t.device()),
    }
}

/// Runs `f` on the CUDA storage of `t` (with its layout).
pub(crate) fn with_storage<R>(
    t: &Tensor,
    op: &str,
    f: impl FnOnce(&CudaStorage, &Layout) -> Result<R>,
) -> Result<R> {
    let (s, l) = t.storage_and_layout();
    match &*s {
        Storage::Cuda(cs) => f(cs, l),
        _ => bail!("{op}: expected a CUDA tensor, got one on {:?}", t.device()),
    }
}

/// Runs `f` on the CUDA storages of `ts` (with their layouts), in order.
pub(crate) fn with_storages<R, const N: usize>(
    ts: [&Tensor; N],
    op: &str,
    f: impl FnOnce([(&CudaStorage, &Layout); N]) -> Result<R>,
) -> Result<R> {
    let guards = ts.map(|t| t.storage_and_layout());
    let mut parts = Vec::with_capacity(N);
    for ((s, l), t) in guards.iter().zip(ts) {
        match &**s {
            Storage::Cuda(cs) => parts.push((cs, *l)),
            _ => bail!("{op}: expected a CUDA tensor, got one on {:?}", t.device()),
        }
    }
    f(parts
        .try_into()
        .unwrap_or_else(|_| unreachable!("one storage per tensor")))
}

/// A fresh (uninitialised when `zero` is false) buffer of `n` elements of `dt`, as a storage,
/// and its address.
pub(crate) fn alloc(
    dev: &CudaDevice,
    dt: DType,
    n: usize,
    zero: bool,
) -> Result<(CudaStorage, u64)> {
    fn make<T: DeviceRepr + CudaDType + cudarc::driver::ValidAsZeroBits>(
        dev: &CudaDevice,
        n: usize,
        zero: bool,
    ) -> Result<(CudaStorage, u64)> {
        // At least one element, so that every buffer has an address to pass.
        let n = n.max(1);
        let s: CudaSlice<T> = if zero {
            dev.alloc_zeros::<T>(n)?
        } else {
            // SAFETY: callers write every element before anything reads it.
            unsafe { dev.alloc::<T>(n)? }
        };
        let p = slice_ptr(&s);
        Ok((CudaStorage::wrap_cuda_slice(s, dev.clone()), p))
    }
    match dt {
        DType::F32 => make::<f32>(dev, n, zero),
        DType::BF16 => make::<half::bf16>(dev, n, zero),
        DType::U32 => make::<u32>(dev, n, zero),
        DType::I64 => make::<i64>(dev, n, zero),
        dt => Err(candle_core::Error::UnsupportedDTypeForOp(dt, "whet-cuda-alloc").bt()),
    }
}

/// A tensor (no gradient history) over a storage with a contiguous `shape`.
pub(crate) fn tensor(s: CudaStorage, shape: impl Into<Shape>) -> Tensor {
    Tensor::from_storage(Storage::Cuda(s), shape, BackpropOp::none(), false)
}

/// A tensor on `dev` holding `data`.
pub(crate) fn upload<T: candle_core::WithDType>(dev: &CudaDevice, data: Vec<T>) -> Result<Tensor> {
    let n = data.len();
    Tensor::from_vec(data, n, &candle_core::Device::Cuda(dev.clone()))
}

/// Launch shape: `n` threads in blocks of `block`.
pub(crate) fn grid_1d(n: usize, block: u32) -> cudarc::driver::LaunchConfig {
    cudarc::driver::LaunchConfig {
        grid_dim: ((n as u64).div_ceil(block as u64).max(1) as u32, 1, 1),
        block_dim: (block, 1, 1),
        shared_mem_bytes: 0,
    }
}

/// Threads per block for a row of `h` elements handled `vec` at a time: a multiple of 32
/// between 32 and `max`.
pub(crate) fn row_block(h: usize, vec: usize, max: u32) -> u32 {
    let want = h.div_ceil(vec).div_ceil(32) * 32;
    (want as u32).clamp(32, max)
}

/// Compiles every kernel source for `compute_<arch>` with NVRTC (no device needed) and returns
/// each source's PTX size in bytes.
pub fn nvrtc_check(arch: u32) -> Result<Vec<(&'static str, usize)>> {
    ALL.iter()
        .map(|src| ptx(src, arch).map(|p| (src.name, p.len())))
        .collect()
}

/// (free, total) bytes of a CUDA device's memory, as the driver reports them now (freed
/// buffers that candle's stream-ordered pool keeps count as used).
pub fn cuda_memory_info(device: &candle_core::Device) -> Result<(usize, usize)> {
    let dev = device.as_cuda_device()?;
    dev.cuda_stream().context().mem_get_info().w()
}
