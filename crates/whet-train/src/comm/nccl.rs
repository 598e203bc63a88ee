//! NCCL ranks: one CUDA device per rank, cudarc's NCCL through candle (`candle-core/nccl`, enabled
//! by this crate's `cuda` feature). Building it needs the CUDA toolkit: candle-kernels' build
//! script runs nvcc. NCCL itself is loaded at run time (cudarc's dynamic linking).
//!
//! The unique id NCCL needs on every rank is made on rank 0 and broadcast over MPI
//! ([`Nccl::over_mpi`], under `mpirun`/`srun`) or fetched from rank 0 over TCP at
//! `MASTER_ADDR:MASTER_PORT` ([`Nccl::over_tcp`]). Collectives run on candle's stream of the
//! rank's device, in order with the compute around them; each call waits for its stream so the
//! watchdog sees a peer that never arrives.

use std::ffi::c_char;

use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::nccl::safe::{Comm, Id, ReduceOp};
use candle_core::{CpuStorage, CudaStorage, CustomOp1, Device, Layout, Shape, Tensor};

use super::rendezvous::{EnvRendezvous, share_from_rank0};
use super::watchdog::{Watchdog, timeout_message};
use super::{Communicator, timeout_from_env};
use crate::{Result, TrainError};

const TIMEOUT_EXIT: i32 = 3;

pub struct Nccl {
    comm: Comm,
    device: Device,
    rank: usize,
    size: usize,
    watchdog: Watchdog,
    /// The MPI world that bootstrapped NCCL: kept for `MPI_Abort` and finalised last.
    #[cfg(feature = "mpi")]
    mpi: Option<super::Mpi>,
}

fn launch_error(rank: usize, size: usize, op: &str, message: String) -> TrainError {
    TrainError::Comm {
        rank,
        world: size,
        backend: "nccl",
        op: op.into(),
        message,
    }
}

/// A fresh NCCL unique id, as bytes.
fn new_id(rank: usize, size: usize) -> Result<[u8; 128]> {
    let id = Id::new().map_err(|e| {
        launch_error(
            rank,
            size,
            "ncclGetUniqueId",
            format!("{e:?} (is libnccl.so.2 installed and on the library path?)"),
        )
    })?;
    let internal: [c_char; 128] = *id.internal();
    Ok(internal.map(|c| c as u8))
}

impl Nccl {
    /// Under an MPI launcher: rank 0's unique id broadcast over MPI.
    #[cfg(feature = "mpi")]
    pub fn over_mpi(mpi: super::Mpi, device: &Device) -> Result<Self> {
        let (rank, size) = (mpi.rank(), mpi.world_size());
        let mut id = if rank == 0 {
            new_id(rank, size)?
        } else {
            [0u8; 128]
        };
        mpi.broadcast_bytes(&mut id)?;
        let mut nccl = Self::connect(device, rank, size, id, true)?;
        nccl.mpi = Some(mpi);
        Ok(nccl)
    }

    /// From `RANK`/`WORLD_SIZE`/`MASTER_ADDR`/`MASTER_PORT`: rank 0's unique id over TCP.
    pub fn over_tcp(env: &EnvRendezvous, device: &Device) -> Result<Self> {
        let (rank, size) = (env.rank, env.world_size);
        let mine = if rank == 0 {
            Some(new_id(rank, size)?)
        } else {
            None
        };
        let bytes = share_from_rank0(
            rank,
            size,
            &env.master,
            mine.as_ref().map(|id| &id[..]),
            timeout_from_env()?,
        )?;
        let id: [u8; 128] = bytes.try_into().map_err(|b: Vec<u8>| {
            launch_error(
                rank,
                size,
                "unique id exchange",
                format!("got {} bytes, expected 128", b.len()),
            )
        })?;
        Self::connect(device, rank, size, id, false)
    }

