//! `x @ w^T + bias`. x: (M, IN) contiguous, w: (OUT, IN) with any strides, bias: (OUT).

use super::{Float, Mat, gemm, gemm_extra, matmul_plus};

/// w is addressed as `w[o * w_stride[0] + i * w_stride[1]]`. -> (M, OUT)
pub(crate) fn fwd<T: Float>(
    x: &[T],
    w: &[T],
    w_stride: [usize; 2],
    bias: Option<&[T]>,
    m: usize,
    n_in: usize,
    n_out: usize,
) -> Vec<T> {
    fwd_plus(x, w, w_stride, bias, (m, n_in, n_out), None)
}

/// [`fwd`] plus `lhs2 (M, K2) @ rhs2 (K2, OUT)` (a LoRA update), reduced with the main product
/// where [`gemm_extra`] can.
pub(crate) fn fwd_plus<T: Float>(
    x: &[T],
    w: &[T],
    w_stride: [usize; 2],
    bias: Option<&[T]>,
    (m, n_in, n_out): (usize, usize, usize),
    plus: Option<(Mat<'_, T>, Mat<'_, T>, usize)>,
) -> Vec<T> {
    // w^T seen as (IN, OUT): element (i, o) = w[o * s0 + i * s1].
    let wt = Mat {
        data: w,
        rs: w_stride[1],
        cs: w_stride[0],
    };
    let x = Mat::row_major(x, n_in);
    let Some(b) = bias else {
        return matmul_plus((x, wt, n_in), plus, m, n_out);
    };
    let mut y = vec![T::ZERO; m * n_out];
    for row in y.chunks_exact_mut(n_out) {
        row.copy_from_slice(b);
    }
    match plus {
        Some(second) => gemm_extra(&mut y, true, (x, wt, n_in), second, m, n_out),
        None => gemm(&mut y, true, x, wt, m, n_out, n_in),
    }
    y
}
