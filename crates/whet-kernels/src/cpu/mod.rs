//! CPU kernels: contiguous slices in, vectors out, one file per op. The op structs in
//! [`crate::ops`] call them from `cpu_fwd` and `bwd`. Every kernel is generic over [`Float`]
//! (f32, the training dtype, and f64, which the finite-difference tests use).

pub(crate) mod attention;
pub(crate) mod cross_entropy;
pub(crate) mod linear;
pub(crate) mod linear_cross_entropy;
pub(crate) mod rms_norm;
pub(crate) mod rope;
pub(crate) mod sgemm;
pub(crate) mod swiglu;

use std::ops::Neg;

use candle_core::{CpuStorage, Layout, Result, Storage, StorageRef, Tensor, WithDType, bail};

/// The float types the CPU kernels run on.
pub(crate) trait Float: WithDType + Neg<Output = Self> {
    const ZERO: Self;
    const ONE: Self;
    const NEG_INF: Self;
    fn exp(self) -> Self;
    /// `exp`, with fused multiply-adds when `FMA` (see [`Float::mul_add`]).
    #[inline(always)]
    fn exp_with<const FMA: bool>(self) -> Self {
        self.exp()
    }
    fn ln(self) -> Self;
    fn sqrt(self) -> Self;
    /// `self * a + b` rounded once. One instruction where the caller's target features include
    /// FMA (the `v3` and `v4` builds of [`multiversion!`]); a library call elsewhere, so the
    /// baseline builds keep `*` and `+` (see `multiversion!`'s `FMA` parameter).
    fn mul_add(self, a: Self, b: Self) -> Self;
    /// `max` that ignores NaN handling subtleties and so vectorises (a plain compare + select).
    #[inline(always)]
    fn fmax(self, o: Self) -> Self {
        if o > self { o } else { self }
    }
}

impl Float for f32 {
    const ZERO: Self = 0.0;
    const ONE: Self = 1.0;
    const NEG_INF: Self = f32::NEG_INFINITY;
    #[inline(always)]
    fn exp(self) -> Self {
        exp_f32(self)
    }
    #[inline(always)]
    fn exp_with<const FMA: bool>(self) -> Self {
        exp_f32_with::<FMA>(self)
    }
    #[inline(always)]
    fn ln(self) -> Self {
        f32::ln(self)
    }
    #[inline(always)]
    fn sqrt(self) -> Self {
        f32::sqrt(self)
    }
    #[inline(always)]
    fn mul_add(self, a: Self, b: Self) -> Self {
        f32::mul_add(self, a, b)
    }
}

impl Float for f64 {
    const ZERO: Self = 0.0;
    const ONE: Self = 1.0;
    const NEG_INF: Self = f64::NEG_INFINITY;
    #[inline(always)]
    fn exp(self) -> Self {
        f64::exp(self)
    }
    #[inline(always)]
    fn ln(self) -> Self {
        f64::ln(self)
    }
    #[inline(always)]
    fn sqrt(self) -> Self {
        f64::sqrt(self)
    }
    #[inline(always)]
    fn mul_add(self, a: Self, b: Self) -> Self {
        f64::mul_add(self, a, b)
    }
}

/// Branch-free `exp` for f32 (Cephes `expf`: range reduction to |r| <= ln2/2, degree-7
/// polynomial, exponent built from bits). Relative error ~1e-7; it vectorises inside loops where
/// `f32::exp` is a libm call per element. Returns 0 below -87.3 (where the true value is
/// subnormal) and for -inf, so masked scores still weigh nothing.
#[inline(always)]
pub(crate) fn exp_f32(x: f32) -> f32 {
    exp_f32_with::<false>(x)
}

