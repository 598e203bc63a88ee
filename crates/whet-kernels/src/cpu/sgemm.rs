//! f32 GEMM with AVX-512 and AVX2 micro-kernels, for the matmuls of the training step.
//!
//! The `gemm` crate (candle's CPU matmul) runs its AVX2 `x2x6` kernel on stable Rust: it builds
//! its AVX-512 kernels only with its `nightly` feature. On the 2-core Zen 4 machines whet is
//! measured on, it reaches 107-168 GFLOP/s on a SmolLM2 step's shapes out of a 228 GFLOP/s FMA
//! peak; this reaches 148-207 (`cargo bench -p whet-benches --bench gemm`).
//! This is the BLIS loop nest (Van Zee & van de Geijn, "BLIS: A Framework for Rapidly
//! Instantiating BLAS Functionality", 2015) mirrored for a row-major C: the micro-kernel keeps
//! an `MR x NR` tile of C in registers (24 zmm for AVX-512's 12 x 32, 12 ymm for AVX2's
//! 6 x 16, BLIS's Haswell shape), broadcasts `MR` values of A and loads `NR` values of packed B
//! per step of the reduction. A's `MR x KC` sliver is read in place (it stays in L1 across the
//! column panels), the packed B block (`KC x NC`) stays in L2.
//!
//! Threads split C by rows or by columns, whichever the kernel's `Tile` prefers (by rows when C
//! is too narrow to share); each packs its own operands into thread-local buffers. The summation order over `k` is the plain one within
//! each `KC` block, so results differ from `gemm`'s only by float reordering.

use std::cell::RefCell;
use std::mem::MaybeUninit;

use super::{Mat, Simd};

/// Reduction block: A's `MR x KC` sliver (18 KiB at MR = 12) stays in L1.
const KC: usize = 384;
/// Columns per packed B block (`KC x NC`, at most 576 KiB) kept in L2.
const NC: usize = 384;

thread_local! {
    /// Packing buffers of this thread: (a partial sliver of A, the B block), then the same for
    /// the [`Extra`] product.
    static PACK: RefCell<[Vec<f32>; 4]> = const { RefCell::new([const { Vec::new() }; 4]) };
}

/// A second product summed into the same C, `a (m x k) @ b (k x n)` with a short reduction
/// (`k <= KC`): LoRA's rank-r update `down @ B^T` riding along the frozen weight's product.
/// Its reduction steps run in the same micro-tiles as the last `KC` block of the main product,
/// so C is not loaded and stored once more for it (a rank-16 product alone is bound by that
/// traffic: 80-120 GFLOP/s on a SmolLM2 step).
#[derive(Clone, Copy)]
pub(crate) struct Extra<'a> {
    pub a: Mat<'a, f32>,
    pub b: Mat<'a, f32>,
    pub k: usize,
}

/// Longest reduction an [`Extra`] may have.
pub(crate) const EXTRA_MAX_K: usize = KC;

/// One micro-tile: `c[r][j] = [c[r][j] +] sum_p a[r * a_rs + p * a_ps] * bp[p][j]` for
/// `r < mr`, `j < nr`, from (kc, (a, a_rs, a_ps), bp, c, ldc, (mr, nr), accumulate, second),
/// plus the same sum over the `second` operands (kc2, (a2, rs, ps), bp2) when `kc2 > 0`.
///
/// # Safety
/// `a` addresses `MR` rows of `kc` values with the given steps, `bp` holds `kc * NR` values
/// (the same for the second operands with `kc2`); `c` addresses `mr` rows of `nr` values, `ldc`
/// apart; `nr` fits the kernel; the CPU has its instruction set.
type KernelFn = unsafe fn(
    usize,
    (*const f32, usize, usize),
    *const f32,
    *mut f32,
    usize,
    (usize, usize),
    bool,
    Second,
);

/// The [`Extra`] operands of one micro-tile: (kc2, (a2, a2_rs, a2_ps), bp2).
type Second = (usize, (*const f32, usize, usize), *const f32);

/// No second product.
const NO_SECOND: Second = (0, (std::ptr::null(), 0, 0), std::ptr::null());

/// One full panel of B: `panel[p * NR + j] = b[p * rs + j * cs]` for `p < kc`, `j < NR`, from
/// (panel, b, (rs, cs), kc).
///
/// # Safety
/// `b` addresses those elements, `panel` holds `kc * NR` values; the CPU has the instruction
/// set.
type PackFn = unsafe fn(*mut f32, *const f32, (usize, usize), usize);

/// A micro-kernel for one instruction set: the tile of C it keeps in registers, how threads
/// share C, and the routines of the loop nest that use vector instructions.
trait Tile {
    /// Rows of C per micro-tile: values of A broadcast per reduction step.
    const MR: usize;
    /// Columns of C per micro-tile: two vector registers of B per reduction step.
    const NR: usize;
    /// Whether threads split a wide C by columns rather than rows (measured per kernel with
    /// `cargo bench -p whet-benches --bench gemm` on the step's shapes).
    const SPLIT_COLUMNS: bool;
    /// The tile for panels of at most `NR / 2` columns (one vector register: no multiply-adds
    /// on zero padding in the LoRA rank-16 products) and for the others.
    const KERNELS: [KernelFn; 2];
    /// Packs one full panel of B.
    const PACK: PackFn;
}

/// Whether [`sgemm`] runs here: the CPU has AVX-512 or AVX2 + FMA (and `WHET_CPU` does not
/// ask for the scalar path).
pub(crate) fn available() -> bool {
    super::simd_level() >= Simd::V3
}

