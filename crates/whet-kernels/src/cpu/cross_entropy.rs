//! Cross entropy summed over supervised rows. logits: (N, V), targets: (N) i64.

use candle_core::{Result, bail};
use rayon::prelude::*;

use super::{Float, max, multiversion};
use crate::IGNORE_INDEX;

/// Rows per rayon task.
pub(crate) const ROWS_PER_TASK: usize = 4;

/// Errors unless every target is in [0, V) or [`IGNORE_INDEX`].
pub(crate) fn check_targets(targets: &[i64], v: usize) -> Result<()> {
    if let Some(t) = targets
        .iter()
        .find(|&&t| t != IGNORE_INDEX && (t < 0 || t as u64 >= v as u64))
    {
        bail!(
            "cross entropy: target {t} is outside the vocabulary [0, {v}) and is not IGNORE_INDEX ({IGNORE_INDEX})"
        )
    }
    Ok(())
}

/// log sum exp of a row.
#[inline(always)]
pub(crate) fn row_lse<T: Float>(x: &[T]) -> T {
    const L: usize = 16;
    let m = max(x);
    let mut acc = [T::ZERO; L];
    let (c, r) = x.as_chunks::<L>();
    for c in c {
        for l in 0..L {
            acc[l] += (c[l] - m).exp();
        }
    }
    let mut s = T::ZERO;
    for v in r {
        s += (*v - m).exp();
    }
    for a in acc {
        s += a;
    }
    m + s.ln()
}

multiversion! {
    /// Turns a row of logits into `g * (softmax(row) - onehot(target))`.
    pub(crate) fn row_grad_in_place<T: Float>(row: &mut [T], lse: T, target: usize, g: T) = row_grad_in_place_impl;
}

#[inline(always)]
fn row_grad_in_place_impl<T: Float>(row: &mut [T], lse: T, target: usize, g: T) {
    for x in row.iter_mut() {
        *x = (*x - lse).exp() * g;
    }
    row[target] -= g;
}

multiversion! {
    /// A block of rows: writes each row's lse (0 for ignored rows), returns the summed loss.
    pub(crate) fn rows_fwd<T: Float>(logits: &[T], targets: &[i64], v: usize, lse: &mut [T]) -> f64 = rows_fwd_impl;
}

#[inline(always)]
fn rows_fwd_impl<T: Float>(logits: &[T], targets: &[i64], v: usize, lse: &mut [T]) -> f64 {
    let mut loss = 0f64;
    for ((x, &t), lse) in logits.chunks_exact(v).zip(targets).zip(lse.iter_mut()) {
        if t == IGNORE_INDEX {
            *lse = T::ZERO;
            continue;
        }
        *lse = row_lse(x);
        loss += (*lse - x[t as usize]).to_f64();
    }
    loss
}

/// Fills `lse` (one per row of `logits`, (N, V)) and returns the summed loss, the rows split
/// over rayon tasks. The per-task sums are added in row order: a parallel `sum` would add them
/// in an order that varies from run to run.
pub(crate) fn rows_fwd_sum<T: Float>(
    logits: &[T],
    targets: &[i64],
    v: usize,
    lse: &mut [T],
) -> f64 {
    lse.par_chunks_mut(ROWS_PER_TASK)
        .zip(
            logits
                .par_chunks(ROWS_PER_TASK * v)
                .zip(targets.par_chunks(ROWS_PER_TASK)),
        )
        .map(|(lse, (x, t))| rows_fwd(x, t, v, lse))
        .collect::<Vec<f64>>()
        .into_iter()
        .sum()
}

/// -> (sum of the losses, per-row lse (0 for ignored rows)). Targets must be checked.
pub(crate) fn fwd<T: Float>(logits: &[T], targets: &[i64], v: usize) -> (f64, Vec<T>) {
    let n = targets.len();
    let mut lse = vec![T::ZERO; n];
    if v == 0 || n == 0 {
        return (0.0, lse);
    }
    let loss = rows_fwd_sum(logits, targets, v, &mut lse);
    (loss, lse)
}

/// d logits = g * (softmax - onehot) on supervised rows, 0 on ignored rows. -> (N, V)
pub(crate) fn bwd<T: Float>(logits: &[T], targets: &[i64], lse: &[T], g: T, v: usize) -> Vec<T> {
    let mut d = vec![T::ZERO; logits.len()];
    if v == 0 || d.is_empty() {
        return d;
    }
    d.par_chunks_mut(v)
        .zip(logits.par_chunks(v))
        .enumerate()
        .for_each(|(i, (d, x))| {
            let t = targets[i];
            if t != IGNORE_INDEX {
                d.copy_from_slice(x);
                row_grad_in_place(d, lse[i], t as usize, g);
            }
        });
    d
}
