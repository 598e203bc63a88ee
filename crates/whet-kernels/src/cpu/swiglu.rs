//! Gated linear units, elementwise: `act(gate) * up` with SiLU (SwiGLU) or tanh-approximated
//! GELU (GeGLU).

use rayon::prelude::*;

use super::{Float, multiversion};

/// Elements per rayon task.
const BLOCK: usize = 1 << 14;

/// The gate's activation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Act {
    /// `x * sigmoid(x)`.
    Silu,
    /// `0.5 x (1 + tanh(sqrt(2 / pi) (x + 0.044715 x^3)))`, PyTorch's
    /// `gelu(approximate="tanh")` (`gelu_pytorch_tanh` in transformers).
    GeluTanh,
}

#[inline(always)]
fn sigmoid<T: Float>(x: T) -> T {
    T::ONE / (T::ONE + (-x).exp())
}

#[inline(always)]
fn c<T: Float>(v: f64) -> T {
    T::from_f64(v)
}

/// tanh(z) = 1 - 2 / (exp(2z) + 1): exact at both tails (exp overflows to inf or falls to 0).
#[inline(always)]
fn tanh<T: Float>(z: T) -> T {
    T::ONE - c::<T>(2.0) / ((z + z).exp() + T::ONE)
}

/// sqrt(2 / pi).
const GELU_K: f64 = 0.797_884_560_802_865_4;
const GELU_C: f64 = 0.044_715;

/// (act(x), act'(x)).
#[inline(always)]
fn act_and_grad<T: Float>(act: Act, x: T) -> (T, T) {
    match act {
        Act::Silu => {
            let s = sigmoid(x);
            (x * s, s * (T::ONE + x * (T::ONE - s)))
        }
        Act::GeluTanh => {
            let half = c::<T>(0.5);
            let x2 = x * x;
            let t = tanh(c::<T>(GELU_K) * (x + c::<T>(GELU_C) * x2 * x));
            let dz = c::<T>(GELU_K) * (T::ONE + c::<T>(3.0 * GELU_C) * x2);
            (
                half * x * (T::ONE + t),
                half * (T::ONE + t) + half * x * (T::ONE - t * t) * dz,
            )
        }
    }
}

multiversion! {
    fn fwd_block<T: Float>(y: &mut [T], g: &[T], u: &[T], act: Act) = fwd_block_impl;
}

#[inline(always)]
fn fwd_block_impl<T: Float>(y: &mut [T], g: &[T], u: &[T], act: Act) {
    match act {
        Act::Silu => {
            for ((y, g), u) in y.iter_mut().zip(g).zip(u) {
                *y = *g * sigmoid(*g) * *u;
            }
        }
        Act::GeluTanh => {
            for ((y, g), u) in y.iter_mut().zip(g).zip(u) {
                *y = act_and_grad(Act::GeluTanh, *g).0 * *u;
            }
        }
    }
}

pub(crate) fn fwd<T: Float>(gate: &[T], up: &[T], act: Act) -> Vec<T> {
    let mut y = vec![T::ZERO; gate.len()];
    y.par_chunks_mut(BLOCK)
        .zip(gate.par_chunks(BLOCK).zip(up.par_chunks(BLOCK)))
        .for_each(|(y, (g, u))| fwd_block(y, g, u, act));
    y
}

multiversion! {
    fn bwd_block<T: Float>(dg: Option<&mut [T]>, du: Option<&mut [T]>, g: &[T], u: &[T], dy: &[T], act: Act) = bwd_block_impl;
}

#[inline(always)]
fn bwd_block_impl<T: Float>(
    dg: Option<&mut [T]>,
    du: Option<&mut [T]>,
    g: &[T],
    u: &[T],
    dy: &[T],
    act: Act,
) {
    if let Some(dg) = dg {
        for (((dg, g), u), dy) in dg.iter_mut().zip(g).zip(u).zip(dy) {
            *dg = *dy * *u * act_and_grad(act, *g).1;
        }
    }
    if let Some(du) = du {
        for ((du, g), dy) in du.iter_mut().zip(g).zip(dy) {
            *du = *dy * act_and_grad(act, *g).0;
        }
    }
}

/// d up = dy * act(g); d gate = dy * up * act'(g).
pub(crate) fn bwd<T: Float>(
    (gate, up, dy): (&[T], &[T], &[T]),
    need_dg: bool,
    need_du: bool,
    act: Act,
) -> (Option<Vec<T>>, Option<Vec<T>>) {
    let n = gate.len();
    let mut dg = if need_dg {
        vec![T::ZERO; n]
    } else {
        Vec::new()
    };
    let mut du = if need_du {
        vec![T::ZERO; n]
    } else {
        Vec::new()
    };
    let part = |i: usize| {
        let r = i * BLOCK..((i + 1) * BLOCK).min(n);
        (&gate[r.clone()], &up[r.clone()], &dy[r])
    };
    match (need_dg, need_du) {
        (true, true) => dg
            .par_chunks_mut(BLOCK)
            .zip(du.par_chunks_mut(BLOCK))
            .enumerate()
            .for_each(|(i, (dg, du))| {
                let (g, u, dy) = part(i);
                bwd_block(Some(dg), Some(du), g, u, dy, act)
            }),
        (true, false) => dg.par_chunks_mut(BLOCK).enumerate().for_each(|(i, dg)| {
            let (g, u, dy) = part(i);
            bwd_block(Some(dg), None, g, u, dy, act)
        }),
        (false, true) => du.par_chunks_mut(BLOCK).enumerate().for_each(|(i, du)| {
            let (g, u, dy) = part(i);
            bwd_block(None, Some(du), g, u, dy, act)
        }),
        (false, false) => {}
    }
    (need_dg.then_some(dg), need_du.then_some(du))
}
