use anyhow::Result;
use candle_core::{DType, Device, Tensor};
use whet_kernels::{IGNORE_INDEX, cross_entropy_sum, reference};

use crate::common::*;

pub fn targets(t: &[i64]) -> Result<Tensor> {
    Ok(Tensor::new(t, &Device::Cpu)?)
}

#[test]
fn matches_reference_with_ignored_rows() -> Result<()> {
    let t = targets(&[3, IGNORE_INDEX, 0, 36, IGNORE_INDEX, 17, 5])?;
    let f = |a: &[Tensor]| cross_entropy_sum(&a[0], &t);
    let r = |a: &[Tensor]| reference::cross_entropy_sum(&a[0], &t);
    // Large logits (scale 30) check the max-shift; V = 37 is not a multiple of the lanes.
    let logits = (rand(&[7, 37], 1, DType::F32)? * 30.0)?;
    check_against_reference("cross entropy", &f, &r, &[logits], &[true], 1e-5, 1e-5)
}

#[test]
fn ignored_rows_get_zero_gradient() -> Result<()> {
    let t = targets(&[IGNORE_INDEX, 2, IGNORE_INDEX])?;
    let f = |a: &[Tensor]| cross_entropy_sum(&a[0], &t);
    let (_, g) = run_with_grads(&f, &[rand(&[3, 5], 2, DType::F32)?], &[true])?;
    let g = g[0].as_ref().unwrap();
    assert_eq!(g.get(0)?.abs()?.sum_all()?.to_scalar::<f32>()?, 0.0);
    assert_eq!(g.get(2)?.abs()?.sum_all()?.to_scalar::<f32>()?, 0.0);
    assert!(g.get(1)?.abs()?.sum_all()?.to_scalar::<f32>()? > 0.0);
    Ok(())
}

#[test]
fn finite_differences_f64() -> Result<()> {
    let t = targets(&[1, IGNORE_INDEX, 4, 0])?;
    let f = |a: &[Tensor]| cross_entropy_sum(&a[0], &t);
    check_finite_differences(
        "cross entropy",
        &f,
        &[(rand(&[4, 6], 3, DType::F64)? * 3.0)?],
        0,
        24,
        1e-6,
    )
}

#[test]
fn non_contiguous_logits_match_reference() -> Result<()> {
    let t = targets(&[0, 4, 2, IGNORE_INDEX, 1])?;
    let logits = rand(&[6, 5], 4, DType::F32)?.t()?; // (5, 6)
    let f = |a: &[Tensor]| cross_entropy_sum(&a[0], &t);
    let r = |a: &[Tensor]| reference::cross_entropy_sum(&a[0], &t);
    check_against_reference(
        "cross entropy strided",
        &f,
        &r,
        &[logits],
        &[true],
        1e-5,
        1e-5,
    )
}
