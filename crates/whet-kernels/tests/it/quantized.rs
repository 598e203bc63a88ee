use std::sync::Arc;

use anyhow::Result;
use candle_core::quantized::{GgmlDType, QMatMul, QTensor};
use candle_core::{DType, Device, Module, Tensor, Var};
use whet_kernels::{linear, quantized_linear};

use crate::common::*;

/// Forward and input gradient of the quantized linear equal those of the f32 linear on the
/// dequantized weight, for block formats of 32 and of 256 elements.
#[test]
fn equals_linear_on_the_dequantized_weight() -> Result<()> {
    for (dtype, n_in) in [
        (GgmlDType::Q4_0, 64),
        (GgmlDType::Q8_0, 96),
        (GgmlDType::Q4K, 256),
        (GgmlDType::Q6K, 512),
    ] {
        let w = QTensor::quantize(&rand(&[24, n_in], 2, DType::F32)?, dtype)?;
        let w = Arc::new(w);
        let dense = w.dequantize(&Device::Cpu)?; // (OUT, IN)
        let x = Var::from_tensor(&rand(&[3, 5, n_in], 1, DType::F32)?)?;
        let y = quantized_linear(x.as_tensor(), &w)?; // (3, 5, OUT)
        let want = linear(x.as_tensor(), &dense, None)?;
        assert_close(&format!("{dtype:?} forward"), &y, &want, 1e-6, 1e-6);
        let up = rand(&[3, 5, 24], 3, DType::F32)?;
        let g = (y * &up)?.sum_all()?.backward()?;
        let g_want = (want * &up)?.sum_all()?.backward()?;
        let dx = g.get(x.as_tensor()).expect("x has a gradient");
        let dx_want = g_want.get(x.as_tensor()).expect("x has a gradient");
        assert_close(&format!("{dtype:?} dx"), dx, dx_want, 1e-6, 1e-6);
    }
    Ok(())
}

/// The reason this op exists: candle's QMatMul drops the gradient to its input.
#[test]
fn candle_qmatmul_cuts_the_gradient_and_this_op_does_not() -> Result<()> {
    let w = Arc::new(QTensor::quantize(
        &rand(&[8, 32], 5, DType::F32)?,
        GgmlDType::Q8_0,
    )?);
    let x = Var::from_tensor(&rand(&[4, 32], 6, DType::F32)?)?;
    let candle_y = QMatMul::from_arc(w.clone())?.forward(x.as_tensor())?;
    let candle_grads = candle_y.sum_all()?.backward()?;
    assert!(candle_grads.get(x.as_tensor()).is_none());
    let y = quantized_linear(x.as_tensor(), &w)?;
    let grads = y.sum_all()?.backward()?;
    let dx = grads.get(x.as_tensor()).expect("x has a gradient");
    // d(sum(x W^T))/dx = column sums of W, the same for every row.
    let want = w
        .dequantize(&Device::Cpu)?
        .sum(0)?
        .unsqueeze(0)?
        .broadcast_as((4, 32))?;
    assert_close("dx", dx, &want.contiguous()?, 1e-5, 1e-5);
    Ok(())
}

#[test]
fn mismatched_input_width_is_an_error() -> Result<()> {
    let w = Arc::new(QTensor::quantize(
        &rand(&[8, 32], 5, DType::F32)?,
        GgmlDType::Q4_0,
    )?);
    let err = quantized_linear(&Tensor::zeros((2, 31), DType::F32, &Device::Cpu)?, &w)
        .expect_err("31 != 32");
    assert!(err.to_string().contains("IN = 32"), "{err}");
    Ok(())
}