/// Whether the problem is big enough for the packed kernel to pay off; smaller ones (tiny test
/// models, LoRA ranks below 8) stay with the `gemm` crate. A narrow C (the LoRA rank-16
/// products, `n = 16`) runs the one-register kernel; a C with few rows is better computed
/// transposed (see `cpu::gemm`).
pub(crate) fn worth_it(m: usize, n: usize, k: usize) -> bool {
    m >= 24 && n >= 8 && k >= 16 && m * n * k >= 1 << 18
}

/// A raw C pointer that threads may share: they write disjoint tiles.
#[derive(Clone, Copy)]
struct CPtr(*mut f32);
// SAFETY: each thread writes a disjoint set of C's elements (see `sgemm`), and the caller keeps
// the exclusive borrow of C alive until every thread has joined.
unsafe impl Send for CPtr {}
unsafe impl Sync for CPtr {}

impl CPtr {
    /// A method, so that closures capture the whole (Sync) struct and not its raw field.
    fn get(self) -> *mut f32 {
        self.0
    }
}

/// `c (m x n, rows ldc apart) = [c +] a (m x k) @ b (k x n)`, on `threads` threads, with the
/// widest micro-kernel the CPU (and `WHET_CPU`) allows.
///
/// # Panics
/// When neither micro-kernel can run (check [`available`]) or an operand is out of bounds.
pub(crate) fn sgemm(
    c: &mut [f32],
    ldc: usize,
    accumulate: bool,
    a: Mat<'_, f32>,
    b: Mat<'_, f32>,
    mnk: (usize, usize, usize),
    threads: usize,
) {
    sgemm_extra(c, ldc, accumulate, a, b, mnk, None, threads);
}

/// [`sgemm`] plus an [`Extra`] product: `c = [c +] a @ b + extra.a @ extra.b`.
///
/// # Panics
/// As [`sgemm`]; also when the extra product's operands are out of bounds or its reduction is
/// longer than [`EXTRA_MAX_K`].
#[allow(clippy::too_many_arguments)]
pub(crate) fn sgemm_extra(
    c: &mut [f32],
    ldc: usize,
    accumulate: bool,
    a: Mat<'_, f32>,
    b: Mat<'_, f32>,
    mnk: (usize, usize, usize),
    extra: Option<Extra<'_>>,
    threads: usize,
) {
    // SAFETY: f32 and MaybeUninit<f32> have the same layout; the loop nest writes only f32
    // values, so c stays initialised.
    let c = unsafe { &mut *(c as *mut [f32] as *mut [MaybeUninit<f32>]) };
    sgemm_dispatch(c, ldc, accumulate, a, b, mnk, extra, threads);
}

/// `a (m x k) @ b (k x n) [+ extra]` as a new row-major vector, written once by the loop nest
/// (no zero fill first: that was a tenth of a second of `memset` per SmolLM2 step).
///
/// # Panics
/// As [`sgemm_extra`].
pub(crate) fn sgemm_new(
    a: Mat<'_, f32>,
    b: Mat<'_, f32>,
    (m, n, k): (usize, usize, usize),
    extra: Option<Extra<'_>>,
    threads: usize,
) -> Vec<f32> {
    let mut c = Vec::with_capacity(m * n);
    let out = &mut c.spare_capacity_mut()[..m * n];
    sgemm_dispatch(out, n, false, a, b, (m, n, k), extra, threads);
    // SAFETY: without `accumulate` the loop nest writes every element of the m x n block
    // (each KC block's first pass stores its tiles whole), so all m * n values are set.
    unsafe { c.set_len(m * n) };
    c
}

/// [`sgemm_into`] for the widest kernel this CPU (and `WHET_CPU`) allows. `c` must be
/// initialised where `accumulate` reads it.
#[allow(clippy::too_many_arguments)]
fn sgemm_dispatch(
    c: &mut [MaybeUninit<f32>],
    ldc: usize,
    accumulate: bool,
    a: Mat<'_, f32>,
    b: Mat<'_, f32>,
    mnk: (usize, usize, usize),
    extra: Option<Extra<'_>>,
    threads: usize,
) {
    #[cfg(target_arch = "x86_64")]
    match super::simd_level() {
        Simd::V4 => return sgemm_into::<Avx512>(c, ldc, accumulate, a, b, mnk, extra, threads),
        Simd::V3 => return sgemm_into::<Avx2>(c, ldc, accumulate, a, b, mnk, extra, threads),
        Simd::Base => {}
    }
    panic!("sgemm: needs AVX2 + FMA or AVX-512");
}

