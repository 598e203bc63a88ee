//! RMSNorm over the last dim. x: (R, H) rows, weight: (H).

use rayon::prelude::*;

use super::{Float, dot, multiversion};

/// Rows per rayon task.
const ROWS: usize = 16;
/// The most tasks the backward splits its rows into; a constant, not the thread count, so dw's
/// summation order is the same on any machine.
const DW_TASKS: usize = 64;

#[inline(always)]
fn rstd<T: Float>(x: &[T], eps: T) -> T {
    let h = T::from_f64(x.len() as f64);
    T::ONE / (dot(x, x) / h + eps).sqrt()
}

multiversion! {
    fn fwd_rows<T: Float>(y: &mut [T], x: &[T], w: &[T], eps: T) = fwd_rows_impl;
}

#[inline(always)]
fn fwd_rows_impl<T: Float>(y: &mut [T], x: &[T], w: &[T], eps: T) {
    let h = w.len();
    for (y, x) in y.chunks_exact_mut(h).zip(x.chunks_exact(h)) {
        let r = rstd(x, eps);
        for ((y, x), w) in y.iter_mut().zip(x).zip(w) {
            *y = *x * r * *w;
        }
    }
}

/// y = x * rstd(x) * w. -> (R, H)
pub(crate) fn fwd<T: Float>(x: &[T], w: &[T], eps: T) -> Vec<T> {
    let h = w.len();
    let mut y = vec![T::ZERO; x.len()];
    if h == 0 {
        return y;
    }
    y.par_chunks_mut(ROWS * h)
        .zip(x.par_chunks(ROWS * h))
        .for_each(|(y, x)| fwd_rows(y, x, w, eps));
    y
}

multiversion! {
    fn bwd_rows<T: Float>(dx: Option<&mut [T]>, x: &[T], w: &[T], dy: &[T], eps: T, need_dw: bool) -> Vec<T> = bwd_rows_impl;
}

/// A block of rows: writes dx (if given), returns this block's part of dw (empty if not needed).
#[inline(always)]
fn bwd_rows_impl<T: Float>(
    mut dx: Option<&mut [T]>,
    x: &[T],
    w: &[T],
    dy: &[T],
    eps: T,
    need_dw: bool,
) -> Vec<T> {
    let h = w.len();
    let hf = T::from_f64(h as f64);
    let mut dw = if need_dw {
        vec![T::ZERO; h]
    } else {
        Vec::new()
    };
    for (i, (x, dy)) in x.chunks_exact(h).zip(dy.chunks_exact(h)).enumerate() {
        let r = rstd(x, eps);
        if need_dw {
            for ((dw, x), dy) in dw.iter_mut().zip(x).zip(dy) {
                *dw += *dy * *x * r;
            }
        }
        if let Some(dx) = dx.as_deref_mut() {
            let dx = &mut dx[i * h..(i + 1) * h];
            // mean(dy * w * xh) = rstd * mean(dy * w * x)
            let mut c = [T::ZERO; 8];
            let mut j = 0;
            while j + 8 <= h {
                for l in 0..8 {
                    c[l] += dy[j + l] * w[j + l] * x[j + l];
                }
                j += 8;
            }
            let mut c = c.into_iter().fold(T::ZERO, |a, b| a + b);
            for j in j..h {
                c += dy[j] * w[j] * x[j];
            }
            let c = c * r * r / hf;
            for (((dx, dy), w), x) in dx.iter_mut().zip(dy).zip(w).zip(x) {
                *dx = r * (*dy * *w - *x * c);
            }
        }
    }
    dw
}

/// With xh = x * rstd: dx = rstd * (dy*w - xh * mean(dy*w*xh)), dw = sum over rows of dy * xh.
/// Returns (dx (R, H) if `need_dx`, dw (H) if `need_dw`).
pub(crate) fn bwd<T: Float>(
    x: &[T],
    w: &[T],
    dy: &[T],
    eps: T,
    need_dx: bool,
    need_dw: bool,
) -> (Option<Vec<T>>, Option<Vec<T>>) {
    let h = w.len();
    if h == 0 {
        return (need_dx.then(Vec::new), need_dw.then(Vec::new));
    }
    let mut dx = if need_dx {
        vec![T::ZERO; x.len()]
    } else {
        Vec::new()
    };
    // dw is a sum over rows: each task sums a fixed range of rows and the partial sums are
    // added in row order, so the result does not depend on how rayon splits or steals the work
    // (a `reduce` would add them in a different order from run to run).
    let rows = x.len() / h;
    let per_task = ROWS * rows.div_ceil(ROWS).div_ceil(DW_TASKS).max(1);
    let partials: Vec<Vec<T>> = if need_dx {
        dx.par_chunks_mut(per_task * h)
            .zip(x.par_chunks(per_task * h).zip(dy.par_chunks(per_task * h)))
            .map(|(dx, (x, dy))| bwd_rows(Some(dx), x, w, dy, eps, need_dw))
            .collect()
    } else {
        x.par_chunks(per_task * h)
            .zip(dy.par_chunks(per_task * h))
            .map(|(x, dy)| bwd_rows(None, x, w, dy, eps, need_dw))
            .collect()
    };
    let mut dw = if need_dw {
        vec![T::ZERO; h]
    } else {
        Vec::new()
    };
    if need_dw {
        for p in &partials {
            for (a, b) in dw.iter_mut().zip(p) {
                *a += *b;
            }
        }
    }
    (need_dx.then_some(dx), need_dw.then_some(dw))
}
