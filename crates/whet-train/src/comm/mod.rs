//! Communicators: how the ranks of a data-parallel run sum their gradients and agree.
//!
//! whet has no cluster layer of its own. Ranks are started by the launchers HPC and ML clusters
//! already run (`mpirun`, Slurm's `srun`, or `RANK`/`WORLD_SIZE`/`MASTER_ADDR` for NCCL) and
//! exchange data through the engines those clusters tune:
//!
//! | implementation | ranks | collectives | built with |
//! |---|---|---|---|
//! | [`Single`] | one process | none (the default) | always |
//! | `Mpi` | CPU processes | MPI (`MPI_Iallreduce`, `MPI_Allgather`) | feature `mpi` |
//! | `Nccl` | one CUDA device each | NCCL all-reduce / all-gather; the unique id goes over MPI or TCP | feature `cuda` (+ `mpi` for the MPI bootstrap) |
//!
//! The trainer calls three collectives per optimizer step: one small all-gather of host numbers
//! (supervised and seen tokens, loss sums, a non-finite flag, which parameters got a gradient),
//! one all-reduce of the gradients flattened into a few large buckets, and, at evaluations, one
//! all-gather of the validation loss sums. Host numbers are gathered, not reduced, and each rank
//! adds them up in rank order ([`sum_over_ranks`]), so every rank makes its decisions (early
//! stopping, divergence) from bit-identical values.
//!
//! Every collective of `Mpi` and `Nccl` runs under a [`Watchdog`]: a rank that waits longer than
//! `WHET_COMM_TIMEOUT_S` (default 1800 s) for the others says which collective hung and aborts
//! the whole job, so a rank that hangs (not only one that dies, which the launcher notices)
//! cannot stall the others forever.

mod agree;
#[cfg(feature = "mpi")]
mod mpi;
#[cfg(feature = "cuda")]
mod nccl;
mod reduce;
pub mod rendezvous;
mod watchdog;

use std::ops::Range;

use candle_core::{Device, Tensor};

pub(crate) use self::agree::agree_on_start;
pub use self::agree::{Agreement, agree};
#[cfg(feature = "mpi")]
pub use self::mpi::Mpi;
#[cfg(feature = "cuda")]
pub use self::nccl::Nccl;
pub(crate) use self::reduce::{LocalStep, all_reduce_gradients};
pub use self::watchdog::{Watchdog, timeout_from_env, timeout_message};
use crate::{Result, TrainError};

/// What a data-parallel trainer needs from the ranks around it.
pub trait Communicator {
    /// This process's rank, `0..world_size()`. Rank 0 writes checkpoints, metrics and reports.
    fn rank(&self) -> usize;
    fn world_size(&self) -> usize;
    /// `"single"`, `"mpi"` or `"nccl"`, for messages.
    fn backend(&self) -> &'static str;
    /// Every rank's `values` (the same length on every rank), concatenated in rank order.
    /// For small host data: token counts, loss sums, flags.
    fn all_gather_host(&self, values: &[f64]) -> Result<Vec<f64>>;
    /// The element-wise sums over all ranks of flat, contiguous f32 `buckets` (on the device of
    /// this communicator), in the same order.
    fn all_reduce_sum(&self, buckets: &[Tensor]) -> Result<Vec<Tensor>>;
    /// Ends every rank of the job now, with exit status `code`: what a rank does after an error
    /// the other ranks cannot know of, so they do not wait for it forever.
    fn abort(&self, code: i32) -> !;
    /// Gradient bucket size, in f32 values: `WHET_BUCKET_MB` (default 25 MiB).
    fn bucket_elems(&self) -> Result<usize> {
        bucket_elems_from_env()
    }
}

/// One process: every collective is the identity.
#[derive(Debug, Clone, Copy, Default)]
pub struct Single;

impl Communicator for Single {
    fn rank(&self) -> usize {
        0
    }
    fn world_size(&self) -> usize {
        1
    }
    fn backend(&self) -> &'static str {
        "single"
    }
    fn all_gather_host(&self, values: &[f64]) -> Result<Vec<f64>> {
        Ok(values.to_vec())
    }
    fn all_reduce_sum(&self, buckets: &[Tensor]) -> Result<Vec<Tensor>> {
        Ok(buckets.to_vec())
    }
    fn abort(&self, code: i32) -> ! {
        std::process::exit(code)
    }
}