/// [`exp_f32`] with its polynomial's multiply-adds fused when `FMA` (only where the build has
/// the instruction: elsewhere `mul_add` is a library call).
#[inline(always)]
pub(crate) fn exp_f32_with<const FMA: bool>(x: f32) -> f32 {
    let madd = |a: f32, b: f32, c: f32| if FMA { a.mul_add(b, c) } else { a * b + c };
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    const C1: f32 = 0.693_359_4;
    const C2: f32 = -2.121_944_4e-4;
    const ROUND: f32 = 12_582_912.0; // 1.5 * 2^23: adding it rounds to an integer.
    let xc = x.clamp(-87.0, 88.0);
    // t = ROUND + n exactly, so n sits in the low bits of t's mantissa: read it from there
    // (integer ops that vectorise) rather than with an `as i32` cast, whose saturating
    // semantics compile to a per-lane scalar fix-up.
    let t = xc * LOG2E + ROUND;
    let n = t - ROUND;
    let r = xc - n * C1 - n * C2;
    let mut p = 1.987_569_1e-4_f32;
    p = madd(p, r, 1.398_2e-3);
    p = madd(p, r, 8.333_452e-3);
    p = madd(p, r, 4.166_579_6e-2);
    p = madd(p, r, 0.166_666_65);
    p = madd(p, r, 0.5);
    let y = madd(p * r, r, r) + 1.0;
    let pow2n = f32::from_bits(t.to_bits().wrapping_sub(ROUND.to_bits()).wrapping_add(127) << 23);
    if x < -87.33 { 0.0 } else { y * pow2n }
}

/// `a . b` with independent lanes so that it vectorises.
#[inline(always)]
pub(crate) fn dot<T: Float>(a: &[T], b: &[T]) -> T {
    const L: usize = 16;
    let n = a.len().min(b.len());
    let (a, b) = (&a[..n], &b[..n]);
    let mut acc = [T::ZERO; L];
    let (ac, ar) = a.as_chunks::<L>();
    let (bc, br) = b.as_chunks::<L>();
    for (x, y) in ac.iter().zip(bc) {
        for l in 0..L {
            acc[l] += x[l] * y[l];
        }
    }
    let mut tail = T::ZERO;
    for (x, y) in ar.iter().zip(br) {
        tail += *x * *y;
    }
    let mut s = T::ZERO;
    for v in acc {
        s += v;
    }
    s + tail
}

/// `y *= a`.
#[inline(always)]
pub(crate) fn scal<T: Float>(y: &mut [T], a: T) {
    for y in y.iter_mut() {
        *y *= a;
    }
}

/// Sum of a slice, with lanes so that it vectorises.
#[inline(always)]
pub(crate) fn sum<T: Float>(x: &[T]) -> T {
    const L: usize = 16;
    let mut acc = [T::ZERO; L];
    let (c, r) = x.as_chunks::<L>();
    for c in c {
        for l in 0..L {
            acc[l] += c[l];
        }
    }
    let mut s = T::ZERO;
    for v in acc.into_iter().chain(r.iter().copied()) {
        s += v;
    }
    s
}

/// Max of a slice (`-inf` when empty), with lanes so that it vectorises.
#[inline(always)]
pub(crate) fn max<T: Float>(x: &[T]) -> T {
    const L: usize = 16;
    let mut acc = [T::NEG_INF; L];
    let (c, r) = x.as_chunks::<L>();
    for c in c {
        for l in 0..L {
            acc[l] = acc[l].fmax(c[l]);
        }
    }
    let mut m = T::NEG_INF;
    for v in acc.into_iter().chain(r.iter().copied()) {
        m = m.fmax(v);
    }
    m
}

/// The contiguous data of a CPU storage seen through `layout`; errors on a strided layout.
pub(crate) fn contiguous<'a, T: WithDType>(
    s: &'a CpuStorage,
    l: &Layout,
    op: &str,
) -> Result<&'a [T]> {
    match l.contiguous_offsets() {
        Some((a, b)) => Ok(&s.as_slice::<T>()?[a..b]),
        None => bail!(
            "{op}: expected a contiguous input, got shape {:?} strides {:?}",
            l.dims(),
            l.stride()
        ),
    }
}

/// Read access to the data of a contiguous CPU tensor (used in `bwd`, which gets tensors).
pub(crate) struct Host<'a> {
    storage: StorageRef<'a>,
    range: (usize, usize),
}

