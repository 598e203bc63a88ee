use std::sync::Arc;

use anyhow::Result;
use candle_core::{DType, Tensor, Var};
use whet_kernels::{SideGrads, checkpoint, linear, rms_norm, swiglu};

use crate::common::*;

/// A small residual block with two weights: norm, gate/up, swiglu, down.
fn block(x: &Tensor, w1: &Tensor, w2: &Tensor, norm: &Tensor) -> candle_core::Result<Tensor> {
    let h = rms_norm(x, norm, 1e-5)?;
    let gu = linear(&h, w1, None)?; // (.., 2I)
    let i = gu.dim(candle_core::D::Minus1)? / 2;
    let act = swiglu(&gu.narrow(2, 0, i)?, &gu.narrow(2, i, i)?)?;
    x + linear(&act, w2, None)?
}

/// Two checkpointed blocks in a row give the same loss and the same gradients (input and
/// every parameter) as the plain graph, whether or not the input needs a gradient.
#[test]
fn gradients_equal_the_plain_graph() -> Result<()> {
    for input_tracks in [true, false] {
        let x0 = rand(&[2, 5, 16], 1, DType::F32)?;
        let x = if input_tracks {
            Var::from_tensor(&x0)?.into_inner()
        } else {
            x0.clone()
        };
        let w1 = Var::from_tensor(&rand(&[24, 16], 2, DType::F32)?)?;
        let w2 = Var::from_tensor(&rand(&[16, 12], 3, DType::F32)?)?;
        let norm = Var::from_tensor(&(rand(&[16], 4, DType::F32)? + 1.0)?)?;
        let up = rand(&[2, 5, 16], 5, DType::F32)?;
        let params = vec![
            w1.as_tensor().clone(),
            w2.as_tensor().clone(),
            norm.as_tensor().clone(),
        ];

        let plain = block(&block(&x, &w1, &w2, &norm)?, &w1, &w2, &norm)?;
        let want = (plain * &up)?.sum_all()?.backward()?;

        let side = SideGrads::default();
        let (a, b, n) = (w1.clone(), w2.clone(), norm.clone());
        let seg: whet_kernels::Segment = Arc::new(move |x: &Tensor| block(x, &a, &b, &n));
        let h = checkpoint(&x, seg.clone(), params.clone(), &side)?;
        let y = checkpoint(&h, seg, params.clone(), &side)?;
        let mut got = (y * &up)?.sum_all()?.backward()?;
        side.merge_into(&mut got)?;

        for (name, p) in ["w1", "w2", "norm"].iter().zip(&params) {
            let g = got.get(p).expect("checkpointed parameter gradient");
            assert_close(name, g, want.get(p).expect("plain gradient"), 1e-5, 1e-6);
        }
        if input_tracks {
            assert_close(
                "dx",
                got.get(&x).expect("input gradient"),
                want.get(&x).expect("plain input gradient"),
                1e-5,
                1e-6,
            );
        } else {
            assert!(got.get(&x).is_none());
        }
    }
    Ok(())
}
