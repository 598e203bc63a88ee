use anyhow::Result;
use candle_core::{DType, Tensor};
use whet_kernels::{geglu, reference, swiglu};

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

// GeGLU (Gemma): the same op with the tanh-approximated GELU as the gate's activation.

fn fast_geglu(a: &[Tensor]) -> candle_core::Result<Tensor> {
    geglu(&a[0], &a[1])
}

fn refr_geglu(a: &[Tensor]) -> candle_core::Result<Tensor> {
    reference::geglu(&a[0], &a[1])
}

#[test]
fn geglu_matches_reference() -> Result<()> {
    // Gate over [-8, 8]: both tails of tanh, where exp(2z) overflows or vanishes.
    let g = (rand(&[3, 100, 97], 7, DType::F32)? * 8.0)?;
    let u = rand(&[3, 100, 97], 8, DType::F32)?;
    // candle's gelu backward spells its constants with 6 digits: 1e-5 relative.
    check_against_reference(
        "geglu",
        &fast_geglu,
        &refr_geglu,
        &[g.clone(), u.clone()],
        &[true, true],
        1e-5,
        1e-5,
    )?;
    check_against_reference(
        "geglu, gate frozen",
        &fast_geglu,
        &refr_geglu,
        &[g, u],
        &[false, true],
        1e-5,
        1e-5,
    )
}

#[test]
fn geglu_values_and_finite_differences_f64() -> Result<()> {
    // 0.5 x (1 + tanh(sqrt(2 / pi) (x + 0.044715 x^3))) at 1, -2 and 30 (tanh saturates), times up.
    let g = Tensor::new(&[1.0f64, -2.0, 30.0], &candle_core::Device::Cpu)?;
    let u = Tensor::new(&[1.0f64, 2.0, 0.5], &candle_core::Device::Cpu)?;
    let y = geglu(&g, &u)?.to_vec1::<f64>()?;
    let want = [0.841_191_990_608_276_8, -0.090_804_611_824_449_88, 15.0];
    for (y, w) in y.iter().zip(want) {
        assert!((y - w).abs() < 1e-12, "geglu {y} vs {w}");
    }
    let g = (rand(&[4, 9], 9, DType::F64)? * 3.0)?;
    let u = rand(&[4, 9], 10, DType::F64)?;
    check_finite_differences(
        "geglu d gate",
        &fast_geglu,
        &[g.clone(), u.clone()],
        0,
        36,
        1e-6,
    )?;
    check_finite_differences("geglu d up", &fast_geglu, &[g, u], 1, 36, 1e-6)
}
