//! Rotary embedding, `rotate_half` convention. x: (B, T, NH, D) with any strides on the first
//! three dims and unit stride on D; cos/sin: (B, T, D/2) contiguous.

use rayon::prelude::*;

use super::{Float, multiversion};

/// Shape and element strides of x (the offset of x[0, 0, 0, 0] is the start of `x`).
#[derive(Clone, Copy)]
pub(crate) struct Dims {
    pub b: usize,
    pub t: usize,
    pub nh: usize,
    pub d: usize,
    /// strides of x over (B, T, NH)
    pub stride: [usize; 3],
}

/// lo = x1 cos - sign * x2 sin, hi = x2 cos + sign * x1 sin -> (B, T, NH, D) contiguous.
/// `sign = 1` is the forward; `sign = -1` rotates back, which is the backward (the rotation
/// is orthogonal, so its transpose is the rotation by -angle).
pub(crate) fn apply<T: Float>(x: &[T], cos: &[T], sin: &[T], dm: Dims, sign: T) -> Vec<T> {
    let Dims {
        b,
        t,
        nh,
        d,
        stride,
    } = dm;
    let half = d / 2;
    let mut y = vec![T::ZERO; b * t * nh * d];
    if y.is_empty() {
        return y;
    }
    // One task per (b, t) row: (NH, D) outputs sharing one cos/sin row.
    y.par_chunks_mut(nh * d).enumerate().for_each(|(bt, y)| {
        let (c, s) = (
            &cos[bt * half..(bt + 1) * half],
            &sin[bt * half..(bt + 1) * half],
        );
        let o = (bt / t) * stride[0] + (bt % t) * stride[1];
        rotate_row(y, &x[o..], c, s, stride[2], sign)
    });
    y
}

multiversion! {
    fn rotate_row<T: Float>(y: &mut [T], x: &[T], c: &[T], s: &[T], head_stride: usize, sign: T) = rotate_row_impl;
}

/// One (b, t) row: y (NH, D) from x (head h at h * head_stride).
#[inline(always)]
fn rotate_row_impl<T: Float>(y: &mut [T], x: &[T], c: &[T], s: &[T], head_stride: usize, sign: T) {
    let half = c.len();
    for (h, y) in y.chunks_exact_mut(2 * half).enumerate() {
        let o = h * head_stride;
        let (x1, x2) = x[o..o + 2 * half].split_at(half);
        let (lo, hi) = y.split_at_mut(half);
        for i in 0..half {
            let ss = sign * s[i];
            lo[i] = x1[i] * c[i] - x2[i] * ss;
            hi[i] = x2[i] * c[i] + x1[i] * ss;
        }
    }
}