/// `m` from its element `at` on.
fn from(m: Mat<'_, f32>, at: usize) -> Mat<'_, f32> {
    Mat {
        data: &m.data[at..],
        ..m
    }
}

/// [`sgemm_extra`] with the micro-kernel `K`, whose instruction set the caller checked.
#[cfg(test)]
#[allow(clippy::too_many_arguments)]
fn sgemm_with<K: Tile>(
    c: &mut [f32],
    ldc: usize,
    accumulate: bool,
    a: Mat<'_, f32>,
    b: Mat<'_, f32>,
    mnk: (usize, usize, usize),
    extra: Option<Extra<'_>>,
    threads: usize,
) {
    // SAFETY: as in `sgemm_extra`.
    let c = unsafe { &mut *(c as *mut [f32] as *mut [MaybeUninit<f32>]) };
    sgemm_into::<K>(c, ldc, accumulate, a, b, mnk, extra, threads);
}

/// The loop nest with the micro-kernel `K`, whose instruction set the caller checked, into a C
/// that must be initialised where `accumulate` reads it (without it, C is only written).
#[allow(clippy::too_many_arguments)]
fn sgemm_into<'a, K: Tile>(
    c: &mut [MaybeUninit<f32>],
    ldc: usize,
    accumulate: bool,
    a: Mat<'a, f32>,
    b: Mat<'a, f32>,
    (m, n, k): (usize, usize, usize),
    extra: Option<Extra<'a>>,
    threads: usize,
) {
    assert!(
        m == 0 || n == 0 || ((m - 1) * ldc + n <= c.len() && n <= ldc),
        "sgemm: C out of bounds"
    );
    assert!(a.fits(m, k) && b.fits(k, n), "sgemm: operand out of bounds");
    let extra = extra.filter(|e| e.k > 0);
    if let Some(e) = extra {
        assert!(
            e.k <= EXTRA_MAX_K && e.a.fits(m, e.k) && e.b.fits(e.k, n),
            "sgemm: extra operand out of bounds"
        );
    }
    if m == 0 || n == 0 {
        return;
    }
    if k == 0 {
        // The extra product alone (the loop nest reduces it with the main one's last block).
        if let Some(e) = extra {
            return sgemm_into::<K>(c, ldc, accumulate, e.a, e.b, (m, n, e.k), None, threads);
        }
        if !accumulate {
            for i in 0..m {
                c[i * ldc..i * ldc + n].fill(MaybeUninit::new(0.0));
            }
        }
        return;
    }
    let _timer = crate::gemm_profile::timer(|| crate::gemm_profile::Shape {
        m,
        n,
        k,
        k2: extra.map_or(0, |e| e.k),
        a_transposed: a.cs != 1,
        b_transposed: b.cs != 1,
    });
    let (mr, nr) = (K::MR, K::NR);
    let cp = CPtr(c.as_mut_ptr().cast::<f32>());
    // Which dimension of C the threads split, in whole micro-tiles. Split by columns, each
    // thread packs only its share of B; by rows, each packs all of B but reads only its rows
    // of A. `K::SPLIT_COLUMNS` says which its kernel prefers; columns always when B is much
    // larger than A, rows when C is too narrow to share.
    let by_rows = n < threads * 64 || (!K::SPLIT_COLUMNS && n <= 4 * m && m >= threads * 48);
    let (len, unit) = if by_rows { (m, mr) } else { (n, nr) };
    let parts = threads.clamp(1, len.div_ceil(unit));
    let tiles = len.div_ceil(unit);
    let range = |t: usize| {
        let lo = tiles * t / parts * unit;
        let hi = (tiles * (t + 1) / parts * unit).min(len);
        (lo, hi)
    };
    let run = |t: usize| {
        let (lo, hi) = range(t);
        if lo >= hi {
            return;
        }
        // SAFETY: thread t writes rows (or columns) lo..hi of C only, which no other thread
        // touches; the bounds were asserted above; `sgemm` checked the instruction set.
        unsafe {
            if by_rows {
                let rows = |a: Mat<'a, f32>| from(a, lo * a.rs);
                let extra = extra.map(|e| Extra { a: rows(e.a), ..e });
                serial::<K>(
                    cp.get().add(lo * ldc),
                    ldc,
                    accumulate,
                    rows(a),
                    b,
                    (hi - lo, n, k),
                    extra,
                );
            } else {
                let cols = |b: Mat<'a, f32>| from(b, lo * b.cs);
                let extra = extra.map(|e| Extra { b: cols(e.b), ..e });
                let c = cp.get().add(lo);
                serial::<K>(c, ldc, accumulate, a, cols(b), (m, hi - lo, k), extra);
            }
        }
    };
    if parts == 1 {
        run(0);
    } else {
        rayon::scope(|s| {
            for t in 1..parts {
                let run = &run;
                s.spawn(move |_| run(t));
            }
            run(0);
        });
    }
}

