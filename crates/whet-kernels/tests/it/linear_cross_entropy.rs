use anyhow::Result;
use candle_core::{DType, Tensor};
use whet_kernels::{
    IGNORE_INDEX, linear_cross_entropy_sum, linear_cross_entropy_sum_for_training, reference,
};

use crate::common::*;
use crate::cross_entropy::targets;

#[test]
fn matches_reference_for_any_chunk() -> Result<()> {
    let t = targets(&[
        3,
        IGNORE_INDEX,
        0,
        40,
        12,
        IGNORE_INDEX,
        IGNORE_INDEX,
        7,
        41,
        2,
        9,
    ])?; // N = 11
    let h = rand(&[11, 24], 1, DType::F32)?;
    let w = rand(&[42, 24], 2, DType::F32)?;
    let r = |a: &[Tensor]| reference::linear_cross_entropy_sum(&a[0], &a[1], &t);
    // 1 row, chunks that do not divide N, exactly N, more than N.
    for chunk in [1, 3, 4, 11, 64] {
        let f = |a: &[Tensor]| linear_cross_entropy_sum(&a[0], &a[1], &t, chunk);
        check_against_reference(
            &format!("lm head ce, chunk {chunk}"),
            &f,
            &r,
            &[h.clone(), w.clone()],
            &[true, true],
            1e-5,
            1e-5,
        )?;
    }
    Ok(())
}

#[test]
fn chunks_of_ignored_rows_are_skipped_correctly() -> Result<()> {
    // With chunk 2 the first two chunks hold only ignored rows.
    let t = targets(&[IGNORE_INDEX, IGNORE_INDEX, IGNORE_INDEX, IGNORE_INDEX, 5, 1])?;
    let h = rand(&[6, 8], 3, DType::F32)?;
    let w = rand(&[10, 8], 4, DType::F32)?;
    let f = |a: &[Tensor]| linear_cross_entropy_sum(&a[0], &a[1], &t, 2);
    let r = |a: &[Tensor]| reference::linear_cross_entropy_sum(&a[0], &a[1], &t);
    check_against_reference(
        "lm head ce, ignored chunks",
        &f,
        &r,
        &[h, w],
        &[true, true],
        1e-5,
        1e-5,
    )
}

#[test]
fn frozen_head_gets_no_gradient() -> Result<()> {
    let t = targets(&[1, 2, IGNORE_INDEX, 0, 3])?;
    let h = rand(&[5, 8], 5, DType::F32)?;
    let w = rand(&[6, 8], 6, DType::F32)?;
    let f = |a: &[Tensor]| linear_cross_entropy_sum(&a[0], &a[1], &t, 2);
    let r = |a: &[Tensor]| reference::linear_cross_entropy_sum(&a[0], &a[1], &t);
    let (_, g) = run_with_grads(&f, &[h.clone(), w.clone()], &[true, false])?;
    assert!(
        g[1].is_none(),
        "a frozen LM head must get no gradient entry"
    );
    let (_, gr) = run_with_grads(&r, &[h, w], &[true, false])?;
    assert_close(
        "dh, frozen head",
        g[0].as_ref().unwrap(),
        gr[0].as_ref().unwrap(),
        1e-5,
        1e-5,
    );
    Ok(())
}

#[test]
fn tied_embedding_view_matches_reference() -> Result<()> {
    // The head as a strided view (e.g. a transposed (H, V) matrix).
    let t = targets(&[1, 5, IGNORE_INDEX, 0])?;
    let h = rand(&[4, 8], 7, DType::F32)?;
    let w = rand(&[8, 6], 8, DType::F32)?.t()?;
    let f = |a: &[Tensor]| linear_cross_entropy_sum(&a[0], &a[1], &t, 3);
    let r = |a: &[Tensor]| reference::linear_cross_entropy_sum(&a[0], &a[1], &t);
    check_against_reference(
        "lm head ce, strided w",
        &f,
        &r,
        &[h, w],
        &[true, true],
        1e-5,
        1e-5,
    )
}

#[test]
fn finite_differences_f64() -> Result<()> {
    let t = targets(&[1, IGNORE_INDEX, 4, 0, 2])?;
    let f = |a: &[Tensor]| linear_cross_entropy_sum(&a[0], &a[1], &t, 2);
    let inputs = [
        rand(&[5, 4], 9, DType::F64)?,
        (rand(&[6, 4], 10, DType::F64)? * 2.0)?,
    ];
    check_finite_differences("lm head ce dh", &f, &inputs, 0, 20, 1e-6)?;
    check_finite_differences("lm head ce dw", &f, &inputs, 1, 24, 1e-6)
}

/// The training variant computes the gradients in its forward (upstream gradient 1) and scales
/// them in the backward: the same gradients as the reference for any upstream gradient (the
/// harness weights the loss by a random factor), chunking, frozen or strided head.
#[test]
fn training_variant_matches_reference() -> Result<()> {
    let t = targets(&[3, IGNORE_INDEX, 0, 40, 12, IGNORE_INDEX, 7, 41, 2])?; // N = 9
    let h = rand(&[9, 24], 11, DType::F32)?;
    let w = rand(&[42, 24], 12, DType::F32)?;
    let r = |a: &[Tensor]| reference::linear_cross_entropy_sum(&a[0], &a[1], &t);
    for chunk in [1, 4, 9, 64] {
        let f = |a: &[Tensor]| linear_cross_entropy_sum_for_training(&a[0], &a[1], &t, chunk);
        for track in [[true, true], [true, false], [false, true]] {
            check_against_reference(
                &format!("lm head ce for training, chunk {chunk}, tracked {track:?}"),
                &f,
                &r,
                &[h.clone(), w.clone()],
                &track,
                1e-5,
                1e-5,
            )?;
        }
    }
    let ws = rand(&[24, 42], 13, DType::F32)?.t()?;
    let f = |a: &[Tensor]| linear_cross_entropy_sum_for_training(&a[0], &a[1], &t, 4);
    check_against_reference(
        "lm head ce for training, strided w",
        &f,
        &r,
        &[h, ws],
        &[true, true],
        1e-5,
        1e-5,
    )
}

#[test]
fn training_variant_finite_differences_f64() -> Result<()> {
    let t = targets(&[1, IGNORE_INDEX, 4, 0, 2])?;
    let f = |a: &[Tensor]| linear_cross_entropy_sum_for_training(&a[0], &a[1], &t, 2);
    let inputs = [
        rand(&[5, 4], 14, DType::F64)?,
        (rand(&[6, 4], 15, DType::F64)? * 2.0)?,
    ];
    check_finite_differences("lm head ce for training dh", &f, &inputs, 0, 20, 1e-6)?;
    check_finite_differences("lm head ce for training dw", &f, &inputs, 1, 24, 1e-6)
}
