//! Causal, document-masked, grouped-query attention, flash-attention style: no (T, S) score
//! matrix, only (query block x key tile) scores at a time, an online softmax in the forward and
//! a recomputation from the per-row logsumexp in the backward.
//!
//! q, o: (B, T, NH, D), k, v: (B, S, NKV, D), lse: (B, T, NH), all contiguous.
//! Query i sits at key position p = i + S - T and attends to keys j in its window [lo(p), p]
//! (and, when a row's segment ids are not contiguous runs, only to keys with its segment id).

use std::collections::HashMap;
use std::collections::hash_map::Entry;

use rayon::prelude::*;

use super::{Float, dot, max, multiversion, scal, sum, threads};

/// Query positions per task (all NH heads of each).
const QB: usize = 16;
/// Keys per tile.
const KT: usize = 64;

#[derive(Clone, Copy, Debug)]
pub(crate) struct Dims {
    pub b: usize,
    pub t: usize,
    pub s: usize,
    pub nh: usize,
    pub nkv: usize,
    pub d: usize,
}

impl Dims {
    fn rep(&self) -> usize {
        self.nh / self.nkv
    }
    fn off(&self) -> usize {
        self.s - self.t
    }
}

/// The keys each position may attend to, precomputed from the (B, S) segment ids.
pub(crate) struct Windows {
    s: usize,
    seg: Vec<u32>,
    /// (B, S): first key a position may attend to.
    lo: Vec<usize>,
    /// (B): every segment id of the row forms one run, so the window is exactly [lo, p]
    /// (the fast path: no per-key test).
    runs: Vec<bool>,
}

impl Windows {
    /// seg: (B, S) row-major; `window`: at most that many latest keys (sliding window).
    pub(crate) fn new(seg: &[u32], b: usize, s: usize, window: Option<usize>) -> Self {
        let mut lo = vec![0; b * s];
        let mut runs = vec![true; b];
        for bi in 0..b {
            let row = &seg[bi * s..(bi + 1) * s];
            let lo = &mut lo[bi * s..(bi + 1) * s];
            let mut first: HashMap<u32, usize> = HashMap::new();
            for p in 0..s {
                let start = p == 0 || row[p] != row[p - 1];
                if start {
                    match first.entry(row[p]) {
                        Entry::Occupied(_) => runs[bi] = false,
                        Entry::Vacant(e) => {
                            e.insert(p);
                        }
                    }
                }
                lo[p] = if start { p } else { lo[p - 1] };
            }
            if !runs[bi] {
                // A reused id: the window starts at the id's first occurrence and keys of
                // other segments inside it are masked one by one.
                for p in 0..s {
                    lo[p] = first[&row[p]];
                }
            }
            if let Some(w) = window {
                for (p, lo) in lo.iter_mut().enumerate() {
                    *lo = (*lo).max((p + 1).saturating_sub(w));
                }
            }
        }
        Self {
            s,
            seg: seg.to_vec(),
            lo,
            runs,
        }
    }

    #[inline(always)]
    fn lo(&self, bi: usize, p: usize) -> usize {
        self.lo[bi * self.s + p]
    }

    /// Masks (sets to -inf) the scores of keys js + a .. js + e that row (bi, p) may not see.
    #[inline(always)]
    fn mask<T: Float>(&self, bi: usize, p: usize, js: usize, sc: &mut [T], a: usize, e: usize) {
        if self.runs[bi] {
            return;
        }
        let row = &self.seg[bi * self.s..(bi + 1) * self.s];
        for jj in a..e {
            if row[js + jj] != row[p] {
                sc[jj] = T::NEG_INF;
            }
        }
    }

    /// The range [a, e) of tile [js, js + n) inside the window of (bi, p), if not empty.
    #[inline(always)]
    fn overlap(&self, bi: usize, p: usize, js: usize, n: usize) -> Option<(usize, usize)> {
        let lo = self.lo(bi, p);
        (js <= p && js + n > lo).then(|| (lo.max(js) - js, (p + 1).min(js + n) - js))
    }
}

