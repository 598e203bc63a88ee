//! RMSNorm over the last dim. x: (R, H) rows, weight: (H).

use rayon::prelude::*;

use super::{Float, dot, multiversion};

/// Rows per rayon task.
const ROWS: usize = 16;

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
    let add = |mut a: Vec<T>, b: Vec<T>| {
        for (a, b) in a.iter_mut().zip(&b) {
            *a += *b;
        }
        a
    };
    let zero = || {
        if need_dw {
            vec![T::ZERO; h]
        } else {
            Vec::new()
        }
    };
    let dw = if need_dx {
        dx.par_chunks_mut(ROWS * h)
            .zip(x.par_chunks(ROWS * h).zip(dy.par_chunks(ROWS * h)))
            .map(|(dx, (x, dy))| bwd_rows(Some(dx), x, w, dy, eps, need_dw))
            .reduce(zero, add)
    } else {
        x.par_chunks(ROWS * h)
            .zip(dy.par_chunks(ROWS * h))
            .map(|(x, dy)| bwd_rows(None, x, w, dy, eps, need_dw))
            .reduce(zero, add)
    };
    (need_dx.then_some(dx), need_dw.then_some(dw))
}
