//! The kernel self-check and the reference fallback, on the CPU: the CPU ops stand in for a
//! device's fused set, and deliberately broken sets stand in for a kernel that is wrong there.

use anyhow::Result;
use candle_core::{DType, Device, Tensor};
use whet_kernels::{Kernels, Op, Ops, reference, self_check, self_check_ops};

use crate::common::*;

#[test]
fn the_cpu_kernels_pass_their_self_check() -> Result<()> {
    let check = self_check(&Device::Cpu)?;
    eprint!("{check}");
    assert!(check.failed_ops().is_empty(), "{check}");
    assert_eq!(check.kernels(), Kernels::FUSED);
    for op in Op::ALL {
        let mine: Vec<_> = check.checks.iter().filter(|c| c.op == op).collect();
        assert!(!mine.is_empty(), "{op} was not checked");
        for c in mine {
            assert_eq!(c.dtype, DType::F32, "the CPU kernels are checked in f32");
            assert!(c.error < 1e-4, "{op}/{}: {:.2e}", c.case, c.error);
        }
    }
    let table = check.to_string();
    for op in Op::ALL {
        assert!(table.contains(op.name()), "{table}");
    }
    assert!(!table.contains("-> reference"), "{table}");
    Ok(())
}

/// How [`Broken`] breaks its op.
#[derive(Clone, Copy, Debug)]
enum Fault {
    /// The output 1% too large.
    Forward,
    /// The output right, every gradient through it 5% too large.
    Backward,
    /// NaN in the output.
    NotFinite,
    /// The op returns an error.
    Error,
}

/// The fused set with one op broken.
struct Broken(Op, Fault);

impl Broken {
    fn apply(&self, op: Op, y: candle_core::Result<Tensor>) -> candle_core::Result<Tensor> {
        if op != self.0 {
            return y;
        }
        let y = y?;
        match self.1 {
            Fault::Forward => y * 1.01,
            Fault::Backward => {
                // Same value (y - detach(y) is exactly 0), gradient scaled by 1.05.
                let d = y.detach();
                &d + ((&y - &d)? * 1.05)?
            }
            Fault::NotFinite => y.broadcast_add(&Tensor::new(f32::NAN, y.device())?),
            Fault::Error => candle_core::bail!("the broken {op} kernel"),
        }
    }
}

impl Ops for Broken {
    fn rms_norm(&self, x: &Tensor, w: &Tensor, eps: f64) -> candle_core::Result<Tensor> {
        self.apply(Op::RmsNorm, Kernels::FUSED.rms_norm(x, w, eps))
    }
    fn rope(&self, x: &Tensor, cos: &Tensor, sin: &Tensor) -> candle_core::Result<Tensor> {
        self.apply(Op::Rope, Kernels::FUSED.rope(x, cos, sin))
    }
    fn attention(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        segments: &Tensor,
        scale: f64,
        window: Option<usize>,
    ) -> candle_core::Result<Tensor> {
        self.apply(
            Op::Attention,
            Kernels::FUSED.attention(q, k, v, segments, scale, window),
        )
    }
    fn swiglu(&self, gate: &Tensor, up: &Tensor) -> candle_core::Result<Tensor> {
        self.apply(Op::Swiglu, Kernels::FUSED.swiglu(gate, up))
    }
    fn geglu(&self, gate: &Tensor, up: &Tensor) -> candle_core::Result<Tensor> {
        self.apply(Op::Geglu, Kernels::FUSED.geglu(gate, up))
    }
    fn linear(&self, x: &Tensor, w: &Tensor, bias: Option<&Tensor>) -> candle_core::Result<Tensor> {
        self.apply(Op::Linear, Kernels::FUSED.linear(x, w, bias))
    }
    fn lora_linear(
        &self,
        x: &Tensor,
        w: &Tensor,
        bias: Option<&Tensor>,
        ab: (&Tensor, &Tensor),
        scale: f64,
        mask: Option<&Tensor>,
    ) -> candle_core::Result<Tensor> {
        self.apply(
            Op::LoraLinear,
            Kernels::FUSED.lora_linear(x, w, bias, ab, scale, mask),
        )
    }
    fn cross_entropy_sum(&self, logits: &Tensor, targets: &Tensor) -> candle_core::Result<Tensor> {
        self.apply(
            Op::CrossEntropy,
            Kernels::FUSED.cross_entropy_sum(logits, targets),
        )
    }
    fn linear_cross_entropy_sum(
        &self,
        h: &Tensor,
        w: &Tensor,
        targets: &Tensor,
        chunk: usize,
        for_training: bool,
    ) -> candle_core::Result<Tensor> {
        self.apply(
            Op::LinearCrossEntropy,
            Kernels::FUSED.linear_cross_entropy_sum(h, w, targets, chunk, for_training),
        )
    }
}

