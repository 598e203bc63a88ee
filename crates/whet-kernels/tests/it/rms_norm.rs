use anyhow::Result;
use candle_core::{DType, Tensor};
use whet_kernels::{reference, rms_norm};

use crate::common::*;

const EPS: f64 = 1e-5;

fn fast(a: &[Tensor]) -> candle_core::Result<Tensor> {
    rms_norm(&a[0], &a[1], EPS)
}

fn refr(a: &[Tensor]) -> candle_core::Result<Tensor> {
    reference::rms_norm(&a[0], &a[1], EPS)
}

#[test]
fn matches_reference() -> Result<()> {
    // 3 x 7 rows of H = 40: more rows than one task's block, H not a multiple of the lanes.
    let x = rand(&[3, 7, 40], 1, DType::F32)?;
    let w = (rand(&[40], 2, DType::F32)? + 1.0)?;
    check_against_reference("rms_norm", &fast, &refr, &[x, w], &[true, true], 1e-5, 1e-5)
}

#[test]
fn non_contiguous_input_matches_reference() -> Result<()> {
    // (H, rows) transposed: a strided (rows, H) view.
    let x = rand(&[24, 9], 3, DType::F32)?.t()?;
    assert!(!x.is_contiguous());
    let w = rand(&[24], 4, DType::F32)?;
    check_against_reference(
        "rms_norm strided",
        &fast,
        &refr,
        &[x, w],
        &[true, true],
        1e-5,
        1e-5,
    )
}

#[test]
fn finite_differences_f64() -> Result<()> {
    let x = rand(&[5, 12], 5, DType::F64)?;
    let w = rand(&[12], 6, DType::F64)?;
    check_finite_differences("rms_norm dx", &fast, &[x.clone(), w.clone()], 0, 60, 1e-6)?;
    check_finite_differences("rms_norm dw", &fast, &[x, w], 1, 12, 1e-6)
}

#[test]
fn frozen_weight_gets_no_gradient() -> Result<()> {
    let x = rand(&[4, 16], 7, DType::F32)?;
    let w = rand(&[16], 8, DType::F32)?;
    let (_, g) = run_with_grads(&fast, &[x.clone(), w.clone()], &[true, false])?;
    assert!(
        g[1].is_none(),
        "a frozen weight must not get a gradient entry"
    );
    let (_, gr) = run_with_grads(&refr, &[x, w], &[true, false])?;
    assert_close(
        "dx with frozen w",
        g[0].as_ref().unwrap(),
        gr[0].as_ref().unwrap(),
        1e-5,
        1e-5,
    );
    Ok(())
}
