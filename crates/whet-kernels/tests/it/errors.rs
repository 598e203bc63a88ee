//! Bad inputs give candle errors, not panics or wrong results.

use anyhow::Result;
use candle_core::{DType, Device, Tensor};
use whet_kernels::*;

use crate::common::rand;
use crate::cross_entropy::targets;

#[test]
fn unsupported_dtype_is_an_error() -> Result<()> {
    let x = rand(&[2, 8], 1, DType::F32)?.to_dtype(DType::BF16)?;
    let w = Tensor::ones(8, DType::BF16, &Device::Cpu)?;
    let err = rms_norm(&x, &w, 1e-5).unwrap_err().to_string();
    assert!(err.contains("BF16") || err.contains("bf16"), "{err}");
    assert!(swiglu(&x, &x).is_err());
    Ok(())
}

#[test]
fn out_of_range_target_is_an_error() -> Result<()> {
    let logits = rand(&[2, 5], 2, DType::F32)?;
    assert!(cross_entropy_sum(&logits, &targets(&[1, 5])?).is_err());
    assert!(cross_entropy_sum(&logits, &targets(&[-3, 1])?).is_err());
    let w = rand(&[5, 5], 3, DType::F32)?;
    assert!(linear_cross_entropy_sum(&logits, &w, &targets(&[0, 7])?, 1).is_err());
    assert!(linear_cross_entropy_sum(&logits, &w, &targets(&[0, 1])?, 0).is_err());
    Ok(())
}

#[test]
fn bad_attention_shapes_are_errors() -> Result<()> {
    let q = rand(&[1, 4, 3, 8], 4, DType::F32)?;
    let k = rand(&[1, 4, 2, 8], 5, DType::F32)?; // NH = 3 is not a multiple of NKV = 2
    let seg = Tensor::zeros((1, 4), DType::U32, &Device::Cpu)?;
    assert!(attention(&q, &k, &k, &seg, 1.0, None).is_err());
    let k = rand(&[1, 4, 1, 8], 7, DType::F32)?;
    let err = attention(&q, &k, &k, &seg, 1.0, Some(0)).unwrap_err();
    assert!(err.to_string().contains("sliding window"), "{err}");
    let k = rand(&[1, 3, 3, 8], 6, DType::F32)?; // S < T
    assert!(
        attention(
            &q,
            &k,
            &k,
            &Tensor::zeros((1, 3), DType::U32, &Device::Cpu)?,
            1.0,
            None
        )
        .is_err()
    );
    Ok(())
}
