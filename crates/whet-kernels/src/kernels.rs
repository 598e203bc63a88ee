//! Which implementation of each op runs: its fused kernel (the crate-root functions: `src/cpu/`,
//! `src/cuda/`) or its composed reference (`reference.rs`, candle primitives differentiated by
//! candle's autograd, which have CPU and CUDA implementations of their own).
//!
//! A [`Kernels`] value is a plain `Copy` choice per op that the model holds and passes down, so
//! two models in one process may run different sets. The orchestrator picks it: `fused` by
//! default, `reference` on request, or the fused set less the ops that failed
//! [`crate::self_check`] on the user's device.

use std::fmt;

use candle_core::{Result, Tensor};

use crate::reference;

/// The ops that have both a fused kernel and a composed reference.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Op {
    RmsNorm,
    Rope,
    Attention,
    Swiglu,
    Geglu,
    Linear,
    LoraLinear,
    CrossEntropy,
    LinearCrossEntropy,
}

impl Op {
    pub const ALL: [Op; 9] = [
        Op::RmsNorm,
        Op::Rope,
        Op::Attention,
        Op::Swiglu,
        Op::Geglu,
        Op::Linear,
        Op::LoraLinear,
        Op::CrossEntropy,
        Op::LinearCrossEntropy,
    ];

    /// The op's function name in this crate (`rms_norm`, `linear_cross_entropy_sum`, ...).
    pub fn name(self) -> &'static str {
        match self {
            Op::RmsNorm => "rms_norm",
            Op::Rope => "rope",
            Op::Attention => "attention",
            Op::Swiglu => "swiglu",
            Op::Geglu => "geglu",
            Op::Linear => "linear",
            Op::LoraLinear => "lora_linear",
            Op::CrossEntropy => "cross_entropy_sum",
            Op::LinearCrossEntropy => "linear_cross_entropy_sum",
        }
    }

    pub fn from_name(name: &str) -> Option<Op> {
        Op::ALL.into_iter().find(|op| op.name() == name)
    }

    fn bit(self) -> u16 {
        1 << self as u16
    }
}

impl fmt::Display for Op {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// A choice of implementation per op: the ops in the set run their composed reference, every
/// other op its fused kernel.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Kernels {
    reference: u16,
}

impl Kernels {
    /// Every op on its fused kernel (the default).
    pub const FUSED: Kernels = Kernels { reference: 0 };
    /// Every op composed from candle primitives: slow and memory hungry, correct on any device.
    pub const REFERENCE: Kernels = Kernels {
        reference: (1 << Op::ALL.len()) - 1,
    };

    /// This choice with `op` moved to its reference.
    #[must_use]
    pub fn with_reference(self, op: Op) -> Kernels {
        Kernels {
            reference: self.reference | op.bit(),
        }
    }

    pub fn uses_reference(self, op: Op) -> bool {
        self.reference & op.bit() != 0
    }

    /// The ops that run their reference, in [`Op::ALL`] order.
    pub fn reference_ops(self) -> Vec<Op> {
        Op::ALL
            .into_iter()
            .filter(|&op| self.uses_reference(op))
            .collect()
    }

    /// `fused`, `reference`, or `reference:OP[,OP..]` (op names as [`Op::name`], e.g.
    /// `reference:attention,rms_norm`): the form [`Kernels`]' `Display` writes.
    pub fn parse(s: &str) -> std::result::Result<Kernels, String> {
        let names = || {
            Op::ALL
                .iter()
                .map(|op| op.name())
                .collect::<Vec<_>>()
                .join(", ")
        };
        match s.trim() {
            "fused" => Ok(Kernels::FUSED),
            "reference" => Ok(Kernels::REFERENCE),
            other => {
                let Some(list) = other.strip_prefix("reference:") else {
                    return Err(format!(
                        "{other:?}: expected fused, reference, or reference:OP,OP.. (ops: {})",
                        names()
                    ));
                };
                list.split(',')
                    .map(str::trim)
                    .try_fold(Kernels::FUSED, |k, name| match Op::from_name(name) {
                        Some(op) => Ok(k.with_reference(op)),
                        None => Err(format!("{name:?} is not an op (ops: {})", names())),
                    })
            }
        }
    }
}

impl fmt::Display for Kernels {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            Kernels::FUSED => f.write_str("fused"),
            Kernels::REFERENCE => f.write_str("reference"),
            k => {
                let ops: Vec<&str> = k.reference_ops().into_iter().map(Op::name).collect();
                write!(f, "reference:{}", ops.join(","))
            }
        }
    }
}