/// The loop nest on one thread.
///
/// A is read in place (a micro-tile's `MR` rows are `MR` strided streams), except for a last
/// partial tile of rows, which is copied with zero padding. B is packed per `KC x NC` block.
/// The extra product's B is packed with the last `KC` block of each column block and reduced
/// by the same micro-kernel calls.
///
/// # Safety
/// `c` must address an `m x n` block with rows `ldc` apart that only this call writes; the
/// CPU must have `K`'s instruction set.
unsafe fn serial<K: Tile>(
    c: *mut f32,
    ldc: usize,
    accumulate: bool,
    a: Mat<'_, f32>,
    b: Mat<'_, f32>,
    (m, n, k): (usize, usize, usize),
    extra: Option<Extra<'_>>,
) {
    let (mr_full, nr_full) = (K::MR, K::NR);
    PACK.with_borrow_mut(|[edge, bp, edge2, bp2]| {
        // Even blocks of whole panels: 576 columns are 2 x 288, not 384 + 192.
        let nblocks = n.div_ceil(NC);
        let nc_max = n.div_ceil(nblocks).div_ceil(nr_full) * nr_full;
        let kblocks = k.div_ceil(KC);
        let kc_max = k.div_ceil(kblocks);
        edge.resize(kc_max * mr_full, 0.0);
        bp.resize(kc_max * nc_max, 0.0);
        let k2 = extra.map_or(0, |e| e.k);
        edge2.resize(k2 * mr_full, 0.0);
        bp2.resize(k2 * nc_max, 0.0);
        // A sliver is read in place when its `MR` rows are contiguous streams, unless they
        // lie a multiple of 4 KiB apart: then they share L1 sets and evict each other. A
        // transposed A (the weight gradient's dy^T) is copied too when the copy serves several
        // panels of B: its `KC` reduction steps are `KC` cache lines a fixed stride apart,
        // which for the model's widths (576, 1536 floats) fall into a few L1 sets.
        let copied = |a: Mat<'_, f32>| {
            if a.cs == 1 {
                a.rs.is_multiple_of(1024)
            } else {
                a.cs.is_multiple_of(1024) || n >= 4 * nr_full
            }
        };
        let (copied, copied2) = (copied(a), extra.is_some_and(|e| copied(e.a)));
        let mut jc = 0;
        while jc < n {
            let nc = nc_max.min(n - jc);
            let mut pc = 0;
            while pc < k {
                let kc = kc_max.min(k - pc);
                // SAFETY: `K`'s instruction set is the caller's contract.
                unsafe { pack_b::<K>(bp, b, pc, kc, jc, nc) };
                let extra = extra.filter(|_| pc + kc == k);
                if let Some(e) = extra {
                    // SAFETY: as above.
                    unsafe { pack_b::<K>(bp2, e.b, 0, k2, jc, nc) };
                }
                let acc = accumulate || pc > 0;
                let mut ic = 0;
                while ic < m {
                    let mr = mr_full.min(m - ic);
                    // (pointer, row step, reduction step) of this sliver of A.
                    let (ap, a_rs, a_ps) = if mr == mr_full && !copied {
                        (a.data[ic * a.rs + pc * a.cs..].as_ptr(), a.rs, a.cs)
                    } else {
                        copy_sliver::<K>(edge, a, (ic, mr), (pc, kc))
                    };
                    let a2 = extra.map(|e| {
                        if mr == mr_full && !copied2 {
                            (e.a.data[ic * e.a.rs..].as_ptr(), e.a.rs, e.a.cs)
                        } else {
                            copy_sliver::<K>(edge2, e.a, (ic, mr), (0, k2))
                        }
                    });
                    let mut jr = 0;
                    while jr < nc {
                        let nr = nr_full.min(nc - jr);
                        // SAFETY: rows ic..ic+MR and columns pc..pc+kc of A are in bounds
                        // (checked by `sgemm`, or the zero-padded copy); the tile (ic..ic+mr,
                        // jc+jr..jc+jr+nr) lies in C's block; the packed panel holds kc x NR;
                        // the same holds for the extra product's sliver and panel with k2.
                        unsafe {
                            let second = match a2 {
                                Some(a2) => (k2, a2, bp2.as_ptr().add(jr * k2)),
                                None => NO_SECOND,
                            };
                            K::KERNELS[usize::from(nr > nr_full / 2)](
                                kc,
                                (ap, a_rs, a_ps),
                                bp.as_ptr().add(jr * kc),
                                c.add(ic * ldc + jc + jr),
                                ldc,
                                (mr, nr),
                                acc,
                                second,
                            );
                        }
                        jr += nr_full;
                    }
                    ic += mr_full;
                }
                pc += kc;
            }
            jc += nc;
        }
    });
}

/// Copies rows `i0..i0+mr` and columns `p0..p0+kc` of A into `buf` as a sliver of `K::MR`
/// rows, zero rows past `mr`; returns it as (pointer, row step, reduction step) for the kernel.
/// A transposed A (the weight gradient's dy^T) is copied one reduction step of `MR` floats at a
/// time: for a full sliver that is a copy of constant length, a few vector moves instead of a
/// `memmove` call per step.
fn copy_sliver<K: Tile>(
    buf: &mut [f32],
    a: Mat<'_, f32>,
    (i0, mr): (usize, usize),
    (p0, kc): (usize, usize),
) -> (*const f32, usize, usize) {
    let mr_full = K::MR;
    let buf = &mut buf[..kc * mr_full];
    if mr < mr_full {
        buf.fill(0.0);
    }
    let at = |r: usize, p: usize| (i0 + r) * a.rs + (p0 + p) * a.cs;
    if a.cs == 1 {
        for r in 0..mr {
            buf[r * kc..(r + 1) * kc].copy_from_slice(&a.data[at(r, 0)..][..kc]);
        }
        (buf.as_ptr(), kc, 1)
    } else if a.rs == 1 {
        if mr == mr_full {
            for (p, dst) in buf.chunks_exact_mut(mr_full).enumerate() {
                dst.copy_from_slice(&a.data[at(0, p)..][..mr_full]);
            }
        } else {
            for (p, dst) in buf.chunks_exact_mut(mr_full).enumerate() {
                dst[..mr].copy_from_slice(&a.data[at(0, p)..][..mr]);
            }
        }
        (buf.as_ptr(), 1, mr_full)
    } else {
        for r in 0..mr {
            for p in 0..kc {
                buf[r * kc + p] = a.data[at(r, p)];
            }
        }
        (buf.as_ptr(), kc, 1)
    }
}

/// Packs rows `p0..p0+kc` and columns `j0..j0+nc` of B as `NR`-wide panels, each `kc` rows
/// of `NR` values (zero columns past `nc` in the last panel).
///
/// # Safety
/// The CPU has `K`'s instruction set.
unsafe fn pack_b<K: Tile>(
    dst: &mut [f32],
    b: Mat<'_, f32>,
    p0: usize,
    kc: usize,
    j0: usize,
    nc: usize,
) {
    let nr_full = K::NR;
    let mut jr = 0;
    while jr < nc {
        let nr = nr_full.min(nc - jr);
        let panel = &mut dst[jr * kc..(jr + nr_full) * kc];
        let src = |p: usize, j: usize| (p0 + p) * b.rs + (j0 + jr + j) * b.cs;
        let fast = b.cs == 1 || b.rs == 1;
        if nr == nr_full && fast {
            let from = &b.data[src(0, 0)..];
            let last = src(kc - 1, nr_full - 1) - src(0, 0);
            assert!(last < from.len(), "pack_b: B out of bounds");
            // SAFETY: every element read, (p * rs + j * cs) for p < kc, j < NR, is at most
            // `last`, in bounds of `from` by the assert; the panel holds kc * NR values.
            unsafe { (K::PACK)(panel.as_mut_ptr(), from.as_ptr(), (b.rs, b.cs), kc) };
        } else {
            if nr < nr_full {
                panel.fill(0.0);
            }
            for j in 0..nr {
                for p in 0..kc {
                    panel[p * nr_full + j] = b.data[src(p, j)];
                }
            }
        }
        jr += nr_full;
    }
}

