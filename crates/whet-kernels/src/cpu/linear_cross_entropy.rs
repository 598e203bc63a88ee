//! LM head fused with cross entropy, `chunk` supervised rows at a time: only a (chunk, V) block
//! of logits exists at any moment. h: (N, H) contiguous, w: (V, H) with any strides,
//! targets: (N) i64. Ignored rows are dropped before the matmuls, so prompt tokens in SFT cost
//! nothing in the LM head.

use rayon::prelude::*;

use super::cross_entropy::{row_grad_in_place, rows_fwd_sum};
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

/// A chunk of supervised rows: their h rows (borrowed when the rows are consecutive,
/// gathered otherwise) and targets.
struct Chunk<'a, T: Clone> {
    rows: &'a [usize],
    h: std::borrow::Cow<'a, [T]>,
    targets: Vec<i64>,
}

impl Dims {
    fn chunks<'a, T: Float>(
        &self,
        h: &'a [T],
        targets: &[i64],
        kept: &'a [usize],
    ) -> impl Iterator<Item = Chunk<'a, T>> {
        let hd = self.h;
        let targets: Vec<i64> = kept.iter().map(|&r| targets[r]).collect();
        kept.chunks(self.chunk.max(1))
            .enumerate()
            .map(move |(ci, rows)| {
                let (first, last) = (rows[0], rows[rows.len() - 1]);
                let h = if last - first + 1 == rows.len() {
                    std::borrow::Cow::Borrowed(&h[first * hd..(last + 1) * hd])
                } else {
                    std::borrow::Cow::Owned(
                        rows.iter()
                            .flat_map(|&r| h[r * hd..(r + 1) * hd].iter().copied())
                            .collect(),
                    )
                };
                let c0 = ci * self.chunk.max(1);
                Chunk {
                    rows,
                    h,
                    targets: targets[c0..c0 + rows.len()].to_vec(),
                }
            })
    }

    /// logits (c, V) = hc (c, H) @ w^T into `buf`.
    fn logits<'b, T: Float>(&self, buf: &'b mut [T], hc: &[T], w: &[T]) -> &'b mut [T] {
        let (hd, v) = (self.h, self.v);
        let c = hc.len() / hd;
        let out = &mut buf[..c * v];
        let wt = Mat {
            data: w,
            rs: self.w_stride[1],
            cs: self.w_stride[0],
        }; // (H, V)
        gemm(out, false, Mat::row_major(hc, hd), wt, c, v, hd);
        out
    }
}

fn supervised(targets: &[i64]) -> Vec<usize> {
    (0..targets.len())
        .filter(|&r| targets[r] != IGNORE_INDEX)
        .collect()
}

/// -> (sum of losses, per-row lse (0 for ignored rows)). Targets must be checked.
pub(crate) fn fwd<T: Float>(h: &[T], w: &[T], targets: &[i64], dm: Dims) -> (f64, Vec<T>) {
    let mut lse = vec![T::ZERO; dm.n];
    let kept = supervised(targets);
    if dm.v == 0 || dm.h == 0 || kept.is_empty() {
        return (0.0, lse);
    }
    let mut buf = vec![T::ZERO; dm.chunk.min(kept.len()) * dm.v];
    let mut lc = vec![T::ZERO; dm.chunk.min(kept.len())];
    let mut loss = 0f64;
    for ch in dm.chunks(h, targets, &kept) {
        let logits = dm.logits(&mut buf, &ch.h, w);
        let lc = &mut lc[..ch.rows.len()];
        loss += rows_fwd_sum(logits, &ch.targets, dm.v, lc);
        for (&r, l) in ch.rows.iter().zip(lc.iter()) {
            lse[r] = *l;
        }
    }
    (loss, lse)
}

/// -> (sum of losses, per-row lse, (dh (N, H) if `need_dh`, dw (V, H) if `need_dw`)) for the loss
/// itself (upstream gradient 1): the forward and the backward over one pass of logits, so a
/// training step computes each chunk's logits once instead of again in the backward.
pub(crate) fn fwd_with_grads<T: Float>(
    h: &[T],
    w: &[T],
    targets: &[i64],
    dm: Dims,
    need_dh: bool,
    need_dw: bool,
) -> (f64, Vec<T>, Grads<T>) {
    let mut lse = vec![T::ZERO; dm.n];
    let mut loss = 0f64;
    let (dh, dw) = chunks_with_grads(h, w, targets, dm, (need_dh, need_dw), |logits, ch| {
        let v = dm.v;
        let mut lc = vec![T::ZERO; ch.rows.len()];
        loss += rows_fwd_sum(logits, &ch.targets, v, &mut lc);
        logits.par_chunks_mut(v).enumerate().for_each(|(i, row)| {
            row_grad_in_place(row, lc[i], ch.targets[i] as usize, T::ONE);
        });
        for (&r, l) in ch.rows.iter().zip(&lc) {
            lse[r] = *l;
        }
    });
    (loss, lse, (dh, dw))
}

/// (dh (N, H), dw (V, H)), each when asked for.
pub(crate) type Grads<T> = (Option<Vec<T>>, Option<Vec<T>>);

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
) -> Grads<T> {
    chunks_with_grads(h, w, targets, dm, (need_dh, need_dw), |d, ch| {
        // logits -> dlogits, in place.
        d.par_chunks_mut(dm.v).enumerate().for_each(|(i, row)| {
            row_grad_in_place(row, lse[ch.rows[i]], ch.targets[i] as usize, g);
        });
    })
}

/// For each chunk of supervised rows: logits, then `to_dlogits` (which turns them into the
/// loss gradient in place), then dh and dw from them.
fn chunks_with_grads<T: Float>(
    h: &[T],
    w: &[T],
    targets: &[i64],
    dm: Dims,
    (need_dh, need_dw): (bool, bool),
    mut to_dlogits: impl FnMut(&mut [T], &Chunk<'_, T>),
) -> Grads<T> {
    let Dims { n, h: hd, v, .. } = dm;
    let mut dh = need_dh.then(|| vec![T::ZERO; n * hd]);
    let mut dw = need_dw.then(|| vec![T::ZERO; v * hd]);
    let kept = supervised(targets);
    if v == 0 || hd == 0 || kept.is_empty() {
        return (dh, dw);
    }
    let mut buf = vec![T::ZERO; dm.chunk.min(kept.len()) * v];
    let mut dhc = vec![
        T::ZERO;
        if need_dh {
            dm.chunk.min(kept.len()) * hd
        } else {
            0
        }
    ];
    for ch in dm.chunks(h, targets, &kept) {
        let c = ch.rows.len();
        let d = dm.logits(&mut buf, &ch.h, w);
        to_dlogits(d, &ch);
        if let Some(dh) = dh.as_mut() {
            // dh rows (c, H) = dlogits (c, V) @ w (V, H)
            let wm = Mat {
                data: w,
                rs: dm.w_stride[0],
                cs: dm.w_stride[1],
            };
            gemm(
                &mut dhc[..c * hd],
                false,
                Mat::row_major(d, v),
                wm,
                c,
                hd,
                v,
            );
            for (i, &r) in ch.rows.iter().enumerate() {
                dh[r * hd..(r + 1) * hd].copy_from_slice(&dhc[i * hd..(i + 1) * hd]);
            }
        }
        if let Some(dw) = dw.as_mut() {
            // dw (V, H) += dlogits^T (V, c) @ hc (c, H)
            gemm(
                dw,
                true,
                Mat::transposed(d, v),
                Mat::row_major(&ch.h, hd),
                v,
                hd,
                c,
            );
        }
    }
    (dh, dw)
}