/// k (B, S, NKV, D) transposed to (B, NKV, D, S), once per call: the score products read key
/// tiles as (D x n) blocks of it, rows S apart.
fn transpose_keys<T: Float>(k: &[T], dm: Dims) -> Vec<T> {
    let Dims { s, nkv, d, .. } = dm;
    let mut kt = vec![T::ZERO; k.len()];
    kt.par_chunks_mut(d * s).enumerate().for_each(|(bg, out)| {
        let (bi, g) = (bg / nkv, bg % nkv);
        for j in 0..s {
            let row = &k[((bi * s + j) * nkv + g) * d..][..d];
            for (dd, x) in row.iter().enumerate() {
                out[dd * s + j] = *x;
            }
        }
    });
    kt
}

/// The query rows of kv head g at `np` consecutive positions, position-major: (row of the
/// gathered (np * rep, D) block, row of the (np, NH, D) layout from the first position).
fn group_rows(np: usize, dm: Dims, g: usize) -> impl Iterator<Item = (usize, usize)> {
    let (rep, nh) = (dm.rep(), dm.nh);
    (0..np * rep).map(move |row| (row, row / rep * nh + g * rep + row % rep))
}

/// `dst = src * a`.
#[inline(always)]
fn scaled_copy<T: Float>(dst: &mut [T], src: &[T], a: T) {
    for (x, y) in dst.iter_mut().zip(src) {
        *x = *y * a;
    }
}

/// Columns of scores to compute for the tile of n keys at js (of s): the whole tile where the
/// keys exist, since a full-width product is faster than a partial one; the columns past n
/// are never read.
#[inline(always)]
fn width(js: usize, n: usize, s: usize) -> usize {
    if js + KT <= s { KT } else { n }
}

/// `y[r * ldy + c] += sum_i w[r * wrs + i * wcs] * src[base + i * stride + c]` for `r < rows`,
/// `c < cols`, `i < kd`: the small matrix products of a (query block x key tile). An `RB x C`
/// tile of y stays in registers while the rows of src stream past, so each load of src feeds
/// `RB` multiply-adds. With AVX-512 (`WIDE`) 4 x 64 f32: 16 of its 32 zmm registers
/// accumulate. With AVX2 6 x 16 (12 of its 16 ymm), then 2 x 32 for leftover rows. Once the
/// multiply-adds were fused (`FMA`), 6 x 16 measured fastest on AVX2: forward + backward
/// 13.8-14.5 ms against 16.5-17.7 for the 4 x 32 that had won without fusion (which fills all
/// 16 ymm with accumulators), 14.0 for 5 x 16, 14.5 for 2 x 32, 16.8 for 7 x 16 and 18.5 for
/// 3 x 32 (`WHET_CPU=avx2 cargo bench -p whet-benches --bench kernels -- attention/fast`,
/// 2026-12-05, Zen 4).
#[allow(clippy::too_many_arguments)]
#[inline(always)]
fn mm<T: Float, const WIDE: bool, const FMA: bool>(
    y: &mut [T],
    (ldy, rows, cols): (usize, usize, usize),
    w: &[T],
    (wrs, wcs): (usize, usize),
    kd: usize,
    src: &[T],
    (base, stride): (usize, usize),
) {
    let mut r0 = 0;
    let args = Mm {
        ldy,
        cols,
        wrs,
        wcs,
        kd,
        base,
        stride,
    };
    if WIDE {
        while r0 + 4 <= rows {
            mm_rows::<T, 4, WIDE, FMA>(y, w, src, args, r0);
            r0 += 4;
        }
    } else {
        while r0 + 6 <= rows {
            mm_rows::<T, 6, WIDE, FMA>(y, w, src, args, r0);
            r0 += 6;
        }
        while r0 + 2 <= rows {
            mm_rows::<T, 2, WIDE, FMA>(y, w, src, args, r0);
            r0 += 2;
        }
    }
    while r0 < rows {
        mm_rows::<T, 1, WIDE, FMA>(y, w, src, args, r0);
        r0 += 1;
    }
}

/// The strides and sizes of one [`mm`] call.
#[derive(Clone, Copy)]
struct Mm {
    ldy: usize,
    cols: usize,
    wrs: usize,
    wcs: usize,
    kd: usize,
    base: usize,
    stride: usize,
}