/// The AVX-512 micro-kernel: 12 x 32, in 24 zmm registers.
#[cfg(target_arch = "x86_64")]
struct Avx512;

#[cfg(target_arch = "x86_64")]
impl Tile for Avx512 {
    const MR: usize = 12;
    const NR: usize = 32;
    // Zen 4: 5-20% faster by columns on the up, down and weight-gradient products (packing
    // half of B per thread), within noise elsewhere.
    const SPLIT_COLUMNS: bool = true;
    const KERNELS: [KernelFn; 2] = [avx512::kernel::<1>, avx512::kernel::<2>];
    // The AVX2 packing, 32 columns wide: its copies are bound by memory, not vector width.
    const PACK: PackFn = avx2::pack_panel::<{ Avx512::NR }>;
}

/// The AVX2 + FMA micro-kernel: 6 x 16, in 12 ymm registers (BLIS's Haswell shape).
#[cfg(target_arch = "x86_64")]
struct Avx2;

#[cfg(target_arch = "x86_64")]
impl Tile for Avx2 {
    const MR: usize = 6;
    const NR: usize = 16;
    // Zen 4 on this path: rows were as fast or up to 10% faster.
    const SPLIT_COLUMNS: bool = false;
    const KERNELS: [KernelFn; 2] = [avx2::kernel::<1>, avx2::kernel::<2>];
    const PACK: PackFn = avx2::pack_panel::<{ Avx2::NR }>;
}

#[cfg(target_arch = "x86_64")]
mod avx512 {
    use std::arch::x86_64::*;

    use super::{Avx512, Tile};

    const MR: usize = Avx512::MR;
    const NR: usize = Avx512::NR;