    fn connect(
        device: &Device,
        rank: usize,
        size: usize,
        id: [u8; 128],
        over_mpi: bool,
    ) -> Result<Self> {
        let Device::Cuda(cuda) = device else {
            return Err(launch_error(
                rank,
                size,
                "ncclCommInitRank",
                "NCCL needs a CUDA device".into(),
            ));
        };
        let internal: [c_char; 128] = id.map(|b| b as c_char);
        let comm = Comm::from_rank(cuda.cuda_stream(), rank, size, Id::uninit(internal))
            .map_err(|e| launch_error(rank, size, "ncclCommInitRank", format!("{e:?}")))?;
        let watchdog = Watchdog::start(timeout_from_env()?, move |what, waited| {
            eprintln!("{}", timeout_message(rank, size, "nccl", what, waited));
            #[cfg(feature = "mpi")]
            if over_mpi {
                super::mpi::abort_world(TIMEOUT_EXIT);
            }
            let _ = over_mpi;
            std::process::exit(TIMEOUT_EXIT)
        });
        Ok(Self {
            comm,
            device: device.clone(),
            rank,
            size,
            watchdog,
            #[cfg(feature = "mpi")]
            mpi: None,
        })
    }

    fn cuda(&self) -> &candle_core::CudaDevice {
        match &self.device {
            Device::Cuda(d) => d,
            _ => unreachable!("an Nccl communicator is only built on a CUDA device"),
        }
    }
}

/// `ncclAllReduce(sum)` of a contiguous f32 tensor into a new one, on the tensor's stream.
struct AllReduce<'a> {
    comm: &'a Comm,
}

impl CustomOp1 for AllReduce<'_> {
    fn name(&self) -> &'static str {
        "nccl-all-reduce"
    }

    fn cpu_fwd(&self, _: &CpuStorage, _: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        candle_core::bail!("an NCCL all-reduce needs a CUDA tensor")
    }

    fn cuda_fwd(
        &self,
        storage: &CudaStorage,
        layout: &Layout,
    ) -> candle_core::Result<(CudaStorage, Shape)> {
        let n = layout.shape().elem_count();
        let dev = storage.device().clone();
        let src = storage.as_cuda_slice::<f32>()?;
        let Some((start, end)) = layout.contiguous_offsets() else {
            candle_core::bail!("an NCCL all-reduce needs a contiguous bucket")
        };
        let src = src.slice(start..end);
        // SAFETY: every element is written by the all-reduce before anything reads it.
        let mut dst = unsafe { dev.alloc::<f32>(n) }?;
        self.comm
            .all_reduce(&src, &mut dst, &ReduceOp::Sum)
            .map_err(|e| candle_core::Error::Msg(format!("ncclAllReduce: {e:?}")))?;
        Ok((
            CudaStorage::wrap_cuda_slice(dst, dev),
            layout.shape().clone(),
        ))
    }
}

impl Communicator for Nccl {
    fn rank(&self) -> usize {
        self.rank
    }

    fn world_size(&self) -> usize {
        self.size
    }

    fn backend(&self) -> &'static str {
        "nccl"
    }

    fn all_gather_host(&self, values: &[f64]) -> Result<Vec<f64>> {
        let _watch = self
            .watchdog
            .watch(|| format!("all-gather of {} host values", values.len()));
        let dev = self.cuda();
        let send = dev.clone_htod(values)?;
        let mut recv = dev.alloc_zeros::<f64>(values.len() * self.size)?;
        self.comm
            .all_gather(&send, &mut recv)
            .map_err(|e| launch_error(self.rank, self.size, "ncclAllGather", format!("{e:?}")))?;
        Ok(dev.clone_dtoh(&recv)?)
    }

    fn all_reduce_sum(&self, buckets: &[Tensor]) -> Result<Vec<Tensor>> {
        let _watch = self
            .watchdog
            .watch(|| format!("gradient all-reduce ({} buckets)", buckets.len()));
        let op = AllReduce { comm: &self.comm };
        let summed = buckets
            .iter()
            .map(|b| b.apply_op1_no_bwd(&op))
            .collect::<candle_core::Result<Vec<_>>>()?;
        self.device.synchronize()?;
        Ok(summed)
    }

    fn abort(&self, code: i32) -> ! {
        #[cfg(feature = "mpi")]
        if let Some(mpi) = &self.mpi {
            mpi.abort(code)
        }
        std::process::exit(code)
    }
}