/// Rows `r0 .. r0 + RB` of [`mm`].
#[inline(always)]
fn mm_rows<T: Float, const RB: usize, const WIDE: bool, const FMA: bool>(
    y: &mut [T],
    w: &[T],
    src: &[T],
    a: Mm,
    r0: usize,
) {
    let mut c0 = 0;
    if WIDE {
        c0 = mm_tile::<T, RB, 64, FMA>(y, w, src, a, r0, c0);
        c0 = mm_tile::<T, RB, 16, FMA>(y, w, src, a, r0, c0);
    } else if RB > 2 {
        c0 = mm_tile::<T, RB, 16, FMA>(y, w, src, a, r0, c0);
        c0 = mm_tile::<T, RB, 8, FMA>(y, w, src, a, r0, c0);
    } else {
        c0 = mm_tile::<T, RB, 32, FMA>(y, w, src, a, r0, c0);
        c0 = mm_tile::<T, RB, 8, FMA>(y, w, src, a, r0, c0);
    }
    for c in c0..a.cols {
        for r in r0..r0 + RB {
            let mut acc = y[r * a.ldy + c];
            for i in 0..a.kd {
                acc = madd::<T, FMA>(
                    w[r * a.wrs + i * a.wcs],
                    src[a.base + i * a.stride + c],
                    acc,
                );
            }
            y[r * a.ldy + c] = acc;
        }
    }
}

/// `a * b + c`, fused when `FMA` (the build has the instruction).
#[inline(always)]
fn madd<T: Float, const FMA: bool>(a: T, b: T, c: T) -> T {
    if FMA { a.mul_add(b, c) } else { c + a * b }
}

/// Columns `c0 ..` of rows `r0 .. r0 + RB` in whole chunks of `C`; returns where it stopped.
#[inline(always)]
fn mm_tile<T: Float, const RB: usize, const C: usize, const FMA: bool>(
    y: &mut [T],
    w: &[T],
    src: &[T],
    a: Mm,
    r0: usize,
    mut c0: usize,
) -> usize {
    while c0 + C <= a.cols {
        let mut acc = [[T::ZERO; C]; RB];
        for (r, acc) in acc.iter_mut().enumerate() {
            acc.copy_from_slice(&y[(r0 + r) * a.ldy + c0..][..C]);
        }
        for i in 0..a.kd {
            let s: [T; C] = src[a.base + i * a.stride + c0..][..C]
                .try_into()
                .expect("chunk");
            for (r, acc) in acc.iter_mut().enumerate() {
                let wi = w[(r0 + r) * a.wrs + i * a.wcs];
                for l in 0..C {
                    acc[l] = madd::<T, FMA>(wi, s[l], acc[l]);
                }
            }
        }
        for (r, acc) in acc.iter().enumerate() {
            y[(r0 + r) * a.ldy + c0..][..C].copy_from_slice(acc);
        }
        c0 += C;
    }
    c0
}

/// Turns a row of scores `sc[0..n]` into probabilities `exp(sc - m)` inside the window
/// `[a, e)` and zeros outside it; returns their sum.
#[inline(always)]
fn exp_window<T: Float, const FMA: bool>(sc: &mut [T], (a, e): (usize, usize), m: T) -> T {
    // No running sum in this loop: an in-order float sum would keep it from vectorising.
    for x in &mut sc[a..e] {
        *x = (*x - m).exp_with::<FMA>();
    }
    sc[..a].fill(T::ZERO);
    sc[e..].fill(T::ZERO);
    sum(&sc[a..e])
}

/// -> (o (B, T, NH, D), lse (B, T, NH)).
pub(crate) fn fwd<T: Float>(
    q: &[T],
    k: &[T],
    v: &[T],
    win: &Windows,
    dm: Dims,
    scale: T,
) -> (Vec<T>, Vec<T>) {
    let Dims { b, t, nh, d, .. } = dm;
    let mut o = vec![T::ZERO; b * t * nh * d];
    let mut lse = vec![T::ZERO; b * t * nh];
    if o.is_empty() {
        return (o, lse);
    }
    let kt = transpose_keys(k, dm);
    o.par_chunks_mut(t * nh * d)
        .zip(lse.par_chunks_mut(t * nh))
        .enumerate()
        .for_each(|(bi, (ob, lb))| {
            ob.par_chunks_mut(QB * nh * d)
                .zip(lb.par_chunks_mut(QB * nh))
                .enumerate()
                .for_each(|(blk, (o, l))| fwd_block(q, &kt, v, win, dm, scale, bi, blk * QB, o, l));
        });
    (o, lse)
}