impl<'a> Host<'a> {
    /// `t` must be contiguous (call `.contiguous()` first) and live on the CPU.
    pub(crate) fn new(t: &'a Tensor, op: &str) -> Result<Self> {
        let (storage, layout) = t.storage_and_layout();
        if !matches!(&*storage, Storage::Cpu(_)) {
            bail!(
                "{op}: backward is implemented on the CPU only, got a tensor on {:?}",
                t.device()
            )
        }
        let Some(range) = layout.contiguous_offsets() else {
            bail!(
                "{op}: expected a contiguous tensor in backward, got strides {:?}",
                layout.stride()
            )
        };
        Ok(Self { storage, range })
    }

    pub(crate) fn slice<T: WithDType>(&self) -> Result<&[T]> {
        match &*self.storage {
            Storage::Cpu(s) => Ok(&s.as_slice::<T>()?[self.range.0..self.range.1]),
            _ => bail!("not a CPU tensor"),
        }
    }
}

/// Threads used by the kernels (the global rayon pool, which is also candle's).
pub(crate) fn threads() -> usize {
    rayon::current_num_threads().max(1)
}

/// A (rows x cols) matrix view: `data[offset + r * rs + c * cs]`.
#[derive(Clone, Copy)]
pub(crate) struct Mat<'a, T> {
    pub data: &'a [T],
    pub rs: usize,
    pub cs: usize,
}

impl<'a, T> Mat<'a, T> {
    pub(crate) fn row_major(data: &'a [T], cols: usize) -> Self {
        Self {
            data,
            rs: cols,
            cs: 1,
        }
    }
    /// The transpose of a row-major (rows x cols) matrix, seen as (cols x rows).
    pub(crate) fn transposed(data: &'a [T], cols: usize) -> Self {
        Self {
            data,
            rs: 1,
            cs: cols,
        }
    }
    /// The transpose of this view.
    pub(crate) fn t(self) -> Self {
        Self {
            rs: self.cs,
            cs: self.rs,
            ..self
        }
    }
    fn fits(&self, rows: usize, cols: usize) -> bool {
        rows == 0 || cols == 0 || (rows - 1) * self.rs + (cols - 1) * self.cs < self.data.len()
    }
}

/// `lhs (m x k) @ rhs (k x n)` as a new row-major (m x n) vector, through [`gemm`].
pub(crate) fn matmul<T: Float>(
    lhs: Mat<'_, T>,
    rhs: Mat<'_, T>,
    m: usize,
    n: usize,
    k: usize,
) -> Vec<T> {
    matmul_plus((lhs, rhs, k), None, m, n)
}

/// `lhs (m x k) @ rhs (k x n) [+ lhs2 (m x k2) @ rhs2 (k2 x n)]` as a new row-major vector:
/// [`gemm_extra`] into a fresh C. Where whet's f32 kernels run it, C is written once, without a
/// zero fill first.
pub(crate) fn matmul_plus<T: Float>(
    (lhs, rhs, k): (Mat<'_, T>, Mat<'_, T>, usize),
    second: Option<(Mat<'_, T>, Mat<'_, T>, usize)>,
    m: usize,
    n: usize,
) -> Vec<T> {
    if sgemm_takes::<T>(m, n, k, second.map_or(0, |s| s.2)) {
        // SAFETY: `sgemm_takes` checked that T is f32, so the views reinterpret exactly.
        let (lhs, rhs) = unsafe { (f32_view(lhs), f32_view(rhs)) };
        // SAFETY: as above.
        let extra = second.map(|s| unsafe { f32_extra(s) });
        let c = sgemm::sgemm_new(lhs, rhs, (m, n, k), extra, threads());
        let mut c = std::mem::ManuallyDrop::new(c);
        // SAFETY: T is f32: the same size and alignment, so the allocation is a Vec<T> of the
        // same length and capacity; the original is not dropped.
        return unsafe { Vec::from_raw_parts(c.as_mut_ptr().cast::<T>(), c.len(), c.capacity()) };
    }
    let mut out = vec![T::ZERO; m * n];
    match second {
        Some(second) => gemm_extra(&mut out, false, (lhs, rhs, k), second, m, n),
        None => gemm(&mut out, false, lhs, rhs, m, n, k),
    }
    out
}

