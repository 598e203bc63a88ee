use anyhow::Result;
use candle_core::{DType, Tensor};
use whet_kernels::{reference, swiglu};

use crate::common::*;

fn fast(a: &[Tensor]) -> candle_core::Result<Tensor> {
    swiglu(&a[0], &a[1])
}

fn refr(a: &[Tensor]) -> candle_core::Result<Tensor> {
    reference::swiglu(&a[0], &a[1])
}

#[test]
fn matches_reference() -> Result<()> {
    // Spans several rayon blocks; gate over [-8, 8] reaches both saturated ends of the sigmoid.
    let g = (rand(&[3, 100, 97], 1, DType::F32)? * 8.0)?;
    let u = rand(&[3, 100, 97], 2, DType::F32)?;
    check_against_reference(
        "swiglu",
        &fast,
        &refr,
        &[g.clone(), u.clone()],
        &[true, true],
        1e-5,
        1e-6,
    )?;
    check_against_reference(
        "swiglu, up frozen",
        &fast,
        &refr,
        &[g, u],
        &[true, false],
        1e-5,
        1e-6,
    )
}

#[test]
fn non_contiguous_inputs_match_reference() -> Result<()> {
    let g = rand(&[6, 5], 3, DType::F32)?.t()?;
    let u = rand(&[10, 5], 4, DType::F32)?.narrow(0, 2, 6)?.t()?;
    check_against_reference(
        "swiglu strided",
        &fast,
        &refr,
        &[g, u],
        &[true, true],
        1e-5,
        1e-6,
    )
}

#[test]
fn finite_differences_f64() -> Result<()> {
    let g = (rand(&[4, 9], 5, DType::F64)? * 3.0)?;
    let u = rand(&[4, 9], 6, DType::F64)?;
    check_finite_differences("swiglu d gate", &fast, &[g.clone(), u.clone()], 0, 36, 1e-6)?;
    check_finite_differences("swiglu d up", &fast, &[g, u], 1, 36, 1e-6)
}
