use anyhow::Result;
use candle_core::{DType, Device, Tensor};
use whet_kernels::{reference, rope, rope_tables};

use crate::common::*;

/// cos/sin for positions 3 + t (batch 0) and a packed row restarting at 0 (batch 1).
fn tables(t: usize, d: usize, dtype: DType) -> Result<(Tensor, Tensor)> {
    let pos: Vec<u32> = (0..t as u32)
        .map(|i| i + 3)
        .chain((0..t as u32).map(|i| i % 5))
        .collect();
    let positions = Tensor::from_vec(pos, (2, t), &Device::Cpu)?;
    let inv: Vec<f32> = (0..d / 2)
        .map(|i| 1.0 / 10000f32.powf(2.0 * i as f32 / d as f32))
        .collect();
    let (c, s) = rope_tables(&positions, &inv)?;
    Ok((c.to_dtype(dtype)?, s.to_dtype(dtype)?))
}

fn fast(a: &[Tensor]) -> candle_core::Result<Tensor> {
    rope(&a[0], &a[1], &a[2])
}

fn refr(a: &[Tensor]) -> candle_core::Result<Tensor> {
    reference::rope(&a[0], &a[1], &a[2])
}

#[test]
fn matches_reference() -> Result<()> {
    let (c, s) = tables(7, 16, DType::F32)?;
    let x = rand(&[2, 7, 3, 16], 1, DType::F32)?;
    check_against_reference(
        "rope",
        &fast,
        &refr,
        &[x, c, s],
        &[true, false, false],
        1e-5,
        1e-6,
    )
}

#[test]
fn strided_inputs_match_reference() -> Result<()> {
    let (c, s) = tables(5, 8, DType::F32)?;
    // (B, NH, T, D) transposed to (B, T, NH, D): strided outer dims, unit stride on D.
    let x = rand(&[2, 3, 5, 8], 2, DType::F32)?.transpose(1, 2)?;
    assert!(!x.is_contiguous());
    check_against_reference(
        "rope, strided heads",
        &fast,
        &refr,
        &[x, c.clone(), s.clone()],
        &[true, false, false],
        1e-5,
        1e-6,
    )?;
    // (B, T, D, NH) transposed: D itself strided.
    let x = rand(&[2, 5, 8, 3], 3, DType::F32)?.transpose(2, 3)?;
    check_against_reference(
        "rope, strided D",
        &fast,
        &refr,
        &[x, c.clone(), s.clone()],
        &[true, false, false],
        1e-5,
        1e-6,
    )?;
    // A narrowed slice of a wider projection, as in a fused qkv.
    let x = rand(&[2, 5, 7, 8], 4, DType::F32)?.narrow(2, 2, 3)?;
    check_against_reference(
        "rope, narrowed",
        &fast,
        &refr,
        &[x, c, s],
        &[true, false, false],
        1e-5,
        1e-6,
    )
}

#[test]
fn finite_differences_f64() -> Result<()> {
    let (c, s) = tables(4, 8, DType::F64)?;
    let x = rand(&[2, 4, 2, 8], 5, DType::F64)?;
    check_finite_differences("rope dx", &fast, &[x, c, s], 0, 128, 1e-6)
}

#[test]
fn cos_and_sin_get_no_gradient() -> Result<()> {
    let (c, s) = tables(4, 8, DType::F32)?;
    let x = rand(&[2, 4, 2, 8], 6, DType::F32)?;
    let (_, g) = run_with_grads(&fast, &[x, c, s], &[true, true, true])?;
    assert!(g[0].is_some());
    assert!(
        g[1].is_none() && g[2].is_none(),
        "cos/sin must get no gradient"
    );
    Ok(())
}
