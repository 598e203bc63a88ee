//! Rotary embedding, `rotate_half` convention. x: (B, T, NH, D) with any strides on the first
//! three dims and unit stride on D; cos/sin: (B, T, D/2) contiguous.

use rayon::prelude::*;

use super::Float;

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
    let Dims { b, t, nh, d, stride } = dm;
    let half = d / 2;
    let mut y = vec![T::ZERO; b * t * nh * d];
    if y.is_empty() {
        return y;
    }
    // One task per (b, t) row: (NH, D) outputs sharing one cos/sin row.
    y.par_chunks_mut(nh * d).enumerate().for_each(|(bt, y)| {
        let (bi, ti) = (bt / t, bt % t);
        let c = &cos[bt * half..(bt + 1) * half];
        let s = &sin[bt * half..(bt + 1) * half];
        for (h, y) in y.chunks_exact_mut(d).enumerate() {
            let o = bi * stride[0] + ti * stride[1] + h * stride[2];
            let (x1, x2) = x[o..o + d].split_at(half);
            let (lo, hi) = y.split_at_mut(half);
            for i in 0..half {
                let ss = sign * s[i];
                lo[i] = x1[i] * c[i] - x2[i] * ss;
                hi[i] = x2[i] * c[i] + x1[i] * ss;
            }
        }
    });
    y
}