/// The ops with one signature for every implementation. [`Kernels`] implements it by choosing,
/// op by op, between the crate-root function and [`reference`]; [`crate::self_check_ops`] takes
/// any implementation (the tests hand it a deliberately broken one).
pub trait Ops {
    /// See [`crate::rms_norm`].
    fn rms_norm(&self, x: &Tensor, weight: &Tensor, eps: f64) -> Result<Tensor>;
    /// See [`crate::rope`].
    fn rope(&self, x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor>;
    /// See [`crate::attention`].
    fn attention(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        segments: &Tensor,
        scale: f64,
        window: Option<usize>,
    ) -> Result<Tensor>;
    /// See [`crate::swiglu`].
    fn swiglu(&self, gate: &Tensor, up: &Tensor) -> Result<Tensor>;
    /// See [`crate::geglu`].
    fn geglu(&self, gate: &Tensor, up: &Tensor) -> Result<Tensor>;
    /// See [`crate::linear`].
    fn linear(&self, x: &Tensor, w: &Tensor, bias: Option<&Tensor>) -> Result<Tensor>;
    /// See [`crate::lora_linear`].
    fn lora_linear(
        &self,
        x: &Tensor,
        w: &Tensor,
        bias: Option<&Tensor>,
        ab: (&Tensor, &Tensor),
        scale: f64,
        mask: Option<&Tensor>,
    ) -> Result<Tensor>;
    /// See [`crate::cross_entropy_sum`].
    fn cross_entropy_sum(&self, logits: &Tensor, targets: &Tensor) -> Result<Tensor>;
    /// [`crate::linear_cross_entropy_sum`], or with `for_training`
    /// [`crate::linear_cross_entropy_sum_for_training`].
    fn linear_cross_entropy_sum(
        &self,
        h: &Tensor,
        w: &Tensor,
        targets: &Tensor,
        chunk: usize,
        for_training: bool,
    ) -> Result<Tensor>;
}

impl Ops for Kernels {
    fn rms_norm(&self, x: &Tensor, weight: &Tensor, eps: f64) -> Result<Tensor> {
        if self.uses_reference(Op::RmsNorm) {
            reference::rms_norm(x, weight, eps)
        } else {
            crate::rms_norm(x, weight, eps)
        }
    }

    fn rope(&self, x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
        if self.uses_reference(Op::Rope) {
            reference::rope(x, cos, sin)
        } else {
            crate::rope(x, cos, sin)
        }
    }

    fn attention(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        segments: &Tensor,
        scale: f64,
        window: Option<usize>,
    ) -> Result<Tensor> {
        if self.uses_reference(Op::Attention) {
            reference::attention(q, k, v, segments, scale, window)
        } else {
            crate::attention(q, k, v, segments, scale, window)
        }
    }

    fn swiglu(&self, gate: &Tensor, up: &Tensor) -> Result<Tensor> {
        if self.uses_reference(Op::Swiglu) {
            reference::swiglu(gate, up)
        } else {
            crate::swiglu(gate, up)
        }
    }

    fn geglu(&self, gate: &Tensor, up: &Tensor) -> Result<Tensor> {
        if self.uses_reference(Op::Geglu) {
            reference::geglu(gate, up)
        } else {
            crate::geglu(gate, up)
        }
    }

    fn linear(&self, x: &Tensor, w: &Tensor, bias: Option<&Tensor>) -> Result<Tensor> {
        if self.uses_reference(Op::Linear) {
            reference::linear(x, w, bias)
        } else {
            crate::linear(x, w, bias)
        }
    }

    fn lora_linear(
        &self,
        x: &Tensor,
        w: &Tensor,
        bias: Option<&Tensor>,
        ab: (&Tensor, &Tensor),
        scale: f64,
        mask: Option<&Tensor>,
    ) -> Result<Tensor> {
        if self.uses_reference(Op::LoraLinear) {
            reference::lora_linear(x, w, bias, ab, scale, mask)
        } else {
            crate::lora_linear(x, w, bias, ab, scale, mask)
        }
    }

    fn cross_entropy_sum(&self, logits: &Tensor, targets: &Tensor) -> Result<Tensor> {
        if self.uses_reference(Op::CrossEntropy) {
            reference::cross_entropy_sum(logits, targets)
        } else {
            crate::cross_entropy_sum(logits, targets)
        }
    }

    fn linear_cross_entropy_sum(
        &self,
        h: &Tensor,
        w: &Tensor,
        targets: &Tensor,
        chunk: usize,
        for_training: bool,
    ) -> Result<Tensor> {
        if self.uses_reference(Op::LinearCrossEntropy) {
            reference::linear_cross_entropy_sum(h, w, targets)
        } else if for_training {
            crate::linear_cross_entropy_sum_for_training(h, w, targets, chunk)
        } else {
            crate::linear_cross_entropy_sum(h, w, targets, chunk)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_and_display_round_trip() {
        let some = Kernels::FUSED
            .with_reference(Op::Attention)
            .with_reference(Op::RmsNorm);
        for k in [Kernels::FUSED, Kernels::REFERENCE, some] {
            assert_eq!(Kernels::parse(&k.to_string()), Ok(k));
        }
        assert_eq!(some.to_string(), "reference:rms_norm,attention");
        assert_eq!(
            Kernels::parse("reference: swiglu , rope"),
            Ok(Kernels::FUSED
                .with_reference(Op::Swiglu)
                .with_reference(Op::Rope))
        );
        assert_eq!(Kernels::REFERENCE.reference_ops(), Op::ALL.to_vec());
        assert!(Kernels::FUSED.reference_ops().is_empty());
        let err = Kernels::parse("reference:flash").unwrap_err();
        assert!(err.contains("\"flash\" is not an op"), "{err}");
        assert!(
            Kernels::parse("fast")
                .unwrap_err()
                .contains("expected fused")
        );
    }
}