/// Whether whet's f32 kernels run `(m x k) @ (k x n)` with a second product of reduction `k2`
/// (0: none) in one pass: T is f32, the CPU has a micro-kernel, and the product is big enough.
fn sgemm_takes<T: Float>(m: usize, n: usize, k: usize, k2: usize) -> bool {
    T::DTYPE == candle_core::DType::F32
        && sgemm::available()
        && k > 0
        && k2 <= sgemm::EXTRA_MAX_K
        && sgemm::worth_it(m, n, k)
}

/// A second product `(lhs2, rhs2, k2)` as [`sgemm::Extra`].
///
/// # Safety
/// T must be f32.
unsafe fn f32_extra<'a, T>((a, b, k): (Mat<'a, T>, Mat<'a, T>, usize)) -> sgemm::Extra<'a> {
    // SAFETY: T is f32 (the caller's contract).
    unsafe {
        sgemm::Extra {
            a: f32_view(a),
            b: f32_view(b),
            k,
        }
    }
}

/// `m` seen as f32.
///
/// # Safety
/// T must be f32.
unsafe fn f32_view<T>(m: Mat<'_, T>) -> Mat<'_, f32> {
    // SAFETY: T is f32 (the caller's contract): same size, alignment and bits.
    let data = unsafe { std::slice::from_raw_parts(m.data.as_ptr().cast(), m.data.len()) };
    Mat {
        data,
        rs: m.rs,
        cs: m.cs,
    }
}

/// `dst (m x n, row-major) = [dst +] lhs (m x k) @ rhs (k x n) + lhs2 (m x k2) @ rhs2 (k2 x
/// n)`: [`gemm`] with a short second product (a LoRA adapter's rank-r update next to its frozen
/// weight's product). Where whet's f32 kernels run the main product, they reduce the second in
/// the same micro-tiles ([`sgemm::Extra`]); elsewhere it is a second [`gemm`].
pub(crate) fn gemm_extra<T: Float>(
    dst: &mut [T],
    accumulate: bool,
    (lhs, rhs, k): (Mat<'_, T>, Mat<'_, T>, usize),
    (lhs2, rhs2, k2): (Mat<'_, T>, Mat<'_, T>, usize),
    m: usize,
    n: usize,
) {
    if sgemm_takes::<T>(m, n, k, k2) {
        assert!(dst.len() >= m * n, "gemm: dst too small");
        // SAFETY: `sgemm_takes` checked that T is f32, so the slices reinterpret exactly.
        let (dst, lhs, rhs, extra) = unsafe {
            (
                std::slice::from_raw_parts_mut(dst.as_mut_ptr().cast::<f32>(), dst.len()),
                f32_view(lhs),
                f32_view(rhs),
                f32_extra((lhs2, rhs2, k2)),
            )
        };
        let mnk = (m, n, k);
        sgemm::sgemm_extra(dst, n, accumulate, lhs, rhs, mnk, Some(extra), threads());
        return;
    }
    gemm(dst, accumulate, lhs, rhs, m, n, k);
    gemm(dst, true, lhs2, rhs2, m, n, k2);
}

/// `dst (m x n, row-major) = [dst +] lhs (m x k) @ rhs (k x n)`, multi-threaded through the
/// `gemm` crate (the same routine as candle's CPU matmul).
pub(crate) fn gemm<T: Float>(
    dst: &mut [T],
    accumulate: bool,
    lhs: Mat<'_, T>,
    rhs: Mat<'_, T>,
    m: usize,
    n: usize,
    k: usize,
) {
    assert!(dst.len() >= m * n, "gemm: dst too small");
    assert!(
        lhs.fits(m, k) && rhs.fits(k, n),
        "gemm: operand out of bounds"
    );
    if m == 0 || n == 0 {
        return;
    }
    if k == 0 {
        if !accumulate {
            dst[..m * n].fill(T::ZERO);
        }
        return;
    }
    if T::DTYPE == candle_core::DType::F32 && sgemm::available() {
        // SAFETY: T is f32 (checked through its DType), so the slices reinterpret exactly.
        let (dst, lhs, rhs) = unsafe {
            (
                std::slice::from_raw_parts_mut(dst.as_mut_ptr().cast::<f32>(), dst.len()),
                f32_view(lhs),
                f32_view(rhs),
            )
        };
        if sgemm::worth_it(m, n, k) {
            sgemm::sgemm(dst, n, accumulate, lhs, rhs, (m, n, k), threads());
            return;
        }
        if m <= 16 && sgemm::worth_it(n, m, k) {
            // Few rows (the LoRA A gradient, rank x in): C^T = rhs^T @ lhs^T has few columns,
            // which the one-register kernel covers without padding; then transpose it into C.
            let mut ct = vec![0f32; n * m];
            sgemm::sgemm(&mut ct, m, false, rhs.t(), lhs.t(), (n, m, k), threads());
            for (i, row) in dst[..m * n].chunks_exact_mut(n).enumerate() {
                for (j, c) in row.iter_mut().enumerate() {
                    let v = ct[j * m + i];
                    *c = if accumulate { *c + v } else { v };
                }
            }
            return;
        }
    }
    let par = if threads() > 1 {
        gemm::Parallelism::Rayon(threads())
    } else {
        gemm::Parallelism::None
    };
    // SAFETY: every index the routine touches, `r * rs + c * cs` for r < rows and c < cols, is
    // in bounds by the asserts above; dst is an exclusive borrow that aliases neither operand;
    // T is f32 or f64, both of which gemm supports.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst.as_mut_ptr(),
            1,
            n as isize,
            accumulate,
            lhs.data.as_ptr(),
            lhs.cs as isize,
            lhs.rs as isize,
            rhs.data.as_ptr(),
            rhs.cs as isize,
            rhs.rs as isize,
            T::ONE,
            T::ONE,
            false,
            false,
            false,
            par,
        )
    }
}

