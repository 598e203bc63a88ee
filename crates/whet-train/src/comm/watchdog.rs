//! A watchdog over collectives: a rank that waits too long for the others says so and ends the
//! job, instead of hanging with them.
//!
//! A rank that dies is noticed by the launcher (`mpirun` aborts the job when a process exits
//! abnormally; `srun --kill-on-bad-exit`). A rank that hangs (stopped, deadlocked, a host lost
//! without a TCP reset) is not: the others would wait in the collective forever. The watchdog
//! thread wakes up a few times per timeout; when one collective has lasted longer than the
//! timeout it calls `on_timeout` with the collective's description and the time waited.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::{Result, TrainError};

/// `WHET_COMM_TIMEOUT_S` when it is set, else 30 minutes: longer than any checkpoint write
/// (rank 0 writes while the others wait at the next collective).
pub fn timeout_from_env() -> Result<Duration> {
    match std::env::var("WHET_COMM_TIMEOUT_S") {
        Ok(v) => v
            .trim()
            .parse::<f64>()
            .ok()
            .filter(|s| s.is_finite() && *s > 0.0)
            .map(Duration::from_secs_f64)
            .ok_or_else(|| TrainError::Launch {
                message: format!("WHET_COMM_TIMEOUT_S={v:?}: expected seconds > 0, such as 1800"),
            }),
        Err(_) => Ok(Duration::from_secs(1800)),
    }
}

struct Shared {
    /// The collective in progress: when it started and what it is.
    current: Mutex<Option<(Instant, String)>>,
    stop: AtomicBool,
}

/// Watches the collectives entered through [`Watchdog::watch`].
pub struct Watchdog {
    shared: Arc<Shared>,
    timeout: Duration,
}

impl Watchdog {
    /// Starts the watching thread. `on_timeout(what, waited)` runs on that thread, once.
    pub fn start(
        timeout: Duration,
        on_timeout: impl FnOnce(&str, Duration) + Send + 'static,
    ) -> Self {
        let shared = Arc::new(Shared {
            current: Mutex::new(None),
            stop: AtomicBool::new(false),
        });
        let tick = (timeout / 10).clamp(Duration::from_millis(10), Duration::from_secs(1));
        let watched = Arc::clone(&shared);
        let spawned = std::thread::Builder::new()
            .name("whet-comm-watchdog".into())
            .spawn(move || {
                while !watched.stop.load(Ordering::Relaxed) {
                    std::thread::sleep(tick);
                    let late = watched
                        .current
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .as_ref()
                        .filter(|(since, _)| since.elapsed() > timeout)
                        .map(|(since, what)| (what.clone(), since.elapsed()));
                    if let Some((what, waited)) = late {
                        on_timeout(&what, waited);
                        return;
                    }
                }
            });
        if let Err(e) = spawned {
            // Without the thread the run still works; only a hang goes unnoticed.
            eprintln!("whet: could not start the collective watchdog thread: {e}");
        }
        Self { shared, timeout }
    }

    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    /// Marks a collective as in progress until the guard drops.
    pub fn watch(&self, what: impl FnOnce() -> String) -> WatchGuard<'_> {
        *self
            .shared
            .current
            .lock()
            .unwrap_or_else(|e| e.into_inner()) = Some((Instant::now(), what()));
        WatchGuard(self)
    }
}

impl Drop for Watchdog {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::Relaxed);
    }
}

/// A collective in progress; dropping it tells the watchdog the collective finished.
pub struct WatchGuard<'a>(&'a Watchdog);

impl Drop for WatchGuard<'_> {
    fn drop(&mut self) {
        *self
            .0
            .shared
            .current
            .lock()
            .unwrap_or_else(|e| e.into_inner()) = None;
    }
}

/// The message a timed-out rank prints before it aborts the job.
pub fn timeout_message(
    rank: usize,
    world: usize,
    backend: &str,
    what: &str,
    waited: Duration,
) -> String {
    format!(
        "error: rank {rank} of {world} ({backend}): {what} has waited {:.0} s for the other \
         ranks (WHET_COMM_TIMEOUT_S): a rank has hung or died. Aborting every rank; the last \
         checkpoint in output.dir is intact and `whet train` with the same config resumes from it",
        waited.as_secs_f64()
    )
}
