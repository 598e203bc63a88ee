//! f32 GEMM with an AVX-512 micro-kernel, for the matmuls of the training step.
//!
//! The `gemm` crate (candle's CPU matmul) runs its AVX2 `x2x6` kernel on stable Rust: it builds
//! its AVX-512 kernels only with its `nightly` feature. On the 2-core Zen 4 machines whet is
//! measured on, it reaches 107-168 GFLOP/s on a SmolLM2 step's shapes out of a 228 GFLOP/s FMA
//! peak; this reaches 148-207 (`cargo bench -p whet-benches --bench gemm`).
//! This is the BLIS loop nest (Van Zee & van de Geijn, "BLIS: A Framework for Rapidly
//! Instantiating BLAS Functionality", 2015) mirrored for a row-major C: the micro-kernel keeps
//! an `MR x NR` tile of C in 24 zmm registers, broadcasts `MR` values of packed A and loads `NR`
//! values of packed B per step of the reduction. A's `MR x KC` sliver is read in place (it stays
//! in L1 across the column panels), the packed B block (`KC x NC`) stays in L2.
//!
//! Threads split the rows of C (or its columns when it has few rows); each packs its own
//! operands into thread-local buffers. The summation order over `k` is the plain one within
//! each `KC` block, so results differ from `gemm`'s only by float reordering.

use std::cell::RefCell;

use super::Mat;

/// Rows of C per micro-tile: values of A broadcast per reduction step.
pub(crate) const MR: usize = 12;
/// Columns of C per micro-tile: two zmm registers of B per reduction step.
pub(crate) const NR: usize = 32;
/// Reduction block: A's `MR x KC` sliver (18 KiB) stays in L1.
const KC: usize = 384;
/// Columns per packed B block (`KC x NC`, at most 576 KiB) kept in L2.
const NC: usize = 384;

thread_local! {
    /// Packing buffers of this thread: (a partial sliver of A, the B block).
    static PACK: RefCell<(Vec<f32>, Vec<f32>)> = const { RefCell::new((Vec::new(), Vec::new())) };
}

/// Whether [`sgemm`] runs here (the CPU has AVX-512F).
pub(crate) fn available() -> bool {
    super::simd_level() == super::Simd::V4
}