/// Element-wise sums of `values` over all ranks, added in rank order on every rank, so every
/// rank gets the same bits.
pub fn sum_over_ranks(comm: &dyn Communicator, values: &[f64]) -> Result<Vec<f64>> {
    if comm.world_size() == 1 {
        return Ok(values.to_vec());
    }
    let all = comm.all_gather_host(values)?;
    let n = values.len();
    if all.len() != n * comm.world_size() {
        return Err(comm_error(
            comm,
            "all-gather of host values",
            format!(
                "got {} values, expected {n} from each of {} ranks",
                all.len(),
                comm.world_size()
            ),
        ));
    }
    let mut sum = vec![0f64; n];
    for per_rank in all.chunks_exact(n.max(1)) {
        for (s, v) in sum.iter_mut().zip(per_rank) {
            *s += v;
        }
    }
    Ok(sum)
}

pub(crate) fn comm_error(comm: &dyn Communicator, op: &str, message: String) -> TrainError {
    TrainError::Comm {
        rank: comm.rank(),
        world: comm.world_size(),
        backend: comm.backend(),
        op: op.to_string(),
        message,
    }
}

/// Gradient buckets: consecutive parameters grouped until a bucket holds `cap` elements (a
/// parameter larger than `cap` gets a bucket of its own). Few large all-reduces instead of one per
/// tensor, as PyTorch DDP's 25 MB buckets.
pub fn plan_buckets(numels: &[usize], cap: usize) -> Vec<Range<usize>> {
    let mut buckets = Vec::new();
    let (mut start, mut filled) = (0, 0);
    for (i, &n) in numels.iter().enumerate() {
        if filled > 0 && filled + n > cap {
            buckets.push(start..i);
            (start, filled) = (i, 0);
        }
        filled += n;
    }
    if start < numels.len() {
        buckets.push(start..numels.len());
    }
    buckets
}

/// Bucket size in f32 elements: `WHET_BUCKET_MB` MiB (default 25, as PyTorch DDP).
pub fn bucket_elems_from_env() -> Result<usize> {
    let mb = match std::env::var("WHET_BUCKET_MB") {
        Ok(v) => v
            .trim()
            .parse::<f64>()
            .ok()
            .filter(|m| *m > 0.0)
            .ok_or_else(|| TrainError::Launch {
                message: format!("WHET_BUCKET_MB={v:?}: expected a size in MiB > 0, such as 25"),
            })?,
        Err(_) => 25.0,
    };
    Ok(((mb * 1024.0 * 1024.0 / 4.0) as usize).max(1))
}

/// The rank of this process among those of its host, as the launcher says
/// (`OMPI_COMM_WORLD_LOCAL_RANK`, `MPI_LOCALRANKID`, `SLURM_LOCALID`, `LOCAL_RANK`); 0 otherwise.
/// A CUDA rank uses the device of this ordinal.
pub fn local_rank() -> usize {
    [
        "OMPI_COMM_WORLD_LOCAL_RANK",
        "MPI_LOCALRANKID",
        "SLURM_LOCALID",
        "LOCAL_RANK",
    ]
    .iter()
    .find_map(|k| std::env::var(k).ok()?.trim().parse().ok())
    .unwrap_or(0)
}

/// The CUDA ordinal of this rank: its local rank, modulo the number of devices
/// `CUDA_VISIBLE_DEVICES` lists (`srun --gpus-per-task=1` leaves each rank one device, 0).
pub fn local_cuda_ordinal() -> usize {
    let local = local_rank();
    match std::env::var("CUDA_VISIBLE_DEVICES") {
        Ok(v) if !v.trim().is_empty() => local % v.split(',').count().max(1),
        _ => local,
    }
}

/// Whether an MPI launcher started this process (`mpirun`, or `srun --mpi=pmix`).
pub fn mpi_launched() -> bool {
    ["OMPI_COMM_WORLD_SIZE", "PMIX_RANK", "PMI_RANK", "PMI_SIZE"]
        .iter()
        .any(|k| std::env::var_os(k).is_some())
}

/// The world size an MPI launcher announced, when it says (`OMPI_COMM_WORLD_SIZE`, `PMI_SIZE`).
fn mpi_world_from_env() -> Option<usize> {
    ["OMPI_COMM_WORLD_SIZE", "PMI_SIZE"]
        .iter()
        .find_map(|k| std::env::var(k).ok()?.trim().parse().ok())
}

