//! SwiGLU: silu(gate) * up, elementwise.

use rayon::prelude::*;

use super::Float;

/// Elements per rayon task.
const BLOCK: usize = 1 << 14;

#[inline(always)]
fn sigmoid<T: Float>(x: T) -> T {
    T::ONE / (T::ONE + (-x).exp())
}

pub(crate) fn fwd<T: Float>(gate: &[T], up: &[T]) -> Vec<T> {
    let mut y = vec![T::ZERO; gate.len()];
    y.par_chunks_mut(BLOCK).zip(gate.par_chunks(BLOCK).zip(up.par_chunks(BLOCK))).for_each(|(y, (g, u))| {
        for ((y, g), u) in y.iter_mut().zip(g).zip(u) {
            *y = *g * sigmoid(*g) * *u;
        }
    });
    y
}

/// d up = dy * silu(g); d gate = dy * up * sig(g) * (1 + g * (1 - sig(g))).
pub(crate) fn bwd<T: Float>(gate: &[T], up: &[T], dy: &[T], need_dg: bool, need_du: bool) -> (Option<Vec<T>>, Option<Vec<T>>) {
    let n = gate.len();
    let mut dg = if need_dg { vec![T::ZERO; n] } else { Vec::new() };
    let mut du = if need_du { vec![T::ZERO; n] } else { Vec::new() };
    let work = |off: usize, dg: Option<&mut [T]>, du: Option<&mut [T]>| {
        let len = dg.as_ref().map(|s| s.len()).or(du.as_ref().map(|s| s.len())).unwrap_or(0);
        let (g, u, dy) = (&gate[off..off + len], &up[off..off + len], &dy[off..off + len]);
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
    };
    match (need_dg, need_du) {
        (true, true) => dg
            .par_chunks_mut(BLOCK)
            .zip(du.par_chunks_mut(BLOCK))
            .enumerate()
            .for_each(|(i, (dg, du))| work(i * BLOCK, Some(dg), Some(du))),
        (true, false) => dg.par_chunks_mut(BLOCK).enumerate().for_each(|(i, dg)| work(i * BLOCK, Some(dg), None)),
        (false, true) => du.par_chunks_mut(BLOCK).enumerate().for_each(|(i, du)| work(i * BLOCK, None, Some(du))),
        (false, false) => {}
    }
    (need_dg.then_some(dg), need_du.then_some(du))
}
