//! LM head fused with cross entropy, `chunk` rows at a time: only a (chunk, V) block of logits
//! exists at any moment. h: (N, H) contiguous, w: (V, H) with any strides, targets: (N) i64.

use rayon::prelude::*;

use super::cross_entropy::{ROWS_PER_TASK, row_grad_in_place, rows_fwd};
use super::{Float, Mat, gemm};
use crate::IGNORE_INDEX;

/// Sizes and the weight's element strides (`w[v * stride[0] + i * stride[1]]`).
#[derive(Clone, Copy)]
pub(crate) struct Dims {
    pub n: usize,
    pub h: usize,
    pub v: usize,
    pub chunk: usize,
    pub w_stride: [usize; 2],
}

impl Dims {
    /// The chunks [r0, r1) that hold at least one supervised row; the others need no logits.
    fn chunks<'a>(&self, targets: &'a [i64]) -> impl Iterator<Item = (usize, usize)> + 'a {
        let (n, chunk) = (self.n, self.chunk.max(1));
        (0..n)
            .step_by(chunk)
            .map(move |r0| (r0, (r0 + chunk).min(n)))
            .filter(move |&(r0, r1)| targets[r0..r1].iter().any(|&t| t != IGNORE_INDEX))
    }

    /// logits (c, V) = h[r0..r1] @ w^T into `buf`.
    fn logits<'b, T: Float>(&self, buf: &'b mut [T], h: &[T], w: &[T], r0: usize, r1: usize) -> &'b mut [T] {
        let (hd, v) = (self.h, self.v);
        let c = r1 - r0;
        let out = &mut buf[..c * v];
        let wt = Mat { data: w, rs: self.w_stride[1], cs: self.w_stride[0] }; // (H, V)
        gemm(out, false, Mat::row_major(&h[r0 * hd..r1 * hd], hd), wt, c, v, hd);
        out
    }
}

/// -> (sum of losses, per-row lse (0 for ignored rows)). Targets must be checked.
pub(crate) fn fwd<T: Float>(h: &[T], w: &[T], targets: &[i64], dm: Dims) -> (f64, Vec<T>) {
    let mut lse = vec![T::ZERO; dm.n];
    if dm.v == 0 || dm.n == 0 {
        return (0.0, lse);
    }
    let mut buf = vec![T::ZERO; dm.chunk.min(dm.n) * dm.v];
    let mut loss = 0f64;
    for (r0, r1) in dm.chunks(targets) {
        let logits = dm.logits(&mut buf, h, w, r0, r1);
        loss += lse[r0..r1]
            .par_chunks_mut(ROWS_PER_TASK)
            .zip(logits.par_chunks(ROWS_PER_TASK * dm.v).zip(targets[r0..r1].par_chunks(ROWS_PER_TASK)))
            .map(|(lse, (x, t))| rows_fwd(x, t, dm.v, lse))
            .sum::<f64>();
    }
    (loss, lse)
}

/// -> (dh (N, H) if `need_dh`, dw (V, H) if `need_dw`), for the loss scaled by `g`.
#[allow(clippy::too_many_arguments)]
pub(crate) fn bwd<T: Float>(
    h: &[T],
    w: &[T],
    targets: &[i64],
    lse: &[T],
    g: T,
    dm: Dims,
    need_dh: bool,
    need_dw: bool,
) -> (Option<Vec<T>>, Option<Vec<T>>) {
    let Dims { n, h: hd, v, .. } = dm;
    let mut dh = need_dh.then(|| vec![T::ZERO; n * hd]);
    let mut dw = need_dw.then(|| vec![T::ZERO; v * hd]);
    if v == 0 || n == 0 || !(need_dh || need_dw) {
        return (dh, dw);
    }
    let mut buf = vec![T::ZERO; dm.chunk.min(n) * v];
    for (r0, r1) in dm.chunks(targets) {
        let c = r1 - r0;
        let d = dm.logits(&mut buf, h, w, r0, r1);
        // logits -> dlogits, in place.
        d.par_chunks_mut(v).enumerate().for_each(|(i, row)| {
            let t = targets[r0 + i];
            if t == IGNORE_INDEX {
                row.fill(T::ZERO);
            } else {
                row_grad_in_place(row, lse[r0 + i], t as usize, g);
            }
        });
        if let Some(dh) = dh.as_mut() {
            // dh[r0..r1] (c, H) = dlogits (c, V) @ w (V, H)
            let wm = Mat { data: w, rs: dm.w_stride[0], cs: dm.w_stride[1] };
            gemm(&mut dh[r0 * hd..r1 * hd], false, Mat::row_major(d, v), wm, c, hd, v);
        }
        if let Some(dw) = dw.as_mut() {
            // dw (V, H) += dlogits^T (V, c) @ h[r0..r1] (c, H)
            gemm(dw, true, Mat::transposed(d, v), Mat::row_major(&h[r0 * hd..r1 * hd], hd), v, hd, c);
        }
    }
    (dh, dw)
}