/// Picks and starts this process's communicator for a rank computing on `device`. A CUDA rank's
/// device should be `cuda:{local_cuda_ordinal()}` (what `whet train --device cuda` picks).
///
/// `WHET_COMM` (`single`, `mpi`, `nccl`) forces a choice; otherwise:
/// - started by an MPI launcher: MPI on CPU; NCCL on a CUDA device, its unique id broadcast over
///   MPI;
/// - `RANK`/`WORLD_SIZE` with `WORLD_SIZE` > 1 and a CUDA device: NCCL, the id fetched from
///   rank 0 at `MASTER_ADDR:MASTER_PORT`;
/// - otherwise one process ([`Single`]).
///
/// A launch this build cannot serve (several ranks, no `mpi` feature) is an error that says
/// which feature to build with, never a silent single-process run per rank.
pub fn init(device: &Device) -> Result<Box<dyn Communicator>> {
    let forced = std::env::var("WHET_COMM")
        .ok()
        .map(|s| s.trim().to_string());
    let env_world = rendezvous::EnvRendezvous::from_env()?;
    let choice = match forced.as_deref() {
        Some("single") => "single",
        Some("mpi") => "mpi",
        Some("nccl") => "nccl",
        Some(other) => {
            return Err(TrainError::Launch {
                message: format!("WHET_COMM={other:?}: expected single, mpi or nccl"),
            });
        }
        None if device.is_cuda() && (mpi_launched() || env_world.is_some()) => "nccl",
        None if mpi_launched() => "mpi",
        None if env_world.as_ref().is_some_and(|e| e.world_size > 1) => {
            return Err(TrainError::Launch {
                message: "RANK/WORLD_SIZE ask for several ranks on CPU: CPU ranks talk over MPI. \
                          Launch with `mpirun -n N` (or `srun --mpi=pmix`) and a whet built with \
                          `--features mpi`, or train on CUDA devices (NCCL)"
                    .into(),
            });
        }
        None => "single",
    };
    match choice {
        "single" => Ok(Box::new(Single)),
        "mpi" => start_mpi(device),
        _ => start_nccl(device, env_world),
    }
}

#[cfg(feature = "mpi")]
fn start_mpi(device: &Device) -> Result<Box<dyn Communicator>> {
    let mpi = Mpi::init()?;
    if device.is_cuda() && mpi.world_size() > 1 {
        return Err(TrainError::Launch {
            message: "WHET_COMM=mpi with a CUDA device: MPI reduces host memory; use NCCL \
                      (unset WHET_COMM) for CUDA ranks"
                .into(),
        });
    }
    Ok(Box::new(mpi))
}

#[cfg(not(feature = "mpi"))]
fn start_mpi(_device: &Device) -> Result<Box<dyn Communicator>> {
    let world = mpi_world_from_env();
    let rank = std::env::var("OMPI_COMM_WORLD_RANK")
        .or_else(|_| std::env::var("PMIX_RANK"))
        .or_else(|_| std::env::var("PMI_RANK"))
        .ok()
        .and_then(|r| r.trim().parse::<usize>().ok());
    if world.unwrap_or(1) > 1 || rank.unwrap_or(0) > 0 || std::env::var("WHET_COMM").is_ok() {
        return Err(TrainError::Launch {
            message: format!(
                "started by an MPI launcher as rank {} of {}, but this whet was built without \
                 MPI: build it with `cargo build --release -p whet --features mpi` (needs \
                 Open MPI: openmpi-bin, libopenmpi-dev, libclang-dev)",
                rank.map_or("?".into(), |r| r.to_string()),
                world.map_or("?".into(), |w| w.to_string()),
            ),
        });
    }
    // `mpirun -n 1` of a build without MPI: one process is what was asked for.
    Ok(Box::new(Single))
}

#[cfg(feature = "cuda")]
fn start_nccl(
    device: &Device,
    env_world: Option<rendezvous::EnvRendezvous>,
) -> Result<Box<dyn Communicator>> {
    if !device.is_cuda() {
        return Err(TrainError::Launch {
            message: "WHET_COMM=nccl needs a CUDA device (`--device cuda`)".into(),
        });
    }
    #[cfg(feature = "mpi")]
    if mpi_launched() {
        return Ok(Box::new(Nccl::over_mpi(Mpi::init()?, device)?));
    }
    let Some(env) = env_world else {
        return Err(TrainError::Launch {
            message: "NCCL needs its ranks: launch with mpirun/srun (a whet built with \
                      `--features cuda,mpi`), or set RANK, WORLD_SIZE, LOCAL_RANK and \
                      MASTER_ADDR (and MASTER_PORT, default 29500) for every process"
                .into(),
        });
    };
    Ok(Box::new(Nccl::over_tcp(&env, device)?))
}

#[cfg(not(feature = "cuda"))]
fn start_nccl(
    _device: &Device,
    _env_world: Option<rendezvous::EnvRendezvous>,
) -> Result<Box<dyn Communicator>> {
    Err(TrainError::Launch {
        message: "NCCL ranks need a whet built with `--features cuda` (and `mpi` to bootstrap \
                  over mpirun/srun)"
            .into(),
    })
}

#[cfg(test)]
mod tests;