multiversion! {
    #[allow(clippy::too_many_arguments)]
    fn fwd_block<T: Float, const WIDE: bool, const FMA: bool>(
        q: &[T], kt: &[T], v: &[T], win: &Windows, dm: Dims, scale: T, bi: usize, i0: usize, o: &mut [T], lse: &mut [T],
    ) = fwd_block_impl;
}

/// Queries i0 .. i0 + nq of batch row bi, all heads. kt: k as (B, NKV, D, S) (see
/// [`transpose_keys`]); o: (nq, NH, D), lse: (nq, NH).
///
/// Per kv head g, the block's R = nq * rep query rows of group g are gathered (R, D); per key
/// tile, S = Q K^T (R x n) is one small product, each row gets its window, online-softmax
/// update and probabilities P, and the output accumulates P V (R x D), another small product.
#[allow(clippy::too_many_arguments)]
#[inline(always)]
fn fwd_block_impl<T: Float, const WIDE: bool, const FMA: bool>(
    q: &[T],
    kt: &[T],
    v: &[T],
    win: &Windows,
    dm: Dims,
    scale: T,
    bi: usize,
    i0: usize,
    o: &mut [T],
    lse: &mut [T],
) {
    let Dims {
        t, s, nh, nkv, d, ..
    } = dm;
    let (rep, off) = (dm.rep(), dm.off());
    let nq = lse.len() / nh;
    let nr = nq * rep;
    let mut qg = vec![T::ZERO; nr * d]; // scaled q rows of group g: row ii * rep + r
    let mut acc = vec![T::ZERO; nr * d];
    let mut m = vec![T::NEG_INF; nr];
    let mut den = vec![T::ZERO; nr];
    let mut sc = vec![T::ZERO; nr * KT]; // scores, then probabilities
    let p_last = off + i0 + nq - 1;
    let klo = (0..nq)
        .map(|ii| win.lo(bi, off + i0 + ii))
        .min()
        .unwrap_or(0);
    for g in 0..nkv {
        for (row, h) in group_rows(nq, dm, g) {
            let grow = (bi * t + i0) * nh + h;
            scaled_copy(&mut qg[row * d..][..d], &q[grow * d..][..d], scale);
        }
        acc.fill(T::ZERO);
        m.fill(T::NEG_INF);
        den.fill(T::ZERO);
        let mut js = klo;
        while js <= p_last {
            let n = KT.min(p_last + 1 - js);
            sc.fill(T::ZERO);
            let kb = (bi * nkv + g) * d * s + js;
            mm::<T, WIDE, FMA>(
                &mut sc,
                (KT, nr, width(js, n, s)),
                &qg,
                (d, 1),
                d,
                kt,
                (kb, s),
            );
            for ii in 0..nq {
                let p = off + i0 + ii;
                let window = win.overlap(bi, p, js, n);
                for r in 0..rep {
                    let row = ii * rep + r;
                    let sr = &mut sc[row * KT..row * KT + n];
                    let Some((a, e)) = window else {
                        sr.fill(T::ZERO);
                        continue;
                    };
                    win.mask(bi, p, js, sr, a, e);
                    let mt = max(&sr[a..e]);
                    if mt == T::NEG_INF {
                        sr.fill(T::ZERO);
                        continue;
                    }
                    if mt > m[row] {
                        let corr = (m[row] - mt).exp();
                        den[row] *= corr;
                        scal(&mut acc[row * d..(row + 1) * d], corr);
                        m[row] = mt;
                    }
                    den[row] += exp_window::<T, FMA>(sr, (a, e), m[row]);
                }
            }
            // acc += P (R x n) @ V[js .. js + n] (n x D, rows NKV * D apart)
            let vb = ((bi * s + js) * nkv + g) * d;
            mm::<T, WIDE, FMA>(&mut acc, (d, nr, d), &sc, (KT, 1), n, v, (vb, nkv * d));
            js += n;
        }
        for (row, h) in group_rows(nq, dm, g) {
            scaled_copy(
                &mut o[h * d..][..d],
                &acc[row * d..][..d],
                T::ONE / den[row],
            );
            lse[h] = m[row] + den[row].ln();
        }
    }
}

