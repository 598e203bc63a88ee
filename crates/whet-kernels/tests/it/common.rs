//! Shared test helpers: deterministic inputs, closeness checks, gradients through candle's
//! autograd, and central finite differences.

use anyhow::{Result, ensure};
use candle_core::{DType, Device, Tensor, Var};

/// Deterministic pseudo-random values in [-scale, scale] (xorshift; no rand dependency).
pub fn rand_vec(n: usize, seed: u64, scale: f64) -> Vec<f64> {
    let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..n)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            ((s >> 11) as f64 / (1u64 << 53) as f64 * 2.0 - 1.0) * scale
        })
        .collect()
}

pub fn rand(shape: &[usize], seed: u64, dtype: DType) -> Result<Tensor> {
    let n = shape.iter().product();
    Ok(Tensor::from_vec(rand_vec(n, seed, 1.0), shape, &Device::Cpu)?.to_dtype(dtype)?)
}

/// Max over elements of |a - b| / (atol + rtol * |b|); <= 1 means close.
pub fn closeness(a: &Tensor, b: &Tensor, rtol: f64, atol: f64) -> Result<f64> {
    ensure!(
        a.dims() == b.dims(),
        "shapes differ: {:?} vs {:?}",
        a.dims(),
        b.dims()
    );
    let a = a.to_dtype(DType::F64)?.flatten_all()?.to_vec1::<f64>()?;
    let b = b.to_dtype(DType::F64)?.flatten_all()?.to_vec1::<f64>()?;
    Ok(a.iter()
        .zip(&b)
        .map(|(x, y)| (x - y).abs() / (atol + rtol * y.abs()))
        .fold(0.0, f64::max))
}

#[track_caller]
pub fn assert_close(what: &str, a: &Tensor, b: &Tensor, rtol: f64, atol: f64) {
    let c = closeness(a, b, rtol, atol).unwrap_or_else(|e| panic!("{what}: {e}"));
    assert!(
        c <= 1.0,
        "{what}: not close (worst |a-b| / (atol + rtol |b|) = {c:.3})"
    );
}

/// A fixed random weighting with the shape of `out`, so that `sum(out * r)` is a scalar loss
/// whose gradient exercises every output element differently.
pub fn weighting(out: &Tensor) -> Result<Tensor> {
    Ok(Tensor::from_vec(
        rand_vec(out.elem_count(), 4242, 1.0),
        out.dims(),
        &Device::Cpu,
    )?
    .to_dtype(out.dtype())?)
}

/// Runs `f` on `inputs`, those with `track[i]` turned into `Var`s; returns the output and the
/// gradient of `sum(f(..) * r)` w.r.t. each input (`None` where the grad store has no entry).
pub fn run_with_grads(
    f: &dyn Fn(&[Tensor]) -> candle_core::Result<Tensor>,
    inputs: &[Tensor],
    track: &[bool],
) -> Result<(Tensor, Vec<Option<Tensor>>)> {
    let vars: Vec<Option<Var>> = inputs
        .iter()
        .zip(track)
        .map(|(t, &tr)| {
            if tr {
                Var::from_tensor(t).map(Some)
            } else {
                Ok(None)
            }
        })
        .collect::<candle_core::Result<_>>()?;
    let args: Vec<Tensor> = inputs
        .iter()
        .zip(&vars)
        .map(|(t, v)| {
            v.as_ref()
                .map(|v| v.as_tensor().clone())
                .unwrap_or_else(|| t.clone())
        })
        .collect();
    let out = f(&args)?;
    let loss = (&out * weighting(&out)?)?.sum_all()?;
    let grads = loss.backward()?;
    Ok((out, args.iter().map(|a| grads.get(a).cloned()).collect()))
}

/// Loss `sum(f(inputs) * r)` without autograd.
fn loss_value(
    f: &dyn Fn(&[Tensor]) -> candle_core::Result<Tensor>,
    inputs: &[Tensor],
) -> Result<f64> {
    let out = f(inputs)?;
    Ok((&out * weighting(&out)?)?
        .sum_all()?
        .to_dtype(DType::F64)?
        .to_scalar::<f64>()?)
}

/// Compares the autograd gradient w.r.t. `inputs[idx]` with central finite differences, on at
/// most `max_coords` coordinates spread over the tensor. Inputs should be f64 (step 1e-6).
pub fn check_finite_differences(
    what: &str,
    f: &dyn Fn(&[Tensor]) -> candle_core::Result<Tensor>,
    inputs: &[Tensor],
    idx: usize,
    max_coords: usize,
    tol: f64,
) -> Result<()> {
    let track: Vec<bool> = (0..inputs.len()).map(|i| i == idx).collect();
    let (_, grads) = run_with_grads(f, inputs, &track)?;
    let g = grads[idx]
        .as_ref()
        .ok_or_else(|| anyhow::anyhow!("{what}: no gradient for input {idx}"))?;
    let g = g.to_dtype(DType::F64)?.flatten_all()?.to_vec1::<f64>()?;
    let x = &inputs[idx];
    let base = x.to_dtype(DType::F64)?.flatten_all()?.to_vec1::<f64>()?;
    let n = base.len();
    let step = n.div_ceil(max_coords).max(1);
    let eps = if x.dtype() == DType::F64 { 1e-6 } else { 1e-2 };
    for i in (0..n).step_by(step) {
        let at = |delta: f64| -> Result<f64> {
            let mut v = base.clone();
            v[i] += delta;
            let mut args = inputs.to_vec();
            args[idx] = Tensor::from_vec(v, x.dims(), &Device::Cpu)?.to_dtype(x.dtype())?;
            loss_value(f, &args)
        };
        let numeric = (at(eps)? - at(-eps)?) / (2.0 * eps);
        let err = (numeric - g[i]).abs() / (1.0 + g[i].abs());
        ensure!(
            err < tol,
            "{what}: coordinate {i}: finite difference {numeric} vs autograd {}",
            g[i]
        );
    }
    Ok(())
}

/// The fast op and the reference agree on outputs and on every tracked gradient.
pub fn check_against_reference(
    what: &str,
    fast: &dyn Fn(&[Tensor]) -> candle_core::Result<Tensor>,
    reference: &dyn Fn(&[Tensor]) -> candle_core::Result<Tensor>,
    inputs: &[Tensor],
    track: &[bool],
    rtol: f64,
    atol: f64,
) -> Result<()> {
    let (yf, gf) = run_with_grads(fast, inputs, track)?;
    let (yr, gr) = run_with_grads(reference, inputs, track)?;
    assert_close(&format!("{what}: forward"), &yf, &yr, rtol, atol);
    for (i, ((a, b), &tracked)) in gf.iter().zip(&gr).zip(track).enumerate() {
        match (a, b) {
            (Some(a), Some(b)) if tracked => {
                assert_close(&format!("{what}: gradient of input {i}"), a, b, rtol, atol)
            }
            // candle's own ops may leave a (useless) entry for an untracked input; ours must not.
            (None, _) if !tracked => {}
            _ => anyhow::bail!(
                "{what}: input {i} (tracked: {tracked}) has gradients fast {} / reference {}",
                a.is_some(),
                b.is_some()
            ),
        }
    }
    Ok(())
}