#[test]
fn a_broken_kernel_is_caught_and_only_it_falls_back() -> Result<()> {
    for op in Op::ALL {
        for fault in [
            Fault::Forward,
            Fault::Backward,
            Fault::NotFinite,
            Fault::Error,
        ] {
            let check = self_check_ops(&Broken(op, fault), &Device::Cpu)?;
            assert_eq!(check.failed_ops(), vec![op], "{op} {fault:?}:\n{check}");
            assert_eq!(
                check.kernels(),
                Kernels::FUSED.with_reference(op),
                "{op} {fault:?}"
            );
            let table = check.to_string();
            let line = table
                .lines()
                .find(|l| l.trim_start().starts_with(op.name()) && l.contains("-> reference"))
                .unwrap_or_else(|| panic!("{op} {fault:?}: no failing line in\n{table}"));
            match fault {
                Fault::NotFinite => assert!(line.contains("non-finite"), "{line}"),
                Fault::Error => assert!(line.contains("the broken"), "{line}"),
                _ => assert!(line.contains("> tolerance"), "{line}"),
            }
        }
    }
    Ok(())
}

/// An op on its reference runs exactly the composed ops: bit-identical outputs.
#[test]
fn an_op_on_its_reference_runs_the_composed_ops() -> Result<()> {
    let cpu = Device::Cpu;
    let (q, k, v) = (
        rand(&[2, 20, 4, 16], 1, DType::F32)?,
        rand(&[2, 20, 2, 16], 2, DType::F32)?,
        rand(&[2, 20, 2, 16], 3, DType::F32)?,
    );
    let seg = Tensor::from_vec(
        (0..40u32).map(|i| u32::from(i >= 27)).collect::<Vec<_>>(),
        (2, 20),
        &cpu,
    )?;
    let only = Kernels::FUSED.with_reference(Op::Attention);
    let want = reference::attention(&q, &k, &v, &seg, 0.25, None)?;
    for ks in [only, Kernels::REFERENCE] {
        let got = ks.attention(&q, &k, &v, &seg, 0.25, None)?;
        assert_eq!(
            got.flatten_all()?.to_vec1::<f32>()?,
            want.flatten_all()?.to_vec1::<f32>()?,
            "{ks}"
        );
    }
    // The fused kernel is a different computation: equal up to rounding, not bit for bit.
    let fused = Kernels::FUSED.attention(&q, &k, &v, &seg, 0.25, None)?;
    assert_close("fused attention", &fused, &want, 1e-4, 1e-5);

    // The other ops of `only` stay fused.
    let (x, w) = (rand(&[3, 8], 4, DType::F32)?, rand(&[8], 5, DType::F32)?);
    assert_eq!(
        only.rms_norm(&x, &w, 1e-6)?.to_vec2::<f32>()?,
        whet_kernels::rms_norm(&x, &w, 1e-6)?.to_vec2::<f32>()?
    );
    assert_eq!(
        Kernels::REFERENCE
            .rms_norm(&x, &w, 1e-6)?
            .to_vec2::<f32>()?,
        reference::rms_norm(&x, &w, 1e-6)?.to_vec2::<f32>()?
    );
    Ok(())
}