/// Instruction sets the kernels are compiled for, picked once at runtime.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Debug)]
pub(crate) enum Simd {
    /// The build target's baseline (SSE2 on x86-64).
    Base,
    /// x86-64-v3: AVX2 + FMA.
    V3,
    /// x86-64-v4: AVX-512.
    V4,
}

pub(crate) fn simd_level() -> Simd {
    static LEVEL: std::sync::OnceLock<Simd> = std::sync::OnceLock::new();
    *LEVEL.get_or_init(|| {
        let requested = std::env::var("WHET_CPU").ok();
        let (level, warning) = choose_simd(detected_simd(), requested.as_deref());
        if let Some(w) = warning {
            eprintln!("warning: {w}");
        }
        level
    })
}

/// The widest instruction set this CPU has that the kernels are compiled for.
fn detected_simd() -> Simd {
    #[cfg(target_arch = "x86_64")]
    {
        use std::arch::is_x86_feature_detected as has;
        if has!("avx512f")
            && has!("avx512vl")
            && has!("avx512dq")
            && has!("avx512bw")
            && has!("avx2")
            && has!("fma")
        {
            return Simd::V4;
        }
        if has!("avx2") && has!("fma") {
            return Simd::V3;
        }
    }
    Simd::Base
}

impl Simd {
    /// The name `WHET_CPU` takes and [`crate::cpu_path`] reports.
    pub(crate) fn name(self) -> &'static str {
        match self {
            Simd::Base => "scalar",
            Simd::V3 => "avx2",
            Simd::V4 => "avx512",
        }
    }
}

