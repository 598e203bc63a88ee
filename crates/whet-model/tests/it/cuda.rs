//! The model on CUDA (feature `cuda`) against the CPU: loss, logits and every full fine-tuning
//! gradient of the packed tiny model, in f32 and with bf16 compute (f32 master weights).
//! Tolerances, relative to each tensor's max: f32 1e-3 (cuBLAS may use TF32), bf16 compute 3e-2
//! for the loss and logits and 8e-2 for gradients. Without a CUDA device the test prints
//! `skipped: no CUDA device (...)` and returns.

use std::collections::HashMap;

use anyhow::{Result, ensure};
use candle_core::{DType, Device, Tensor};
use whet_model::{Model, Trainable};

use crate::common::*;
use crate::model::spread_model;

fn rel(what: &str, got: &Tensor, want: &Tensor, tol: f64) -> Result<()> {
    let host = |t: &Tensor| -> Result<Vec<f64>> {
        Ok(t.to_device(&Device::Cpu)?
            .to_dtype(DType::F64)?
            .flatten_all()?
            .to_vec1::<f64>()?)
    };
    ensure!(got.dims() == want.dims(), "{what}: shapes differ");
    let (g, w) = (host(got)?, host(want)?);
    let scale = w.iter().fold(0f64, |m, x| m.max(x.abs())).max(1e-30);
    let err = g
        .iter()
        .zip(&w)
        .fold(0f64, |m, (a, b)| m.max((a - b).abs()));
    eprintln!("{what}: max |diff| / max |want| = {:.2e}", err / scale);
    ensure!(
        err <= tol * scale,
        "{what}: {:.3e} > {tol:.1e}",
        err / scale
    );
    Ok(())
}

#[test]
fn loss_logits_and_gradients_on_cuda_match_cpu() -> Result<()> {
    let gpu = match Device::new_cuda(0) {
        Ok(d) => d,
        Err(e) => {
            eprintln!(
                "loss_logits_and_gradients_on_cuda_match_cpu: skipped: no CUDA device ({})",
                e.to_string().lines().next().unwrap_or_default()
            );
            return Ok(());
        }
    };
    let cfg = tiny_config("llama");
    let cpu_model = spread_model(&cfg, 5, Trainable::Full);
    let batch = packed_batch(cfg.vocab_size as u32, 1);
    let on = |t: &Tensor, d: &Device| t.to_device(d);
    let (want_loss, _) = cpu_model.loss(
        &batch.ids,
        &batch.positions,
        &batch.segments,
        &batch.targets,
    )?;
    let want_grads = want_loss.backward()?;
    let want_logits = cpu_model.logits(&batch.ids, &batch.positions, &batch.segments)?;
    let weights: HashMap<String, Tensor> = cpu_model
        .named_weights()?
        .into_iter()
        .map(|(n, t)| Ok((n, t.to_device(&gpu)?)))
        .collect::<Result<_>>()?;
    for (dt, tol_out, tol_grad) in [(DType::F32, 1e-3, 1e-3), (DType::BF16, 3e-2, 8e-2)] {
        let mut m = Model::from_tensors(&cfg, weights.clone(), Trainable::Full, &gpu)?;
        m.set_compute_dtype(dt)?;
        let (ids, pos, seg, tgt) = (
            on(&batch.ids, &gpu)?,
            on(&batch.positions, &gpu)?,
            on(&batch.segments, &gpu)?,
            on(&batch.targets, &gpu)?,
        );
        let (loss, _) = m.loss(&ids, &pos, &seg, &tgt)?;
        ensure!(loss.dtype() == DType::F32, "the loss comes back in f32");
        rel(&format!("{dt:?} loss"), &loss, &want_loss, tol_out)?;
        let grads = loss.backward()?;
        for ((name, var), (_, want_var)) in m.trainable().iter().zip(cpu_model.trainable()) {
            ensure!(var.dtype() == DType::F32, "{name}: master weights stay f32");
            let g = grads.get(var.as_tensor());
            let w = want_grads.get(want_var.as_tensor());
            match (g, w) {
                (Some(g), Some(w)) => rel(&format!("{dt:?} grad {name}"), g, w, tol_grad)?,
                (None, None) => {}
                _ => anyhow::bail!("{name}: a gradient on one device only"),
            }
        }
        let logits = m.logits(&ids, &pos, &seg)?;
        ensure!(logits.dtype() == DType::F32);
        rel(&format!("{dt:?} logits"), &logits, &want_logits, tol_out)?;
    }
    Ok(())
}
