//! Optimizer state on disk: one safetensors file of named f32 buffers, the step in metadata.

use std::collections::HashMap;
use std::path::Path;

use safetensors::{Dtype, SafeTensors, tensor::TensorView};
use whet_optim::OptimizerState;

use crate::{Result, TrainError};

pub fn write_optimizer(path: &Path, state: &OptimizerState) -> Result<()> {
    let bytes: Vec<(String, Vec<u8>, usize)> = state
        .buffers
        .iter()
        .map(|(name, v)| {
            (
                name.clone(),
                v.iter().flat_map(|x| x.to_le_bytes()).collect(),
                v.len(),
            )
        })
        .collect();
    let views: Vec<(String, TensorView<'_>)> = bytes
        .iter()
        .map(|(name, b, n)| {
            (
                name.clone(),
                TensorView::new(Dtype::F32, vec![*n], b).expect("f32 view sizes match"),
            )
        })
        .collect();
    let meta = HashMap::from([("step".to_string(), state.step.to_string())]);
    let data =
        safetensors::serialize(views, Some(meta)).map_err(|e| TrainError::CheckpointRead {
            path: path.to_path_buf(),
            message: e.to_string(),
        })?;
    whet_data::atomic::write_file(path, &data, whet_data::atomic::Existing::Replace)?;
    Ok(())
}

pub fn read_optimizer(path: &Path) -> Result<OptimizerState> {
    let bad = |message: String| TrainError::CheckpointRead {
        path: path.to_path_buf(),
        message,
    };
    let data = std::fs::read(path).map_err(|source| TrainError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    let (_, meta) = SafeTensors::read_metadata(&data).map_err(|e| bad(e.to_string()))?;
    let step = meta
        .metadata()
        .as_ref()
        .and_then(|m| m.get("step"))
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| bad("no `step` in the metadata".into()))?;
    let st = SafeTensors::deserialize(&data).map_err(|e| bad(e.to_string()))?;
    let mut buffers = Vec::new();
    for (name, view) in st.tensors() {
        if view.dtype() != Dtype::F32 {
            return Err(bad(format!(
                "buffer `{name}` is {:?}, expected F32",
                view.dtype()
            )));
        }
        let values = view
            .data()
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect();
        buffers.push((name, values));
    }
    buffers.sort_by(|a, b| a.0.cmp(&b.0));
    Ok(OptimizerState { step, buffers })
}