/// The path the kernels run: `requested` (`WHET_CPU`: `avx512`, `avx2` or `scalar`) forces a
/// lower one than `detected`, so one machine can test every path below its own; a path the CPU
/// lacks, or an unknown name, runs `detected` with a warning saying why.
fn choose_simd(detected: Simd, requested: Option<&str>) -> (Simd, Option<String>) {
    let Some(req) = requested.map(str::trim).filter(|r| !r.is_empty()) else {
        return (detected, None);
    };
    let want = match req.to_ascii_lowercase().as_str() {
        "avx512" | "x86-64-v4" => Simd::V4,
        "avx2" | "x86-64-v3" => Simd::V3,
        "scalar" | "baseline" => Simd::Base,
        _ => {
            return (
                detected,
                Some(format!(
                    "WHET_CPU={req:?} is not a CPU path (expected avx512, avx2 or scalar); running the {} path",
                    detected.name()
                )),
            );
        }
    };
    if want > detected {
        let why = format!(
            "WHET_CPU={req}: this CPU cannot run the {} path; running the {} path",
            want.name(),
            detected.name()
        );
        return (detected, Some(why));
    }
    (want, None)
}

/// Defines `$name`, which runs `$imp` (an `#[inline(always)]` generic kernel) compiled for
/// AVX-512 or AVX2 when the CPU has them, else for the baseline target. Kernels are written as
/// plain loops over slices; the wider instruction sets let them vectorise 8 or 16 lanes wide.
/// A kernel declared `<T: Float, const WIDE: bool>` is told whether it runs with AVX-512's 32
/// wide registers (`true`) or with 16 of AVX2's or fewer (`false`), to size its register tiles;
/// one declared `<T: Float, const WIDE: bool, const FMA: bool>` is also told whether its build
/// has fused multiply-adds (the AVX2 and AVX-512 builds), to use [`Float::mul_add`]: Rust never
/// fuses `a * b + c` itself, so without it every multiply-add costs two instructions.
macro_rules! multiversion {
    ($(#[$m:meta])* $vis:vis fn $name:ident<T: Float>($($a:ident: $t:ty),* $(,)?) $(-> $r:ty)? = $imp:ident;) => {
        $crate::cpu::multiversion!(@ $(#[$m])* $vis fn $name($($a: $t),*) $(-> $r)? = ($imp::<T>) ($imp::<T>) ($imp::<T>));
    };
    ($(#[$m:meta])* $vis:vis fn $name:ident<T: Float, const WIDE: bool>($($a:ident: $t:ty),* $(,)?) $(-> $r:ty)? = $imp:ident;) => {
        $crate::cpu::multiversion!(@ $(#[$m])* $vis fn $name($($a: $t),*) $(-> $r)? = ($imp::<T, true>) ($imp::<T, false>) ($imp::<T, false>));
    };
    ($(#[$m:meta])* $vis:vis fn $name:ident<T: Float, const WIDE: bool, const FMA: bool>($($a:ident: $t:ty),* $(,)?) $(-> $r:ty)? = $imp:ident;) => {
        $crate::cpu::multiversion!(@ $(#[$m])* $vis fn $name($($a: $t),*) $(-> $r)? = ($imp::<T, true, true>) ($imp::<T, false, true>) ($imp::<T, false, false>));
    };
    (@ $(#[$m:meta])* $vis:vis fn $name:ident($($a:ident: $t:ty),*) $(-> $r:ty)? = ($($wide:tt)*) ($($narrow:tt)*) ($($base:tt)*)) => {
        $(#[$m])*
        $vis fn $name<T: $crate::cpu::Float>($($a: $t),*) $(-> $r)? {
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx512f,avx512vl,avx512dq,avx512bw,avx2,fma")]
                #[allow(clippy::too_many_arguments)]
                fn v4<T: $crate::cpu::Float>($($a: $t),*) $(-> $r)? {
                    $($wide)*($($a),*)
                }
                #[target_feature(enable = "avx2,fma")]
                #[allow(clippy::too_many_arguments)]
                fn v3<T: $crate::cpu::Float>($($a: $t),*) $(-> $r)? {
                    $($narrow)*($($a),*)
                }
                match $crate::cpu::simd_level() {
                    // SAFETY: simd_level() detected these features on this CPU.
                    $crate::cpu::Simd::V4 => return unsafe { v4::<T>($($a),*) },
                    // SAFETY: as above.
                    $crate::cpu::Simd::V3 => return unsafe { v3::<T>($($a),*) },
                    $crate::cpu::Simd::Base => {}
                }
            }
            $($base)*($($a),*)
        }
    };
}
pub(crate) use multiversion;

/// Runs `$body` with `$t` bound to the Rust type of `$dtype` (f32 or f64); any other dtype
/// is a candle `UnsupportedDTypeForOp` error.
macro_rules! dispatch_float {
    ($dtype:expr, $op:expr, |$t:ident| $body:expr) => {
        match $dtype {
            candle_core::DType::F32 => {
                type $t = f32;
                $body
            }
            candle_core::DType::F64 => {
                type $t = f64;
                $body
            }
            dt => Err(candle_core::Error::UnsupportedDTypeForOp(dt, $op).bt()),
        }
    };
}
pub(crate) use dispatch_float;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exp_f32_is_accurate() {
        // Both roundings: separate multiply and add, and fused (here a library `fmaf`, in the
        // AVX2 and AVX-512 builds one instruction: the same result).
        for (name, exp) in [
            ("unfused", exp_f32_with::<false> as fn(f32) -> f32),
            ("fused", exp_f32_with::<true>),
        ] {
            let mut worst = 0f64;
            let mut x = -87.0f32;
            while x < 88.0 {
                let want = (x as f64).exp();
                let got = exp(x) as f64;
                worst = worst.max(((got - want) / want).abs());
                x += 0.0137;
            }
            assert!(worst < 3e-7, "{name}: worst relative error {worst}");
            assert_eq!(exp(f32::NEG_INFINITY), 0.0, "{name}");
            assert_eq!(exp(-1000.0), 0.0, "{name}");
            assert_eq!(exp(0.0), 1.0, "{name}");
        }
    }

    /// `WHET_CPU` forces a path at or below the CPU's own and never above it.
    #[test]
    fn whet_cpu_forces_a_lower_path_only() {
        use Simd::*;
        assert_eq!(choose_simd(V4, None), (V4, None));
        assert_eq!(choose_simd(V4, Some("avx2")), (V3, None));
        assert_eq!(choose_simd(V4, Some(" AVX512 ")), (V4, None));
        assert_eq!(choose_simd(V4, Some("scalar")), (Base, None));
        assert_eq!(choose_simd(V3, Some("x86-64-v3")), (V3, None));
        assert_eq!(choose_simd(V3, Some("")), (V3, None));
        let (level, why) = choose_simd(V3, Some("avx512"));
        assert_eq!(level, V3);
        assert!(
            why.unwrap()
                .contains("cannot run the avx512 path; running the avx2 path")
        );
        let (level, why) = choose_simd(Base, Some("avx2"));
        assert_eq!(level, Base);
        assert!(why.unwrap().contains("running the scalar path"));
        let (level, why) = choose_simd(V4, Some("sse9"));
        assert_eq!(level, V4);
        assert!(why.unwrap().contains("expected avx512, avx2 or scalar"));
    }

    /// Reductions across rayon tasks (RMSNorm's dw, the cross-entropy loss) give the same bits
    /// with any number of threads and on every run: their partial sums are added in row order,
    /// not in the order work stealing happens to finish them.
    #[test]
    fn cross_task_sums_do_not_depend_on_the_threads() {
        let (rows, h, v) = (1000usize, 96usize, 300usize);
        let val = |i: usize, s: u64| {
            let x = (i as u64 ^ s).wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 40;
            (x as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
        };
        let x: Vec<f32> = (0..rows * h).map(|i| val(i, 1)).collect();
        let w: Vec<f32> = (0..h).map(|i| 1.0 + 0.1 * val(i, 2)).collect();
        let dy: Vec<f32> = (0..rows * h).map(|i| val(i, 3)).collect();
        let logits: Vec<f32> = (0..rows * v).map(|i| 4.0 * val(i, 4)).collect();
        let targets: Vec<i64> = (0..rows)
            .map(|i| {
                if i % 7 == 0 {
                    -100
                } else {
                    (i * 31 % v) as i64
                }
            })
            .collect();
        let run = |threads: usize| {
            let pool = rayon::ThreadPoolBuilder::new()
                .num_threads(threads)
                .build()
                .unwrap();
            pool.install(|| {
                let (_, dw) = rms_norm::bwd(&x, &w, &dy, 1e-6, true, true);
                let (loss, _) = cross_entropy::fwd(&logits, &targets, v);
                (dw.unwrap(), loss)
            })
        };
        let (dw1, loss1) = run(1);
        let bits = |d: &[f32]| d.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
        for threads in [2, 3, 8, 8, 8] {
            let (dw, loss) = run(threads);
            assert_eq!(bits(&dw), bits(&dw1), "RMSNorm dw with {threads} threads");
            assert_eq!(
                loss.to_bits(),
                loss1.to_bits(),
                "CE loss with {threads} threads"
            );
        }
    }

    /// f32 products through every route of [`gemm`]: the packed kernel (wide and 16 columns),
    /// the transposed one for a C of few rows, and the `gemm` crate for small ones; each against
    /// f64 sums, overwriting and accumulating.
    #[test]
    fn f32_gemm_routes_match_f64_products() {
        if !sgemm::available() {
            println!("note: the scalar path, so every f32 product takes the gemm crate's route");
        }
        let val = |i: usize, s: usize| ((i * s) % 211) as f32 / 105.0 - 1.0;
        // (m, n, k): wide, narrow (LoRA down projection), few rows (LoRA A gradient), small.
        for (m, n, k) in [(96, 200, 70), (300, 16, 576), (16, 576, 300), (5, 7, 3)] {
            assert_eq!(
                sgemm::worth_it(m, n, k) || (m <= 16 && sgemm::worth_it(n, m, k)),
                m > 5,
                "({m}, {n}, {k}) takes the intended route"
            );
            let a: Vec<f32> = (0..m * k).map(|i| val(i, 7)).collect(); // (k x m), used transposed
            let b: Vec<f32> = (0..k * n).map(|i| val(i, 13)).collect(); // (k x n)
            let c0: Vec<f32> = (0..m * n).map(|i| val(i, 3)).collect();
            for accumulate in [false, true] {
                let mut c = c0.clone();
                gemm(
                    &mut c,
                    accumulate,
                    Mat::transposed(&a, m),
                    Mat::row_major(&b, n),
                    m,
                    n,
                    k,
                );
                for i in 0..m {
                    for j in 0..n {
                        let (mut want, mut mag) = if accumulate {
                            (c0[i * n + j] as f64, c0[i * n + j].abs() as f64)
                        } else {
                            (0.0, 0.0)
                        };
                        for p in 0..k {
                            let t = a[p * m + i] as f64 * b[p * n + j] as f64;
                            want += t;
                            mag += t.abs();
                        }
                        let got = c[i * n + j] as f64;
                        assert!(
                            (got - want).abs() <= 4e-7 * mag,
                            "({m}, {n}, {k}) acc {accumulate}: c[{i}][{j}] = {got}, want {want}"
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn gemm_matches_naive() {
        let (m, n, k) = (5, 7, 3);
        let a: Vec<f64> = (0..m * k).map(|i| i as f64 * 0.5 - 3.0).collect();
        let b: Vec<f64> = (0..n * k).map(|i| (i as f64).sin()).collect(); // (n x k), used transposed
        let mut c = vec![1.0; m * n];
        gemm(
            &mut c,
            true,
            Mat::row_major(&a, k),
            Mat::transposed(&b, k),
            m,
            n,
            k,
        );
        for i in 0..m {
            for j in 0..n {
                let want: f64 = 1.0 + (0..k).map(|l| a[i * k + l] * b[j * k + l]).sum::<f64>();
                assert!((c[i * n + j] - want).abs() < 1e-12);
            }
        }
    }
}
