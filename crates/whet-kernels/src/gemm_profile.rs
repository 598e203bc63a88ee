//! An opt-in profile of whet's f32 GEMM kernels (the AVX-512 and AVX2 loop nests): per shape,
//! how many products ran and how long they took. It splits a training step's time into GEMM
//! time and the rest, and gives each product's GFLOP/s to read against the path's FMA peak
//! (`whet bench-step --gemm-profile`). Off by default, when each product pays one relaxed
//! atomic load. Products that run in the `gemm` crate (the scalar path, products too small for
//! the packed kernels) are not counted.

use std::collections::HashMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

static ON: AtomicBool = AtomicBool::new(false);
static TOTALS: Mutex<Option<HashMap<Shape, (u64, f64)>>> = Mutex::new(None);

/// One product `C (m x n) [+]= A (m x k) @ B (k x n)`, with the second product of depth `k2`
/// that the loop nest sums into the same C (0 without one; see the LoRA linear layer).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Shape {
    pub m: usize,
    pub n: usize,
    pub k: usize,
    pub k2: usize,
    /// A is read column by column (a transposed operand, as in a weight gradient's dy^T).
    pub a_transposed: bool,
    /// B is read column by column (a transposed operand, as in the forward's w^T).
    pub b_transposed: bool,
}

/// The products of one shape since [`start`].
#[derive(Clone, Debug)]
pub struct Entry {
    pub shape: Shape,
    pub calls: u64,
    pub seconds: f64,
}

impl Entry {
    /// Floating-point operations of all its calls: `2 m n (k + k2)` each.
    pub fn flop(&self) -> f64 {
        let s = self.shape;
        2.0 * (s.m * s.n * (s.k + s.k2)) as f64 * self.calls as f64
    }

    pub fn gflops(&self) -> f64 {
        self.flop() / self.seconds.max(f64::MIN_POSITIVE) / 1e9
    }
}

/// Starts counting (from zero) in every thread of the process.
pub fn start() {
    *TOTALS.lock().unwrap_or_else(|e| e.into_inner()) = Some(HashMap::new());
    ON.store(true, Ordering::Relaxed);
}

/// Stops counting; returns what was counted since [`start`], the longest total first.
pub fn stop() -> Vec<Entry> {
    ON.store(false, Ordering::Relaxed);
    let totals = TOTALS.lock().unwrap_or_else(|e| e.into_inner()).take();
    let mut entries: Vec<Entry> = totals
        .unwrap_or_default()
        .into_iter()
        .map(|(shape, (calls, seconds))| Entry {
            shape,
            calls,
            seconds,
        })
        .collect();
    entries.sort_by(|a, b| b.seconds.total_cmp(&a.seconds));
    entries
}

/// Times one product from its creation to its drop.
pub(crate) struct Timer(Shape, Instant);

/// A timer for the product `shape` describes, when profiling is on.
#[inline]
pub(crate) fn timer(shape: impl FnOnce() -> Shape) -> Option<Timer> {
    ON.load(Ordering::Relaxed)
        .then(|| Timer(shape(), Instant::now()))
}

impl Drop for Timer {
    fn drop(&mut self) {
        let seconds = self.1.elapsed().as_secs_f64();
        let mut totals = TOTALS.lock().unwrap_or_else(|e| e.into_inner());
        // Stopped meanwhile: `stop` took the totals.
        if let Some(totals) = totals.as_mut() {
            let e = totals.entry(self.0).or_insert((0, 0.0));
            e.0 += 1;
            e.1 += seconds;
        }
    }
}
