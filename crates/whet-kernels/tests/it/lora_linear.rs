//! The fused LoRA linear against the same expression composed from `reference` ops, and against
//! finite differences: with and without a dropout mask, a bias, strided adapter weights, and at
//! sizes where the products go through whet's AVX-512 gemm.

use anyhow::Result;
use candle_core::{DType, Tensor};
use whet_kernels::{lora_linear, reference};

use crate::common::*;

const SCALE: f64 = 1.75;

/// inputs: x, a, b, w, [bias], [mask]; x, a and b are the tracked ones.
fn fast(mask: bool, bias: bool) -> impl Fn(&[Tensor]) -> candle_core::Result<Tensor> {
    move |t: &[Tensor]| {
        let bias_t = bias.then(|| &t[4]);
        let mask_t = mask.then(|| &t[if bias { 5 } else { 4 }]);
        lora_linear(&t[0], &t[3], bias_t, (&t[1], &t[2]), SCALE, mask_t)
    }
}

fn composed(mask: bool, bias: bool) -> impl Fn(&[Tensor]) -> candle_core::Result<Tensor> {
    move |t: &[Tensor]| {
        let bias_t = bias.then(|| &t[4]);
        let x_in = if mask {
            (&t[0] * &t[if bias { 5 } else { 4 }])?
        } else {
            t[0].clone()
        };
        let y = reference::linear(&t[0], &t[3], bias_t)?;
        let up = reference::linear(&reference::linear(&x_in, &t[1], None)?, &t[2], None)?;
        y + (up * SCALE)?
    }
}

fn inputs(
    lead: &[usize],
    n_in: usize,
    n_out: usize,
    r: usize,
    dtype: DType,
) -> Result<Vec<Tensor>> {
    let mut x_shape = lead.to_vec();
    x_shape.push(n_in);
    let mask: Vec<f64> = rand_vec(x_shape.iter().product(), 9, 1.0)
        .into_iter()
        .map(|u| if u < -0.4 { 0.0 } else { 1.0 / 0.7 })
        .collect();
    Ok(vec![
        rand(&x_shape, 1, dtype)?,
        rand(&[r, n_in], 2, dtype)?,
        rand(&[n_out, r], 3, dtype)?,
        rand(&[n_out, n_in], 4, dtype)?,
        rand(&[n_out], 5, dtype)?,
        Tensor::from_vec(mask, x_shape, &candle_core::Device::Cpu)?.to_dtype(dtype)?,
    ])
}

/// The fused op against the composed one with x, a and b tracked, for every combination of
/// a dropout mask and a bias; `strided` hands a and b in as transposed views.
fn check_every_variant(
    label: &str,
    (lead, n_in, n_out, r): (&[usize], usize, usize, usize),
    strided: bool,
    tol: f64,
) -> Result<()> {
    for (mask, bias) in [(false, false), (true, false), (false, true), (true, true)] {
        let mut t = inputs(lead, n_in, n_out, r, DType::F32)?;
        if strided {
            t[1] = t[1].t()?.contiguous()?.t()?;
            t[2] = t[2].t()?.contiguous()?.t()?;
            assert!(!t[1].is_contiguous() && !t[2].is_contiguous());
        }
        if !bias {
            t.remove(4);
        }
        if !mask {
            t.truncate(if bias { 5 } else { 4 });
        }
        let mut track = vec![true, true, true];
        track.resize(t.len(), false);
        check_against_reference(
            &format!("{label}, mask {mask} bias {bias}"),
            &fast(mask, bias),
            &composed(mask, bias),
            &t,
            &track,
            tol,
            tol,
        )?;
    }
    Ok(())
}

#[test]
fn matches_the_composed_expression() -> Result<()> {
    check_every_variant("lora_linear", (&[2, 7], 12, 9, 4), false, 1e-5)
}

#[test]
fn matches_at_gemm_sizes_with_strided_adapters() -> Result<()> {
    // 4 x 64 rows of 576 -> 192, rank 16: the frozen products take whet's f32 GEMM where the
    // CPU has AVX2 or AVX-512, with the rank-16 update reduced in the same micro-tiles (forward,
    // and dx without a mask). a and b arrive as transposed views.
    check_every_variant("lora_linear large", (&[4, 64], 576, 192, 16), true, 1e-4)
}

#[test]
fn frozen_input_gets_no_gradient() -> Result<()> {
    let mut t = inputs(&[3], 8, 6, 2, DType::F32)?;
    t.truncate(4);
    check_against_reference(
        "lora_linear, x frozen",
        &fast(false, false),
        &composed(false, false),
        &t,
        &[false, true, true, false],
        1e-5,
        1e-5,
    )
}

#[test]
fn finite_differences_f64() -> Result<()> {
    let t = inputs(&[2, 3], 5, 4, 3, DType::F64)?;
    let f = fast(true, true);
    check_finite_differences("lora_linear dx", &f, &t, 0, 30, 1e-6)?;
    check_finite_differences("lora_linear da", &f, &t, 1, 15, 1e-6)?;
    check_finite_differences("lora_linear db", &f, &t, 2, 12, 1e-6)
}
