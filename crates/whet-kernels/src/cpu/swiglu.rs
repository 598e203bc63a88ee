//! SwiGLU: silu(gate) * up, elementwise.

use rayon::prelude::*;

use super::{Float, multiversion};

/// Elements per rayon task.
const BLOCK: usize = 1 << 14;

#[inline(always)]
fn sigmoid<T: Float>(x: T) -> T {
    T::ONE / (T::ONE + (-x).exp())
}

multiversion! {
    fn fwd_block<T: Float>(y: &mut [T], g: &[T], u: &[T]) = fwd_block_impl;
}

#[inline(always)]
fn fwd_block_impl<T: Float>(y: &mut [T], g: &[T], u: &[T]) {
    for ((y, g), u) in y.iter_mut().zip(g).zip(u) {
        *y = *g * sigmoid(*g) * *u;
    }
}

pub(crate) fn fwd<T: Float>(gate: &[T], up: &[T]) -> Vec<T> {
    let mut y = vec![T::ZERO; gate.len()];
    y.par_chunks_mut(BLOCK)
        .zip(gate.par_chunks(BLOCK).zip(up.par_chunks(BLOCK)))
        .for_each(|(y, (g, u))| fwd_block(y, g, u));
    y
}

multiversion! {
    fn bwd_block<T: Float>(dg: Option<&mut [T]>, du: Option<&mut [T]>, g: &[T], u: &[T], dy: &[T]) = bwd_block_impl;
}

#[inline(always)]
fn bwd_block_impl<T: Float>(
    dg: Option<&mut [T]>,
    du: Option<&mut [T]>,
    g: &[T],
    u: &[T],
    dy: &[T],
) {
    if let Some(dg) = dg {
        for (((dg, g), u), dy) in dg.iter_mut().zip(g).zip(u).zip(dy) {
            let s = sigmoid(*g);
            *dg = *dy * *u * s * (T::ONE + *g * (T::ONE - s));
        }
    }
    if let Some(du) = du {
        for ((du, g), dy) in du.iter_mut().zip(g).zip(dy) {
            *du = *dy * *g * sigmoid(*g);
        }
    }
}

/// d up = dy * silu(g); d gate = dy * up * sig(g) * (1 + g * (1 - sig(g))).
pub(crate) fn bwd<T: Float>(
    gate: &[T],
    up: &[T],
    dy: &[T],
    need_dg: bool,
    need_du: bool,
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
                bwd_block(Some(dg), Some(du), g, u, dy)
            }),
        (true, false) => dg.par_chunks_mut(BLOCK).enumerate().for_each(|(i, dg)| {
            let (g, u, dy) = part(i);
            bwd_block(Some(dg), None, g, u, dy)
        }),
        (false, true) => du.par_chunks_mut(BLOCK).enumerate().for_each(|(i, du)| {
            let (g, u, dy) = part(i);
            bwd_block(None, Some(du), g, u, dy)
        }),
        (false, false) => {}
    }
    (need_dg.then_some(dg), need_du.then_some(du))
}
