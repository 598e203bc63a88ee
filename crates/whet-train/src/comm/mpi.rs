//! MPI ranks on CPU, through rsmpi (the `mpi` crate) on the system's MPI (Open MPI on Debian).
//!
//! Failure handling: MPI's default error handler (`MPI_ERRORS_ARE_FATAL`) ends the job on a
//! communication error, and `mpirun` ends it when a rank exits abnormally (killed, crashed). What
//! neither sees, a rank that hangs, the [`Watchdog`] turns into an `MPI_Abort`. A panic on any
//! thread aborts the job too (a panicking rank would otherwise wait in `MPI_Finalize` while the
//! others wait in a collective).

use candle_core::{Storage, Tensor};
use mpi::collective::SystemOperation;
use mpi::environment::Universe;
use mpi::topology::SimpleCommunicator;
use mpi::traits::{Communicator as _, CommunicatorCollectives as _, Root as _};

use super::watchdog::{Watchdog, timeout_message};
use super::{Communicator, comm_error};
use crate::{Result, TrainError};

/// Exit status of a rank that the watchdog ends.
const TIMEOUT_EXIT: i32 = 3;
/// Exit status of a rank that panicked.
const PANIC_EXIT: i32 = 101;

/// `MPI_Abort` on the world communicator, from any thread.
pub(crate) fn abort_world(code: i32) -> ! {
    SimpleCommunicator::world().abort(code)
}

pub struct Mpi {
    world: SimpleCommunicator,
    rank: usize,
    size: usize,
    watchdog: Watchdog,
    /// Dropped last: `MPI_Finalize`.
    _universe: Universe,
}

impl Mpi {
    /// `MPI_Init_thread` (asking for `MPI_THREAD_MULTIPLE`: the watchdog and the panic hook may
    /// call `MPI_Abort` from any thread), the watchdog, and the panic hook.
    pub fn init() -> Result<Self> {
        let launch = |message: String| TrainError::Launch { message };
        let (universe, _threading) = mpi::initialize_with_threading(mpi::Threading::Multiple)
            .ok_or_else(|| {
                launch("MPI was already initialised in this process: start one communicator".into())
            })?;
        let world = universe.world();
        let (rank, size) = (world.rank() as usize, world.size() as usize);
        if let Some(announced) = super::mpi_world_from_env()
            && announced != size
        {
            return Err(launch(format!(
                "the launcher started {announced} ranks but MPI sees {size}: under Slurm, \
                 launch with `srun --mpi=pmix` (or mpirun inside the allocation)"
            )));
        }
        let timeout = super::timeout_from_env()?;
        let watchdog = Watchdog::start(timeout, move |what, waited| {
            eprintln!("{}", timeout_message(rank, size, "mpi", what, waited));
            abort_world(TIMEOUT_EXIT)
        });
        let default_hook = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            default_hook(info);
            eprintln!("error: rank {rank} of {size} (mpi) panicked; aborting every rank");
            abort_world(PANIC_EXIT)
        }));
        Ok(Self {
            world,
            rank,
            size,
            watchdog,
            _universe: universe,
        })
    }

    /// Rank 0's `bytes` on every rank (NCCL's unique id).
    pub fn broadcast_bytes(&self, bytes: &mut [u8]) -> Result<()> {
        let _watch = self
            .watchdog
            .watch(|| "broadcast of bootstrap bytes".into());
        self.world.process_at_rank(0).broadcast_into(bytes);
        Ok(())
    }
}

impl Communicator for Mpi {
    fn rank(&self) -> usize {
        self.rank
    }

    fn world_size(&self) -> usize {
        self.size
    }

    fn backend(&self) -> &'static str {
        "mpi"
    }

    fn all_gather_host(&self, values: &[f64]) -> Result<Vec<f64>> {
        let mut all = vec![0f64; values.len() * self.size];
        let _watch = self
            .watchdog
            .watch(|| format!("all-gather of {} host values", values.len()));
        self.world.all_gather_into(values, &mut all[..]);
        Ok(all)
    }

    /// Every bucket's `MPI_Iallreduce` is started before any is waited for, so the library can
    /// progress them together.
    fn all_reduce_sum(&self, buckets: &[Tensor]) -> Result<Vec<Tensor>> {
        let guards: Vec<_> = buckets.iter().map(|b| b.storage_and_layout()).collect();
        let mut sends: Vec<&[f32]> = Vec::with_capacity(buckets.len());
        for ((storage, layout), bucket) in guards.iter().zip(buckets) {
            let n = bucket.elem_count();
            let slice = match &**storage {
                Storage::Cpu(cpu) if layout.is_contiguous() => cpu
                    .as_slice::<f32>()
                    .ok()
                    .and_then(|s| s.get(layout.start_offset()..layout.start_offset() + n)),
                _ => None,
            };
            sends.push(slice.ok_or_else(|| {
                comm_error(
                    self,
                    "gradient all-reduce",
                    format!(
                        "a bucket must be a contiguous f32 CPU tensor, got {:?} on {:?}",
                        bucket.dtype(),
                        bucket.device().location()
                    ),
                )
            })?);
        }
        let mut recvs: Vec<Vec<f32>> = sends.iter().map(|s| vec![0f32; s.len()]).collect();
        {
            let total: usize = sends.iter().map(|s| s.len()).sum();
            let _watch = self.watchdog.watch(|| {
                format!(
                    "gradient all-reduce ({} buckets, {total} values)",
                    sends.len()
                )
            });
            mpi::request::multiple_scope(sends.len(), |scope, requests| {
                for (send, recv) in sends.iter().zip(recvs.iter_mut()) {
                    requests.add(self.world.immediate_all_reduce_into(
                        scope,
                        *send,
                        &mut recv[..],
                        SystemOperation::sum(),
                    ));
                }
                let mut done = Vec::with_capacity(sends.len());
                requests.wait_all(&mut done);
            });
        }
        drop(sends);
        drop(guards);
        recvs
            .into_iter()
            .zip(buckets)
            .map(|(v, b)| Ok(Tensor::from_vec(v, b.elem_count(), b.device())?))
            .collect()
    }

    fn abort(&self, code: i32) -> ! {
        self.world.abort(code)
    }
}