    /// One `MR x 16W` tile (`W` zmm registers per row, 1 or 2), as a [`KernelFn`].
    ///
    /// # Safety
    /// [`KernelFn`]'s, with `nr <= 16W`.
    #[allow(clippy::too_many_arguments)]
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn kernel<const W: usize>(
        kc: usize,
        (a, a_rs, a_ps): (*const f32, usize, usize),
        bp: *const f32,
        c: *mut f32,
        ldc: usize,
        (mr, nr): (usize, usize),
        accumulate: bool,
        (kc2, (a2, a2_rs, a2_ps), bp2): super::Second,
    ) {
        // SAFETY: the caller's contract covers every pointer offset below.
        unsafe {
            let mut c0 = [_mm512_setzero_ps(); MR];
            let mut c1 = [_mm512_setzero_ps(); MR];
            macro_rules! steps {
                ($kc:expr, $a:expr, $a_rs:expr, $a_ps:expr, $bp:expr) => {
                    let rows: [*const f32; MR] = std::array::from_fn(|r| $a.add(r * $a_rs));
                    let mut b = $bp;
                    let mut p = 0;
                    while p < $kc {
                        let b0 = _mm512_loadu_ps(b);
                        let off = p * $a_ps;
                        if W == 2 {
                            let b1 = _mm512_loadu_ps(b.add(16));
                            for r in 0..MR {
                                let ar = _mm512_set1_ps(*rows[r].add(off));
                                c0[r] = _mm512_fmadd_ps(ar, b0, c0[r]);
                                c1[r] = _mm512_fmadd_ps(ar, b1, c1[r]);
                            }
                        } else {
                            for r in 0..MR {
                                let ar = _mm512_set1_ps(*rows[r].add(off));
                                c0[r] = _mm512_fmadd_ps(ar, b0, c0[r]);
                            }
                        }
                        b = b.add(NR);
                        p += 1;
                    }
                };
            }
            steps!(kc, a, a_rs, a_ps, bp);
            if kc2 > 0 {
                steps!(kc2, a2, a2_rs, a2_ps, bp2);
            }
            let m0: __mmask16 = if nr >= 16 { 0xffff } else { (1u16 << nr) - 1 };
            let m1: __mmask16 = if nr >= 32 {
                0xffff
            } else if nr > 16 {
                (1u16 << (nr - 16)) - 1
            } else {
                0
            };
            for r in 0..mr {
                let row = c.add(r * ldc);
                // With `nr <= 16` the second half lies past the row (past the end of `c` on
                // the last row) and `m1` is 0: the masked load and store touch no memory
                // there, but `add` would still be UB for a pointer beyond one-past-the-end, so
                // the address is formed with `wrapping_add` and never dereferenced unmasked.
                let row1 = row.wrapping_add(16);
                let (mut v0, mut v1) = (c0[r], c1[r]);
                if accumulate {
                    v0 = _mm512_add_ps(v0, _mm512_maskz_loadu_ps(m0, row));
                    v1 = _mm512_add_ps(v1, _mm512_maskz_loadu_ps(m1, row1));
                }
                _mm512_mask_storeu_ps(row, m0, v0);
                _mm512_mask_storeu_ps(row1, m1, v1);
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use std::arch::x86_64::*;

    use super::{Avx2, Tile};

    const MR: usize = Avx2::MR;
    const NR: usize = Avx2::NR;

    /// [`Tile::PACK`] for a panel `W` columns wide (a multiple of 8), for both tiles: 8-wide
    /// copies per row when B's rows are contiguous; when its columns are (the weight in
    /// `x @ w^T`), 8 x 8 blocks loaded along the columns and transposed in registers, not
    /// gathered (gathers are slower on both vendors' cores).
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn pack_panel<const W: usize>(
        out: *mut f32,
        b: *const f32,
        (rs, cs): (usize, usize),
        kc: usize,
    ) {
        // SAFETY: the caller's contract covers every offset read and written.
        unsafe {
            if cs == 1 {
                for p in 0..kc {
                    let from = b.add(p * rs);
                    for q in (0..W).step_by(8) {
                        _mm256_storeu_ps(out.add(p * W + q), _mm256_loadu_ps(from.add(q)));
                    }
                }
                return;
            }
            // Column j of the panel is the run b[j * cs + p * rs], p = 0.., with rs = 1.
            for group in 0..W / 8 {
                let col = |j: usize| b.add((group * 8 + j) * cs);
                let mut p = 0;
                while p + 8 <= kc {
                    let r: [__m256; 8] =
                        std::array::from_fn(|j| _mm256_loadu_ps(col(j).add(p * rs)));
                    let t = transpose8(r);
                    for (q, v) in t.iter().enumerate() {
                        _mm256_storeu_ps(out.add((p + q) * W + group * 8), *v);
                    }
                    p += 8;
                }
                while p < kc {
                    for j in 0..8 {
                        *out.add(p * W + group * 8 + j) = *col(j).add(p * rs);
                    }
                    p += 1;
                }
            }
        }
    }

    /// The transpose of 8 rows of 8 values.
    #[inline(always)]
    fn transpose8(r: [__m256; 8]) -> [__m256; 8] {
        // SAFETY: shuffles of registers only; the caller enabled AVX.
        unsafe {
            let t0 = _mm256_unpacklo_ps(r[0], r[1]);
            let t1 = _mm256_unpackhi_ps(r[0], r[1]);
            let t2 = _mm256_unpacklo_ps(r[2], r[3]);
            let t3 = _mm256_unpackhi_ps(r[2], r[3]);
            let t4 = _mm256_unpacklo_ps(r[4], r[5]);
            let t5 = _mm256_unpackhi_ps(r[4], r[5]);
            let t6 = _mm256_unpacklo_ps(r[6], r[7]);
            let t7 = _mm256_unpackhi_ps(r[6], r[7]);
            let u0 = _mm256_shuffle_ps::<0x44>(t0, t2);
            let u1 = _mm256_shuffle_ps::<0xee>(t0, t2);
            let u2 = _mm256_shuffle_ps::<0x44>(t1, t3);
            let u3 = _mm256_shuffle_ps::<0xee>(t1, t3);
            let u4 = _mm256_shuffle_ps::<0x44>(t4, t6);
            let u5 = _mm256_shuffle_ps::<0xee>(t4, t6);
            let u6 = _mm256_shuffle_ps::<0x44>(t5, t7);
            let u7 = _mm256_shuffle_ps::<0xee>(t5, t7);
            [
                _mm256_permute2f128_ps::<0x20>(u0, u4),
                _mm256_permute2f128_ps::<0x20>(u1, u5),
                _mm256_permute2f128_ps::<0x20>(u2, u6),
                _mm256_permute2f128_ps::<0x20>(u3, u7),
                _mm256_permute2f128_ps::<0x31>(u0, u4),
                _mm256_permute2f128_ps::<0x31>(u1, u5),
                _mm256_permute2f128_ps::<0x31>(u2, u6),
                _mm256_permute2f128_ps::<0x31>(u3, u7),
            ]
        }
    }

    /// One `MR x 8W` tile (`W` ymm registers per row, 1 or 2), as a [`KernelFn`]. AVX2 has
    /// no masked stores of this kind, so an edge tile goes through a buffer.
    ///
    /// # Safety
    /// [`KernelFn`]'s, with `nr <= 8W`.
    #[allow(clippy::too_many_arguments)]
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn kernel<const W: usize>(
        kc: usize,
        (a, a_rs, a_ps): (*const f32, usize, usize),
        bp: *const f32,
        c: *mut f32,
        ldc: usize,
        (mr, nr): (usize, usize),
        accumulate: bool,
        (kc2, (a2, a2_rs, a2_ps), bp2): super::Second,
    ) {
        // SAFETY: the caller's contract covers every pointer offset below.
        unsafe {
            let mut c0 = [_mm256_setzero_ps(); MR];
            let mut c1 = [_mm256_setzero_ps(); MR];
            macro_rules! steps {
                ($kc:expr, $a:expr, $a_rs:expr, $a_ps:expr, $bp:expr) => {
                    let rows: [*const f32; MR] = std::array::from_fn(|r| $a.add(r * $a_rs));
                    let mut b = $bp;
                    let mut p = 0;
                    while p < $kc {
                        let b0 = _mm256_loadu_ps(b);
                        let off = p * $a_ps;
                        if W == 2 {
                            let b1 = _mm256_loadu_ps(b.add(8));
                            for r in 0..MR {
                                let ar = _mm256_broadcast_ss(&*rows[r].add(off));
                                c0[r] = _mm256_fmadd_ps(ar, b0, c0[r]);
                                c1[r] = _mm256_fmadd_ps(ar, b1, c1[r]);
                            }
                        } else {
                            for r in 0..MR {
                                let ar = _mm256_broadcast_ss(&*rows[r].add(off));
                                c0[r] = _mm256_fmadd_ps(ar, b0, c0[r]);
                            }
                        }
                        b = b.add(NR);
                        p += 1;
                    }
                };
            }
            steps!(kc, a, a_rs, a_ps, bp);
            if kc2 > 0 {
                steps!(kc2, a2, a2_rs, a2_ps, bp2);
            }
            if nr == 8 * W {
                for r in 0..mr {
                    let row = c.add(r * ldc);
                    let (mut v0, mut v1) = (c0[r], c1[r]);
                    if accumulate {
                        v0 = _mm256_add_ps(v0, _mm256_loadu_ps(row));
                        if W == 2 {
                            v1 = _mm256_add_ps(v1, _mm256_loadu_ps(row.add(8)));
                        }
                    }
                    _mm256_storeu_ps(row, v0);
                    if W == 2 {
                        _mm256_storeu_ps(row.add(8), v1);
                    }
                }
            } else {
                let mut tile = [0f32; NR];
                for r in 0..mr {
                    _mm256_storeu_ps(tile.as_mut_ptr(), c0[r]);
                    _mm256_storeu_ps(tile.as_mut_ptr().add(8), c1[r]);
                    // Through pointers: without `accumulate`, C may not be initialised yet.
                    for (j, v) in tile.into_iter().take(nr).enumerate() {
                        let out = c.add(r * ldc + j);
                        out.write(if accumulate { out.read() + v } else { v });
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A [`matrix`] as the loop nest reads it.
    fn view((data, rs, cs): &(Vec<f32>, usize, usize)) -> Mat<'_, f32> {
        Mat {
            data,
            rs: *rs,
            cs: *cs,
        }
    }

    /// A (rows x cols) matrix stored row-major (or transposed) with leading dimension `ld`.
    fn matrix(
        rows: usize,
        cols: usize,
        transposed: bool,
        ld: usize,
        seed: u32,
    ) -> (Vec<f32>, usize, usize) {
        let (outer, inner) = if transposed {
            (cols, rows)
        } else {
            (rows, cols)
        };
        assert!(ld >= inner);
        let mut state = seed.wrapping_mul(2_654_435_761).wrapping_add(1);
        let data = (0..outer * ld)
            .map(|_| {
                state ^= state << 13;
                state ^= state >> 17;
                state ^= state << 5;
                (state % 2001) as f32 / 1000.0 - 1.0
            })
            .collect();
        if transposed {
            (data, 1, ld)
        } else {
            (data, ld, 1)
        }
    }

    /// A loop nest with one micro-kernel, as `sgemm` runs it.
    type Sgemm = fn(
        &mut [f32],
        usize,
        bool,
        Mat<'_, f32>,
        Mat<'_, f32>,
        (usize, usize, usize),
        Option<Extra<'_>>,
        usize,
    );

    /// Every micro-kernel this CPU can run, by name; prints the ones it cannot.
    fn paths() -> Vec<(&'static str, Sgemm)> {
        let level = super::super::detected_simd();
        let mut paths: Vec<(&'static str, Sgemm)> = Vec::new();
        #[cfg(target_arch = "x86_64")]
        {
            if level >= Simd::V4 {
                paths.push(("avx512", sgemm_with::<Avx512>));
            } else {
                println!("skipped the avx512 kernel: this CPU has no AVX-512");
            }
            if level >= Simd::V3 {
                paths.push(("avx2", sgemm_with::<Avx2>));
            } else {
                println!("skipped the avx2 kernel: this CPU has no AVX2 + FMA");
            }
        }
        if level == Simd::Base {
            println!("skipped: no micro-kernel runs on this CPU, so sgemm never runs here");
        }
        paths
    }

    /// Runs one micro-kernel's loop nest on one case and compares every element of C with an
    /// f64 product, within f32 rounding of the sum of |a||b| terms.
    #[allow(clippy::too_many_arguments)]
    fn check(
        path: (&str, Sgemm),
        mnk: (usize, usize, usize),
        a_t: (bool, usize),
        b_t: (bool, usize),
        ldc: usize,
        accumulate: bool,
        threads: usize,
    ) {
        check_extra(path, mnk, a_t, b_t, ldc, accumulate, threads, None);
    }

    /// [`check`] with an [`Extra`] product of reduction `k2` (A2 transposed or not) summed in.
    #[allow(clippy::too_many_arguments)]
    fn check_extra(
        (path, sgemm): (&str, Sgemm),
        (m, n, k): (usize, usize, usize),
        (a_t, lda): (bool, usize),
        (b_t, ldb): (bool, usize),
        ldc: usize,
        accumulate: bool,
        threads: usize,
        second: Option<(usize, bool, bool)>,
    ) {
        let (am, bm) = (matrix(m, k, a_t, lda, 1), matrix(k, n, b_t, ldb, 2));
        let (c0, _, _) = matrix(m, ldc, false, ldc, 3);
        let mut c = c0.clone();
        let (a, b) = (view(&am), view(&bm));
        let (k2, a2_t, b2_t) = second.unwrap_or((0, false, false));
        let a2m = matrix(m, k2, a2_t, if a2_t { m + 1 } else { k2 + 2 }, 4);
        let b2m = matrix(k2, n, b2_t, if b2_t { k2 } else { n + 3 }, 5);
        let (a2, b2) = (view(&a2m), view(&b2m));
        let extra = second.map(|_| Extra {
            a: a2,
            b: b2,
            k: k2,
        });
        sgemm(&mut c, ldc, accumulate, a, b, (m, n, k), extra, threads);
        for i in 0..m {
            for j in 0..ldc {
                let got = c[i * ldc + j] as f64;
                if j >= n {
                    assert_eq!(got, c0[i * ldc + j] as f64, "wrote past n at ({i}, {j})");
                    continue;
                }
                let (mut want, mut mag) = (0f64, 0f64);
                for (a, b, k) in [(a, b, k), (a2, b2, k2)] {
                    for p in 0..k {
                        let t =
                            a.data[i * a.rs + p * a.cs] as f64 * b.data[p * b.rs + j * b.cs] as f64;
                        want += t;
                        mag += t.abs();
                    }
                }
                if accumulate {
                    want += c0[i * ldc + j] as f64;
                    mag += (c0[i * ldc + j] as f64).abs();
                }
                assert!(
                    (got - want).abs() <= 4e-7 * mag + 1e-30,
                    "{path} ({m}, {n}, {k}) a_t {a_t} b_t {b_t} acc {accumulate} threads {threads} \
                     second {second:?}: c[{i}][{j}] = {got}, want {want}"
                );
            }
        }
    }

    #[test]
    fn matches_f64_products_across_shapes_layouts_and_threads() {
        // Edges in every dimension: partial tiles of rows (MR = 12 or 6) and columns (NR = 32
        // or 16), several KC and NC blocks, a single row tile, a long thin product, and narrow
        // ones (16, 9 and 8 columns: the one-register kernels), reductions that are not a
        // multiple of the 8 x 8 transpose.
        let shapes = [
            (100, 70, 50),
            (12, 32, 16),
            (6, 16, 16),
            (37, 400, 800),
            (130, 33, 385),
            (25, 800, 7),
            (61, 16, 500),
            (30, 9, 40),
            (31, 8, 43),
            (7, 5, 3),
        ];
        for path in paths() {
            for (m, n, k) in shapes {
                for (a_t, b_t) in [(false, false), (false, true), (true, false), (true, true)] {
                    for threads in [1, 2, 3] {
                        let lda = if a_t { m + 3 } else { k + 1 };
                        let ldb = if b_t { k } else { n + 5 };
                        check(
                            path,
                            (m, n, k),
                            (a_t, lda),
                            (b_t, ldb),
                            n + 2,
                            threads == 2,
                            threads,
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn an_extra_product_is_summed_in_across_shapes_layouts_and_threads() {
        // The rank-r update of a LoRA linear rides along the main product's last KC block:
        // reductions of one and several KC blocks, an empty main product, partial tiles, the
        // narrow kernels, ranks 1, 16 and KC, and A2 read in place or copied.
        let shapes = [
            (100, 70, 50),
            (37, 400, 800),
            (130, 33, 385),
            (61, 16, 500),
            (30, 9, 40),
            (25, 64, 0),
        ];
        for path in paths() {
            for (m, n, k) in shapes {
                for (k2, a2_t, b2_t) in [(16, false, true), (1, true, false), (KC, false, false)] {
                    for threads in [1, 2, 3] {
                        check_extra(
                            path,
                            (m, n, k),
                            (false, k + 1),
                            (threads == 3, if threads == 3 { k } else { n + 5 }),
                            n + 2,
                            threads == 2,
                            threads,
                            Some((k2, a2_t, b2_t)),
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn without_accumulate_every_element_of_c_is_written() {
        // `sgemm_new` hands out C without a zero fill: a NaN left anywhere would show.
        for path in paths() {
            for (m, n, k) in [(100, 70, 50), (37, 400, 800), (25, 9, 7), (13, 33, 385)] {
                for threads in [1, 2] {
                    let (am, bm) = (matrix(m, k, false, k, 1), matrix(k, n, true, k, 2));
                    let (a, b) = (view(&am), view(&bm));
                    let extra = Some(Extra { a, b, k: 16.min(k) });
                    let mut zeroed = vec![0f32; m * n];
                    let mut nans = vec![f32::NAN; m * n];
                    (path.1)(&mut zeroed, n, false, a, b, (m, n, k), extra, threads);
                    (path.1)(&mut nans, n, false, a, b, (m, n, k), extra, threads);
                    assert_eq!(zeroed, nans, "{} ({m}, {n}, {k}) threads {threads}", path.0);
                }
            }
        }
    }

    #[test]
    fn rows_4_kib_apart_take_the_copied_path() {
        // lda = 1024 floats: the rows of a sliver alias in L1 and are copied before the kernel.
        for path in paths() {
            check(
                path,
                (50, 96, 300),
                (false, 1024),
                (false, 96),
                96,
                false,
                2,
            );
            check(path, (50, 96, 300), (true, 1024), (true, 1024), 96, true, 1);
        }
    }

    /// The opt-in profile counts each product of the packed kernels under its shape, from zero
    /// at each start. The shape is odd enough that no other test runs it meanwhile.
    #[test]
    fn the_gemm_profile_counts_each_product_under_its_shape() {
        use crate::gemm_profile::{self, Shape};
        let (m, n, k) = (53, 75, 67);
        let (a, b) = (matrix(m, k, false, k, 1), matrix(k, n, true, k, 2));
        let shape = Shape {
            m,
            n,
            k,
            k2: 0,
            a_transposed: false,
            b_transposed: true,
        };
        for (name, run) in paths() {
            let mut c = vec![0f32; m * n];
            for calls in [3, 1] {
                gemm_profile::start();
                for _ in 0..calls {
                    run(&mut c, n, false, view(&a), view(&b), (m, n, k), None, 2);
                }
                let counted = gemm_profile::stop();
                let ours: Vec<_> = counted.iter().filter(|e| e.shape == shape).collect();
                assert_eq!(ours.len(), 1, "{name}: {counted:?}");
                assert_eq!(ours[0].calls, calls, "{name}");
                assert!(ours[0].seconds > 0.0, "{name}");
                assert_eq!(ours[0].flop(), calls as f64 * 2.0 * (m * n * k) as f64);
            }
        }
    }
}