/// One backward task's partial key gradients: rows klo .. klo + n of batch row bi.
struct KeyPart<T> {
    bi: usize,
    klo: usize,
    dk: Vec<T>, // (n, NKV, D)
    dv: Vec<T>,
}

/// -> (dq (B, T, NH, D), dk (B, S, NKV, D), dv (B, S, NKV, D)).
#[allow(clippy::too_many_arguments)]
pub(crate) fn bwd<T: Float>(
    q: &[T],
    k: &[T],
    v: &[T],
    o: &[T],
    dout: &[T],
    lse: &[T],
    win: &Windows,
    dm: Dims,
    scale: T,
) -> (Vec<T>, Vec<T>, Vec<T>) {
    let Dims {
        b,
        t,
        s,
        nh,
        nkv,
        d,
    } = dm;
    let mut dq = vec![T::ZERO; b * t * nh * d];
    let mut dk = vec![T::ZERO; b * s * nkv * d];
    let mut dv = vec![T::ZERO; b * s * nkv * d];
    if dq.is_empty() || dk.is_empty() {
        return (dq, dk, dv);
    }
    // Each task owns the dq rows of a chunk of queries and returns partial dk/dv for the keys
    // the chunk sees; the partials are summed afterwards. Chunks: enough tasks for the threads,
    // but few enough that the partials stay small.
    let (kt, vt) = (transpose_keys(k, dm), transpose_keys(v, dm));
    let (kt, vt) = (kt.as_slice(), vt.as_slice());
    let nch = (2 * threads()).div_ceil(b).clamp(1, t.div_ceil(QB).min(16));
    let cl = t.div_ceil(nch).div_ceil(QB) * QB;
    let parts: Vec<KeyPart<T>> = dq
        .par_chunks_mut(t * nh * d)
        .enumerate()
        .flat_map(|(bi, dqb)| {
            dqb.par_chunks_mut(cl * nh * d)
                .enumerate()
                .map(move |(c, dqc)| {
                    let kv = (k, kt, vt);
                    bwd_chunk(q, kv, o, dout, lse, win, dm, scale, bi, c * cl, dqc)
                })
        })
        .collect();
    // dk/dv: each task sums, for a block of key rows, the partials that cover it.
    let rb = 64;
    let row = nkv * d;
    dk.par_chunks_mut(s * row)
        .zip(dv.par_chunks_mut(s * row))
        .enumerate()
        .for_each(|(bi, (dkb, dvb))| {
            dkb.par_chunks_mut(rb * row)
                .zip(dvb.par_chunks_mut(rb * row))
                .enumerate()
                .for_each(|(blk, (dkc, dvc))| {
                    let (r0, r1) = (blk * rb, blk * rb + dkc.len() / row);
                    for part in parts.iter().filter(|p| p.bi == bi) {
                        let (a, e) = (r0.max(part.klo), r1.min(part.klo + part.dk.len() / row));
                        if a >= e {
                            continue;
                        }
                        let src = (a - part.klo) * row..(e - part.klo) * row;
                        let dst = (a - r0) * row..(e - r0) * row;
                        for (x, y) in dkc[dst.clone()].iter_mut().zip(&part.dk[src.clone()]) {
                            *x += *y;
                        }
                        for (x, y) in dvc[dst].iter_mut().zip(&part.dv[src]) {
                            *x += *y;
                        }
                    }
                });
        });
    (dq, dk, dv)
}

multiversion! {
    #[allow(clippy::too_many_arguments)]
    fn bwd_chunk<T: Float, const WIDE: bool, const FMA: bool>(
        q: &[T], kv: (&[T], &[T], &[T]), o: &[T], dout: &[T], lse: &[T], win: &Windows, dm: Dims, scale: T, bi: usize, c0: usize,
        dq: &mut [T],
    ) -> KeyPart<T> = bwd_chunk_impl;
}

