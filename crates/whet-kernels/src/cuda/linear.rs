//! cuBLAS products on candle's handle (and so on candle's stream): the forward of `linear` and
//! the matmuls of the chunked LM head. Row-major (M, N) = A (M, K) @ B is computed as the
//! column-major C^T = B^T A^T, the usual trick; f32 accumulation throughout.

use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::WrapErr;
use candle_core::{CudaDevice, CudaStorage, DType, Layout, Result, Shape, bail};

use super::{alloc, cudarc, ptr, ptr_at};

/// A column-major `C (m x n) = op(A) (m x k) @ op(B) (k x n) + beta C` on raw addresses;
/// A and B have dtype `ab`, C has dtype `c_dtype`.
pub(crate) struct Gemm {
    pub trans_a: bool,
    pub trans_b: bool,
    pub m: usize,
    pub n: usize,
    pub k: usize,
    pub a: u64,
    pub lda: usize,
    pub b: u64,
    pub ldb: usize,
    pub c: u64,
    pub ldc: usize,
    pub beta: f32,
    pub ab: DType,
    pub c_dtype: DType,
}

fn cuda_type(dt: DType) -> Result<cudarc::cublas::sys::cudaDataType> {
    use cudarc::cublas::sys::cudaDataType_t as T;
    Ok(match dt {
        DType::F32 => T::CUDA_R_32F,
        DType::BF16 => T::CUDA_R_16BF,
        DType::F16 => T::CUDA_R_16F,
        dt => bail!("whet-kernels: no cuBLAS product for {dt:?}"),
    })
}

pub(crate) fn gemm(dev: &CudaDevice, g: Gemm) -> Result<()> {
    use cudarc::cublas::sys::{cublasComputeType_t, cublasGemmAlgo_t, cublasOperation_t};
    if g.m == 0 || g.n == 0 {
        return Ok(());
    }
    let op = |t: bool| {
        if t {
            cublasOperation_t::CUBLAS_OP_T
        } else {
            cublasOperation_t::CUBLAS_OP_N
        }
    };
    let blas = dev.cublas_handle();
    let alpha = 1f32;
    let beta = if g.k == 0 { g.beta.min(1.0) } else { g.beta };
    let [m, n, k, lda, ldb, ldc] = blas_dims(&g)?;
    // SAFETY: the caller passes addresses of live buffers holding at least the (ld x cols)
    // elements cuBLAS reads or writes for these sizes; alpha and beta are f32 as
    // CUBLAS_COMPUTE_32F requires, and the handle runs on candle's stream.
    unsafe {
        cudarc::cublas::result::gemm_ex(
            *blas.handle(),
            op(g.trans_a),
            op(g.trans_b),
            m,
            n,
            k,
            (&alpha) as *const f32 as *const _,
            g.a as *const _,
            cuda_type(g.ab)?,
            lda,
            g.b as *const _,
            cuda_type(g.ab)?,
            ldb,
            (&beta) as *const f32 as *const _,
            g.c as *mut _,
            cuda_type(g.c_dtype)?,
            ldc,
            cublasComputeType_t::CUBLAS_COMPUTE_32F,
            cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT,
        )
    }
    .w()
}

/// The product's sizes and leading dimensions as cuBLAS's `int`s: a size past `i32::MAX` is an
/// error naming it, never a wrapped (negative or small) value cuBLAS would compute with.
fn blas_dims(g: &Gemm) -> Result<[i32; 6]> {
    let dims = [
        ("m", g.m),
        ("n", g.n),
        ("k", g.k),
        ("lda", g.lda),
        ("ldb", g.ldb),
        ("ldc", g.ldc),
    ];
    let mut out = [0i32; 6];
    for (o, (name, v)) in out.iter_mut().zip(dims) {
        *o = i32::try_from(v).map_err(|_| {
            candle_core::Error::Msg(format!(
                "whet-kernels: cuBLAS GEMM size {name} = {v} exceeds i32::MAX ({}); split the product into smaller ones",
                i32::MAX
            ))
        })?;
    }
    Ok(out)
}

/// How cuBLAS sees a row-major-shaped (rows, cols) weight W with element `stride`s: as the
/// column-major matrix stored at its address, which is W^T (cols x rows) when W is row-major
/// (`true`; op T yields W) and W itself when W is a transposed view (`false`; op N yields W),
/// with that matrix's leading dimension.
pub(crate) fn weight_operand(rows: usize, cols: usize, stride: &[usize]) -> Result<(bool, usize)> {
    if stride[1] == 1 || cols <= 1 {
        Ok((true, stride[0].max(cols).max(1)))
    } else if stride[0] == 1 || rows <= 1 {
        Ok((false, stride[1].max(rows).max(1)))
    } else {
        bail!("whet-kernels: a weight needs a unit stride on one dim, got strides {stride:?}")
    }
}

/// `x @ w^T`: x (.., IN) contiguous, w (OUT, IN) with a unit stride on either dim.
pub(crate) fn fwd(
    x: &CudaStorage,
    lx: &Layout,
    w: &CudaStorage,
    lw: &Layout,
) -> Result<(CudaStorage, Shape)> {
    let dt = x.dtype();
    if w.dtype() != dt {
        bail!("whet-linear: dtype mismatch, {dt:?} and {:?}", w.dtype())
    }
    let (n_out, n_in) = lw.shape().dims2()?;
    let xd = lx.dims();
    if xd.is_empty() || xd[xd.len() - 1] != n_in {
        bail!(
            "whet-linear: x {xd:?} does not end in IN = {n_in} (w is {:?})",
            lw.dims()
        )
    }
    let m = lx.shape().elem_count() / n_in.max(1);
    let mut out_dims = xd.to_vec();
    *out_dims.last_mut().expect("rank >= 1") = n_out;
    let dev = x.device().clone();
    let px = ptr(x, lx, "whet-linear")?;
    let pw = ptr_at(w, lw.start_offset())?;
    let (out, py) = alloc(&dev, dt, m * n_out, n_in == 0)?;
    // Column-major: Y^T (OUT x M) = W (OUT x IN) @ X^T (IN x M).
    let (row_major, ld) = weight_operand(n_out, n_in, lw.stride())?;
    gemm(
        &dev,
        Gemm {
            trans_a: row_major,
            trans_b: false,
            m: n_out,
            n: m,
            k: n_in,
            a: pw,
            lda: ld,
            b: px,
            ldb: n_in.max(1),
            c: py,
            ldc: n_out.max(1),
            beta: 0.0,
            ab: dt,
            c_dtype: dt,
        },
    )?;
    Ok((out, Shape::from(out_dims)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn product(m: usize, ldc: usize) -> Gemm {
        Gemm {
            trans_a: false,
            trans_b: false,
            m,
            n: 4,
            k: 8,
            a: 0,
            lda: m.max(1),
            b: 0,
            ldb: 8,
            c: 0,
            ldc,
            beta: 0.0,
            ab: DType::F32,
            c_dtype: DType::F32,
        }
    }

    #[test]
    fn sizes_past_i32_are_an_error_not_a_wrapped_int() {
        assert_eq!(blas_dims(&product(16, 16)).unwrap(), [16, 4, 8, 16, 8, 16]);
        let big = i32::MAX as usize + 1;
        let err = blas_dims(&product(16, big)).unwrap_err().to_string();
        assert!(err.contains("ldc = 2147483648"), "{err}");
        // `as i32` made this 2^32 + 16 a 16.
        let err = blas_dims(&product((1 << 32) + 16, 16))
            .unwrap_err()
            .to_string();
        assert!(err.contains("m = 4294967312"), "{err}");
    }
}
