//! Agreement between ranks: the quantities every rank must hold identically before training
//! starts (the run, the step it resumes from, the trainable values), checked with one all-gather
//! so that a rank given other data, another checkpoint or other weights is refused before the
//! first step instead of silently training another model.

use candle_core::{DType, Tensor};
use whet_data::split::{FNV_OFFSET, fnv1a64, fnv1a64_continue};
use whet_optim::Param;

use super::Communicator;
use crate::{Result, TrainError};

/// One quantity every rank must hold identically before training starts.
pub struct Agreement {
    pub what: &'static str,
    pub value: f64,
    /// What to do when the ranks differ.
    pub hint: &'static str,
}

/// Checks that every rank holds the same value of each quantity; the same error on every rank
/// otherwise (naming the first differing rank and both values).
pub fn agree(comm: &dyn Communicator, items: &[Agreement]) -> Result<()> {
    if comm.world_size() == 1 || items.is_empty() {
        return Ok(());
    }
    let mine: Vec<f64> = items.iter().map(|a| a.value).collect();
    let all = comm.all_gather_host(&mine)?;
    let n = items.len();
    for (i, item) in items.iter().enumerate() {
        let first = all[i];
        for (rank, per_rank) in all.chunks_exact(n).enumerate() {
            let v = per_rank[i];
            if v.to_bits() != first.to_bits() {
                return Err(TrainError::RankMismatch {
                    what: item.what,
                    detail: format!("rank 0 has {first}, rank {rank} has {v}"),
                    hint: item.hint,
                });
            }
        }
    }
    Ok(())
}

/// Checks, before the first step, that every rank runs the same run (config and data: `run_id`)
/// from the same checkpoint (`step`) with the same trainable values.
pub(crate) fn agree_on_start(
    comm: &dyn Communicator,
    run_id: &str,
    step: u64,
    params: &[Param],
) -> Result<()> {
    let run = fnv1a64(run_id.as_bytes());
    let mut values = FNV_OFFSET;
    for p in params {
        values = fnv1a64_continue(values, p.name.as_bytes());
        values = hash_values(values, p.var.as_tensor())?;
    }
    let low48 = |h: u64| (h & ((1 << 48) - 1)) as f64;
    agree(
        comm,
        &[
            Agreement {
                what: "the run (config and data)",
                value: low48(run),
                hint: "Every rank must read the same config, overrides and data files",
            },
            Agreement {
                what: "the step to resume from",
                value: step as f64,
                hint: "The ranks see different checkpoints in output.dir: put it on a \
                       filesystem every host shares",
            },
            Agreement {
                what: "the trainable values",
                value: low48(values),
                hint: "The ranks loaded different weights: every host needs the same model \
                       files (and output.dir shared, for resuming)",
            },
        ],
    )
}

/// Folds the exact bits of `t`'s values into `h`, in order: equal on two ranks only when the
/// values are identical (no float sum whose order could differ between hosts).
fn hash_values(h: u64, t: &Tensor) -> Result<u64> {
    let t = t.flatten_all()?;
    let (storage, layout) = t.storage_and_layout();
    if let candle_core::Storage::Cpu(cpu) = &*storage
        && let Ok(data) = cpu.as_slice::<f32>()
    {
        let start = layout.start_offset();
        let data = &data[start..start + t.elem_count()];
        return Ok(data
            .iter()
            .fold(h, |h, x| fnv1a64_continue(h, &x.to_bits().to_le_bytes())));
    }
    drop(storage);
    let values = t.to_dtype(DType::F32)?.to_vec1::<f32>()?;
    Ok(values
        .iter()
        .fold(h, |h, x| fnv1a64_continue(h, &x.to_bits().to_le_bytes())))
}