/// Queries c0 .. c0 + nq of batch row bi: fills dq (nq, NH, D), returns the partial dk/dv.
/// kt, vt: k and v as (B, NKV, D, S) (see [`transpose_keys`]).
///
/// Per query block and kv head g, the block's R = qn * rep rows of group g are gathered; per
/// key tile, five small products: S = Q K^T and dP = dO V^T (R x n), then, with
/// P = exp(S - lse) and dS = P (dP - delta) row by row, dQ += dS K, dV += P^T dO and
/// dK += dS^T Q.
#[allow(clippy::too_many_arguments)]
#[inline(always)]
fn bwd_chunk_impl<T: Float, const WIDE: bool, const FMA: bool>(
    q: &[T],
    (k, kt, vt): (&[T], &[T], &[T]),
    o: &[T],
    dout: &[T],
    lse: &[T],
    win: &Windows,
    dm: Dims,
    scale: T,
    bi: usize,
    c0: usize,
    dq: &mut [T],
) -> KeyPart<T> {
    let Dims {
        t, s, nh, nkv, d, ..
    } = dm;
    let (rep, off) = (dm.rep(), dm.off());
    let nq = dq.len() / (nh * d);
    let base = (bi * t + c0) * nh; // global (B, T, NH) row of the chunk's first row
    let p_last = off + c0 + nq - 1;
    let klo = (0..nq)
        .map(|ii| win.lo(bi, off + c0 + ii))
        .min()
        .unwrap_or(0);
    let nk = p_last + 1 - klo;
    let kvrow = nkv * d;
    let mut dk = vec![T::ZERO; nk * kvrow];
    let mut dv = vec![T::ZERO; nk * kvrow];
    let rmax = QB * rep;
    // Group-g rows of the current query block, gathered contiguous: (R, D) each.
    let mut qg = vec![T::ZERO; rmax * d]; // scaled q
    let mut dog = vec![T::ZERO; rmax * d];
    let mut dqg = vec![T::ZERO; rmax * d];
    let mut lg = vec![T::ZERO; rmax]; // lse
    let mut delta = vec![T::ZERO; rmax]; // rowsum(dO * O)
    let mut pr = vec![T::ZERO; rmax * KT]; // scores, then probabilities: (R, KT)
    let mut ds = vec![T::ZERO; rmax * KT]; // dP, then dS: (R, KT)
    for qb0 in (0..nq).step_by(QB) {
        let qn = QB.min(nq - qb0);
        let nr = qn * rep;
        let pb_last = off + c0 + qb0 + qn - 1;
        let kl = (0..qn)
            .map(|ii| win.lo(bi, off + c0 + qb0 + ii))
            .min()
            .unwrap_or(0);
        for g in 0..nkv {
            for (row, h) in group_rows(qn, dm, g) {
                let grow = base + qb0 * nh + h;
                let (gq, gd) = (&q[grow * d..][..d], &dout[grow * d..][..d]);
                scaled_copy(&mut qg[row * d..][..d], gq, scale);
                dog[row * d..][..d].copy_from_slice(gd);
                lg[row] = lse[grow];
                delta[row] = dot(gd, &o[grow * d..][..d]);
            }
            dqg[..nr * d].fill(T::ZERO);
            let mut js = kl;
            while js <= pb_last {
                let n = KT.min(pb_last + 1 - js);
                pr[..nr * KT].fill(T::ZERO);
                ds[..nr * KT].fill(T::ZERO);
                let tb = (bi * nkv + g) * d * s + js;
                let w = width(js, n, s);
                mm::<T, WIDE, FMA>(&mut pr, (KT, nr, w), &qg, (d, 1), d, kt, (tb, s));
                mm::<T, WIDE, FMA>(&mut ds, (KT, nr, w), &dog, (d, 1), d, vt, (tb, s));
                for ii in 0..qn {
                    let p = off + c0 + qb0 + ii;
                    let window = win.overlap(bi, p, js, n);
                    for r in 0..rep {
                        let row = ii * rep + r;
                        let (pr, ds) = (
                            &mut pr[row * KT..row * KT + n],
                            &mut ds[row * KT..row * KT + n],
                        );
                        let Some((a, e)) = window else {
                            pr.fill(T::ZERO);
                            ds.fill(T::ZERO);
                            continue;
                        };
                        win.mask(bi, p, js, pr, a, e);
                        exp_window::<T, FMA>(pr, (a, e), lg[row]);
                        let dl = delta[row];
                        for (p, ds) in pr.iter().zip(ds.iter_mut()) {
                            *ds = *p * (*ds - dl);
                        }
                    }
                }
                // dQ (R x D) += dS (R x n) @ K[js .. js + n]
                let kb = ((bi * s + js) * nkv + g) * d;
                mm::<T, WIDE, FMA>(&mut dqg, (d, nr, d), &ds, (KT, 1), n, k, (kb, kvrow));
                // dV, dK (n x D, rows NKV * D apart) += P^T, dS^T (n x R) @ dO, Q (R x D)
                let y0 = (js - klo) * kvrow + g * d;
                mm::<T, WIDE, FMA>(&mut dv[y0..], (kvrow, n, d), &pr, (1, KT), nr, &dog, (0, d));
                mm::<T, WIDE, FMA>(&mut dk[y0..], (kvrow, n, d), &ds, (1, KT), nr, &qg, (0, d));
                js += n;
            }
            for (row, h) in group_rows(qn, dm, g) {
                let lrow = qb0 * nh + h;
                scaled_copy(&mut dq[lrow * d..][..d], &dqg[row * d..][..d], scale);
            }
        }
    }
    KeyPart { bi, klo, dk, dv }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The SIMD builds the dispatcher picks and the baseline build of the same kernels agree
    /// (the integration tests only see the dispatched one).
    #[test]
    fn dispatched_and_baseline_kernels_agree() {
        let dm = Dims {
            b: 1,
            t: 40,
            s: 70,
            nh: 4,
            nkv: 2,
            d: 24,
        };
        let seg: Vec<u32> = (0..70).map(|j| (j / 30) as u32).collect();
        let win = Windows::new(&seg, 1, 70, None);
        let f = |n: usize, k: usize| -> Vec<f64> {
            (0..n)
                .map(|i| ((i * 7 + k * 13) % 17) as f64 / 8.0 - 1.0)
                .collect()
        };
        let (q, k, v) = (f(40 * 4 * 24, 1), f(70 * 2 * 24, 2), f(70 * 2 * 24, 3));
        let (mut o1, mut l1) = (vec![0.0; 16 * 4 * 24], vec![0.0; 16 * 4]);
        let (kt, vt) = (transpose_keys(&k, dm), transpose_keys(&v, dm));
        fwd_block(&q, &kt, &v, &win, dm, 0.3, 0, 16, &mut o1, &mut l1);
        let close = |a: &[f64], b: &[f64]| {
            a.iter()
                .zip(b)
                .all(|(x, y)| (x - y).abs() <= 1e-12 * (1.0 + y.abs()))
        };
        let (o, lse) = fwd(&q, &k, &v, &win, dm, 0.3);
        let dout = f(o.len(), 4);
        let mut dq1 = vec![0.0; 20 * 4 * 24];
        let kv = (k.as_slice(), kt.as_slice(), vt.as_slice());
        let p1 = bwd_chunk(&q, kv, &o, &dout, &lse, &win, dm, 0.3, 0, 20, &mut dq1);
        assert!(dq1.iter().any(|x| *x != 0.0) && p1.dk.iter().any(|x| *x != 0.0));
        // Both register tilings (AVX-512's and AVX2's), with and without fused multiply-adds,
        // built for the baseline.
        for (wide, fma) in [(true, true), (false, true), (false, false)] {
            let (mut o2, mut l2) = (vec![0.0; 16 * 4 * 24], vec![0.0; 16 * 4]);
            let mut dq2 = vec![0.0; 20 * 4 * 24];
            macro_rules! run {
                ($wide:literal, $fma:literal) => {{
                    fwd_block_impl::<f64, $wide, $fma>(
                        &q, &kt, &v, &win, dm, 0.3, 0, 16, &mut o2, &mut l2,
                    );
                    bwd_chunk_impl::<f64, $wide, $fma>(
                        &q, kv, &o, &dout, &lse, &win, dm, 0.3, 0, 20, &mut dq2,
                    )
                }};
            }
            let p2 = match (wide, fma) {
                (true, _) => run!(true, true),
                (false, true) => run!(false, true),
                (false, false) => run!(false, false),
            };
            assert!(close(&o1, &o2) && close(&l1, &l2), "wide {wide} fma {fma}");
            assert!(
                close(&dq1, &dq2) && close(&p1.dk, &p2.dk) && close(&p1.dv, &p2.dv),
                "wide {wide} fma {fma}"
            );
        }
    }
}
