use anyhow::Result;
use candle_core::{DType, Tensor};
use whet_kernels::{linear, reference};

use crate::common::*;

fn fast_b(a: &[Tensor]) -> candle_core::Result<Tensor> {
    linear(&a[0], &a[1], Some(&a[2]))
}
fn refr_b(a: &[Tensor]) -> candle_core::Result<Tensor> {
    reference::linear(&a[0], &a[1], Some(&a[2]))
}
fn fast(a: &[Tensor]) -> candle_core::Result<Tensor> {
    linear(&a[0], &a[1], None)
}
fn refr(a: &[Tensor]) -> candle_core::Result<Tensor> {
    reference::linear(&a[0], &a[1], None)
}

#[test]
fn with_bias_matches_reference() -> Result<()> {
    let x = rand(&[2, 5, 12], 1, DType::F32)?; // leading dims (2, 5)
    let w = rand(&[7, 12], 2, DType::F32)?;
    let b = rand(&[7], 3, DType::F32)?;
    check_against_reference(
        "linear + bias",
        &fast_b,
        &refr_b,
        &[x, w, b],
        &[true, true, true],
        1e-5,
        1e-5,
    )
}

#[test]
fn without_bias_matches_reference_at_gemm_sizes() -> Result<()> {
    // Big enough for gemm's multi-threaded blocking.
    let x = rand(&[3, 40, 300], 4, DType::F32)?;
    let w = rand(&[200, 300], 5, DType::F32)?;
    check_against_reference("linear", &fast, &refr, &[x, w], &[true, true], 1e-5, 1e-5)
}

#[test]
fn strided_inputs_match_reference() -> Result<()> {
    // w as the transpose of an (IN, OUT) matrix, x as a transposed view.
    let w = rand(&[12, 7], 6, DType::F32)?.t()?;
    let x = rand(&[12, 9], 7, DType::F32)?.t()?;
    assert!(!w.is_contiguous() && !x.is_contiguous());
    check_against_reference(
        "linear strided",
        &fast,
        &refr,
        &[x, w],
        &[true, true],
        1e-5,
        1e-5,
    )
}

#[test]
fn frozen_weight_gets_no_gradient() -> Result<()> {
    let x = rand(&[4, 6, 16], 8, DType::F32)?;
    let w = rand(&[10, 16], 9, DType::F32)?;
    let b = rand(&[10], 10, DType::F32)?;
    let (_, g) = run_with_grads(
        &fast_b,
        &[x.clone(), w.clone(), b.clone()],
        &[true, false, true],
    )?;
    assert!(g[1].is_none(), "a frozen weight must get no gradient entry");
    let (_, gr) = run_with_grads(
        &refr_b,
        &[x.clone(), w.clone(), b.clone()],
        &[true, false, true],
    )?;
    assert_close(
        "dx, frozen w",
        g[0].as_ref().unwrap(),
        gr[0].as_ref().unwrap(),
        1e-5,
        1e-5,
    );
    assert_close(
        "dbias, frozen w",
        g[2].as_ref().unwrap(),
        gr[2].as_ref().unwrap(),
        1e-5,
        1e-5,
    );
    // Frozen w and bias, no bias: only x.
    let (_, g) = run_with_grads(&fast, &[x, w], &[true, false])?;
    assert!(g[0].is_some() && g[1].is_none());
    // Only the weight trains (x a constant input): no dx.
    let (_, g) = run_with_grads(
        &fast_b,
        &[
            rand(&[3, 16], 11, DType::F32)?,
            rand(&[10, 16], 12, DType::F32)?,
            b,
        ],
        &[false, true, false],
    )?;
    assert!(g[0].is_none() && g[1].is_some() && g[2].is_none());
    Ok(())
}

#[test]
fn finite_differences_f64() -> Result<()> {
    let inputs = [
        rand(&[2, 3, 5], 13, DType::F64)?,
        rand(&[4, 5], 14, DType::F64)?,
        rand(&[4], 15, DType::F64)?,
    ];
    check_finite_differences("linear dx", &fast_b, &inputs, 0, 30, 1e-6)?;
    check_finite_differences("linear dw", &fast_b, &inputs, 1, 20, 1e-6)?;
    check_finite_differences("linear db", &fast_b, &inputs, 2, 4, 1e-6)
}