/// Whether the problem is big enough for the packed kernel to pay off; smaller ones (tiny test
/// models, LoRA ranks below 8) stay with the `gemm` crate. A narrow C (the LoRA rank-16
/// products, `n = 16`) runs the one-register kernel; a C with few rows is better computed
/// transposed (see `cpu::gemm`).
pub(crate) fn worth_it(m: usize, n: usize, k: usize) -> bool {
    m >= 2 * MR && n >= 8 && k >= 16 && m * n * k >= 1 << 18
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

/// `c (m x n, rows ldc apart) = [c +] a (m x k) @ b (k x n)`, on `threads` threads.
///
/// # Panics
/// When the CPU lacks AVX-512F (check [`available`]) or an operand is out of bounds.
pub(crate) fn sgemm(
    c: &mut [f32],
    ldc: usize,
    accumulate: bool,
    a: Mat<'_, f32>,
    b: Mat<'_, f32>,
    (m, n, k): (usize, usize, usize),
    threads: usize,
) {
    assert!(available(), "sgemm: needs AVX-512F");
    assert!(
        m == 0 || n == 0 || ((m - 1) * ldc + n <= c.len() && n <= ldc),
        "sgemm: C out of bounds"
    );
    assert!(a.fits(m, k) && b.fits(k, n), "sgemm: operand out of bounds");
    if m == 0 || n == 0 {
        return;
    }
    let cp = CPtr(c.as_mut_ptr());
    // Split the rows of C into whole micro-tiles when there are enough, else the columns.
    // Columns when B is much larger than A (each thread then packs only its share of B).
    let by_rows = (n <= 4 * m && m >= threads * MR * 4) || n < threads * NR * 2;
    let (len, unit) = if by_rows { (m, MR) } else { (n, NR) };
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
        // touches; the bounds were asserted above; AVX-512F was checked by `available`.
        unsafe {
            if by_rows {
                let a = Mat {
                    data: &a.data[lo * a.rs..],
                    ..a
                };
                serial(
                    cp.get().add(lo * ldc),
                    ldc,
                    accumulate,
                    a,
                    b,
                    (hi - lo, n, k),
                );
            } else {
                let b = Mat {
                    data: &b.data[lo * b.cs..],
                    ..b
                };
                serial(cp.get().add(lo), ldc, accumulate, a, b, (m, hi - lo, k));
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
///
/// # Safety
/// `c` must address an `m x n` block with rows `ldc` apart that only this call writes; the
/// CPU must have AVX-512F.
#[target_feature(enable = "avx512f")]
unsafe fn serial(
    c: *mut f32,
    ldc: usize,
    accumulate: bool,
    a: Mat<'_, f32>,
    b: Mat<'_, f32>,
    (m, n, k): (usize, usize, usize),
) {
    PACK.with_borrow_mut(|(edge, bp)| {
        // Even blocks of whole panels: 576 columns are 2 x 288, not 384 + 192.
        let nblocks = n.div_ceil(NC);
        let nc_max = n.div_ceil(nblocks).div_ceil(NR) * NR;
        let kblocks = k.div_ceil(KC);
        let kc_max = k.div_ceil(kblocks);
        edge.resize(kc_max * MR, 0.0);
        bp.resize(kc_max * nc_max, 0.0);
        // Rows (or reduction steps) of A a multiple of 4 KiB apart share L1 sets: the `MR`
        // streams of a sliver would evict each other, so such slivers are copied first.
        let aliased = if a.cs == 1 { a.rs } else { a.cs } % 1024 == 0;
        let mut jc = 0;
        while jc < n {
            let nc = nc_max.min(n - jc);
            let mut pc = 0;
            while pc < k {
                let kc = kc_max.min(k - pc);
                pack_b(bp, b, pc, kc, jc, nc);
                let acc = accumulate || pc > 0;
                let mut ic = 0;
                while ic < m {
                    let mr = MR.min(m - ic);
                    // (pointer, row step, reduction step) of this sliver of A.
                    let (ap, a_rs, a_ps) = if mr == MR && !aliased {
                        (a.data[ic * a.rs + pc * a.cs..].as_ptr(), a.rs, a.cs)
                    } else {
                        copy_sliver(edge, a, (ic, mr), (pc, kc))
                    };
                    let mut jr = 0;
                    while jr < nc {
                        let nr = NR.min(nc - jr);
                        // SAFETY: rows ic..ic+MR and columns pc..pc+kc of A are in bounds
                        // (checked by `sgemm`, or the zero-padded copy); the tile (ic..ic+mr,
                        // jc+jr..jc+jr+nr) lies in C's block; the packed panel holds kc x NR.
                        unsafe {
                            // A panel of at most 16 columns (the LoRA rank-16 products) runs
                            // the one-register kernel: no multiply-adds on zero padding.
                            let kernel = if nr <= 16 { kernel::<1> } else { kernel::<2> };
                            kernel(
                                kc,
                                (ap, a_rs, a_ps),
                                bp.as_ptr().add(jr * kc),
                                c.add(ic * ldc + jc + jr),
                                ldc,
                                (mr, nr),
                                acc,
                            );
                        }
                        jr += NR;
                    }
                    ic += MR;
                }
                pc += kc;
            }
            jc += nc;
        }
    });
}

/// Copies rows `i0..i0+mr` and columns `p0..p0+kc` of A into `buf`, zero rows past `mr`; returns
/// the sliver as (pointer, row step, reduction step) for [`kernel`].
fn copy_sliver(
    buf: &mut [f32],
    a: Mat<'_, f32>,
    (i0, mr): (usize, usize),
    (p0, kc): (usize, usize),
) -> (*const f32, usize, usize) {
    let buf = &mut buf[..kc * MR];
    if mr < MR {
        buf.fill(0.0);
    }
    let at = |r: usize, p: usize| (i0 + r) * a.rs + (p0 + p) * a.cs;
    if a.cs == 1 {
        for r in 0..mr {
            buf[r * kc..(r + 1) * kc].copy_from_slice(&a.data[at(r, 0)..][..kc]);
        }
        (buf.as_ptr(), kc, 1)
    } else if a.rs == 1 {
        for p in 0..kc {
            buf[p * MR..p * MR + mr].copy_from_slice(&a.data[at(0, p)..][..mr]);
        }
        (buf.as_ptr(), 1, MR)
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
#[target_feature(enable = "avx512f")]
fn pack_b(dst: &mut [f32], b: Mat<'_, f32>, p0: usize, kc: usize, j0: usize, nc: usize) {
    #[cfg(target_arch = "x86_64")]
    use std::arch::x86_64::*;
    let mut jr = 0;
    while jr < nc {
        let nr = NR.min(nc - jr);
        let panel = &mut dst[jr * kc..(jr + NR) * kc];
        if nr < NR {
            panel.fill(0.0);
        }
        let src = |p: usize, j: usize| (p0 + p) * b.rs + (j0 + jr + j) * b.cs;
        if nr == NR && b.cs == 1 {
            // Rows of B are contiguous: two 16-wide copies per row.
            for p in 0..kc {
                let from = &b.data[src(p, 0)..][..NR];
                let to = &mut panel[p * NR..][..NR];
                // SAFETY: both slices hold NR = 32 values.
                unsafe {
                    _mm512_storeu_ps(to.as_mut_ptr(), _mm512_loadu_ps(from.as_ptr()));
                    _mm512_storeu_ps(
                        to.as_mut_ptr().add(16),
                        _mm512_loadu_ps(from.as_ptr().add(16)),
                    );
                }
            }
        } else if nr == NR && b.rs == 1 && b.cs * 16 < i32::MAX as usize {
            // Columns of B are contiguous (the weight in `x @ w^T`): gather 16 columns at a
            // time, each a run the source walks along.
            let first = &b.data[src(0, 0)..];
            let last = src(kc - 1, NR - 1) - src(0, 0);
            assert!(last < first.len(), "pack_b: B out of bounds");
            // SAFETY: every gathered index, (j * cs + p) for j < 32, p < kc, is at most `last`,
            // in bounds of `first` by the assert.
            unsafe {
                let idx = _mm512_mullo_epi32(
                    _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15),
                    _mm512_set1_epi32(b.cs as i32),
                );
                let base0 = first.as_ptr();
                let base1 = base0.add(16 * b.cs);
                let out = panel.as_mut_ptr();
                for p in 0..kc {
                    let v0 = _mm512_i32gather_ps::<4>(idx, base0.add(p));
                    let v1 = _mm512_i32gather_ps::<4>(idx, base1.add(p));
                    _mm512_storeu_ps(out.add(p * NR), v0);
                    _mm512_storeu_ps(out.add(p * NR + 16), v1);
                }
            }
        } else {
            for j in 0..nr {
                for p in 0..kc {
                    panel[p * NR + j] = b.data[src(p, j)];
                }
            }
        }
        jr += NR;
    }
}

/// One `MR x 16W` tile (`W` zmm registers per row, 1 or 2): `c[r][j] = [c[r][j] +]
/// sum_p a[r * a_rs + p * a_ps] * bp[p][j]`, stored for `r < mr`, `j < nr <= 16W`.
///
/// # Safety
/// `a` addresses `MR` rows of `kc` values with the given steps, `bp` holds `kc * NR` values;
/// `c` addresses `mr` rows of `nr` values, `ldc` apart; the CPU has AVX-512F.
#[allow(clippy::too_many_arguments)]
#[target_feature(enable = "avx512f")]
unsafe fn kernel<const W: usize>(
    kc: usize,
    (a, a_rs, a_ps): (*const f32, usize, usize),
    bp: *const f32,
    c: *mut f32,
    ldc: usize,
    (mr, nr): (usize, usize),
    accumulate: bool,
) {
    #[cfg(target_arch = "x86_64")]
    // SAFETY: the caller's contract covers every pointer offset below.
    unsafe {
        use std::arch::x86_64::*;
        let mut c0 = [_mm512_setzero_ps(); MR];
        let mut c1 = [_mm512_setzero_ps(); MR];
        let rows: [*const f32; MR] = std::array::from_fn(|r| a.add(r * a_rs));
        let mut b = bp;
        let mut p = 0;
        while p < kc {
            let b0 = _mm512_loadu_ps(b);
            let off = p * a_ps;
            if W == 2 {
                let b1 = _mm512_loadu_ps(b.add(16));
                for r in 0..MR {
                    let ar = _mm512_set1_ps(*rows[r].add(off));
                    c0[r] = _mm512_fmadd_ps(ar, b0, c0[r]);
                    c1[r] = _mm512_fmadd_ps(ar, b1, c1[r]);
                }
            } else {
                for r in 0..MR {
                    c0[r] = _mm512_fmadd_ps(_mm512_set1_ps(*rows[r].add(off)), b0, c0[r]);
                }
            }
            b = b.add(NR);
            p += 1;
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
            // With `nr <= 16` the second half lies past the row (past the end of `c` on the
            // last row) and `m1` is 0: the masked load and store touch no memory there, but
            // `add` would still be UB for a pointer beyond one-past-the-end, so the address is
            // formed with `wrapping_add` and never dereferenced unmasked.
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

#[cfg(test)]
mod tests {
    use super::*;

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

    /// Runs `sgemm` on one case and compares every element of C with an f64 product, within
    /// f32 rounding of the sum of |a||b| terms.
    #[allow(clippy::too_many_arguments)]
    fn check(
        (m, n, k): (usize, usize, usize),
        (a_t, lda): (bool, usize),
        (b_t, ldb): (bool, usize),
        ldc: usize,
        accumulate: bool,
        threads: usize,
    ) {
        let (ad, ars, acs) = matrix(m, k, a_t, lda, 1);
        let (bd, brs, bcs) = matrix(k, n, b_t, ldb, 2);
        let (c0, _, _) = matrix(m, ldc, false, ldc, 3);
        let mut c = c0.clone();
        let a = Mat {
            data: &ad,
            rs: ars,
            cs: acs,
        };
        let b = Mat {
            data: &bd,
            rs: brs,
            cs: bcs,
        };
        sgemm(&mut c, ldc, accumulate, a, b, (m, n, k), threads);
        for i in 0..m {
            for j in 0..ldc {
                let got = c[i * ldc + j] as f64;
                if j >= n {
                    assert_eq!(got, c0[i * ldc + j] as f64, "wrote past n at ({i}, {j})");
                    continue;
                }
                let (mut want, mut mag) = (0f64, 0f64);
                for p in 0..k {
                    let t = ad[i * ars + p * acs] as f64 * bd[p * brs + j * bcs] as f64;
                    want += t;
                    mag += t.abs();
                }
                if accumulate {
                    want += c0[i * ldc + j] as f64;
                    mag += (c0[i * ldc + j] as f64).abs();
                }
                assert!(
                    (got - want).abs() <= 4e-7 * mag + 1e-30,
                    "({m}, {n}, {k}) a_t {a_t} b_t {b_t} acc {accumulate} threads {threads}: \
                     c[{i}][{j}] = {got}, want {want}"
                );
            }
        }
    }

    #[test]
    fn matches_f64_products_across_shapes_layouts_and_threads() {
        if !available() {
            println!("skipped: this CPU has no AVX-512F, so sgemm never runs here");
            return;
        }
        // Edges in every dimension: partial tiles of rows (MR = 12) and columns (NR = 32),
        // several KC and NC blocks, a single row tile, a long thin product, and narrow ones
        // (16 and 9 columns: the one-register kernel).
        let shapes = [
            (100, 70, 50),
            (12, 32, 16),
            (37, 400, 800),
            (130, 33, 385),
            (25, 800, 7),
            (61, 16, 500),
            (30, 9, 40),
        ];
        for (m, n, k) in shapes {
            for (a_t, b_t) in [(false, false), (false, true), (true, false), (true, true)] {
                for threads in [1, 2, 3] {
                    let lda = if a_t { m + 3 } else { k + 1 };
                    let ldb = if b_t { k } else { n + 5 };
                    check(
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

    #[test]
    fn rows_4_kib_apart_take_the_copied_path() {
        if !available() {
            println!("skipped: this CPU has no AVX-512F, so sgemm never runs here");
            return;
        }
        // lda = 1024 floats: the rows of a sliver alias in L1 and are copied before the kernel.
        check((50, 96, 300), (false, 1024), (false, 96), 96, false, 2);
        check((50, 96, 300), (true, 1024), (true, 1024), 96, true, 1);
    }
}
